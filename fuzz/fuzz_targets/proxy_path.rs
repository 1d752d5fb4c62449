//! Request targets through the proxy's path rules: dot-segment refusal, route lookup and
//! the URI sent upstream, which must stay under the upstream's base path.
#![no_main]

use axum::http::Uri;
use libfuzzer_sys::fuzz_target;
use voicectl::config::ProxyRoute;
use voicectl::proxy::ProxyTable;
use voicectl::proxy::fuzzing::{has_dot_segments, upstream_uri};
use voicectl::proxy::table::match_host;

/// The oracle decodes with `percent-encoding` (the rule under test does its own matching).
fn decodes_to_dots(seg: &str) -> bool {
    matches!(
        percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .as_deref(),
        Ok("." | "..")
    )
}

fuzz_target!(|input: (&str, &str, &str)| {
    let (host, target, base) = input;
    let Ok(orig) = target.parse::<Uri>() else {
        return;
    };
    let path = orig.path();
    let dots = has_dot_segments(path);
    // Every spelling of `.`/`..` is caught.
    assert_eq!(dots, path.split('/').any(decodes_to_dots), "{path:?}");
    if dots || !path.starts_with('/') {
        return;
    }
    let routes = [
        ProxyRoute {
            host: None,
            path: "/app".into(),
            upstream: Some("http://127.0.0.1:9/base".into()),
            root: None,
        },
        ProxyRoute {
            host: Some("example.com".into()),
            path: "/".into(),
            upstream: Some("http://127.0.0.1:9".into()),
            root: None,
        },
    ];
    let Ok(table) = ProxyTable::from_config(&routes) else {
        return;
    };
    if let Some(m) = table.find(Some(match_host(host)), path) {
        assert!(path.ends_with(m.rest));
        assert!(m.rest.is_empty() || m.rest.starts_with('/'));
    }
    let base = format!("/{}", base.trim_matches('/'));
    let base = if base == "/" { String::new() } else { base };
    if base.contains(['?', '#']) || has_dot_segments(&base) {
        return;
    }
    let Some(rest) = path.strip_prefix("/app") else {
        return;
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return;
    }
    if let Some(uri) = upstream_uri("127.0.0.1:9", &base, rest, &orig) {
        let prefix = if base.is_empty() {
            "/app"
        } else {
            base.as_str()
        };
        assert!(uri.path().starts_with(prefix), "{target:?} -> {uri}");
        assert!(
            !has_dot_segments(uri.path()) || has_dot_segments(&base),
            "{uri}"
        );
        assert_eq!(uri.query(), orig.query());
    }
});

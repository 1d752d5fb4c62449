//! The `[[proxy]]` route table: built once from config (and again on reload), then matched
//! against every request that none of voicectl's own routes took.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderMap, Uri, header};

use crate::config::ProxyRoute;

/// Why a `[[proxy]]` entry cannot be used. `Config::validate` already rejects most of
/// these at startup; the table re-checks because it is also built on reload.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("proxy[{index}].path: must start with \"/\"")]
    Path { index: usize },
    #[error("proxy[{index}].upstream: {reason}")]
    Upstream { index: usize, reason: String },
    #[error("proxy[{index}]: set exactly one of upstream or root")]
    Target { index: usize },
}

/// Per-table timeouts. Not user configuration: the defaults suit an edge proxy, and tests
/// shorten them to observe a 504 without waiting a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From sending the request until the upstream's response head arrives.
    pub response_header: Duration,
    /// Longest silence while streaming an upstream response body.
    pub body_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            response_header: Duration::from_secs(60),
            body_idle: Duration::from_secs(60),
        }
    }
}

/// Where a route sends its requests.
#[derive(Debug, Clone)]
pub enum Target {
    Upstream(Upstream),
    Static(StaticRoot),
}

/// An HTTP upstream: where to connect, and the base path that replaces the route's prefix.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub authority: Authority,
    /// Empty when the upstream URL has no path (or just `/`): the request path is passed on
    /// unchanged. Otherwise, without a trailing slash, it replaces the matched route prefix.
    pub base: String,
}

#[derive(Debug, Clone)]
pub struct StaticRoot {
    /// Canonical when the directory existed at build time, so symlink checks compare like
    /// with like.
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Lower case, no port, no trailing dot.
    pub host: Option<String>,
    /// Normalised: starts with `/`, no trailing `/` unless it is exactly `/`.
    pub path: String,
    pub target: Target,
}

#[derive(Debug, Clone, Default)]
pub struct ProxyTable {
    routes: Vec<Route>,
    pub timeouts: Timeouts,
}

/// A matched route and the rest of the request path after its prefix (`""` or `/…`).
pub struct Match<'a> {
    pub route: &'a Route,
    pub rest: &'a str,
}

impl ProxyTable {
    pub fn from_config(routes: &[ProxyRoute]) -> Result<ProxyTable, TableError> {
        let routes = routes
            .iter()
            .enumerate()
            .map(|(index, r)| build_route(index, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProxyTable {
            routes,
            timeouts: Timeouts::default(),
        })
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route for `host` (already port-stripped) and `path`. Routes naming this host are
    /// preferred over host-less ones (virtual hosts, as in nginx's `server_name`); within the
    /// chosen group the longest prefix wins, and the first entry among equals.
    pub fn find<'a>(&'a self, host: Option<&str>, path: &'a str) -> Option<Match<'a>> {
        let host_routes = self.routes.iter().filter(
            |r| matches!((&r.host, host), (Some(h), Some(req)) if h.eq_ignore_ascii_case(req)),
        );
        longest(host_routes, path).or_else(|| {
            let any_host = self.routes.iter().filter(|r| r.host.is_none());
            longest(any_host, path)
        })
    }
}

fn longest<'a>(routes: impl Iterator<Item = &'a Route>, path: &'a str) -> Option<Match<'a>> {
    let mut best: Option<Match<'a>> = None;
    for route in routes {
        let Some(rest) = prefix_rest(&route.path, path) else {
            continue;
        };
        // Strictly longer only: the first of equal prefixes keeps its place.
        if best
            .as_ref()
            .is_none_or(|b| route.path.len() > b.route.path.len())
        {
            best = Some(Match { route, rest });
        }
    }
    best
}

/// `Some(rest)` when `prefix` covers `path` on a segment boundary: `/app` covers `/app` and
/// `/app/x`, never `/apple`.
fn prefix_rest<'a>(prefix: &str, path: &'a str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn build_route(index: usize, r: &ProxyRoute) -> Result<Route, TableError> {
    if !r.path.starts_with('/') {
        return Err(TableError::Path { index });
    }
    let path = match r.path.trim_end_matches('/') {
        "" => "/".to_owned(),
        p => p.to_owned(),
    };
    let target = match (&r.upstream, &r.root) {
        (Some(u), None) => Target::Upstream(
            parse_upstream(u).map_err(|reason| TableError::Upstream { index, reason })?,
        ),
        (None, Some(dir)) => Target::Static(StaticRoot {
            // A root that does not exist yet still loads (the site may be deployed after
            // start); requests under it are 404 until it appears.
            dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()),
        }),
        _ => return Err(TableError::Target { index }),
    };
    Ok(Route {
        host: r.host.as_deref().map(normalise_host),
        path,
        target,
    })
}

fn parse_upstream(url: &str) -> Result<Upstream, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err(format!(
            "{url:?}: only http:// upstreams are supported (the upstream is local)"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.query().is_some() {
        return Err(format!("{url:?}: an upstream URL cannot carry a query"));
    }
    Ok(Upstream {
        authority,
        base: uri.path().trim_end_matches('/').to_owned(),
    })
}

fn normalise_host(h: &str) -> String {
    strip_port(h).trim_end_matches('.').to_ascii_lowercase()
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The host the client asked for: the request target's authority (HTTP/2, or an HTTP/1.1
/// absolute-form target, which RFC 9112 §3.2.2 says overrides `Host`), else `Host`.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(Authority::as_str)
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
}

/// The host for route matching: no port, no trailing dot (compared case-insensitively).
pub fn match_host(raw: &str) -> &str {
    strip_port(raw).trim_end_matches('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, path: &str, up: &str) -> ProxyRoute {
        ProxyRoute {
            host: host.map(str::to_owned),
            path: path.into(),
            upstream: Some(up.into()),
            root: None,
        }
    }

    fn hit(t: &ProxyTable, host: Option<&str>, path: &str) -> Option<(String, String)> {
        t.find(host, path).map(|m| match &m.route.target {
            Target::Upstream(u) => (u.authority.to_string(), m.rest.to_owned()),
            Target::Static(_) => unreachable!(),
        })
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = ProxyTable::from_config(&[
            route(None, "/", "http://root:1"),
            route(None, "/app/", "http://app:1"),
            route(None, "/app/api", "http://api:1"),
            route(None, "/app", "http://dup:1"),
        ])
        .unwrap();
        let h = |p| hit(&t, None, p).unwrap();
        assert_eq!(h("/app"), ("app:1".into(), "".into()));
        assert_eq!(h("/app/x"), ("app:1".into(), "/x".into()));
        assert_eq!(h("/apple"), ("root:1".into(), "/apple".into()));
        assert_eq!(h("/app/api/v"), ("api:1".into(), "/v".into()));
        assert_eq!(h("/app/apix"), ("app:1".into(), "/apix".into()));
        assert_eq!(h("/"), ("root:1".into(), "/".into()));
    }

    #[test]
    fn host_routes_win_over_host_less_ones() {
        let t = ProxyTable::from_config(&[
            route(None, "/static", "http://any:1"),
            route(Some("Example.COM"), "/", "http://ex:1"),
        ])
        .unwrap();
        assert_eq!(hit(&t, Some("example.com"), "/static/a").unwrap().0, "ex:1");
        assert_eq!(hit(&t, Some("EXAMPLE.com"), "/").unwrap().0, "ex:1");
        assert_eq!(hit(&t, Some("other.com"), "/static").unwrap().0, "any:1");
        assert!(hit(&t, Some("other.com"), "/").is_none());
        assert!(hit(&t, None, "/x").is_none());
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(match_host("example.com:8080"), "example.com");
        assert_eq!(match_host("example.com."), "example.com");
        assert_eq!(match_host("[::1]:80"), "[::1]");
        assert_eq!(match_host("[::1]"), "[::1]");
        assert_eq!(match_host("example.com"), "example.com");
    }

    #[test]
    fn upstream_base_paths() {
        let u = parse_upstream("http://127.0.0.1:3000").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.base.as_str()),
            ("127.0.0.1:3000", "")
        );
        assert_eq!(parse_upstream("http://h:1/").unwrap().base, "");
        assert_eq!(parse_upstream("http://h:1/base/").unwrap().base, "/base");
        assert!(parse_upstream("https://h:1").is_err());
        assert!(parse_upstream("http://h:1/?q=1").is_err());
        assert!(parse_upstream("nope").is_err());
    }
}

/// Property tests (issue 11): host and prefix matching are total and never match across a
/// segment boundary.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn host_helpers_return_a_prefix(host in "\\PC{0,40}|\\[[0-9a-f:]{0,10}\\]?(:[0-9]{0,6})?") {
            let stripped = strip_port(&host);
            prop_assert!(host.starts_with(stripped));
            prop_assert!(host.starts_with(match_host(&host)));
            let _ = normalise_host(&host);
        }

        #[test]
        fn prefixes_match_whole_segments(
            prefix in "/|(/[a-z]{1,4}){1,3}",
            path in "(/[a-z]{0,5}){0,4}",
        ) {
            if let Some(rest) = prefix_rest(&prefix, &path) {
                prop_assert!(rest.is_empty() || rest.starts_with('/'));
                if prefix != "/" {
                    prop_assert_eq!(format!("{prefix}{rest}"), path);
                }
            } else {
                prop_assert!(prefix != "/");
            }
        }

        #[test]
        fn finding_a_route_never_panics(
            routes in proptest::collection::vec(("(/[a-z]{0,4}){0,3}", proptest::option::of("[a-z.]{1,8}")), 0..5),
            host in proptest::option::of("\\PC{0,16}"),
            path in "\\PC{0,40}",
        ) {
            let routes: Vec<ProxyRoute> = routes
                .into_iter()
                .map(|(p, h)| ProxyRoute {
                    host: h,
                    path: if p.is_empty() { "/".into() } else { p },
                    upstream: Some("http://127.0.0.1:9".into()),
                    root: None,
                })
                .collect();
            let table = ProxyTable::from_config(&routes).expect("valid routes");
            if let Some(m) = table.find(host.as_deref(), &path) {
                prop_assert!(path.ends_with(m.rest));
            }
        }
    }
}

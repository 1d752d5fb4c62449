//! The built-in reverse proxy and static site (`[[proxy]]`, SPEC §2 and §4): whatever none of
//! voicectl's own routes answers goes to the route table here, or gets the SPEC 404.
//!
//! `table` picks the route, `forward` streams to an HTTP upstream (and tunnels upgrades),
//! `files` serves a directory, `headers` owns the hop-by-hop and `X-Forwarded-*` rules.

mod files;
mod forward;
pub mod headers;
pub mod table;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::uri::{PathAndQuery, Scheme};
use axum::http::{Method, Uri};
use axum::response::Response;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use table::{ProxyTable, TableError, Timeouts};

use crate::config::Config;
use crate::ops::net::{self, IpNet};
use table::Target;

/// Connecting to a local upstream either works at once or the upstream is down; 5 s covers a
/// SYN retransmit without holding the client for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle keep-alive connections to upstreams are closed after this long (as rpxy does), well
/// before a typical upstream's own keep-alive timeout, so we rarely reuse one it is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What can go wrong between the client and the route's target; each maps to one status and
/// SPEC error code.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no such route")]
    NoRoute,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("upstream failed: {0}")]
    Upstream(String),
}

/// A WebSocket slot (`limits.max_websockets_per_ip`) taken for an upgrade request; the
/// tunnel holds it until it closes (held, never read). Travels in the request's extensions.
#[derive(Clone)]
pub struct TunnelSlot(#[allow(dead_code)] Arc<crate::ops::WsGuard>);

impl TunnelSlot {
    pub fn new(guard: crate::ops::WsGuard) -> Self {
        Self(Arc::new(guard))
    }
}

/// The proxy: a swappable route table and one pooled client shared by all upstreams.
pub struct Proxy {
    table: RwLock<Arc<ProxyTable>>,
    client: Client<HttpConnector, Body>,
    trusted: Vec<IpNet>,
}

impl Proxy {
    /// The proxy for a validated config. `Config::validate` has already rejected every entry
    /// `ProxyTable::from_config` would, so the error arm only guards against a config that
    /// skipped validation: it serves no routes rather than guessing.
    pub fn from_config(config: &Config) -> Proxy {
        let table = ProxyTable::from_config(&config.proxy).unwrap_or_else(|e| {
            tracing::error!(error = %e, "proxy routes disabled");
            ProxyTable::default()
        });
        let trusted = net::parse_list(&config.server.trusted_proxies).unwrap_or_default();
        Proxy::new(table, trusted)
    }

    pub fn new(table: ProxyTable, trusted: Vec<IpNet>) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // Small request/response heads must not wait for Nagle.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // Without a timer the idle timeout above is never enforced.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Proxy {
            table: RwLock::new(Arc::new(table)),
            client,
            trusted,
        }
    }

    /// Swaps in a new route table (config reload); requests in flight keep the old one.
    pub fn reload(&self, table: ProxyTable) {
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }

    pub fn table(&self) -> Arc<ProxyTable> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a `[[proxy]]` route would take this request (the dashboard leaves `/` to it).
    pub fn claims(&self, req: &Request) -> bool {
        let table = self.table();
        let host = table::request_host(req.uri(), req.headers()).map(table::match_host);
        table.find(host, req.uri().path()).is_some()
    }

    /// Answers a request none of our own routes took; the HTTP layer shapes the error.
    pub async fn handle(&self, req: Request) -> Result<Response, ProxyError> {
        let table = self.table();
        if table.is_empty() {
            return Err(ProxyError::NoRoute);
        }
        if req.method() == Method::CONNECT {
            // We are a reverse proxy, not a forward proxy for arbitrary hosts.
            return Err(ProxyError::MethodNotAllowed(
                "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            ));
        }
        let path = req.uri().path();
        if !path.starts_with('/') {
            return Err(ProxyError::BadRequest(
                "request target must be an absolute path",
            ));
        }
        let host = table::request_host(req.uri(), req.headers()).map(table::match_host);
        let Some(m) = table.find(host, path) else {
            return Err(ProxyError::NoRoute);
        };
        // Browsers resolve `.`/`..` before sending; a request that still has them is probing
        // for a way out of the route's prefix (or an upstream's base path).
        if has_dot_segments(path) {
            return Err(ProxyError::BadRequest("path has . or .. segments"));
        }
        match &m.route.target {
            Target::Upstream(up) => {
                let uri = upstream_uri(up, m.rest, req.uri())?;
                let timeouts = table.timeouts;
                let authority = up.authority.clone();
                drop(table);
                self.forward(req, uri, timeouts).await.inspect_err(
                    |e| tracing::warn!(upstream = %authority, error = %e, "proxy error"),
                )
            }
            Target::Static(root) => {
                let (root, rest) = (root.dir.clone(), m.rest.to_owned());
                drop(table);
                files::serve(&root, &rest, req).await
            }
        }
    }

    fn peer_is_trusted(&self, peer: Option<std::net::IpAddr>) -> bool {
        peer.is_some_and(|p| self.trusted.iter().any(|n| n.contains(p)))
    }
}

fn peer_of(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| net::canonical(c.0.ip()))
}

/// The URI we send: the upstream's authority, and either the original path (no base path) or
/// the base path in place of the route's prefix.
fn upstream_uri(up: &table::Upstream, rest: &str, orig: &Uri) -> Result<Uri, ProxyError> {
    let pq = if up.base.is_empty() {
        orig.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let mut s = String::with_capacity(up.base.len() + rest.len() + 64);
        s.push_str(&up.base);
        s.push_str(rest);
        if let Some(q) = orig.query() {
            s.push('?');
            s.push_str(q);
        }
        PathAndQuery::try_from(s).map_err(|_| ProxyError::BadRequest("invalid request target"))?
    };
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(up.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target"))
}

/// True when a segment is `.` or `..`, also percent-encoded (`%2e%2e`, `.%2E`).
fn has_dot_segments(path: &str) -> bool {
    path.split('/').any(|seg| {
        seg.len() <= 6
            && seg.starts_with(['.', '%'])
            && matches!(
                seg.to_ascii_lowercase().replace("%2e", ".").as_str(),
                "." | ".."
            )
    })
}

/// The private path rules, reachable from the `fuzz/` crate (cargo-fuzz) only: the binary
/// never enables the `fuzzing` feature, so this is not part of any interface.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use axum::http::Uri;

    pub fn has_dot_segments(path: &str) -> bool {
        super::has_dot_segments(path)
    }

    /// The URI sent to an upstream at `authority` with base path `base` for the route
    /// remainder `rest` of `orig`; `None` where the proxy answers 400.
    pub fn upstream_uri(authority: &str, base: &str, rest: &str, orig: &Uri) -> Option<Uri> {
        let up = super::table::Upstream {
            authority: authority.parse().ok()?,
            base: base.to_owned(),
        };
        super::upstream_uri(&up, rest, orig).ok()
    }

    /// The file-name segments a static route would join to its root; `None` where it
    /// answers 400 or 404 without touching the file system.
    pub fn static_segments(rest: &str) -> Option<Vec<String>> {
        super::files::decode_segments(rest).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_any_spelling() {
        for p in ["/a/../b", "/..", "/a/.", "/%2e%2e/x", "/.%2E/x", "/%2e/x"] {
            assert!(has_dot_segments(p), "{p}");
        }
        for p in ["/a/b", "/.well-known/x", "/a..b", "/...", "/%2e%2e%2e"] {
            assert!(!has_dot_segments(p), "{p}");
        }
    }

    #[test]
    fn base_path_replaces_the_prefix() {
        let up = |base: &str| table::Upstream {
            authority: "u:1".parse().unwrap(),
            base: base.into(),
        };
        let orig: Uri = "/app/x/y?q=1".parse().unwrap();
        assert_eq!(
            upstream_uri(&up(""), "/x/y", &orig).unwrap(),
            "http://u:1/app/x/y?q=1"
        );
        assert_eq!(
            upstream_uri(&up("/base"), "/x/y", &orig).unwrap(),
            "http://u:1/base/x/y?q=1"
        );
        let bare: Uri = "/app".parse().unwrap();
        assert_eq!(
            upstream_uri(&up("/base"), "", &bare).unwrap(),
            "http://u:1/base"
        );
    }
}

/// Property tests (issue 11): whatever request path arrives, a path we forward or serve
/// stays under the route's base and carries no `.`/`..` segment in any spelling.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Paths built from the characters that matter for traversal, so `..`, `%2e` and friends
    /// come up often.
    pub(crate) fn tricky_path() -> impl Strategy<Value = String> {
        let seg = prop_oneof![
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E.".to_owned()),
            Just(".%2e".to_owned()),
            Just("%2f".to_owned()),
            Just("%5c".to_owned()),
            Just("%00".to_owned()),
            Just("...".to_owned()),
            "[a-z.%2eEf5c\\\\]{0,6}",
        ];
        proptest::collection::vec(seg, 0..6).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    fn decodes_to_dots(seg: &str) -> bool {
        matches!(
            percent_encoding::percent_decode_str(seg)
                .decode_utf8()
                .as_deref(),
            Ok("." | "..")
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn dot_segments_are_caught_in_every_spelling(path in tricky_path()) {
            let any_dots = path.split('/').any(decodes_to_dots);
            prop_assert_eq!(has_dot_segments(&path), any_dots, "{}", path);
        }

        #[test]
        fn arbitrary_paths_never_panic(path in "\\PC{0,64}") {
            let _ = has_dot_segments(&path);
        }

        #[test]
        fn forwarded_paths_stay_under_the_base(
            base in "(/[a-z]{1,6}){0,2}",
            path in tricky_path(),
            query in proptest::option::of("[a-z0-9=&%]{0,12}"),
        ) {
            let up = table::Upstream { authority: "u:1".parse().expect("static"), base: base.clone() };
            let target = match &query {
                Some(q) => format!("/app{path}?{q}"),
                None => format!("/app{path}"),
            };
            let Ok(orig) = target.parse::<Uri>() else { return Ok(()) };
            let rest = orig.path().strip_prefix("/app").unwrap_or("").to_owned();
            // `handle` refuses these before building an upstream URI.
            if !(rest.is_empty() || rest.starts_with('/')) || has_dot_segments(orig.path()) {
                return Ok(());
            }
            if let Ok(uri) = upstream_uri(&up, &rest, &orig) {
                let prefix = if base.is_empty() { "/app" } else { base.as_str() };
                prop_assert!(uri.path().starts_with(prefix), "{} -> {}", target, uri);
                prop_assert!(!uri.path().split('/').any(decodes_to_dots), "{}", uri);
                prop_assert_eq!(uri.query(), orig.query());
                prop_assert_eq!(uri.authority().map(|a| a.as_str()), Some("u:1"));
            }
        }
    }
}

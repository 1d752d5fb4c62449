//! HTTP clients for URLs we do not control (SPEC §10).
//!
//! [`tenant_client`] is for URLs a tenant supplies (webhooks now; tools and transfers reuse
//! it): no redirects followed, no proxy, and every address a host name resolves to is checked
//! when the connection is made, so a name that resolves to 169.254.169.254 or 127.0.0.1 (DNS
//! rebinding included) is refused even though the URL looked fine when it was saved. Call
//! [`check`] on the URL before each request: literal addresses never reach the resolver.
//!
//! [`provider_redirects`] is the policy for clients that carry our own keys (Ultravox,
//! Twilio): a redirect is followed only within the same origin, so a key never travels to
//! another host.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use crate::domain::net::is_public;
pub use crate::domain::net::{OutboundRefusal, check_outbound_url as check, host_allowed};

/// The connection-time half of the rule: resolves with the system resolver, then drops every
/// address a tenant URL may not reach (unless the host is in `server.allow_private_targets`).
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allow: Arc<[String]>,
}

impl GuardedResolver {
    pub fn new(allow: &[String]) -> Self {
        Self {
            allow: allow.into(),
        }
    }

    /// The addresses of `host` a tenant URL may connect to; Err when none is left.
    pub async fn resolve_host(&self, host: &str) -> Result<Vec<SocketAddr>, OutboundRefusal> {
        let found: Vec<SocketAddr> = match tokio::net::lookup_host((host, 0)).await {
            Ok(it) => it.collect(),
            // Not a refusal: the name does not resolve at all.
            Err(_) => Vec::new(),
        };
        if host_allowed(host, &self.allow) {
            return Ok(found);
        }
        let first = found.first().map(SocketAddr::ip);
        let public: Vec<SocketAddr> = found.into_iter().filter(|a| is_public(a.ip())).collect();
        match (public.is_empty(), first) {
            (false, _) => Ok(public),
            (true, Some(ip)) => Err(OutboundRefusal::Address(ip)),
            (true, None) => Ok(Vec::new()),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            match this.resolve_host(&host).await {
                Ok(addrs) if addrs.is_empty() => Err(format!("{host}: no such host").into()),
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            }
        })
    }
}

/// The client for tenant-supplied URLs: no redirects, no proxy, guarded resolution, short
/// connect timeout.
pub fn tenant_client(allow: &[String], timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver::new(allow)))
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .user_agent(concat!("voicectl/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Was this request refused by the guard (at connect time)? Returns the refusal.
pub fn refusal(e: &reqwest::Error) -> Option<OutboundRefusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<OutboundRefusal>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

/// Redirects for clients that carry our keys: followed only to the same origin (scheme, host,
/// port), at most 5; anything else is returned to the caller as the 3xx it is.
pub fn provider_redirects() -> redirect::Policy {
    redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .first()
            .is_some_and(|first| same_origin(first, attempt.url()));
        if attempt.previous().len() > 5 {
            attempt.error("too many redirects")
        } else if same {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Same scheme, host and port (parsed, not string prefixes).
pub fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.origin() == b.origin()
}

/// A URL as it may be logged: scheme, host, port and path; never the query or credentials.
pub fn loggable(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}{}", u.scheme(), u.path()),
                None => format!("{}://{host}{}", u.scheme(), u.path()),
            }
        }
        Err(_) => "<invalid url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused_at_connect_time() {
        let r = GuardedResolver::new(&[]);
        let e = r.resolve_host("localhost").await.unwrap_err();
        assert_eq!(e.reason(), "address");
        // Allowed hosts resolve as usual.
        let r = GuardedResolver::new(&["localhost".into()]);
        assert!(!r.resolve_host("localhost").await.unwrap().is_empty());
    }

    /// A loopback listener that counts requests and answers with `status` and `location`.
    async fn server(status: u16, location: Option<String>) -> (SocketAddr, Arc<AtomicUsize>) {
        use axum::http::{HeaderValue, StatusCode, header};
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let h = h.clone();
            let location = location.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let mut r = axum::response::Response::new(axum::body::Body::empty());
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                if let Some(l) = location {
                    r.headers_mut()
                        .insert(header::LOCATION, HeaderValue::from_str(&l).unwrap());
                }
                r
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (addr, hits)
    }

    #[tokio::test]
    async fn the_tenant_client_refuses_private_names_and_follows_no_redirect() {
        let (inner, inner_hits) = server(200, None).await;
        let (outer, outer_hits) = server(302, Some(format!("http://{inner}/secret"))).await;

        // A name that resolves to loopback: refused before any connection, by the guard.
        let c = tenant_client(&[], Duration::from_secs(5)).unwrap();
        let e = c
            .get(format!("https://localhost:{}/x", inner.port()))
            .send()
            .await
            .unwrap_err();
        assert_eq!(refusal(&e).map(|r| r.reason()), Some("address"), "{e:?}");
        assert_eq!(inner_hits.load(Ordering::SeqCst), 0);

        // An allowed loopback target that redirects into another loopback port: the 302
        // comes back as is, the target is never contacted.
        let c = tenant_client(&["127.0.0.1".into()], Duration::from_secs(5)).unwrap();
        let r = c.get(format!("http://{outer}/hook")).send().await.unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(outer_hits.load(Ordering::SeqCst), 1);
        assert_eq!(inner_hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn provider_clients_follow_redirects_only_within_the_origin() {
        let (other, other_hits) = server(200, None).await;
        let (origin, _) = server(302, Some(format!("http://{other}/steal"))).await;
        let c = reqwest::Client::builder()
            .redirect(provider_redirects())
            .build()
            .unwrap();
        let r = c
            .get(format!("http://{origin}/x"))
            .header("x-api-key", "secret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302, "cross-origin redirect not followed");
        assert_eq!(other_hits.load(Ordering::SeqCst), 0);
        let a = reqwest::Url::parse("https://api.ultravox.ai/api/calls").unwrap();
        for (b, same) in [
            ("https://api.ultravox.ai/api/calls?cursor=2", true),
            ("https://api.ultravox.ai.evil.tld/api/calls", false),
            ("https://api.ultravox.ai:8443/api/calls", false),
            ("http://api.ultravox.ai/api/calls", false),
        ] {
            assert_eq!(
                same_origin(&a, &reqwest::Url::parse(b).unwrap()),
                same,
                "{b}"
            );
        }
    }

    #[test]
    fn loggable_urls_carry_no_query_or_credentials() {
        assert_eq!(
            loggable("https://u:p@hooks.example.com:8443/a/b?token=s3cret#f"),
            "https://hooks.example.com:8443/a/b"
        );
    }
}

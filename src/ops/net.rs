//! Client addresses: CIDR allow-lists, the real client behind a trusted proxy, and the key a
//! client is rate-limited under.

use std::net::{IpAddr, Ipv6Addr};

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

pub use crate::domain::net::{IpNet, canonical, parse_list};

/// The key a client is rate-limited under. One IPv6 host usually owns a whole /64, so keying
/// on the full address would let it rotate through 2^64 fresh buckets.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let masked = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(masked))
        }
        v4 => v4,
    }
}

/// The client's address: the TCP peer, or, when the peer is one of `trusted` proxies, the
/// right-most address in `X-Forwarded-For` that is not itself a trusted proxy. Forwarded
/// headers from anyone else are ignored, so clients cannot pick their own rate-limit bucket.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.iter().any(|n| n.contains(peer)) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(v) = value.to_str() else {
            return peer;
        };
        for part in v.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(canonical(ip)),
                // A garbled chain cannot be trusted at all.
                Err(_) => return peer,
            }
        }
    }
    hops.iter()
        .rev()
        .find(|ip| !trusted.iter().any(|n| n.contains(**ip)))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// The client address of this request, as the ops middleware resolved it (trusted proxies
/// applied). Handlers take it as an extractor, e.g. to key a WebSocket guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(request_client_ip(&parts.extensions)))
    }
}

/// [`ClientIp`] from a request's extensions (the ops middleware's answer, else the peer).
pub fn request_client_ip(ext: &axum::http::Extensions) -> IpAddr {
    if let Some(ip) = ext.get::<ClientIp>() {
        return ip.0;
    }
    let peer = ext
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    peer.map_or(UNKNOWN, canonical)
}

/// Stands in for the peer when a listener provides no `ConnectInfo` (only in-process tests;
/// every real listener must insert `ConnectInfo<SocketAddr>`).
pub const UNKNOWN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_matching() {
        let n = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.9.9.9")), "v4-mapped counts as v4");
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(IpNet::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!IpNet::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
        let v6 = IpNet::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        assert_eq!(
            limit_key(ip("2001:db8::1")),
            limit_key(ip("2001:db8::ffff:1"))
        );
        assert_ne!(
            limit_key(ip("2001:db8::1")),
            limit_key(ip("2001:db8:0:1::1"))
        );
        assert_eq!(limit_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted = parse_list(&["10.0.0.0/8".into()]).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.9".parse().unwrap(),
        );
        // Untrusted peer: the header is the client's own claim and is ignored.
        assert_eq!(client_ip(ip("5.5.5.5"), &h, &trusted), ip("5.5.5.5"));
        // Trusted peer: the right-most untrusted hop; the left part is client-controlled.
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        h.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
    }
}

/// How the client reached us. The edge inserts `Scheme::Https` as a request extension on
/// connections it terminated with TLS; absent means plain HTTP. The proxy uses it for
/// `X-Forwarded-Proto`, the edge for HSTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn of(extensions: &axum::http::Extensions) -> Scheme {
        extensions.get::<Scheme>().copied().unwrap_or_default()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

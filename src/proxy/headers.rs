//! Header rewriting at the proxy boundary: hop-by-hop headers never cross it, and the
//! `X-Forwarded-*` family is ours unless the peer is a proxy we trust.

use std::net::IpAddr;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and `Proxy-*`). They
/// describe one connection, so forwarding them would let a client steer our connection to the
/// upstream (e.g. `Transfer-Encoding` smuggling).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names (so
/// `Connection: X-Secret` cannot smuggle `X-Secret` past us, or make us drop it on purpose,
/// depending on how the far side reads it). `Upgrade` goes too; the caller re-adds it for a
/// tunnel it has agreed to.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            // Host is end-to-end by definition; we set it ourselves anyway.
            .filter(|n| n != header::HOST)
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
    // "httpoxy": some CGI-style upstreams turn a `Proxy` header into `HTTP_PROXY`.
    h.remove("proxy");
}

/// The upgrade protocol a request asks for: only when `Connection` lists `upgrade` and an
/// `Upgrade` header exists (RFC 9110 §7.8).
pub fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/-Proto/-Host`.
///
/// From an untrusted peer every client-supplied `X-Forwarded-*`, `Forwarded` and `X-Real-IP`
/// is dropped, and the chain restarts at the peer: anything else would let a client forge
/// its address to the upstream. From a trusted proxy its chain is kept and the peer appended,
/// and its `-Proto`/`-Host` (it terminated the client's connection) are kept when present.
pub fn set_forwarded(
    h: &mut HeaderMap,
    peer: Option<IpAddr>,
    trusted: bool,
    scheme: &'static str,
    host: Option<HeaderValue>,
) {
    if !trusted {
        let forged = h.keys().any(|k| is_forwarding_header(k.as_str()));
        if forged {
            let names: Vec<HeaderName> = h
                .keys()
                .filter(|k| is_forwarding_header(k.as_str()))
                .cloned()
                .collect();
            for n in names {
                h.remove(n);
            }
        }
    }
    if let Some(peer) = peer {
        let chain = if trusted && h.contains_key(&X_FORWARDED_FOR) {
            let mut s = String::new();
            for v in h.get_all(&X_FORWARDED_FOR) {
                if let Ok(v) = v.to_str() {
                    s.push_str(v.trim());
                    s.push_str(", ");
                }
            }
            s.push_str(&peer.to_string());
            HeaderValue::from_str(&s).ok()
        } else {
            HeaderValue::from_str(&peer.to_string()).ok()
        };
        if let Some(v) = chain {
            h.insert(X_FORWARDED_FOR, v);
        }
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
    if !(trusted && h.contains_key(&X_FORWARDED_HOST))
        && let Some(host) = host
    {
        h.insert(X_FORWARDED_HOST, host);
    }
}

fn is_forwarding_header(name: &str) -> bool {
    name.starts_with("x-forwarded-") || name == "forwarded" || name == "x-real-ip"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy", "http://evil"),
            ("x-kept", "1"),
            ("host", "example.com"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-kept"]);
    }

    #[test]
    fn upgrade_needs_the_connection_token() {
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
        assert!(upgrade_protocol(&map(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_protocol(&map(&[("connection", "upgrade")])).is_none());
    }

    #[test]
    fn forwarded_headers_from_untrusted_peers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-port", "1"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let host = Some(HeaderValue::from_static("site.test"));
        set_forwarded(
            &mut h,
            Some("1.2.3.4".parse().unwrap()),
            false,
            "http",
            host,
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "site.test");
        assert!(!h.contains_key("x-forwarded-port"));
        assert!(!h.contains_key("forwarded"));
    }

    #[test]
    fn trusted_peers_extend_the_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6, 7.7.7.7"),
            ("x-forwarded-for", "8.8.8.8"),
            ("x-forwarded-proto", "https"),
        ]);
        let host = Some(HeaderValue::from_static("site.test"));
        set_forwarded(
            &mut h,
            Some("10.0.0.1".parse().unwrap()),
            true,
            "http",
            host,
        );
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 8.8.8.8, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "site.test");
    }
}

/// Property tests (issue 11): for any header map a client can send, nothing hop-by-hop and
/// nothing forged about the client's address reaches the upstream.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("connection".to_owned()),
            Just("keep-alive".to_owned()),
            Just("transfer-encoding".to_owned()),
            Just("upgrade".to_owned()),
            Just("te".to_owned()),
            Just("proxy".to_owned()),
            Just("x-forwarded-for".to_owned()),
            Just("x-forwarded-proto".to_owned()),
            Just("x-forwarded-host".to_owned()),
            Just("forwarded".to_owned()),
            Just("x-real-ip".to_owned()),
            Just("host".to_owned()),
            Just("x-secret".to_owned()),
            "[a-z-]{1,10}",
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"upgrade".to_vec()),
            Just(b"keep-alive, x-secret, host".to_vec()),
            Just(b"1.2.3.4".to_vec()),
            "[ -~]{0,24}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..24),
        ]
    }

    fn headers() -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec((name(), value()), 0..10).prop_map(|pairs| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_bytes(&v),
                ) {
                    h.append(n, v);
                }
            }
            h
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn hop_by_hop_never_crosses(mut h in headers()) {
            let named: Vec<HeaderName> = h
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .filter(|n| n != header::HOST)
                .collect();
            let host = h.get_all(header::HOST).iter().cloned().collect::<Vec<_>>();
            let _ = upgrade_protocol(&h);
            strip_hop_by_hop(&mut h);
            for n in HOP_BY_HOP.iter().chain(&named) {
                prop_assert!(!h.contains_key(n), "{} survived", n);
            }
            prop_assert!(!h.contains_key(header::UPGRADE) && !h.contains_key("proxy"));
            prop_assert_eq!(h.get_all(header::HOST).iter().cloned().collect::<Vec<_>>(), host);
        }

        #[test]
        fn untrusted_peers_cannot_forge_forwarding(
            mut h in headers(),
            peer in any::<std::net::IpAddr>(),
            trusted in any::<bool>(),
        ) {
            let sent_for: Vec<HeaderValue> = h.get_all(&X_FORWARDED_FOR).iter().cloned().collect();
            set_forwarded(&mut h, Some(peer), trusted, "https", Some(HeaderValue::from_static("example.com")));
            let xff: Vec<&HeaderValue> = h.get_all(&X_FORWARDED_FOR).iter().collect();
            prop_assert_eq!(xff.len(), 1);
            let xff = xff[0].to_str().expect("ours is ASCII");
            prop_assert!(xff.ends_with(&peer.to_string()));
            if !trusted {
                prop_assert_eq!(xff, peer.to_string());
                prop_assert!(!h.contains_key("forwarded") && !h.contains_key("x-real-ip"));
                prop_assert_eq!(h.get(&X_FORWARDED_PROTO).map(|v| v.as_bytes()), Some(&b"https"[..]));
                prop_assert_eq!(h.get(&X_FORWARDED_HOST).map(|v| v.as_bytes()), Some(&b"example.com"[..]));
            } else if sent_for.is_empty() {
                prop_assert_eq!(xff, peer.to_string());
            }
        }
    }
}

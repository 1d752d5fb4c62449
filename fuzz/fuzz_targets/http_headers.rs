//! A request head's header lines through the proxy's header rules: nothing hop-by-hop and
//! no forged forwarding header reaches an upstream.
#![no_main]

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use voicectl::proxy::headers::{set_forwarded, strip_hop_by_hop, upgrade_protocol};

fuzz_target!(|input: (bool, [u8; 4], &[u8])| {
    let (trusted, ip, head) = input;
    let mut h = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (n, v) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
            h.append(n, v);
        }
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| n != header::HOST)
        .collect();
    let _ = upgrade_protocol(&h);
    strip_hop_by_hop(&mut h);
    for n in &named {
        assert!(!h.contains_key(n), "{n} survived");
    }
    for n in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "trailer",
    ] {
        assert!(!h.contains_key(n), "{n} survived");
    }
    let peer = std::net::IpAddr::from(ip);
    set_forwarded(&mut h, Some(peer), trusted, "https", None);
    let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1);
    if !trusted {
        assert_eq!(xff[0].as_bytes(), peer.to_string().as_bytes());
        assert!(!h.contains_key("forwarded") && !h.contains_key("x-real-ip"));
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(
            h.get("x-forwarded-proto").map(|v| v.as_bytes()),
            Some(&b"https"[..])
        );
    }
});

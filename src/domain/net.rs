//! Address blocks (`10.0.0.0/8`, `2001:db8::/32`) as the config file spells them.

use std::net::IpAddr;

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block like \"10.0.0.0/8\""))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(IpNet {
            addr: canonical(addr),
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses a list of blocks; the error names the entry.
pub fn parse_list(items: &[String]) -> Result<Vec<IpNet>, String> {
    items.iter().map(|s| IpNet::parse(s)).collect()
}

/// IPv4 clients of a dual-stack listener arrive as `::ffff:a.b.c.d`; treat them as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Why a URL a tenant supplied (webhook, tool, transfer) may not be called (SPEC §10).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundRefusal {
    #[error("{0:?} is not an http(s) URL with a host")]
    NotAUrl(String),
    #[error("plain http is only allowed to hosts in server.allow_private_targets; use https")]
    Scheme,
    #[error("{0} is a loopback, private, link-local, unique-local or multicast address")]
    Address(IpAddr),
    #[error("URLs with a user name or password are not allowed")]
    Credentials,
}

impl OutboundRefusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            OutboundRefusal::NotAUrl(_) | OutboundRefusal::Credentials => "url",
            OutboundRefusal::Scheme => "scheme",
            OutboundRefusal::Address(_) => "address",
        }
    }
}

/// Is `host` (as a URL spells it: `[::1]` or `::1`, any case) one of `allow`?
pub fn host_allowed(host: &str, allow: &[String]) -> bool {
    let bare = |h: &str| {
        h.trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    };
    let host = bare(host);
    let host_ip = host.parse::<IpAddr>().ok().map(canonical);
    allow.iter().any(|a| {
        let a = bare(a);
        match (host_ip, a.parse::<IpAddr>().ok()) {
            (Some(h), Some(a)) => h == canonical(a),
            _ => a == host,
        }
    })
}

/// The static half of the outbound rule: `https` (plain `http` only to an allowed host), a
/// host, no credentials, and a literal address must be public unless allowed. Names are
/// checked again, per resolved address, when the connection is made (`ops::outbound`).
pub fn check_outbound_url(url: &str, allow: &[String]) -> Result<reqwest::Url, OutboundRefusal> {
    let u = reqwest::Url::parse(url.trim()).map_err(|_| OutboundRefusal::NotAUrl(url.into()))?;
    let Some(host) = u.host_str().filter(|h| !h.is_empty()) else {
        return Err(OutboundRefusal::NotAUrl(url.into()));
    };
    if !u.username().is_empty() || u.password().is_some() {
        return Err(OutboundRefusal::Credentials);
    }
    let allowed = host_allowed(host, allow);
    match u.scheme() {
        "https" => {}
        "http" if allowed => {}
        "http" => return Err(OutboundRefusal::Scheme),
        _ => return Err(OutboundRefusal::NotAUrl(url.into())),
    }
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    if let Some(ip) = literal
        && !allowed
        && !is_public(ip)
    {
        return Err(OutboundRefusal::Address(ip));
    }
    Ok(u)
}

/// May a tenant-supplied URL reach `ip`? No loopback, private (RFC 1918, CGNAT), link-local
/// (169.254.0.0/16 with the cloud metadata address, fe80::/10), unique-local (fc00::/7),
/// multicast, unspecified, broadcast, documentation or reserved ranges; IPv4 embedded in
/// IPv6 (mapped, compatible, NAT64, 6to4) is judged as the IPv4 address it carries.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let bits = u128::from(v6);
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            // ::a.b.c.d (deprecated IPv4-compatible), incl. :: and ::1.
            if bits >> 32 == 0 {
                return false;
            }
            // NAT64 64:ff9b::/96 carries an IPv4 address in its low bits.
            if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
                return is_public_v4(std::net::Ipv4Addr::from(bits as u32));
            }
            // 6to4 2002::/16 carries one in bits 16..48.
            if seg[0] == 0x2002 {
                return is_public_v4(std::net::Ipv4Addr::from((bits >> 80) as u32));
            }
            let forbidden = [
                (0xfc00, 7),  // unique local
                (0xfe80, 10), // link local
                (0xfec0, 10), // site local (deprecated)
                (0xff00, 8),  // multicast
            ];
            if forbidden
                .iter()
                .any(|&(p, len)| seg[0] >> (16 - len) == p >> (16 - len))
            {
                return false;
            }
            // Documentation 2001:db8::/32 and the ORCHID/benchmark blocks under 2001::/23.
            !(seg[0] == 0x2001 && (seg[1] == 0x0db8 || seg[1] < 0x0200))
        }
    }
}

fn is_public_v4(v4: std::net::Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    !(a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224)
}

#[cfg(test)]
mod outbound_tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn outbound_urls_need_https_and_a_public_literal() {
        let none: Vec<String> = vec![];
        assert!(check_outbound_url("https://hooks.example.com/x?y=1", &none).is_ok());
        for (url, reason) in [
            ("https://169.254.169.254/latest/meta-data", "address"),
            ("https://10.0.0.5/hook", "address"),
            ("https://[::1]:8443/hook", "address"),
            ("https://[::ffff:127.0.0.1]/hook", "address"),
            ("http://hooks.example.com/x", "scheme"),
            ("http://127.0.0.1:9/x", "scheme"),
            ("ftp://hooks.example.com/x", "url"),
            ("https://user:pw@hooks.example.com/x", "url"),
            ("not a url", "url"),
        ] {
            let e = check_outbound_url(url, &none).expect_err(url);
            assert_eq!(e.reason(), reason, "{url}: {e}");
        }
        let allow = vec![
            "127.0.0.1".to_owned(),
            "[::1]".to_owned(),
            "Hooks.Local".into(),
        ];
        assert!(check_outbound_url("http://127.0.0.1:9/x", &allow).is_ok());
        assert!(check_outbound_url("http://[::1]:9/x", &allow).is_ok());
        assert!(check_outbound_url("http://hooks.local/x", &allow).is_ok());
        assert!(check_outbound_url("http://127.0.0.2:9/x", &allow).is_err());
    }
}

//! `X-Twilio-Signature` (PROTOCOLS §2): Base64(HMAC-SHA1(auth token, URL + sorted params)),
//! accepted the way Twilio's helper libraries accept it: on the URL as received, with any port
//! removed, or with the scheme's default port added.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

type HmacSha1 = Hmac<Sha1>;

/// The signature Twilio would send for `url` and form `params`.
pub fn compute(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    // The key may be any length; `new_from_slice` only fails for fixed-size-key MACs.
    let mut mac = match HmacSha1::new_from_slice(auth_token.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(url.as_bytes());
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Names in byte order; a repeated name's values sorted and de-duplicated (both helpers do).
    sorted.sort_unstable();
    sorted.dedup();
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `signature` is valid for the request. Comparison is constant-time per candidate.
pub fn validate(auth_token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    if signature.is_empty() || auth_token.is_empty() {
        return false;
    }
    let mut ok = false;
    for candidate in url_variants(url) {
        let expected = compute(auth_token, &candidate, params);
        ok |= bool::from(expected.as_bytes().ct_eq(signature.as_bytes()));
    }
    ok
}

/// The URL as given, without its port, and with the default port added when it has none.
fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Some(scheme_end) = url.find("://") else {
        return out;
    };
    let scheme = &url[..scheme_end];
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let tail = &rest[authority_end..];
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    // A port is the digits after the last ':' outside an IPv6 literal.
    let port_sep = hostport.rfind(':').filter(|&i| {
        !hostport[i..].contains(']') && hostport[i + 1..].bytes().all(|b| b.is_ascii_digit())
    });
    match port_sep {
        Some(i) => out.push(format!("{scheme}://{userinfo}{}{tail}", &hostport[..i])),
        None => {
            let defaults: &[u16] = match scheme {
                "https" => &[443],
                "wss" => &[443, 80],
                _ => &[80],
            };
            for p in defaults {
                out.push(format!("{scheme}://{userinfo}{hostport}:{p}{tail}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    #[test]
    fn helper_library_vectors() {
        assert_eq!(
            compute("12345", URL, &params()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        for (url, sig) in [
            (
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                "kvajT1Ptam85bY51eRf/AJRuM3w=",
            ),
            (
                "http://mycompany.com:80/myapp.php?foo=1&bar=2",
                "0ZXoZLH/DfblKGATFgpif+LLRf4=",
            ),
            (
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
                "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
            ),
            (
                "https://user:pass@mycompany.com/myapp.php?foo=1&bar=2",
                "CukzLTc1tT5dXEDIHm/tKBanW10=",
            ),
            (
                "https://user:pass@mycompany.com:443/myapp.php?foo=1&bar=2",
                "ZQFR1PTIZXF2MXB8ZnKCvnnA+rI=",
            ),
            (
                "https://user@mycompany.com/myapp.php?foo=1&bar=2",
                "2YRLlVAflCqxaNicjMpJcSTgzSs=",
            ),
            (
                "https://mycompany.com/myapp.php?foo=1&bar=2&Body=It%27s+amazing",
                "TfZzewPq8wqrGlMfyAud8+/IvJ0=",
            ),
        ] {
            assert_eq!(compute("12345", url, &params()), sig, "{url}");
            assert!(validate("12345", url, &params(), sig), "{url}");
        }
    }

    #[test]
    fn port_variants_validate() {
        let sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        // Port stripped.
        assert!(validate(
            "12345",
            "https://mycompany.com:1234/myapp.php?foo=1&bar=2",
            &params(),
            sig
        ));
        // Default port added.
        assert!(validate(
            "12345",
            URL,
            &params(),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
        // JSON-body vector whose expected value is the :443 variant.
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2&bodySHA256=44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        assert_eq!(compute("12345", url, &[]), "rw/jVviOgicj2+kHZULvebnA4ag=");
        assert!(validate("12345", url, &[], "Ldidvp12m26NI7eqEvxnEpkd9Hc="));
    }

    #[test]
    fn repeated_params_sorted_and_deduplicated() {
        let p: Vec<(String, String)> = [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(compute("12345", URL, &p), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
        let a: Vec<(String, String)> = [
            ("MessagingBinding.Address", "+1325xxxxxxx"),
            ("MessagingBinding.Address", "+1415xxxxxxx"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut b = a.clone();
        b.reverse();
        assert_eq!(compute("12345", URL, &a), "83O6e2vORAoJHUNzJjDWN1jz+BA=");
        assert_eq!(compute("12345", URL, &b), "83O6e2vORAoJHUNzJjDWN1jz+BA=");
    }

    #[test]
    fn forgeries_fail() {
        let sig = compute("12345", URL, &params());
        assert!(!validate("wrong", URL, &params(), &sig));
        assert!(!validate("12345", URL, &params(), ""));
        assert!(!validate(
            "12345",
            "https://evil.com/myapp.php?foo=1&bar=2",
            &params(),
            &sig
        ));
        let mut p = params();
        p[2].1 = "9999".into();
        assert!(!validate("12345", URL, &p, &sig));
        assert!(!validate("", URL, &params(), &compute("", URL, &params())));
    }
}

/// Property tests (issue 11): whatever we sign verifies, under every URL spelling Twilio may
/// have signed, and nothing else does; arbitrary input never panics.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn params() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(("[A-Za-z]{1,8}", "\\PC{0,12}"), 0..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn what_we_sign_verifies(
            token in "[A-Za-z0-9]{1,40}",
            url in "\\PC{0,80}",
            params in params(),
        ) {
            let sig = compute(&token, &url, &params);
            prop_assert!(validate(&token, &url, &params, &sig));
            // Parameter order is not part of the signature.
            let mut reversed = params.clone();
            reversed.reverse();
            prop_assert!(validate(&token, &url, &reversed, &sig));
            // Another token, another URL or another value does not verify.
            let other_token = token.clone() + "x";
            let other_url = url.clone() + "/x";
            prop_assert!(!validate(&other_token, &url, &params, &sig));
            prop_assert!(!validate(&token, &other_url, &params, &sig));
            let mut changed = params.clone();
            changed.push(("Injected_1".into(), "1".into()));
            prop_assert!(!validate(&token, &url, &changed, &sig));
        }

        #[test]
        fn port_spellings_verify_both_ways(
            token in "[A-Za-z0-9]{1,40}",
            scheme in prop_oneof![Just("https"), Just("http")],
            host in "[a-z0-9.-]{1,20}|\\[[0-9a-f:]{2,12}\\]",
            path in "(/[A-Za-z0-9._~%-]{0,10}){0,4}(\\?[A-Za-z0-9=&]{0,20})?",
            params in params(),
        ) {
            let port = if scheme == "https" { 443 } else { 80 };
            let bare = format!("{scheme}://{host}{path}");
            let ported = format!("{scheme}://{host}:{port}{path}");
            let sig = compute(&token, &bare, &params);
            prop_assert!(validate(&token, &ported, &params, &sig), "{ported}");
            let sig = compute(&token, &ported, &params);
            prop_assert!(validate(&token, &bare, &params, &sig), "{bare}");
        }

        #[test]
        fn arbitrary_input_never_panics(
            token in "\\PC{0,20}",
            url in "\\PC{0,80}|[a-z]{1,5}://[^/]{0,20}(/\\PC{0,20})?",
            sig in "\\PC{0,40}",
            params in params(),
        ) {
            let _ = validate(&token, &url, &params, &sig);
            let variants = url_variants(&url);
            prop_assert!(!variants.is_empty() && variants.len() <= 3);
            prop_assert_eq!(&variants[0], &url);
        }
    }
}

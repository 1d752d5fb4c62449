//! Certificates as the server holds them: PEM in, a rustls `CertifiedKey` plus the facts
//! (names, issuer, validity) that renewal and `cert status` need.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("unreadable certificate PEM: {0}")]
    CertPem(String),
    #[error("no private key found in the PEM data (or it is not PKCS#8, PKCS#1 or SEC1): {0}")]
    KeyPem(String),
    #[error("the private key is not usable: {0}")]
    Key(rustls::Error),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What we know about a served certificate (its leaf), for renewal, status and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CertInfo {
    /// DNS names from the subjectAltName extension.
    pub names: Vec<String>,
    pub issuer: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    /// When to renew: once a third of the lifetime remains (certmagic, rustls-acme). A ratio,
    /// never a fixed day count, so 6-day and 45-day certificates renew as sensibly as 90-day ones.
    pub fn renew_at(&self) -> i64 {
        let lifetime = (self.not_after - self.not_before).max(0);
        self.not_after - lifetime / 3
    }

    pub fn lifetime_secs(&self) -> i64 {
        (self.not_after - self.not_before).max(0)
    }

    /// Does the certificate name every one of `names` (exactly or through a wildcard)?
    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.matches(n))
    }

    pub fn matches(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.names.iter().any(|san| {
            let san = san.to_ascii_lowercase();
            san == name
                || san.strip_prefix("*.").is_some_and(|base| {
                    name.split_once('.')
                        .is_some_and(|(label, rest)| !label.is_empty() && rest == base)
                })
        })
    }
}

/// A certificate chain with its key, ready for the TLS resolver.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// The one crypto provider TLS uses, independent of the process default (tests that build
/// listeners in-process need not install one).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Parses a PEM chain (leaf first) and a PEM private key, and checks that they belong together.
pub fn load_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCert, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::CertPem(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::KeyPem(e.to_string()))?;
    from_der(chain, key)
}

fn from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<LoadedCert, CertError> {
    let info = info(&chain[0])?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(CertError::Key)?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(CertError::KeyMismatch),
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        info,
    })
}

/// The facts of a DER certificate.
pub fn info(der: &[u8]) -> Result<CertInfo, CertError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    let validity = cert.validity();
    Ok(CertInfo {
        names,
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// A self-signed stand-in served until the first real certificate arrives, so the HTTPS
/// listener (and with it TLS-ALPN-01 validation and the redirect target) is up from the start.
pub fn self_signed(names: &[String]) -> Result<LoadedCert, CertError> {
    let mut names: Vec<String> = names.to_vec();
    if names.is_empty() {
        names.push("localhost".into());
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "voicectl fallback (not trusted)");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(7);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    from_der(vec![cert.der().clone()], key_der)
}

/// The TLS-ALPN-01 answer (RFC 8737): a self-signed certificate for `name` carrying the
/// SHA-256 of the key authorization in the critical acmeIdentifier extension.
pub fn alpn_challenge(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, CertError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(CertError::Key)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// A fresh ECDSA P-256 key and a CSR naming `names` (no subject: the names are in the SAN).
pub fn csr(names: &[String]) -> Result<(Vec<u8>, String), CertError> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let key = rcgen::KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn self_signed_round_trips_and_names_match() {
        let c = self_signed(&names(&["voice.example.com", "example.com"])).unwrap();
        assert!(c.info.covers(&names(&["example.com", "VOICE.example.com"])));
        assert!(!c.info.covers(&names(&["other.example.com"])));
        assert!(c.info.not_after > c.info.not_before);
    }

    #[test]
    fn renewal_is_at_two_thirds_of_lifetime() {
        let info = CertInfo {
            names: vec![],
            issuer: String::new(),
            serial: String::new(),
            not_before: 1000,
            not_after: 1000 + 90 * 86400,
        };
        assert_eq!(info.renew_at(), 1000 + 60 * 86400);
        let short = CertInfo {
            not_before: 0,
            not_after: 6 * 86400,
            ..info
        };
        assert_eq!(short.renew_at(), 4 * 86400);
    }

    #[test]
    fn wildcards_match_one_label() {
        let info = CertInfo {
            names: names(&["*.example.com"]),
            issuer: String::new(),
            serial: String::new(),
            not_before: 0,
            not_after: 1,
        };
        assert!(info.matches("a.example.com"));
        assert!(!info.matches("example.com"));
        assert!(!info.matches("a.b.example.com"));
    }

    #[test]
    fn mismatched_key_and_garbage_are_rejected() {
        let a = self_signed(&names(&["a.example"])).unwrap();
        let b_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let chain = pem_of(&a);
        assert!(matches!(
            load_pem(chain.as_bytes(), b_key.as_bytes()),
            Err(CertError::KeyMismatch)
        ));
        assert!(load_pem(b"garbage", b_key.as_bytes()).is_err());
        assert!(load_pem(chain.as_bytes(), b"garbage").is_err());
    }

    fn pem_of(c: &LoadedCert) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.key.cert[0].as_ref());
        let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(chunk).unwrap());
            s.push('\n');
        }
        s.push_str("-----END CERTIFICATE-----\n");
        s
    }
}

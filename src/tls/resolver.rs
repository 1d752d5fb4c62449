//! The certificate the HTTPS listener presents, chosen per handshake and swapped live.
//!
//! `resolve` runs inside every handshake, so it only takes a read lock, clones an `Arc` and
//! lets go. A renewal swaps the whole [`Active`] set at once; a load that fails never reaches
//! here, so the last good certificate stays in place.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::cert::{CertInfo, LoadedCert};

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// What is being served now.
#[derive(Debug)]
pub struct Active {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// The self-signed stand-in (no real certificate yet): readiness says 503.
    pub fallback: bool,
}

#[derive(Debug)]
pub struct CertResolver {
    active: RwLock<Arc<Active>>,
    /// TLS-ALPN-01 answers by lower-case host name, present only while an order runs.
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl CertResolver {
    pub fn new(cert: LoadedCert, fallback: bool) -> CertResolver {
        CertResolver {
            active: RwLock::new(Arc::new(Active {
                key: cert.key,
                info: cert.info,
                fallback,
            })),
            challenges: RwLock::new(HashMap::new()),
        }
    }

    pub fn active(&self) -> Arc<Active> {
        // A poisoned lock only means a panic elsewhere mid-swap of an Arc; the value is whole.
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves `cert` from the next handshake on.
    pub fn install(&self, cert: LoadedCert, fallback: bool) {
        let next = Arc::new(Active {
            key: cert.key,
            info: cert.info,
            fallback,
        });
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    pub fn set_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        self.challenges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_ascii_lowercase(), key);
    }

    pub fn clear_challenge(&self, name: &str) {
        self.challenges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name.to_ascii_lowercase());
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        // A validation handshake offers only acme-tls/1; answer it with the challenge
        // certificate or not at all (never with the real one).
        let alpn: Option<Vec<&[u8]>> = hello.alpn().map(|a| a.collect());
        if alpn.as_deref() == Some(&[ACME_TLS_ALPN][..]) {
            let name = sni?;
            return self
                .challenges
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
        }
        // One certificate carries every configured name, so an unknown or missing SNI gets
        // the same certificate: the client's name check then decides, and the server stays up.
        Some(self.active().key.clone())
    }
}

//! Where certificates, keys and the ACME account live on disk:
//!
//! ```text
//! data_dir/tls/status.json                     what `voicectl cert status` shows
//! data_dir/tls/<ca-host>-<sha256(url)[..12]>/  one directory per ACME directory URL, so
//!     account.json                             staging, production and Pebble never mix
//!     cert.pem  key.pem                        the current chain (leaf first) and its key
//! ```
//!
//! Directories are 0700 and files 0600, written atomically (temp file + fsync + rename), so
//! a crash mid-write leaves the old file, never half a key.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::{ensure_private_dir, write_private_file};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not usable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub const STATUS_FILE: &str = "status.json";
const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// A chain and its key, as PEM bytes.
pub type PemPair = (Vec<u8>, Vec<u8>);

#[derive(Debug, Clone)]
pub struct TlsStorage {
    root: PathBuf,
    ca_dir: PathBuf,
}

/// `data_dir/tls`.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The per-CA directory name: readable host plus a short hash of the whole URL.
pub fn ca_dir_name(directory_url: &str) -> String {
    let host: String = reqwest::Url::parse(directory_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "acme".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = hex::encode(Sha256::digest(directory_url.as_bytes()));
    format!("{host}-{}", &hash[..12])
}

impl TlsStorage {
    pub fn new(data_dir: &Path, directory_url: &str) -> TlsStorage {
        let root = root(data_dir);
        let ca_dir = root.join(ca_dir_name(directory_url));
        TlsStorage { root, ca_dir }
    }

    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join(STATUS_FILE)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.ca_dir.join(CERT_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.ca_dir.join(KEY_FILE)
    }

    /// Creates the directories and proves they are writable, so a permission problem shows at
    /// startup instead of after the CA has issued (and counted) a certificate.
    /// `acme`: also the per-CA directory (manual mode only keeps its status here).
    pub fn prepare(&self, acme: bool) -> Result<(), StorageError> {
        ensure_private_dir(&self.root)?;
        let dir = if acme {
            ensure_private_dir(&self.ca_dir)?;
            &self.ca_dir
        } else {
            &self.root
        };
        let probe = dir.join(".write-probe");
        write_private_file(&probe, b"probe")?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    pub fn load_account(&self) -> Result<Option<instant_acme::AccountCredentials>, StorageError> {
        let path = self.ca_dir.join(ACCOUNT_FILE);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StorageError::Corrupt {
                path,
                reason: e.to_string(),
            })
    }

    pub fn save_account(
        &self,
        creds: &instant_acme::AccountCredentials,
    ) -> Result<(), StorageError> {
        let json = serde_json::to_vec_pretty(creds).map_err(|e| StorageError::Corrupt {
            path: self.ca_dir.join(ACCOUNT_FILE),
            reason: e.to_string(),
        })?;
        write_private_file(&self.ca_dir.join(ACCOUNT_FILE), &json)?;
        Ok(())
    }

    /// Forgets the account (the CA no longer knows it, e.g. a test CA restarted).
    pub fn drop_account(&self) {
        let _ = std::fs::remove_file(self.ca_dir.join(ACCOUNT_FILE));
    }

    /// The stored chain and key PEM, if both exist.
    pub fn load_cert(&self) -> Result<Option<PemPair>, StorageError> {
        let chain = read_optional(&self.cert_path())?;
        let key = read_optional(&self.key_path())?;
        Ok(chain.zip(key))
    }

    /// Key first: a crash between the two writes leaves a new key with the old chain, which
    /// the next start rejects as a mismatch and re-issues, rather than a chain nobody can use.
    pub fn save_cert(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), StorageError> {
        write_private_file(&self.key_path(), key_pem)?;
        write_private_file(&self.cert_path(), chain_pem)?;
        Ok(())
    }

    pub fn save_status(&self, json: &[u8]) -> Result<(), StorageError> {
        ensure_private_dir(&self.root)?;
        write_private_file(&self.status_path(), json)?;
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn directories_are_per_ca_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let prod = TlsStorage::new(dir.path(), "https://acme-v02.api.letsencrypt.org/directory");
        let staging = TlsStorage::new(
            dir.path(),
            "https://acme-staging-v02.api.letsencrypt.org/directory",
        );
        assert_ne!(prod.ca_dir(), staging.ca_dir());
        assert!(
            prod.ca_dir()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("acme-v02.api.letsencrypt.org-")
        );
        prod.prepare(true).unwrap();
        prod.save_cert(b"chain", b"key").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(prod.ca_dir()), 0o700);
        assert_eq!(mode(&root(dir.path())), 0o700);
        assert_eq!(mode(&prod.key_path()), 0o600);
        assert_eq!(mode(&prod.cert_path()), 0o600);
        assert_eq!(
            prod.load_cert().unwrap(),
            Some((b"chain".to_vec(), b"key".to_vec()))
        );
        assert_eq!(staging.load_cert().unwrap(), None);
    }
}

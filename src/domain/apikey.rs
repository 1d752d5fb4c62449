//! API key material: `vk_<id>_<secret>`. The id finds the row; only SHA-256 of the secret is
//! stored, and the comparison is constant-time. Secrets carry ~158 bits of entropy, so a fast
//! hash is the right tool (no password stretching needed).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::ids::{KeyId, random_token};

const SECRET_LEN: usize = 32;

/// A freshly minted key. `full` is shown once and never stored.
pub struct NewKey {
    pub id: KeyId,
    pub full: String,
    pub hash: [u8; 32],
}

pub fn mint() -> NewKey {
    let id = KeyId::generate();
    let secret = random_token(SECRET_LEN);
    let hash = hash_secret(&secret);
    NewKey {
        full: format!("vk_{id}_{secret}"),
        id,
        hash,
    }
}

pub fn hash_secret(secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"voicectl-api-key-v1:");
    h.update(secret.as_bytes());
    h.finalize().into()
}

/// Splits a presented key into its id and secret, rejecting anything not of our shape.
pub fn parse(presented: &str) -> Option<(KeyId, &str)> {
    let rest = presented.strip_prefix("vk_")?;
    let (id, secret) = rest.split_once('_')?;
    let id = KeyId::parse(id)?;
    (secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some((id, secret))
}

pub fn secret_matches(secret: &str, stored_hash: &[u8]) -> bool {
    let h = hash_secret(secret);
    h.as_slice().ct_eq(stored_hash).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_parse_verify() {
        let k = mint();
        let (id, secret) = parse(&k.full).expect("parses");
        assert_eq!(id, k.id);
        assert!(secret_matches(secret, &k.hash));
        assert!(!secret_matches("x", &k.hash));
        assert!(!k.full.contains(&hex::encode(k.hash)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "vk_",
            "vk_abc",
            "sk-123",
            "vk_abcdefghjkmn_short",
            "Bearer vk_x_y",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}

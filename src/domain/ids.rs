//! Typed identifiers and the random material behind them.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Lower-case letters and digits without look-alikes, so IDs survive being read aloud.
const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";

/// `n` characters drawn uniformly from [`ALPHABET`] by the OS-seeded CSPRNG.
pub fn random_token(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

macro_rules! typed_id {
    ($name:ident, $prefix:literal, $len:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, random_token($len)))
            }

            /// Accepts only strings of our own shape, so garbage never reaches a query.
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($prefix)?;
                (rest.len() == $len && rest.bytes().all(|b| ALPHABET.contains(&b)))
                    .then(|| Self(s.to_owned()))
            }

            /// For values read back from our own database.
            pub fn from_db(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

typed_id!(CallId, "call_", 20);
typed_id!(KeyId, "", 12);
typed_id!(CampaignId, "cmp_", 16);

/// A media stream token is random; only this hash of it is stored, and it is consumed on first
/// use. Here (not in `calls::answer`) because answering, handovers and browser calls all mint
/// stream tokens.
pub fn token_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = CallId::generate();
        assert_eq!(CallId::parse(id.as_str()), Some(id.clone()));
        assert!(CallId::parse("call_' OR 1=1 --").is_none());
        assert!(CallId::parse("call_abc").is_none());
        let k = KeyId::generate();
        assert_eq!(k.as_str().len(), 12);
        assert_eq!(KeyId::parse(k.as_str()), Some(k));
    }
}

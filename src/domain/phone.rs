//! E.164 phone numbers: `+` then 8–15 digits, first digit not 0.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct E164(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not an E.164 phone number (expected \"+\" and 8 to 15 digits, e.g. +14155550100)"
)]
pub struct InvalidNumber(pub String);

impl E164 {
    pub fn parse(s: &str) -> Result<Self, InvalidNumber> {
        let digits = s.strip_prefix('+').unwrap_or("");
        let ok = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidNumber(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for E164 {
    type Error = InvalidNumber;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<E164> for String {
    fn from(n: E164) -> String {
        n.0
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_e164() {
        for n in ["+14155550100", "+442071838750", "+4930123456"] {
            assert!(E164::parse(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_non_e164() {
        for n in [
            "",
            "+",
            "14155550100",
            "+1 415 555 0100",
            "+0123456789",
            "+1415",
            "+1234567890123456",
            "+1415555010a",
            "tel:+14155550100",
        ] {
            assert!(E164::parse(n).is_err(), "{n}");
        }
    }
}

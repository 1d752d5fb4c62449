//! Keys pressed on the caller's line: `send_digits` on `POST /calls` (Twilio `SendDigits`).

/// Twilio's limit for `SendDigits` (WAVE2-PROTOCOLS §3).
pub const MAX_SEND_DIGITS: usize = 32;

/// Checks a `send_digits` value: 1 to 32 of `0-9 # * w` (`w` waits half a second).
pub fn check_send_digits(digits: &str) -> Result<(), String> {
    if digits.is_empty() {
        return Err("must not be empty".into());
    }
    if digits.chars().count() > MAX_SEND_DIGITS {
        return Err(format!("at most {MAX_SEND_DIGITS} characters"));
    }
    if let Some(c) = digits
        .chars()
        .find(|c| !(c.is_ascii_digit() || matches!(c, '#' | '*' | 'w')))
    {
        return Err(format!(
            "{c:?} is not allowed: only 0-9, #, * and w (a half-second pause)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_digits_accepts_keys_and_pauses_only() {
        assert!(check_send_digits("ww1234#").is_ok());
        assert!(check_send_digits("*9").is_ok());
        assert!(check_send_digits(&"1".repeat(32)).is_ok());
        assert!(check_send_digits("").is_err());
        assert!(check_send_digits(&"1".repeat(33)).is_err());
        assert!(check_send_digits("12a").is_err());
        assert!(check_send_digits("1 2").is_err());
        assert!(check_send_digits("W1").is_err());
    }
}

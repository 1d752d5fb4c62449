//! Wall-clock time as stored (Unix milliseconds) and as shown (RFC 3339, UTC).

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn rfc3339_opt(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

/// Accepts RFC 3339 (`2026-11-01T00:00:00Z`) or a relative age (`24h`, `7d`) meaning "that long ago".
pub fn parse_since(s: &str) -> Option<i64> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let d = humantime::parse_duration(s).ok()?;
    Some(now_ms() - d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_since("1970-01-01T00:00:01Z"), Some(1000));
        let an_hour_ago = parse_since("1h").unwrap();
        assert!((now_ms() - an_hour_ago - 3_600_000).abs() < 5_000);
        assert!(parse_since("yesterday-ish").is_none());
    }
}

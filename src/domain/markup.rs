//! Escaping for markup we write from values tenants and callers control: TwiML (XML) and the
//! dashboard's HTML frames share one escaper, so a fix to one cannot miss the other.

/// Escapes text for XML/HTML element content and quoted attribute values. `'` becomes the
/// numeric `&#39;` (valid in both, unlike HTML4's missing `&apos;`); control characters other
/// than tab and line breaks are dropped, as XML 1.0 does not allow them.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

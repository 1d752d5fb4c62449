//! Where LLM text is cut for TTS: at sentence ends, and at clause boundaries once a piece is
//! long enough to be worth speaking (so a long first sentence does not hold back the first
//! audio). Abbreviations and decimals ("Dr. Smith", "3.5") are not sentence ends because a
//! cut needs whitespace after the mark.

/// A clause (cut at `,;:`) is spoken on its own once it is at least this long.
const MIN_CLAUSE_CHARS: usize = 40;

/// Whether `buf` holds a complete piece.
pub fn has_piece(buf: &str) -> bool {
    let mut b = buf.to_owned();
    next_piece(&mut b).is_some()
}

/// Takes the next complete piece off the front of `buf`, if there is one.
pub fn next_piece(buf: &mut String) -> Option<String> {
    let bytes = buf.as_bytes();
    let mut cut = None;
    for (i, &b) in bytes.iter().enumerate() {
        let next_is_space = bytes.get(i + 1).is_some_and(|n| n.is_ascii_whitespace());
        if !next_is_space {
            continue;
        }
        match b {
            b'.' | b'!' | b'?' => {
                // "Dr." / "e.g." style: a one- or two-letter word before the dot is not a
                // sentence end.
                let word = buf[..i]
                    .rsplit(|c: char| c.is_whitespace())
                    .next()
                    .unwrap_or("");
                if b == b'.' && word.len() <= 2 && word.chars().all(|c| c.is_alphabetic()) {
                    continue;
                }
                cut = Some(i + 1);
                break;
            }
            b',' | b';' | b':' if i + 1 >= MIN_CLAUSE_CHARS => {
                cut = Some(i + 1);
                break;
            }
            _ => {}
        }
    }
    let cut = cut?;
    let rest = buf.split_off(cut);
    let piece = std::mem::replace(buf, rest.trim_start().to_owned());
    let piece = piece.trim().to_owned();
    (!piece.is_empty()).then_some(piece)
}

/// The start of `text` spoken in `fraction` (0–1) of its audio, cut back to a whole word.
pub fn spoken_prefix(text: &str, fraction: f64) -> &str {
    if fraction >= 1.0 {
        return text;
    }
    if fraction <= 0.0 {
        return "";
    }
    let target = (text.len() as f64 * fraction) as usize;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        if i > target {
            break;
        }
        if c.is_whitespace() {
            end = i;
        }
    }
    text[..end].trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_sentences_and_long_clauses() {
        let mut b = "Hello there. How are".to_owned();
        assert_eq!(next_piece(&mut b).as_deref(), Some("Hello there."));
        assert_eq!(b, "How are");
        assert_eq!(next_piece(&mut b), None);
        b.push_str(" you? Fine");
        assert_eq!(next_piece(&mut b).as_deref(), Some("How are you?"));
        let mut b = "Dr. Smith paid 3.5 dollars. Yes".to_owned();
        assert_eq!(
            next_piece(&mut b).as_deref(),
            Some("Dr. Smith paid 3.5 dollars.")
        );
        let mut b = "Short, not cut".to_owned();
        assert_eq!(next_piece(&mut b), None);
        let mut b = "This is a rather long clause that goes on, and on".to_owned();
        assert_eq!(
            next_piece(&mut b).as_deref(),
            Some("This is a rather long clause that goes on,")
        );
    }

    #[test]
    fn spoken_prefix_ends_on_a_word() {
        assert_eq!(spoken_prefix("one two three four", 0.5), "one two");
        assert_eq!(spoken_prefix("one two", 1.0), "one two");
        assert_eq!(spoken_prefix("one two", 0.0), "");
    }
}

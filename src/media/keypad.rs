//! Keypad in (SPEC §8): the caller's key presses gathered into one entry, ended by `#` or by a
//! pause, so "1 2 3 #" reaches the engine as one message rather than four.

use std::time::Duration;

use tokio::time::Instant;

/// No key for this long ends an entry (SPEC §8: "2 s of no key").
pub const KEYPAD_GAP: Duration = Duration::from_secs(2);
/// An entry never grows past this: a stuck key cannot build an unbounded message.
pub const MAX_KEYS: usize = 32;

/// The keys pressed so far in the current entry.
#[derive(Debug, Default)]
pub struct Keypad {
    keys: String,
    last: Option<Instant>,
}

impl Keypad {
    /// A key press; returns the finished entry when this key ends it (`#`, or the cap).
    /// Anything but `0-9 * # A-D` is ignored (Twilio sends nothing else).
    pub fn press(&mut self, key: &str, now: Instant) -> Option<String> {
        let mut chars = key.chars();
        let (Some(c), None) = (chars.next(), chars.next()) else {
            return None;
        };
        if !(c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D')) {
            return None;
        }
        self.keys.push(c);
        self.last = Some(now);
        if c == '#' || self.keys.len() >= MAX_KEYS {
            self.take()
        } else {
            None
        }
    }

    /// The entry, once [`KEYPAD_GAP`] has passed since its last key.
    pub fn due(&mut self, now: Instant) -> Option<String> {
        if now.duration_since(self.last?) >= KEYPAD_GAP {
            self.take()
        } else {
            None
        }
    }

    /// Whatever was gathered (the stream ended): `None` when nothing was.
    pub fn take(&mut self) -> Option<String> {
        self.last = None;
        (!self.keys.is_empty()).then(|| std::mem::take(&mut self.keys))
    }
}

/// What the engine is told: "The caller pressed 1 2 3 #".
pub fn engine_text(keys: &str) -> String {
    let mut s = String::from("The caller pressed");
    for c in keys.chars() {
        s.push(' ');
        s.push(c);
    }
    s
}

/// The caller's transcript line: `[keypad] 123#`.
pub fn transcript_line(keys: &str) -> String {
    format!("[keypad] {keys}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ends_an_entry_and_a_pause_ends_one_too() {
        let t0 = Instant::now();
        let mut k = Keypad::default();
        assert_eq!(k.press("1", t0), None);
        assert_eq!(k.press("2", t0), None);
        assert_eq!(k.press("#", t0).as_deref(), Some("12#"));
        assert_eq!(k.due(t0 + KEYPAD_GAP), None, "nothing left after #");

        assert_eq!(k.press("4", t0), None);
        assert_eq!(k.due(t0 + KEYPAD_GAP / 2), None);
        assert_eq!(k.press("5", t0 + KEYPAD_GAP / 2), None);
        // The gap counts from the last key.
        assert_eq!(k.due(t0 + KEYPAD_GAP), None);
        assert_eq!(k.due(t0 + KEYPAD_GAP * 2).as_deref(), Some("45"));
    }

    #[test]
    fn odd_keys_are_ignored_and_entries_are_capped() {
        let t0 = Instant::now();
        let mut k = Keypad::default();
        for bad in ["", "12", "x", "#1", "a"] {
            assert_eq!(k.press(bad, t0), None);
        }
        assert_eq!(k.take(), None);
        let mut got = None;
        for _ in 0..MAX_KEYS {
            got = k.press("9", t0);
        }
        assert_eq!(got.map(|s| s.len()), Some(MAX_KEYS));
        assert_eq!(engine_text("1*#"), "The caller pressed 1 * #");
        assert_eq!(transcript_line("123#"), "[keypad] 123#");
    }
}

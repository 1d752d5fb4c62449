//! Audio as it crosses our edges: formats, the μ-law codec and frame constants. Nothing of
//! ours below it but `domain`, so engines and the bridge can both use it.

pub mod mulaw;
pub mod opus;
pub mod resample;

/// Formats that cross our edges. Twilio speaks only μ-law 8 kHz mono.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// G.711 μ-law, 8 kHz, mono: 8 bytes per millisecond.
    Mulaw8k,
    /// Signed 16-bit little-endian PCM, 8 kHz, mono.
    Pcm16At8k,
}

impl AudioFormat {
    pub fn bytes_per_ms(self) -> usize {
        match self {
            Self::Mulaw8k => 8,
            Self::Pcm16At8k => 16,
        }
    }
}

/// One 20 ms phone frame of μ-law: 160 bytes.
pub const FRAME_MS: u64 = 20;
pub const MULAW_FRAME_BYTES: usize = 160;

/// Read buffer of each call-path WebSocket (phone stream and engine session). tungstenite's
/// default of 128 KiB is zero-filled on every read and stays resident per socket: with two
/// sockets per call that was ~300 kB and several µs of memset per frame. Our messages are a
/// few hundred bytes (larger ones still fit: the buffer grows for a frame that needs it).
pub const WS_READ_BUFFER: usize = 4096;

/// Decoded length of base64 `s` without decoding it. Saturating: a malformed string (say,
/// `"=="`) counts as 0 bytes rather than underflowing.
pub fn base64_decoded_len(s: &str) -> u64 {
    let padding = s.bytes().rev().take_while(|&b| b == b'=').count().min(2) as u64;
    ((s.len() / 4) as u64 * 3).saturating_sub(padding)
}

/// True for strings that can be placed inside a JSON string literal without escaping and are
/// base64: what any leg may require of agent audio it splices into its frames.
pub fn is_base64(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_length_saturates_on_bad_input() {
        for (s, n) in [
            ("", 0),
            ("==", 0),
            ("=", 0),
            ("====", 1),
            ("AA==", 1),
            ("AAA=", 2),
            ("AAAA", 3),
            ("AAAAAA==", 4),
        ] {
            assert_eq!(base64_decoded_len(s), n, "{s:?}");
        }
    }
}

/// Property tests (issue 11): the base64 helpers agree with a real decoder and never panic.
#[cfg(test)]
mod props {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoded_len_matches_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let s = base64::engine::general_purpose::STANDARD.encode(&bytes);
            prop_assert!(is_base64(&s));
            prop_assert_eq!(base64_decoded_len(&s), bytes.len() as u64);
        }

        #[test]
        fn decoded_len_is_total_and_bounded(s in "[A-Za-z0-9+/=]{0,64}|\\PC{0,64}") {
            let n = base64_decoded_len(&s);
            prop_assert!(n <= (s.len() as u64 / 4) * 3);
            if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(&s) {
                prop_assert_eq!(n, decoded.len() as u64);
            }
        }

        #[test]
        fn base64_strings_are_json_safe(s in "\\PC{0,64}") {
            if is_base64(&s) {
                let quoted = format!("\"{s}\"");
                let back: String = serde_json::from_str(&quoted).expect("splices unescaped");
                prop_assert_eq!(back, s);
            }
        }
    }
}

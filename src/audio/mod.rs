//! Audio as it crosses our edges: formats, the μ-law codec and frame constants. Nothing of
//! ours below it but `domain`, so engines and the bridge can both use it.

pub mod mulaw;
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

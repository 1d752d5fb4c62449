//! G.711 μ-law, bit-exact with CPython's `audioop`, and the Media Streams frame size.
//!
//! The simulator's own codec rather than voicectl's: what the simulated caller says and what
//! it hears are encoded and measured independently of the code under test.

/// One Media Streams frame: 20 ms.
pub const FRAME_MS: u64 = 20;
/// 20 ms of 8 kHz μ-law.
pub const FRAME_BYTES: usize = 160;
/// Silence in μ-law.
pub const SILENCE: u8 = 0xFF;

const BIAS: i32 = 0x84;

/// The μ-law byte for a 16-bit linear sample (audioop works on the top 14 bits).
pub fn encode(sample: i16) -> u8 {
    let v = i32::from(sample) >> 2;
    let (magnitude, mask) = if v < 0 { (-v, 0x7F) } else { (v, 0xFF) };
    let biased = magnitude.min(8159) + (BIAS >> 2);
    // Segment: how far the value's top bit sits above bit 5; past segment 7 it saturates.
    let segment = (32 - biased.leading_zeros() as i32 - 6).max(0);
    if segment > 7 {
        return (0x7F ^ mask) as u8;
    }
    let mantissa = (biased >> (segment + 1)) & 0x0F;
    (((segment << 4) | mantissa) ^ mask) as u8
}

/// The 16-bit linear sample for a μ-law byte.
pub fn decode(byte: u8) -> i16 {
    let u = !byte;
    let exponent = ((u >> 4) & 0x07) as i32;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Mean absolute amplitude of a μ-law buffer: a cheap loudness measure.
pub fn mean_abs(bytes: &[u8]) -> u32 {
    if bytes.is_empty() {
        return 0;
    }
    let sum: u64 = bytes
        .iter()
        .map(|&b| u64::from((decode(b) as i32).unsigned_abs()))
        .sum();
    (sum / bytes.len() as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_audioop_vectors() {
        for (lin, mu) in [
            (0i16, 0xffu8),
            (100, 0xf2),
            (-100, 0x72),
            (1000, 0xce),
            (-1000, 0x4e),
            (32767, 0x80),
            (-32768, 0x00),
        ] {
            assert_eq!(encode(lin), mu, "encode {lin}");
        }
        for (mu, lin) in [(0xffu8, 0i16), (0x7f, 0), (0x80, 32124), (0x00, -32124)] {
            assert_eq!(decode(mu), lin, "decode {mu:#x}");
        }
    }

    #[test]
    fn round_trip_is_close() {
        for s in (-32000i16..32000).step_by(97) {
            let back = decode(encode(s)) as i32;
            assert!(
                (back - s as i32).abs() <= (s as i32).abs() / 16 + 8,
                "{s} -> {back}"
            );
        }
        assert_eq!(mean_abs(&[SILENCE; FRAME_BYTES]), 0);
    }
}

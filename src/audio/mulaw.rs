//! G.711 μ-law, bit-exact with CPython's `audioop` (PROTOCOLS §1.6).

const BIAS: i32 = 0x84;
const CLIP: i32 = 8159;
const SEG_END: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];

/// Silence in μ-law.
pub const SILENCE: u8 = 0xFF;

pub fn encode(sample: i16) -> u8 {
    let mut v = (sample as i32) >> 2;
    let mask = if v < 0 {
        v = -v;
        0x7F
    } else {
        0xFF
    };
    v = v.min(CLIP) + (BIAS >> 2);
    match SEG_END.iter().position(|&end| v <= end) {
        Some(seg) => (((seg as i32) << 4 | ((v >> (seg + 1)) & 0xF)) ^ mask) as u8,
        None => (0x7F ^ mask) as u8,
    }
}

pub fn decode(byte: u8) -> i16 {
    DECODE[byte as usize]
}

const fn decode_slow(byte: u8) -> i16 {
    let u = !byte as i32;
    let mut t = ((u & 0x0F) << 3) + BIAS;
    t <<= (u & 0x70) >> 4;
    (if u & 0x80 != 0 { BIAS - t } else { t - BIAS }) as i16
}

static DECODE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = decode_slow(i as u8);
        i += 1;
    }
    table
};

/// Mean absolute amplitude of a μ-law buffer: a cheap loudness measure for energy VAD.
pub fn mean_abs(bytes: &[u8]) -> u32 {
    if bytes.is_empty() {
        return 0;
    }
    let sum: u64 = bytes
        .iter()
        .map(|&b| (decode(b) as i32).unsigned_abs() as u64)
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
        assert_eq!(mean_abs(&[SILENCE; 160]), 0);
    }
}

/// Property tests (issue 11): the codec is total and every code word survives a round trip.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Exhaustive rather than sampled: there are only 256 code words. μ-law has two zeros
    /// (0xFF and 0x7F); the encoder writes the positive one.
    #[test]
    fn every_code_word_round_trips() {
        for b in 0..=255u8 {
            let back = encode(decode(b));
            if b == 0x7F {
                assert_eq!(back, SILENCE);
            } else {
                assert_eq!(back, b, "{b:#04x} -> {} -> {back:#04x}", decode(b));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encoding_any_sample_is_close(s: i16) {
            let back = i32::from(decode(encode(s)));
            let s = i32::from(s).clamp(-32124, 32124);
            prop_assert!((back - s).abs() <= s.abs() / 16 + 8, "{s} -> {back}");
        }

        #[test]
        fn encoding_preserves_order(a: i16, b: i16) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(decode(encode(lo)) <= decode(encode(hi)));
        }

        #[test]
        fn mean_abs_is_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(mean_abs(&bytes) <= 32124);
        }
    }
}

//! μ-law and base64 helpers on arbitrary bytes: the codec round-trips every code word and
//! the base64 length agrees with a real decoder.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use voicectl::audio::{base64_decoded_len, is_base64, mulaw};

fuzz_target!(|data: &[u8]| {
    for &b in data {
        let back = mulaw::encode(mulaw::decode(b));
        assert!(
            back == b || (b == 0x7F && back == mulaw::SILENCE),
            "{b:#04x}"
        );
    }
    for pair in data.chunks_exact(2) {
        let s = i16::from_le_bytes([pair[0], pair[1]]);
        let back = i32::from(mulaw::decode(mulaw::encode(s)));
        let s = i32::from(s).clamp(-32124, 32124);
        assert!((back - s).abs() <= s.abs() / 16 + 8, "{s} -> {back}");
    }
    let _ = mulaw::mean_abs(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let n = base64_decoded_len(s);
        assert!(n <= (s.len() as u64 / 4) * 3);
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(s) {
            assert!(is_base64(s));
            assert_eq!(n, bytes.len() as u64, "{s:?}");
        }
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    assert!(is_base64(&encoded));
    assert_eq!(base64_decoded_len(&encoded), data.len() as u64);
});

//! Twilio media-stream messages as they arrive on the WebSocket (any text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicectl::telephony::twilio::media::{Event, parse};

fuzz_target!(|text: &str| {
    if let Ok((Event::Media(m), _)) = parse(text) {
        // What the bridge does with a payload next: size it without decoding.
        let _ = voicectl::audio::base64_decoded_len(&m.payload);
        let _ = voicectl::audio::is_base64(&m.payload);
    }
});

//! A webhook request: form body, signature header and URL, through the form parser, the
//! signature check and the webhook field mapping. Also: what we sign verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicectl::telephony::twilio::{signature, webhook};

fuzz_target!(|input: (&str, &str, &str, &[u8])| {
    let (token, url, sig, body) = input;
    let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let _ = signature::validate(token, url, &params, sig);
    let _ = webhook::status_update(&params);
    let _ = webhook::answer_update(&params);
    let _ = webhook::amd_update(&params);
    let _ = webhook::inbound_call(&params);
    if !token.is_empty() {
        let ours = signature::compute(token, url, &params);
        assert!(signature::validate(token, url, &params, &ours));
    }
});

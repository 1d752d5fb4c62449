//! Twilio Media Streams messages as the far end of a `<Connect><Stream>` receives them
//! (PROTOCOLS §1.2–1.3): what a fake that stands where voicectl's stream endpoint would (the
//! Ultravox `twilio` medium) parses and writes.
//!
//! The fakes' own reading of the protocol, not voicectl's parser: a fake that shared the code
//! under test would accept whatever that code gets wrong. Sequence fields arrive as JSON
//! strings from Twilio and as numbers from other stacks; both are accepted.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
struct Inbound<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(rename = "sequenceNumber", default, deserialize_with = "lenient_u64")]
    sequence_number: Option<u64>,
    #[serde(default)]
    start: Option<Start>,
    #[serde(default, borrow)]
    media: Option<Media<'a>>,
    #[serde(default, borrow)]
    mark: Option<Mark<'a>>,
    #[serde(default)]
    dtmf: Option<Dtmf>,
    #[serde(default)]
    stop: Option<Stop>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    #[serde(default)]
    pub account_sid: String,
    pub stream_sid: String,
    #[serde(default)]
    pub call_sid: String,
    #[serde(default)]
    pub tracks: Vec<String>,
    #[serde(default)]
    pub media_format: Option<MediaFormat>,
    #[serde(default)]
    pub custom_parameters: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    #[serde(default)]
    pub encoding: String,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub sample_rate: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub channels: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct Media<'a> {
    #[serde(default, borrow)]
    pub track: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub chunk: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub timestamp: Option<u64>,
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct Mark<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dtmf {
    #[serde(default)]
    pub track: String,
    pub digit: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stop {
    #[serde(default)]
    pub account_sid: String,
    #[serde(default)]
    pub call_sid: String,
}

/// One message from Twilio.
#[derive(Debug)]
pub enum Event<'a> {
    Connected,
    Start(Start),
    Media(Media<'a>),
    Mark(Cow<'a, str>),
    Dtmf(Dtmf),
    Stop(Stop),
}

/// A message and its `sequenceNumber`, or why it is not a valid one.
pub fn parse(text: &str) -> Result<(Event<'_>, Option<u64>), String> {
    let m: Inbound<'_> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON media-stream message: {e}"))?;
    let missing = |what: &str| format!("{what:?} message without its {what:?} object");
    let ev = match &*m.event {
        "connected" => Event::Connected,
        "start" => Event::Start(m.start.ok_or_else(|| missing("start"))?),
        "media" => Event::Media(m.media.ok_or_else(|| missing("media"))?),
        "mark" => Event::Mark(m.mark.ok_or_else(|| missing("mark"))?.name),
        "dtmf" => Event::Dtmf(m.dtmf.ok_or_else(|| missing("dtmf"))?),
        "stop" => Event::Stop(m.stop.unwrap_or_default()),
        other => return Err(format!("unknown event {other:?}")),
    };
    Ok((ev, m.sequence_number))
}

/// A number or a string holding one (absent, null or unparseable: `None`).
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr<'a> {
        Num(u64),
        Str(#[serde(borrow)] Cow<'a, str>),
    }
    Ok(match Option::<NumOrStr<'_>>::deserialize(d)? {
        Some(NumOrStr::Num(n)) => Some(n),
        Some(NumOrStr::Str(s)) => s.trim().parse().ok(),
        None => None,
    })
}

/// Stream SIDs are `MZ` + hex in practice; anything JSON-safe and short is accepted.
pub fn is_valid_stream_sid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `media`, `mark` and `clear` frames; `stream_sid` must be [`is_valid_stream_sid`] and the
/// payload base64, so nothing needs escaping.
pub fn write_media(buf: &mut String, stream_sid: &str, payload_b64: &str) {
    buf.push_str(r#"{"event":"media","streamSid":""#);
    buf.push_str(stream_sid);
    buf.push_str(r#"","media":{"payload":""#);
    buf.push_str(payload_b64);
    buf.push_str(r#""}}"#);
}

pub fn write_mark(buf: &mut String, stream_sid: &str, name: &str) {
    buf.push_str(r#"{"event":"mark","streamSid":""#);
    buf.push_str(stream_sid);
    buf.push_str(r#"","mark":{"name":""#);
    buf.push_str(name);
    buf.push_str(r#""}}"#);
}

pub fn write_clear(buf: &mut String, stream_sid: &str) {
    buf.push_str(r#"{"event":"clear","streamSid":""#);
    buf.push_str(stream_sid);
    buf.push_str(r#""}"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_twilios_messages() {
        let (ev, seq) = parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#)
            .expect("connected");
        assert!(matches!(ev, Event::Connected) && seq.is_none());
        let start = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"token":"t"}},"streamSid":"MZ1"}"#;
        match parse(start).expect("start") {
            (Event::Start(s), Some(1)) => {
                assert_eq!(s.custom_parameters["token"], "t");
                assert_eq!(s.media_format.and_then(|f| f.sample_rate), Some(8000));
            }
            other => panic!("{other:?}"),
        }
        let media = r#"{"event":"media","sequenceNumber":4,"media":{"track":"inbound","chunk":"2","timestamp":"5","payload":"/w=="},"streamSid":"MZ1"}"#;
        match parse(media).expect("media") {
            (Event::Media(m), Some(4)) => {
                assert_eq!((m.chunk, m.timestamp), (Some(2), Some(5)));
                assert_eq!(m.payload, "/w==");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse(r#"{"event":"mark","sequenceNumber":"9","mark":{"name":"a1"}}"#), Ok((Event::Mark(n), Some(9))) if n == "a1")
        );
        assert!(parse(r#"{"event":"media"}"#).is_err());
        assert!(parse(r#"{"event":"bogus"}"#).is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn writes_what_twilio_accepts() {
        let mut b = String::new();
        write_media(&mut b, "MZ1", "/w==");
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"event":"media","streamSid":"MZ1","media":{"payload":"/w=="}})
        );
        b.clear();
        write_mark(&mut b, "MZ1", "r1");
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert_eq!(v["mark"]["name"], "r1");
        b.clear();
        write_clear(&mut b, "MZ1");
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert_eq!(v, serde_json::json!({"event":"clear","streamSid":"MZ1"}));
        assert!(!is_valid_stream_sid("MZ\"1") && is_valid_stream_sid("MZ0123abc"));
    }
}

//! Twilio Media Streams messages (PROTOCOLS §1.2–1.3).
//!
//! Inbound frames are parsed into borrowed views: a `media` payload is base64 that we usually
//! forward unchanged, so it is never copied or decoded unless an engine needs samples.
//! Sequence fields arrive as JSON strings in every official example, sometimes as numbers in
//! other stacks; both are accepted.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Deserializer};

/// One message from Twilio, as received. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct Inbound<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(rename = "sequenceNumber", default, deserialize_with = "lenient_u64")]
    pub sequence_number: Option<u64>,
    #[serde(rename = "streamSid", default, borrow)]
    pub stream_sid: Option<Cow<'a, str>>,
    #[serde(default)]
    pub start: Option<Start>,
    #[serde(default, borrow)]
    pub media: Option<Media<'a>>,
    #[serde(default, borrow)]
    pub mark: Option<Mark<'a>>,
    #[serde(default)]
    pub dtmf: Option<Dtmf>,
    #[serde(default)]
    pub stop: Option<Stop>,
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
pub struct Mark<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
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

/// The typed view of an inbound message.
#[derive(Debug)]
pub enum Event<'a> {
    Connected,
    Start(Start),
    Media(Media<'a>),
    Mark(Cow<'a, str>),
    Dtmf(Dtmf),
    Stop(Stop),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not a JSON media-stream message: {0}")]
    Json(String),
    #[error("{0:?} message without its {0:?} object")]
    Missing(String),
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
}

pub fn parse(text: &str) -> Result<(Event<'_>, Option<u64>), ParseError> {
    let m: Inbound<'_> = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let missing = || ParseError::Missing(m.event.to_string());
    let ev = match &*m.event {
        "connected" => Event::Connected,
        "start" => Event::Start(m.start.clone().ok_or_else(missing)?),
        "media" => {
            let seq = m.sequence_number;
            return Ok((
                Event::Media(m.media.ok_or(ParseError::Missing("media".into()))?),
                seq,
            ));
        }
        "mark" => {
            let seq = m.sequence_number;
            return Ok((
                Event::Mark(m.mark.ok_or(ParseError::Missing("mark".into()))?.name),
                seq,
            ));
        }
        "dtmf" => Event::Dtmf(m.dtmf.clone().ok_or_else(missing)?),
        "stop" => Event::Stop(m.stop.clone().unwrap_or_default()),
        other => return Err(ParseError::UnknownEvent(other.to_owned())),
    };
    Ok((ev, m.sequence_number))
}

/// A number or a string holding one (absent, null or unparseable: `None`). A visitor rather
/// than an untagged enum: this runs three times per media frame, and untagged enums buffer
/// their input before trying each variant.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Lenient;
    impl<'de> serde::de::Visitor<'de> for Lenient {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number or a string with a number")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.trim().parse().ok())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(Lenient)
        }
    }
    d.deserialize_option(Lenient)
}

/// True for strings that can be placed inside a JSON string literal without escaping and are
/// valid base64 / identifiers: what we require of anything we splice into outbound frames.
fn json_safe(s: &str, extra: &[u8]) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

pub use crate::audio::is_base64;

/// Stream SIDs are `MZ` + hex in practice; anything JSON-safe and short is accepted.
pub fn is_valid_stream_sid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && json_safe(s, b"_-")
}

/// Outbound frames, written into a reused buffer. Callers guarantee `stream_sid` passed
/// [`is_valid_stream_sid`] and payloads passed [`is_base64`], so no escaping is needed.
pub fn write_media(buf: &mut String, stream_sid: &str, payload_b64: &str) {
    buf.push_str("{\"event\":\"media\",\"streamSid\":\"");
    buf.push_str(stream_sid);
    buf.push_str("\",\"media\":{\"payload\":\"");
    buf.push_str(payload_b64);
    buf.push_str("\"}}");
}

pub fn write_mark(buf: &mut String, stream_sid: &str, name: &str) {
    buf.push_str("{\"event\":\"mark\",\"streamSid\":\"");
    buf.push_str(stream_sid);
    buf.push_str("\",\"mark\":{\"name\":\"");
    buf.push_str(name);
    buf.push_str("\"}}");
}

pub fn write_clear(buf: &mut String, stream_sid: &str) {
    buf.push_str("{\"event\":\"clear\",\"streamSid\":\"");
    buf.push_str(stream_sid);
    buf.push_str("\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_messages_leniently() {
        let (ev, seq) =
            parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#).unwrap();
        assert!(matches!(ev, Event::Connected) && seq.is_none());
        let start = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"token":"t"}},"streamSid":"MZ1"}"#;
        match parse(start).unwrap() {
            (Event::Start(s), Some(1)) => {
                assert_eq!(s.custom_parameters["token"], "t");
                assert_eq!(s.media_format.unwrap().sample_rate, Some(8000));
            }
            other => panic!("{other:?}"),
        }
        let media = r#"{"event":"media","sequenceNumber":4,"media":{"track":"inbound","chunk":"2","timestamp":"5","payload":"/w=="},"streamSid":"MZ1"}"#;
        match parse(media).unwrap() {
            (Event::Media(m), Some(4)) => {
                assert_eq!((m.chunk, m.timestamp), (Some(2), Some(5)));
                assert!(
                    matches!(m.payload, Cow::Borrowed("/w==")),
                    "payload is borrowed, not copied"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse(r#"{"event":"mark","sequenceNumber":"9","mark":{"name":"a1"}}"#).unwrap(), (Event::Mark(n), Some(9)) if n == "a1")
        );
        assert!(
            matches!(parse(r#"{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"1"}}"#).unwrap().0, Event::Dtmf(d) if d.digit == "1")
        );
        assert!(
            matches!(parse(r#"{"event":"stop","sequenceNumber":"5","stop":{"accountSid":"AC","callSid":"CA"}}"#).unwrap().0, Event::Stop(s) if s.call_sid == "CA")
        );
    }

    #[test]
    fn numbers_are_lenient() {
        let seq = |v: &str| {
            parse(&format!(r#"{{"event":"connected","sequenceNumber":{v}}}"#))
                .map(|(_, n)| n)
                .map_err(|_| ())
        };
        assert_eq!(seq("7"), Ok(Some(7)));
        assert_eq!(seq(r#"" 8 ""#), Ok(Some(8)));
        assert_eq!(seq("null"), Ok(None));
        assert_eq!(seq(r#""x""#), Ok(None));
        assert!(seq("-1").is_err() && seq("1.5").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse("not json"), Err(ParseError::Json(_))));
        assert!(matches!(
            parse(r#"{"event":"media"}"#),
            Err(ParseError::Missing(_))
        ));
        assert!(matches!(
            parse(r#"{"event":"start"}"#),
            Err(ParseError::Missing(_))
        ));
        assert!(matches!(
            parse(r#"{"event":"bogus"}"#),
            Err(ParseError::UnknownEvent(_))
        ));
    }

    #[test]
    fn writes_outbound_frames() {
        let mut b = String::new();
        write_media(&mut b, "MZ1", "/w==");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"media","streamSid":"MZ1","media":{"payload":"/w=="}})
        );
        b.clear();
        write_mark(&mut b, "MZ1", "r1");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["mark"]["name"], "r1");
        b.clear();
        write_clear(&mut b, "MZ1");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v, serde_json::json!({"event":"clear","streamSid":"MZ1"}));
        assert!(is_base64("AbC+/=") && !is_base64("a\"b"));
        assert!(!is_valid_stream_sid("MZ\"1") && is_valid_stream_sid("MZ0123abc"));
    }
}

/// Property tests (issue 11): the media-stream parser takes whatever Twilio (or anyone who
/// reaches the WebSocket) sends and never panics; what we write, a peer parses back.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// JSON-shaped text: documented field names and events mixed with junk values, so cases
    /// reach past the first `serde_json` error.
    fn message() -> impl Strategy<Value = String> {
        let event = prop_oneof![
            Just("connected"),
            Just("start"),
            Just("media"),
            Just("mark"),
            Just("dtmf"),
            Just("stop"),
            Just("clear"),
            Just(""),
        ];
        let value = prop_oneof![
            Just("null".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:?}")),
            "\\PC{0,12}".prop_map(|s| serde_json::Value::String(s).to_string()),
            Just(r#"{"payload":"/w==","chunk":"1","timestamp":2,"track":"inbound"}"#.to_owned()),
            Just(r#"{"name":"m1"}"#.to_owned()),
            Just(r#"{"track":"inbound_track","digit":"5"}"#.to_owned()),
            Just(r#"{"accountSid":"AC","streamSid":"MZ","callSid":"CA","tracks":[],"customParameters":{"a":"b"}}"#.to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ];
        let key = prop_oneof![
            Just("sequenceNumber"),
            Just("streamSid"),
            Just("start"),
            Just("media"),
            Just("mark"),
            Just("dtmf"),
            Just("stop"),
            Just("x"),
        ];
        (event, proptest::collection::vec((key, value), 0..5)).prop_map(|(event, fields)| {
            let mut s = format!("{{\"event\":\"{event}\"");
            for (k, v) in fields {
                s.push_str(&format!(",\"{k}\":{v}"));
            }
            s.push('}');
            s
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn json_shaped_messages_never_panic(s in message()) {
            let _ = parse(&s);
        }

        #[test]
        fn written_frames_parse_back(
            sid in "[A-Za-z0-9_-]{1,64}",
            payload in proptest::collection::vec(any::<u8>(), 0..400),
            name in "[A-Za-z0-9]{1,16}",
        ) {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&payload);
            prop_assert!(is_valid_stream_sid(&sid) && is_base64(&b64));
            let mut buf = String::new();
            write_media(&mut buf, &sid, &b64);
            match parse(&buf) {
                Ok((Event::Media(m), None)) => prop_assert_eq!(&*m.payload, b64.as_str()),
                other => prop_assert!(false, "{other:?}"),
            }
            buf.clear();
            write_mark(&mut buf, &sid, &name);
            match parse(&buf) {
                Ok((Event::Mark(n), None)) => prop_assert_eq!(&*n, name.as_str()),
                other => prop_assert!(false, "{other:?}"),
            }
            buf.clear();
            write_clear(&mut buf, &sid);
            let v: serde_json::Value = serde_json::from_str(&buf).expect("valid JSON");
            prop_assert_eq!(v["streamSid"].as_str(), Some(sid.as_str()));
        }
    }
}

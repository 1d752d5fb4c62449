//! Answering-machine detection settings (SPEC §8): the four modes, what the carrier is asked
//! for, what a report means, and which setting wins (call › campaign › tenant › config).

use serde::{Deserialize, Serialize};

/// A voicemail message is spoken onto someone's answering machine: a minute is plenty.
pub const MAX_VOICEMAIL_CHARS: usize = 1000;

/// `machine_detection`: `false`/`"off"`, `true`/`"detect"`, `"hangup"`, `"voicemail"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "String")]
pub enum MachineDetection {
    Off,
    /// Record `answered_by` only.
    Detect,
    /// A machine or fax is hung up on at once (`end_reason = "machine"`).
    Hangup,
    /// Wait for the end of a machine's greeting (the beep), leave `voicemail_message`, hang up
    /// (`end_reason = "voicemail_left"`).
    Voicemail,
}

/// Described by hand: the value is a boolean or one of the mode names, which the derive cannot
/// express for a `try_from` enum.
impl utoipa::PartialSchema for MachineDetection {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Boolean))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["off", "detect", "hangup", "voicemail"])),
            )
            .description(Some(
                "Answering-machine detection: `false`/`\"off\"`, `true`/`\"detect\"` (record \
                 `answered_by`), `\"hangup\"` (hang up on machines), `\"voicemail\"` (leave \
                 `voicemail_message` after the beep)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for MachineDetection {}

impl MachineDetection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Detect => "detect",
            Self::Hangup => "hangup",
            Self::Voicemail => "voicemail",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::try_from(serde_json::Value::String(s.to_owned()))
    }

    /// Whether the carrier is asked to detect.
    pub fn requested(self) -> bool {
        self != Self::Off
    }

    /// Whether the carrier waits for the end of a machine's greeting (Twilio
    /// `MachineDetection=DetectMessageEnd`) rather than reporting as soon as it decides.
    pub fn waits_for_message_end(self) -> bool {
        self == Self::Voicemail
    }

    /// What the call stores as its action on a machine (`None`: nothing beyond recording).
    pub fn stored_action(self) -> Option<&'static str> {
        match self {
            Self::Hangup => Some("hangup"),
            Self::Voicemail => Some("voicemail"),
            Self::Off | Self::Detect => None,
        }
    }

    /// The call's own value beats the campaign's, which beats the tenant's, which beats the
    /// configured default (SPEC §8).
    pub fn resolve(
        call: Option<Self>,
        campaign: Option<Self>,
        tenant: Option<Self>,
        config: Self,
    ) -> Self {
        call.or(campaign).or(tenant).unwrap_or(config)
    }
}

impl From<MachineDetection> for String {
    fn from(m: MachineDetection) -> Self {
        m.as_str().to_owned()
    }
}

impl TryFrom<serde_json::Value> for MachineDetection {
    type Error = String;

    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        const ALLOWED: &str = "\"off\", \"detect\" (or true), \"hangup\" or \"voicemail\"";
        match &v {
            serde_json::Value::Bool(false) => Ok(Self::Off),
            serde_json::Value::Bool(true) => Ok(Self::Detect),
            serde_json::Value::String(s) => match s.as_str() {
                "off" => Ok(Self::Off),
                "detect" => Ok(Self::Detect),
                "hangup" => Ok(Self::Hangup),
                "voicemail" => Ok(Self::Voicemail),
                other => Err(format!(
                    "machine_detection must be {ALLOWED}, not {other:?}"
                )),
            },
            other => Err(format!("machine_detection must be {ALLOWED}, not {other}")),
        }
    }
}

/// Checks a `voicemail_message`: not blank, at most [`MAX_VOICEMAIL_CHARS`].
pub fn check_voicemail_message(m: &str) -> Result<(), String> {
    if m.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if m.chars().count() > MAX_VOICEMAIL_CHARS {
        return Err(format!("at most {MAX_VOICEMAIL_CHARS} characters"));
    }
    Ok(())
}

/// Whether Twilio's `AnsweredBy` means no person is on the line.
pub fn is_machine(answered_by: &str) -> bool {
    answered_by.starts_with("machine_") || answered_by == "fax"
}

/// Whether `AnsweredBy` says a machine finished its greeting: the moment to leave a message.
pub fn is_message_end(answered_by: &str) -> bool {
    answered_by.starts_with("machine_end_")
}

/// What a report means for a live call with stored `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReport {
    /// Record it, nothing more.
    Note,
    /// Hang up now (`end_reason = "machine"`).
    HangUp,
    /// Leave the voicemail message, then hang up (`voicemail_left`).
    LeaveMessage,
}

pub fn on_report(action: Option<&str>, answered_by: &str) -> OnReport {
    match action {
        Some("hangup") if is_machine(answered_by) => OnReport::HangUp,
        Some("voicemail") if is_message_end(answered_by) => OnReport::LeaveMessage,
        // A fax, or a machine the carrier gave up on, takes no message.
        Some("voicemail") if is_machine(answered_by) => OnReport::HangUp,
        _ => OnReport::Note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_spelling_and_refuses_the_rest() {
        let p = |v| MachineDetection::try_from(v);
        assert_eq!(p(json!(false)), Ok(MachineDetection::Off));
        assert_eq!(p(json!("off")), Ok(MachineDetection::Off));
        assert_eq!(p(json!(true)), Ok(MachineDetection::Detect));
        assert_eq!(p(json!("detect")), Ok(MachineDetection::Detect));
        assert_eq!(p(json!("hangup")), Ok(MachineDetection::Hangup));
        assert_eq!(p(json!("voicemail")), Ok(MachineDetection::Voicemail));
        for bad in [json!("HANGUP"), json!("vm"), json!(1), json!(null)] {
            assert!(p(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn reports_lead_to_the_mode_s_action() {
        for m in ["machine_start", "machine_end_beep", "fax"] {
            assert_eq!(on_report(Some("hangup"), m), OnReport::HangUp, "{m}");
            assert_eq!(on_report(None, m), OnReport::Note, "{m}");
        }
        for m in [
            "machine_end_beep",
            "machine_end_silence",
            "machine_end_other",
        ] {
            assert_eq!(
                on_report(Some("voicemail"), m),
                OnReport::LeaveMessage,
                "{m}"
            );
        }
        assert_eq!(on_report(Some("voicemail"), "fax"), OnReport::HangUp);
        for p in ["human", "unknown"] {
            assert_eq!(on_report(Some("hangup"), p), OnReport::Note, "{p}");
            assert_eq!(on_report(Some("voicemail"), p), OnReport::Note, "{p}");
        }
    }

    #[test]
    fn the_call_beats_the_campaign_beats_the_tenant_beats_the_config() {
        use MachineDetection::*;
        let r = MachineDetection::resolve;
        assert_eq!(r(Some(Off), Some(Hangup), Some(Voicemail), Detect), Off);
        assert_eq!(r(None, Some(Hangup), Some(Voicemail), Detect), Hangup);
        assert_eq!(r(None, None, Some(Voicemail), Detect), Voicemail);
        assert_eq!(r(None, None, None, Detect), Detect);
    }

    #[test]
    fn voicemail_messages_are_bounded() {
        assert!(check_voicemail_message("Hi, call us back at 555-0100.").is_ok());
        assert!(check_voicemail_message("  ").is_err());
        assert!(check_voicemail_message(&"a".repeat(MAX_VOICEMAIL_CHARS + 1)).is_err());
    }
}

//! Answering-machine detection: what `machine_detection` asks for, and what to do when the
//! carrier reports who answered.

use serde::{Deserialize, Serialize};

use super::shared::Shared;
use crate::store::calls::{self, Scope};

/// `machine_detection` on `POST /calls`: `false`/`"off"`, `true`/`"detect"`, `"hangup"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "String")]
pub enum MachineDetection {
    Off,
    /// Record `answered_by` only.
    Detect,
    /// A machine or fax is hung up on at once (`end_reason = "machine"`).
    Hangup,
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
                    .enum_values(Some(["off", "detect", "hangup"])),
            )
            .description(Some(
                "Answering-machine detection: `false`/`\"off\"`, `true`/`\"detect\"` (record \
                 `answered_by`), `\"hangup\"` (hang up on machines)",
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
        }
    }

    /// Whether the carrier is asked to detect.
    pub fn requested(self) -> bool {
        self != Self::Off
    }

    /// What the call stores as its action on a machine (`None`: nothing beyond recording).
    pub fn stored_action(self) -> Option<&'static str> {
        (self == Self::Hangup).then_some("hangup")
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
        match &v {
            serde_json::Value::Bool(false) => Ok(Self::Off),
            serde_json::Value::Bool(true) => Ok(Self::Detect),
            serde_json::Value::String(s) => match s.as_str() {
                "off" => Ok(Self::Off),
                "detect" => Ok(Self::Detect),
                "hangup" => Ok(Self::Hangup),
                "voicemail" => Err(
                    "machine_detection \"voicemail\" is not available in this version; use \"hangup\" or \"detect\""
                        .into(),
                ),
                other => Err(format!(
                    "machine_detection must be \"off\", \"detect\" (or true) or \"hangup\", not {other:?}"
                )),
            },
            other => Err(format!(
                "machine_detection must be \"off\", \"detect\" (or true) or \"hangup\", not {other}"
            )),
        }
    }
}

/// Whether Twilio's `AnsweredBy` means no person is on the line.
pub fn is_machine(answered_by: &str) -> bool {
    answered_by.starts_with("machine_") || answered_by == "fax"
}

/// Whether a call with stored `action` and this `AnsweredBy` is to be hung up now.
pub fn hang_up_on(action: Option<&str>, answered_by: &str) -> bool {
    action == Some("hangup") && is_machine(answered_by)
}

impl Shared {
    /// The carrier reported `answered_by` on live call `id`: a machine is hung up on when the
    /// call asked for it. Duplicates and reports after the end change nothing (`end` leaves a
    /// finished call alone).
    pub async fn machine_answered(&self, id: &str, answered_by: &str) {
        let rid = id.to_owned();
        let found = self
            .store
            .run(move |c| {
                let action = calls::machine_action(c, &rid)?;
                let stored = calls::get(c, Scope::All, &rid)?.answered_by;
                Ok((action, stored))
            })
            .await;
        let action = match found {
            // The caller already proved to be a person (SPEC §8): the report is only noted.
            Ok((_, Some(stored))) if stored == "human" => {
                tracing::info!(call_id = %id, answered_by, "detection disagrees with a person on the line; ignored");
                return;
            }
            Ok((a, _)) => a,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot read the machine action");
                return;
            }
        };
        if !hang_up_on(action.as_deref(), answered_by) {
            return;
        }
        tracing::info!(call_id = %id, answered_by, "a machine answered: hanging up");
        if let Err(e) = self.end(Scope::All, id, "machine").await {
            tracing::warn!(call_id = %id, error = %e, "cannot hang up on the machine");
        }
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
        for bad in [json!("voicemail"), json!("HANGUP"), json!(1), json!(null)] {
            assert!(p(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_machines_are_hung_up_on_and_only_in_hangup_mode() {
        for m in [
            "machine_start",
            "machine_end_beep",
            "machine_end_silence",
            "machine_end_other",
            "fax",
        ] {
            assert!(hang_up_on(Some("hangup"), m), "{m}");
            assert!(!hang_up_on(None, m), "{m}");
        }
        for p in ["human", "unknown"] {
            assert!(!hang_up_on(Some("hangup"), p), "{p}");
        }
    }
}

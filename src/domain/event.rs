//! What followers of a live call see (SSE): status changes and transcript lines.

use serde::Serialize;

use super::CallStatus;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CallEvent {
    Status {
        status: CallStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        end_reason: Option<String>,
    },
    Transcript {
        speaker: &'static str,
        text: String,
        at_ms: i64,
    },
}

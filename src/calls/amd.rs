//! Answering-machine detection: what `machine_detection` asks for, and what to do when the
//! carrier reports who answered.

use super::shared::Shared;
pub use crate::domain::amd::MachineDetection;
use crate::domain::amd::{OnReport, on_report};
use crate::media::tools::ToolReply;
use crate::store::calls::{self, Scope};

impl Shared {
    /// The carrier reported `answered_by` on live call `id`: a machine is hung up on, or gets
    /// the voicemail message after its beep, when the call asked for it. Duplicates and reports
    /// after the end change nothing (`end` leaves a finished call alone).
    pub async fn machine_answered(&self, id: &str, answered_by: &str) {
        let rid = id.to_owned();
        let facts = match self.store.run(move |c| calls::machine_facts(c, &rid)).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot read the machine action");
                return;
            }
        };
        // The caller already proved to be a person (SPEC §8): the report is only noted.
        if facts.answered_by.as_deref() == Some("human") && answered_by != "human" {
            tracing::info!(call_id = %id, answered_by, "detection disagrees with a person on the line; ignored");
            return;
        }
        match on_report(facts.action.as_deref(), answered_by) {
            OnReport::Note => {}
            OnReport::HangUp => self.hang_up_on_machine(id, answered_by).await,
            OnReport::LeaveMessage => {
                let Some(message) = facts.voicemail_message else {
                    tracing::info!(call_id = %id, "a machine answered and there is no voicemail message: hanging up");
                    return self.hang_up_on_machine(id, answered_by).await;
                };
                let live = self
                    .sessions
                    .get(id)
                    .is_some_and(|s| s.tell_bridge(ToolReply::LeaveMessage(message)));
                if live {
                    tracing::info!(call_id = %id, answered_by, "the machine is listening: leaving the voicemail message");
                } else {
                    self.hang_up_on_machine(id, answered_by).await;
                }
            }
        }
    }

    async fn hang_up_on_machine(&self, id: &str, answered_by: &str) {
        tracing::info!(call_id = %id, answered_by, "a machine answered: hanging up");
        if let Err(e) = self.end(Scope::All, id, "machine").await {
            tracing::warn!(call_id = %id, error = %e, "cannot hang up on the machine");
        }
    }
}

//! Campaign vocabulary shared by the store and the call domain: recipient and campaign
//! states (SPEC §7), how a finished call counts for its recipient, and the retry policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::CallStatus;

/// A recipient's state. The strings are what the database holds and users filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecipientState {
    Pending,
    Scheduled,
    Dialing,
    InCall,
    Done,
    Failed,
    Suppressed,
    Canceled,
}

impl RecipientState {
    pub const ALL: [RecipientState; 8] = [
        Self::Pending,
        Self::Scheduled,
        Self::Dialing,
        Self::InCall,
        Self::Done,
        Self::Failed,
        Self::Suppressed,
        Self::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Dialing => "dialing",
            Self::InCall => "in_call",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Suppressed => "suppressed",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Suppressed | Self::Canceled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    Running,
    Paused,
    Completed,
    Canceled,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Running, Self::Paused, Self::Completed, Self::Canceled]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The outcomes a retry rule may name.
pub const RETRY_OUTCOMES: [&str; 4] = ["no_answer", "busy", "failed", "voicemail"];

/// Twilio error codes for numbers the carrier refuses to call: never retried.
pub const REFUSED_CODES: [&str; 3] = ["21211", "21214", "21217"];

/// One outcome's rule: `attempts` calls in all for this outcome, waiting `after_ms[i]` after
/// the i-th (the last delay repeats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRule {
    pub attempts: u32,
    pub after_ms: Vec<i64>,
}

/// Rules per outcome (keys of [`RETRY_OUTCOMES`]); a missing outcome uses its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RetryPolicy(pub BTreeMap<String, RetryRule>);

impl RetryPolicy {
    /// SPEC §7 defaults: no_answer 3 × 1h, busy 3 × 30m, failed 1, voicemail 1.
    pub fn default_rule(outcome: &str) -> RetryRule {
        const HOUR: i64 = 3_600_000;
        match outcome {
            "no_answer" => RetryRule {
                attempts: 3,
                after_ms: vec![HOUR],
            },
            "busy" => RetryRule {
                attempts: 3,
                after_ms: vec![HOUR / 2],
            },
            _ => RetryRule {
                attempts: 1,
                after_ms: vec![HOUR],
            },
        }
    }

    pub fn rule(&self, outcome: &str) -> RetryRule {
        self.0
            .get(outcome)
            .cloned()
            .unwrap_or_else(|| Self::default_rule(outcome))
    }

    /// After the `n`-th call (1-based) that ended with `outcome`: the delay before the next
    /// attempt, or `None` when this outcome's attempts are used up.
    pub fn next_delay_ms(&self, outcome: &str, n: u32) -> Option<i64> {
        let rule = self.rule(outcome);
        if n >= rule.attempts {
            return None;
        }
        let i = (n as usize).saturating_sub(1);
        Some(
            rule.after_ms
                .get(i)
                .or(rule.after_ms.last())
                .copied()
                .unwrap_or(3_600_000),
        )
    }
}

/// What a finished call means for its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A person answered and the call completed.
    Answered,
    /// One of [`RETRY_OUTCOMES`].
    Retryable(&'static str),
    /// The carrier refuses the number: failed at once.
    Refused,
    /// The call never reached the carrier (queue timeout, drain, campaign cancel).
    NotPlaced,
}

impl Outcome {
    /// `placed`: the carrier took the call (it has a carrier id). A canceled call the carrier
    /// took (hung up by a restart, say) counts as `failed`; one it never saw is not an attempt.
    pub fn classify(
        status: CallStatus,
        answered_by: Option<&str>,
        error: Option<&str>,
        placed: bool,
    ) -> Self {
        let machine = answered_by.is_some_and(|a| a.starts_with("machine") || a == "fax");
        match status {
            CallStatus::Completed if machine => Self::Retryable("voicemail"),
            CallStatus::Completed => Self::Answered,
            CallStatus::Busy => Self::Retryable("busy"),
            CallStatus::NoAnswer => Self::Retryable("no_answer"),
            CallStatus::Canceled if !placed => Self::NotPlaced,
            CallStatus::Canceled => Self::Retryable("failed"),
            _ if error.is_some_and(|e| REFUSED_CODES.iter().any(|c| e.contains(c))) => {
                Self::Refused
            }
            _ => Self::Retryable("failed"),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Retryable(o) => o,
            Self::Refused => "invalid_number",
            Self::NotPlaced => "not_placed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in RecipientState::ALL {
            assert_eq!(RecipientState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn default_retries_follow_the_spec() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay_ms("no_answer", 1), Some(3_600_000));
        assert_eq!(p.next_delay_ms("no_answer", 2), Some(3_600_000));
        assert_eq!(p.next_delay_ms("no_answer", 3), None);
        assert_eq!(p.next_delay_ms("busy", 1), Some(1_800_000));
        assert_eq!(p.next_delay_ms("failed", 1), None);
        assert_eq!(p.next_delay_ms("voicemail", 1), None);
    }

    #[test]
    fn outcomes_classify() {
        assert_eq!(
            Outcome::classify(CallStatus::Completed, None, None, true),
            Outcome::Answered
        );
        assert_eq!(
            Outcome::classify(CallStatus::Completed, Some("machine_end_beep"), None, true),
            Outcome::Retryable("voicemail")
        );
        assert_eq!(
            Outcome::classify(
                CallStatus::Failed,
                None,
                Some("Twilio error 21211: bad"),
                false
            ),
            Outcome::Refused
        );
        assert_eq!(
            Outcome::classify(CallStatus::Failed, None, Some("timeout"), false),
            Outcome::Retryable("failed")
        );
        assert_eq!(
            Outcome::classify(CallStatus::Canceled, None, None, false),
            Outcome::NotPlaced
        );
        assert_eq!(
            Outcome::classify(CallStatus::Canceled, None, None, true),
            Outcome::Retryable("failed")
        );
    }
}

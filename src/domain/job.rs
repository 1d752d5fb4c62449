//! Kinds of durable job. The strings are what the `jobs.kind` column holds, so they never change.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// POST the tenant's call-ended webhook.
    Webhook,
    /// Fetch a finished Ultravox call's transcript (then queue the webhook).
    UltravoxTranscript,
    /// Ask the carrier how a call ended when no callback will say.
    Reconcile,
    /// POST the tenant's `campaign.completed` webhook (the campaign id is in the dedupe key).
    CampaignCompleted,
    /// Post-call analysis by an LLM (then the call-ended webhook goes at once).
    Analysis,
}

impl JobKind {
    pub const ALL: [JobKind; 5] = [
        Self::Webhook,
        Self::UltravoxTranscript,
        Self::Reconcile,
        Self::CampaignCompleted,
        Self::Analysis,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::UltravoxTranscript => "ultravox_transcript",
            Self::Reconcile => "reconcile",
            Self::CampaignCompleted => "campaign_completed",
            Self::Analysis => "analysis",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_as_stored() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(JobKind::parse("webhook"), Some(JobKind::Webhook));
        assert_eq!(JobKind::parse("nope"), None);
    }
}

//! Moving a live call's media elsewhere and back: keypad out (DTMF tones played on the
//! call) and transfers. The carrier is redirected; the media stream it was sending us stops
//! and a new one re-attaches to the same call record and the same engine session (parked in
//! the call's [`super::session::Session`] in between), with a fresh single-use token.

use super::session::PendingTransfer;
use super::shared::Shared;
use crate::domain::CallStatus;
use crate::domain::ids::token_hash;
use crate::domain::ids::{CallId, random_token};
use crate::store::calls::{self, Scope};
use crate::telephony::Script;

/// Longest digit string accepted (an extension plus a PIN, with pauses, fits easily).
pub const MAX_DIGITS: usize = 64;

/// Why a handover was refused. The text is what the agent (or an operator) reads.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("the call was not found")]
    NotFound,
    #[error("the call is not live (it is {0})")]
    NotLive(String),
    #[error("the call's audio does not run through this server, so it cannot be handed over")]
    NotBridged,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not one of this tenant's transfer numbers")]
    NotAllowed(String),
    #[error("another keypad or transfer action is still under way on this call")]
    Busy,
    #[error("the phone carrier did not accept the change: {0}")]
    Carrier(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Checks a DTMF string: 0-9, `*`, `#`, and `w`/`W` (pauses), at most [`MAX_DIGITS`].
pub(crate) fn check_digits(digits: &str) -> Result<(), HandoverError> {
    if digits.is_empty() {
        return Err(HandoverError::Invalid("digits must not be empty".into()));
    }
    if digits.chars().count() > MAX_DIGITS {
        return Err(HandoverError::Invalid(format!(
            "digits must be at most {MAX_DIGITS} characters"
        )));
    }
    if let Some(bad) = digits
        .chars()
        .find(|c| !(c.is_ascii_digit() || matches!(c, '*' | '#' | 'w' | 'W')))
    {
        return Err(HandoverError::Invalid(format!(
            "digits may only contain 0-9, *, # and w/W (pause); found {bad:?}"
        )));
    }
    Ok(())
}

/// Plays `digits` on the live call (as if keyed on a phone), then reconnects its media to
/// the same engine session. Returns once the carrier accepted the redirect.
pub(crate) async fn send_dtmf(
    shared: &Shared,
    call: &CallId,
    digits: &str,
) -> Result<(), HandoverError> {
    check_digits(digits)?;
    let (sid, token) = prepare(shared, call).await?;
    let script = Script::PlayDigitsThenStream {
        digits: digits.to_owned(),
        url: shared.config().media_url(),
        params: vec![("call_id", call.to_string()), ("token", token)],
    };
    redirect(shared, call, &sid, &script).await?;
    tracing::info!(call_id = %call, digits = digits.len(), "keypad out: digits sent");
    Ok(())
}

/// How long a transfer target may ring.
const TRANSFER_RING_SECS: u32 = 20;
/// Longest summary whispered to the person answering a warm transfer.
const MAX_SUMMARY: usize = 1_000;

/// Transfers the live call to one of its tenant's `transfer_numbers` (matched by number or
/// by label): the carrier dials it and joins the two (warm: the person answering first hears
/// `summary`). The Dial's outcome comes back to [`Shared::dial_ended`].
pub(crate) async fn transfer(
    shared: &Shared,
    call: &CallId,
    destination: &str,
    summary: &str,
) -> Result<(), HandoverError> {
    if summary.chars().count() > MAX_SUMMARY {
        return Err(HandoverError::Invalid(format!(
            "summary must be at most {MAX_SUMMARY} characters"
        )));
    }
    let id = call.to_string();
    let (tenant, ours) = shared
        .store
        .run(move |c| {
            let d = calls::detail(c, &id)?;
            // Our side of the call: the caller ID the transfer target sees.
            let ours = match d.call.direction {
                crate::domain::Direction::Inbound => d.call.to.clone(),
                _ => d.call.from.clone(),
            };
            Ok((crate::store::tenants::get_by_id(c, d.tenant_id)?, ours))
        })
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound(_) => HandoverError::NotFound,
            e => HandoverError::Internal(e.to_string()),
        })?;
    let wanted = destination.trim();
    let Some(target) = tenant
        .transfer_numbers
        .iter()
        .find(|t| t.number == wanted || t.label.trim().eq_ignore_ascii_case(wanted))
    else {
        return Err(HandoverError::NotAllowed(destination.to_owned()));
    };
    let sid = live_call(shared, call).await?;
    let session = shared
        .sessions
        .get(call.as_str())
        .ok_or(HandoverError::NotBridged)?;
    session.set_transfer(Some(PendingTransfer {
        number: target.number.clone(),
        label: target.label.clone(),
        summary: summary.trim().to_owned(),
    }));
    session.begin_handover();
    let base = shared.config().public_url();
    let warm = tenant.transfer_mode == "warm";
    let script = Script::Dial {
        number: target.number.clone(),
        action: format!("{base}/twilio/dial/{call}"),
        whisper_url: warm.then(|| format!("{base}/twilio/whisper/{call}")),
        timeout_secs: TRANSFER_RING_SECS,
        caller_id: Some(ours).filter(|n| !n.is_empty()),
    };
    if let Err(e) = redirect(shared, call, &sid, &script).await {
        session.set_transfer(None);
        return Err(e);
    }
    tracing::info!(call_id = %call, label = %target.label, warm, "transferring the call");
    Ok(())
}

impl Shared {
    /// The carrier reports how a transfer's dial ended. Answered: the transfer is recorded
    /// and the call ends (`transferred`) once the parties hang up. Not answered: a new
    /// stream takes the call back to the same engine session, which says so.
    pub async fn dial_ended(&self, id: &str, status: &str, duration: Option<i64>) -> Script {
        let session = self.sessions.get(id);
        let pending = session.as_ref().and_then(|s| s.transfer());
        let to = pending.as_ref().map(|p| p.number.clone());
        let record = serde_json::json!({
            "to": to,
            "status": status,
            "duration_seconds": duration.unwrap_or(0),
        });
        let rid = id.to_owned();
        if let Err(e) = self
            .store
            .run(move |c| calls::set_transfer(c, &rid, &record))
            .await
        {
            tracing::error!(call_id = %id, error = %e, "cannot record the transfer");
        }
        tracing::info!(call_id = %id, dial_status = %status, "transfer dial ended");
        if status == "completed" || status == "answered" {
            self.note_end_reason(id, "transferred").await;
            return Script::Hangup;
        }
        let Some(session) = session.filter(|s| s.in_handover()) else {
            // Nothing to come back to (the call is over here).
            return Script::Hangup;
        };
        let token = random_token(32);
        let hash = token_hash(&token);
        let rid = id.to_owned();
        if let Err(e) = self
            .store
            .run(move |c| calls::set_stream_token(c, &rid, &hash))
            .await
        {
            tracing::error!(call_id = %id, error = %e, "cannot resume the call after a transfer");
            return Script::SayHangup(crate::domain::phrases::SOMETHING_WENT_WRONG);
        }
        let who = pending
            .map(|p| p.label)
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "them".into());
        session.set_transfer(None);
        session.set_resume_say(Some(format!(
            "Sorry, I could not reach {who}; the transfer did not go through. \
             Is there anything else I can help you with?"
        )));
        Script::ConnectStream {
            url: self.config().media_url(),
            params: vec![("call_id", id.to_owned()), ("token", token)],
        }
    }

    /// What the person answering a warm transfer hears before the two are joined.
    pub fn whisper(&self, id: &str) -> Script {
        let summary = self
            .sessions
            .get(id)
            .and_then(|s| s.transfer())
            .map(|p| p.summary)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "You have a transferred call.".into());
        Script::Say(summary)
    }
}

/// The live call's carrier id, checked to be bridged here and not mid-handover.
async fn live_call(shared: &Shared, call: &CallId) -> Result<String, HandoverError> {
    let id = call.to_string();
    let rec = shared
        .store
        .run(move |c| calls::get(c, Scope::All, &id))
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound(_) => HandoverError::NotFound,
            e => HandoverError::Internal(e.to_string()),
        })?;
    if rec.status != CallStatus::InProgress {
        return Err(HandoverError::NotLive(rec.status.as_str().to_owned()));
    }
    let sid = rec.twilio_call_sid.ok_or(HandoverError::NotBridged)?;
    let session = shared
        .sessions
        .get(call.as_str())
        .ok_or(HandoverError::NotBridged)?;
    if session.in_handover() {
        return Err(HandoverError::Busy);
    }
    if !session.is_bridged() {
        return Err(HandoverError::NotBridged);
    }
    Ok(sid)
}

/// Checks the call, stores a fresh stream token for the stream that will take it back and
/// marks the handover; returns the carrier's call id and the token.
async fn prepare(shared: &Shared, call: &CallId) -> Result<(String, String), HandoverError> {
    let sid = live_call(shared, call).await?;
    let token = random_token(32);
    let hash = token_hash(&token);
    let id = call.to_string();
    shared
        .store
        .run(move |c| calls::set_stream_token(c, &id, &hash))
        .await
        .map_err(|e| HandoverError::Internal(e.to_string()))?;
    if let Some(s) = shared.sessions.get(call.as_str()) {
        s.begin_handover();
    }
    Ok((sid, token))
}

async fn redirect(
    shared: &Shared,
    call: &CallId,
    sid: &str,
    script: &Script,
) -> Result<(), HandoverError> {
    if let Err(e) = shared.carrier.redirect(sid, script).await {
        if let Some(s) = shared.sessions.get(call.as_str()) {
            s.cancel_handover();
        }
        tracing::warn!(call_id = %call, error = %e, "handover redirect refused");
        return Err(HandoverError::Carrier(e.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_checked() {
        assert!(check_digits("1234#").is_ok());
        assert!(check_digits("*9wW0").is_ok());
        assert!(check_digits("").is_err());
        assert!(check_digits("12a").is_err());
        assert!(check_digits(&"1".repeat(MAX_DIGITS + 1)).is_err());
        assert!(check_digits(&"1".repeat(MAX_DIGITS)).is_ok());
    }
}

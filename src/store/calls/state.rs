//! State changes of a call: transitions (with the follow-up jobs of an end, in the same
//! transaction), end reasons, the stream token, provider and engine ids, and the event log.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Call, Scope, get};
use crate::domain::timefmt::now_ms;
use crate::domain::{CallStatus, JobKind};
use crate::store::jobs::{self, NewJob};
use crate::store::{Result, StoreError};

/// A requested state change, from a provider callback or from our own side.
#[derive(Debug, Clone, Default)]
pub struct Transition {
    pub status: Option<CallStatus>,
    /// Twilio's `SequenceNumber`: a callback at or below the last one applied is stale.
    pub seq: Option<i64>,
    pub duration_seconds: Option<i64>,
    pub end_reason: Option<String>,
    pub error: Option<String>,
    pub answered_by: Option<String>,
}

/// What the store knows about a call at the moment it ends: the facts an after-end policy
/// decides the follow-up jobs on.
#[derive(Debug, Clone)]
pub struct EndedCall {
    pub id: String,
    pub tenant_id: i64,
    pub status: CallStatus,
    /// The engine's own id for the call, when the engine (Ultravox) keeps a record of it.
    pub engine_call_id: Option<String>,
    pub tenant_has_webhook: bool,
    /// The tenant asks for post-call analysis.
    pub tenant_has_analysis: bool,
}

/// Decides which jobs follow a call's end. The store runs it inside the transaction that ends
/// the call, so the end and its follow-ups commit together or not at all.
pub type AfterEnd = dyn Fn(&EndedCall) -> Vec<NewJob> + Send + Sync;

/// [`transition_with`] under the default after-end policy ([`after_end`]).
pub fn transition(conn: &mut Connection, id: &str, t: &Transition) -> Result<Option<Call>> {
    transition_with(conn, id, t, &after_end)
}

/// Applies `t` if it moves the call forward; terminal states never change. On an end, the jobs
/// `after_end` asks for are queued in the same transaction. Returns the call after the change,
/// or `None` when nothing changed (stale, duplicate or backwards).
pub fn transition_with(
    conn: &mut Connection,
    id: &str,
    t: &Transition,
    after_end: &AfterEnd,
) -> Result<Option<Call>> {
    let tx = conn.transaction()?;
    let (status, last_seq, started_at, tenant_id): (String, i64, Option<i64>, i64) = tx
        .query_row(
            "SELECT status, last_callback_seq, started_at, tenant_id FROM calls WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?
        .ok_or(StoreError::NotFound("call"))?;
    let current = CallStatus::parse(&status).unwrap_or(CallStatus::Failed);
    let now = now_ms();
    let mut changed = false;
    if let Some(ab) = &t.answered_by
        && !current.is_terminal()
    {
        changed |= tx.execute(
            // A caller confirmed as a person stays one whatever a late detection says.
            "UPDATE calls SET answered_by = ?1 WHERE id = ?2 AND answered_by IS NOT ?1 \
             AND answered_by IS NOT 'human'",
            params![ab, id],
        )? > 0;
    }
    let stale = t.seq.is_some_and(|s| s <= last_seq);
    if let Some(next) = t.status.filter(|&n| !stale && current.can_become(n)) {
        tx.execute(
            "UPDATE calls SET status = ?1, updated_at = ?2, last_callback_seq = MAX(last_callback_seq, ?3) \
             WHERE id = ?4",
            params![next.as_str(), now, t.seq.unwrap_or(-1), id],
        )?;
        if next == CallStatus::InProgress {
            tx.execute(
                "UPDATE calls SET started_at = COALESCE(started_at, ?1), answered_at = COALESCE(answered_at, ?1) WHERE id = ?2",
                params![now, id],
            )?;
        }
        if next.is_terminal() {
            let duration = t
                .duration_seconds
                .or_else(|| started_at.map(|s| ((now - s) / 1000).max(0)))
                .unwrap_or(0);
            let reason = t
                .end_reason
                .clone()
                .unwrap_or_else(|| default_end_reason(next).into());
            tx.execute(
                "UPDATE calls SET ended_at = ?1, duration_seconds = ?2, \
                 end_reason = COALESCE(end_reason, ?3), error = COALESCE(?4, error) WHERE id = ?5",
                params![now, duration, reason, t.error, id],
            )?;
            let ended = ended_call(&tx, id, tenant_id, next)?;
            for job in after_end(&ended) {
                jobs::enqueue_job(&tx, &job)?;
            }
        }
        crate::store::campaigns::on_call_status(&tx, id, next)?;
        let reason: Option<String> =
            tx.query_row("SELECT end_reason FROM calls WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        add_event(
            &tx,
            id,
            "status",
            &serde_json::json!({"status": next.as_str(), "end_reason": if next.is_terminal() { reason } else { None }}),
        )?;
        changed = true;
    }
    if !changed {
        return Ok(None);
    }
    let call = get(&tx, Scope::All, id)?;
    tx.commit()?;
    Ok(Some(call))
}

/// The caller proved to be a person (a key press, a sentence in answer to the agent): on a
/// live call that asked for answering-machine detection `answered_by` becomes `human`, and a
/// machine report arriving later changes nothing (SPEC §8). True when this changed it.
pub fn confirm_person(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE calls SET answered_by = 'human' WHERE id = ?1 AND machine_detection = 1 \
         AND answered_by IS NOT 'human' AND status IN ('ringing','in_progress')",
        [id],
    )? > 0)
}

/// Notes why a live call is ending before the provider confirms it; the first reason wins.
pub fn set_end_reason(conn: &Connection, id: &str, reason: &str) -> Result<()> {
    conn.execute(
        "UPDATE calls SET end_reason = COALESCE(end_reason, ?1) WHERE id = ?2 \
         AND status IN ('queued','initiating','ringing','in_progress')",
        params![reason, id],
    )?;
    Ok(())
}

fn default_end_reason(s: CallStatus) -> &'static str {
    match s {
        CallStatus::Completed => "hangup",
        CallStatus::Busy => "busy",
        CallStatus::NoAnswer => "no_answer",
        CallStatus::Canceled => "canceled",
        _ => "failed",
    }
}

fn ended_call(
    conn: &Connection,
    id: &str,
    tenant_id: i64,
    status: CallStatus,
) -> Result<EndedCall> {
    let (engine_call_id, tenant_has_webhook, tenant_has_analysis) = conn.query_row(
        "SELECT c.engine_call_id, t.webhook_url IS NOT NULL, t.analysis IS NOT NULL FROM calls c \
         JOIN tenants t ON t.id = c.tenant_id WHERE c.id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(EndedCall {
        id: id.to_owned(),
        tenant_id,
        status,
        engine_call_id,
        tenant_has_webhook,
        tenant_has_analysis,
    })
}

// policy: moves to calls::lifecycle
/// What happens after a call ends: Ultravox calls first fetch their transcript (which then
/// queues the webhook); others queue the tenant webhook directly.
pub fn after_end(call: &EndedCall) -> Vec<NewJob> {
    if call.engine_call_id.is_some() {
        return vec![NewJob {
            kind: JobKind::UltravoxTranscript,
            call_id: Some(call.id.clone()),
            tenant_id: Some(call.tenant_id),
            dedupe_key: format!("ultravox.transcript:{}", call.id),
            run_at: now_ms(),
        }];
    }
    after_transcript(
        &call.id,
        call.tenant_id,
        call.tenant_has_webhook,
        call.tenant_has_analysis,
    )
}

/// The webhook waits for the analysis at most this long (SPEC §8).
pub const ANALYSIS_WAIT_MS: i64 = 60_000;

/// Once a call's transcript is complete: the analysis if the tenant asks for it, and the
/// webhook. The webhook is queued at once but due only after [`ANALYSIS_WAIT_MS`]; the
/// analysis job makes it due as soon as it is done, so a slow or failing model delays it by a
/// minute at most, and a crash in between still sends it exactly once.
pub fn after_transcript(
    call_id: &str,
    tenant_id: i64,
    has_webhook: bool,
    has_analysis: bool,
) -> Vec<NewJob> {
    let mut jobs = Vec::new();
    if has_analysis {
        jobs.push(NewJob {
            kind: JobKind::Analysis,
            call_id: Some(call_id.to_owned()),
            tenant_id: Some(tenant_id),
            dedupe_key: format!("analysis:{call_id}"),
            run_at: now_ms(),
        });
    }
    if has_webhook {
        let mut hook = webhook_job(call_id, tenant_id);
        if has_analysis {
            hook.run_at += ANALYSIS_WAIT_MS;
        }
        jobs.push(hook);
    }
    jobs
}

// policy: moves to calls::lifecycle
/// The tenant's call-ended webhook for `call_id`; its dedupe key is the event id receivers see.
pub fn webhook_job(call_id: &str, tenant_id: i64) -> NewJob {
    NewJob {
        kind: JobKind::Webhook,
        call_id: Some(call_id.to_owned()),
        tenant_id: Some(tenant_id),
        dedupe_key: format!("call.ended:{call_id}"),
        run_at: now_ms(),
    }
}

/// Queues what follows a complete transcript ([`after_transcript`]): the analysis if the
/// tenant asks for it, and the call-ended webhook if the tenant has one.
pub fn enqueue_webhook(conn: &Connection, call_id: &str, tenant_id: i64) -> Result<()> {
    let (has_hook, has_analysis): (bool, bool) = conn.query_row(
        "SELECT webhook_url IS NOT NULL, analysis IS NOT NULL FROM tenants WHERE id = ?1",
        [tenant_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    for job in after_transcript(call_id, tenant_id, has_hook, has_analysis) {
        jobs::enqueue_job(conn, &job)?;
    }
    Ok(())
}

/// Stores a call's analysis and lets its waiting webhook go now.
pub fn set_analysis(
    conn: &Connection,
    id: &str,
    analysis: &crate::domain::analysis::CallAnalysis,
) -> Result<()> {
    let json = serde_json::to_string(analysis)
        .map_err(|e| crate::store::StoreError::Task(format!("analysis: {e}")))?;
    conn.execute(
        "UPDATE calls SET analysis = ?1 WHERE id = ?2",
        params![json, id],
    )?;
    jobs::run_by(conn, &format!("call.ended:{id}"), now_ms())?;
    Ok(())
}

/// Stores the hash of a fresh stream token for `id` (replacing any earlier one).
pub fn set_stream_token(conn: &Connection, id: &str, hash: &[u8]) -> Result<()> {
    conn.execute(
        "UPDATE calls SET stream_token_hash = ?1 WHERE id = ?2",
        params![hash, id],
    )?;
    Ok(())
}

/// Consumes the stream token: true once for the right token, never again (no replays).
pub fn take_stream_token(conn: &mut Connection, id: &str, hash: &[u8]) -> Result<bool> {
    use subtle::ConstantTimeEq;
    let tx = conn.transaction()?;
    let stored: Option<Option<Vec<u8>>> = tx
        .query_row(
            "SELECT stream_token_hash FROM calls WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    let ok = matches!(stored, Some(Some(s)) if bool::from(s.as_slice().ct_eq(hash)));
    if ok {
        tx.execute(
            "UPDATE calls SET stream_token_hash = NULL WHERE id = ?1",
            [id],
        )?;
    }
    tx.commit()?;
    Ok(ok)
}

pub fn set_twilio_sid(conn: &Connection, id: &str, sid: &str) -> Result<()> {
    conn.execute(
        "UPDATE calls SET twilio_call_sid = ?1, updated_at = ?2 WHERE id = ?3",
        params![sid, now_ms(), id],
    )?;
    Ok(())
}

pub fn id_by_sid(conn: &Connection, sid: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT id FROM calls WHERE twilio_call_sid = ?1",
            [sid],
            |r| r.get(0),
        )
        .optional()?)
}

/// Notes what went wrong on a call; the first error recorded stays.
pub fn set_error(conn: &Connection, id: &str, error: &str) -> Result<()> {
    conn.execute(
        "UPDATE calls SET error = COALESCE(error, ?1) WHERE id = ?2",
        params![error, id],
    )?;
    Ok(())
}

pub fn set_engine_call_id(conn: &Connection, id: &str, engine_call_id: &str) -> Result<()> {
    conn.execute(
        "UPDATE calls SET engine_call_id = ?1 WHERE id = ?2",
        params![engine_call_id, id],
    )?;
    Ok(())
}

pub fn engine_call_id(conn: &Connection, id: &str) -> Result<Option<String>> {
    Ok(conn.query_row(
        "SELECT engine_call_id FROM calls WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?)
}

pub fn set_latency(conn: &Connection, id: &str, latency: &serde_json::Value) -> Result<()> {
    conn.execute(
        "UPDATE calls SET latency = ?1 WHERE id = ?2",
        params![latency.to_string(), id],
    )?;
    Ok(())
}

/// The providers a pipeline call used (SPEC §6 `providers`).
pub fn set_providers(conn: &Connection, id: &str, providers: &serde_json::Value) -> Result<()> {
    conn.execute(
        "UPDATE calls SET providers = ?1 WHERE id = ?2",
        params![providers.to_string(), id],
    )?;
    Ok(())
}

pub fn add_event(
    conn: &Connection,
    call_id: &str,
    kind: &str,
    data: &serde_json::Value,
) -> Result<()> {
    conn.execute(
        "INSERT INTO call_events (call_id, at, kind, data) VALUES (?1, ?2, ?3, ?4)",
        params![call_id, now_ms(), kind, data.to_string()],
    )?;
    Ok(())
}

/// Recorded status events of a call, oldest first: (at, kind, data).
pub fn events(conn: &Connection, id: &str) -> Result<Vec<(i64, String, serde_json::Value)>> {
    let mut st = conn
        .prepare_cached("SELECT at, kind, data FROM call_events WHERE call_id = ?1 ORDER BY id")?;
    let out = st
        .query_map([id], |r| {
            let data: String = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                serde_json::from_str(&data).unwrap_or_default(),
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Records how a transfer of call `id` went (`{"to", "status", "duration_seconds"}`).
pub fn set_transfer(conn: &Connection, id: &str, transfer: &serde_json::Value) -> Result<()> {
    conn.execute(
        "UPDATE calls SET transfer = ?1, updated_at = ?2 WHERE id = ?3",
        params![transfer.to_string(), now_ms(), id],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Direction;
    use crate::domain::ids::CallId;
    use crate::store::calls::{NewCall, insert};
    use crate::store::{tenants, tenants::TenantPatch, test_store};

    fn live_call(c: &mut Connection, tenant: &str, webhook: bool) -> Result<String> {
        let t = tenants::create(
            c,
            TenantPatch {
                name: Some(tenant.into()),
                webhook_url: webhook.then(|| "https://hooks.example.com/x".into()),
                ..Default::default()
            },
        )?;
        let id = CallId::generate();
        insert(
            c,
            &NewCall {
                id: id.clone(),
                tenant_id: t.id,
                direction: Direction::Outbound,
                to: "+14155550100".into(),
                from: "+14155550199".into(),
                status: CallStatus::InProgress,
                engine: "scripted".into(),
                metadata: serde_json::json!({}),
            },
        )?;
        Ok(id.as_str().to_owned())
    }

    fn job_keys(c: &Connection) -> Result<Vec<(String, String)>> {
        let mut st = c.prepare("SELECT kind, dedupe_key FROM jobs ORDER BY id")?;
        let out = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(out)
    }

    fn end() -> Transition {
        Transition {
            status: Some(CallStatus::Completed),
            ..Default::default()
        }
    }

    #[test]
    fn an_end_queues_what_the_policy_decides() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                // The default policy: a tenant with a webhook gets one per ended call.
                let id = live_call(c, "hooked", true)?;
                assert!(transition(c, &id, &end())?.is_some());
                assert_eq!(
                    job_keys(c)?,
                    vec![("webhook".to_owned(), format!("call.ended:{id}"))]
                );
                // A policy from outside decides instead, from the facts the store hands it.
                fn reconcile_only(e: &EndedCall) -> Vec<NewJob> {
                    assert_eq!(e.status, CallStatus::Completed);
                    assert!(e.tenant_has_webhook && e.engine_call_id.is_none());
                    vec![NewJob {
                        kind: JobKind::Reconcile,
                        call_id: Some(e.id.clone()),
                        tenant_id: None,
                        dedupe_key: format!("custom:{}", e.id),
                        run_at: 0,
                    }]
                }
                let other = live_call(c, "other", true)?;
                assert!(transition_with(c, &other, &end(), &reconcile_only)?.is_some());
                assert_eq!(job_keys(c)?.len(), 2);
                assert_eq!(
                    job_keys(c)?[1],
                    ("reconcile".to_owned(), format!("custom:{other}"))
                );
                // A duplicate end changes nothing and asks the policy nothing.
                fn never(_: &EndedCall) -> Vec<NewJob> {
                    unreachable!("a call ends once")
                }
                assert!(transition_with(c, &other, &end(), &never)?.is_none());
                // No webhook, no engine record: nothing follows.
                let quiet = live_call(c, "quiet", false)?;
                transition(c, &quiet, &end())?;
                assert_eq!(job_keys(c)?.len(), 2);
                Ok(())
            })
            .unwrap();
    }
}

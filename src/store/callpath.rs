//! The live call path's writes, each in one transaction: preparing the answer (state change,
//! stream token, what the engine needs), attaching the media stream (token taken, state
//! change, what the engine needs), closing the bridge's side, and the reconcile schedule.

use rusqlite::{Connection, OptionalExtension, params};
use subtle::ConstantTimeEq;

use super::calls::{self, Call, CallDetail, Scope};
use super::tenants::{self, Tenant};
use super::{Result, StoreError};
use crate::domain::timefmt::now_ms;
use crate::domain::{CallStatus, EngineKind, JobKind};

/// What the call path needs to run the engine of a call: its record and its tenant.
pub struct CallData {
    pub detail: CallDetail,
    pub tenant: Tenant,
}

fn call_data(conn: &Connection, id: &str) -> Result<CallData> {
    let detail = calls::detail(conn, id)?;
    let tenant = tenants::get_by_id(conn, detail.tenant_id)?;
    Ok(CallData { detail, tenant })
}

/// Moves a live call to `in_progress` if it may move there (the answer and stream-start
/// case of `calls::transition`: no sequence number, nothing terminal). Returns the call
/// after the change, or `None` when nothing changed.
fn to_in_progress(conn: &Connection, id: &str) -> Result<Option<Call>> {
    let status: String = conn
        .query_row("SELECT status FROM calls WHERE id = ?1", [id], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NotFound("call"))?;
    let current = CallStatus::parse(&status).unwrap_or(CallStatus::Failed);
    if !current.can_become(CallStatus::InProgress) {
        return Ok(None);
    }
    let now = now_ms();
    conn.execute(
        "UPDATE calls SET status = 'in_progress', updated_at = ?1, \
         last_callback_seq = MAX(last_callback_seq, -1), \
         started_at = COALESCE(started_at, ?1), answered_at = COALESCE(answered_at, ?1) \
         WHERE id = ?2",
        params![now, id],
    )?;
    calls::add_event(
        conn,
        id,
        "status",
        &serde_json::json!({"status": "in_progress", "end_reason": null}),
    )?;
    crate::store::campaigns::on_call_status(conn, id, CallStatus::InProgress)?;
    Ok(Some(calls::get(conn, Scope::All, id)?))
}

/// The answer webhook's work.
pub enum Answer {
    /// The call is over (or unknown): hang up.
    Over,
    Ready {
        /// The call after a state change made here, to announce.
        changed: Option<Box<Call>>,
        data: Box<CallData>,
    },
}

/// Prepares the answer of call `id` in one transaction: moves it to `in_progress` when the
/// carrier says it is, stores `stream_token_hash` when `wants_stream` says the media comes
/// through us, and loads what the engine needs.
pub fn prepare_answer(
    conn: &mut Connection,
    id: &str,
    in_progress: bool,
    wants_stream: impl FnOnce(&Call) -> bool,
    stream_token_hash: &[u8],
) -> Result<Answer> {
    let tx = conn.transaction()?;
    let call = match calls::get(&tx, Scope::All, id) {
        Ok(c) if !c.status.is_terminal() => c,
        Ok(_) | Err(StoreError::NotFound(_)) => return Ok(Answer::Over),
        Err(e) => return Err(e),
    };
    let changed = if in_progress {
        to_in_progress(&tx, id)?
    } else {
        None
    };
    if wants_stream(&call) {
        calls::set_stream_token(&tx, id, stream_token_hash)?;
    }
    let data = call_data(&tx, id)?;
    tx.commit()?;
    Ok(Answer::Ready {
        changed: changed.map(Box::new),
        data: Box::new(data),
    })
}

/// An inbound call's record, new or (for a retried webhook) existing.
pub enum Inbound {
    UnknownNumber,
    /// Over the server's or the tenant's concurrent-call cap.
    Full {
        tenant: String,
    },
    Ready {
        data: Box<CallData>,
    },
    /// A replayed webhook for a call that has already ended: nothing to connect.
    Over,
}

/// Creates (or finds) the record of an inbound call, schedules its reconciliation at
/// `reconcile_at`, stores the stream token when `wants_stream` says so, and loads what the
/// engine needs; one transaction.
#[allow(clippy::too_many_arguments)]
pub fn prepare_inbound(
    conn: &mut Connection,
    to: &str,
    from: &str,
    sid: &str,
    max_live: i64,
    default_engine: EngineKind,
    reconcile_at: i64,
    wants_stream: impl FnOnce(&Call) -> bool,
    stream_token_hash: &[u8],
) -> Result<Inbound> {
    let tx = conn.transaction()?;
    let id = match calls::id_by_sid(&tx, sid)? {
        // The carrier retried the webhook: same call, new token; unless it has ended, when
        // a (replayed) request must not bring it, or an engine session, back.
        Some(existing) => {
            if calls::get(&tx, calls::Scope::All, &existing)?
                .status
                .is_terminal()
            {
                return Ok(Inbound::Over);
            }
            existing
        }
        None => {
            let Some(tenant) = tenants::by_number(&tx, to)? else {
                return Ok(Inbound::UnknownNumber);
            };
            let (live, per) = calls::live_counts(&tx)?;
            let tenant_live = per.get(&tenant.id).copied().unwrap_or(0);
            if live >= max_live
                || tenant
                    .max_concurrent_calls
                    .is_some_and(|m| tenant_live >= m as i64)
            {
                return Ok(Inbound::Full {
                    tenant: tenant.name,
                });
            }
            let engine = tenant
                .engine
                .as_deref()
                .and_then(EngineKind::parse)
                .unwrap_or(default_engine);
            calls::create_inbound(&tx, tenant.id, to, from, engine.as_str(), sid)?
                .id
                .to_string()
        }
    };
    schedule_reconcile(&tx, &id, reconcile_at)?;
    let data = call_data(&tx, &id)?;
    if wants_stream(&data.detail.call) {
        calls::set_stream_token(&tx, &id, stream_token_hash)?;
    }
    tx.commit()?;
    Ok(Inbound::Ready {
        data: Box::new(data),
    })
}

/// A media stream presents its token: if it is the right one (consumed here, never valid
/// again), the call moves to `in_progress` and what the engine needs is returned; one
/// transaction. `None`: wrong, used or no token.
pub fn attach_stream(
    conn: &mut Connection,
    id: &str,
    token_hash: &[u8],
) -> Result<Option<(Option<Call>, CallData)>> {
    let tx = conn.transaction()?;
    if !take_token(&tx, id, token_hash)? {
        return Ok(None);
    }
    let changed = to_in_progress(&tx, id)?;
    let data = call_data(&tx, id)?;
    tx.commit()?;
    Ok(Some((changed, data)))
}

/// Consumes the stream token without attaching (a stream we refuse for another reason).
pub fn burn_stream_token(conn: &mut Connection, id: &str, token_hash: &[u8]) -> Result<()> {
    let tx = conn.transaction()?;
    take_token(&tx, id, token_hash)?;
    tx.commit()?;
    Ok(())
}

fn take_token(conn: &Connection, id: &str, hash: &[u8]) -> Result<bool> {
    let stored: Option<Option<Vec<u8>>> = conn
        .query_row(
            "SELECT stream_token_hash FROM calls WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    let ok = matches!(stored, Some(Some(s)) if bool::from(s.as_slice().ct_eq(hash)));
    if ok {
        conn.execute(
            "UPDATE calls SET stream_token_hash = NULL WHERE id = ?1",
            [id],
        )?;
    }
    Ok(ok)
}

/// Queues a check with the carrier at `at` for call `id` (once per call).
pub fn schedule_reconcile(conn: &Connection, id: &str, at: i64) -> Result<()> {
    super::jobs::enqueue(
        conn,
        JobKind::Reconcile,
        Some(id),
        None,
        &format!("reconcile:{id}"),
        at,
    )
}

/// Brings call `id`'s reconciliation forward to `at` (or schedules it).
pub fn reconcile_by(conn: &mut Connection, id: &str, at: i64) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE jobs SET run_at = MIN(run_at, ?1) WHERE dedupe_key = ?2 AND state = 'pending'",
        params![at, format!("reconcile:{id}")],
    )?;
    schedule_reconcile(&tx, id, at)?;
    tx.commit()?;
    Ok(())
}

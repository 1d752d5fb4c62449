//! Call records: the read side (list, get) and creation. Every read is scoped: a tenant only
//! ever sees its own calls, and another tenant's call is simply "not found".

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::{Result, StoreError};
use crate::calls::{CallStatus, Direction};
use crate::ids::CallId;
use crate::timefmt::{now_ms, rfc3339, rfc3339_opt};

/// The call object of SPEC §3.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub id: CallId,
    pub tenant: String,
    pub direction: Direction,
    pub to: String,
    pub from: String,
    pub status: CallStatus,
    pub engine: String,
    pub twilio_call_sid: Option<String>,
    pub answered_by: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_seconds: Option<i64>,
    pub end_reason: Option<String>,
    pub metadata: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Greeting, turn and barge-in latencies measured by the bridge (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<serde_json::Value>,
    #[serde(skip)]
    pub created_ms: i64,
}

/// Which calls a reader may see.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    All,
    Tenant(i64),
}

impl Scope {
    fn tenant_id(self) -> Option<i64> {
        match self {
            Scope::All => None,
            Scope::Tenant(id) => Some(id),
        }
    }
}

pub struct NewCall {
    pub id: CallId,
    pub tenant_id: i64,
    pub direction: Direction,
    pub to: String,
    pub from: String,
    pub status: CallStatus,
    pub engine: String,
    pub metadata: serde_json::Value,
}

const COLUMNS: &str = "c.id, t.name, c.direction, c.to_number, c.from_number, c.status, c.engine, \
     c.twilio_call_sid, c.answered_by, c.created_at, c.started_at, c.ended_at, \
     c.duration_seconds, c.end_reason, c.metadata, c.error, c.latency \
     FROM calls c JOIN tenants t ON t.id = c.tenant_id";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Call> {
    let text_err = |i: usize, what: &str, v: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown {what} {v:?}").into(),
        )
    };
    let direction: String = r.get(2)?;
    let status: String = r.get(5)?;
    let metadata: String = r.get(14)?;
    let created_ms: i64 = r.get(9)?;
    Ok(Call {
        id: CallId::from_db(r.get(0)?),
        tenant: r.get(1)?,
        direction: Direction::parse(&direction)
            .ok_or_else(|| text_err(2, "direction", &direction))?,
        to: r.get(3)?,
        from: r.get(4)?,
        status: CallStatus::parse(&status).ok_or_else(|| text_err(5, "status", &status))?,
        engine: r.get(6)?,
        twilio_call_sid: r.get(7)?,
        answered_by: r.get(8)?,
        created_at: rfc3339(created_ms),
        started_at: rfc3339_opt(r.get(10)?),
        ended_at: rfc3339_opt(r.get(11)?),
        duration_seconds: r.get(12)?,
        end_reason: r.get(13)?,
        metadata: serde_json::from_str(&metadata).unwrap_or(serde_json::Value::Null),
        error: r.get(15)?,
        latency: r
            .get::<_, Option<String>>(16)?
            .and_then(|l| serde_json::from_str(&l).ok()),
        created_ms,
    })
}

pub fn insert(conn: &Connection, c: &NewCall) -> Result<()> {
    let now = now_ms();
    conn.execute(
        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, status, engine, \
         metadata, created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?9)",
        params![
            c.id.as_str(),
            c.tenant_id,
            c.direction.as_str(),
            c.to,
            c.from,
            c.status.as_str(),
            c.engine,
            c.metadata.to_string(),
            now
        ],
    )?;
    Ok(())
}

pub fn get(conn: &Connection, scope: Scope, id: &str) -> Result<Call> {
    conn.query_row(
        &format!("SELECT {COLUMNS} WHERE c.id = ?1 AND (?2 IS NULL OR c.tenant_id = ?2)"),
        params![id, scope.tenant_id()],
        from_row,
    )
    .optional()?
    .ok_or(StoreError::NotFound("call"))
}

/// Where a page ends: the (created_at, id) of its last call, so the next page starts after
/// it even when many calls share a millisecond.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_ms: i64,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.created_ms, self.id))
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (ms, id) = raw.split_once(':')?;
        Some(Cursor {
            created_ms: ms.parse().ok()?,
            id: CallId::parse(id)?.as_str().to_owned(),
        })
    }
}

pub struct ListQuery {
    pub scope: Scope,
    pub status: Option<CallStatus>,
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// Newest first. Returns the page and the cursor for the next one (if there may be more).
pub fn list(conn: &Connection, q: &ListQuery) -> Result<(Vec<Call>, Option<Cursor>)> {
    let (after_ms, after_id) = match &q.cursor {
        Some(c) => (Some(c.created_ms), Some(c.id.as_str())),
        None => (None, None),
    };
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} WHERE (?1 IS NULL OR c.tenant_id = ?1) AND (?2 IS NULL OR c.status = ?2) \
         AND (?3 IS NULL OR (c.created_at, c.id) < (?3, ?4)) \
         ORDER BY c.created_at DESC, c.id DESC LIMIT ?5"
    ))?;
    let calls: Vec<Call> = st
        .query_map(
            params![
                q.scope.tenant_id(),
                q.status.map(|s| s.as_str()),
                after_ms,
                after_id,
                q.limit
            ],
            from_row,
        )?
        .collect::<rusqlite::Result<_>>()?;
    let next = (calls.len() == q.limit as usize)
        .then(|| calls.last())
        .flatten()
        .map(|c| Cursor {
            created_ms: c.created_ms,
            id: c.id.as_str().to_owned(),
        });
    Ok((calls, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{tenants, tenants::TenantPatch, test_store};

    fn add(c: &Connection, tenant_id: i64, status: CallStatus) -> CallId {
        let id = CallId::generate();
        insert(
            c,
            &NewCall {
                id: id.clone(),
                tenant_id,
                direction: Direction::Outbound,
                to: "+14155550100".into(),
                from: "+14155550199".into(),
                status,
                engine: "scripted".into(),
                metadata: serde_json::json!({"k": 1}),
            },
        )
        .unwrap();
        id
    }

    #[test]
    fn pages_newest_first_and_scopes_tenants() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                let a = tenants::create(
                    c,
                    TenantPatch {
                        name: Some("a".into()),
                        ..Default::default()
                    },
                )?;
                let b = tenants::create(
                    c,
                    TenantPatch {
                        name: Some("b".into()),
                        ..Default::default()
                    },
                )?;
                let ids: Vec<_> = (0..5)
                    .map(|_| add(c, a.id, CallStatus::Completed))
                    .collect();
                let b_call = add(c, b.id, CallStatus::Queued);
                let mut seen = Vec::new();
                let mut cursor = None;
                loop {
                    let (page, next) = list(
                        c,
                        &ListQuery {
                            scope: Scope::Tenant(a.id),
                            status: None,
                            limit: 2,
                            cursor,
                        },
                    )?;
                    seen.extend(page.into_iter().map(|c| c.id));
                    match next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
                let mut want = ids.clone();
                want.sort_by(|x, y| y.cmp(x));
                let mut got = seen.clone();
                got.sort_by(|x, y| y.cmp(x));
                assert_eq!(got, want, "every call exactly once");
                assert!(matches!(
                    get(c, Scope::Tenant(a.id), b_call.as_str()),
                    Err(StoreError::NotFound(_))
                ));
                assert_eq!(get(c, Scope::All, b_call.as_str())?.tenant, "b");
                let (q, _) = list(
                    c,
                    &ListQuery {
                        scope: Scope::All,
                        status: Some(CallStatus::Queued),
                        limit: 10,
                        cursor: None,
                    },
                )?;
                assert_eq!(q.len(), 1);
                // Deleting a tenant with history needs force, and leaves no orphans.
                assert!(matches!(
                    tenants::delete(c, "a", false),
                    Err(StoreError::Conflict(_))
                ));
                assert!(
                    matches!(tenants::delete(c, "b", true), Err(StoreError::Conflict(_))),
                    "live call"
                );
                tenants::delete(c, "a", true)?;
                let n: i64 = c.query_row(
                    "SELECT COUNT(*) FROM calls WHERE tenant_id = ?1",
                    [a.id],
                    |r| r.get(0),
                )?;
                assert_eq!(n, 0);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn cursor_round_trip_rejects_garbage() {
        let c = Cursor {
            created_ms: 5,
            id: CallId::generate().as_str().to_owned(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!"), None);
        assert_eq!(Cursor::decode("MTp4"), None);
    }
}

// ---- lifecycle ------------------------------------------------------------------------

/// What an outbound create request asked for; stored with the call.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub tenant_id: i64,
    pub to: String,
    pub from: String,
    pub engine: String,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub voice: Option<String>,
    pub max_duration_secs: Option<i64>,
    pub machine_detection: bool,
    pub metadata: serde_json::Value,
    pub idempotency_key: Option<String>,
    /// Hash of the request body, to tell a retry from a different request with the same key.
    pub request_hash: String,
}

/// Persists a queued outbound call. With an idempotency key already used by this tenant, the
/// original call is returned (same body) or a conflict raised (different body); replays do
/// not count against the tenant's `max_per_minute` creations.
pub fn create_outbound(
    conn: &mut Connection,
    r: &OutboundRequest,
    max_per_minute: i64,
) -> Result<(Call, bool)> {
    let tx = conn.transaction()?;
    if let Some(key) = &r.idempotency_key {
        let prior: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT id, request_hash FROM calls WHERE tenant_id = ?1 AND idempotency_key = ?2",
                params![r.tenant_id, key],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((id, hash)) = prior {
            if hash.as_deref() != Some(r.request_hash.as_str()) {
                return Err(StoreError::Conflict(format!(
                    "Idempotency-Key {key:?} was already used with a different request (call {id})"
                )));
            }
            let call = get(&tx, Scope::Tenant(r.tenant_id), &id)?;
            return Ok((call, false));
        }
    }
    let (recent, frees_at) = recent_creates(&tx, r.tenant_id, 60_000)?;
    if recent >= max_per_minute {
        let wait_ms = frees_at.map_or(1000, |t| (t - now_ms()).max(0));
        return Err(StoreError::RateLimited {
            retry_after_secs: (wait_ms as u64).div_ceil(1000).max(1),
        });
    }
    let id = CallId::generate();
    let now = now_ms();
    tx.execute(
        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, status, engine, \
         system_prompt, greeting, voice, max_duration_secs, machine_detection, metadata, \
         idempotency_key, request_hash, created_at, updated_at) \
         VALUES (?1,?2,'outbound',?3,?4,'queued',?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?14)",
        params![
            id.as_str(),
            r.tenant_id,
            r.to,
            r.from,
            r.engine,
            r.system_prompt,
            r.greeting,
            r.voice,
            r.max_duration_secs,
            r.machine_detection,
            r.metadata.to_string(),
            r.idempotency_key,
            r.request_hash,
            now
        ],
    )?;
    add_event(
        &tx,
        id.as_str(),
        "status",
        &serde_json::json!({"status": "queued"}),
    )?;
    let call = get(&tx, Scope::All, id.as_str())?;
    tx.commit()?;
    Ok((call, true))
}

/// Calls created by `tenant_id` in the last `window_ms`, and when the oldest of them leaves
/// the window (for `Retry-After`).
pub fn recent_creates(
    conn: &Connection,
    tenant_id: i64,
    window_ms: i64,
) -> Result<(i64, Option<i64>)> {
    let since = now_ms() - window_ms;
    Ok(conn.query_row(
        "SELECT COUNT(*), MIN(created_at) FROM calls WHERE tenant_id = ?1 AND created_at > ?2 \
         AND direction = 'outbound'",
        params![tenant_id, since],
        |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<i64>>(1)?.map(|t| t + window_ms),
            ))
        },
    )?)
}

/// Everything the call path needs about one call, beyond the public object.
#[derive(Debug, Clone)]
pub struct CallDetail {
    pub call: Call,
    pub tenant_id: i64,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub voice: Option<String>,
    pub max_duration_secs: Option<i64>,
    pub machine_detection: bool,
}

pub fn detail(conn: &Connection, id: &str) -> Result<CallDetail> {
    let call = get(conn, Scope::All, id)?;
    conn.query_row(
        "SELECT tenant_id, system_prompt, greeting, voice, max_duration_secs, machine_detection \
         FROM calls WHERE id = ?1",
        [id],
        |r| {
            Ok(CallDetail {
                call: call.clone(),
                tenant_id: r.get(0)?,
                system_prompt: r.get(1)?,
                greeting: r.get(2)?,
                voice: r.get(3)?,
                max_duration_secs: r.get(4)?,
                machine_detection: r.get(5)?,
            })
        },
    )
    .map_err(Into::into)
}

/// Queued calls, oldest first: the dialer's work list.
pub fn queued(conn: &Connection, limit: u32) -> Result<Vec<(String, i64, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT id, tenant_id, created_at FROM calls WHERE status = 'queued' \
         ORDER BY created_at, id LIMIT ?1",
    )?;
    let out = st
        .query_map([limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Calls occupying a line (dialing, ringing or connected), overall and per tenant.
pub fn live_counts(conn: &Connection) -> Result<(i64, std::collections::HashMap<i64, i64>)> {
    let mut st = conn.prepare_cached(
        "SELECT tenant_id, COUNT(*) FROM calls WHERE status IN ('initiating','ringing','in_progress') \
         GROUP BY tenant_id",
    )?;
    let mut per = std::collections::HashMap::new();
    let mut total = 0;
    for row in st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
        let (t, n) = row?;
        total += n;
        per.insert(t, n);
    }
    Ok((total, per))
}

pub fn queued_count(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM calls WHERE status = 'queued'",
        [],
        |r| r.get(0),
    )?)
}

/// Claims a queued call for dialing. Only one claimer can win, which is what guarantees a
/// call is never dialed twice.
pub fn claim_for_dialing(conn: &mut Connection, id: &str) -> Result<bool> {
    let tx = conn.transaction()?;
    let n = tx.execute(
        "UPDATE calls SET status = 'initiating', updated_at = ?1 WHERE id = ?2 AND status = 'queued'",
        params![now_ms(), id],
    )?;
    if n == 1 {
        add_event(
            &tx,
            id,
            "status",
            &serde_json::json!({"status": "initiating"}),
        )?;
    }
    tx.commit()?;
    Ok(n == 1)
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

/// Applies `t` if it moves the call forward; terminal states never change. Returns the call
/// after the change, or `None` when nothing changed (stale, duplicate or backwards).
pub fn transition(conn: &mut Connection, id: &str, t: &Transition) -> Result<Option<Call>> {
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
            "UPDATE calls SET answered_by = ?1 WHERE id = ?2 AND answered_by IS NOT ?1",
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
            enqueue_after_end(&tx, id, tenant_id)?;
        }
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

/// What happens after a call ends: Ultravox calls first fetch their transcript (which then
/// queues the webhook); others queue the tenant webhook directly.
fn enqueue_after_end(conn: &Connection, call_id: &str, tenant_id: i64) -> Result<()> {
    let engine_call: Option<String> = conn.query_row(
        "SELECT engine_call_id FROM calls WHERE id = ?1",
        [call_id],
        |r| r.get(0),
    )?;
    if engine_call.is_some() {
        return super::jobs::enqueue(
            conn,
            "ultravox_transcript",
            Some(call_id),
            Some(tenant_id),
            &format!("ultravox.transcript:{call_id}"),
            now_ms(),
        );
    }
    enqueue_webhook(conn, call_id, tenant_id)
}

pub fn enqueue_webhook(conn: &Connection, call_id: &str, tenant_id: i64) -> Result<()> {
    let has_hook: bool = conn.query_row(
        "SELECT webhook_url IS NOT NULL FROM tenants WHERE id = ?1",
        [tenant_id],
        |r| r.get(0),
    )?;
    if has_hook {
        super::jobs::enqueue(
            conn,
            "webhook",
            Some(call_id),
            Some(tenant_id),
            &format!("call.ended:{call_id}"),
            now_ms(),
        )?;
    }
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

/// Creates the record of an inbound call when Twilio first asks what to do with it.
pub fn create_inbound(
    conn: &Connection,
    tenant_id: i64,
    to: &str,
    from: &str,
    engine: &str,
    sid: &str,
) -> Result<Call> {
    let id = CallId::generate();
    let now = now_ms();
    conn.execute(
        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, status, engine, \
         twilio_call_sid, created_at, updated_at) VALUES (?1,?2,'inbound',?3,?4,'ringing',?5,?6,?7,?7)",
        params![id.as_str(), tenant_id, to, from, engine, sid, now],
    )?;
    add_event(
        conn,
        id.as_str(),
        "status",
        &serde_json::json!({"status": "ringing"}),
    )?;
    get(conn, Scope::All, id.as_str())
}

#[derive(Debug, Clone, Serialize)]
pub struct TranscriptEntry {
    pub speaker: &'static str,
    pub text: String,
    pub at_ms: i64,
}

pub fn add_transcript(
    conn: &mut Connection,
    call_id: &str,
    entries: &[TranscriptEntry],
) -> Result<()> {
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO transcript_entries (call_id, speaker, text, at_ms) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for e in entries {
            st.execute(params![call_id, e.speaker, e.text, e.at_ms])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub fn transcript(conn: &Connection, scope: Scope, id: &str) -> Result<Vec<TranscriptEntry>> {
    get(conn, scope, id)?;
    let mut st = conn.prepare_cached(
        "SELECT speaker, text, at_ms FROM transcript_entries WHERE call_id = ?1 ORDER BY at_ms, id",
    )?;
    let out = st
        .query_map([id], |r| {
            let speaker: String = r.get(0)?;
            Ok(TranscriptEntry {
                speaker: if speaker == "agent" {
                    "agent"
                } else {
                    "caller"
                },
                text: r.get(1)?,
                at_ms: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
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

pub fn active(conn: &Connection, scope: Scope) -> Result<Vec<Call>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} WHERE c.status IN ('queued','initiating','ringing','in_progress') \
         AND (?1 IS NULL OR c.tenant_id = ?1) ORDER BY c.created_at, c.id"
    ))?;
    let out = st
        .query_map([scope.tenant_id()], from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Non-terminal calls at startup, for crash recovery: (id, status, twilio sid).
pub fn unfinished(conn: &Connection) -> Result<Vec<(String, CallStatus, Option<String>)>> {
    let mut st = conn.prepare(
        "SELECT id, status, twilio_call_sid FROM calls \
         WHERE status IN ('initiating','ringing','in_progress')",
    )?;
    let out = st
        .query_map([], |r| {
            let s: String = r.get(1)?;
            Ok((
                r.get(0)?,
                CallStatus::parse(&s).unwrap_or(CallStatus::Failed),
                r.get(2)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Queued calls older than `max_age_ms`: they expire instead of being dialed hours late.
pub fn expired_queued(conn: &Connection, max_age_ms: i64) -> Result<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT id FROM calls WHERE status = 'queued' AND created_at < ?1")?;
    let out = st
        .query_map([now_ms() - max_age_ms], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct Analytics {
    pub since: Option<String>,
    pub total: i64,
    pub by_status: serde_json::Map<String, serde_json::Value>,
    pub success_rate: Option<f64>,
    pub average_duration_seconds: Option<f64>,
    pub greeting_latency_ms: Percentiles,
    pub turn_latency_ms: Percentiles,
    pub barge_in_latency_ms: Percentiles,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| (!v.is_empty()).then(|| v[((v.len() as f64 - 1.0) * q).round() as usize]);
        Percentiles {
            count: v.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

pub fn set_latency(conn: &Connection, id: &str, latency: &serde_json::Value) -> Result<()> {
    conn.execute(
        "UPDATE calls SET latency = ?1 WHERE id = ?2",
        params![latency.to_string(), id],
    )?;
    Ok(())
}

pub fn analytics(conn: &Connection, scope: Scope, since_ms: Option<i64>) -> Result<Analytics> {
    let mut st = conn.prepare_cached(
        "SELECT status, COUNT(*), AVG(duration_seconds) FROM calls \
         WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR created_at >= ?2) GROUP BY status",
    )?;
    let mut by_status = serde_json::Map::new();
    let (mut total, mut finished, mut completed) = (0i64, 0i64, 0i64);
    let mut avg = None;
    for row in st.query_map(params![scope.tenant_id(), since_ms], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Option<f64>>(2)?,
        ))
    })? {
        let (status, n, a) = row?;
        total += n;
        if let Some(s) = CallStatus::parse(&status) {
            if s.is_terminal() {
                finished += n;
            }
            if s == CallStatus::Completed {
                completed = n;
                avg = a;
            }
        }
        by_status.insert(status, n.into());
    }
    let mut lat = conn.prepare_cached(
        "SELECT latency FROM calls WHERE latency IS NOT NULL \
         AND (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR created_at >= ?2)",
    )?;
    let (mut greet, mut turn, mut barge) = (Vec::new(), Vec::new(), Vec::new());
    for row in lat.query_map(params![scope.tenant_id(), since_ms], |r| {
        r.get::<_, String>(0)
    })? {
        let v: serde_json::Value = serde_json::from_str(&row?).unwrap_or_default();
        greet.extend(v["greeting_ms"].as_f64());
        turn.extend(
            v["turn_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64()),
        );
        barge.extend(
            v["barge_in_ms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64()),
        );
    }
    Ok(Analytics {
        greeting_latency_ms: Percentiles::of(greet),
        turn_latency_ms: Percentiles::of(turn),
        barge_in_latency_ms: Percentiles::of(barge),
        since: since_ms.map(rfc3339),
        total,
        by_status,
        success_rate: (finished > 0).then(|| completed as f64 / finished as f64),
        average_duration_seconds: avg,
    })
}

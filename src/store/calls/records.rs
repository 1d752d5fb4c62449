//! Call records: creation and the read side (get, list, detail). Every read is scoped: a
//! tenant only ever sees its own calls, and another tenant's call is simply "not found".

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::add_event;
use crate::domain::ids::CallId;
use crate::domain::timefmt::{now_ms, rfc3339, rfc3339_opt};
use crate::domain::{CallStatus, Direction, RateLimited};
use crate::store::{Result, StoreError};

/// The call object of SPEC §3.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Call {
    #[schema(value_type = String)]
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
    /// Pipeline calls: `{"stt", "llm", "tts"}` providers used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub providers: Option<serde_json::Value>,
    /// Recorded calls: `{"status": "recorded", "duration_seconds"}` or `{"status": "failed",
    /// "error"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording: Option<serde_json::Value>,
    #[serde(skip)]
    pub created_ms: i64,
    /// A transfer: `{"to", "status", "duration_seconds"}` (status as the carrier reported
    /// the dial: `completed`, `busy`, `no-answer`, `failed`, `canceled`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<serde_json::Value>,
    /// Post-call analysis, when the tenant asks for it: `{"summary", "data", "success"}` or
    /// `{"error"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analysis: Option<crate::domain::analysis::CallAnalysis>,
}

/// Which calls a reader may see.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    All,
    Tenant(i64),
}

impl Scope {
    /// The tenant a reader is limited to (`None`: all).
    pub fn tenant_id(self) -> Option<i64> {
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

pub(super) const COLUMNS: &str = "c.id, t.name, c.direction, c.to_number, c.from_number, c.status, c.engine, \
     c.twilio_call_sid, c.answered_by, c.created_at, c.started_at, c.ended_at, \
     c.duration_seconds, c.end_reason, c.metadata, c.error, c.latency, c.providers, c.recording, c.transfer, \
     c.analysis FROM calls c JOIN tenants t ON t.id = c.tenant_id";

pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<Call> {
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
        providers: r
            .get::<_, Option<String>>(17)?
            .and_then(|l| serde_json::from_str(&l).ok()),
        recording: r
            .get::<_, Option<String>>(18)?
            .and_then(|l| serde_json::from_str(&l).ok()),
        created_ms,
        transfer: r
            .get::<_, Option<String>>(19)?
            .and_then(|l| serde_json::from_str(&l).ok()),
        analysis: r
            .get::<_, Option<String>>(20)?
            .and_then(|l| serde_json::from_str(&l).ok()),
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
    /// Keys the carrier presses on answer (checked by the caller: `0-9 # * w`, ≤ 32).
    pub send_digits: Option<String>,
    /// What to do on a machine (`'hangup'`, `'voicemail'`), when `machine_detection` asked for
    /// more than recording `answered_by`.
    pub machine_action: Option<String>,
    /// Left on an answering machine after its beep (`machine_action = 'voicemail'`).
    pub voicemail_message: Option<String>,
}

/// Persists a queued outbound call: `Ok(Ok((call, true)))`. With an idempotency key already
/// used by this tenant, the original call is returned (`false`, same body) or a conflict raised
/// (different body). A new call is created only if `admit` (the tenant's call rate, kept by
/// the caller) lets it, so replays do not count; else `Ok(Err(RateLimited))`.
pub fn create_outbound(
    conn: &mut Connection,
    r: &OutboundRequest,
    admit: impl FnOnce() -> std::result::Result<(), RateLimited>,
) -> Result<Result<(Call, bool), RateLimited>> {
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
            return Ok(Ok((call, false)));
        }
    }
    if let Err(limited) = admit() {
        return Ok(Err(limited));
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
    if r.send_digits.is_some() || r.machine_action.is_some() {
        tx.execute(
            "UPDATE calls SET send_digits = ?1, machine_action = ?2, voicemail_message = ?3 \
             WHERE id = ?4",
            params![
                r.send_digits,
                r.machine_action,
                r.voicemail_message,
                id.as_str()
            ],
        )?;
    }
    add_event(
        &tx,
        id.as_str(),
        "status",
        &serde_json::json!({"status": "queued"}),
    )?;
    let call = get(&tx, Scope::All, id.as_str())?;
    tx.commit()?;
    Ok(Ok((call, true)))
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
    /// The call's own `record` choice.
    pub record: Option<bool>,
    pub send_digits: Option<String>,
    /// `hangup` or `voicemail` (what a machine report leads to).
    pub machine_action: Option<String>,
}

pub fn detail(conn: &Connection, id: &str) -> Result<CallDetail> {
    let call = get(conn, Scope::All, id)?;
    conn.query_row(
        "SELECT tenant_id, system_prompt, greeting, voice, max_duration_secs, machine_detection, \
         record, send_digits, machine_action FROM calls WHERE id = ?1",
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
                record: r.get(6)?,
                send_digits: r.get(7)?,
                machine_action: r.get(8)?,
            })
        },
    )
    .map_err(Into::into)
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

/// What a machine report on a call is judged against.
#[derive(Debug, Clone, Default)]
pub struct MachineFacts {
    /// `hangup` or `voicemail` (see [`OutboundRequest::machine_action`]).
    pub action: Option<String>,
    pub answered_by: Option<String>,
    pub voicemail_message: Option<String>,
}

pub fn machine_facts(conn: &Connection, id: &str) -> Result<MachineFacts> {
    Ok(conn
        .query_row(
            "SELECT machine_action, answered_by, voicemail_message FROM calls WHERE id = ?1",
            [id],
            |r| {
                Ok(MachineFacts {
                    action: r.get(0)?,
                    answered_by: r.get(1)?,
                    voicemail_message: r.get(2)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

/// What call `id` does when a machine answers (`None`: nothing, or no such call).
pub fn machine_action(conn: &Connection, id: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT machine_action FROM calls WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
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

//! Browser calls' records (SPEC §9): created `ringing` with `direction = 'web'` and a stream
//! token that the WebRTC leg presents once the call is wired, like a carrier's stream.

use rusqlite::{Connection, params};

use super::Result;
use super::calls::{self, Call, Scope};
use super::tenants;
use crate::domain::EngineKind;
use crate::domain::ids::CallId;
use crate::domain::timefmt::now_ms;

/// What creating a browser call came to.
pub enum WebCall {
    /// Over the server's or the tenant's concurrent-call cap.
    Full,
    Created(Box<Call>),
}

/// Creates a browser call for `tenant_id` if both call caps allow it, with its stream token;
/// one transaction.
pub fn create(
    conn: &mut Connection,
    tenant_id: i64,
    max_live: i64,
    default_engine: EngineKind,
    stream_token_hash: &[u8],
    max_duration_secs: Option<i64>,
) -> Result<WebCall> {
    let tx = conn.transaction()?;
    let tenant = tenants::get_by_id(&tx, tenant_id)?;
    let (live, per) = calls::live_counts(&tx)?;
    let tenant_live = per.get(&tenant_id).copied().unwrap_or(0);
    if live >= max_live
        || tenant
            .max_concurrent_calls
            .is_some_and(|m| tenant_live >= m as i64)
    {
        return Ok(WebCall::Full);
    }
    let engine = tenant
        .engine
        .as_deref()
        .and_then(EngineKind::parse)
        .unwrap_or(default_engine);
    let id = CallId::generate();
    let now = now_ms();
    tx.execute(
        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, status, engine, \
         max_duration_secs, created_at, updated_at) \
         VALUES (?1,?2,'web','web','browser','ringing',?3,?5,?4,?4)",
        params![
            id.as_str(),
            tenant_id,
            engine.as_str(),
            now,
            max_duration_secs
        ],
    )?;
    calls::add_event(
        &tx,
        id.as_str(),
        "status",
        &serde_json::json!({"status": "ringing"}),
    )?;
    calls::set_stream_token(&tx, id.as_str(), stream_token_hash)?;
    let call = calls::get(&tx, Scope::All, id.as_str())?;
    tx.commit()?;
    Ok(WebCall::Created(Box::new(call)))
}

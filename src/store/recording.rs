//! Recording settings (tenant and call) and each call's recording status (SPEC §8).

use rusqlite::{Connection, OptionalExtension, params};

use super::calls::Scope;
use super::{Result, StoreError};

/// Sets tenant `id`'s recording fields; `None` leaves a field alone, an empty notice clears it.
pub fn set_tenant(
    conn: &Connection,
    id: i64,
    record: Option<bool>,
    notice: Option<&str>,
) -> Result<()> {
    if let Some(r) = record {
        conn.execute(
            "UPDATE tenants SET record = ?1 WHERE id = ?2",
            params![r, id],
        )?;
    }
    if let Some(n) = notice {
        conn.execute(
            "UPDATE tenants SET recording_notice = ?1 WHERE id = ?2",
            params![(!n.is_empty()).then_some(n), id],
        )?;
    }
    Ok(())
}

/// The call's own `record` choice (`None`: the tenant's or the default applies).
pub fn set_call_record(conn: &Connection, id: &str, record: Option<bool>) -> Result<()> {
    conn.execute(
        "UPDATE calls SET record = ?1 WHERE id = ?2",
        params![record, id],
    )?;
    Ok(())
}

/// The call's and its tenant's `record` choices and the tenant's notice.
pub fn settings(
    conn: &Connection,
    id: &str,
) -> Result<(Option<bool>, Option<bool>, Option<String>)> {
    conn.query_row(
        "SELECT c.record, t.record, t.recording_notice FROM calls c \
         JOIN tenants t ON t.id = c.tenant_id WHERE c.id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()?
    .ok_or(StoreError::NotFound("call"))
}

/// How the call's recording ended (`{"status": "recorded"|"failed", …}`).
pub fn set_call_recording(conn: &Connection, id: &str, status: &serde_json::Value) -> Result<()> {
    conn.execute(
        "UPDATE calls SET recording = ?1 WHERE id = ?2",
        params![status.to_string(), id],
    )?;
    Ok(())
}

/// The recording status of a call the reader may see: `NotFound("call")` for a call that is
/// not there (or another tenant's), `Ok(None)` for a call without a recording.
pub fn call_recording(
    conn: &Connection,
    scope: Scope,
    id: &str,
) -> Result<Option<serde_json::Value>> {
    let row: Option<Option<String>> = conn
        .query_row(
            "SELECT recording FROM calls WHERE id = ?1 AND (?2 IS NULL OR tenant_id = ?2)",
            params![id, scope.tenant_id()],
            |r| r.get(0),
        )
        .optional()?;
    match row {
        None => Err(StoreError::NotFound("call")),
        Some(v) => Ok(v.and_then(|s| serde_json::from_str(&s).ok())),
    }
}

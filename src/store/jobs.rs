//! The durable work queue: jobs survive restarts and are retried with backoff. Kinds:
//! `webhook` (tenant call-ended webhook), `ultravox_transcript` (fetch a finished Ultravox
//! call's transcript), `reconcile` (ask Twilio how a call ended when no callback will say).

use rusqlite::{Connection, OptionalExtension, params};

use super::Result;
use crate::timefmt::now_ms;

#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub call_id: Option<String>,
    pub tenant_id: Option<i64>,
    pub dedupe_key: Option<String>,
    pub attempts: i64,
}

/// Adds a job unless one with the same `dedupe_key` exists (so an event is queued once).
pub fn enqueue(
    conn: &Connection,
    kind: &str,
    call_id: Option<&str>,
    tenant_id: Option<i64>,
    dedupe_key: &str,
    run_at: i64,
) -> Result<()> {
    let now = now_ms();
    conn.execute(
        "INSERT OR IGNORE INTO jobs (kind, call_id, tenant_id, dedupe_key, run_at, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        params![kind, call_id, tenant_id, dedupe_key, run_at, now],
    )?;
    Ok(())
}

pub fn next_due(conn: &Connection) -> Result<Option<Job>> {
    Ok(conn
        .query_row(
            "SELECT id, kind, call_id, tenant_id, dedupe_key, attempts FROM jobs \
             WHERE state = 'pending' AND run_at <= ?1 ORDER BY run_at, id LIMIT 1",
            [now_ms()],
            |r| {
                Ok(Job {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    call_id: r.get(2)?,
                    tenant_id: r.get(3)?,
                    dedupe_key: r.get(4)?,
                    attempts: r.get(5)?,
                })
            },
        )
        .optional()?)
}

/// When the earliest pending job is due (to sleep exactly that long).
pub fn next_run_at(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn.query_row(
        "SELECT MIN(run_at) FROM jobs WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?)
}

pub fn done(conn: &Connection, id: i64) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET state = 'done', attempts = attempts + 1, last_error = NULL, updated_at = ?1 WHERE id = ?2",
        params![now_ms(), id],
    )?;
    Ok(())
}

/// Schedules another attempt at `run_at`, or gives up (`dead`) when `run_at` is `None`.
pub fn retry(conn: &Connection, id: i64, run_at: Option<i64>, error: &str) -> Result<()> {
    let now = now_ms();
    conn.execute(
        "UPDATE jobs SET state = ?1, run_at = ?2, attempts = attempts + 1, last_error = ?3, updated_at = ?4 WHERE id = ?5",
        params![if run_at.is_some() { "pending" } else { "dead" }, run_at.unwrap_or(now), error, now, id],
    )?;
    Ok(())
}

/// Re-runs a job later without counting an attempt (polling, not failing).
pub fn snooze(conn: &Connection, id: i64, run_at: i64) -> Result<()> {
    conn.execute(
        "UPDATE jobs SET run_at = ?1, updated_at = ?2 WHERE id = ?3",
        params![run_at, now_ms(), id],
    )?;
    Ok(())
}

pub fn pending_count(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM jobs WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?)
}

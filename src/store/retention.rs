//! Retention (SPEC §8): finished calls older than a cut-off go with their transcripts and
//! events (foreign keys cascade); recordings older than theirs are marked purged. Live calls
//! are never touched: only calls in a final state with an end time qualify.

use rusqlite::{Connection, params};

use super::Result;

/// Rows deleted per transaction, so a first purge of a long history never holds the writer
/// for long.
pub const BATCH: i64 = 500;

/// Deletes up to [`BATCH`] finished calls that ended before `cutoff_ms`; returns their ids
/// and whether each had a recording (its file is the caller's to delete).
pub fn purge_calls(conn: &mut Connection, cutoff_ms: i64) -> Result<Vec<(String, bool)>> {
    let tx = conn.transaction()?;
    let ids: Vec<(String, bool)> = {
        let mut st = tx.prepare(
            "SELECT id, recording IS NOT NULL FROM calls \
             WHERE ended_at IS NOT NULL AND ended_at < ?1 \
             AND status IN ('completed', 'busy', 'no_answer', 'failed', 'canceled') \
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.call_id = calls.id \
                             AND j.state IN ('pending', 'running')) \
             LIMIT ?2",
        )?;
        st.query_map(params![cutoff_ms, BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (id, _) in &ids {
        tx.execute("DELETE FROM calls WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(ids)
}

/// Up to [`BATCH`] recorded calls that ended before `cutoff_ms`; their recording is marked
/// `{"status": "purged"}` (the caller deletes the files).
pub fn purge_recordings(conn: &mut Connection, cutoff_ms: i64) -> Result<Vec<String>> {
    let tx = conn.transaction()?;
    let ids: Vec<String> = {
        let mut st = tx.prepare(
            "SELECT id FROM calls WHERE recording IS NOT NULL \
             AND json_extract(recording, '$.status') != 'purged' \
             AND ended_at IS NOT NULL AND ended_at < ?1 LIMIT ?2",
        )?;
        st.query_map(params![cutoff_ms, BATCH], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for id in &ids {
        tx.execute(
            "UPDATE calls SET recording = '{\"status\":\"purged\"}' WHERE id = ?1",
            [id],
        )?;
    }
    tx.commit()?;
    Ok(ids)
}

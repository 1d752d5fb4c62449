//! What was said on a call, in order.

use rusqlite::{Connection, params};
use serde::Serialize;

use super::{Scope, get};
use crate::store::Result;

#[derive(Debug, Clone, Serialize)]
pub struct TranscriptEntry {
    pub speaker: &'static str,
    pub text: String,
    pub at_ms: i64,
}

/// Replaces a call's whole transcript (a transcript fetched again must not duplicate lines).
pub fn replace_transcript(
    conn: &mut Connection,
    call_id: &str,
    entries: &[TranscriptEntry],
) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "DELETE FROM transcript_entries WHERE call_id = ?1",
        [call_id],
    )?;
    insert_entries(&tx, call_id, entries)?;
    tx.commit()?;
    Ok(())
}

fn insert_entries(conn: &Connection, call_id: &str, entries: &[TranscriptEntry]) -> Result<()> {
    let mut st = conn.prepare_cached(
        "INSERT INTO transcript_entries (call_id, speaker, text, at_ms) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for e in entries {
        st.execute(params![call_id, e.speaker, e.text, e.at_ms])?;
    }
    Ok(())
}

pub fn add_transcript(
    conn: &mut Connection,
    call_id: &str,
    entries: &[TranscriptEntry],
) -> Result<()> {
    let tx = conn.transaction()?;
    insert_entries(&tx, call_id, entries)?;
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

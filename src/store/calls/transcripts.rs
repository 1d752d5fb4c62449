//! What was said on a call, in order.

use rusqlite::{Connection, params};
use serde::Serialize;

use super::{Scope, get};
use crate::store::Result;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
                speaker: match speaker.as_str() {
                    "agent" => "agent",
                    "tool" => "tool",
                    _ => "caller",
                },
                text: r.get(1)?,
                at_ms: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::CallId;
    use crate::domain::{CallStatus, Direction};
    use crate::store::calls::{NewCall, insert, set_error};
    use crate::store::{tenants, tenants::TenantPatch, test_store};

    fn line(speaker: &'static str, text: &str, at_ms: i64) -> TranscriptEntry {
        TranscriptEntry {
            speaker,
            text: text.into(),
            at_ms,
        }
    }

    #[test]
    fn a_replaced_transcript_does_not_duplicate_lines() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                let t = tenants::create(
                    c,
                    TenantPatch {
                        name: Some("a".into()),
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
                        status: CallStatus::Completed,
                        engine: "ultravox".into(),
                        metadata: serde_json::json!({}),
                    },
                )?;
                let id = id.as_str();
                add_transcript(c, id, &[line("agent", "Hi", 1)])?;
                let fetched = [line("agent", "Hi", 1), line("caller", "Hello", 2)];
                replace_transcript(c, id, &fetched)?;
                replace_transcript(c, id, &fetched)?;
                let got: Vec<_> = transcript(c, Scope::All, id)?
                    .into_iter()
                    .map(|e| (e.speaker, e.text))
                    .collect();
                assert_eq!(
                    got,
                    vec![("agent", "Hi".to_owned()), ("caller", "Hello".to_owned())]
                );
                set_error(c, id, "first")?;
                set_error(c, id, "second")?;
                assert_eq!(get(c, Scope::All, id)?.error.as_deref(), Some("first"));
                Ok(())
            })
            .unwrap();
    }
}

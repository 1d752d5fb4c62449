//! The dial queue and the live set: what waits to be dialed, what occupies a line, what a
//! restart must recover.

use rusqlite::{Connection, params};

use super::add_event;
use super::records::{COLUMNS, from_row};
use super::{Call, Scope};
use crate::domain::CallStatus;
use crate::domain::timefmt::now_ms;
use crate::store::Result;

/// Queued calls, oldest first: the dialer's work list (id, tenant, created, from a campaign).
pub fn queued(conn: &Connection, limit: u32) -> Result<Vec<(String, i64, i64, bool)>> {
    let mut st = conn.prepare_cached(
        "SELECT id, tenant_id, created_at, campaign_id IS NOT NULL FROM calls \
         WHERE status = 'queued' ORDER BY created_at, id LIMIT ?1",
    )?;
    let out = st
        .query_map([limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
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

/// Calls waiting to be dialed, and calls occupying a line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenCounts {
    pub queued: i64,
    /// initiating, ringing or in progress.
    pub live: i64,
}

pub fn open_counts(conn: &Connection) -> Result<OpenCounts> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FILTER (WHERE status = 'queued'), \
         COUNT(*) FILTER (WHERE status IN ('initiating','ringing','in_progress')) \
         FROM calls WHERE status IN ('queued','initiating','ringing','in_progress')",
        [],
        |r| {
            Ok(OpenCounts {
                queued: r.get(0)?,
                live: r.get(1)?,
            })
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Direction;
    use crate::domain::ids::CallId;
    use crate::store::calls::{NewCall, insert};
    use crate::store::{tenants, tenants::TenantPatch, test_store};

    #[test]
    fn open_counts_split_waiting_from_live() {
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
                for status in [
                    CallStatus::Queued,
                    CallStatus::Queued,
                    CallStatus::Ringing,
                    CallStatus::InProgress,
                    CallStatus::Completed,
                ] {
                    insert(
                        c,
                        &NewCall {
                            id: CallId::generate(),
                            tenant_id: t.id,
                            direction: Direction::Outbound,
                            to: "+14155550100".into(),
                            from: "+14155550199".into(),
                            status,
                            engine: "scripted".into(),
                            metadata: serde_json::json!({}),
                        },
                    )?;
                }
                assert_eq!(open_counts(c)?, OpenCounts { queued: 2, live: 2 });
                assert_eq!(open_counts(c)?.queued, queued_count(c)?);
                assert_eq!(open_counts(c)?.live, live_counts(c)?.0);
                Ok(())
            })
            .unwrap();
    }
}

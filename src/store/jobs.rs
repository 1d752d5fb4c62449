//! The durable work queue: jobs survive restarts and are retried with backoff. Kinds:
//! `webhook` (tenant call-ended webhook), `ultravox_transcript` (fetch a finished Ultravox
//! call's transcript), `reconcile` (ask Twilio how a call ended when no callback will say).

use rusqlite::{Connection, OptionalExtension, params};

use super::Result;
pub use crate::domain::JobKind;
use crate::domain::timefmt::now_ms;

#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub call_id: Option<String>,
    pub tenant_id: Option<i64>,
    pub dedupe_key: Option<String>,
    pub attempts: i64,
}

/// A job to add: what [`enqueue`] takes, as one value a policy can return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub kind: JobKind,
    pub call_id: Option<String>,
    pub tenant_id: Option<i64>,
    /// At most one job per key ever exists, so an event is queued once however often asked.
    pub dedupe_key: String,
    pub run_at: i64,
}

/// Adds a job unless one with the same `dedupe_key` exists (so an event is queued once).
pub fn enqueue(
    conn: &Connection,
    kind: JobKind,
    call_id: Option<&str>,
    tenant_id: Option<i64>,
    dedupe_key: &str,
    run_at: i64,
) -> Result<()> {
    let now = now_ms();
    conn.execute(
        "INSERT OR IGNORE INTO jobs (kind, call_id, tenant_id, dedupe_key, run_at, created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        params![kind.as_str(), call_id, tenant_id, dedupe_key, run_at, now],
    )?;
    Ok(())
}

pub fn enqueue_job(conn: &Connection, job: &NewJob) -> Result<()> {
    enqueue(
        conn,
        job.kind,
        job.call_id.as_deref(),
        job.tenant_id,
        &job.dedupe_key,
        job.run_at,
    )
}

/// The next pending job that is due. A row of a kind this build does not know (written by a
/// newer voicectl, say) is marked dead on the way rather than blocking the queue.
pub fn next_due(conn: &Connection) -> Result<Option<Job>> {
    loop {
        let row = conn
            .query_row(
                "SELECT id, kind, call_id, tenant_id, dedupe_key, attempts FROM jobs \
                 WHERE state = 'pending' AND run_at <= ?1 ORDER BY run_at, id LIMIT 1",
                [now_ms()],
                |r| {
                    Ok((
                        r.get::<_, String>(1)?,
                        Job {
                            id: r.get(0)?,
                            kind: JobKind::Webhook,
                            call_id: r.get(2)?,
                            tenant_id: r.get(3)?,
                            dedupe_key: r.get(4)?,
                            attempts: r.get(5)?,
                        },
                    ))
                },
            )
            .optional()?;
        let Some((kind, job)) = row else {
            return Ok(None);
        };
        match JobKind::parse(&kind) {
            Some(kind) => return Ok(Some(Job { kind, ..job })),
            None => retry(conn, job.id, None, &format!("unknown job kind {kind:?}"))?,
        }
    }
}

/// Which worker runs a job: reconcile jobs (settling calls with the carrier) have their own,
/// so tenant webhooks and transcript fetches can never hold them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Reconcile,
    Other,
}

/// Claims up to `limit` due jobs of `lane`, oldest first but fairly: at most `left(tenant)`
/// per tenant (jobs without a tenant count as one). Each claimed job is leased until
/// `lease_until` (its `run_at` moves there), so it is not handed out twice and comes back by
/// itself if the process dies while running it. Unknown kinds are marked dead on the way.
pub fn claim_due(
    conn: &mut Connection,
    lane: Lane,
    limit: usize,
    lease_until: i64,
    mut left: impl FnMut(Option<i64>) -> usize,
) -> Result<Vec<Job>> {
    let tx = conn.transaction()?;
    let rows: Vec<(String, Job)> = {
        // The window keeps one busy tenant's backlog from filling the batch.
        let mut stmt = tx.prepare_cached(
            "SELECT id, kind, call_id, tenant_id, dedupe_key, attempts FROM (                SELECT *, ROW_NUMBER() OVER (PARTITION BY tenant_id ORDER BY run_at, id) AS rn                FROM jobs WHERE state = 'pending' AND run_at <= ?1 AND (kind = 'reconcile') = ?2              ) WHERE rn <= ?3 ORDER BY run_at, id LIMIT ?4",
        )?;
        let per_tenant = limit.max(1) as i64;
        stmt.query_map(
            params![
                now_ms(),
                lane == Lane::Reconcile,
                per_tenant,
                (limit.max(1) * 8) as i64
            ],
            |r| {
                Ok((
                    r.get::<_, String>(1)?,
                    Job {
                        id: r.get(0)?,
                        kind: JobKind::Webhook,
                        call_id: r.get(2)?,
                        tenant_id: r.get(3)?,
                        dedupe_key: r.get(4)?,
                        attempts: r.get(5)?,
                    },
                ))
            },
        )?
        .collect::<std::result::Result<_, _>>()?
    };
    let mut out = Vec::new();
    let mut taken: std::collections::HashMap<Option<i64>, usize> = Default::default();
    for (kind, job) in rows {
        if out.len() >= limit {
            break;
        }
        let Some(kind) = JobKind::parse(&kind) else {
            retry(&tx, job.id, None, &format!("unknown job kind {kind:?}"))?;
            continue;
        };
        let n = taken.entry(job.tenant_id).or_default();
        if *n >= left(job.tenant_id) {
            continue;
        }
        *n += 1;
        tx.execute(
            "UPDATE jobs SET run_at = ?1 WHERE id = ?2",
            params![lease_until, job.id],
        )?;
        out.push(Job { kind, ..job });
    }
    tx.commit()?;
    Ok(out)
}

/// When the earliest pending job of `lane` is due.
pub fn next_run_at_in(conn: &Connection, lane: Lane) -> Result<Option<i64>> {
    Ok(conn.query_row(
        "SELECT MIN(run_at) FROM jobs WHERE state = 'pending' AND (kind = 'reconcile') = ?1",
        [lane == Lane::Reconcile],
        |r| r.get(0),
    )?)
}

/// Moves the pending job `dedupe_key` earlier to `at` (never later); false when there is none.
pub fn run_by(conn: &Connection, dedupe_key: &str, at: i64) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE jobs SET run_at = MIN(run_at, ?1) WHERE dedupe_key = ?2 AND state = 'pending'",
        params![at, dedupe_key],
    )? > 0)
}

/// Moves a pending reconcile for `call_id` earlier to `at` (never later), or queues one.
pub fn reconcile_by(conn: &Connection, call_id: &str, at: i64) -> Result<()> {
    let key = reconcile_key(call_id);
    run_by(conn, &key, at)?;
    enqueue(conn, JobKind::Reconcile, Some(call_id), None, &key, at)
}

/// The dedupe key of a call's reconcile job: one per call.
pub fn reconcile_key(call_id: &str) -> String {
    format!("reconcile:{call_id}")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[test]
    fn claims_are_fair_per_tenant_leased_and_split_by_lane() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                for t in ["t1", "t2"] {
                    crate::store::tenants::create(
                        c,
                        crate::store::tenants::TenantPatch {
                            name: Some(t.into()),
                            ..Default::default()
                        },
                    )?;
                }
                // Tenant 1 has a backlog of 10, queued before tenant 2's single job.
                for i in 0..10 {
                    enqueue(c, JobKind::Webhook, None, Some(1), &format!("a{i}"), 1)?;
                }
                enqueue(c, JobKind::Webhook, None, Some(2), "b", 2)?;
                enqueue(c, JobKind::Reconcile, None, None, "reconcile:x", 0)?;
                let got = claim_due(c, Lane::Other, 4, now_ms() + 60_000, |_| 2)?;
                let tenants: Vec<_> = got.iter().map(|j| j.tenant_id).collect();
                assert_eq!(tenants, vec![Some(1), Some(1), Some(2)]);
                assert!(got.iter().all(|j| j.kind == JobKind::Webhook));
                // Leased: not handed out again.
                let again = claim_due(c, Lane::Other, 4, now_ms() + 60_000, |t| {
                    if t == Some(1) { 2 } else { 0 }
                })?;
                assert_eq!(again.len(), 2);
                assert!(again.iter().all(|j| !got.iter().any(|g| g.id == j.id)));
                let r = claim_due(c, Lane::Reconcile, 4, now_ms() + 60_000, |_| 4)?;
                assert_eq!(r.len(), 1);
                assert_eq!(r[0].kind, JobKind::Reconcile);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn kinds_are_typed_and_unknown_rows_do_not_block_the_queue() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                c.execute(
                    "INSERT INTO jobs (kind, dedupe_key, run_at, created_at, updated_at) \
                     VALUES ('from_the_future', 'x', 0, 0, 0)",
                    [],
                )?;
                enqueue(c, JobKind::Reconcile, None, None, "reconcile:a", 1)?;
                enqueue(c, JobKind::Reconcile, None, None, "reconcile:a", 1)?;
                let job = next_due(c)?.expect("the known job");
                assert_eq!(job.kind, JobKind::Reconcile);
                assert_eq!(job.dedupe_key.as_deref(), Some("reconcile:a"));
                let dead: String =
                    c.query_row("SELECT state FROM jobs WHERE dedupe_key = 'x'", [], |r| {
                        r.get(0)
                    })?;
                assert_eq!(dead, "dead");
                done(c, job.id)?;
                assert!(next_due(c)?.is_none());
                assert_eq!(pending_count(c)?, 0);
                Ok(())
            })
            .unwrap();
    }
}

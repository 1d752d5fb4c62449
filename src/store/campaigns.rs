//! Campaigns, their recipients and the per-tenant do-not-call list.
//!
//! The scheduler reads due recipients through the partial index on `next_attempt_at`, so its
//! cost per dial does not grow with the list. A recipient's `dialing` state and the call record
//! it will be dialed with commit in one transaction ([`start_attempt`]); the call's end moves
//! the recipient on inside the transaction that ends the call ([`on_call_status`], run by
//! `calls::state::transition_with`), so a crash can neither dial anyone twice for one attempt
//! nor forget them.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use super::{Result, StoreError};
use crate::domain::campaign::{CampaignStatus, Outcome, RecipientState, RetryPolicy};
use crate::domain::ids::{CallId, CampaignId};
use crate::domain::timefmt::{now_ms, rfc3339, rfc3339_opt};
use crate::domain::{CallStatus, JobKind};
use crate::store::jobs;

/// A campaign about to be stored (already validated).
#[derive(Debug, Clone)]
pub struct NewCampaign {
    pub id: CampaignId,
    pub tenant_id: i64,
    pub name: String,
    pub paused: bool,
    /// The agent settings: from, system_prompt, greeting, engine, voice, voicemail_message,
    /// machine_detection, metadata.
    pub settings: Value,
    /// Minutes after local midnight.
    pub hours_start: i64,
    pub hours_end: i64,
    /// Bit 0 = Monday … bit 6 = Sunday.
    pub days: i64,
    pub max_concurrent: i64,
    pub calls_per_second: f64,
    pub retry: RetryPolicy,
}

/// Counts per recipient state and the call figures of SPEC §7.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub total: i64,
    pub pending: i64,
    pub scheduled: i64,
    pub dialing: i64,
    pub in_call: i64,
    pub done: i64,
    pub failed: i64,
    pub suppressed: i64,
    pub canceled: i64,
    pub calls_placed: i64,
    pub answered: i64,
    pub voicemail: i64,
    pub eta: Option<String>,
}

impl Progress {
    fn set(&mut self, state: RecipientState, n: i64) {
        let slot = match state {
            RecipientState::Pending => &mut self.pending,
            RecipientState::Scheduled => &mut self.scheduled,
            RecipientState::Dialing => &mut self.dialing,
            RecipientState::InCall => &mut self.in_call,
            RecipientState::Done => &mut self.done,
            RecipientState::Failed => &mut self.failed,
            RecipientState::Suppressed => &mut self.suppressed,
            RecipientState::Canceled => &mut self.canceled,
        };
        *slot = n;
    }

    pub fn open(&self) -> i64 {
        self.pending + self.scheduled + self.dialing + self.in_call
    }
}

/// The campaign object of SPEC §7.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Campaign {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub status: CampaignStatus,
    /// The agent settings given at creation (`from`, `greeting`, …) sit at the top level.
    #[serde(flatten)]
    #[schema(ignore)]
    pub settings: Value,
    pub calling_hours: Value,
    pub days: Vec<&'static str>,
    pub max_concurrent: i64,
    pub calls_per_second: f64,
    pub retry: Value,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub progress: Progress,
    #[serde(skip)]
    pub tenant_id: i64,
}

pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn hhmm(min: i64) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

fn retry_json(p: &RetryPolicy) -> Value {
    let mut out = serde_json::Map::new();
    for o in crate::domain::campaign::RETRY_OUTCOMES {
        let r = p.rule(o);
        let after: Vec<String> = r
            .after_ms
            .iter()
            .map(|ms| {
                if ms % 3_600_000 == 0 {
                    format!("{}h", ms / 3_600_000)
                } else if ms % 60_000 == 0 {
                    format!("{}m", ms / 60_000)
                } else if ms % 1000 == 0 {
                    format!("{}s", ms / 1000)
                } else {
                    format!("{ms}ms")
                }
            })
            .collect();
        out.insert(
            o.into(),
            serde_json::json!({"attempts": r.attempts, "after": after}),
        );
    }
    Value::Object(out)
}

pub fn create(conn: &Connection, c: &NewCampaign) -> Result<Campaign> {
    let now = now_ms();
    let status = if c.paused {
        CampaignStatus::Paused
    } else {
        CampaignStatus::Running
    };
    conn.execute(
        "INSERT INTO campaigns (id, tenant_id, name, status, settings, hours_start, hours_end, days, \
         max_concurrent, calls_per_second, retry, created_at, updated_at) \
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?12)",
        params![
            c.id.as_str(),
            c.tenant_id,
            c.name,
            status.as_str(),
            c.settings.to_string(),
            c.hours_start,
            c.hours_end,
            c.days,
            c.max_concurrent,
            c.calls_per_second,
            serde_json::to_string(&c.retry).unwrap_or_else(|_| "{}".into()),
            now,
        ],
    )?;
    get(conn, None, c.id.as_str())
}

const COLUMNS: &str = "c.id, t.name, c.name, c.status, c.settings, c.hours_start, c.hours_end, \
    c.days, c.max_concurrent, c.calls_per_second, c.retry, c.created_at, c.completed_at, \
    c.calls_placed, c.answered, c.voicemail, c.tenant_id FROM campaigns c \
    JOIN tenants t ON t.id = c.tenant_id";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Campaign> {
    let status: String = r.get(3)?;
    let settings: String = r.get(4)?;
    let days: i64 = r.get(7)?;
    let retry: String = r.get(10)?;
    let retry: RetryPolicy = serde_json::from_str(&retry).unwrap_or_default();
    Ok(Campaign {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        status: CampaignStatus::parse(&status).unwrap_or(CampaignStatus::Canceled),
        settings: serde_json::from_str(&settings).unwrap_or(Value::Null),
        calling_hours: serde_json::json!({"start": hhmm(r.get(5)?), "end": hhmm(r.get(6)?)}),
        days: DAY_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| days & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect(),
        max_concurrent: r.get(8)?,
        calls_per_second: r.get(9)?,
        retry: retry_json(&retry),
        created_at: rfc3339(r.get(11)?),
        completed_at: rfc3339_opt(r.get(12)?),
        progress: Progress {
            calls_placed: r.get(13)?,
            answered: r.get(14)?,
            voicemail: r.get(15)?,
            ..Default::default()
        },
        tenant_id: r.get(16)?,
    })
}

/// Which campaigns a reader may see: one tenant's, or (`None`) all.
pub type Visible = Option<i64>;

/// One campaign with its progress; another tenant's campaign is "not found".
pub fn get(conn: &Connection, scope: Visible, id: &str) -> Result<Campaign> {
    let mut c = conn
        .query_row(
            &format!("SELECT {COLUMNS} WHERE c.id = ?1 AND (?2 IS NULL OR c.tenant_id = ?2)"),
            params![id, scope],
            from_row,
        )
        .optional()?
        .ok_or(StoreError::NotFound("campaign"))?;
    fill_progress(conn, &mut c)?;
    Ok(c)
}

pub fn list(conn: &Connection, scope: Visible) -> Result<Vec<Campaign>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} WHERE (?1 IS NULL OR c.tenant_id = ?1) \
         ORDER BY c.created_at DESC, c.id DESC LIMIT 500"
    ))?;
    let mut out: Vec<Campaign> = st
        .query_map(params![scope], from_row)?
        .collect::<rusqlite::Result<_>>()?;
    for c in &mut out {
        fill_progress(conn, c)?;
    }
    Ok(out)
}

/// Counts per state, from `campaign_counts` (kept by triggers in the same transactions as
/// the recipients' changes, so they always add up).
pub fn state_counts(conn: &Connection, id: &str) -> Result<HashMap<RecipientState, i64>> {
    let mut st =
        conn.prepare_cached("SELECT state, n FROM campaign_counts WHERE campaign_id = ?1")?;
    let mut out = HashMap::new();
    for row in st.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (s, n) = row?;
        if let Some(s) = RecipientState::parse(&s) {
            out.insert(s, n);
        }
    }
    Ok(out)
}

fn fill_progress(conn: &Connection, c: &mut Campaign) -> Result<()> {
    let counts = state_counts(conn, &c.id)?;
    for (s, n) in counts {
        c.progress.set(s, n);
        c.progress.total += n;
    }
    let open = c.progress.open();
    if c.status == CampaignStatus::Running && open > 0 {
        // Dials are limited by the pace and by concurrency (assuming about a minute a call).
        let per_sec = c
            .calls_per_second
            .min(c.max_concurrent as f64 / 60.0)
            .max(0.001);
        let secs = open as f64 / per_sec;
        // No sooner than the last waiting recipient's attempt (a retry hours away, a zone
        // whose window opens tomorrow); the partial due index answers this without a scan.
        let last_wait: Option<i64> = conn.query_row(
            "SELECT MAX(next_attempt_at) FROM campaign_recipients \
             WHERE campaign_id = ?1 AND state IN ('pending', 'scheduled')",
            [&c.id],
            |r| r.get(0),
        )?;
        let paced = now_ms() + (secs * 1000.0) as i64;
        let eta = last_wait.map_or(paced, |w| paced.max(w + 60_000));
        c.progress.eta = Some(rfc3339(eta));
    } else if c.status == CampaignStatus::Completed {
        c.progress.eta = c.completed_at.clone();
    }
    Ok(())
}

/// Pause, resume or cancel. Cancel marks every recipient not yet final `canceled` (live
/// calls go on; their recipients end `canceled` too unless they finish as done).
pub fn set_status(
    conn: &mut Connection,
    scope: Visible,
    id: &str,
    to: CampaignStatus,
) -> Result<Campaign> {
    let tx = conn.transaction()?;
    let current = get(&tx, scope, id)?;
    let allowed = match (current.status, to) {
        (CampaignStatus::Running, CampaignStatus::Paused) => true,
        (CampaignStatus::Paused, CampaignStatus::Running) => true,
        (CampaignStatus::Running | CampaignStatus::Paused, CampaignStatus::Canceled) => true,
        (a, b) => a == b,
    };
    if !allowed {
        return Err(StoreError::Conflict(format!(
            "campaign is {}; cannot become {}",
            current.status.as_str(),
            to.as_str()
        )));
    }
    let now = now_ms();
    tx.execute(
        "UPDATE campaigns SET status = ?1, updated_at = ?2, \
         completed_at = CASE WHEN ?1 = 'canceled' THEN ?2 ELSE completed_at END WHERE id = ?3",
        params![to.as_str(), now, id],
    )?;
    if to == CampaignStatus::Canceled {
        tx.execute(
            "UPDATE campaign_recipients SET state = 'canceled', next_attempt_at = NULL \
             WHERE campaign_id = ?1 AND state IN ('pending', 'scheduled')",
            [id],
        )?;
    }
    let out = get(&tx, scope, id)?;
    tx.commit()?;
    Ok(out)
}

/// One recipient to add; `vars` and `metadata` are JSON objects as text (a 300,000-row import
/// keeps them compact).
#[derive(Debug, Clone)]
pub struct NewRecipient {
    pub to: String,
    pub timezone: Option<String>,
    pub vars: String,
    pub metadata: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AddCounts {
    pub accepted: u64,
    pub duplicates: u64,
    pub suppressed: u64,
}

/// Adds recipients in one transaction with prepared statements (the caller chunks large
/// lists). Numbers on the tenant's DNC list are stored `suppressed`; numbers already in the
/// campaign are counted as duplicates. A completed campaign reopens.
pub fn add_recipients(
    conn: &mut Connection,
    campaign_id: &str,
    tenant_id: i64,
    rows: &[NewRecipient],
) -> Result<AddCounts> {
    let tx = conn.transaction()?;
    let mut counts = AddCounts::default();
    let now = now_ms();
    {
        let mut dnc =
            tx.prepare_cached("SELECT 1 FROM dnc WHERE tenant_id = ?1 AND number = ?2")?;
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO campaign_recipients \
             (campaign_id, to_number, timezone, vars, metadata, state, next_attempt_at, last_outcome) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for r in rows {
            let blocked = dnc.exists(params![tenant_id, r.to])?;
            let (state, next, outcome) = if blocked {
                ("suppressed", None, Some("dnc"))
            } else {
                ("pending", Some(now), None)
            };
            let n = ins.execute(params![
                campaign_id,
                r.to,
                r.timezone,
                r.vars,
                r.metadata,
                state,
                next,
                outcome
            ])?;
            if n == 0 {
                counts.duplicates += 1;
            } else if blocked {
                counts.suppressed += 1;
            } else {
                counts.accepted += 1;
            }
        }
    }
    if counts.accepted > 0 {
        tx.execute(
            "UPDATE campaigns SET status = 'running', completed_at = NULL, updated_at = ?2 \
             WHERE id = ?1 AND status = 'completed'",
            params![campaign_id, now],
        )?;
    }
    tx.commit()?;
    Ok(counts)
}

/// A campaign the scheduler works on.
#[derive(Debug, Clone)]
pub struct Running {
    pub id: String,
    pub tenant_id: i64,
    pub settings: Value,
    pub hours_start: i64,
    pub hours_end: i64,
    pub days: i64,
    pub max_concurrent: i64,
    pub calls_per_second: f64,
}

pub fn running(conn: &Connection) -> Result<Vec<Running>> {
    let mut st = conn.prepare_cached(
        "SELECT id, tenant_id, settings, hours_start, hours_end, days, max_concurrent, \
         calls_per_second FROM campaigns WHERE status = 'running' ORDER BY created_at, id",
    )?;
    let out = st
        .query_map([], |r| {
            let s: String = r.get(2)?;
            Ok(Running {
                id: r.get(0)?,
                tenant_id: r.get(1)?,
                settings: serde_json::from_str(&s).unwrap_or(Value::Null),
                hours_start: r.get(3)?,
                hours_end: r.get(4)?,
                days: r.get(5)?,
                max_concurrent: r.get(6)?,
                calls_per_second: r.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Recipients of `campaign_id` with a call under way (dialing or in a call).
pub fn inflight(conn: &Connection, campaign_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(SUM(n), 0) FROM campaign_counts WHERE campaign_id = ?1 \
             AND state IN ('dialing', 'in_call')",
        )?
        .query_row([campaign_id], |r| r.get(0))?)
}

/// A recipient whose next attempt is due.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: i64,
    pub to: String,
    pub timezone: Option<String>,
    pub vars: Value,
    pub metadata: Value,
}

/// Up to `limit` due recipients, earliest first, through `campaign_recipients_due`.
pub fn due(conn: &Connection, campaign_id: &str, now: i64, limit: u32) -> Result<Vec<Due>> {
    let mut st = conn.prepare_cached(
        "SELECT id, to_number, timezone, vars, metadata FROM campaign_recipients \
         WHERE campaign_id = ?1 AND state IN ('pending', 'scheduled') AND next_attempt_at <= ?2 \
         ORDER BY next_attempt_at LIMIT ?3",
    )?;
    let out = st
        .query_map(params![campaign_id, now, limit], |r| {
            let v: String = r.get(3)?;
            let m: String = r.get(4)?;
            Ok(Due {
                id: r.get(0)?,
                to: r.get(1)?,
                timezone: r.get(2)?,
                vars: serde_json::from_str(&v).unwrap_or(Value::Null),
                metadata: serde_json::from_str(&m).unwrap_or(Value::Null),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Outside its calling hours: waits (`scheduled`) until `at`.
pub fn reschedule(conn: &Connection, recipient_id: i64, at: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE campaign_recipients SET state = 'scheduled', next_attempt_at = ?2 \
         WHERE id = ?1 AND state IN ('pending', 'scheduled')",
    )?
    .execute(params![recipient_id, at])?;
    Ok(())
}

/// Ends a recipient before any call (no zone, no window): `failed` with `outcome`.
pub fn fail_before_dial(
    conn: &mut Connection,
    campaign_id: &str,
    recipient_id: i64,
    outcome: &str,
) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE campaign_recipients SET state = 'failed', next_attempt_at = NULL, last_outcome = ?2 \
         WHERE id = ?1 AND state IN ('pending', 'scheduled')",
        params![recipient_id, outcome],
    )?;
    maybe_complete(&tx, campaign_id)?;
    tx.commit()?;
    Ok(())
}

/// The call a due recipient is dialed with (templates already filled in).
#[derive(Debug, Clone)]
pub struct AttemptCall {
    pub from: String,
    pub engine: String,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub voice: Option<String>,
    pub machine_detection: bool,
    /// `hangup` or `voicemail` (see the calls table's `machine_action`).
    pub machine_action: Option<String>,
    /// The voicemail message, the recipient's variables filled in.
    pub voicemail_message: Option<String>,
    pub metadata: Value,
}

/// What [`start_attempt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// Call queued for the dialer.
    Queued(String),
    /// On the DNC list now: suppressed, no call.
    Suppressed,
    /// The recipient or campaign changed meanwhile (paused, canceled, already dialing).
    Skipped,
}

/// In one transaction: checks the campaign still runs and the recipient is still due, checks
/// DNC again, inserts the call (queued, for the one dialer) and marks the recipient `dialing`.
pub fn start_attempt(
    conn: &mut Connection,
    campaign_id: &str,
    tenant_id: i64,
    recipient_id: i64,
    call: &AttemptCall,
) -> Result<Started> {
    let tx = conn.transaction()?;
    let running: bool = tx
        .prepare_cached("SELECT status = 'running' FROM campaigns WHERE id = ?1")?
        .query_row([campaign_id], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    let to: Option<String> = tx
        .prepare_cached(
            "SELECT to_number FROM campaign_recipients WHERE id = ?1 AND campaign_id = ?2 \
             AND state IN ('pending', 'scheduled')",
        )?
        .query_row(params![recipient_id, campaign_id], |r| r.get(0))
        .optional()?;
    let (true, Some(to)) = (running, to) else {
        return Ok(Started::Skipped);
    };
    if tx
        .prepare_cached("SELECT 1 FROM dnc WHERE tenant_id = ?1 AND number = ?2")?
        .exists(params![tenant_id, to])?
    {
        tx.execute(
            "UPDATE campaign_recipients SET state = 'suppressed', next_attempt_at = NULL, \
             last_outcome = 'dnc' WHERE id = ?1",
            [recipient_id],
        )?;
        maybe_complete(&tx, campaign_id)?;
        tx.commit()?;
        return Ok(Started::Suppressed);
    }
    let id = CallId::generate();
    let now = now_ms();
    tx.prepare_cached(
        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, status, engine, \
         system_prompt, greeting, voice, machine_detection, metadata, campaign_id, recipient_id, \
         created_at, updated_at, machine_action, voicemail_message) \
         VALUES (?1,?2,'outbound',?3,?4,'queued',?5,?6,?7,?8,?9,?10,?11,?12,?13,?13,?14,?15)",
    )?
    .execute(params![
        id.as_str(),
        tenant_id,
        to,
        call.from,
        call.engine,
        call.system_prompt,
        call.greeting,
        call.voice,
        call.machine_detection,
        call.metadata.to_string(),
        campaign_id,
        recipient_id,
        now,
        call.machine_action,
        call.voicemail_message
    ])?;
    tx.prepare_cached(
        "UPDATE campaign_recipients SET state = 'dialing', attempts = attempts + 1, \
         next_attempt_at = NULL, last_call_id = ?2 WHERE id = ?1",
    )?
    .execute(params![recipient_id, id.as_str()])?;
    tx.prepare_cached("UPDATE campaigns SET calls_placed = calls_placed + 1 WHERE id = ?1")?
        .execute([campaign_id])?;
    tx.commit()?;
    Ok(Started::Queued(id.as_str().to_owned()))
}

/// Marks the campaign completed (and queues `campaign.completed`) once every recipient is
/// final. Runs inside the caller's transaction.
fn maybe_complete(tx: &Connection, campaign_id: &str) -> Result<()> {
    let open: bool = tx
        .prepare_cached(
            "SELECT COALESCE(SUM(n), 0) > 0 FROM campaign_counts WHERE campaign_id = ?1 \
             AND state IN ('pending', 'scheduled', 'dialing', 'in_call')",
        )?
        .query_row([campaign_id], |r| r.get(0))?;
    if open {
        return Ok(());
    }
    let now = now_ms();
    let n = tx.execute(
        "UPDATE campaigns SET status = 'completed', completed_at = ?2, updated_at = ?2 \
         WHERE id = ?1 AND status IN ('running', 'paused')",
        params![campaign_id, now],
    )?;
    if n == 1 {
        let (tenant_id, hook): (i64, bool) = tx.query_row(
            "SELECT c.tenant_id, t.webhook_url IS NOT NULL FROM campaigns c \
             JOIN tenants t ON t.id = c.tenant_id WHERE c.id = ?1",
            [campaign_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if hook {
            jobs::enqueue(
                tx,
                JobKind::CampaignCompleted,
                None,
                Some(tenant_id),
                &completed_key(campaign_id),
                now,
            )?;
        }
    }
    Ok(())
}

const COMPLETED_PREFIX: &str = "campaign.completed:";

/// The job key (and event id) of a campaign's completion.
pub fn completed_key(campaign_id: &str) -> String {
    format!("{COMPLETED_PREFIX}{campaign_id}")
}

/// The campaign id of a completion job's key.
pub fn campaign_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(COMPLETED_PREFIX)
}

/// A campaign call changed state: moves its recipient on. Runs inside the transaction that
/// changes the call (`calls::transition_with`, and the answer path's move to `in_progress`),
/// so both commit together.
pub fn on_call_status(tx: &Connection, call_id: &str, status: CallStatus) -> Result<()> {
    type Row = (
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<String>,
        bool,
    );
    let row: Option<Row> = tx
        .prepare_cached(
            "SELECT campaign_id, recipient_id, answered_by, error, twilio_call_sid IS NOT NULL \
             FROM calls WHERE id = ?1",
        )?
        .query_row([call_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((Some(campaign_id), Some(rid), answered_by, error, placed)) = row else {
        return Ok(());
    };
    if status == CallStatus::InProgress {
        tx.prepare_cached(
            "UPDATE campaign_recipients SET state = 'in_call' WHERE id = ?1 AND state = 'dialing' \
             AND last_call_id = ?2",
        )?
        .execute(params![rid, call_id])?;
        return Ok(());
    }
    if !status.is_terminal() {
        return Ok(());
    }
    let rec: Option<(String, String)> = tx
        .query_row(
            "SELECT state, tries FROM campaign_recipients WHERE id = ?1 AND last_call_id = ?2",
            params![rid, call_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((state, tries)) = rec else {
        return Ok(());
    };
    let current = RecipientState::parse(&state).unwrap_or(RecipientState::Failed);
    let (campaign_status, retry): (String, String) = tx.query_row(
        "SELECT status, retry FROM campaigns WHERE id = ?1",
        [&campaign_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let canceled = campaign_status == "canceled";
    let policy: RetryPolicy = serde_json::from_str(&retry).unwrap_or_default();
    let mut tries: HashMap<String, u32> = serde_json::from_str(&tries).unwrap_or_default();
    let outcome = Outcome::classify(status, answered_by.as_deref(), error.as_deref(), placed);
    let now = now_ms();
    let (next_state, next_at, attempts_delta) = match outcome {
        Outcome::Answered => {
            tx.execute(
                "UPDATE campaigns SET answered = answered + 1 WHERE id = ?1",
                [&campaign_id],
            )?;
            (RecipientState::Done, None, 0)
        }
        Outcome::Refused => (RecipientState::Failed, None, 0),
        // Never reached the carrier: this attempt does not count.
        Outcome::NotPlaced if canceled => (RecipientState::Canceled, None, -1),
        Outcome::NotPlaced => (RecipientState::Scheduled, Some(now + 60_000), -1),
        Outcome::Retryable(o) => {
            if o == "voicemail" {
                tx.execute(
                    "UPDATE campaigns SET voicemail = voicemail + 1 WHERE id = ?1",
                    [&campaign_id],
                )?;
            }
            let n = tries.entry(o.to_owned()).or_insert(0);
            *n += 1;
            match policy.next_delay_ms(o, *n) {
                Some(_) if canceled => (RecipientState::Canceled, None, 0),
                Some(d) => (RecipientState::Scheduled, Some(now + d), 0),
                None => (RecipientState::Failed, None, 0),
            }
        }
    };
    // A recipient canceled while its call ran keeps `canceled` unless the call reached a person.
    let next_state = if current == RecipientState::Canceled && next_state != RecipientState::Done {
        RecipientState::Canceled
    } else {
        next_state
    };
    tx.execute(
        "UPDATE campaign_recipients SET state = ?2, next_attempt_at = ?3, last_outcome = ?4, \
         tries = ?5, attempts = attempts + ?6 WHERE id = ?1",
        params![
            rid,
            next_state.as_str(),
            next_at,
            outcome.label(),
            serde_json::to_string(&tries).unwrap_or_else(|_| "{}".into()),
            attempts_delta
        ],
    )?;
    if next_state.is_final() {
        maybe_complete(tx, &campaign_id)?;
    }
    Ok(())
}

/// A recipient as `GET /campaigns/{id}/recipients` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Recipient {
    pub id: i64,
    pub to: String,
    pub timezone: Option<String>,
    pub vars: Value,
    pub state: RecipientState,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_outcome: Option<String>,
    pub last_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<i64>,
}

/// A page of recipients after `cursor` (a recipient id), optionally in one state.
pub fn recipients(
    conn: &Connection,
    campaign_id: &str,
    state: Option<RecipientState>,
    cursor: i64,
    limit: u32,
) -> Result<Vec<Recipient>> {
    let mut st = conn.prepare_cached(
        "SELECT r.id, r.to_number, r.timezone, r.vars, r.state, r.attempts, r.next_attempt_at, \
         r.last_outcome, r.last_call_id, c.answered_by, c.duration_seconds \
         FROM campaign_recipients r LEFT JOIN calls c ON c.id = r.last_call_id \
         WHERE r.campaign_id = ?1 AND r.id > ?2 AND (?3 IS NULL OR r.state = ?3) \
         ORDER BY r.id LIMIT ?4",
    )?;
    let out = st
        .query_map(
            params![campaign_id, cursor, state.map(|s| s.as_str()), limit],
            |r| {
                let vars: String = r.get(3)?;
                let state: String = r.get(4)?;
                Ok(Recipient {
                    id: r.get(0)?,
                    to: r.get(1)?,
                    timezone: r.get(2)?,
                    vars: serde_json::from_str(&vars).unwrap_or(Value::Null),
                    state: RecipientState::parse(&state).unwrap_or(RecipientState::Failed),
                    attempts: r.get(5)?,
                    next_attempt_at: rfc3339_opt(r.get(6)?),
                    last_outcome: r.get(7)?,
                    last_call_id: r.get(8)?,
                    answered_by: r.get(9)?,
                    duration_seconds: r.get(10)?,
                })
            },
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// The tenant's do-not-call list, sorted.
pub fn dnc_list(conn: &Connection, tenant_id: i64) -> Result<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT number FROM dnc WHERE tenant_id = ?1 ORDER BY number")?;
    let out = st
        .query_map([tenant_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Adds numbers (already valid E.164); returns how many were new. Open recipients with those
/// numbers in the tenant's campaigns are suppressed at their next dial check.
pub fn dnc_add(conn: &mut Connection, tenant_id: i64, numbers: &[String]) -> Result<usize> {
    let tx = conn.transaction()?;
    let mut added = 0;
    {
        let mut st = tx.prepare_cached(
            "INSERT OR IGNORE INTO dnc (tenant_id, number, created_at) VALUES (?1, ?2, ?3)",
        )?;
        let now = now_ms();
        for n in numbers {
            added += st.execute(params![tenant_id, n, now])?;
        }
    }
    tx.commit()?;
    Ok(added)
}

pub fn dnc_remove(conn: &Connection, tenant_id: i64, number: &str) -> Result<()> {
    let n = conn.execute(
        "DELETE FROM dnc WHERE tenant_id = ?1 AND number = ?2",
        params![tenant_id, number],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("number on the do-not-call list"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tenants::{self, TenantPatch};
    use crate::store::test_store;

    #[test]
    fn counts_follow_every_change_and_add_up() {
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
                let id = CampaignId::generate();
                create(
                    c,
                    &NewCampaign {
                        id: id.clone(),
                        tenant_id: t.id,
                        name: "x".into(),
                        paused: true,
                        settings: serde_json::json!({}),
                        hours_start: 480,
                        hours_end: 1260,
                        days: 0x7f,
                        max_concurrent: 5,
                        calls_per_second: 1.0,
                        retry: RetryPolicy::default(),
                    },
                )?;
                dnc_add(c, t.id, &["+14155550103".into()])?;
                let rows: Vec<NewRecipient> = [
                    "+14155550101",
                    "+14155550102",
                    "+14155550101",
                    "+14155550103",
                ]
                .iter()
                .map(|n| NewRecipient {
                    to: (*n).into(),
                    timezone: None,
                    vars: "{}".into(),
                    metadata: "{}".into(),
                })
                .collect();
                let added = add_recipients(c, id.as_str(), t.id, &rows)?;
                assert_eq!(
                    added,
                    AddCounts {
                        accepted: 2,
                        duplicates: 1,
                        suppressed: 1
                    }
                );
                let due = due(c, id.as_str(), i64::MAX, 10)?;
                reschedule(c, due[0].id, now_ms() + 1000)?;
                let g = get(c, Some(t.id), id.as_str())?;
                assert_eq!(
                    (
                        g.progress.pending,
                        g.progress.scheduled,
                        g.progress.suppressed,
                        g.progress.total
                    ),
                    (1, 1, 1, 3)
                );
                // The ETA is never before a waiting recipient's next attempt.
                let later = now_ms() + 7_200_000;
                reschedule(c, due[0].id, later)?;
                let g = set_status(c, None, id.as_str(), CampaignStatus::Running)?;
                let eta = g.progress.eta.clone().unwrap();
                assert!(eta > rfc3339(later), "{eta}");
                let g = set_status(c, None, id.as_str(), CampaignStatus::Canceled)?;
                assert_eq!((g.progress.canceled, g.progress.total), (2, 3));
                assert!(get(c, Some(t.id + 1), id.as_str()).is_err());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_campaign_call_moves_its_recipient_in_the_calls_own_transactions() {
        use crate::store::calls::{Transition, transition};
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
                let id = CampaignId::generate();
                let mut retry = RetryPolicy::default();
                retry.0.insert(
                    "busy".into(),
                    crate::domain::campaign::RetryRule {
                        attempts: 2,
                        after_ms: vec![1000],
                    },
                );
                create(
                    c,
                    &NewCampaign {
                        id: id.clone(),
                        tenant_id: t.id,
                        name: "x".into(),
                        paused: false,
                        settings: serde_json::json!({}),
                        hours_start: 480,
                        hours_end: 1260,
                        days: 0x7f,
                        max_concurrent: 5,
                        calls_per_second: 1.0,
                        retry,
                    },
                )?;
                let one = NewRecipient {
                    to: "+14155550101".into(),
                    timezone: None,
                    vars: "{}".into(),
                    metadata: "{}".into(),
                };
                add_recipients(c, id.as_str(), t.id, &[one])?;
                let call = AttemptCall {
                    from: "+14155550100".into(),
                    engine: "scripted".into(),
                    system_prompt: None,
                    greeting: None,
                    voice: None,
                    machine_detection: false,
                    machine_action: None,
                    voicemail_message: None,
                    metadata: serde_json::json!({}),
                };
                let state = |c: &Connection| -> Result<(String, Option<String>, i64)> {
                    Ok(c.query_row(
                        "SELECT state, last_outcome, attempts FROM campaign_recipients",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )?)
                };
                let dial = |c: &mut Connection| -> Result<String> {
                    let r = due(c, id.as_str(), i64::MAX, 1)?.remove(0);
                    match start_attempt(c, id.as_str(), t.id, r.id, &call)? {
                        Started::Queued(call_id) => Ok(call_id),
                        other => panic!("{other:?}"),
                    }
                };
                let first = dial(c)?;
                assert_eq!(state(c)?.0, "dialing");
                let to = |status| Transition {
                    status: Some(status),
                    ..Default::default()
                };
                transition(c, &first, &to(CallStatus::Busy))?;
                assert_eq!(state(c)?, ("scheduled".into(), Some("busy".into()), 1));
                let second = dial(c)?;
                transition(c, &second, &to(CallStatus::InProgress))?;
                assert_eq!(state(c)?.0, "in_call");
                transition(c, &second, &to(CallStatus::Completed))?;
                assert_eq!(state(c)?, ("done".into(), Some("answered".into()), 2));
                let g = get(c, None, id.as_str())?;
                assert_eq!(g.status, CampaignStatus::Completed);
                assert_eq!((g.progress.calls_placed, g.progress.answered), (2, 1));
                Ok(())
            })
            .unwrap();
    }
}

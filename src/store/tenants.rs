//! Tenants: one customer business each, with its agent persona, numbers, limits and webhook.
//! A tenant is addressed by its `name` (a stable slug) everywhere users see it.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::{Result, StoreError};
use crate::domain::analysis::AnalysisSpec;
use crate::domain::ids::random_token;
pub use crate::domain::tenant::{TenantPatch, TransferNumber};
use crate::domain::timefmt::{now_ms, rfc3339};

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Tenant {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub company: String,
    pub agent_name: String,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub voice: Option<String>,
    pub engine: Option<String>,
    pub from_number: Option<String>,
    pub numbers: Vec<String>,
    pub max_concurrent_calls: Option<u32>,
    pub calls_per_minute: Option<u32>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Record this tenant's calls (`None`: the server default).
    pub record: Option<bool>,
    /// Spoken first on recorded calls.
    pub recording_notice: Option<String>,
    pub transfer_numbers: Vec<TransferNumber>,
    /// `cold` or `warm`.
    pub transfer_mode: String,
    /// Answering-machine detection for this tenant's calls (`None`: the server default).
    pub machine_detection: Option<String>,
    /// Left on answering machines in `voicemail` mode.
    pub voicemail_message: Option<String>,
    /// Post-call analysis asked for (`None`: none).
    pub analysis: Option<AnalysisSpec>,
}

fn empty_to_none(v: Option<String>) -> Option<Option<String>> {
    v.map(|s| if s.is_empty() { None } else { Some(s) })
}

const COLUMNS: &str = "id, name, company, agent_name, system_prompt, greeting, voice, engine, \
     from_number, max_concurrent_calls, calls_per_minute, webhook_url, webhook_secret, \
     created_at, updated_at, record, recording_notice";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Tenant> {
    Ok(Tenant {
        id: r.get(0)?,
        name: r.get(1)?,
        company: r.get(2)?,
        agent_name: r.get(3)?,
        system_prompt: r.get(4)?,
        greeting: r.get(5)?,
        voice: r.get(6)?,
        engine: r.get(7)?,
        from_number: r.get(8)?,
        max_concurrent_calls: r.get(9)?,
        calls_per_minute: r.get(10)?,
        webhook_url: r.get(11)?,
        webhook_secret: r.get(12)?,
        created_at: rfc3339(r.get(13)?),
        updated_at: rfc3339(r.get(14)?),
        numbers: Vec::new(),
        record: r.get(15)?,
        recording_notice: r.get(16)?,
        transfer_numbers: Vec::new(),
        transfer_mode: "cold".into(),
        machine_detection: None,
        voicemail_message: None,
        analysis: None,
    })
}

fn load_numbers(conn: &Connection, t: &mut Tenant) -> Result<()> {
    let (list, mode, analysis): (Option<String>, Option<String>, Option<String>);
    (
        list,
        mode,
        t.machine_detection,
        t.voicemail_message,
        analysis,
    ) = conn.query_row(
        "SELECT transfer_numbers, transfer_mode, machine_detection, voicemail_message, analysis \
         FROM tenants WHERE id = ?1",
        [t.id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    t.analysis = analysis.and_then(|a| serde_json::from_str(&a).ok());
    t.transfer_numbers = list
        .and_then(|l| serde_json::from_str(&l).ok())
        .unwrap_or_default();
    t.transfer_mode = mode.unwrap_or_else(|| "cold".into());
    let mut st = conn
        .prepare_cached("SELECT number FROM tenant_numbers WHERE tenant_id = ?1 ORDER BY number")?;
    t.numbers = st
        .query_map([t.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

/// Claims `numbers` for tenant `id`, replacing what it had; a number owned by another tenant
/// is a conflict naming that tenant.
fn set_numbers(conn: &Connection, id: i64, numbers: &[String]) -> Result<()> {
    for n in numbers {
        let owner: Option<String> = conn
            .query_row(
                "SELECT t.name FROM tenant_numbers n JOIN tenants t ON t.id = n.tenant_id \
                 WHERE n.number = ?1 AND n.tenant_id != ?2",
                params![n, id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(owner) = owner {
            return Err(StoreError::Conflict(format!(
                "number {n} already belongs to tenant {owner:?}"
            )));
        }
    }
    conn.execute("DELETE FROM tenant_numbers WHERE tenant_id = ?1", [id])?;
    for n in numbers {
        conn.execute(
            "INSERT INTO tenant_numbers (number, tenant_id) VALUES (?1, ?2)",
            params![n, id],
        )?;
    }
    Ok(())
}

/// Sets the tenant's analysis (validated before; an empty spec removes it).
fn set_analysis(conn: &Connection, id: i64, spec: Option<AnalysisSpec>) -> Result<()> {
    let Some(spec) = spec else {
        return Ok(());
    };
    let json = if spec.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&spec).map_err(|e| StoreError::Task(format!("analysis: {e}")))?)
    };
    conn.execute(
        "UPDATE tenants SET analysis = ?1 WHERE id = ?2",
        params![json, id],
    )?;
    Ok(())
}

/// Sets what the patch says about answering machines (validated before; empty clears).
fn set_amd(
    conn: &Connection,
    id: i64,
    mode: Option<String>,
    message: Option<String>,
) -> Result<()> {
    for (col, v) in [
        ("machine_detection", empty_to_none(mode)),
        ("voicemail_message", empty_to_none(message)),
    ] {
        if let Some(v) = v {
            conn.execute(
                &format!("UPDATE tenants SET {col} = ?1 WHERE id = ?2"),
                params![v, id],
            )?;
        }
    }
    Ok(())
}

/// Sets what the patch says about transfers (validated before).
fn set_transfer(
    conn: &Connection,
    id: i64,
    numbers: Option<Vec<TransferNumber>>,
    mode: Option<String>,
) -> Result<()> {
    if let Some(list) = &numbers {
        let json = serde_json::to_string(list)
            .map_err(|e| StoreError::Task(format!("transfer numbers: {e}")))?;
        conn.execute(
            "UPDATE tenants SET transfer_numbers = ?1 WHERE id = ?2",
            params![json, id],
        )?;
    }
    if let Some(mode) = &mode {
        conn.execute(
            "UPDATE tenants SET transfer_mode = ?1 WHERE id = ?2",
            params![mode, id],
        )?;
    }
    Ok(())
}

/// Creates a tenant from a patch that passed [`TenantPatch::validate_create`].
pub fn create(conn: &mut Connection, p: TenantPatch) -> Result<Tenant> {
    let Some(name) = p.name.clone() else {
        // Validation (before the store) requires the name; without one there is nothing to
        // address the tenant by.
        return Err(StoreError::Conflict("a new tenant needs a name".into()));
    };
    let (transfer_numbers, transfer_mode) = (p.transfer_numbers.clone(), p.transfer_mode.clone());
    let (machine_detection, voicemail_message) =
        (p.machine_detection.clone(), p.voicemail_message.clone());
    let analysis = p.analysis.clone();
    let tx = conn.transaction()?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM tenants WHERE name = ?1)",
        [&name],
        |r| r.get(0),
    )?;
    if exists {
        return Err(StoreError::Conflict(format!(
            "tenant {name:?} already exists"
        )));
    }
    let now = now_ms();
    let webhook_url = empty_to_none(p.webhook_url).flatten();
    let webhook_secret = webhook_url.as_ref().map(|_| new_webhook_secret());
    tx.execute(
        "INSERT INTO tenants (name, company, agent_name, system_prompt, greeting, voice, engine, \
         from_number, max_concurrent_calls, calls_per_minute, webhook_url, webhook_secret, \
         created_at, updated_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?13)",
        params![
            name,
            p.company.unwrap_or_default(),
            p.agent_name.unwrap_or_default(),
            empty_to_none(p.system_prompt).flatten(),
            empty_to_none(p.greeting).flatten(),
            empty_to_none(p.voice).flatten(),
            empty_to_none(p.engine).flatten(),
            empty_to_none(p.from_number).flatten(),
            p.max_concurrent_calls,
            p.calls_per_minute,
            webhook_url,
            webhook_secret,
            now,
        ],
    )?;
    let id = tx.last_insert_rowid();
    set_numbers(&tx, id, p.numbers.as_deref().unwrap_or_default())?;
    super::recording::set_tenant(&tx, id, p.record, p.recording_notice.as_deref())?;
    set_transfer(&tx, id, transfer_numbers, transfer_mode)?;
    set_amd(&tx, id, machine_detection, voicemail_message)?;
    set_analysis(&tx, id, analysis)?;
    tx.commit()?;
    get(conn, &name)
}

fn new_webhook_secret() -> String {
    format!("whsec_{}", random_token(32))
}

pub fn get(conn: &Connection, name: &str) -> Result<Tenant> {
    let mut t = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM tenants WHERE name = ?1"),
            [name],
            from_row,
        )
        .optional()?
        .ok_or(StoreError::NotFound("tenant"))?;
    load_numbers(conn, &mut t)?;
    Ok(t)
}

pub fn get_by_id(conn: &Connection, id: i64) -> Result<Tenant> {
    let mut t = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM tenants WHERE id = ?1"),
            [id],
            from_row,
        )
        .optional()?
        .ok_or(StoreError::NotFound("tenant"))?;
    load_numbers(conn, &mut t)?;
    Ok(t)
}

pub fn list(conn: &Connection) -> Result<Vec<Tenant>> {
    let mut st = conn.prepare(&format!("SELECT {COLUMNS} FROM tenants ORDER BY name"))?;
    let mut out: Vec<Tenant> = st
        .query_map([], from_row)?
        .collect::<rusqlite::Result<_>>()?;
    for t in &mut out {
        load_numbers(conn, t)?;
    }
    Ok(out)
}

/// Changes tenant `name` with a patch that passed [`TenantPatch::validate_update`].
pub fn update(conn: &mut Connection, name: &str, p: TenantPatch) -> Result<Tenant> {
    let (transfer_numbers, transfer_mode) = (p.transfer_numbers.clone(), p.transfer_mode.clone());
    let (machine_detection, voicemail_message) =
        (p.machine_detection.clone(), p.voicemail_message.clone());
    let analysis = p.analysis.clone();
    let tx = conn.transaction()?;
    let current = get(&tx, name)?;
    let id = current.id;
    let set_text = |col: &str, v: Option<Option<String>>| -> Result<()> {
        if let Some(v) = v {
            tx.execute(
                &format!("UPDATE tenants SET {col} = ?1 WHERE id = ?2"),
                params![v, id],
            )?;
        }
        Ok(())
    };
    set_text("company", p.company.map(Some))?;
    set_text("agent_name", p.agent_name.map(Some))?;
    set_text("system_prompt", empty_to_none(p.system_prompt))?;
    set_text("greeting", empty_to_none(p.greeting))?;
    set_text("voice", empty_to_none(p.voice))?;
    set_text("engine", empty_to_none(p.engine))?;
    set_text("from_number", empty_to_none(p.from_number))?;
    if let Some(v) = p.max_concurrent_calls {
        tx.execute(
            "UPDATE tenants SET max_concurrent_calls = ?1 WHERE id = ?2",
            params![v, id],
        )?;
    }
    if let Some(v) = p.calls_per_minute {
        tx.execute(
            "UPDATE tenants SET calls_per_minute = ?1 WHERE id = ?2",
            params![v, id],
        )?;
    }
    if let Some(url) = empty_to_none(p.webhook_url) {
        // Keep the signing secret across URL changes; mint one when a webhook first appears.
        let secret = match (&url, current.webhook_secret) {
            (None, _) => None,
            (Some(_), Some(s)) => Some(s),
            (Some(_), None) => Some(new_webhook_secret()),
        };
        tx.execute(
            "UPDATE tenants SET webhook_url = ?1, webhook_secret = ?2 WHERE id = ?3",
            params![url, secret, id],
        )?;
    }
    if let Some(numbers) = &p.numbers {
        set_numbers(&tx, id, numbers)?;
    }
    super::recording::set_tenant(&tx, id, p.record, p.recording_notice.as_deref())?;
    set_transfer(&tx, id, transfer_numbers, transfer_mode)?;
    set_amd(&tx, id, machine_detection, voicemail_message)?;
    set_analysis(&tx, id, analysis)?;
    tx.execute(
        "UPDATE tenants SET updated_at = ?1 WHERE id = ?2",
        params![now_ms(), id],
    )?;
    tx.commit()?;
    get(conn, name)
}

/// Deletes a tenant with its numbers and keys. A tenant with call history is kept unless
/// `force` (then its calls, transcripts and events go too, in one transaction); a tenant with
/// live calls is never deleted.
pub fn delete(conn: &mut Connection, name: &str, force: bool) -> Result<()> {
    let tx = conn.transaction()?;
    let t = get(&tx, name)?;
    let (total, live): (i64, i64) = tx.query_row(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE status IN ('queued','initiating','ringing','in_progress')) \
         FROM calls WHERE tenant_id = ?1",
        [t.id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if live > 0 {
        return Err(StoreError::Conflict(format!(
            "tenant {name:?} has {live} live or queued call(s); end them first"
        )));
    }
    if total > 0 && !force {
        return Err(StoreError::Conflict(format!(
            "tenant {name:?} has {total} call(s) on record; delete with force to remove them too"
        )));
    }
    // ON DELETE CASCADE removes numbers, keys, calls and everything hanging off calls.
    tx.execute("DELETE FROM tenants WHERE id = ?1", [t.id])?;
    tx.commit()?;
    Ok(())
}

/// The tenant owning `number`, for inbound calls.
pub fn by_number(conn: &Connection, number: &str) -> Result<Option<Tenant>> {
    let id: Option<i64> = conn
        .query_row(
            "SELECT tenant_id FROM tenant_numbers WHERE number = ?1",
            [number],
            |r| r.get(0),
        )
        .optional()?;
    id.map(|id| get_by_id(conn, id)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Invalid;
    use crate::store::test_store;

    fn patch(name: &str) -> TenantPatch {
        TenantPatch {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn create_get_update_delete() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                let mut p = patch("acme");
                p.company = Some("Acme Corp".into());
                p.numbers = Some(vec!["+14155550100".into()]);
                p.webhook_url = Some("https://hooks.example.com/x".into());
                let t = create(c, p)?;
                assert_eq!(t.numbers, vec!["+14155550100"]);
                assert!(t.webhook_secret.as_deref().unwrap().starts_with("whsec_"));
                let u = update(
                    c,
                    "acme",
                    TenantPatch {
                        greeting: Some("Hi".into()),
                        numbers: Some(vec!["+14155550101".into()]),
                        ..Default::default()
                    },
                )?;
                assert_eq!(u.greeting.as_deref(), Some("Hi"));
                assert_eq!(u.numbers, vec!["+14155550101"]);
                assert_eq!(u.webhook_secret, t.webhook_secret, "secret kept");
                let u = update(
                    c,
                    "acme",
                    TenantPatch {
                        greeting: Some(String::new()),
                        ..Default::default()
                    },
                )?;
                assert_eq!(u.greeting, None, "empty string clears an override");
                assert_eq!(by_number(c, "+14155550101")?.unwrap().name, "acme");
                delete(c, "acme", false)?;
                assert!(matches!(get(c, "acme"), Err(StoreError::NotFound(_))));
                let n: i64 =
                    c.query_row("SELECT COUNT(*) FROM tenant_numbers", [], |r| r.get(0))?;
                assert_eq!(n, 0);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn bad_input_changes_nothing() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                let mut p = patch("a");
                p.numbers = Some(vec!["+14155550100".into()]);
                create(c, p)?;
                for (p, field) in [
                    (patch("Bad Name"), "name"),
                    (patch("-x"), "name"),
                    (
                        TenantPatch {
                            name: Some("b".into()),
                            numbers: Some(vec!["555".into()]),
                            ..Default::default()
                        },
                        "numbers",
                    ),
                    (
                        TenantPatch {
                            name: Some("b".into()),
                            engine: Some("gpt".into()),
                            ..Default::default()
                        },
                        "engine",
                    ),
                    (
                        TenantPatch {
                            name: Some("b".into()),
                            webhook_url: Some("ftp://x".into()),
                            ..Default::default()
                        },
                        "webhook_url",
                    ),
                    (
                        TenantPatch {
                            name: Some("b".into()),
                            max_concurrent_calls: Some(0),
                            ..Default::default()
                        },
                        "max_concurrent_calls",
                    ),
                ] {
                    // Validation runs before the store; a refused patch never reaches it.
                    match p.validate_create() {
                        Err(Invalid { field: f, .. }) => assert_eq!(f, field),
                        other => panic!("{field}: {other:?}"),
                    }
                }
                assert!(matches!(
                    create(c, patch("a")),
                    Err(StoreError::Conflict(_))
                ));
                let mut dup = patch("b");
                dup.numbers = Some(vec!["+14155550100".into()]);
                match create(c, dup) {
                    Err(StoreError::Conflict(m)) => assert!(m.contains("\"a\""), "{m}"),
                    other => panic!("{other:?}"),
                }
                let n: i64 = c.query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))?;
                assert_eq!(n, 1, "failed creates left no rows");
                Ok(())
            })
            .unwrap();
    }
}

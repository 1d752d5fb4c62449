//! Public browser-call links (SPEC §9): `/talk/<token>` lets anyone talk to a tenant's agent.
//! Only the token's hash is kept; a link is found by the hash of the token presented.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Result, StoreError};
use crate::domain::ids::{random_token, token_hash};
use crate::domain::timefmt::{now_ms, rfc3339, rfc3339_opt};

/// A link as its tenant sees it (never the token, which is shown once).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WebLink {
    pub id: String,
    pub name: String,
    /// The longest call through the link, in seconds (`None`: the server's maximum).
    pub max_duration_seconds: Option<i64>,
    pub expires_at: Option<String>,
    pub created_at: String,
}

/// What a presented token opens.
#[derive(Debug, Clone)]
pub struct Opened {
    pub link_id: String,
    pub tenant_id: i64,
    pub max_duration_secs: Option<i64>,
}

/// Creates a link; returns it and its token (shown once).
pub fn create(
    conn: &Connection,
    tenant_id: i64,
    name: &str,
    max_duration_secs: Option<i64>,
    expires_at: Option<i64>,
) -> Result<(WebLink, String)> {
    let id = format!("wl_{}", random_token(16));
    let token = format!("tk_{}", random_token(32));
    let now = now_ms();
    conn.execute(
        "INSERT INTO web_links (id, tenant_id, name, token_hash, max_duration_secs, expires_at, \
         created_at) VALUES (?1,?2,?3,?4,?5,?6,?7)",
        params![
            id,
            tenant_id,
            name,
            token_hash(&token).as_slice(),
            max_duration_secs,
            expires_at,
            now
        ],
    )?;
    let link = WebLink {
        id,
        name: name.to_owned(),
        max_duration_seconds: max_duration_secs,
        expires_at: rfc3339_opt(expires_at),
        created_at: rfc3339(now),
    };
    Ok((link, token))
}

pub fn list(conn: &Connection, tenant_id: i64) -> Result<Vec<WebLink>> {
    let mut st = conn.prepare_cached(
        "SELECT id, name, max_duration_secs, expires_at, created_at FROM web_links \
         WHERE tenant_id = ?1 ORDER BY created_at, id",
    )?;
    let rows = st.query_map([tenant_id], |r| {
        Ok(WebLink {
            id: r.get(0)?,
            name: r.get(1)?,
            max_duration_seconds: r.get(2)?,
            expires_at: rfc3339_opt(r.get(3)?),
            created_at: rfc3339(r.get(4)?),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes tenant `tenant_id`'s link `id` (another tenant's is not found).
pub fn delete(conn: &Connection, tenant_id: i64, id: &str) -> Result<()> {
    let n = conn.execute(
        "DELETE FROM web_links WHERE id = ?1 AND tenant_id = ?2",
        params![id, tenant_id],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("web link"));
    }
    Ok(())
}

/// The link `token` opens now (`None`: unknown, deleted or expired).
pub fn open(conn: &Connection, token: &str) -> Result<Option<Opened>> {
    Ok(conn
        .query_row(
            "SELECT id, tenant_id, max_duration_secs FROM web_links WHERE token_hash = ?1 \
             AND (expires_at IS NULL OR expires_at > ?2)",
            params![token_hash(token).as_slice(), now_ms()],
            |r| {
                Ok(Opened {
                    link_id: r.get(0)?,
                    tenant_id: r.get(1)?,
                    max_duration_secs: r.get(2)?,
                })
            },
        )
        .optional()?)
}

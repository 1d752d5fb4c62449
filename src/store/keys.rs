//! API keys: admin (global) and tenant-scoped. Only the SHA-256 of the secret is stored.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;

use super::{Result, StoreError, tenants};
use crate::domain::apikey as auth;
use crate::domain::ids::KeyId;
use crate::domain::timefmt::{now_ms, rfc3339, rfc3339_opt};

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin {
        key_id: KeyId,
    },
    Tenant {
        key_id: KeyId,
        tenant_id: i64,
        tenant: String,
    },
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: Option<String>,
    pub admin: bool,
    pub name: String,
    pub status: &'static str,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// A key just created: its record, and the full secret, shown once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: KeyInfo,
    pub key: String,
}

const COLUMNS: &str = "k.id, t.name, k.is_admin, k.name, k.created_at, k.expires_at, \
     k.last_used_at, k.revoked_at FROM api_keys k LEFT JOIN tenants t ON t.id = k.tenant_id";

fn from_row(r: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    let expires_at: Option<i64> = r.get(5)?;
    let revoked_at: Option<i64> = r.get(7)?;
    let status = if revoked_at.is_some() {
        "revoked"
    } else if expires_at.is_some_and(|e| e <= now_ms()) {
        "expired"
    } else {
        "active"
    };
    Ok(KeyInfo {
        id: r.get(0)?,
        tenant: r.get(1)?,
        admin: r.get(2)?,
        name: r.get(3)?,
        status,
        created_at: rfc3339(r.get(4)?),
        expires_at: rfc3339_opt(expires_at),
        last_used_at: rfc3339_opt(r.get(6)?),
        revoked_at: rfc3339_opt(revoked_at),
    })
}

fn get(conn: &Connection, id: &str) -> Result<KeyInfo> {
    conn.query_row(&format!("SELECT {COLUMNS} WHERE k.id = ?1"), [id], from_row)
        .optional()?
        .ok_or(StoreError::NotFound("api key"))
}

/// Creates a key for `tenant` (by name), or an admin key when `tenant` is `None`. The label
/// and expiry passed [`crate::domain::tenant::validate_key`] first.
pub fn create(
    conn: &mut Connection,
    tenant: Option<&str>,
    name: &str,
    expires_at: Option<i64>,
) -> Result<CreatedKey> {
    let tenant_id = tenant
        .map(|t| tenants::get(conn, t).map(|t| t.id))
        .transpose()?;
    let key = auth::mint();
    conn.execute(
        "INSERT INTO api_keys (id, tenant_id, is_admin, name, secret_hash, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            key.id.as_str(),
            tenant_id,
            tenant_id.is_none(),
            name,
            &key.hash[..],
            now_ms(),
            expires_at
        ],
    )?;
    Ok(CreatedKey {
        info: get(conn, key.id.as_str())?,
        key: key.full,
    })
}

pub fn list(conn: &Connection, tenant: Option<&str>) -> Result<Vec<KeyInfo>> {
    let tenant_id = tenant
        .map(|t| tenants::get(conn, t).map(|t| t.id))
        .transpose()?;
    let mut st = conn.prepare(&format!(
        "SELECT {COLUMNS} WHERE (?1 IS NULL OR k.tenant_id = ?1) ORDER BY k.created_at, k.id"
    ))?;
    let out = st
        .query_map([tenant_id], from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(out)
}

/// Revokes a key; revoking twice is harmless. Returns the key as it now is.
pub fn revoke(conn: &Connection, id: &str) -> Result<KeyInfo> {
    let n = conn.execute(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2",
        params![now_ms(), id],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("api key"));
    }
    get(conn, id)
}

pub fn admin_key_count(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM api_keys WHERE is_admin = 1 AND revoked_at IS NULL",
        [],
        |r| r.get(0),
    )?)
}

/// Checks a presented key. `None` for anything unknown, malformed, revoked or expired: the
/// caller answers all of those with the same 401 so nothing is learned by probing.
pub fn authenticate(conn: &Connection, presented: &str) -> Result<Option<Principal>> {
    let Some((id, secret)) = auth::parse(presented) else {
        return Ok(None);
    };
    let row = conn
        .query_row(
            "SELECT k.secret_hash, k.is_admin, k.tenant_id, t.name, k.expires_at, k.revoked_at, \
             k.last_used_at FROM api_keys k LEFT JOIN tenants t ON t.id = k.tenant_id WHERE k.id = ?1",
            [id.as_str()],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            },
        )
        .optional()?;
    let Some((hash, is_admin, tenant_id, tenant, expires_at, revoked_at, last_used)) = row else {
        // Still spend a hash so unknown ids cost what known ones do.
        let _ = auth::secret_matches(secret, &[0u8; 32]);
        return Ok(None);
    };
    let now = now_ms();
    if !auth::secret_matches(secret, &hash)
        || revoked_at.is_some()
        || expires_at.is_some_and(|e| e <= now)
    {
        return Ok(None);
    }
    // Record use at minute resolution, not once per request.
    if last_used.is_none_or(|t| now - t > 60_000) {
        conn.execute(
            "UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2",
            params![now, id.as_str()],
        )?;
    }
    // Fail closed: admin only for a row that says admin and names no tenant; a tenant key
    // whose tenant row is gone (deleted with foreign keys off) or any other mix is no one.
    Ok(match (is_admin, tenant_id, tenant) {
        (false, Some(tenant_id), Some(tenant)) => Some(Principal::Tenant {
            key_id: id,
            tenant_id,
            tenant,
        }),
        (true, None, _) => Some(Principal::Admin { key_id: id }),
        _ => {
            tracing::warn!(key_id = %id, "API key refused: its tenant no longer exists");
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tenant::validate_key;
    use crate::store::{tenants::TenantPatch, test_store};

    #[test]
    fn a_key_whose_tenant_row_is_gone_is_no_one_not_admin() {
        let (d, store) = test_store();
        let (tenant_key, admin_key) = store
            .blocking(|c| {
                tenants::create(
                    c,
                    TenantPatch {
                        name: Some("acme".into()),
                        ..Default::default()
                    },
                )?;
                Ok((
                    create(c, Some("acme"), "ci", None)?.key,
                    create(c, None, "admin", None)?.key,
                ))
            })
            .unwrap();
        // What an operator can do from the sqlite3 shell: foreign keys are off by default
        // there, so the tenant goes and its keys stay.
        let shell = Connection::open(d.path().join("data").join(crate::store::DB_FILE)).unwrap();
        shell
            .execute_batch("PRAGMA foreign_keys = OFF; DELETE FROM tenants WHERE name = 'acme';")
            .unwrap();
        drop(shell);
        store
            .blocking(move |c| {
                assert_eq!(
                    authenticate(c, &tenant_key)?,
                    None,
                    "orphaned key is refused"
                );
                assert!(matches!(
                    authenticate(c, &admin_key)?,
                    Some(Principal::Admin { .. })
                ));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn keys_authenticate_until_revoked_or_expired() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                tenants::create(
                    c,
                    TenantPatch {
                        name: Some("acme".into()),
                        ..Default::default()
                    },
                )?;
                let k = create(c, Some("acme"), "ci", None)?;
                assert_eq!(k.info.status, "active");
                let p = authenticate(c, &k.key)?.expect("valid key");
                assert!(matches!(p, Principal::Tenant { ref tenant, .. } if tenant == "acme"));
                // Right id, wrong secret.
                let last = if k.key.ends_with('x') { 'y' } else { 'x' };
                let forged = format!("{}{last}", &k.key[..k.key.len() - 1]);
                assert_eq!(authenticate(c, &forged)?, None);
                revoke(c, &k.info.id)?;
                assert_eq!(authenticate(c, &k.key)?, None);
                assert_eq!(list(c, Some("acme"))?[0].status, "revoked");

                let admin = create(c, None, "admin", None)?;
                assert!(matches!(
                    authenticate(c, &admin.key)?,
                    Some(Principal::Admin { .. })
                ));

                let exp = create(c, Some("acme"), "short", Some(now_ms() + 60_000))?;
                assert!(authenticate(c, &exp.key)?.is_some());
                c.execute(
                    "UPDATE api_keys SET expires_at = ?1 WHERE id = ?2",
                    params![now_ms() - 1, exp.info.id],
                )?;
                assert_eq!(authenticate(c, &exp.key)?, None);
                assert!(validate_key("past", Some(now_ms() - 1)).is_err());
                assert!(matches!(
                    create(c, Some("nobody"), "x", None),
                    Err(StoreError::NotFound(_))
                ));
                Ok(())
            })
            .unwrap();
    }
}

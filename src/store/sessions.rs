//! Dashboard logins: one-time login tokens (`voicectl open`) and browser sessions. Both look
//! like API keys (`vl_<id>_<secret>`, `vs_<id>_<secret>`): the id finds the row, only the
//! SHA-256 of the secret is stored, and the comparison is constant-time. A session acts as the
//! admin or as one tenant, exactly like that principal's API key.

use rusqlite::{Connection, OptionalExtension, params};

use super::keys::Principal;
use super::{Result, tenants};
use crate::domain::apikey::{hash_secret, secret_matches};
use crate::domain::ids::{KeyId, random_token};
use crate::domain::timefmt::now_ms;

/// How long a `voicectl open` URL stays valid.
pub const LOGIN_TTL_MS: i64 = 10 * 60 * 1000;
/// How long a browser session lasts (no sliding renewal: a stolen cookie dies on schedule).
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

const SECRET_LEN: usize = 32;
const LOGIN_PREFIX: &str = "vl_";
const SESSION_PREFIX: &str = "vs_";

/// A session just opened: the cookie value (shown to the browser once) and who it acts as.
#[derive(Debug)]
pub struct NewSession {
    pub cookie: String,
    pub principal: Principal,
    pub expires_at: i64,
}

fn mint(prefix: &str) -> (KeyId, String, [u8; 32]) {
    let id = KeyId::generate();
    let secret = random_token(SECRET_LEN);
    let hash = hash_secret(&secret);
    (id.clone(), format!("{prefix}{id}_{secret}"), hash)
}

fn parse<'a>(prefix: &str, presented: &'a str) -> Option<(KeyId, &'a str)> {
    let (id, secret) = presented.strip_prefix(prefix)?.split_once('_')?;
    let id = KeyId::parse(id)?;
    (secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some((id, secret))
}

/// Drops rows that can never be used again, so the table stays the size of the live set.
fn prune(conn: &Connection, now: i64) -> Result<()> {
    conn.execute(
        "DELETE FROM ui_sessions WHERE expires_at <= ?1",
        [now - 24 * 3600 * 1000],
    )?;
    Ok(())
}

/// Mints a one-time login token for the admin (`None`) or a tenant (by name): valid
/// [`LOGIN_TTL_MS`], single use. Returns the token and its expiry.
pub fn create_login(conn: &Connection, tenant: Option<&str>) -> Result<(String, i64)> {
    let tenant_id = tenant
        .map(|t| tenants::get(conn, t).map(|t| t.id))
        .transpose()?;
    let now = now_ms();
    prune(conn, now)?;
    let (id, token, hash) = mint(LOGIN_PREFIX);
    let expires_at = now + LOGIN_TTL_MS;
    conn.execute(
        "INSERT INTO ui_sessions (id, kind, tenant_id, secret_hash, created_at, expires_at) \
         VALUES (?1, 'login', ?2, ?3, ?4, ?5)",
        params![id.as_str(), tenant_id, &hash[..], now, expires_at],
    )?;
    Ok((token, expires_at))
}

fn insert_session(
    conn: &Connection,
    tenant_id: Option<i64>,
    key_id: Option<&str>,
    now: i64,
) -> Result<(KeyId, String, i64)> {
    let (id, cookie, hash) = mint(SESSION_PREFIX);
    let expires_at = now + SESSION_TTL_MS;
    conn.execute(
        "INSERT INTO ui_sessions (id, kind, tenant_id, key_id, secret_hash, created_at, expires_at) \
         VALUES (?1, 'session', ?2, ?3, ?4, ?5, ?6)",
        params![id.as_str(), tenant_id, key_id, &hash[..], now, expires_at],
    )?;
    Ok((id, cookie, expires_at))
}

fn principal(id: KeyId, tenant: Option<(i64, String)>) -> Principal {
    match tenant {
        Some((tenant_id, tenant)) => Principal::Tenant {
            key_id: id,
            tenant_id,
            tenant,
        },
        None => Principal::Admin { key_id: id },
    }
}

/// Spends a login token: `None` for anything unknown, malformed, expired or already used (the
/// caller answers all of them alike). The token is marked used and the session created in one
/// transaction, so two browsers racing on one URL cannot both get in.
pub fn redeem_login(conn: &mut Connection, token: &str) -> Result<Option<NewSession>> {
    let Some((id, secret)) = parse(LOGIN_PREFIX, token) else {
        return Ok(None);
    };
    let tx = conn.transaction()?;
    let row = tx
        .query_row(
            "SELECT s.secret_hash, s.expires_at, s.used_at, s.tenant_id, t.name \
             FROM ui_sessions s LEFT JOIN tenants t ON t.id = s.tenant_id \
             WHERE s.id = ?1 AND s.kind = 'login'",
            [id.as_str()],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            },
        )
        .optional()?;
    let Some((hash, expires_at, used_at, tenant_id, tenant)) = row else {
        let _ = secret_matches(secret, &[0u8; 32]);
        return Ok(None);
    };
    let now = now_ms();
    if !secret_matches(secret, &hash) || used_at.is_some() || expires_at <= now {
        return Ok(None);
    }
    tx.execute(
        "UPDATE ui_sessions SET used_at = ?1 WHERE id = ?2",
        params![now, id.as_str()],
    )?;
    let tenant = match (tenant_id, tenant) {
        (Some(tid), Some(name)) => Some((tid, name)),
        // The tenant was deleted after the token was minted (the cascade removes the row,
        // so this is only a guard).
        (Some(_), None) => return Ok(None),
        _ => None,
    };
    let (sid, cookie, expires_at) = insert_session(&tx, tenant_id, None, now)?;
    tx.commit()?;
    Ok(Some(NewSession {
        cookie,
        principal: principal(sid, tenant),
        expires_at,
    }))
}

/// Opens a session for a principal that proved itself with an API key. The session is tied to
/// the key: revoking or expiring the key ends it.
pub fn create_from_key(conn: &Connection, by: &Principal) -> Result<NewSession> {
    let now = now_ms();
    prune(conn, now)?;
    let (key_id, tenant) = match by {
        Principal::Admin { key_id } => (key_id, None),
        Principal::Tenant {
            key_id,
            tenant_id,
            tenant,
        } => (key_id, Some((*tenant_id, tenant.clone()))),
    };
    let (sid, cookie, expires_at) = insert_session(
        conn,
        tenant.as_ref().map(|t| t.0),
        Some(key_id.as_str()),
        now,
    )?;
    Ok(NewSession {
        cookie,
        principal: principal(sid, tenant),
        expires_at,
    })
}

/// Checks a session cookie. `None` for anything unknown, forged, expired or revoked, and for a
/// session whose API key has since been revoked or has expired.
pub fn authenticate(conn: &Connection, cookie: &str) -> Result<Option<Principal>> {
    let Some((id, secret)) = parse(SESSION_PREFIX, cookie) else {
        return Ok(None);
    };
    let row = conn
        .query_row(
            "SELECT s.secret_hash, s.expires_at, s.revoked_at, s.tenant_id, t.name, \
             s.key_id IS NULL OR (k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > ?2)) \
             FROM ui_sessions s LEFT JOIN tenants t ON t.id = s.tenant_id \
             LEFT JOIN api_keys k ON k.id = s.key_id \
             WHERE s.id = ?1 AND s.kind = 'session'",
            params![id.as_str(), now_ms()],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, bool>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((hash, expires_at, revoked_at, tenant_id, tenant, key_ok)) = row else {
        let _ = secret_matches(secret, &[0u8; 32]);
        return Ok(None);
    };
    if !secret_matches(secret, &hash) || revoked_at.is_some() || expires_at <= now_ms() || !key_ok {
        return Ok(None);
    }
    Ok(match (tenant_id, tenant) {
        (Some(tid), Some(name)) => Some(principal(id, Some((tid, name)))),
        (None, _) => Some(principal(id, None)),
        (Some(_), None) => None,
    })
}

/// Logs a session out. Only a cookie that authenticates can revoke itself; anything else is
/// ignored (logging out twice is harmless).
pub fn revoke(conn: &Connection, cookie: &str) -> Result<bool> {
    if authenticate(conn, cookie)?.is_none() {
        return Ok(false);
    }
    let Some((id, _)) = parse(SESSION_PREFIX, cookie) else {
        return Ok(false);
    };
    let n = conn.execute(
        "UPDATE ui_sessions SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2",
        params![now_ms(), id.as_str()],
    )?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys;
    use crate::store::{tenants::TenantPatch, test_store};

    #[test]
    fn login_tokens_are_single_use_and_expire() {
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
                let (tok, _) = create_login(c, Some("acme"))?;
                let s = redeem_login(c, &tok)?.expect("first use logs in");
                assert!(matches!(s.principal, Principal::Tenant { ref tenant, .. } if tenant == "acme"));
                assert!(authenticate(c, &s.cookie)?.is_some());
                assert!(redeem_login(c, &tok)?.is_none(), "reused token");

                let (tok, _) = create_login(c, None)?;
                c.execute(
                    "UPDATE ui_sessions SET expires_at = ?1 WHERE kind = 'login' AND used_at IS NULL",
                    [now_ms() - 1],
                )?;
                assert!(redeem_login(c, &tok)?.is_none(), "expired token");
                assert!(redeem_login(c, "vl_garbage")?.is_none());
                // A session cookie is not a login token, nor the other way round.
                assert!(redeem_login(c, &s.cookie)?.is_none());
                assert!(authenticate(c, &tok)?.is_none());
                assert!(matches!(
                    create_login(c, Some("nobody")),
                    Err(crate::store::StoreError::NotFound(_))
                ));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn sessions_end_on_logout_expiry_forgery_and_key_revocation() {
        let (_d, store) = test_store();
        store
            .blocking(|c| {
                let admin = keys::create(c, None, "admin", None)?;
                let p = keys::authenticate(c, &admin.key)?.expect("key");
                let s = create_from_key(c, &p)?;
                assert!(matches!(
                    authenticate(c, &s.cookie)?,
                    Some(Principal::Admin { .. })
                ));
                let last = if s.cookie.ends_with('x') { 'y' } else { 'x' };
                let forged = format!("{}{last}", &s.cookie[..s.cookie.len() - 1]);
                assert!(authenticate(c, &forged)?.is_none(), "forged cookie");
                assert!(
                    !revoke(c, &forged)?,
                    "a forged cookie cannot log anyone out"
                );
                assert!(authenticate(c, &s.cookie)?.is_some());

                keys::revoke(c, &admin.info.id)?;
                assert!(authenticate(c, &s.cookie)?.is_none(), "key revoked");

                let (tok, _) = create_login(c, None)?;
                let s = redeem_login(c, &tok)?.expect("login");
                assert!(revoke(c, &s.cookie)?);
                assert!(authenticate(c, &s.cookie)?.is_none(), "logged out");

                let (tok, _) = create_login(c, None)?;
                let s = redeem_login(c, &tok)?.expect("login");
                c.execute(
                    "UPDATE ui_sessions SET expires_at = ?1 WHERE kind = 'session'",
                    [now_ms() - 1],
                )?;
                assert!(authenticate(c, &s.cookie)?.is_none(), "expired session");
                Ok(())
            })
            .unwrap();
    }
}

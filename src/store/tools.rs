//! Tenant HTTP tools (SPEC §8), one row per tenant and name; the definition is stored as the
//! JSON the tenant sent, after [`crate::domain::tool::ToolDefinition::validate`].

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Result, StoreError};
use crate::domain::timefmt::{now_ms, rfc3339};
use crate::domain::tool::{MAX_PER_TENANT, ToolDefinition};

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Tool {
    pub name: String,
    /// The definition's fields (`ToolDefinition`) sit at the top level.
    #[serde(flatten)]
    #[schema(ignore)]
    pub definition: ToolDefinition,
    pub created_at: String,
    pub updated_at: String,
}

fn decode(name: String, json: &str, created: i64, updated: i64) -> rusqlite::Result<Tool> {
    let definition = serde_json::from_str(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Tool {
        name,
        definition,
        created_at: rfc3339(created),
        updated_at: rfc3339(updated),
    })
}

pub fn list(conn: &Connection, tenant_id: i64) -> Result<Vec<Tool>> {
    let mut st = conn.prepare_cached(
        "SELECT name, definition, created_at, updated_at FROM tools WHERE tenant_id = ?1 ORDER BY name",
    )?;
    let rows = st.query_map([tenant_id], |r| {
        decode(r.get(0)?, &r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn get(conn: &Connection, tenant_id: i64, name: &str) -> Result<Tool> {
    conn.query_row(
        "SELECT name, definition, created_at, updated_at FROM tools WHERE tenant_id = ?1 AND name = ?2",
        params![tenant_id, name],
        |r| decode(r.get(0)?, &r.get::<_, String>(1)?, r.get(2)?, r.get(3)?),
    )
    .optional()?
    .ok_or(StoreError::NotFound("tool"))
}

/// Creates or replaces tool `name`; `true` when it is new.
pub fn put(
    conn: &mut Connection,
    tenant_id: i64,
    name: &str,
    def: &ToolDefinition,
) -> Result<(Tool, bool)> {
    let json = serde_json::to_string(def)
        .map_err(|e| StoreError::Conflict(format!("tool definition: {e}")))?;
    let tx = conn.transaction()?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM tools WHERE tenant_id = ?1 AND name = ?2)",
        params![tenant_id, name],
        |r| r.get(0),
    )?;
    if !exists {
        let count: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tools WHERE tenant_id = ?1",
            [tenant_id],
            |r| r.get(0),
        )?;
        if count as usize >= MAX_PER_TENANT {
            return Err(StoreError::Conflict(format!(
                "a tenant may have at most {MAX_PER_TENANT} tools; remove one first"
            )));
        }
    }
    let now = now_ms();
    tx.execute(
        "INSERT INTO tools (tenant_id, name, definition, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4) \
         ON CONFLICT (tenant_id, name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at",
        params![tenant_id, name, json, now],
    )?;
    let t = get(&tx, tenant_id, name)?;
    tx.commit()?;
    Ok((t, !exists))
}

pub fn delete(conn: &Connection, tenant_id: i64, name: &str) -> Result<()> {
    let n = conn.execute(
        "DELETE FROM tools WHERE tenant_id = ?1 AND name = ?2",
        params![tenant_id, name],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound("tool"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tenants::{self, TenantPatch};
    use crate::store::test_store;

    #[test]
    fn put_get_list_delete_per_tenant() {
        let (_dir, store) = test_store();
        let def: ToolDefinition =
            serde_json::from_value(serde_json::json!({"url": "https://a.example/x"})).unwrap();
        store
            .blocking(|c| {
                let mk = |c: &mut Connection, n: &str| {
                    let p: TenantPatch =
                        serde_json::from_value(serde_json::json!({"name": n})).unwrap();
                    tenants::create(c, p).map(|t| t.id)
                };
                let a = mk(c, "a")?;
                let b = mk(c, "b")?;
                assert!(put(c, a, "lookup", &def)?.1);
                assert!(!put(c, a, "lookup", &def)?.1);
                assert_eq!(list(c, a)?.len(), 1);
                assert!(list(c, b)?.is_empty());
                assert!(matches!(get(c, b, "lookup"), Err(StoreError::NotFound(_))));
                assert!(matches!(
                    delete(c, b, "lookup"),
                    Err(StoreError::NotFound(_))
                ));
                delete(c, a, "lookup")?;
                assert!(list(c, a)?.is_empty());
                Ok(())
            })
            .unwrap();
    }
}

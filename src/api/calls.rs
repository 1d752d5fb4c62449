//! The read side of calls. A tenant key sees its own calls only; another tenant's call is 404.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{Json, Path, Query};
use super::{ApiError, AppState, Auth};
use crate::calls::CallStatus;
use crate::store::calls::{self, Call, Cursor, ListQuery, Scope};
use crate::store::tenants;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/calls", get(list))
        .route("/calls/{id}", get(show))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    /// Admin only: restrict to one tenant.
    tenant: Option<String>,
}

async fn list(
    State(s): State<AppState>,
    auth: Auth,
    Query(p): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let status = p
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|v| {
            CallStatus::parse(v).ok_or_else(|| {
                let all: Vec<_> = CallStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(
                    "status",
                    format!("unknown status {v:?} (one of: {})", all.join(", ")),
                )
            })
        })
        .transpose()?;
    let limit = p.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request("limit", "must be between 1 and 200"));
    }
    let cursor = p
        .cursor
        .as_deref()
        .map(|c| {
            Cursor::decode(c)
                .ok_or_else(|| ApiError::bad_request("cursor", "not a cursor this server issued"))
        })
        .transpose()?;
    let tenant_filter = p.tenant.filter(|t| !t.is_empty());
    let scope = auth.scope();
    let (page, next) = s
        .store()
        .run(move |c| {
            let scope = match (scope, tenant_filter) {
                (Scope::All, Some(name)) => Scope::Tenant(tenants::get(c, &name)?.id),
                // A tenant key naming a tenant sees its own calls regardless: no probing.
                (scope, _) => scope,
            };
            calls::list(
                c,
                &ListQuery {
                    scope,
                    status,
                    limit,
                    cursor,
                },
            )
        })
        .await?;
    Ok(Json(json!({
        "calls": page,
        "next_cursor": next.map(|c| c.encode()),
    })))
}

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Call>, ApiError> {
    let scope = auth.scope();
    Ok(Json(
        s.store().run(move |c| calls::get(c, scope, &id)).await?,
    ))
}

//! Tenant HTTP tools (SPEC §8): `GET /tools`, `GET/PUT/DELETE /tools/{name}`. A tenant key sees
//! its own tools only (another tenant's tool is 404). The admin key names the tenant with
//! `?tenant=NAME` (optional when there is exactly one tenant).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path, Query};
use super::tenant_arg::tenant_of;
use super::{ApiError, AppState, Auth};
use crate::domain::tool::{ToolDefinition, validate_name};
use crate::http::openapi::Errors;
use crate::store::tools::{self as db, Tool};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show, put, remove))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TenantParam {
    /// Admin keys: the tenant (may be left out when there is only one).
    tenant: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ToolList {
    tools: Vec<Tool>,
}

/// The tenant's tools.
#[utoipa::path(get, path = "/tools", tag = "tools", params(TenantParam),
    responses((status = 200, body = ToolList), Errors))]
async fn list(
    State(s): State<AppState>,
    auth: Auth,
    Query(p): Query<TenantParam>,
) -> Result<Json<ToolList>, ApiError> {
    let t = tenant_of(&s, &auth, p.tenant).await?;
    let tools = s.store().read(move |c| db::list(c, t)).await?;
    Ok(Json(ToolList { tools }))
}

/// One tool.
#[utoipa::path(get, path = "/tools/{name}", tag = "tools", params(("name" = String, Path), TenantParam),
    responses((status = 200, body = Tool), Errors))]
async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(p): Query<TenantParam>,
) -> Result<Json<Tool>, ApiError> {
    let t = tenant_of(&s, &auth, p.tenant).await?;
    Ok(Json(s.store().read(move |c| db::get(c, t, &name)).await?))
}

/// Creates (201) or replaces (200) a tool.
#[utoipa::path(put, path = "/tools/{name}", tag = "tools", params(("name" = String, Path), TenantParam),
    request_body = ToolDefinition,
    responses((status = 201, body = Tool), (status = 200, body = Tool), Errors))]
async fn put(
    State(s): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(p): Query<TenantParam>,
    Json(def): Json<ToolDefinition>,
) -> Result<(StatusCode, Json<Tool>), ApiError> {
    validate_name(&name)?;
    def.validate()?;
    def.check_url(&s.config().server.allow_private_targets)?;
    let t = tenant_of(&s, &auth, p.tenant).await?;
    let (tool, created) = s.store().run(move |c| db::put(c, t, &name, &def)).await?;
    tracing::info!(tool = %tool.name, tenant_id = t, created, "tool saved");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(tool)))
}

/// Deletes a tool.
#[utoipa::path(delete, path = "/tools/{name}", tag = "tools", params(("name" = String, Path), TenantParam),
    responses((status = 204, description = "Deleted"), Errors))]
async fn remove(
    State(s): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    Query(p): Query<TenantParam>,
) -> Result<StatusCode, ApiError> {
    let t = tenant_of(&s, &auth, p.tenant).await?;
    let n = name.clone();
    s.store().run(move |c| db::delete(c, t, &n)).await?;
    tracing::info!(tool = %name, tenant_id = t, "tool deleted");
    Ok(StatusCode::NO_CONTENT)
}

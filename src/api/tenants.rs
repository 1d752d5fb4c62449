//! Admin-only tenant and key management (`/tenants…`, `/api-keys/{id}`).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path, Query};
use super::{ApiError, AppState, Auth};
use crate::config::HumanDuration;
use crate::domain::tenant::validate_key;
use crate::domain::timefmt::now_ms;
use crate::http::openapi::Errors;
use crate::store::keys::{self, CreatedKey, KeyInfo};
use crate::store::tenants::{self, Tenant, TenantPatch};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, remove))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
}

#[derive(Serialize, ToSchema)]
struct TenantList {
    tenants: Vec<Tenant>,
}

#[derive(Serialize, ToSchema)]
struct KeyList {
    keys: Vec<KeyInfo>,
}

/// All tenants (admin).
#[utoipa::path(get, path = "/tenants", tag = "tenants",
    responses((status = 200, body = TenantList), Errors))]
async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<TenantList>, ApiError> {
    auth.require_admin()?;
    let tenants = s.store().read(tenants::list).await?;
    Ok(Json(TenantList { tenants }))
}

/// Creates a tenant (admin); `name` is required.
#[utoipa::path(post, path = "/tenants", tag = "tenants", request_body = TenantPatch,
    responses((status = 201, body = Tenant), Errors))]
async fn create(
    State(s): State<AppState>,
    auth: Auth,
    Json(p): Json<TenantPatch>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    auth.require_admin()?;
    p.validate_create()?;
    p.check_webhook_target(&s.config().server.allow_private_targets)?;
    let t = s.store().run(move |c| tenants::create(c, p)).await?;
    tracing::info!(tenant = %t.name, "tenant created");
    Ok((StatusCode::CREATED, Json(t)))
}

/// One tenant (admin).
#[utoipa::path(get, path = "/tenants/{id}", tag = "tenants", params(("id" = String, Path, description = "Tenant name", example = "demo")),
    responses((status = 200, body = Tenant), Errors))]
async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    auth.require_admin()?;
    Ok(Json(s.store().run(move |c| tenants::get(c, &id)).await?))
}

/// Changes the fields given; an empty string clears an override (admin).
#[utoipa::path(put, path = "/tenants/{id}", tag = "tenants", params(("id" = String, Path, description = "Tenant name", example = "demo")),
    request_body = TenantPatch, responses((status = 200, body = Tenant), Errors))]
async fn update(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(p): Json<TenantPatch>,
) -> Result<Json<Tenant>, ApiError> {
    auth.require_admin()?;
    p.validate_update(&id)?;
    p.check_webhook_target(&s.config().server.allow_private_targets)?;
    let t = s.store().run(move |c| tenants::update(c, &id, p)).await?;
    tracing::info!(tenant = %t.name, "tenant updated");
    Ok(Json(t))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    /// Also delete the tenant's calls and keys.
    #[serde(default)]
    force: bool,
}

/// Deletes a tenant (admin); refused while it has calls or keys unless `force`.
#[utoipa::path(delete, path = "/tenants/{id}", tag = "tenants",
    params(("id" = String, Path, description = "Tenant name", example = "demo"), RemoveQuery),
    responses((status = 204, description = "Deleted"), Errors))]
async fn remove(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin()?;
    let name = id.clone();
    s.store()
        .run(move |c| tenants::delete(c, &id, q.force))
        .await?;
    tracing::info!(tenant = %name, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The tenant's API keys, without secrets (admin).
#[utoipa::path(get, path = "/tenants/{id}/api-keys", tag = "tenants",
    params(("id" = String, Path, description = "Tenant name", example = "demo")),
    responses((status = 200, body = KeyList), Errors))]
async fn list_keys(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<KeyList>, ApiError> {
    auth.require_admin()?;
    let keys = s.store().read(move |c| keys::list(c, Some(&id))).await?;
    Ok(Json(KeyList { keys }))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    #[serde(default)]
    name: String,
    /// Lifetime such as `"90d"`; omitted means no expiry.
    #[serde(default)]
    expires_in: Option<String>,
}

/// Creates a key for the tenant; the secret is in this answer only (admin). The body is
/// optional.
#[utoipa::path(post, path = "/tenants/{id}/api-keys", tag = "tenants",
    params(("id" = String, Path, description = "Tenant name", example = "demo")),
    request_body(content = Option<NewKeyRequest>, content_type = "application/json"),
    responses((status = 201, body = CreatedKey), Errors))]
async fn create_key(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    auth.require_admin()?;
    // The body is optional here: an empty POST makes an unnamed key without expiry.
    let req: NewKeyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        NewKeyRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("body: {e}"),
            )
        })?
    };
    let expires_at = req
        .expires_in
        .as_deref()
        .map(|d| HumanDuration::parse(d).map(|d| now_ms() + d.0.as_millis() as i64))
        .transpose()
        .map_err(|e| ApiError::bad_request("expires_in", e))?;
    validate_key(&req.name, expires_at)?;
    let k = s
        .store()
        .run(move |c| keys::create(c, Some(&id), &req.name, expires_at))
        .await?;
    tracing::info!(key_id = %k.info.id, tenant = ?k.info.tenant, "api key created");
    Ok((StatusCode::CREATED, Json(k)))
}

/// Revokes a key (admin).
#[utoipa::path(delete, path = "/api-keys/{key_id}", tag = "tenants",
    params(("key_id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyInfo), Errors))]
async fn revoke_key(
    State(s): State<AppState>,
    auth: Auth,
    Path(key_id): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    auth.require_admin()?;
    let k = s.store().run(move |c| keys::revoke(c, &key_id)).await?;
    tracing::info!(key_id = %k.id, "api key revoked");
    Ok(Json(k))
}

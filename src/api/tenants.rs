//! Admin-only tenant and key management (`/tenants…`, `/api-keys/{id}`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{Json, Path, Query};
use super::{ApiError, AppState, Auth};
use crate::config::HumanDuration;
use crate::domain::tenant::validate_key;
use crate::domain::timefmt::now_ms;
use crate::store::keys::{self, CreatedKey, KeyInfo};
use crate::store::tenants::{self, Tenant, TenantPatch};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/tenants", get(list).post(create))
        .route("/tenants/{id}", get(show).put(update).delete(remove))
        .route("/tenants/{id}/api-keys", get(list_keys).post(create_key))
        .route("/api-keys/{key_id}", delete(revoke_key))
}

async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    auth.require_admin()?;
    let all = s.store().read(tenants::list).await?;
    Ok(Json(json!({ "tenants": all })))
}

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

async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    auth.require_admin()?;
    Ok(Json(s.store().run(move |c| tenants::get(c, &id)).await?))
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

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

async fn list_keys(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require_admin()?;
    let all = s.store().read(move |c| keys::list(c, Some(&id))).await?;
    Ok(Json(json!({ "keys": all })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewKeyRequest {
    #[serde(default)]
    name: String,
    /// Lifetime such as `"90d"`; omitted means no expiry.
    #[serde(default)]
    expires_in: Option<String>,
}

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

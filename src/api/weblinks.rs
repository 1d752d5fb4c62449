//! Public browser-call links (SPEC §9): `POST /web-links` → a `/talk/<token>` URL anyone may
//! open to talk to the tenant's agent; `GET /web-links`, `DELETE /web-links/{id}`. A tenant
//! key manages its own links; the admin names the tenant with `tenant`.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path, Query};
use super::tenant_arg::{check_tenant_field, tenant_of};
use super::{ApiError, AppState, Auth};
use crate::config::HumanDuration;
use crate::domain::timefmt::now_ms;
use crate::http::openapi::Errors;
use crate::store::weblinks::{self as db, WebLink};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(remove))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewWebLink {
    /// What the link is for (1–100 characters), e.g. "website".
    name: String,
    /// The longest call through the link, e.g. `"5m"` (default and limit: the server's
    /// `agent.max_call_duration`).
    #[serde(default)]
    max_duration: Option<String>,
    /// How long the link works, from now, e.g. `"30d"` (default: until deleted).
    #[serde(default)]
    expires: Option<String>,
    /// Admin keys: the tenant (may be left out when there is only one).
    #[serde(default)]
    tenant: Option<String>,
}

/// A new link: its `url` (with the token, shown only now).
#[derive(Serialize, ToSchema)]
struct CreatedWebLink {
    #[serde(flatten)]
    link: WebLink,
    /// `/talk/<token>` on this server.
    url: String,
}

#[derive(Serialize, ToSchema)]
struct WebLinkList {
    web_links: Vec<WebLink>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TenantParam {
    /// Admin keys: the tenant (may be left out when there is only one).
    tenant: Option<String>,
}

fn duration(field: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|d| {
        HumanDuration::parse(d)
            .map(|d| d.as_secs() as i64)
            .map_err(|e| ApiError::bad_request(field, e))
            .and_then(|secs| {
                if secs > 0 {
                    Ok(secs)
                } else {
                    Err(ApiError::bad_request(field, "must be longer than 0s"))
                }
            })
    })
    .transpose()
}

/// Creates a public link to the tenant's agent.
#[utoipa::path(post, path = "/web-links", tag = "calls", request_body = NewWebLink,
    responses((status = 201, body = CreatedWebLink), Errors))]
async fn create(
    State(s): State<AppState>,
    auth: Auth,
    Json(req): Json<NewWebLink>,
) -> Result<(StatusCode, Json<CreatedWebLink>), ApiError> {
    check_tenant_field(&auth, &req.tenant)?;
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::bad_request("name", "must be 1-100 characters"));
    }
    let cap = s.config().agent.max_call_duration.as_secs() as i64;
    let max = duration("max_duration", req.max_duration.as_deref())?;
    if max.is_some_and(|m| m > cap) {
        return Err(ApiError::bad_request(
            "max_duration",
            format!("at most agent.max_call_duration ({cap} s)"),
        ));
    }
    let expires = duration("expires", req.expires.as_deref())?.map(|s| now_ms() + s * 1000);
    let t = tenant_of(&s, &auth, req.tenant).await?;
    let (link, token) = s
        .store()
        .run(move |c| db::create(c, t, &name, max, expires))
        .await?;
    tracing::info!(link = %link.id, tenant_id = t, "web link created");
    let url = format!("{}/talk/{token}", s.config().public_url());
    Ok((StatusCode::CREATED, Json(CreatedWebLink { link, url })))
}

/// The tenant's links (without their tokens).
#[utoipa::path(get, path = "/web-links", tag = "calls", params(TenantParam),
    responses((status = 200, body = WebLinkList), Errors))]
async fn list(
    State(s): State<AppState>,
    auth: Auth,
    Query(p): Query<TenantParam>,
) -> Result<Json<WebLinkList>, ApiError> {
    let t = tenant_of(&s, &auth, p.tenant).await?;
    let web_links = s.store().read(move |c| db::list(c, t)).await?;
    Ok(Json(WebLinkList { web_links }))
}

/// Deletes a link: it stops working at once (calls already made go on).
#[utoipa::path(delete, path = "/web-links/{id}", tag = "calls", params(("id" = String, Path), TenantParam),
    responses((status = 204, description = "Deleted"), Errors))]
async fn remove(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Query(p): Query<TenantParam>,
) -> Result<StatusCode, ApiError> {
    let t = tenant_of(&s, &auth, p.tenant).await?;
    let i = id.clone();
    s.store().run(move |c| db::delete(c, t, &i)).await?;
    tracing::info!(link = %id, tenant_id = t, "web link deleted");
    Ok(StatusCode::NO_CONTENT)
}

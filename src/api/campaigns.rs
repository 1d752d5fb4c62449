//! Campaigns and the do-not-call list (SPEC §7). A tenant key sees its own campaigns only;
//! another tenant's campaign is 404. The recipient upload has its own body cap
//! (`campaigns.max_upload_bytes`) instead of the API's small one.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path, Query};
use super::tenant_arg::{check_tenant_field, tenant_of};
use super::{ApiError, AppState, Auth};
use crate::calls::campaigns::{CreateCampaignRequest, ImportReport, Upload};
use crate::domain::campaign::{CampaignStatus, RecipientState};
use crate::domain::phone::E164;
use crate::http::openapi::Errors;
use crate::store::campaigns::{self as db, Campaign, Recipient};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(cancel))
        .routes(routes!(results))
        .routes(routes!(dnc_list, dnc_add))
        .routes(routes!(dnc_remove))
}

/// `/campaigns/{id}/recipients` (under `/api/v1`), outside the API's body limit: uploads
/// stream up to `campaigns.max_upload_bytes`.
pub fn upload_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload, recipients))
        .layer(DefaultBodyLimit::disable())
}

#[derive(Serialize, ToSchema)]
struct CampaignList {
    campaigns: Vec<Campaign>,
}

#[derive(Serialize, ToSchema)]
struct RecipientPage {
    recipients: Vec<Recipient>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct DncList {
    numbers: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct DncAdded {
    /// Numbers that were not on the list before.
    added: usize,
}

/// Creates a campaign (SPEC §7); recipients are uploaded next.
#[utoipa::path(post, path = "/campaigns", tag = "campaigns", request_body = CreateCampaignRequest,
    responses((status = 201, body = Campaign), Errors))]
async fn create(
    State(s): State<AppState>,
    auth: Auth,
    Json(req): Json<CreateCampaignRequest>,
) -> Result<(StatusCode, Json<Campaign>), ApiError> {
    check_tenant_field(&auth, &req.tenant)?;
    let c = s.calls().campaign_create(auth.scope(), req).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

/// Campaigns with their progress.
#[utoipa::path(get, path = "/campaigns", tag = "campaigns",
    responses((status = 200, body = CampaignList), Errors))]
async fn list(State(s): State<AppState>, auth: Auth) -> Result<Json<CampaignList>, ApiError> {
    let scope = auth.scope();
    let campaigns = s
        .store()
        .read(move |c| db::list(c, scope.tenant_id()))
        .await?;
    Ok(Json(CampaignList { campaigns }))
}

/// One campaign with its progress and ETA.
#[utoipa::path(get, path = "/campaigns/{id}", tag = "campaigns", params(("id" = String, Path)),
    responses((status = 200, body = Campaign), Errors))]
async fn show(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Campaign>, ApiError> {
    let scope = auth.scope();
    Ok(Json(
        s.store()
            .read(move |c| db::get(c, scope.tenant_id(), &id))
            .await?,
    ))
}

async fn set_status(
    s: AppState,
    auth: Auth,
    id: String,
    to: CampaignStatus,
) -> Result<Json<Campaign>, ApiError> {
    Ok(Json(
        s.calls().campaign_set_status(auth.scope(), id, to).await?,
    ))
}

/// Stops dialing new recipients at once; calls in progress go on.
#[utoipa::path(post, path = "/campaigns/{id}/pause", tag = "campaigns", params(("id" = String, Path)),
    responses((status = 200, body = Campaign), Errors))]
async fn pause(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Campaign>, ApiError> {
    set_status(s, auth, id, CampaignStatus::Paused).await
}

/// Dials again.
#[utoipa::path(post, path = "/campaigns/{id}/resume", tag = "campaigns", params(("id" = String, Path)),
    responses((status = 200, body = Campaign), Errors))]
async fn resume(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Campaign>, ApiError> {
    set_status(s, auth, id, CampaignStatus::Running).await
}

/// Cancels every recipient not yet called; final.
#[utoipa::path(post, path = "/campaigns/{id}/cancel", tag = "campaigns", params(("id" = String, Path)),
    responses((status = 200, body = Campaign), Errors))]
async fn cancel(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Campaign>, ApiError> {
    set_status(s, auth, id, CampaignStatus::Canceled).await
}

/// Adds recipients from CSV (a `to` column, optional `timezone`, other columns are template
/// variables) or JSON (`[{"to", "vars"?, "metadata"?, "timezone"?}]`); rows are checked one
/// by one and the rejected ones reported with their line.
#[utoipa::path(post, path = "/campaigns/{id}/recipients", tag = "campaigns", params(("id" = String, Path)),
    request_body(content(
        (String = "text/csv"),
        (Vec<Object> = "application/json"),
    )),
    responses((status = 200, body = ImportReport), Errors))]
async fn upload(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImportReport>, ApiError> {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let csv = match kind.as_str() {
        "text/csv" | "application/csv" => true,
        "application/json" => false,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: text/csv or application/json",
            ));
        }
    };
    // Ask for the campaign first: an unknown id is 404 before the body is read.
    let scope = auth.scope();
    let check = id.clone();
    s.store()
        .read(move |c| db::get(c, scope.tenant_id(), &check))
        .await?;
    let cap = s.calls().config().campaigns.max_upload_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("upload larger than {cap} bytes (campaigns.max_upload_bytes)"),
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > cap)
    {
        return Err(too_large());
    }
    let bytes = http_body_util::Limited::new(body, cap)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad_request("body", "the upload was interrupted")
            }
        })?
        .to_bytes()
        .to_vec();
    let upload = if csv {
        Upload::Csv(bytes)
    } else {
        Upload::Json(bytes)
    };
    Ok(Json(s.calls().campaign_import(scope, id, upload).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RecipientParams {
    /// Only recipients in this state.
    state: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// 1–1000 (default 100).
    limit: Option<u32>,
}

/// The campaign's recipients, a page at a time.
#[utoipa::path(get, path = "/campaigns/{id}/recipients", tag = "campaigns",
    params(("id" = String, Path), RecipientParams),
    responses((status = 200, body = RecipientPage), Errors))]
async fn recipients(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Query(p): Query<RecipientParams>,
) -> Result<Json<RecipientPage>, ApiError> {
    let state = p
        .state
        .as_deref()
        .map(|v| {
            RecipientState::parse(v).ok_or_else(|| {
                ApiError::bad_request(
                    "state",
                    "use pending, scheduled, dialing, in_call, done, failed, suppressed or canceled",
                )
            })
        })
        .transpose()?;
    let cursor = p
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_request("cursor", "not a cursor from this list"))
        })
        .transpose()?
        .unwrap_or(0);
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit", "must be between 1 and 1000"));
    }
    let scope = auth.scope();
    let page = s
        .store()
        .read(move |c| {
            db::get(c, scope.tenant_id(), &id)?;
            db::recipients(c, &id, state, cursor, limit)
        })
        .await?;
    let next_cursor = (page.len() == limit as usize)
        .then(|| page.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(RecipientPage {
        recipients: page,
        next_cursor,
    }))
}

/// Every recipient with its outcome, as CSV.
#[utoipa::path(get, path = "/campaigns/{id}/results.csv", tag = "campaigns", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/csv", body = String), Errors))]
async fn results(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let scope = auth.scope();
    let rows = s
        .store()
        .read(move |c| {
            db::get(c, scope.tenant_id(), &id)?;
            let mut all = Vec::new();
            let mut cursor = 0;
            loop {
                let page = db::recipients(c, &id, None, cursor, 5_000)?;
                let Some(last) = page.last() else { break };
                cursor = last.id;
                all.extend(page);
            }
            Ok(all)
        })
        .await?;
    let vars: BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r.vars.as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut head: Vec<&str> = vec!["to"];
    head.extend(vars.iter().map(String::as_str));
    head.extend([
        "state",
        "attempts",
        "last_outcome",
        "answered_by",
        "duration_seconds",
        "last_call_id",
    ]);
    let write_err = |_| ApiError::internal();
    w.write_record(&head).map_err(write_err)?;
    for r in &rows {
        let mut rec: Vec<String> = vec![r.to.clone()];
        for v in &vars {
            rec.push(match r.vars.get(v) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            });
        }
        rec.push(r.state.as_str().into());
        rec.push(r.attempts.to_string());
        rec.push(r.last_outcome.clone().unwrap_or_default());
        rec.push(r.answered_by.clone().unwrap_or_default());
        rec.push(
            r.duration_seconds
                .map(|d| d.to_string())
                .unwrap_or_default(),
        );
        rec.push(r.last_call_id.clone().unwrap_or_default());
        w.write_record(&rec).map_err(write_err)?;
    }
    let body = w.into_inner().map_err(|_| ApiError::internal())?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TenantParam {
    /// Admin keys: the tenant (may be left out when there is only one).
    tenant: Option<String>,
}

/// The tenant's do-not-call list.
#[utoipa::path(get, path = "/dnc", tag = "campaigns", params(TenantParam),
    responses((status = 200, body = DncList), Errors))]
async fn dnc_list(
    State(s): State<AppState>,
    auth: Auth,
    Query(p): Query<TenantParam>,
) -> Result<Json<DncList>, ApiError> {
    let t = tenant_of(&s, &auth, p.tenant).await?;
    let numbers = s.store().read(move |c| db::dnc_list(c, t)).await?;
    Ok(Json(DncList { numbers }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DncBody {
    /// E.164 numbers.
    numbers: Vec<String>,
    /// Admin keys: the tenant.
    #[serde(default)]
    tenant: Option<String>,
}

/// Adds numbers to the do-not-call list; they are never dialed by campaigns again.
#[utoipa::path(post, path = "/dnc", tag = "campaigns", request_body = DncBody,
    responses((status = 200, body = DncAdded), Errors))]
async fn dnc_add(
    State(s): State<AppState>,
    auth: Auth,
    Json(b): Json<DncBody>,
) -> Result<Json<DncAdded>, ApiError> {
    if b.numbers.is_empty() {
        return Err(ApiError::bad_request("numbers", "name at least one number"));
    }
    for n in &b.numbers {
        E164::parse(n).map_err(|e| ApiError::bad_request("numbers", e))?;
    }
    let t = tenant_of(&s, &auth, b.tenant).await?;
    let numbers = b.numbers;
    let added = s.store().run(move |c| db::dnc_add(c, t, &numbers)).await?;
    Ok(Json(DncAdded { added }))
}

/// Removes a number from the do-not-call list.
#[utoipa::path(delete, path = "/dnc/{number}", tag = "campaigns",
    params(("number" = String, Path, description = "E.164"), TenantParam),
    responses((status = 204, description = "Removed"), Errors))]
async fn dnc_remove(
    State(s): State<AppState>,
    auth: Auth,
    Path(number): Path<String>,
    Query(p): Query<TenantParam>,
) -> Result<StatusCode, ApiError> {
    E164::parse(&number).map_err(|e| ApiError::bad_request("number", e))?;
    let t = tenant_of(&s, &auth, p.tenant).await?;
    s.store()
        .run(move |c| db::dnc_remove(c, t, &number))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

//! The read side of calls. A tenant key sees its own calls only; another tenant's call is 404.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path, Query};
use super::{ApiError, AppState, Auth};
use crate::calls::CallStatus;
use crate::calls::{CallError, CallEvent, CreateCallRequest};
use crate::domain::RateLimited;
use crate::domain::timefmt;
use crate::http::openapi::Errors;
use crate::store::calls::{self, Call, Cursor, ListQuery, Scope};
use crate::store::calls::{Analytics, TranscriptEntry};
use crate::store::tenants;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(active))
        .routes(routes!(analytics))
        .routes(routes!(show))
        .routes(routes!(end))
        .routes(routes!(transcript))
        .routes(routes!(events))
}

#[derive(Serialize, ToSchema)]
struct CallPage {
    calls: Vec<Call>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ActiveCalls {
    calls: Vec<Call>,
}

/// One Server-Sent Event of `GET /calls/{id}/events`.
#[derive(ToSchema)]
#[allow(dead_code)] // Describes the stream axum writes; never built as a value.
struct CallEventMessage {
    /// `status` or `transcript`.
    event: EventName,
    /// The event as JSON: `{"type": "status", "status", "end_reason"?}` or
    /// `{"type": "transcript", "speaker", "text", "at_ms"}`.
    #[schema(content_media_type = "application/json")]
    data: String,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum EventName {
    Status,
    Transcript,
}

#[derive(Serialize, ToSchema)]
struct Transcript {
    entries: Vec<TranscriptEntry>,
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Store(s) => s.into(),
            CallError::Invalid(e) => e.into(),
            CallError::RateLimited(RateLimited { retry_after_secs }) => ApiError {
                retry_after: Some(retry_after_secs),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many new calls for this tenant; retry in {retry_after_secs} s"),
                )
            },
            CallError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable", m)
            }
            e @ CallError::EngineUnavailable(_) => ApiError {
                retry_after: Some(crate::engines::breaker::COOL_DOWN.as_secs()),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "engine_unavailable",
                    e.to_string(),
                )
            },
            CallError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "call_not_live", m),
        }
    }
}

/// Queues an outbound call (SPEC §3). The `Idempotency-Key` header makes a retry return the
/// call it created (200) instead of a new one.
#[utoipa::path(post, path = "/calls", tag = "calls", request_body = CreateCallRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "1–255 characters")),
    responses((status = 201, body = Call, description = "Queued"),
        (status = 200, body = Call, description = "A retry with the same Idempotency-Key"), Errors))]
async fn create(
    State(s): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Json(req): Json<CreateCallRequest>,
) -> Result<(StatusCode, Json<Call>), ApiError> {
    if req.tenant.is_some() && !auth.is_admin() {
        return Err(ApiError::bad_request(
            "tenant",
            "only the admin key may name a tenant",
        ));
    }
    let key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::bad_request("Idempotency-Key", "must be visible ASCII"))
        })
        .transpose()?;
    let (call, created) = s.calls().create(auth.scope(), req, key).await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(call),
    ))
}

/// Ends a call (hangs up, or cancels it while queued).
#[utoipa::path(post, path = "/calls/{id}/end", tag = "calls", params(("id" = String, Path)),
    responses((status = 200, body = Call), Errors))]
async fn end(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Call>, ApiError> {
    Ok(Json(s.calls().end(auth.scope(), &id, "api_end").await?))
}

/// What was said on the call, in order.
#[utoipa::path(get, path = "/calls/{id}/transcript", tag = "calls", params(("id" = String, Path)),
    responses((status = 200, body = Transcript), Errors))]
async fn transcript(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Transcript>, ApiError> {
    let scope = auth.scope();
    let entries = s
        .store()
        .read(move |c| calls::transcript(c, scope, &id))
        .await?;
    Ok(Json(Transcript { entries }))
}

/// Calls ringing or in progress.
#[utoipa::path(get, path = "/calls/active", tag = "calls",
    responses((status = 200, body = ActiveCalls), Errors))]
async fn active(State(s): State<AppState>, auth: Auth) -> Result<Json<ActiveCalls>, ApiError> {
    let scope = auth.scope();
    let calls = s.store().read(move |c| calls::active(c, scope)).await?;
    Ok(Json(ActiveCalls { calls }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AnalyticsParams {
    /// RFC 3339 time or an age such as `24h`.
    since: Option<String>,
    /// Admin only: one tenant.
    tenant: Option<String>,
}

/// Counts, success rate and latency percentiles.
#[utoipa::path(get, path = "/calls/analytics", tag = "calls", params(AnalyticsParams),
    responses((status = 200, body = Analytics), Errors))]
async fn analytics(
    State(s): State<AppState>,
    auth: Auth,
    Query(p): Query<AnalyticsParams>,
) -> Result<Json<Analytics>, ApiError> {
    let since = p
        .since
        .as_deref()
        .map(|v| {
            timefmt::parse_since(v).ok_or_else(|| {
                ApiError::bad_request(
                    "since",
                    "use RFC 3339 (2026-11-01T00:00:00Z) or an age such as 24h",
                )
            })
        })
        .transpose()?;
    let scope = auth.scope();
    let tenant = p.tenant.filter(|t| !t.is_empty());
    Ok(Json(
        s.store()
            .read(move |c| {
                let scope = match (scope, tenant) {
                    (Scope::All, Some(name)) => Scope::Tenant(tenants::get(c, &name)?.id),
                    (scope, _) => scope,
                };
                calls::analytics(c, scope, since)
            })
            .await?,
    ))
}

/// Server-Sent Events: the call's history so far (status changes, transcript lines), then
/// live events until it ends. A finished call replays its history and closes.
#[utoipa::path(get, path = "/calls/{id}/events", tag = "calls", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = CallEventMessage,
        description = "`status` and `transcript` events, JSON data"), Errors))]
async fn events(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let scope = auth.scope();
    // Subscribe before reading history so nothing falls between the two.
    let call = {
        let id = id.clone();
        s.store().run(move |c| calls::get(c, scope, &id)).await?
    };
    let live = (!call.status.is_terminal()).then(|| s.calls().follow(&id));
    let rx = live.as_ref().map(|l| l.subscribe());
    let (history, transcript, call) = {
        let id = id.clone();
        s.store()
            .read(move |c| {
                Ok((
                    calls::events(c, &id)?,
                    calls::transcript(c, Scope::All, &id)?,
                    calls::get(c, Scope::All, &id)?,
                ))
            })
            .await?
    };
    if call.status.is_terminal() && live.is_some() {
        // It ended between our two reads: the entry we made will never be finished.
        s.calls().unfollow(&id);
    }
    let mut backlog: Vec<(i64, CallEvent)> = Vec::new();
    let created = call.created_ms;
    for (at, kind, data) in history {
        if kind == "status"
            && let Some(status) = data["status"].as_str().and_then(CallStatus::parse)
        {
            let end_reason = data["end_reason"].as_str().map(str::to_owned);
            backlog.push((at - created, CallEvent::Status { status, end_reason }));
        }
    }
    let started = call.started_at.is_some();
    for e in transcript {
        // Transcript times are relative to the media stream; order them after the status
        // change that started it.
        backlog.push((
            if started {
                i64::MAX / 2 + e.at_ms
            } else {
                e.at_ms
            },
            CallEvent::Transcript {
                speaker: e.speaker,
                text: e.text,
                at_ms: e.at_ms,
            },
        ));
    }
    backlog.sort_by_key(|(k, _)| *k);
    // Live events already in the backlog (written between subscribing and reading) are skipped.
    let mut seen_rank = 0u8;
    let mut seen_lines = std::collections::HashSet::new();
    for (_, e) in &backlog {
        match e {
            CallEvent::Status { status, .. } => seen_rank = seen_rank.max(status.rank()),
            CallEvent::Transcript { at_ms, text, .. } => {
                seen_lines.insert((*at_ms, text.clone()));
            }
        }
    }
    let done = call.status.is_terminal();
    let replay = futures_util::stream::iter(backlog.into_iter().map(|(_, e)| e));
    let live_stream = futures_util::stream::unfold((rx, done), |(rx, done)| async move {
        let mut rx = rx?;
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let end =
                        matches!(&ev, CallEvent::Status { status, .. } if status.is_terminal());
                    return Some((ev, (Some(rx), end)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let live_stream = live_stream.filter(move |ev| {
        let fresh = match ev {
            CallEvent::Status { status, .. } => status.rank() > seen_rank,
            CallEvent::Transcript { at_ms, text, .. } => {
                !seen_lines.contains(&(*at_ms, text.clone()))
            }
        };
        std::future::ready(fresh)
    });
    let stream = replay.chain(live_stream).map(|ev| {
        let name = match &ev {
            CallEvent::Status { .. } => "status",
            CallEvent::Transcript { .. } => "transcript",
        };
        Ok(SseEvent::default()
            .event(name)
            .json_data(&ev)
            .unwrap_or_default())
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Only calls in this status.
    status: Option<String>,
    /// 1–200 (default 50).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Admin only: restrict to one tenant.
    tenant: Option<String>,
}

/// Calls, newest first, a page at a time.
#[utoipa::path(get, path = "/calls", tag = "calls", params(ListParams),
    responses((status = 200, body = CallPage), Errors))]
async fn list(
    State(s): State<AppState>,
    auth: Auth,
    Query(p): Query<ListParams>,
) -> Result<Json<CallPage>, ApiError> {
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
        .read(move |c| {
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
    Ok(Json(CallPage {
        calls: page,
        next_cursor: next.map(|c| c.encode()),
    }))
}

/// One call.
#[utoipa::path(get, path = "/calls/{id}", tag = "calls", params(("id" = String, Path)),
    responses((status = 200, body = Call), Errors))]
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

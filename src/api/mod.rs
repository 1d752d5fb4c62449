//! The HTTP surface: REST API (`/api/v1`), health and info. `app(state)` builds the whole
//! router so tests drive exactly what `serve` runs.

mod calls;
mod campaigns;
mod certs;
mod handover;
mod health;
mod ops;
mod recording;
pub mod status;
mod tenant_arg;
mod tenants;
mod tools;
mod twilio;
pub mod ui;
mod webcalls;
mod weblinks;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{self, HeaderName, HeaderValue};
use axum::middleware;
use axum::response::IntoResponse;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::http::error;
pub use crate::http::{ApiError, AppState, Auth};

/// The API's routes with their OpenAPI document: the document is built from the same
/// registrations as the router (`utoipa_axum::routes!`), so neither can change alone. Paths
/// are relative to `/api/v1` (the document's server URL). The recipient upload is separate
/// because it has its own body limit.
fn api_routes() -> (Router<AppState>, Router<AppState>, utoipa::openapi::OpenApi) {
    let (api, mut doc) = OpenApiRouter::with_openapi(crate::http::openapi::ApiDoc::openapi())
        .merge(tenants::routes())
        .merge(calls::routes())
        .merge(recording::routes())
        .merge(handover::routes())
        .merge(campaigns::routes())
        .merge(status::routes())
        .merge(certs::routes())
        .merge(webcalls::routes())
        .merge(weblinks::routes())
        .merge(tools::routes())
        .split_for_parts();
    let (uploads, upload_doc) = campaigns::upload_routes().split_for_parts();
    doc.merge(upload_doc);
    (api, uploads, doc)
}

/// The OpenAPI 3.1 document `GET /api/v1/openapi.json` serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().2
}

pub fn app(state: AppState) -> Router {
    let max_body = state.config().server.max_body_bytes;
    let (api, uploads, doc) = api_routes();
    // Rendered once; the document is public (it holds no secrets) so clients can fetch it
    // before they have a key.
    let doc = axum::body::Bytes::from(doc.to_json().unwrap_or_default());
    let api = api
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { ([(http::header::CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        .fallback(|| async { ApiError::for_status(axum::http::StatusCode::NOT_FOUND) });
    // Our own routes. `/api/v1/*` and `/twilio/*` are reserved as a whole (their 404s are
    // ours), the rest are exact paths. `route_layer` keeps the small body limit and the error
    // reshaping on these routes only: proxied bodies stream at any size, and an upstream's
    // own 404/500 pages pass through untouched.
    let own = Router::new()
        .nest("/api/v1", api)
        .nest(
            "/twilio",
            twilio::routes()
                .fallback(|| async { ApiError::for_status(axum::http::StatusCode::NOT_FOUND) }),
        )
        .merge(health::routes())
        .merge(ops::routes())
        .merge(webcalls::talk_routes())
        .route_layer(DefaultBodyLimit::max(max_body))
        .route_layer(RequestBodyLimitLayer::new(max_body))
        // Outside the body limit, so its bare 413 is reshaped too.
        .route_layer(middleware::map_response(error::shape_errors))
        // Recipient uploads: exempt from `server.max_body_bytes`, capped by their own limit.
        .nest(
            "/api/v1",
            uploads.route_layer(middleware::map_response(error::shape_errors)),
        )
        // The dashboard answers browsers with HTML pages, its errors included, so it sits
        // outside the reshaping; its JSON endpoint answers in the SPEC shape by itself.
        .merge(ui::routes());
    own
        // Everything else: `[[proxy]]` routes, or the SPEC 404 when none matches.
        .fallback(
            |State(state): State<AppState>, mut req: Request| async move {
                // `GET /` opens the dashboard unless a route claims it.
                if req.uri().path() == "/"
                    && matches!(req.method(), &http::Method::GET | &http::Method::HEAD)
                    && !state.proxy().claims(&req)
                {
                    return ui::root_redirect();
                }
                // A proxied WebSocket (or other upgrade) holds a connection for as long as it
                // lives: it takes a slot of `limits.max_websockets_per_ip` for its whole life.
                if crate::proxy::headers::upgrade_protocol(req.headers()).is_some() {
                    let ip = crate::ops::net::request_client_ip(req.extensions());
                    match state.ops().websocket_guard(ip) {
                        Ok(g) => {
                            req.extensions_mut()
                                .insert(crate::proxy::TunnelSlot::new(g));
                        }
                        Err(e) => return ApiError::from(e).into_response(),
                    }
                }
                state
                    .proxy()
                    .handle(req)
                    .await
                    .unwrap_or_else(IntoResponse::into_response)
            },
        )
        // Rate limits before any handler work; metrics see the final (shaped) status.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ops::middleware,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(log_outcome)
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, RandomRequestId))
        .layer(middleware::map_request(drop_insane_request_id))
        .with_state(state)
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A client's own `x-request-id` is kept when it is sane (1–64 of `[A-Za-z0-9_-]`, so it is safe
/// in logs); anything else is dropped here and replaced by a random one.
async fn drop_insane_request_id(mut req: Request) -> Request {
    let sane = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !sane {
        req.headers_mut().remove(&REQUEST_ID);
    }
    req
}

#[derive(Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&crate::domain::ids::random_token(16))
            .ok()
            .map(RequestId::new)
    }
}

/// Each request runs in a `request` span with its id, method and path (the path only: query
/// strings may carry tokens). Probes (`/health…`) get a debug span, so their outcome is logged
/// at debug; other outcomes at info, 5xx at warn.
fn request_span(req: &http::Request<axum::body::Body>) -> Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (method, path) = (req.method(), req.uri().path());
    if path.starts_with("/health") {
        tracing::debug_span!("request", request_id = %id, %method, %path)
    } else {
        tracing::info_span!("request", request_id = %id, %method, %path)
    }
}

fn log_outcome<B>(resp: &http::Response<B>, latency: Duration, span: &Span) {
    let status = resp.status().as_u16();
    let ms = latency.as_secs_f64() * 1000.0;
    let probe = span
        .metadata()
        .is_none_or(|m| *m.level() == tracing::Level::DEBUG);
    if status >= 500 {
        tracing::warn!(status, ms, "request");
    } else if probe {
        tracing::debug!(status, ms, "request");
    } else {
        tracing::info!(status, ms, "request");
    }
}

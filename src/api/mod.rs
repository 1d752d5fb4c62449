//! The HTTP surface: REST API (`/api/v1`), health and info. `app(state)` builds the whole
//! router so tests drive exactly what `serve` runs.

mod calls;
mod certs;
mod health;
mod ops;
pub mod status;
mod tenants;
mod twilio;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::Instrument;

use crate::http::error;
pub use crate::http::{ApiError, AppState, Auth};

pub fn app(state: AppState) -> Router {
    let max_body = state.config().server.max_body_bytes;
    let api = Router::new()
        .merge(tenants::routes())
        .merge(calls::routes())
        .merge(status::routes())
        .merge(certs::routes())
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
        .route_layer(DefaultBodyLimit::max(max_body))
        .route_layer(RequestBodyLimitLayer::new(max_body))
        // Outside the body limit, so its bare 413 is reshaped too.
        .route_layer(middleware::map_response(error::shape_errors));
    own
        // Everything else: `[[proxy]]` routes, or the SPEC 404 when none matches.
        .fallback(|State(state): State<AppState>, req: Request| async move {
            state
                .proxy()
                .handle(req)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        })
        // Rate limits before any handler work; metrics see the final (shaped) status.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            ops::middleware,
        ))
        .layer(middleware::from_fn(request_context))
        .with_state(state)
}

/// Gives every request an id (kept from `x-request-id` when the client sent a sane one),
/// runs it inside a span carrying that id, logs the outcome, and echoes the id back.
async fn request_context(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| crate::domain::ids::random_token(16));
    let method = req.method().clone();
    // The path only: query strings may carry tokens.
    let path = req.uri().path().to_owned();
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert("x-request-id", v);
    }
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if path.starts_with("/health") {
            tracing::debug!(status, ms, "request");
        } else if status >= 500 {
            tracing::warn!(status, ms, "request");
        } else {
            tracing::info!(status, ms, "request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

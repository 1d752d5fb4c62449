//! The HTTP surface: REST API (`/api/v1`), health and info. `app(state)` builds the whole
//! router so tests drive exactly what `serve` runs.

mod auth;
mod calls;
pub mod error;
mod health;
mod tenants;
mod twilio;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::limit::RequestBodyLimitLayer;
use tracing::Instrument;

pub use auth::Auth;
pub use error::ApiError;

use crate::calls::Calls;
use crate::config::Config;
use crate::store::Store;

/// Everything a request handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub started: Instant,
    draining: AtomicBool,
    calls: Arc<Calls>,
    ops: crate::ops::Ops,
    proxy: Arc<crate::proxy::Proxy>,
    /// Set by `serve` when TLS is on: readiness and `/api/v1/tls/*` consult it.
    tls: OnceLock<crate::tls::Tls>,
}

impl AppState {
    /// State with a call manager whose background workers are not started (tests that only
    /// exercise the HTTP surface). `serve` uses [`AppState::with_manager`].
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        let calls = Calls::new(store.clone(), config.clone(), Default::default())
            // Only fails if the HTTP client cannot be built (no TLS backend): a build defect.
            .expect("HTTP client");
        Self::with_manager(calls)
    }

    /// State around a call manager, which holds the store and the configuration.
    pub fn with_manager(calls: Arc<Calls>) -> Self {
        let config = calls.config();
        let store = calls.store().clone();
        let ops = crate::ops::Ops::with_metrics(&config, calls.metrics());
        let proxy = Arc::new(crate::proxy::Proxy::from_config(&config));
        Self(Arc::new(Inner {
            store,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            calls,
            ops,
            proxy,
            tls: OnceLock::new(),
        }))
    }

    /// Attaches the TLS handle (once; later calls are ignored).
    pub fn set_tls(&self, tls: crate::tls::Tls) {
        let _ = self.0.tls.set(tls);
    }

    pub fn tls(&self) -> Option<&crate::tls::Tls> {
        self.0.tls.get()
    }

    pub fn calls(&self) -> &Arc<Calls> {
        &self.0.calls
    }

    /// Metrics, rate limiters and guards.
    pub fn ops(&self) -> &crate::ops::Ops {
        &self.0.ops
    }

    /// The `[[proxy]]` routes; `reload` swaps its table (SIGHUP).
    pub fn proxy(&self) -> &Arc<crate::proxy::Proxy> {
        &self.0.proxy
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// The configuration in force; a reload (SIGHUP) swaps it, so hold the snapshot only
    /// for the request at hand.
    pub fn config(&self) -> Arc<Config> {
        self.0.calls.config()
    }

    pub fn uptime_secs(&self) -> u64 {
        self.0.started.elapsed().as_secs()
    }

    pub fn set_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
        self.0.calls.set_draining();
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }
}

pub fn app(state: AppState) -> Router {
    let max_body = state.config().server.max_body_bytes;
    let api = Router::new()
        .merge(tenants::routes())
        .merge(calls::routes())
        .merge(crate::ops::status::routes())
        .merge(crate::tls::api::routes())
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
        .merge(crate::ops::http::routes())
        .route_layer(DefaultBodyLimit::max(max_body))
        .route_layer(RequestBodyLimitLayer::new(max_body))
        // Outside the body limit, so its bare 413 is reshaped too.
        .route_layer(middleware::map_response(error::shape_errors));
    own
        // Everything else: `[[proxy]]` routes, or the SPEC 404 when none matches.
        .fallback(|State(state): State<AppState>, req: Request| async move {
            state.proxy().handle(req).await
        })
        // Rate limits before any handler work; metrics see the final (shaped) status.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::ops::http::middleware,
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
        .unwrap_or_else(|| crate::ids::random_token(16));
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

//! Unauthenticated probes: liveness, readiness, version.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/health/ready", get(ready))
        .route("/info", get(info))
}

async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "server is shutting down",
        ));
    }
    if !state.store().ping().await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "database is not answering",
        ));
    }
    if let Some(tls) = state.tls()
        && !tls.has_valid_cert()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_certificate",
            "no valid TLS certificate yet (serving a self-signed fallback); see `voicectl cert status`",
        ));
    }
    Ok(Json(json!({"status": "ready"})))
}

async fn info() -> Json<Value> {
    Json(json!({"name": "voicectl", "version": env!("CARGO_PKG_VERSION")}))
}

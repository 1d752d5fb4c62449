//! Admin endpoints under `/api/v1/tls`: what `voicectl cert status|renew` ask a running server.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;

use crate::http::error::Json;
use crate::http::{ApiError, AppState, Auth};
use crate::tls::{RenewOutcome, Tls, TlsError, TlsStatus};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/tls/status", get(status))
        .route("/tls/renew", post(renew))
}

fn tls_of(s: &AppState) -> Result<Tls, ApiError> {
    s.tls().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "tls_off",
            "TLS is off on this server (tls.mode = \"off\")",
        )
    })
}

async fn status(State(s): State<AppState>, auth: Auth) -> Result<Json<TlsStatus>, ApiError> {
    auth.require_admin()?;
    Ok(Json(tls_of(&s)?.status()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    #[serde(default)]
    force: bool,
}

/// Body optional: `{}` or nothing renews when due; `{"force": true}` renews now.
async fn renew(
    State(s): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> Result<Json<RenewOutcome>, ApiError> {
    auth.require_admin()?;
    let body: RenewBody = if body.iter().all(u8::is_ascii_whitespace) {
        RenewBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("body", e))?
    };
    let tls = tls_of(&s)?;
    match tls.renew(body.force).await {
        Ok(outcome) => Ok(Json(outcome)),
        Err(TlsError::Off) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "tls_off",
            "TLS is off on this server",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "renewal_failed",
            format!("certificate renewal failed: {e}"),
        )),
    }
}

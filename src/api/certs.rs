//! Admin endpoints under `/api/v1/tls`: what `voicectl cert status|renew` ask a running server.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::error::Json;
use crate::http::openapi::Errors;
use crate::http::{ApiError, AppState, Auth};
use crate::tls::{RenewOutcome, Tls, TlsError, TlsStatus};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(renew))
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

/// Certificates being served and the renewal schedule (admin).
#[utoipa::path(get, path = "/tls/status", tag = "system",
    responses((status = 200, body = TlsStatus), Errors))]
async fn status(State(s): State<AppState>, auth: Auth) -> Result<Json<TlsStatus>, ApiError> {
    auth.require_admin()?;
    Ok(Json(tls_of(&s)?.status()))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    /// Renew now even when not due.
    #[serde(default)]
    force: bool,
}

/// Body optional: `{}` or nothing renews when due; `{"force": true}` renews now.
#[utoipa::path(post, path = "/tls/renew", tag = "system",
    request_body(content = Option<RenewBody>, content_type = "application/json"),
    responses((status = 200, body = RenewOutcome), Errors))]
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

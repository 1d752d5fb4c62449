//! Operator actions on a live call: keypad out and transfer (the same functions the agent's
//! tools call). A tenant key acts on its own calls only; another tenant's call is 404, a
//! call that is not live is 409.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path};
use super::{ApiError, AppState, Auth};
use crate::http::openapi::Errors;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(dtmf))
        .routes(routes!(transfer))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DtmfRequest {
    /// Keys to press: 0-9, `*`, `#`, `w`/`W` (half-second pause); at most 64.
    digits: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    /// One of the tenant's `transfer_numbers`, by number (E.164) or label.
    destination: String,
    /// What the person answering hears first (warm transfer).
    #[serde(default)]
    summary: String,
}

#[derive(Serialize, ToSchema)]
struct Accepted {
    /// Always true: the carrier accepted the change; what follows shows on the call.
    accepted: bool,
}

/// Plays keypad tones on a live call (IVR menus, extensions); the conversation goes on.
#[utoipa::path(post, path = "/calls/{id}/dtmf", tag = "calls", params(("id" = String, Path)),
    request_body = DtmfRequest,
    responses((status = 202, body = Accepted, description = "The digits are being played"), Errors))]
async fn dtmf(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(req): Json<DtmfRequest>,
) -> Result<(axum::http::StatusCode, Json<Accepted>), ApiError> {
    s.calls().send_dtmf(auth.scope(), &id, &req.digits).await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(Accepted { accepted: true }),
    ))
}

/// Transfers a live call to one of the tenant's transfer numbers.
#[utoipa::path(post, path = "/calls/{id}/transfer", tag = "calls", params(("id" = String, Path)),
    request_body = TransferRequest,
    responses((status = 202, body = Accepted, description = "The transfer is being dialed"), Errors))]
async fn transfer(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(req): Json<TransferRequest>,
) -> Result<(axum::http::StatusCode, Json<Accepted>), ApiError> {
    s.calls()
        .transfer(auth.scope(), &id, &req.destination, &req.summary)
        .await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(Accepted { accepted: true }),
    ))
}

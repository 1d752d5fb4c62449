//! `GET /api/v1/status` (admin): what `voicectl status` shows. Certificate expiry and engine
//! circuit states are read from the metrics the TLS and engine code keep current, so a new
//! source of status only has to update its metric.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::timefmt::{now_ms, rfc3339};
use crate::http::error::Json;
use crate::http::openapi::Errors;
use crate::http::{ApiError, AppState, Auth};
use crate::ops::metrics::circuit;
use crate::store::calls;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusReport {
    /// "serving" or "draining".
    pub state: String,
    pub version: String,
    pub pid: u32,
    pub started_at: String,
    pub uptime_seconds: u64,
    pub calls: CallCounts,
    pub websockets: u64,
    pub certificates: Vec<CertificateStatus>,
    pub engines: Vec<EngineStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallCounts {
    /// initiating, ringing or in progress.
    pub active: u64,
    pub queued: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CertificateStatus {
    pub domain: String,
    pub not_after: String,
    pub days_left: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EngineStatus {
    pub engine: String,
    /// closed | half_open | open
    pub circuit: String,
}

/// Routes under `/api/v1`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(status))
}

/// What `voicectl status` shows (admin).
#[utoipa::path(get, path = "/status", tag = "system",
    responses((status = 200, body = StatusReport), Errors))]
async fn status(State(s): State<AppState>, auth: Auth) -> Result<Json<StatusReport>, ApiError> {
    auth.require_admin()?;
    Ok(Json(collect(&s).await?))
}

pub async fn collect(s: &AppState) -> Result<StatusReport, ApiError> {
    let open = s.store().run(|c| calls::open_counts(c)).await?;
    let calls = CallCounts {
        active: u64::try_from(open.live).unwrap_or(0),
        queued: u64::try_from(open.queued).unwrap_or(0),
    };
    let m = s.ops().metrics();
    let now = now_ms();
    let certificates = m
        .certificate_expiry
        .snapshot()
        .into_iter()
        .map(|(labels, g)| {
            let not_after_ms = g.get().saturating_mul(1000);
            CertificateStatus {
                domain: labels.into_iter().next().unwrap_or_default(),
                not_after: rfc3339(not_after_ms),
                days_left: (not_after_ms - now).div_euclid(86_400_000),
            }
        })
        .collect();
    let engines = m
        .engine_circuit_state
        .snapshot()
        .into_iter()
        .map(|(labels, g)| EngineStatus {
            engine: labels.into_iter().next().unwrap_or_default(),
            circuit: match g.get() {
                circuit::CLOSED => "closed",
                circuit::HALF_OPEN => "half_open",
                _ => "open",
            }
            .into(),
        })
        .collect();
    let uptime = s.uptime_secs();
    Ok(StatusReport {
        state: if s.is_draining() {
            "draining"
        } else {
            "serving"
        }
        .into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at: rfc3339(s.ops().started_ms()),
        uptime_seconds: uptime,
        calls,
        websockets: u64::try_from(m.websockets_active.get()).unwrap_or(0),
        certificates,
        engines,
    })
}

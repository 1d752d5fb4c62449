//! API authentication: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::store::calls::Scope;
use crate::store::keys::{self, Principal};

/// An authenticated caller. Extracting it answers 401 for a missing, malformed, unknown,
/// revoked or expired key, all with the same message.
pub struct Auth(pub Principal);

impl Auth {
    pub fn is_admin(&self) -> bool {
        matches!(self.0, Principal::Admin { .. })
    }

    /// Admin-only endpoints do not exist for a tenant key: 404, as for other tenants' data.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::for_status(axum::http::StatusCode::NOT_FOUND))
        }
    }

    pub fn scope(&self) -> Scope {
        match &self.0 {
            Principal::Admin { .. } => Scope::All,
            Principal::Tenant { tenant_id, .. } => Scope::Tenant(*tenant_id),
        }
    }
}

fn presented_key(parts: &Parts) -> Option<&str> {
    if let Some(v) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    parts.headers.get("x-api-key")?.to_str().ok().map(str::trim)
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let has_header = parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
            || parts.headers.contains_key("x-api-key");
        let Some(key) = presented_key(parts).map(str::to_owned) else {
            return Err(ApiError::unauthorized(if has_header {
                "malformed credentials; send Authorization: Bearer <key> or X-API-Key: <key>"
            } else {
                "missing API key; send Authorization: Bearer <key> or X-API-Key: <key>"
            }));
        };
        let principal = state
            .store()
            .run(move |c| keys::authenticate(c, &key))
            .await?;
        match principal {
            Some(p) => {
                tracing::Span::current().record("principal", tracing::field::debug(&p));
                Ok(Auth(p))
            }
            None => Err(ApiError::unauthorized(
                "invalid, expired or revoked API key",
            )),
        }
    }
}

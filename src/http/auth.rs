//! API authentication: `Authorization: Bearer <key>` or `X-API-Key: <key>`, or the
//! dashboard's session cookie. A cookie is sent by the browser on its own, so a request it
//! authenticates must also prove it comes from our own pages when it changes state (CSRF):
//! the cookie is `SameSite=Strict`, and [`same_origin`] checks `Sec-Fetch-Site`/`Origin`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};

use super::{ApiError, AppState};
use crate::store::calls::Scope;
use crate::store::keys::{self, Principal};
use crate::store::sessions;

/// The dashboard's session cookie.
pub const SESSION_COOKIE: &str = "voicectl_session";

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether a browser request comes from one of our own pages: `Sec-Fetch-Site` says so
/// (`same-origin`, or `none` for a user typing the URL), or, from a browser too old to send
/// it, `Origin` names the host the request went to. Neither header: refused, since every
/// browser that could be tricked into the request sends one of them.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return matches!(site.to_str(), Ok("same-origin" | "none"));
    }
    let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

/// The refusal of a cross-site state change.
pub fn csrf_refused() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "cross_site_refused",
        "cross-site request refused: changes through a dashboard session must come from the dashboard's own pages",
    )
}

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
        if !has_header && let Some(cookie) = cookie(&parts.headers, SESSION_COOKIE) {
            return session(parts, state, cookie.to_owned()).await;
        }
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

/// A dashboard session acts as its principal's key; a state change must be same-origin.
async fn session(parts: &Parts, state: &AppState, cookie: String) -> Result<Auth, ApiError> {
    let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && !same_origin(&parts.headers) {
        return Err(csrf_refused());
    }
    let principal = state
        .store()
        .read(move |c| sessions::authenticate(c, &cookie))
        .await?;
    match principal {
        Some(p) => {
            tracing::Span::current().record("principal", tracing::field::debug(&p));
            Ok(Auth(p))
        }
        None => Err(ApiError::unauthorized(
            "your dashboard session has ended; log in again",
        )),
    }
}

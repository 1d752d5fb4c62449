//! Browser calls (SPEC §9), WHIP-style: `POST /web-calls` with an `application/sdp` offer
//! answers `201` with the SDP answer and `Location: /api/v1/web-calls/{id}`; `DELETE` there
//! hangs up. Tenant keys and dashboard sessions only: a browser call belongs to a tenant.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{Json, Path};
use super::{ApiError, AppState, Auth};
use crate::calls::WebCallError;
use crate::http::openapi::Errors;
use crate::store::calls::{Call, Scope};
use crate::store::keys::Principal;
use crate::telephony::webrtc::{MAX_OFFER_BYTES, WebRtcError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(end))
}

impl From<WebCallError> for ApiError {
    fn from(e: WebCallError) -> Self {
        match e {
            WebCallError::Call(c) => c.into(),
            WebCallError::Rtc(WebRtcError::BadOffer(m)) => {
                ApiError::bad_request("sdp", format!("not a usable SDP offer: {m}"))
            }
            WebCallError::Rtc(WebRtcError::NoAudio) => {
                ApiError::bad_request("sdp", "the offer has no Opus audio")
            }
            WebCallError::Rtc(WebRtcError::Full) | WebCallError::Full => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_calls",
                "over the concurrent-call limit; try again later",
            ),
            e @ (WebCallError::NoEndpoint
            | WebCallError::Rtc(WebRtcError::Down | WebRtcError::Codec(_))) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "webrtc_unavailable",
                e.to_string(),
            ),
        }
    }
}

/// Starts a browser call (WHIP-style): the SDP offer in, the SDP answer out, `Location` to
/// `DELETE` to hang up. Tenant keys and tenant dashboard logins only.
#[utoipa::path(post, path = "/web-calls", tag = "calls", operation_id = "web_call_create",
    request_body(content = String, content_type = "application/sdp"),
    responses((status = 201, content_type = "application/sdp", body = String,
        headers(("Location" = String, description = "The call to DELETE"),
                ("x-call-id" = String, description = "The call's id"))), Errors))]
async fn create(
    State(s): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    let Principal::Tenant { tenant_id, .. } = &auth.0 else {
        return Err(ApiError::bad_request(
            "key",
            "a browser call belongs to a tenant: use a tenant key or a tenant's dashboard login",
        ));
    };
    check_offer(&headers, &body)?;
    let (call, answer) = s.calls().web_call(*tenant_id, &body, None).await?;
    Ok(answered(&call, answer))
}

/// An offer we can read: `application/sdp`, within [`MAX_OFFER_BYTES`].
fn check_offer(headers: &HeaderMap, body: &str) -> Result<(), ApiError> {
    let is_sdp = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/sdp"));
    if !is_sdp {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the SDP offer as application/sdp",
        ));
    }
    if body.len() > MAX_OFFER_BYTES {
        return Err(ApiError::bad_request(
            "sdp",
            format!("the offer is larger than {MAX_OFFER_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// `201` with the SDP answer, `Location` to hang up and the call's id.
fn answered(call: &Call, answer: String) -> Response {
    let location = format!("/api/v1/web-calls/{}", call.id);
    let mut resp = (StatusCode::CREATED, answer).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(call.id.as_str()) {
        h.insert("x-call-id", v);
    }
    resp
}

/// The public side of web links (SPEC §9): `GET /talk/<token>` is a page with a Talk button,
/// `POST /talk/<token>` takes its offer. No key: the link's token stands for its tenant, each
/// client address may start a few calls a minute, and the tenant's call caps apply.
pub fn talk_routes() -> axum::Router<AppState> {
    axum::Router::new().route(
        "/talk/{token}",
        axum::routing::get(talk_page).post(talk_call),
    )
}

const TALK_HTML: &str = include_str!("ui/assets/talk.html");

async fn talk_page(State(s): State<AppState>, Path(token): Path<String>) -> Response {
    let open = s
        .store()
        .read(move |c| crate::store::weblinks::open(c, &token))
        .await;
    let (status, body) = match open {
        Ok(Some(_)) => (StatusCode::OK, TALK_HTML.to_owned()),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            "<!doctype html><title>Link not found</title><p>This link does not exist or has expired.</p>".to_owned(),
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             media-src 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn talk_call(
    State(s): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    check_offer(&headers, &body)?;
    let open = s
        .store()
        .read(move |c| crate::store::weblinks::open(c, &token))
        .await?
        .ok_or_else(|| ApiError::for_status(StatusCode::NOT_FOUND))?;
    let ip = s.ops().client_ip(peer.ip(), &headers);
    s.ops().check_talk_call(ip).map_err(ApiError::from)?;
    tracing::info!(link = %open.link_id, "browser call through a web link");
    let (call, answer) = s
        .calls()
        .web_call(open.tenant_id, &body, open.max_duration_secs)
        .await?;
    Ok(answered(&call, answer))
}

/// Hangs up a browser call.
#[utoipa::path(delete, path = "/web-calls/{id}", tag = "calls", params(("id" = String, Path)),
    responses((status = 200, body = Call), Errors))]
async fn end(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Call>, ApiError> {
    let scope: Scope = auth.scope();
    Ok(Json(s.calls().web_call_end(scope, &id).await?))
}

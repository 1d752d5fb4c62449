//! Twilio's side of the HTTP surface: signed webhooks (inbound voice, answer, status, AMD)
//! and the media-stream WebSocket. Every request must carry a valid `X-Twilio-Signature`
//! computed over our public URL; otherwise 403 and nothing changes.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::error::Path;
use super::{ApiError, AppState};
use crate::domain::ids::CallId;
use crate::ops::net::ClientIp;
use crate::telephony::twilio::{signature, stream, twiml as render, webhook};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/voice", post(voice))
        .route("/answer/{id}", post(answer))
        .route("/status/{id}", post(status))
        .route("/amd/{id}", post(amd))
        .route("/dial/{id}", post(dial))
        .route("/whisper/{id}", post(whisper))
        .route("/media", get(media))
}

fn forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "invalid_signature",
        "missing or invalid X-Twilio-Signature",
    )
}

/// Checks the signature over `url` and the form `params`.
fn verify(
    state: &AppState,
    headers: &HeaderMap,
    url: &str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let cfg = &state.config().twilio;
    if !cfg.validate_signatures {
        return Ok(());
    }
    let sig = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if signature::validate(cfg.auth_token.expose(), url, params, sig) {
        Ok(())
    } else {
        // The path only: a query string may carry tokens and never goes to the logs.
        let path = reqwest::Url::parse(url).map_or_else(|_| String::new(), |u| u.path().to_owned());
        tracing::warn!(
            path,
            "rejected a Twilio request with a bad or missing signature"
        );
        Err(forbidden())
    }
}

/// A signed, form-encoded webhook: parsed params after the signature checked out.
async fn signed_form(
    state: &AppState,
    uri: &OriginalUri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<(String, String)>, ApiError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form && !body.is_empty() {
        return Err(ApiError::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let path = uri.0.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!("{}{path}", state.config().public_url());
    verify(state, headers, &url, &params)?;
    Ok(params)
}

fn twiml(script: crate::telephony::Script) -> Response {
    let xml = render::render(&script);
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], xml).into_response()
}

fn call_id(id: &str) -> Result<CallId, ApiError> {
    CallId::parse(id).ok_or_else(|| ApiError::not_found("call"))
}

async fn voice(
    State(s): State<AppState>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = signed_form(&s, &uri, &headers, &body).await?;
    Ok(twiml(
        s.calls().inbound(webhook::inbound_call(&params)).await,
    ))
}

async fn answer(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = signed_form(&s, &uri, &headers, &body).await?;
    let id = call_id(&id)?;
    Ok(twiml(
        s.calls()
            .answer(id.as_str(), webhook::answer_update(&params))
            .await,
    ))
}

async fn status(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let params = signed_form(&s, &uri, &headers, &body).await?;
    let id = call_id(&id)?;
    if !s.calls().knows(id.as_str()).await {
        tracing::warn!(call_id = %id, "status callback for an unknown call");
        return Err(ApiError::not_found("call"));
    }
    let Some(update) = webhook::status_update(&params) else {
        return Err(ApiError::bad_request("CallStatus", "missing or unknown"));
    };
    s.calls().carrier_update(id.as_str(), update).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A transfer's `<Dial action>`: how the dial ended; answers what the call does next.
async fn dial(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = signed_form(&s, &uri, &headers, &body).await?;
    let id = call_id(&id)?;
    if !s.calls().knows(id.as_str()).await {
        return Err(ApiError::not_found("call"));
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(status) = get("DialCallStatus") else {
        return Err(ApiError::bad_request("DialCallStatus", "missing"));
    };
    let duration = get("DialCallDuration").and_then(|d| d.parse().ok());
    Ok(twiml(
        s.calls().dial_ended(id.as_str(), status, duration).await,
    ))
}

/// A warm transfer's `<Number url>`: what the person answering hears first.
async fn whisper(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    signed_form(&s, &uri, &headers, &body).await?;
    let id = call_id(&id)?;
    Ok(twiml(s.calls().whisper(id.as_str())))
}

async fn amd(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let params = signed_form(&s, &uri, &headers, &body).await?;
    let id = call_id(&id)?;
    let update = webhook::amd_update(&params)
        .ok_or_else(|| ApiError::bad_request("AnsweredBy", "missing"))?;
    s.calls().carrier_update(id.as_str(), update).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The media stream. The upgrade must be signed over our `ws(s)://…/twilio/media` URL with
/// no params; the per-call token is checked on `start` by the bridge.
async fn media(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    verify(&s, &headers, &s.config().media_url(), &[])?;
    let ws = ws.map_err(|r| ApiError::new(r.status(), "invalid_request", r.body_text()))?;
    // Held for the life of the socket: caps concurrent streams per client address.
    let guard = s.ops().websocket_guard(ip)?;
    let m = s.calls().clone();
    Ok(ws
        .max_message_size(256 * 1024)
        // Twilio's frames are a few hundred bytes; a larger frame is refused from its header,
        // before its payload is buffered (the default would take 16 MiB first).
        .max_frame_size(64 * 1024)
        .read_buffer_size(crate::audio::WS_READ_BUFFER)
        .on_upgrade(move |socket| async move {
            if let Some((leg, start)) = stream::accept(socket).await {
                m.serve_stream(leg, start).await;
            }
            drop(guard);
        }))
}

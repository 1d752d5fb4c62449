//! The one error shape of SPEC §3: `{"error": {"code": "snake_case", "message": "..."}}`.
//! Every failure path ends here, including axum's own rejections and the router's 404/405.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::domain::Invalid;
use crate::ops::Refused;
use crate::proxy::ProxyError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {message}"),
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; the server log has details (look up this request's x-request-id)",
        )
    }

    /// The default error for a bare status produced outside our handlers.
    pub fn for_status(status: StatusCode) -> Self {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no such route"),
            StatusCode::METHOD_NOT_ALLOWED => {
                ("method_not_allowed", "method not allowed on this route")
            }
            StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "request body too large"),
            StatusCode::REQUEST_TIMEOUT => ("timeout", "request took too long"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            StatusCode::UNAUTHORIZED => ("unauthorized", "authentication required"),
            StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "too many requests"),
            StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "service unavailable"),
            s if s.is_server_error() => ("internal_error", "internal error"),
            _ => ("invalid_request", "invalid request"),
        };
        Self::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(what),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::internal()
            }
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::bad_request(&e.field, e.message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        match r {
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            JsonRejection::JsonSyntaxError(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("body is not valid JSON: {}", e.body_text()),
            ),
            JsonRejection::JsonDataError(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                // serde names the field and what was wrong with it.
                e.body_text(),
            ),
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => ApiError::for_status(status),
            other => ApiError::new(status, "invalid_request", other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text())
    }
}

/// `axum::Json`, but failures answer in our error shape.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` with our error shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path` with our error shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// Rewrites any error response that is not already JSON (router 404/405, body-limit 413,
/// timeouts) into the error shape, so clients parse one format for every failure.
pub async fn shape_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, _) = resp.into_parts();
    let mut new = ApiError::for_status(status).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.headers_mut().insert(name.clone(), value.clone());
        }
    }
    new
}

/// Refusals of the ops layer (rate limits, oversized headers) in the SPEC shape.
impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        let message = r.to_string();
        match r {
            Refused::RateLimited {
                retry_after_secs, ..
            } => {
                let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
                e.retry_after = Some(retry_after_secs);
                e
            }
            Refused::HeadersTooLarge { .. } => ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                message,
            ),
        }
    }
}

/// Proxy failures in the SPEC shape; details of upstream failures go to the log (see
/// `proxy::forward`), not to the client.
impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        // Details of upstream failures go to the log (see `forward`), not to the client.
        let e = match &self {
            ProxyError::NoRoute => ApiError::for_status(StatusCode::NOT_FOUND),
            ProxyError::NotFound => ApiError::not_found("file"),
            ProxyError::BadRequest(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", *m)
            }
            ProxyError::MethodNotAllowed(allow) => {
                let mut resp = ApiError::for_status(StatusCode::METHOD_NOT_ALLOWED).into_response();
                resp.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                return resp;
            }
            ProxyError::Connect(_) | ProxyError::Upstream(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the upstream server is unavailable or failed",
            ),
            ProxyError::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                "the upstream server did not answer in time",
            ),
        };
        e.into_response()
    }
}

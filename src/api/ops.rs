//! The ops layer on every request — client address, header-size and per-IP rate limits,
//! request metrics — and the `GET /metrics` endpoint.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::{ApiError, AppState};
use crate::ops::LimitClass;
use crate::ops::net::{self, ClientIp};

/// Unauthenticated ops routes (merged into the top-level router).
pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Middleware (`from_fn_with_state`): resolves the client address (available to handlers as
/// [`ClientIp`]), refuses oversized headers (431) and over-budget clients (429) before any
/// handler or authentication work, and records every answer in the request metrics.
pub async fn middleware(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let ops = state.ops();
    let ip = match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(peer)) => ops.client_ip(peer.ip(), req.headers()),
        None => net::UNKNOWN,
    };
    req.extensions_mut().insert(ClientIp(ip));
    let route = route_label(&req);
    let method = method_label(req.method());
    let uri = req.uri();
    let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let admitted = ops
        .check_header_size(uri_len, req.headers())
        .and_then(|()| match LimitClass::for_path(req.uri().path()) {
            Some(class) => ops.check_request_rate(class, ip),
            None => Ok(()),
        });
    let resp = match admitted {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError::from(e).into_response(),
    };
    ops.metrics()
        .record_http(method, &route, resp.status().as_u16(), started.elapsed());
    resp
}

/// The route template that matched (`/api/v1/calls/{id}`), never the raw path, so metrics
/// stay bounded whatever clients request.
fn route_label(req: &Request) -> String {
    match req.extensions().get::<MatchedPath>() {
        // Nested routers' fallbacks match through a private catch-all parameter.
        Some(p) if !p.as_str().contains("__private__") => p.as_str().to_owned(),
        _ => "unmatched".to_owned(),
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn metrics(State(state): State<AppState>, ClientIp(ip): ClientIp) -> Response {
    let ops = state.ops();
    if !ops.metrics_allowed(ip) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "metrics are served only to loopback and to addresses in server.metrics_allow",
        )
        .into_response();
    }
    ops.metrics().draining.set(i64::from(state.is_draining()));
    (
        [(header::CONTENT_TYPE, crate::ops::metrics::CONTENT_TYPE)],
        ops.metrics().render(),
    )
        .into_response()
}

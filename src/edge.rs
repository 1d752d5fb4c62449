//! The listeners (SPEC §4): `https_listen` (rustls, HTTP/1.1 + h2, WebSocket upgrades),
//! `http_listen` (ACME HTTP-01 answers, everything else 308 to HTTPS) and `listen` (plain
//! HTTP). One accept loop serves them all: every connection gets its own task, the peer
//! address as `ConnectInfo` (the rate limiter keys on it) and, over TLS, `Scheme::Https`.
//!
//! Shutdown: when `stop` is cancelled a listener stops accepting, asks its open connections
//! to finish (idle keep-alives close, in-flight requests complete) and waits a bounded time.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::config::{AcmeChallenge, Config, TlsMode};
use crate::ops::net::Scheme;
use crate::tls::Tls;
use crate::tls::resolver::ACME_TLS_ALPN;

/// A client that has not finished its TLS handshake by then is dropped, so slow or silent
/// clients cannot pile up half-open connections.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown is signalled, open connections get this long to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

pub const HSTS: &str = "max-age=31536000";

/// The rustls configuration of the HTTPS listener: TLS 1.2 and 1.3 only, certificates from
/// the live resolver, ALPN h2 and http/1.1 (plus acme-tls/1 for TLS-ALPN-01 validation).
pub fn server_config(tls: &Tls) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::cert::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(tls.resolver());
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if tls.mode() == TlsMode::Acme && tls.challenge() == AcmeChallenge::TlsAlpn01 {
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(cfg))
}

/// Plain HTTP (`server.listen`).
pub fn spawn_plain(listener: TcpListener, app: Router, stop: CancellationToken) -> JoinHandle<()> {
    spawn_plain_router(listener, app, stop, "listen")
}

/// HTTPS (`server.https_listen`).
pub fn spawn_https(
    listener: TcpListener,
    app: Router,
    config: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(accept_loop(
        listener,
        stop,
        "https_listen",
        move |stream, peer, watcher| {
            let acceptor = acceptor.clone();
            let app = app.clone();
            async move {
                let mut tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                // A TLS-ALPN-01 validation is complete once the handshake is: no HTTP follows.
                if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    tracing::debug!(%peer, "answered a TLS-ALPN-01 validation");
                    let _ = tls.shutdown().await;
                    return;
                }
                serve_conn(tls, service(app, peer, true), watcher).await;
            }
        },
    ))
}

/// Port 80 (`server.http_listen`): ACME HTTP-01 answers, everything else 308 to `base`.
pub fn spawn_http(
    listener: TcpListener,
    tls: Tls,
    base: String,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let app = http_app(tls, base);
    spawn_plain_router(listener, app, stop, "http_listen")
}

fn spawn_plain_router(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    name: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(accept_loop(
        listener,
        stop,
        name,
        move |stream, peer, watcher| {
            let svc = service(app.clone(), peer, false);
            serve_conn(stream, svc, watcher)
        },
    ))
}

/// Where the port-80 redirect points: `public_url` when it is HTTPS, else
/// `https://<domain>` (with the HTTPS port when it is not 443). Never the request's Host.
pub fn redirect_base(config: &Config, https_port: Option<u16>) -> String {
    let public = config.server.public_url.trim_end_matches('/');
    if public.starts_with("https://") {
        return public.to_owned();
    }
    match https_port {
        Some(p) if p != 443 => format!("https://{}:{p}", config.server.domain),
        _ => format!("https://{}", config.server.domain),
    }
}

pub fn http_app(tls: Tls, base: String) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(http01))
        .fallback(redirect)
        .with_state((tls, Arc::<str>::from(base)))
}

async fn http01(State((tls, _)): State<(Tls, Arc<str>)>, Path(token): Path<String>) -> Response {
    match tls.http_token(&token) {
        Some(ka) => ([(header::CONTENT_TYPE, "application/octet-stream")], ka).into_response(),
        None => (StatusCode::NOT_FOUND, "no such challenge\n").into_response(),
    }
}

async fn redirect(State((_, base)): State<(Tls, Arc<str>)>, uri: Uri) -> Response {
    // Only the path and query of the request are reused: the host comes from our config, so a
    // forged Host header cannot turn this into an open redirect.
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let pq = if pq.starts_with('/') { pq } else { "/" };
    let location = format!("{base}{pq}");
    match HeaderValue::from_str(&location) {
        Ok(v) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, v)]).into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// Headers every HTTPS response carries unless the handler (or a proxied site) set its own.
fn security_headers(h: &mut HeaderMap) {
    for (name, value) in [
        (header::STRICT_TRANSPORT_SECURITY, HSTS),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "strict-origin-when-cross-origin"),
        (header::X_FRAME_OPTIONS, "SAMEORIGIN"),
    ] {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    }
}

/// The router as a hyper service for one connection: peer address and scheme go into the
/// request extensions; HTTPS responses get the security headers.
fn service(
    app: Router,
    peer: SocketAddr,
    https: bool,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if https {
            req.extensions_mut().insert(Scheme::Https);
        }
        let mut app = app.clone();
        async move {
            let mut resp = match app.call(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if https {
                security_headers(resp.headers_mut());
            }
            Ok::<_, Infallible>(resp)
        }
    })
}

async fn serve_conn<I, S, F>(io: I, svc: S, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response,
            Error = Infallible,
            Future = F,
        > + Send
        + 'static,
    F: Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

async fn accept_loop<H, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    name: &'static str,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream, peer, graceful.watcher()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(CLOSE_GRACE) => {
            tracing::warn!(listener = name, "connections still open after the grace period; closing");
        }
    }
}

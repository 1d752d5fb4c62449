//! The listeners (SPEC §4): `https_listen` (rustls, HTTP/1.1 + h2, WebSocket upgrades),
//! `http_listen` (ACME HTTP-01 answers, everything else 308 to HTTPS) and `listen` (plain
//! HTTP). One accept loop serves them all: every connection gets its own task, the peer
//! address as `ConnectInfo` (the rate limiter keys on it) and, over TLS, `Scheme::Https`.
//!
//! Shutdown: when `stop` is cancelled a listener stops accepting, asks its open connections
//! to finish (idle keep-alives close, in-flight requests complete) and waits a bounded time.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::config::{AcmeChallenge, Config, TlsMode};
use crate::ops::metrics::Metrics;
use crate::ops::net::{IpNet, Scheme};
use crate::ops::ratelimit::{ConnGuard, ConnLimiter};
use crate::tls::Tls;
use crate::tls::resolver::ACME_TLS_ALPN;

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
    // Our suite order (strongest first) decides, not the client's: a client cannot steer the
    // handshake to the weakest suite both sides share (testssl.sh rates that HIGH).
    cfg.ignore_client_order = true;
    if tls.mode() == TlsMode::Acme && tls.challenge() == AcmeChallenge::TlsAlpn01 {
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(cfg))
}

/// Plain HTTP (`server.listen`).
pub fn spawn_plain(
    listener: TcpListener,
    app: Router,
    gate: Arc<Gate>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    spawn_plain_router(listener, app, gate, stop, "listen")
}

/// HTTPS (`server.https_listen`).
pub fn spawn_https(
    listener: TcpListener,
    app: Router,
    config: Arc<rustls::ServerConfig>,
    gate: Arc<Gate>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(accept_loop(
        listener,
        stop,
        "https_listen",
        gate,
        move |stream, peer, ctx| {
            let acceptor = acceptor.clone();
            let app = app.clone();
            async move {
                // No timeout of its own: the connection's head deadline covers the handshake.
                let mut tls = match acceptor.accept(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                // A TLS-ALPN-01 validation is complete once the handshake is: no HTTP follows.
                if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    tracing::debug!(%peer, "answered a TLS-ALPN-01 validation");
                    let _ = tls.shutdown().await;
                    return;
                }
                let svc = service(app, peer, true, ctx.act.clone(), ctx.gate.timing.body);
                serve_conn(tls, svc, ctx).await;
            }
        },
    ))
}

/// Port 80 (`server.http_listen`): ACME HTTP-01 answers, everything else 308 to `base`.
pub fn spawn_http(
    listener: TcpListener,
    tls: Tls,
    base: String,
    gate: Arc<Gate>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let app = http_app(tls, base);
    spawn_plain_router(listener, app, gate, stop, "http_listen")
}

fn spawn_plain_router(
    listener: TcpListener,
    app: Router,
    gate: Arc<Gate>,
    stop: CancellationToken,
    name: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(accept_loop(
        listener,
        stop,
        name,
        gate,
        move |stream, peer, ctx| {
            let svc = service(
                app.clone(),
                peer,
                false,
                ctx.act.clone(),
                ctx.gate.timing.body,
            );
            serve_conn(stream, svc, ctx)
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
/// request extensions; HTTPS responses get the security headers. Each request counts as
/// activity on `act` until its response body is done, and its body must arrive within
/// `body_timeout`.
fn service(
    app: Router,
    peer: SocketAddr,
    https: bool,
    act: Arc<Activity>,
    body_timeout: Duration,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let in_flight = act.begin();
        let mut req = req.map(|b| DeadlineBody::new(b, body_timeout));
        req.extensions_mut().insert(ConnectInfo(peer));
        if https {
            req.extensions_mut().insert(Scheme::Https);
        }
        let mut app = app.clone();
        async move {
            let resp = match app.call(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let mut resp = resp.map(|b| {
                Body::new(Tracked {
                    inner: b,
                    _in_flight: in_flight,
                })
            });
            if https {
                security_headers(resp.headers_mut());
            }
            Ok::<_, Infallible>(resp)
        }
    })
}

async fn serve_conn<I, S, F>(io: I, svc: S, ctx: ConnCtx)
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
    let t = ctx.gate.timing;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(t.header);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(t.h2_keepalive_interval)
        .keep_alive_timeout(t.h2_keepalive_timeout)
        .max_concurrent_streams(t.h2_max_streams);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = ctx.close.cancelled() => {}
    }
    // Shutdown or idle: idle keep-alives close now, requests in flight complete.
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The listener limits (`[limits]`, SPEC §10), shared by every listener of one server so the
/// caps are global.
pub struct Gate {
    max_connections: usize,
    per_ip: ConnLimiter<IpAddr>,
    /// Load balancers in `server.trusted_proxies` carry many clients: no per-IP cap for them.
    exempt: Vec<IpNet>,
    open: AtomicUsize,
    timing: Timing,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    header: Duration,
    idle: Duration,
    body: Duration,
    h2_keepalive_interval: Duration,
    h2_keepalive_timeout: Duration,
    h2_max_streams: u32,
}

impl Gate {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Arc<Gate> {
        let l = &config.limits;
        let max_connections = match l.max_connections {
            0 => derived_max_connections(),
            n => n as usize,
        };
        tracing::debug!(
            max_connections,
            per_ip = l.max_connections_per_ip,
            "listener limits"
        );
        Arc::new(Gate {
            max_connections,
            per_ip: ConnLimiter::new(l.max_connections_per_ip),
            exempt: crate::ops::net::parse_list(&config.server.trusted_proxies).unwrap_or_default(),
            open: AtomicUsize::new(0),
            timing: Timing {
                header: l.header_timeout.0,
                idle: l.idle_timeout.0,
                body: l.body_timeout.0,
                h2_keepalive_interval: l.http2_keepalive_interval.0,
                h2_keepalive_timeout: l.http2_keepalive_timeout.0,
                h2_max_streams: l.http2_max_streams,
            },
            metrics,
        })
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// A slot for a connection from `peer`, or None (counted) when a cap is reached.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admission> {
        let peer = crate::ops::net::canonical(peer);
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused("global");
            return None;
        }
        let slot = if self.exempt.iter().any(|n| n.contains(peer)) {
            None
        } else {
            match self.per_ip.try_acquire(crate::ops::net::limit_key(peer)) {
                Ok(s) => Some(s),
                Err(_) => {
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    self.refused("per_ip");
                    return None;
                }
            }
        };
        self.metrics.connections_open.inc();
        Some(Admission {
            gate: self.clone(),
            _slot: slot,
        })
    }

    fn refused(&self, reason: &str) {
        self.metrics.connections_refused.with(&[reason]).inc();
    }
}

/// The descriptor limit less a quarter (at least 256) kept for calls' outbound connections,
/// the database and files.
fn derived_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and has no other preconditions.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    let spare = (nofile / 4).max(256);
    nofile.saturating_sub(spare).max(64)
}

/// One admitted connection. It travels with the socket (see [`Counted`]), so a connection
/// upgraded to a WebSocket keeps its slot until the socket closes.
struct Admission {
    gate: Arc<Gate>,
    _slot: Option<ConnGuard<IpAddr>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        self.gate.metrics.connections_open.dec();
    }
}

/// A socket that holds its [`Admission`].
struct Counted<S> {
    io: S,
    _admission: Admission,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What one connection has been doing, for the head deadline and the idle limit.
struct Activity {
    started: Instant,
    requests: AtomicU64,
    /// Signalled by the first request, which replaces the head deadline with the idle limit.
    first: tokio::sync::Notify,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` of the last request start or end.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            first: tokio::sync::Notify::new(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Release);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        if self.requests.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first.notify_one();
        }
        InFlight(self.clone())
    }
}

/// A request being answered; ends when its response body is done (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection task needs besides its socket.
#[derive(Clone)]
struct ConnCtx {
    gate: Arc<Gate>,
    act: Arc<Activity>,
    /// Cancelled on shutdown (the listener's stop) or when the connection idles out.
    close: CancellationToken,
}

/// Runs one connection (`work`: TLS handshake, protocol detection, requests) under the
/// deadlines: no complete request head within `header_timeout` of accept drops it; no
/// request in flight for `idle_timeout` closes it gracefully.
async fn supervise(work: impl Future<Output = ()>, ctx: &ConnCtx, peer: SocketAddr) {
    let t = ctx.gate.timing;
    tokio::pin!(work);
    let mut idle_closed = false;
    loop {
        let act = &ctx.act;
        let wake = if act.requests.load(Ordering::Acquire) == 0 {
            act.started + t.header
        } else if idle_closed {
            // Gracefully closing: whatever is still in flight gets one more idle period.
            Instant::now() + t.idle
        } else {
            act.started + Duration::from_millis(act.last_ms.load(Ordering::Acquire)) + t.idle
        };
        let waiting_first = act.requests.load(Ordering::Acquire) == 0;
        tokio::select! {
            _ = &mut work => return,
            _ = tokio::time::sleep_until(wake) => {}
            _ = act.first.notified(), if waiting_first => continue,
        }
        if act.requests.load(Ordering::Acquire) == 0 {
            if act.started.elapsed() >= t.header {
                tracing::debug!(%peer, "no request head in time; closing");
                ctx.gate.refused("head_timeout");
                return;
            }
            continue;
        }
        if act.in_flight.load(Ordering::Acquire) > 0 {
            continue;
        }
        let idle_for = act
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(act.last_ms.load(Ordering::Acquire)));
        if idle_for < t.idle {
            continue;
        }
        if idle_closed {
            return;
        }
        tracing::debug!(%peer, "idle connection; closing");
        ctx.gate.refused("idle");
        ctx.close.cancel();
        idle_closed = true;
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> http_body::Body for Tracked<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that must arrive in full by a deadline (`limits.body_timeout`), so a
/// client trickling bytes cannot hold a handler and its connection for ever.
struct DeadlineBody<B> {
    inner: B,
    deadline: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, within: Duration) -> Self {
        Self {
            inner,
            deadline: Instant::now() + within,
            timer: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body not received within the time limit")]
struct BodyTimeout;

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn accept_loop<H, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    name: &'static str,
    gate: Arc<Gate>,
    handle: H,
) where
    H: Fn(Counted<TcpStream>, SocketAddr, ConnCtx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Every connection task holds a sender; when all are gone, all connections are.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over a cap: dropping the stream closes it at once, before any read.
                    let Some(admission) = gate.admit(peer.ip()) else {
                        tracing::debug!(listener = name, %peer, "connection refused by a limit");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let ctx = ConnCtx {
                        gate: gate.clone(),
                        act: Activity::new(),
                        close: stop.child_token(),
                    };
                    let io = Counted { io: stream, _admission: admission };
                    let alive = alive.clone();
                    let work = handle(io, peer, ctx.clone());
                    tokio::spawn(async move {
                        supervise(work, &ctx, peer).await;
                        drop(alive);
                    });
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
    drop(alive);
    tokio::select! {
        _ = all_closed.recv() => {}
        _ = tokio::time::sleep(CLOSE_GRACE) => {
            tracing::warn!(listener = name, "connections still open after the grace period; closing");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_cap_leaves_descriptors_spare() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in derived_max_connections.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let n = derived_max_connections();
        assert!(n >= 64);
        if lim.rlim_cur >= 512 {
            assert!((n as u64) <= lim.rlim_cur - 256, "{n} of {}", lim.rlim_cur);
        }
    }

    #[test]
    fn caps_count_and_free_and_trusted_proxies_skip_the_per_ip_cap() {
        let mut cfg = Config::dev();
        cfg.limits.max_connections = 3;
        cfg.limits.max_connections_per_ip = 1;
        cfg.server.trusted_proxies = vec!["10.0.0.1".into()];
        let metrics = Arc::new(Metrics::new());
        let gate = Gate::new(&cfg, metrics.clone());
        let lb: IpAddr = "10.0.0.1".parse().unwrap();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let a = gate.admit(lb).expect("balancer");
        let b = gate
            .admit(lb)
            .expect("balancer again: exempt from the per-IP cap");
        let c = gate.admit(client).expect("client");
        assert!(
            gate.admit("::ffff:192.0.2.8".parse().unwrap()).is_none(),
            "global cap"
        );
        assert_eq!(metrics.connections_open.get(), 3);
        drop(a);
        assert!(gate.admit(client).is_none(), "per-IP cap");
        assert_eq!(metrics.connections_refused.with(&["global"]).get(), 1);
        assert_eq!(metrics.connections_refused.with(&["per_ip"]).get(), 1);
        drop((b, c));
        assert_eq!(metrics.connections_open.get(), 0);
        assert!(gate.admit(client).is_some());
    }
}

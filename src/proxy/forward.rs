//! Forwarding to an HTTP upstream: bodies stream both ways (never buffered), and `Upgrade`
//! requests (WebSocket and friends) become a byte-for-byte tunnel once both sides agree.

use std::error::Error as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{self, HeaderValue};
use axum::http::{Extensions, StatusCode, Uri, Version};
use axum::response::Response;
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep};

use super::headers::{set_forwarded, strip_hop_by_hop, upgrade_protocol};
use super::{Proxy, ProxyError, Timeouts, peer_of};
use crate::ops::net::Scheme;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Proxy {
    pub(super) async fn forward(
        &self,
        mut req: Request,
        uri: Uri,
        timeouts: Timeouts,
    ) -> Result<Response, ProxyError> {
        let peer = peer_of(&req);
        let trusted = self.peer_is_trusted(peer);
        let scheme = Scheme::of(req.extensions()).as_str();
        // The Host the client asked for goes to the upstream unchanged (like nginx's
        // `proxy_set_header Host $host`), so virtual hosts and absolute redirects work there.
        let (host, host_from_uri) = match req.uri().authority() {
            Some(a) => (HeaderValue::from_str(a.as_str()).ok(), true),
            None => (req.headers().get(header::HOST).cloned(), false),
        };
        // Only HTTP/1.1 has `Upgrade`; HTTP/2's extended CONNECT is not tunnelled.
        let upgrade = match req.version() {
            Version::HTTP_11 => upgrade_protocol(req.headers()),
            _ => None,
        };
        // Must be taken before the request is consumed, or the client side never upgrades.
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let slot = req.extensions_mut().remove::<super::TunnelSlot>();

        let (mut parts, body) = req.into_parts();
        let h = &mut parts.headers;
        strip_hop_by_hop(h);
        set_forwarded(h, peer, trusted, scheme, host.clone());
        if let Some(host) = host
            && (host_from_uri || !h.contains_key(header::HOST))
        {
            h.insert(header::HOST, host);
        }
        if let Some(proto) = &upgrade {
            h.insert(header::UPGRADE, proto.clone());
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        // Our own request extensions (peer address, request id, scheme) mean nothing upstream.
        parts.extensions = Extensions::new();
        let out = Request::from_parts(parts, body);

        let resp =
            match tokio::time::timeout(timeouts.response_header, self.client.request(out)).await {
                Err(_) => return Err(ProxyError::Timeout),
                Ok(Err(e)) => return Err(classify(&e)),
                Ok(Ok(resp)) => resp,
            };

        if let (Some(proto), Some(client_upgrade)) = (upgrade, client_upgrade)
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            return tunnel(resp, proto, client_upgrade, slot);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            Body::new(IdleBody::new(body, timeouts.body_idle)),
        ))
    }
}

/// The upstream agreed to switch protocols: answer the client with the same 101 and join the
/// two upgraded connections. The copy runs in its own task, as the 101 must reach the client
/// before its side of the upgrade can complete.
fn tunnel(
    mut resp: hyper::Response<hyper::body::Incoming>,
    proto: HeaderValue,
    client_upgrade: hyper::upgrade::OnUpgrade,
    slot: Option<super::TunnelSlot>,
) -> Result<Response, ProxyError> {
    let agreed = resp
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(proto.as_bytes()));
    if !agreed {
        return Err(ProxyError::Upstream(
            "101 Switching Protocols to a protocol the client did not ask for".into(),
        ));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "proxy upgrade failed");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        // Either side closing or failing ends the tunnel; that is normal for a WebSocket.
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "proxy tunnel closed");
        }
        drop(slot);
    });
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::UPGRADE, proto);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    Ok(Response::from_parts(parts, Body::empty()))
}

/// Connect failures are 502 (or 504 when the connect itself timed out); anything after the
/// request went out (reset, garbage, closed early) is 502.
fn classify(e: &hyper_util::client::legacy::Error) -> ProxyError {
    let chain = error_chain(e);
    let mut timed_out = false;
    let mut cur = e.source();
    while let Some(s) = cur {
        timed_out |= s
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        cur = s.source();
    }
    match (e.is_connect(), timed_out) {
        (true, true) => ProxyError::Timeout,
        (true, false) => ProxyError::Connect(chain),
        _ => ProxyError::Upstream(chain),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// An upstream response body that fails when the upstream goes silent for `idle`, so a
/// stalled upstream cannot pin a client connection forever. The timer is only created once
/// the body actually has to wait, which small responses (already buffered) never do.
struct IdleBody<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleBody<B> {
    fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
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
            Poll::Ready(frame) => {
                if let Some(t) = this.timer.as_mut() {
                    t.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(frame.map(|f| {
                    f.map_err(|e| {
                        let e: BoxError = e.into();
                        // The client sees a truncated response; say why in the log.
                        tracing::warn!(error = %error_chain(&*e), "upstream response body failed");
                        e
                    })
                }))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(timer.as_mut().poll(cx));
                tracing::warn!(idle_secs = idle.as_secs(), "upstream response body stalled");
                Poll::Ready(Some(Err("upstream response body idle timeout".into())))
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

//! Requests from "Twilio" to the app: signed form POSTs (or GETs with the parameters in the
//! query), routed through the configured origin overrides, and the per-call worker that
//! delivers callbacks one at a time in event order (or deliberately shuffled).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::model::{CallStatus, CallbackKind, CallbackRecord, SimEvent};
use super::{CallCell, Inner};
use crate::signature;

/// Where a public URL is actually sent, and the proxy headers that go with it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Routed {
    pub target: String,
    /// `(X-Forwarded-Proto, X-Forwarded-Host)` when an override applied.
    pub forwarded: Option<(String, String)>,
}

fn split_origin(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some((scheme, &rest[..end], &rest[end..]))
}

/// `https` and `wss` are one family, `http` and `ws` the other.
fn secure(scheme: &str) -> bool {
    matches!(scheme, "https" | "wss")
}

fn websocket(scheme: &str) -> bool {
    matches!(scheme, "ws" | "wss")
}

pub(crate) fn route(overrides: &[(String, String)], url: &str) -> Routed {
    let plain = || Routed {
        target: url.to_owned(),
        forwarded: None,
    };
    let Some((scheme, authority, tail)) = split_origin(url) else {
        return plain();
    };
    for (public, actual) in overrides {
        let (Some((ps, pa, _)), Some((as_, aa, _))) = (split_origin(public), split_origin(actual))
        else {
            continue;
        };
        if pa.eq_ignore_ascii_case(authority) && secure(ps) == secure(scheme) {
            let target_scheme = match (websocket(scheme), secure(as_)) {
                (true, true) => "wss",
                (true, false) => "ws",
                (false, true) => "https",
                (false, false) => "http",
            };
            let proto = if secure(scheme) { "https" } else { "http" };
            return Routed {
                target: format!("{target_scheme}://{aa}{tail}"),
                forwarded: Some((proto.to_owned(), authority.to_owned())),
            };
        }
    }
    plain()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum WebhookError {
    #[error("no response within the webhook timeout")]
    Timeout,
    #[error("{0}")]
    Request(String),
}

impl WebhookError {
    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else {
            // The source chain says what actually failed (connection refused, …).
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            Self::Request(msg)
        }
    }
}

pub(crate) fn encode_form(params: &[(String, String)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

impl Inner {
    /// Sends one signed webhook and returns the app's status and body.
    pub(crate) async fn send_webhook(
        &self,
        url: &str,
        method: &str,
        params: &[(String, String)],
    ) -> Result<(u16, String), WebhookError> {
        let token = &self.cfg.auth_token;
        let get = method.eq_ignore_ascii_case("GET");
        let (signed_url, sig) = if get {
            let sep = if url.contains('?') { '&' } else { '?' };
            let full = if params.is_empty() {
                url.to_owned()
            } else {
                format!("{url}{sep}{}", encode_form(params))
            };
            let sig = signature::compute(token, &full, &[]);
            (full, sig)
        } else {
            (url.to_owned(), signature::compute(token, url, params))
        };
        let routed = route(&self.cfg.origin_overrides, &signed_url);
        let mut req = if get {
            self.http.get(&routed.target)
        } else {
            self.http
                .post(&routed.target)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(encode_form(params))
        };
        req = req.header("X-Twilio-Signature", sig);
        if let Some((proto, host)) = routed.forwarded {
            req = req
                .header("X-Forwarded-Proto", proto)
                .header("X-Forwarded-Host", host);
        }
        let resp = req.send().await.map_err(WebhookError::from_reqwest)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(WebhookError::from_reqwest)?;
        Ok((status, body))
    }
}

/// A callback waiting for delivery.
#[derive(Debug)]
pub(crate) struct Callback {
    pub kind: CallbackKind,
    pub event: String,
    /// The status a `Status` callback reports.
    pub status: Option<CallStatus>,
    pub seq: Option<u32>,
    pub url: String,
    pub method: String,
    pub params: Vec<(String, String)>,
}

/// Starts the call's callback worker. Dropping every sender lets it finish what is queued
/// and then fire `done`.
pub(crate) fn spawn_worker(
    inner: &Arc<Inner>,
    cell: Arc<CallCell>,
) -> (mpsc::UnboundedSender<Callback>, oneshot::Receiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let shuffle = inner.cfg.shuffle_callbacks;
    let inner2 = inner.clone();
    inner.spawn(async move {
        worker(inner2, cell, rx, shuffle).await;
        let _ = done_tx.send(());
    });
    (tx, done_rx)
}

async fn worker(
    inner: Arc<Inner>,
    cell: Arc<CallCell>,
    mut rx: mpsc::UnboundedReceiver<Callback>,
    shuffle: bool,
) {
    // Real Twilio fires in order but over separate connections, so they can overtake each
    // other. Shuffling swaps each pair of status callbacks deterministically: tests can
    // assert the app reorders, without flakiness.
    let mut held: Option<Callback> = None;
    while let Some(cb) = rx.recv().await {
        if shuffle && cb.kind == CallbackKind::Status {
            match held.take() {
                None => held = Some(cb),
                Some(first) => {
                    deliver(&inner, &cell, cb).await;
                    deliver(&inner, &cell, first).await;
                }
            }
            continue;
        }
        deliver(&inner, &cell, cb).await;
    }
    if let Some(cb) = held {
        deliver(&inner, &cell, cb).await;
    }
}

async fn deliver(inner: &Inner, cell: &CallCell, cb: Callback) {
    let result = inner.send_webhook(&cb.url, &cb.method, &cb.params).await;
    let (http_status, error) = match result {
        Ok((s, _)) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    if let Some(s) = http_status {
        inner.state().last_callback_status = Some(s);
    }
    let sid = cell.sid.clone();
    let ev = match (cb.kind, cb.status, cb.seq) {
        (CallbackKind::Status, Some(status), Some(seq)) => Some(SimEvent::Callback {
            sid,
            status,
            seq,
            http_status,
        }),
        (CallbackKind::Amd, _, _) => Some(SimEvent::AmdCallback {
            sid,
            answered_by: cb.event.clone(),
            http_status,
        }),
        _ => None,
    };
    let at_ms = cell.elapsed_ms();
    cell.rec().callbacks.push(CallbackRecord {
        kind: cb.kind,
        event: cb.event,
        seq: cb.seq,
        url: cb.url,
        method: cb.method,
        params: cb.params,
        http_status,
        error,
        at_ms,
    });
    if let Some(ev) = ev {
        inner.emit(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_route_public_urls_to_the_real_listener() {
        let o = vec![(
            "https://voice.test".to_owned(),
            "http://127.0.0.1:8123".to_owned(),
        )];
        assert_eq!(
            route(&o, "https://voice.test/twilio/status?call=1"),
            Routed {
                target: "http://127.0.0.1:8123/twilio/status?call=1".into(),
                forwarded: Some(("https".into(), "voice.test".into()))
            }
        );
        assert_eq!(
            route(&o, "wss://voice.test/twilio/media").target,
            "ws://127.0.0.1:8123/twilio/media"
        );
        // Other hosts, other ports and the plain-http family are left alone.
        for url in [
            "https://other.test/x",
            "https://voice.test:8443/x",
            "http://voice.test/x",
        ] {
            assert_eq!(route(&o, url).target, url);
            assert_eq!(route(&o, url).forwarded, None);
        }
    }

    #[test]
    fn forms_encode_repeated_keys() {
        let p = vec![
            ("A".to_owned(), "x y".to_owned()),
            ("A".to_owned(), "+1&2".to_owned()),
        ];
        assert_eq!(encode_form(&p), "A=x+y&A=%2B1%262");
    }
}

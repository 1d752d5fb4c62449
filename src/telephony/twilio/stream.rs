//! Twilio's bidirectional media stream as a bridge [`Leg`]: the WebSocket from `connected`
//! and `start` (with our per-call parameters) to close.

use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};

use super::media::{self, Event};
use crate::domain::ids::CallId;
use crate::media::leg::{Leg, LegEvent, Refusal};
use crate::telephony::StreamStart;

/// Twilio must send `start` this soon after connecting.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Close code for a policy violation: a stream we will not serve.
const POLICY: u16 = 1008;

/// The phone's socket, unsplit: the bridge's `select!` drops its branch futures before
/// running a handler, so reading and writing never overlap and no split lock is needed per
/// frame.
pub struct TwilioLeg {
    ws: WebSocket,
    stream_sid: String,
    /// The message being looked at: events borrow from it until the next `recv`.
    last: Utf8Bytes,
    /// Scratch for mark names.
    name: String,
}

/// Reads up to `start`; on anything else the socket is closed and `None` returned.
pub async fn accept(mut ws: WebSocket) -> Option<(TwilioLeg, StreamStart)> {
    let start = match tokio::time::timeout(START_TIMEOUT, wait_for_start(&mut ws)).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            close(&mut ws, POLICY, "expected a start message").await;
            return None;
        }
        Err(_) => {
            tracing::warn!("media stream sent no start within 10 s; closing");
            close(&mut ws, POLICY, "no start message").await;
            return None;
        }
    };
    let param = |k: &str| start.custom_parameters.get(k).cloned().unwrap_or_default();
    let Some(call_id) = CallId::parse(&param("call_id")) else {
        tracing::warn!("media stream without a valid call_id parameter; closing");
        close(&mut ws, POLICY, "unknown call").await;
        return None;
    };
    let start = StreamStart {
        call_id,
        token: param("token"),
        stream_sid_ok: media::is_valid_stream_sid(&start.stream_sid),
        call_sid: start.call_sid,
        stream_sid: start.stream_sid,
    };
    let leg = TwilioLeg {
        ws,
        stream_sid: start.stream_sid.clone(),
        last: Utf8Bytes::from_static(""),
        name: String::with_capacity(24),
    };
    Some((leg, start))
}

async fn wait_for_start(stream: &mut WebSocket) -> Option<media::Start> {
    while let Some(msg) = stream.next().await {
        let Ok(Message::Text(text)) = msg else {
            return None;
        };
        match media::parse(&text) {
            Ok((Event::Connected, _)) => continue,
            Ok((Event::Start(s), _)) => return Some(s),
            _ => return None,
        }
    }
    None
}

/// How long we wait for the peer's own close frame after sending ours.
const PEER_CLOSE_WAIT: Duration = Duration::from_secs(2);

async fn close(ws: &mut WebSocket, code: u16, reason: &'static str) {
    let sent = ws
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await
        .is_ok();
    if sent {
        // Read (and drop) until the peer answers our close, briefly: closing the socket with
        // its frames still unread makes the kernel reset the connection, and a peer that
        // kept sending would then see 1006 instead of our code.
        let _ = tokio::time::timeout(PEER_CLOSE_WAIT, async {
            while let Some(Ok(msg)) = ws.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    let _ = ws.close().await;
}

impl Leg for TwilioLeg {
    async fn recv(&mut self) -> LegEvent<'_> {
        // Let go of the previous message before reading: it may share the socket's read
        // buffer, which could then not be reused in place.
        self.last = Utf8Bytes::from_static("");
        match self.ws.next().await {
            Some(Ok(Message::Text(t))) => self.last = t,
            Some(Ok(Message::Close(_))) | None => return LegEvent::Closed,
            Some(Ok(_)) => return LegEvent::Ignored,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "media socket error");
                return LegEvent::Failed;
            }
        }
        match media::parse(&self.last) {
            Ok((Event::Media(frame), _)) => LegEvent::Audio(frame.payload),
            Ok((Event::Mark(name), _)) => match name.strip_prefix('m').and_then(|s| s.parse().ok())
            {
                Some(seq) => LegEvent::Mark(seq),
                None => LegEvent::Ignored,
            },
            Ok((Event::Dtmf(d), _)) => LegEvent::Dtmf(d.digit),
            Ok((Event::Stop(_), _)) => LegEvent::Closed,
            Ok((Event::Connected | Event::Start(_), _)) => LegEvent::Ignored,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring unparseable media message");
                LegEvent::Ignored
            }
        }
    }

    async fn feed_audio(&mut self, payload_b64: &str) -> Result<(), String> {
        // Each message owns its bytes (the socket keeps them): sized exactly, one allocation.
        let mut json = String::with_capacity(64 + self.stream_sid.len() + payload_b64.len());
        media::write_media(&mut json, &self.stream_sid, payload_b64);
        self.ws
            .feed(Message::Text(Utf8Bytes::from(json)))
            .await
            .map_err(|e| e.to_string())
    }

    async fn feed_mark(&mut self, seq: u64) -> Result<(), String> {
        self.name.clear();
        let _ = write!(self.name, "m{seq}");
        let mut mark = String::with_capacity(64 + self.stream_sid.len() + self.name.len());
        media::write_mark(&mut mark, &self.stream_sid, &self.name);
        self.ws
            .feed(Message::Text(Utf8Bytes::from(mark)))
            .await
            .map_err(|e| e.to_string())
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.ws.flush().await.map_err(|e| e.to_string())
    }

    async fn clear(&mut self) -> Result<(), String> {
        let mut clear = String::with_capacity(48 + self.stream_sid.len());
        media::write_clear(&mut clear, &self.stream_sid);
        self.ws
            .send(Message::Text(Utf8Bytes::from(clear)))
            .await
            .map_err(|e| e.to_string())
    }

    async fn close(&mut self) {
        close(&mut self.ws, 1000, "call ended").await;
    }

    async fn refuse(&mut self, why: Refusal) {
        match why {
            Refusal::InvalidToken => close(&mut self.ws, POLICY, "invalid stream token").await,
            Refusal::Internal => close(&mut self.ws, 1011, "internal error").await,
        }
    }
}

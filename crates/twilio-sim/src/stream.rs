//! The Twilio side of a bidirectional Media Stream (PROTOCOLS §1): connect to the app's
//! `<Stream url>` with a signed handshake, send `connected`, `start`, then one caller frame
//! every 20 ms, and "play" the app's audio in real time from a FIFO, echoing marks as the
//! playback cursor passes them and flushing them on `clear`.
//!
//! One task per call runs this loop; buffers are reused so a steady-state tick allocates
//! only the outgoing message itself (tungstenite owns each frame's bytes).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use super::call::{Ctx, Waited, sleep_until_opt};
use super::model::{
    CallStatus, ClearRecord, CloseSide, EndReason, MarkRecord, SimEvent, SpeechSpan, StreamClose,
    StreamRecord,
};
use super::script::{AgentView, Emit};
use super::twiml::StreamSpec;
use super::webhook::route;
use super::{lock, new_sid};
use crate::mulaw::{FRAME_BYTES as MULAW_FRAME_BYTES, FRAME_MS};
use crate::signature;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Bytes of μ-law per millisecond: the playback rate.
const BYTES_PER_MS: u64 = 8;
/// Twilio's TCP connect budget for webhooks, applied to the stream handshake too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for one media frame's JSON: 216 base64 chars plus envelope and SIDs.
const FRAME_JSON_CAP: usize = 400;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The app closed the socket or the connection failed: TwiML continues.
    Continue,
    /// The call is over (already in a terminal status).
    CallEnded,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn run(ctx: &mut Ctx, spec: &StreamSpec) -> StreamEnd {
    let stream_sid = new_sid("MZ");
    let mut url = spec.url.clone();
    if let Some(i) = url.find('?') {
        // Twilio does not support query strings on stream URLs; reports say it strips them.
        ctx.error(
            31922,
            format!("stream URL has a query string (stripped): {}", spec.url),
        );
        url.truncate(i);
    }
    let idx = {
        let mut rec = ctx.cell.rec();
        rec.streams.push(StreamRecord {
            url: url.clone(),
            stream_sid: stream_sid.clone(),
            custom_parameters: spec.parameters.clone(),
            ..Default::default()
        });
        rec.streams.len() - 1
    };
    if !(url.starts_with("wss://") || url.starts_with("ws://")) {
        ctx.error(
            31922,
            format!("stream URL must be wss:// (or ws:// for local tests): {url}"),
        );
        return StreamEnd::Continue;
    }
    let ws = match connect(ctx, &url, idx).await {
        Ok(Some(ws)) => ws,
        Ok(None) => return StreamEnd::CallEnded,
        Err(msg) => {
            ctx.error(31920, format!("stream WebSocket handshake failed: {msg}"));
            return StreamEnd::Continue;
        }
    };
    ctx.inner.emit(SimEvent::StreamConnected {
        sid: ctx.sid().to_owned(),
        stream_sid: stream_sid.clone(),
    });
    let mut session = Session::new(ctx, idx, stream_sid);
    session.run(ctx, ws, spec).await
}

/// Opens the socket. `Ok(None)` when the call ended meanwhile.
async fn connect(ctx: &mut Ctx, url: &str, idx: usize) -> Result<Option<Ws>, String> {
    let sig = signature::compute(&ctx.inner.cfg.auth_token, url, &[]);
    let routed = route(&ctx.inner.cfg.origin_overrides, url);
    let mut request = routed
        .target
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    let header = |v: &str| HeaderValue::from_str(v).map_err(|e| e.to_string());
    headers.insert("X-Twilio-Signature", header(&sig)?);
    if let Some((proto, host)) = &routed.forwarded {
        headers.insert("X-Forwarded-Proto", header(proto)?);
        headers.insert("X-Forwarded-Host", header(host)?);
    }
    let attempt = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(request, None, true),
    );
    let result = match ctx.until(attempt).await {
        Waited::Done(r) => r,
        Waited::Ended => return Ok(None),
    };
    let status = match &result {
        Ok(Ok((_, resp))) => Some(resp.status().as_u16()),
        Ok(Err(tungstenite::Error::Http(resp))) => Some(resp.status().as_u16()),
        _ => None,
    };
    {
        let mut rec = ctx.cell.rec();
        let st = &mut rec.streams[idx];
        st.handshake_status = status;
        st.connected = matches!(result, Ok(Ok(_)));
    }
    match result {
        Ok(Ok((ws, _))) => Ok(Some(ws)),
        Ok(Err(tungstenite::Error::Http(resp))) => Err(format!("HTTP {}", resp.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Agent audio waiting to be played, and the marks waiting on it.
struct Playback {
    buf: VecDeque<u8>,
    /// Bytes ever queued; a mark waits for the cursor to reach the value at its arrival.
    enqueued: u64,
    /// Bytes played or cleared: the playback cursor.
    consumed: u64,
    played: u64,
    cleared: u64,
    /// (position, index into the stream record's marks, name)
    marks: VecDeque<(u64, usize, String)>,
    view: AgentView,
}

impl Playback {
    fn new() -> Self {
        Self {
            buf: VecDeque::new(),
            enqueued: 0,
            consumed: 0,
            played: 0,
            cleared: 0,
            marks: VecDeque::new(),
            view: AgentView::default(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
        self.enqueued += bytes.len() as u64;
        self.view.pending = self.buf.len();
    }

    /// Plays up to `budget` bytes for the tick at `now_ms`, copying them to `out` when
    /// recording.
    fn advance(&mut self, budget: u64, now_ms: u64, out: Option<&mut Vec<u8>>) -> usize {
        let n = (budget as usize).min(self.buf.len());
        match out {
            Some(out) => out.extend(self.buf.drain(..n)),
            None => drop(self.buf.drain(..n)),
        }
        self.played += n as u64;
        self.consumed += n as u64;
        let v = &mut self.view;
        if n > 0 {
            if !v.playing {
                v.stretch_start_ms = Some(now_ms);
            }
            v.playing = true;
            v.last_audio_ms = Some(now_ms);
        } else {
            v.playing = false;
            v.stretch_start_ms = None;
        }
        v.pending = self.buf.len();
        n
    }

    fn clear(&mut self) -> u64 {
        let dropped = self.buf.len() as u64;
        self.buf.clear();
        self.cleared += dropped;
        self.consumed += dropped;
        self.view.pending = 0;
        dropped
    }
}

/// Messages from the app (PROTOCOLS §1.3). Payloads are borrowed: base64 never needs
/// JSON unescaping, so they are decoded straight from the frame.
#[derive(Deserialize)]
struct AppMessage<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(rename = "streamSid", default, borrow)]
    stream_sid: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    media: Option<AppMedia<'a>>,
    #[serde(default, borrow)]
    mark: Option<AppMark<'a>>,
}

#[derive(Deserialize)]
struct AppMedia<'a> {
    #[serde(borrow)]
    payload: Cow<'a, str>,
}

#[derive(Deserialize)]
struct AppMark<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

enum Stop {
    /// Ended from outside (REST, handle): the status is already terminal.
    External,
    TimeLimit,
    Caller {
        gave_up: bool,
    },
    AppClosed {
        code: Option<u16>,
        reason: String,
    },
}

struct Session {
    idx: usize,
    stream_sid: String,
    sid: String,
    account_sid: String,
    record_audio: bool,
    close_grace: Duration,
    seq: u64,
    chunk: u64,
    last_k: Option<u64>,
    t0: Instant,
    playback: Playback,
    frame: [u8; MULAW_FRAME_BYTES],
    b64: String,
    json: String,
    /// Agent bytes played this tick (recorded when audio recording is on).
    played_scratch: Vec<u8>,
    /// Decoded payload of the app's media message.
    payload_scratch: Vec<u8>,
    emits: Vec<Emit>,
    digits: Vec<char>,
    /// Marks echoed this tick: (record index, name, played).
    echoes: Vec<(usize, String, bool)>,
}

impl Session {
    fn new(ctx: &Ctx, idx: usize, stream_sid: String) -> Self {
        Self {
            idx,
            stream_sid,
            sid: ctx.sid().to_owned(),
            account_sid: ctx.inner.cfg.account_sid.clone(),
            record_audio: ctx.inner.cfg.record_audio,
            close_grace: ctx.inner.cfg.timing.close_grace,
            seq: 0,
            chunk: 0,
            last_k: None,
            t0: Instant::now(),
            playback: Playback::new(),
            frame: [crate::mulaw::SILENCE; MULAW_FRAME_BYTES],
            b64: String::with_capacity(MULAW_FRAME_BYTES * 4 / 3 + 4),
            json: String::with_capacity(FRAME_JSON_CAP),
            played_scratch: Vec::with_capacity(MULAW_FRAME_BYTES * 4),
            payload_scratch: Vec::with_capacity(4096),
            emits: Vec::with_capacity(8),
            digits: Vec::new(),
            echoes: Vec::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Takes the JSON built in `self.json` as a message, leaving a buffer of the same size.
    fn take_json(&mut self) -> Message {
        let s = std::mem::replace(&mut self.json, String::with_capacity(FRAME_JSON_CAP));
        Message::text(s)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    async fn run(&mut self, ctx: &mut Ctx, ws: Ws, spec: &StreamSpec) -> StreamEnd {
        let (mut tx, mut rx) = ws.split();
        self.t0 = Instant::now();
        let stop = match self.open(&mut tx, spec).await {
            Err(e) => Stop::AppClosed {
                code: None,
                reason: e.to_string(),
            },
            Ok(()) => {
                ctx.stream_callback(spec, &self.stream_sid, "stream-started");
                self.pump(ctx, &mut tx, &mut rx).await
            }
        };
        let at_ms = self.now_ms();
        let close = match stop {
            Stop::AppClosed { code, reason } => {
                // Flush tungstenite's reply to the app's close frame, if any.
                let _ = tokio::time::timeout(self.close_grace, tx.close()).await;
                StreamClose {
                    by: CloseSide::App,
                    code,
                    reason,
                    at_ms,
                }
            }
            other => {
                match other {
                    Stop::TimeLimit => ctx.end_self(CallStatus::Completed, EndReason::TimeLimit),
                    Stop::Caller { gave_up: true } => {
                        ctx.end_self(CallStatus::Completed, EndReason::CallerGaveUp)
                    }
                    Stop::Caller { gave_up: false } => {
                        ctx.end_self(CallStatus::Completed, EndReason::CallerHangup)
                    }
                    _ => {}
                }
                self.hang_up(&mut tx, &mut rx).await;
                StreamClose {
                    by: CloseSide::Sim,
                    code: Some(1000),
                    reason: String::new(),
                    at_ms,
                }
            }
        };
        ctx.stream_callback(spec, &self.stream_sid, "stream-stopped");
        ctx.inner.emit(SimEvent::StreamClosed {
            sid: self.sid.clone(),
            stream_sid: self.stream_sid.clone(),
            by: close.by,
            code: close.code,
        });
        {
            let mut rec = ctx.cell.rec();
            let st = &mut rec.streams[self.idx];
            if let Some(span) = st.caller_speech.last_mut().filter(|s| s.end_ms.is_none()) {
                span.end_ms = Some(at_ms);
            }
            st.close = Some(close);
        }
        if ctx.is_ended() {
            StreamEnd::CallEnded
        } else {
            StreamEnd::Continue
        }
    }

    async fn open<S>(&mut self, tx: &mut S, spec: &StreamSpec) -> Result<(), tungstenite::Error>
    where
        S: SinkExt<Message, Error = tungstenite::Error> + Unpin,
    {
        tx.feed(Message::text(
            r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
        ))
        .await?;
        let params: serde_json::Map<String, serde_json::Value> = spec
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let seq = self.next_seq();
        let start = serde_json::json!({
            "event": "start",
            "sequenceNumber": seq.to_string(),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": params,
            },
            "streamSid": self.stream_sid,
        });
        tx.feed(Message::text(start.to_string())).await?;
        tx.flush().await
    }

    async fn pump<S, R>(&mut self, ctx: &mut Ctx, tx: &mut S, rx: &mut R) -> Stop
    where
        S: SinkExt<Message, Error = tungstenite::Error> + Unpin,
        R: StreamExt<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let period = Duration::from_millis(FRAME_MS);
        let mut ticker = tokio::time::interval_at(self.t0, period);
        // Ticks stay on the t0 + k·20 ms grid; a late tick skips rather than bursting, and
        // the skipped time still advances playback and the caller script (timestamps jump,
        // as Twilio's do when it drops frames).
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        enum Next {
            External,
            Deadline,
            Tick(Instant),
            Msg(Option<Result<Message, tungstenite::Error>>),
        }
        loop {
            let deadline = ctx.deadline;
            let next = tokio::select! {
                biased;
                _ = ctx.end_rx.wait_for(Option::is_some) => Next::External,
                _ = super::call::redirected(&mut ctx.redirect_rx) => Next::External,
                _ = sleep_until_opt(deadline) => Next::Deadline,
                at = ticker.tick() => Next::Tick(at),
                m = rx.next() => Next::Msg(m),
            };
            match next {
                Next::External => return Stop::External,
                Next::Deadline => return Stop::TimeLimit,
                Next::Tick(at) => match self.tick(ctx, tx, at).await {
                    Ok(None) => {}
                    Ok(Some(gave_up)) => return Stop::Caller { gave_up },
                    Err(e) => {
                        return Stop::AppClosed {
                            code: None,
                            reason: e.to_string(),
                        };
                    }
                },
                Next::Msg(Some(Ok(msg))) => match msg {
                    Message::Text(t) => {
                        if let Err(e) = self.on_text(ctx, tx, t.as_str()).await {
                            return Stop::AppClosed {
                                code: None,
                                reason: e.to_string(),
                            };
                        }
                    }
                    Message::Binary(_) => ctx.error(
                        31950,
                        "binary WebSocket frame from the app (Twilio expects JSON text)",
                    ),
                    Message::Close(frame) => {
                        return Stop::AppClosed {
                            code: frame.as_ref().map(|f| u16::from(f.code)),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        };
                    }
                    // tungstenite answers pings itself.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                },
                Next::Msg(Some(Err(e))) => {
                    return Stop::AppClosed {
                        code: None,
                        reason: e.to_string(),
                    };
                }
                Next::Msg(None) => {
                    return Stop::AppClosed {
                        code: None,
                        reason: "connection closed without a close frame".into(),
                    };
                }
            }
        }
    }

    /// One 20 ms step: play agent audio, echo marks whose audio finished, send the caller's
    /// frame. `Some(gave_up)` when the caller hangs up.
    async fn tick<S>(
        &mut self,
        ctx: &mut Ctx,
        tx: &mut S,
        at: Instant,
    ) -> Result<Option<bool>, tungstenite::Error>
    where
        S: SinkExt<Message, Error = tungstenite::Error> + Unpin,
    {
        let k = at.saturating_duration_since(self.t0).as_millis() as u64 / FRAME_MS;
        let now_ms = k * FRAME_MS;
        let frames = match self.last_k {
            Some(last) => k.saturating_sub(last).max(1),
            None => 1,
        };
        self.last_k = Some(k);

        self.played_scratch.clear();
        let budget = frames * FRAME_MS * BYTES_PER_MS;
        let scratch = self.record_audio.then_some(&mut self.played_scratch);
        self.playback.advance(budget, now_ms, scratch);
        self.echoes.clear();
        while let Some(&(pos, _, _)) = self.playback.marks.front() {
            if pos > self.playback.consumed {
                break;
            }
            if let Some((_, i, name)) = self.playback.marks.pop_front() {
                self.echoes.push((i, name, true));
            }
        }

        self.emits.clear();
        let view = self.playback.view;
        ctx.runner
            .frame(now_ms, &view, &mut self.frame, &mut self.emits);
        let hangup = self.emits.contains(&Emit::Hangup);
        let gave_up = self.emits.contains(&Emit::GaveUp);
        self.digits.clear();
        self.digits
            .extend(self.emits.iter().filter_map(|e| match e {
                Emit::Dtmf(c) => Some(*c),
                _ => None,
            }));
        self.digits.extend(lock(&ctx.cell.dtmf).drain(..));

        if !hangup && !ctx.runner.media_stopped {
            self.write_media(now_ms);
            let m = self.take_json();
            tx.feed(m).await?;
        }
        for i in 0..self.digits.len() {
            let d = self.digits[i];
            self.write_dtmf(d);
            let m = self.take_json();
            tx.feed(m).await?;
        }
        for i in 0..self.echoes.len() {
            let name = std::mem::take(&mut self.echoes[i].1);
            self.write_mark(&name);
            self.echoes[i].1 = name;
            let m = self.take_json();
            tx.feed(m).await?;
        }
        tx.flush().await?;

        {
            let mut rec = ctx.cell.rec();
            let st = &mut rec.streams[self.idx];
            if !hangup {
                st.media_frames_sent += 1;
                if self.record_audio {
                    st.caller_audio.extend_from_slice(&self.frame);
                }
            }
            if st.beep_ended_ms.is_some() {
                st.agent_played_after_beep += self.playback.played - st.agent_played_bytes;
            }
            st.agent_played.extend_from_slice(&self.played_scratch);
            st.agent_played_bytes = self.playback.played;
            for e in &self.emits {
                match e {
                    Emit::SpeechStarted => st.caller_speech.push(SpeechSpan {
                        start_ms: now_ms,
                        end_ms: None,
                    }),
                    Emit::SpeechEnded => {
                        if let Some(s) = st.caller_speech.last_mut() {
                            s.end_ms = Some(now_ms);
                        }
                    }
                    Emit::BeepEnded => {
                        st.beep_ended_ms = Some(now_ms);
                        ctx.cell.beeped.notify_one();
                    }
                    _ => {}
                }
            }
            st.dtmf_sent
                .extend(self.digits.iter().map(|&d| (d, now_ms)));
            for (i, _, played) in &self.echoes {
                if let Some(m) = st.marks.get_mut(*i) {
                    m.echoed_at_ms = Some(now_ms);
                    m.played = *played;
                }
            }
        }
        for e in &self.emits {
            let ev = match e {
                Emit::SpeechStarted => SimEvent::CallerSpeechStarted {
                    sid: self.sid.clone(),
                    at_ms: now_ms,
                },
                Emit::SpeechEnded => SimEvent::CallerSpeechEnded {
                    sid: self.sid.clone(),
                    at_ms: now_ms,
                },
                _ => continue,
            };
            ctx.inner.emit(ev);
        }
        for &digit in &self.digits {
            ctx.inner.emit(SimEvent::Dtmf {
                sid: self.sid.clone(),
                digit,
            });
        }
        for (_, name, played) in self.echoes.drain(..) {
            ctx.inner.emit(SimEvent::MarkEchoed {
                sid: self.sid.clone(),
                name,
                played,
                at_ms: now_ms,
            });
        }
        Ok(hangup.then_some(gave_up))
    }

    async fn on_text<S>(
        &mut self,
        ctx: &mut Ctx,
        tx: &mut S,
        text: &str,
    ) -> Result<(), tungstenite::Error>
    where
        S: SinkExt<Message, Error = tungstenite::Error> + Unpin,
    {
        let msg: AppMessage<'_> = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                ctx.error(31924, format!("malformed message from the app: {e}"));
                return Ok(());
            }
        };
        if !matches!(&*msg.event, "media" | "mark" | "clear") {
            ctx.error(
                31924,
                format!("unknown event {:?} from the app", &*msg.event),
            );
            return Ok(());
        }
        if msg.stream_sid.as_deref() != Some(self.stream_sid.as_str()) {
            ctx.error(
                31924,
                format!(
                    "{} message with streamSid {:?}, expected {:?}; ignored",
                    msg.event, msg.stream_sid, self.stream_sid
                ),
            );
            return Ok(());
        }
        let now_ms = self.now_ms();
        match &*msg.event {
            "media" => {
                let Some(media) = msg.media else {
                    ctx.error(31924, "media message without a media object");
                    return Ok(());
                };
                self.payload_scratch.clear();
                if let Err(e) = B64.decode_vec(media.payload.as_bytes(), &mut self.payload_scratch)
                {
                    ctx.error(31924, format!("media payload is not base64: {e}"));
                    return Ok(());
                }
                self.playback.push(&self.payload_scratch);
                let n = self.payload_scratch.len();
                {
                    let mut rec = ctx.cell.rec();
                    let st = &mut rec.streams[self.idx];
                    st.agent_media_messages += 1;
                    if self.record_audio {
                        st.agent_audio.extend_from_slice(&self.payload_scratch);
                    }
                }
                ctx.inner.emit(SimEvent::AgentAudio {
                    sid: self.sid.clone(),
                    bytes: n,
                });
            }
            "mark" => {
                let Some(mark) = msg.mark else {
                    ctx.error(31924, "mark message without mark.name");
                    return Ok(());
                };
                let name = mark.name.into_owned();
                let position = self.playback.enqueued;
                let immediate = position <= self.playback.consumed;
                let i = {
                    let mut rec = ctx.cell.rec();
                    let st = &mut rec.streams[self.idx];
                    st.marks.push(MarkRecord {
                        name: name.clone(),
                        received_at_ms: now_ms,
                        position,
                        echoed_at_ms: immediate.then_some(now_ms),
                        played: immediate,
                    });
                    st.marks.len() - 1
                };
                if immediate {
                    self.write_mark(&name);
                    let m = self.take_json();
                    tx.send(m).await?;
                    ctx.inner.emit(SimEvent::MarkEchoed {
                        sid: self.sid.clone(),
                        name,
                        played: true,
                        at_ms: now_ms,
                    });
                } else {
                    self.playback.marks.push_back((position, i, name));
                }
            }
            _ => {
                // clear
                let played_bytes = self.playback.played;
                let dropped_bytes = self.playback.clear();
                let flushed: Vec<(u64, usize, String)> = self.playback.marks.drain(..).collect();
                for (_, _, name) in &flushed {
                    self.write_mark(name);
                    let m = self.take_json();
                    tx.feed(m).await?;
                }
                tx.flush().await?;
                {
                    let mut rec = ctx.cell.rec();
                    let st = &mut rec.streams[self.idx];
                    st.clears.push(ClearRecord {
                        at_ms: now_ms,
                        played_bytes,
                        dropped_bytes,
                    });
                    st.agent_cleared_bytes = self.playback.cleared;
                    for (_, i, _) in &flushed {
                        if let Some(m) = st.marks.get_mut(*i) {
                            m.echoed_at_ms = Some(now_ms);
                            m.played = false;
                        }
                    }
                }
                ctx.inner.emit(SimEvent::Cleared {
                    sid: self.sid.clone(),
                    at_ms: now_ms,
                    dropped_bytes,
                });
                for (_, _, name) in flushed {
                    ctx.inner.emit(SimEvent::MarkEchoed {
                        sid: self.sid.clone(),
                        name,
                        played: false,
                        at_ms: now_ms,
                    });
                }
            }
        }
        Ok(())
    }

    /// `stop`, close 1000, then give the app a moment to answer the close.
    async fn hang_up<S, R>(&mut self, tx: &mut S, rx: &mut R)
    where
        S: SinkExt<Message, Error = tungstenite::Error> + Unpin,
        R: StreamExt<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let seq = self.next_seq();
        let stop = serde_json::json!({
            "event": "stop",
            "sequenceNumber": seq.to_string(),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.account_sid, "callSid": self.sid},
        });
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        let sent = async {
            tx.feed(Message::text(stop.to_string())).await?;
            tx.send(close).await
        };
        if sent.await.is_err() {
            return;
        }
        let drain = async { while let Some(Ok(_)) = rx.next().await {} };
        let _ = tokio::time::timeout(self.close_grace, drain).await;
    }

    fn write_media(&mut self, now_ms: u64) {
        self.chunk += 1;
        let seq = self.next_seq();
        self.b64.clear();
        B64.encode_string(self.frame.as_slice(), &mut self.b64);
        let j = &mut self.json;
        j.clear();
        // Writing into a String cannot fail.
        let _ = write!(
            j,
            r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"inbound","chunk":"{}","timestamp":"{now_ms}","payload":"{}"}},"streamSid":"{}"}}"#,
            self.chunk, self.b64, self.stream_sid
        );
    }

    fn write_dtmf(&mut self, digit: char) {
        let seq = self.next_seq();
        let j = &mut self.json;
        j.clear();
        let digit = serde_json::Value::String(digit.to_string());
        let _ = write!(
            j,
            r#"{{"event":"dtmf","streamSid":"{}","sequenceNumber":"{seq}","dtmf":{{"track":"inbound_track","digit":{digit}}}}}"#,
            self.stream_sid
        );
    }

    fn write_mark(&mut self, name: &str) {
        let seq = self.next_seq();
        let j = &mut self.json;
        j.clear();
        let name = serde_json::Value::String(name.to_owned());
        let _ = write!(
            j,
            r#"{{"event":"mark","sequenceNumber":"{seq}","streamSid":"{}","mark":{{"name":{name}}}}}"#,
            self.stream_sid
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playback_plays_in_real_time_and_clear_drops_the_rest() {
        let mut p = Playback::new();
        p.push(&[1u8; 400]);
        let mut out = Vec::new();
        assert_eq!(p.advance(160, 20, Some(&mut out)), 160);
        assert!(p.view.playing && p.view.stretch_start_ms == Some(20));
        assert_eq!(p.advance(160, 40, Some(&mut out)), 160);
        assert_eq!(p.view.pending, 80);
        assert_eq!(p.clear(), 80);
        assert_eq!((p.played, p.cleared, p.consumed), (320, 80, 400));
        assert_eq!(p.advance(160, 60, None), 0);
        assert!(!p.view.playing && p.view.last_audio_ms == Some(40));
        assert_eq!(out.len(), 320);
    }
}

//! The media bridge: one task per call between Twilio's media stream and a voice engine.
//!
//! Caller frames go to the engine as received (base64 μ-law, never re-encoded); agent audio
//! goes to Twilio unchanged, each piece followed by a `mark` so we learn when it has actually
//! played. On barge-in the bridge sends `clear` at once and tells the engine how much of the
//! interrupted utterance the caller really heard. Governors (duration, silence, dead streams)
//! and transcript batching live here too, so a call needs exactly one task.

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::calls::CallStatus;
use crate::calls::session::CallEvent;
use crate::calls::shared::Shared;
use crate::calls::{CallSetup, Calls, token_hash};
use crate::engines::{Engine, EngineEvent, ItemId, Speaker};
use crate::ids::CallId;
use crate::store::callpath;
use crate::store::calls::{self, TranscriptEntry, Transition};
use crate::telephony::twilio::media::{self, Event};

/// Twilio must send `start` this soon after connecting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream that sends no audio for this long is dead (the call is ended).
const NO_MEDIA_TIMEOUT: Duration = Duration::from_secs(10);
/// Transcript lines are written in batches: this many, or at this interval, or at the end.
const TRANSCRIPT_BATCH: usize = 16;
const TRANSCRIPT_FLUSH: Duration = Duration::from_secs(2);
/// After the goodbye of a governor, the call ends even if playback is never confirmed.
const GOODBYE_GRACE: Duration = Duration::from_secs(8);

/// Close code for a policy violation: a stream we will not serve.
const POLICY: u16 = 1008;

/// The phone's socket, unsplit: the bridge's `select!` drops its branch futures before running
/// a handler, so reading and writing never overlap and no split lock is needed per frame.
type Sink = WebSocket;

/// Serves one media-stream WebSocket from `connected` to close.
pub async fn serve(calls: Arc<Calls>, socket: WebSocket) {
    let m = calls.shared().clone();
    let mut sink = socket;
    let start = match tokio::time::timeout(START_TIMEOUT, wait_for_start(&mut sink)).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            close(&mut sink, POLICY, "expected a start message").await;
            return;
        }
        Err(_) => {
            tracing::warn!("media stream sent no start within 10 s; closing");
            close(&mut sink, POLICY, "no start message").await;
            return;
        }
    };
    let call_id = start
        .custom_parameters
        .get("call_id")
        .cloned()
        .unwrap_or_default();
    let token = start
        .custom_parameters
        .get("token")
        .cloned()
        .unwrap_or_default();
    let Some(call_id) = CallId::parse(&call_id) else {
        tracing::warn!("media stream without a valid call_id parameter; closing");
        close(&mut sink, POLICY, "unknown call").await;
        return;
    };
    let hash = token_hash(&token);
    let cid = call_id.to_string();
    let sid_ok = media::is_valid_stream_sid(&start.stream_sid);
    let attached = m
        .store
        .run(move |c| {
            if sid_ok {
                callpath::attach_stream(c, &cid, &hash)
            } else {
                callpath::burn_stream_token(c, &cid, &hash).map(|()| None)
            }
        })
        .await;
    let (changed, data) = match attached {
        Ok(Some(a)) => a,
        Ok(None) => {
            tracing::warn!(call_id = %call_id, "media stream with a wrong or used token; closing");
            close(&mut sink, POLICY, "invalid stream token").await;
            return;
        }
        Err(e) => {
            tracing::error!(call_id = %call_id, error = %e, "cannot load call for its media stream");
            close(&mut sink, 1011, "internal error").await;
            return;
        }
    };
    let setup = CallSetup::resolve(data.detail, data.tenant, &m.config());
    // Every log line of the call carries its id and Twilio's CallSid.
    let span = tracing::info_span!("call", call_id = %call_id, call_sid = %start.call_sid);
    tracing::Instrument::instrument(Bridge::run(m, call_id, start, sink, setup, changed), span)
        .await;
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

async fn close(sink: &mut Sink, code: u16, reason: &'static str) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await;
    let _ = sink.close().await;
}

/// Agent audio between marks (100 ms): the extrapolation between echoes stays accurate to a
/// few milliseconds, at a fifth of the echoes of marking every 20 ms delta.
const MARK_EVERY_BYTES: u64 = 800;

/// A mark we sent: when Twilio echoes it, everything before it has played.
struct PendingMark {
    seq: u64,
    /// Total agent bytes sent up to this mark.
    total_at: u64,
}

/// Where playback is, as far as we can tell: exact at each mark echo, extrapolated at
/// 8 bytes per millisecond in between, never ahead of what was sent.
struct Playback {
    sent_total: u64,
    /// Bytes sent after the last mark: a mark goes out every [`MARK_EVERY_BYTES`], and the
    /// tail of an utterance gets one on the next tick, so Twilio echoes a few marks a second
    /// instead of one per 20 ms delta (each echo is a message to read).
    unmarked: u64,
    anchor_bytes: u64,
    anchor_at: Instant,
    marks: VecDeque<PendingMark>,
    next_mark: u64,
    /// Marks at or below this were flushed by a `clear`: their echoes mean nothing played.
    cleared_upto: u64,
    /// The utterance being played, where it starts in the byte stream, and its size so far.
    item: Option<(ItemId, u64, u64)>,
}

impl Playback {
    fn new(now: Instant) -> Self {
        Self {
            sent_total: 0,
            unmarked: 0,
            anchor_bytes: 0,
            anchor_at: now,
            marks: VecDeque::new(),
            next_mark: 1,
            cleared_upto: 0,
            item: None,
        }
    }

    fn played(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.anchor_at).as_millis() as u64;
        (self.anchor_bytes + elapsed * 8).min(self.sent_total)
    }

    fn pending(&self) -> bool {
        !self.marks.is_empty() || self.unmarked > 0
    }

    /// Records `bytes` of `item` going out; returns the mark to send after them, if one is
    /// due.
    fn sent(&mut self, item: &str, bytes: u64, now: Instant) -> Option<u64> {
        if self.played(now) >= self.sent_total {
            // The buffer at Twilio ran dry: playback of this audio starts now.
            self.anchor_bytes = self.sent_total;
            self.anchor_at = now;
        }
        match &mut self.item {
            Some((id, _, len)) if id == item => *len += bytes,
            _ => self.item = Some((item.to_owned(), self.sent_total, bytes)),
        }
        self.sent_total += bytes;
        self.unmarked += bytes;
        (self.unmarked >= MARK_EVERY_BYTES).then(|| self.mark())
    }

    /// A mark after everything sent so far, if anything is unmarked (the tail of an
    /// utterance).
    fn mark_tail(&mut self) -> Option<u64> {
        (self.unmarked > 0).then(|| self.mark())
    }

    fn mark(&mut self) -> u64 {
        self.unmarked = 0;
        let seq = self.next_mark;
        self.next_mark += 1;
        self.marks.push_back(PendingMark {
            seq,
            total_at: self.sent_total,
        });
        seq
    }

    fn echoed(&mut self, seq: u64, now: Instant) {
        if seq <= self.cleared_upto {
            return;
        }
        while let Some(m) = self.marks.front() {
            if m.seq > seq {
                break;
            }
            self.anchor_bytes = m.total_at;
            self.anchor_at = now;
            self.marks.pop_front();
        }
    }

    /// A `clear` went out: nothing more of what was sent will play. Returns the interrupted
    /// item and how many of its bytes were heard.
    fn cleared(&mut self, now: Instant) -> Option<(ItemId, u64)> {
        let played = self.played(now);
        self.cleared_upto = self.next_mark - 1;
        self.marks.clear();
        self.unmarked = 0;
        self.sent_total = played;
        self.anchor_bytes = played;
        self.anchor_at = now;
        self.item
            .take()
            .map(|(id, start, len)| (id, played.saturating_sub(start).min(len)))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Silence {
    Listening,
    Asked,
    Closing,
}

struct Bridge {
    m: Arc<Shared>,
    call_id: CallId,
    stream_sid: String,
    inbound: bool,
    sink: Sink,
    out: String,
    playback: Playback,
    dropped_items: HashSet<ItemId>,
    started: Instant,
    transcript: Vec<TranscriptEntry>,
    last_flush: Instant,
    /// Set when the call should end once queued audio has played: (reason, hard deadline).
    hangup: Option<(&'static str, Instant)>,
    last_media: Instant,
    /// When the silence clock started: the later of the caller's last speech and the end of
    /// the agent's last audio.
    quiet_since: Instant,
    caller_speaking: bool,
    silence: Silence,
    call_sid: String,
    latency: Latency,
    engine: &'static str,
    /// Media frames since the last flush to the shared counters (kept local: no shared
    /// atomics touched per frame).
    frames_in: u64,
    frames_out: u64,
}

/// Latencies as the caller experiences them, measured at our edge.
#[derive(Default)]
struct Latency {
    greeting_ms: Option<f64>,
    /// When the caller stopped speaking, until the agent's first audio after it.
    turn_from: Option<Instant>,
    turn_ms: Vec<f64>,
    barge_in_ms: Vec<f64>,
}

impl Latency {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "greeting_ms": self.greeting_ms,
            "turn_ms": self.turn_ms,
            "barge_in_ms": self.barge_in_ms,
        })
    }
}

fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

impl Bridge {
    async fn run(
        m: Arc<Shared>,
        call_id: CallId,
        start: media::Start,
        sink: Sink,
        setup: CallSetup,
        changed: Option<crate::store::calls::Call>,
    ) {
        let now = Instant::now();
        let cfg = m.config();
        let inbound = setup.inbound;
        let kind = setup.kind;
        let max_duration = setup.max_duration;
        let silence_timeout = cfg.agent.silence_timeout.0;
        let live = m.sessions.get_or_create(call_id.as_str());
        let _bridged = m.sessions.bridge_started(live.clone());
        let wind_down = m.wind_down.clone();
        let mut winding_down = false;
        if let Some(call) = &changed {
            m.announce(call);
        }
        tracing::info!(stream_sid = %start.stream_sid, engine = %kind, "media stream started");

        let mut b = Bridge {
            m: m.clone(),
            call_id: call_id.clone(),
            stream_sid: start.stream_sid.clone(),
            inbound,
            sink,
            out: String::with_capacity(1024),
            playback: Playback::new(now),
            dropped_items: HashSet::new(),
            started: now,
            transcript: Vec::new(),
            last_flush: now,
            hangup: None,
            last_media: now,
            quiet_since: now,
            caller_speaking: false,
            silence: Silence::Listening,
            call_sid: start.call_sid.clone(),
            latency: Latency::default(),
            engine: kind.as_str(),
            frames_in: 0,
            frames_out: 0,
        };

        let mut engine = match m.take_engine(call_id.as_str(), setup).await {
            Ok(e) => e,
            Err(e) => {
                b.finish("engine_error", Some(e.to_string())).await;
                return;
            }
        };
        if let Err(e) = engine.stream_started().await {
            tracing::error!(error = %e, "engine failed");
            m.breakers.failure(kind);
            b.finish("engine_error", Some(e.to_string())).await;
            return;
        }
        let deadline = now + max_duration;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut max_duration_hit = false;

        // Created once, not per loop turn: each `cancelled()` registers a waiter under a lock.
        let ended = live.end_token().cancelled();
        tokio::pin!(ended);
        let winding = wind_down.cancelled();
        tokio::pin!(winding);
        let (reason, error): (&'static str, Option<String>) = loop {
            tokio::select! {
                msg = b.sink.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | None => break ("caller_hangup", None),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "media socket error");
                            break ("stream_error", None);
                        }
                    };
                    match media::parse(&text) {
                        Ok((Event::Media(frame), _)) => {
                            b.frames_in += 1;
                            b.last_media = Instant::now();
                            if let Err(e) = engine.caller_audio(&frame.payload).await {
                                break ("engine_error", Some(e.to_string()));
                            }
                        }
                        Ok((Event::Mark(name), _)) => {
                            if let Some(seq) = name.strip_prefix('m').and_then(|s| s.parse().ok()) {
                                let now = Instant::now();
                                b.playback.echoed(seq, now);
                                if !b.playback.pending() {
                                    b.quiet_since = b.quiet_since.max(now);
                                }
                            }
                        }
                        Ok((Event::Dtmf(d), _)) => {
                            tracing::info!(digit = %d.digit, "dtmf");
                        }
                        Ok((Event::Stop(_), _)) => break ("caller_hangup", None),
                        Ok((Event::Connected | Event::Start(_), _)) => {}
                        Err(e) => tracing::debug!(error = %e, "ignoring unparseable media message"),
                    }
                }
                ev = engine.next_event() => {
                    match ev {
                        Ok(ev) => {
                            if let Err(e) = b.on_engine_event(&mut engine, ev).await {
                                break ("stream_error", Some(e));
                            }
                        }
                        Err(e) => break ("engine_error", Some(e.to_string())),
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Some(seq) = b.playback.mark_tail() {
                        let sent = match b.feed_mark(seq).await {
                            Ok(()) => b.sink.flush().await.map_err(|e| e.to_string()),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = sent {
                            break ("stream_error", Some(e));
                        }
                    }
                    if let Some((reason, hard)) = b.hangup
                        && (!b.playback.pending() || now >= hard)
                    {
                        break (reason, None);
                    }
                    if now.duration_since(b.last_media) >= NO_MEDIA_TIMEOUT {
                        tracing::warn!("no audio from the phone for 10 s; ending the call");
                        break ("no_media", None);
                    }
                    if now >= deadline && !max_duration_hit {
                        max_duration_hit = true;
                        tracing::info!("maximum call duration reached");
                        b.say_goodbye(&mut engine, "max_duration").await;
                    }
                    if !b.caller_speaking && !b.playback.pending() && b.hangup.is_none()
                        && now.duration_since(b.quiet_since) >= silence_timeout
                    {
                        match b.silence {
                            Silence::Listening => {
                                b.silence = Silence::Asked;
                                b.quiet_since = now;
                                let _ = engine.say(crate::calls::phrases::STILL_THERE).await;
                            }
                            Silence::Asked => {
                                b.silence = Silence::Closing;
                                b.say_goodbye(&mut engine, "silence").await;
                            }
                            Silence::Closing => {}
                        }
                    }
                    if now.duration_since(b.last_flush) >= TRANSCRIPT_FLUSH {
                        b.flush_transcript().await;
                        b.flush_frame_counts();
                    }
                }
                _ = &mut ended => break ("ended", None),
                _ = &mut winding, if !winding_down => {
                    winding_down = true;
                    if b.hangup.is_none() {
                        b.say_goodbye(&mut engine, "shutdown").await;
                    }
                }
            }
        };
        engine.close().await;
        if reason == "engine_error" {
            tracing::error!(error = ?error, "engine failed mid-call");
            m.breakers.failure(kind);
        }
        b.finish(reason, error).await;
    }

    /// Queues a mark named `m<seq>` (sent with the next flush).
    async fn feed_mark(&mut self, seq: u64) -> Result<(), String> {
        self.out.clear();
        let _ = write!(self.out, "m{seq}");
        let mut mark = String::with_capacity(64 + self.stream_sid.len() + self.out.len());
        media::write_mark(&mut mark, &self.stream_sid, &self.out);
        self.sink
            .feed(Message::Text(Utf8Bytes::from(mark)))
            .await
            .map_err(|e| e.to_string())
    }

    async fn say_goodbye(&mut self, engine: &mut Engine, reason: &'static str) {
        self.m.note_end_reason(self.call_id.as_str(), reason).await;
        let bye = self.m.config().agent.goodbye.clone();
        let _ = engine.say(&bye).await;
        self.hangup = Some((reason, Instant::now() + GOODBYE_GRACE));
    }

    async fn on_engine_event(
        &mut self,
        engine: &mut Engine,
        ev: EngineEvent,
    ) -> Result<(), String> {
        match ev {
            EngineEvent::AgentAudio { item, payload_b64 } => {
                if self.dropped_items.contains(&item) || !media::is_base64(&payload_b64) {
                    return Ok(());
                }
                // base64 length → bytes without decoding.
                let bytes = (payload_b64.len() / 4 * 3) as u64
                    - payload_b64.bytes().rev().take_while(|&b| b == b'=').count() as u64;
                if self.latency.greeting_ms.is_none() {
                    self.latency.greeting_ms = Some(ms_since(self.started));
                }
                if let Some(t) = self.latency.turn_from.take() {
                    self.latency.turn_ms.push(ms_since(t));
                }
                let seq = self.playback.sent(&item, bytes, Instant::now());
                // Each message owns its bytes (the socket keeps them): sized exactly, one
                // allocation each.
                let mut media_json =
                    String::with_capacity(64 + self.stream_sid.len() + payload_b64.len());
                media::write_media(&mut media_json, &self.stream_sid, &payload_b64);
                self.sink
                    .feed(Message::Text(Utf8Bytes::from(media_json)))
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(seq) = seq {
                    self.feed_mark(seq).await?;
                }
                self.sink.flush().await.map_err(|e| e.to_string())?;
                self.frames_out += 1;
            }
            EngineEvent::Transcript { speaker, text } => {
                let at_ms = self.started.elapsed().as_millis() as i64;
                self.m.sessions.publish(
                    self.call_id.as_str(),
                    CallEvent::Transcript {
                        speaker: speaker.as_str(),
                        text: text.clone(),
                        at_ms,
                    },
                );
                self.transcript.push(TranscriptEntry {
                    speaker: speaker.as_str(),
                    text,
                    at_ms,
                });
                if speaker == Speaker::Caller && self.transcript.len() >= TRANSCRIPT_BATCH {
                    self.flush_transcript().await;
                }
            }
            EngineEvent::CallerSpeechStarted => {
                let heard = Instant::now();
                self.caller_speaking = true;
                self.latency.turn_from = None;
                self.silence = Silence::Listening;
                if self.playback.pending() && self.hangup.is_none() {
                    self.out.clear();
                    media::write_clear(&mut self.out, &self.stream_sid);
                    let clear = Message::Text(Utf8Bytes::from(std::mem::take(&mut self.out)));
                    self.sink.send(clear).await.map_err(|e| e.to_string())?;
                    self.latency.barge_in_ms.push(ms_since(heard));
                    self.out = String::with_capacity(1024);
                    if let Some((item, played)) = self.playback.cleared(Instant::now()) {
                        tracing::info!(item = %item, played_ms = played / 8, "barge-in");
                        self.dropped_items.insert(item.clone());
                        engine
                            .interrupted(&item, played / 8)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            EngineEvent::CallerSpeechStopped => {
                self.caller_speaking = false;
                self.quiet_since = Instant::now();
                self.latency.turn_from = Some(self.quiet_since);
            }
            EngineEvent::Hangup { reason } => {
                self.m.note_end_reason(self.call_id.as_str(), reason).await;
                self.hangup = Some((reason, Instant::now() + GOODBYE_GRACE));
            }
        }
        Ok(())
    }

    fn flush_frame_counts(&mut self) {
        let m = &self.m.metrics;
        m.media_frames
            .with(&["in"])
            .inc_by(std::mem::take(&mut self.frames_in));
        m.media_frames
            .with(&["out"])
            .inc_by(std::mem::take(&mut self.frames_out));
    }

    async fn flush_transcript(&mut self) {
        self.last_flush = Instant::now();
        if self.transcript.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.transcript);
        let id = self.call_id.to_string();
        if let Err(e) = self
            .m
            .store
            .run(move |c| calls::add_transcript(c, &id, &entries))
            .await
        {
            tracing::error!(error = %e, "cannot store transcript lines");
        }
    }

    /// Ends our side: transcript flushed, socket closed (Twilio then runs the TwiML after the
    /// stream, a `<Hangup/>`), and the call record closed when no provider callback will.
    async fn finish(mut self, reason: &'static str, error: Option<String>) {
        self.flush_transcript().await;
        let id = self.call_id.to_string();
        self.m.note_end_reason(&id, reason).await;
        self.flush_frame_counts();
        let m = &self.m.metrics;
        if let Some(g) = self.latency.greeting_ms {
            m.greeting_latency.with(&[self.engine]).observe(g / 1000.0);
        }
        for t in &self.latency.turn_ms {
            m.turn_latency.with(&[self.engine]).observe(t / 1000.0);
        }
        for t in &self.latency.barge_in_ms {
            m.barge_in_latency.with(&[self.engine]).observe(t / 1000.0);
        }
        if reason == "engine_error" {
            m.engine_errors.with(&[self.engine, "session"]).inc();
        }
        let latency = self.latency.to_json();
        let lid = id.clone();
        if let Err(e) = self
            .m
            .store
            .run(move |c| calls::set_latency(c, &lid, &latency))
            .await
        {
            tracing::error!(error = %e, "cannot store call latency");
        }
        if reason == "engine_error" && !self.call_sid.is_empty() {
            // Before closing: once the socket closes, Twilio would hang up without a word.
            self.m.apologize(&self.call_sid).await;
        }
        close(&mut self.sink, 1000, "call ended").await;
        tracing::info!(reason, "media stream ended");
        if self.inbound {
            // Twilio sends no status callbacks for inbound calls by default (SPEC §4).
            let status = if reason == "engine_error" {
                CallStatus::Failed
            } else {
                CallStatus::Completed
            };
            self.m
                .apply(
                    &id,
                    Transition {
                        status: Some(status),
                        error,
                        ..Default::default()
                    },
                )
                .await;
        } else {
            if let Some(e) = error {
                let eid = id.clone();
                let _ = self
                    .m
                    .store
                    .run(move |c| callpath::note_error(c, &eid, &e))
                    .await;
            }
            // Twilio's `completed` callback normally closes the record; if it never comes
            // (lost, or the call lingers), Twilio is asked shortly.
            let at = crate::timefmt::now_ms() + 15_000;
            let rid = id.clone();
            let _ = self
                .m
                .store
                .run(move |c| callpath::reconcile_by(c, &rid, at))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playback_accounting_counts_only_what_played() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0);
        // 1 s of audio for item a, in two pieces.
        let m1 = p.sent("a", 4000, t0).unwrap();
        let _m2 = p.sent("a", 4000, t0).unwrap();
        assert_eq!(p.played(t0 + Duration::from_millis(300)), 2400);
        p.echoed(m1, t0 + Duration::from_millis(520));
        // 100 ms after the first echo: 500 ms + 100 ms played.
        assert_eq!(p.played(t0 + Duration::from_millis(620)), 4800);
        let (item, heard) = p.cleared(t0 + Duration::from_millis(620)).unwrap();
        assert_eq!((item.as_str(), heard), ("a", 4800));
        assert!(!p.pending());
        // The cleared mark echoes later; it must not count as played.
        p.echoed(2, t0 + Duration::from_millis(630));
        assert_eq!(p.played(t0 + Duration::from_secs(5)), 4800);
        // New audio after the clear starts a new item from the current position.
        p.sent("b", 800, t0 + Duration::from_secs(5));
        assert_eq!(p.played(t0 + Duration::from_millis(5050)), 4800 + 400);
        let (item, heard) = p.cleared(t0 + Duration::from_millis(5050)).unwrap();
        assert_eq!((item.as_str(), heard), ("b", 400));
    }

    #[test]
    fn small_deltas_share_a_mark_and_the_tail_gets_one() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0);
        // 20 ms deltas: a mark every 100 ms of audio.
        let marks: Vec<_> = (0..7).map(|_| p.sent("a", 160, t0)).collect();
        assert_eq!(marks.iter().flatten().count(), 1);
        assert_eq!(marks[4], Some(1));
        // 40 ms unmarked: still pending, and the tail mark covers it.
        assert!(p.pending());
        assert_eq!(p.mark_tail(), Some(2));
        assert_eq!(p.mark_tail(), None);
        p.echoed(2, t0 + Duration::from_millis(140));
        assert!(!p.pending());
        assert_eq!(p.played(t0 + Duration::from_secs(1)), 7 * 160);
    }

    #[test]
    fn never_counts_more_than_was_sent() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0);
        p.sent("a", 800, t0);
        let (_, heard) = p.cleared(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(heard, 800);
    }
}

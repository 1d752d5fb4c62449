//! The media bridge: one task per call between a phone leg and a voice engine.
//!
//! Caller frames go to the engine as received (base64 μ-law, never re-encoded); agent audio
//! goes to the phone unchanged, marked every 100 ms so we learn when it has actually played.
//! On barge-in the bridge clears the phone's queue at once and tells the engine how much of
//! the interrupted utterance the caller really heard. Governors (duration, silence, dead
//! streams) and transcript batching live here too, so a call needs exactly one task.
//!
//! The bridge knows nothing of the call's lifecycle: it gets a narrow [`BridgeContext`] and
//! returns an [`Outcome`]; the call domain decides what follows (apology, state change).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keypad::Keypad;
use super::leg::{Leg, LegEvent};
use super::playback::Playback;
use super::recorder::Recorder;
use super::tools::{ToolCallEvent, ToolLink, ToolReply};
use crate::domain::EngineKind;
use crate::domain::event::CallEvent;
use crate::domain::ids::CallId;
use crate::domain::phrases;
use crate::engines::breaker::Breakers;
use crate::engines::pipeline::{Providers, TurnStats};
use crate::engines::{Engine, EngineEvent, ItemId, Speaker};
use crate::ops::metrics::Metrics;
use crate::store::Store;
use crate::store::calls::{self, TranscriptEntry};

/// A stream that sends no audio for this long is dead (the call is ended).
const NO_MEDIA_TIMEOUT: Duration = Duration::from_secs(10);
/// Transcript lines are written in batches: this many, or at this interval, or at the end.
const TRANSCRIPT_BATCH: usize = 16;
const TRANSCRIPT_FLUSH: Duration = Duration::from_secs(2);
/// A caller line of this many words answering the agent is a sentence: a person speaks.
const SENTENCE_WORDS: usize = 3;
/// After the goodbye of a governor, the call ends even if playback is never confirmed.
const GOODBYE_GRACE: Duration = Duration::from_secs(8);
/// The outcome reason of a stream that closed for a handover.
pub const HANDOVER: &str = "handover";

/// What a bridge needs from the rest of the server, and nothing more.
pub struct BridgeContext {
    pub call_id: CallId,
    /// Transcript batches, end reasons and latencies are written here.
    pub store: Store,
    /// The call's live event stream (transcript lines for followers).
    pub events: broadcast::Sender<CallEvent>,
    /// Cancelled when the call is ended from outside (API, provider, governor).
    pub end: CancellationToken,
    /// Cancelled when the drain time is up: say goodbye and hang up.
    pub wind_down: CancellationToken,
    pub engine: EngineKind,
    pub max_duration: Duration,
    pub silence_timeout: Duration,
    pub goodbye: String,
    pub metrics: Arc<Metrics>,
    pub breakers: Arc<Breakers>,
    /// Where to record the call (a two-channel WAV), if it is recorded.
    pub recording: Option<std::path::PathBuf>,
    /// The call domain's tool executor; `None`: tool calls are answered "not available".
    pub tools: Option<ToolLink>,
    /// Set while the call's media moves to a new stream: the stream closing then is a
    /// handover (the engine is handed back, not closed), not the end of the call.
    pub handover: Arc<AtomicBool>,
    /// The engine carries on a conversation from an earlier stream of this call (no new
    /// greeting); `Some(text)`: what the agent says first now that it is back.
    pub resumed: Option<Option<String>>,
}

/// How the bridged part of a call ended.
#[derive(Debug)]
pub struct Outcome {
    /// `caller_hangup`, `engine_error`, `stream_error`, `no_media`, `ended`, or the reason
    /// of a governor or the engine (`max_duration`, `silence`, `shutdown`, …).
    pub reason: &'static str,
    pub error: Option<String>,
    /// The engine, still open, when the stream ended for a handover (`reason` `handover`).
    pub parked: Option<Parked>,
}

/// An engine handed back by a bridge for the next stream of the same call.
pub struct Parked(pub Engine);

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parked")
    }
}

impl Outcome {
    pub fn engine_failed(&self) -> bool {
        self.reason == "engine_error"
    }

    pub fn is_handover(&self) -> bool {
        self.reason == HANDOVER
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Silence {
    Listening,
    Asked,
    Closing,
}

/// Latencies as the caller experiences them, measured at our edge.
#[derive(Default)]
struct Latency {
    greeting_ms: Option<f64>,
    /// When the caller stopped speaking, until the agent's first audio after it.
    turn_from: Option<Instant>,
    turn_ms: Vec<f64>,
    barge_in_ms: Vec<f64>,
    /// Pipeline engine: per-turn stage timings, and the providers in use.
    turns: Vec<TurnStats>,
    providers: Option<Providers>,
}

impl Latency {
    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "greeting_ms": self.greeting_ms,
            "turn_ms": self.turn_ms,
            "barge_in_ms": self.barge_in_ms,
        });
        if !self.turns.is_empty() {
            v["turns"] = serde_json::json!(self.turns);
        }
        v
    }
}

fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

/// Records why the call is ending, before the provider confirms the end. (Not a method: a
/// `&Bridge` held across the write would require the leg to be `Sync`.)
async fn note_end_reason(store: &Store, call_id: &CallId, reason: &'static str) {
    let id = call_id.to_string();
    if let Err(e) = store
        .run(move |c| calls::set_end_reason(c, &id, reason))
        .await
    {
        tracing::error!(error = %e, "cannot record end reason");
    }
}

pub struct Bridge<L: Leg> {
    cx: BridgeContext,
    leg: L,
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
    latency: Latency,
    /// Media frames since the last flush to the shared counters (kept local: no shared
    /// atomics touched per frame).
    frames_in: u64,
    frames_out: u64,
    /// Boxed: a call without recording carries one pointer, not the tap's buffers.
    recorder: Option<Box<Recorder>>,
    keypad: Keypad,
    /// The caller's current turn began after the agent had spoken and gone quiet.
    answering: bool,
    /// The caller is known to be a person (recorded once).
    person: bool,
    /// Something was asked to be said before hanging up and its audio has not begun yet: the
    /// hang-up waits for it (up to the hard deadline).
    awaiting_audio: bool,
    /// Leaving a voicemail: `Some(None)` until the message's audio begins, then its item.
    leaving: Option<Option<ItemId>>,
}

impl<L: Leg> Bridge<L> {
    /// Bridges `leg` and the engine until the call ends; returns the leg still open (the
    /// caller decides what the phone hears last) and how it ended.
    pub async fn run(
        mut cx: BridgeContext,
        leg: L,
        engine: Result<Engine, String>,
    ) -> (L, Outcome) {
        let now = Instant::now();
        let kind = cx.engine;
        let deadline = now + cx.max_duration;
        let silence_timeout = cx.silence_timeout;
        let end = cx.end.clone();
        let wind_down = cx.wind_down.clone();
        let recorder = cx
            .recording
            .take()
            .map(|path| Box::new(Recorder::start(path, now)));
        let mut b = Bridge {
            cx,
            leg,
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
            latency: Latency::default(),
            frames_in: 0,
            frames_out: 0,
            recorder,
            keypad: Keypad::default(),
            answering: false,
            person: false,
            awaiting_audio: false,
            leaving: None,
        };
        let mut engine = match engine {
            Ok(e) => e,
            Err(e) => return b.finish("engine_error", Some(e)).await,
        };
        let started = match b.cx.resumed.take() {
            None => engine.stream_started().await,
            Some(None) => Ok(()),
            Some(Some(text)) => engine.say(&text).await,
        };
        if let Err(e) = started {
            tracing::error!(error = %e, "engine failed");
            b.cx.breakers.failure(kind);
            return b.finish("engine_error", Some(e.to_string())).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut max_duration_hit = false;
        let mut winding_down = false;

        // Created once, not per loop turn: each `cancelled()` registers a waiter under a lock.
        let ended = end.cancelled();
        tokio::pin!(ended);
        let winding = wind_down.cancelled();
        tokio::pin!(winding);
        let (reason, error): (&'static str, Option<String>) = loop {
            tokio::select! {
                ev = b.leg.recv() => {
                    match ev {
                        LegEvent::Audio(payload) => {
                            b.frames_in += 1;
                            b.last_media = Instant::now();
                            if let Some(r) = &mut b.recorder {
                                r.caller_audio(&payload, b.last_media);
                            }
                            if let Err(e) = engine.caller_audio(&payload).await {
                                break ("engine_error", Some(e.to_string()));
                            }
                        }
                        LegEvent::Mark(seq) => {
                            let now = Instant::now();
                            b.playback.echoed(seq, now);
                            if !b.playback.pending() {
                                b.quiet_since = b.quiet_since.max(now);
                            }
                        }
                        LegEvent::Dtmf(key) => {
                            let now = Instant::now();
                            b.quiet_since = now;
                            if let Some(keys) = b.keypad.press(&key, now)
                                && let Err(e) = b.on_keypad(&mut engine, keys).await
                            {
                                break ("engine_error", Some(e));
                            }
                        }
                        // The carrier drops the socket (with or without `stop`) when it
                        // moves the call elsewhere.
                        LegEvent::Closed | LegEvent::Failed
                            if b.cx.handover.load(Ordering::SeqCst) =>
                        {
                            break (HANDOVER, None)
                        }
                        LegEvent::Closed => match b.leg.gone_reason() {
                            // The phone side did not hang up; it went away (a browser).
                            Some(r) => {
                                note_end_reason(&b.cx.store, &b.cx.call_id, r).await;
                                break (r, None);
                            }
                            None => break ("caller_hangup", None),
                        },
                        LegEvent::Failed => break ("stream_error", None),
                        LegEvent::Ignored => {}
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
                    if let Some(r) = &mut b.recorder {
                        r.flush(now);
                    }
                    if let Some(seq) = b.playback.mark_tail() {
                        let sent = match b.leg.feed_mark(seq).await {
                            Ok(()) => b.leg.flush().await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = sent {
                            break ("stream_error", Some(e));
                        }
                    }
                    if let Some((reason, hard)) = b.hangup
                        && ((!b.awaiting_audio && !b.playback.pending()) || now >= hard)
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
                                let _ = engine.say(phrases::STILL_THERE).await;
                            }
                            Silence::Asked => {
                                b.silence = Silence::Closing;
                                b.say_goodbye(&mut engine, "silence").await;
                            }
                            Silence::Closing => {}
                        }
                    }
                    if let Some(keys) = b.keypad.due(now)
                        && let Err(e) = b.on_keypad(&mut engine, keys).await
                    {
                        break ("engine_error", Some(e));
                    }
                    if now.duration_since(b.last_flush) >= TRANSCRIPT_FLUSH {
                        b.flush_transcript().await;
                        b.flush_frame_counts();
                    }
                }
                reply = ToolLink::next(&mut b.cx.tools) => {
                    if let Err(e) = b.on_tool_reply(&mut engine, reply).await {
                        break ("engine_error", Some(e));
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
        if reason == HANDOVER {
            let (leg, mut outcome) = b.finish(reason, error).await;
            outcome.parked = Some(Parked(engine));
            return (leg, outcome);
        }
        engine.close().await;
        if reason == "engine_error" {
            tracing::error!(error = ?error, "engine failed mid-call");
            b.cx.breakers.failure(kind);
        }
        b.finish(reason, error).await
    }

    async fn say_goodbye(&mut self, engine: &mut Engine, reason: &'static str) {
        note_end_reason(&self.cx.store, &self.cx.call_id, reason).await;
        let _ = engine.say(&self.cx.goodbye).await;
        self.hangup = Some((reason, Instant::now() + GOODBYE_GRACE));
    }

    /// The caller takes the floor (speech or keys): the phone's queue is cleared at once and
    /// the engine learns how much of the interrupted utterance was heard.
    async fn barge_in(&mut self, engine: &mut Engine) -> Result<(), String> {
        let heard = Instant::now();
        self.silence = Silence::Listening;
        if self.playback.pending() && self.hangup.is_none() {
            self.leg.clear().await?;
            self.latency.barge_in_ms.push(ms_since(heard));
            let now = Instant::now();
            if let Some(r) = &mut self.recorder {
                r.cleared(self.playback.unplayed(now));
            }
            if let Some((item, played)) = self.playback.cleared(now) {
                tracing::info!(item = %item, played_ms = played / 8, "barge-in");
                self.dropped_items.insert(item.clone());
                if let Some(l) = &self.cx.tools {
                    l.barge_ins.send_modify(|n| *n += 1);
                }
                engine
                    .interrupted(&item, played / 8)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// A transcript line: to the call's followers now, to the store with the next batch.
    fn transcript_line(&mut self, speaker: Speaker, text: String) {
        let at_ms = self.started.elapsed().as_millis() as i64;
        let _ = self.cx.events.send(CallEvent::Transcript {
            speaker: speaker.as_str(),
            text: text.clone(),
            at_ms,
        });
        self.transcript.push(TranscriptEntry {
            speaker: speaker.as_str(),
            text,
            at_ms,
        });
    }

    /// The caller pressed a key or answered the agent in a sentence: a person, whatever
    /// answering-machine detection reports later (SPEC §8).
    async fn confirm_person(&mut self) {
        if std::mem::replace(&mut self.person, true) {
            return;
        }
        let id = self.cx.call_id.to_string();
        if let Err(e) = self
            .cx
            .store
            .run(move |c| calls::confirm_person(c, &id))
            .await
        {
            tracing::warn!(error = %e, "cannot record that a person answered");
        }
    }

    /// A keypad entry is complete: the caller's `[keypad]` line, and the engine answers it.
    async fn on_keypad(&mut self, engine: &mut Engine, keys: String) -> Result<(), String> {
        self.barge_in(engine).await?;
        let now = Instant::now();
        self.quiet_since = now;
        self.latency.turn_from = Some(now);
        self.transcript_line(Speaker::Caller, super::keypad::transcript_line(&keys));
        self.confirm_person().await;
        engine
            .caller_text(&super::keypad::engine_text(&keys))
            .await
            .map_err(|e| e.to_string())
    }

    async fn on_engine_event(
        &mut self,
        engine: &mut Engine,
        ev: EngineEvent,
    ) -> Result<(), String> {
        match ev {
            EngineEvent::AgentAudio { item, payload_b64 } => {
                if self.dropped_items.contains(&item) || !crate::audio::is_base64(&payload_b64) {
                    return Ok(());
                }
                let bytes = crate::audio::base64_decoded_len(&payload_b64);
                if self.latency.greeting_ms.is_none() {
                    self.latency.greeting_ms = Some(ms_since(self.started));
                }
                if let Some(t) = self.latency.turn_from.take() {
                    self.latency.turn_ms.push(ms_since(t));
                }
                let now = Instant::now();
                if let Some(r) = &mut self.recorder {
                    r.agent_audio(&payload_b64, now);
                }
                // While a voicemail is left, the message is the only thing the machine hears
                // (the engine may still answer the beep as if someone spoke).
                match &mut self.leaving {
                    Some(slot @ None) => *slot = Some(item.clone()),
                    Some(Some(message)) if *message != item => return Ok(()),
                    _ => {}
                }
                self.awaiting_audio = false;
                let seq = self.playback.sent(&item, bytes, now);
                self.leg.feed_audio(&payload_b64).await?;
                if let Some(seq) = seq {
                    self.leg.feed_mark(seq).await?;
                }
                self.leg.flush().await?;
                self.frames_out += 1;
            }
            EngineEvent::Transcript { speaker, text } => {
                if speaker == Speaker::Caller
                    && self.answering
                    && text.split_whitespace().count() >= SENTENCE_WORDS
                {
                    self.confirm_person().await;
                }
                self.transcript_line(speaker, text);
                if speaker == Speaker::Caller && self.transcript.len() >= TRANSCRIPT_BATCH {
                    self.flush_transcript().await;
                }
            }
            EngineEvent::CallerSpeechStarted => {
                // Speech that starts once the agent has spoken and fallen silent answers it;
                // a machine's greeting starts at once, over ours.
                self.answering = self.frames_out > 0 && !self.playback.pending();
                self.caller_speaking = true;
                self.latency.turn_from = None;
                self.barge_in(engine).await?;
            }
            EngineEvent::CallerSpeechStopped => {
                self.caller_speaking = false;
                self.quiet_since = Instant::now();
                self.latency.turn_from = Some(self.quiet_since);
            }
            EngineEvent::Hangup { reason } => {
                note_end_reason(&self.cx.store, &self.cx.call_id, reason).await;
                self.hangup = Some((reason, Instant::now() + GOODBYE_GRACE));
            }
            EngineEvent::TurnStats(t) => {
                let m = &self.cx.metrics;
                for (stage, provider, v) in [
                    ("stt_final", t.stt, Some(t.stt_final_ms)),
                    ("llm_first_token", t.llm.as_str(), t.llm_first_token_ms),
                    ("tts_first_audio", t.tts, t.tts_first_audio_ms),
                    ("turn", "all", Some(t.turn_ms)),
                ] {
                    if let Some(v) = v {
                        m.pipeline_stage
                            .with(&[stage, provider])
                            .observe(v / 1000.0);
                    }
                }
                self.latency.turns.push(t);
            }
            EngineEvent::Providers(p) => self.latency.providers = Some(p),
            EngineEvent::ToolCall {
                id,
                name,
                arguments,
            } => {
                tracing::info!(tool = %name, tool_call_id = %id, "tool call");
                self.note_tool(format!("{name} {arguments}"));
                let call = ToolCallEvent {
                    id: id.clone(),
                    name,
                    arguments,
                };
                let forwarded = self
                    .cx
                    .tools
                    .as_ref()
                    .is_some_and(|l| l.calls.send(call).is_ok());
                if !forwarded {
                    engine
                        .tool_result(&id, "error: tools are not available on this call")
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// A tool line in the transcript and the call's live events (`speaker = "tool"`).
    fn note_tool(&mut self, text: String) {
        let at_ms = self.started.elapsed().as_millis() as i64;
        let _ = self.cx.events.send(CallEvent::Transcript {
            speaker: "tool",
            text: text.clone(),
            at_ms,
        });
        self.transcript.push(TranscriptEntry {
            speaker: "tool",
            text,
            at_ms,
        });
    }

    async fn on_tool_reply(&mut self, engine: &mut Engine, reply: ToolReply) -> Result<(), String> {
        match reply {
            ToolReply::Result { id, name, output } => {
                let short: String = output.chars().take(500).collect();
                self.note_tool(format!("{name} → {short}"));
                engine
                    .tool_result(&id, &output)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            ToolReply::Say(text) => engine.say(&text).await.map_err(|e| e.to_string())?,
            ToolReply::LeaveMessage(text) => {
                // The machine records from its beep: what the agent was saying is cut, the
                // message follows, and the call ends once it has played.
                if self.hangup.is_none() {
                    self.barge_in(engine).await?;
                    let reason = "voicemail_left";
                    note_end_reason(&self.cx.store, &self.cx.call_id, reason).await;
                    engine.say_over(&text).await.map_err(|e| e.to_string())?;
                    // Room for the message at a slow speaking pace before the hard stop.
                    let speaking = Duration::from_millis(text.chars().count() as u64 * 90);
                    self.hangup = Some((reason, Instant::now() + speaking + GOODBYE_GRACE));
                    self.awaiting_audio = true;
                    self.leaving = Some(None);
                }
            }
            ToolReply::Hangup(reason) => {
                if self.hangup.is_none() {
                    note_end_reason(&self.cx.store, &self.cx.call_id, reason).await;
                    self.hangup = Some((reason, Instant::now() + GOODBYE_GRACE));
                }
            }
        }
        Ok(())
    }

    fn flush_frame_counts(&mut self) {
        let m = &self.cx.metrics;
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
        let id = self.cx.call_id.to_string();
        if let Err(e) = self
            .cx
            .store
            .run(move |c| calls::add_transcript(c, &id, &entries))
            .await
        {
            tracing::error!(error = %e, "cannot store transcript lines");
        }
    }

    /// Our bookkeeping at the end: transcript flushed, end reason noted, counters and
    /// latencies recorded. The leg stays open for the caller's last word.
    async fn finish(mut self, reason: &'static str, error: Option<String>) -> (L, Outcome) {
        // Keys still being gathered when the stream ended were pressed: the transcript keeps
        // them, though the engine no longer can answer.
        if let Some(keys) = self.keypad.take() {
            self.transcript_line(Speaker::Caller, super::keypad::transcript_line(&keys));
        }
        self.flush_transcript().await;
        if reason != HANDOVER {
            note_end_reason(&self.cx.store, &self.cx.call_id, reason).await;
        }
        self.flush_frame_counts();
        if let Some(r) = self.recorder.take() {
            // What was still queued at the phone when the call ended was never heard.
            let result = r.finish(self.playback.unplayed(Instant::now())).await;
            let json = result.to_json();
            let id = self.cx.call_id.to_string();
            if let Err(e) = self
                .cx
                .store
                .run(move |c| crate::store::recording::set_call_recording(c, &id, &json))
                .await
            {
                tracing::error!(error = %e, "cannot store the recording status");
            }
        }
        let engine = self.cx.engine.as_str();
        let m = &self.cx.metrics;
        if let Some(g) = self.latency.greeting_ms {
            m.greeting_latency.with(&[engine]).observe(g / 1000.0);
        }
        for t in &self.latency.turn_ms {
            m.turn_latency.with(&[engine]).observe(t / 1000.0);
        }
        for t in &self.latency.barge_in_ms {
            m.barge_in_latency.with(&[engine]).observe(t / 1000.0);
        }
        if reason == "engine_error" {
            m.engine_errors.with(&[engine, "session"]).inc();
        }
        let latency = self.latency.to_json();
        let providers = self.latency.providers.take().map(|p| serde_json::json!(p));
        let id = self.cx.call_id.to_string();
        if let Err(e) = self
            .cx
            .store
            .run(move |c| {
                calls::set_latency(c, &id, &latency)?;
                match providers {
                    Some(p) => calls::set_providers(c, &id, &p),
                    None => Ok(()),
                }
            })
            .await
        {
            tracing::error!(error = %e, "cannot store call latency");
        }
        (
            self.leg,
            Outcome {
                reason,
                error,
                parked: None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::CallContext;
    use crate::engines::scripted::ScriptedEngine;

    /// A phone that listens for a while, echoes nothing, then hangs up. Like a real leg,
    /// `recv` is cancel-safe: the bridge drops it whenever another branch fires.
    struct FakeLeg {
        hang_up_at: Instant,
        audio: Vec<String>,
        marks: Vec<u64>,
        flushes: usize,
        closed: bool,
    }

    impl Leg for FakeLeg {
        async fn recv(&mut self) -> LegEvent<'_> {
            tokio::time::sleep_until(self.hang_up_at).await;
            LegEvent::Closed
        }
        async fn feed_audio(&mut self, payload_b64: &str) -> Result<(), String> {
            self.audio.push(payload_b64.to_owned());
            Ok(())
        }
        async fn feed_mark(&mut self, seq: u64) -> Result<(), String> {
            self.marks.push(seq);
            Ok(())
        }
        async fn flush(&mut self) -> Result<(), String> {
            self.flushes += 1;
            Ok(())
        }
        async fn clear(&mut self) -> Result<(), String> {
            Ok(())
        }
        async fn close(&mut self) {
            self.closed = true;
        }
        async fn refuse(&mut self, _why: super::super::leg::Refusal) {}
    }

    #[tokio::test]
    async fn any_leg_gets_the_greeting_marked_and_the_outcome_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let call_id = CallId::generate();
        let (events, mut rx) = broadcast::channel(32);
        let cx = BridgeContext {
            call_id: call_id.clone(),
            store,
            events,
            end: CancellationToken::new(),
            wind_down: CancellationToken::new(),
            engine: EngineKind::Scripted,
            max_duration: Duration::from_secs(60),
            silence_timeout: Duration::from_secs(60),
            goodbye: "Bye.".into(),
            metrics: Arc::new(Metrics::new()),
            breakers: Arc::new(Breakers::default()),
            recording: None,
            tools: None,
            handover: Arc::new(AtomicBool::new(false)),
            resumed: None,
        };
        let engine = Engine::Scripted(Box::new(ScriptedEngine::new(CallContext {
            call_id,
            tenant: "t".into(),
            inbound: false,
            system_prompt: String::new(),
            greeting: "Hello there.".into(),
            voice: String::new(),
            script: vec![],
            goodbye: "Bye.".into(),
            tools: Vec::new(),
        })));
        let leg = FakeLeg {
            hang_up_at: Instant::now() + Duration::from_millis(300),
            audio: vec![],
            marks: vec![],
            flushes: 0,
            closed: false,
        };
        let (leg, outcome) = Bridge::run(cx, leg, Ok(engine)).await;
        assert_eq!(outcome.reason, "caller_hangup");
        assert!(outcome.error.is_none() && !outcome.engine_failed());
        assert!(!leg.audio.is_empty());
        // Each agent frame leaves with one flush (with its mark, when due); the tail of the
        // utterance gets a mark (and a flush) of its own on the next tick.
        assert!(leg.flushes > leg.audio.len());
        assert!(leg.marks.len() >= 2 && leg.marks.windows(2).all(|w| w[1] == w[0] + 1));
        // The bridge leaves the leg open: the call domain decides what the phone hears last.
        assert!(!leg.closed);
        assert!(matches!(
            rx.try_recv(),
            Ok(CallEvent::Transcript {
                speaker: "agent",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn an_engine_that_never_started_ends_the_bridge_with_engine_error() {
        let dir = tempfile::tempdir().unwrap();
        let cx = BridgeContext {
            call_id: CallId::generate(),
            store: Store::open(dir.path()).unwrap(),
            events: broadcast::channel(32).0,
            end: CancellationToken::new(),
            wind_down: CancellationToken::new(),
            engine: EngineKind::OpenAiRealtime,
            max_duration: Duration::from_secs(60),
            silence_timeout: Duration::from_secs(60),
            goodbye: "Bye.".into(),
            metrics: Arc::new(Metrics::new()),
            breakers: Arc::new(Breakers::default()),
            recording: None,
            tools: None,
            handover: Arc::new(AtomicBool::new(false)),
            resumed: None,
        };
        let leg = FakeLeg {
            hang_up_at: Instant::now() + Duration::from_secs(60),
            audio: vec![],
            marks: vec![],
            flushes: 0,
            closed: false,
        };
        let (leg, outcome) = Bridge::run(cx, leg, Err("connect failed".into())).await;
        assert!(outcome.engine_failed());
        assert_eq!(outcome.error.as_deref(), Some("connect failed"));
        assert!(leg.audio.is_empty() && !leg.closed);
    }
}

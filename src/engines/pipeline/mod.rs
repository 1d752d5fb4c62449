//! The pipeline engine (SPEC §6): Deepgram speech-to-text → an OpenAI-compatible LLM → a
//! TTS provider, each slot with an ordered list of providers.
//!
//! One task per call (the *actor*) owns the sockets and the conversation; the bridge talks to
//! it through two channels, so `next_event` stays cancel-safe and the bridge's task never
//! waits on a provider. The actor takes turns:
//! - a caller turn ends on `speech_final` or `UtteranceEnd` (first wins); its finals plus the
//!   history go to the LLM; LLM text is cut at sentence/clause ends and streamed to TTS; TTS
//!   audio goes to the phone as it comes;
//! - barge-in: `SpeechStarted` then at least `interrupt_min_words` interim words while the
//!   agent talks → `CallerSpeechStarted` (the bridge clears the phone and reports how much
//!   played), the LLM request and the synthesis are cancelled, and the history keeps only the
//!   text whose audio was heard (TTS segments mapped onto the played bytes);
//! - fallback: a provider that fails or misses its deadline before audio has played is
//!   replaced by the next in its slot within the same turn; all failed → an error naming each
//!   (the call domain then plays the apology and ends with `engine_error`).
//!
//! Pre-warm: `start` (run while the phone rings) opens STT and TTS and begins synthesizing the
//! greeting, held until the stream starts.

pub mod aura;
pub mod cache;
pub mod deepgram_stt;
pub mod elevenlabs;
pub mod llm;
pub mod openai_speech;
pub mod text;
pub mod tts;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::cache::TtsCache;
use self::deepgram_stt::{DeepgramStt, SttEvent};
use self::llm::{LlmEvent, LlmStream};
use self::openai_speech::{OpenAiTts, SpeechParams};
use self::tts::{TtsConn, TtsKind, TtsOut};
use super::breaker::Breakers;
use super::{CallContext, EngineError, EngineEvent, Speaker};
use crate::config::{Config, DeepgramConfig, ElevenLabsConfig, LlmConfig, PipelineConfig};

/// SPEC §6 deadlines.
pub const STT_CONNECT: Duration = Duration::from_secs(2);
pub const LLM_FIRST_TOKEN: Duration = Duration::from_secs(3);
pub const TTS_FIRST_AUDIO: Duration = Duration::from_secs(2);
/// Deepgram closes after 10 s without audio or a message; the phone sends audio all call
/// long, so this matters while it rings and when a stream stalls.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(4);
/// Audio pieces handed to the bridge (100 ms).
const PIECE: usize = 800;
/// μ-law bytes per character when a TTS gave no timing for text (about 65 ms a character).
const BYTES_PER_CHAR: f64 = 520.0;

/// One caller turn's timings (SPEC §6 `latency.turns[]`) and the providers that served it.
#[derive(Debug, Clone, Serialize)]
pub struct TurnStats {
    /// Last recognised caller word → end of turn (`speech_final`/`UtteranceEnd`).
    pub stt_final_ms: f64,
    /// End of turn → first LLM token (of the provider that answered).
    pub llm_first_token_ms: Option<f64>,
    /// First text to TTS → first audio.
    pub tts_first_audio_ms: Option<f64>,
    /// Caller stopped speaking → first agent audio sent.
    pub turn_ms: f64,
    /// voicectl's own share of `turn_ms`: everything but waiting on a provider (endpointing,
    /// the LLM's text up to the first piece spoken, the TTS's first audio).
    pub own_ms: f64,
    #[serde(skip)]
    pub stt: &'static str,
    #[serde(skip)]
    pub llm: String,
    #[serde(skip)]
    pub tts: &'static str,
}

/// The providers a call is using, for `providers` on the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Providers {
    pub stt: String,
    pub llm: String,
    pub tts: String,
}

pub(crate) fn http() -> reqwest::Client {
    // One connection pool for every call: TLS sessions and HTTP/2 connections to the LLM
    // and speech APIs are reused instead of set up per turn.
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .build()
                .unwrap_or_default()
        })
        .clone()
}

pub(crate) fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "the server".into())
}

/// A WebSocket connect error as one line; a refused key names the config key.
pub(crate) fn ws_error(e: tokio_tungstenite::tungstenite::Error, key: &str) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => {
            let s = r.status().as_u16();
            if s == 401 || s == 403 {
                format!("refused the key (HTTP {s}): check {key}")
            } else {
                format!("refused the connection (HTTP {s})")
            }
        }
        e => format!("cannot connect: {e}"),
    }
}

/// Everything the engine needs from the config, resolved once per call.
#[derive(Clone)]
struct Settings {
    pipeline: PipelineConfig,
    deepgram: DeepgramConfig,
    elevenlabs: ElevenLabsConfig,
    /// In the order of `pipeline.llm`.
    llms: Vec<LlmConfig>,
    speech: SpeechParams,
    tts: Vec<TtsKind>,
    cache: Option<TtsCache>,
}

impl Settings {
    fn from_config(cfg: &Config, ctx: &CallContext) -> Result<Self, EngineError> {
        let Some(p) = cfg.pipeline.clone() else {
            return Err(EngineError::Failed(
                "engine \"pipeline\" is not configured ([pipeline] missing)".into(),
            ));
        };
        let llms = p
            .llm
            .iter()
            .filter_map(|n| cfg.llm.iter().find(|l| &l.name == n).cloned())
            .collect();
        let tts = p.tts.iter().filter_map(|t| TtsKind::parse(t)).collect();
        let cache = p
            .tts_cache
            .then(|| TtsCache::new(&cfg.server.data_dir, p.tts_cache_max_bytes));
        Ok(Self {
            speech: SpeechParams {
                url: format!(
                    "{}/audio/speech",
                    cfg.openai.api_base_url.trim_end_matches('/')
                ),
                api_key: cfg.openai.api_key.expose().to_owned(),
                model: cfg.openai.tts_model.clone(),
                voice: ctx.voice.clone(),
            },
            pipeline: p,
            deepgram: cfg.deepgram.clone(),
            elevenlabs: cfg.elevenlabs.clone(),
            llms,
            tts,
            cache,
        })
    }

    /// (voice, model) of a TTS provider: what, besides the text, makes its audio.
    fn voice_model(&self, k: TtsKind) -> (&str, &str) {
        match k {
            TtsKind::ElevenLabs => (&self.elevenlabs.voice, &self.elevenlabs.model),
            TtsKind::Deepgram => (&self.deepgram.tts_voice, "aura"),
            TtsKind::OpenAi => (&self.speech.voice, &self.speech.model),
        }
    }
}

async fn connect_tts(s: &Settings, k: TtsKind) -> Result<TtsConn, String> {
    let fut = async {
        match k {
            TtsKind::ElevenLabs => elevenlabs::ElevenLabsTts::connect(&s.elevenlabs)
                .await
                .map(TtsConn::ElevenLabs),
            TtsKind::Deepgram => aura::AuraTts::connect(&s.deepgram)
                .await
                .map(TtsConn::Deepgram),
            TtsKind::OpenAi => Ok(TtsConn::OpenAi(OpenAiTts::new(http(), s.speech.clone()))),
        }
    };
    tokio::time::timeout(TTS_FIRST_AUDIO, fut)
        .await
        .map_err(|_| "no connection within 2 s".to_owned())?
}

async fn connect_stt(s: &Settings, breakers: &Breakers) -> Result<DeepgramStt, String> {
    let mut failures = Vec::new();
    for name in &s.pipeline.stt {
        let key = format!("stt:{name}");
        if !breakers.admit_provider(&key) {
            failures.push(format!("{name}: circuit open"));
            continue;
        }
        match tokio::time::timeout(STT_CONNECT, DeepgramStt::connect(&s.deepgram)).await {
            Ok(Ok(c)) => {
                breakers.provider_success(&key);
                return Ok(c);
            }
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(_) => failures.push(format!("{name}: no connection within 2 s")),
        }
        breakers.provider_failure(&key);
    }
    Err(format!(
        "all speech-to-text providers failed ({})",
        failures.join("; ")
    ))
}

enum Cmd {
    StreamStarted,
    Audio(Vec<u8>),
    Say(String),
    /// A caller turn given as text (keypad).
    CallerText(String),
    /// The answer to the model's tool call `id`.
    ToolResult {
        id: String,
        output: String,
    },
    Interrupted {
        item: String,
        played_ms: u64,
    },
    Close,
}

type Out = Result<EngineEvent, EngineError>;

/// The bridge's handle on a call's pipeline.
pub struct PipelineEngine {
    cmd: mpsc::Sender<Cmd>,
    events: mpsc::Receiver<Out>,
    task: Option<JoinHandle<()>>,
}

impl PipelineEngine {
    /// Opens STT and TTS (while the phone rings) and starts the greeting's synthesis.
    pub async fn start(
        ctx: CallContext,
        cfg: &Config,
        breakers: Arc<Breakers>,
    ) -> Result<Self, EngineError> {
        let s = Settings::from_config(cfg, &ctx)?;
        let (stt, tts) = tokio::join!(connect_stt(&s, &breakers), first_tts(&s, &breakers));
        let stt = stt.map_err(EngineError::Failed)?;
        let (tts, tts_idx, failures) = match tts {
            Ok(t) => t,
            Err(e) => {
                stt.close().await;
                return Err(EngineError::Failed(e));
            }
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(512);
        let (out_tx, out_rx) = mpsc::channel(1024);
        let greeting = ctx.greeting.clone();
        let ctx_tools = ctx.tools.clone();
        let now = Instant::now();
        let actor = Actor {
            s,
            ctx,
            breakers,
            out: out_tx,
            cmd: cmd_rx,
            stt: Some(stt),
            last_stt_send: now,
            stt_audio_bytes: 0,
            tts: Some(tts),
            tts_idx,
            tts_failures: failures,
            reconnect: None,
            streaming: false,
            held: Vec::new(),
            held_bytes: 0,
            history: Vec::new(),
            reply: None,
            finished: None,
            say_queue: VecDeque::new(),
            caller: CallerTurn::default(),
            agent_until: now,
            items: 0,
            llm_idx: 0,
            providers_sent: None,
            fatal: None,
            tools: llm::tools_json(&ctx_tools),
            tool_block: None,
        };
        let task = tokio::spawn(actor.run(greeting));
        Ok(Self {
            cmd: cmd_tx,
            events: out_rx,
            task: Some(task),
        })
    }

    async fn send(&self, c: Cmd) -> Result<(), EngineError> {
        self.cmd
            .send(c)
            .await
            .map_err(|_| EngineError::Failed("pipeline engine stopped".into()))
    }

    pub async fn stream_started(&mut self) -> Result<(), EngineError> {
        self.send(Cmd::StreamStarted).await
    }

    pub async fn caller_audio(&mut self, payload_b64: &str) -> Result<(), EngineError> {
        // Decoded straight into the buffer that becomes Deepgram's binary frame: the one
        // allocation per frame is the outgoing message.
        let mut frame = Vec::with_capacity(payload_b64.len() / 4 * 3);
        if base64::engine::general_purpose::STANDARD
            .decode_vec(payload_b64, &mut frame)
            .is_err()
            || frame.is_empty()
        {
            return Ok(());
        }
        // Never wait on the actor: a frame it cannot take now is dropped (it would be stale
        // by the time it could).
        match self.cmd.try_send(Cmd::Audio(frame)) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(EngineError::Failed("pipeline engine stopped".into()))
            }
        }
    }

    pub async fn interrupted(&mut self, item: &str, played_ms: u64) -> Result<(), EngineError> {
        self.send(Cmd::Interrupted {
            item: item.to_owned(),
            played_ms,
        })
        .await
    }

    pub async fn say(&mut self, text: &str) -> Result<(), EngineError> {
        self.send(Cmd::Say(text.to_owned())).await
    }

    pub async fn caller_text(&mut self, text: &str) -> Result<(), EngineError> {
        self.send(Cmd::CallerText(text.to_owned())).await
    }

    pub async fn tool_result(&mut self, id: &str, output: &str) -> Result<(), EngineError> {
        self.send(Cmd::ToolResult {
            id: id.to_owned(),
            output: output.to_owned(),
        })
        .await
    }

    /// Cancel-safe.
    pub async fn next_event(&mut self) -> Result<EngineEvent, EngineError> {
        match self.events.recv().await {
            Some(r) => r,
            None => Err(EngineError::Failed("pipeline engine stopped".into())),
        }
    }

    pub async fn close(mut self) {
        let _ = self.cmd.try_send(Cmd::Close);
        if let Some(mut t) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
        {
            t.abort();
        }
    }
}

impl Drop for PipelineEngine {
    fn drop(&mut self) {
        // A pre-warmed engine that is never claimed must not leave its sockets open.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Connects the first TTS provider that answers; returns it, its index and the failures.
async fn first_tts(
    s: &Settings,
    breakers: &Breakers,
) -> Result<(TtsConn, usize, Vec<String>), String> {
    let mut failures = Vec::new();
    for (i, &k) in s.tts.iter().enumerate() {
        let key = format!("tts:{}", k.as_str());
        if !breakers.admit_provider(&key) {
            failures.push(format!("{}: circuit open", k.as_str()));
            continue;
        }
        match connect_tts(s, k).await {
            Ok(c) => return Ok((c, i, failures)),
            Err(e) => {
                breakers.provider_failure(&key);
                failures.push(format!("{}: {e}", k.as_str()));
            }
        }
    }
    Err(format!(
        "all text-to-speech providers failed ({})",
        failures.join("; ")
    ))
}

#[derive(Default)]
struct CallerTurn {
    finals: Vec<String>,
    final_words: usize,
    words: usize,
    speech_at: Option<Instant>,
    last_words_at: Option<Instant>,
    /// `CallerSpeechStarted` went to the bridge for this turn.
    announced: bool,
    /// This turn cut the agent.
    barged: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Greeting,
    Turn,
    Say,
}

/// One agent utterance in the making.
struct Reply {
    item: String,
    kind: Kind,
    /// The turn's end (caller done speaking), for `turn_ms`.
    t0: Instant,
    stt_final_ms: f64,
    llm: Option<LlmStream>,
    llm_started: Instant,
    llm_deadline: Option<Instant>,
    llm_first_ms: Option<f64>,
    /// When the LLM's text first made a piece worth speaking.
    first_piece_at: Option<Instant>,
    llm_failures: Vec<String>,
    llm_done: bool,
    pending: String,
    /// Pieces of text given to the TTS so far (resent to a fallback provider).
    sent: Vec<String>,
    tts_started: Option<Instant>,
    tts_deadline: Option<Instant>,
    tts_first_ms: Option<f64>,
    tts_finished: bool,
    spoken: Spoken,
    cache_key: Option<String>,
    cache_buf: Vec<u8>,
}

/// What an utterance sent to the phone, and the text each stretch of audio speaks.
#[derive(Default)]
struct Spoken {
    item: String,
    audio: u64,
    /// (audio bytes at the segment's end, its text).
    segments: Vec<(u64, String)>,
    /// Text given to the TTS and not yet covered by a segment.
    open_text: String,
    /// Cut by barge-in: waiting for the bridge's played figure.
    cut_at: Option<Instant>,
    /// Our own estimate of what played by the cut, if the bridge reports nothing.
    est_played: u64,
    /// The TTS stopped part-way: only the text of the audio that came was said.
    truncated: bool,
}

impl Spoken {
    /// Segment texts carry their own spacing (ElevenLabs' alignment cuts mid-word), so
    /// they are joined as they are.
    fn full_text(&self) -> String {
        if self.truncated {
            return self.played_text(self.audio);
        }
        let mut t: String = self.segments.iter().map(|(_, s)| s.as_str()).collect();
        if !self.open_text.trim().is_empty() && self.audio > self.segments.last().map_or(0, |s| s.0)
        {
            t.push(' ');
            t.push_str(self.open_text.trim());
        }
        normalize(&t)
    }

    /// The text whose audio was heard, when `played` bytes of it played.
    fn played_text(&self, played: u64) -> String {
        let mut out = String::new();
        let mut prev = 0u64;
        let mut rate_bytes = 0u64;
        let mut rate_chars = 0usize;
        for (end, s) in &self.segments {
            if *end <= played {
                out.push_str(s);
                rate_bytes += end - prev;
                rate_chars += s.chars().count();
                prev = *end;
            } else {
                let frac = (played - prev) as f64 / (end - prev).max(1) as f64;
                out.push_str(text::spoken_prefix(s, frac));
                return normalize(&out);
            }
        }
        if played > prev && !self.open_text.is_empty() {
            let per_char = if rate_chars > 0 {
                rate_bytes as f64 / rate_chars as f64
            } else {
                BYTES_PER_CHAR
            };
            let chars = (played - prev) as f64 / per_char;
            let frac = chars / self.open_text.chars().count().max(1) as f64;
            out.push_str(text::spoken_prefix(&self.open_text, frac));
        }
        normalize(&out)
    }
}

fn normalize(t: &str) -> String {
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct Actor {
    s: Settings,
    ctx: CallContext,
    breakers: Arc<Breakers>,
    out: mpsc::Sender<Out>,
    cmd: mpsc::Receiver<Cmd>,
    stt: Option<DeepgramStt>,
    last_stt_send: Instant,
    /// Audio sent on the current STT socket, in bytes (8 per ms): Deepgram's word times are
    /// on this timeline, which is how a turn's end is placed on the clock.
    stt_audio_bytes: u64,
    tts: Option<TtsConn>,
    tts_idx: usize,
    tts_failures: Vec<String>,
    /// A TTS connection being (re)opened in the background.
    reconnect: Option<JoinHandle<Result<TtsConn, String>>>,
    streaming: bool,
    held: Vec<EngineEvent>,
    held_bytes: u64,
    history: Vec<Value>,
    reply: Option<Reply>,
    /// The last utterance, until we know how much of it was heard.
    finished: Option<Spoken>,
    say_queue: VecDeque<String>,
    caller: CallerTurn,
    /// When the phone will have played everything sent (our estimate).
    agent_until: Instant,
    items: u32,
    llm_idx: usize,
    providers_sent: Option<Providers>,
    fatal: Option<String>,
    /// The call's functions as chat-completions `tools`.
    tools: Value,
    /// Tool calls waiting for their results. Kept out of `history` until every result is in:
    /// the API wants each assistant `tool_calls` message followed at once by one `tool`
    /// message per call, whatever the caller said meanwhile.
    tool_block: Option<ToolBlock>,
}

struct ToolBlock {
    /// The assistant message with the `tool_calls`.
    call: Value,
    results: Vec<Value>,
    pending: Vec<String>,
}

async fn stt_next(stt: &mut Option<DeepgramStt>) -> SttEvent {
    match stt {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn tts_next(tts: &mut Option<TtsConn>) -> TtsOut {
    match tts {
        Some(t) => t.next().await,
        None => std::future::pending().await,
    }
}

async fn llm_next(reply: &mut Option<Reply>) -> LlmEvent {
    match reply.as_mut().and_then(|r| r.llm.as_mut()) {
        Some(l) => match l.rx.recv().await {
            Some(e) => e,
            None => LlmEvent::Failed("the request ended".into()),
        },
        None => std::future::pending().await,
    }
}

async fn reconnected(
    h: &mut Option<JoinHandle<Result<TtsConn, String>>>,
) -> Result<TtsConn, String> {
    match h {
        Some(j) => {
            let r = j.await.unwrap_or_else(|e| Err(e.to_string()));
            *h = None;
            r
        }
        None => std::future::pending().await,
    }
}

impl Actor {
    async fn run(mut self, greeting: String) {
        if !greeting.is_empty() {
            self.start_reply(Kind::Greeting, Some(greeting)).await;
        }
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        while self.fatal.is_none() {
            let deadline = self
                .reply
                .as_ref()
                .and_then(|r| match (r.llm_deadline, r.tts_deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                })
                .unwrap_or(far);
            let keepalive = self.last_stt_send + KEEPALIVE_EVERY;
            let (settle_at, has_finished) = (self.settle_at(), self.finished.is_some());
            tokio::select! {
                c = self.cmd.recv() => match c {
                    None | Some(Cmd::Close) => break,
                    Some(c) => self.on_cmd(c).await,
                },
                ev = stt_next(&mut self.stt) => self.on_stt(ev).await,
                ev = llm_next(&mut self.reply) => self.on_llm(ev).await,
                out = tts_next(&mut self.tts) => self.on_tts(out).await,
                conn = reconnected(&mut self.reconnect) => match conn {
                    Ok(c) => {
                        if let Some(old) = self.tts.replace(c) {
                            old.close().await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reopen the TTS connection; retrying when needed"),
                },
                _ = tokio::time::sleep_until(keepalive) => {
                    self.last_stt_send = Instant::now();
                    if let Some(s) = self.stt.as_mut()
                        && let Err(e) = s.keep_alive().await
                    {
                        tracing::debug!(error = %e, "keep-alive failed");
                    }
                }
                _ = tokio::time::sleep_until(deadline) => self.on_deadline().await,
                _ = tokio::time::sleep_until(settle_at), if has_finished => {
                    self.on_played().await;
                }
            }
            if self.reply.is_none()
                && self.fatal.is_none()
                && let Some(next) = self.say_queue.pop_front()
            {
                self.start_reply(Kind::Say, Some(next)).await;
            }
        }
        if let Some(e) = self.fatal.take() {
            let _ = self.out.send(Err(EngineError::Failed(e))).await;
        }
        self.reply = None;
        if let Some(s) = self.stt.take() {
            s.close().await;
        }
        if let Some(t) = self.tts.take() {
            t.close().await;
        }
        if let Some(h) = self.reconnect.take() {
            h.abort();
        }
    }

    async fn emit(&mut self, ev: EngineEvent) {
        if !self.streaming {
            if let EngineEvent::AgentAudio { payload_b64, .. } = &ev {
                self.held_bytes += (payload_b64.len() / 4 * 3) as u64;
            }
            self.held.push(ev);
            return;
        }
        if self.out.send(Ok(ev)).await.is_err() {
            self.fatal = Some("bridge gone".into());
        }
    }

    fn current_providers(&self) -> Providers {
        Providers {
            stt: self.s.pipeline.stt.first().cloned().unwrap_or_default(),
            llm: self
                .s
                .llms
                .get(self.llm_idx)
                .map(|l| l.name.clone())
                .unwrap_or_default(),
            tts: self
                .s
                .tts
                .get(self.tts_idx)
                .map(|k| k.as_str().to_owned())
                .unwrap_or_default(),
        }
    }

    async fn announce_providers(&mut self) {
        let p = self.current_providers();
        if self.providers_sent.as_ref() != Some(&p) {
            self.providers_sent = Some(p.clone());
            self.emit(EngineEvent::Providers(p)).await;
        }
    }

    async fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Audio(b) => {
                self.last_stt_send = Instant::now();
                self.stt_audio_bytes += b.len() as u64;
                if let Some(s) = self.stt.as_mut()
                    && let Err(e) = s.send_audio(b).await
                {
                    // The read side reports the closed socket and reopens it.
                    tracing::debug!(error = %e, "cannot send audio to STT");
                }
            }
            Cmd::StreamStarted => {
                self.streaming = true;
                self.agent_until = Instant::now() + Duration::from_millis(self.held_bytes / 8);
                self.announce_providers().await;
                for ev in std::mem::take(&mut self.held) {
                    if self.out.send(Ok(ev)).await.is_err() {
                        self.fatal = Some("bridge gone".into());
                        return;
                    }
                }
            }
            Cmd::Say(text) => {
                if self.reply.is_some() {
                    self.say_queue.push_back(text);
                } else {
                    self.start_reply(Kind::Say, Some(text)).await;
                }
            }
            Cmd::CallerText(text) => {
                // Keys pressed while the agent talks answer it like a barge-in would.
                if self.reply.is_some() {
                    self.cut_reply().await;
                }
                if let Some(f) = self.finished.take() {
                    self.settle(f, None).await;
                }
                self.history.push(json!({"role": "user", "content": text}));
                self.start_reply(Kind::Turn, None).await;
            }
            Cmd::ToolResult { id, output } => self.on_tool_result(id, output).await,
            Cmd::Interrupted { item, played_ms } => {
                if let Some(f) = self.finished.take_if(|f| f.item == item) {
                    self.settle(f, Some(played_ms * 8)).await;
                }
            }
            Cmd::Close => {}
        }
    }

    fn agent_active(&self) -> bool {
        self.reply.is_some() || Instant::now() < self.agent_until
    }

    async fn on_stt(&mut self, ev: SttEvent) {
        let now = Instant::now();
        match ev {
            SttEvent::SpeechStarted => {
                self.caller.speech_at = Some(now);
                self.maybe_barge_in().await;
            }
            SttEvent::Interim { words } => {
                if words > 0 {
                    self.caller.last_words_at = Some(now);
                }
                self.caller.words = self.caller.final_words + words;
                self.maybe_barge_in().await;
            }
            SttEvent::Final {
                text,
                speech_final,
                end_s,
            } => {
                if !text.is_empty() {
                    self.caller.final_words += text.split_whitespace().count();
                    self.caller.words = self.caller.final_words;
                    // The audio after the last word was sent in real time: that long ago
                    // the caller stopped speaking.
                    let sent_ms = self.stt_audio_bytes / 8;
                    let spoken_end = end_s
                        .map(|e| (e * 1000.0) as u64)
                        .filter(|&e| e <= sent_ms)
                        .and_then(|e| {
                            now.checked_sub(Duration::from_millis((sent_ms - e).min(10_000)))
                        });
                    self.caller.last_words_at =
                        spoken_end.or(self.caller.last_words_at).or(Some(now));
                    self.caller.finals.push(text);
                    self.maybe_barge_in().await;
                }
                if speech_final {
                    self.end_of_turn().await;
                }
            }
            SttEvent::UtteranceEnd => self.end_of_turn().await,
            SttEvent::Closed(why) => {
                tracing::info!(reason = %why, "speech-to-text socket closed; reopening");
                self.stt = None;
                match connect_stt(&self.s, &self.breakers).await {
                    Ok(s) => {
                        self.stt = Some(s);
                        self.last_stt_send = Instant::now();
                        self.stt_audio_bytes = 0;
                    }
                    Err(e) => self.fatal = Some(e),
                }
            }
            SttEvent::Other => {}
        }
    }

    async fn maybe_barge_in(&mut self) {
        let c = &self.caller;
        if c.barged {
            return;
        }
        if !self.agent_active() {
            if !c.announced && (c.speech_at.is_some() || c.words > 0) {
                self.caller.announced = true;
                self.emit(EngineEvent::CallerSpeechStarted).await;
            }
            return;
        }
        let min = self.s.pipeline.interrupt_min_words as usize;
        let heard = c.speech_at.is_some() || c.words > 0;
        if !heard || c.words < min {
            return;
        }
        tracing::info!(words = c.words, "barge-in");
        self.caller.barged = true;
        self.caller.announced = true;
        self.cut_reply().await;
        self.emit(EngineEvent::CallerSpeechStarted).await;
    }

    /// Cancels the utterance in progress (LLM and synthesis); what it played is settled when
    /// the bridge reports it.
    async fn cut_reply(&mut self) {
        self.say_queue.clear();
        let now = Instant::now();
        let remaining = self.agent_until.saturating_duration_since(now).as_millis() as u64 * 8;
        self.agent_until = now;
        if let Some(mut r) = self.reply.take() {
            r.llm = None;
            if r.tts_started.is_some()
                && let Some(t) = self.tts.as_mut()
                && !t.cancel().await
            {
                self.drop_tts_and_reopen();
            }
            let mut spoken = std::mem::take(&mut r.spoken);
            spoken.cut_at = Some(now);
            spoken.est_played = spoken.audio.saturating_sub(remaining);
            if let Some(f) = self.finished.take() {
                self.settle(f, None).await;
            }
            self.finished = Some(spoken);
        } else if let Some(f) = self.finished.as_mut() {
            // The reply was complete but still playing.
            f.cut_at = Some(now);
            f.est_played = f.audio.saturating_sub(remaining);
        }
    }

    /// Puts an utterance into the history and transcript with the text that was heard.
    async fn settle(&mut self, f: Spoken, played: Option<u64>) {
        let text = match played {
            Some(p) => f.played_text(p),
            None if f.cut_at.is_some() => f.played_text(f.est_played),
            None => f.full_text(),
        };
        if text.is_empty() {
            return;
        }
        self.history
            .push(json!({"role": "assistant", "content": text}));
        self.emit(EngineEvent::Transcript {
            speaker: Speaker::Agent,
            text,
        })
        .await;
    }

    /// When the last utterance will have played (or, cut, when the bridge's report of
    /// what played is overdue).
    fn settle_at(&self) -> Instant {
        match self.finished.as_ref().and_then(|f| f.cut_at) {
            Some(cut) => cut + Duration::from_secs(1),
            None => self.agent_until,
        }
    }

    /// An utterance that has finished playing goes into the history and transcript whole;
    /// a cut one whose played figure never came, with our estimate.
    async fn on_played(&mut self) {
        if let Some(f) = self.finished.take() {
            self.settle(f, None).await;
        }
    }

    async fn end_of_turn(&mut self) {
        if self.caller.finals.is_empty() {
            // Speech without words (noise, a cough): the caller is quiet again, or the
            // silence governor would wait for them forever.
            if std::mem::take(&mut self.caller).announced && !self.agent_active() {
                self.emit(EngineEvent::CallerSpeechStopped).await;
            }
            return;
        }
        let c = std::mem::take(&mut self.caller);
        let text = c.finals.join(" ");
        let now = Instant::now();
        if self.agent_active() && !c.barged {
            // A backchannel ("mm-hm") under the agent: noted, not answered.
            self.emit(EngineEvent::Transcript {
                speaker: Speaker::Caller,
                text,
            })
            .await;
            return;
        }
        if let Some(f) = self.finished.take() {
            self.settle(f, None).await;
        }
        self.emit(EngineEvent::Transcript {
            speaker: Speaker::Caller,
            text: text.clone(),
        })
        .await;
        self.emit(EngineEvent::CallerSpeechStopped).await;
        self.history.push(json!({"role": "user", "content": text}));
        let t0 = c.last_words_at.unwrap_or(now);
        self.start_reply(Kind::Turn, None).await;
        if let Some(r) = self.reply.as_mut() {
            r.t0 = t0;
            r.stt_final_ms = ms(now.duration_since(t0));
        }
    }

    async fn start_reply(&mut self, kind: Kind, phrase: Option<String>) {
        if let Some(f) = self.finished.take() {
            self.settle(f, None).await;
        }
        self.items += 1;
        let item = format!("pl_{}", self.items);
        let now = Instant::now();
        self.reply = Some(Reply {
            item: item.clone(),
            kind,
            t0: now,
            stt_final_ms: 0.0,
            llm: None,
            llm_started: now,
            llm_deadline: None,
            llm_first_ms: None,
            first_piece_at: None,
            llm_failures: Vec::new(),
            llm_done: kind != Kind::Turn,
            pending: String::new(),
            sent: Vec::new(),
            tts_started: None,
            tts_deadline: None,
            tts_first_ms: None,
            tts_finished: false,
            spoken: Spoken {
                item,
                ..Default::default()
            },
            cache_key: None,
            cache_buf: Vec::new(),
        });
        match (kind, phrase) {
            (Kind::Turn, _) => self.start_llm().await,
            (_, Some(text)) => self.speak_phrase(text).await,
            (_, None) => self.reply = None,
        }
    }

    /// A fixed phrase: from the cache when it is there, else synthesized (and then cached).
    async fn speak_phrase(&mut self, text: String) {
        let kind = self.s.tts.get(self.tts_idx).copied();
        if let (Some(cache), Some(k)) = (self.s.cache.clone(), kind) {
            let (voice, model) = self.s.voice_model(k);
            let key = cache::key(k.as_str(), voice, model, &text);
            if let Some(audio) = cache.get(&key).await {
                tracing::debug!("TTS cache hit");
                self.play_cached(audio, text).await;
                return;
            }
            if let Some(r) = self.reply.as_mut() {
                r.cache_key = Some(key);
            }
        }
        self.tts_text(text).await;
        self.tts_finish().await;
    }

    async fn play_cached(&mut self, audio: Vec<u8>, text: String) {
        let Some(item) = self.reply.as_ref().map(|r| r.item.clone()) else {
            return;
        };
        for piece in audio.chunks(PIECE) {
            self.send_audio(&item, piece).await;
        }
        if let Some(r) = self.reply.as_mut() {
            r.spoken.segments.push((r.spoken.audio, text));
        }
        self.complete_reply().await;
    }

    async fn start_llm(&mut self) {
        loop {
            let Some(cfg) = self.s.llms.get(self.llm_idx).cloned() else {
                let failures = self
                    .reply
                    .as_ref()
                    .map(|r| r.llm_failures.join("; "))
                    .unwrap_or_default();
                self.fatal = Some(format!("all LLM providers failed ({failures})"));
                return;
            };
            let key = format!("llm:{}", cfg.name);
            if !self.breakers.admit_provider(&key) {
                if let Some(r) = self.reply.as_mut() {
                    r.llm_failures.push(format!("{}: circuit open", cfg.name));
                }
                self.llm_idx += 1;
                continue;
            }
            let mut messages = Vec::with_capacity(self.history.len() + 1);
            messages.push(json!({"role": "system", "content": self.ctx.system_prompt}));
            messages.extend(self.history.iter().cloned());
            let stream = llm::start(http(), cfg, messages, self.tools.clone());
            if let Some(r) = self.reply.as_mut() {
                r.llm = Some(stream);
                r.llm_started = Instant::now();
                r.llm_deadline = Some(r.llm_started + LLM_FIRST_TOKEN);
            }
            return;
        }
    }

    async fn on_llm(&mut self, ev: LlmEvent) {
        match ev {
            LlmEvent::Token(t) => {
                let Some(r) = self.reply.as_mut() else { return };
                if r.llm_first_ms.is_none() {
                    r.llm_first_ms = Some(ms(r.llm_started.elapsed()));
                    r.llm_deadline = None;
                    let name = format!("llm:{}", self.s.llms[self.llm_idx].name);
                    self.breakers.provider_success(&name);
                }
                r.pending.push_str(&t);
                if r.first_piece_at.is_none() && text::has_piece(&r.pending) {
                    r.first_piece_at = Some(Instant::now());
                }
                while let Some(piece) = self
                    .reply
                    .as_mut()
                    .and_then(|r| text::next_piece(&mut r.pending))
                {
                    self.tts_text(piece).await;
                }
            }
            LlmEvent::Done { tool_calls } => {
                if !tool_calls.is_empty() {
                    self.call_tools(tool_calls).await;
                }
                let Some(r) = self.reply.as_mut() else { return };
                r.llm = None;
                r.llm_done = true;
                r.llm_deadline = None;
                r.first_piece_at.get_or_insert_with(Instant::now);
                let rest = std::mem::take(&mut r.pending);
                let nothing = r.sent.is_empty() && rest.trim().is_empty();
                if nothing {
                    self.reply = None;
                    return;
                }
                if !rest.trim().is_empty() {
                    self.tts_text(rest.trim().to_owned()).await;
                }
                self.tts_finish().await;
            }
            LlmEvent::Failed(e) => self.llm_failed(e).await,
        }
    }

    /// The model asked for functions: the bridge runs them (once each) and answers with
    /// [`Cmd::ToolResult`]; what the model said before asking is spoken meanwhile.
    async fn call_tools(&mut self, calls: Vec<llm::ToolCall>) {
        let block = self.tool_block.get_or_insert_with(|| ToolBlock {
            call: json!({"role": "assistant", "content": null, "tool_calls": []}),
            results: Vec::new(),
            pending: Vec::new(),
        });
        for (i, c) in calls.into_iter().enumerate() {
            // Some OpenAI-compatible servers leave the id out; the API needs one to pair the
            // result with the call.
            let id = if c.id.is_empty() {
                format!("call_{}_{i}", self.items)
            } else {
                c.id
            };
            if let Some(list) = block.call["tool_calls"].as_array_mut() {
                list.push(json!({"id": id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}}));
            }
            block.pending.push(id.clone());
            let ev = EngineEvent::ToolCall {
                id,
                name: c.name,
                arguments: c.arguments,
            };
            if self.out.send(Ok(ev)).await.is_err() {
                self.fatal = Some("bridge gone".into());
                return;
            }
        }
    }

    /// A tool answered. Once every pending call has, the calls and their results join the
    /// history and the model speaks again with them — unless the caller has started another
    /// turn meanwhile, whose reply then sees them.
    async fn on_tool_result(&mut self, id: String, output: String) {
        let Some(block) = self.tool_block.as_mut() else {
            tracing::warn!(tool_call_id = %id, "a tool result for no pending call");
            return;
        };
        let Some(pos) = block.pending.iter().position(|p| *p == id) else {
            tracing::warn!(tool_call_id = %id, "a tool result for no pending call");
            return;
        };
        block.pending.remove(pos);
        block
            .results
            .push(json!({"role": "tool", "tool_call_id": id, "content": output}));
        if !block.pending.is_empty() {
            return;
        }
        if let Some(done) = self.tool_block.take() {
            self.history.push(done.call);
            self.history.extend(done.results);
        }
        if self.reply.is_none() {
            self.start_reply(Kind::Turn, None).await;
        }
    }

    async fn llm_failed(&mut self, e: String) {
        let Some(name) = self.s.llms.get(self.llm_idx).map(|l| l.name.clone()) else {
            return;
        };
        tracing::warn!(llm = %name, error = %e, "LLM failed");
        self.breakers.provider_failure(&format!("llm:{name}"));
        let Some(r) = self.reply.as_mut() else { return };
        r.llm = None;
        r.llm_deadline = None;
        if r.spoken.audio > 0 {
            // Audio has played: never switch mid-utterance; finish with what we have.
            r.llm_done = true;
            let rest = std::mem::take(&mut r.pending);
            if !rest.trim().is_empty() {
                self.tts_text(rest.trim().to_owned()).await;
            }
            self.tts_finish().await;
            return;
        }
        r.llm_failures.push(format!("{name}: {e}"));
        // Start over with the next provider: drop the text and any synthesis of it.
        r.pending.clear();
        r.sent.clear();
        r.spoken.open_text.clear();
        let had_tts = r.tts_started.take().is_some();
        r.tts_deadline = None;
        r.tts_finished = false;
        if had_tts
            && let Some(t) = self.tts.as_mut()
            && !t.cancel().await
        {
            self.drop_tts_and_reopen();
        }
        self.llm_idx += 1;
        self.start_llm().await;
        self.announce_providers().await;
    }

    /// Makes sure a TTS connection is open, reopening it (same provider) if it went away.
    async fn ensure_tts(&mut self) -> bool {
        if self.tts.is_some() {
            return true;
        }
        if let Some(h) = self.reconnect.take()
            && let Ok(Ok(c)) = h.await
        {
            self.tts = Some(c);
            return true;
        }
        loop {
            let Some(k) = self.s.tts.get(self.tts_idx).copied() else {
                self.fatal = Some(format!(
                    "all text-to-speech providers failed ({})",
                    self.tts_failures.join("; ")
                ));
                return false;
            };
            match connect_tts(&self.s, k).await {
                Ok(c) => {
                    self.tts = Some(c);
                    return true;
                }
                Err(e) => self.tts_provider_failed(e),
            }
        }
    }

    fn tts_provider_failed(&mut self, e: String) {
        if let Some(k) = self.s.tts.get(self.tts_idx) {
            tracing::warn!(tts = k.as_str(), error = %e, "TTS failed");
            self.breakers
                .provider_failure(&format!("tts:{}", k.as_str()));
            self.tts_failures.push(format!("{}: {e}", k.as_str()));
        }
        self.tts_idx += 1;
        while let Some(k) = self.s.tts.get(self.tts_idx) {
            if self.breakers.admit_provider(&format!("tts:{}", k.as_str())) {
                break;
            }
            self.tts_failures
                .push(format!("{}: circuit open", k.as_str()));
            self.tts_idx += 1;
        }
    }

    fn drop_tts_and_reopen(&mut self) {
        if let Some(t) = self.tts.take() {
            tokio::spawn(t.close());
        }
        if let Some(k) = self.s.tts.get(self.tts_idx).copied() {
            let s = self.s.clone();
            if let Some(h) = self
                .reconnect
                .replace(tokio::spawn(async move { connect_tts(&s, k).await }))
            {
                h.abort();
            }
        }
    }

    async fn tts_text(&mut self, piece: String) {
        if !self.ensure_tts().await {
            return;
        }
        let Some(r) = self.reply.as_mut() else { return };
        let Some(t) = self.tts.as_mut() else { return };
        let mut r_ok = Ok(());
        if r.tts_started.is_none() {
            let now = Instant::now();
            r.tts_started = Some(now);
            r.tts_deadline = Some(now + TTS_FIRST_AUDIO);
            r_ok = t.begin().await;
        }
        if r_ok.is_ok() {
            r_ok = t.speak(&piece).await;
        }
        r.spoken.open_text.push_str(&piece);
        r.spoken.open_text.push(' ');
        r.sent.push(piece);
        if let Err(e) = r_ok {
            self.tts_failed(e).await;
        }
    }

    async fn tts_finish(&mut self) {
        let Some(r) = self.reply.as_mut() else { return };
        r.tts_finished = true;
        if r.tts_started.is_none() {
            return;
        }
        if let Some(t) = self.tts.as_mut()
            && let Err(e) = t.finish().await
        {
            self.tts_failed(e).await;
        }
    }

    /// The TTS failed during the current utterance.
    async fn tts_failed(&mut self, e: String) {
        let audio_started = self.reply.as_ref().is_some_and(|r| r.spoken.audio > 0);
        if let Some(t) = self.tts.take() {
            tokio::spawn(t.close());
        }
        if audio_started {
            // Never switch mid-utterance: the utterance ends where its audio stopped.
            tracing::warn!(error = %e, "TTS failed mid-utterance");
            if let Some(k) = self.s.tts.get(self.tts_idx) {
                self.breakers
                    .provider_failure(&format!("tts:{}", k.as_str()));
            }
            self.drop_tts_and_reopen();
            if let Some(r) = self.reply.as_mut() {
                r.spoken.truncated = true;
            }
            self.complete_reply().await;
            return;
        }
        self.tts_provider_failed(e);
        if let Some(h) = self.reconnect.take() {
            h.abort();
        }
        // Same turn, next provider: everything said so far goes to it.
        loop {
            if !self.ensure_tts().await {
                return;
            }
            match self.respeak().await {
                Ok(()) => break,
                Err(e) => {
                    if let Some(t) = self.tts.take() {
                        tokio::spawn(t.close());
                    }
                    self.tts_provider_failed(e);
                }
            }
        }
        self.announce_providers().await;
    }

    /// Gives the current utterance's text so far to a fresh TTS connection.
    async fn respeak(&mut self) -> Result<(), String> {
        let (Some(r), Some(t)) = (self.reply.as_mut(), self.tts.as_mut()) else {
            return Ok(());
        };
        r.cache_key = None;
        if r.sent.is_empty() {
            r.tts_started = None;
            r.tts_deadline = None;
            return Ok(());
        }
        let now = Instant::now();
        r.tts_started = Some(now);
        r.tts_deadline = Some(now + TTS_FIRST_AUDIO);
        t.begin().await?;
        for piece in &r.sent {
            t.speak(piece).await?;
        }
        if r.tts_finished {
            t.finish().await?;
        }
        Ok(())
    }

    async fn send_audio(&mut self, item: &str, piece: &[u8]) {
        let now = Instant::now();
        let b64 = base64::engine::general_purpose::STANDARD.encode(piece);
        if self.streaming {
            self.agent_until =
                self.agent_until.max(now) + Duration::from_micros(piece.len() as u64 * 125);
        }
        if let Some(r) = self.reply.as_mut() {
            r.spoken.audio += piece.len() as u64;
            if r.cache_key.is_some() {
                r.cache_buf.extend_from_slice(piece);
            }
        }
        self.emit(EngineEvent::AgentAudio {
            item: item.to_owned(),
            payload_b64: b64,
        })
        .await;
    }

    async fn on_tts(&mut self, out: TtsOut) {
        match out {
            TtsOut::Audio(bytes) => {
                let Some(r) = self.reply.as_mut() else { return };
                let item = r.item.clone();
                if r.tts_first_ms.is_none() {
                    let now = Instant::now();
                    r.tts_first_ms = r.tts_started.map(|t| ms(now.duration_since(t)));
                    r.tts_deadline = None;
                    if let Some(k) = self.s.tts.get(self.tts_idx) {
                        self.breakers
                            .provider_success(&format!("tts:{}", k.as_str()));
                    }
                    if r.kind == Kind::Turn {
                        let turn_ms = ms(now.duration_since(r.t0));
                        let llm_wait = r
                            .first_piece_at
                            .map_or(0.0, |p| ms(p.saturating_duration_since(r.llm_started)));
                        let tts_wait = r.tts_first_ms.unwrap_or(0.0);
                        let stats = TurnStats {
                            own_ms: (turn_ms - r.stt_final_ms - llm_wait - tts_wait).max(0.0),
                            stt_final_ms: r.stt_final_ms,
                            llm_first_token_ms: r.llm_first_ms,
                            tts_first_audio_ms: r.tts_first_ms,
                            turn_ms,
                            stt: "deepgram",
                            llm: self
                                .s
                                .llms
                                .get(self.llm_idx)
                                .map(|l| l.name.clone())
                                .unwrap_or_default(),
                            tts: self.s.tts.get(self.tts_idx).map_or("", |k| k.as_str()),
                        };
                        self.emit(EngineEvent::TurnStats(stats)).await;
                    }
                }
                for piece in bytes.chunks(PIECE) {
                    self.send_audio(&item, piece).await;
                }
            }
            TtsOut::Segment(text) => {
                if let Some(r) = self.reply.as_mut() {
                    let s = &mut r.spoken;
                    // The open text starts with this segment's text; drop it from there.
                    let covered = normalize(&text);
                    let open = normalize(&s.open_text);
                    s.open_text = open
                        .strip_prefix(&covered)
                        .map(|rest| rest.trim().to_owned())
                        .unwrap_or(open);
                    // Whole sentences (Aura, OpenAI) need the space the alignment of
                    // ElevenLabs would carry.
                    let text = if self
                        .tts
                        .as_ref()
                        .is_some_and(|t| t.kind() == TtsKind::ElevenLabs)
                    {
                        text
                    } else {
                        format!("{text} ")
                    };
                    let s = &mut r.spoken;
                    s.segments.push((s.audio, text));
                }
            }
            TtsOut::Done => {
                if self.reply.as_ref().is_some_and(|r| r.tts_finished) {
                    self.complete_reply().await;
                }
            }
            TtsOut::Closed(why) | TtsOut::Failed(why) => {
                let mid = self.reply.as_ref().is_some_and(|r| r.tts_started.is_some());
                if mid {
                    self.tts_failed(why).await;
                } else {
                    // Closed while idle (e.g. for inactivity): reopen quietly.
                    tracing::debug!(reason = %why, "TTS connection closed while idle; reopening");
                    self.tts = None;
                    self.drop_tts_and_reopen();
                }
            }
        }
    }

    async fn complete_reply(&mut self) {
        let Some(mut r) = self.reply.take() else {
            return;
        };
        if let (Some(key), Some(cache)) = (r.cache_key.take(), self.s.cache.clone())
            && !r.cache_buf.is_empty()
        {
            let audio = std::mem::take(&mut r.cache_buf);
            tokio::spawn(async move { cache.put(&key, audio).await });
        }
        if r.tts_started.is_some() && self.tts.as_ref().is_some_and(TtsConn::single_use) {
            self.drop_tts_and_reopen();
        }
        if let Some(f) = self.finished.take() {
            self.settle(f, None).await;
        }
        if r.spoken.audio > 0 {
            self.finished = Some(std::mem::take(&mut r.spoken));
        }
    }

    async fn on_deadline(&mut self) {
        let now = Instant::now();
        let Some(r) = self.reply.as_ref() else { return };
        if r.llm_deadline.is_some_and(|d| now >= d) {
            self.llm_failed("no first token within 3 s".into()).await;
        } else if r.tts_deadline.is_some_and(|d| now >= d) {
            self.tts_failed("no audio within 2 s".into()).await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn played_text_follows_the_segments() {
        let s = Spoken {
            item: "i".into(),
            audio: 3000,
            segments: vec![
                (1000, "One two. ".into()),
                (2000, "Three four five six. ".into()),
            ],
            open_text: "Seven eight.".into(),
            ..Default::default()
        };
        assert_eq!(s.played_text(0), "");
        assert_eq!(s.played_text(1000), "One two.");
        assert_eq!(s.played_text(1500), "One two. Three four");
        assert_eq!(s.played_text(2000), "One two. Three four five six.");
        assert_eq!(s.full_text(), "One two. Three four five six. Seven eight.");
    }
}

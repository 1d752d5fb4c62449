//! Faithful fakes of the third-party services voicectl talks to, for its integration tests
//! (`tests/`) and benchmarks (`benches/`) (PROTOCOLS §4, §5, §6).
//!
//! What belongs here: one module per service, each a server that binds an ephemeral loopback
//! port, checks what voicectl sends against the provider's documented protocol (violations are
//! recorded, not panicked on), records everything behind a mutex, broadcasts events so tests
//! await instead of sleeping, and shuts down when its handle is dropped. Services to come
//! (Deepgram, ElevenLabs, OpenAI chat) get a module of their own beside these. Twilio itself is
//! not here: it is the `twilio-sim` crate, which `serve --dev` also runs.
//!
//! Nothing here depends on voicectl: a fake that shared the code under test would agree with
//! its bugs. μ-law comes from `twilio-sim`; Twilio Media Streams parsing is [`twilio_media`].
//!
//! Layout:
//! - services: [`realtime::FakeRealtime`] (OpenAI Realtime over WebSocket),
//!   pipeline providers [`deepgram::FakeDeepgram`] (live STT and Aura TTS),
//!   [`elevenlabs::FakeElevenLabs`] (stream-input TTS), [`openai_http::FakeOpenAiHttp`]
//!   (streaming chat completions and speech),
//!   [`ultravox::FakeUltravox`] (REST plus the `joinUrl` WebSocket);
//! - wire formats the services share: [`twilio_media`] (a stream endpoint's side of Twilio
//!   Media Streams, for Ultravox's `twilio` medium);
//! - the toolkit below, shared by every fake: [`Recorder`] with `wait_until`,
//!   [`expect_event`], the [`ServerGuard`] with [`bind`]/[`serve`], an [`EnergyVad`], and the
//!   deterministic tones the fake agents speak ([`agent_mulaw`], [`agent_pcm_bytes`]).

// Services.
pub mod deepgram;
pub mod elevenlabs;
pub mod openai_http;
pub mod realtime;
pub mod ultravox;

// Wire formats shared by services.
pub mod twilio_media;

use std::f64::consts::PI;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use twilio_sim::mulaw;

/// State behind a mutex plus a broadcast of events, emitted after each state change so a
/// waiter that re-checks the state on every event never misses one.
pub struct Recorder<S, E> {
    state: Mutex<S>,
    tx: broadcast::Sender<E>,
}

impl<S, E: Clone> Recorder<S, E> {
    pub fn new(state: S) -> Self {
        Recorder {
            state: Mutex::new(state),
            tx: broadcast::channel(16384).0,
        }
    }

    /// The lock, poison-tolerant: a panicking test must not cascade into the fake.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.lock())
    }

    pub fn emit(&self, event: E) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<E> {
        self.tx.subscribe()
    }

    /// Waits until `f` returns `Some` for the recorded state, re-checking after every event.
    /// Panics (failing the test) after `timeout`, naming `what`.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&S) -> Option<T>,
    ) -> T {
        let mut rx = self.tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = f(&self.lock()) {
                return t;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    panic!("fake shut down while waiting for {what}")
                }
                Ok(_) => {}
            }
        }
    }
}

/// Receives events until one matches `pred`, tolerating lag. Panics after `timeout`.
pub async fn expect_event<E: Clone + std::fmt::Debug, T>(
    rx: &mut broadcast::Receiver<E>,
    timeout: Duration,
    mut pred: impl FnMut(&E) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("timed out after {timeout:?} waiting for an event"),
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("event channel closed"),
            Ok(Ok(e)) => {
                if let Some(t) = pred(&e) {
                    return t;
                }
            }
        }
    }
}

/// A running axum server; dropping it cancels the accept loop and every session task.
pub struct ServerGuard {
    pub addr: SocketAddr,
    pub token: CancellationToken,
    _drop: DropGuard,
}

/// Binds an ephemeral loopback port.
pub async fn bind() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake server");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// Serves `router` on `listener` until `token` is cancelled (the guard cancels it on drop).
pub fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    token: CancellationToken,
) -> ServerGuard {
    let addr = listener.local_addr().expect("local addr");
    let stop = token.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    ServerGuard {
        addr,
        _drop: token.clone().drop_guard(),
        token,
    }
}

/// `now + d`, saturating far in the future instead of overflowing (client-chosen durations).
pub fn after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86400 * 365))
}

/// Sends a close frame, then drains the socket (bounded) so the close handshake completes.
pub async fn close_ws(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_owned()),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = socket.recv().await {}
    })
    .await;
}

/// Energy VAD tuning: 20 ms windows of mean absolute amplitude.
#[derive(Debug, Clone, Copy)]
pub struct VadOpts {
    /// Mean |sample| (linear 16-bit) above which a 20 ms window counts as speech.
    pub threshold: u32,
    /// Consecutive loud audio before speech starts.
    pub start_ms: u64,
    /// Consecutive quiet audio before speech stops.
    pub stop_ms: u64,
}

impl Default for VadOpts {
    fn default() -> Self {
        VadOpts {
            threshold: 600,
            start_ms: 40,
            stop_ms: 400,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// Speech began at `start_ms` of the input audio timeline.
    Started { start_ms: u64 },
    /// Speech that began at `start_ms` ended at `end_ms` (end of the last loud window).
    Stopped { start_ms: u64, end_ms: u64 },
}

/// Energy VAD over the input audio timeline (not the wall clock), so it is deterministic.
pub struct EnergyVad {
    opts: VadOpts,
    window: Vec<i16>,
    /// Audio consumed so far, in ms (whole windows).
    pos_ms: u64,
    loud_run_ms: u64,
    quiet_run_ms: u64,
    speaking: bool,
    start_ms: u64,
    last_loud_end_ms: u64,
}

pub const WINDOW_SAMPLES: usize = 160;
const WINDOW_MS: u64 = 20;

impl EnergyVad {
    pub fn new(opts: VadOpts) -> Self {
        EnergyVad {
            opts,
            window: Vec::with_capacity(WINDOW_SAMPLES),
            pos_ms: 0,
            loud_run_ms: 0,
            quiet_run_ms: 0,
            speaking: false,
            start_ms: 0,
            last_loud_end_ms: 0,
        }
    }

    pub fn speaking(&self) -> bool {
        self.speaking
    }

    pub fn push_mulaw(&mut self, bytes: &[u8], out: &mut Vec<VadEvent>) {
        for &b in bytes {
            self.push_sample(mulaw::decode(b), out);
        }
    }

    pub fn push_pcm(&mut self, samples: impl IntoIterator<Item = i16>, out: &mut Vec<VadEvent>) {
        for s in samples {
            self.push_sample(s, out);
        }
    }

    fn push_sample(&mut self, s: i16, out: &mut Vec<VadEvent>) {
        self.window.push(s);
        if self.window.len() < WINDOW_SAMPLES {
            return;
        }
        let sum: u64 = self
            .window
            .iter()
            .map(|&s| (s as i32).unsigned_abs() as u64)
            .sum();
        let loud = sum / WINDOW_SAMPLES as u64 > self.opts.threshold as u64;
        self.window.clear();
        let window_start = self.pos_ms;
        self.pos_ms += WINDOW_MS;
        if loud {
            if !self.speaking && self.loud_run_ms == 0 {
                self.start_ms = window_start;
            }
            self.loud_run_ms += WINDOW_MS;
            self.quiet_run_ms = 0;
            self.last_loud_end_ms = self.pos_ms;
            if !self.speaking && self.loud_run_ms >= self.opts.start_ms.max(WINDOW_MS) {
                self.speaking = true;
                out.push(VadEvent::Started {
                    start_ms: self.start_ms,
                });
            }
        } else {
            self.loud_run_ms = 0;
            self.quiet_run_ms += WINDOW_MS;
            if self.speaking && self.quiet_run_ms >= self.opts.stop_ms.max(WINDOW_MS) {
                self.speaking = false;
                out.push(VadEvent::Stopped {
                    start_ms: self.start_ms,
                    end_ms: self.last_loud_end_ms,
                });
            }
        }
    }
}

/// Linear samples of a sine tone: `n` samples at 8 kHz from sample index `start`.
pub fn tone_pcm(freq_hz: f64, amplitude: f64, start: usize, n: usize) -> Vec<i16> {
    (start..start + n)
        .map(|i| (amplitude * (2.0 * PI * freq_hz * i as f64 / 8000.0).sin()).round() as i16)
        .collect()
}

/// The same tone in μ-law.
pub fn tone_mulaw(freq_hz: f64, amplitude: f64, start: usize, n: usize) -> Vec<u8> {
    tone_pcm(freq_hz, amplitude, start, n)
        .into_iter()
        .map(mulaw::encode)
        .collect()
}

/// Amplitude of the fake agents' voice: loud enough for any energy VAD.
pub const AGENT_AMPLITUDE: f64 = 6000.0;

/// The frequency the fake agent speaks its `n`-th utterance (1-based) at: 400, 450, … 850 Hz.
pub fn agent_freq(n: u32) -> f64 {
    400.0 + 50.0 * (n.saturating_sub(1) % 10) as f64
}

/// The exact μ-law bytes of the fake agent's `n`-th utterance, `len` bytes long. Tests can
/// rebuild any prefix of what a fake sent.
pub fn agent_mulaw(n: u32, len: usize) -> Vec<u8> {
    tone_mulaw(agent_freq(n), AGENT_AMPLITUDE, 0, len)
}

/// The exact s16le PCM bytes of the fake agent's `n`-th utterance, `samples` samples long.
pub fn agent_pcm_bytes(n: u32, samples: usize) -> Vec<u8> {
    tone_pcm(agent_freq(n), AGENT_AMPLITUDE, 0, samples)
        .into_iter()
        .flat_map(i16::to_le_bytes)
        .collect()
}

/// A caller "speaking": a 300 Hz tone in μ-law, `ms` long.
pub fn caller_speech_mulaw(ms: usize) -> Vec<u8> {
    tone_mulaw(300.0, 8000.0, 0, ms * 8)
}

/// Splits `text` into word deltas ("Hello ", "from ", "the ", "fake") whose concatenation is
/// the text.
pub fn word_deltas(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        cur.push(ch);
        if ch == ' ' {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `1234` → `"1.234s"`, `3000` → `"3s"`: the protobuf-JSON duration format Ultravox uses.
pub fn proto_duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// Parses a protobuf duration string (`"30s"`, `"0.5s"`, `"-1s"` is rejected) to a Duration.
pub fn parse_proto_duration(s: &str) -> Option<Duration> {
    let num = s.strip_suffix('s')?;
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    let int_ok = int == "0"
        || (!int.is_empty()
            && int.len() <= 12
            && !int.starts_with('0')
            && int.bytes().all(|b| b.is_ascii_digit()));
    let frac_ok =
        frac.is_none_or(|f| !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()));
    if !int_ok || !frac_ok {
        return None;
    }
    let secs: u64 = int.parse().ok()?;
    let nanos: u32 = match frac {
        Some(f) => format!("{f:0<9}").parse().ok()?,
        None => 0,
    };
    Some(Duration::new(secs, nanos))
}

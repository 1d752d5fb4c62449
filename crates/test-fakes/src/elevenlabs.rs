//! A faithful fake of ElevenLabs' single-context stream-input WebSocket
//! (`/v1/text-to-speech/{voice}/stream-input`, WAVE2-PROTOCOLS §1).
//!
//! The first message opens the stream (`{"text":" ", …}`); text messages add text and
//! `"flush": true` forces generation of what is buffered; `{"text":""}` ends the input: the
//! rest is generated, `{"isFinal": true}` follows and the server closes. Audio is the fake
//! agent's tone ([`super::agent_mulaw`], numbered per generation) in `ulaw_8000`, base64 in
//! `{"audio": …}` messages, 100 ms per message at 4× real time. No text for
//! `inactivity_timeout` seconds (default 20; scaled by `idle_ms_per_s` so tests can be quick)
//! closes with 1008 `input_timeout_exceeded`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::deepgram::{Fault, FaultPlan};
use super::{Recorder, ServerGuard, agent_mulaw, close_ws};

#[derive(Debug, Clone)]
pub struct ElevenLabsOpts {
    /// Expected in the `xi-api-key` header.
    pub api_key: String,
    /// Wall time from a flush to its first audio.
    pub latency_ms: u64,
    pub ms_per_char: u64,
    /// Milliseconds of wall time per second of `inactivity_timeout` (1000 = real).
    pub idle_ms_per_s: u64,
    pub fault: Option<FaultPlan>,
}

impl Default for ElevenLabsOpts {
    fn default() -> Self {
        ElevenLabsOpts {
            api_key: "xi-fake-key".into(),
            latency_ms: 40,
            ms_per_char: 20,
            idle_ms_per_s: 1000,
            fault: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ElSession {
    pub voice: String,
    pub query: HashMap<String, String>,
    pub open: bool,
    /// Text messages after the opening one, in order.
    pub texts: Vec<String>,
    pub flushes: usize,
    /// `{"text":""}` received.
    pub ended: bool,
    /// Every audio byte sent.
    pub audio: Vec<u8>,
    pub final_sent: bool,
    pub closed_by_server: Option<(u16, String)>,
    pub violations: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ElevenLabsState {
    pub sessions: Vec<ElSession>,
    pub attempts: usize,
    pub rejected: usize,
}

impl ElevenLabsState {
    pub fn open(&self) -> usize {
        self.sessions.iter().filter(|s| s.open).count()
    }
}

struct Shared {
    opts: ElevenLabsOpts,
    rec: Recorder<ElevenLabsState, ()>,
    token: CancellationToken,
}

pub struct FakeElevenLabs {
    shared: Arc<Shared>,
    guard: ServerGuard,
}

impl FakeElevenLabs {
    pub async fn start(opts: ElevenLabsOpts) -> FakeElevenLabs {
        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            opts,
            rec: Recorder::new(ElevenLabsState::default()),
            token: token.clone(),
        });
        let router = Router::new()
            .route("/v1/text-to-speech/{voice}/stream-input", get(upgrade))
            .route("/v1/user", get(user))
            .with_state(shared.clone());
        let (listener, _) = super::bind().await;
        let guard = super::serve(listener, router, token);
        FakeElevenLabs { shared, guard }
    }

    /// `ws://127.0.0.1:PORT` (voicectl appends `/v1/text-to-speech/{voice}/stream-input`).
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.guard.addr)
    }

    pub fn opts(&self) -> &ElevenLabsOpts {
        &self.shared.opts
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, ElevenLabsState> {
        self.shared.rec.lock()
    }

    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&ElevenLabsState) -> Option<T>,
    ) -> T {
        self.shared.rec.wait_until(what, timeout, f).await
    }
}

/// `GET /v1/user`: the cheap authenticated request a key check makes.
async fn user(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let ok = headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == sh.opts.api_key);
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            json!({"detail": {"status": "invalid_api_key"}}).to_string(),
        )
            .into_response();
    }
    (
        [("content-type", "application/json")],
        json!({"subscription": {"tier": "fake"}}).to_string(),
    )
        .into_response()
}

async fn upgrade(
    State(sh): State<Arc<Shared>>,
    Path(voice): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let index = sh.rec.with(|s| {
        s.attempts += 1;
        s.attempts - 1
    });
    let fault = FaultPlan::applies(&sh.opts.fault, index);
    let key_ok = headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == sh.opts.api_key);
    if fault == Some(Fault::RejectAuth) || !key_ok {
        sh.rec.with(|s| s.rejected += 1);
        sh.rec.emit(());
        return (
            StatusCode::UNAUTHORIZED,
            json!({"detail": {"status": "invalid_api_key", "message": "Invalid API key"}})
                .to_string(),
        )
            .into_response();
    }
    if fault == Some(Fault::NeverAnswer) {
        sh.token.cancelled().await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    ws.on_upgrade(move |socket| session(sh, socket, voice, query, fault))
        .into_response()
}

async fn session(
    sh: Arc<Shared>,
    mut socket: WebSocket,
    voice: String,
    query: HashMap<String, String>,
    fault: Option<Fault>,
) {
    let mut violations = Vec::new();
    if query.get("output_format").map(String::as_str) != Some("ulaw_8000") {
        violations.push(format!(
            "output_format={:?}, expected ulaw_8000",
            query.get("output_format")
        ));
    }
    if !query.contains_key("model_id") {
        violations.push("missing model_id".into());
    }
    let inactivity_s: u64 = match query.get("inactivity_timeout").map(|v| v.parse::<u64>()) {
        None => 20,
        Some(Ok(v)) if (1..=180).contains(&v) => v,
        Some(_) => {
            violations.push("inactivity_timeout must be 1..=180".into());
            20
        }
    };
    let idx = sh.rec.with(|s| {
        s.sessions.push(ElSession {
            voice,
            query,
            open: true,
            violations,
            ..Default::default()
        });
        s.sessions.len() - 1
    });
    sh.rec.emit(());
    let opts = &sh.opts;
    let idle = Duration::from_millis(inactivity_s * opts.idle_ms_per_s);
    let mut last_text = Instant::now();
    let mut opened = false;
    let mut ended = false;
    let mut buffered = String::new();
    let mut generation = 0u32;
    // Audio chunks with the characters each speaks (its `alignment`).
    let mut queue: VecDeque<(Vec<u8>, String)> = VecDeque::new();
    let mut next_send = Instant::now();
    let mut first_audio = true;
    let mut close_at: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(86400);
    if fault == Some(Fault::Garbage) {
        let _ = socket.send(Message::Text("not json at all".into())).await;
    }
    let close: Option<(u16, &str)> = loop {
        let send_due = if queue.is_empty() { far } else { next_send };
        let idle_due = if queue.is_empty() && !ended {
            last_text + idle
        } else {
            far
        };
        tokio::select! {
            m = socket.recv() => {
                let Some(Ok(m)) = m else { break None };
                let t = match m {
                    Message::Text(t) => t,
                    Message::Close(_) => break None,
                    _ => {
                        sh.rec.with(|s| s.sessions[idx].violations.push("binary message".into()));
                        continue;
                    }
                };
                last_text = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    sh.rec.with(|s| s.sessions[idx].violations.push(format!("not JSON: {t}")));
                    continue;
                };
                let Some(text) = v["text"].as_str() else {
                    sh.rec.with(|s| s.sessions[idx].violations.push(format!("message without text: {v}")));
                    continue;
                };
                if !opened {
                    opened = true;
                    if text != " " {
                        sh.rec.with(|s| s.sessions[idx].violations.push(format!("first message text {text:?}, expected \" \"")));
                    }
                    continue;
                }
                let flush = v["flush"].as_bool() == Some(true);
                if text.is_empty() {
                    ended = true;
                    sh.rec.with(|s| s.sessions[idx].ended = true);
                } else {
                    sh.rec.with(|s| s.sessions[idx].texts.push(text.to_owned()));
                    buffered.push_str(text);
                }
                if flush || ended {
                    if flush {
                        sh.rec.with(|s| s.sessions[idx].flushes += 1);
                    }
                    if !buffered.trim().is_empty() {
                        generation += 1;
                        let chars: Vec<char> = std::mem::take(&mut buffered).chars().collect();
                        let len = (chars.len() as u64 * opts.ms_per_char * 8) as usize;
                        if queue.is_empty() {
                            let mut lat = opts.latency_ms;
                            if first_audio && let Some(Fault::SlowFirst { ms }) = &fault {
                                lat += ms;
                            }
                            next_send = Instant::now() + Duration::from_millis(lat);
                        }
                        let audio = agent_mulaw(generation, len);
                        let n = audio.chunks(800).count().max(1);
                        for (i, c) in audio.chunks(800).enumerate() {
                            let span: String = chars[i * chars.len() / n..(i + 1) * chars.len() / n].iter().collect();
                            queue.push_back((c.to_vec(), span));
                        }
                    }
                }
                if ended && queue.is_empty() {
                    let _ = socket.send(Message::Text(json!({"isFinal": true}).to_string().into())).await;
                    sh.rec.with(|s| s.sessions[idx].final_sent = true);
                    break Some((1000, ""));
                }
                sh.rec.emit(());
            }
            _ = tokio::time::sleep_until(send_due) => {
                let Some((chunk, span)) = queue.pop_front() else { continue };
                if first_audio {
                    first_audio = false;
                    if fault == Some(Fault::BadAudio) {
                        for audio in ["%%% not base64 %%%".to_owned(), B64.encode([0xFFu8; 3])] {
                            let msg = json!({"audio": audio, "isFinal": null});
                            let _ = socket.send(Message::Text(Utf8Bytes::from(msg.to_string()))).await;
                        }
                    }
                    if let Some(Fault::CloseMidStream { after_ms }) = &fault {
                        close_at = Some(Instant::now() + Duration::from_millis(*after_ms));
                    }
                }
                sh.rec.with(|s| s.sessions[idx].audio.extend_from_slice(&chunk));
                let chars: Vec<String> = span.chars().map(String::from).collect();
                let starts: Vec<u64> = (0..chars.len() as u64).map(|i| i * opts.ms_per_char).collect();
                let durs = vec![opts.ms_per_char; chars.len()];
                let alignment = json!({"chars": chars, "charStartTimesMs": starts, "charDurationsMs": durs});
                let msg = json!({"audio": B64.encode(&chunk), "isFinal": null, "normalizedAlignment": alignment, "alignment": alignment});
                if socket.send(Message::Text(Utf8Bytes::from(msg.to_string()))).await.is_err() {
                    break None;
                }
                next_send = Instant::now() + Duration::from_millis(25);
                if ended && queue.is_empty() {
                    let _ = socket.send(Message::Text(json!({"isFinal": true}).to_string().into())).await;
                    sh.rec.with(|s| s.sessions[idx].final_sent = true);
                    break Some((1000, ""));
                }
                sh.rec.emit(());
            }
            _ = tokio::time::sleep_until(idle_due) => {
                break Some((1008, "input_timeout_exceeded"));
            }
            _ = tokio::time::sleep_until(close_at.unwrap_or(far)) => break Some((1011, "fake: closed mid-stream")),
            _ = sh.token.cancelled() => break Some((1001, "shutdown")),
        }
    };
    if let Some((code, why)) = close {
        if code != 1000 {
            sh.rec
                .with(|s| s.sessions[idx].closed_by_server = Some((code, why.to_owned())));
        }
        close_ws(&mut socket, code, why).await;
    }
    sh.rec.with(|s| s.sessions[idx].open = false);
    sh.rec.emit(());
}

//! Faithful fakes of Deepgram's live speech-to-text (`/v1/listen`) and Aura text-to-speech
//! (`/v1/speak`) WebSockets (WAVE2-PROTOCOLS §1).
//!
//! The STT fake "recognises" speech with an energy VAD over the μ-law it receives (on the audio
//! timeline, so it is deterministic) and transcribes the n-th utterance as the n-th scripted
//! text: interim `Results` grow one word per `word_ms` of speech, `endpointing` ms of silence
//! give the final (`is_final` + `speech_final`), `utterance_end_ms` of silence give
//! `UtteranceEnd`. `SpeechStarted` comes with `vad_events=true`. `KeepAlive`, `Finalize` and
//! `CloseStream` are honoured; neither audio nor `KeepAlive` for `idle_ms` closes with 1011
//! NET-0001, as Deepgram does after 10 s.
//!
//! The Aura fake answers `Speak` + `Flush` with μ-law 8 kHz of the fake agent's tone
//! ([`super::agent_mulaw`], utterance numbers counting flushes), then `Flushed`; `Clear`
//! drops what is queued and answers `Cleared`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{EnergyVad, Recorder, ServerGuard, VadEvent, VadOpts, agent_mulaw, close_ws};

/// Faults shared by the pipeline fakes (Deepgram, ElevenLabs, OpenAI HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 401 on the upgrade or request, whatever the key.
    RejectAuth,
    /// Never complete the upgrade / never send response headers.
    NeverAnswer,
    /// Close the socket (1011) / end the body (without `[DONE]`) this long after the first
    /// audio or token.
    CloseMidStream { after_ms: u64 },
    /// Hold the first result (transcript, audio, token) back this long.
    SlowFirst { ms: u64 },
    /// Send a text frame / SSE line that is not JSON first, then behave.
    Garbage,
    /// Audio that is not what was asked for, before the real audio: a chunk that is not
    /// base64 and a chunk of an odd size (3 bytes of μ-law silence).
    BadAudio,
}

/// A fault and how many connections (or requests) it hits, in order; 0 means all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPlan {
    pub fault: Fault,
    pub times: usize,
}

impl FaultPlan {
    pub fn always(fault: Fault) -> Option<FaultPlan> {
        Some(FaultPlan { fault, times: 0 })
    }
    pub fn first(fault: Fault, times: usize) -> Option<FaultPlan> {
        Some(FaultPlan { fault, times })
    }
    pub(crate) fn applies(plan: &Option<FaultPlan>, index: usize) -> Option<Fault> {
        plan.as_ref()
            .filter(|p| p.times == 0 || index < p.times)
            .map(|p| p.fault.clone())
    }
}

#[derive(Debug, Clone)]
pub struct DeepgramOpts {
    /// Expected in `Authorization: Token <api_key>`.
    pub api_key: String,
    /// The n-th utterance (0-based) is transcribed as `utterances[n]`, else "utterance n".
    pub utterances: Vec<String>,
    /// Speech per recognised word (interims grow at this pace).
    pub word_ms: u64,
    /// Send `speech_final` on endpointing; false leaves turns to `UtteranceEnd`.
    pub speech_final: bool,
    /// Audio and KeepAlive silence after which the server closes (Deepgram: 10 s).
    pub idle_ms: u64,
    pub fault: Option<FaultPlan>,
    pub vad: VadOpts,
    /// Aura: wall time to the first audio of a flush, and audio per character of text.
    pub tts_latency_ms: u64,
    pub tts_ms_per_char: u64,
    pub tts_fault: Option<FaultPlan>,
}

impl Default for DeepgramOpts {
    fn default() -> Self {
        DeepgramOpts {
            api_key: "dg-fake-key".into(),
            utterances: Vec::new(),
            word_ms: 250,
            speech_final: true,
            idle_ms: 10_000,
            fault: None,
            vad: VadOpts {
                threshold: 600,
                start_ms: 40,
                stop_ms: 300,
            },
            tts_latency_ms: 40,
            tts_ms_per_char: 20,
            tts_fault: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SttSession {
    pub query: HashMap<String, String>,
    pub open: bool,
    /// Every audio byte received, in order.
    pub audio: Vec<u8>,
    pub keepalives: usize,
    pub finalizes: usize,
    pub close_stream: bool,
    /// Closed by the server: (code, reason).
    pub closed_by_server: Option<(u16, String)>,
    /// Messages sent, by type ("Results" interim counted apart from finals).
    pub sent: Vec<Value>,
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AuraSession {
    pub query: HashMap<String, String>,
    pub open: bool,
    /// Texts of `Speak` messages in order.
    pub spoken: Vec<String>,
    pub flushes: usize,
    pub clears: usize,
    /// Audio bytes sent, in order.
    pub audio: Vec<u8>,
    pub violations: Vec<String>,
}

#[derive(Debug, Default)]
pub struct DeepgramState {
    pub stt: Vec<SttSession>,
    pub aura: Vec<AuraSession>,
    /// Refused connections: (path, status).
    pub rejected: Vec<(String, u16)>,
    pub stt_attempts: usize,
    pub aura_attempts: usize,
}

impl DeepgramState {
    pub fn open_sockets(&self) -> usize {
        self.stt.iter().filter(|s| s.open).count() + self.aura.iter().filter(|s| s.open).count()
    }
}

struct Shared {
    opts: DeepgramOpts,
    rec: Recorder<DeepgramState, ()>,
    token: CancellationToken,
}

pub struct FakeDeepgram {
    shared: Arc<Shared>,
    guard: ServerGuard,
}

impl FakeDeepgram {
    pub async fn start(opts: DeepgramOpts) -> FakeDeepgram {
        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            opts,
            rec: Recorder::new(DeepgramState::default()),
            token: token.clone(),
        });
        let router = Router::new()
            .route("/v1/listen", get(listen))
            .route("/v1/speak", get(speak))
            .route("/v1/projects", get(projects))
            .with_state(shared.clone());
        let (listener, _) = super::bind().await;
        let guard = super::serve(listener, router, token);
        FakeDeepgram { shared, guard }
    }

    /// `ws://127.0.0.1:PORT/v1/listen`
    pub fn stt_url(&self) -> String {
        format!("ws://{}/v1/listen", self.guard.addr)
    }

    /// `ws://127.0.0.1:PORT/v1/speak`
    pub fn tts_url(&self) -> String {
        format!("ws://{}/v1/speak", self.guard.addr)
    }

    pub fn opts(&self) -> &DeepgramOpts {
        &self.shared.opts
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, DeepgramState> {
        self.shared.rec.lock()
    }

    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&DeepgramState) -> Option<T>,
    ) -> T {
        self.shared.rec.wait_until(what, timeout, f).await
    }
}

fn check_auth(sh: &Shared, headers: &HeaderMap, path: &str) -> Result<(), Box<Response>> {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Token {}", sh.opts.api_key));
    if ok {
        return Ok(());
    }
    sh.rec.with(|s| s.rejected.push((path.into(), 401)));
    sh.rec.emit(());
    Err(Box::new(
        (
            StatusCode::UNAUTHORIZED,
            [("dg-error", "Invalid credentials.")],
            json!({"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials."}).to_string(),
        )
            .into_response(),
    ))
}

/// `GET /v1/projects`: the cheap authenticated request a key check makes.
async fn projects(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_auth(&sh, &headers, "/v1/projects") {
        return *r;
    }
    (
        [("content-type", "application/json")],
        json!({"projects": [{"project_id": "fake", "name": "fake"}]}).to_string(),
    )
        .into_response()
}

async fn listen(
    State(sh): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let index = sh.rec.with(|s| {
        s.stt_attempts += 1;
        s.stt_attempts - 1
    });
    let fault = FaultPlan::applies(&sh.opts.fault, index);
    if fault == Some(Fault::RejectAuth) {
        sh.rec.with(|s| s.rejected.push(("/v1/listen".into(), 401)));
        sh.rec.emit(());
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Err(r) = check_auth(&sh, &headers, "/v1/listen") {
        return *r;
    }
    if fault == Some(Fault::NeverAnswer) {
        sh.token.cancelled().await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    ws.on_upgrade(move |socket| stt_session(sh, socket, query, fault))
        .into_response()
}

fn stt_violations(q: &HashMap<String, String>) -> Vec<String> {
    let mut v = Vec::new();
    for (k, want) in [
        ("encoding", Some("mulaw")),
        ("sample_rate", Some("8000")),
        ("channels", Some("1")),
        ("interim_results", Some("true")),
        ("vad_events", Some("true")),
        ("model", None),
        ("endpointing", None),
        ("utterance_end_ms", None),
    ] {
        match (q.get(k), want) {
            (None, _) => v.push(format!("missing query parameter {k}")),
            (Some(got), Some(w)) if got != w => v.push(format!("{k}={got}, expected {w}")),
            _ => {}
        }
    }
    if let Some(u) = q.get("utterance_end_ms")
        && u.parse::<u64>().is_err()
    {
        v.push(format!("utterance_end_ms={u} is not a number"));
    }
    v
}

struct Utterance {
    words: Vec<String>,
    start_ms: u64,
    shown: usize,
}

async fn stt_session(
    sh: Arc<Shared>,
    mut socket: WebSocket,
    query: HashMap<String, String>,
    fault: Option<Fault>,
) {
    let violations = stt_violations(&query);
    let endpointing: u64 = query
        .get("endpointing")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let utterance_end_ms: Option<u64> = query.get("utterance_end_ms").and_then(|v| v.parse().ok());
    let vad_events = query.get("vad_events").map(String::as_str) == Some("true");
    let idx = sh.rec.with(|s| {
        s.stt.push(SttSession {
            query,
            open: true,
            violations,
            ..Default::default()
        });
        s.stt.len() - 1
    });
    sh.rec.emit(());
    let opts = &sh.opts;
    let mut vad = EnergyVad::new(VadOpts {
        stop_ms: endpointing.max(20),
        ..opts.vad
    });
    let mut events = Vec::new();
    let mut pos_ms = 0u64;
    let mut utterances = 0usize;
    let mut current: Option<Utterance> = None;
    // (silence start on the audio timeline, UtteranceEnd due) after a final.
    let mut pending_end: Option<u64> = None;
    let mut last_word_end = 0.0f64;
    let mut last_input = Instant::now();
    let opened = Instant::now();
    let mut first_result_sent = false;
    let mut close_at: Option<Instant> = None;
    let request_id = format!("fake-{idx}");
    if fault == Some(Fault::Garbage) {
        let _ = socket.send(Message::Text("{not json".into())).await;
    }
    let reason: Option<(u16, &str)> = loop {
        let idle_deadline = last_input + Duration::from_millis(opts.idle_ms);
        let close_deadline = close_at.unwrap_or(opened + Duration::from_secs(86400));
        let msg = tokio::select! {
            m = socket.recv() => m,
            _ = tokio::time::sleep_until(idle_deadline) => {
                break Some((1011, "Deepgram did not receive audio data or a text message within the timeout window. See https://dpgr.am/net0001"));
            }
            _ = tokio::time::sleep_until(close_deadline) => break Some((1011, "fake: closed mid-stream")),
            _ = sh.token.cancelled() => break Some((1001, "shutdown")),
        };
        let Some(Ok(msg)) = msg else { break None };
        let mut out: Vec<Value> = Vec::new();
        match msg {
            Message::Binary(b) => {
                last_input = Instant::now();
                if close_at.is_none()
                    && let Some(Fault::CloseMidStream { after_ms }) = &fault
                {
                    close_at = Some(Instant::now() + Duration::from_millis(*after_ms));
                }
                sh.rec.with(|s| s.stt[idx].audio.extend_from_slice(&b));
                events.clear();
                // Per 20 ms window so interims follow the speech as it grows.
                for chunk in b.chunks(160) {
                    vad.push_mulaw(chunk, &mut events);
                    pos_ms += chunk.len() as u64 / 8;
                    for ev in events.drain(..) {
                        match ev {
                            VadEvent::Started { start_ms } => {
                                pending_end = None;
                                let text = opts
                                    .utterances
                                    .get(utterances)
                                    .cloned()
                                    .unwrap_or_else(|| format!("utterance {utterances}"));
                                utterances += 1;
                                current = Some(Utterance {
                                    words: text.split_whitespace().map(str::to_owned).collect(),
                                    start_ms,
                                    shown: 0,
                                });
                                if vad_events {
                                    out.push(json!({"type": "SpeechStarted", "channel": [0], "timestamp": start_ms as f64 / 1000.0}));
                                }
                            }
                            VadEvent::Stopped { end_ms, .. } => {
                                if let Some(u) = current.take() {
                                    last_word_end = end_ms as f64 / 1000.0;
                                    out.push(results(
                                        &u,
                                        u.words.len(),
                                        true,
                                        opts.speech_final,
                                        false,
                                        end_ms,
                                        &request_id,
                                    ));
                                    pending_end = utterance_end_ms.map(|_| end_ms);
                                }
                            }
                        }
                    }
                    if let Some(u) = current.as_mut() {
                        let spoken = pos_ms.saturating_sub(u.start_ms);
                        let words =
                            ((spoken / opts.word_ms.max(1)) as usize + 1).min(u.words.len());
                        if words > u.shown {
                            u.shown = words;
                            out.push(results(u, words, false, false, false, pos_ms, &request_id));
                        }
                    }
                    if let (Some(end), Some(gap)) = (pending_end, utterance_end_ms)
                        && pos_ms >= end + gap
                    {
                        pending_end = None;
                        out.push(json!({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_word_end}));
                    }
                }
            }
            Message::Text(t) => {
                last_input = Instant::now();
                let v: Value = match serde_json::from_str(t.as_str()) {
                    Ok(v) => v,
                    Err(_) => {
                        sh.rec
                            .with(|s| s.stt[idx].violations.push(format!("not JSON: {t}")));
                        continue;
                    }
                };
                match v["type"].as_str() {
                    Some("KeepAlive") => sh.rec.with(|s| s.stt[idx].keepalives += 1),
                    Some("Finalize") => {
                        sh.rec.with(|s| s.stt[idx].finalizes += 1);
                        if let Some(u) = current.take() {
                            out.push(results(
                                &u,
                                u.words.len(),
                                true,
                                false,
                                true,
                                pos_ms,
                                &request_id,
                            ));
                        }
                    }
                    Some("CloseStream") => {
                        sh.rec.with(|s| s.stt[idx].close_stream = true);
                        if let Some(u) = current.take() {
                            out.push(results(
                                &u,
                                u.words.len(),
                                true,
                                false,
                                true,
                                pos_ms,
                                &request_id,
                            ));
                        }
                        out.push(json!({"type": "Metadata", "request_id": request_id, "duration": pos_ms as f64 / 1000.0, "channels": 1}));
                        let _ = send_all(
                            &sh,
                            idx,
                            &mut socket,
                            &mut out,
                            &mut first_result_sent,
                            &fault,
                        )
                        .await;
                        break Some((1000, ""));
                    }
                    other => sh.rec.with(|s| {
                        s.stt[idx]
                            .violations
                            .push(format!("unknown control message {other:?}"))
                    }),
                }
            }
            Message::Close(_) => break None,
            _ => {}
        }
        if send_all(
            &sh,
            idx,
            &mut socket,
            &mut out,
            &mut first_result_sent,
            &fault,
        )
        .await
        .is_err()
        {
            break None;
        }
        sh.rec.emit(());
    };
    if let Some((code, why)) = reason {
        sh.rec
            .with(|s| s.stt[idx].closed_by_server = Some((code, why.to_owned())));
        close_ws(&mut socket, code, why).await;
    }
    sh.rec.with(|s| s.stt[idx].open = false);
    sh.rec.emit(());
}

async fn send_all(
    sh: &Shared,
    idx: usize,
    socket: &mut WebSocket,
    out: &mut Vec<Value>,
    first_sent: &mut bool,
    fault: &Option<Fault>,
) -> Result<(), ()> {
    for v in out.drain(..) {
        if !*first_sent && v["type"] == "Results" {
            *first_sent = true;
            if let Some(Fault::SlowFirst { ms }) = fault {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
            }
        }
        let text = v.to_string();
        sh.rec.with(|s| s.stt[idx].sent.push(v));
        socket
            .send(Message::Text(Utf8Bytes::from(text)))
            .await
            .map_err(|_| ())?;
    }
    Ok(())
}

fn results(
    u: &Utterance,
    words: usize,
    is_final: bool,
    speech_final: bool,
    from_finalize: bool,
    now_ms: u64,
    request_id: &str,
) -> Value {
    let start = u.start_ms as f64 / 1000.0;
    let dur = now_ms.saturating_sub(u.start_ms) as f64 / 1000.0;
    // Word timings spread evenly over the speech heard so far: the last word ends where the
    // speech (as the VAD saw it) ends.
    let each = dur / words.max(1) as f64;
    let ws: Vec<Value> = u.words[..words]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({"word": w.to_lowercase(), "punctuated_word": w, "start": start + i as f64 * each,
                   "end": start + (i + 1) as f64 * each, "confidence": 0.97})
        })
        .collect();
    json!({
        "type": "Results",
        "channel_index": [0, 1],
        "duration": dur,
        "start": start,
        "is_final": is_final,
        "speech_final": speech_final,
        "from_finalize": from_finalize,
        "channel": {"alternatives": [{"transcript": u.words[..words].join(" "), "confidence": 0.97, "words": ws}]},
        "metadata": {"request_id": request_id, "model_info": {"name": "nova-3"}},
    })
}

async fn speak(
    State(sh): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let index = sh.rec.with(|s| {
        s.aura_attempts += 1;
        s.aura_attempts - 1
    });
    let fault = FaultPlan::applies(&sh.opts.tts_fault, index);
    if fault == Some(Fault::RejectAuth) {
        sh.rec.with(|s| s.rejected.push(("/v1/speak".into(), 401)));
        sh.rec.emit(());
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Err(r) = check_auth(&sh, &headers, "/v1/speak") {
        return *r;
    }
    if fault == Some(Fault::NeverAnswer) {
        sh.token.cancelled().await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    ws.on_upgrade(move |socket| aura_session(sh, socket, query, fault))
        .into_response()
}

async fn aura_session(
    sh: Arc<Shared>,
    mut socket: WebSocket,
    query: HashMap<String, String>,
    fault: Option<Fault>,
) {
    let mut violations = Vec::new();
    for (k, want) in [("encoding", "mulaw"), ("sample_rate", "8000")] {
        if query.get(k).map(String::as_str) != Some(want) {
            violations.push(format!("{k}={:?}, expected {want}", query.get(k)));
        }
    }
    if !query.contains_key("model") {
        violations.push("missing model".into());
    }
    let idx = sh.rec.with(|s| {
        s.aura.push(AuraSession {
            query,
            open: true,
            violations,
            ..Default::default()
        });
        s.aura.len() - 1
    });
    sh.rec.emit(());
    let opts = &sh.opts;
    let mut pending_text = String::new();
    // Audio waiting to go out: (bytes, then a Flushed after it?).
    let mut queue: std::collections::VecDeque<(Vec<u8>, bool)> = Default::default();
    let mut flushes = 0u32;
    let mut next_send = Instant::now();
    let mut first_audio = true;
    let mut close_at: Option<Instant> = None;
    if fault == Some(Fault::Garbage) {
        let _ = socket.send(Message::Text("<html>oops".into())).await;
    }
    let far = Instant::now() + Duration::from_secs(86400);
    loop {
        let send_due = if queue.is_empty() { far } else { next_send };
        tokio::select! {
            m = socket.recv() => {
                let Some(Ok(m)) = m else { break };
                let Message::Text(t) = m else {
                    if matches!(m, Message::Close(_)) { break }
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    sh.rec.with(|s| s.aura[idx].violations.push(format!("not JSON: {t}")));
                    continue;
                };
                match v["type"].as_str() {
                    Some("Speak") => {
                        let text = v["text"].as_str().unwrap_or_default().to_owned();
                        sh.rec.with(|s| s.aura[idx].spoken.push(text.clone()));
                        pending_text.push_str(&text);
                    }
                    Some("Flush") => {
                        flushes += 1;
                        sh.rec.with(|s| s.aura[idx].flushes += 1);
                        let len = (pending_text.chars().count() as u64 * opts.tts_ms_per_char * 8) as usize;
                        pending_text.clear();
                        let audio = agent_mulaw(flushes, len);
                        if queue.is_empty() {
                            let mut lat = opts.tts_latency_ms;
                            if first_audio && let Some(Fault::SlowFirst { ms }) = &fault {
                                lat += ms;
                            }
                            next_send = Instant::now() + Duration::from_millis(lat);
                        }
                        let n = audio.chunks(800).count();
                        for (i, c) in audio.chunks(800).enumerate() {
                            queue.push_back((c.to_vec(), i + 1 == n));
                        }
                        if n == 0 {
                            queue.push_back((Vec::new(), true));
                        }
                    }
                    Some("Clear") => {
                        queue.clear();
                        pending_text.clear();
                        sh.rec.with(|s| s.aura[idx].clears += 1);
                        let _ = socket.send(Message::Text(json!({"type": "Cleared", "sequence_id": flushes}).to_string().into())).await;
                    }
                    Some("Close") => break,
                    other => sh.rec.with(|s| s.aura[idx].violations.push(format!("unknown message type {other:?}"))),
                }
                sh.rec.emit(());
            }
            _ = tokio::time::sleep_until(send_due) => {
                let Some((chunk, last)) = queue.pop_front() else { continue };
                if first_audio {
                    first_audio = false;
                    if let Some(Fault::CloseMidStream { after_ms }) = &fault {
                        close_at = Some(Instant::now() + Duration::from_millis(*after_ms));
                    }
                }
                if !chunk.is_empty() {
                    sh.rec.with(|s| s.aura[idx].audio.extend_from_slice(&chunk));
                    if socket.send(Message::Binary(chunk.into())).await.is_err() { break }
                }
                if last {
                    let _ = socket.send(Message::Text(json!({"type": "Flushed", "sequence_id": flushes}).to_string().into())).await;
                }
                // 100 ms of audio every 25 ms: 4× real time, like the real service.
                next_send = Instant::now() + Duration::from_millis(25);
                sh.rec.emit(());
            }
            _ = tokio::time::sleep_until(close_at.unwrap_or(far)) => {
                close_ws(&mut socket, 1011, "fake: closed mid-stream").await;
                break;
            }
            _ = sh.token.cancelled() => break,
        }
    }
    sh.rec.with(|s| s.aura[idx].open = false);
    sh.rec.emit(());
}

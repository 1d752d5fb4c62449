//! Faithful fakes of OpenAI's HTTP APIs a pipeline uses (WAVE2-PROTOCOLS §1): streaming chat
//! completions (`POST {base}/chat/completions` with `stream: true`: SSE `chat.completion.chunk`
//! lines, a usage chunk, `data: [DONE]`), which any OpenAI-compatible server speaks, and speech
//! (`POST {base}/audio/speech`, `response_format: "pcm"`: 24 kHz s16le mono, chunked).
//!
//! Replies are scripted per request (`replies[n]`, else "Reply number n+1."), streamed word by
//! word; a scripted tool call streams its arguments split across chunks, by `index`. Speech is
//! a sine tone at `speech_tone_hz`, `speech_ms_per_char` long, so tests can check pitch after
//! voicectl's resampling. Every request body is recorded, and whether the client hung up
//! before the stream ended (`cancelled`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::deepgram::{Fault, FaultPlan};
use super::{Recorder, ServerGuard};

#[derive(Debug, Clone)]
pub struct OpenAiHttpOpts {
    /// Expected in `Authorization: Bearer <api_key>`.
    pub api_key: String,
    pub replies: Vec<String>,
    /// Before the first token, and between tokens.
    pub first_token_ms: u64,
    pub token_interval_ms: u64,
    /// A tool call streamed before the text of every reply: (name, arguments JSON).
    pub tool_call: Option<(String, String)>,
    /// Only request number `n` (0-based) gets `tool_call` (None: every reply does).
    pub tool_call_on: Option<usize>,
    pub chat_fault: Option<FaultPlan>,
    pub speech_tone_hz: f64,
    pub speech_ms_per_char: u64,
    pub speech_latency_ms: u64,
    pub speech_fault: Option<FaultPlan>,
}

impl Default for OpenAiHttpOpts {
    fn default() -> Self {
        OpenAiHttpOpts {
            api_key: "sk-fake-http".into(),
            replies: Vec::new(),
            first_token_ms: 60,
            token_interval_ms: 10,
            tool_call: None,
            tool_call_on: None,
            chat_fault: None,
            speech_tone_hz: 1000.0,
            speech_ms_per_char: 20,
            speech_latency_ms: 40,
            speech_fault: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub body: Value,
    /// Content chunks sent.
    pub tokens_sent: usize,
    pub done_sent: bool,
    /// The client went away before the end of the stream.
    pub cancelled: bool,
}

impl ChatRequest {
    /// `(role, content)` of each message.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or_default().to_owned(),
                            m["content"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default)]
pub struct SpeechRequest {
    pub body: Value,
    pub pcm_bytes_sent: usize,
    pub cancelled: bool,
}

#[derive(Debug, Default)]
pub struct OpenAiHttpState {
    pub chats: Vec<ChatRequest>,
    pub speeches: Vec<SpeechRequest>,
    /// Requests refused with 401.
    pub rejected: usize,
    pub violations: Vec<String>,
    /// Streams still being written.
    pub streaming: usize,
}

struct Shared {
    opts: OpenAiHttpOpts,
    rec: Recorder<OpenAiHttpState, ()>,
    token: CancellationToken,
}

pub struct FakeOpenAiHttp {
    shared: Arc<Shared>,
    guard: ServerGuard,
}

impl FakeOpenAiHttp {
    pub async fn start(opts: OpenAiHttpOpts) -> FakeOpenAiHttp {
        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            opts,
            rec: Recorder::new(OpenAiHttpState::default()),
            token: token.clone(),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/models", axum::routing::get(models))
            .with_state(shared.clone());
        let (listener, _) = super::bind().await;
        let guard = super::serve(listener, router, token);
        FakeOpenAiHttp { shared, guard }
    }

    /// `http://127.0.0.1:PORT/v1`, the `base_url` of an OpenAI-compatible server.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.guard.addr)
    }

    pub fn opts(&self) -> &OpenAiHttpOpts {
        &self.shared.opts
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, OpenAiHttpState> {
        self.shared.rec.lock()
    }

    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&OpenAiHttpState) -> Option<T>,
    ) -> T {
        self.shared.rec.wait_until(what, timeout, f).await
    }
}

fn authorized(sh: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", sh.opts.api_key))
}

fn unauthorized(sh: &Shared) -> Response {
    sh.rec.with(|s| s.rejected += 1);
    sh.rec.emit(());
    (
        StatusCode::UNAUTHORIZED,
        [("content-type", "application/json")],
        json!({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}).to_string(),
    )
        .into_response()
}

async fn models(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&sh, &headers) {
        return unauthorized(&sh);
    }
    (
        [("content-type", "application/json")],
        json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}).to_string(),
    )
        .into_response()
}

/// A streamed body fed through a channel; the sender fails once the client is gone.
fn channel_body() -> (mpsc::Sender<Vec<u8>>, Body) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (tx, Body::from_stream(stream))
}

async fn chat(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
    };
    let idx = sh.rec.with(|s| {
        s.chats.push(ChatRequest {
            body: req.clone(),
            ..Default::default()
        });
        s.chats.len() - 1
    });
    sh.rec.emit(());
    let fault = FaultPlan::applies(&sh.opts.chat_fault, idx);
    if fault == Some(Fault::RejectAuth) || !authorized(&sh, &headers) {
        return unauthorized(&sh);
    }
    let mut v = Vec::new();
    if req["stream"] != json!(true) {
        v.push("stream is not true".to_owned());
    }
    if !req["model"].is_string() {
        v.push("model missing".to_owned());
    }
    if req["messages"].as_array().is_none_or(|m| m.is_empty()) {
        v.push("messages missing or empty".to_owned());
    }
    // Each assistant message with `tool_calls` must be followed at once by one `tool`
    // message per call (the API answers 400 otherwise).
    if let Some(msgs) = req["messages"].as_array() {
        for (i, m) in msgs.iter().enumerate() {
            let Some(calls) = m["tool_calls"].as_array() else {
                continue;
            };
            for (j, c) in calls.iter().enumerate() {
                let next = msgs.get(i + 1 + j);
                if next.is_none_or(|n| n["role"] != "tool" || n["tool_call_id"] != c["id"]) {
                    v.push(format!(
                        "tool call {} is not answered right after it",
                        c["id"]
                    ));
                }
            }
        }
    }
    if !v.is_empty() {
        sh.rec.with(|s| s.violations.extend(v));
    }
    if fault == Some(Fault::NeverAnswer) {
        sh.token.cancelled().await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let text = sh
        .opts
        .replies
        .get(idx)
        .cloned()
        .unwrap_or_else(|| format!("Reply number {}.", idx + 1));
    let model = req["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let (tx, body) = channel_body();
    let sh2 = sh.clone();
    sh.rec.with(|s| s.streaming += 1);
    tokio::spawn(async move {
        let sh = sh2;
        let o = &sh.opts;
        let chunk = |delta: Value, finish: Value| {
            let v = json!({"id": format!("chatcmpl-fake{idx}"), "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
            format!("data: {v}\n\n").into_bytes()
        };
        let mut lat = o.first_token_ms;
        if let Some(Fault::SlowFirst { ms }) = &fault {
            lat += ms;
        }
        tokio::time::sleep(Duration::from_millis(lat)).await;
        let started = tokio::time::Instant::now();
        let mut ok = true;
        let mut frames: Vec<Vec<u8>> = Vec::new();
        if fault == Some(Fault::Garbage) {
            frames.push(b"data: {\"choices\": [oops\n\n".to_vec());
        }
        frames.push(chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        ));
        if let Some((name, args)) = o
            .tool_call
            .as_ref()
            .filter(|_| o.tool_call_on.is_none_or(|n| n == idx))
        {
            frames.push(chunk(json!({"tool_calls": [{"index": 0, "id": "call_fake1", "type": "function", "function": {"name": name, "arguments": ""}}]}), Value::Null));
            let mid = args.len() / 2;
            let mid = (0..=mid)
                .rev()
                .find(|&i| args.is_char_boundary(i))
                .unwrap_or(0);
            for part in [&args[..mid], &args[mid..]] {
                frames.push(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                    Value::Null,
                ));
            }
        }
        let words = super::word_deltas(&text);
        let n_words = words.len();
        for w in words {
            frames.push(chunk(json!({"content": w}), Value::Null));
        }
        let finish =
            if o.tool_call.is_some() && o.tool_call_on.is_none_or(|n| n == idx) && n_words == 0 {
                "tool_calls"
            } else {
                "stop"
            };
        frames.push(chunk(json!({}), json!(finish)));
        frames.push(format!("data: {}\n\n", json!({"id": format!("chatcmpl-fake{idx}"), "object": "chat.completion.chunk", "model": model, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n_words, "total_tokens": 10 + n_words}})).into_bytes());
        frames.push(b"data: [DONE]\n\n".to_vec());
        for f in frames {
            if let Some(Fault::CloseMidStream { after_ms }) = &fault
                && started.elapsed() >= Duration::from_millis(*after_ms)
            {
                // The connection ends without [DONE].
                break;
            }
            let is_token =
                f.windows(10).any(|w| w == b"\"content\":") && !f.ends_with(b"[DONE]\n\n");
            let done = f == b"data: [DONE]\n\n";
            if tx.send(f).await.is_err() {
                ok = false;
                break;
            }
            sh.rec.with(|s| {
                if is_token {
                    s.chats[idx].tokens_sent += 1;
                }
                if done {
                    s.chats[idx].done_sent = true;
                }
            });
            sh.rec.emit(());
            tokio::time::sleep(Duration::from_millis(o.token_interval_ms)).await;
        }
        if ok {
            // Let the body end, then see whether the client is still there (it is if the
            // channel closes normally).
            drop(tx);
        } else {
            sh.rec.with(|s| s.chats[idx].cancelled = true);
        }
        sh.rec.with(|s| s.streaming -= 1);
        sh.rec.emit(());
    });
    (
        [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn speech(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
    };
    let idx = sh.rec.with(|s| {
        s.speeches.push(SpeechRequest {
            body: req.clone(),
            ..Default::default()
        });
        s.speeches.len() - 1
    });
    sh.rec.emit(());
    let fault = FaultPlan::applies(&sh.opts.speech_fault, idx);
    if fault == Some(Fault::RejectAuth) || !authorized(&sh, &headers) {
        return unauthorized(&sh);
    }
    let input = req["input"].as_str().unwrap_or_default().to_owned();
    let mut v = Vec::new();
    if req["response_format"] != json!("pcm") {
        v.push(format!(
            "response_format {}, expected \"pcm\"",
            req["response_format"]
        ));
    }
    if input.is_empty() || input.chars().count() > 4096 {
        v.push("input empty or over 4096 characters".to_owned());
    }
    if !req["model"].is_string() || !req["voice"].is_string() {
        v.push("model or voice missing".to_owned());
    }
    if !v.is_empty() {
        sh.rec.with(|s| s.violations.extend(v));
    }
    if fault == Some(Fault::NeverAnswer) {
        sh.token.cancelled().await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let samples = (input.chars().count() as u64 * sh.opts.speech_ms_per_char * 24) as usize;
    let hz = sh.opts.speech_tone_hz;
    let pcm: Vec<u8> = (0..samples)
        .flat_map(|i| {
            let s = (6000.0 * (2.0 * std::f64::consts::PI * hz * i as f64 / 24000.0).sin()).round()
                as i16;
            s.to_le_bytes()
        })
        .collect();
    let (tx, body) = channel_body();
    let sh2 = sh.clone();
    tokio::spawn(async move {
        let sh = sh2;
        let mut lat = sh.opts.speech_latency_ms;
        if let Some(Fault::SlowFirst { ms }) = &fault {
            lat += ms;
        }
        tokio::time::sleep(Duration::from_millis(lat)).await;
        let started = tokio::time::Instant::now();
        // 100 ms of 24 kHz s16 per chunk (an odd size on purpose: chunk edges need not fall
        // on sample boundaries), 4× real time.
        for c in pcm.chunks(4801) {
            if let Some(Fault::CloseMidStream { after_ms }) = &fault
                && started.elapsed() >= Duration::from_millis(*after_ms)
            {
                break;
            }
            if tx.send(c.to_vec()).await.is_err() {
                sh.rec.with(|s| s.speeches[idx].cancelled = true);
                break;
            }
            sh.rec.with(|s| s.speeches[idx].pcm_bytes_sent += c.len());
            sh.rec.emit(());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        sh.rec.emit(());
    });
    ([("content-type", "audio/pcm")], body).into_response()
}

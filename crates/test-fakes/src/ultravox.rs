//! A faithful fake of Ultravox (PROTOCOLS §4, §6): the REST API (`/api/calls…`) and the
//! `joinUrl` WebSocket, which speaks the Twilio Media Streams protocol as the app side for
//! `medium.twilio`, or s16le PCM plus JSON data messages for `medium.serverWebSocket`.
//!
//! The fake agent greets (if it speaks first), detects caller turns with an energy VAD,
//! answers each with a deterministic tone (`agent_mulaw(n, …)` / `agent_pcm_bytes(n, …)`),
//! handles barge-in (`clear` / `playback_clear_buffer`) and hangs up when scripted.
//!
//! ```ignore
//! let uv = FakeUltravox::start(UltravoxOpts::default()).await;
//! // configure voicectl with uv.base_url() and uv.opts().api_key …
//! let call = uv.wait_until("call ended", T, |s| s.calls.first().filter(|c| c.ended.is_some()).cloned()).await;
//! assert_eq!(call.end_reason.as_deref(), Some("hangup"));
//! assert!(call.violations.is_empty());
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::twilio_media::{self as media, Event};
use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    EnergyVad, Recorder, ServerGuard, VadEvent, VadOpts, agent_mulaw, agent_pcm_bytes,
    parse_proto_duration, proto_duration, word_deltas,
};

/// A scripted answer to the next `POST /api/calls` (consumed in order).
#[derive(Debug, Clone)]
pub struct CreateFailure {
    pub status: u16,
    /// Sent as `Retry-After: N` (seconds).
    pub retry_after_s: Option<u64>,
    pub detail: String,
}

impl CreateFailure {
    pub fn status(status: u16) -> Self {
        CreateFailure {
            status,
            retry_after_s: None,
            detail: format!("scripted failure {status}"),
        }
    }

    pub fn retry_after(status: u16, secs: u64) -> Self {
        CreateFailure {
            retry_after_s: Some(secs),
            ..Self::status(status)
        }
    }
}

/// The shape of the `joinUrl` in created calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinUrl {
    /// `ws://127.0.0.1:PORT/calls/<id>/join` (or `/server_web_socket`): usable.
    Ws,
    /// The same URL with another scheme, e.g. `"https"`, to test voicectl's validation.
    Scheme(String),
    /// `joinUrl: null` (as for SIP calls).
    Null,
}

#[derive(Debug, Clone)]
pub struct UltravoxOpts {
    /// Expected in `X-API-Key`.
    pub api_key: String,
    /// Audio length of each reply to a caller turn.
    pub reply_ms: u64,
    /// Audio length of the greeting (when the agent speaks first) and of other forced speech.
    pub greeting_ms: u64,
    /// Greeting text when `firstSpeakerSettings.agent.text` is not given.
    pub greeting_text: String,
    pub vad: VadOpts,
    pub chunk_ms: u64,
    pub chunk_interval_ms: u64,
    /// Wall time between the end of a caller turn and the reply.
    pub response_latency_ms: u64,
    /// Hang up (`agent_hangup`) once the reply to this many caller turns has played.
    pub hangup_after_turns: Option<usize>,
    /// More calls not yet ended than this → 429 with `Retry-After: retry_after_s`.
    pub max_concurrent: Option<usize>,
    pub retry_after_s: u64,
    pub create_failures: Vec<CreateFailure>,
    pub join_url: JoinUrl,
    /// Default and maximum `pageSize` of `/messages`: small, so clients must follow `next`.
    pub page_size: usize,
    /// Server WebSocket medium: answer the first caller turn with a `client_tool_invocation`
    /// of this tool (name, parameters), then reply once its `client_tool_result` came.
    pub client_tool: Option<(String, Value)>,
}

impl Default for UltravoxOpts {
    fn default() -> Self {
        UltravoxOpts {
            api_key: "Fk3Ab9Zq.fakeultravoxkey0123456789abcdefgh".into(),
            reply_ms: 1000,
            greeting_ms: 800,
            greeting_text: "Hello from the fake Ultravox".into(),
            vad: VadOpts::default(),
            chunk_ms: 100,
            chunk_interval_ms: 25,
            response_latency_ms: 30,
            hangup_after_turns: None,
            max_concurrent: None,
            retry_after_s: 2,
            create_failures: Vec::new(),
            join_url: JoinUrl::Ws,
            page_size: 2,
            client_tool: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct UltravoxState {
    /// Every `POST /api/calls`, in order.
    pub creates: Vec<CreateRequest>,
    pub calls: Vec<UvCall>,
    /// Every `POST /api/calls/{id}/send_data_message`: (call id, body, status returned).
    pub data_messages: Vec<(String, Value, u16)>,
    /// Join attempts refused: (path, HTTP status).
    pub rejected_joins: Vec<(String, u16)>,
    pub sockets_open: usize,
    pub sockets_opened: usize,
}

impl UltravoxState {
    pub fn call(&self, id: &str) -> Option<&UvCall> {
        self.calls.iter().find(|c| c.call_id == id)
    }

    fn call_mut(&mut self, id: &str) -> Option<&mut UvCall> {
        self.calls.iter_mut().find(|c| c.call_id == id)
    }
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub query: String,
    pub body: String,
    pub status: u16,
    /// Why it was refused (400/401/429…), if it was.
    pub error: Option<String>,
    /// Accepted but questionable for voicectl (missing systemPrompt, wrong sample rate …).
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Medium {
    Twilio,
    ServerWebSocket {
        input_sample_rate: u64,
        output_sample_rate: u64,
    },
    /// Accepted by the API but useless to voicectl (webRtc, sip …).
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Agent,
}

#[derive(Debug, Clone)]
pub struct UvMessage {
    pub role: Role,
    pub text: String,
    /// `MESSAGE_MEDIUM_VOICE` or `MESSAGE_MEDIUM_TEXT`.
    pub medium: &'static str,
    /// On the input audio timeline (ms of caller audio received).
    pub start_ms: u64,
    pub end_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Utterance {
    /// 1-based number within the call: the audio is `agent_mulaw(n, …)` / `agent_pcm_bytes(n, …)`.
    pub n: u32,
    pub text: String,
    /// Every byte sent (μ-law for Twilio, s16le for serverWebSocket).
    pub audio: Vec<u8>,
    pub planned_bytes: usize,
    pub interrupted: bool,
    /// Twilio: the mark sent after it.
    pub mark: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TwilioStart {
    pub stream_sid: String,
    pub call_sid: String,
    pub account_sid: String,
    pub custom_parameters: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketClose {
    ByClient(Option<u16>),
    Dropped,
    ByServer(u16, String),
}

#[derive(Debug, Clone)]
pub struct UvCall {
    pub call_id: String,
    pub request: Value,
    pub medium: Medium,
    pub join_url: Option<String>,
    pub created: String,
    pub joined: Option<String>,
    pub ended: Option<String>,
    pub end_reason: Option<String>,
    pub join_timeout: String,
    pub max_duration: String,
    pub agent_first: bool,
    pub messages: Vec<UvMessage>,
    /// Caller audio as received: μ-law (Twilio) or s16le PCM bytes (serverWebSocket).
    pub caller_audio: Vec<u8>,
    pub utterances: Vec<Utterance>,
    pub stream: Option<TwilioStart>,
    /// Twilio events received, in order, except `media`.
    pub twilio_events: Vec<String>,
    pub media_frames: usize,
    pub marks_sent: Vec<String>,
    pub marks_echoed: Vec<String>,
    pub clears_sent: usize,
    /// serverWebSocket: JSON data messages received.
    pub data_in: Vec<Value>,
    /// serverWebSocket: types of data messages sent, in order (transcript deltas included).
    pub data_out: Vec<String>,
    pub barge_ins: usize,
    /// Protocol deviations by the client on the join socket.
    pub violations: Vec<String>,
    pub socket_open: bool,
    pub close: Option<SocketClose>,
}

impl UvCall {
    /// Every agent audio byte sent, in order.
    pub fn agent_audio(&self) -> Vec<u8> {
        self.utterances
            .iter()
            .flat_map(|u| u.audio.clone())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UltravoxEvent {
    CreateRejected {
        status: u16,
    },
    CallCreated {
        call: String,
    },
    Joined {
        call: String,
    },
    CallerAudio {
        call: String,
        bytes: usize,
    },
    SpeechStarted {
        call: String,
    },
    UserTurn {
        call: String,
        text: String,
    },
    AgentStarted {
        call: String,
        n: u32,
    },
    AgentAudio {
        call: String,
        bytes: usize,
    },
    AgentDone {
        call: String,
        n: u32,
        interrupted: bool,
    },
    BargeIn {
        call: String,
    },
    MarkEchoed {
        call: String,
        name: String,
    },
    DataMessage {
        call: String,
        kind: String,
    },
    CallEnded {
        call: String,
        reason: String,
    },
    SocketClosed {
        call: String,
    },
}

enum Control {
    HangUp(String),
    Say(String),
    UserText(String),
}

struct Shared {
    opts: UltravoxOpts,
    base: String,
    rec: Recorder<UltravoxState, UltravoxEvent>,
    token: CancellationToken,
    failures: Mutex<VecDeque<CreateFailure>>,
    controls: Mutex<HashMap<String, mpsc::UnboundedSender<Control>>>,
    plans: Mutex<HashMap<String, CallPlan>>,
    seq: AtomicU64,
}

impl Shared {
    fn controls(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Control>>> {
        self.controls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, HashMap<String, CallPlan>> {
        self.plans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the call (once) if `pred` holds for it.
    fn end_if(&self, call: &str, reason: &str, pred: impl FnOnce(&UvCall) -> bool) -> bool {
        let ended = self.rec.with(|s| match s.call_mut(call) {
            Some(c) if c.ended.is_none() && pred(c) => {
                c.ended = Some(now_iso());
                c.end_reason = Some(reason.to_owned());
                true
            }
            _ => false,
        });
        if ended {
            self.controls().remove(call);
            self.rec.emit(UltravoxEvent::CallEnded {
                call: call.to_owned(),
                reason: reason.to_owned(),
            });
        }
        ended
    }
}

pub struct FakeUltravox {
    shared: Arc<Shared>,
    /// Stops the server when the handle is dropped.
    _guard: ServerGuard,
}

impl FakeUltravox {
    pub async fn start(opts: UltravoxOpts) -> FakeUltravox {
        let token = CancellationToken::new();
        let (listener, addr) = super::bind().await;
        let shared = Arc::new(Shared {
            failures: Mutex::new(opts.create_failures.iter().cloned().collect()),
            opts,
            base: format!("http://{addr}"),
            rec: Recorder::new(UltravoxState::default()),
            token: token.clone(),
            controls: Mutex::new(HashMap::new()),
            plans: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/api/calls", post(create_call))
            .route("/api/calls/{id}", get(get_call))
            .route("/api/calls/{id}/messages", get(list_messages))
            .route("/api/calls/{id}/send_data_message", post(send_data_message))
            .route("/calls/{id}/join", get(join_twilio))
            .route("/calls/{id}/server_web_socket", get(join_server_ws))
            .with_state(shared.clone());
        let guard = super::serve(listener, router, token);
        FakeUltravox {
            shared,
            _guard: guard,
        }
    }

    /// `http://127.0.0.1:PORT`; voicectl calls `{base}/api/calls`.
    pub fn base_url(&self) -> String {
        self.shared.base.clone()
    }

    pub fn opts(&self) -> &UltravoxOpts {
        &self.shared.opts
    }

    /// The recorded state. Do not hold the guard across an await.
    pub fn state(&self) -> std::sync::MutexGuard<'_, UltravoxState> {
        self.shared.rec.lock()
    }

    /// A copy of call `i` (0-based, in order of creation). Panics if there is none.
    pub fn call(&self, i: usize) -> UvCall {
        self.state()
            .calls
            .get(i)
            .cloned()
            .unwrap_or_else(|| panic!("no ultravox call {i}"))
    }

    pub fn calls(&self) -> Vec<UvCall> {
        self.state().calls.clone()
    }

    pub fn sockets_open(&self) -> usize {
        self.state().sockets_open
    }

    pub fn subscribe(&self) -> broadcast::Receiver<UltravoxEvent> {
        self.shared.rec.subscribe()
    }

    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&UltravoxState) -> Option<T>,
    ) -> T {
        self.shared.rec.wait_until(what, timeout, f).await
    }

    /// Waits until call `i` has ended; returns it.
    pub async fn wait_ended(&self, i: usize, timeout: Duration) -> UvCall {
        self.wait_until(&format!("ultravox call {i} ended"), timeout, |s| {
            s.calls.get(i).filter(|c| c.ended.is_some()).cloned()
        })
        .await
    }
}

fn now_iso() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn detail(status: StatusCode, msg: &str) -> Response {
    (status, axum::Json(json!({"detail": msg}))).into_response()
}

/// `Some(401 response)` unless `X-API-Key` is right.
fn check_key(sh: &Shared, headers: &HeaderMap) -> Option<Response> {
    match headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        Some(k) if k == sh.opts.api_key => None,
        Some(_) => Some(detail(StatusCode::UNAUTHORIZED, "Invalid API key.")),
        None => Some(detail(
            StatusCode::UNAUTHORIZED,
            "Authentication credentials were not provided.",
        )),
    }
}

const START_CALL_FIELDS: &[&str] = &[
    "systemPrompt",
    "temperature",
    "model",
    "voice",
    "externalVoice",
    "languageHint",
    "initialMessages",
    "joinTimeout",
    "maxDuration",
    "timeExceededMessage",
    "inactivityMessages",
    "selectedTools",
    "medium",
    "recordingEnabled",
    "firstSpeaker",
    "transcriptOptional",
    "initialOutputMedium",
    "vadSettings",
    "firstSpeakerSettings",
    "experimentalSettings",
    "metadata",
    "initialState",
    "dataConnection",
    "callbacks",
    "voiceOverrides",
    "retentionPolicy",
    "sharedSecrets",
];
const MEDIA: &[&str] = &[
    "webRtc",
    "twilio",
    "serverWebSocket",
    "telnyx",
    "plivo",
    "exotel",
    "sip",
];

struct Validated {
    medium: Medium,
    join_timeout: (String, Duration),
    max_duration: (String, Duration),
    agent_first: bool,
    greeting: Option<String>,
    greeting_delay: Duration,
    uninterruptible_greeting: bool,
    violations: Vec<String>,
}

fn duration_field(body: &Value, key: &str, default: &str) -> Result<(String, Duration), String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok((
            default.to_owned(),
            parse_proto_duration(default).unwrap_or_default(),
        )),
        Some(Value::String(s)) => parse_proto_duration(s)
            .map(|d| (s.clone(), d))
            .ok_or_else(|| format!("{key}: invalid duration {s:?} (expected e.g. \"30s\")")),
        Some(other) => Err(format!(
            "{key}: expected a duration string like \"30s\", got {other}"
        )),
    }
}

fn only_keys(
    obj: &serde_json::Map<String, Value>,
    path: &str,
    allowed: &[&str],
) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("{path}: unknown field {k:?}")),
        None => Ok(()),
    }
}

/// `ultravox.v1.StartCallRequest` as voicectl must send it (PROTOCOLS §4.2). `Err` is a 400.
fn validate(body: &Value) -> Result<Validated, String> {
    let obj = body.as_object().ok_or("the body must be a JSON object")?;
    only_keys(obj, "StartCallRequest", START_CALL_FIELDS)?;
    let mut violations = Vec::new();
    for key in ["systemPrompt", "voice", "model", "languageHint"] {
        match obj.get(key) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(v) => return Err(format!("{key}: expected a string, got {v}")),
        }
    }
    if obj
        .get("systemPrompt")
        .and_then(Value::as_str)
        .is_none_or(|s| s.is_empty())
    {
        violations.push("no systemPrompt".to_owned());
    }
    if obj
        .get("voice")
        .and_then(Value::as_str)
        .is_none_or(|s| s.is_empty())
    {
        violations.push("no voice".to_owned());
    }
    if let Some(t) = obj.get("temperature")
        && !t.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t))
    {
        return Err(format!("temperature: must be a number in [0, 1], got {t}"));
    }
    let join_timeout = duration_field(body, "joinTimeout", "30s")?;
    let max_duration = duration_field(body, "maxDuration", "3600s")?;
    if max_duration.1.is_zero() {
        return Err("maxDuration: must be positive".into());
    }
    let medium = match obj.get("medium") {
        None | Some(Value::Null) => {
            violations.push("no medium (defaults to webRtc)".into());
            Medium::Other("webRtc".into())
        }
        Some(Value::Object(m)) => {
            only_keys(m, "medium", MEDIA)?;
            if m.len() != 1 {
                return Err(format!(
                    "medium: exactly one medium must be set, got {}",
                    m.len()
                ));
            }
            let (kind, cfg) = m.iter().next().ok_or("medium: empty")?;
            let cfg = cfg
                .as_object()
                .ok_or_else(|| format!("medium.{kind}: expected an object"))?;
            match kind.as_str() {
                "twilio" => {
                    only_keys(cfg, "medium.twilio", &["outgoing", "dtmfHandling"])?;
                    if cfg.contains_key("outgoing") {
                        violations
                            .push("medium.twilio.outgoing: Ultravox would dial itself".into());
                    }
                    Medium::Twilio
                }
                "serverWebSocket" => {
                    only_keys(
                        cfg,
                        "medium.serverWebSocket",
                        &[
                            "inputSampleRate",
                            "outputSampleRate",
                            "clientBufferSizeMs",
                            "dataMessages",
                            "mediaIdleTimeout",
                        ],
                    )?;
                    let rate = |k: &str| -> Result<Option<u64>, String> {
                        match cfg.get(k) {
                            None | Some(Value::Null) => Ok(None),
                            Some(v) => v
                                .as_u64()
                                .filter(|&r| r > 0)
                                .map(Some)
                                .ok_or_else(|| format!("medium.serverWebSocket.{k}: expected a positive integer, got {v}")),
                        }
                    };
                    let input = rate("inputSampleRate")?
                        .ok_or("medium.serverWebSocket.inputSampleRate is required")?;
                    let output = rate("outputSampleRate")?.unwrap_or(input);
                    if cfg.get("clientBufferSizeMs").is_some_and(|v| !v.is_u64()) {
                        return Err(
                            "medium.serverWebSocket.clientBufferSizeMs: expected an integer".into(),
                        );
                    }
                    if let Some(t) = cfg.get("mediaIdleTimeout")
                        && t.as_str().and_then(parse_proto_duration).is_none()
                    {
                        return Err(format!(
                            "medium.serverWebSocket.mediaIdleTimeout: invalid duration {t}"
                        ));
                    }
                    if input != 8000 || output != 8000 {
                        violations.push(format!(
                            "serverWebSocket sample rates {input}/{output}, expected 8000/8000"
                        ));
                    }
                    Medium::ServerWebSocket {
                        input_sample_rate: input,
                        output_sample_rate: output,
                    }
                }
                other => {
                    violations.push(format!("medium {other} is of no use to a phone bridge"));
                    Medium::Other(other.to_owned())
                }
            }
        }
        Some(v) => return Err(format!("medium: expected an object, got {v}")),
    };
    let first_speaker = match obj.get("firstSpeaker") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "FIRST_SPEAKER_AGENT" => Some(true),
        Some(Value::String(s)) if s == "FIRST_SPEAKER_USER" => Some(false),
        Some(v) => return Err(format!("firstSpeaker: invalid value {v}")),
    };
    if first_speaker.is_some() {
        violations.push("deprecated firstSpeaker used".into());
    }
    let (mut agent_first, mut greeting, mut greeting_delay, mut uninterruptible) =
        (first_speaker.unwrap_or(true), None, Duration::ZERO, false);
    if let Some(fss) = obj.get("firstSpeakerSettings").filter(|v| !v.is_null()) {
        let fss = fss
            .as_object()
            .ok_or("firstSpeakerSettings: expected an object")?;
        only_keys(fss, "firstSpeakerSettings", &["user", "agent"])?;
        match (fss.get("user"), fss.get("agent")) {
            (Some(u), None) => {
                let u = u
                    .as_object()
                    .ok_or("firstSpeakerSettings.user: expected an object")?;
                only_keys(u, "firstSpeakerSettings.user", &["fallback"])?;
                agent_first = false;
            }
            (None, Some(a)) => {
                let a = a
                    .as_object()
                    .ok_or("firstSpeakerSettings.agent: expected an object")?;
                only_keys(
                    a,
                    "firstSpeakerSettings.agent",
                    &["uninterruptible", "text", "prompt", "delay"],
                )?;
                for k in ["text", "prompt"] {
                    if a.get(k).is_some_and(|v| !v.is_string()) {
                        return Err(format!("firstSpeakerSettings.agent.{k}: expected a string"));
                    }
                }
                if a.get("uninterruptible").is_some_and(|v| !v.is_boolean()) {
                    return Err(
                        "firstSpeakerSettings.agent.uninterruptible: expected a boolean".into(),
                    );
                }
                if let Some(d) = a.get("delay") {
                    greeting_delay =
                        d.as_str().and_then(parse_proto_duration).ok_or_else(|| {
                            format!("firstSpeakerSettings.agent.delay: invalid duration {d}")
                        })?;
                }
                greeting = a.get("text").and_then(Value::as_str).map(str::to_owned);
                uninterruptible = a.get("uninterruptible") == Some(&Value::Bool(true));
                agent_first = true;
            }
            _ => {
                return Err(
                    "firstSpeakerSettings: exactly one of user or agent must be set".into(),
                );
            }
        }
        if first_speaker.is_some_and(|f| f != agent_first) {
            return Err("firstSpeaker and firstSpeakerSettings disagree".into());
        }
    }
    if let Some(m) = obj.get("metadata").filter(|v| !v.is_null()) {
        let m = m.as_object().ok_or("metadata: expected an object")?;
        for (k, v) in m {
            if !v.is_string() {
                return Err(format!("metadata.{k}: values must be strings, got {v}"));
            }
            if k.starts_with("ultravox.") {
                return Err(format!(
                    "metadata: key {k:?} may not start with \"ultravox.\""
                ));
            }
        }
    }
    Ok(Validated {
        medium,
        join_timeout,
        max_duration,
        agent_first,
        greeting,
        greeting_delay,
        uninterruptible_greeting: uninterruptible,
        violations,
    })
}

/// Per-call settings the session task needs (not part of the public record).
#[derive(Clone)]
struct CallPlan {
    agent_first: bool,
    greeting: Option<String>,
    greeting_delay: Duration,
    uninterruptible_greeting: bool,
    max_duration: Duration,
}

async fn create_call(
    State(sh): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    let body_text = String::from_utf8_lossy(&body).into_owned();
    let refuse = |status: StatusCode, why: String, retry_after: Option<u64>| {
        sh.rec.with(|s| {
            s.creates.push(CreateRequest {
                query: query.clone(),
                body: body_text.clone(),
                status: status.as_u16(),
                error: Some(why.clone()),
                violations: Vec::new(),
            })
        });
        sh.rec.emit(UltravoxEvent::CreateRejected {
            status: status.as_u16(),
        });
        let mut resp = detail(status, &why);
        if let Some(secs) = retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            resp.headers_mut().insert("retry-after", v);
        }
        resp
    };
    if let Some(resp) = check_key(&sh, &headers) {
        return refuse(resp.status(), "bad or missing X-API-Key".into(), None);
    }
    let scripted = sh
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front();
    if let Some(f) = scripted {
        let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return refuse(status, f.detail, f.retry_after_s);
    }
    if let Some(cap) = sh.opts.max_concurrent {
        let active = sh
            .rec
            .with(|s| s.calls.iter().filter(|c| c.ended.is_none()).count());
        if active >= cap {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!("Too many concurrent calls (limit {cap})."),
                Some(sh.opts.retry_after_s),
            );
        }
    }
    let json: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("JSON parse error - {e}"),
                None,
            );
        }
    };
    let v = match validate(&json) {
        Ok(v) => v,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why, None),
    };
    let n = sh.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let port = sh
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    let call_id = format!("{port:08x}-0000-4000-8000-{n:012x}");
    let ws_base = sh.base.replacen("http://", "", 1);
    let path = match v.medium {
        Medium::ServerWebSocket { .. } => "server_web_socket",
        _ => "join",
    };
    let join_url = match &sh.opts.join_url {
        JoinUrl::Ws => Some(format!("ws://{ws_base}/calls/{call_id}/{path}")),
        JoinUrl::Scheme(s) => Some(format!("{s}://{ws_base}/calls/{call_id}/{path}")),
        JoinUrl::Null => None,
    };
    let call = UvCall {
        call_id: call_id.clone(),
        request: json,
        medium: v.medium,
        join_url,
        created: now_iso(),
        joined: None,
        ended: None,
        end_reason: None,
        join_timeout: v.join_timeout.0,
        max_duration: v.max_duration.0,
        agent_first: v.agent_first,
        messages: Vec::new(),
        caller_audio: Vec::new(),
        utterances: Vec::new(),
        stream: None,
        twilio_events: Vec::new(),
        media_frames: 0,
        marks_sent: Vec::new(),
        marks_echoed: Vec::new(),
        clears_sent: 0,
        data_in: Vec::new(),
        data_out: Vec::new(),
        barge_ins: 0,
        violations: Vec::new(),
        socket_open: false,
        close: None,
    };
    let out = call_json(&call);
    let plan = CallPlan {
        agent_first: v.agent_first,
        greeting: v.greeting,
        greeting_delay: v.greeting_delay,
        uninterruptible_greeting: v.uninterruptible_greeting,
        max_duration: v.max_duration.1,
    };
    sh.rec.with(|s| {
        s.creates.push(CreateRequest {
            query: query.clone(),
            body: body_text.clone(),
            status: 201,
            error: None,
            violations: v.violations,
        });
        s.calls.push(call);
    });
    sh.plans().insert(call_id.clone(), plan);
    sh.rec.emit(UltravoxEvent::CallCreated {
        call: call_id.clone(),
    });
    // The join timeout: one sleeping task per call, cancelled with the fake.
    let (sh2, join_timeout) = (sh.clone(), v.join_timeout.1);
    tokio::spawn(async move {
        tokio::select! {
            _ = sh2.token.cancelled() => {}
            _ = tokio::time::sleep(join_timeout) => {
                sh2.end_if(&call_id, "unjoined", |c| c.joined.is_none());
            }
        }
    });
    (StatusCode::CREATED, axum::Json(out)).into_response()
}

fn call_json(c: &UvCall) -> Value {
    let req = &c.request;
    let billed = match (&c.joined, &c.ended) {
        (Some(_), Some(_)) => json!("0s"),
        _ => Value::Null,
    };
    json!({
        "callId": c.call_id,
        "clientVersion": null,
        "created": c.created,
        "joined": c.joined,
        "ended": c.ended,
        "endReason": c.end_reason,
        "billedDuration": billed,
        "billedSideInputTokens": null,
        "billedSideOutputTokens": null,
        "billingStatus": if c.ended.is_some() { "BILLING_STATUS_BILLED" } else { "BILLING_STATUS_PENDING" },
        "firstSpeaker": if c.agent_first { "FIRST_SPEAKER_AGENT" } else { "FIRST_SPEAKER_USER" },
        "firstSpeakerSettings": req.get("firstSpeakerSettings").cloned()
            .unwrap_or_else(|| if c.agent_first { json!({"agent": {}}) } else { json!({"user": {}}) }),
        "inactivityMessages": req.get("inactivityMessages").cloned().unwrap_or(json!([])),
        "initialOutputMedium": req.get("initialOutputMedium").cloned().unwrap_or(json!("MESSAGE_MEDIUM_VOICE")),
        "joinTimeout": c.join_timeout,
        "joinUrl": c.join_url,
        "languageHint": req.get("languageHint").cloned().unwrap_or(Value::Null),
        "maxDuration": c.max_duration,
        "medium": req.get("medium").cloned().unwrap_or(json!({"webRtc": {}})),
        "model": req.get("model").cloned().unwrap_or(json!("ultravox-v0.7")),
        "recordingEnabled": req.get("recordingEnabled").cloned().unwrap_or(json!(false)),
        "systemPrompt": req.get("systemPrompt").cloned().unwrap_or(Value::Null),
        "temperature": req.get("temperature").cloned().unwrap_or(json!(0.0)),
        "timeExceededMessage": req.get("timeExceededMessage").cloned().unwrap_or(Value::Null),
        "voice": req.get("voice").cloned().unwrap_or(Value::Null),
        "transcriptOptional": true,
        "vadSettings": req.get("vadSettings").cloned().unwrap_or(Value::Null),
        "shortSummary": null,
        "summary": null,
        "agent": null,
        "agentId": null,
        "experimentalSettings": req.get("experimentalSettings").cloned().unwrap_or(Value::Null),
        "metadata": req.get("metadata").cloned().unwrap_or(json!({})),
        "initialState": req.get("initialState").cloned().unwrap_or(json!({})),
        "requestContext": null,
        "sipDetails": null,
    })
}

async fn get_call(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = check_key(&sh, &headers) {
        return r;
    }
    match sh.rec.with(|s| s.call(&id).map(call_json)) {
        Some(v) => axum::Json(v).into_response(),
        None => detail(StatusCode::NOT_FOUND, "Not found."),
    }
}

fn message_json(m: &UvMessage, index: usize, call_id: &str) -> Value {
    json!({
        "role": match m.role { Role::User => "MESSAGE_ROLE_USER", Role::Agent => "MESSAGE_ROLE_AGENT" },
        "text": m.text,
        "medium": m.medium,
        "callStageMessageIndex": index,
        "callStageId": call_id,
        "timespan": {"start": proto_duration(m.start_ms), "end": proto_duration(m.end_ms)},
    })
}

async fn list_messages(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = check_key(&sh, &headers) {
        return r;
    }
    if let Some(mode) = q.get("mode")
        && mode != "last_stage"
        && mode != "in_call"
    {
        return detail(
            StatusCode::BAD_REQUEST,
            "mode: must be last_stage or in_call",
        );
    }
    let cap = sh.opts.page_size.max(1);
    let page_size = match q.get("pageSize").map(|p| p.parse::<usize>()) {
        None => cap,
        Some(Ok(n)) if n > 0 => n.min(cap),
        Some(_) => {
            return detail(
                StatusCode::BAD_REQUEST,
                "pageSize: must be a positive integer",
            );
        }
    };
    let offset = match q.get("cursor") {
        None => 0,
        Some(c) => match URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("o=").and_then(|n| n.parse::<usize>().ok()))
        {
            Some(o) => o,
            None => return detail(StatusCode::NOT_FOUND, "Invalid cursor"),
        },
    };
    let Some(all) = sh.rec.with(|s| s.call(&id).map(|c| c.messages.clone())) else {
        return detail(StatusCode::NOT_FOUND, "Not found.");
    };
    let total = all.len();
    let start = offset.min(total);
    let end = (start + page_size).min(total);
    let results: Vec<Value> = all[start..end]
        .iter()
        .enumerate()
        .map(|(i, m)| message_json(m, start + i, &id))
        .collect();
    let link = |o: usize| {
        let cursor = URL_SAFE_NO_PAD.encode(format!("o={o}"));
        format!(
            "{}/api/calls/{id}/messages?cursor={cursor}&pageSize={page_size}",
            sh.base
        )
    };
    let next = (end < total).then(|| link(end));
    let previous = (start > 0).then(|| link(start.saturating_sub(page_size)));
    axum::Json(json!({"next": next, "previous": previous, "results": results, "total": total}))
        .into_response()
}

async fn send_data_message(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = check_key(&sh, &headers) {
        return r;
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let record = |v: Value, status: StatusCode| {
        sh.rec
            .with(|s| s.data_messages.push((id.clone(), v, status.as_u16())));
    };
    let Some(known) = sh
        .rec
        .with(|s| s.call(&id).map(|c| c.ended.is_none() && c.joined.is_some()))
    else {
        record(parsed.unwrap_or(Value::Null), StatusCode::NOT_FOUND);
        return detail(StatusCode::NOT_FOUND, "Not found.");
    };
    let Some(v) = parsed.filter(|v| v["type"].is_string()) else {
        record(Value::Null, StatusCode::BAD_REQUEST);
        return detail(StatusCode::BAD_REQUEST, "type: This field is required.");
    };
    let ty = v["type"].as_str().unwrap_or_default().to_owned();
    let control = match ty.as_str() {
        "hang_up" => Control::HangUp(v["message"].as_str().unwrap_or("").to_owned()),
        "forced_agent_message" => Control::Say(v["content"].as_str().unwrap_or("").to_owned()),
        "user_text_message" => match v["text"].as_str() {
            Some(t) => Control::UserText(t.to_owned()),
            None => {
                record(v, StatusCode::BAD_REQUEST);
                return detail(StatusCode::BAD_REQUEST, "text: This field is required.");
            }
        },
        _ => {
            record(v, StatusCode::BAD_REQUEST);
            return detail(
                StatusCode::BAD_REQUEST,
                "type: only hang_up, forced_agent_message and user_text_message are supported",
            );
        }
    };
    let sent = known
        && sh
            .controls()
            .get(&id)
            .is_some_and(|tx| tx.send(control).is_ok());
    if !sent {
        record(v, StatusCode::UNPROCESSABLE_ENTITY);
        return detail(StatusCode::UNPROCESSABLE_ENTITY, "Call is not active.");
    }
    record(v, StatusCode::NO_CONTENT);
    sh.rec
        .emit(UltravoxEvent::DataMessage { call: id, kind: ty });
    StatusCode::NO_CONTENT.into_response()
}

async fn join_twilio(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    join(sh, id, ws, false)
}

async fn join_server_ws(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    join(sh, id, ws, true)
}

fn join(
    sh: Arc<Shared>,
    id: String,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    server_ws: bool,
) -> Response {
    let path = format!(
        "/calls/{id}/{}",
        if server_ws {
            "server_web_socket"
        } else {
            "join"
        }
    );
    let check = sh.rec.with(|s| match s.call(&id) {
        None => Err((StatusCode::NOT_FOUND, "Not found.")),
        Some(c) => match (&c.medium, server_ws) {
            (Medium::Twilio, false) | (Medium::ServerWebSocket { .. }, true) => {
                if c.ended.is_some() {
                    Err((StatusCode::GONE, "The call has ended."))
                } else if c.joined.is_some() {
                    Err((StatusCode::CONFLICT, "The call was already joined."))
                } else {
                    Ok(())
                }
            }
            _ => Err((StatusCode::NOT_FOUND, "Not found.")),
        },
    });
    let refuse = |status: StatusCode, msg: &str| {
        sh.rec
            .with(|s| s.rejected_joins.push((path.clone(), status.as_u16())));
        detail(status, msg)
    };
    if let Err((status, msg)) = check {
        return refuse(status, msg);
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let status = e.status();
            sh.rec
                .with(|s| s.rejected_joins.push((path.clone(), status.as_u16())));
            return e.into_response();
        }
    };
    let Some(plan) = sh.plans().get(&id).cloned() else {
        return refuse(StatusCode::NOT_FOUND, "Not found.");
    };
    ws.on_upgrade(move |socket| run_call(sh, id, server_ws, plan, socket))
}

async fn run_call(
    sh: Arc<Shared>,
    id: String,
    server_ws: bool,
    plan: CallPlan,
    mut socket: WebSocket,
) {
    let claimed = sh.rec.with(|s| {
        let ok = match s.call_mut(&id) {
            Some(c) if c.ended.is_none() && c.joined.is_none() => {
                c.joined = Some(now_iso());
                c.socket_open = true;
                true
            }
            _ => false,
        };
        if ok {
            s.sockets_open += 1;
            s.sockets_opened += 1;
        }
        ok
    });
    if !claimed {
        super::close_ws(&mut socket, 1000, "call ended").await;
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    sh.controls().insert(id.clone(), tx);
    sh.rec.emit(UltravoxEvent::Joined { call: id.clone() });
    let mut conn = CallConn::new(sh.clone(), id.clone(), server_ws, plan, socket, rx);
    let end = conn.run().await;
    sh.rec.with(|s| {
        s.sockets_open -= 1;
        if let Some(c) = s.call_mut(&id) {
            c.socket_open = false;
            c.close = Some(end.close.clone());
        }
    });
    sh.end_if(&id, end.reason, |_| true);
    sh.controls().remove(&id);
    sh.rec.emit(UltravoxEvent::SocketClosed { call: id });
}

/// How a join socket ended: the socket side and the call's `endReason`.
struct End {
    close: SocketClose,
    reason: &'static str,
}

/// Something the agent will say.
struct Say {
    text: String,
    ms: u64,
    not_before: Instant,
    then_hangup: bool,
    uninterruptible: bool,
}

/// What the agent is saying now.
struct Speech {
    n: u32,
    text: String,
    words: Vec<String>,
    words_sent: usize,
    audio: Vec<u8>,
    sent: usize,
    next_at: Instant,
    first_sent_at: Option<Instant>,
    /// Caller-audio time at which it started.
    start_ms: u64,
    ordinal: u64,
    then_hangup: bool,
    uninterruptible: bool,
}

#[derive(serde::Deserialize)]
struct SidOnly<'a> {
    #[serde(rename = "streamSid", default, borrow)]
    stream_sid: Option<std::borrow::Cow<'a, str>>,
}

struct CallConn {
    sh: Arc<Shared>,
    id: String,
    server_ws: bool,
    plan: CallPlan,
    socket: WebSocket,
    rx: mpsc::UnboundedReceiver<Control>,
    vad: EnergyVad,
    vad_out: Vec<VadEvent>,
    /// Caller audio received, in ms.
    caller_ms: u64,
    caller_bytes: u64,
    pcm_carry: Option<u8>,
    max_at: Instant,
    // Twilio medium.
    stream_sid: Option<String>,
    seen_connected: bool,
    expect_seq: Option<u64>,
    stopped: bool,
    pending_marks: VecDeque<String>,
    // serverWebSocket medium.
    playback_until: Instant,
    ordinal: u64,
    // The agent.
    speech: Option<Speech>,
    queue: VecDeque<Say>,
    utterances: u32,
    turns: usize,
    hangup_when_played: bool,
    hangup_at: Option<Instant>,
    out: String,
    /// The invocation id of the client tool call awaiting its result.
    tool_pending: Option<String>,
    tool_invoked: bool,
}

type Flow = Result<(), End>;

impl CallConn {
    fn new(
        sh: Arc<Shared>,
        id: String,
        server_ws: bool,
        plan: CallPlan,
        socket: WebSocket,
        rx: mpsc::UnboundedReceiver<Control>,
    ) -> CallConn {
        let now = Instant::now();
        CallConn {
            vad: EnergyVad::new(sh.opts.vad),
            max_at: super::after(plan.max_duration),
            sh,
            id,
            server_ws,
            plan,
            socket,
            rx,
            vad_out: Vec::new(),
            caller_ms: 0,
            caller_bytes: 0,
            pcm_carry: None,
            stream_sid: None,
            seen_connected: false,
            expect_seq: None,
            stopped: false,
            pending_marks: VecDeque::new(),
            playback_until: now,
            ordinal: 0,
            speech: None,
            queue: VecDeque::new(),
            utterances: 0,
            turns: 0,
            hangup_when_played: false,
            hangup_at: None,
            out: String::new(),
            tool_pending: None,
            tool_invoked: false,
        }
    }

    fn record<R>(&self, f: impl FnOnce(&mut UvCall) -> R) -> Option<R> {
        self.sh.rec.with(|s| s.call_mut(&self.id).map(f))
    }

    fn violation(&self, what: String) {
        self.record(|c| c.violations.push(what));
    }

    fn emit(&self, e: UltravoxEvent) {
        self.sh.rec.emit(e)
    }

    fn gone(&self) -> End {
        End {
            close: SocketClose::Dropped,
            reason: if self.stopped || self.server_ws {
                "hangup"
            } else {
                "connection_error"
            },
        }
    }

    async fn close(&mut self, code: u16, why: &str, reason: &'static str) -> End {
        // The call ends when the agent decides, not when the client acknowledges the close.
        self.sh.end_if(&self.id, reason, |_| true);
        super::close_ws(&mut self.socket, code, why).await;
        End {
            close: SocketClose::ByServer(code, why.to_owned()),
            reason,
        }
    }

    async fn send_text(&mut self, text: String) -> Flow {
        match self.socket.send(Message::Text(Utf8Bytes::from(text))).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.gone()),
        }
    }

    async fn send_data(&mut self, v: Value) -> Flow {
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        self.record(|c| c.data_out.push(ty));
        self.send_text(v.to_string()).await
    }

    async fn run(&mut self) -> End {
        match self.run_inner().await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    fn deadline(&self) -> Instant {
        let mut d = self.max_at;
        if let Some(s) = &self.speech {
            d = d.min(s.next_at);
        } else if let Some(q) = self.queue.front()
            && (self.server_ws || self.stream_sid.is_some())
        {
            d = d.min(q.not_before);
        }
        if let Some(h) = self.hangup_at {
            d = d.min(h);
        }
        d
    }

    async fn run_inner(&mut self) -> Result<std::convert::Infallible, End> {
        if self.server_ws {
            let id = self.id.clone();
            self.send_data(json!({"type": "call_started", "callId": id}))
                .await?;
            self.send_data(json!({"type": "state", "state": "listening"}))
                .await?;
            self.schedule_greeting();
        }
        let token = self.sh.token.clone();
        loop {
            let deadline = self.deadline();
            let msg = tokio::select! {
                _ = token.cancelled() => {
                    return Err(self.close(1001, "server shutting down", "system_error").await);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.on_timer().await?;
                    continue;
                }
                Some(ctl) = self.rx.recv() => {
                    self.on_control(ctl).await?;
                    continue;
                }
                msg = self.socket.recv() => msg,
            };
            match msg {
                None | Some(Err(_)) => return Err(self.gone()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(End {
                        close: SocketClose::ByClient(frame.map(|f| f.code)),
                        reason: self.gone().reason,
                    });
                }
                Some(Ok(Message::Text(t))) => {
                    if self.server_ws {
                        self.on_data_message(&t).await?
                    } else {
                        self.on_twilio(&t).await?
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if self.server_ws {
                        self.on_pcm(&b).await?
                    } else {
                        self.violation("binary frame on a Twilio media stream".into());
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    }

    fn schedule_greeting(&mut self) {
        if !self.plan.agent_first {
            return;
        }
        let text = self
            .plan
            .greeting
            .clone()
            .unwrap_or_else(|| self.sh.opts.greeting_text.clone());
        self.queue.push_back(Say {
            text,
            ms: self.sh.opts.greeting_ms,
            not_before: super::after(self.plan.greeting_delay),
            then_hangup: false,
            uninterruptible: self.plan.uninterruptible_greeting,
        });
    }

    async fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        if now >= self.max_at {
            return Err(self
                .close(1000, "call exceeded its maximum duration", "timeout")
                .await);
        }
        if self.hangup_at.is_some_and(|h| h <= now) {
            return Err(self.close(1000, "agent hung up", "agent_hangup").await);
        }
        if self.speech.as_ref().is_some_and(|s| s.next_at <= now) {
            self.send_chunk().await?;
        } else if self.speech.is_none()
            && (self.server_ws || self.stream_sid.is_some())
            && self.queue.front().is_some_and(|q| q.not_before <= now)
            && let Some(say) = self.queue.pop_front()
        {
            self.start_speech(say).await?;
        }
        Ok(())
    }

    async fn on_control(&mut self, ctl: Control) -> Flow {
        let now = Instant::now();
        match ctl {
            Control::HangUp(msg) if msg.is_empty() => {
                return Err(self.close(1000, "agent hung up", "agent_hangup").await);
            }
            Control::HangUp(msg) => self.queue.push_back(Say {
                text: msg,
                ms: self.sh.opts.greeting_ms,
                not_before: now,
                then_hangup: true,
                uninterruptible: true,
            }),
            Control::Say(text) => self.queue.push_back(Say {
                text,
                ms: self.sh.opts.greeting_ms,
                not_before: now,
                then_hangup: false,
                uninterruptible: false,
            }),
            Control::UserText(text) => {
                let at = self.caller_ms;
                self.record(|c| {
                    c.messages.push(UvMessage {
                        role: Role::User,
                        text: text.clone(),
                        medium: "MESSAGE_MEDIUM_TEXT",
                        start_ms: at,
                        end_ms: at,
                    })
                });
                self.queue_reply(now);
            }
        }
        Ok(())
    }

    fn queue_reply(&mut self, now: Instant) {
        self.turns += 1;
        let then_hangup = self.sh.opts.hangup_after_turns == Some(self.turns);
        self.queue.push_back(Say {
            text: format!("Fake Ultravox reply {}.", self.turns),
            ms: self.sh.opts.reply_ms,
            not_before: now + Duration::from_millis(self.sh.opts.response_latency_ms),
            then_hangup,
            uninterruptible: false,
        });
    }

    async fn start_speech(&mut self, say: Say) -> Flow {
        self.utterances += 1;
        self.ordinal += 1;
        let n = self.utterances;
        let audio = if self.server_ws {
            agent_pcm_bytes(n, (say.ms * 8) as usize)
        } else {
            agent_mulaw(n, (say.ms * 8) as usize)
        };
        let planned = audio.len();
        self.record(|c| {
            c.utterances.push(Utterance {
                n,
                text: say.text.clone(),
                audio: Vec::new(),
                planned_bytes: planned,
                interrupted: false,
                mark: None,
            })
        });
        self.emit(UltravoxEvent::AgentStarted {
            call: self.id.clone(),
            n,
        });
        self.speech = Some(Speech {
            n,
            words: word_deltas(&say.text),
            text: say.text,
            words_sent: 0,
            audio,
            sent: 0,
            next_at: Instant::now(),
            first_sent_at: None,
            start_ms: self.caller_ms,
            ordinal: self.ordinal,
            then_hangup: say.then_hangup,
            uninterruptible: say.uninterruptible,
        });
        if self.server_ws {
            self.send_data(json!({"type": "state", "state": "speaking"}))
                .await?;
        }
        Ok(())
    }

    async fn send_chunk(&mut self) -> Flow {
        let bytes_per_ms = if self.server_ws { 16 } else { 8 };
        let chunk_ms = self.sh.opts.chunk_ms.max(1);
        let interval = Duration::from_millis(self.sh.opts.chunk_interval_ms);
        let now = Instant::now();
        let Some(s) = self.speech.as_mut() else {
            return Ok(());
        };
        let end = (s.sent + (chunk_ms * bytes_per_ms) as usize).min(s.audio.len());
        let chunk = s.audio[s.sent..end].to_vec();
        s.sent = end;
        s.next_at = now + interval;
        s.first_sent_at.get_or_insert(now);
        let words_due = if s.audio.is_empty() {
            s.words.len()
        } else {
            (s.words.len() * s.sent).div_ceil(s.audio.len())
        };
        let words: Vec<String> = s.words[s.words_sent..words_due].to_vec();
        s.words_sent = words_due;
        let (n, ordinal, finished) = (s.n, s.ordinal, s.sent >= s.audio.len());
        if !chunk.is_empty() {
            if self.server_ws {
                if self
                    .socket
                    .send(Message::Binary(Bytes::from(chunk.clone())))
                    .await
                    .is_err()
                {
                    return Err(self.gone());
                }
                let chunk_dur = Duration::from_millis(chunk.len() as u64 / 16);
                self.playback_until = self.playback_until.max(now) + chunk_dur;
            } else {
                let sid = self.stream_sid.clone().unwrap_or_default();
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                media::write_media(&mut out, &sid, &B64.encode(&chunk));
                self.send_text(out).await?;
            }
            let len = chunk.len();
            self.record(|c| {
                if let Some(u) = c.utterances.iter_mut().rev().find(|u| u.n == n) {
                    u.audio.extend_from_slice(&chunk);
                }
            });
            self.emit(UltravoxEvent::AgentAudio {
                call: self.id.clone(),
                bytes: len,
            });
        }
        if self.server_ws {
            for w in words {
                self.send_data(
                    json!({"type": "transcript", "role": "agent", "medium": "voice",
                    "text": null, "delta": w, "final": false, "ordinal": ordinal}),
                )
                .await?;
            }
        }
        if finished {
            self.finish_speech(false).await?;
        }
        Ok(())
    }

    /// Ends the current speech, played in full or cut by a barge-in.
    async fn finish_speech(&mut self, interrupted: bool) -> Flow {
        let Some(s) = self.speech.take() else {
            return Ok(());
        };
        let bytes_per_ms = if self.server_ws { 16 } else { 8 };
        let now = Instant::now();
        let sent_ms = s.sent as u64 / bytes_per_ms;
        let played_ms = match (interrupted, s.first_sent_at) {
            (false, _) => sent_ms,
            (true, Some(t0)) => sent_ms.min(now.saturating_duration_since(t0).as_millis() as u64),
            (true, None) => 0,
        };
        let text = if interrupted {
            let total_ms = (s.audio.len() as u64 / bytes_per_ms).max(1);
            let heard = (s.words.len() as u64 * played_ms).div_ceil(total_ms) as usize;
            s.words[..heard.min(s.words.len())].concat()
        } else {
            s.text.clone()
        };
        let mark = (!interrupted && !self.server_ws).then(|| format!("uv-{}", s.n));
        let (start_ms, n) = (s.start_ms, s.n);
        let msg_text = text.clone();
        let mark_rec = mark.clone();
        self.record(|c| {
            if let Some(u) = c.utterances.iter_mut().rev().find(|u| u.n == n) {
                u.interrupted = interrupted;
                u.mark = mark_rec.clone();
            }
            if let Some(m) = &mark_rec {
                c.marks_sent.push(m.clone());
            }
            c.messages.push(UvMessage {
                role: Role::Agent,
                text: msg_text,
                medium: "MESSAGE_MEDIUM_VOICE",
                start_ms,
                end_ms: start_ms + played_ms,
            });
        });
        if let Some(m) = mark {
            let sid = self.stream_sid.clone().unwrap_or_default();
            let mut out = String::new();
            media::write_mark(&mut out, &sid, &m);
            self.pending_marks.push_back(m);
            self.send_text(out).await?;
        }
        if self.server_ws {
            self.send_data(
                json!({"type": "transcript", "role": "agent", "medium": "voice",
                "text": text, "delta": null, "final": true, "ordinal": s.ordinal}),
            )
            .await?;
            self.send_data(json!({"type": "state", "state": "listening"}))
                .await?;
        }
        self.emit(UltravoxEvent::AgentDone {
            call: self.id.clone(),
            n,
            interrupted,
        });
        if s.then_hangup {
            self.hangup_when_played = true;
            // Twilio: hang up on the mark echo; both: a fallback once playback must be over.
            let until = if self.server_ws {
                self.playback_until.max(now)
            } else {
                let started = s.first_sent_at.unwrap_or(now);
                (started + Duration::from_millis(sent_ms)).max(now) + Duration::from_millis(1000)
            };
            self.hangup_at = Some(until + Duration::from_millis(20));
        }
        Ok(())
    }

    fn agent_audio_pending(&self) -> bool {
        self.speech.is_some()
            || (!self.server_ws && !self.pending_marks.is_empty())
            || (self.server_ws && Instant::now() < self.playback_until)
    }

    async fn on_caller_audio(&mut self, vad_events: Vec<VadEvent>) -> Flow {
        for ev in vad_events {
            match ev {
                VadEvent::Started { .. } => {
                    self.emit(UltravoxEvent::SpeechStarted {
                        call: self.id.clone(),
                    });
                    let protected = self.speech.as_ref().is_some_and(|s| s.uninterruptible);
                    if self.agent_audio_pending() && !protected {
                        self.barge_in().await?;
                    }
                }
                VadEvent::Stopped { start_ms, end_ms } => {
                    let text = format!(
                        "caller turn {} ({:.1} s)",
                        self.turns + 1,
                        (end_ms - start_ms) as f64 / 1000.0
                    );
                    self.record(|c| {
                        c.messages.push(UvMessage {
                            role: Role::User,
                            text: text.clone(),
                            medium: "MESSAGE_MEDIUM_VOICE",
                            start_ms,
                            end_ms,
                        })
                    });
                    self.emit(UltravoxEvent::UserTurn {
                        call: self.id.clone(),
                        text: text.clone(),
                    });
                    if self.server_ws {
                        self.ordinal += 1;
                        let ordinal = self.ordinal;
                        self.send_data(json!({"type": "transcript", "role": "user",
                            "medium": "voice", "text": text, "delta": null, "final": true,
                            "ordinal": ordinal}))
                            .await?;
                        self.send_data(json!({"type": "state", "state": "thinking"}))
                            .await?;
                        if let Some((name, params)) = self.sh.opts.client_tool.clone()
                            && !self.tool_invoked
                        {
                            // The conversation is frozen while a tool runs: the reply waits
                            // for its result.
                            self.tool_invoked = true;
                            let inv = format!("inv_{}", self.id);
                            self.tool_pending = Some(inv.clone());
                            self.send_data(json!({"type": "client_tool_invocation",
                                "toolName": name, "invocationId": inv, "parameters": params}))
                                .await?;
                            return Ok(());
                        }
                    }
                    self.queue_reply(Instant::now());
                }
            }
        }
        Ok(())
    }

    async fn barge_in(&mut self) -> Flow {
        self.record(|c| c.barge_ins += 1);
        self.emit(UltravoxEvent::BargeIn {
            call: self.id.clone(),
        });
        self.finish_speech(true).await?;
        self.queue.retain(|s| s.then_hangup);
        if self.server_ws {
            self.playback_until = Instant::now();
            self.send_data(json!({"type": "playback_clear_buffer"}))
                .await?;
        } else {
            let sid = self.stream_sid.clone().unwrap_or_default();
            let mut out = String::new();
            media::write_clear(&mut out, &sid);
            self.record(|c| c.clears_sent += 1);
            self.send_text(out).await?;
        }
        Ok(())
    }

    async fn on_twilio(&mut self, text: &str) -> Flow {
        let (ev, seq) = match media::parse(text) {
            Ok(x) => x,
            Err(e) => {
                self.violation(format!("bad Twilio message: {e}"));
                return Ok(());
            }
        };
        let name = match &ev {
            Event::Connected => "connected",
            Event::Start(_) => "start",
            Event::Media(_) => "media",
            Event::Mark(_) => "mark",
            Event::Dtmf(_) => "dtmf",
            Event::Stop(_) => "stop",
        };
        // Ordering and sequence numbers (PROTOCOLS §1.2).
        if let Event::Connected = ev {
            if self.seen_connected {
                self.violation("second connected".into());
            }
            if seq.is_some() {
                self.violation("connected carries a sequenceNumber".into());
            }
            self.seen_connected = true;
        } else {
            if !self.seen_connected {
                self.violation(format!("{name} before connected"));
                self.seen_connected = true;
            }
            match (seq, self.expect_seq) {
                (None, _) => self.violation(format!("{name} without sequenceNumber")),
                (Some(s), Some(want)) if s != want => {
                    self.violation(format!("{name} has sequenceNumber {s}, expected {want}"))
                }
                (Some(s), None) if s != 1 => {
                    self.violation(format!("first sequenceNumber is {s}, expected 1"))
                }
                _ => {}
            }
            if let Some(s) = seq {
                self.expect_seq = Some(s + 1);
            }
            if !matches!(ev, Event::Start(_)) {
                let sid: Option<SidOnly<'_>> = serde_json::from_str(text).ok();
                let sid = sid.and_then(|s| s.stream_sid).map(|s| s.into_owned());
                if self.stream_sid.is_none() {
                    self.violation(format!("{name} before start"));
                } else if sid != self.stream_sid {
                    self.violation(format!("{name} with streamSid {sid:?}"));
                }
            }
        }
        if name != "media" {
            self.record(|c| c.twilio_events.push(name.to_owned()));
        }
        match ev {
            Event::Connected => {}
            Event::Start(start) => {
                if self.stream_sid.is_some() {
                    self.violation("second start".into());
                    return Ok(());
                }
                if !media::is_valid_stream_sid(&start.stream_sid) {
                    self.violation(format!("invalid streamSid {:?}", start.stream_sid));
                }
                let fmt_ok = start.media_format.as_ref().is_some_and(|f| {
                    f.encoding == "audio/x-mulaw"
                        && f.sample_rate == Some(8000)
                        && f.channels == Some(1)
                });
                if !fmt_ok {
                    self.violation(format!("unexpected mediaFormat {:?}", start.media_format));
                }
                self.stream_sid = Some(start.stream_sid.clone());
                self.record(|c| {
                    c.stream = Some(TwilioStart {
                        stream_sid: start.stream_sid,
                        call_sid: start.call_sid,
                        account_sid: start.account_sid,
                        custom_parameters: start.custom_parameters,
                    })
                });
                self.schedule_greeting();
            }
            Event::Media(m) => {
                if m.track.as_deref().is_some_and(|t| t != "inbound") {
                    self.violation(format!("media on track {:?}", m.track));
                }
                let Ok(bytes) = B64.decode(m.payload.as_bytes()) else {
                    self.violation("media payload is not base64".into());
                    return Ok(());
                };
                self.caller_bytes += bytes.len() as u64;
                self.caller_ms = self.caller_bytes / 8;
                let len = bytes.len();
                let mut out = std::mem::take(&mut self.vad_out);
                self.vad.push_mulaw(&bytes, &mut out);
                self.record(|c| {
                    c.media_frames += 1;
                    c.caller_audio.extend_from_slice(&bytes);
                });
                self.emit(UltravoxEvent::CallerAudio {
                    call: self.id.clone(),
                    bytes: len,
                });
                let events: Vec<VadEvent> = std::mem::take(&mut out);
                self.vad_out = out;
                self.on_caller_audio(events).await?;
            }
            Event::Mark(name) => {
                let name = name.into_owned();
                match self.pending_marks.iter().position(|m| *m == name) {
                    Some(i) => {
                        self.pending_marks.remove(i);
                    }
                    None => self.violation(format!("echo of mark {name:?} that was not pending")),
                }
                self.record(|c| c.marks_echoed.push(name.clone()));
                self.emit(UltravoxEvent::MarkEchoed {
                    call: self.id.clone(),
                    name,
                });
                if self.hangup_when_played && self.pending_marks.is_empty() && self.speech.is_none()
                {
                    return Err(self.close(1000, "agent hung up", "agent_hangup").await);
                }
            }
            Event::Dtmf(d) => {
                let at = self.caller_ms;
                self.record(|c| {
                    c.messages.push(UvMessage {
                        role: Role::User,
                        text: d.digit.clone(),
                        medium: "MESSAGE_MEDIUM_TEXT",
                        start_ms: at,
                        end_ms: at,
                    })
                });
            }
            Event::Stop(_) => {
                self.stopped = true;
                return Err(self.close(1000, "stream stopped", "hangup").await);
            }
        }
        Ok(())
    }

    async fn on_pcm(&mut self, bytes: &[u8]) -> Flow {
        if bytes.len() % 2 == 1 {
            self.violation("odd-length PCM frame".into());
        }
        let mut buf = Vec::with_capacity(bytes.len() + 1);
        buf.extend(self.pcm_carry.take());
        buf.extend_from_slice(bytes);
        if buf.len() % 2 == 1 {
            self.pcm_carry = buf.pop();
        }
        self.caller_bytes += bytes.len() as u64;
        self.caller_ms = self.caller_bytes / 16;
        let mut out = std::mem::take(&mut self.vad_out);
        self.vad.push_pcm(
            buf.chunks_exact(2)
                .map(|p| i16::from_le_bytes([p[0], p[1]])),
            &mut out,
        );
        self.record(|c| c.caller_audio.extend_from_slice(bytes));
        self.emit(UltravoxEvent::CallerAudio {
            call: self.id.clone(),
            bytes: bytes.len(),
        });
        let events: Vec<VadEvent> = std::mem::take(&mut out);
        self.vad_out = out;
        self.on_caller_audio(events).await
    }

    async fn on_data_message(&mut self, text: &str) -> Flow {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.violation(format!("non-JSON text frame {text:?}"));
            return Ok(());
        };
        self.record(|c| c.data_in.push(v.clone()));
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        self.emit(UltravoxEvent::DataMessage {
            call: self.id.clone(),
            kind: ty.clone(),
        });
        let now = Instant::now();
        match ty.as_str() {
            "ping" => {
                let ts = v["timestamp"].clone();
                self.send_data(json!({"type": "pong", "timestamp": ts}))
                    .await?;
            }
            "hang_up" => {
                let msg = v["message"].as_str().unwrap_or("").to_owned();
                self.on_control(Control::HangUp(msg)).await?;
            }
            "user_text_message" => match v["text"].as_str() {
                Some(t) => self.on_control(Control::UserText(t.to_owned())).await?,
                None => self.violation("user_text_message without text".into()),
            },
            "forced_agent_message" => {
                let content = v["content"].as_str().unwrap_or("").to_owned();
                self.queue.push_back(Say {
                    text: content,
                    ms: self.sh.opts.greeting_ms,
                    not_before: now,
                    then_hangup: false,
                    uninterruptible: v["uninterruptible"] == json!(true),
                });
            }
            "client_tool_result" => {
                if v["invocationId"].as_str().is_some()
                    && v["invocationId"].as_str() == self.tool_pending.as_deref()
                    && (v["result"].is_string() || v["errorType"].is_string())
                {
                    self.tool_pending = None;
                    self.queue_reply(now);
                } else {
                    self.violation(format!("client_tool_result for no pending invocation: {v}"));
                }
            }
            "set_output_medium" => {}
            other => self.violation(format!("unknown data message type {other:?}")),
        }
        Ok(())
    }
}

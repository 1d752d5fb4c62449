//! A faithful fake of the OpenAI Realtime API over WebSocket (PROTOCOLS §5, §6), in either the
//! GA or the beta dialect.
//!
//! One task per connection drives everything: the client's events, the fake's own energy VAD
//! over the appended μ-law, and paced audio deltas (100 ms chunks sent 4× faster than real time,
//! like the real service). Every caller byte received and every agent byte sent is recorded,
//! per session and per item, so tests can compare them byte for byte with the phone side.
//!
//! ```ignore
//! let rt = FakeRealtime::start(RealtimeOpts { mode: Mode::Ga, ..Default::default() }).await;
//! // point voicectl at rt.url() with api key rt.opts().api_key …
//! rt.wait_until("a reply", T, |s| s.sessions.first()?.items.iter()
//!     .find(|i| i.status == ItemStatus::Completed).cloned()).await;
//! assert!(rt.session(0).problems().is_empty());
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{EnergyVad, Recorder, ServerGuard, VadEvent, VadOpts, agent_mulaw, word_deltas};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `gpt-realtime`: nested session, `response.output_audio.delta`, no beta header.
    Ga,
    /// `OpenAI-Beta: realtime=v1`: flat session, `response.audio.delta`.
    Beta,
}

/// Scripted faults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// HTTP 401 on the upgrade, whatever the key.
    RejectAuth,
    /// Close with 1011 after this many audio deltas (counted over the session).
    CloseMidResponse { after_deltas: usize },
    /// Send an `error` event `{type: error_type, code}` instead of the first `session.updated`
    /// or instead of the first response (per `on`), then close with 1011 if `close`.
    ErrorEvent {
        code: String,
        error_type: String,
        on: ErrorOn,
        close: bool,
    },
    /// Send a non-JSON text frame right after `session.created`, then behave normally.
    Garbage,
    /// Accept the upgrade, then never send anything (not even `session.created`).
    NeverAnswer,
    /// Close with 1001 "Your session hit the maximum duration…" `after_ms` after opening.
    SessionExpire { after_ms: u64 },
}

/// When a scripted [`Failure::ErrorEvent`] fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOn {
    SessionUpdate,
    FirstResponse,
}

impl Failure {
    /// A `server_error` in place of the first response; the session stays open.
    pub fn error_event(code: &str) -> Failure {
        Failure::ErrorEvent {
            code: code.to_owned(),
            error_type: "server_error".to_owned(),
            on: ErrorOn::FirstResponse,
            close: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RealtimeOpts {
    pub mode: Mode,
    /// Expected in `Authorization: Bearer <api_key>`.
    pub api_key: String,
    /// Length of the audio of each reply to a caller turn.
    pub reply_ms: u64,
    /// Length of the audio of a response asked for with `response.create`.
    pub greeting_ms: u64,
    pub fail: Option<Failure>,
    pub vad: VadOpts,
    /// Audio per delta.
    pub chunk_ms: u64,
    /// Wall time between deltas (chunk_ms / chunk_interval_ms = speed-up over real time).
    pub chunk_interval_ms: u64,
    /// Wall time between `response.created` and the first delta.
    pub response_latency_ms: u64,
    /// Transcript of the first response asked for with `response.create`.
    pub greeting_text: String,
    /// When set, the model answers one caller turn with a function call instead of audio.
    pub function_call: Option<FunctionCallOpts>,
}

/// A function call the fake model makes, as the real service streams it.
#[derive(Debug, Clone)]
pub struct FunctionCallOpts {
    /// The caller turn (1-based) answered with the call.
    pub on_turn: usize,
    pub name: String,
    /// JSON text of the arguments (streamed in a few deltas).
    pub arguments: String,
}

impl Default for RealtimeOpts {
    fn default() -> Self {
        RealtimeOpts {
            mode: Mode::Ga,
            api_key: "sk-fake-realtime".into(),
            reply_ms: 1200,
            greeting_ms: 800,
            fail: None,
            vad: VadOpts::default(),
            chunk_ms: 100,
            chunk_interval_ms: 25,
            response_latency_ms: 30,
            greeting_text: "Hello from the fake realtime".into(),
            function_call: None,
        }
    }
}

/// Everything the fake saw and did.
#[derive(Debug, Default)]
pub struct RealtimeState {
    pub sessions: Vec<Session>,
    /// Upgrades refused: (HTTP status, why).
    pub rejected: Vec<(u16, String)>,
    /// Sessions whose socket is open right now.
    pub open: usize,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub index: usize,
    /// The `model` query parameter.
    pub model: Option<String>,
    pub query: String,
    pub beta_header: Option<String>,
    pub open: bool,
    pub closed: Option<Closed>,
    /// Every caller byte received through `input_audio_buffer.append`, in order.
    pub caller_audio: Vec<u8>,
    /// Number of `input_audio_buffer.append` events.
    pub appends: usize,
    /// `session.update` payloads as received.
    pub session_updates: Vec<Value>,
    /// The effective session after the updates (what `session.updated` echoed).
    pub effective: Value,
    /// Protocol deviations by the client (unknown parameters, wrong dialect, bad events …).
    pub violations: Vec<String>,
    /// Problems of the effective session config for a phone bridge, as of the last update.
    pub config_issues: Vec<String>,
    /// Client event types in order, except `input_audio_buffer.append`.
    pub client_events: Vec<String>,
    /// Server event types in order, except audio and transcript deltas.
    pub server_events: Vec<String>,
    /// `error` events sent: (code, message).
    pub errors_sent: Vec<(String, String)>,
    pub turns: Vec<CallerTurn>,
    /// One per response: the assistant item and every audio byte sent for it.
    pub items: Vec<AgentItem>,
    pub truncations: Vec<Truncation>,
    pub truncate_rejections: Vec<TruncateRejection>,
    /// Function calls made: (call_id, name, arguments).
    pub function_calls: Vec<(String, String, String)>,
    /// `function_call_output` items received, as sent.
    pub function_outputs: Vec<Value>,
    /// The text of user `message` items created by the client (`input_text` parts).
    pub user_texts: Vec<String>,
}

impl Session {
    /// Violations plus config issues: tests of voicectl assert this is empty.
    pub fn problems(&self) -> Vec<String> {
        self.violations
            .iter()
            .chain(&self.config_issues)
            .cloned()
            .collect()
    }

    pub fn item(&self, id: &str) -> Option<&AgentItem> {
        self.items.iter().find(|i| i.item_id == id)
    }

    /// Every agent audio byte sent, over all items, in order.
    pub fn agent_audio(&self) -> Vec<u8> {
        self.items.iter().flat_map(|i| i.audio.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The client sent a close frame (with this code, if any).
    ByClient(Option<u16>),
    /// The client's TCP went away without a close frame.
    Dropped,
    /// The fake closed (scripted fault, expiry or shutdown).
    ByServer(u16, String),
}

#[derive(Debug, Clone)]
pub struct CallerTurn {
    pub item_id: String,
    pub audio_start_ms: u64,
    /// None while the caller is still speaking.
    pub audio_end_ms: Option<u64>,
    pub transcript: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    InProgress,
    Completed,
    /// Cancelled with this `status_details.reason` (`turn_detected`, `client_cancelled`).
    Cancelled(&'static str),
}

#[derive(Debug, Clone)]
pub struct AgentItem {
    pub item_id: String,
    pub response_id: String,
    /// 1-based number of the response in its session: its audio is `agent_mulaw(n, len)`.
    pub n: u32,
    /// Audio planned for the item (`planned_bytes = ms * 8`).
    pub planned_bytes: usize,
    /// Every audio byte sent in deltas, in order.
    pub audio: Vec<u8>,
    pub deltas: usize,
    /// Transcript of what was sent.
    pub transcript: String,
    pub status: ItemStatus,
    /// Set when a `conversation.item.truncate` was accepted.
    pub truncated_at_ms: Option<u64>,
}

impl AgentItem {
    pub fn sent_ms(&self) -> u64 {
        self.audio.len() as u64 / 8
    }
}

#[derive(Debug, Clone)]
pub struct Truncation {
    pub item_id: String,
    pub audio_end_ms: u64,
    pub audio_sent_ms: u64,
    pub at: Instant,
}

#[derive(Debug, Clone)]
pub struct TruncateRejection {
    pub item_id: String,
    pub audio_end_ms: Option<u64>,
    /// None for an unknown item.
    pub audio_sent_ms: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealtimeEvent {
    Rejected {
        status: u16,
    },
    SessionOpened {
        session: usize,
    },
    SessionUpdated {
        session: usize,
    },
    AudioAppended {
        session: usize,
        bytes: usize,
    },
    SpeechStarted {
        session: usize,
        item: String,
        audio_start_ms: u64,
    },
    SpeechStopped {
        session: usize,
        item: String,
        audio_end_ms: u64,
    },
    ResponseStarted {
        session: usize,
        response: String,
        item: String,
    },
    DeltaSent {
        session: usize,
        item: String,
        bytes: usize,
    },
    ResponseDone {
        session: usize,
        item: String,
        status: ItemStatus,
    },
    Truncated {
        session: usize,
        item: String,
        audio_end_ms: u64,
        audio_sent_ms: u64,
    },
    TruncateRejected {
        session: usize,
        item: String,
        reason: String,
    },
    ErrorSent {
        session: usize,
        code: String,
    },
    Closed {
        session: usize,
    },
}

struct Shared {
    opts: RealtimeOpts,
    rec: Recorder<RealtimeState, RealtimeEvent>,
    token: CancellationToken,
}

pub struct FakeRealtime {
    shared: Arc<Shared>,
    guard: ServerGuard,
}

impl FakeRealtime {
    pub async fn start(opts: RealtimeOpts) -> FakeRealtime {
        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            opts,
            rec: Recorder::new(RealtimeState::default()),
            token: token.clone(),
        });
        let router = Router::new()
            .route("/v1/realtime", get(upgrade))
            .with_state(shared.clone());
        let (listener, _) = super::bind().await;
        let guard = super::serve(listener, router, token);
        FakeRealtime { shared, guard }
    }

    /// `ws://127.0.0.1:PORT/v1/realtime`; voicectl appends `?model=…`.
    pub fn url(&self) -> String {
        format!("ws://{}/v1/realtime", self.guard.addr)
    }

    pub fn opts(&self) -> &RealtimeOpts {
        &self.shared.opts
    }

    /// The recorded state. Do not hold the guard across an await.
    pub fn state(&self) -> std::sync::MutexGuard<'_, RealtimeState> {
        self.shared.rec.lock()
    }

    /// A copy of session `i` (0-based, in order of upgrade). Panics if there is none.
    pub fn session(&self, i: usize) -> Session {
        self.state()
            .sessions
            .get(i)
            .cloned()
            .unwrap_or_else(|| panic!("no realtime session {i}"))
    }

    pub fn sessions(&self) -> Vec<Session> {
        self.state().sessions.clone()
    }

    /// Sockets open right now.
    pub fn open_sessions(&self) -> usize {
        self.state().open
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RealtimeEvent> {
        self.shared.rec.subscribe()
    }

    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&RealtimeState) -> Option<T>,
    ) -> T {
        self.shared.rec.wait_until(what, timeout, f).await
    }

    /// Waits until session `i` exists and is open.
    pub async fn wait_session(&self, i: usize, timeout: Duration) -> Session {
        self.wait_until(&format!("realtime session {i} open"), timeout, |s| {
            s.sessions.get(i).filter(|s| s.open).cloned()
        })
        .await
    }

    /// Waits until at least one session was opened and none is open any more.
    pub async fn wait_all_closed(&self, timeout: Duration) {
        self.wait_until("all realtime sessions closed", timeout, |s| {
            (!s.sessions.is_empty() && s.open == 0 && s.sessions.iter().all(|x| !x.open))
                .then_some(())
        })
        .await
    }
}

fn error_body(code: &str, message: &str) -> String {
    json!({"error": {"type": "invalid_request_error", "code": code, "message": message, "param": null}})
        .to_string()
}

async fn upgrade(
    State(sh): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let reject = |status: StatusCode, code: &str, msg: &str| {
        sh.rec
            .with(|s| s.rejected.push((status.as_u16(), msg.to_owned())));
        sh.rec.emit(RealtimeEvent::Rejected {
            status: status.as_u16(),
        });
        (
            status,
            [("content-type", "application/json")],
            error_body(code, msg),
        )
            .into_response()
    };
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let expected = format!("Bearer {}", sh.opts.api_key);
    if sh.opts.fail == Some(Failure::RejectAuth) || auth != expected {
        return reject(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided.",
        );
    }
    let beta_header = headers
        .get("openai-beta")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut violations = Vec::new();
    match sh.opts.mode {
        Mode::Beta if beta_header.as_deref() != Some("realtime=v1") => {
            return reject(
                StatusCode::BAD_REQUEST,
                "missing_beta_header",
                "The beta Realtime API needs the header 'OpenAI-Beta: realtime=v1'.",
            );
        }
        Mode::Ga if beta_header.is_some() => violations.push(format!(
            "GA client sent the beta header OpenAI-Beta: {}",
            beta_header.as_deref().unwrap_or_default()
        )),
        _ => {}
    }
    let query = query.unwrap_or_default();
    let model = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "model")
        .map(|(_, v)| v.into_owned());
    if model.as_deref().is_none_or(str::is_empty) {
        violations.push("no model query parameter".into());
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let effective = default_session(sh.opts.mode, model.as_deref().unwrap_or(""));
    let index = sh.rec.with(|s| {
        let index = s.sessions.len();
        s.sessions.push(Session {
            index,
            model,
            query,
            beta_header,
            open: false,
            closed: None,
            caller_audio: Vec::new(),
            appends: 0,
            session_updates: Vec::new(),
            effective: effective.clone(),
            violations,
            config_issues: vec!["no session.update received".into()],
            client_events: Vec::new(),
            server_events: Vec::new(),
            errors_sent: Vec::new(),
            turns: Vec::new(),
            items: Vec::new(),
            truncations: Vec::new(),
            truncate_rejections: Vec::new(),
            function_calls: Vec::new(),
            function_outputs: Vec::new(),
            user_texts: Vec::new(),
        });
        index
    });
    ws.on_upgrade(move |socket| async move {
        sh.rec.with(|s| {
            s.open += 1;
            s.sessions[index].open = true;
        });
        sh.rec.emit(RealtimeEvent::SessionOpened { session: index });
        let mut conn = Conn::new(sh.clone(), index, socket, effective);
        let closed = conn.run().await;
        sh.rec.with(|s| {
            s.open -= 1;
            let sess = &mut s.sessions[index];
            sess.open = false;
            sess.closed = Some(closed);
        });
        sh.rec.emit(RealtimeEvent::Closed { session: index });
    })
}

/// The session `session.created` reports before any update: the service defaults.
fn default_session(mode: Mode, model: &str) -> Value {
    let vad = json!({"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
        "silence_duration_ms": 200, "create_response": true, "interrupt_response": true});
    match mode {
        Mode::Ga => json!({
            "type": "realtime", "object": "realtime.session", "id": "sess_fake", "model": model,
            "output_modalities": ["audio"], "instructions": "",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": null,
                          "noise_reduction": null, "turn_detection": vad},
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0}
            },
            "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": null,
            "truncation": "auto", "prompt": null, "include": null
        }),
        Mode::Beta => json!({
            "id": "sess_fake", "object": "realtime.session", "model": model,
            "modalities": ["text", "audio"], "instructions": "", "voice": "alloy",
            "input_audio_format": "pcm16", "output_audio_format": "pcm16",
            "input_audio_transcription": null, "turn_detection": vad, "tools": [],
            "tool_choice": "auto", "temperature": 0.8, "max_response_output_tokens": "inf"
        }),
    }
}

const GA_TOP: &[&str] = &[
    "type",
    "model",
    "output_modalities",
    "instructions",
    "audio",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "tracing",
    "truncation",
    "prompt",
    "include",
];
const GA_INPUT: &[&str] = &[
    "format",
    "noise_reduction",
    "transcription",
    "turn_detection",
];
const GA_OUTPUT: &[&str] = &["format", "voice", "speed"];
const BETA_TOP: &[&str] = &[
    "model",
    "modalities",
    "instructions",
    "voice",
    "input_audio_format",
    "output_audio_format",
    "input_audio_transcription",
    "input_audio_noise_reduction",
    "turn_detection",
    "tools",
    "tool_choice",
    "temperature",
    "max_response_output_tokens",
    "speed",
    "tracing",
];

/// A client-caused error: (code, message, param).
type ClientError = (&'static str, String, Option<String>);

/// Checks a `session.update` payload the way the service does: unknown parameters and bad
/// values are errors (the update is not applied).
fn check_session_update(mode: Mode, s: &Value) -> Result<(), ClientError> {
    let Some(obj) = s.as_object() else {
        return Err((
            "invalid_type",
            "Invalid type for 'session': expected an object.".into(),
            Some("session".into()),
        ));
    };
    let unknown = |path: &str, obj: &Map<String, Value>, allowed: &[&str]| {
        obj.keys()
            .find(|k| !allowed.contains(&k.as_str()))
            .map(|k| {
                (
                    "unknown_parameter",
                    format!("Unknown parameter: '{path}.{k}'."),
                    Some(format!("{path}.{k}")),
                )
            })
    };
    let invalid = |param: &str, msg: String| Err(("invalid_value", msg, Some(param.to_owned())));
    match mode {
        Mode::Ga => {
            if let Some(e) = unknown("session", obj, GA_TOP) {
                return Err(e);
            }
            match obj.get("type").and_then(Value::as_str) {
                Some("realtime") => {}
                None => {
                    return Err((
                        "missing_required_parameter",
                        "Missing required parameter: 'session.type'.".into(),
                        Some("session.type".into()),
                    ));
                }
                Some(other) => {
                    return invalid(
                        "session.type",
                        format!(
                            "Invalid value: '{other}'. Supported values are: 'realtime' and 'transcription'."
                        ),
                    );
                }
            }
            if let Some(m) = obj.get("output_modalities") {
                let ok = m == &json!(["audio"]) || m == &json!(["text"]);
                if !ok {
                    return invalid(
                        "session.output_modalities",
                        format!(
                            "Invalid modalities: {m}. Supported combinations are: ['text'] and ['audio']."
                        ),
                    );
                }
            }
            if let Some(audio) = obj.get("audio") {
                let Some(audio) = audio.as_object() else {
                    return invalid("session.audio", "expected an object".into());
                };
                if let Some(e) = unknown("session.audio", audio, &["input", "output"]) {
                    return Err(e);
                }
                for (dir, allowed) in [("input", GA_INPUT), ("output", GA_OUTPUT)] {
                    let Some(d) = audio.get(dir) else { continue };
                    let Some(d) = d.as_object() else {
                        return invalid(
                            &format!("session.audio.{dir}"),
                            "expected an object".into(),
                        );
                    };
                    if let Some(e) = unknown(&format!("session.audio.{dir}"), d, allowed) {
                        return Err(e);
                    }
                    if let Some(f) = d.get("format") {
                        let t = f.get("type").and_then(Value::as_str).unwrap_or("");
                        if !["audio/pcm", "audio/pcmu", "audio/pcma"].contains(&t) {
                            return invalid(
                                &format!("session.audio.{dir}.format.type"),
                                format!(
                                    "Invalid value: {f}. Supported values are: 'audio/pcm', 'audio/pcmu', and 'audio/pcma'."
                                ),
                            );
                        }
                    }
                    if let Some(td) = d.get("turn_detection") {
                        check_turn_detection(td, &format!("session.audio.{dir}.turn_detection"))?;
                    }
                    if let Some(v) = d.get("voice") {
                        let ok = v.as_str().is_some_and(|s| !s.is_empty())
                            || v.get("id").and_then(Value::as_str).is_some();
                        if !ok {
                            return invalid(
                                "session.audio.output.voice",
                                format!("Invalid voice {v}."),
                            );
                        }
                    }
                }
            }
        }
        Mode::Beta => {
            if let Some(e) = unknown("session", obj, BETA_TOP) {
                return Err(e);
            }
            for key in ["input_audio_format", "output_audio_format"] {
                if let Some(f) = obj.get(key) {
                    let t = f.as_str().unwrap_or("");
                    if !["pcm16", "g711_ulaw", "g711_alaw"].contains(&t) {
                        return invalid(
                            &format!("session.{key}"),
                            format!(
                                "Invalid value: {f}. Supported values are: 'pcm16', 'g711_ulaw', and 'g711_alaw'."
                            ),
                        );
                    }
                }
            }
            if let Some(m) = obj.get("modalities") {
                let ok = m == &json!(["text"])
                    || m == &json!(["text", "audio"])
                    || m == &json!(["audio", "text"]);
                if !ok {
                    return invalid(
                        "session.modalities",
                        format!(
                            "Invalid modalities: {m}. Supported combinations are: ['text'] and ['audio', 'text']."
                        ),
                    );
                }
            }
            if let Some(td) = obj.get("turn_detection") {
                check_turn_detection(td, "session.turn_detection")?;
            }
            if let Some(v) = obj.get("voice")
                && v.as_str().is_none_or(|s| s.is_empty())
            {
                return invalid("session.voice", format!("Invalid voice {v}."));
            }
        }
    }
    if let Some(i) = obj.get("instructions")
        && !i.is_string()
    {
        return Err((
            "invalid_type",
            "Invalid type for 'session.instructions': expected a string.".into(),
            Some("session.instructions".into()),
        ));
    }
    Ok(())
}

fn check_turn_detection(td: &Value, param: &str) -> Result<(), ClientError> {
    if td.is_null() {
        return Ok(());
    }
    match td.get("type").and_then(Value::as_str) {
        Some("server_vad") | Some("semantic_vad") => Ok(()),
        _ => Err((
            "invalid_value",
            format!("Invalid turn_detection {td}: type must be 'server_vad' or 'semantic_vad'."),
            Some(param.to_owned()),
        )),
    }
}

/// What a phone bridge needs from the effective session (PROTOCOLS §5.2).
fn config_issues(mode: Mode, s: &Value) -> Vec<String> {
    let mut issues = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            issues.push(what.to_owned());
        }
    };
    let str_at = |ptr: &str| s.pointer(ptr).and_then(Value::as_str).unwrap_or("");
    let nonempty = |ptr: &str| !str_at(ptr).is_empty();
    let vad_on = |ptr: &str| {
        matches!(
            s.pointer(ptr)
                .and_then(|t| t.get("type"))
                .and_then(Value::as_str),
            Some("server_vad" | "semantic_vad")
        )
    };
    let on = |ptr: &str| s.pointer(ptr).is_some_and(|v| !v.is_null());
    match mode {
        Mode::Ga => {
            want(
                str_at("/type") == "realtime",
                "session.type is not realtime",
            );
            want(
                str_at("/audio/input/format/type") == "audio/pcmu",
                "audio.input.format.type is not audio/pcmu",
            );
            want(
                str_at("/audio/output/format/type") == "audio/pcmu",
                "audio.output.format.type is not audio/pcmu",
            );
            want(
                nonempty("/audio/output/voice") || on("/audio/output/voice/id"),
                "no audio.output.voice",
            );
            want(
                vad_on("/audio/input/turn_detection"),
                "audio.input.turn_detection is off",
            );
            want(
                on("/audio/input/transcription"),
                "audio.input.transcription is off",
            );
            want(
                s.get("output_modalities") == Some(&json!(["audio"])),
                "output_modalities is not [\"audio\"]",
            );
        }
        Mode::Beta => {
            want(
                str_at("/input_audio_format") == "g711_ulaw",
                "input_audio_format is not g711_ulaw",
            );
            want(
                str_at("/output_audio_format") == "g711_ulaw",
                "output_audio_format is not g711_ulaw",
            );
            want(nonempty("/voice"), "no voice");
            want(vad_on("/turn_detection"), "turn_detection is off");
            want(
                on("/input_audio_transcription"),
                "input_audio_transcription is off",
            );
            want(
                s.get("modalities")
                    .and_then(Value::as_array)
                    .is_some_and(|m| m.iter().any(|x| x == "audio")),
                "modalities lack audio",
            );
        }
    }
    want(nonempty("/instructions"), "no instructions");
    issues
}

/// What a model told `Say exactly this: "…"` says: the quoted text if there is one, else all.
fn quoted_or_all(instructions: &str) -> String {
    match (instructions.find('"'), instructions.rfind('"')) {
        (Some(a), Some(b)) if b > a + 1 => instructions[a + 1..b].to_owned(),
        _ => instructions.to_owned(),
    }
}

fn deep_merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => deep_merge(slot, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The client went away (a send failed) or the session must end.
struct Stop(Closed);

struct Active {
    response_id: String,
    item_id: String,
    audio: Vec<u8>,
    sent: usize,
    words: Vec<String>,
    words_sent: usize,
    next_at: Instant,
}

struct Conn {
    sh: Arc<Shared>,
    index: usize,
    mode: Mode,
    socket: WebSocket,
    effective: Value,
    event_seq: u64,
    id_seq: u64,
    vad: EnergyVad,
    vad_out: Vec<VadEvent>,
    /// The user item announced by `speech_started`, committed by `speech_stopped`.
    user_item: Option<String>,
    /// The last item in the conversation (`previous_item_id`).
    last_item: Option<String>,
    active: Option<Active>,
    responses: u32,
    deltas_total: usize,
    expire_at: Option<Instant>,
    error_pending: bool,
    /// Audio appended since the last commit, in bytes (for manual commits).
    uncommitted: usize,
}

impl Conn {
    fn new(sh: Arc<Shared>, index: usize, socket: WebSocket, effective: Value) -> Conn {
        let opts = &sh.opts;
        let expire_at = match opts.fail {
            Some(Failure::SessionExpire { after_ms }) => {
                Some(Instant::now() + Duration::from_millis(after_ms))
            }
            _ => None,
        };
        let error_pending = matches!(opts.fail, Some(Failure::ErrorEvent { .. }));
        Conn {
            mode: opts.mode,
            vad: EnergyVad::new(opts.vad),
            sh,
            index,
            socket,
            effective,
            event_seq: 0,
            id_seq: 0,
            vad_out: Vec::new(),
            user_item: None,
            last_item: None,
            active: None,
            responses: 0,
            deltas_total: 0,
            expire_at,
            error_pending,
            uncommitted: 0,
        }
    }

    fn record<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        self.sh.rec.with(|s| f(&mut s.sessions[self.index]))
    }

    fn emit(&self, e: RealtimeEvent) {
        self.sh.rec.emit(e)
    }

    fn ev<'a>(&self, ga: &'a str, beta: &'a str) -> &'a str {
        match self.mode {
            Mode::Ga => ga,
            Mode::Beta => beta,
        }
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.id_seq += 1;
        format!("{prefix}_S{:02}N{:05}", self.index, self.id_seq)
    }

    async fn send_raw(&mut self, text: String) -> Result<(), Stop> {
        self.socket
            .send(Message::Text(Utf8Bytes::from(text)))
            .await
            .map_err(|_| Stop(Closed::Dropped))
    }

    /// Sends a server event, adding `event_id` and recording its type.
    async fn send(&mut self, mut v: Value) -> Result<(), Stop> {
        self.event_seq += 1;
        let event_id = format!("event_S{:02}E{:06}", self.index, self.event_seq);
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        if let Some(o) = v.as_object_mut() {
            o.insert("event_id".into(), Value::String(event_id));
        }
        if !ty.ends_with(".delta") {
            self.record(|s| s.server_events.push(ty));
        }
        self.send_raw(v.to_string()).await
    }

    async fn send_error(
        &mut self,
        code: &str,
        message: String,
        param: Option<String>,
        client_event_id: Option<String>,
    ) -> Result<(), Stop> {
        self.send_error_typed(
            "invalid_request_error",
            code,
            message,
            param,
            client_event_id,
        )
        .await
    }

    async fn send_error_typed(
        &mut self,
        error_type: &str,
        code: &str,
        message: String,
        param: Option<String>,
        client_event_id: Option<String>,
    ) -> Result<(), Stop> {
        self.record(|s| s.errors_sent.push((code.to_owned(), message.clone())));
        self.emit(RealtimeEvent::ErrorSent {
            session: self.index,
            code: code.to_owned(),
        });
        self.send(json!({"type": "error", "error": {"type": error_type,
            "code": code, "message": message, "param": param, "event_id": client_event_id}}))
            .await
    }

    /// Fires the scripted error if it is due on this occasion; `Ok(true)` if it fired.
    async fn scripted_error(&mut self, now: ErrorOn) -> Result<bool, Stop> {
        if !self.error_pending {
            return Ok(false);
        }
        let Some(Failure::ErrorEvent {
            code,
            error_type,
            on,
            close,
        }) = self.sh.opts.fail.clone()
        else {
            return Ok(false);
        };
        if on != now {
            return Ok(false);
        }
        self.error_pending = false;
        self.send_error_typed(
            &error_type,
            &code,
            format!("Scripted failure: {code}"),
            None,
            None,
        )
        .await?;
        if close {
            return Err(self.close(1011, "server_error").await);
        }
        Ok(true)
    }

    async fn close(&mut self, code: u16, reason: &str) -> Stop {
        super::close_ws(&mut self.socket, code, reason).await;
        Stop(Closed::ByServer(code, reason.to_owned()))
    }

    async fn run(&mut self) -> Closed {
        match self.run_inner().await {
            Ok(never) => match never {},
            Err(Stop(c)) => c,
        }
    }

    async fn run_inner(&mut self) -> Result<std::convert::Infallible, Stop> {
        let silent = self.sh.opts.fail == Some(Failure::NeverAnswer);
        if !silent {
            let session = self.effective.clone();
            self.send(json!({"type": "session.created", "session": session}))
                .await?;
            if self.sh.opts.fail == Some(Failure::Garbage) {
                self.send_raw("<html><body>502 Bad Gateway</body></html>".into())
                    .await?;
            }
        }
        let token = self.sh.token.clone();
        loop {
            let deadline = [self.active.as_ref().map(|a| a.next_at), self.expire_at]
                .into_iter()
                .flatten()
                .min();
            let msg = tokio::select! {
                _ = token.cancelled() => return Err(self.close(1001, "server shutting down").await),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.on_timer().await?;
                    continue;
                }
                msg = self.socket.recv() => msg,
            };
            match msg {
                None | Some(Err(_)) => return Err(Stop(Closed::Dropped)),
                Some(Ok(Message::Close(frame))) => {
                    return Err(Stop(Closed::ByClient(frame.map(|f| f.code))));
                }
                Some(Ok(Message::Text(t))) => {
                    if silent {
                        self.record_silently(&t);
                    } else {
                        self.on_text(&t).await?;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    self.record(|s| s.violations.push("binary frame from client".into()));
                    if !silent {
                        self.send_error(
                            "invalid_request_error",
                            "Binary frames are not supported.".into(),
                            None,
                            None,
                        )
                        .await?;
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    }

    async fn on_timer(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if self.expire_at.is_some_and(|t| t <= now) {
            return Err(self
                .close(1001, "Your session hit the maximum duration of 60 minutes.")
                .await);
        }
        if self.active.as_ref().is_some_and(|a| a.next_at <= now) {
            self.send_next_delta().await?;
        }
        Ok(())
    }

    /// NeverAnswer: record what arrives, answer nothing.
    fn record_silently(&mut self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        if ty == "input_audio_buffer.append" {
            if let Some(bytes) = v["audio"].as_str().and_then(|a| B64.decode(a).ok()) {
                self.record(|s| {
                    s.appends += 1;
                    s.caller_audio.extend_from_slice(&bytes)
                });
            }
        } else {
            self.record(|s| s.client_events.push(ty));
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Stop> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.record(|s| s.violations.push(format!("non-JSON client message: {e}")));
                return self
                    .send_error(
                        "invalid_json",
                        format!("The server could not parse the JSON: {e}"),
                        None,
                        None,
                    )
                    .await;
            }
        };
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        let client_event_id = v["event_id"].as_str().map(str::to_owned);
        if ty != "input_audio_buffer.append" {
            self.record(|s| s.client_events.push(ty.clone()));
        }
        match ty.as_str() {
            "session.update" => self.on_session_update(&v, client_event_id).await,
            "input_audio_buffer.append" => self.on_append(&v, client_event_id).await,
            "input_audio_buffer.commit" => self.on_commit(client_event_id).await,
            "input_audio_buffer.clear" => {
                self.uncommitted = 0;
                self.send(json!({"type": "input_audio_buffer.cleared"}))
                    .await
            }
            "conversation.item.create" => self.on_item_create(&v, client_event_id).await,
            "conversation.item.truncate" => self.on_truncate(&v, client_event_id).await,
            "response.create" => {
                if self.active.is_some() {
                    self.send_error(
                        "conversation_already_has_active_response",
                        "Conversation already has an active response in progress.".into(),
                        None,
                        client_event_id,
                    )
                    .await
                } else {
                    // The fake "says" what it is told; otherwise a greeting, then a stock line.
                    let n = self.responses + 1;
                    let text = match v["response"]["instructions"].as_str() {
                        Some(i) if !i.is_empty() => quoted_or_all(i),
                        _ if self.responses == 0 => self.sh.opts.greeting_text.clone(),
                        _ => format!("Fake realtime response {n}."),
                    };
                    self.start_response(self.sh.opts.greeting_ms, text).await
                }
            }
            "response.cancel" => {
                let wanted = v["response_id"].as_str();
                let matches = self
                    .active
                    .as_ref()
                    .is_some_and(|a| wanted.is_none_or(|w| w == a.response_id));
                if matches {
                    self.cancel_active("client_cancelled").await
                } else {
                    self.send_error(
                        "response_cancel_not_active",
                        "Cancellation failed: no active response found.".into(),
                        None,
                        client_event_id,
                    )
                    .await
                }
            }
            other => {
                let why = if other == "output_audio_buffer.clear" {
                    "output_audio_buffer.clear is WebRTC/SIP only".to_owned()
                } else {
                    format!("unknown client event type {other:?}")
                };
                self.record(|s| s.violations.push(why));
                self.send_error(
                    "invalid_value",
                    format!("Invalid value: '{other}'."),
                    Some("type".into()),
                    client_event_id,
                )
                .await
            }
        }
    }

    async fn on_session_update(
        &mut self,
        v: &Value,
        client_event_id: Option<String>,
    ) -> Result<(), Stop> {
        let update = v.get("session").cloned().unwrap_or(Value::Null);
        self.record(|s| s.session_updates.push(update.clone()));
        if self.scripted_error(ErrorOn::SessionUpdate).await? {
            return Ok(());
        }
        if let Err((code, msg, param)) = check_session_update(self.mode, &update) {
            self.record(|s| s.violations.push(format!("session.update: {msg}")));
            return self.send_error(code, msg, param, client_event_id).await;
        }
        deep_merge(&mut self.effective, &update);
        let issues = config_issues(self.mode, &self.effective);
        let effective = self.effective.clone();
        self.record(|s| {
            s.effective = effective.clone();
            s.config_issues = issues;
        });
        self.send(json!({"type": "session.updated", "session": effective}))
            .await?;
        self.emit(RealtimeEvent::SessionUpdated {
            session: self.index,
        });
        Ok(())
    }

    fn turn_detection(&self) -> &Value {
        let ptr = match self.mode {
            Mode::Ga => "/audio/input/turn_detection",
            Mode::Beta => "/turn_detection",
        };
        self.effective.pointer(ptr).unwrap_or(&Value::Null)
    }

    async fn on_append(&mut self, v: &Value, client_event_id: Option<String>) -> Result<(), Stop> {
        let Some(bytes) = v["audio"].as_str().and_then(|a| B64.decode(a).ok()) else {
            self.record(|s| {
                s.violations
                    .push("input_audio_buffer.append without base64 audio".into())
            });
            return self
                .send_error(
                    "invalid_value",
                    "Invalid 'audio'. Expected base64-encoded audio bytes.".into(),
                    Some("audio".into()),
                    client_event_id,
                )
                .await;
        };
        self.record(|s| {
            s.appends += 1;
            s.caller_audio.extend_from_slice(&bytes);
        });
        self.uncommitted += bytes.len();
        self.emit(RealtimeEvent::AudioAppended {
            session: self.index,
            bytes: bytes.len(),
        });
        if self.turn_detection().is_null() {
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.vad_out);
        self.vad.push_mulaw(&bytes, &mut out);
        for ev in out.drain(..) {
            match ev {
                VadEvent::Started { start_ms } => self.on_speech_started(start_ms).await?,
                VadEvent::Stopped { start_ms, end_ms } => {
                    self.on_speech_stopped(start_ms, end_ms).await?
                }
            }
        }
        self.vad_out = out;
        Ok(())
    }

    async fn on_speech_started(&mut self, start_ms: u64) -> Result<(), Stop> {
        let item_id = self.new_id("item");
        self.user_item = Some(item_id.clone());
        self.record(|s| {
            s.turns.push(CallerTurn {
                item_id: item_id.clone(),
                audio_start_ms: start_ms,
                audio_end_ms: None,
                transcript: None,
            })
        });
        self.send(json!({"type": "input_audio_buffer.speech_started",
            "audio_start_ms": start_ms, "item_id": item_id}))
            .await?;
        self.emit(RealtimeEvent::SpeechStarted {
            session: self.index,
            item: item_id,
            audio_start_ms: start_ms,
        });
        let interrupt = self.turn_detection()["interrupt_response"] != json!(false);
        if interrupt && self.active.is_some() {
            self.cancel_active("turn_detected").await?;
        }
        Ok(())
    }

    fn user_item_json(&self, item_id: &str, transcript: Option<&str>) -> Value {
        json!({"id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [{"type": "input_audio", "transcript": transcript}]})
    }

    /// `conversation.item.created` (beta) or `conversation.item.added` + `.done` (GA).
    async fn announce_item(&mut self, item: Value, done_too: bool) -> Result<(), Stop> {
        let prev = self.last_item.clone();
        self.last_item = item["id"].as_str().map(str::to_owned);
        match self.mode {
            Mode::Beta => {
                self.send(json!({"type": "conversation.item.created",
                    "previous_item_id": prev, "item": item}))
                    .await
            }
            Mode::Ga => {
                self.send(json!({"type": "conversation.item.added",
                    "previous_item_id": prev, "item": item.clone()}))
                    .await?;
                if done_too {
                    self.send(json!({"type": "conversation.item.done",
                        "previous_item_id": prev, "item": item}))
                        .await?;
                }
                Ok(())
            }
        }
    }

    async fn on_speech_stopped(&mut self, start_ms: u64, end_ms: u64) -> Result<(), Stop> {
        let item_id = match self.user_item.take() {
            Some(id) => id,
            None => self.new_id("item"),
        };
        self.uncommitted = 0;
        self.send(json!({"type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": end_ms, "item_id": item_id}))
            .await?;
        self.emit(RealtimeEvent::SpeechStopped {
            session: self.index,
            item: item_id.clone(),
            audio_end_ms: end_ms,
        });
        self.send(json!({"type": "input_audio_buffer.committed",
            "previous_item_id": self.last_item, "item_id": item_id}))
            .await?;
        let item = self.user_item_json(&item_id, None);
        self.announce_item(item, true).await?;
        let turn_no = self.record(|s| s.turns.len());
        let transcript = format!(
            "caller turn {turn_no} ({:.1} s)",
            (end_ms - start_ms) as f64 / 1000.0
        );
        self.record(|s| {
            if let Some(t) = s.turns.iter_mut().rev().find(|t| t.item_id == item_id) {
                t.audio_end_ms = Some(end_ms);
                t.transcript = Some(transcript.clone());
            }
        });
        let mut done = json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": transcript});
        if self.mode == Mode::Ga {
            done["usage"] =
                json!({"type": "duration", "seconds": (end_ms - start_ms) as f64 / 1000.0});
        }
        self.send(done).await?;
        let create = self.turn_detection()["create_response"] != json!(false);
        let call = self
            .sh
            .opts
            .function_call
            .clone()
            .filter(|f| f.on_turn == turn_no);
        if let Some(f) = call.filter(|_| create && self.active.is_none()) {
            return self.function_call_response(f).await;
        }
        if create && self.active.is_none() {
            let text = format!("Fake realtime reply {}.", self.responses + 1);
            self.start_response(self.sh.opts.reply_ms, text).await?;
        }
        Ok(())
    }

    async fn on_commit(&mut self, client_event_id: Option<String>) -> Result<(), Stop> {
        if self.uncommitted < 800 {
            return self
                .send_error(
                    "input_audio_buffer_commit_empty",
                    format!(
                        "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but buffer only has {}ms of audio.",
                        self.uncommitted / 8
                    ),
                    None,
                    client_event_id,
                )
                .await;
        }
        self.uncommitted = 0;
        let item_id = self.new_id("item");
        self.send(json!({"type": "input_audio_buffer.committed",
            "previous_item_id": self.last_item, "item_id": item_id}))
            .await?;
        let item = self.user_item_json(&item_id, None);
        self.announce_item(item, true).await
    }

    async fn on_item_create(
        &mut self,
        v: &Value,
        client_event_id: Option<String>,
    ) -> Result<(), Stop> {
        let Some(mut item) = v.get("item").filter(|i| i.is_object()).cloned() else {
            return self
                .send_error(
                    "missing_required_parameter",
                    "Missing required parameter: 'item'.".into(),
                    Some("item".into()),
                    client_event_id,
                )
                .await;
        };
        let id = match item["id"].as_str() {
            Some(id) => id.to_owned(),
            None => self.new_id("item"),
        };
        if item["type"] == "message" && item["role"] == "user" {
            let parts = item["content"].as_array().cloned().unwrap_or_default();
            let texts: Vec<String> = parts
                .iter()
                .filter(|p| p["type"] == "input_text")
                .filter_map(|p| p["text"].as_str().map(str::to_owned))
                .collect();
            if parts.is_empty() || texts.len() != parts.len() {
                self.record(|s| {
                    s.violations.push(format!(
                        "user message without only input_text parts: {item}"
                    ))
                });
            }
            self.record(|s| s.user_texts.push(texts.join(" ")));
        }
        if item["type"] == "function_call_output" {
            let known = item["call_id"].as_str().is_some_and(|c| {
                self.record(|s| s.function_calls.iter().any(|(id, _, _)| id == c))
            });
            if !known {
                self.record(|s| {
                    s.violations
                        .push(format!("function_call_output for an unknown call: {item}"))
                });
            }
            let got = item.clone();
            self.record(|s| s.function_outputs.push(got));
        }
        item["id"] = json!(id);
        item["object"] = json!("realtime.item");
        item["status"] = json!("completed");
        self.announce_item(item, true).await
    }

    /// A response whose only output is a function call, streamed like the real service:
    /// the item, the argument deltas, `.done`, then `response.done` (no audio).
    async fn function_call_response(&mut self, f: FunctionCallOpts) -> Result<(), Stop> {
        self.responses += 1;
        let rid = self.new_id("resp");
        let item_id = self.new_id("item");
        let call_id = self.new_id("call");
        self.record(|s| {
            s.function_calls
                .push((call_id.clone(), f.name.clone(), f.arguments.clone()))
        });
        self.send(json!({"type": "response.created", "response": {
            "id": rid, "object": "realtime.response", "status": "in_progress",
            "status_details": null, "output": [], "usage": null}}))
            .await?;
        let item = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
            "status": "in_progress", "name": f.name, "call_id": call_id, "arguments": ""});
        self.send(
            json!({"type": "response.output_item.added", "response_id": rid,
            "output_index": 0, "item": item.clone()}),
        )
        .await?;
        self.announce_item(item, false).await?;
        let chars: Vec<char> = f.arguments.chars().collect();
        for part in chars.chunks(8) {
            let delta: String = part.iter().collect();
            self.send(json!({"type": "response.function_call_arguments.delta",
                "response_id": rid, "item_id": item_id, "output_index": 0,
                "call_id": call_id, "delta": delta}))
                .await?;
        }
        self.send(json!({"type": "response.function_call_arguments.done",
            "response_id": rid, "item_id": item_id, "output_index": 0,
            "call_id": call_id, "name": f.name, "arguments": f.arguments}))
            .await?;
        let done = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
            "status": "completed", "name": f.name, "call_id": call_id, "arguments": f.arguments});
        self.send(
            json!({"type": "response.output_item.done", "response_id": rid,
            "output_index": 0, "item": done.clone()}),
        )
        .await?;
        if self.mode == Mode::Ga {
            self.send(json!({"type": "conversation.item.done", "previous_item_id": null, "item": done.clone()}))
                .await?;
        }
        self.send(json!({"type": "response.done", "response": {
            "id": rid, "object": "realtime.response", "status": "completed",
            "status_details": null, "output": [done],
            "usage": {"total_tokens": 60, "input_tokens": 40, "output_tokens": 20}}}))
            .await
    }

    async fn start_response(&mut self, ms: u64, text: String) -> Result<(), Stop> {
        if self.scripted_error(ErrorOn::FirstResponse).await? {
            return Ok(());
        }
        self.responses += 1;
        let n = self.responses;
        let response_id = self.new_id("resp");
        let item_id = self.new_id("item");
        let planned = (ms * 8) as usize;
        self.record(|s| {
            s.items.push(AgentItem {
                item_id: item_id.clone(),
                response_id: response_id.clone(),
                n,
                planned_bytes: planned,
                audio: Vec::new(),
                deltas: 0,
                transcript: String::new(),
                status: ItemStatus::InProgress,
                truncated_at_ms: None,
            })
        });
        self.send(json!({"type": "response.created", "response": {
            "id": response_id, "object": "realtime.response", "status": "in_progress",
            "status_details": null, "output": [], "usage": null}}))
            .await?;
        self.emit(RealtimeEvent::ResponseStarted {
            session: self.index,
            response: response_id.clone(),
            item: item_id.clone(),
        });
        let item = json!({"id": item_id, "object": "realtime.item", "type": "message",
            "status": "in_progress", "role": "assistant", "content": []});
        self.send(
            json!({"type": "response.output_item.added", "response_id": response_id,
            "output_index": 0, "item": item.clone()}),
        )
        .await?;
        self.announce_item(item, false).await?;
        self.send(
            json!({"type": "response.content_part.added", "response_id": response_id,
            "item_id": item_id, "output_index": 0, "content_index": 0,
            "part": {"type": "audio", "transcript": ""}}),
        )
        .await?;
        self.active = Some(Active {
            response_id,
            item_id,
            audio: agent_mulaw(n, planned),
            sent: 0,
            words: word_deltas(&text),
            words_sent: 0,
            next_at: Instant::now() + Duration::from_millis(self.sh.opts.response_latency_ms),
        });
        Ok(())
    }

    async fn send_next_delta(&mut self) -> Result<(), Stop> {
        let chunk_bytes = (self.sh.opts.chunk_ms.max(1) * 8) as usize;
        let interval = Duration::from_millis(self.sh.opts.chunk_interval_ms);
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let end = (a.sent + chunk_bytes).min(a.audio.len());
        let chunk = a.audio[a.sent..end].to_vec();
        a.sent = end;
        a.next_at += interval;
        // Transcript words keep pace with the audio.
        let words_due = if a.audio.is_empty() {
            a.words.len()
        } else {
            (a.words.len() * a.sent).div_ceil(a.audio.len())
        };
        let words: Vec<String> = a.words[a.words_sent..words_due].to_vec();
        a.words_sent = words_due;
        let (response_id, item_id, finished) = (
            a.response_id.clone(),
            a.item_id.clone(),
            a.sent >= a.audio.len(),
        );
        if !chunk.is_empty() {
            let ty = self.ev("response.output_audio.delta", "response.audio.delta");
            self.send(
                json!({"type": ty, "response_id": response_id, "item_id": item_id,
                "output_index": 0, "content_index": 0, "delta": B64.encode(&chunk)}),
            )
            .await?;
            self.deltas_total += 1;
            let bytes = chunk.len();
            self.record(|s| {
                if let Some(i) = s.items.iter_mut().rev().find(|i| i.item_id == item_id) {
                    i.audio.extend_from_slice(&chunk);
                    i.deltas += 1;
                }
            });
            self.emit(RealtimeEvent::DeltaSent {
                session: self.index,
                item: item_id.clone(),
                bytes,
            });
        }
        for w in words {
            let ty = self.ev(
                "response.output_audio_transcript.delta",
                "response.audio_transcript.delta",
            );
            self.send(
                json!({"type": ty, "response_id": response_id, "item_id": item_id,
                "output_index": 0, "content_index": 0, "delta": w}),
            )
            .await?;
            self.record(|s| {
                if let Some(i) = s.items.iter_mut().rev().find(|i| i.item_id == item_id) {
                    i.transcript.push_str(&w);
                }
            });
        }
        if let Some(Failure::CloseMidResponse { after_deltas }) = self.sh.opts.fail
            && self.deltas_total >= after_deltas
        {
            return Err(self.close(1011, "server_error").await);
        }
        if finished {
            self.finish_active().await?;
        }
        Ok(())
    }

    fn content_type(&self) -> &'static str {
        match self.mode {
            Mode::Ga => "output_audio",
            Mode::Beta => "audio",
        }
    }

    async fn finish_active(&mut self) -> Result<(), Stop> {
        let Some(a) = self.active.take() else {
            return Ok(());
        };
        let transcript = a.words.concat();
        let (rid, iid) = (a.response_id.clone(), a.item_id.clone());
        let ty = self.ev("response.output_audio.done", "response.audio.done");
        self.send(json!({"type": ty, "response_id": rid, "item_id": iid,
            "output_index": 0, "content_index": 0}))
            .await?;
        let ty = self.ev(
            "response.output_audio_transcript.done",
            "response.audio_transcript.done",
        );
        self.send(json!({"type": ty, "response_id": rid, "item_id": iid,
            "output_index": 0, "content_index": 0, "transcript": transcript}))
            .await?;
        self.send(
            json!({"type": "response.content_part.done", "response_id": rid,
            "item_id": iid, "output_index": 0, "content_index": 0,
            "part": {"type": "audio", "transcript": transcript}}),
        )
        .await?;
        let item = json!({"id": iid, "object": "realtime.item", "type": "message",
            "status": "completed", "role": "assistant",
            "content": [{"type": self.content_type(), "transcript": transcript}]});
        self.send(
            json!({"type": "response.output_item.done", "response_id": rid,
            "output_index": 0, "item": item.clone()}),
        )
        .await?;
        if self.mode == Mode::Ga {
            self.send(json!({"type": "conversation.item.done", "previous_item_id": null, "item": item.clone()}))
                .await?;
        }
        self.send(json!({"type": "response.done", "response": {
            "id": rid, "object": "realtime.response", "status": "completed",
            "status_details": null, "output": [item],
            "usage": {"total_tokens": 100, "input_tokens": 40, "output_tokens": 60}}}))
            .await?;
        self.send(json!({"type": "rate_limits.updated", "rate_limits": [
            {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 60},
            {"name": "tokens", "limit": 100000, "remaining": 99900, "reset_seconds": 60}]}))
            .await?;
        self.set_status(&iid, ItemStatus::Completed);
        Ok(())
    }

    fn set_status(&self, item_id: &str, status: ItemStatus) {
        self.record(|s| {
            if let Some(i) = s.items.iter_mut().rev().find(|i| i.item_id == item_id) {
                i.status = status;
            }
        });
        self.emit(RealtimeEvent::ResponseDone {
            session: self.index,
            item: item_id.to_owned(),
            status,
        });
    }

    async fn cancel_active(&mut self, reason: &'static str) -> Result<(), Stop> {
        let Some(a) = self.active.take() else {
            return Ok(());
        };
        let transcript = a.words[..a.words_sent].concat();
        let item = json!({"id": a.item_id, "object": "realtime.item", "type": "message",
            "status": "incomplete", "role": "assistant",
            "content": [{"type": self.content_type(), "transcript": transcript}]});
        self.send(json!({"type": "response.done", "response": {
            "id": a.response_id, "object": "realtime.response", "status": "cancelled",
            "status_details": {"type": "cancelled", "reason": reason}, "output": [item],
            "usage": {"total_tokens": 50, "input_tokens": 40, "output_tokens": 10}}}))
            .await?;
        self.set_status(&a.item_id, ItemStatus::Cancelled(reason));
        Ok(())
    }

    async fn on_truncate(
        &mut self,
        v: &Value,
        client_event_id: Option<String>,
    ) -> Result<(), Stop> {
        let item_id = v["item_id"].as_str().unwrap_or("").to_owned();
        let audio_end_ms = v["audio_end_ms"].as_u64();
        let content_index = v["content_index"].as_u64();
        let found = self.record(|s| {
            if let Some(i) = s.item(&item_id) {
                Ok(i.audio.len())
            } else {
                Err(s.turns.iter().any(|t| t.item_id == item_id))
            }
        });
        let rejection = match (found, audio_end_ms) {
            (Err(true), _) => Some((None, "Only assistant messages can be truncated.".to_owned())),
            (Err(false), _) => Some((
                None,
                format!("Invalid 'item_id': no item with id '{item_id}' in the conversation."),
            )),
            (Ok(sent), _) if content_index != Some(0) => Some((
                Some(sent as u64 / 8),
                "Invalid 'content_index': must be 0 for audio.".to_owned(),
            )),
            (Ok(sent), None) => Some((
                Some(sent as u64 / 8),
                "Invalid 'audio_end_ms': expected a non-negative integer.".to_owned(),
            )),
            (Ok(sent), Some(end)) if end.saturating_mul(8) > sent as u64 => Some((
                Some(sent as u64 / 8),
                format!(
                    "Audio content of {}ms is already shorter than {end}ms",
                    sent as u64 / 8
                ),
            )),
            (Ok(_), Some(_)) => None,
        };
        if let Some((sent_ms, reason)) = rejection {
            self.record(|s| {
                s.truncate_rejections.push(TruncateRejection {
                    item_id: item_id.clone(),
                    audio_end_ms,
                    audio_sent_ms: sent_ms,
                    reason: reason.clone(),
                })
            });
            self.emit(RealtimeEvent::TruncateRejected {
                session: self.index,
                item: item_id,
                reason: reason.clone(),
            });
            return self
                .send_error("invalid_value", reason, None, client_event_id)
                .await;
        }
        let end = audio_end_ms.unwrap_or(0);
        let sent_ms = self.record(|s| {
            let sent_ms = s.item(&item_id).map_or(0, AgentItem::sent_ms);
            if let Some(i) = s.items.iter_mut().find(|i| i.item_id == item_id) {
                i.truncated_at_ms = Some(end);
            }
            s.truncations.push(Truncation {
                item_id: item_id.clone(),
                audio_end_ms: end,
                audio_sent_ms: sent_ms,
                at: Instant::now(),
            });
            sent_ms
        });
        self.send(
            json!({"type": "conversation.item.truncated", "item_id": item_id,
            "content_index": 0, "audio_end_ms": end}),
        )
        .await?;
        self.emit(RealtimeEvent::Truncated {
            session: self.index,
            item: item_id,
            audio_end_ms: end,
            audio_sent_ms: sent_ms,
        });
        Ok(())
    }
}

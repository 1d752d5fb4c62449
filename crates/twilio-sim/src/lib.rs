//! A faithful in-process Twilio: the REST API for calls, call progress with signed status
//! callbacks, TwiML execution, and the Twilio side of bidirectional Media Streams with a
//! real-time playback model and a scripted caller (PROTOCOLS §1–3, §6).
//!
//! Used by `voicectl serve --dev` (a full call with no Twilio account), by integration tests
//! that drive the real server against it, and as a load generator (one task per call for
//! media, one idle-most-of-the-time task per call for callbacks).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use twilio_sim::SimConfig;
//! let sim = twilio_sim::start(SimConfig::default()).await?;
//! // twilio.api_base_url = sim.base_url(), account_sid/auth_token from the config.
//! # Ok(()) }
//! ```

mod call;
mod model;
pub mod mulaw;
mod rest;
mod script;
pub mod signature;
mod stream;
pub mod twiml;
mod webhook;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use model::{
    CallStatus, CallbackKind, CallbackRecord, ClearRecord, CloseSide, DIAL_TALK, DialRecord,
    Direction, EndReason, MarkRecord, RestLogEntry, SimCallRecord, SimError, SimEvent, SpeechSpan,
    StreamClose, StreamRecord, WebhookRecord,
};
pub use script::{CallerScript, Step};

/// How the callee of an outbound call behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// Rings for `Timing::answer`, then answers; `caller` drives the media stream.
    /// `answered_by` is what machine detection reports (default `human`) when the call
    /// asked for `MachineDetection`.
    Answer {
        caller: CallerScript,
        answered_by: Option<String>,
    },
    /// Busy (SIP 486) without ringing.
    Busy,
    /// Rings until the call's `Timeout`, then `no-answer` (SIP 487).
    NoAnswer,
    /// Unreachable (SIP 404) without ringing.
    Failed,
    /// Rings until canceled or hung up, ignoring `Timeout`.
    RingForever,
}

impl Scenario {
    pub fn answer(caller: CallerScript) -> Self {
        Self::Answer {
            caller,
            answered_by: None,
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self::answer(CallerScript::conversation())
    }
}

/// Delays of the simulated network. [`Timing::fast`] (the default) keeps tests quick;
/// [`Timing::realistic`] feels like a phone call in dev mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// queued → initiated (leaving Twilio's queue).
    pub dial: Duration,
    /// initiated → ringing (or → busy/failed).
    pub ring: Duration,
    /// ringing → answered, for `Scenario::Answer`.
    pub answer: Duration,
    /// answered → machine detection result.
    pub amd: Duration,
    /// Speaking time per character of `<Say>` text.
    pub say_per_char: Duration,
    /// Total time allowed for a webhook response (Twilio: 15 s, error 11205).
    pub webhook_timeout: Duration,
    /// How long to wait for the app's close frame after the simulator closes a stream.
    pub close_grace: Duration,
    /// `TimeLimit` when the request gives none (Twilio: 4 h).
    pub default_time_limit: Duration,
}

impl Timing {
    pub fn fast() -> Self {
        Self {
            dial: Duration::from_millis(10),
            ring: Duration::from_millis(20),
            answer: Duration::from_millis(60),
            amd: Duration::from_millis(50),
            say_per_char: Duration::from_millis(2),
            webhook_timeout: Duration::from_secs(15),
            close_grace: Duration::from_millis(500),
            default_time_limit: Duration::from_secs(4 * 3600),
        }
    }

    pub fn realistic() -> Self {
        Self {
            dial: Duration::from_millis(300),
            ring: Duration::from_millis(700),
            answer: Duration::from_millis(2500),
            amd: Duration::from_millis(1800),
            say_per_char: Duration::from_millis(65),
            ..Self::fast()
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self::fast()
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the REST API listens; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    pub account_sid: String,
    pub auth_token: String,
    /// The callee's behaviour for numbers without a [`SimHandle::set_scenario`].
    pub default_scenario: Scenario,
    /// More REST requests than this in flight at once get 429 / 20429.
    pub max_concurrent_requests: usize,
    /// Artificial latency added to every REST request (lets tests hold requests in flight).
    pub rest_latency: Duration,
    /// Deliver status callbacks out of order: each pair is swapped (1,0,3,2…), so
    /// `ringing` arrives before `initiated` and `completed` before `in-progress`.
    pub shuffle_callbacks: bool,
    pub timing: Timing,
    /// Keep agent and caller audio in call records. Turn off for load generation.
    pub record_audio: bool,
    /// `(public origin, actual origin)` pairs, e.g. `("https://voice.test",
    /// "http://127.0.0.1:8123")`: requests and stream connections to a URL under the public
    /// origin go to the actual one (`wss`→`ws`, `https`→`http`) with `X-Forwarded-Proto` /
    /// `X-Forwarded-Host`, as through a TLS-terminating proxy. Signatures always cover the
    /// public URL, as Twilio's would.
    pub origin_overrides: Vec<(String, String)>,
    /// Numbers without their own scenario behave by their last four digits (see
    /// [`convention_scenario`]), so a dev server can demonstrate every outcome.
    pub number_conventions: bool,
}

/// The dev convention for callees, by the number's last four digits: `0486` busy, `0487` no
/// answer (rings until the timeout), `0404` failed (unreachable), `0666` an answering machine
/// (a 2.5 s greeting, a beep, then 10 s of recording; `machine_end_beep` when detection was
/// asked for), `0123` a caller who presses 1 2 3 # after
/// the greeting. Other numbers: `None`.
pub fn convention_scenario(to: &str) -> Option<Scenario> {
    let tail = to.get(to.len().saturating_sub(4)..)?;
    Some(match tail {
        "0486" => Scenario::Busy,
        "0487" => Scenario::NoAnswer,
        "0404" => Scenario::Failed,
        // A greeting, the beep, then it records for a while.
        "0666" => Scenario::Answer {
            caller: CallerScript::new(vec![
                Step::Speak(2500),
                Step::Beep,
                Step::Silence(10_000),
                Step::Hangup,
            ]),
            answered_by: Some("machine_end_beep".into()),
        },
        "0123" => Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 500 },
            Step::Dtmf('1'),
            Step::Dtmf('2'),
            Step::Dtmf('3'),
            Step::Dtmf('#'),
            Step::WaitForAgentSilence { min_ms: 1500 },
            Step::Hangup,
        ])),
        _ => return None,
    })
}

impl SimConfig {
    pub fn new(account_sid: impl Into<String>, auth_token: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            account_sid: account_sid.into(),
            auth_token: auth_token.into(),
            default_scenario: Scenario::default(),
            max_concurrent_requests: 100,
            rest_latency: Duration::ZERO,
            shuffle_callbacks: false,
            timing: Timing::fast(),
            record_audio: true,
            origin_overrides: Vec::new(),
            number_conventions: false,
        }
    }
}

/// Fixed dev credentials: an `AC`+32-hex SID and a token, only meaningful to the simulator.
pub const DEV_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
pub const DEV_AUTH_TOKEN: &str = "sim-dev-auth-token";

impl Default for SimConfig {
    fn default() -> Self {
        Self::new(DEV_ACCOUNT_SID, DEV_AUTH_TOKEN)
    }
}

/// A simulated inbound call: the caller `from` dials our number `to`.
#[derive(Debug, Clone, Default)]
pub struct InboundCall {
    pub from: String,
    pub to: String,
    /// The number's voice URL, e.g. `http://127.0.0.1:PORT/twilio/voice`.
    pub voice_url: String,
    /// `POST` (default) or `GET`.
    pub method: Option<String>,
    pub caller: CallerScript,
    /// A status callback configured on the number; Twilio sends none otherwise.
    pub status_callback: Option<String>,
    pub status_callback_method: Option<String>,
    /// Subscribed events; empty means `completed` only.
    pub status_callback_events: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimHandleError {
    #[error("no simulated call {0}")]
    UnknownCall(String),
    #[error("invalid inbound call: {0}")]
    Invalid(String),
    #[error("the simulator is shut down")]
    Shutdown,
    #[error("timed out waiting for call {0} to end")]
    Timeout(String),
}

/// Starts the simulator. Everything it spawns stops when the handle is dropped.
pub async fn start(cfg: SimConfig) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let http = reqwest::Client::builder()
        // The apps we call are usually on loopback; a proxy from the environment would only
        // get in the way.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("TwilioProxy/1.1")
        .timeout(cfg.timing.webhook_timeout)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(std::io::Error::other)?;
    let (events, _) = broadcast::channel(8192);
    let shutdown = CancellationToken::new();
    let inner = Arc::new(Inner {
        addr,
        http,
        events,
        state: Mutex::new(State {
            calls: HashMap::new(),
            order: Vec::new(),
            scenarios: HashMap::new(),
            default_scenario: cfg.default_scenario.clone(),
            number_conventions: cfg.number_conventions,
            forced: VecDeque::new(),
            rest_log: Vec::new(),
            rest_latency: cfg.rest_latency,
            max_concurrent: cfg.max_concurrent_requests,
            last_callback_status: None,
        }),
        tasks: Mutex::new(Tasks {
            set: JoinSet::new(),
            closed: false,
        }),
        in_flight: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
        cfg,
    });
    let app = rest::router(inner.clone());
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "twilio simulator REST server stopped");
        }
    });
    Ok(SimHandle {
        inner,
        server: Mutex::new(Some(server)),
    })
}

pub(crate) struct Inner {
    cfg: SimConfig,
    addr: SocketAddr,
    http: reqwest::Client,
    events: broadcast::Sender<SimEvent>,
    state: Mutex<State>,
    tasks: Mutex<Tasks>,
    in_flight: AtomicUsize,
    shutdown: CancellationToken,
}

struct Tasks {
    set: JoinSet<()>,
    closed: bool,
}

struct State {
    calls: HashMap<String, Arc<CallCell>>,
    order: Vec<String>,
    scenarios: HashMap<String, Scenario>,
    default_scenario: Scenario,
    number_conventions: bool,
    forced: VecDeque<ForcedError>,
    rest_log: Vec<RestLogEntry>,
    rest_latency: Duration,
    max_concurrent: usize,
    last_callback_status: Option<u16>,
}

#[derive(Debug, Clone)]
struct ForcedError {
    status: u16,
    code: u32,
}

/// One call's shared state: the record (which holds the resource status), a way to ask the
/// call's task to end it, and a flag for "ended and all callbacks delivered".
pub(crate) struct CallCell {
    sid: String,
    created: Instant,
    rec: Mutex<SimCallRecord>,
    /// Set (once) by whoever ends the call from outside its task.
    end_tx: watch::Sender<Option<EndReason>>,
    ended_tx: watch::Sender<bool>,
    /// Digits injected with [`SimHandle::send_dtmf`], sent on the next media tick.
    dtmf: Mutex<VecDeque<char>>,
    /// The resource status first reached `ringing`/dialing: a cancel now fires callbacks.
    dialed: std::sync::atomic::AtomicBool,
    /// New instructions for a live call (`Url`/`Twiml` on a call update); the version bump
    /// wakes the call's task, which stops what it is doing and runs them.
    redirect: Mutex<Option<call::Redirect>>,
    redirect_tx: watch::Sender<u64>,
    /// A machine's beep ended on the call's stream (what `DetectMessageEnd` waits for).
    beeped: tokio::sync::Notify,
}

/// Recovers the data from a poisoned lock: a panicking test task must not take the whole
/// simulator down with it, and every critical section leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CallCell {
    fn new(sid: String, rec: SimCallRecord) -> Self {
        Self {
            sid,
            created: Instant::now(),
            rec: Mutex::new(rec),
            end_tx: watch::Sender::new(None),
            ended_tx: watch::Sender::new(false),
            dtmf: Mutex::new(VecDeque::new()),
            dialed: std::sync::atomic::AtomicBool::new(false),
            redirect: Mutex::new(None),
            redirect_tx: watch::Sender::new(0),
            beeped: tokio::sync::Notify::new(),
        }
    }

    /// Hands a live call new instructions, replacing any not yet picked up.
    fn redirect(&self, to: call::Redirect) {
        *lock(&self.redirect) = Some(to);
        self.redirect_tx.send_modify(|v| *v += 1);
    }

    fn take_redirect(&self) -> Option<call::Redirect> {
        lock(&self.redirect).take()
    }

    fn has_redirect(&self) -> bool {
        lock(&self.redirect).is_some()
    }

    fn rec(&self) -> MutexGuard<'_, SimCallRecord> {
        lock(&self.rec)
    }

    fn elapsed_ms(&self) -> u64 {
        self.created.elapsed().as_millis() as u64
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn emit(&self, ev: SimEvent) {
        // No subscribers is fine: events are for whoever is watching.
        let _ = self.events.send(ev);
    }

    /// Spawns a task that dies with the simulator.
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut t = lock(&self.tasks);
        if t.closed {
            return;
        }
        // Reap finished tasks so the set stays as small as the number of live calls.
        while t.set.try_join_next().is_some() {}
        t.set.spawn(fut);
    }

    fn call(&self, sid: &str) -> Option<Arc<CallCell>> {
        self.state().calls.get(sid).cloned()
    }

    fn insert_call(&self, cell: Arc<CallCell>) {
        let mut st = self.state();
        st.order.push(cell.sid.clone());
        st.calls.insert(cell.sid.clone(), cell);
    }

    fn scenario_for(&self, to: &str) -> Scenario {
        let st = self.state();
        if let Some(s) = st.scenarios.get(to) {
            return s.clone();
        }
        st.number_conventions
            .then(|| convention_scenario(to))
            .flatten()
            .unwrap_or_else(|| st.default_scenario.clone())
    }

    /// Ends a call from outside its task: `decide` sees the current status and picks the
    /// terminal one (or refuses with `None`), atomically with the change. The status is
    /// set now, so a fetch right after sees it; the call's task is woken to tear down and
    /// send the final callback. Returns the status the call had.
    fn end_call_with(
        &self,
        cell: &CallCell,
        decide: impl FnOnce(CallStatus) -> Option<(CallStatus, EndReason)>,
    ) -> Result<CallStatus, CallStatus> {
        let (before, to, reason) = {
            let mut rec = cell.rec();
            let before = rec.status;
            if before.is_terminal() {
                return Err(before);
            }
            let Some((to, reason)) = decide(before) else {
                return Err(before);
            };
            call::finish(&mut rec, cell.elapsed_ms(), to, reason.clone());
            (before, to, reason)
        };
        self.emit(SimEvent::StatusChanged {
            sid: cell.sid.clone(),
            status: to,
        });
        cell.end_tx.send_replace(Some(reason));
        Ok(before)
    }
}

/// A running simulator. Dropping it stops everything it started.
pub struct SimHandle {
    inner: Arc<Inner>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl SimHandle {
    /// What voicectl puts in `twilio.api_base_url`, e.g. `http://127.0.0.1:41234`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn account_sid(&self) -> &str {
        &self.inner.cfg.account_sid
    }

    pub fn auth_token(&self) -> &str {
        &self.inner.cfg.auth_token
    }

    /// How calls to `number` behave from now on.
    pub fn set_scenario(&self, number: &str, scenario: Scenario) {
        self.inner
            .state()
            .scenarios
            .insert(number.to_owned(), scenario);
    }

    pub fn set_default_scenario(&self, scenario: Scenario) {
        self.inner.state().default_scenario = scenario;
    }

    /// The next `n` create-call requests fail with this HTTP status and Twilio error code
    /// (e.g. 400/21211, 401/20003, 429/20429, 500/20500) without creating a call.
    pub fn fail_next_creates(&self, n: usize, status: u16, code: u32) {
        let mut st = self.inner.state();
        st.forced
            .extend(std::iter::repeat_n(ForcedError { status, code }, n));
    }

    pub fn set_max_concurrent_requests(&self, n: usize) {
        self.inner.state().max_concurrent = n;
    }

    pub fn set_rest_latency(&self, latency: Duration) {
        self.inner.state().rest_latency = latency;
    }

    /// Every REST request answered so far, oldest first.
    pub fn rest_log(&self) -> Vec<RestLogEntry> {
        self.inner.state().rest_log.clone()
    }

    /// The HTTP status the app returned to the most recent callback of any kind.
    pub fn last_callback_status(&self) -> Option<u16> {
        self.inner.state().last_callback_status
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SimEvent> {
        self.inner.events.subscribe()
    }

    /// A snapshot of one call.
    pub fn call(&self, sid: &str) -> Option<SimCallRecord> {
        self.inner.call(sid).map(|c| c.rec().clone())
    }

    /// Snapshots of every call, oldest first.
    pub fn calls(&self) -> Vec<SimCallRecord> {
        let cells: Vec<Arc<CallCell>> = {
            let st = self.inner.state();
            st.order
                .iter()
                .filter_map(|s| st.calls.get(s).cloned())
                .collect()
        };
        cells.iter().map(|c| c.rec().clone()).collect()
    }

    /// Waits until the call has ended and all its callbacks were delivered.
    pub async fn wait_ended(
        &self,
        sid: &str,
        timeout: Duration,
    ) -> Result<SimCallRecord, SimHandleError> {
        let cell = self
            .inner
            .call(sid)
            .ok_or_else(|| SimHandleError::UnknownCall(sid.to_owned()))?;
        let mut rx = cell.ended_tx.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|e| *e)).await {
            Ok(Ok(_)) => Ok(cell.rec().clone()),
            Ok(Err(_)) => Err(SimHandleError::Shutdown),
            Err(_) => Err(SimHandleError::Timeout(sid.to_owned())),
        }
    }

    /// The remote party hangs up: an answered call completes; one not yet answered is
    /// canceled. Returns false if the call had already ended.
    pub fn hangup(&self, sid: &str) -> Result<bool, SimHandleError> {
        let cell = self
            .inner
            .call(sid)
            .ok_or_else(|| SimHandleError::UnknownCall(sid.to_owned()))?;
        let ended = self.inner.end_call_with(&cell, |status| {
            let to = if status == CallStatus::InProgress {
                CallStatus::Completed
            } else {
                CallStatus::Canceled
            };
            Some((to, EndReason::RemoteHangup))
        });
        Ok(ended.is_ok())
    }

    /// The caller presses a key; sent as a `dtmf` message on the next media frame.
    pub fn send_dtmf(&self, sid: &str, digit: char) -> Result<(), SimHandleError> {
        let cell = self
            .inner
            .call(sid)
            .ok_or_else(|| SimHandleError::UnknownCall(sid.to_owned()))?;
        lock(&cell.dtmf).push_back(digit);
        Ok(())
    }

    /// Starts an inbound call and returns its SID.
    pub fn inbound_call(&self, call: InboundCall) -> Result<String, SimHandleError> {
        if call.voice_url.is_empty() {
            return Err(SimHandleError::Invalid("voice_url is empty".into()));
        }
        if lock(&self.inner.tasks).closed {
            return Err(SimHandleError::Shutdown);
        }
        Ok(call::start_inbound(&self.inner, call))
    }

    /// `X-Twilio-Signature` for `url` and form `params` with this account's token.
    pub fn sign(&self, url: &str, params: &[(String, String)]) -> String {
        signature::compute(&self.inner.cfg.auth_token, url, params)
    }

    /// Stops everything and waits until it has stopped.
    pub async fn shutdown(self) {
        self.stop_tasks();
        let mut set = std::mem::take(&mut lock(&self.inner.tasks).set);
        while set.join_next().await.is_some() {}
        let server = lock(&self.server).take();
        if let Some(mut server) = server {
            // Graceful shutdown closes idle keep-alive connections; a client holding a
            // request open past this gets cut off.
            if tokio::time::timeout(Duration::from_secs(2), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
    }

    fn stop_tasks(&self) {
        self.inner.shutdown.cancel();
        let mut t = lock(&self.inner.tasks);
        t.closed = true;
        t.set.abort_all();
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// `CA`/`MZ` + 32 lowercase hex digits.
fn new_sid(prefix: &str) -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    format!("{prefix}{}", hex::encode(bytes))
}

fn rfc2822(t: SystemTime) -> String {
    use time::format_description::well_known::Rfc2822;
    time::OffsetDateTime::from(t)
        .format(&Rfc2822)
        .unwrap_or_default()
}

#[cfg(test)]
mod convention_tests {
    use super::*;

    #[test]
    fn number_conventions_pick_outcomes_by_the_last_digits() {
        assert_eq!(convention_scenario("+14155550486"), Some(Scenario::Busy));
        assert_eq!(
            convention_scenario("+14155550487"),
            Some(Scenario::NoAnswer)
        );
        assert_eq!(convention_scenario("+14155550404"), Some(Scenario::Failed));
        assert!(matches!(
            convention_scenario("+14155550666"),
            Some(Scenario::Answer {
                answered_by: Some(_),
                ..
            })
        ));
        let Some(Scenario::Answer { caller, .. }) = convention_scenario("+14155550123") else {
            panic!("0123 answers");
        };
        assert_eq!(
            caller
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Dtmf(_)))
                .count(),
            4
        );
        assert_eq!(convention_scenario("+14155550100"), None);
    }
}

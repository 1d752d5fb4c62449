//! The call lifecycle: accept and persist outbound calls, dial them within capacity and
//! pace, apply provider callbacks, end calls, and recover after a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::CallStatus;
use std::sync::Mutex;

use tokio::task::JoinHandle;

use super::live::{CallEvent, Registry};
use crate::config::{Config, EngineKind, HumanDuration};
use crate::domain::{Invalid, JobKind, RateLimited};
use crate::engines::breaker::{Breakers, State as BreakerState};
use crate::engines::ultravox::UltravoxClient;
use crate::engines::{CallContext, Engine, EngineError};
use crate::ids::random_token;
use crate::ops::metrics::{Metrics, circuit};
use crate::phone::E164;
use crate::store::calls::{self, Call, OutboundRequest, Scope, Transition};
use crate::store::{Store, StoreError, tenants};
use crate::telephony::twilio::rest::{CreateCall, TwilioClient, TwilioError};
use crate::telephony::twilio::twiml;

/// The body of `POST /calls`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCallRequest {
    pub to: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub greeting: Option<String>,
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub voice: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub max_duration: Option<String>,
    #[serde(default)]
    pub machine_detection: Option<bool>,
    /// Admin keys name the tenant the call belongs to.
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("{0}")]
    Unavailable(String),
    #[error("engine {0} is failing; new calls are refused until it recovers")]
    EngineUnavailable(EngineKind),
}

/// What the call path needs to start an engine for a call.
pub struct CallSetup {
    pub ctx: CallContext,
    pub kind: EngineKind,
    pub max_duration: Duration,
    pub inbound: bool,
}

pub struct CallManager {
    store: Store,
    /// Swapped whole by a reload (SIGHUP); each call keeps the snapshot it started with.
    config: std::sync::RwLock<Arc<Config>>,
    twilio: TwilioClient,
    ultravox: UltravoxClient,
    pub live: Registry,
    pub breakers: Arc<Breakers>,
    pub metrics: Arc<Metrics>,
    /// Engine sessions opened while the phone rings, claimed by the media stream.
    prewarmed: Mutex<HashMap<String, JoinHandle<Result<Engine, EngineError>>>>,
    dial_wake: Notify,
    outbox_wake: Notify,
    draining: AtomicBool,
    shutdown: CancellationToken,
    /// Cancelled when the drain time is up: bridges say goodbye and hang up.
    wind_down: CancellationToken,
    /// Calls whose media currently runs through a bridge in this process.
    bridged: Mutex<std::collections::HashSet<String>>,
}

/// The stream token is random; only its hash is stored, and it is consumed on first use.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl CallManager {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let twilio = TwilioClient::new(
            &config.twilio.api_base_url,
            &config.twilio.account_sid,
            config.twilio.auth_token.clone(),
        )?;
        let ultravox = UltravoxClient::new(&config.ultravox)?;
        Ok(Arc::new(Self {
            store,
            config: std::sync::RwLock::new(config),
            twilio,
            ultravox,
            live: Registry::default(),
            breakers: Arc::new(Breakers::default()),
            metrics: Arc::new(Metrics::new()),
            prewarmed: Mutex::new(HashMap::new()),
            dial_wake: Notify::new(),
            outbox_wake: Notify::new(),
            draining: AtomicBool::new(false),
            shutdown,
            wind_down: CancellationToken::new(),
            bridged: Mutex::new(Default::default()),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration now in force (a snapshot: a reload swaps in a new one).
    pub fn config(&self) -> Arc<Config> {
        // A poisoned lock still holds a whole, valid Arc.
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts a reloaded configuration in force for new calls and requests.
    pub fn replace_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn twilio(&self) -> &TwilioClient {
        &self.twilio
    }

    pub fn ultravox(&self) -> &UltravoxClient {
        &self.ultravox
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Stop dialing: new calls stay queued (persisted) for the next start.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn wind_down_token(&self) -> &CancellationToken {
        &self.wind_down
    }

    /// Calls whose media runs through a bridge in this process now.
    pub fn bridged_count(&self) -> usize {
        self.bridged_lock().len()
    }

    fn bridged_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // Set operations only; poison cannot leave it inconsistent.
        self.bridged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A bridge started serving call `id`; the guard marks its end.
    pub fn bridge_started(self: &Arc<Self>, id: &str) -> BridgeGuard {
        self.bridged_lock().insert(id.to_owned());
        BridgeGuard {
            m: self.clone(),
            id: id.to_owned(),
        }
    }

    /// Graceful stop: no new dialing (queued calls stay queued, and new API calls are
    /// queued), live calls may finish within `timeout`; then the rest are ended politely
    /// (goodbye, hang up, `end_reason = "shutdown"`). `force` (a second signal) cuts it short.
    pub async fn drain(&self, timeout: Duration, force: CancellationToken) {
        self.set_draining();
        let live = self.live_count().await;
        if live > 0 {
            tracing::info!(
                live,
                timeout_s = timeout.as_secs(),
                "waiting for live calls to finish"
            );
        }
        if !self
            .wait_no_live(tokio::time::Instant::now() + timeout, &force)
            .await
        {
            let left = self.live_count().await;
            tracing::warn!(calls = left, "drain timeout: ending the remaining calls");
            self.wind_down.cancel();
            // Calls without a bridge here (ringing, or media straight to Ultravox) are ended
            // through Twilio.
            let bridged = self.bridged_lock().clone();
            if let Ok(active) = self.store.run(|c| calls::active(c, Scope::All)).await {
                for call in active {
                    if call.status != CallStatus::Queued
                        && !bridged.contains(call.id.as_str())
                        && let Err(e) = self.end(Scope::All, call.id.as_str(), "shutdown").await
                    {
                        tracing::warn!(call_id = %call.id, error = %e, "cannot end call at shutdown");
                    }
                }
            }
            let grace = tokio::time::Instant::now() + Duration::from_secs(15);
            self.wait_no_live(grace, &force).await;
        }
        self.live.close_all();
    }

    async fn live_count(&self) -> i64 {
        self.store
            .run(|c| Ok(calls::live_counts(c)?.0))
            .await
            .unwrap_or(0)
    }

    /// True once no call is live and every bridge has finished (its transcript flushed: a
    /// provider callback can close the record while the bridge is still writing); false at
    /// `deadline` or when forced.
    async fn wait_no_live(
        &self,
        deadline: tokio::time::Instant,
        force: &CancellationToken,
    ) -> bool {
        loop {
            if self.live_count().await == 0 && self.bridged_count() == 0 {
                return true;
            }
            tokio::select! {
                _ = self.dial_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = force.cancelled() => return false,
            }
        }
    }

    /// Starts the background workers: the dialer and the tenant-webhook outbox.
    pub fn spawn_workers(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.dialer().await });
        let me = self.clone();
        tokio::spawn(async move { super::jobs::run(me).await });
    }

    pub(crate) fn outbox_wake(&self) -> &Notify {
        &self.outbox_wake
    }

    // ---- create -------------------------------------------------------------------

    /// Validates and persists an outbound call (queued), then wakes the dialer. Returns the
    /// call and whether it was created now (false: an idempotent replay).
    pub async fn create(
        &self,
        scope: Scope,
        req: CreateCallRequest,
        idempotency_key: Option<String>,
    ) -> Result<(Call, bool), CallError> {
        let to = E164::parse(&req.to).map_err(|e| Invalid::new("to", e.to_string()))?;
        if let Some(k) = &idempotency_key
            && (k.is_empty() || k.len() > 255)
        {
            return Err(Invalid::new("Idempotency-Key", "must be 1 to 255 characters").into());
        }
        let max_duration = req
            .max_duration
            .as_deref()
            .map(|d| {
                let d = HumanDuration::parse(d).map_err(|e| Invalid::new("max_duration", e))?;
                if !(10..=4 * 3600).contains(&d.as_secs()) {
                    return Err(Invalid::new("max_duration", "must be between 10s and 4h"));
                }
                Ok(d.as_secs() as i64)
            })
            .transpose()?;
        let metadata = match &req.metadata {
            None => serde_json::json!({}),
            Some(v @ serde_json::Value::Object(m)) if v.to_string().len() <= 16 * 1024 => {
                serde_json::Value::Object(m.clone())
            }
            Some(serde_json::Value::Object(_)) => {
                return Err(Invalid::new("metadata", "larger than 16 KiB").into());
            }
            Some(_) => return Err(Invalid::new("metadata", "must be a JSON object").into()),
        };
        for (field, v, max) in [
            ("system_prompt", &req.system_prompt, 20_000),
            ("greeting", &req.greeting, 2_000),
            ("voice", &req.voice, 100),
        ] {
            if v.as_ref().is_some_and(|s| s.chars().count() > max) {
                return Err(
                    Invalid::new(field, format!("too long (at most {max} characters)")).into(),
                );
            }
        }
        let config = self.config();
        let breakers = self.breakers.clone();
        let hash = hex::encode(Sha256::digest(serde_json::to_vec(&req).unwrap_or_default()));
        let (call, created) = self
            .store
            .try_run(move |c| -> Result<_, CallError> {
                let tenant = match (scope, &req.tenant) {
                    (Scope::Tenant(id), _) => tenants::get_by_id(c, id)?,
                    (Scope::All, Some(name)) => tenants::get(c, name)?,
                    (Scope::All, None) => {
                        // An admin with a single tenant need not name it (the dev flow).
                        let mut all = tenants::list(c)?;
                        if all.len() != 1 {
                            return Err(Invalid::new(
                                "tenant",
                                "required with the admin key (name the tenant the call is for)",
                            )
                            .into());
                        }
                        all.remove(0)
                    }
                };
                let from = req
                    .from
                    .clone()
                    .or_else(|| tenant.from_number.clone())
                    .or_else(|| Some(config.twilio.from_number.clone()).filter(|f| !f.is_empty()))
                    .ok_or_else(|| {
                        Invalid::new(
                            "from",
                            "no caller ID: pass from, or set the tenant's from_number or twilio.from_number",
                        )
                    })?;
                E164::parse(&from).map_err(|e| Invalid::new("from", e.to_string()))?;
                let engine = match req.engine.as_deref().or(tenant.engine.as_deref()) {
                    Some(e) => EngineKind::parse(e).ok_or_else(|| {
                        Invalid::new("engine", format!("unknown engine {e:?}"))
                    })?,
                    None => config.agent.engine,
                };
                if !breakers.admit(engine) {
                    return Err(CallError::EngineUnavailable(engine));
                }
                let max_per_minute = tenant
                    .calls_per_minute
                    .unwrap_or(config.limits.calls_per_minute_per_tenant)
                    as i64;
                Ok(calls::create_outbound(
                    c,
                    &OutboundRequest {
                        tenant_id: tenant.id,
                        to: to.to_string(),
                        from,
                        engine: engine.to_string(),
                        system_prompt: req.system_prompt,
                        greeting: req.greeting,
                        voice: req.voice,
                        max_duration_secs: max_duration,
                        machine_detection: req.machine_detection.unwrap_or(false),
                        metadata,
                        idempotency_key,
                        request_hash: hash,
                    },
                    max_per_minute,
                )??)
            })
            .await?;
        if created {
            tracing::info!(call_id = %call.id, tenant = %call.tenant, to = %call.to, "call queued");
            self.dial_wake.notify_one();
        }
        Ok((call, created))
    }

    // ---- dialing ------------------------------------------------------------------

    async fn dialer(self: Arc<Self>) {
        let mut pacer = Pacer::new(self.config().twilio.calls_per_second);
        let queue_timeout_ms = self.config().server.queue_timeout.0.as_millis() as i64;
        loop {
            tokio::select! {
                _ = self.dial_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.shutdown.cancelled() => return,
            }
            if let Err(e) = self.expire_queue(queue_timeout_ms).await {
                tracing::error!(error = %e, "expiring queued calls failed");
            }
            if self.is_draining() {
                if let Ok((live, queued)) = self
                    .store
                    .run(|c| Ok((calls::live_counts(c)?.0, calls::queued_count(c)?)))
                    .await
                {
                    self.publish_gauges(live, queued);
                }
                continue;
            }
            let max = self.config().server.max_concurrent_calls as i64;
            let work = self
                .store
                .run(|c| {
                    let queued = calls::queued(c, 200)?;
                    let (live, per_tenant) = calls::live_counts(c)?;
                    let caps: HashMap<i64, Option<u32>> = tenants::list(c)?
                        .into_iter()
                        .map(|t| (t.id, t.max_concurrent_calls))
                        .collect();
                    Ok((queued, live, per_tenant, caps))
                })
                .await;
            let (queued, mut live, mut per_tenant, caps) = match work {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "dialer cannot read the queue");
                    continue;
                }
            };
            self.publish_gauges(live, queued.len() as i64);
            for (id, tenant_id, _) in queued {
                if live >= max || self.is_draining() {
                    break;
                }
                let used = per_tenant.entry(tenant_id).or_insert(0);
                if caps
                    .get(&tenant_id)
                    .copied()
                    .flatten()
                    .is_some_and(|cap| *used >= cap as i64)
                {
                    // This tenant is full; later calls of other tenants may still go.
                    continue;
                }
                tokio::select! {
                    _ = pacer.wait() => {}
                    _ = self.shutdown.cancelled() => return,
                }
                let claim_id = id.clone();
                match self
                    .store
                    .run(move |c| calls::claim_for_dialing(c, &claim_id))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, call_id = %id, "cannot claim call");
                        continue;
                    }
                }
                live += 1;
                *used += 1;
                self.live.publish(
                    &id,
                    CallEvent::Status {
                        status: CallStatus::Initiating,
                        end_reason: None,
                    },
                );
                let me = self.clone();
                tokio::spawn(async move { me.dial(id).await });
            }
        }
    }

    async fn dial(self: Arc<Self>, id: String) {
        let detail_id = id.clone();
        let detail = match self.store.run(move |c| calls::detail(c, &detail_id)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot load call to dial");
                return;
            }
        };
        let base = self.config().public_url();
        let req = CreateCall {
            to: detail.call.to.clone(),
            from: detail.call.from.clone(),
            answer_url: format!("{base}/twilio/answer/{id}"),
            status_callback: format!("{base}/twilio/status/{id}"),
            timeout_secs: self.config().twilio.ring_timeout.as_secs() as u32,
            // A backstop only: our own governor ends the call politely at max_duration.
            time_limit_secs: detail
                .max_duration_secs
                .map(|s| s as u64)
                .unwrap_or(self.config().agent.max_call_duration.as_secs())
                + TIME_LIMIT_GRACE_SECS,
            amd_callback: detail
                .machine_detection
                .then(|| format!("{base}/twilio/amd/{id}")),
        };
        match self.twilio.create_call(&req).await {
            Ok(res) => {
                tracing::info!(call_id = %id, call_sid = %res.sid, "call created at Twilio");
                let sid = res.sid.clone();
                let sid_id = id.clone();
                if let Err(e) = self
                    .store
                    .run(move |c| calls::set_twilio_sid(c, &sid_id, &sid))
                    .await
                {
                    tracing::error!(call_id = %id, error = %e, "cannot store call SID");
                }
            }
            Err(e) => {
                tracing::warn!(call_id = %id, error = %e, "Twilio refused the call");
                let reason = if matches!(e, TwilioError::Api { .. }) {
                    "twilio_error"
                } else {
                    "twilio_unreachable"
                };
                self.apply(
                    &id,
                    Transition {
                        status: Some(CallStatus::Failed),
                        end_reason: Some(reason.into()),
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                )
                .await;
            }
        }
    }

    /// Live/queued gauges, breaker states and the systemd status line.
    fn publish_gauges(&self, live: i64, queued: i64) {
        self.metrics.calls_active.set(live);
        self.metrics.calls_queued.set(queued);
        for (kind, state) in self.breakers.states() {
            let v = match state {
                BreakerState::Closed => circuit::CLOSED,
                BreakerState::HalfOpen => circuit::HALF_OPEN,
                BreakerState::Open => circuit::OPEN,
            };
            self.metrics
                .engine_circuit_state
                .with(&[kind.as_str()])
                .set(v);
        }
        crate::ops::sdnotify::notify_status(&format!(
            "{}{live} live calls, {queued} queued",
            if self.is_draining() {
                "draining; "
            } else {
                "serving; "
            }
        ));
    }

    async fn expire_queue(&self, max_age_ms: i64) -> Result<(), StoreError> {
        let expired = self
            .store
            .run(move |c| calls::expired_queued(c, max_age_ms))
            .await?;
        for id in expired {
            tracing::warn!(call_id = %id, "queued call expired before a line was free");
            self.apply(
                &id,
                Transition {
                    status: Some(CallStatus::Canceled),
                    end_reason: Some("queue_timeout".into()),
                    ..Default::default()
                },
            )
            .await;
        }
        Ok(())
    }

    // ---- state changes --------------------------------------------------------------

    /// Applies a transition, publishes it to followers, and frees capacity on terminal states.
    pub async fn apply(&self, id: &str, t: Transition) -> Option<Call> {
        let tid = id.to_owned();
        let result = self
            .store
            .run(move |c| calls::transition(c, &tid, &t))
            .await;
        match result {
            Ok(Some(call)) => {
                let ev = CallEvent::Status {
                    status: call.status,
                    end_reason: call.end_reason.clone(),
                };
                if call.status.is_terminal() {
                    tracing::info!(
                        call_id = %call.id,
                        call_sid = call.twilio_call_sid.as_deref().unwrap_or(""),
                        status = %call.status,
                        end_reason = call.end_reason.as_deref().unwrap_or(""),
                        duration_seconds = call.duration_seconds.unwrap_or(0),
                        "call ended"
                    );
                    self.metrics
                        .calls_finished
                        .with(&[call.status.as_str()])
                        .inc();
                    if let Some(d) = call.duration_seconds {
                        self.metrics.call_duration.observe(d as f64);
                    }
                    self.live.finish(id, ev);
                    self.drop_prewarmed(id);
                    self.dial_wake.notify_one();
                    self.outbox_wake.notify_one();
                } else {
                    tracing::info!(call_id = %call.id, call_sid = call.twilio_call_sid.as_deref().unwrap_or(""), status = %call.status, "call status");
                    self.live.publish(id, ev);
                }
                Some(call)
            }
            Ok(None) => None,
            Err(StoreError::NotFound(_)) => None,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot apply call transition");
                None
            }
        }
    }

    /// Records why a live call is ending, before the provider confirms the end.
    pub async fn note_end_reason(&self, id: &str, reason: &'static str) {
        let rid = id.to_owned();
        if let Err(e) = self
            .store
            .run(move |c| calls::set_end_reason(c, &rid, reason))
            .await
        {
            tracing::error!(call_id = %id, error = %e, "cannot record end reason");
        }
    }

    /// `POST /calls/{id}/end`: cancel a queued call, or hang up / cancel at Twilio.
    pub async fn end(
        &self,
        scope: Scope,
        id: &str,
        reason: &'static str,
    ) -> Result<Call, CallError> {
        let gid = id.to_owned();
        let call = self.store.run(move |c| calls::get(c, scope, &gid)).await?;
        if call.status.is_terminal() {
            return Ok(call);
        }
        self.note_end_reason(id, reason).await;
        if call.status == CallStatus::Queued {
            return Ok(self
                .apply(
                    id,
                    Transition {
                        status: Some(CallStatus::Canceled),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_or(call));
        }
        // Stop our side of the media at once; Twilio's callback confirms the end.
        if let Some(live) = self.live.get(id) {
            live.end.cancel();
        }
        if let Some(sid) = &call.twilio_call_sid {
            let answered = call.status == CallStatus::InProgress;
            match self.twilio.end_call(sid, answered).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() || e.code() == Some(21220) => {
                    // Already over at Twilio: settle it from what Twilio says now.
                    self.reconcile(id, sid).await;
                }
                Err(e) => {
                    return Err(CallError::Unavailable(format!(
                        "Twilio did not end the call: {e}"
                    )));
                }
            }
        }
        let gid = id.to_owned();
        Ok(self
            .store
            .run(move |c| calls::get(c, Scope::All, &gid))
            .await?)
    }

    /// Asks Twilio for a call's state and applies it (missed callbacks, restarts).
    pub async fn reconcile(&self, id: &str, sid: &str) {
        match self.twilio.fetch_call(sid).await {
            Ok(res) => {
                if let Some(status) = map_twilio_status(&res.status) {
                    self.apply(
                        id,
                        Transition {
                            status: Some(status),
                            duration_seconds: res.duration.and_then(|d| d.parse().ok()),
                            ..Default::default()
                        },
                    )
                    .await;
                }
            }
            Err(e) if e.is_not_found() => {
                self.apply(
                    id,
                    Transition {
                        status: Some(CallStatus::Completed),
                        ..Default::default()
                    },
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(call_id = %id, error = %e, "cannot reconcile call with Twilio")
            }
        }
    }

    // ---- webhooks -------------------------------------------------------------------

    /// A Twilio status callback for our call `id`.
    pub async fn status_callback(&self, id: &str, params: &[(String, String)]) -> bool {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let Some(status) = get("CallStatus").and_then(map_twilio_status) else {
            return false;
        };
        let t = Transition {
            status: Some(status),
            seq: get("SequenceNumber").and_then(|s| s.parse().ok()),
            duration_seconds: get("CallDuration").and_then(|s| s.parse().ok()),
            answered_by: get("AnsweredBy").map(str::to_owned),
            error: get("SipResponseCode")
                .filter(|_| status == CallStatus::Failed)
                .map(|c| format!("SIP {c}")),
            ..Default::default()
        };
        self.apply(id, t).await;
        true
    }

    pub async fn amd_callback(&self, id: &str, answered_by: &str) {
        self.apply(
            id,
            Transition {
                answered_by: Some(answered_by.to_owned()),
                ..Default::default()
            },
        )
        .await;
    }

    /// Twilio asks what to do now that our outbound call `id` was answered.
    pub async fn answer(self: &Arc<Self>, id: &str, params: &[(String, String)]) -> String {
        let gid = id.to_owned();
        let call = match self
            .store
            .run(move |c| calls::get(c, Scope::All, &gid))
            .await
        {
            Ok(c) if !c.status.is_terminal() => c,
            Ok(_) | Err(StoreError::NotFound(_)) => return twiml::hangup(),
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "answer webhook");
                return twiml::say_hangup("Sorry, we cannot take this call right now. Goodbye.");
            }
        };
        if params
            .iter()
            .any(|(k, v)| k == "CallStatus" && v == "in-progress")
        {
            self.apply(
                id,
                Transition {
                    status: Some(CallStatus::InProgress),
                    ..Default::default()
                },
            )
            .await;
        }
        if self.straight_to_ultravox(&call.engine) {
            return self.ultravox_twiml(id).await;
        }
        match self.stream_twiml(call.id.as_str()).await {
            Ok(xml) => {
                self.prewarm(id);
                xml
            }
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot prepare media stream");
                twiml::say_hangup("Sorry, something went wrong. Goodbye.")
            }
        }
    }

    /// Ultravox with its Twilio medium: Twilio streams to Ultravox, not through a bridge here.
    fn straight_to_ultravox(&self, engine: &str) -> bool {
        EngineKind::parse(engine) == Some(EngineKind::Ultravox)
            && self.config().ultravox.medium == crate::config::UltravoxMedium::Twilio
    }

    /// Ultravox's Twilio medium: create the Ultravox call and connect Twilio's stream
    /// straight to its `joinUrl`. On failure the caller hears an apology, not dead air.
    async fn ultravox_twiml(&self, id: &str) -> String {
        let setup = match self.call_setup(id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot load call");
                return twiml::say_hangup("Sorry, something went wrong. Goodbye.");
            }
        };
        let config = self.config();
        let voice = crate::engines::ultravox::voice_for(&setup.ctx.voice, &config);
        let req = crate::engines::ultravox::NewCall {
            system_prompt: &setup.ctx.system_prompt,
            voice,
            greeting: Some(setup.ctx.greeting.as_str()).filter(|g| !g.is_empty()),
            max_duration: setup.max_duration,
            call_id: id,
            tenant: &setup.ctx.tenant,
            medium: crate::engines::ultravox::Medium::Twilio,
        };
        match self.ultravox.create_call(&req).await {
            Ok(created) => {
                self.breakers.success(EngineKind::Ultravox);
                let (cid, ucid) = (id.to_owned(), created.call_id.clone());
                if let Err(e) = self
                    .store
                    .run(move |c| calls::set_engine_call_id(c, &cid, &ucid))
                    .await
                {
                    tracing::error!(call_id = %id, error = %e, "cannot store the Ultravox call id");
                }
                tracing::info!(call_id = %id, ultravox_call = %created.call_id, "connecting the call to Ultravox");
                twiml::connect_stream(&created.join_url, &[])
            }
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "Ultravox did not create the call");
                self.metrics
                    .engine_errors
                    .with(&["ultravox", "create"])
                    .inc();
                self.breakers.failure(EngineKind::Ultravox);
                self.apply(
                    id,
                    Transition {
                        status: Some(CallStatus::Failed),
                        end_reason: Some("engine_error".into()),
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                )
                .await;
                twiml::say_hangup(
                    "Sorry, we are having technical difficulties. Please call again later. Goodbye.",
                )
            }
        }
    }

    /// Everything needed to run the engine for call `id`: prompt, greeting and voice from
    /// the call, then its tenant, then the server defaults.
    pub async fn call_setup(&self, id: &str) -> Result<CallSetup, StoreError> {
        let cid = id.to_owned();
        let (detail, tenant) = self
            .store
            .run(move |c| {
                let d = calls::detail(c, &cid)?;
                let t = tenants::get_by_id(c, d.tenant_id)?;
                Ok((d, t))
            })
            .await?;
        let cfg = &self.config();
        let inbound = detail.call.direction == crate::calls::Direction::Inbound;
        let ctx = CallContext {
            call_id: detail.call.id.clone(),
            tenant: tenant.name.clone(),
            inbound,
            system_prompt: detail
                .system_prompt
                .or(tenant.system_prompt)
                .unwrap_or_else(|| cfg.agent.system_prompt.clone()),
            greeting: if inbound && !cfg.agent.greet_inbound {
                String::new()
            } else {
                detail
                    .greeting
                    .or(tenant.greeting)
                    .unwrap_or_else(|| cfg.agent.greeting.clone())
            },
            voice: detail
                .voice
                .or(tenant.voice)
                .unwrap_or_else(|| cfg.agent.voice.clone()),
            script: cfg.agent.script.clone(),
            goodbye: cfg.agent.goodbye.clone(),
        };
        Ok(CallSetup {
            ctx,
            kind: EngineKind::parse(&detail.call.engine).unwrap_or(cfg.agent.engine),
            max_duration: Duration::from_secs(
                detail
                    .max_duration_secs
                    .map(|s| s as u64)
                    .unwrap_or(cfg.agent.max_call_duration.as_secs()),
            ),
            inbound,
        })
    }

    /// Opens the call's engine session now, while the phone rings, so the greeting can
    /// start the moment the media stream does.
    fn prewarm(self: &Arc<Self>, id: &str) {
        let me = self.clone();
        let cid = id.to_owned();
        let handle = tokio::spawn(async move {
            let setup = me
                .call_setup(&cid)
                .await
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            let started = std::time::Instant::now();
            let r = Engine::start(setup.kind, setup.ctx, &me.config()).await;
            tracing::debug!(call_id = %cid, ms = started.elapsed().as_millis() as u64, ok = r.is_ok(), "engine pre-warmed");
            r
        });
        if let Some(old) = self.prewarmed_lock().insert(id.to_owned(), handle) {
            old.abort();
        }
    }

    fn prewarmed_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<Result<Engine, EngineError>>>> {
        // Map operations only; poison cannot leave it inconsistent.
        self.prewarmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_prewarmed(&self, id: &str) {
        if let Some(h) = self.prewarmed_lock().remove(id) {
            // Aborting drops a finished session too, which closes its socket.
            h.abort();
        }
    }

    /// The engine for a starting media stream: the pre-warmed session if there is one,
    /// else a fresh one. Outcomes feed the engine's circuit breaker.
    pub async fn take_engine(&self, id: &str, setup: CallSetup) -> Result<Engine, EngineError> {
        let pre = self.prewarmed_lock().remove(id);
        let result = match pre {
            Some(h) => match h.await {
                Ok(r) => r,
                Err(_) => Engine::start(setup.kind, setup.ctx, &self.config()).await,
            },
            None => Engine::start(setup.kind, setup.ctx, &self.config()).await,
        };
        match &result {
            Ok(_) => self.breakers.success(setup.kind),
            Err(e) => {
                tracing::error!(engine = %setup.kind, error = %e, "engine failed to start");
                self.metrics
                    .engine_errors
                    .with(&[setup.kind.as_str(), "connect"])
                    .inc();
                self.breakers.failure(setup.kind);
            }
        }
        result
    }

    /// Replaces what the caller hears with a short spoken apology and a hang-up (Twilio
    /// speaks it), so an engine failure is never dead air.
    pub async fn apologize(&self, sid: &str) {
        let xml = twiml::say_hangup(
            "Sorry, we are having technical difficulties. Please call again later. Goodbye.",
        );
        if let Err(e) = self.twilio.redirect(sid, &xml).await {
            tracing::warn!(call_sid = %sid, error = %e, "cannot play the apology");
        }
    }

    /// TwiML connecting the call's media stream to us, with a fresh single-use token.
    async fn stream_twiml(&self, id: &str) -> Result<String, StoreError> {
        let token = random_token(32);
        let hash = token_hash(&token);
        let sid = id.to_owned();
        self.store
            .run(move |c| calls::set_stream_token(c, &sid, &hash))
            .await?;
        Ok(twiml::connect_stream(
            &self.config().media_url(),
            &[("call_id", id), ("token", &token)],
        ))
    }

    /// `POST /twilio/voice`: an inbound call to one of our numbers.
    pub async fn inbound(self: &Arc<Self>, params: &[(String, String)]) -> String {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (Some(to), Some(from), Some(sid)) = (get("To"), get("From"), get("CallSid")) else {
            return twiml::say_hangup("Sorry, this call cannot be connected. Goodbye.");
        };
        if self.is_draining() {
            return twiml::say_hangup(
                "Sorry, we cannot take calls right now. Please call again later. Goodbye.",
            );
        }
        let config = self.config();
        let max = config.server.max_concurrent_calls as i64;
        let (to_c, from_c, sid_c) = (to.clone(), from.clone(), sid.clone());
        let result = self
            .store
            .run(move |c| {
                if let Some(existing) = calls::id_by_sid(c, &sid_c)? {
                    // Twilio retried the webhook: same call, new token.
                    return Ok(Some(Ok(existing)));
                }
                let Some(tenant) = tenants::by_number(c, &to_c)? else {
                    return Ok(None);
                };
                let (live, per) = calls::live_counts(c)?;
                let tenant_live = per.get(&tenant.id).copied().unwrap_or(0);
                if live >= max
                    || tenant
                        .max_concurrent_calls
                        .is_some_and(|m| tenant_live >= m as i64)
                {
                    return Ok(Some(Err(tenant.name)));
                }
                let engine = tenant
                    .engine
                    .as_deref()
                    .and_then(EngineKind::parse)
                    .unwrap_or(config.agent.engine);
                let call =
                    calls::create_inbound(c, tenant.id, &to_c, &from_c, engine.as_str(), &sid_c)?;
                Ok(Some(Ok(call.id.to_string())))
            })
            .await;
        match result {
            Ok(None) => {
                tracing::warn!(to = %to, from = %from, call_sid = %sid, "inbound call to an unknown number");
                twiml::say_hangup("Sorry, this number is not in service. Goodbye.")
            }
            Ok(Some(Err(tenant))) => {
                tracing::warn!(tenant = %tenant, call_sid = %sid, "inbound call over capacity");
                twiml::say_hangup(
                    "Sorry, all our lines are busy. Please call again later. Goodbye.",
                )
            }
            Ok(Some(Ok(id))) => {
                tracing::info!(call_id = %id, call_sid = %sid, from = %from, to = %to, "inbound call");
                // Inbound calls get no status callbacks unless the operator set one up, so
                // the call is also settled by asking Twilio while it lasts.
                let rid = id.clone();
                let at = crate::timefmt::now_ms() + super::jobs::RECONCILE_EVERY_MS;
                if let Err(e) = self
                    .store
                    .run(move |c| schedule_reconcile(c, &rid, at))
                    .await
                {
                    tracing::error!(call_id = %id, error = %e, "cannot schedule reconciliation");
                }
                let gid = id.clone();
                let engine = self
                    .store
                    .run(move |c| calls::get(c, Scope::All, &gid))
                    .await
                    .map(|c| c.engine);
                if engine
                    .as_deref()
                    .is_ok_and(|e| self.straight_to_ultravox(e))
                {
                    if !self.breakers.admit(EngineKind::Ultravox) {
                        self.apply(
                            &id,
                            Transition {
                                status: Some(CallStatus::Failed),
                                end_reason: Some("engine_unavailable".into()),
                                ..Default::default()
                            },
                        )
                        .await;
                        return twiml::say_hangup(
                            "Sorry, we are having technical difficulties. Please call again later. Goodbye.",
                        );
                    }
                    return self.ultravox_twiml(&id).await;
                }
                match self.stream_twiml(&id).await {
                    Ok(xml) => {
                        self.prewarm(&id);
                        xml
                    }
                    Err(e) => {
                        tracing::error!(call_id = %id, error = %e, "cannot prepare media stream");
                        twiml::say_hangup("Sorry, something went wrong. Goodbye.")
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "inbound webhook");
                twiml::say_hangup("Sorry, something went wrong. Goodbye.")
            }
        }
    }

    // ---- restart --------------------------------------------------------------------

    /// Closes calls that were live when the previous process died, honestly: they end with
    /// `server_restart` (and are hung up at Twilio if still up there). Queued calls stay
    /// queued and are dialed by the dialer.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let unfinished = self.store.run(|c| calls::unfinished(c)).await?;
        let n = unfinished.len();
        for (id, status, sid) in unfinished {
            self.note_end_reason(&id, "server_restart").await;
            if let Some(sid) = &sid
                && let Err(e) = self
                    .twilio
                    .end_call(sid, status == CallStatus::InProgress)
                    .await
                && !e.is_not_found()
            {
                tracing::warn!(call_id = %id, error = %e, "cannot hang up interrupted call at Twilio");
            }
            let final_status = match (status, &sid) {
                (CallStatus::InProgress, _) => CallStatus::Completed,
                (_, Some(_)) => CallStatus::Canceled,
                // Claimed but never confirmed by Twilio: we cannot know it was not dialed,
                // so it is closed rather than dialed a second time.
                (_, None) => CallStatus::Failed,
            };
            self.apply(
                &id,
                Transition {
                    status: Some(final_status),
                    end_reason: Some("server_restart".into()),
                    error: (final_status == CallStatus::Failed)
                        .then(|| "the server restarted while this call was being placed".into()),
                    ..Default::default()
                },
            )
            .await;
        }
        if n > 0 {
            tracing::warn!(calls = n, "closed calls interrupted by a restart");
        }
        Ok(n)
    }
}

/// Removes a call from the bridged set when its bridge ends.
pub struct BridgeGuard {
    m: Arc<CallManager>,
    id: String,
}

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        self.m.bridged_lock().remove(&self.id);
    }
}

/// Twilio's `TimeLimit` exceeds our duration governor by this much, so the governor's
/// goodbye comes first and Twilio's hard cut only catches what we somehow miss.
pub const TIME_LIMIT_GRACE_SECS: u64 = 30;

/// Queues a check with Twilio at `at` for call `id` (once per call).
pub fn schedule_reconcile(c: &rusqlite::Connection, id: &str, at: i64) -> Result<(), StoreError> {
    crate::store::jobs::enqueue(
        c,
        JobKind::Reconcile,
        Some(id),
        None,
        &format!("reconcile:{id}"),
        at,
    )
}

/// Twilio's `CallStatus` values (callbacks and resources) in our terms.
pub fn map_twilio_status(s: &str) -> Option<CallStatus> {
    Some(match s {
        "queued" | "initiated" => CallStatus::Initiating,
        "ringing" => CallStatus::Ringing,
        "in-progress" | "answered" => CallStatus::InProgress,
        "completed" => CallStatus::Completed,
        "busy" => CallStatus::Busy,
        "no-answer" => CallStatus::NoAnswer,
        "failed" => CallStatus::Failed,
        "canceled" => CallStatus::Canceled,
        _ => return None,
    })
}

/// Spaces call creations to at most `per_second`, without bursts.
struct Pacer {
    interval: Duration,
    next: tokio::time::Instant,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_second.max(0.001)),
            next: tokio::time::Instant::now(),
        }
    }

    async fn wait(&mut self) {
        let now = tokio::time::Instant::now();
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next = self.next.max(now) + self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_statuses_map() {
        assert_eq!(
            map_twilio_status("in-progress"),
            Some(CallStatus::InProgress)
        );
        assert_eq!(map_twilio_status("no-answer"), Some(CallStatus::NoAnswer));
        assert_eq!(map_twilio_status("bogus"), None);
    }
}

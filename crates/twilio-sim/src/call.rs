//! One simulated call from creation to its last callback: call progress driven by the
//! callee's scenario, the TwiML request, verb execution, and status callbacks in event order.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::model::{
    CallStatus, CallbackKind, Direction, EndReason, SimCallRecord, SimError, SimEvent,
    WebhookRecord,
};
use super::script::{CallerScript, Runner};
use super::twiml::{self, Verb};
use super::webhook::{self, Callback, WebhookError};
use super::{CallCell, InboundCall, Inner, Scenario, new_sid, rfc2822, stream};

/// Where and for which events status callbacks go.
#[derive(Debug, Clone)]
pub(crate) struct StatusSubscription {
    pub url: String,
    pub method: String,
    /// `initiated`, `ringing`, `answered`, `completed` (the last is always sent).
    pub events: Vec<String>,
}

/// A validated create-call request.
#[derive(Debug, Clone)]
pub(crate) struct OutboundRequest {
    pub to: String,
    pub from: String,
    pub url: Option<String>,
    pub method: String,
    pub twiml: Option<String>,
    pub status: Option<StatusSubscription>,
    pub timeout: Duration,
    pub time_limit: Duration,
    pub machine_detection: Option<String>,
    pub async_amd: bool,
    pub amd_callback: Option<(String, String)>,
    pub raw: Vec<(String, String)>,
}

/// Moves a live call to a terminal status. False if it had already ended: terminal states
/// never change.
pub(crate) fn finish(
    rec: &mut SimCallRecord,
    now_ms: u64,
    status: CallStatus,
    reason: EndReason,
) -> bool {
    if rec.status.is_terminal() {
        return false;
    }
    rec.status = status;
    rec.end_reason = Some(reason);
    rec.ended_at_ms = Some(now_ms);
    rec.updated_at = SystemTime::now();
    rec.duration_secs = Some(match rec.answered_at_ms {
        Some(a) => now_ms.saturating_sub(a).div_ceil(1000),
        None => 0,
    });
    true
}

fn new_record(
    sid: &str,
    direction: Direction,
    from: &str,
    to: &str,
    status: CallStatus,
    raw: Vec<(String, String)>,
) -> SimCallRecord {
    let now = SystemTime::now();
    SimCallRecord {
        sid: sid.to_owned(),
        direction,
        from: from.to_owned(),
        to: to.to_owned(),
        status,
        answered_by: None,
        end_reason: None,
        created_at: now,
        updated_at: now,
        dialed_at_ms: None,
        answered_at_ms: None,
        ended_at_ms: None,
        duration_secs: None,
        request_params: raw,
        callbacks: Vec::new(),
        webhooks: Vec::new(),
        said: Vec::new(),
        unsupported_verbs: Vec::new(),
        played_digits: Vec::new(),
        dials: Vec::new(),
        errors: Vec::new(),
        streams: Vec::new(),
    }
}

/// Creates the call and starts its task; returns the record as the 201 response shows it.
pub(crate) fn start_outbound(inner: &Arc<Inner>, req: OutboundRequest) -> SimCallRecord {
    let sid = new_sid("CA");
    let rec = new_record(
        &sid,
        Direction::OutboundApi,
        &req.from,
        &req.to,
        CallStatus::Queued,
        req.raw.clone(),
    );
    let cell = Arc::new(CallCell::new(sid.clone(), rec.clone()));
    inner.insert_call(cell.clone());
    inner.emit(SimEvent::CallCreated {
        sid,
        direction: Direction::OutboundApi,
        from: req.from.clone(),
        to: req.to.clone(),
    });
    let scenario = inner.scenario_for(&req.to);
    let script = match &scenario {
        Scenario::Answer { caller, .. } => caller.clone(),
        _ => CallerScript::silent(),
    };
    let mut ctx = Ctx::new(inner, cell, req.status.clone(), req.time_limit, &script);
    inner.spawn(async move {
        ctx.outbound(req, scenario).await;
        ctx.teardown().await;
    });
    rec
}

pub(crate) fn start_inbound(inner: &Arc<Inner>, call: InboundCall) -> String {
    let sid = new_sid("CA");
    let rec = new_record(
        &sid,
        Direction::Inbound,
        &call.from,
        &call.to,
        CallStatus::Ringing,
        Vec::new(),
    );
    let cell = Arc::new(CallCell::new(sid.clone(), rec));
    // An inbound call exists from the first ring: ending it now fires `completed`.
    cell.dialed.store(true, Ordering::SeqCst);
    cell.rec().dialed_at_ms = Some(0);
    inner.insert_call(cell.clone());
    inner.emit(SimEvent::CallCreated {
        sid: sid.clone(),
        direction: Direction::Inbound,
        from: call.from.clone(),
        to: call.to.clone(),
    });
    let status = call.status_callback.clone().map(|url| StatusSubscription {
        url,
        method: call
            .status_callback_method
            .clone()
            .unwrap_or_else(|| "POST".into()),
        events: call.status_callback_events.clone(),
    });
    let time_limit = inner.cfg.timing.default_time_limit;
    let mut ctx = Ctx::new(inner, cell, status, time_limit, &call.caller);
    inner.spawn(async move {
        ctx.inbound(call).await;
        ctx.teardown().await;
    });
    sid
}

/// Where a call update sends a live call.
#[derive(Debug, Clone)]
pub(crate) enum Redirect {
    Url { url: String, method: String },
    Twiml(Vec<Verb>),
}

pub(crate) enum Waited<T> {
    Done(T),
    /// The call ended (from outside, or its time limit) while waiting.
    Ended,
}

enum Race<T> {
    Done(T),
    External,
    Deadline,
}

/// The call task's state.
pub(crate) struct Ctx {
    pub inner: Arc<Inner>,
    pub cell: Arc<CallCell>,
    pub end_rx: watch::Receiver<Option<EndReason>>,
    pub redirect_rx: watch::Receiver<u64>,
    pub deadline: Option<Instant>,
    pub runner: Runner,
    cb_tx: Option<mpsc::UnboundedSender<Callback>>,
    cb_done: Option<oneshot::Receiver<()>>,
    status: Option<StatusSubscription>,
    seq: u32,
    time_limit: Duration,
    direction: Direction,
    from: String,
    to: String,
}

/// Resolves when the call is handed new instructions.
pub(crate) async fn redirected(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Ctx {
    fn new(
        inner: &Arc<Inner>,
        cell: Arc<CallCell>,
        status: Option<StatusSubscription>,
        time_limit: Duration,
        script: &CallerScript,
    ) -> Self {
        let (cb_tx, cb_done) = webhook::spawn_worker(inner, cell.clone());
        let (direction, from, to) = {
            let rec = cell.rec();
            (rec.direction, rec.from.clone(), rec.to.clone())
        };
        Self {
            inner: inner.clone(),
            end_rx: cell.end_tx.subscribe(),
            redirect_rx: cell.redirect_tx.subscribe(),
            cell,
            deadline: None,
            runner: Runner::new(script),
            cb_tx: Some(cb_tx),
            cb_done: Some(cb_done),
            status,
            seq: 0,
            time_limit,
            direction,
            from,
            to,
        }
    }

    pub fn sid(&self) -> &str {
        &self.cell.sid
    }

    /// Runs `fut` unless the call ends first (externally, or by reaching its time limit,
    /// which this ends it for) or is redirected (then `Ended` too: the current TwiML stops
    /// and [`Ctx::execute`] picks up the new instructions).
    pub async fn until<F: Future>(&mut self, fut: F) -> Waited<F::Output> {
        let deadline = self.deadline;
        let end_rx = &mut self.end_rx;
        let redirect_rx = &mut self.redirect_rx;
        let race = tokio::select! {
            biased;
            _ = end_rx.wait_for(Option::is_some) => Race::External,
            _ = redirected(redirect_rx) => Race::External,
            _ = sleep_until_opt(deadline) => Race::Deadline,
            v = fut => Race::Done(v),
        };
        match race {
            Race::Done(v) => Waited::Done(v),
            Race::External => Waited::Ended,
            Race::Deadline => {
                self.end_self(CallStatus::Completed, EndReason::TimeLimit);
                Waited::Ended
            }
        }
    }

    async fn sleep(&mut self, d: Duration) -> bool {
        matches!(self.until(tokio::time::sleep(d)).await, Waited::Done(()))
    }

    pub fn is_ended(&self) -> bool {
        self.cell.rec().status.is_terminal()
    }

    pub fn error(&self, code: u32, message: impl Into<String>) {
        let message = message.into();
        tracing::debug!(sid = %self.sid(), code, %message, "simulated twilio error");
        let at_ms = self.cell.elapsed_ms();
        self.cell.rec().errors.push(SimError {
            code,
            message: message.clone(),
            at_ms,
        });
        self.inner.emit(SimEvent::ProtocolError {
            sid: self.sid().to_owned(),
            code,
            message,
        });
    }

    /// Ends the call from inside its task.
    pub fn end_self(&mut self, status: CallStatus, reason: EndReason) {
        let changed = finish(&mut self.cell.rec(), self.cell.elapsed_ms(), status, reason);
        if changed {
            self.inner.emit(SimEvent::StatusChanged {
                sid: self.sid().to_owned(),
                status,
            });
        }
    }

    /// A non-terminal progress step. False when the call has already ended.
    fn advance(&mut self, status: CallStatus) -> bool {
        let now = self.cell.elapsed_ms();
        {
            let mut rec = self.cell.rec();
            if rec.status.is_terminal() {
                return false;
            }
            match status {
                // Not a resource status: the resource stays `queued` until it rings.
                CallStatus::Initiated => {
                    self.cell.dialed.store(true, Ordering::SeqCst);
                    rec.dialed_at_ms = Some(now);
                }
                CallStatus::InProgress => {
                    rec.status = status;
                    rec.answered_at_ms = Some(now);
                }
                _ => rec.status = status,
            }
            rec.updated_at = SystemTime::now();
        }
        if status != CallStatus::Initiated {
            self.inner.emit(SimEvent::StatusChanged {
                sid: self.sid().to_owned(),
                status,
            });
        }
        if status == CallStatus::InProgress {
            self.deadline = Some(Instant::now() + self.time_limit);
        }
        self.status_callback(status);
        true
    }

    /// The parameters Twilio sends with every voice request (PROTOCOLS §3.6).
    fn base_params(&self, status: CallStatus) -> Vec<(String, String)> {
        let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        vec![
            p("AccountSid", &self.inner.cfg.account_sid),
            p("ApiVersion", "2010-04-01"),
            p("CallSid", self.sid()),
            p("CallStatus", status.as_str()),
            p("Called", &self.to),
            p("Caller", &self.from),
            p("Direction", self.direction.as_str()),
            p("From", &self.from),
            p("To", &self.to),
        ]
    }

    fn queue(&self, cb: Callback) {
        if let Some(tx) = &self.cb_tx {
            // The worker only stops after every sender is gone, so this cannot fail while
            // we hold one; if the simulator is shutting down the callback is moot anyway.
            let _ = tx.send(cb);
        }
    }

    fn status_callback(&mut self, status: CallStatus) {
        let Some(sub) = &self.status else { return };
        let event = match status {
            CallStatus::Initiated => "initiated",
            CallStatus::Ringing => "ringing",
            CallStatus::InProgress => "answered",
            s if s.is_terminal() => "completed",
            _ => return,
        };
        if event != "completed" && !sub.events.iter().any(|e| e == event) {
            return;
        }
        let (url, method) = (sub.url.clone(), sub.method.clone());
        let mut params = self.base_params(status);
        let p = |k: &str, v: String| (k.to_owned(), v);
        params.push(p("Timestamp", rfc2822(SystemTime::now())));
        params.push(p("CallbackSource", "call-progress-events".into()));
        params.push(p("SequenceNumber", self.seq.to_string()));
        if status.is_terminal() {
            let rec = self.cell.rec();
            let secs = rec.duration_secs.unwrap_or(0);
            let minutes = match rec.answered_at_ms {
                Some(_) => secs.div_ceil(60).max(1),
                None => 0,
            };
            params.push(p("CallDuration", secs.to_string()));
            params.push(p("Duration", minutes.to_string()));
            params.push(p("SipResponseCode", status.sip_response_code().to_string()));
            if let Some(ab) = &rec.answered_by {
                params.push(p("AnsweredBy", ab.clone()));
            }
        }
        let seq = self.seq;
        self.seq += 1;
        self.queue(Callback {
            kind: CallbackKind::Status,
            event: status.as_str().to_owned(),
            status: Some(status),
            seq: Some(seq),
            url,
            method,
            params,
        });
    }

    /// `<Stream statusCallback>` events (PROTOCOLS §1.5).
    pub fn stream_callback(&self, spec: &twiml::StreamSpec, stream_sid: &str, event: &str) {
        let Some(url) = &spec.status_callback else {
            return;
        };
        let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let params = vec![
            p("AccountSid", &self.inner.cfg.account_sid),
            p("CallSid", self.sid()),
            p("StreamSid", stream_sid),
            p("StreamName", spec.name.as_deref().unwrap_or(stream_sid)),
            p("StreamEvent", event),
            p("Timestamp", &ts),
        ];
        self.queue(Callback {
            kind: CallbackKind::Stream,
            event: event.to_owned(),
            status: None,
            seq: None,
            url: url.clone(),
            method: spec
                .status_callback_method
                .clone()
                .unwrap_or_else(|| "POST".into()),
            params,
        });
    }

    pub(crate) async fn outbound(&mut self, req: OutboundRequest, scenario: Scenario) {
        let t = self.inner.cfg.timing.clone();
        if !self.sleep(t.dial).await || !self.advance(CallStatus::Initiated) {
            return;
        }
        if !self.sleep(t.ring).await {
            return;
        }
        let beeps = matches!(&scenario, Scenario::Answer { caller, .. }
            if caller.steps.contains(&crate::Step::Beep));
        let (caller_answers, answered_by) = match scenario {
            Scenario::Busy => return self.end_self(CallStatus::Busy, EndReason::Busy),
            Scenario::Failed => return self.end_self(CallStatus::Failed, EndReason::Failed),
            Scenario::NoAnswer => (false, None),
            Scenario::RingForever => {
                if self.advance(CallStatus::Ringing) {
                    self.until(std::future::pending::<()>()).await;
                }
                return;
            }
            Scenario::Answer { answered_by, .. } => (true, answered_by),
        };
        if !self.advance(CallStatus::Ringing) {
            return;
        }
        if !caller_answers || t.answer >= req.timeout {
            if self.sleep(req.timeout).await {
                self.end_self(CallStatus::NoAnswer, EndReason::NoAnswer);
            }
            return;
        }
        if !self.sleep(t.answer).await || !self.advance(CallStatus::InProgress) {
            return;
        }
        let mut extra = Vec::new();
        if req.machine_detection.is_some() {
            let ab = answered_by.unwrap_or_else(|| "human".into());
            if req.async_amd {
                // DetectMessageEnd reports a machine once its greeting is over: at its beep
                // when the script has one (at most the detection timeout later).
                let at_beep = beeps
                    && req.machine_detection.as_deref() == Some("DetectMessageEnd")
                    && ab.starts_with("machine_end_");
                self.spawn_async_amd(ab, req.amd_callback.clone(), t.amd, at_beep);
            } else {
                if !self.sleep(t.amd).await {
                    return;
                }
                self.cell.rec().answered_by = Some(ab.clone());
                extra.push(("AnsweredBy".to_owned(), ab));
            }
        }
        let verbs = match (&req.url, &req.twiml) {
            (Some(url), _) => {
                self.fetch_twiml(url, &req.method, CallStatus::InProgress, extra)
                    .await
            }
            (None, Some(xml)) => match twiml::parse(xml) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.app_error(12100, format!("Document parse failure: {e}"));
                    None
                }
            },
            // The REST layer refuses requests with neither.
            (None, None) => {
                self.app_error(21205, "no Url or Twiml");
                None
            }
        };
        if let Some(verbs) = verbs {
            self.execute(verbs).await;
        }
    }

    fn spawn_async_amd(
        &self,
        answered_by: String,
        cb: Option<(String, String)>,
        after: Duration,
        at_beep: bool,
    ) {
        let cell = self.cell.clone();
        let tx = self.cb_tx.clone();
        let account = self.inner.cfg.account_sid.clone();
        self.inner.spawn(async move {
            let started = tokio::time::Instant::now();
            if at_beep {
                // Twilio's MachineDetectionTimeout default.
                let _ = tokio::time::timeout(Duration::from_secs(30), cell.beeped.notified()).await;
            } else {
                tokio::time::sleep(after).await;
            }
            let after = started.elapsed();
            cell.rec().answered_by = Some(answered_by.clone());
            let (Some((url, method)), Some(tx)) = (cb, tx) else {
                return;
            };
            let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
            let params = vec![
                p("AccountSid", &account),
                p("AnsweredBy", &answered_by),
                p("CallSid", &cell.sid),
                p("MachineDetectionDuration", &after.as_millis().to_string()),
            ];
            let _ = tx.send(Callback {
                kind: CallbackKind::Amd,
                event: answered_by,
                status: None,
                seq: None,
                url,
                method,
                params,
            });
        });
    }

    pub(crate) async fn inbound(&mut self, call: InboundCall) {
        self.status_callback(CallStatus::Ringing);
        let method = call.method.unwrap_or_else(|| "POST".into());
        if let Some(verbs) = self
            .fetch_twiml(&call.voice_url, &method, CallStatus::Ringing, Vec::new())
            .await
        {
            self.execute(verbs).await;
        }
    }

    /// Twilio's failure mode for a broken voice webhook: it logs the error, apologises to
    /// the caller and hangs up.
    fn app_error(&mut self, code: u32, message: impl Into<String>) {
        self.error(code, message);
        self.end_self(CallStatus::Failed, EndReason::ApplicationError(code));
    }

    async fn fetch_twiml(
        &mut self,
        url: &str,
        method: &str,
        status: CallStatus,
        extra: Vec<(String, String)>,
    ) -> Option<Vec<Verb>> {
        let mut params = self.base_params(status);
        params.extend(extra);
        let inner = self.inner.clone();
        let (u, m, p) = (url.to_owned(), method.to_owned(), params.clone());
        let result = match self
            .until(async move { inner.send_webhook(&u, &m, &p).await })
            .await
        {
            Waited::Done(r) => r,
            Waited::Ended => return None,
        };
        let at_ms = self.cell.elapsed_ms();
        let mut record = WebhookRecord {
            url: url.to_owned(),
            method: method.to_owned(),
            params,
            http_status: None,
            body: None,
            error: None,
            at_ms,
        };
        let outcome = match result {
            Ok((status, body)) => {
                record.http_status = Some(status);
                record.body = Some(body.clone());
                if (200..300).contains(&status) {
                    twiml::parse(&body).map_err(|e| (12100, format!("Document parse failure: {e}")))
                } else {
                    Err((11200, format!("HTTP retrieval failure: status {status}")))
                }
            }
            Err(WebhookError::Timeout) => {
                record.error = Some("timeout".into());
                Err((11205, "HTTP connection failure: timed out".to_owned()))
            }
            Err(WebhookError::Request(e)) => {
                record.error = Some(e.clone());
                Err((11200, format!("HTTP retrieval failure: {e}")))
            }
        };
        let http_status = record.http_status;
        self.cell.rec().webhooks.push(record);
        self.inner.emit(SimEvent::Webhook {
            sid: self.sid().to_owned(),
            http_status,
        });
        match outcome {
            Ok(v) => Some(v),
            Err((code, msg)) => {
                self.app_error(code, msg);
                None
            }
        }
    }

    fn answered(&self) -> bool {
        self.cell.rec().answered_at_ms.is_some()
    }

    /// Runs TwiML, then whatever a call update redirects the call to, until the call ends.
    async fn execute(&mut self, verbs: Vec<Verb>) {
        self.run_verbs(verbs).await;
        loop {
            // Seen before taken: a redirect arriving after this wakes the next wait.
            self.redirect_rx.borrow_and_update();
            let Some(to) = self.cell.take_redirect() else {
                return;
            };
            if self.is_ended() {
                return;
            }
            let verbs = match to {
                Redirect::Twiml(v) => Some(v),
                Redirect::Url { url, method } => {
                    self.fetch_twiml(&url, &method, CallStatus::InProgress, Vec::new())
                        .await
                }
            };
            // None: the fetch failed (the call has ended) or yet another redirect came in
            // meanwhile; the loop sorts out which.
            if let Some(v) = verbs {
                self.run_verbs(v).await;
            }
        }
    }

    /// Runs a `<Dial>`; returns the action URL's TwiML (which replaces the rest of the
    /// document), or `None` to go on with the next verb (no action) or stop (call ended).
    async fn dial(&mut self, spec: twiml::DialSpec) -> Option<Vec<Verb>> {
        let (status, ring) = if spec.number.ends_with("0486") {
            ("busy", Duration::from_millis(300))
        } else if spec.number.ends_with("0487") {
            // Rings out (shortened: the simulator does not make tests wait `timeout`).
            ("no-answer", Duration::from_millis(300))
        } else if spec.number.ends_with("0488") {
            ("failed", Duration::from_millis(100))
        } else {
            ("completed", Duration::from_millis(200))
        };
        if !self.sleep(ring).await {
            return None;
        }
        let mut record = crate::model::DialRecord {
            number: spec.number.clone(),
            status: status.to_owned(),
            action: spec.action.clone(),
            caller_id: spec.caller_id.clone(),
            ..Default::default()
        };
        if status == "completed" {
            if let Some(url) = &spec.whisper_url {
                let verbs = self
                    .fetch_twiml(url, "POST", CallStatus::InProgress, Vec::new())
                    .await?;
                record.whisper = verbs
                    .into_iter()
                    .filter_map(|v| match v {
                        Verb::Say { text, .. } => Some(text),
                        _ => None,
                    })
                    .collect();
            }
            record.duration_secs = crate::model::DIAL_TALK.as_secs();
            self.cell.rec().dials.push(record);
            if !self.sleep(crate::model::DIAL_TALK).await {
                return None;
            }
        } else {
            self.cell.rec().dials.push(record);
        }
        let action = spec.action?;
        let duration = if status == "completed" {
            crate::model::DIAL_TALK.as_secs()
        } else {
            0
        };
        let extra = vec![
            ("DialCallStatus".to_owned(), status.to_owned()),
            ("DialCallDuration".to_owned(), duration.to_string()),
            ("DialCallSid".to_owned(), crate::new_sid("CA")),
        ];
        self.fetch_twiml(&action, &spec.method, CallStatus::InProgress, extra)
            .await
    }

    async fn run_verbs(&mut self, verbs: Vec<Verb>) {
        let per_char = self.inner.cfg.timing.say_per_char;
        let mut verbs = verbs.into_iter();
        while let Some(verb) = verbs.next() {
            if self.is_ended() || self.cell.has_redirect() {
                return;
            }
            if let Verb::Reject { reason } = &verb {
                let status = match (self.answered(), reason.as_str()) {
                    (true, _) => CallStatus::Completed,
                    (false, "busy") => CallStatus::Busy,
                    (false, _) => CallStatus::NoAnswer,
                };
                return self.end_self(status, EndReason::Rejected);
            }
            // Any verb but <Reject> answers an inbound call.
            if !self.answered() && !self.advance(CallStatus::InProgress) {
                return;
            }
            match verb {
                Verb::Say { text, loops } => {
                    let chars = text.chars().count().max(1) as u32;
                    self.cell.rec().said.push(text);
                    let d = per_char.saturating_mul(chars.saturating_mul(loops));
                    if !self.sleep(d).await {
                        return;
                    }
                }
                Verb::Pause { length_secs } => {
                    if !self.sleep(Duration::from_secs(length_secs)).await {
                        return;
                    }
                }
                Verb::Hangup => {
                    return self.end_self(CallStatus::Completed, EndReason::TwimlHangup);
                }
                Verb::Stream(spec) => {
                    if stream::run(self, &spec).await == stream::StreamEnd::CallEnded {
                        return;
                    }
                }
                Verb::Unsupported(name) => {
                    tracing::debug!(sid = %self.sid(), verb = %name, "simulator skips unsupported TwiML");
                    self.cell.rec().unsupported_verbs.push(name);
                }
                Verb::Reject { .. } => {}
                Verb::Dial(spec) => {
                    let has_action = spec.action.is_some();
                    match self.dial(spec).await {
                        Some(next) => verbs = next.into_iter(),
                        None if has_action || self.is_ended() => return,
                        None => {}
                    }
                }
                Verb::PlayDigits(digits) => {
                    // Twilio's tones: about 100 ms a key; `w` waits half a second.
                    let d: Duration = digits
                        .chars()
                        .map(|c| {
                            if c.eq_ignore_ascii_case(&'w') {
                                Duration::from_millis(500)
                            } else {
                                Duration::from_millis(100)
                            }
                        })
                        .sum();
                    self.cell.rec().played_digits.push(digits);
                    if !self.sleep(d).await {
                        return;
                    }
                }
            }
        }
        if !self.cell.has_redirect() {
            self.end_self(CallStatus::Completed, EndReason::TwimlEnd);
        }
    }

    /// The final callback, then "ended" once every callback has been delivered.
    pub(crate) async fn teardown(&mut self) {
        if !self.is_ended() {
            // Only reachable if a step above returned without ending the call.
            self.end_self(CallStatus::Completed, EndReason::TwimlEnd);
        }
        let status = self.cell.rec().status;
        if self.cell.dialed.load(Ordering::SeqCst) {
            self.status_callback(status);
        }
        self.cb_tx = None;
        if let Some(done) = self.cb_done.take() {
            let _ = done.await;
        }
        self.cell.ended_tx.send_replace(true);
        self.inner.emit(SimEvent::CallEnded {
            sid: self.sid().to_owned(),
            status,
        });
    }
}

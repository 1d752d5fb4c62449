//! The call domain. [`Calls`] is the one entry point for the HTTP handlers and `serve`; its
//! children each own one job:
//!
//! * `intake`: `POST /calls` checked into a typed new call and persisted (queued)
//! * `dialer`: queue, capacity, pacing, claims, the carrier's create-call
//! * `answer`: what the carrier does with an answered or incoming call (a [`Script`])
//! * `stream`: a carrier's media stream attached and bridged
//! * `lifecycle`: state changes, ends, reconciliation, recovery, drain, what a bridge's
//!   outcome means for the call
//! * `setup`: call -> tenant -> config resolution, and the engine session
//! * `session`: the per-call in-memory entry (events, end signal, pre-warm, bridged)
//! * `campaigns`: campaigns (model, import, calling hours, the scheduler feeding the dialer)
//! * `jobs`: the durable job runner (tenant webhooks, Ultravox transcripts, reconciliation)
//!
//! Children share `shared::Shared` and never import from this file's facade.

pub mod amd;
mod answer;
pub mod campaigns;
mod dialer;
mod error;
mod handover;
mod intake;
pub mod jobs;
pub mod keypad;
mod lifecycle;
pub mod retention;
mod session;
mod setup;
mod shared;
mod stream;
pub mod tools;
mod web;

pub use web::WebCallError;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use error::CallError;
pub use intake::CreateCallRequest;
pub use session::{CallEvent, Session};

use crate::config::Config;
use crate::media::leg::Leg;
use crate::ops::metrics::Metrics;
use crate::store::calls::{Call, Scope};
use crate::store::{Store, StoreError};
use crate::telephony::{CarrierUpdate, InboundCall, Script, StreamStart};
use shared::Shared;

/// A handover refusal as the API reports it.
fn handover_error(e: handover::HandoverError, field: &str) -> CallError {
    use handover::HandoverError as H;
    match e {
        H::NotFound => CallError::Store(StoreError::NotFound("call")),
        e @ (H::NotLive(_) | H::NotBridged | H::Busy) => CallError::Conflict(e.to_string()),
        e @ (H::Invalid(_) | H::NotAllowed(_)) => CallError::invalid(field, e.to_string()),
        e @ (H::Carrier(_) | H::Internal(_)) => CallError::Unavailable(e.to_string()),
    }
}

pub use crate::domain::{CallStatus, Direction};

/// The call service. Cheap to share (`Arc`); all state lives behind it.
pub struct Calls {
    s: Arc<Shared>,
}

impl Calls {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            s: Arc::new(Shared::new(store, config, shutdown)?),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.s.store
    }

    /// The configuration now in force (a snapshot: a reload swaps in a new one).
    pub fn config(&self) -> Arc<Config> {
        self.s.config()
    }

    /// Puts a reloaded configuration in force for new calls and requests.
    pub fn replace_config(&self, config: Arc<Config>) {
        self.s.replace_config(config)
    }

    /// The metric handles the call path updates (shared with the HTTP layer and TLS).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.s.metrics.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.s.is_draining()
    }

    /// Stop dialing: new calls stay queued (persisted) for the next start.
    pub fn set_draining(&self) {
        self.s.set_draining()
    }

    /// Calls whose media runs through a bridge in this process now.
    pub fn bridged_count(&self) -> usize {
        self.s.sessions.bridged_count()
    }

    /// Calls with an in-memory session (live, or followed).
    pub fn session_count(&self) -> usize {
        self.s.sessions.len()
    }

    /// Starts the background workers: the dialer and the job runner.
    pub fn spawn_workers(&self) {
        tokio::spawn(dialer::run(self.s.clone()));
        tokio::spawn(jobs::run(self.s.clone()));
        tokio::spawn(campaigns::scheduler::run(self.s.clone()));
        tokio::spawn(retention::run(self.s.clone()));
    }

    /// Runs the `[retention]` purge now (it also runs daily on its own).
    pub async fn purge(&self) -> Result<retention::Purged, crate::store::StoreError> {
        self.s.purge().await
    }

    /// `POST /campaigns`: validates and stores a campaign (running unless `paused`).
    pub async fn campaign_create(
        &self,
        scope: Scope,
        req: campaigns::CreateCampaignRequest,
    ) -> Result<crate::store::campaigns::Campaign, CallError> {
        self.s.campaign_create(scope, req).await
    }

    /// `POST /campaigns/{id}/recipients`.
    pub async fn campaign_import(
        &self,
        scope: Scope,
        id: String,
        upload: campaigns::Upload,
    ) -> Result<campaigns::ImportReport, CallError> {
        self.s.campaign_import(scope, id, upload).await
    }

    /// Pause, resume or cancel a campaign.
    pub async fn campaign_set_status(
        &self,
        scope: Scope,
        id: String,
        to: crate::domain::campaign::CampaignStatus,
    ) -> Result<crate::store::campaigns::Campaign, CallError> {
        self.s.campaign_set_status(scope, id, to).await
    }

    /// Graceful stop: no new dialing; live calls get `timeout`, then are ended politely.
    /// `force` (a second signal) cuts it short.
    pub async fn drain(&self, timeout: Duration, force: CancellationToken) {
        self.s.drain(timeout, force).await
    }

    /// Closes calls interrupted by the previous process's end.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        self.s.recover().await
    }

    /// `POST /calls`: validates and persists an outbound call (queued), then wakes the
    /// dialer. Returns the call and whether it was created now (false: an idempotent replay).
    pub async fn create(
        &self,
        scope: Scope,
        req: CreateCallRequest,
        idempotency_key: Option<String>,
    ) -> Result<(Call, bool), CallError> {
        let new = intake::NewCall::validate(req, idempotency_key)?;
        self.s.create(scope, new).await
    }

    /// `POST /calls/{id}/end`: cancel a queued call, or hang up / cancel at the carrier.
    pub async fn end(
        &self,
        scope: Scope,
        id: &str,
        reason: &'static str,
    ) -> Result<Call, CallError> {
        self.s.end(scope, id, reason).await
    }

    /// Starts the WebRTC endpoint for browser calls (`[webrtc]`).
    pub async fn start_webrtc(&self) -> std::io::Result<()> {
        self.s.start_webrtc().await
    }

    /// The WebRTC endpoint's advertised address, once started.
    pub fn webrtc_addr(&self) -> Option<std::net::SocketAddr> {
        self.s.webrtc.get().map(|e| e.addr())
    }

    /// `POST /web-calls`: a browser call for `tenant_id` from an SDP offer.
    pub async fn web_call(
        &self,
        tenant_id: i64,
        offer: &str,
        max_duration_secs: Option<i64>,
    ) -> Result<(Call, String), WebCallError> {
        self.s.web_call(tenant_id, offer, max_duration_secs).await
    }

    /// `DELETE /web-calls/{id}`.
    pub async fn web_call_end(&self, scope: Scope, id: &str) -> Result<Call, WebCallError> {
        self.s.web_call_end(scope, id).await
    }

    /// The session to follow a live call's events on.
    pub fn follow(&self, id: &str) -> Arc<Session> {
        self.s.sessions.get_or_create(id)
    }

    /// Forgets a session made by [`Calls::follow`] for a call that turned out to be over.
    pub fn unfollow(&self, id: &str) {
        self.s.sessions.discard(id)
    }

    /// A call to one of our numbers (`None`: the carrier's request lacked a field).
    pub async fn inbound(&self, call: Option<InboundCall>) -> Script {
        self.s.inbound(call).await
    }

    /// Our outbound call `id` was answered.
    pub async fn answer(&self, id: &str, update: CarrierUpdate) -> Script {
        self.s.answer(id, update).await
    }

    /// A carrier's media stream for one of our calls, from its start to its end.
    pub async fn serve_stream<L: Leg>(&self, leg: L, start: StreamStart) {
        self.s.serve_stream(leg, start).await
    }

    /// Whether call `id` exists (a carrier callback for anything else is refused).
    pub async fn knows(&self, id: &str) -> bool {
        let id = id.to_owned();
        self.s
            .store
            .run(move |c| crate::store::calls::get(c, Scope::All, &id).map(|_| ()))
            .await
            .is_ok()
    }

    /// `POST /calls/{id}/dtmf`: plays digits on a live call of `scope`'s; the
    /// conversation carries on afterwards.
    pub async fn send_dtmf(&self, scope: Scope, id: &str, digits: &str) -> Result<(), CallError> {
        let call = self.scoped_call(scope, id).await?;
        handover::send_dtmf(&self.s, &call, digits)
            .await
            .map_err(|e| handover_error(e, "digits"))
    }

    /// `POST /calls/{id}/transfer`: transfers a live call of `scope`'s to one of its
    /// tenant's transfer numbers.
    pub async fn transfer(
        &self,
        scope: Scope,
        id: &str,
        destination: &str,
        summary: &str,
    ) -> Result<(), CallError> {
        let call = self.scoped_call(scope, id).await?;
        handover::transfer(&self.s, &call, destination, summary)
            .await
            .map_err(|e| handover_error(e, "destination"))
    }

    /// The id of call `id` if `scope` may see it (another tenant's call is not found).
    async fn scoped_call(
        &self,
        scope: Scope,
        id: &str,
    ) -> Result<crate::domain::ids::CallId, CallError> {
        let gid = id.to_owned();
        let call = self
            .s
            .store
            .run(move |c| crate::store::calls::get(c, scope, &gid))
            .await?;
        Ok(call.id)
    }

    /// The carrier reports how a transfer's dial ended; returns what the call does next.
    pub async fn dial_ended(&self, id: &str, status: &str, duration: Option<i64>) -> Script {
        self.s.dial_ended(id, status, duration).await
    }

    /// What the person answering a warm transfer of call `id` hears first.
    pub fn whisper(&self, id: &str) -> Script {
        self.s.whisper(id)
    }

    /// The carrier reports on call `id` (status callback, answering-machine detection).
    pub async fn carrier_update(&self, id: &str, update: CarrierUpdate) {
        let answered_by = update.answered_by.clone();
        let call = self.s.apply_update(id, update).await;
        if let (Some(ab), Some(call)) = (answered_by, call)
            && !call.status.is_terminal()
        {
            self.s.machine_answered(id, &ab).await;
        }
    }
}

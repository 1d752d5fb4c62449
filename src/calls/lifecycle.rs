//! Call state changes: provider updates, our own ends, reconciliation with the carrier,
//! recovery after a restart, and the graceful drain. Every change of a call's state goes
//! through [`Shared::apply`], which also fans it out and frees capacity.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::error::CallError;
use super::session::CallEvent;
use super::shared::Shared;
use crate::domain::CallStatus;
use crate::domain::phrases;
use crate::media::bridge::Outcome;
use crate::media::leg::Leg;
use crate::store::calls::{self, Call, Scope, Transition};
use crate::store::{StoreError, callpath};
use crate::telephony::{CarrierUpdate, Script};

impl Shared {
    /// Applies a transition, publishes it to followers, and frees capacity on terminal states.
    pub async fn apply(&self, id: &str, t: Transition) -> Option<Call> {
        let tid = id.to_owned();
        let result = self
            .store
            .run(move |c| calls::transition(c, &tid, &t))
            .await;
        match result {
            Ok(Some(call)) => {
                self.announce(&call);
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

    /// Tells followers and workers about a state change already written.
    pub(super) fn announce(&self, call: &Call) {
        let id = call.id.as_str();
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
            self.sessions.finish(id, ev);
            self.wake.dial.notify_one();
            self.wake.jobs.notify_one();
            self.wake.campaigns.notify_one();
        } else {
            tracing::info!(call_id = %call.id, call_sid = call.twilio_call_sid.as_deref().unwrap_or(""), status = %call.status, "call status");
            self.sessions.publish(id, ev);
        }
    }

    /// Applies what the carrier reports about call `id`.
    pub async fn apply_update(&self, id: &str, u: CarrierUpdate) -> Option<Call> {
        self.apply(
            id,
            Transition {
                status: u.status,
                seq: u.seq,
                duration_seconds: u.duration,
                answered_by: u.answered_by,
                error: u.error,
                ..Default::default()
            },
        )
        .await
    }

    /// Replaces what the caller hears with a short spoken apology and a hang-up (the
    /// carrier speaks it), so an engine failure is never dead air.
    pub async fn apologize(&self, sid: &str) {
        let script = Script::SayHangup(phrases::TECHNICAL_DIFFICULTIES);
        if let Err(e) = self.carrier.redirect(sid, &script).await {
            tracing::warn!(call_sid = %sid, error = %e, "cannot play the apology");
        }
    }

    /// A bridge ended: the caller hears an apology if the engine failed (before the stream
    /// closes: once it does, the carrier hangs up without a word), the stream is closed, and
    /// the record is closed when no provider callback will.
    pub(super) async fn stream_ended<L: Leg>(
        &self,
        id: &str,
        call_sid: &str,
        inbound: bool,
        mut leg: L,
        mut outcome: Outcome,
    ) {
        if outcome.is_handover() {
            leg.close().await;
            if let Some(crate::media::bridge::Parked(engine)) = outcome.parked.take() {
                let back = match self.sessions.get(id) {
                    Some(s) => s.park(engine),
                    None => Err(engine),
                };
                if let Err(engine) = back {
                    // The call ended meanwhile: nobody will take the engine back.
                    engine.close().await;
                }
            }
            tracing::info!("media stream handed over; the call goes on");
            return;
        }
        if outcome.engine_failed() && !call_sid.is_empty() {
            self.apologize(call_sid).await;
        }
        leg.close().await;
        tracing::info!(reason = outcome.reason, "media stream ended");
        if inbound {
            // Twilio sends no status callbacks for inbound calls by default (SPEC §4).
            let status = if outcome.engine_failed() {
                CallStatus::Failed
            } else {
                CallStatus::Completed
            };
            self.apply(
                id,
                Transition {
                    status: Some(status),
                    error: outcome.error,
                    ..Default::default()
                },
            )
            .await;
        } else {
            if let Some(e) = outcome.error {
                let eid = id.to_owned();
                let _ = self.store.run(move |c| calls::set_error(c, &eid, &e)).await;
            }
            // The carrier's `completed` callback normally closes the record; if it never
            // comes (lost, or the call lingers), the carrier is asked shortly.
            let at = crate::domain::timefmt::now_ms() + 15_000;
            let rid = id.to_owned();
            let _ = self
                .store
                .run(move |c| callpath::reconcile_by(c, &rid, at))
                .await;
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

    /// Cancel a queued call, or hang up / cancel at the carrier.
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
        // Stop our side of the media at once; the carrier's callback confirms the end.
        if let Some(session) = self.sessions.get(id) {
            session.end_token().cancel();
        }
        if let Some(sid) = &call.twilio_call_sid {
            let answered = call.status == CallStatus::InProgress;
            match self.carrier.hangup(sid, answered).await {
                Ok(()) => {}
                Err(e) if e.is_over() => {
                    // Already over at the carrier: settle it from what it says now.
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

    /// Asks the carrier for a call's state and applies it (missed callbacks, restarts).
    pub async fn reconcile(&self, id: &str, sid: &str) {
        match self.carrier.fetch(sid).await {
            Ok(u) => {
                if u.status.is_some() {
                    self.apply_update(id, u).await;
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

    /// Closes calls that were live when the previous process died, honestly: they end with
    /// `server_restart` (and are hung up at the carrier if still up there). Queued calls stay
    /// queued and are dialed by the dialer.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let unfinished = self.store.run(|c| calls::unfinished(c)).await?;
        let n = unfinished.len();
        for (id, status, sid) in unfinished {
            self.note_end_reason(&id, "server_restart").await;
            if let Some(sid) = &sid
                && let Err(e) = self
                    .carrier
                    .hangup(sid, status == CallStatus::InProgress)
                    .await
                && !e.is_not_found()
            {
                tracing::warn!(call_id = %id, error = %e, "cannot hang up interrupted call at Twilio");
            }
            let final_status = match (status, &sid) {
                (CallStatus::InProgress, _) => CallStatus::Completed,
                (_, Some(_)) => CallStatus::Canceled,
                // Claimed but never confirmed by the carrier: we cannot know it was not
                // dialed, so it is closed rather than dialed a second time.
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
            // through the carrier.
            if let Ok(active) = self.store.run(|c| calls::active(c, Scope::All)).await {
                for call in active {
                    if call.status != CallStatus::Queued
                        && !self
                            .sessions
                            .get(call.id.as_str())
                            .is_some_and(|s| s.is_bridged())
                        && let Err(e) = self.end(Scope::All, call.id.as_str(), "shutdown").await
                    {
                        tracing::warn!(call_id = %call.id, error = %e, "cannot end call at shutdown");
                    }
                }
            }
            let grace = tokio::time::Instant::now() + Duration::from_secs(15);
            self.wait_no_live(grace, &force).await;
        }
        self.sessions.close_all();
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
            if self.live_count().await == 0 && self.sessions.bridged_count() == 0 {
                return true;
            }
            tokio::select! {
                _ = self.wake.dial.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = force.cancelled() => return false,
            }
        }
    }
}

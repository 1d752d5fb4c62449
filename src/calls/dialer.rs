//! The dialer: takes queued calls within capacity (server-wide and per tenant), paced to the
//! carrier's calls-per-second, claims each and asks the carrier to place it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::session::CallEvent;
use super::shared::Shared;
use crate::domain::CallStatus;
use crate::engines::breaker::State as BreakerState;
use crate::ops::metrics::circuit;
use crate::store::StoreError;
use crate::store::calls::{self, Transition};
use crate::store::tenants;
use crate::telephony::Dial;

/// The carrier's own call time limit exceeds our duration governor by this much, so the
/// governor's goodbye comes first and the carrier's hard cut only catches what we miss.
pub const TIME_LIMIT_GRACE_SECS: u64 = 30;

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

pub async fn run(s: Arc<Shared>) {
    let mut pacer = Pacer::new(s.config().twilio.calls_per_second);
    let queue_timeout_ms = s.config().server.queue_timeout.0.as_millis() as i64;
    loop {
        tokio::select! {
            _ = s.wake.dial.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = s.shutdown.cancelled() => return,
        }
        if let Err(e) = expire_queue(&s, queue_timeout_ms).await {
            tracing::error!(error = %e, "expiring queued calls failed");
        }
        if s.is_draining() {
            if let Ok((live, queued)) = s
                .store
                .run(|c| Ok((calls::live_counts(c)?.0, calls::queued_count(c)?)))
                .await
            {
                publish_gauges(&s, live, queued);
            }
            continue;
        }
        let max = s.config().server.max_concurrent_calls as i64;
        // Campaign calls stop short of the inbound reserve; API calls may use every line.
        let campaign_max = max - s.config().server.inbound_reserve() as i64;
        let work = s
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
        publish_gauges(&s, live, queued.len() as i64);
        for (id, tenant_id, _, from_campaign) in queued {
            if live >= max || s.is_draining() {
                break;
            }
            if from_campaign && live >= campaign_max {
                continue;
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
                _ = s.shutdown.cancelled() => return,
            }
            let claim_id = id.clone();
            match s
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
            s.sessions.publish(
                &id,
                CallEvent::Status {
                    status: CallStatus::Initiating,
                    end_reason: None,
                },
            );
            let s = s.clone();
            tokio::spawn(async move { dial(&s, id).await });
        }
    }
}

async fn dial(s: &Shared, id: String) {
    let detail_id = id.clone();
    let detail = match s.store.run(move |c| calls::detail(c, &detail_id)).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(call_id = %id, error = %e, "cannot load call to dial");
            return;
        }
    };
    let config = s.config();
    let req = Dial {
        call_id: id.clone(),
        to: detail.call.to.clone(),
        from: detail.call.from.clone(),
        public_url: config.public_url(),
        ring_timeout_secs: config.twilio.ring_timeout.as_secs() as u32,
        // A backstop only: our own governor ends the call politely at max_duration.
        time_limit_secs: detail
            .max_duration_secs
            .map(|s| s as u64)
            .unwrap_or(config.agent.max_call_duration.as_secs())
            + TIME_LIMIT_GRACE_SECS,
        machine_detection: detail.machine_detection,
        wait_for_message_end: detail.machine_action.as_deref() == Some("voicemail"),
        send_digits: detail.send_digits.clone(),
    };
    match s.carrier.create_call(&req).await {
        Ok(sid) => {
            tracing::info!(call_id = %id, call_sid = %sid, "call created at Twilio");
            let sid_id = id.clone();
            if let Err(e) = s
                .store
                .run(move |c| calls::set_twilio_sid(c, &sid_id, &sid))
                .await
            {
                tracing::error!(call_id = %id, error = %e, "cannot store call SID");
            }
        }
        Err(e) => {
            tracing::warn!(call_id = %id, error = %e, "Twilio refused the call");
            let reason = if e.is_refusal() {
                "twilio_error"
            } else {
                "twilio_unreachable"
            };
            s.apply(
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
fn publish_gauges(s: &Shared, live: i64, queued: i64) {
    s.metrics.calls_active.set(live);
    s.metrics.calls_queued.set(queued);
    for (kind, state) in s.breakers.states() {
        let v = match state {
            BreakerState::Closed => circuit::CLOSED,
            BreakerState::HalfOpen => circuit::HALF_OPEN,
            BreakerState::Open => circuit::OPEN,
        };
        s.metrics.engine_circuit_state.with(&[kind.as_str()]).set(v);
    }
    crate::ops::sdnotify::notify_status(&format!(
        "{}{live} live calls, {queued} queued",
        if s.is_draining() {
            "draining; "
        } else {
            "serving; "
        }
    ));
}

async fn expire_queue(s: &Shared, max_age_ms: i64) -> Result<(), StoreError> {
    let expired = s
        .store
        .run(move |c| calls::expired_queued(c, max_age_ms))
        .await?;
    for id in expired {
        tracing::warn!(call_id = %id, "queued call expired before a line was free");
        s.apply(
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

//! The campaign scheduler: turns due recipients into queued call records for the one dialer.
//!
//! Each pass it reads the running campaigns, and for each the recipients whose
//! `next_attempt_at` has come (through the partial index: the cost of a dial does not depend on
//! the list's size). Per recipient, in this order: time zone known, inside its calling hours
//! (else `scheduled` at the next opening), then a pacing slot, then one transaction that
//! re-checks DNC and the campaign's state, inserts the call and marks the recipient `dialing`
//! (`store::campaigns::start_attempt`). The dialer does the rest, within the server's capacity
//! minus `server.inbound_reserve` and at `twilio.calls_per_second`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::amd::MachineDetection;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::hours::{Window, candidate_zones};
use super::template::render;
use crate::calls::shared::Shared;
use crate::domain::timefmt::now_ms;
use crate::store::calls;
use crate::store::campaigns::{self as db, AttemptCall, Running, Started};

/// How often the scheduler looks without being woken (retries and openings come due).
const POLL: Duration = Duration::from_millis(250);

/// Spaces one campaign's dials at most `per_second` apart, without bursts after idle time.
struct Slot {
    interval: Duration,
    next: Instant,
}

impl Slot {
    fn new(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_second.max(0.001)),
            next: Instant::now(),
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.next <= now
    }

    fn take(&mut self, now: Instant) {
        self.next = self.next.max(now) + self.interval;
    }
}

pub async fn run(s: Arc<Shared>) {
    let mut slots: HashMap<String, Slot> = HashMap::new();
    loop {
        let wait = match pass(&s, &mut slots).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "campaign scheduler pass failed");
                POLL
            }
        };
        tokio::select! {
            _ = s.wake.campaigns.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = s.shutdown.cancelled() => return,
        }
    }
}

/// One pass over the running campaigns; returns how long to sleep.
async fn pass(
    s: &Arc<Shared>,
    slots: &mut HashMap<String, Slot>,
) -> Result<Duration, crate::store::StoreError> {
    if s.is_draining() {
        return Ok(POLL);
    }
    let config = s.config();
    let campaign_lines =
        config.server.max_concurrent_calls as i64 - config.server.inbound_reserve() as i64;
    let (running, open) = s
        .store
        .run(|c| Ok((db::running(c)?, calls::open_counts(c)?)))
        .await?;
    slots.retain(|id, _| running.iter().any(|r| &r.id == id));
    // Lines campaigns may still fill: live calls and calls already queued both count, so the
    // queue never grows past what the dialer may place.
    let mut room = campaign_lines - open.live - open.queued;
    let mut wait = POLL;
    let mut queued_any = false;
    for campaign in running {
        if room <= 0 {
            break;
        }
        let slot = slots
            .entry(campaign.id.clone())
            .or_insert_with(|| Slot::new(campaign.calls_per_second));
        let (placed, next) = work_campaign(s, &campaign, slot, &mut room).await?;
        queued_any |= placed > 0;
        if let Some(n) = next {
            wait = wait.min(n);
        }
    }
    if queued_any {
        s.wake.dial.notify_one();
    }
    Ok(wait)
}

/// Queues what one campaign may dial now. Returns the calls queued and, when it was held
/// back only by pacing, how soon its next slot comes.
async fn work_campaign(
    s: &Arc<Shared>,
    campaign: &Running,
    slot: &mut Slot,
    room: &mut i64,
) -> Result<(usize, Option<Duration>), crate::store::StoreError> {
    let id = campaign.id.clone();
    let inflight = s.store.run(move |c| db::inflight(c, &id)).await?;
    let mut free = (campaign.max_concurrent - inflight).min(*room);
    if free <= 0 {
        return Ok((0, None));
    }
    let window = Window {
        start_min: campaign.hours_start as u32,
        end_min: campaign.hours_end as u32,
        days: campaign.days as u8,
    };
    let mut placed = 0;
    // Batches of due rows; rows outside their hours move out of the due set, so the loop ends.
    loop {
        let now = Instant::now();
        if !slot.ready(now) {
            return Ok((placed, Some(slot.next - now)));
        }
        let id = campaign.id.clone();
        let limit = free.clamp(1, 100) as u32;
        let due = s
            .store
            .run(move |c| db::due(c, &id, now_ms(), limit))
            .await?;
        if due.is_empty() {
            return Ok((placed, None));
        }
        for r in due {
            let now_utc: DateTime<Utc> = Utc::now();
            let zones = candidate_zones(&r.to, r.timezone.as_deref());
            let (cid, rid) = (campaign.id.clone(), r.id);
            if zones.is_empty() {
                s.store
                    .run(move |c| db::fail_before_dial(c, &cid, rid, "timezone_unknown"))
                    .await?;
                continue;
            }
            if !window.inside(&zones, now_utc) {
                match window.next_opening(&zones, now_utc) {
                    Some(at) => {
                        let at = at.timestamp_millis();
                        s.store.run(move |c| db::reschedule(c, rid, at)).await?;
                    }
                    None => {
                        s.store
                            .run(move |c| db::fail_before_dial(c, &cid, rid, "no_calling_window"))
                            .await?;
                    }
                }
                continue;
            }
            let now = Instant::now();
            if !slot.ready(now) {
                return Ok((placed, Some(slot.next - now)));
            }
            let call = attempt_call(campaign, &r.to, rid, &r.vars, &r.metadata);
            let tenant_id = campaign.tenant_id;
            let started = s
                .store
                .run(move |c| db::start_attempt(c, &cid, tenant_id, rid, &call))
                .await?;
            match started {
                Started::Suppressed => continue,
                // Paused or canceled meanwhile: stop here, the next pass sees it.
                Started::Skipped => return Ok((placed, None)),
                Started::Queued(_) => {}
            }
            if let Started::Queued(call_id) = started {
                tracing::info!(campaign_id = %campaign.id, call_id = %call_id, "campaign call queued");
                slot.take(now);
                placed += 1;
                free -= 1;
                *room -= 1;
                s.wake.dial.notify_one();
                if free <= 0 {
                    return Ok((placed, None));
                }
            }
        }
    }
}

/// The call for one attempt: the campaign's settings with the recipient's variables filled
/// in; metadata carries the campaign id and the recipient.
fn attempt_call(
    campaign: &Running,
    to: &str,
    recipient_id: i64,
    vars: &Value,
    metadata: &Value,
) -> AttemptCall {
    let st = &campaign.settings;
    let empty = Map::new();
    let mut all_vars = vars.as_object().unwrap_or(&empty).clone();
    all_vars
        .entry("to".to_owned())
        .or_insert_with(|| Value::String(to.to_owned()));
    let text = |k: &str| {
        st.get(k)
            .and_then(Value::as_str)
            .map(|t| render(t, &all_vars))
    };
    let mut meta = st
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(m) = metadata.as_object() {
        meta.extend(m.clone());
    }
    meta.insert("campaign_id".into(), Value::String(campaign.id.clone()));
    meta.insert(
        "recipient".into(),
        json!({"id": recipient_id, "to": to, "vars": vars}),
    );
    // Older campaigns stored a boolean; both spellings parse.
    let detection = st
        .get("machine_detection")
        .cloned()
        .and_then(|v| MachineDetection::try_from(v).ok())
        .unwrap_or(MachineDetection::Off);
    AttemptCall {
        from: st
            .get("from")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        engine: st
            .get("engine")
            .and_then(Value::as_str)
            .unwrap_or("scripted")
            .to_owned(),
        system_prompt: text("system_prompt"),
        greeting: text("greeting"),
        voice: st.get("voice").and_then(Value::as_str).map(str::to_owned),
        machine_detection: detection.requested(),
        machine_action: detection.stored_action().map(str::to_owned),
        voicemail_message: (detection == MachineDetection::Voicemail)
            .then(|| text("voicemail_message"))
            .flatten(),
        metadata: Value::Object(meta),
    }
}

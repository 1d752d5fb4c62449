//! The job runner for the durable queue (`store::jobs`).
//!
//! Tenant webhooks: when a call ends, its record and transcript are POSTed to the tenant's
//! `webhook_url`, signed, from this outbox. Delivery survives restarts and is retried with
//! backoff; each event has a stable id (`X-Voicectl-Event-Id`) so a receiver can drop the rare
//! duplicate (a crash between delivery and bookkeeping). The same runner fetches Ultravox
//! transcripts and reconciles calls whose end no callback reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};

use super::shared::Shared;
use crate::domain::timefmt::now_ms;
use crate::ops::outbound;
use crate::store::calls::{self, Scope};
use crate::store::jobs::{self, Job, JobKind};
use crate::store::{StoreError, tenants};

/// Attempts before an event is given up (marked `dead`); about a day of retries.
const MAX_ATTEMPTS: i64 = 16;

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, as Stripe-style receivers expect.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// How often a live call with no callbacks coming is checked with Twilio.
pub const RECONCILE_EVERY_MS: i64 = 30_000;

/// The client for tenant webhooks (`ops::outbound`), rebuilt when
/// `server.allow_private_targets` changes on reload.
struct WebhookClient {
    allow: Vec<String>,
    http: reqwest::Client,
}

impl WebhookClient {
    fn current(
        slot: &Mutex<Option<WebhookClient>>,
        allow: &[String],
    ) -> Result<reqwest::Client, String> {
        let mut slot = lock(slot);
        match &*slot {
            Some(c) if c.allow == allow => Ok(c.http.clone()),
            _ => {
                let http = outbound::tenant_client(allow, Duration::from_secs(10))
                    .map_err(|e| format!("cannot build the webhook client: {e}"))?;
                *slot = Some(WebhookClient {
                    allow: allow.to_vec(),
                    http: http.clone(),
                });
                Ok(http)
            }
        }
    }
}

/// Webhooks and transcript fetches run this many at once …
const WORKERS: usize = 8;
/// … at most this many for one tenant, so a tenant whose endpoint hangs holds two slots and
/// every other tenant's jobs keep flowing.
const PER_TENANT: usize = 2;
/// Reconcile jobs (which close calls no callback will close) have their own slots.
const RECONCILE_WORKERS: usize = 4;
/// A claimed job comes back by itself after this if the process dies while running it.
const LEASE_MS: i64 = 120_000;

/// One lane of the runner: its slots and, per tenant, how many of them it holds.
struct Lane {
    lane: jobs::Lane,
    slots: Arc<Semaphore>,
    per_tenant: usize,
    busy: Arc<Mutex<HashMap<Option<i64>, usize>>>,
}

impl Lane {
    fn new(lane: jobs::Lane, workers: usize, per_tenant: usize) -> Lane {
        Lane {
            lane,
            slots: Arc::new(Semaphore::new(workers)),
            per_tenant,
            busy: Arc::default(),
        }
    }

    /// Claims what this lane may run now and starts it; true when anything started.
    async fn dispatch(&self, m: &Arc<Shared>, ctx: &Arc<Ctx>, done: &Arc<Notify>) -> bool {
        let free = self.slots.available_permits();
        if free == 0 {
            return false;
        }
        let held = lock(&self.busy).clone();
        let (lane, per_tenant) = (self.lane, self.per_tenant);
        let claimed = m
            .store
            .run(move |c| {
                jobs::claim_due(c, lane, free, now_ms() + LEASE_MS, |t| {
                    per_tenant.saturating_sub(held.get(&t).copied().unwrap_or(0))
                })
            })
            .await;
        let batch = match claimed {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "job runner cannot read jobs");
                return false;
            }
        };
        let started = !batch.is_empty();
        for job in batch {
            // `claim_due` took at most `free`, and only this loop takes slots.
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            *lock(&self.busy).entry(job.tenant_id).or_default() += 1;
            let (m, ctx, done, busy) = (m.clone(), ctx.clone(), done.clone(), self.busy.clone());
            tokio::spawn(async move {
                let outcome = match job.kind {
                    JobKind::Webhook => deliver(&m, &ctx, &job).await,
                    JobKind::UltravoxTranscript => ultravox_transcript(&m, &job).await,
                    JobKind::Reconcile => reconcile(&m, &job).await,
                    JobKind::CampaignCompleted => campaign_completed(&m, &ctx, &job).await,
                    JobKind::Analysis => analysis(&m, &job).await,
                };
                record(&m, &job, outcome).await;
                {
                    let mut b = lock(&busy);
                    if let Some(n) = b.get_mut(&job.tenant_id) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            b.remove(&job.tenant_id);
                        }
                    }
                }
                drop(slot);
                done.notify_one();
            });
        }
        started
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain counters: a poisoned lock still holds consistent values.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the workers share besides `Shared`.
struct Ctx {
    webhook_client: Mutex<Option<WebhookClient>>,
    endpoints: EndpointBreakers,
}

pub async fn run(m: Arc<Shared>) {
    let ctx = Arc::new(Ctx {
        webhook_client: Mutex::new(None),
        endpoints: EndpointBreakers::default(),
    });
    let lanes = [
        Lane::new(jobs::Lane::Reconcile, RECONCILE_WORKERS, RECONCILE_WORKERS),
        Lane::new(jobs::Lane::Other, WORKERS, PER_TENANT),
    ];
    let done = Arc::new(Notify::new());
    loop {
        if m.shutdown.is_cancelled() {
            return;
        }
        let mut started = false;
        for lane in &lanes {
            started |= lane.dispatch(&m, &ctx, &done).await;
        }
        if started {
            // There may be more due than one claim took.
            continue;
        }
        let wait = match m.store.run(|c| jobs::next_run_at(c)).await {
            Ok(Some(at)) if at > now_ms() => {
                Duration::from_millis((at - now_ms()).clamp(10, 2_000) as u64)
            }
            // Due but not claimable (slots or a tenant's share taken): a finishing job wakes
            // the loop sooner.
            Ok(Some(_)) => Duration::from_secs(1),
            _ => Duration::from_secs(2),
        };
        tokio::select! {
            _ = m.wake.jobs.notified() => {}
            _ = done.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = m.shutdown.cancelled() => return,
        }
    }
}

/// After this many consecutive failures an endpoint gets no requests for `ENDPOINT_COOL_DOWN_MS`;
/// then one probe decides. Its jobs wait meanwhile without using up attempts.
const ENDPOINT_THRESHOLD: u32 = 5;
const ENDPOINT_COOL_DOWN_MS: i64 = 60_000;

#[derive(Default)]
struct EndpointBreakers(Mutex<HashMap<String, Breaker>>);

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<i64>,
    probing: bool,
}

impl EndpointBreakers {
    /// Ok to send now, or Err(when to look again).
    fn admit(&self, key: &str, now: i64) -> Result<(), i64> {
        let mut map = lock(&self.0);
        let Some(b) = map.get_mut(key) else {
            return Ok(());
        };
        match b.open_until {
            None => Ok(()),
            Some(t) if now >= t && !b.probing => {
                b.probing = true;
                Ok(())
            }
            Some(t) => Err(t.max(now + 5_000)),
        }
    }

    fn success(&self, key: &str) {
        lock(&self.0).remove(key);
    }

    fn failure(&self, key: &str, now: i64) {
        let mut map = lock(&self.0);
        let b = map.entry(key.to_owned()).or_default();
        b.failures += 1;
        b.probing = false;
        if b.failures >= ENDPOINT_THRESHOLD || b.open_until.is_some() {
            if b.open_until.is_none() {
                tracing::warn!(endpoint = %key, failures = b.failures, "webhook endpoint failing; pausing its deliveries");
            }
            b.open_until = Some(now + ENDPOINT_COOL_DOWN_MS);
        }
    }
}

/// The breaker key of a webhook URL: its origin (no path or query).
fn endpoint_key(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(|_| url.to_owned(), |u| u.origin().ascii_serialization())
}

/// What a job run decided.
enum Next {
    Done,
    /// Poll again at this time (not a failure).
    Later(i64),
}

async fn record(m: &Shared, job: &Job, outcome: Result<Next, String>) {
    let (id, attempts) = (job.id, job.attempts + 1);
    let res = match outcome {
        Ok(Next::Done) => m.store.run(move |c| jobs::done(c, id)).await,
        Ok(Next::Later(at)) => m.store.run(move |c| jobs::snooze(c, id, at)).await,
        Err(e) => {
            let next = (attempts < MAX_ATTEMPTS).then(|| {
                // 5 s, 10 s, 20 s … capped at 1 h between attempts.
                now_ms() + (5_000i64 << (attempts - 1).min(20)).min(3_600_000)
            });
            tracing::warn!(job = %job.kind, call_id = ?job.call_id, attempts, error = %e, gave_up = next.is_none(), "job failed");
            m.store.run(move |c| jobs::retry(c, id, next, &e)).await
        }
    };
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot record job outcome");
    }
}

async fn deliver(m: &Shared, ctx: &Ctx, job: &Job) -> Result<Next, String> {
    let (Some(call_id), Some(tenant_id)) = (job.call_id.clone(), job.tenant_id) else {
        return Ok(Next::Done);
    };
    let event_id = job
        .dedupe_key
        .clone()
        .unwrap_or_else(|| format!("job:{}", job.id));
    let loaded = m
        .store
        .run(move |c| {
            let tenant = tenants::get_by_id(c, tenant_id)?;
            let call = calls::get(c, Scope::All, &call_id)?;
            let transcript = calls::transcript(c, Scope::All, &call_id)?;
            Ok((tenant, call, transcript))
        })
        .await;
    let (tenant, call, transcript) = match loaded {
        Ok(x) => x,
        // The tenant or call was deleted since: nothing to deliver.
        Err(StoreError::NotFound(_)) => return Ok(Next::Done),
        Err(e) => return Err(e.to_string()),
    };
    let (Some(url), Some(secret)) = (tenant.webhook_url, tenant.webhook_secret) else {
        return Ok(Next::Done);
    };
    let body = serde_json::json!({
        "id": event_id,
        "type": "call.ended",
        "created_at": crate::domain::timefmt::rfc3339(now_ms()),
        "call": call,
        "transcript": transcript,
    })
    .to_string()
    .into_bytes();
    post_signed(m, ctx, &tenant.name, &url, &secret, &event_id, body).await
}

/// POSTs one signed tenant webhook through the outbound guard and the endpoint's breaker.
async fn post_signed(
    m: &Shared,
    ctx: &Ctx,
    tenant: &str,
    url: &str,
    secret: &str,
    event_id: &str,
    body: Vec<u8>,
) -> Result<Next, String> {
    // SPEC §10: checked again on every delivery (the row may predate the rule, or have been
    // written behind the API's back); the resolved address is checked when connecting.
    let refused = |reason: &str, why: String| {
        m.metrics.outbound_refused.with(&[reason]).inc();
        tracing::warn!(%tenant, target = %outbound::loggable(url), reason = %why, "webhook refused");
        Err(format!("refused: {why}"))
    };
    let allow = m.config().server.allow_private_targets.clone();
    if let Err(e) = outbound::check(url, &allow) {
        return refused(e.reason(), e.to_string());
    }
    let endpoint = endpoint_key(url);
    if let Err(at) = ctx.endpoints.admit(&endpoint, now_ms()) {
        return Ok(Next::Later(at));
    }
    let http = WebhookClient::current(&ctx.webhook_client, &allow)?;
    let sig = signature(secret, now_ms() / 1000, &body);
    let res = http
        .post(url)
        .header("content-type", "application/json")
        .header("x-voicectl-event-id", event_id)
        .header("x-voicectl-signature", sig)
        .body(body)
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => {
            ctx.endpoints.success(&endpoint);
            tracing::info!(%event_id, "webhook delivered");
            Ok(Next::Done)
        }
        // Redirects are never followed (they could point anywhere, loopback included).
        Ok(r) if r.status().is_redirection() => refused(
            "redirect",
            format!(
                "answered HTTP {} (redirects are not followed)",
                r.status().as_u16()
            ),
        ),
        Ok(r) => {
            if r.status().is_server_error() {
                ctx.endpoints.failure(&endpoint, now_ms());
            } else {
                ctx.endpoints.success(&endpoint);
            }
            Err(format!("HTTP {}", r.status().as_u16()))
        }
        Err(e) => match outbound::refusal(&e) {
            Some(r) => refused(r.reason(), r.to_string()),
            None => {
                ctx.endpoints.failure(&endpoint, now_ms());
                Err(if e.is_timeout() {
                    "timed out".into()
                } else {
                    "connection failed".into()
                })
            }
        },
    }
}

/// The tenant's `campaign.completed` webhook; the campaign id is in the job's dedupe key.
async fn campaign_completed(m: &Shared, ctx: &Ctx, job: &Job) -> Result<Next, String> {
    let Some(key) = job.dedupe_key.clone() else {
        return Ok(Next::Done);
    };
    let Some(campaign_id) = crate::store::campaigns::campaign_of_key(&key).map(str::to_owned)
    else {
        return Ok(Next::Done);
    };
    let loaded = m
        .store
        .run(move |c| {
            let campaign = crate::store::campaigns::get(c, None, &campaign_id)?;
            let tenant = tenants::get_by_id(c, campaign.tenant_id)?;
            Ok((tenant, campaign))
        })
        .await;
    let (tenant, campaign) = match loaded {
        Ok(x) => x,
        Err(StoreError::NotFound(_)) => return Ok(Next::Done),
        Err(e) => return Err(e.to_string()),
    };
    let (Some(url), Some(secret)) = (tenant.webhook_url, tenant.webhook_secret) else {
        return Ok(Next::Done);
    };
    let body = serde_json::json!({
        "id": key,
        "type": "campaign.completed",
        "created_at": crate::domain::timefmt::rfc3339(now_ms()),
        "campaign": campaign,
    })
    .to_string()
    .into_bytes();
    post_signed(m, ctx, &tenant.name, &url, &secret, &key, body).await
}

async fn ultravox_transcript(m: &Shared, job: &Job) -> Result<Next, String> {
    let Some(call_id) = job.call_id.clone() else {
        return Ok(Next::Done);
    };
    let cid = call_id.clone();
    let Some(uv_id) = m
        .store
        .run(move |c| calls::engine_call_id(c, &cid))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(Next::Done);
    };
    let entries = m
        .ultravox
        .transcript(&uv_id)
        .await
        .map_err(|e| e.to_string())?;
    let n = entries.len();
    let tenant_id = job.tenant_id;
    m.store
        .run(move |c| {
            // Replace rather than append, so a retried job cannot duplicate lines.
            calls::replace_transcript(c, &call_id, &entries)?;
            if let Some(t) = tenant_id {
                calls::enqueue_webhook(c, &call_id, t)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(call_id = ?job.call_id, lines = n, "stored Ultravox transcript");
    m.wake.jobs.notify_one();
    Ok(Next::Done)
}

/// Post-call analysis (SPEC §8), stored on the call; storing it lets the call-ended webhook,
/// which waits for it, go at once. A model that fails or answers off the schema leaves an
/// `error` instead (the webhook goes then too); only our own store failing is retried.
async fn analysis(m: &Shared, job: &Job) -> Result<Next, String> {
    let (Some(call_id), Some(tenant_id)) = (job.call_id.clone(), job.tenant_id) else {
        return Ok(Next::Done);
    };
    let cid = call_id.clone();
    let loaded = m
        .store
        .run(move |c| {
            let tenant = tenants::get_by_id(c, tenant_id)?;
            Ok((tenant.analysis, calls::transcript(c, Scope::All, &cid)?))
        })
        .await;
    let (spec, transcript) = match loaded {
        Ok((Some(spec), t)) => (spec, t),
        Ok((None, _)) | Err(StoreError::NotFound(_)) => {
            // Turned off (or deleted) since the call ended: the webhook need not wait.
            release_webhook(m, call_id).await?;
            return Ok(Next::Done);
        }
        Err(e) => return Err(e.to_string()),
    };
    let result = if transcript.is_empty() {
        crate::domain::analysis::CallAnalysis {
            error: Some("nothing was said: no transcript to analyse".into()),
            ..Default::default()
        }
    } else {
        let llm = crate::engines::analysis::llm_config(&m.config());
        crate::engines::analysis::analyse(&llm, &spec, &transcript).await
    };
    if let Some(e) = &result.error {
        tracing::warn!(call_id = %call_id, error = %e, "post-call analysis failed");
    } else {
        tracing::info!(call_id = %call_id, "post-call analysis stored");
    }
    m.store
        .run(move |c| calls::set_analysis(c, &call_id, &result))
        .await
        .map_err(|e| e.to_string())?;
    m.wake.jobs.notify_one();
    Ok(Next::Done)
}

async fn release_webhook(m: &Shared, call_id: String) -> Result<(), String> {
    m.store
        .run(move |c| jobs::run_by(c, &format!("call.ended:{call_id}"), now_ms()).map(|_| ()))
        .await
        .map_err(|e| e.to_string())?;
    m.wake.jobs.notify_one();
    Ok(())
}

async fn reconcile(m: &Shared, job: &Job) -> Result<Next, String> {
    let Some(call_id) = job.call_id.clone() else {
        return Ok(Next::Done);
    };
    let cid = call_id.clone();
    let call = match m.store.run(move |c| calls::get(c, Scope::All, &cid)).await {
        Ok(c) => c,
        Err(StoreError::NotFound(_)) => return Ok(Next::Done),
        Err(e) => return Err(e.to_string()),
    };
    if call.status.is_terminal() {
        return Ok(Next::Done);
    }
    if let Some(sid) = &call.twilio_call_sid {
        m.reconcile(&call_id, sid).await;
    }
    Ok(Next::Later(now_ms() + RECONCILE_EVERY_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_breaker_opens_after_failures_and_lets_one_probe_through() {
        let b = EndpointBreakers::default();
        let key = endpoint_key("https://hooks.example.com:8443/a?b=c");
        assert_eq!(key, "https://hooks.example.com:8443");
        let t = 1_000_000;
        for _ in 0..ENDPOINT_THRESHOLD {
            assert!(b.admit(&key, t).is_ok());
            b.failure(&key, t);
        }
        assert_eq!(b.admit(&key, t), Err(t + ENDPOINT_COOL_DOWN_MS));
        // Another endpoint is not affected.
        assert!(b.admit("https://other.example.com", t).is_ok());
        let later = t + ENDPOINT_COOL_DOWN_MS;
        assert!(b.admit(&key, later).is_ok(), "one probe");
        assert!(b.admit(&key, later).is_err(), "only one");
        b.success(&key);
        assert!(b.admit(&key, later).is_ok());
    }

    #[test]
    fn signature_is_hmac_over_timestamp_and_body() {
        let s = signature("whsec_x", 1700000000, b"{}");
        assert!(s.starts_with("t=1700000000,v1="));
        assert_eq!(s.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(s, signature("whsec_y", 1700000000, b"{}"));
    }
}

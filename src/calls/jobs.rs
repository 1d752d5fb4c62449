//! The job runner for the durable queue (`store::jobs`).
//!
//! Tenant webhooks: when a call ends, its record and transcript are POSTed to the tenant's
//! `webhook_url`, signed, from this outbox. Delivery survives restarts and is retried with
//! backoff; each event has a stable id (`X-Voicectl-Event-Id`) so a receiver can drop the rare
//! duplicate (a crash between delivery and bookkeeping). The same runner fetches Ultravox
//! transcripts and reconciles calls whose end no callback reports.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::shared::Shared;
use crate::domain::timefmt::now_ms;
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

pub async fn run(m: Arc<Shared>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("voicectl/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "job runner cannot start");
            return;
        }
    };
    loop {
        loop {
            if m.shutdown.is_cancelled() {
                return;
            }
            match m.store.run(|c| jobs::next_due(c)).await {
                Ok(Some(job)) => {
                    let id = job.id;
                    let outcome = match job.kind {
                        JobKind::Webhook => deliver(&m, &http, &job).await,
                        JobKind::UltravoxTranscript => ultravox_transcript(&m, &job).await,
                        JobKind::Reconcile => reconcile(&m, &job).await,
                        JobKind::CampaignCompleted => campaign_completed(&m, &http, &job).await,
                    };
                    record(&m, &job, outcome).await;
                    let _ = id;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "job runner cannot read jobs");
                    break;
                }
            }
        }
        let wait = match m.store.run(|c| jobs::next_run_at(c)).await {
            Ok(Some(at)) => Duration::from_millis((at - now_ms()).clamp(10, 2_000) as u64),
            _ => Duration::from_secs(2),
        };
        tokio::select! {
            _ = m.wake.jobs.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = m.shutdown.cancelled() => return,
        }
    }
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

async fn deliver(m: &Shared, http: &reqwest::Client, job: &Job) -> Result<Next, String> {
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
    let sig = signature(&secret, now_ms() / 1000, &body);
    let res = http
        .post(&url)
        .header("content-type", "application/json")
        .header("x-voicectl-event-id", &event_id)
        .header("x-voicectl-signature", sig)
        .body(body)
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => {
            tracing::info!(event_id = %event_id, call_id = %call.id, "webhook delivered");
            Ok(Next::Done)
        }
        Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
        Err(e) => Err(if e.is_timeout() {
            "timed out".into()
        } else {
            "connection failed".into()
        }),
    }
}

/// The tenant's `campaign.completed` webhook; the campaign id is in the job's dedupe key.
async fn campaign_completed(m: &Shared, http: &reqwest::Client, job: &Job) -> Result<Next, String> {
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
    let sig = signature(&secret, now_ms() / 1000, &body);
    let res = http
        .post(&url)
        .header("content-type", "application/json")
        .header("x-voicectl-event-id", &key)
        .header("x-voicectl-signature", sig)
        .body(body)
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => Ok(Next::Done),
        Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
        Err(_) => Err("connection failed".into()),
    }
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
    fn signature_is_hmac_over_timestamp_and_body() {
        let s = signature("whsec_x", 1700000000, b"{}");
        assert!(s.starts_with("t=1700000000,v1="));
        assert_eq!(s.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(s, signature("whsec_y", 1700000000, b"{}"));
    }
}

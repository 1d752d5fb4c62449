//! Tenant webhooks: when a call ends, its record and transcript are POSTed to the tenant's
//! `webhook_url`, signed, from a durable outbox (the `jobs` table). Delivery survives
//! restarts and is retried with backoff; each event has a stable id (`X-Voicectl-Event-Id`)
//! so a receiver can drop the rare duplicate (a crash between delivery and bookkeeping).

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rusqlite::{OptionalExtension, params};
use sha2::Sha256;

use super::manager::CallManager;
use crate::store::calls::{self, Scope};
use crate::store::{StoreError, tenants};
use crate::timefmt::now_ms;

/// Attempts before an event is given up (marked `dead`); about a day of retries.
const MAX_ATTEMPTS: i64 = 16;

struct Job {
    id: i64,
    call_id: String,
    tenant_id: i64,
    event_id: String,
    attempts: i64,
}

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

pub async fn run(m: Arc<CallManager>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("voicectl/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "webhook outbox cannot start");
            return;
        }
    };
    loop {
        loop {
            match next_due(&m).await {
                Ok(Some(job)) => deliver(&m, &http, job).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "webhook outbox cannot read jobs");
                    break;
                }
            }
        }
        tokio::select! {
            _ = m.outbox_wake().notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = m.shutdown_token().cancelled() => return,
        }
    }
}

async fn next_due(m: &CallManager) -> Result<Option<Job>, StoreError> {
    m.store()
        .run(|c| {
            Ok(c.query_row(
                "SELECT id, call_id, tenant_id, dedupe_key, attempts FROM jobs \
                 WHERE kind = 'webhook' AND state = 'pending' AND run_at <= ?1 ORDER BY run_at, id LIMIT 1",
                [now_ms()],
                |r| {
                    Ok(Job {
                        id: r.get(0)?,
                        call_id: r.get(1)?,
                        tenant_id: r.get(2)?,
                        event_id: r.get(3)?,
                        attempts: r.get(4)?,
                    })
                },
            )
            .optional()?)
        })
        .await
}

async fn deliver(m: &CallManager, http: &reqwest::Client, job: Job) {
    let (call_id, tenant_id) = (job.call_id.clone(), job.tenant_id);
    let loaded = m
        .store()
        .run(move |c| {
            let tenant = tenants::get_by_id(c, tenant_id)?;
            let call = calls::get(c, Scope::All, &call_id)?;
            let transcript = calls::transcript(c, Scope::All, &call_id)?;
            Ok((tenant, call, transcript))
        })
        .await;
    let outcome = match loaded {
        Ok((tenant, call, transcript)) => match (tenant.webhook_url, tenant.webhook_secret) {
            (Some(url), Some(secret)) => {
                let body = serde_json::json!({
                    "id": job.event_id,
                    "type": "call.ended",
                    "created_at": crate::timefmt::rfc3339(now_ms()),
                    "call": call,
                    "transcript": transcript,
                });
                let body = body.to_string().into_bytes();
                let sig = signature(&secret, now_ms() / 1000, &body);
                let res = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-voicectl-event-id", &job.event_id)
                    .header("x-voicectl-signature", sig)
                    .body(body)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
                    Err(e) => Err(if e.is_timeout() {
                        "timed out".into()
                    } else {
                        "connection failed".into()
                    }),
                }
            }
            // The tenant removed its webhook since: nothing to deliver.
            _ => Ok(()),
        },
        Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    let attempts = job.attempts + 1;
    let id = job.id;
    let (state, run_at, last_error) = match &outcome {
        Ok(()) => ("done", now_ms(), None),
        Err(_) if attempts >= MAX_ATTEMPTS => ("dead", now_ms(), outcome.clone().err()),
        Err(_) => {
            // 5 s, 10 s, 20 s … capped at 1 h between attempts.
            let delay = (5_000i64 << (attempts - 1).min(20)).min(3_600_000);
            ("pending", now_ms() + delay, outcome.clone().err())
        }
    };
    match &outcome {
        Ok(()) => {
            tracing::info!(event_id = %job.event_id, call_id = %job.call_id, "webhook delivered")
        }
        Err(e) => {
            tracing::warn!(event_id = %job.event_id, call_id = %job.call_id, attempts, error = %e, state, "webhook delivery failed")
        }
    }
    let saved = m
        .store()
        .run(move |c| {
            c.execute(
                "UPDATE jobs SET state = ?1, run_at = ?2, attempts = ?3, last_error = ?4, updated_at = ?5 WHERE id = ?6",
                params![state, run_at, attempts, last_error, now_ms(), id],
            )?;
            Ok(())
        })
        .await;
    if let Err(e) = saved {
        tracing::error!(error = %e, "cannot record webhook delivery");
    }
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

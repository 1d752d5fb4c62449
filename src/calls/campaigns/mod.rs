//! Campaigns (SPEC §7): a list of recipients called with one agent configuration, within each
//! recipient's local calling hours, paced, retried by outcome.
//!
//! * `mod.rs`: `POST /campaigns` checked into a stored campaign; imports; pause/resume/cancel
//! * `import`: CSV and JSON recipient lists
//! * `hours`: candidate time zones and calling windows
//! * `template`: `{{var}}` filling
//! * `scheduler`: due recipients → call records queued for the one dialer (`calls::dialer`)
//!
//! What happens to a recipient when its call ends runs in the store, inside the transaction
//! that ends the call (`store::campaigns::on_call_status`).

pub mod hours;
pub mod import;
pub mod scheduler;
pub mod template;

use std::collections::BTreeSet;

use crate::domain::amd::MachineDetection;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::CallError;
use super::shared::Shared;
use crate::config::HumanDuration;
use crate::domain::EngineKind;
use crate::domain::campaign::{CampaignStatus, RETRY_OUTCOMES, RetryPolicy, RetryRule};
use crate::domain::ids::CampaignId;
use crate::domain::phone::E164;
use crate::store::calls::Scope;
use crate::store::campaigns::{self as db, AddCounts, Campaign, NewCampaign};
use crate::store::tenants::{self, Tenant};
pub use import::Rejected;

/// TCPA: never before 08:00 or after 21:00 at the called party's location.
const EARLIEST_MIN: u32 = 8 * 60;
const LATEST_MIN: u32 = 21 * 60;

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    pub start: String,
    pub end: String,
}

/// The body of `POST /campaigns`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaignRequest {
    pub name: String,
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
    pub voicemail_message: Option<String>,
    #[serde(default)]
    pub calling_hours: Option<Hours>,
    #[serde(default)]
    pub days: Option<Vec<String>>,
    #[serde(default)]
    pub max_concurrent: Option<i64>,
    #[serde(default)]
    pub calls_per_second: Option<f64>,
    /// `off`, `detect` (or `true`), `hangup` or `voicemail`; beats the tenant's.
    #[serde(default)]
    #[schema(inline)]
    pub machine_detection: Option<crate::domain::amd::MachineDetection>,
    /// Per outcome (`busy`, `no_answer`, `failed`, `machine`): `{"attempts", "after"}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub retry: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub paused: Option<bool>,
    /// Admin keys name the tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The answer of an import.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ImportReport {
    pub accepted: u64,
    pub duplicates: u64,
    pub suppressed: u64,
    pub rejected: Vec<Rejected>,
}

/// How an upload arrived.
pub enum Upload {
    Csv(Vec<u8>),
    Json(Vec<u8>),
}

fn invalid(field: &str, m: impl Into<String>) -> CallError {
    CallError::invalid(field, m)
}

fn parse_hhmm(field: &str, s: &str) -> Result<u32, CallError> {
    let bad = || invalid(field, format!("{s:?} is not a time of day (HH:MM)"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 24 || m > 59 || (h == 24 && m != 0) || h.to_string().len() > 2 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn parse_retry(raw: &serde_json::Map<String, Value>) -> Result<RetryPolicy, CallError> {
    let mut p = RetryPolicy::default();
    for (outcome, rule) in raw {
        if !RETRY_OUTCOMES.contains(&outcome.as_str()) {
            return Err(invalid(
                "retry",
                format!("unknown outcome {outcome:?} (use no_answer, busy, failed, voicemail)"),
            ));
        }
        let field = format!("retry.{outcome}");
        let obj = rule
            .as_object()
            .ok_or_else(|| invalid(&field, "must be an object {\"attempts\", \"after\"}"))?;
        if let Some(k) = obj.keys().find(|k| *k != "attempts" && *k != "after") {
            return Err(invalid(&field, format!("unknown field {k:?}")));
        }
        let default = RetryPolicy::default_rule(outcome);
        let attempts = match obj.get("attempts") {
            None => default.attempts,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=20).contains(n))
                .ok_or_else(|| invalid(&field, "attempts must be 1 to 20"))?
                as u32,
        };
        let after_ms = match obj.get("after") {
            None => default.after_ms,
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|d| {
                    let s = d.as_str().ok_or_else(|| {
                        invalid(&field, "after must be durations such as \"30m\"")
                    })?;
                    let d = HumanDuration::parse(s).map_err(|e| invalid(&field, e))?;
                    let ms = d.0.as_millis() as i64;
                    if !(1_000..=7 * 86_400_000).contains(&ms) {
                        return Err(invalid(&field, "each delay must be between 1s and 7d"));
                    }
                    Ok(ms)
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(invalid(
                    &field,
                    "after must be a non-empty list of durations",
                ));
            }
        };
        p.0.insert(outcome.clone(), RetryRule { attempts, after_ms });
    }
    Ok(p)
}

fn resolve_tenant(
    c: &rusqlite::Connection,
    scope: Scope,
    name: Option<&str>,
) -> Result<Result<Tenant, CallError>, crate::store::StoreError> {
    Ok(Ok(match (scope, name) {
        (Scope::Tenant(id), _) => tenants::get_by_id(c, id)?,
        (Scope::All, Some(name)) => tenants::get(c, name)?,
        (Scope::All, None) => {
            let mut all = tenants::list(c)?;
            if all.len() != 1 {
                return Ok(Err(invalid(
                    "tenant",
                    "required with the admin key (name the tenant the campaign is for)",
                )));
            }
            all.remove(0)
        }
    }))
}

/// The template variables a campaign's texts use.
pub fn needed_vars(settings: &Value) -> BTreeSet<String> {
    ["greeting", "system_prompt", "voicemail_message"]
        .iter()
        .filter_map(|k| settings.get(k).and_then(Value::as_str))
        .flat_map(template::vars_of)
        .collect()
}

impl Shared {
    pub async fn campaign_create(
        &self,
        scope: Scope,
        req: CreateCampaignRequest,
    ) -> Result<Campaign, CallError> {
        let config = self.config();
        let name = req.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(invalid("name", "required, at most 200 characters"));
        }
        let (start, end) = match &req.calling_hours {
            None => (EARLIEST_MIN, LATEST_MIN),
            Some(h) => (
                parse_hhmm("calling_hours.start", &h.start)?,
                parse_hhmm("calling_hours.end", &h.end)?,
            ),
        };
        if start >= end {
            return Err(invalid("calling_hours", "start must be before end"));
        }
        if start < EARLIEST_MIN || end > LATEST_MIN {
            return Err(invalid(
                "calling_hours",
                "must stay within 08:00-21:00 recipient-local time",
            ));
        }
        let days = match &req.days {
            None => 0b0011_1111,
            Some(list) if list.is_empty() => return Err(invalid("days", "name at least one day")),
            Some(list) => {
                let mut bits = 0i64;
                for d in list {
                    let i = db::DAY_NAMES
                        .iter()
                        .position(|n| n.eq_ignore_ascii_case(d))
                        .ok_or_else(|| {
                            invalid("days", format!("unknown day {d:?} (use mon … sun)"))
                        })?;
                    bits |= 1 << i;
                }
                bits
            }
        };
        let server_max = config.server.max_concurrent_calls as i64;
        if let Some(n) = req.max_concurrent
            && !(1..=server_max).contains(&n)
        {
            return Err(invalid(
                "max_concurrent",
                format!("must be 1 to {server_max} (server.max_concurrent_calls)"),
            ));
        }
        let cps_max = config.twilio.calls_per_second;
        let cps = req.calls_per_second.unwrap_or(cps_max);
        if !(cps > 0.0 && cps <= cps_max) {
            return Err(invalid(
                "calls_per_second",
                format!("must be above 0 and at most {cps_max} (twilio.calls_per_second)"),
            ));
        }
        let retry = match &req.retry {
            None => RetryPolicy::default(),
            Some(r) => parse_retry(r)?,
        };
        let metadata = match &req.metadata {
            None => json!({}),
            Some(v @ Value::Object(_)) if v.to_string().len() <= 16 * 1024 => v.clone(),
            Some(_) => return Err(invalid("metadata", "must be a JSON object up to 16 KiB")),
        };
        for (field, v, max) in [
            ("system_prompt", &req.system_prompt, 20_000),
            ("greeting", &req.greeting, 2_000),
            ("voicemail_message", &req.voicemail_message, 2_000),
            ("voice", &req.voice, 100),
        ] {
            if v.as_ref().is_some_and(|s| s.chars().count() > max) {
                return Err(invalid(
                    field,
                    format!("too long (at most {max} characters)"),
                ));
            }
        }
        let reserve = config.server.inbound_reserve() as i64;
        let default_engine = config.agent.engine;
        let (default_detection, default_voicemail) = (
            config.agent.machine_detection,
            config.agent.voicemail_message.clone(),
        );
        let default_from = config.twilio.from_number.clone();
        let out = self
            .store
            .run(move |c| {
                let tenant = match resolve_tenant(c, scope, req.tenant.as_deref())? {
                    Ok(t) => t,
                    Err(e) => return Ok(Err(e)),
                };
                let Some(from) = req
                    .from
                    .clone()
                    .or_else(|| tenant.from_number.clone())
                    .or_else(|| Some(default_from).filter(|f| !f.is_empty()))
                else {
                    return Ok(Err(invalid(
                        "from",
                        "no caller ID: pass from, or set the tenant's from_number or twilio.from_number",
                    )));
                };
                if let Err(e) = E164::parse(&from) {
                    return Ok(Err(invalid("from", e.to_string())));
                }
                let engine = match req.engine.as_deref().or(tenant.engine.as_deref()) {
                    Some(e) => match EngineKind::parse(e) {
                        Some(k) => k,
                        None => return Ok(Err(invalid("engine", format!("unknown engine {e:?}")))),
                    },
                    None => default_engine,
                };
                let max_concurrent = req.max_concurrent.unwrap_or_else(|| {
                    tenant
                        .max_concurrent_calls
                        .map(i64::from)
                        .unwrap_or(server_max - reserve)
                        .clamp(1, server_max)
                });
                // Fixed at creation: the campaign's own choice, else the tenant's, else the
                // server's (SPEC §8), so every attempt is dialed alike.
                let detection = MachineDetection::resolve(
                    None,
                    req.machine_detection,
                    tenant
                        .machine_detection
                        .as_deref()
                        .and_then(|m| MachineDetection::parse(m).ok()),
                    default_detection,
                );
                let voicemail_message = req
                    .voicemail_message
                    .clone()
                    .or_else(|| tenant.voicemail_message.clone())
                    .or_else(|| Some(default_voicemail).filter(|m| !m.trim().is_empty()));
                let settings = json!({
                    "from": from,
                    "system_prompt": req.system_prompt,
                    "greeting": req.greeting,
                    "engine": engine.to_string(),
                    "voice": req.voice,
                    "voicemail_message": voicemail_message,
                    "machine_detection": detection.as_str(),
                    "metadata": metadata,
                });
                let new = NewCampaign {
                    id: CampaignId::generate(),
                    tenant_id: tenant.id,
                    name,
                    paused: req.paused.unwrap_or(false),
                    settings,
                    hours_start: start as i64,
                    hours_end: end as i64,
                    days,
                    max_concurrent,
                    calls_per_second: cps,
                    retry,
                };
                db::create(c, &new).map(Ok)
            })
            .await??;
        tracing::info!(campaign_id = %out.id, tenant = %out.tenant, "campaign created");
        self.wake.campaigns.notify_one();
        Ok(out)
    }

    /// Adds recipients. The header, the template variables and the campaign's state are
    /// checked before anything is stored; accepted rows are stored in large transactions.
    pub async fn campaign_import(
        &self,
        scope: Scope,
        id: String,
        upload: Upload,
    ) -> Result<ImportReport, CallError> {
        let store = self.store.clone();
        let max_recipients = self.config().campaigns.max_recipients;
        let check_id = id.clone();
        let campaign = store
            .read(move |c| db::get(c, scope.tenant_id(), &check_id))
            .await?;
        if campaign.status == CampaignStatus::Canceled {
            return Err(CallError::Store(crate::store::StoreError::Conflict(
                "campaign is canceled".into(),
            )));
        }
        if campaign.progress.total as u64 >= max_recipients {
            return Err(invalid(
                "recipients",
                format!(
                    "the campaign already holds {max_recipients} recipients (campaigns.max_recipients)"
                ),
            ));
        }
        let needed = needed_vars(&campaign.settings);
        let tenant_id = campaign.tenant_id;
        let report = tokio::task::spawn_blocking(move || -> Result<ImportReport, CallError> {
            let mut counts = AddCounts::default();
            let mut add = |rows: Vec<db::NewRecipient>| -> Result<(), crate::store::StoreError> {
                let id = id.clone();
                let c = store.blocking(move |c| db::add_recipients(c, &id, tenant_id, &rows))?;
                counts.accepted += c.accepted;
                counts.duplicates += c.duplicates;
                counts.suppressed += c.suppressed;
                Ok(())
            };
            let rejected = match upload {
                Upload::Csv(body) => import::csv(&body, &needed, 20_000, &mut add)??,
                Upload::Json(body) => {
                    let (rows, rejected) = import::json(&body, &needed)?;
                    for chunk in rows.chunks(20_000) {
                        add(chunk.to_vec())?;
                    }
                    rejected
                }
            };
            Ok(ImportReport {
                accepted: counts.accepted,
                duplicates: counts.duplicates,
                suppressed: counts.suppressed,
                rejected,
            })
        })
        .await
        .map_err(|e| CallError::Store(crate::store::StoreError::Task(e.to_string())))??;
        self.wake.campaigns.notify_one();
        Ok(report)
    }

    pub async fn campaign_set_status(
        &self,
        scope: Scope,
        id: String,
        to: CampaignStatus,
    ) -> Result<Campaign, CallError> {
        let out = self
            .store
            .run(move |c| db::set_status(c, scope.tenant_id(), &id, to))
            .await?;
        tracing::info!(campaign_id = %out.id, status = out.status.as_str(), "campaign status");
        self.wake.campaigns.notify_one();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rules_parse_and_refuse_unknown_outcomes() {
        let raw = json!({"no_answer": {"attempts": 2, "after": ["1s", "2m"]}});
        let p = parse_retry(raw.as_object().unwrap()).unwrap();
        assert_eq!(p.next_delay_ms("no_answer", 1), Some(1_000));
        assert_eq!(p.next_delay_ms("no_answer", 2), None);
        let bad = json!({"hangup": {"attempts": 2}});
        assert!(parse_retry(bad.as_object().unwrap()).is_err());
        let bad = json!({"busy": {"attempts": 0}});
        assert!(parse_retry(bad.as_object().unwrap()).is_err());
    }

    #[test]
    fn times_of_day() {
        assert_eq!(parse_hhmm("x", "09:30").unwrap(), 570);
        assert!(parse_hhmm("x", "9").is_err());
        assert!(parse_hhmm("x", "25:00").is_err());
    }
}

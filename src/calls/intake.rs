//! `POST /calls`: the request body checked into a typed new call, its tenant, caller ID and
//! engine resolved, and the call persisted as queued.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::amd::MachineDetection;
use super::error::CallError;
use super::shared::Shared;
use crate::config::HumanDuration;
use crate::domain::phone::E164;
use crate::domain::{EngineKind, RateLimited};
use crate::store::calls::{self, Call, OutboundRequest, Scope};
use crate::store::tenants;

/// The body of `POST /calls`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCallRequest {
    /// The number to call (E.164).
    #[schema(pattern = r"^\+[1-9][0-9]{7,14}$", example = "+14155550123")]
    pub to: String,
    /// Caller ID: one of the tenant's numbers (default: its `from_number`).
    #[schema(pattern = r"^\+[1-9][0-9]{7,14}$", example = "+15005550100")]
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
    #[schema(inline)]
    pub machine_detection: Option<MachineDetection>,
    /// Record this call (beats the tenant's choice).
    #[serde(default)]
    pub record: Option<bool>,
    /// Admin keys name the tenant the call belongs to.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Keys the carrier presses once answered (Twilio `SendDigits`; turns AMD off). Left out
    /// of the request hash when absent, so older idempotent requests keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_digits: Option<String>,
    /// Left on an answering machine after its beep (`machine_detection = "voicemail"`; beats
    /// the tenant's and the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voicemail_message: Option<String>,
}

/// A request that passed every check that needs no database.
pub struct NewCall {
    pub to: E164,
    pub max_duration_secs: Option<i64>,
    pub metadata: serde_json::Value,
    pub idempotency_key: Option<String>,
    /// Hash of the body, to tell a retry from a different request with the same key.
    pub request_hash: String,
    pub req: CreateCallRequest,
}

impl NewCall {
    pub fn validate(
        req: CreateCallRequest,
        idempotency_key: Option<String>,
    ) -> Result<Self, CallError> {
        let to = E164::parse(&req.to).map_err(|e| CallError::invalid("to", e.to_string()))?;
        if let Some(k) = &idempotency_key
            && (k.is_empty() || k.len() > 255)
        {
            return Err(CallError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 characters",
            ));
        }
        let max_duration_secs = req
            .max_duration
            .as_deref()
            .map(|d| {
                let d =
                    HumanDuration::parse(d).map_err(|e| CallError::invalid("max_duration", e))?;
                if !(10..=4 * 3600).contains(&d.as_secs()) {
                    return Err(CallError::invalid(
                        "max_duration",
                        "must be between 10s and 4h",
                    ));
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
                return Err(CallError::invalid("metadata", "larger than 16 KiB"));
            }
            Some(_) => return Err(CallError::invalid("metadata", "must be a JSON object")),
        };
        for (field, v, max) in [
            ("system_prompt", &req.system_prompt, 20_000),
            ("greeting", &req.greeting, 2_000),
            ("voice", &req.voice, 100),
        ] {
            if v.as_ref().is_some_and(|s| s.chars().count() > max) {
                return Err(CallError::invalid(
                    field,
                    format!("too long (at most {max} characters)"),
                ));
            }
        }
        if let Some(m) = &req.voicemail_message {
            crate::domain::amd::check_voicemail_message(m)
                .map_err(|e| CallError::invalid("voicemail_message", e))?;
        }
        if let Some(d) = &req.send_digits {
            super::keypad::check_send_digits(d)
                .map_err(|e| CallError::invalid("send_digits", e))?;
        }
        let request_hash =
            hex::encode(Sha256::digest(serde_json::to_vec(&req).unwrap_or_default()));
        Ok(Self {
            to,
            max_duration_secs,
            metadata,
            idempotency_key,
            request_hash,
            req,
        })
    }
}

impl Shared {
    /// Persists a checked outbound call (queued). Returns the call and whether it was created
    /// now (false: an idempotent replay).
    pub async fn create(&self, scope: Scope, new: NewCall) -> Result<(Call, bool), CallError> {
        let config = self.config();
        let breakers = self.breakers.clone();
        let tenant_calls = self.tenant_calls.clone();
        let outcome = self
            .store
            .run(move |c| {
                let NewCall {
                    to,
                    max_duration_secs,
                    metadata,
                    idempotency_key,
                    request_hash,
                    req,
                } = new;
                let tenant = match (scope, &req.tenant) {
                    (Scope::Tenant(id), _) => tenants::get_by_id(c, id)?,
                    (Scope::All, Some(name)) => tenants::get(c, name)?,
                    (Scope::All, None) => {
                        // An admin with a single tenant need not name it (the dev flow).
                        let mut all = tenants::list(c)?;
                        if all.len() != 1 {
                            return Ok(Err(CallError::invalid(
                                "tenant",
                                "required with the admin key (name the tenant the call is for)",
                            )));
                        }
                        all.remove(0)
                    }
                };
                let Some(from) = req
                    .from
                    .clone()
                    .or_else(|| tenant.from_number.clone())
                    .or_else(|| Some(config.twilio.from_number.clone()).filter(|f| !f.is_empty()))
                else {
                    return Ok(Err(CallError::invalid(
                        "from",
                        "no caller ID: pass from, or set the tenant's from_number or twilio.from_number",
                    )));
                };
                let parsed = match E164::parse(&from) {
                    Ok(p) => p,
                    Err(e) => return Ok(Err(CallError::invalid("from", e.to_string()))),
                };
                // SPEC §10: a tenant key rings people only as itself (its from_number or
                // numbers), never as another tenant or an arbitrary number.
                if let (Scope::Tenant(_), Some(asked)) = (scope, &req.from) {
                    let own = |n: &String| E164::parse(n).is_ok_and(|n| n == parsed);
                    if !(tenant.from_number.iter().any(own) || tenant.numbers.iter().any(own)) {
                        return Ok(Err(CallError::invalid(
                            "from",
                            format!(
                                "{asked} is not one of this tenant's numbers (its from_number or numbers)"
                            ),
                        )));
                    }
                }
                let engine = match req.engine.as_deref().or(tenant.engine.as_deref()) {
                    Some(e) => match EngineKind::parse(e) {
                        Some(k) => k,
                        None => {
                            return Ok(Err(CallError::invalid(
                                "engine",
                                format!("unknown engine {e:?}"),
                            )));
                        }
                    },
                    None => config.agent.engine,
                };
                if engine == EngineKind::Pipeline && config.pipeline.is_none() {
                    return Ok(Err(CallError::invalid(
                        "engine",
                        "engine \"pipeline\" is not configured on this server (no [pipeline] section)",
                    )));
                }
                if !breakers.admit(engine) {
                    return Ok(Err(CallError::EngineUnavailable(engine)));
                }
                // In memory, after the idempotency check (a replay is free): counting the
                // last minute's rows here slowed every creation as the table grew.
                let (tenant_id, own) = (tenant.id, tenant.calls_per_minute);
                let default = config.limits.calls_per_minute_per_tenant;
                let admit = move || {
                    tenant_calls
                        .check(tenant_id, own, default)
                        .map_err(|e| RateLimited {
                            retry_after_secs: e.retry_after.as_header_secs(),
                        })
                };
                let record = req.record;
                // The call's own setting beats the tenant's, which beats the server's.
                let detection = MachineDetection::resolve(
                    req.machine_detection,
                    None,
                    tenant
                        .machine_detection
                        .as_deref()
                        .and_then(|m| MachineDetection::parse(m).ok()),
                    config.agent.machine_detection,
                );
                let voicemail_message = (detection == MachineDetection::Voicemail)
                    .then(|| {
                        req.voicemail_message
                            .clone()
                            .or_else(|| tenant.voicemail_message.clone())
                            .or_else(|| {
                                Some(config.agent.voicemail_message.clone())
                                    .filter(|m| !m.trim().is_empty())
                            })
                    })
                    .flatten();
                let created = calls::create_outbound(
                    c,
                    &OutboundRequest {
                        tenant_id: tenant.id,
                        to: to.to_string(),
                        from,
                        engine: engine.to_string(),
                        system_prompt: req.system_prompt,
                        greeting: req.greeting,
                        voice: req.voice,
                        max_duration_secs,
                        machine_detection: detection.requested(),
                        metadata,
                        idempotency_key,
                        request_hash,
                        send_digits: req.send_digits,
                        machine_action: detection.stored_action().map(str::to_owned),
                        voicemail_message,
                    },
                    admit,
                )?;
                if let Ok((call, true)) = &created
                    && record.is_some()
                {
                    crate::store::recording::set_call_record(c, call.id.as_str(), record)?;
                }
                Ok(Ok(created))
            })
            .await?;
        let (call, created) = outcome??;
        if created {
            tracing::info!(call_id = %call.id, tenant = %call.tenant, to = %call.to, "call queued");
            self.wake.dial.notify_one();
        }
        Ok((call, created))
    }
}

//! The carrier asks what to do with a call that was just answered (ours, outbound) or that
//! is ringing in (to one of our numbers): connect its media to us with a fresh single-use
//! token and pre-warm the engine, connect it straight to Ultravox, or apologize and hang up.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::CallStatus;
use super::phrases;
use super::shared::Shared;
use crate::config::EngineKind;
use crate::ids::random_token;
use crate::store::StoreError;
use crate::store::calls::{self, Scope, Transition};
use crate::store::tenants;
use crate::telephony::{CarrierUpdate, InboundCall, Script};

/// The stream token is random; only its hash is stored, and it is consumed on first use.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Shared {
    /// Our outbound call `id` was answered.
    pub async fn answer(self: &Arc<Self>, id: &str, update: CarrierUpdate) -> Script {
        let gid = id.to_owned();
        let call = match self
            .store
            .run(move |c| calls::get(c, Scope::All, &gid))
            .await
        {
            Ok(c) if !c.status.is_terminal() => c,
            Ok(_) | Err(StoreError::NotFound(_)) => return Script::Hangup,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "answer webhook");
                return Script::SayHangup(phrases::CANNOT_TAKE_THIS_CALL);
            }
        };
        if update.status.is_some() {
            self.apply_update(id, update).await;
        }
        if self.straight_to_ultravox(&call.engine) {
            return self.ultravox_script(id).await;
        }
        self.stream_script(id).await
    }

    /// A call to one of our numbers.
    pub async fn inbound(self: &Arc<Self>, inbound: Option<InboundCall>) -> Script {
        let Some(InboundCall { to, from, sid }) = inbound else {
            return Script::SayHangup(phrases::CANNOT_CONNECT);
        };
        if self.is_draining() {
            return Script::SayHangup(phrases::NOT_TAKING_CALLS);
        }
        let config = self.config();
        let max = config.server.max_concurrent_calls as i64;
        let (to_c, from_c, sid_c) = (to.clone(), from.clone(), sid.clone());
        let result = self
            .store
            .run(move |c| {
                if let Some(existing) = calls::id_by_sid(c, &sid_c)? {
                    // The carrier retried the webhook: same call, new token.
                    return Ok(Some(Ok(existing)));
                }
                let Some(tenant) = tenants::by_number(c, &to_c)? else {
                    return Ok(None);
                };
                let (live, per) = calls::live_counts(c)?;
                let tenant_live = per.get(&tenant.id).copied().unwrap_or(0);
                if live >= max
                    || tenant
                        .max_concurrent_calls
                        .is_some_and(|m| tenant_live >= m as i64)
                {
                    return Ok(Some(Err(tenant.name)));
                }
                let engine = tenant
                    .engine
                    .as_deref()
                    .and_then(EngineKind::parse)
                    .unwrap_or(config.agent.engine);
                let call =
                    calls::create_inbound(c, tenant.id, &to_c, &from_c, engine.as_str(), &sid_c)?;
                Ok(Some(Ok(call.id.to_string())))
            })
            .await;
        match result {
            Ok(None) => {
                tracing::warn!(to = %to, from = %from, call_sid = %sid, "inbound call to an unknown number");
                Script::SayHangup(phrases::NOT_IN_SERVICE)
            }
            Ok(Some(Err(tenant))) => {
                tracing::warn!(tenant = %tenant, call_sid = %sid, "inbound call over capacity");
                Script::SayHangup(phrases::LINES_BUSY)
            }
            Ok(Some(Ok(id))) => {
                tracing::info!(call_id = %id, call_sid = %sid, from = %from, to = %to, "inbound call");
                // Inbound calls get no status callbacks unless the operator set one up, so
                // the call is also settled by asking the carrier while it lasts.
                let rid = id.clone();
                let at = crate::timefmt::now_ms() + super::jobs::RECONCILE_EVERY_MS;
                if let Err(e) = self
                    .store
                    .run(move |c| super::jobs::schedule_reconcile(c, &rid, at))
                    .await
                {
                    tracing::error!(call_id = %id, error = %e, "cannot schedule reconciliation");
                }
                let gid = id.clone();
                let engine = self
                    .store
                    .run(move |c| calls::get(c, Scope::All, &gid))
                    .await
                    .map(|c| c.engine);
                if engine
                    .as_deref()
                    .is_ok_and(|e| self.straight_to_ultravox(e))
                {
                    if !self.breakers.admit(EngineKind::Ultravox) {
                        self.apply(
                            &id,
                            Transition {
                                status: Some(CallStatus::Failed),
                                end_reason: Some("engine_unavailable".into()),
                                ..Default::default()
                            },
                        )
                        .await;
                        return Script::SayHangup(phrases::TECHNICAL_DIFFICULTIES);
                    }
                    return self.ultravox_script(&id).await;
                }
                self.stream_script(&id).await
            }
            Err(e) => {
                tracing::error!(error = %e, "inbound webhook");
                Script::SayHangup(phrases::SOMETHING_WENT_WRONG)
            }
        }
    }

    /// Ultravox with its Twilio medium: the carrier streams to Ultravox, not through a
    /// bridge here.
    fn straight_to_ultravox(&self, engine: &str) -> bool {
        EngineKind::parse(engine) == Some(EngineKind::Ultravox)
            && self.config().ultravox.medium == crate::config::UltravoxMedium::Twilio
    }

    /// Create the Ultravox call and connect the carrier's stream straight to its `joinUrl`.
    /// On failure the caller hears an apology, not dead air.
    async fn ultravox_script(&self, id: &str) -> Script {
        let setup = match self.call_setup(id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot load call");
                return Script::SayHangup(phrases::SOMETHING_WENT_WRONG);
            }
        };
        let config = self.config();
        let voice = crate::engines::ultravox::voice_for(&setup.ctx.voice, &config);
        let req = crate::engines::ultravox::NewCall {
            system_prompt: &setup.ctx.system_prompt,
            voice,
            greeting: Some(setup.ctx.greeting.as_str()).filter(|g| !g.is_empty()),
            max_duration: setup.max_duration,
            call_id: id,
            tenant: &setup.ctx.tenant,
            medium: crate::engines::ultravox::Medium::Twilio,
        };
        match self.ultravox.create_call(&req).await {
            Ok(created) => {
                self.breakers.success(EngineKind::Ultravox);
                let (cid, ucid) = (id.to_owned(), created.call_id.clone());
                if let Err(e) = self
                    .store
                    .run(move |c| calls::set_engine_call_id(c, &cid, &ucid))
                    .await
                {
                    tracing::error!(call_id = %id, error = %e, "cannot store the Ultravox call id");
                }
                tracing::info!(call_id = %id, ultravox_call = %created.call_id, "connecting the call to Ultravox");
                Script::ConnectUrl {
                    url: created.join_url,
                }
            }
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "Ultravox did not create the call");
                self.metrics
                    .engine_errors
                    .with(&["ultravox", "create"])
                    .inc();
                self.breakers.failure(EngineKind::Ultravox);
                self.apply(
                    id,
                    Transition {
                        status: Some(CallStatus::Failed),
                        end_reason: Some("engine_error".into()),
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                )
                .await;
                Script::SayHangup(phrases::TECHNICAL_DIFFICULTIES)
            }
        }
    }

    /// Connect the call's media stream to us with a fresh single-use token, and pre-warm its
    /// engine.
    async fn stream_script(self: &Arc<Self>, id: &str) -> Script {
        let token = random_token(32);
        let hash = token_hash(&token);
        let sid = id.to_owned();
        match self
            .store
            .run(move |c| calls::set_stream_token(c, &sid, &hash))
            .await
        {
            Ok(()) => {
                self.prewarm(id, None);
                Script::ConnectStream {
                    url: self.config().media_url(),
                    params: vec![("call_id", id.to_owned()), ("token", token)],
                }
            }
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "cannot prepare media stream");
                Script::SayHangup(phrases::SOMETHING_WENT_WRONG)
            }
        }
    }

    /// Replaces what the caller hears with a short spoken apology and a hang-up (the
    /// carrier speaks it), so an engine failure is never dead air.
    pub async fn apologize(&self, sid: &str) {
        let script = Script::SayHangup(phrases::TECHNICAL_DIFFICULTIES);
        if let Err(e) = self.carrier.redirect(sid, &script).await {
            tracing::warn!(call_sid = %sid, error = %e, "cannot play the apology");
        }
    }
}

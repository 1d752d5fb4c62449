//! The carrier asks what to do with a call that was just answered (ours, outbound) or that
//! is ringing in (to one of our numbers): connect its media to us with a fresh single-use
//! token and pre-warm the engine, connect it straight to Ultravox, or apologize and hang up.

use crate::domain::ids::token_hash;
use std::sync::Arc;

use super::setup::CallSetup;
use super::shared::Shared;
use crate::domain::CallStatus;
use crate::domain::EngineKind;
use crate::domain::ids::random_token;
use crate::domain::phrases;
use crate::store::callpath::{self, Answer, Inbound};
use crate::store::calls::{self, Transition};
use crate::telephony::{CarrierUpdate, InboundCall, Script};

fn is_ultravox(engine: &str) -> bool {
    EngineKind::parse(engine) == Some(EngineKind::Ultravox)
}

impl Shared {
    /// Our outbound call `id` was answered.
    pub async fn answer(self: &Arc<Self>, id: &str, update: CarrierUpdate) -> Script {
        let token = random_token(32);
        let hash = token_hash(&token);
        let direct = self.ultravox_direct();
        let in_progress = update.status == Some(CallStatus::InProgress);
        let gid = id.to_owned();
        let prepared = self
            .store
            .run(move |c| {
                callpath::prepare_answer(
                    c,
                    &gid,
                    in_progress,
                    |call| !(direct && is_ultravox(&call.engine)),
                    &hash,
                )
            })
            .await;
        match prepared {
            Ok(Answer::Over) => Script::Hangup,
            Ok(Answer::Ready { changed, data }) => {
                if let Some(call) = &changed {
                    self.announce(call);
                }
                let data = *data;
                let setup = CallSetup::resolve(data.detail, data.tenant, &self.config());
                if direct && setup.kind == EngineKind::Ultravox {
                    return self.ultravox_script(id, setup).await;
                }
                self.connect_stream(id, token, setup)
            }
            Err(e) => {
                tracing::error!(call_id = %id, error = %e, "answer webhook");
                Script::SayHangup(phrases::CANNOT_TAKE_THIS_CALL)
            }
        }
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
        let default_engine = config.agent.engine;
        let direct = self.ultravox_direct();
        let token = random_token(32);
        let hash = token_hash(&token);
        // Inbound calls get no status callbacks unless the operator set one up, so the call
        // is also settled by asking the carrier while it lasts.
        let reconcile_at = crate::domain::timefmt::now_ms() + super::jobs::RECONCILE_EVERY_MS;
        let (to_c, from_c, sid_c) = (to.clone(), from.clone(), sid.clone());
        let result = self
            .store
            .run(move |c| {
                callpath::prepare_inbound(
                    c,
                    &to_c,
                    &from_c,
                    &sid_c,
                    max,
                    default_engine,
                    reconcile_at,
                    |call| !(direct && is_ultravox(&call.engine)),
                    &hash,
                )
            })
            .await;
        match result {
            Ok(Inbound::Over) => {
                tracing::info!(call_sid = %sid, "voice webhook for a call that has ended");
                Script::Hangup
            }
            Ok(Inbound::UnknownNumber) => {
                tracing::warn!(to = %to, from = %from, call_sid = %sid, "inbound call to an unknown number");
                Script::SayHangup(phrases::NOT_IN_SERVICE)
            }
            Ok(Inbound::Full { tenant }) => {
                tracing::warn!(tenant = %tenant, call_sid = %sid, "inbound call over capacity");
                Script::SayHangup(phrases::LINES_BUSY)
            }
            Ok(Inbound::Ready { data }) => {
                let id = data.detail.call.id.to_string();
                tracing::info!(call_id = %id, call_sid = %sid, from = %from, to = %to, "inbound call");
                let data = *data;
                let setup = CallSetup::resolve(data.detail, data.tenant, &config);
                if direct && setup.kind == EngineKind::Ultravox {
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
                    return self.ultravox_script(&id, setup).await;
                }
                self.connect_stream(&id, token, setup)
            }
            Err(e) => {
                tracing::error!(error = %e, "inbound webhook");
                Script::SayHangup(phrases::SOMETHING_WENT_WRONG)
            }
        }
    }

    /// Ultravox with its Twilio medium: the carrier streams to Ultravox, not through a
    /// bridge here.
    fn ultravox_direct(&self) -> bool {
        self.config().ultravox.medium == crate::config::UltravoxMedium::Twilio
    }

    /// Create the Ultravox call and connect the carrier's stream straight to its `joinUrl`.
    /// On failure the caller hears an apology, not dead air.
    async fn ultravox_script(&self, id: &str, setup: CallSetup) -> Script {
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
            // Twilio's stream goes straight to Ultravox: no socket of ours to run tools on.
            tools: &[],
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

    /// Connect the call's media stream to us with its single-use token (stored), and
    /// pre-warm its engine.
    fn connect_stream(self: &Arc<Self>, id: &str, token: String, _setup: CallSetup) -> Script {
        // Re-read through `call_setup`: it adds the tenant's tools, which a pre-warmed
        // Realtime session must announce in its first session.update.
        self.prewarm(id, None);
        Script::ConnectStream {
            url: self.config().media_url(),
            params: vec![("call_id", id.to_owned()), ("token", token)],
        }
    }
}

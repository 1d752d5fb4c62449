//! What an engine needs for a call (prompt, greeting, voice: from the call, then its tenant,
//! then the server defaults), and the engine session itself: opened while the phone rings,
//! claimed when the media stream starts.

use std::sync::Arc;
use std::time::Duration;

use super::shared::Shared;
use crate::config::Config;
use crate::domain::{Direction, EngineKind};
use crate::engines::{CallContext, Engine, EngineError};
use crate::store::StoreError;
use crate::store::calls::{self, CallDetail};
use crate::store::tenants::{self, Tenant};

/// What the call path needs to start an engine for a call.
pub struct CallSetup {
    pub ctx: CallContext,
    pub kind: EngineKind,
    pub max_duration: Duration,
    pub inbound: bool,
    /// Record the call: the call's choice, else the tenant's, else the server's.
    pub record: bool,
}

impl CallSetup {
    /// Resolves the setup from the call's record and its tenant under `cfg`.
    pub fn resolve(detail: CallDetail, tenant: Tenant, cfg: &Config) -> Self {
        // A browser call is caller-initiated like an inbound one, and has no carrier to
        // report its end: the bridge's end closes it.
        let inbound = detail.call.direction != Direction::Outbound;
        let record = detail.record.or(tenant.record).unwrap_or(cfg.agent.record);
        let notice = tenant.recording_notice.clone().filter(|_| record);
        let mut ctx = CallContext {
            call_id: detail.call.id.clone(),
            tenant: tenant.name.clone(),
            inbound,
            system_prompt: detail
                .system_prompt
                .or(tenant.system_prompt)
                .unwrap_or_else(|| cfg.agent.system_prompt.clone()),
            greeting: if inbound && !cfg.agent.greet_inbound {
                String::new()
            } else {
                detail
                    .greeting
                    .or(tenant.greeting)
                    .unwrap_or_else(|| cfg.agent.greeting.clone())
            },
            voice: detail
                .voice
                .or(tenant.voice)
                .unwrap_or_else(|| cfg.agent.voice.clone()),
            script: cfg.agent.script.clone(),
            goodbye: cfg.agent.goodbye.clone(),
            tools: Vec::new(),
        };
        if let Some(n) = notice {
            // Spoken first, before anything else the agent says (SPEC §8).
            ctx.greeting = if ctx.greeting.is_empty() {
                n
            } else {
                format!("{n} {}", ctx.greeting)
            };
        }
        CallSetup {
            ctx,
            kind: EngineKind::parse(&detail.call.engine).unwrap_or(cfg.agent.engine),
            max_duration: Duration::from_secs(
                detail
                    .max_duration_secs
                    .map(|s| s as u64)
                    .unwrap_or(cfg.agent.max_call_duration.as_secs()),
            ),
            inbound,
            record,
        }
    }
}

impl Shared {
    /// Everything needed to run the engine for call `id`.
    pub async fn call_setup(&self, id: &str) -> Result<CallSetup, StoreError> {
        let cid = id.to_owned();
        let (detail, tenant, tools) = self
            .store
            .run(move |c| {
                let d = calls::detail(c, &cid)?;
                let t = tenants::get_by_id(c, d.tenant_id)?;
                let tools = crate::store::tools::list(c, d.tenant_id)?;
                Ok((d, t, tools))
            })
            .await?;
        let transfer = !tenant.transfer_numbers.is_empty();
        let mut setup = CallSetup::resolve(detail, tenant, &self.config());
        // The engine may be opened here, while the phone rings: it needs the functions now.
        setup.ctx.tools = super::tools::specs(&tools, transfer);
        Ok(setup)
    }

    /// Opens the call's engine session now, while the phone rings, so the greeting can
    /// start the moment the media stream does.
    pub(super) fn prewarm(self: &Arc<Self>, id: &str, setup: Option<CallSetup>) {
        let me = self.clone();
        let cid = id.to_owned();
        let handle = tokio::spawn(async move {
            let setup = match setup {
                Some(s) => s,
                None => me
                    .call_setup(&cid)
                    .await
                    .map_err(|e| EngineError::Failed(e.to_string()))?,
            };
            let started = std::time::Instant::now();
            let r = Engine::start(setup.kind, setup.ctx, &me.config(), &me.breakers).await;
            tracing::debug!(call_id = %cid, ms = started.elapsed().as_millis() as u64, ok = r.is_ok(), "engine pre-warmed");
            r
        });
        self.sessions.get_or_create(id).set_prewarm(handle);
    }

    /// The engine for a starting media stream: the pre-warmed session if there is one,
    /// else a fresh one. Outcomes feed the engine's circuit breaker.
    pub async fn take_engine(&self, id: &str, setup: CallSetup) -> Result<Engine, EngineError> {
        let pre = self.sessions.get(id).and_then(|s| s.take_prewarm());
        let result = match pre {
            Some(h) => match h.await {
                Ok(r) => r,
                Err(_) => {
                    Engine::start(setup.kind, setup.ctx, &self.config(), &self.breakers).await
                }
            },
            None => Engine::start(setup.kind, setup.ctx, &self.config(), &self.breakers).await,
        };
        match &result {
            Ok(_) => self.breakers.success(setup.kind),
            Err(e) => {
                tracing::error!(engine = %setup.kind, error = %e, "engine failed to start");
                self.metrics
                    .engine_errors
                    .with(&[setup.kind.as_str(), "connect"])
                    .inc();
                self.breakers.failure(setup.kind);
            }
        }
        result
    }
}

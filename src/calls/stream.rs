//! A carrier's media stream for one of our calls: the token checked and the call moved to
//! `in_progress` in one transaction, the engine taken (pre-warmed if possible), the bridge
//! run, and its outcome handed to the lifecycle.

use std::sync::Arc;

use super::setup::CallSetup;
use super::shared::Shared;
use crate::domain::ids::token_hash;
use crate::media::bridge::{Bridge, BridgeContext};
use crate::media::leg::{Leg, Refusal};
use crate::store::callpath;
use crate::telephony::StreamStart;

impl Shared {
    pub async fn serve_stream<L: Leg>(self: &Arc<Self>, mut leg: L, start: StreamStart) {
        let call_id = start.call_id.clone();
        let hash = token_hash(&start.token);
        let cid = call_id.to_string();
        let sid_ok = start.stream_sid_ok;
        let attached = self
            .store
            .run(move |c| {
                if sid_ok {
                    callpath::attach_stream(c, &cid, &hash)
                } else {
                    callpath::burn_stream_token(c, &cid, &hash).map(|()| None)
                }
            })
            .await;
        let (changed, data) = match attached {
            Ok(Some(a)) => a,
            Ok(None) => {
                tracing::warn!(call_id = %call_id, "media stream with a wrong or used token; closing");
                leg.refuse(Refusal::InvalidToken).await;
                return;
            }
            Err(e) => {
                tracing::error!(call_id = %call_id, error = %e, "cannot load call for its media stream");
                leg.refuse(Refusal::Internal).await;
                return;
            }
        };
        // Every log line of the call carries its id and the carrier's call id.
        let span = tracing::info_span!("call", call_id = %call_id, call_sid = %start.call_sid);
        tracing::Instrument::instrument(
            async move {
                let cfg = self.config();
                let (tool_specs, tool_link) =
                    self.start_tools(&data.detail.call, &data.tenant).await;
                let mut setup = CallSetup::resolve(data.detail, data.tenant, &cfg);
                setup.ctx.tools = tool_specs;
                let id = call_id.as_str();
                let session = self.sessions.get_or_create(id);
                let _bridged = self.sessions.bridge_started(session.clone());
                session.set_bridge(Some(tool_link.to_bridge.clone()));
                // Taken, not borrowed: the record must not stay alive for the whole call.
                if let Some(call) = changed {
                    self.announce(&call);
                }
                // A stream arriving while a handover is under way takes the call back: same
                // engine session, no new greeting, governors counting from the first stream.
                let resumed = session.in_handover();
                let max_duration = setup
                    .max_duration
                    .saturating_sub(session.first_stream_at().elapsed());
                let kind = setup.kind;
                let inbound = setup.inbound;
                let recording = setup.record.then(|| {
                    crate::domain::layout::recording_path(&cfg.server.data_dir, id)
                });
                tracing::info!(stream_sid = %start.stream_sid, engine = %kind, "media stream started");
                let cx = BridgeContext {
                    call_id: call_id.clone(),
                    store: self.store.clone(),
                    events: session.events().clone(),
                    end: session.end_token().clone(),
                    wind_down: self.wind_down.clone(),
                    engine: kind,
                    max_duration,
                    silence_timeout: cfg.agent.silence_timeout.0,
                    goodbye: cfg.agent.goodbye.clone(),
                    metrics: self.metrics.clone(),
                    breakers: self.breakers.clone(),
                    recording,
                    tools: Some(tool_link),
                    handover: session.handover_flag(),
                    resumed: resumed.then(|| session.take_resume_say()),
                };
                let engine = self
                    .take_engine(id, setup)
                    .await
                    .map_err(|e| e.to_string());
                if resumed {
                    tracing::info!("media stream resumed after a handover");
                    session.end_handover();
                }
                let (leg, outcome) = Bridge::run(cx, leg, engine).await;
                session.set_bridge(None);
                self.stream_ended(id, &start.call_sid, inbound, leg, outcome)
                    .await;
            },
            span,
        )
        .await;
    }
}

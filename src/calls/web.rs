//! Browser calls (SPEC §9): an SDP offer becomes a call with `direction = "web"` whose
//! WebRTC leg runs through the same `serve_stream` (bridge, engine, governors, transcript)
//! as a carrier's media stream.

use std::net::IpAddr;
use std::sync::Arc;

use super::CallError;
use super::shared::Shared;
use crate::domain::Direction;
use crate::domain::ids::random_token;
use crate::domain::ids::token_hash;
use crate::store::calls::{self, Call, Scope};
use crate::store::webcalls::{self, WebCall};
use crate::telephony::StreamStart;
use crate::telephony::webrtc::{Endpoint, WebRtcError};

#[derive(Debug, thiserror::Error)]
pub enum WebCallError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Rtc(#[from] WebRtcError),
    #[error("browser calls are not available: the WebRTC endpoint is not running")]
    NoEndpoint,
    #[error("over the concurrent-call limit")]
    Full,
}

impl From<crate::store::StoreError> for WebCallError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Call(e.into())
    }
}

impl Shared {
    /// Starts the WebRTC endpoint on `[webrtc] udp_port`, advertising `public_ip` (default:
    /// what `server.domain` resolves to).
    pub async fn start_webrtc(&self) -> std::io::Result<()> {
        let cfg = self.config();
        let w = &cfg.webrtc;
        let ip: IpAddr = if w.public_ip.is_empty() {
            let host = format!("{}:0", cfg.server.domain);
            tokio::net::lookup_host(host)
                .await?
                .map(|a| a.ip())
                .find(IpAddr::is_ipv4)
                .ok_or_else(|| std::io::Error::other("server.domain has no IPv4 address"))?
        } else {
            w.public_ip
                .parse()
                .map_err(|_| std::io::Error::other("webrtc.public_ip is not an IP address"))?
        };
        let ep = Endpoint::start(
            ip,
            w.udp_port,
            w.max_calls,
            w.peer_timeout.0,
            self.shutdown.clone(),
        )
        .await?;
        let _ = self.webrtc.set(ep);
        Ok(())
    }

    /// `POST /web-calls`: the call created and the SDP answer; the call runs in the
    /// background until either side hangs up.
    pub async fn web_call(
        self: &Arc<Self>,
        tenant_id: i64,
        offer: &str,
        max_duration_secs: Option<i64>,
    ) -> Result<(Call, String), WebCallError> {
        let ep = self.webrtc.get().ok_or(WebCallError::NoEndpoint)?;
        // The offer is checked (and the endpoint's slot taken) before any row exists.
        let (answer, leg) = ep.accept(offer)?;
        let cfg = self.config();
        let token = random_token(32);
        let hash = token_hash(&token);
        let max = cfg.server.max_concurrent_calls as i64;
        let engine = cfg.agent.engine;
        let created = self
            .store
            .run(move |c| webcalls::create(c, tenant_id, max, engine, &hash, max_duration_secs))
            .await?;
        let WebCall::Created(call) = created else {
            return Err(WebCallError::Full);
        };
        self.announce(&call);
        let start = StreamStart {
            call_id: call.id.clone(),
            token,
            call_sid: String::new(),
            stream_sid: format!("web-{}", call.id),
            stream_sid_ok: true,
        };
        let me = self.clone();
        tokio::spawn(async move { me.serve_stream(leg, start).await });
        Ok((*call, answer))
    }

    /// `DELETE /web-calls/{id}`: hangs up a browser call (404 for other tenants' calls and
    /// for calls that are not browser calls).
    pub async fn web_call_end(&self, scope: Scope, id: &str) -> Result<Call, WebCallError> {
        let gid = id.to_owned();
        let call = self.store.run(move |c| calls::get(c, scope, &gid)).await?;
        if call.direction != Direction::Web {
            return Err(crate::store::StoreError::NotFound("call").into());
        }
        if !call.status.is_terminal() {
            self.note_end_reason(id, "api_end").await;
            if let Some(s) = self.sessions.get(id) {
                s.end_token().cancel();
            }
        }
        Ok(call)
    }
}

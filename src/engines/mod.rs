//! Voice engines: what the media bridge drives. An engine takes caller audio and produces
//! agent audio, transcript lines and turn signals. Engines are an enum, not trait objects:
//! the bridge polls one inside the call's single task, with no boxing per frame.

pub mod analysis;
pub mod breaker;
pub mod openai;
pub mod pipeline;
pub mod scripted;
pub mod ultravox;
pub mod ultravox_ws;

use std::sync::Arc;

use serde::Serialize;

use self::breaker::Breakers;

use crate::config::{Config, EngineKind, UltravoxMedium};
use crate::domain::ids::CallId;

/// An engine session's socket.
pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Largest engine WebSocket frame and message we accept.
pub(crate) const ENGINE_MAX_FRAME: usize = 512 * 1024;
pub(crate) const ENGINE_MAX_MESSAGE: usize = 2 * 1024 * 1024;

/// Opens an engine's WebSocket the way the bridge needs it: small read buffer (see
/// [`crate::audio::WS_READ_BUFFER`]) and no Nagle, since caller frames must leave at once.
pub(crate) async fn connect_ws<R>(req: R) -> Result<Ws, tokio_tungstenite::tungstenite::Error>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(crate::audio::WS_READ_BUFFER)
        // Engine events are at most tens of KiB (audio deltas); refuse a larger frame from its
        // header instead of buffering up to tungstenite's 16 MiB default first.
        .max_frame_size(Some(ENGINE_MAX_FRAME))
        .max_message_size(Some(ENGINE_MAX_MESSAGE));
    let tls = engine_tls().map(tokio_tungstenite::Connector::Rustls);
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, tls).await?;
    Ok(ws)
}

/// The TLS client for engine WebSockets, built once. Left to itself tokio-tungstenite reads
/// the system's root certificates from disk for every connection and keeps its own copy of
/// them (a few hundred kB) for as long as the call lasts. `None` (no roots found): each
/// connection tries on its own and reports why.
fn engine_tls() -> Option<Arc<rustls::ClientConfig>> {
    static TLS: std::sync::OnceLock<Option<Arc<rustls::ClientConfig>>> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::warn!(errors = ?found.errors, "some system root certificates did not load");
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        (added > 0).then(|| {
            Arc::new(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        })
    })
    .clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    Agent,
    Caller,
}

impl Speaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Speaker::Agent => "agent",
            Speaker::Caller => "caller",
        }
    }
}

/// What an engine needs to know about the call it serves.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub call_id: CallId,
    pub tenant: String,
    pub inbound: bool,
    pub system_prompt: String,
    pub greeting: String,
    pub voice: String,
    /// Lines the scripted engine answers caller turns with, in order.
    pub script: Vec<String>,
    pub goodbye: String,
    /// Functions the model may call (the tenant's tools and the built-ins).
    pub tools: Vec<ToolSpec>,
}

/// One function offered to the model: OpenAI's function shape, which Ultravox and the
/// pipeline's chat models take too.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// One utterance of the agent; barge-in accounting is per item.
pub type ItemId = String;

#[derive(Debug)]
pub enum EngineEvent {
    /// μ-law 8 kHz audio, base64, for the phone, unchanged.
    AgentAudio {
        item: ItemId,
        payload_b64: String,
    },
    Transcript {
        speaker: Speaker,
        text: String,
    },
    CallerSpeechStarted,
    CallerSpeechStopped,
    /// The engine is done: end the call once the audio already sent has played.
    Hangup {
        reason: &'static str,
    },
    /// Pipeline: one caller turn's stage timings.
    TurnStats(pipeline::TurnStats),
    /// Pipeline: the providers serving the call (sent again when a fallback changes them).
    Providers(pipeline::Providers),
    /// The model calls a function; answer with [`Engine::tool_result`] under the same `id`.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine {0} is not available in this version")]
    Unavailable(EngineKind),
    #[error("{0}")]
    Failed(String),
}

pub enum Engine {
    Scripted(Box<scripted::ScriptedEngine>),
    OpenAi(Box<openai::RealtimeEngine>),
    UltravoxWs(Box<ultravox_ws::UltravoxWsEngine>),
    Pipeline(Box<pipeline::PipelineEngine>),
}

impl Engine {
    /// Starts an engine session for a call whose audio passes through the bridge. For
    /// OpenAI this connects and configures the session (done while the phone rings).
    pub async fn start(
        kind: EngineKind,
        ctx: CallContext,
        cfg: &Config,
        breakers: &Arc<Breakers>,
    ) -> Result<Engine, EngineError> {
        match kind {
            EngineKind::Scripted => Ok(Engine::Scripted(Box::new(scripted::ScriptedEngine::new(
                ctx,
            )))),
            EngineKind::OpenAiRealtime => Ok(Engine::OpenAi(Box::new(
                openai::RealtimeEngine::connect(&cfg.openai, &ctx).await?,
            ))),
            // Ultravox's Twilio medium connects Twilio straight to Ultravox: no bridge.
            EngineKind::Ultravox if cfg.ultravox.medium == UltravoxMedium::ServerWebSocket => {
                Ok(Engine::UltravoxWs(Box::new(
                    ultravox_ws::UltravoxWsEngine::connect(cfg, &ctx).await?,
                )))
            }
            EngineKind::Pipeline => Ok(Engine::Pipeline(Box::new(
                pipeline::PipelineEngine::start(ctx, cfg, breakers.clone()).await?,
            ))),
            other => Err(EngineError::Unavailable(other)),
        }
    }

    /// The phone stream is up: the agent may start talking.
    pub async fn stream_started(&mut self) -> Result<(), EngineError> {
        match self {
            Engine::Scripted(e) => {
                e.stream_started();
                Ok(())
            }
            Engine::OpenAi(e) => e.stream_started().await,
            Engine::UltravoxWs(e) => e.stream_started().await,
            Engine::Pipeline(e) => e.stream_started().await,
        }
    }

    /// One frame of caller audio: μ-law 8 kHz, base64, exactly as Twilio sent it.
    pub async fn caller_audio(&mut self, payload_b64: &str) -> Result<(), EngineError> {
        match self {
            Engine::Scripted(e) => {
                e.caller_audio(payload_b64);
                Ok(())
            }
            Engine::OpenAi(e) => e.caller_audio(payload_b64).await,
            Engine::UltravoxWs(e) => e.caller_audio(payload_b64).await,
            Engine::Pipeline(e) => e.caller_audio(payload_b64).await,
        }
    }

    /// The caller barged in: `item` was cut after `played_ms` of its audio actually played.
    pub async fn interrupted(&mut self, item: &str, played_ms: u64) -> Result<(), EngineError> {
        match self {
            Engine::Scripted(e) => {
                e.interrupted(item, played_ms);
                Ok(())
            }
            Engine::OpenAi(e) => e.interrupted(item, played_ms).await,
            Engine::UltravoxWs(e) => {
                e.interrupted(item, played_ms);
                Ok(())
            }
            Engine::Pipeline(e) => e.interrupted(item, played_ms).await,
        }
    }

    /// Says `text` now (governors: "are you still there?", goodbyes).
    pub async fn say(&mut self, text: &str) -> Result<(), EngineError> {
        match self {
            Engine::Scripted(e) => {
                e.say(text);
                Ok(())
            }
            Engine::OpenAi(e) => e.say(text).await,
            Engine::UltravoxWs(e) => e.say(text).await,
            Engine::Pipeline(e) => e.say(text).await,
        }
    }

    /// Says `text` now, cutting short whatever the agent is still generating (the voicemail
    /// message once a machine's beep has sounded).
    pub async fn say_over(&mut self, text: &str) -> Result<(), EngineError> {
        match self {
            Engine::OpenAi(e) => e.say_over(text).await,
            other => other.say(text).await,
        }
    }

    /// The caller said something without speaking (keypad digits: "The caller pressed 1 2 #"):
    /// it joins the conversation as the caller's turn and the agent answers it.
    pub async fn caller_text(&mut self, text: &str) -> Result<(), EngineError> {
        match self {
            Engine::Scripted(e) => {
                e.caller_text(text);
                Ok(())
            }
            Engine::OpenAi(e) => e.caller_text(text).await,
            Engine::UltravoxWs(e) => e.caller_text(text).await,
            Engine::Pipeline(e) => e.caller_text(text).await,
        }
    }

    /// The next thing the engine has for the bridge. Cancel-safe: nothing is lost when the
    /// future is dropped by a `select!`.
    pub async fn next_event(&mut self) -> Result<EngineEvent, EngineError> {
        match self {
            Engine::Scripted(e) => Ok(e.next_event().await),
            Engine::OpenAi(e) => e.next_event().await,
            Engine::UltravoxWs(e) => e.next_event().await,
            Engine::Pipeline(e) => e.next_event().await,
        }
    }

    /// The answer to tool call `id` (the tool's output, or an error text the model can read).
    /// Engines that never emit [`EngineEvent::ToolCall`] have nothing to answer.
    pub async fn tool_result(&mut self, id: &str, output: &str) -> Result<(), EngineError> {
        match self {
            Engine::Scripted(e) => {
                e.tool_result(id, output);
                Ok(())
            }
            Engine::OpenAi(e) => e.tool_result(id, output).await,
            Engine::Pipeline(e) => e.tool_result(id, output).await,
            Engine::UltravoxWs(e) => e.tool_result(id, output).await,
        }
    }

    pub async fn close(self) {
        match self {
            Engine::Scripted(_) => {}
            Engine::OpenAi(e) => e.close().await,
            Engine::UltravoxWs(e) => e.close().await,
            Engine::Pipeline(e) => e.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_tls_client_is_built_once_from_the_system_roots() {
        // CI and the release image have CA certificates; the config is shared, not rebuilt.
        let a = engine_tls().expect("system root certificates");
        let b = engine_tls().expect("system root certificates");
        assert!(Arc::ptr_eq(&a, &b));
    }
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_oversized_engine_frame_is_refused_from_its_header() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            // A 1 MiB binary frame: only its header and a few bytes are ever sent.
            let mut head = vec![0x82u8, 127];
            head.extend_from_slice(&(1u64 << 20).to_be_bytes());
            head.extend_from_slice(&[0u8; 16]);
            ws.get_mut().write_all(&head).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        });
        let mut ws = connect_ws(format!("ws://{addr}/")).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
            .await
            .expect("refused at once, not after waiting for 1 MiB");
        assert!(
            matches!(
                got,
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_)))
            ),
            "{got:?}"
        );
        server.abort();
    }
}

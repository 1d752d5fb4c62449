//! OpenAI Realtime over WebSocket (PROTOCOLS §5), GA protocol by default, beta on request.
//!
//! Both sides speak μ-law 8 kHz (`audio/pcmu` / `g711_ulaw`), so caller frames are forwarded
//! as the base64 Twilio sent and agent deltas go back to Twilio as OpenAI sent them: no
//! decoding, no transcoding. The session is opened and configured before the phone stream
//! starts (pre-warm) so the greeting can begin the moment it does.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{CallContext, EngineError, EngineEvent, Speaker, Ws};
use crate::audio::is_base64;
use crate::config::OpenAiConfig;

/// Connecting and configuring the session must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RealtimeEngine {
    /// Unsplit: the bridge never reads and writes at once (its `select!` drops the pending
    /// `next_event` before a handler sends), so a split lock per frame would be wasted.
    ws: Ws,
    beta: bool,
    greeting: String,
    pending: VecDeque<EngineEvent>,
}

/// Only the fields we act on; everything else in an event is ignored.
#[derive(Deserialize)]
struct ServerEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    delta: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    item_id: Option<Cow<'a, str>>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(e.to_string())
}

impl RealtimeEngine {
    /// Opens and configures a session for `ctx`; returns once the server confirmed the
    /// configuration (`session.updated`).
    pub async fn connect(cfg: &OpenAiConfig, ctx: &CallContext) -> Result<Self, EngineError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(cfg, ctx))
            .await
            .map_err(|_| EngineError::Failed("OpenAI Realtime did not answer within 10 s".into()))?
    }

    async fn connect_inner(cfg: &OpenAiConfig, ctx: &CallContext) -> Result<Self, EngineError> {
        let sep = if cfg.realtime_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}model={}", cfg.realtime_url, cfg.model);
        let mut req = url.as_str().into_client_request().map_err(failed)?;
        let auth =
            HeaderValue::from_str(&format!("Bearer {}", cfg.api_key.expose())).map_err(|_| {
                EngineError::Failed("openai.api_key contains invalid characters".into())
            })?;
        req.headers_mut().insert("authorization", auth);
        if cfg.beta_protocol {
            req.headers_mut()
                .insert("openai-beta", HeaderValue::from_static("realtime=v1"));
        }
        let ws = super::connect_ws(req).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => EngineError::Failed(format!(
                "OpenAI Realtime refused the connection (HTTP {}{})",
                r.status().as_u16(),
                if r.status() == 401 {
                    ": check openai.api_key"
                } else {
                    ""
                }
            )),
            e => EngineError::Failed(format!("cannot connect to OpenAI Realtime: {e}")),
        })?;
        let mut engine = RealtimeEngine {
            ws,
            beta: cfg.beta_protocol,
            greeting: ctx.greeting.clone(),
            pending: VecDeque::new(),
        };
        let transcription = (!cfg.transcription_model.is_empty())
            .then(|| json!({"model": cfg.transcription_model}));
        let session = if cfg.beta_protocol {
            json!({
                "turn_detection": {"type": "server_vad"},
                "input_audio_format": "g711_ulaw",
                "output_audio_format": "g711_ulaw",
                "voice": ctx.voice,
                "instructions": ctx.system_prompt,
                "modalities": ["text", "audio"],
                "input_audio_transcription": transcription,
            })
        } else {
            json!({
                "type": "realtime",
                "model": cfg.model,
                "output_modalities": ["audio"],
                "instructions": ctx.system_prompt,
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "turn_detection": {"type": "server_vad", "interrupt_response": true, "create_response": true},
                        "transcription": transcription,
                    },
                    "output": {"format": {"type": "audio/pcmu"}, "voice": ctx.voice},
                },
            })
        };
        let mut session = session;
        if !ctx.tools.is_empty() {
            // Same function shape in the beta and GA protocols.
            let tools: Vec<_> = ctx
                .tools
                .iter()
                .map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}))
                .collect();
            session["tools"] = json!(tools);
            session["tool_choice"] = json!("auto");
        }
        engine
            .send_json(&json!({"type": "session.update", "session": session}))
            .await?;
        // Wait for the configuration to take effect; anything else before it is an error.
        loop {
            let Some(msg) = engine.ws.next().await else {
                return Err(EngineError::Failed(
                    "OpenAI Realtime closed the session while configuring".into(),
                ));
            };
            let text = match msg.map_err(failed)? {
                Message::Text(t) => t,
                Message::Close(f) => {
                    return Err(EngineError::Failed(format!(
                        "OpenAI Realtime closed the session: {}",
                        f.map(|f| f.reason.to_string()).unwrap_or_default()
                    )));
                }
                _ => continue,
            };
            let ev: ServerEvent<'_> = serde_json::from_str(&text).map_err(|_| {
                EngineError::Failed("OpenAI Realtime sent something that is not JSON".into())
            })?;
            match &*ev.kind {
                "session.updated" => return Ok(engine),
                "error" => return Err(engine_error(ev.error)),
                _ => {}
            }
        }
    }

    async fn send_json(&mut self, v: &serde_json::Value) -> Result<(), EngineError> {
        self.ws
            .send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
            .map_err(|e| EngineError::Failed(format!("OpenAI Realtime connection lost: {e}")))
    }

    /// The phone is connected: greet now, if this call greets first.
    pub async fn stream_started(&mut self) -> Result<(), EngineError> {
        let greeting = std::mem::take(&mut self.greeting);
        if !greeting.is_empty() {
            self.say(&greeting).await?;
        }
        Ok(())
    }

    pub async fn say(&mut self, text: &str) -> Result<(), EngineError> {
        let instructions = format!("Say exactly this, then stop: \"{text}\"");
        self.send_json(
            &json!({"type": "response.create", "response": {"instructions": instructions}}),
        )
        .await
    }

    /// A response still being generated would refuse a new one: it is cancelled first (an
    /// error about nothing to cancel is recoverable).
    pub async fn say_over(&mut self, text: &str) -> Result<(), EngineError> {
        self.send_json(&json!({"type": "response.cancel"})).await?;
        self.say(text).await
    }

    /// A caller turn as text (keypad): a user message, then a response to it. Should a
    /// response still be running, the service refuses the `response.create` (a recoverable
    /// error) and the message is answered with the next turn instead.
    pub async fn caller_text(&mut self, text: &str) -> Result<(), EngineError> {
        self.send_json(&json!({
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]},
        }))
        .await?;
        self.send_json(&json!({"type": "response.create"})).await
    }

    /// Forwards a caller frame as received.
    pub async fn caller_audio(&mut self, payload_b64: &str) -> Result<(), EngineError> {
        if !is_base64(payload_b64) {
            return Ok(());
        }
        // The socket keeps the message's bytes: one exactly sized allocation per frame.
        const HEAD: &str = r#"{"type":"input_audio_buffer.append","audio":""#;
        let mut json = String::with_capacity(HEAD.len() + payload_b64.len() + 2);
        json.push_str(HEAD);
        json.push_str(payload_b64);
        json.push_str(r#""}"#);
        let msg = Message::Text(Utf8Bytes::from(json));
        self.ws
            .send(msg)
            .await
            .map_err(|e| EngineError::Failed(format!("OpenAI Realtime connection lost: {e}")))
    }

    /// Tells the model how much of `item` the caller heard, so its memory of the conversation
    /// matches what was said. With server VAD's `interrupt_response` the server has already
    /// cancelled the response itself.
    pub async fn interrupted(&mut self, item: &str, played_ms: u64) -> Result<(), EngineError> {
        self.send_json(&json!({
            "type": "conversation.item.truncate",
            "item_id": item,
            "content_index": 0,
            "audio_end_ms": played_ms,
        }))
        .await
    }

    pub async fn next_event(&mut self) -> Result<EngineEvent, EngineError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let msg = match self.ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    return Err(EngineError::Failed(format!(
                        "OpenAI Realtime connection lost: {e}"
                    )));
                }
                None => {
                    return Err(EngineError::Failed(
                        "OpenAI Realtime closed the session".into(),
                    ));
                }
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(f) => {
                    return Err(EngineError::Failed(format!(
                        "OpenAI Realtime closed the session{}",
                        f.map(|f| format!(": {} {}", u16::from(f.code), f.reason))
                            .unwrap_or_default()
                    )));
                }
                _ => continue,
            };
            let ev: ServerEvent<'_> = serde_json::from_str(&text).map_err(|_| {
                EngineError::Failed("OpenAI Realtime sent something that is not JSON".into())
            })?;
            let (audio_delta, transcript_done) = if self.beta {
                ("response.audio.delta", "response.audio_transcript.done")
            } else {
                (
                    "response.output_audio.delta",
                    "response.output_audio_transcript.done",
                )
            };
            match &*ev.kind {
                k if k == audio_delta => {
                    if let (Some(delta), Some(item)) = (ev.delta, ev.item_id) {
                        return Ok(EngineEvent::AgentAudio {
                            item: item.into_owned(),
                            payload_b64: delta.into_owned(),
                        });
                    }
                }
                k if k == transcript_done => {
                    if let Some(t) = ev.transcript.filter(|t| !t.is_empty()) {
                        return Ok(EngineEvent::Transcript {
                            speaker: Speaker::Agent,
                            text: t,
                        });
                    }
                }
                "conversation.item.input_audio_transcription.completed" => {
                    if let Some(t) = ev
                        .transcript
                        .map(|t| t.trim().to_owned())
                        .filter(|t| !t.is_empty())
                    {
                        return Ok(EngineEvent::Transcript {
                            speaker: Speaker::Caller,
                            text: t,
                        });
                    }
                }
                "response.function_call_arguments.done" => {
                    if let (Some(id), Some(name)) = (ev.call_id, ev.name) {
                        return Ok(EngineEvent::ToolCall {
                            id,
                            name,
                            arguments: ev.arguments.unwrap_or_default(),
                        });
                    }
                }
                "input_audio_buffer.speech_started" => return Ok(EngineEvent::CallerSpeechStarted),
                "input_audio_buffer.speech_stopped" => return Ok(EngineEvent::CallerSpeechStopped),
                "error" => {
                    let e = ev.error;
                    // Errors about one of our own requests (a truncate that raced the end of
                    // playback, a cancel with nothing to cancel) leave the session usable.
                    let recoverable = e.as_ref().is_some_and(|b| {
                        b.kind.as_deref() == Some("invalid_request_error")
                            && b.code.as_deref() != Some("session_expired")
                    });
                    if recoverable {
                        tracing::warn!(
                            code = ?e.as_ref().and_then(|b| b.code.clone()),
                            message = ?e.as_ref().and_then(|b| b.message.clone()),
                            "OpenAI Realtime rejected a request"
                        );
                        continue;
                    }
                    return Err(engine_error(e));
                }
                _ => {}
            }
        }
    }

    /// The function's output joins the conversation, then the model answers with it.
    pub async fn tool_result(&mut self, id: &str, output: &str) -> Result<(), EngineError> {
        self.send_json(&json!({
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": id, "output": output},
        }))
        .await?;
        self.send_json(&json!({"type": "response.create"})).await
    }

    pub async fn close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
        let _ = SinkExt::close(&mut self.ws).await;
    }
}

fn engine_error(e: Option<ErrorBody>) -> EngineError {
    let e = e.unwrap_or(ErrorBody {
        kind: None,
        code: None,
        message: None,
    });
    EngineError::Failed(format!(
        "OpenAI Realtime error {}: {}",
        e.code.or(e.kind).unwrap_or_else(|| "unknown".into()),
        e.message.unwrap_or_default()
    ))
}

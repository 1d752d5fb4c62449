//! Ultravox with its `serverWebSocket` medium (PROTOCOLS §4.4–4.5): the call's audio passes
//! through voicectl, so the bridge's governors, barge-in, latency figures and live transcript
//! apply as for OpenAI. Ultravox speaks raw PCM s16le; we ask for 8 kHz both ways, so the only
//! work per frame is G.711 μ-law ⇄ PCM at the edge (a table-free 160-sample loop each way).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

use super::ultravox::{Medium, NewCall, UltravoxClient};
use super::{CallContext, EngineError, EngineEvent, Speaker, Ws};
use crate::audio::mulaw;
use crate::config::Config;

/// Creating the Ultravox call and joining it must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct UltravoxWsEngine {
    /// Unsplit, as for OpenAI: the bridge never reads and writes at once.
    ws: Ws,
    greeting: String,
    /// Agent utterances are numbered by us (Ultravox has no item ids): a new one starts when
    /// Ultravox starts speaking or after a barge-in, so the bridge can drop a cut one.
    item: u64,
    item_id: String,
    speaking: bool,
    /// Agent transcript deltas of the utterance in progress.
    agent_text: String,
    /// An odd trailing byte of PCM from the last binary frame.
    carry: Option<u8>,
    mulaw: Vec<u8>,
    /// Ultravox ended the call (agent hang-up): report it once, then stay quiet.
    ended: bool,
}

#[derive(Deserialize)]
struct DataMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default, rename = "final")]
    is_final: bool,
    #[serde(default)]
    state: Option<String>,
    #[serde(default, rename = "toolName")]
    tool_name: Option<String>,
    #[serde(default, rename = "invocationId")]
    invocation_id: Option<String>,
    #[serde(default)]
    parameters: Option<serde_json::Value>,
}

fn lost(e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(format!("Ultravox connection lost: {e}"))
}

impl UltravoxWsEngine {
    pub async fn connect(cfg: &Config, ctx: &CallContext) -> Result<Self, EngineError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(cfg, ctx))
            .await
            .map_err(|_| EngineError::Failed("Ultravox did not answer within 10 s".into()))?
    }

    async fn connect_inner(cfg: &Config, ctx: &CallContext) -> Result<Self, EngineError> {
        let client =
            UltravoxClient::new(&cfg.ultravox).map_err(|e| EngineError::Failed(e.to_string()))?;
        let voice = super::ultravox::voice_for(&ctx.voice, cfg);
        // The caller "speaks first" as far as Ultravox knows; we send the greeting ourselves
        // when the phone stream starts, so it is not spoken into a line nobody hears yet.
        let created = client
            .create_call(&NewCall {
                system_prompt: &ctx.system_prompt,
                voice,
                greeting: None,
                max_duration: cfg.agent.max_call_duration.0 + Duration::from_secs(60),
                call_id: ctx.call_id.as_str(),
                tenant: &ctx.tenant,
                medium: Medium::ServerWebSocket,
                tools: &ctx.tools,
            })
            .await
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        let ws = super::connect_ws(created.join_url.as_str())
            .await
            .map_err(|e| EngineError::Failed(format!("cannot join the Ultravox call: {e}")))?;
        Ok(Self {
            ws,
            greeting: ctx.greeting.clone(),
            item: 0,
            item_id: "uv-0".into(),
            speaking: false,
            agent_text: String::new(),
            carry: None,
            mulaw: Vec::with_capacity(160),
            ended: false,
        })
    }

    async fn send_data(&mut self, v: serde_json::Value) -> Result<(), EngineError> {
        self.ws
            .send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
            .map_err(lost)
    }

    /// The tool's answer, for the agent to carry on with.
    pub async fn tool_result(&mut self, id: &str, output: &str) -> Result<(), EngineError> {
        self.send_data(
            serde_json::json!({"type": "client_tool_result", "invocationId": id,
            "result": output, "responseType": "tool-response", "agentReaction": "speaks"}),
        )
        .await
    }

    pub async fn stream_started(&mut self) -> Result<(), EngineError> {
        let greeting = std::mem::take(&mut self.greeting);
        if !greeting.is_empty() {
            self.say(&greeting).await?;
        }
        Ok(())
    }

    pub async fn say(&mut self, text: &str) -> Result<(), EngineError> {
        self.send_data(
            json!({"type": "forced_agent_message", "content": text, "urgency": "immediate"}),
        )
        .await
    }

    /// A caller turn as text (keypad): Ultravox's `user_text_message`.
    pub async fn caller_text(&mut self, text: &str) -> Result<(), EngineError> {
        self.send_data(json!({"type": "user_text_message", "text": text}))
            .await
    }

    /// One Twilio frame (base64 μ-law) → one binary frame of PCM s16le at 8 kHz.
    pub async fn caller_audio(&mut self, payload_b64: &str) -> Result<(), EngineError> {
        self.mulaw.clear();
        if B64.decode_vec(payload_b64, &mut self.mulaw).is_err() {
            return Ok(());
        }
        let mut pcm = Vec::with_capacity(self.mulaw.len() * 2);
        for &b in &self.mulaw {
            pcm.extend_from_slice(&mulaw::decode(b).to_le_bytes());
        }
        self.ws
            .send(Message::Binary(Bytes::from(pcm)))
            .await
            .map_err(lost)
    }

    /// Ultravox already cut its reply when it sent `playback_clear_buffer`; there is no
    /// message to tell it how much was heard.
    pub fn interrupted(&mut self, _item: &str, _played_ms: u64) {}

    fn new_item(&mut self) {
        self.item += 1;
        self.item_id = format!("uv-{}", self.item);
    }

    /// PCM s16le → base64 μ-law for Twilio.
    fn agent_audio(&mut self, pcm: &[u8]) -> Option<EngineEvent> {
        let mut bytes = Vec::with_capacity(pcm.len() / 2 + 1);
        pcm_to_mulaw(&mut self.carry, pcm, &mut bytes);
        if bytes.is_empty() {
            return None;
        }
        self.speaking = true;
        Some(EngineEvent::AgentAudio {
            item: self.item_id.clone(),
            payload_b64: B64.encode(&bytes),
        })
    }

    pub async fn next_event(&mut self) -> Result<EngineEvent, EngineError> {
        loop {
            if self.ended {
                // The bridge lets the goodbye play out; nothing more comes from here.
                return std::future::pending().await;
            }
            let msg = match self.ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(lost(e)),
                None => return Err(EngineError::Failed("Ultravox closed the call".into())),
            };
            let text = match msg {
                Message::Binary(pcm) => match self.agent_audio(&pcm) {
                    Some(ev) => return Ok(ev),
                    None => continue,
                },
                Message::Text(t) => t,
                Message::Close(f) => {
                    self.ended = true;
                    return match f {
                        // A normal close is Ultravox ending the call: the agent hung up, or
                        // the call reached its maximum duration.
                        Some(f) if f.code == CloseCode::Normal => Ok(EngineEvent::Hangup {
                            reason: "agent_hangup",
                        }),
                        None => Ok(EngineEvent::Hangup {
                            reason: "agent_hangup",
                        }),
                        Some(f) => Err(EngineError::Failed(format!(
                            "Ultravox closed the call: {} {}",
                            u16::from(f.code),
                            f.reason
                        ))),
                    };
                }
                _ => continue,
            };
            let Ok(m) = serde_json::from_str::<DataMessage>(&text) else {
                return Err(EngineError::Failed(
                    "Ultravox sent a data message that is not JSON".into(),
                ));
            };
            match m.kind.as_str() {
                "playback_clear_buffer" => {
                    // The caller talked over the agent: the bridge clears the phone's buffer
                    // and drops the rest of this utterance.
                    self.speaking = false;
                    self.agent_text.clear();
                    self.new_item();
                    return Ok(EngineEvent::CallerSpeechStarted);
                }
                "client_tool_invocation" => {
                    if let (Some(id), Some(name)) = (m.invocation_id, m.tool_name) {
                        return Ok(EngineEvent::ToolCall {
                            id,
                            name,
                            arguments: m
                                .parameters
                                .unwrap_or_else(|| serde_json::json!({}))
                                .to_string(),
                        });
                    }
                }
                "state" => match m.state.as_deref() {
                    Some("speaking") if !self.speaking => {
                        self.new_item();
                    }
                    // The caller's turn is over; the reply is being made.
                    Some("thinking") => return Ok(EngineEvent::CallerSpeechStopped),
                    Some("listening") => self.speaking = false,
                    _ => {}
                },
                "transcript" => {
                    let agent = m.role.as_deref() == Some("agent");
                    if agent && let Some(d) = &m.delta {
                        self.agent_text.push_str(d);
                    }
                    if !m.is_final {
                        continue;
                    }
                    let text = match m.text {
                        Some(t) => t,
                        None if agent => std::mem::take(&mut self.agent_text),
                        None => continue,
                    };
                    if agent {
                        self.agent_text.clear();
                    }
                    let text = text.trim().to_owned();
                    if text.is_empty() {
                        continue;
                    }
                    return Ok(EngineEvent::Transcript {
                        speaker: if agent {
                            Speaker::Agent
                        } else {
                            Speaker::Caller
                        },
                        text,
                    });
                }
                _ => {}
            }
        }
    }

    pub async fn close(mut self) {
        if !self.ended {
            let _ = self
                .send_data(json!({"type": "hang_up", "message": ""}))
                .await;
        }
        let _ = self.ws.send(Message::Close(None)).await;
        let _ = SinkExt::close(&mut self.ws).await;
    }
}

/// Encodes PCM s16le to μ-law, keeping an odd trailing byte in `carry` for the next frame
/// (WebSocket frames need not end on a sample boundary).
fn pcm_to_mulaw(carry: &mut Option<u8>, pcm: &[u8], out: &mut Vec<u8>) {
    let mut rest = pcm;
    if let Some(lo) = carry.take() {
        match rest.split_first() {
            Some((&hi, tail)) => {
                out.push(mulaw::encode(i16::from_le_bytes([lo, hi])));
                rest = tail;
            }
            None => *carry = Some(lo),
        }
    }
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        out.push(mulaw::encode(i16::from_le_bytes([p[0], p[1]])));
    }
    if let Some(&b) = pairs.remainder().first() {
        *carry = Some(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_frames_split_mid_sample_are_reassembled() {
        let samples: [i16; 3] = [1000, -2000, 3000];
        let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut carry = None;
        let mut out = Vec::new();
        // The middle sample straddles frames; an empty frame in between changes nothing.
        for part in [&pcm[..3], &[][..], &pcm[3..]] {
            pcm_to_mulaw(&mut carry, part, &mut out);
        }
        let want: Vec<u8> = samples.iter().map(|&s| mulaw::encode(s)).collect();
        assert_eq!(out, want);
        assert_eq!(carry, None);
    }
}

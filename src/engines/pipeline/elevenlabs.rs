//! ElevenLabs stream-input WebSocket (WAVE2-PROTOCOLS §1), one context per socket: the
//! socket is opened (and initialised with `{"text":" "}`) before it is needed, each sentence
//! goes with `flush: true`, `{"text":""}` ends the input, `isFinal` ends the utterance and the
//! server closes. Barge-in closes the socket (the context with it). `ulaw_8000` goes to the
//! phone as received; `inactivity_timeout` keeps a waiting socket open between turns.

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::tts::TtsOut;
use super::ws_error;
use crate::config::ElevenLabsConfig;
use crate::engines::Ws;

/// Seconds ElevenLabs keeps a socket without text (its maximum).
const INACTIVITY_TIMEOUT_S: u32 = 180;

pub struct ElevenLabsTts {
    ws: Ws,
    finished: bool,
    /// The text of the audio just returned, handed out on the next call.
    pending_segment: Option<String>,
}

#[derive(Deserialize)]
struct Out {
    #[serde(default)]
    audio: Option<String>,
    #[serde(default, rename = "isFinal")]
    is_final: Option<bool>,
    #[serde(default)]
    alignment: Option<Alignment>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Alignment {
    #[serde(default)]
    chars: Vec<String>,
}

pub fn stream_url(cfg: &ElevenLabsConfig) -> String {
    format!(
        "{}/v1/text-to-speech/{}/stream-input?model_id={}&output_format=ulaw_8000&inactivity_timeout={INACTIVITY_TIMEOUT_S}&auto_mode=true",
        cfg.api_base_url.trim_end_matches('/'),
        cfg.voice,
        cfg.model
    )
}

impl ElevenLabsTts {
    pub async fn connect(cfg: &ElevenLabsConfig) -> Result<Self, String> {
        let mut req = stream_url(cfg)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let key = HeaderValue::from_str(cfg.api_key.expose())
            .map_err(|_| "elevenlabs.api_key contains invalid characters".to_owned())?;
        req.headers_mut().insert("xi-api-key", key);
        let ws = crate::engines::connect_ws(req)
            .await
            .map_err(|e| ws_error(e, "elevenlabs.api_key"))?;
        let mut t = Self {
            ws,
            finished: false,
            pending_segment: None,
        };
        t.send(json!({"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}))
            .await?;
        Ok(t)
    }

    async fn send(&mut self, v: serde_json::Value) -> Result<(), String> {
        self.ws
            .send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
            .map_err(|e| format!("connection lost: {e}"))
    }

    pub async fn speak(&mut self, text: &str) -> Result<(), String> {
        // A trailing space lets the model know the word is complete.
        self.send(json!({"text": format!("{text} "), "flush": true}))
            .await
    }

    pub async fn finish(&mut self) -> Result<(), String> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.send(json!({"text": ""})).await
    }

    pub async fn cancel(&mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
        let _ = SinkExt::close(&mut self.ws).await;
    }

    pub async fn next(&mut self) -> TtsOut {
        if let Some(s) = self.pending_segment.take() {
            return TtsOut::Segment(s);
        }
        loop {
            let msg = match self.ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return TtsOut::Closed(e.to_string()),
                None => return TtsOut::Closed("closed".into()),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(f) => {
                    return TtsOut::Closed(
                        f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "closed".into()),
                    );
                }
                _ => continue,
            };
            let Ok(out) = serde_json::from_str::<Out>(&text) else {
                return TtsOut::Failed("sent a message that is not JSON".into());
            };
            if let Some(e) = out.error.or(out.message) {
                return TtsOut::Failed(e);
            }
            if let Some(a) = out.audio.filter(|a| !a.is_empty()) {
                let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(a) else {
                    return TtsOut::Failed("sent audio that is not base64".into());
                };
                // The alignment of a chunk names the characters it speaks; handed over
                // with the audio so barge-in knows the text heard.
                if let Some(al) = out.alignment.filter(|a| !a.chars.is_empty()) {
                    self.pending_segment = Some(al.chars.concat());
                }
                return TtsOut::Audio(bytes);
            }
            if out.is_final == Some(true) {
                return TtsOut::Done;
            }
        }
    }
}

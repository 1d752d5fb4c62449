//! Deepgram Aura over WebSocket (WAVE2-PROTOCOLS §1): one socket per call, `Speak` +
//! `Flush` per sentence, μ-law 8 kHz to the phone as received, `Flushed` when a sentence's
//! audio is complete, `Clear` on barge-in (audio still in flight is dropped until `Cleared`).

use std::collections::VecDeque;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::tts::TtsOut;
use super::ws_error;
use crate::config::DeepgramConfig;
use crate::engines::Ws;

pub struct AuraTts {
    ws: Ws,
    /// Sentences flushed whose `Flushed` has not come yet.
    flushing: VecDeque<String>,
    finishing: bool,
    /// A `Clear` went out: audio before `Cleared` belongs to the cancelled utterance.
    clearing: bool,
    done_due: bool,
}

pub fn speak_url(cfg: &DeepgramConfig) -> String {
    let sep = if cfg.tts_url.contains('?') { '&' } else { '?' };
    format!(
        "{}{sep}model={}&encoding=mulaw&sample_rate=8000",
        cfg.tts_url, cfg.tts_voice
    )
}

impl AuraTts {
    pub async fn connect(cfg: &DeepgramConfig) -> Result<Self, String> {
        let mut req = speak_url(cfg)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let auth = HeaderValue::from_str(&format!("Token {}", cfg.api_key.expose()))
            .map_err(|_| "deepgram.api_key contains invalid characters".to_owned())?;
        req.headers_mut().insert("authorization", auth);
        let ws = crate::engines::connect_ws(req)
            .await
            .map_err(|e| ws_error(e, "deepgram.api_key"))?;
        Ok(Self {
            ws,
            flushing: VecDeque::new(),
            finishing: false,
            clearing: false,
            done_due: false,
        })
    }

    pub fn begin(&mut self) {
        self.flushing.clear();
        self.finishing = false;
        self.done_due = false;
    }

    async fn send(&mut self, v: serde_json::Value) -> Result<(), String> {
        self.ws
            .send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
            .map_err(|e| format!("connection lost: {e}"))
    }

    pub async fn speak(&mut self, text: &str) -> Result<(), String> {
        self.send(json!({"type": "Speak", "text": text})).await?;
        self.send(json!({"type": "Flush"})).await?;
        self.flushing.push_back(text.to_owned());
        Ok(())
    }

    pub fn finish(&mut self) -> Result<(), String> {
        self.finishing = true;
        if self.flushing.is_empty() {
            self.done_due = true;
        }
        Ok(())
    }

    /// Returns whether the socket stays usable.
    pub async fn cancel(&mut self) -> bool {
        self.flushing.clear();
        self.finishing = false;
        self.done_due = false;
        self.clearing = true;
        self.send(json!({"type": "Clear"})).await.is_ok()
    }

    pub async fn next(&mut self) -> TtsOut {
        loop {
            if self.done_due {
                self.done_due = false;
                self.finishing = false;
                return TtsOut::Done;
            }
            let msg = match self.ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return TtsOut::Closed(e.to_string()),
                None => return TtsOut::Closed("closed".into()),
            };
            match msg {
                Message::Binary(b) if !self.clearing && !b.is_empty() => {
                    return TtsOut::Audio(b.to_vec());
                }
                Message::Text(t) => {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                        return TtsOut::Failed("sent a message that is not JSON".into());
                    };
                    match v["type"].as_str() {
                        Some("Flushed") if !self.clearing => {
                            if let Some(s) = self.flushing.pop_front() {
                                if self.finishing && self.flushing.is_empty() {
                                    self.done_due = true;
                                }
                                return TtsOut::Segment(s);
                            }
                        }
                        Some("Cleared") => self.clearing = false,
                        Some("Error") => {
                            return TtsOut::Failed(
                                v["description"]
                                    .as_str()
                                    .or(v["err_msg"].as_str())
                                    .unwrap_or("error")
                                    .to_owned(),
                            );
                        }
                        _ => {}
                    }
                }
                Message::Close(f) => {
                    return TtsOut::Closed(
                        f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "closed".into()),
                    );
                }
                _ => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.send(json!({"type": "Close"})).await;
        let _ = SinkExt::close(&mut self.ws).await;
    }
}

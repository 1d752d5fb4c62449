//! Deepgram live speech-to-text (WAVE2-PROTOCOLS §1): the caller's μ-law goes through as
//! received (`encoding=mulaw&sample_rate=8000`), interim results and VAD events on, turns
//! ended by `speech_final` or `UtteranceEnd`.

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

use super::ws_error;
use crate::config::DeepgramConfig;
use crate::engines::Ws;

/// What the engine acts on.
#[derive(Debug, PartialEq)]
pub enum SttEvent {
    SpeechStarted,
    /// The words recognised so far of the current (non-final) piece.
    Interim {
        words: usize,
    },
    /// `end_s`: where the last word ended, in seconds of the audio sent on this socket.
    Final {
        text: String,
        speech_final: bool,
        end_s: Option<f64>,
    },
    UtteranceEnd,
    /// The socket is gone (idle timeout, provider restart, network): reopen it.
    Closed(String),
    /// A message we do not use.
    Other,
}

pub struct DeepgramStt {
    ws: Ws,
}

#[derive(Deserialize)]
struct Msg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    speech_final: bool,
    #[serde(default)]
    channel: Option<serde_json::Value>,
}

/// The listen URL with every parameter the engine relies on.
pub fn listen_url(cfg: &DeepgramConfig) -> String {
    let sep = if cfg.stt_url.contains('?') { '&' } else { '?' };
    format!(
        "{}{sep}model={}&encoding=mulaw&sample_rate=8000&channels=1&interim_results=true\
         &endpointing={}&utterance_end_ms={}&vad_events=true&smart_format=true&punctuate=true",
        cfg.stt_url, cfg.stt_model, cfg.endpointing_ms, cfg.utterance_end_ms
    )
}

impl DeepgramStt {
    pub async fn connect(cfg: &DeepgramConfig) -> Result<Self, String> {
        let mut req = listen_url(cfg)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let auth = HeaderValue::from_str(&format!("Token {}", cfg.api_key.expose()))
            .map_err(|_| "deepgram.api_key contains invalid characters".to_owned())?;
        req.headers_mut().insert("authorization", auth);
        let ws = crate::engines::connect_ws(req)
            .await
            .map_err(|e| ws_error(e, "deepgram.api_key"))?;
        Ok(Self { ws })
    }

    pub async fn send_audio(&mut self, mulaw: Vec<u8>) -> Result<(), String> {
        self.ws
            .send(Message::Binary(Bytes::from(mulaw)))
            .await
            .map_err(|e| e.to_string())
    }

    /// Keeps a quiet socket open (Deepgram closes after 10 s without audio or a message).
    pub async fn keep_alive(&mut self) -> Result<(), String> {
        self.control("KeepAlive").await
    }

    async fn control(&mut self, kind: &str) -> Result<(), String> {
        self.ws
            .send(Message::Text(Utf8Bytes::from(format!(
                r#"{{"type":"{kind}"}}"#
            ))))
            .await
            .map_err(|e| e.to_string())
    }

    /// Cancel-safe.
    pub async fn next(&mut self) -> SttEvent {
        loop {
            let msg = match self.ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return SttEvent::Closed(e.to_string()),
                None => return SttEvent::Closed("closed".into()),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(f) => {
                    return SttEvent::Closed(
                        f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "closed".into()),
                    );
                }
                _ => continue,
            };
            return parse(&text);
        }
    }

    /// Flushes and closes (`CloseStream`), best effort.
    pub async fn close(mut self) {
        let _ = self.control("CloseStream").await;
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
            while let Some(Ok(m)) = self.ws.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        let _ = SinkExt::close(&mut self.ws).await;
    }
}

/// One server message. Garbage is skipped (logged), not fatal: one bad frame should not end
/// a call whose socket still works.
pub fn parse(text: &str) -> SttEvent {
    let Ok(m) = serde_json::from_str::<Msg>(text) else {
        tracing::warn!("Deepgram sent a message that is not JSON; ignored");
        return SttEvent::Other;
    };
    match m.kind.as_str() {
        "SpeechStarted" => SttEvent::SpeechStarted,
        "UtteranceEnd" => SttEvent::UtteranceEnd,
        "Results" => {
            let transcript = m
                .channel
                .as_ref()
                .and_then(|c| c["alternatives"][0]["transcript"].as_str())
                .unwrap_or_default()
                .trim()
                .to_owned();
            if m.is_final {
                let end_s = m.channel.as_ref().and_then(|c| {
                    c["alternatives"][0]["words"].as_array()?.last()?["end"].as_f64()
                });
                SttEvent::Final {
                    text: transcript,
                    speech_final: m.speech_final,
                    end_s,
                }
            } else {
                SttEvent::Interim {
                    words: transcript.split_whitespace().count(),
                }
            }
        }
        _ => SttEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_messages_the_engine_uses() {
        let r = r#"{"type":"Results","channel_index":[0,1],"is_final":true,"speech_final":true,"channel":{"alternatives":[{"transcript":" Hello there ","confidence":0.9,"words":[{"word":"hello","start":1.0,"end":1.4},{"word":"there","start":1.4,"end":1.9}]}]}}"#;
        assert_eq!(
            parse(r),
            SttEvent::Final {
                text: "Hello there".into(),
                speech_final: true,
                end_s: Some(1.9),
            }
        );
        let i = r#"{"type":"Results","is_final":false,"speech_final":false,"channel":{"alternatives":[{"transcript":"one two three"}]}}"#;
        assert_eq!(parse(i), SttEvent::Interim { words: 3 });
        assert_eq!(
            parse(r#"{"type":"SpeechStarted","channel":[0],"timestamp":1.2}"#),
            SttEvent::SpeechStarted
        );
        assert_eq!(
            parse(r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":2.3}"#),
            SttEvent::UtteranceEnd
        );
        assert_eq!(parse("{garbage"), SttEvent::Other);
        assert_eq!(parse(r#"{"type":"Metadata"}"#), SttEvent::Other);
    }

    #[test]
    fn url_carries_the_parameters() {
        let u = listen_url(&DeepgramConfig::default());
        for p in [
            "encoding=mulaw",
            "sample_rate=8000",
            "interim_results=true",
            "vad_events=true",
            "endpointing=300",
            "utterance_end_ms=1000",
            "model=nova-3",
        ] {
            assert!(u.contains(p), "{u} lacks {p}");
        }
    }
}

//! The TTS slot: one connection to one provider, whatever the provider. Audio comes out as
//! μ-law 8 kHz (ElevenLabs `ulaw_8000` and Aura `mulaw` as received; OpenAI's 24 kHz PCM
//! resampled), with the text it covers as `Segment`s so barge-in can tell what was heard.

use super::aura::AuraTts;
use super::elevenlabs::ElevenLabsTts;
use super::openai_speech::OpenAiTts;

#[derive(Debug, PartialEq)]
pub enum TtsOut {
    /// μ-law 8 kHz for the phone.
    Audio(Vec<u8>),
    /// The audio so far covers this text (after the previous segment).
    Segment(String),
    /// Everything asked for since `begin` has been synthesized.
    Done,
    /// The connection ended (idle timeout, provider restart): reopen it.
    Closed(String),
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtsKind {
    ElevenLabs,
    Deepgram,
    OpenAi,
}

impl TtsKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "elevenlabs" => Some(Self::ElevenLabs),
            "deepgram" => Some(Self::Deepgram),
            "openai" => Some(Self::OpenAi),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ElevenLabs => "elevenlabs",
            Self::Deepgram => "deepgram",
            Self::OpenAi => "openai",
        }
    }
}

pub enum TtsConn {
    ElevenLabs(ElevenLabsTts),
    Deepgram(AuraTts),
    OpenAi(OpenAiTts),
}

impl TtsConn {
    pub fn kind(&self) -> TtsKind {
        match self {
            Self::ElevenLabs(_) => TtsKind::ElevenLabs,
            Self::Deepgram(_) => TtsKind::Deepgram,
            Self::OpenAi(_) => TtsKind::OpenAi,
        }
    }

    /// Whether the connection serves one utterance only (a new one is opened for the next).
    pub fn single_use(&self) -> bool {
        matches!(self, Self::ElevenLabs(_))
    }

    pub async fn begin(&mut self) -> Result<(), String> {
        match self {
            Self::ElevenLabs(_) => Ok(()),
            Self::Deepgram(t) => {
                t.begin();
                Ok(())
            }
            Self::OpenAi(t) => {
                t.begin();
                Ok(())
            }
        }
    }

    pub async fn speak(&mut self, text: &str) -> Result<(), String> {
        match self {
            Self::ElevenLabs(t) => t.speak(text).await,
            Self::Deepgram(t) => t.speak(text).await,
            Self::OpenAi(t) => t.speak(text),
        }
    }

    /// No more text for this utterance.
    pub async fn finish(&mut self) -> Result<(), String> {
        match self {
            Self::ElevenLabs(t) => t.finish().await,
            Self::Deepgram(t) => t.finish(),
            Self::OpenAi(t) => {
                t.finish();
                Ok(())
            }
        }
    }

    /// Stops the utterance at once (barge-in). Returns false when the connection cannot be
    /// reused.
    pub async fn cancel(&mut self) -> bool {
        match self {
            Self::ElevenLabs(t) => {
                t.cancel().await;
                false
            }
            Self::Deepgram(t) => t.cancel().await,
            Self::OpenAi(t) => {
                t.cancel();
                true
            }
        }
    }

    /// Cancel-safe.
    pub async fn next(&mut self) -> TtsOut {
        match self {
            Self::ElevenLabs(t) => t.next().await,
            Self::Deepgram(t) => t.next().await,
            Self::OpenAi(t) => t.next().await,
        }
    }

    pub async fn close(self) {
        match self {
            Self::ElevenLabs(mut t) => t.cancel().await,
            Self::Deepgram(t) => t.close().await,
            Self::OpenAi(mut t) => t.cancel(),
        }
    }
}

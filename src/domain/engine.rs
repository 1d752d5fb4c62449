//! Which voice engine runs a call: named in the config file, on tenants and on call rows.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum EngineKind {
    #[serde(rename = "openai-realtime")]
    OpenAiRealtime,
    #[serde(rename = "ultravox")]
    Ultravox,
    #[serde(rename = "scripted")]
    Scripted,
    /// Speech-to-text → LLM → text-to-speech, each from configured providers (SPEC §6).
    #[serde(rename = "pipeline")]
    Pipeline,
}

impl EngineKind {
    pub const ALL: [EngineKind; 4] = [
        Self::OpenAiRealtime,
        Self::Ultravox,
        Self::Scripted,
        Self::Pipeline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiRealtime => "openai-realtime",
            Self::Ultravox => "ultravox",
            Self::Scripted => "scripted",
            Self::Pipeline => "pipeline",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
}

impl EngineKind {
    pub const ALL: [EngineKind; 3] = [Self::OpenAiRealtime, Self::Ultravox, Self::Scripted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiRealtime => "openai-realtime",
            Self::Ultravox => "ultravox",
            Self::Scripted => "scripted",
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

//! The pipeline engine's sections (SPEC §6): `[pipeline]`, `[deepgram]`, `[elevenlabs]`,
//! `[[llm]]` (the new `[openai]` keys live with the rest of `[openai]`). Kept apart from the
//! other sections so the engine's settings travel as one unit.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Secret;

/// Speech-to-text providers a `[pipeline] stt` list may name.
pub const STT_PROVIDERS: &[&str] = &["deepgram"];
/// Text-to-speech providers a `[pipeline] tts` list may name.
pub const TTS_PROVIDERS: &[&str] = &["elevenlabs", "deepgram", "openai"];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Ordered: later entries are fallbacks.
    pub stt: Vec<String>,
    /// Names of `[[llm]]` entries.
    pub llm: Vec<String>,
    pub tts: Vec<String>,
    /// Interim caller words (after `SpeechStarted`) that cut the agent; fewer are a backchannel.
    pub interrupt_min_words: u32,
    /// Fixed phrases cached on disk under `data_dir/tts-cache/`.
    pub tts_cache: bool,
    /// Largest size of the TTS cache before least-recently-used phrases are evicted.
    pub tts_cache_max_bytes: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stt: vec!["deepgram".into()],
            llm: vec!["openai".into()],
            tts: vec!["elevenlabs".into(), "deepgram".into()],
            interrupt_min_words: 1,
            tts_cache: true,
            tts_cache_max_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeepgramConfig {
    pub api_key: Secret,
    pub api_key_file: Option<PathBuf>,
    pub stt_url: String,
    pub stt_model: String,
    pub endpointing_ms: u32,
    pub utterance_end_ms: u32,
    pub tts_url: String,
    pub tts_voice: String,
}

impl Default for DeepgramConfig {
    fn default() -> Self {
        Self {
            api_key: Secret::default(),
            api_key_file: None,
            stt_url: "wss://api.deepgram.com/v1/listen".into(),
            stt_model: "nova-3".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
            tts_url: "wss://api.deepgram.com/v1/speak".into(),
            tts_voice: "aura-2-thalia-en".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElevenLabsConfig {
    pub api_key: Secret,
    pub api_key_file: Option<PathBuf>,
    /// `…/v1/text-to-speech/{voice}/stream-input` is appended.
    pub api_base_url: String,
    pub model: String,
    pub voice: String,
}

impl Default for ElevenLabsConfig {
    fn default() -> Self {
        Self {
            api_key: Secret::default(),
            api_key_file: None,
            api_base_url: "wss://api.elevenlabs.io".into(),
            model: "eleven_flash_v2_5".into(),
            voice: "21m00Tcm4TlvDq8ikWAM".into(),
        }
    }
}

/// One OpenAI-compatible chat-completions endpoint (OpenAI, Groq, vLLM, Ollama, …).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    pub name: String,
    #[serde(default = "default_llm_base")]
    pub base_url: String,
    /// Default: `openai.api_key` when `base_url` is OpenAI's.
    #[serde(default)]
    pub api_key: Secret,
    #[serde(default = "default_llm_model")]
    pub model: String,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
}

pub const OPENAI_API_BASE: &str = "https://api.openai.com/v1";

fn default_llm_base() -> String {
    OPENAI_API_BASE.into()
}

fn default_llm_model() -> String {
    "gpt-4o-mini".into()
}

fn default_temperature() -> f32 {
    0.7
}

impl PipelineConfig {
    /// Checks the lists against the known providers and `[[llm]]` names; returns the key at
    /// fault and why.
    pub fn check(&self, llms: &[LlmConfig]) -> Result<(), (String, String)> {
        for (slot, list, known) in [
            ("stt", &self.stt, STT_PROVIDERS),
            ("tts", &self.tts, TTS_PROVIDERS),
        ] {
            if list.is_empty() {
                return Err((
                    format!("pipeline.{slot}"),
                    "must name at least one provider".into(),
                ));
            }
            for p in list {
                if !known.contains(&p.as_str()) {
                    return Err((
                        format!("pipeline.{slot}"),
                        format!("unknown provider {p:?} (known: {})", known.join(", ")),
                    ));
                }
            }
        }
        if self.llm.is_empty() {
            return Err((
                "pipeline.llm".into(),
                "must name at least one [[llm]] entry".into(),
            ));
        }
        for name in &self.llm {
            if !llms.iter().any(|l| &l.name == name) {
                return Err((
                    "pipeline.llm".into(),
                    format!("no [[llm]] entry named {name:?}"),
                ));
            }
        }
        if self.interrupt_min_words > 20 {
            return Err((
                "pipeline.interrupt_min_words".into(),
                "must be at most 20".into(),
            ));
        }
        if self.tts_cache_max_bytes < 1024 * 1024 {
            return Err((
                "pipeline.tts_cache_max_bytes".into(),
                "must be at least 1 MiB".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(extra: &str) -> Result<Config, String> {
        let text = format!("[server]\ndomain = \"voice.example.com\"\n{extra}");
        Config::from_toml(&text, Path::new("t.toml"), &|_| None).map_err(|e| e.to_string())
    }

    const LLM: &str = "[[llm]]\nname = \"groq\"\nbase_url = \"https://api.groq.com/openai/v1\"\nmodel = \"llama\"\n";

    #[test]
    fn a_full_pipeline_section_parses() {
        let cfg = parse(&format!(
            "[agent]\nengine = \"pipeline\"\n[pipeline]\nstt = [\"deepgram\"]\nllm = [\"groq\"]\ntts = [\"openai\", \"deepgram\"]\n[deepgram]\napi_key = \"dg\"\n{LLM}"
        ))
        .unwrap();
        let p = cfg.pipeline.unwrap();
        assert_eq!(p.tts, vec!["openai", "deepgram"]);
        assert_eq!(cfg.llm[0].temperature, 0.7);
        assert_eq!(cfg.deepgram.endpointing_ms, 300);
    }

    #[test]
    fn unknown_providers_and_llm_names_are_startup_errors_naming_them() {
        for (extra, key, word) in [
            (
                "[pipeline]\ntts = [\"polly\"]\nllm = [\"groq\"]\n",
                "pipeline.tts",
                "polly",
            ),
            (
                "[pipeline]\nstt = [\"whisper\"]\nllm = [\"groq\"]\n",
                "pipeline.stt",
                "whisper",
            ),
            ("[pipeline]\nllm = [\"nope\"]\n", "pipeline.llm", "nope"),
            (
                "[agent]\nengine = \"pipeline\"\n",
                "agent.engine",
                "[pipeline]",
            ),
            (
                "[deepgram]\nstt_url = \"https://x\"\n",
                "deepgram.stt_url",
                "ws",
            ),
            (
                "[deepgram]\nutterance_end_ms = 200\n",
                "deepgram.utterance_end_ms",
                "1000",
            ),
            (
                "[pipeline]\nllm = [\"groq\"]\ninterrupt_min_words = 99\n",
                "pipeline.interrupt_min_words",
                "20",
            ),
        ] {
            let err = parse(&format!("{extra}{LLM}")).unwrap_err();
            assert!(err.contains(key) && err.contains(word), "{extra:?} → {err}");
        }
        let err = parse(&format!("{LLM}{LLM}")).unwrap_err();
        assert!(
            err.contains("llm[1].name") && err.contains("twice"),
            "{err}"
        );
    }

    #[test]
    fn an_llm_on_openai_shares_the_openai_key() {
        let cfg = parse("[openai]\napi_key = \"sk-1\"\n[[llm]]\nname = \"openai\"\n[[llm]]\nname = \"local\"\nbase_url = \"http://127.0.0.1:11434/v1\"\n").unwrap();
        assert_eq!(cfg.llm[0].api_key.expose(), "sk-1");
        assert!(cfg.llm[1].api_key.is_empty());
    }

    #[test]
    fn provider_keys_come_from_the_environment() {
        let env = |k: &str| (k == "VOICECTL_DEEPGRAM_API_KEY").then(|| "from-env".to_owned());
        let cfg =
            Config::from_toml("[server]\ndomain = \"a.example\"\n", Path::new("t"), &env).unwrap();
        assert_eq!(cfg.deepgram.api_key.expose(), "from-env");
    }
}

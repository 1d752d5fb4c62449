//! The TOML configuration (SPEC §2): typed sections, defaults, validation, secrets.
//!
//! Loading is three steps: parse with `deny_unknown_fields` (so a typo names its line),
//! resolve secrets (`<key>_file`, then `VOICECTL_<SECTION>_<KEY>` which wins), validate.

mod duration;
mod pipeline;

pub use duration::HumanDuration;
pub use pipeline::{
    DeepgramConfig, ElevenLabsConfig, LlmConfig, OPENAI_API_BASE, PipelineConfig, STT_PROVIDERS,
    TTS_PROVIDERS,
};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::phone::E164;

/// The commented template `voicectl init` renders; its defaults must match `Default` below
/// (a unit test parses it).
pub const TEMPLATE: &str = include_str!("../../templates/voicectl.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub twilio: TwilioConfig,
    pub agent: AgentConfig,
    pub openai: OpenAiConfig,
    pub ultravox: UltravoxConfig,
    pub limits: LimitsConfig,
    pub proxy: Vec<ProxyRoute>,
    /// `engine = "pipeline"` (SPEC §6); absent means no pipeline is configured.
    pub pipeline: Option<PipelineConfig>,
    pub deepgram: DeepgramConfig,
    pub elevenlabs: ElevenLabsConfig,
    pub llm: Vec<LlmConfig>,
    pub campaigns: CampaignsConfig,
    /// `[retention]`: how long finished calls and recordings are kept.
    pub retention: RetentionConfig,
    /// Where the file came from; not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    pub webrtc: WebRtcConfig,
}

/// `[webrtc]`: browser calls (SPEC §9).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebRtcConfig {
    /// The one UDP port all browser calls share (0: any free port, for tests).
    pub udp_port: u16,
    /// The address advertised as our ICE candidate; empty: what `server.domain` resolves to.
    pub public_ip: String,
    /// Most browser calls at once (on top of the tenant's and the server's call caps).
    pub max_calls: usize,
    /// A browser that sends nothing (or never connects) for this long has gone.
    pub peer_timeout: HumanDuration,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        Self {
            udp_port: 3478,
            public_ip: String::new(),
            max_calls: 20,
            peer_timeout: HumanDuration::from_secs(10),
        }
    }
}

/// `[retention]` (SPEC §8): finished calls (with their transcripts and events) and call
/// recordings older than this are purged daily. `"0"` or absent keeps them forever: nothing is
/// deleted unless the operator asks.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub calls: HumanDuration,
    pub recordings: HumanDuration,
}

/// `[campaigns]`: limits of campaign imports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CampaignsConfig {
    /// Largest recipient upload (`POST /campaigns/{id}/recipients`), in bytes. This route is
    /// exempt from `server.max_body_bytes`.
    pub max_upload_bytes: usize,
    /// Most recipients one campaign may hold.
    pub max_recipients: u64,
}

impl Default for CampaignsConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 256 * 1024 * 1024,
            max_recipients: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub domain: String,
    pub extra_domains: Vec<String>,
    pub public_url: String,
    pub data_dir: PathBuf,
    pub http_listen: String,
    pub https_listen: String,
    pub listen: String,
    pub max_concurrent_calls: u32,
    pub drain_timeout: HumanDuration,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// A call still queued (over capacity) after this long is canceled, not dialed late.
    pub queue_timeout: HumanDuration,
    /// Besides loopback, who may read `GET /metrics` (CIDR blocks or addresses).
    pub metrics_allow: Vec<String>,
    /// Proxies/load balancers whose `X-Forwarded-For` names the real client.
    pub trusted_proxies: Vec<String>,
    /// Hosts (names or addresses) that tenant-supplied URLs may reach over plain http and at
    /// private/loopback addresses (SPEC §10); empty in production, loopback in tests.
    pub allow_private_targets: Vec<String>,
    /// Lines campaigns never take, so inbound calls are answered while a campaign runs at full
    /// speed. Unset: 5 % of `max_concurrent_calls` (at least 1).
    pub inbound_reserve: Option<u32>,
}

impl ServerConfig {
    /// The lines kept free of campaign calls.
    pub fn inbound_reserve(&self) -> u32 {
        self.inbound_reserve
            .unwrap_or_else(|| (self.max_concurrent_calls / 20).max(1))
            .min(self.max_concurrent_calls)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            domain: String::new(),
            extra_domains: Vec::new(),
            public_url: String::new(),
            data_dir: PathBuf::from("/var/lib/voicectl"),
            http_listen: "0.0.0.0:80".into(),
            https_listen: "0.0.0.0:443".into(),
            listen: String::new(),
            max_concurrent_calls: 1000,
            drain_timeout: HumanDuration::from_secs(60),
            max_body_bytes: 64 * 1024,
            queue_timeout: HumanDuration::from_secs(10 * 60),
            metrics_allow: Vec::new(),
            trusted_proxies: Vec::new(),
            allow_private_targets: Vec::new(),
            inbound_reserve: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Acme,
    Manual,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AcmeChallenge {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub acme_directory: String,
    pub acme_email: String,
    pub challenge: AcmeChallenge,
    pub acme_root_ca: String,
    pub cert_file: String,
    pub key_file: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsMode::Acme,
            acme_directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            acme_email: String::new(),
            challenge: AcmeChallenge::Http01,
            acme_root_ca: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth_token: Secret,
    pub auth_token_file: Option<PathBuf>,
    pub from_number: String,
    pub api_base_url: String,
    pub validate_signatures: bool,
    /// Outbound call creations per second (Twilio's default account limit is 1).
    pub calls_per_second: f64,
    /// How long an outbound call rings before it is `no_answer`.
    pub ring_timeout: HumanDuration,
    /// Replace Twilio with the built-in simulator (development and demos; `serve --dev`).
    pub simulate: bool,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        Self {
            account_sid: String::new(),
            auth_token: Secret::default(),
            auth_token_file: None,
            from_number: String::new(),
            api_base_url: "https://api.twilio.com".into(),
            validate_signatures: true,
            calls_per_second: 1.0,
            ring_timeout: HumanDuration::from_secs(30),
            simulate: false,
        }
    }
}

pub use crate::domain::EngineKind;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub engine: EngineKind,
    pub system_prompt: String,
    pub greeting: String,
    pub voice: String,
    pub max_call_duration: HumanDuration,
    pub silence_timeout: HumanDuration,
    /// Inbound calls: the agent speaks first (the greeting) rather than waiting for the caller.
    pub greet_inbound: bool,
    /// Said before the agent hangs up (governors, end of script, shutdown).
    pub goodbye: String,
    /// The `scripted` engine's answers to caller turns, in order; then `goodbye`.
    pub script: Vec<String>,
    /// Record calls (SPEC §8) unless the tenant or the call says otherwise.
    pub record: bool,
    /// Answering-machine detection when neither the call, its campaign nor its tenant says.
    pub machine_detection: crate::domain::amd::MachineDetection,
    /// Left on answering machines in `voicemail` mode when nothing closer gives one.
    pub voicemail_message: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            engine: EngineKind::OpenAiRealtime,
            system_prompt: "You are a helpful phone assistant.".into(),
            greeting: "Hello! How can I help you today?".into(),
            voice: "alloy".into(),
            max_call_duration: HumanDuration::from_secs(15 * 60),
            silence_timeout: HumanDuration::from_secs(10),
            greet_inbound: true,
            goodbye: "Thank you for calling. Goodbye!".into(),
            script: vec![
                "Thanks, I heard you. This is the voicectl demo agent.".into(),
                "Got it. Anything else?".into(),
            ],
            record: false,
            machine_detection: crate::domain::amd::MachineDetection::Off,
            voicemail_message: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    pub api_key: Secret,
    pub api_key_file: Option<PathBuf>,
    pub realtime_url: String,
    pub model: String,
    /// Speak the older beta protocol (`OpenAI-Beta: realtime=v1`, `g711_ulaw`, beta event names).
    pub beta_protocol: bool,
    /// Input transcription model for caller lines ("" turns caller transcripts off).
    pub transcription_model: String,
    /// Chat completions, speech and analysis (the pipeline engine).
    pub api_base_url: String,
    /// The pipeline's `openai` voice; the voice is the call's (`agent.voice`).
    pub tts_model: String,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            api_key: Secret::default(),
            api_key_file: None,
            realtime_url: "wss://api.openai.com/v1/realtime".into(),
            model: "gpt-realtime".into(),
            beta_protocol: false,
            transcription_model: "whisper-1".into(),
            api_base_url: OPENAI_API_BASE.into(),
            tts_model: "gpt-4o-mini-tts".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UltravoxConfig {
    pub api_key: Secret,
    pub api_key_file: Option<PathBuf>,
    pub api_base_url: String,
    /// Ultravox model; "" uses Ultravox's default.
    pub model: String,
    /// Ultravox voice (its own names, e.g. "Mark"); "" uses Ultravox's default. A tenant's
    /// or call's `voice` overrides it.
    pub voice: String,
    /// `twilio`: Twilio streams straight to Ultravox. `server-websocket`: the audio passes
    /// through voicectl (governors, barge-in, live transcript, latency figures apply).
    pub medium: UltravoxMedium,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum UltravoxMedium {
    #[default]
    #[serde(rename = "twilio")]
    Twilio,
    #[serde(rename = "server-websocket")]
    ServerWebSocket,
}

impl Default for UltravoxConfig {
    fn default() -> Self {
        Self {
            api_key: Secret::default(),
            api_key_file: None,
            api_base_url: "https://api.ultravox.ai".into(),
            model: String::new(),
            voice: String::new(),
            medium: UltravoxMedium::Twilio,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub api_requests_per_second_per_ip: u32,
    /// Browser calls started through public `/talk/<token>` links, per client IP.
    pub talk_calls_per_minute_per_ip: u32,
    pub calls_per_minute_per_tenant: u32,
    /// Twilio webhooks and media upgrades (`/twilio/...`), per client IP.
    pub webhook_requests_per_second_per_ip: u32,
    /// Concurrent WebSocket connections per client IP.
    pub max_websockets_per_ip: u32,
    /// Request line plus headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    // Listener limits (SPEC §10); checked by `validate_listener_limits`.
    /// Open client connections across all listeners; 0 derives it from the descriptor limit
    /// (`RLIMIT_NOFILE`), leaving a quarter (at least 256) spare for calls and files.
    pub max_connections: u32,
    /// Open connections per client address (IPv6 per /64); `server.trusted_proxies` are exempt.
    pub max_connections_per_ip: u32,
    /// From accept to the first complete request head: TLS handshake, protocol detection and
    /// headers must all arrive within this; later heads get it again each.
    pub header_timeout: HumanDuration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: HumanDuration,
    /// A request body must arrive in full within this.
    pub body_timeout: HumanDuration,
    /// HTTP/2: ping an idle peer this often; no answer within `http2_keepalive_timeout` closes.
    pub http2_keepalive_interval: HumanDuration,
    pub http2_keepalive_timeout: HumanDuration,
    /// HTTP/2: concurrent streams per connection.
    pub http2_max_streams: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            api_requests_per_second_per_ip: 100,
            talk_calls_per_minute_per_ip: 5,
            calls_per_minute_per_tenant: 60,
            webhook_requests_per_second_per_ip: 500,
            max_websockets_per_ip: 1000,
            max_header_bytes: 16 * 1024,
            max_connections: 0,
            max_connections_per_ip: 2048,
            header_timeout: HumanDuration::from_secs(10),
            idle_timeout: HumanDuration::from_secs(75),
            body_timeout: HumanDuration::from_secs(60),
            http2_keepalive_interval: HumanDuration::from_secs(30),
            http2_keepalive_timeout: HumanDuration::from_secs(10),
            http2_max_streams: 100,
        }
    }
}

impl LimitsConfig {
    /// The listener keys (SPEC §10); Err names the key and says why.
    fn validate_listener_limits(&self) -> Result<(), (&'static str, String)> {
        if self.max_connections_per_ip == 0 {
            return Err(("limits.max_connections_per_ip", "must be at least 1".into()));
        }
        if self.max_connections != 0 && self.max_connections < self.max_connections_per_ip {
            return Err((
                "limits.max_connections",
                "must be 0 (derive it) or at least limits.max_connections_per_ip".into(),
            ));
        }
        for (key, d, min, max) in [
            ("limits.header_timeout", self.header_timeout, 1, 300),
            ("limits.idle_timeout", self.idle_timeout, 1, 3600),
            ("limits.body_timeout", self.body_timeout, 1, 3600),
            (
                "limits.http2_keepalive_interval",
                self.http2_keepalive_interval,
                1,
                3600,
            ),
            (
                "limits.http2_keepalive_timeout",
                self.http2_keepalive_timeout,
                1,
                300,
            ),
        ] {
            if d.0 < std::time::Duration::from_secs(min) || d.as_secs() > max {
                return Err((key, format!("must be between {min}s and {max}s")));
            }
        }
        if self.http2_max_streams == 0 {
            return Err(("limits.http2_max_streams", "must be at least 1".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyRoute {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_proxy_path")]
    pub path: String,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub root: Option<PathBuf>,
}

fn default_proxy_path() -> String {
    "/".into()
}

/// A secret string: never printed by `Debug`, never serialized back out.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

impl Config {
    /// Reads, resolves secrets and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path, &|k| std::env::var(k).ok())
    }

    /// Parses `text` (named `path` in errors); `env` looks up environment variables so tests
    /// need not touch the process environment.
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        cfg.source = Some(path.to_owned());
        cfg.resolve_secrets(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration `serve --dev` runs with when no file is given: plain HTTP on
    /// loopback, TLS off, the scripted engine, data in `./voicectl-data`.
    pub fn dev() -> Config {
        let mut cfg = Config::default();
        cfg.server.domain = "localhost".into();
        cfg.server.data_dir = PathBuf::from("./voicectl-data");
        cfg.server.listen = "127.0.0.1:8080".into();
        cfg.server.http_listen = String::new();
        cfg.server.https_listen = String::new();
        cfg.server.max_concurrent_calls = 50;
        cfg.server.drain_timeout = HumanDuration::from_secs(10);
        cfg.tls.mode = TlsMode::Off;
        cfg.twilio.account_sid = "ACdev0000000000000000000000000000".into();
        cfg.twilio.auth_token = Secret::new("dev-auth-token");
        cfg.twilio.from_number = "+15005550006".into();
        cfg.twilio.simulate = true;
        cfg.twilio.calls_per_second = 10.0;
        cfg.agent.engine = EngineKind::Scripted;
        cfg.webrtc.public_ip = "127.0.0.1".into();
        cfg
    }

    fn resolve_secrets(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let path = self.source.clone().unwrap_or_default();
        let slots: [(&str, &str, &mut Secret, &Option<PathBuf>); 5] = [
            (
                "twilio",
                "auth_token",
                &mut self.twilio.auth_token,
                &self.twilio.auth_token_file,
            ),
            (
                "openai",
                "api_key",
                &mut self.openai.api_key,
                &self.openai.api_key_file,
            ),
            (
                "ultravox",
                "api_key",
                &mut self.ultravox.api_key,
                &self.ultravox.api_key_file,
            ),
            (
                "deepgram",
                "api_key",
                &mut self.deepgram.api_key,
                &self.deepgram.api_key_file,
            ),
            (
                "elevenlabs",
                "api_key",
                &mut self.elevenlabs.api_key,
                &self.elevenlabs.api_key_file,
            ),
        ];
        for (section, key, slot, file) in slots {
            if let Some(file) = file {
                if !slot.is_empty() {
                    return Err(ConfigError::Invalid {
                        path,
                        key: format!("{section}.{key}_file"),
                        reason: format!("set either {key} or {key}_file, not both"),
                    });
                }
                let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
                    path: path.clone(),
                    key: format!("{section}.{key}_file"),
                    reason: format!("cannot read {}: {e}", file.display()),
                })?;
                *slot = Secret::new(text.trim_end_matches(['\n', '\r']));
            }
            let var = format!("VOICECTL_{}_{}", section.to_uppercase(), key.to_uppercase());
            if let Some(v) = env(&var) {
                *slot = Secret::new(v);
            }
        }
        // Non-secret strings may come from the environment too (e.g. a per-host account SID).
        let plain: [(&str, &str, &mut String); 4] = [
            ("twilio", "account_sid", &mut self.twilio.account_sid),
            ("twilio", "from_number", &mut self.twilio.from_number),
            ("twilio", "api_base_url", &mut self.twilio.api_base_url),
            ("server", "domain", &mut self.server.domain),
        ];
        for (section, key, slot) in plain {
            let var = format!("VOICECTL_{}_{}", section.to_uppercase(), key.to_uppercase());
            if let Some(v) = env(&var) {
                *slot = v;
            }
        }
        // An `[[llm]]` on OpenAI's own API shares `openai.api_key` unless it has its own.
        for l in &mut self.llm {
            if l.api_key.is_empty() && l.base_url.trim_end_matches('/') == OPENAI_API_BASE {
                l.api_key = self.openai.api_key.clone();
            }
        }
        Ok(())
    }

    /// Checks values that parse but make no sense; names the key and says why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let path = self.source.clone().unwrap_or_default();
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            path: path.clone(),
            key: key.to_owned(),
            reason,
        };
        let s = &self.server;
        for (key, value) in [
            ("server.listen", &s.listen),
            ("server.http_listen", &s.http_listen),
            ("server.https_listen", &s.https_listen),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return Err(bad(
                    key,
                    format!(
                        "{value:?} is not an address like \"0.0.0.0:443\" or \"127.0.0.1:8080\""
                    ),
                ));
            }
        }
        if s.listen.is_empty() && s.https_listen.is_empty() && s.http_listen.is_empty() {
            return Err(bad(
                "server.listen",
                "no listener configured: set listen, https_listen or http_listen".into(),
            ));
        }
        if !s.domain.is_empty() && !is_hostname(&s.domain) {
            return Err(bad(
                "server.domain",
                format!("{:?} is not a host name", s.domain),
            ));
        }
        for d in &s.extra_domains {
            if !is_hostname(d) {
                return Err(bad(
                    "server.extra_domains",
                    format!("{d:?} is not a host name"),
                ));
            }
        }
        if !s.public_url.is_empty() {
            match reqwest::Url::parse(&s.public_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(bad(
                        "server.public_url",
                        format!("{:?} is not an http(s) URL", s.public_url),
                    ));
                }
            }
        }
        if s.domain.is_empty() && s.public_url.is_empty() {
            return Err(bad(
                "server.domain",
                "required (webhook URLs and certificates use it); or set server.public_url".into(),
            ));
        }
        if s.data_dir.as_os_str().is_empty() {
            return Err(bad("server.data_dir", "must not be empty".into()));
        }
        if s.max_concurrent_calls == 0 {
            return Err(bad(
                "server.max_concurrent_calls",
                "must be at least 1".into(),
            ));
        }
        if s.inbound_reserve
            .is_some_and(|r| r >= s.max_concurrent_calls)
        {
            return Err(bad(
                "server.inbound_reserve",
                "must be below server.max_concurrent_calls".into(),
            ));
        }
        if s.max_body_bytes < 1024 {
            return Err(bad("server.max_body_bytes", "must be at least 1024".into()));
        }
        match self.tls.mode {
            TlsMode::Manual if self.tls.cert_file.is_empty() || self.tls.key_file.is_empty() => {
                return Err(bad(
                    "tls.cert_file",
                    "tls.mode = \"manual\" needs cert_file and key_file".into(),
                ));
            }
            TlsMode::Acme | TlsMode::Manual if s.https_listen.is_empty() => {
                return Err(bad(
                    "server.https_listen",
                    "TLS is on (tls.mode) but https_listen is empty; set it or tls.mode = \"off\""
                        .into(),
                ));
            }
            TlsMode::Acme if s.domain.is_empty() => {
                return Err(bad(
                    "server.domain",
                    "required when tls.mode = \"acme\"".into(),
                ));
            }
            TlsMode::Acme
                if self.tls.challenge == AcmeChallenge::Http01 && s.http_listen.is_empty() =>
            {
                return Err(bad(
                    "server.http_listen",
                    "tls.challenge = \"http-01\" is answered on http_listen (port 80 as seen \
                     from the internet); set it, or use tls.challenge = \"tls-alpn-01\""
                        .into(),
                ));
            }
            TlsMode::Acme if !self.tls.acme_root_ca.is_empty() => {
                if let Err(e) = std::fs::metadata(&self.tls.acme_root_ca) {
                    return Err(bad(
                        "tls.acme_root_ca",
                        format!("cannot read {:?}: {e}", self.tls.acme_root_ca),
                    ));
                }
            }
            _ => {}
        }
        for (key, url) in [
            ("tls.acme_directory", &self.tls.acme_directory),
            ("twilio.api_base_url", &self.twilio.api_base_url),
            ("ultravox.api_base_url", &self.ultravox.api_base_url),
        ] {
            check_url(url, &["http", "https"]).map_err(|r| bad(key, r))?;
        }
        check_url(&self.openai.realtime_url, &["ws", "wss"])
            .map_err(|r| bad("openai.realtime_url", r))?;
        self.validate_pipeline().map_err(|(k, r)| bad(&k, r))?;
        if !self.twilio.from_number.is_empty() {
            E164::parse(&self.twilio.from_number)
                .map_err(|e| bad("twilio.from_number", e.to_string()))?;
        }
        if !self.twilio.account_sid.is_empty() && !self.twilio.account_sid.starts_with("AC") {
            return Err(bad(
                "twilio.account_sid",
                "a Twilio Account SID starts with \"AC\"".into(),
            ));
        }
        if self.agent.max_call_duration.as_secs() < 10 {
            return Err(bad(
                "agent.max_call_duration",
                "must be at least 10s".into(),
            ));
        }
        if self.agent.max_call_duration.as_secs() > 4 * 3600 {
            return Err(bad(
                "agent.max_call_duration",
                "must be at most 4h (Twilio's own TimeLimit cap)".into(),
            ));
        }
        if !(self.twilio.calls_per_second > 0.0 && self.twilio.calls_per_second <= 1000.0) {
            return Err(bad(
                "twilio.calls_per_second",
                "must be more than 0 and at most 1000".into(),
            ));
        }
        if !(5..=600).contains(&self.twilio.ring_timeout.as_secs()) {
            return Err(bad(
                "twilio.ring_timeout",
                "must be between 5s and 10m".into(),
            ));
        }
        if self.server.queue_timeout.as_secs() < 1 {
            return Err(bad("server.queue_timeout", "must be at least 1s".into()));
        }
        if self.agent.silence_timeout.as_secs() < 1 {
            return Err(bad("agent.silence_timeout", "must be at least 1s".into()));
        }
        if self.limits.api_requests_per_second_per_ip == 0 {
            return Err(bad(
                "limits.api_requests_per_second_per_ip",
                "must be at least 1".into(),
            ));
        }
        if self.limits.calls_per_minute_per_tenant == 0 {
            return Err(bad(
                "limits.calls_per_minute_per_tenant",
                "must be at least 1".into(),
            ));
        }
        if self.limits.webhook_requests_per_second_per_ip == 0 {
            return Err(bad(
                "limits.webhook_requests_per_second_per_ip",
                "must be at least 1".into(),
            ));
        }
        if self.limits.max_websockets_per_ip == 0 {
            return Err(bad(
                "limits.max_websockets_per_ip",
                "must be at least 1".into(),
            ));
        }
        if self.limits.max_header_bytes < 1024 {
            return Err(bad(
                "limits.max_header_bytes",
                "must be at least 1024".into(),
            ));
        }
        for h in &s.allow_private_targets {
            let bare = h.trim_start_matches('[').trim_end_matches(']');
            if bare.parse::<std::net::IpAddr>().is_err() && !is_hostname(bare) {
                return Err(bad(
                    "server.allow_private_targets",
                    format!("{h:?} is not a host name or an IP address"),
                ));
            }
        }
        self.limits
            .validate_listener_limits()
            .map_err(|(k, r)| bad(k, r))?;
        for (key, list) in [
            ("server.metrics_allow", &s.metrics_allow),
            ("server.trusted_proxies", &s.trusted_proxies),
        ] {
            crate::domain::net::parse_list(list).map_err(|r| bad(key, r))?;
        }
        for (i, p) in self.proxy.iter().enumerate() {
            let key = |k: &str| format!("proxy[{i}].{k}");
            if !p.path.starts_with('/') {
                return Err(bad(&key("path"), "must start with \"/\"".into()));
            }
            match (&p.upstream, &p.root) {
                (Some(u), None) => check_url(u, &["http"]).map_err(|r| bad(&key("upstream"), r))?,
                (None, Some(_)) => {}
                _ => {
                    return Err(bad(
                        &key("upstream"),
                        "set exactly one of upstream or root".into(),
                    ));
                }
            }
            if let Some(h) = &p.host
                && !is_hostname(h)
            {
                return Err(bad(&key("host"), format!("{h:?} is not a host name")));
            }
        }
        Ok(())
    }

    /// The pipeline's sections: URLs, `[[llm]]` names, the provider lists.
    fn validate_pipeline(&self) -> Result<(), (String, String)> {
        let url = |key: &str, u: &str, schemes: &[&str]| {
            check_url(u, schemes).map_err(|r| (key.to_owned(), r))
        };
        url(
            "openai.api_base_url",
            &self.openai.api_base_url,
            &["http", "https"],
        )?;
        url("deepgram.stt_url", &self.deepgram.stt_url, &["ws", "wss"])?;
        url("deepgram.tts_url", &self.deepgram.tts_url, &["ws", "wss"])?;
        url(
            "elevenlabs.api_base_url",
            &self.elevenlabs.api_base_url,
            &["ws", "wss"],
        )?;
        if !(10..=10_000).contains(&self.deepgram.endpointing_ms) {
            return Err((
                "deepgram.endpointing_ms".into(),
                "must be between 10 and 10000".into(),
            ));
        }
        if !(1000..=5000).contains(&self.deepgram.utterance_end_ms) {
            return Err((
                "deepgram.utterance_end_ms".into(),
                "must be between 1000 and 5000 (Deepgram sends interims about once a second)"
                    .into(),
            ));
        }
        for (i, l) in self.llm.iter().enumerate() {
            let key = |k: &str| format!("llm[{i}].{k}");
            if l.name.is_empty()
                || !l
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err((
                    key("name"),
                    format!("{:?} must be letters, digits, - _ .", l.name),
                ));
            }
            if self.llm[..i].iter().any(|o| o.name == l.name) {
                return Err((key("name"), format!("{:?} is used twice", l.name)));
            }
            url(&key("base_url"), &l.base_url, &["http", "https"])?;
            if l.model.is_empty() {
                return Err((key("model"), "must not be empty".into()));
            }
            if !(0.0..=2.0).contains(&l.temperature) {
                return Err((key("temperature"), "must be between 0 and 2".into()));
            }
        }
        match &self.pipeline {
            Some(p) => p.check(&self.llm)?,
            None if self.agent.engine == EngineKind::Pipeline => {
                return Err((
                    "agent.engine".into(),
                    "\"pipeline\" needs a [pipeline] section (SPEC §6)".into(),
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// The media-stream WebSocket URL handed to Twilio (`wss://` for an `https://` base).
    pub fn media_url(&self) -> String {
        let base = self.public_url();
        let ws = match base.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}"),
            None => format!("ws://{}", base.trim_start_matches("http://")),
        };
        format!("{ws}/twilio/media")
    }

    /// The public base URL Twilio reaches us on, without a trailing slash.
    pub fn public_url(&self) -> String {
        if !self.server.public_url.is_empty() {
            return self.server.public_url.trim_end_matches('/').to_owned();
        }
        if self.tls.mode == TlsMode::Off {
            if !self.server.listen.is_empty() {
                return format!("http://{}", self.server.listen);
            }
            return format!("http://{}", self.server.domain);
        }
        format!("https://{}", self.server.domain)
    }
}

fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if schemes.contains(&u.scheme()) && u.host().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "{url:?} must be a {} URL with a host (got scheme {:?})",
            schemes.join("/"),
            u.scheme()
        )),
        Err(e) => Err(format!("{url:?} is not a URL: {e}")),
    }
}

/// A DNS name (or "localhost"): letters, digits, hyphens, dots; no scheme, port or path.
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// One line naming where and what: `line 4 (server.listn): unknown field ...`.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return msg;
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    // The nearest table header above the error, and the key on the error's own line.
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_owned())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (section, key) {
        (Some(s), Some(k)) => format!("line {line_no} ({s}.{k}): {msg}"),
        (None, Some(k)) => format!("line {line_no} ({k}): {msg}"),
        _ if line.trim_start().starts_with('[') => {
            format!("line {line_no} ({}): {msg}", line.trim())
        }
        _ => format!("line {line_no}: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("t.toml"), &|_| None)
    }

    const MINIMAL: &str = "[server]\ndomain = \"voice.example.com\"\n";

    #[test]
    fn template_parses_with_defaults() {
        let text = crate::cli::init::render_template(
            "voice.example.com",
            "ops@example.com",
            Path::new("/var/lib/voicectl"),
            false,
        );
        let cfg = parse(&text).expect("template parses");
        let d = Config::default();
        assert_eq!(
            cfg.server.max_concurrent_calls,
            d.server.max_concurrent_calls
        );
        assert_eq!(cfg.server.drain_timeout, d.server.drain_timeout);
        assert_eq!(cfg.tls.acme_directory, d.tls.acme_directory);
        assert_eq!(cfg.agent.voice, d.agent.voice);
        assert_eq!(cfg.agent.max_call_duration, d.agent.max_call_duration);
        assert_eq!(
            cfg.limits.calls_per_minute_per_tenant,
            d.limits.calls_per_minute_per_tenant
        );
        assert_eq!(
            cfg.limits.webhook_requests_per_second_per_ip,
            d.limits.webhook_requests_per_second_per_ip
        );
        assert_eq!(
            cfg.limits.max_websockets_per_ip,
            d.limits.max_websockets_per_ip
        );
        assert_eq!(cfg.limits.max_header_bytes, d.limits.max_header_bytes);
        assert_eq!(cfg.limits.max_connections, d.limits.max_connections);
        assert_eq!(
            cfg.limits.max_connections_per_ip,
            d.limits.max_connections_per_ip
        );
        assert_eq!(cfg.limits.header_timeout, d.limits.header_timeout);
        assert_eq!(cfg.limits.idle_timeout, d.limits.idle_timeout);
        assert_eq!(cfg.limits.body_timeout, d.limits.body_timeout);
        assert_eq!(cfg.server.metrics_allow, d.server.metrics_allow);
        assert_eq!(cfg.server.trusted_proxies, d.server.trusted_proxies);
        assert_eq!(cfg.public_url(), "https://voice.example.com");
    }

    #[test]
    fn dev_template_parses() {
        let text =
            crate::cli::init::render_template("localhost", "", Path::new("./voicectl-data"), true);
        let cfg = parse(&text).expect("dev template parses");
        assert_eq!(cfg.tls.mode, TlsMode::Off);
        assert_eq!(cfg.agent.engine, EngineKind::Scripted);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("[server]\ndomain = \"a.example\"\n\nlisten_addr = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let err = parse("[sever]\ndomain = \"a\"\n").unwrap_err().to_string();
        assert!(err.contains("sever") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn malformed_toml_names_line() {
        let err = parse("[server]\ndomain = \"a.example\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn invalid_values_name_key() {
        for (text, key) in [
            ("[server]\ndomain=\"a.b\"\nlisten=\"nope\"", "server.listen"),
            (
                "[server]\ndomain=\"a.b\"\ndrain_timeout=\"soon\"",
                "drain_timeout",
            ),
            ("[server]\ndomain=\"a b\"", "server.domain"),
            ("[server]\ndomain=\"a.b\"\n[tls]\nmode=\"maybe\"", "mode"),
            (
                "[server]\ndomain=\"a.b\"\n[twilio]\nfrom_number=\"555\"",
                "twilio.from_number",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[openai]\nrealtime_url=\"http://x\"",
                "openai.realtime_url",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[agent]\nengine=\"gpt\"",
                "engine",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[[proxy]]\npath=\"/\"\n",
                "proxy[0].upstream",
            ),
            (
                "[server]\ndomain=\"a.b\"\nmax_concurrent_calls=0",
                "max_concurrent_calls",
            ),
            (
                "[server]\ndomain=\"a.b\"\nmetrics_allow=[\"10.0.0.0/40\"]",
                "server.metrics_allow",
            ),
            (
                "[server]\ndomain=\"a.b\"\ntrusted_proxies=[\"lb\"]",
                "server.trusted_proxies",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[limits]\nmax_websockets_per_ip=0",
                "limits.max_websockets_per_ip",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[limits]\nmax_header_bytes=10",
                "limits.max_header_bytes",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[limits]\nmax_connections_per_ip=0",
                "limits.max_connections_per_ip",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[limits]\nmax_connections=5\nmax_connections_per_ip=10",
                "limits.max_connections",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[limits]\nheader_timeout=\"0s\"",
                "limits.header_timeout",
            ),
            (
                "[server]\ndomain=\"a.b\"\n[limits]\nbody_timeout=\"2h\"",
                "limits.body_timeout",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} → {err}");
        }
    }

    #[test]
    fn secrets_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "from-file\n").unwrap();
        let text = format!("{MINIMAL}[twilio]\nauth_token_file = {:?}\n", f);
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.twilio.auth_token.expose(), "from-file");

        let env = |k: &str| (k == "VOICECTL_TWILIO_AUTH_TOKEN").then(|| "from-env".to_owned());
        let cfg = Config::from_toml(&text, Path::new("t"), &env).unwrap();
        assert_eq!(cfg.twilio.auth_token.expose(), "from-env");
        assert!(
            !format!("{cfg:?}").contains("from-env"),
            "Debug leaks a secret"
        );
    }

    #[test]
    fn unreadable_secret_file_is_an_error() {
        let text = format!("{MINIMAL}[openai]\napi_key_file = \"/nonexistent/key\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("openai.api_key_file"), "{err}");
        assert!(err.contains("/nonexistent/key"), "{err}");
    }

    #[test]
    fn hostnames() {
        assert!(is_hostname("voice.example.com"));
        assert!(is_hostname("localhost"));
        assert!(!is_hostname("https://x"));
        assert!(!is_hostname("a..b"));
        assert!(!is_hostname("x:443"));
    }
}

/// Property tests (issue 11): any file an operator (or a mistaken `init`) writes gives a
/// config or a clear error, never a panic — also when the error points into multi-byte text.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn line() -> impl Strategy<Value = String> {
        let section = prop_oneof![
            Just("[server]"),
            Just("[tls]"),
            Just("[twilio]"),
            Just("[agent]"),
            Just("[openai]"),
            Just("[ultravox]"),
            Just("[limits]"),
            Just("[[proxy]]"),
            Just("[nope]"),
        ]
        .prop_map(str::to_owned);
        let key = prop_oneof![
            Just("domain"),
            Just("public_url"),
            Just("listen"),
            Just("max_concurrent_calls"),
            Just("drain_timeout"),
            Just("trusted_proxies"),
            Just("allow_private_targets"),
            Just("mode"),
            Just("engine"),
            Just("path"),
            Just("host"),
            Just("upstream"),
            Just("root"),
            Just("header_timeout"),
            Just("max_connections"),
            Just("calls_per_second"),
            Just("ünïcode"),
        ];
        let value = prop_oneof![
            Just("\"60s\"".to_owned()),
            Just("\"example.com\"".to_owned()),
            Just("\"/\"".to_owned()),
            Just("\"http://127.0.0.1:3000\"".to_owned()),
            Just("[\"10.0.0.0/8\", \"::1\"]".to_owned()),
            Just("true".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:?}")),
            "\\PC{0,12}".prop_map(|s| format!("{s:?}")),
            "\\PC{0,12}",
        ];
        prop_oneof![
            section,
            (key, value).prop_map(|(k, v)| format!("{k} = {v}"))
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = Config::from_toml(&text, Path::new("t.toml"), &|_| None);
        }

        #[test]
        fn toml_shaped_files_never_panic(lines in proptest::collection::vec(line(), 0..12)) {
            let _ = Config::from_toml(&lines.join("\n"), Path::new("t.toml"), &|_| None);
        }

        #[test]
        fn the_template_with_a_splice_never_panics(
            at in 0..TEMPLATE.len(),
            cut in 0usize..40,
            insert in "\\PC{0,20}",
        ) {
            let start = (0..=at).rev().find(|&i| TEMPLATE.is_char_boundary(i)).unwrap_or(0);
            let end = (start + cut..=TEMPLATE.len())
                .find(|&i| TEMPLATE.is_char_boundary(i))
                .unwrap_or(TEMPLATE.len());
            let text = format!("{}{insert}{}", &TEMPLATE[..start], &TEMPLATE[end..]);
            let _ = Config::from_toml(&text, Path::new("t.toml"), &|_| None);
        }

        #[test]
        fn durations_round_trip(secs in 0u64..10 * 365 * 86400) {
            let d = HumanDuration::from_secs(secs);
            prop_assert_eq!(HumanDuration::parse(&d.to_string()), Ok(d));
        }

        #[test]
        fn any_duration_text_never_panics(s in "\\PC{0,30}|[0-9]{1,25}[a-z]{1,3}") {
            let _ = HumanDuration::parse(&s);
        }
    }
}

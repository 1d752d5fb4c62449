//! Ultravox (PROTOCOLS §4) with its Twilio medium: we create the Ultravox call, hand Twilio
//! TwiML that connects the media stream straight to Ultravox's `joinUrl`, and fetch the
//! transcript once the call is over.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::UltravoxConfig;
use crate::store::calls::TranscriptEntry;

#[derive(Debug, thiserror::Error)]
pub enum UltravoxError {
    #[error("Ultravox answered HTTP {status}: {message}")]
    Api {
        status: u16,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("cannot reach Ultravox: {0}")]
    Transport(String),
    #[error("unexpected answer from Ultravox: {0}")]
    Protocol(String),
}

/// How the call's audio reaches Ultravox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// Twilio streams straight to the `joinUrl`.
    Twilio,
    /// We join the `joinUrl` and relay PCM s16le at 8 kHz both ways.
    ServerWebSocket,
}

pub struct NewCall<'a> {
    pub system_prompt: &'a str,
    pub voice: Option<&'a str>,
    /// Agent speaks first with this text; `None`: the caller speaks first.
    pub greeting: Option<&'a str>,
    pub max_duration: Duration,
    pub call_id: &'a str,
    pub tenant: &'a str,
    pub medium: Medium,
    /// Functions offered as client tools (server WebSocket medium: the invocation comes back
    /// on our socket, and voicectl runs the tool).
    pub tools: &'a [super::ToolSpec],
}

/// A tool as an Ultravox client `temporaryTool`: each top-level property of the JSON Schema is
/// one body parameter.
pub fn client_tool(t: &super::ToolSpec) -> Value {
    let required: Vec<&str> = t.parameters["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let params: Vec<Value> = t.parameters["properties"]
        .as_object()
        .map(|props| {
            props
                .iter()
                .map(|(name, schema)| {
                    json!({"name": name, "location": "PARAMETER_LOCATION_BODY",
                           "schema": schema, "required": required.contains(&name.as_str())})
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"temporaryTool": {"modelToolName": t.name, "description": t.description,
        "dynamicParameters": params, "client": {}}})
}

#[derive(Debug, Clone)]
pub struct CreatedCall {
    pub call_id: String,
    pub join_url: String,
}

#[derive(Clone)]
pub struct UltravoxClient {
    http: reqwest::Client,
    base: String,
    key: String,
    model: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CallBody {
    call_id: String,
    #[serde(default)]
    join_url: Option<String>,
}

#[derive(Deserialize)]
struct MessagePage {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    results: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    timespan: Option<Timespan>,
}

#[derive(Deserialize)]
struct Timespan {
    #[serde(default)]
    start: Option<String>,
}

/// The Ultravox voice for a call: the call's or tenant's own choice when it differs from
/// the OpenAI-flavoured `agent.voice` default, else `ultravox.voice` ("" = Ultravox's default).
pub fn voice_for<'a>(ctx_voice: &'a str, cfg: &'a crate::config::Config) -> Option<&'a str> {
    (ctx_voice != cfg.agent.voice)
        .then_some(ctx_voice)
        .or(Some(cfg.ultravox.voice.as_str()))
}

/// Protobuf duration strings such as `"1.2s"` → milliseconds.
fn duration_ms(s: &str) -> Option<i64> {
    let secs: f64 = s.trim().strip_suffix('s')?.parse().ok()?;
    Some((secs * 1000.0).round() as i64)
}

impl UltravoxClient {
    pub fn new(cfg: &UltravoxConfig) -> Result<Self, UltravoxError> {
        let http = reqwest::Client::builder()
            // Our key must never follow a redirect to another host.
            .redirect(crate::ops::outbound::provider_redirects())
            .timeout(Duration::from_secs(8))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("voicectl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UltravoxError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base: cfg.api_base_url.trim_end_matches('/').to_owned(),
            key: cfg.api_key.expose().to_owned(),
            model: cfg.model.clone(),
        })
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, UltravoxError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.chars().take(200).collect());
        Err(UltravoxError::Api {
            status: status.as_u16(),
            message,
            retry_after,
        })
    }

    /// Creates a call for Twilio to join. A 429/503 whose `Retry-After` fits inside
    /// Twilio's webhook deadline is retried once after waiting it out.
    pub async fn create_call(&self, c: &NewCall<'_>) -> Result<CreatedCall, UltravoxError> {
        let mut body = json!({
            "systemPrompt": c.system_prompt,
            "medium": match c.medium {
                Medium::Twilio => json!({"twilio": {}}),
                // A large client buffer: we play at the phone's pace and clear on barge-in.
                Medium::ServerWebSocket => json!({"serverWebSocket": {
                    "inputSampleRate": 8000,
                    "outputSampleRate": 8000,
                    "clientBufferSizeMs": 30000,
                }}),
            },
            "firstSpeakerSettings": match c.greeting {
                Some(text) => json!({"agent": {"text": text}}),
                None => json!({"user": {}}),
            },
            "maxDuration": format!("{}s", c.max_duration.as_secs()),
            "joinTimeout": "30s",
            "metadata": {"voicectl_call_id": c.call_id, "voicectl_tenant": c.tenant},
        });
        if !c.tools.is_empty() && c.medium == Medium::ServerWebSocket {
            body["selectedTools"] = c.tools.iter().map(client_tool).collect();
        }
        if let Some(v) = c.voice.filter(|v| !v.is_empty()) {
            body["voice"] = v.into();
        }
        if !self.model.is_empty() {
            body["model"] = self.model.clone().into();
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let resp = self
                .http
                .post(format!("{}/api/calls", self.base))
                .header("x-api-key", &self.key)
                .json(&body)
                .send()
                .await
                .map_err(|e| UltravoxError::Transport(e.without_url().to_string()))?;
            match Self::check(resp).await {
                Ok(resp) => {
                    let call: CallBody = resp
                        .json()
                        .await
                        .map_err(|e| UltravoxError::Protocol(format!("call: {e}")))?;
                    let join_url = call
                        .join_url
                        .filter(|u| u.starts_with("wss://") || u.starts_with("ws://"))
                        .ok_or_else(|| {
                            UltravoxError::Protocol("the call has no ws(s):// joinUrl".into())
                        })?;
                    return Ok(CreatedCall {
                        call_id: call.call_id,
                        join_url,
                    });
                }
                Err(UltravoxError::Api {
                    status: 429 | 503,
                    retry_after: Some(secs),
                    ..
                }) if attempt == 1 && secs <= 3 => {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The call's transcript, all pages, in order.
    pub async fn transcript(&self, call_id: &str) -> Result<Vec<TranscriptEntry>, UltravoxError> {
        let mut url = format!("{}/api/calls/{call_id}/messages?pageSize=100", self.base);
        let mut out = Vec::new();
        for _ in 0..100 {
            let resp = self
                .http
                .get(&url)
                .header("x-api-key", &self.key)
                .send()
                .await
                .map_err(|e| UltravoxError::Transport(e.without_url().to_string()))?;
            let page: MessagePage = Self::check(resp)
                .await?
                .json()
                .await
                .map_err(|e| UltravoxError::Protocol(format!("messages: {e}")))?;
            for m in page.results {
                let speaker = match m.role.as_str() {
                    "MESSAGE_ROLE_USER" => "caller",
                    "MESSAGE_ROLE_AGENT" => "agent",
                    _ => continue,
                };
                let Some(text) = m.text.filter(|t| !t.trim().is_empty()) else {
                    continue;
                };
                let at_ms = m
                    .timespan
                    .and_then(|t| t.start)
                    .and_then(|s| duration_ms(&s))
                    .unwrap_or(0);
                out.push(TranscriptEntry {
                    speaker,
                    text,
                    at_ms,
                });
            }
            match page.next.as_deref().and_then(|n| next_page(&self.base, n)) {
                Some(next) => url = next,
                None => return Ok(out),
            }
        }
        Ok(out)
    }
}

/// The next page's URL when it is on the same origin as `base` (scheme, host and port
/// compared parsed, so `https://api.ultravox.ai.evil.tld` or `//evil.tld` never get our key).
fn next_page(base: &str, next: &str) -> Option<String> {
    if next.is_empty() {
        return None;
    }
    let base = reqwest::Url::parse(base).ok()?;
    let url = base.join(next).ok()?;
    crate::ops::outbound::same_origin(&base, &url).then(|| url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_stays_on_the_ultravox_origin() {
        let base = "https://api.ultravox.ai";
        for (next, want) in [
            (
                "https://api.ultravox.ai/api/calls/x/messages?cursor=2",
                Some("https://api.ultravox.ai/api/calls/x/messages?cursor=2"),
            ),
            (
                "/api/calls/x/messages?cursor=2",
                Some("https://api.ultravox.ai/api/calls/x/messages?cursor=2"),
            ),
            ("https://api.ultravox.ai.evil.tld/api/calls", None),
            ("https://api.ultravox.ai@evil.tld/api/calls", None),
            ("//evil.tld/api/calls", None),
            ("http://api.ultravox.ai/api/calls", None),
            ("https://api.ultravox.ai:444/api/calls", None),
            ("", None),
        ] {
            assert_eq!(next_page(base, next).as_deref(), want, "{next}");
        }
    }

    #[test]
    fn protobuf_durations() {
        assert_eq!(duration_ms("1.2s"), Some(1200));
        assert_eq!(duration_ms("0s"), Some(0));
        assert_eq!(duration_ms("soon"), None);
    }
}

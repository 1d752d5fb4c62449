//! Tools during a call (SPEC §8): the call domain's executor. The media bridge only passes an
//! engine's tool calls up and results down; what a tool call *does* is decided here.
//!
//! This first part is the tenant HTTP tool request itself: arguments checked against the
//! tool's JSON Schema before anything leaves the machine, one signed `POST` per tool call with
//! `Idempotency-Key` = the tool call id, the tool's `timeout`, no redirects, SPEC §10 through
//! `ops::outbound`, and an answer of at most 64 kB. Every failure is an error text the model
//! can read and act on.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::domain::timefmt::now_ms;
use crate::domain::tool::{self, ToolDefinition};
use crate::ops::outbound;

/// Largest tool answer handed to the model; a longer one is refused, not truncated (a cut JSON
/// document would mislead the model).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One function call as an engine reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The JSON text the model produced.
    pub arguments: String,
}

/// The call a tool request is about (`"call"` in the request body).
#[derive(Debug, Clone, Serialize)]
pub struct CallInfo {
    pub id: String,
    pub tenant: String,
    pub to: String,
    pub from: String,
    pub metadata: Value,
}

/// Why a tool call produced no answer. `Display` is what the model reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    #[error("there is no tool named {0:?}")]
    Unknown(String),
    #[error("the arguments are not a JSON object: {0}")]
    NotJson(String),
    #[error("the arguments do not match the tool's parameters: {0}")]
    BadArguments(String),
    #[error("the tool cannot be called: {0}")]
    Refused(String),
    #[error("the tool did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the tool answered HTTP {0}")]
    Status(u16),
    #[error("the tool answered with a redirect (HTTP {0}), which is not followed")]
    Redirect(u16),
    #[error("the tool's answer is larger than {} kB", MAX_ANSWER_BYTES / 1024)]
    TooLarge,
    #[error("the tool could not be reached")]
    Unreachable,
}

impl ToolError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ToolError::Unknown(_) => "unknown_tool",
            ToolError::NotJson(_) | ToolError::BadArguments(_) => "bad_arguments",
            ToolError::Refused(_) => "refused",
            ToolError::Timeout(_) => "timeout",
            ToolError::Status(_) => "http_status",
            ToolError::Redirect(_) => "redirect",
            ToolError::TooLarge => "too_large",
            ToolError::Unreachable => "unreachable",
        }
    }
}

/// The arguments of `call` checked against `def`'s schema: the parsed object, or the error the
/// model gets (no request is made then).
pub fn checked_arguments(def: &ToolDefinition, call: &ToolCall) -> Result<Value, ToolError> {
    let raw = if call.arguments.trim().is_empty() {
        "{}"
    } else {
        call.arguments.as_str()
    };
    let args: Value = serde_json::from_str(raw).map_err(|e| ToolError::NotJson(e.to_string()))?;
    if !args.is_object() {
        return Err(ToolError::NotJson("expected an object".into()));
    }
    // The schema compiled when it was stored; a failure here means the row was edited behind
    // the API's back, and the model learns the tool is unusable.
    let validator = tool::compile(&def.parameters).map_err(ToolError::Refused)?;
    tool::check_arguments(&validator, &args).map_err(ToolError::BadArguments)?;
    Ok(args)
}

/// Calls tenant tool `def` once for `call`: the signed `POST` SPEC §8 describes. `http` must come
/// from [`outbound::tenant_client`] (no redirects, guarded resolution); `secret` is the tenant's
/// webhook signing secret.
pub async fn request(
    http: &reqwest::Client,
    allow: &[String],
    secret: Option<&str>,
    def: &ToolDefinition,
    info: &CallInfo,
    call: &ToolCall,
) -> Result<String, ToolError> {
    let args = checked_arguments(def, call)?;
    let Some(secret) = secret else {
        return Err(ToolError::Refused(
            "the tenant has no signing secret (set its webhook_url)".into(),
        ));
    };
    outbound::check(&def.url, allow).map_err(|e| ToolError::Refused(e.to_string()))?;
    let body = serde_json::json!({
        "tool": call.name,
        "arguments": args,
        "call": info,
    })
    .to_string()
    .into_bytes();
    let timeout = def.timeout();
    let sig = crate::calls::jobs::signature(secret, now_ms() / 1000, &body);
    let sent = http
        .post(&def.url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", &call.id)
        .header("x-voicectl-signature", sig)
        .body(body)
        .send()
        .await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => return Err(transport_error(&e, timeout)),
    };
    let status = resp.status();
    if status.is_redirection() {
        return Err(ToolError::Redirect(status.as_u16()));
    }
    if !status.is_success() {
        return Err(ToolError::Status(status.as_u16()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(ToolError::TooLarge);
    }
    // Read piece by piece so a huge or endless answer costs at most the cap in memory.
    let mut answer = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if answer.len() + c.len() > MAX_ANSWER_BYTES {
                    return Err(ToolError::TooLarge);
                }
                answer.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) => return Err(transport_error(&e, timeout)),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn transport_error(e: &reqwest::Error, timeout: Duration) -> ToolError {
    if let Some(r) = outbound::refusal(e) {
        ToolError::Refused(r.to_string())
    } else if e.is_timeout() {
        ToolError::Timeout(timeout)
    } else {
        ToolError::Unreachable
    }
}

mod run;

pub(crate) use run::specs;

#[cfg(test)]
mod tests;

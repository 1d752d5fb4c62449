//! Tenant HTTP tools (SPEC §8): the definition a tenant stores with `PUT /api/v1/tools/{name}`
//! and the rules it must pass. A definition is checked whole before it is stored, so a call
//! never meets a tool whose schema does not compile or whose URL is refused.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Invalid;

/// Names the engines accept for a function (OpenAI and Ultravox both: `^[a-zA-Z0-9_-]{1,64}$`).
pub const NAME_MAX: usize = 64;
/// Tools voicectl itself answers; a tenant tool may not shadow them.
pub const BUILT_INS: [&str; 4] = ["end_call", "transfer_call", "send_dtmf", "opt_out"];
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);
const DESCRIPTION_MAX: usize = 1024;
const MESSAGE_MAX: usize = 500;
const SCHEMA_MAX_BYTES: usize = 16 * 1024;
/// A tenant may keep this many tools; every one is sent to the model on each call.
pub const MAX_PER_TENANT: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnInterrupt {
    /// The request runs to its end and the result reaches the model after the barge-in.
    #[default]
    Finish,
    /// The request is abandoned when the caller talks over the agent; the model is told so.
    Cancel,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Delayed {
    pub after: String,
    pub text: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolMessages {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed: Option<Delayed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// What a tenant sends in `PUT /api/v1/tools/{name}` (and gets back, with its name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    #[serde(default)]
    pub description: String,
    /// A JSON Schema of the arguments (an object).
    #[serde(default = "empty_parameters")]
    #[schema(value_type = Object)]
    pub parameters: Value,
    pub url: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default)]
    pub on_interrupt: OnInterrupt,
    #[serde(default)]
    pub messages: ToolMessages,
}

fn empty_parameters() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

fn default_timeout() -> String {
    "10s".into()
}

pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let ok = (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(Invalid::new(
            "name",
            "1 to 64 of the characters a-z, A-Z, 0-9, _ and -",
        ));
    }
    if BUILT_INS.contains(&name) {
        return Err(Invalid::new(
            "name",
            format!("{name:?} is a built-in tool; choose another name"),
        ));
    }
    Ok(())
}

fn parse_duration(field: &str, raw: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(raw.trim()).map_err(|e| {
        Invalid::new(
            field,
            format!("{raw:?} is not a duration like \"10s\": {e}"),
        )
    })
}

impl ToolDefinition {
    /// The request deadline; the definition passed [`Self::validate`], so a bad value cannot
    /// occur, but the default is the safe fallback.
    pub fn timeout(&self) -> Duration {
        parse_duration("timeout", &self.timeout).unwrap_or(DEFAULT_TIMEOUT)
    }

    /// When `messages.delayed` is spoken, if set.
    pub fn delayed(&self) -> Option<(Duration, &str)> {
        let d = self.messages.delayed.as_ref()?;
        Some((parse_duration("", &d.after).ok()?, d.text.as_str()))
    }

    /// Everything except the URL's network rules (those need the server's allow-list; see
    /// [`Self::check_url`]).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.description.chars().count() > DESCRIPTION_MAX {
            return Err(Invalid::new(
                "description",
                format!("at most {DESCRIPTION_MAX} characters"),
            ));
        }
        check_parameters(&self.parameters)?;
        let t = parse_duration("timeout", &self.timeout)?;
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&t) {
            return Err(Invalid::new("timeout", "between 1s and 120s"));
        }
        for (field, text) in [
            ("messages.start", self.messages.start.as_deref()),
            ("messages.failed", self.messages.failed.as_deref()),
            (
                "messages.delayed.text",
                self.messages.delayed.as_ref().map(|d| d.text.as_str()),
            ),
        ] {
            if let Some(text) = text
                && (text.trim().is_empty() || text.chars().count() > MESSAGE_MAX)
            {
                return Err(Invalid::new(
                    field,
                    format!("1 to {MESSAGE_MAX} characters (omit the field for silence)"),
                ));
            }
        }
        if let Some(d) = &self.messages.delayed {
            let after = parse_duration("messages.delayed.after", &d.after)?;
            if after < Duration::from_millis(500) || after >= t {
                return Err(Invalid::new(
                    "messages.delayed.after",
                    "at least 500ms and shorter than the tool's timeout",
                ));
            }
        }
        Ok(())
    }

    /// SPEC §10: https only (http only to allow-listed hosts), no credentials, no private or
    /// metadata address literals. Names are resolved again when the request is made.
    pub fn check_url(&self, allow: &[String]) -> Result<(), Invalid> {
        super::net::check_outbound_url(&self.url, allow)
            .map(|_| ())
            .map_err(|e| Invalid::new("url", e.to_string()))
    }
}

/// `parameters` must be a JSON Schema (checked against its meta-schema and compiled) that
/// describes an object, since a tool's arguments are always an object.
pub fn check_parameters(schema: &Value) -> Result<(), Invalid> {
    let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(0);
    if size > SCHEMA_MAX_BYTES {
        return Err(Invalid::new(
            "parameters",
            format!("at most {} kB", SCHEMA_MAX_BYTES / 1024),
        ));
    }
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err(Invalid::new(
            "parameters",
            "must be a JSON Schema with \"type\": \"object\"",
        ));
    }
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(Invalid::new(
            "parameters",
            format!("not a valid JSON Schema: {e} (at {})", e.instance_path()),
        ));
    }
    compile(schema)
        .map(|_| ())
        .map_err(|e| Invalid::new("parameters", e))
}

/// A compiled schema. External `$ref`s cannot be fetched (the crate's resolvers are off), so a
/// schema naming one is refused rather than reaching out to the network.
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::validator_for(schema).map_err(|e| format!("not a usable JSON Schema: {e}"))
}

/// The first reasons `arguments` break `schema`, in words a model can act on; `Ok` when valid.
pub fn check_arguments(validator: &jsonschema::Validator, arguments: &Value) -> Result<(), String> {
    let errors: Vec<String> = validator
        .iter_errors(arguments)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(v: Value) -> ToolDefinition {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_full_definition_passes_and_defaults_fill_in() {
        let d = def(json!({
            "description": "Look up an order",
            "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
            "url": "https://api.example.com/orders",
            "messages": {"start": "One moment.", "delayed": {"after": "3s", "text": "Still looking."}, "failed": "Sorry."}
        }));
        d.validate().unwrap();
        assert_eq!(d.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(d.on_interrupt, OnInterrupt::Finish);
        assert_eq!(
            d.delayed(),
            Some((Duration::from_secs(3), "Still looking."))
        );
    }

    #[test]
    fn bad_parts_are_named() {
        let cases = [
            (
                json!({"url": "https://a.example", "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}}}),
                "parameters",
            ),
            (
                json!({"url": "https://a.example", "parameters": {"type": "string"}}),
                "parameters",
            ),
            (
                json!({"url": "https://a.example", "timeout": "0s"}),
                "timeout",
            ),
            (
                json!({"url": "https://a.example", "timeout": "soon"}),
                "timeout",
            ),
            (
                json!({"url": "https://a.example", "timeout": "5m"}),
                "timeout",
            ),
            (
                json!({"url": "https://a.example", "messages": {"start": " "}}),
                "messages.start",
            ),
            (
                json!({"url": "https://a.example", "timeout": "2s", "messages": {"delayed": {"after": "3s", "text": "x"}}}),
                "messages.delayed.after",
            ),
        ];
        for (v, field) in cases {
            let e = def(v.clone()).validate().unwrap_err();
            assert_eq!(e.field, field, "{v}");
        }
    }

    #[test]
    fn names() {
        validate_name("lookup_order-2").unwrap();
        for bad in ["", "a b", "ü", "end_call", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments_are_checked_against_the_schema() {
        let v = compile(&json!({"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]})).unwrap();
        check_arguments(&v, &json!({"order": "123"})).unwrap();
        let e = check_arguments(&v, &json!({"order": 5})).unwrap_err();
        assert!(e.contains("/order"), "{e}");
        assert!(check_arguments(&v, &json!({})).is_err());
    }
}

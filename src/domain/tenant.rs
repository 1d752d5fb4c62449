//! Tenant input: the fields an admin may set, and the rules they must pass before the store
//! sees them.

use serde::{Deserialize, Serialize};

use super::{EngineKind, Invalid};
use crate::domain::phone::E164;
use crate::domain::timefmt::now_ms;

/// Fields to set on create or update. `None` leaves a field alone; for the optional overrides
/// an empty string clears it (back to the server default).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    /// 1–63 of `a-z 0-9 -`, starting with a letter or digit; required on create.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$", example = "acme")]
    pub name: Option<String>,
    pub company: Option<String>,
    pub agent_name: Option<String>,
    pub system_prompt: Option<String>,
    pub greeting: Option<String>,
    pub voice: Option<String>,
    pub engine: Option<String>,
    pub from_number: Option<String>,
    pub numbers: Option<Vec<String>>,
    pub max_concurrent_calls: Option<u32>,
    pub calls_per_minute: Option<u32>,
    pub webhook_url: Option<String>,
    /// Record calls (SPEC §8); a call's own `record` beats it.
    pub record: Option<bool>,
    /// Spoken first on recorded calls; empty clears it.
    pub recording_notice: Option<String>,
    /// Where calls may be transferred (the agent's `transfer_call` tool and
    /// `POST /calls/{id}/transfer`); `[]` removes them all.
    pub transfer_numbers: Option<Vec<TransferNumber>>,
    /// `cold` (default: the call is joined at once) or `warm` (the person answering first
    /// hears the agent's summary).
    pub transfer_mode: Option<String>,
    /// `off`, `detect`, `hangup` or `voicemail` for this tenant's calls (a campaign's or a
    /// call's own value beats it); empty clears it (back to the server default).
    pub machine_detection: Option<String>,
    /// Left on answering machines in `voicemail` mode; empty clears it.
    pub voicemail_message: Option<String>,
    /// Post-call analysis (SPEC §8); `{}` turns it off.
    pub analysis: Option<crate::domain::analysis::AnalysisSpec>,
}

/// A number calls may be transferred to, with the label the agent and operators use for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferNumber {
    /// E.164, e.g. `+14155550100`.
    pub number: String,
    /// e.g. `sales`, `front desk` (1–60 characters).
    #[serde(default)]
    pub label: String,
}

/// At most this many transfer numbers per tenant.
pub const MAX_TRANSFER_NUMBERS: usize = 20;

/// The transfer modes (`transfer_mode`).
pub const TRANSFER_MODES: [&str; 2] = ["cold", "warm"];

fn check_transfer(list: &[TransferNumber], mode: Option<&str>) -> Result<(), Invalid> {
    if list.len() > MAX_TRANSFER_NUMBERS {
        return Err(Invalid::new(
            "transfer_numbers",
            format!("at most {MAX_TRANSFER_NUMBERS} transfer numbers"),
        ));
    }
    for (i, t) in list.iter().enumerate() {
        E164::parse(&t.number)
            .map_err(|e| Invalid::new("transfer_numbers", format!("{:?}: {e}", t.number)))?;
        let label = t.label.trim();
        if label.is_empty() || label.chars().count() > 60 {
            return Err(Invalid::new(
                "transfer_numbers",
                format!("{}: label must be 1-60 characters", t.number),
            ));
        }
        if list[..i].iter().any(|o| o.number == t.number) {
            return Err(Invalid::new(
                "transfer_numbers",
                format!("{} is listed twice", t.number),
            ));
        }
        if list[..i]
            .iter()
            .any(|o| o.label.trim().eq_ignore_ascii_case(label))
        {
            return Err(Invalid::new(
                "transfer_numbers",
                format!("label {label:?} is used twice"),
            ));
        }
    }
    if let Some(m) = mode
        && !TRANSFER_MODES.contains(&m)
    {
        return Err(Invalid::new(
            "transfer_mode",
            format!("unknown transfer mode {m:?} (one of: cold, warm)"),
        ));
    }
    Ok(())
}

pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let ok = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            "name",
            format!(
                "{name:?} is not a valid tenant name: use 1-63 lower-case letters, digits and '-', starting with a letter or digit"
            ),
        ))
    }
}

fn check_len(field: &str, v: &Option<String>, max: usize) -> Result<(), Invalid> {
    match v {
        Some(s) if s.chars().count() > max => Err(Invalid::new(
            field,
            format!("too long ({} characters; at most {max})", s.chars().count()),
        )),
        _ => Ok(()),
    }
}

impl TenantPatch {
    fn validate(&self) -> Result<(), Invalid> {
        if let Some(n) = &self.name {
            validate_name(n)?;
        }
        check_len("company", &self.company, 200)?;
        check_len("agent_name", &self.agent_name, 100)?;
        check_len("system_prompt", &self.system_prompt, 20_000)?;
        check_len("greeting", &self.greeting, 2_000)?;
        check_len("voice", &self.voice, 100)?;
        check_len("recording_notice", &self.recording_notice, 1_000)?;
        if let Some(e) = self.engine.as_deref().filter(|e| !e.is_empty())
            && EngineKind::parse(e).is_none()
        {
            let all: Vec<_> = EngineKind::ALL.iter().map(|e| e.as_str()).collect();
            return Err(Invalid::new(
                "engine",
                format!("unknown engine {e:?} (one of: {})", all.join(", ")),
            ));
        }
        if let Some(n) = self.from_number.as_deref().filter(|n| !n.is_empty()) {
            E164::parse(n).map_err(|e| Invalid::new("from_number", e.to_string()))?;
        }
        if let Some(numbers) = &self.numbers {
            for (i, n) in numbers.iter().enumerate() {
                E164::parse(n).map_err(|e| Invalid::new("numbers", e.to_string()))?;
                if numbers[..i].contains(n) {
                    return Err(Invalid::new("numbers", format!("{n} is listed twice")));
                }
            }
        }
        if let Some(m) = self.machine_detection.as_deref().filter(|m| !m.is_empty()) {
            crate::domain::amd::MachineDetection::parse(m)
                .map_err(|e| Invalid::new("machine_detection", e))?;
        }
        if let Some(m) = self.voicemail_message.as_deref().filter(|m| !m.is_empty()) {
            crate::domain::amd::check_voicemail_message(m)
                .map_err(|e| Invalid::new("voicemail_message", e))?;
        }
        if let Some(a) = &self.analysis {
            a.validate()?;
        }
        check_transfer(
            self.transfer_numbers.as_deref().unwrap_or_default(),
            self.transfer_mode.as_deref(),
        )?;
        for (field, v) in [
            ("max_concurrent_calls", self.max_concurrent_calls),
            ("calls_per_minute", self.calls_per_minute),
        ] {
            if v == Some(0) {
                return Err(Invalid::new(field, "must be at least 1"));
            }
        }
        if let Some(u) = self.webhook_url.as_deref().filter(|u| !u.is_empty()) {
            match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => {
                    return Err(Invalid::new(
                        "webhook_url",
                        format!("{u:?} is not an http(s) URL"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl TenantPatch {
    /// SPEC §10: a webhook must be a URL we may call (https, or plain http to an allowed host;
    /// no literal private address). Names are checked again when connecting.
    pub fn check_webhook_target(&self, allow: &[String]) -> Result<(), Invalid> {
        if let Some(u) = self.webhook_url.as_deref().filter(|u| !u.is_empty()) {
            crate::domain::net::check_outbound_url(u, allow)
                .map_err(|e| Invalid::new("webhook_url", e.to_string()))?;
        }
        Ok(())
    }

    /// A new tenant: a valid name is required, every given field must pass.
    pub fn validate_create(&self) -> Result<(), Invalid> {
        if self.name.is_none() {
            return Err(Invalid::new("name", "required"));
        }
        self.validate()
    }

    /// A change to tenant `name`: the name itself never changes.
    pub fn validate_update(&self, name: &str) -> Result<(), Invalid> {
        if self.name.as_deref().is_some_and(|n| n != name) {
            return Err(Invalid::new(
                "name",
                "a tenant's name cannot change (it is its identifier)",
            ));
        }
        self.validate()
    }
}

/// Checks a new API key's label and expiry (a Unix time in ms).
pub fn validate_key(name: &str, expires_at: Option<i64>) -> Result<(), Invalid> {
    if name.chars().count() > 100 {
        return Err(Invalid::new("name", "too long (at most 100 characters)"));
    }
    if expires_at.is_some_and(|e| e <= now_ms()) {
        return Err(Invalid::new("expires", "must be in the future"));
    }
    Ok(())
}

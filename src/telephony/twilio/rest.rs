//! Twilio's REST API for calls (PROTOCOLS §3): create, end/cancel, fetch.
//!
//! Retries: 429 (20429) is "never processed and always safe to retry", so every request
//! retries it with full-jitter backoff; 5xx and transport errors are retried only for
//! requests that are safe to repeat (fetch, hang-up). A create is never retried after it may
//! have reached Twilio, so one call is never dialed twice.

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

use crate::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TwilioError {
    /// Twilio answered with its JSON error shape (or a bare status).
    #[error("Twilio error {code} (HTTP {status}): {message}")]
    Api {
        status: u16,
        code: i64,
        message: String,
    },
    #[error("cannot reach Twilio: {0}")]
    Transport(String),
    #[error("unexpected answer from Twilio: {0}")]
    Protocol(String),
}

impl TwilioError {
    pub fn code(&self) -> Option<i64> {
        match self {
            TwilioError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The call no longer exists at Twilio (already ended and purged, or never existed).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            TwilioError::Api { status: 404, .. } | TwilioError::Api { code: 20404, .. }
        )
    }
}

/// The fields of Twilio's Call resource we use.
#[derive(Debug, Clone, Deserialize)]
pub struct CallResource {
    pub sid: String,
    pub status: String,
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub answered_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreateCall {
    pub to: String,
    pub from: String,
    pub answer_url: String,
    pub status_callback: String,
    pub timeout_secs: u32,
    pub time_limit_secs: u64,
    /// When set: async answering-machine detection reported to this URL.
    pub amd_callback: Option<String>,
    /// Twilio `SendDigits`: `0-9 # * w` pressed on answer (`w` waits 0.5 s).
    pub send_digits: Option<String>,
    /// `MachineDetection=DetectMessageEnd`: machines are reported once their greeting ended.
    pub detect_message_end: bool,
}

#[derive(Clone)]
pub struct TwilioClient {
    http: reqwest::Client,
    base: String,
    account_sid: String,
    auth_token: Secret,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

const MAX_ATTEMPTS: u32 = 4;

impl TwilioClient {
    pub fn new(base: &str, account_sid: &str, auth_token: Secret) -> Result<Self, TwilioError> {
        let http = reqwest::Client::builder()
            // Our credentials must never follow a redirect to another host.
            .redirect(crate::ops::outbound::provider_redirects())
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("voicectl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TwilioError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            account_sid: account_sid.to_owned(),
            auth_token,
        })
    }

    fn calls_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Calls",
            self.base, self.account_sid
        )
    }

    pub async fn create_call(&self, c: &CreateCall) -> Result<CallResource, TwilioError> {
        let mut form: Vec<(&str, String)> = vec![
            ("To", c.to.clone()),
            ("From", c.from.clone()),
            ("Url", c.answer_url.clone()),
            ("Method", "POST".into()),
            ("StatusCallback", c.status_callback.clone()),
            ("StatusCallbackMethod", "POST".into()),
            ("Timeout", c.timeout_secs.to_string()),
            ("TimeLimit", c.time_limit_secs.to_string()),
        ];
        for ev in ["initiated", "ringing", "answered", "completed"] {
            form.push(("StatusCallbackEvent", ev.into()));
        }
        if let Some(amd) = &c.amd_callback {
            let mode = if c.detect_message_end {
                "DetectMessageEnd"
            } else {
                "Enable"
            };
            form.push(("MachineDetection", mode.into()));
            form.push(("AsyncAmd", "true".into()));
            form.push(("AsyncAmdStatusCallback", amd.clone()));
            form.push(("AsyncAmdStatusCallbackMethod", "POST".into()));
        }
        if let Some(d) = &c.send_digits {
            form.push(("SendDigits", d.clone()));
        }
        let url = format!("{}.json", self.calls_url());
        self.send(reqwest::Method::POST, &url, Some(&form), false)
            .await
    }

    /// Hangs up an answered call (`completed`) or cancels one still queued/ringing (`canceled`).
    pub async fn end_call(&self, sid: &str, answered: bool) -> Result<CallResource, TwilioError> {
        let status = if answered { "completed" } else { "canceled" };
        let url = format!("{}/{sid}.json", self.calls_url());
        self.send(
            reqwest::Method::POST,
            &url,
            Some(&[("Status", status.into())]),
            true,
        )
        .await
    }

    /// Replaces a live call's instructions with `twiml` (e.g. a spoken apology and hang-up).
    pub async fn redirect(&self, sid: &str, twiml: &str) -> Result<CallResource, TwilioError> {
        let url = format!("{}/{sid}.json", self.calls_url());
        self.send(
            reqwest::Method::POST,
            &url,
            Some(&[("Twiml", twiml.to_owned())]),
            true,
        )
        .await
    }

    pub async fn fetch_call(&self, sid: &str) -> Result<CallResource, TwilioError> {
        let url = format!("{}/{sid}.json", self.calls_url());
        self.send(reqwest::Method::GET, &url, None, true).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        form: Option<&[(&str, String)]>,
        idempotent: bool,
    ) -> Result<CallResource, TwilioError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .request(method.clone(), url)
                .basic_auth(&self.account_sid, Some(self.auth_token.expose()));
            if let Some(f) = form {
                req = req.form(f);
            }
            let result = req.send().await;
            let retryable = match &result {
                // A connect error means the request never left: safe even for a create.
                Err(e) => e.is_connect() || (idempotent && (e.is_timeout() || e.is_request())),
                Ok(r) => r.status() == 429 || (idempotent && r.status().is_server_error()),
            };
            if retryable && attempt < MAX_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            let resp = result.map_err(|e| TwilioError::Transport(e.without_url().to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| TwilioError::Transport(e.without_url().to_string()))?;
            if (200..300).contains(&status) {
                return serde_json::from_slice(&bytes)
                    .map_err(|e| TwilioError::Protocol(format!("call resource: {e}")));
            }
            let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            return Err(TwilioError::Api {
                status,
                code: body.as_ref().and_then(|b| b.code).unwrap_or(status as i64),
                message: body
                    .and_then(|b| b.message)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect()),
            });
        }
    }
}

/// Full jitter: uniform in [0, min(3 s, 100 ms × 2^n)] (what twilio-node does).
fn backoff(attempt: u32) -> Duration {
    let cap = (100u64 << attempt.min(10)).min(3000);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

//! The carrier seam: the one typed boundary between the call domain and "the carrier" (the
//! phone network provider). The domain asks for calls, redirects and hang-ups through
//! [`Carrier`], receives [`CarrierUpdate`]s and [`InboundCall`]s parsed from the carrier's
//! webhooks, and answers with [`Script`]s that the carrier's module renders (TwiML for
//! Twilio). A second carrier is a new module and a new `Carrier` variant.
//!
//! The `twilio-sim` crate is a faithful stand-in for Twilio (`serve --dev`, tests, benchmarks).

pub mod twilio;
pub mod webrtc;

use crate::config::Config;
use crate::domain::CallStatus;
use crate::domain::ids::CallId;
use twilio::rest::{CreateCall, TwilioClient, TwilioError};

/// What the carrier should do with a call now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// Connect the call's audio to our media endpoint, with per-call parameters; when the
    /// stream ends, hang up (no dead air).
    ConnectStream {
        url: String,
        params: Vec<(&'static str, String)>,
    },
    /// Connect the call's audio to a third party's media endpoint (Ultravox's Twilio medium).
    ConnectUrl { url: String },
    /// Speak a short message, then hang up.
    SayHangup(&'static str),
    /// Hang up at once.
    Hangup,
    /// Press keys on the call (DTMF tones; `w` waits half a second), then connect its audio
    /// to our media endpoint again.
    PlayDigitsThenStream {
        digits: String,
        url: String,
        params: Vec<(&'static str, String)>,
    },
    /// Dial `number` and join the call to it. `action`: where the carrier reports how the
    /// dial ended (the call goes on with what that answers); `whisper_url`: TwiML played to
    /// the person answering before the two are joined.
    Dial {
        number: String,
        action: String,
        whisper_url: Option<String>,
        timeout_secs: u32,
        caller_id: Option<String>,
    },
    /// Speak a message and carry on (a whisper to the person answering a transfer).
    Say(String),
}

/// A call's state as the carrier reports it (status callback or fetch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarrierUpdate {
    pub status: Option<CallStatus>,
    /// The carrier's ordering of callbacks: at or below the last one applied is stale.
    pub seq: Option<i64>,
    pub duration: Option<i64>,
    pub answered_by: Option<String>,
    pub error: Option<String>,
}

/// A call to one of our numbers, as the carrier announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundCall {
    pub to: String,
    pub from: String,
    pub sid: String,
}

/// A carrier's media stream presenting itself for call `call_id`; the call domain checks the
/// token before bridging.
pub struct StreamStart {
    pub call_id: CallId,
    pub token: String,
    pub call_sid: String,
    pub stream_sid: String,
    /// The stream SID is usable in our outbound frames (checked with the token, so a bad
    /// one still uses the token up).
    pub stream_sid_ok: bool,
}

/// An outbound call to place.
#[derive(Debug, Clone)]
pub struct Dial {
    pub call_id: String,
    pub to: String,
    pub from: String,
    /// Our public base URL: where the carrier's webhooks reach us.
    pub public_url: String,
    pub ring_timeout_secs: u32,
    /// A backstop to our own duration governor.
    pub time_limit_secs: u64,
    pub machine_detection: bool,
    /// Detection waits for the end of a machine's greeting (voicemail drop: Twilio
    /// `DetectMessageEnd`) rather than reporting as soon as it decides.
    pub wait_for_message_end: bool,
    /// Keys pressed on answer (Twilio `SendDigits`). Twilio turns AMD off with it, so AMD is
    /// then not requested at all.
    pub send_digits: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    #[error(transparent)]
    Twilio(#[from] TwilioError),
}

impl CarrierError {
    /// The carrier does not know the call (any more).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::Twilio(e) => e.is_not_found(),
        }
    }

    /// The call is already over at the carrier (cannot be changed).
    pub fn is_over(&self) -> bool {
        match self {
            Self::Twilio(e) => e.is_not_found() || e.code() == Some(21220),
        }
    }

    /// The carrier answered and refused (as opposed to not being reachable).
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Twilio(e) => matches!(e, TwilioError::Api { .. }),
        }
    }
}

#[derive(Clone)]
pub enum Carrier {
    Twilio(TwilioClient),
}

impl Carrier {
    pub fn from_config(config: &Config) -> Result<Self, CarrierError> {
        Ok(Self::Twilio(TwilioClient::new(
            &config.twilio.api_base_url,
            &config.twilio.account_sid,
            config.twilio.auth_token.clone(),
        )?))
    }

    /// Places a call; returns the carrier's id for it.
    pub async fn create_call(&self, d: &Dial) -> Result<String, CarrierError> {
        match self {
            Self::Twilio(t) => {
                let (base, id) = (&d.public_url, &d.call_id);
                let req = CreateCall {
                    to: d.to.clone(),
                    from: d.from.clone(),
                    answer_url: format!("{base}/twilio/answer/{id}"),
                    status_callback: format!("{base}/twilio/status/{id}"),
                    timeout_secs: d.ring_timeout_secs,
                    time_limit_secs: d.time_limit_secs,
                    amd_callback: (d.machine_detection && d.send_digits.is_none())
                        .then(|| format!("{base}/twilio/amd/{id}")),
                    send_digits: d.send_digits.clone(),
                    detect_message_end: d.wait_for_message_end,
                };
                Ok(t.create_call(&req).await?.sid)
            }
        }
    }

    /// Replaces what the call is doing with `script`.
    pub async fn redirect(&self, sid: &str, script: &Script) -> Result<(), CarrierError> {
        match self {
            Self::Twilio(t) => {
                t.redirect(sid, &twilio::twiml::render(script)).await?;
                Ok(())
            }
        }
    }

    /// Ends the call: hang up if `answered`, else cancel the ringing.
    pub async fn hangup(&self, sid: &str, answered: bool) -> Result<(), CarrierError> {
        match self {
            Self::Twilio(t) => {
                t.end_call(sid, answered).await?;
                Ok(())
            }
        }
    }

    /// The call's state at the carrier now.
    pub async fn fetch(&self, sid: &str) -> Result<CarrierUpdate, CarrierError> {
        match self {
            Self::Twilio(t) => {
                let res = t.fetch_call(sid).await?;
                Ok(CarrierUpdate {
                    status: twilio::webhook::map_twilio_status(&res.status),
                    duration: res.duration.and_then(|d| d.parse().ok()),
                    ..Default::default()
                })
            }
        }
    }
}

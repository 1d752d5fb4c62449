//! What the simulator records and reports: call status, per-call records, events.

use std::time::SystemTime;

/// A call's status as Twilio names it. `Initiated` appears only in status callbacks, never
/// as a resource status (PROTOCOLS §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallStatus {
    Queued,
    Initiated,
    Ringing,
    InProgress,
    Completed,
    Busy,
    Failed,
    NoAnswer,
    Canceled,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Initiated => "initiated",
            Self::Ringing => "ringing",
            Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::NoAnswer => "no-answer",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Busy | Self::Failed | Self::NoAnswer | Self::Canceled
        )
    }

    /// The SIP code Twilio reports with a terminal callback (PROTOCOLS §3.6).
    pub(crate) fn sip_response_code(self) -> u16 {
        match self {
            Self::Busy => 486,
            Self::NoAnswer | Self::Canceled => 487,
            Self::Failed => 404,
            _ => 200,
        }
    }
}

impl std::fmt::Display for CallStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Placed through `POST Calls.json`.
    OutboundApi,
    /// Started with [`super::SimHandle::inbound_call`].
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutboundApi => "outbound-api",
            Self::Inbound => "inbound",
        }
    }
}

/// Why a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The caller script reached `Hangup`.
    CallerHangup,
    /// The caller script waited longer than `max_wait_ms` for the agent and gave up.
    CallerGaveUp,
    /// [`super::SimHandle::hangup`].
    RemoteHangup,
    /// `POST Calls/{Sid}.json` with `Status=completed`.
    RestCompleted,
    /// `POST Calls/{Sid}.json` with `Status=canceled` (or `completed` before answer).
    RestCanceled,
    /// The call's `TimeLimit` elapsed.
    TimeLimit,
    /// TwiML `<Hangup/>`.
    TwimlHangup,
    /// The TwiML ran out of verbs.
    TwimlEnd,
    /// TwiML `<Reject>`.
    Rejected,
    /// The callee's scenario: busy, no answer (ring timeout) or failed.
    Busy,
    NoAnswer,
    Failed,
    /// The voice webhook failed: Twilio error 11200 (HTTP error), 11205 (timeout) or
    /// 12100 (TwiML parse failure).
    ApplicationError(u32),
    /// The simulator was shut down under a live call.
    Shutdown,
}

/// Something the app did that real Twilio would log as an error or warning, or a failure
/// on Twilio's side of the call, with Twilio's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimError {
    /// Twilio error code: 31950 (binary frame), 31924 (unknown or malformed message),
    /// 31920 (stream connection failed), 11200/11205/12100 (webhook), 21220 …
    pub code: u32,
    pub message: String,
    /// Milliseconds since the call was created.
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackKind {
    /// Call-progress status callback (`StatusCallback`).
    Status,
    /// Async AMD result (`AsyncAmdStatusCallback`).
    Amd,
    /// `<Stream statusCallback>`.
    Stream,
}

/// One callback request the simulator made to the app.
#[derive(Debug, Clone)]
pub struct CallbackRecord {
    pub kind: CallbackKind,
    /// `CallStatus` for status callbacks, `AnsweredBy` for AMD, `StreamEvent` for streams.
    pub event: String,
    /// `SequenceNumber` (status callbacks only).
    pub seq: Option<u32>,
    pub url: String,
    pub method: String,
    pub params: Vec<(String, String)>,
    /// The app's HTTP status; `None` when the request failed (`error` says why).
    pub http_status: Option<u16>,
    pub error: Option<String>,
    /// Milliseconds since call creation when the response (or failure) came back.
    pub at_ms: u64,
}

/// One request for TwiML (the `Url` of an outbound call or the inbound voice URL).
#[derive(Debug, Clone)]
pub struct WebhookRecord {
    pub url: String,
    pub method: String,
    pub params: Vec<(String, String)>,
    pub http_status: Option<u16>,
    pub body: Option<String>,
    pub error: Option<String>,
    pub at_ms: u64,
}

/// A mark the app sent, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkRecord {
    pub name: String,
    /// Stream-relative milliseconds when the app's mark arrived.
    pub received_at_ms: u64,
    /// Agent-audio byte offset the mark waits for (all agent bytes received before it).
    pub position: u64,
    /// Stream-relative milliseconds when it was echoed; `None` if still pending.
    pub echoed_at_ms: Option<u64>,
    /// True when echoed because its audio finished playing; false when flushed by a
    /// `clear` (or when the stream ended with it pending).
    pub played: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClearRecord {
    /// Stream-relative milliseconds.
    pub at_ms: u64,
    /// Agent bytes played before the clear (the playback position).
    pub played_bytes: u64,
    /// Agent bytes dropped from the buffer by it.
    pub dropped_bytes: u64,
}

/// A stretch of caller speech (stream-relative milliseconds; `end_ms` is `None` while
/// the caller is still speaking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeechSpan {
    pub start_ms: u64,
    pub end_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseSide {
    /// The simulator hung up (stop + close 1000).
    Sim,
    /// The app closed the socket (or it dropped).
    App,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamClose {
    pub by: CloseSide,
    /// The close code, if a close frame was seen.
    pub code: Option<u16>,
    pub reason: String,
    pub at_ms: u64,
}

/// One `<Connect><Stream>` session. Times are milliseconds since the stream started (the
/// moment the socket opened).
#[derive(Debug, Clone, Default)]
pub struct StreamRecord {
    /// The URL as written in the TwiML (what the handshake signature covers).
    pub url: String,
    pub stream_sid: String,
    pub custom_parameters: Vec<(String, String)>,
    /// HTTP status of the upgrade response (101 on success) when one was received.
    pub handshake_status: Option<u16>,
    pub connected: bool,
    /// Every agent byte received, decoded from base64, in order.
    pub agent_audio: Vec<u8>,
    /// The agent bytes that actually played (agent_audio minus what clears dropped).
    pub agent_played: Vec<u8>,
    pub agent_played_bytes: u64,
    pub agent_cleared_bytes: u64,
    pub agent_media_messages: u64,
    pub marks: Vec<MarkRecord>,
    pub clears: Vec<ClearRecord>,
    /// Every caller byte sent in `media` frames, in order.
    pub caller_audio: Vec<u8>,
    pub caller_speech: Vec<SpeechSpan>,
    pub dtmf_sent: Vec<(char, u64)>,
    /// When a machine's beep ended ([`crate::Step::Beep`]): it records from here.
    pub beep_ended_ms: Option<u64>,
    /// Agent bytes that played after the beep: what the machine recorded.
    pub agent_played_after_beep: u64,
    pub media_frames_sent: u64,
    pub close: Option<StreamClose>,
}

/// A snapshot of one simulated call.
#[derive(Debug, Clone)]
pub struct SimCallRecord {
    pub sid: String,
    pub direction: Direction,
    pub from: String,
    pub to: String,
    pub status: CallStatus,
    pub answered_by: Option<String>,
    pub end_reason: Option<EndReason>,
    pub created_at: SystemTime,
    /// When the status last changed.
    pub updated_at: SystemTime,
    /// Milliseconds since creation: dialing started (Twilio's `start_time`).
    pub dialed_at_ms: Option<u64>,
    pub answered_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    /// Whole seconds from answer to end (what `CallDuration` reported).
    pub duration_secs: Option<u64>,
    /// The create request's form parameters as received (outbound only).
    pub request_params: Vec<(String, String)>,
    pub callbacks: Vec<CallbackRecord>,
    pub webhooks: Vec<WebhookRecord>,
    /// The text of each `<Say>` executed.
    pub said: Vec<String>,
    /// Names of verbs the simulator does not implement and skipped.
    pub unsupported_verbs: Vec<String>,
    pub errors: Vec<SimError>,
    pub streams: Vec<StreamRecord>,
    /// The digits of each `<Play digits>` executed, in order.
    pub played_digits: Vec<String>,
    /// Each `<Dial>` executed (transfers).
    pub dials: Vec<DialRecord>,
}

/// A `<Dial>` and how it went. Number conventions: ending in 0486 the target is busy, in
/// 0487 it does not answer (rings out), in 0488 the dial fails; anything else answers and
/// talks for [`DIAL_TALK`] before hanging up.
#[derive(Debug, Clone, Default)]
pub struct DialRecord {
    pub number: String,
    /// `DialCallStatus`: completed, busy, no-answer, failed.
    pub status: String,
    pub duration_secs: u64,
    /// What the `<Number url>` TwiML said to the person answering (its `<Say>` texts).
    pub whisper: Vec<String>,
    pub action: Option<String>,
    /// The `callerId` the target saw (`None`: the call's own caller ID).
    pub caller_id: Option<String>,
}

/// How long an answered transfer target talks before hanging up.
pub const DIAL_TALK: std::time::Duration = std::time::Duration::from_secs(1);

impl SimCallRecord {
    /// The (only, in practice) media stream.
    pub fn stream(&self) -> Option<&StreamRecord> {
        self.streams.first()
    }

    pub fn status_callbacks(&self) -> impl Iterator<Item = &CallbackRecord> {
        self.callbacks
            .iter()
            .filter(|c| c.kind == CallbackKind::Status)
    }
}

/// Things tests can await instead of sleeping. Every event names its call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEvent {
    CallCreated {
        sid: String,
        direction: Direction,
        from: String,
        to: String,
    },
    /// The call resource's status changed (queued → ringing → in-progress → terminal).
    StatusChanged {
        sid: String,
        status: CallStatus,
    },
    /// A status callback was delivered (`http_status` is `None` if the request failed).
    Callback {
        sid: String,
        status: CallStatus,
        seq: u32,
        http_status: Option<u16>,
    },
    AmdCallback {
        sid: String,
        answered_by: String,
        http_status: Option<u16>,
    },
    /// The TwiML request (answer URL / inbound voice URL) returned.
    Webhook {
        sid: String,
        http_status: Option<u16>,
    },
    StreamConnected {
        sid: String,
        stream_sid: String,
    },
    StreamClosed {
        sid: String,
        stream_sid: String,
        by: CloseSide,
        code: Option<u16>,
    },
    /// The app sent a `media` message with this many decoded bytes.
    AgentAudio {
        sid: String,
        bytes: usize,
    },
    MarkEchoed {
        sid: String,
        name: String,
        played: bool,
        at_ms: u64,
    },
    Cleared {
        sid: String,
        at_ms: u64,
        dropped_bytes: u64,
    },
    CallerSpeechStarted {
        sid: String,
        at_ms: u64,
    },
    CallerSpeechEnded {
        sid: String,
        at_ms: u64,
    },
    Dtmf {
        sid: String,
        digit: char,
    },
    ProtocolError {
        sid: String,
        code: u32,
        message: String,
    },
    /// The call is over and every callback for it has been delivered.
    CallEnded {
        sid: String,
        status: CallStatus,
    },
}

impl SimEvent {
    pub fn sid(&self) -> &str {
        match self {
            Self::CallCreated { sid, .. }
            | Self::StatusChanged { sid, .. }
            | Self::Callback { sid, .. }
            | Self::AmdCallback { sid, .. }
            | Self::Webhook { sid, .. }
            | Self::StreamConnected { sid, .. }
            | Self::StreamClosed { sid, .. }
            | Self::AgentAudio { sid, .. }
            | Self::MarkEchoed { sid, .. }
            | Self::Cleared { sid, .. }
            | Self::CallerSpeechStarted { sid, .. }
            | Self::CallerSpeechEnded { sid, .. }
            | Self::Dtmf { sid, .. }
            | Self::ProtocolError { sid, .. }
            | Self::CallEnded { sid, .. } => sid,
        }
    }
}

/// One REST request the simulator answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Twilio error code for error responses.
    pub code: Option<u32>,
}

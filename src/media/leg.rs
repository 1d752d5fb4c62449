//! The phone side of a bridge. A leg is one phone connection's media: Twilio's media stream
//! today, a browser's WebRTC session next. The bridge is generic over it (static dispatch:
//! nothing boxed or allocated per frame by the abstraction itself).

use std::borrow::Cow;
use std::future::Future;

/// What the phone side sent.
#[derive(Debug)]
pub enum LegEvent<'a> {
    /// One frame of caller audio: base64 μ-law 8 kHz, as received (forwarded unchanged).
    Audio(Cow<'a, str>),
    /// Everything sent before mark `seq` has played at the phone.
    Mark(u64),
    /// A key press.
    Dtmf(String),
    /// The phone side ended the stream (hang-up, stop, close).
    Closed,
    /// The connection failed (already logged by the leg).
    Failed,
    /// Nothing for the bridge (keep-alives, unknown or unparseable messages).
    Ignored,
}

/// Why a stream is refused before any bridging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong, used or missing credentials for the call.
    InvalidToken,
    /// Our side failed to load the call.
    Internal,
}

/// Sends are fed and then flushed once, so audio and the mark after it leave in one write.
pub trait Leg: Send {
    /// The next event from the phone side; borrowed audio lives until the next call.
    fn recv(&mut self) -> impl Future<Output = LegEvent<'_>> + Send;
    /// Queues agent audio (base64 μ-law 8 kHz, checked by [`crate::audio::is_base64`]).
    fn feed_audio(&mut self, payload_b64: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Queues mark `seq`: its echo ([`LegEvent::Mark`]) says what was sent before it played.
    fn feed_mark(&mut self, seq: u64) -> impl Future<Output = Result<(), String>> + Send;
    /// Sends what was fed.
    fn flush(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Drops the audio not yet played at the phone (barge-in), at once.
    fn clear(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Ends the stream normally (the carrier then runs what follows it: a hang-up).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// Ends a stream that will not be bridged.
    fn refuse(&mut self, why: Refusal) -> impl Future<Output = ()> + Send;
    /// After [`LegEvent::Closed`]: the end reason when it was not a plain hang-up (a browser
    /// that vanished is `peer_timeout`, not the caller hanging up).
    fn gone_reason(&self) -> Option<&'static str> {
        None
    }
}

//! The bridge between a phone leg ([`leg::Leg`]) and a voice engine, and the playback
//! accounting it needs for barge-in.

pub mod bridge;
pub mod leg;
mod playback;

// The old paths of what moved to `audio` (tests, benches and the simulator use them).
pub use crate::audio::{
    AudioFormat, FRAME_MS, MULAW_FRAME_BYTES, WS_READ_BUFFER, is_base64, mulaw,
};

//! The bridge between a phone leg ([`leg::Leg`]) and a voice engine, and the playback
//! accounting it needs for barge-in.

pub mod bridge;
pub mod keypad;
pub mod leg;
mod playback;
pub mod recorder;
pub mod tools;

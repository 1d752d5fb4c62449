//! Twilio: webhook signatures, TwiML, Media Streams messages, and the REST client.

pub mod media;
pub mod rest;
pub mod signature;
pub mod stream;
pub mod twiml;
pub mod webhook;

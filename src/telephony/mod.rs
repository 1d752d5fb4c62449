//! Telephony providers. Twilio is the one we speak; `sim` is a faithful stand-in for it.

pub mod sim;
pub mod twilio;

//! Telephony providers. Twilio is the one we speak; the `twilio-sim` crate is a faithful
//! stand-in for it (`serve --dev`, tests, benchmarks).

pub mod twilio;

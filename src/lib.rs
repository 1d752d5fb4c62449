//! voicectl: a self-hosted AI phone-calling appliance in one binary.
//!
//! The call path reads top to bottom: `api` → `calls` → `telephony` → `media` (the bridge) →
//! `engines`, all over `store` (SQLite) and `domain` (plain types). ARCHITECTURE.md has the
//! map and the layering rules that `tests/integration/layering.rs` enforces.

pub mod api;
pub mod audio;
pub mod calls;
pub mod cli;
pub mod config;
pub mod domain;
pub mod edge;
pub mod engines;
pub mod http;
pub mod media;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod store;
pub mod telephony;
pub mod tls;

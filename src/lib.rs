//! voicectl: a self-hosted AI phone-calling appliance in one binary.
//!
//! The call path reads top to bottom: `api` (REST) → `calls` (domain) → `store` (SQLite);
//! `cli` and `config` drive it, `server` runs it.

pub mod api;
pub mod audio;
pub mod auth;
pub mod calls;
pub mod cli;
pub mod config;
pub mod domain;
pub mod edge;
pub mod engines;
pub mod http;
pub mod ids;
pub mod media;
pub mod ops;
pub mod phone;
pub mod proxy;
pub mod server;
pub mod store;
pub mod telephony;
pub mod timefmt;
pub mod tls;

//! The call domain: typed states and the rules for moving between them, the lifecycle
//! manager, live fan-out, and the tenant-webhook outbox.

pub mod jobs;
pub mod live;
pub mod manager;

pub use crate::domain::{CallStatus, Direction};

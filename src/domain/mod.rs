//! The bottom layer: plain types and rules that every other module may use and that use
//! nothing of ours above it (see ARCHITECTURE.md): no I/O beyond the data-dir files, no SQL,
//! no HTTP.

mod call;
mod engine;
mod errors;
pub mod event;
mod job;
pub mod layout;
pub mod net;
pub mod phrases;
pub mod tenant;

pub use call::{CallStatus, Direction};
pub use engine::EngineKind;
pub use errors::{Invalid, RateLimited};
pub use job::JobKind;

//! The bottom layer: plain types and rules that every other module may use and that use
//! nothing of ours above it (see ARCHITECTURE.md): no I/O beyond the data-dir files, no SQL,
//! no HTTP.

pub mod amd;
pub mod analysis;
pub mod apikey;
mod call;
pub mod campaign;
mod engine;
mod errors;
pub mod event;
pub mod ids;
mod job;
pub mod layout;
pub mod markup;
pub mod net;
pub mod phone;
pub mod phrases;
pub mod tenant;
pub mod timefmt;
pub mod tool;

pub use call::{CallStatus, Direction};
pub use engine::EngineKind;
pub use errors::{Invalid, RateLimited};
pub use job::JobKind;

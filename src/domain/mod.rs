//! Pure types at the bottom of the crate: no I/O, no SQL, no HTTP. Every layer above may use
//! them; they import nothing from the layers above (only the leaf helpers `phone`, `ids`).

mod call;
mod engine;
mod errors;
mod job;
pub mod tenant;

pub use call::{CallStatus, Direction};
pub use engine::EngineKind;
pub use errors::{Invalid, RateLimited};
pub use job::JobKind;

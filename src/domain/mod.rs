//! The bottom layer: plain types and rules that every other module may use and that use
//! nothing of ours (see ARCHITECTURE.md).

pub mod event;
pub mod layout;
pub mod net;

//! What callers hear from us (not from an engine), in one place.

/// An engine failed or is unavailable.
pub const TECHNICAL_DIFFICULTIES: &str =
    "Sorry, we are having technical difficulties. Please call again later. Goodbye.";
/// Our side failed to prepare the call.
pub const SOMETHING_WENT_WRONG: &str = "Sorry, something went wrong. Goodbye.";
/// The answer webhook could not read the call.
pub const CANNOT_TAKE_THIS_CALL: &str = "Sorry, we cannot take this call right now. Goodbye.";
/// The carrier's inbound webhook lacked what we need to route it.
pub const CANNOT_CONNECT: &str = "Sorry, this call cannot be connected. Goodbye.";
/// The server is draining.
pub const NOT_TAKING_CALLS: &str =
    "Sorry, we cannot take calls right now. Please call again later. Goodbye.";
/// An inbound call to a number no tenant owns.
pub const NOT_IN_SERVICE: &str = "Sorry, this number is not in service. Goodbye.";
/// An inbound call over capacity.
pub const LINES_BUSY: &str = "Sorry, all our lines are busy. Please call again later. Goodbye.";
/// The silence governor's first nudge.
pub const STILL_THERE: &str = "Are you still there?";

//! Refusals decided before anything is stored: they belong to the request, not the database.

/// A request field that does not pass validation; answered with 400 and `"{field}: {message}"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// A limit was reached; the caller may try again after `retry_after_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit reached; retry in {retry_after_secs} s")]
pub struct RateLimited {
    pub retry_after_secs: u64,
}

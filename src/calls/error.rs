use crate::domain::EngineKind;
use crate::domain::{Invalid, RateLimited};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request is not acceptable as given.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("{0}")]
    Unavailable(String),
    #[error("engine {0} is failing; new calls are refused until it recovers")]
    EngineUnavailable(EngineKind),
    /// The call is not in a state that allows this (e.g. an action on an ended call).
    #[error("{0}")]
    Conflict(String),
}

impl CallError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid(Invalid::new(field, message))
    }
}

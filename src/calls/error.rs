use crate::config::EngineKind;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request is not acceptable as given.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unavailable(String),
    #[error("engine {0} is failing; new calls are refused until it recovers")]
    EngineUnavailable(EngineKind),
}

impl CallError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

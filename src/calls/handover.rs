//! PLACEHOLDER on the `tools` branch (COMMON.md seam): the `handover` helper's branch has the
//! real transfer and DTMF; at merge the lead keeps that file. These signatures are the seam the
//! `transfer_call` and `send_dtmf` built-in tools are written against.

use super::shared::Shared;
use crate::domain::ids::CallId;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("transfers and keypad tones are not available on this server")]
    Unavailable,
}

pub(crate) async fn transfer(
    _shared: &Shared,
    _call: &CallId,
    _destination: &str,
    _summary: &str,
) -> Result<(), HandoverError> {
    Err(HandoverError::Unavailable)
}

pub(crate) async fn send_dtmf(
    _shared: &Shared,
    _call: &CallId,
    _digits: &str,
) -> Result<(), HandoverError> {
    Err(HandoverError::Unavailable)
}

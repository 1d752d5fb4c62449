//! `GET /api/v1/calls/{id}/recording`: a recorded call's two-channel WAV (SPEC §8). Another
//! tenant's call, a call without a recording, and a recording that failed are all 404.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::Path;
use super::{ApiError, AppState, Auth};
use crate::domain::layout::recording_path;
use crate::http::openapi::Errors;
use crate::store::recording;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(download))
}

/// The call's recording: two-channel 8 kHz WAV, caller left, agent right.
#[utoipa::path(get, path = "/calls/{id}/recording", tag = "calls", params(("id" = String, Path)),
    responses((status = 200, content_type = "audio/wav", body = Vec<u8>), Errors))]
async fn download(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let scope = auth.scope();
    let cid = id.clone();
    let status = s
        .store()
        .read(move |c| recording::call_recording(c, scope, &cid))
        .await?;
    let recorded = status
        .as_ref()
        .and_then(|v| v.get("status"))
        .and_then(|v| v.as_str())
        == Some("recorded");
    if !recorded {
        return Err(ApiError::not_found("recording"));
    }
    // The id matched a stored call, so it is one of ours and safe as a file name.
    let path = recording_path(&s.config().server.data_dir, &id);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found("recording"))?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let mut headers = vec![
        (header::CONTENT_TYPE, "audio/wav".to_owned()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{id}.wav\""),
        ),
    ];
    if let Some(len) = len {
        headers.push((header::CONTENT_LENGTH, len.to_string()));
    }
    let body = Body::from_stream(ReaderStream::with_capacity(file, 64 * 1024));
    let mut resp = body.into_response();
    for (k, v) in headers {
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k, v);
        }
    }
    Ok(resp)
}

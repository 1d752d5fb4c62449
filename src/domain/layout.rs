//! Files in the data directory that more than one part of the program names.

use std::path::Path;

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Written to `data_dir/serve.json` while the server runs, so local CLI commands can find it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub pid: u32,
    pub listen: Option<SocketAddr>,
    pub version: String,
}

pub const RUNTIME_FILE: &str = "serve.json";
pub const ADMIN_KEY_FILE: &str = "admin.key";

pub fn runtime_info(data_dir: &Path) -> Option<RuntimeInfo> {
    let text = std::fs::read_to_string(data_dir.join(RUNTIME_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Call recordings (SPEC §8): `data_dir/recordings/<call id>.wav`.
pub const RECORDINGS_DIR: &str = "recordings";

pub fn recording_path(data_dir: &Path, call_id: &str) -> std::path::PathBuf {
    data_dir.join(RECORDINGS_DIR).join(format!("{call_id}.wav"))
}

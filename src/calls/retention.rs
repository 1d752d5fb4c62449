//! The daily retention purge (SPEC §8, `[retention]`): old finished calls with their
//! transcripts and events, and old recording files. The first run is shortly after start, so
//! a server restarted daily still purges.

use std::sync::Arc;
use std::time::Duration;

use super::shared::Shared;
use crate::domain::layout::recording_path;
use crate::domain::timefmt::now_ms;
use crate::store::{StoreError, retention};

const FIRST_RUN: Duration = Duration::from_secs(60);
const EVERY: Duration = Duration::from_secs(24 * 3600);

/// What one purge removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub calls: u64,
    pub recordings: u64,
}

pub(super) async fn run(s: Arc<Shared>) {
    let mut wait = FIRST_RUN;
    loop {
        tokio::select! {
            _ = s.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = EVERY;
        if let Err(e) = s.purge().await {
            tracing::error!(error = %e, "retention purge failed; retrying tomorrow");
        }
    }
}

fn cutoff(keep: Duration) -> Option<i64> {
    (!keep.is_zero()).then(|| now_ms() - keep.as_millis().min(i64::MAX as u128) as i64)
}

/// Deletes the recording files of `ids` (off the reactor); returns how many existed.
async fn remove_files(dir: std::path::PathBuf, ids: Vec<String>) -> u64 {
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for id in ids {
            let path = recording_path(&dir, &id);
            match std::fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "cannot delete a recording")
                }
            }
        }
        n
    })
    .await
    .unwrap_or(0)
}

impl Shared {
    /// Purges what `[retention]` says is too old; `0` (or absent) keeps everything.
    pub async fn purge(&self) -> Result<Purged, StoreError> {
        let cfg = self.config();
        let dir = cfg.server.data_dir.clone();
        let mut purged = Purged::default();
        if let Some(cut) = cutoff(cfg.retention.recordings.0) {
            loop {
                let ids = self
                    .store
                    .run(move |c| retention::purge_recordings(c, cut))
                    .await?;
                let full = ids.len() as i64 >= retention::BATCH;
                purged.recordings += remove_files(dir.clone(), ids).await;
                if !full {
                    break;
                }
            }
        }
        if let Some(cut) = cutoff(cfg.retention.calls.0) {
            loop {
                let ids = self
                    .store
                    .run(move |c| retention::purge_calls(c, cut))
                    .await?;
                let full = ids.len() as i64 >= retention::BATCH;
                purged.calls += ids.len() as u64;
                let recorded = ids
                    .into_iter()
                    .filter(|(_, r)| *r)
                    .map(|(id, _)| id)
                    .collect();
                purged.recordings += remove_files(dir.clone(), recorded).await;
                if !full {
                    break;
                }
            }
        }
        let m = &self.metrics.retention_purged;
        m.with(&["calls"]).inc_by(purged.calls);
        m.with(&["recordings"]).inc_by(purged.recordings);
        if purged != Purged::default() {
            tracing::info!(
                calls = purged.calls,
                recordings = purged.recordings,
                "retention purge"
            );
        }
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    #[test]
    fn zero_keeps_everything() {
        let zero = HumanDuration::parse("0").unwrap();
        assert_eq!(cutoff(zero.0), None);
        assert_eq!(cutoff(HumanDuration::default().0), None);
        let c = cutoff(HumanDuration::parse("90d").unwrap().0).unwrap();
        assert!((now_ms() - c - 90 * 86_400_000).abs() < 1000);
    }
}

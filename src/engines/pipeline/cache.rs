//! The TTS cache (SPEC §6): fixed phrases (greeting, goodbye, the silence prompt) as μ-law
//! files under `data_dir/tts-cache/`, named by a hash of provider + voice + model + text, so
//! later calls play them with no provider round trip. Bounded: after a write, the least
//! recently used files (by modification time, which a hit refreshes) go until the total fits.
//! All file work runs on the blocking pool.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

#[derive(Clone)]
pub struct TtsCache {
    dir: PathBuf,
    max_bytes: u64,
}

pub fn key(provider: &str, voice: &str, model: &str, text: &str) -> String {
    let mut h = Sha256::new();
    for part in [provider, voice, model, text] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

impl TtsCache {
    pub fn new(data_dir: &Path, max_bytes: u64) -> Self {
        Self {
            dir: data_dir.join("tts-cache"),
            max_bytes,
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.ulaw"))
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let path = self.path(key);
        tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).ok()?;
            // A hit makes the phrase recently used.
            if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
            (!bytes.is_empty()).then_some(bytes)
        })
        .await
        .ok()
        .flatten()
    }

    pub async fn put(&self, key: &str, audio: Vec<u8>) {
        let me = self.clone();
        let key = key.to_owned();
        let r = tokio::task::spawn_blocking(move || me.put_blocking(&key, &audio)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cannot write the TTS cache");
        }
    }

    fn put_blocking(&self, key: &str, audio: &[u8]) -> std::io::Result<()> {
        if audio.len() as u64 > self.max_bytes {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, audio)?;
        std::fs::rename(&tmp, self.path(key))?;
        self.evict()
    }

    fn evict(&self) -> std::io::Result<()> {
        let mut files = Vec::new();
        let mut total = 0u64;
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let md = e.metadata()?;
            if !md.is_file() || !e.file_name().to_string_lossy().ends_with(".ulaw") {
                continue;
            }
            total += md.len();
            files.push((md.modified()?, md.len(), e.path()));
        }
        if total <= self.max_bytes {
            return Ok(());
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn hits_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let c = TtsCache::new(dir.path(), 3000);
        let (a, b, d) = (
            key("p", "v", "m", "a"),
            key("p", "v", "m", "b"),
            key("p", "v", "m", "d"),
        );
        assert_ne!(a, key("p", "v2", "m", "a"), "the voice is part of the key");
        assert!(c.get(&a).await.is_none());
        c.put(&a, vec![1; 1000]).await;
        std::thread::sleep(Duration::from_millis(20));
        c.put(&b, vec![2; 1000]).await;
        std::thread::sleep(Duration::from_millis(20));
        // Reading a makes b the least recently used.
        assert_eq!(c.get(&a).await.unwrap(), vec![1; 1000]);
        std::thread::sleep(Duration::from_millis(20));
        c.put(&d, vec![3; 1500]).await;
        assert!(c.get(&b).await.is_none(), "b evicted");
        assert!(c.get(&a).await.is_some() && c.get(&d).await.is_some());
    }
}

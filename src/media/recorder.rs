//! The call recording tap: a two-channel 8 kHz WAV (caller left, agent right) written while
//! the call runs.
//!
//! Both channels are placed on the stream's media clock. Caller audio is placed by its
//! position in the stream (the sum of the frames before it: Twilio sends a continuous 20 ms
//! frame stream, silence included), never by arrival time. Agent audio is placed where the
//! phone plays it: at our send clock translated to media time, or right after the agent audio
//! already queued when the phone's buffer is not empty. The translation is the smallest lag
//! seen between a caller frame's arrival and its media time (the least delayed frame), so a
//! late bridge start or a burst of queued frames does not shift the agent channel. A `clear`
//! drops the agent audio that never played (the playback's mark accounting says how much), so
//! the file holds what the caller heard. Gaps are silence.
//!
//! The bridge only decodes and copies bytes here; the file is written by a writer task fed
//! through a bounded channel, each chunk in one short job on the blocking pool, so a slow or full disk never stalls the call: a write that
//! fails, or a writer that falls behind by more than the channel holds, stops the recording,
//! is logged once and is reported in [`Recorder::finish`].

use std::path::PathBuf;
use tokio::sync::mpsc::{Receiver, Sender, channel, error::TrySendError};

use base64::Engine as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::audio::mulaw;

/// Samples per millisecond (8 kHz).
const PER_MS: u64 = 8;
/// Chunks the writer may lag behind (each one tick, 250 ms): 8 s of audio.
const CHANNEL_CHUNKS: usize = 32;
/// Caller audio later than this behind the clock is given up on: the channel is filled with
/// silence up to here, so a stalled stream cannot hold the agent channel in memory.
const CALLER_LAG_SAMPLES: u64 = 2_000 * PER_MS;

/// How the recording of a call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordingResult {
    /// The file is complete: `seconds` of audio.
    Recorded { seconds: f64 },
    /// Writing failed; the file may be partial or absent.
    Failed { error: String },
}

impl RecordingResult {
    /// The call's `recording` field.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            RecordingResult::Recorded { seconds } => {
                serde_json::json!({"status": "recorded", "duration_seconds": seconds})
            }
            RecordingResult::Failed { error } => {
                serde_json::json!({"status": "failed", "error": error})
            }
        }
    }
}

pub struct Recorder {
    t0: Instant,
    /// Samples (per channel) already handed to the writer.
    written: u64,
    /// Caller μ-law from `written` on.
    caller: Vec<u8>,
    /// Agent μ-law from `written` on (shorter than the caller's: silence follows).
    agent: Vec<u8>,
    tx: Option<Sender<Vec<i16>>>,
    writer: Option<JoinHandle<Result<(), String>>>,
    /// Set when the recording stopped early (the writer fell behind).
    error: Option<String>,
    scratch: Vec<u8>,
    /// Smallest (arrival clock − media time) of a caller frame, in samples.
    lag: Option<i64>,
}

impl Recorder {
    /// Starts recording to `path` (its directory is created if needed). Must run inside a
    /// Tokio runtime: the writer is a task.
    pub fn start(path: PathBuf, t0: Instant) -> Self {
        let (tx, rx) = channel(CHANNEL_CHUNKS);
        let writer = tokio::spawn(write_wav(path, rx));
        Recorder {
            t0,
            written: 0,
            caller: Vec::with_capacity(4096),
            agent: Vec::new(),
            tx: Some(tx),
            writer: Some(writer),
            error: None,
            scratch: Vec::with_capacity(1024),
            lag: None,
        }
    }

    fn wall(&self, now: Instant) -> i64 {
        (now.saturating_duration_since(self.t0).as_micros() as i64) * PER_MS as i64 / 1000
    }

    /// Media time (samples) at `now`.
    fn clock(&self, now: Instant) -> u64 {
        (self.wall(now) - self.lag.unwrap_or(0)).max(0) as u64
    }

    /// One frame of caller audio (base64 μ-law), in stream order, received at `now`.
    pub fn caller_audio(&mut self, payload_b64: &str, now: Instant) {
        if self.tx.is_none() {
            return;
        }
        let lag = self.wall(now) - (self.written + self.caller.len() as u64) as i64;
        self.lag = Some(self.lag.map_or(lag, |l| l.min(lag)));
        self.scratch.clear();
        if base64::engine::general_purpose::STANDARD
            .decode_vec(payload_b64, &mut self.scratch)
            .is_ok()
        {
            self.caller.extend_from_slice(&self.scratch);
        }
    }

    /// Agent audio (base64 μ-law, already checked) sent to the phone at `now`.
    pub fn agent_audio(&mut self, payload_b64: &str, now: Instant) {
        if self.tx.is_none() {
            return;
        }
        let at = self.clock(now).saturating_sub(self.written) as usize;
        if self.agent.len() < at {
            // The phone's buffer ran dry: this plays from now, after silence.
            self.agent.resize(at, mulaw::SILENCE);
        }
        let _ = base64::engine::general_purpose::STANDARD.decode_vec(payload_b64, &mut self.agent);
    }

    /// A `clear` went out: the last `unplayed` bytes of agent audio never reach the caller.
    pub fn cleared(&mut self, unplayed: u64) {
        let keep = self.agent.len().saturating_sub(unplayed as usize);
        self.agent.truncate(keep);
    }

    /// Hands the audio up to the clock (caller audio permitting) to the writer; call it a few
    /// times a second.
    pub fn flush(&mut self, now: Instant) {
        let clock = self.clock(now);
        let caller_end = self.written + self.caller.len() as u64;
        let floor = clock.saturating_sub(CALLER_LAG_SAMPLES);
        if caller_end < floor {
            // Frames missing (a stalled stream): their time is silence.
            self.caller
                .resize((floor - self.written) as usize, mulaw::SILENCE);
        }
        let upto = (self.written + self.caller.len() as u64).min(clock.max(floor));
        self.emit(upto);
    }

    fn emit(&mut self, upto: u64) {
        let n = upto.saturating_sub(self.written) as usize;
        if n == 0 {
            return;
        }
        let Some(tx) = &self.tx else { return };
        let mut chunk = Vec::with_capacity(n * 2);
        for i in 0..n {
            let c = self.caller.get(i).copied().unwrap_or(mulaw::SILENCE);
            let a = self.agent.get(i).copied().unwrap_or(mulaw::SILENCE);
            chunk.push(mulaw::decode(c));
            chunk.push(mulaw::decode(a));
        }
        self.caller.drain(..n.min(self.caller.len()));
        self.agent.drain(..n.min(self.agent.len()));
        self.written = upto;
        match tx.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::error!("recording stopped: the disk is too slow for it");
                self.error = Some("the recording could not be written fast enough".into());
                self.stop();
            }
            // The writer ended with an error of its own (reported by `finish`).
            Err(TrySendError::Closed(_)) => self.stop(),
        }
    }

    fn stop(&mut self) {
        self.tx = None;
        self.caller = Vec::new();
        self.agent = Vec::new();
    }

    /// Ends the recording: the agent audio still queued at the phone (`unplayed` bytes) is
    /// dropped, everything else written, and the file completed.
    pub async fn finish(mut self, unplayed: u64) -> RecordingResult {
        self.cleared(unplayed);
        let end = self.written + self.caller.len().max(self.agent.len()) as u64;
        self.emit(end);
        self.tx = None;
        let written = self.written;
        let outcome = match self.writer.take() {
            Some(w) => w.await.unwrap_or_else(|e| Err(e.to_string())),
            None => Ok(()),
        };
        match (outcome, self.error.take()) {
            (Err(error), _) | (Ok(()), Some(error)) => RecordingResult::Failed { error },
            (Ok(()), None) => RecordingResult::Recorded {
                seconds: (written as f64 / 8000.0 * 100.0).round() / 100.0,
            },
        }
    }
}

type Wav = hound::WavWriter<std::io::BufWriter<std::fs::File>>;

/// Runs `f` on the blocking pool. Each chunk is one short blocking job, so a recorded call
/// holds no blocking thread between writes (a thread per call would exhaust the pool that
/// SQLite needs).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

async fn write_wav(path: PathBuf, mut rx: Receiver<Vec<i16>>) -> Result<(), String> {
    let p = path.clone();
    let result = async move {
        let mut w: Wav = blocking(move || {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let spec = hound::WavSpec {
                channels: 2,
                sample_rate: 8000,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            hound::WavWriter::create(&p, spec).map_err(|e| e.to_string())
        })
        .await?;
        while let Some(chunk) = rx.recv().await {
            w = blocking(move || {
                for s in chunk {
                    w.write_sample(s).map_err(|e| e.to_string())?;
                }
                // Rewrites the RIFF sizes too: the file is a valid WAV while the call runs.
                w.flush().map_err(|e| e.to_string())?;
                Ok(w)
            })
            .await?;
        }
        blocking(move || w.finalize().map_err(|e| e.to_string())).await
    }
    .await;
    if let Err(e) = &result {
        // Once per call: the writer stops at its first error.
        tracing::error!(error = %e, path = %path.display(), "recording failed; the call goes on");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[tokio::test]
    async fn channels_are_placed_by_media_time_and_clear_cuts_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r/a.wav");
        let t0 = Instant::now();
        let mut r = Recorder::start(path.clone(), t0);
        // 1 s of caller audio (value 0x00: loud) in 20 ms frames.
        for i in 0..50 {
            r.caller_audio(&b64(&[0x00; 160]), t0 + Duration::from_millis(i * 20));
        }
        // Agent audio sent at 500 ms: 2 s of it queued at once; cleared at 1000 ms with
        // 1.5 s unplayed.
        r.agent_audio(&b64(&[0x80; 16_000]), t0 + Duration::from_millis(500));
        r.flush(t0 + Duration::from_millis(800));
        r.cleared(12_000);
        let res = r.finish(0).await;
        assert_eq!(res, RecordingResult::Recorded { seconds: 1.0 });
        let mut wav = hound::WavReader::open(&path).unwrap();
        assert_eq!(wav.spec().channels, 2);
        let s: Vec<i16> = wav.samples::<i16>().map(|s| s.unwrap()).collect();
        let agent_loud: Vec<usize> = (0..s.len() / 2).filter(|i| s[i * 2 + 1] != 0).collect();
        assert_eq!(agent_loud.first(), Some(&4000));
        assert_eq!(agent_loud.len(), 4000);
        assert!((0..8000).all(|i| s[i * 2] != 0));
    }

    #[tokio::test]
    async fn a_late_bridge_start_does_not_shift_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        let t0 = Instant::now();
        let mut r = Recorder::start(path.clone(), t0);
        // The stream is 40 ms ahead of the bridge: three frames wait in the socket, then one
        // arrives every 20 ms carrying media time 60, 80, …
        for _ in 0..3 {
            r.caller_audio(&b64(&[0xFF; 160]), t0);
        }
        for i in 1..=20 {
            r.caller_audio(&b64(&[0xFF; 160]), t0 + Duration::from_millis(i * 20));
        }
        // Sent at bridge time 300 ms = media time 340 ms.
        r.agent_audio(&b64(&[0x80; 800]), t0 + Duration::from_millis(300));
        r.finish(0).await;
        let s: Vec<i16> = hound::WavReader::open(&path)
            .unwrap()
            .samples::<i16>()
            .map(|s| s.unwrap())
            .collect();
        let first = (0..s.len() / 2).find(|i| s[i * 2 + 1] != 0);
        assert_eq!(first, Some(340 * 8));
    }

    #[tokio::test]
    async fn a_failing_disk_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wav");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let t0 = Instant::now();
        let mut r = Recorder::start(path, t0);
        for _ in 0..50 {
            r.caller_audio(&b64(&[0x00; 160]), t0);
        }
        r.flush(t0 + Duration::from_secs(1));
        assert!(matches!(r.finish(0).await, RecordingResult::Failed { .. }));
    }
}

//! Shared by the `bridge` and `webrtc` benches (included with `#[path]`): the server process
//! and its `/proc` figures, and a lean GA OpenAI Realtime server that talks back continuously.
// Each bench uses a different part of this file.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

pub const OPENAI_KEY: &str = "sk-bench";
const FRAME: Duration = Duration::from_millis(20);
/// 20 ms of 8 kHz μ-law.
const FRAME_BYTES: usize = 160;

/// What the Realtime side saw.
#[derive(Default)]
pub struct RtCounters {
    /// Appends received (caller frames through the bridge), deltas sent.
    pub appends: AtomicU64,
    pub deltas: AtomicU64,
    /// Sessions streaming agent audio.
    pub talking: AtomicU64,
    pub other: AtomicU64,
}

// ---------------------------------------------------------------------------------------
// /proc

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of a whole process, in µs.
pub fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / clk_tck() * 1e6
}

pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// A `kB` line of `/proc/<pid>/status` (VmRSS, RssAnon, …).
pub fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (busy, total) jiffies of the whole machine.
pub fn machine_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

// ---------------------------------------------------------------------------------------
// The server process

pub struct ServerProc {
    child: Option<Child>,
    logs: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl ServerProc {
    pub fn start(bin: &str, config: &std::path::Path) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("VOICECTL_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {bin}: {e}"))?;
        let logs = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut l = logs.lock().unwrap();
                    if l.len() >= 50 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        Ok(Self {
            child: Some(child),
            logs,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn tail(&self) -> String {
        let l = self.logs.lock().unwrap();
        l.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..500 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.terminate();
    }
}

pub async fn wait_healthy(http: &reqwest::Client, base: &str) -> Result<(), String> {
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("server did not become healthy".into())
}

/// Small read buffers on the load side: tungstenite's default (128 KiB) is zero-filled on
/// every read, which would cost the load generator more CPU than the server under test.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

// ---------------------------------------------------------------------------------------
// Fake OpenAI Realtime (GA): session, then continuous talk-back

/// `delta_frames`: agent audio per `response.output_audio.delta`, in 20 ms frames.
pub async fn start_fake_realtime(
    c: Arc<RtCounters>,
    stop: CancellationToken,
    delta_frames: u32,
) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            n += 1;
            tokio::spawn(realtime_session(
                tcp,
                n,
                c.clone(),
                stop.clone(),
                delta_frames,
            ));
        }
    });
    addr
}

#[derive(Deserialize)]
struct ClientEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
}

async fn realtime_session(
    tcp: tokio::net::TcpStream,
    n: u64,
    c: Arc<RtCounters>,
    stop: CancellationToken,
    delta_frames: u32,
) {
    #[allow(clippy::result_large_err)]
    let check =
        |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
         resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if auth == Some(&format!("Bearer {OPENAI_KEY}")) {
                Ok(resp)
            } else {
                let mut r =
                    tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(None);
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                Err(r)
            }
        };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(ws_config())).await
    else {
        return;
    };
    let created = format!(
        r#"{{"type":"session.created","event_id":"event_c{n}","session":{{"type":"realtime","id":"sess_{n}","model":"gpt-realtime"}}}}"#
    );
    if ws.send(Message::text(created)).await.is_err() {
        return;
    }
    // One long agent turn, pre-encoded: `delta_frames` × 20 ms of μ-law per delta.
    let audio: Vec<u8> = (0..FRAME_BYTES * delta_frames as usize)
        .map(|i| 0x70 | (i as u8 & 0x0F))
        .collect();
    let delta: Utf8Bytes = format!(
        r#"{{"type":"response.output_audio.delta","event_id":"event_d{n}","response_id":"resp_{n}","item_id":"item_{n}","output_index":0,"content_index":0,"delta":"{}"}}"#,
        base64::engine::general_purpose::STANDARD.encode(&audio)
    )
    .into();
    let mut tick: Option<tokio::time::Interval> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = async { tick.as_mut().unwrap().tick().await }, if tick.is_some() => {
                if ws.send(Message::Text(delta.clone())).await.is_err() {
                    break;
                }
                c.deltas.fetch_add(1, Relaxed);
            }
            m = ws.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                // Appends are the hot path: recognised by their fixed prefix, as the bridge
                // writes them; anything else is parsed.
                if text.starts_with(r#"{"type":"input_audio_buffer.append","audio":""#) {
                    c.appends.fetch_add(1, Relaxed);
                    continue;
                }
                let Ok(ev) = serde_json::from_str::<ClientEvent<'_>>(&text) else {
                    c.other.fetch_add(1, Relaxed);
                    continue;
                };
                let reply = match ev.kind {
                    "session.update" => format!(
                        r#"{{"type":"session.updated","event_id":"event_u{n}","session":{{"type":"realtime","model":"gpt-realtime","output_modalities":["audio"],"audio":{{"input":{{"format":{{"type":"audio/pcmu"}}}},"output":{{"format":{{"type":"audio/pcmu"}},"voice":"alloy"}}}}}}}}"#
                    ),
                    "response.create" if tick.is_none() => {
                        let mut t = tokio::time::interval(FRAME * delta_frames);
                        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        tick = Some(t);
                        c.talking.fetch_add(1, Relaxed);
                        format!(r#"{{"type":"response.created","event_id":"event_r{n}","response":{{"id":"resp_{n}","object":"realtime.response","status":"in_progress"}}}}"#)
                    }
                    _ => {
                        c.other.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                if ws.send(Message::text(reply)).await.is_err() {
                    break;
                }
            }
        }
    }
    if tick.is_some() {
        c.talking.fetch_sub(1, Relaxed);
    }
}

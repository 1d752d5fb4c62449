//! Browser-call benchmark: the real `voicectl serve` (release build, separate process) running
//! N concurrent WebRTC calls (SPEC §9) to OpenAI Realtime, both ends simulated by this process.
//!
//! ```text
//! cargo bench --bench webrtc                                  # N = 100, 20 s window
//! cargo bench --bench webrtc -- --calls 100 --window 15 --warmup 3
//! ```
//!
//! Each simulated browser is a str0m `Rtc` on its own loopback UDP socket: it POSTs its SDP
//! offer to `/api/v1/web-calls` with a tenant key, completes ICE-lite, DTLS and SRTP against the
//! server's one UDP socket, sends the same pre-encoded 20 ms Opus frame every 20 ms and counts
//! the agent's Opus packets without decoding them (the load side stays lean: the server decodes
//! and encodes every frame, the browsers do neither). The Realtime side is the `bridge`
//! bench's lean GA server (`shared/mod.rs`): one 20 ms μ-law delta every 20 ms per session.
//!
//! Measured as `bridge.rs` does, over a steady window in which all N calls are live: the
//! server's CPU (utime + stime of `/proc/<pid>/stat`), its RSS against the idle baseline, the
//! packets that crossed it both ways, and the load generator's own CPU.

#[path = "shared/mod.rs"]
mod shared;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use voicectl::audio::opus;

use shared::{
    OPENAI_KEY, RtCounters, ServerProc, cpu_us, machine_jiffies, rss_kb, start_fake_realtime,
    status_kb, wait_healthy,
};

const FRAME: Duration = Duration::from_millis(20);
/// A live browser that hears nothing for this long has lost its call.
const SILENT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// Arguments

struct Args {
    calls: Vec<usize>,
    window: u64,
    warmup: u64,
    bin: String,
    micro: bool,
}

fn args() -> Args {
    let env = |k: &str| std::env::var(k).ok();
    let mut a = Args {
        calls: env("WEBRTC_CALLS")
            .unwrap_or_else(|| "100".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        window: env("WEBRTC_WINDOW")
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
        warmup: env("WEBRTC_WARMUP")
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
        bin: env("VOICECTL_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_voicectl").to_owned()),
        micro: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--calls" => a.calls = val().split(',').filter_map(|s| s.parse().ok()).collect(),
            "--window" => a.window = val().parse().expect("--window seconds"),
            "--warmup" => a.warmup = val().parse().expect("--warmup seconds"),
            "--bin" => a.bin = val(),
            "--micro" => a.micro = true,
            // `cargo bench` passes --bench; libtest-style filters are ignored.
            _ => {}
        }
    }
    a
}

fn main() {
    let a = args();
    if a.micro {
        micro();
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "webrtc bench: server {} | {} CPUs | window {} s after {} s warm-up",
        a.bin,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.window,
        a.warmup
    );
    let mut rows = Vec::new();
    for &n in &a.calls {
        match rt.block_on(run(&a, n)) {
            Ok(r) => rows.push(r),
            Err(e) => {
                print_table(&rows);
                eprintln!("N={n}: {e}");
                std::process::exit(1);
            }
        }
    }
    print_table(&rows);
    micro();
}

/// The codec work a browser call adds per 20 ms frame, without sockets and in CPU time: the
/// caller's Opus decoded (the leg's `Decoder`) and the agent's audio encoded (its `Encoder`,
/// libopus's default complexity 10), both at the bridge's 8 kHz; then the encoder at lower
/// complexities, to show what that setting would save.
fn micro() {
    let pcm: Vec<i16> = (0..opus::FRAME_SAMPLES)
        .map(|i| (6000.0 * (2.0 * std::f64::consts::PI * 300.0 * i as f64 / 8000.0).sin()) as i16)
        .collect();
    let (Ok(mut enc), Ok(mut dec)) = (opus::Encoder::new(), opus::Decoder::new()) else {
        eprintln!("micro: no Opus codec");
        return;
    };
    let me = std::process::id();
    let mut packet = Vec::new();
    let iters = 10_000u32;
    let t = cpu_us(me);
    for _ in 0..iters {
        if enc.encode(std::hint::black_box(&pcm), &mut packet).is_err() {
            return;
        }
    }
    let enc_us = (cpu_us(me) - t) / f64::from(iters);
    let t = cpu_us(me);
    for _ in 0..iters {
        if dec.decode(std::hint::black_box(&packet)).is_err() {
            return;
        }
    }
    let dec_us = (cpu_us(me) - t) / f64::from(iters);
    println!(
        "\nmicro (no sockets, CPU time): Opus encode {enc_us:.1} µs/frame, decode {dec_us:.1} µs/frame \
         ({:.0} µs per call-second for both directions at 50 frames/s)",
        (enc_us + dec_us) * 50.0
    );
    let mut by_complexity = Vec::new();
    for complexity in [5, 1] {
        if let Some(us) = raw_encode_us(complexity, &pcm, iters) {
            by_complexity.push(format!("complexity {complexity}: {us:.1} µs/frame"));
        }
    }
    println!(
        "       encoder at lower complexity: {}",
        by_complexity.join(", ")
    );
}

/// CPU µs per 20 ms frame of a VoIP encoder like the leg's, at `complexity`.
fn raw_encode_us(complexity: i32, pcm: &[i16], iters: u32) -> Option<f64> {
    use opusic_sys as ffi;
    let mut err = 0;
    // SAFETY: valid arguments; the result is checked for NULL.
    let st =
        unsafe { ffi::opus_encoder_create(opus::RATE, 1, ffi::OPUS_APPLICATION_VOIP, &mut err) };
    if st.is_null() || err != ffi::OPUS_OK {
        return None;
    }
    // SAFETY: `st` is a live encoder; the request takes one int.
    unsafe { ffi::opus_encoder_ctl(st, ffi::OPUS_SET_COMPLEXITY_REQUEST, complexity) };
    let mut out = vec![0u8; 400];
    let me = std::process::id();
    let t = cpu_us(me);
    for _ in 0..iters {
        // SAFETY: buffers valid for the lengths passed; `st` is ours.
        let n = unsafe {
            ffi::opus_encode(
                st,
                std::hint::black_box(pcm).as_ptr(),
                pcm.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
            )
        };
        if n < 0 {
            break;
        }
    }
    let us = (cpu_us(me) - t) / f64::from(iters);
    // SAFETY: created above, destroyed once.
    unsafe { ffi::opus_encoder_destroy(st) };
    Some(us)
}

// ---------------------------------------------------------------------------------------
// Shared counters of the load side

#[derive(Default)]
struct Counters {
    /// Browser side: caller Opus packets sent, agent Opus packets received.
    sent: AtomicU64,
    recv: AtomicU64,
    /// Browsers that have received agent audio and are still running.
    live: AtomicU64,
    failed: AtomicU64,
    /// Browsers that failed to connect and placed a new call.
    setup_retries: AtomicU64,
    rt: Arc<RtCounters>,
}

struct Snapshot {
    at: Instant,
    server_cpu: f64,
    load_cpu: f64,
    machine: (u64, u64),
    sent: u64,
    recv: u64,
    appends: u64,
    deltas: u64,
    udp_drops: u64,
}

impl Snapshot {
    fn take(pid: u32, c: &Counters) -> Self {
        Self {
            at: Instant::now(),
            server_cpu: cpu_us(pid),
            load_cpu: cpu_us(std::process::id()),
            machine: machine_jiffies(),
            sent: c.sent.load(Relaxed),
            recv: c.recv.load(Relaxed),
            appends: c.rt.appends.load(Relaxed),
            deltas: c.rt.deltas.load(Relaxed),
            udp_drops: udp_rcvbuf_errors(),
        }
    }
}

struct Row {
    calls: usize,
    window_s: f64,
    in_per_call_s: f64,
    out_per_call_s: f64,
    server_cpu_pct: f64,
    us_per_call_s: f64,
    us_per_packet: f64,
    rss_idle_mb: f64,
    rss_live_mb: f64,
    kb_per_call: f64,
    anon_kb_per_call: f64,
    threads: u64,
    load_cpu_pct: f64,
    load_us_per_call_s: f64,
    machine_busy_pct: f64,
    sent: u64,
    recv: u64,
    lost_in: u64,
    lost_out: u64,
    udp_drops: u64,
}

/// Datagrams the kernel dropped, machine-wide, because a UDP socket's receive buffer was full
/// (`RcvbufErrors` of `/proc/net/snmp`): the server's socket or a browser's fell behind.
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// One run at N calls

async fn run(a: &Args, n: usize) -> Result<Row, String> {
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let rt_addr = start_fake_realtime(counters.rt.clone(), stop.clone(), 1).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| e.to_string())?;

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data_dir = dir.path().join("data");
    let config = dir.path().join("voicectl.toml");
    // Twilio is configured (the server wants it) but never called: browser calls only.
    std::fs::write(
        &config,
        format!(
            r#"[server]
domain = "voice.test"
public_url = "http://127.0.0.1:{port}"
data_dir = {data_dir:?}
listen = "127.0.0.1:{port}"
http_listen = ""
https_listen = ""
max_concurrent_calls = {max}
drain_timeout = "2s"

[tls]
mode = "off"

[twilio]
account_sid = "AC00000000000000000000000000000b3c"
auth_token = "bench-auth-token"
api_base_url = "http://127.0.0.1:9"
from_number = "+14155550100"

[agent]
engine = "openai-realtime"
greeting = "Hello! How can I help you today?"
max_call_duration = "1h"
silence_timeout = "1h"
record = false

[openai]
api_key = "{OPENAI_KEY}"
realtime_url = "ws://{rt_addr}/v1/realtime"

[webrtc]
udp_port = 0
public_ip = "127.0.0.1"
max_calls = {max}
peer_timeout = "10s"

[limits]
api_requests_per_second_per_ip = 100000
calls_per_minute_per_tenant = 1000000
max_connections_per_ip = {conns}
max_connections = {conns}
"#,
            max = n + 100,
            conns = 2 * n + 200,
        ),
    )
    .map_err(|e| e.to_string())?;
    let cli = |args: &[&str]| -> Result<String, String> {
        let out = Command::new(&a.bin)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("VOICECTL_CONFIG")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "voicectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // `init` writes its own config elsewhere; ours stays.
    let init_cfg = dir.path().join("init.toml");
    let out = Command::new(&a.bin)
        .args(["--json", "--config"])
        .arg(&init_cfg)
        .args(["init", "--dev", "--data-dir"])
        .arg(&data_dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("init: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let max = (n + 100).to_string();
    cli(&["tenant", "add", "bench", "--max-concurrent", &max])?;
    let key: serde_json::Value =
        serde_json::from_str(&cli(&["--json", "key", "create", "--tenant", "bench"])?)
            .map_err(|e| e.to_string())?;
    let key = key["key"].as_str().ok_or("no key")?.to_owned();

    let mut server = ServerProc::start(&a.bin, &config)?;
    let pid = server.pid();
    let base = format!("http://127.0.0.1:{port}");
    if let Err(e) = wait_healthy(&http, &base).await {
        return Err(format!("{e}\n{}", server.tail()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_kb(pid);
    let anon_idle = status_kb(pid, "RssAnon:");

    // The caller's voice: one 20 ms Opus frame of a 300 Hz tone, encoded once and resent.
    let frame = {
        let mut enc = opus::Encoder::new().map_err(|e| e.to_string())?;
        let pcm: Vec<i16> = (0..opus::FRAME_SAMPLES)
            .map(|i| {
                let t = i as f64 / 8000.0;
                (6000.0 * (2.0 * std::f64::consts::PI * 300.0 * t).sin()) as i16
            })
            .collect();
        let mut packet = Vec::new();
        enc.encode(&pcm, &mut packet).map_err(|e| e.to_string())?;
        Arc::new(packet)
    };

    // The browsers, 32 offers in flight at a time.
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut browsers = tokio::task::JoinSet::new();
    for _ in 0..n {
        let b = Browser {
            http: http.clone(),
            base: base.clone(),
            key: key.clone(),
            frame: frame.clone(),
            c: counters.clone(),
            stop: stop.clone(),
            sem: sem.clone(),
        };
        browsers.spawn(b.run());
    }
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 10);
    loop {
        let live = counters.live.load(Relaxed) as usize;
        let talking = counters.rt.talking.load(Relaxed) as usize;
        if live == n && talking == n {
            break;
        }
        if Instant::now() > deadline || counters.failed.load(Relaxed) > 0 {
            stop.cancel();
            return Err(format!(
                "only {live}/{n} browsers hear the agent, {talking} sessions talking, {} failed\n{}",
                counters.failed.load(Relaxed),
                server.tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "N={n}: all calls live after {:.1} s ({} setup retries); warming up {} s, measuring {} s (server pid {pid})",
        t0.elapsed().as_secs_f64(),
        counters.setup_retries.load(Relaxed),
        a.warmup,
        a.window
    );
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let s0 = Snapshot::take(pid, &counters);
    tokio::time::sleep(Duration::from_secs(a.window)).await;
    let s1 = Snapshot::take(pid, &counters);
    let rss_live = rss_kb(pid);
    let anon_live = status_kb(pid, "RssAnon:");
    let threads = status_kb(pid, "Threads:");
    let still_live = counters.live.load(Relaxed) as usize;

    // Teardown: the browsers stop, then the server.
    stop.cancel();
    while browsers.join_next().await.is_some() {}
    server.terminate();
    if still_live != n {
        return Err(format!(
            "only {still_live}/{n} calls still live at the end of the window"
        ));
    }

    let secs = s1.at.duration_since(s0.at).as_secs_f64();
    let call_s = n as f64 * secs;
    let sent = s1.sent - s0.sent;
    let recv = s1.recv - s0.recv;
    // Caller packets that reached the engine, agent packets that reached the browser.
    let packets_in = s1.appends - s0.appends;
    let server_cpu = s1.server_cpu - s0.server_cpu;
    let load_cpu = s1.load_cpu - s0.load_cpu;
    let (busy, total) = (s1.machine.0 - s0.machine.0, s1.machine.1 - s0.machine.1);
    Ok(Row {
        calls: n,
        window_s: secs,
        in_per_call_s: packets_in as f64 / call_s,
        out_per_call_s: recv as f64 / call_s,
        server_cpu_pct: server_cpu / (secs * 1e6) * 100.0,
        us_per_call_s: server_cpu / call_s,
        us_per_packet: server_cpu / (packets_in + recv).max(1) as f64,
        rss_idle_mb: rss_idle as f64 / 1024.0,
        rss_live_mb: rss_live as f64 / 1024.0,
        kb_per_call: rss_live.saturating_sub(rss_idle) as f64 / n as f64,
        anon_kb_per_call: anon_live.saturating_sub(anon_idle) as f64 / n as f64,
        threads,
        load_cpu_pct: load_cpu / (secs * 1e6) * 100.0,
        load_us_per_call_s: load_cpu / call_s,
        machine_busy_pct: busy as f64 / total.max(1) as f64 * 100.0,
        sent,
        recv,
        lost_in: sent.saturating_sub(packets_in),
        lost_out: (s1.deltas - s0.deltas).saturating_sub(recv),
        udp_drops: s1.udp_drops.saturating_sub(s0.udp_drops),
    })
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:>6} {:>7} {:>13} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>11} {:>8}",
        "calls",
        "window",
        "pkts/call-s",
        "srv CPU",
        "µs/call-s",
        "µs/pkt",
        "RSS idle",
        "RSS live",
        "kB/call",
        "anon/call",
        "load CPU",
        "load µs/c-s",
        "box busy"
    );
    for r in rows {
        println!(
            "{:>6} {:>6.1}s {:>6.1}+{:<6.1} {:>7.1}% {:>10.0} {:>9.2} {:>7.1}MB {:>7.1}MB {:>8.1} {:>9.1} {:>7.1}% {:>11.0} {:>7.0}%",
            r.calls,
            r.window_s,
            r.in_per_call_s,
            r.out_per_call_s,
            r.server_cpu_pct,
            r.us_per_call_s,
            r.us_per_packet,
            r.rss_idle_mb,
            r.rss_live_mb,
            r.kb_per_call,
            r.anon_kb_per_call,
            r.load_cpu_pct,
            r.load_us_per_call_s,
            r.machine_busy_pct
        );
        println!(
            "       server threads: {}; in the window the browsers sent {} and received {} Opus packets",
            r.threads, r.sent, r.recv
        );
        if r.in_per_call_s < 47.0 || r.out_per_call_s < 47.0 {
            println!(
                "       WARNING: media fell behind real time (box {:.0}% busy): per-call-second figures understate the cost; µs/pkt still holds",
                r.machine_busy_pct
            );
        }
        if r.lost_in + r.lost_out > 0 {
            println!(
                "       (in flight at the window edges or dropped: {} caller, {} agent packets; UDP receive-buffer drops on the box: {})",
                r.lost_in, r.lost_out, r.udp_drops
            );
        }
    }
    println!(
        "pkts/call-s: browser→engine (Opus in, μ-law append out) + engine→browser (μ-law delta in, Opus packet out) per call-second (real time: 50+50)."
    );
    println!(
        "µs/call-s and µs/pkt: server CPU (user+sys) / (calls × window) and / packets both ways. kB/call: (RSS live − RSS idle) / calls; anon/call: the same for RssAnon."
    );
    println!(
        "Twilio bridge for comparison: `cargo bench --bench bridge` (benches/BRIDGE.md); this path adds Opus decode/encode and SRTP per frame."
    );
}

// ---------------------------------------------------------------------------------------
// A simulated browser

struct Browser {
    http: reqwest::Client,
    base: String,
    key: String,
    frame: Arc<Vec<u8>>,
    c: Arc<Counters>,
    stop: CancellationToken,
    sem: Arc<tokio::sync::Semaphore>,
}

impl Browser {
    /// A browser whose setup fails (a handshake packet lost in a full socket buffer on a
    /// saturated box) hangs up that call and places a new one, as a user reloading would, up
    /// to `SETUP_TRIES` times; the retries are reported.
    async fn run(self) {
        const SETUP_TRIES: u32 = 3;
        for attempt in 1..=SETUP_TRIES {
            let mut live = false;
            let mut location = None;
            let r = self.talk(&mut live, &mut location).await;
            if live {
                self.c.live.fetch_sub(1, Relaxed);
            }
            let Err(e) = r else { return };
            if self.stop.is_cancelled() {
                return;
            }
            if live || attempt == SETUP_TRIES {
                eprintln!("browser: {e}");
                self.c.failed.fetch_add(1, Relaxed);
                return;
            }
            eprintln!("browser: setup failed ({e}); hanging up and placing a new call");
            self.c.setup_retries.fetch_add(1, Relaxed);
            if let Some(loc) = location {
                let _ = self
                    .http
                    .delete(format!("{}{loc}", self.base))
                    .bearer_auth(&self.key)
                    .send()
                    .await;
            }
        }
    }

    async fn talk(&self, live: &mut bool, location: &mut Option<String>) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let socket = UdpSocket::bind("127.0.0.1:0").await.map_err(|e| err(&e))?;
        let addr: SocketAddr = socket.local_addr().map_err(|e| err(&e))?;
        let mut rtc = Rtc::builder()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(addr, "udp").map_err(|e| err(&e))?);
        let mut api = rtc.sdp_api();
        // The offerer's own m-line: str0m announces `MediaAdded` only for the answerer's.
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().ok_or("no offer")?;

        // Held until connected: at most so many handshakes at once.
        let mut permit = Some(
            self.sem
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| err(&e))?,
        );
        let answer = {
            let r = self
                .http
                .post(format!("{}/api/v1/web-calls", self.base))
                .bearer_auth(&self.key)
                .header("content-type", "application/sdp")
                .body(offer.to_sdp_string())
                .send()
                .await
                .map_err(|e| err(&e))?;
            let status = r.status();
            *location = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = r.text().await.map_err(|e| err(&e))?;
            if status != 201 {
                return Err(format!("POST /api/v1/web-calls: {status} {body}"));
            }
            body
        };
        rtc.sdp_api()
            .accept_answer(
                pending,
                SdpAnswer::from_sdp_string(&answer).map_err(|e| err(&e))?,
            )
            .map_err(|e| err(&e))?;

        let mut buf = vec![0u8; 2048];
        let mut next_send: Option<Instant> = None;
        let mut rtp: u64 = 0;
        let mut last_recv = Instant::now();
        let (mut mine_sent, mut mine_recv) = (0u64, 0u64);
        loop {
            let timeout = loop {
                match rtc.poll_output().map_err(|e| err(&e))? {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        socket
                            .send_to(&t.contents, t.destination)
                            .await
                            .map_err(|e| err(&e))?;
                    }
                    Output::Event(Event::MediaData(_)) => {
                        self.c.recv.fetch_add(1, Relaxed);
                        last_recv = Instant::now();
                        mine_recv += 1;
                        if !*live {
                            *live = true;
                            self.c.live.fetch_add(1, Relaxed);
                        }
                    }
                    Output::Event(_) => {}
                }
            };
            let now = Instant::now();
            // The agent talks without pause: silence means the call is over or stuck.
            if *live && now.duration_since(last_recv) > SILENT {
                return Err(format!(
                    "no agent audio for {SILENT:?} after {mine_recv} packets, having sent {mine_sent}: the server ended the call or fell behind"
                ));
            }
            if rtc.is_connected() {
                drop(permit.take());
                let due = *next_send.get_or_insert(now);
                if now >= due {
                    let w = rtc.writer(mid).ok_or("no audio writer")?;
                    let pt = w.payload_params().next().ok_or("no payload type")?.pt();
                    w.write(
                        pt,
                        now,
                        MediaTime::new(rtp, Frequency::FORTY_EIGHT_KHZ),
                        self.frame.to_vec(),
                    )
                    .map_err(|e| err(&e))?;
                    self.c.sent.fetch_add(1, Relaxed);
                    mine_sent += 1;
                    rtp += opus::FRAME_TICKS;
                    // Real time: a late tick is not made up with a burst.
                    let next = due + FRAME;
                    next_send = Some(if next < now { now + FRAME } else { next });
                    continue;
                }
            }
            let wake = next_send.map_or(timeout, |t| t.min(timeout));
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            let input = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                r = tokio::time::timeout(wait, socket.recv_from(&mut buf)) => match r {
                    Ok(Ok((len, from))) => Input::Receive(
                        Instant::now(),
                        Receive {
                            proto: Protocol::Udp,
                            source: from,
                            destination: addr,
                            contents: buf[..len].try_into().map_err(|e| err(&e))?,
                        },
                    ),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => Input::Timeout(Instant::now()),
                },
            };
            rtc.handle_input(input).map_err(|e| err(&e))?;
        }
    }
}

//! Bridge benchmark: the real `voicectl serve` (release build, separate process) bridging N
//! concurrent Twilio Media Streams to OpenAI Realtime, both ends simulated by this process.
//!
//! ```text
//! cargo bench --bench bridge                                  # N = 100 and 1000, 20 s window
//! cargo bench --bench bridge -- --calls 100 --window 30 --warmup 5
//! cargo bench --bench bridge -- --micro                       # per-frame hot path only
//! cargo bench --bench bridge -- --delta-frames 5              # 100 ms agent deltas (default 20 ms)
//! ```
//!
//! The load side is deliberately lean (one task per call and side, pre-encoded audio, no
//! recording) so 1,000 calls fit on a small box next to the server, but it speaks the
//! protocols exactly: a Twilio REST `Calls.json` that answers by POSTing the signed answer
//! webhook, reads the TwiML `<Connect><Stream>` with its `<Parameter>`s, opens the stream with a
//! valid `X-Twilio-Signature`, sends `connected`/`start`/`media` (string sequence numbers, real
//! 20 ms pacing) and echoes marks when its playback model reaches them; and a GA Realtime
//! server that answers `session.update`, starts talking on `response.create` and then streams
//! one 20 ms `response.output_audio.delta` every 20 ms for as long as the call lasts.
//!
//! Measured over a steady-state window in which all N calls are live (setup and teardown
//! excluded): the server's CPU (utime + stime of `/proc/<pid>/stat`), its RSS (VmRSS) against
//! the idle baseline, the media frames that crossed the bridge in both directions, and the
//! load generator's own CPU (it shares the cores with the server).

#[path = "shared/mod.rs"]
mod shared;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

use twilio_sim::signature;
use twilio_sim::twiml::{self, Verb};

use shared::{
    OPENAI_KEY, RtCounters, ServerProc, cpu_us, machine_jiffies, rss_kb, start_fake_realtime,
    status_kb, wait_healthy, ws_config,
};

const ACCOUNT_SID: &str = "AC00000000000000000000000000000b3c";
const AUTH_TOKEN: &str = "bench-auth-token";
const FRAME: Duration = Duration::from_millis(20);
/// 20 ms of 8 kHz μ-law.
const FRAME_BYTES: usize = 160;

/// Agent audio per Realtime delta, in 20 ms frames (`--delta-frames`, default 1: the worst
/// case). Real OpenAI deltas are usually longer; Twilio accepts any payload length.
static DELTA_FRAMES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
/// `--record`: the server records every call.
static RECORD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn delta_frames() -> u32 {
    *DELTA_FRAMES.get().unwrap_or(&1)
}

// ---------------------------------------------------------------------------------------
// Arguments

struct Args {
    calls: Vec<usize>,
    window: u64,
    warmup: u64,
    micro: bool,
    bin: String,
}

fn args() -> Args {
    let env = |k: &str| std::env::var(k).ok();
    let mut a = Args {
        calls: env("BRIDGE_CALLS")
            .unwrap_or_else(|| "100,1000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        window: env("BRIDGE_WINDOW")
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
        warmup: env("BRIDGE_WARMUP")
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
        micro: false,
        bin: env("VOICECTL_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_voicectl").to_owned()),
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
            // Every call recorded (SPEC §8): `[agent] record = true`.
            "--record" => {
                let _ = RECORD.set(true);
            }
            "--delta-frames" => {
                let n: u32 = val().parse().expect("--delta-frames N");
                let _ = DELTA_FRAMES.set(n.max(1));
            }
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
        "bridge bench: server {} | {} CPUs | window {} s after {} s warm-up",
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
                eprintln!("N={n}: {e}");
                std::process::exit(1);
            }
        }
    }
    print_table(&rows);
    micro();
}

// ---------------------------------------------------------------------------------------
// Shared counters of the load side

#[derive(Default)]
struct Counters {
    /// Twilio side: caller frames sent, agent frames received, marks received/echoed.
    tw_media_sent: AtomicU64,
    tw_media_recv: AtomicU64,
    tw_marks_recv: AtomicU64,
    tw_marks_echoed: AtomicU64,
    /// Streams that have received agent audio and are still open.
    tw_live: AtomicU64,
    tw_failed: AtomicU64,
    /// Realtime side.
    rt: Arc<RtCounters>,
}

struct Snapshot {
    at: Instant,
    server_cpu: f64,
    load_cpu: f64,
    machine: (u64, u64),
    tw_media_sent: u64,
    tw_media_recv: u64,
    rt_appends: u64,
    rt_deltas: u64,
    marks: u64,
}

impl Snapshot {
    fn take(pid: u32, c: &Counters) -> Self {
        Self {
            at: Instant::now(),
            server_cpu: cpu_us(pid),
            load_cpu: cpu_us(std::process::id()),
            machine: machine_jiffies(),
            tw_media_sent: c.tw_media_sent.load(Relaxed),
            tw_media_recv: c.tw_media_recv.load(Relaxed),
            rt_appends: c.rt.appends.load(Relaxed),
            rt_deltas: c.rt.deltas.load(Relaxed),
            marks: c.tw_marks_echoed.load(Relaxed),
        }
    }
}

struct Row {
    calls: usize,
    window_s: f64,
    frames_in_per_call_s: f64,
    frames_out_per_call_s: f64,
    server_cpu_pct: f64,
    us_per_call_s: f64,
    us_per_frame: f64,
    rss_idle_mb: f64,
    rss_live_mb: f64,
    kb_per_call: f64,
    anon_kb_per_call: f64,
    threads: u64,
    marks_per_call_s: f64,
    load_cpu_pct: f64,
    load_us_per_call_s: f64,
    machine_busy_pct: f64,
    lost_in: u64,
    lost_out: u64,
}

// ---------------------------------------------------------------------------------------
// One run at N calls

async fn run(a: &Args, n: usize) -> Result<Row, String> {
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();

    let rt_addr = start_fake_realtime(counters.rt.clone(), stop.clone(), delta_frames()).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let tw = Arc::new(TwilioSide {
        counters: counters.clone(),
        stop: stop.clone(),
        http: http.clone(),
    });
    let tw_addr = start_fake_twilio(tw.clone()).await;

    // A free port for the server (its public URL must name it).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data_dir = dir.path().join("data");
    let config = dir.path().join("voicectl.toml");
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
account_sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"
api_base_url = "http://{tw_addr}"
from_number = "+14155550100"
calls_per_second = 1000.0

[agent]
engine = "openai-realtime"
greeting = "Hello! How can I help you today?"
max_call_duration = "1h"
silence_timeout = "1h"
record = {record}

[openai]
api_key = "{OPENAI_KEY}"
realtime_url = "ws://{rt_addr}/v1/realtime"

[limits]
api_requests_per_second_per_ip = 100000
calls_per_minute_per_tenant = 1000000
webhook_requests_per_second_per_ip = 100000
max_websockets_per_ip = {max}
# Every call is a webhook connection and a media stream from this one address.
max_connections_per_ip = {conns}
max_connections = {conns}
"#,
            max = n + 100,
            conns = 3 * n + 200,
            record = RECORD.get().copied().unwrap_or(false),
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
    cli(&["tenant", "add", "bench"])?;
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

    // Place the calls through the public API, 64 requests at a time.
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..n {
        let (http, base, key, sem) = (http.clone(), base.clone(), key.clone(), sem.clone());
        creates.spawn(async move {
            let _p = sem.acquire().await;
            let r = http
                .post(format!("{base}/api/v1/calls"))
                .bearer_auth(&key)
                .json(&serde_json::json!({"to": format!("+1415{:07}", 2_000_000 + i)}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != 201 {
                return Err(format!(
                    "create: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ));
            }
            Ok(())
        });
    }
    while let Some(r) = creates.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    // Every call live: stream open with agent audio flowing, Realtime session talking.
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 10);
    loop {
        let live = counters.tw_live.load(Relaxed) as usize;
        let talking = counters.rt.talking.load(Relaxed) as usize;
        if live == n && talking == n {
            break;
        }
        if Instant::now() > deadline || counters.tw_failed.load(Relaxed) > 0 {
            let logs = server.tail();
            return Err(format!(
                "only {live}/{n} streams live, {talking} sessions talking, {} failed\n{logs}",
                counters.tw_failed.load(Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "N={n}: all calls live after {:.1} s; warming up {} s, measuring {} s (server pid {pid})",
        t0.elapsed().as_secs_f64(),
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
    let still_live = counters.tw_live.load(Relaxed) as usize;

    // Teardown: every caller hangs up (`stop`, close), then the server stops.
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.terminate();
    if still_live != n {
        return Err(format!(
            "only {still_live}/{n} calls still live at the end of the window"
        ));
    }

    let secs = s1.at.duration_since(s0.at).as_secs_f64();
    let call_s = n as f64 * secs;
    let frames_in = s1.rt_appends - s0.rt_appends;
    let frames_out = s1.tw_media_recv - s0.tw_media_recv;
    let server_cpu = s1.server_cpu - s0.server_cpu;
    let load_cpu = s1.load_cpu - s0.load_cpu;
    let (busy, total) = (s1.machine.0 - s0.machine.0, s1.machine.1 - s0.machine.1);
    Ok(Row {
        calls: n,
        window_s: secs,
        frames_in_per_call_s: frames_in as f64 / call_s,
        frames_out_per_call_s: frames_out as f64 / call_s,
        server_cpu_pct: server_cpu / (secs * 1e6) * 100.0,
        us_per_call_s: server_cpu / call_s,
        us_per_frame: server_cpu / (frames_in + frames_out) as f64,
        rss_idle_mb: rss_idle as f64 / 1024.0,
        rss_live_mb: rss_live as f64 / 1024.0,
        kb_per_call: rss_live.saturating_sub(rss_idle) as f64 / n as f64,
        anon_kb_per_call: anon_live.saturating_sub(anon_idle) as f64 / n as f64,
        threads,
        marks_per_call_s: (s1.marks - s0.marks) as f64 / call_s,
        load_cpu_pct: load_cpu / (secs * 1e6) * 100.0,
        load_us_per_call_s: load_cpu / call_s,
        machine_busy_pct: busy as f64 / total.max(1) as f64 * 100.0,
        lost_in: (s1.tw_media_sent - s0.tw_media_sent).saturating_sub(frames_in),
        lost_out: (s1.rt_deltas - s0.rt_deltas).saturating_sub(frames_out),
    })
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:>6} {:>7} {:>13} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>11} {:>8}",
        "calls",
        "window",
        "frames/call-s",
        "srv CPU",
        "µs/call-s",
        "µs/frame",
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
            r.frames_in_per_call_s,
            r.frames_out_per_call_s,
            r.server_cpu_pct,
            r.us_per_call_s,
            r.us_per_frame,
            r.rss_idle_mb,
            r.rss_live_mb,
            r.kb_per_call,
            r.anon_kb_per_call,
            r.load_cpu_pct,
            r.load_us_per_call_s,
            r.machine_busy_pct
        );
        println!(
            "       server threads: {}; marks echoed per call-second: {:.1}",
            r.threads, r.marks_per_call_s
        );
        if r.frames_in_per_call_s < 47.0
            || r.frames_out_per_call_s < 47.0 / f64::from(delta_frames())
        {
            println!(
                "       WARNING: media fell behind real time (box {:.0}% busy): per-call-second figures understate the cost; µs/frame still holds",
                r.machine_busy_pct
            );
        }
        if r.lost_in + r.lost_out > 0 {
            println!(
                "       (in flight at the window edges: {} caller, {} agent frames)",
                r.lost_in, r.lost_out
            );
        }
    }
    println!(
        "frames/call-s: caller→engine + engine→caller media frames through the bridge per call-second (real time: 50+50)."
    );
    println!(
        "µs/call-s and µs/frame: server CPU (user+sys) / (calls × window) and / frames both ways. kB/call: (RSS live − RSS idle) / calls; anon/call: the same for RssAnon (without code pages)."
    );
    println!("bar: ≤ 300 µs CPU per call-second, ≤ 50 kB per live call.");
}

// ---------------------------------------------------------------------------------------
// Fake Twilio: REST Calls API + answer webhook + Media Streams client

struct TwilioSide {
    counters: Arc<Counters>,
    stop: CancellationToken,
    http: reqwest::Client,
}

async fn start_fake_twilio(tw: Arc<TwilioSide>) -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Calls.json",
            post(create_call),
        )
        .route(
            "/2010-04-01/Accounts/{account}/Calls/{file}",
            post(fetch_call).get(fetch_call),
        )
        .with_state(tw);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

fn twilio_auth_ok(headers: &axum::http::HeaderMap) -> bool {
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"))
    );
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str())
}

async fn create_call(
    State(tw): State<Arc<TwilioSide>>,
    Path(account): Path<String>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<Vec<(String, String)>>,
) -> axum::response::Response {
    if account != ACCOUNT_SID || !twilio_auth_ok(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                serde_json::json!({"code": 20003, "message": "Authenticate", "status": 401}),
            ),
        )
            .into_response();
    }
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let sid = format!("CA{:032x}", rand::random::<u128>());
    let (to, from, url) = (get("To"), get("From"), get("Url"));
    let body = serde_json::json!({
        "sid": sid, "account_sid": ACCOUNT_SID, "to": to, "from": from,
        "status": "queued", "direction": "outbound-api", "api_version": "2010-04-01",
    });
    tokio::spawn(twilio_call(tw, sid, to, from, url));
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

/// Fetch or update (end/redirect) a call: the bench's calls are over by the time the server
/// asks, so every one reads as completed.
async fn fetch_call(
    Path((_, file)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if !twilio_auth_ok(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let sid = file.trim_end_matches(".json");
    axum::Json(serde_json::json!({"sid": sid, "status": "completed", "duration": "1"}))
        .into_response()
}

fn fail(tw: &TwilioSide, what: String) {
    if !tw.stop.is_cancelled() {
        eprintln!("twilio side: {what}");
        tw.counters.tw_failed.fetch_add(1, Relaxed);
    }
}

/// One answered call: the answer webhook, then the media stream until the bench ends.
async fn twilio_call(tw: Arc<TwilioSide>, sid: String, to: String, from: String, url: String) {
    let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let params = vec![
        p("AccountSid", ACCOUNT_SID),
        p("ApiVersion", "2010-04-01"),
        p("CallSid", &sid),
        p("CallStatus", "in-progress"),
        p("Called", &to),
        p("Caller", &from),
        p("Direction", "outbound-api"),
        p("From", &from),
        p("To", &to),
    ];
    let sig = signature::compute(AUTH_TOKEN, &url, &params);
    let resp = tw
        .http
        .post(&url)
        .header("X-Twilio-Signature", sig)
        .form(&params)
        .send()
        .await;
    let xml = match resp {
        Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
        Ok(r) => return fail(&tw, format!("answer webhook: HTTP {}", r.status())),
        Err(e) => return fail(&tw, format!("answer webhook: {e}")),
    };
    let spec = match twiml::parse(&xml) {
        Ok(verbs) => verbs.into_iter().find_map(|v| match v {
            Verb::Stream(s) => Some(s),
            _ => None,
        }),
        Err(e) => return fail(&tw, format!("TwiML: {e}")),
    };
    let Some(spec) = spec else {
        return fail(&tw, format!("no <Stream> in {xml}"));
    };
    if let Err(e) = media_stream(&tw, &sid, &spec.url, &spec.parameters).await {
        fail(&tw, format!("media stream: {e}"));
    }
}

/// What the Twilio side reads from the app; payloads borrowed.
#[derive(Deserialize)]
struct AppMsg<'a> {
    #[serde(borrow)]
    event: &'a str,
    #[serde(default, borrow)]
    media: Option<AppMedia<'a>>,
    #[serde(default, borrow)]
    mark: Option<AppMark<'a>>,
}

#[derive(Deserialize)]
struct AppMedia<'a> {
    #[serde(borrow)]
    payload: &'a str,
}

#[derive(Deserialize)]
struct AppMark<'a> {
    #[serde(borrow)]
    name: &'a str,
}

async fn media_stream(
    tw: &TwilioSide,
    call_sid: &str,
    url: &str,
    parameters: &[(String, String)],
) -> Result<(), String> {
    let c = &tw.counters;
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let sig = signature::compute(AUTH_TOKEN, url, &[]);
    req.headers_mut().insert(
        "X-Twilio-Signature",
        HeaderValue::from_str(&sig).map_err(|e| e.to_string())?,
    );
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
        .await
        .map_err(|e| e.to_string())?;
    let stream_sid = format!("MZ{:032x}", rand::random::<u128>());
    ws.feed(Message::text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
    ))
    .await
    .map_err(|e| e.to_string())?;
    let custom: serde_json::Map<String, serde_json::Value> = parameters
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let start = serde_json::json!({
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": ACCOUNT_SID, "streamSid": stream_sid, "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": custom,
        },
        "streamSid": stream_sid,
    });
    ws.send(Message::text(start.to_string()))
        .await
        .map_err(|e| e.to_string())?;

    // The caller's audio: a fixed 20 ms frame of low noise, encoded once.
    let frame: Vec<u8> = (0..FRAME_BYTES).map(|i| 0xF0 | (i as u8 & 0x0F)).collect();
    let payload = base64::engine::general_purpose::STANDARD.encode(&frame);
    let mut seq: u64 = 1;
    let mut chunk: u64 = 0;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(FRAME);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Playback model: the agent audio queued plays in real time from `play_end`; a mark is
    // echoed once the audio before it has played (checked on each 20 ms tick).
    let mut play_end = tokio::time::Instant::now();
    let mut marks: std::collections::VecDeque<(tokio::time::Instant, String)> = Default::default();
    let mut live = false;
    let mut msg = String::with_capacity(512);
    let result = loop {
        tokio::select! {
            _ = tw.stop.cancelled() => break Ok(()),
            now = tick.tick() => {
                seq += 1;
                chunk += 1;
                msg.clear();
                use std::fmt::Write as _;
                let _ = write!(
                    msg,
                    r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"inbound","chunk":"{chunk}","timestamp":"{}","payload":"{payload}"}},"streamSid":"{stream_sid}"}}"#,
                    now.duration_since(started).as_millis()
                );
                if let Err(e) = ws.feed(Message::text(msg.as_str())).await {
                    break Err(e.to_string());
                }
                c.tw_media_sent.fetch_add(1, Relaxed);
                while let Some((due, _)) = marks.front() {
                    if *due > now {
                        break;
                    }
                    let (_, name) = marks.pop_front().unwrap();
                    seq += 1;
                    msg.clear();
                    let _ = write!(
                        msg,
                        r#"{{"event":"mark","sequenceNumber":"{seq}","streamSid":"{stream_sid}","mark":{{"name":"{name}"}}}}"#
                    );
                    if ws.feed(Message::text(msg.as_str())).await.is_err() {
                        break;
                    }
                    c.tw_marks_echoed.fetch_add(1, Relaxed);
                }
                if let Err(e) = ws.flush().await {
                    break Err(e.to_string());
                }
            }
            m = ws.next() => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => break Err("the app closed the stream".into()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(e.to_string()),
                };
                let Ok(m) = serde_json::from_str::<AppMsg<'_>>(&text) else {
                    break Err(format!("unparseable message from the app: {text}"));
                };
                let now = tokio::time::Instant::now();
                match (m.event, m.media, m.mark) {
                    ("media", Some(media), _) => {
                        let b64 = media.payload.len();
                        let pad = media.payload.bytes().rev().take_while(|&b| b == b'=').count();
                        let bytes = (b64 / 4 * 3 - pad) as u64;
                        play_end = play_end.max(now) + Duration::from_micros(bytes * 125);
                        c.tw_media_recv.fetch_add(1, Relaxed);
                        if !live {
                            live = true;
                            c.tw_live.fetch_add(1, Relaxed);
                        }
                    }
                    ("mark", _, Some(mark)) => {
                        c.tw_marks_recv.fetch_add(1, Relaxed);
                        marks.push_back((play_end.max(now), mark.name.to_owned()));
                    }
                    ("clear", _, _) => {
                        // Buffer dropped; every pending mark is echoed at once (next tick).
                        play_end = now;
                        for m in marks.iter_mut() {
                            m.0 = now;
                        }
                    }
                    _ => break Err(format!("unexpected message from the app: {text}")),
                }
            }
        }
    };
    if live {
        c.tw_live.fetch_sub(1, Relaxed);
    }
    if result.is_ok() {
        seq += 1;
        let stop = format!(
            r#"{{"event":"stop","sequenceNumber":"{seq}","stop":{{"accountSid":"{ACCOUNT_SID}","callSid":"{call_sid}"}},"streamSid":"{stream_sid}"}}"#
        );
        let _ = ws.send(Message::text(stop)).await;
        let _ = ws.close(None).await;
    }
    result
}

// ---------------------------------------------------------------------------------------
// Micro-benchmark: the per-frame work of the bridge, without sockets

fn micro() {
    use voicectl::telephony::twilio::media;
    let payload = base64::engine::general_purpose::STANDARD.encode([0xFFu8; FRAME_BYTES]);
    let inbound = format!(
        r#"{{"event":"media","sequenceNumber":"1234","media":{{"track":"inbound","chunk":"1233","timestamp":"24660","payload":"{payload}"}},"streamSid":"MZ0123456789abcdef0123456789abcdef"}}"#
    );
    let iters = 1_000_000u32;
    let mut out = String::with_capacity(512);
    let t = Instant::now();
    for _ in 0..iters {
        let (ev, _) = media::parse(std::hint::black_box(&inbound)).unwrap();
        let media::Event::Media(m) = ev else {
            unreachable!()
        };
        out.clear();
        out.push_str(r#"{"type":"input_audio_buffer.append","audio":""#);
        out.push_str(&m.payload);
        out.push_str(r#""}"#);
        std::hint::black_box(&out);
    }
    let caller_ns = t.elapsed().as_nanos() as f64 / iters as f64;
    let t = Instant::now();
    for _ in 0..iters {
        out.clear();
        media::write_media(&mut out, "MZ0123456789abcdef0123456789abcdef", &payload);
        std::hint::black_box(media::is_base64(std::hint::black_box(&payload)));
        std::hint::black_box(&out);
    }
    let agent_ns = t.elapsed().as_nanos() as f64 / iters as f64;
    println!(
        "\nmicro (no sockets): Twilio media → parse → input_audio_buffer.append {caller_ns:.0} ns/frame; \
         delta payload → Twilio media JSON {agent_ns:.0} ns/frame"
    );
}

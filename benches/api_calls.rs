//! `POST /api/v1/calls` benchmark: does creating a call get slower as the queue grows?
//!
//! ```text
//! cargo bench --bench api_calls                                    # 50,000 calls, 32 at a time
//! cargo bench --bench api_calls -- --total 20000 --concurrency 64 --bucket 2000
//! cargo bench --bench api_calls -- --bin /path/to/other/voicectl   # A/B against another build
//! cargo bench --bench api_calls -- --keep        # keep the database (path printed) afterwards
//! ```
//!
//! Black-box on purpose: it starts the real `voicectl serve` (the release binary this bench
//! was built with, or `--bin`) as a separate process, prepares it through the CLI and talks
//! to it only over HTTP, so the same bench measures the code before and after a refactor.
//!
//! The server is set up so that every call it accepts stays queued: capacity is one call
//! (`server.max_concurrent_calls = 1`, the minimum), and the fake Twilio of this process
//! accepts that first call and never reports on it, so it stays `initiating` and the dialer,
//! woken by every new call, finds the line busy. The queue therefore grows by exactly the
//! calls created, and the dialer's per-wake work runs against that growing queue as it would
//! in production. Rate limits are set far above the load (`limits.*` and the tenant's own
//! `calls_per_minute`) and `server.queue_timeout` is a day, so nothing expires.
//!
//! Results are grouped by completion order into buckets of `--bucket` calls: bucket k holds
//! the requests that completed while the queue grew from k×bucket to (k+1)×bucket calls. Per
//! bucket: throughput, p50/p99/max latency, and the server's CPU per request (utime + stime of
//! `/proc/<pid>/stat`), which is the figure least disturbed by other work on a shared box.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;

const ACCOUNT_SID: &str = "AC00000000000000000000000000000a91";
const AUTH_TOKEN: &str = "bench-auth-token";

// ---------------------------------------------------------------------------------------
// Arguments

struct Args {
    total: u64,
    concurrency: usize,
    bucket: u64,
    bin: String,
    /// Keep the temporary directory (config + database) for a look at the queue afterwards.
    keep: bool,
}

fn args() -> Result<Args, String> {
    let env = |k: &str| std::env::var(k).ok();
    let mut a = Args {
        total: 50_000,
        concurrency: 32,
        bucket: 5_000,
        bin: env("VOICECTL_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_voicectl").to_owned()),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name}: {v:?} is not a positive number"))
        };
        match arg.as_str() {
            "--total" => a.total = num("--total", val("--total")?)?,
            "--concurrency" => {
                a.concurrency = num("--concurrency", val("--concurrency")?)? as usize
            }
            "--bucket" => a.bucket = num("--bucket", val("--bucket")?)?,
            "--bin" => a.bin = val("--bin")?,
            "--keep" => a.keep = true,
            // `cargo bench` passes --bench; libtest-style filters are ignored.
            _ => {}
        }
    }
    Ok(a)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("api_calls: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "api_calls bench: server {} | {} CPUs | load average {} | {} calls, concurrency {}, buckets of {}",
        a.bin,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        a.total,
        a.concurrency,
        a.bucket
    );
    match rt.block_on(run(&a)) {
        Ok(r) => print_report(&a, &r),
        Err(e) => {
            eprintln!("api_calls: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// /proc

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of a whole process (`self` or a pid), in µs.
fn cpu_us(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / clk_tck() * 1e6
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// Fake Twilio: accepts every call and never calls back, so the one dialed call stays live.

#[derive(Default)]
struct TwilioCounts {
    creates: AtomicU64,
    other: AtomicU64,
}

async fn start_fake_twilio(counts: Arc<TwilioCounts>) -> Result<std::net::SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let counts = counts.clone();
        async move {
            let path = uri.path();
            if method == Method::POST && path.ends_with("/Calls.json") {
                let n = counts.creates.fetch_add(1, Relaxed);
                let sid = format!("CA{n:032x}");
                return (
                    StatusCode::CREATED,
                    axum::Json(serde_json::json!({
                        "sid": sid, "account_sid": ACCOUNT_SID, "status": "queued",
                        "direction": "outbound-api", "api_version": "2010-04-01",
                    })),
                )
                    .into_response();
            }
            counts.other.fetch_add(1, Relaxed);
            // Fetch, redirect or hang-up of a call: it is still ringing.
            let sid = path
                .rsplit('/')
                .next()
                .and_then(|s| s.strip_suffix(".json"))
                .unwrap_or("CA0")
                .to_owned();
            axum::Json(serde_json::json!({"sid": sid, "status": "ringing"})).into_response()
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// One run

/// One completed request: its completion ordinal (0-based), latency and outcome.
struct Sample {
    ordinal: u64,
    latency_us: u32,
    /// HTTP status, or 0 for a transport error.
    status: u16,
}

/// Taken by whichever request completes a bucket: when, and the server's CPU so far.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    server_cpu_us: f64,
}

struct Report {
    samples: Vec<Sample>,
    /// marks[0] is the start; marks[k] closes bucket k-1.
    marks: Vec<Mark>,
    elapsed: Duration,
    load_cpu_us: f64,
    server_cpu_us: f64,
    /// First body seen per non-201 status (0: transport error text).
    examples: BTreeMap<u16, String>,
    final_counts: String,
    twilio_creates: u64,
    twilio_other: u64,
    load_end: String,
}

async fn run(a: &Args) -> Result<Report, String> {
    let counts = Arc::new(TwilioCounts::default());
    let tw_addr = start_fake_twilio(counts.clone()).await?;

    // A free port for the server (its public URL must name it).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
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
max_concurrent_calls = 1
queue_timeout = "24h"
drain_timeout = "1s"

[tls]
mode = "off"

[twilio]
account_sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"
api_base_url = "http://{tw_addr}"
from_number = "+14155550100"
calls_per_second = 1000.0

[agent]
engine = "scripted"

[limits]
api_requests_per_second_per_ip = 1000000
calls_per_minute_per_tenant = 1000000
webhook_requests_per_second_per_ip = 100000
"#
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
            .map_err(|e| format!("{}: {e}", a.bin))?;
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
        .env_remove("VOICECTL_CONFIG")
        .output()
        .map_err(|e| format!("{}: {e}", a.bin))?;
    if !out.status.success() {
        return Err(format!("init: {}", String::from_utf8_lossy(&out.stderr)));
    }
    cli(&["tenant", "add", "bench", "--calls-per-minute", "1000000"])?;
    let key: serde_json::Value =
        serde_json::from_str(&cli(&["--json", "key", "create", "--tenant", "bench"])?)
            .map_err(|e| format!("key create: {e}"))?;
    let key = key["key"].as_str().ok_or("key create: no key")?.to_owned();

    let mut server = ServerProc::start(&a.bin, &config)?;
    let pid = server.pid().to_string();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency)
        .build()
        .map_err(|e| e.to_string())?;
    if let Err(e) = wait_healthy(&http, &base).await {
        return Err(format!("{e}\n{}", server.tail()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let url = format!("{base}/api/v1/calls");
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let examples = Arc::new(std::sync::Mutex::new(BTreeMap::<u16, String>::new()));
    let load_cpu0 = cpu_us("self");
    let start = Mark {
        at: Instant::now(),
        server_cpu_us: cpu_us(&pid),
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..a.concurrency {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        let (issued, done, marks, examples, pid) = (
            issued.clone(),
            done.clone(),
            marks.clone(),
            examples.clone(),
            pid.clone(),
        );
        let (total, bucket) = (a.total, a.bucket);
        workers.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = issued.fetch_add(1, Relaxed);
                if i >= total {
                    return samples;
                }
                let body = format!(r#"{{"to":"+1415{:07}"}}"#, 2_000_000 + i % 8_000_000);
                let t = Instant::now();
                let res = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let (status, text) = match res {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        // Read the body: the response is complete only then.
                        let text = r.text().await.unwrap_or_default();
                        (status, text)
                    }
                    Err(e) => (0, e.to_string()),
                };
                let latency_us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let ordinal = done.fetch_add(1, Relaxed);
                if (ordinal + 1).is_multiple_of(bucket) || ordinal + 1 == total {
                    let m = Mark {
                        at: Instant::now(),
                        server_cpu_us: cpu_us(&pid),
                    };
                    if let Ok(mut v) = marks.lock() {
                        v.push((ordinal + 1, m));
                    }
                }
                if status != 201
                    && let Ok(mut ex) = examples.lock()
                {
                    ex.entry(status).or_insert(text);
                }
                samples.push(Sample {
                    ordinal,
                    latency_us,
                    status,
                });
            }
        });
    }
    let mut samples = Vec::with_capacity(a.total as usize);
    while let Some(r) = workers.join_next().await {
        samples.extend(r.map_err(|e| e.to_string())?);
    }
    let elapsed = start.at.elapsed();
    let load_cpu_us = cpu_us("self") - load_cpu0;
    let server_cpu_us = cpu_us(&pid) - start.server_cpu_us;
    let load_end = loadavg();
    samples.sort_by_key(|s| s.ordinal);
    let mut marks: Vec<(u64, Mark)> = marks.lock().map(|v| v.clone()).unwrap_or_default();
    marks.sort_by_key(|(n, _)| *n);
    let marks: Vec<Mark> = std::iter::once(start)
        .chain(marks.into_iter().map(|(_, m)| m))
        .collect();

    // What the server says it holds now: the queue this run built.
    let final_counts = match http
        .get(format!("{base}/api/v1/calls/analytics"))
        .bearer_auth(&key)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            format!("total {} · by status {}", v["total"], v["by_status"])
        }
        Ok(r) => format!("analytics: HTTP {}", r.status()),
        Err(e) => format!("analytics: {e}"),
    };
    server.terminate();
    if a.keep {
        let kept = dir.keep();
        println!("kept {} (database in data/)", kept.display());
    }
    let examples = examples.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(Report {
        samples,
        marks,
        elapsed,
        load_cpu_us,
        server_cpu_us,
        examples,
        final_counts,
        twilio_creates: counts.creates.load(Relaxed),
        twilio_other: counts.other.load(Relaxed),
        load_end,
    })
}

// ---------------------------------------------------------------------------------------
// Report

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn print_report(a: &Args, r: &Report) {
    println!();
    println!(
        "{:>15} | {:>9} | {:>8} | {:>8} | {:>8} | {:>13}",
        "queue (calls)", "req/s", "p50 ms", "p99 ms", "max ms", "server µs/req"
    );
    println!("{}", "-".repeat(78));
    let mut lo = 0u64;
    for (k, w) in r.marks.windows(2).enumerate() {
        let hi = ((k as u64 + 1) * a.bucket).min(a.total);
        let mut lat: Vec<u32> = r
            .samples
            .iter()
            .filter(|s| s.ordinal >= lo && s.ordinal < hi)
            .map(|s| s.latency_us)
            .collect();
        lat.sort_unstable();
        let n = hi - lo;
        let secs = w[1].at.duration_since(w[0].at).as_secs_f64();
        let cpu = (w[1].server_cpu_us - w[0].server_cpu_us) / n as f64;
        println!(
            "{:>15} | {:>9.0} | {:>8.1} | {:>8.1} | {:>8.1} | {:>13.0}",
            format!("{}k–{}k", fmt_k(lo), fmt_k(hi)),
            n as f64 / secs,
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
            cpu
        );
        lo = hi;
    }
    let mut all: Vec<u32> = r.samples.iter().map(|s| s.latency_us).collect();
    all.sort_unstable();
    println!("{}", "-".repeat(78));
    println!(
        "{:>15} | {:>9.0} | {:>8.1} | {:>8.1} | {:>8.1} | {:>13.0}",
        "all",
        r.samples.len() as f64 / r.elapsed.as_secs_f64(),
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 1.0),
        r.server_cpu_us / r.samples.len().max(1) as f64
    );
    println!();
    println!(
        "{} requests in {:.1} s; load generator CPU {:.0} µs/req; load average at the end {}",
        r.samples.len(),
        r.elapsed.as_secs_f64(),
        r.load_cpu_us / r.samples.len().max(1) as f64,
        r.load_end
    );
    let mut by_status: BTreeMap<u16, u64> = BTreeMap::new();
    for s in &r.samples {
        *by_status.entry(s.status).or_default() += 1;
    }
    let non_201: u64 = by_status
        .iter()
        .filter(|(s, _)| **s != 201)
        .map(|(_, n)| n)
        .sum();
    if non_201 == 0 {
        println!("responses: all {} were 201 Created", r.samples.len());
    } else {
        println!("responses: {non_201} were NOT 201:");
        for (status, n) in &by_status {
            let label = if *status == 0 {
                "transport error".to_owned()
            } else {
                format!("HTTP {status}")
            };
            let example = r.examples.get(status).map_or("", |s| s.as_str());
            let example: String = example.chars().take(200).collect();
            println!("  {label}: {n}  {example}");
        }
    }
    println!(
        "server afterwards (GET /api/v1/calls/analytics): {}",
        r.final_counts
    );
    println!(
        "fake Twilio: {} call creations, {} other requests (expected: 1, and at most 1 other: the hang-up at shutdown)",
        r.twilio_creates, r.twilio_other
    );
    println!(
        "queue (calls): calls created before and by the end of the bucket; req/s: the bucket's calls / its wall time; latencies: request sent to response body read, by the client; server µs/req: the server's CPU (user+sys) over the bucket / its calls."
    );
    if non_201 > 0 {
        std::process::exit(1);
    }
}

fn fmt_k(n: u64) -> String {
    if n.is_multiple_of(1000) {
        format!("{}", n / 1000)
    } else {
        format!("{:.1}", n as f64 / 1000.0)
    }
}

// ---------------------------------------------------------------------------------------
// The server process

struct ServerProc {
    child: Option<Child>,
    logs: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl ServerProc {
    fn start(bin: &str, config: &std::path::Path) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("VOICECTL_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            // Default logging (a line per queued call), as in production.
            .env_remove("VOICECTL_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {bin}: {e}"))?;
        let logs = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let pipes: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for pipe in pipes {
            let logs = logs.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut l) = logs.lock() {
                        if l.len() >= 50 {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                }
            });
        }
        Ok(Self {
            child: Some(child),
            logs,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn tail(&self) -> String {
        self.logs
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn terminate(&mut self) {
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

async fn wait_healthy(http: &reqwest::Client, base: &str) -> Result<(), String> {
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

//! Operations: rate limits, metrics, status, sd_notify and signals, startup faults, doctor,
//! install.sh and the systemd unit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use voicectl::api::{AppState, app};
use voicectl::calls::{CallStatus, Direction};
use voicectl::config::Config;
use voicectl::domain::ids::CallId;
use voicectl::store::{Store, calls, keys, tenants};

use crate::support::{BIN, Install, Server};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A tool a test needs. Missing: under CI that is a failure (CI installs it); elsewhere the
/// test is skipped, loudly.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is required under CI (.ci/run installs it)");
        }
        eprintln!("SKIP: {name} not found; install it to run this test");
    }
    found
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    state: AppState,
    admin: String,
}

fn fixture(tune: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let admin = store
        .blocking(|c| keys::create(c, None, "admin", None))
        .unwrap()
        .key;
    let mut cfg = Config::dev();
    tune(&mut cfg);
    let state = AppState::new(store, Arc::new(cfg));
    Fixture {
        _dir: dir,
        app: app(state.clone()),
        state,
        admin,
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON: {}", self.text))
    }
}

impl Fixture {
    /// GET `path` as if from `peer`.
    async fn get(&self, path: &str, peer: &str, headers: &[(&str, &str)]) -> Reply {
        let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
        let mut req = Request::builder().uri(path).extension(ConnectInfo(peer));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn metrics(&self) -> String {
        let r = self.get("/metrics", "127.0.0.1", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.text
    }
}

fn assert_rate_limited(r: &Reply) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    let v = r.json();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("retry"));
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
}

#[tokio::test]
async fn api_burst_beyond_the_per_ip_limit_gets_429_with_retry_after() {
    let f = fixture(|c| c.limits.api_requests_per_second_per_ip = 3);
    for _ in 0..3 {
        let r = f.get("/api/v1/calls", "192.0.2.1", &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    }
    let r = f.get("/api/v1/calls", "192.0.2.1", &[]).await;
    assert_rate_limited(&r);
    // Refused before authentication: even the admin key is refused for this address.
    let auth = format!("Bearer {}", f.admin);
    let r = f
        .get("/api/v1/tenants", "192.0.2.1", &[("authorization", &auth)])
        .await;
    assert_rate_limited(&r);
    // Another client has its own budget.
    let r = f
        .get("/api/v1/tenants", "192.0.2.2", &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // One IPv6 host is one client, whatever address in its /64 it uses.
    for i in 1..=3 {
        let ip = format!("[2001:db8::{i}]");
        assert_eq!(
            f.get("/health", &ip, &[]).await.status,
            StatusCode::OK,
            "{ip}"
        );
    }
    assert_rate_limited(&f.get("/health", "[2001:db8::99]", &[]).await);

    let m = f.metrics().await;
    assert!(
        m.contains("voicectl_rate_limited_total{limit=\"api\"} 3\n"),
        "{m}"
    );
    assert!(m.contains(
        "voicectl_http_requests_total{method=\"GET\",route=\"/api/v1/calls\",status=\"429\"} 1\n"
    ));
}

#[tokio::test]
async fn webhooks_have_their_own_per_ip_budget() {
    let f = fixture(|c| {
        c.limits.api_requests_per_second_per_ip = 2;
        c.limits.webhook_requests_per_second_per_ip = 4;
    });
    for _ in 0..4 {
        // No webhook routes in this build: 404, but counted against the webhook budget.
        let r = f.get("/twilio/status", "198.51.100.7", &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    assert_rate_limited(&f.get("/twilio/status", "198.51.100.7", &[]).await);
    // The same address still has its API budget, and vice versa.
    assert_eq!(
        f.get("/health", "198.51.100.7", &[]).await.status,
        StatusCode::OK
    );
    // Paths outside voicectl's own (proxied sites) are not limited here.
    for _ in 0..6 {
        assert_eq!(
            f.get("/site/page", "198.51.100.7", &[]).await.status,
            StatusCode::NOT_FOUND
        );
    }
    let m = f.metrics().await;
    assert!(m.contains("voicectl_rate_limited_total{limit=\"webhook\"} 1\n"));
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let f = fixture(|c| {
        c.limits.api_requests_per_second_per_ip = 1;
        c.server.trusted_proxies = vec!["10.0.0.0/8".into()];
    });
    // Behind the trusted balancer, each real client has its own bucket.
    for client in ["203.0.113.1", "203.0.113.2"] {
        let xff = [("x-forwarded-for", client)];
        assert_eq!(
            f.get("/health", "10.0.0.5", &xff).await.status,
            StatusCode::OK
        );
    }
    assert_rate_limited(
        &f.get("/health", "10.0.0.5", &[("x-forwarded-for", "203.0.113.1")])
            .await,
    );
    // From anyone else the header is ignored: a client cannot pick a fresh bucket per request.
    assert_eq!(
        f.get("/health", "192.0.2.9", &[("x-forwarded-for", "1.1.1.1")])
            .await
            .status,
        StatusCode::OK
    );
    assert_rate_limited(
        &f.get("/health", "192.0.2.9", &[("x-forwarded-for", "2.2.2.2")])
            .await,
    );
}

#[tokio::test]
async fn oversized_headers_get_431_in_the_error_shape() {
    let f = fixture(|c| c.limits.max_header_bytes = 2048);
    let big = "x".repeat(4096);
    let r = f.get("/health", "192.0.2.1", &[("x-junk", &big)]).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "headers_too_large");
    let r = f.get(&format!("/health?{big}"), "192.0.2.1", &[]).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        f.get("/health", "192.0.2.1", &[("x-small", "1")])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn metrics_only_for_loopback_and_the_allow_list() {
    let f = fixture(|c| c.server.metrics_allow = vec!["192.0.2.0/24".into()]);
    for peer in ["127.0.0.1", "[::1]", "192.0.2.77"] {
        let r = f.get("/metrics", peer, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{peer}: {}", r.text);
        assert!(
            r.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
    }
    let r = f.get("/metrics", "198.51.100.1", &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"]["code"], "forbidden");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.metrics_allow")
    );
}

#[tokio::test]
async fn metrics_use_route_templates_and_pass_promtool() {
    let f = fixture(|_| {});
    let auth = format!("Bearer {}", f.admin);
    for id in ["call_aaaa", "call_bbbb", "call_cccc"] {
        let r = f
            .get(
                &format!("/api/v1/calls/{id}"),
                "127.0.0.1",
                &[("authorization", &auth)],
            )
            .await;
        assert!(r.status.is_client_error(), "{}", r.text);
    }
    f.get("/no/such/path", "127.0.0.1", &[]).await;
    f.get("/api/v1/no-such", "127.0.0.1", &[]).await;
    // Exercise every hook the call path will feed, so the full format is linted.
    let m = f.state.ops().metrics();
    m.calls_active.set(2);
    m.calls_queued.set(1);
    m.calls_finished.with(&["completed"]).inc();
    m.call_duration.observe(42.0);
    m.greeting_latency.with(&["scripted"]).observe(0.4);
    m.turn_latency.with(&["scripted"]).observe(0.7);
    m.barge_in_latency.with(&["scripted"]).observe(0.05);
    m.media_frames.with(&["in"]).inc_by(50);
    m.engine_errors.with(&["openai-realtime", "timeout"]).inc();
    m.engine_circuit_state.with(&["openai-realtime"]).set(2);
    m.certificate_expiry
        .with(&["voice.example.com"])
        .set(1_900_000_000);

    let text = f.metrics().await;
    assert!(
        text.contains(
            "voicectl_http_requests_total{method=\"GET\",route=\"/api/v1/calls/{id}\",status=\"404\"} 3\n"
        ),
        "{text}"
    );
    assert!(
        !text.contains("call_aaaa"),
        "raw paths must not become labels"
    );
    assert!(!text.contains("/no/such/path"));
    assert!(
        text.contains("route=\"unmatched\",status=\"404\"} 2\n"),
        "{text}"
    );
    for name in [
        "voicectl_build_info{version=",
        "process_start_time_seconds ",
        "voicectl_calls_active 2",
        "voicectl_turn_latency_seconds_bucket{engine=\"scripted\",le=\"0.75\"} 1",
        "voicectl_engine_circuit_state{engine=\"openai-realtime\"} 2",
    ] {
        assert!(text.contains(name), "missing {name}:\n{text}");
    }

    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn status_endpoint_is_admin_only_and_counts_live_and_queued_calls() {
    let f = fixture(|_| {});
    let store = f.state.store().clone();
    let tenant_key = store
        .blocking(|c| {
            let t = tenants::create(
                c,
                tenants::TenantPatch {
                    name: Some("acme".into()),
                    ..Default::default()
                },
            )?;
            for status in [
                CallStatus::Queued,
                CallStatus::Queued,
                CallStatus::Ringing,
                CallStatus::InProgress,
                CallStatus::Completed,
            ] {
                calls::insert(
                    c,
                    &calls::NewCall {
                        id: CallId::generate(),
                        tenant_id: t.id,
                        direction: Direction::Outbound,
                        to: "+14155550100".into(),
                        from: "+14155550199".into(),
                        status,
                        engine: "scripted".into(),
                        metadata: serde_json::json!({}),
                    },
                )?;
            }
            Ok(keys::create(c, Some("acme"), "k", None)?.key)
        })
        .unwrap();
    f.state
        .ops()
        .metrics()
        .certificate_expiry
        .with(&["voice.example.com"])
        .set(4_102_444_800); // 2100-01-01

    let auth = format!("Bearer {}", f.admin);
    let r = f
        .get("/api/v1/status", "127.0.0.1", &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["state"], "serving");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["calls"]["active"], 2);
    assert_eq!(v["calls"]["queued"], 2);
    assert_eq!(v["certificates"][0]["domain"], "voice.example.com");
    assert_eq!(v["certificates"][0]["not_after"], "2100-01-01T00:00:00Z");
    assert!(v["certificates"][0]["days_left"].as_i64().unwrap() > 20_000);

    let tenant_auth = format!("Bearer {tenant_key}");
    let r = f
        .get(
            "/api/v1/status",
            "127.0.0.1",
            &[("authorization", &tenant_auth)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "admin only, like tenants");
    assert_eq!(
        f.get("/api/v1/status", "127.0.0.1", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

// ---- The real binary ------------------------------------------------------------------------

/// A socket standing in for systemd's notify socket.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: tokio::net::UnixDatagram,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            _dir: dir,
            path,
            sock,
        }
    }

    /// The next message, or None after `wait`.
    async fn next(&self, wait: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(wait, self.sock.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one contains `what`; panics after 10 s.
    async fn wait_for(&self, what: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(m) => {
                    let hit = m.lines().any(|l| l == what);
                    seen.push(m);
                    if hit {
                        return seen;
                    }
                }
                None => panic!("no {what:?} within 10 s; got {seen:?}"),
            }
        }
    }
}

#[tokio::test]
async fn sd_notify_ready_after_listeners_watchdog_and_stopping_on_sigterm() {
    let i = Install::new();
    let notify = NotifySocket::new();
    let mut server = Server::start_env(
        &["--config", i.config.to_str().unwrap(), "serve"],
        None,
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let before = notify.wait_for("READY=1").await;
    assert!(
        before[0].contains("STATUS=starting"),
        "a status while starting: {before:?}"
    );
    // Once READY=1 is out, the server answers at once.
    let r = reqwest::get(server.url("/health/ready")).await.unwrap();
    assert_eq!(r.status(), 200);
    let ready = before.last().unwrap();
    assert!(ready.contains("STATUS=serving on"), "{ready}");
    // WatchdogSec=: pings every half interval while the database answers.
    notify.wait_for("WATCHDOG=1").await;
    notify.wait_for("WATCHDOG=1").await;

    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    let after = notify.wait_for("STOPPING=1").await;
    assert!(after.last().unwrap().contains("STATUS=draining"));
}

#[tokio::test]
async fn sd_notify_supports_abstract_sockets_and_is_silent_without_one() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("voicectl-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let std_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    std_sock.set_nonblocking(true).unwrap();
    let sock = tokio::net::UnixDatagram::from_std(std_sock).unwrap();
    let i = Install::new();
    let mut server = Server::start_env(
        &["--config", i.config.to_str().unwrap(), "serve"],
        None,
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    while !got.contains("READY=1") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
            .await
            .expect("READY=1 on the abstract socket")
            .unwrap();
        got = String::from_utf8_lossy(&buf[..n]).into_owned();
    }
    assert!(server.terminate().success());
    // Without NOTIFY_SOCKET (plain `serve`, tests, --dev) nothing is attempted or logged.
    let mut plain = Server::start(&i);
    assert!(plain.terminate().success());
    let logs = plain.drain_logs().join("\n");
    assert!(!logs.contains("sd_notify"), "{logs}");
}

#[test]
fn sigterm_during_startup_exits_cleanly_without_ready() {
    let i = Install::new();
    i.init();
    let mut before_ready = 0;
    for round in 0..3 {
        let notify_dir = tempfile::tempdir().unwrap();
        let notify_path = notify_dir.path().join("n.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify.set_nonblocking(true).unwrap();
        let mut child = Command::new(BIN)
            .args(["--config", i.config.to_str().unwrap(), "serve"])
            .env_remove("VOICECTL_CONFIG")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // "starting" is logged once the signal handlers are in place; stop right then, while
        // the database is being opened.
        let mut log = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let starting = line.contains("\"message\":\"starting\"");
            log.push(line);
            if starting {
                break;
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        log.extend(lines.map_while(Result::ok));
        let status = child.wait().unwrap();
        let log = log.join("\n");
        assert!(
            status.success(),
            "round {round}: SIGTERM during startup must be a clean exit, got {status:?}\n{log}"
        );
        let mut buf = [0u8; 4096];
        let mut msgs = Vec::new();
        while let Ok(n) = notify.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if log.contains("exiting before ready") {
            before_ready += 1;
            assert!(
                !msgs.iter().any(|m| m.contains("READY=1")),
                "READY=1 sent although startup was abandoned: {msgs:?}"
            );
        } else {
            assert!(log.contains("\"stopped\""), "{log}");
        }
        assert!(
            !i.data_dir.join("serve.json").exists(),
            "no runtime file left behind"
        );
    }
    eprintln!("sigterm_during_startup: {before_ready}/3 rounds stopped before READY");
    // The lock was released: a normal start works.
    let mut s = Server::start(&i);
    assert!(s.terminate().success());
}

/// Runs `sh -c script` in a private mount namespace (root only) with `$1`…; None when this
/// machine does not allow it.
fn in_mount_namespace(script: &str, args: &[&str]) -> Option<std::process::Output> {
    if !is_root() {
        return None;
    }
    let probe = Command::new("unshare")
        .args(["-m", "true"])
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !probe.success() {
        return None;
    }
    Some(
        Command::new("unshare")
            .args(["-m", "sh", "-c", script, "sh"])
            .args(args)
            .env_remove("VOICECTL_CONFIG")
            .output()
            .unwrap(),
    )
}

fn skip_or_fail(test: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root and unshare(1) mount namespaces, which CI has");
    }
    eprintln!("SKIP {test}: needs root and unshare(1) mount namespaces");
}

#[test]
fn full_disk_at_startup_is_a_clear_error_and_creates_nothing() {
    let i = Install::new();
    std::fs::create_dir_all(&i.data_dir).unwrap();
    // A 1 MiB filesystem as the data dir: far below what the server needs.
    let script = r#"mount -t tmpfs -o size=1m,mode=0700 tmpfs "$1" || exit 99
"$2" --config "$3" serve; rc=$?
echo "LEFT:$(ls -A "$1" | tr '\n' ' ')"
exit $rc"#;
    let Some(out) = in_mount_namespace(
        script,
        &[
            i.data_dir.to_str().unwrap(),
            BIN,
            i.config.to_str().unwrap(),
        ],
    ) else {
        return skip_or_fail("full_disk_at_startup");
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(99), "mount failed: {stderr}");
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("free") && stderr.contains("needs at least 16.0 MiB"),
        "{stderr}"
    );
    assert!(
        stdout.contains("LEFT:\n") || stdout.trim_end().ends_with("LEFT:"),
        "the data dir must stay empty: {stdout}"
    );
    assert!(!stdout.contains("\"listening\""));
}

#[test]
fn read_only_data_dir_at_startup_is_a_clear_error_and_changes_nothing() {
    let i = Install::new();
    i.init();
    let before = i.db_snapshot();
    let files = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let listing = files(&i.data_dir);
    let script = r#"mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" || exit 99
exec "$2" --config "$3" serve"#;
    let out = match in_mount_namespace(
        script,
        &[
            i.data_dir.to_str().unwrap(),
            BIN,
            i.config.to_str().unwrap(),
        ],
    ) {
        Some(out) => out,
        None if !is_root() => {
            // Without root, a 0500 directory is just as read-only.
            std::fs::set_permissions(&i.data_dir, std::fs::Permissions::from_mode(0o500)).unwrap();
            let out = i.run(&["serve"]);
            std::fs::set_permissions(&i.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            out
        }
        None => return skip_or_fail("read_only_data_dir_at_startup"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(99), "mount failed: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("is not writable"), "{stderr}");
    assert!(
        stderr.contains("read-only") || stderr.contains("chown"),
        "the error says what to do: {stderr}"
    );
    assert_eq!(files(&i.data_dir), listing, "no files added or removed");
    assert_eq!(i.db_snapshot(), before);
}

// ---- status and doctor ---------------------------------------------------------------------

#[tokio::test]
async fn status_cli_reports_a_running_server_and_says_when_it_is_down() {
    let i = Install::new();
    i.init();
    let out = i.run(&["status"]);
    assert_eq!(out.status.code(), Some(3), "down is exit 3, like systemctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not running"), "{text}");

    let mut server = Server::start(&i);
    let v = i.json(&["status"]);
    assert_eq!(v["up"], true);
    assert_eq!(v["state"], "serving");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["listen"], server.addr.to_string());
    assert_eq!(v["calls"]["active"], 0);
    let human = i.ok(&["status"]);
    assert!(human.contains("voicectl is up") && human.contains("0 live, 0 queued"));
    assert!(server.terminate().success());

    // A runtime file left by a crashed server names a pid that is gone.
    std::fs::write(
        i.data_dir.join("serve.json"),
        r#"{"pid": 2147483000, "listen": "127.0.0.1:9", "version": "0.0.0"}"#,
    )
    .unwrap();
    let out = i.run(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("is gone"));
}

/// A stand-in for Twilio's REST API that knows one account.
async fn fake_twilio(sid: &'static str, token: &'static str) -> SocketAddr {
    use axum::routing::get;
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{token}"))
    );
    let app = Router::new().route(
        "/2010-04-01/Accounts/{file}",
        get(move |headers: axum::http::HeaderMap| async move {
            let ok = headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.to_str().unwrap_or("") == expected);
            if ok {
                (
                    StatusCode::OK,
                    [(header::DATE, httpdate_now())],
                    r#"{"status": "active", "friendly_name": "Test Account"}"#,
                )
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::DATE, httpdate_now())],
                    r#"{"code": 20003, "message": "Authenticate"}"#,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn httpdate_now() -> String {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc().format(&f).unwrap()
}

/// A config for doctor that stays on this machine: `localhost`, loopback ports, fake Twilio.
fn doctor_install(twilio: SocketAddr, token: &str, listen: &str) -> Install {
    let i = Install::new();
    std::fs::write(
        &i.config,
        format!(
            "[server]\ndomain = \"localhost\"\ndata_dir = {:?}\nlisten = \"{listen}\"\n\
             http_listen = \"\"\nhttps_listen = \"\"\n\n[tls]\nmode = \"off\"\n\n\
             [twilio]\naccount_sid = \"AC0123\"\nauth_token = \"{token}\"\n\
             from_number = \"+14155550100\"\napi_base_url = \"http://{twilio}\"\n",
            i.data_dir
        ),
    )
    .unwrap();
    std::fs::set_permissions(&i.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    i
}

/// Runs a command asynchronously, so the fake Twilio on this runtime can answer it.
async fn run_async(i: &Install, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&i.config)
        .args(args)
        .env_remove("VOICECTL_CONFIG")
        .output()
        .await
        .unwrap()
}

async fn doctor(i: &Install) -> (Option<i32>, Value) {
    let out = run_async(i, &["--json", "doctor"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "doctor --json: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

fn check<'a>(v: &'a Value, name: &str) -> Vec<&'a Value> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == name)
        .collect()
}

#[tokio::test]
async fn doctor_passes_a_healthy_install_and_names_each_problem_with_a_fix() {
    let twilio = fake_twilio("AC0123", "right-token").await;
    let i = doctor_install(twilio, "right-token", "127.0.0.1:0");
    i.init();
    let (code, v) = doctor(&i).await;
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["ok"], true);
    for name in [
        "config",
        "data_dir",
        "data_dir_writable",
        "disk",
        "dns",
        "twilio",
    ] {
        assert_eq!(check(&v, name)[0]["level"], "OK", "{name}: {v:#}");
    }
    assert!(
        check(&v, "twilio")[0]["detail"]
            .as_str()
            .unwrap()
            .contains("Test Account")
    );
    assert_ne!(check(&v, "clock")[0]["level"], "FAIL", "{v:#}");
    // Human output: one line per check.
    let human = run_async(&i, &["doctor"]).await;
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.lines().any(|l| l.starts_with("OK    twilio")),
        "{human}"
    );

    // Wrong token: Twilio answers 401 → FAIL with a fix, non-zero exit.
    let bad = doctor_install(twilio, "wrong-token", "127.0.0.1:0");
    bad.init();
    // A secret readable by others, and a port taken by another program.
    std::fs::set_permissions(
        bad.data_dir.join("admin.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, v) = doctor(&bad).await;
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["ok"], false);
    let t = check(&v, "twilio")[0];
    assert_eq!(t["level"], "FAIL");
    assert!(t["detail"].as_str().unwrap().contains("401"));
    assert!(t["hint"].as_str().unwrap().contains("auth_token"));
    let d = check(&v, "data_dir")[0];
    assert_eq!(d["level"], "FAIL", "{d}");
    assert!(d["hint"].as_str().unwrap().contains("chmod 0600"), "{d}");
    assert!(
        !v.to_string().contains("wrong-token"),
        "doctor never prints secrets"
    );

    // No config at all: one FAIL naming the problem.
    let none = Install::new();
    std::fs::remove_file(&none.config).unwrap();
    let (code, v) = doctor(&none).await;
    assert_eq!(code, Some(1));
    assert_eq!(check(&v, "config")[0]["level"], "FAIL");
}

#[tokio::test]
async fn doctor_tells_our_port_from_a_foreign_one() {
    let twilio = fake_twilio("AC0123", "t").await;
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let i = doctor_install(twilio, "t", &taken);
    i.init();
    let (code, v) = doctor(&i).await;
    let p = check(&v, "ports")[0];
    assert_eq!(p["level"], "FAIL", "{v:#}");
    assert!(p["detail"].as_str().unwrap().contains("another program"));
    assert!(p["hint"].as_str().unwrap().contains("ss -ltnp"));
    assert_eq!(code, Some(1));

    // The same port held by our own running server is fine.
    drop(squatter);
    let mut server = Server::start(&i);
    let (_, v) = doctor(&i).await;
    let p = check(&v, "ports")[0];
    assert_eq!(p["level"], "OK", "{v:#}");
    assert!(p["detail"].as_str().unwrap().contains("voicectl"));
    assert_eq!(check(&v, "server")[0]["level"], "OK");
    assert!(server.terminate().success());
}

// ---- Packaging -----------------------------------------------------------------------------

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A PATH whose system-changing commands only record that they were called.
fn tripwire_path(dir: &Path) -> (String, PathBuf) {
    let bin = dir.join("tripwire-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("tripwire.log");
    for cmd in [
        "useradd",
        "userdel",
        "groupadd",
        "chown",
        "systemctl",
        "systemd-analyze",
        "runuser",
        "getent",
        "cargo",
    ] {
        let p = bin.join(cmd);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{cmd} $*\" >> {:?}\nexit 97\n", log),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    (path, log)
}

fn install_sh(path_env: &str, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg(Path::new(REPO).join("install.sh"))
        .args(args)
        .env("PATH", path_env)
        .env_remove("VOICECTL_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn install_sh_stages_the_expected_tree_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let (path_env, tripwire) = tripwire_path(tmp.path());
    let stage = tmp.path().join("stage");
    let stage_s = stage.to_str().unwrap();
    let base = ["--destdir", stage_s, "--no-start", "--binary", BIN];

    // Bad input first: no config yet and no --domain → error, nothing created.
    let out = install_sh(&path_env, &base);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--domain"));
    assert!(
        !stage.join("usr").exists(),
        "a refused install changes nothing"
    );

    let mut args = base.to_vec();
    args.extend([
        "--domain",
        "voice.example.com",
        "--email",
        "ops@example.com",
    ]);
    let out = install_sh(&path_env, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |rel: &str| stage.join(rel.trim_start_matches('/'));
    for (rel, want) in [
        ("/usr/local/bin/voicectl", 0o755),
        ("/etc/systemd/system/voicectl.service", 0o644),
        ("/etc/voicectl", 0o750),
        ("/etc/voicectl/voicectl.toml", 0o640),
        ("/var/lib/voicectl", 0o700),
        ("/var/lib/voicectl/voicectl.db", 0o600),
        ("/var/lib/voicectl/admin.key", 0o600),
    ] {
        assert_eq!(mode(&p(rel)), want, "{rel}: {:o}", mode(&p(rel)));
    }
    // The intended owners are reported (staging applies none).
    for line in [
        "0750 root:voicectl /etc/voicectl",
        "0640 root:voicectl /etc/voicectl/voicectl.toml",
        "0700 voicectl:voicectl /var/lib/voicectl",
        "0755 root:root /usr/local/bin/voicectl",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // The unit is the shipped file, byte for byte: one source.
    assert_eq!(
        std::fs::read(p("/etc/systemd/system/voicectl.service")).unwrap(),
        std::fs::read(Path::new(REPO).join("systemd/voicectl.service")).unwrap()
    );
    let config = std::fs::read_to_string(p("/etc/voicectl/voicectl.toml")).unwrap();
    assert!(
        config.contains("data_dir = \"/var/lib/voicectl\""),
        "{config}"
    );
    assert!(config.contains("domain = \"voice.example.com\""));
    assert!(config.contains("acme_email = \"ops@example.com\""));
    assert_eq!(
        std::fs::read(p("/usr/local/bin/voicectl")).unwrap(),
        std::fs::read(BIN).unwrap()
    );

    // Re-run (upgrade): the operator's config is kept, the rest refreshed.
    std::fs::write(
        p("/etc/voicectl/voicectl.toml"),
        format!("{config}\n# edited by the operator\n"),
    )
    .unwrap();
    std::fs::write(p("/usr/local/bin/voicectl"), "old binary").unwrap();
    let admin_key = std::fs::read(p("/var/lib/voicectl/admin.key")).unwrap();
    let out = install_sh(&path_env, &base);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Keeping the existing"));
    assert!(
        std::fs::read_to_string(p("/etc/voicectl/voicectl.toml"))
            .unwrap()
            .contains("# edited by the operator")
    );
    assert_eq!(
        std::fs::read(p("/usr/local/bin/voicectl")).unwrap(),
        std::fs::read(BIN).unwrap()
    );
    assert_eq!(
        std::fs::read(p("/var/lib/voicectl/admin.key")).unwrap(),
        admin_key
    );
    assert!(!p("/usr/local/bin/voicectl.new").exists());

    // Uninstall keeps config and data; --purge removes them.
    let out = install_sh(&path_env, &["--destdir", stage_s, "--uninstall"]);
    assert!(out.status.success());
    assert!(!p("/usr/local/bin/voicectl").exists());
    assert!(!p("/etc/systemd/system/voicectl.service").exists());
    assert!(p("/etc/voicectl/voicectl.toml").exists());
    assert!(p("/var/lib/voicectl/voicectl.db").exists());
    let out = install_sh(&path_env, &["--destdir", stage_s, "--uninstall", "--purge"]);
    assert!(out.status.success());
    assert!(!p("/etc/voicectl").exists() && !p("/var/lib/voicectl").exists());

    let calls = std::fs::read_to_string(&tripwire).unwrap_or_default();
    assert!(
        calls.is_empty(),
        "staging must not touch the system, but ran:\n{calls}"
    );
}

#[test]
fn install_sh_is_shellcheck_clean() {
    let Some(shellcheck) = tool("shellcheck") else {
        return;
    };
    let out = Command::new(shellcheck)
        .args(["--shell=sh", "--severity=style"])
        .arg(Path::new(REPO).join("install.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn systemd_unit_verifies_and_exposure_is_at_most_2() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let shipped =
        std::fs::read_to_string(Path::new(REPO).join("systemd/voicectl.service")).unwrap();
    assert!(
        shipped.contains("ExecStart=/usr/local/bin/voicectl "),
        "the unit runs what install.sh installs"
    );
    for line in [
        "Type=notify",
        "User=voicectl",
        "StateDirectory=voicectl",
        "RuntimeDirectory=voicectl",
        "ConfigurationDirectory=voicectl",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "UMask=0077",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "IPAddressDeny=169.254.0.0/16 fe80::/10",
    ] {
        assert!(shipped.lines().any(|l| l == line), "unit lacks {line}");
    }
    // TimeoutStopSec must outlast the default drain_timeout.
    let stop = shipped
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    let stop = humantime::parse_duration(stop).unwrap();
    assert!(stop > Config::default().server.drain_timeout.0);
    let nofile: u64 = shipped
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(nofile >= 65536);

    // verify needs ExecStart to exist: check a copy that runs the freshly built binary.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("voicectl.service");
    std::fs::write(
        &unit,
        shipped.replace(
            "ExecStart=/usr/local/bin/voicectl ",
            &format!("ExecStart={BIN} "),
        ),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let errs = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && errs.trim().is_empty(),
        "verify: {errs}"
    );

    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for voicectl.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure score in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

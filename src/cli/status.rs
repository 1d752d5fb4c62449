//! `voicectl status`: asks the running server (over its local plain-HTTP listener, with the
//! admin key from the data dir) how it is doing. Works as root or as the service user.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::{Ctx, output};
use crate::api::status::StatusReport;
use crate::domain::layout::{ADMIN_KEY_FILE, RUNTIME_FILE, RuntimeInfo};
use crate::ops::doctor::pid_alive;

/// Exit status when the server is not running (as `systemctl status` does for inactive units).
const DOWN: u8 = 3;

pub fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let cfg = ctx.load_config()?;
    let data_dir = &cfg.server.data_dir;
    let down = |reason: String| -> anyhow::Result<ExitCode> {
        if ctx.json {
            output::json(&json!({"up": false, "reason": reason}))?;
        } else {
            println!("voicectl is not running: {reason}");
        }
        Ok(ExitCode::from(DOWN))
    };
    let runtime_path = data_dir.join(RUNTIME_FILE);
    let Some(text) = read_private(&runtime_path)? else {
        return down(format!(
            "no {} (start it: systemctl start voicectl, or voicectl serve)",
            runtime_path.display()
        ));
    };
    let info: RuntimeInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", runtime_path.display()))?;
    if !pid_alive(info.pid) {
        return down(format!(
            "pid {} named in {} is gone (a crash? journalctl -u voicectl -e)",
            info.pid,
            runtime_path.display()
        ));
    }
    let Some(listen) = info.listen else {
        bail!(
            "the server (pid {}) has no plain-HTTP listener (server.listen) to ask locally",
            info.pid
        );
    };
    let addr = local_equivalent(listen);
    let key_path = data_dir.join(ADMIN_KEY_FILE);
    let Some(key) = read_private(&key_path)? else {
        bail!(
            "no admin key at {} (the server writes it on first start)",
            key_path.display()
        );
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = match rt.block_on(fetch(addr, key.trim())) {
        Ok(r) => r,
        Err(e) => {
            return down(format!(
                "pid {} is alive but {addr} does not answer: {e:#}",
                info.pid
            ));
        }
    };
    if ctx.json {
        let mut v = serde_json::to_value(&report)?;
        v["up"] = json!(true);
        v["listen"] = json!(addr);
        output::json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    print(&report, addr);
    Ok(ExitCode::SUCCESS)
}

/// Reads a file from the private data dir; Ok(None) when it does not exist, and a clear error
/// when the caller lacks the rights.
fn read_private(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "cannot read {}: {e}; run as root or as the voicectl user (sudo -u voicectl voicectl status)",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A wildcard listen address is reached over loopback.
fn local_equivalent(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

async fn fetch(addr: SocketAddr, key: &str) -> anyhow::Result<StatusReport> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        // The admin key never follows a redirect to another host.
        .redirect(crate::ops::outbound::provider_redirects())
        .build()?;
    let resp = client
        .get(format!("http://{addr}/api/v1/status"))
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.without_url()))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let msg = body["error"]["message"].as_str().unwrap_or("no details");
        bail!("HTTP {status}: {msg}");
    }
    Ok(resp.json().await?)
}

fn print(r: &StatusReport, addr: SocketAddr) {
    println!("voicectl is up ({})", r.state);
    let mut rows = vec![
        ("version", version_line(&r.version)),
        ("pid", r.pid.to_string()),
        ("listen", addr.to_string()),
        (
            "uptime",
            humantime::format_duration(Duration::from_secs(r.uptime_seconds)).to_string(),
        ),
        ("started_at", r.started_at.clone()),
        (
            "calls",
            format!("{} live, {} queued", r.calls.active, r.calls.queued),
        ),
        ("websockets", r.websockets.to_string()),
    ];
    if r.certificates.is_empty() {
        rows.push(("certificates", "none reported".into()));
    }
    for c in &r.certificates {
        rows.push((
            "certificate",
            format!(
                "{} expires {} ({} days)",
                c.domain, c.not_after, c.days_left
            ),
        ));
    }
    if r.engines.is_empty() {
        rows.push(("engines", "none reported".into()));
    }
    for e in &r.engines {
        rows.push(("engine", format!("{}: circuit {}", e.engine, e.circuit)));
    }
    output::fields(&rows);
}

fn version_line(server: &str) -> String {
    let cli = env!("CARGO_PKG_VERSION");
    if server == cli {
        server.to_owned()
    } else {
        format!("{server} (this CLI is {cli}: restart the service after an upgrade)")
    }
}

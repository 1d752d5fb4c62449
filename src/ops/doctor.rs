//! `voicectl doctor`: checks an install the way an operator would, each with a verdict and,
//! when something is off, the fix. Nothing here changes anything.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::fscheck;
use crate::config::{Config, TlsMode};
use crate::domain::layout::{ADMIN_KEY_FILE, RUNTIME_FILE, runtime_info};
use crate::store::DB_FILE;

/// The account the systemd unit runs as.
pub const SERVICE_USER: &str = "voicectl";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Ok,
            detail: detail.into(),
            hint: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Warn,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Fail,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// The config could not be loaded: the one check there is.
pub fn config_failure(error: &anyhow::Error) -> Check {
    Check::fail(
        "config",
        format!("{error:#}"),
        "fix the file (the message names the key and line), or run `voicectl init`",
    )
}

/// Runs every check against a loaded config.
pub async fn run(cfg: &Config) -> Vec<Check> {
    let mut out = vec![check_config(cfg)];
    let data = &cfg.server.data_dir;
    out.push(check_data_dir(data));
    out.push(check_writable(data));
    out.push(check_disk(data));
    out.push(check_server(data));
    out.extend(check_ports(cfg));
    out.push(check_dns(cfg).await);
    let (twilio, twilio_date) = check_twilio(cfg).await;
    out.push(twilio);
    out.push(check_clock(twilio_date));
    if let Some(c) = check_systemd_stop_timeout(cfg).await {
        out.push(c);
    }
    out.extend(check_pipeline(cfg).await);
    out
}

/// The pipeline's providers (SPEC §6): one cheap authenticated request each, for those the
/// `[pipeline]` lists name. Nothing when no pipeline is configured.
pub async fn check_pipeline(cfg: &Config) -> Vec<Check> {
    let Some(p) = &cfg.pipeline else {
        return Vec::new();
    };
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("voicectl-doctor/", env!("CARGO_PKG_VERSION")))
        .build()
    else {
        return vec![Check::fail(
            "pipeline",
            "cannot build an HTTP client",
            "report a bug",
        )];
    };
    // WebSocket endpoints answer REST on the same host.
    let http_base = |ws: &str| -> String {
        let u = ws
            .replacen("wss://", "https://", 1)
            .replacen("ws://", "http://", 1);
        match reqwest::Url::parse(&u) {
            Ok(mut u) => {
                u.set_path("");
                u.set_query(None);
                u.to_string().trim_end_matches('/').to_owned()
            }
            Err(_) => u,
        }
    };
    let mut out = Vec::new();
    let uses = |list: &[String], name: &str| list.iter().any(|x| x == name);
    if uses(&p.stt, "deepgram") || uses(&p.tts, "deepgram") {
        let url = format!("{}/v1/projects", http_base(&cfg.deepgram.stt_url));
        let req = client.get(&url).header(
            "authorization",
            format!("Token {}", cfg.deepgram.api_key.expose()),
        );
        out.push(provider_check("deepgram", "deepgram", "deepgram.api_key", req).await);
    }
    if uses(&p.tts, "elevenlabs") {
        let url = format!("{}/v1/user", http_base(&cfg.elevenlabs.api_base_url));
        let req = client
            .get(&url)
            .header("xi-api-key", cfg.elevenlabs.api_key.expose());
        out.push(provider_check("elevenlabs", "elevenlabs", "elevenlabs.api_key", req).await);
    }
    if uses(&p.tts, "openai") {
        let url = format!("{}/models", cfg.openai.api_base_url.trim_end_matches('/'));
        let req = client.get(&url).bearer_auth(cfg.openai.api_key.expose());
        out.push(provider_check("openai-speech", "openai", "openai.api_key", req).await);
    }
    for name in &p.llm {
        let Some(l) = cfg.llm.iter().find(|l| &l.name == name) else {
            continue;
        };
        let url = format!("{}/models", l.base_url.trim_end_matches('/'));
        let mut req = client.get(&url);
        if !l.api_key.is_empty() {
            req = req.bearer_auth(l.api_key.expose());
        }
        out.push(provider_check("llm", name, "the [[llm]] entry's api_key", req).await);
    }
    out
}

async fn provider_check(
    check: &'static str,
    who: &str,
    key: &str,
    req: reqwest::RequestBuilder,
) -> Check {
    match req.send().await {
        Ok(r) if r.status().is_success() => Check::ok(check, format!("{who}: key accepted")),
        Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Check::fail(
            check,
            format!("{who}: key refused (HTTP {})", r.status().as_u16()),
            format!("check {key}"),
        ),
        Ok(r) => Check::fail(
            check,
            format!("{who}: HTTP {}", r.status().as_u16()),
            "check the provider's base URL in the config",
        ),
        Err(e) => Check::fail(
            check,
            format!("{who}: cannot reach it: {}", error_chain(&e.without_url())),
            "check outbound HTTPS and DNS from this host, and the provider's URL in the config",
        ),
    }
}

fn check_config(cfg: &Config) -> Check {
    let Some(path) = &cfg.source else {
        return Check::ok("config", "built-in development settings (no file)");
    };
    let Ok(meta) = std::fs::metadata(path) else {
        return Check::ok("config", format!("{} is valid", path.display()));
    };
    let mode = meta.permissions().mode() & 0o777;
    let has_inline_secret = std::fs::read_to_string(path).is_ok_and(|t| {
        t.lines().any(|l| {
            let l = l.trim_start();
            ["auth_token", "api_key"].iter().any(|k| {
                l.strip_prefix(k)
                    .map(str::trim_start)
                    .and_then(|r| r.strip_prefix('='))
                    .is_some_and(|v| !matches!(v.trim(), "\"\"" | "''" | ""))
            })
        })
    });
    if mode & 0o004 != 0 && has_inline_secret {
        return Check::fail(
            "config",
            format!(
                "{} holds secrets and is readable by every user (mode {mode:04o})",
                path.display()
            ),
            format!(
                "chmod 0640 {} (and rotate the secrets it exposed)",
                path.display()
            ),
        );
    }
    if let Some((uid, gid)) = lookup_user(SERVICE_USER) {
        let readable = (meta.uid() == uid && mode & 0o400 != 0)
            || (meta.gid() == gid && mode & 0o040 != 0)
            || mode & 0o004 != 0;
        if !readable {
            return Check::fail(
                "config",
                format!(
                    "{} is valid but the {SERVICE_USER} user cannot read it (owner uid {}, group gid {}, mode {mode:04o})",
                    path.display(),
                    meta.uid(),
                    meta.gid()
                ),
                format!(
                    "chown root:{SERVICE_USER} {p} && chmod 0640 {p}",
                    p = path.display()
                ),
            );
        }
    }
    Check::ok(
        "config",
        format!("{} is valid (mode {mode:04o})", path.display()),
    )
}

fn check_data_dir(dir: &Path) -> Check {
    const NAME: &str = "data_dir";
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return Check::fail(
                NAME,
                format!("{} is not a directory", dir.display()),
                "point server.data_dir at a directory",
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::fail(
                NAME,
                format!("{} does not exist", dir.display()),
                "run `voicectl init` (or start the server once; it creates the directory)",
            );
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot inspect {}: {e}", dir.display()),
                "run doctor as root or as the voicectl user",
            );
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    let mut fatal = false;
    if mode & 0o077 != 0 {
        problems.push(format!("directory mode is {mode:04o}, not 0700"));
        fixes.push(format!("chmod 0700 {}", dir.display()));
    }
    for secret in [ADMIN_KEY_FILE, DB_FILE] {
        let p = dir.join(secret);
        if let Ok(m) = std::fs::metadata(&p) {
            let fm = m.permissions().mode() & 0o777;
            if fm & 0o077 != 0 {
                fatal = true;
                problems.push(format!(
                    "{secret} has mode {fm:04o}: others can read secrets"
                ));
                fixes.push(format!("chmod 0600 {}", p.display()));
            }
        }
    }
    // Files created by a command run as another user (typically root) lock the service out of
    // its own database.
    let owner = meta.uid();
    let foreign: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.metadata().is_ok_and(|m| m.uid() != owner))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let service = lookup_user(SERVICE_USER);
    if !foreign.is_empty() {
        fatal = true;
        problems.push(format!(
            "owned by another user than the directory (uid {owner}): {}",
            foreign.join(", ")
        ));
        let who = match service {
            Some(_) => format!("{SERVICE_USER}:{SERVICE_USER}"),
            None => owner.to_string(),
        };
        fixes.push(format!("chown -R {who} {}", dir.display()));
    } else if let Some((uid, _)) = service
        && owner != uid
        && dir == Path::new("/var/lib/voicectl")
    {
        problems.push(format!(
            "owned by uid {owner}, but the service runs as {SERVICE_USER} (uid {uid})"
        ));
        fixes.push(format!(
            "chown -R {SERVICE_USER}:{SERVICE_USER} {}",
            dir.display()
        ));
    }
    if problems.is_empty() {
        return Check::ok(
            NAME,
            format!("{} (mode {mode:04o}, secrets 0600)", dir.display()),
        );
    }
    let detail = format!("{}: {}", dir.display(), problems.join("; "));
    let hint = fixes.join(" && ");
    if fatal {
        Check::fail(NAME, detail, hint)
    } else {
        Check::warn(NAME, detail, hint)
    }
}

fn check_writable(dir: &Path) -> Check {
    const NAME: &str = "data_dir_writable";
    if !dir.is_dir() {
        return Check::fail(
            NAME,
            format!("{} is missing", dir.display()),
            "see data_dir above",
        );
    }
    match fscheck::probe_writable(dir) {
        Ok(()) => Check::ok(NAME, format!("{} accepts writes", dir.display())),
        Err(e) => Check::fail(
            NAME,
            format!("cannot write in {}: {e}", dir.display()),
            fscheck::write_hint(dir, &e),
        ),
    }
}

fn check_disk(dir: &Path) -> Check {
    const NAME: &str = "disk";
    let probe = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(Path::new("/"))
    };
    match fscheck::free_bytes(probe) {
        Err(e) => Check::warn(
            NAME,
            format!("cannot measure free space at {}: {e}", probe.display()),
            "check the mount",
        ),
        Ok(free) if free < fscheck::MIN_FREE_BYTES => Check::fail(
            NAME,
            format!(
                "{} free at {}; the server refuses to start below {}",
                fscheck::human_bytes(free),
                probe.display(),
                fscheck::human_bytes(fscheck::MIN_FREE_BYTES)
            ),
            "free disk space (journalctl --vacuum-size=200M, old backups) or grow the volume",
        ),
        Ok(free) if free < fscheck::LOW_FREE_BYTES => Check::warn(
            NAME,
            format!(
                "only {} free at {}",
                fscheck::human_bytes(free),
                probe.display()
            ),
            "free disk space or grow the volume before the database fills it",
        ),
        Ok(free) => Check::ok(
            NAME,
            format!("{} free at {}", fscheck::human_bytes(free), probe.display()),
        ),
    }
}

/// The pid of a running `voicectl serve` for this data dir, from its runtime file.
pub fn running_server(data_dir: &Path) -> Option<u32> {
    let info = runtime_info(data_dir)?;
    pid_alive(info.pid).then_some(info.pid)
}

pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn check_server(data_dir: &Path) -> Check {
    const NAME: &str = "server";
    match runtime_info(data_dir) {
        Some(info) if pid_alive(info.pid) => Check::ok(
            NAME,
            format!("running (pid {}, version {})", info.pid, info.version),
        ),
        Some(info) => Check::warn(
            NAME,
            format!(
                "not running; {} names pid {}, which is gone (a crash?)",
                RUNTIME_FILE, info.pid
            ),
            "journalctl -u voicectl -e shows why; systemctl start voicectl",
        ),
        None => Check::warn(
            NAME,
            "not running",
            "systemctl start voicectl (or voicectl serve)",
        ),
    }
}

fn check_ports(cfg: &Config) -> Vec<Check> {
    const NAME: &str = "ports";
    let running = running_server(&cfg.server.data_dir);
    let mut out = Vec::new();
    for (key, value) in [
        ("server.http_listen", &cfg.server.http_listen),
        ("server.https_listen", &cfg.server.https_listen),
        ("server.listen", &cfg.server.listen),
    ] {
        let Ok(addr) = value.parse::<SocketAddr>() else {
            continue;
        };
        if addr.port() == 0 {
            continue;
        }
        let what = format!("{addr} ({key})");
        match std::net::TcpListener::bind(addr) {
            Ok(_) => out.push(Check::ok(NAME, format!("{what} is free"))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                match running.filter(|pid| pid_listens_on(*pid, addr.port()) != Some(false)) {
                    Some(pid) => out.push(Check::ok(
                        NAME,
                        format!("{what} is in use by voicectl (pid {pid})"),
                    )),
                    None => out.push(Check::fail(
                        NAME,
                        format!("{what} is in use by another program"),
                        format!(
                            "find it with `ss -ltnp 'sport = :{}'`; stop it, or change {key}",
                            addr.port()
                        ),
                    )),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => out.push(Check::warn(
                NAME,
                format!("{what}: cannot test without privileges ({e})"),
                "run doctor as root; the systemd unit grants the service CAP_NET_BIND_SERVICE",
            )),
            Err(e) => out.push(Check::fail(
                NAME,
                format!("{what}: cannot bind: {e}"),
                format!("use an address of this host in {key}"),
            )),
        }
    }
    out
}

/// Whether `pid` holds a listening TCP socket on `port`: Some(answer), or None when /proc
/// cannot tell us (another user's process without root).
fn pid_listens_on(pid: u32, port: u16) -> Option<bool> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; inode is field 9.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let lport = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && lport == Some(port) {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.filter_map(Result::ok).any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref()))
    }))
}

async fn check_dns(cfg: &Config) -> Check {
    const NAME: &str = "dns";
    let domain = cfg.server.domain.clone();
    if domain.is_empty() {
        return Check::warn(
            NAME,
            "server.domain is empty",
            "set server.domain to the public host name",
        );
    }
    let lookup = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host(format!("{domain}:443")),
    )
    .await;
    let resolved: Vec<IpAddr> = match lookup {
        Ok(Ok(addrs)) => {
            let mut v: Vec<IpAddr> = addrs.map(|a| a.ip().to_canonical()).collect();
            v.sort();
            v.dedup();
            v
        }
        Ok(Err(e)) => {
            return dns_missing(cfg, &domain, &e.to_string());
        }
        Err(_) => return dns_missing(cfg, &domain, "lookup timed out after 5 s"),
    };
    let local = local_addresses();
    let shown = resolved
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if resolved.iter().any(|ip| local.contains(ip)) {
        Check::ok(NAME, format!("{domain} → {shown} (this host)"))
    } else {
        Check::warn(
            NAME,
            format!("{domain} → {shown}, which is not an address of this host"),
            "fine behind NAT (e.g. an EC2 Elastic IP) when that address forwards ports 80/443 \
             here; otherwise point the A/AAAA record at this server",
        )
    }
}

fn dns_missing(cfg: &Config, domain: &str, why: &str) -> Check {
    let detail = format!("{domain} does not resolve: {why}");
    let hint = "create an A (and/or AAAA) record for it pointing at this server's public address";
    if cfg.tls.mode == TlsMode::Acme {
        Check::fail(
            "dns",
            detail,
            format!("{hint}; ACME cannot issue a certificate without it"),
        )
    } else {
        Check::warn("dns", detail, hint)
    }
}

/// Every address on this host's interfaces.
fn local_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr whose family field says
            // which concrete struct it is.
            unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.insert(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.insert(IpAddr::from(sa.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Asks Twilio whether the credentials are good; also returns Twilio's clock (`Date`).
async fn check_twilio(cfg: &Config) -> (Check, Option<time::OffsetDateTime>) {
    const NAME: &str = "twilio";
    let t = &cfg.twilio;
    if t.account_sid.is_empty() || t.auth_token.is_empty() {
        return (
            Check::warn(
                NAME,
                "credentials not configured; no calls can be placed",
                "set twilio.account_sid and twilio.auth_token (or auth_token_file, or \
                 VOICECTL_TWILIO_AUTH_TOKEN) from https://console.twilio.com",
            ),
            None,
        );
    }
    let base = t.api_base_url.trim_end_matches('/');
    let url = format!("{base}/2010-04-01/Accounts/{}.json", t.account_sid);
    let client = match reqwest::Client::builder()
        // Our Twilio credentials never follow a redirect to another host.
        .redirect(super::outbound::provider_redirects())
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("voicectl-doctor/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return (
                Check::fail(
                    NAME,
                    format!("cannot build an HTTP client: {e}"),
                    "report a bug",
                ),
                None,
            );
        }
    };
    let resp = match client
        .get(&url)
        .basic_auth(&t.account_sid, Some(t.auth_token.expose()))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return (
                Check::fail(
                    NAME,
                    format!("cannot reach {base}: {}", error_chain(&e.without_url())),
                    "check outbound HTTPS and DNS from this host (and twilio.api_base_url)",
                ),
                None,
            );
        }
    };
    let date = resp
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date);
    let status = resp.status();
    let check = match status.as_u16() {
        200 => {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let state = body["status"].as_str().unwrap_or("unknown").to_owned();
            let name = body["friendly_name"].as_str().unwrap_or("").to_owned();
            if state == "active" {
                if t.from_number.is_empty() {
                    Check::warn(
                        NAME,
                        format!(
                            "credentials accepted (account {name:?} is active), but twilio.from_number is empty"
                        ),
                        "set twilio.from_number (a Twilio number, E.164) or give every tenant --from",
                    )
                } else {
                    Check::ok(
                        NAME,
                        format!("credentials accepted; account {name:?} is active"),
                    )
                }
            } else {
                Check::fail(
                    NAME,
                    format!("credentials accepted, but the account is {state}"),
                    "reactivate the account in the Twilio console",
                )
            }
        }
        401 => Check::fail(
            NAME,
            "Twilio rejected the credentials (401)",
            "copy the Account SID and Auth Token again from https://console.twilio.com into \
             twilio.account_sid / twilio.auth_token",
        ),
        404 => Check::fail(
            NAME,
            format!("Twilio knows no account {} (404)", t.account_sid),
            "check twilio.account_sid",
        ),
        s => Check::warn(
            NAME,
            format!("unexpected answer from Twilio: HTTP {s}"),
            "try again later; see https://status.twilio.com",
        ),
    };
    (check, date)
}

/// An error with its causes, `outer: inner: root`, as `{:#}` prints an anyhow chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

fn parse_http_date(s: &str) -> Option<time::OffsetDateTime> {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(s.trim(), &fmt)
        .ok()
        .map(|t| t.assume_utc())
}

fn check_clock(reference: Option<time::OffsetDateTime>) -> Check {
    const NAME: &str = "clock";
    let now = time::OffsetDateTime::now_utc();
    if now.year() < 2025 {
        return Check::fail(
            NAME,
            format!("the system clock says {now}"),
            "set the time (timedatectl set-ntp true) — TLS and ACME fail with a wrong clock",
        );
    }
    if let Some(r) = reference {
        let skew = (now - r).abs();
        let secs = skew.as_seconds_f64();
        if secs > 300.0 {
            return Check::fail(
                NAME,
                format!("{secs:.0} s off Twilio's clock"),
                "enable time sync: timedatectl set-ntp true (systemd-timesyncd) or install chrony",
            );
        }
        if secs > 30.0 {
            return Check::warn(
                NAME,
                format!("{secs:.0} s off Twilio's clock"),
                "enable time sync: timedatectl set-ntp true (systemd-timesyncd) or install chrony",
            );
        }
    }
    let synced = ntp_synchronized();
    let against = if reference.is_some() {
        "within 30 s of Twilio's clock"
    } else {
        "plausible"
    };
    match synced {
        Some(false) => Check::warn(
            NAME,
            format!("{against}, but not NTP-synchronized"),
            "timedatectl set-ntp true (systemd-timesyncd) or install chrony",
        ),
        _ => Check::ok(NAME, format!("{against}; NTP synchronized")),
    }
}

/// The kernel's own verdict (what `timedatectl` shows as "System clock synchronized").
fn ntp_synchronized() -> Option<bool> {
    // SAFETY: an all-zero timex with modes = 0 is a read-only query.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a valid, exclusively borrowed timex.
    let rc = unsafe { libc::ntp_adjtime(&mut tx) };
    if rc < 0 {
        return None;
    }
    Some(rc != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
}

/// With the unit installed, its stop timeout must outlast the drain.
async fn check_systemd_stop_timeout(cfg: &Config) -> Option<Check> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("systemctl")
            .args([
                "show",
                "voicectl.service",
                "-p",
                "LoadState",
                "-p",
                "TimeoutStopUSec",
            ])
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let prop = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
    };
    if prop("LoadState").as_deref() != Some("loaded") {
        return None;
    }
    let raw = prop("TimeoutStopUSec")?;
    let drain = cfg.server.drain_timeout.0;
    if raw == "infinity" {
        return Some(Check::ok("systemd", "TimeoutStopSec=infinity"));
    }
    let stop = humantime::parse_duration(&raw).ok()?;
    Some(if stop > drain {
        Check::ok(
            "systemd",
            format!(
                "TimeoutStopSec ({raw}) outlasts server.drain_timeout ({})",
                humantime::format_duration(drain)
            ),
        )
    } else {
        Check::fail(
            "systemd",
            format!(
                "TimeoutStopSec ({raw}) is not longer than server.drain_timeout ({}): systemd would kill live calls",
                humantime::format_duration(drain)
            ),
            "systemctl edit voicectl → [Service] TimeoutStopSec= at least 30s above drain_timeout",
        )
    })
}

/// uid and gid of a local account.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: all-zero is a valid passwd value; getpwnam_r fills it, pointing into `buf`.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is its real size.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Tue, 15 Nov 1994 08:12:31 GMT").unwrap();
        assert_eq!(t.unix_timestamp(), 784887151);
        assert!(parse_http_date("yesterday").is_none());
    }

    #[test]
    fn clock_skew_levels() {
        let now = time::OffsetDateTime::now_utc();
        assert_ne!(check_clock(Some(now)).level, Level::Fail);
        assert_eq!(
            check_clock(Some(now - time::Duration::minutes(10))).level,
            Level::Fail
        );
        assert_eq!(
            check_clock(Some(now + time::Duration::seconds(90))).level,
            Level::Warn
        );
    }

    #[test]
    fn root_exists_and_strangers_do_not() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no-such-user-voicectl-test"), None);
    }

    #[test]
    fn loopback_is_local() {
        assert!(local_addresses().contains(&IpAddr::from([127, 0, 0, 1])));
    }

    #[test]
    fn a_listening_socket_is_found_under_our_pid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(pid_listens_on(std::process::id(), port), Some(true));
        drop(l);
        assert_eq!(pid_listens_on(std::process::id(), port), Some(false));
    }
}

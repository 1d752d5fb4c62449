//! systemd's readiness protocol (sd_notify(3)) by hand: one datagram per state change to the
//! Unix socket named in `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
//! that variable — outside systemd, in tests, under `--dev` — every call is a no-op.
//!
//! Sends never block: a stuck or missing manager must not stall the server.
//!
//! Kept by hand rather than the `sd-notify` crate (0.5): it cannot address abstract sockets
//! (`@name`, which systemd hands out and a test here covers), and it opens a blocking socket
//! per message, which the dialer would then run on the reactor at every status update.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::time::Duration;

use crate::store::Store;

enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

struct Notifier {
    socket: UnixDatagram,
    target: Target,
}

fn notifier() -> Option<&'static Notifier> {
    static N: OnceLock<Option<Notifier>> = OnceLock::new();
    N.get_or_init(|| {
        let raw = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(raw.as_os_str());
        let target = match bytes.first() {
            Some(b'@') => Target::Abstract(bytes[1..].to_vec()),
            Some(b'/') => Target::Path(raw.clone().into()),
            _ => {
                tracing::warn!(
                    value = %raw.to_string_lossy(),
                    "NOTIFY_SOCKET is neither an absolute path nor @abstract; not notifying"
                );
                return None;
            }
        };
        match UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(socket) => Some(Notifier { socket, target }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the sd_notify socket; not notifying");
                None
            }
        }
    })
    .as_ref()
}

/// Whether a service manager is listening.
pub fn enabled() -> bool {
    notifier().is_some()
}

/// Sends `state` (newline-separated `KEY=value` assignments). Ok(false) when not under systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(n) = notifier() else {
        return Ok(false);
    };
    match &n.target {
        Target::Path(p) => n.socket.send_to(state.as_bytes(), p)?,
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            n.socket.send_to_addr(state.as_bytes(), &addr)?
        }
    };
    Ok(true)
}

fn send(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// The free-form status line `systemctl status` shows, e.g. "3 live calls, 0 queued".
pub fn notify_status(status: &str) {
    // One line: a newline would start a new assignment.
    send(&format!("STATUS={}", status.replace('\n', " ")));
}

/// Startup finished: config, database, listeners and certificates are all up.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", status.replace('\n', " ")));
}

/// Shutdown has begun (the drain).
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={}", status.replace('\n', " ")));
}

/// Keep-alive for `WatchdogSec=`.
pub fn watchdog() {
    send("WATCHDOG=1");
}

/// The watchdog timeout systemd expects pings within, if `WatchdogSec=` applies to us.
pub fn watchdog_timeout() -> Option<Duration> {
    notifier()?;
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    // WATCHDOG_PID, when set, names the one process the watchdog is meant for.
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Under `WatchdogSec=`, pings systemd every half timeout, but only while the runtime (this
/// task runs at all) and the database (a query answers within the interval) are healthy, so
/// systemd restarts a wedged server. Returns None when no watchdog is configured.
pub fn spawn_watchdog(store: Store) -> Option<tokio::task::JoinHandle<()>> {
    let timeout = watchdog_timeout()?;
    let every = timeout / 2;
    tracing::info!(
        timeout_ms = timeout.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match tokio::time::timeout(every, store.ping()).await {
                Ok(true) => watchdog(),
                Ok(false) => tracing::error!("database not answering; withholding watchdog ping"),
                Err(_) => tracing::error!("database check timed out; withholding watchdog ping"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_applies_only_to_the_named_pid() {
        assert_eq!(
            watchdog_from(Some("2000000"), None, 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_from(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_from(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
    }
}

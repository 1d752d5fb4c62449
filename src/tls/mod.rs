//! TLS certificates: ACME issuance and renewal, manual certificates, the live resolver the
//! HTTPS listener asks, and the status `voicectl cert status` shows.
//!
//! [`Tls`] is the handle everything shares. At start it serves the stored certificate, or a
//! self-signed fallback when there is none yet (listeners come up at once; readiness answers
//! 503 until a real certificate is in). [`Tls::spawn`] runs the renewal loop (ACME) or the
//! SIGHUP reload (manual). A failed issuance or reload never replaces what is being served.

pub mod acme;
pub mod cert;
pub mod resolver;
pub mod storage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AcmeChallenge, Config, TlsMode};
use crate::ops::lifecycle::Lifecycle;
use crate::ops::metrics::Metrics;
use acme::{AcmeError, FailureKind, now_secs};
use cert::{CertError, CertInfo, LoadedCert};
use resolver::CertResolver;
use storage::{StorageError, TlsStorage};

/// Even when nothing is due, look again this often (clock jumps, suspended VMs).
const CHECK_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Backoff after the first temporary failure; doubles per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// The least time between two automatic attempts.
const MIN_GAP_SECS: i64 = 10;
/// A rate-limited account waits at least this long (Let's Encrypt limits are hourly or weekly).
const RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS is off (tls.mode = \"off\")")]
    Off,
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("tls.{key} {path}: {reason}")]
    Manual {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Cert(#[from] CertError),
    #[error("{0}")]
    Acme(#[from] AcmeError),
}

/// What `cert status` shows; persisted to `data_dir/tls/status.json` on every change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TlsStatus {
    /// acme | manual
    pub mode: String,
    pub domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    /// The real certificate being served (None while the self-signed fallback is).
    pub certificate: Option<CertInfo>,
    pub serving_fallback: bool,
    /// Unix seconds: when renewal is due (ACME).
    pub renew_at: Option<i64>,
    /// Unix seconds: when the next attempt is scheduled after failures (ACME).
    pub next_attempt: Option<i64>,
    pub last_attempt: Option<i64>,
    pub last_success: Option<i64>,
    pub last_error: Option<String>,
    /// The last error cannot heal by retrying (config, a refused name); fix and `cert renew`.
    pub last_error_permanent: bool,
    pub consecutive_failures: u32,
    /// Unix seconds of this snapshot.
    pub updated_at: i64,
}

/// Outcome of [`Tls::renew`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenewOutcome {
    pub renewed: bool,
    pub message: String,
    pub status: TlsStatus,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Tls(Arc<Inner>);

struct Inner {
    mode: TlsMode,
    names: Vec<String>,
    directory_url: String,
    email: String,
    root_ca: String,
    challenge: AcmeChallenge,
    manual: Option<(PathBuf, PathBuf)>,
    storage: TlsStorage,
    resolver: Arc<CertResolver>,
    http_tokens: RwLock<HashMap<String, String>>,
    status: Mutex<TlsStatus>,
    metrics: Option<Arc<Metrics>>,
    /// One issuance at a time (the loop and `cert renew` share it).
    issuing: tokio::sync::Mutex<()>,
    /// Wakes the loop to recompute its schedule (a renewal done elsewhere, a SIGHUP).
    wake: Notify,
    /// Renewal happens this many seconds before the 2/3 point, so many boxes configured
    /// alike do not hit the CA in the same second.
    jitter_secs: Mutex<i64>,
    /// True once the certificate situation has settled at startup (a valid certificate, or
    /// the first issuance attempt finished either way).
    settled: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only by a panic elsewhere; the data is plain values and still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tls {
    /// Prepares storage (with a write probe) and loads what there is to serve: the stored
    /// ACME certificate, the manual files, or the self-signed fallback. Manual files that do
    /// not load fail here: there is nothing that would fix them by itself.
    pub fn new(config: &Config, metrics: Option<Arc<Metrics>>) -> Result<Tls, TlsError> {
        let tls = &config.tls;
        if tls.mode == TlsMode::Off {
            return Err(TlsError::Off);
        }
        let mut names = vec![config.server.domain.to_ascii_lowercase()];
        for d in &config.server.extra_domains {
            let d = d.to_ascii_lowercase();
            if !d.is_empty() && !names.contains(&d) {
                names.push(d);
            }
        }
        names.retain(|n| !n.is_empty());
        let storage = TlsStorage::new(&config.server.data_dir, &tls.acme_directory);
        storage.prepare(tls.mode == TlsMode::Acme)?;
        let mut status = TlsStatus {
            mode: match tls.mode {
                TlsMode::Acme => "acme",
                _ => "manual",
            }
            .into(),
            domains: names.clone(),
            ..Default::default()
        };
        let manual = (tls.mode == TlsMode::Manual)
            .then(|| (PathBuf::from(&tls.cert_file), PathBuf::from(&tls.key_file)));
        let (initial, fallback) = match &manual {
            Some((c, k)) => (load_manual(c, k)?, false),
            None => {
                status.directory = Some(tls.acme_directory.clone());
                status.challenge = Some(
                    match tls.challenge {
                        AcmeChallenge::Http01 => "http-01",
                        AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
                    }
                    .into(),
                );
                match load_stored(&storage, &names) {
                    Ok(c) => (c, false),
                    Err(reason) => {
                        if let Some(reason) = reason {
                            tracing::warn!(%reason, dir = %storage.ca_dir().display(),
                                "stored certificate not usable; serving a self-signed fallback until a new one is issued");
                            status.last_error = Some(format!("stored certificate: {reason}"));
                        }
                        (cert::self_signed(&names)?, true)
                    }
                }
            }
        };
        let settled = !fallback && initial.info.not_after > now_secs();
        let (settled_tx, _) = watch::channel(settled);
        let inner = Inner {
            mode: tls.mode,
            names,
            directory_url: tls.acme_directory.clone(),
            email: tls.acme_email.clone(),
            root_ca: tls.acme_root_ca.clone(),
            challenge: tls.challenge,
            manual,
            storage,
            resolver: Arc::new(CertResolver::new(initial.clone(), fallback)),
            http_tokens: RwLock::new(HashMap::new()),
            status: Mutex::new(status),
            metrics,
            issuing: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            jitter_secs: Mutex::new(0),
            settled: settled_tx,
        };
        let tls = Tls(Arc::new(inner));
        if !fallback {
            tls.installed(&initial.info);
        } else {
            tls.save_status();
        }
        Ok(tls)
    }

    pub fn resolver(&self) -> Arc<CertResolver> {
        self.0.resolver.clone()
    }

    pub fn challenge(&self) -> AcmeChallenge {
        self.0.challenge
    }

    pub fn mode(&self) -> TlsMode {
        self.0.mode
    }

    pub fn names(&self) -> &[String] {
        &self.0.names
    }

    /// The HTTP-01 answer for `token`, while an order runs.
    pub fn http_token(&self, token: &str) -> Option<String> {
        self.0
            .http_tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// A real (not fallback), unexpired certificate is being served: readiness.
    pub fn has_valid_cert(&self) -> bool {
        let a = self.0.resolver.active();
        !a.fallback && a.info.not_after > now_secs()
    }

    pub fn status(&self) -> TlsStatus {
        let mut s = lock(&self.0.status).clone();
        s.updated_at = now_secs();
        s
    }

    /// Resolves once startup's certificate situation is settled (see `Inner::settled`).
    pub async fn settled(&self) {
        let mut rx = self.0.settled.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Starts the background work: renewal (ACME) or reload on SIGHUP (manual). Ends when
    /// `stop` is cancelled.
    pub fn spawn(&self, lifecycle: &Lifecycle, stop: CancellationToken) {
        let me = self.clone();
        let reloads = lifecycle.reloads();
        tokio::spawn(async move {
            match me.0.mode {
                TlsMode::Manual => me.manual_loop(stop, reloads).await,
                _ => me.acme_loop(stop, reloads).await,
            }
        });
    }

    async fn manual_loop(&self, stop: CancellationToken, mut reloads: watch::Receiver<u64>) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let _ = self.reload_manual();
                }
            }
        }
    }

    /// Re-reads the manual certificate files; a bad file keeps the old certificate.
    pub fn reload_manual(&self) -> Result<(), TlsError> {
        let Some((c, k)) = &self.0.manual else {
            return Ok(());
        };
        match load_manual(c, k) {
            Ok(loaded) => {
                let info = loaded.info.clone();
                // Installed before it is logged: whoever reads the log may rely on it.
                self.0.resolver.install(loaded, false);
                tracing::info!(names = ?info.names, serial = %info.serial,
                    not_after = info.not_after, "reloaded manual certificate");
                {
                    let mut s = lock(&self.0.status);
                    s.last_error = None;
                    s.last_success = Some(now_secs());
                }
                self.installed(&info);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate reload failed; still serving the previous certificate");
                {
                    let mut s = lock(&self.0.status);
                    s.last_error = Some(e.to_string());
                    s.last_attempt = Some(now_secs());
                }
                self.save_status();
                Err(e)
            }
        }
    }

    /// When the next issuance attempt is due (Unix seconds).
    fn next_due(&self) -> i64 {
        let s = lock(&self.0.status);
        if s.consecutive_failures > 0
            && let Some(at) = s.next_attempt
        {
            return at;
        }
        // Never twice within MIN_GAP, whatever the certificate says (a CA handing out
        // certificates already inside their renewal window must not cause a tight loop).
        let floor = s.last_attempt.map_or(0, |t| t + MIN_GAP_SECS);
        drop(s);
        let a = self.0.resolver.active();
        let due = if a.fallback || !a.info.covers(&self.0.names) {
            now_secs()
        } else {
            a.info.renew_at() - *lock(&self.0.jitter_secs)
        };
        due.max(floor)
    }

    async fn acme_loop(&self, stop: CancellationToken, mut reloads: watch::Receiver<u64>) {
        loop {
            let due = self.next_due();
            let now = now_secs();
            if now >= due {
                let _ = self.attempt(false).await;
                continue;
            }
            let wait =
                Duration::from_secs(u64::try_from(due - now).unwrap_or(0)).min(CHECK_INTERVAL);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.0.wake.notified() => {}
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // SIGHUP is the operator saying "look again now": forget the backoff.
                    let mut s = lock(&self.0.status);
                    if s.consecutive_failures > 0 {
                        s.next_attempt = Some(now_secs());
                    }
                }
            }
        }
    }

    /// `cert renew`: manual mode reloads the files; ACME issues now when due, or always with
    /// `force`.
    pub async fn renew(&self, force: bool) -> Result<RenewOutcome, TlsError> {
        match self.0.mode {
            TlsMode::Off => Err(TlsError::Off),
            TlsMode::Manual => {
                self.reload_manual()?;
                Ok(RenewOutcome {
                    renewed: true,
                    message: "reloaded tls.cert_file and tls.key_file".into(),
                    status: self.status(),
                })
            }
            TlsMode::Acme => {
                if !force && now_secs() < self.next_due() && self.has_valid_cert() {
                    return Ok(RenewOutcome {
                        renewed: false,
                        message: "not due yet (use --force to renew anyway)".into(),
                        status: self.status(),
                    });
                }
                let r = self.attempt(true).await;
                self.0.wake.notify_one();
                r?;
                Ok(RenewOutcome {
                    renewed: true,
                    message: "issued a new certificate".into(),
                    status: self.status(),
                })
            }
        }
    }

    /// One issuance; success swaps the certificate in, failure schedules the retry.
    async fn attempt(&self, by_operator: bool) -> Result<(), AcmeError> {
        let _one = self.0.issuing.lock().await;
        let started = now_secs();
        lock(&self.0.status).last_attempt = Some(started);
        tracing::info!(names = ?self.0.names, directory = %self.0.directory_url, by_operator,
            "requesting a certificate");
        let req = acme::Request {
            directory_url: &self.0.directory_url,
            email: &self.0.email,
            root_ca: &self.0.root_ca,
            challenge: self.0.challenge,
            names: &self.0.names,
            storage: &self.0.storage,
            http_tokens: &self.0.http_tokens,
            resolver: &self.0.resolver,
        };
        let result = acme::issue(&req).await;
        match result {
            Ok(issued) => {
                let info = issued.cert.info.clone();
                self.0.resolver.install(issued.cert, false);
                tracing::info!(names = ?info.names, serial = %info.serial, issuer = %info.issuer,
                    not_after = info.not_after, secs = now_secs() - started, "certificate issued and installed");
                {
                    let mut s = lock(&self.0.status);
                    s.last_success = Some(now_secs());
                    s.last_error = None;
                    s.last_error_permanent = false;
                    s.consecutive_failures = 0;
                    s.next_attempt = None;
                }
                self.installed(&info);
                self.0.settled.send_replace(true);
                Ok(())
            }
            Err(e) => {
                let kind = e.kind();
                let failures = {
                    let mut s = lock(&self.0.status);
                    s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                    s.consecutive_failures
                };
                let wait = backoff(failures, kind, e.retry_after());
                let next = now_secs() + i64::try_from(wait.as_secs()).unwrap_or(i64::MAX / 2);
                {
                    let mut s = lock(&self.0.status);
                    s.last_error = Some(e.to_string());
                    s.last_error_permanent = kind == FailureKind::Permanent;
                    s.next_attempt = Some(next);
                }
                let still = if self.has_valid_cert() {
                    "still serving the current certificate"
                } else {
                    "serving the self-signed fallback"
                };
                if kind == FailureKind::Permanent {
                    tracing::error!(error = %e, failures, retry_in_secs = wait.as_secs(),
                        "certificate issuance failed and will not succeed unchanged; fix the cause, then `voicectl cert renew`; {still}");
                } else {
                    tracing::warn!(error = %e, kind = ?kind, failures, retry_in_secs = wait.as_secs(),
                        "certificate issuance failed; will retry; {still}");
                }
                self.save_status();
                self.0.settled.send_replace(true);
                Err(e)
            }
        }
    }

    /// Bookkeeping after a real certificate went live: status, metrics, next renewal.
    fn installed(&self, info: &CertInfo) {
        // Up to 1/50 of the lifetime (at most 30 min) earlier than the 2/3 point.
        let max_jitter = (info.lifetime_secs() / 50).min(1800);
        let jitter = if max_jitter > 0 {
            rand::random_range(0..=max_jitter)
        } else {
            0
        };
        *lock(&self.0.jitter_secs) = jitter;
        {
            let mut s = lock(&self.0.status);
            s.certificate = Some(info.clone());
            s.serving_fallback = false;
            s.renew_at = (self.0.mode == TlsMode::Acme).then(|| info.renew_at() - jitter);
        }
        if let Some(m) = &self.0.metrics {
            for n in &info.names {
                m.certificate_expiry.with(&[n]).set(info.not_after);
            }
        }
        self.save_status();
    }

    fn save_status(&self) {
        let mut s = lock(&self.0.status).clone();
        s.serving_fallback = self.0.resolver.active().fallback;
        s.updated_at = now_secs();
        match serde_json::to_vec_pretty(&s) {
            Ok(json) => {
                if let Err(e) = self.0.storage.save_status(&json) {
                    tracing::warn!(error = %e, "cannot write the TLS status file");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the TLS status"),
        }
    }
}

fn backoff(failures: u32, kind: FailureKind, retry_after: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let doubling = FIRST_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF);
    let base = match kind {
        FailureKind::Permanent => MAX_BACKOFF,
        FailureKind::RateLimited => doubling.max(RATE_LIMIT_BACKOFF),
        FailureKind::Temporary => doubling,
    };
    // The CA's own Retry-After wins when it asks for longer (capped at a day).
    base.max(
        retry_after
            .unwrap_or_default()
            .min(Duration::from_secs(86_400)),
    )
}

fn load_manual(cert: &std::path::Path, key: &std::path::Path) -> Result<LoadedCert, TlsError> {
    let read = |k: &'static str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| TlsError::Manual {
            key: k,
            path: p.to_owned(),
            reason: e.to_string(),
        })
    };
    let chain = read("cert_file", cert)?;
    let key_pem = read("key_file", key)?;
    cert::load_pem(&chain, &key_pem).map_err(|e| TlsError::Manual {
        key: "cert_file",
        path: cert.to_owned(),
        reason: e.to_string(),
    })
}

/// The stored ACME certificate if it is usable for `names`: Err(None) when there is none,
/// Err(Some(reason)) when there is one we cannot use.
fn load_stored(storage: &TlsStorage, names: &[String]) -> Result<LoadedCert, Option<String>> {
    let (chain, key) = match storage.load_cert() {
        Ok(Some(pair)) => pair,
        Ok(None) => return Err(None),
        Err(e) => return Err(Some(e.to_string())),
    };
    let loaded = cert::load_pem(&chain, &key).map_err(|e| Some(e.to_string()))?;
    if loaded.info.not_after <= now_secs() {
        return Err(Some("it has expired".into()));
    }
    if !loaded.info.covers(names) {
        return Err(Some(format!(
            "it names {:?}, the config wants {:?}",
            loaded.info.names, names
        )));
    }
    Ok(loaded)
}

/// `cert status` without a running server: the status file if there is one, else what the
/// stored (or manual) certificate says.
pub fn offline_status(config: &Config) -> Result<TlsStatus, TlsError> {
    if config.tls.mode == TlsMode::Off {
        return Err(TlsError::Off);
    }
    let storage = TlsStorage::new(&config.server.data_dir, &config.tls.acme_directory);
    let mode = if config.tls.mode == TlsMode::Acme {
        "acme"
    } else {
        "manual"
    };
    let directory = (config.tls.mode == TlsMode::Acme).then(|| config.tls.acme_directory.clone());
    // The file describes the config the server last ran with; after a switch (manual to
    // ACME, staging to production) it is stale and the certificate on disk speaks instead.
    if let Ok(text) = std::fs::read(storage.status_path())
        && let Ok(s) = serde_json::from_slice::<TlsStatus>(&text)
        && s.mode == mode
        && s.directory == directory
    {
        return Ok(s);
    }
    let mut s = TlsStatus {
        mode: mode.into(),
        domains: std::iter::once(config.server.domain.clone())
            .chain(config.server.extra_domains.iter().cloned())
            .collect(),
        serving_fallback: true,
        updated_at: now_secs(),
        ..Default::default()
    };
    let loaded = match config.tls.mode {
        TlsMode::Manual => load_manual(
            std::path::Path::new(&config.tls.cert_file),
            std::path::Path::new(&config.tls.key_file),
        ),
        _ => {
            s.directory = Some(config.tls.acme_directory.clone());
            match storage.load_cert()? {
                Some((c, k)) => cert::load_pem(&c, &k).map_err(TlsError::from),
                None => {
                    s.last_error = Some("no certificate issued yet".into());
                    return Ok(s);
                }
            }
        }
    };
    match loaded {
        Ok(c) => {
            s.renew_at = (config.tls.mode == TlsMode::Acme).then(|| c.info.renew_at());
            s.certificate = Some(c.info);
            s.serving_fallback = false;
        }
        Err(e) => s.last_error = Some(e.to_string()),
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_honours_the_ca() {
        let t = FailureKind::Temporary;
        assert_eq!(backoff(1, t, None), Duration::from_secs(60));
        assert_eq!(backoff(2, t, None), Duration::from_secs(120));
        assert_eq!(backoff(30, t, None), MAX_BACKOFF);
        assert_eq!(backoff(1, FailureKind::Permanent, None), MAX_BACKOFF);
        assert_eq!(
            backoff(1, FailureKind::RateLimited, None),
            RATE_LIMIT_BACKOFF
        );
        assert_eq!(
            backoff(1, t, Some(Duration::from_secs(900))),
            Duration::from_secs(900)
        );
        assert_eq!(
            backoff(1, t, Some(Duration::from_secs(9_999_999))),
            Duration::from_secs(86_400)
        );
    }
}

//! `voicectl serve`: open the store, bind listeners, serve until SIGTERM/SIGINT, drain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::api::{self, AppState};

pub mod reload;
use crate::calls::Calls;
use crate::config::{Config, TlsMode};
use crate::edge;
use crate::ops;
use crate::store::{self, Store, keys, tenants};
use tokio_util::sync::CancellationToken;

pub use crate::domain::layout::{ADMIN_KEY_FILE, RUNTIME_FILE, RuntimeInfo, runtime_info};

/// Makes sure an admin credential exists; if a new one is minted, its secret is written to
/// `data_dir/admin.key` (0600) and returned so the caller can show it once.
pub fn ensure_admin_key(
    store: &Store,
    data_dir: &Path,
) -> anyhow::Result<Option<(PathBuf, String)>> {
    let path = data_dir.join(ADMIN_KEY_FILE);
    let have = store.blocking(|c| keys::admin_key_count(c))?;
    if have > 0 && path.exists() {
        return Ok(None);
    }
    let created = store.blocking(|c| keys::create(c, None, "admin", None))?;
    store::write_private_file(&path, format!("{}\n", created.key).as_bytes())?;
    Ok(Some((path, created.key)))
}

/// With simulated telephony and no tenants yet, a `demo` tenant lets `voicectl call` work at
/// once (the admin key may omit the tenant when there is exactly one).
fn ensure_demo_tenant(store: &Store) -> anyhow::Result<()> {
    let empty = store.blocking(|c| Ok(tenants::list(c)?.is_empty()))?;
    if empty {
        store.blocking(|c| {
            tenants::create(
                c,
                tenants::TenantPatch {
                    name: Some("demo".into()),
                    company: Some("voicectl demo".into()),
                    numbers: Some(vec!["+15005550100".into()]),
                    ..Default::default()
                },
            )
        })?;
        tracing::info!("created tenant \"demo\" (number +15005550100) for the simulator");
    }
    Ok(())
}

pub async fn serve(mut config: Config) -> anyhow::Result<()> {
    // First of all: from here on SIGTERM/SIGINT request a stop instead of killing us mid-way.
    let lifecycle = ops::lifecycle::Lifecycle::install()?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting");
    ops::sdnotify::notify_status("starting");
    let data_dir = config.server.data_dir.clone();
    let tls_on = config.tls.mode != TlsMode::Off;
    if !tls_on && config.server.listen.is_empty() {
        bail!(
            "server.listen is empty: with tls.mode = \"off\" the plain-HTTP listener is required"
        );
    }
    store::ensure_private_dir(&data_dir)?;
    // A full disk or read-only mount stops us here, before anything is created.
    ops::fscheck::preflight(&data_dir)?;
    let _lock = store::lock_data_dir(&data_dir)?;
    let store = Store::open(&data_dir).context("opening the database")?;
    if let Some((path, _)) = ensure_admin_key(&store, &data_dir)? {
        tracing::info!(path = %path.display(), "created admin API key (the file holds the secret)");
    }
    if config.twilio.simulate {
        ensure_demo_tenant(&store)?;
    }

    // Every listener is bound before anything runs: a port in use stops startup here.
    let plain = bind(&config.server.listen, "server.listen").await?;
    let (https, http) = if tls_on {
        let https = bind(&config.server.https_listen, "server.https_listen").await?;
        let http = bind(&config.server.http_listen, "server.http_listen").await?;
        (https, http)
    } else {
        (None, None)
    };
    let plain_addr = plain.as_ref().map(TcpListener::local_addr).transpose()?;
    let https_addr = https.as_ref().map(TcpListener::local_addr).transpose()?;
    let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let Some(addr) = plain_addr.or(https_addr) else {
        bail!("no listener configured (server.listen or server.https_listen)");
    };
    if config.tls.mode == TlsMode::Off && config.server.public_url.is_empty() {
        // With an ephemeral port (`listen = "127.0.0.1:0"`) only now is the URL known.
        config.server.public_url = format!("http://{addr}");
    }
    // Dev and demos: Twilio is replaced by the built-in simulator, in this process.
    let _simulator = if config.twilio.simulate {
        let mut sim_cfg = twilio_sim::SimConfig::new(
            config.twilio.account_sid.clone(),
            config.twilio.auth_token.expose(),
        );
        sim_cfg.timing = twilio_sim::Timing::realistic();
        // Numbers ending 0486/0487/0404/0666/0123 play busy/no-answer/failed/machine/keys (README).
        sim_cfg.number_conventions = true;
        let sim = twilio_sim::start(sim_cfg)
            .await
            .context("starting the Twilio simulator")?;
        config.twilio.api_base_url = sim.base_url();
        tracing::warn!(
            api_base_url = %config.twilio.api_base_url,
            "twilio.simulate is on: calls go to the built-in simulator, not to Twilio"
        );
        Some(sim)
    } else {
        None
    };
    let config = Arc::new(config);
    let runtime = RuntimeInfo {
        pid: std::process::id(),
        listen: plain_addr,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    store::write_private_file(
        &data_dir.join(RUNTIME_FILE),
        serde_json::to_string(&runtime)?.as_bytes(),
    )?;

    let shutdown = CancellationToken::new();
    let manager = Calls::new(store, config.clone(), shutdown.clone())?;
    manager
        .recover()
        .await
        .context("closing calls interrupted by the last stop")?;
    manager.spawn_workers();
    // Browser calls are an extra: a port in use must not keep the phone path down.
    if let Err(e) = manager.start_webrtc().await {
        tracing::error!(error = %e, "WebRTC endpoint not started; browser calls are unavailable");
    }
    // TLS: the stored certificate (or a self-signed stand-in) is served from the first
    // handshake; issuance runs in the background once the listeners are up.
    let tls = if tls_on {
        Some(crate::tls::Tls::new(&config, Some(manager.metrics())).context("setting up TLS")?)
    } else {
        None
    };
    let state = AppState::with_manager(manager);
    let _reloader = reload::spawn(lifecycle.reloads(), state.clone());
    if let Some(t) = &tls {
        state.set_tls(t.clone());
    }
    let app = api::app(state.clone());

    let stop_listeners = CancellationToken::new();
    let gate = edge::Gate::new(&config, state.ops().metrics().clone());
    tracing::info!(
        max_connections = gate.max_connections(),
        max_connections_per_ip = config.limits.max_connections_per_ip,
        "connection limits"
    );
    let mut listeners = Vec::new();
    if let Some(l) = plain {
        listeners.push(edge::spawn_plain(
            l,
            app.clone(),
            gate.clone(),
            stop_listeners.clone(),
        ));
    }
    if let (Some(tls), Some(l)) = (&tls, https) {
        let tls_config = edge::server_config(tls).context("building the TLS configuration")?;
        listeners.push(edge::spawn_https(
            l,
            app.clone(),
            tls_config,
            gate.clone(),
            stop_listeners.clone(),
        ));
        if let Some(h) = http {
            let base = edge::redirect_base(&config, https_addr.map(|a| a.port()));
            listeners.push(edge::spawn_http(
                h,
                tls.clone(),
                base,
                gate.clone(),
                stop_listeners.clone(),
            ));
        }
        tls.spawn(&lifecycle, lifecycle.stop_token());
        // READY waits for the certificate to settle (a valid one, or the first issuance
        // attempt over either way), but not forever: a CA that is down must not keep the
        // listeners, and with them HTTP-01, from being announced.
        let _ = lifecycle
            .unless_stopped(tokio::time::timeout(FIRST_CERT_WAIT, tls.settled()))
            .await;
    }
    tracing::info!(%addr, https = ?https_addr, http = ?http_addr, public_url = %config.public_url(),
        version = env!("CARGO_PKG_VERSION"), "listening");

    // READY=1 only after every listener (and, with TLS, the certificate) is up: keep this
    // after them. A stop requested during startup ends here, cleanly, without READY.
    if lifecycle.stop_requested() {
        stop_listeners.cancel();
        for l in listeners {
            let _ = l.await;
        }
        let _ = std::fs::remove_file(data_dir.join(RUNTIME_FILE));
        tracing::info!("stop requested during startup; exiting before ready");
        return Ok(());
    }
    ops::sdnotify::ready(&format!("serving on {addr}; 0 live calls, 0 queued"));
    let _watchdog = ops::sdnotify::spawn_watchdog(state.store().clone());

    let drain_timeout = config.server.drain_timeout.0;
    let force = lifecycle.force_token();
    lifecycle.stopped().await;
    ops::sdnotify::stopping("draining");
    // Readiness answers 503 from here on; no new calls are dialed. The listeners keep
    // accepting while live calls finish (their media streams are connections too).
    state.set_draining();
    tracing::info!("shutdown requested; draining");
    state.calls().drain(drain_timeout, force).await;
    tracing::info!("drained");
    stop_listeners.cancel();
    for l in listeners {
        if let Err(e) = l.await {
            tracing::warn!(error = %e, "a listener task failed");
        }
    }
    shutdown.cancel();
    let _ = std::fs::remove_file(data_dir.join(RUNTIME_FILE));
    tracing::info!("stopped");
    Ok(())
}

/// How long startup waits for the first certificate before announcing READY anyway.
const FIRST_CERT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Binds `addr` (None when it is empty: that listener is off).
async fn bind(addr: &str, key: &str) -> anyhow::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key})"))?;
    Ok(Some(l))
}

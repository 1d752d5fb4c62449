//! `voicectl cert status` and `voicectl cert renew [--force]`.
//!
//! `status` reads what the server persisted (`data_dir/tls/status.json`) or, failing that,
//! the stored certificate itself, so it works whether or not the server runs. `renew` asks a
//! running server (admin API over its local plain listener); with no server running it does
//! the ACME issuance itself, answering the challenge on the configured port.

use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::client::LocalServer;
use super::{CertCmd, Ctx, RenewArgs, output};
use crate::config::{Config, TlsMode};
use crate::domain::layout::runtime_info;
use crate::ops::doctor::pid_alive;
use crate::tls::{self, RenewOutcome, TlsStatus};

pub fn run(ctx: &Ctx, cmd: CertCmd) -> anyhow::Result<ExitCode> {
    let cfg = ctx.load_config()?;
    if cfg.tls.mode == TlsMode::Off {
        if ctx.json {
            output::json(&json!({"mode": "off"}))?;
        } else {
            println!("TLS is off (tls.mode = \"off\"): no certificates to show or renew");
        }
        return Ok(ExitCode::SUCCESS);
    }
    match cmd {
        CertCmd::Status => status(ctx, &cfg),
        CertCmd::Renew(args) => renew(ctx, &cfg, &args),
    }
}

fn status(ctx: &Ctx, cfg: &Config) -> anyhow::Result<ExitCode> {
    let s = tls::offline_status(cfg)?;
    if ctx.json {
        output::json(&with_days_left(&s)?)?;
    } else {
        print_status(&s);
    }
    Ok(ExitCode::SUCCESS)
}

/// The status plus `days_left`, for scripts that alert on expiry.
fn with_days_left(s: &TlsStatus) -> anyhow::Result<Value> {
    let mut v = serde_json::to_value(s)?;
    if let Some(c) = &s.certificate {
        v["days_left"] = json!((c.not_after - tls::acme::now_secs()).div_euclid(86_400));
    }
    Ok(v)
}

fn when(secs: Option<i64>) -> String {
    secs.map_or_else(
        || "-".into(),
        |s| crate::domain::timefmt::rfc3339(s.saturating_mul(1000)),
    )
}

fn print_status(s: &TlsStatus) {
    let mut rows: Vec<(&str, String)> = Vec::new();
    let mode = match &s.challenge {
        Some(c) => format!("{} ({c})", s.mode),
        None => s.mode.clone(),
    };
    rows.push(("mode", mode));
    if let Some(d) = &s.directory {
        rows.push(("directory", d.clone()));
    }
    rows.push(("domains", s.domains.join(", ")));
    match &s.certificate {
        Some(c) => {
            let days = (c.not_after - tls::acme::now_secs()).div_euclid(86_400);
            rows.push(("names", c.names.join(", ")));
            rows.push(("issuer", c.issuer.clone()));
            rows.push(("serial", c.serial.clone()));
            rows.push(("not_before", when(Some(c.not_before))));
            rows.push((
                "not_after",
                format!("{} ({days} days left)", when(Some(c.not_after))),
            ));
        }
        None => rows.push((
            "certificate",
            "none yet (serving a self-signed fallback)".into(),
        )),
    }
    if s.renew_at.is_some() {
        rows.push(("renew_at", when(s.renew_at)));
    }
    rows.push(("last_success", when(s.last_success)));
    if let Some(e) = &s.last_error {
        let hint = if s.last_error_permanent {
            " (will not heal by retrying: fix the cause, then `voicectl cert renew`)"
        } else {
            ""
        };
        rows.push(("last_error", format!("{e}{hint}")));
        rows.push(("failures", s.consecutive_failures.to_string()));
        if s.next_attempt.is_some() {
            rows.push(("next_attempt", when(s.next_attempt)));
        }
    }
    output::fields(&rows);
}

fn renew(ctx: &Ctx, cfg: &Config, args: &RenewArgs) -> anyhow::Result<ExitCode> {
    let running = runtime_info(&cfg.server.data_dir).is_some_and(|i| pid_alive(i.pid));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome: RenewOutcome = if running {
        let server = LocalServer::connect(cfg)?;
        let v = rt.block_on(server.post("/api/v1/tls/renew", &json!({"force": args.force})))?;
        serde_json::from_value(v).context("unexpected answer from the server")?
    } else {
        super::install_crypto_provider();
        rt.block_on(renew_offline(cfg, args.force))?
    };
    if ctx.json {
        let mut v = serde_json::to_value(&outcome)?;
        v["status"] = with_days_left(&outcome.status)?;
        output::json(&v)?;
    } else {
        println!("{}", outcome.message);
        print_status(&outcome.status);
    }
    Ok(ExitCode::SUCCESS)
}

/// No server running: hold the data-dir lock (so none starts meanwhile), answer the
/// challenge on the configured listener, issue, store. The next `serve` picks it up.
async fn renew_offline(cfg: &Config, force: bool) -> anyhow::Result<RenewOutcome> {
    crate::store::ensure_private_dir(&cfg.server.data_dir)?;
    let _lock = crate::store::lock_data_dir(&cfg.server.data_dir)?;
    let tls = tls::Tls::new(cfg, None)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let gate = crate::edge::Gate::new(
        cfg,
        std::sync::Arc::new(crate::ops::metrics::Metrics::new()),
    );
    let mut tasks = Vec::new();
    if cfg.tls.mode == TlsMode::Acme {
        match cfg.tls.challenge {
            crate::config::AcmeChallenge::Http01 => {
                let l = tokio::net::TcpListener::bind(&cfg.server.http_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} (server.http_listen) to answer HTTP-01",
                            cfg.server.http_listen
                        )
                    })?;
                let base = crate::edge::redirect_base(cfg, None);
                tasks.push(crate::edge::spawn_http(
                    l,
                    tls.clone(),
                    base,
                    gate.clone(),
                    stop.clone(),
                ));
            }
            crate::config::AcmeChallenge::TlsAlpn01 => {
                let l = tokio::net::TcpListener::bind(&cfg.server.https_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} (server.https_listen) to answer TLS-ALPN-01",
                            cfg.server.https_listen
                        )
                    })?;
                let app = axum::Router::new();
                let tls_config = crate::edge::server_config(&tls)?;
                tasks.push(crate::edge::spawn_https(
                    l,
                    app,
                    tls_config,
                    gate.clone(),
                    stop.clone(),
                ));
            }
        }
    }
    let result = tls.renew(force).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    match result {
        Ok(o) => Ok(o),
        Err(e) => bail!("certificate renewal failed: {e}"),
    }
}

//! `voicectl open [--tenant T]`: a one-time dashboard login link. Like `tenant`/`key`, it
//! works straight on the database (whoever can read it is the operator), so it needs no key
//! and works before the server is started.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::Ctx;
use super::admin::{cli_err, open_store};
use crate::config::{Config, TlsMode};
use crate::domain::layout::runtime_info;
use crate::domain::timefmt::rfc3339;
use crate::store::sessions;

#[derive(Args, Debug)]
pub struct OpenArgs {
    /// Log in as this tenant (sees only its calls) instead of the admin
    #[arg(long)]
    tenant: Option<String>,
}

/// Where a browser reaches the dashboard: the running server's plain listener when TLS is off
/// (dev, or a box behind a load balancer), else the public URL.
fn base_url(cfg: &Config) -> String {
    if cfg.tls.mode == TlsMode::Off
        && cfg.server.public_url.is_empty()
        && let Some(addr) = runtime_info(&cfg.server.data_dir).and_then(|i| i.listen)
    {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else if addr.is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        return format!("http://{host}:{}", addr.port());
    }
    cfg.public_url()
}

pub fn run(ctx: &Ctx, args: OpenArgs) -> anyhow::Result<ExitCode> {
    let cfg = ctx.load_config()?;
    let store = open_store(ctx)?;
    let tenant = args.tenant.clone();
    let (token, expires_at) = store
        .blocking(move |c| sessions::create_login(c, tenant.as_deref()))
        .map_err(cli_err)?;
    let url = format!("{}/ui/login?token={token}", base_url(&cfg));
    if ctx.json {
        super::output::json(&json!({
            "url": url,
            "tenant": args.tenant,
            "expires_at": rfc3339(expires_at),
        }))?;
    } else {
        let who = args
            .tenant
            .as_deref()
            .map_or("the admin".to_owned(), |t| format!("tenant {t}"));
        println!("Open this link to log in as {who} (valid 10 minutes, once):\n\n  {url}\n");
    }
    Ok(ExitCode::SUCCESS)
}

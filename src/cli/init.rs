//! `voicectl init`: config from the template, data dir, database, admin credential.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use super::{Ctx, DEFAULT_CONFIG};
use crate::config::{Config, TEMPLATE, is_hostname};
use crate::server::ensure_admin_key;
use crate::store::Store;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Public host name (webhook URLs, certificate)
    #[arg(long)]
    pub domain: Option<String>,
    /// ACME account contact
    #[arg(long)]
    pub email: Option<String>,
    /// Data directory [default: /var/lib/voicectl; with --dev ./voicectl-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Local development config: plain HTTP on 127.0.0.1:8080, TLS off, scripted engine
    /// [config default: ./voicectl.toml]
    #[arg(long)]
    pub dev: bool,
    /// Overwrite an existing config file
    #[arg(long)]
    pub force: bool,
}

fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The template with this install's values filled in.
pub fn render_template(domain: &str, email: &str, data_dir: &Path, dev: bool) -> String {
    let (listen, http, https, tls, engine, public_url) = if dev {
        (
            "127.0.0.1:8080",
            "",
            "",
            "off",
            "scripted",
            "http://127.0.0.1:8080",
        )
    } else {
        (
            // Loopback only: local commands (`status`, `call`, `cert renew`) and a local
            // Prometheus reach the server here; the world comes in over HTTPS.
            "127.0.0.1:7080",
            "0.0.0.0:80",
            "0.0.0.0:443",
            "acme",
            "openai-realtime",
            "",
        )
    };
    TEMPLATE
        .replace("{{domain}}", &toml_escape(domain))
        .replace("{{email}}", &toml_escape(email))
        .replace("{{data_dir}}", &toml_escape(&data_dir.to_string_lossy()))
        .replace("{{listen}}", listen)
        .replace("{{http_listen}}", http)
        .replace("{{https_listen}}", https)
        .replace("{{tls_mode}}", tls)
        .replace("{{engine}}", engine)
        .replace("{{public_url}}", public_url)
        .replace("{{simulate}}", if dev { "true" } else { "false" })
}

pub fn run(ctx: &Ctx, a: InitArgs) -> anyhow::Result<ExitCode> {
    let config_path = ctx.config_path.clone().unwrap_or_else(|| {
        PathBuf::from(if a.dev {
            "voicectl.toml"
        } else {
            DEFAULT_CONFIG
        })
    });
    let domain = match (&a.domain, a.dev) {
        (Some(d), _) => d.clone(),
        (None, true) => "localhost".into(),
        (None, false) => bail!(
            "--domain is required (the public host name Twilio will call, e.g. voice.example.com)"
        ),
    };
    if !is_hostname(&domain) {
        bail!("--domain {domain:?} is not a host name (no scheme, port or path)");
    }
    let email = a.email.clone().unwrap_or_default();
    if !email.is_empty() && !email.contains('@') {
        bail!("--email {email:?} is not an email address");
    }
    let data_dir = a.data_dir.clone().unwrap_or_else(|| {
        PathBuf::from(if a.dev {
            "./voicectl-data"
        } else {
            "/var/lib/voicectl"
        })
    });
    let text = render_template(&domain, &email, &data_dir, a.dev);
    // Validate what we are about to write, so init never leaves a config serve rejects.
    Config::from_toml(&text, &config_path, &|_| None)
        .context("internal error: the rendered config does not validate")?;

    let existed = config_path.exists();
    if existed && !a.force {
        bail!(
            "{} already exists; pass --force to overwrite it (data and keys are kept)",
            config_path.display()
        );
    }
    if let Some(parent) = config_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&config_path)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    let store = Store::open(&data_dir)
        .with_context(|| format!("cannot create the database in {}", data_dir.display()))?;
    let new_admin = ensure_admin_key(&store, &data_dir)?;
    let admin_file = data_dir.join(crate::domain::layout::ADMIN_KEY_FILE);

    let public = if a.dev {
        "http://127.0.0.1:8080".to_owned()
    } else {
        format!("https://{domain}")
    };
    if ctx.json {
        println!(
            "{}",
            json!({
                "config": config_path,
                "data_dir": data_dir,
                "database": store.path(),
                "admin_key_file": admin_file,
                "admin_key": new_admin.as_ref().map(|(_, k)| k),
                "twilio_voice_url": format!("{public}/twilio/voice"),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Wrote {}{}",
        config_path.display(),
        if existed { " (overwritten)" } else { "" }
    );
    println!("Database: {}", store.path().display());
    match &new_admin {
        Some((path, key)) => {
            println!(
                "\nAdmin API key (shown once; also saved 0600 in {}):\n  {key}",
                path.display()
            );
        }
        None => println!(
            "Admin API key: kept the existing one in {}",
            admin_file.display()
        ),
    }
    let cfg_flag = if ctx.config_path.is_some() || a.dev {
        format!(" --config {}", config_path.display())
    } else {
        String::new()
    };
    println!("\nNext steps:");
    if a.dev {
        println!("  1. voicectl serve{cfg_flag}");
        println!("  2. voicectl call +15555550100{cfg_flag}");
    } else {
        println!(
            "  1. Put your Twilio Account SID, Auth Token and from_number in {}",
            config_path.display()
        );
        println!("     (or VOICECTL_TWILIO_AUTH_TOKEN), and your engine's API key.");
        println!("  2. Point DNS for {domain} at this server; open ports 80 and 443.");
        println!("  3. In the Twilio console, for each phone number, set \"A call comes in\" to");
        println!("     Webhook, HTTP POST:  {public}/twilio/voice");
        println!("  4. voicectl tenant add <name> --number <E.164>{cfg_flag}");
        println!("     voicectl key create --tenant <name>{cfg_flag}");
        println!("  5. systemctl enable --now voicectl   (or: voicectl serve{cfg_flag})");
    }
    Ok(ExitCode::SUCCESS)
}

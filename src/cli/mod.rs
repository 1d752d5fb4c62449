//! The command line (SPEC §1): parsing, logging setup, dispatch, exit codes.

mod admin;
mod calls;
mod campaign;
mod cert;
mod client;
mod doctor;
pub mod init;
mod open;
mod output;
mod status;
mod tools;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::Config;

pub const DEFAULT_CONFIG: &str = "/etc/voicectl/voicectl.toml";

#[derive(Parser, Debug)]
#[command(
    name = "voicectl",
    version,
    about = "Self-hosted AI phone calls: Twilio + voice AI in one binary"
)]
pub struct Cli {
    /// Config file [default: $VOICECTL_CONFIG, else /etc/voicectl/voicectl.toml]
    #[arg(long, global = true, env = "VOICECTL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a commented config, create the data dir and database, mint the admin key
    Init(init::InitArgs),
    /// Run the server
    Serve {
        /// No config needed: plain HTTP on 127.0.0.1:8080, data in ./voicectl-data,
        /// simulated telephony, scripted engine
        #[arg(long)]
        dev: bool,
    },
    /// Place an outbound call through the running server and follow it live
    Call(calls::CallArgs),
    /// Call history and control
    #[command(subcommand)]
    Calls(calls::CallsCmd),
    /// Campaigns: call a list within each recipient's local hours
    #[command(subcommand)]
    Campaign(campaign::CampaignCmd),
    /// The tenant's do-not-call list
    #[command(subcommand)]
    Dnc(campaign::DncCmd),
    /// The tenant's HTTP tools the agent may call during a call
    #[command(subcommand)]
    Tools(tools::ToolsCmd),
    /// Tenant management (works whether or not the server runs)
    #[command(subcommand)]
    Tenant(Box<admin::TenantCmd>),
    /// API keys
    #[command(subcommand)]
    Key(admin::KeyCmd),
    /// TLS certificates
    #[command(subcommand)]
    Cert(CertCmd),
    /// Print a one-time link (10 minutes) that logs a browser in to the dashboard
    Open(open::OpenArgs),
    /// Is the server up: version, uptime, live/queued calls, certificates, engines
    Status,
    /// Consistent online copy of the database
    Backup {
        /// Where to write the copy (must not exist)
        path: PathBuf,
    },
    /// Check config, permissions, DNS, ports, Twilio credentials, clock, disk
    Doctor,
    /// Print shell completions
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Domains, issuer, expiry, next renewal, last error
    Status,
    /// Renew now
    Renew(RenewArgs),
}

#[derive(Args, Debug)]
pub struct RenewArgs {
    /// Renew even if the certificate is not due
    #[arg(long)]
    pub force: bool,
}

/// Global flags every command sees.
pub struct Ctx {
    pub config_path: Option<PathBuf>,
    pub json: bool,
}

impl Ctx {
    /// The config for commands that need one. Without `--config`/`$VOICECTL_CONFIG` and
    /// without `/etc/voicectl/voicectl.toml`, a `./voicectl-data` left by `serve --dev` is
    /// used with the dev settings, so the README's dev flow needs no file.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let path = match &self.config_path {
            Some(p) => p.clone(),
            None => {
                let default = Path::new(DEFAULT_CONFIG);
                if !default.exists()
                    && Config::dev()
                        .server
                        .data_dir
                        .join(crate::store::DB_FILE)
                        .exists()
                {
                    return Ok(Config::dev());
                }
                default.to_owned()
            }
        };
        if !path.exists() {
            bail!(
                "no config at {} (run `voicectl init`, or pass --config / set VOICECTL_CONFIG)",
                path.display()
            );
        }
        Ok(Config::load(&path)?)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("voicectl: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Everything we create (database, keys, certificates) is private to the service user.
    // SAFETY: umask has no memory-safety preconditions; it is called before any threads start.
    unsafe {
        libc::umask(0o077);
    }
    let serving = matches!(cli.command, Command::Serve { .. });
    init_logging(cli.verbose, cli.quiet, serving);
    let ctx = Ctx {
        config_path: cli.config.clone(),
        json: cli.json,
    };
    match cli.command {
        Command::Init(args) => init::run(&ctx, args),
        Command::Serve { dev } => {
            let config = if dev && ctx.config_path.is_none() {
                Config::dev()
            } else {
                ctx.load_config()?
            };
            install_crypto_provider();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(crate::server::serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Call(args) => calls::call(&ctx, args),
        Command::Calls(cmd) => calls::run(&ctx, cmd),
        Command::Campaign(cmd) => campaign::campaign(&ctx, cmd),
        Command::Dnc(cmd) => campaign::dnc(&ctx, cmd),
        Command::Tools(cmd) => tools::run(&ctx, cmd),
        Command::Tenant(cmd) => admin::tenant(&ctx, *cmd),
        Command::Key(cmd) => admin::key(&ctx, cmd),
        Command::Backup { path } => admin::backup(&ctx, &path),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "voicectl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert(cmd) => cert::run(&ctx, cmd),
        Command::Status => status::run(&ctx),
        Command::Open(args) => open::run(&ctx, args),
        Command::Doctor => doctor::run(&ctx),
    }
}

pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn init_logging(verbose: u8, quiet: bool, serving: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose, serving) {
        (true, _, _) => "error",
        (_, 0, true) => "info",
        (_, 0, false) => "warn",
        (_, 1, _) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("VOICECTL_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default},hyper=warn,h2=warn,rustls=warn,tower_http=warn"
        ))
    });
    // The server logs to stdout (systemd/journald); other commands keep stdout for results.
    if serving {
        let b = tracing_subscriber::fmt().with_env_filter(filter);
        if std::io::stdout().is_terminal() {
            b.init();
        } else {
            b.json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .init();
        }
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
}

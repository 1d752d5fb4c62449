//! `voicectl tenant …`, `voicectl key …`, `voicectl backup`: offline, straight on the
//! database (WAL lets them run beside a live server).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::{Ctx, output};
use crate::config::HumanDuration;
use crate::domain::Invalid;
use crate::domain::tenant::validate_key;
use crate::domain::timefmt::now_ms;
use crate::store::keys::{self, KeyInfo};
use crate::store::tenants::{self, Tenant, TenantPatch, TransferNumber};
use crate::store::{Store, StoreError, admin};

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Create a tenant
    Add {
        /// Identifier: lower-case letters, digits, '-'
        name: String,
        #[command(flatten)]
        fields: TenantFields,
    },
    /// List tenants
    List,
    /// Show one tenant
    Show { tenant: String },
    /// Change a tenant (only the flags given; "" clears an override)
    Update {
        tenant: String,
        #[command(flatten)]
        fields: TenantFields,
    },
    /// Delete a tenant, its numbers and keys
    Rm {
        tenant: String,
        /// Also delete its call history
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug, Default)]
pub struct TenantFields {
    /// Company name
    #[arg(long)]
    company: Option<String>,
    /// Name the agent introduces itself with
    #[arg(long)]
    agent_name: Option<String>,
    /// System prompt (overrides [agent].system_prompt)
    #[arg(long)]
    prompt: Option<String>,
    /// First words of the agent
    #[arg(long)]
    greeting: Option<String>,
    /// Voice name for the engine
    #[arg(long)]
    voice: Option<String>,
    /// openai-realtime | ultravox | scripted
    #[arg(long)]
    engine: Option<String>,
    /// Caller ID for outbound calls (E.164)
    #[arg(long = "from", value_name = "E164")]
    from_number: Option<String>,
    /// Phone number routed to this tenant (repeat; on update, replaces the whole set)
    #[arg(long = "number", value_name = "E164")]
    numbers: Vec<String>,
    /// Remove all numbers (update)
    #[arg(long, conflicts_with = "numbers")]
    no_numbers: bool,
    /// Concurrent calls for this tenant
    #[arg(long = "max-concurrent", value_name = "N")]
    max_concurrent_calls: Option<u32>,
    /// New calls per minute for this tenant
    #[arg(long, value_name = "N")]
    calls_per_minute: Option<u32>,
    /// URL that receives signed call-completed webhooks ("" removes it)
    #[arg(long)]
    webhook_url: Option<String>,
    /// Record calls: true | false (a call's own `record` beats it)
    #[arg(long, value_name = "BOOL")]
    record: Option<bool>,
    /// Spoken first on recorded calls ("" removes it)
    #[arg(long, value_name = "TEXT")]
    recording_notice: Option<String>,
    /// Transfer target as NUMBER=LABEL, e.g. +14155550100=sales (repeat; on update,
    /// replaces the whole list)
    #[arg(long = "transfer-number", value_name = "E164=LABEL")]
    transfer_numbers: Vec<String>,
    /// Remove all transfer numbers (update)
    #[arg(long, conflicts_with = "transfer_numbers")]
    no_transfer_numbers: bool,
    /// cold (default) | warm: warm transfers first tell the person answering what the call
    /// is about
    #[arg(long, value_name = "MODE")]
    transfer_mode: Option<String>,
    /// off | detect | hangup | voicemail: answering-machine detection for this tenant's calls
    /// ("" clears it: the server default)
    #[arg(long, value_name = "MODE")]
    machine_detection: Option<String>,
    /// What the agent leaves on answering machines in voicemail mode ("" clears it)
    #[arg(long, value_name = "TEXT")]
    voicemail_message: Option<String>,
    /// Post-call analysis from a JSON file: {"summary": true, "schema": {...}, "success":
    /// "..."}; a file holding {} turns it off
    #[arg(long, value_name = "FILE")]
    analysis: Option<std::path::PathBuf>,
}

impl TenantFields {
    fn into_patch(self, name: Option<String>) -> anyhow::Result<TenantPatch> {
        let analysis = match &self.analysis {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Some(serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("{}: not an analysis object: {e}", path.display())
                })?)
            }
        };
        Ok(TenantPatch {
            name,
            company: self.company,
            agent_name: self.agent_name,
            system_prompt: self.prompt,
            greeting: self.greeting,
            voice: self.voice,
            engine: self.engine,
            from_number: self.from_number,
            numbers: if self.no_numbers {
                Some(Vec::new())
            } else if self.numbers.is_empty() {
                None
            } else {
                Some(self.numbers)
            },
            max_concurrent_calls: self.max_concurrent_calls,
            calls_per_minute: self.calls_per_minute,
            webhook_url: self.webhook_url,
            record: self.record,
            recording_notice: self.recording_notice,
            transfer_numbers: if self.no_transfer_numbers {
                Some(Vec::new())
            } else if self.transfer_numbers.is_empty() {
                None
            } else {
                Some(
                    self.transfer_numbers
                        .into_iter()
                        .map(|t| match t.split_once('=') {
                            Some((n, l)) => TransferNumber {
                                number: n.trim().to_owned(),
                                label: l.trim().to_owned(),
                            },
                            // Validation names the missing label.
                            None => TransferNumber {
                                number: t.trim().to_owned(),
                                label: String::new(),
                            },
                        })
                        .collect(),
                )
            },
            transfer_mode: self.transfer_mode,
            machine_detection: self.machine_detection,
            voicemail_message: self.voicemail_message,
            analysis,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create an API key for a tenant; prints the secret once
    Create {
        #[arg(long)]
        tenant: String,
        /// A label to recognise the key by
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. 90d or 12h (default: no expiry)
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (never their secrets)
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key at once
    Revoke { key_id: String },
}

pub(super) fn open_store(ctx: &Ctx) -> anyhow::Result<Store> {
    let cfg = ctx.load_config()?;
    let dir = &cfg.server.data_dir;
    if !dir.join(crate::store::DB_FILE).exists() {
        bail!(
            "no database in {} (run `voicectl init` first)",
            dir.display()
        );
    }
    Store::open(dir).with_context(|| format!("opening the database in {}", dir.display()))
}

/// Store errors as one-line CLI errors ("tenant not found").
pub(super) fn cli_err(e: StoreError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Refused input as a one-line CLI error ("name: …").
fn invalid_err(e: Invalid) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

pub fn tenant(ctx: &Ctx, cmd: TenantCmd) -> anyhow::Result<ExitCode> {
    let store = open_store(ctx)?;
    match cmd {
        TenantCmd::Add { name, fields } => {
            let patch = fields.into_patch(Some(name))?;
            patch.validate_create().map_err(invalid_err)?;
            patch
                .check_webhook_target(&ctx.load_config()?.server.allow_private_targets)
                .map_err(invalid_err)?;
            let t = store
                .blocking(|c| tenants::create(c, patch))
                .map_err(cli_err)?;
            print_tenant(ctx, &t, "Created tenant")?;
        }
        TenantCmd::List => {
            let all = store.read_blocking(tenants::list).map_err(cli_err)?;
            if ctx.json {
                output::json(&all)?;
            } else {
                let rows: Vec<_> = all
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.company.clone(),
                            t.numbers.join(","),
                            output::opt(&t.engine),
                            output::opt(&t.max_concurrent_calls),
                        ]
                    })
                    .collect();
                output::table(
                    &["NAME", "COMPANY", "NUMBERS", "ENGINE", "MAX_CALLS"],
                    &rows,
                );
            }
        }
        TenantCmd::Show { tenant } => {
            let t = store
                .blocking(|c| tenants::get(c, &tenant))
                .map_err(cli_err)?;
            print_tenant(ctx, &t, "")?;
        }
        TenantCmd::Update { tenant, fields } => {
            let patch = fields.into_patch(None)?;
            patch.validate_update(&tenant).map_err(invalid_err)?;
            patch
                .check_webhook_target(&ctx.load_config()?.server.allow_private_targets)
                .map_err(invalid_err)?;
            let t = store
                .blocking(|c| tenants::update(c, &tenant, patch))
                .map_err(cli_err)?;
            print_tenant(ctx, &t, "Updated tenant")?;
        }
        TenantCmd::Rm { tenant, force } => {
            store
                .blocking(|c| tenants::delete(c, &tenant, force))
                .map_err(|e| match e {
                    StoreError::Conflict(m) if !force && m.contains("on record") => {
                        anyhow::anyhow!("{m} (pass --force)")
                    }
                    e => cli_err(e),
                })?;
            if ctx.json {
                output::json(&serde_json::json!({"deleted": tenant}))?;
            } else {
                println!("Deleted tenant {tenant}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_tenant(ctx: &Ctx, t: &Tenant, heading: &str) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(t);
    }
    if !heading.is_empty() {
        println!("{heading} {}", t.name);
    }
    output::fields(&[
        ("name", t.name.clone()),
        ("company", t.company.clone()),
        ("agent_name", t.agent_name.clone()),
        ("numbers", t.numbers.join(", ")),
        ("from", output::opt(&t.from_number)),
        ("engine", output::opt(&t.engine)),
        ("voice", output::opt(&t.voice)),
        ("greeting", output::opt(&t.greeting)),
        ("system_prompt", output::opt(&t.system_prompt)),
        ("max_concurrent", output::opt(&t.max_concurrent_calls)),
        ("calls_per_minute", output::opt(&t.calls_per_minute)),
        ("webhook_url", output::opt(&t.webhook_url)),
        ("webhook_secret", output::opt(&t.webhook_secret)),
        ("created_at", t.created_at.clone()),
    ]);
    Ok(())
}

pub fn key(ctx: &Ctx, cmd: KeyCmd) -> anyhow::Result<ExitCode> {
    let store = open_store(ctx)?;
    match cmd {
        KeyCmd::Create {
            tenant,
            name,
            expires,
        } => {
            let expires_at = expires
                .as_deref()
                .map(|d| HumanDuration::parse(d).map(|d| now_ms() + d.0.as_millis() as i64))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
            validate_key(&name, expires_at).map_err(invalid_err)?;
            let k = store
                .blocking(|c| keys::create(c, Some(&tenant), &name, expires_at))
                .map_err(cli_err)?;
            if ctx.json {
                output::json(&k)?;
            } else {
                println!(
                    "Created key {} for tenant {tenant}{}",
                    k.info.id,
                    k.info
                        .expires_at
                        .as_ref()
                        .map(|e| format!(", expires {e}"))
                        .unwrap_or_default()
                );
                println!(
                    "\n  {}\n\nThis is the only time the secret is shown; store it now.",
                    k.key
                );
            }
        }
        KeyCmd::List { tenant } => {
            let all = store
                .read_blocking(|c| keys::list(c, tenant.as_deref()))
                .map_err(cli_err)?;
            print_keys(ctx, &all)?;
        }
        KeyCmd::Revoke { key_id } => {
            let k = store
                .blocking(|c| keys::revoke(c, &key_id))
                .map_err(cli_err)?;
            if ctx.json {
                output::json(&k)?;
            } else {
                println!("Revoked key {}", k.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_keys(ctx: &Ctx, all: &[KeyInfo]) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(all);
    }
    let rows: Vec<_> = all
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.tenant.clone().unwrap_or_else(|| "(admin)".into()),
                k.name.clone(),
                k.status.to_owned(),
                k.created_at.clone(),
                output::opt(&k.expires_at),
                output::opt(&k.last_used_at),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "TENANT",
            "NAME",
            "STATUS",
            "CREATED",
            "EXPIRES",
            "LAST_USED",
        ],
        &rows,
    );
    Ok(())
}

/// `VACUUM INTO` gives a consistent snapshot while the server keeps writing; the copy is then
/// opened and integrity-checked before we call it good.
pub fn backup(ctx: &Ctx, path: &Path) -> anyhow::Result<ExitCode> {
    let store = open_store(ctx)?;
    if path.exists() {
        bail!("{} already exists; choose a new path", path.display());
    }
    store
        .blocking(|c| admin::backup_into(c, path))
        .map_err(cli_err)
        .with_context(|| format!("backing up to {}", path.display()))?;
    let check = admin::integrity_check(path).map_err(cli_err)?;
    if check != "ok" {
        bail!(
            "the copy at {} failed its integrity check: {check}",
            path.display()
        );
    }
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if ctx.json {
        output::json(&serde_json::json!({"path": path, "bytes": size, "integrity": "ok"}))?;
    } else {
        println!(
            "Backed up to {} ({size} bytes, integrity ok)",
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! `voicectl call` and `voicectl calls …`.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{Ctx, not_yet, output};
use crate::calls::CallStatus;
use crate::store::Store;
use crate::store::calls::{self, Call, ListQuery, Scope};
use crate::store::tenants;

#[derive(Args, Debug)]
pub struct CallArgs {
    /// Number to call (E.164, e.g. +14155550100)
    pub number: String,
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long = "from")]
    pub from_number: Option<String>,
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long)]
    pub greeting: Option<String>,
    #[arg(long)]
    pub engine: Option<String>,
    /// Return once the call is created instead of following it
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand, Debug)]
pub enum CallsCmd {
    /// Recent calls, newest first
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One call with its transcript
    Show { id: String },
    /// Hang up a live call or cancel a queued one
    End { id: String },
}

pub fn call(_ctx: &Ctx, args: CallArgs) -> anyhow::Result<ExitCode> {
    crate::phone::E164::parse(&args.number)?;
    not_yet("call")
}

fn open(ctx: &Ctx) -> anyhow::Result<Store> {
    let cfg = ctx.load_config()?;
    Ok(Store::open(&cfg.server.data_dir)?)
}

pub fn run(ctx: &Ctx, cmd: CallsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CallsCmd::List {
            tenant,
            status,
            limit,
        } => {
            let status = status
                .map(|s| {
                    CallStatus::parse(&s)
                        .ok_or_else(|| anyhow::anyhow!("--status: unknown status {s:?}"))
                })
                .transpose()?;
            if !(1..=1000).contains(&limit) {
                anyhow::bail!("--limit must be between 1 and 1000");
            }
            let store = open(ctx)?;
            let (page, _) = store
                .blocking(|c| {
                    let scope = match &tenant {
                        Some(t) => Scope::Tenant(tenants::get(c, t)?.id),
                        None => Scope::All,
                    };
                    calls::list(
                        c,
                        &ListQuery {
                            scope,
                            status,
                            limit,
                            cursor: None,
                        },
                    )
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if ctx.json {
                return output::json(&page).map(|_| ExitCode::SUCCESS);
            }
            let rows: Vec<_> = page.iter().map(row).collect();
            output::table(
                &[
                    "ID",
                    "TENANT",
                    "DIR",
                    "TO",
                    "STATUS",
                    "CREATED",
                    "SECS",
                    "END_REASON",
                ],
                &rows,
            );
        }
        CallsCmd::Show { id } => {
            let store = open(ctx)?;
            let c = store
                .blocking(|c| calls::get(c, Scope::All, &id))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if ctx.json {
                return output::json(&c).map(|_| ExitCode::SUCCESS);
            }
            output::fields(&[
                ("id", c.id.to_string()),
                ("tenant", c.tenant.clone()),
                ("direction", c.direction.as_str().into()),
                ("to", c.to.clone()),
                ("from", c.from.clone()),
                ("status", c.status.to_string()),
                ("engine", c.engine.clone()),
                ("twilio_call_sid", output::opt(&c.twilio_call_sid)),
                ("created_at", c.created_at.clone()),
                ("ended_at", output::opt(&c.ended_at)),
                ("duration_seconds", output::opt(&c.duration_seconds)),
                ("end_reason", output::opt(&c.end_reason)),
                ("error", output::opt(&c.error)),
            ]);
        }
        CallsCmd::End { .. } => return not_yet("calls end"),
    }
    Ok(ExitCode::SUCCESS)
}

fn row(c: &Call) -> Vec<String> {
    vec![
        c.id.to_string(),
        c.tenant.clone(),
        c.direction.as_str().into(),
        c.to.clone(),
        c.status.to_string(),
        c.created_at.clone(),
        output::opt(&c.duration_seconds),
        output::opt(&c.end_reason),
    ]
}

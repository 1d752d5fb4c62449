//! `voicectl call` and `voicectl calls …`.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::client::LocalServer;
use super::{Ctx, output};
use crate::calls::CallStatus;
use crate::store::Store;
use crate::store::calls::{self, Call, ListQuery, Scope};
use crate::store::tenants;

#[derive(Args, Debug)]
pub struct CallArgs {
    /// Number to call (E.164, e.g. +14155550100)
    pub number: String,
    /// Tenant to call for (may be omitted when there is only one)
    #[arg(long)]
    pub tenant: Option<String>,
    /// Caller ID (E.164; default: the tenant's, else twilio.from_number)
    #[arg(long = "from")]
    pub from_number: Option<String>,
    /// System prompt for this call
    #[arg(long)]
    pub prompt: Option<String>,
    /// What the agent says first
    #[arg(long)]
    pub greeting: Option<String>,
    /// openai-realtime | ultravox | scripted
    #[arg(long)]
    pub engine: Option<String>,
    /// Agent voice
    #[arg(long)]
    pub voice: Option<String>,
    /// Hard limit for this call, e.g. 5m
    #[arg(long)]
    pub max_duration: Option<String>,
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
    /// Save a recorded call's WAV (caller left, agent right)
    Recording {
        id: String,
        /// File to write
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: std::path::PathBuf,
    },
    /// Press keys on a live call (0-9 * # and w for a half-second pause); the conversation
    /// goes on
    Dtmf { id: String, digits: String },
    /// Transfer a live call to one of its tenant's transfer numbers (number or label)
    Transfer {
        id: String,
        destination: String,
        /// What the person answering hears first (warm transfers)
        #[arg(long, default_value = "")]
        summary: String,
    },
}

/// Exit status of `voicectl call` when the call ended other than `completed`.
const NOT_COMPLETED: u8 = 4;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn call(ctx: &Ctx, args: CallArgs) -> anyhow::Result<ExitCode> {
    crate::domain::phone::E164::parse(&args.number)?;
    let cfg = ctx.load_config()?;
    let server = LocalServer::connect(&cfg)?;
    let mut body = serde_json::json!({ "to": args.number });
    for (k, v) in [
        ("tenant", &args.tenant),
        ("from", &args.from_number),
        ("system_prompt", &args.prompt),
        ("greeting", &args.greeting),
        ("engine", &args.engine),
        ("voice", &args.voice),
        ("max_duration", &args.max_duration),
    ] {
        if let Some(v) = v {
            body[k] = v.clone().into();
        }
    }
    let json = ctx.json;
    runtime()?.block_on(async move {
        let call = server.post("/api/v1/calls", &body).await?;
        let id = call["id"].as_str().unwrap_or_default().to_owned();
        if args.no_wait {
            if json {
                output::json(&call)?;
            } else {
                println!("{id}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !json {
            println!(
                "Calling {} as call {id} (tenant {})",
                args.number,
                call["tenant"].as_str().unwrap_or("?")
            );
        }
        let started = std::time::Instant::now();
        server
            .follow(&format!("/api/v1/calls/{id}/events"), |name, ev| {
                if json {
                    println!("{}", serde_json::json!({"event": name, "data": ev}));
                    return;
                }
                let t = started.elapsed().as_secs_f64();
                match name {
                    "status" => println!("[{t:5.1}s] {}", ev["status"].as_str().unwrap_or("?")),
                    "transcript" => println!(
                        "[{t:5.1}s]   {}: {}",
                        ev["speaker"].as_str().unwrap_or("?"),
                        ev["text"].as_str().unwrap_or("")
                    ),
                    _ => {}
                }
            })
            .await?;
        let fin = server.get(&format!("/api/v1/calls/{id}")).await?;
        let status = fin["status"].as_str().unwrap_or("?");
        if json {
            output::json(&fin)?;
        } else {
            println!(
                "Call {status}{}{}",
                fin["end_reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                fin["duration_seconds"]
                    .as_i64()
                    .map(|d| format!(", {d} s"))
                    .unwrap_or_default()
            );
        }
        Ok(if status == "completed" {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(NOT_COMPLETED)
        })
    })
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
                .read_blocking(|c| {
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
            let (c, transcript) = store
                .read_blocking(|c| {
                    Ok((
                        calls::get(c, Scope::All, &id)?,
                        calls::transcript(c, Scope::All, &id)?,
                    ))
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if ctx.json {
                let mut v = serde_json::to_value(&c)?;
                v["transcript"] = serde_json::to_value(&transcript)?;
                return output::json(&v).map(|_| ExitCode::SUCCESS);
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
            if !transcript.is_empty() {
                println!("\ntranscript:");
                for e in &transcript {
                    println!(
                        "  [{:6.1}s] {}: {}",
                        e.at_ms as f64 / 1000.0,
                        e.speaker,
                        e.text
                    );
                }
            }
        }
        CallsCmd::End { id } => {
            let cfg = ctx.load_config()?;
            let server = LocalServer::connect(&cfg)?;
            let call = runtime()?.block_on(
                server.post(&format!("/api/v1/calls/{id}/end"), &serde_json::json!({})),
            )?;
            if ctx.json {
                output::json(&call)?;
            } else {
                println!("Call {id}: {}", call["status"].as_str().unwrap_or("?"));
            }
        }
        CallsCmd::Recording { id, output } => {
            let cfg = ctx.load_config()?;
            let server = LocalServer::connect(&cfg)?;
            let wav =
                runtime()?.block_on(server.get_bytes(&format!("/api/v1/calls/{id}/recording")))?;
            std::fs::write(&output, &wav)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
            if !ctx.json {
                println!("Saved {} ({} bytes)", output.display(), wav.len());
            }
        }
        CallsCmd::Dtmf { id, digits } => {
            let cfg = ctx.load_config()?;
            let server = LocalServer::connect(&cfg)?;
            let r = runtime()?.block_on(server.post(
                &format!("/api/v1/calls/{id}/dtmf"),
                &serde_json::json!({ "digits": digits }),
            ))?;
            if ctx.json {
                output::json(&r)?;
            } else {
                println!("Call {id}: playing {digits}");
            }
        }
        CallsCmd::Transfer {
            id,
            destination,
            summary,
        } => {
            let cfg = ctx.load_config()?;
            let server = LocalServer::connect(&cfg)?;
            let r = runtime()?.block_on(server.post(
                &format!("/api/v1/calls/{id}/transfer"),
                &serde_json::json!({ "destination": destination, "summary": summary }),
            ))?;
            if ctx.json {
                output::json(&r)?;
            } else {
                println!("Call {id}: transferring to {destination}");
            }
        }
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

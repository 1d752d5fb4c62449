//! `voicectl tools list|show|set|rm`: the tenant's HTTP tools (SPEC §8), through the running
//! server. `set` reads the definition from a JSON file (the body of `PUT /api/v1/tools/{name}`;
//! the `name`, `created_at` and `updated_at` that `show --json` prints are accepted and ignored,
//! so a shown tool can be edited and set again).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::Value;

use super::client::LocalServer;
use super::{Ctx, output};

#[derive(Subcommand, Debug)]
pub enum ToolsCmd {
    /// The tenant's tools
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One tool's definition
    Show {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Create or replace a tool from a JSON file (`-` reads standard input)
    Set {
        name: String,
        file: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove a tool
    Rm {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
    },
}

fn path(name: Option<&str>, tenant: &Option<String>) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let mut p = "/api/v1/tools".to_owned();
    if let Some(n) = name {
        p.push('/');
        p.push_str(&enc(n));
    }
    if let Some(t) = tenant {
        p.push_str("?tenant=");
        p.push_str(&enc(t));
    }
    p
}

fn read_definition(name: &str, file: &PathBuf) -> anyhow::Result<Value> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let mut v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let Some(obj) = v.as_object_mut() else {
        bail!(
            "{} must hold a JSON object (the tool definition)",
            file.display()
        );
    };
    if let Some(n) = obj.remove("name")
        && n.as_str() != Some(name)
    {
        bail!("the file names the tool {n}, but the command names it {name:?}");
    }
    obj.remove("created_at");
    obj.remove("updated_at");
    Ok(v)
}

pub fn run(ctx: &Ctx, cmd: ToolsCmd) -> anyhow::Result<ExitCode> {
    let server = LocalServer::connect(&ctx.load_config()?)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            ToolsCmd::List { tenant } => {
                let v = server.get(&path(None, &tenant)).await?;
                if ctx.json {
                    output::json(&v)?;
                } else {
                    for t in v["tools"].as_array().map(Vec::as_slice).unwrap_or_default() {
                        println!(
                            "{}\t{}\t{}",
                            t["name"].as_str().unwrap_or(""),
                            t["url"].as_str().unwrap_or(""),
                            t["description"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            ToolsCmd::Show { name, tenant } => {
                let v = server.get(&path(Some(&name), &tenant)).await?;
                // A definition is JSON by nature: both modes print it so, pretty.
                output::json(&v)?;
            }
            ToolsCmd::Set { name, file, tenant } => {
                let body = read_definition(&name, &file)?;
                let v = server.put(&path(Some(&name), &tenant), &body).await?;
                if ctx.json {
                    output::json(&v)?;
                } else {
                    println!("saved tool {name}");
                }
            }
            ToolsCmd::Rm { name, tenant } => {
                server.delete(&path(Some(&name), &tenant)).await?;
                if ctx.json {
                    output::json(&serde_json::json!({"removed": name}))?;
                } else {
                    println!("removed tool {name}");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

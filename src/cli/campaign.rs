//! `voicectl campaign …` and `voicectl dnc …`: talk to the running server over HTTP (SPEC §7).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::client::LocalServer;
use super::{Ctx, output};

#[derive(Subcommand, Debug)]
pub enum CampaignCmd {
    /// Create a campaign and upload its recipients (CSV: `to`, optional `timezone`, variables)
    Create {
        name: String,
        /// Recipient list to upload
        #[arg(long)]
        csv: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        /// What the agent says first (`{{column}}` fills in the recipient's value)
        #[arg(long)]
        greeting: Option<String>,
        /// System prompt (`{{column}}` templates too)
        #[arg(long)]
        prompt: Option<String>,
        /// Recipient-local calling hours, e.g. 09:00-20:00 (within 08:00-21:00)
        #[arg(long)]
        hours: Option<String>,
        #[arg(long)]
        max_concurrent: Option<i64>,
        /// Dials per second (at most twilio.calls_per_second)
        #[arg(long)]
        calls_per_second: Option<f64>,
        /// Caller ID (E.164)
        #[arg(long = "from")]
        from_number: Option<String>,
        /// Create paused (start with `campaign resume`)
        #[arg(long)]
        paused: bool,
    },
    /// Campaigns, newest first
    List,
    /// One campaign's progress
    Show {
        id: String,
        /// Keep showing live progress until the campaign ends
        #[arg(long)]
        watch: bool,
    },
    /// Stop new dials (live calls go on)
    Pause { id: String },
    /// Continue where it stopped
    Resume { id: String },
    /// Cancel every recipient not yet final
    Cancel { id: String },
    /// One CSV row per recipient
    Results {
        id: String,
        /// Write to this file instead of standard output
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DncCmd {
    /// Add numbers to the do-not-call list
    Add {
        #[arg(required = true)]
        numbers: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove a number
    Rm {
        number: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The do-not-call list
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Add every number of a file (one per line, or a CSV whose first column or `to` holds them)
    Import {
        file: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn connect(ctx: &Ctx) -> anyhow::Result<LocalServer> {
    LocalServer::connect(&ctx.load_config()?)
}

fn tenant_query(tenant: &Option<String>) -> String {
    tenant
        .as_ref()
        .map(|t| {
            format!(
                "?tenant={}",
                percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .unwrap_or_default()
}

fn n(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn finished(p: &Value) -> i64 {
    n(&p["done"]) + n(&p["failed"]) + n(&p["suppressed"]) + n(&p["canceled"])
}

fn counts_line(p: &Value) -> String {
    format!(
        "pending {} · scheduled {} · dialing {} · in call {} · done {} · failed {} · suppressed {} · canceled {}",
        n(&p["pending"]),
        n(&p["scheduled"]),
        n(&p["dialing"]),
        n(&p["in_call"]),
        n(&p["done"]),
        n(&p["failed"]),
        n(&p["suppressed"]),
        n(&p["canceled"])
    )
}

fn print_campaign(c: &Value) {
    let p = &c["progress"];
    output::fields(&[
        ("id", c["id"].as_str().unwrap_or("").into()),
        ("name", c["name"].as_str().unwrap_or("").into()),
        ("tenant", c["tenant"].as_str().unwrap_or("").into()),
        ("status", c["status"].as_str().unwrap_or("").into()),
        (
            "hours",
            format!(
                "{}-{} recipient-local, {}",
                c["calling_hours"]["start"].as_str().unwrap_or(""),
                c["calling_hours"]["end"].as_str().unwrap_or(""),
                c["days"]
                    .as_array()
                    .map(|d| d
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            ),
        ),
        (
            "pace",
            format!(
                "{} calls/s, {} at once",
                c["calls_per_second"], c["max_concurrent"]
            ),
        ),
        (
            "recipients",
            format!("{} ({})", n(&p["total"]), counts_line(p)),
        ),
        (
            "calls",
            format!(
                "{} placed, {} answered, {} voicemail",
                n(&p["calls_placed"]),
                n(&p["answered"]),
                n(&p["voicemail"])
            ),
        ),
        ("eta", p["eta"].as_str().unwrap_or("-").into()),
    ]);
}

fn print_report(r: &Value) {
    println!(
        "accepted {}, duplicates {}, suppressed (do-not-call) {}, rejected {}",
        n(&r["accepted"]),
        n(&r["duplicates"]),
        n(&r["suppressed"]),
        r["rejected"].as_array().map(Vec::len).unwrap_or(0)
    );
    if let Some(rows) = r["rejected"].as_array()
        && !rows.is_empty()
    {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|x| {
                vec![
                    x["row"].to_string(),
                    x["to"].as_str().unwrap_or("").into(),
                    x["error"].as_str().unwrap_or("").into(),
                ]
            })
            .collect();
        output::table(&["ROW", "TO", "ERROR"], &table);
    }
}

pub fn campaign(ctx: &Ctx, cmd: CampaignCmd) -> anyhow::Result<ExitCode> {
    let server = connect(ctx)?;
    let rt = runtime()?;
    rt.block_on(async {
        match cmd {
            CampaignCmd::Create {
                name,
                csv,
                tenant,
                greeting,
                prompt,
                hours,
                max_concurrent,
                calls_per_second,
                from_number,
                paused,
            } => {
                let data = std::fs::read(&csv)
                    .with_context(|| format!("cannot read {}", csv.display()))?;
                let mut body = json!({"name": name, "paused": paused});
                for (k, v) in [
                    ("tenant", &tenant),
                    ("greeting", &greeting),
                    ("system_prompt", &prompt),
                    ("from", &from_number),
                ] {
                    if let Some(v) = v {
                        body[k] = json!(v);
                    }
                }
                if let Some(h) = hours {
                    let Some((start, end)) = h.split_once('-') else {
                        bail!("--hours: use START-END, e.g. 09:00-20:00");
                    };
                    body["calling_hours"] = json!({"start": start.trim(), "end": end.trim()});
                }
                if let Some(m) = max_concurrent {
                    body["max_concurrent"] = json!(m);
                }
                if let Some(c) = calls_per_second {
                    body["calls_per_second"] = json!(c);
                }
                let created = server.post("/api/v1/campaigns", &body).await?;
                let id = created["id"].as_str().unwrap_or_default().to_owned();
                let bar = ProgressBar::new(data.len() as u64);
                bar.set_style(
                    ProgressStyle::with_template(
                        "uploading {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                let b = bar.clone();
                let report = server
                    .upload(
                        &format!("/api/v1/campaigns/{id}/recipients"),
                        "text/csv",
                        data,
                        move |k| b.inc(k),
                    )
                    .await;
                bar.finish_and_clear();
                let report = report?;
                if ctx.json {
                    output::json(&json!({"campaign": created, "import": report}))?;
                } else {
                    println!("campaign {id} created");
                    print_report(&report);
                }
            }
            CampaignCmd::List => {
                let v = server.get("/api/v1/campaigns").await?;
                if ctx.json {
                    return output::json(&v).map(|_| ExitCode::SUCCESS);
                }
                let rows: Vec<Vec<String>> = v["campaigns"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| {
                        let p = &c["progress"];
                        vec![
                            c["id"].as_str().unwrap_or("").into(),
                            c["name"].as_str().unwrap_or("").into(),
                            c["tenant"].as_str().unwrap_or("").into(),
                            c["status"].as_str().unwrap_or("").into(),
                            format!("{}/{}", finished(p), n(&p["total"])),
                            n(&p["answered"]).to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &["ID", "NAME", "TENANT", "STATUS", "FINISHED", "ANSWERED"],
                    &rows,
                );
            }
            CampaignCmd::Show { id, watch } => {
                let path = format!("/api/v1/campaigns/{id}");
                if !watch {
                    let c = server.get(&path).await?;
                    if ctx.json {
                        output::json(&c)?;
                    } else {
                        print_campaign(&c);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} finished  {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                loop {
                    let c = server.get(&path).await?;
                    let p = &c["progress"];
                    let status = c["status"].as_str().unwrap_or("");
                    if ctx.json {
                        println!("{c}");
                    } else {
                        bar.set_length(n(&p["total"]) as u64);
                        bar.set_position(finished(p) as u64);
                        bar.set_message(format!("{status} · {}", counts_line(p)));
                    }
                    if status == "completed" || status == "canceled" {
                        bar.finish_and_clear();
                        if !ctx.json {
                            print_campaign(&c);
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            CampaignCmd::Pause { id } => act(ctx, &server, &id, "pause").await?,
            CampaignCmd::Resume { id } => act(ctx, &server, &id, "resume").await?,
            CampaignCmd::Cancel { id } => act(ctx, &server, &id, "cancel").await?,
            CampaignCmd::Results { id, output: out } => {
                let data = server
                    .get_bytes(&format!("/api/v1/campaigns/{id}/results.csv"))
                    .await?;
                match out {
                    Some(path) => {
                        std::fs::write(&path, &data)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        if ctx.json {
                            output::json(&json!({"written": path, "bytes": data.len()}))?;
                        } else {
                            eprintln!("wrote {}", path.display());
                        }
                    }
                    None => {
                        use std::io::Write;
                        std::io::stdout().write_all(&data)?;
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn act(ctx: &Ctx, server: &LocalServer, id: &str, what: &str) -> anyhow::Result<()> {
    let c = server
        .post(&format!("/api/v1/campaigns/{id}/{what}"), &json!({}))
        .await?;
    if ctx.json {
        output::json(&c)
    } else {
        println!("campaign {id} is {}", c["status"].as_str().unwrap_or("?"));
        Ok(())
    }
}

/// Numbers in a file: one per line, or CSV (the `to` column, else the first).
fn numbers_of(text: &str) -> Vec<String> {
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let mut col = 0;
    let mut out = Vec::new();
    for (i, rec) in rd.records().flatten().enumerate() {
        if i == 0
            && let Some(p) = rec.iter().position(|h| h.trim() == "to")
        {
            col = p;
            continue;
        }
        if let Some(v) = rec.get(col).map(str::trim).filter(|v| !v.is_empty()) {
            out.push(v.to_owned());
        }
    }
    out
}

pub fn dnc(ctx: &Ctx, cmd: DncCmd) -> anyhow::Result<ExitCode> {
    let server = connect(ctx)?;
    let rt = runtime()?;
    rt.block_on(async {
        let (numbers, tenant) = match cmd {
            DncCmd::List { tenant } => {
                let v = server
                    .get(&format!("/api/v1/dnc{}", tenant_query(&tenant)))
                    .await?;
                if ctx.json {
                    output::json(&v)?;
                } else {
                    for x in v["numbers"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                    {
                        println!("{}", x.as_str().unwrap_or(""));
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            DncCmd::Rm { number, tenant } => {
                let enc = percent_encoding::utf8_percent_encode(
                    &number,
                    percent_encoding::NON_ALPHANUMERIC,
                );
                server
                    .delete(&format!("/api/v1/dnc/{enc}{}", tenant_query(&tenant)))
                    .await?;
                if ctx.json {
                    output::json(&json!({"removed": number}))?;
                } else {
                    println!("removed {number}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            DncCmd::Add { numbers, tenant } => (numbers, tenant),
            DncCmd::Import { file, tenant } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                (numbers_of(&text), tenant)
            }
        };
        if numbers.is_empty() {
            bail!("no numbers given");
        }
        let mut body = json!({"numbers": numbers});
        if let Some(t) = tenant {
            body["tenant"] = json!(t);
        }
        let v = server.post("/api/v1/dnc", &body).await?;
        if ctx.json {
            output::json(&v)?;
        } else {
            println!("{} added ({} given)", n(&v["added"]), numbers.len());
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnc_files_one_per_line_or_csv() {
        assert_eq!(
            numbers_of("+14155550100\n\n+14155550101\n"),
            vec!["+14155550100", "+14155550101"]
        );
        assert_eq!(
            numbers_of("name,to\nAnn,+14155550100\n"),
            vec!["+14155550100"]
        );
    }
}

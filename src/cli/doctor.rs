//! `voicectl doctor`: runs the checks in `ops::doctor` and prints one line per check.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use super::{Ctx, output};
use crate::ops::doctor::{self, Check, Level};

pub fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let checks: Vec<Check> = match ctx.load_config() {
        Err(e) => vec![doctor::config_failure(&e)],
        Ok(cfg) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(doctor::run(&cfg)),
    };
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    let warned = checks.iter().filter(|c| c.level == Level::Warn).count();
    if ctx.json {
        output::json(&json!({"ok": failed == 0, "checks": checks}))?;
    } else {
        let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            println!("{:<4}  {:<w$}  {}", c.level.as_str(), c.name, c.detail);
            if let Some(h) = &c.hint {
                println!("{:<4}  {:<w$}  fix: {h}", "", "");
            }
        }
        println!(
            "\n{} checks: {} OK, {warned} WARN, {failed} FAIL",
            checks.len(),
            checks.len() - failed - warned
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

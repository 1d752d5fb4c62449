//! SIGHUP: re-read the config file and put what can change at runtime in force, without
//! touching live calls (each keeps the configuration snapshot it started with).
//!
//! Reloadable: `[agent]`, `[openai]`, `server.max_concurrent_calls`, `server.queue_timeout`,
//! `limits.calls_per_minute_per_tenant` and the `[[proxy]]` routes (manual certificates are
//! re-read by the TLS module on the same signal). Everything else is bound to something built at startup (listeners, the data
//! directory, the Twilio and Ultravox clients, per-IP limiters), so a change there is reported
//! as "needs a restart" and the running value is kept — the server never runs half of a config.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::{Config, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload (serve --dev without --config)")]
    NoFile,
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Keys now in force with their new values.
    pub applied: Vec<String>,
    /// Keys whose new value waits for a restart (the running value is kept).
    pub needs_restart: Vec<String>,
}

/// Loads the file the running config came from. An unreadable or invalid file changes
/// nothing: the caller keeps running on `current`.
pub fn load(current: &Config) -> Result<(Config, Outcome), ReloadError> {
    let path: PathBuf = current.source.clone().ok_or(ReloadError::NoFile)?;
    let new = Config::load(&path)?;
    Ok(merge(current, new))
}

/// The config to run with: `new` for reloadable keys, `old` for the rest.
pub fn merge(old: &Config, new: Config) -> (Config, Outcome) {
    let mut next = old.clone();
    let mut out = Outcome::default();
    let mut take = |key: &str, changed: bool, apply: &mut dyn FnMut(&mut Config)| {
        if changed {
            out.applied.push(key.to_owned());
            apply(&mut next);
        }
    };
    take("agent", differs(&old.agent, &new.agent), &mut |c| {
        c.agent = new.agent.clone()
    });
    take(
        "openai",
        differs(&old.openai, &new.openai)
            || old.openai.api_key.expose() != new.openai.api_key.expose(),
        &mut |c| c.openai = new.openai.clone(),
    );
    take(
        "server.max_concurrent_calls",
        old.server.max_concurrent_calls != new.server.max_concurrent_calls,
        &mut |c| c.server.max_concurrent_calls = new.server.max_concurrent_calls,
    );
    take(
        "server.queue_timeout",
        old.server.queue_timeout != new.server.queue_timeout,
        &mut |c| c.server.queue_timeout = new.server.queue_timeout,
    );
    take(
        "limits.calls_per_minute_per_tenant",
        old.limits.calls_per_minute_per_tenant != new.limits.calls_per_minute_per_tenant,
        &mut |c| c.limits.calls_per_minute_per_tenant = new.limits.calls_per_minute_per_tenant,
    );
    take("proxy", differs(&old.proxy, &new.proxy), &mut |c| {
        c.proxy = new.proxy.clone()
    });
    // Compare what is left with the reloadable parts taken out of both sides.
    let mut rest_old = old.clone();
    let mut rest_new = new.clone();
    for c in [&mut rest_old, &mut rest_new] {
        c.agent = Default::default();
        c.openai = Default::default();
        c.server.max_concurrent_calls = 0;
        c.server.queue_timeout = crate::config::HumanDuration::from_secs(0);
        c.limits.calls_per_minute_per_tenant = 0;
        c.proxy = Vec::new();
    }
    let sections: [(&str, bool); 5] = [
        ("server", differs(&rest_old.server, &rest_new.server)),
        ("tls", differs(&rest_old.tls, &rest_new.tls)),
        (
            "twilio",
            differs(&rest_old.twilio, &rest_new.twilio)
                || old.twilio.auth_token.expose() != new.twilio.auth_token.expose(),
        ),
        (
            "ultravox",
            differs(&rest_old.ultravox, &rest_new.ultravox)
                || old.ultravox.api_key.expose() != new.ultravox.api_key.expose(),
        ),
        ("limits", differs(&rest_old.limits, &rest_new.limits)),
    ];
    for (name, changed) in sections {
        if changed {
            out.needs_restart.push(name.to_owned());
        }
    }
    (next, out)
}

/// Reloads on every SIGHUP until the process ends. A bad file is logged and changes nothing.
pub fn spawn(
    mut reloads: tokio::sync::watch::Receiver<u64>,
    state: crate::http::AppState,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let manager = state.calls().clone();
        while reloads.changed().await.is_ok() {
            let current = manager.config();
            // Reading and validating the file touches the disk: keep it off the reactor.
            let result = tokio::task::spawn_blocking(move || load(&current)).await;
            match result {
                Ok(Ok((next, out))) => {
                    if out.applied.iter().any(|k| k == "proxy") {
                        // Validated with the rest of the file, so this cannot fail here.
                        match crate::proxy::ProxyTable::from_config(&next.proxy) {
                            Ok(table) => state.proxy().reload(table),
                            Err(e) => tracing::error!(error = %e, "proxy routes not reloaded"),
                        }
                    }
                    manager.replace_config(std::sync::Arc::new(next));
                    tracing::info!(
                        applied = ?out.applied,
                        "config reloaded; new calls use it, live calls keep theirs"
                    );
                    if !out.needs_restart.is_empty() {
                        tracing::warn!(
                            sections = ?out.needs_restart,
                            "these changes take effect after a restart; running values kept"
                        );
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "config reload failed; still running the previous config")
                }
                Err(e) => tracing::error!(error = %e, "config reload task failed"),
            }
        }
    })
}

/// Secrets serialize redacted, so callers compare those separately.
fn differs<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EngineKind, HumanDuration, Secret};

    #[test]
    fn reloadable_keys_apply_and_the_rest_waits_for_a_restart() {
        let old = Config::dev();
        let mut new = old.clone();
        new.agent.greeting = "Hi there".into();
        new.agent.engine = EngineKind::OpenAiRealtime;
        new.openai.api_key = Secret::new("sk-new");
        new.server.max_concurrent_calls = 7;
        new.server.queue_timeout = HumanDuration::from_secs(5);
        new.server.listen = "127.0.0.1:9999".into();
        new.twilio.auth_token = Secret::new("rotated");
        new.proxy.push(crate::config::ProxyRoute {
            host: None,
            path: "/app".into(),
            upstream: Some("http://127.0.0.1:3000".into()),
            root: None,
        });
        let (next, out) = merge(&old, new);
        assert_eq!(
            out.applied,
            [
                "agent",
                "openai",
                "server.max_concurrent_calls",
                "server.queue_timeout",
                "proxy"
            ]
        );
        assert_eq!(next.proxy.len(), 1);
        assert_eq!(out.needs_restart, ["server", "twilio"]);
        assert_eq!(next.agent.greeting, "Hi there");
        assert_eq!(next.openai.api_key.expose(), "sk-new");
        assert_eq!(next.server.max_concurrent_calls, 7);
        // Kept until a restart: the listener and the Twilio credentials in use.
        assert_eq!(next.server.listen, old.server.listen);
        assert_eq!(next.twilio.auth_token.expose(), "dev-auth-token");
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let old = Config::dev();
        let (next, out) = merge(&old, old.clone());
        assert_eq!(out, Outcome::default());
        assert!(!differs(&next, &old));
    }
}

//! The real binary's offline commands: init, tenants, keys, config errors, backup.

use std::os::unix::fs::PermissionsExt;

use crate::support::{BIN, Install};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_config_db_and_private_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("etc/voicectl.toml");
    let data = dir.path().join("data");
    let run = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args([
                "init",
                "--domain",
                "voice.example.com",
                "--email",
                "ops@example.com",
                "--data-dir",
            ])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("https://voice.example.com/twilio/voice"),
        "{stdout}"
    );
    let key_file = data.join("admin.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(stdout.contains(key.trim()), "the admin key is printed once");
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("voicectl.db")), 0o600);
    assert_eq!(mode(&cfg), 0o600);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("domain = \"voice.example.com\"")
            && text.contains("acme_email = \"ops@example.com\"")
    );
    // A loopback-only plain listener, so `status`, `call` and `cert renew` reach the server.
    assert!(text.contains("\nlisten = \"127.0.0.1:7080\""), "{text}");

    // Refuses to overwrite; the file is untouched.
    std::fs::write(&cfg, format!("{text}\n# edited by operator\n")).unwrap();
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("edited by operator")
    );

    // --force rewrites the config but keeps the existing admin key.
    let out = run(&["--force"]);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(key.trim()));

    // The config init wrote is one serve accepts (validated by the doctor-free path: tenant list).
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["tenant", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn init_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("v.toml");
    for args in [
        vec!["init"],
        vec!["init", "--domain", "https://x.com/"],
        vec!["init", "--domain", "x.com", "--email", "nope"],
    ] {
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!cfg.exists(), "{args:?} wrote a config");
    }
}

#[test]
fn tenants_and_keys_from_the_cli() {
    let i = Install::new();
    i.init();
    let t = i.json(&[
        "tenant",
        "add",
        "acme",
        "--company",
        "Acme Inc",
        "--number",
        "+14155550100",
        "--number",
        "+14155550101",
        "--greeting",
        "Hi!",
        "--max-concurrent",
        "3",
    ]);
    assert_eq!(t["numbers"].as_array().unwrap().len(), 2);
    assert_eq!(t["max_concurrent_calls"], 3);
    let out = i.ok(&["tenant", "list"]);
    assert!(out.contains("acme") && out.contains("Acme Inc"), "{out}");
    let t = i.json(&[
        "tenant",
        "update",
        "acme",
        "--greeting",
        "",
        "--voice",
        "verse",
    ]);
    assert_eq!(
        (t["greeting"].is_null(), t["voice"].as_str()),
        (true, Some("verse"))
    );

    let k = i.json(&[
        "key",
        "create",
        "--tenant",
        "acme",
        "--name",
        "prod",
        "--expires",
        "90d",
    ]);
    let secret = k["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("vk_"));
    let listing = i.ok(&["key", "list", "--tenant", "acme"]);
    assert!(
        listing.contains(k["id"].as_str().unwrap()) && !listing.contains(&secret),
        "{listing}"
    );
    let human = i.ok(&["key", "create", "--tenant", "acme"]);
    assert!(human.contains("only time"), "{human}");
    i.ok(&["key", "revoke", k["id"].as_str().unwrap()]);
    let keys = i.json(&["key", "list", "--tenant", "acme"]);
    assert_eq!(keys[0]["status"], "revoked");

    // No secret ever reaches the database file (or its WAL).
    for f in ["voicectl.db", "voicectl.db-wal"] {
        if let Ok(bytes) = std::fs::read(i.data_dir.join(f)) {
            let secret_part = secret.rsplit('_').next().unwrap();
            assert!(
                !bytes
                    .windows(secret_part.len())
                    .any(|w| w == secret_part.as_bytes()),
                "{f} holds a key secret"
            );
        }
    }
    i.ok(&["tenant", "rm", "acme"]);
    assert!(i.fails(&["tenant", "show", "acme"]).contains("not found"));
}

#[test]
fn bad_cli_input_fails_clearly_and_changes_nothing() {
    let i = Install::new();
    i.init();
    i.ok(&["tenant", "add", "acme", "--number", "+14155550100"]);
    let before = i.db_snapshot();
    for (args, needle) in [
        (vec!["tenant", "add", "Bad_Name"], "not a valid tenant name"),
        (vec!["tenant", "add", "acme"], "already exists"),
        (
            vec!["tenant", "add", "other", "--number", "+14155550100"],
            "already belongs",
        ),
        (
            vec!["tenant", "add", "other", "--number", "555-1234"],
            "E.164",
        ),
        (vec!["tenant", "add", "other", "--from", "0044"], "E.164"),
        (
            vec!["tenant", "update", "acme", "--engine", "gpt"],
            "unknown engine",
        ),
        (
            vec!["tenant", "update", "nobody", "--company", "x"],
            "not found",
        ),
        (vec!["key", "create", "--tenant", "nobody"], "not found"),
        (
            vec!["key", "create", "--tenant", "acme", "--expires", "soon"],
            "--expires",
        ),
        (vec!["key", "revoke", "nosuchkey"], "not found"),
        (vec!["tenant", "rm", "nobody"], "not found"),
    ] {
        let err = i.fails(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
    assert_eq!(
        i.db_snapshot(),
        before,
        "failed commands changed the database"
    );
}

#[test]
fn tenant_with_calls_needs_force_and_leaves_no_orphans() {
    let i = Install::new();
    i.init();
    i.ok(&["tenant", "add", "acme"]);
    i.ok(&["key", "create", "--tenant", "acme"]);
    let c = rusqlite::Connection::open(i.data_dir.join("voicectl.db")).unwrap();
    c.execute(
        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, status, engine, created_at, updated_at) \
         SELECT 'call_aaaaaaaaaaaaaaaaaaaa', id, 'outbound', '+14155550100', '+14155550199', 'completed', 'scripted', 1, 1 FROM tenants",
        [],
    )
    .unwrap();
    c.execute("INSERT INTO transcript_entries (call_id, speaker, text, at_ms) VALUES ('call_aaaaaaaaaaaaaaaaaaaa', 'agent', 'hi', 0)", []).unwrap();
    assert!(i.fails(&["tenant", "rm", "acme"]).contains("--force"));
    assert_eq!(
        i.ok(&["calls", "list"]).lines().count(),
        2,
        "header + the call"
    );
    i.ok(&["tenant", "rm", "acme", "--force"]);
    for table in [
        "tenants",
        "api_keys WHERE is_admin = 0",
        "calls",
        "transcript_entries",
    ] {
        let n: i64 = c
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
}

#[test]
fn config_errors_name_key_and_line() {
    let i = Install::with_extra("\n[agent]\nengine = \"scripted\"\nvoise = \"alloy\"\n");
    let err = i.fails(&["tenant", "list"]);
    assert!(err.contains("voise") && err.contains("line 14"), "{err}");

    let i = Install::with_extra("\n[limits\n");
    let err = i.fails(&["serve"]);
    assert!(err.contains("line"), "{err}");

    let i = Install::with_extra("\n[twilio]\nauth_token_file = \"/nonexistent/secret\"\n");
    let err = i.fails(&["serve"]);
    assert!(
        err.contains("twilio.auth_token_file") && err.contains("/nonexistent/secret"),
        "{err}"
    );

    let i = Install::with_extra("\n[server]\n");
    assert!(
        i.fails(&["serve"]).contains("server"),
        "duplicate table is reported"
    );

    let out = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/v.toml", "tenant", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("voicectl init"));
}

#[test]
fn unavailable_commands_say_so_and_fail() {
    let i = Install::new();
    i.init();
    // With TLS off there is nothing to show, and `cert` says so plainly.
    let out = i.ok(&["cert", "status"]);
    assert!(out.contains("TLS is off"), "{out}");
    // Commands that need the server say so when it is not running.
    for args in [vec!["call", "+14155550100"], vec!["calls", "end", "call_x"]] {
        let err = i.fails(&args);
        assert!(err.contains("not running"), "{args:?}: {err}");
    }
    assert!(i.fails(&["call", "0800-NOPE"]).contains("E.164"));
}

#[test]
fn every_command_has_help_and_completions_work() {
    for args in [
        vec!["--help"],
        vec!["init", "--help"],
        vec!["serve", "--help"],
        vec!["call", "--help"],
        vec!["calls", "list", "--help"],
        vec!["tenant", "add", "--help"],
        vec!["key", "create", "--help"],
        vec!["cert", "renew", "--help"],
        vec!["status", "--help"],
        vec!["backup", "--help"],
        vec!["doctor", "--help"],
        vec!["completions", "--help"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
    let out = std::process::Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("voicectl"));
}

#[test]
fn backup_is_a_consistent_copy() {
    let i = Install::new();
    i.init();
    i.ok(&["tenant", "add", "acme"]);
    let target = i.dir.path().join("backup.db");
    i.ok(&["backup", target.to_str().unwrap()]);
    let c = rusqlite::Connection::open(&target).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert!(
        i.fails(&["backup", target.to_str().unwrap()])
            .contains("already exists")
    );
}

//! Shared test fixtures: temp installs, running the real binary, a kill-on-drop server.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_voicectl");

/// A throwaway install: a config file and a data dir under one temp dir.
pub struct Install {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data_dir: PathBuf,
}

impl Install {
    /// A config with plain HTTP on an ephemeral loopback port and TLS off.
    pub fn new() -> Install {
        Self::with_extra("")
    }

    pub fn with_extra(extra: &str) -> Install {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let config = dir.path().join("voicectl.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ndomain = \"voice.test\"\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\n\
                 http_listen = \"\"\nhttps_listen = \"\"\ndrain_timeout = \"5s\"\n\n[tls]\nmode = \"off\"\n{extra}",
                data_dir
            ),
        )
        .expect("write config");
        Install {
            dir,
            config,
            data_dir,
        }
    }

    /// Runs `voicectl --config <ours> args…` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("VOICECTL_CONFIG")
            .output()
            .expect("run voicectl")
    }

    /// Like `run`, but the command must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "voicectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Like `run`, but the command must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "voicectl {args:?} should have failed but printed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf8")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("json output")
    }

    /// `init` with our config's data dir, returning the admin key.
    pub fn init(&self) -> String {
        // init writes its own config; keep ours (ephemeral port) by writing init's elsewhere.
        let init_cfg = self.dir.path().join("init.toml");
        let out = Command::new(BIN)
            .args(["--json", "--config"])
            .arg(&init_cfg)
            .args(["init", "--dev", "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .expect("run init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("init json");
        v["admin_key"].as_str().expect("new admin key").to_owned()
    }

    /// A snapshot of everything a test may claim "did not change".
    pub fn db_snapshot(&self) -> String {
        let c = rusqlite::Connection::open(self.data_dir.join("voicectl.db")).expect("open db");
        let mut out = String::new();
        for table in ["tenants", "tenant_numbers", "api_keys", "calls"] {
            let mut st = c
                .prepare(&format!("SELECT * FROM {table} ORDER BY 1"))
                .unwrap();
            let n = st.column_count();
            let rows = st
                .query_map([], |r| {
                    let mut s = String::new();
                    for i in 0..n {
                        let v: rusqlite::types::Value = r.get(i)?;
                        s.push_str(&format!("{v:?}|"));
                    }
                    Ok(s)
                })
                .unwrap();
            for r in rows {
                out.push_str(&format!("{table}:{}\n", r.unwrap()));
            }
        }
        out
    }
}

/// A running `voicectl serve`; SIGTERM on drop, SIGKILL if it will not stop.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub logs: mpsc::Receiver<String>,
    /// Output before the "listening" line (startup warnings, first issuance).
    pub startup: Vec<String>,
}

impl Server {
    pub fn start(install: &Install) -> Server {
        Self::start_args(
            &["--config", install.config.to_str().unwrap(), "serve"],
            None,
        )
    }

    pub fn start_args(args: &[&str], cwd: Option<&Path>) -> Server {
        Self::start_env(args, cwd, &[])
    }

    /// Like `start_args`, with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_env(args: &[&str], cwd: Option<&Path>, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("VOICECTL_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().expect("spawn serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx2.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        // Wait for the "listening" log line (JSON, since stdout is a pipe) and take its address.
        let mut seen = Vec::new();
        let addr = loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v["message"] == "listening"
                    {
                        break v["addr"]
                            .as_str()
                            .expect("addr")
                            .parse()
                            .expect("socket addr");
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("server did not start; output:\n{}", seen.join("\n"));
                }
            }
        };
        Server {
            child: Some(child),
            addr,
            logs: rx,
            startup: seen,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Waits (bounded) for the server to exit by itself, e.g. after a signal sent elsewhere.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(within) {
            Ok(st) => st.expect("wait"),
            Err(_) => {
                // SAFETY: kill(2) on our own child's pid; the waiter thread reaps it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("server did not exit within {within:?}");
            }
        }
    }

    /// SIGKILL: a crash, with no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(st) => st.expect("wait"),
            Err(_) => {
                // SAFETY: as above; the waiter thread reaps it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("server did not exit within 15 s of SIGTERM");
            }
        }
    }

    /// Collected output so far (for assertions on logs).
    pub fn drain_logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as above.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

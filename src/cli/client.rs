//! Talking to the running server from the same box: its address comes from
//! `DATA_DIR/serve.json`, its admin key from `DATA_DIR/admin.key` (0600: root or the service
//! user can read it, nobody else).

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::Value;

use crate::config::Config;
use crate::domain::layout::{ADMIN_KEY_FILE, RUNTIME_FILE, runtime_info};

pub struct LocalServer {
    pub base: String,
    key: String,
    http: reqwest::Client,
}

impl LocalServer {
    pub fn connect(cfg: &Config) -> anyhow::Result<Self> {
        let dir = &cfg.server.data_dir;
        let Some(info) = runtime_info(dir) else {
            bail!(
                "the server is not running (no {}); start it with `voicectl serve`",
                dir.join(RUNTIME_FILE).display()
            );
        };
        let Some(addr) = info.listen else {
            bail!("the running server has no plain-HTTP listener to talk to locally");
        };
        let key_path = dir.join(ADMIN_KEY_FILE);
        let key = std::fs::read_to_string(&key_path)
            .with_context(|| {
                format!(
                    "cannot read {} (run as root or the voicectl user)",
                    key_path.display()
                )
            })?
            .trim()
            .to_owned();
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            addr.ip().to_string()
        };
        let base = if addr.is_ipv6() && host != "127.0.0.1" {
            format!("http://[{host}]:{}", addr.port())
        } else {
            format!("http://{host}:{}", addr.port())
        };
        Ok(Self {
            base,
            key,
            http: reqwest::Client::new(),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req.bearer_auth(&self.key).send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the server at {}: {e} (is `voicectl serve` running?)",
                self.base
            )
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Follows a Server-Sent Events stream, calling `on_event(name, data)` per event.
    pub async fn follow(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &Value),
    ) -> anyhow::Result<()> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        if !resp.status().is_success() {
            bail!("cannot follow the call (HTTP {})", resp.status().as_u16());
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(
                &chunk.context("event stream broke")?,
            ));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut name = "message";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = if v.trim() == "status" {
                            "status"
                        } else if v.trim() == "transcript" {
                            "transcript"
                        } else {
                            "other"
                        };
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Ok(v) = serde_json::from_str::<Value>(&data) {
                    on_event(name, &v);
                }
            }
        }
        Ok(())
    }
}

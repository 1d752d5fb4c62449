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
            // The admin key never follows a redirect to another host.
            http: reqwest::Client::builder()
                .redirect(crate::ops::outbound::provider_redirects())
                .build()?,
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

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(())
    }

    /// A non-JSON body (CSV results).
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(resp.bytes().await?.to_vec())
    }

    /// POSTs `data` as `content_type`, streamed in chunks; `sent(n)` after each chunk.
    pub async fn upload(
        &self,
        path: &str,
        content_type: &str,
        data: Vec<u8>,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> anyhow::Result<Value> {
        const CHUNK: usize = 256 * 1024;
        let len = data.len();
        let chunks: Vec<Vec<u8>> = data.chunks(CHUNK).map(<[u8]>::to_vec).collect();
        let stream = futures_util::stream::iter(chunks.into_iter().map(move |c| {
            sent(c.len() as u64);
            Ok::<_, std::io::Error>(c)
        }));
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .header("content-length", len)
                .body(reqwest::Body::wrap_stream(stream)),
        )
        .await
    }

    /// Follows a Server-Sent Events stream, calling `on_event(name, data)` per event.
    pub async fn follow(
        &self,
        path: &str,
        on_event: impl FnMut(&str, &Value),
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
        read_events(resp.bytes_stream(), on_event).await
    }
}

/// Reads Server-Sent Events from a byte stream and calls `on_event(name, data)` for each one
/// whose data is JSON (`name` is "status", "transcript" or "other"). The SSE crate decodes
/// UTF-8 across chunk boundaries, so a character split between two reads arrives whole.
async fn read_events<S, B, E>(
    stream: S,
    mut on_event: impl FnMut(&str, &Value),
) -> anyhow::Result<()>
where
    S: futures_util::Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    use eventsource_stream::Eventsource;
    let events = stream.eventsource();
    futures_util::pin_mut!(events);
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| anyhow::anyhow!("event stream broke: {e}"))?;
        let name = match ev.event.as_str() {
            "status" => "status",
            "transcript" => "transcript",
            _ => "other",
        };
        if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
            on_event(name, &v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_character_split_across_chunks_arrives_whole() {
        let text = "event: transcript\ndata: {\"text\":\"Grüße 😀\"}\n\n";
        let bytes = text.as_bytes();
        // Cut inside "ü" (2 bytes) and inside the emoji (4 bytes).
        let u = text.find('ü').unwrap() + 1;
        let e = text.find('😀').unwrap() + 2;
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(bytes[..u].to_vec()),
            Ok(bytes[u..e].to_vec()),
            Ok(bytes[e..].to_vec()),
        ];
        let mut got = Vec::new();
        read_events(futures_util::stream::iter(chunks), |name, v| {
            got.push((name.to_owned(), v["text"].as_str().unwrap_or("").to_owned()))
        })
        .await
        .unwrap();
        assert_eq!(got, [("transcript".to_owned(), "Grüße 😀".to_owned())]);
    }
}

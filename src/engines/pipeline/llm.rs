//! OpenAI-compatible chat completions, streamed (WAVE2-PROTOCOLS §1): SSE
//! `chat.completion.chunk` lines until `data: [DONE]`. A stream that ends without `[DONE]`
//! is a failure (the reply may be cut). Tool-call deltas are put together by `index` (their
//! `arguments` arrive as a JSON string split across chunks); the engine runs them.

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::LlmConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, PartialEq)]
pub enum LlmEvent {
    Token(String),
    Done { tool_calls: Vec<ToolCall> },
    Failed(String),
}

/// A running request; dropping it cancels the request (the connection is closed).
pub struct LlmStream {
    pub rx: mpsc::Receiver<LlmEvent>,
    task: JoinHandle<()>,
}

impl Drop for LlmStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    index: usize,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// Tool calls assembled from their deltas, by index.
#[derive(Default)]
pub struct ToolCalls(Vec<ToolCall>);

impl ToolCalls {
    fn apply(&mut self, d: ToolCallDelta) {
        while self.0.len() <= d.index {
            self.0.push(ToolCall {
                id: String::new(),
                name: String::new(),
                arguments: String::new(),
            });
        }
        let t = &mut self.0[d.index];
        if let Some(id) = d.id {
            t.id = id;
        }
        if let Some(f) = d.function {
            if let Some(n) = f.name {
                t.name.push_str(&n);
            }
            if let Some(a) = f.arguments {
                t.arguments.push_str(&a);
            }
        }
    }
}

/// The request body: the system prompt, then the conversation.
pub fn request_body(cfg: &LlmConfig, messages: &[Value]) -> Value {
    json!({
        "model": cfg.model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": cfg.temperature,
        "messages": messages,
    })
}

/// Chat completions' `tools`: each function the model may call.
pub fn tools_json(tools: &[crate::engines::ToolSpec]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect(),
    )
}

/// Starts a streaming request; events arrive on the returned stream's channel. `tools` (a
/// [`tools_json`] array) is sent when not empty.
pub fn start(
    http: reqwest::Client,
    cfg: LlmConfig,
    messages: Vec<Value>,
    tools: Value,
) -> LlmStream {
    let (tx, rx) = mpsc::channel(256);
    let mut body = request_body(&cfg, &messages);
    if tools.as_array().is_some_and(|t| !t.is_empty()) {
        body["tools"] = tools;
    }
    let task = tokio::spawn(async move {
        let r = run(&http, &cfg, &body, &tx).await;
        let ev = match r {
            Ok(tool_calls) => LlmEvent::Done { tool_calls },
            Err(e) => LlmEvent::Failed(e),
        };
        let _ = tx.send(ev).await;
    });
    LlmStream { rx, task }
}

/// One whole answer (no tool calls expected), streamed like every other request so every
/// OpenAI-compatible server and our fake speak it; `extra` joins the request body (e.g.
/// `response_format`).
pub async fn complete(
    http: &reqwest::Client,
    cfg: &LlmConfig,
    messages: &[Value],
    extra: Value,
) -> Result<String, String> {
    let mut body = request_body(cfg, messages);
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    let (tx, mut rx) = mpsc::channel(256);
    let request = async move { run(http, cfg, &body, &tx).await };
    let collect = async {
        let mut text = String::new();
        while let Some(LlmEvent::Token(t)) = rx.recv().await {
            text.push_str(&t);
        }
        text
    };
    let (r, text) = tokio::join!(request, collect);
    r.map(|_| text)
}

async fn run(
    http: &reqwest::Client,
    cfg: &LlmConfig,
    body: &Value,
    tx: &mpsc::Sender<LlmEvent>,
) -> Result<Vec<ToolCall>, String> {
    let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
    let mut req = http.post(&url).json(body);
    if !cfg.api_key.is_empty() {
        req = req.bearer_auth(cfg.api_key.expose());
    }
    let resp = req.send().await.map_err(|e| {
        format!(
            "cannot reach {}: {}",
            crate::engines::pipeline::host_of(&url),
            e.without_url()
        )
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(match status.as_u16() {
            401 | 403 => format!("HTTP {}: check the api_key", status.as_u16()),
            s => format!("HTTP {s}"),
        });
    }
    let mut events = resp.bytes_stream().eventsource();
    let mut tools = ToolCalls::default();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| format!("stream broken: {e}"))?;
        let data = ev.data.trim();
        if data == "[DONE]" {
            return Ok(tools.0);
        }
        if data.is_empty() {
            continue;
        }
        let chunk: Chunk =
            serde_json::from_str(data).map_err(|_| "sent a chunk that is not JSON".to_owned())?;
        for c in chunk.choices {
            for t in c.delta.tool_calls {
                tools.apply(t);
            }
            if let Some(text) = c.delta.content.filter(|t| !t.is_empty())
                && tx.send(LlmEvent::Token(text)).await.is_err()
            {
                return Ok(tools.0);
            }
        }
    }
    Err("the stream ended without [DONE]".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_arguments_are_joined_by_index() {
        let mut t = ToolCalls::default();
        let d = |v: Value| serde_json::from_value::<ToolCallDelta>(v).unwrap();
        t.apply(d(json!({"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}})));
        t.apply(d(json!({"index": 1, "id": "call_2", "function": {"name": "book", "arguments": "{\"a\""}})));
        t.apply(d(json!({"index": 0, "function": {"arguments": "{\"q\":"}})));
        t.apply(d(json!({"index": 0, "function": {"arguments": "\"x\"}"}})));
        t.apply(d(json!({"index": 1, "function": {"arguments": ":1}"}})));
        assert_eq!(t.0[0].name, "lookup");
        assert_eq!(t.0[0].arguments, "{\"q\":\"x\"}");
        assert_eq!(t.0[1].id, "call_2");
        assert_eq!(t.0[1].arguments, "{\"a\":1}");
    }
}

//! Tenant HTTP tools (SPEC §8): the tools API and CLI against the real binary.

use serde_json::{Value, json};

use crate::support::{Install, Server};

/// An install whose tools may call loopback (`allow_private_targets`), with tenants `acme` and
/// `other` and a key for each.
fn setup() -> (Install, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = dir.path().join("voicectl.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndomain = \"voice.test\"\ndata_dir = {data_dir:?}\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nhttps_listen = \"\"\n\
             drain_timeout = \"2s\"\nallow_private_targets = [\"127.0.0.1\"]\n\n[tls]\nmode = \"off\"\n\n\
             [agent]\nengine = \"scripted\"\ngreeting = \"Hi\"\n"
        ),
    )
    .unwrap();
    let install = Install {
        dir,
        config,
        data_dir,
    };
    install.init();
    let mut keys = Vec::new();
    for t in ["acme", "other"] {
        install.ok(&["tenant", "add", t]);
        keys.push(
            install.json(&["key", "create", "--tenant", t])["key"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let other = keys.pop().unwrap();
    let acme = keys.pop().unwrap();
    (install, acme, other)
}

async fn call(
    server: &Server,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .request(method, server.url(&format!("/api/v1{path}")))
        .bearer_auth(key);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn lookup() -> Value {
    json!({
        "description": "Look up an order by its number",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
        "url": "http://127.0.0.1:9/orders",
        "timeout": "5s",
        "on_interrupt": "cancel",
        "messages": {"start": "Let me check.", "delayed": {"after": "2s", "text": "Still looking."}, "failed": "I could not reach the order system."}
    })
}

#[tokio::test]
async fn tools_api_stores_per_tenant_and_refuses_bad_definitions() {
    use reqwest::Method as M;
    let (install, acme, other) = setup();
    let server = Server::start(&install);

    let (s, v) = call(
        &server,
        &acme,
        M::PUT,
        "/tools/lookup_order",
        Some(lookup()),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "lookup_order");
    assert_eq!(v["on_interrupt"], "cancel");
    let (s, _) = call(
        &server,
        &acme,
        M::PUT,
        "/tools/lookup_order",
        Some(lookup()),
    )
    .await;
    assert_eq!(s, 200, "a replacement is not a creation");
    let (s, v) = call(&server, &acme, M::GET, "/tools", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["tools"].as_array().unwrap().len(), 1, "{v}");

    // Another tenant sees nothing and cannot touch it.
    let (s, v) = call(&server, &other, M::GET, "/tools", None).await;
    assert_eq!((s, v["tools"].as_array().unwrap().len()), (200, 0));
    for m in [M::GET, M::DELETE] {
        let (s, _) = call(&server, &other, m, "/tools/lookup_order", None).await;
        assert_eq!(s, 404);
    }
    let (s, _) = call(&server, &acme, M::GET, "/tools/nope", None).await;
    assert_eq!(s, 404);
    // A tenant key cannot name a tenant.
    let (s, _) = call(&server, &other, M::GET, "/tools?tenant=acme", None).await;
    assert_eq!(s, 400);

    let with = |k: &str, v: Value| {
        let mut d = lookup();
        d[k] = v;
        d
    };
    let bad = [
        (
            "lookup_order",
            with(
                "parameters",
                json!({"type": "object", "properties": {"order": {"type": 12}}}),
            ),
            "parameters",
        ),
        (
            "lookup_order",
            with("parameters", json!({"type": "array"})),
            "parameters",
        ),
        (
            "lookup_order",
            with("url", json!("http://api.example.com/x")),
            "url",
        ),
        (
            "lookup_order",
            with("url", json!("https://169.254.169.254/latest")),
            "url",
        ),
        (
            "lookup_order",
            with("url", json!("https://10.0.0.8/x")),
            "url",
        ),
        ("lookup_order", with("timeout", json!("10m")), "timeout"),
        (
            "lookup_order",
            with("on_interrupt", json!("later")),
            "on_interrupt",
        ),
        ("lookup_order", with("surprise", json!(1)), "surprise"),
        ("end_call", lookup(), "built-in"),
        ("bad%20name", lookup(), "name"),
    ];
    for (name, body, needle) in bad {
        let (s, v) = call(
            &server,
            &acme,
            M::PUT,
            &format!("/tools/{name}"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 400, "{name} {body}: {v}");
        let msg = v["error"].to_string();
        assert!(msg.contains(needle), "{needle}: {v}");
    }
    // Nothing above changed the stored tool.
    let (_, v) = call(&server, &acme, M::GET, "/tools/lookup_order", None).await;
    assert_eq!(v["url"], "http://127.0.0.1:9/orders");
    assert_eq!(v["timeout"], "5s");

    let (s, _) = call(&server, &acme, M::DELETE, "/tools/lookup_order", None).await;
    assert_eq!(s, 204);
    let (s, _) = call(&server, &acme, M::GET, "/tools/lookup_order", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn tools_cli_list_show_set_rm() {
    let (install, _, _) = setup();
    let _server = Server::start(&install);
    let file = install.dir.path().join("lookup.json");
    std::fs::write(&file, lookup().to_string()).unwrap();
    let f = file.to_str().unwrap();
    let out = install.json(&["tools", "set", "lookup_order", f, "--tenant", "acme"]);
    assert_eq!(out["name"], "lookup_order", "{out}");
    let list = install.ok(&["tools", "list", "--tenant", "acme"]);
    assert!(
        list.contains("lookup_order\thttp://127.0.0.1:9/orders"),
        "{list}"
    );
    // show → file → set round-trips.
    let shown = install.ok(&["tools", "show", "lookup_order", "--tenant", "acme"]);
    std::fs::write(&file, &shown).unwrap();
    install.ok(&["tools", "set", "lookup_order", f, "--tenant", "acme"]);
    let err = install.fails(&["tools", "set", "other_name", f, "--tenant", "acme"]);
    assert!(err.contains("names the tool"), "{err}");
    // The admin key must name the tenant when there are several.
    let err = install.fails(&["tools", "list"]);
    assert!(err.contains("tenant"), "{err}");
    std::fs::write(&file, "{not json").unwrap();
    let err = install.fails(&["tools", "set", "x", f, "--tenant", "acme"]);
    assert!(err.contains("not valid JSON"), "{err}");
    std::fs::write(
        &file,
        json!({"url": "https://169.254.169.254/"}).to_string(),
    )
    .unwrap();
    let err = install.fails(&["tools", "set", "x", f, "--tenant", "acme"]);
    assert!(err.contains("HTTP 400"), "{err}");
    install.ok(&["tools", "rm", "lookup_order", "--tenant", "acme"]);
    let err = install.fails(&["tools", "rm", "lookup_order", "--tenant", "acme"]);
    assert!(err.contains("404"), "{err}");
    assert!(
        install
            .ok(&["tools", "list", "--tenant", "acme"])
            .trim()
            .is_empty()
    );
}

// ---- Whole calls: the scripted engine calls tools (real router, workers and simulator). ----

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::e2e::{Opts, Stack, stack};
use twilio_sim::{CallerScript, Scenario, Step};

type Seen = Arc<Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

/// A loopback tenant endpoint: `/orders` answers after `delay`, `/hook` takes webhooks.
async fn tenant_endpoint(delay: Duration) -> (String, Seen) {
    use axum::routing::post;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(
                move |h: axum::http::HeaderMap, b: axum::body::Bytes| async move {
                    s.lock().unwrap().push((h, b.to_vec()));
                    tokio::time::sleep(delay).await;
                    r#"{"status":"shipped"}"#
                },
            ),
        )
        .route("/hook", post(|| async { "ok" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (base, seen)
}

async fn tool_stack(script: &[&str], base: &str, on_interrupt: &str) -> Stack {
    let script: Vec<String> = script.iter().map(|s| s.to_string()).collect();
    let s = stack(Opts {
        webhook_url: Some(format!("{base}/hook")),
        tweak: Box::new(move |c| {
            c.server.allow_private_targets = vec!["127.0.0.1".into()];
            c.agent.script = script;
        }),
        ..Default::default()
    })
    .await;
    let def: voicectl::domain::tool::ToolDefinition = serde_json::from_value(json!({
        "description": "Look up an order",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
        "url": format!("{base}/orders"),
        "timeout": "5s",
        "on_interrupt": on_interrupt,
        "messages": {"start": "One moment please, let me look that up for you right now."}
    }))
    .unwrap();
    s.store
        .blocking(move |c| {
            let t = voicectl::store::tenants::get(c, "acme")?.id;
            voicectl::store::tools::put(c, t, "lookup_order", &def).map(|_| ())
        })
        .unwrap();
    s
}

fn texts(transcript: &[Value], speaker: &str) -> Vec<String> {
    transcript
        .iter()
        .filter(|e| e["speaker"] == speaker)
        .map(|e| e["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn a_scripted_call_uses_a_tenant_tool_then_ends_with_end_call() {
    let (base, seen) = tenant_endpoint(Duration::from_millis(300)).await;
    let s = tool_stack(
        &[r#"tool:lookup_order {"order":"123"}"#, "tool:end_call"],
        &base,
        "finish",
    )
    .await;
    s.sim.set_scenario(
        "+14155550701",
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Speak(600),
            Step::WaitForAgentSilence { min_ms: 1200 },
            Step::Speak(600),
            Step::WaitForAgentSilence { min_ms: 8000 },
        ])),
    );
    let id = s.call("+14155550701").await;
    let events = s.follow(&id, Duration::from_secs(30)).await;
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "agent_hangup", "{call}");

    // Exactly one signed request with the tool call id as Idempotency-Key.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (h, body) = &seen[0];
    assert_eq!(h["idempotency-key"], "scripted_call_1");
    let secret = s
        .store
        .blocking(|c| {
            Ok(voicectl::store::tenants::get(c, "acme")?
                .webhook_secret
                .unwrap())
        })
        .unwrap();
    let sig = h["x-voicectl-signature"].to_str().unwrap();
    let t: i64 = sig[2..sig.find(',').unwrap()].parse().unwrap();
    assert_eq!(sig, voicectl::calls::jobs::signature(&secret, t, body));
    let payload: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["tool"], "lookup_order");
    assert_eq!(payload["arguments"]["order"], "123");
    assert_eq!(payload["call"]["id"], id.as_str());
    assert_eq!(payload["call"]["to"], "+14155550701");

    // The answer reached the engine (the scripted agent reads it out), and the tool lines are
    // in the transcript and the live events.
    let tr = s.transcript(&id).await;
    let tool = texts(&tr, "tool");
    assert!(
        tool.iter().any(|t| t.starts_with("lookup_order ")),
        "{tool:?}"
    );
    assert!(
        tool.iter().any(|t| t.contains(r#"{"status":"shipped"}"#)),
        "{tool:?}"
    );
    assert!(tool.iter().any(|t| t.starts_with("end_call")), "{tool:?}");
    let agent = texts(&tr, "agent");
    assert!(
        agent.iter().any(|t| t == r#"{"status":"shipped"}"#),
        "{agent:?}"
    );
    assert!(
        agent.iter().any(|t| t.starts_with("One moment")),
        "{agent:?}"
    );
    assert_eq!(agent.last().map(String::as_str), Some("Bye"), "{agent:?}");
    assert!(
        events.iter().any(|(_, v)| v["speaker"] == "tool"),
        "tool lines in the SSE events"
    );
}

/// The caller talks over the agent while a slow tool runs.
async fn barge_in_during_a_slow_tool(
    on_interrupt: &str,
    to: &str,
) -> (Vec<String>, Vec<String>, usize) {
    let (base, seen) = tenant_endpoint(Duration::from_millis(1500)).await;
    let s = tool_stack(
        &[r#"tool:lookup_order {"order":"9"}"#, "Sure."],
        &base,
        on_interrupt,
    )
    .await;
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Speak(600),
            Step::SpeakWhileAgentTalks {
                after_ms: 300,
                speak_ms: 600,
            },
            Step::Silence(2500),
            Step::WaitForAgentSilence { min_ms: 500 },
            Step::Hangup,
        ])),
    );
    let id = s.call(to).await;
    s.follow(&id, Duration::from_secs(30)).await;
    let tr = s.transcript(&id).await;
    let n = seen.lock().unwrap().len();
    (texts(&tr, "tool"), texts(&tr, "agent"), n)
}

#[tokio::test]
async fn barge_in_during_a_slow_tool_keeps_the_result_with_finish() {
    let (tool, agent, requests) = barge_in_during_a_slow_tool("finish", "+14155550702").await;
    assert_eq!(requests, 1);
    assert!(tool.iter().any(|t| t.contains("shipped")), "{tool:?}");
    assert!(agent.iter().any(|t| t.contains("shipped")), "{agent:?}");
}

#[tokio::test]
async fn barge_in_during_a_slow_tool_drops_the_result_with_cancel() {
    let (tool, agent, requests) = barge_in_during_a_slow_tool("cancel", "+14155550703").await;
    assert_eq!(requests, 1);
    assert!(tool.iter().any(|t| t.contains("cancelled")), "{tool:?}");
    assert!(!agent.iter().any(|t| t.contains("shipped")), "{agent:?}");
}

#[tokio::test]
async fn unknown_tools_and_bad_arguments_make_no_request_and_opt_out_ends_the_call() {
    let (base, seen) = tenant_endpoint(Duration::from_millis(10)).await;
    let s = tool_stack(
        &[
            r#"tool:no_such_tool {"x":1}"#,
            r#"tool:lookup_order {"order":5}"#,
            "tool:opt_out",
        ],
        &base,
        "finish",
    )
    .await;
    let mut steps = vec![Step::WaitForAgentSilence { min_ms: 300 }];
    for _ in 0..3 {
        steps.push(Step::Speak(600));
        steps.push(Step::WaitForAgentSilence { min_ms: 400 });
    }
    steps.push(Step::Silence(3000));
    s.sim
        .set_scenario("+14155550704", Scenario::answer(CallerScript::new(steps)));
    let id = s.call("+14155550704").await;
    s.follow(&id, Duration::from_secs(30)).await;
    assert!(seen.lock().unwrap().is_empty(), "no request was made");
    let tr = s.transcript(&id).await;
    let tool = texts(&tr, "tool");
    assert!(
        tool.iter()
            .any(|t| t.contains("there is no tool named \"no_such_tool\"")),
        "{tool:?}"
    );
    assert!(
        tool.iter()
            .any(|t| t.contains("do not match the tool's parameters") && t.contains("/order")),
        "{tool:?}"
    );
    assert!(tool.iter().any(|t| t.contains("do-not-call")), "{tool:?}");
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "opt_out", "{call}");
    let dnc = s
        .store
        .blocking(|c| {
            let t = voicectl::store::tenants::get(c, "acme")?.id;
            voicectl::store::campaigns::dnc_list(c, t)
        })
        .unwrap();
    assert_eq!(dnc, vec!["+14155550704".to_string()]);
}

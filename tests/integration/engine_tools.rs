//! Tenant tools through the voice engines (SPEC §8, issue 14): each engine's fake makes a
//! function call the way the real service does, voicectl calls the tenant endpoint once, and
//! the output goes back to the engine, which then speaks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use test_fakes::realtime::{FakeRealtime, FunctionCallOpts, RealtimeOpts};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::config::{EngineKind, Secret};

use crate::e2e::{Opts, Stack, stack};

pub(crate) type Seen = Arc<Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

/// A loopback tenant endpoint: `/orders` answers at once, `/hook` takes webhooks.
pub(crate) async fn tenant_endpoint() -> (String, Seen) {
    use axum::routing::post;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(
                move |h: axum::http::HeaderMap, b: axum::body::Bytes| async move {
                    s.lock().unwrap().push((h, b.to_vec()));
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

/// Stores `lookup_order` for tenant `acme` (the stack's calls belong to it).
pub(crate) fn add_tool(s: &Stack, base: &str) {
    let def: voicectl::domain::tool::ToolDefinition = serde_json::from_value(json!({
        "description": "Look up an order",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
        "url": format!("{base}/orders"),
        "timeout": "5s",
        "on_interrupt": "finish"
    }))
    .unwrap();
    s.store
        .blocking(move |c| {
            let t = voicectl::store::tenants::get(c, "acme")?.id;
            voicectl::store::tools::put(c, t, "lookup_order", &def).map(|_| ())
        })
        .unwrap();
}

/// Exactly one signed request, keyed by the engine's call id, with the model's arguments.
pub(crate) fn assert_one_signed_request(s: &Stack, seen: &Seen, call_id: &str, key: &str) {
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one request to the tenant");
    let (h, body) = &seen[0];
    assert_eq!(h["idempotency-key"], key);
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
    assert_eq!(payload["call"]["id"], call_id);
}

fn scenario() -> Scenario {
    Scenario::answer(CallerScript::new(vec![
        Step::WaitForAgentSilence { min_ms: 200 },
        Step::Speak(600),
        Step::WaitForAgentSilence { min_ms: 1500 },
        Step::Hangup,
    ]))
}

#[tokio::test]
async fn a_realtime_call_reaches_a_tenant_tool_and_the_model_gets_the_output() {
    let (base, seen) = tenant_endpoint().await;
    let rt = FakeRealtime::start(RealtimeOpts {
        reply_ms: 500,
        greeting_ms: 500,
        function_call: Some(FunctionCallOpts {
            on_turn: 1,
            name: "lookup_order".into(),
            arguments: r#"{"order":"123"}"#.into(),
        }),
        ..Default::default()
    })
    .await;
    let url = rt.url();
    let key = rt.opts().api_key.clone();
    let s = stack(Opts {
        webhook_url: Some(format!("{base}/hook")),
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.agent.engine = EngineKind::OpenAiRealtime;
            c.openai.realtime_url = url;
            c.openai.api_key = Secret::new(key);
            c.server.allow_private_targets = vec!["127.0.0.1".into()];
        }),
        ..Default::default()
    })
    .await;
    add_tool(&s, &base);
    s.sim.set_scenario("+14155550801", scenario());
    let id = s.call("+14155550801").await;
    s.follow(&id, Duration::from_secs(25)).await;
    rt.wait_all_closed(Duration::from_secs(5)).await;

    let session = rt.session(0);
    assert!(session.problems().is_empty(), "{:?}", session.problems());
    // The tool was offered to the model.
    let tools = &session.effective["tools"];
    assert!(
        tools
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "lookup_order")),
        "{tools}"
    );
    assert_eq!(session.function_calls.len(), 1);
    let call_id = session.function_calls[0].0.clone();
    assert_one_signed_request(&s, &seen, &id, &call_id);
    // The output went back as a function_call_output item for that call …
    assert_eq!(
        session.function_outputs.len(),
        1,
        "{:?}",
        session.function_outputs
    );
    let out = &session.function_outputs[0];
    assert_eq!(out["call_id"], call_id.as_str());
    assert!(out["output"].as_str().unwrap().contains("shipped"), "{out}");
    // … followed by response.create, and the answer was spoken (greeting + answer).
    let ev = &session.client_events;
    let pos = ev
        .iter()
        .rposition(|e| e == "conversation.item.create")
        .unwrap();
    assert!(ev[pos..].iter().any(|e| e == "response.create"), "{ev:?}");
    assert!(
        session.items.len() >= 2,
        "greeting + answer: {:?}",
        session.items.len()
    );
    let tr = s.transcript(&id).await;
    assert!(
        tr.iter()
            .any(|e| e["speaker"] == "tool" && e["text"].as_str().unwrap_or("").contains("shipped")),
        "{tr:?}"
    );
}

/// Ultravox over the server WebSocket: the tools are offered as client `temporaryTool`s, the
/// `client_tool_invocation` reaches the tenant once, and the result goes back as
/// `client_tool_result`, after which the agent speaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ultravox_call_reaches_a_tenant_tool_and_ultravox_gets_the_result() {
    use test_fakes::ultravox::{FakeUltravox, UltravoxOpts};
    let (base, seen) = tenant_endpoint().await;
    let uv = FakeUltravox::start(UltravoxOpts {
        reply_ms: 400,
        greeting_ms: 400,
        client_tool: Some(("lookup_order".into(), json!({"order": "123"}))),
        ..Default::default()
    })
    .await;
    let (uv_base, uv_key) = (uv.base_url(), uv.opts().api_key.clone());
    let s = stack(Opts {
        webhook_url: Some(format!("{base}/hook")),
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.agent.engine = EngineKind::Ultravox;
            c.ultravox.api_base_url = uv_base;
            c.ultravox.api_key = Secret::new(uv_key);
            c.ultravox.medium = voicectl::config::UltravoxMedium::ServerWebSocket;
            c.server.allow_private_targets = vec!["127.0.0.1".into()];
        }),
        ..Default::default()
    })
    .await;
    add_tool(&s, &base);
    s.sim.set_scenario("+14155550802", scenario());
    let id = s.call("+14155550802").await;
    s.follow(&id, Duration::from_secs(25)).await;

    let call = uv.calls()[0].clone();
    assert!(call.violations.is_empty(), "{:?}", call.violations);
    let tools = &call.request["selectedTools"];
    let t = tools
        .as_array()
        .and_then(|t| {
            t.iter()
                .find(|t| t["temporaryTool"]["modelToolName"] == "lookup_order")
        })
        .unwrap_or_else(|| panic!("lookup_order offered: {tools}"));
    assert_eq!(t["temporaryTool"]["client"], json!({}));
    assert_eq!(
        t["temporaryTool"]["dynamicParameters"][0]["name"], "order",
        "{t}"
    );
    assert_one_signed_request(&s, &seen, &id, &format!("inv_{}", call.call_id));
    let result = call
        .data_in
        .iter()
        .find(|m| m["type"] == "client_tool_result")
        .unwrap_or_else(|| panic!("no client_tool_result: {:?}", call.data_in));
    assert!(
        result["result"].as_str().unwrap().contains("shipped"),
        "{result}"
    );
}

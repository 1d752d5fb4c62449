//! Post-call analysis (SPEC §8): after a call of a tenant that asks for it, an LLM (the
//! OpenAI-compatible fake) fills `analysis` on the call — summary, data valid against the
//! tenant's schema, success verdict — and the `call.ended` webhook waits for it and carries it.

use std::time::Duration;

use serde_json::{Value, json};
use test_fakes::deepgram::{Fault, FaultPlan};
use test_fakes::openai_http::{FakeOpenAiHttp, OpenAiHttpOpts};
use tokio::sync::mpsc;
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::config::Secret;

use crate::e2e::{Opts, Stack, stack};
use crate::handover::{admin_key, get_tenant, put_tenant};

fn spec() -> Value {
    json!({"summary": true, "success": "the caller agreed to a delivery day",
           "schema": {"type": "object", "properties": {"day": {"type": "string"}},
                      "required": ["day"], "additionalProperties": false}})
}

/// A webhook receiver; every body it gets arrives on the channel.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    use axum::routing::post;
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, rx)
}

async fn setup(llm: &FakeOpenAiHttp) -> (Stack, mpsc::UnboundedReceiver<Value>) {
    let (url, rx) = receiver().await;
    let (base, key) = (llm.base_url(), llm.opts().api_key.clone());
    let s = stack(Opts {
        webhook_url: Some(url),
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.server.allow_private_targets = vec!["127.0.0.1".into()];
            c.openai.api_base_url = base;
            c.openai.api_key = Secret::new(key);
        }),
        ..Default::default()
    })
    .await;
    (s, rx)
}

async fn one_call(s: &Stack, to: &str) -> String {
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(600),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Hangup,
        ])),
    );
    let id = s.call(to).await;
    s.follow(&id, Duration::from_secs(15)).await;
    id
}

async fn webhook(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    // Far below the 60 s the webhook would wait for an analysis that never came.
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no webhook")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analysis_lands_on_the_call_and_in_the_webhook_valid_against_the_schema() {
    let llm = FakeOpenAiHttp::start(OpenAiHttpOpts {
        replies: vec![
            // Off the schema first (a number for the day): asked once more.
            r#"{"summary": "Delivery.", "data": {"day": 3}, "success": true}"#.into(),
            r#"{"summary": "The caller chose Tuesday for the delivery.", "data": {"day": "Tuesday"}, "success": true}"#.into(),
        ],
        ..Default::default()
    })
    .await;
    let (s, mut rx) = setup(&llm).await;
    let (st, t) = put_tenant(&s, &admin_key(&s), json!({"analysis": spec()})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["analysis"], spec(), "{t}");
    let id = one_call(&s, "+14155550961").await;

    let hook = webhook(&mut rx).await;
    assert_eq!(hook["type"], "call.ended");
    let a = &hook["call"]["analysis"];
    assert_eq!(a["data"], json!({"day": "Tuesday"}), "{hook}");
    assert_eq!(a["success"], true, "{hook}");
    assert_eq!(a["summary"], "The caller chose Tuesday for the delivery.");
    assert_eq!(s.get(&id).await["analysis"], *a);

    let chats = llm.state().chats.clone();
    assert_eq!(chats.len(), 2, "one retry after the answer off the schema");
    let body = &chats[0].body;
    assert_eq!(body["response_format"]["type"], "json_schema", "{body}");
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["data"],
        spec()["schema"]
    );
    // The model saw the call: the transcript is the user message.
    let msgs = chats[0].messages();
    assert!(msgs[1].1.contains("agent: Hi"), "{msgs:?}");
    assert!(
        llm.state().violations.is_empty(),
        "{:?}",
        llm.state().violations
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "exactly one webhook"
    );
}

/// A model that is down or keeps answering off the schema never holds the webhook for long and
/// never puts invalid data on the call: the call records why there is no analysis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_leaves_an_error_and_the_webhook_still_goes_once() {
    async fn case(opts: OpenAiHttpOpts, to: &str, want: &str) {
        let llm = FakeOpenAiHttp::start(opts).await;
        let (s, mut rx) = setup(&llm).await;
        let (st, _) = put_tenant(&s, &admin_key(&s), json!({"analysis": spec()})).await;
        assert_eq!(st, 200);
        let id = one_call(&s, to).await;
        let hook = webhook(&mut rx).await;
        assert_eq!(hook["call"]["id"], id.as_str());
        let a = &hook["call"]["analysis"];
        assert!(a["data"].is_null(), "invalid data is never stored: {hook}");
        assert!(a["error"].as_str().unwrap().contains(want), "{hook}");
        assert_eq!(s.get(&id).await["analysis"], *a);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "exactly one webhook"
        );
    }
    let off_schema = OpenAiHttpOpts {
        replies: vec![
            r#"{"summary": "x", "data": {"day": 1}, "success": true}"#.into(),
            r#"{"summary": "x", "data": {}, "success": true}"#.into(),
        ],
        ..Default::default()
    };
    let down = OpenAiHttpOpts {
        chat_fault: FaultPlan::always(Fault::RejectAuth),
        ..Default::default()
    };
    tokio::join!(
        case(off_schema, "+14155550962", "schema"),
        case(down, "+14155550963", "401"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_analysis_settings_are_refused_and_a_tenant_without_analysis_asks_no_model() {
    let llm = FakeOpenAiHttp::start(OpenAiHttpOpts::default()).await;
    let (s, mut rx) = setup(&llm).await;
    let admin = admin_key(&s);
    for bad in [
        json!("yes"),
        json!({"schema": {"type": "nonsense"}}),
        json!({"schema": {"type": "object", "description": "x".repeat(20_000)}}),
        json!({"summary": true, "extra": 1}),
        json!({"success": ""}),
    ] {
        let (st, v) = put_tenant(&s, &admin, json!({"analysis": bad})).await;
        assert_eq!(st, 400, "{bad}: {v}");
    }
    let t = get_tenant(&s, &admin).await;
    assert!(t["analysis"].is_null(), "{t}");

    let id = one_call(&s, "+14155550964").await;
    let hook = webhook(&mut rx).await;
    assert_eq!(hook["call"]["id"], id.as_str());
    assert!(hook["call"].get("analysis").is_none(), "{hook}");
    assert!(llm.state().chats.is_empty());
}

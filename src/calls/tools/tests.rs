use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::json;

use super::*;

type Seen = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A loopback tenant endpoint recording every request it gets.
async fn endpoint() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let record = move |h: HeaderMap, body: axum::body::Bytes| {
        s.lock().unwrap().push((h, body.to_vec()));
    };
    let (r1, r2, r3, r4, r5) = (
        record.clone(),
        record.clone(),
        record.clone(),
        record.clone(),
        record,
    );
    let app = Router::new()
        .route(
            "/ok",
            post(move |h, b| async move {
                r1(h, b);
                r#"{"status":"shipped"}"#
            }),
        )
        .route(
            "/slow",
            post(move |h, b| async move {
                r2(h, b);
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/fail",
            post(move |h, b| async move {
                r3(h, b);
                StatusCode::INTERNAL_SERVER_ERROR
            }),
        )
        .route(
            "/moved",
            post(move |h, b| async move {
                r4(h, b);
                (StatusCode::FOUND, [("location", "/ok")])
            }),
        )
        .route(
            "/big",
            post(move |h, b| async move {
                r5(h, b);
                vec![b'x'; 10 * 1024 * 1024]
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}"), seen)
}

fn def(url: String, timeout: &str) -> ToolDefinition {
    serde_json::from_value(json!({
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
        "url": url,
        "timeout": timeout,
    }))
    .unwrap()
}

fn info() -> CallInfo {
    CallInfo {
        id: "call_1".into(),
        tenant: "acme".into(),
        to: "+14155550100".into(),
        from: "+14155550101".into(),
        metadata: json!({"crm": 7}),
    }
}

fn call(args: &str) -> ToolCall {
    ToolCall {
        id: "tc_42".into(),
        name: "lookup_order".into(),
        arguments: args.into(),
    }
}

const ALLOW: &[String] = &[];

fn allow() -> Vec<String> {
    vec!["127.0.0.1".into()]
}

async fn run(url: String, timeout: &str, args: &str) -> Result<String, ToolError> {
    let http = outbound::tenant_client(&allow(), Duration::from_secs(30)).unwrap();
    request(
        &http,
        &allow(),
        Some("whsec_test"),
        &def(url, timeout),
        &info(),
        &call(args),
    )
    .await
}

#[tokio::test]
async fn one_signed_request_with_the_idempotency_key_and_the_answer_comes_back() {
    let (base, seen) = endpoint().await;
    let out = run(format!("{base}/ok"), "5s", r#"{"order":"123"}"#)
        .await
        .unwrap();
    assert_eq!(out, r#"{"status":"shipped"}"#);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let (h, body) = &seen[0];
    assert_eq!(h["idempotency-key"], "tc_42");
    let sig = h["x-voicectl-signature"].to_str().unwrap();
    let t: i64 = sig
        .strip_prefix("t=")
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sig, crate::calls::jobs::signature("whsec_test", t, body));
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["tool"], "lookup_order");
    assert_eq!(v["arguments"], json!({"order": "123"}));
    assert_eq!(v["call"]["id"], "call_1");
    assert_eq!(v["call"]["metadata"]["crm"], 7);
}

#[tokio::test]
async fn bad_arguments_make_no_request() {
    let (base, seen) = endpoint().await;
    for args in [r#"{"order":5}"#, "{}", "not json", "[1]"] {
        let e = run(format!("{base}/ok"), "5s", args).await.unwrap_err();
        assert_eq!(e.kind(), "bad_arguments", "{args}: {e}");
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn failures_are_errors_the_model_can_read() {
    let (base, seen) = endpoint().await;
    let e = run(format!("{base}/fail"), "5s", r#"{"order":"1"}"#)
        .await
        .unwrap_err();
    assert_eq!(e, ToolError::Status(500));
    let e = run(format!("{base}/moved"), "5s", r#"{"order":"1"}"#)
        .await
        .unwrap_err();
    assert_eq!(e, ToolError::Redirect(302));
    let e = run(format!("{base}/big"), "5s", r#"{"order":"1"}"#)
        .await
        .unwrap_err();
    assert_eq!(e, ToolError::TooLarge);
    let started = std::time::Instant::now();
    let e = run(format!("{base}/slow"), "1s", r#"{"order":"1"}"#)
        .await
        .unwrap_err();
    assert_eq!(e, ToolError::Timeout(Duration::from_secs(1)));
    assert!(started.elapsed() < Duration::from_secs(3));
    // One request each; the redirect was not followed to /ok.
    let paths = seen.lock().unwrap().len();
    assert_eq!(paths, 4);
    assert!(e.to_string().contains("did not answer"));
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let (base, seen) = endpoint().await;
    let http = outbound::tenant_client(ALLOW, Duration::from_secs(5)).unwrap();
    let e = request(
        &http,
        ALLOW,
        Some("s"),
        &def(format!("{base}/ok"), "5s"),
        &info(),
        &call(r#"{"order":"1"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), "refused", "{e}");
    let e = request(
        &http,
        ALLOW,
        Some("s"),
        &def("https://169.254.169.254/latest".into(), "5s"),
        &info(),
        &call(r#"{"order":"1"}"#),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), "refused", "{e}");
    assert!(seen.lock().unwrap().is_empty());
}

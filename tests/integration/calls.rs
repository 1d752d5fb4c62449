//! The call API and Twilio webhooks through the real router, in process. Dialing itself is
//! not running here (no workers), so calls stay where these tests put them.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use voicectl::api::{AppState, app};
use voicectl::config::Config;
use voicectl::store::{Store, keys, tenants};
use voicectl::telephony::twilio::signature;

const TOKEN: &str = "test-auth-token";
const PUBLIC: &str = "https://voice.example.com";

struct F {
    _dir: tempfile::TempDir,
    app: Router,
    state: AppState,
    metrics: Arc<voicectl::ops::metrics::Metrics>,
    store: Store,
    admin: String,
    key_a: String,
    key_b: String,
}

fn fixture() -> F {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let (admin, key_a, key_b) = store
        .blocking(|c| {
            for (name, number, cpm) in [("alpha", "+14155550001", 3), ("beta", "+14155550002", 100)]
            {
                tenants::create(
                    c,
                    tenants::TenantPatch {
                        name: Some(name.into()),
                        numbers: Some(vec![number.into()]),
                        calls_per_minute: Some(cpm),
                        ..Default::default()
                    },
                )?;
            }
            Ok((
                keys::create(c, None, "admin", None)?.key,
                keys::create(c, Some("alpha"), "a", None)?.key,
                keys::create(c, Some("beta"), "b", None)?.key,
            ))
        })
        .unwrap();
    let mut cfg = Config::dev();
    cfg.server.public_url = PUBLIC.into();
    cfg.twilio.auth_token = voicectl::config::Secret::new(TOKEN);
    cfg.twilio.from_number = "+14155550199".into();
    let state = AppState::new(store.clone(), Arc::new(cfg));
    let metrics = state.ops().metrics().clone();
    let app = app(state.clone());
    F {
        _dir: dir,
        app,
        state,
        metrics,
        store,
        admin,
        key_a,
        key_b,
    }
}

impl F {
    async fn req(&self, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v, headers)
    }

    async fn api(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let b = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"));
        let r = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        };
        let (s, v, _) = self.req(r.unwrap()).await;
        (s, v)
    }

    /// A Twilio-style signed form POST to `path`; `sig` overrides the signature.
    async fn twilio(
        &self,
        path: &str,
        params: &[(&str, &str)],
        sig: Option<&str>,
    ) -> (StatusCode, Value) {
        let owned: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let good = signature::compute(TOKEN, &format!("{PUBLIC}{path}"), &owned);
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let mut b = Request::post(path).header("content-type", "application/x-www-form-urlencoded");
        match sig {
            Some("") => {}
            Some(s) => b = b.header("x-twilio-signature", s),
            None => b = b.header("x-twilio-signature", good),
        }
        let (s, v, _) = self.req(b.body(Body::from(body)).unwrap()).await;
        (s, v)
    }

    async fn create(&self, key: &str, body: Value) -> Value {
        let (s, v) = self.api("POST", "/api/v1/calls", key, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    fn status_of(&self, id: &str) -> (String, Option<String>) {
        let id = id.to_owned();
        self.store
            .blocking(move |c| {
                Ok(c.query_row(
                    "SELECT status, end_reason FROM calls WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?)
            })
            .unwrap()
    }

    /// Puts a call where a dialer would have: initiating, with a Twilio SID.
    fn dialed(&self, id: &str, sid: &str) {
        let (id, sid) = (id.to_owned(), sid.to_owned());
        self.store
            .blocking(move |c| {
                Ok(c.execute(
                    "UPDATE calls SET status = 'initiating', twilio_call_sid = ?1 WHERE id = ?2",
                    [sid, id],
                )?)
            })
            .unwrap();
    }
}

#[tokio::test]
async fn a_tenant_key_may_use_only_its_own_numbers_as_caller_id() {
    let f = fixture();
    for from in ["+14155550002", "+14155550199", "+19995550000"] {
        let (s, e) = f
            .api(
                "POST",
                "/api/v1/calls",
                &f.key_a,
                Some(json!({"to": "+14155550100", "from": from})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{from}: {e}");
        assert_eq!(e["error"]["code"], "invalid_request", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("from"),
            "{e}"
        );
    }
    let (_, list) = f.api("GET", "/api/v1/calls", &f.key_a, None).await;
    assert_eq!(
        list["calls"].as_array().map(Vec::len),
        Some(0),
        "nothing created: {list}"
    );
    // Its own number is fine; so is leaving from out (the tenant's or server's default).
    let v = f
        .create(
            &f.key_a,
            json!({"to": "+14155550100", "from": "+14155550001"}),
        )
        .await;
    assert_eq!(v["from"], "+14155550001");
    let v = f.create(&f.key_a, json!({"to": "+14155550101"})).await;
    assert_eq!(v["from"], "+14155550199");
}

#[tokio::test]
async fn create_validates_and_persists_before_answering() {
    let f = fixture();
    let v = f
        .create(
            &f.key_a,
            json!({"to": "+14155550100", "metadata": {"crm": 42}, "greeting": "Hi"}),
        )
        .await;
    assert_eq!(
        (
            v["status"].as_str(),
            v["tenant"].as_str(),
            v["from"].as_str()
        ),
        (Some("queued"), Some("alpha"), Some("+14155550199"))
    );
    assert_eq!(
        f.status_of(v["id"].as_str().unwrap()).0,
        "queued",
        "in the database before the 201"
    );
    for (body, field) in [
        (json!({"to": "4155550100"}), "to"),
        (json!({"to": "+1415555010x"}), "to"),
        (json!({}), "to"),
        (json!({"to": "+14155550100", "from": "12"}), "from"),
        (json!({"to": "+14155550100", "engine": "gpt-9"}), "engine"),
        (json!({"to": "+14155550100", "metadata": [1]}), "metadata"),
        (
            json!({"to": "+14155550100", "max_duration": "2d"}),
            "max_duration",
        ),
        (json!({"to": "+14155550100", "tenant": "beta"}), "tenant"),
        (json!({"to": "+14155550100", "colour": "red"}), "colour"),
    ] {
        let (s, e) = f
            .api("POST", "/api/v1/calls", &f.key_a, Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {e}"
        );
    }
    // The admin must name a tenant when there is more than one; then it may.
    let (s, e) = f
        .api(
            "POST",
            "/api/v1/calls",
            &f.admin,
            Some(json!({"to": "+14155550100"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let v = f
        .create(&f.admin, json!({"to": "+14155550100", "tenant": "beta"}))
        .await;
    assert_eq!(v["tenant"], "beta");
    let (_, list) = f.api("GET", "/api/v1/calls", &f.admin, None).await;
    assert_eq!(
        list["calls"].as_array().unwrap().len(),
        2,
        "failed creates left nothing behind"
    );
}

#[tokio::test]
async fn idempotency_key_returns_the_same_call_or_409() {
    let f = fixture();
    let send = |body: Value, key: &'static str| {
        Request::post("/api/v1/calls")
            .header("authorization", format!("Bearer {}", f.key_b))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (s1, c1, _) = f.req(send(json!({"to": "+14155550100"}), "k1")).await;
    let (s2, c2, _) = f.req(send(json!({"to": "+14155550100"}), "k1")).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(c1["id"], c2["id"]);
    let (s3, e, _) = f.req(send(json!({"to": "+14155550111"}), "k1")).await;
    assert_eq!(s3, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "conflict");
    // Keys are per tenant: alpha may use "k1" too.
    let (s4, _, _) = f
        .req(
            Request::post("/api/v1/calls")
                .header("authorization", format!("Bearer {}", f.key_a))
                .header("content-type", "application/json")
                .header("idempotency-key", "k1")
                .body(Body::from(json!({"to": "+14155550100"}).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(s4, StatusCode::CREATED);
    let (_, list) = f.api("GET", "/api/v1/calls", &f.admin, None).await;
    assert_eq!(list["calls"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn tenant_call_rate_limit_answers_429_with_retry_after() {
    let f = fixture();
    for _ in 0..3 {
        f.create(&f.key_a, json!({"to": "+14155550100"})).await;
    }
    let r = Request::post("/api/v1/calls")
        .header("authorization", format!("Bearer {}", f.key_a))
        .header("content-type", "application/json")
        .body(Body::from(json!({"to": "+14155550100"}).to_string()))
        .unwrap();
    let (s, e, h) = f.req(r).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{e}");
    assert_eq!(e["error"]["code"], "rate_limited");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another tenant is unaffected.
    f.create(&f.key_b, json!({"to": "+14155550100"})).await;
}

#[tokio::test]
async fn tenant_call_limit_is_counted_in_memory_and_replays_are_free() {
    let f = fixture();
    let limited = || f.metrics.rate_limited.with(&["tenant_calls"]).get();
    let send = |key: Option<&str>| {
        let mut b = Request::post("/api/v1/calls")
            .header("authorization", format!("Bearer {}", f.key_a))
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        b.body(Body::from(json!({"to": "+14155550100"}).to_string()))
            .unwrap()
    };
    // alpha may start 3 calls a minute; replays of the first do not count.
    let (s, _, _) = f.req(send(Some("once"))).await;
    assert_eq!(s, StatusCode::CREATED);
    for _ in 0..3 {
        let (s, _, _) = f.req(send(Some("once"))).await;
        assert_eq!(s, StatusCode::OK);
    }
    for _ in 0..2 {
        let (s, _, _) = f.req(send(None)).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    assert_eq!(limited(), 0);
    let (s, e, h) = f.req(send(None)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{e}");
    assert_eq!(e["error"]["code"], "rate_limited");
    assert_eq!(h["retry-after"], "20");
    assert_eq!(limited(), 1);
    // A replay is still answered while the tenant is limited.
    let (s, _, _) = f.req(send(Some("once"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(limited(), 1);
}

#[tokio::test]
async fn every_call_endpoint_hides_other_tenants_calls() {
    let f = fixture();
    let id = f.create(&f.key_a, json!({"to": "+14155550100"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (m, p) in [
        ("GET", format!("/api/v1/calls/{id}")),
        ("POST", format!("/api/v1/calls/{id}/end")),
        ("GET", format!("/api/v1/calls/{id}/transcript")),
        ("GET", format!("/api/v1/calls/{id}/events")),
    ] {
        let (s, e) = f.api(m, &p, &f.key_b, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{m} {p}: {e}");
        assert_eq!(e["error"]["code"], "not_found");
    }
    let (_, act) = f.api("GET", "/api/v1/calls/active", &f.key_b, None).await;
    assert_eq!(act["calls"], json!([]));
    let (_, act) = f.api("GET", "/api/v1/calls/active", &f.key_a, None).await;
    assert_eq!(act["calls"].as_array().unwrap().len(), 1);
    let (_, an) = f
        .api("GET", "/api/v1/calls/analytics", &f.key_b, None)
        .await;
    assert_eq!(an["total"], 0);
    assert_eq!(
        f.status_of(&id).0,
        "queued",
        "B's attempt to end A's call changed nothing"
    );
}

#[tokio::test]
async fn ending_a_queued_call_cancels_it_and_sse_replays_history() {
    let f = fixture();
    let id = f.create(&f.key_a, json!({"to": "+14155550100"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = f
        .api("POST", &format!("/api/v1/calls/{id}/end"), &f.key_a, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["status"].as_str(), v["end_reason"].as_str()),
        (Some("canceled"), Some("api_end"))
    );
    // Ending again is harmless.
    assert_eq!(
        f.api("POST", &format!("/api/v1/calls/{id}/end"), &f.key_a, None)
            .await
            .0,
        StatusCode::OK
    );
    let (s, body, _) = f
        .req(
            Request::get(format!("/api/v1/calls/{id}/events"))
                .header("authorization", format!("Bearer {}", f.key_a))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = body.as_str().unwrap();
    let statuses: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["status"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(statuses, ["queued", "canceled"], "{text}");
    let (_, an) = f
        .api("GET", "/api/v1/calls/analytics?since=1h", &f.key_a, None)
        .await;
    assert_eq!(an["by_status"]["canceled"], 1);
    assert_eq!(
        f.api(
            "GET",
            "/api/v1/calls/analytics?since=whenever",
            &f.key_a,
            None
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn status_callbacks_are_signed_ordered_and_final() {
    let f = fixture();
    let id = f.create(&f.key_a, json!({"to": "+14155550100"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    f.dialed(&id, "CA00000000000000000000000000000001");
    let path = format!("/twilio/status/{id}");
    let cb = |status: &'static str, seq: &'static str| {
        vec![
            ("CallSid", "CA00000000000000000000000000000001"),
            ("CallStatus", status),
            ("SequenceNumber", seq),
            ("AccountSid", "ACx"),
        ]
    };

    // Forged and missing signatures change nothing.
    assert_eq!(
        f.twilio(&path, &cb("in-progress", "2"), Some("bogus="))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        f.twilio(&path, &cb("in-progress", "2"), Some("")).await.0,
        StatusCode::FORBIDDEN
    );
    // Signed for a different URL (another call) is forged too.
    let other = signature::compute(
        TOKEN,
        &format!("{PUBLIC}/twilio/status/call_other"),
        &cb("in-progress", "2")
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        f.twilio(&path, &cb("in-progress", "2"), Some(&other))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(f.status_of(&id).0, "initiating");

    // Out of order: answered (2) arrives before ringing (1); ringing must not move it back.
    assert_eq!(
        f.twilio(&path, &cb("in-progress", "2"), None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.twilio(&path, &cb("ringing", "1"), None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(f.status_of(&id).0, "in_progress");
    let mut done = cb("completed", "3");
    done.push(("CallDuration", "17"));
    f.twilio(&path, &done, None).await;
    // A late or duplicate callback cannot change a terminal state.
    f.twilio(&path, &cb("failed", "4"), None).await;
    f.twilio(&path, &cb("in-progress", "2"), None).await;
    let (_, call) = f
        .api("GET", &format!("/api/v1/calls/{id}"), &f.key_a, None)
        .await;
    assert_eq!(
        (
            call["status"].as_str(),
            call["duration_seconds"].as_i64(),
            call["end_reason"].as_str()
        ),
        (Some("completed"), Some(17), Some("hangup")),
        "{call}"
    );
    assert!(call["started_at"].is_string() && call["ended_at"].is_string());

    // Callbacks for unknown calls and malformed bodies.
    assert_eq!(
        f.twilio(
            "/twilio/status/call_aaaaaaaaaaaaaaaaaaaa",
            &cb("completed", "3"),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.twilio("/twilio/status/not-an-id", &cb("completed", "3"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.twilio(&path, &[("CallStatus", "exploded")], None).await.0,
        StatusCode::BAD_REQUEST
    );
    let r = Request::post(&path)
        .header("content-type", "application/json")
        .header("x-twilio-signature", "x")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(f.req(r).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn answer_webhook_returns_stream_twiml_with_a_token() {
    let f = fixture();
    let id = f.create(&f.key_a, json!({"to": "+14155550100"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    f.dialed(&id, "CA00000000000000000000000000000002");
    let path = format!("/twilio/answer/{id}");
    let params = [
        ("CallSid", "CA00000000000000000000000000000002"),
        ("CallStatus", "in-progress"),
    ];
    assert_eq!(
        f.twilio(&path, &params, Some("nope")).await.0,
        StatusCode::FORBIDDEN
    );
    let (s, xml) = f.twilio(&path, &params, None).await;
    assert_eq!(s, StatusCode::OK);
    let xml = xml.as_str().unwrap();
    assert!(
        xml.contains("<Connect><Stream url=\"wss://voice.example.com/twilio/media\">"),
        "{xml}"
    );
    assert!(
        xml.contains(&format!("<Parameter name=\"call_id\" value=\"{id}\"/>")),
        "{xml}"
    );
    assert!(xml.contains("<Parameter name=\"token\" value=\""), "{xml}");
    assert!(
        xml.ends_with("</Stream></Connect><Hangup/></Response>"),
        "{xml}"
    );
    assert_eq!(f.status_of(&id).0, "in_progress");
}

#[tokio::test]
async fn inbound_calls_route_by_number() {
    let f = fixture();
    let params = |to: &'static str| {
        vec![
            ("CallSid", "CA00000000000000000000000000000009"),
            ("From", "+14155557777"),
            ("To", to),
            ("Direction", "inbound"),
            ("CallStatus", "ringing"),
        ]
    };
    let (s, xml) = f
        .twilio("/twilio/voice", &params("+14155550999"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let xml = xml.as_str().unwrap();
    assert!(
        xml.contains("<Say>") && xml.contains("<Hangup/>") && !xml.contains("<Stream"),
        "{xml}"
    );
    assert_eq!(
        f.twilio("/twilio/voice", &params("+14155550002"), Some("forged"))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (_, list) = f.api("GET", "/api/v1/calls", &f.admin, None).await;
    assert_eq!(
        list["calls"],
        json!([]),
        "unknown number and forged request created nothing"
    );

    let (_, xml) = f
        .twilio("/twilio/voice", &params("+14155550002"), None)
        .await;
    assert!(xml.as_str().unwrap().contains("<Stream url="), "{xml}");
    let (_, list) = f.api("GET", "/api/v1/calls", &f.key_b, None).await;
    let call = &list["calls"][0];
    assert_eq!(
        (
            call["direction"].as_str(),
            call["status"].as_str(),
            call["from"].as_str()
        ),
        (Some("inbound"), Some("ringing"), Some("+14155557777"))
    );
    // A retried webhook for the same CallSid does not create a second call.
    f.twilio("/twilio/voice", &params("+14155550002"), None)
        .await;
    let (_, list) = f.api("GET", "/api/v1/calls", &f.key_b, None).await;
    assert_eq!(list["calls"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_replayed_voice_webhook_for_an_ended_call_hangs_up() {
    let f = fixture();
    let params = vec![
        ("CallSid", "CA0000000000000000000000000000000a"),
        ("From", "+14155557777"),
        ("To", "+14155550002"),
        ("Direction", "inbound"),
        ("CallStatus", "ringing"),
    ];
    let (_, xml) = f.twilio("/twilio/voice", &params, None).await;
    assert!(xml.as_str().unwrap().contains("<Stream url="), "{xml}");
    let (_, list) = f.api("GET", "/api/v1/calls", &f.key_b, None).await;
    let id = list["calls"][0]["id"].as_str().unwrap().to_owned();
    let (s, _) = f
        .twilio(
            &format!("/twilio/status/{id}"),
            &[
                ("CallSid", "CA0000000000000000000000000000000a"),
                ("CallStatus", "completed"),
                ("CallDuration", "3"),
            ],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(f.status_of(&id).0, "completed");
    let sessions = f.state.calls().session_count();
    // The same signed request again (a replay): hang up, no stream, nothing reopened.
    let (s, xml) = f.twilio("/twilio/voice", &params, None).await;
    assert_eq!(s, StatusCode::OK);
    let xml = xml.as_str().unwrap();
    assert!(
        xml.contains("<Hangup/>") && !xml.contains("<Stream"),
        "{xml}"
    );
    assert_eq!(f.status_of(&id).0, "completed");
    assert_eq!(
        f.state.calls().session_count(),
        sessions,
        "no engine session was opened"
    );
}

#[tokio::test]
async fn media_socket_requires_a_signature() {
    let f = fixture();
    let r = Request::get("/twilio/media")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("x-twilio-signature", "forged")
        .body(Body::empty())
        .unwrap();
    let (s, e, _) = f.req(r).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
}

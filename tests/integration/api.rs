//! The real router, in process: auth, error shapes, tenant isolation, limits.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use voicectl::api::{AppState, app};
use voicectl::calls::{CallStatus, Direction};
use voicectl::config::Config;
use voicectl::domain::ids::CallId;
use voicectl::store::{Store, calls, keys, tenants};

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    store: Store,
    admin: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let admin = store
        .blocking(|c| keys::create(c, None, "admin", None))
        .unwrap()
        .key;
    let mut cfg = Config::dev();
    cfg.server.max_body_bytes = 4096;
    let app = app(AppState::new(store.clone(), Arc::new(cfg)));
    Fixture {
        _dir: dir,
        app,
        store,
        admin,
    }
}

impl Fixture {
    async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.raw(req).await
    }

    async fn raw(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        (status, v)
    }

    /// A tenant with a key and one call; returns (key, call id).
    async fn tenant_with_call(&self, name: &str) -> (String, String) {
        let (st, _) = self
            .send(
                "POST",
                "/api/v1/tenants",
                Some(&self.admin),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
        let (st, k) = self
            .send(
                "POST",
                &format!("/api/v1/tenants/{name}/api-keys"),
                Some(&self.admin),
                Some(json!({"name": "t"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
        let name = name.to_owned();
        let id = self
            .store
            .blocking(move |c| {
                let t = tenants::get(c, &name)?;
                let id = CallId::generate();
                calls::insert(
                    c,
                    &calls::NewCall {
                        id: id.clone(),
                        tenant_id: t.id,
                        direction: Direction::Outbound,
                        to: "+14155550100".into(),
                        from: "+14155550199".into(),
                        status: CallStatus::Completed,
                        engine: "scripted".into(),
                        metadata: json!({"order": 7}),
                    },
                )?;
                Ok(id)
            })
            .unwrap();
        (k["key"].as_str().unwrap().to_owned(), id.to_string())
    }
}

fn assert_error_shape(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test]
async fn health_and_info_need_no_key() {
    let f = fixture();
    assert_eq!(f.send("GET", "/health", None, None).await.0, StatusCode::OK);
    let (st, v) = f.send("GET", "/health/ready", None, None).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ready")));
    let (_, v) = f.send("GET", "/info", None, None).await;
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn api_rejects_missing_malformed_and_unknown_keys() {
    let f = fixture();
    let (st, v) = f.send("GET", "/api/v1/calls", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_error_shape(&v, "unauthorized");
    for bad in [
        "nope",
        "vk_abc_def",
        "vk_abcdefghjkmn_0123456789abcdefghijklmnopqrstuv",
    ] {
        let (st, v) = f.send("GET", "/api/v1/calls", Some(bad), None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{bad}");
        assert_error_shape(&v, "unauthorized");
    }
    // X-API-Key works as well as Bearer.
    let req = Request::get("/api/v1/calls")
        .header("x-api-key", &f.admin)
        .body(Body::empty())
        .unwrap();
    assert_eq!(f.raw(req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn revoked_and_expired_keys_fail() {
    let f = fixture();
    let (key, _) = f.tenant_with_call("acme").await;
    assert_eq!(
        f.send("GET", "/api/v1/calls", Some(&key), None).await.0,
        StatusCode::OK
    );
    let id = key.split('_').nth(1).unwrap().to_owned();
    let (st, v) = f
        .send(
            "DELETE",
            &format!("/api/v1/api-keys/{id}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("revoked"))
    );
    assert_eq!(
        f.send("GET", "/api/v1/calls", Some(&key), None).await.0,
        StatusCode::UNAUTHORIZED
    );

    let (_, k) = f
        .send(
            "POST",
            "/api/v1/tenants/acme/api-keys",
            Some(&f.admin),
            Some(json!({"expires_in": "1h"})),
        )
        .await;
    let key = k["key"].as_str().unwrap().to_owned();
    assert_eq!(
        f.send("GET", "/api/v1/calls", Some(&key), None).await.0,
        StatusCode::OK
    );
    let kid = k["id"].as_str().unwrap().to_owned();
    f.store
        .blocking(
            move |c| Ok(c.execute("UPDATE api_keys SET expires_at = 1 WHERE id = ?1", [kid])?),
        )
        .unwrap();
    assert_eq!(
        f.send("GET", "/api/v1/calls", Some(&key), None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tenant_keys_see_only_their_own_calls() {
    let f = fixture();
    let (key_a, call_a) = f.tenant_with_call("alpha").await;
    let (key_b, call_b) = f.tenant_with_call("beta").await;

    let (st, v) = f
        .send(
            "GET",
            &format!("/api/v1/calls/{call_a}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["tenant"], "alpha");
    assert_eq!(v["metadata"]["order"], 7);
    for field in [
        "id",
        "direction",
        "to",
        "from",
        "status",
        "engine",
        "created_at",
        "twilio_call_sid",
        "ended_at",
        "end_reason",
    ] {
        assert!(v.get(field).is_some(), "call object lacks {field}: {v}");
    }

    // B's call is invisible to A: 404, exactly like a call that does not exist.
    let (st, v) = f
        .send(
            "GET",
            &format!("/api/v1/calls/{call_b}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_error_shape(&v, "not_found");
    let (_, list_a) = f.send("GET", "/api/v1/calls", Some(&key_a), None).await;
    let ids: Vec<_> = list_a["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![call_a.as_str()]);
    // Naming another tenant does not widen a tenant key's view.
    let (_, v) = f
        .send("GET", "/api/v1/calls?tenant=beta", Some(&key_a), None)
        .await;
    assert_eq!(v["calls"].as_array().unwrap().len(), 1);
    assert_eq!(v["calls"][0]["tenant"], "alpha");

    // Admin endpoints do not exist for tenant keys.
    for (m, p) in [
        ("GET", "/api/v1/tenants"),
        ("GET", "/api/v1/tenants/beta"),
        ("DELETE", "/api/v1/tenants/beta"),
    ] {
        let (st, v) = f.send(m, p, Some(&key_b), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{m} {p}");
        assert_error_shape(&v, "not_found");
    }
    // The admin sees both and can filter.
    let (_, v) = f.send("GET", "/api/v1/calls", Some(&f.admin), None).await;
    assert_eq!(v["calls"].as_array().unwrap().len(), 2);
    let (_, v) = f
        .send("GET", "/api/v1/calls?tenant=beta", Some(&f.admin), None)
        .await;
    assert_eq!(v["calls"][0]["id"], call_b.as_str());
}

#[tokio::test]
async fn list_validates_params_and_paginates() {
    let f = fixture();
    let (key, _) = f.tenant_with_call("acme").await;
    f.tenant_with_call("acme2").await;
    for q in [
        "status=ringingish",
        "limit=0",
        "limit=1000",
        "cursor=%21%21",
        "bogus=1",
        "limit=x",
    ] {
        let (st, v) = f
            .send("GET", &format!("/api/v1/calls?{q}"), Some(&key), None)
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_error_shape(&v, "invalid_request");
    }
    let (_, p1) = f
        .send("GET", "/api/v1/calls?limit=1", Some(&f.admin), None)
        .await;
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = f
        .send(
            "GET",
            &format!("/api/v1/calls?limit=1&cursor={cursor}"),
            Some(&f.admin),
            None,
        )
        .await;
    assert_ne!(p1["calls"][0]["id"], p2["calls"][0]["id"]);
    let (_, v) = f
        .send("GET", "/api/v1/calls?status=completed", Some(&key), None)
        .await;
    assert_eq!(v["calls"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn tenant_crud_over_rest() {
    let f = fixture();
    let a = Some(f.admin.as_str());
    let (st, t) = f.send("POST", "/api/v1/tenants", a, Some(json!({"name": "acme", "company": "Acme", "numbers": ["+14155550100"], "webhook_url": "https://hooks.example.com/v"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    assert!(t["webhook_secret"].as_str().unwrap().starts_with("whsec_"));
    let (st, t) = f
        .send(
            "PUT",
            "/api/v1/tenants/acme",
            a,
            Some(json!({"greeting": "Hi there", "max_concurrent_calls": 5})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (t["greeting"].as_str(), t["max_concurrent_calls"].as_u64()),
        (Some("Hi there"), Some(5))
    );
    let (_, v) = f.send("GET", "/api/v1/tenants", a, None).await;
    assert_eq!(v["tenants"].as_array().unwrap().len(), 1);
    let (st, k) = f
        .send("POST", "/api/v1/tenants/acme/api-keys", a, None)
        .await;
    assert_eq!(st, StatusCode::CREATED);
    assert!(k["key"].as_str().unwrap().starts_with("vk_"));
    let (_, v) = f
        .send("GET", "/api/v1/tenants/acme/api-keys", a, None)
        .await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
    assert!(
        v["keys"][0].get("key").is_none(),
        "listing never shows secrets"
    );
    let (st, _) = f.send("DELETE", "/api/v1/tenants/acme", a, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        f.send("GET", "/api/v1/tenants/acme", a, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.send("DELETE", "/api/v1/api-keys/nosuchkeyxyz", a, None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn bad_tenant_input_is_400_or_409_and_changes_nothing() {
    let f = fixture();
    let a = Some(f.admin.as_str());
    f.send(
        "POST",
        "/api/v1/tenants",
        a,
        Some(json!({"name": "acme", "numbers": ["+14155550100"]})),
    )
    .await;
    let before = f.send("GET", "/api/v1/tenants", a, None).await.1;
    for (body, status, code, field) in [
        (json!({"name": "Not Valid"}), 400, "invalid_request", "name"),
        (
            json!({"company": "no name"}),
            400,
            "invalid_request",
            "name",
        ),
        (
            json!({"name": "b", "numbers": ["4155550100"]}),
            400,
            "invalid_request",
            "numbers",
        ),
        (
            json!({"name": "b", "from_number": "+1"}),
            400,
            "invalid_request",
            "from_number",
        ),
        (
            json!({"name": "b", "engine": "gpt-9"}),
            400,
            "invalid_request",
            "engine",
        ),
        (
            json!({"name": "b", "colour": "red"}),
            400,
            "invalid_request",
            "colour",
        ),
        (
            json!({"name": "b", "max_concurrent_calls": -1}),
            400,
            "invalid_request",
            "max_concurrent_calls",
        ),
        (json!({"name": "acme"}), 409, "conflict", "acme"),
        (
            json!({"name": "b", "numbers": ["+14155550100"]}),
            409,
            "conflict",
            "+14155550100",
        ),
    ] {
        let (st, v) = f
            .send("POST", "/api/v1/tenants", a, Some(body.clone()))
            .await;
        assert_eq!(st.as_u16(), status, "{body}: {v}");
        assert_error_shape(&v, code);
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{body}: message should name {field}: {v}"
        );
    }
    let (st, v) = f
        .send(
            "PUT",
            "/api/v1/tenants/acme",
            a,
            Some(json!({"numbers": ["bad"]})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        f.send("GET", "/api/v1/tenants", a, None).await.1,
        before,
        "nothing changed"
    );
}

#[tokio::test]
async fn tenant_webhooks_to_private_or_plain_http_targets_are_400() {
    let f = fixture();
    let a = Some(f.admin.as_str());
    f.send("POST", "/api/v1/tenants", a, Some(json!({"name": "acme"})))
        .await;
    let before = f.send("GET", "/api/v1/tenants", a, None).await.1;
    for url in [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.7/hook",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[fd00::1]/hook",
        "http://hooks.example.com/hook",
        "https://user:pw@hooks.example.com/hook",
    ] {
        let (st, v) = f
            .send(
                "POST",
                "/api/v1/tenants",
                a,
                Some(json!({"name": "b", "webhook_url": url})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{url}: {v}");
        assert_error_shape(&v, "invalid_request");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("webhook_url"),
            "{v}"
        );
        let (st, v) = f
            .send(
                "PUT",
                "/api/v1/tenants/acme",
                a,
                Some(json!({"webhook_url": url})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{url}: {v}");
    }
    assert_eq!(f.send("GET", "/api/v1/tenants", a, None).await.1, before);
}

#[tokio::test]
async fn framework_rejections_use_the_error_shape() {
    let f = fixture();
    let auth = format!("Bearer {}", f.admin);
    // Malformed JSON.
    let req = Request::post("/api/v1/tenants")
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(Body::from("{\"name\": "))
        .unwrap();
    let (st, v) = f.raw(req).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_error_shape(&v, "invalid_json");
    // Wrong content type.
    let req = Request::post("/api/v1/tenants")
        .header("authorization", &auth)
        .header("content-type", "text/plain")
        .body(Body::from("name=x"))
        .unwrap();
    let (st, v) = f.raw(req).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error_shape(&v, "unsupported_media_type");
    // Oversized body, with and without a Content-Length up front.
    let big = format!(
        "{{\"name\": \"x\", \"company\": \"{}\"}}",
        "a".repeat(10_000)
    );
    let req = Request::post("/api/v1/tenants")
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let (st, v) = f.raw(req).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_shape(&v, "payload_too_large");
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    let req = Request::post("/api/v1/tenants")
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let (st, v) = f.raw(req).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_shape(&v, "payload_too_large");
    // Unknown route and wrong method.
    let (st, v) = f.send("GET", "/api/v1/nope", Some(&f.admin), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_error_shape(&v, "not_found");
    let (st, v) = f
        .send("PATCH", "/api/v1/tenants", Some(&f.admin), None)
        .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_error_shape(&v, "method_not_allowed");
    assert_eq!(
        f.send("GET", "/api/v1/tenants", Some(&f.admin), None)
            .await
            .1["tenants"],
        json!([])
    );
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let f = fixture();
    let resp = f
        .app
        .clone()
        .oneshot(
            Request::get("/health")
                .header("x-request-id", "abc-123")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = f
        .app
        .clone()
        .oneshot(
            Request::get("/health")
                .header("x-request-id", "bad id\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap();
    assert!(!id.is_empty() && id != "bad id\"");
}

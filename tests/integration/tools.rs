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

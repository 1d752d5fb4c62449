//! The real binary serving on an ephemeral port, stopped with SIGTERM.

use serde_json::Value;

use crate::support::{Install, Server};

#[tokio::test]
async fn serve_answers_api_and_stops_cleanly_on_sigterm() {
    let i = Install::new();
    let admin = i.init();
    i.ok(&["tenant", "add", "acme"]);
    let key = i.json(&["key", "create", "--tenant", "acme"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut server = Server::start(&i);
    let http = reqwest::Client::new();

    let v: Value = http
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ready");
    // A key created by the CLI while the server runs works at once.
    let late = i.json(&["key", "create", "--tenant", "acme"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for k in [&key, &late, &admin] {
        let r = http
            .get(server.url("/api/v1/calls"))
            .bearer_auth(k)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http
        .get(server.url("/api/v1/tenants"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["tenants"][0]["name"],
        "acme"
    );
    let r = http.get(server.url("/api/v1/calls")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A second server on the same data dir is refused while the first holds it.
    let out = i.run(&["serve"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already using"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let logs = server.drain_logs().join("\n");
    assert!(
        logs.contains("\"request_id\""),
        "JSON logs carry request ids: {logs}"
    );
    assert!(
        !logs.contains(&key) && !logs.contains(&admin),
        "a key leaked into the logs"
    );
    assert!(
        !i.data_dir.join("serve.json").exists(),
        "runtime file removed on exit"
    );
}

#[tokio::test]
async fn serve_dev_needs_no_config() {
    let dir = tempfile::tempdir().unwrap();
    // `serve --dev` always binds 127.0.0.1:8080; skip if something else holds it.
    if std::net::TcpListener::bind("127.0.0.1:8080").is_err() {
        eprintln!("SKIP serve_dev_needs_no_config: 127.0.0.1:8080 is in use");
        return;
    }
    let mut server = Server::start_args(&["serve", "--dev"], Some(dir.path()));
    assert_eq!(server.addr.to_string(), "127.0.0.1:8080");
    let r = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(dir.path().join("voicectl-data/voicectl.db").exists());
    assert!(dir.path().join("voicectl-data/admin.key").exists());
    assert!(server.terminate().success());
}

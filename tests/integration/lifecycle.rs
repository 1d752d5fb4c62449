//! The real binary with live simulated calls: graceful drain on SIGTERM, and recovery after
//! `kill -9`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::e2e::statuses;
use crate::support::{Install, Server};
use twilio_sim::{self as sim, CallerScript, Scenario, SimConfig, SimEvent, Step};

const SID: &str = "AC00000000000000000000000000000002";
const TOKEN: &str = "lifecycle-token";

async fn setup(drain: &str) -> (sim::SimHandle, Install, String) {
    let sim = sim::start(SimConfig::new(SID, TOKEN)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = dir.path().join("voicectl.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndomain = \"voice.test\"\ndata_dir = {data_dir:?}\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nhttps_listen = \"\"\n\
             drain_timeout = \"{drain}\"\nmax_concurrent_calls = 1\n\n[tls]\nmode = \"off\"\n\n\
             [twilio]\naccount_sid = \"{SID}\"\nauth_token = \"{TOKEN}\"\napi_base_url = \"{}\"\nfrom_number = \"+14155550100\"\ncalls_per_second = 50.0\n\n\
             [agent]\nengine = \"scripted\"\ngreeting = \"Hi\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    let install = Install {
        dir,
        config,
        data_dir,
    };
    install.init();
    install.ok(&["tenant", "add", "acme"]);
    let key = install.json(&["key", "create", "--tenant", "acme"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    (sim, install, key)
}

async fn create(http: &reqwest::Client, server: &Server, key: &str, to: &str) -> String {
    let v: Value = http
        .post(server.url("/api/v1/calls"))
        .bearer_auth(key)
        .json(&json!({"to": to}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned()
}

async fn get(http: &reqwest::Client, server: &Server, key: &str, id: &str) -> Value {
    get_path(http, server, key, &format!("/api/v1/calls/{id}")).await
}

async fn get_path(http: &reqwest::Client, server: &Server, key: &str, path: &str) -> Value {
    http.get(server.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_stream(events: &mut tokio::sync::broadcast::Receiver<SimEvent>) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            SimEvent::StreamConnected { .. } => return,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_calls_and_keeps_the_queue() {
    let (sim, install, key) = setup("2s").await;
    // The callee stays on the line in silence: only the drain can end this call.
    sim.set_scenario("+14155550201", Scenario::answer(CallerScript::silent()));
    let mut server = Server::start(&install);
    let http = reqwest::Client::new();
    let mut events = sim.subscribe();
    let live = create(&http, &server, &key, "+14155550201").await;
    wait_stream(&mut events).await;
    // Over the cap of 1: stays queued.
    let queued = create(&http, &server, &key, "+14155550202").await;
    assert_eq!(get(&http, &server, &key, &queued).await["status"], "queued");

    // SIGTERM: readiness turns 503 at once; the live call gets drain_timeout, then a goodbye.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    let ready = loop {
        let r = http.get(server.url("/health/ready")).send().await.unwrap();
        if r.status() != 200 {
            break r.status().as_u16();
        }
    };
    assert_eq!(ready, 503);
    let sid = loop {
        let c = get(&http, &server, &key, &live).await;
        if let Some(s) = c["twilio_call_sid"].as_str() {
            break s.to_owned();
        }
    };
    let rec = sim.wait_ended(&sid, Duration::from_secs(15)).await.unwrap();
    assert!(
        rec.stream().unwrap().agent_played_bytes > 0,
        "the goodbye was played"
    );
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");

    // Both calls as recorded: the live one ended politely, the queued one is still queued.
    let db = rusqlite::Connection::open(install.data_dir.join("voicectl.db")).unwrap();
    let row = |id: &str| -> (String, Option<String>) {
        db.query_row(
            "SELECT status, end_reason FROM calls WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!(row(&live), ("completed".into(), Some("shutdown".into())));
    assert_eq!(row(&queued).0, "queued");
    let t: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM transcript_entries WHERE call_id = ?1",
            [&live],
            |r| r.get(0),
        )
        .unwrap();
    assert!(t >= 2, "greeting and goodbye were flushed: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_closes_interrupted_calls_and_dials_the_queue() {
    let (sim, install, key) = setup("2s").await;
    sim.set_scenario("+14155550301", Scenario::answer(CallerScript::silent()));
    sim.set_scenario(
        "+14155550302",
        Scenario::answer(CallerScript::new(vec![Step::Silence(300), Step::Hangup])),
    );
    let mut server = Server::start(&install);
    let http = reqwest::Client::new();
    let mut events = sim.subscribe();
    let live = create(&http, &server, &key, "+14155550301").await;
    wait_stream(&mut events).await;
    let queued = create(&http, &server, &key, "+14155550302").await;
    let sid = get(&http, &server, &key, &live).await["twilio_call_sid"]
        .as_str()
        .unwrap()
        .to_owned();

    server.kill9();
    let server = Server::start(&install);
    // The interrupted call is over at Twilio (the dropped socket ran the <Hangup/> after the
    // stream; the restarted server also hangs it up over REST) and closed honestly here.
    sim.wait_ended(&sid, Duration::from_secs(10)).await.unwrap();
    let c = get(&http, &server, &key, &live).await;
    assert_eq!(
        (c["status"].as_str(), c["end_reason"].as_str()),
        (Some("completed"), Some("server_restart")),
        "{c}"
    );
    // The queued call, acknowledged before the crash, is dialed after the restart.
    let events = crate::e2e::follow_with(
        &http,
        &server.url(""),
        &key,
        &queued,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(statuses(&events).last().unwrap(), "completed", "{events:?}");
}

fn logged(server: &Server, what: &str) -> Value {
    loop {
        let line = server
            .logs
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no log line {what:?}"));
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["message"].as_str().is_some_and(|m| m.starts_with(what))
        {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_and_a_bad_file_changes_nothing() {
    let (sim, install, key) = setup("2s").await;
    let to = "+14155550401";
    sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![Step::Silence(1500), Step::Hangup])),
    );
    let server = Server::start(&install);
    let http = reqwest::Client::new();
    let good = std::fs::read_to_string(&install.config).unwrap();
    let hup = || {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    };

    // An invalid file: logged, and the server keeps running on what it had.
    std::fs::write(&install.config, format!("{good}bogus = 1\n")).unwrap();
    hup();
    let err = logged(&server, "config reload failed");
    assert!(err["error"].as_str().unwrap().contains("bogus"), "{err}");
    let r = http.get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A valid one: the new greeting is in force for the next call, a new proxy route serves
    // at once; the listener change is reported as needing a restart.
    let site = install.dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "hello from the site").unwrap();
    let page = || async {
        let r = http.get(server.url("/site/")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(page().await.0, 404);
    let next = good
        .replace("greeting = \"Hi\"", "greeting = \"Welcome back\"")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(
        &install.config,
        format!("{next}\n[[proxy]]\npath = \"/site\"\nroot = {site:?}\n"),
    )
    .unwrap();
    hup();
    let ok = logged(&server, "config reloaded");
    assert_eq!(ok["applied"], "[\"agent\", \"proxy\"]", "{ok}");
    assert_eq!(page().await, (200, "hello from the site".to_owned()));
    let restart = logged(&server, "these changes take effect after a restart");
    assert_eq!(restart["sections"], "[\"server\"]", "{restart}");

    let id = create(&http, &server, &key, to).await;
    let events =
        crate::e2e::follow_with(&http, &server.url(""), &key, &id, Duration::from_secs(15)).await;
    assert_eq!(statuses(&events).last().unwrap(), "completed", "{events:?}");
    let t = get_path(
        &http,
        &server,
        &key,
        &format!("/api/v1/calls/{id}/transcript"),
    )
    .await;
    assert_eq!(t["entries"][0]["text"], "Welcome back", "{t}");
}

//! Campaigns (SPEC §7) against the real binary and the Twilio simulator: bad input stores
//! nothing, local calling hours, pacing, retries, pause, and `kill -9` mid-campaign.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use chrono::{Timelike, Utc};
use serde_json::{Value, json};

use crate::support::{Install, Server};
use twilio_sim::{self as sim, CallerScript, Scenario, SimConfig, Step};

const SID: &str = "AC00000000000000000000000000000013";
const TOKEN: &str = "campaign-token";

async fn setup(cps: f64) -> (sim::SimHandle, Install, String) {
    let sim = sim::start(SimConfig::new(SID, TOKEN)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = dir.path().join("voicectl.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndomain = \"voice.test\"\ndata_dir = {data_dir:?}\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nhttps_listen = \"\"\n\
             drain_timeout = \"2s\"\nmax_concurrent_calls = 20\ninbound_reserve = 2\nallow_private_targets = [\"127.0.0.1\"]\n\n[tls]\nmode = \"off\"\n\n\
             [twilio]\naccount_sid = \"{SID}\"\nauth_token = \"{TOKEN}\"\napi_base_url = \"{}\"\nfrom_number = \"+14155550100\"\ncalls_per_second = {cps:?}\nring_timeout = \"5s\"\n\n\
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
    // Short calls: the callee listens a moment, then hangs up.
    sim.set_default_scenario(Scenario::answer(CallerScript::new(vec![
        Step::Silence(300),
        Step::Hangup,
    ])));
    (sim, install, key)
}

struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn new(server: &Server, key: &str) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: server.url("/api/v1"),
            key: key.to_owned(),
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.bearer_auth(&self.key).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn csv(&self, id: &str, body: impl Into<Vec<u8>>) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}/campaigns/{id}/recipients", self.base))
                .header("content-type", "text/csv")
                .body(body.into()),
        )
        .await
    }

    async fn create(&self, body: Value) -> String {
        let (s, v) = self.post("/campaigns", body).await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Polls the campaign until `done(campaign)` holds.
    async fn wait(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + within;
        loop {
            let (_, v) = self.get(&format!("/campaigns/{id}")).await;
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < end, "campaign never got there: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn recipients(&self, id: &str) -> Vec<Value> {
        let (s, v) = self
            .get(&format!("/campaigns/{id}/recipients?limit=1000"))
            .await;
        assert_eq!(s, 200, "{v}");
        v["recipients"].as_array().unwrap().clone()
    }
}

fn progress_adds_up(c: &Value) {
    let p = &c["progress"];
    let sum: i64 = [
        "pending",
        "scheduled",
        "dialing",
        "in_call",
        "done",
        "failed",
        "suppressed",
        "canceled",
    ]
    .iter()
    .map(|k| p[k].as_i64().unwrap())
    .sum();
    assert_eq!(sum, p["total"].as_i64().unwrap(), "{p}");
}

fn recipient_count(install: &Install) -> i64 {
    let c = rusqlite::Connection::open(install.data_dir.join("voicectl.db")).unwrap();
    c.query_row("SELECT COUNT(*) FROM campaign_recipients", [], |r| r.get(0))
        .unwrap()
}

/// Numbers the simulator was asked to call, with how often.
fn dialed(sim: &sim::SimHandle) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for c in sim.calls() {
        *out.entry(c.to).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_campaigns_and_uploads_are_refused_and_store_nothing() {
    let (_sim, install, key) = setup(5.0).await;
    let server = Server::start(&install);
    let api = Api::new(&server, &key);

    for (body, needle) in [
        (
            json!({"name": "x", "calling_hours": {"start": "12:00", "end": "10:00"}}),
            "before end",
        ),
        (
            json!({"name": "x", "calling_hours": {"start": "07:00", "end": "10:00"}}),
            "08:00-21:00",
        ),
        (
            json!({"name": "x", "calling_hours": {"start": "09:00", "end": "22:00"}}),
            "08:00-21:00",
        ),
        (
            json!({"name": "x", "retry": {"hangup": {"attempts": 2}}}),
            "unknown outcome",
        ),
        (json!({"name": "x", "max_concurrent": -1}), "max_concurrent"),
        (
            json!({"name": "x", "max_concurrent": 1_000_000}),
            "max_concurrent",
        ),
        (
            json!({"name": "x", "calls_per_second": 50.0}),
            "calls_per_second",
        ),
        (json!({"name": "x", "days": ["funday"]}), "unknown day"),
        (json!({"name": ""}), "name"),
    ] {
        let (s, v) = api.post("/campaigns", body.clone()).await;
        assert_eq!(s, 400, "{body} → {v}");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body} → {v}"
        );
    }
    let (_, list) = api.get("/campaigns").await;
    assert_eq!(list["campaigns"].as_array().unwrap().len(), 0);

    let id = api
        .create(json!({"name": "renewals", "greeting": "Hi {{name}}", "paused": true}))
        .await;
    // Whole-request problems: 400 and nothing stored.
    for (body, needle) in [
        (&b""[..], "empty"),
        (&b"number,name\n+14155550101,Ann\n"[..], "\"to\""),
        (&b"to,first\n+14155550101,Ann\n"[..], "{{name}}"),
    ] {
        let (s, v) = api.csv(&id, body).await;
        assert_eq!(s, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
    }
    assert_eq!(recipient_count(&install), 0);

    // Row problems: rejected one by one with CSV line numbers; duplicates and DNC counted.
    let (s, v) = api.post("/dnc", json!({"numbers": ["+14155550109"]})).await;
    assert_eq!(s, 200, "{v}");
    let body = b"\xEF\xBB\xBFto,name,timezone\r\n+14155550101,\"Ann, Jr\",\r\n12345,Bob,\r\n+14155550102,Cy,Mars/Base\r\n+14155550103,\xff\xfe,\r\n+14155550101,Dup,\r\n+14155550109,Dnc,\r\n+14155550104,\"multi\nline\",America/Chicago\r\n";
    let (s, v) = api.csv(&id, body.to_vec()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["accepted"], 2, "{v}");
    assert_eq!(v["duplicates"], 1, "{v}");
    assert_eq!(v["suppressed"], 1, "{v}");
    let rows: Vec<(u64, String)> = v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["row"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 3, "{v}");
    assert_eq!(rows[0].0, 3);
    assert!(rows[0].1.contains("E.164"));
    assert_eq!(rows[1].0, 4);
    assert!(rows[1].1.contains("unknown time zone"));
    assert_eq!(rows[2].0, 5);
    assert!(rows[2].1.contains("UTF-8"));
    let (_, c) = api.get(&format!("/campaigns/{id}")).await;
    assert_eq!(c["progress"]["total"], 3, "{c}");
    assert_eq!(c["progress"]["suppressed"], 1, "{c}");
    progress_adds_up(&c);

    // JSON uploads: a recipient without a template variable refuses the whole request.
    let (s, v) = api
        .post(
            &format!("/campaigns/{id}/recipients"),
            json!({"recipients": [{"to": "+14155550105", "vars": {"name": "Eve"}},
                                  {"to": "+14155550106"}]}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("{{name}}"),
        "{v}"
    );
    assert_eq!(recipient_count(&install), 3);
    let (s, v) = api
        .post(
            &format!("/campaigns/{id}/recipients"),
            json!({"recipients": [{"to": "+14155550105", "vars": {"name": "Eve"}, "metadata": {"crm": 7}},
                                  {"to": "+1", "vars": {"name": "Bad"}}]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"][0]["row"].as_u64()),
        (Some(1), Some(2)),
        "{v}"
    );
    // Paging and the state filter.
    let (_, p1) = api
        .get(&format!("/campaigns/{id}/recipients?limit=2"))
        .await;
    assert_eq!(p1["recipients"].as_array().unwrap().len(), 2);
    let cursor = p1["next_cursor"].as_str().unwrap().to_owned();
    let (_, p2) = api
        .get(&format!(
            "/campaigns/{id}/recipients?limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(p2["recipients"].as_array().unwrap().len(), 2, "{p2}");
    assert_ne!(p1["recipients"][0]["to"], p2["recipients"][0]["to"]);
    let (_, sup) = api
        .get(&format!("/campaigns/{id}/recipients?state=suppressed"))
        .await;
    assert_eq!(sup["recipients"][0]["to"], "+14155550109", "{sup}");
    assert_eq!(
        api.get(&format!("/campaigns/{id}/recipients?state=bogus"))
            .await
            .0,
        400
    );

    // Another tenant sees none of it.
    install.ok(&["tenant", "add", "other"]);
    let other = install.json(&["key", "create", "--tenant", "other"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = Api::new(&server, &other);
    for path in [
        format!("/campaigns/{id}"),
        format!("/campaigns/{id}/recipients"),
        format!("/campaigns/{id}/results.csv"),
    ] {
        assert_eq!(other.get(&path).await.0, 404, "{path}");
    }
    assert_eq!(
        other
            .post(&format!("/campaigns/{id}/resume"), json!({}))
            .await
            .0,
        404
    );
    assert_eq!(other.csv(&id, &b"to\n+14155550199\n"[..]).await.0, 404);
    assert_eq!(recipient_count(&install), 4);
}

/// `Etc/GMT-N` is UTC+N (POSIX sign), with no daylight saving.
fn etc_zone(offset: i32) -> String {
    match offset {
        0 => "Etc/GMT".into(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_calling_hours_are_honoured() {
    let (sim, install, key) = setup(10.0).await;
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    // Zones chosen from the real clock: one where it is early afternoon, one at night.
    let hour = Utc::now().hour() as i32;
    let offset_for = |local: i32| {
        let o = (local - hour).rem_euclid(24);
        if o > 12 { o - 24 } else { o }
    };
    let inside = etc_zone(offset_for(14));
    let outside = etc_zone(offset_for(2));
    // 605 (South Dakota) spans Central and Mountain: inside only when both are.
    let w = |tz: chrono_tz::Tz| {
        let h = Utc::now().with_timezone(&tz).hour();
        (9..20).contains(&h)
    };
    let sd_inside = w(chrono_tz::America::Denver) && w(chrono_tz::America::North_Dakota::Center);

    let id = api
        .create(
            json!({"name": "hours", "calling_hours": {"start": "09:00", "end": "20:00"},
            "days": ["mon","tue","wed","thu","fri","sat","sun"]}),
        )
        .await;
    let csv = format!(
        "to,timezone\n+14155550201,{inside}\n+14155550202,{outside}\n+16055550203,\n+99912345678,\n"
    );
    let (s, v) = api.csv(&id, csv).await;
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(4)), "{v}");

    let c = api
        .wait(&id, Duration::from_secs(20), |c| {
            let p = &c["progress"];
            p["done"].as_i64().unwrap()
                + p["scheduled"].as_i64().unwrap()
                + p["failed"].as_i64().unwrap()
                == 4
                && p["done"].as_i64().unwrap() >= 1
        })
        .await;
    progress_adds_up(&c);
    let by_to: HashMap<String, Value> = api
        .recipients(&id)
        .await
        .into_iter()
        .map(|r| (r["to"].as_str().unwrap().to_owned(), r))
        .collect();
    assert_eq!(by_to["+14155550201"]["state"], "done");
    let later = &by_to["+14155550202"];
    assert_eq!(later["state"], "scheduled", "{later}");
    // Scheduled for the next 09:00 local in its zone (02:00 now → in about seven hours).
    let at =
        chrono::DateTime::parse_from_rfc3339(later["next_attempt_at"].as_str().unwrap()).unwrap();
    let tz: chrono_tz::Tz = outside.parse().unwrap();
    let local = at.with_timezone(&tz);
    assert_eq!((local.hour(), local.minute()), (9, 0), "{later}");
    assert!(at.with_timezone(&Utc) > Utc::now());
    let sd = &by_to["+16055550203"];
    assert_eq!(
        sd["state"],
        if sd_inside { "done" } else { "scheduled" },
        "{sd}"
    );
    let unknown = &by_to["+99912345678"];
    assert_eq!(unknown["state"], "failed");
    assert_eq!(unknown["last_outcome"], "timezone_unknown");
    let d = dialed(&sim);
    assert!(
        !d.contains_key("+14155550202") && !d.contains_key("+99912345678"),
        "{d:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_concurrency_and_retries() {
    let (sim, install, key) = setup(20.0).await;
    // Busy numbers: retried after 1 s, three calls in all, then failed.
    for n in ["+14155550301", "+14155550302"] {
        sim.set_scenario(n, Scenario::Busy);
    }
    sim.set_scenario("+14155550303", Scenario::NoAnswer);
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    let id = api
        .create(
            json!({"name": "pace", "calls_per_second": 4.0, "max_concurrent": 3,
            "days": ["mon","tue","wed","thu","fri","sat","sun"],
            "calling_hours": {"start": "08:00", "end": "21:00"},
            "retry": {"busy": {"attempts": 3, "after": ["1s"]}, "no_answer": {"attempts": 1}}}),
        )
        .await;
    // Hours are the recipient's: put everyone where it is midday now.
    let hour = Utc::now().hour() as i32;
    let o = (13 - hour).rem_euclid(24);
    let tz = etc_zone(if o > 12 { o - 24 } else { o });
    let mut csv = String::from("to,timezone\n");
    for i in 1..=14 {
        csv.push_str(&format!("+141555503{i:02},{tz}\n"));
    }
    let (s, v) = api.csv(&id, csv).await;
    assert_eq!(s, 200, "{v}");
    let c = api
        .wait(&id, Duration::from_secs(40), |c| c["status"] == "completed")
        .await;
    progress_adds_up(&c);
    assert_eq!(c["progress"]["done"], 11, "{c}");
    assert_eq!(c["progress"]["failed"], 3, "{c}");
    assert_eq!(c["progress"]["calls_placed"], 14 + 4, "{c}");

    let d = dialed(&sim);
    assert_eq!(d["+14155550301"], 3);
    assert_eq!(d["+14155550302"], 3);
    assert_eq!(d["+14155550303"], 1);
    assert_eq!(d["+14155550304"], 1);
    let by_to: HashMap<String, Value> = api
        .recipients(&id)
        .await
        .into_iter()
        .map(|r| (r["to"].as_str().unwrap().to_owned(), r))
        .collect();
    assert_eq!(by_to["+14155550301"]["last_outcome"], "busy");
    assert_eq!(by_to["+14155550301"]["attempts"], 3);
    assert_eq!(by_to["+14155550303"]["last_outcome"], "no_answer");

    // Pacing: no second holds more than 4 creations; never more than 3 at once. Creation times
    // are taken where the simulator receives the request, so a loaded machine can bunch paced
    // requests by a few hundred ms; the window leaves room for that (unpaced dialing would put
    // all of them within a few ms).
    let mut calls = sim.calls();
    calls.sort_by_key(|c| c.created_at);
    let t: Vec<SystemTime> = calls.iter().map(|c| c.created_at).collect();
    for (i, start) in t.iter().enumerate() {
        let in_window = t[i..]
            .iter()
            .take_while(|x| x.duration_since(*start).unwrap() < Duration::from_millis(700))
            .count();
        assert!(
            in_window <= 4,
            "{in_window} calls within a second from #{i}"
        );
    }
    let spans: Vec<(SystemTime, SystemTime)> = calls
        .iter()
        .map(|c| {
            (
                c.created_at,
                c.created_at + Duration::from_millis(c.ended_at_ms.unwrap_or(60_000)),
            )
        })
        .collect();
    for (start, _) in &spans {
        let live = spans
            .iter()
            .filter(|(s, e)| s <= start && start < e)
            .count();
        assert!(live <= 3, "{live} calls at once");
    }
    // results.csv: one row per recipient.
    let r = reqwest::Client::new()
        .get(server.url(&format!("/api/v1/campaigns/{id}/results.csv")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with(
            "to,state,attempts,last_outcome,answered_by,duration_seconds,last_call_id"
        ),
        "{text}"
    );
    assert_eq!(text.lines().count(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_new_dials_at_once_and_resume_continues() {
    let (sim, install, key) = setup(10.0).await;
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    let id = api
        .create(
            json!({"name": "pause", "calls_per_second": 1.0, "max_concurrent": 5,
            "days": ["mon","tue","wed","thu","fri","sat","sun"]}),
        )
        .await;
    let hour = Utc::now().hour() as i32;
    let o = (13 - hour).rem_euclid(24);
    let tz = etc_zone(if o > 12 { o - 24 } else { o });
    let mut csv = String::from("to,timezone\n");
    for i in 1..=6 {
        csv.push_str(&format!("+141555504{i:02},{tz}\n"));
    }
    api.csv(&id, csv).await;
    api.wait(&id, Duration::from_secs(10), |c| {
        c["progress"]["calls_placed"].as_i64().unwrap() >= 1
    })
    .await;
    let (s, c) = api.post(&format!("/campaigns/{id}/pause"), json!({})).await;
    assert_eq!((s, c["status"].as_str()), (200, Some("paused")), "{c}");
    let placed = c["progress"]["calls_placed"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, c) = api.get(&format!("/campaigns/{id}")).await;
    assert_eq!(
        c["progress"]["calls_placed"].as_i64().unwrap(),
        placed,
        "{c}"
    );
    assert_eq!(sim.calls().len() as i64, placed);
    assert!(c["progress"]["pending"].as_i64().unwrap() > 0);
    let (s, _) = api
        .post(&format!("/campaigns/{id}/resume"), json!({}))
        .await;
    assert_eq!(s, 200);
    let c = api
        .wait(&id, Duration::from_secs(20), |c| c["status"] == "completed")
        .await;
    assert_eq!(c["progress"]["done"], 6, "{c}");
    assert!(dialed(&sim).values().all(|&n| n == 1));
    // Cancel of a finished campaign is a conflict, not a change.
    assert_eq!(
        api.post(&format!("/campaigns/{id}/cancel"), json!({}))
            .await
            .0,
        409
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_campaign_then_restart_dials_nobody_twice_and_forgets_nobody() {
    let (sim, install, key) = setup(10.0).await;
    let mut server = Server::start(&install);
    let api = Api::new(&server, &key);
    let id = api
        .create(
            json!({"name": "crash", "calls_per_second": 3.0, "max_concurrent": 3,
            "days": ["mon","tue","wed","thu","fri","sat","sun"]}),
        )
        .await;
    let hour = Utc::now().hour() as i32;
    let o = (13 - hour).rem_euclid(24);
    let tz = etc_zone(if o > 12 { o - 24 } else { o });
    let mut csv = String::from("to,timezone\n");
    for i in 1..=10 {
        csv.push_str(&format!("+141555505{i:02},{tz}\n"));
    }
    api.csv(&id, csv).await;
    let end = Instant::now() + Duration::from_secs(10);
    while sim.calls().len() < 3 {
        assert!(Instant::now() < end, "no calls");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    drop(server);
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    let c = api
        .wait(&id, Duration::from_secs(40), |c| c["status"] == "completed")
        .await;
    progress_adds_up(&c);
    let d = dialed(&sim);
    assert_eq!(d.len(), 10, "everyone dialed: {d:?}");
    assert!(d.values().all(|&n| n == 1), "nobody twice: {d:?}");
    let recips = api.recipients(&id).await;
    assert!(
        recips
            .iter()
            .all(|r| r["state"] == "done" || r["state"] == "failed"),
        "{recips:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_campaign_and_dnc_commands() {
    let (_sim, install, _key) = setup(5.0).await;
    let _server = Server::start(&install);
    let csv = install.dir.path().join("list.csv");
    std::fs::write(
        &csv,
        "to,name\n+14155550601,Ann\n+14155550602,Bo\nnope,Cy\n",
    )
    .unwrap();
    let dnc = install.dir.path().join("dnc.txt");
    std::fs::write(&dnc, "+14155550602\n+14155550603\n").unwrap();
    let out = install.json(&["dnc", "import", dnc.to_str().unwrap(), "--tenant", "acme"]);
    assert_eq!(out["added"], 2, "{out}");
    let created = install.json(&[
        "campaign",
        "create",
        "spring",
        "--csv",
        csv.to_str().unwrap(),
        "--tenant",
        "acme",
        "--greeting",
        "Hi {{name}}",
        "--hours",
        "09:00-20:00",
        "--max-concurrent",
        "2",
        "--paused",
    ]);
    let id = created["campaign"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["import"]["accepted"], 1, "{created}");
    assert_eq!(created["import"]["suppressed"], 1, "{created}");
    assert_eq!(created["import"]["rejected"][0]["row"], 4, "{created}");
    let human = install.ok(&["campaign", "show", &id]);
    assert!(
        human.contains("09:00-20:00") && human.contains("paused"),
        "{human}"
    );
    let list = install.json(&["campaign", "list"]);
    assert_eq!(list["campaigns"][0]["id"], id.as_str());
    let canceled = install.json(&["campaign", "cancel", &id]);
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(canceled["progress"]["canceled"], 1);
    let results = install.dir.path().join("results.csv");
    install.ok(&["campaign", "results", &id, "-o", results.to_str().unwrap()]);
    let text = std::fs::read_to_string(&results).unwrap();
    assert!(text.contains("+14155550601,Ann,canceled"), "{text}");
    // Bad input is an error and changes nothing.
    let err = install.fails(&[
        "campaign",
        "create",
        "x",
        "--csv",
        csv.to_str().unwrap(),
        "--tenant",
        "acme",
        "--hours",
        "06:00-20:00",
    ]);
    assert!(err.contains("08:00-21:00"), "{err}");
    install.ok(&["dnc", "rm", "+14155550603", "--tenant", "acme"]);
    let list = install.json(&["dnc", "list", "--tenant", "acme"]);
    assert_eq!(list["numbers"], json!(["+14155550602"]));
    assert_eq!(
        install.json(&["campaign", "list"])["campaigns"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_numbers_dnc_at_dial_time_large_uploads_and_the_completed_webhook() {
    use axum::routing::post;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let receiver = axum::Router::new().route(
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
    tokio::spawn(async move { axum::serve(l, receiver).await.unwrap() });

    let (sim, install, key) = setup(10.0).await;
    install.ok(&["tenant", "update", "acme", "--webhook-url", &url]);
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    let id = api
        .create(
            json!({"name": "big", "paused": true, "calls_per_second": 5.0,
            "days": ["mon","tue","wed","thu","fri","sat","sun"]}),
        )
        .await;
    let hour = Utc::now().hour() as i32;
    let o = (13 - hour).rem_euclid(24);
    let tz = etc_zone(if o > 12 { o - 24 } else { o });
    // Far above the API's 64 KiB body limit: 3 dialable rows, then 4,000 rejected ones.
    let mut csv = format!(
        "to,timezone,note\n+14155550701,{tz},a\n+14155550702,{tz},b\n+14155550703,{tz},c\n"
    );
    for _ in 0..4000 {
        csv.push_str("not-a-number,,padding padding padding padding\n");
    }
    assert!(csv.len() > 150_000);
    let (s, v) = api.csv(&id, csv).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["accepted"], 3);
    assert_eq!(v["rejected"].as_array().unwrap().len(), 4000);
    // On the list after import: suppressed right before its dial.
    let (s, _) = api.post("/dnc", json!({"numbers": ["+14155550703"]})).await;
    assert_eq!(s, 200);
    // The carrier refuses the first creation (21211): failed at once, never retried.
    sim.fail_next_creates(1, 400, 21211);
    let (s, _) = api
        .post(&format!("/campaigns/{id}/resume"), json!({}))
        .await;
    assert_eq!(s, 200);
    let c = api
        .wait(&id, Duration::from_secs(20), |c| c["status"] == "completed")
        .await;
    assert_eq!(c["progress"]["failed"], 1, "{c}");
    assert_eq!(c["progress"]["done"], 1, "{c}");
    assert_eq!(c["progress"]["suppressed"], 1, "{c}");
    let recips = api.recipients(&id).await;
    let refused = recips
        .iter()
        .find(|r| r["state"] == "failed")
        .expect("a failed recipient");
    assert_eq!(refused["last_outcome"], "invalid_number", "{refused}");
    assert_eq!(refused["attempts"], 1);
    assert!(!dialed(&sim).contains_key("+14155550703"));
    // The campaign call's webhook carries the campaign; then campaign.completed.
    let mut kinds = Vec::new();
    while !kinds.contains(&"campaign.completed".to_owned()) {
        let ev = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("campaign.completed webhook")
            .unwrap();
        if ev["type"] == "call.ended" {
            assert_eq!(ev["call"]["metadata"]["campaign_id"], id.as_str(), "{ev}");
            assert!(
                ev["call"]["metadata"]["recipient"]["to"].is_string(),
                "{ev}"
            );
        } else {
            assert_eq!(ev["campaign"]["id"], id.as_str(), "{ev}");
            assert_eq!(ev["campaign"]["status"], "completed", "{ev}");
        }
        kinds.push(ev["type"].as_str().unwrap().to_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_leave_the_inbound_reserve_free() {
    let (sim, install, key) = setup(10.0).await;
    let cfg = std::fs::read_to_string(&install.config).unwrap().replace(
        "max_concurrent_calls = 20\ninbound_reserve = 2",
        "max_concurrent_calls = 3\ninbound_reserve = 1",
    );
    std::fs::write(&install.config, cfg).unwrap();
    sim.set_default_scenario(Scenario::answer(CallerScript::new(vec![
        Step::Silence(1500),
        Step::Hangup,
    ])));
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    let id = api
        .create(json!({"name": "reserve", "days": ["mon","tue","wed","thu","fri","sat","sun"]}))
        .await;
    let hour = Utc::now().hour() as i32;
    let o = (13 - hour).rem_euclid(24);
    let tz = etc_zone(if o > 12 { o - 24 } else { o });
    let mut csv = String::from("to,timezone\n");
    for i in 1..=4 {
        csv.push_str(&format!("+141555508{i:02},{tz}\n"));
    }
    api.csv(&id, csv).await;
    api.wait(&id, Duration::from_secs(10), |c| {
        c["progress"]["dialing"].as_i64().unwrap() + c["progress"]["in_call"].as_i64().unwrap() == 2
    })
    .await;
    // The third line is free for anything else: an API call is placed at once.
    let (s, call) = api.post("/calls", json!({"to": "+14155550899"})).await;
    assert_eq!(s, 201, "{call}");
    let end = Instant::now() + Duration::from_secs(5);
    while !dialed(&sim).contains_key("+14155550899") {
        assert!(
            Instant::now() < end,
            "the API call waited behind the campaign"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = api
        .wait(&id, Duration::from_secs(30), |c| c["status"] == "completed")
        .await;
    assert_eq!(c["progress"]["done"], 4, "{c}");
    // Never more than two campaign calls at once.
    let spans: Vec<(SystemTime, SystemTime)> = sim
        .calls()
        .iter()
        .filter(|c| c.to != "+14155550899")
        .map(|c| {
            (
                c.created_at,
                c.created_at + Duration::from_millis(c.ended_at_ms.unwrap_or(60_000)),
            )
        })
        .collect();
    for (start, _) in &spans {
        let live = spans
            .iter()
            .filter(|(s, e)| s <= start && start < e)
            .count();
        assert!(live <= 2, "{live} campaign calls at once");
    }
}

/// `machine_detection = "voicemail"` on a campaign (SPEC §7, §8): a machine gets the
/// campaign's message with the recipient's variables filled in, the call ends
/// `voicemail_left`, and the campaign counts it under `voicemail`; the tenant's own setting
/// does not override the campaign's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_leaves_its_templated_voicemail_on_machines() {
    let (sim, install, key) = setup(10.0).await;
    install.ok(&["tenant", "update", "acme", "--machine-detection", "hangup"]);
    sim.set_scenario(
        "+14155550961",
        Scenario::Answer {
            caller: CallerScript::new(vec![
                Step::Speak(1000),
                Step::Beep,
                Step::Silence(8000),
                Step::Hangup,
            ]),
            answered_by: Some("machine_end_beep".into()),
        },
    );
    let server = Server::start(&install);
    let api = Api::new(&server, &key);
    let id = api
        .create(json!({"name": "vm", "machine_detection": "voicemail",
            "voicemail_message": "Hi {{name}}, this is Acme. Please call us back.",
            "days": ["mon","tue","wed","thu","fri","sat","sun"]}))
        .await;
    let hour = Utc::now().hour() as i32;
    let o = (13 - hour).rem_euclid(24);
    let tz = etc_zone(if o > 12 { o - 24 } else { o });
    let (s, v) = api
        .csv(&id, format!("to,timezone,name\n+14155550961,{tz},Ann\n"))
        .await;
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(1)), "{v}");
    let c = api
        .wait(&id, Duration::from_secs(25), |c| {
            c["progress"]["voicemail"].as_i64() == Some(1)
        })
        .await;
    assert_eq!(c["progress"]["voicemail"], 1, "{c}");
    let r = &api.recipients(&id).await[0];
    let call_id = r["last_call_id"].as_str().unwrap();
    let (_, call) = api.get(&format!("/calls/{call_id}")).await;
    assert_eq!(call["end_reason"], "voicemail_left", "{call}");
    let (_, t) = api.get(&format!("/calls/{call_id}/transcript")).await;
    assert!(
        t["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["text"] == "Hi Ann, this is Acme. Please call us back."),
        "{t}"
    );
    let rec = sim.call(call["twilio_call_sid"].as_str().unwrap()).unwrap();
    assert!(
        rec.request_params
            .iter()
            .any(|(k, v)| k == "MachineDetection" && v == "DetectMessageEnd"),
        "{:?}",
        rec.request_params
    );
}

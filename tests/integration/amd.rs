//! Answering-machine detection and keypad settings on `POST /calls`, against the real binary
//! and the Twilio simulator.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Install, Server};
use twilio_sim::{self as sim, CallerScript, Scenario, SimConfig, Step};

const SID: &str = "AC00000000000000000000000000000014";
const TOKEN: &str = "amd-token";

async fn setup() -> (sim::SimHandle, Install, String) {
    let sim = sim::start(SimConfig::new(SID, TOKEN)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = dir.path().join("voicectl.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndomain = \"voice.test\"\ndata_dir = {data_dir:?}\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nhttps_listen = \"\"\n\n\
             [tls]\nmode = \"off\"\n\n\
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

async fn post(http: &reqwest::Client, server: &Server, key: &str, body: &Value) -> (u16, Value) {
    let r = http
        .post(server.url("/api/v1/calls"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Waits until the dialer placed call `id`; returns the parameters Twilio received.
async fn placed(
    http: &reqwest::Client,
    server: &Server,
    key: &str,
    sim: &sim::SimHandle,
    id: &str,
) -> (String, Vec<(String, String)>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c: Value = http
            .get(server.url(&format!("/api/v1/calls/{id}")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(sid) = c["twilio_call_sid"].as_str()
            && let Some(rec) = sim.call(sid)
        {
            return (sid.to_owned(), rec.request_params.clone());
        }
        assert!(tokio::time::Instant::now() < deadline, "never dialed: {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_digits_reach_the_carrier_and_turn_amd_off() {
    let (sim, install, key) = setup().await;
    sim.set_default_scenario(Scenario::answer(CallerScript::silent()));
    let server = Server::start(&install);
    let http = reqwest::Client::new();

    let (st, with_digits) = post(
        &http,
        &server,
        &key,
        &json!({"to": "+14155550301", "send_digits": "ww12#", "machine_detection": true}),
    )
    .await;
    assert_eq!(st, 201, "{with_digits}");
    let (sid, params) = placed(
        &http,
        &server,
        &key,
        &sim,
        with_digits["id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(param(&params, "SendDigits"), Some("ww12#"), "{params:?}");
    for absent in ["MachineDetection", "AsyncAmd", "AsyncAmdStatusCallback"] {
        assert_eq!(
            param(&params, absent),
            None,
            "{absent} with SendDigits: {params:?}"
        );
    }
    sim.hangup(&sid).unwrap();

    // Without send_digits, detection is still requested (the control for the above).
    let (st, plain) = post(
        &http,
        &server,
        &key,
        &json!({"to": "+14155550302", "machine_detection": true}),
    )
    .await;
    assert_eq!(st, 201, "{plain}");
    let (sid, params) = placed(&http, &server, &key, &sim, plain["id"].as_str().unwrap()).await;
    assert_eq!(param(&params, "SendDigits"), None);
    assert_eq!(param(&params, "AsyncAmd"), Some("true"), "{params:?}");
    sim.hangup(&sid).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_send_digits_are_refused_and_create_nothing() {
    let (_sim, install, key) = setup().await;
    let server = Server::start(&install);
    let http = reqwest::Client::new();
    let long = "1".repeat(33);
    for bad in [
        json!(""),
        json!("12a"),
        json!("1 2"),
        json!(long),
        json!(12),
    ] {
        let (st, e) = post(
            &http,
            &server,
            &key,
            &json!({"to": "+14155550303", "send_digits": bad}),
        )
        .await;
        assert_eq!(st, 400, "{bad}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("send_digits"),
            "{bad}: {e}"
        );
    }
    let list: Value = http
        .get(server.url("/api/v1/calls"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["calls"].as_array().unwrap().len(), 0, "{list}");
}

async fn get(http: &reqwest::Client, server: &Server, key: &str, id: &str) -> Value {
    http.get(server.url(&format!("/api/v1/calls/{id}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits for call `id` to reach a final status; returns the call object.
async fn ended(http: &reqwest::Client, server: &Server, key: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let c = get(http, server, key, id).await;
        if c["ended_at"].is_string() {
            return c;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ended: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A machine whose greeting would run for 4 s before it hangs up by itself.
fn machine() -> Scenario {
    Scenario::Answer {
        caller: CallerScript::new(vec![Step::Silence(4000), Step::Hangup]),
        answered_by: Some("machine_end_beep".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_mode_ends_a_machine_call_and_detect_mode_only_records() {
    let (sim, install, key) = setup().await;
    sim.set_scenario("+14155550311", machine());
    sim.set_scenario("+14155550312", machine());
    // A person answering a hangup-mode call stays on the line.
    sim.set_scenario(
        "+14155550313",
        Scenario::Answer {
            caller: CallerScript::new(vec![Step::Silence(1500), Step::Hangup]),
            answered_by: Some("human".into()),
        },
    );
    let server = Server::start(&install);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (to, mode) in [
        ("+14155550311", "hangup"),
        ("+14155550312", "detect"),
        ("+14155550313", "hangup"),
    ] {
        let (st, c) = post(
            &http,
            &server,
            &key,
            &json!({"to": to, "machine_detection": mode}),
        )
        .await;
        assert_eq!(st, 201, "{c}");
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let started = std::time::Instant::now();
    let hung = ended(&http, &server, &key, &ids[0]).await;
    assert_eq!(hung["answered_by"], "machine_end_beep", "{hung}");
    assert_eq!(hung["end_reason"], "machine", "{hung}");
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "hung up at once, not when the machine stopped: {:?}",
        started.elapsed()
    );
    let detected = ended(&http, &server, &key, &ids[1]).await;
    assert_eq!(detected["answered_by"], "machine_end_beep", "{detected}");
    assert_ne!(detected["end_reason"], "machine", "{detected}");
    // A duplicated report after the end changes nothing; a forged one is refused.
    let (_, params) = placed(&http, &server, &key, &sim, &ids[0]).await;
    let cb = param(&params, "AsyncAmdStatusCallback").unwrap().to_owned();
    let path = &cb[cb.find("/twilio/").unwrap()..];
    let form: Vec<(String, String)> = [
        ("CallSid", hung["twilio_call_sid"].as_str().unwrap()),
        ("AccountSid", SID),
        ("AnsweredBy", "human"),
        ("MachineDetectionDuration", "900"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (sig, want) in [(sim.sign(&cb, &form), 204), ("forged".to_owned(), 403)] {
        let r = http
            .post(server.url(path))
            .header("x-twilio-signature", sig)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    let again = get(&http, &server, &key, &ids[0]).await;
    assert_eq!(
        (
            &again["status"],
            &again["end_reason"],
            &again["answered_by"]
        ),
        (&hung["status"], &hung["end_reason"], &hung["answered_by"]),
        "{again}"
    );
    let person = ended(&http, &server, &key, &ids[2]).await;
    assert_eq!(person["answered_by"], "human", "{person}");
    assert_ne!(person["end_reason"], "machine", "{person}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_machine_detection_values_are_refused() {
    let (_sim, install, key) = setup().await;
    let server = Server::start(&install);
    let http = reqwest::Client::new();
    for bad in [
        json!("voicemail-please"),
        json!("maybe"),
        json!("HANGUP"),
        json!(3),
    ] {
        let (st, e) = post(
            &http,
            &server,
            &key,
            &json!({"to": "+14155550320", "machine_detection": bad}),
        )
        .await;
        assert_eq!(st, 400, "{bad}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("machine_detection"),
            "{bad}: {e}"
        );
    }
    let (st, c) = post(
        &http,
        &server,
        &key,
        &json!({"to": "+14155550321", "machine_detection": "off"}),
    )
    .await;
    assert_eq!(st, 201, "\"off\" is accepted: {c}");
}

//! Voicemail drop (SPEC §8): with `machine_detection = "voicemail"` Twilio is asked to report
//! machines at the end of their greeting (`DetectMessageEnd`); the agent then leaves the
//! message, which the machine records after its beep, and the call ends `voicemail_left`.
//! Settings come from the call, else the tenant, else the server.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use twilio_sim::{CallerScript, CloseSide, Scenario, Step};

use crate::e2e::{Opts, Stack, stack};
use crate::handover::{admin_key, get_tenant, put_tenant};

const MESSAGE: &str = "Hi, this is Acme about your order. Please call us back at 555 0100.";

/// A machine: a 1.5 s greeting, its beep, then it records for 8 s before giving up.
fn machine() -> Scenario {
    Scenario::Answer {
        caller: CallerScript::new(vec![
            Step::Speak(1500),
            Step::Beep,
            Step::Silence(8000),
            Step::Hangup,
        ]),
        answered_by: Some("machine_end_beep".into()),
    }
}

async fn place(s: &Stack, body: Value) -> String {
    let (st, c) = s.api(Method::POST, "/api/v1/calls", Some(body)).await;
    assert_eq!(st, 201, "{c}");
    c["id"].as_str().unwrap().to_owned()
}

fn param<'a>(rec: &'a twilio_sim::SimCallRecord, key: &str) -> Option<&'a str> {
    rec.request_params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The call once ended, and the simulator's record of it.
async fn ended(s: &Stack, id: &str) -> (Value, twilio_sim::SimCallRecord) {
    s.follow(id, Duration::from_secs(20)).await;
    let call = s.get(id).await;
    let sid = call["twilio_call_sid"].as_str().unwrap().to_owned();
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(5))
        .await
        .unwrap();
    (call, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_machine_records_the_message_after_its_beep_and_the_call_ends_voicemail_left() {
    let s = stack(Opts::default()).await;
    s.sim.set_scenario("+14155550951", machine());
    let id = place(
        &s,
        json!({"to": "+14155550951", "machine_detection": "voicemail", "voicemail_message": MESSAGE}),
    )
    .await;
    let (call, rec) = ended(&s, &id).await;
    assert_eq!(param(&rec, "MachineDetection"), Some("DetectMessageEnd"));
    assert_eq!(param(&rec, "AsyncAmd"), Some("true"));
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["end_reason"], "voicemail_left", "{call}");
    assert_eq!(call["answered_by"], "machine_end_beep", "{call}");

    let stream = &rec.streams[0];
    assert!(stream.beep_ended_ms.is_some(), "the machine beeped");
    // The whole message played after the beep (the scripted voice's length follows the text),
    // and then we hung up, long before the machine would have.
    let message = voicectl::engines::scripted::synthesize(MESSAGE).len() as u64;
    assert!(
        stream.agent_played_after_beep >= message * 9 / 10,
        "{} of {message} message bytes recorded",
        stream.agent_played_after_beep
    );
    assert!(
        stream.agent_played_after_beep <= message + 8_000,
        "nothing but the message after the beep: {} bytes for a {message}-byte message",
        stream.agent_played_after_beep
    );
    assert_eq!(stream.close.as_ref().map(|c| c.by), Some(CloseSide::App));
    let t = s.transcript(&id).await;
    assert!(
        t.iter()
            .any(|e| e["speaker"] == "agent" && e["text"] == MESSAGE),
        "{t:?}"
    );
}

/// No message anywhere: a machine is hung up on as in `hangup` mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_message_a_machine_is_hung_up_on() {
    let s = stack(Opts::default()).await;
    s.sim.set_scenario("+14155550952", machine());
    let id = place(
        &s,
        json!({"to": "+14155550952", "machine_detection": "voicemail"}),
    )
    .await;
    let (call, rec) = ended(&s, &id).await;
    assert_eq!(call["end_reason"], "machine", "{call}");
    assert_eq!(rec.streams[0].agent_played_after_beep, 0);
}

/// The tenant's mode and message apply to its calls; a call's own `machine_detection` beats
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_s_settings_apply_and_the_call_s_own_value_beats_them() {
    let s = stack(Opts::default()).await;
    let admin = admin_key(&s);
    let (st, t) = put_tenant(
        &s,
        &admin,
        json!({"machine_detection": "voicemail", "voicemail_message": MESSAGE}),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["machine_detection"], "voicemail", "{t}");
    s.sim.set_scenario("+14155550953", machine());
    s.sim.set_scenario("+14155550954", machine());
    let by_tenant = place(&s, json!({"to": "+14155550953"})).await;
    let own = place(
        &s,
        json!({"to": "+14155550954", "machine_detection": "off"}),
    )
    .await;
    let ((tenant_call, tenant_rec), (own_call, own_rec)) =
        tokio::join!(ended(&s, &by_tenant), ended(&s, &own));
    assert_eq!(
        param(&tenant_rec, "MachineDetection"),
        Some("DetectMessageEnd")
    );
    assert_eq!(tenant_call["end_reason"], "voicemail_left", "{tenant_call}");
    assert_eq!(param(&own_rec, "MachineDetection"), None);
    assert_ne!(own_call["end_reason"], "voicemail_left", "{own_call}");
}

/// Bad values are refused with the field named, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_voicemail_settings_are_refused_and_change_nothing() {
    let s = stack(Opts::default()).await;
    let long = "a".repeat(voicectl::domain::amd::MAX_VOICEMAIL_CHARS + 1);
    for (body, field) in [
        (
            json!({"to": "+14155550955", "machine_detection": "voicemail", "voicemail_message": long}),
            "voicemail_message",
        ),
        (
            json!({"to": "+14155550955", "machine_detection": "voicemail", "voicemail_message": "  "}),
            "voicemail_message",
        ),
        (
            json!({"to": "+14155550955", "machine_detection": "sometimes"}),
            "machine_detection",
        ),
    ] {
        let (st, v) = s.api(Method::POST, "/api/v1/calls", Some(body)).await;
        assert_eq!(st, 400, "{v}");
        assert!(v.to_string().contains(field), "{v}");
    }
    let (_, calls) = s.api(Method::GET, "/api/v1/calls", None).await;
    assert_eq!(calls["calls"].as_array().map(Vec::len), Some(0), "{calls}");

    let admin = admin_key(&s);
    for (body, field) in [
        (json!({"machine_detection": "always"}), "machine_detection"),
        (json!({"voicemail_message": long}), "voicemail_message"),
    ] {
        let (st, v) = put_tenant(&s, &admin, body).await;
        assert_eq!(st, 400, "{v}");
        assert!(v.to_string().contains(field), "{v}");
    }
    let t = get_tenant(&s, &admin).await;
    assert!(t["machine_detection"].is_null(), "{t}");
    let (st, v) = s
        .api(
            Method::POST,
            "/api/v1/campaigns",
            Some(json!({"name": "x", "machine_detection": "sometimes"})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
}

/// With OpenAI Realtime the agent's running response is cancelled at the beep and the message
/// is asked for as a new one, which the machine records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_agent_leaves_the_message_after_the_beep() {
    use test_fakes::realtime::{FakeRealtime, RealtimeOpts};
    let rt = FakeRealtime::start(RealtimeOpts {
        greeting_ms: 3000,
        reply_ms: 600,
        ..Default::default()
    })
    .await;
    let s = crate::e2e::realtime_stack(&rt).await;
    s.sim.set_scenario("+14155550956", machine());
    let id = place(
        &s,
        json!({"to": "+14155550956", "machine_detection": "voicemail", "voicemail_message": MESSAGE}),
    )
    .await;
    let (call, rec) = ended(&s, &id).await;
    assert_eq!(call["end_reason"], "voicemail_left", "{call}");
    rt.wait_all_closed(Duration::from_secs(5)).await;
    let session = rt.session(0);
    assert!(session.problems().is_empty(), "{:?}", session.problems());
    // The greeting (3 s) was still playing at the beep: cancelled, then the message.
    let ev = &session.client_events;
    let cancel = ev
        .iter()
        .position(|e| e == "response.cancel")
        .expect("cancelled");
    assert!(
        ev[cancel..].iter().any(|e| e == "response.create"),
        "{ev:?}"
    );
    assert!(
        rec.streams[0].agent_played_after_beep > 0,
        "the machine recorded the message"
    );
}

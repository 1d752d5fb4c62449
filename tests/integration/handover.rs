//! Handovers on live calls: keypad out (DTMF) and transfers, over the operator REST actions,
//! against the Twilio simulator. The stream stops and a new one re-attaches to the same call
//! record and the same engine session.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use twilio_sim::{CallerScript, Scenario, Step};

use crate::e2e::{Opts, Stack, stack};

/// Waits until the call is live and the agent's greeting is on record.
async fn wait_greeted(s: &Stack, id: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = s.get(id).await;
        let t = s.transcript(id).await;
        if c["status"] == "in_progress" && !t.is_empty() {
            return c["twilio_call_sid"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "call never became live: {c}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dtmf(s: &Stack, id: &str, digits: &str) -> (u16, Value) {
    s.api(
        Method::POST,
        &format!("/api/v1/calls/{id}/dtmf"),
        Some(json!({ "digits": digits })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_dtmf_keeps_the_call_and_its_engine_session() {
    let s = stack(Opts::default()).await;
    let to = "+14155550701";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Silence(2500),
            Step::Speak(500),
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ])),
    );
    let id = s.call(to).await;
    let sid = wait_greeted(&s, &id).await;

    // Bad digits change nothing and send no redirect.
    let (code, v) = dtmf(&s, &id, "12x").await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("0-9"),
        "{v}"
    );

    let (code, v) = dtmf(&s, &id, "12#").await;
    assert_eq!(code, 202, "{v}");
    let events = s.follow(&id, Duration::from_secs(20)).await;
    assert_eq!(
        crate::e2e::statuses(&events).last().map(String::as_str),
        Some("completed"),
        "{events:?}"
    );

    let call = s.get(&id).await;
    assert_eq!(call["id"], id.as_str());
    assert_eq!(call["end_reason"], "caller_hangup", "{call}");
    // One engine session for the whole call: one greeting, and the conversation carried
    // on after the new stream (the scripted engine's first reply, not a second greeting).
    let t = s.transcript(&id).await;
    let lines: Vec<(&str, &str)> = t
        .iter()
        .map(|e| {
            (
                e["speaker"].as_str().unwrap(),
                e["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(lines.first(), Some(&("agent", "Hi")), "{lines:?}");
    assert_eq!(
        lines.iter().filter(|(_, x)| *x == "Hi").count(),
        1,
        "{lines:?}"
    );
    assert_eq!(lines.last(), Some(&("agent", "Sure.")), "{lines:?}");

    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(rec.played_digits, ["12#"]);
    assert_eq!(
        rec.streams.len(),
        2,
        "the stream stopped and a new one started"
    );
    assert!(
        rec.errors.is_empty() && rec.unsupported_verbs.is_empty(),
        "{:?} {:?}",
        rec.errors,
        rec.unsupported_verbs
    );

    // An ended call: 409, clear.
    let (code, v) = dtmf(&s, &id, "1").await;
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("not live"),
        "{v}"
    );
    assert_eq!(s.manager.session_count(), 0, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_call_is_not_found_and_unknown_fields_are_refused() {
    let s = stack(Opts::default()).await;
    let to = "+14155550702";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Silence(1500),
            Step::Hangup,
        ])),
    );
    let id = s.call(to).await;
    let sid = wait_greeted(&s, &id).await;
    let other = s
        .store
        .blocking(|c| {
            voicectl::store::tenants::create(
                c,
                voicectl::store::tenants::TenantPatch {
                    name: Some("other".into()),
                    ..Default::default()
                },
            )?;
            Ok(voicectl::store::keys::create(c, Some("other"), "k", None)?.key)
        })
        .unwrap();
    let r = s
        .http
        .post(format!("{}/api/v1/calls/{id}/dtmf", s.base))
        .bearer_auth(&other)
        .json(&json!({"digits": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .post(format!("{}/api/v1/calls/{id}/transfer", s.base))
        .bearer_auth(&other)
        .json(&json!({"destination": "sales"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another tenant's call");
    let (code, v) = s
        .api(
            Method::POST,
            &format!("/api/v1/calls/{id}/dtmf"),
            Some(json!({"digits": "1", "extra": true})),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    let (code, _) = dtmf(&s, &id, &"1".repeat(65)).await;
    assert_eq!(code, 400);
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(rec.played_digits.is_empty(), "no redirect was sent");
    assert_eq!(rec.streams.len(), 1);
}

/// An admin key on the stack's store (tenant settings are admin-only).
pub(crate) fn admin_key(s: &Stack) -> String {
    s.store
        .blocking(|c| Ok(voicectl::store::keys::create(c, None, "admin", None)?.key))
        .unwrap()
}

/// `GET /tenants/acme` with the admin key.
pub(crate) async fn get_tenant(s: &Stack, admin: &str) -> Value {
    s.http
        .get(format!("{}/api/v1/tenants/acme", s.base))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub(crate) async fn put_tenant(s: &Stack, admin: &str, body: Value) -> (u16, Value) {
    let r = s
        .http
        .put(format!("{}/api/v1/tenants/acme", s.base))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn transfer(s: &Stack, id: &str, destination: &str, summary: &str) -> (u16, Value) {
    s.api(
        Method::POST,
        &format!("/api/v1/calls/{id}/transfer"),
        Some(json!({ "destination": destination, "summary": summary })),
    )
    .await
}

/// The stack's tenant with three transfer targets (answers / busy / no answer) in `mode`.
async fn with_targets(s: &Stack, mode: &str) {
    let admin = admin_key(s);
    let (code, v) = put_tenant(
        s,
        &admin,
        json!({
            "transfer_mode": mode,
            "transfer_numbers": [
                {"number": "+14155550900", "label": "sales"},
                {"number": "+14155550486", "label": "support"},
                {"number": "+14155550487", "label": "billing"},
            ],
        }),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["transfer_mode"], mode);
    assert_eq!(v["transfer_numbers"][0]["label"], "sales");
}

/// The caller waits for the greeting and then stays on the line quietly.
fn patient() -> Scenario {
    Scenario::answer(CallerScript::new(vec![
        Step::WaitForAgentSilence { min_ms: 200 },
        Step::Silence(8000),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_transfer_answered_ends_the_call_as_transferred() {
    let s = stack(Opts::default()).await;
    with_targets(&s, "cold").await;
    let to = "+14155550711";
    s.sim.set_scenario(to, patient());
    let id = s.call(to).await;
    let sid = wait_greeted(&s, &id).await;

    // Not listed: a clear 400, no dial, the call goes on.
    let (code, v) = transfer(&s, &id, "+14155550999", "").await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not one of this tenant's transfer numbers"),
        "{v}"
    );
    assert_eq!(s.get(&id).await["status"], "in_progress");

    let (code, v) = transfer(&s, &id, "SALES", "").await;
    assert_eq!(code, 202, "{v}");
    let events = s.follow(&id, Duration::from_secs(20)).await;
    assert_eq!(
        crate::e2e::statuses(&events).last().map(String::as_str),
        Some("completed"),
        "{events:?}"
    );
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "transferred", "{call}");
    assert_eq!(call["transfer"]["to"], "+14155550900", "{call}");
    assert_eq!(call["transfer"]["status"], "completed", "{call}");
    assert_eq!(call["transfer"]["duration_seconds"], 1, "{call}");
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(rec.dials.len(), 1, "{:?}", rec.dials);
    assert_eq!(rec.dials[0].number, "+14155550900");
    assert!(rec.dials[0].whisper.is_empty(), "cold: no whisper");
    assert_eq!(
        rec.dials[0].caller_id.as_deref(),
        Some("+14155550100"),
        "the target sees our number"
    );
    assert!(rec.errors.is_empty(), "{:?}", rec.errors);
    assert_eq!(s.manager.session_count(), 0, "nothing left behind");
    // The call is over: a second transfer is a clear 409.
    let (code, v) = transfer(&s, &id, "sales", "").await;
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("not live"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_transfer_whispers_the_summary_to_the_person_answering() {
    let s = stack(Opts::default()).await;
    with_targets(&s, "warm").await;
    let to = "+14155550712";
    s.sim.set_scenario(to, patient());
    let id = s.call(to).await;
    let sid = wait_greeted(&s, &id).await;
    let (code, v) = transfer(&s, &id, "+14155550900", "Jane wants a refund for order 42.").await;
    assert_eq!(code, 202, "{v}");
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(rec.dials.len(), 1);
    assert_eq!(rec.dials[0].whisper, ["Jane wants a refund for order 42."]);
    assert_eq!(s.get(&id).await["end_reason"], "transferred");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_transfer_brings_the_agent_back_and_the_call_goes_on() {
    let s = stack(Opts::default()).await;
    with_targets(&s, "cold").await;
    let to = "+14155550713";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Silence(1500),
            // The agent is back and says the transfer failed; the caller answers.
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Speak(500),
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ])),
    );
    let id = s.call(to).await;
    let sid = wait_greeted(&s, &id).await;
    let (code, v) = transfer(&s, &id, "support", "").await;
    assert_eq!(code, 202, "{v}");
    let events = s.follow(&id, Duration::from_secs(25)).await;
    assert_eq!(
        crate::e2e::statuses(&events).last().map(String::as_str),
        Some("completed"),
        "{events:?}"
    );
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "caller_hangup", "{call}");
    assert_eq!(call["transfer"]["status"], "busy", "{call}");
    let t = s.transcript(&id).await;
    let agent: Vec<&str> = t
        .iter()
        .filter(|e| e["speaker"] == "agent")
        .map(|e| e["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(agent.iter().filter(|x| **x == "Hi").count(), 1, "{agent:?}");
    assert!(
        agent.iter().any(|x| x.contains("could not reach support")),
        "the agent says the transfer failed: {agent:?}"
    );
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(rec.dials[0].status, "busy");
    assert_eq!(rec.streams.len(), 2, "a new stream re-attached the agent");
}

#[tokio::test]
async fn forged_dial_callbacks_and_bad_tenant_transfer_settings_are_refused() {
    let s = stack(Opts::default()).await;
    let id = s.call("+14155550714").await;
    let r = s
        .http
        .post(format!("{}/twilio/dial/{id}", s.base))
        .header("X-Twilio-Signature", "Zm9yZ2Vk")
        .form(&[("DialCallStatus", "completed"), ("DialCallDuration", "5")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(s.get(&id).await["transfer"].is_null());

    let admin = admin_key(&s);
    for (body, field) in [
        (
            json!({"transfer_numbers": [{"number": "555-1234", "label": "x"}]}),
            "transfer_numbers",
        ),
        (
            json!({"transfer_numbers": [{"number": "+14155550900", "label": ""}]}),
            "transfer_numbers",
        ),
        (
            json!({"transfer_numbers": [
                {"number": "+14155550900", "label": "a"},
                {"number": "+14155550900", "label": "b"}]}),
            "transfer_numbers",
        ),
        (json!({"transfer_mode": "lukewarm"}), "transfer_mode"),
    ] {
        let (code, v) = put_tenant(&s, &admin, body.clone()).await;
        assert_eq!(code, 400, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{field}: ")), "{v}");
    }
    let r = s
        .http
        .get(format!("{}/api/v1/tenants/acme", s.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["transfer_numbers"], json!([]), "nothing changed: {t}");
    assert_eq!(t["transfer_mode"], "cold");
}

/// The same with the OpenAI Realtime engine (its fake records every session): one session
/// for the whole call, and the conversation goes on in it after the new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_dtmf_keeps_one_realtime_session() {
    use test_fakes::realtime::{FakeRealtime, RealtimeOpts};
    let rt = FakeRealtime::start(RealtimeOpts {
        reply_ms: 400,
        greeting_ms: 400,
        ..Default::default()
    })
    .await;
    let s = crate::e2e::realtime_stack(&rt).await;
    let to = "+14155550721";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Silence(2000),
            Step::Speak(600),
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ])),
    );
    let id = s.call(to).await;
    let sid = wait_greeted(&s, &id).await;
    let (code, v) = dtmf(&s, &id, "9").await;
    assert_eq!(code, 202, "{v}");
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(rec.played_digits, ["9"]);
    assert_eq!(rec.streams.len(), 2);
    rt.wait_all_closed(Duration::from_secs(5)).await;
    let sessions = rt.sessions();
    assert_eq!(sessions.len(), 1, "one engine session for the whole call");
    let session = &sessions[0];
    assert!(session.problems().is_empty(), "{:?}", session.problems());
    assert!(
        session.items.len() >= 2,
        "greeting, then a reply after the new stream"
    );
    assert!(
        !rec.streams[1].agent_audio.is_empty(),
        "the reply played on the new stream"
    );
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "caller_hangup", "{call}");
}

#[test]
fn tenant_transfer_settings_from_the_cli() {
    let i = crate::support::Install::new();
    i.init();
    let t = i.json(&[
        "tenant",
        "add",
        "acme",
        "--transfer-number",
        "+14155550100=sales",
        "--transfer-number",
        "+14155550111=front desk",
        "--transfer-mode",
        "warm",
    ]);
    assert_eq!(
        t["transfer_numbers"],
        json!([
            {"number": "+14155550100", "label": "sales"},
            {"number": "+14155550111", "label": "front desk"},
        ])
    );
    assert_eq!(t["transfer_mode"], "warm");
    let before = i.db_snapshot();
    let err = i.fails(&["tenant", "update", "acme", "--transfer-mode", "tepid"]);
    assert!(err.contains("transfer_mode"), "{err}");
    let err = i.fails(&["tenant", "update", "acme", "--transfer-number", "+1415"]);
    assert!(err.contains("transfer_numbers"), "{err}");
    let err = i.fails(&[
        "tenant",
        "update",
        "acme",
        "--transfer-number",
        "+14155550122",
    ]);
    assert!(err.contains("label"), "{err}");
    assert_eq!(i.db_snapshot(), before, "bad input changed nothing");
    let t = i.json(&["tenant", "update", "acme", "--no-transfer-numbers"]);
    assert_eq!(t["transfer_numbers"], json!([]));
    assert_eq!(t["transfer_mode"], "warm");
}

/// The agent's built-in `transfer_call` tool runs the same handover as the operator's REST
/// action: offered because the tenant has transfer numbers, warm whisper with its summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_transfer_call_tool_transfers_through_the_handover() {
    let s = stack(Opts {
        tweak: Box::new(|c| {
            c.agent.script = vec![
                r#"tool:transfer_call {"destination":"sales","summary":"Wants a refund"}"#.into(),
            ];
        }),
        ..Default::default()
    })
    .await;
    with_targets(&s, "warm").await;
    let to = "+14155550712";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Speak(600),
            Step::Silence(8000),
        ])),
    );
    let id = s.call(to).await;
    let events = s.follow(&id, Duration::from_secs(25)).await;
    assert_eq!(
        crate::e2e::statuses(&events).last().map(String::as_str),
        Some("completed"),
        "{events:?}"
    );
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "transferred", "{call}");
    assert_eq!(call["transfer"]["to"], "+14155550900", "{call}");
    let sid = call["twilio_call_sid"].as_str().unwrap().to_owned();
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(rec.dials.len(), 1, "{:?}", rec.dials);
    assert!(
        rec.dials[0]
            .whisper
            .iter()
            .any(|w| w.contains("Wants a refund")),
        "{:?}",
        rec.dials[0]
    );
}

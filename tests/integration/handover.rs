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

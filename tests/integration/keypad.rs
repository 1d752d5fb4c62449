//! Keypad in (SPEC §8): the caller's keys reach the engine as text ("The caller pressed 1 2 3
//! #"), gathered until `#` or 2 s without a key, appear in the transcript as `[keypad]` caller
//! lines, and make the caller a person whatever answering-machine detection says later.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use test_fakes::realtime::{FakeRealtime, RealtimeOpts};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::media::keypad::KEYPAD_GAP;

use crate::e2e::{Opts, Stack, stack};

fn keys(s: &str) -> Vec<Step> {
    s.chars().map(Step::Dtmf).collect()
}

fn lines(t: &[Value]) -> Vec<(String, String)> {
    t.iter()
        .map(|e| {
            (
                e["speaker"].as_str().unwrap_or_default().to_owned(),
                e["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn wait_line(s: &Stack, id: &str, text: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = s.transcript(id).await;
        if t.iter().any(|e| e["text"] == text) {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line {text:?}: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `#` ends an entry at once; a pause of [`KEYPAD_GAP`] ends one too. The scripted agent
/// answers each entry like a spoken turn (its one line, then its goodbye).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reach_the_engine_as_one_entry_and_the_transcript_as_keypad_lines() {
    let s = stack(Opts::default()).await;
    let to = "+14155550901";
    let mut steps = vec![Step::WaitForAgentSilence { min_ms: 200 }];
    steps.extend(keys("123#"));
    steps.push(Step::WaitForAgentSilence { min_ms: 200 });
    steps.extend(keys("45"));
    steps.extend([Step::Silence(8000), Step::Hangup]);
    s.sim
        .set_scenario(to, Scenario::answer(CallerScript::new(steps)));
    let id = s.call(to).await;
    s.follow(&id, Duration::from_secs(20)).await;

    let t = s.transcript(&id).await;
    let got = lines(&t);
    let at = |text: &str| {
        got.iter()
            .position(|(_, x)| x == text)
            .unwrap_or_else(|| panic!("no {text:?} in {got:?}"))
    };
    let (first, second) = (at("[keypad] 123#"), at("[keypad] 45"));
    assert_eq!(got[first].0, "caller");
    assert_eq!(got[second].0, "caller");
    // Each entry was answered: the script's line after the first, the goodbye after the
    // second (the scripted agent then hangs up).
    assert_eq!(got[first + 1], ("agent".into(), "Sure.".into()), "{got:?}");
    assert!(second > first + 1 && got.len() > second + 1, "{got:?}");
    assert_eq!(got[second + 1].0, "agent", "{got:?}");
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "agent_hangup", "{call}");

    // "45" had no `#`: it went to the engine only after the pause, not at the key.
    let rec = s
        .sim
        .wait_ended(
            call["twilio_call_sid"].as_str().unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let pressed_5 = rec.streams[0]
        .dtmf_sent
        .iter()
        .find(|(d, _)| *d == '5')
        .map(|(_, ms)| *ms)
        .unwrap();
    let line_at = t[second]["at_ms"].as_i64().unwrap() as u64;
    assert!(
        line_at + 100 >= pressed_5 + KEYPAD_GAP.as_millis() as u64,
        "entry ended {} ms after the last key",
        line_at as i64 - pressed_5 as i64
    );
}

/// OpenAI Realtime gets the keys as a user text message and answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reach_the_realtime_model_as_a_user_message() {
    let rt = FakeRealtime::start(RealtimeOpts {
        greeting_ms: 300,
        reply_ms: 300,
        ..Default::default()
    })
    .await;
    let s = crate::e2e::realtime_stack(&rt).await;
    let to = "+14155550902";
    let mut steps = vec![Step::WaitForAgentSilence { min_ms: 200 }];
    steps.extend(keys("9*#"));
    steps.extend([Step::WaitForAgentSilence { min_ms: 300 }, Step::Hangup]);
    s.sim
        .set_scenario(to, Scenario::answer(CallerScript::new(steps)));
    let id = s.call(to).await;
    s.follow(&id, Duration::from_secs(20)).await;
    rt.wait_all_closed(Duration::from_secs(5)).await;
    let session = rt.session(0);
    assert!(session.problems().is_empty(), "{:?}", session.problems());
    assert_eq!(session.user_texts, ["The caller pressed 9 * #"]);
    // The model answered the keys: a second response after the greeting.
    assert!(
        session.items.len() >= 2,
        "{} responses",
        session.items.len()
    );
    let t = lines(&s.transcript(&id).await);
    assert!(
        t.contains(&("caller".into(), "[keypad] 9*#".into())),
        "{t:?}"
    );
}

/// Places a `hangup`-mode call whose detection is unsure at first (`unknown`), waits for
/// `line` in the transcript, then delivers a signed, genuine-looking late report that a machine
/// answered; returns the call once it ended.
async fn late_machine_report(s: &Stack, to: &str, steps: Vec<Step>, line: &str) -> Value {
    s.sim.set_scenario(
        to,
        Scenario::Answer {
            caller: CallerScript::new(steps),
            answered_by: Some("unknown".into()),
        },
    );
    let (st, c) = s
        .api(
            Method::POST,
            "/api/v1/calls",
            Some(json!({"to": to, "machine_detection": "hangup"})),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_owned();
    wait_line(s, &id, line).await;
    let call = s.get(&id).await;
    let sid = call["twilio_call_sid"].as_str().unwrap().to_owned();
    let rec = s.sim.call(&sid).unwrap();
    let cb = rec
        .request_params
        .iter()
        .find(|(k, _)| k == "AsyncAmdStatusCallback")
        .map(|(_, v)| v.clone())
        .unwrap();
    let form: Vec<(String, String)> = [
        ("CallSid", sid.as_str()),
        ("AccountSid", s.sim.account_sid()),
        ("AnsweredBy", "machine_end_beep"),
        ("MachineDetectionDuration", "4100"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let path = &cb[cb.find("/twilio/").unwrap()..];
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.base))
        .header("x-twilio-signature", s.sim.sign(&cb, &form))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    s.follow(&id, Duration::from_secs(10)).await;
    s.get(&id).await
}

/// A caller who presses a key, or answers the agent in a sentence, is a person: a machine
/// report that comes later changes nothing (no hang-up in `hangup` mode, `answered_by` stays
/// `human`). Speech that starts over the agent's greeting, as a machine's does, proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_press_or_an_answer_makes_a_person_whatever_detection_says_later() {
    let s = stack(Opts::default()).await;
    let mut pressed = vec![Step::WaitForAgentSilence { min_ms: 200 }];
    pressed.extend(keys("1#"));
    pressed.extend([Step::Silence(2500), Step::Hangup]);
    let answered = vec![
        Step::WaitForAgentSilence { min_ms: 200 },
        Step::Speak(1200),
        Step::Silence(3000),
        Step::Hangup,
    ];
    let greeting_over_ours = vec![Step::Speak(1200), Step::Silence(3000), Step::Hangup];
    let (pressed, answered, machine) = tokio::join!(
        late_machine_report(&s, "+14155550903", pressed, "[keypad] 1#"),
        late_machine_report(&s, "+14155550905", answered, "(caller spoke for 1.2 s)"),
        late_machine_report(
            &s,
            "+14155550906",
            greeting_over_ours,
            "(caller spoke for 1.2 s)"
        ),
    );
    for call in [&pressed, &answered] {
        assert_eq!(call["answered_by"], "human", "{call}");
        assert_eq!(call["status"], "completed", "{call}");
        assert_ne!(call["end_reason"], "machine", "{call}");
    }
    // (Its `answered_by` is whatever the simulator's own status callback last said.)
    assert_ne!(machine["answered_by"], "human", "{machine}");
    assert_eq!(machine["end_reason"], "machine", "{machine}");
}

/// Keys still being gathered when the caller hangs up were pressed: the transcript keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_pressed_just_before_the_hang_up_are_kept_in_the_transcript() {
    let s = stack(Opts::default()).await;
    let to = "+14155550904";
    let mut steps = vec![Step::WaitForAgentSilence { min_ms: 200 }];
    steps.extend(keys("77"));
    steps.extend([Step::Silence(200), Step::Hangup]);
    s.sim
        .set_scenario(to, Scenario::answer(CallerScript::new(steps)));
    let id = s.call(to).await;
    s.follow(&id, Duration::from_secs(10)).await;
    let t = lines(&s.transcript(&id).await);
    assert_eq!(
        t.iter().filter(|(_, x)| x.starts_with("[keypad]")).count(),
        1,
        "{t:?}"
    );
    assert!(
        t.contains(&("caller".into(), "[keypad] 77".into())),
        "{t:?}"
    );
    // The engine was never asked: no answer followed the keys.
    assert_eq!(t.last().map(|(w, _)| w.as_str()), Some("caller"), "{t:?}");
}

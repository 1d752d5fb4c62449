//! Voice engines end to end: real router + Twilio simulator + engine fakes.

use std::time::Duration;

use crate::e2e::{Opts, Stack, stack, statuses};
use test_fakes::realtime::{ErrorOn, Failure, FakeRealtime, Mode, RealtimeOpts};
use test_fakes::ultravox::{CreateFailure, FakeUltravox, JoinUrl, UltravoxOpts};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::config::{EngineKind, HumanDuration, Secret, UltravoxMedium};

async fn realtime_stack(rt: &FakeRealtime, tweak: fn(&mut voicectl::config::Config)) -> Stack {
    let url = rt.url();
    let key = rt.opts().api_key.clone();
    let beta = rt.opts().mode == Mode::Beta;
    stack(Opts {
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.agent.engine = EngineKind::OpenAiRealtime;
            c.openai.realtime_url = url;
            c.openai.api_key = Secret::new(key);
            c.openai.beta_protocol = beta;
            tweak(c);
        }),
        ..Default::default()
    })
    .await
}

/// A stack whose default engine is the fake Ultravox, over `medium`.
async fn ultravox_stack(uv: &FakeUltravox, medium: UltravoxMedium, voice: &str) -> Stack {
    let base = uv.base_url();
    let key = uv.opts().api_key.clone();
    let voice = voice.to_owned();
    stack(Opts {
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.agent.engine = EngineKind::Ultravox;
            c.ultravox.api_base_url = base;
            c.ultravox.api_key = Secret::new(key);
            c.ultravox.voice = voice;
            c.ultravox.medium = medium;
        }),
        ..Default::default()
    })
    .await
}

fn answer(steps: Vec<Step>) -> Scenario {
    Scenario::answer(CallerScript::new(steps))
}

async fn run_call(
    s: &Stack,
    to: &str,
    scenario: Scenario,
    within: u64,
) -> (String, Vec<(String, serde_json::Value)>) {
    s.sim.set_scenario(to, scenario);
    let id = s.call(to).await;
    let ev = s.follow(&id, Duration::from_secs(within)).await;
    (id, ev)
}

async fn sim_record(s: &Stack, id: &str) -> twilio_sim::SimCallRecord {
    let sid = s.get(id).await["twilio_call_sid"]
        .as_str()
        .unwrap()
        .to_owned();
    s.sim
        .wait_ended(&sid, Duration::from_secs(10))
        .await
        .unwrap()
}

/// GA and beta: audio passes through byte for byte both ways; transcripts of both sides.
async fn audio_round_trip(mode: Mode) {
    let rt = FakeRealtime::start(RealtimeOpts {
        mode,
        reply_ms: 600,
        greeting_ms: 500,
        ..Default::default()
    })
    .await;
    let s = realtime_stack(&rt, |_| {}).await;
    let (id, ev) = run_call(
        &s,
        "+14155550401",
        answer(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(600),
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ]),
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    rt.wait_all_closed(Duration::from_secs(5)).await;
    let session = rt.session(0);
    assert!(session.problems().is_empty(), "{:?}", session.problems());
    assert_eq!(session.model.as_deref(), Some("gpt-realtime"));
    let stream = rec.stream().unwrap();
    // Caller → engine: every byte the phone sent, in order, unchanged (the last frames may
    // still have been in flight when the call ended).
    let got = &session.caller_audio;
    assert!(
        got.len() + 160 * 5 >= stream.caller_audio.len() && !got.is_empty(),
        "{} of {}",
        got.len(),
        stream.caller_audio.len()
    );
    assert_eq!(
        got[..],
        stream.caller_audio[..got.len()],
        "caller audio altered"
    );
    // Engine → phone: exactly what the engine sent.
    assert_eq!(
        stream.agent_audio,
        session.agent_audio(),
        "agent audio altered"
    );
    assert!(session.items.len() >= 2, "greeting + reply");
    let t = s.transcript(&id).await;
    let speakers: Vec<_> = t.iter().map(|e| e["speaker"].as_str().unwrap()).collect();
    assert!(
        speakers.contains(&"agent") && speakers.contains(&"caller"),
        "{t:?}"
    );
    let call = s.get(&id).await;
    assert!(
        call["latency"]["greeting_ms"].as_f64().unwrap() < 1000.0,
        "pre-warmed greeting: {call}"
    );
    assert!(
        !call["latency"]["turn_ms"].as_array().unwrap().is_empty(),
        "{call}"
    );
    assert_eq!(s.manager.session_count(), 0);
}

#[tokio::test]
async fn realtime_ga_passes_audio_unchanged_and_records_transcripts() {
    audio_round_trip(Mode::Ga).await;
}

#[tokio::test]
async fn realtime_beta_protocol_works_too() {
    audio_round_trip(Mode::Beta).await;
}

#[tokio::test]
async fn barge_in_clears_the_phone_and_truncates_to_what_was_heard() {
    let rt = FakeRealtime::start(RealtimeOpts {
        reply_ms: 800,
        greeting_ms: 2500,
        ..Default::default()
    })
    .await;
    let s = realtime_stack(&rt, |_| {}).await;
    let (id, ev) = run_call(
        &s,
        "+14155550402",
        answer(vec![
            Step::SpeakWhileAgentTalks {
                after_ms: 700,
                speak_ms: 500,
            },
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ]),
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    rt.wait_all_closed(Duration::from_secs(5)).await;
    let session = rt.session(0);
    let stream = rec.stream().unwrap();
    assert_eq!(stream.clears.len(), 1, "one clear: {:?}", stream.clears);
    assert!(
        session.truncate_rejections.is_empty(),
        "{:?}",
        session.truncate_rejections
    );
    assert_eq!(session.truncations.len(), 1);
    let truncation = &session.truncations[0];
    assert_eq!(
        truncation.item_id, session.items[0].item_id,
        "the greeting was interrupted"
    );
    let heard_ms = stream.clears[0].played_bytes as i64 / 8;
    let diff = (truncation.audio_end_ms as i64 - heard_ms).abs();
    assert!(
        diff <= 40,
        "truncated at {} ms, the phone played {heard_ms} ms",
        truncation.audio_end_ms
    );
    assert!(truncation.audio_end_ms <= truncation.audio_sent_ms);
    // Marks flushed by the clear are not counted as played, and the turn after works.
    assert!(stream.marks.iter().any(|m| !m.played));
    assert!(session.items.len() >= 2, "a reply after the barge-in");
    assert!(
        stream.agent_played_bytes > stream.clears[0].played_bytes,
        "the reply was played"
    );
    let call = s.get(&id).await;
    assert_eq!(
        call["latency"]["barge_in_ms"].as_array().unwrap().len(),
        1,
        "{call}"
    );
}

#[tokio::test]
async fn realtime_failures_end_calls_cleanly_and_open_the_breaker() {
    for (i, fail) in [
        Failure::RejectAuth,
        Failure::CloseMidResponse { after_deltas: 2 },
        Failure::ErrorEvent {
            code: "server_error".into(),
            error_type: "server_error".into(),
            on: ErrorOn::FirstResponse,
            close: false,
        },
        Failure::Garbage,
        Failure::NeverAnswer,
    ]
    .into_iter()
    .enumerate()
    {
        let rt = FakeRealtime::start(RealtimeOpts {
            fail: Some(fail.clone()),
            ..Default::default()
        })
        .await;
        let s = realtime_stack(&rt, |_| {}).await;
        let (id, ev) = run_call(
            &s,
            &format!("+1415555050{i}"),
            answer(vec![Step::Silence(3000)]),
            15,
        )
        .await;
        assert_eq!(
            statuses(&ev).last().unwrap(),
            "completed",
            "{fail:?}: {ev:?}"
        );
        let call = s.get(&id).await;
        assert_eq!(call["end_reason"], "engine_error", "{fail:?}: {call}");
        assert!(
            call["error"].as_str().is_some_and(|e| e.contains("OpenAI")),
            "{call}"
        );
        // The caller heard an apology, not dead air (Twilio speaks the redirected TwiML).
        let rec = sim_record(&s, &id).await;
        assert!(
            rec.said
                .iter()
                .any(|t| t.contains("technical difficulties")),
            "{fail:?}: {:?}",
            rec.said
        );
        rt.wait_until("no open sessions", Duration::from_secs(5), |st| {
            (st.open == 0).then_some(())
        })
        .await;
        assert_eq!(s.manager.session_count(), 0, "{fail:?}");
    }
    // Consecutive failures open the breaker: new calls fail fast with 503.
    let rt = FakeRealtime::start(RealtimeOpts {
        fail: Some(Failure::RejectAuth),
        ..Default::default()
    })
    .await;
    let s = realtime_stack(&rt, |_| {}).await;
    for n in 0..3 {
        run_call(
            &s,
            &format!("+1415555051{n}"),
            answer(vec![Step::Silence(2000)]),
            15,
        )
        .await;
    }
    let (st, body) = s
        .api(
            reqwest::Method::POST,
            "/api/v1/calls",
            Some(serde_json::json!({"to": "+14155550520"})),
        )
        .await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_unavailable");
}

#[tokio::test]
async fn governors_end_calls_on_time() {
    let rt = FakeRealtime::start(RealtimeOpts {
        greeting_ms: 300,
        ..Default::default()
    })
    .await;
    let s = realtime_stack(&rt, |c| {
        c.agent.silence_timeout = HumanDuration::from_secs(1);
    })
    .await;
    // Silence ladder: "Are you still there?" after 1 s, goodbye after another.
    let started = std::time::Instant::now();
    let (id, ev) = run_call(
        &s,
        "+14155550601",
        Scenario::answer(CallerScript::silent()),
        15,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    assert_eq!(s.get(&id).await["end_reason"], "silence");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    let lines: Vec<String> = s
        .transcript(&id)
        .await
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(lines.iter().any(|l| l.contains("still there")), "{lines:?}");

    // max_duration: the call's own limit, enforced with a goodbye.
    s.sim.set_scenario(
        "+14155550602",
        Scenario::answer(CallerScript::new(vec![
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
        ])),
    );
    let (st, v) = s
        .api(
            reqwest::Method::POST,
            "/api/v1/calls",
            Some(serde_json::json!({"to": "+14155550602", "max_duration": "10s"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let ev = s.follow(&id, Duration::from_secs(25)).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "max_duration", "{call}");
    let d = call["duration_seconds"].as_i64().unwrap();
    assert!((10..=14).contains(&d), "{d}");
}

#[tokio::test]
async fn ultravox_calls_connect_twilio_to_join_url_and_keep_the_transcript() {
    let uv = FakeUltravox::start(UltravoxOpts {
        hangup_after_turns: Some(1),
        ..Default::default()
    })
    .await;
    let s = ultravox_stack(&uv, UltravoxMedium::Twilio, "Mark").await;
    let (id, ev) = run_call(
        &s,
        "+14155550701",
        answer(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(500),
            Step::WaitForAgentSilence { min_ms: 2000 },
        ]),
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let created = uv.state().creates[0].clone();
    let body: serde_json::Value = serde_json::from_str(&created.body).unwrap();
    assert_eq!(body["medium"], serde_json::json!({"twilio": {}}));
    assert_eq!(body["firstSpeakerSettings"]["agent"]["text"], "Hi");
    assert_eq!(body["voice"], "Mark");
    let rec = sim_record(&s, &id).await;
    assert!(
        rec.stream()
            .unwrap()
            .url
            .starts_with(&uv.base_url().replace("http://", "ws://"))
    );
    // The transcript arrives from Ultravox after the call (paginated).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let t = loop {
        let t = s.transcript(&id).await;
        if t.len() >= 3 || tokio::time::Instant::now() > deadline {
            break t;
        }
        // The fetch runs on the job queue, which exposes no event: poll it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let speakers: Vec<_> = t.iter().map(|e| e["speaker"].as_str().unwrap()).collect();
    assert!(
        speakers.contains(&"agent") && speakers.contains(&"caller"),
        "{t:?}"
    );
}

#[tokio::test]
async fn ultravox_errors_fail_the_call_with_an_apology() {
    let uv = FakeUltravox::start(UltravoxOpts {
        create_failures: vec![
            CreateFailure::retry_after(429, 1),
            CreateFailure::retry_after(400, 0),
        ],
        ..Default::default()
    })
    .await;
    let s = ultravox_stack(&uv, UltravoxMedium::Twilio, "").await;
    // 429 with Retry-After: 1 is waited out and retried; the retry gets the 400.
    let (id, ev) = run_call(&s, "+14155550702", answer(vec![Step::Silence(500)]), 15).await;
    assert_eq!(statuses(&ev).last().unwrap(), "failed");
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "engine_error");
    assert!(call["error"].as_str().unwrap().contains("400"), "{call}");
    assert_eq!(
        uv.state().creates.len(),
        2,
        "retried once after Retry-After"
    );
    let rec = sim_record(&s, &id).await;
    assert!(
        rec.said
            .iter()
            .any(|t| t.contains("technical difficulties")),
        "{:?}",
        rec.said
    );
}

#[tokio::test]
async fn ultravox_join_url_that_is_not_a_websocket_fails_the_call() {
    for (i, join_url) in [JoinUrl::Scheme("https".into()), JoinUrl::Null]
        .into_iter()
        .enumerate()
    {
        let uv = FakeUltravox::start(UltravoxOpts {
            join_url: join_url.clone(),
            ..Default::default()
        })
        .await;
        let s = ultravox_stack(&uv, UltravoxMedium::Twilio, "").await;
        let to = format!("+1415555071{i}");
        let (id, ev) = run_call(&s, &to, answer(vec![Step::Silence(500)]), 15).await;
        assert_eq!(statuses(&ev).last().unwrap(), "failed", "{join_url:?}");
        let call = s.get(&id).await;
        assert_eq!(call["end_reason"], "engine_error", "{call}");
        assert!(
            call["error"].as_str().unwrap().contains("joinUrl"),
            "{call}"
        );
        let rec = sim_record(&s, &id).await;
        assert!(
            rec.said
                .iter()
                .any(|t| t.contains("technical difficulties")),
            "{:?}",
            rec.said
        );
        assert!(rec.streams.is_empty(), "no media stream was opened");
    }
}

#[tokio::test]
async fn a_stream_that_stops_sending_audio_is_ended() {
    let rt = FakeRealtime::start(RealtimeOpts::default()).await;
    let s = realtime_stack(&rt, |_| {}).await;
    let started = std::time::Instant::now();
    let (id, ev) = run_call(
        &s,
        "+14155550603",
        answer(vec![Step::Silence(500), Step::StopMedia]),
        25,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed", "{ev:?}");
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "no_media", "{call}");
    // The watchdog fires 10 s after the last frame, not at some later sweep.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(18), "{took:?}");
    rt.wait_until("no open sessions", Duration::from_secs(5), |st| {
        (st.open == 0).then_some(())
    })
    .await;
    assert_eq!(s.manager.session_count(), 0);
}

/// The serverWebSocket medium: the audio runs through our bridge, transcoded μ-law ⇄ PCM at
/// the edge, with the greeting sent when the phone stream starts and a live transcript.
#[tokio::test]
async fn ultravox_server_websocket_runs_through_the_bridge() {
    let uv = FakeUltravox::start(UltravoxOpts {
        hangup_after_turns: Some(1),
        ..Default::default()
    })
    .await;
    let s = ultravox_stack(&uv, UltravoxMedium::ServerWebSocket, "").await;
    let (id, ev) = run_call(
        &s,
        "+14155550720",
        answer(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(500),
            Step::WaitForAgentSilence { min_ms: 3000 },
        ]),
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed", "{ev:?}");
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "agent_hangup", "{call}");
    let (create, uvc) = {
        let st = uv.state();
        (st.creates[0].clone(), st.calls[0].clone())
    };
    let body: serde_json::Value = serde_json::from_str(&create.body).unwrap();
    assert_eq!(body["medium"]["serverWebSocket"]["inputSampleRate"], 8000);
    assert_eq!(body["medium"]["serverWebSocket"]["outputSampleRate"], 8000);
    assert!(uvc.violations.is_empty(), "{:?}", uvc.violations);
    assert!(
        uvc.data_in
            .iter()
            .any(|m| m["type"] == "forced_agent_message" && m["content"] == "Hi"),
        "greeting sent at stream start: {:?}",
        uvc.data_in
    );
    let rec = sim_record(&s, &id).await;
    let stream = rec.stream().unwrap();
    // Agent audio: the phone got exactly Ultravox's PCM, μ-law encoded.
    let want: Vec<u8> = uvc
        .agent_audio()
        .chunks_exact(2)
        .map(|p| voicectl::audio::mulaw::encode(i16::from_le_bytes([p[0], p[1]])))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(stream.agent_audio, want, "agent audio altered");
    // Caller audio: what the phone sent, decoded to PCM (the tail may be in flight).
    let got: Vec<u8> = stream
        .caller_audio
        .iter()
        .flat_map(|&b| voicectl::audio::mulaw::decode(b).to_le_bytes())
        .collect();
    let n = uvc.caller_audio.len();
    assert!(n > 0 && n <= got.len(), "{n} of {}", got.len());
    assert_eq!(uvc.caller_audio[..], got[..n], "caller audio altered");
    // Transcript lines of both sides arrived live, in order.
    let t = s.transcript(&id).await;
    let speakers: Vec<_> = t.iter().map(|e| e["speaker"].as_str().unwrap()).collect();
    assert_eq!(speakers.first(), Some(&"agent"), "{t:?}");
    assert!(speakers.contains(&"caller"), "{t:?}");
    assert!(
        call["latency"]["greeting_ms"].as_f64().is_some(),
        "latency measured through the bridge: {call}"
    );
    assert_eq!(s.manager.session_count(), 0);
}

#[tokio::test]
async fn ultravox_server_websocket_barge_in_clears_the_phone() {
    let uv = FakeUltravox::start(UltravoxOpts {
        greeting_ms: 3000,
        hangup_after_turns: Some(1),
        ..Default::default()
    })
    .await;
    let s = ultravox_stack(&uv, UltravoxMedium::ServerWebSocket, "").await;
    let (id, ev) = run_call(
        &s,
        "+14155550721",
        answer(vec![
            Step::SpeakWhileAgentTalks {
                after_ms: 600,
                speak_ms: 700,
            },
            Step::WaitForAgentSilence { min_ms: 3000 },
        ]),
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed", "{ev:?}");
    assert_eq!(uv.state().calls[0].barge_ins, 1);
    let rec = sim_record(&s, &id).await;
    let stream = rec.stream().unwrap();
    assert_eq!(stream.clears.len(), 1, "Twilio was told to clear");
    // The greeting was cut: the phone had played well under its 3 s (24 000 bytes).
    assert!(
        stream.clears[0].played_bytes < 16_000,
        "{:?}",
        stream.clears[0]
    );
    let call = s.get(&id).await;
    assert_eq!(
        call["latency"]["barge_in_ms"].as_array().unwrap().len(),
        1,
        "{call}"
    );
}

//! The pipeline engine end to end (SPEC §6): the real router + the Twilio simulator + fakes
//! of Deepgram (STT and Aura), ElevenLabs and an OpenAI-compatible server.

use std::time::Duration;

use serde_json::{Value, json};
use test_fakes::deepgram::{DeepgramOpts, FakeDeepgram, Fault, FaultPlan};
use test_fakes::elevenlabs::{ElevenLabsOpts, FakeElevenLabs};
use test_fakes::openai_http::{FakeOpenAiHttp, OpenAiHttpOpts};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::config::{Config, EngineKind, LlmConfig, PipelineConfig, Secret};

use crate::e2e::{Opts, Stack, stack, statuses};

const T: Duration = Duration::from_secs(10);

struct Fakes {
    dg: FakeDeepgram,
    el: FakeElevenLabs,
    /// The first `[[llm]]` ("main") and the OpenAI speech API.
    oa: FakeOpenAiHttp,
    /// A second `[[llm]]` ("backup").
    backup: FakeOpenAiHttp,
}

impl Fakes {
    async fn start(
        dg: DeepgramOpts,
        el: ElevenLabsOpts,
        oa: OpenAiHttpOpts,
        backup: OpenAiHttpOpts,
    ) -> Fakes {
        Fakes {
            dg: FakeDeepgram::start(dg).await,
            el: FakeElevenLabs::start(el).await,
            oa: FakeOpenAiHttp::start(oa).await,
            backup: FakeOpenAiHttp::start(backup).await,
        }
    }

    /// Every fake socket and stream closed, and no protocol violations.
    async fn assert_clean(&self) {
        self.dg
            .wait_until("deepgram sockets closed", T, |s| {
                (s.open_sockets() == 0).then_some(())
            })
            .await;
        self.el
            .wait_until("elevenlabs sockets closed", T, |s| {
                (s.open() == 0).then_some(())
            })
            .await;
        for f in [&self.oa, &self.backup] {
            f.wait_until("LLM streams done", T, |s| (s.streaming == 0).then_some(()))
                .await;
            assert!(
                f.state().violations.is_empty(),
                "{:?}",
                f.state().violations
            );
        }
        let dg = self.dg.state();
        for s in &dg.stt {
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        }
        for s in &dg.aura {
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        }
        for s in &self.el.state().sessions {
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        }
    }
}

/// A stack whose default engine is the pipeline, wired to `f`; `tweak` adjusts the rest.
async fn pipeline_stack(
    f: &Fakes,
    data: &std::path::Path,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> Stack {
    let (stt, tts, speech) = (f.dg.stt_url(), f.dg.tts_url(), f.oa.base_url());
    let (dg_key, el_base, el_key) = (
        f.dg.opts().api_key.clone(),
        f.el.base_url(),
        f.el.opts().api_key.clone(),
    );
    let (main_url, main_key) = (f.oa.base_url(), f.oa.opts().api_key.clone());
    let (backup_url, backup_key) = (f.backup.base_url(), f.backup.opts().api_key.clone());
    let data = data.to_owned();
    stack(Opts {
        tweak: Box::new(move |c: &mut Config| {
            c.server.data_dir = data;
            c.agent.engine = EngineKind::Pipeline;
            c.agent.greeting = "Hello, this is the pipeline.".into();
            c.agent.silence_timeout = voicectl::config::HumanDuration::from_secs(30);
            c.pipeline = Some(PipelineConfig {
                stt: vec!["deepgram".into()],
                llm: vec!["main".into()],
                tts: vec!["elevenlabs".into()],
                interrupt_min_words: 1,
                tts_cache: false,
                ..Default::default()
            });
            c.deepgram.api_key = Secret::new(dg_key);
            c.deepgram.stt_url = stt;
            c.deepgram.tts_url = tts;
            c.elevenlabs.api_key = Secret::new(el_key);
            c.elevenlabs.api_base_url = el_base;
            c.openai.api_base_url = speech;
            c.openai.api_key = Secret::new(main_key.clone());
            c.llm = vec![
                LlmConfig {
                    name: "main".into(),
                    base_url: main_url,
                    api_key: Secret::new(main_key),
                    model: "gpt-4o-mini".into(),
                    temperature: 0.7,
                },
                LlmConfig {
                    name: "backup".into(),
                    base_url: backup_url,
                    api_key: Secret::new(backup_key),
                    model: "llama-3.1-8b".into(),
                    temperature: 0.7,
                },
            ];
            tweak(c);
        }),
        ..Default::default()
    })
    .await
}

async fn run(s: &Stack, to: &str, steps: Vec<Step>, within: u64) -> (String, Vec<(String, Value)>) {
    s.sim
        .set_scenario(to, Scenario::answer(CallerScript::new(steps)));
    let id = s.call(to).await;
    let ev = s.follow(&id, Duration::from_secs(within)).await;
    (id, ev)
}

async fn sim_record(s: &Stack, id: &str) -> twilio_sim::SimCallRecord {
    let sid = s.get(id).await["twilio_call_sid"]
        .as_str()
        .unwrap()
        .to_owned();
    s.sim.wait_ended(&sid, T).await.unwrap()
}

fn lines(t: &[Value], speaker: &str) -> Vec<String> {
    t.iter()
        .filter(|e| e["speaker"] == speaker)
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect()
}

fn conversation() -> Vec<Step> {
    vec![
        Step::WaitForAgentSilence { min_ms: 200 },
        Step::Speak(700),
        Step::WaitForAgentSilence { min_ms: 300 },
        Step::Hangup,
    ]
}

#[tokio::test]
async fn a_full_call_keeps_audio_exact_and_both_transcript_sides() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["What are your opening hours".into()],
            ..Default::default()
        },
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            replies: vec!["We open at nine. We close at five.".into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |_| {}).await;
    let (id, ev) = run(&s, "+14155550901", conversation(), 20).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    let stream = rec.stream().unwrap();
    // No session, bridge or engine task left behind.
    for _ in 0..50 {
        if s.manager.session_count() == 0 && s.manager.bridged_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (s.manager.session_count(), s.manager.bridged_count()),
        (0, 0)
    );

    // Caller → Deepgram: every byte as the phone sent it; the stream was closed properly.
    let stt = f.dg.state().stt[0].clone();
    assert!(stt.close_stream, "CloseStream sent at the end");
    assert_eq!(stt.query["encoding"], "mulaw");
    assert!(!stt.audio.is_empty());
    assert!(stt.audio.len() + 160 * 5 >= stream.caller_audio.len());
    assert_eq!(stt.audio[..], stream.caller_audio[..stt.audio.len()]);
    // ElevenLabs → phone: byte for byte (greeting, then the reply on a new socket).
    let el_audio: Vec<u8> =
        f.el.state()
            .sessions
            .iter()
            .flat_map(|s| s.audio.clone())
            .collect();
    assert_eq!(stream.agent_audio, el_audio, "agent audio altered");
    assert!(stream.clears.is_empty());

    // The LLM got the system prompt and the caller's final text.
    let chats = f.oa.state().chats.clone();
    assert_eq!(chats.len(), 1);
    let msgs = chats[0].messages();
    assert_eq!(msgs[0].0, "system");
    assert_eq!(
        msgs.last().unwrap(),
        &("user".to_owned(), "What are your opening hours".to_owned())
    );
    assert_eq!(chats[0].body["stream"], json!(true));
    assert!(
        msgs.iter()
            .any(|(r, c)| r == "assistant" && c == "Hello, this is the pipeline."),
        "the greeting is part of the history: {msgs:?}"
    );

    let t = s.transcript(&id).await;
    assert_eq!(lines(&t, "caller"), vec!["What are your opening hours"]);
    assert_eq!(
        lines(&t, "agent"),
        vec![
            "Hello, this is the pipeline.",
            "We open at nine. We close at five."
        ]
    );
    let call = s.get(&id).await;
    assert_eq!(
        call["providers"],
        json!({"stt": "deepgram", "llm": "main", "tts": "elevenlabs"})
    );
    let turns = call["latency"]["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 1, "{call}");
    for k in [
        "stt_final_ms",
        "llm_first_token_ms",
        "tts_first_audio_ms",
        "turn_ms",
    ] {
        assert!(turns[0][k].as_f64().unwrap() >= 0.0, "{k}: {call}");
    }
    // The LLM fake answers after 60 ms: the first token cannot be faster.
    assert!(turns[0]["llm_first_token_ms"].as_f64().unwrap() >= 55.0);
    let (_, a) = s
        .api(reqwest::Method::GET, "/api/v1/calls/analytics", None)
        .await;
    assert_eq!(
        a["pipeline_stages_ms"]["llm_first_token_ms"]["count"], 1,
        "{a}"
    );
    assert!(
        a["pipeline_stages_ms"]["turn_ms"]["p50"].as_f64().is_some(),
        "{a}"
    );
    let metrics = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "voicectl_pipeline_stage_seconds_count{stage=\"llm_first_token\",provider=\"main\"} 1"
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("pipeline"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn barge_in_cuts_the_agent_and_history_keeps_only_what_played() {
    let long = "This first sentence of the reply is fairly long. \
                The second sentence goes on for quite a while as well. \
                And the third sentence is never meant to be heard at all.";
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Tell me a story".into(), "Stop right there".into()],
            ..Default::default()
        },
        ElevenLabsOpts {
            ms_per_char: 30,
            ..Default::default()
        },
        OpenAiHttpOpts {
            replies: vec![long.into(), "Sure.".into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |_| {}).await;
    let (id, ev) = run(
        &s,
        "+14155550902",
        vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(700),
            Step::SpeakWhileAgentTalks {
                after_ms: 1500,
                speak_ms: 700,
            },
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ],
        25,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    let stream = rec.stream().unwrap();
    assert_eq!(stream.clears.len(), 1, "{:?}", stream.clears);
    // Cleared within 200 ms of the caller's first words (one word after ~60 ms of speech).
    let barge = stream.caller_speech[1].start_ms;
    let clear = stream.clears[0].at_ms;
    assert!(
        clear >= barge && clear - barge <= 250,
        "clear at {clear} ms, speech at {barge} ms"
    );
    // The next LLM request holds only the played prefix of the cut reply.
    let chats = f.oa.state().chats.clone();
    assert_eq!(chats.len(), 2);
    let msgs = chats[1].messages();
    let cut = &msgs[msgs.len() - 2];
    assert_eq!(cut.0, "assistant");
    assert!(
        !cut.1.is_empty() && long.starts_with(&cut.1) && cut.1.len() < long.len() / 2,
        "history kept {:?}",
        cut.1
    );
    assert_eq!(msgs.last().unwrap().1, "Stop right there");
    // The ElevenLabs context of the cut reply was closed, the socket with it.
    assert!(f.el.state().sessions.iter().all(|s| !s.open));
    let t = s.transcript(&id).await;
    let agent = lines(&t, "agent");
    assert!(agent.contains(&cut.1), "{agent:?}");
    assert!(agent.iter().all(|l| l != long));
}

#[tokio::test]
async fn a_backchannel_below_the_threshold_does_not_cut_the_agent() {
    let reply = "Here is a reply that takes a little while to say out loud.";
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Hello".into(), "mm-hm".into()],
            ..Default::default()
        },
        ElevenLabsOpts {
            ms_per_char: 30,
            ..Default::default()
        },
        OpenAiHttpOpts {
            replies: vec![reply.into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.interrupt_min_words = 2;
        }
    })
    .await;
    let (id, _) = run(
        &s,
        "+14155550903",
        vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(600),
            Step::SpeakWhileAgentTalks {
                after_ms: 400,
                speak_ms: 200,
            },
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ],
        20,
    )
    .await;
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    let stream = rec.stream().unwrap();
    assert!(stream.clears.is_empty(), "{:?}", stream.clears);
    assert_eq!(f.oa.state().chats.len(), 1, "a backchannel is not a turn");
    let t = s.transcript(&id).await;
    assert!(lines(&t, "agent").iter().any(|l| l == reply));
    assert!(lines(&t, "caller").iter().any(|l| l == "mm-hm"));
}

#[tokio::test]
async fn a_tts_that_misses_its_deadline_is_replaced_within_the_utterance() {
    let f = Fakes::start(
        DeepgramOpts::default(),
        ElevenLabsOpts {
            fault: FaultPlan::always(Fault::SlowFirst { ms: 5000 }),
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.tts = vec!["elevenlabs".into(), "deepgram".into()];
        }
    })
    .await;
    let (id, ev) = run(
        &s,
        "+14155550904",
        vec![Step::WaitForAgentSilence { min_ms: 200 }, Step::Hangup],
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    // The greeting was spoken by Aura, exactly as Aura sent it; ElevenLabs' never played.
    let aura = f.dg.state().aura[0].clone();
    assert_eq!(aura.spoken, vec!["Hello, this is the pipeline."]);
    assert_eq!(rec.stream().unwrap().agent_audio, aura.audio);
    assert_eq!(s.get(&id).await["providers"]["tts"], "deepgram");
}

#[tokio::test]
async fn an_llm_that_misses_its_first_token_deadline_is_replaced_in_the_same_turn() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Are you there".into()],
            ..Default::default()
        },
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            chat_fault: FaultPlan::always(Fault::NeverAnswer),
            ..Default::default()
        },
        OpenAiHttpOpts {
            api_key: "backup-key".into(),
            replies: vec!["The backup answers.".into()],
            ..Default::default()
        },
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.llm = vec!["main".into(), "backup".into()];
        }
    })
    .await;
    let (id, ev) = run(&s, "+14155550905", conversation(), 25).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let t = s.transcript(&id).await;
    assert!(
        lines(&t, "agent")
            .iter()
            .any(|l| l == "The backup answers."),
        "{t:?}"
    );
    let call = s.get(&id).await;
    assert_eq!(call["providers"]["llm"], "backup");
    let turn = &call["latency"]["turns"][0];
    // Measured from the backup's request, which started after the 3 s deadline.
    assert!(turn["turn_ms"].as_f64().unwrap() >= 3000.0, "{call}");
    assert_eq!(f.oa.state().chats.len(), 1);
    assert_eq!(f.backup.state().chats.len(), 1);
}

#[tokio::test]
async fn all_llms_down_means_apology_and_engine_error_naming_each() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Hello".into()],
            ..Default::default()
        },
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            chat_fault: FaultPlan::always(Fault::RejectAuth),
            ..Default::default()
        },
        OpenAiHttpOpts {
            chat_fault: FaultPlan::always(Fault::CloseMidStream { after_ms: 0 }),
            ..Default::default()
        },
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.llm = vec!["main".into(), "backup".into()];
        }
    })
    .await;
    let (id, ev) = run(&s, "+14155550906", conversation(), 20).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    assert!(
        rec.said
            .iter()
            .any(|t| t.contains("technical difficulties")),
        "{:?}",
        rec.said
    );
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "engine_error");
    let err = call["error"].as_str().unwrap();
    assert!(
        err.contains("main: HTTP 401") && err.contains("backup: the stream ended without [DONE]"),
        "{err}"
    );
}

/// Goertzel amplitude of `hz` in 8 kHz μ-law.
fn amplitude_at(mu: &[u8], hz: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * hz / 8000.0;
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &b in mu {
        let s = twilio_sim::mulaw::decode(b) as f64 + 2.0 * w.cos() * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    2.0 * (s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2).sqrt() / mu.len() as f64
}

async fn openai_speech_call(tone_hz: f64, to: &str) -> Vec<u8> {
    let f = Fakes::start(
        DeepgramOpts::default(),
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            speech_tone_hz: tone_hz,
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.tts = vec!["openai".into()];
        }
        c.agent.voice = "coral".into();
    })
    .await;
    let (id, _) = run(
        &s,
        to,
        vec![Step::WaitForAgentSilence { min_ms: 200 }, Step::Hangup],
        20,
    )
    .await;
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    let sp = f.oa.state().speeches.clone();
    assert_eq!(sp.len(), 1);
    assert_eq!(sp[0].body["response_format"], "pcm");
    assert_eq!(sp[0].body["voice"], "coral");
    assert_eq!(sp[0].body["model"], "gpt-4o-mini-tts");
    let audio = rec.stream().unwrap().agent_audio.clone();
    // 24 kHz s16 → 8 kHz μ-law: a third of the samples, half the bytes per sample.
    assert_eq!(audio.len(), sp[0].pcm_bytes_sent / 6);
    audio
}

#[tokio::test]
async fn openai_speech_is_resampled_keeping_pitch_and_removing_what_cannot_be_carried() {
    let (ok, high) = tokio::join!(
        openai_speech_call(1000.0, "+14155550907"),
        openai_speech_call(6000.0, "+14155550908"),
    );
    let a = amplitude_at(&ok[200..], 1000.0);
    assert!(a > 5000.0, "1 kHz kept at {a}");
    // 6 kHz cannot exist at 8 kHz; sample dropping would alias it onto 2 kHz.
    let alias = amplitude_at(&high[200..], 2000.0);
    assert!(alias < 100.0, "6 kHz aliased to 2 kHz at {alias}");
}

#[tokio::test]
async fn quiet_stretches_survive_idle_timeouts_and_closed_sockets_reopen() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Still here".into()],
            // The first STT socket drops 500 ms into the call.
            fault: FaultPlan::first(Fault::CloseMidStream { after_ms: 500 }, 1),
            ..Default::default()
        },
        ElevenLabsOpts {
            // inactivity_timeout = 180 s becomes 900 ms.
            idle_ms_per_s: 5,
            ..Default::default()
        },
        OpenAiHttpOpts {
            replies: vec!["Glad to hear it.".into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |_| {}).await;
    let (id, ev) = run(
        &s,
        "+14155550909",
        vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Silence(2000),
            Step::Speak(600),
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ],
        20,
    )
    .await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    f.assert_clean().await;
    let t = s.transcript(&id).await;
    assert_eq!(lines(&t, "caller"), vec!["Still here"]);
    assert!(lines(&t, "agent").iter().any(|l| l == "Glad to hear it."));
    let dg = f.dg.state();
    assert!(dg.stt.len() >= 2, "STT reopened");
    assert_eq!(dg.stt[0].closed_by_server.as_ref().unwrap().0, 1011);
    let el = f.el.state();
    assert!(
        el.sessions
            .iter()
            .any(|s| s.closed_by_server.as_ref().is_some_and(|c| c.0 == 1008)),
        "a waiting ElevenLabs socket timed out"
    );
    assert!(
        el.sessions
            .iter()
            .any(|s| s.final_sent && !s.texts.is_empty())
    );
}

#[tokio::test]
async fn fixed_phrases_are_played_from_the_cache_on_later_calls() {
    let f = Fakes::start(
        DeepgramOpts::default(),
        ElevenLabsOpts::default(),
        OpenAiHttpOpts::default(),
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.tts_cache = true;
        }
    })
    .await;
    let steps = || vec![Step::WaitForAgentSilence { min_ms: 200 }, Step::Hangup];
    let (first, _) = run(&s, "+14155550910", steps(), 15).await;
    let a = sim_record(&s, &first)
        .await
        .stream()
        .unwrap()
        .agent_audio
        .clone();
    let texts = |f: &Fakes| {
        f.el.state()
            .sessions
            .iter()
            .map(|s| s.texts.len())
            .sum::<usize>()
    };
    assert_eq!(texts(&f), 1);
    // The cache is written after the first call's greeting.
    let dir = data.path().join("tts-cache");
    for _ in 0..50 {
        if std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (second, _) = run(&s, "+14155550911", steps(), 15).await;
    let b = sim_record(&s, &second)
        .await
        .stream()
        .unwrap()
        .agent_audio
        .clone();
    assert_eq!(texts(&f), 1, "no provider request for a cached phrase");
    assert_eq!(a, b);
    f.assert_clean().await;
}

#[tokio::test]
async fn a_pipeline_call_needs_a_configured_pipeline() {
    let s = stack(Opts::default()).await;
    let (status, v) = s
        .api(
            reqwest::Method::POST,
            "/api/v1/calls",
            Some(json!({"to": "+14155550912", "engine": "pipeline"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("pipeline"),
        "{v}"
    );
}

#[tokio::test]
async fn a_refused_stt_key_fails_the_call_with_a_clear_error() {
    let f = Fakes::start(
        DeepgramOpts {
            fault: FaultPlan::always(Fault::RejectAuth),
            ..Default::default()
        },
        ElevenLabsOpts::default(),
        OpenAiHttpOpts::default(),
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |_| {}).await;
    let (id, _) = run(&s, "+14155550913", conversation(), 15).await;
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "engine_error", "{call}");
    assert!(
        call["error"]
            .as_str()
            .unwrap()
            .contains("deepgram: refused the key (HTTP 401)"),
        "{call}"
    );
    f.assert_clean().await;
}

#[tokio::test]
async fn doctor_checks_each_configured_providers_key_and_names_the_failure() {
    let f = Fakes::start(
        DeepgramOpts::default(),
        ElevenLabsOpts::default(),
        OpenAiHttpOpts::default(),
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let mut cfg = Config::dev();
    cfg.server.data_dir = data.path().to_owned();
    cfg.pipeline = Some(PipelineConfig {
        llm: vec!["main".into(), "backup".into()],
        tts: vec!["elevenlabs".into(), "deepgram".into(), "openai".into()],
        ..Default::default()
    });
    cfg.deepgram.stt_url = f.dg.stt_url();
    cfg.deepgram.api_key = Secret::new(f.dg.opts().api_key.clone());
    cfg.elevenlabs.api_base_url = f.el.base_url();
    cfg.elevenlabs.api_key = Secret::new("wrong-key");
    cfg.openai.api_base_url = f.oa.base_url();
    cfg.openai.api_key = Secret::new(f.oa.opts().api_key.clone());
    let llm = |name: &str, url: String, key: &str| LlmConfig {
        name: name.into(),
        base_url: url,
        api_key: Secret::new(key),
        model: "m".into(),
        temperature: 0.7,
    };
    cfg.llm = vec![
        llm("main", f.oa.base_url(), &f.oa.opts().api_key.clone()),
        llm("backup", f.backup.base_url(), "bad"),
    ];
    let checks = voicectl::ops::doctor::check_pipeline(&cfg).await;
    let got: Vec<(String, String)> = checks
        .iter()
        .map(|c| (c.level.as_str().to_owned(), c.detail.clone()))
        .collect();
    let want = [
        ("OK", "deepgram: key accepted"),
        ("FAIL", "elevenlabs: key refused (HTTP 401)"),
        ("OK", "openai: key accepted"),
        ("OK", "main: key accepted"),
        ("FAIL", "backup: key refused (HTTP 401)"),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.0.as_str(), g.1.as_str()), w);
    }
    assert!(
        checks[1]
            .hint
            .as_deref()
            .unwrap()
            .contains("elevenlabs.api_key")
    );
    // No pipeline, no provider checks.
    assert!(
        voicectl::ops::doctor::check_pipeline(&Config::dev())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn garbage_from_providers_is_survived_or_failed_over() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Can you hear me".into()],
            // A non-JSON frame first: skipped, the socket keeps working.
            fault: FaultPlan::always(Fault::Garbage),
            ..Default::default()
        },
        ElevenLabsOpts {
            fault: FaultPlan::always(Fault::Garbage),
            ..Default::default()
        },
        OpenAiHttpOpts {
            chat_fault: FaultPlan::always(Fault::Garbage),
            ..Default::default()
        },
        OpenAiHttpOpts {
            api_key: "backup-key".into(),
            replies: vec!["Loud and clear.".into()],
            ..Default::default()
        },
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.llm = vec!["main".into(), "backup".into()];
            p.tts = vec!["elevenlabs".into(), "deepgram".into()];
        }
    })
    .await;
    let (id, ev) = run(&s, "+14155550914", conversation(), 20).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    f.assert_clean().await;
    let t = s.transcript(&id).await;
    assert_eq!(lines(&t, "caller"), vec!["Can you hear me"]);
    assert!(
        lines(&t, "agent").iter().any(|l| l == "Loud and clear."),
        "{t:?}"
    );
    let call = s.get(&id).await;
    assert_eq!(
        call["providers"],
        json!({"stt": "deepgram", "llm": "backup", "tts": "deepgram"})
    );
    // ElevenLabs never produced audio that reached the phone.
    assert!(f.el.state().sessions.iter().all(|s| s.audio.is_empty()));
}

#[tokio::test]
async fn tts_audio_in_the_wrong_format_or_size_never_breaks_the_call() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Can you hear me".into()],
            ..Default::default()
        },
        ElevenLabsOpts {
            fault: FaultPlan::always(Fault::BadAudio),
            ..Default::default()
        },
        OpenAiHttpOpts {
            replies: vec!["Loud and clear.".into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.tts = vec!["elevenlabs".into(), "deepgram".into()];
        }
    })
    .await;
    let (id, ev) = run(&s, "+14155550916", conversation(), 20).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let call = s.get(&id).await;
    assert_ne!(call["end_reason"], "engine_error", "{call}");
    let t = s.transcript(&id).await;
    assert_eq!(lines(&t, "caller"), vec!["Can you hear me"]);
    assert!(
        lines(&t, "agent").iter().any(|l| l == "Loud and clear."),
        "{t:?}"
    );
    // The phone got agent audio, whichever voice spoke it.
    let rec = sim_record(&s, &id).await;
    let stream = rec.stream().unwrap();
    assert!(!stream.agent_audio.is_empty());
}

#[tokio::test]
async fn a_tts_socket_closed_mid_utterance_is_not_switched_and_reopens_for_the_next() {
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Hello".into()],
            // The first Aura socket closes 100 ms into the greeting's audio.
            tts_fault: FaultPlan::first(Fault::CloseMidStream { after_ms: 100 }, 1),
            ..Default::default()
        },
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            replies: vec!["Hi again.".into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        if let Some(p) = c.pipeline.as_mut() {
            p.tts = vec!["deepgram".into(), "elevenlabs".into()];
        }
    })
    .await;
    let (id, ev) = run(&s, "+14155550915", conversation(), 20).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let rec = sim_record(&s, &id).await;
    f.assert_clean().await;
    // Never switched to ElevenLabs: the cut greeting stayed cut, the reply came from a new
    // Aura socket.
    assert!(f.el.state().sessions.iter().all(|s| s.texts.is_empty()));
    let aura = f.dg.state().aura.clone();
    assert!(aura.len() >= 2, "{}", aura.len());
    assert_eq!(aura[1].spoken, vec!["Hi again."]);
    let all: Vec<u8> = aura.iter().flat_map(|a| a.audio.clone()).collect();
    assert_eq!(rec.stream().unwrap().agent_audio, all);
    let t = s.transcript(&id).await;
    assert!(lines(&t, "agent").iter().any(|l| l == "Hi again."));
}

/// The Deepgram fake itself: what voicectl's tests rely on it to check and to say.
#[tokio::test]
async fn the_deepgram_fake_speaks_the_live_protocol_and_flags_deviations() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dg = FakeDeepgram::start(DeepgramOpts {
        utterances: vec!["one two three".into()],
        idle_ms: 400,
        ..Default::default()
    })
    .await;
    let connect = |q: &str| {
        let mut req = format!("{}?{q}", dg.stt_url())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", "Token dg-fake-key".parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    // Missing parameters are recorded as violations.
    let (mut bad, _) = connect("model=nova-3").await.unwrap();
    bad.send(Message::Text(r#"{"type":"KeepAlive"}"#.into()))
        .await
        .unwrap();
    dg.wait_until("keepalive", T, |s| {
        (s.stt.first()?.keepalives == 1).then_some(())
    })
    .await;
    assert!(
        dg.state().stt[0]
            .violations
            .iter()
            .any(|v| v.contains("encoding"))
    );
    drop(bad);
    let q = "model=nova-3&encoding=mulaw&sample_rate=8000&channels=1&interim_results=true&endpointing=300&utterance_end_ms=1000&vad_events=true";
    let (mut ws, _) = connect(q).await.unwrap();
    // 1 s of loud tone, then 1.4 s of silence, in 20 ms frames.
    let loud = test_fakes::caller_speech_mulaw(1000);
    for c in loud
        .chunks(160)
        .chain(std::iter::repeat_n(&[0xFFu8; 160][..], 70))
    {
        ws.send(Message::Binary(c.to_vec().into())).await.unwrap();
    }
    let mut types = Vec::new();
    let mut final_text = None;
    while let Some(Ok(Message::Text(t))) = ws.next().await {
        let v: Value = serde_json::from_str(&t).unwrap();
        let kind = v["type"].as_str().unwrap().to_owned();
        if kind == "Results" && v["speech_final"] == true {
            final_text = v["channel"]["alternatives"][0]["transcript"]
                .as_str()
                .map(str::to_owned);
            types.push("speech_final".to_owned());
        } else {
            types.push(kind.clone());
        }
        if kind == "UtteranceEnd" {
            break;
        }
    }
    assert_eq!(
        types.first().map(String::as_str),
        Some("SpeechStarted"),
        "{types:?}"
    );
    assert!(
        types.iter().filter(|t| *t == "Results").count() >= 2,
        "interims: {types:?}"
    );
    assert_eq!(final_text.as_deref(), Some("one two three"));
    assert!(
        types.iter().position(|t| t == "speech_final")
            < types.iter().position(|t| t == "UtteranceEnd")
    );
    // CloseStream: Metadata, then the server closes.
    ws.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let mut saw_metadata = false;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            saw_metadata |= t.contains("Metadata");
        }
    }
    assert!(saw_metadata);
    // Silence on a socket (no audio, no KeepAlive) closes it with 1011 after idle_ms.
    let (mut idle, _) = connect(q).await.unwrap();
    let close = loop {
        match idle.next().await {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            _ => break None,
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1011));
    assert!(
        dg.state()
            .stt
            .iter()
            .all(|s| s.violations.is_empty() || s.query.len() == 1)
    );
}

#[tokio::test]
async fn a_silent_caller_hears_the_prompt_then_the_goodbye_spoken_by_the_tts() {
    let f = Fakes::start(
        DeepgramOpts::default(),
        ElevenLabsOpts::default(),
        OpenAiHttpOpts::default(),
        OpenAiHttpOpts::default(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, data.path(), |c| {
        c.agent.silence_timeout = voicectl::config::HumanDuration::from_secs(1);
        c.agent.goodbye = "Goodbye for now.".into();
    })
    .await;
    s.sim
        .set_scenario("+14155550916", Scenario::answer(CallerScript::silent()));
    let id = s.call("+14155550916").await;
    let ev = s.follow(&id, Duration::from_secs(20)).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    f.assert_clean().await;
    let call = s.get(&id).await;
    assert_eq!(call["end_reason"], "silence", "{call}");
    let texts: Vec<String> =
        f.el.state()
            .sessions
            .iter()
            .flat_map(|s| s.texts.clone())
            .map(|t| t.trim().to_owned())
            .collect();
    assert_eq!(
        texts,
        vec![
            "Hello, this is the pipeline.",
            "Are you still there?",
            "Goodbye for now."
        ]
    );
    let t = s.transcript(&id).await;
    assert_eq!(
        lines(&t, "agent"),
        vec![
            "Hello, this is the pipeline.",
            "Are you still there?",
            "Goodbye for now."
        ]
    );
    assert!(
        f.oa.state().chats.is_empty(),
        "no LLM turn without the caller"
    );
}

/// The pipeline's LLM calls a tenant tool: the chat request offers it (`tools`), the streamed
/// `tool_calls` reach the tenant once, and the follow-up request carries the assistant
/// `tool_calls` message and the `tool` message with the answer, whose reply is spoken.
#[tokio::test]
async fn the_llm_calls_a_tenant_tool_and_speaks_from_its_answer() {
    use crate::engine_tools::{add_tool, assert_one_signed_request, tenant_endpoint};
    let (base, seen) = tenant_endpoint().await;
    let f = Fakes::start(
        DeepgramOpts {
            utterances: vec!["Where is my order one two three".into()],
            ..Default::default()
        },
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            replies: vec!["".into(), "Your order has shipped.".into()],
            tool_call: Some(("lookup_order".into(), r#"{"order":"123"}"#.into())),
            tool_call_on: Some(0),
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, dir.path(), |c| {
        c.server.allow_private_targets = vec!["127.0.0.1".into()];
    })
    .await;
    add_tool(&s, &base);
    // Tool requests are signed with the tenant's webhook secret, which comes with a webhook.
    let hook = format!("{base}/hook");
    s.store
        .blocking(move |c| {
            let patch = voicectl::store::tenants::TenantPatch {
                webhook_url: Some(hook),
                ..Default::default()
            };
            voicectl::store::tenants::update(c, "acme", patch).map(|_| ())
        })
        .unwrap();
    let (id, _) = run(&s, "+14155550811", conversation(), 25).await;
    f.assert_clean().await;
    assert_one_signed_request(&s, &seen, &id, "call_fake1");
    let chats = f.oa.state().chats.clone();
    assert!(chats.len() >= 2, "{} chat requests", chats.len());
    let offered = &chats[0].body["tools"];
    assert_eq!(offered[0]["type"], "function", "{offered}");
    assert!(
        offered
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["function"]["name"] == "lookup_order"),
        "{offered}"
    );
    let follow_up = chats[1].body["messages"].as_array().unwrap().clone();
    let n = follow_up.len();
    assert_eq!(
        follow_up[n - 2]["tool_calls"][0]["id"],
        "call_fake1",
        "{follow_up:?}"
    );
    assert_eq!(follow_up[n - 1]["role"], "tool");
    assert!(
        follow_up[n - 1]["content"]
            .as_str()
            .unwrap()
            .contains("shipped"),
        "{follow_up:?}"
    );
    let t = s.transcript(&id).await;
    assert!(
        lines(&t, "agent")
            .iter()
            .any(|l| l.contains("Your order has shipped")),
        "{t:?}"
    );
}

/// Keypad in through the pipeline: the keys are the caller's turn, so the chat request ends
/// with them as the user's message, and the reply is spoken.
#[tokio::test]
async fn keys_pressed_reach_the_llm_as_the_callers_turn() {
    let f = Fakes::start(
        DeepgramOpts::default(),
        ElevenLabsOpts::default(),
        OpenAiHttpOpts {
            replies: vec!["You chose billing.".into()],
            ..Default::default()
        },
        OpenAiHttpOpts::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = pipeline_stack(&f, dir.path(), |_| {}).await;
    let (id, _) = run(
        &s,
        "+14155550812",
        vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Dtmf('2'),
            Step::Dtmf('#'),
            Step::WaitForAgentSpeech { after_ms: 100 },
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ],
        20,
    )
    .await;
    f.assert_clean().await;
    let chats = f.oa.state().chats.clone();
    assert_eq!(chats.len(), 1, "one LLM turn, for the keys");
    let msgs = chats[0].messages();
    assert_eq!(
        msgs.last().unwrap(),
        &("user".to_owned(), "The caller pressed 2 #".to_owned())
    );
    let t = s.transcript(&id).await;
    assert!(
        lines(&t, "caller").contains(&"[keypad] 2#".to_owned()),
        "{t:?}"
    );
    assert!(
        lines(&t, "agent")
            .iter()
            .any(|l| l.contains("You chose billing")),
        "{t:?}"
    );
}

//! Call recording (SPEC §8): the two-channel WAV placed by media time and cut at `clear`, its
//! download and scoping, a failing disk, the spoken notice, and bad input for the new fields.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::e2e::{Opts, Stack, stack, statuses};
use serde_json::json;
use test_fakes::realtime::{FakeRealtime, RealtimeOpts};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::audio::mulaw;
use voicectl::config::{EngineKind, Secret};
use voicectl::store::{keys, tenants};

/// Loudness windows of 10 ms.
const WIN: usize = 80;
const LOUD: i32 = 1000;

fn loud_windows(samples: &[i16]) -> Vec<bool> {
    samples
        .chunks(WIN)
        .map(|w| w.iter().any(|s| (*s as i32).abs() > LOUD))
        .collect()
}

fn first_loud_ms(samples: &[i16]) -> Option<i64> {
    loud_windows(samples)
        .iter()
        .position(|l| *l)
        .map(|i| (i * 10) as i64)
}

fn decode(bytes: &[u8]) -> Vec<i16> {
    bytes.iter().map(|b| mulaw::decode(*b)).collect()
}

/// (caller, agent) samples of a WAV.
fn channels(wav: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let mut r = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    let spec = r.spec();
    assert_eq!((spec.channels, spec.sample_rate), (2, 8000));
    let s: Vec<i16> = r.samples::<i16>().map(|s| s.unwrap()).collect();
    (
        s.iter().step_by(2).copied().collect(),
        s.iter().skip(1).step_by(2).copied().collect(),
    )
}

async fn recording_stack(data: &Path, rt: Option<&FakeRealtime>) -> Stack {
    let data = data.to_path_buf();
    let rt = rt.map(|rt| (rt.url(), rt.opts().api_key.clone()));
    stack(Opts {
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.server.data_dir = data;
            if let Some((url, key)) = rt {
                c.agent.engine = EngineKind::OpenAiRealtime;
                c.openai.realtime_url = url;
                c.openai.api_key = Secret::new(key);
            }
        }),
        ..Default::default()
    })
    .await
}

async fn create(s: &Stack, body: serde_json::Value) -> String {
    let (st, v) = s
        .api(reqwest::Method::POST, "/api/v1/calls", Some(body))
        .await;
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

async fn download(s: &Stack, key: &str, id: &str) -> (u16, Option<String>, Vec<u8>) {
    let resp = s
        .http
        .get(format!("{}/api/v1/calls/{id}/recording", s.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, ct, resp.bytes().await.unwrap().to_vec())
}

fn recording_file(data: &Path, id: &str) -> PathBuf {
    data.join("recordings").join(format!("{id}.wav"))
}

#[tokio::test]
async fn recording_channels_line_up_with_what_each_side_said_and_heard() {
    let data = tempfile::tempdir().unwrap();
    let rt = FakeRealtime::start(RealtimeOpts {
        reply_ms: 800,
        greeting_ms: 2500,
        ..Default::default()
    })
    .await;
    let s = recording_stack(data.path(), Some(&rt)).await;
    let to = "+14155550901";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::SpeakWhileAgentTalks {
                after_ms: 700,
                speak_ms: 500,
            },
            Step::WaitForAgentSilence { min_ms: 300 },
            Step::Hangup,
        ])),
    );
    let id = create(&s, json!({"to": to, "record": true})).await;
    let ev = s.follow(&id, Duration::from_secs(20)).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let sid = s.get(&id).await["twilio_call_sid"]
        .as_str()
        .unwrap()
        .to_owned();
    let rec = s
        .sim
        .wait_ended(&sid, Duration::from_secs(10))
        .await
        .unwrap();
    let stream = rec.stream().unwrap();
    assert_eq!(stream.clears.len(), 1, "{:?}", stream.clears);

    // The call says it was recorded (the bridge ends just after the stream).
    let mut call = s.get(&id).await;
    for _ in 0..50 {
        if !call["recording"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        call = s.get(&id).await;
    }
    assert_eq!(call["recording"]["status"], "recorded", "{call}");
    let (st, ct, wav) = download(&s, &s.key, &id).await;
    assert_eq!(st, 200);
    assert_eq!(ct.as_deref(), Some("audio/wav"));
    let (caller, agent) = channels(&wav);

    // Caller: placed by media time, sample for sample.
    let sim_caller = decode(&stream.caller_audio);
    let wav_speech = first_loud_ms(&caller).expect("caller speech in the left channel");
    let sim_speech = first_loud_ms(&sim_caller).unwrap();
    assert!(
        (wav_speech - sim_speech).abs() <= 40,
        "caller speech at {wav_speech} ms in the file, {sim_speech} ms on the phone"
    );
    let span = stream.caller_speech[0].start_ms as i64;
    assert!((wav_speech - span).abs() <= 40, "{wav_speech} vs {span}");

    // Agent: placed where the phone played it. The first played mark gives the start of
    // playback on the phone's clock (marks echo when their position has played).
    let m = stream
        .marks
        .iter()
        .find(|m| m.played)
        .expect("a played mark");
    let play_start = m.echoed_at_ms.unwrap() as i64 - m.position as i64 / 8;
    let sim_agent = decode(&stream.agent_played);
    let agent_at = play_start + first_loud_ms(&sim_agent).unwrap();
    let wav_agent = first_loud_ms(&agent).expect("agent audio in the right channel");
    assert!(
        (wav_agent - agent_at).abs() <= 40,
        "agent audio at {wav_agent} ms in the file, {agent_at} ms on the phone"
    );

    // Cut at the clear: what played is there, the dropped rest of the greeting is not.
    let heard_ms = stream.clears[0].played_bytes as i64 / 8;
    let windows = loud_windows(&agent);
    let at = |ms: i64| windows.get((ms / 10) as usize).copied().unwrap_or(false);
    let cut = play_start + heard_ms;
    assert!(at(cut - 80), "the greeting is heard until the clear");
    let quiet: Vec<i64> = (cut + 40..cut + 500)
        .step_by(10)
        .filter(|ms| at(*ms))
        .collect();
    assert!(
        quiet.is_empty(),
        "cleared audio in the agent channel at {quiet:?} ms (clear at {cut} ms)"
    );
    // Overall the agent channel holds what played, not what was sent.
    let loud_ms = windows.iter().filter(|l| **l).count() as i64 * 10;
    let played_ms = stream.agent_played_bytes as i64 / 8;
    assert!(
        (loud_ms - played_ms).abs() <= 120,
        "{loud_ms} ms of agent audio in the file, {played_ms} ms played, {} ms sent",
        stream.agent_audio.len() / 8
    );
    assert!(stream.agent_audio.len() as i64 / 8 > played_ms + 1000);
}

#[tokio::test]
async fn recording_download_is_scoped_and_404_without_one() {
    let data = tempfile::tempdir().unwrap();
    let s = recording_stack(data.path(), None).await;
    let other = s
        .store
        .blocking(|c| {
            tenants::create(
                c,
                tenants::TenantPatch {
                    name: Some("other".into()),
                    ..Default::default()
                },
            )?;
            Ok(keys::create(c, Some("other"), "k", None)?.key)
        })
        .unwrap();
    let script = || {
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Hangup,
        ]))
    };
    s.sim.set_scenario("+14155550902", script());
    s.sim.set_scenario("+14155550903", script());
    let rec = create(&s, json!({"to": "+14155550902", "record": true})).await;
    let plain = create(&s, json!({"to": "+14155550903"})).await;
    for id in [&rec, &plain] {
        let ev = s.follow(id, Duration::from_secs(15)).await;
        assert_eq!(statuses(&ev).last().unwrap(), "completed");
    }
    let mut ok = (0, None, vec![]);
    for _ in 0..50 {
        ok = download(&s, &s.key, &rec).await;
        if ok.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ok.0, 200);
    let (caller, agent) = channels(&ok.2);
    assert!(!caller.is_empty() && first_loud_ms(&agent).is_some());
    // Not recorded: 404, and the call object has no recording.
    let (st, _, body) = download(&s, &s.key, &plain).await;
    assert_eq!(st, 404);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert!(s.get(&plain).await["recording"].is_null());
    assert!(!recording_file(data.path(), &plain).exists());
    // Another tenant's recording, or no such call: the same 404.
    let (st, _, _) = download(&s, &other, &rec).await;
    assert_eq!(st, 404);
    let (st, _, _) = download(&s, &s.key, "call_doesnotexist").await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn a_full_disk_fails_the_recording_and_the_call_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let s = recording_stack(data.path(), None).await;
    let to = "+14155550904";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Speak(400),
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Hangup,
        ])),
    );
    std::fs::create_dir_all(data.path().join("recordings")).unwrap();
    let id = create(&s, json!({"to": to, "record": true})).await;
    // Every write to the file fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", recording_file(data.path(), &id)).unwrap();
    let ev = s.follow(&id, Duration::from_secs(15)).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let t = s.transcript(&id).await;
    assert!(
        t.iter().any(|e| e["text"] == "Sure."),
        "the agent answered: {t:?}"
    );
    let mut call = s.get(&id).await;
    for _ in 0..50 {
        if !call["recording"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        call = s.get(&id).await;
    }
    assert_eq!(call["recording"]["status"], "failed", "{call}");
    assert!(
        call["recording"]["error"]
            .as_str()
            .unwrap()
            .contains("space"),
        "{call}"
    );
    let (st, _, _) = download(&s, &s.key, &id).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn the_recording_notice_is_spoken_first_and_the_tenant_choice_applies() {
    let data = tempfile::tempdir().unwrap();
    let s = recording_stack(data.path(), None).await;
    s.store
        .blocking(|c| {
            tenants::update(
                c,
                "acme",
                tenants::TenantPatch {
                    record: Some(true),
                    recording_notice: Some("This call is recorded.".into()),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    let to = "+14155550905";
    s.sim.set_scenario(
        to,
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Hangup,
        ])),
    );
    // The tenant records: the call does not need to ask.
    let id = create(&s, json!({"to": to})).await;
    let ev = s.follow(&id, Duration::from_secs(15)).await;
    assert_eq!(statuses(&ev).last().unwrap(), "completed");
    let t = s.transcript(&id).await;
    let first = t.iter().find(|e| e["speaker"] == "agent").unwrap();
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .starts_with("This call is recorded."),
        "{t:?}"
    );
    let mut call = s.get(&id).await;
    for _ in 0..50 {
        if !call["recording"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        call = s.get(&id).await;
    }
    assert_eq!(call["recording"]["status"], "recorded", "{call}");
    assert!(recording_file(data.path(), &id).exists());

    // A call may opt out of its tenant's recording: no file, no notice.
    s.sim.set_scenario(
        "+14155550906",
        Scenario::answer(CallerScript::new(vec![
            Step::WaitForAgentSilence { min_ms: 200 },
            Step::Hangup,
        ])),
    );
    let id = create(&s, json!({"to": "+14155550906", "record": false})).await;
    s.follow(&id, Duration::from_secs(15)).await;
    let t = s.transcript(&id).await;
    assert!(
        t.iter()
            .all(|e| !e["text"].as_str().unwrap().contains("recorded")),
        "{t:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.get(&id).await["recording"].is_null());
    assert!(!recording_file(data.path(), &id).exists());
}

#[tokio::test]
async fn bad_recording_fields_are_refused_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let s = recording_stack(data.path(), None).await;
    let admin = s
        .store
        .blocking(|c| Ok(keys::create(c, None, "admin", None)?.key))
        .unwrap();
    let put = |body: serde_json::Value| {
        let s = &s;
        let admin = admin.clone();
        async move {
            let resp = s
                .http
                .put(format!("{}/api/v1/tenants/acme", s.base))
                .bearer_auth(admin)
                .json(&body)
                .send()
                .await
                .unwrap();
            let st = resp.status().as_u16();
            (st, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (st, v) = put(json!({"record": "yes"})).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = put(json!({"recording_notice": "x".repeat(1001)})).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("recording_notice:"),
        "{v}"
    );
    let (st, v) = put(json!({"record": true, "recording_notice": "Recorded."})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["record"].clone(), v["recording_notice"].clone()),
        (json!(true), json!("Recorded."))
    );
    let (st, v) = put(json!({"recording_notice": "x".repeat(1001), "record": false})).await;
    assert_eq!(st, 400, "{v}");
    let (_, v) = put(json!({})).await;
    assert_eq!(v["record"], true, "a refused change changed nothing: {v}");
    assert_eq!(v["recording_notice"], "Recorded.");
    // An empty notice clears it.
    let (_, v) = put(json!({"recording_notice": ""})).await;
    assert!(v["recording_notice"].is_null(), "{v}");

    let (st, v) = s
        .api(
            reqwest::Method::POST,
            "/api/v1/calls",
            Some(json!({"to": "+14155550907", "record": "yes"})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
}

#[tokio::test]
async fn retention_purges_old_calls_and_recordings_and_keeps_recent_and_live_ones() {
    use voicectl::config::HumanDuration;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let s = stack(Opts {
        tweak: Box::new(move |c: &mut voicectl::config::Config| {
            c.server.data_dir = dir;
            c.retention.calls = HumanDuration::parse("90d").unwrap();
            c.retention.recordings = HumanDuration::parse("30d").unwrap();
        }),
        ..Default::default()
    })
    .await;
    let day = 24 * 3600 * 1000i64;
    let now = voicectl::domain::timefmt::now_ms();
    // (name, status, ended days ago, recorded)
    let rows = [
        ("old", "completed", Some(100), true),
        ("mid", "completed", Some(40), true),
        ("recent", "completed", Some(1), true),
        ("live", "in_progress", None, false),
        ("old_failed", "failed", Some(200), false),
    ];
    std::fs::create_dir_all(data.path().join("recordings")).unwrap();
    let ids: Vec<(&str, String)> = rows
        .iter()
        .map(|(name, status, ended, rec)| {
            let (status, ended, rec) = (status.to_string(), *ended, *rec);
            let id = s
                .store
                .blocking(move |c| {
                    let id = voicectl::domain::ids::CallId::generate();
                    let tenant = tenants::get(c, "acme")?.id;
                    let created = now - 300 * day;
                    c.execute(
                        "INSERT INTO calls (id, tenant_id, direction, to_number, from_number, \
                         status, engine, created_at, updated_at, ended_at, recording) \
                         VALUES (?1, ?2, 'outbound', '+14155550999', '+14155550100', ?3, \
                         'scripted', ?4, ?4, ?5, ?6)",
                        rusqlite::params![
                            id.as_str(),
                            tenant,
                            status,
                            created,
                            ended.map(|d: i64| now - d * day),
                            rec.then_some(r#"{"status":"recorded"}"#),
                        ],
                    )?;
                    c.execute(
                        "INSERT INTO transcript_entries (call_id, speaker, text, at_ms) \
                         VALUES (?1, 'agent', 'Hello', 0)",
                        [id.as_str()],
                    )?;
                    Ok(id.to_string())
                })
                .unwrap();
            if rec {
                std::fs::write(recording_file(data.path(), &id), b"RIFF").unwrap();
            }
            (*name, id)
        })
        .collect();
    let id = |name: &str| ids.iter().find(|(n, _)| *n == name).unwrap().1.clone();

    let purged = s.manager.purge().await.unwrap();
    assert_eq!((purged.calls, purged.recordings), (2, 2), "{purged:?}");
    for gone in ["old", "old_failed"] {
        let (st, _) = s
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/calls/{}", id(gone)),
                None,
            )
            .await;
        assert_eq!(st, 404, "{gone} purged");
        let left: i64 = s
            .store
            .blocking({
                let i = id(gone);
                move |c| {
                    Ok(c.query_row(
                        "SELECT COUNT(*) FROM transcript_entries WHERE call_id = ?1",
                        [i],
                        |r| r.get(0),
                    )?)
                }
            })
            .unwrap();
        assert_eq!(left, 0, "its transcript went too");
    }
    assert!(!recording_file(data.path(), &id("old")).exists());
    // 40 days: the call stays, its recording goes.
    assert!(!recording_file(data.path(), &id("mid")).exists());
    assert_eq!(s.get(&id("mid")).await["recording"]["status"], "purged");
    assert_eq!(download(&s, &s.key, &id("mid")).await.0, 404);
    // Recent and live calls are untouched.
    assert!(recording_file(data.path(), &id("recent")).exists());
    assert_eq!(
        s.get(&id("recent")).await["recording"]["status"],
        "recorded"
    );
    assert_eq!(s.get(&id("live")).await["status"], "in_progress");
    assert_eq!(s.transcript(&id("live")).await.len(), 1);
    // A second run finds nothing; the counters add up.
    let again = s.manager.purge().await.unwrap();
    assert_eq!((again.calls, again.recordings), (0, 0));
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
        metrics.contains("voicectl_retention_purged_total{kind=\"calls\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("voicectl_retention_purged_total{kind=\"recordings\"} 2"));
}

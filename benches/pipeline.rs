//! Pipeline engine benchmark (SPEC §6): N concurrent pipeline calls (default 200), each a few
//! caller turns, through the real router and call path, the Twilio simulator and the provider
//! fakes at realistic latencies, everything on ONE core (a current-thread runtime).
//!
//! ```text
//! cargo bench --bench pipeline                       # 200 calls, 3 turns each
//! PIPELINE_CALLS=50 PIPELINE_TURNS=2 PIPELINE_STAGGER_MS=0 cargo bench --bench pipeline
//! ```
//!
//! Reports voicectl's own share of each turn's latency (`latency.turns[].own_ms`: the turn
//! minus the time spent waiting on endpointing, on the LLM's text up to the first piece and
//! on the TTS's first audio) at p50/p99, the whole turn for reference, and CPU per
//! call-second and memory per call. The simulator and the fakes share the process and its
//! core, so CPU and memory are upper bounds for the server alone, and their own work under
//! load also delays the events the server reacts to (which then counts as ours).
//!
//! Provider latencies: Deepgram endpointing 300 ms, LLM first token 250 ms then 25 ms per
//! word, ElevenLabs first audio 150 ms (flash models quote ~75 ms plus the network).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_fakes::deepgram::{DeepgramOpts, FakeDeepgram};
use test_fakes::elevenlabs::{ElevenLabsOpts, FakeElevenLabs};
use test_fakes::openai_http::{FakeOpenAiHttp, OpenAiHttpOpts};
use tokio_util::sync::CancellationToken;
use twilio_sim::{CallerScript, Scenario, SimConfig, Step};
use voicectl::api::{AppState, app};
use voicectl::calls::Calls;
use voicectl::config::{Config, EngineKind, HumanDuration, LlmConfig, PipelineConfig, Secret};
use voicectl::store::{Store, keys, tenants};

const SID: &str = "AC00000000000000000000000000000b12";
const TOKEN: &str = "bench-auth-token";
const PUBLIC: &str = "https://voice.bench";

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let j = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the comm field.
    (j(11) + j(12)) / 100.0
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    // cargo passes `--bench`; nothing else is taken from the command line.
    let calls = env("PIPELINE_CALLS", 200);
    let turns = env("PIPELINE_TURNS", 3);
    // Calls start this far apart so their turns do not all fall on the same instant (real
    // callers are not synchronized); 0 makes every turn of every call a burst.
    let stagger = env("PIPELINE_STAGGER_MS", 25) as u64;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(calls, turns, stagger));
}

async fn run(n: usize, turns: usize, stagger: u64) {
    let dg = FakeDeepgram::start(DeepgramOpts::default()).await;
    let el = FakeElevenLabs::start(ElevenLabsOpts {
        latency_ms: 150,
        ms_per_char: 30,
        ..Default::default()
    })
    .await;
    let llm = FakeOpenAiHttp::start(OpenAiHttpOpts {
        replies: vec![],
        first_token_ms: 250,
        token_interval_ms: 25,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("data")).expect("store");
    let key = store
        .blocking(|c| {
            tenants::create(
                c,
                tenants::TenantPatch {
                    name: Some("bench".into()),
                    numbers: Some(vec!["+14155550123".into()]),
                    max_concurrent_calls: Some(10_000),
                    calls_per_minute: Some(100_000),
                    ..Default::default()
                },
            )?;
            Ok(keys::create(c, Some("bench"), "k", None)?.key)
        })
        .expect("tenant");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut sim_cfg = SimConfig::new(SID, TOKEN);
    sim_cfg.origin_overrides = vec![(PUBLIC.into(), format!("http://{addr}"))];
    let sim = twilio_sim::start(sim_cfg).await.expect("sim");

    let mut cfg = Config::dev();
    cfg.server.data_dir = dir.path().join("data");
    cfg.server.public_url = PUBLIC.into();
    cfg.server.max_concurrent_calls = (n as u32) * 2;
    cfg.limits.calls_per_minute_per_tenant = 100_000;
    cfg.limits.api_requests_per_second_per_ip = 100_000;
    cfg.limits.webhook_requests_per_second_per_ip = 100_000;
    cfg.limits.max_websockets_per_ip = 100_000;
    cfg.twilio.account_sid = SID.into();
    cfg.twilio.auth_token = Secret::new(TOKEN);
    cfg.twilio.api_base_url = sim.base_url();
    cfg.twilio.calls_per_second = 1000.0;
    cfg.twilio.from_number = "+14155550100".into();
    cfg.agent.engine = EngineKind::Pipeline;
    cfg.agent.greeting = "Hello, thanks for calling.".into();
    cfg.agent.silence_timeout = HumanDuration::from_secs(30);
    cfg.pipeline = Some(PipelineConfig {
        llm: vec!["main".into()],
        tts: vec!["elevenlabs".into()],
        tts_cache: true,
        ..Default::default()
    });
    cfg.deepgram.api_key = Secret::new(dg.opts().api_key.clone());
    cfg.deepgram.stt_url = dg.stt_url();
    cfg.deepgram.tts_url = dg.tts_url();
    cfg.elevenlabs.api_key = Secret::new(el.opts().api_key.clone());
    cfg.elevenlabs.api_base_url = el.base_url();
    cfg.llm = vec![LlmConfig {
        name: "main".into(),
        base_url: llm.base_url(),
        api_key: Secret::new(llm.opts().api_key.clone()),
        model: "gpt-4o-mini".into(),
        temperature: 0.7,
    }];
    let shutdown = CancellationToken::new();
    let manager = Calls::new(store.clone(), Arc::new(cfg), shutdown.clone()).expect("calls");
    manager.spawn_workers();
    let router = app(AppState::with_manager(manager.clone()));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    });

    let mut steps = vec![Step::WaitForAgentSilence { min_ms: 200 }];
    for _ in 0..turns {
        steps.push(Step::Speak(800));
        steps.push(Step::WaitForAgentSilence { min_ms: 300 });
    }
    steps.push(Step::Hangup);
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let rss0 = rss_kb();
    let cpu0 = cpu_secs();
    let t0 = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let to = format!("+1415555{:04}", 1000 + i);
        sim.set_scenario(&to, Scenario::answer(CallerScript::new(steps.clone())));
        let r = http
            .post(format!("{base}/api/v1/calls"))
            .bearer_auth(&key)
            .json(&json!({"to": to}))
            .send()
            .await
            .expect("POST /calls");
        let v: Value = r.json().await.expect("json");
        ids.push(v["id"].as_str().expect("id").to_owned());
        tokio::time::sleep(Duration::from_millis(stagger)).await;
    }
    // Peak memory while all calls are live, sampled until they end.
    let mut peak = rss0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        peak = peak.max(rss_kb());
        let live = manager.session_count();
        if (live == 0 && t0.elapsed() > Duration::from_secs(3)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let (mut own, mut turn, mut call_secs, mut completed) = (Vec::new(), Vec::new(), 0.0, 0);
    let (mut stt, mut llm_first, mut tts) = (Vec::new(), Vec::new(), Vec::new());
    for id in &ids {
        let v: Value = http
            .get(format!("{base}/api/v1/calls/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        if v["status"] == "completed" {
            completed += 1;
        }
        call_secs += v["duration_seconds"].as_f64().unwrap_or(0.0);
        for t in v["latency"]["turns"].as_array().into_iter().flatten() {
            own.extend(t["own_ms"].as_f64());
            turn.extend(t["turn_ms"].as_f64());
            stt.extend(t["stt_final_ms"].as_f64());
            llm_first.extend(t["llm_first_token_ms"].as_f64());
            tts.extend(t["tts_first_audio_ms"].as_f64());
        }
    }
    println!(
        "pipeline bench: {n} concurrent calls × {turns} turns, one core (current-thread runtime), starts {stagger} ms apart"
    );
    println!(
        "  completed {completed}/{n}, turns measured {}, wall {wall:.1} s",
        own.len()
    );
    println!(
        "  own share of turn latency: p50 {:.1} ms, p99 {:.1} ms (goal ≤ 20 ms p99)",
        pct(&mut own, 0.5),
        pct(&mut own, 0.99)
    );
    println!(
        "  whole turn (incl. providers): p50 {:.0} ms, p99 {:.0} ms",
        pct(&mut turn, 0.5),
        pct(&mut turn, 0.99)
    );
    for (name, v) in [
        ("stt_final_ms", &mut stt),
        ("llm_first_token_ms", &mut llm_first),
        ("tts_first_audio_ms", &mut tts),
    ] {
        println!(
            "    {name}: p50 {:.0} ms, p99 {:.0} ms",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
    // The fakes' own floor for a turn: 300 ms endpointing (plus up to one 20 ms frame), the
    // LLM's first token at 250 ms and its reply ("Reply number N.", 7 SSE frames 25 ms apart,
    // spoken as one piece at [DONE]), ElevenLabs' 150 ms to first audio.
    let floor = 300.0 + 250.0 + 6.0 * 25.0 + 150.0;
    let mut excess: Vec<f64> = turn.iter().map(|t| t - floor).collect();
    println!(
        "  turn minus the providers' floor ({floor:.0} ms; our work plus queueing on the shared core): p50 {:.0} ms, p99 {:.0} ms",
        pct(&mut excess, 0.5),
        pct(&mut excess, 0.99)
    );
    println!(
        "  CPU {cpu:.1} s for {call_secs:.0} call-seconds: {:.2} ms CPU per call-second (server + simulator + fakes)",
        cpu * 1000.0 / call_secs.max(1.0)
    );
    println!(
        "  memory: peak RSS +{:.0} MiB over idle, {:.0} KiB per call (server + simulator + fakes)",
        (peak.saturating_sub(rss0)) as f64 / 1024.0,
        (peak.saturating_sub(rss0)) as f64 / n as f64
    );
    shutdown.cancel();
}

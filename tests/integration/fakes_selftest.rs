//! Tests of the fakes themselves, driven by plain tokio-tungstenite / reqwest clients, so that a
//! voicectl test failing against a fake points at voicectl, not at the fake.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voicectl::audio::mulaw::SILENCE;

use test_fakes::realtime::{
    Closed, ErrorOn, Failure, FakeRealtime, ItemStatus, Mode, RealtimeEvent, RealtimeOpts,
};
use test_fakes::ultravox::{
    CreateFailure, FakeUltravox, JoinUrl, Medium, Role, SocketClose, UltravoxOpts,
};
use test_fakes::{
    agent_mulaw, agent_pcm_bytes, caller_speech_mulaw, expect_event, parse_proto_duration, tone_pcm,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const T: Duration = Duration::from_secs(3);

async fn next_msg(ws: &mut Ws) -> Option<Message> {
    match tokio::time::timeout(T, ws.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        Ok(_) => None,
        Err(_) => panic!("no message from the fake within {T:?}"),
    }
}

/// The next text frame as JSON (panics on anything else).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match next_msg(ws).await {
            Some(Message::Text(t)) => {
                return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
            }
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("expected a JSON text frame, got {other:?}"),
        }
    }
}

/// JSON events up to and including the first of type `ty`.
async fn until_type(ws: &mut Ws, ty: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = next_json(ws).await;
        let done = v["type"] == ty;
        seen.push(v);
        if done {
            return seen;
        }
    }
}

/// Waits for the server's close frame, completes the close handshake, returns the code.
async fn expect_close(ws: &mut Ws) -> Option<u16> {
    loop {
        match next_msg(ws).await {
            Some(Message::Close(f)) => {
                // Polling on sends our close reply and reads to the end of the stream.
                while let Some(Some(_)) = next_msg_or_end(ws).await {}
                return f.map(|f| u16::from(f.code));
            }
            None => return None,
            Some(_) => {}
        }
    }
}

async fn next_msg_or_end(ws: &mut Ws) -> Option<Option<Message>> {
    tokio::time::timeout(T, ws.next())
        .await
        .ok()
        .map(|m| m.and_then(Result::ok))
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// OpenAI Realtime

fn rt_opts(mode: Mode) -> RealtimeOpts {
    RealtimeOpts {
        mode,
        reply_ms: 400,
        greeting_ms: 300,
        ..Default::default()
    }
}

async fn rt_connect(
    rt: &FakeRealtime,
    key: &str,
    beta_header: bool,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("{}?model=gpt-realtime", rt.url())
        .into_client_request()
        .expect("request");
    let h = req.headers_mut();
    h.insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    if beta_header {
        h.insert("openai-beta", "realtime=v1".parse().expect("header"));
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

fn ga_update() -> Value {
    json!({"type": "session.update", "session": {
        "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"],
        "instructions": "Be brief.",
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"},
                      "transcription": {"model": "whisper-1"}},
            "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"}}}})
}

fn beta_update() -> Value {
    json!({"type": "session.update", "session": {
        "turn_detection": {"type": "server_vad"}, "input_audio_format": "g711_ulaw",
        "output_audio_format": "g711_ulaw", "voice": "alloy", "instructions": "Be brief.",
        "modalities": ["text", "audio"], "temperature": 0.8,
        "input_audio_transcription": {"model": "whisper-1"}}})
}

async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// Appends μ-law in 20 ms frames, as voicectl forwards Twilio's.
async fn append(ws: &mut Ws, audio: &[u8]) {
    for frame in audio.chunks(160) {
        send_json(
            ws,
            json!({"type": "input_audio_buffer.append", "audio": B64.encode(frame)}),
        )
        .await;
    }
}

/// A caller turn: `ms` of speech then 420 ms of silence (enough for the VAD to stop).
fn caller_turn(ms: usize) -> Vec<u8> {
    let mut a = caller_speech_mulaw(ms);
    a.extend(std::iter::repeat_n(SILENCE, 420 * 8));
    a
}

/// Opens a session, configures it for `mode`, and returns the socket after `session.updated`.
async fn rt_session(rt: &FakeRealtime, mode: Mode) -> Ws {
    let mut ws = rt_connect(rt, &rt.opts().api_key, mode == Mode::Beta)
        .await
        .expect("connect");
    let created = next_json(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    send_json(
        &mut ws,
        if mode == Mode::Ga {
            ga_update()
        } else {
            beta_update()
        },
    )
    .await;
    let updated = next_json(&mut ws).await;
    assert_eq!(updated["type"], "session.updated", "{updated}");
    ws
}

#[tokio::test]
async fn realtime_ga_handshake_validates_session_shape() {
    let rt = FakeRealtime::start(rt_opts(Mode::Ga)).await;
    let mut ws = rt_connect(&rt, "sk-fake-realtime", false)
        .await
        .expect("connect");
    let created = next_json(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["type"], "realtime");
    assert_eq!(created["session"]["model"], "gpt-realtime");
    assert!(created["event_id"].is_string());
    assert_eq!(
        rt.session(0).config_issues,
        vec!["no session.update received"]
    );

    // A beta-shaped update is refused by a GA server: unknown parameter, not applied.
    send_json(&mut ws, beta_update()).await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["code"], "unknown_parameter");
    assert_eq!(rt.session(0).violations.len(), 1);

    send_json(&mut ws, ga_update()).await;
    let updated = next_json(&mut ws).await;
    assert_eq!(updated["type"], "session.updated");
    assert_eq!(
        updated["session"]["audio"]["input"]["format"]["type"],
        "audio/pcmu"
    );
    assert_eq!(updated["session"]["audio"]["output"]["voice"], "alloy");
    // Partial updates merge into the effective session.
    send_json(
        &mut ws,
        json!({"type": "session.update", "session": {"type": "realtime", "instructions": "New."}}),
    )
    .await;
    let updated = next_json(&mut ws).await;
    assert_eq!(updated["session"]["instructions"], "New.");
    assert_eq!(
        updated["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );
    let s = rt.session(0);
    assert_eq!(s.model.as_deref(), Some("gpt-realtime"));
    assert!(s.config_issues.is_empty(), "{:?}", s.config_issues);
    assert_eq!(s.session_updates.len(), 3);

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .expect("close");
    rt.wait_all_closed(T).await;
    assert_eq!(rt.session(0).closed, Some(Closed::ByClient(Some(1000))));
}

#[tokio::test]
async fn realtime_beta_requires_header_and_flat_session() {
    let rt = FakeRealtime::start(rt_opts(Mode::Beta)).await;
    let err = rt_connect(&rt, "sk-fake-realtime", false)
        .await
        .expect_err("beta without header");
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 400));

    let mut ws = rt_session(&rt, Mode::Beta).await;
    // GA shape on a beta server: refused.
    send_json(&mut ws, ga_update()).await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["error"]["code"], "unknown_parameter", "{err}");
    let s = rt.session(0);
    assert_eq!(s.beta_header.as_deref(), Some("realtime=v1"));
    assert!(s.config_issues.is_empty(), "{:?}", s.config_issues);
    assert_eq!(s.effective["input_audio_format"], "g711_ulaw");

    // A GA fake notes a beta header as a deviation but serves the session.
    let ga = FakeRealtime::start(rt_opts(Mode::Ga)).await;
    let mut ws = rt_connect(&ga, "sk-fake-realtime", true)
        .await
        .expect("connect");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    assert!(ga.session(0).violations[0].contains("beta header"));
}

#[tokio::test]
async fn realtime_rejects_bad_auth() {
    let rt = FakeRealtime::start(rt_opts(Mode::Ga)).await;
    let err = rt_connect(&rt, "sk-wrong", false).await.expect_err("401");
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 401));
    let scripted = FakeRealtime::start(RealtimeOpts {
        fail: Some(Failure::RejectAuth),
        ..rt_opts(Mode::Ga)
    })
    .await;
    let err = rt_connect(&scripted, "sk-fake-realtime", false)
        .await
        .expect_err("401");
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 401));
    assert_eq!(rt.state().rejected.len(), 1);
    assert!(rt.sessions().is_empty());
}

/// A caller turn produces the documented event sequence with the mode's event names, and the
/// audio deltas are exactly the recorded, reproducible agent signal.
async fn turn_flow(mode: Mode) {
    let rt = FakeRealtime::start(rt_opts(mode)).await;
    let mut ws = rt_session(&rt, mode).await;
    let sent = caller_turn(300);
    append(&mut ws, &sent).await;
    let events = until_type(&mut ws, "response.done").await;
    let (audio_delta, transcript_delta, audio_done, item_created) = match mode {
        Mode::Ga => (
            "response.output_audio.delta",
            "response.output_audio_transcript.delta",
            "response.output_audio.done",
            "conversation.item.added",
        ),
        Mode::Beta => (
            "response.audio.delta",
            "response.audio_transcript.delta",
            "response.audio.done",
            "conversation.item.created",
        ),
    };
    let t = types(&events);
    let pos = |ty: &str| {
        t.iter()
            .position(|x| *x == ty)
            .unwrap_or_else(|| panic!("no {ty} in {t:?}"))
    };
    let order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        item_created,
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        audio_delta,
        transcript_delta,
        audio_done,
        "response.done",
    ];
    for w in order.windows(2) {
        assert!(pos(w[0]) < pos(w[1]), "{} before {} in {t:?}", w[0], w[1]);
    }
    let wrong = match mode {
        Mode::Ga => "response.audio.delta",
        Mode::Beta => "response.output_audio.delta",
    };
    assert!(!t.contains(&wrong));

    let started = &events[pos("input_audio_buffer.speech_started")];
    assert_eq!(started["audio_start_ms"], 0);
    let user_item = started["item_id"].as_str().expect("item_id");
    let transcript = &events[pos("conversation.item.input_audio_transcription.completed")];
    assert_eq!(transcript["item_id"], user_item);
    assert_eq!(transcript["transcript"], "caller turn 1 (0.3 s)");

    let mut audio = Vec::new();
    let mut item_id = None;
    for e in events.iter().filter(|e| e["type"] == audio_delta) {
        for k in ["response_id", "output_index", "content_index", "event_id"] {
            assert!(!e[k].is_null(), "{k} missing in {e}");
        }
        item_id = e["item_id"].as_str().map(str::to_owned);
        audio.extend(
            B64.decode(e["delta"].as_str().expect("delta"))
                .expect("b64"),
        );
    }
    let done = events.last().expect("response.done");
    assert_eq!(done["response"]["status"], "completed");
    assert_eq!(audio, agent_mulaw(1, 400 * 8), "reproducible agent signal");
    let s = rt.session(0);
    assert_eq!(s.caller_audio, sent, "every caller byte recorded");
    let item = s.item(item_id.as_deref().expect("item")).expect("recorded");
    assert_eq!(item.audio, audio);
    assert_eq!(item.status, ItemStatus::Completed);
    assert_eq!(item.transcript, "Fake realtime reply 1.");
    assert_eq!(s.turns[0].audio_end_ms, Some(300));
    assert!(s.problems().is_empty(), "{:?}", s.problems());
}

#[tokio::test]
async fn realtime_ga_vad_turn_and_response() {
    turn_flow(Mode::Ga).await;
}

#[tokio::test]
async fn realtime_beta_vad_turn_and_response() {
    turn_flow(Mode::Beta).await;
}

#[tokio::test]
async fn realtime_truncate_is_checked_against_audio_sent() {
    let rt = FakeRealtime::start(rt_opts(Mode::Ga)).await;
    let mut ws = rt_session(&rt, Mode::Ga).await;
    // The greeting: response.create.
    send_json(&mut ws, json!({"type": "response.create"})).await;
    let events = until_type(&mut ws, "rate_limits.updated").await;
    let tdone = events
        .iter()
        .find(|e| e["type"] == "response.output_audio_transcript.done")
        .expect("transcript done");
    assert_eq!(tdone["transcript"], "Hello from the fake realtime");
    let item = tdone["item_id"].as_str().expect("item").to_owned();
    assert_eq!(rt.session(0).item(&item).expect("item").sent_ms(), 300);

    let truncate = |ms: u64| {
        json!({"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
            "audio_end_ms": ms, "event_id": "c1"})
    };
    send_json(&mut ws, truncate(301)).await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["event_id"], "c1");
    send_json(&mut ws, truncate(120)).await;
    let ok = next_json(&mut ws).await;
    assert_eq!(ok["type"], "conversation.item.truncated");
    assert_eq!(ok["audio_end_ms"], 120);
    send_json(
        &mut ws,
        json!({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0, "audio_end_ms": 1}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "error");

    let s = rt.session(0);
    assert_eq!(s.truncations.len(), 1);
    assert_eq!(
        (
            s.truncations[0].audio_end_ms,
            s.truncations[0].audio_sent_ms
        ),
        (120, 300)
    );
    assert_eq!(s.truncate_rejections.len(), 2);
    assert_eq!(s.truncate_rejections[0].audio_sent_ms, Some(300));
    assert_eq!(s.truncate_rejections[1].audio_sent_ms, None);
    assert_eq!(s.item(&item).expect("item").truncated_at_ms, Some(120));

    // Absurd values are refused, not a crash; instructed responses say the instructions.
    send_json(&mut ws, truncate(u64::MAX)).await;
    assert_eq!(next_json(&mut ws).await["type"], "error");
    send_json(
        &mut ws,
        json!({"type": "response.create", "response": {"instructions": "Say exactly this, then stop: \"Are you still there?\""}}),
    )
    .await;
    let events = until_type(&mut ws, "response.done").await;
    let done = events
        .iter()
        .find(|e| e["type"] == "response.output_audio_transcript.done")
        .expect("transcript done");
    assert_eq!(done["transcript"], "Are you still there?");
}

#[tokio::test]
async fn realtime_barge_in_cancels_response() {
    let rt = FakeRealtime::start(RealtimeOpts {
        reply_ms: 3000,
        ..rt_opts(Mode::Ga)
    })
    .await;
    let mut events = rt.subscribe();
    let mut ws = rt_session(&rt, Mode::Ga).await;
    append(&mut ws, &caller_turn(200)).await;
    let item = expect_event(&mut events, T, |e| match e {
        RealtimeEvent::DeltaSent { item, .. } => Some(item.clone()),
        _ => None,
    })
    .await;
    // The caller talks over the reply.
    append(&mut ws, &caller_speech_mulaw(100)).await;
    let seen = until_type(&mut ws, "response.done").await;
    let t = types(&seen);
    // The second speech_started comes right before the cancellation.
    assert_eq!(
        t[t.len() - 2..],
        ["input_audio_buffer.speech_started", "response.done"]
    );
    let done = seen.last().expect("done");
    assert_eq!(done["response"]["status"], "cancelled");
    assert_eq!(
        done["response"]["status_details"]["reason"],
        "turn_detected"
    );
    let rec = rt.session(0).item(&item).cloned().expect("item");
    assert_eq!(rec.status, ItemStatus::Cancelled("turn_detected"));
    assert!(rec.audio.len() < rec.planned_bytes);
    // No more deltas for it; cancelling again is a harmless error.
    send_json(&mut ws, json!({"type": "response.cancel"})).await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["error"]["code"], "response_cancel_not_active", "{err}");
    assert_eq!(rt.session(0).item(&item).expect("item").audio, rec.audio);
}

#[tokio::test]
async fn realtime_scripted_failures() {
    let start = |fail| {
        FakeRealtime::start(RealtimeOpts {
            fail: Some(fail),
            ..rt_opts(Mode::Ga)
        })
    };
    let (never, expire, garbage, mid, error, config_error) = tokio::join!(
        start(Failure::NeverAnswer),
        start(Failure::SessionExpire { after_ms: 150 }),
        start(Failure::Garbage),
        start(Failure::CloseMidResponse { after_deltas: 2 }),
        start(Failure::error_event("insufficient_quota")),
        start(Failure::ErrorEvent {
            code: "session_expired".into(),
            error_type: "invalid_request_error".into(),
            on: ErrorOn::SessionUpdate,
            close: true,
        }),
    );
    let key = "sk-fake-realtime";

    let never_case = async {
        let mut ws = rt_connect(&never, key, false).await.expect("connect");
        send_json(&mut ws, ga_update()).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), ws.next())
                .await
                .is_err(),
            "NeverAnswer sent something"
        );
        assert_eq!(never.session(0).session_updates.len(), 0);
        assert_eq!(never.session(0).client_events, vec!["session.update"]);
    };
    let expire_case = async {
        let mut ws = rt_connect(&expire, key, false).await.expect("connect");
        assert_eq!(next_json(&mut ws).await["type"], "session.created");
        let reason = loop {
            match next_msg(&mut ws).await {
                Some(Message::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
                Some(_) => {}
                None => panic!("no close frame"),
            }
        };
        assert_eq!(reason.0, 1001);
        assert!(reason.1.contains("maximum duration"));
    };
    let garbage_case = async {
        let mut ws = rt_connect(&garbage, key, false).await.expect("connect");
        assert_eq!(next_json(&mut ws).await["type"], "session.created");
        match next_msg(&mut ws).await {
            Some(Message::Text(t)) => assert!(serde_json::from_str::<Value>(&t).is_err()),
            other => panic!("{other:?}"),
        }
    };
    let mid_case = async {
        let mut ws = rt_session(&mid, Mode::Ga).await;
        send_json(&mut ws, json!({"type": "response.create"})).await;
        let mut deltas = 0;
        let code = loop {
            match next_msg(&mut ws).await {
                Some(Message::Text(t)) if t.contains("output_audio.delta") => deltas += 1,
                Some(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
                Some(_) => {}
                None => break None,
            }
        };
        assert_eq!((deltas, code), (2, Some(1011)));
    };
    let error_case = async {
        let mut ws = rt_session(&error, Mode::Ga).await;
        send_json(&mut ws, json!({"type": "response.create"})).await;
        let e = next_json(&mut ws).await;
        assert_eq!(e["error"]["code"], "insufficient_quota");
        assert_eq!(e["error"]["type"], "server_error");
        // Only the first response fails.
        send_json(&mut ws, json!({"type": "response.create"})).await;
        assert_eq!(next_json(&mut ws).await["type"], "response.created");
    };
    let config_error_case = async {
        let mut ws = rt_connect(&config_error, key, false)
            .await
            .expect("connect");
        assert_eq!(next_json(&mut ws).await["type"], "session.created");
        send_json(&mut ws, ga_update()).await;
        let e = next_json(&mut ws).await;
        assert_eq!(
            (&e["error"]["type"], &e["error"]["code"]),
            (&json!("invalid_request_error"), &json!("session_expired"))
        );
        assert_eq!(expect_close(&mut ws).await, Some(1011));
    };
    tokio::join!(
        never_case,
        expire_case,
        garbage_case,
        mid_case,
        error_case,
        config_error_case
    );
    expire.wait_all_closed(T).await;
    mid.wait_all_closed(T).await;
    assert!(matches!(
        mid.session(0).closed,
        Some(Closed::ByServer(1011, _))
    ));
}

#[tokio::test]
async fn realtime_drop_closes_sessions() {
    let rt = FakeRealtime::start(rt_opts(Mode::Ga)).await;
    let mut ws = rt_session(&rt, Mode::Ga).await;
    assert_eq!(rt.open_sessions(), 1);
    drop(rt);
    assert_eq!(expect_close(&mut ws).await, Some(1001));
}

// ---------------------------------------------------------------------------------------------
// Ultravox

fn uv_opts() -> UltravoxOpts {
    UltravoxOpts {
        reply_ms: 400,
        greeting_ms: 300,
        ..Default::default()
    }
}

fn twilio_body() -> Value {
    json!({"systemPrompt": "You are a test.", "voice": "Mark", "medium": {"twilio": {}},
        "firstSpeakerSettings": {"agent": {"text": "Hi there"}}, "maxDuration": "300s",
        "joinTimeout": "5s", "metadata": {"voicectl.call": "c1"}})
}

/// One HTTP client per test (building one per request is slow).
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn new(uv: &FakeUltravox) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: uv.base_url(),
            key: uv.opts().api_key.clone(),
        }
    }

    async fn create(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/api/calls", self.base))
            .header("X-API-Key", &self.key)
            .json(body)
            .send()
            .await
            .expect("POST /api/calls")
    }

    async fn create_ok(&self, body: &Value) -> Value {
        let resp = self.create(body).await;
        assert_eq!(resp.status(), 201);
        resp.json().await.expect("call json")
    }

    async fn get(&self, url: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(url)
            .header("X-API-Key", &self.key)
            .send()
            .await
            .expect("GET");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn data_message(&self, call_id: &str, body: Value) -> u16 {
        self.http
            .post(format!(
                "{}/api/calls/{call_id}/send_data_message",
                self.base
            ))
            .header("X-API-Key", &self.key)
            .json(&body)
            .send()
            .await
            .expect("POST send_data_message")
            .status()
            .as_u16()
    }
}

#[tokio::test]
async fn ultravox_create_validates_and_echoes() {
    let uv = FakeUltravox::start(uv_opts()).await;
    let api = Api::new(&uv);
    let no_key = api
        .http
        .post(format!("{}/api/calls", uv.base_url()))
        .json(&twilio_body())
        .send()
        .await
        .expect("post");
    assert_eq!(no_key.status(), 401);
    let body: Value = no_key.json().await.expect("json");
    assert!(body["detail"].is_string());

    let mut bad = Vec::new();
    for patch in [
        json!({"medium": {"twilio": {}, "serverWebSocket": {"inputSampleRate": 8000}}}),
        json!({"medium": {"serverWebSocket": {"outputSampleRate": 8000}}}),
        json!({"maxDuration": "300"}),
        json!({"joinTimeout": 30}),
        json!({"firstSpeakerSettings": {"agent": {}, "user": {}}}),
        json!({"metadata": {"n": 1}}),
        json!({"metadata": {"ultravox.x": "1"}}),
        json!({"system_prompt": "typo"}),
        json!({"temperature": 2}),
    ] {
        let mut body = twilio_body();
        for (k, v) in patch.as_object().expect("object") {
            body[k] = v.clone();
        }
        bad.push((patch.clone(), api.create(&body).await.status().as_u16()));
    }
    assert!(bad.iter().all(|(_, s)| *s == 400), "{bad:?}");

    let call = api.create_ok(&twilio_body()).await;
    let id = call["callId"].as_str().expect("callId");
    assert_eq!(id.len(), 36);
    let join = call["joinUrl"].as_str().expect("joinUrl");
    assert_eq!(
        join,
        format!("ws://{}/calls/{id}/join", &uv.base_url()[7..])
    );
    for k in ["joined", "ended", "endReason"] {
        assert!(call[k].is_null(), "{k}");
    }
    assert!(call["created"].is_string());
    assert_eq!(call["systemPrompt"], "You are a test.");
    assert_eq!(call["maxDuration"], "300s");
    assert_eq!(call["metadata"]["voicectl.call"], "c1");
    let (status, got) = api.get(&format!("{}/api/calls/{id}", uv.base_url())).await;
    assert_eq!((status, &got["callId"]), (200, &call["callId"]));
    {
        let st = uv.state();
        assert_eq!(st.creates.len(), 11);
        assert!(st.creates[10].violations.is_empty());
        assert_eq!(st.calls[0].medium, Medium::Twilio);
    }

    // Accepted but recorded as questionable.
    let sws = api.create_ok(
        &json!({"systemPrompt": "x", "medium": {"serverWebSocket": {"inputSampleRate": 16000}}}),
    )
    .await;
    assert!(
        sws["joinUrl"]
            .as_str()
            .expect("url")
            .ends_with("/server_web_socket")
    );
    let v = uv.state().creates[11].violations.clone();
    assert_eq!(v.len(), 2, "{v:?}");
}

#[tokio::test]
async fn ultravox_scripted_failures_and_concurrency_cap() {
    let uv = FakeUltravox::start(UltravoxOpts {
        create_failures: vec![
            CreateFailure::retry_after(429, 7),
            CreateFailure::retry_after(503, 1),
            CreateFailure::status(400),
        ],
        max_concurrent: Some(1),
        retry_after_s: 3,
        join_url: JoinUrl::Scheme("https".into()),
        ..uv_opts()
    })
    .await;
    let api = Api::new(&uv);
    let r = api.create(&twilio_body()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    let r = api.create(&twilio_body()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(api.create(&twilio_body()).await.status(), 400);
    let call = api.create_ok(&twilio_body()).await;
    assert!(
        call["joinUrl"]
            .as_str()
            .expect("url")
            .starts_with("https://")
    );
    // One call not ended yet: over the cap.
    let r = api.create(&twilio_body()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(uv.state().calls.len(), 1);
}

/// The Twilio side of a media stream, as the Twilio simulator drives it.
struct TwilioSide {
    ws: Ws,
    seq: u64,
    chunk: u64,
    sid: String,
}

impl TwilioSide {
    async fn connect(join_url: &str) -> TwilioSide {
        let (ws, _) = tokio_tungstenite::connect_async(join_url)
            .await
            .expect("join");
        TwilioSide {
            ws,
            seq: 0,
            chunk: 0,
            sid: "MZ0123456789abcdef0123456789abcdef".into(),
        }
    }

    async fn send(&mut self, mut v: Value) {
        if v["event"] != "connected" {
            self.seq += 1;
            v["sequenceNumber"] = json!(self.seq.to_string());
            v["streamSid"] = json!(self.sid);
        }
        send_json(&mut self.ws, v).await;
    }

    async fn start(&mut self) {
        self.send(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            .await;
        self.send(
            json!({"event": "start", "start": {"accountSid": "AC1", "streamSid": self.sid,
            "callSid": "CA1", "tracks": ["inbound"], "customParameters": {"k": "v"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}),
        )
        .await;
    }

    async fn media(&mut self, audio: &[u8]) {
        for frame in audio.chunks(160) {
            self.chunk += 1;
            let ts = (self.chunk - 1) * 20;
            self.send(json!({"event": "media", "media": {"track": "inbound",
                "chunk": self.chunk.to_string(), "timestamp": ts.to_string(),
                "payload": B64.encode(frame)}}))
                .await;
        }
    }

    async fn mark(&mut self, name: &str) {
        self.send(json!({"event": "mark", "mark": {"name": name}}))
            .await;
    }

    /// Agent audio up to (and including) the next mark; returns (audio, mark name).
    async fn agent_until_mark(&mut self) -> (Vec<u8>, String) {
        let mut audio = Vec::new();
        loop {
            let v = next_json(&mut self.ws).await;
            assert_eq!(v["streamSid"], self.sid.as_str(), "{v}");
            match v["event"].as_str() {
                Some("media") => {
                    assert!(v["media"].get("track").is_none());
                    audio.extend(
                        B64.decode(v["media"]["payload"].as_str().expect("payload"))
                            .expect("b64"),
                    )
                }
                Some("mark") => {
                    return (audio, v["mark"]["name"].as_str().expect("name").to_owned());
                }
                other => panic!("unexpected {other:?}: {v}"),
            }
        }
    }
}

#[tokio::test]
async fn ultravox_twilio_join_speaks_media_streams() {
    let uv = FakeUltravox::start(uv_opts()).await;
    let api = Api::new(&uv);
    let call = api.create_ok(&twilio_body()).await;
    let id = call["callId"].as_str().expect("id").to_owned();
    // Not joined yet: data messages are refused.
    assert_eq!(api.data_message(&id, json!({"type": "hang_up"})).await, 422);
    let mut tw = TwilioSide::connect(call["joinUrl"].as_str().expect("url")).await;
    tw.start().await;
    let (greeting, mark) = tw.agent_until_mark().await;
    assert_eq!(greeting, agent_mulaw(1, 300 * 8));
    assert_eq!(mark, "uv-1");
    tw.mark(&mark).await;

    let mut sent = caller_turn(300);
    tw.media(&sent).await;
    let (reply, mark) = tw.agent_until_mark().await;
    assert_eq!(reply, agent_mulaw(2, 400 * 8));
    // The reply is "still playing" (no echo yet): the caller barges in → clear.
    let speech = caller_speech_mulaw(100);
    tw.media(&speech).await;
    sent.extend(&speech);
    let clear = next_json(&mut tw.ws).await;
    assert_eq!(clear, json!({"event": "clear", "streamSid": tw.sid}));
    tw.mark(&mark).await; // Twilio echoes pending marks on clear.
    tw.send(json!({"event": "stop", "stop": {"accountSid": "AC1", "callSid": "CA1"}}))
        .await;
    assert_eq!(expect_close(&mut tw.ws).await, Some(1000));

    let c = uv.wait_ended(0, T).await;
    assert_eq!(c.end_reason.as_deref(), Some("hangup"));
    assert!(c.violations.is_empty(), "{:?}", c.violations);
    assert_eq!(c.caller_audio, sent);
    assert_eq!(c.agent_audio(), [greeting, reply].concat());
    assert_eq!(c.barge_ins, 1);
    assert_eq!(c.clears_sent, 1);
    assert_eq!(c.marks_echoed, vec!["uv-1", "uv-2"]);
    assert_eq!(
        c.twilio_events,
        vec!["connected", "start", "mark", "mark", "stop"]
    );
    let stream = c.stream.expect("start recorded");
    assert_eq!(stream.custom_parameters["k"], "v");
    let roles: Vec<Role> = c.messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::Agent, Role::User, Role::Agent]);
    assert_eq!(c.messages[0].text, "Hi there");
    assert_eq!(c.messages[1].text, "caller turn 1 (0.3 s)");
    uv.wait_until("socket closed", T, |s| (s.sockets_open == 0).then_some(()))
        .await;
    assert_eq!(api.data_message(&id, json!({"type": "hang_up"})).await, 422);
    // A second join of an ended call is refused.
    let again = tokio_tungstenite::connect_async(call["joinUrl"].as_str().expect("url")).await;
    assert!(again.is_err());
}

#[tokio::test]
async fn ultravox_join_timeout_and_agent_hangup() {
    let uv = FakeUltravox::start(UltravoxOpts {
        hangup_after_turns: Some(1),
        ..uv_opts()
    })
    .await;
    let api = Api::new(&uv);
    let mut unjoined = twilio_body();
    unjoined["joinTimeout"] = json!("0.2s");
    let lonely = api.create_ok(&unjoined).await;
    let mut body = twilio_body();
    body["firstSpeakerSettings"] = json!({"user": {}});
    let call = api.create_ok(&body).await;

    let mut tw = TwilioSide::connect(call["joinUrl"].as_str().expect("url")).await;
    tw.start().await;
    tw.media(&caller_turn(200)).await;
    let (reply, mark) = tw.agent_until_mark().await;
    assert_eq!(
        reply,
        agent_mulaw(1, 400 * 8),
        "user spoke first: no greeting"
    );
    tw.mark(&mark).await;
    assert_eq!(expect_close(&mut tw.ws).await, Some(1000));
    let c = uv.wait_ended(1, T).await;
    assert_eq!(c.end_reason.as_deref(), Some("agent_hangup"));

    let l = uv.wait_ended(0, T).await;
    assert_eq!(l.end_reason.as_deref(), Some("unjoined"));
    assert!(l.joined.is_none());
    let (_, got) = api
        .get(&format!(
            "{}/api/calls/{}",
            uv.base_url(),
            lonely["callId"].as_str().expect("id")
        ))
        .await;
    assert_eq!(got["endReason"], "unjoined");
    assert!(got["ended"].is_string());
}

#[tokio::test]
async fn ultravox_messages_paginate_and_data_messages() {
    let uv = FakeUltravox::start(uv_opts()).await;
    let api = Api::new(&uv);
    let call = api.create_ok(&twilio_body()).await;
    let id = call["callId"].as_str().expect("id").to_owned();
    let mut tw = TwilioSide::connect(call["joinUrl"].as_str().expect("url")).await;
    tw.start().await;
    let (_, m) = tw.agent_until_mark().await; // greeting
    tw.mark(&m).await;
    for text in ["first", "second"] {
        let status = api
            .data_message(&id, json!({"type": "user_text_message", "text": text}))
            .await;
        assert_eq!(status, 204);
        let (_, m) = tw.agent_until_mark().await;
        tw.mark(&m).await;
    }
    assert_eq!(api.data_message(&id, json!({"type": "ping"})).await, 400);
    assert_eq!(
        api.data_message("no-such-call", json!({"type": "hang_up"}))
            .await,
        404
    );
    // hang_up with a farewell: spoken, then the agent hangs up once it has played.
    assert_eq!(
        api.data_message(&id, json!({"type": "hang_up", "message": "Goodbye!"}))
            .await,
        204
    );
    let (bye, m) = tw.agent_until_mark().await;
    assert_eq!(bye, agent_mulaw(4, 300 * 8));
    tw.mark(&m).await;
    assert_eq!(expect_close(&mut tw.ws).await, Some(1000));
    let c = uv.wait_ended(0, T).await;
    assert_eq!(c.end_reason.as_deref(), Some("agent_hangup"));

    // 6 messages: greeting, (user text, reply) ×2, farewell; pages of 2 by default.
    let mut url = format!("{}/api/calls/{id}/messages", uv.base_url());
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let (status, page) = api.get(&url).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 6);
        pages += 1;
        all.extend(page["results"].as_array().expect("results").clone());
        match page["next"].as_str() {
            Some(next) => url = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let texts: Vec<&str> = all
        .iter()
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(
        texts,
        [
            "Hi there",
            "first",
            "Fake Ultravox reply 1.",
            "second",
            "Fake Ultravox reply 2.",
            "Goodbye!"
        ]
    );
    assert_eq!(all[1]["role"], "MESSAGE_ROLE_USER");
    assert_eq!(all[1]["medium"], "MESSAGE_MEDIUM_TEXT");
    assert_eq!(all[0]["role"], "MESSAGE_ROLE_AGENT");
    assert_eq!(all[0]["medium"], "MESSAGE_MEDIUM_VOICE");
    for m in &all {
        for k in ["start", "end"] {
            let d = m["timespan"][k].as_str().expect("timespan");
            assert!(parse_proto_duration(d).is_some(), "{d}");
        }
    }
    let (status, page) = api
        .get(&format!(
            "{}/api/calls/{id}/messages?pageSize=5",
            uv.base_url()
        ))
        .await;
    assert_eq!(
        (status, page["results"].as_array().map(Vec::len)),
        (200, Some(2)),
        "pageSize is capped"
    );
    let (status, _) = api
        .get(&format!(
            "{}/api/calls/{id}/messages?cursor=garbage",
            uv.base_url()
        ))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn ultravox_server_websocket_medium() {
    let uv = FakeUltravox::start(UltravoxOpts {
        reply_ms: 3000,
        ..uv_opts()
    })
    .await;
    let api = Api::new(&uv);
    let call = api
        .create_ok(
            &json!({"systemPrompt": "x", "voice": "Mark", "firstSpeakerSettings": {"agent": {}},
            "medium": {"serverWebSocket": {"inputSampleRate": 8000, "outputSampleRate": 8000,
                "clientBufferSizeMs": 30000}}}),
        )
        .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(call["joinUrl"].as_str().expect("url"))
        .await
        .expect("join");
    let started = next_json(&mut ws).await;
    assert_eq!(
        started,
        json!({"type": "call_started", "callId": call["callId"]})
    );

    // Greeting: state speaking, PCM, agent transcript deltas then final.
    let mut pcm = Vec::new();
    let mut data = Vec::new();
    loop {
        match next_msg(&mut ws).await.expect("message") {
            Message::Binary(b) => pcm.extend_from_slice(&b),
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                let fin = v["type"] == "transcript" && v["final"] == true;
                data.push(v);
                if fin {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pcm, agent_pcm_bytes(1, 300 * 8));
    assert_eq!(data[0], json!({"type": "state", "state": "listening"}));
    assert_eq!(data[1], json!({"type": "state", "state": "speaking"}));
    let deltas: String = data
        .iter()
        .filter(|v| v["type"] == "transcript" && v["final"] == false)
        .map(|v| {
            assert!(v["text"].is_null());
            v["delta"].as_str().expect("delta")
        })
        .collect();
    let fin = data.last().expect("final");
    assert_eq!(deltas, "Hello from the fake Ultravox");
    assert_eq!(fin["text"], deltas);
    assert_eq!(
        (&fin["role"], &fin["ordinal"]),
        (&json!("agent"), &json!(1))
    );

    // A caller turn in s16le PCM at once: the greeting is still playing at the client (real
    // time), so that is a barge-in; then a second one while the reply is still streaming.
    let to_bytes = |s: Vec<i16>| -> Vec<u8> { s.into_iter().flat_map(i16::to_le_bytes).collect() };
    let mut turn = to_bytes(tone_pcm(300.0, 8000.0, 0, 300 * 8));
    turn.extend(vec![0u8; 420 * 16]);
    for frame in turn.chunks(320) {
        ws.send(Message::Binary(frame.to_vec().into()))
            .await
            .expect("send");
    }
    send_json(&mut ws, json!({"type": "ping", "timestamp": 12.5})).await;
    let mut saw = Vec::new();
    let mut reply_bytes = 0;
    loop {
        match next_msg(&mut ws).await.expect("message") {
            Message::Binary(b) => {
                reply_bytes += b.len();
                if reply_bytes >= 3200 && !saw.contains(&"barge".to_owned()) {
                    let speech = to_bytes(tone_pcm(300.0, 8000.0, 0, 100 * 8));
                    ws.send(Message::Binary(speech.into())).await.expect("send");
                    saw.push("barge".into());
                }
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["type"] == "transcript" && v["role"] == "user" {
                    assert_eq!(v["text"], "caller turn 1 (0.3 s)");
                    assert_eq!(v["final"], true);
                }
                if v["type"] == "pong" {
                    assert_eq!(v["timestamp"], 12.5);
                }
                let ty = v["type"].as_str().expect("type").to_owned();
                saw.push(ty.clone());
                if ty == "playback_clear_buffer" && saw.contains(&"barge".to_owned()) {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    for want in ["pong", "transcript", "state", "playback_clear_buffer"] {
        assert!(saw.contains(&want.to_owned()), "{want} not in {saw:?}");
    }
    assert!(reply_bytes < 3000 * 16, "reply cut short");
    send_json(&mut ws, json!({"type": "hang_up", "message": ""})).await;
    assert_eq!(expect_close(&mut ws).await, Some(1000));
    let c = uv.wait_ended(0, T).await;
    assert_eq!(c.end_reason.as_deref(), Some("agent_hangup"));
    assert_eq!(c.barge_ins, 2);
    assert!(!c.utterances[0].interrupted && c.utterances[1].interrupted);
    assert!(c.violations.is_empty(), "{:?}", c.violations);
    assert!(matches!(c.close, Some(SocketClose::ByServer(1000, _))));
    assert_eq!(&c.caller_audio[..turn.len()], &turn[..]);
}

#[tokio::test]
async fn ultravox_max_duration_and_drop() {
    let uv = FakeUltravox::start(uv_opts()).await;
    let api = Api::new(&uv);
    let mut short = twilio_body();
    short["maxDuration"] = json!("0.3s");
    short["firstSpeakerSettings"] = json!({"user": {}});
    let call = api.create_ok(&short).await;
    let mut other = twilio_body();
    other["maxDuration"] = json!("999999999999s"); // absurd, but valid: must not crash
    let other = api.create_ok(&other).await;

    let mut tw = TwilioSide::connect(call["joinUrl"].as_str().expect("url")).await;
    tw.start().await;
    assert_eq!(expect_close(&mut tw.ws).await, Some(1000));
    let c = uv.wait_ended(0, T).await;
    assert_eq!(c.end_reason.as_deref(), Some("timeout"));

    let mut tw = TwilioSide::connect(other["joinUrl"].as_str().expect("url")).await;
    tw.start().await;
    let _greeting = tw.agent_until_mark().await;
    assert_eq!(uv.sockets_open(), 1);
    drop(uv);
    assert_eq!(expect_close(&mut tw.ws).await, Some(1001));
}

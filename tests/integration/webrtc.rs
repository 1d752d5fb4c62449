//! Browser calls (SPEC §9) with a simulated browser: a str0m peer on loopback sends Opus and
//! receives the agent's audio through `POST /api/v1/web-calls`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use voicectl::audio::opus;

use test_fakes::realtime::{FakeRealtime, RealtimeOpts};

use crate::support::{Install, Server};

const EXTRA: &str = "[agent]\nengine = \"scripted\"\n\n[webrtc]\nudp_port = 0\npublic_ip = \"127.0.0.1\"\nmax_calls = 2\n";

fn setup() -> (Install, Server, String) {
    let install = Install::with_extra(EXTRA);
    install.init();
    install.ok(&["tenant", "add", "acme"]);
    let k = install.json(&["key", "create", "--tenant", "acme"]);
    let key = k["key"].as_str().unwrap().to_owned();
    let server = Server::start(&install);
    (install, server, key)
}

/// A client peer: its `Rtc`, socket and offer.
struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    addr: SocketAddr,
    mid: Option<str0m::media::Mid>,
    /// The next RTP timestamp the caller sends (48 kHz ticks).
    rtp: u64,
}

async fn peer() -> (Peer, String, str0m::change::SdpPendingOffer) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut rtc = Rtc::builder()
        .set_crypto_provider(std::sync::Arc::new(str0m::crypto::from_feature_flags()))
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    (
        Peer {
            rtc,
            socket,
            addr,
            mid: None,
            rtp: 0,
        },
        offer.to_sdp_string(),
        pending,
    )
}

async fn post_offer(
    server: &Server,
    key: &str,
    sdp: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new()
        .post(server.url("/api/v1/web-calls"))
        .bearer_auth(key)
        .header("content-type", "application/sdp")
        .body(sdp.to_owned())
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let h = r.headers().clone();
    (st, h, r.text().await.unwrap())
}

async fn get_json(server: &Server, key: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs the client peer until `want_loud` frames of agent audio were heard or `deadline`: once
/// connected the caller speaks (a 300 Hz tone, 20 ms at a time). Returns when the first loud
/// frame arrived (after `since`) and how many did.
async fn converse(
    p: &mut Peer,
    since: Instant,
    deadline: Instant,
    want_loud: usize,
) -> (Option<Duration>, usize) {
    let mut enc = opus::Encoder::new().unwrap();
    let mut dec = opus::Decoder::new().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut first_audio = None;
    let mut loud_frames = 0;
    let mut next_send = Instant::now();
    let mut packet = Vec::new();
    while Instant::now() < deadline && loud_frames < want_loud {
        let timeout = loop {
            match p.rtc.poll_output().unwrap() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    p.socket.send_to(&t.contents, t.destination).await.unwrap();
                }
                Output::Event(Event::MediaAdded(m)) => p.mid = Some(m.mid),
                Output::Event(Event::MediaData(d)) => {
                    let pcm = dec.decode(&d.data).unwrap();
                    let level = pcm.iter().map(|s| s.unsigned_abs() as u64).sum::<u64>()
                        / pcm.len().max(1) as u64;
                    if level > 100 {
                        first_audio.get_or_insert(since.elapsed());
                        loud_frames += 1;
                    }
                }
                Output::Event(_) => {}
            }
        };
        let now = Instant::now();
        if p.rtc.is_connected()
            && now >= next_send
            && let Some(m) = p.mid
        {
            let pcm: Vec<i16> = (0..opus::FRAME_SAMPLES)
                .map(|i| {
                    let t = (p.rtp / 6 + i as u64) as f64 / 8000.0;
                    (6000.0 * (2.0 * std::f64::consts::PI * 300.0 * t).sin()) as i16
                })
                .collect();
            enc.encode(&pcm, &mut packet).unwrap();
            let w = p.rtc.writer(m).unwrap();
            let pt = w.payload_params().next().unwrap().pt();
            w.write(
                pt,
                now,
                MediaTime::new(p.rtp, Frequency::FORTY_EIGHT_KHZ),
                packet.clone(),
            )
            .unwrap();
            p.rtp += opus::FRAME_TICKS;
            next_send += Duration::from_millis(20);
            continue;
        }
        let wait = timeout
            .min(next_send.max(now + Duration::from_millis(1)))
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        let input = match tokio::time::timeout(wait, p.socket.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => Input::Receive(
                Instant::now(),
                Receive {
                    proto: Protocol::Udp,
                    source: from,
                    destination: p.addr,
                    contents: buf[..n].try_into().unwrap(),
                },
            ),
            _ => Input::Timeout(Instant::now()),
        };
        p.rtc.handle_input(input).unwrap();
    }
    (first_audio, loud_frames)
}

async fn wait_status(server: &Server, key: &str, id: &str, want: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let call = get_json(server, key, &format!("/api/v1/calls/{id}")).await;
        if call["status"] == want || Instant::now() > until {
            return call;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_simulated_browser_talks_to_the_agent() {
    let (_install, server, key) = setup();
    let (mut p, offer, pending) = peer().await;
    // Every candidate we offer and are answered is loopback.
    assert!(
        offer
            .lines()
            .filter(|l| l.starts_with("a=candidate"))
            .all(|l| l.contains("127.0.0.1"))
    );
    let (st, headers, answer) = post_offer(&server, &key, &offer).await;
    assert_eq!(st, 201, "{answer}");
    assert_eq!(headers["content-type"], "application/sdp");
    let location = headers["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/api/v1/web-calls/"));
    let id = location.rsplit('/').next().unwrap().to_owned();
    let cands: Vec<&str> = answer
        .lines()
        .filter(|l| l.starts_with("a=candidate"))
        .collect();
    assert!(
        !cands.is_empty() && cands.iter().all(|l| l.contains("127.0.0.1")),
        "{answer}"
    );
    assert!(answer.contains("a=ice-lite"), "{answer}");
    p.rtc
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();

    let answered = Instant::now();
    let (first_audio, loud_frames) =
        converse(&mut p, answered, answered + Duration::from_secs(8), 25).await;
    let first = first_audio.expect("agent audio reached the browser");
    eprintln!("agent audio at the browser {first:?} after the answer");
    assert!(loud_frames >= 25, "{loud_frames} frames of agent audio");

    let call = get_json(&server, &key, &format!("/api/v1/calls/{id}")).await;
    assert_eq!(call["direction"], "web", "{call}");
    assert_eq!(call["status"], "in_progress", "{call}");

    let r = reqwest::Client::new()
        .delete(server.url(&location))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let status =
        wait_status(&server, &key, &id, "completed", Duration::from_secs(5)).await["status"]
            .clone();
    assert_eq!(status, "completed");
    let t = get_json(&server, &key, &format!("/api/v1/calls/{id}/transcript")).await;
    assert!(
        t["entries"].as_array().is_some_and(|e| !e.is_empty()),
        "{t}"
    );
}

#[tokio::test]
async fn bad_offers_are_refused_and_create_nothing() {
    let (_install, server, key) = setup();
    let (st, _, body) = post_offer(&server, &key, "v=0\r\nthis is not sdp").await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("invalid_request"), "{body}");
    // An offer with only a data channel: no audio.
    let mut rtc = Rtc::builder()
        .set_crypto_provider(std::sync::Arc::new(str0m::crypto::from_feature_flags()))
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host("127.0.0.1:9".parse().unwrap(), "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_channel("chat".into());
    let (offer, _) = api.apply().unwrap();
    let (st, _, body) = post_offer(&server, &key, &offer.to_sdp_string()).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("audio"), "{body}");
    let calls = get_json(&server, &key, "/api/v1/calls").await;
    assert_eq!(calls["calls"].as_array().map(Vec::len), Some(0), "{calls}");
}

#[tokio::test]
async fn another_tenants_web_call_is_404() {
    let (install, server, key) = setup();
    install.ok(&["tenant", "add", "other"]);
    let k = install.json(&["key", "create", "--tenant", "other"]);
    let other = k["key"].as_str().unwrap().to_owned();
    let (_p, offer, _pending) = peer().await;
    let (st, h, _) = post_offer(&server, &key, &offer).await;
    assert_eq!(st, 201);
    let location = h["location"].to_str().unwrap().to_owned();
    let r = reqwest::Client::new()
        .delete(server.url(&location))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

/// A browser that vanishes (the tab closed, the laptop lid shut: no packets, no goodbye) ends
/// its call `completed` with the reason `peer_timeout` once `peer_timeout` has passed, and the
/// engine session is closed, not left running.
#[tokio::test]
async fn a_browser_that_vanishes_ends_the_call_and_its_engine_session() {
    let rt = FakeRealtime::start(RealtimeOpts {
        greeting_ms: 400,
        reply_ms: 400,
        ..Default::default()
    })
    .await;
    let install = Install::with_extra(&format!(
        "[agent]\nengine = \"openai-realtime\"\n\n[openai]\nrealtime_url = {:?}\napi_key = {:?}\n\n\
         [webrtc]\nudp_port = 0\npublic_ip = \"127.0.0.1\"\npeer_timeout = \"1s\"\n",
        rt.url(),
        rt.opts().api_key
    ));
    install.init();
    install.ok(&["tenant", "add", "acme"]);
    let k = install.json(&["key", "create", "--tenant", "acme"]);
    let key = k["key"].as_str().unwrap().to_owned();
    let server = Server::start(&install);

    let (mut p, offer, pending) = peer().await;
    let (st, headers, answer) = post_offer(&server, &key, &offer).await;
    assert_eq!(st, 201, "{answer}");
    let id = headers["location"]
        .to_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    p.rtc
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    let now = Instant::now();
    let (first, _) = converse(&mut p, now, now + Duration::from_secs(8), 5).await;
    assert!(first.is_some(), "the greeting reached the browser");
    rt.wait_session(0, Duration::from_secs(2)).await;
    assert_eq!(rt.open_sessions(), 1);
    // The browser vanishes.
    drop(p);
    let call = wait_status(&server, &key, &id, "completed", Duration::from_secs(6)).await;
    assert_eq!(call["status"], "completed", "{call}");
    assert_eq!(call["end_reason"], "peer_timeout", "{call}");
    rt.wait_all_closed(Duration::from_secs(3)).await;
}

async fn post_json(server: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// Offers `sdp` through a public link, with no key.
async fn talk(server: &Server, path: &str, sdp: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/sdp")
        .body(sdp.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A tenant's public link (SPEC §9): anyone may open `/talk/<token>` and call the agent with
/// no key, a few calls a minute per address; the call is the tenant's, with the link's
/// maximum duration. Deleted or expired links open nothing; bad requests change nothing.
#[tokio::test]
async fn a_web_link_lets_anyone_talk_a_few_times_a_minute_until_it_expires() {
    let install = Install::with_extra(
        "[agent]\nengine = \"scripted\"\n\n[webrtc]\nudp_port = 0\npublic_ip = \"127.0.0.1\"\n\
         max_calls = 10\n\n[limits]\ntalk_calls_per_minute_per_ip = 2\n",
    );
    install.init();
    install.ok(&["tenant", "add", "acme"]);
    install.ok(&["tenant", "add", "other"]);
    let key = install.json(&["key", "create", "--tenant", "acme"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = install.json(&["key", "create", "--tenant", "other"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let server = Server::start(&install);

    for bad in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "site", "max_duration": "48h"}),
        json!({"name": "site", "expires": "soon"}),
        json!({"name": "site", "extra": 1}),
    ] {
        let (st, v) = post_json(&server, &key, "/api/v1/web-links", bad.clone()).await;
        assert_eq!(st, 400, "{bad}: {v}");
    }
    let (st, link) = post_json(
        &server,
        &key,
        "/api/v1/web-links",
        json!({"name": "website", "max_duration": "2m", "expires": "30d"}),
    )
    .await;
    assert_eq!(st, 201, "{link}");
    let url = link["url"].as_str().unwrap();
    let path = &url[url.find("/talk/").unwrap()..];
    let listed = get_json(&server, &key, "/api/v1/web-links").await;
    assert_eq!(
        listed["web_links"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert!(
        !listed.to_string().contains("tk_"),
        "tokens are never listed: {listed}"
    );

    let page = reqwest::get(server.url(path)).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("talk-link-start"));

    // Two calls from this address; the third is refused.
    for _ in 0..2 {
        let (_p, offer, _pending) = peer().await;
        let (st, answer) = talk(&server, path, &offer).await;
        assert_eq!(st, 201, "{answer}");
        assert!(answer.contains("a=ice-lite"), "{answer}");
    }
    let (_p, offer, _pending) = peer().await;
    let (st, body) = talk(&server, path, &offer).await;
    assert_eq!(st, 429, "{body}");
    let calls = get_json(&server, &key, "/api/v1/calls").await;
    let calls = calls["calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.iter().all(|c| c["direction"] == "web"));
    let theirs = get_json(&server, &other, "/api/v1/calls").await;
    assert_eq!(
        theirs["calls"].as_array().map(Vec::len),
        Some(0),
        "{theirs}"
    );

    // Another tenant cannot delete it; the owner can, and then it opens nothing.
    let id = link["id"].as_str().unwrap();
    let del = |k: String| {
        let u = server.url(&format!("/api/v1/web-links/{id}"));
        async move {
            reqwest::Client::new()
                .delete(u)
                .bearer_auth(k)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(del(other.clone()).await, 404);
    assert_eq!(del(key.clone()).await, 204);
    assert_eq!(
        reqwest::get(server.url(path))
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );

    // An expired link opens nothing either.
    let (_, link) = post_json(
        &server,
        &key,
        "/api/v1/web-links",
        json!({"name": "campaign", "expires": "1h"}),
    )
    .await;
    let url = link["url"].as_str().unwrap();
    let path = url[url.find("/talk/").unwrap()..].to_owned();
    let db = rusqlite::Connection::open(install.data_dir.join("voicectl.db")).unwrap();
    db.execute(
        "UPDATE web_links SET expires_at = 1 WHERE id = ?1",
        [link["id"].as_str().unwrap()],
    )
    .unwrap();
    assert_eq!(
        reqwest::get(server.url(&path))
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    let (_p, offer, _pending) = peer().await;
    assert_eq!(talk(&server, &path, &offer).await.0, 404);
    let calls = get_json(&server, &key, "/api/v1/calls").await;
    assert_eq!(calls["calls"].as_array().map(Vec::len), Some(2));
}

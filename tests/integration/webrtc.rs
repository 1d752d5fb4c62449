//! Browser calls (SPEC §9) with a simulated browser: a str0m peer on loopback sends Opus and
//! receives the agent's audio through `POST /api/v1/web-calls`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use str0m::change::SdpAnswer;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use voicectl::audio::opus;

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
    (Peer { rtc, socket, addr }, offer.to_sdp_string(), pending)
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

    let mut enc = opus::Encoder::new().unwrap();
    let mut dec = opus::Decoder::new().unwrap();
    let mut mid = None;
    let mut buf = vec![0u8; 2048];
    let answered = Instant::now();
    let mut first_audio = None;
    let mut loud_frames = 0;
    let mut next_send = Instant::now();
    let mut rtp = 0u64;
    let mut packet = Vec::new();
    let deadline = answered + Duration::from_secs(8);
    while Instant::now() < deadline && loud_frames < 25 {
        let timeout = loop {
            match p.rtc.poll_output().unwrap() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    p.socket.send_to(&t.contents, t.destination).await.unwrap();
                }
                Output::Event(Event::MediaAdded(m)) => mid = Some(m.mid),
                Output::Event(Event::MediaData(d)) => {
                    let pcm = dec.decode(&d.data).unwrap();
                    let level = pcm.iter().map(|s| s.unsigned_abs() as u64).sum::<u64>()
                        / pcm.len().max(1) as u64;
                    if level > 100 {
                        first_audio.get_or_insert(answered.elapsed());
                        loud_frames += 1;
                    }
                }
                Output::Event(_) => {}
            }
        };
        let now = Instant::now();
        // The caller speaks: a 300 Hz tone, 20 ms at a time.
        if p.rtc.is_connected()
            && now >= next_send
            && let Some(m) = mid
        {
            let pcm: Vec<i16> = (0..opus::FRAME_SAMPLES)
                .map(|i| {
                    let t = (rtp / 6 + i as u64) as f64 / 8000.0;
                    (6000.0 * (2.0 * std::f64::consts::PI * 300.0 * t).sin()) as i16
                })
                .collect();
            enc.encode(&pcm, &mut packet).unwrap();
            let w = p.rtc.writer(m).unwrap();
            let pt = w.payload_params().next().unwrap().pt();
            w.write(
                pt,
                now,
                MediaTime::new(rtp, Frequency::FORTY_EIGHT_KHZ),
                packet.clone(),
            )
            .unwrap();
            rtp += opus::FRAME_TICKS;
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
    let until = Instant::now() + Duration::from_secs(5);
    let mut status = Value::Null;
    while Instant::now() < until {
        status = get_json(&server, &key, &format!("/api/v1/calls/{id}")).await["status"].clone();
        if status == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

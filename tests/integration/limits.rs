//! Listener limits (SPEC §10, `[limits]`): connection caps at accept time, the deadline for a
//! request head (TLS handshake and protocol detection included), idle and body deadlines.
//! Small limits in the config keep these quick; every wait is for an event (EOF), bounded.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Install, Server};

fn server_with(limits: &str) -> (Install, Server) {
    let i = Install::with_extra(&format!("\n[limits]\n{limits}\n"));
    let s = Server::start(&i);
    (i, s)
}

/// Reads until the server closes (EOF or reset); returns how long that took, None if the
/// connection was still open after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.ok().map(|_| start.elapsed())
}

/// `GET path` from the local address `from` (any 127.0.0.0/8 address is ours on Linux).
async fn raw_get_from(from: &str, to: std::net::SocketAddr, path: &str) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn health_ok(server: &Server) {
    let r = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn metrics(server: &Server) -> String {
    reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn refused(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("voicectl_connections_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_capped_per_ip_and_closed_at_the_head_deadline() {
    let (_i, server) = tokio::task::block_in_place(|| {
        server_with("max_connections_per_ip = 4\nheader_timeout = \"3s\"")
    });
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // The fifth from the same address is over the cap: closed at once, before any read.
    let mut over = TcpStream::connect(server.addr).await.unwrap();
    let t = closed_within(&mut over, Duration::from_secs(10))
        .await
        .expect("over-cap connection closed");
    assert!(t < Duration::from_secs(2), "closed only after {t:?}");
    // Meanwhile another address is served as usual.
    let other = raw_get_from("127.0.0.2", server.addr, "/health").await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");

    // The silent ones are dropped at the head deadline, not held for ever.
    for s in &mut silent {
        closed_within(s, Duration::from_secs(15))
            .await
            .expect("silent connection closed by the head deadline");
    }
    let all = opened.elapsed();
    assert!(
        all >= Duration::from_millis(2500),
        "closed too early: {all:?}"
    );

    // Slots are free again: a normal request works, and the refusals are counted.
    health_ok(&server).await;
    let m = metrics(&server).await;
    assert_eq!(refused(&m, "per_ip"), 1, "{m}");
    assert_eq!(refused(&m, "head_timeout"), 4, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_global_cap_refuses_at_accept_and_a_request_works_after() {
    let (_i, server) = tokio::task::block_in_place(|| {
        server_with("max_connections = 3\nmax_connections_per_ip = 3\nheader_timeout = \"10s\"")
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut over = TcpStream::connect(server.addr).await.unwrap();
    let t = closed_within(&mut over, Duration::from_secs(5))
        .await
        .expect("over the global cap: closed");
    assert!(t < Duration::from_secs(2), "closed only after {t:?}");
    drop(held);
    // The server notices the closes as soon as it polls them; retry briefly until it has.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match reqwest::get(server.url("/health")).await {
            Ok(r) if r.status() == 200 => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("no slot came free: {other:?}"),
        }
    }
    let m = metrics(&server).await;
    assert!(refused(&m, "global") >= 1, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_is_closed_at_the_head_deadline() {
    let (_i, server) = tokio::task::block_in_place(|| server_with("header_timeout = \"2s\""));
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    // One header byte every 200 ms: never a complete head.
    let closed = loop {
        if s.write_all(b"X").await.is_err() {
            break true;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
        if start.elapsed() > Duration::from_secs(12) {
            break false;
        }
    };
    assert!(closed, "a trickled head was still open after 12 s");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    health_ok(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_http2_connection_is_closed_at_the_head_deadline() {
    let (_i, server) = tokio::task::block_in_place(|| server_with("header_timeout = \"2s\""));
    // The HTTP/2 preface selects h2 (protocol detection is over); no request ever follows.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let t = closed_within(&mut s, Duration::from_secs(12))
        .await
        .expect("silent h2 connection closed");
    assert!(t < Duration::from_secs(6), "{t:?}");
    // Two bytes, then nothing: stuck in protocol detection, closed the same way.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"PR").await.unwrap();
    let t = closed_within(&mut s, Duration::from_secs(12))
        .await
        .expect("connection stuck in protocol detection closed");
    assert!(t < Duration::from_secs(6), "{t:?}");
    health_ok(&server).await;
}

/// One HTTP/2 frame as read off the wire: (type, flags, payload).
async fn h2_frame(s: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;

#[tokio::test(flavor = "multi_thread")]
async fn http2_limits_take_effect_a_peer_that_ignores_pings_is_closed() {
    let (_i, server) = tokio::task::block_in_place(|| {
        server_with(
            "http2_keepalive_interval = \"1s\"\nhttp2_keepalive_timeout = \"1s\"\n\
             http2_max_streams = 7\nidle_timeout = \"60s\"\nheader_timeout = \"30s\"",
        )
    });
    // Hand-written frames: the point is a peer that misbehaves, which a client library won't.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend([0, 0, 0, H2_SETTINGS, 0, 0, 0, 0, 0]);
    // GET /health on stream 1 (HPACK: :method GET, :scheme http, :path /health, :authority x).
    let block: Vec<u8> = [&[0x82u8, 0x86, 0x44, 7][..], b"/health", &[0x41, 1], b"x"].concat();
    hello.extend([0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
    hello.extend(&block);
    s.write_all(&hello).await.unwrap();
    let started = Instant::now();
    let mut max_streams = None;
    let mut pinged = None;
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some((kind, flags, payload)) = h2_frame(&mut s).await {
            match kind {
                H2_SETTINGS if flags & 1 == 0 => {
                    for p in payload.chunks_exact(6) {
                        if u16::from_be_bytes([p[0], p[1]]) == 0x3 {
                            max_streams = Some(u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
                        }
                    }
                    // Acknowledged, so only the unanswered pings can end the connection.
                    s.write_all(&[0, 0, 0, H2_SETTINGS, 1, 0, 0, 0, 0])
                        .await
                        .unwrap();
                }
                H2_PING if flags & 1 == 0 => {
                    pinged.get_or_insert(started.elapsed());
                }
                H2_GOAWAY => return started.elapsed(),
                _ => {}
            }
        }
        started.elapsed()
    })
    .await
    .expect("a peer that never answers pings is closed");
    assert_eq!(max_streams, Some(7), "http2_max_streams is advertised");
    let pinged = pinged.expect("the idle peer was pinged");
    assert!(
        pinged < Duration::from_secs(4),
        "first ping after {pinged:?}"
    );
    assert!(
        closed >= pinged + Duration::from_millis(900),
        "closed {closed:?}, before the keep-alive timeout ran from the ping at {pinged:?}"
    );
    health_ok(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_and_stalled_bodies_are_closed() {
    let (_i, server) = tokio::task::block_in_place(|| {
        server_with("idle_timeout = \"1s\"\nbody_timeout = \"1s\"\nheader_timeout = \"5s\"")
    });
    // One request, then silence: closed after the idle limit.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let t = closed_within(&mut s, Duration::from_secs(10))
        .await
        .expect("idle keep-alive closed");
    assert!(t < Duration::from_secs(4), "{t:?}");

    // A body promised but never sent: the request fails at the body deadline, the
    // connection does not hang.
    // (/twilio/voice reads the form before it can check the signature over it.)
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 500\r\n\r\nCallSid=CA",
    )
    .await
    .unwrap();
    let t = closed_within(&mut s, Duration::from_secs(10))
        .await
        .expect("stalled body ends the request");
    assert!(
        t >= Duration::from_millis(900),
        "ended before the deadline: {t:?}"
    );
    assert!(t < Duration::from_secs(5), "{t:?}");
}

mod tls {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_silent_tls_connection_is_closed_at_the_head_deadline() {
        let port = free_port();
        let i = Install::new();
        let cert = rcgen::generate_simple_self_signed(vec!["voice.test".to_owned()]).expect("cert");
        let cert_path = i.dir.path().join("cert.pem");
        let key_path = i.dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        std::fs::write(
            &i.config,
            format!(
                "[server]\ndomain = \"voice.test\"\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\n\
                 http_listen = \"\"\nhttps_listen = \"127.0.0.1:{port}\"\ndrain_timeout = \"5s\"\n\n\
                 [tls]\nmode = \"manual\"\ncert_file = {cert_path:?}\nkey_file = {key_path:?}\n\n\
                 [limits]\nheader_timeout = \"2s\"\n",
                i.data_dir
            ),
        )
        .unwrap();
        let server = tokio::task::block_in_place(|| Server::start(&i));
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let t = closed_within(&mut s, Duration::from_secs(12))
            .await
            .expect("silent TLS connection closed");
        assert!(t < Duration::from_secs(6), "{t:?}");
        // A half-sent ClientHello does not extend it either.
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let t = closed_within(&mut s, Duration::from_secs(12))
            .await
            .expect("stalled handshake closed");
        assert!(t < Duration::from_secs(6), "{t:?}");
        health_ok(&server).await;
    }
}

mod media {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    const TOKEN: &str = "tok";

    fn server() -> (Install, Server) {
        let i = Install::with_extra(&format!("\n[twilio]\nauth_token = \"{TOKEN}\"\n"));
        let s = Server::start(&i);
        (i, s)
    }

    fn signature(server: &Server) -> String {
        voicectl::telephony::twilio::signature::compute(
            TOKEN,
            &format!("ws://{}/twilio/media", server.addr),
            &[],
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_1mib_media_frame_is_refused_from_its_header() {
        let (_i, server) = tokio::task::block_in_place(server);
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let req = format!(
            "GET /twilio/media HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Twilio-Signature: {}\r\n\r\n",
            server.addr,
            signature(&server)
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        // A masked text frame announcing 1 MiB; only 64 bytes of it ever follow.
        let mut frame = vec![0x81u8, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend_from_slice(&[b'a'; 64]);
        s.write_all(&frame).await.unwrap();
        let t = closed_within(&mut s, Duration::from_secs(10))
            .await
            .expect("refused without waiting for the payload");
        assert!(t < Duration::from_secs(5), "{t:?}");
        health_ok(&server).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_client_that_keeps_sending_still_sees_1008() {
        let (_i, server) = tokio::task::block_in_place(server);
        let mut req = format!("ws://{}/twilio/media", server.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("x-twilio-signature", signature(&server).parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        // Not a `start`: the server refuses the stream with 1008 … while this client has
        // already sent more frames behind it (as a phone streaming audio would), which the
        // server has not read when it decides to close.
        ws.feed(Message::text("{\"event\":\"nonsense\"}"))
            .await
            .unwrap();
        let frame = format!(
            "{{\"event\":\"media\",\"media\":{{\"payload\":\"{}\"}}}}",
            "A".repeat(2000)
        );
        for _ in 0..300 {
            ws.feed(Message::text(frame.clone())).await.unwrap();
        }
        ws.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The phone keeps streaming: the connection must not have been reset under it
        // (a reset is what the peer reports as 1006) …
        ws.send(Message::text(frame.clone()))
            .await
            .expect("the server reset the connection instead of closing it");
        // … and our close frame, with its code, is there to read.
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
                    Ok(Message::Close(None)) => return None,
                    Ok(_) => continue,
                    Err(e) => panic!("connection ended without a close frame: {e}"),
                }
            }
            None
        })
        .await
        .expect("closed in time");
        assert_eq!(code, Some(1008));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rejected_signature_is_logged_without_the_query_string() {
        let (_i, server) = tokio::task::block_in_place(server);
        let r = reqwest::Client::new()
            .post(server.url("/twilio/voice?token=s3cr3t-in-query"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", "forged")
            .body("CallSid=CA1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        // The warning is written before the 403 leaves; wait for it, bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut logs = Vec::new();
        while !logs
            .iter()
            .any(|l: &String| l.contains("bad or missing signature"))
        {
            assert!(Instant::now() < deadline, "no rejection logged: {logs:?}");
            match server.logs.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => logs.push(l),
                Err(_) => continue,
            }
        }
        logs.extend(server.drain_logs());
        let all = logs.join("\n");
        assert!(all.contains("/twilio/voice"), "{all}");
        assert!(
            !all.contains("s3cr3t"),
            "a query string reached the logs:\n{all}"
        );
    }
}

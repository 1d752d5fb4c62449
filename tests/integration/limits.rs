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

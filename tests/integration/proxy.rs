//! The built-in reverse proxy and static site, through the real router on a real socket,
//! against upstreams started here (axum, or raw TCP where the bytes themselves matter).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use voicectl::api::{AppState, app};
use voicectl::config::{Config, ProxyRoute};
use voicectl::proxy::{ProxyTable, Timeouts};
use voicectl::store::Store;

const MB: usize = 1024 * 1024;

/// Aborts the task on drop, so servers end with their test.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// voicectl's real router on 127.0.0.1:0 with these `[[proxy]]` routes.
struct Edge {
    addr: SocketAddr,
    state: AppState,
    _task: Task,
    _dir: tempfile::TempDir,
}

impl Edge {
    async fn start(routes: Vec<ProxyRoute>, trusted: &[&str]) -> Edge {
        Self::start_with(routes, trusted, |_| {}).await
    }

    async fn start_with(
        routes: Vec<ProxyRoute>,
        trusted: &[&str],
        tweak: impl FnOnce(&mut Config),
    ) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        let mut cfg = Config::dev();
        tweak(&mut cfg);
        cfg.proxy = routes;
        cfg.server.trusted_proxies = trusted.iter().map(|s| s.to_string()).collect();
        cfg.validate().unwrap();
        let state = AppState::new(store, Arc::new(cfg));
        let router = app(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        Edge {
            addr,
            state,
            _task: Task(task),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn to(path: &str, upstream: SocketAddr) -> ProxyRoute {
    to_url(None, path, &format!("http://{upstream}"))
}

fn to_url(host: Option<&str>, path: &str, url: &str) -> ProxyRoute {
    ProxyRoute {
        host: host.map(str::to_owned),
        path: path.into(),
        upstream: Some(url.into()),
        root: None,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Gates that let a test observe streaming without sleeping.
#[derive(Clone, Default)]
struct Gates {
    release: Arc<Notify>,
    first_chunk: Option<mpsc::UnboundedSender<usize>>,
}

/// An axum upstream named `name`: echoes what it received, streams, redirects, fails on
/// request, speaks WebSocket.
async fn upstream(name: &'static str, gates: Gates) -> (SocketAddr, Task) {
    let echo = move |req: Request| async move {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        Json(json!({
            "name": name,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": header_json(&parts.headers),
            "body_len": body.len(),
        }))
    };
    let router = Router::new()
        .route("/big", get(|| async { Body::from_stream(chunks(20 * MB)) }))
        .route("/gated", get(gated_response))
        .route("/upload", post(upload))
        .route(
            "/redirect",
            get(|| async {
                (
                    StatusCode::FOUND,
                    [(header::LOCATION, "http://internal.upstream/login?next=%2F")],
                )
            }),
        )
        .route(
            "/html404",
            get(|| async {
                (
                    StatusCode::NOT_FOUND,
                    [(header::CONTENT_TYPE, "text/html")],
                    "<h1>upstream 404</h1>",
                )
            }),
        )
        .route(
            "/html500",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded") }),
        )
        .route("/ws", any(ws_echo))
        .fallback(echo)
        .with_state(gates);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (addr, Task(task))
}

struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn header_json(h: &HeaderMap) -> Value {
    let mut m = serde_json::Map::new();
    for name in h.keys() {
        let vals: Vec<&str> = h
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect();
        m.insert(name.to_string(), json!(vals.join(", ")));
    }
    Value::Object(m)
}

fn chunks(total: usize) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    futures_util::stream::iter((0..total / chunk.len()).map(move |_| Ok(chunk.clone())))
}

/// Sends "first", waits until the test has seen it, then sends "second".
async fn gated_response(State(g): State<Gates>) -> Body {
    let stream = futures_util::stream::unfold(0, move |step| {
        let g = g.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from("first")), 1)),
                1 => {
                    g.release.notified().await;
                    Some((Ok(Bytes::from("second")), 2))
                }
                _ => None,
            }
        }
    });
    Body::from_stream(stream)
}

/// Counts a streamed request body, reporting the first chunk as soon as it arrives.
async fn upload(State(g): State<Gates>, body: Body) -> Json {
    let mut stream = body.into_data_stream();
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if total == 0
            && let Some(tx) = &g.first_chunk
        {
            tx.send(chunk.len()).unwrap();
        }
        total += chunk.len();
    }
    Json(json!({"len": total}))
}

async fn ws_echo(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                AxMessage::Text(t) => AxMessage::Text(format!("echo: {}", t.as_str()).into()),
                AxMessage::Binary(b) => AxMessage::Binary(b),
                AxMessage::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// A raw TCP upstream: reads one request head, hands it to the test, then behaves as told.
#[derive(Clone, Copy)]
enum Raw {
    /// Writes these bytes and closes.
    Reply(&'static [u8]),
    /// Never answers.
    Hang,
    /// Sends a response head and part of the body, then resets the connection.
    ResetMidBody,
}

async fn raw_upstream(behaviour: Raw) -> (SocketAddr, mpsc::UnboundedReceiver<String>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let head = read_head(&mut s).await;
            let _ = tx.send(head);
            match behaviour {
                Raw::Reply(bytes) => {
                    s.write_all(bytes).await.unwrap();
                    s.shutdown().await.unwrap();
                }
                Raw::Hang => held.push(s),
                Raw::ResetMidBody => {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
                        .await
                        .unwrap();
                    s.flush().await.unwrap();
                    // SO_LINGER 0: close() sends RST instead of FIN.
                    s.set_zero_linger().unwrap();
                    drop(s);
                }
            }
        }
    });
    (addr, rx, Task(task))
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends raw bytes to the edge and reads until it closes the connection.
async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("edge closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

#[tokio::test]
async fn large_bodies_stream_both_ways_past_the_api_body_limit() {
    let (tx, mut first) = mpsc::unbounded_channel();
    let gates = Gates {
        first_chunk: Some(tx),
        ..Gates::default()
    };
    let (up, _u) = upstream("a", gates.clone()).await;
    let edge = Edge::start(vec![to("/", up)], &[]).await;
    let c = client();

    // Upload: the upstream sees the first chunk while the rest is still unsent, so nothing
    // buffers the request; 20 MB is far over the 64 KiB limit on our own routes.
    let (body_tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(body_rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    let req = tokio::spawn(c.post(edge.url("/upload")).body(body).send());
    body_tx.send(Ok(Bytes::from(vec![1u8; MB]))).await.unwrap();
    let seen = first.recv().await.unwrap();
    assert!(seen > 0);
    for _ in 1..20 {
        body_tx.send(Ok(Bytes::from(vec![1u8; MB]))).await.unwrap();
    }
    drop(body_tx);
    let resp = req.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json_of(resp).await["len"], 20 * MB);

    // Download: 20 MB, and a response whose second half the upstream only sends after we
    // have read the first.
    let resp = c.get(edge.url("/big")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 20 * MB);
    let mut resp = c.get(edge.url("/gated")).send().await.unwrap();
    assert_eq!(resp.chunk().await.unwrap().unwrap(), "first");
    gates.release.notify_one();
    assert_eq!(resp.chunk().await.unwrap().unwrap(), "second");

    // Our own API keeps its small limit.
    let resp = c
        .post(edge.url("/api/v1/calls"))
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(json_of(resp).await["error"]["code"], "payload_too_large");
}

#[tokio::test]
async fn host_and_longest_prefix_pick_the_route() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let (b, _b) = upstream("b", Gates::default()).await;
    let (h, _h) = upstream("h", Gates::default()).await;
    let edge = Edge::start(
        vec![
            to("/", a),
            to("/app", b),
            to_url(None, "/based", &format!("http://{b}/base/")),
            to_url(Some("Site.Test"), "/", &format!("http://{h}")),
        ],
        &[],
    )
    .await;
    let c = client();
    let get = |path: &'static str, host: Option<&'static str>| {
        let mut r = c.get(edge.url(path));
        if let Some(host) = host {
            r = r.header("host", host);
        }
        async move { json_of(r.send().await.unwrap()).await }
    };
    let v = get("/app/x?q=1", None).await;
    assert_eq!(
        (v["name"].as_str(), v["uri"].as_str()),
        (Some("b"), Some("/app/x?q=1"))
    );
    assert_eq!(get("/app", None).await["name"], "b");
    assert_eq!(
        get("/apple", None).await["name"],
        "a",
        "prefixes end at a segment"
    );
    assert_eq!(get("/based", None).await["uri"], "/base");
    assert_eq!(get("/based/x/y?z", None).await["uri"], "/base/x/y?z");
    assert_eq!(get("/app/x", Some("site.test:8443")).await["name"], "h");
    assert_eq!(get("/", Some("SITE.TEST")).await["name"], "h");
    let v = get("/", Some("other.test")).await;
    assert_eq!(v["name"], "a");
    assert_eq!(
        v["headers"]["host"], "other.test",
        "Host is passed on as sent"
    );
}

#[tokio::test]
async fn own_routes_win_and_unmatched_paths_get_the_spec_404() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let edge = Edge::start(vec![to("/", a)], &[]).await;
    let c = client();
    let v = json_of(c.get(edge.url("/health")).send().await.unwrap()).await;
    assert_eq!(v, json!({"status": "ok"}));
    assert!(json_of(c.get(edge.url("/info")).send().await.unwrap()).await["version"].is_string());
    for (path, status) in [
        ("/api/v1/calls", 401),
        ("/api/v1/no-such-thing", 404),
        ("/twilio/no-such-hook", 404),
    ] {
        let resp = c.get(edge.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
        assert!(json_of(resp).await["error"]["code"].is_string(), "{path}");
    }
    let resp = c.get(edge.url("/metrics")).send().await.unwrap();
    assert!(resp.text().await.unwrap().contains("# TYPE"));
    // Only what is not ours reaches the upstream.
    assert_eq!(
        json_of(c.get(edge.url("/healthz")).send().await.unwrap()).await["name"],
        "a"
    );

    // Without a matching route: the SPEC 404.
    let edge = Edge::start(vec![to("/only", a)], &[]).await;
    let resp = c.get(edge.url("/elsewhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        json_of(resp).await,
        json!({"error": {"code": "not_found", "message": "no such route"}})
    );
}

#[tokio::test]
async fn forwarded_headers_are_ours_unless_the_peer_is_trusted() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let forged = |r: reqwest::RequestBuilder| {
        r.header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.test")
            .header("x-forwarded-port", "1")
            .header("forwarded", "for=6.6.6.6")
            .header("x-real-ip", "6.6.6.6")
    };
    let c = client();

    let edge = Edge::start(vec![to("/", a)], &[]).await;
    let v = json_of(forged(c.get(edge.url("/x"))).send().await.unwrap()).await;
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], edge.addr.to_string());
    for gone in ["x-forwarded-port", "forwarded", "x-real-ip"] {
        assert!(h[gone].is_null(), "{gone} must not be forwarded: {h}");
    }
    // Without any client-supplied headers the same three are set.
    let v = json_of(c.get(edge.url("/x")).send().await.unwrap()).await;
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");

    // From a trusted proxy (here: us, on loopback) its chain is extended and its view kept.
    let edge = Edge::start(vec![to("/", a)], &["127.0.0.0/8"]).await;
    let v = json_of(forged(c.get(edge.url("/x"))).send().await.unwrap()).await;
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "evil.test");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let (up, mut heads, _u) = raw_upstream(Raw::Reply(
        b"HTTP/1.1 200 OK\r\nconnection: close, x-up-secret\r\nx-up-secret: 1\r\n\
          keep-alive: timeout=5\r\nproxy-authenticate: Basic\r\nupgrade: h2c\r\n\
          x-up-kept: 1\r\ncontent-length: 2\r\n\r\nok",
    ))
    .await;
    let edge = Edge::start(vec![to("/", up)], &[]).await;
    let resp = raw_request(
        edge.addr,
        b"GET /hop HTTP/1.1\r\nhost: site.test\r\nconnection: close, X-Secret\r\n\
          x-secret: smuggled\r\nkeep-alive: timeout=9\r\nte: trailers\r\n\
          proxy-authorization: Basic eA==\r\nproxy: http://evil\r\nx-kept: 1\r\n\r\n",
    )
    .await;
    let sent = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(sent.starts_with("get /hop http/1.1\r\n"), "{sent}");
    assert!(sent.contains("x-kept: 1"), "{sent}");
    assert!(sent.contains("host: site.test"), "{sent}");
    for gone in [
        "x-secret",
        "keep-alive",
        "te:",
        "proxy-authorization",
        "proxy:",
    ] {
        assert!(!sent.contains(gone), "{gone} reached the upstream:\n{sent}");
    }
    let got = resp.to_ascii_lowercase();
    assert_eq!(status_of(&got), 200, "{got}");
    assert!(got.contains("x-up-kept: 1"), "{got}");
    assert!(got.ends_with("\r\n\r\nok"), "{got}");
    for gone in ["x-up-secret", "keep-alive", "proxy-authenticate", "upgrade"] {
        assert!(!got.contains(gone), "{gone} reached the client:\n{got}");
    }
}

#[tokio::test]
async fn websocket_is_tunnelled_to_the_upstream() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let edge = Edge::start(vec![to("/", a)], &[]).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", edge.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("echo: hello")
    );
    let blob = vec![7u8; 200_000];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
    // An upgrade the upstream refuses is an ordinary response.
    let resp = client()
        .get(edge.url("/not-ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn proxied_websocket_tunnels_are_capped_per_ip() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let edge = Edge::start_with(vec![to("/", a)], &[], |c| {
        c.limits.max_websockets_per_ip = 2;
    })
    .await;
    let url = format!("ws://{}/ws", edge.addr);
    let (mut one, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_two, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("third tunnel from one address: {other:?}"),
    }
    // Closing a tunnel frees its slot.
    one.close(None).await.unwrap();
    while one.next().await.is_some() {}
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("slot not freed: {e}"),
        }
    }
}

#[tokio::test]
async fn upstream_redirects_and_error_pages_pass_through_untouched() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let edge = Edge::start(vec![to("/", a)], &[]).await;
    let c = client();
    let resp = c.get(edge.url("/redirect")).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        "http://internal.upstream/login?next=%2F"
    );
    let resp = c.get(edge.url("/html404")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "text/html");
    assert_eq!(resp.text().await.unwrap(), "<h1>upstream 404</h1>");
    let resp = c.get(edge.url("/html500")).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.text().await.unwrap(), "upstream exploded");
}

fn static_site() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::create_dir_all(dir.path().join("outside")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>spa</h1>").unwrap();
    std::fs::write(root.join("app.js"), "console.log(1)").unwrap();
    std::fs::write(root.join("style.css"), "body{}").unwrap();
    std::fs::write(root.join("logo.svg"), "<svg/>").unwrap();
    std::fs::write(root.join("docs/index.html"), "<h1>docs</h1>").unwrap();
    std::fs::write(root.join(".env"), "SECRET=1").unwrap();
    std::fs::write(dir.path().join("outside/secret.txt"), "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside"), root.join("link")).unwrap();
    (dir, root)
}

fn static_route(path: &str, root: &std::path::Path) -> ProxyRoute {
    ProxyRoute {
        host: None,
        path: path.into(),
        upstream: None,
        root: Some(root.to_path_buf()),
    }
}

#[tokio::test]
async fn static_site_serves_files_index_spa_fallback_and_validators() {
    let (_dir, root) = static_site();
    let edge = Edge::start(vec![static_route("/", &root)], &[]).await;
    let c = client();
    let get = |path: &str| c.get(edge.url(path)).send();

    let resp = get("/").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(resp.text().await.unwrap(), "<h1>spa</h1>");
    for (path, ctype) in [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/logo.svg", "image/svg+xml"),
    ] {
        let resp = get(path).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], ctype, "{path}");
    }
    assert_eq!(
        get("/docs/").await.unwrap().text().await.unwrap(),
        "<h1>docs</h1>"
    );
    let resp = get("/docs?x=1").await.unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "/docs/?x=1");

    // SPA: client-side routes get index.html; missing assets stay 404 in the SPEC shape.
    let resp = get("/dashboard/42").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "<h1>spa</h1>");
    let resp = get("/missing.js").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(json_of(resp).await["error"]["code"], "not_found");
    assert_eq!(get("/.env").await.unwrap().status(), 404);
    assert_eq!(
        c.post(edge.url("/app.js")).send().await.unwrap().status(),
        405
    );

    // Validators and 304s.
    let resp = get("/app.js").await.unwrap();
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let modified = resp.headers()["last-modified"].to_str().unwrap().to_owned();
    assert!(etag.starts_with("W/\""), "{etag}");
    let cond =
        |name: &'static str, value: String| c.get(edge.url("/app.js")).header(name, value).send();
    let resp = cond("if-none-match", etag.clone()).await.unwrap();
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"], etag.as_str());
    assert!(resp.bytes().await.unwrap().is_empty());
    assert_eq!(
        cond("if-none-match", format!("\"x\", {etag}"))
            .await
            .unwrap()
            .status(),
        304
    );
    assert_eq!(
        cond("if-none-match", "\"other\"".into())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        cond("if-modified-since", modified).await.unwrap().status(),
        304
    );
    let old = "Mon, 01 Jan 2001 00:00:00 GMT".to_owned();
    assert_eq!(cond("if-modified-since", old).await.unwrap().status(), 200);

    // HEAD: headers (length included), no body.
    let resp = c.head(edge.url("/app.js")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "14");
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn static_paths_cannot_leave_the_root() {
    let (_dir, root) = static_site();
    let edge = Edge::start(vec![static_route("/site", &root)], &[]).await;
    assert_eq!(
        client()
            .get(edge.url("/site/app.js"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for target in [
        "/site/../outside/secret.txt",
        "/site/%2e%2e/outside/secret.txt",
        "/site/%2E%2e/outside/secret.txt",
        "/site/.%2e/outside/secret.txt",
        "/site/x%2f..%2f..%2foutside%2fsecret.txt",
        "/site/..%5coutside%5csecret.txt",
        "/site/..\\outside\\secret.txt",
        "/site/app.js%00.html",
        "/site/link/secret.txt",
        "/site/link/",
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let resp = raw_request(edge.addr, req.as_bytes()).await;
        let status = status_of(&resp);
        assert!(matches!(status, 400 | 404), "{target}: {resp}");
        assert!(!resp.contains("TOP SECRET"), "{target}: {resp}");
    }
}

#[tokio::test]
async fn upstream_down_is_a_502_in_the_spec_shape() {
    // A port that was just free: nothing listens there.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let edge = Edge::start(vec![to("/", gone)], &[]).await;
    let resp = client().get(edge.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(json_of(resp).await["error"]["code"], "bad_gateway");
}

#[tokio::test]
async fn a_hanging_upstream_is_a_504_within_the_timeout() {
    let (up, _heads, _u) = raw_upstream(Raw::Hang).await;
    let edge = Edge::start(vec![to("/", up)], &[]).await;
    let table = ProxyTable::from_config(&edge.state.config().proxy)
        .unwrap()
        .with_timeouts(Timeouts {
            response_header: Duration::from_millis(300),
            ..Timeouts::default()
        });
    edge.state.proxy().reload(table);
    let started = Instant::now();
    let resp = client().get(edge.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(json_of(resp).await["error"]["code"], "gateway_timeout");
}

#[tokio::test]
async fn an_upstream_reset_mid_response_truncates_it_and_the_edge_stays_up() {
    let (up, _heads, _u) = raw_upstream(Raw::ResetMidBody).await;
    let (a, _a) = upstream("a", Gates::default()).await;
    let edge = Edge::start(vec![to("/", up), to("/ok", a)], &[]).await;
    let c = client();
    let resp = c.get(edge.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a truncated body must not look complete"
    );
    let resp = c.get(edge.url("/ok")).send().await.unwrap();
    assert_eq!(json_of(resp).await["name"], "a");
}

#[tokio::test]
async fn http10_and_malformed_requests_leave_the_edge_up() {
    let (a, _a) = upstream("a", Gates::default()).await;
    let edge = Edge::start(vec![to("/", a)], &[]).await;
    let resp = raw_request(edge.addr, b"GET /old HTTP/1.0\r\nhost: site.test\r\n\r\n").await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(resp.contains("\"uri\":\"/old\""), "{resp}");
    // No Host at all (HTTP/1.0 allows it): forwarded without one.
    let resp = raw_request(edge.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    for garbage in [
        &b"BLAH\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /x HTTP/1.1\r\nbad header\r\n\r\n",
        b"\x00\x01\x02\xff\r\n\r\n",
    ] {
        let resp = raw_request(edge.addr, garbage).await;
        let status = status_of(&resp);
        assert!(status == 0 || (400..500).contains(&status), "{resp}");
    }
    // Content-Length with chunked: framed by the chunks (RFC 9112 §6.3), the connection
    // closed after the answer, so bytes hidden behind the chunked end are never a request.
    let resp = raw_request(
        edge.addr,
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n",
    )
    .await;
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
    assert!(!resp.contains("smuggled"), "{resp}");
    let v = json_of(client().get(edge.url("/still-up")).send().await.unwrap()).await;
    assert_eq!(v["uri"], "/still-up");
}

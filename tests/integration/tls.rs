//! TLS and certificates on the real binary: ACME against a real Pebble (Debian's `pebble`
//! package) whose validation authority connects to our own listeners, manual certificates
//! with SIGHUP reload, and the HTTPS edge under bad input.
//!
//! Pebble tests skip with a message when `pebble` is not installed, and fail under `CI`.
//! Every test has its own Pebble, ports and data dir, so they run concurrently.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Install, Server};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A child process killed (and reaped) on drop. Its output is read to the end by threads,
/// so a chatty child never blocks on (or dies of) a full or closed pipe.
struct Proc {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        Proc {
            child: Some(child),
            lines,
        }
    }

    /// Blocks until a line containing `needle` (the process announces it is ready).
    fn wait_for(&self, needle: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(needle) => return,
                Ok(l) => seen.push(l),
                Err(_) => panic!("{what} did not start; output:\n{}", seen.join("\n")),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA for test-only certificates (Pebble's own HTTPS listener, manual-mode certificates).
struct TestCa {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "voicectl test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (chain PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Is Pebble installed? If not: a clear skip message, or a failure under CI.
fn pebble_available(test: &str) -> bool {
    let found = ["pebble", "pebble-challtestsrv"].iter().all(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: pebble is not installed but CI is set (apt-get install -y pebble)"
        );
        eprintln!("SKIPPED {test}: pebble is not installed (apt-get install -y pebble)");
    }
    found
}

#[derive(Default)]
struct PebbleOpts {
    /// Where Pebble's VA connects for HTTP-01 and TLS-ALPN-01: our listeners.
    http_port: u16,
    tls_port: u16,
    validity_secs: Option<u64>,
    blocklist: Vec<&'static str>,
    /// Put into issued certificates' AIA extension (nothing serves it); empty: none.
    ocsp_url: &'static str,
}

/// A running Pebble plus the challtestsrv that answers its DNS (every name is 127.0.0.1).
struct Pebble {
    pebble: Proc,
    _dns: Proc,
    _dir: tempfile::TempDir,
    dir_url: String,
    mgmt_port: u16,
    /// The CA Pebble's own HTTPS listener uses (our `tls.acme_root_ca`).
    ca_path: PathBuf,
    ca_pem: String,
}

impl Pebble {
    fn start(o: PebbleOpts) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &ca.pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let (acme_port, mgmt_port, dns_port, dns_mgmt) =
            (free_port(), free_port(), free_port(), free_port());
        let mut cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": o.http_port,
            "tlsPort": o.tls_port,
            "ocspResponderURL": o.ocsp_url,
            "externalAccountBindingRequired": false,
            "domainBlocklist": o.blocklist,
        }});
        if let Some(v) = o.validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let cfg_path = dir.path().join("pebble.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let dns = Proc::spawn(Command::new("pebble-challtestsrv").args([
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &format!("127.0.0.1:{dns_mgmt}"),
            "-defaultIPv6",
            "",
        ]));
        dns.wait_for("Starting management server", "pebble-challtestsrv");
        let pebble = Proc::spawn(
            Command::new("pebble")
                .arg("-config")
                .arg(&cfg_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0"),
        );
        pebble.wait_for("ACME directory available", "pebble");
        Pebble {
            pebble,
            _dns: dns,
            _dir: dir,
            dir_url: format!("https://127.0.0.1:{acme_port}/dir"),
            mgmt_port,
            ca_path,
            ca_pem: ca.pem,
        }
    }

    /// The root Pebble issues under (regenerated at every Pebble start).
    async fn root_pem(&self) -> String {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()])
            .no_proxy()
            .build()
            .unwrap();
        client
            .get(format!("https://127.0.0.1:{}/roots/0", self.mgmt_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Writes a TLS config over `Install`'s (same data dir) and returns it.
fn install(http_port: u16, https_port: u16, server_extra: &str, tls: &str) -> Install {
    let i = Install::new();
    let http = if http_port == 0 {
        String::new()
    } else {
        format!("127.0.0.1:{http_port}")
    };
    std::fs::write(
        &i.config,
        format!(
            "[server]\ndomain = \"voice.test\"\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\n\
             http_listen = \"{http}\"\nhttps_listen = \"127.0.0.1:{https_port}\"\n\
             drain_timeout = \"5s\"\n{server_extra}\n\n[tls]\n{tls}\n",
            i.data_dir
        ),
    )
    .unwrap();
    i
}

fn acme_tls(p: &Pebble, challenge: &str) -> String {
    format!(
        "mode = \"acme\"\nacme_directory = \"{}\"\nacme_root_ca = {:?}\nchallenge = \"{challenge}\"\nacme_email = \"ops@voice.test\"",
        p.dir_url, p.ca_path
    )
}

/// What an HTTPS client saw.
#[derive(Debug)]
struct Probe {
    status: u16,
    cert: voicectl::tls::cert::CertInfo,
    headers: reqwest::header::HeaderMap,
}

/// GET `https://<name>:<port>/health`, `name` resolved to 127.0.0.1, trusting only `root`.
/// A fresh client each time: no pooled connection or resumed session hides a swap.
async fn probe(port: u16, name: &str, root: &str) -> Result<Probe, reqwest::Error> {
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(root.as_bytes()).unwrap()])
        .resolve(name, SocketAddr::from(([127, 0, 0, 1], port)))
        .tls_info(true)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://{name}:{port}/health"))
        .send()
        .await?;
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .expect("peer certificate")
        .to_vec();
    Ok(Probe {
        status: resp.status().as_u16(),
        cert: voicectl::tls::cert::info(&der).unwrap(),
        headers: resp.headers().clone(),
    })
}

/// Consumes server output until a line contains `needle`.
fn wait_log(server: &Server, needle: &str, within: Duration) -> String {
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + within;
        loop {
            match server
                .logs
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?} within {within:?}"),
            }
        }
    })
}

fn cert_status(i: &Install) -> Value {
    tokio::task::block_in_place(|| i.json(&["cert", "status"]))
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A TLS client that accepts any certificate: for looking at what the server presents when
/// no name matches, or when the client sends none.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Connects with `sni` (None: no SNI at all) and returns the stream and the leaf presented.
async fn raw_tls(
    port: u16,
    sni: Option<&str>,
) -> std::io::Result<(RawTls, voicectl::tls::cert::CertInfo)> {
    let provider = voicectl::tls::cert::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // An IP address as the server name makes rustls send no SNI.
    let name = match sni {
        Some(n) => rustls::pki_types::ServerName::try_from(n.to_owned()).unwrap(),
        None => {
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())
        }
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let der = s.get_ref().1.peer_certificates().expect("certificate")[0].clone();
    Ok((s, voicectl::tls::cert::info(&der).unwrap()))
}

/// Writes `bytes`, reads until EOF (the server closes or answers `Connection: close`).
async fn exchange(s: &mut RawTls, bytes: &[u8]) -> String {
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn names(c: &voicectl::tls::cert::CertInfo) -> Vec<&str> {
    c.names.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------
// ACME against Pebble
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_for_every_name_renews_by_itself_and_survives_the_ca_going_away() {
    if !pebble_available("http01_issues_…") {
        return;
    }
    let (http_port, https_port) = (free_port(), free_port());
    let mut pebble = Pebble::start(PebbleOpts {
        http_port,
        tls_port: https_port,
        // Short enough that renewal (at 2/3 of the lifetime) comes within the test.
        validity_secs: Some(15),
        ..Default::default()
    });
    let i = install(
        http_port,
        https_port,
        "extra_domains = [\"www.voice.test\"]",
        &acme_tls(&pebble, "http-01"),
    );
    let server = tokio::task::block_in_place(|| Server::start(&i));
    let root = pebble.root_pem().await;

    // Every configured name gets the Pebble-issued certificate, with HSTS and friends.
    let mut serial = String::new();
    for name in ["voice.test", "www.voice.test"] {
        let p = probe(https_port, name, &root).await.unwrap();
        assert_eq!(p.status, 200);
        assert!(p.cert.issuer.contains("Pebble"), "{:?}", p.cert);
        assert!(
            p.cert
                .covers(&["voice.test".into(), "www.voice.test".into()])
        );
        assert_eq!(p.headers["strict-transport-security"], "max-age=31536000");
        assert_eq!(p.headers["x-content-type-options"], "nosniff");
        assert!(p.headers.contains_key("referrer-policy"));
        serial = p.cert.serial.clone();
    }
    // Ready, with the expiry gauge; no HSTS over plain HTTP.
    let (code, _) = get(&server.url("/health/ready")).await;
    assert_eq!(code, 200);
    let (_, metrics) = get(&server.url("/metrics")).await;
    assert!(
        metrics
            .contains("voicectl_tls_certificate_expiry_timestamp_seconds{domain=\"voice.test\"}"),
        "{metrics}"
    );
    // Port 80: everything but challenges goes to the configured host, whatever Host says.
    let r = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("http://127.0.0.1:{http_port}/api/v1/calls?x=1"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://voice.test:{https_port}/api/v1/calls?x=1").as_str()
    );
    let (code, _) = get(&format!(
        "http://127.0.0.1:{http_port}/.well-known/acme-challenge/nope"
    ))
    .await;
    assert_eq!(code, 404);

    // Renewal happens by itself and the new certificate is served without a restart.
    wait_log(
        &server,
        "certificate issued and installed",
        Duration::from_secs(30),
    );
    let p = probe(https_port, "www.voice.test", &root).await.unwrap();
    assert_ne!(p.cert.serial, serial, "renewed certificate is served");
    // The CA goes away first, so no further renewal (certificates live 15 s here) can slip
    // in between the reads below on a loaded machine.
    pebble.pebble.kill();
    let renewed = probe(https_port, "www.voice.test", &root)
        .await
        .unwrap()
        .cert
        .serial;
    assert_ne!(renewed, serial, "renewed certificate is served");

    let st = cert_status(&i);
    assert_eq!(st["certificate"]["serial"], renewed.as_str());
    assert_eq!(st["serving_fallback"], false);
    assert!(st["renew_at"].as_i64().unwrap() > st["certificate"]["not_before"].as_i64().unwrap());

    // Without the CA a forced renewal fails and the current certificate stays in service.
    let out = tokio::task::block_in_place(|| i.run(&["cert", "renew", "--force"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("renewal failed"), "{err}");
    let p = probe(https_port, "voice.test", &root).await.unwrap();
    assert_eq!(p.cert.serial, renewed, "old certificate kept");
    let st = cert_status(&i);
    assert!(
        st["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    assert_eq!(st["certificate"]["serial"], renewed.as_str());
    assert_eq!(st["last_error_permanent"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_for_every_name_and_cert_renew_asks_the_server() {
    if !pebble_available("tls_alpn01_issues_…") {
        return;
    }
    let https_port = free_port();
    let pebble = Pebble::start(PebbleOpts {
        http_port: free_port(),
        tls_port: https_port,
        ..Default::default()
    });
    // No port-80 listener at all: TLS-ALPN-01 needs only 443.
    let i = install(
        0,
        https_port,
        "extra_domains = [\"www.voice.test\"]",
        &acme_tls(&pebble, "tls-alpn-01"),
    );
    let server = tokio::task::block_in_place(|| Server::start(&i));
    let root = pebble.root_pem().await;
    let mut serials = Vec::new();
    for name in ["voice.test", "www.voice.test"] {
        let p = probe(https_port, name, &root).await.unwrap();
        assert_eq!(p.status, 200);
        assert!(p.cert.issuer.contains("Pebble"), "{:?}", p.cert);
        serials.push(p.cert.serial);
    }
    assert_eq!(serials[0], serials[1], "one certificate names both");

    // Not due: renew says so and changes nothing; --force issues a new one, served at once.
    let out = tokio::task::block_in_place(|| i.ok(&["cert", "renew"]));
    assert!(out.contains("not due"), "{out}");
    let v = tokio::task::block_in_place(|| i.json(&["cert", "renew", "--force"]));
    assert_eq!(v["renewed"], true, "{v}");
    let p = probe(https_port, "voice.test", &root).await.unwrap();
    assert_ne!(p.cert.serial, serials[0]);
    assert_eq!(v["status"]["certificate"]["serial"], p.cert.serial.as_str());
    assert!(v["status"]["days_left"].as_i64().unwrap() > 30);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_ca_refuses_is_a_permanent_error_and_the_server_stays_up() {
    if !pebble_available("a_name_the_ca_refuses_…") {
        return;
    }
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOpts {
        http_port,
        tls_port: https_port,
        blocklist: vec!["voice.test"],
        ..Default::default()
    });
    let i = install(http_port, https_port, "", &acme_tls(&pebble, "http-01"));
    let server = tokio::task::block_in_place(|| Server::start(&i));
    let st = cert_status(&i);
    let err = st["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("rejectedIdentifier"), "{st}");
    assert_eq!(st["last_error_permanent"], true, "{st}");
    assert_eq!(st["serving_fallback"], true);
    // The next attempt waits hours, not seconds.
    let next = st["next_attempt"].as_i64().unwrap();
    assert!(next - st["last_attempt"].as_i64().unwrap() >= 3600, "{st}");
    let (code, body) = get(&server.url("/health/ready")).await;
    assert_eq!(code, 503);
    assert!(body.contains("no_certificate"), "{body}");
    // Still serving (the fallback) over TLS.
    let (_, cert) = raw_tls(https_port, Some("voice.test")).await.unwrap();
    assert!(names(&cert).contains(&"voice.test"));
    let (code, _) = get(&server.url("/health")).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_certificate_is_logged_and_reissued() {
    if !pebble_available("a_corrupt_stored_certificate_…") {
        return;
    }
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOpts {
        http_port,
        tls_port: https_port,
        // What a public CA issues: 90 days (Pebble's default of 5 years is rated MEDIUM) and
        // a revocation URL (none at all is rated HIGH; testssl.sh only fetches it with
        // `--phone-out`, which it does not get here).
        validity_secs: Some(90 * 86400),
        ocsp_url: "http://127.0.0.1:9/ocsp",
        ..Default::default()
    });
    let i = install(http_port, https_port, "", &acme_tls(&pebble, "http-01"));
    let ca_dir = i
        .data_dir
        .join("tls")
        .join(voicectl::tls::storage::ca_dir_name(&pebble.dir_url));
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::write(
        ca_dir.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    std::fs::write(ca_dir.join("key.pem"), "garbage").unwrap();
    let server = tokio::task::block_in_place(|| Server::start(&i));
    assert!(
        server
            .startup
            .iter()
            .any(|l| l.contains("stored certificate not usable")),
        "{:#?}",
        server.startup
    );
    let root = pebble.root_pem().await;
    let p = probe(https_port, "voice.test", &root).await.unwrap();
    assert!(p.cert.issuer.contains("Pebble"));
    // The files on disk were replaced by the new, loadable pair.
    let chain = std::fs::read(ca_dir.join("cert.pem")).unwrap();
    let key = std::fs::read(ca_dir.join("key.pem")).unwrap();
    let stored = voicectl::tls::cert::load_pem(&chain, &key).unwrap();
    assert_eq!(stored.info.serial, p.cert.serial);
    let (code, _) = get(&server.url("/health/ready")).await;
    assert_eq!(code, 200);
}

// ---------------------------------------------------------------------------------------
// Without a CA
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_at_start_serves_the_fallback_and_bad_tls_input_does_not_hurt() {
    let (http_port, https_port, dead_port) = (free_port(), free_port(), free_port());
    let ca = TestCa::new();
    let i = install(
        http_port,
        https_port,
        "extra_domains = [\"www.voice.test\"]",
        "",
    );
    let ca_path = i.dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let cfg = std::fs::read_to_string(&i.config).unwrap();
    std::fs::write(
        &i.config,
        format!(
            "{cfg}mode = \"acme\"\nacme_directory = \"https://127.0.0.1:{dead_port}/dir\"\nacme_root_ca = {ca_path:?}\n"
        ),
    )
    .unwrap();
    let server = tokio::task::block_in_place(|| Server::start(&i));

    // Up, not ready, and the status says why.
    let (code, body) = get(&server.url("/health/ready")).await;
    assert_eq!(code, 503);
    assert!(body.contains("no_certificate"), "{body}");
    let st = cert_status(&i);
    assert!(st["certificate"].is_null(), "{st}");
    assert_eq!(st["serving_fallback"], true);
    assert!(
        st["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    assert_eq!(st["last_error_permanent"], false);
    assert!(st["next_attempt"].as_i64().is_some());
    let human = tokio::task::block_in_place(|| i.ok(&["cert", "status"]));
    assert!(human.contains("self-signed fallback"), "{human}");

    // A client that connects and says nothing does not hold up the others.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", https_port))
        .await
        .unwrap();
    // Unknown SNI and no SNI: the handshake completes with the default certificate.
    let (_, c) = raw_tls(https_port, Some("nobody.example")).await.unwrap();
    assert!(names(&c).contains(&"voice.test"), "{c:?}");
    let (mut s, c) = raw_tls(https_port, None).await.unwrap();
    assert!(names(&c).contains(&"www.voice.test"), "{c:?}");
    // HTTP/1.0 over TLS is answered, with HSTS.
    let resp = exchange(&mut s, b"GET /health HTTP/1.0\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    assert!(
        resp.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{resp}"
    );
    // Garbage after the handshake: a 400 or a closed connection, nothing worse.
    let (mut s, _) = raw_tls(https_port, Some("voice.test")).await.unwrap();
    let resp = exchange(&mut s, b"\x00\x01\x02 NOT HTTP\r\n\r\n").await;
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );
    // Garbage instead of a handshake.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", https_port))
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut buf)).await;
    // Still serving on every listener.
    let (mut s, _) = raw_tls(https_port, Some("voice.test")).await.unwrap();
    let resp = exchange(
        &mut s,
        b"GET /health HTTP/1.1\r\nHost: voice.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (code, _) = get(&server.url("/health")).await;
    assert_eq!(code, 200);
    let (code, _) = get(&format!("http://127.0.0.1:{http_port}/x")).await;
    assert_eq!(code, 308);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_certificates_reload_on_sighup_and_a_bad_file_keeps_the_old_one() {
    let https_port = free_port();
    let ca = TestCa::new();
    let i = install(0, https_port, "", "");
    let cert_path = i.dir.path().join("cert.pem");
    let key_path = i.dir.path().join("key.pem");
    let (c1, k1) = ca.leaf(&["voice.test"]);
    std::fs::write(&cert_path, &c1).unwrap();
    std::fs::write(&key_path, &k1).unwrap();
    let cfg = std::fs::read_to_string(&i.config).unwrap();
    std::fs::write(
        &i.config,
        format!(
            "{cfg}mode = \"manual\"\ncert_file = {cert_path:?}\nkey_file = {key_path:?}\n\n\
             [twilio]\nauth_token = \"tok\"\n"
        ),
    )
    .unwrap();
    let server = tokio::task::block_in_place(|| Server::start(&i));
    let first = probe(https_port, "voice.test", &ca.pem).await.unwrap();
    assert_eq!(first.status, 200);
    let (code, _) = get(&server.url("/health/ready")).await;
    assert_eq!(code, 200);

    // The media stream's WebSocket upgrade works over TLS (wss://), signed like Twilio does.
    let sig = voicectl::telephony::twilio::signature::compute(
        "tok",
        "wss://voice.test/twilio/media",
        &[],
    );
    let (mut s, _) = raw_tls(https_port, Some("voice.test")).await.unwrap();
    let req = format!(
        "GET /twilio/media HTTP/1.1\r\nHost: voice.test\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Twilio-Signature: {sig}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101", "{}", String::from_utf8_lossy(&head));
    drop(s);

    // A new pair, then SIGHUP: served from the next handshake on.
    let (c2, k2) = ca.leaf(&["voice.test"]);
    std::fs::write(&key_path, &k2).unwrap();
    std::fs::write(&cert_path, &c2).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    wait_log(
        &server,
        "reloaded manual certificate",
        Duration::from_secs(10),
    );
    let second = probe(https_port, "voice.test", &ca.pem).await.unwrap();
    assert_ne!(second.cert.serial, first.cert.serial);

    // A broken file: the reload fails loudly and the previous certificate stays.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    let line = wait_log(
        &server,
        "certificate reload failed",
        Duration::from_secs(10),
    );
    assert!(line.contains("cert_file"), "{line}");
    let third = probe(https_port, "voice.test", &ca.pem).await.unwrap();
    assert_eq!(third.cert.serial, second.cert.serial);
    let st = cert_status(&i);
    assert_eq!(st["mode"], "manual");
    assert_eq!(st["certificate"]["serial"], second.cert.serial.as_str());
    assert!(
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cert_file")),
        "{st}"
    );
    let (code, _) = get(&server.url("/health/ready")).await;
    assert_eq!(code, 200);
}

#[test]
fn manual_mode_with_unreadable_files_refuses_to_start_and_says_which() {
    let i = install(
        0,
        free_port(),
        "",
        "mode = \"manual\"\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"",
    );
    let err = i.fails(&["serve"]);
    assert!(
        err.contains("cert_file") && err.contains("/nonexistent/c.pem"),
        "{err}"
    );
}

#[test]
fn cert_status_works_without_a_server() {
    let i = install(free_port(), free_port(), "", "mode = \"acme\"");
    let v = i.json(&["cert", "status"]);
    assert_eq!(v["mode"], "acme");
    assert!(v["certificate"].is_null());
    assert_eq!(
        v["directory"],
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    let out = i.ok(&["cert", "status"]);
    assert!(out.contains("voice.test"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_renew_without_a_server_issues_directly_and_serve_picks_it_up() {
    if !pebble_available("cert_renew_without_a_server_…") {
        return;
    }
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOpts {
        http_port,
        tls_port: https_port,
        // What a public CA issues: 90 days (Pebble's default of 5 years is rated MEDIUM) and
        // a revocation URL (none at all is rated HIGH; testssl.sh only fetches it with
        // `--phone-out`, which it does not get here).
        validity_secs: Some(90 * 86400),
        ocsp_url: "http://127.0.0.1:9/ocsp",
        ..Default::default()
    });
    let i = install(http_port, https_port, "", &acme_tls(&pebble, "http-01"));
    // The CLI answers HTTP-01 on http_listen itself.
    let v = tokio::task::block_in_place(|| i.json(&["cert", "renew"]));
    assert_eq!(v["renewed"], true, "{v}");
    let serial = v["status"]["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let st = cert_status(&i);
    assert_eq!(st["certificate"]["serial"], serial.as_str());
    // The next start serves the stored certificate at once, without a new order.
    let server = tokio::task::block_in_place(|| Server::start(&i));
    let root = pebble.root_pem().await;
    let p = probe(https_port, "voice.test", &root).await.unwrap();
    assert_eq!(p.cert.serial, serial);
    assert!(
        !server
            .startup
            .iter()
            .any(|l| l.contains("requesting a certificate")),
        "{:#?}",
        server.startup
    );
}

// ---------------------------------------------------------------------------------------
// TLS scan (issue 11)
// ---------------------------------------------------------------------------------------

/// Debian's `testssl.sh` package installs the script as `testssl`; upstream names it
/// `testssl.sh`. Without either: a skip, or a failure under CI.
fn testssl(test: &str) -> Option<&'static str> {
    let found = ["testssl.sh", "testssl"].into_iter().find(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: testssl.sh is not installed but CI is set (apt-get install -y testssl.sh)"
        );
        eprintln!("SKIPPED {test}: testssl.sh is not installed (apt-get install -y testssl.sh)");
    }
    found
}

/// testssl.sh against the HTTPS listener serving a Pebble-issued certificate: TLS 1.2 and
/// 1.3 only, HSTS, and no finding rated MEDIUM or worse. The scanner touches only loopback:
/// `--ip` pins the address, `--nodns none` stops every DNS lookup (CAA, MX, reverse), and
/// without `--phone-out` it fetches no CRL or OCSP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_rates_the_https_listener_clean() {
    if !pebble_available("testssl_rates_…") {
        return;
    }
    let Some(bin) = testssl("testssl_rates_…") else {
        return;
    };
    let (http_port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(PebbleOpts {
        http_port,
        tls_port: https_port,
        // What a public CA issues: 90 days (Pebble's default of 5 years is rated MEDIUM) and
        // a revocation URL (none at all is rated HIGH; testssl.sh only fetches it with
        // `--phone-out`, which it does not get here).
        validity_secs: Some(90 * 86400),
        ocsp_url: "http://127.0.0.1:9/ocsp",
        ..Default::default()
    });
    let i = install(http_port, https_port, "", &acme_tls(&pebble, "http-01"));
    let _server = tokio::task::block_in_place(|| Server::start(&i));
    let root = pebble.root_pem().await;
    let p = probe(https_port, "voice.test", &root).await.unwrap();
    assert!(p.cert.issuer.contains("Pebble"), "{:?}", p.cert);

    let dir = tempfile::tempdir().unwrap();
    let (ca, json) = (dir.path().join("root.pem"), dir.path().join("scan.json"));
    std::fs::write(&ca, &root).unwrap();
    let out = tokio::task::block_in_place(|| {
        Command::new(bin)
            .args([
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "off",
                "--nodns",
                "none",
            ])
            .args(["--ip", "127.0.0.1", "--add-ca"])
            .arg(&ca)
            .arg("--jsonfile")
            .arg(&json)
            .arg(format!("https://voice.test:{https_port}/health"))
            .output()
            .expect("run testssl")
    });
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no JSON from testssl ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings: Vec<Value> = serde_json::from_str(&text).unwrap();
    let finding = |id: &str| -> String {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or_else(|| panic!("no {id} finding in {text}"))
            .to_owned()
    };
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            finding(old).starts_with("not offered"),
            "{old}: {}",
            finding(old)
        );
    }
    for new in ["TLS1_2", "TLS1_3"] {
        assert!(
            finding(new).starts_with("offered"),
            "{new}: {}",
            finding(new)
        );
    }
    // testssl.sh 3.0 reports HSTS as `HSTS_time`, 3.1+ as `HSTS`.
    let hsts = findings
        .iter()
        .find(|f| f["id"] == "HSTS_time" || f["id"] == "HSTS")
        .and_then(|f| f["finding"].as_str())
        .unwrap_or_else(|| panic!("no HSTS finding in {text}"));
    assert!(hsts.contains("365 days"), "{hsts}");
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("MEDIUM" | "HIGH" | "CRITICAL")))
        .map(|f| format!("{} {}: {}", f["severity"], f["id"], f["finding"]))
        .collect();
    assert!(bad.is_empty(), "testssl findings:\n{}", bad.join("\n"));
}

//! The dashboard in a real headless Chromium, driven over WebDriver (fantoccini →
//! chromedriver). Server, browser and driver all live on 127.0.0.1, and the browser is kept
//! there: every non-loopback URL goes to a dead proxy on 127.0.0.1:9, host names do not
//! resolve, and its background services (updates, sync, metrics) are off.
//!
//! Without `chromium`/`chromedriver` these tests are skipped, except under CI (`CI=true`),
//! where a missing browser is a failure (`.ci/run` installs it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::store::{sessions, tenants};

use super::e2e::{self, Opts};

const WAIT: Duration = Duration::from_secs(15);

fn find_exe(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    for name in names {
        for dir in path.split(':').chain(["/usr/bin", "/usr/lib/chromium"]) {
            let p = std::path::Path::new(dir).join(name);
            if p.is_file() {
                return Some(p.to_string_lossy().into_owned());
            }
        }
    }
    None
}

/// chromedriver on a free loopback port; killed on drop.
pub struct Driver {
    child: Child,
    pub url: String,
    chromium: String,
}

impl Driver {
    /// `None` (the test is skipped) when the browser is not installed and we are not in CI.
    pub fn start() -> Option<Driver> {
        let (Some(chromium), Some(driver)) = (
            find_exe(&["chromium", "chromium-browser", "google-chrome"]),
            find_exe(&["chromedriver"]),
        ) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but chromium/chromedriver are missing (apt-get install chromium chromium-driver)"
            );
            eprintln!("skipped: chromium and chromedriver are not installed");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(start.elapsed() < WAIT, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Driver {
            child,
            url: format!("http://{addr}"),
            chromium,
        })
    }

    /// A fresh headless browser with a phone-sized window (its own profile, so no cookies).
    pub async fn browser(&self, width: u32, height: u32) -> Client {
        self.browser_with(width, height, &[]).await
    }

    /// [`Driver::browser`] with more Chromium flags.
    pub async fn browser_with(&self, width: u32, height: u32, extra: &[String]) -> Client {
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={width},{height}"),
            // Loopback only: everything else goes to a dead proxy, no name resolves.
            "--proxy-server=http://127.0.0.1:9".into(),
            "--proxy-bypass-list=127.0.0.1".into(),
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-default-apps".into(),
            "--disable-domain-reliability".into(),
            "--disable-client-side-phishing-detection".into(),
            "--no-first-run".into(),
            "--no-pings".into(),
            "--metrics-recording-only".into(),
        ];
        args.extend(extra.iter().cloned());
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": self.chromium, "args": args}),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Logs the browser in with a one-time link, as `voicectl open` prints it.
pub async fn login(b: &Client, s: &e2e::Stack, tenant: Option<&str>) {
    let tenant = tenant.map(str::to_owned);
    let (token, _) = s
        .store
        .blocking(move |c| sessions::create_login(c, tenant.as_deref()))
        .unwrap();
    b.goto(&format!("{}/ui/login?token={token}", s.base))
        .await
        .unwrap();
    b.find(Locator::Css("#continue"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css("main[data-page=\"live\"]"))
        .await
        .expect("logged in to the live page");
}

async fn wait_text(b: &Client, css: &str, needle: &str) -> String {
    wait_any(b, css, &[needle]).await
}

/// Waits until the element `css` shows one of `needles`; returns its text.
async fn wait_any(b: &Client, css: &str, needles: &[&str]) -> String {
    let needle = needles.join("|");
    let start = Instant::now();
    loop {
        if let Ok(el) = b.find(Locator::Css(css)).await
            && let Ok(t) = el.text().await
            && needles.iter().any(|n| t.contains(n))
        {
            return t;
        }
        assert!(
            start.elapsed() < WAIT,
            "{css} never contained {needle:?}; page: {}",
            b.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn talkative() -> Scenario {
    Scenario::answer(CallerScript::new(vec![
        Step::WaitForAgentSilence { min_ms: 300 },
        Step::Speak(700),
        Step::WaitForAgentSilence { min_ms: 300 },
        Step::Silence(4000),
        Step::Hangup,
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_link_then_a_live_call_appears_and_its_transcript_streams() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let s = e2e::stack(Opts::default()).await;
    let b = driver.browser(412, 915).await;
    login(&b, &s, None).await;
    // The one-time link is spent: the URL now shows the dashboard, and the cookie is HttpOnly
    // (invisible to scripts).
    let cookies = b.execute("return document.cookie", vec![]).await.unwrap();
    assert_eq!(cookies, json!(""));
    // A marker that a reload would wipe.
    b.execute("window.__noReload = 42", vec![]).await.unwrap();

    s.sim.set_scenario("+14155550401", talkative());
    let id = s.call("+14155550401").await;
    let row = format!("tr[data-id=\"{id}\"]");
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(&row))
        .await
        .expect("the live call appears without a reload");
    assert_eq!(
        b.execute("return window.__noReload", vec![]).await.unwrap(),
        json!(42),
        "the page was reloaded"
    );
    // Its status follows the call over SSE (on a loaded machine the call may be over by the
    // time we look).
    wait_any(&b, &format!("{row} .status"), &["in progress", "completed"]).await;

    // The call's page streams the transcript while it runs and settles when it ends.
    b.find(Locator::Css(&format!("{row} a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, "#transcript", "Hi").await;
    wait_text(&b, "#details", "completed").await;
    wait_text(&b, "#transcript", "caller").await;
    let t = wait_text(&b, "#events", "completed").await;
    assert!(t.contains("ringing") || t.contains("in progress"), "{t}");

    // A finished call's page from scratch: transcript from the store, latency figures, and the
    // post-call analysis when there is one.
    let aid = id.clone();
    s.store
        .blocking(move |c| {
            let a = voicectl::domain::analysis::CallAnalysis {
                summary: Some("The caller chose Tuesday.".into()),
                data: Some(json!({"day": "Tuesday"})),
                success: Some(true),
                error: None,
            };
            voicectl::store::calls::set_analysis(c, &aid, &a)
        })
        .unwrap();
    b.goto(&format!("{}/ui/calls/{id}", s.base)).await.unwrap();
    let text = wait_text(&b, "#transcript", "agent").await;
    assert!(text.contains("Hi"), "{text}");
    let analysis = wait_text(&b, "#analysis", "The caller chose Tuesday.").await;
    assert!(
        analysis.contains("Tuesday") && analysis.contains("yes"),
        "{analysis}"
    );
    // History lists it.
    b.goto(&format!("{}/ui/calls?status=completed", s.base))
        .await
        .unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(&row))
        .await
        .expect("history lists the call");
    b.close().await.unwrap();
}

/// A page on another origin (another loopback port: same site, so the `SameSite=Strict`
/// cookie IS sent) posts a form at the dashboard's API to hang up a live call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_origin_form_cannot_end_a_call() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let s = e2e::stack(Opts::default()).await;
    s.sim
        .set_scenario("+14155550402", Scenario::answer(CallerScript::silent()));
    let id = s.call("+14155550402").await;
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_addr = evil.local_addr().unwrap();
    let page = format!(
        "<!doctype html><form id=f method=post action=\"{}/api/v1/calls/{id}/end\"></form>\
         <script>document.getElementById('f').submit()</script>",
        s.base
    );
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let page = page.clone();
                async move { axum::response::Html(page) }
            }),
        );
        axum::serve(evil, app).await.unwrap();
    });
    let b = driver.browser(1000, 800).await;
    login(&b, &s, None).await;
    b.goto(&format!("http://{evil_addr}/")).await.unwrap();
    let body = wait_text(&b, "body", "cross_site_refused").await;
    assert!(body.contains("cross-site request refused"), "{body}");
    let call = s.get(&id).await;
    assert!(
        !["completed", "canceled"].contains(&call["status"].as_str().unwrap()),
        "the call was ended: {call}"
    );
    // The dashboard's own Hang up button works.
    b.goto(&format!("{}/ui/calls/{id}", s.base)).await.unwrap();
    wait_text(&b, "#details", "in progress").await;
    b.find(Locator::Css(".actions button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let st = s.get(&id).await["status"].clone();
        if st == "completed" || st == "canceled" {
            break;
        }
        assert!(start.elapsed() < WAIT, "hang up did not end the call: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_session_cannot_see_another_tenants_call() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let s = e2e::stack(Opts::default()).await;
    s.store
        .blocking(|c| {
            tenants::create(
                c,
                tenants::TenantPatch {
                    name: Some("other".into()),
                    ..Default::default()
                },
            )
        })
        .unwrap();
    s.sim.set_scenario(
        "+14155550403",
        Scenario::answer(CallerScript::new(vec![Step::Hangup])),
    );
    let id = s.call("+14155550403").await;
    let _ = s.follow(&id, WAIT).await;
    let b = driver.browser(412, 915).await;
    login(&b, &s, Some("other")).await;
    let who = b
        .find(Locator::Css(".who"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(who, "tenant other");
    b.goto(&format!("{}/ui/calls/{id}", s.base)).await.unwrap();
    wait_text(&b, "main", "No such call.").await;
    let src = b.source().await.unwrap();
    assert!(!src.contains("+14155550403"), "leaked the call");
    b.goto(&format!("{}/ui/calls", s.base)).await.unwrap();
    wait_text(&b, "main", "No calls match.").await;
    // Admin pages are not there for a tenant.
    b.goto(&format!("{}/ui/tenants", s.base)).await.unwrap();
    wait_text(&b, "main", "Not found.").await;
    let v: Value = b
        .execute(
            "return fetch('/api/v1/calls/' + arguments[0]).then(r => r.status)",
            vec![json!(id)],
        )
        .await
        .unwrap();
    assert_eq!(v, json!(404));
    b.close().await.unwrap();
}

/// Writes the README's screenshots: `VOICECTL_SCREENSHOTS=docs cargo test --test integration
/// browser::screenshots -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/*.png; run by hand"]
async fn screenshots() {
    let Ok(dir) = std::env::var("VOICECTL_SCREENSHOTS") else {
        return;
    };
    let Some(driver) = Driver::start() else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let s = e2e::stack(Opts::default()).await;
    for (n, to) in ["+14155550501", "+14155550502", "+14155550503"]
        .iter()
        .enumerate()
    {
        s.sim.set_scenario(
            to,
            if n == 2 {
                Scenario::answer(CallerScript::silent())
            } else {
                talkative()
            },
        );
    }
    let done = s.call("+14155550501").await;
    let _ = s.call("+14155550502").await;
    let _ = s.follow(&done, WAIT).await;
    let live = s.call("+14155550503").await;
    let b = driver.browser(1100, 860).await;
    login(&b, &s, None).await;
    let shot = |name: &'static str| {
        let b = b.clone();
        let path = dir.join(name);
        async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            std::fs::write(&path, b.screenshot().await.unwrap()).unwrap();
        }
    };
    wait_text(
        &b,
        &format!("tr[data-id=\"{live}\"] .status"),
        "in progress",
    )
    .await;
    shot("dashboard-live.png").await;
    let aid = done.clone();
    s.store
        .blocking(move |c| {
            let a = voicectl::domain::analysis::CallAnalysis {
                summary: Some("The caller asked about opening hours and was told 9 to 5.".into()),
                data: Some(json!({"topic": "opening hours", "callback": false})),
                success: Some(true),
                error: None,
            };
            voicectl::store::calls::set_analysis(c, &aid, &a)
        })
        .unwrap();
    b.goto(&format!("{}/ui/calls/{done}", s.base))
        .await
        .unwrap();
    wait_text(&b, "#transcript", "agent").await;
    shot("dashboard-call.png").await;
    b.goto(&format!("{}/ui/calls", s.base)).await.unwrap();
    wait_text(&b, "main", "completed").await;
    shot("dashboard-history.png").await;
    b.goto(&format!("{}/ui/system", s.base)).await.unwrap();
    wait_text(&b, "main", "Engine circuits").await;
    shot("dashboard-system.png").await;
    b.set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{}/ui/calls/{done}", s.base))
        .await
        .unwrap();
    wait_text(&b, "#transcript", "agent").await;
    shot("dashboard-phone.png").await;
    // Nothing but the (scrollable) navigation is wider than the phone's screen.
    let wide = b
        .execute(
            "return [...document.querySelectorAll('main *')].filter(e => \
             e.getBoundingClientRect().right > document.documentElement.clientWidth + 1).length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(wide, json!(0));
    b.close().await.unwrap();
    // A tenant's test-call page with the Talk button.
    let t = driver.browser(1100, 700).await;
    login(&t, &s, Some("acme")).await;
    t.goto(&format!("{}/ui/new", s.base)).await.unwrap();
    wait_text(&t, "#talk", "Talk").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::write(
        dir.join("dashboard-talk.png"),
        t.screenshot().await.unwrap(),
    )
    .unwrap();
    t.close().await.unwrap();
}

/// A test call placed from the dashboard's form, then found again through the history's
/// status filter and its paging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_call_form_history_filter_and_paging() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let s = e2e::stack(Opts::default()).await;
    s.sim.set_scenario("+14155550404", Scenario::Busy);
    s.sim.set_scenario("+14155550405", Scenario::Busy);
    let first = s.call("+14155550404").await;
    let _ = s.follow(&first, WAIT).await;
    let b = driver.browser(412, 915).await;
    login(&b, &s, None).await;

    b.goto(&format!("{}/ui/new", s.base)).await.unwrap();
    let form = b
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#new-call"))
        .await
        .unwrap();
    form.find(Locator::Css("input[name=to]"))
        .await
        .unwrap()
        .send_keys("+14155550405")
        .await
        .unwrap();
    form.find(Locator::Css("input[name=tenant]"))
        .await
        .unwrap()
        .send_keys("acme")
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The form lands on the new call's page, which follows it to its end.
    wait_text(&b, "#details", "busy").await;
    let url = b.current_url().await.unwrap();
    let second = url.path().strip_prefix("/ui/calls/").unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(s.get(&second).await["to"], "+14155550405");

    // Bad input from the form: the API's message is shown, nothing is created.
    b.goto(&format!("{}/ui/new", s.base)).await.unwrap();
    let form = b
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#new-call"))
        .await
        .unwrap();
    b.execute(
        "document.querySelector('input[name=to]').removeAttribute('pattern')",
        vec![],
    )
    .await
    .unwrap();
    form.find(Locator::Css("input[name=to]"))
        .await
        .unwrap()
        .send_keys("12345")
        .await
        .unwrap();
    form.find(Locator::Css("input[name=tenant]"))
        .await
        .unwrap()
        .send_keys("acme")
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, "main .error", "is not an E.164 phone number").await;
    assert_eq!(
        s.api(reqwest::Method::GET, "/api/v1/calls", None).await.1["calls"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // One call per page: newest first, then "Older »" to the first one.
    b.goto(&format!("{}/ui/calls?status=busy&limit=1", s.base))
        .await
        .unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(&format!("tr[data-id=\"{second}\"]")))
        .await
        .unwrap();
    b.find(Locator::Css("a[rel=next]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(&format!("tr[data-id=\"{first}\"]")))
        .await
        .unwrap();
    assert_eq!(b.find_all(Locator::Css("tbody tr")).await.unwrap().len(), 1);
    // Another status filter: neither call.
    b.goto(&format!("{}/ui/calls?status=completed", s.base))
        .await
        .unwrap();
    wait_text(&b, "main", "No calls match.").await;
    b.close().await.unwrap();
}

/// The admin pages: tenants and their keys (a new key shown once, revoking one), certificates
/// with TLS off, the system page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_pages_manage_tenants_and_keys_and_show_the_system() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let s = e2e::stack(Opts::default()).await;
    let b = driver.browser(1000, 800).await;
    login(&b, &s, None).await;
    b.goto(&format!("{}/ui/tenants", s.base)).await.unwrap();
    wait_text(&b, "main table", "acme").await;
    // Add a tenant from the form.
    b.find(Locator::Css("main form input[name=name]"))
        .await
        .unwrap()
        .send_keys("globex")
        .await
        .unwrap();
    b.find(Locator::Css("main form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, "main table", "globex").await;
    let created = s
        .store
        .blocking(|c| tenants::get(c, "globex"))
        .expect("the form created the tenant");
    assert_eq!(created.name, "globex");
    // acme's keys: the stack's key is there; make a new one, shown once.
    let rows = b.find_all(Locator::Css("main tbody tr")).await.unwrap();
    let mut acme = None;
    for r in rows {
        if r.text().await.unwrap().starts_with("acme") {
            acme = Some(r);
        }
    }
    let acme = acme.expect("acme row");
    acme.find(Locator::Css(".keys-cell button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let key_id = s.key.split('_').nth(1).unwrap().to_owned();
    wait_text(&b, ".keys-cell", &key_id).await;
    b.find(Locator::Css(".keys-cell > button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let notice = wait_text(&b, ".notice", "shown once").await;
    let new_key = notice.split_whitespace().last().unwrap().to_owned();
    assert!(new_key.starts_with("vk_"), "{notice}");
    let (st, _) = {
        let resp = s
            .http
            .get(format!("{}/api/v1/calls", s.base))
            .bearer_auth(&new_key)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), ())
    };
    assert_eq!(st, 200, "the key shown works");
    // Revoke it (after the confirmation dialog): the list says so and the key stops working.
    let new_id = new_key.split('_').nth(1).unwrap().to_owned();
    wait_text(&b, ".keys-cell", &new_id).await;
    let items = b.find_all(Locator::Css(".keys li")).await.unwrap();
    for li in items {
        if li.text().await.unwrap().contains(&new_id) {
            li.find(Locator::Css("button"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
        }
    }
    b.accept_alert().await.unwrap();
    wait_text(&b, ".keys-cell", "revoked").await;
    let resp = s
        .http
        .get(format!("{}/api/v1/calls", s.base))
        .bearer_auth(&new_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    b.goto(&format!("{}/ui/certs", s.base)).await.unwrap();
    wait_text(&b, "main", "TLS is off").await;
    b.goto(&format!("{}/ui/system", s.base)).await.unwrap();
    let v = wait_text(&b, "#version", ".").await;
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_page_uploads_a_list_shows_progress_and_controls_the_campaign() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let s = e2e::stack(Opts::default()).await;
    // Recipients where it is the middle of the night, so nobody is dialed during the test.
    let hour = time::OffsetDateTime::now_utc().hour() as i32;
    let offset = (3 - hour).rem_euclid(24);
    let offset = if offset > 12 { offset - 24 } else { offset };
    // `Etc/GMT+N` is N hours *behind* UTC.
    let tz = match -offset {
        0 => "Etc/GMT".to_owned(),
        n if n > 0 => format!("Etc/GMT+{n}"),
        n => format!("Etc/GMT{n}"),
    };
    let csv = tempfile::NamedTempFile::with_suffix(".csv").unwrap();
    std::fs::write(
        csv.path(),
        format!(
            "to,timezone,name\n+14155550406,{tz},Ann\n+14155550407,{tz},Bob\nnot-a-number,{tz},X\n"
        ),
    )
    .unwrap();

    let b = driver.browser(412, 915).await;
    login(&b, &s, None).await;
    b.goto(&format!("{}/ui/campaigns", s.base)).await.unwrap();
    let form = b
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#new-campaign"))
        .await
        .unwrap();
    for (name, value) in [
        ("name", "spring"),
        ("tenant", "acme"),
        ("greeting", "Hi {{name}}"),
        ("csv", csv.path().to_str().unwrap()),
    ] {
        form.find(Locator::Css(&format!("input[name={name}]")))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let note = wait_text(&b, "#campaign-msg", "accepted").await;
    assert!(
        note.contains("2 accepted") && note.contains("1 rejected"),
        "{note}"
    );
    assert!(
        note.contains("row 4"),
        "the CSV line of the bad row: {note}"
    );

    let (_, list) = s.api(reqwest::Method::GET, "/api/v1/campaigns", None).await;
    let c = &list["campaigns"][0];
    assert_eq!(c["name"], "spring");
    assert_eq!(c["progress"]["total"], 2);
    let row = format!(
        "#campaign-list tr[data-id=\"{}\"]",
        c["id"].as_str().unwrap()
    );
    wait_text(&b, &format!("{row} .status"), "running").await;

    b.find(Locator::Css(&format!("{row} button[data-action=pause]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, &format!("{row} .status"), "paused").await;

    // The page asks before canceling; the test answers yes.
    b.execute("window.confirm = () => true", vec![])
        .await
        .unwrap();
    b.find(Locator::Css(&format!("{row} button[data-action=cancel]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, &format!("{row} .status"), "canceled").await;
    let (_, c) = s
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/campaigns/{}", c["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(c["status"], "canceled", "{c}");
    assert_eq!(c["progress"]["canceled"], 2, "{c}");
    assert!(s.sim.calls().is_empty(), "nobody was dialed");
    // The results file is offered from the row.
    let href = b
        .find(Locator::Css(&format!("{row} a[download]")))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(href.ends_with("/results.csv"), "{href}");
}

/// A fake microphone for Chromium: 48 kHz mono WAV, 700 ms bursts of a voiced tone with
/// 700 ms pauses (loud enough for the scripted agent to hear turns), looped by Chromium.
fn fake_microphone(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("caller.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 48_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for n in 0..48_000 * 6 {
        let t = n as f64 / 48_000.0;
        let speaking = (t % 1.4) < 0.7;
        let s = if speaking {
            9000.0 * (std::f64::consts::TAU * 300.0 * t).sin()
        } else {
            0.0
        };
        w.write_sample(s as i16).unwrap();
    }
    w.finalize().unwrap();
    path
}

const IN_NETNS: &str = "VOICECTL_TEST_IN_NETNS";

/// The browser call runs in a network namespace that has only `lo`, so neither Chromium nor the
/// server can use any other address: this re-runs the real test there (`unshare -n`, as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_talk_button_calls_the_agent_over_webrtc_on_loopback_only() {
    if find_exe(&["chromium", "chromium-browser", "google-chrome"]).is_none() {
        // Driver::start explains (and fails under CI).
        assert!(Driver::start().is_none());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(&exe)
        .args([
            "--exact",
            "browser::talk_in_a_loopback_only_network",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(IN_NETNS, "1")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && stderr.contains("unshare failed") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but unshare -n is not permitted: {stderr}"
        );
        eprintln!("skipped: cannot create a network namespace: {stderr}");
        return;
    }
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the browser call failed in its namespace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the_talk_button_calls_the_agent_over_webrtc_on_loopback_only, in a namespace"]
async fn talk_in_a_loopback_only_network() {
    assert_eq!(
        std::env::var(IN_NETNS).as_deref(),
        Ok("1"),
        "run inside its network namespace"
    );
    // Nothing but loopback here.
    let addrs = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    assert!(addrs.lines().all(|l| l.ends_with(" lo")), "{addrs}");
    let Some(driver) = Driver::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mic = fake_microphone(dir.path());
    let s = e2e::stack(Opts {
        tweak: Box::new(|c| {
            c.webrtc.udp_port = 0;
            c.webrtc.public_ip = "127.0.0.1".into();
        }),
        ..Default::default()
    })
    .await;
    s.manager.start_webrtc().await.unwrap();
    let b = driver
        .browser_with(
            412,
            915,
            &[
                "--use-fake-ui-for-media-stream".into(),
                "--use-fake-device-for-media-stream".into(),
                format!("--use-file-for-fake-audio-capture={}", mic.display()),
                "--autoplay-policy=no-user-gesture-required".into(),
                // Loopback is the only interface; ICE may use it, and shows real addresses.
                "--allow-loopback-in-peer-connection".into(),
                "--disable-features=WebRtcHideLocalIpsWithMdns".into(),
            ],
        )
        .await;
    login(&b, &s, Some("acme")).await;
    b.goto(&format!("{}/ui/new", s.base)).await.unwrap();
    b.find(Locator::Css("#talk-start"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_any(&b, "#talk-status", &["Connected", "Could not"]).await;
    let status = b
        .find(Locator::Css("#talk-status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(status.starts_with("Connected"), "{status}");

    // Every candidate offered and answered is loopback.
    let sdps = b
        .execute("return [window.__talk.offer, window.__talk.answer]", vec![])
        .await
        .unwrap();
    for sdp in sdps.as_array().unwrap() {
        let cands: Vec<&str> = sdp
            .as_str()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("a=candidate"))
            .collect();
        assert!(
            !cands.is_empty() && cands.iter().all(|c| c.contains(" 127.0.0.1 ")),
            "{cands:?}"
        );
    }

    // The agent's audio reaches the browser: inbound audio energy rises.
    let start = Instant::now();
    let heard_after_ms = loop {
        let v = b
            .execute(
                "const t = window.__talk; return t.pc.getStats().then((st) => { let e = 0; \
                 st.forEach((r) => { if (r.type === 'inbound-rtp' && r.kind === 'audio') e = r.totalAudioEnergy || 0; }); \
                 return [e, performance.now() - t.answeredAt]; });",
                vec![],
            )
            .await
            .unwrap();
        if v[0].as_f64().unwrap_or(0.0) > 0.0 {
            break v[1].as_f64().unwrap();
        }
        assert!(start.elapsed() < WAIT, "no agent audio in the browser: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("agent audio in Chromium {heard_after_ms:.0} ms after the answer");
    assert!(heard_after_ms < 3000.0, "{heard_after_ms} ms");

    let id = b
        .execute("return window.__talk.id", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.get(&id).await["direction"], "web");
    // The caller's turns (the fake microphone) reach the engine, which answers them: both
    // sides are in the transcript.
    let start = Instant::now();
    loop {
        let t = s.transcript(&id).await;
        let caller = t.iter().any(|e| e["speaker"] == "caller");
        let agent = t.iter().filter(|e| e["speaker"] == "agent").count();
        if caller && agent >= 2 {
            break;
        }
        assert!(start.elapsed() < WAIT, "{t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.find(Locator::Css("#talk-stop"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&b, "#talk-status", "Call ended").await;
    let start = Instant::now();
    while s.get(&id).await["status"] != "completed" {
        assert!(start.elapsed() < WAIT, "{}", s.get(&id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.close().await.unwrap();
}

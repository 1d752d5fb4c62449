//! The dashboard's HTTP surface without a browser: `GET /`, one-time logins, API-key logins,
//! session cookies on `/api/v1`, CSRF refusals, tenant isolation, logout. The browser tests
//! are in `browser.rs`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::{Value, json};

use super::e2e::{self, NUMBER, Opts};
use super::support::{Install, Server};
use twilio_sim::{CallerScript, Scenario, Step};
use voicectl::store::{sessions, tenants};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Logs in with a one-time token the way the login page's form does; returns the cookie value.
pub async fn redeem(http: &reqwest::Client, base: &str, token: &str) -> reqwest::Response {
    http.post(format!("{base}/ui/login"))
        .header("origin", base)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

fn session_cookie(resp: &reqwest::Response) -> Option<(String, String)> {
    let raw = resp.headers().get("set-cookie")?.to_str().ok()?.to_owned();
    let value = raw
        .split(';')
        .next()?
        .strip_prefix("voicectl_session=")?
        .to_owned();
    Some((value, raw))
}

async fn login(s: &e2e::Stack, tenant: Option<&str>) -> String {
    let tenant = tenant.map(str::to_owned);
    let (token, _) = s
        .store
        .blocking(move |c| sessions::create_login(c, tenant.as_deref()))
        .unwrap();
    let resp = redeem(&client(), &s.base, &token).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    session_cookie(&resp).expect("session cookie").0
}

async fn with_cookie(
    s: &e2e::Stack,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = client()
        .request(method, format!("{}{path}", s.base))
        .header("cookie", format!("voicectl_session={cookie}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn root_redirects_to_the_dashboard_unless_a_proxy_claims_it() {
    let s = e2e::stack(Opts::default()).await;
    let resp = client().get(format!("{}/", s.base)).send().await.unwrap();
    assert!(resp.status().is_redirection());
    assert_eq!(resp.headers()["location"], "/ui/");
    // Not logged in: the dashboard sends the browser to the login page.
    let resp = client()
        .get(format!("{}/ui/", s.base))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_redirection());
    assert_eq!(resp.headers()["location"], "/ui/login");
    let page = client()
        .get(format!("{}/ui/login", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    assert!(page.text().await.unwrap().contains("name=\"api_key\""));
    // The embedded assets are served.
    let js = client()
        .get(format!("{}/ui/assets/app.js", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
}

#[tokio::test]
async fn a_proxy_route_on_root_keeps_root() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<p>our site</p>").unwrap();
    let root = dir.path().to_str().unwrap().to_owned();
    let s = e2e::stack(Opts {
        tweak: Box::new(move |cfg| {
            cfg.proxy = vec![voicectl::config::ProxyRoute {
                host: None,
                path: "/".into(),
                upstream: None,
                root: Some(root.into()),
            }];
        }),
        ..Default::default()
    })
    .await;
    let resp = client().get(format!("{}/", s.base)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("our site"));
    // The dashboard stays reachable under /ui/, which is ours as a whole.
    let resp = client()
        .get(format!("{}/ui/login", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .get(format!("{}/ui/nope/index.html", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(!resp.text().await.unwrap().contains("our site"));
}

#[tokio::test]
async fn one_time_login_tokens_cannot_be_reused_or_used_late() {
    let s = e2e::stack(Opts::default()).await;
    let (token, _) = s
        .store
        .blocking(|c| sessions::create_login(c, None))
        .unwrap();
    // The link itself only shows a Continue button: a link previewer cannot spend it.
    let page = client()
        .get(format!("{}/ui/login?token={token}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Continue"));
    let resp = redeem(&client(), &s.base, &token).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/ui/");
    let (cookie, raw) = session_cookie(&resp).unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Max-Age=43200", "Path=/"] {
        assert!(raw.contains(attr), "{raw} lacks {attr}");
    }
    assert!(
        !raw.contains("Secure"),
        "plain HTTP cannot carry a Secure cookie: {raw}"
    );
    let (st, v) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/status",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // Reused.
    let again = redeem(&client(), &s.base, &token).await;
    assert_eq!(again.status(), StatusCode::UNAUTHORIZED);
    assert!(session_cookie(&again).is_none());
    assert!(
        again
            .text()
            .await
            .unwrap()
            .contains("used already, expired")
    );

    // Expired.
    let (late, _) = s
        .store
        .blocking(|c| sessions::create_login(c, None))
        .unwrap();
    let id = late.split('_').nth(1).unwrap().to_owned();
    let conn = rusqlite::Connection::open(s.store.path()).unwrap();
    conn.execute(
        "UPDATE ui_sessions SET expires_at = 0 WHERE id = ?1",
        [id.as_str()],
    )
    .unwrap();
    let resp = redeem(&client(), &s.base, &late).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Garbage.
    let resp = redeem(&client(), &s.base, "vl_nonsense").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn forged_expired_and_logged_out_cookies_are_refused() {
    let s = e2e::stack(Opts::default()).await;
    let cookie = login(&s, None).await;
    let last = if cookie.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{last}", &cookie[..cookie.len() - 1]);
    let (st, v) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/calls",
        &forged,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    // A forged cookie on a page: back to the login page.
    let resp = client()
        .get(format!("{}/ui/calls", s.base))
        .header("cookie", format!("voicectl_session={forged}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["location"], "/ui/login");

    // Logout (same-origin) revokes it for good and clears the cookie.
    let resp = client()
        .post(format!("{}/ui/logout", s.base))
        .header("cookie", format!("voicectl_session={cookie}"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(session_cookie(&resp).unwrap().1.contains("Max-Age=0"));
    let (st, _) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/calls",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 401);

    // Expired.
    let cookie = login(&s, None).await;
    let conn = rusqlite::Connection::open(s.store.path()).unwrap();
    conn.execute(
        "UPDATE ui_sessions SET expires_at = 0 WHERE kind = 'session'",
        [],
    )
    .unwrap();
    let (st, _) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/calls",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn an_api_key_logs_in_and_its_revocation_ends_the_session() {
    let s = e2e::stack(Opts::default()).await;
    let http = client();
    let bad = http
        .post(format!("{}/ui/login", s.base))
        .header("sec-fetch-site", "same-origin")
        .form(&[("api_key", "vk_notakey")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let resp = http
        .post(format!("{}/ui/login", s.base))
        .header("sec-fetch-site", "same-origin")
        .form(&[("api_key", s.key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (cookie, _) = session_cookie(&resp).unwrap();
    let (st, v) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/calls",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // The tenant key's session is a tenant session: admin pages and endpoints do not exist.
    let (st, _) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/tenants",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 404);
    let page = http
        .get(format!("{}/ui/tenants", s.base))
        .header("cookie", format!("voicectl_session={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 404);
    let key_id = s.key.split('_').nth(1).unwrap().to_owned();
    s.store
        .blocking(move |c| voicectl::store::keys::revoke(c, &key_id))
        .unwrap();
    let (st, _) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/calls",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn cross_site_state_changes_through_a_session_are_refused() {
    let s = e2e::stack(Opts::default()).await;
    s.sim
        .set_scenario("+14155550301", Scenario::answer(CallerScript::silent()));
    let cookie = login(&s, None).await;
    let body = json!({"to": "+14155550301", "tenant": "acme"});
    let before = s.api(reqwest::Method::GET, "/api/v1/calls", None).await.1;
    for headers in [
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        // No Sec-Fetch-Site and no Origin: not provably ours.
        vec![],
    ] {
        let (st, v) = with_cookie(
            &s,
            reqwest::Method::POST,
            "/api/v1/calls",
            &cookie,
            &headers,
            Some(body.clone()),
        )
        .await;
        assert_eq!(st, 403, "{headers:?}: {v}");
        assert_eq!(v["error"]["code"], "cross_site_refused");
    }
    // Logging in and out from another site is refused too.
    let resp = client()
        .post(format!("{}/ui/logout", s.base))
        .header("cookie", format!("voicectl_session={cookie}"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = client()
        .post(format!("{}/ui/login", s.base))
        .header("sec-fetch-site", "cross-site")
        .form(&[("api_key", s.key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(session_cookie(&resp).is_none());
    // Nothing changed: no call was created, the session still works.
    let after = s.api(reqwest::Method::GET, "/api/v1/calls", None).await.1;
    assert_eq!(before["calls"], after["calls"]);
    let (st, _) = with_cookie(
        &s,
        reqwest::Method::GET,
        "/api/v1/calls",
        &cookie,
        &[],
        None,
    )
    .await;
    assert_eq!(st, 200);
    // The same request from our own page is accepted.
    let (st, v) = with_cookie(
        &s,
        reqwest::Method::POST,
        "/api/v1/calls",
        &cookie,
        &[("sec-fetch-site", "same-origin")],
        Some(body),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (st, v) = with_cookie(
        &s,
        reqwest::Method::POST,
        &format!("/api/v1/calls/{id}/end"),
        &cookie,
        &[("origin", s.base.as_str())],
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn a_tenant_session_sees_only_its_tenant() {
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
        "+14155550302",
        Scenario::answer(CallerScript::new(vec![Step::Hangup])),
    );
    let id = s.call("+14155550302").await;
    let _ = s.follow(&id, Duration::from_secs(10)).await;
    let acme = login(&s, Some("acme")).await;
    let other = login(&s, Some("other")).await;
    for path in [
        format!("/api/v1/calls/{id}"),
        format!("/api/v1/calls/{id}/transcript"),
        format!("/ui/api/calls/{id}/timeline"),
    ] {
        let (st, _) = with_cookie(&s, reqwest::Method::GET, &path, &acme, &[], None).await;
        assert_eq!(st, 200, "{path}");
        let (st, v) = with_cookie(&s, reqwest::Method::GET, &path, &other, &[], None).await;
        assert_eq!(st, 404, "{path}: {v}");
    }
    let (_, v) = with_cookie(&s, reqwest::Method::GET, "/api/v1/calls", &other, &[], None).await;
    assert_eq!(v["calls"], json!([]));
    let (st, _) = with_cookie(
        &s,
        reqwest::Method::POST,
        &format!("/api/v1/calls/{id}/end"),
        &other,
        &[("sec-fetch-site", "same-origin")],
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (_, v) = with_cookie(
        &s,
        reqwest::Method::GET,
        &format!("/ui/api/calls/{id}/timeline"),
        &acme,
        &[],
        None,
    )
    .await;
    assert_eq!(v["call"]["to"], "+14155550302");
    assert!(
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "status"),
        "{v}"
    );
    let _ = NUMBER;
}

#[test]
fn voicectl_open_prints_a_one_time_link_that_logs_in() {
    let install = Install::new();
    install.init();
    install.ok(&["tenant", "add", "acme"]);
    let err = install.fails(&["open", "--tenant", "nobody"]);
    assert!(err.contains("tenant not found"), "{err}");
    let server = Server::start(&install);
    let v = install.json(&["open", "--tenant", "acme"]);
    let url = v["url"].as_str().unwrap().to_owned();
    let base = server.url("");
    assert!(
        url.starts_with(&format!("{base}/ui/login?token=vl_")),
        "{url} vs {base}"
    );
    let token = url.split("token=").nth(1).unwrap().to_owned();
    let human = install.ok(&["open"]);
    assert!(human.contains("/ui/login?token=vl_"), "{human}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cookie = rt.block_on(async {
        let http = client();
        let resp = redeem(&http, &base, &token).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        let (cookie, _) = session_cookie(&resp).unwrap();
        let page = http
            .get(format!("{base}/ui/"))
            .header("cookie", format!("voicectl_session={cookie}"))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        let text = page.text().await.unwrap();
        assert!(text.contains("tenant acme"), "{text}");
        assert!(
            !text.contains("/ui/tenants"),
            "a tenant sees no admin pages"
        );
        assert_eq!(redeem(&http, &base, &token).await.status(), 401);
        // The link's page itself (GET with the token in the query).
        let page = http
            .get(format!("{base}/ui/login?token={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        cookie
    });
    // Neither the login token nor the session cookie reaches the logs.
    std::thread::sleep(Duration::from_millis(200));
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains("/ui/login"), "{logs}");
    let secret = token.rsplit('_').next().unwrap();
    assert!(!logs.contains(secret), "token in logs: {logs}");
    let secret = cookie.rsplit('_').next().unwrap();
    assert!(!logs.contains(secret), "session cookie in logs: {logs}");
}

/// Over HTTPS (the edge marks the request `Scheme::Https`) the cookie is also `Secure`.
#[tokio::test]
async fn the_session_cookie_is_secure_over_https() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let store = voicectl::store::Store::open(&dir.path().join("data")).unwrap();
    let (token, _) = store.blocking(|c| sessions::create_login(c, None)).unwrap();
    let router = voicectl::api::app(voicectl::api::AppState::new(
        store,
        std::sync::Arc::new(voicectl::config::Config::dev()),
    ));
    let mut req = axum::http::Request::post("/ui/login")
        .header("host", "voice.test")
        .header("origin", "https://voice.test")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(axum::body::Body::from(format!("token={token}")))
        .unwrap();
    req.extensions_mut()
        .insert(voicectl::ops::net::Scheme::Https);
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let raw = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(raw.ends_with("; Secure"), "{raw}");
    assert!(
        raw.contains("HttpOnly") && raw.contains("SameSite=Strict"),
        "{raw}"
    );
}

//! The web dashboard under `/ui/` (SPEC §9). The server renders each page's frame (title,
//! navigation for the principal, login and logout forms) and one small ES module embedded in
//! the binary fills it from `/api/v1` with the session cookie, building the DOM with
//! `textContent` only, so call data can never become markup. No CDN, no build step: the
//! assets are `include_str!`ed and served with a strict CSP.
//!
//! Login: `voicectl open` mints a one-time token (store::sessions); `GET /ui/login?token=…`
//! shows a Continue button that POSTs it, so link previewers that fetch URLs cannot spend
//! the token. The login form also takes an API key. Both answer with the session cookie
//! (`HttpOnly`, `SameSite=Strict`, `Secure` over HTTPS, 12 h).

mod pages;

use axum::Router;
use axum::extract::{Form, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::http::auth::{SESSION_COOKIE, cookie, csrf_refused, same_origin};
use crate::http::error::{Json, Path};
use crate::http::{ApiError, AppState, Auth};
use crate::ops::net::Scheme;
use crate::store::calls::{self, Scope};
use crate::store::keys::{self, Principal};
use crate::store::sessions::{self, NewSession, SESSION_TTL_MS};

pub use pages::{PAGES, Page};

const APP_JS: &str = include_str!("assets/app.js");
const TALK_JS: &str = include_str!("assets/talk.js");
const APP_CSS: &str = include_str!("assets/app.css");
const UI_MAX_BODY: usize = 16 * 1024;

pub fn routes() -> Router<AppState> {
    let mut r = Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", axum::routing::post(logout))
        .route("/ui/assets/app.js", get(js))
        .route("/ui/assets/talk.js", get(talk_js))
        .route("/ui/assets/app.css", get(css))
        .route("/ui/calls/{id}", get(call_page))
        .route("/ui/api/calls/{id}/timeline", get(timeline))
        // `/ui/` is ours as a whole (like `/api/v1`): nothing under it reaches a proxy route.
        .route("/ui/{*rest}", axum::routing::any(not_found));
    // Login forms and nothing bigger.
    r = r.layer(axum::extract::DefaultBodyLimit::max(UI_MAX_BODY));
    for page in PAGES {
        r = r.route(
            page.path,
            get(move |State(s): State<AppState>, h: HeaderMap| async move {
                render(&s, &h, page, "").await
            }),
        );
    }
    r
}

async fn not_found() -> Response {
    html(StatusCode::NOT_FOUND, pages::not_found())
}

/// `GET /` when no `[[proxy]]` route claims it: the dashboard.
pub fn root_redirect() -> Response {
    Redirect::to("/ui/").into_response()
}

/// Headers every dashboard response carries: nothing from elsewhere runs or loads, the page
/// cannot be framed (clickjacking), and no URL (a login token) leaks in a Referer.
fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

fn html(status: StatusCode, body: String) -> Response {
    harden(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

async fn js() -> Response {
    script(APP_JS)
}

async fn talk_js() -> Response {
    script(TALK_JS)
}

fn script(body: &'static str) -> Response {
    harden(
        (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}

async fn css() -> Response {
    harden(
        (
            [
                (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            APP_CSS,
        )
            .into_response(),
    )
}

/// The principal of the request's session cookie, if it has a live one.
async fn session_of(s: &AppState, headers: &HeaderMap) -> Result<Option<Principal>, ApiError> {
    let Some(c) = cookie(headers, SESSION_COOKIE).map(str::to_owned) else {
        return Ok(None);
    };
    Ok(s.store()
        .read(move |conn| sessions::authenticate(conn, &c))
        .await?)
}

async fn call_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    render(&s, &headers, &pages::CALL, &id).await
}

async fn render(s: &AppState, headers: &HeaderMap, page: &Page, arg: &str) -> Response {
    match session_of(s, headers).await {
        Ok(Some(p)) if page.admin && !matches!(p, Principal::Admin { .. }) => html(
            StatusCode::NOT_FOUND,
            pages::frame(&p, page, arg, "<p>Not found.</p>"),
        ),
        Ok(Some(p)) => html(StatusCode::OK, pages::frame(&p, page, arg, "")),
        Ok(None) => harden(Redirect::to("/ui/login").into_response()),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    html(StatusCode::OK, pages::login(q.token.as_deref(), None))
}

#[derive(Deserialize)]
struct LoginForm {
    token: Option<String>,
    api_key: Option<String>,
}

fn session_cookie(req_https: bool, value: &str, max_age_s: i64) -> HeaderValue {
    let secure = if req_https { "; Secure" } else { "" };
    // Cookie values we mint are `vs_` + base62, so the header is always valid.
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("voicectl_session=; Path=/; Max-Age=0"))
}

/// `POST /ui/login`: a one-time token or an API key in, a session cookie out.
async fn login(State(s): State<AppState>, req: Request) -> Response {
    let https = Scheme::of(req.extensions()) == Scheme::Https;
    if !same_origin(req.headers()) {
        return csrf_refused().into_response();
    }
    let form =
        <Form<LoginForm> as axum::extract::FromRequest<AppState>>::from_request(req, &s).await;
    let Ok(Form(form)) = form else {
        return html(
            StatusCode::BAD_REQUEST,
            pages::login(None, Some("Send the login form.")),
        );
    };
    let token = form.token.filter(|t| !t.trim().is_empty());
    let api_key = form.api_key.filter(|k| !k.trim().is_empty());
    let result: Result<Option<NewSession>, ApiError> = match (token, api_key) {
        (Some(t), _) => {
            let t = t.trim().to_owned();
            s.store()
                .run(move |c| sessions::redeem_login(c, &t))
                .await
                .map_err(Into::into)
        }
        (None, Some(k)) => {
            let k = k.trim().to_owned();
            s.store()
                .run(move |c| match keys::authenticate(c, &k)? {
                    Some(p) => sessions::create_from_key(c, &p).map(Some),
                    None => Ok(None),
                })
                .await
                .map_err(Into::into)
        }
        (None, None) => {
            return html(
                StatusCode::BAD_REQUEST,
                pages::login(None, Some("Enter an API key.")),
            );
        }
    };
    match result {
        Ok(Some(session)) => {
            tracing::info!(principal = ?session.principal, "dashboard login");
            let mut resp = Redirect::to("/ui/").into_response();
            resp.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(https, &session.cookie, SESSION_TTL_MS / 1000),
            );
            harden(resp)
        }
        Ok(None) => html(
            StatusCode::UNAUTHORIZED,
            pages::login(
                None,
                Some(
                    "That login link or key is not valid: it was used already, expired, or revoked. \
                     Run `voicectl open` for a new link.",
                ),
            ),
        ),
        Err(e) => e.into_response(),
    }
}

/// `POST /ui/logout`: revokes the session and clears the cookie.
async fn logout(State(s): State<AppState>, req: Request) -> Response {
    if !same_origin(req.headers()) {
        return csrf_refused().into_response();
    }
    let https = Scheme::of(req.extensions()) == Scheme::Https;
    if let Some(c) = cookie(req.headers(), SESSION_COOKIE).map(str::to_owned)
        && let Err(e) = s.store().run(move |conn| sessions::revoke(conn, &c)).await
    {
        return ApiError::from(e).into_response();
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(https, "", 0));
    harden(resp)
}

/// A call's timeline for its page: the record, its status events with their times, and the
/// transcript. Another tenant's call is a 404, as everywhere.
async fn timeline(
    State(s): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let scope: Scope = auth.scope();
    let (call, events, transcript) = s
        .store()
        .read(move |c| {
            let call = calls::get(c, scope, &id)?;
            let events = calls::events(c, &id)?;
            let transcript = calls::transcript(c, scope, &id)?;
            Ok((call, events, transcript))
        })
        .await?;
    let events: Vec<Value> = events
        .into_iter()
        .map(|(at, kind, data)| {
            json!({ "at": crate::domain::timefmt::rfc3339(at), "kind": kind, "data": data })
        })
        .collect();
    Ok(Json(json!({
        "call": call,
        "events": events,
        "transcript": transcript,
    })))
}

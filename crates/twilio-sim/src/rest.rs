//! Twilio's REST API for calls (PROTOCOLS §3): Basic auth, form bodies with repeated keys,
//! snake_case JSON, Twilio's error shape, and 429 over the concurrency limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::call::{self, OutboundRequest, StatusSubscription};
use super::model::{CallStatus, EndReason, RestLogEntry, SimCallRecord};
use super::{Inner, rfc2822};

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new().fallback(handle).with_state(inner)
}

/// An error response in Twilio's shape.
struct TwilioError {
    status: u16,
    code: u32,
    message: String,
}

fn err(status: u16, code: u32, message: impl Into<String>) -> TwilioError {
    TwilioError {
        status,
        code,
        message: message.into(),
    }
}

/// Twilio's message for a forced error code, so forced and real errors look alike.
fn default_message(code: u32) -> &'static str {
    match code {
        20003 => "Authenticate",
        20404 => "The requested resource was not found",
        20429 => "Too Many Requests",
        20500 => "Internal Server Error",
        21211 => "Invalid 'To' Phone Number",
        21220 => "Invalid call state",
        _ => "Error",
    }
}

impl TwilioError {
    fn body(&self) -> Value {
        json!({
            "code": self.code,
            "message": self.message,
            "more_info": format!("https://www.twilio.com/docs/errors/{}", self.code),
            "status": self.status,
        })
    }
}

type Reply = Result<(StatusCode, Value), TwilioError>;

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let reply = answer(&inner, &method, &path, &headers, &body).await;
    let (status, body, code) = match reply {
        Ok((s, v)) => (s, v, None),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.body(),
            Some(e.code),
        ),
    };
    inner.state().rest_log.push(RestLogEntry {
        method: method.to_string(),
        path,
        status: status.as_u16(),
        code,
    });
    if status == StatusCode::NO_CONTENT {
        return status.into_response();
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

enum Route<'a> {
    Account(&'a str),
    Calls(&'a str),
    Call(&'a str, &'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/2010-04-01/Accounts/")?;
    match rest.split_once('/') {
        None => Some(Route::Account(rest.strip_suffix(".json")?)),
        Some((acct, "Calls.json")) => Some(Route::Calls(acct)),
        Some((acct, tail)) => {
            let sid = tail.strip_prefix("Calls/")?.strip_suffix(".json")?;
            (!sid.contains('/')).then_some(Route::Call(acct, sid))
        }
    }
}

async fn answer(
    inner: &Arc<Inner>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Reply {
    let _guard = InFlight(&inner.in_flight);
    let n = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let (max, latency) = {
        let st = inner.state();
        (st.max_concurrent, st.rest_latency)
    };
    if n > max {
        // "Never processed and always safe to retry" (PROTOCOLS §3.5).
        return Err(err(429, 20429, "Too Many Requests"));
    }
    if latency > Duration::ZERO {
        tokio::time::sleep(latency).await;
    }
    let not_found = || {
        err(
            404,
            20404,
            format!("The requested resource {path} was not found"),
        )
    };
    let route = route(path).ok_or_else(not_found)?;
    if matches!(route, Route::Calls(_)) && *method == Method::POST {
        let forced = inner.state().forced.pop_front();
        if let Some(f) = forced {
            return Err(err(f.status, f.code, default_message(f.code)));
        }
    }
    authenticate(inner, headers)?;
    let acct = match route {
        Route::Account(a) | Route::Calls(a) | Route::Call(a, _) => a,
    };
    if acct != inner.cfg.account_sid {
        return Err(not_found());
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    match (route, method) {
        (Route::Account(_), &Method::GET) => Ok((StatusCode::OK, account_json(inner))),
        (Route::Calls(_), &Method::POST) => create(inner, params),
        (Route::Call(_, sid), &Method::GET) => {
            let cell = inner.call(sid).ok_or_else(not_found)?;
            let rec = cell.rec().clone();
            Ok((StatusCode::OK, call_json(inner, &rec)))
        }
        (Route::Call(_, sid), &Method::POST) => {
            let cell = inner.call(sid).ok_or_else(not_found)?;
            update(inner, &cell, &params)
        }
        (Route::Call(_, sid), &Method::DELETE) => {
            inner.call(sid).ok_or_else(not_found)?;
            // The record stays: tests inspect calls after the app deletes them.
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        _ => Err(err(405, 20004, "Method not allowed")),
    }
}

fn authenticate(inner: &Inner, headers: &HeaderMap) -> Result<(), TwilioError> {
    let unauthorized = || err(401, 20003, "Authenticate");
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
        .ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| unauthorized())?;
    let expected = format!("{}:{}", inner.cfg.account_sid, inner.cfg.auth_token);
    if decoded == expected.as_bytes() {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// E.164, or a Twilio Client / SIP address.
fn valid_party(s: &str) -> bool {
    is_e164(s) || s.starts_with("client:") || s.starts_with("sip:")
}

/// `+` and 8 to 15 digits, the first not 0: what Twilio accepts as a phone number.
fn is_e164(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

fn valid_url(s: &str) -> bool {
    (s.starts_with("https://") || s.starts_with("http://")) && s.len() > "http://".len()
}

fn method_param(params: &[(String, String)], key: &str) -> Result<String, TwilioError> {
    match param(params, key) {
        None => Ok("POST".into()),
        Some(m) if m.eq_ignore_ascii_case("GET") => Ok("GET".into()),
        Some(m) if m.eq_ignore_ascii_case("POST") => Ok("POST".into()),
        Some(m) => Err(err(
            400,
            21200,
            format!("{key} must be GET or POST, not {m:?}"),
        )),
    }
}

fn seconds_param(
    params: &[(String, String)],
    key: &str,
    default: u64,
    max: u64,
) -> Result<Duration, TwilioError> {
    match param(params, key) {
        None => Ok(Duration::from_secs(default)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= 1 => Ok(Duration::from_secs(n.min(max))),
            _ => Err(err(
                400,
                21200,
                format!("{key} must be a positive integer, not {v:?}"),
            )),
        },
    }
}

fn create(inner: &Arc<Inner>, params: Vec<(String, String)>) -> Reply {
    let to = param(&params, "To").ok_or_else(|| err(400, 21201, "No 'To' number is specified"))?;
    if !valid_party(to) {
        return Err(err(400, 21211, format!("Invalid 'To' Phone Number: {to}")));
    }
    let from = param(&params, "From")
        .ok_or_else(|| err(400, 21603, "A 'From' phone number is required."))?;
    if !valid_party(from) {
        return Err(err(
            400,
            21212,
            format!("Invalid 'From' Phone Number: {from}"),
        ));
    }
    let url = param(&params, "Url").map(str::to_owned);
    // If both are given, Twilio uses Url and ignores Twiml (PROTOCOLS §3.2).
    let twiml = match url {
        Some(_) => None,
        None => param(&params, "Twiml").map(str::to_owned),
    };
    if url.is_none() && twiml.is_none() {
        return Err(err(
            400,
            21200,
            if param(&params, "ApplicationSid").is_some() {
                "ApplicationSid is not supported by the simulator; use Url or Twiml"
            } else {
                "Url, Twiml or ApplicationSid is required"
            },
        ));
    }
    if let Some(u) = &url
        && !valid_url(u)
    {
        return Err(err(400, 21205, format!("Url is not a valid URL: {u}")));
    }
    if let Some(t) = &twiml
        && t.chars().count() > 4000
    {
        return Err(err(400, 21200, "Twiml is limited to 4000 characters"));
    }
    let method = method_param(&params, "Method")?;
    let status = match param(&params, "StatusCallback") {
        None => None,
        Some(u) if !valid_url(u) => {
            return Err(err(400, 21609, format!("Invalid StatusCallback URL: {u}")));
        }
        Some(u) => {
            let mut events = Vec::new();
            for (_, v) in params.iter().filter(|(k, _)| k == "StatusCallbackEvent") {
                // Repeated keys per the API; space-separated values are accepted too.
                for e in v.split_whitespace() {
                    if !matches!(e, "initiated" | "ringing" | "answered" | "completed") {
                        return Err(err(
                            400,
                            21200,
                            format!("Invalid StatusCallbackEvent {e:?}"),
                        ));
                    }
                    events.push(e.to_owned());
                }
            }
            Some(StatusSubscription {
                url: u.to_owned(),
                method: method_param(&params, "StatusCallbackMethod")?,
                events,
            })
        }
    };
    let timeout = seconds_param(&params, "Timeout", 60, 600)?;
    let default_limit = inner.cfg.timing.default_time_limit.as_secs().max(1);
    let time_limit = seconds_param(&params, "TimeLimit", default_limit, 24 * 3600)?;
    let machine_detection = match param(&params, "MachineDetection") {
        None => None,
        Some(m @ ("Enable" | "DetectMessageEnd")) => Some(m.to_owned()),
        Some(m) => {
            return Err(err(
                400,
                21200,
                format!("MachineDetection must be Enable or DetectMessageEnd, not {m:?}"),
            ));
        }
    };
    let async_amd = param(&params, "AsyncAmd").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let amd_callback = match param(&params, "AsyncAmdStatusCallback") {
        None => None,
        Some(u) if !valid_url(u) => {
            return Err(err(
                400,
                21200,
                format!("Invalid AsyncAmdStatusCallback URL: {u}"),
            ));
        }
        Some(u) => Some((
            u.to_owned(),
            method_param(&params, "AsyncAmdStatusCallbackMethod")?,
        )),
    };
    let req = OutboundRequest {
        to: to.to_owned(),
        from: from.to_owned(),
        url,
        method,
        twiml,
        status,
        timeout,
        time_limit,
        machine_detection,
        async_amd,
        amd_callback,
        raw: params.clone(),
    };
    let rec = call::start_outbound(inner, req);
    Ok((StatusCode::CREATED, call_json(inner, &rec)))
}

fn update(inner: &Arc<Inner>, cell: &super::CallCell, params: &[(String, String)]) -> Reply {
    // If both are given, Twilio uses Url and ignores Twiml (PROTOCOLS §3.2).
    let redirect = match (param(params, "Url"), param(params, "Twiml")) {
        (Some(url), _) => Some(super::call::Redirect::Url {
            url: url.to_owned(),
            method: param(params, "Method").unwrap_or("POST").to_owned(),
        }),
        (None, Some(xml)) => Some(super::call::Redirect::Twiml(
            super::twiml::parse(xml)
                .map_err(|e| err(400, 21200, format!("Twiml is not valid TwiML: {e}")))?,
        )),
        (None, None) => None,
    };
    if let Some(to) = redirect {
        // The simulator redirects answered calls only (Twilio would also accept a ringing
        // call's new Url, run once it is answered).
        let status = cell.rec().status;
        if status != CallStatus::InProgress {
            return Err(err(
                400,
                21220,
                format!("Invalid call state: the call is {status}"),
            ));
        }
        cell.redirect(to);
    }
    let invalid_state =
        |s: CallStatus| err(400, 21220, format!("Invalid call state: the call is {s}"));
    match param(params, "Status") {
        None => {}
        Some("completed") => {
            inner
                .end_call_with(cell, |s| {
                    Some(if s == CallStatus::InProgress {
                        (CallStatus::Completed, EndReason::RestCompleted)
                    } else {
                        // Hanging up a call that never connected cancels it.
                        (CallStatus::Canceled, EndReason::RestCanceled)
                    })
                })
                .map_err(invalid_state)?;
        }
        Some("canceled") => {
            inner
                .end_call_with(cell, |s| {
                    matches!(s, CallStatus::Queued | CallStatus::Ringing)
                        .then_some((CallStatus::Canceled, EndReason::RestCanceled))
                })
                .map_err(invalid_state)?;
        }
        Some(other) => {
            return Err(err(
                400,
                21200,
                format!("Status must be completed or canceled, not {other:?}"),
            ));
        }
    }
    let rec = cell.rec().clone();
    Ok((StatusCode::OK, call_json(inner, &rec)))
}

fn at(rec: &SimCallRecord, ms: Option<u64>) -> Value {
    match ms {
        Some(ms) => Value::String(rfc2822(rec.created_at + Duration::from_millis(ms))),
        None => Value::Null,
    }
}

/// The Call resource (PROTOCOLS §3.2).
pub(crate) fn call_json(inner: &Inner, rec: &SimCallRecord) -> Value {
    let acct = &inner.cfg.account_sid;
    let base = format!("/2010-04-01/Accounts/{acct}/Calls/{}", rec.sid);
    let sub = |name: &str| format!("{base}/{name}.json");
    let duration = rec
        .duration_secs
        .filter(|_| rec.answered_at_ms.is_some() && rec.status.is_terminal())
        .map(|d| d.to_string());
    json!({
        "account_sid": acct,
        "annotation": null,
        "answered_by": rec.answered_by,
        "api_version": "2010-04-01",
        "caller_name": null,
        "date_created": rfc2822(rec.created_at),
        "date_updated": rfc2822(rec.updated_at),
        "direction": rec.direction.as_str(),
        "duration": duration,
        "end_time": at(rec, rec.ended_at_ms),
        "forwarded_from": null,
        "from": rec.from,
        "from_formatted": rec.from,
        "group_sid": null,
        "parent_call_sid": null,
        "phone_number_sid": null,
        "price": null,
        "price_unit": "USD",
        "queue_time": "0",
        "sid": rec.sid,
        "start_time": at(rec, rec.dialed_at_ms),
        "status": rec.status.as_str(),
        "subresource_uris": {
            "notifications": sub("Notifications"),
            "recordings": sub("Recordings"),
            "payments": sub("Payments"),
            "events": sub("Events"),
            "siprec": sub("Siprec"),
            "streams": sub("Streams"),
            "transcriptions": sub("Transcriptions"),
            "user_defined_message_subscriptions": sub("UserDefinedMessageSubscriptions"),
            "user_defined_messages": sub("UserDefinedMessages"),
        },
        "to": rec.to,
        "to_formatted": rec.to,
        "trunk_sid": null,
        "uri": format!("{base}.json"),
    })
}

fn account_json(inner: &Inner) -> Value {
    let acct = &inner.cfg.account_sid;
    let now = rfc2822(SystemTime::now());
    let base = format!("/2010-04-01/Accounts/{acct}");
    json!({
        "auth_token": inner.cfg.auth_token,
        "date_created": now,
        "date_updated": now,
        "friendly_name": "voicectl simulator",
        "owner_account_sid": acct,
        "sid": acct,
        "status": "active",
        "subresource_uris": {
            "calls": format!("{base}/Calls.json"),
        },
        "type": "Full",
        "uri": format!("{base}.json"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_twilio_paths() {
        assert!(matches!(
            route("/2010-04-01/Accounts/AC1.json"),
            Some(Route::Account("AC1"))
        ));
        assert!(matches!(
            route("/2010-04-01/Accounts/AC1/Calls.json"),
            Some(Route::Calls("AC1"))
        ));
        assert!(matches!(
            route("/2010-04-01/Accounts/AC1/Calls/CA2.json"),
            Some(Route::Call("AC1", "CA2"))
        ));
        for bad in [
            "/",
            "/2010-04-01/Accounts/AC1",
            "/2010-04-01/Accounts/AC1/Calls/CA2/Streams.json",
            "/2010-04-01/Accounts/AC1/Messages.json",
        ] {
            assert!(route(bad).is_none(), "{bad}");
        }
    }
}

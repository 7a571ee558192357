//! The Africa's Talking dialect: `POST /version1/messaging`, form-encoded,
//! `apiKey` header, fields `username`, `to` (comma-separated numbers),
//! `message`, `from` (optional), answered per recipient in
//! `SMSMessageData.Recipients[]` with HTTP 201, as
//! <https://developers.africastalking.com/docs/sms/sending/bulk> shows.
//!
//! - With `--credential api_key=...` (and `username=...`) given, the
//!   `apiKey` header (and `username` field) must match exactly; otherwise
//!   any non-empty value passes. A wrong one gets HTTP 401 `The supplied
//!   authentication is invalid` in plain text, as the live API answers (the
//!   documentation shows no answer to a bad key).
//! - A body that is not form-encoded, or lacks `username`, `to` or
//!   `message`, gets HTTP 400 with a plain-text reason (the documentation
//!   shows no answer to a malformed request); a request that does not
//!   `Accept: application/json` gets 406, since the fake speaks JSON only.
//! - A number that is not `+` and 8 to 15 digits is that recipient's
//!   documented `403 InvalidPhoneNumber`.
//! - A drawn failure answers each recipient `501 GatewayError`, a drawn
//!   rejection `406 UserInBlacklist` (documented recipient statuses); drawn
//!   throttling answers HTTP 429 with `Retry-After: 1`, since Africa's
//!   Talking documents no throttling answer of its own.
//! - Otherwise each recipient is `101 Success` with the fake's
//!   `fake-<run>-N` id as `messageId`. The API takes no idempotency key, so
//!   none is counted.
//!
//! With `--dlr-url` each accepted recipient gets its delivery reports as
//! Africa's Talking posts them
//! (<https://developers.africastalking.com/docs/sms/notifications>,
//! "Delivery Reports"): form-encoded `POST`s of `id`, `status`,
//! `phoneNumber` and `networkCode` (`99999`, the page's "Athena (sandbox
//! environment)"), first the intermediate `Submitted`, then the final
//! `Success`, or for a `--dlr-fail-rate` share `Failed` with
//! `failureReason=UserDoesNotExist` (documented values). No `retryCount`:
//! the page says it "only applies for premium SMS messages". Nothing is
//! signed, as Africa's Talking signs nothing: the `--dlr-url` is used as
//! given, so it carries the service's path token
//! (`.../v1/callbacks/<instance>/<callback_token>`).

use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{Callback, FakeState, Fate, Simulated};

pub(super) fn routes() -> Router<FakeState> {
    Router::new().route("/version1/messaging", post(send))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, [(CONTENT_TYPE, "text/plain")], text).into_response()
}

fn header(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Whether `given` is what the fake was told to expect as `credential`
/// (or, told nothing, is present at all).
fn matches(state: &FakeState, credential: &str, given: &str) -> bool {
    match state.credential(credential) {
        Some(expected) => given == expected,
        None => !given.trim().is_empty(),
    }
}

fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

async fn send(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !matches(&state, "api_key", header(&headers, "apikey")) {
        return plain(
            StatusCode::UNAUTHORIZED,
            "The supplied authentication is invalid",
        );
    }
    let content_type = header(&headers, CONTENT_TYPE);
    let form_encoded = content_type.split(';').next().is_some_and(|t| {
        t.trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    });
    if !form_encoded {
        return plain(
            StatusCode::BAD_REQUEST,
            "Request body must be application/x-www-form-urlencoded",
        );
    }
    if !header(&headers, ACCEPT).contains("application/json") {
        return plain(
            StatusCode::NOT_ACCEPTABLE,
            "This fake answers JSON only: send Accept: application/json",
        );
    }
    let field = |name: &str| {
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (username, to, message) = (field("username"), field("to"), field("message"));
    if username.is_empty() {
        return plain(StatusCode::BAD_REQUEST, "Missing field: username");
    }
    if !matches(&state, "username", &username) {
        return plain(
            StatusCode::UNAUTHORIZED,
            "The supplied authentication is invalid",
        );
    }
    if to.trim().is_empty() {
        return plain(StatusCode::BAD_REQUEST, "Missing field: to");
    }
    if message.is_empty() {
        return plain(StatusCode::BAD_REQUEST, "Missing field: message");
    }
    let numbers: Vec<&str> = to.split(',').map(str::trim).collect();
    let failed = |code: u16, status: &str| {
        let recipients = numbers
            .iter()
            .map(|n| refused(n, code, status))
            .collect::<Vec<_>>();
        answer(&recipients, 0)
    };
    match state.draw().await {
        Some(Simulated::Failure) => return failed(501, "GatewayError"),
        Some(Simulated::Rejection) => return failed(406, "UserInBlacklist"),
        Some(Simulated::Throttling) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(RETRY_AFTER, "1"), (CONTENT_TYPE, "text/plain")],
                "Too Many Requests",
            )
                .into_response()
        }
        None => {}
    }
    let mut sent = 0;
    let recipients: Vec<Value> = numbers
        .iter()
        .map(|number| {
            if !is_e164(number) {
                return refused(number, 403, "InvalidPhoneNumber");
            }
            sent += 1;
            let id = state.accept(number, "");
            call_back(&state, &id, number);
            json!({
                "statusCode": 101,
                "number": number,
                "status": "Success",
                "cost": "KES 0.8000",
                "messageId": id,
            })
        })
        .collect();
    answer(&recipients, sent)
}

/// Posts an accepted message's delivery reports, if the fake calls back.
fn call_back(state: &FakeState, id: &str, number: &str) {
    let Some((fate, reports)) = state.fate() else {
        return;
    };
    let report = |status: &str, reason: Option<&str>| {
        let mut fields = vec![
            ("id", id),
            ("status", status),
            ("phoneNumber", number),
            ("networkCode", "99999"),
        ];
        fields.extend(reason.map(|r| ("failureReason", r)));
        Callback::form(&reports.url, &fields)
    };
    let last = match fate {
        Fate::Delivered => report("Success", None),
        Fate::Failed => report("Failed", Some("UserDoesNotExist")),
    };
    state.report(vec![report("Submitted", None)], vec![last]);
}

fn refused(number: &str, code: u16, status: &str) -> Value {
    json!({
        "statusCode": code,
        "number": number,
        "status": status,
        "cost": "0",
        "messageId": "None",
    })
}

/// The documented answer: a summary and one entry per recipient.
fn answer(recipients: &[Value], sent: usize) -> Response {
    let cost = format!("{:.4}", 0.8 * sent as f64);
    let summary = if sent == 0 {
        format!("Sent to 0/{} Total Cost: 0", recipients.len())
    } else {
        format!("Sent to {sent}/{} Total Cost: KES {cost}", recipients.len())
    };
    let body = json!({"SMSMessageData": {"Message": summary, "Recipients": recipients}});
    (StatusCode::CREATED, Json(body)).into_response()
}

//! The generic dialect (reference section 6): `POST /messages` with
//! `{"to", "text", "from"?}` and `Idempotency-Key`, answering
//! `{"id": "fake-<run>-N"}`; 503, 400 or 429 with `Retry-After: 1` when the
//! call draws a failure, a rejection or throttling.
//!
//! Its delivery reports (with `--dlr-url`): JSON `{"id", "status",
//! "errorCode"?}` with `status` `delivered`, or `undelivered` and error
//! code `EC_ABSENT`; signed as the reference's "Delivery reports" says
//! (`X-Timestamp`, `X-Signature: sha256=<hex HMAC-SHA256 of
//! "<timestamp>.<body>">`) when given `--credential callback_secret=...`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{Callback, FakeState, Fate, Simulated};

#[derive(Deserialize)]
struct Message {
    to: String,
    text: String,
    #[allow(dead_code)]
    from: Option<String>,
}

pub(super) fn routes() -> Router<FakeState> {
    Router::new().route("/messages", post(accept))
}

async fn accept(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(message) = serde_json::from_slice::<Message>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "need to and text"})),
        )
            .into_response();
    };
    if message.text.is_empty() || !message.to.starts_with('+') {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "bad to or text"})),
        )
            .into_response();
    }
    if let Some(token) = state.credential("token") {
        let expected = format!("Bearer {token}");
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "bad token"})),
            )
                .into_response();
        }
    }
    match state.draw().await {
        Some(Simulated::Failure) => {
            let body = Json(json!({"error": "simulated failure"}));
            return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        }
        Some(Simulated::Rejection) => {
            let body = Json(json!({"error": "simulated rejection"}));
            return (StatusCode::BAD_REQUEST, body).into_response();
        }
        Some(Simulated::Throttling) => {
            let body = Json(json!({"error": "simulated throttling"}));
            let retry_after = [(axum::http::header::RETRY_AFTER, "1")];
            return (StatusCode::TOO_MANY_REQUESTS, retry_after, body).into_response();
        }
        None => {}
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let id = state.accept(&message.to, key);
    if let Some((fate, reports)) = state.fate() {
        let report = match fate {
            Fate::Delivered => json!({"id": id, "status": "delivered"}),
            Fate::Failed => json!({"id": id, "status": "undelivered", "errorCode": "EC_ABSENT"}),
        };
        let mut callback = Callback::json(&reports.url, &report);
        if let Some(secret) = state.credential("callback_secret") {
            sign(&mut callback, secret);
        }
        state.report(Vec::new(), vec![callback]);
    }
    (StatusCode::OK, Json(json!({"id": id}))).into_response()
}

/// Signs a report as a generic provider with a callback secret does.
fn sign(callback: &mut Callback, secret: &str) {
    use hmac::{Hmac, Mac};
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string();
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&callback.body);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    callback.headers.push(("x-timestamp", timestamp));
    callback.headers.push(("x-signature", signature));
}

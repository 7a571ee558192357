//! The generic dialect (reference section 6): `POST /messages` with
//! `{"to", "text", "from"?}` and `Idempotency-Key`, answering
//! `{"id": "fake-<run>-N"}`; 503, 400 or 429 with `Retry-After: 1` when the
//! call draws a failure, a rejection or throttling.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{FakeState, Simulated};

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
    (StatusCode::OK, Json(json!({"id": id}))).into_response()
}

//! The Vonage dialect: `POST /sms/json` of the SMS API
//! (<https://developer.vonage.com/en/api/sms>).
//!
//! A request is checked as the API documents it, and a wrong one gets
//! Vonage's own answer, HTTP 200 with a non-zero status
//! (<https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms>):
//!
//! - credentials: `Authorization: Basic base64(api_key:api_secret)`, or
//!   `api_key` and `api_secret` body fields (the older documented form);
//!   none at all is status "2" Missing Parameters. With `--credential
//!   api_key=...` / `--credential api_secret=...` they must match exactly,
//!   else any `api_key` of 8 characters and `api_secret` of 6 to 32 (the
//!   reference's lengths) will do; a mismatch is status "4" Invalid
//!   Credentials;
//! - the body: form-encoded (the reference) or JSON (what the Node SDK
//!   sends); `from`, `to` and `text` are required (status "2"); `to` must
//!   be 7 to 15 digits (the reference's pattern, so no `+`), `type` one of
//!   the reference's values and `client-ref` at most 100 characters (the
//!   SDKs' limit), else status "3" Invalid Parameters.
//!
//! `error-text` names the field in the words of the reference's example
//! ("Missing to param"), or else gives the status's meaning from the error
//! table; Vonage documents no other wording.
//!
//! A call that draws a failure is answered status "5" Internal Error, a
//! rejection status "7" Number Barred, throttling status "1" Throttled,
//! all HTTP 200 as Vonage does. Otherwise the message is queued: one
//! `messages[]` entry per part (counted by
//! [`crate::domain::count_segments`]), the first part's `message-id` the
//! fake's id and the others `<id>-<part>`, `client-ref` echoed, and the
//! `client-ref` counted as the idempotency key in `/stats`.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{basic_credentials, FakeState, Simulated};
use crate::domain::count_segments;

/// The `type` values of the API reference.
const TYPES: [&str; 6] = ["text", "binary", "wappush", "unicode", "vcal", "vcard"];
/// Longest `client-ref` (the limit of Vonage's SDKs).
const MAX_CLIENT_REF: usize = 100;

pub(super) fn routes() -> Router<FakeState> {
    Router::new().route("/sms/json", post(send))
}

/// A one-entry answer with a non-zero status (the reference's
/// `ErrorMessage`: `status` and `error-text`).
fn failure(status: &str, text: &str) -> Response {
    Json(json!({
        "message-count": "1",
        "messages": [{"status": status, "error-text": text}],
    }))
    .into_response()
}

async fn send(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let params = parameters(&headers, &body);
    let field = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let credentials = basic_credentials(&headers).or_else(|| {
        Some((
            field("api_key")?.to_owned(),
            field("api_secret")?.to_owned(),
        ))
    });
    let Some((api_key, api_secret)) = credentials else {
        return failure("2", "Missing api_key or api_secret param");
    };
    for name in ["from", "to", "text"] {
        if field(name).is_none() {
            return failure("2", &format!("Missing {name} param"));
        }
    }
    let key_ok = match state.credential("api_key") {
        Some(expected) => api_key == expected,
        None => api_key.chars().count() == 8,
    };
    let secret_ok = match state.credential("api_secret") {
        Some(expected) => api_secret == expected,
        None => (6..=32).contains(&api_secret.chars().count()),
    };
    if !(key_ok && secret_ok) {
        return failure("4", "Invalid Credentials");
    }
    let to = field("to").unwrap_or_default();
    if !(7..=15).contains(&to.len()) || !to.bytes().all(|b| b.is_ascii_digit()) {
        return failure("3", "Invalid to param");
    }
    if field("type").is_some_and(|t| !TYPES.contains(&t)) {
        return failure("3", "Invalid type param");
    }
    let client_ref = field("client-ref").unwrap_or_default();
    if client_ref.chars().count() > MAX_CLIENT_REF {
        return failure("3", "Invalid client-ref param");
    }
    match state.draw().await {
        Some(Simulated::Failure) => return failure("5", "Internal Error"),
        Some(Simulated::Rejection) => return failure("7", "Number barred."),
        Some(Simulated::Throttling) => return failure("1", "Throttled"),
        None => {}
    }
    let id = state.accept(to, client_ref);
    let parts = count_segments(field("text").unwrap_or_default()).1;
    let messages: Vec<Value> = (1..=parts)
        .map(|part| {
            let mut entry = json!({
                "to": to,
                "message-id": if part == 1 { id.clone() } else { format!("{id}-{part}") },
                "status": "0",
                "remaining-balance": "3.14159265",
                "message-price": "0.03330000",
                "network": "12345",
            });
            if !client_ref.is_empty() {
                entry["client-ref"] = json!(client_ref);
            }
            entry
        })
        .collect();
    Json(json!({"message-count": parts.to_string(), "messages": messages})).into_response()
}

/// The request's fields, from a form or a JSON object body (strings,
/// numbers and booleans as text); anything else has none.
fn parameters(headers: &HeaderMap, body: &[u8]) -> HashMap<String, String> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return url::form_urlencoded::parse(body).into_owned().collect();
    }
    if content_type.starts_with("application/json") {
        if let Ok(Value::Object(object)) = serde_json::from_slice(body) {
            return object
                .into_iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k, s)),
                    Value::Number(_) | Value::Bool(_) => Some((k, v.to_string())),
                    _ => None,
                })
                .collect();
        }
    }
    HashMap::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_provider::base64_decode;
    use axum::http::header::AUTHORIZATION;

    #[test]
    fn basic_credentials_are_decoded_and_garbage_is_not() {
        // printf 'abcd1234:s3cr3tS3cr3t' | base64
        assert_eq!(
            base64_decode("YWJjZDEyMzQ6czNjcjN0UzNjcjN0").as_deref(),
            Some(&b"abcd1234:s3cr3tS3cr3t"[..])
        );
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
        for bad in ["YQ=", "Y===", "YQ==YWJj", "YW*j"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            "Basic YWJjZDEyMzQ6czNjcjN0UzNjcjN0".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("abcd1234".into(), "s3cr3tS3cr3t".into()))
        );
        headers.insert(
            AUTHORIZATION,
            "Bearer YWJjZDEyMzQ6czNjcjN0UzNjcjN0".parse().unwrap(),
        );
        assert_eq!(basic_credentials(&headers), None);
        // Nothing after the scheme: no credentials.
        headers.insert(AUTHORIZATION, "Basic ".parse().unwrap());
        assert_eq!(basic_credentials(&headers), None);
    }
}

//! The Infobip dialect: `POST /sms/3/messages` as Infobip's Send SMS message
//! (v3) documents it
//! (<https://www.infobip.com/docs/api/channels/sms/sms-messaging/outbound-sms/send-sms-messages>).
//!
//! - Authentication: `Authorization: App <api key>` (the API-key scheme,
//!   the one the adapter uses; the fake knows no other), equal to
//!   `--credential api_key=...` when given, else any non-empty key; else
//!   401 with the documented `E401` body.
//! - A JSON body (`Content-Type: application/json`; the fake speaks no
//!   XML) with `messages`, each with `destinations` (each a `to` of at most
//!   64 characters and an optional `messageId` of at most 200) and
//!   `content.text`; else 400 with the documented `E400` body, its
//!   `violations` naming each property.
//! - Accepted: 200 with `bulkId` and per destination `messageId` (the one
//!   sent, as Infobip echoes it, else `fake-<run>-N`), status
//!   `PENDING_ACCEPTED` and, with `options.includeSmsCountInResponse`,
//!   `details.messageCount`. Every destination is counted by
//!   `FakeState::accept` under its `messageId`. The fake does not answer a
//!   repeated `messageId` with `REJECTED_DUPLICATE_MESSAGE_ID`: it accepts
//!   it and counts it in `/stats` as a duplicate, which is what end-to-end
//!   tests look for.
//! - Drawn failure: 200 with status `REJECTED_SYSTEM_ERROR` (21, "please
//!   retry submission"); drawn rejection: 200 with `REJECTED_DND` (10);
//!   drawn throttling: 429 with the documented `E429` body (Infobip
//!   documents no `Retry-After`, so none is sent).

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{FakeState, Simulated};
use crate::domain::count_segments;

pub(super) fn routes() -> Router<FakeState> {
    Router::new().route("/sms/3/messages", post(send))
}

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    messages: Vec<Message>,
    options: Option<Options>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    destinations: Vec<Destination>,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Destination {
    to: Option<String>,
    message_id: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Options {
    #[serde(default)]
    include_sms_count_in_response: bool,
}

async fn send(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let key = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("App "))
        .filter(|key| !key.trim().is_empty());
    let authorized = match (key, state.credential("api_key")) {
        (None, _) => false,
        (Some(given), Some(expected)) => given == expected,
        (Some(_), None) => true,
    };
    if !authorized {
        return unauthorized();
    }
    let json_body = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return bad_request(&[("Content-Type", "the fake speaks application/json only")]);
    }
    let request = match serde_json::from_slice::<Request>(&body) {
        Ok(request) => request,
        Err(_) => return bad_request(&[("body", "not a valid request body")]),
    };
    let violations = violations(&request);
    if !violations.is_empty() {
        let pairs: Vec<(&str, &str)> = violations.iter().map(|(p, v)| (p.as_str(), *v)).collect();
        return bad_request(&pairs);
    }
    let simulated = state.draw().await;
    if simulated == Some(Simulated::Throttling) {
        let body = json!({
            "errorCode": "E429",
            "description": "Too many requests sent.",
            "action": "Check request rate limit specified in the API endpoint documentation resource.",
            "violations": [],
            "resources": [{
                "name": "Throttling handling errors",
                "url": "https://www.infobip.com/docs/essentials/integration-best-practices#throttling-handling-errors"
            }]
        });
        return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    }
    let count_parts = request
        .options
        .as_ref()
        .is_some_and(|o| o.include_sms_count_in_response);
    let mut answers = Vec::new();
    for message in &request.messages {
        let text = message
            .content
            .as_ref()
            .and_then(|c| c.text.as_deref())
            .unwrap_or_default();
        for destination in &message.destinations {
            let to = destination.to.as_deref().unwrap_or_default();
            let sent_id = destination
                .message_id
                .as_deref()
                .filter(|id| !id.is_empty());
            let (id, status) = match simulated {
                Some(Simulated::Failure) => (
                    sent_id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned),
                    status(5, "REJECTED", 21, "REJECTED_SYSTEM_ERROR", "System error"),
                ),
                Some(Simulated::Rejection) => (
                    sent_id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned),
                    status(5, "REJECTED", 10, "REJECTED_DND", "Destination on DND list"),
                ),
                _ => {
                    let own = state.accept(to, sent_id.unwrap_or_default());
                    (
                        sent_id.map_or(own, str::to_owned),
                        status(
                            1,
                            "PENDING",
                            26,
                            "PENDING_ACCEPTED",
                            "Message sent to next instance",
                        ),
                    )
                }
            };
            let mut answer = json!({"messageId": id, "status": status, "destination": to});
            if count_parts {
                answer["details"] = json!({"messageCount": count_segments(text).1});
            }
            answers.push(answer);
        }
    }
    let bulk_id = uuid::Uuid::new_v4().simple().to_string();
    (
        StatusCode::OK,
        Json(json!({"bulkId": bulk_id, "messages": answers})),
    )
        .into_response()
}

fn status(group_id: u32, group: &str, id: u32, name: &str, description: &str) -> Value {
    json!({
        "groupId": group_id, "groupName": group,
        "id": id, "name": name, "description": description
    })
}

/// What the schema requires and bounds, as `(property, violation)`.
fn violations(request: &Request) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    if request.messages.is_empty() {
        found.push(("messages".to_owned(), "must not be empty"));
    }
    for (i, message) in request.messages.iter().enumerate() {
        let text = message.content.as_ref().and_then(|c| c.text.as_deref());
        if text.is_none_or(|t| t.trim().is_empty()) {
            found.push((format!("messages[{i}].content.text"), "must not be blank"));
        }
        if message.destinations.is_empty() {
            found.push((format!("messages[{i}].destinations"), "must not be empty"));
        }
        for (j, destination) in message.destinations.iter().enumerate() {
            let to = destination.to.as_deref().unwrap_or_default();
            if to.trim().is_empty() {
                found.push((
                    format!("messages[{i}].destinations[{j}].to"),
                    "must not be blank",
                ));
            } else if to.chars().count() > 64 {
                found.push((
                    format!("messages[{i}].destinations[{j}].to"),
                    "size must be between 0 and 64",
                ));
            }
            let id_chars = destination
                .message_id
                .as_deref()
                .map_or(0, |id| id.chars().count());
            if id_chars > 200 {
                found.push((
                    format!("messages[{i}].destinations[{j}].messageId"),
                    "size must be between 0 and 200",
                ));
            }
        }
    }
    found
}

/// The documented `E400` answer.
fn bad_request(violations: &[(&str, &str)]) -> Response {
    let violations: Vec<Value> = violations
        .iter()
        .map(|(property, violation)| json!({"property": property, "violation": violation}))
        .collect();
    let body = json!({
        "errorCode": "E400",
        "description": "Request cannot be processed.",
        "action": "Check the syntax, violations and adjust the request.",
        "violations": violations,
        "resources": [{
            "name": "API endpoint documentation",
            "url": "https://www.infobip.com/docs/api/send-sms-messages"
        }]
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// The documented `E401` answer.
fn unauthorized() -> Response {
    let body = json!({
        "errorCode": "E401",
        "description": "The request lacks valid authentication credentials for the requested resource.",
        "action": "Check the resources and adjust authentication credentials.",
        "violations": [],
        "resources": [{
            "name": "API Authentication",
            "url": "https://www.infobip.com/docs/essentials/api-authentication"
        }]
    });
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

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
//!
//! Delivery reports (with `--dlr-url`), as Infobip's webhook posts them
//! (<https://www.infobip.com/docs/api/channels/sms/sms-messaging/delivery-reports/receive-outbound-sms-message-report>):
//! a JSON `POST` of `{"results": [...]}`, one result per destination of
//! the request (so a request to several destinations is reported in one
//! batch), each with `bulkId`, `messageId`, `to`, `sender`, `sentAt`,
//! `doneAt`, `messageCount`, `price`, `status` and `error`. Unsigned, as
//! Infobip's are: the secret is the path token already in `--dlr-url`,
//! which is used as given (Infobip would call the message's
//! `webhooks.delivery.url`; the two are the same URL when the service is
//! set up as the end-to-end tests set it up).
//!
//! - With `webhooks.delivery.intermediateReport: true` in the request,
//!   first a `PENDING_ENROUTE` (7) report, as Infobip sends intermediate
//!   reports only when asked.
//! - Delivered: `DELIVERED_TO_OPERATOR` (2), which Infobip documents as
//!   intermediate, then `DELIVERED_TO_HANDSET` (5), error `NO_ERROR`.
//! - Not delivered (`--dlr-fail-rate`): `UNDELIVERABLE_NOT_DELIVERED` (9)
//!   with the error `EC_UNKNOWN_SUBSCRIBER` (1, `permanent: true`).

use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Callback, FakeState, Fate, Simulated};
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
    sender: Option<String>,
    #[serde(default)]
    destinations: Vec<Destination>,
    content: Option<Content>,
    webhooks: Option<Webhooks>,
}

#[derive(Deserialize)]
struct Webhooks {
    delivery: Option<DeliveryWebhook>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeliveryWebhook {
    #[serde(default)]
    intermediate_report: bool,
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
    let bulk_id = uuid::Uuid::new_v4().simple().to_string();
    let mut answers = Vec::new();
    let mut reports = Reports::default();
    for message in &request.messages {
        let text = message
            .content
            .as_ref()
            .and_then(|c| c.text.as_deref())
            .unwrap_or_default();
        let parts = count_segments(text).1;
        let intermediate = message
            .webhooks
            .as_ref()
            .and_then(|w| w.delivery.as_ref())
            .is_some_and(|d| d.intermediate_report);
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
                    let id = sent_id.map_or(own, str::to_owned);
                    if let Some((fate, _)) = state.fate() {
                        let report = Report {
                            bulk_id: &bulk_id,
                            message_id: &id,
                            to,
                            sender: message.sender.as_deref().unwrap_or_default(),
                            parts,
                        };
                        reports.add(&report, fate, intermediate);
                    }
                    (
                        id,
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
                answer["details"] = json!({"messageCount": parts});
            }
            answers.push(answer);
        }
    }
    reports.post(&state);
    (
        StatusCode::OK,
        Json(json!({"bulkId": bulk_id, "messages": answers})),
    )
        .into_response()
}

/// What a report says of one accepted destination.
struct Report<'a> {
    bulk_id: &'a str,
    message_id: &'a str,
    to: &'a str,
    sender: &'a str,
    parts: u32,
}

impl Report<'_> {
    /// One `SmsDeliveryReport` with this status and error.
    fn result(&self, status: Value, error: Value) -> Value {
        // Infobip's date format: yyyy-MM-dd'T'HH:mm:ss.SSSZ (+0000).
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let now = format!("{}+0000", now.trim_end_matches('Z'));
        json!({
            "bulkId": self.bulk_id,
            "messageId": self.message_id,
            "to": self.to,
            "sender": self.sender,
            "sentAt": now,
            "doneAt": now,
            "messageCount": self.parts,
            "price": {"pricePerMessage": 0.01, "currency": "EUR"},
            "status": status,
            "error": error,
        })
    }
}

/// The reports of one request's destinations, by stage: each stage is
/// one callback whose `results` hold every destination's report.
#[derive(Default)]
struct Reports {
    intermediate: Vec<Value>,
    to_operator: Vec<Value>,
    last: Vec<Value>,
}

impl Reports {
    fn add(&mut self, report: &Report<'_>, fate: Fate, intermediate: bool) {
        if intermediate {
            let enroute = status(
                1,
                "PENDING",
                7,
                "PENDING_ENROUTE",
                "Message sent to next instance",
            );
            self.intermediate.push(report.result(enroute, no_error()));
        }
        match fate {
            Fate::Delivered => {
                let to_operator = status(
                    3,
                    "DELIVERED",
                    2,
                    "DELIVERED_TO_OPERATOR",
                    "Message delivered to operator",
                );
                self.to_operator
                    .push(report.result(to_operator, no_error()));
                let handset = status(
                    3,
                    "DELIVERED",
                    5,
                    "DELIVERED_TO_HANDSET",
                    "Message delivered to handset",
                );
                self.last.push(report.result(handset, no_error()));
            }
            Fate::Failed => {
                let not_delivered = status(
                    2,
                    "UNDELIVERABLE",
                    9,
                    "UNDELIVERABLE_NOT_DELIVERED",
                    "Message sent not delivered",
                );
                let unknown_subscriber = json!({
                    "groupId": 1, "groupName": "HANDSET_ERRORS", "id": 1,
                    "name": "EC_UNKNOWN_SUBSCRIBER", "description": "Unknown Subscriber",
                    "permanent": true
                });
                self.last
                    .push(report.result(not_delivered, unknown_subscriber));
            }
        }
    }

    /// Posts them, in the background, to `--dlr-url`.
    fn post(self, state: &FakeState) {
        let Some(settings) = state.settings.reports.as_ref() else {
            return;
        };
        if self.last.is_empty() {
            return;
        }
        let callback =
            |results: Vec<Value>| Callback::json(&settings.url, &json!({"results": results}));
        let progress = [self.intermediate, self.to_operator]
            .into_iter()
            .filter(|stage| !stage.is_empty())
            .map(callback)
            .collect();
        state.report(progress, vec![callback(self.last)]);
    }
}

/// The error object of a report without an error.
fn no_error() -> Value {
    json!({"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
           "description": "No Error", "permanent": false})
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

//! The request Twilio's Messages resource takes, and how each of its
//! documented answers is read.
//!
//! `POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`, HTTP
//! Basic authentication (Account SID : Auth Token), a form-encoded body
//! (`application/x-www-form-urlencoded`) with `To`, `Body`, and `From`
//! and/or `MessagingServiceSid`, and `StatusCallback` (the URL Twilio posts
//! the message's status changes to) when the instance has a callback URL.
//! Source: Twilio's OpenAPI description of the
//! operation (`CreateMessage` in `spec/json/twilio_api_v2010.json` of
//! github.com/twilio/twilio-oai: server `https://api.twilio.com`, security
//! scheme HTTP basic, request body form-encoded with `To` required) and
//! <https://www.twilio.com/docs/messaging/api/message-resource>.
//!
//! A created message is answered `201` with the Message resource as JSON;
//! the adapter reads `sid` (the message id) and `num_segments`, a *string*
//! that is `"0"` while a Messaging Service has not yet picked a sender (the
//! service then counts the parts itself). An error is answered with a 4xx or
//! 5xx status and `{"code": 21211, "message": "...", "more_info": "...",
//! "status": 400}`: <https://www.twilio.com/docs/usage/twilios-response>,
//! and the error type of Twilio's own Go library (`client/error.go` in
//! github.com/twilio/twilio-go: `code`, `message`, `more_info`, `status`,
//! `details`).
//!
//! Each answer falls in exactly one class. A known error `code` decides;
//! without one (or with a code the table does not name) the HTTP status
//! does. Rows are cited to the page of Twilio's error dictionary
//! (`https://www.twilio.com/docs/api/errors/<code>`) that says what the
//! code means.
//!
//! | answer | class | source |
//! |---|---|---|
//! | 2xx (201 Created) | accepted: `sid` is the id, `num_segments` the parts (`"0"`: unknown) | <https://www.twilio.com/docs/messaging/api/message-resource> |
//! | 20429 Too Many Requests (HTTP 429) | transient: "never processed and is always safe to retry" (`Retry-After` honoured when given) | <https://www.twilio.com/docs/api/errors/20429> |
//! | 20503 Service unavailable | transient: "temporarily unavailable. Try again ... with exponential back-off" | <https://www.twilio.com/docs/api/errors/20503> |
//! | 21611 the `From` number's queue holds over 10 hours of messages | transient: the message is not created; the queue drains | <https://www.twilio.com/docs/api/errors/21611> |
//! | 63017 account over 2000 messages per second | transient | <https://www.twilio.com/docs/api/errors/63017> |
//! | 21408 destination region disabled in Geo Permissions, or not supported | route refused | <https://www.twilio.com/docs/api/errors/21408> |
//! | 21612 this `To`/`From` combination cannot be sent (sender restrictions, no connectivity to the carrier) | route refused | <https://www.twilio.com/docs/api/errors/21612> |
//! | 21606 `From` is no message-capable Twilio number for this destination | route refused | <https://www.twilio.com/docs/api/errors/21606> |
//! | 21659 `From` is no Twilio number, or a short code of another country | route refused | <https://www.twilio.com/docs/api/errors/21659> |
//! | 21608 `To` not verified (trial account or no approved compliance profile) | route refused: this account cannot reach this number; another provider may | <https://www.twilio.com/docs/api/errors/21608> |
//! | 21266 `To` and `From` are the same number | route refused: another provider's sender can reach it | <https://www.twilio.com/docs/api/errors/21266> |
//! | 21211 invalid `To` phone number | rejected, invalid number | <https://www.twilio.com/docs/api/errors/21211> |
//! | 21614 `To` is not a valid mobile number | rejected, invalid number | <https://www.twilio.com/docs/api/errors/21614> |
//! | 21635 `To` is a landline | rejected, invalid number | <https://www.twilio.com/docs/api/errors/21635> |
//! | 21265 `To` is a short code | rejected, invalid number | <https://www.twilio.com/docs/api/errors/21265> |
//! | 21268 `To` is a premium-rate number | rejected (not failed over: premium-rate fraud) | <https://www.twilio.com/docs/api/errors/21268> |
//! | 21610 recipient replied STOP | rejected (not failed over: the opt-out stands for every sender) | <https://www.twilio.com/docs/api/errors/21610> |
//! | 21617 body over 1600 characters (non-GSM characters count more) | rejected | <https://www.twilio.com/docs/api/errors/21617> |
//! | 21602 body required | rejected | <https://www.twilio.com/docs/api/errors/21602> |
//! | 21604 `To` required (or the body not form-encoded) | rejected | <https://www.twilio.com/docs/api/errors/21604> |
//! | 20003 authentication failed (HTTP 401) | account | <https://www.twilio.com/docs/api/errors/20003> |
//! | 20403 account suspended or closed (HTTP 403) | account | <https://www.twilio.com/docs/api/errors/20403> |
//! | 20404 not found: wrong Account SID or base URL | account: the instance's settings, not the message | <https://www.twilio.com/docs/api/errors/20404> |
//! | 21603 no valid `From` or `MessagingServiceSid` | account: the instance's sender setting | <https://www.twilio.com/docs/api/errors/21603> |
//! | 21660 `From` belongs to another account | account: the instance's sender setting | <https://www.twilio.com/docs/api/errors/21660> |
//! | 21701 the Messaging Service does not exist in this account | account | <https://www.twilio.com/docs/api/errors/21701> |
//! | 21705 the Messaging Service SID is invalid | account | <https://www.twilio.com/docs/api/errors/21705> |
//! | 21609 invalid `StatusCallback` (not a full URL, over 4000 characters, a hostname with underscores, not reachable from the internet) | account: the instance's callback URL (`http.public_url`), not the message | <https://www.twilio.com/docs/api/errors/21609> |
//! | 63038 account over its daily message limit | account: waits for the next day, breaker open | <https://www.twilio.com/docs/api/errors/63038> |
//! | HTTP 429 or 503 without a code named above | transient | <https://www.twilio.com/docs/api/errors/20429>, <https://www.twilio.com/docs/api/errors/20503> |
//! | HTTP 408 without a code named above | transient: the request was not taken | not documented by Twilio: HTTP's meaning (RFC 9110, 15.5.9) |
//! | HTTP 401 or 403 without a code named above | account | <https://www.twilio.com/docs/api/errors/20003>, <https://www.twilio.com/docs/api/errors/403> |
//! | HTTP 404 without a code named above | account | <https://www.twilio.com/docs/api/errors/20404> |
//! | HTTP 500, 502, 504 or another 5xx; a timeout after the request was written | ambiguous: Twilio's pages do not say whether the message was created | not documented: conservative |
//! | any other 4xx (with an unknown code or none), 1xx, 3xx | rejected | not documented: conservative |
//! | connect error | transient ([`super::super::http::transport_error`]) | - |
//!
//! What the documentation does not say, and how it is read here:
//! - Whether a 500/502/504 may have created the message: not said, so
//!   ambiguous (retried at Twilio only, never failed over).
//! - Whether the 2010 Messages API sends `Retry-After` with a 429: not said
//!   (Twilio's newer APIs do); honoured when present.
//! - Twilio warns that the cause behind a code may change and new, narrower
//!   codes were split out of 21211, 21212, 21606 and 21614 in 2024
//!   (<https://www.twilio.com/en-us/changelog/updates-to-the-error-code-dictionary-to-clarify-number-validatio>):
//!   a code this table does not name falls back to its HTTP status, so an
//!   unknown 4xx is rejected, never retried.
//! - Error codes 30001 to 30010 are delivery failures reported later, in a
//!   message's status; the create call never answers them.
//!
//! Twilio's Messages API takes no idempotency key (the operation has no such
//! header or parameter): Twilio does not deduplicate a retried request.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use tracing::warn;

use super::super::http;
use crate::domain::mask_numbers;
use crate::ports::{Accepted, ProviderError};

/// Twilio's longest validity period (<https://www.twilio.com/docs/api/errors/90007>).
pub(super) const MAX_VALIDITY_SECS: u64 = 36_000;

/// The form-encoded body of one message.
pub(super) fn form(
    to: &str,
    body: &str,
    from: Option<&str>,
    messaging_service_sid: Option<&str>,
    status_callback: Option<&str>,
    validity_secs: Option<u64>,
) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("To", to);
    if let Some(from) = from {
        form.append_pair("From", from);
    }
    if let Some(sid) = messaging_service_sid {
        form.append_pair("MessagingServiceSid", sid);
    }
    form.append_pair("Body", body);
    if let Some(url) = status_callback {
        form.append_pair("StatusCallback", url);
    }
    // ValidityPeriod: whole seconds, 1 to 36,000 (Twilio's default);
    // https://www.twilio.com/docs/api/errors/90007
    if let Some(secs) = validity_secs {
        form.append_pair(
            "ValidityPeriod",
            &secs.clamp(1, MAX_VALIDITY_SECS).to_string(),
        );
    }
    form.finish()
}

/// The fields of a created Message the service keeps.
#[derive(Deserialize)]
struct Created {
    sid: Option<String>,
    /// A string in Twilio's description; a number is taken too.
    num_segments: Option<Value>,
}

/// Reads a 2xx answer. The message is created, so a body that cannot be
/// read still counts as accepted (resending would send it twice), without
/// an id.
pub(super) fn accepted(body: &[u8]) -> Accepted {
    let created = match serde_json::from_slice::<Created>(body) {
        Ok(created) => created,
        Err(e) => {
            let error = mask_numbers(&e.to_string());
            warn!(%error, "Twilio created the message but its answer is unreadable");
            return Accepted::default();
        }
    };
    let provider_message_id = match created.sid.as_deref().map(str::trim) {
        Some(sid) if !sid.is_empty() => http::bounded_id(sid),
        _ => {
            warn!("Twilio created the message without a sid in its answer");
            String::new()
        }
    };
    let segments = match created.num_segments {
        Some(Value::String(n)) => n.trim().parse::<u32>().ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
    // "0" until a Messaging Service picks a sender: not a count.
    .filter(|&n| n > 0);
    Accepted {
        provider_message_id,
        segments,
        other_part_ids: Vec::new(),
    }
}

/// Twilio's error answer.
#[derive(Deserialize)]
struct RestError {
    code: Option<u32>,
    message: Option<String>,
}

/// The class a documented error code puts an answer in (the module doc's
/// table), `None` for a code it does not name.
fn class_of(code: u32) -> Option<Class> {
    use Class::*;
    Some(match code {
        20429 | 20503 | 21611 | 63017 => Transient,
        21408 | 21612 | 21606 | 21659 | 21608 | 21266 => RouteRefused,
        21211 | 21614 | 21635 | 21265 => Rejected {
            invalid_number: true,
        },
        21268 | 21610 | 21617 | 21602 | 21604 => Rejected {
            invalid_number: false,
        },
        20003 | 20403 | 20404 | 21603 | 21609 | 21660 | 21701 | 21705 | 63038 => Account,
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Transient,
    RouteRefused,
    Rejected { invalid_number: bool },
    Account,
}

/// Classifies a non-2xx answer: its error code where the table names it,
/// else its HTTP status.
pub(super) fn failure(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> ProviderError {
    let error = serde_json::from_slice::<RestError>(body).ok();
    let code = error.as_ref().and_then(|e| e.code);
    let detail = match (&error, code) {
        (Some(RestError { message, .. }), Some(code)) => format!(
            "HTTP {}, Twilio error {code}: {}",
            status.as_u16(),
            http::snippet(message.as_deref().unwrap_or_default().as_bytes())
        ),
        _ => format!("HTTP {}: {}", status.as_u16(), http::snippet(body)),
    };
    let class = code.and_then(class_of).or(match status.as_u16() {
        401 | 403 | 404 => Some(Class::Account),
        _ => None,
    });
    match class {
        Some(Class::Transient) => ProviderError::Transient {
            detail,
            retry_after,
        },
        Some(Class::RouteRefused) => ProviderError::RouteRefused { detail },
        Some(Class::Rejected { invalid_number }) => ProviderError::Rejected {
            detail,
            invalid_number,
        },
        Some(Class::Account) => ProviderError::Account { detail },
        // 429 and 503 transient, 5xx ambiguous, the rest rejected.
        None => http::classify_status(status, detail, retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error answer as Twilio writes it
    /// (<https://www.twilio.com/docs/usage/twilios-response>).
    fn error(status: u16, code: u32, message: &str) -> (u16, String) {
        let body = serde_json::json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        });
        (status, body.to_string())
    }

    fn classify(status: u16, body: &str) -> ProviderError {
        failure(StatusCode::from_u16(status).unwrap(), body.as_bytes(), None)
    }

    /// What a class is called in the table, with the invalid-number flag.
    fn name(e: &ProviderError) -> String {
        match e {
            ProviderError::Rejected {
                invalid_number: true,
                ..
            } => "rejected invalid_number".into(),
            other => other.class().into(),
        }
    }

    #[test]
    fn every_documented_error_answer_falls_in_its_class() {
        // One fixture per row of the module doc's table, in Twilio's error
        // format; each message is the title of the code's page (cited in
        // the table), or the message Twilio is known to send with it.
        let cases = [
            (error(429, 20429, "Too Many Requests"), "transient"),
            (error(503, 20503, "Service unavailable"), "transient"),
            (
                error(
                    400,
                    21611,
                    "This 'From' number has exceeded the maximum number of queued messages",
                ),
                "transient",
            ),
            (error(429, 63017, "Rate limit exceeded"), "transient"),
            (
                error(
                    400,
                    21408,
                    "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: +254712345678.",
                ),
                "route_refused",
            ),
            (
                error(
                    400,
                    21612,
                    "Message cannot be sent with the current combination of 'To' and/or 'From' parameters",
                ),
                "route_refused",
            ),
            (
                error(
                    400,
                    21606,
                    "The 'From' phone number provided is not a valid message-capable Twilio phone number for this destination/account",
                ),
                "route_refused",
            ),
            (
                error(
                    400,
                    21659,
                    "'From' is not a Twilio phone number or Short Code country mismatch",
                ),
                "route_refused",
            ),
            (
                error(
                    400,
                    21608,
                    "The 'to' phone number provided is not yet verified for this account.",
                ),
                "route_refused",
            ),
            (
                error(400, 21266, "'To' and 'From' numbers cannot be the same"),
                "route_refused",
            ),
            (
                error(
                    400,
                    21211,
                    "The 'To' number +2547123 is not a valid phone number.",
                ),
                "rejected invalid_number",
            ),
            (
                error(400, 21614, "'To' number is not a valid mobile number"),
                "rejected invalid_number",
            ),
            (
                error(400, 21635, "'To' number cannot be a landline"),
                "rejected invalid_number",
            ),
            (
                error(400, 21265, "'To' number cannot be a Short Code"),
                "rejected invalid_number",
            ),
            (
                error(
                    400,
                    21268,
                    "Sending to Premium rate or Information Service numbers is not allowed",
                ),
                "rejected",
            ),
            (
                error(400, 21610, "Attempt to send to unsubscribed recipient"),
                "rejected",
            ),
            (
                error(
                    400,
                    21617,
                    "The concatenated message body exceeds the 1600 character limit",
                ),
                "rejected",
            ),
            (error(400, 21602, "Message body is required"), "rejected"),
            (
                error(
                    400,
                    21604,
                    "'To' phone number is required to send a Message",
                ),
                "rejected",
            ),
            (error(401, 20003, "Authenticate"), "account"),
            (error(403, 20403, "403 Forbidden"), "account"),
            (
                error(404, 20404, "Not Found"),
                "account",
            ),
            (
                error(
                    400,
                    21603,
                    "A 'From' or 'MessagingServiceSid' parameter is required to send a message",
                ),
                "account",
            ),
            (
                error(
                    400,
                    21660,
                    "Mismatch between the 'From' number and the account",
                ),
                "account",
            ),
            (
                error(400, 21701, "The Messaging Service does not exist"),
                "account",
            ),
            (
                error(400, 21705, "The Messaging Service is invalid"),
                "account",
            ),
            (error(400, 21609, "Invalid 'StatusCallback'"), "account"),
            (
                error(400, 63038, "Account exceeded the daily messages limit"),
                "account",
            ),
        ];
        for ((status, body), class) in cases {
            let got = classify(status, &body);
            assert_eq!(name(&got), class, "HTTP {status} {body}");
        }
    }

    #[test]
    fn a_status_decides_where_no_documented_code_does() {
        let cases = [
            ((429, ""), "transient"),
            ((408, ""), "transient"),
            ((503, "<html>busy</html>"), "transient"),
            ((401, ""), "account"),
            ((403, ""), "account"),
            ((404, ""), "account"),
            (
                (
                    500,
                    r#"{"code": 20500, "message": "Internal Server Error"}"#,
                ),
                "ambiguous",
            ),
            ((502, ""), "ambiguous"),
            ((504, ""), "ambiguous"),
            ((599, ""), "ambiguous"),
            (
                (400, r#"{"code": 29999, "message": "a code no page names"}"#),
                "rejected",
            ),
            ((400, "not json"), "rejected"),
            ((422, ""), "rejected"),
            ((302, ""), "rejected"),
        ];
        for ((status, body), class) in cases {
            assert_eq!(
                classify(status, body).class(),
                class,
                "HTTP {status} {body}"
            );
        }
    }

    #[test]
    fn a_known_code_outranks_its_http_status() {
        // A 5xx that says "unavailable" is known not to have sent.
        let (status, body) = error(500, 20503, "Service unavailable");
        assert_eq!(classify(status, &body).class(), "transient");
        // A 404 with a code of a bad number is about the number.
        let (status, body) = error(404, 21211, "The 'To' number is not valid");
        assert_eq!(name(&classify(status, &body)), "rejected invalid_number");
    }

    #[test]
    fn retry_after_is_kept_on_a_transient_or_ambiguous_answer() {
        let (_, body) = error(429, 20429, "Too Many Requests");
        let wait = Some(Duration::from_secs(2));
        let got = failure(StatusCode::TOO_MANY_REQUESTS, body.as_bytes(), wait);
        assert!(matches!(got, ProviderError::Transient { retry_after, .. } if retry_after == wait));
        let got = failure(StatusCode::BAD_GATEWAY, b"", wait);
        assert!(matches!(got, ProviderError::Ambiguous { retry_after, .. } if retry_after == wait));
    }

    #[test]
    fn a_detail_names_status_and_code_and_masks_the_number() {
        let (status, body) = error(
            400,
            21211,
            "The 'To' number +254712345678 is not a valid phone number.",
        );
        let ProviderError::Rejected { detail, .. } = classify(status, &body) else {
            panic!("21211 is a rejection");
        };
        assert!(
            detail.starts_with("HTTP 400, Twilio error 21211: "),
            "{detail}"
        );
        assert!(!detail.contains("254712345678"), "{detail}");
        assert!(detail.contains("+********5678"), "{detail}");
        let detail = classify(400, "+254712345678 is bad").to_string();
        assert!(!detail.contains("254712345678"), "{detail}");
    }

    /// The 201 answers of Twilio's description of the operation (examples
    /// `create` and `createWithMessagingService` in twilio-oai's
    /// `twilio_api_v2010.json`), shortened to the fields the service reads
    /// and a few around them.
    #[test]
    fn a_created_message_gives_its_sid_and_its_parts() {
        let created = br#"{"account_sid": "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "api_version": "2010-04-01",
            "body": "Hello!", "direction": "outbound-api", "error_code": null, "error_message": null,
            "from": "+14155552345", "num_media": "0", "num_segments": "2", "price": null,
            "sid": "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "status": "queued", "to": "+14155552345"}"#;
        assert_eq!(
            accepted(created),
            Accepted {
                provider_message_id: "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
                segments: Some(2),
                other_part_ids: Vec::new(),
            }
        );
        // Through a Messaging Service no sender is picked yet: "0" parts.
        let pooled = br#"{"sid": "SMbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "num_segments": "0",
            "from": null, "messaging_service_sid": "MGaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "status": "accepted"}"#;
        assert_eq!(accepted(pooled).segments, None);
        assert_eq!(
            accepted(br#"{"sid": "SM1", "num_segments": 3}"#).segments,
            Some(3)
        );
        assert_eq!(
            accepted(br#"{"sid": "SM1", "num_segments": null}"#).segments,
            None
        );
    }

    #[test]
    fn a_created_message_without_a_readable_sid_is_still_accepted() {
        assert_eq!(accepted(b"<html></html>"), Accepted::default());
        assert_eq!(accepted(br#"{"sid": "  "}"#).provider_message_id, "");
        let long = format!(r#"{{"sid": "SM{}"}}"#, "a".repeat(1000));
        assert_eq!(
            accepted(long.as_bytes()).provider_message_id.len(),
            http::MAX_ID_CHARS
        );
    }

    #[test]
    fn the_form_has_the_documented_fields_percent_encoded() {
        assert_eq!(
            form(
                "+254712345678",
                "Paid: 100% & thanks",
                Some("MKOPA"),
                None,
                None,
                None
            ),
            "To=%2B254712345678&From=MKOPA&Body=Paid%3A+100%25+%26+thanks"
        );
        assert_eq!(
            form(
                "+254712345678",
                "hi",
                None,
                Some("MG00000000000000000000000000000000"),
                None,
                None
            ),
            "To=%2B254712345678&MessagingServiceSid=MG00000000000000000000000000000000&Body=hi"
        );
        // StatusCallback: "The URL of the endpoint to which Twilio sends
        // Message status callback requests"
        // (https://www.twilio.com/docs/messaging/api/message-resource, create).
        assert_eq!(
            form(
                "+254712345678",
                "hi",
                Some("MKOPA"),
                None,
                Some("https://sms.example.com/v1/callbacks/twilio"),
                None
            ),
            "To=%2B254712345678&From=MKOPA&Body=hi&StatusCallback=https%3A%2F%2Fsms.example.com%2Fv1%2Fcallbacks%2Ftwilio"
        );
        // ValidityPeriod: "between 1 and 36,000" seconds
        // (https://www.twilio.com/docs/api/errors/90007).
        for (left, sent) in [(600, "600"), (1, "1"), (36_000, "36000"), (90_000, "36000")] {
            assert_eq!(
                form("+254712345678", "hi", Some("MKOPA"), None, None, Some(left)),
                format!("To=%2B254712345678&From=MKOPA&Body=hi&ValidityPeriod={sent}")
            );
        }
    }
}

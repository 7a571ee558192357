//! One message through Africa's Talking's SMS API: the request, and the
//! classification of every answer.
//!
//! # The request
//!
//! `POST {base_url}/version1/messaging`, form-encoded
//! (`Content-Type: application/x-www-form-urlencoded`), with the headers
//! `apiKey: <api_key>` and `Accept: application/json` (without it the API
//! may answer in another format) and the fields `username`, `to` (one
//! number: the service sends one message per call), `message`, `from` (the
//! command's `senderId`, else the instance's `from`, else left out: the
//! account's default sender) and `bulkSMSMode=1` (the documented default,
//! sent as the official SDKs send it). Source:
//! <https://developers.africastalking.com/docs/sms/sending/bulk> ("Send Bulk
//! SMS", the `version1/messaging` endpoint, its field list and curl
//! example), and the official SDKs
//! (`AfricasTalkingLtd/africastalking-python` `africastalking/SMS.py`,
//! `AfricasTalkingLtd/africastalking-node.js` `lib/sms.js`).
//!
//! The endpoint documents no validity period and no per-message
//! delivery-report URL: delivery reports go to the callback URL set in the
//! account's dashboard
//! (<https://developers.africastalking.com/docs/sms/notifications>), read
//! in [`super::callback`]. So nothing of `http.public_url` is sent, even
//! when it is set.
//!
//! The API takes no client reference or idempotency key on this endpoint
//! (none among the documented fields), so the service's key is not sent
//! and Africa's Talking cannot deduplicate a retry. A retry after an
//! ambiguous answer may therefore send the message twice; that is why
//! such an answer is retried here only, never failed over.
//!
//! # The answer
//!
//! The API answers per recipient, in `SMSMessageData.Recipients[]`, each
//! with `statusCode` (an integer), `status` (its name), `number`, `cost` and
//! `messageId`; the HTTP status alone does not say whether the message was
//! sent (a `DoNotDisturbRejection` comes with HTTP 409, a success with
//! 201). So a recipient's `statusCode` decides whenever the answer has one,
//! and the HTTP status decides only when it has none.
//!
//! Pages cited below: **[sending]** is
//! <https://developers.africastalking.com/docs/sms/sending/bulk> (the list
//! of `statusCode` values under "API response"), **[notifications]** is
//! <https://developers.africastalking.com/docs/sms/notifications> (the
//! `DoNotDisturbRejection` note: HTTP 409 with a recipient `statusCode`
//! 409), **[RFC 9110]** is <https://www.rfc-editor.org/rfc/rfc9110#section-15>
//! and **[RFC 6585]** is <https://www.rfc-editor.org/rfc/rfc6585#section-4>.
//!
//! | answer | class | source |
//! |---|---|---|
//! | recipient `statusCode` 100 Processed, 101 Sent, 102 Queued | accepted: the id from `messageId`; parts from `messageParts` where present | [sending] |
//! | recipient 401 RiskHold | account: the account's traffic is held by Africa's Talking's risk checks (the page gives the name only); the operator must act, so the breaker opens and the command waits or fails over | [sending] |
//! | recipient 402 InvalidSenderId | route refused: this account cannot use this sender; the route's next provider may | [sending] |
//! | recipient 403 InvalidPhoneNumber | rejected, invalid number (`invalid_phone_number`) | [sending] |
//! | recipient 404 UnsupportedNumberType | route refused | [sending] |
//! | recipient 405 InsufficientBalance | account | [sending] |
//! | recipient 406 UserInBlacklist | rejected | [sending] |
//! | recipient 407 CouldNotRoute | route refused | [sending] |
//! | recipient 409 DoNotDisturbRejection (HTTP 409) | rejected: a promotional sender outside Nigeria's allowed hours (8 pm to 8 am is closed); retrying within the service's retry window rarely reaches the morning, and failing over would send it in the regulator's quiet hours | [notifications], [sending] |
//! | recipient 500 InternalServerError, 501 GatewayError, 502 RejectedByGateway | transient: not sent to this recipient (`Retry-After` honoured if given) | [sending] |
//! | recipient with any other `statusCode` 400-499 (408 is not on the page) | rejected (undocumented: conservative) | not documented |
//! | recipient with any other `statusCode` | ambiguous (undocumented: it may mean sent) | not documented |
//! | `SMSMessageData` with no recipient, its `Message` one of the failure names above (`InvalidPhoneNumber`, ...) | as that name's `statusCode` | not documented (the page describes `Message` as a summary; public client code shows such answers) |
//! | `SMSMessageData` with no recipient, its `Message` a success name (`Sent`, ...) | ambiguous: it says sent but gives no id | not documented |
//! | `SMSMessageData` with no recipient otherwise, HTTP 2xx | rejected: sent to nobody | not documented |
//! | 2xx without a readable recipient (`statusCode` missing, not JSON) | ambiguous: the recipient's status is the answer, and it is missing | not documented |
//! | HTTP 401 without a readable recipient (live answers say `The supplied authentication is invalid`, as plain text) | account: bad `apiKey` or `username` | not documented; [RFC 9110] (401 Unauthorized) |
//! | HTTP 408, 429, 503 without a readable recipient | transient: not sent (`Retry-After` seconds honoured); Africa's Talking documents no throttling answer | not documented; [RFC 9110], [RFC 6585] |
//! | HTTP 500, 502, 504 and any other 5xx without a readable recipient; a timeout after the request was written; a broken answer | ambiguous | not documented; [RFC 9110]; [`http::transport_error`] |
//! | any other HTTP status without a readable recipient | rejected | not documented (conservative) |
//! | connect error, connect timeout | transient: not sent | [`http::transport_error`] |
//!
//! `messageParts` is not on the documentation page; live answers quoted in
//! public client code carry it (`"messageParts": 1`). It is read when it is
//! a whole number, else the service counts the parts itself.
//!
//! Every detail quotes the answer with its numbers masked
//! ([`http::snippet`]): recipients' `number` fields never reach a log or an
//! event.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use tracing::warn;

use super::super::http;
use crate::ports::{Accepted, ProviderError};

/// The API path under `base_url`, as the SDKs append it.
pub(super) const PATH: &str = "/version1/messaging";

/// The documented recipient statuses: `statusCode` and its name.
const STATUSES: [(i64, &str); 14] = [
    (100, "Processed"),
    (101, "Sent"),
    (102, "Queued"),
    (401, "RiskHold"),
    (402, "InvalidSenderId"),
    (403, "InvalidPhoneNumber"),
    (404, "UnsupportedNumberType"),
    (405, "InsufficientBalance"),
    (406, "UserInBlacklist"),
    (407, "CouldNotRoute"),
    (409, "DoNotDisturbRejection"),
    (500, "InternalServerError"),
    (501, "GatewayError"),
    (502, "RejectedByGateway"),
];

/// The form body of one message, in the documented field names.
pub(super) fn form(username: &str, to: &str, message: &str, from: Option<&str>) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("username", username)
        .append_pair("to", to)
        .append_pair("message", message);
    if let Some(from) = from {
        form.append_pair("from", from);
    }
    form.append_pair("bulkSMSMode", "1");
    form.finish()
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "SMSMessageData")]
    data: MessageData,
}

#[derive(Deserialize)]
struct MessageData {
    /// A summary ("Sent to 1/1 Total Cost: KES 0.8000").
    #[serde(rename = "Message", default)]
    message: Option<String>,
    #[serde(rename = "Recipients", default)]
    recipients: Vec<Recipient>,
}

#[derive(Deserialize)]
struct Recipient {
    #[serde(rename = "statusCode", default)]
    status_code: Option<i64>,
    #[serde(default)]
    status: Option<String>,
    #[serde(rename = "messageId", default)]
    message_id: Option<String>,
    /// Not on the documentation page; read when present (see the module doc).
    #[serde(rename = "messageParts", default)]
    message_parts: Option<serde_json::Value>,
}

/// Classifies one answer (see the table in the module doc).
pub(super) fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Accepted, ProviderError> {
    let data = serde_json::from_slice::<Answer>(body).ok().map(|a| a.data);
    if let Some(data) = &data {
        if let Some(recipient) = data.recipients.first() {
            if let Some(code) = recipient.status_code {
                return by_recipient(status, code, recipient, retry_after);
            }
        } else if let Some(code) = data.message.as_deref().and_then(code_named) {
            let detail = format!(
                "HTTP {}: no recipient, Message {}",
                status.as_u16(),
                http::snippet(data.message.as_deref().unwrap_or_default().as_bytes())
            );
            return by_code(code, detail, retry_after);
        }
    }
    let detail = format!("HTTP {}: {}", status.as_u16(), http::snippet(body));
    match status.as_u16() {
        // Sent to nobody: the answer lists no recipient at all.
        200..=299 if data.as_ref().is_some_and(|d| d.recipients.is_empty()) => {
            Err(ProviderError::rejected(detail))
        }
        200..=299 => Err(ProviderError::Ambiguous {
            detail: format!("{detail} (no readable recipient status)"),
            retry_after,
        }),
        401 => Err(ProviderError::Account { detail }),
        _ => Err(http::classify_status(status, detail, retry_after)),
    }
}

/// The documented `statusCode` of a status name.
fn code_named(name: &str) -> Option<i64> {
    let name = name.trim();
    STATUSES.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

fn by_recipient(
    status: StatusCode,
    code: i64,
    recipient: &Recipient,
    retry_after: Option<Duration>,
) -> Result<Accepted, ProviderError> {
    if matches!(code, 100..=102) {
        let id = recipient.message_id.as_deref().unwrap_or_default();
        if id.is_empty() {
            // Africa's Talking took the message: resending would duplicate
            // it. Recorded as sent without an id.
            warn!(
                code,
                "Africa's Talking accepted a message without a messageId"
            );
        }
        return Ok(Accepted {
            provider_message_id: http::bounded_id(id),
            segments: recipient
                .message_parts
                .as_ref()
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0),
            other_part_ids: Vec::new(),
        });
    }
    let name = recipient.status.as_deref().unwrap_or_default();
    let detail = format!(
        "HTTP {}: statusCode {code} {}",
        status.as_u16(),
        http::snippet(name.as_bytes())
    );
    by_code(code, detail, retry_after)
}

/// The class of a recipient `statusCode` that is not an acceptance.
fn by_code(
    code: i64,
    detail: String,
    retry_after: Option<Duration>,
) -> Result<Accepted, ProviderError> {
    Err(match code {
        100..=102 => ProviderError::Ambiguous {
            // Only reached from a summary naming a success without a
            // recipient: it says sent, but gives no id.
            detail,
            retry_after,
        },
        401 | 405 => ProviderError::Account { detail },
        402 | 404 | 407 => ProviderError::RouteRefused { detail },
        403 => ProviderError::Rejected {
            detail,
            invalid_number: true,
        },
        406 | 409 => ProviderError::rejected(detail),
        500..=502 => ProviderError::Transient {
            detail,
            retry_after,
        },
        400..=499 => ProviderError::rejected(format!("{detail} (undocumented statusCode)")),
        _ => ProviderError::Ambiguous {
            detail: format!("{detail} (undocumented statusCode)"),
            retry_after,
        },
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// The class name of an answer, or `accepted`.
    fn class(status: u16, body: &[u8]) -> &'static str {
        match classify(StatusCode::from_u16(status).unwrap(), None, body) {
            Ok(_) => "accepted",
            Err(e) => e.class(),
        }
    }

    /// An answer with one recipient, in the documented shape (the example
    /// response of the sending page).
    fn recipient(code: i64, status: &str) -> Vec<u8> {
        let accepted = matches!(code, 100..=102);
        json!({"SMSMessageData": {
            "Message": if accepted { "Sent to 1/1 Total Cost: KES 0.8000" } else { "Sent to 0/1 Total Cost: 0" },
            "Recipients": [{
                "statusCode": code,
                "number": "+254711222333",
                "status": status,
                "cost": if accepted { "KES 0.8000" } else { "0" },
                "messageId": if accepted { "ATXid_sample" } else { "None" },
            }]
        }})
        .to_string()
        .into_bytes()
    }

    // https://developers.africastalking.com/docs/sms/sending/bulk: every
    // documented recipient statusCode, with the HTTP 201 of a success
    // (the node SDK resolves on 201 only).
    const DOCUMENTED: [(i64, &str, &str); 14] = [
        (100, "Processed", "accepted"),
        (101, "Success", "accepted"),
        (102, "Queued", "accepted"),
        (401, "RiskHold", "account"),
        (402, "InvalidSenderId", "route_refused"),
        (403, "InvalidPhoneNumber", "rejected"),
        (404, "UnsupportedNumberType", "route_refused"),
        (405, "InsufficientBalance", "account"),
        (406, "UserInBlacklist", "rejected"),
        (407, "CouldNotRoute", "route_refused"),
        (409, "DoNotDisturbRejection", "rejected"),
        (500, "InternalServerError", "transient"),
        (501, "GatewayError", "transient"),
        (502, "RejectedByGateway", "transient"),
    ];

    #[test]
    fn every_documented_recipient_status_falls_in_its_class() {
        for (code, status, expected) in DOCUMENTED {
            assert_eq!(
                class(201, &recipient(code, status)),
                expected,
                "{code} {status}"
            );
        }
    }

    #[test]
    fn the_table_of_names_lists_every_documented_status_code() {
        let codes: Vec<i64> = DOCUMENTED.iter().map(|(c, _, _)| *c).collect();
        let named: Vec<i64> = STATUSES.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, named);
    }

    #[test]
    fn the_recipient_status_decides_whatever_the_http_status() {
        // https://developers.africastalking.com/docs/sms/notifications: a
        // DoNotDisturbRejection comes with HTTP 409, and this body.
        let dnd = br#"{"SMSMessageData":{"Message":"Sent to 0/1 Total Cost: 0","Recipients":[{"cost":"0","messageId":"None","number":"+2348012345678","status":"DoNotDisturbRejection","statusCode":409}]}}"#;
        assert_eq!(class(409, dnd), "rejected");
        // A recipient status in a 5xx answer still says what happened.
        assert_eq!(
            class(500, &recipient(405, "InsufficientBalance")),
            "account"
        );
        assert_eq!(class(200, &recipient(101, "Success")), "accepted");
    }

    #[test]
    fn an_accepted_recipient_gives_its_message_id() {
        // The example response of the sending page.
        let body = br#"{"SMSMessageData":{"Message":"Sent to 1/1 Total Cost: KES 0.8000","Recipients":[{"statusCode":101,"number":"+254711XXXYYY","status":"Success","cost":"KES 0.8000","messageId":"ATPid_SampleTxnId123"}]}}"#;
        let accepted = classify(StatusCode::CREATED, None, body).unwrap();
        assert_eq!(accepted.provider_message_id, "ATPid_SampleTxnId123");
        assert_eq!(accepted.segments, None, "the page documents no part count");
    }

    #[test]
    fn message_parts_are_read_where_the_answer_gives_them() {
        let with = |parts: Value| {
            let body = json!({"SMSMessageData": {"Message": "Sent to 1/1", "Recipients": [{
                "statusCode": 101, "number": "+256774000111", "status": "Success",
                "cost": "UGX 27.0000", "messageId": "ATXid_1", "messageParts": parts}]}});
            classify(StatusCode::CREATED, None, body.to_string().as_bytes())
                .unwrap()
                .segments
        };
        assert_eq!(with(json!(2)), Some(2));
        assert_eq!(
            with(json!("2")),
            None,
            "not a whole number: counted by the service"
        );
        assert_eq!(with(json!(0)), None);
        assert_eq!(with(json!(-1)), None);
    }

    #[test]
    fn an_invalid_number_is_reported_as_such() {
        let err = classify(
            StatusCode::CREATED,
            None,
            &recipient(403, "InvalidPhoneNumber"),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ProviderError::Rejected {
                    invalid_number: true,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = classify(
            StatusCode::CREATED,
            None,
            &recipient(406, "UserInBlacklist"),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ProviderError::Rejected {
                    invalid_number: false,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn undocumented_recipient_codes_are_classified_conservatively() {
        assert_eq!(class(201, &recipient(408, "Whatever")), "rejected");
        assert_eq!(class(201, &recipient(499, "Whatever")), "rejected");
        assert_eq!(class(201, &recipient(103, "Whatever")), "ambiguous");
        assert_eq!(class(201, &recipient(503, "Whatever")), "ambiguous");
    }

    #[test]
    fn an_answer_without_a_recipient_is_classified_by_its_summary() {
        let summary = |message: &str| {
            json!({"SMSMessageData": {"Message": message, "Recipients": []}})
                .to_string()
                .into_bytes()
        };
        assert_eq!(class(201, &summary("InvalidPhoneNumber")), "rejected");
        assert_eq!(class(201, &summary("InvalidSenderId")), "route_refused");
        assert_eq!(class(201, &summary("InsufficientBalance")), "account");
        assert_eq!(
            class(201, &summary("Sent to 0/1 Total Cost: 0")),
            "rejected"
        );
        let err = classify(StatusCode::CREATED, None, &summary("InvalidPhoneNumber")).unwrap_err();
        assert!(matches!(
            err,
            ProviderError::Rejected {
                invalid_number: true,
                ..
            }
        ));
    }

    #[test]
    fn answers_without_a_readable_recipient_fall_back_to_the_http_status() {
        let cases: [(u16, &[u8], &str); 12] = [
            (401, b"The supplied authentication is invalid", "account"),
            (429, b"Too Many Requests", "transient"),
            (503, b"Service Unavailable", "transient"),
            (408, b"", "transient"),
            (500, b"Internal Server Error", "ambiguous"),
            (502, b"<html>Bad Gateway</html>", "ambiguous"),
            (504, b"", "ambiguous"),
            (400, b"Invalid request", "rejected"),
            (403, b"Forbidden", "rejected"),
            (201, b"<xml/>", "ambiguous"),
            (
                201,
                br#"{"SMSMessageData":{"Recipients":[{"status":"Success"}]}}"#,
                "ambiguous",
            ),
            (302, b"", "rejected"),
        ];
        for (status, body, expected) in cases {
            assert_eq!(
                class(status, body),
                expected,
                "{status} {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_retry_after_travels_with_a_transient_answer() {
        let wait = Some(Duration::from_secs(7));
        let err = classify(StatusCode::CREATED, wait, &recipient(501, "GatewayError")).unwrap_err();
        assert_eq!(
            err,
            ProviderError::Transient {
                detail: "HTTP 201: statusCode 501 GatewayError".into(),
                retry_after: wait
            }
        );
        let err = classify(StatusCode::TOO_MANY_REQUESTS, wait, b"").unwrap_err();
        assert!(matches!(err, ProviderError::Transient { retry_after, .. } if retry_after == wait));
    }

    #[test]
    fn details_never_quote_a_full_number() {
        let body = br#"{"SMSMessageData":{"Message":"Sent to 0/1","Recipients":[{"statusCode":406,"number":"+254711222333","status":"UserInBlacklist +254711222333"}]}}"#;
        let detail = classify(StatusCode::CREATED, None, body)
            .unwrap_err()
            .to_string();
        assert!(!detail.contains("254711222333"), "{detail}");
        let detail = classify(StatusCode::BAD_REQUEST, None, b"bad number +254711222333")
            .unwrap_err()
            .to_string();
        assert!(!detail.contains("254711222333"), "{detail}");
        assert!(detail.contains("2333"), "{detail}");
    }

    #[test]
    fn the_form_carries_the_documented_fields() {
        let body = form("mkopa", "+254711222333", "Paid: 10 & thanks", Some("MKOPA"));
        let fields: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        let expected = [
            ("username", "mkopa"),
            ("to", "+254711222333"),
            ("message", "Paid: 10 & thanks"),
            ("from", "MKOPA"),
            ("bulkSMSMode", "1"),
        ];
        assert_eq!(
            fields,
            expected.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec()
        );
        assert!(body.contains("to=%2B254711222333"), "{body}");
        let without = form("mkopa", "+254711222333", "hi", None);
        assert!(!without.contains("from="), "{without}");
    }
}

//! The request Infobip's Send SMS message (v3) takes, and the classification
//! of its answers: the table in the [module doc](super), row by row.

use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::super::http;
use super::status::{Group, Status};
use crate::domain::{SendSms, MAX_KEY_LEN};
use crate::ports::{Accepted, ProviderError};

/// Infobip's `messageId` is 0 to 200 characters: every idempotency key
/// must fit as it is, unhashed and uncut.
const MAX_MESSAGE_ID_CHARS: usize = 200;
const _: () = assert!(MAX_KEY_LEN <= MAX_MESSAGE_ID_CHARS);

#[derive(Debug, Serialize)]
pub(super) struct Request<'a> {
    messages: [Message<'a>; 1],
    options: RequestOptions,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    sender: &'a str,
    destinations: [Destination<'a>; 1],
    content: TextContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhooks: Option<Webhooks<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<MessageOptions>,
}

/// `SmsMessageOptions`: only the validity period (`ValidityPeriod`
/// `{amount, timeUnit}`, at most 48 h: longer is cut to 48 h by Infobip),
/// as infobip/infobip-api-java-client's `SmsMessageOptions` and
/// `SmsValidityPeriod` name them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageOptions {
    validity_period: ValidityPeriod,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidityPeriod {
    amount: u64,
    time_unit: &'static str,
}

/// Infobip's longest validity period.
const MAX_VALIDITY_SECS: u64 = 48 * 3600;

/// Where Infobip posts the message's delivery reports (`SmsWebhooks`),
/// and in which format.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Webhooks<'a> {
    delivery: DeliveryWebhook<'a>,
    content_type: &'static str,
}

#[derive(Debug, Serialize)]
struct DeliveryWebhook<'a> {
    url: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Destination<'a> {
    to: &'a str,
    message_id: &'a str,
}

#[derive(Debug, Serialize)]
struct TextContent<'a> {
    text: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestOptions {
    include_sms_count_in_response: bool,
}

/// The body for one message: the command's `senderId`, else `from`; the
/// number without its `+`; the idempotency key as `messageId`; the
/// instance's callback URL, if any, as the delivery webhook (JSON).
pub(super) fn request<'a>(
    sms: &'a SendSms,
    from: &'a str,
    callback_url: Option<&'a str>,
) -> Request<'a> {
    let number = sms.phone_number.as_str();
    Request {
        messages: [Message {
            sender: sms.sender_id.as_ref().map_or(from, |s| s.as_str()),
            destinations: [Destination {
                to: number.strip_prefix('+').unwrap_or(number),
                message_id: sms.idempotency_key.as_str(),
            }],
            content: TextContent {
                text: sms.text.as_str(),
            },
            webhooks: callback_url.map(|url| Webhooks {
                delivery: DeliveryWebhook { url },
                content_type: "application/json",
            }),
            options: http::seconds_left(sms).map(|secs| MessageOptions {
                validity_period: ValidityPeriod {
                    amount: secs.min(MAX_VALIDITY_SECS),
                    time_unit: "SECONDS",
                },
            }),
        }],
        options: RequestOptions {
            include_sms_count_in_response: true,
        },
    }
}

/// A 2xx answer (`SmsResponseEnvelope`); only what is classified.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    messages: Vec<MessageAnswer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageAnswer {
    message_id: Option<String>,
    status: Option<Status>,
    details: Option<Details>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Details {
    message_count: Option<u32>,
}

/// An error answer (`ApiError`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiError {
    error_code: Option<String>,
    description: Option<String>,
    #[serde(default)]
    violations: Vec<Violation>,
}

#[derive(Deserialize)]
struct Violation {
    property: Option<String>,
    violation: Option<String>,
}

/// Classifies one answer to a send of `message_id`, as the module doc's
/// table says.
pub(super) fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    message_id: &str,
) -> Result<Accepted, ProviderError> {
    if status.is_success() {
        return classify_answer(status, body, message_id);
    }
    let detail = error_detail(status, body);
    Err(match status.as_u16() {
        401 | 403 | 404 => ProviderError::Account { detail },
        429 => ProviderError::Transient {
            detail,
            retry_after,
        },
        s if s >= 500 => ProviderError::Ambiguous {
            detail,
            retry_after,
        },
        _ => ProviderError::rejected(detail),
    })
}

fn classify_answer(
    status: StatusCode,
    body: &[u8],
    message_id: &str,
) -> Result<Accepted, ProviderError> {
    let answer = serde_json::from_slice::<Answer>(body).ok();
    let Some(message) = answer.and_then(|a| a.messages.into_iter().next()) else {
        // Infobip took the request; resending could only be refused as a
        // duplicate. The id is the one sent.
        warn!(%status, "Infobip accepted without a readable message status");
        return Ok(accepted_as_sent(message_id));
    };
    let Some(state) = message.status else {
        warn!(%status, "Infobip accepted without a message status");
        return Ok(accepted_as_sent(message_id));
    };
    let detail = state.describe();
    match state.group() {
        Some(Group::Accepted | Group::Pending | Group::Delivered) => Ok(Accepted {
            provider_message_id: message
                .message_id
                .filter(|id| !id.is_empty())
                .map_or_else(|| message_id.to_owned(), |id| http::bounded_id(&id)),
            segments: message
                .details
                .and_then(|d| d.message_count)
                .filter(|n| *n > 0),
            other_part_ids: Vec::new(),
        }),
        Some(Group::Rejected) => Err(rejected(state.id, detail)),
        Some(Group::Undeliverable | Group::Expired) => Err(ProviderError::rejected(detail)),
        None => Err(ProviderError::Ambiguous {
            detail: format!("undocumented status group: {detail}"),
            retry_after: None,
        }),
    }
}

fn accepted_as_sent(message_id: &str) -> Accepted {
    Accepted {
        provider_message_id: message_id.to_owned(),
        segments: None,
        other_part_ids: Vec::new(),
    }
}

/// A `REJECTED` status, by its id.
fn rejected(id: Option<i64>, detail: String) -> ProviderError {
    match id {
        // REJECTED_NOT_ENOUGH_CREDITS, REJECTED_PREPAID_PACKAGE_EXPIRED
        Some(12 | 17) => ProviderError::Account { detail },
        // REJECTED_NETWORK, REJECTED_SOURCE, REJECTED_SENDER,
        // REJECTED_DESTINATION_NOT_REGISTERED, REJECTED_ROUTE_NOT_AVAILABLE
        Some(6 | 11 | 13 | 18 | 19) => ProviderError::RouteRefused { detail },
        // REJECTED_DUPLICATE_MESSAGE_ID: Infobip saw this key before, so an
        // earlier attempt may be out: never another provider.
        Some(23) => ProviderError::rejected(format!(
            "{detail} (Infobip already has a message with this key as its messageId: \
             an earlier attempt may have been sent)"
        )),
        // REJECTED_FLOODING_FILTER, REJECTED_SYSTEM_ERROR
        Some(20 | 21) => ProviderError::transient(detail),
        // REJECTED_PREFIX_MISSING, REJECTED_INVALID_DESTINATION
        Some(8 | 52) => ProviderError::Rejected {
            detail,
            invalid_number: true,
        },
        // REJECTED_DND, REJECTED_DESTINATION (blacklisted), REJECTED_INVALID_UDH,
        // REJECTED_MESSAGE_TOO_LONG, MISSING_TO, and any id not documented
        _ => ProviderError::rejected(detail),
    }
}

/// `HTTP 400 E400: Request cannot be processed. messages[0].content.text:
/// must not be blank`, else the start of the body; masked.
fn error_detail(status: StatusCode, body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ApiError>(body) {
        Ok(error) if error.error_code.is_some() || error.description.is_some() => {
            let mut text = format!(
                "{} {}",
                error.error_code.unwrap_or_default(),
                error.description.unwrap_or_default()
            );
            for v in error.violations.iter().take(3) {
                text.push_str(&format!(
                    " {}: {}",
                    v.property.as_deref().unwrap_or("?"),
                    v.violation.as_deref().unwrap_or("?")
                ));
            }
            text
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    format!(
        "HTTP {}: {}",
        status.as_u16(),
        http::snippet(text.trim().as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    const SENT_ID: &str = "pay-8812-reminder";

    fn class(result: &Result<Accepted, ProviderError>) -> &'static str {
        match result {
            Ok(_) => "accepted",
            Err(ProviderError::Rejected {
                invalid_number: true,
                ..
            }) => "invalid_number",
            Err(e) => e.class(),
        }
    }

    fn answer(status: u16, body: &Value) -> Result<Accepted, ProviderError> {
        classify(
            StatusCode::from_u16(status).unwrap(),
            None,
            body.to_string().as_bytes(),
            SENT_ID,
        )
    }

    /// A 200 answer for one message with this status, as the Send SMS
    /// message page's example ("Response for request with one
    /// destination"), with `messageId` the one sent.
    fn with_status(group_id: i64, group: &str, id: i64, name: &str, description: &str) -> Value {
        json!({
            "bulkId": "2034072219640523072",
            "messages": [{
                "messageId": SENT_ID,
                "status": {
                    "groupId": group_id, "groupName": group,
                    "id": id, "name": name, "description": description
                },
                "destination": "254712345678",
                "details": {"messageCount": 1}
            }]
        })
    }

    #[test]
    fn expires_at_goes_as_the_messages_validity_period_in_seconds_at_most_48_hours() {
        // SmsMessageOptions.validityPeriod {amount, timeUnit} ("Validity
        // period longer than 48h is not supported"): the Java SDK's
        // SmsValidityPeriod, infobip/infobip-api-java-client.
        let now = std::time::SystemTime::now();
        for (left, most) in [(600u64, 601u64), (72 * 3600, 48 * 3600)] {
            let at = crate::domain::rfc3339(now + Duration::from_secs(left));
            let body = format!(
                r#"{{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi","expiresAt":"{at}"}}"#
            );
            let sms = SendSms::from_json(body.as_bytes()).unwrap();
            let json = serde_json::to_value(request(&sms, "MKOPA", None)).unwrap();
            let period = &json["messages"][0]["options"]["validityPeriod"];
            assert_eq!(period["timeUnit"], "SECONDS");
            let amount = period["amount"].as_u64().unwrap();
            assert!(
                amount <= most && amount + 2 >= most.min(left),
                "{left}: {amount}"
            );
        }
        let sms = SendSms::from_json(
            br#"{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi"}"#,
        )
        .unwrap();
        let json = serde_json::to_value(request(&sms, "MKOPA", None)).unwrap();
        assert!(json["messages"][0].get("options").is_none());
    }

    #[test]
    fn every_documented_status_of_a_200_answer_falls_in_its_class() {
        // https://www.infobip.com/docs/essentials/response-status-and-error-codes
        // (general status codes: PENDING, UNDELIVERABLE, DELIVERED, EXPIRED,
        // REJECTED; names as the page gives them, old / new where it renamed).
        let table: &[(i64, &str, i64, &str, &str)] = &[
            (1, "PENDING", 26, "PENDING_ACCEPTED", "accepted"),
            (1, "PENDING", 7, "PENDING_ENROUTE", "accepted"),
            (1, "PENDING", 3, "PENDING_WAITING_DELIVERY", "accepted"),
            (0, "ACCEPTED", 0, "MESSAGE_ACCEPTED", "accepted"),
            (3, "DELIVERED", 5, "DELIVERED_TO_HANDSET", "accepted"),
            (3, "DELIVERED", 2, "DELIVERED_TO_OPERATOR", "accepted"),
            (
                2,
                "UNDELIVERABLE",
                4,
                "UNDELIVERABLE_REJECTED_OPERATOR",
                "rejected",
            ),
            (
                2,
                "UNDELIVERABLE",
                9,
                "UNDELIVERABLE_NOT_DELIVERED",
                "rejected",
            ),
            (4, "EXPIRED", 15, "EXPIRED_EXPIRED", "rejected"),
            (5, "REJECTED", 6, "REJECTED_NETWORK", "route_refused"),
            (
                5,
                "REJECTED",
                8,
                "REJECTED_PREFIX_MISSING",
                "invalid_number",
            ),
            (5, "REJECTED", 10, "REJECTED_DND", "rejected"),
            (5, "REJECTED", 11, "REJECTED_SOURCE", "route_refused"),
            (5, "REJECTED", 12, "REJECTED_NOT_ENOUGH_CREDITS", "account"),
            (5, "REJECTED", 13, "REJECTED_SENDER", "route_refused"),
            (5, "REJECTED", 14, "REJECTED_DESTINATION", "rejected"),
            (
                5,
                "REJECTED",
                14,
                "REJECTED_DESTINATION_BLOCKLISTED",
                "rejected",
            ),
            (
                5,
                "REJECTED",
                17,
                "REJECTED_PREPAID_PACKAGE_EXPIRED",
                "account",
            ),
            (
                5,
                "REJECTED",
                18,
                "REJECTED_DESTINATION_NOT_REGISTERED",
                "route_refused",
            ),
            (
                5,
                "REJECTED",
                19,
                "REJECTED_ROUTE_NOT_AVAILABLE",
                "route_refused",
            ),
            (5, "REJECTED", 20, "REJECTED_FLOODING_FILTER", "transient"),
            (5, "REJECTED", 21, "REJECTED_SYSTEM_ERROR", "transient"),
            (
                5,
                "REJECTED",
                23,
                "REJECTED_DUPLICATE_MESSAGE_ID",
                "rejected",
            ),
            (5, "REJECTED", 24, "REJECTED_INVALID_UDH", "rejected"),
            (5, "REJECTED", 25, "REJECTED_MESSAGE_TOO_LONG", "rejected"),
            (5, "REJECTED", 51, "MISSING_TO", "rejected"),
            (
                5,
                "REJECTED",
                52,
                "REJECTED_INVALID_DESTINATION",
                "invalid_number",
            ),
            (5, "REJECTED", 52, "REJECTED_DESTINATION", "invalid_number"),
            // Not on the page: the REJECTED group decides.
            (5, "REJECTED", 999, "REJECTED_SOMETHING_NEW", "rejected"),
        ];
        for (group_id, group, id, name, expected) in table {
            let result = answer(200, &with_status(*group_id, group, *id, name, "d"));
            assert_eq!(class(&result), *expected, "{group} {id} {name}");
        }
    }

    #[test]
    fn an_accepted_message_gives_its_id_and_the_parts_infobip_counted() {
        // https://www.infobip.com/docs/api/channels/sms/sms-messaging/outbound-sms/send-sms-messages
        // (200 example, with includeSmsCountInResponse: details.messageCount)
        let mut body = with_status(
            1,
            "PENDING",
            26,
            "PENDING_ACCEPTED",
            "Message sent to next instance",
        );
        body["messages"][0]["details"]["messageCount"] = json!(3);
        let accepted = answer(200, &body).unwrap();
        assert_eq!(accepted.provider_message_id, SENT_ID);
        assert_eq!(accepted.segments, Some(3));

        body["messages"][0]["messageId"] = json!("2250be2d4219-3af1-78856-aabe-1362af1edfd2");
        body["messages"][0]
            .as_object_mut()
            .unwrap()
            .remove("details");
        let accepted = answer(200, &body).unwrap();
        assert_eq!(
            accepted.provider_message_id,
            "2250be2d4219-3af1-78856-aabe-1362af1edfd2"
        );
        assert_eq!(accepted.segments, None);
    }

    #[test]
    fn a_group_named_or_only_numbered_is_read_by_its_name_else_its_id() {
        let only_id = json!({"messages": [{"status": {"groupId": 5, "id": 10}}]});
        assert_eq!(class(&answer(200, &only_id)), "rejected");
        let only_id = json!({"messages": [{"status": {"groupId": 1, "id": 26}}]});
        assert_eq!(class(&answer(200, &only_id)), "accepted");
        // An undocumented group name wins over a documented id: unknown.
        let unknown = json!({"messages": [{"status": {"groupId": 1, "groupName": "QUEUED"}}]});
        assert_eq!(class(&answer(200, &unknown)), "ambiguous");
    }

    #[test]
    fn a_2xx_without_a_readable_status_is_accepted_under_the_id_sent() {
        for body in [
            &b"<html>ok</html>"[..],
            b"",
            b"{}",
            br#"{"messages": []}"#,
            br#"{"messages": [{"messageId": "x"}]}"#,
        ] {
            let accepted = classify(StatusCode::OK, None, body, SENT_ID).unwrap();
            assert_eq!(accepted.provider_message_id, SENT_ID, "{body:?}");
        }
    }

    #[test]
    fn every_documented_error_answer_falls_in_its_class() {
        // 400, 401, 403, 500: https://www.infobip.com/docs/api/channels/sms/sms-messaging/outbound-sms/send-sms-messages
        // 429: https://www.infobip.com/docs/developer-resources/errors-and-responses/rate-limits-and-throttling
        //      (body: the OpenAPI ApiError429 example)
        // 404: https://www.infobip.com/docs/developer-resources/errors-and-responses/schema-reference-and-error-handling
        let error = |code: &str, description: &str| {
            json!({"errorCode": code, "description": description, "action": "a",
                   "violations": [], "resources": []})
        };
        let table: &[(u16, Value, &str)] = &[
            (
                400,
                json!({"errorCode": "E400", "description": "Request cannot be processed.",
                       "action": "Check the syntax, violations and adjust the request.",
                       "violations": [{"property": "messages[0].content.text",
                                       "violation": "must not be blank"}],
                       "resources": []}),
                "rejected",
            ),
            (
                401,
                error("E401", "The request lacks valid authentication credentials for the requested resource."),
                "account",
            ),
            (
                403,
                error("E403", "Insufficient permissions to access the requested resource."),
                "account",
            ),
            (
                404,
                json!({"requestError": {"serviceException": {"messageId": "NOT_FOUND", "text": "Not found"}}}),
                "account",
            ),
            (429, error("E429", "Too many requests sent."), "transient"),
            (500, error("E500", "Something went wrong."), "ambiguous"),
            // Not documented for this endpoint: conservative.
            (502, json!("bad gateway"), "ambiguous"),
            (503, json!("unavailable"), "ambiguous"),
            (504, json!("timeout"), "ambiguous"),
            (405, json!("method"), "rejected"),
            (415, json!("media type"), "rejected"),
            (302, json!(""), "rejected"),
        ];
        for (status, body, expected) in table {
            assert_eq!(class(&answer(*status, body)), *expected, "{status}");
        }
    }

    #[test]
    fn a_429_keeps_its_retry_after() {
        let result = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(2)),
            br#"{"errorCode":"E429","description":"Too many requests sent."}"#,
            SENT_ID,
        );
        assert_eq!(
            result,
            Err(ProviderError::Transient {
                detail: "HTTP 429: E429 Too many requests sent.".into(),
                retry_after: Some(Duration::from_secs(2)),
            })
        );
    }

    #[test]
    fn a_detail_names_the_status_and_the_violation_with_numbers_masked() {
        let body = json!({"errorCode": "E400", "description": "Request cannot be processed.",
            "violations": [{"property": "messages[0].destinations[0].to",
                            "violation": "254712345678 is not a valid number"}]});
        let Err(ProviderError::Rejected { detail, .. }) = answer(400, &body) else {
            panic!("not rejected");
        };
        assert!(
            detail.starts_with("HTTP 400: E400 Request cannot be processed."),
            "{detail}"
        );
        assert!(
            detail.contains("messages[0].destinations[0].to"),
            "{detail}"
        );
        assert!(!detail.contains("254712345678"), "{detail}");
        assert!(detail.contains("5678"), "{detail}");

        let body = with_status(
            5,
            "REJECTED",
            10,
            "REJECTED_DND",
            "Destination 254712345678 on DND",
        );
        let Err(ProviderError::Rejected { detail, .. }) = answer(200, &body) else {
            panic!("not rejected");
        };
        assert!(
            detail.starts_with("Infobip REJECTED REJECTED_DND (10)"),
            "{detail}"
        );
        assert!(!detail.contains("254712345678"), "{detail}");
    }

    #[test]
    fn a_duplicate_message_id_says_an_earlier_attempt_may_have_been_sent() {
        let body = with_status(
            5,
            "REJECTED",
            23,
            "REJECTED_DUPLICATE_MESSAGE_ID",
            "Duplicate message id",
        );
        let Err(ProviderError::Rejected { detail, .. }) = answer(200, &body) else {
            panic!("not rejected");
        };
        assert!(detail.contains("may have been sent"), "{detail}");
    }

    #[test]
    fn the_request_is_the_documented_form_with_the_key_as_message_id() {
        let sms = SendSms::from_json(
            br#"{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(request(&sms, "MKOPA", None)).unwrap(),
            json!({
                "messages": [{
                    "sender": "MKOPA",
                    "destinations": [{"to": "254712345678", "messageId": "k-1"}],
                    "content": {"text": "hi"}
                }],
                "options": {"includeSmsCountInResponse": true}
            })
        );
        let own_sender = SendSms::from_json(
            br#"{"idempotencyKey":"k-2","phoneNumber":"+254712345678","text":"hi","senderId":"SHOP"}"#,
        )
        .unwrap();
        let body = serde_json::to_value(request(&own_sender, "MKOPA", None)).unwrap();
        assert_eq!(body["messages"][0]["sender"], "SHOP");
    }

    #[test]
    fn a_callback_url_goes_as_the_messages_json_delivery_webhook() {
        // https://www.infobip.com/docs/api/channels/sms/sms-messaging/outbound-sms/send-sms-messages
        // (messages[].webhooks: delivery.url, contentType; the OpenAPI
        // schemas SmsWebhooks and SmsMessageDeliveryReporting)
        let sms = SendSms::from_json(
            br#"{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi"}"#,
        )
        .unwrap();
        let url = "https://sms.example.com/v1/callbacks/ib/0123456789abcdef";
        assert_eq!(
            serde_json::to_value(request(&sms, "MKOPA", Some(url))).unwrap(),
            json!({
                "messages": [{
                    "sender": "MKOPA",
                    "destinations": [{"to": "254712345678", "messageId": "k-1"}],
                    "content": {"text": "hi"},
                    "webhooks": {
                        "delivery": {"url": url},
                        "contentType": "application/json"
                    }
                }],
                "options": {"includeSmsCountInResponse": true}
            })
        );
    }
}

//! Infobip's delivery reports: the webhook Infobip posts to the URL a
//! message names in `webhooks.delivery.url` ([Receive outbound SMS
//! message reports][webhook], the report of messages sent with
//! `/sms/3/messages`; the OpenAPI schemas `SmsDeliveryResult` and
//! `SmsDeliveryReport`).
//!
//! **Authentication.** Infobip signs nothing: the URL the adapter gives it
//! holds the instance's secret `callback_token` as its last path segment
//! (`/v1/callbacks/{instance}/{token}`), compared in constant time
//! ([`check_path_token`]). A wrong or missing token is 403 and nothing is
//! read; an instance without a token takes no callbacks (404), and the
//! adapter then names no webhook in its requests.
//!
//! **Format.** A JSON `POST` (the adapter asks for `contentType:
//! application/json`), several reports in one request (Infobip batches up
//! to 100 by default):
//!
//! ```json
//! {"results": [{"bulkId": "...", "messageId": "pay-8812-reminder", "to": "254712345678",
//!               "sentAt": "...", "doneAt": "...", "messageCount": 1,
//!               "price": {"pricePerMessage": 0.01, "currency": "EUR"},
//!               "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5,
//!                          "name": "DELIVERED_TO_HANDSET", "description": "..."},
//!               "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
//!                         "description": "No Error", "permanent": false}}]}
//! ```
//!
//! Read of each result: `messageId` (the id Infobip echoed on acceptance:
//! the idempotency key the adapter sent, so the recorded provider message
//! id), `status` and `error`; every other field (`to`, `price`, `platform`,
//! fields added later) is ignored. One report per message, whatever its
//! parts (`messageCount`). A body that is not this shape, a result
//! without a `messageId` (1 to 256 characters) or a `status` naming no
//! group, is malformed (400): such a body is not Infobip's.
//!
//! - `provider_status`: `status.name` as sent (`DELIVERED_TO_HANDSET`),
//!   else `status.groupName`.
//! - `error_code`: `error.name` (`EC_UNKNOWN_SUBSCRIBER`), else its `id`;
//!   none for `NO_ERROR` (id 0, group `OK`), which Infobip sends with
//!   every successful delivery ([error codes]).
//! - `permanent`: `error.permanent` ("whether sending the same message
//!   again, unchanged, fails the same way", [error codes]), for a failure
//!   only; false where Infobip says nothing.
//!
//! # Status mapping
//!
//! By the status group (`groupName`, else `groupId`), and within
//! `DELIVERED` by the status id ([status codes]; which statuses are final:
//! [message status codes]):
//!
//! | Infobip status | normalized | permanent | source |
//! |---|---|---|---|
//! | `ACCEPTED` (0): `MESSAGE_ACCEPTED` (0) | sent | false | [status codes], OpenAPI `MessageGeneralStatus` |
//! | `PENDING` (1): `PENDING_WAITING_DELIVERY` (3), `PENDING_ENROUTE` (7), `PENDING_ACCEPTED` (26) | sent | false | [status codes]; "Intermediate. A final status follows" [message status codes] |
//! | `DELIVERED` (3): `DELIVERED_TO_OPERATOR` (2) | sent | false | "Intermediate. Reached the operator, not yet the handset. A further DLR may follow" [message status codes] |
//! | `DELIVERED` (3): `DELIVERED_TO_HANDSET` (5), any other id | delivered | false | "Final" [message status codes] |
//! | `UNDELIVERABLE` (2): `UNDELIVERABLE_REJECTED_OPERATOR` (4), `UNDELIVERABLE_NOT_DELIVERED` (9) | undelivered | `error.permanent` | [status codes] |
//! | `EXPIRED` (4): `EXPIRED_EXPIRED` (15), `EXPIRED_DLR_UNKNOWN` (29) | expired | `error.permanent` | [status codes] |
//! | `REJECTED` (5): every id (`REJECTED_NETWORK` (6), `REJECTED_DND` (10), ...) | rejected | `error.permanent` | [status codes] |
//! | any other group | sent (kept in the history only) | false | none |
//!
//! `DELIVERED_TO_OPERATOR` is `sent`, not `delivered`: the message is with
//! the network, not on the handset, and Infobip calls the status
//! intermediate. Where a network never confirms the handset, the message
//! stays `sent`, as the normalized vocabulary says it should.
//!
//! An undocumented group is `sent`, not `unknown`: `unknown` is for a
//! report the provider calls final, and Infobip's report says nothing of
//! finality beyond its group (`doneAt` is on every report). So the report
//! is kept in the message's history (its `providerStatus` shows what
//! Infobip said) and changes no status; a later documented final report
//! still ends the message.
//!
//! [webhook]: https://www.infobip.com/docs/api/channels/sms/sms-messaging/delivery-reports/receive-outbound-sms-message-report
//! [status codes]: https://www.infobip.com/docs/essentials/api-essentials/response-status-and-error-codes
//! [message status codes]: https://www.infobip.com/docs/developer-resources/api-fundamentals/message-status-codes
//! [error codes]: https://www.infobip.com/docs/developer-resources/api-fundamentals/error-code-reference

use secrecy::SecretString;
use serde::Deserialize;

use super::status::{Group, Status};
use crate::adapters::providers::http::{bounded_id, bounded_text, check_path_token, MAX_ID_CHARS};
use crate::domain::DeliveryStatus;
use crate::ports::{CallbackError, CallbackRequest, ProviderReport};

/// `SmsDeliveryResult`: only what is read.
#[derive(Deserialize)]
struct Callback {
    results: Vec<Report>,
}

/// One `SmsDeliveryReport`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    message_id: String,
    status: Status,
    error: Option<ReportError>,
}

/// `SmsMessageError`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReportError {
    id: Option<i64>,
    name: Option<String>,
    permanent: Option<bool>,
}

/// `DELIVERED_TO_OPERATOR`: delivered to the network, not the handset.
const DELIVERED_TO_OPERATOR: i64 = 2;

/// Authenticates a callback by its path token (`token`, the instance's
/// `callback_token`), then reads every report it carries.
pub(super) fn read(
    token: Option<&SecretString>,
    request: &CallbackRequest<'_>,
) -> Result<Vec<ProviderReport>, CallbackError> {
    check_path_token(token, request)?;
    if request.method != "POST" {
        return Err(CallbackError::Malformed(
            "Infobip posts its delivery reports as JSON".into(),
        ));
    }
    let callback: Callback = serde_json::from_slice(request.body)
        .map_err(|e| CallbackError::Malformed(format!("not Infobip's report format: {e}")))?;
    callback.results.iter().map(normalize).collect()
}

fn normalize(report: &Report) -> Result<ProviderReport, CallbackError> {
    let chars = report.message_id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(CallbackError::Malformed(format!(
            "messageId must be 1 to {MAX_ID_CHARS} characters"
        )));
    }
    let status = &report.status;
    let provider_status = status
        .name
        .as_deref()
        .or(status.group_name.as_deref())
        .filter(|s| !s.is_empty())
        .map(bounded_text)
        .or_else(|| status.group_id.map(|id| id.to_string()))
        .ok_or_else(|| CallbackError::Malformed("status names no group".into()))?;
    let normalized = normalized(status);
    let error = report.error.as_ref().filter(|e| !e.is_no_error());
    Ok(ProviderReport {
        provider_message_id: bounded_id(&report.message_id),
        status: normalized,
        provider_status,
        error_code: error.and_then(ReportError::code),
        permanent: normalized.is_failure() && error.and_then(|e| e.permanent) == Some(true),
    })
}

/// The module doc's table.
fn normalized(status: &Status) -> DeliveryStatus {
    match status.group() {
        Some(Group::Accepted | Group::Pending) | None => DeliveryStatus::Sent,
        Some(Group::Delivered) if is_to_operator(status) => DeliveryStatus::Sent,
        Some(Group::Delivered) => DeliveryStatus::Delivered,
        Some(Group::Undeliverable) => DeliveryStatus::Undelivered,
        Some(Group::Expired) => DeliveryStatus::Expired,
        Some(Group::Rejected) => DeliveryStatus::Rejected,
    }
}

/// `DELIVERED_TO_OPERATOR`, by its id (ids are stable), else its name.
fn is_to_operator(status: &Status) -> bool {
    match status.id {
        Some(id) => id == DELIVERED_TO_OPERATOR,
        None => status.name.as_deref() == Some("DELIVERED_TO_OPERATOR"),
    }
}

impl ReportError {
    /// `NO_ERROR` (group `OK`, id 0): what a successful report carries.
    fn is_no_error(&self) -> bool {
        self.id == Some(0) || self.name.as_deref() == Some("NO_ERROR")
    }

    /// Its name, else its id; bounded.
    fn code(&self) -> Option<String> {
        self.name
            .as_deref()
            .filter(|n| !n.is_empty())
            .map(bounded_text)
            .or_else(|| self.id.map(|id| id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use serde_json::{json, Value};

    use super::*;

    const TOKEN: &str = "cb-token-0123456789abcdef";

    fn token() -> SecretString {
        TOKEN.to_owned().into()
    }

    fn request<'a>(method: &'a str, token: Option<&'a str>, body: &'a [u8]) -> CallbackRequest<'a> {
        CallbackRequest {
            method,
            url: "https://sms.example.com/v1/callbacks/ib/cb-token",
            token,
            query: "",
            headers: &[],
            body,
            now: SystemTime::now(),
        }
    }

    fn read_body(body: &[u8]) -> Result<Vec<ProviderReport>, CallbackError> {
        read(Some(&token()), &request("POST", Some(TOKEN), body))
    }

    /// One report with this status and error, shaped as the webhook
    /// page's example.
    fn report(status: Value, error: Value) -> Value {
        json!({"results": [{
            "bulkId": "BULK-ID-123-xyz",
            "messageId": "pay-8812-reminder",
            "to": "254712345678",
            "sentAt": "2019-11-09T16:00:00.000+0000",
            "doneAt": "2019-11-09T16:00:00.000+0000",
            "messageCount": 1,
            "price": {"pricePerMessage": 0.01, "currency": "EUR"},
            "status": status,
            "error": error
        }]})
    }

    /// The error object of a successful report.
    fn no_error() -> Value {
        json!({"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
               "description": "No Error", "permanent": false})
    }

    fn one(body: &Value) -> ProviderReport {
        let mut reports = read_body(body.to_string().as_bytes()).unwrap();
        assert_eq!(reports.len(), 1, "{body}");
        reports.remove(0)
    }

    #[test]
    fn the_documented_example_reads_as_two_delivered_reports() {
        // The request sample of "Receive outbound SMS message reports"
        // https://www.infobip.com/docs/api/channels/sms/sms-messaging/delivery-reports/receive-outbound-sms-message-report
        // (v3: messageCount; as the official SDK's shouldParseOutboundSmsMessageReport).
        let body = br#"{
          "results": [
            {
              "bulkId": "BULK-ID-123-xyz",
              "messageId": "MESSAGE-ID-123-xyz",
              "to": "41793026727",
              "sentAt": "2019-11-09T16:00:00.000+0000",
              "doneAt": "2019-11-09T16:00:00.000+0000",
              "messageCount": 1,
              "price": {"pricePerMessage": 0.01, "currency": "EUR"},
              "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5,
                         "name": "DELIVERED_TO_HANDSET", "description": "Message delivered to handset"},
              "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
                        "description": "No Error", "permanent": false}
            },
            {
              "bulkId": "BULK-ID-123-xyz",
              "messageId": "12db39c3-7822-4e72-a3ec-c87442c0ffc5",
              "to": "41793026834",
              "sentAt": "2019-11-09T17:00:00.000+0000",
              "doneAt": "2019-11-09T17:00:00.000+0000",
              "messageCount": 1,
              "price": {"pricePerMessage": 0.01, "currency": "EUR"},
              "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5,
                         "name": "DELIVERED_TO_HANDSET", "description": "Message delivered to handset"},
              "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
                        "description": "No Error", "permanent": false}
            }
          ]
        }"#;
        let reports = read_body(body).unwrap();
        let delivered = |id: &str| ProviderReport {
            provider_message_id: id.into(),
            status: DeliveryStatus::Delivered,
            provider_status: "DELIVERED_TO_HANDSET".into(),
            error_code: None,
            permanent: false,
        };
        assert_eq!(
            reports,
            [
                delivered("MESSAGE-ID-123-xyz"),
                delivered("12db39c3-7822-4e72-a3ec-c87442c0ffc5")
            ]
        );
    }

    #[test]
    fn every_documented_status_maps_to_its_normalized_status() {
        use DeliveryStatus::*;
        // https://www.infobip.com/docs/essentials/api-essentials/response-status-and-error-codes
        // (general status codes) and, for what is final,
        // https://www.infobip.com/docs/developer-resources/api-fundamentals/message-status-codes
        let table: &[(i64, &str, i64, &str, DeliveryStatus)] = &[
            (0, "ACCEPTED", 0, "MESSAGE_ACCEPTED", Sent),
            (1, "PENDING", 3, "PENDING_WAITING_DELIVERY", Sent),
            (1, "PENDING", 7, "PENDING_ENROUTE", Sent),
            (1, "PENDING", 26, "PENDING_ACCEPTED", Sent),
            (3, "DELIVERED", 2, "DELIVERED_TO_OPERATOR", Sent),
            (3, "DELIVERED", 5, "DELIVERED_TO_HANDSET", Delivered),
            (
                2,
                "UNDELIVERABLE",
                4,
                "UNDELIVERABLE_REJECTED_OPERATOR",
                Undelivered,
            ),
            (
                2,
                "UNDELIVERABLE",
                9,
                "UNDELIVERABLE_NOT_DELIVERED",
                Undelivered,
            ),
            (4, "EXPIRED", 15, "EXPIRED_EXPIRED", Expired),
            (4, "EXPIRED", 29, "EXPIRED_DLR_UNKNOWN", Expired),
            (5, "REJECTED", 6, "REJECTED_NETWORK", Rejected),
            (5, "REJECTED", 8, "REJECTED_PREFIX_MISSING", Rejected),
            (5, "REJECTED", 10, "REJECTED_DND", Rejected),
            (5, "REJECTED", 11, "REJECTED_SOURCE", Rejected),
            (5, "REJECTED", 12, "REJECTED_NOT_ENOUGH_CREDITS", Rejected),
            (5, "REJECTED", 13, "REJECTED_SENDER", Rejected),
            (5, "REJECTED", 14, "REJECTED_DESTINATION", Rejected),
            (
                5,
                "REJECTED",
                17,
                "REJECTED_PREPAID_PACKAGE_EXPIRED",
                Rejected,
            ),
            (
                5,
                "REJECTED",
                18,
                "REJECTED_DESTINATION_NOT_REGISTERED",
                Rejected,
            ),
            (5, "REJECTED", 19, "REJECTED_ROUTE_NOT_AVAILABLE", Rejected),
            (5, "REJECTED", 20, "REJECTED_FLOODING_FILTER", Rejected),
            (5, "REJECTED", 21, "REJECTED_SYSTEM_ERROR", Rejected),
            (5, "REJECTED", 23, "REJECTED_DUPLICATE_MESSAGE_ID", Rejected),
            (5, "REJECTED", 24, "REJECTED_INVALID_UDH", Rejected),
            (5, "REJECTED", 25, "REJECTED_MESSAGE_TOO_LONG", Rejected),
            (5, "REJECTED", 51, "MISSING_TO", Rejected),
            (5, "REJECTED", 52, "REJECTED_INVALID_DESTINATION", Rejected),
        ];
        for (group_id, group, id, name, expected) in table {
            let status = json!({"groupId": group_id, "groupName": group, "id": id,
                                "name": name, "description": "d"});
            let read = one(&report(status, no_error()));
            assert_eq!(read.status, *expected, "{group} {id} {name}");
            assert_eq!(read.provider_status, *name, "the provider's word as sent");
            assert_eq!(read.error_code, None, "NO_ERROR is no error code");
            assert!(!read.permanent, "{name}: NO_ERROR says nothing permanent");
        }
    }

    #[test]
    fn a_failure_carries_its_error_name_and_infobips_permanent_flag() {
        // https://www.infobip.com/docs/developer-resources/api-fundamentals/error-code-reference
        // (handset errors, group 1: EC_UNKNOWN_SUBSCRIBER permanent,
        // EC_UNKNOWN_BASE_STATION not)
        let not_delivered = json!({"groupId": 2, "groupName": "UNDELIVERABLE", "id": 9,
            "name": "UNDELIVERABLE_NOT_DELIVERED", "description": "Message sent not delivered"});
        let unknown_subscriber = json!({"groupId": 1, "groupName": "HANDSET_ERRORS", "id": 1,
            "name": "EC_UNKNOWN_SUBSCRIBER", "description": "Unknown Subscriber", "permanent": true});
        let read = one(&report(not_delivered.clone(), unknown_subscriber));
        assert_eq!(
            read,
            ProviderReport {
                provider_message_id: "pay-8812-reminder".into(),
                status: DeliveryStatus::Undelivered,
                provider_status: "UNDELIVERABLE_NOT_DELIVERED".into(),
                error_code: Some("EC_UNKNOWN_SUBSCRIBER".into()),
                permanent: true,
            }
        );

        let base_station = json!({"groupId": 1, "groupName": "HANDSET_ERRORS", "id": 2,
            "name": "EC_UNKNOWN_BASE_STATION", "permanent": false});
        let read = one(&report(not_delivered.clone(), base_station));
        assert_eq!(read.error_code.as_deref(), Some("EC_UNKNOWN_BASE_STATION"));
        assert!(!read.permanent);

        // Only an id: the id is the code; no flag: not permanent.
        let read = one(&report(not_delivered, json!({"groupId": 1, "id": 27})));
        assert_eq!(read.error_code.as_deref(), Some("27"));
        assert!(!read.permanent);

        // A permanent error on a report that is no failure says nothing.
        let pending =
            json!({"groupId": 1, "groupName": "PENDING", "id": 7, "name": "PENDING_ENROUTE"});
        let absent = json!({"groupId": 1, "groupName": "HANDSET_ERRORS", "id": 1,
            "name": "EC_UNKNOWN_SUBSCRIBER", "permanent": true});
        let read = one(&report(pending, absent));
        assert_eq!(read.status, DeliveryStatus::Sent);
        assert_eq!(read.error_code.as_deref(), Some("EC_UNKNOWN_SUBSCRIBER"));
        assert!(!read.permanent);
    }

    #[test]
    fn a_status_given_by_group_id_only_or_undocumented_is_read_conservatively() {
        let by_id = json!({"groupId": 4, "id": 15});
        let read = one(&report(by_id, Value::Null));
        assert_eq!(read.status, DeliveryStatus::Expired);
        assert_eq!(read.provider_status, "4", "no name: the group id");

        let to_operator = json!({"groupName": "DELIVERED", "name": "DELIVERED_TO_OPERATOR"});
        assert_eq!(
            one(&report(to_operator, Value::Null)).status,
            DeliveryStatus::Sent
        );

        // Not on any page: kept for the history, no status change.
        let new_group = json!({"groupId": 9, "groupName": "CANCELLED", "id": 99,
                               "name": "CANCELLED_BY_USER"});
        let read = one(&report(new_group, Value::Null));
        assert_eq!(read.status, DeliveryStatus::Sent);
        assert_eq!(read.provider_status, "CANCELLED_BY_USER");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut body = report(
            json!({"groupId": 3, "groupName": "DELIVERED", "id": 5,
                   "name": "DELIVERED_TO_HANDSET", "action": "none", "newField": 1}),
            json!({"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
                   "permanent": false, "newField": [1, 2]}),
        );
        body["results"][0]["platform"] =
            json!({"entityId": "promotional-traffic-entity", "applicationId": "app"});
        body["results"][0]["campaignReferenceId"] = json!("summersale");
        body["results"][0]["mccMnc"] = json!("22801");
        body["results"][0]["sender"] = json!("MKOPA");
        body["somethingNew"] = json!({"a": 1});
        let read = one(&body);
        assert_eq!(read.status, DeliveryStatus::Delivered);
        assert_eq!(read.provider_message_id, "pay-8812-reminder");
    }

    #[test]
    fn the_path_token_must_match_to_the_byte() {
        let body = report(
            json!({"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET"}),
            no_error(),
        )
        .to_string();
        let body = body.as_bytes();
        let configured = token();
        assert!(read(Some(&configured), &request("POST", Some(TOKEN), body)).is_ok());

        // Infobip signs nothing, so it has no signed example: the token is
        // the whole authentication. One byte changed, cut, grown, absent.
        let mut changed = TOKEN.as_bytes().to_vec();
        changed[5] ^= 0x01;
        let changed = String::from_utf8(changed).unwrap();
        let longer = format!("{TOKEN}0");
        for given in [
            Some(changed.as_str()),
            Some(&TOKEN[..TOKEN.len() - 1]),
            Some(longer.as_str()),
            Some(""),
            None,
        ] {
            assert_eq!(
                read(Some(&configured), &request("POST", given, body)),
                Err(CallbackError::WrongToken),
                "{given:?}"
            );
        }
        // The token is checked before the body is read.
        assert_eq!(
            read(Some(&configured), &request("POST", None, b"not json")),
            Err(CallbackError::WrongToken)
        );
        // Without a configured token the instance takes no callbacks.
        for unset in [None, Some(SecretString::from(String::new()))] {
            let refused = read(unset.as_ref(), &request("POST", Some(TOKEN), body));
            assert!(
                matches!(refused, Err(CallbackError::NotHere(_))),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn what_is_not_infobips_report_format_is_malformed() {
        let good = |id: Value| {
            json!({"results": [{"messageId": id,
                "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5}}]})
            .to_string()
        };
        let too_long = "x".repeat(MAX_ID_CHARS + 1);
        let bodies: Vec<String> = vec![
            "not json".into(),
            "{}".into(),
            r#"{"results": {}}"#.into(),
            r#"{"id": "pay-8812", "status": "delivered"}"#.into(),
            r#"{"results": [{"status": {"groupId": 3}}]}"#.into(),
            r#"{"results": [{"messageId": "m-1"}]}"#.into(),
            r#"{"results": [{"messageId": "m-1", "status": {}}]}"#.into(),
            r#"{"results": [{"messageId": "m-1", "status": "DELIVERED"}]}"#.into(),
            good(json!("")),
            good(json!(too_long)),
            good(json!(17)),
        ];
        for body in &bodies {
            let result = read_body(body.as_bytes());
            assert!(
                matches!(result, Err(CallbackError::Malformed(_))),
                "{body}: {result:?}"
            );
        }
        // A GET carries nothing: Infobip posts.
        let get = read(Some(&token()), &request("GET", Some(TOKEN), b""));
        assert!(matches!(get, Err(CallbackError::Malformed(_))), "{get:?}");
        // An empty batch is read as no reports.
        assert_eq!(read_body(br#"{"results": []}"#), Ok(Vec::new()));
        // 256 characters is the most kept.
        let longest = "x".repeat(MAX_ID_CHARS);
        let read = read_body(good(json!(longest)).as_bytes()).unwrap();
        assert_eq!(read[0].provider_message_id, longest);
    }
}

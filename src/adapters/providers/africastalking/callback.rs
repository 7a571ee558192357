//! Africa's Talking's delivery reports: one `POST` per report, form-encoded,
//! to the delivery-reports callback URL set in the account's dashboard
//! ("SMS -> SMS Callback URLs -> Delivery Reports"); Africa's Talking takes
//! no per-message callback URL.
//!
//! # Authentication
//!
//! Africa's Talking signs nothing, so the URL carries a secret:
//! `/v1/callbacks/{instance}/{callback_token}`, compared in constant time
//! ([`http::check_path_token`]): no token configured is 404 (the instance
//! takes no callbacks: an unauthenticated report could move any message),
//! a missing or wrong one 403. Only `POST` is taken, as the pages describe
//! (a `GET` is 404).
//!
//! # The fields
//!
//! Pages cited: **[notifications]** is
//! <https://developers.africastalking.com/docs/sms/notifications> (the
//! "Delivery Reports" parameter list; the same text is at
//! <http://docs.africastalking.com/sms/notifications>), **[dlr]** is the
//! older <http://docs.africastalking.com/sms/deliveryreports> (the same
//! statuses, and the `failureReason` list with its descriptions).
//!
//! | field | use | source |
//! |---|---|---|
//! | `id` | the `messageId` of the send answer: required, 1 to 256 characters | [notifications] |
//! | `status` | required, mapped below; kept as `providerStatus` | [notifications] |
//! | `failureReason` | "only provided if status is Rejected or Failed": `errorCode` (64 characters at most), and whether the failure is `permanent` | [notifications], [dlr] |
//! | `phoneNumber`, `networkCode`, `retryCount` | not used: the store knows the number (and a full number is never logged), the event has no place for the network, and `retryCount` "only applies for premium SMS messages" | [notifications] |
//! | any other field | ignored | |
//!
//! The pages say the reports are `POST`ed and name the fields, but not the
//! body's encoding; it is read as `application/x-www-form-urlencoded`, as
//! public integrations read it (e.g. the Community Health Toolkit's,
//! <https://docs.communityhealthtoolkit.org/building/guides/messaging/gateways/africas-talking>).
//! A body without `id` or `status` (JSON, say) is malformed: 400, and
//! Africa's Talking sends it again.
//!
//! # Statuses
//!
//! | `status` | normalized | `permanent` | source |
//! |---|---|---|---|
//! | `Sent` ("sent by our network") | `sent` | false | [notifications] |
//! | `Submitted` ("submitted to the MSP") | `sent` | false | [notifications] |
//! | `Buffered` ("queued by the MSP") | `sent` | false | [notifications] |
//! | `Success` ("delivered to the receiver's handset", final) | `delivered` | false | [notifications] |
//! | `Rejected` ("rejected by the MSP", final) | `rejected` | by `failureReason`, below | [notifications] |
//! | `Failed` ("could not be delivered to the receiver's handset", final) | `undelivered` | by `failureReason`, below | [notifications] |
//! | any other (undocumented) | `sent` | false | see below |
//!
//! An undocumented status is kept in the history as `sent`, so it changes
//! nothing and publishes nothing. The pages name every final status
//! (`Rejected`, `Success`, `Failed`: "This is a final status"), so a status
//! they do not name cannot be known to be final; calling it `unknown` would
//! end the message's lifecycle and hide the documented final report that
//! may follow. Refusing it (400) would have Africa's Talking send it again
//! and again for nothing. Statuses are matched ignoring ASCII case; the
//! provider's word is kept as sent.
//!
//! | `failureReason` (with `Rejected` or `Failed`) | `permanent` | why |
//! |---|---|---|
//! | `UserDoesNotExist` ("sent to a non-existent mobile number") | true | the number is wrong |
//! | `UserInBlackList` ("blacklisted not to receive messages from a particular service") | true | the recipient blocked the sender |
//! | `UserIsInactive` ("the subscriber is inactive or the account deactivated by the MSP") | true | the line is out of service |
//! | `NotNetworkSubscriber` ("passed to an MSP where the subscriber doesn't belong"; some copies of the page spell it `NotNetworkSubcriber`, both are read) | true | a resend takes the same route |
//! | `UserNotSubscribedToProduct` (a subscription product's message to a number not subscribed) | true | the same message fails again |
//! | `InvalidLinkId` ("sent with an invalid linkId for an onDemand service") | true | the same message fails again |
//! | `InsufficientCredit` ("the subscriber doesn't have enough airtime for a premium subscription service/message") | false | the subscriber can top up |
//! | `UserAccountSuspended` ("the mobile subscriber has been suspended by the MSP") | false | a suspension can be lifted |
//! | `DeliveryFailure` ("fails for any reason not listed above or where the MSP didn't provide a delivery failure reason") | false | nothing known |
//! | missing, or undocumented | false | nothing known |
//!
//! Source of every row: [dlr] ("The possible values for failureReason")
//! and [notifications]; the `permanent` column is the service's reading of
//! each description (Africa's Talking does not say which are permanent).

use secrecy::SecretString;

use crate::adapters::providers::http::{self, bounded_id, bounded_text};
use crate::domain::DeliveryStatus;
use crate::ports::{CallbackError, CallbackRequest, ProviderReport};

/// The documented `status` values and their normalized status.
pub(super) const STATUSES: [(&str, DeliveryStatus); 6] = [
    ("Sent", DeliveryStatus::Sent),
    ("Submitted", DeliveryStatus::Sent),
    ("Buffered", DeliveryStatus::Sent),
    ("Success", DeliveryStatus::Delivered),
    ("Rejected", DeliveryStatus::Rejected),
    ("Failed", DeliveryStatus::Undelivered),
];

/// The documented `failureReason` values and whether each is permanent.
pub(super) const FAILURE_REASONS: [(&str, bool); 10] = [
    ("UserDoesNotExist", true),
    ("UserInBlackList", true),
    ("UserIsInactive", true),
    ("NotNetworkSubscriber", true),
    ("NotNetworkSubcriber", true),
    ("UserNotSubscribedToProduct", true),
    ("InvalidLinkId", true),
    ("InsufficientCredit", false),
    ("UserAccountSuspended", false),
    ("DeliveryFailure", false),
];

/// Authenticates one Africa's Talking delivery report by its path token
/// and reads it (see the module doc).
pub(super) fn read(
    token: Option<&SecretString>,
    request: &CallbackRequest<'_>,
) -> Result<Vec<ProviderReport>, CallbackError> {
    http::check_path_token(token, request)?;
    if request.method != "POST" {
        return Err(CallbackError::NotHere(
            "Africa's Talking delivery reports are POSTed".into(),
        ));
    }
    let form = http::callback_form(request);
    let id = http::field(&form, "id")
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| CallbackError::Malformed("no id".into()))?;
    if id.chars().count() > http::MAX_ID_CHARS {
        return Err(CallbackError::Malformed(
            "id must be 1 to 256 characters".into(),
        ));
    }
    let status = http::field(&form, "status")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CallbackError::Malformed("no status".into()))?;
    let reason = http::field(&form, "failureReason")
        .map(str::trim)
        .filter(|r| !r.is_empty());
    let normalized = normalize(status);
    let permanent = normalized.is_failure() && reason.is_some_and(is_permanent);
    Ok(vec![ProviderReport {
        provider_message_id: bounded_id(id),
        status: normalized,
        provider_status: bounded_text(status),
        error_code: reason.map(bounded_text),
        permanent,
    }])
}

/// The normalized status of a `status` value; `sent` for an undocumented
/// one (see the module doc).
fn normalize(status: &str) -> DeliveryStatus {
    STATUSES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(status))
        .map_or(DeliveryStatus::Sent, |(_, normalized)| *normalized)
}

/// Whether a `failureReason` says a new attempt cannot help.
fn is_permanent(reason: &str) -> bool {
    FAILURE_REASONS
        .iter()
        .any(|(name, permanent)| *permanent && name.eq_ignore_ascii_case(reason))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    const TOKEN: &str = "at-callback-token-0123456789";
    const CONTENT_TYPE: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    fn request<'a>(
        method: &'a str,
        token: Option<&'a str>,
        headers: &'a [(String, String)],
        body: &'a [u8],
    ) -> CallbackRequest<'a> {
        CallbackRequest {
            method,
            url: "https://sms.example.com/v1/callbacks/at/at-callback-token-0123456789",
            token,
            query: "",
            headers,
            body,
            now: SystemTime::now(),
        }
    }

    fn headers() -> Vec<(String, String)> {
        vec![(CONTENT_TYPE.0.to_owned(), CONTENT_TYPE.1.to_owned())]
    }

    /// Reads `body` POSTed with the right token.
    fn read_body(body: &str) -> Result<Vec<ProviderReport>, CallbackError> {
        let secret = SecretString::from(TOKEN);
        let headers = headers();
        read(
            Some(&secret),
            &request("POST", Some(TOKEN), &headers, body.as_bytes()),
        )
    }

    fn one(body: &str) -> ProviderReport {
        let mut reports = read_body(body).unwrap();
        assert_eq!(reports.len(), 1);
        reports.remove(0)
    }

    /// A report as Africa's Talking posts it: the fields of the
    /// "Delivery Reports" parameter list of
    /// https://developers.africastalking.com/docs/sms/notifications (the
    /// networkCode 99999 is the list's "Athena (sandbox environment)").
    fn posted(status: &str, reason: Option<&str>) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("id", "ATXid_sample")
            .append_pair("status", status)
            .append_pair("phoneNumber", "+254711XXXYYY")
            .append_pair("networkCode", "99999");
        if let Some(reason) = reason {
            form.append_pair("failureReason", reason);
        }
        form.finish()
    }

    #[test]
    fn every_documented_status_is_normalized() {
        // https://developers.africastalking.com/docs/sms/notifications,
        // "status": the six documented values.
        let cases = [
            ("Sent", DeliveryStatus::Sent),
            ("Submitted", DeliveryStatus::Sent),
            ("Buffered", DeliveryStatus::Sent),
            ("Success", DeliveryStatus::Delivered),
            ("Rejected", DeliveryStatus::Rejected),
            ("Failed", DeliveryStatus::Undelivered),
        ];
        for (status, expected) in cases {
            let report = one(&posted(status, None));
            assert_eq!(report.status, expected, "{status}");
            assert_eq!(report.provider_status, status);
            assert_eq!(report.provider_message_id, "ATXid_sample");
            assert_eq!(report.error_code, None, "{status}");
            assert!(
                !report.permanent,
                "{status}: no failureReason, nothing known"
            );
        }
        let listed: Vec<&str> = cases.iter().map(|(s, _)| *s).collect();
        let table: Vec<&str> = STATUSES.iter().map(|(s, _)| *s).collect();
        assert_eq!(listed, table, "the table is the documented list");
    }

    #[test]
    fn every_documented_failure_reason_says_whether_it_is_permanent() {
        // http://docs.africastalking.com/sms/deliveryreports, "The possible
        // values for failureReason"; the page spells NotNetworkSubcriber
        // in some copies, NotNetworkSubscriber in others.
        let cases = [
            ("UserDoesNotExist", true),
            ("UserInBlackList", true),
            ("UserIsInactive", true),
            ("NotNetworkSubscriber", true),
            ("NotNetworkSubcriber", true),
            ("UserNotSubscribedToProduct", true),
            ("InvalidLinkId", true),
            ("InsufficientCredit", false),
            ("UserAccountSuspended", false),
            ("DeliveryFailure", false),
        ];
        for (status, normalized) in [
            ("Failed", DeliveryStatus::Undelivered),
            ("Rejected", DeliveryStatus::Rejected),
        ] {
            for (reason, permanent) in cases {
                let report = one(&posted(status, Some(reason)));
                assert_eq!(report.status, normalized, "{status} {reason}");
                assert_eq!(report.provider_status, status);
                assert_eq!(report.error_code.as_deref(), Some(reason));
                assert_eq!(report.permanent, permanent, "{status} {reason}");
            }
        }
        assert_eq!(cases, FAILURE_REASONS, "the table is the documented list");
    }

    #[test]
    fn an_undocumented_failure_reason_is_kept_but_not_permanent() {
        let report = one(&posted("Failed", Some("AbsentSubscriber")));
        assert_eq!(report.status, DeliveryStatus::Undelivered);
        assert_eq!(report.error_code.as_deref(), Some("AbsentSubscriber"));
        assert!(!report.permanent);
        // A reason beside a success is kept, and changes nothing else.
        let report = one(&posted("Success", Some("UserDoesNotExist")));
        assert_eq!(report.status, DeliveryStatus::Delivered);
        assert!(!report.permanent, "only a failure is permanent");
    }

    #[test]
    fn an_undocumented_status_is_history_only() {
        for status in ["Expired", "AbsentSubscriber", "Queued"] {
            let report = one(&posted(status, None));
            assert_eq!(report.status, DeliveryStatus::Sent, "{status}");
            assert_eq!(report.provider_status, status);
            assert!(!report.permanent);
        }
    }

    #[test]
    fn statuses_are_matched_ignoring_case_and_kept_as_sent() {
        let report = one(&posted("SUCCESS", None));
        assert_eq!(report.status, DeliveryStatus::Delivered);
        assert_eq!(report.provider_status, "SUCCESS");
        let report = one(&posted("failed", Some("userdoesnotexist")));
        assert_eq!(report.status, DeliveryStatus::Undelivered);
        assert!(report.permanent);
    }

    #[test]
    fn unknown_fields_and_field_order_do_not_matter() {
        let report = one(
            "retryCount=0&failureReason=UserInBlackList&networkCode=63902\
             &someFutureField=x&status=Failed&phoneNumber=%2B254711222333&id=ATXid_42",
        );
        assert_eq!(report.provider_message_id, "ATXid_42");
        assert_eq!(report.status, DeliveryStatus::Undelivered);
        assert_eq!(report.error_code.as_deref(), Some("UserInBlackList"));
        assert!(report.permanent);
    }

    #[test]
    fn the_path_token_is_required_and_compared_exactly() {
        let secret = SecretString::from(TOKEN);
        let headers = headers();
        let body = posted("Success", None);
        let check = |token: Option<&str>| {
            read(
                Some(&secret),
                &request("POST", token, &headers, body.as_bytes()),
            )
        };
        assert!(check(Some(TOKEN)).is_ok());
        // One byte changed, one byte more or less, another case, none.
        let mut changed = TOKEN.as_bytes().to_vec();
        changed[5] ^= 1;
        let changed = String::from_utf8(changed).unwrap();
        let longer = format!("{TOKEN}0");
        let shorter = &TOKEN[..TOKEN.len() - 1];
        let upper = TOKEN.to_uppercase();
        for wrong in [
            Some(changed.as_str()),
            Some(&longer),
            Some(shorter),
            Some(&upper),
            Some(""),
            None,
        ] {
            assert_eq!(check(wrong), Err(CallbackError::WrongToken), "{wrong:?}");
        }
    }

    #[test]
    fn an_instance_without_a_token_takes_no_callbacks() {
        let headers = headers();
        let body = posted("Success", None);
        for configured in [None, Some(SecretString::from(""))] {
            let err = read(
                configured.as_ref(),
                &request("POST", Some(TOKEN), &headers, body.as_bytes()),
            )
            .unwrap_err();
            assert!(matches!(err, CallbackError::NotHere(_)), "{err:?}");
        }
    }

    #[test]
    fn the_token_is_checked_before_the_body_is_read() {
        let secret = SecretString::from(TOKEN);
        let headers = headers();
        let err = read(
            Some(&secret),
            &request("POST", Some("wrong-token-0123456789"), &headers, b"garbage"),
        )
        .unwrap_err();
        assert_eq!(err, CallbackError::WrongToken);
    }

    #[test]
    fn a_get_is_not_how_africas_talking_calls_back() {
        let secret = SecretString::from(TOKEN);
        let err = read(Some(&secret), &request("GET", Some(TOKEN), &[], b"")).unwrap_err();
        assert!(matches!(err, CallbackError::NotHere(_)), "{err:?}");
    }

    #[test]
    fn a_report_without_an_id_or_a_status_is_malformed() {
        let long_id = format!("id={}&status=Success", "x".repeat(257));
        for body in [
            "",
            "status=Success",
            "id=&status=Success",
            "id=ATXid_1",
            "id=ATXid_1&status=",
            "id=ATXid_1&status=%20",
            r#"{"id":"ATXid_1","status":"Success"}"#,
            long_id.as_str(),
        ] {
            let err = read_body(body).unwrap_err();
            assert!(
                matches!(err, CallbackError::Malformed(_)),
                "{body}: {err:?}"
            );
        }
        let at_most = format!("id={}&status=Success", "x".repeat(256));
        assert!(read_body(&at_most).is_ok());
    }

    #[test]
    fn malformed_answers_quote_nothing_from_the_report() {
        let err = read_body("phoneNumber=%2B254711222333&status=Failed")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("254711222333"), "{err}");
    }

    #[test]
    fn long_fields_are_bounded() {
        let body = format!(
            "id=ATXid_1&status={}&failureReason={}",
            "S".repeat(500),
            "R".repeat(500)
        );
        let report = one(&body);
        assert_eq!(report.provider_status.chars().count(), 64);
        assert_eq!(report.error_code.unwrap().chars().count(), 64);
    }
}

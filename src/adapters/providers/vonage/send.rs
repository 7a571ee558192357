//! The request form and the classification of Vonage's answers, both pure
//! so the table in [`super`] is tested here row by row.

use std::borrow::Cow;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::adapters::providers::http;
use crate::domain::{count_segments, Encoding, SendSms};
use crate::ports::{Accepted, ProviderError};

/// Longest `client-ref` sent: the limit Vonage's SDKs enforce
/// (`vonage-java-sdk` `Message::setClientReference`, `vonage-python-sdk`
/// `SmsMessage.client_ref`).
pub(super) const MAX_CLIENT_REF: usize = 100;
/// Characters of a long key kept in front of its digest.
const CLIENT_REF_PREFIX: usize = MAX_CLIENT_REF - 1 - 64;

/// A number as Vonage takes it, E.164 digits without the `+`; anything
/// else (an alphanumeric sender id) as it is.
pub(super) fn address(raw: &str) -> &str {
    match raw.strip_prefix('+') {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => digits,
        _ => raw,
    }
}

/// The `client-ref` of a key: the key itself, or for a key longer than
/// [`MAX_CLIENT_REF`] its first characters, `~` and its hex SHA-256, so
/// that two keys never share a reference.
pub(super) fn client_ref(key: &str) -> Cow<'_, str> {
    if key.chars().count() <= MAX_CLIENT_REF {
        return Cow::Borrowed(key);
    }
    let prefix: String = key.chars().take(CLIENT_REF_PREFIX).collect();
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    Cow::Owned(format!("{prefix}~{digest}"))
}

/// Vonage's shortest and longest `ttl`, in milliseconds.
const MIN_TTL_MS: u64 = 20_000;
const MAX_TTL_MS: u64 = 604_800_000;

/// The form body of one message (`from`, `to`, `text`, `type`,
/// `client-ref`, and `callback` when the instance has a callback URL);
/// `default_from` is the instance's sender.
pub(super) fn form(sms: &SendSms, default_from: &str, callback: Option<&str>) -> String {
    let from = sms
        .sender_id
        .as_ref()
        .map_or(default_from, |s| address(s.as_str()));
    let kind = match count_segments(sms.text.as_str()).0 {
        Encoding::Gsm7 => "text",
        Encoding::Ucs2 => "unicode",
    };
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("from", from)
        .append_pair("to", address(sms.phone_number.as_str()))
        .append_pair("text", sms.text.as_str())
        .append_pair("type", kind)
        .append_pair("client-ref", &client_ref(sms.idempotency_key.as_str()));
    if let Some(callback) = callback {
        form.append_pair("callback", callback);
    }
    // ttl: milliseconds, 20,000 to 604,800,000 (Vonage's SDKs check the
    // same range: vonage-python-sdk sms/requests.py; the field is in
    // https://developer.vonage.com/en/api/sms).
    if let Some(secs) = http::seconds_left(sms) {
        let ttl = secs.saturating_mul(1000).clamp(MIN_TTL_MS, MAX_TTL_MS);
        form.append_pair("ttl", &ttl.to_string());
    }
    form.finish()
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "message-count")]
    message_count: Option<Value>,
    #[serde(default)]
    messages: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    status: Option<Value>,
    #[serde(rename = "message-id")]
    message_id: Option<String>,
    #[serde(rename = "error-text")]
    error_text: Option<String>,
}

/// One part's status, as text: the API sends strings ("0"), one SDK's
/// fixtures numbers.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What a documented non-zero status means, and its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Transient,
    RouteRefused,
    Rejected,
    InvalidNumber,
    Account,
}

/// The documented statuses (the table in [`super`]).
fn documented(code: &str) -> Option<(&'static str, Class)> {
    use Class::*;
    Some(match code {
        "1" => ("Throttled", Transient),
        "2" => ("Missing Parameters", Rejected),
        "3" => ("Invalid Parameters", Rejected),
        "4" => ("Invalid Credentials", Account),
        "5" => ("Internal Error", Transient),
        "6" => ("Invalid Message", RouteRefused),
        "7" => ("Number Barred", Rejected),
        "8" => ("Partner Account Barred", Account),
        "9" => ("Partner Quota Violation", Account),
        "10" => ("Too Many Existing Binds", Transient),
        "11" => ("Account Not Enabled For HTTP", Account),
        "12" => ("Message Too Long", Rejected),
        "14" => ("Invalid Signature", Account),
        "15" => ("Invalid Sender Address", RouteRefused),
        "22" => ("Invalid Network Code", RouteRefused),
        "23" => ("Invalid Callback URL", Rejected),
        "29" => ("Non-Whitelisted Destination", RouteRefused),
        "32" => ("Signature And API Secret Disallowed", Rejected),
        "33" => ("Number De-activated", InvalidNumber),
        _ => return None,
    })
}

/// Classifies Vonage's answer: its HTTP status, its body (bounded) and its
/// `Retry-After`.
pub(super) fn classify(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<Accepted, ProviderError> {
    if !status.is_success() {
        let detail = format!("HTTP {}: {}", status.as_u16(), http::snippet(body));
        return Err(match status.as_u16() {
            401 | 403 => ProviderError::Account { detail },
            _ => http::classify_status(status, detail, retry_after),
        });
    }
    let answer = serde_json::from_slice::<Answer>(body).ok();
    let parts: Option<Vec<(String, &Part)>> = answer.as_ref().and_then(|a| {
        a.messages
            .iter()
            .map(|p| p.status.as_ref().and_then(text_of).map(|code| (code, p)))
            .collect()
    });
    let (Some(answer), Some(parts)) = (&answer, parts.filter(|p| !p.is_empty())) else {
        return Err(ProviderError::Ambiguous {
            detail: format!(
                "HTTP {} without a readable messages list (Vonage may have queued it): {}",
                status.as_u16(),
                http::snippet(body)
            ),
            retry_after,
        });
    };
    let queued = parts.iter().filter(|(code, _)| code == "0").count();
    let Some((index, (code, part))) = parts.iter().enumerate().find(|(_, (c, _))| c != "0") else {
        let segments = answer
            .message_count
            .as_ref()
            .and_then(text_of)
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(parts.len() as u32);
        // Each part has an id of its own, and Vonage reports on each.
        let mut ids = parts
            .iter()
            .map(|(_, part)| http::bounded_id(part.message_id.as_deref().unwrap_or_default()))
            .filter(|id| !id.is_empty());
        let first = ids.next().unwrap_or_default();
        return Ok(Accepted {
            provider_message_id: first,
            segments: Some(segments),
            other_part_ids: ids.take(http::MAX_PARTS - 1).collect(),
        });
    };
    let meaning = documented(code);
    let detail = format!(
        "Vonage status {} ({}): {}",
        http::snippet(code.as_bytes()),
        meaning.map_or("undocumented", |(m, _)| m),
        http::snippet(part.error_text.as_deref().unwrap_or_default().as_bytes())
    );
    if queued > 0 {
        return Err(ProviderError::rejected(format!(
            "Vonage queued {queued} of {} parts, and resending would repeat them; part {}: {detail}",
            parts.len(),
            index + 1
        )));
    }
    Err(match meaning.map_or(Class::Rejected, |(_, class)| class) {
        Class::Transient => ProviderError::Transient {
            detail,
            retry_after,
        },
        Class::RouteRefused => ProviderError::RouteRefused { detail },
        Class::Rejected => ProviderError::rejected(detail),
        Class::InvalidNumber => ProviderError::Rejected {
            detail,
            invalid_number: true,
        },
        Class::Account => ProviderError::Account { detail },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const API_SMS: &str = "https://developer.vonage.com/en/api/sms";
    const TROUBLESHOOTING: &str =
        "https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms";
    const API_ERRORS_SMS: &str = "https://developer.vonage.com/en/api-errors/sms";
    const API_ERRORS: &str = "https://developer.vonage.com/en/api-errors";
    const PYTHON_SDK: &str = "Vonage/vonage-python-sdk sms/tests/data";
    const NODE_SDK: &str = "Vonage/vonage-node-sdk packages/sms/__tests__/__dataSets__/sms.ts";

    /// What an answer must come to.
    #[derive(Debug)]
    enum Expect {
        Accepted(&'static str, u32),
        Class(&'static str),
        InvalidNumber,
    }

    fn error(code: &str, text: &str) -> String {
        format!(
            r#"{{"message-count": "1", "messages": [{{"status": "{code}", "error-text": "{text}"}}]}}"#
        )
    }

    fn check(source: &str, status: u16, body: &str, expect: &Expect) {
        let status = StatusCode::from_u16(status).unwrap();
        let outcome = classify(status, body.as_bytes(), None);
        match (expect, &outcome) {
            (Expect::Accepted(id, parts), Ok(a)) => {
                assert_eq!(
                    (a.provider_message_id.as_str(), a.segments),
                    (*id, Some(*parts)),
                    "{source}: {body}"
                )
            }
            (Expect::Class(class), Err(e)) => {
                assert_eq!(e.class(), *class, "{source}: {body}: {e:?}");
                if let ProviderError::Rejected { invalid_number, .. } = e {
                    assert!(!invalid_number, "{source}: {body}");
                }
            }
            (
                Expect::InvalidNumber,
                Err(ProviderError::Rejected {
                    invalid_number: true,
                    ..
                }),
            ) => {}
            _ => panic!("{source}: {body}: expected {expect:?}, got {outcome:?}"),
        }
    }

    #[test]
    fn every_documented_answer_falls_in_its_class() {
        use Expect::*;
        let fixtures: Vec<(&str, u16, String, Expect)> = vec![
            // The success example of the troubleshooting page.
            (
                TROUBLESHOOTING,
                200,
                r#"{"message-count": "1", "messages": [{"to": "447700900000", "message-id": "0C000000217B7F02", "status": "0", "remaining-balance": "15.53590000", "message-price": "0.03330000", "network": "23410"}]}"#.into(),
                Accepted("0C000000217B7F02", 1),
            ),
            // A two-part text: one entry per part (send_long_sms.json).
            (
                PYTHON_SDK,
                200,
                r#"{"message-count": "2", "messages": [{"to": "1234567890", "message-id": "62dfdf68-6c7c-479a-a190-5c52f798a787", "status": "0", "remaining-balance": "37.43563628", "message-price": "0.04120000", "network": "23420", "client-ref": "ref123"}, {"to": "1234567890", "message-id": "72ff9536-62d6-455a-9f0b-65f3c265b423", "status": "0", "remaining-balance": "37.43563628", "message-price": "0.04120000", "network": "23420", "client-ref": "ref123"}]}"#.into(),
                Accepted("62dfdf68-6c7c-479a-a190-5c52f798a787", 2),
            ),
            // The Node SDK's fixture sends message-count as a number.
            (
                NODE_SDK,
                200,
                r#"{"message-count": 1, "messages": [{"to": "14152739164", "message-id": "986ebc8e-46de-4f80-88e4-21d4c5d0c0a6", "status": "0", "remaining-balance": "0.42", "message-price": "0.84", "network": "123456"}]}"#.into(),
                Accepted("986ebc8e-46de-4f80-88e4-21d4c5d0c0a6", 1),
            ),
            // The error example of the API reference's ErrorMessage schema.
            (API_SMS, 200, error("2", "Missing to param"), Class("rejected")),
            // send_sms_error.json.
            (PYTHON_SDK, 200, error("7", "Number barred."), Class("rejected")),
            // Each status of the error table (error-text as its meaning).
            (API_ERRORS_SMS, 200, error("1", "Throttled"), Class("transient")),
            (API_ERRORS_SMS, 200, error("3", "Invalid Parameters"), Class("rejected")),
            (API_ERRORS_SMS, 200, error("4", "Invalid Credentials"), Class("account")),
            (API_ERRORS_SMS, 200, error("5", "Internal Error"), Class("transient")),
            (API_ERRORS_SMS, 200, error("6", "Invalid Message"), Class("route_refused")),
            (API_ERRORS_SMS, 200, error("8", "Partner Account Barred"), Class("account")),
            (API_ERRORS_SMS, 200, error("9", "Partner Quota Violation"), Class("account")),
            (API_ERRORS_SMS, 200, error("10", "Too Many Existing Binds"), Class("transient")),
            (API_ERRORS_SMS, 200, error("11", "Account Not Enabled For HTTP"), Class("account")),
            (API_ERRORS_SMS, 200, error("12", "Message Too Long"), Class("rejected")),
            (API_ERRORS_SMS, 200, error("14", "Invalid Signature"), Class("account")),
            (TROUBLESHOOTING, 200, error("15", "Invalid Sender Address"), Class("route_refused")),
            (TROUBLESHOOTING, 200, error("22", "Invalid Network Code"), Class("route_refused")),
            (TROUBLESHOOTING, 200, error("23", "Invalid Callback URL"), Class("rejected")),
            (TROUBLESHOOTING, 200, error("29", "Non-Whitelisted Destination"), Class("route_refused")),
            (TROUBLESHOOTING, 200, error("32", "Signature And API Secret Disallowed"), Class("rejected")),
            (TROUBLESHOOTING, 200, error("33", "Number De-activated"), InvalidNumber),
            // Not in the table (13 is "no longer used" in the Java SDK).
            (TROUBLESHOOTING, 200, error("13", "Communication Failed"), Class("rejected")),
            (TROUBLESHOOTING, 200, error("99", ""), Class("rejected")),
            // send_sms_partial_error.json: part 1 queued, part 2 throttled.
            (
                PYTHON_SDK,
                200,
                r#"{"message-count": "2", "messages": [{"to": "1234567890", "message-id": "3295d748-4e14-4681-af78-166dca3c5aab", "status": "0", "remaining-balance": "38.07243628", "message-price": "0.04120000", "network": "23420"}, {"status": "1", "error-text": "Throttled"}]}"#.into(),
                Class("rejected"),
            ),
            // No part queued: the first part's status decides.
            (
                PYTHON_SDK,
                200,
                r#"{"message-count": "2", "messages": [{"status": "1", "error-text": "Throttled"}, {"status": "1", "error-text": "Throttled"}]}"#.into(),
                Class("transient"),
            ),
            // Undocumented 200s: Vonage may have queued it.
            (API_SMS, 200, String::new(), Class("ambiguous")),
            (API_SMS, 200, "<html>ok</html>".into(), Class("ambiguous")),
            (API_SMS, 200, r#"{"message-count": "0", "messages": []}"#.into(), Class("ambiguous")),
            (API_SMS, 200, r#"{"messages": [{"message-id": "x"}]}"#.into(), Class("ambiguous")),
            // The generic errors of Vonage's APIs (RFC 7807 bodies).
            (
                API_ERRORS,
                401,
                r#"{"type": "https://developer.nexmo.com/api-errors#unauthorized", "title": "Unauthorized", "detail": "You did not provide correct credentials."}"#.into(),
                Class("account"),
            ),
            (
                API_ERRORS,
                403,
                r#"{"type": "https://example.com/Error#out-of-credit", "title": "You do not have enough credit", "detail": "Your current balance is 30, but that costs 50.", "instance": "<trace_id>"}"#.into(),
                Class("account"),
            ),
            // Not documented for the SMS API: the project's generic rule.
            (API_SMS, 429, String::new(), Class("transient")),
            (API_SMS, 503, String::new(), Class("transient")),
            (API_SMS, 500, String::new(), Class("ambiguous")),
            (API_SMS, 502, String::new(), Class("ambiguous")),
            (API_SMS, 504, String::new(), Class("ambiguous")),
            (API_SMS, 400, String::new(), Class("rejected")),
            (API_SMS, 404, String::new(), Class("rejected")),
        ];
        for (source, status, body, expect) in &fixtures {
            check(source, *status, body, expect);
        }
    }

    #[test]
    fn every_documented_status_has_a_meaning_and_a_class() {
        let codes = [
            "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "14", "15", "22", "23",
            "29", "32", "33",
        ];
        for code in codes {
            assert!(documented(code).is_some(), "{code}");
        }
        for code in ["0", "13", "16", "20", "", "x"] {
            assert!(documented(code).is_none(), "{code}");
        }
    }

    #[test]
    fn a_partial_answer_says_how_many_parts_were_queued_and_why_the_rest_failed() {
        let body = r#"{"message-count": "3", "messages": [{"status": "0", "message-id": "a"}, {"status": "0", "message-id": "b"}, {"status": "9", "error-text": "Partner Quota Violation"}]}"#;
        match classify(StatusCode::OK, body.as_bytes(), None) {
            Err(ProviderError::Rejected {
                detail,
                invalid_number: false,
            }) => {
                assert!(detail.contains("queued 2 of 3 parts"), "{detail}");
                assert!(detail.contains("part 3: Vonage status 9"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn throttling_keeps_a_retry_after_and_details_mask_numbers() {
        let wait = Some(Duration::from_secs(2));
        let body = error("1", "Throttled sending to 447700900123");
        match classify(StatusCode::OK, body.as_bytes(), wait) {
            Err(ProviderError::Transient {
                detail,
                retry_after,
            }) => {
                assert_eq!(retry_after, wait);
                assert!(detail.contains("Vonage status 1 (Throttled)"), "{detail}");
                assert!(!detail.contains("447700900123"), "{detail}");
                assert!(detail.contains("0123"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_accepted_answer_without_a_message_id_is_still_accepted() {
        let body = r#"{"message-count": "1", "messages": [{"status": "0"}]}"#;
        let accepted = classify(StatusCode::OK, body.as_bytes(), None).unwrap();
        assert_eq!(accepted.provider_message_id, "");
        assert_eq!(accepted.segments, Some(1));
    }

    fn sms(json: &str) -> SendSms {
        SendSms::from_json(json.as_bytes()).unwrap()
    }

    fn fields(form: &str) -> Vec<(String, String)> {
        url::form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn the_form_carries_sender_digits_text_type_and_key() {
        let gsm =
            sms(r#"{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"Paid & thanks"}"#);
        assert_eq!(
            form(&gsm, "MKOPA", None),
            "from=MKOPA&to=254712345678&text=Paid+%26+thanks&type=text&client-ref=k-1"
        );
        let ucs2 = sms(
            r#"{"idempotencyKey":"k-2","phoneNumber":"+254712345678","text":"Asante \ud83d\ude00","senderId":"+15005550006"}"#,
        );
        let sent = fields(&form(&ucs2, "MKOPA", None));
        assert_eq!(
            sent,
            [
                ("from", "15005550006"),
                ("to", "254712345678"),
                ("text", "Asante \u{1f600}"),
                ("type", "unicode"),
                ("client-ref", "k-2"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn expires_at_goes_as_the_ttl_in_milliseconds_within_vonages_range() {
        let now = std::time::SystemTime::now();
        for (left, ttl) in [(600, "600000"), (5, "20000"), (30 * 24 * 3600, "604800000")] {
            let at = crate::domain::rfc3339(
                now + std::time::Duration::from_secs(left) + std::time::Duration::from_millis(500),
            );
            let sms = sms(&format!(
                r#"{{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi","expiresAt":"{at}"}}"#
            ));
            let sent = fields(&form(&sms, "MKOPA", None));
            let got = sent
                .iter()
                .find(|(n, _)| n == "ttl")
                .map(|(_, v)| v.as_str());
            // rfc3339 keeps whole seconds: 600.5 s left rounds to 600 or 601.
            let expected: u64 = ttl.parse().unwrap();
            let got: u64 = got.expect("ttl").parse().unwrap();
            assert!(
                got == expected || got == expected + 1000 && left == 600,
                "{left}: {got}"
            );
        }
        let plain = sms(r#"{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi"}"#);
        assert!(fields(&form(&plain, "MKOPA", None))
            .iter()
            .all(|(n, _)| n != "ttl"));
    }

    #[test]
    fn the_callback_url_goes_as_the_callback_field_when_there_is_one() {
        // `callback`: https://developer.vonage.com/en/api/sms
        let gsm = sms(r#"{"idempotencyKey":"k-3","phoneNumber":"+254712345678","text":"hi"}"#);
        let url = "https://sms.example.com/v1/callbacks/vonage/t0ken-0123456789abcdef";
        let sent = fields(&form(&gsm, "MKOPA", Some(url)));
        assert_eq!(sent.last(), Some(&("callback".to_owned(), url.to_owned())));
        assert_eq!(sent.len(), 6);
        let without = fields(&form(&gsm, "MKOPA", None));
        assert!(without.iter().all(|(name, _)| name != "callback"));
    }

    #[test]
    fn only_a_number_loses_its_plus() {
        assert_eq!(address("+254712345678"), "254712345678");
        assert_eq!(address("MKOPA"), "MKOPA");
        assert_eq!(address("+MKOPA"), "+MKOPA");
        assert_eq!(address("+"), "+");
    }

    #[test]
    fn a_key_longer_than_vonage_takes_becomes_a_reference_of_its_own() {
        let short = "k".repeat(MAX_CLIENT_REF);
        assert_eq!(client_ref(&short), short.as_str());
        let long_a = format!("{}a", "k".repeat(120));
        let long_b = format!("{}b", "k".repeat(120));
        let (a, b) = (client_ref(&long_a), client_ref(&long_b));
        assert_eq!(a.chars().count(), MAX_CLIENT_REF);
        assert_eq!(b.chars().count(), MAX_CLIENT_REF);
        assert_ne!(a, b);
        assert!(a.starts_with(&long_a[..CLIENT_REF_PREFIX]), "{a}");
        assert_eq!(a, client_ref(&long_a), "the same key, the same reference");
    }
}

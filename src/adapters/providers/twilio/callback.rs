//! Twilio's delivery reports: the status callbacks Twilio posts to the
//! `StatusCallback` URL each message is sent with
//! (`{http.public_url}/v1/callbacks/{instance}`), authenticated with
//! `X-Twilio-Signature` and read into one normalized report each.
//!
//! **Format.** "Twilio sends status callback requests as HTTP POST
//! requests with a Content-Type of application/x-www-form-urlencoded"; a
//! request carries "a subset of the standard request properties, and
//! additionally MessageStatus and ErrorCode", and "Twilio occasionally adds
//! new properties without advance notice"
//! (<https://www.twilio.com/docs/messaging/guides/track-outbound-message-status>).
//! The adapter reads `MessageSid` (the `sid` the create call answered, so
//! `SmsSent.providerMessageId`), `MessageStatus` and `ErrorCode` (absent or
//! empty when there is none) and ignores every other field (`AccountSid`,
//! `From`, `To`, `SmsSid`, `SmsStatus`, `ApiVersion`, and whatever Twilio
//! adds), though all of them are signed. A missing `MessageSid` or
//! `MessageStatus` is malformed (400). A `GET` is not Twilio's (404).
//!
//! **Authentication** (<https://www.twilio.com/docs/usage/security#validating-requests>):
//! `X-Twilio-Signature` is the base64 of the HMAC-SHA1, keyed by the
//! account's Auth Token, of the full URL Twilio called (scheme, host, path
//! and query) followed by every POST parameter's name and value, sorted by
//! name, with no separators. The URL is the service's view of it
//! (`CallbackRequest::url`: `http.public_url` plus the path and query it
//! received), so it survives a proxy in front. Twilio's notes on that page
//! say it drops the port of an HTTPS URL before signing, and Twilio's own
//! validator accepts the signature over the URL with or without its port
//! because "sig generation on back end is inconsistent"
//! (`validate` in twilio-python's `twilio/request_validator.py`); so does
//! this one. A parameter given twice is signed once per value, values in
//! order (the same file, and its test vector below). The digest is
//! compared in constant time (`Mac::verify_slice`). A missing, undecodable
//! or wrong signature is refused 401 and changes nothing. Webhook Rules'
//! `X-Twilio-Webhooks-Signature-Settings` (an HMAC-SHA256 under another
//! shared key, <https://github.com/twilio/twilio-node/blob/main/examples/WebhookSignatureValidation.md>)
//! is not supported: such a callback is refused 401.
//!
//! **Status mapping.** Meanings from the "Message Status values" table of
//! <https://www.twilio.com/docs/messaging/api/message-resource#message-status-values>
//! (in Twilio's support words: <https://support.twilio.com/hc/en-us/articles/223134347-What-do-the-SMS-statuses-mean->);
//! which of them call back: <https://www.twilio.com/docs/messaging/guides/outbound-message-status-in-status-callbacks>
//! ("A status callback request is not sent for the initial status").
//! `permanent` is "a new attempt cannot help".
//!
//! | `MessageStatus` | Twilio's meaning | normalized | permanent |
//! |---|---|---|---|
//! | `accepted` | a Messaging Service took the request, picks the sender | `sent` | no |
//! | `scheduled` | a Messaging Service holds it until its `SendAt` | `sent` | no |
//! | `queued` | queued to be sent from its sender | `sent` | no |
//! | `sending` | being dispatched to the nearest upstream carrier | `sent` | no |
//! | `sent` | the nearest upstream carrier accepted it | `sent` | no |
//! | `delivered` | the carrier (and, where available, the handset) confirmed delivery | `delivered` | no |
//! | `read` | WhatsApp only: the recipient opened it, so it was delivered | `delivered` | no |
//! | `undelivered` | a delivery receipt says it was not delivered (carrier filtering, handset unavailable, ...) | `undelivered` | yes, but see the codes below |
//! | `failed` | "could not be sent" (queue overflow, account suspended, media errors; not charged): Twilio refused it after accepting it | `rejected` | yes, but see the codes below |
//! | `canceled` | a scheduled message's sending was canceled: it will not be sent (the service schedules none) | `rejected` | yes |
//! | `receiving`, `received` | inbound messages only | refused 400: an inbound message's webhook pointed here, not a status callback | - |
//! | `partially_delivered`, or any other word | not documented (twilio-node issue 607: the enum has `partially_delivered`, the docs do not say what it means) | `sent` | no |
//!
//! An undocumented status says nothing about being final, so it is kept as
//! `sent`: in the message's history (with Twilio's word as
//! `providerStatus`) but never a final status, which a later documented
//! report still sets. Calling it `unknown` would end the message on a word
//! whose meaning nobody knows.
//!
//! `ErrorCode` refines a failure (`undelivered`, `failed`):
//!
//! | `ErrorCode` | Twilio's page says | normalized | permanent |
//! |---|---|---|---|
//! | 30036 Validity Period Expired | it stayed queued longer than its `ValidityPeriod` and was not sent; "retry ... with a longer ValidityPeriod" (<https://www.twilio.com/docs/api/errors/30036>) | `expired` | no |
//! | 30001 Queue overflow | too many messages too quickly; messages queued too long fail (<https://www.twilio.com/docs/api/errors/30001>) | as the status | no |
//! | 30003 Unreachable destination handset | switched off or otherwise unavailable; may be transient, send another (<https://www.twilio.com/docs/api/errors/30003>) | as the status | no |
//! | any other (e.g. 30005 unknown handset, 30006 landline, 30007 filtered) | | as the status | yes |
//!
//! `providerStatus` is `MessageStatus` as sent, `errorCode` the `ErrorCode`,
//! each at most 64 characters.

use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;

use crate::adapters::providers::http::{bounded_id, bounded_text, field};
use crate::domain::DeliveryStatus;
use crate::ports::{CallbackError, CallbackRequest, ProviderReport};

/// The header Twilio signs its requests in (lower case, as
/// [`CallbackRequest::header`] looks it up).
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// Authenticates one status callback under `auth_token` and reads its
/// report.
pub fn read(
    auth_token: &SecretString,
    request: &CallbackRequest<'_>,
) -> Result<Vec<ProviderReport>, CallbackError> {
    if request.method != "POST" {
        return Err(CallbackError::NotHere(
            "Twilio posts its status callbacks".into(),
        ));
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(request.body)
        .into_owned()
        .collect();
    verify(
        auth_token.expose_secret().as_bytes(),
        request.url,
        &form,
        request.header(SIGNATURE_HEADER),
    )
    .map_err(|e| CallbackError::Unauthenticated(e.into()))?;
    let sid = field(&form, "MessageSid")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CallbackError::Malformed("MessageSid is missing".into()))?;
    let provider_status = field(&form, "MessageStatus")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CallbackError::Malformed("MessageStatus is missing".into()))?;
    let error_code = field(&form, "ErrorCode")
        .map(str::trim)
        .filter(|c| !c.is_empty());
    let (status, permanent) = normalize(provider_status, error_code)?;
    Ok(vec![ProviderReport {
        provider_message_id: bounded_id(sid),
        status,
        provider_status: bounded_text(provider_status),
        error_code: error_code.map(bounded_text),
        permanent,
    }])
}

/// Error codes of a failure after which Twilio says a new attempt may
/// succeed (the module doc's second table).
const PASSING_CODES: [&str; 3] = ["30001", "30003", "30036"];

/// A `MessageStatus` (and its `ErrorCode`) as the normalized status and
/// whether it is permanent: the module doc's tables.
fn normalize(
    status: &str,
    error_code: Option<&str>,
) -> Result<(DeliveryStatus, bool), CallbackError> {
    let status = match status {
        "accepted" | "scheduled" | "queued" | "sending" | "sent" => DeliveryStatus::Sent,
        "delivered" | "read" => DeliveryStatus::Delivered,
        "undelivered" => DeliveryStatus::Undelivered,
        "failed" | "canceled" => DeliveryStatus::Rejected,
        "receiving" | "received" => {
            return Err(CallbackError::Malformed(
                "an inbound message, not a status callback: point the number's messaging webhook elsewhere".into(),
            ))
        }
        _ => DeliveryStatus::Sent,
    };
    if !status.is_failure() {
        return Ok((status, false));
    }
    let status = match error_code {
        Some("30036") => DeliveryStatus::Expired,
        _ => status,
    };
    let passing = error_code.is_some_and(|code| PASSING_CODES.contains(&code));
    Ok((status, !passing))
}

/// Why a signature was refused: the 401's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Undecodable,
    Mismatch,
}

impl From<SignatureError> for String {
    fn from(e: SignatureError) -> Self {
        match e {
            SignatureError::Missing => "X-Twilio-Signature is missing",
            SignatureError::Undecodable => "X-Twilio-Signature is not base64",
            SignatureError::Mismatch => "X-Twilio-Signature does not match",
        }
        .into()
    }
}

/// Checks `signature` (the header's base64) against `url` and `params`
/// under `auth_token`: over the URL with its port and without it.
pub fn verify(
    auth_token: &[u8],
    url: &str,
    params: &[(String, String)],
    signature: Option<&str>,
) -> Result<(), SignatureError> {
    let signature = signature.map(str::trim).ok_or(SignatureError::Missing)?;
    let expected = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| SignatureError::Undecodable)?;
    let signed_params = sorted(params);
    let matches = signed_urls(url).iter().any(|url| {
        // verify_slice compares in constant time.
        mac(auth_token, url, &signed_params)
            .verify_slice(&expected)
            .is_ok()
    });
    if matches {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// `X-Twilio-Signature` for a request to `url` with `params`, as Twilio
/// computes it (the fake provider signs its callbacks with it).
pub fn signature(auth_token: &[u8], url: &str, params: &[(String, String)]) -> String {
    let digest = mac(auth_token, url, &sorted(params))
        .finalize()
        .into_bytes();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// The parameters in signing order: by name, a repeated name's values in
/// order too.
fn sorted(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted
}

fn mac(auth_token: &[u8], url: &str, params: &[(&str, &str)]) -> Hmac<Sha1> {
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token).expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (name, value) in params {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// The URL as Twilio may have signed it: without its port, and with it
/// (the scheme's default port when it names none), user and password
/// dropped as Twilio drops them. The rest is kept byte for byte: Twilio
/// signs the URL as it called it, so nothing is re-encoded.
fn signed_urls(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.starts_with('[') || host.ends_with(']')) =>
        {
            (host, Some(port))
        }
        _ => (host_port, None),
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => Some("443"),
        "http" => Some("80"),
        _ => None,
    };
    let mut urls = vec![format!("{scheme}://{host}{tail}")];
    if let Some(port) = port.or(default_port) {
        urls.push(format!("{scheme}://{host}:{port}{tail}"));
    }
    urls
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    const TOKEN: &str = "s3cr3t-t0ken";
    const URL: &str = "https://sms.example.com/v1/callbacks/twilio";
    const SID: &str = "SM0123456789abcdef0123456789abcdef";

    fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// A status callback as Twilio posts it
    /// (<https://www.twilio.com/docs/messaging/guides/track-outbound-message-status>:
    /// the standard request properties plus `MessageStatus` and `ErrorCode`),
    /// form-encoded, signed over `URL` under `TOKEN`.
    fn callback(fields: &[(&str, &str)]) -> (Vec<u8>, String) {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let signature = signature(TOKEN.as_bytes(), URL, &pairs(fields));
        (body.into_bytes(), signature)
    }

    /// The fields Twilio sends with every status callback, and `status`.
    fn status_fields<'a>(status: &'a str, error_code: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
        let mut fields = vec![
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("ApiVersion", "2010-04-01"),
            ("From", "+15005550006"),
            ("MessageSid", SID),
            ("MessageStatus", status),
            ("SmsSid", SID),
            ("SmsStatus", status),
            ("To", "+254712345678"),
        ];
        if let Some(code) = error_code {
            fields.push(("ErrorCode", code));
        }
        fields
    }

    fn read_with(
        method: &str,
        url: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        let headers: Vec<(String, String)> = signature
            .map(|s| vec![(SIGNATURE_HEADER.to_owned(), s.to_owned())])
            .unwrap_or_default();
        let request = CallbackRequest {
            method,
            url,
            token: None,
            query: "",
            headers: &headers,
            body,
            now: SystemTime::now(),
        };
        read(&SecretString::from(TOKEN), &request)
    }

    fn read_signed(fields: &[(&str, &str)]) -> Result<Vec<ProviderReport>, CallbackError> {
        let (body, signature) = callback(fields);
        read_with("POST", URL, &body, Some(&signature))
    }

    #[test]
    fn every_documented_status_is_normalized_as_the_module_doc_says() {
        // The "Message Status values" of
        // https://www.twilio.com/docs/messaging/api/message-resource#message-status-values,
        // with the error codes of https://www.twilio.com/docs/api/errors/<code>.
        use DeliveryStatus::*;
        let cases: [(&str, Option<&str>, DeliveryStatus, bool); 17] = [
            ("accepted", None, Sent, false),
            ("scheduled", None, Sent, false),
            ("queued", None, Sent, false),
            ("sending", None, Sent, false),
            ("sent", None, Sent, false),
            ("delivered", None, Delivered, false),
            ("read", None, Delivered, false),
            ("undelivered", Some("30005"), Undelivered, true),
            ("undelivered", Some("30006"), Undelivered, true),
            ("undelivered", Some("30007"), Undelivered, true),
            ("undelivered", Some("30003"), Undelivered, false),
            ("undelivered", None, Undelivered, true),
            ("failed", Some("30002"), Rejected, true),
            ("failed", Some("30001"), Rejected, false),
            ("failed", Some("30036"), Expired, false),
            ("canceled", None, Rejected, true),
            ("partially_delivered", None, Sent, false),
        ];
        for (status, code, normalized, permanent) in cases {
            let reports = read_signed(&status_fields(status, code)).unwrap();
            assert_eq!(
                reports,
                vec![ProviderReport {
                    provider_message_id: SID.into(),
                    status: normalized,
                    provider_status: status.into(),
                    error_code: code.map(str::to_owned),
                    permanent,
                }],
                "{status} {code:?}"
            );
        }
    }

    #[test]
    fn an_undocumented_status_is_kept_as_sent_never_final() {
        let reports = read_signed(&status_fields("delivery_unknown", None)).unwrap();
        assert_eq!(reports[0].status, DeliveryStatus::Sent);
        assert_eq!(reports[0].provider_status, "delivery_unknown");
        assert!(!reports[0].permanent);
    }

    #[test]
    fn an_inbound_message_s_webhook_is_malformed() {
        for status in ["receiving", "received"] {
            let got = read_signed(&status_fields(status, None));
            assert!(matches!(got, Err(CallbackError::Malformed(_))), "{status}");
        }
    }

    #[test]
    fn fields_twilio_adds_are_ignored_and_an_empty_error_code_is_none() {
        let mut fields = status_fields("delivered", Some(""));
        fields.push(("RawDlrDoneDate", "2612011000"));
        fields.push(("SomeFieldTwilioAddsLater", "x"));
        let reports = read_signed(&fields).unwrap();
        assert_eq!(reports[0].status, DeliveryStatus::Delivered);
        assert_eq!(reports[0].error_code, None);
    }

    #[test]
    fn a_callback_without_sid_or_status_is_malformed() {
        let no_sid: Vec<_> = status_fields("delivered", None)
            .into_iter()
            .filter(|(n, _)| *n != "MessageSid")
            .collect();
        let no_status: Vec<_> = status_fields("delivered", None)
            .into_iter()
            .filter(|(n, _)| *n != "MessageStatus")
            .collect();
        for fields in [no_sid, no_status, vec![]] {
            let got = read_signed(&fields);
            assert!(
                matches!(got, Err(CallbackError::Malformed(_))),
                "{fields:?}"
            );
        }
    }

    #[test]
    fn long_fields_are_bounded() {
        let sid = format!("SM{}", "a".repeat(1000));
        let status = "x".repeat(1000);
        let code = "9".repeat(1000);
        let fields = [
            ("MessageSid", sid.as_str()),
            ("MessageStatus", status.as_str()),
            ("ErrorCode", code.as_str()),
        ];
        let report = read_signed(&fields).unwrap().remove(0);
        assert_eq!(report.provider_message_id.len(), 256);
        assert_eq!(report.provider_status.len(), 64);
        assert_eq!(report.error_code.unwrap().len(), 64);
    }

    #[test]
    fn twilio_s_documented_example_signature_verifies() {
        // https://www.twilio.com/docs/usage/security#validating-requests:
        // Auth Token 12345, a POST to this URL with these parameters.
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        let expected = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
        assert_eq!(signature(b"12345", url, &params), expected);
        assert_eq!(verify(b"12345", url, &params, Some(expected)), Ok(()));
        // One byte changed, anywhere, fails.
        let mismatch = Err(SignatureError::Mismatch);
        assert_eq!(
            verify(b"12345", url, &params, Some("1/KCTR6DLpKmkAf8muzZqo1nDgQ=")),
            mismatch
        );
        let mut digits = params.clone();
        digits[2].1 = "1235".into();
        assert_eq!(verify(b"12345", url, &digits, Some(expected)), mismatch);
        let other_url = "https://mycompany.com/myapp.php?foo=1&bar=3";
        assert_eq!(
            verify(b"12345", other_url, &params, Some(expected)),
            mismatch
        );
        assert_eq!(verify(b"12346", url, &params, Some(expected)), mismatch);
        // The order parameters arrive in does not matter.
        let mut reversed = params.clone();
        reversed.reverse();
        assert_eq!(verify(b"12345", url, &reversed, Some(expected)), Ok(()));
    }

    #[test]
    fn twilio_s_own_library_vectors_verify() {
        // tests/unit/test_request_validator.py of github.com/twilio/twilio-python:
        // the same example with the docs' former numbers, and a parameter
        // given twice (its values signed in order), and the URL with the
        // HTTPS port added.
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ]);
        assert_eq!(
            verify(b"12345", url, &params, Some("RSOYDt4T1cUTdK1PDd93/VVr8B8=")),
            Ok(())
        );
        let repeated = pairs(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            signature(b"12345", url, &repeated),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        // "hash of uri with port 443", and of the http URL with port 80.
        assert_eq!(
            verify(b"12345", url, &params, Some("kvajT1Ptam85bY51eRf/AJRuM3w=")),
            Ok(())
        );
        let http = "http://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            verify(
                b"12345",
                http,
                &params,
                Some("0ZXoZLH/DfblKGATFgpif+LLRf4=")
            ),
            Ok(())
        );
        // "hash of http uri with port 1234", checked against the URL with it.
        let port = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(
            verify(
                b"12345",
                port,
                &params,
                Some("Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")
            ),
            Ok(())
        );
        // An HTTPS URL with a port verifies the signature made without it.
        let https_port = "https://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert_eq!(
            verify(
                b"12345",
                https_port,
                &params,
                Some("RSOYDt4T1cUTdK1PDd93/VVr8B8=")
            ),
            Ok(())
        );
    }

    #[test]
    fn a_missing_undecodable_or_wrong_signature_is_unauthenticated() {
        let (body, good) = callback(&status_fields("delivered", None));
        assert!(read_with("POST", URL, &body, Some(&good)).is_ok());
        let mut one_byte = good.clone().into_bytes();
        one_byte[0] = if one_byte[0] == b'A' { b'B' } else { b'A' };
        let one_byte = String::from_utf8(one_byte).unwrap();
        let other_token = signature(
            b"another-token",
            URL,
            &pairs(&status_fields("delivered", None)),
        );
        let cases: [(Option<&str>, &str); 5] = [
            (None, "X-Twilio-Signature is missing"),
            (Some("not base64!"), "X-Twilio-Signature is not base64"),
            (Some(&one_byte), "X-Twilio-Signature does not match"),
            (Some(&other_token), "X-Twilio-Signature does not match"),
            (Some(""), "X-Twilio-Signature does not match"),
        ];
        for (signature, detail) in cases {
            assert_eq!(
                read_with("POST", URL, &body, signature),
                Err(CallbackError::Unauthenticated(detail.into())),
                "{signature:?}"
            );
        }
        // The same report at another URL (another instance's) is not signed.
        let elsewhere = "https://sms.example.com/v1/callbacks/other";
        assert!(matches!(
            read_with("POST", elsewhere, &body, Some(&good)),
            Err(CallbackError::Unauthenticated(_))
        ));
        // A body changed after signing fails.
        let tampered = String::from_utf8(body.clone())
            .unwrap()
            .replace("delivered", "undelivered");
        assert!(matches!(
            read_with("POST", URL, tampered.as_bytes(), Some(&good)),
            Err(CallbackError::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_get_is_not_twilio_s() {
        let (body, good) = callback(&status_fields("delivered", None));
        assert!(matches!(
            read_with("GET", URL, &body, Some(&good)),
            Err(CallbackError::NotHere(_))
        ));
    }

    #[test]
    fn signed_urls_are_with_and_without_the_port_and_never_re_encoded() {
        assert_eq!(
            signed_urls("https://h.example/a%20b?x=1+2"),
            [
                "https://h.example/a%20b?x=1+2",
                "https://h.example:443/a%20b?x=1+2"
            ]
        );
        assert_eq!(
            signed_urls("http://127.0.0.1:8080/v1/callbacks/tw"),
            [
                "http://127.0.0.1/v1/callbacks/tw",
                "http://127.0.0.1:8080/v1/callbacks/tw"
            ]
        );
        assert_eq!(
            signed_urls("https://user:pw@h.example:8443"),
            ["https://h.example", "https://h.example:8443"]
        );
        assert_eq!(
            signed_urls("http://[::1]/x"),
            ["http://[::1]/x", "http://[::1]:80/x"]
        );
        assert_eq!(
            signed_urls("http://[::1]:9/x"),
            ["http://[::1]/x", "http://[::1]:9/x"]
        );
        assert_eq!(signed_urls("not a url"), ["not a url"]);
    }
}

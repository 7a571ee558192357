//! Vonage's delivery receipts (DLRs) of the SMS API: how they arrive, how
//! they are authenticated, and what each says in the service's words.
//!
//! # How a receipt arrives
//!
//! Vonage calls the URL given as `callback` with the message (see
//! [`super::send`]), else the one set in the dashboard, once per SMS part
//! (<https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts>:
//! "You should receive a carrier DLR for each part of the concatenated
//! SMS"). The account's "Webhook format" decides the encoding
//! (<https://developer.vonage.com/en/dashboard/control/api-settings>): `GET`
//! with query parameters, `POST` with a form body, or `POST-JSON` with a
//! JSON object body. All three are read here: a `GET` from its query, a
//! `POST` from its body, as JSON when its `Content-Type` says JSON (or it
//! has none and the body is an object), else as a form. A parameter given
//! twice is refused as malformed: a signature covers one value per name.
//!
//! The fields, from the API reference's "Delivery Receipt" callback
//! (<https://developer.vonage.com/en/api/sms>): `messageId` (the part's id,
//! as the send's answer gave it), `status`, `err-code`, `msisdn` (the
//! recipient), `to` (our sender), `network-code`, `price`, `scts`,
//! `message-timestamp`, `client-ref` (our idempotency key, as sent),
//! `api-key`, and with signed webhooks `timestamp`, `nonce` and `sig`.
//! `messageId` and `status` are required; any other field, documented or
//! not, is ignored (but covered by the signature).
//!
//! # Authentication
//!
//! Vonage signs webhooks only when the account asks support to turn it on
//! ("By default, message signatures are ... not included with incoming
//! webhooks", <https://developer.vonage.com/en/getting-started/concepts/signing-messages>),
//! so by default its DLRs are unsigned. Hence:
//!
//! - with `signature_secret` set, every receipt must carry a `sig` that
//!   matches, and a `timestamp` (Unix seconds) within [`REPLAY_WINDOW`] of
//!   now either way (the window Vonage's Java SDK checks,
//!   `RequestSigning.MAX_ALLOWABLE_TIME_DELTA`); else 401;
//! - without it, receipts are accepted unsigned (a `sig` they carry cannot
//!   be checked and is ignored). Anyone who knows the callback URL could
//!   then forge a receipt, so the instance may also take a
//!   `callback_token` (this service's own addition, not Vonage's): the
//!   callback URL sent with each message then ends in `/{callback_token}`,
//!   and a receipt without it is answered 403.
//!
//! The signature (the signing page, "Manually generate a signature"): the
//! parameters but `sig`, sorted by name, each value with every `&` and `=`
//! replaced by `_`, joined as `&name=value&name=value` (with the leading
//! `&`); then, by the dashboard's signature method
//! ([`SignatureMethod`], setting `signature_method`):
//!
//! | `signature_method` | dashboard name | `sig` |
//! |---|---|---|
//! | `md5hash` (the default: "The default algorithm is 'MD5 hash'") | MD5 hash | hex MD5 of the string followed by the secret |
//! | `md5` | MD5 HMAC | hex HMAC-MD5 of the string under the secret |
//! | `sha1` | SHA1 HMAC | hex HMAC-SHA1 |
//! | `sha256` | SHA-256 HMAC | hex HMAC-SHA256 |
//! | `sha512` | SHA-512 HMAC | hex HMAC-SHA512 |
//!
//! The names are those of Vonage's SDKs (`vonage-php-sdk-core`
//! `Client\Signature`, `vonage-node-sdk` `signatureMethod`); hex in either
//! case is accepted (the PHP SDK writes HMACs in upper case, MD5 hashes in
//! lower case). The SDKs disagree on empty values: the page and the PHP and
//! Python SDKs sign them (`&name=`), the Java SDK leaves them out; a
//! signature made either way is accepted. Both compare in constant time.
//!
//! # Status mapping
//!
//! `status`, from the delivery-receipts page's "DLR status messages"
//! (<https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts>),
//! matched without regard to case; `providerStatus` keeps the word as sent:
//!
//! | `status` | Vonage's meaning | normalized | `permanent` |
//! |---|---|---|---|
//! | `delivered` | Message has been delivered | `delivered` | no |
//! | `accepted` | accepted for delivery, but has not yet been delivered | `sent` | no |
//! | `buffered` | buffered for later delivery | `sent` | no |
//! | `expired` | held at downstream carrier's retry scheme and could not be delivered within the expiry time | `expired` | by `err-code` |
//! | `failed` | Message not delivered | `undelivered` | by `err-code` |
//! | `rejected` | Downstream carrier refuses to deliver message | `rejected` | by `err-code` |
//! | `unknown` | No useful information available | `unknown` | no |
//! | any other word | not documented | `sent` | no |
//!
//! An undocumented word is kept as `sent`, in the history only: Vonage
//! does not say whether it ends the message, and a final status can never
//! be taken back, so guessing "final" could hide a later `delivered`.
//!
//! `err-code` becomes `errorCode` (unless it is `0`, "Delivered"). For
//! `expired`, `failed` and `rejected` it decides `permanent`, from the
//! page's "DLR error codes" table: permanent where Vonage says the number
//! or the message itself is the problem, not where it says "retry" or
//! names no cause:
//!
//! | `err-code` | Vonage's meaning | permanent |
//! |---|---|---|
//! | 0 | Delivered | no |
//! | 1 | Unknown ("no reason could be determined") | no |
//! | 2 | Absent Subscriber - Temporary ("retry") | no |
//! | 3 | Absent Subscriber - Permanent ("no longer active") | yes |
//! | 4 | Call Barred by User ("a permanent error") | yes |
//! | 5 | Portability Error (the network operator must resolve it) | yes |
//! | 6 | Anti-Spam Rejection | yes |
//! | 7 | Handset Busy ("retry") | no |
//! | 8 | Network Error ("retry") | no |
//! | 9 | Illegal Number (the user asked not to receive messages) | yes |
//! | 10 | Illegal Message | yes |
//! | 11 | Unroutable | yes |
//! | 12 | Destination Unreachable ("confirm the recipient's number") | yes |
//! | 13 | Subscriber Age Restriction | yes |
//! | 14 | Number Blocked by Carrier | yes |
//! | 15 | Prepaid Insufficient Funds (the recipient's credit) | no |
//! | 16 | Gateway Quota Exceeded | no |
//! | 50, 51, 52, 53 | Entity, Header, Content, Consent Filter | yes |
//! | 54 | Regulation Error | yes |
//! | 99 | General Error ("typically ... an error in the route") | no |
//! | any other | not documented | no |
//!
//! Codes 0 to 15 and 99 are on the page as archived in Vonage's own docs
//! repository (`Nexmo/station`); 16 and 50 to 54 were read from a copy of
//! the current page's table (`nyaruka/courier`'s Vonage handler cites it)
//! and could not be seen on the page itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use md5::Md5;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use tracing::debug;

use crate::adapters::providers::http::{self, bounded_id, bounded_text, MAX_ID_CHARS};
use crate::domain::{mask_phone, DeliveryStatus};
use crate::ports::{CallbackError, CallbackRequest, ProviderReport};

/// How far a signed receipt's `timestamp` may be from now, either way.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The dashboard's signature method, named as Vonage's SDKs name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SignatureMethod {
    /// "MD5 hash", the dashboard's default: MD5 of the string and the
    /// secret.
    #[default]
    Md5Hash,
    /// HMAC-MD5.
    Md5,
    /// HMAC-SHA1.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl SignatureMethod {
    pub const ALL: [Self; 5] = [
        Self::Md5Hash,
        Self::Md5,
        Self::Sha1,
        Self::Sha256,
        Self::Sha512,
    ];

    /// The setting's value (`signature_method`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Md5Hash => "md5hash",
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(text.trim()))
    }

    /// The digest of `text` under `secret`.
    fn digest(self, secret: &[u8], text: &[u8]) -> Vec<u8> {
        fn hmac<M: Mac + hmac::digest::KeyInit>(secret: &[u8], text: &[u8]) -> Vec<u8> {
            let mut mac = <M as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
            mac.update(text);
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Md5Hash => {
                use md5::Digest;
                let mut hash = Md5::new();
                hash.update(text);
                hash.update(secret);
                hash.finalize().to_vec()
            }
            Self::Md5 => hmac::<Hmac<Md5>>(secret, text),
            Self::Sha1 => hmac::<Hmac<Sha1>>(secret, text),
            Self::Sha256 => hmac::<Hmac<Sha256>>(secret, text),
            Self::Sha512 => hmac::<Hmac<Sha512>>(secret, text),
        }
    }
}

/// How an instance authenticates its receipts.
#[derive(Default)]
pub struct CallbackAuth {
    /// `signature_secret` and `signature_method`: every receipt signed.
    pub signing: Option<(SecretString, SignatureMethod)>,
    /// `callback_token`: the last segment of the callback URL.
    pub token: Option<SecretString>,
}

/// Why a signed receipt was refused; the text is the 401's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("sig is missing")]
    Missing,
    #[error("timestamp is missing or not Unix seconds")]
    BadTimestamp,
    #[error("sig does not match")]
    BadSignature,
    #[error("timestamp is more than 5 minutes from now")]
    Stale,
}

/// The string Vonage signs: every parameter but `sig`, sorted by name, as
/// `&name=value`, with `&` and `=` in values replaced by `_`; without the
/// empty values when `skip_empty` (the Java SDK's way).
pub fn signed_text(params: &[(String, String)], skip_empty: bool) -> String {
    let mut sorted: Vec<&(String, String)> = params
        .iter()
        .filter(|(name, value)| name != "sig" && !(skip_empty && value.trim().is_empty()))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut text = String::new();
    for (name, value) in sorted {
        text.push('&');
        text.push_str(name);
        text.push('=');
        text.extend(
            value
                .chars()
                .map(|c| if c == '&' || c == '=' { '_' } else { c }),
        );
    }
    text
}

/// The `sig` of `params` as Vonage writes it (hex: lower case for MD5
/// hash, upper case for the HMACs, as the PHP SDK does).
pub fn sign(method: SignatureMethod, secret: &str, params: &[(String, String)]) -> String {
    let digest = method.digest(secret.as_bytes(), signed_text(params, false).as_bytes());
    match method {
        SignatureMethod::Md5Hash => hex::encode(digest),
        _ => hex::encode_upper(digest),
    }
}

/// Checks the `sig` and `timestamp` of a receipt's parameters under
/// `secret`, at `now`.
pub fn verify_signature(
    method: SignatureMethod,
    secret: &[u8],
    params: &[(String, String)],
    now: SystemTime,
) -> Result<(), SignatureError> {
    let value = |name: &str| http::field(params, name).map(str::trim);
    let given = value("sig")
        .filter(|s| !s.is_empty())
        .ok_or(SignatureError::Missing)?;
    let timestamp = value("timestamp")
        .filter(|t| (1..=12).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(SignatureError::BadTimestamp)?;
    let given = hex::decode(given).map_err(|_| SignatureError::BadSignature)?;
    let matches = |skip_empty: bool| -> bool {
        let text = signed_text(params, skip_empty);
        bool::from(method.digest(secret, text.as_bytes()).ct_eq(&given))
    };
    let has_empty = params.iter().any(|(_, v)| v.trim().is_empty());
    if !(matches(false) || (has_empty && matches(true))) {
        return Err(SignatureError::BadSignature);
    }
    let signed_at: u64 = timestamp
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if now.abs_diff(signed_at) > REPLAY_WINDOW.as_secs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// The parameters of a receipt: a `GET`'s query, a `POST`'s JSON object
/// or form body. A name given twice is malformed.
pub fn parameters(request: &CallbackRequest<'_>) -> Result<Vec<(String, String)>, CallbackError> {
    let params = if request.method == "GET" {
        http::callback_form(request)
    } else if is_json(request) {
        json_object(request.body)?
    } else {
        http::callback_form(request)
    };
    let mut names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(CallbackError::Malformed(format!(
            "parameter {} is given more than once",
            bounded_text(pair[0])
        )));
    }
    Ok(params)
}

fn is_json(request: &CallbackRequest<'_>) -> bool {
    match request.header("content-type") {
        Some(content_type) => content_type.to_ascii_lowercase().contains("json"),
        None => request.body.trim_ascii_start().starts_with(b"{"),
    }
}

/// A JSON object's members as text: strings as they are, numbers and
/// booleans as written, `null` left out, anything else as its JSON.
fn json_object(body: &[u8]) -> Result<Vec<(String, String)>, CallbackError> {
    let object: serde_json::Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| CallbackError::Malformed(format!("not a JSON object: {e}")))?;
    Ok(object
        .into_iter()
        .filter_map(|(name, value)| match value {
            Value::Null => None,
            Value::String(text) => Some((name, text)),
            other => Some((name, other.to_string())),
        })
        .collect())
}

/// Authenticates and reads one receipt.
pub fn read(
    auth: &CallbackAuth,
    request: &CallbackRequest<'_>,
) -> Result<Vec<ProviderReport>, CallbackError> {
    match auth.token.as_ref() {
        Some(token) => http::check_path_token(Some(token), request)?,
        // This instance's URL has no token: a callback with one is not
        // for it.
        None if request.token.is_some() => return Err(CallbackError::WrongToken),
        None => {}
    }
    let params = parameters(request)?;
    if let Some((secret, method)) = &auth.signing {
        verify_signature(
            *method,
            secret.expose_secret().as_bytes(),
            &params,
            request.now,
        )
        .map_err(|e| CallbackError::Unauthenticated(e.to_string()))?;
    }
    Ok(vec![report(&params)?])
}

/// The report of a receipt's parameters.
fn report(params: &[(String, String)]) -> Result<ProviderReport, CallbackError> {
    let value = |name: &str| {
        http::field(params, name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let id = value("messageId")
        .ok_or_else(|| CallbackError::Malformed("messageId is missing".into()))?;
    if id.chars().count() > MAX_ID_CHARS {
        return Err(CallbackError::Malformed(format!(
            "messageId is longer than {MAX_ID_CHARS} characters"
        )));
    }
    let word =
        value("status").ok_or_else(|| CallbackError::Malformed("status is missing".into()))?;
    let status = status_of(word);
    let err_code = value("err-code");
    debug!(
        message_id = %bounded_id(id),
        status = %bounded_text(word),
        err_code = err_code.map(bounded_text),
        err_meaning = err_code.and_then(err_code_of).map(|(meaning, _)| meaning),
        msisdn = value("msisdn").map(mask_phone),
        network_code = value("network-code").map(bounded_text),
        price = value("price").map(bounded_text),
        scts = value("scts").map(bounded_text),
        message_timestamp = value("message-timestamp").map(bounded_text),
        client_ref = value("client-ref").map(bounded_text),
        "Vonage delivery receipt"
    );
    Ok(ProviderReport {
        provider_message_id: bounded_id(id),
        status,
        provider_status: bounded_text(word),
        error_code: err_code.filter(|code| *code != "0").map(bounded_text),
        permanent: status.is_failure() && err_code.and_then(err_code_of).is_some_and(|(_, p)| p),
    })
}

/// The normalized status of a DLR `status` (the table in the module doc).
pub fn status_of(word: &str) -> DeliveryStatus {
    match word.to_ascii_lowercase().as_str() {
        "delivered" => DeliveryStatus::Delivered,
        "expired" => DeliveryStatus::Expired,
        "failed" => DeliveryStatus::Undelivered,
        "rejected" => DeliveryStatus::Rejected,
        "unknown" => DeliveryStatus::Unknown,
        // "accepted", "buffered", and any undocumented word.
        _ => DeliveryStatus::Sent,
    }
}

/// A documented `err-code`: its meaning, and whether it is permanent (the
/// table in the module doc).
pub fn err_code_of(code: &str) -> Option<(&'static str, bool)> {
    Some(match code {
        "0" => ("Delivered", false),
        "1" => ("Unknown", false),
        "2" => ("Absent Subscriber - Temporary", false),
        "3" => ("Absent Subscriber - Permanent", true),
        "4" => ("Call Barred by User", true),
        "5" => ("Portability Error", true),
        "6" => ("Anti-Spam Rejection", true),
        "7" => ("Handset Busy", false),
        "8" => ("Network Error", false),
        "9" => ("Illegal Number", true),
        "10" => ("Illegal Message", true),
        "11" => ("Unroutable", true),
        "12" => ("Destination Unreachable", true),
        "13" => ("Subscriber Age Restriction", true),
        "14" => ("Number Blocked by Carrier", true),
        "15" => ("Prepaid Insufficient Funds", false),
        "16" => ("Gateway Quota Exceeded", false),
        "50" => ("Entity Filter", true),
        "51" => ("Header Filter", true),
        "52" => ("Content Filter", true),
        "53" => ("Consent Filter", true),
        "54" => ("Regulation Error", true),
        "99" => ("General Error", false),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIPTS: &str = "https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts";
    const API_SMS: &str = "https://developer.vonage.com/en/api/sms";
    /// Vonage/vonage-php-sdk-core test/Client/SignatureTest.php
    const PHP_SDK: &str = "vonage-php-sdk-core SignatureTest";
    /// Vonage/vonage-python-sdk http_client/tests/test_auth.py
    const PYTHON_SDK: &str = "vonage-python-sdk test_auth.py";

    const NOW: u64 = 1_795_860_000;

    fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A GET with `query`, on the token-less URL, at `now`.
    fn get(query: &str, now: SystemTime) -> CallbackRequest<'_> {
        CallbackRequest {
            method: "GET",
            url: "https://sms.example.com/v1/callbacks/vonage",
            token: None,
            query,
            headers: &[],
            body: b"",
            now,
        }
    }

    fn query(fields: &[(String, String)]) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish()
    }

    /// The typical DLR of the delivery-receipts page, with `status` and
    /// `err-code` replaced.
    fn receipt(status: &str, err_code: &str) -> Vec<(String, String)> {
        pairs(&[
            ("err-code", err_code),
            ("message-timestamp", "2018-10-25 12:10:29"),
            ("messageId", "0B00000127FDBC63"),
            ("msisdn", "447547232824"),
            ("network-code", "23410"),
            ("price", "0.03330000"),
            ("scts", "1810251310"),
            ("status", status),
            ("to", "Nexmo CLI"),
        ])
    }

    /// A POST of `body` with `headers`, at `NOW`.
    fn post<'a>(body: &'a [u8], headers: &'a [(String, String)]) -> CallbackRequest<'a> {
        CallbackRequest {
            method: "POST",
            headers,
            body,
            ..get("", at(NOW))
        }
    }

    fn unsigned() -> CallbackAuth {
        CallbackAuth::default()
    }

    fn read_one(auth: &CallbackAuth, request: &CallbackRequest<'_>) -> ProviderReport {
        let mut reports = read(auth, request).unwrap();
        assert_eq!(reports.len(), 1);
        reports.remove(0)
    }

    #[test]
    fn every_documented_status_maps_onto_its_normalized_status() {
        use DeliveryStatus::*;
        // (source, status, err-code, normalized, errorCode, permanent)
        let fixtures = [
            (RECEIPTS, "delivered", "0", Delivered, None, false),
            (RECEIPTS, "accepted", "0", Sent, None, false),
            (RECEIPTS, "buffered", "0", Sent, None, false),
            (RECEIPTS, "expired", "2", Expired, Some("2"), false),
            (RECEIPTS, "expired", "3", Expired, Some("3"), true),
            (RECEIPTS, "failed", "3", Undelivered, Some("3"), true),
            (RECEIPTS, "failed", "7", Undelivered, Some("7"), false),
            (RECEIPTS, "failed", "99", Undelivered, Some("99"), false),
            (RECEIPTS, "rejected", "6", Rejected, Some("6"), true),
            (RECEIPTS, "rejected", "52", Rejected, Some("52"), true),
            (RECEIPTS, "unknown", "1", Unknown, Some("1"), false),
            // The API reference's x-possible-values are the same seven.
            (API_SMS, "Delivered", "0", Delivered, None, false),
            // Undocumented: history only, never a final guess.
            (RECEIPTS, "deleted", "0", Sent, None, false),
            (RECEIPTS, "failed", "77", Undelivered, Some("77"), false),
        ];
        for (source, word, err_code, status, error_code, permanent) in fixtures {
            let q = query(&receipt(word, err_code));
            let report = read_one(&unsigned(), &get(&q, at(NOW)));
            assert_eq!(
                report,
                ProviderReport {
                    provider_message_id: "0B00000127FDBC63".into(),
                    status,
                    provider_status: word.into(),
                    error_code: error_code.map(str::to_owned),
                    permanent,
                },
                "{source}: {word} {err_code}"
            );
        }
    }

    #[test]
    fn every_documented_err_code_has_a_meaning_and_only_failures_are_permanent() {
        let permanent = [
            "3", "4", "5", "6", "9", "10", "11", "12", "13", "14", "50", "51", "52", "53", "54",
        ];
        let temporary = ["0", "1", "2", "7", "8", "15", "16", "99"];
        for code in permanent {
            assert_eq!(err_code_of(code).map(|(_, p)| p), Some(true), "{code}");
        }
        for code in temporary {
            assert_eq!(err_code_of(code).map(|(_, p)| p), Some(false), "{code}");
        }
        for code in ["17", "49", "55", "100", "", "x"] {
            assert_eq!(err_code_of(code), None, "{code}");
        }
        // A permanent code on a receipt that is no failure says nothing.
        let q = query(&receipt("delivered", "3"));
        assert!(!read_one(&unsigned(), &get(&q, at(NOW))).permanent);
    }

    #[test]
    fn a_receipt_reads_the_same_from_a_query_a_form_and_a_json_body() {
        // The API reference's Delivery Receipt example, as POST-JSON.
        let json = br#"{"msisdn": "447700900000", "to": "AcmeInc", "network-code": "12345",
            "messageId": "0A0000001234567B", "price": "0.03330000", "status": "delivered",
            "scts": "2001011400", "err-code": "0", "api-key": "abcd1234",
            "client-ref": "my-personal-reference", "message-timestamp": "2020-01-01 12:00:00"}"#;
        let fields: Vec<(String, String)> = json_object(json).unwrap();
        let form = query(&fields);
        let json_headers = [("content-type".to_owned(), "application/json".to_owned())];
        let form_headers = [(
            "content-type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        )];
        let expected = ProviderReport {
            provider_message_id: "0A0000001234567B".into(),
            status: DeliveryStatus::Delivered,
            provider_status: "delivered".into(),
            error_code: None,
            permanent: false,
        };
        for (what, request) in [
            ("GET", get(&form, at(NOW))),
            ("POST form", post(form.as_bytes(), &form_headers)),
            ("POST-JSON", post(json, &json_headers)),
            ("JSON without a content type", post(json, &[])),
        ] {
            assert_eq!(read_one(&unsigned(), &request), expected, "{what}");
        }
        // Numbers in a JSON body read as text.
        let numbers = br#"{"messageId": "0A01", "status": "failed", "err-code": 3}"#;
        let report = read_one(&unsigned(), &post(numbers, &json_headers));
        assert_eq!(report.error_code.as_deref(), Some("3"));
        assert!(report.permanent);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut fields = receipt("delivered", "0");
        fields.push(("concat-part".into(), "2".into()));
        fields.push(("something-new".into(), "x&y=z".into()));
        let q = query(&fields);
        assert_eq!(
            read_one(&unsigned(), &get(&q, at(NOW))).status,
            DeliveryStatus::Delivered
        );
    }

    #[test]
    fn a_receipt_without_its_id_or_status_or_with_a_repeated_field_is_malformed() {
        let long_id = "x".repeat(MAX_ID_CHARS + 1);
        for (what, q) in [
            ("empty", String::new()),
            ("no messageId", "status=delivered&err-code=0".to_owned()),
            ("empty messageId", "messageId=&status=delivered".to_owned()),
            ("no status", "messageId=0A01&err-code=0".to_owned()),
            (
                "status twice",
                "messageId=0A01&status=failed&status=delivered".to_owned(),
            ),
            (
                "id too long",
                format!("messageId={long_id}&status=delivered"),
            ),
        ] {
            let error = read(&unsigned(), &get(&q, at(NOW))).unwrap_err();
            assert!(
                matches!(error, CallbackError::Malformed(_)),
                "{what}: {error:?}"
            );
        }
        let headers = [("content-type".to_owned(), "application/json".to_owned())];
        for body in [&b"[1, 2]"[..], b"{\"messageId\": ", b"not json"] {
            let error = read(&unsigned(), &post(body, &headers)).unwrap_err();
            assert!(matches!(error, CallbackError::Malformed(_)), "{error:?}");
        }
    }

    /// The parameters of the PHP SDK's first inbound-message fixture.
    fn php_inbound() -> Vec<(String, String)> {
        pairs(&[
            ("message-timestamp", "2013-11-21 15:27:30"),
            ("messageId", "020000001B0FE827"),
            ("msisdn", "14843472194"),
            ("text", "Test again"),
            ("timestamp", "1385047698"),
            ("to", "13239877404"),
            ("type", "text"),
        ])
    }

    /// (source, method, secret, parameters, the `sig` the source gives)
    type Example = (
        &'static str,
        SignatureMethod,
        &'static str,
        Vec<(String, String)>,
        &'static str,
    );

    #[test]
    fn vonages_own_sdk_examples_verify_with_each_method_and_fail_with_one_byte_changed() {
        let php_secret = "my_secret_key_for_testing";
        let fixtures: Vec<Example> = vec![
            (PHP_SDK, SignatureMethod::Md5Hash, php_secret, php_inbound(), "d2e7b1dc968737c5998ad624e02f90b7"),
            (PHP_SDK, SignatureMethod::Md5, php_secret, php_inbound(), "DDEBD46008C2D4E93CCE578A332A52D5"),
            (PHP_SDK, SignatureMethod::Sha1, php_secret, php_inbound(), "27D0D05C2876C7CB1720DBCDBA4D492E1E55C09A"),
            (PHP_SDK, SignatureMethod::Sha256, php_secret, php_inbound(), "DDB8397C2B90AAC7F3882D306475C9A5058C92322EEF43C92B298B6E0FC0D330"),
            (PHP_SDK, SignatureMethod::Sha512, php_secret, php_inbound(), "E0D3C650F8C9D1A5C174D10DDDBFB003E561F59B265616208B0487C5D819481CD3C311D59CF6165ECD1139622D5BA3A256C0D763AC4A9AD9144B5A426B94FE82"),
            // A message Vonage signed whose text holds & and =.
            (
                PHP_SDK,
                SignatureMethod::Md5Hash,
                php_secret,
                pairs(&[
                    ("keyword", "TEST"),
                    ("message-timestamp", "2017-04-04 22:57:47"),
                    ("messageId", "0B00000042AC53BD"),
                    ("msisdn", "14843472194"),
                    ("nonce", "929d6744-bd28-42c8-b6cf-31d5b4f43732"),
                    ("text", "Test with & and ="),
                    ("timestamp", "1491346667"),
                    ("to", "12192259404"),
                    ("type", "text"),
                ]),
                "e06d9763e3fd0b9c31beb5fc2fcb011c",
            ),
            (
                PYTHON_SDK,
                SignatureMethod::Md5,
                "signature_secret",
                pairs(&[("param", "value"), ("timestamp", "1234567890")]),
                "655a4d0b7f064dff438defc52b012cf5",
            ),
            (
                PYTHON_SDK,
                SignatureMethod::Sha256,
                "signature_secret",
                pairs(&[("param1", "value1"), ("param2", "value2"), ("timestamp", "1234567890")]),
                "280c4320703dbc98bfa22db676655ed2acfbfe8792b062ff7622e67f1183c287",
            ),
        ];
        for (source, method, secret, params, sig) in fixtures {
            let timestamp: u64 = http::field(&params, "timestamp").unwrap().parse().unwrap();
            let now = at(timestamp + 60);
            assert_eq!(
                sign(method, secret, &params).to_ascii_lowercase(),
                sig.to_ascii_lowercase(),
                "{source} {method:?}"
            );
            let mut signed = params.clone();
            signed.push(("sig".into(), sig.into()));
            let check = |params: &[(String, String)], secret: &str| {
                verify_signature(method, secret.as_bytes(), params, now)
            };
            assert_eq!(check(&signed, secret), Ok(()), "{source} {method:?}");
            let mut lower = params.clone();
            lower.push(("sig".into(), sig.to_ascii_lowercase()));
            assert_eq!(
                check(&lower, secret),
                Ok(()),
                "{source} {method:?}: hex in either case"
            );
            // One byte changed: in a value, in the sig, in the secret.
            let bad = Err(SignatureError::BadSignature);
            let mut value = signed.clone();
            let (_, v) = value
                .iter_mut()
                .find(|(n, _)| n.starts_with("param") || n == "text")
                .unwrap();
            v.push('!');
            assert_eq!(check(&value, secret), bad, "{source} {method:?}: a value");
            let mut flipped = params.clone();
            let mut sig_bytes = sig.to_owned().into_bytes();
            sig_bytes[0] = if sig_bytes[0] == b'0' { b'1' } else { b'0' };
            flipped.push(("sig".into(), String::from_utf8(sig_bytes).unwrap()));
            assert_eq!(check(&flipped, secret), bad, "{source} {method:?}: the sig");
            assert_eq!(
                check(&signed, &format!("{secret}x")),
                bad,
                "{source} {method:?}: the secret"
            );
            // Another method over the same text does not match.
            let other = SignatureMethod::ALL
                .into_iter()
                .find(|m| *m != method)
                .unwrap();
            assert_eq!(
                verify_signature(other, secret.as_bytes(), &signed, now),
                bad,
                "{source} {method:?} checked as {other:?}"
            );
        }
    }

    #[test]
    fn a_signature_without_the_empty_values_is_accepted_too() {
        // The Java SDK leaves empty values out of the signed string.
        let mut params = receipt("delivered", "0");
        params.push(("client-ref".into(), String::new()));
        params.push(("timestamp".into(), NOW.to_string()));
        let java =
            SignatureMethod::Md5Hash.digest(b"s3cret", signed_text(&params, true).as_bytes());
        let mut signed = params.clone();
        signed.push(("sig".into(), hex::encode(java)));
        assert_eq!(
            verify_signature(SignatureMethod::Md5Hash, b"s3cret", &signed, at(NOW)),
            Ok(())
        );
        let mut documented = params.clone();
        documented.push((
            "sig".into(),
            sign(SignatureMethod::Md5Hash, "s3cret", &params),
        ));
        assert_eq!(
            verify_signature(SignatureMethod::Md5Hash, b"s3cret", &documented, at(NOW)),
            Ok(())
        );
    }

    #[test]
    fn signed_receipts_are_accepted_only_within_five_minutes_either_way() {
        for (signed_at, fresh) in [
            (NOW - 300, true),
            (NOW + 300, true),
            (NOW - 301, false),
            (NOW + 301, false),
            (0, false),
        ] {
            let mut params = receipt("delivered", "0");
            params.push(("timestamp".into(), signed_at.to_string()));
            let sig = sign(SignatureMethod::Sha256, "s3cret", &params);
            params.push(("sig".into(), sig));
            let checked = verify_signature(SignatureMethod::Sha256, b"s3cret", &params, at(NOW));
            let expected = if fresh {
                Ok(())
            } else {
                Err(SignatureError::Stale)
            };
            assert_eq!(checked, expected, "{signed_at}");
        }
    }

    fn signing(method: SignatureMethod) -> CallbackAuth {
        CallbackAuth {
            signing: Some(("s3cret".to_owned().into(), method)),
            token: None,
        }
    }

    #[test]
    fn with_a_signature_secret_an_unsigned_or_badly_signed_receipt_is_unauthenticated() {
        let auth = signing(SignatureMethod::Md5Hash);
        let mut params = receipt("delivered", "0");
        params.push(("timestamp".into(), NOW.to_string()));
        params.push((
            "nonce".into(),
            "ec11dd3e-1e7f-4db5-9467-82b02cd223b9".into(),
        ));
        let sig = sign(SignatureMethod::Md5Hash, "s3cret", &params);
        let good = query(&[params.clone(), pairs(&[("sig", &sig)])].concat());
        assert_eq!(
            read_one(&auth, &get(&good, at(NOW))).status,
            DeliveryStatus::Delivered
        );

        let unsigned_q = query(&params);
        let no_timestamp: Vec<_> = params
            .iter()
            .filter(|(n, _)| n != "timestamp")
            .cloned()
            .collect();
        let no_timestamp = query(
            &[
                no_timestamp.clone(),
                pairs(&[(
                    "sig",
                    &sign(SignatureMethod::Md5Hash, "s3cret", &no_timestamp),
                )]),
            ]
            .concat(),
        );
        let tampered = good.replace("status=delivered", "status=failed");
        let bad_hex = query(&[params.clone(), pairs(&[("sig", "zz")])].concat());
        for (what, q, why) in [
            ("unsigned", unsigned_q, SignatureError::Missing),
            ("no timestamp", no_timestamp, SignatureError::BadTimestamp),
            ("tampered", tampered, SignatureError::BadSignature),
            ("not hex", bad_hex, SignatureError::BadSignature),
        ] {
            assert_eq!(
                read(&auth, &get(&q, at(NOW))),
                Err(CallbackError::Unauthenticated(why.to_string())),
                "{what}"
            );
        }
        assert_eq!(
            read(&auth, &get(&good, at(NOW + 400))),
            Err(CallbackError::Unauthenticated(
                SignatureError::Stale.to_string()
            ))
        );
        // Without a secret the same receipts are read, signed or not.
        let q = query(&params);
        assert!(read(&unsigned(), &get(&q, at(NOW))).is_ok());
        assert!(read(&unsigned(), &get(&good, at(NOW + 4000))).is_ok());
    }

    #[test]
    fn a_callback_token_must_match_and_an_instance_without_one_takes_none() {
        let q = query(&receipt("delivered", "0"));
        let token = "t0ken-0123456789abcdef";
        let auth = CallbackAuth {
            signing: None,
            token: Some(token.to_owned().into()),
        };
        let with = |given: Option<&'static str>| CallbackRequest {
            token: given,
            ..get(&q, at(NOW))
        };
        assert!(read(&auth, &with(Some("t0ken-0123456789abcdef"))).is_ok());
        for given in [None, Some("t0ken-0123456789abcdeF"), Some("")] {
            assert_eq!(
                read(&auth, &with(given)),
                Err(CallbackError::WrongToken),
                "{given:?}"
            );
        }
        assert_eq!(
            read(&unsigned(), &with(Some("t0ken-0123456789abcdef"))),
            Err(CallbackError::WrongToken)
        );
    }

    #[test]
    fn signature_methods_parse_by_their_sdk_names() {
        for method in SignatureMethod::ALL {
            assert_eq!(SignatureMethod::parse(method.as_str()), Some(method));
        }
        assert_eq!(
            SignatureMethod::parse("SHA256"),
            Some(SignatureMethod::Sha256)
        );
        assert_eq!(SignatureMethod::default(), SignatureMethod::Md5Hash);
        for bad in ["", "md5-hash", "sha384", "hmac"] {
            assert_eq!(SignatureMethod::parse(bad), None, "{bad}");
        }
    }
}

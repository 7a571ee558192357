//! The Vonage dialect: `POST /sms/json` of the SMS API
//! (<https://developer.vonage.com/en/api/sms>).
//!
//! A request is checked as the API documents it, and a wrong one gets
//! Vonage's own answer, HTTP 200 with a non-zero status
//! (<https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms>):
//!
//! - credentials: `Authorization: Basic base64(api_key:api_secret)`, or
//!   `api_key` and `api_secret` body fields (the older documented form);
//!   none at all is status "2" Missing Parameters. With `--credential
//!   api_key=...` / `--credential api_secret=...` they must match exactly,
//!   else any `api_key` of 8 characters and `api_secret` of 6 to 32 (the
//!   reference's lengths) will do; a mismatch is status "4" Invalid
//!   Credentials;
//! - the body: form-encoded (the reference) or JSON (what the Node SDK
//!   sends); `from`, `to` and `text` are required (status "2"); `to` must
//!   be 7 to 15 digits (the reference's pattern, so no `+`), `type` one of
//!   the reference's values and `client-ref` at most 100 characters (the
//!   SDKs' limit), else status "3" Invalid Parameters.
//!
//! `error-text` names the field in the words of the reference's example
//! ("Missing to param"), or else gives the status's meaning from the error
//! table; Vonage documents no other wording.
//!
//! A call that draws a failure is answered status "5" Internal Error, a
//! rejection status "7" Number Barred, throttling status "1" Throttled,
//! all HTTP 200 as Vonage does. Otherwise the message is queued: one
//! `messages[]` entry per part (counted by
//! [`crate::domain::count_segments`]), the first part's `message-id` the
//! fake's id and the others `<id>-<part>`, `client-ref` echoed, and the
//! `client-ref` counted as the idempotency key in `/stats`.
//!
//! # Delivery receipts
//!
//! With `--dlr-url` it sends each part its receipts, as Vonage does (one
//! per part: <https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts>),
//! with the fields of the API reference's "Delivery Receipt"
//! (<https://developer.vonage.com/en/api/sms>): `messageId` (the part's
//! id), `status`, `err-code`, `msisdn`, `to` (the sender), `network-code`,
//! `price`, `scts`, `message-timestamp`, `api-key` and `client-ref` (when
//! the message had one). First `accepted` (err-code `0`), then the final
//! receipt: `delivered` (`0`), or for a `--dlr-fail-rate` message `failed`
//! with err-code `3` (Absent Subscriber - Permanent) on every part.
//!
//! Encoded as the account's "Webhook format" says
//! (<https://developer.vonage.com/en/dashboard/control/api-settings>):
//! `GET` with query parameters by default, or with `--credential
//! webhook_format=POST` a form body, `POST-JSON` a JSON body.
//!
//! Unsigned by default, as Vonage's are. With `--credential
//! signature_secret=...` each receipt also carries `timestamp` (now),
//! `nonce` and `sig`, signed as
//! <https://developer.vonage.com/en/getting-started/concepts/signing-messages>
//! says, by `--credential signature_method=...` (`md5hash`, the
//! dashboard's default, or `md5`, `sha1`, `sha256`, `sha512` HMAC).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{basic_credentials, Callback, FakeSettings, FakeState, Fate, Simulated};
use crate::adapters::providers::vonage::callback::{sign, SignatureMethod};
use crate::domain::{count_segments, rfc3339};

/// The `type` values of the API reference.
const TYPES: [&str; 6] = ["text", "binary", "wappush", "unicode", "vcal", "vcard"];
/// Longest `client-ref` (the limit of Vonage's SDKs).
const MAX_CLIENT_REF: usize = 100;

pub(super) fn routes() -> Router<FakeState> {
    Router::new().route("/sms/json", post(send))
}

/// A one-entry answer with a non-zero status (the reference's
/// `ErrorMessage`: `status` and `error-text`).
fn failure(status: &str, text: &str) -> Response {
    Json(json!({
        "message-count": "1",
        "messages": [{"status": status, "error-text": text}],
    }))
    .into_response()
}

async fn send(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let params = parameters(&headers, &body);
    let field = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let credentials = basic_credentials(&headers).or_else(|| {
        Some((
            field("api_key")?.to_owned(),
            field("api_secret")?.to_owned(),
        ))
    });
    let Some((api_key, api_secret)) = credentials else {
        return failure("2", "Missing api_key or api_secret param");
    };
    for name in ["from", "to", "text"] {
        if field(name).is_none() {
            return failure("2", &format!("Missing {name} param"));
        }
    }
    let key_ok = match state.credential("api_key") {
        Some(expected) => api_key == expected,
        None => api_key.chars().count() == 8,
    };
    let secret_ok = match state.credential("api_secret") {
        Some(expected) => api_secret == expected,
        None => (6..=32).contains(&api_secret.chars().count()),
    };
    if !(key_ok && secret_ok) {
        return failure("4", "Invalid Credentials");
    }
    let to = field("to").unwrap_or_default();
    if !(7..=15).contains(&to.len()) || !to.bytes().all(|b| b.is_ascii_digit()) {
        return failure("3", "Invalid to param");
    }
    if field("type").is_some_and(|t| !TYPES.contains(&t)) {
        return failure("3", "Invalid type param");
    }
    let client_ref = field("client-ref").unwrap_or_default();
    if client_ref.chars().count() > MAX_CLIENT_REF {
        return failure("3", "Invalid client-ref param");
    }
    match state.draw().await {
        Some(Simulated::Failure) => return failure("5", "Internal Error"),
        Some(Simulated::Rejection) => return failure("7", "Number barred."),
        Some(Simulated::Throttling) => return failure("1", "Throttled"),
        None => {}
    }
    let id = state.accept(to, client_ref);
    let parts = count_segments(field("text").unwrap_or_default()).1;
    let ids: Vec<String> = (1..=parts)
        .map(|part| match part {
            1 => id.clone(),
            _ => format!("{id}-{part}"),
        })
        .collect();
    if let Some((fate, reports)) = state.fate() {
        let receipt = Receipt {
            msisdn: to,
            sender: field("from").unwrap_or_default(),
            api_key: &api_key,
            client_ref,
        };
        let (final_status, err_code) = match fate {
            Fate::Delivered => ("delivered", "0"),
            Fate::Failed => ("failed", "3"),
        };
        let (progress, last) = ids
            .iter()
            .map(|id| {
                (
                    receipt.callback(&state, &reports.url, id, "accepted", "0"),
                    receipt.callback(&state, &reports.url, id, final_status, err_code),
                )
            })
            .unzip();
        state.report(progress, last);
    }
    let messages: Vec<Value> = ids
        .iter()
        .map(|id| {
            let mut entry = json!({
                "to": to,
                "message-id": id,
                "status": "0",
                "remaining-balance": "3.14159265",
                "message-price": "0.03330000",
                "network": "12345",
            });
            if !client_ref.is_empty() {
                entry["client-ref"] = json!(client_ref);
            }
            entry
        })
        .collect();
    Json(json!({"message-count": parts.to_string(), "messages": messages})).into_response()
}

/// What every receipt of one message says.
struct Receipt<'a> {
    msisdn: &'a str,
    sender: &'a str,
    api_key: &'a str,
    client_ref: &'a str,
}

impl Receipt<'_> {
    /// The receipt of part `id` with `status` and `err_code`, encoded and
    /// signed as the fake's credentials say.
    fn callback(
        &self,
        state: &FakeState,
        url: &str,
        id: &str,
        status: &str,
        err_code: &str,
    ) -> Callback {
        // "2026-11-22T10:00:00Z": message-timestamp is "2026-11-22 10:00:00",
        // scts (YYMMDDHHMM) "2611221000".
        let now = std::time::SystemTime::now();
        let stamp = rfc3339(now);
        let message_timestamp = stamp.trim_end_matches('Z').replace('T', " ");
        let scts: String = stamp[2..16].chars().filter(char::is_ascii_digit).collect();
        let mut params: Vec<(String, String)> = [
            ("messageId", id),
            ("status", status),
            ("err-code", err_code),
            ("msisdn", self.msisdn),
            ("to", self.sender),
            ("network-code", "12345"),
            ("price", "0.03330000"),
            ("scts", &scts),
            ("message-timestamp", &message_timestamp),
            ("api-key", self.api_key),
            ("client-ref", self.client_ref),
        ]
        .into_iter()
        .filter(|(name, value)| *name != "client-ref" || !value.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
        if let Some(secret) = state.credential("signature_secret") {
            let method = state
                .credential("signature_method")
                .and_then(SignatureMethod::parse)
                .unwrap_or_default();
            let timestamp = now
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            params.push(("timestamp".into(), timestamp.to_string()));
            params.push(("nonce".into(), uuid::Uuid::new_v4().to_string()));
            let sig = sign(method, secret, &params);
            params.push(("sig".into(), sig));
        }
        let fields: Vec<(&str, &str)> = params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        match webhook_format(state.credential("webhook_format")) {
            Some(Format::Post) => Callback::form(url, &fields),
            Some(Format::PostJson) => {
                let object: serde_json::Map<String, Value> = params
                    .into_iter()
                    .map(|(n, v)| (n, Value::String(v)))
                    .collect();
                Callback::json(url, &Value::Object(object))
            }
            _ => Callback::get(url, &fields),
        }
    }
}

/// The dashboard's "Webhook format".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Get,
    Post,
    PostJson,
}

/// `--credential webhook_format=...` (GET when not given); `None` for a
/// value Vonage does not have.
fn webhook_format(given: Option<&str>) -> Option<Format> {
    match given.map(|f| f.trim().to_ascii_uppercase()).as_deref() {
        None | Some("GET") => Some(Format::Get),
        Some("POST") => Some(Format::Post),
        Some("POST-JSON") => Some(Format::PostJson),
        Some(_) => None,
    }
}

/// The dialect's own credentials make sense.
pub(super) fn validate(settings: &FakeSettings) -> anyhow::Result<()> {
    let credential = |name: &str| settings.credentials.get(name).map(String::as_str);
    if let Some(method) = credential("signature_method") {
        anyhow::ensure!(
            SignatureMethod::parse(method).is_some(),
            "--credential signature_method must be md5hash, md5, sha1, sha256 or sha512"
        );
    }
    anyhow::ensure!(
        webhook_format(credential("webhook_format")).is_some(),
        "--credential webhook_format must be GET, POST or POST-JSON"
    );
    Ok(())
}

/// The request's fields, from a form or a JSON object body (strings,
/// numbers and booleans as text); anything else has none.
fn parameters(headers: &HeaderMap, body: &[u8]) -> HashMap<String, String> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return url::form_urlencoded::parse(body).into_owned().collect();
    }
    if content_type.starts_with("application/json") {
        if let Ok(Value::Object(object)) = serde_json::from_slice(body) {
            return object
                .into_iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k, s)),
                    Value::Number(_) | Value::Bool(_) => Some((k, v.to_string())),
                    _ => None,
                })
                .collect();
        }
    }
    HashMap::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_provider::base64_decode;
    use axum::http::header::AUTHORIZATION;

    /// A fake state with these credentials.
    fn state(credentials: &[(&str, &str)]) -> FakeState {
        FakeState {
            settings: FakeSettings {
                kind: crate::config::ProviderKind::Vonage,
                credentials: credentials
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..FakeSettings::default()
            },
            run: "0a1b2c3d".into(),
            counters: Default::default(),
            client: reqwest::Client::new(),
        }
    }

    #[test]
    fn the_fakes_receipts_read_back_through_the_adapter_in_every_format_and_method() {
        use crate::adapters::providers::vonage::callback::{read, CallbackAuth};
        use crate::domain::DeliveryStatus;
        use crate::ports::{CallbackError, CallbackRequest};

        let receipt = Receipt {
            msisdn: "254712345678",
            sender: "MKOPA",
            api_key: "abcd1234",
            client_ref: "k-1",
        };
        let url = "http://127.0.0.1:8080/v1/callbacks/vonage";
        for format in ["GET", "POST", "POST-JSON"] {
            for method in SignatureMethod::ALL {
                let state = state(&[
                    ("signature_secret", "s3cret"),
                    ("signature_method", method.as_str()),
                    ("webhook_format", format),
                ]);
                let call = receipt.callback(&state, url, "fake-0a1b2c3d-1-2", "failed", "3");
                let (path, query) = call.url.split_once('?').unwrap_or((&call.url, ""));
                assert_eq!(path, url);
                let headers: Vec<(String, String)> = call
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.clone()))
                    .collect();
                let request = CallbackRequest {
                    method: call.method.as_str(),
                    url: &call.url,
                    token: None,
                    query,
                    headers: &headers,
                    body: &call.body,
                    now: std::time::SystemTime::now(),
                };
                let auth = |secret: &str| CallbackAuth {
                    signing: Some((secret.to_owned().into(), method)),
                    token: None,
                };
                let reports = read(&auth("s3cret"), &request).unwrap();
                assert_eq!(reports[0].provider_message_id, "fake-0a1b2c3d-1-2");
                assert_eq!(reports[0].status, DeliveryStatus::Undelivered);
                assert_eq!(reports[0].error_code.as_deref(), Some("3"));
                assert!(reports[0].permanent, "{format} {method:?}");
                assert!(
                    matches!(
                        read(&auth("other"), &request),
                        Err(CallbackError::Unauthenticated(_))
                    ),
                    "{format} {method:?}"
                );
            }
        }
        // Unsigned by default, and a GET.
        let call = receipt.callback(&state(&[]), url, "fake-0a1b2c3d-1", "delivered", "0");
        assert_eq!(call.method, reqwest::Method::GET);
        assert!(!call.url.contains("sig="), "{}", call.url);
        assert!(call.url.contains("client-ref=k-1"), "{}", call.url);
    }

    #[test]
    fn the_fake_refuses_a_signature_method_or_webhook_format_vonage_does_not_have() {
        for (name, value) in [("signature_method", "sha384"), ("webhook_format", "PUT")] {
            let settings = state(&[(name, value)]).settings;
            let error = settings.validate().unwrap_err().to_string();
            assert!(error.contains(name), "{error}");
        }
        assert!(state(&[("webhook_format", "post-json")])
            .settings
            .validate()
            .is_ok());
    }

    #[test]
    fn basic_credentials_are_decoded_and_garbage_is_not() {
        // printf 'abcd1234:s3cr3tS3cr3t' | base64
        assert_eq!(
            base64_decode("YWJjZDEyMzQ6czNjcjN0UzNjcjN0").as_deref(),
            Some(&b"abcd1234:s3cr3tS3cr3t"[..])
        );
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
        for bad in ["YQ=", "Y===", "YQ==YWJj", "YW*j"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            "Basic YWJjZDEyMzQ6czNjcjN0UzNjcjN0".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("abcd1234".into(), "s3cr3tS3cr3t".into()))
        );
        headers.insert(
            AUTHORIZATION,
            "Bearer YWJjZDEyMzQ6czNjcjN0UzNjcjN0".parse().unwrap(),
        );
        assert_eq!(basic_credentials(&headers), None);
        // Nothing after the scheme: no credentials.
        headers.insert(AUTHORIZATION, "Basic ".parse().unwrap());
        assert_eq!(basic_credentials(&headers), None);
    }
}

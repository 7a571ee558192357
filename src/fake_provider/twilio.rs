//! The Twilio dialect: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`,
//! form-encoded, HTTP Basic authentication with the Account SID and Auth
//! Token (see `adapters::providers::twilio::send` for the pages cited).
//!
//! A wrong request gets Twilio's own error answer (`{"code", "message",
//! "more_info", "status"}`): 401 with 20003 for missing or wrong
//! credentials (or a path Account SID other than the one authenticated),
//! 400 with 21604 for a missing `To` or a body that is not form-encoded,
//! 21602 for a missing `Body`, 21603 for neither `From` nor
//! `MessagingServiceSid`, 21705 for a malformed Messaging Service SID, 21211
//! for a `To` that is no E.164 number, 21617 for a body over 1600
//! characters. With `--credential account_sid=...` and `auth_token=...` it
//! checks them exactly; without, any `AC` SID and any token pass.
//!
//! When the call draws a failure it answers 503 with 20503 (Service
//! unavailable), a rejection 400 with 21610 (unsubscribed recipient),
//! throttling 429 with 20429 (Too Many Requests) and `Retry-After: 1`.
//! Otherwise 201 with the Message resource: `sid` is the fake's id, status
//! `queued` with `num_segments` counted from the body, or through a
//! Messaging Service `accepted` with `num_segments` "0" (Twilio has not
//! picked the sender yet). Twilio carries no idempotency key, so the fake
//! cannot count duplicate keys in this dialect.
//!
//! With `--dlr-url` it posts each accepted message's status callbacks
//! there, as Twilio posts them to a message's `StatusCallback` (see
//! `adapters::providers::twilio::callback` for the pages cited): form
//! encoded, with `AccountSid`, `ApiVersion`, `From` (or
//! `MessagingServiceSid`), `MessageSid`, `MessageStatus`, `SmsSid`,
//! `SmsStatus` and `To`; first `sent` (no callback is sent for the initial
//! `queued`), then `delivered`, or for a `--dlr-fail-rate` share
//! `undelivered` with `ErrorCode` 30005 (unknown destination handset).
//! Each is signed as Twilio signs: `X-Twilio-Signature`, the base64
//! HMAC-SHA1 under the Auth Token the message was created with (the
//! `--credential auth_token` when given) of the `--dlr-url` followed by the
//! sorted parameters; user and password dropped from the URL, and its port
//! too for HTTPS, as Twilio's security page says it does.

use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::{Callback, FakeState, Fate, Simulated};
use crate::adapters::providers::twilio::{callback, is_sid};
use crate::domain::count_segments;

pub(super) fn routes() -> Router<FakeState> {
    Router::new().route(
        "/2010-04-01/Accounts/{account_sid}/Messages.json",
        post(create_message),
    )
}

/// Twilio's error answer for `code`.
fn error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = Json(json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    }));
    (status, body).into_response()
}

/// The form fields the fake reads.
#[derive(Default)]
struct Form {
    to: Option<String>,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: Option<String>,
}

impl Form {
    fn parse(raw: &[u8]) -> Self {
        let mut form = Self::default();
        for (key, value) in url::form_urlencoded::parse(raw) {
            let slot = match key.as_ref() {
                "To" => &mut form.to,
                "From" => &mut form.from,
                "MessagingServiceSid" => &mut form.messaging_service_sid,
                "Body" => &mut form.body,
                _ => continue,
            };
            *slot = Some(value.into_owned()).filter(|v| !v.is_empty());
        }
        form
    }
}

async fn create_message(
    State(state): State<FakeState>,
    Path(account_sid): Path<String>,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    let Some(auth_token) = authenticated(&state, &headers, &account_sid) else {
        return error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    };
    let form_encoded = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let form = if form_encoded {
        Form::parse(&raw)
    } else {
        Form::default()
    };
    let bad = StatusCode::BAD_REQUEST;
    let Some(to) = form.to else {
        return error(
            bad,
            21604,
            "'To' phone number is required to send a Message",
        );
    };
    let Some(body) = form.body else {
        return error(bad, 21602, "Message body is required");
    };
    if form.from.is_none() && form.messaging_service_sid.is_none() {
        return error(
            bad,
            21603,
            "A 'From' or 'MessagingServiceSid' parameter is required to send a message",
        );
    }
    if let Some(sid) = &form.messaging_service_sid {
        if !is_sid("MG", sid) {
            return error(bad, 21705, "The Messaging Service is invalid");
        }
    }
    let digits = to.strip_prefix('+').unwrap_or_default();
    if !(2..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        let message = format!("The 'To' number {to} is not a valid phone number.");
        return error(bad, 21211, &message);
    }
    if body.chars().count() > 1600 {
        return error(
            bad,
            21617,
            "The concatenated message body exceeds the 1600 character limit",
        );
    }
    match state.draw().await {
        Some(Simulated::Failure) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                20503,
                "Service unavailable",
            )
        }
        Some(Simulated::Rejection) => {
            let message = format!("Attempt to send to unsubscribed recipient {to}");
            return error(bad, 21610, &message);
        }
        Some(Simulated::Throttling) => {
            let mut answer = error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return answer;
        }
        None => {}
    }
    let sid = state.accept(&to, "");
    if let Some((fate, reports)) = state.fate() {
        let message = Reported {
            account_sid: &account_sid,
            sid: &sid,
            from: form.from.as_deref(),
            messaging_service_sid: form.messaging_service_sid.as_deref(),
            to: &to,
        };
        let signed = |status: &str, error_code: Option<&str>| {
            message.callback(&reports.url, &auth_token, status, error_code)
        };
        let last = match fate {
            Fate::Delivered => signed("delivered", None),
            Fate::Failed => signed("undelivered", Some("30005")),
        };
        state.report(vec![signed("sent", None)], vec![last]);
    }
    let pooled = form.from.is_none();
    let (status, segments) = if pooled {
        ("accepted", 0)
    } else {
        ("queued", count_segments(&body).1)
    };
    let now = rfc2822(SystemTime::now());
    let message = json!({
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": now,
        "date_sent": null,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": form.from,
        "messaging_service_sid": form.messaging_service_sid,
        "num_media": "0",
        "num_segments": segments.to_string(),
        "price": null,
        "price_unit": null,
        "sid": sid,
        "status": status,
        "subresource_uris": {
            "media": format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}/Media.json"),
        },
        "to": to,
        "uri": format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json"),
    });
    (StatusCode::CREATED, Json(message)).into_response()
}

/// The message a status callback reports on.
struct Reported<'a> {
    account_sid: &'a str,
    sid: &'a str,
    from: Option<&'a str>,
    messaging_service_sid: Option<&'a str>,
    to: &'a str,
}

impl Reported<'_> {
    /// A status callback to `url`, signed under `auth_token` as Twilio
    /// signs it.
    fn callback(
        &self,
        url: &str,
        auth_token: &str,
        status: &str,
        error_code: Option<&str>,
    ) -> Callback {
        let mut fields = vec![
            ("AccountSid", self.account_sid),
            ("ApiVersion", "2010-04-01"),
            ("MessageSid", self.sid),
            ("MessageStatus", status),
            ("SmsSid", self.sid),
            ("SmsStatus", status),
            ("To", self.to),
        ];
        if let Some(from) = self.from {
            fields.push(("From", from));
        }
        if let Some(sid) = self.messaging_service_sid {
            fields.push(("MessagingServiceSid", sid));
        }
        if let Some(code) = error_code {
            fields.push(("ErrorCode", code));
        }
        let params: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let signature = callback::signature(auth_token.as_bytes(), &signed_url(url), &params);
        let mut call = Callback::form(url, &fields);
        call.headers.push(("x-twilio-signature", signature));
        call
    }
}

/// The URL Twilio signs for a callback to `url`: "For SMS and voice
/// callbacks over HTTP, Twilio will drop the username and password (if
/// any) from the URL before computing the signature. For SMS and voice
/// callbacks over HTTPS, Twilio will drop the username, password and port
/// (if any)" (<https://www.twilio.com/docs/usage/security#notes>).
fn signed_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let https_port = parsed.scheme() == "https" && parsed.port().is_some();
    if parsed.username().is_empty() && parsed.password().is_none() && !https_port {
        // Nothing to drop: the URL as given, byte for byte.
        return url.to_owned();
    }
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    if https_port {
        let _ = parsed.set_port(None);
    }
    parsed.to_string()
}

/// HTTP Basic with the Account SID of the path as user: the expected
/// credentials where the fake was given them, else any `AC` SID and any
/// token. Gives the Auth Token, which signs the message's callbacks.
fn authenticated(state: &FakeState, headers: &HeaderMap, account_sid: &str) -> Option<String> {
    let (user, token) = super::basic_credentials(headers)?;
    let user_ok = match state.credential("account_sid") {
        Some(expected) => user == expected,
        None => is_sid("AC", &user),
    };
    let token_ok = match state.credential("auth_token") {
        Some(expected) => token == expected,
        None => !token.is_empty(),
    };
    (user_ok && token_ok && user == account_sid).then_some(token)
}

/// A time as Twilio writes its dates (RFC 2822, UTC):
/// `Thu, 24 Aug 2023 05:01:45 +0000`.
fn rfc2822(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn basic_credentials_decode_as_rfc_4648_says() {
        // RFC 4648, section 10, and RFC 7617's example.
        for (encoded, plain) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
            ("QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "Aladdin:open sesame"),
        ] {
            assert_eq!(
                crate::fake_provider::base64_decode(encoded).as_deref(),
                Some(plain.as_bytes())
            );
        }
        for garbage in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "QWxh ZGRp"] {
            assert_eq!(
                crate::fake_provider::base64_decode(garbage),
                None,
                "{garbage}"
            );
        }
    }

    #[test]
    fn the_signed_url_drops_what_twilio_drops() {
        for (given, signed) in [
            (
                "http://127.0.0.1:8080/v1/callbacks/tw",
                "http://127.0.0.1:8080/v1/callbacks/tw",
            ),
            (
                "https://sms.example.com:8443/v1/callbacks/tw",
                "https://sms.example.com/v1/callbacks/tw",
            ),
            (
                "http://user:pw@sms.example.com:8080/v1/callbacks/tw",
                "http://sms.example.com:8080/v1/callbacks/tw",
            ),
            (
                "https://sms.example.com/v1/callbacks/tw",
                "https://sms.example.com/v1/callbacks/tw",
            ),
        ] {
            assert_eq!(signed_url(given), signed, "{given}");
        }
    }

    #[test]
    fn a_callback_is_signed_so_that_the_adapter_accepts_it() {
        let message = Reported {
            account_sid: "AC0123456789abcdef0123456789abcdef",
            sid: "fake-1-1",
            from: Some("+15005550006"),
            messaging_service_sid: None,
            to: "+254712345678",
        };
        let url = "https://sms.example.com:8443/v1/callbacks/tw";
        let call = message.callback(url, "s3cr3t", "undelivered", Some("30005"));
        let signature = call
            .headers
            .iter()
            .find(|(n, _)| *n == "x-twilio-signature")
            .map(|(_, v)| v.clone());
        let params: Vec<(String, String)> = url::form_urlencoded::parse(&call.body)
            .into_owned()
            .collect();
        assert!(params.contains(&("ErrorCode".into(), "30005".into())));
        assert_eq!(
            callback::verify(b"s3cr3t", url, &params, signature.as_deref()),
            Ok(())
        );
        assert!(callback::verify(b"other", url, &params, signature.as_deref()).is_err());
    }

    #[test]
    fn dates_are_written_as_twilio_writes_them() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_692_853_305);
        assert_eq!(rfc2822(at), "Thu, 24 Aug 2023 05:01:45 +0000");
        assert_eq!(
            rfc2822(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc2822(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }
}

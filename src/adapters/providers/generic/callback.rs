//! The generic provider's delivery reports (reference, "Delivery
//! reports"): JSON `{"id", "status", "errorCode"?}`, `status` one of the
//! normalized statuses (`delivered`, `undelivered`, ...). With a
//! `callback_secret` each report must be signed and fresh: header
//! `X-Timestamp` (Unix seconds) within [`REPLAY_WINDOW`] of now, either
//! direction, and `X-Signature: sha256=<hex HMAC-SHA256 of "<X-Timestamp>.<raw
//! body>">`, compared in constant time. The timestamp is inside the
//! signature, so a captured report cannot be replayed after the window
//! with a new one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

use crate::adapters::providers::http::{bounded_id, bounded_text};
use crate::domain::DeliveryStatus;
use crate::ports::{CallbackError, CallbackRequest, ProviderReport};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Callback {
    id: String,
    status: DeliveryStatus,
    error_code: Option<String>,
}

/// Reads a generic report, checking its signature when `secret` is set
/// (part 1's unsigned route passes `None` for an instance without one).
pub fn read(
    secret: Option<&SecretString>,
    request: &CallbackRequest<'_>,
) -> Result<Vec<ProviderReport>, CallbackError> {
    if let Some(secret) = secret.filter(|s| !s.expose_secret().is_empty()) {
        verify_signature(
            secret.expose_secret().as_bytes(),
            request.header("x-timestamp"),
            request.body,
            request.header("x-signature"),
            request.now,
        )
        .map_err(|e| CallbackError::Unauthenticated(e.to_string()))?;
    }
    let callback: Callback = serde_json::from_slice(request.body)
        .map_err(|e| CallbackError::Malformed(e.to_string()))?;
    if callback.id.is_empty() || callback.id.len() > 256 {
        return Err(CallbackError::Malformed(
            "id must be 1 to 256 characters".into(),
        ));
    }
    Ok(vec![ProviderReport {
        provider_message_id: bounded_id(&callback.id),
        status: callback.status,
        provider_status: callback.status.as_str().to_owned(),
        error_code: callback.error_code.as_deref().map(bounded_text),
        permanent: callback.status.is_failure(),
    }])
}

/// How far a signed report's `X-Timestamp` may be from now, either way.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

/// Why a signed report was refused; the text is the 401's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("X-Timestamp is missing or not Unix seconds")]
    BadTimestamp,
    #[error("X-Signature does not match")]
    BadSignature,
    #[error("X-Timestamp is more than 5 minutes from now")]
    Stale,
}

/// Checks a report's `X-Timestamp` and `X-Signature` (`sha256=<hex>`)
/// against `body` under `secret`, at `now`.
pub fn verify_signature(
    secret: &[u8],
    timestamp: Option<&str>,
    body: &[u8],
    signature: Option<&str>,
    now: SystemTime,
) -> Result<(), SignatureError> {
    let timestamp = timestamp
        .map(str::trim)
        .filter(|t| (1..=12).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(SignatureError::BadTimestamp)?;
    let expected = signature
        .and_then(|s| s.trim().strip_prefix("sha256="))
        .and_then(|hex_digest| hex::decode(hex_digest).ok())
        .ok_or(SignatureError::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::BadSignature)?;
    let signed_at: u64 = timestamp
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if now.abs_diff(signed_at) > REPLAY_WINDOW.as_secs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_860_000;

    fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn check(
        timestamp: Option<&str>,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        verify_signature(b"s3cret", timestamp, body, signature, now)
    }

    #[test]
    fn signatures_cover_the_timestamp_and_the_body() {
        let ts = NOW.to_string();
        let good = sign(b"s3cret", &ts, b"{}");
        assert_eq!(check(Some(&ts), b"{}", Some(&good)), Ok(()));
        assert_eq!(
            check(
                Some(&ts),
                b"{}",
                Some(&good.to_uppercase().replace("SHA256=", "sha256="))
            ),
            Ok(()),
            "hex in either case"
        );
        let bad = Err(SignatureError::BadSignature);
        assert_eq!(check(Some(&ts), b"{ }", Some(&good)), bad, "another body");
        let other_ts = (NOW - 1).to_string();
        assert_eq!(
            check(Some(&other_ts), b"{}", Some(&good)),
            bad,
            "another time"
        );
        let other_secret = sign(b"other", &ts, b"{}");
        assert_eq!(check(Some(&ts), b"{}", Some(&other_secret)), bad);
        let mut body_only = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        body_only.update(b"{}");
        let body_only = format!("sha256={}", hex::encode(body_only.finalize().into_bytes()));
        assert_eq!(
            check(Some(&ts), b"{}", Some(&body_only)),
            bad,
            "part 1's scheme"
        );
        assert_eq!(check(Some(&ts), b"{}", None), bad);
        assert_eq!(check(Some(&ts), b"{}", Some("sha256=zz")), bad);
        assert_eq!(check(Some(&ts), b"{}", Some(&good[7..])), bad, "no sha256=");
        for ts in [
            None,
            Some(""),
            Some("-1"),
            Some("12.5"),
            Some("1e9"),
            Some("9999999999999"),
        ] {
            assert_eq!(
                check(ts, b"{}", Some(&good)),
                Err(SignatureError::BadTimestamp),
                "{ts:?}"
            );
        }
    }

    #[test]
    fn the_signed_example_of_the_reference_verifies() {
        // docs/reference.md, section 7.7: secret s3cret, 2026-11-22T10:00:00Z.
        let body = br#"{"id":"fake-17","status":"delivered"}"#;
        let signature = "sha256=8494982b539c8932521d8dacacca46dcc767843a3b44f68325a5bc20f1e5f54b";
        let now = UNIX_EPOCH + Duration::from_secs(1_795_341_600 + 60);
        let checked = verify_signature(b"s3cret", Some("1795341600"), body, Some(signature), now);
        assert_eq!(checked, Ok(()));
    }

    #[test]
    fn signed_reports_are_accepted_only_within_five_minutes_either_way() {
        for (at, fresh) in [
            (NOW - 300, true),
            (NOW + 300, true),
            (NOW - 301, false),
            (NOW + 301, false),
            (NOW - 360, false),
            (0, false),
        ] {
            let ts = at.to_string();
            let signature = sign(b"s3cret", &ts, b"{}");
            let expected = if fresh {
                Ok(())
            } else {
                Err(SignatureError::Stale)
            };
            assert_eq!(check(Some(&ts), b"{}", Some(&signature)), expected, "{at}");
        }
    }
}

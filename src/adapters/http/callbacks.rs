//! Delivery-report callbacks from the provider. When a callback secret is
//! configured, each report must be signed and fresh: header `X-Timestamp`
//! (Unix seconds) within [`REPLAY_WINDOW`] of now, either direction, and
//! `X-Signature: sha256=<hex HMAC-SHA256 of "<X-Timestamp>.<raw body>">`,
//! compared in constant time. The timestamp is inside the signature, so a
//! captured report cannot be replayed after the window with a new one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::Sha256;
use tracing::{info, warn};

use super::{problem, HttpState};
use crate::domain::{rfc3339, DeliveryReport, DeliveryStatus};

/// How far a signed report's `X-Timestamp` may be from now, either way.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Callback {
    id: String,
    status: DeliveryStatus,
    error_code: Option<String>,
}

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

pub async fn delivery_report(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.generic_reporters.is_empty() {
        return problem(
            StatusCode::NOT_FOUND,
            "no_generic_provider",
            "no generic provider instance is configured",
        );
    }
    let callback: Callback = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid_report", e.to_string()),
    };
    if callback.id.is_empty() || callback.id.len() > 256 {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_report",
            "id must be 1 to 256 characters",
        );
    }
    let error_code: Option<String> = callback.error_code.map(|c| c.chars().take(64).collect());
    // The report does not say which generic instance sent the message: it
    // is looked up under each whose secret (if it has one) signed it.
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut refused = None;
    let mut key = None;
    for (provider, secret) in &state.generic_reporters {
        if let Some(secret) = secret {
            if let Err(e) = verify_signature(
                secret.expose_secret().as_bytes(),
                header("x-timestamp"),
                &body,
                header("x-signature"),
                SystemTime::now(),
            ) {
                refused = Some(e);
                continue;
            }
        }
        refused = None;
        match state
            .cache
            .record_delivery(
                provider,
                &callback.id,
                callback.status,
                error_code.as_deref(),
            )
            .await
        {
            Ok(Some(found)) => {
                key = Some(found);
                break;
            }
            Ok(None) => {}
            Err(e) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
        }
    }
    let Some(key) = key else {
        if let Some(e) = refused {
            warn!(reason = %e, "delivery report refused");
            return problem(StatusCode::UNAUTHORIZED, "bad_signature", e.to_string());
        }
        return problem(
            StatusCode::NOT_FOUND,
            "unknown_id",
            "no message with this provider id",
        );
    };
    let report = DeliveryReport {
        idempotency_key: key,
        provider_message_id: callback.id,
        status: callback.status,
        error_code,
        reported_at: rfc3339(std::time::SystemTime::now()),
    };
    // The provider retries a callback that fails, so an unconfirmed publish
    // is answered 503; recording it again is harmless.
    if let Err(e) = state.events.publish_delivery(&report).await {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            e.to_string(),
        );
    }
    metrics::counter!("sms_delivery_reports_total", "status" => report.status.as_str())
        .increment(1);
    info!(key = %report.idempotency_key, status = report.status.as_str(), "delivery report");
    StatusCode::NO_CONTENT.into_response()
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
        // docs/reference.md, section 7.6: secret s3cret, 2026-11-22T10:00:00Z.
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

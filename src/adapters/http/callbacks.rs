//! Delivery-report callbacks from the provider. When a callback secret is
//! configured, the body must be signed: header `X-Signature:
//! sha256=<hex HMAC-SHA256 of the raw body>`, compared in constant time.

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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Callback {
    id: String,
    status: DeliveryStatus,
    error_code: Option<String>,
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC of `body` under `secret`.
pub fn signature_valid(secret: &[u8], body: &[u8], signature: Option<&str>) -> bool {
    let Some(hex_digest) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

pub async fn delivery_report(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(secret) = &state.callback_secret {
        let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
        if !signature_valid(secret.expose_secret().as_bytes(), &body, signature) {
            warn!("delivery report with a missing or bad signature refused");
            return problem(
                StatusCode::UNAUTHORIZED,
                "bad_signature",
                "X-Signature does not match",
            );
        }
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
    let recorded = state
        .cache
        .record_delivery(
            &state.provider,
            &callback.id,
            callback.status,
            error_code.as_deref(),
        )
        .await;
    let key = match recorded {
        Ok(Some(key)) => key,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "unknown_id",
                "no message with this provider id",
            )
        }
        Err(e) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            )
        }
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

    #[test]
    fn signatures_are_checked_against_the_body() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"{}");
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(signature_valid(b"s3cret", b"{}", Some(&good)));
        assert!(!signature_valid(b"other", b"{}", Some(&good)));
        assert!(!signature_valid(b"s3cret", b"{ }", Some(&good)));
        assert!(!signature_valid(b"s3cret", b"{}", None));
        assert!(!signature_valid(b"s3cret", b"{}", Some("sha256=zz")));
    }
}

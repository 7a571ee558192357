//! The events the service publishes, as subscribers receive them.

use serde::{Deserialize, Serialize};

/// Published on `sms.sent` once the provider accepted a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SmsSent {
    pub idempotency_key: String,
    pub phone_number: String,
    pub provider: String,
    pub provider_message_id: String,
    pub segments: u32,
    /// Provider calls made for this key.
    pub attempts: u32,
    pub sent_at: String,
}

/// Published on `sms.failed` when a command can never succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SmsFailed {
    pub idempotency_key: String,
    pub phone_number: String,
    /// One of the [`super::FailureReason`] strings.
    pub reason: String,
    pub detail: String,
    pub attempts: u32,
    pub failed_at: String,
}

/// What the handset's network said about a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Delivered,
    Undelivered,
}

impl DeliveryStatus {
    /// Every status, as the `sms_delivery_reports_total{status}` series list them.
    pub const ALL: [Self; 2] = [Self::Delivered, Self::Undelivered];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
        }
    }
}

/// Published on `sms.delivery` when a provider reports delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryReport {
    pub idempotency_key: String,
    pub provider_message_id: String,
    pub status: DeliveryStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    pub reported_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sms_sent_serialises_with_the_contract_field_names() {
        let event = SmsSent {
            idempotency_key: "k".into(),
            phone_number: "+254712345678".into(),
            provider: "generic".into(),
            provider_message_id: "msg-7f3a".into(),
            segments: 1,
            attempts: 1,
            sent_at: "2026-11-22T10:00:00Z".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"idempotencyKey": "k", "phoneNumber": "+254712345678",
                "provider": "generic", "providerMessageId": "msg-7f3a", "segments": 1,
                "attempts": 1, "sentAt": "2026-11-22T10:00:00Z"})
        );
    }

    #[test]
    fn sms_failed_serialises_with_the_contract_field_names() {
        let event = SmsFailed {
            idempotency_key: "k".into(),
            phone_number: "+2547".into(),
            reason: "invalid_phone_number".into(),
            detail: "phoneNumber must be E.164".into(),
            attempts: 0,
            failed_at: "2026-11-22T10:00:00Z".into(),
        };
        let keys: Vec<String> = serde_json::to_value(&event)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            [
                "attempts",
                "detail",
                "failedAt",
                "idempotencyKey",
                "phoneNumber",
                "reason"
            ]
        );
    }
}

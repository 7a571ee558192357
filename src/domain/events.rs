//! The events the service publishes, as subscribers receive them. Each is
//! a variant of [`EventKind`] (its AMQP `type` and the `amqp.*` setting of
//! its exchange) and a struct that implements [`Event`]: topology,
//! validation, the `events` command and the tests iterate
//! [`EventKind::ALL`], so a new event is a variant, a struct and a
//! paragraph of the reference.

use serde::{Deserialize, Serialize};

/// Every kind of event, each on a fanout exchange of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Sent,
    Failed,
    Delivery,
}

impl EventKind {
    pub const ALL: [Self; 3] = [Self::Sent, Self::Failed, Self::Delivery];

    /// The AMQP `type` property of its messages.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Sent => "SmsSent",
            Self::Failed => "SmsFailed",
            Self::Delivery => "SmsDeliveryReport",
        }
    }

    /// The `amqp.*` setting that names its exchange.
    pub fn exchange_setting(self) -> &'static str {
        match self {
            Self::Sent => "sent_exchange",
            Self::Failed => "failed_exchange",
            Self::Delivery => "delivery_exchange",
        }
    }
}

/// An event's payload.
pub trait Event: Serialize {
    const KIND: EventKind;
    /// Its AMQP `message_id`, by which subscribers deduplicate.
    fn message_id(&self) -> String;
}

impl Event for SmsSent {
    const KIND: EventKind = EventKind::Sent;
    fn message_id(&self) -> String {
        self.idempotency_key.clone()
    }
}

impl Event for SmsFailed {
    const KIND: EventKind = EventKind::Failed;
    fn message_id(&self) -> String {
        self.idempotency_key.clone()
    }
}

impl Event for DeliveryReport {
    const KIND: EventKind = EventKind::Delivery;
    /// The idempotency key, as part 1's events: a message's status changes
    /// once (to its final status), so a copy published again carries the
    /// same id.
    fn message_id(&self) -> String {
        self.idempotency_key.clone()
    }
}

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

/// A message's status after the provider took it, normalized from each
/// provider's own vocabulary (reference, "Normalized status"). `sent` is
/// where every accepted message starts; the others are final: once a
/// message has one, no report changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// With the provider or the network, not yet on the handset.
    Sent,
    Delivered,
    /// The network could not deliver it (absent subscriber, failed).
    Undelivered,
    /// The provider or network refused it after accepting it.
    Rejected,
    /// Its validity period ran out before it could be delivered.
    Expired,
    /// The provider gave up knowing (a final report with no outcome).
    Unknown,
}

impl DeliveryStatus {
    /// Every status, as the `sms_delivery_reports_total{status}` series list them.
    pub const ALL: [Self; 6] = [
        Self::Sent,
        Self::Delivered,
        Self::Undelivered,
        Self::Rejected,
        Self::Expired,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Every status but `sent` ends the message's lifecycle.
    pub fn is_final(self) -> bool {
        self != Self::Sent
    }

    /// A final status that says the message did not arrive.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Undelivered | Self::Rejected | Self::Expired)
    }

    /// The status of a message sent in parts, each reported on its own
    /// (Vonage): the failure of any part is the message's (a later success
    /// of another part never hides it); `delivered` only when every part
    /// is; `unknown` when all are final but some unknown; else `sent`.
    pub fn of_parts(parts: &[Self]) -> Self {
        if let Some(failure) = parts.iter().copied().find(|s| s.is_failure()) {
            return failure;
        }
        if parts.is_empty() || parts.iter().any(|s| !s.is_final()) {
            return Self::Sent;
        }
        if parts.iter().all(|s| *s == Self::Delivered) {
            Self::Delivered
        } else {
            Self::Unknown
        }
    }
}

/// Published on `sms.delivery` once per status change a provider reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryReport {
    pub idempotency_key: String,
    pub phone_number: String,
    /// The provider instance that accepted the message.
    pub provider: String,
    pub provider_message_id: String,
    pub status: DeliveryStatus,
    /// The provider's own word for it (`undelivered`, `Failed`, `DELIVERED`).
    pub provider_status: String,
    pub error_code: Option<String>,
    /// The provider says trying again cannot help (an unknown number, a
    /// block); false where it says nothing.
    pub permanent: bool,
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

    #[test]
    fn a_failed_part_is_the_messages_status_and_delivered_needs_every_part() {
        use DeliveryStatus::*;
        assert_eq!(DeliveryStatus::of_parts(&[Delivered, Sent]), Sent);
        assert_eq!(DeliveryStatus::of_parts(&[Delivered, Delivered]), Delivered);
        assert_eq!(
            DeliveryStatus::of_parts(&[Undelivered, Delivered]),
            Undelivered
        );
        assert_eq!(DeliveryStatus::of_parts(&[Sent, Expired]), Expired);
        assert_eq!(DeliveryStatus::of_parts(&[Delivered, Unknown]), Unknown);
        assert_eq!(DeliveryStatus::of_parts(&[]), Sent);
        for s in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(s.as_str()), Some(s));
            assert_eq!(DeliveryStatus::of_parts(&[s]), s);
        }
    }

    #[test]
    fn a_delivery_report_serialises_as_the_contract_example() {
        let event = DeliveryReport {
            idempotency_key: "pay-8812-reminder".into(),
            phone_number: "+254712345678".into(),
            provider: "at".into(),
            provider_message_id: "ATXid_1f2e".into(),
            status: DeliveryStatus::Undelivered,
            provider_status: "Failed".into(),
            error_code: Some("UserDoesNotExist".into()),
            permanent: true,
            reported_at: "2026-12-01T10:00:03Z".into(),
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            serde_json::json!({"idempotencyKey": "pay-8812-reminder",
                "phoneNumber": "+254712345678", "provider": "at",
                "providerMessageId": "ATXid_1f2e", "status": "undelivered",
                "providerStatus": "Failed", "errorCode": "UserDoesNotExist",
                "permanent": true, "reportedAt": "2026-12-01T10:00:03Z"})
        );
    }
}

//! What the HTTP and gRPC doors share, so that the two answer alike: a
//! command submitted at either is validated by the same rules, admitted
//! and queued the same way ([`FrontDoor::submit`]), a key's status is read
//! once ([`FrontDoor::status`]), a message is cancelled one way
//! ([`FrontDoor::cancel`]), and readiness means one thing
//! ([`FrontDoor::readiness`]). Each door only translates its wire (JSON
//! and HTTP status codes; protobuf and gRPC codes) to and from these.
//!
//! Uses the ports only, no adapter crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use crate::domain::{
    CommandError, DeliveryStatus, FailureReason, IdempotencyKey, SendSms, SmsFailed, MAX_KEY_LEN,
};
use crate::ports::{
    Admission, CacheService, CancelVerdict, EventBus, EventMeta, FailedRecord, Lane, MessageStatus,
    Owner, QueueClient,
};
use crate::processing::Consuming;

/// The longest `x-correlation-id` or `traceparent` a door passes on (a
/// `tracestate` keeps whole members up to 512 characters:
/// [`crate::telemetry::bounded_tracestate`]).
const MAX_META_CHARS: usize = 256;

/// How long readiness waits for Redis to take a write.
pub const READY_REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the doors act on.
#[derive(Clone)]
pub struct FrontDoor {
    pub cache: Arc<dyn CacheService>,
    pub queue: Arc<dyn QueueClient>,
    /// Whether the processing loop consumes commands, for readiness.
    pub consuming: Arc<Consuming>,
    /// `host:port` of Redis, for readiness reasons.
    pub redis_address: String,
    /// Where a cancel publishes its SmsFailed.
    pub events: Arc<dyn EventBus>,
    /// This instance's name in the store (the notifier's, whose liveness
    /// record the heartbeat keeps): a cancel holds a key as this instance
    /// while it publishes.
    pub instance: String,
    /// Makes each cancel's owner unique.
    pub cancels: Arc<AtomicU64>,
}

/// The `detail` of a cancel's SmsFailed.
pub const CANCEL_DETAIL: &str = "cancelled before it was sent";

/// What a cancel did.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancellation {
    /// The key's status after it: `failed`, reason `cancelled`.
    pub status: MessageStatus,
    /// Whether the service knew the key before: if not, the cancel waits
    /// for the command (HTTP 202 rather than 200).
    pub known: bool,
}

/// Why a door refuses a request. Each door maps it to its own code: HTTP
/// 400, 409, 404, 503; gRPC `INVALID_ARGUMENT`, `ALREADY_EXISTS`,
/// `NOT_FOUND`, `UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Not a valid command (section 2.3): `error` is the `SmsFailed`
    /// reason that would apply, `invalid_command` for a malformed one.
    Invalid { error: &'static str, detail: String },
    /// The key is known with another payload: nothing was queued.
    KeyReused {
        key: IdempotencyKey,
        /// The key's status, when it could be read.
        known: Option<MessageStatus>,
    },
    /// No message with this key.
    UnknownKey,
    /// Sent, being sent, or failed: too late to cancel; nothing changed.
    NotCancellable {
        key: IdempotencyKey,
        /// The key's status, when it could be read.
        known: Option<MessageStatus>,
    },
    /// Redis did not answer.
    StoreUnavailable(String),
    /// The broker did not take (or confirm) the command.
    BrokerUnavailable(String),
}

impl Refusal {
    /// The `error` code both doors show.
    pub fn error(&self) -> &'static str {
        match self {
            Self::Invalid { error, .. } => error,
            Self::KeyReused { .. } => "idempotency_key_reused",
            Self::UnknownKey => "unknown_key",
            Self::NotCancellable { .. } => "not_cancellable",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::BrokerUnavailable(_) => "broker_unavailable",
        }
    }

    /// The human-readable detail both doors show.
    pub fn detail(&self) -> String {
        match self {
            Self::Invalid { detail, .. } => detail.clone(),
            Self::KeyReused { .. } => "this key was used for another message".to_owned(),
            Self::UnknownKey => "no message with this key".to_owned(),
            Self::NotCancellable { known, .. } => match known.as_ref().map(|s| s.status.as_str()) {
                Some("failed") => "it has already failed",
                Some("processing") => {
                    "it is being sent, or an earlier attempt may have sent it: too late to cancel"
                }
                _ => "it has already been sent: too late to cancel",
            }
            .to_owned(),
            Self::StoreUnavailable(detail) | Self::BrokerUnavailable(detail) => detail.clone(),
        }
    }
}

/// The context a door passes from its request onto the command:
/// `x-correlation-id` and `traceparent`, each cut to 256 characters, and
/// `tracestate`, bounded by whole members to 512. (When traces are recorded, the command carries the
/// request's span instead of the caller's: see [`request_span`].)
pub fn event_meta(
    correlation_id: Option<&str>,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> EventMeta {
    let cut = |v: &str| v.chars().take(MAX_META_CHARS).collect::<String>();
    EventMeta {
        correlation_id: correlation_id.map(cut),
        traceparent: traceparent.map(cut),
        tracestate: tracestate.and_then(crate::telemetry::bounded_tracestate),
    }
}

/// The span of one request to a door (`name`: `POST /v1/messages`,
/// `sms.v1.SmsService/Send`), continuing the caller's trace (its
/// `traceparent` and `tracestate`); a command submitted in it carries its
/// context, so the command's processing joins the caller's trace. The
/// door records its answer on it (`http.response.status_code` or
/// `rpc.grpc.status_code`), [`FrontDoor::submit`] the key.
pub fn request_span(
    name: &'static str,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = name,
        otel.kind = "server",
        http.response.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        key = tracing::field::Empty,
        provider = tracing::field::Empty,
    );
    // Bounded here, for every door and callback alike.
    let tracestate = tracestate.and_then(crate::telemetry::bounded_tracestate);
    crate::telemetry::continue_trace(&span, traceparent, tracestate.as_deref());
    span
}

impl FrontDoor {
    /// Validates a SendSms body with the rules of the queue (section 2),
    /// admits its key, and publishes the body unchanged with confirm, to
    /// the high queue when its `priority` is `high`, else to the command
    /// queue.
    /// Admission first: the key's status answers at once, and a key reused
    /// with another payload is refused before anything is queued. A new
    /// admission whose publish fails is withdrawn, so the key is unknown
    /// again. Answers the key once the broker confirmed the command.
    pub async fn submit(&self, body: &[u8], meta: &EventMeta) -> Result<IdempotencyKey, Refusal> {
        let command = SendSms::from_json(body).map_err(|e| match e {
            CommandError::Malformed(detail) => Refusal::Invalid {
                error: "invalid_command",
                detail,
            },
            CommandError::Invalid { reason, detail, .. } => Refusal::Invalid {
                error: reason.as_str(),
                detail,
            },
        })?;
        let key = command.idempotency_key.clone();
        tracing::Span::current().record("key", key.as_str());
        let admission = self
            .cache
            .admit(&key, &command.fingerprint())
            .await
            .map_err(|e| Refusal::StoreUnavailable(e.to_string()))?;
        if admission == Admission::Conflict {
            let known = self.cache.status(key.as_str()).await.ok().flatten();
            return Err(Refusal::KeyReused { key, known });
        }
        let lane = Lane::of(command.priority);
        match self.queue.publish_command(body, meta, lane).await {
            Ok(()) => Ok(key),
            Err(e) => {
                if admission == Admission::New {
                    // Not queued: the key is not taken. If this fails too the
                    // status says `processing` until the client retries.
                    let _ = self.cache.withdraw(&key).await;
                }
                Err(Refusal::BrokerUnavailable(e.to_string()))
            }
        }
    }

    /// The status of a key: [`Refusal::UnknownKey`] for a key never seen,
    /// expired, or too long to be one.
    pub async fn status(&self, key: &str) -> Result<MessageStatus, Refusal> {
        if key.len() > MAX_KEY_LEN {
            return Err(Refusal::UnknownKey);
        }
        match self.cache.status(key).await {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(Refusal::UnknownKey),
            Err(e) => Err(Refusal::StoreUnavailable(e.to_string())),
        }
    }

    /// Cancels the message with `key` unless it is sent, being sent or
    /// failed ([`Refusal::NotCancellable`]); a key the service has not seen
    /// yet is cancelled too (a tombstone: its command is cancelled when it
    /// arrives). Never a send after it answers `Ok`. Its SmsFailed
    /// (`cancelled`) is published here at once when the store knows the
    /// number (a scheduled message waiting in the hold queues), else by the
    /// command when it next arrives; never twice (the store gives the key
    /// to one publisher at a time).
    pub async fn cancel(&self, key: &str, meta: &EventMeta) -> Result<Cancellation, Refusal> {
        // A key no command can carry names no message, now or later.
        let key = IdempotencyKey::parse(key).map_err(|_| Refusal::UnknownKey)?;
        tracing::Span::current().record("key", key.as_str());
        let n = self.cancels.fetch_add(1, Ordering::Relaxed);
        let owner = Owner::cancel(&self.instance, n);
        let verdict = self
            .cache
            .cancel(&key, &owner, CANCEL_DETAIL)
            .await
            .map_err(|e| Refusal::StoreUnavailable(e.to_string()))?;
        let (known, outcome) = match verdict {
            CancelVerdict::TooLate => {
                metrics::counter!("sms_cancels_total", "outcome" => "too_late").increment(1);
                let known = self.cache.status(key.as_str()).await.ok().flatten();
                return Err(Refusal::NotCancellable { key, known });
            }
            CancelVerdict::Cancelled { known } => (known, "cancelled"),
            CancelVerdict::Publish {
                record,
                phone_number,
            } => {
                self.publish_cancel(&key, &owner, &record, phone_number, meta)
                    .await;
                (true, "cancelled")
            }
        };
        let outcome = if known { outcome } else { "waiting" };
        metrics::counter!("sms_cancels_total", "outcome" => outcome).increment(1);
        info!(known, "message cancelled");
        let status = self.status(key.as_str()).await?;
        Ok(Cancellation { status, known })
    }

    /// Publishes a cancel's SmsFailed and marks it published; if the broker
    /// does not take it, hands the key back (the command publishes it when
    /// it next arrives). A mark that Redis refuses three times leaves the
    /// event unmarked: the command publishes it again after this lease
    /// (subscribers deduplicate on `message_id`, as for every event).
    async fn publish_cancel(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        record: &FailedRecord,
        phone_number: String,
        meta: &EventMeta,
    ) {
        let event = SmsFailed {
            idempotency_key: key.to_string(),
            phone_number,
            reason: FailureReason::Cancelled.as_str().to_owned(),
            detail: record.detail.clone(),
            attempts: record.attempts,
            failed_at: record.failed_at.clone(),
        };
        let span = tracing::info_span!("publish", otel.kind = "producer", event = "SmsFailed");
        let published =
            tracing::Instrument::instrument(self.events.publish_failed(&event, meta), span).await;
        if let Err(e) = published {
            warn!(error = %e, "the cancel's SmsFailed is not confirmed: the command publishes it when it next arrives");
            if let Err(e) = self.cache.release(key, owner, record.attempts, None).await {
                warn!(error = %e, "cannot hand the cancelled key back; its hold runs out");
            }
            return;
        }
        metrics::counter!("sms_failed_total", "reason" => FailureReason::Cancelled.as_str())
            .increment(1);
        for wait_ms in [0, 100, 400] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            match self.cache.mark_published(key, owner).await {
                Ok(()) => return,
                Err(e) => warn!(error = %e, "cannot mark the cancel's SmsFailed published yet"),
            }
        }
    }

    /// Ready: connected to the broker, consuming, and Redis takes a write
    /// within [`READY_REDIS_TIMEOUT`]. Otherwise every reason, joined. Sets
    /// the `sms_ready` gauge to what it finds, so that `/readyz`, every
    /// scrape of `/metrics` and gRPC health checking all report it.
    pub async fn readiness(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if !self.queue.is_connected() {
            reasons.push("not connected to RabbitMQ".to_owned());
        } else if !self.consuming.get() {
            reasons.push("not consuming commands".to_owned());
        }
        match tokio::time::timeout(READY_REDIS_TIMEOUT, self.cache.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => reasons.push(format!("Redis at {}: {e}", self.redis_address)),
            Err(_) => reasons.push(format!(
                "Redis at {}: no answer within 2 s",
                self.redis_address
            )),
        }
        let ready = reasons.is_empty();
        metrics::gauge!("sms_ready").set(if ready { 1.0 } else { 0.0 });
        if ready {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }
}

/// Whether a status ends the message's lifecycle: `failed`, or a final
/// delivery status (`delivered`, `undelivered`, `rejected`, `expired`,
/// `unknown`). `scheduled`, `processing` and `sent` may still change.
pub fn is_final(status: &str) -> bool {
    status == "failed" || DeliveryStatus::parse(status).is_some_and(DeliveryStatus::is_final)
}

/// The status document of a key as JSON (section 7.4).
pub fn status_document(key: &str, s: &MessageStatus) -> serde_json::Value {
    let mut doc = json!({
        "idempotencyKey": key,
        "status": s.status,
        "providerMessageId": s.provider_message_id,
        "attempts": s.attempts,
        "updatedAt": s.updated_at,
        "provider": s.provider,
        "deliveryStatus": s.delivery_status.map(|d| d.as_str()),
        "history": s.history,
    });
    if let Some(reason) = &s.reason {
        doc["reason"] = json!(reason);
        doc["detail"] = json!(s.detail);
    }
    if let Some(send_at) = &s.send_at {
        doc["sendAt"] = json!(send_at);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_and_final_delivery_statuses_end_a_watch_and_the_others_do_not() {
        for status in [
            "failed",
            "delivered",
            "undelivered",
            "rejected",
            "expired",
            "unknown",
        ] {
            assert!(is_final(status), "{status}");
        }
        for status in ["scheduled", "processing", "sent", "accepted", ""] {
            assert!(!is_final(status), "{status}");
        }
    }

    #[test]
    fn request_context_is_bounded_and_tracestate_keeps_whole_members() {
        let long = "x".repeat(300);
        let state = format!("a={long},b={long}");
        let meta = event_meta(Some(&long), Some("00-abc-01"), Some(&state));
        assert_eq!(meta.correlation_id.unwrap().len(), 256);
        assert_eq!(meta.traceparent.as_deref(), Some("00-abc-01"));
        assert_eq!(meta.tracestate.unwrap(), format!("a={long}"));
        assert_eq!(event_meta(None, None, None), EventMeta::default());
    }
}

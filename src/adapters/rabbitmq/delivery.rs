//! A subscription and its deliveries: turns lapin deliveries into
//! [`InboundMessage`]s and settles them, in order, through the channel's
//! settling task ([`super::settle`]), which batches acks.
//!
//! Two things a delivery carries are not taken at face value:
//!
//! - a delivery read after its channel died is dropped, not processed: the
//!   broker has it back already (and hands it to a live consumer), and its
//!   tag means nothing on any other channel;
//! - the service's own retry headers (`x-sms-attempts`, `x-sms-delays`,
//!   `x-sms-first-attempt-ms`) count only on a message that came back from
//!   one of the delay tiers of the queue it was consumed from (its
//!   `x-death` names the tier), so a producer cannot set a command's
//!   attempts; their numbers saturate.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, BasicProperties, Channel, Consumer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::settle::{self, Settle};
use super::{unavailable, RabbitMq, RetryTier, Topology};
use crate::domain::mask_numbers;
use crate::ports::{
    DeliveryHandle, DeliveryStream, EventMeta, InboundMessage, Lane, QueueError, RetryState,
};

/// Longest `x-sms-error` reason, and longest trace header carried over.
const MAX_HEADER_CHARS: usize = 512;

/// Longest wait, when closing, for the settling task to send what it holds.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

pub struct RabbitStream {
    consumer: Consumer,
    channel: Channel,
    broker: RabbitMq,
    /// The queue subscribed to: its deliveries go back to it through its
    /// own delay tiers and hold queues.
    lane: Lane,
    /// `None` once closed.
    settle: Option<mpsc::UnboundedSender<Settle>>,
    settling: Option<JoinHandle<()>>,
}

impl RabbitStream {
    pub(super) fn new(consumer: Consumer, channel: Channel, broker: RabbitMq, lane: Lane) -> Self {
        let (settle, inbox) = mpsc::unbounded_channel();
        Self {
            consumer,
            channel,
            broker,
            lane,
            settle: Some(settle),
            settling: Some(tokio::spawn(settle::run(inbox))),
        }
    }
}

#[async_trait]
impl DeliveryStream for RabbitStream {
    async fn next(&mut self) -> Option<Result<InboundMessage, QueueError>> {
        let delivery = loop {
            match self.consumer.next().await? {
                // Pushed before the channel died and read after: the broker
                // redelivers it to a live consumer.
                Ok(delivery) if !delivery.acker.usable() => {
                    metrics::counter!("sms_amqp_stale_deliveries_dropped_total").increment(1);
                    tracing::debug!("dropped a delivery of a channel that has closed");
                }
                Ok(delivery) => break delivery,
                Err(e) => return Some(Err(unavailable(e))),
            }
        };
        let settle = self.settle.clone()?;
        let Delivery {
            delivery_tag,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let trace_header = |name: &str| {
            properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .and_then(header_text)
        };
        let meta = EventMeta {
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|c| bounded(c.as_str())),
            traceparent: trace_header("traceparent"),
            tracestate: properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("tracestate"))
                .and_then(header_str)
                .and_then(crate::telemetry::bounded_tracestate),
        };
        let retry = retry_state(
            properties.headers().as_ref(),
            self.broker.topology().tiers(self.lane),
        );
        // Registered before anyone can settle it, and in tag order.
        let _ = settle.send(Settle::Open(delivery_tag));
        Some(Ok(InboundMessage {
            body: data,
            redelivered,
            meta,
            retry,
            handle: Box::new(RabbitDelivery {
                tag: delivery_tag,
                acker: Some(acker),
                settle,
                properties,
                broker: self.broker.clone(),
                lane: self.lane,
            }),
        }))
    }

    async fn cancel(&mut self) {
        super::cancel(&self.channel, self.consumer.tag()).await;
    }

    async fn close(&mut self) {
        // The settling task ends once no delivery can settle any more;
        // what it still holds goes out before the channel closes.
        self.settle = None;
        if let Some(task) = self.settling.take() {
            if tokio::time::timeout(FLUSH_LIMIT, task).await.is_err() {
                tracing::warn!("deliveries still unsettled; closing the channel anyway");
            }
        }
        if self.channel.status().connected() {
            if let Err(e) = self.channel.close(200, "OK".into()).await {
                tracing::debug!(error = %e, "closing the consumer channel failed");
            }
        }
    }
}

/// Headers of the service's own, carried through delay tiers.
const ATTEMPTS: &str = "x-sms-attempts";
/// When a held command is due (ms since the Unix epoch): for people
/// looking into a hold queue; the service never reads it back.
const HELD_UNTIL: &str = "x-sms-held-until-ms";
const DELAYS: &str = "x-sms-delays";
const FIRST_ATTEMPT: &str = "x-sms-first-attempt-ms";
const PINNED: &str = "x-sms-provider";
/// Longest provider instance name read from a header.
const MAX_PROVIDER_NAME: usize = 64;

/// Counts read from headers stop here: far past any `retry.max_attempts`,
/// with room left for the core to count on.
const MAX_COUNT: u32 = u32::MAX / 2;

/// The retry bookkeeping of a delivery: what its headers say if it came
/// back from one of the delay tiers, else a first attempt's.
fn retry_state(headers: Option<&FieldTable>, tiers: &[RetryTier]) -> RetryState {
    let Some(headers) = headers.filter(|h| from_delay_tier(h, tiers)) else {
        return RetryState::default();
    };
    let number = |name: &str| headers.inner().get(name).and_then(header_number);
    let count = |name: &str| number(name).map_or(0, |n| n.min(u64::from(MAX_COUNT)) as u32);
    RetryState {
        attempts: count(ATTEMPTS),
        delays: count(DELAYS),
        first_attempt_at_ms: number(FIRST_ATTEMPT),
        pinned_provider: headers
            .inner()
            .get(PINNED)
            .and_then(header_text)
            .filter(|name| !name.is_empty() && name.len() <= MAX_PROVIDER_NAME),
    }
}

/// Whether the broker's `x-death` says the message expired out of one of
/// the service's delay tiers.
fn from_delay_tier(headers: &FieldTable, tiers: &[RetryTier]) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return false;
    };
    deaths.as_slice().iter().any(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return false;
        };
        death
            .inner()
            .get("queue")
            .and_then(header_text)
            .is_some_and(|queue| tiers.iter().any(|tier| tier.queue == queue))
    })
}

/// A header value as a non-negative number, whatever integer type (or
/// decimal string) a producer used, saturating at `u64::MAX`; anything else
/// counts as absent.
fn header_number(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(s) => {
            let digits = std::str::from_utf8(s.as_bytes()).ok()?.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse().unwrap_or(u64::MAX))
        }
        _ => None,
    }
}

/// A header value as text, if it is text of a sane length.
fn header_text(value: &AMQPValue) -> Option<String> {
    header_str(value).map(bounded)
}

/// A header value as text, if it is text.
fn header_str(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

fn bounded(text: &str) -> String {
    text.chars().take(MAX_HEADER_CHARS).collect()
}

struct RabbitDelivery {
    tag: u64,
    /// Taken by the one settlement a delivery gets.
    acker: Option<Acker>,
    settle: mpsc::UnboundedSender<Settle>,
    properties: BasicProperties,
    broker: RabbitMq,
    /// The queue it was delivered from, to which a delay or a hold
    /// returns it.
    lane: Lane,
}

impl RabbitDelivery {
    /// The acker, if this delivery can still be settled on its channel.
    fn take_acker(&mut self, what: &str) -> Result<Acker, QueueError> {
        match self.acker.take() {
            Some(acker) if acker.usable() => Ok(acker),
            Some(acker) => {
                // Out of the ledger too; the broker has it back already.
                let _ = self.settle.send(Settle::Abandoned(self.tag, acker));
                Err(QueueError::Unavailable(format!("{what}: channel closed")))
            }
            None => Err(QueueError::Unavailable(format!("{what}: already settled"))),
        }
    }
}

/// `Ok(false)` from an acker means the channel is gone: the broker will
/// redeliver, so the settle did not happen.
fn settled(result: lapin::Result<bool>, what: &str) -> Result<(), QueueError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Unavailable(format!("{what}: channel closed"))),
        Err(e) => Err(unavailable(e)),
    }
}

fn task_gone(what: &str) -> QueueError {
    QueueError::Unavailable(format!("{what}: subscription closed"))
}

impl Drop for RabbitDelivery {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            let _ = self.settle.send(Settle::Abandoned(self.tag, acker));
        }
    }
}

#[async_trait]
impl DeliveryHandle for RabbitDelivery {
    /// Hands the ack to the settling task, which sends it within
    /// [`settle::HOLD`], usually batched with its neighbours.
    async fn ack(&mut self) -> Result<(), QueueError> {
        let acker = self.take_acker("ack")?;
        self.settle
            .send(Settle::Done(self.tag, acker))
            .map_err(|_| task_gone("ack"))
    }

    async fn requeue(&mut self) -> Result<(), QueueError> {
        let acker = self.take_acker("nack")?;
        let (answer, answered) = oneshot::channel();
        self.settle
            .send(Settle::Requeue(self.tag, acker, answer))
            .map_err(|_| task_gone("nack"))?;
        settled(answered.await.map_err(|_| task_gone("nack"))?, "nack")
    }

    async fn dead_letter(&mut self, body: &[u8], reason: &str) -> Result<(), QueueError> {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        // Masked again here: a reason may quote a provider, a provider may
        // quote the number, and a dead letter is kept and read by people.
        headers.insert(
            "x-sms-error".into(),
            AMQPValue::LongString(bounded(&mask_numbers(reason)).into()),
        );
        // When, for `dead-letters list` (the command's own `timestamp` is kept).
        let now = std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
        headers.insert("x-sms-dead-lettered-at".into(), AMQPValue::Timestamp(now));
        super::stamp_trace(&mut headers);
        // Persistent whatever the command was: a dead letter is kept for people.
        let properties = self
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let queue = self.broker.topology().dead_letter_queue.clone();
        self.broker.publish("", &queue, body, properties).await?;
        self.ack().await
    }

    async fn delay(
        &mut self,
        body: &[u8],
        delay: Duration,
        retry: &RetryState,
    ) -> Result<(), QueueError> {
        // A tier of the queue it came from, which it returns to.
        let tier = self.broker.topology().tier_for(self.lane, delay).clone();
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        let number = |n: u64| AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX));
        headers.insert(ATTEMPTS.into(), number(u64::from(retry.attempts)));
        headers.insert(DELAYS.into(), number(u64::from(retry.delays)));
        if let Some(at) = retry.first_attempt_at_ms {
            headers.insert(FIRST_ATTEMPT.into(), number(at));
        }
        match &retry.pinned_provider {
            Some(name) => {
                headers.insert(PINNED.into(), AMQPValue::LongString(name.as_str().into()));
            }
            None if headers.contains_key(PINNED) => {
                let mut rest = headers.inner().clone();
                rest.remove(PINNED);
                headers = FieldTable::from(rest);
            }
            None => {}
        }
        // Its next delivery continues the command's trace from here.
        super::stamp_trace(&mut headers);
        // The tier's own TTL caps the wait; a shorter per-message expiry
        // spreads retries (jitter) within the tier.
        let expiration = delay.min(tier.delay).as_millis().max(1).to_string();
        let properties = self
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_expiration(expiration.as_str().into());
        self.broker
            .publish("", &tier.queue, body, properties)
            .await?;
        self.ack().await
    }

    /// Publishes a persistent copy (body and headers unchanged, plus
    /// [`HELD_UNTIL`]) to the hold queue of the queue it came from whose
    /// wait fits the time left ([`Topology::hop_for`]), with confirm, then
    /// acks. Its per-message expiry is set to that wait (a producer's own
    /// `expiration` would otherwise make it leave early, or wait behind
    /// longer ones), so every message of a hold queue leaves in order.
    async fn hold(&mut self, body: &[u8], until: SystemTime) -> Result<(), QueueError> {
        let left = until.duration_since(SystemTime::now()).unwrap_or_default();
        let hop = self.broker.topology().hop_for(left);
        let origin = self.broker.topology().queue(self.lane);
        let queue = Topology::hold_queue(origin, hop);
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        let due_ms = until
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        headers.insert(HELD_UNTIL.into(), AMQPValue::LongLongInt(due_ms));
        super::stamp_trace(&mut headers);
        let properties = hold_properties(&self.properties, headers, hop);
        self.broker.publish("", &queue, body, properties).await?;
        self.ack().await
    }
}

/// The properties of a held copy: the command's own, with `headers`,
/// persistent whatever the producer chose, expiring after exactly `hop`.
fn hold_properties(
    properties: &BasicProperties,
    headers: FieldTable,
    hop: Duration,
) -> BasicProperties {
    properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_expiration(hop.as_millis().max(1).to_string().as_str().into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::types::{FieldArray, LongString};

    use super::*;

    fn tiers() -> Vec<RetryTier> {
        ["sms.send.retry.5s", "sms.send.retry.30s"]
            .into_iter()
            .map(|queue| RetryTier {
                queue: queue.into(),
                delay: Duration::from_secs(5),
                returns_to: "sms.send".into(),
            })
            .collect()
    }

    fn death(queue: &str) -> AMQPValue {
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString(queue.into()));
        death.insert("reason".into(), AMQPValue::LongString("expired".into()));
        AMQPValue::FieldTable(death)
    }

    fn headers(deaths: &[&str], attempts: AMQPValue) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPTS.into(), attempts);
        headers.insert(DELAYS.into(), AMQPValue::LongLongInt(2));
        headers.insert(FIRST_ATTEMPT.into(), AMQPValue::LongLongInt(1_000));
        if !deaths.is_empty() {
            let deaths: Vec<AMQPValue> = deaths.iter().map(|q| death(q)).collect();
            headers.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(deaths)),
            );
        }
        headers
    }

    #[test]
    fn retry_headers_count_on_a_message_back_from_a_delay_tier() {
        let h = headers(&["sms.send.retry.30s"], AMQPValue::LongLongInt(3));
        assert_eq!(
            retry_state(Some(&h), &tiers()),
            RetryState {
                attempts: 3,
                delays: 2,
                first_attempt_at_ms: Some(1_000),
                pinned_provider: None,
            }
        );
    }

    #[test]
    fn retry_headers_a_producer_set_are_ignored() {
        let fresh = RetryState::default();
        let forged = headers(&[], AMQPValue::LongLongInt(999));
        assert_eq!(retry_state(Some(&forged), &tiers()), fresh);
        let elsewhere = headers(&["some.other.queue"], AMQPValue::LongLongInt(999));
        assert_eq!(retry_state(Some(&elsewhere), &tiers()), fresh);
        let mut not_an_array = forged.clone();
        not_an_array.insert("x-death".into(), death("sms.send.retry.5s"));
        assert_eq!(retry_state(Some(&not_an_array), &tiers()), fresh);
        assert_eq!(retry_state(None, &tiers()), fresh);
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        for huge in [
            AMQPValue::LongLongInt(i64::MAX),
            AMQPValue::Timestamp(u64::MAX),
            AMQPValue::LongUInt(u32::MAX),
            AMQPValue::LongString(LongString::from("99999999999999999999999999")),
        ] {
            let h = headers(&["sms.send.retry.5s"], huge.clone());
            let retry = retry_state(Some(&h), &tiers());
            assert_eq!(retry.attempts, MAX_COUNT, "{huge:?}");
            // The core counts on from here without overflowing.
            assert!(retry.attempts.checked_add(1_000).is_some());
        }
    }

    #[test]
    fn a_held_copy_is_persistent_keeps_the_commands_headers_and_expires_after_its_wait() {
        let mut producer_headers = FieldTable::default();
        producer_headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-a-b-01".into()),
        );
        let command = BasicProperties::default()
            .with_delivery_mode(1)
            .with_expiration("5".into())
            .with_correlation_id("c-1".into())
            .with_headers(producer_headers.clone());
        let mut headers = producer_headers;
        headers.insert(HELD_UNTIL.into(), AMQPValue::LongLongInt(1_000));
        let held = hold_properties(&command, headers.clone(), Duration::from_secs(60));
        assert_eq!(*held.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            held.expiration().as_ref().map(|e| e.as_str()),
            Some("60000"),
            "the wait of its hold queue, not the producer's"
        );
        assert_eq!(
            held.correlation_id().as_ref().map(|c| c.as_str()),
            Some("c-1")
        );
        assert_eq!(held.headers().as_ref(), Some(&headers));
    }

    #[test]
    fn header_numbers_are_read_from_any_integer_or_digits() {
        assert_eq!(header_number(&AMQPValue::ShortShortUInt(7)), Some(7));
        assert_eq!(header_number(&AMQPValue::LongInt(-1)), None);
        assert_eq!(
            header_number(&AMQPValue::LongString(" 12 ".into())),
            Some(12)
        );
        assert_eq!(header_number(&AMQPValue::LongString("-3".into())), None);
        assert_eq!(header_number(&AMQPValue::LongString("".into())), None);
        assert_eq!(header_number(&AMQPValue::Boolean(true)), None);
    }
}

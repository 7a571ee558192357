//! A subscription and its deliveries: turns lapin deliveries into
//! [`InboundMessage`]s and settles them, in order, through the channel's
//! settling task ([`super::settle`]), which batches acks.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::{Acker, BasicProperties, Channel, Consumer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::settle::{self, Settle};
use super::{unavailable, RabbitMq};
use crate::ports::{
    DeliveryHandle, DeliveryStream, EventMeta, InboundMessage, QueueError, RetryState,
};

/// Longest `x-sms-error` reason, and longest trace header carried over.
const MAX_HEADER_CHARS: usize = 512;

/// Longest wait, when closing, for the settling task to send what it holds.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

pub struct RabbitStream {
    consumer: Consumer,
    channel: Channel,
    broker: RabbitMq,
    /// `None` once closed.
    settle: Option<mpsc::UnboundedSender<Settle>>,
    settling: Option<JoinHandle<()>>,
}

impl RabbitStream {
    pub(super) fn new(consumer: Consumer, channel: Channel, broker: RabbitMq) -> Self {
        let (settle, inbox) = mpsc::unbounded_channel();
        Self {
            consumer,
            channel,
            broker,
            settle: Some(settle),
            settling: Some(tokio::spawn(settle::run(inbox))),
        }
    }
}

#[async_trait]
impl DeliveryStream for RabbitStream {
    async fn next(&mut self) -> Option<Result<InboundMessage, QueueError>> {
        let delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(e) => return Some(Err(unavailable(e))),
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
        let meta = EventMeta {
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|c| bounded(c.as_str())),
            traceparent: properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("traceparent"))
                .and_then(header_text),
        };
        let headers = properties.headers().as_ref();
        let count = |name: &str| {
            headers
                .and_then(|h| h.inner().get(name))
                .and_then(header_number)
        };
        let retry = RetryState {
            attempts: count(ATTEMPTS).map_or(0, |n| n.min(u64::from(u32::MAX)) as u32),
            delays: count(DELAYS).map_or(0, |n| n.min(u64::from(u32::MAX)) as u32),
            first_attempt_at_ms: count(FIRST_ATTEMPT),
        };
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
const DELAYS: &str = "x-sms-delays";
const FIRST_ATTEMPT: &str = "x-sms-first-attempt-ms";

/// A header value as a non-negative number, whatever integer type (or
/// decimal string) a producer used; anything else counts as absent.
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
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// A header value as text, if it is text of a sane length.
fn header_text(value: &AMQPValue) -> Option<String> {
    let text = match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?,
        AMQPValue::ShortString(s) => s.as_str(),
        _ => return None,
    };
    Some(bounded(text))
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
        headers.insert(
            "x-sms-error".into(),
            AMQPValue::LongString(bounded(reason).into()),
        );
        // When, for `dead-letters list` (the command's own `timestamp` is kept).
        let now = std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_secs());
        headers.insert("x-sms-dead-lettered-at".into(), AMQPValue::Timestamp(now));
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
        let tier = self.broker.topology().tier_for(delay).clone();
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        let number = |n: u64| AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX));
        headers.insert(ATTEMPTS.into(), number(u64::from(retry.attempts)));
        headers.insert(DELAYS.into(), number(u64::from(retry.delays)));
        if let Some(at) = retry.first_attempt_at_ms {
            headers.insert(FIRST_ATTEMPT.into(), number(at));
        }
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
}

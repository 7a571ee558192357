//! A subscription and its deliveries: turns lapin deliveries into
//! [`InboundMessage`]s and settles them through their own acker.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{Acker, BasicProperties, Channel, Consumer};

use super::{unavailable, RabbitMq};
use crate::ports::{
    DeliveryHandle, DeliveryStream, EventMeta, InboundMessage, QueueError, RetryState,
};

/// Longest `x-sms-error` reason, and longest trace header carried over.
const MAX_HEADER_CHARS: usize = 512;

pub struct RabbitStream {
    consumer: Consumer,
    channel: Channel,
    broker: RabbitMq,
}

impl RabbitStream {
    pub(super) fn new(consumer: Consumer, channel: Channel, broker: RabbitMq) -> Self {
        Self {
            consumer,
            channel,
            broker,
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
        let Delivery {
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
        Some(Ok(InboundMessage {
            body: data,
            redelivered,
            meta,
            retry,
            handle: Box::new(RabbitDelivery {
                acker,
                properties,
                broker: self.broker.clone(),
            }),
        }))
    }

    async fn cancel(&mut self) {
        super::cancel(&self.channel, self.consumer.tag()).await;
    }

    async fn close(&mut self) {
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
    acker: Acker,
    properties: BasicProperties,
    broker: RabbitMq,
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

#[async_trait]
impl DeliveryHandle for RabbitDelivery {
    async fn ack(&mut self) -> Result<(), QueueError> {
        settled(self.acker.ack(BasicAckOptions::default()).await, "ack")
    }

    async fn requeue(&mut self) -> Result<(), QueueError> {
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        settled(self.acker.nack(options).await, "nack")
    }

    async fn dead_letter(&mut self, body: &[u8], reason: &str) -> Result<(), QueueError> {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-sms-error".into(),
            AMQPValue::LongString(bounded(reason).into()),
        );
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

//! A subscription and its deliveries: turns lapin deliveries into
//! [`InboundMessage`]s and settles them through their own acker.

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{Acker, BasicProperties, Channel, Consumer};

use super::{unavailable, RabbitMq};
use crate::ports::{DeliveryHandle, DeliveryStream, EventMeta, InboundMessage, QueueError};

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
        Some(Ok(InboundMessage {
            body: data,
            redelivered,
            meta,
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
}

//! `bench --baseline minimal`: the fair ceiling of a design without
//! batching. A minimal correct pipeline, built into the bench, on the same
//! broker, Redis and provider as the service, with the service's prefetch
//! and concurrency (`amqp.prefetch`, `processing.max_in_flight`). Per
//! command, in the order that makes it correct (the service's order):
//!
//! 1. claim the key: `SET <prefix>:msg:<key> claimed NX PX <redis.lease_ms>`
//!    (a key already claimed or sent is acked without a send);
//! 2. call the provider: `POST {base_url}/messages` in the generic dialect,
//!    as the service's generic provider does (`{"to","text"}`,
//!    `Idempotency-Key`, the bearer token if one is set);
//! 3. record: `SET <prefix>:msg:<key> sent:<id> EX <idempotency_ttl_secs>`;
//! 4. publish an SmsSent-shaped event and wait for its confirm;
//! 5. ack the command, one ack per command.
//!
//! No retries (a failed call releases the claim and requeues the command),
//! no breaker, no rate limit, no metrics, no logs, no batching of acks or
//! Redis calls. Its queue, event exchange and key prefix are its own
//! (`sms.bench.<run>.minimal`, `bench-minimal-<run>`), deleted by
//! [`Minimal::stop`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;

use crate::config::{ProviderKind, QueueType, RedisMode, Settings};
use crate::domain::{SendSms, SmsSent};

/// The running pipeline.
pub struct Minimal {
    pub queue: String,
    pub exchange: String,
    /// Every Redis key it writes starts with this and a `:`.
    pub key_prefix: String,
    redis: redis::aio::ConnectionManager,
    task: tokio::task::JoinHandle<()>,
    counts: Arc<Counts>,
}

/// What the pipeline did, for the report and the tests.
#[derive(Debug, Default)]
pub struct Counts {
    pub sent: AtomicU64,
    /// Commands whose key was claimed or sent already: acked, not sent.
    pub duplicates: AtomicU64,
    /// Provider, Redis or broker errors: the command was requeued.
    pub errors: AtomicU64,
}

/// What [`Minimal::stop`] found and removed.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    pub sent: u64,
    pub duplicates: u64,
    pub errors: u64,
    pub keys_deleted: usize,
}

/// What each command needs, shared by the tasks.
struct Pipeline {
    redis: redis::aio::ConnectionManager,
    http: reqwest::Client,
    url: reqwest::Url,
    authorization: Option<String>,
    provider: String,
    publish: Channel,
    exchange: String,
    key_prefix: String,
    lease_ms: u64,
    ttl_secs: u64,
    counts: Arc<Counts>,
}

#[derive(serde::Serialize)]
struct Request<'a> {
    to: &'a str,
    text: &'a str,
}

#[derive(serde::Deserialize)]
struct Answer {
    id: String,
}

impl Minimal {
    /// Declares its queue and exchange and starts consuming.
    pub async fn start(
        connection: &Connection,
        run_id: &str,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            settings.redis.mode == RedisMode::Standalone,
            "--baseline minimal needs redis.mode = standalone (it talks to redis.url)"
        );
        let (instances, routes) = settings.instances().map_err(|e| anyhow::anyhow!("{e}"))?;
        // The instance of the first route: where the service sends by default.
        let first = routes.first().and_then(|r| r.providers.first());
        let instance = instances
            .iter()
            .find(|i| Some(&i.name) == first)
            .or(instances.first())
            .context("no provider instance configured")?;
        anyhow::ensure!(
            instance.kind == ProviderKind::Generic,
            "--baseline minimal speaks the generic provider's dialect only; {} is {} \
             (run the fake provider with --kind generic)",
            instance.name,
            instance.kind.as_str()
        );
        let url = format!("{}/messages", instance.base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url).with_context(|| instance.key("base_url"))?;
        let authorization = instance
            .settings
            .token
            .as_ref()
            .map(|t| t.expose_secret().to_owned())
            .filter(|t| !t.is_empty())
            .map(|t| format!("Bearer {t}"));
        let http = crate::adapters::providers::http::client(
            crate::adapters::providers::http::ClientSettings {
                connect_timeout: instance.connect_timeout,
                request_timeout: instance.request_timeout,
                max_idle_connections: instance.max_idle_connections,
                http2: crate::adapters::providers::http::Http2::for_base_url(
                    instance.http2,
                    &instance.base_url,
                ),
            },
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let client =
            redis::Client::open(settings.redis.url.expose_secret()).context("redis.url")?;
        let redis = redis::aio::ConnectionManager::new(client)
            .await
            .context("connecting to Redis (redis.url)")?;

        let queue = format!("sms.bench.{run_id}.minimal");
        let exchange = format!("sms.bench.{run_id}.minimal.sent");
        // The service's queue type, so that the broker does the same work.
        let mut arguments = FieldTable::default();
        if settings.amqp.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let (publish, mut consumer) =
            super::lane(connection, settings, &queue, arguments, &exchange).await?;
        let counts = Arc::new(Counts::default());
        let key_prefix = format!("bench-minimal-{run_id}");
        let context = Arc::new(Pipeline {
            redis: redis.clone(),
            http,
            url,
            authorization,
            provider: instance.name.clone(),
            publish,
            exchange: exchange.clone(),
            key_prefix: key_prefix.clone(),
            lease_ms: settings.redis.lease_ms,
            ttl_secs: settings.redis.idempotency_ttl_secs,
            counts: counts.clone(),
        });
        let in_flight = Arc::new(Semaphore::new(settings.processing.max_in_flight.max(1)));
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let context = context.clone();
                tokio::spawn(async move {
                    let requeue = match context.handle(&delivery.data).await {
                        Ok(()) => false,
                        Err(_) => {
                            context.counts.errors.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                    };
                    if requeue {
                        let _ = delivery
                            .acker
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            })
                            .await;
                    } else {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self {
            queue,
            exchange,
            key_prefix,
            redis,
            task,
            counts,
        })
    }

    /// Stops consuming, deletes its queue, exchange and Redis keys.
    pub async fn stop(mut self, connection: &Connection) -> Stopped {
        self.task.abort();
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let keys_deleted = delete_keys(&mut self.redis, &self.key_prefix)
            .await
            .unwrap_or(0);
        Stopped {
            sent: self.counts.sent.load(Ordering::Relaxed),
            duplicates: self.counts.duplicates.load(Ordering::Relaxed),
            errors: self.counts.errors.load(Ordering::Relaxed),
            keys_deleted,
        }
    }
}

impl Pipeline {
    /// One command: claim, call, record, publish with confirm. `Ok` means
    /// ack (sent, a duplicate, or a command that can never be sent); `Err`
    /// means the claim was released and the command is to be requeued.
    async fn handle(&self, body: &[u8]) -> anyhow::Result<()> {
        let Ok(sms) = SendSms::from_json(body) else {
            return Ok(()); // never sendable: dropped, as the ceiling needs no dead letters
        };
        let key = sms.idempotency_key.as_str();
        let record = format!("{}:msg:{key}", self.key_prefix);
        let mut redis = self.redis.clone();
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&record)
            .arg("claimed")
            .arg("NX")
            .arg("PX")
            .arg(self.lease_ms)
            .query_async(&mut redis)
            .await?;
        if claimed.is_none() {
            self.counts.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let id = match self.call(&sms).await {
            Ok(id) => id,
            Err(e) => {
                let _: Result<(), _> = redis::cmd("DEL").arg(&record).query_async(&mut redis).await;
                return Err(e);
            }
        };
        let _: () = redis::cmd("SET")
            .arg(&record)
            .arg(format!("sent:{id}"))
            .arg("EX")
            .arg(self.ttl_secs)
            .query_async(&mut redis)
            .await?;
        let event = SmsSent {
            idempotency_key: key.to_owned(),
            // As the service's SmsSent carries it (the bench's own number).
            phone_number: sms.phone_number.as_str().to_owned(),
            provider: self.provider.clone(),
            provider_message_id: id,
            segments: 1,
            attempts: 1,
            sent_at: crate::domain::rfc3339(std::time::SystemTime::now()),
        };
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type("SmsSent".into())
            .with_message_id(key.into());
        let confirm = self
            .publish
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&event)?,
                properties,
            )
            .await?
            .await?;
        // The record says sent: a requeued command is a duplicate now, and
        // its event is lost, which the bench would see as a missing event.
        anyhow::ensure!(confirm.is_ack(), "broker refused the event");
        self.counts.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The provider's message id, or an error for anything but a 2xx.
    async fn call(&self, sms: &SendSms) -> anyhow::Result<String> {
        let mut request = self
            .http
            .post(self.url.clone())
            .header("Idempotency-Key", sms.idempotency_key.as_str())
            .json(&Request {
                to: sms.phone_number.as_str(),
                text: sms.text.as_str(),
            });
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let response = request.send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "provider answered {}",
            response.status()
        );
        let answer: Answer = response.json().await?;
        Ok(answer.id)
    }
}

/// Deletes every key under `prefix:` (SCAN, not KEYS, which blocks a
/// shared Redis); returns how many.
pub async fn delete_keys(
    redis: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<usize> {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            deleted += keys.len();
            let _: () = redis::cmd("UNLINK").arg(keys).query_async(redis).await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

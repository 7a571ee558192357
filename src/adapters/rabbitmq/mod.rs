//! RabbitMQ through lapin: the contract's topology, a consumer with manual
//! acks and a prefetch, and a publisher that treats anything short of a
//! confirmed, routed publish as a failure.
//!
//! There are two command queues, each a [`Lane`]: the command queue and
//! the high queue beside it (`<command_queue>.high`), declared alike, each
//! with delay tiers of its own that return to it, so a `high` command that
//! is retried stays high.
//!
//! One connection carries one publishing channel in confirm mode, shared by
//! every task (confirms are awaited concurrently, each by its publisher), and
//! one channel per subscription. When the connection dies the next call
//! reconnects and redeclares the topology. With several nodes (`amqp.urls`,
//! a cluster) a connection attempt tries them in turn, starting with the
//! node after the one last connected to, so a dead node is tried last.
//!
//! Nothing waits on the broker without a bound. A connection attempt (the
//! handshake and the topology) runs as a task of its own, shared by all who
//! need the connection meanwhile, and is given up after
//! `amqp.connect_timeout_ms`, its socket closed. A publish waits for it only
//! within its own `amqp.confirm_timeout_ms`, which covers the connection,
//! the publish and the confirm together.
//!
//! A message the broker returns (no queue bound) is a failed publish; its
//! body is never read or logged here, and lapin's own warning that prints it
//! is filtered out ([`crate::telemetry::PAYLOAD_TARGETS`]).

mod delivery;
mod settle;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_compat::CompatExt;
use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::tcp::{AsyncTcpStream, TLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{AmqpSettings, QueueType};
use crate::domain::{DeliveryReport, Event, EventKind, SmsFailed, SmsSent};
use crate::ports::{DeliveryStream, EventBus, EventMeta, Lane, QueueClient, QueueError};

pub use delivery::RabbitStream;

/// The names of everything the service declares.
#[derive(Debug, Clone)]
pub struct Topology {
    pub command_queue: String,
    /// `<command_queue>.high`: `priority: high` commands, consumed beside
    /// the command queue with capacity of their own. Named after the
    /// command queue, so that every command queue has its own.
    pub high_queue: String,
    pub dead_letter_queue: String,
    /// Each event kind's fanout exchange.
    pub exchanges: Vec<(EventKind, String)>,
    /// The command queue's delay tiers, shortest first: queues whose
    /// messages expire back into the command queue after the tier's delay.
    pub retry_tiers: Vec<RetryTier>,
    /// The waits of the hold queues, shortest first: every queue the
    /// service consumes ([`Topology::consumed_queues`]) has one hold queue
    /// per wait, `<queue>.hold.<wait>`, whose messages all expire after
    /// that wait back into that queue ([`Topology::hold_queue`]).
    pub hold_hops: Vec<Duration>,
    /// The high queue's delay tiers, the same delays: queues of their own
    /// (`<command_queue>.retry.high.<delay>`) that expire back into the
    /// high queue. Their own, because a tier returns what it holds to one
    /// fixed queue, and the existing tiers' arguments cannot change under
    /// a broker that has them.
    pub high_retry_tiers: Vec<RetryTier>,
    /// The type of every queue above (`amqp.queue_type`).
    pub queue_type: QueueType,
    /// Quorum queues: the broker's `x-delivery-limit` on the command and
    /// high queues (`amqp.delivery_limit`).
    pub delivery_limit: u32,
}

/// One queue the service declares, with its arguments: made only by
/// [`Topology::queues`].
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone)]
pub struct RetryTier {
    pub queue: String,
    pub delay: Duration,
    /// The queue its messages expire back into.
    pub returns_to: String,
}

impl Topology {
    /// The exchange of `kind`'s events.
    pub fn exchange(&self, kind: EventKind) -> &str {
        self.exchanges
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, name)| name.as_str())
            .expect("every kind has an exchange")
    }

    pub fn new(s: &AmqpSettings, tiers: &[Duration]) -> Self {
        let mut tiers = tiers.to_vec();
        tiers.sort();
        tiers.dedup();
        let mut hold_hops: Vec<Duration> = s
            .hold_hops_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        hold_hops.sort();
        hold_hops.dedup();
        let high_queue = format!("{}.high", s.command_queue);
        let tiers_of = |prefix: &str, returns_to: &str| {
            tiers
                .iter()
                .map(|&delay| RetryTier {
                    queue: format!("{prefix}.{}", tier_label(delay)),
                    delay,
                    returns_to: returns_to.to_owned(),
                })
                .collect()
        };
        Self {
            command_queue: s.command_queue.clone(),
            retry_tiers: tiers_of(&format!("{}.retry", s.command_queue), &s.command_queue),
            high_retry_tiers: tiers_of(&format!("{}.retry.high", s.command_queue), &high_queue),
            high_queue,
            dead_letter_queue: s.dead_letter_queue.clone(),
            exchanges: EventKind::ALL
                .iter()
                .map(|k| (*k, s.exchange(*k).clone()))
                .collect(),
            hold_hops,
            queue_type: s.queue_type,
            delivery_limit: s.delivery_limit,
        }
    }

    /// Every queue the service declares, with its arguments, in the order
    /// declared (the dead-letter queue before the queues dead-lettering to
    /// it). The one place queue arguments are made.
    ///
    /// Classic queues are declared without `x-queue-type`, as they were
    /// before `amqp.queue_type` existed, so existing queues stay
    /// equivalent. Quorum queues get `x-queue-type: quorum`; every one
    /// that dead-letters (the command queues to the dead-letter queue, the
    /// delay tiers and hold queues back to their queue) does so
    /// `at-least-once`: the broker keeps a message until the target queue
    /// confirms it, so an expiry never drops a command. That strategy needs
    /// `x-overflow: reject-publish` (it is ignored otherwise; with no length
    /// limit set, nothing is ever rejected by it). RabbitMQ 3.10 and later:
    /// <https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>. The
    /// command queues also get the broker's `x-delivery-limit`: a message
    /// delivered more often is dead-lettered by the broker, with reason
    /// `delivery_limit` in its `x-death` header
    /// (<https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>).
    pub fn queues(&self) -> Vec<QueueSpec> {
        let quorum = self.queue_type == QueueType::Quorum;
        let base = || {
            let mut arguments = FieldTable::default();
            if quorum {
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
            arguments
        };
        let dead_lettering_to = |target: &str| {
            let mut arguments = base();
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(target.into()),
            );
            if quorum {
                arguments.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                arguments.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            arguments
        };
        let expiring = |target: &str, ttl: Duration| {
            let mut arguments = dead_lettering_to(target);
            let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            arguments
        };
        // A quorum dead-letter queue gets a delivery limit it never
        // reaches: from RabbitMQ 4.0 a quorum queue without one has a
        // default of 20 and drops a message delivered more often, and every
        // `dead-letters list` delivers each letter once (it reads, then
        // hands back). 3.x has no default; the explicit limit is the same
        // there.
        let mut dead_letters = base();
        if quorum {
            dead_letters.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT),
            );
        }
        let mut queues = vec![QueueSpec {
            name: self.dead_letter_queue.clone(),
            arguments: dead_letters,
        }];
        // The high queue exactly as the command queue.
        for queue in [&self.command_queue, &self.high_queue] {
            let mut arguments = dead_lettering_to(&self.dead_letter_queue);
            if quorum {
                arguments.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
                );
            }
            queues.push(QueueSpec {
                name: queue.clone(),
                arguments,
            });
        }
        for tier in self.retry_tiers.iter().chain(&self.high_retry_tiers) {
            queues.push(QueueSpec {
                name: tier.queue.clone(),
                arguments: expiring(&tier.returns_to, tier.delay),
            });
        }
        // Every message of a hold queue expires after its wait (the same
        // for all, so they expire in the order they came: the head is
        // always the next due) back to the queue it serves. No length
        // limit: a full disk blocks publishers (the broker's alarm), it
        // never drops a held command.
        for origin in self.consumed_queues() {
            for hop in &self.hold_hops {
                queues.push(QueueSpec {
                    name: Self::hold_queue(origin, *hop),
                    arguments: expiring(origin, *hop),
                });
            }
        }
        queues
    }

    /// The queues the service consumes commands from. Each has hold
    /// queues of its own, so that a held command comes back to the queue
    /// it was taken from.
    pub fn consumed_queues(&self) -> Vec<&str> {
        Lane::ALL.iter().map(|lane| self.queue(*lane)).collect()
    }

    /// The hold queue of `origin` that waits `hop`: `<origin>.hold.<wait>`.
    pub fn hold_queue(origin: &str, hop: Duration) -> String {
        format!("{origin}.hold.{}", tier_label(hop))
    }

    /// The wait of the hold queue for a command due in `left`: the
    /// shortest that ends after it is due by no more than the shortest wait
    /// there is (its last hop), else the longest that ends before it is due
    /// (it comes back, is examined again, and waits once more), else the
    /// shortest. So a command is taken after it is due (the core checks on
    /// every return), at most the shortest wait late, in few hops.
    pub fn hop_for(&self, left: Duration) -> Duration {
        let shortest = *self
            .hold_hops
            .first()
            .expect("settings validation keeps at least one hold wait");
        let last = self
            .hold_hops
            .iter()
            .find(|hop| **hop >= left && **hop - left <= shortest);
        last.or_else(|| self.hold_hops.iter().rev().find(|hop| **hop <= left))
            .copied()
            .unwrap_or(shortest)
    }

    /// The queue of `lane`.
    pub fn queue(&self, lane: Lane) -> &str {
        match lane {
            Lane::Normal => &self.command_queue,
            Lane::High => &self.high_queue,
        }
    }

    /// The delay tiers that return to `lane`'s queue.
    pub fn tiers(&self, lane: Lane) -> &[RetryTier] {
        match lane {
            Lane::Normal => &self.retry_tiers,
            Lane::High => &self.high_retry_tiers,
        }
    }

    /// Of the tiers returning to `lane`'s queue, the shortest that waits at
    /// least `delay`, else the longest.
    pub fn tier_for(&self, lane: Lane, delay: Duration) -> &RetryTier {
        let tiers = self.tiers(lane);
        tiers
            .iter()
            .find(|t| t.delay >= delay)
            .or(tiers.last())
            .expect("settings validation keeps at least one tier")
    }
}

/// `5s`, `2m`, `1h`, or `250ms`: part of a tier queue's name.
fn tier_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    match ms {
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// A live connection and its publishing channel.
#[derive(Clone)]
struct Session {
    connection: Arc<Connection>,
    publisher: Channel,
}

impl Session {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

/// A connection attempt, shared by everyone waiting for it.
type Attempt = Shared<BoxFuture<'static, Result<Session, QueueError>>>;

struct Inner {
    /// The broker's nodes (`amqp.urls`, or `amqp.url` alone), each with its
    /// `host:port` for messages (the URL holds a password).
    nodes: Vec<(SecretString, String)>,
    /// The node the next attempt tries first: the one after the node last
    /// connected to, so that when a node dies the survivors are tried
    /// before it.
    next_node: std::sync::atomic::AtomicUsize,
    topology: Topology,
    /// Deliveries the broker may push to a subscription of the command
    /// queue before they are acked, and of the high queue.
    prefetch: u16,
    high_prefetch: u16,
    /// Longest wait for a publish and its confirm, the wait for a
    /// connection included.
    confirm_timeout: Duration,
    /// Longest a connection attempt (handshake and topology) or a
    /// subscription's set-up may take.
    connect_timeout: Duration,
    current: RwLock<Option<Session>>,
    /// The connection attempt under way, if any: one at a time, so a dead
    /// connection is replaced once, and in a task of its own, so a caller
    /// that stops waiting does not cancel it for the others.
    connecting: Mutex<Option<Attempt>>,
    /// The first [`QueueError::Conflict`] met declaring the topology: the
    /// service cannot work until the operator acts ([`RabbitMq::conflict`]).
    conflict: tokio::sync::watch::Sender<Option<String>>,
}

/// The broker: command queue, events, dead letters.
#[derive(Clone)]
pub struct RabbitMq {
    inner: Arc<Inner>,
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// A failed connect, naming the broker and, when it refused, its reason
/// (`ACCESS_REFUSED - Login was refused ...`), never the URL's password.
fn connect_error(address: &str, e: &lapin::Error) -> QueueError {
    let reason = match e.kind() {
        lapin::ErrorKind::ProtocolError(refusal) => refusal.get_message().to_string(),
        _ => e.to_string(),
    };
    QueueError::Unavailable(format!("cannot connect to RabbitMQ at {address}: {reason}"))
}

/// `host:port` of an AMQP URL, without its user name or password.
fn broker_address(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => {
            let port = parsed.port().unwrap_or(if parsed.scheme() == "amqps" {
                5671
            } else {
                5672
            });
            format!("{}:{port}", parsed.host_str().unwrap_or("?"))
        }
        Err(_) => "?".to_owned(),
    }
}

/// Messages ready in the command, high and dead-letter queues, and held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepths {
    pub commands: u32,
    pub high_commands: u32,
    pub dead_letters: u32,
    /// In all the hold queues together: commands parked until they are due.
    pub held: u64,
}

impl RabbitMq {
    /// Makes the adapter; nothing connects until first use. The high
    /// queue's subscriptions get `amqp.prefetch` too: see
    /// [`Self::with_high_prefetch`].
    pub fn new(settings: &AmqpSettings, retry_tiers: &[Duration]) -> Self {
        Self::with_high_prefetch(settings, retry_tiers, settings.prefetch)
    }

    /// As [`Self::new`], with `high_prefetch` the prefetch of the high
    /// queue's subscriptions (the service's `processing.high_max_in_flight`).
    pub fn with_high_prefetch(
        settings: &AmqpSettings,
        retry_tiers: &[Duration],
        high_prefetch: u16,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                nodes: settings
                    .node_urls()
                    .into_iter()
                    .map(|url| {
                        let address = broker_address(url.expose_secret());
                        (url, address)
                    })
                    .collect(),
                next_node: std::sync::atomic::AtomicUsize::new(0),
                topology: Topology::new(settings, retry_tiers),
                prefetch: settings.prefetch,
                high_prefetch,
                confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
                connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
                current: RwLock::new(None),
                connecting: Mutex::new(None),
                conflict: tokio::sync::watch::channel(None).0,
            }),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Resolves when a connection found a queue declared otherwise than
    /// configured (a classic `sms.send` with `amqp.queue_type = "quorum"`),
    /// with the message for the operator. Retrying cannot help, so the
    /// service stops on it rather than reconnect forever.
    pub async fn conflict(&self) -> String {
        let mut seen = self.inner.conflict.subscribe();
        let found = seen
            .wait_for(Option::is_some)
            .await
            .map(|message| message.clone().unwrap_or_default());
        match found {
            Ok(message) => message,
            // The sender lives as long as `self`.
            Err(_) => std::future::pending().await,
        }
    }

    /// Reads the depth of the command, high, dead-letter and hold queues with a passive
    /// declare, on a channel of its own (a passive declare of a missing
    /// queue closes its channel). Uses the live connection only: never
    /// connects for this.
    pub async fn queue_depths(&self) -> Result<QueueDepths, QueueError> {
        let session = self
            .current()
            .ok_or_else(|| QueueError::Unavailable("not connected".into()))?;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let t = &self.inner.topology;
        let depths = async {
            let mut held = 0;
            for origin in t.consumed_queues() {
                for hop in &t.hold_hops {
                    let queue = Topology::hold_queue(origin, *hop);
                    held += u64::from(passive_count(&channel, &queue).await?);
                }
            }
            Ok(QueueDepths {
                commands: passive_count(&channel, &t.command_queue).await?,
                high_commands: passive_count(&channel, &t.high_queue).await?,
                dead_letters: passive_count(&channel, &t.dead_letter_queue).await?,
                held,
            })
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        depths
    }

    /// Connects now (declaring the topology) rather than on first use.
    pub async fn connect(&self) -> Result<(), QueueError> {
        self.session().await.map(drop)
    }

    fn current(&self) -> Option<Session> {
        let guard = self.inner.current.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().filter(|s| s.healthy()).cloned()
    }

    /// The live session, or the one the attempt under way (started now if
    /// there is none) brings. Bounded by that attempt's
    /// `amqp.connect_timeout_ms`; callers with a shorter budget bound it
    /// themselves.
    async fn session(&self) -> Result<Session, QueueError> {
        if let Some(session) = self.current() {
            return Ok(session);
        }
        let attempt = {
            let mut connecting = self
                .inner
                .connecting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(session) = self.current() {
                return Ok(session);
            }
            match connecting.as_ref() {
                Some(attempt) if attempt.peek().is_none() => attempt.clone(),
                _ => {
                    let inner = self.inner.clone();
                    let task = tokio::spawn(async move { inner.connect().await });
                    let attempt = async move { task.await.unwrap_or_else(|e| Err(unavailable(e))) }
                        .boxed()
                        .shared();
                    *connecting = Some(attempt.clone());
                    attempt
                }
            }
        };
        attempt.await
    }

    /// Publishes with `mandatory` and waits for the confirm. A Nack or a
    /// returned (unroutable) message is an error, and so is no connection
    /// and confirm within `amqp.confirm_timeout_ms`.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        // A broker under a memory or disk alarm stops reading, and one that
        // hangs can hold a reconnect: never wait for it past the lease's
        // budget, whatever the wait is for.
        let deadline = Instant::now() + self.inner.confirm_timeout;
        let session = tokio::time::timeout_at(deadline, self.session())
            .await
            .map_err(|_| {
                QueueError::Unavailable("no connection within amqp.confirm_timeout_ms".into())
            })??;
        let publish = async {
            session
                .publisher
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await
                .map_err(unavailable)?
                .await
                .map_err(|e| QueueError::NotConfirmed(e.to_string()))
        };
        let confirm = tokio::time::timeout_at(deadline, publish)
            .await
            .map_err(|_| {
                QueueError::NotConfirmed("no confirm within amqp.confirm_timeout_ms".into())
            })??;
        let target = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            // Dropped unread: the body may hold a phone number.
            Confirmation::Ack(Some(returned)) => Err(QueueError::Unroutable(format!(
                "{target} ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(QueueError::NotConfirmed(format!("{target}: nack"))),
            Confirmation::NotRequested => Err(QueueError::NotConfirmed("confirms off".into())),
        }
    }

    /// Publishes `event` on its kind's exchange, with confirm.
    async fn publish_event<E: Event + Sync>(
        &self,
        event: &E,
        meta: &EventMeta,
    ) -> Result<(), QueueError> {
        let body = serde_json::to_vec(event).expect("events always serialise");
        let exchange = self.inner.topology.exchange(E::KIND);
        let properties = event_properties(E::KIND.type_name(), &event.message_id(), meta);
        self.publish(exchange, "", &body, properties).await
    }
}

impl Inner {
    /// One connection attempt: each node in turn (from
    /// [`Inner::next_node`]) until one accepts, each bounded by
    /// `amqp.connect_timeout_ms`; the session it makes becomes the current
    /// one. A conflict in the topology ends the attempt at once: every node
    /// of a cluster would say the same.
    async fn connect(&self) -> Result<Session, QueueError> {
        use std::sync::atomic::Ordering;
        let count = self.nodes.len();
        let first = self.next_node.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for i in (0..count).map(|k| (first + k) % count) {
            let (url, address) = &self.nodes[i];
            match self.connect_to(url, address).await {
                Ok(session) => {
                    self.next_node.store((i + 1) % count, Ordering::Relaxed);
                    if count > 1 {
                        info!(node = %address, "connected to RabbitMQ; topology declared");
                    } else {
                        info!("connected to RabbitMQ; topology declared");
                    }
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                        Some(session.clone());
                    return Ok(session);
                }
                Err(QueueError::Conflict(message)) => {
                    self.conflict.send_if_modified(|seen| {
                        seen.get_or_insert_with(|| message.clone());
                        true
                    });
                    return Err(QueueError::Conflict(message));
                }
                Err(e) if count == 1 => return Err(e),
                Err(e) => {
                    warn!(node = %address, error = %e, "RabbitMQ node unavailable; trying the next");
                    failures.push(e.to_string());
                }
            }
        }
        Err(QueueError::Unavailable(format!(
            "no RabbitMQ node of amqp.urls answers: {}",
            failures.join("; ")
        )))
    }

    /// One node, bounded by `amqp.connect_timeout_ms`.
    async fn connect_to(&self, url: &SecretString, address: &str) -> Result<Session, QueueError> {
        let sockets = Arc::new(Sockets::default());
        let open = self.open(url, address, &sockets);
        let session = match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(result) => result?,
            Err(_) => {
                sockets.abandon();
                return Err(QueueError::Unavailable(format!(
                    "{address}: no answer within amqp.connect_timeout_ms"
                )));
            }
        };
        sockets.hand_over();
        Ok(session)
    }

    async fn open(
        &self,
        url: &SecretString,
        address: &str,
        sockets: &Arc<Sockets>,
    ) -> Result<Session, QueueError> {
        // lapin's own parse error never echoes the URL.
        let uri: AMQPUri = url.expose_secret().parse().map_err(unavailable)?;
        let runtime = lapin::runtime::default_runtime().map_err(unavailable)?;
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from("sms-service"));
        let sockets = sockets.clone();
        // lapin's own connect, but with a socket the attempt can close.
        let connect = async move |uri: AMQPUri, _| {
            let stream =
                tokio::net::TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
                    .await?;
            stream.set_nodelay(true)?;
            let stream = sockets.track(stream)?;
            let stream = AsyncTcpStream::Plain(stream.compat());
            Ok(match uri.scheme {
                AMQPScheme::AMQP => stream,
                AMQPScheme::AMQPS => {
                    stream
                        .into_tls(&uri.authority.host, TLSConfig::default())
                        .await?
                }
            })
        };
        let connection = Connection::connector(uri, runtime, connect, properties)
            .await
            .map_err(|e| connect_error(address, &e))?;
        let publisher = connection.create_channel().await.map_err(unavailable)?;
        declare_topology(&publisher, &self.topology).await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        Ok(Session {
            connection: Arc::new(connection),
            publisher,
        })
    }
}

/// The sockets of one connection attempt. lapin reads a socket from a
/// thread of its own until the peer closes it, which a broker that never
/// answers never does: an attempt given up on shuts its sockets down, or
/// every retry would leave a thread and a socket behind.
#[derive(Default)]
struct Sockets(Mutex<SocketsState>);

enum SocketsState {
    /// Connecting: a second handle to each socket, to shut it down with.
    Tracking(Vec<std::net::TcpStream>),
    /// Connected: the handles are dropped (lapin's closes the socket).
    HandedOver,
    /// Given up: sockets are shut down, and no new one is opened.
    Abandoned,
}

impl Default for SocketsState {
    fn default() -> Self {
        Self::Tracking(Vec::new())
    }
}

impl Sockets {
    fn state(&self) -> std::sync::MutexGuard<'_, SocketsState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a second handle to `stream` while the attempt lasts.
    fn track(&self, stream: tokio::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
        let stream = stream.into_std()?;
        match &mut *self.state() {
            SocketsState::Tracking(handles) => handles.push(stream.try_clone()?),
            SocketsState::HandedOver => {}
            SocketsState::Abandoned => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
        }
        tokio::net::TcpStream::from_std(stream)
    }

    fn hand_over(&self) {
        *self.state() = SocketsState::HandedOver;
    }

    fn abandon(&self) {
        let state = std::mem::replace(&mut *self.state(), SocketsState::Abandoned);
        if let SocketsState::Tracking(handles) = state {
            for handle in handles {
                let _ = handle.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Messages ready in `queue`, from a passive declare.
async fn passive_count(channel: &Channel, queue: &str) -> Result<u32, QueueError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .map_err(unavailable)
}

/// Declares the contract's topology; declaring again is a no-op. A queue
/// that exists with other arguments (another type, most often) is a
/// [`QueueError::Conflict`] naming it: retrying cannot help.
async fn declare_topology(channel: &Channel, t: &Topology) -> Result<(), QueueError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for queue in t.queues() {
        channel
            .queue_declare(queue.name.as_str().into(), durable, queue.arguments)
            .await
            .map_err(|e| declare_error(&queue.name, t.queue_type, &e))?;
    }
    for (_, exchange) in &t.exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// A failed declare of `queue`: the broker's 406 PRECONDITION_FAILED (the
/// queue exists with other arguments) is a conflict the operator must
/// resolve; anything else is the broker being away.
fn declare_error(queue: &str, configured: QueueType, e: &lapin::Error) -> QueueError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(refusal) if refusal.get_id() == 406 => {
            QueueError::Conflict(conflict_message(
                queue,
                configured,
                refusal.get_message().as_str(),
            ))
        }
        _ => unavailable(e),
    }
}

/// What to tell the operator about a queue that exists with other
/// arguments than configured, from the broker's reply, such as
/// `PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue
/// 'sms.send' in vhost '/': received none but current is the value
/// 'quorum' of type 'longstr'` (a classic declare of a quorum queue).
pub fn conflict_message(queue: &str, configured: QueueType, reply: &str) -> String {
    let fix = "README, \"Changing amqp.queue_type\": new queues on a new vhost, the old ones shovelled over";
    if reply.contains("'x-queue-type'") {
        // `current is none`: a queue declared without a type, classic.
        let existing = reply
            .split("current is the value '")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap_or("classic");
        format!(
            "queue {queue:?} exists as a {existing} queue but amqp.queue_type is \"{}\": \
             the type of an existing queue cannot change. Either set amqp.queue_type = \"{existing}\" \
             again, or move to queues of the new type ({fix}). Broker: {reply}",
            configured.as_str()
        )
    } else {
        format!(
            "queue {queue:?} exists with other arguments than this configuration declares \
             (amqp.queue_type \"{}\", amqp.delivery_limit, the delay tiers' and hold queues' waits): \
             a queue's arguments cannot change. Either restore the settings it was declared with, \
             or move its messages and delete it ({fix}). Broker: {reply}",
            configured.as_str()
        )
    }
}

/// Properties every message the service publishes carries: JSON,
/// persistent, and the command's correlation id and trace context.
fn traced_properties(meta: &EventMeta) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(correlation_id) = &meta.correlation_id {
        properties = properties.with_correlation_id(correlation_id.as_str().into());
    }
    let mut headers = FieldTable::default();
    // The command's own trace headers, passed on when no trace is
    // recorded here; the current span's replace them when one is.
    let passed_on = [
        ("traceparent", &meta.traceparent),
        ("tracestate", &meta.tracestate),
    ];
    for (name, value) in passed_on {
        if let Some(value) = value {
            headers.insert(name.into(), AMQPValue::LongString(value.as_str().into()));
        }
    }
    stamp_trace(&mut headers);
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    properties
}

/// Writes the W3C trace context of the current span (the publish of a
/// command's event, delay or dead letter, in the command's trace) over
/// the trace headers in `headers`, when traces are recorded; otherwise
/// they stay as they are (the command's own, passed on).
pub(super) fn stamp_trace(headers: &mut FieldTable) {
    let current = crate::telemetry::trace_headers();
    if current.is_empty() {
        return;
    }
    // A tracestate belongs to its traceparent: the old one goes with it.
    if headers.contains_key("tracestate") {
        let mut rest = headers.inner().clone();
        rest.remove("tracestate");
        *headers = FieldTable::from(rest);
    }
    for (name, value) in current {
        headers.insert(name.into(), AMQPValue::LongString(value.into()));
    }
}

/// Properties of an event: also typed, keyed and timestamped.
fn event_properties(kind: &str, message_id: &str, meta: &EventMeta) -> BasicProperties {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    traced_properties(meta)
        .with_type(kind.into())
        .with_message_id(message_id.into())
        .with_timestamp(now)
}

#[async_trait]
impl QueueClient for RabbitMq {
    async fn consume(&self, lane: Lane) -> Result<Box<dyn DeliveryStream>, QueueError> {
        let session = self.session().await?;
        let prefetch = match lane {
            Lane::Normal => self.inner.prefetch,
            Lane::High => self.inner.high_prefetch,
        };
        let subscribe = async {
            let channel = session
                .connection
                .create_channel()
                .await
                .map_err(unavailable)?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(unavailable)?;
            let consumer = channel
                .basic_consume(
                    self.inner.topology.queue(lane).into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            Ok::<_, QueueError>((consumer, channel))
        };
        let (consumer, channel) = tokio::time::timeout(self.inner.connect_timeout, subscribe)
            .await
            .map_err(|_| {
                QueueError::Unavailable("no subscription within amqp.connect_timeout_ms".into())
            })??;
        Ok(Box::new(RabbitStream::new(
            consumer,
            channel,
            self.clone(),
            lane,
        )))
    }

    async fn publish_command(
        &self,
        body: &[u8],
        meta: &EventMeta,
        lane: Lane,
    ) -> Result<(), QueueError> {
        let queue = self.inner.topology.queue(lane).to_owned();
        self.publish("", &queue, body, traced_properties(meta))
            .await
    }

    fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    async fn close(&self) {
        let session = self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session {
            if let Err(e) = session.connection.close(200, "OK".into()).await {
                warn!(error = %e, "closing the broker connection failed");
            }
        }
    }
}

#[async_trait]
impl EventBus for RabbitMq {
    async fn publish_sent(&self, event: &SmsSent, meta: &EventMeta) -> Result<(), QueueError> {
        self.publish_event(event, meta).await
    }

    async fn publish_failed(&self, event: &SmsFailed, meta: &EventMeta) -> Result<(), QueueError> {
        self.publish_event(event, meta).await
    }

    async fn publish_delivery(&self, report: &DeliveryReport) -> Result<(), QueueError> {
        self.publish_event(report, &EventMeta::default()).await
    }
}

/// Cancels a subscription; errors mean the channel is gone anyway.
async fn cancel(channel: &Channel, tag: ShortString) {
    if let Err(e) = channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await
    {
        warn!(error = %e, "cancelling the subscription failed");
    }
}

/// The dead-letter queue's `x-delivery-limit` on quorum queues: far more
/// deliveries than any reading of it makes (see [`Topology::queues`]).
const DEAD_LETTER_DELIVERY_LIMIT: i64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quorum_dead_letter_queue_has_a_delivery_limit_no_reading_of_it_reaches() {
        let settings = crate::config::Settings::load_from(
            None,
            crate::config::environment().source(Some(
                [("SMS__AMQP__QUEUE_TYPE".to_owned(), "quorum".to_owned())].into(),
            )),
        )
        .unwrap();
        let t = Topology::new(&settings.amqp, &settings.retry_tiers());
        let queues = t.queues();
        let dead = &queues
            .iter()
            .find(|q| q.name == "sms.send.dead")
            .unwrap()
            .arguments;
        assert_eq!(
            dead.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT))
        );
        // Classic: declared as before, with no arguments.
        let classic = default_topology().queues();
        assert!(classic[0].arguments.inner().is_empty());
    }

    fn topology(hops_ms: &[u64]) -> Topology {
        let env = [(
            "SMS__AMQP__HOLD_HOPS_MS",
            hops_ms
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )];
        let map: std::collections::HashMap<String, String> =
            env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let settings = crate::config::Settings::load_from(
            None,
            crate::config::environment().source(Some(map)),
        )
        .unwrap();
        Topology::new(&settings.amqp, &settings.retry_tiers())
    }

    fn default_topology() -> Topology {
        let settings = crate::config::Settings::load_from(
            None,
            crate::config::environment().source(Some(Default::default())),
        )
        .unwrap();
        Topology::new(&settings.amqp, &settings.retry_tiers())
    }

    #[test]
    fn each_consumed_queue_has_a_hold_queue_per_wait_named_after_it() {
        let t = topology(&[60_000, 1000, 1000, 250]);
        assert_eq!(
            t.hold_hops,
            [250, 1000, 60_000].map(Duration::from_millis),
            "sorted, each once"
        );
        let names: Vec<String> = t
            .consumed_queues()
            .into_iter()
            .flat_map(|q| t.hold_hops.iter().map(move |h| Topology::hold_queue(q, *h)))
            .collect();
        assert_eq!(
            names,
            [
                "sms.send.hold.250ms",
                "sms.send.hold.1s",
                "sms.send.hold.1m",
                "sms.send.high.hold.250ms",
                "sms.send.high.hold.1s",
                "sms.send.high.hold.1m"
            ]
        );
    }

    #[test]
    fn a_hold_queue_expires_all_its_messages_after_its_wait_back_into_its_origin() {
        let t = topology(&[10_000]);
        let arguments = t
            .queues()
            .into_iter()
            .find(|q| q.name == "sms.send.high.hold.10s")
            .unwrap()
            .arguments;
        let get = |name: &str| arguments.inner().get(name).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(10_000)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("".into()))
        );
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("sms.send.high".into()))
        );
        // Nothing that could drop or reorder a held command.
        assert_eq!(arguments.inner().len(), 3, "{arguments:?}");
    }

    #[test]
    fn a_hold_never_ends_before_the_command_is_due_and_at_most_the_shortest_wait_after() {
        let t = default_topology();
        let shortest = Duration::from_secs(1);
        let (mut hops_for_30_days, mut hops_for_4_minutes) = (0, 0);
        for left_ms in [
            0,
            1,
            999,
            1000,
            1001,
            9_999,
            10_000,
            61_500,
            3_000,
            239_700,
            599_999,
            3_600_000,
            3 * 3_600_000 + 7,
            30 * 86_400_000,
        ] {
            let left = Duration::from_millis(left_ms);
            let hop = t.hop_for(left);
            assert!(hop <= left + shortest, "{left:?}: {hop:?}");
            // Held hop after hop, examined on each return, until due.
            let (mut waited, mut hops) = (Duration::ZERO, 0);
            while waited < left {
                waited += t.hop_for(left - waited);
                hops += 1;
            }
            assert!(waited - left < shortest, "{left:?}: {waited:?}");
            match left_ms {
                2_592_000_000 => hops_for_30_days = hops,
                239_700 => hops_for_4_minutes = hops,
                _ => {}
            }
        }
        assert_eq!(hops_for_30_days, 90, "90 hops of 8 h");
        assert_eq!(hops_for_4_minutes, 2, "3 min, then 1 min (0.3 s late)");
    }
}

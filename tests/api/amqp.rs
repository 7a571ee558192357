//! The RabbitMQ adapter where the broker misbehaves or a producer lies: a
//! broker that accepts TCP and never speaks AMQP, a connection that dies
//! with deliveries still buffered, and retry headers a producer set itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use sms_service::adapters::rabbitmq::RabbitMq;
use sms_service::ports::{
    DeliveryStream, EventMeta, InboundMessage, Lane, QueueClient, QueueError, RetryState,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{command, init_logs, settings, spawn_app, Names, TestBroker};
use crate::proxy::Proxy;

/// Accepts TCP connections and never says a word, as a hung broker or a
/// proxy with nothing behind it does. Counts the connections it accepted
/// and those the client closed.
struct SilentBroker {
    url: String,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentBroker {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("amqp://guest:guest@{}/%2f", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (accepted, closed) = (accepted.clone(), closed.clone());
            async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let closed = closed.clone();
                    tokio::spawn(async move {
                        let mut buffer = [0; 1024];
                        while let Ok(n) = socket.read(&mut buffer).await {
                            if n == 0 {
                                break;
                            }
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self {
            url,
            accepted,
            closed,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for SilentBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The adapter for `names`, with the broker at `url` and `extra` settings.
fn adapter(names: &Names, url: &str, extra: &[(&str, &str)]) -> RabbitMq {
    init_logs();
    let mut env = names.env("http://127.0.0.1:1");
    env.push(("SMS__AMQP__URL".into(), url.into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = settings(&env);
    RabbitMq::new(&settings.amqp, &settings.retry_tiers())
}

/// The next delivery, within a few seconds.
async fn next(stream: &mut dyn DeliveryStream) -> InboundMessage {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the subscription goes on")
        .expect("a delivery, not an error")
}

async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_broker_that_never_answers_is_given_up_on_after_the_connect_timeout_and_its_socket_closed(
) {
    let silent = SilentBroker::start().await;
    let rabbit = adapter(
        &Names::unique(),
        &silent.url,
        &[("SMS__AMQP__CONNECT_TIMEOUT_MS", "500")],
    );
    let started = Instant::now();
    let subscribed = tokio::time::timeout(Duration::from_secs(5), rabbit.consume(Lane::Normal))
        .await
        .expect("consume() gives up instead of hanging");
    assert!(
        matches!(subscribed.err(), Some(QueueError::Unavailable(_))),
        "a silent broker is unavailable"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let published = tokio::time::timeout(
        Duration::from_secs(5),
        rabbit.publish_command(b"{}", &EventMeta::default(), Lane::Normal),
    )
    .await
    .expect("publish gives up instead of hanging");
    assert!(published.is_err());
    // Each attempt's socket is closed, not left to lapin's IO thread.
    assert!(silent.accepted() >= 2, "publish tried again");
    eventually(
        "every attempt's socket closed",
        Duration::from_secs(3),
        || silent.closed() == silent.accepted(),
    )
    .await;
}

#[tokio::test]
async fn a_publish_waits_for_a_hung_reconnect_no_longer_than_its_confirm_timeout() {
    let silent = SilentBroker::start().await;
    let rabbit = adapter(
        &Names::unique(),
        &silent.url,
        &[
            ("SMS__AMQP__CONNECT_TIMEOUT_MS", "20000"),
            ("SMS__AMQP__CONFIRM_TIMEOUT_MS", "500"),
        ],
    );
    // The subscription's reconnect hangs on the silent broker...
    let subscribing = tokio::spawn({
        let rabbit = rabbit.clone();
        async move { rabbit.consume(Lane::Normal).await.is_ok() }
    });
    eventually("a connection attempt", Duration::from_secs(3), || {
        silent.accepted() == 1
    })
    .await;
    // ...and publishes meanwhile wait for it only within their own budget.
    for _ in 0..2 {
        let started = Instant::now();
        let published = tokio::time::timeout(
            Duration::from_secs(5),
            rabbit.publish_command(b"{}", &EventMeta::default(), Lane::Normal),
        )
        .await
        .expect("publish returns while the reconnect hangs");
        assert!(
            matches!(published, Err(QueueError::Unavailable(_))),
            "{published:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));
    }
    assert_eq!(silent.accepted(), 1, "one reconnect, shared by everyone");
    subscribing.abort();
}

#[tokio::test]
async fn deliveries_buffered_on_a_channel_that_died_are_dropped_not_processed() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let rabbit = adapter(&names, &url, &[]);
    rabbit.connect().await.unwrap();
    broker.publish_many("buffered-", 5).await;
    let mut stream = rabbit.consume(Lane::Normal).await.unwrap();
    let first = next(stream.as_mut()).await;
    assert!(!first.body.is_empty());
    // The other four are pushed to the consumer and wait in its buffer.
    for _ in 0..100 {
        if broker.commands_waiting().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(broker.commands_waiting().await, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    eventually("the connection seen dead", Duration::from_secs(5), || {
        !rabbit.is_connected()
    })
    .await;
    // The broker has them back; processing them here would race whoever
    // gets them next, with acks that can never be sent.
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    assert!(
        !matches!(next, Ok(Some(Ok(_)))),
        "a delivery of the dead channel came out"
    );
    drop(first);
    stream.close().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_command_back_from_a_delay_tier_keeps_its_retry_state() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let rabbit = adapter(&names, crate::helpers::AMQP_URL, &[]);
    rabbit.connect().await.unwrap();
    broker.publish_many("tier-", 1).await;
    let mut stream = rabbit.consume(Lane::Normal).await.unwrap();
    let mut message = next(stream.as_mut()).await;
    assert_eq!(message.retry, RetryState::default());
    let retry = RetryState {
        attempts: 2,
        delays: 1,
        first_attempt_at_ms: Some(1_700_000_000_000),
        pinned_provider: Some("at".into()),
    };
    message
        .handle
        .delay(&message.body, Duration::from_millis(100), &retry)
        .await
        .unwrap();
    let mut back = next(stream.as_mut()).await;
    assert_eq!(back.retry, retry, "the broker's x-death names the tier");
    back.handle.ack().await.unwrap();
    stream.close().await;
    rabbit.close().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_held_command_waits_as_a_persistent_message_in_a_durable_hold_queue_and_comes_back_to_its_queue(
) {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let rabbit = adapter(&names, crate::helpers::AMQP_URL, &[]);
    rabbit.connect().await.unwrap();
    broker.publish_many("held-", 1).await;
    let mut stream = rabbit.consume(Lane::Normal).await.unwrap();
    let mut message = next(stream.as_mut()).await;
    let held_at = Instant::now();
    let until = std::time::SystemTime::now() + Duration::from_millis(1500);
    message.handle.hold(&message.body, until).await.unwrap();
    // Off the command queue and out of the process: in the 1 s hold queue
    // (the longest wait that ends before it is due).
    let hold_queue = format!("{}.hold.1s", names.command_queue);
    let got = broker
        .channel
        .basic_get(
            hold_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("held in the 1 s hold queue");
    assert_eq!(got.delivery.data, message.body, "the body unchanged");
    assert_eq!(
        *got.delivery.properties.delivery_mode(),
        Some(2),
        "persistent: it survives a broker restart"
    );
    got.delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Durable, with these arguments: declaring it so again is accepted
    // (a differing declaration would close the channel).
    for hop_ms in [
        1000i64, 3000, 10_000, 30_000, 60_000, 180_000, 600_000, 1_800_000, 3_600_000, 10_800_000,
        28_800_000,
    ] {
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(hop_ms));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.command_queue.as_str().into()),
        );
        let label = match hop_ms {
            ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms => format!("{}s", ms / 1000),
        };
        let queue = format!("{}.hold.{label}", names.command_queue);
        broker
            .channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .unwrap_or_else(|e| panic!("{queue} is durable with the hold arguments: {e}"));
    }
    let mut back = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("back within 5 s")
        .unwrap()
        .unwrap();
    assert!(
        held_at.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        held_at.elapsed()
    );
    assert_eq!(back.body, message.body);
    assert_eq!(back.retry, RetryState::default(), "a hold counts no retry");
    back.handle.ack().await.unwrap();
    stream.close().await;
    rabbit.close().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_command_of_the_high_queue_handed_to_a_delay_tier_returns_to_the_high_queue() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let rabbit = adapter(&names, crate::helpers::AMQP_URL, &[]);
    rabbit.connect().await.unwrap();
    broker
        .publish_high(&command("high-tier-1", "+254712345678", "hi"))
        .await;
    let mut high = rabbit.consume(Lane::High).await.unwrap();
    let mut normal = rabbit.consume(Lane::Normal).await.unwrap();
    let mut message = next(high.as_mut()).await;
    let retry = RetryState {
        attempts: 2,
        delays: 1,
        first_attempt_at_ms: Some(1_700_000_000_000),
        pinned_provider: None,
    };
    message
        .handle
        .delay(&message.body, Duration::from_millis(100), &retry)
        .await
        .unwrap();
    // Back in the high queue, and its x-death names one of the high
    // queue's own tiers (else its retry state would not count).
    let mut back = next(high.as_mut()).await;
    assert_eq!(back.body, message.body);
    assert_eq!(back.retry, retry);
    back.handle.ack().await.unwrap();
    let stray = tokio::time::timeout(Duration::from_millis(300), normal.next()).await;
    assert!(stray.is_err(), "something reached the command queue");
    high.close().await;
    normal.close().await;
    rabbit.close().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn retry_headers_a_producer_set_do_not_count_as_attempts() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "ok"})))
        .expect(1)
        .mount(&app.provider)
        .await;
    let mut forged = FieldTable::default();
    forged.insert("x-sms-attempts".into(), AMQPValue::LongLongInt(999));
    forged.insert("x-sms-delays".into(), AMQPValue::LongLongInt(999));
    forged.insert("x-sms-first-attempt-ms".into(), AMQPValue::LongLongInt(1));
    app.broker
        .publish_command(
            &command("forged-attempts", "+254712345678", "hi"),
            BasicProperties::default().with_headers(forged),
        )
        .await;
    let sent = app.broker.sent(1, Duration::from_secs(10)).await;
    assert_eq!(sent.len(), 1, "sent, not failed as retries_exhausted");
    assert_eq!(sent[0].json()["attempts"], 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_dead_letter_reason_never_carries_a_full_phone_number() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let rabbit = adapter(&names, crate::helpers::AMQP_URL, &[]);
    rabbit.connect().await.unwrap();
    broker.publish_many("dead-", 1).await;
    let mut stream = rabbit.consume(Lane::Normal).await.unwrap();
    let mut message = next(stream.as_mut()).await;
    message
        .handle
        .dead_letter(
            &message.body,
            "provider_rejected: HTTP 400: The 'To' number +254798765432 is not valid",
        )
        .await
        .unwrap();
    let dead = broker.dead_letters(1, Duration::from_secs(5)).await;
    let reason = dead[0].header("x-sms-error").unwrap();
    assert!(!reason.contains("254798765432"), "{reason}");
    assert!(reason.contains("+********5432"), "{reason}");
    stream.close().await;
    rabbit.close().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn with_several_nodes_a_dead_first_node_is_skipped_and_a_lost_node_is_replaced_by_the_next() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    // Two "nodes" of one broker, each behind a proxy that can die, and a
    // first node that refuses everything.
    let (a, b) = (
        Proxy::start("127.0.0.1:5672").await,
        Proxy::start("127.0.0.1:5672").await,
    );
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = refused.local_addr().unwrap();
    drop(refused);
    let url = |addr: std::net::SocketAddr| format!("amqp://guest:guest@{addr}/%2f");
    let urls = [url(dead), url(a.addr), url(b.addr)].join(",");
    let rabbit = adapter(
        &names,
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &[("SMS__AMQP__URLS", urls.as_str())],
    );
    rabbit.connect().await.expect("the first node that answers");
    let body = command("nodes-1", "+254712345678", "hi");
    rabbit
        .publish_command(&body, &EventMeta::default(), Lane::Normal)
        .await
        .unwrap();
    // The connected node (a) dies and stays dead: the next publish
    // reconnects to b.
    a.cut();
    eventually(
        "the lost connection is noticed",
        Duration::from_secs(5),
        || !rabbit.is_connected(),
    )
    .await;
    rabbit
        .publish_command(&body, &EventMeta::default(), Lane::Normal)
        .await
        .expect("reconnected to the next node");
    assert!(rabbit.is_connected());
    assert_eq!(broker.commands_waiting().await, 2);
    // Every node dead: the error names each by host:port, never a password.
    b.cut();
    eventually(
        "the lost connection is noticed",
        Duration::from_secs(5),
        || !rabbit.is_connected(),
    )
    .await;
    let err = rabbit.connect().await.unwrap_err().to_string();
    for address in [dead, a.addr, b.addr] {
        assert!(err.contains(&address.to_string()), "{err}");
    }
    assert!(!err.contains("guest:guest"), "{err}");
    rabbit.close().await;
    broker.cleanup().await;
}

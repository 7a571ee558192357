//! `amqp.queue_type = "quorum"` on the real broker (RabbitMQ 3.10, one
//! node: a quorum queue of one member behaves as on a cluster): every queue
//! is declared a quorum queue, the delay tiers and hold queues still return
//! their commands (at-least-once dead-lettering), the broker's
//! `x-delivery-limit` dead-letters a command with a reason the operator
//! can read, and a queue of the other type stops the service with a clear
//! message instead of a reconnect loop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use sms_service::adapters::rabbitmq::RabbitMq;
use sms_service::ports::{
    DeliveryStream, InboundMessage, Lane, QueueClient, QueueError, RetryState,
};

use crate::helpers::{init_logs, settings, Names, TestBroker, AMQP_URL};

const BIN: &str = env!("CARGO_BIN_EXE_sms-service");

fn env(names: &Names, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = names.env("http://127.0.0.1:1");
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn quorum(names: &Names, extra: &[(&str, &str)]) -> RabbitMq {
    init_logs();
    let mut all = vec![("SMS__AMQP__QUEUE_TYPE", "quorum")];
    all.extend_from_slice(extra);
    let s = settings(&env(names, &all));
    RabbitMq::new(&s.amqp, &s.retry_tiers())
}

async fn next(stream: &mut dyn DeliveryStream) -> InboundMessage {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription goes on")
        .expect("a delivery, not an error")
}

/// The broker's answer to declaring `queue` durable with `arguments`:
/// `Ok` when they are the queue's own, the 406 reply otherwise.
async fn redeclare(queue: &str, arguments: FieldTable) -> Result<(), String> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let result = channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let _ = connection.close(200, "bye".into()).await;
    result
}

#[tokio::test]
async fn with_queue_type_quorum_every_queue_is_a_quorum_queue_and_tiers_and_holds_return_their_commands(
) {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let rabbit = quorum(&names, &[]);
    rabbit.connect().await.unwrap();
    // Each queue is exactly what the topology declares, a quorum queue:
    // the same arguments are accepted again, a classic declare is refused.
    let queues = rabbit.topology().queues();
    assert_eq!(queues.len(), 1 + 2 + 4 + 2 * 11, "{queues:?}");
    for queue in &queues {
        assert_eq!(
            queue.arguments.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into())),
            "{}",
            queue.name
        );
        redeclare(&queue.name, queue.arguments.clone())
            .await
            .unwrap();
        let refused = redeclare(&queue.name, FieldTable::default())
            .await
            .unwrap_err();
        assert!(
            refused.contains("PRECONDITION_FAILED"),
            "{}: {refused}",
            queue.name
        );
    }
    // A delay tier returns its command with its retry state (the broker's
    // x-death names the tier, as with classic queues).
    broker.publish_many("quorum-", 1).await;
    let mut stream = rabbit.consume(Lane::Normal).await.unwrap();
    let mut message = next(stream.as_mut()).await;
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
    let mut back = next(stream.as_mut()).await;
    assert_eq!(back.retry, retry, "back from the quorum tier");
    // A hold queue returns it after its wait (1 s, the shortest).
    let until = std::time::SystemTime::now() + Duration::from_millis(500);
    let held_at = Instant::now();
    back.handle.hold(&back.body, until).await.unwrap();
    let mut returned = next(stream.as_mut()).await;
    assert!(held_at.elapsed() >= Duration::from_millis(900));
    assert_eq!(returned.body, message.body);
    returned.handle.ack().await.unwrap();
    stream.close().await;
    rabbit.close().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_command_delivered_more_often_than_the_delivery_limit_is_dead_lettered_by_the_broker_with_a_readable_reason(
) {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let extra = [
        ("SMS__AMQP__DELIVERY_LIMIT", "2"),
        ("SMS__PROCESSING__MAX_REDELIVERIES", "1"),
    ];
    let rabbit = quorum(&names, &extra);
    rabbit.connect().await.unwrap();
    broker.publish_many("limit-", 1).await;
    let mut stream = rabbit.consume(Lane::Normal).await.unwrap();
    // Delivered once, then twice more on requeues: the third return is
    // past the limit of 2 and goes to the dead-letter queue.
    for _ in 0..3 {
        let mut message = next(stream.as_mut()).await;
        message.handle.requeue().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.waiting_in(&names.dead_letter_queue).await < 1 {
        assert!(Instant::now() < deadline, "dead-lettered by the broker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "not delivered again"
    );
    stream.close().await;
    rabbit.close().await;
    // The operator's listing says why.
    let mut all = vec![("SMS__AMQP__QUEUE_TYPE", "quorum")];
    all.extend_from_slice(&extra);
    let s = settings(&env(&names, &all));
    let listed = sms_service::dead_letters::list(&s, 10).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        listed[0].reason.starts_with("delivery_limit: ")
            && listed[0].reason.contains("amqp.delivery_limit")
            && listed[0].reason.contains(&names.command_queue),
        "{:?}",
        listed[0].reason
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn a_quorum_queue_where_classic_is_configured_is_a_conflict_naming_it_not_a_retry() {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    quorum(&names, &[]).connect().await.unwrap();
    init_logs();
    let s = settings(&env(&names, &[]));
    let classic = RabbitMq::new(&s.amqp, &s.retry_tiers());
    let Err(QueueError::Conflict(message)) = classic.connect().await else {
        panic!("a conflict");
    };
    for part in [
        format!(
            "queue {:?} exists as a quorum queue",
            names.dead_letter_queue
        ),
        "amqp.queue_type is \"classic\"".to_owned(),
        "Changing amqp.queue_type".to_owned(),
    ] {
        assert!(message.contains(&part), "{part}: {message}");
    }
    let said = tokio::time::timeout(Duration::from_secs(1), classic.conflict())
        .await
        .expect("the conflict is signalled");
    assert_eq!(said, message);
    broker.cleanup().await;
}

#[tokio::test]
async fn the_service_finding_classic_queues_with_queue_type_quorum_exits_once_with_the_migration_not_a_crash_loop(
) {
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    // The queues as a classic deployment left them.
    let s = settings(&env(&names, &[]));
    let classic = RabbitMq::new(&s.amqp, &s.retry_tiers());
    classic.connect().await.unwrap();
    classic.close().await;
    let started = Instant::now();
    let output = tokio::task::spawn_blocking({
        let env = env(&names, &[("SMS__AMQP__QUEUE_TYPE", "quorum")]);
        move || {
            Command::new(BIN)
                .arg("run")
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(env)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    for part in [
        "error: ",
        &format!(
            "queue {:?} exists as a classic queue",
            names.dead_letter_queue
        ),
        "amqp.queue_type is \"quorum\"",
        "set amqp.queue_type = \"classic\"",
        "Changing amqp.queue_type",
        "PRECONDITION_FAILED",
    ] {
        assert!(last.contains(part), "{part}: {stderr}");
    }
    // Nothing was changed: the classic queues are still there, still classic.
    assert!(redeclare(&names.dead_letter_queue, FieldTable::default())
        .await
        .is_ok());
    broker.cleanup().await;
}

//! Priority through the real broker: `high` commands have a queue of their
//! own (`<command_queue>.high`) consumed with capacity of its own, so they
//! overtake a backlog of the command queue; a retried one comes back to
//! the high queue; the HTTP door routes by the field; shutdown settles
//! both queues. Overtaking is shown by the order of the events, against a
//! provider too slow to drain the backlog meanwhile.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use serde_json::json;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{spawn_app_with, Received, TestApp};

const WAIT: Duration = Duration::from_secs(20);

/// A command body with `priority`.
fn command(key: &str, phone: &str, priority: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "idempotencyKey": key,
        "phoneNumber": phone,
        "text": "Your code is 4711",
        "priority": priority,
    }))
    .unwrap()
}

/// The provider accepts every call after `delay`.
async fn provider_answers_after(app: &TestApp, delay: Duration) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "msg"}))
                .set_delay(delay),
        )
        .mount(&app.provider)
        .await;
}

/// The keys of `events`, in the order they were published.
fn keys(events: &[Received]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.json()["idempotencyKey"].as_str().unwrap().to_owned())
        .collect()
}

/// Where `key` came in `keys`, asserted to be at most `most` (from 0).
fn came_within(keys: &[String], key: &str, most: usize) -> usize {
    let at = keys
        .iter()
        .position(|k| k == key)
        .unwrap_or_else(|| panic!("no SmsSent for {key}: {keys:?}"));
    assert!(at <= most, "{key} came {at}th (at most {most}): {keys:?}");
    at
}

/// A service that works on one command of the command queue at a time.
async fn one_at_a_time() -> TestApp {
    spawn_app_with(&[
        ("SMS__AMQP__PREFETCH", "1"),
        ("SMS__PROCESSING__MAX_IN_FLIGHT", "1"),
        ("SMS__PROCESSING__ADAPTIVE_SENDS", "false"),
    ])
    .await
}

#[tokio::test]
async fn a_high_command_overtakes_a_backlog_the_provider_cannot_drain() {
    let mut app = spawn_app_with(&[
        ("SMS__AMQP__PREFETCH", "4"),
        ("SMS__PROCESSING__MAX_IN_FLIGHT", "4"),
        ("SMS__PROCESSING__ADAPTIVE_SENDS", "false"),
    ])
    .await;
    // 30 commands, 4 at a time, 300 ms each: about 2.3 s of backlog.
    provider_answers_after(&app, Duration::from_millis(300)).await;
    for i in 0..30 {
        let body = command(&format!("bulk-{i}"), "+254712345678", "bulk");
        app.publish(&body).await;
    }
    // The service is busy with the backlog before the high command comes.
    let mut sent = app.broker.sent(1, WAIT).await;
    app.broker
        .publish_high(&command("otp-1", "+254712345679", "high"))
        .await;
    sent.extend(app.broker.sent(30, WAIT).await);
    let order = keys(&sent);
    assert_eq!(order.len(), 31, "{order:?}");
    // Published last, behind 29 waiting commands; sent about one provider
    // call after it was published, while most of the backlog still waits.
    let high = came_within(&order, "otp-1", 10);
    assert_eq!(sent[high].json()["attempts"], 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_high_command_retried_through_a_delay_tier_comes_back_to_the_high_queue() {
    let mut app = one_at_a_time().await;
    // Its first two calls fail (the delivery's in-process attempts), so it
    // goes to a delay tier; the third goes through.
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(body_partial_json(json!({"to": "+254712345679"})))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&app.provider)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(body_partial_json(json!({"to": "+254712345679"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "otp"})))
        .with_priority(2)
        .mount(&app.provider)
        .await;
    provider_answers_after(&app, Duration::from_millis(1000)).await;
    for i in 0..5 {
        let body = command(&format!("bulk-{i}"), "+254712345678", "bulk");
        app.publish(&body).await;
    }
    app.broker
        .publish_high(&command("otp-1", "+254712345679", "high"))
        .await;
    let sent = app.broker.sent(6, WAIT).await;
    let order = keys(&sent);
    // Back in the command queue it would wait behind four commands of a
    // second each; back in the high queue it is sent within the first.
    let high = came_within(&order, "otp-1", 1);
    assert_eq!(sent[high].json()["attempts"], 3);
    app.cleanup().await;
}

#[tokio::test]
async fn the_http_door_publishes_high_commands_to_the_high_queue() {
    let mut app = one_at_a_time().await;
    provider_answers_after(&app, Duration::from_millis(700)).await;
    let url = format!("{}/v1/messages", app.base_url);
    let post = |body: Vec<u8>| {
        app.http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for i in 0..4 {
        let body = command(&format!("door-{i}"), "+254712345678", "normal");
        assert_eq!(post(body).await.unwrap().status(), 202);
    }
    let body = command("door-otp", "+254712345679", "high");
    assert_eq!(post(body).await.unwrap().status(), 202);
    let order = keys(&app.broker.sent(5, WAIT).await);
    // Published last through the door; in the command queue it would come
    // fifth, 2.8 s later.
    came_within(&order, "door-otp", 1);
    app.cleanup().await;
}

/// The keys of the commands still in `queue`, taken out of it.
async fn take_all(app: &TestApp, queue: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    while let Some(message) = app
        .broker
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        keys.insert(body["idempotencyKey"].as_str().unwrap().to_owned());
    }
    keys
}

#[tokio::test]
async fn shutdown_leaves_each_command_of_either_queue_sent_or_back_in_its_queue() {
    let mut app = spawn_app_with(&[
        ("SMS__AMQP__PREFETCH", "2"),
        ("SMS__PROCESSING__MAX_IN_FLIGHT", "2"),
        ("SMS__PROCESSING__HIGH_MAX_IN_FLIGHT", "2"),
        ("SMS__PROCESSING__ADAPTIVE_SENDS", "false"),
    ])
    .await;
    provider_answers_after(&app, Duration::from_millis(800)).await;
    let mut normal = BTreeSet::new();
    let mut high = BTreeSet::new();
    for i in 0..6 {
        let key = format!("bulk-{i}");
        app.publish(&command(&key, "+254712345678", "bulk")).await;
        normal.insert(key);
        let key = format!("otp-{i}");
        app.broker
            .publish_high(&command(&key, "+254712345679", "high"))
            .await;
        high.insert(key);
    }
    // Both queues have commands in flight when the service is stopped.
    let mut sent = app.broker.sent(1, WAIT).await;
    app.app.take().expect("running").stop().await;
    sent.extend(app.broker.sent(12, Duration::from_millis(500)).await);
    let sent: BTreeSet<String> = keys(&sent).into_iter().collect();
    assert!(sent.len() < 12, "the test stopped the service too late");
    let left_normal = take_all(&app, &app.names.command_queue).await;
    let left_high = take_all(&app, &app.names.high_queue()).await;
    // Every command was either sent (and acked) or handed back to its own
    // queue, never both and never lost.
    assert!(sent.iter().any(|k| high.contains(k)), "{sent:?}");
    assert!(sent.iter().any(|k| normal.contains(k)), "{sent:?}");
    assert!(sent.is_disjoint(&left_normal), "{sent:?} {left_normal:?}");
    assert!(sent.is_disjoint(&left_high), "{sent:?} {left_high:?}");
    let normal_done: BTreeSet<String> = sent.intersection(&normal).cloned().collect();
    let high_done: BTreeSet<String> = sent.intersection(&high).cloned().collect();
    assert_eq!(&normal_done | &left_normal, normal);
    assert_eq!(&high_done | &left_high, high);
    app.cleanup().await;
}

#[tokio::test]
async fn the_bench_measures_high_commands_published_beside_a_backlog() {
    let app = spawn_app_with(&[
        ("SMS__AMQP__PREFETCH", "8"),
        ("SMS__PROCESSING__MAX_IN_FLIGHT", "8"),
        ("SMS__PROCESSING__ADAPTIVE_SENDS", "false"),
    ])
    .await;
    provider_answers_after(&app, Duration::from_millis(20)).await;
    let settings = crate::helpers::settings(&app.names.env(&app.provider.uri()));
    let options = sms_service::bench::BenchOptions {
        count: 400,
        duplicates: 0.0,
        rate: None,
        baseline: sms_service::bench::Baseline::None,
        window: 100,
        allow_remote_provider: false,
        bulk: true,
        send_in: None,
        service_pids: Vec::new(),
    };
    let probe = sms_service::bench::HighProbe {
        probes: 3,
        interval: Duration::from_millis(50),
        warm_up: Duration::from_millis(100),
    };
    let report = sms_service::bench::probe_high(&settings, &options, &probe)
        .await
        .unwrap();
    eprintln!("{}", sms_service::bench::render_probe(&report));
    assert_eq!((report.backlog, report.probes), (400, 3));
    // 400 commands, 8 at a time, 20 ms each: a second of backlog, which
    // the probes do not wait for.
    assert!(report.backlog_waiting_at_first_probe > 0, "{report:?}");
    assert!(report.latency_ms_p50 <= report.latency_ms_p99);
    assert!(report.latency_ms_max < 1000.0, "{report:?}");
    app.cleanup().await;
}

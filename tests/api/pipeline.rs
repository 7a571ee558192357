//! The service in-process against real RabbitMQ and Redis, with a wiremock
//! provider: the contract's cases driven through plain AMQP and HTTP.

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use wiremock::matchers::{body_json, body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{command, redis_connection, spawn, spawn_app, spawn_app_with, TestApp};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);

async fn provider_accepts(app: &TestApp, id: &str, times: u64) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .expect(times)
        .mount(&app.provider)
        .await;
}

#[tokio::test]
async fn valid_command_is_sent_once_and_yields_sms_sent_with_contract_properties() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(header("Idempotency-Key", "pay-8812-reminder"))
        .and(body_json(
            json!({"to": "+254712345678", "text": "Payment received. Thank you!", "from": "MKOPA"}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "msg-7f3a"})))
        .expect(1)
        .mount(&app.provider)
        .await;
    let body = br#"{"idempotencyKey":"pay-8812-reminder","phoneNumber":"+254712345678","text":"Payment received. Thank you!","senderId":"MKOPA"}"#;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );
    let properties = BasicProperties::default()
        .with_correlation_id("corr-1".into())
        .with_headers(headers);
    app.broker.publish_command(body, properties).await;

    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    let event = sent[0].json();
    assert_eq!(event["idempotencyKey"], "pay-8812-reminder");
    assert_eq!(event["phoneNumber"], "+254712345678");
    assert_eq!(event["provider"], "generic");
    assert_eq!(event["providerMessageId"], "msg-7f3a");
    assert_eq!(event["segments"], 1);
    assert_eq!(event["attempts"], 1);
    assert!(event["sentAt"].as_str().unwrap().ends_with('Z'));
    let p = &sent[0].properties;
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "SmsSent");
    assert_eq!(
        p.message_id().as_ref().unwrap().as_str(),
        "pay-8812-reminder"
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
    assert_eq!(
        sent[0].header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    let (status, body) = app.get_json("/v1/messages/pay-8812-reminder").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "sent");
    assert_eq!(body["providerMessageId"], "msg-7f3a");
    assert_eq!(body["attempts"], 1);
    assert_eq!(app.broker.commands_waiting().await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn duplicate_commands_are_acked_without_a_second_send_or_event() {
    let mut app = spawn_app().await;
    // Slow enough that the copies arrive while the first is in flight.
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "once"}))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&app.provider)
        .await;
    let body = command("dup-1", "+254712345678", "hello");
    for _ in 0..5 {
        app.publish(&body).await;
    }
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    // Copies arriving after the send are duplicates too.
    for _ in 0..3 {
        app.publish(&body).await;
    }
    assert!(
        app.broker.sent(1, QUIET).await.is_empty(),
        "a second SmsSent"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.broker.commands_waiting().await, 0);
    assert!(app.broker.dead_letters(1, Duration::ZERO).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn invalid_phone_number_yields_sms_failed_and_a_dead_letter_with_the_reason() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "never", 0).await;
    let body = command("bad-phone", "0712345678", "hello");
    let mut headers = FieldTable::default();
    headers.insert("x-producer".into(), AMQPValue::LongString("billing".into()));
    app.broker
        .publish_command(&body, BasicProperties::default().with_headers(headers))
        .await;

    let failed = app.broker.failed(1, WAIT).await;
    assert_eq!(failed.len(), 1);
    let event = failed[0].json();
    assert_eq!(event["idempotencyKey"], "bad-phone");
    assert_eq!(event["phoneNumber"], "0712345678");
    assert_eq!(event["reason"], "invalid_phone_number");
    assert_eq!(event["detail"], "phoneNumber must be E.164");
    assert_eq!(event["attempts"], 0);
    assert_eq!(
        failed[0].properties.kind().as_ref().unwrap().as_str(),
        "SmsFailed"
    );
    assert_eq!(*failed[0].properties.delivery_mode(), Some(2));

    let dead = app.broker.dead_letters(1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].body, body,
        "dead letter body is byte-for-byte the command"
    );
    assert_eq!(dead[0].header("x-producer").as_deref(), Some("billing"));
    assert!(dead[0]
        .header("x-sms-error")
        .unwrap()
        .starts_with("invalid_phone_number"));
    app.cleanup().await;
}

#[tokio::test]
async fn malformed_bodies_are_dead_lettered_without_an_event() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "never", 0).await;
    let bodies: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        b"\xff\xfe\x00binary".to_vec(),
        br#"{"phoneNumber":"+254712345678","text":"no key"}"#.to_vec(),
        br#"{"idempotencyKey":"has space","phoneNumber":"+254712345678","text":"x"}"#.to_vec(),
        vec![b'['; 100_000],
    ];
    for body in &bodies {
        app.publish(body).await;
    }
    let dead = app.broker.dead_letters(bodies.len(), WAIT).await;
    assert_eq!(dead.len(), bodies.len());
    for letter in &dead {
        assert!(bodies.contains(&letter.body));
        assert!(letter
            .header("x-sms-error")
            .unwrap()
            .starts_with("malformed"));
    }
    assert!(
        app.broker.failed(1, QUIET).await.is_empty(),
        "malformed bodies get no event"
    );
    // The service is still there and working.
    let (status, _) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    app.cleanup().await;
}

#[tokio::test]
async fn provider_400_is_provider_rejected_and_dead_lettered() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(400).set_body_string("number barred"))
        .expect(1)
        .mount(&app.provider)
        .await;
    app.publish(&command("rejected-1", "+254712345678", "hello"))
        .await;
    let failed = app.broker.failed(1, WAIT).await;
    assert_eq!(failed.len(), 1);
    let event = failed[0].json();
    assert_eq!(event["reason"], "provider_rejected");
    assert_eq!(event["attempts"], 1);
    assert!(event["detail"].as_str().unwrap().contains("400"));
    let dead = app.broker.dead_letters(1, WAIT).await;
    assert!(dead[0]
        .header("x-sms-error")
        .unwrap()
        .starts_with("provider_rejected"));
    let (_, status) = app.get_json("/v1/messages/rejected-1").await;
    assert_eq!(status["status"], "failed");
    // A duplicate of a failed key is not sent again.
    app.publish(&command("rejected-1", "+254712345678", "hello"))
        .await;
    assert_eq!(app.broker.dead_letters(1, WAIT).await.len(), 1);
    assert!(app.broker.failed(1, QUIET).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn provider_503_then_200_is_sent_with_two_attempts() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.provider)
        .await;
    provider_accepts(&app, "after-retry", 1).await;
    app.publish(&command("retry-1", "+254712345678", "hello"))
        .await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["attempts"], 2);
    assert_eq!(sent[0].json()["providerMessageId"], "after-retry");
    app.cleanup().await;
}

#[tokio::test]
async fn provider_429_retry_after_is_honoured() {
    let mut app = spawn_app_with(&[
        ("SMS__RETRY__MAX_DELAY_MS", "3000"),
        ("SMS__REDIS__LEASE_MS", "20000"),
    ])
    .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.provider)
        .await;
    provider_accepts(&app, "patient", 1).await;
    let started = Instant::now();
    app.publish(&command("throttled-1", "+254712345678", "hello"))
        .await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["attempts"], 2);
    let requests = app.provider.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 not honoured"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn provider_that_keeps_failing_ends_in_retries_exhausted() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(500))
        .expect(3)
        .mount(&app.provider)
        .await;
    app.publish(&command("down-1", "+254712345678", "hello"))
        .await;
    let failed = app.broker.failed(1, WAIT).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].json()["reason"], "retries_exhausted");
    assert_eq!(failed[0].json()["attempts"], 3);
    let dead = app.broker.dead_letters(1, WAIT).await;
    assert!(dead[0]
        .header("x-sms-error")
        .unwrap()
        .starts_with("retries_exhausted"));
    app.cleanup().await;
}

#[tokio::test]
async fn commands_are_processed_concurrently() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "slow"}))
                .set_delay(Duration::from_millis(500)),
        )
        .expect(40)
        .mount(&app.provider)
        .await;
    let started = Instant::now();
    for i in 0..40 {
        app.publish(&command(&format!("conc-{i}"), "+254712345678", "hello"))
            .await;
    }
    let sent = app.broker.sent(40, Duration::from_secs(15)).await;
    assert_eq!(sent.len(), 40);
    // One at a time this takes 20 s; concurrently about one delay.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_recorded_send_whose_event_was_lost_is_published_without_calling_the_provider() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "never", 0).await;
    // As left by an instance that crashed after recording the send and
    // before its SmsSent was confirmed (its lease has run out).
    let key = format!("{}:msg:crashed-1", app.names.key_prefix);
    let mut redis = redis_connection().await;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&["status", "sent", "published", "0", "provider", "generic"])
        .arg(&[
            "provider_message_id",
            "msg-before-crash",
            "segments",
            "1",
            "attempts",
            "1",
        ])
        .arg(&["sent_at", "2026-11-22T10:00:00Z"])
        .query_async(&mut redis)
        .await
        .unwrap();
    app.publish(&command("crashed-1", "+254712345678", "hello"))
        .await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["providerMessageId"], "msg-before-crash");
    assert_eq!(sent[0].json()["sentAt"], "2026-11-22T10:00:00Z");
    // And now it is a plain duplicate.
    app.publish(&command("crashed-1", "+254712345678", "hello"))
        .await;
    assert!(app.broker.sent(1, QUIET).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_lease_left_by_a_crashed_instance_expires_and_the_command_is_sent() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "second-life", 1).await;
    let key = format!("{}:msg:stale-1", app.names.key_prefix);
    let mut redis = redis_connection().await;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&["status", "processing", "published", "0", "attempts", "1"])
        .arg(&["owner", "dead-instance", "lease_until", "1"])
        .query_async(&mut redis)
        .await
        .unwrap();
    app.publish(&command("stale-1", "+254712345678", "hello"))
        .await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].json()["attempts"],
        2,
        "attempts count the crashed call"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_duplicate_of_a_key_in_flight_on_a_live_instance_is_acked_at_once() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "never", 0).await;
    let key = format!("{}:msg:leased-1", app.names.key_prefix);
    let mut redis = redis_connection().await;
    let now_ms: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            "status",
            "processing",
            "published",
            "0",
            "attempts",
            "0",
            "owner",
            "otherinstance-1",
            "holder",
            "otherinstance",
        ])
        .arg("lease_until")
        .arg(now_ms + 1500)
        .query_async(&mut redis)
        .await
        .unwrap();
    // The holder's instance is alive (its heartbeat's liveness record).
    let alive = format!("{}:alive:otherinstance", app.names.key_prefix);
    let _: () = redis::cmd("SET")
        .arg(&alive)
        .arg("1")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    // Not a redelivery: a duplicate of a key in flight, acked at once.
    app.publish(&command("leased-1", "+254712345678", "hello"))
        .await;
    assert!(app.broker.sent(1, QUIET).await.is_empty());
    assert_eq!(app.broker.commands_waiting().await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn status_api_reports_known_and_unknown_keys() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "st-1", 1).await;
    let (status, _) = app.get_json("/v1/messages/unknown-key").await;
    assert_eq!(status, 404);
    app.publish(&command("status-1", "+254712345678", "hello"))
        .await;
    app.broker.sent(1, WAIT).await;
    let (status, body) = app.get_json("/v1/messages/status-1").await;
    assert_eq!(status, 200);
    assert_eq!(body["idempotencyKey"], "status-1");
    assert_eq!(body["status"], "sent");
    assert!(body["updatedAt"].as_str().is_some());
    app.cleanup().await;
}

#[tokio::test]
async fn http_submission_validates_and_publishes_to_the_command_queue() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "via-http", 1).await;
    let url = format!("{}/v1/messages", app.base_url);
    let response = app
        .http
        .post(&url)
        .header("X-Correlation-Id", "corr-http")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&json!({"idempotencyKey": "http-1", "phoneNumber": "+254712345678", "text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["idempotencyKey"],
        "http-1"
    );
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);

    let bad = app
        .http
        .post(&url)
        .json(&json!({"idempotencyKey": "http-2", "phoneNumber": "12", "text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<serde_json::Value>().await.unwrap()["error"],
        "invalid_phone_number"
    );
    let huge = app
        .http
        .post(&url)
        .body(vec![b' '; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    app.cleanup().await;
}

#[tokio::test]
async fn delivery_reports_update_the_status_and_are_published() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "dlr-1", 1).await;
    app.publish(&command("dlr-key", "+254712345678", "hello"))
        .await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    let url = format!("{}/v1/delivery-reports", app.base_url);
    let response = app
        .http
        .post(&url)
        .json(&json!({"id": "dlr-1", "status": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let reports = app.broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].json()["idempotencyKey"], "dlr-key");
    assert_eq!(reports[0].json()["status"], "delivered");
    let message_id = reports[0]
        .properties
        .message_id()
        .as_ref()
        .unwrap()
        .to_string();
    assert_eq!(
        message_id, "dlr-key",
        "the idempotency key, as part 1's events"
    );
    let (_, body) = app.get_json("/v1/messages/dlr-key").await;
    assert_eq!(body["status"], "delivered");

    let unknown = app
        .http
        .post(&url)
        .json(&json!({"id": "no-such-id", "status": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    app.cleanup().await;
}

#[tokio::test]
async fn unsigned_delivery_reports_are_refused_when_a_secret_is_set() {
    let app = spawn_app_with(&[("SMS__PROVIDER__CALLBACK_SECRET", "s3cret")]).await;
    let response = app
        .http
        .post(format!("{}/v1/delivery-reports", app.base_url))
        .json(&json!({"id": "x", "status": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    app.cleanup().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "m-1", 1).await;
    app.publish(&command("metrics-1", "+254712345678", "hello"))
        .await;
    app.broker.sent(1, WAIT).await;
    let health = app
        .http
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (ready, _) = app.get_json("/readyz").await;
    assert_eq!(ready, 200);
    let metrics = app.metrics_text().await;
    for name in [
        "sms_commands_received_total",
        "sms_sent_total",
        "sms_provider_requests_total",
        "sms_provider_request_duration_seconds",
        "sms_processing_duration_seconds",
        "sms_in_flight",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn readiness_is_503_when_redis_is_unreachable() {
    let app = spawn(
        &[
            ("SMS__REDIS__URL", "redis://127.0.0.1:1"),
            ("SMS__REDIS__TIMEOUT_MS", "200"),
        ],
        false,
    )
    .await;
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503);
    assert!(body["reason"].as_str().unwrap().contains("Redis"), "{body}");
    app.cleanup().await;
}

/// A smoke run of `sms-service bench --baseline` (small N, no thresholds:
/// figures come from the benchmark's report, not from timed tests).
#[tokio::test]
async fn the_bench_smoke_run_reports_relay_service_and_ratio() {
    let app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "b"})))
        .mount(&app.provider)
        .await;
    let settings = crate::helpers::settings(&app.names.env(&app.provider.uri()));
    let options = sms_service::bench::BenchOptions {
        count: 300,
        duplicates: 0.1,
        rate: None,
        baseline: sms_service::bench::Baseline::Relay,
        window: 100,
        allow_remote_provider: false,
        bulk: false,
        send_in: None,
        service_pids: Vec::new(),
    };
    let report = sms_service::bench::run(&settings, &options).await.unwrap();
    eprintln!("{}", sms_service::bench::render(&report));
    let service = &report.service;
    assert_eq!(service.commands, 300);
    assert!(service.distinct_keys < 300 && service.distinct_keys > 200);
    assert!(service.latency_ms_p50 <= service.latency_ms_p99);
    assert!(service.latency_ms_p99 <= service.latency_ms_max);
    assert_eq!(report.baseline.as_ref().unwrap().commands, 300);
    assert!(report.ratio.unwrap() > 0.0);
    let calls = app.provider.received_requests().await.unwrap().len();
    assert_eq!(
        calls, service.distinct_keys,
        "duplicates in the load are not sent"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn acks_are_batched_but_never_held_behind_a_slow_command() {
    // A prefetch of 4: were finished commands' acks held until the slow one
    // ahead of them is done, the window would fill after three of them.
    let mut app = spawn_app_with(&[
        ("SMS__AMQP__PREFETCH", "4"),
        ("SMS__PROCESSING__MAX_IN_FLIGHT", "4"),
        ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "8000"),
        ("SMS__REDIS__LEASE_MS", "30000"),
    ])
    .await;
    let slow = Duration::from_secs(4);
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(body_partial_json(json!({"text": "slow"})))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "slow"}))
                .set_delay(slow),
        )
        .with_priority(1)
        .expect(1)
        .mount(&app.provider)
        .await;
    provider_accepts(&app, "fast", 40).await;
    let started = Instant::now();
    app.publish(&command("ack-slow", "+254712345678", "slow"))
        .await;
    for i in 0..40 {
        app.publish(&command(&format!("ack-{i}"), "+254712345678", "fast"))
            .await;
    }
    let fast = app.broker.sent(40, slow - Duration::from_millis(500)).await;
    assert_eq!(fast.len(), 40, "fast commands waited behind the slow one");
    assert!(started.elapsed() < slow, "took {:?}", started.elapsed());
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    // Stopped, the service has acked everything: nothing comes back.
    app.app.take().expect("running").stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.broker.commands_waiting().await, 0);
    app.cleanup().await;
}

/// Answers every call after `latency`, noting when each arrived.
struct SlowProvider {
    latency: Duration,
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl wiremock::Respond for SlowProvider {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let mut arrivals = self.arrivals.lock().unwrap();
        arrivals.push(Instant::now());
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": format!("slow-{}", arrivals.len())}))
            .set_delay(self.latency)
    }
}

#[tokio::test]
async fn the_send_limit_climbs_from_its_floor_to_keep_a_slow_provider_busy() {
    let mut app = spawn_app_with(&[
        ("SMS__PROCESSING__MIN_SENDS", "4"),
        ("SMS__PROCESSING__MAX_IN_FLIGHT", "64"),
        ("SMS__AMQP__PREFETCH", "64"),
    ])
    .await;
    let latency = Duration::from_millis(100);
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(SlowProvider {
            latency,
            arrivals: arrivals.clone(),
        })
        .expect(300)
        .mount(&app.provider)
        .await;
    app.broker.publish_many("climb-", 300).await;
    assert_eq!(app.broker.sent(300, WAIT * 3).await.len(), 300);
    // Calls under way at once: those that arrived within one latency.
    let arrivals = arrivals.lock().unwrap().clone();
    let most = arrivals
        .iter()
        .map(|a| {
            arrivals
                .iter()
                .filter(|b| *b >= a && **b - *a < latency)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most >= 32,
        "at most {most} calls at once: the limit stayed near its floor of 4"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_status_api_knows_a_message_from_the_moment_it_is_accepted_and_refuses_a_reused_key() {
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "slow-1"}))
                .set_delay(Duration::from_millis(1500)),
        )
        .expect(1)
        .mount(&app.provider)
        .await;
    let url = format!("{}/v1/messages", app.base_url);
    let submit = |text: &'static str| {
        app.http
            .post(&url)
            .json(
                &json!({"idempotencyKey": "door-1", "phoneNumber": "+254712345678", "text": text}),
            )
            .send()
    };
    assert_eq!(submit("hello").await.unwrap().status(), 202);
    let (status, body) = app.get_json("/v1/messages/door-1").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("processing")),
        "{body}"
    );
    // The same key for another message: refused, with what the key holds.
    let reused = submit("another text").await.unwrap();
    assert_eq!(reused.status(), 409);
    let body: serde_json::Value = reused.json().await.unwrap();
    assert_eq!(body["error"], "idempotency_key_reused");
    assert_eq!(body["idempotencyKey"], "door-1");
    assert!(body["status"].is_string(), "{body}");
    // The same message again is a harmless duplicate.
    assert_eq!(submit("hello").await.unwrap().status(), 202);
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    let (_, body) = app.get_json("/v1/messages/door-1").await;
    assert_eq!(body["status"], "sent");
    assert!(app.broker.sent(1, QUIET).await.is_empty(), "one SmsSent");

    // An invalid command's SmsFailed and its status agree.
    app.publish(br#"{"idempotencyKey":"bad-door","phoneNumber":"+2547bad","text":"x"}"#)
        .await;
    assert_eq!(app.broker.failed(1, WAIT).await.len(), 1);
    let (status, body) = app.get_json("/v1/messages/bad-door").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["reason"], "invalid_phone_number");
    assert!(body["detail"].is_string(), "{body}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_command_past_its_expires_at_fails_expired_and_is_never_sent() {
    let mut app = spawn_app().await;
    provider_accepts(&app, "exp-2", 1).await;
    let expired = json!({"idempotencyKey": "exp-1", "phoneNumber": "+254712345678",
        "text": "your code is 1234", "expiresAt": "2020-01-01T10:00:00+03:00"});
    app.publish(expired.to_string().as_bytes()).await;
    let failed = app.broker.failed(1, WAIT).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].json()["reason"], "expired");
    assert_eq!(failed[0].json()["attempts"], 0);
    let dead = app.broker.dead_letters(1, WAIT).await;
    assert_eq!(
        dead[0].header("x-sms-error").as_deref(),
        Some("expired: expiresAt passed before it could be sent")
    );
    let (_, status) = app.get_json("/v1/messages/exp-1").await;
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("failed"), Some("expired"))
    );

    let later = json!({"idempotencyKey": "exp-2", "phoneNumber": "+254712345678",
        "text": "your code is 1234", "expiresAt": "2099-01-01T00:00:00Z"});
    app.publish(later.to_string().as_bytes()).await;
    assert_eq!(
        app.broker.sent(1, WAIT).await.len(),
        1,
        "not yet expired: sent"
    );
    app.cleanup().await;
}

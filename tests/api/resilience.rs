//! Breaking things on purpose: the broker and Redis cut mid-stream, the
//! provider down for a while, hostile input, dead letters replayed.

use std::collections::HashMap;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{command, spawn, spawn_app_with, Received, TestApp};
use crate::proxy::Proxy;

async fn provider_accepts(app: &TestApp) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "ok"})))
        .mount(&app.provider)
        .await;
}

/// Provider calls per idempotency key.
async fn calls_per_key(app: &TestApp) -> HashMap<String, usize> {
    let mut calls = HashMap::new();
    for request in app.provider.received_requests().await.unwrap() {
        let key = request
            .headers
            .get("idempotency-key")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        *calls.entry(key).or_default() += 1;
    }
    calls
}

fn keys_of(events: &[Received]) -> Vec<String> {
    let mut keys: Vec<String> = events
        .iter()
        .map(|e| e.json()["idempotencyKey"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

async fn readyz(app: &TestApp) -> (u16, serde_json::Value) {
    app.get_json("/readyz").await
}

async fn wait_for_readyz(app: &TestApp, status: u16) -> serde_json::Value {
    for _ in 0..100 {
        let (got, body) = readyz(app).await;
        if got == status {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {status}");
}

#[tokio::test]
async fn a_redis_outage_stops_sending_until_redis_is_back_then_each_command_is_sent_once() {
    let redis = Proxy::start("127.0.0.1:6379").await;
    let url = format!("redis://{}", redis.addr);
    let mut app =
        spawn_app_with(&[("SMS__REDIS__URL", &url), ("SMS__REDIS__TIMEOUT_MS", "300")]).await;
    provider_accepts(&app).await;
    redis.cut();
    for i in 0..5 {
        app.publish(&command(&format!("redis-out-{i}"), "+254712345678", "hi"))
            .await;
    }
    let body = wait_for_readyz(&app, 503).await;
    assert!(body["reason"].as_str().unwrap().contains("Redis"), "{body}");
    assert!(app
        .broker
        .sent(1, Duration::from_millis(1500))
        .await
        .is_empty());
    assert!(
        calls_per_key(&app).await.is_empty(),
        "no send without the idempotency check"
    );
    redis.restore();
    let sent = app.broker.sent(5, Duration::from_secs(20)).await;
    assert_eq!(keys_of(&sent).len(), 5);
    wait_for_readyz(&app, 200).await;
    assert!(calls_per_key(&app).await.values().all(|n| *n == 1));
    app.cleanup().await;
}

#[tokio::test]
async fn a_broker_connection_cut_mid_stream_loses_nothing_and_sends_each_key_once() {
    let broker = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", broker.addr);
    let mut app = spawn_app_with(&[("SMS__AMQP__URL", &url)]).await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "ok"}))
                .set_delay(Duration::from_millis(150)),
        )
        .mount(&app.provider)
        .await;
    for i in 0..30 {
        app.publish(&command(&format!("cut-{i}"), "+254712345678", "hi"))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.cut();
    wait_for_readyz(&app, 503).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.restore();
    let mut sent = app.broker.sent(30, Duration::from_secs(30)).await;
    // An event whose confirm was lost in the cut may be published again.
    sent.extend(app.broker.sent(30, Duration::from_millis(500)).await);
    let mut keys = keys_of(&sent);
    let events = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), 30, "every command ended in SmsSent");
    eprintln!("broker cut: {events} SmsSent for 30 keys");
    let calls = calls_per_key(&app).await;
    assert_eq!(calls.len(), 30);
    assert!(
        calls.values().all(|n| *n == 1),
        "a key was sent twice: {calls:?}"
    );
    wait_for_readyz(&app, 200).await;
    assert_eq!(app.broker.commands_waiting().await, 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_provider_outage_opens_the_breaker_retries_through_delay_tiers_and_loses_nothing() {
    let mut app = spawn_app_with(&[
        ("SMS__PROVIDER__BREAKER_THRESHOLD", "3"),
        ("SMS__PROVIDER__BREAKER_COOL_DOWN_MS", "800"),
        ("SMS__RETRY__MAX_ATTEMPTS", "20"),
        ("SMS__RETRY__IN_PROCESS_ATTEMPTS", "1"),
    ])
    .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(8)
        .mount(&app.provider)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(2)
        .mount(&app.provider)
        .await;
    provider_accepts(&app).await;
    for i in 0..10 {
        app.publish(&command(&format!("outage-{i}"), "+254712345678", "hi"))
            .await;
    }
    let sent = app.broker.sent(10, Duration::from_secs(30)).await;
    assert_eq!(
        keys_of(&sent).len(),
        10,
        "every command sent after the outage"
    );
    assert!(app
        .broker
        .sent(1, Duration::from_millis(500))
        .await
        .is_empty());
    assert!(app.broker.failed(1, Duration::ZERO).await.is_empty());
    let requests = app.provider.received_requests().await.unwrap().len();
    assert_eq!(
        requests,
        8 + 2 + 10,
        "each failure answered once, each key accepted once"
    );
    let retried = sent
        .iter()
        .filter(|e| e.json()["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(retried > 0, "some commands went through the delay tiers");
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("sms_circuit_state"));
    assert!(metrics.contains("sms_retries_scheduled_total"));
    app.cleanup().await;
}

#[tokio::test]
async fn hostile_input_is_dead_lettered_with_a_reason_and_valid_commands_still_go_out_once() {
    let mut app = spawn_app().await;
    provider_accepts(&app).await;
    let mut deep = "[".repeat(50_000);
    deep.push_str(&"]".repeat(50_000));
    let hostile: Vec<Vec<u8>> = vec![
        b"\xc3\x28\xa0\xa1 not utf-8".to_vec(),
        deep.into_bytes(),
        vec![b'{'; 10 * 1024 * 1024],
        br#"{"idempotencyKey":["a"],"phoneNumber":"+254712345678","text":"x"}"#.to_vec(),
        format!(
            r#"{{"idempotencyKey":"{}","phoneNumber":"+254712345678","text":"x"}}"#,
            "k".repeat(100_000)
        )
        .into_bytes(),
        br#"{"idempotencyKey":"ctl\u0000key","phoneNumber":"+254712345678","text":"x"}"#.to_vec(),
        br#"{"idempotencyKey":"hostile-phone","phoneNumber":"+2547123abc","text":"x"}"#.to_vec(),
        br#"{"idempotencyKey":"hostile-text","phoneNumber":"+254712345678","text":{"a":1}}"#
            .to_vec(),
        br#"{"idempotencyKey":"hostile-num","phoneNumber":254712345678e3,"text":"x"}"#.to_vec(),
        b"".to_vec(),
        b"null".to_vec(),
    ];
    let mut odd_headers = FieldTable::default();
    odd_headers.insert(
        "x-sms-attempts".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
    );
    odd_headers.insert("traceparent".into(), AMQPValue::LongLongInt(-1));
    odd_headers.insert("x-sms-first-attempt-ms".into(), AMQPValue::Double(1.5));
    for (i, body) in hostile.iter().enumerate() {
        app.publish(&command(&format!("valid-{i}"), "+254712345678", "hi"))
            .await;
        app.broker
            .publish_command(
                body,
                BasicProperties::default().with_headers(odd_headers.clone()),
            )
            .await;
    }
    app.broker
        .publish_command(
            &command("valid-odd-headers", "+254712345678", "hi"),
            BasicProperties::default().with_headers(odd_headers),
        )
        .await;
    let sent = app
        .broker
        .sent(hostile.len() + 1, Duration::from_secs(20))
        .await;
    assert_eq!(keys_of(&sent).len(), hostile.len() + 1);
    let dead = app
        .broker
        .dead_letters(hostile.len(), Duration::from_secs(20))
        .await;
    assert_eq!(dead.len(), hostile.len());
    for letter in &dead {
        let reason = letter.header("x-sms-error").unwrap();
        assert!(!reason.is_empty() && reason.len() <= 512, "{reason}");
    }
    assert!(calls_per_key(&app).await.values().all(|n| *n == 1));
    let (status, _) = readyz(&app).await;
    assert_eq!(status, 200, "still alive and consuming");
    app.cleanup().await;
}

#[tokio::test]
async fn dead_letters_are_listed_without_removal_and_replayed_to_the_command_queue() {
    let mut app = spawn_app().await;
    app.publish(b"garbage").await;
    app.publish(&command("dl-invalid", "12", "hi")).await;
    assert_eq!(app.broker.failed(1, Duration::from_secs(10)).await.len(), 1);
    // Wait until both are dead-lettered, then stop the service so replayed
    // commands stay in the command queue to be counted.
    let mut env = app.names.env(&app.provider.uri());
    env.push(("SMS__AMQP__URL".into(), crate::helpers::AMQP_URL.into()));
    let settings = crate::helpers::settings(&env);
    for _ in 0..100 {
        if sms_service::dead_letters::list(&settings, 10)
            .await
            .unwrap()
            .len()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.app.take().unwrap().stop().await;
    let listed = sms_service::dead_letters::list(&settings, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        sms_service::dead_letters::list(&settings, 10)
            .await
            .unwrap()
            .len(),
        2,
        "listing removes nothing"
    );
    let invalid = listed
        .iter()
        .find(|l| l.idempotency_key.as_deref() == Some("dl-invalid"))
        .unwrap();
    assert!(invalid.reason.starts_with("invalid_phone_number"));
    assert!(listed.iter().any(|l| l.reason.starts_with("malformed")));
    let rendered = sms_service::dead_letters::render(&listed);
    assert!(rendered.contains("dl-invalid"));

    let moved = sms_service::dead_letters::replay(&settings, 10, false)
        .await
        .unwrap();
    assert_eq!(moved.len(), 2);
    assert!(sms_service::dead_letters::list(&settings, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(app.broker.commands_waiting().await, 2);
    app.cleanup().await;
}

async fn spawn_app() -> TestApp {
    spawn(&[], true).await
}

#[tokio::test]
async fn a_redis_outage_after_the_provider_accepted_never_reopens_the_key() {
    let redis = Proxy::start("127.0.0.1:6379").await;
    let url = format!("redis://{}", redis.addr);
    let mut app = spawn_app_with(&[
        ("SMS__REDIS__URL", &url),
        ("SMS__REDIS__TIMEOUT_MS", "300"),
        ("SMS__REDIS__LEASE_MS", "6000"),
        ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "1500"),
    ])
    .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "accepted-in-the-dark"}))
                .set_delay(Duration::from_millis(700)),
        )
        .mount(&app.provider)
        .await;
    let body = command("outage-after-send", "+254712345678", "hi");
    app.publish(&body).await;
    // Cut Redis while the provider holds the call: its answer finds no store.
    for _ in 0..100 {
        if !calls_per_key(&app).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.cut();
    // Longer than the lease: no SmsSent while its record cannot be written.
    assert!(
        app.broker.sent(1, Duration::from_secs(8)).await.is_empty(),
        "SmsSent published without its record"
    );
    redis.restore();
    let sent = app.broker.sent(1, Duration::from_secs(20)).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["providerMessageId"], "accepted-in-the-dark");
    wait_for_readyz(&app, 200).await;
    // The duplicate that follows finds the key sent.
    app.publish(&body).await;
    assert!(app.broker.sent(1, Duration::from_secs(2)).await.is_empty());
    assert_eq!(app.broker.commands_waiting().await, 0);
    assert_eq!(calls_per_key(&app).await["outage-after-send"], 1);
    let (status, json) = app.get_json("/v1/messages/outage-after-send").await;
    assert_eq!((status, json["status"].as_str()), (200, Some("sent")));
    app.cleanup().await;
}

//! `sendAt`: a scheduled command waits in the broker's hold queues, not in
//! the service, and is sent once it is due, never before, through a
//! restart of the service too. With short times: seconds, never hours.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use serde_json::json;
use sms_service::app;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{settings, spawn_app, TestApp};

/// `seconds` from now, to the second (sendAt's precision on the wire).
pub fn in_seconds(seconds: u64) -> SystemTime {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    UNIX_EPOCH + Duration::from_secs(now.as_secs() + 1 + seconds)
}

pub fn rfc3339(at: SystemTime) -> String {
    sms_service::domain::rfc3339(at)
}

/// A command due at `send_at`.
pub fn scheduled(key: &str, send_at: SystemTime) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "idempotencyKey": key,
        "phoneNumber": "+254712345678",
        "text": "Your appointment is tomorrow",
        "sendAt": rfc3339(send_at),
    }))
    .unwrap()
}

pub async fn provider_accepts(app: &TestApp, times: u64) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "later-1"})))
        .expect(times)
        .mount(&app.provider)
        .await;
}

/// Waits until the key's status is `status`.
pub async fn wait_for_status(app: &TestApp, key: &str, status: &str) -> serde_json::Value {
    let path = format!("/v1/messages/{key}");
    for _ in 0..100 {
        let (code, body) = app.get_json(&path).await;
        if code == 200 && body["status"] == status {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{key} never reached {status}: {:?}",
        app.get_json(&path).await
    );
}

#[tokio::test]
async fn a_command_scheduled_3_s_ahead_is_sent_after_its_send_at_and_not_before() {
    let mut app = spawn_app().await;
    provider_accepts(&app, 1).await;
    let due = in_seconds(3);
    app.broker
        .publish_command(&scheduled("later-1", due), BasicProperties::default())
        .await;
    let status = wait_for_status(&app, "later-1", "scheduled").await;
    assert_eq!(status["sendAt"], rfc3339(due));
    // Held in the broker, not in the service: the command queue is empty
    // and the provider has not been called.
    assert_eq!(app.broker.commands_waiting().await, 0);
    let before_due = due.duration_since(SystemTime::now()).unwrap() - Duration::from_millis(300);
    tokio::time::sleep(before_due).await;
    let calls = app.provider.received_requests().await.unwrap().len();
    assert_eq!(calls, 0, "sent before its sendAt");
    let sent = app.broker.sent(1, Duration::from_secs(15)).await;
    let arrived = SystemTime::now();
    assert_eq!(sent.len(), 1, "sent once due");
    assert!(arrived >= due, "SmsSent before sendAt");
    let late = arrived.duration_since(due).unwrap();
    assert!(late < Duration::from_secs(10), "{late:?} after sendAt");
    assert_eq!(sent[0].json()["attempts"], 1, "a hold counts no attempt");
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sms_holds_total ") && !l.ends_with(" 0")),
        "sms_holds_total counts the holds"
    );
    let (_, status) = app.get_json("/v1/messages/later-1").await;
    assert_eq!(
        (status["status"].as_str(), status["sendAt"].as_str()),
        (Some("sent"), Some(rfc3339(due).as_str()))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_held_command_survives_a_restart_of_the_service_and_is_sent_once() {
    let mut app = spawn_app().await;
    provider_accepts(&app, 1).await;
    let due = in_seconds(5);
    app.broker
        .publish_command(&scheduled("restarted-1", due), BasicProperties::default())
        .await;
    wait_for_status(&app, "restarted-1", "scheduled").await;
    // Stopped while the command waits; nothing of it was in the process.
    app.app.take().unwrap().stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = app::start(settings(&app.names.env(&app.provider.uri())))
        .await
        .expect("the service starts again");
    app.base_url = format!("http://{}", restarted.http_addr);
    app.app = Some(restarted);
    let sent = app.broker.sent(1, Duration::from_secs(20)).await;
    assert_eq!(sent.len(), 1, "sent after the restart");
    assert!(SystemTime::now() >= due, "sent before its sendAt");
    assert!(app
        .broker
        .sent(1, Duration::from_millis(700))
        .await
        .is_empty());
    app.cleanup().await;
}

/// A smoke run of `sms-service bench --send-in` (small N, no thresholds:
/// the figures come from the bench's report): every command carries a
/// `sendAt`, each SmsSent is measured against it, and none came early.
#[tokio::test]
async fn the_bench_schedules_its_commands_and_reports_the_lateness_after_send_at() {
    let app = spawn_app().await;
    provider_accepts(&app, 40).await;
    let settings = settings(&app.names.env(&app.provider.uri()));
    let options = sms_service::bench::BenchOptions {
        count: 40,
        duplicates: 0.0,
        rate: None,
        baseline: sms_service::bench::Baseline::None,
        window: 10,
        allow_remote_provider: false,
        bulk: false,
        send_in: Some(Duration::from_secs(2)),
        service_pids: Vec::new(),
    };
    let started = SystemTime::now();
    let report = sms_service::bench::run(&settings, &options).await.unwrap();
    eprintln!("{}", sms_service::bench::render(&report));
    let lateness = report.service.lateness.clone().expect("a lateness report");
    assert_eq!((lateness.send_in_s, lateness.events), (2, 40));
    assert!(lateness.lateness_ms_p50 <= lateness.lateness_ms_p99);
    assert!(lateness.lateness_ms_p99 <= lateness.lateness_ms_max);
    // Publish to SmsSent is at least the 2 s each waited.
    assert!(report.service.latency_ms_p50 >= 2000.0, "{report:?}");
    assert!(started.elapsed().unwrap() >= Duration::from_secs(2));
    app.cleanup().await;
}

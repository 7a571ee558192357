//! Delivery reports through `/v1/callbacks/{instance}` (generic instance,
//! signed): forward-only statuses, repeats, reports that come before the
//! send is recorded, ids never sent, and a callback answered 2xx only once
//! its event is confirmed. The service runs in-process against the real
//! RabbitMQ and Redis with a wiremock provider.

use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{command, post_signed_report, spawn_app_with, TestApp};
use crate::proxy::Proxy;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);
const SECRET: &str = "callback-s3cret";

async fn provider_accepts(app: &TestApp, id: &str) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .expect(1)
        .mount(&app.provider)
        .await;
}

/// Posts a generic report for `id`, signed with the instance's secret
/// (with another secret when `forged`).
async fn report(app: &TestApp, id: &str, status: &str, forged: bool) -> u16 {
    let secret = if forged { "another-secret" } else { SECRET };
    post_signed_report(app, "generic", id, status, secret).await
}

async fn status_of(app: &TestApp, key: &str) -> Value {
    app.get_json(&format!("/v1/messages/{key}")).await.1
}

fn history(status: &Value) -> Vec<String> {
    status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap().to_owned())
        .collect()
}

async fn signed_app(extra: &[(&str, &str)]) -> TestApp {
    let mut settings = vec![("SMS__PROVIDER__CALLBACK_SECRET", SECRET)];
    settings.extend_from_slice(extra);
    spawn_app_with(&settings).await
}

#[tokio::test]
async fn reports_move_a_message_forward_only_and_each_change_is_published_once() {
    let mut app = signed_app(&[]).await;
    provider_accepts(&app, "fwd-1").await;
    app.publish(&command("fwd-key", "+254712345678", "hi"))
        .await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);

    assert_eq!(report(&app, "fwd-1", "delivered", true).await, 401);
    assert_eq!(
        status_of(&app, "fwd-key").await["status"],
        "sent",
        "a forged report changes nothing"
    );
    for status in ["sent", "delivered", "delivered", "sent", "undelivered"] {
        assert_eq!(report(&app, "fwd-1", status, false).await, 204, "{status}");
    }
    let events = app.broker.deliveries(2, QUIET).await;
    assert_eq!(events.len(), 1, "one status change, one event");
    let event = events[0].json();
    assert_eq!(event["status"], "delivered");
    assert_eq!(event["idempotencyKey"], "fwd-key");
    assert_eq!(event["phoneNumber"], "+254712345678");
    assert_eq!(event["provider"], "generic");
    assert_eq!(event["providerMessageId"], "fwd-1");
    let kind = events[0].properties.kind().as_ref().map(|k| k.to_string());
    assert_eq!(kind.as_deref(), Some("SmsDeliveryReport"));
    let status = status_of(&app, "fwd-key").await;
    assert_eq!(status["status"], "delivered");
    assert_eq!(status["deliveryStatus"], "delivered");
    assert_eq!(status["provider"], "generic");
    assert_eq!(
        history(&status),
        ["sent", "delivered", "undelivered"],
        "each distinct report once; the late and the contrary ones kept but changing nothing"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_report_before_its_send_is_kept_and_published_after_the_sms_sent() {
    let mut app = signed_app(&[]).await;
    assert_eq!(report(&app, "early-1", "delivered", false).await, 204);
    assert!(app
        .metrics_text()
        .await
        .contains("sms_delivery_reports_total{provider=\"generic\",status=\"unmatched\"} 1"));
    assert!(app.broker.deliveries(1, QUIET).await.is_empty());

    provider_accepts(&app, "early-1").await;
    app.publish(&command("early-key", "+254712345678", "hi"))
        .await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    let events = app.broker.deliveries(1, WAIT).await;
    assert_eq!(
        events.len(),
        1,
        "the parked report is applied with the send"
    );
    assert_eq!(events[0].json()["status"], "delivered");
    assert_eq!(events[0].json()["idempotencyKey"], "early-key");
    assert_eq!(status_of(&app, "early-key").await["status"], "delivered");
    assert!(app.broker.deliveries(1, QUIET).await.is_empty(), "once");
    app.cleanup().await;
}

#[tokio::test]
async fn a_report_for_an_id_never_sent_is_answered_2xx_and_publishes_nothing() {
    let mut app = signed_app(&[]).await;
    assert_eq!(report(&app, "never-1", "undelivered", false).await, 204);
    assert!(app.broker.deliveries(1, QUIET).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_callback_whose_event_is_not_confirmed_gets_503_and_its_retry_publishes_it_once() {
    let amqp = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", amqp.addr);
    let mut app = signed_app(&[
        ("SMS__AMQP__URL", &url),
        ("SMS__AMQP__CONFIRM_TIMEOUT_MS", "500"),
    ])
    .await;
    provider_accepts(&app, "cut-1").await;
    app.publish(&command("cut-key", "+254712345678", "hi"))
        .await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);

    amqp.cut();
    assert_eq!(
        report(&app, "cut-1", "undelivered", false).await,
        503,
        "recorded, but its event not confirmed: the provider must try again"
    );
    amqp.restore();
    app.wait_ready().await;
    let mut answer = 0;
    for _ in 0..50 {
        answer = report(&app, "cut-1", "undelivered", false).await;
        if answer == 204 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answer, 204, "the provider's retry goes through");
    let events = app.broker.deliveries(2, WAIT).await;
    assert_eq!(events.len(), 1, "one event for the change");
    assert_eq!(events[0].json()["status"], "undelivered");
    assert_eq!(report(&app, "cut-1", "undelivered", false).await, 204);
    assert!(
        app.broker.deliveries(1, QUIET).await.is_empty(),
        "a confirmed change is not published again"
    );
    app.cleanup().await;
}

//! `DELETE /v1/messages/{key}` and gRPC `Cancel`: a scheduled message is
//! cancelled with its `SmsFailed` at once and never sent; a key not seen
//! yet is cancelled when its command arrives; a message sent is too late.
//! Through the real broker and Redis, with seconds, not hours.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use sms_service::adapters::grpc::proto::sms_service_client::SmsServiceClient;
use sms_service::adapters::grpc::proto::CancelRequest;
use tonic::Code;

use crate::helpers::{command, spawn_app, spawn_app_with, TestApp};
use crate::schedule::{in_seconds, provider_accepts, scheduled, wait_for_status};

const API_KEY: &str = "test-cancel-api-key-0123456789";

/// DELETE /v1/messages/{key}: the status code and the JSON answer.
async fn delete(app: &TestApp, key: &str, api_key: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = app
        .http
        .delete(format!("{}/v1/messages/{key}", app.base_url));
    if let Some(api_key) = api_key {
        request = request.bearer_auth(api_key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn a_cancelled_scheduled_message_gets_its_sms_failed_at_once_and_is_never_sent() {
    let mut app = spawn_app().await;
    provider_accepts(&app, 0).await;
    let due = in_seconds(4);
    app.broker
        .publish_command(&scheduled("cancel-me", due), BasicProperties::default())
        .await;
    wait_for_status(&app, "cancel-me", "scheduled").await;
    let (code, document) = delete(&app, "cancel-me", None).await;
    assert_eq!(code, 200, "{document}");
    assert_eq!(document["status"], "failed");
    assert_eq!(document["reason"], "cancelled");
    // Published by the cancel, while the command still waits in the broker.
    let failed = app.broker.failed(1, Duration::from_secs(2)).await;
    assert_eq!(failed.len(), 1, "SmsFailed at once");
    let event = failed[0].json();
    assert_eq!(event["reason"], "cancelled");
    assert_eq!(event["phoneNumber"], "+254712345678");
    assert_eq!(event["attempts"], 0);
    assert!(
        SystemTime::now() < due,
        "published before the message was due"
    );
    let (code, _) = delete(&app, "cancel-me", None).await;
    assert_eq!(code, 200, "cancelling again is no error");
    // At its next return from a hold (not at its sendAt) the command ends
    // as a dead letter, with no second SmsFailed; it is never sent.
    let dead = app.broker.dead_letters(1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].header("x-sms-error").unwrap();
    assert!(reason.starts_with("cancelled: "), "{reason}");
    if let Ok(left) = due.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_secs(1)).await;
    }
    assert!(app.broker.sent(1, Duration::from_secs(1)).await.is_empty());
    assert!(app
        .broker
        .failed(1, Duration::from_millis(300))
        .await
        .is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_key_not_seen_yet_is_cancelled_with_202_and_its_command_when_it_arrives() {
    let mut app = spawn_app_with(&[("SMS__HTTP__API_KEYS", API_KEY)]).await;
    provider_accepts(&app, 0).await;
    let (code, _) = delete(&app, "on-its-way", None).await;
    assert_eq!(code, 401, "the API key of POST is needed");
    let (code, document) = delete(&app, "on-its-way", Some(API_KEY)).await;
    assert_eq!(code, 202, "{document}");
    assert_eq!(
        (document["status"].as_str(), document["reason"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    assert!(
        app.broker
            .failed(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "no number yet, no event"
    );
    app.publish(&command("on-its-way", "+254711111111", "hi"))
        .await;
    let failed = app.broker.failed(1, Duration::from_secs(10)).await;
    assert_eq!(failed.len(), 1);
    let event = failed[0].json();
    assert_eq!(
        (event["reason"].as_str(), event["phoneNumber"].as_str()),
        (Some("cancelled"), Some("+254711111111"))
    );
    let dead = app.broker.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dead.len(), 1);
    // A copy later: still cancelled, no second event.
    app.publish(&command("on-its-way", "+254711111111", "hi"))
        .await;
    assert_eq!(
        app.broker
            .dead_letters(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    assert!(app
        .broker
        .failed(1, Duration::from_millis(500))
        .await
        .is_empty());
    assert!(app
        .broker
        .sent(1, Duration::from_millis(100))
        .await
        .is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_sent_message_is_too_late_to_cancel_over_http_and_grpc() {
    let mut app = spawn_app().await;
    provider_accepts(&app, 1).await;
    app.publish(&command("already-out", "+254712345678", "hi"))
        .await;
    assert_eq!(app.broker.sent(1, Duration::from_secs(10)).await.len(), 1);
    let (code, document) = delete(&app, "already-out", None).await;
    assert_eq!(code, 409, "{document}");
    assert_eq!(document["error"], "not_cancellable");
    assert_eq!(document["status"], "sent");
    let grpc = app.app.as_ref().unwrap().grpc_addr.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = SmsServiceClient::new(channel);
    let refused = client
        .cancel(CancelRequest {
            idempotency_key: "already-out".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().starts_with("not_cancellable: "),
        "{refused:?}"
    );
    // Over gRPC, a scheduled one is cancelled as over HTTP.
    app.publish(&scheduled("grpc-later", in_seconds(30))).await;
    wait_for_status(&app, "grpc-later", "scheduled").await;
    let cancelled = client
        .cancel(CancelRequest {
            idempotency_key: "grpc-later".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cancelled.status.as_str(), cancelled.reason.as_deref()),
        ("failed", Some("cancelled"))
    );
    assert_eq!(app.broker.failed(1, Duration::from_secs(2)).await.len(), 1);
    let (_, document) = app.get_json("/v1/messages/already-out").await;
    assert_eq!(
        document["status"], "sent",
        "a refused cancel changes nothing"
    );
    app.cleanup().await;
}

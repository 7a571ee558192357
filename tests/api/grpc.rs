//! The gRPC front door through a real tonic client: `Send` queues a
//! command the service then sends, bad input and a missing or wrong API
//! key are refused with the HTTP API's reasons, `GetStatus` and
//! `WatchStatus` follow a key to its final status, and health checking
//! and reflection answer. The service runs in-process against the real
//! RabbitMQ and Redis with a wiremock provider.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use sms_service::adapters::grpc::proto::sms_service_client::SmsServiceClient;
use sms_service::adapters::grpc::proto::{
    GetStatusRequest, MessageStatus, SendRequest, WatchStatusRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{spawn_app_with, TestApp};

const WAIT: Duration = Duration::from_secs(10);
const API_KEY: &str = "test-grpc-api-key-0123456789";

/// A service with its gRPC door on a free loopback port, and `extra`.
async fn spawn(extra: &[(&str, &str)]) -> TestApp {
    let mut settings = vec![("SMS__GRPC__BIND", "127.0.0.1:0")];
    settings.extend_from_slice(extra);
    spawn_app_with(&settings).await
}

async fn channel(app: &TestApp) -> Channel {
    let addr = app
        .app
        .as_ref()
        .unwrap()
        .grpc_addr
        .expect("grpc.bind is set");
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the gRPC door accepts connections")
}

async fn client(app: &TestApp) -> SmsServiceClient<Channel> {
    SmsServiceClient::new(channel(app).await)
}

/// `message` with `authorization: Bearer <key>` when a key is given.
fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn send_request(key: &str, phone: &str) -> SendRequest {
    SendRequest {
        idempotency_key: key.into(),
        phone_number: phone.into(),
        text: "hello over gRPC".into(),
        ..SendRequest::default()
    }
}

async fn provider_accepts(app: &TestApp, id: &str) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .expect(1)
        .mount(&app.provider)
        .await;
}

#[tokio::test]
async fn send_queues_the_command_and_the_service_sends_it() {
    let mut app = spawn(&[]).await;
    provider_accepts(&app, "grpc-msg-1").await;
    let mut client = client(&app).await;

    let mut request = Request::new(send_request("grpc-send-1", "+254712345678"));
    request
        .metadata_mut()
        .insert("x-correlation-id", "order-8812".parse().unwrap());
    let answer = client.send(request).await.expect("Send succeeds");
    assert_eq!(answer.into_inner().idempotency_key, "grpc-send-1");

    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    let event = sent[0].json();
    assert_eq!(event["idempotencyKey"], "grpc-send-1");
    assert_eq!(event["providerMessageId"], "grpc-msg-1");
    assert_eq!(
        sent[0]
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("order-8812"),
        "x-correlation-id metadata becomes the command's correlation_id"
    );
    let status = client
        .get_status(GetStatusRequest {
            idempotency_key: "grpc-send-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, "sent");
    assert_eq!(status.provider_message_id.as_deref(), Some("grpc-msg-1"));
    app.cleanup().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_with_the_reason_http_gives() {
    let app = spawn(&[]).await;
    let mut client = client(&app).await;
    let cases = [
        (
            send_request("grpc-bad-phone", "0712345678"),
            "invalid_phone_number: ",
        ),
        (send_request("", "+254712345678"), "invalid_command: "),
        (
            SendRequest {
                text: String::new(),
                ..send_request("grpc-no-text", "+254712345678")
            },
            "invalid_command: text is required",
        ),
    ];
    for (request, reason) in cases {
        let refused = client.send(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().starts_with(reason), "{refused:?}");
    }
    // The same body over HTTP gives the same reason and detail.
    let http = app
        .http
        .post(format!("{}/v1/messages", app.base_url))
        .json(&json!({"idempotencyKey": "grpc-bad-phone", "phoneNumber": "0712345678", "text": "hello over gRPC"}))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), 400);
    let http: serde_json::Value = http.json().await.unwrap();
    let grpc = client
        .send(send_request("grpc-bad-phone", "0712345678"))
        .await
        .unwrap_err();
    assert_eq!(
        grpc.message(),
        format!(
            "{}: {}",
            http["error"].as_str().unwrap(),
            http["detail"].as_str().unwrap()
        )
    );
    // A key reused with another payload is ALREADY_EXISTS (HTTP's 409).
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "x"})))
        .mount(&app.provider)
        .await;
    client
        .send(send_request("grpc-reused", "+254712345678"))
        .await
        .unwrap();
    let reused = client
        .send(send_request("grpc-reused", "+254799999999"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert!(reused.message().starts_with("idempotency_key_reused: "));
    let unknown = client
        .get_status(GetStatusRequest {
            idempotency_key: "grpc-never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_missing_or_wrong_api_key_is_unauthenticated_where_keys_are_configured() {
    let app = spawn(&[("SMS__HTTP__API_KEYS", API_KEY)]).await;
    let mut client = client(&app).await;
    for key in [None, Some("not-the-configured-key-000")] {
        let refused = client
            .send(with_key(send_request("grpc-auth-1", "+254712345678"), key))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{key:?}");
        let refused = client
            .get_status(with_key(
                GetStatusRequest {
                    idempotency_key: "grpc-auth-1".into(),
                },
                key,
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{key:?}");
    }
    let unknown = client
        .get_status(with_key(
            GetStatusRequest {
                idempotency_key: "grpc-auth-1".into(),
            },
            Some(API_KEY),
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "nothing was admitted");
    // Health needs no key, as /readyz does not.
    let health = HealthClient::new(channel(&app).await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_watch_follows_a_key_to_its_delivery_report_and_ends_there() {
    let app = spawn(&[]).await;
    provider_accepts(&app, "grpc-watch-msg").await;
    let mut client = client(&app).await;
    client
        .send(send_request("grpc-watch-1", "+254712345678"))
        .await
        .unwrap();
    let mut stream = client
        .watch_status(WatchStatusRequest {
            idempotency_key: "grpc-watch-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<MessageStatus> = Vec::new();
    let mut reported = false;
    let outcome = tokio::time::timeout(WAIT, async {
        while let Some(item) = stream.next().await {
            let status = item.expect("the watch ends without an error");
            if status.status == "sent" && !reported {
                reported = true;
                let report = app
                    .http
                    .post(format!("{}/v1/delivery-reports", app.base_url))
                    .json(&json!({"id": "grpc-watch-msg", "status": "delivered"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(report.status(), 204);
            }
            seen.push(status);
        }
    })
    .await;
    assert!(outcome.is_ok(), "the watch ended; saw {seen:?}");
    let statuses: Vec<&str> = seen.iter().map(|s| s.status.as_str()).collect();
    assert_eq!(statuses.last(), Some(&"delivered"), "{statuses:?}");
    assert!(statuses.contains(&"sent"), "{statuses:?}");
    let last = seen.last().unwrap();
    assert_eq!(last.delivery_status.as_deref(), Some("delivered"));
    assert_eq!(last.history.len(), 1, "{last:?}");
    assert_eq!(last.history[0].status, "delivered");
    let unknown = client
        .watch_status(WatchStatusRequest {
            idempotency_key: "grpc-watch-never".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    app.cleanup().await;
}

#[tokio::test]
async fn health_says_serving_once_ready_and_reflection_lists_the_service() {
    let app = spawn(&[]).await;
    let mut health = HealthClient::new(channel(&app).await);
    let mut serving = None;
    for _ in 0..50 {
        let answer = health
            .check(HealthCheckRequest {
                service: "sms.v1.SmsService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        serving = Some(answer.status());
        if serving == Some(ServingStatus::Serving) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(serving, Some(ServingStatus::Serving));

    let mut reflection = ServerReflectionClient::new(channel(&app).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"sms.v1.SmsService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    app.cleanup().await;
}

//! The Infobip adapter over real HTTP: the request it sends, compared field
//! by field with Infobip's Send SMS message (v3) page, some answers end to
//! end (wiremock), and the fake provider's Infobip dialect taking what the
//! adapter sends and answering its failures in Infobip's words. The
//! instance is configured through `SMS__PROVIDERS__IB__*`, as an operator
//! would.
//!
//! Send SMS message: https://www.infobip.com/docs/api/channels/sms/sms-messaging/outbound-sms/send-sms-messages

use std::time::Duration;

use serde_json::{json, Value};
use sms_service::adapters::providers::infobip::InfobipProvider;
use sms_service::config::ProviderKind;
use sms_service::domain::SendSms;
use sms_service::fake_provider::{self, FakeSettings};
use sms_service::ports::{Accepted, ProviderError, SmsService};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{settings, Names};

const API_KEY: &str = "003026bbc133714df1834b8638bb496e-8f4b3d9a";

/// An Infobip instance named `ib` at `base_url`, built from settings loaded
/// from the environment.
fn provider(base_url: &str, extra: &[(&str, &str)]) -> InfobipProvider {
    let mut env = Names::unique().env(base_url);
    for (k, v) in [
        ("SMS__PROVIDERS__IB__KIND", "infobip"),
        ("SMS__PROVIDERS__IB__BASE_URL", base_url),
        ("SMS__PROVIDERS__IB__API_KEY", API_KEY),
        ("SMS__PROVIDERS__IB__FROM", "MKOPA"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        env.push((k.to_owned(), v.to_owned()));
    }
    let instances = settings(&env).instances().unwrap().0;
    assert_eq!(instances[0].kind, ProviderKind::Infobip);
    InfobipProvider::new(&instances[0]).unwrap()
}

fn sms(key: &str, sender: Option<&str>) -> SendSms {
    let mut command =
        json!({"idempotencyKey": key, "phoneNumber": "+254712345678", "text": "Payment received"});
    if let Some(sender) = sender {
        command["senderId"] = json!(sender);
    }
    SendSms::from_json(command.to_string().as_bytes()).unwrap()
}

/// The documented 200 answer for one destination
/// ("Response for request with one destination").
fn pending(message_id: &str, parts: u32) -> Value {
    json!({
        "bulkId": "2034072219640523072",
        "messages": [{
            "messageId": message_id,
            "status": {"groupId": 1, "groupName": "PENDING", "id": 26,
                       "name": "PENDING_ACCEPTED", "description": "Message sent to next instance"},
            "destination": "254712345678",
            "details": {"messageCount": parts}
        }]
    })
}

async fn answered(
    template: ResponseTemplate,
    extra: &[(&str, &str)],
) -> Result<Accepted, ProviderError> {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/3/messages"))
        .respond_with(template)
        .mount(&server)
        .await;
    provider(&server.uri(), extra).send(&sms("k-1", None)).await
}

#[tokio::test]
async fn the_adapter_sends_infobips_documented_request_field_by_field() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/3/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pending("pay-8812", 1)))
        .expect(2)
        .mount(&server)
        .await;
    let ib = provider(&server.uri(), &[]);
    let accepted = ib.send(&sms("pay-8812", None)).await.unwrap();
    assert_eq!(accepted.provider_message_id, "pay-8812");
    assert_eq!(accepted.segments, Some(1));
    ib.send(&sms("pay-8813", Some("SHOP"))).await.unwrap();

    let requests = server.received_requests().await.unwrap();
    let first = &requests[0];
    assert_eq!(first.method.as_str(), "POST");
    assert_eq!(first.url.path(), "/sms/3/messages");
    assert_eq!(first.url.query(), None);
    let header = |name: &str| first.headers.get(name).map(|v| v.to_str().unwrap());
    // API key authentication: `Authorization: App <key>`.
    assert_eq!(
        header("authorization"),
        Some(format!("App {API_KEY}").as_str())
    );
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("accept"), Some("application/json"));
    let body: Value = serde_json::from_slice(&first.body).unwrap();
    let message = &body["messages"][0];
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(message["sender"], "MKOPA");
    assert_eq!(message["destinations"].as_array().unwrap().len(), 1);
    // International format without the `+`, as every example gives it.
    assert_eq!(message["destinations"][0]["to"], "254712345678");
    // The idempotency key, so that Infobip refuses a second send of it.
    assert_eq!(message["destinations"][0]["messageId"], "pay-8812");
    assert_eq!(message["content"]["text"], "Payment received");
    assert_eq!(body["options"]["includeSmsCountInResponse"], true);
    // Nothing else: no validity, no webhook, no bulk options.
    assert_eq!(
        body,
        json!({
            "messages": [{
                "sender": "MKOPA",
                "destinations": [{"to": "254712345678", "messageId": "pay-8812"}],
                "content": {"text": "Payment received"}
            }],
            "options": {"includeSmsCountInResponse": true}
        })
    );

    let second: Value = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(
        second["messages"][0]["sender"], "SHOP",
        "the command's senderId wins"
    );
    assert_eq!(
        second["messages"][0]["destinations"][0]["messageId"],
        "pay-8813"
    );
}

#[tokio::test]
async fn a_base_url_with_a_trailing_slash_still_posts_to_the_api_path() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/3/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pending("k-1", 1)))
        .expect(1)
        .mount(&server)
        .await;
    let ib = provider(&format!("{}/", server.uri()), &[]);
    assert!(ib.send(&sms("k-1", None)).await.is_ok());
}

#[tokio::test]
async fn infobips_answers_reach_the_core_in_their_classes() {
    // A rejection inside a 200 answer (status codes page, REJECTED group).
    let no_credits = json!({"messages": [{"messageId": "k-1", "status": {
        "groupId": 5, "groupName": "REJECTED", "id": 12,
        "name": "REJECTED_NOT_ENOUGH_CREDITS", "description": "Not enough credits"}}]});
    let err = answered(ResponseTemplate::new(200).set_body_json(no_credits), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), "account", "{err:?}");

    let bad_number = json!({"messages": [{"messageId": "k-1", "status": {
        "groupId": 5, "groupName": "REJECTED", "id": 52,
        "name": "REJECTED_INVALID_DESTINATION", "description": "Invalid destination address"}}]});
    let err = answered(ResponseTemplate::new(200).set_body_json(bad_number), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProviderError::Rejected {
                invalid_number: true,
                ..
            }
        ),
        "{err:?}"
    );

    // The documented ApiError answers (E401, E429 with a Retry-After, E500).
    let e401 = json!({"errorCode": "E401", "description": "The request lacks valid authentication credentials for the requested resource.",
                      "action": "Check the resources and adjust authentication credentials.", "violations": [], "resources": []});
    let err = answered(ResponseTemplate::new(401).set_body_json(e401), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), "account", "{err:?}");
    assert!(!err.to_string().contains(API_KEY), "{err}");

    let e429 = json!({"errorCode": "E429", "description": "Too many requests sent.", "violations": [], "resources": []});
    let err = answered(
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "3")
            .set_body_json(e429),
        &[],
    )
    .await
    .unwrap_err();
    assert_eq!(
        err,
        ProviderError::Transient {
            detail: "HTTP 429: E429 Too many requests sent.".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
    );

    let e500 = json!({"errorCode": "E500", "description": "Something went wrong.", "action": "Contact the support.", "violations": [], "resources": []});
    let err = answered(ResponseTemplate::new(500).set_body_json(e500), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), "ambiguous", "{err:?}");
}

#[tokio::test]
async fn no_answer_in_time_is_ambiguous_and_no_server_is_transient() {
    let slow = ResponseTemplate::new(200)
        .set_body_json(pending("k-1", 1))
        .set_delay(Duration::from_millis(1500));
    let err = answered(slow, &[("SMS__PROVIDERS__IB__REQUEST_TIMEOUT_MS", "300")])
        .await
        .unwrap_err();
    assert_eq!(err.class(), "ambiguous", "{err:?}");

    // A port nobody listens on: the request never left.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = provider(&url, &[])
        .send(&sms("k-1", None))
        .await
        .unwrap_err();
    assert_eq!(err.class(), "transient", "{err:?}");
}

/// Starts the fake provider in Infobip's dialect on a free port.
async fn fake(settings: FakeSettings) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move { fake_provider::serve(listener, settings, stop).await });
    (url, shutdown)
}

fn infobip_fake(credential: Option<&str>) -> FakeSettings {
    FakeSettings {
        kind: ProviderKind::Infobip,
        credentials: credential
            .map(|key| [("api_key".to_owned(), key.to_owned())].into())
            .unwrap_or_default(),
        ..FakeSettings::default()
    }
}

#[tokio::test]
async fn the_infobip_fake_accepts_what_the_adapter_sends_and_refuses_a_wrong_key() {
    let (url, shutdown) = fake(infobip_fake(Some(API_KEY))).await;
    let accepted = provider(&url, &[])
        .send(&sms("fake-k-1", None))
        .await
        .unwrap();
    assert_eq!(
        accepted.provider_message_id, "fake-k-1",
        "Infobip echoes the messageId sent"
    );
    assert_eq!(accepted.segments, Some(1));
    let stats: Value = reqwest::get(format!("{url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accepted"], 1, "{stats}");
    assert_eq!(stats["distinctKeys"], 1, "{stats}");

    let err = provider(&url, &[("SMS__PROVIDERS__IB__API_KEY", "another-key")])
        .send(&sms("fake-k-2", None))
        .await
        .unwrap_err();
    assert_eq!(err.class(), "account", "{err:?}");
    assert!(err.to_string().contains("E401"), "{err}");
    shutdown.cancel();
}

#[tokio::test]
async fn the_infobip_fake_answers_a_request_missing_its_text_with_infobips_e400() {
    let (url, shutdown) = fake(infobip_fake(None)).await;
    let answer = reqwest::Client::new()
        .post(format!("{url}/sms/3/messages"))
        .header("Authorization", "App any-key")
        .json(&json!({"messages": [{"destinations": [{"to": "254712345678"}], "content": {}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["errorCode"], "E400");
    assert_eq!(
        body["violations"][0]["property"],
        "messages[0].content.text"
    );

    let unauthenticated = reqwest::Client::new()
        .post(format!("{url}/sms/3/messages"))
        .header("Authorization", "Bearer any-key")
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        unauthenticated.status(),
        401,
        "only the App scheme is known"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_adapter_classifies_the_infobip_fakes_failure_rejection_and_throttling() {
    let cases = [
        (
            FakeSettings {
                fail_rate: 1.0,
                ..infobip_fake(None)
            },
            "transient",
            "REJECTED_SYSTEM_ERROR",
        ),
        (
            FakeSettings {
                reject_rate: 1.0,
                ..infobip_fake(None)
            },
            "rejected",
            "REJECTED_DND",
        ),
        (
            FakeSettings {
                throttle_rate: 1.0,
                ..infobip_fake(None)
            },
            "transient",
            "E429",
        ),
    ];
    for (settings, class, words) in cases {
        let (url, shutdown) = fake(settings).await;
        let err = provider(&url, &[])
            .send(&sms("fake-k-3", None))
            .await
            .unwrap_err();
        assert_eq!(err.class(), class, "{err:?}");
        assert!(err.to_string().contains(words), "{err}");
        shutdown.cancel();
    }
}

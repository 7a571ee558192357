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

use crate::e2e::{free_port, service, wait_http, Proc};
use crate::helpers::{command, init_logs, settings, Names, TestBroker};

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
    // Nothing else: no validity, no bulk options, and without
    // http.public_url no delivery webhook.
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

// ------------------------------------------------------------ delivery reports

/// The path token of the `ib` instance's callbacks.
const CALLBACK_TOKEN: &str = "ib-callback-token-0123456789";

/// The real binary with an Infobip instance `ib` at the fake (another run
/// of the binary), `http.public_url` set, so that every message names its
/// delivery webhook.
struct Service {
    _fake: Proc,
    _svc: Proc,
    base_url: String,
    callback_url: String,
    http: reqwest::Client,
}

/// Starts the fake in Infobip's dialect and the service in front of it;
/// with `reports`, the fake calls back to the instance's callback URL
/// (`--dlr-url`), with these flags added.
async fn service_and_fake(names: &Names, reports: Option<&[&str]>) -> Service {
    let (http_port, fake_port) = (free_port(), free_port());
    let base_url = format!("http://127.0.0.1:{http_port}");
    let fake_url = format!("http://127.0.0.1:{fake_port}");
    let callback_url = format!("{base_url}/v1/callbacks/ib/{CALLBACK_TOKEN}");
    let mut env = names.env("http://127.0.0.1:9");
    for (k, v) in [
        ("SMS__HTTP__BIND", format!("127.0.0.1:{http_port}")),
        ("SMS__HTTP__PUBLIC_URL", base_url.clone()),
        ("SMS__PROVIDERS__IB__KIND", "infobip".into()),
        ("SMS__PROVIDERS__IB__BASE_URL", fake_url.clone()),
        ("SMS__PROVIDERS__IB__API_KEY", API_KEY.into()),
        ("SMS__PROVIDERS__IB__FROM", "MKOPA".into()),
        ("SMS__PROVIDERS__IB__CALLBACK_TOKEN", CALLBACK_TOKEN.into()),
    ] {
        env.push((k.to_owned(), v));
    }
    let bind = format!("127.0.0.1:{fake_port}");
    let credential = format!("api_key={API_KEY}");
    let mut args = vec![
        "fake-provider",
        "--kind",
        "infobip",
        "--bind",
        &bind,
        "--credential",
        &credential,
    ];
    if let Some(flags) = reports {
        args.extend_from_slice(&["--dlr-url", &callback_url, "--dlr-delay-ms", "100"]);
        args.extend_from_slice(flags);
    }
    let fake = Proc(service(&env, &args).spawn().unwrap());
    wait_http(&format!("{fake_url}/healthz")).await;
    let svc = Proc(service(&env, &["run"]).spawn().unwrap());
    wait_http(&format!("{base_url}/readyz")).await;
    Service {
        _fake: fake,
        _svc: svc,
        base_url,
        callback_url,
        http: reqwest::Client::new(),
    }
}

impl Service {
    async fn message(&self, key: &str) -> Value {
        self.http
            .get(format!("{}/v1/messages/{key}", self.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Posts an Infobip report body to `url`; the answer's status.
    async fn report(&self, url: &str, body: &Value) -> u16 {
        self.http
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// Publishes one command and checks its SmsSent: sent by `ib`, under the
/// key Infobip echoes as its `messageId`.
async fn sent_by_infobip(broker: &mut TestBroker, key: &str) {
    broker
        .publish_command(
            &command(key, "+254712345678", "Payment received"),
            Default::default(),
        )
        .await;
    let sent = broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "SmsSent");
    assert_eq!(sent[0].json()["provider"], "ib");
    assert_eq!(sent[0].json()["providerMessageId"], key);
}

fn history_of(message: &Value) -> Vec<(String, String)> {
    message["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["status"].as_str().unwrap().to_owned(),
                e["providerStatus"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_infobip_message_goes_from_sent_to_delivered_through_infobips_webhook() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    let svc = service_and_fake(&names, Some(&[])).await;
    sent_by_infobip(&mut broker, "ib-dlr-1").await;

    // The fake reports DELIVERED_TO_OPERATOR (intermediate: no event),
    // then DELIVERED_TO_HANDSET.
    let reports = broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1, "one SmsDeliveryReport");
    let report = reports[0].json();
    assert_eq!(report["idempotencyKey"], "ib-dlr-1");
    assert_eq!(report["provider"], "ib");
    assert_eq!(report["providerMessageId"], "ib-dlr-1");
    assert_eq!(report["status"], "delivered");
    assert_eq!(report["providerStatus"], "DELIVERED_TO_HANDSET");
    assert_eq!(report["errorCode"], Value::Null);
    assert_eq!(report["permanent"], false);
    assert_eq!(report["phoneNumber"], "+254712345678");
    assert!(
        broker
            .deliveries(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "the intermediate report publishes nothing"
    );

    let message = svc.message("ib-dlr-1").await;
    assert_eq!(message["status"], "delivered", "{message}");
    assert_eq!(message["deliveryStatus"], "delivered", "{message}");
    assert_eq!(message["provider"], "ib", "{message}");
    assert_eq!(
        history_of(&message),
        [
            ("sent".to_owned(), "DELIVERED_TO_OPERATOR".to_owned()),
            ("delivered".to_owned(), "DELIVERED_TO_HANDSET".to_owned())
        ],
        "{message}"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn an_infobip_message_the_network_cannot_deliver_ends_undelivered_and_permanent() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    let svc = service_and_fake(&names, Some(&["--dlr-fail-rate", "1"])).await;
    sent_by_infobip(&mut broker, "ib-dlr-2").await;

    let reports = broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1, "one SmsDeliveryReport");
    let report = reports[0].json();
    assert_eq!(report["provider"], "ib");
    assert_eq!(report["status"], "undelivered");
    assert_eq!(report["providerStatus"], "UNDELIVERABLE_NOT_DELIVERED");
    assert_eq!(report["errorCode"], "EC_UNKNOWN_SUBSCRIBER");
    assert_eq!(report["permanent"], true);

    let message = svc.message("ib-dlr-2").await;
    assert_eq!(message["status"], "undelivered", "{message}");
    assert_eq!(message["deliveryStatus"], "undelivered", "{message}");
    assert_eq!(
        history_of(&message),
        [(
            "undelivered".to_owned(),
            "UNDELIVERABLE_NOT_DELIVERED".to_owned()
        )],
        "{message}"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn an_infobip_report_without_the_right_path_token_is_refused_and_changes_nothing() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    // The fake does not call back: the test posts the reports.
    let svc = service_and_fake(&names, None).await;
    sent_by_infobip(&mut broker, "ib-dlr-3").await;
    // As Infobip's webhook page shows a report.
    let delivered = json!({"results": [{
        "bulkId": "BULK-ID-123-xyz", "messageId": "ib-dlr-3", "to": "254712345678",
        "sentAt": "2019-11-09T16:00:00.000+0000", "doneAt": "2019-11-09T16:00:00.000+0000",
        "messageCount": 1, "price": {"pricePerMessage": 0.01, "currency": "EUR"},
        "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5,
                   "name": "DELIVERED_TO_HANDSET", "description": "Message delivered to handset"},
        "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR",
                  "description": "No Error", "permanent": false}
    }]});
    let instance_url = format!("{}/v1/callbacks/ib", svc.base_url);
    let mut wrong = CALLBACK_TOKEN.as_bytes().to_vec();
    wrong[3] ^= 0x01;
    let wrong = String::from_utf8(wrong).unwrap();
    for url in [
        format!("{instance_url}/{wrong}"),
        format!("{instance_url}/{}", &CALLBACK_TOKEN[1..]),
        instance_url.clone(),
    ] {
        assert_eq!(svc.report(&url, &delivered).await, 403, "{url}");
    }
    // The right token, but not Infobip's format.
    let other = json!({"id": "ib-dlr-3", "status": "delivered"});
    assert_eq!(svc.report(&svc.callback_url, &other).await, 400);
    assert!(
        broker
            .deliveries(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing published"
    );
    let message = svc.message("ib-dlr-3").await;
    assert_eq!(message["status"], "sent", "{message}");
    assert!(history_of(&message).is_empty(), "{message}");

    // The same report with the right token is taken.
    assert_eq!(svc.report(&svc.callback_url, &delivered).await, 204);
    let reports = broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].json()["status"], "delivered");
    broker.cleanup().await;
}

#[tokio::test]
async fn with_a_public_url_each_message_names_the_instances_callback_url_as_its_webhook() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/3/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(pending("pay-8812", 1)))
        .expect(1)
        .mount(&server)
        .await;
    let ib = provider(
        &server.uri(),
        &[
            ("SMS__HTTP__PUBLIC_URL", "https://sms.example.com/"),
            ("SMS__PROVIDERS__IB__CALLBACK_TOKEN", CALLBACK_TOKEN),
        ],
    );
    ib.send(&sms("pay-8812", None)).await.unwrap();
    let requests = server.received_requests().await.unwrap();
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    // Send SMS message (v3): messages[].webhooks.delivery.url and
    // webhooks.contentType.
    assert_eq!(
        body["messages"][0]["webhooks"],
        json!({
            "delivery": {"url": format!("https://sms.example.com/v1/callbacks/ib/{CALLBACK_TOKEN}")},
            "contentType": "application/json"
        })
    );
    assert_eq!(
        body["messages"][0]["destinations"][0]["messageId"],
        "pay-8812"
    );
}

#[tokio::test]
async fn the_infobip_fake_reports_each_stage_of_a_request_in_one_batch() {
    // Where the fake calls back.
    let service = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/callbacks/ib/token"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&service)
        .await;
    let (url, shutdown) = fake(FakeSettings {
        reports: Some(fake_provider::ReportSettings {
            url: format!("{}/v1/callbacks/ib/token", service.uri()),
            ..Default::default()
        }),
        ..infobip_fake(None)
    })
    .await;
    let answer = reqwest::Client::new()
        .post(format!("{url}/sms/3/messages"))
        .header("Authorization", "App any-key")
        .json(&json!({"messages": [{
            "sender": "MKOPA",
            "destinations": [{"to": "254712345678", "messageId": "m-1"},
                             {"to": "254798765432", "messageId": "m-2"}],
            "content": {"text": "hi"},
            "webhooks": {"delivery": {"url": "ignored: the fake calls --dlr-url",
                                      "intermediateReport": true},
                         "contentType": "application/json"}
        }]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut calls = Vec::new();
    for _ in 0..100 {
        calls = service.received_requests().await.unwrap();
        if calls.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stages: Vec<Vec<(String, String)>> = calls
        .iter()
        .map(|call| {
            let body: Value = serde_json::from_slice(&call.body).unwrap();
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["messageId"].as_str().unwrap().to_owned(),
                        r["status"]["name"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .collect();
    let stage = |name: &str| {
        vec![
            ("m-1".to_owned(), name.to_owned()),
            ("m-2".to_owned(), name.to_owned()),
        ]
    };
    assert_eq!(
        stages,
        [
            stage("PENDING_ENROUTE"),
            stage("DELIVERED_TO_OPERATOR"),
            stage("DELIVERED_TO_HANDSET")
        ]
    );
    let last: Value = serde_json::from_slice(&calls[2].body).unwrap();
    assert_eq!(last["results"][0]["error"]["name"], "NO_ERROR");
    assert_eq!(last["results"][0]["to"], "254712345678");
    assert_eq!(
        calls[0].headers.get("content-type").unwrap(),
        "application/json"
    );
    shutdown.cancel();
}

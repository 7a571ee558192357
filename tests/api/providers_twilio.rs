//! The Twilio adapter over real HTTP. Against wiremock: the request it
//! sends, compared field by field with the form Twilio documents, and its
//! answers classified end to end. Against the fake provider's Twilio
//! dialect: the fake takes what the adapter sends, and the adapter reads
//! the fake's failure, rejection and throttling as the right classes.
//! Every instance is built from `SMS__PROVIDERS__TW__*` variables, through
//! `providers::build`, as the service builds it. End to end, through the
//! service's binary and the fake's: a message's status callbacks, signed as
//! Twilio signs them, reach `/v1/callbacks/tw` and become its delivery
//! report; a callback signed otherwise is refused and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sms_service::adapters::providers;
use sms_service::config::{ProviderKind, Settings};
use sms_service::domain::SendSms;
use sms_service::fake_provider::{self, FakeSettings};
use sms_service::ports::{Accepted, ProviderError, SmsService};
use tokio_util::sync::CancellationToken;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::e2e::{free_port, service, wait_http, Proc};
use crate::helpers::{command, init_logs, settings, spawn_app_with, Names, TestBroker};

const SID: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "s3cr3t-t0ken";
const SERVICE: &str = "MG00112233445566778899aabbccddeeff";
/// `base64("AC0123456789abcdef0123456789abcdef:s3cr3t-t0ken")`, worked out
/// apart from the code under test.
const BASIC: &str = "Basic QUMwMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZjpzM2NyM3QtdDBrZW4=";
const MESSAGES_PATH: &str = "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json";

/// The environment of a Twilio instance named `tw` at `base_url`.
fn env(base_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [
        ("KIND", "twilio"),
        ("BASE_URL", base_url),
        ("ACCOUNT_SID", SID),
        ("AUTH_TOKEN", TOKEN),
        ("REQUEST_TIMEOUT_MS", "2000"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (format!("SMS__PROVIDERS__TW__{k}"), v.to_string()))
    .collect()
}

/// The service's adapter for that instance.
fn twilio(base_url: &str, extra: &[(&str, &str)]) -> Arc<dyn SmsService> {
    twilio_behind(None, base_url, extra)
}

/// The adapter of a service whose `http.public_url` is `public_url`.
fn twilio_behind(
    public_url: Option<&str>,
    base_url: &str,
    extra: &[(&str, &str)],
) -> Arc<dyn SmsService> {
    let mut env = env(base_url, extra);
    if let Some(url) = public_url {
        env.push(("SMS__HTTP__PUBLIC_URL".into(), url.into()));
    }
    let settings: Settings = settings(&env);
    let (instances, _) = settings.instances().expect("a valid instance");
    assert_eq!(instances[0].kind, ProviderKind::Twilio);
    providers::build(&instances[0]).expect("the adapter builds")
}

fn sms(sender: Option<&str>) -> SendSms {
    let mut body = json!({"idempotencyKey": "pay-8812", "phoneNumber": "+254712345678", "text": "Payment received: 100% thanks"});
    if let Some(sender) = sender {
        body["senderId"] = json!(sender);
    }
    SendSms::from_json(body.to_string().as_bytes()).unwrap()
}

/// A created Message as Twilio answers it (the `create` example of
/// `CreateMessage` in twilio-oai's `twilio_api_v2010.json`, shortened).
fn created(sid: &str, segments: &str) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({
        "account_sid": SID, "api_version": "2010-04-01", "body": "Payment received",
        "direction": "outbound-api", "error_code": null, "error_message": null,
        "from": "+15005550006", "num_media": "0", "num_segments": segments,
        "price": null, "sid": sid, "status": "queued", "to": "+254712345678",
    }))
}

/// An error as Twilio answers it
/// (<https://www.twilio.com/docs/usage/twilios-response>).
fn twilio_error(status: u16, code: u32, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "code": code, "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status,
    }))
}

/// The one request the server received, as (method, path, authorization,
/// content type, form fields in order).
async fn the_request(
    server: &MockServer,
) -> (String, String, String, String, Vec<(String, String)>) {
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "one request per message");
    let r = &requests[0];
    let header = |name: &str| {
        r.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let form = url::form_urlencoded::parse(&r.body).into_owned().collect();
    (
        r.method.to_string(),
        r.url.path().to_owned(),
        header("authorization"),
        header("content-type"),
        form,
    )
}

/// Name-value pairs, as settings and form fields are written here.
type Pairs<'a> = &'a [(&'a str, &'a str)];

/// How a test tunes the fake.
type Tune = fn(&mut FakeSettings);

fn fields(pairs: Pairs) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn the_request_is_the_documented_form_post_with_basic_credentials() {
    // https://www.twilio.com/docs/messaging/api/message-resource (create)
    // and CreateMessage in twilio-oai: POST to the account's Messages.json,
    // HTTP Basic with Account SID and Auth Token, form-encoded To, From, Body.
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(created("SM0123456789abcdef0123456789abcdef", "1"))
        .mount(&server)
        .await;
    let accepted = twilio(&server.uri(), &[("FROM", "+15005550006")])
        .send(&sms(None))
        .await
        .unwrap();
    assert_eq!(
        accepted,
        Accepted {
            provider_message_id: "SM0123456789abcdef0123456789abcdef".into(),
            segments: Some(1),
            other_part_ids: Vec::new(),
        }
    );
    let (method, path, authorization, content_type, form) = the_request(&server).await;
    assert_eq!(method, "POST");
    assert_eq!(path, MESSAGES_PATH);
    assert_eq!(authorization, BASIC);
    assert_eq!(content_type, "application/x-www-form-urlencoded");
    assert_eq!(
        form,
        fields(&[
            ("To", "+254712345678"),
            ("From", "+15005550006"),
            ("Body", "Payment received: 100% thanks"),
        ])
    );
}

#[tokio::test]
async fn the_status_callback_url_is_sent_only_when_the_service_has_a_public_url() {
    // StatusCallback, "the URL of the endpoint to which Twilio sends Message
    // status callback requests" (create, in
    // https://www.twilio.com/docs/messaging/api/message-resource): the
    // instance's /v1/callbacks/{name} under http.public_url.
    for (public_url, expected) in [
        (None, None),
        (
            Some("https://sms.example.com"),
            Some("https://sms.example.com/v1/callbacks/tw"),
        ),
        (
            Some("https://example.com/sms/"),
            Some("https://example.com/sms/v1/callbacks/tw"),
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(created("SM1", "1"))
            .mount(&server)
            .await;
        twilio_behind(public_url, &server.uri(), &[("FROM", "+15005550006")])
            .send(&sms(None))
            .await
            .unwrap();
        let (_, _, _, _, form) = the_request(&server).await;
        let mut fields = fields(&[
            ("To", "+254712345678"),
            ("From", "+15005550006"),
            ("Body", "Payment received: 100% thanks"),
        ]);
        if let Some(url) = expected {
            fields.push(("StatusCallback".into(), url.into()));
        }
        assert_eq!(form, fields, "{public_url:?}");
    }
}

#[tokio::test]
async fn the_sender_is_the_command_s_sender_id_else_from_and_a_messaging_service_goes_beside_it() {
    // From and MessagingServiceSid as the Message resource describes them:
    // either, or both (a specific sender of the service's pool).
    let cases: [(Pairs, Option<&str>, Pairs); 4] = [
        (
            &[("FROM", "+15005550006")],
            Some("MKOPA"),
            &[("From", "MKOPA")],
        ),
        (
            &[("MESSAGING_SERVICE_SID", SERVICE)],
            None,
            &[("MessagingServiceSid", SERVICE)],
        ),
        (
            &[("MESSAGING_SERVICE_SID", SERVICE)],
            Some("MKOPA"),
            &[("From", "MKOPA"), ("MessagingServiceSid", SERVICE)],
        ),
        (
            &[("FROM", "+15005550006"), ("MESSAGING_SERVICE_SID", SERVICE)],
            None,
            &[("From", "+15005550006"), ("MessagingServiceSid", SERVICE)],
        ),
    ];
    for (config, sender, expected_sender) in cases {
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(created("SM1", "0"))
            .mount(&server)
            .await;
        let accepted = twilio(&server.uri(), config).send(&sms(sender)).await;
        // "0" parts: a Messaging Service has not picked a sender yet.
        assert_eq!(accepted.unwrap().segments, None);
        let (_, _, _, _, form) = the_request(&server).await;
        let mut expected = fields(&[("To", "+254712345678")]);
        expected.extend(fields(expected_sender));
        expected.extend(fields(&[("Body", "Payment received: 100% thanks")]));
        assert_eq!(form, expected, "{config:?} {sender:?}");
    }
}

#[tokio::test]
async fn twilio_s_answers_reach_the_core_in_their_classes() {
    let cases: [(ResponseTemplate, &str); 7] = [
        // https://www.twilio.com/docs/api/errors/21211
        (
            twilio_error(
                400,
                21211,
                "The 'To' number +254712345678 is not a valid phone number.",
            ),
            "rejected invalid_number",
        ),
        // https://www.twilio.com/docs/api/errors/21610
        (
            twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"),
            "rejected",
        ),
        // https://www.twilio.com/docs/api/errors/21408
        (
            twilio_error(
                400,
                21408,
                "Permission to send an SMS has not been enabled for the region",
            ),
            "route_refused",
        ),
        // https://www.twilio.com/docs/api/errors/20003
        (twilio_error(401, 20003, "Authenticate"), "account"),
        // https://www.twilio.com/docs/api/errors/20429
        (
            twilio_error(429, 20429, "Too Many Requests").insert_header("Retry-After", "3"),
            "transient after 3s",
        ),
        // Not documented: whether a 500 created the message.
        (ResponseTemplate::new(500), "ambiguous"),
        // A timeout after the request was written.
        (
            created("SM1", "1").set_delay(Duration::from_secs(3)),
            "ambiguous",
        ),
    ];
    for (template, class) in cases {
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(template)
            .mount(&server)
            .await;
        let provider = twilio(
            &server.uri(),
            &[("FROM", "+15005550006"), ("REQUEST_TIMEOUT_MS", "500")],
        );
        let error = provider.send(&sms(None)).await.unwrap_err();
        let got = match &error {
            ProviderError::Rejected {
                invalid_number: true,
                ..
            } => "rejected invalid_number".to_owned(),
            ProviderError::Transient {
                retry_after: Some(wait),
                ..
            } => format!("transient after {}s", wait.as_secs()),
            other => other.class().to_owned(),
        };
        assert_eq!(got, class, "{error}");
        assert!(!error.to_string().contains("254712345678"), "{error}");
        assert!(!error.to_string().contains(TOKEN), "{error}");
    }
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let provider = twilio(
        &format!("http://127.0.0.1:{port}"),
        &[("FROM", "+15005550006")],
    );
    let error = provider.send(&sms(None)).await.unwrap_err();
    assert_eq!(error.class(), "transient", "{error}");
}

/// The fake provider in Twilio's dialect, on a port of its own, stopped
/// when dropped.
struct FakeTwilio {
    url: String,
    stop: CancellationToken,
}

impl Drop for FakeTwilio {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn fake_twilio(tune: impl FnOnce(&mut FakeSettings)) -> FakeTwilio {
    let mut settings = FakeSettings {
        kind: ProviderKind::Twilio,
        credentials: [("account_sid", SID), ("auth_token", TOKEN)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..FakeSettings::default()
    };
    tune(&mut settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(fake_provider::serve(listener, settings, stop.clone()));
    FakeTwilio { url, stop }
}

#[tokio::test]
async fn the_fake_twilio_takes_what_the_adapter_sends() {
    let fake = fake_twilio(|_| {}).await;
    let direct = twilio(&fake.url, &[("FROM", "+15005550006")]);
    let accepted = direct.send(&sms(None)).await.unwrap();
    assert!(
        accepted.provider_message_id.starts_with("fake-"),
        "{accepted:?}"
    );
    assert_eq!(accepted.segments, Some(1));
    let pooled = twilio(&fake.url, &[("MESSAGING_SERVICE_SID", SERVICE)]);
    let accepted = pooled.send(&sms(Some("MKOPA"))).await.unwrap();
    assert!(
        accepted.provider_message_id.starts_with("fake-"),
        "{accepted:?}"
    );
    let accepted = pooled.send(&sms(None)).await.unwrap();
    assert_eq!(
        accepted.segments, None,
        "a pooled message has no sender yet"
    );
    let stats: serde_json::Value = reqwest::get(format!("{}/stats", fake.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accepted"], 3);
}

#[tokio::test]
async fn the_fake_twilio_refuses_other_credentials_and_the_adapter_calls_it_an_account_problem() {
    let fake = fake_twilio(|s| {
        s.credentials
            .insert("auth_token".into(), "another-token".into());
    })
    .await;
    let error = twilio(&fake.url, &[("FROM", "+15005550006")])
        .send(&sms(None))
        .await
        .unwrap_err();
    assert_eq!(error.class(), "account", "{error}");
    assert!(error.to_string().contains("20003"), "{error}");
}

#[tokio::test]
async fn the_adapter_reads_the_fake_twilio_s_failure_rejection_and_throttling() {
    let cases: [(Tune, &str); 3] = [
        (|s| s.fail_rate = 1.0, "transient"),
        (|s| s.reject_rate = 1.0, "rejected"),
        (|s| s.throttle_rate = 1.0, "transient after 1s"),
    ];
    for (tune, class) in cases {
        let fake = fake_twilio(tune).await;
        let error = twilio(&fake.url, &[("FROM", "+15005550006")])
            .send(&sms(None))
            .await
            .unwrap_err();
        let got = match &error {
            ProviderError::Transient {
                retry_after: Some(wait),
                ..
            } => format!("transient after {}s", wait.as_secs()),
            ProviderError::Rejected {
                invalid_number: true,
                ..
            } => "rejected invalid_number".to_owned(),
            other => other.class().to_owned(),
        };
        assert_eq!(got, class, "{error}");
        assert!(!error.to_string().contains("254712345678"), "{error}");
    }
}

#[tokio::test]
async fn the_fake_twilio_answers_a_wrong_request_with_twilio_s_own_error() {
    // The codes of https://www.twilio.com/docs/api/errors/<code>.
    let fake = fake_twilio(|_| {}).await;
    let url = format!("{}{MESSAGES_PATH}", fake.url);
    let form = "application/x-www-form-urlencoded";
    let cases: [(&str, &str, &str, u16, u32); 8] = [
        (
            "To=%2B254712345678&From=X&Body=hi",
            form,
            "no credentials",
            401,
            20003,
        ),
        (
            "To=%2B254712345678&From=X&Body=hi",
            "application/json",
            BASIC,
            400,
            21604,
        ),
        ("From=X&Body=hi", form, BASIC, 400, 21604),
        ("To=%2B254712345678&From=X", form, BASIC, 400, 21602),
        ("To=%2B254712345678&Body=hi", form, BASIC, 400, 21603),
        (
            "To=%2B254712345678&MessagingServiceSid=MG1&Body=hi",
            form,
            BASIC,
            400,
            21705,
        ),
        ("To=0712345678&From=X&Body=hi", form, BASIC, 400, 21211),
        ("To=%2B254712345678&From=X&Body=hi", form, BASIC, 201, 0),
    ];
    let client = reqwest::Client::new();
    for (body, content_type, authorization, status, code) in cases {
        let mut request = client
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        if authorization.starts_with("Basic ") {
            request = request.header("authorization", authorization);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), status, "{body} {content_type}");
        let json: serde_json::Value = answer.json().await.unwrap();
        if code != 0 {
            assert_eq!(json["code"], code, "{body}");
            assert_eq!(json["status"], status, "{body}");
            assert_eq!(
                json["more_info"],
                format!("https://www.twilio.com/docs/errors/{code}")
            );
        } else {
            assert_eq!(json["status"], "queued");
            assert_eq!(json["num_segments"], "1");
        }
    }
    // The Account SID of the path must be the one authenticated.
    let other = url.replace("AC0123456789abcdef", "ACffffffffffffffff");
    let answer = client
        .post(other)
        .header("content-type", form)
        .header("authorization", BASIC)
        .body("To=%2B254712345678&From=X&Body=hi")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 401);
}

#[tokio::test]
async fn a_command_routed_to_a_twilio_instance_is_sent_there_and_named_in_sms_sent() {
    let fake = fake_twilio(|_| {}).await;
    let extra: Vec<(String, String)> = env(&fake.url, &[("FROM", "+15005550006")]);
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut app = spawn_app_with(&extra).await;
    app.publish(&command("tw-1", "+254712345678", "Payment received"))
        .await;
    let sent = app.broker.sent(1, Duration::from_secs(10)).await;
    assert_eq!(sent.len(), 1);
    let event = sent[0].json();
    assert_eq!(event["provider"], "tw");
    assert!(
        event["providerMessageId"]
            .as_str()
            .unwrap()
            .starts_with("fake-"),
        "{event}"
    );
    assert_eq!(event["segments"], 1);
    app.cleanup().await;
}

/// The service binary with one Twilio instance `tw` behind
/// `http.public_url`, and the fake Twilio binary calling back to it.
struct Lifecycle {
    broker: TestBroker,
    /// The service's base URL, also its `http.public_url`.
    base: String,
    _fake: Proc,
    _service: Proc,
}

async fn lifecycle(fake_flags: &[&str]) -> Lifecycle {
    init_logs();
    let names = Names::unique();
    let (fake_port, http_port) = (free_port(), free_port());
    let fake_url = format!("http://127.0.0.1:{fake_port}");
    let base = format!("http://127.0.0.1:{http_port}");
    let mut env = names.env(&fake_url);
    env.extend(self::env(&fake_url, &[("FROM", "+15005550006")]));
    env.push(("SMS__HTTP__BIND".into(), format!("127.0.0.1:{http_port}")));
    env.push(("SMS__HTTP__PUBLIC_URL".into(), base.clone()));
    let broker = TestBroker::connect(&names).await;
    let dlr_url = format!("{base}/v1/callbacks/tw");
    let (sid, token) = (format!("account_sid={SID}"), format!("auth_token={TOKEN}"));
    let bind = format!("127.0.0.1:{fake_port}");
    let mut args = vec![
        "fake-provider",
        "--kind",
        "twilio",
        "--bind",
        &bind,
        "--credential",
        &sid,
        "--credential",
        &token,
        "--dlr-url",
        &dlr_url,
        "--dlr-delay-ms",
        "100",
    ];
    args.extend(fake_flags);
    let fake = Proc(service(&env, &args).spawn().unwrap());
    wait_http(&format!("{fake_url}/healthz")).await;
    let svc = Proc(service(&env, &["run"]).spawn().unwrap());
    wait_http(&format!("{base}/readyz")).await;
    Lifecycle {
        broker,
        base,
        _fake: fake,
        _service: svc,
    }
}

impl Lifecycle {
    /// Publishes one command and waits for its SmsSent and its one
    /// SmsDeliveryReport (the intermediate `sent` publishes none).
    async fn sent_and_reported(&mut self, key: &str) -> (Value, Value) {
        let within = Duration::from_secs(15);
        self.broker
            .publish_command(
                &command(key, "+254712345678", "Payment received"),
                Default::default(),
            )
            .await;
        let sent = self.broker.sent(1, within).await;
        assert_eq!(sent.len(), 1, "SmsSent");
        let reports = self.broker.deliveries(1, within).await;
        assert_eq!(reports.len(), 1, "SmsDeliveryReport");
        let more = self.broker.deliveries(1, Duration::from_millis(700)).await;
        assert!(more.is_empty(), "one report per status change");
        (sent[0].json(), reports[0].json())
    }

    /// `GET /v1/messages/{key}` once its history has `entries` entries.
    async fn message(&self, key: &str, entries: usize) -> Value {
        let url = format!("{}/v1/messages/{key}", self.base);
        let mut body = Value::Null;
        for _ in 0..50 {
            body = reqwest::get(&url).await.unwrap().json().await.unwrap();
            if body["history"].as_array().map_or(0, Vec::len) >= entries {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        body
    }

    /// Posts a status callback to `/v1/callbacks/tw` with `signature`.
    async fn post(&self, fields: &[(&str, &str)], signature: &str) -> reqwest::StatusCode {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        reqwest::Client::new()
            .post(format!("{}/v1/callbacks/tw", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    }
}

/// `X-Twilio-Signature` as https://www.twilio.com/docs/usage/security
/// describes it, worked out here apart from the adapter: base64 of the
/// HMAC-SHA1 under the Auth Token of the URL and the parameters sorted by
/// name, each name followed by its value.
fn twilio_signature(token: &str, url: &str, fields: &[(&str, &str)]) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let mut sorted = fields.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The statuses of a message's history, in order, with Twilio's words.
fn history(message: &Value) -> Vec<(String, String)> {
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
async fn a_message_sent_through_twilio_is_reported_delivered_by_its_signed_status_callbacks() {
    let mut stack = lifecycle(&[]).await;
    let (sent, report) = stack.sent_and_reported("tw-dlr-1").await;
    assert_eq!(sent["provider"], "tw");
    let sid = sent["providerMessageId"].as_str().unwrap().to_owned();
    assert_eq!(report["idempotencyKey"], "tw-dlr-1");
    assert_eq!(report["provider"], "tw");
    assert_eq!(report["providerMessageId"], sid.as_str());
    assert_eq!(report["phoneNumber"], "+254712345678");
    assert_eq!(report["status"], "delivered");
    assert_eq!(report["providerStatus"], "delivered");
    assert_eq!(report["permanent"], false);
    assert!(report["errorCode"].is_null(), "{report}");

    let message = stack.message("tw-dlr-1", 2).await;
    assert_eq!(message["status"], "delivered", "{message}");
    assert_eq!(message["deliveryStatus"], "delivered");
    assert_eq!(message["provider"], "tw");
    let mut seen = history(&message);
    seen.sort();
    assert_eq!(
        seen,
        [
            ("delivered".to_owned(), "delivered".to_owned()),
            ("sent".to_owned(), "sent".to_owned()),
        ]
    );

    // A callback Twilio did not sign is refused and changes nothing: no
    // signature, one signed under another token, one whose signature
    // covers another URL, and a signed one altered after signing.
    let url = format!("{}/v1/callbacks/tw", stack.base);
    let undelivered = [
        ("AccountSid", SID),
        ("MessageSid", sid.as_str()),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30005"),
    ];
    let good = twilio_signature(TOKEN, &url, &undelivered);
    let other_token = twilio_signature("another-token", &url, &undelivered);
    let other_url = twilio_signature(TOKEN, "http://127.0.0.1/v1/callbacks/other", &undelivered);
    let mut altered = undelivered;
    altered[2].1 = "read";
    for (what, fields, signature) in [
        ("no signature", &undelivered, ""),
        ("another token", &undelivered, other_token.as_str()),
        ("another URL", &undelivered, other_url.as_str()),
        ("altered", &altered, good.as_str()),
    ] {
        assert_eq!(stack.post(fields, signature).await, 401, "{what}");
    }
    assert!(
        stack
            .broker
            .deliveries(1, Duration::from_millis(700))
            .await
            .is_empty(),
        "nothing published"
    );
    let after = stack.message("tw-dlr-1", 2).await;
    assert_eq!(history(&after).len(), 2, "nothing recorded: {after}");
    assert_eq!(after["status"], "delivered");

    // Signed as Twilio signs it, the same callback is taken (204): kept in
    // the history, but a final status is never changed or published again.
    assert_eq!(stack.post(&undelivered, &good).await, 204);
    let after = stack.message("tw-dlr-1", 3).await;
    assert_eq!(history(&after).len(), 3, "{after}");
    assert_eq!(after["deliveryStatus"], "delivered");
    assert!(stack
        .broker
        .deliveries(1, Duration::from_millis(700))
        .await
        .is_empty());
}

#[tokio::test]
async fn a_message_twilio_could_not_deliver_is_reported_undelivered_and_permanent() {
    let mut stack = lifecycle(&["--dlr-fail-rate", "1"]).await;
    let (sent, report) = stack.sent_and_reported("tw-dlr-fail-1").await;
    assert_eq!(report["providerMessageId"], sent["providerMessageId"]);
    assert_eq!(report["provider"], "tw");
    assert_eq!(report["status"], "undelivered");
    assert_eq!(report["providerStatus"], "undelivered");
    // https://www.twilio.com/docs/api/errors/30005: unknown destination handset.
    assert_eq!(report["errorCode"], "30005");
    assert_eq!(report["permanent"], true);
    let message = stack.message("tw-dlr-fail-1", 2).await;
    assert_eq!(message["status"], "undelivered", "{message}");
    assert_eq!(message["deliveryStatus"], "undelivered");
}

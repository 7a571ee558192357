//! The Vonage adapter over real HTTP: the request it sends, field by field,
//! against Vonage's SMS API reference (https://developer.vonage.com/en/api/sms),
//! answers classified end to end (wiremock), and the project's fake in the
//! Vonage dialect, in-process. Instances are built through `Settings` from
//! `SMS__PROVIDERS__VONAGE__*`, as an operator configures them.
//!
//! Delivery receipts end to end: the real binary and the fake binary, the
//! fake calling back as Vonage does
//! (https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts,
//! signed as https://developer.vonage.com/en/getting-started/concepts/signing-messages
//! says); and a two-part message whose receipts the test signs itself.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use sms_service::adapters::providers::vonage::VonageProvider;
use sms_service::config::{ProviderKind, Settings};
use sms_service::domain::SendSms;
use sms_service::fake_provider::{serve, FakeSettings};
use sms_service::ports::{Accepted, ProviderError, SmsService};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::e2e::{free_port, service, wait_http, Proc};
use crate::helpers::{command, settings, spawn_app_with, Names, TestApp, TestBroker};

const API_KEY: &str = "abcd1234";
const API_SECRET: &str = "s3cr3tS3cr3t";
/// `printf 'abcd1234:s3cr3tS3cr3t' | base64`
const BASIC: &str = "Basic YWJjZDEyMzQ6czNjcjN0UzNjcjN0";

/// The environment of one `[providers.vonage]` instance at `base_url`.
fn env(base_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    env_of(&Names::unique(), base_url, extra)
}

/// The environment of one `[providers.vonage]` instance at `base_url`, for
/// a service with `names`.
fn env_of(names: &Names, base_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = names.env(base_url);
    let vonage = [
        ("SMS__PROVIDERS__VONAGE__BASE_URL", base_url),
        ("SMS__PROVIDERS__VONAGE__API_KEY", API_KEY),
        ("SMS__PROVIDERS__VONAGE__API_SECRET", API_SECRET),
        ("SMS__PROVIDERS__VONAGE__FROM", "MKOPA"),
        ("SMS__PROVIDERS__VONAGE__REQUEST_TIMEOUT_MS", "2000"),
    ];
    for (k, v) in vonage.iter().chain(extra) {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

fn provider(base_url: &str, extra: &[(&str, &str)]) -> VonageProvider {
    let settings: Settings = settings(&env(base_url, extra));
    let (instances, _) = settings.instances().unwrap();
    assert_eq!(instances[0].kind, ProviderKind::Vonage);
    VonageProvider::new(&instances[0]).unwrap()
}

fn sms(key: &str, text: &str, sender: Option<&str>) -> SendSms {
    let mut command = json!({"idempotencyKey": key, "phoneNumber": "+254712345678", "text": text});
    if let Some(sender) = sender {
        command["senderId"] = json!(sender);
    }
    SendSms::from_json(command.to_string().as_bytes()).unwrap()
}

/// The body of one answer of `messages` (each `(status, id or error-text)`).
fn answer(parts: &[(&str, &str)]) -> Value {
    let messages: Vec<Value> = parts
        .iter()
        .map(|(status, said)| match *status {
            "0" => json!({"to": "254712345678", "message-id": said, "status": "0",
                          "remaining-balance": "15.53590000", "message-price": "0.03330000",
                          "network": "23410"}),
            _ => json!({"status": status, "error-text": said}),
        })
        .collect();
    json!({"message-count": parts.len().to_string(), "messages": messages})
}

async fn wiremock(template: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms/json"))
        .respond_with(template)
        .mount(&server)
        .await;
    server
}

/// The one request the server received: method, path, headers, form fields.
async fn received(server: &MockServer) -> wiremock::Request {
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "one request");
    requests.into_iter().next().unwrap()
}

fn header<'a>(request: &'a wiremock::Request, name: &str) -> Option<&'a str> {
    request.headers.get(name).and_then(|v| v.to_str().ok())
}

fn form(request: &wiremock::Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect()
}

fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn sends_the_documented_form_with_basic_auth_and_the_key_as_client_ref() {
    // The request of "Send an SMS": https://developer.vonage.com/en/api/sms
    let server = wiremock(ResponseTemplate::new(200).set_body_json(answer(&[("0", "0A01")]))).await;
    let accepted = provider(&server.uri(), &[])
        .send(&sms("pay-8812", "Payment received. Thank you!", None))
        .await
        .unwrap();
    assert_eq!(
        accepted,
        Accepted {
            provider_message_id: "0A01".into(),
            segments: Some(1),
            other_part_ids: Vec::new(),
        }
    );
    let request = received(&server).await;
    assert_eq!(request.method.as_str(), "POST");
    assert_eq!(request.url.path(), "/sms/json");
    assert_eq!(request.url.query(), None, "nothing in the query string");
    assert_eq!(header(&request, "authorization"), Some(BASIC));
    assert_eq!(
        header(&request, "content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        form(&request),
        pairs(&[
            ("from", "MKOPA"),
            ("to", "254712345678"),
            ("text", "Payment received. Thank you!"),
            ("type", "text"),
            ("client-ref", "pay-8812"),
        ]),
        "every field, and no credentials in the body"
    );
}

#[tokio::test]
async fn a_text_outside_gsm_goes_as_unicode_from_the_commands_own_sender() {
    // type=unicode: https://developer.vonage.com/en/messaging/sms/guides/concatenation-and-encoding
    let server = wiremock(ResponseTemplate::new(200).set_body_json(answer(&[("0", "0A02")]))).await;
    provider(
        &server.uri(),
        &[("SMS__PROVIDERS__VONAGE__FROM", "+15005550006")],
    )
    .send(&sms("k-uni", "Малипо vimepokelewa", Some("+447700900001")))
    .await
    .unwrap();
    assert_eq!(
        form(&received(&server).await),
        pairs(&[
            ("from", "447700900001"),
            ("to", "254712345678"),
            ("text", "Малипо vimepokelewa"),
            ("type", "unicode"),
            ("client-ref", "k-uni"),
        ])
    );
}

#[tokio::test]
async fn answers_are_classified_end_to_end() {
    // (answer, what it comes to); sources in the module doc's table.
    let cases: Vec<(ResponseTemplate, &str)> = vec![
        // Two parts queued (troubleshooting page, one entry per part).
        (
            ResponseTemplate::new(200).set_body_json(answer(&[("0", "0A03"), ("0", "0A04")])),
            "accepted 0A03 2",
        ),
        // https://developer.vonage.com/en/api-errors/sms
        (
            ResponseTemplate::new(200).set_body_json(answer(&[("1", "Throttled")])),
            "transient",
        ),
        (
            ResponseTemplate::new(200).set_body_json(answer(&[("9", "Partner Quota Violation")])),
            "account",
        ),
        (
            ResponseTemplate::new(200).set_body_json(answer(&[("7", "Number barred.")])),
            "rejected",
        ),
        (
            ResponseTemplate::new(200)
                .set_body_json(answer(&[("29", "Non-Whitelisted Destination")])),
            "route_refused",
        ),
        // Part queued, part throttled (the SDKs' partial failure).
        (
            ResponseTemplate::new(200).set_body_json(answer(&[("0", "0A05"), ("1", "Throttled")])),
            "rejected",
        ),
        // https://developer.vonage.com/en/api-errors ("unauthorized")
        (ResponseTemplate::new(401), "account"),
        (ResponseTemplate::new(500), "ambiguous"),
        (
            ResponseTemplate::new(429).insert_header("Retry-After", "3"),
            "transient",
        ),
    ];
    for (template, expected) in cases {
        let server = wiremock(template).await;
        let outcome = provider(&server.uri(), &[])
            .send(&sms("k-e2e", "hi", None))
            .await;
        let got = match &outcome {
            Ok(a) => format!(
                "accepted {} {}",
                a.provider_message_id,
                a.segments.unwrap_or(0)
            ),
            Err(e) => e.class().to_owned(),
        };
        assert_eq!(got, expected, "{outcome:?}");
        if let Err(ProviderError::Transient {
            retry_after: Some(wait),
            ..
        }) = outcome
        {
            assert_eq!(wait, Duration::from_secs(3));
        }
    }
}

#[tokio::test]
async fn a_timeout_after_the_request_was_written_is_ambiguous_and_a_refused_connection_transient() {
    let slow = wiremock(
        ResponseTemplate::new(200)
            .set_body_json(answer(&[("0", "late")]))
            .set_delay(Duration::from_millis(1500)),
    )
    .await;
    let timeout = [("SMS__PROVIDERS__VONAGE__REQUEST_TIMEOUT_MS", "300")];
    let err = provider(&slow.uri(), &timeout)
        .send(&sms("k-slow", "hi", None))
        .await
        .unwrap_err();
    assert_eq!(err.class(), "ambiguous", "{err:?}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = provider(&closed, &[])
        .send(&sms("k-closed", "hi", None))
        .await
        .unwrap_err();
    assert_eq!(err.class(), "transient", "{err:?}");
}

#[tokio::test]
async fn a_missing_or_malformed_credential_is_named_without_its_value() {
    let load = |extra: &[(&str, &str)]| {
        let env = env("http://127.0.0.1:9", extra);
        let map: std::collections::HashMap<String, String> = env.into_iter().collect();
        let source = sms_service::config::environment().source(Some(map));
        Settings::load_from(None, source)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(load(&[]), None, "the complete instance loads");
    let cases = [
        (
            "SMS__PROVIDERS__VONAGE__API_SECRET",
            "",
            "providers.vonage.api_secret",
        ),
        (
            "SMS__PROVIDERS__VONAGE__API_KEY",
            "",
            "providers.vonage.api_key",
        ),
        ("SMS__PROVIDERS__VONAGE__FROM", "", "providers.vonage.from"),
        (
            "SMS__PROVIDERS__VONAGE__API_KEY",
            "ab:cd1234",
            "providers.vonage.api_key",
        ),
        (
            "SMS__PROVIDERS__VONAGE__API_SECRET",
            "s3cr3t S3cr3t",
            "providers.vonage.api_secret",
        ),
    ];
    for (variable, value, key) in cases {
        let error =
            load(&[(variable, value)]).unwrap_or_else(|| panic!("{variable}={value:?} loads"));
        assert!(error.contains(key), "{variable}={value:?}: {error}");
        for secret in [API_SECRET, "s3cr3t S3cr3t", "ab:cd1234", API_KEY] {
            assert!(!error.contains(secret), "{variable}={value:?}: {error}");
        }
    }
}

/// The fake in the Vonage dialect on a port of its own, until the guard drops.
async fn fake(settings: FakeSettings) -> (String, DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        FakeSettings {
            kind: ProviderKind::Vonage,
            ..settings
        },
        shutdown.clone(),
    ));
    (url, shutdown.drop_guard())
}

fn expecting(api_key: &str, api_secret: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("api_key".to_owned(), api_key.to_owned()),
        ("api_secret".to_owned(), api_secret.to_owned()),
    ])
}

#[tokio::test]
async fn the_fake_vonage_accepts_what_the_adapter_sends_and_counts_the_client_ref_as_the_key() {
    let (url, _fake) = fake(FakeSettings {
        credentials: expecting(API_KEY, API_SECRET),
        ..FakeSettings::default()
    })
    .await;
    let vonage = provider(&url, &[]);
    let long = "Your loan balance is paid in full. ".repeat(6);
    let accepted = vonage.send(&sms("k-long", &long, None)).await.unwrap();
    assert!(
        accepted.provider_message_id.starts_with("fake-"),
        "{accepted:?}"
    );
    assert_eq!(accepted.segments, Some(2), "one entry per part");
    let unicode = vonage
        .send(&sms("k-uni", "Asante sana 🙏", Some("+447700900001")))
        .await
        .unwrap();
    assert_eq!(unicode.segments, Some(1));
    // The same key again: the fake sees its client-ref twice.
    vonage.send(&sms("k-long", &long, None)).await.unwrap();
    let stats: Value = reqwest::get(format!("{url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["accepted"], 3, "{stats}");
    assert_eq!(stats["duplicates"], 1, "{stats}");
    assert_eq!(stats["distinctKeys"], 2, "{stats}");
}

#[tokio::test]
async fn the_adapter_classifies_the_fakes_failure_rejection_throttling_and_wrong_secret() {
    let cases = [
        (
            FakeSettings {
                fail_rate: 1.0,
                ..FakeSettings::default()
            },
            "transient",
        ),
        (
            FakeSettings {
                reject_rate: 1.0,
                ..FakeSettings::default()
            },
            "rejected",
        ),
        (
            FakeSettings {
                throttle_rate: 1.0,
                ..FakeSettings::default()
            },
            "transient",
        ),
        (
            FakeSettings {
                credentials: expecting(API_KEY, "an0therS3cret"),
                ..FakeSettings::default()
            },
            "account",
        ),
    ];
    for (settings, class) in cases {
        let (url, _fake) = fake(settings).await;
        let err = provider(&url, &[])
            .send(&sms("k-fake", "hi", None))
            .await
            .unwrap_err();
        assert_eq!(err.class(), class, "{err:?}");
    }
}

#[tokio::test]
async fn the_fake_vonage_answers_a_wrong_request_as_vonage_does() {
    let (url, _fake) = fake(FakeSettings::default()).await;
    let client = reqwest::Client::new();
    let status = |body: Value| body["messages"][0]["status"].as_str().unwrap().to_owned();
    let post = |form: &'static str, auth: bool| {
        let mut request = client
            .post(format!("{url}/sms/json"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form);
        if auth {
            request = request.header("authorization", BASIC);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "Vonage answers errors with 200");
            response.json::<Value>().await.unwrap()
        }
    };
    // https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms
    let no_credentials = post("from=MKOPA&to=254712345678&text=hi", false).await;
    assert_eq!(status(no_credentials), "2");
    let no_to = post("from=MKOPA&text=hi", true).await;
    assert_eq!(status(no_to.clone()), "2");
    assert_eq!(no_to["messages"][0]["error-text"], "Missing to param");
    let plus = post("from=MKOPA&to=%2B254712345678&text=hi", true).await;
    assert_eq!(status(plus), "3", "to is digits only");
    let short_key = post(
        "api_key=abc&api_secret=s3cr3tS3cr3t&from=MKOPA&to=254712345678&text=hi",
        false,
    )
    .await;
    assert_eq!(status(short_key), "4");
    // The older form: credentials in the body, as JSON.
    let json = client
        .post(format!("{url}/sms/json"))
        .json(
            &json!({"api_key": API_KEY, "api_secret": API_SECRET, "from": "MKOPA",
                      "to": "254712345678", "text": "hi", "client-ref": "k-json"}),
        )
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(status(json.clone()), "0", "{json}");
    assert_eq!(json["messages"][0]["client-ref"], "k-json");
    assert_eq!(json["message-count"], "1");
}

#[tokio::test]
async fn the_callback_url_goes_with_each_message_only_under_a_public_url() {
    // `callback`: https://developer.vonage.com/en/api/sms
    let ok = || ResponseTemplate::new(200).set_body_json(answer(&[("0", "0A06")]));
    let callback = |request: &wiremock::Request| {
        form(request)
            .into_iter()
            .find(|(name, _)| name == "callback")
            .map(|(_, url)| url)
    };
    let without = wiremock(ok()).await;
    provider(&without.uri(), &[])
        .send(&sms("k-cb-1", "hi", None))
        .await
        .unwrap();
    assert_eq!(callback(&received(&without).await), None);

    let public = [("SMS__HTTP__PUBLIC_URL", "https://sms.example.com/")];
    let with = wiremock(ok()).await;
    provider(&with.uri(), &public)
        .send(&sms("k-cb-2", "hi", None))
        .await
        .unwrap();
    assert_eq!(
        callback(&received(&with).await).as_deref(),
        Some("https://sms.example.com/v1/callbacks/vonage")
    );

    let token = [
        public[0],
        ("SMS__PROVIDERS__VONAGE__CALLBACK_TOKEN", CALLBACK_TOKEN),
    ];
    let with_token = wiremock(ok()).await;
    provider(&with_token.uri(), &token)
        .send(&sms("k-cb-3", "hi", None))
        .await
        .unwrap();
    assert_eq!(
        callback(&received(&with_token).await),
        Some(format!(
            "https://sms.example.com/v1/callbacks/vonage/{CALLBACK_TOKEN}"
        ))
    );
}

#[tokio::test]
async fn an_unknown_signature_method_stops_the_start_naming_the_key() {
    let env = env(
        "http://127.0.0.1:9",
        &[
            ("SMS__PROVIDERS__VONAGE__SIGNATURE_SECRET", SIGNATURE_SECRET),
            ("SMS__PROVIDERS__VONAGE__SIGNATURE_METHOD", "sha384"),
        ],
    );
    let map: std::collections::HashMap<String, String> = env.into_iter().collect();
    let source = sms_service::config::environment().source(Some(map));
    let error = Settings::load_from(None, source).err().unwrap().to_string();
    assert!(
        error.contains("providers.vonage.signature_method"),
        "{error}"
    );
    assert!(!error.contains(SIGNATURE_SECRET), "{error}");
}

const SIGNATURE_SECRET: &str = "5ig-s3cret-0123456789";
const CALLBACK_TOKEN: &str = "t0ken-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(700);

/// The service binary with a `[providers.vonage]` instance at the fake
/// binary, which calls back to the service's callback URL.
struct Lifecycle {
    broker: TestBroker,
    /// The service's HTTP address.
    base: String,
    _fake: Proc,
    _service: Proc,
}

/// Starts the fake (Vonage dialect, `fake_args` added) and the service
/// (`extra` settings added), the service's public URL its own address.
async fn lifecycle(fake_args: &[&str], extra: &[(&str, &str)]) -> Lifecycle {
    crate::helpers::init_logs();
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    let (fake_port, http_port) = (free_port(), free_port());
    let fake_url = format!("http://127.0.0.1:{fake_port}");
    let base = format!("http://127.0.0.1:{http_port}");
    let bind = format!("127.0.0.1:{http_port}");
    let mut settings = vec![
        ("SMS__HTTP__BIND", bind.as_str()),
        ("SMS__HTTP__PUBLIC_URL", base.as_str()),
    ];
    settings.extend_from_slice(extra);
    let env = env_of(&names, &fake_url, &settings);
    let dlr_url = format!("{base}/v1/callbacks/vonage");
    let fake_bind = format!("127.0.0.1:{fake_port}");
    let mut args = vec![
        "fake-provider",
        "--kind",
        "vonage",
        "--bind",
        &fake_bind,
        "--credential",
        "api_key=abcd1234",
        "--credential",
        "api_secret=s3cr3tS3cr3t",
        "--dlr-url",
        &dlr_url,
        "--dlr-delay-ms",
        "100",
    ];
    args.extend_from_slice(fake_args);
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
    async fn message(&self, key: &str) -> Value {
        reqwest::get(format!("{}/v1/messages/{key}", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// The `providerStatus` of each history entry.
fn provider_statuses(message: &Value) -> Vec<String> {
    message["history"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|entry| {
            entry["providerStatus"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn through_the_binary_a_message_at_the_fake_vonage_is_delivered_by_its_signed_receipts() {
    let secret = format!("signature_secret={SIGNATURE_SECRET}");
    let mut stack = lifecycle(
        &["--credential", &secret],
        &[("SMS__PROVIDERS__VONAGE__SIGNATURE_SECRET", SIGNATURE_SECRET)],
    )
    .await;
    stack
        .broker
        .publish_command(
            &command("vonage-dlr-1", "+254712345678", "Payment received"),
            lapin::BasicProperties::default(),
        )
        .await;
    let sent = stack.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "SmsSent");
    let sent = sent[0].json();
    assert_eq!(sent["provider"], "vonage");
    let id = sent["providerMessageId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("fake-"), "{sent}");

    let reports = stack.broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1, "SmsDeliveryReport");
    let report = reports[0].json();
    assert_eq!(report["idempotencyKey"], "vonage-dlr-1");
    assert_eq!(report["provider"], "vonage");
    assert_eq!(report["providerMessageId"], id.as_str());
    assert_eq!(report["status"], "delivered");
    assert_eq!(report["providerStatus"], "delivered");
    assert_eq!(report["permanent"], false);
    assert_eq!(
        stack.broker.deliveries(1, QUIET).await.len(),
        0,
        "accepted publishes nothing"
    );

    let message = stack.message("vonage-dlr-1").await;
    assert_eq!(message["status"], "delivered", "{message}");
    assert_eq!(message["deliveryStatus"], "delivered", "{message}");
    assert_eq!(message["provider"], "vonage", "{message}");
    let statuses = provider_statuses(&message);
    assert!(statuses.contains(&"accepted".to_owned()), "{message}");
    assert!(statuses.contains(&"delivered".to_owned()), "{message}");
    stack.broker.cleanup().await;
}

#[tokio::test]
async fn through_the_binary_a_failed_receipt_in_post_json_and_sha256_is_published_undelivered_and_permanent(
) {
    let secret = format!("signature_secret={SIGNATURE_SECRET}");
    let mut stack = lifecycle(
        &[
            "--credential",
            &secret,
            "--credential",
            "signature_method=sha256",
            "--credential",
            "webhook_format=POST-JSON",
            "--dlr-fail-rate",
            "1",
        ],
        &[
            ("SMS__PROVIDERS__VONAGE__SIGNATURE_SECRET", SIGNATURE_SECRET),
            ("SMS__PROVIDERS__VONAGE__SIGNATURE_METHOD", "sha256"),
        ],
    )
    .await;
    stack
        .broker
        .publish_command(
            &command("vonage-dlr-2", "+254712345678", "Payment received"),
            lapin::BasicProperties::default(),
        )
        .await;
    assert_eq!(stack.broker.sent(1, WAIT).await.len(), 1, "SmsSent");
    let reports = stack.broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1, "SmsDeliveryReport");
    let report = reports[0].json();
    assert_eq!(report["status"], "undelivered", "{report}");
    assert_eq!(report["providerStatus"], "failed", "{report}");
    assert_eq!(report["errorCode"], "3", "{report}");
    assert_eq!(report["permanent"], true, "{report}");
    let message = stack.message("vonage-dlr-2").await;
    assert_eq!(message["status"], "undelivered", "{message}");
    assert_eq!(message["deliveryStatus"], "undelivered", "{message}");
    stack.broker.cleanup().await;
}

/// A receipt's query, signed with Vonage's default method (MD5 hash of the
/// sorted `&name=value` string and the secret), written here from the
/// signing page rather than with the adapter's code.
fn signed_query(fields: &[(&str, &str)], secret: &str, timestamp: u64) -> String {
    use md5::{Digest, Md5};
    let timestamp = timestamp.to_string();
    let mut all: Vec<(&str, &str)> = fields.to_vec();
    all.push(("timestamp", &timestamp));
    all.sort();
    let mut text = String::new();
    for (name, value) in &all {
        text.push_str(&format!("&{name}={}", value.replace(['&', '='], "_")));
    }
    text.push_str(secret);
    let sig = hex::encode(Md5::digest(text.as_bytes()));
    all.push(("sig", &sig));
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(all)
        .finish()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A receipt as a GET to `path` (under the app), answered with its status.
async fn call_back(app: &TestApp, path: &str, query: &str) -> u16 {
    app.http
        .get(format!("{}{path}?{query}", app.base_url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_two_part_message_is_delivered_only_once_both_parts_are_and_a_bad_receipt_changes_nothing(
) {
    let (fake_url, _fake) = fake(FakeSettings {
        credentials: expecting(API_KEY, API_SECRET),
        ..FakeSettings::default()
    })
    .await;
    let extra = [
        ("SMS__PROVIDERS__VONAGE__BASE_URL", fake_url.as_str()),
        ("SMS__PROVIDERS__VONAGE__API_KEY", API_KEY),
        ("SMS__PROVIDERS__VONAGE__API_SECRET", API_SECRET),
        ("SMS__PROVIDERS__VONAGE__FROM", "MKOPA"),
        ("SMS__PROVIDERS__VONAGE__SIGNATURE_SECRET", SIGNATURE_SECRET),
        ("SMS__PROVIDERS__VONAGE__CALLBACK_TOKEN", CALLBACK_TOKEN),
    ];
    let mut app = spawn_app_with(&extra).await;
    let long = "Your loan balance is paid in full. ".repeat(6);
    app.publish(&command("vonage-parts", "+254712345678", &long))
        .await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "SmsSent");
    let sent = sent[0].json();
    assert_eq!(sent["segments"], 2, "{sent}");
    let first = sent["providerMessageId"].as_str().unwrap().to_owned();
    // The fake's second part: `<id>-2`.
    let second = format!("{first}-2");
    let path = format!("/v1/callbacks/vonage/{CALLBACK_TOKEN}");
    let receipt = |id: &str, at: u64, secret: &str| {
        signed_query(
            &[
                ("messageId", id),
                ("status", "delivered"),
                ("err-code", "0"),
                ("msisdn", "254712345678"),
                ("to", "MKOPA"),
                ("client-ref", "vonage-parts"),
            ],
            secret,
            at,
        )
    };
    let now = unix_now();

    // Refused, each changing nothing.
    let good = receipt(&first, now, SIGNATURE_SECRET);
    assert_eq!(call_back(&app, "/v1/callbacks/vonage", &good).await, 403);
    assert_eq!(
        call_back(&app, "/v1/callbacks/vonage/t0ken-0123456789abcdeF", &good).await,
        403
    );
    let other_secret = receipt(&first, now, "another-secret-012345");
    assert_eq!(call_back(&app, &path, &other_secret).await, 401);
    let stale = receipt(&first, now - 360, SIGNATURE_SECRET);
    assert_eq!(call_back(&app, &path, &stale).await, 401);
    let tampered = good.replace("status=delivered", "status=failed");
    assert_eq!(call_back(&app, &path, &tampered).await, 401);
    let unsigned = good
        .split('&')
        .filter(|pair| !pair.starts_with("sig="))
        .collect::<Vec<_>>()
        .join("&");
    assert_eq!(call_back(&app, &path, &unsigned).await, 401);
    assert!(app.broker.deliveries(1, QUIET).await.is_empty());
    let (_, message) = app.get_json("/v1/messages/vonage-parts").await;
    assert!(
        message["history"].as_array().unwrap().is_empty(),
        "{message}"
    );

    // The first part: recorded, but the message is not delivered yet.
    assert_eq!(call_back(&app, &path, &good).await, 204);
    assert!(
        app.broker.deliveries(1, QUIET).await.is_empty(),
        "one part of two publishes nothing"
    );
    let (_, message) = app.get_json("/v1/messages/vonage-parts").await;
    assert_eq!(message["status"], "sent", "{message}");
    assert_ne!(message["deliveryStatus"], "delivered", "{message}");

    // The second part: now it is.
    let last = receipt(&second, unix_now(), SIGNATURE_SECRET);
    assert_eq!(call_back(&app, &path, &last).await, 204);
    let reports = app.broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1);
    let report = reports[0].json();
    assert_eq!(report["status"], "delivered", "{report}");
    assert_eq!(report["providerMessageId"], first.as_str(), "{report}");
    let (_, message) = app.get_json("/v1/messages/vonage-parts").await;
    assert_eq!(message["status"], "delivered", "{message}");
    // A repeat is answered 2xx and publishes nothing.
    assert_eq!(call_back(&app, &path, &last).await, 204);
    assert!(app.broker.deliveries(1, QUIET).await.is_empty());
    app.cleanup().await;
}

#[test]
fn a_callback_url_longer_than_vonage_takes_stops_the_start_naming_the_key() {
    // `callback`: at most 100 characters (vonage-python-sdk sms/requests.py).
    let load = |public_url: &str| {
        let extra = [
            ("SMS__HTTP__PUBLIC_URL", public_url),
            ("SMS__PROVIDERS__VONAGE__CALLBACK_TOKEN", CALLBACK_TOKEN),
        ];
        let map: std::collections::HashMap<String, String> =
            env("http://127.0.0.1:9", &extra).into_iter().collect();
        let source = sms_service::config::environment().source(Some(map));
        Settings::load_from(None, source)
    };
    let long = format!("https://{}.example.com", "s".repeat(80));
    let Err(error) = load(&long) else {
        panic!("a callback URL over 100 characters was taken");
    };
    let error = error.to_string();
    assert!(
        error.contains("providers.vonage.callback_token: its callback URL"),
        "{error}"
    );
    assert!(!error.contains(CALLBACK_TOKEN), "never the token: {error}");
    assert!(load("https://sms.example.com").is_ok());
}

//! The Vonage adapter over real HTTP: the request it sends, field by field,
//! against Vonage's SMS API reference (https://developer.vonage.com/en/api/sms),
//! answers classified end to end (wiremock), and the project's fake in the
//! Vonage dialect, in-process. Instances are built through `Settings` from
//! `SMS__PROVIDERS__VONAGE__*`, as an operator configures them.

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

use crate::helpers::{settings, Names};

const API_KEY: &str = "abcd1234";
const API_SECRET: &str = "s3cr3tS3cr3t";
/// `printf 'abcd1234:s3cr3tS3cr3t' | base64`
const BASIC: &str = "Basic YWJjZDEyMzQ6czNjcjN0UzNjcjN0";

/// The environment of one `[providers.vonage]` instance at `base_url`.
fn env(base_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = Names::unique().env(base_url);
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

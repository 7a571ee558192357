//! Failover through the real binary: two provider instances on one route
//! (`[providers.a]`, `[providers.b]`, `[[routes]]` from a settings file),
//! each a wiremock server (or nothing at all), driven over AMQP.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::e2e::{free_port, service, wait_http, Proc};
use crate::helpers::{command, init_logs, Names, TestBroker};

/// The service with instances `a` and `b` (generic) at these URLs, on one
/// route for every number, `a` first.
struct TwoProviders {
    _svc: Proc,
    _file: tempfile_path::TempFile,
    base_url: String,
}

mod tempfile_path {
    /// A settings file removed when the test ends.
    pub struct TempFile(pub std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn start(names: &Names, a_url: &str, b_url: &str, extra: &[(&str, &str)]) -> TwoProviders {
    let file = tempfile_path::TempFile(std::env::temp_dir().join(format!(
        "sms-failover-{}.toml",
        uuid::Uuid::new_v4().simple()
    )));
    std::fs::write(
        &file.0,
        format!(
            r#"
[[routes]]
prefixes = ["+"]
providers = ["a", "b"]

[providers.a]
kind = "generic"
base_url = "{a_url}"
breaker_threshold = 3

[providers.b]
kind = "generic"
base_url = "{b_url}"
"#
        ),
    )
    .unwrap();
    let http_port = free_port();
    let mut env = names.env("http://127.0.0.1:9");
    env.push(("SMS__HTTP__BIND".into(), format!("127.0.0.1:{http_port}")));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let path = file.0.to_string_lossy().into_owned();
    let svc = Proc(service(&env, &["--config", &path, "run"]).spawn().unwrap());
    let base_url = format!("http://127.0.0.1:{http_port}");
    wait_http(&format!("{base_url}/readyz")).await;
    TwoProviders {
        _svc: svc,
        _file: file,
        base_url,
    }
}

async fn accepting(id: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .mount(&server)
        .await;
    server
}

/// An address where nothing listens: every connection is refused.
fn nobody() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn providers_of(events: &[crate::helpers::Received]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.json()["provider"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn with_the_first_provider_down_every_command_is_sent_once_by_the_second() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    let b = accepting("from-b").await;
    let svc = start(&names, &nobody(), &b.uri(), &[]).await;
    for i in 0..5 {
        broker
            .publish_command(
                &command(&format!("down-{i}"), "+254712345678", "hi"),
                Default::default(),
            )
            .await;
    }
    let sent = broker.sent(5, Duration::from_secs(20)).await;
    assert_eq!(providers_of(&sent), ["b"; 5]);
    assert!(broker.sent(1, Duration::from_millis(500)).await.is_empty());
    assert_eq!(
        b.received_requests().await.unwrap().len(),
        5,
        "each key once at b"
    );
    // A delivery report for b's id finds its message, though a is the
    // first generic instance.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/delivery-reports", svc.base_url))
        .json(&json!({"id": "from-b", "status": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(broker.deliveries(1, Duration::from_secs(5)).await.len(), 1);
    broker.cleanup().await;
}

#[tokio::test]
async fn an_ambiguous_timeout_is_retried_at_the_same_provider_never_the_next() {
    init_logs();
    let names = Names::unique();
    let broker = TestBroker::connect(&names).await;
    // a answers after the request timeout: it may have sent the message.
    let a = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "late"}))
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&a)
        .await;
    let b = accepting("from-b").await;
    let _svc = start(
        &names,
        &a.uri(),
        &b.uri(),
        &[("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "500")],
    )
    .await;
    broker
        .publish_command(
            &command("ambiguous-1", "+254712345678", "hi"),
            Default::default(),
        )
        .await;
    // Retried at a (twice in process, then through delay tiers), never at b.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a.received_requests().await.unwrap().len() >= 2);
    assert!(
        b.received_requests().await.unwrap().is_empty(),
        "failed over after an ambiguous answer"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn with_both_providers_down_commands_wait_in_the_tiers_and_go_out_once_when_one_returns() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    let b = MockServer::start().await;
    // b refuses the first few calls (503), then accepts.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(4)
        .mount(&b)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "b-back"})))
        .mount(&b)
        .await;
    let _svc = start(
        &names,
        &nobody(),
        &b.uri(),
        &[("SMS__RETRY__MAX_ATTEMPTS", "20")],
    )
    .await;
    broker
        .publish_command(
            &command("both-down", "+254712345678", "hi"),
            Default::default(),
        )
        .await;
    let sent = broker.sent(1, Duration::from_secs(20)).await;
    assert_eq!(providers_of(&sent), ["b"]);
    assert!(broker.sent(1, Duration::from_millis(500)).await.is_empty());
    let accepted = b.received_requests().await.unwrap().len().saturating_sub(4);
    assert_eq!(accepted, 1, "sent once");
    broker.cleanup().await;
}

#[tokio::test]
async fn without_a_generic_instance_the_generic_report_route_takes_nothing_unsigned() {
    let app = crate::helpers::spawn_app_with(&[
        ("SMS__PROVIDERS__V__KIND", "vonage"),
        ("SMS__PROVIDERS__V__API_KEY", "abcd1234"),
        ("SMS__PROVIDERS__V__API_SECRET", "s3cr3tS3cr3t"),
        ("SMS__PROVIDERS__V__FROM", "MKOPA"),
    ])
    .await;
    let response = app
        .http
        .post(format!("{}/v1/delivery-reports", app.base_url))
        .json(&json!({"id": "fake-1", "status": "delivered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "no_generic_provider");
    app.cleanup().await;
}

#[tokio::test]
async fn a_provider_that_refuses_the_route_hands_the_command_to_the_next_at_once() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    // a is a Twilio instance that cannot reach the destination (21408:
    // https://www.twilio.com/docs/api/errors/21408).
    let a = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "code": 21408,
            "message": "Permission to send an SMS has not been enabled for the region",
            "more_info": "https://www.twilio.com/docs/errors/21408",
            "status": 400
        })))
        .mount(&a)
        .await;
    let b = accepting("from-b").await;
    let _svc = start(
        &names,
        &a.uri(),
        &b.uri(),
        &[
            ("SMS__PROVIDERS__A__KIND", "twilio"),
            (
                "SMS__PROVIDERS__A__ACCOUNT_SID",
                "AC0123456789abcdef0123456789abcdef",
            ),
            ("SMS__PROVIDERS__A__AUTH_TOKEN", "s3cr3t"),
            ("SMS__PROVIDERS__A__FROM", "+15005550006"),
        ],
    )
    .await;
    broker
        .publish_command(
            &command("route-refused", "+254712345678", "hi"),
            Default::default(),
        )
        .await;
    let sent = broker.sent(1, Duration::from_secs(10)).await;
    assert_eq!(providers_of(&sent), ["b"]);
    assert_eq!(sent[0].json()["attempts"], 2, "one call at each");
    assert_eq!(
        a.received_requests().await.unwrap().len(),
        1,
        "no retry at a"
    );
    assert_eq!(b.received_requests().await.unwrap().len(), 1);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_key_the_first_provider_accepted_never_reaches_the_second_however_often_it_comes() {
    init_logs();
    let names = Names::unique();
    let mut broker = TestBroker::connect(&names).await;
    let a = accepting("from-a").await;
    let b = accepting("from-b").await;
    let _svc = start(&names, &a.uri(), &b.uri(), &[]).await;
    let body = command("accepted-by-a", "+254712345678", "hi");
    broker.publish_command(&body, Default::default()).await;
    assert_eq!(
        providers_of(&broker.sent(1, Duration::from_secs(10)).await),
        ["a"]
    );
    // a is down now; the same command comes again (a producer's retry).
    a.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&a)
        .await;
    for _ in 0..2 {
        broker.publish_command(&body, Default::default()).await;
    }
    assert!(
        broker.sent(1, Duration::from_secs(2)).await.is_empty(),
        "a second SmsSent"
    );
    assert!(
        b.received_requests().await.unwrap().is_empty(),
        "sent by b too"
    );
    broker.cleanup().await;
}

//! The front door: API keys on the message routes, the loopback rule, and
//! signed, timestamped delivery reports. The service runs in-process
//! against the real RabbitMQ and Redis with a wiremock provider.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{command, spawn_app_with, Names, TestApp};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(700);
const FIRST_KEY: &str = "test-first-api-key-0123456789";
const SECOND_KEY: &str = "test-second-api-key-abcdefghij";
const KEYS: &str = "test-first-api-key-0123456789,test-second-api-key-abcdefghij";
const CALLBACK_SECRET: &str = "callback-s3cret";

async fn provider_accepts(app: &TestApp, id: &str, times: u64) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .expect(times)
        .mount(&app.provider)
        .await;
}

/// `POST /v1/messages` with `key` as bearer key (none when `None`).
async fn submit(app: &TestApp, key: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}/v1/messages", app.base_url))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

/// `GET /v1/messages/{message}` with `key` as bearer key (none when `None`).
async fn status(app: &TestApp, key: Option<&str>, message: &str) -> reqwest::Response {
    let mut request = app
        .http
        .get(format!("{}/v1/messages/{message}", app.base_url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

/// Asserts a 401 with a JSON error and a `WWW-Authenticate: Bearer` challenge.
async fn assert_refused(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 401, "{what}");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
}

#[tokio::test]
async fn message_routes_refuse_a_missing_or_wrong_api_key_and_publish_nothing() {
    let mut app = spawn_app_with(&[("SMS__HTTP__API_KEYS", KEYS)]).await;
    provider_accepts(&app, "never", 0).await;
    let body = || command("auth-refused", "+254712345678", "hi");

    assert_refused(submit(&app, None, body()).await, "no header").await;
    assert_refused(
        submit(&app, Some("wrong-key-0123456789"), body()).await,
        "wrong",
    )
    .await;
    let prefix = &FIRST_KEY[..FIRST_KEY.len() - 1];
    assert_refused(submit(&app, Some(prefix), body()).await, "a prefix").await;
    let basic = app
        .http
        .post(format!("{}/v1/messages", app.base_url))
        .basic_auth(FIRST_KEY, Some(""))
        .body(body())
        .send()
        .await
        .unwrap();
    assert_refused(basic, "basic auth").await;
    // Refused before the body is read: an oversized body is 401, not 413.
    let huge = submit(&app, None, vec![b' '; 200_000]).await;
    assert_refused(huge, "oversized, no key").await;

    assert_refused(
        status(&app, None, "auth-refused").await,
        "status, no header",
    )
    .await;
    let wrong = status(&app, Some("wrong-key-0123456789"), "auth-refused").await;
    assert_refused(wrong, "status, wrong key").await;

    assert!(app.broker.sent(1, QUIET).await.is_empty(), "nothing sent");
    assert!(app.broker.failed(1, Duration::ZERO).await.is_empty());
    let unknown = status(&app, Some(FIRST_KEY), "auth-refused").await;
    assert_eq!(unknown.status(), 404, "the refused command never arrived");
    app.cleanup().await;
}

#[tokio::test]
async fn any_configured_api_key_opens_the_message_routes() {
    let mut app = spawn_app_with(&[("SMS__HTTP__API_KEYS", KEYS)]).await;
    provider_accepts(&app, "auth-ok", 1).await;
    let accepted = submit(
        &app,
        Some(FIRST_KEY),
        command("auth-ok", "+254712345678", "hi"),
    )
    .await;
    assert_eq!(accepted.status(), 202);
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    let known = status(&app, Some(SECOND_KEY), "auth-ok").await;
    assert_eq!(known.status(), 200, "the second key of the list");
    let body: Value = known.json().await.unwrap();
    assert_eq!(body["status"], "sent");
    let lower_scheme = app
        .http
        .get(format!("{}/v1/messages/auth-ok", app.base_url))
        .header("authorization", format!("bearer {FIRST_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower_scheme.status(), 200, "the scheme in any case");
    let invalid = submit(&app, Some(SECOND_KEY), command("auth-2", "+12", "hi")).await;
    assert_eq!(
        invalid.status(),
        400,
        "past the door, the body is validated"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_api_key() {
    let app = spawn_app_with(&[("SMS__HTTP__API_KEYS", KEYS)]).await;
    for route in ["/healthz", "/readyz", "/metrics"] {
        let response = app
            .http
            .get(format!("{}{route}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{route}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn without_api_keys_a_loopback_bind_leaves_the_message_routes_open() {
    let mut app = spawn_app_with(&[("SMS__HTTP__BIND", "127.0.0.1:0")]).await;
    provider_accepts(&app, "open-1", 1).await;
    let accepted = submit(&app, None, command("open-1", "+254712345678", "hi")).await;
    assert_eq!(accepted.status(), 202);
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    assert_eq!(status(&app, None, "open-1").await.status(), 200);
    app.cleanup().await;
}

#[tokio::test]
async fn without_api_keys_a_non_loopback_bind_refuses_the_message_routes() {
    let mut app = spawn_app_with(&[("SMS__HTTP__BIND", "0.0.0.0:0")]).await;
    provider_accepts(&app, "never", 0).await;
    let port = app.base_url.rsplit(':').next().unwrap().to_owned();
    app.base_url = format!("http://127.0.0.1:{port}");
    let body = command("closed-1", "+254712345678", "hi");
    assert_refused(submit(&app, None, body.clone()).await, "no key").await;
    assert_refused(submit(&app, Some(FIRST_KEY), body).await, "any key").await;
    assert_refused(status(&app, None, "closed-1").await, "status").await;
    let health = app
        .http
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(app.broker.sent(1, QUIET).await.is_empty(), "nothing sent");
    app.cleanup().await;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(CALLBACK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A report with the given headers (each left out when `None`).
async fn report(
    app: &TestApp,
    body: &[u8],
    timestamp: Option<String>,
    signature: Option<String>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}/v1/delivery-reports", app.base_url))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(timestamp) = timestamp {
        request = request.header("X-Timestamp", timestamp);
    }
    if let Some(signature) = signature {
        request = request.header("X-Signature", signature);
    }
    request.send().await.unwrap()
}

/// A service with a callback secret, and one message sent as `provider_id`.
async fn sent_with_callback_secret(key: &str, provider_id: &str) -> TestApp {
    let mut app = spawn_app_with(&[("SMS__PROVIDER__CALLBACK_SECRET", CALLBACK_SECRET)]).await;
    provider_accepts(&app, provider_id, 1).await;
    app.publish(&command(key, "+254712345678", "hi")).await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    app
}

async fn message_status(app: &TestApp, key: &str) -> Value {
    status(app, None, key).await.json().await.unwrap()
}

#[tokio::test]
async fn a_signed_fresh_delivery_report_is_recorded_and_published() {
    let mut app = sent_with_callback_secret("signed-1", "sig-1").await;
    let body = br#"{"id":"sig-1","status":"delivered"}"#;
    let now = unix_now();
    let response = report(&app, body, Some(now.to_string()), Some(sign(now, body))).await;
    assert_eq!(response.status(), 204);
    let reports = app.broker.deliveries(1, WAIT).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].json()["status"], "delivered");
    assert_eq!(
        message_status(&app, "signed-1").await["status"],
        "delivered"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn delivery_reports_with_a_bad_signature_are_refused_and_change_nothing() {
    let mut app = sent_with_callback_secret("badsig-1", "badsig-1").await;
    let body = br#"{"id":"badsig-1","status":"delivered"}"#;
    let now = unix_now();
    let mut body_only = Hmac::<Sha256>::new_from_slice(CALLBACK_SECRET.as_bytes()).unwrap();
    body_only.update(body);
    let body_only = format!("sha256={}", hex::encode(body_only.finalize().into_bytes()));
    let other_body = br#"{"id":"badsig-1","status":"undelivered"}"#;
    for (what, timestamp, signature) in [
        ("no headers", None, None),
        ("no timestamp", None, Some(sign(now, body))),
        ("no signature", Some(now.to_string()), None),
        (
            "signed for another body",
            Some(now.to_string()),
            Some(sign(now, other_body)),
        ),
        (
            "signed for another time",
            Some(now.to_string()),
            Some(sign(now - 1, body)),
        ),
        (
            "the body alone signed",
            Some(now.to_string()),
            Some(body_only.clone()),
        ),
    ] {
        let response = report(&app, body, timestamp, signature).await;
        assert_eq!(response.status(), 401, "{what}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"], "bad_signature", "{what}");
    }
    assert!(
        app.broker.deliveries(1, QUIET).await.is_empty(),
        "nothing published"
    );
    assert_eq!(message_status(&app, "badsig-1").await["status"], "sent");
    app.cleanup().await;
}

#[tokio::test]
async fn a_signed_delivery_report_six_minutes_old_or_ahead_is_refused_and_changes_nothing() {
    let mut app = sent_with_callback_secret("stale-1", "stale-1").await;
    let body = br#"{"id":"stale-1","status":"delivered"}"#;
    let now = unix_now();
    for at in [now - 360, now + 360] {
        let response = report(&app, body, Some(at.to_string()), Some(sign(at, body))).await;
        assert_eq!(response.status(), 401, "signed at {at}, now {now}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"], "bad_signature");
        assert!(
            error["detail"].as_str().unwrap().contains("X-Timestamp"),
            "{error}"
        );
    }
    assert!(
        app.broker.deliveries(1, QUIET).await.is_empty(),
        "nothing published"
    );
    assert_eq!(message_status(&app, "stale-1").await["status"], "sent");
    app.cleanup().await;
}

#[test]
fn a_short_api_key_stops_start_up_with_exit_2_naming_the_setting_not_the_key() {
    let names = Names::unique();
    let secret = "short-secret-15";
    let mut child = Command::new(env!("CARGO_BIN_EXE_sms-service"))
        .arg("run")
        .env_clear()
        .envs(names.env("http://127.0.0.1:9"))
        .env("SMS__HTTP__API_KEYS", format!("{FIRST_KEY},{secret}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A service that wrongly starts would run until stopped: give it 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "exit 2 at once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("http.api_keys[1]"), "{stderr}");
    assert!(
        !stderr.contains(secret) && !stderr.contains(FIRST_KEY),
        "{stderr}"
    );
}

//! Per-recipient limits and quiet hours through the real broker and
//! Redis, with windows of seconds.

use std::time::{Duration, Instant};

use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{spawn_app_with, TestApp};

const WAIT: Duration = Duration::from_secs(10);

async fn provider_accepts(app: &TestApp, times: u64) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "m"})))
        .expect(times)
        .mount(&app.provider)
        .await;
}

fn command(key: &str, phone: &str, priority: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "idempotencyKey": key,
        "phoneNumber": phone,
        "text": "hello",
        "priority": priority,
    }))
    .unwrap()
}

/// The value of one series on the metrics page.
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not on the metrics page"))
}

#[tokio::test]
async fn a_high_command_over_its_recipients_limit_fails_recipient_rate_limited() {
    let mut app = spawn_app_with(&[("SMS__LIMITS__PER_RECIPIENT", "1/1h")]).await;
    provider_accepts(&app, 1).await;
    let number = "+254712345678";
    app.publish(&command("lim-1", number, "normal")).await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    app.publish(&command("lim-2", number, "high")).await;
    let failed = app.broker.failed(1, WAIT).await;
    assert_eq!(failed.len(), 1);
    let event = failed[0].json();
    assert_eq!(event["idempotencyKey"], "lim-2");
    assert_eq!(event["reason"], "recipient_rate_limited");
    assert_eq!(event["attempts"], 0);
    let dead = app.broker.dead_letters(1, WAIT).await;
    let reason = dead[0].header("x-sms-error").unwrap();
    assert!(
        reason.starts_with("recipient_rate_limited: the recipient is over its limits (1/1h)"),
        "{reason}"
    );
    assert!(!reason.contains("712345678"), "{reason}");
    let (_, status) = app.get_json("/v1/messages/lim-2").await;
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("failed"), Some("recipient_rate_limited"))
    );
    // The recorder is the process's: other tests count too.
    let page = app.metrics_text().await;
    assert!(series(&page, "sms_recipient_limited_total{action=\"fail\"}") >= 1.0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_normal_command_over_its_limit_waits_in_the_delay_tiers_then_is_sent_once() {
    let mut app = spawn_app_with(&[("SMS__LIMITS__PER_RECIPIENT", "2/3s")]).await;
    provider_accepts(&app, 3).await;
    let number = "+254712345678";
    let started = Instant::now();
    app.publish(&command("win-1", number, "normal")).await;
    app.publish(&command("win-2", number, "bulk")).await;
    assert_eq!(app.broker.sent(2, WAIT).await.len(), 2);
    app.publish(&command("win-3", number, "normal")).await;
    assert!(
        app.broker
            .sent(1, Duration::from_millis(1500))
            .await
            .is_empty(),
        "a third in the window went"
    );
    let (_, status) = app.get_json("/v1/messages/win-3").await;
    assert_eq!(status["status"], "processing");
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "never sent once the window freed up");
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "sent inside the window: {:?}",
        started.elapsed()
    );
    let event = sent[0].json();
    assert_eq!(
        (event["idempotencyKey"].as_str(), event["attempts"].as_u64()),
        (Some("win-3"), Some(1)),
        "the waits were no attempts"
    );
    let page = app.metrics_text().await;
    assert!(series(&page, "sms_recipient_limited_total{action=\"delay\"}") >= 1.0);
    assert!(app.broker.failed(1, Duration::ZERO).await.is_empty());
    assert!(app.broker.dead_letters(1, Duration::ZERO).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn numbers_on_the_allow_list_are_never_limited() {
    let mut app = spawn_app_with(&[
        ("SMS__LIMITS__PER_RECIPIENT", "1/1h"),
        ("SMS__LIMITS__ALLOW", "+15005550006, +15005550007"),
    ])
    .await;
    provider_accepts(&app, 3).await;
    for i in 0..3 {
        app.publish(&command(&format!("allow-{i}"), "+15005550006", "high"))
            .await;
    }
    assert_eq!(app.broker.sent(3, WAIT).await.len(), 3);
    assert!(app
        .broker
        .failed(1, Duration::from_millis(300))
        .await
        .is_empty());
    app.cleanup().await;
}

/// `HH:MM:SS` of `at` in UTC.
fn utc_clock(at: std::time::SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(at).to_string();
    text[11..19].to_owned()
}

#[tokio::test]
async fn quiet_hours_hold_a_normal_command_until_they_end_and_never_a_high_one() {
    // Iceland keeps UTC all year: quiet from a minute ago to 4 s from now.
    let now = std::time::SystemTime::now();
    let end = now + Duration::from_secs(4);
    let (start_clock, end_clock) = (utc_clock(now - Duration::from_secs(60)), utc_clock(end));
    let mut app = spawn_app_with(&[
        ("SMS__QUIET_HOURS__START", &start_clock),
        ("SMS__QUIET_HOURS__END", &end_clock),
        ("SMS__QUIET_HOURS__RELEASE_SPREAD_S", "1"),
    ])
    .await;
    provider_accepts(&app, 2).await;
    let number = "+3545551234";
    app.publish(&command("night-normal", number, "normal"))
        .await;
    app.publish(&command("night-otp", number, "high")).await;
    let first = app.broker.sent(1, WAIT).await;
    assert_eq!(
        first[0].json()["idempotencyKey"],
        "night-otp",
        "high goes at once"
    );
    let second = app.broker.sent(1, WAIT).await;
    assert_eq!(second.len(), 1, "never released");
    assert_eq!(second[0].json()["idempotencyKey"], "night-normal");
    // Whole seconds: the end clock was truncated to its second.
    let released = std::time::SystemTime::now();
    assert!(
        released + Duration::from_secs(1) >= end,
        "sent during quiet hours ({:?} before their end)",
        end.duration_since(released).unwrap_or_default()
    );
    assert_eq!(second[0].json()["attempts"], 1);
    let page = app.metrics_text().await;
    assert!(series(&page, "sms_quiet_hours_held_total") >= 1.0);
    app.cleanup().await;
}

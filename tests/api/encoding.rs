//! Smart encoding (reference 3.7) through the real broker and store, and
//! the `segments` command through the real binary.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::e2e::service;
use crate::helpers::{command, spawn_app, spawn_app_with, TestApp};

const WAIT: Duration = Duration::from_secs(10);

/// 114 characters: two UCS-2 parts as written, one GSM-7 part replaced.
const WRITTEN: &str = "Your order \u{201C}77\u{201D} is on its way \u{2014} we\u{2019}ll text you when it\u{2019}s at the pick-up point. Questions? Call us on 0800 123 456.";
const REPLACED: &str = "Your order \"77\" is on its way - we'll text you when it's at the pick-up point. Questions? Call us on 0800 123 456.";

/// The provider accepts exactly one call, carrying `text`.
async fn provider_expects(app: &TestApp, text: &str) {
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(body_partial_json(
            json!({"to": "+254712345678", "text": text}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "enc-1"})))
        .expect(1)
        .named(format!("one call with the text {text:?}"))
        .mount(&app.provider)
        .await;
}

#[tokio::test]
async fn curly_quotes_reach_the_provider_as_gsm7_and_sms_sent_counts_the_parts_sent() {
    let mut app = spawn_app().await;
    provider_expects(&app, REPLACED).await;
    let body = command("enc-smart-1", "+254712345678", WRITTEN);
    app.publish(&body).await;

    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "one SmsSent");
    assert_eq!(
        sent[0].json()["segments"],
        1,
        "the GSM-7 count of the text sent"
    );

    // The store keeps the fingerprint of the command as received: the same
    // command again is a duplicate, over HTTP (not a 409) and over AMQP.
    let response = app
        .http
        .post(format!("{}/v1/messages", app.base_url))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        202,
        "the same payload is no reuse"
    );
    app.publish(&body).await;
    assert!(
        app.broker
            .sent(1, Duration::from_millis(700))
            .await
            .is_empty(),
        "no second SmsSent"
    );
    assert_eq!(app.broker.commands_waiting().await, 0);
    app.provider.verify().await;
    app.cleanup().await;
}

#[tokio::test]
async fn with_smart_encoding_off_the_text_is_sent_as_written() {
    let mut app = spawn_app_with(&[("SMS__ENCODING__SMART", "false")]).await;
    provider_expects(&app, WRITTEN).await;
    app.publish(&command("enc-off-1", "+254712345678", WRITTEN))
        .await;

    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1, "one SmsSent");
    assert_eq!(sent[0].json()["segments"], 2, "UCS-2, as written");
    app.provider.verify().await;
    app.cleanup().await;
}

/// `sms-service segments` with `env`: exit code, stdout, stderr.
async fn segments(env: &[(&str, &str)], text: &str) -> (Option<i32>, String, String) {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let text = text.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        service(&env, &["segments", &text])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let utf8 = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (
        output.status.code(),
        utf8(output.stdout),
        utf8(output.stderr),
    )
}

#[tokio::test]
async fn segments_prints_both_costs_and_each_replacement_and_refuses_what_the_service_refuses() {
    let (code, out, err) = segments(&[], WRITTEN).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "with smart encoding:    GSM-7, 1 segment, 114 characters\n\
         without smart encoding: UCS-2, 2 segments, 114 characters\n\
         replaced:\n\
         \x20 \u{201C} U+201C LEFT DOUBLE QUOTATION MARK -> \" (x1)\n\
         \x20 \u{201D} U+201D RIGHT DOUBLE QUOTATION MARK -> \" (x1)\n\
         \x20 \u{2014} U+2014 EM DASH -> - (x1)\n\
         \x20 \u{2019} U+2019 RIGHT SINGLE QUOTATION MARK -> ' (x2)\n"
    );

    let (code, out, _) = segments(&[("SMS__ENCODING__SMART", "false")], "Selam ሰላም").await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("no GSM-7 look-alike for ሰ (U+1230), ላ (U+120B), ም (U+121D)\n"),
        "{out}"
    );
    assert!(
        out.ends_with(
            "encoding.smart is false in these settings: the service sends the text as written\n"
        ),
        "{out}"
    );

    let (code, out, err) = segments(&[], " \t").await;
    assert_eq!((code, out.as_str()), (Some(1), ""));
    assert_eq!(err.trim_end(), "error: text must not be empty");
}

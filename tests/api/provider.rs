//! The generic provider client against a wiremock server: every answer is
//! classified as the contract's table says.

use std::time::Duration;

use serde_json::json;
use sms_service::adapters::providers::generic::GenericProvider;
use sms_service::config::Settings;
use sms_service::domain::SendSms;
use sms_service::ports::{ProviderError, SmsService};
use wiremock::matchers::{body_json, header, header_exists, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{settings, Names};

fn provider(server: &MockServer, extra: &[(&str, &str)]) -> GenericProvider {
    let mut env = Names::unique().env(&server.uri());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings: Settings = settings(&env);
    GenericProvider::new(&settings.instances().unwrap().0[0]).unwrap()
}

fn sms() -> SendSms {
    SendSms::from_json(br#"{"idempotencyKey":"k-1","phoneNumber":"+254712345678","text":"hi"}"#)
        .unwrap()
}

async fn answer(template: ResponseTemplate) -> Result<String, ProviderError> {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(template)
        .mount(&server)
        .await;
    provider(&server, &[])
        .send(&sms())
        .await
        .map(|a| a.provider_message_id)
}

#[tokio::test]
async fn sends_the_contract_request_with_key_and_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .and(header("Idempotency-Key", "k-1"))
        .and(header("Authorization", "Bearer t0ken"))
        .and(header("Content-Type", "application/json"))
        .and(body_json(json!({"to": "+254712345678", "text": "hi"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "abc"})))
        .expect(1)
        .mount(&server)
        .await;
    let accepted = provider(&server, &[("SMS__PROVIDER__TOKEN", "t0ken")])
        .send(&sms())
        .await;
    assert_eq!(accepted.unwrap().provider_message_id, "abc");
}

#[tokio::test]
async fn no_authorization_header_without_a_token() {
    let server = MockServer::start().await;
    Mock::given(header_exists("Authorization"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "x"})))
        .mount(&server)
        .await;
    assert!(provider(&server, &[]).send(&sms()).await.is_ok());
}

#[tokio::test]
async fn any_2xx_with_an_id_is_accepted() {
    assert_eq!(
        answer(ResponseTemplate::new(200).set_body_json(json!({"id": "m1"})))
            .await
            .unwrap(),
        "m1"
    );
    assert_eq!(
        answer(ResponseTemplate::new(202).set_body_json(json!({"id": "m2", "x": 1})))
            .await
            .unwrap(),
        "m2"
    );
}

#[tokio::test]
async fn a_2xx_with_a_malformed_body_is_still_accepted_because_the_message_is_out() {
    assert_eq!(
        answer(ResponseTemplate::new(200).set_body_string("<html>ok</html>"))
            .await
            .unwrap(),
        ""
    );
    assert_eq!(
        answer(ResponseTemplate::new(200).set_body_json(json!({"id": 42})))
            .await
            .unwrap(),
        ""
    );
}

#[tokio::test]
async fn a_400_is_rejected() {
    let err = answer(ResponseTemplate::new(400).set_body_string("bad number"))
        .await
        .unwrap_err();
    match err {
        ProviderError::Rejected { detail, .. } => {
            assert!(detail.contains("400") && detail.contains("bad number"))
        }
        other => panic!("{other:?}"),
    }
    for status in [401, 403, 404, 422] {
        let err = answer(ResponseTemplate::new(status)).await.unwrap_err();
        assert!(
            matches!(err, ProviderError::Rejected { .. }),
            "{status}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_408_and_503_are_not_sent_and_500_502_504_may_have_been() {
    for status in [408, 503] {
        let err = answer(ResponseTemplate::new(status)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ProviderError::Transient {
                    retry_after: None,
                    ..
                }
            ),
            "{status}: {err:?}"
        );
    }
    for status in [500, 502, 504] {
        let err = answer(ResponseTemplate::new(status)).await.unwrap_err();
        assert!(
            matches!(err, ProviderError::Ambiguous { .. }),
            "{status}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_429_is_transient_with_its_retry_after() {
    let err = answer(ResponseTemplate::new(429).insert_header("Retry-After", "7"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::Transient {
            detail: "HTTP 429: ".into(),
            retry_after: Some(Duration::from_secs(7))
        }
    );
    // An HTTP-date or garbage Retry-After is ignored, not fatal.
    let err = answer(ResponseTemplate::new(429).insert_header("Retry-After", "soon"))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ProviderError::Transient {
            retry_after: None,
            ..
        }
    ));
}

#[tokio::test]
async fn a_timeout_after_the_request_was_written_is_ambiguous() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(1500)))
        .mount(&server)
        .await;
    let client = provider(&server, &[("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "300")]);
    match client.send(&sms()).await.unwrap_err() {
        ProviderError::Ambiguous { detail, .. } => {
            assert!(detail.starts_with("timeout"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let mut env = Names::unique().env("http://127.0.0.1:1");
    env.push(("SMS__PROVIDER__CONNECT_TIMEOUT_MS".into(), "300".into()));
    let client = GenericProvider::new(&settings(&env).instances().unwrap().0[0]).unwrap();
    match client.send(&sms()).await.unwrap_err() {
        ProviderError::Transient { detail, .. } => {
            assert!(detail.starts_with("connect"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

/// The generic fake on a port of its own; its `/stats`.
async fn fake() -> (String, tokio_util::sync::DropGuard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let settings = sms_service::fake_provider::FakeSettings::default();
    tokio::spawn(sms_service::fake_provider::serve(
        listener,
        settings,
        stop.clone(),
    ));
    (url, stop.drop_guard())
}

async fn fake_stats(url: &str) -> serde_json::Value {
    reqwest::get(format!("{url}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A named generic instance `h` at `url`, with `extra` settings of its own.
fn instance_provider(url: &str, extra: &[(&str, &str)]) -> GenericProvider {
    let mut env = Names::unique().env(url);
    env.push(("SMS__PROVIDERS__H__KIND".into(), "generic".into()));
    env.push(("SMS__PROVIDERS__H__BASE_URL".into(), url.into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    GenericProvider::new(&settings(&env).instances().unwrap().0[0]).unwrap()
}

#[tokio::test]
async fn an_instance_with_http2_sends_over_http2_and_the_default_over_http_1_1() {
    let (url, _stop) = fake().await;
    let h2 = instance_provider(&url, &[("SMS__PROVIDERS__H__HTTP2", "true")]);
    // Cleartext: HTTP/2 by prior knowledge, several calls at once on it.
    let message = sms();
    let sends = (0..3).map(|_| h2.send(&message));
    for sent in futures_util::future::join_all(sends).await {
        assert!(sent.unwrap().provider_message_id.starts_with("fake-"));
    }
    let stats = fake_stats(&url).await;
    assert_eq!(stats["accepted"], 3, "{stats}");
    assert_eq!(stats["http2"], 3, "{stats}");

    let h1 = instance_provider(&url, &[]);
    h1.send(&sms()).await.unwrap();
    let stats = fake_stats(&url).await;
    assert_eq!(stats["accepted"], 4, "{stats}");
    assert_eq!(stats["http2"], 3, "the default stays HTTP/1.1: {stats}");
}

#[test]
fn http2_is_alpn_over_https_and_prior_knowledge_over_http() {
    use sms_service::adapters::providers::http::Http2;
    assert_eq!(Http2::for_base_url(false, "https://p.example"), Http2::Off);
    assert_eq!(Http2::for_base_url(false, "http://p.example"), Http2::Off);
    assert_eq!(Http2::for_base_url(true, "https://p.example"), Http2::Alpn);
    assert_eq!(Http2::for_base_url(true, "HTTPS://p.example"), Http2::Alpn);
    assert_eq!(
        Http2::for_base_url(true, "http://p.example"),
        Http2::PriorKnowledge
    );
}

//! Traces: one trace per command, under its producer's span; a retry
//! through a delay tier in the same trace; the trace context on every
//! event, dead letter and provider request; no phone number or text in
//! any span. The spans are recorded in memory for the test's own thread
//! (`telemetry::record_in_memory`), so parallel tests never mix.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use sms_service::telemetry;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{command, counter, spawn_app};

const WAIT: Duration = Duration::from_secs(10);
const PHONE: &str = "+254712345678";
const TEXT: &str = "Your code is 4711, traced";
/// The producer's span: trace 4bf9..., span 00f0....
const PRODUCER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn producer_trace() -> TraceId {
    TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
}

fn producer_span() -> SpanId {
    SpanId::from_hex("00f067aa0ba902b7").unwrap()
}

/// Properties carrying the producer's trace context.
fn traced(traceparent: &str, tracestate: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString(tracestate.into()),
    );
    BasicProperties::default().with_headers(headers)
}

/// The `traceparent` a span's context is sent on as.
fn traceparent_of(span: &SpanData) -> String {
    let cx = &span.span_context;
    format!("00-{}-{}-01", cx.trace_id(), cx.span_id())
}

/// The trace id of a `traceparent` header.
fn trace_of(traceparent: &str) -> TraceId {
    TraceId::from_hex(traceparent.split('-').nth(1).expect("a traceparent")).unwrap()
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn text(span: &SpanData, key: &str) -> String {
    attribute(span, key).map_or_else(String::new, |v| v.as_str().into_owned())
}

/// Waits until `ready` holds of the spans recorded so far, and returns
/// them.
async fn spans_until(
    exporter: &InMemorySpanExporter,
    ready: impl Fn(&[SpanData]) -> bool,
) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let spans = exporter.get_finished_spans().unwrap();
        if ready(&spans) {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never ready: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The consume spans of the command keyed `key`, once `n` have ended.
async fn consumes(exporter: &InMemorySpanExporter, key: &str, n: usize) -> Vec<SpanData> {
    let of_key = |s: &&SpanData| s.name == "consume" && text(s, "key") == key;
    let spans = spans_until(exporter, |spans| spans.iter().filter(of_key).count() >= n).await;
    let mut found: Vec<SpanData> = spans.iter().filter(of_key).cloned().collect();
    found.sort_by_key(|s| s.start_time);
    found
}

fn in_trace(exporter: &InMemorySpanExporter, trace: TraceId) -> Vec<SpanData> {
    let mut spans: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    spans.sort_by_key(|s| s.start_time);
    spans
}

fn children<'s>(spans: &'s [SpanData], parent: &SpanData) -> Vec<&'s SpanData> {
    let id = parent.span_context.span_id();
    spans.iter().filter(|s| s.parent_span_id == id).collect()
}

fn named<'s>(spans: &[&'s SpanData], name: &str) -> Vec<&'s SpanData> {
    spans.iter().copied().filter(|s| s.name == name).collect()
}

/// No attribute of any span or span event holds the full number or the
/// text.
fn assert_private(spans: &[SpanData]) {
    let digits = PHONE.trim_start_matches('+');
    for span in spans {
        let events = span.events.iter().flat_map(|e| e.attributes.iter());
        for kv in span.attributes.iter().chain(events) {
            let value = kv.value.as_str();
            assert!(
                !value.contains(digits) && !value.contains(TEXT),
                "span {} has {} = {value}",
                span.name,
                kv.key
            );
        }
    }
}

#[tokio::test]
async fn one_command_is_one_trace_under_its_producers_span_with_a_span_per_step() {
    let (exporter, _recording) = telemetry::record_in_memory();
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "msg-t1"})))
        .expect(1)
        .mount(&app.provider)
        .await;
    let body = command("trace-1", PHONE, TEXT);
    let properties = traced(PRODUCER, "vendor=1");
    app.broker.publish_command(&body, properties).await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);

    let consume = consumes(&exporter, "trace-1", 1).await.remove(0);
    assert_eq!(consume.span_context.trace_id(), producer_trace());
    assert_eq!(consume.parent_span_id, producer_span());
    assert!(consume.parent_span_is_remote);
    assert_eq!(consume.span_kind, SpanKind::Consumer);
    assert_eq!(text(&consume, "to"), "+********5678");
    assert_eq!(text(&consume, "outcome"), "sent");
    let trace = in_trace(&exporter, producer_trace());
    let steps = children(&trace, &consume);
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(
        names,
        ["claim", "provider_call", "record", "publish"],
        "{names:?}"
    );
    assert_eq!(text(steps[0], "claim"), "send");
    let call = steps[1];
    assert_eq!(call.span_kind, SpanKind::Client);
    assert_eq!(text(call, "provider"), "generic");
    assert_eq!(text(call, "class"), "accepted");
    assert_eq!(
        attribute(call, "http.response.status_code"),
        Some(Value::I64(200))
    );
    assert_eq!(text(steps[2], "record"), "sent");
    let publish = steps[3];
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(text(publish, "event"), "SmsSent");

    // The event carries the publish span's context, the provider request
    // the call's; the producer's tracestate rides along.
    assert_eq!(sent[0].header("traceparent"), Some(traceparent_of(publish)));
    assert_eq!(sent[0].header("tracestate").as_deref(), Some("vendor=1"));
    let requests = app.provider.received_requests().await.unwrap();
    let header = |name: &str| {
        requests[0]
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(header("traceparent"), Some(traceparent_of(call)));
    assert_eq!(header("tracestate").as_deref(), Some("vendor=1"));
    assert_private(&trace);
    app.cleanup().await;
}

#[tokio::test]
async fn a_retry_through_a_delay_tier_continues_the_same_trace() {
    let (exporter, _recording) = telemetry::record_in_memory();
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&app.provider)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "msg-t2"})))
        .mount(&app.provider)
        .await;
    // No producer trace: the first consume starts one.
    app.publish(&command("trace-2", PHONE, TEXT)).await;
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);

    let consumes = consumes(&exporter, "trace-2", 2).await;
    let (first, second) = (&consumes[0], &consumes[1]);
    let trace_id = first.span_context.trace_id();
    assert_eq!(first.parent_span_id, SpanId::INVALID, "a root span");
    assert_eq!(text(first, "outcome"), "delay");
    assert_eq!(second.span_context.trace_id(), trace_id);
    assert_eq!(text(second, "outcome"), "sent");
    let trace = in_trace(&exporter, trace_id);
    let delay = named(&children(&trace, first), "delay");
    assert_eq!(delay.len(), 1, "one hand-over to a delay tier");
    assert_eq!(second.parent_span_id, delay[0].span_context.span_id());
    assert!(second.parent_span_is_remote, "through the broker");

    let calls: Vec<(String, Option<Value>)> = trace
        .iter()
        .filter(|s| s.name == "provider_call")
        .map(|s| (text(s, "class"), attribute(s, "http.response.status_code")))
        .collect();
    assert_eq!(
        calls,
        [
            ("transient".to_owned(), Some(Value::I64(503))),
            ("transient".to_owned(), Some(Value::I64(503))),
            ("accepted".to_owned(), Some(Value::I64(200))),
        ]
    );
    let event_trace = trace_of(&sent[0].header("traceparent").unwrap());
    assert_eq!(event_trace, trace_id);
    for request in app.provider.received_requests().await.unwrap() {
        let traceparent = request.headers.get("traceparent").unwrap();
        assert_eq!(trace_of(traceparent.to_str().unwrap()), trace_id);
    }
    assert_private(&trace);
    app.cleanup().await;
}

#[tokio::test]
async fn a_failed_event_and_its_dead_letter_carry_the_commands_trace() {
    let (exporter, _recording) = telemetry::record_in_memory();
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(400).set_body_string("no such number +254712345678"))
        .mount(&app.provider)
        .await;
    let body = command("trace-3", PHONE, TEXT);
    let properties = traced(PRODUCER, "vendor=1");
    app.broker.publish_command(&body, properties).await;
    let failed = app.broker.failed(1, WAIT).await;
    let dead = app.broker.dead_letters(1, WAIT).await;
    assert_eq!((failed.len(), dead.len()), (1, 1));

    let consume = consumes(&exporter, "trace-3", 1).await.remove(0);
    assert_eq!(consume.parent_span_id, producer_span());
    let trace = in_trace(&exporter, producer_trace());
    let steps = children(&trace, &consume);
    let call = named(&steps, "provider_call");
    assert_eq!(text(call[0], "class"), "rejected");
    assert_eq!(
        attribute(call[0], "http.response.status_code"),
        Some(Value::I64(400))
    );
    let publish = named(&steps, "publish");
    assert_eq!(text(publish[0], "event"), "SmsFailed");
    assert_eq!(
        failed[0].header("traceparent"),
        Some(traceparent_of(publish[0]))
    );
    let dead_letter = named(&steps, "dead_letter");
    assert_eq!(
        dead[0].header("traceparent"),
        Some(traceparent_of(dead_letter[0]))
    );
    assert_eq!(dead[0].header("tracestate").as_deref(), Some("vendor=1"));
    assert_private(&trace);
    app.cleanup().await;
}

#[tokio::test]
async fn a_command_submitted_over_http_joins_the_callers_trace() {
    let (exporter, _recording) = telemetry::record_in_memory();
    let mut app = spawn_app().await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "msg-t4"})))
        .mount(&app.provider)
        .await;
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = app
        .http
        .post(format!("{}/v1/messages", app.base_url))
        .header("traceparent", caller)
        .json(&json!({"idempotencyKey": "trace-4", "phoneNumber": PHONE, "text": TEXT}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);

    let consume = consumes(&exporter, "trace-4", 1).await.remove(0);
    let trace_id = trace_of(caller);
    assert_eq!(consume.span_context.trace_id(), trace_id);
    let trace = in_trace(&exporter, trace_id);
    let request = trace
        .iter()
        .find(|s| s.name == "POST /v1/messages")
        .expect("the request's span");
    assert_eq!(request.span_kind, SpanKind::Server);
    assert_eq!(
        request.parent_span_id,
        SpanId::from_hex("b7ad6b7169203331").unwrap()
    );
    assert_eq!(
        attribute(request, "http.response.status_code"),
        Some(Value::I64(202))
    );
    assert_eq!(consume.parent_span_id, request.span_context.span_id());
    assert_private(&trace);
    app.cleanup().await;
}

#[tokio::test]
async fn a_command_sent_over_grpc_joins_the_callers_trace() {
    use sms_service::adapters::grpc::proto::sms_service_client::SmsServiceClient;
    use sms_service::adapters::grpc::proto::SendRequest;

    let (exporter, _recording) = telemetry::record_in_memory();
    let mut app = crate::helpers::spawn_app_with(&[("SMS__GRPC__BIND", "127.0.0.1:0")]).await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "msg-t5"})))
        .mount(&app.provider)
        .await;
    let addr = app.app.as_ref().unwrap().grpc_addr.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = SmsServiceClient::new(channel);
    let caller = "00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203332-01";
    let mut request = tonic::Request::new(SendRequest {
        idempotency_key: "trace-5".into(),
        phone_number: PHONE.into(),
        text: TEXT.into(),
        ..SendRequest::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", caller.parse().unwrap());
    metadata.insert("tracestate", "vendor=5".parse().unwrap());
    client.send(request).await.expect("Send succeeds");
    let sent = app.broker.sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);

    let consume = consumes(&exporter, "trace-5", 1).await.remove(0);
    let trace = in_trace(&exporter, trace_of(caller));
    let request = trace
        .iter()
        .find(|s| s.name == "sms.v1.SmsService/Send")
        .expect("the call's span");
    assert_eq!(
        request.parent_span_id,
        SpanId::from_hex("b7ad6b7169203332").unwrap()
    );
    assert_eq!(text(request, "key"), "trace-5");
    assert_eq!(
        attribute(request, "rpc.grpc.status_code"),
        Some(Value::I64(0))
    );
    assert_eq!(consume.parent_span_id, request.span_context.span_id());
    assert_eq!(sent[0].header("tracestate").as_deref(), Some("vendor=5"));
    assert_private(&trace);
    app.cleanup().await;
}

#[tokio::test]
async fn the_binary_counts_dropped_spans_and_failed_exports_when_its_collector_is_away() {
    use crate::e2e::{free_port, service, wait_http, Proc};
    use crate::helpers::{init_logs, Names, TestBroker};
    init_logs();
    let names = Names::unique();
    let provider_port = free_port();
    let http_port = free_port();
    let provider_url = format!("http://127.0.0.1:{provider_port}");
    let mut env = names.env(&provider_url);
    env.extend([
        ("SMS__HTTP__BIND".into(), format!("127.0.0.1:{http_port}")),
        // Nobody listens there: every export fails.
        (
            "SMS__TELEMETRY__OTLP_ENDPOINT".into(),
            format!("http://127.0.0.1:{}", free_port()),
        ),
        // A command makes more spans than this: some are dropped.
        ("SMS__TELEMETRY__MAX_QUEUED_SPANS".into(), "2".into()),
    ]);
    let mut broker = TestBroker::connect(&names).await;
    let fake = [
        "fake-provider",
        "--bind",
        &format!("127.0.0.1:{provider_port}"),
    ];
    let _fake = Proc(service(&env, &fake).spawn().unwrap());
    wait_http(&format!("{provider_url}/healthz")).await;
    let _svc = Proc(service(&env, &["run"]).spawn().unwrap());
    let base = format!("http://127.0.0.1:{http_port}");
    wait_http(&format!("{base}/readyz")).await;

    for i in 0..3 {
        let body = command(&format!("away-{i}"), PHONE, TEXT);
        broker.publish_command(&body, Default::default()).await;
    }
    assert_eq!(broker.sent(3, WAIT).await.len(), 3, "the pipeline ran on");

    // The batch processor exports every 5 s.
    let (mut dropped, mut failed) = (0.0, 0.0);
    for _ in 0..40 {
        let page = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        dropped = counter(&page, "sms_trace_spans_dropped_total");
        failed = counter(&page, "sms_trace_export_failures_total");
        if dropped > 0.0 && failed > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(dropped > 0.0, "dropped spans are counted");
    assert!(failed > 0.0, "failed exports are counted");
    broker.cleanup().await;
}

#[tokio::test]
async fn a_delivery_report_callback_links_to_the_trace_of_its_send() {
    let (exporter, _recording) = telemetry::record_in_memory();
    let mut app =
        crate::helpers::spawn_app_with(&[("SMS__PROVIDER__CALLBACK_SECRET", "link-s3cret")]).await;
    Mock::given(method("POST"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "msg-link"})))
        .expect(1)
        .mount(&app.provider)
        .await;
    let body = command("trace-link", PHONE, TEXT);
    app.broker
        .publish_command(&body, traced(PRODUCER, "vendor=1"))
        .await;
    assert_eq!(app.broker.sent(1, WAIT).await.len(), 1);
    let consume = consumes(&exporter, "trace-link", 1).await.remove(0);

    let answer =
        crate::helpers::post_signed_report(&app, "generic", "msg-link", "delivered", "link-s3cret")
            .await;
    assert_eq!(answer, 204);
    let is_callback = |s: &&SpanData| s.name == "/v1/callbacks/{instance}";
    let spans = spans_until(&exporter, |spans| spans.iter().any(|s| is_callback(&s))).await;
    let callback = spans.iter().find(is_callback).unwrap();
    assert_ne!(
        callback.span_context.trace_id(),
        producer_trace(),
        "a trace of its own"
    );
    let links: Vec<_> = callback
        .links
        .iter()
        .map(|l| l.span_context.clone())
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].trace_id(), producer_trace());
    assert_eq!(links[0].span_id(), consume.span_context.span_id());
    app.cleanup().await;
}

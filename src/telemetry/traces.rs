//! Traces: the service's own `tracing` spans, exported over OTLP when
//! `telemetry.otlp_endpoint` is set, and the W3C trace context
//! (`traceparent`, `tracestate`) read from what comes in and written on
//! what goes out. The core opens spans with `tracing` alone and calls
//! [`continue_trace`] and [`trace_headers`] with plain strings; the
//! OpenTelemetry types stay in this file.
//!
//! The exporter never slows the pipeline: finished spans wait in a bounded
//! queue that a thread of the SDK's batch processor empties; when
//! `telemetry.max_queued_spans` are waiting, a new one is dropped and
//! counted (`sms_trace_spans_dropped_total`), never waited for. The SDK
//! keeps its own drop count private, so [`Bounded`] keeps the queue's
//! length itself, and the SDK's queue, as long, never fills.
//!
//! Only the service's spans and events at `info` and above are recorded
//! ([`trace_filter`]): the message text is logged at `trace` level only,
//! and phone numbers in the service's fields are masked, so neither
//! reaches a span attribute.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::{Layer, Registry};

use crate::config::{ConfigError, OtlpProtocol, TelemetrySettings};

/// A layer of the process's subscriber.
pub(super) type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The trace pipeline of the process, once set up: shut it down at exit so
/// that what is queued is exported.
#[derive(Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Whether spans are recorded and exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued (for at most 5 s) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                tracing::warn!(error = %e, "traces not all exported at shutdown");
            }
        }
    }
}

/// What the trace layer records: the service's own spans and events at
/// `info` and above; never `debug` or `trace` (the message text is logged
/// at `trace`), nor the fake provider's or the bench's.
pub fn trace_filter() -> Targets {
    Targets::new()
        .with_target("sms_service", LevelFilter::INFO)
        .with_target("sms_service::fake_provider", LevelFilter::OFF)
        .with_target("sms_service::bench", LevelFilter::OFF)
}

/// The layer that exports spans as `settings` say, and the pipeline to
/// shut down; `None` when no endpoint is set. The gRPC exporter needs a
/// tokio runtime: call it inside one.
pub(super) fn otlp_layer(
    settings: &TelemetrySettings,
) -> Result<Option<(BoxedLayer, Traces)>, ConfigError> {
    let base = settings.otlp_endpoint.trim_end_matches('/');
    if base.is_empty() {
        return Ok(None);
    }
    let refused = |e: opentelemetry_otlp::ExporterBuildError| {
        ConfigError(format!("telemetry.otlp_endpoint: {e}"))
    };
    let exporter = match settings.otlp_protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{base}/v1/traces"))
            .build(),
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(Protocol::Grpc)
            .with_endpoint(base)
            .build(),
    }
    .map_err(refused)?;
    let dropped = metrics::counter!("sms_trace_spans_dropped_total");
    let processor = Bounded::new(exporter, settings.max_queued_spans, dropped);
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("sms-service");
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build();
    let layer = layer_for(&provider);
    Ok(Some((
        layer,
        Traces {
            provider: Some(provider),
        },
    )))
}

/// The `tracing` layer that records spans through `provider`.
fn layer_for(provider: &SdkTracerProvider) -> BoxedLayer {
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sms-service"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(trace_filter())
        .boxed()
}

/// Records the spans of the current thread in memory, until the guard is
/// dropped: for tests. Under `#[tokio::test]` (a current-thread runtime)
/// that is every task the test spawns, the service's included, and no
/// other test's, so tests running in parallel never see each other's
/// spans. Ended spans appear in the exporter at once.
#[cfg(feature = "test-support")]
pub fn record_in_memory() -> (
    opentelemetry_sdk::trace::InMemorySpanExporter,
    tracing::subscriber::DefaultGuard,
) {
    use tracing_subscriber::layer::SubscriberExt;
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = Registry::default().with(layer_for(&provider));
    (exporter, tracing::subscriber::set_default(subscriber))
}

// ---------------------------------------------------------------- context

/// Makes `span` continue the trace that a message or request came with: a
/// child of the remote span its `traceparent` names, keeping its
/// `tracestate`. Nothing when the header is absent or no valid W3C
/// `traceparent` (the span starts a trace of its own), or when no trace
/// is recorded. Call it before the span is first entered.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = Carrier {
        traceparent,
        tracestate,
    };
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Refused only when no trace is recorded or the span has started.
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the span a `traceparent` names (a callback's span to
/// the send it reports on): another trace, related but not a parent.
/// Nothing when it is not a valid W3C `traceparent` or no trace is
/// recorded.
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    let carrier = Carrier {
        traceparent,
        tracestate: None,
    };
    let linked = TraceContextPropagator::new().extract(&carrier);
    let linked = linked.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// The longest `tracestate` kept: W3C Trace Context asks to propagate at
/// least 512 characters (https://www.w3.org/TR/trace-context/#tracestate-limits).
pub const MAX_TRACESTATE_CHARS: usize = 512;

/// A `tracestate` bounded to [`MAX_TRACESTATE_CHARS`] by dropping whole
/// list-members from the end, never cutting one in the middle (a cut
/// member would be passed on as a vendor's corrupted value); at most 32
/// members, as the specification allows. `None` when nothing is left.
pub fn bounded_tracestate(raw: &str) -> Option<String> {
    let mut kept = String::new();
    for member in raw
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .take(32)
    {
        let extra = member.len() + usize::from(!kept.is_empty());
        if kept.len() + extra > MAX_TRACESTATE_CHARS {
            break;
        }
        if !kept.is_empty() {
            kept.push(',');
        }
        kept.push_str(member);
    }
    (!kept.is_empty()).then_some(kept)
}

/// The W3C trace context of the current span, as headers to send on:
/// `traceparent`, and `tracestate` when there is one. Empty when no trace
/// is recorded (no `telemetry.otlp_endpoint`).
pub fn trace_headers() -> Vec<(&'static str, String)> {
    let context = tracing::Span::current().context();
    headers_of(&context)
}

fn headers_of(context: &Context) -> Vec<(&'static str, String)> {
    let mut headers = Headers(Vec::new());
    TraceContextPropagator::new().inject_context(context, &mut headers);
    headers.0
}

/// The headers of an incoming message or request, as the propagator reads
/// them.
struct Carrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The headers the propagator writes, by their static names.
struct Headers(Vec<(&'static str, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => "traceparent",
            "tracestate" if !value.is_empty() => "tracestate",
            _ => return,
        };
        self.0.push((name, value));
    }
}

// ---------------------------------------------------------------- queue

/// A span processor that hands finished spans to the SDK's batch processor
/// while fewer than `capacity` wait for export, and drops and counts the
/// others. Its exporter ([`Leaving`]) takes each batch it exports off the
/// count, so the SDK's queue (as long) never fills.
struct Bounded<P> {
    inner: P,
    waiting: Arc<AtomicUsize>,
    capacity: usize,
    dropped: metrics::Counter,
}

impl Bounded<BatchSpanProcessor> {
    fn new<E: SpanExporter + 'static>(
        exporter: E,
        capacity: usize,
        dropped: metrics::Counter,
    ) -> Self {
        let waiting = Arc::new(AtomicUsize::new(0));
        let exporter = Leaving {
            inner: exporter,
            waiting: waiting.clone(),
            failures: metrics::counter!("sms_trace_export_failures_total"),
            failing: AtomicBool::new(false),
        };
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(capacity)
            .build();
        let inner = BatchSpanProcessor::builder(exporter)
            .with_batch_config(config)
            .build();
        Self {
            inner,
            waiting,
            capacity,
            dropped,
        }
    }
}

impl<P> fmt::Debug for Bounded<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bounded")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.dropped.increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter behind [`Bounded`]: the spans of each batch it is given
/// have left the queue.
#[derive(Debug)]
struct Leaving<E> {
    inner: E,
    waiting: Arc<AtomicUsize>,
    /// Batches the collector refused or did not answer for
    /// (`sms_trace_export_failures_total`): their spans are lost.
    failures: metrics::Counter,
    /// Whether the last export failed: the log says when exports start
    /// failing and when they work again, not once per batch.
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for Leaving<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let left = batch.len();
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(left))
            });
        async move {
            let result = self.inner.export(batch).await;
            match &result {
                Err(e) => {
                    self.failures.increment(1);
                    if !self.failing.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            error = %e,
                            spans = left,
                            "trace export failed: spans are lost until the collector answers \
                             (counted in sms_trace_export_failures_total)"
                        );
                    }
                }
                Ok(()) => {
                    if self.failing.swap(false, Ordering::AcqRel) {
                        tracing::info!("trace export works again");
                    }
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_tracestate_loses_whole_members_from_its_end() {
        let member = |i: usize| format!("v{i}={}", "x".repeat(40));
        let many: Vec<String> = (0..20).map(member).collect();
        let kept = bounded_tracestate(&many.join(",")).unwrap();
        assert!(kept.len() <= MAX_TRACESTATE_CHARS, "{}", kept.len());
        let members: Vec<&str> = kept.split(',').collect();
        assert_eq!(members.len(), 11);
        assert!(members.iter().enumerate().all(|(i, m)| *m == member(i)));
        assert_eq!(
            bounded_tracestate(" a=1 ,, b=2").as_deref(),
            Some("a=1,b=2")
        );
        assert_eq!(bounded_tracestate(&"y".repeat(600)), None);
        assert_eq!(bounded_tracestate(""), None);
        let small: Vec<String> = (0..40).map(|i| format!("k{i}=1")).collect();
        assert_eq!(
            bounded_tracestate(&small.join(","))
                .unwrap()
                .split(',')
                .count(),
            32
        );
    }
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A processor that keeps what it is given, and exports nothing.
    #[derive(Debug, Default)]
    struct Keeping(Mutex<Vec<SpanData>>);

    impl SpanProcessor for Keeping {
        fn on_start(&self, _: &mut Span, _: &Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    fn span_data() -> SpanData {
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::trace::Tracer::in_span(&provider.tracer("t"), "s", |_| {});
        exporter.get_finished_spans().unwrap().remove(0)
    }

    fn settings(endpoint: String, protocol: OtlpProtocol) -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: endpoint,
            otlp_protocol: protocol,
            max_queued_spans: 16,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_the_collector_as_otlp_protobuf_over_http() {
        use tracing_subscriber::layer::SubscriberExt;
        use wiremock::matchers::{header, method, path};
        let collector = wiremock::MockServer::start().await;
        wiremock::Mock::given(method("POST"))
            .and(path("/v1/traces"))
            .and(header("content-type", "application/x-protobuf"))
            .respond_with(wiremock::ResponseTemplate::new(200))
            .expect(1)
            .mount(&collector)
            .await;
        // A trailing slash is not doubled.
        let endpoint = format!("{}/", collector.uri());
        let (layer, traces) = otlp_layer(&settings(endpoint, OtlpProtocol::HttpProtobuf))
            .unwrap()
            .expect("an endpoint sets traces up");
        assert!(traces.enabled());
        {
            let _recording = tracing::subscriber::set_default(Registry::default().with(layer));
            tracing::info_span!("consume").in_scope(|| {
                assert!(trace_headers()[0].0 == "traceparent");
            });
        }
        // Shutting down exports what is queued; it blocks, as at exit.
        tokio::task::spawn_blocking(move || traces.shutdown())
            .await
            .unwrap();
        collector.verify().await;
    }

    #[tokio::test]
    async fn the_grpc_exporter_is_built_inside_the_runtime_and_no_endpoint_sets_nothing_up() {
        let grpc = settings("http://127.0.0.1:9".into(), OtlpProtocol::Grpc);
        let (_, traces) = otlp_layer(&grpc).unwrap().expect("set up");
        assert!(traces.enabled());
        let off = settings(String::new(), OtlpProtocol::HttpProtobuf);
        assert!(otlp_layer(&off).unwrap().is_none());
        assert!(!Traces::default().enabled());
    }

    #[test]
    fn a_full_queue_drops_and_counts_new_spans_instead_of_waiting() {
        let dropped = Arc::new(AtomicU64::new(0));
        let bounded = Bounded {
            inner: Keeping::default(),
            waiting: Arc::new(AtomicUsize::new(0)),
            capacity: 2,
            dropped: metrics::Counter::from_arc(dropped.clone()),
        };
        for _ in 0..5 {
            bounded.on_end(span_data());
        }
        assert_eq!(bounded.inner.0.lock().unwrap().len(), 2);
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        // An export takes its batch off the queue: room for more.
        let leaving = Leaving {
            inner: opentelemetry_sdk::trace::InMemorySpanExporter::default(),
            waiting: bounded.waiting.clone(),
            failures: metrics::Counter::noop(),
            failing: AtomicBool::new(false),
        };
        let batch = std::mem::take(&mut *bounded.inner.0.lock().unwrap());
        futures_util::FutureExt::now_or_never(leaving.export(batch))
            .unwrap()
            .unwrap();
        bounded.on_end(span_data());
        assert_eq!(bounded.inner.0.lock().unwrap().len(), 1);
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
    }

    /// An exporter whose collector refuses every other batch.
    #[derive(Debug, Default)]
    struct Flaky(AtomicUsize);

    impl SpanExporter for Flaky {
        async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
            match self.0.fetch_add(1, Ordering::Relaxed) % 2 {
                0 => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "collector answered 503".into(),
                )),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn failed_exports_are_counted_and_still_take_their_spans_off_the_queue() {
        let failed = Arc::new(AtomicU64::new(0));
        let waiting = Arc::new(AtomicUsize::new(3));
        let leaving = Leaving {
            inner: Flaky::default(),
            waiting: waiting.clone(),
            failures: metrics::Counter::from_arc(failed.clone()),
            failing: AtomicBool::new(false),
        };
        let export = |n| {
            let batch = (0..n).map(|_| span_data()).collect();
            futures_util::FutureExt::now_or_never(leaving.export(batch)).unwrap()
        };
        assert!(export(2).is_err());
        assert!(leaving.failing.load(Ordering::Relaxed));
        assert!(export(1).is_ok());
        assert!(!leaving.failing.load(Ordering::Relaxed));
        assert!(export(1).is_err());
        assert_eq!(failed.load(Ordering::Relaxed), 2);
        assert_eq!(waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_trace_context_is_read_and_written_as_w3c_headers() {
        let carrier = Carrier {
            traceparent: PARENT,
            tracestate: Some("vendor=abc"),
        };
        let context = TraceContextPropagator::new().extract(&carrier);
        let headers = headers_of(&context);
        assert_eq!(
            headers,
            [
                ("traceparent", PARENT.to_owned()),
                ("tracestate", "vendor=abc".to_owned())
            ]
        );
        let local = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let headers = headers_of(&Context::new().with_remote_span_context(local));
        assert_eq!(headers, [("traceparent", PARENT.to_owned())]);
    }

    #[test]
    fn without_a_recorded_trace_nothing_is_written_or_followed() {
        assert!(trace_headers().is_empty());
        let span = tracing::info_span!("consume");
        continue_trace(&span, Some(PARENT), None);
        let _entered = span.enter();
        assert!(trace_headers().is_empty());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let carrier = Carrier {
                traceparent: bad,
                tracestate: None,
            };
            let context = TraceContextPropagator::new().extract(&carrier);
            assert!(!context.span().span_context().is_valid(), "{bad:?}");
        }
    }
}

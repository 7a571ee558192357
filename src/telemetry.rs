//! Logs, metrics and traces. Logs go to stderr, human-readable or JSON; `RUST_LOG`
//! overrides the configured level, and a filter that would hide everything
//! (a misspelt level) stops start-up instead; the log targets of
//! dependencies that print message contents ([`PAYLOAD_TARGETS`]) stay at
//! `error` whatever it says. Metrics go to one
//! process-wide Prometheus recorder, rendered by `/metrics`: every metric
//! is described once here ([`METRICS`]), and every counter is exported at 0
//! from the start with each label value it can take, so `increase()` sees
//! the first failure. Traces ([`traces`]) are exported over OTLP when
//! `telemetry.otlp_endpoint` is set.

mod traces;

#[cfg(feature = "test-support")]
pub use traces::record_in_memory;
pub use traces::{
    bounded_tracestate, continue_trace, link_to, trace_filter, trace_headers, Traces,
};

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::{Directive, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{ConfigError, LogFormat, LogSettings, TelemetrySettings};
use crate::domain::{DeliveryStatus, FailureReason, LimitAction};

/// Log targets of dependencies that print what a message carries: lapin
/// logs every message the broker returns (an event nobody subscribed to
/// yet: body, phone number and all) at warn, and every frame it reads or
/// drops at trace. The service says in its own words, masked, what
/// happened.
pub const PAYLOAD_TARGETS: [&str; 3] = [
    "lapin::returned_messages",
    "lapin::channels",
    "lapin::frames",
];

/// Put before the configured directives: lapin logs every failed connect
/// three times at error level ("Exponential backoff attempts exhausted"
/// among them) and a returned message with its body. The service logs each
/// broker failure itself, once, naming the broker and the reason. A
/// directive naming lapin (`RUST_LOG=info,lapin=debug`) brings them back.
const QUIET: &str = "lapin=off,amq_protocol=warn";

/// Installs the log subscriber, and the trace exporter when
/// `telemetry.otlp_endpoint` is set (inside a tokio runtime: the gRPC
/// exporter needs one); later calls do nothing. A `RUST_LOG` that
/// is set (and not blank) wins over `log.level`; either one that cannot be
/// parsed, or names no level, is a configuration error naming it. Traces
/// have their own filter ([`trace_filter`]), whatever the log level.
pub fn init_logs(
    settings: &LogSettings,
    telemetry: &TelemetrySettings,
) -> Result<Traces, ConfigError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(&settings.level, rust_log.as_deref())?;
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let (traces, pipeline) = match traces::otlp_layer(telemetry)? {
        Some((layer, pipeline)) => (Some(layer), pipeline),
        None => (None, Traces::default()),
    };
    let layers: Vec<traces::BoxedLayer> =
        std::iter::once(log_layer(settings.format, filter, ansi, std::io::stderr))
            .chain(traces)
            .collect();
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(pipeline)
}

/// The filter from `RUST_LOG` when set, else from `log.level`, after
/// [`QUIET`].
pub fn log_filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, ConfigError> {
    let (source, directives) = match rust_log.filter(|v| !v.trim().is_empty()) {
        Some(value) => ("RUST_LOG", value),
        None => ("log.level", level),
    };
    let refused = |why: String| ConfigError(format!("{source}: {why}"));
    check_filter(directives).map_err(refused)?;
    let filter = EnvFilter::builder()
        .parse(format!("{QUIET},{directives}"))
        .map_err(|e| refused(e.to_string()))?;
    // lapin stays off unless a directive names it; if one does, a
    // directive for the same target replaces the user's, so `lapin=trace`
    // cannot turn payload dumps back on.
    let names_lapin = directives
        .split(',')
        .any(|d| d.trim().split(['=', '[', ':']).next() == Some("lapin"));
    if !names_lapin {
        return Ok(filter);
    }
    Ok(PAYLOAD_TARGETS.iter().fold(filter, |filter, target| {
        let quiet = format!("{target}=error")
            .parse()
            .expect("a valid directive");
        filter.add_directive(quiet)
    }))
}

/// Checks a filter as `RUST_LOG` and `log.level` take it: comma-separated
/// directives, each a level (`info`) or `target=level` (`sms_service=debug`).
/// A bare word that is no level would be read as a target and leave every
/// other log off, errors included, so it is refused.
pub fn check_filter(directives: &str) -> Result<(), String> {
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    if directives.trim().is_empty() {
        return Err(format!("is empty; expected a level ({LEVELS})"));
    }
    for part in directives.split(',').filter(|p| !p.is_empty()) {
        if let Err(e) = Directive::from_str(part) {
            return Err(format!(
                "{part:?} is not a filter directive ({e}); expected a level ({LEVELS}) or target=level"
            ));
        }
        let bare = !part.contains('=') && !part.contains('[');
        if bare && LevelFilter::from_str(part.trim()).is_err() {
            return Err(format!(
                "{part:?} is not a level; expected {LEVELS}, or target=level as in sms_service=debug"
            ));
        }
    }
    Ok(())
}

/// ANSI colours only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
pub fn colours(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The subscriber, writing to `writer`. JSON lines carry the event's fields
/// at the top level (one `message`) and the spans it is in once, as the
/// `spans` list (outermost first), not again as `span`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    Box::new(tracing_subscriber::registry().with(log_layer(format, filter, ansi, writer)))
}

/// The log layer of [`subscriber`], filtered by `filter` alone (a trace
/// layer beside it has its own filter).
fn log_layer<W>(format: LogFormat, filter: EnvFilter, ansi: bool, writer: W) -> traces::BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Json => layer
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => layer.with_ansi(ansi).with_filter(filter).boxed(),
    }
}

/// What a metric is, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the service records: name, kind, and the `# HELP` text.
/// (The `process_*` metrics are described by `metrics-process`.) A metric
/// recorded anywhere in `src/` and missing here fails a unit test.
pub const METRICS: &[(&str, MetricKind, &str)] = {
    use MetricKind::{Counter, Gauge, Histogram};
    &[
        ("sms_build_info", Gauge, "Always 1; the version label names the running build."),
        ("sms_commands_received_total", Counter, "Commands taken from the command queue, including redeliveries and returns from delay tiers."),
        ("sms_provider_requests_total", Counter, "Provider calls by provider instance and class: accepted, transient (not sent), ambiguous (may have been sent), route_refused, rejected or account (a problem with the account)."),
        ("sms_provider_accepted_total", Counter, "Messages a provider instance accepted; each becomes an SmsSent once recorded and confirmed (sms_sent_total)."),
        ("sms_provider_ambiguous_total", Counter, "Answers by provider instance after which the message may or may not have been sent (timeouts, 500/502/504): retried at that instance only."),
        ("sms_provider_failovers_total", Counter, "Commands moved from one provider instance (from) to the next of their route (to)."),
        ("sms_provider_request_duration_seconds", Histogram, "Duration of one provider call, by provider instance."),
        ("sms_sent_total", Counter, "SmsSent events confirmed by the broker."),
        ("sms_failed_total", Counter, "SmsFailed events confirmed by the broker, by reason."),
        ("sms_recipient_limited_total", Counter, "Messages over a per-recipient limit (limits.per_recipient), by the action taken: delay (back to a delay tier) or fail (SmsFailed recipient_rate_limited)."),
        ("sms_quiet_hours_held_total", Counter, "Messages held back because it was quiet hours where their recipient is (quiet_hours); each is sent when they end."),
        ("sms_duplicates_total", Counter, "Commands acked or dead-lettered as duplicates of a key already sent, failed or in flight."),
        ("sms_dead_lettered_total", Counter, "Commands copied to the dead-letter queue, poison messages included."),
        ("sms_retries_scheduled_total", Counter, "Commands handed to a broker delay tier, confirmed."),
        ("sms_cancels_total", Counter, "Cancels (DELETE /v1/messages/{key}, gRPC Cancel) by outcome: cancelled (a known message), waiting (a key not seen yet: its command is cancelled when it arrives), too_late (sent, being sent or failed)."),
        ("sms_holds_total", Counter, "Commands parked in a hold queue of the broker until they are due (sendAt), confirmed; one per hop."),
        ("sms_requeued_total", Counter, "Commands requeued after an unconfirmed event, or handed back after the shutdown grace period."),
        ("sms_amqp_acks_sent_total", Counter, "basic.ack frames sent for commands; one may settle many."),
        ("sms_amqp_stale_deliveries_dropped_total", Counter, "Deliveries read after their channel had died, dropped unprocessed (the broker redelivers them)."),
        ("sms_lease_takeovers_total", Counter, "Claims that took a key over from a holder that died or ran out of lease before an outcome."),
        ("sms_records_fenced_total", Counter, "Outcomes not recorded, or events not published, because another holder had taken the key over (found by the record or by a lease check after a pause); that holder's outcome stands."),
        ("sms_store_write_failures_total", Counter, "Failed tries of a held Redis write after a provider call (record, mark published); it is tried until Redis takes it."),
        ("sms_redis_wait_short_total", Counter, "Sent records that fewer replicas than redis.wait_replicas acknowledged within redis.wait_timeout_ms (WAIT): an asynchronous failover now could lose them."),
        ("sms_delivery_reports_total", Counter, "Delivery reports by provider instance and the status they set (an SmsDeliveryReport published), or unmatched (no message with that provider id yet: kept until its send is recorded, or refused)."),
        ("sms_callbacks_refused_total", Counter, "Provider callbacks refused, by provider instance and reason (bad_signature, wrong_token, invalid_report, no_callbacks); nothing was changed."),
        ("sms_circuit_state", Gauge, "Circuit breaker of each provider instance: 0 closed, 1 open, 2 half-open."),
        ("sms_in_flight", Gauge, "Commands being processed now, including those waiting for the rate limit or a send slot."),
        ("sms_send_concurrency_limit", Gauge, "The adaptive limit on commands in their send phase at once."),
        ("sms_processing_duration_seconds", Histogram, "Time from taking a command to settling it."),
        ("sms_trace_spans_dropped_total", Counter, "Finished spans dropped unexported because telemetry.max_queued_spans were already waiting for the trace collector."),
        ("sms_trace_export_failures_total", Counter, "Span batches the trace collector refused or did not answer for; their spans are lost."),
        ("sms_command_queue_messages", Gauge, "Messages ready in the command queue, read every 5 s while connected."),
        ("sms_high_queue_messages", Gauge, "Messages ready in the high queue (priority high), read every 5 s while connected."),
        ("sms_dead_letter_queue_messages", Gauge, "Messages ready in the dead-letter queue, read every 5 s while connected."),
        ("sms_held_messages", Gauge, "Commands parked in the hold queues until they are due (sendAt), read every 5 s while connected."),
        ("sms_ready", Gauge, "1 while the service is ready (connected to RabbitMQ and consuming both command queues, Redis answering), else 0; checked at each /readyz and each scrape of /metrics."),
    ]
};

/// Counters labelled by provider instance: each instance registers its
/// series at 0 when it is built (`notification::Providers`); the failovers
/// appear at their first.
const PER_PROVIDER: [&str; 6] = [
    "sms_delivery_reports_total",
    "sms_callbacks_refused_total",
    "sms_provider_requests_total",
    "sms_provider_accepted_total",
    "sms_provider_ambiguous_total",
    "sms_provider_failovers_total",
];

/// Exports `instance`'s delivery-report counters at 0, one series per
/// final status and `unmatched`, and one per reason a callback is refused, so that a dashboard sees them before the first
/// report.
pub fn register_report_counters(instance: &str) {
    // `sent` is where every message starts: no report changes a message to it.
    let statuses = DeliveryStatus::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str());
    for status in statuses.chain(["unmatched"]) {
        metrics::counter!("sms_delivery_reports_total", "provider" => instance.to_owned(), "status" => status)
            .increment(0);
    }
    for reason in crate::ports::CallbackError::CODES {
        metrics::counter!("sms_callbacks_refused_total", "provider" => instance.to_owned(), "reason" => reason)
            .increment(0);
    }
}

/// The label and its values for each counter that has one: each pair is
/// exported at 0 from the start.
fn label_values(counter: &str) -> Option<(&'static str, Vec<&'static str>)> {
    match counter {
        "sms_failed_total" => Some((
            "reason",
            FailureReason::ALL.iter().map(|r| r.as_str()).collect(),
        )),
        "sms_recipient_limited_total" => Some((
            "action",
            LimitAction::ALL.iter().map(|a| a.as_str()).collect(),
        )),
        "sms_cancels_total" => Some(("outcome", vec!["cancelled", "waiting", "too_late"])),
        _ => None,
    }
}

/// Describes every metric, registers every counter at 0 (each label value
/// of it), and sets `sms_build_info`.
fn register_metrics() {
    for (name, kind, help) in METRICS {
        let (name, help) = (*name, *help);
        match kind {
            MetricKind::Counter => {
                metrics::describe_counter!(name, help);
                match label_values(name) {
                    Some((label, values)) => {
                        for value in values {
                            metrics::counter!(name, label => value).increment(0);
                        }
                    }
                    // Registered at 0 per provider instance when it is built.
                    None if PER_PROVIDER.contains(&name) => {}
                    None => metrics::counter!(name).increment(0),
                }
            }
            MetricKind::Gauge => metrics::describe_gauge!(name, help),
            MetricKind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    metrics::gauge!("sms_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics_process::Collector::default().describe();
}

/// The process's metrics recorder, installed (and every metric described
/// and registered) on first call.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets(&seconds)
                .expect("buckets are not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            register_metrics();
            handle
        })
        .clone()
}

/// How often [`metrics_upkeep`] runs.
pub const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Every `every`, until `stop` fires (and once at once): reads the
/// process's CPU time, memory, threads and file descriptors (`/proc/self`
/// on Linux) into the `process_*` metrics, and folds the samples histograms
/// have recorded into their buckets. The recorder keeps each sample until
/// then (or until `/metrics` is scraped), so without this a service nobody
/// scrapes grows by two samples per command without end.
pub async fn metrics_upkeep(handle: PrometheusHandle, every: Duration, stop: CancellationToken) {
    let process = metrics_process::Collector::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                process.collect();
                handle.run_upkeep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// What a subscriber with `log_filter("info", rust_log)` writes while
    /// lapin logs a returned message and a frame, and the service logs a
    /// line of its own.
    fn logged_with(rust_log: Option<&str>) -> String {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(log_filter("info", rust_log).unwrap())
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "lapin::returned_messages", "returned: +254798765432");
            tracing::trace!(target: "lapin::channels", "frame: +254798765432");
            tracing::trace!(target: "lapin::frames", "frame: +254798765432");
            tracing::error!(target: "lapin::channels", "connection error");
            tracing::warn!(target: "sms_service::notification", "SmsSent not confirmed");
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn dependencies_never_log_message_contents_whatever_rust_log_says() {
        for rust_log in [
            None,
            Some("trace"),
            Some("debug,lapin=trace"),
            Some("info,lapin::frames=trace"),
        ] {
            let logged = logged_with(rust_log);
            assert!(!logged.contains("+254798765432"), "{rust_log:?}: {logged}");
            // lapin's own errors show only when a directive names lapin.
            assert_eq!(
                logged.contains("connection error"),
                rust_log.is_some_and(|r| r.contains("lapin")),
                "{rust_log:?}: {logged}"
            );
            assert!(
                logged.contains("SmsSent not confirmed"),
                "{rust_log:?}: {logged}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn upkeep_runs_until_stopped() {
        let stop = CancellationToken::new();
        let task = tokio::spawn(metrics_upkeep(
            metrics(),
            Duration::from_secs(5),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished(), "upkeep ended before it was stopped");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("upkeep stops when told")
            .expect("upkeep does not panic");
    }

    /// A writer into memory, for reading back what a subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Runs `emit` under a subscriber of `format` with the filter of
    /// `level` and `rust_log`, and returns the lines written.
    fn logged(
        format: LogFormat,
        level: &str,
        rust_log: Option<&str>,
        emit: impl FnOnce(),
    ) -> Vec<String> {
        let out = Captured::default();
        let writer = out.clone();
        let filter = log_filter(level, rust_log).unwrap();
        let subscriber = subscriber(format, filter, false, move || writer.clone());
        tracing::subscriber::with_default(subscriber, emit);
        out.lines()
    }

    #[test]
    fn a_json_line_has_one_message_key_and_lists_its_spans_once() {
        let lines = logged(LogFormat::Json, "info", None, || {
            let outer = tracing::info_span!("handle", key = "k1", to = tracing::field::Empty);
            let _outer = outer.enter();
            outer.record("to", "+********5678");
            let inner = tracing::info_span!("send", attempt = 2);
            let _inner = inner.enter();
            tracing::warn!(attempts = 2, "transient provider failure");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line.matches("\"message\":").count(), 1, "{line}");
        assert_eq!(line.matches("\"name\":\"send\"").count(), 1, "{line}");
        assert_eq!(line.matches("\"name\":\"handle\"").count(), 1, "{line}");
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(json["message"], "transient provider failure");
        assert_eq!(json["attempts"], 2);
        assert_eq!(json["level"], "WARN");
        assert!(json.get("span").is_none(), "{line}");
        let spans = json["spans"].as_array().expect("a span list");
        assert_eq!(spans.len(), 2, "{line}");
        assert_eq!(spans[0]["name"], "handle");
        assert_eq!(spans[0]["to"], "+********5678");
        assert_eq!(spans[1]["name"], "send");
    }

    #[test]
    fn colours_only_on_a_terminal_and_never_under_no_color() {
        assert!(colours(true, None));
        assert!(!colours(false, None), "not a terminal");
        assert!(!colours(true, Some(OsStr::new("1"))), "NO_COLOR wins");
        assert!(!colours(false, Some(OsStr::new("1"))));
        assert!(
            colours(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
    }

    #[test]
    fn text_logs_off_a_terminal_carry_no_escape_codes() {
        let ansi = colours(false, None);
        let out = Captured::default();
        let writer = out.clone();
        let filter = log_filter("info", None).unwrap();
        let subscriber = subscriber(LogFormat::Text, filter, ansi, move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(attempts = 2, "transient provider failure")
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(!lines[0].contains('\u{1b}'), "{:?}", lines[0]);
        assert!(lines[0].contains("WARN"), "{:?}", lines[0]);
    }

    #[test]
    fn a_level_that_would_hide_every_log_is_refused_naming_its_source() {
        for bad in [
            "verbose",
            "nonsense===",
            "info,sms_service",
            "",
            " ",
            "inf0",
        ] {
            let err = log_filter(bad, None).unwrap_err().to_string();
            assert!(err.contains("log.level"), "{bad:?}: {err}");
            let err = log_filter("info", Some(bad)).map(drop);
            match bad.trim() {
                // A blank RUST_LOG counts as unset.
                "" => assert!(err.is_ok(), "{bad:?}"),
                _ => {
                    let err = err.unwrap_err().to_string();
                    assert!(err.contains("RUST_LOG"), "{bad:?}: {err}");
                    assert!(err.contains("trace, debug, info"), "{bad:?}: {err}");
                }
            }
        }
        for good in [
            "info",
            "WARN",
            "off",
            "debug,lapin=info",
            "sms_service=debug",
            "info,sms_service::processing=trace",
        ] {
            assert!(log_filter(good, None).is_ok(), "{good}");
            assert!(log_filter("info", Some(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn lapins_own_logs_are_off_unless_a_directive_names_lapin() {
        let emit = || {
            tracing::error!(target: "lapin::io_loop", "Exponential backoff attempts exhausted, aborting recovery");
            tracing::warn!(target: "sms_service::processing", "cannot subscribe yet");
        };
        let quiet = logged(LogFormat::Text, "info", None, emit);
        assert_eq!(quiet.len(), 1, "{quiet:?}");
        assert!(quiet[0].contains("cannot subscribe yet"));
        let also_quiet = logged(LogFormat::Text, "info", Some("debug"), emit);
        assert_eq!(also_quiet.len(), 1, "{also_quiet:?}");
        let asked = logged(LogFormat::Text, "info", Some("info,lapin=error"), emit);
        assert_eq!(asked.len(), 2, "{asked:?}");
    }

    #[test]
    fn every_metric_the_code_records_is_described_with_its_kind() {
        let described: std::collections::HashMap<&str, MetricKind> = METRICS
            .iter()
            .map(|(name, kind, _)| (*name, *kind))
            .collect();
        let mut recorded = Vec::new();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let source = std::fs::read_to_string(&path).unwrap();
                    for (macro_name, kind) in [
                        ("counter!(\"", MetricKind::Counter),
                        ("gauge!(\"", MetricKind::Gauge),
                        ("histogram!(\"", MetricKind::Histogram),
                    ] {
                        for (at, _) in source.match_indices(macro_name) {
                            let rest = &source[at + macro_name.len()..];
                            let name = &rest[..rest.find('"').unwrap()];
                            recorded.push((name.to_owned(), kind, path.clone()));
                        }
                    }
                }
            }
        }
        assert!(
            recorded.len() > 10,
            "the scan found the metrics: {recorded:?}"
        );
        for (name, kind, path) in recorded {
            if name.starts_with("process_") {
                continue;
            }
            assert_eq!(
                described.get(name.as_str()),
                Some(&kind),
                "{name} ({kind:?}, recorded in {}) is not in telemetry::METRICS",
                path.display()
            );
        }
    }

    #[test]
    fn every_counter_and_each_label_value_is_exported_at_zero_with_help() {
        let text = metrics().render();
        for (name, kind, _) in METRICS {
            // Per-instance counters: see notification::providers' tests.
            if *kind == MetricKind::Counter && !PER_PROVIDER.contains(name) {
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no help"
                );
            }
        }
        for reason in FailureReason::ALL {
            let series = format!("sms_failed_total{{reason=\"{}\"}}", reason.as_str());
            assert!(text.contains(&series), "{series} missing");
        }
        assert!(text.contains(&format!(
            "sms_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}

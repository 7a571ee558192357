//! Logs and metrics. Logs go to stderr, human-readable or JSON; `RUST_LOG`
//! overrides the configured level, except for the log targets of
//! dependencies that print message contents ([`PAYLOAD_TARGETS`]), which
//! stay at `error` whatever it says. Metrics go to one process-wide
//! Prometheus recorder, rendered by `/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

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

/// Installs the log subscriber; later calls do nothing.
pub fn init_logs(settings: &LogSettings) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(rust_log.as_deref(), &settings.level))
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `RUST_LOG` when set and valid, else the configured level with lapin at
/// warn; either way with [`PAYLOAD_TARGETS`] kept at `error` (a directive
/// for the same target replaces the user's, so `RUST_LOG=trace` or
/// `lapin=trace` cannot turn them back on).
fn log_filter(rust_log: Option<&str>, level: &str) -> EnvFilter {
    let filter = rust_log
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{level},lapin=warn,amq_protocol=warn")));
    PAYLOAD_TARGETS.iter().fold(filter, |filter, target| {
        let quiet = format!("{target}=error")
            .parse()
            .expect("a valid directive");
        filter.add_directive(quiet)
    })
}

/// The process's metrics recorder, installed on first call.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&seconds)
                .expect("buckets are not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// How often [`metrics_upkeep`] folds recorded samples into histograms.
pub const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds the samples histograms have recorded into their buckets every
/// `every`, until `stop` fires. The recorder keeps each sample until then
/// (or until `/metrics` is scraped), so without this a service nobody
/// scrapes grows by two samples per command without end.
pub async fn metrics_upkeep(handle: PrometheusHandle, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber with `log_filter(rust_log, "info")` writes while
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
            .with_env_filter(log_filter(rust_log, "info"))
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
            assert!(
                logged.contains("connection error"),
                "{rust_log:?}: {logged}"
            );
            assert!(
                logged.contains("SmsSent not confirmed"),
                "{rust_log:?}: {logged}"
            );
        }
    }

    #[test]
    fn an_invalid_rust_log_falls_back_to_the_configured_level() {
        let logged = logged_with(Some("=^nonsense["));
        assert!(logged.contains("SmsSent not confirmed"), "{logged}");
        assert!(!logged.contains("+254798765432"), "{logged}");
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
}

//! Logs and metrics. Logs go to stderr, human-readable or JSON; `RUST_LOG`
//! overrides the configured level. Metrics go to one process-wide
//! Prometheus recorder, rendered by `/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the log subscriber; later calls do nothing.
pub fn init_logs(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},lapin=warn,amq_protocol=warn", settings.level))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
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
    use super::*;

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

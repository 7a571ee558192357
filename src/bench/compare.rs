//! `bench --compare A [--compare B] --pairs N`: two builds of the service
//! measured paired, A, B, A, B, ..., on the same broker, Redis and machine
//! within minutes, so a change's effect is not confused with the machine's
//! drift (on a shared VM, a third within an hour).
//!
//! Each run starts a fake provider (this binary's `fake-provider`, the same
//! for both builds, on a free loopback port), then the build's `run` with
//! scratch names of its own (queues `bench.<id>.sms.send*`, exchanges
//! `bench.<id>.sms.*`, Redis keys `bench-<id>:*`, HTTP on a free loopback
//! port, gRPC off, `RUST_LOG=warn`), waits for its `/readyz`, runs the load
//! of the other options (with their `--baseline`, if any), stops the
//! service with SIGTERM and the fake provider, and deletes the scratch
//! names. The settings the bench read (its `--config` and `SMS__*`) are
//! passed to each service as they are, but for those names.
//!
//! With one `--compare BIN`, A is BIN and B is the bench's own binary.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use serde::Serialize;

use super::{BenchOptions, BenchReport};
use crate::adapters::rabbitmq::Topology;
use crate::config::Settings;

/// What `--compare` runs.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The builds: A, then B.
    pub builds: [PathBuf; 2],
    pub pairs: usize,
    /// The bench's `--config`, passed on to each service.
    pub config: Option<PathBuf>,
    /// The fake provider's `--latency-ms`.
    pub provider_latency_ms: u64,
}

/// One run of one build.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRun {
    pub pair: usize,
    /// `A` or `B`.
    pub build: &'static str,
    /// The run's scratch names: queues and exchanges `bench.<id>.*`,
    /// Redis keys `bench-<id>:*` (deleted after the run).
    pub scratch_id: String,
    pub report: BenchReport,
}

/// Every run, and the medians.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub a: String,
    pub b: String,
    pub runs: Vec<CompareRun>,
    pub a_median_per_s: f64,
    pub b_median_per_s: f64,
    pub a_median_p99_ms: f64,
    pub b_median_p99_ms: f64,
    /// The median over the pairs of B's throughput / A's.
    pub ratio_b_to_a: f64,
}

/// Runs `compare.pairs` pairs, A first in each.
pub async fn run(
    settings: &Settings,
    options: &BenchOptions,
    compare: &CompareOptions,
) -> anyhow::Result<CompareReport> {
    anyhow::ensure!(compare.pairs > 0, "--pairs must be at least 1");
    for build in &compare.builds {
        anyhow::ensure!(
            build.is_file(),
            "{}: no such binary (--compare)",
            build.display()
        );
    }
    let me = std::env::current_exe().context("finding the bench's own binary")?;
    let mut runs = Vec::new();
    for pair in 1..=compare.pairs {
        for (build, binary) in ["A", "B"].into_iter().zip(&compare.builds) {
            eprintln!(
                "pair {pair}/{}: {build} ({})",
                compare.pairs,
                binary.display()
            );
            let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
            let report = one_run(settings, options, compare, &me, binary, &id).await?;
            eprintln!(
                "  {build}: {:.0} cmd/s, p99 {:.1} ms",
                report.service.throughput_per_s, report.service.latency_ms_p99
            );
            runs.push(CompareRun {
                pair,
                build,
                scratch_id: id,
                report,
            });
        }
    }
    let of = |build: &str, f: fn(&BenchReport) -> f64| {
        median(
            runs.iter()
                .filter(|r| r.build == build)
                .map(|r| f(&r.report))
                .collect(),
        )
    };
    let per_s = |r: &BenchReport| r.service.throughput_per_s;
    let p99 = |r: &BenchReport| r.service.latency_ms_p99;
    let ratios = runs
        .chunks(2)
        .map(|pair| {
            pair[1].report.service.throughput_per_s / pair[0].report.service.throughput_per_s
        })
        .collect();
    Ok(CompareReport {
        a: compare.builds[0].display().to_string(),
        b: compare.builds[1].display().to_string(),
        a_median_per_s: of("A", per_s),
        b_median_per_s: of("B", per_s),
        a_median_p99_ms: of("A", p99),
        b_median_p99_ms: of("B", p99),
        ratio_b_to_a: median(ratios),
        runs,
    })
}

/// The median (the mean of the middle two of an even count); 0 when empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// A free port on loopback (free when asked: another process may take it
/// before the child binds it, which then fails to start and says so).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Stops `child` with SIGTERM (through `kill`: the crate has no `unsafe`
/// for `libc::kill`), waiting up to `grace`, then SIGKILL.
fn stop(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `url` until it answers 200, or `limit` passes; fails early if
/// `child` exits.
async fn wait_ok(url: &str, child: &mut Child, limit: Duration, what: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("{what} exited before it was ready ({status})");
        }
        if let Ok(answer) = http.get(url).send().await {
            if answer.status().is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} not ready after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The settings of one run: the bench's, with scratch names.
fn scratch(settings: &Settings, id: &str, provider: &str) -> Settings {
    let mut s = settings.clone();
    s.amqp.command_queue = format!("bench.{id}.sms.send");
    s.amqp.dead_letter_queue = format!("bench.{id}.sms.send.dead");
    s.amqp.sent_exchange = format!("bench.{id}.sms.sent");
    s.amqp.failed_exchange = format!("bench.{id}.sms.failed");
    s.amqp.delivery_exchange = format!("bench.{id}.sms.delivery");
    s.redis.key_prefix = format!("bench-{id}");
    s.provider.base_url = provider.to_owned();
    s
}

/// The environment that gives a service `s`'s scratch names.
fn scratch_env(s: &Settings, http_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("SMS__AMQP__COMMAND_QUEUE", s.amqp.command_queue.clone()),
        (
            "SMS__AMQP__DEAD_LETTER_QUEUE",
            s.amqp.dead_letter_queue.clone(),
        ),
        ("SMS__AMQP__SENT_EXCHANGE", s.amqp.sent_exchange.clone()),
        ("SMS__AMQP__FAILED_EXCHANGE", s.amqp.failed_exchange.clone()),
        (
            "SMS__AMQP__DELIVERY_EXCHANGE",
            s.amqp.delivery_exchange.clone(),
        ),
        ("SMS__REDIS__KEY_PREFIX", s.redis.key_prefix.clone()),
        ("SMS__PROVIDER__BASE_URL", s.provider.base_url.clone()),
        ("SMS__HTTP__BIND", format!("127.0.0.1:{http_port}")),
        ("SMS__GRPC__BIND", String::new()),
        ("RUST_LOG", "warn".to_owned()),
    ]
}

async fn one_run(
    settings: &Settings,
    options: &BenchOptions,
    compare: &CompareOptions,
    me: &PathBuf,
    binary: &PathBuf,
    id: &str,
) -> anyhow::Result<BenchReport> {
    let provider_port = free_port()?;
    let provider_url = format!("http://127.0.0.1:{provider_port}");
    let mut fake = Command::new(me)
        .args([
            "fake-provider",
            "--bind",
            &format!("127.0.0.1:{provider_port}"),
        ])
        .args(["--latency-ms", &compare.provider_latency_ms.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the fake provider")?;
    let s = scratch(settings, id, &provider_url);
    let result = async {
        wait_ok(
            &format!("{provider_url}/healthz"),
            &mut fake,
            Duration::from_secs(10),
            "the fake provider",
        )
        .await?;
        let http_port = free_port()?;
        let mut service = Command::new(binary);
        if let Some(config) = &compare.config {
            service.arg("--config").arg(config);
        }
        let mut service = service
            .arg("run")
            .envs(scratch_env(&s, http_port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} run", binary.display()))?;
        let report = async {
            wait_ok(
                &format!("http://127.0.0.1:{http_port}/readyz"),
                &mut service,
                Duration::from_secs(60),
                "the service",
            )
            .await?;
            let options = BenchOptions {
                service_pids: vec![service.id()],
                ..options.clone()
            };
            super::run(&s, &options).await
        }
        .await;
        let grace = Duration::from_millis(s.processing.shutdown_grace_ms) + Duration::from_secs(5);
        stop(&mut service, grace);
        report
    }
    .await;
    stop(&mut fake, Duration::from_secs(5));
    clean_up(&s).await;
    result
}

/// Deletes a run's scratch queues, exchanges and Redis keys.
async fn clean_up(s: &Settings) {
    let topology = Topology::new(&s.amqp, &s.retry_tiers());
    let url = s.amqp.node_urls()[0].expose_secret().to_owned();
    if let Ok(connection) = Connection::connect(&url, ConnectionProperties::default()).await {
        for queue in topology.queues() {
            // A channel each: an error closes the channel it happens on.
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for (_, exchange) in &topology.exchanges {
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "bench clean-up".into()).await;
    }
    if let Ok(client) = redis::Client::open(s.redis.url.expose_secret()) {
        if let Ok(mut redis) = redis::aio::ConnectionManager::new(client).await {
            let _ = super::minimal::delete_keys(&mut redis, &s.redis.key_prefix).await;
        }
    }
}

/// The compare report as a table: one line per run, then the medians.
pub fn render(r: &CompareReport) -> String {
    let mut out = format!("A: {}\nB: {}\n", r.a, r.b);
    out.push_str(&format!(
        "{:>4} {:>5} {:>10} {:>8} {:>8} {:>9} {:>10} {:>8} {:>8}\n",
        "pair",
        "build",
        "cmd/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "svc µs/msg",
        "/relay",
        "/minimal"
    ));
    let ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
    for run in &r.runs {
        let s = &run.report.service;
        let cpu = s
            .cpu
            .iter()
            .find(|c| c.process == "service")
            .map_or("-".to_owned(), |c| format!("{:.0}", c.cpu_us_per_msg));
        out.push_str(&format!(
            "{:>4} {:>5} {:>10.0} {:>8.1} {:>8.1} {:>9.1} {:>10} {:>8} {:>8}\n",
            run.pair,
            run.build,
            s.throughput_per_s,
            s.latency_ms_p50,
            s.latency_ms_p99,
            s.latency_ms_p999,
            cpu,
            ratio(run.report.ratio),
            ratio(run.report.ratio_minimal)
        ));
    }
    out.push_str(&format!(
        "medians: A {:.0} cmd/s (p99 {:.1} ms), B {:.0} cmd/s (p99 {:.1} ms); B/A {:.3} (median of {} pairs)\n",
        r.a_median_per_s,
        r.a_median_p99_ms,
        r.b_median_per_s,
        r.b_median_p99_ms,
        r.ratio_b_to_a,
        r.runs.len() / 2
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}

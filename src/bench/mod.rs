//! `sms-service bench`: a load generator for a running service, and a bare
//! relay to compare it with.
//!
//! It publishes N SendSms commands with publisher confirms (a window of
//! confirms in flight, never one at a time), subscribes to `sms.sent`
//! through a private queue, and waits for one event per distinct key. The
//! publish instant of each key is kept in memory (the key carries its
//! index), so end-to-end latency is measured on one monotonic clock.
//!
//! With `--baseline` (or `--baseline relay`) it first runs the same load
//! through a built-in bare relay on the same broker (consume, publish a
//! small event with confirm, ack; no Redis, no provider) with the service's
//! prefetch and concurrency: the ceiling this machine's broker sets. With
//! `--baseline minimal` it runs a minimal correct pipeline instead
//! ([`minimal`]: claim, provider call, record, publish with confirm, ack,
//! on the same broker, Redis and provider): the ceiling of a design without
//! batching. `--baseline both` runs the two. Each ratio is the service's
//! throughput over the baseline's, measured minutes apart.
//!
//! Each run also reports the CPU per message of every process it can see
//! on this machine ([`cpu`]: service, broker, Redis, fake provider, the
//! bench itself), and p50/p95/p99/p99.9 of publish-to-event latency;
//! `--rate R --duration S` publishes at a steady rate for S seconds.
//! [`compare`] runs two builds of the service alternately on the same
//! broker (`--compare`).
//!
//! With `--high-probe N` it measures priority instead ([`probe_high`]): it
//! queues the load as a backlog in the command queue (declaring the
//! service's topology first, so the service may start after it), waits
//! until the service works on it, then publishes N `high` commands to the
//! high queue at a steady interval and reports their latency, publish to
//! SmsSent, with the backlog still waiting meanwhile.
//!
//! With `--send-in SECS` every command is scheduled: its `sendAt` is its
//! publish instant plus SECS, rounded up to the whole second. Besides the
//! usual figures the run reports how late each SmsSent came after its
//! `sendAt` ([`Lateness`]), and fails if any came before it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::config::Settings;

pub mod compare;
pub mod cpu;
pub mod minimal;

/// Which built-in pipeline the service is measured against first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Baseline {
    #[default]
    None,
    /// The bare relay: no Redis, no provider (plain `--baseline`).
    Relay,
    /// The minimal correct pipeline ([`minimal`]).
    Minimal,
    /// Both, relay first.
    Both,
}

impl Baseline {
    /// `relay`, `minimal` or `both`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "relay" => Some(Self::Relay),
            "minimal" => Some(Self::Minimal),
            "both" => Some(Self::Both),
            _ => None,
        }
    }

    pub fn relay(self) -> bool {
        matches!(self, Self::Relay | Self::Both)
    }

    pub fn minimal(self) -> bool {
        matches!(self, Self::Minimal | Self::Both)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub count: usize,
    /// Share of commands (0 to 1) that repeat an earlier key.
    pub duplicates: f64,
    /// Steady publish rate in commands/s; `None` publishes as fast as confirms allow.
    pub rate: Option<f64>,
    pub baseline: Baseline,
    /// Confirms in flight while publishing.
    pub window: usize,
    /// Run even though `provider.base_url` is not on loopback (`--i-mean-it`).
    pub allow_remote_provider: bool,
    /// The commands carry `"priority": "bulk"`.
    pub bulk: bool,
    /// `--send-in`: each command carries a `sendAt` this long after its
    /// publish (see [`send_at_after`]).
    pub send_in: Option<Duration>,
    /// The service's processes, for the CPU figures; empty: every
    /// `sms-service run` on this machine.
    pub service_pids: Vec<u32>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            count: 20_000,
            duplicates: 0.0,
            rate: None,
            baseline: Baseline::None,
            window: 1000,
            allow_remote_provider: false,
            bulk: false,
            send_in: None,
            service_pids: Vec::new(),
        }
    }
}

/// How late the SmsSent of a `--send-in` run came after their `sendAt`:
/// the instant the bench received each event, on this machine's wall clock,
/// minus the command's `sendAt`.
#[derive(Debug, Clone, Serialize)]
pub struct Lateness {
    pub send_in_s: u64,
    pub events: usize,
    pub lateness_ms_p50: f64,
    pub lateness_ms_p99: f64,
    pub lateness_ms_max: f64,
}

/// SmsSent of a `--send-in` run, as they come.
#[derive(Debug, Default)]
struct LatenessSamples {
    late: Vec<Duration>,
    /// Keys sent before their `sendAt`, and by how much.
    early: Vec<(usize, Duration)>,
}

impl LatenessSamples {
    /// One SmsSent of key `key`, scheduled for `send_at`, received at
    /// `received`, with the event's own `sentAt` if it has one. Early when
    /// either instant is before `send_at`: `sentAt` is in whole seconds
    /// (truncated), and so is a bench `sendAt`, so an on-time `sentAt` is
    /// never below it.
    fn record(
        &mut self,
        key: usize,
        send_at: SystemTime,
        received: SystemTime,
        sent_at: Option<SystemTime>,
    ) {
        let first = sent_at.map_or(received, |s| s.min(received));
        match send_at.duration_since(first) {
            Ok(early) if !early.is_zero() => self.early.push((key, early)),
            _ => self
                .late
                .push(received.duration_since(send_at).unwrap_or_default()),
        }
    }

    /// The figures, or an error naming the keys sent before their `sendAt`.
    fn report(mut self, send_in: Duration) -> anyhow::Result<Lateness> {
        if !self.early.is_empty() {
            self.early.sort_by_key(|(_, by)| std::cmp::Reverse(*by));
            let (key, by) = self.early[0];
            anyhow::bail!(
                "{} SmsSent came BEFORE their sendAt (worst: key index {key}, {:.3} s early); \
                 {} on time or late",
                self.early.len(),
                by.as_secs_f64(),
                self.late.len()
            );
        }
        anyhow::ensure!(!self.late.is_empty(), "no SmsSent to measure lateness on");
        self.late.sort();
        Ok(Lateness {
            send_in_s: send_in.as_secs(),
            events: self.late.len(),
            lateness_ms_p50: percentile_ms(&self.late, 0.50),
            lateness_ms_p99: percentile_ms(&self.late, 0.99),
            lateness_ms_max: percentile_ms(&self.late, 1.0),
        })
    }
}

/// `sendAt` of a command published at `now` with `--send-in send_in`:
/// `send_in` later, rounded up to the whole second, since the service's
/// `sentAt` is in whole seconds.
fn send_at_after(now: SystemTime, send_in: Duration) -> SystemTime {
    let at = (now + send_in)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let whole = at.as_secs() + u64::from(at.subsec_nanos() > 0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(whole)
}

/// The SendSms body of a bench command.
fn command_body(run_id: &str, key: usize, bulk: bool, send_at: Option<SystemTime>) -> String {
    let priority = if bulk { r#","priority":"bulk""# } else { "" };
    let send_at = send_at
        .map(|at| format!(r#","sendAt":"{}""#, crate::domain::rfc3339(at)))
        .unwrap_or_default();
    format!(
        r#"{{"idempotencyKey":"bench-{run_id}-{key}","phoneNumber":"+254712345678","text":"Your code is {key}"{priority}{send_at}}}"#
    )
}

/// `--high-probe`: `high` commands published beside a backlog.
#[derive(Debug, Clone)]
pub struct HighProbe {
    pub probes: usize,
    /// Between two probes.
    pub interval: Duration,
    /// How long after the service's first event of the backlog the first
    /// probe goes out, so that it meets the service at full speed.
    pub warm_up: Duration,
}

/// Figures of a `--high-probe` run.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub backlog: usize,
    /// Commands of the backlog ready in the command queue as the first
    /// probe was published, and as the last probe's SmsSent arrived.
    pub backlog_waiting_at_first_probe: u32,
    pub backlog_waiting_at_last_probe: u32,
    pub probes: usize,
    pub probe_interval_ms: u64,
    /// Publish to SmsSent of the probes.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    /// Backlog commands per second, the service's first event of it to its last.
    pub backlog_throughput_per_s: f64,
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub target: String,
    pub commands: usize,
    pub distinct_keys: usize,
    pub seconds: f64,
    /// Distinct keys per second, first publish to last event.
    pub throughput_per_s: f64,
    /// Commands per second the publisher managed in this run.
    pub publish_rate_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
    /// CPU per message of each process seen on this machine over the run
    /// (the service's processes only in the service's run).
    pub cpu: Vec<cpu::CpuPerMessage>,
    /// With `--send-in`: SmsSent after `sendAt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lateness: Option<Lateness>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The bare relay's run (`--baseline`, `relay` or `both`).
    pub baseline: Option<RunReport>,
    /// The minimal pipeline's run (`--baseline minimal` or `both`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimal: Option<RunReport>,
    pub service: RunReport,
    /// service throughput / bare relay throughput.
    pub ratio: Option<f64>,
    /// service throughput / minimal pipeline throughput.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_minimal: Option<f64>,
}

/// Refuses a provider that is not on this machine, unless told otherwise.
///
/// The bench never calls the provider itself; the service it loads does,
/// once per command. `provider.base_url` of the settings the bench reads is
/// the best view it has of where those calls go: with a real provider
/// there, every command is a real, paid SMS to `+254712345678`. Only the
/// URL is looked at (no name is resolved): a loopback address, or
/// `localhost`.
pub fn check_provider_is_local(settings: &Settings, allow_remote: bool) -> anyhow::Result<()> {
    // Every instance the service may send through, not only [provider].
    let mut urls = vec![(
        "provider.base_url".to_owned(),
        settings.provider.base_url.clone(),
    )];
    if let Ok((instances, _)) = settings.instances() {
        urls.extend(
            instances
                .into_iter()
                .map(|i| (i.key("base_url"), i.base_url)),
        );
    }
    for (key, base_url) in urls {
        let url = url::Url::parse(&base_url).ok();
        let host = url.as_ref().and_then(|u| u.host());
        let local = match &host {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        // The host only: a URL may carry credentials.
        let host = host.map(|h| h.to_string()).unwrap_or_default();
        anyhow::ensure!(
            local || allow_remote,
            "{key} is not on loopback (host {host:?}): the service would send every \
             bench command as a real SMS through that provider. Point it at a fake provider \
             (sms-service fake-provider) on 127.0.0.1, or pass --i-mean-it"
        );
    }
    Ok(())
}

/// Runs the benchmark against the broker and service that `settings` name.
pub async fn run(settings: &Settings, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    check_provider_is_local(settings, options.allow_remote_provider)?;
    anyhow::ensure!(
        !(options.baseline != Baseline::None && options.send_in.is_some()),
        "--send-in does not go with --baseline: the baselines do not hold commands"
    );
    // The first node of amqp.urls, else amqp.url.
    let url = settings.amqp.node_urls()[0].expose_secret().to_owned();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ (amqp.url)")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let watched = cpu::find(&options.service_pids, redis_port(settings));
    // The service idles while a baseline runs: its figure there says nothing.
    let without_service: Vec<cpu::Watched> = watched
        .iter()
        .filter(|w| w.name != "service")
        .cloned()
        .collect();
    let baseline = if options.baseline.relay() {
        let relay = Relay::start(&connection, &run_id, settings).await?;
        let id = format!("{run_id}-relay");
        let report = measured(
            &without_service,
            load(
                &connection,
                options,
                &relay.queue,
                &relay.exchange,
                &id,
                "bare relay",
            ),
        )
        .await;
        relay.stop(&connection).await;
        Some(report?)
    } else {
        None
    };
    let minimal = if options.baseline.minimal() {
        let pipeline = minimal::Minimal::start(&connection, &run_id, settings).await?;
        let (queue, exchange) = (pipeline.queue.clone(), pipeline.exchange.clone());
        let id = format!("{run_id}-min");
        let report = measured(
            &without_service,
            load(&connection, options, &queue, &exchange, &id, "minimal"),
        )
        .await;
        let stopped = pipeline.stop(&connection).await;
        if stopped.errors > 0 {
            eprintln!(
                "  minimal: {} provider/Redis/broker errors (commands requeued)",
                stopped.errors
            );
        }
        Some(report?)
    } else {
        None
    };
    let id = format!("{run_id}-svc");
    let service = measured(
        &watched,
        load(
            &connection,
            options,
            &settings.amqp.command_queue,
            &settings.amqp.sent_exchange,
            &id,
            "sms-service",
        ),
    )
    .await?;
    let _ = connection.close(200, "bench done".into()).await;
    let ratio_to = |b: &Option<RunReport>| {
        b.as_ref()
            .map(|b| service.throughput_per_s / b.throughput_per_s)
    };
    Ok(BenchReport {
        ratio: ratio_to(&baseline),
        ratio_minimal: ratio_to(&minimal),
        baseline,
        minimal,
        service,
    })
}

/// The port of `redis.url`, to tell its `redis-server` from others.
fn redis_port(settings: &Settings) -> Option<u16> {
    let url = url::Url::parse(settings.redis.url.expose_secret()).ok()?;
    Some(url.port().unwrap_or(6379))
}

/// Runs `run` (a future does nothing until awaited), reading the CPU of
/// `watched` before and after it.
async fn measured(
    watched: &[cpu::Watched],
    run: impl std::future::Future<Output = anyhow::Result<RunReport>>,
) -> anyhow::Result<RunReport> {
    let hz = cpu::ticks_per_second();
    let before = cpu::sample(watched);
    let mut report = run.await?;
    let after = cpu::sample(watched);
    report.cpu = cpu::per_message(watched, &before, &after, report.distinct_keys, hz);
    Ok(report)
}

/// Publishes the load to `queue`, collects one event per key from `exchange`.
async fn load(
    connection: &Connection,
    options: &BenchOptions,
    queue: &str,
    exchange: &str,
    run_id: &str,
    target: &str,
) -> anyhow::Result<RunReport> {
    // Which key each command carries: every so often an earlier one again.
    let mut keys = Vec::with_capacity(options.count);
    let mut distinct = 0usize;
    for i in 0..options.count {
        if distinct > 0 && rand::random::<f64>() < options.duplicates {
            keys.push(rand::random_range(0..distinct));
        } else {
            keys.push(distinct);
            distinct += 1;
        }
        let _ = i;
    }

    // Subscribe before publishing.
    let (events, mut consumer) = subscribe(connection, exchange).await?;

    let published_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; distinct]));
    let send_at: SendAts = Arc::new(std::sync::Mutex::new(vec![None; distinct]));
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let publish = {
        let (published_at, send_at) = (published_at.clone(), send_at.clone());
        let (queue, run_id, options) = (queue.to_owned(), run_id.to_owned(), options.clone());
        tokio::spawn(async move {
            publish_all(
                publisher,
                &queue,
                &run_id,
                &keys,
                &options,
                published_at,
                send_at,
            )
            .await
        })
    };

    let prefix = format!("bench-{run_id}-");
    let mut latencies = Vec::with_capacity(distinct);
    let mut seen = vec![false; distinct];
    let mut last_progress = Instant::now();
    let mut last_event = started;
    let mut lateness = LatenessSamples::default();
    while latencies.len() < distinct {
        // A scheduled run's first event comes send_in after the first publish.
        let limit = SILENCE_LIMIT
            + options
                .send_in
                .filter(|_| latencies.is_empty())
                .unwrap_or_default();
        let delivery = match tokio::time::timeout(limit, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(_) => anyhow::bail!("event subscription ended"),
            Err(_) => anyhow::bail!(
                "no event for {limit:?} with {}/{distinct} received: is the service running and consuming {queue}?",
                latencies.len()
            ),
        };
        let now = Instant::now();
        let received = SystemTime::now();
        let Some(index) = event_index(&delivery.data, &prefix) else {
            continue; // someone else's event on the same exchange
        };
        if index >= distinct || std::mem::replace(&mut seen[index], true) {
            continue;
        }
        if let Some(at) = published_at.lock().unwrap_or_else(|e| e.into_inner())[index] {
            latencies.push(now.duration_since(at));
        }
        if let Some(due) = send_at.lock().unwrap_or_else(|e| e.into_inner())[index] {
            lateness.record(index, due, received, event_sent_at(&delivery.data));
        }
        last_event = now;
        if now.duration_since(last_progress) >= Duration::from_secs(1) {
            last_progress = now;
            eprintln!(
                "  {target}: {}/{distinct} events, {:.0}/s",
                latencies.len(),
                latencies.len() as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let publish_seconds = publish.await??;
    let _ = events.close(200, "done".into()).await;
    let seconds = last_event.duration_since(started).as_secs_f64();
    latencies.sort();
    let pct = |p: f64| percentile_ms(&latencies, p);
    let lateness = options
        .send_in
        .map(|send_in| lateness.report(send_in))
        .transpose()?;
    Ok(RunReport {
        target: target.to_owned(),
        commands: options.count,
        distinct_keys: distinct,
        seconds,
        throughput_per_s: distinct as f64 / seconds,
        publish_rate_per_s: options.count as f64 / publish_seconds,
        latency_ms_p50: pct(0.50),
        latency_ms_p95: pct(0.95),
        latency_ms_p99: pct(0.99),
        latency_ms_p999: pct(0.999),
        latency_ms_max: pct(1.0),
        cpu: Vec::new(),
        lateness,
    })
}

/// A private queue bound to `exchange`, and its consumer (no acks).
async fn subscribe(connection: &Connection, exchange: &str) -> anyhow::Result<(Channel, Consumer)> {
    let events = connection.create_channel().await?;
    let event_queue = events
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    events
        .queue_bind(
            event_queue.name().clone(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding to exchange {exchange} (is the service running?)"))?;
    let consumer = events
        .basic_consume(
            event_queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((events, consumer))
}

/// The `p` quantile (0 to 1) of sorted, non-empty `latencies`, in ms: the
/// smallest value at least a share `p` of them do not exceed.
fn percentile_ms(latencies: &[Duration], p: f64) -> f64 {
    let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[i].as_secs_f64() * 1000.0
}

/// The key index of an event body, if it belongs to this run.
fn event_index(body: &[u8], prefix: &str) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "idempotencyKey", borrow)]
        key: &'a str,
    }
    let event: Event = serde_json::from_slice(body).ok()?;
    event.key.strip_prefix(prefix)?.parse().ok()
}

/// The `sentAt` of an SmsSent body, if it has one.
fn event_sent_at(body: &[u8]) -> Option<SystemTime> {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "sentAt", borrow)]
        sent_at: &'a str,
    }
    let event: Event = serde_json::from_slice(body).ok()?;
    let at = time::OffsetDateTime::parse(
        event.sent_at,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    Some(SystemTime::from(at))
}

/// The `sendAt` of each key of a `--send-in` run, set at its first publish.
type SendAts = Arc<std::sync::Mutex<Vec<Option<SystemTime>>>>;

/// Publishes every command with confirms, `window` in flight; returns seconds
/// taken. With `options.send_in`, a key's commands (a duplicate too) carry
/// the `sendAt` noted in `send_at` at its first publish.
async fn publish_all(
    channel: Channel,
    queue: &str,
    run_id: &str,
    keys: &[usize],
    options: &BenchOptions,
    published_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
    send_at: SendAts,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let window = Arc::new(Semaphore::new(options.window.max(1)));
    let mut confirms = tokio::task::JoinSet::new();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    for (i, key) in keys.iter().enumerate() {
        if let Some(rate) = options.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = window.clone().acquire_owned().await?;
        let due = options.send_in.map(|send_in| {
            let mut due = send_at.lock().unwrap_or_else(|e| e.into_inner());
            *due[*key].get_or_insert_with(|| send_at_after(SystemTime::now(), send_in))
        });
        let body = command_body(run_id, *key, options.bulk, due);
        {
            let mut at = published_at.lock().unwrap_or_else(|e| e.into_inner());
            at[*key].get_or_insert_with(Instant::now);
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties.clone(),
            )
            .await?;
        confirms.spawn(async move {
            let confirmation = confirm.await;
            drop(permit);
            confirmation
        });
        while let Some(done) = confirms.try_join_next() {
            anyhow::ensure!(done??.is_ack(), "broker refused a command");
        }
    }
    while let Some(done) = confirms.join_next().await {
        anyhow::ensure!(done??.is_ack(), "broker refused a command");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Longest wait for the service's next event before a run is given up.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// Longest wait for the service to take the first command of the backlog
/// (it may be started after the backlog is queued).
const START_LIMIT: Duration = Duration::from_secs(120);

/// Events of one `--high-probe` run, told apart by key.
struct ProbeEvents {
    consumer: Consumer,
    backlog_prefix: String,
    probe_prefix: String,
    backlog_seen: Vec<bool>,
    backlog_done: usize,
    backlog_first: Option<Instant>,
    backlog_last: Option<Instant>,
    probe_sent_at: Vec<Option<Instant>>,
    probes_done: usize,
}

impl ProbeEvents {
    /// Reads the next event of the run (others are skipped), within `limit`.
    async fn next(&mut self, limit: Duration) -> anyhow::Result<()> {
        loop {
            let delivery = match tokio::time::timeout(limit, self.consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                Ok(_) => anyhow::bail!("event subscription ended"),
                Err(_) => anyhow::bail!(
                    "no event for {limit:?} with {}/{} of the backlog and {}/{} probes received: \
                     is the service running and consuming?",
                    self.backlog_done,
                    self.backlog_seen.len(),
                    self.probes_done,
                    self.probe_sent_at.len()
                ),
            };
            let now = Instant::now();
            if let Some(i) = event_index(&delivery.data, &self.backlog_prefix) {
                if i < self.backlog_seen.len()
                    && !std::mem::replace(&mut self.backlog_seen[i], true)
                {
                    self.backlog_done += 1;
                    self.backlog_first.get_or_insert(now);
                    self.backlog_last = Some(now);
                    return Ok(());
                }
            } else if let Some(j) = event_index(&delivery.data, &self.probe_prefix) {
                if let Some(slot @ None) = self.probe_sent_at.get_mut(j) {
                    *slot = Some(now);
                    self.probes_done += 1;
                    return Ok(());
                }
            }
        }
    }
}

/// Queues `options.count` commands as a backlog in the command queue, waits
/// until the service works on it, publishes `probe.probes` `high` commands
/// to the high queue `probe.interval` apart, and measures each from its
/// publish to its SmsSent. Then waits for the rest of the backlog, so
/// that nothing is left behind for the next run.
pub async fn probe_high(
    settings: &Settings,
    options: &BenchOptions,
    probe: &HighProbe,
) -> anyhow::Result<ProbeReport> {
    use crate::ports::QueueClient;
    check_provider_is_local(settings, options.allow_remote_provider)?;
    anyhow::ensure!(probe.probes > 0, "--high-probe must be at least 1");
    anyhow::ensure!(
        options.send_in.is_none(),
        "--send-in does not go with --high-probe"
    );
    // Declared as the service declares them: the backlog needs its queue
    // before the service (started later, perhaps) does.
    let broker = crate::adapters::rabbitmq::RabbitMq::new(&settings.amqp, &settings.retry_tiers());
    broker
        .connect()
        .await
        .context("declaring the service's queues (amqp.url)")?;
    let high_queue = broker.topology().high_queue.clone();
    broker.close().await;
    let command_queue = settings.amqp.command_queue.clone();

    // The first node of amqp.urls, else amqp.url.
    let url = settings.amqp.node_urls()[0].expose_secret().to_owned();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ (amqp.url)")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (events, consumer) = subscribe(&connection, &settings.amqp.sent_exchange).await?;
    let (backlog_run, probe_run) = (format!("{run_id}-b"), format!("{run_id}-h"));
    let mut seen = ProbeEvents {
        consumer,
        backlog_prefix: format!("bench-{backlog_run}-"),
        probe_prefix: format!("bench-{probe_run}-"),
        backlog_seen: vec![false; options.count],
        backlog_done: 0,
        backlog_first: None,
        backlog_last: None,
        probe_sent_at: vec![None; probe.probes],
        probes_done: 0,
    };

    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let keys: Vec<usize> = (0..options.count).collect();
    let unused = Arc::new(std::sync::Mutex::new(vec![None; options.count]));
    let no_send_at = Arc::new(std::sync::Mutex::new(vec![None; options.count]));
    let seconds = publish_all(
        publisher.clone(),
        &command_queue,
        &backlog_run,
        &keys,
        options,
        unused,
        no_send_at,
    )
    .await?;
    eprintln!(
        "  backlog: {} commands queued in {command_queue} ({:.0}/s); waiting for the service",
        options.count,
        options.count as f64 / seconds
    );
    seen.next(START_LIMIT).await?;
    let warm = Instant::now() + probe.warm_up;
    while let Ok(read) = tokio::time::timeout_at(warm.into(), seen.next(SILENCE_LIMIT)).await {
        read?;
    }
    let depth = connection.create_channel().await?;
    let waiting_at_first = waiting(&depth, &command_queue).await?;

    let published_at = Arc::new(std::sync::Mutex::new(vec![None; probe.probes]));
    let publishing = {
        let (published_at, interval) = (published_at.clone(), probe.interval);
        let (run, count) = (probe_run.clone(), probe.probes);
        tokio::spawn(async move {
            publish_probes(
                &publisher,
                &high_queue,
                &run,
                count,
                interval,
                &published_at,
            )
            .await
        })
    };
    while seen.probes_done < probe.probes {
        seen.next(SILENCE_LIMIT).await?;
    }
    let waiting_at_last = waiting(&depth, &command_queue).await?;
    publishing.await??;
    eprintln!(
        "  probes: {} sent; {} of the backlog waiting; draining the rest",
        probe.probes, waiting_at_last
    );
    while seen.backlog_done < options.count {
        seen.next(SILENCE_LIMIT).await?;
    }
    let _ = events.close(200, "done".into()).await;
    let _ = connection.close(200, "bench done".into()).await;

    let published_at = published_at.lock().unwrap_or_else(|e| e.into_inner());
    let mut latencies: Vec<Duration> = published_at
        .iter()
        .zip(&seen.probe_sent_at)
        .filter_map(|(at, sent)| Some(sent.as_ref()?.duration_since(*at.as_ref()?)))
        .collect();
    latencies.sort();
    let backlog_seconds = match (seen.backlog_first, seen.backlog_last) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    Ok(ProbeReport {
        backlog: options.count,
        backlog_waiting_at_first_probe: waiting_at_first,
        backlog_waiting_at_last_probe: waiting_at_last,
        probes: probe.probes,
        probe_interval_ms: u64::try_from(probe.interval.as_millis()).unwrap_or(u64::MAX),
        latency_ms_p50: percentile_ms(&latencies, 0.50),
        latency_ms_p99: percentile_ms(&latencies, 0.99),
        latency_ms_max: percentile_ms(&latencies, 1.0),
        backlog_throughput_per_s: options.count as f64 / backlog_seconds.max(f64::EPSILON),
    })
}

/// Messages ready in `queue`.
async fn waiting(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("reading the depth of {queue}"))?;
    Ok(declared.message_count())
}

/// Publishes `count` `high` commands to `queue`, one every `interval`,
/// each confirmed; notes when each was published.
async fn publish_probes(
    channel: &Channel,
    queue: &str,
    run_id: &str,
    count: usize,
    interval: Duration,
    published_at: &std::sync::Mutex<Vec<Option<Instant>>>,
) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let mut tick = tokio::time::interval(interval);
    let mut confirms = tokio::task::JoinSet::new();
    for j in 0..count {
        tick.tick().await;
        let body = format!(
            r#"{{"idempotencyKey":"bench-{run_id}-{j}","phoneNumber":"+254712345678","text":"Your code is {j}","priority":"high"}}"#
        );
        published_at.lock().unwrap_or_else(|e| e.into_inner())[j] = Some(Instant::now());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties.clone(),
            )
            .await?;
        confirms.spawn(confirm);
    }
    while let Some(done) = confirms.join_next().await {
        anyhow::ensure!(done??.is_ack(), "broker refused a probe");
    }
    Ok(())
}

/// A `--high-probe` report as a table.
pub fn render_probe(r: &ProbeReport) -> String {
    format!(
        "{:>8} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>10}\n\
         {:>8} {:>9} {:>9} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>10.0}\n",
        "backlog",
        "waiting",
        "waiting",
        "probes",
        "p50 ms",
        "p99 ms",
        "max ms",
        "backlog/s",
        r.backlog,
        r.backlog_waiting_at_first_probe,
        r.backlog_waiting_at_last_probe,
        r.probes,
        r.latency_ms_p50,
        r.latency_ms_p99,
        r.latency_ms_max,
        r.backlog_throughput_per_s,
    )
}

/// What a built-in pipeline (the bare relay, the minimal one) runs on: its
/// own durable queue (declared with `arguments`) and auto-deleted fanout
/// exchange, a consumer with the service's prefetch, and a channel that
/// publishes with confirms.
async fn lane(
    connection: &Connection,
    settings: &Settings,
    queue: &str,
    arguments: FieldTable,
    exchange: &str,
) -> anyhow::Result<(Channel, Consumer)> {
    let setup = connection.create_channel().await?;
    setup
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    setup
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consumer = consume
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((publish, consumer))
}

/// The bare relay: consume, publish a small event with confirm, ack.
struct Relay {
    queue: String,
    exchange: String,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(
        connection: &Connection,
        run_id: &str,
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        let queue = format!("sms.bench.{run_id}.relay");
        let exchange = format!("sms.bench.{run_id}.relayed");
        let (publish, mut consumer) = lane(
            connection,
            settings,
            &queue,
            FieldTable::default(),
            &exchange,
        )
        .await?;
        let in_flight = Arc::new(Semaphore::new(settings.processing.max_in_flight));
        let target = exchange.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (publish, target) = (publish.clone(), target.clone());
                tokio::spawn(async move {
                    let key = event_key(&delivery.data);
                    let event = format!(r#"{{"idempotencyKey":"{key}"}}"#);
                    let properties = BasicProperties::default().with_delivery_mode(2);
                    if let Ok(confirm) = publish
                        .basic_publish(
                            target.as_str().into(),
                            "".into(),
                            BasicPublishOptions::default(),
                            event.as_bytes(),
                            properties,
                        )
                        .await
                    {
                        if confirm.await.is_ok() {
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        }
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self {
            queue,
            exchange,
            task,
        })
    }

    async fn stop(self, connection: &Connection) {
        self.task.abort();
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

fn event_key(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Command {
        #[serde(rename = "idempotencyKey")]
        key: String,
    }
    serde_json::from_slice::<Command>(body)
        .map(|c| c.key)
        .unwrap_or_default()
}

/// The report as a table.
pub fn render(report: &BenchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<12} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
        "target",
        "commands",
        "keys",
        "cmd/s",
        "publish/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms"
    ));
    let runs = || {
        report
            .baseline
            .iter()
            .chain(&report.minimal)
            .chain(std::iter::once(&report.service))
    };
    for r in runs() {
        out.push_str(&format!(
            "{:<12} {:>8} {:>8} {:>10.0} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>8.1}\n",
            r.target,
            r.commands,
            r.distinct_keys,
            r.throughput_per_s,
            r.publish_rate_per_s,
            r.latency_ms_p50,
            r.latency_ms_p95,
            r.latency_ms_p99,
            r.latency_ms_p999,
            r.latency_ms_max
        ));
    }
    if let Some(ratio) = report.ratio {
        out.push_str(&format!("ratio service/baseline: {ratio:.2}\n"));
    }
    if let Some(ratio) = report.ratio_minimal {
        out.push_str(&format!("ratio service/minimal: {ratio:.2}\n"));
    }
    for r in runs().filter(|r| !r.cpu.is_empty()) {
        let each: Vec<String> = r
            .cpu
            .iter()
            .map(|c| {
                let n = if c.processes > 1 {
                    format!(" ({} processes)", c.processes)
                } else {
                    String::new()
                };
                format!("{} {:.0}{n}", c.process, c.cpu_us_per_msg)
            })
            .collect();
        out.push_str(&format!("CPU µs/msg, {}: {}\n", r.target, each.join(", ")));
    }
    if let Some(l) = &report.service.lateness {
        out.push_str(&format!(
            "SmsSent after sendAt (send-in {} s, {} events): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            l.send_in_s, l.events, l.lateness_ms_p50, l.lateness_ms_p99, l.lateness_ms_max
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn a_scheduled_bench_command_carries_its_send_at_rounded_up_to_the_second() {
        let publish = at(1_795_000_000, 250);
        let due = send_at_after(publish, Duration::from_secs(240));
        assert_eq!(due, at(1_795_000_241, 0));
        // On a whole second already: exactly send_in later.
        let due_exact = send_at_after(at(1_795_000_000, 0), Duration::from_secs(240));
        assert_eq!(due_exact, at(1_795_000_240, 0));

        let now = SystemTime::now();
        let due = send_at_after(now, Duration::from_secs(60));
        let body = command_body("r1", 7, true, Some(due));
        let cmd = crate::domain::SendSms::from_json(body.as_bytes()).unwrap();
        assert_eq!(cmd.send_at, Some(due), "{body}");
        assert_eq!(cmd.idempotency_key.as_str(), "bench-r1-7");
        assert_eq!(cmd.priority, crate::domain::Priority::Bulk);
        assert!(body.contains(&format!(r#""sendAt":"{}""#, crate::domain::rfc3339(due))));

        let plain = command_body("r1", 8, false, None);
        let cmd = crate::domain::SendSms::from_json(plain.as_bytes()).unwrap();
        assert_eq!(cmd.send_at, None);
        assert!(!plain.contains("sendAt") && !plain.contains("priority"));
    }

    #[test]
    fn lateness_is_measured_from_send_at_and_an_early_sms_sent_fails_the_run() {
        let due = at(1_795_000_240, 0);
        let mut samples = LatenessSamples::default();
        for (i, late_ms) in [0u64, 400, 900, 1200].into_iter().enumerate() {
            let received = due + Duration::from_millis(late_ms);
            // sentAt is truncated to the second, as the service writes it.
            let sent_at = at(1_795_000_240 + late_ms / 1000, 0);
            samples.record(i, due, received, Some(sent_at));
        }
        let report = samples.report(Duration::from_secs(240)).unwrap();
        assert_eq!((report.send_in_s, report.events), (240, 4));
        assert_eq!(report.lateness_ms_p50, 400.0);
        assert_eq!(report.lateness_ms_p99, 1200.0);
        assert_eq!(report.lateness_ms_max, 1200.0);

        // Received before sendAt.
        let mut samples = LatenessSamples::default();
        samples.record(0, due, due + Duration::from_millis(5), None);
        samples.record(1, due, due - Duration::from_millis(1500), None);
        let err = samples
            .report(Duration::from_secs(240))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 SmsSent came BEFORE"), "{err}");
        assert!(err.contains("key index 1, 1.500 s early"), "{err}");

        // Received after, but the provider accepted it a second early.
        let mut samples = LatenessSamples::default();
        samples.record(
            3,
            due,
            due + Duration::from_millis(50),
            Some(at(1_795_000_239, 0)),
        );
        let err = samples.report(Duration::from_secs(240)).unwrap_err();
        assert!(err.to_string().contains("key index 3"), "{err}");

        assert!(LatenessSamples::default()
            .report(Duration::from_secs(1))
            .is_err());
    }

    #[test]
    fn the_sent_at_of_an_event_is_read() {
        let body = br#"{"idempotencyKey":"bench-x-1","sentAt":"2026-11-22T10:00:00Z"}"#;
        assert_eq!(
            event_sent_at(body).map(crate::domain::rfc3339).as_deref(),
            Some("2026-11-22T10:00:00Z")
        );
        assert_eq!(event_sent_at(br#"{"idempotencyKey":"k"}"#), None);
    }

    fn with_provider(base_url: &str) -> Settings {
        let env = [("SMS__PROVIDER__BASE_URL".to_owned(), base_url.to_owned())];
        let env = crate::config::environment().source(Some(env.into_iter().collect()));
        Settings::load_from(None, env).unwrap()
    }

    #[test]
    fn the_bench_runs_only_against_a_provider_on_loopback_unless_told_otherwise() {
        for local in [
            "http://127.0.0.1:9000",
            "http://127.8.9.10",
            "http://[::1]:9000/",
            "http://localhost:9000",
            "https://LOCALHOST/api",
        ] {
            assert!(
                check_provider_is_local(&with_provider(local), false).is_ok(),
                "{local}"
            );
        }
        for remote in [
            "https://api.example.com",
            "http://10.0.0.5:9000",
            "http://[2001:db8::1]",
            "http://localhost.example.com",
            "http://0.0.0.0:9000",
        ] {
            let settings = with_provider(remote);
            let err = check_provider_is_local(&settings, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("provider.base_url"), "{remote}: {err}");
            assert!(err.contains("--i-mean-it"), "{remote}: {err}");
            assert!(check_provider_is_local(&settings, true).is_ok(), "{remote}");
        }
        let with_password = with_provider("https://user:hunter2@api.example.com");
        let err = check_provider_is_local(&with_password, false).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        // A named instance counts too, not only [provider].
        let env = [
            ("SMS__PROVIDERS__REAL__KIND", "generic"),
            ("SMS__PROVIDERS__REAL__BASE_URL", "https://sms.example.com"),
        ];
        let map = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let settings = crate::config::Settings::load_from(
            None,
            crate::config::environment().source(Some(map)),
        )
        .unwrap();
        let err = check_provider_is_local(&settings, false).unwrap_err();
        assert!(err.to_string().contains("providers.real.base_url"), "{err}");
    }
}

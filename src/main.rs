//! The `sms-service` binary: parses the command line, loads the settings
//! and calls into the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sms_service::config::Settings;
use sms_service::{app, cli_tools};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// mimalloc: the hot path allocates small, short-lived buffers (frames,
/// futures, JSON); glibc's allocator showed up at ~15% of the service's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Sends SMS from RabbitMQ commands, once per idempotency key",
    // A bare `sms-service` prints this help and exits 2: it never starts
    // consuming a queue just because someone wanted to see what it does.
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    /// A settings file layered over config/default.toml (env SMS__* still wins).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume commands until SIGTERM or SIGINT.
    Run,
    /// Publish one SendSms command and print its idempotency key.
    Send {
        /// Phone number, E.164 (+254712345678).
        #[arg(long)]
        to: String,
        /// Message text.
        #[arg(long)]
        text: String,
        /// Idempotency key (default: a fresh UUID).
        #[arg(long)]
        key: Option<String>,
        /// Sender id shown on the handset.
        #[arg(long)]
        sender: Option<String>,
        /// Declare the service's queues and exchanges first, as the service
        /// does; without it a command queue that does not exist is an error.
        #[arg(long)]
        declare: bool,
    },
    /// Print events (SmsSent, SmsFailed, delivery reports) as they are
    /// published, phone numbers masked, until Ctrl-C or SIGTERM.
    Events {
        /// Print each event's JSON (phone number masked) instead of a line.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Load-test a running service (and, with --baseline, a bare relay or
    /// a minimal pipeline first), or two builds of it (--compare).
    Bench {
        /// Commands to publish (with --high-probe: the backlog).
        #[arg(long, short = 'n', visible_alias = "backlog", default_value_t = 20_000)]
        count: usize,
        /// The commands carry "priority": "bulk".
        #[arg(long)]
        bulk: bool,
        /// Measure priority instead: queue the commands as a backlog in the
        /// command queue, then publish this many "high" commands to the
        /// high queue and report their latency to SmsSent.
        #[arg(long, value_name = "N", conflicts_with_all = ["baseline", "duplicates", "rate"])]
        high_probe: Option<usize>,
        /// With --high-probe: milliseconds between two high commands.
        #[arg(long, default_value_t = 50, requires = "high_probe")]
        probe_interval_ms: u64,
        /// Schedule every command: sendAt = its publish time + SECS (rounded
        /// up to the second); also report how late each SmsSent came after
        /// its sendAt, and fail if one came before it.
        #[arg(
            long,
            value_name = "SECS",
            conflicts_with_all = ["baseline", "high_probe"],
            value_parser = clap::value_parser!(u64).range(1..=2_592_000)
        )]
        send_in: Option<u64>,
        /// Share of commands (0 to 1) that repeat an earlier key.
        #[arg(long, default_value_t = 0.0)]
        duplicates: f64,
        /// Publish at this steady rate (commands/s) instead of flat out.
        #[arg(long)]
        rate: Option<f64>,
        /// With --rate: publish for this many seconds (rate x seconds
        /// commands) instead of -n.
        #[arg(long, value_name = "SECS", requires = "rate", conflicts_with = "count")]
        duration: Option<f64>,
        /// Measure a built-in pipeline on the same broker first, and print
        /// the service's ratio to it: relay (the default: consume, publish,
        /// ack), minimal (claim in Redis, provider call, record, publish,
        /// ack) or both.
        #[arg(
            long,
            value_name = "KIND",
            num_args = 0..=1,
            default_missing_value = "relay",
            value_parser = parse_baseline
        )]
        baseline: Option<sms_service::bench::Baseline>,
        /// The service's process id, for its CPU per message (repeatable;
        /// default: every `sms-service run` on this machine).
        #[arg(long = "service-pid", value_name = "PID")]
        service_pids: Vec<u32>,
        /// Compare two builds: run each build's service in turn (A, B, A,
        /// B, ...) with a fake provider, on scratch queues of the same
        /// broker, and print each run, the medians and B/A. Given once, A
        /// is BIN and B this binary; given twice, A then B.
        #[arg(
            long,
            value_name = "BIN",
            num_args = 1,
            action = clap::ArgAction::Append,
            conflicts_with_all = ["high_probe", "service_pids"]
        )]
        compare: Vec<PathBuf>,
        /// With --compare: pairs of runs.
        #[arg(long, default_value_t = 5, requires = "compare")]
        pairs: usize,
        /// With --compare: the fake provider's latency, in milliseconds.
        #[arg(long, default_value_t = 0, requires = "compare")]
        provider_latency_ms: u64,
        /// Publisher confirms in flight.
        #[arg(long, default_value_t = 1000)]
        window: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Run even though provider.base_url is not on loopback: every
        /// command is then a real SMS through that provider.
        #[arg(long)]
        i_mean_it: bool,
    },
    /// Inspect or replay the dead-letter queue.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Clear a key's failed record, so that the next command with it is sent
    /// afresh. Refuses a key that was sent or is in progress.
    Forget {
        /// The idempotency key.
        key: String,
    },
    /// Print a message's status document (GET /v1/messages/{key} of the
    /// running service). Exit 0 when found, 1 when the key is unknown.
    Status {
        /// The idempotency key.
        key: String,
        /// The service's HTTP API (default: http://{http.bind}).
        #[arg(long)]
        url: Option<String>,
        /// A key of http.api_keys, sent as a bearer key.
        #[arg(long, env = "SMS_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Print what a text costs as sent: encoding, segments and characters,
    /// with smart encoding and without, and each character it replaces.
    Segments {
        /// The message text (quote it in the shell).
        text: String,
    },
    /// Serve a fake of a provider's API, in its dialect.
    FakeProvider {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        bind: String,
        /// The provider whose API it speaks: generic, twilio,
        /// africastalking, vonage or infobip.
        #[arg(long, default_value = "generic", value_parser = parse_kind)]
        kind: sms_service::config::ProviderKind,
        /// A credential the fake expects, as NAME=VALUE (account_sid,
        /// auth_token, api_key, api_secret, username, token); repeatable.
        /// Without one it accepts any well-formed value.
        #[arg(long = "credential", value_parser = parse_credential)]
        credentials: Vec<(String, String)>,
        /// Latency added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of calls (0 to 1) answered with the dialect's transient
        /// failure (generic: 503; see docs/providers.md for the others).
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Share of calls (0 to 1) answered with the dialect's rejection of
        /// the message (generic: 400).
        #[arg(long, default_value_t = 0.0)]
        reject_rate: f64,
        /// Share of calls (0 to 1) answered with the dialect's throttling
        /// (generic: 429 with `Retry-After: 1`).
        #[arg(long, default_value_t = 0.0)]
        throttle_rate: f64,
        #[command(flatten)]
        reports: ReportArgs,
    },
}

/// The fake's delivery reports.
#[derive(clap::Args)]
struct ReportArgs {
    /// Post each accepted message's delivery reports here, in the
    /// dialect's own callback format and signed as the provider signs them
    /// (e.g. http://127.0.0.1:8080/v1/callbacks/twilio). Without it the
    /// fake reports nothing.
    #[arg(long)]
    dlr_url: Option<String>,
    /// Wait before the reports of a message, in milliseconds.
    #[arg(long, default_value_t = 200)]
    dlr_delay_ms: u64,
    /// Share of messages (0 to 1) reported as not delivered.
    #[arg(long, default_value_t = 0.0)]
    dlr_fail_rate: f64,
    /// Send each message's final report twice.
    #[arg(long)]
    dlr_duplicates: bool,
    /// Send the final report before the intermediate one.
    #[arg(long)]
    dlr_out_of_order: bool,
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Show dead letters with their reason, leaving them in the queue.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the command queue (confirmed, then removed),
    /// each at most once: at most the letters queued when it starts.
    Replay {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Clear each letter's failed record first, so that its command is
        /// sent afresh instead of ending as a duplicate of a failed command
        /// (never clears a sent key).
        #[arg(long)]
        reset: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let mut traces = sms_service::telemetry::Traces::default();
    if cli.command.is_one_shot() {
        init_one_shot_logs();
    } else {
        // Inside the runtime: the gRPC trace exporter needs one. The
        // metrics recorder first: the exporter's dropped-spans counter is
        // taken from it (before it is installed, a counter counts nothing).
        let _runtime = runtime.enter();
        sms_service::telemetry::metrics();
        match sms_service::telemetry::init_logs(&settings.log, &settings.telemetry) {
            Ok(pipeline) => traces = pipeline,
            // A filter that hides every log is a bad setting like any other.
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Send {
                to,
                text,
                key,
                sender,
                declare,
            } => {
                let command = cli_tools::NewCommand {
                    to,
                    text,
                    key,
                    sender,
                };
                let key = cli_tools::send(&settings, command, declare).await?;
                println!("{key}");
                Ok(())
            }
            Command::Events { json, count } => {
                let options = cli_tools::EventsOptions { json, count };
                cli_tools::events(&settings, options, app::shutdown_signal())
                    .await
                    .map(drop)
            }
            Command::Bench {
                count,
                bulk,
                high_probe,
                probe_interval_ms,
                send_in,
                duplicates,
                rate,
                duration,
                baseline,
                service_pids,
                compare,
                pairs,
                provider_latency_ms,
                window,
                json,
                i_mean_it,
            } => {
                let count = match (duration, rate) {
                    (Some(seconds), Some(rate)) => (seconds * rate).ceil() as usize,
                    _ => count,
                };
                let options = sms_service::bench::BenchOptions {
                    count,
                    duplicates,
                    rate,
                    baseline: baseline.unwrap_or_default(),
                    window,
                    allow_remote_provider: i_mean_it,
                    bulk,
                    send_in: send_in.map(Duration::from_secs),
                    service_pids,
                };
                if !compare.is_empty() {
                    anyhow::ensure!(compare.len() <= 2, "--compare takes one or two builds");
                    let me = std::env::current_exe()?;
                    let builds = match <[PathBuf; 2]>::try_from(compare) {
                        Ok(both) => both,
                        Err(one) => [one[0].clone(), me],
                    };
                    let compare = sms_service::bench::compare::CompareOptions {
                        builds,
                        pairs,
                        config: cli.config.clone(),
                        provider_latency_ms,
                    };
                    return compare_builds(settings, options, compare, json).await;
                }
                let probe = high_probe.map(|probes| sms_service::bench::HighProbe {
                    probes,
                    interval: Duration::from_millis(probe_interval_ms),
                    warm_up: Duration::from_secs(1),
                });
                bench(settings, options, probe, json).await
            }
            Command::DeadLetters { action } => dead_letters(settings, action).await,
            Command::Forget { key } => forget(settings, key).await,
            Command::Status { key, url, api_key } => {
                let found =
                    cli_tools::status(&settings, url.as_deref(), api_key.as_deref(), &key).await?;
                match found {
                    Some(document) => {
                        println!("{}", serde_json::to_string_pretty(&document)?);
                        Ok(())
                    }
                    None => anyhow::bail!("{key}: no message with this key"),
                }
            }
            Command::Segments { text } => {
                let report = cli_tools::segments_report(&text, settings.encoding.smart)?;
                print!("{report}");
                Ok(())
            }
            Command::FakeProvider {
                bind,
                kind,
                credentials,
                latency_ms,
                fail_rate,
                reject_rate,
                throttle_rate,
                reports,
            } => {
                let settings = sms_service::fake_provider::FakeSettings {
                    kind,
                    credentials: credentials.into_iter().collect(),
                    latency: Duration::from_millis(latency_ms),
                    fail_rate,
                    reject_rate,
                    throttle_rate,
                    reports: reports.dlr_url.map(|url| {
                        sms_service::fake_provider::ReportSettings {
                            url,
                            delay: Duration::from_millis(reports.dlr_delay_ms),
                            fail_rate: reports.dlr_fail_rate,
                            duplicates: reports.dlr_duplicates,
                            out_of_order: reports.dlr_out_of_order,
                        }
                    }),
                };
                fake_provider(bind, settings).await
            }
        }
    });
    // While the runtime still runs: the gRPC exporter's connection lives on it.
    traces.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// The operator's commands that do one thing and exit.
    fn is_one_shot(&self) -> bool {
        matches!(
            self,
            Command::Send { .. }
                | Command::Events { .. }
                | Command::DeadLetters { .. }
                | Command::Forget { .. }
                | Command::Status { .. }
                | Command::Segments { .. }
        )
    }
}

/// Logs of the one-shot commands: their result is on stdout and what went
/// wrong is one `error:` line, so only warnings show, and none of the AMQP
/// client's (its errors are in that line); `RUST_LOG` still applies.
fn init_one_shot_logs() {
    // Warnings only, unless RUST_LOG says otherwise; either way through the
    // service's filter, which keeps lapin off unless named and its
    // payload-printing targets at error even then.
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = sms_service::telemetry::log_filter("warn", rust_log.as_deref())
        .unwrap_or_else(|_| EnvFilter::new("warn,lapin=off,amq_protocol=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let running = app::start(settings).await?;
    tokio::select! {
        _ = app::shutdown_signal() => {
            tracing::info!("signal received; shutting down");
            running.stop().await;
            Ok(())
        }
        // A queue of the other type: no reconnect can help. Say it once,
        // clearly, and exit non-zero rather than retry forever.
        conflict = running.conflict() => {
            tracing::error!("{conflict}");
            running.stop().await;
            anyhow::bail!("{conflict}")
        }
    }
}

async fn bench(
    settings: Settings,
    options: sms_service::bench::BenchOptions,
    probe: Option<sms_service::bench::HighProbe>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(options.count > 0, "--count must be at least 1");
    anyhow::ensure!(
        (0.0..1.0).contains(&options.duplicates),
        "--duplicates must be in [0, 1)"
    );
    if let Some(probe) = probe {
        let report = sms_service::bench::probe_high(&settings, &options, &probe).await?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", sms_service::bench::render_probe(&report));
        }
        return Ok(());
    }
    let report = sms_service::bench::run(&settings, &options).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", sms_service::bench::render(&report));
    }
    Ok(())
}

async fn compare_builds(
    settings: Settings,
    options: sms_service::bench::BenchOptions,
    compare: sms_service::bench::compare::CompareOptions,
    json: bool,
) -> anyhow::Result<()> {
    use sms_service::bench::compare;
    anyhow::ensure!(options.count > 0, "--count must be at least 1");
    let report = compare::run(&settings, &options, &compare).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", compare::render(&report));
    }
    Ok(())
}

async fn dead_letters(settings: Settings, action: DeadLetterAction) -> anyhow::Result<()> {
    use sms_service::dead_letters;
    match action {
        DeadLetterAction::List { limit, json } => {
            let letters = dead_letters::list(&settings, limit).await?;
            if json {
                for letter in &letters {
                    println!("{}", serde_json::to_string(letter)?);
                }
            } else {
                print!("{}", dead_letters::render(&letters));
            }
        }
        DeadLetterAction::Replay { limit, reset } => {
            let replayed = dead_letters::replay(&settings, limit, reset).await?;
            print!("{}", dead_letters::render_replayed(&replayed));
            println!(
                "replayed {} to {}",
                replayed.len(),
                settings.amqp.command_queue
            );
        }
    }
    Ok(())
}

async fn forget(settings: Settings, key: String) -> anyhow::Result<()> {
    use sms_service::dead_letters::{forget_failed, Reset};
    match forget_failed(&settings, &key).await? {
        Reset::Cleared => {
            println!("forgot {key}: its failed record is cleared; the next command with it is sent afresh");
            Ok(())
        }
        other => anyhow::bail!("{key}: {other}; nothing cleared"),
    }
}

async fn fake_provider(
    bind: String,
    settings: sms_service::fake_provider::FakeSettings,
) -> anyhow::Result<()> {
    settings.validate()?;
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .with_context(|| format!("cannot listen on {bind} (--bind)"))?;
    // Not the settings themselves: --credential values are secrets.
    tracing::info!(
        address = %listener.local_addr()?,
        kind = settings.kind.as_str(),
        latency_ms = settings.latency.as_millis() as u64,
        fail_rate = settings.fail_rate,
        reject_rate = settings.reject_rate,
        throttle_rate = settings.throttle_rate,
        credentials = ?settings.credentials.keys().collect::<Vec<_>>(),
        "fake provider listening"
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        app::shutdown_signal().await;
        on_signal.cancel();
    });
    sms_service::fake_provider::serve(listener, settings, shutdown).await?;
    Ok(())
}

fn parse_kind(name: &str) -> Result<sms_service::config::ProviderKind, String> {
    sms_service::config::ProviderKind::parse(name)
        .ok_or_else(|| "expected generic, twilio, africastalking, vonage or infobip".to_owned())
}

fn parse_baseline(name: &str) -> Result<sms_service::bench::Baseline, String> {
    sms_service::bench::Baseline::parse(name)
        .ok_or_else(|| "expected relay, minimal or both".to_owned())
}

fn parse_credential(pair: &str) -> Result<(String, String), String> {
    pair.split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| "expected NAME=VALUE".to_owned())
}

//! The `sms-service` binary: parses the command line, loads the settings
//! and calls into the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sms_service::app;
use sms_service::config::Settings;
use sms_service::domain::SendSms;
use sms_service::ports::{EventMeta, QueueClient};
use tokio_util::sync::CancellationToken;

/// mimalloc: the hot path allocates small, short-lived buffers (frames,
/// futures, JSON); glibc's allocator showed up at ~15% of the service's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Sends SMS from RabbitMQ commands, once per idempotency key"
)]
struct Cli {
    /// A settings file layered over config/default.toml (env SMS__* still wins).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume commands until SIGTERM or SIGINT (the default).
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
    },
    /// Load-test a running service (and, with --baseline, a bare relay first).
    Bench {
        /// Commands to publish.
        #[arg(long, short = 'n', default_value_t = 20_000)]
        count: usize,
        /// Share of commands (0 to 1) that repeat an earlier key.
        #[arg(long, default_value_t = 0.0)]
        duplicates: f64,
        /// Publish at this steady rate (commands/s) instead of flat out.
        #[arg(long)]
        rate: Option<f64>,
        /// Measure a bare relay on the same broker first, and print the ratio.
        #[arg(long)]
        baseline: bool,
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
    /// Serve a fake of the generic provider's API.
    FakeProvider {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        bind: String,
        /// Latency added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of calls (0 to 1) answered 503.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
    },
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
    /// Move dead letters back to the command queue (confirmed, then removed).
    Replay {
        #[arg(long, default_value_t = 50)]
        limit: usize,
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
    // A filter that hides every log is a bad setting like any other.
    if let Err(e) = sms_service::telemetry::init_logs(&settings.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run(settings).await,
            Command::Send {
                to,
                text,
                key,
                sender,
            } => send(settings, to, text, key, sender).await,
            Command::Bench {
                count,
                duplicates,
                rate,
                baseline,
                window,
                json,
                i_mean_it,
            } => {
                let options = sms_service::bench::BenchOptions {
                    count,
                    duplicates,
                    rate,
                    baseline,
                    window,
                    allow_remote_provider: i_mean_it,
                };
                bench(settings, options, json).await
            }
            Command::DeadLetters { action } => dead_letters(settings, action).await,
            Command::FakeProvider {
                bind,
                latency_ms,
                fail_rate,
            } => fake_provider(bind, latency_ms, fail_rate).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let running = app::start(settings).await?;
    app::shutdown_signal().await;
    tracing::info!("signal received; shutting down");
    running.stop().await;
    Ok(())
}

async fn send(
    settings: Settings,
    to: String,
    text: String,
    key: Option<String>,
    sender: Option<String>,
) -> anyhow::Result<()> {
    let key = key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut body = serde_json::json!({"idempotencyKey": key, "phoneNumber": to, "text": text});
    if let Some(sender) = sender {
        body["senderId"] = sender.into();
    }
    let body = serde_json::to_vec(&body)?;
    if let Err(e) = SendSms::from_json(&body) {
        anyhow::bail!("not a valid command: {}", e.dead_letter_reason());
    }
    let broker =
        sms_service::adapters::rabbitmq::RabbitMq::new(&settings.amqp, &settings.retry_tiers());
    let published = tokio::time::timeout(
        Duration::from_secs(15),
        broker.publish_command(&body, &EventMeta::default()),
    )
    .await;
    broker.close().await;
    match published {
        Ok(Ok(())) => {
            println!("{key}");
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => anyhow::bail!("broker did not confirm within 15 s"),
    }
}

async fn bench(
    settings: Settings,
    options: sms_service::bench::BenchOptions,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(options.count > 0, "--count must be at least 1");
    anyhow::ensure!(
        (0.0..1.0).contains(&options.duplicates),
        "--duplicates must be in [0, 1)"
    );
    let report = sms_service::bench::run(&settings, &options).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", sms_service::bench::render(&report));
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
        DeadLetterAction::Replay { limit } => {
            let moved = dead_letters::replay(&settings, limit).await?;
            print!("{}", dead_letters::render(&moved));
            println!(
                "replayed {} to {}",
                moved.len(),
                settings.amqp.command_queue
            );
        }
    }
    Ok(())
}

async fn fake_provider(bind: String, latency_ms: u64, fail_rate: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&fail_rate),
        "--fail-rate must be between 0 and 1"
    );
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    tracing::info!(address = %listener.local_addr()?, latency_ms, fail_rate, "fake provider listening");
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        app::shutdown_signal().await;
        on_signal.cancel();
    });
    let settings = sms_service::fake_provider::FakeSettings {
        latency: Duration::from_millis(latency_ms),
        fail_rate,
    };
    sms_service::fake_provider::serve(listener, settings, shutdown).await?;
    Ok(())
}

//! Wiring: builds the adapters from [`Settings`], hands them to the core,
//! and runs the processing loop, the HTTP API and the gRPC door until
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::adapters::grpc::{self, GrpcState, WatchLimits};
use crate::adapters::http::{self, ApiAccess, HttpState};
use crate::adapters::{providers, rabbitmq::RabbitMq, redis::RedisStore, redis_durability};
use crate::breaker::CircuitBreaker;
use crate::config::{ProviderKind, Settings};
use crate::front_door::FrontDoor;
use crate::notification::{Notifier, ProviderGuard, Providers};
use crate::ports::{CacheService, SmsService};
use crate::processing::QueueProcessingService;

/// How often the sweeper looks for unconfirmed delivery reports.
const REPORT_SWEEP: Duration = Duration::from_secs(10);
/// How old an unconfirmed delivery report must be before the sweeper
/// publishes it: time enough for its callback's own publish, or the
/// provider's retry, to have confirmed it.
const REPORT_SWEEP_AGE: Duration = Duration::from_secs(30);
/// How long the gRPC door may take to close its connections at shutdown
/// (a health watch never ends by itself); then they are dropped.
pub const GRPC_DRAIN: Duration = Duration::from_secs(5);

/// How often the depths of the command, high, dead-letter and hold queues
/// are read into their gauges.
pub const QUEUE_DEPTHS_EVERY: Duration = Duration::from_secs(5);

/// A started service.
pub struct RunningApp {
    /// Where the HTTP API listens (useful when bound to port 0).
    pub http_addr: SocketAddr,
    /// Where the gRPC door listens; `None` when `grpc.bind` is empty.
    pub grpc_addr: Option<SocketAddr>,
    /// Fire to stop the service gracefully.
    pub shutdown: CancellationToken,
    task: JoinHandle<()>,
    broker: RabbitMq,
}

impl RunningApp {
    /// Stops the service and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Resolves when the broker's queues conflict with the configuration
    /// (a queue of the other type): the service cannot work, and the
    /// message says what the operator must do. `run` stops on it.
    pub async fn conflict(&self) -> String {
        self.broker.conflict().await
    }

    /// Waits until the service stops (after `shutdown` fired).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Builds everything and starts it in the background.
pub async fn start(settings: Settings) -> anyhow::Result<RunningApp> {
    // The recorder first: the core registers its metric handles when built.
    let metrics = crate::telemetry::metrics();
    let broker = RabbitMq::with_high_prefetch(
        &settings.amqp,
        &settings.retry_tiers(),
        settings.high_prefetch(),
    );
    let store = Arc::new(RedisStore::new(&settings.redis).context("redis.url")?);
    let (instances, routes) = settings.instances().map_err(|e| anyhow::anyhow!(e.0))?;
    let mut built = Vec::new();
    for instance in &instances {
        let sms = providers::build(instance).map_err(anyhow::Error::msg)?;
        let breaker = Arc::new(CircuitBreaker::named(
            &instance.name,
            instance.breaker_threshold,
            instance.breaker_cool_down,
        ));
        built.push((
            sms,
            ProviderGuard::new(breaker, instance.max_sends_per_second),
        ));
    }
    let callback_providers: std::collections::HashMap<String, Arc<dyn SmsService>> = built
        .iter()
        .map(|(sms, _)| {
            crate::telemetry::register_report_counters(sms.name());
            (sms.name().to_owned(), sms.clone())
        })
        .collect();
    let routes: Vec<(Vec<String>, Vec<String>)> = routes
        .into_iter()
        .map(|r| (r.prefixes, r.providers))
        .collect();
    let providers = Providers::new(built, &routes).map_err(anyhow::Error::msg)?;
    // Generic delivery reports (POST /v1/delivery-reports) name the ids of
    // a generic instance, each checked with that instance's callback
    // secret; without a generic instance that route answers 404.
    let generic_reporters: Vec<(String, Option<secrecy::SecretString>)> = instances
        .iter()
        .filter(|i| i.kind == ProviderKind::Generic)
        .map(|i| {
            let secret = i
                .settings
                .callback_secret
                .as_ref()
                .filter(|s| !s.expose_secret().is_empty())
                .cloned();
            (i.name.clone(), secret)
        })
        .collect();
    let notifier = Notifier::new(
        store.clone(),
        providers,
        Arc::new(broker.clone()),
        settings.notifier_settings(),
    )
    .with_send_limit(settings.send_limit());
    let breakers = notifier.breakers();
    // The front doors' cancels hold keys as this instance, whose liveness
    // record the notifier's heartbeat keeps.
    let instance = notifier.instance().to_owned();
    let notifier = Arc::new(notifier);
    // The liveness record outlives processing: it is deleted only once
    // nothing of this instance is still working on a key.
    let alive = CancellationToken::new();
    // Delivery reports whose event a callback or a send could not confirm
    // are published here, whether or not their provider calls again.
    let sweeper = tokio::spawn({
        let (notifier, alive) = (notifier.clone(), alive.clone());
        async move {
            let mut tick = tokio::time::interval(REPORT_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = alive.cancelled() => break,
                    _ = tick.tick() => {}
                }
                notifier.republish_reports(REPORT_SWEEP_AGE, 100).await;
            }
        }
    });
    let heartbeat = tokio::spawn({
        let (notifier, alive) = (notifier.clone(), alive.clone());
        async move { notifier.keep_alive(alive).await }
    });
    let processing = QueueProcessingService::new(
        Arc::new(broker.clone()),
        notifier,
        breakers,
        settings.processing_settings(),
    );
    let (listener, http_addr) = http::bind(&settings.http.bind)
        .await
        .with_context(|| format!("http.bind: cannot listen on {}", settings.http.bind))?;
    let redis_address = settings.redis.describe();
    let redis_check = report_redis(
        store.clone(),
        redis_address.clone(),
        Duration::from_millis(settings.redis.timeout_ms),
        Duration::from_millis(settings.amqp.reconnect_delay_ms),
    );
    let grpc_listener = match settings.grpc.bind.as_str() {
        "" => None,
        bind => Some(
            grpc::bind(bind)
                .await
                .with_context(|| format!("grpc.bind: cannot listen on {bind}"))?,
        ),
    };
    let depths = broker.clone();
    let conflicts = broker.clone();
    let door = FrontDoor {
        cache: store.clone(),
        queue: Arc::new(broker.clone()),
        consuming: processing.consuming(),
        redis_address,
        events: Arc::new(broker.clone()),
        instance,
        cancels: Arc::default(),
    };
    let grpc_state = GrpcState {
        door: door.clone(),
        api_access: ApiAccess::new(&settings.http.api_keys, &settings.grpc.bind),
        max_message_bytes: settings.http.max_body_bytes,
        watch_limits: WatchLimits::default(),
    };
    let state = HttpState {
        door,
        cache: store,
        events: Arc::new(broker),
        metrics,
        generic_reporters,
        providers: Arc::new(callback_providers),
        public_url: settings.http.public_url.clone(),
        park_ttl: Duration::from_secs(settings.http.report_park_ttl_secs),
        max_body_bytes: settings.http.max_body_bytes,
        api_access: ApiAccess::new(&settings.http.api_keys, &settings.http.bind),
    };
    if matches!(state.api_access, ApiAccess::Closed) {
        warn!(
            bind = %settings.http.bind,
            "no http.api_keys configured and http.bind is not loopback: \
             POST /v1/messages and GET /v1/messages/{{key}} answer 401 to everyone"
        );
    }
    let shutdown = CancellationToken::new();
    let http_shutdown = CancellationToken::new();
    tokio::spawn(crate::telemetry::metrics_upkeep(
        state.metrics.clone(),
        crate::telemetry::METRICS_UPKEEP_EVERY,
        http_shutdown.clone(),
    ));
    let http_task = tokio::spawn(http::serve(listener, state, http_shutdown.clone()));
    info!(%http_addr, "HTTP API listening");
    let grpc_addr = grpc_listener.as_ref().map(|(_, addr)| *addr);
    let grpc_task = grpc_listener.map(|(listener, grpc_addr)| {
        if matches!(grpc_state.api_access, ApiAccess::Closed) {
            warn!(
                bind = %settings.grpc.bind,
                "no http.api_keys configured and grpc.bind is not loopback: \
                 sms.v1.SmsService answers UNAUTHENTICATED to everyone"
            );
        }
        info!(%grpc_addr, "gRPC door listening");
        let shutdown = http_shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = grpc::serve(listener, grpc_state, shutdown).await {
                warn!(error = %e, "the gRPC door stopped");
            }
        })
    });
    // On the side, so start-up never waits for Redis or the broker.
    tokio::spawn(until(http_shutdown.clone(), redis_check));
    tokio::spawn(watch_queue_depths(
        depths,
        QUEUE_DEPTHS_EVERY,
        http_shutdown.clone(),
    ));
    // Read on the side: start-up never waits for this answer.
    let redis_settings = settings.redis;
    tokio::spawn(async move {
        if let Some(warning) = redis_durability::eviction_warning(&redis_settings).await {
            warn!("{warning}");
        }
    });
    let processing_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        processing.run(processing_shutdown).await;
        alive.cancel();
        let _ = heartbeat.await;
        let _ = sweeper.await;
        // The API stays up while draining so probes see the shutdown.
        http_shutdown.cancel();
        if let Some(mut grpc_task) = grpc_task {
            if tokio::time::timeout(GRPC_DRAIN, &mut grpc_task)
                .await
                .is_err()
            {
                grpc_task.abort();
            }
        }
        let _ = http_task.await;
    });
    Ok(RunningApp {
        http_addr,
        grpc_addr,
        shutdown,
        task,
        broker: conflicts,
    })
}

/// Runs `task` until it ends or `stop` fires.
async fn until(stop: CancellationToken, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = task => {}
    }
}

/// Asks Redis at start whether it answers (a write, as `/readyz` does) and
/// says so either way: otherwise a Redis that is away is first heard of at
/// the first command. While it does not answer, asks again every `every`
/// and says so once it does, never before. `/readyz` answers 503 meanwhile.
async fn report_redis(store: Arc<RedisStore>, address: String, timeout: Duration, every: Duration) {
    // A connect and a command.
    let limit = timeout.saturating_mul(2).max(Duration::from_secs(2));
    let mut warned = false;
    loop {
        match tokio::time::timeout(limit, store.ping()).await {
            Ok(Ok(())) => {
                let now = if warned { " now" } else { "" };
                info!("Redis at {address} answers{now}");
                return;
            }
            Ok(Err(e)) if !warned => {
                warn!(error = %e, "Redis at {address} does not answer; /readyz says 503 until it does");
                warned = true;
            }
            Err(_) if !warned => {
                warn!("Redis at {address} gave no answer within {limit:?}; /readyz says 503 until it does");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(every.max(Duration::from_millis(100))).await;
    }
}

/// Reads the depth of the command, high, dead-letter and hold queues into their
/// gauges every `every` while connected, until `stop` fires. While not
/// connected the gauges keep their last value.
async fn watch_queue_depths(broker: RabbitMq, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(every, broker.queue_depths()).await {
            Ok(Ok(depths)) => {
                metrics::gauge!("sms_command_queue_messages").set(f64::from(depths.commands));
                metrics::gauge!("sms_high_queue_messages").set(f64::from(depths.high_commands));
                metrics::gauge!("sms_dead_letter_queue_messages")
                    .set(f64::from(depths.dead_letters));
                metrics::gauge!("sms_held_messages").set(depths.held as f64);
            }
            Ok(Err(e)) => debug!(error = %e, "queue depths not read"),
            Err(_) => debug!("queue depths not read: no answer in time"),
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

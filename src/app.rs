//! Wiring: builds the adapters from [`Settings`], hands them to the core,
//! and runs the processing loop and the HTTP API until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::adapters::http::{self, ApiAccess, HttpState};
use crate::adapters::{providers, rabbitmq::RabbitMq, redis::RedisStore, redis_durability};
use crate::breaker::CircuitBreaker;
use crate::config::{configured, Settings};
use crate::notification::{Notifier, ProviderGuard};
use crate::processing::QueueProcessingService;

/// A started service.
pub struct RunningApp {
    /// Where the HTTP API listens (useful when bound to port 0).
    pub http_addr: SocketAddr,
    /// Fire to stop the service gracefully.
    pub shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningApp {
    /// Stops the service and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
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
    let broker = RabbitMq::new(&settings.amqp, &settings.retry_tiers());
    let store = Arc::new(RedisStore::new(&settings.redis).context("redis.url")?);
    let sms = providers::build(&settings.provider).map_err(anyhow::Error::msg)?;
    let provider_name = sms.name().to_owned();
    let breaker = Arc::new(CircuitBreaker::new(
        settings.provider.breaker_threshold,
        Duration::from_millis(settings.provider.breaker_cool_down_ms),
    ));
    let guard = ProviderGuard::new(breaker.clone(), settings.provider.max_sends_per_second)
        .with_send_limit(settings.send_limit());
    let notifier = Arc::new(Notifier::new(
        store.clone(),
        sms,
        Arc::new(broker.clone()),
        guard,
        settings.notifier_settings(),
    ));
    // The liveness record outlives processing: it is deleted only once
    // nothing of this instance is still working on a key.
    let alive = CancellationToken::new();
    let heartbeat = tokio::spawn({
        let (notifier, alive) = (notifier.clone(), alive.clone());
        async move { notifier.keep_alive(alive).await }
    });
    let processing = QueueProcessingService::new(
        Arc::new(broker.clone()),
        notifier,
        breaker,
        settings.processing_settings(),
    );
    let (listener, http_addr) = http::bind(&settings.http.bind)
        .await
        .with_context(|| format!("http.bind: cannot listen on {}", settings.http.bind))?;
    let state = HttpState {
        cache: store,
        queue: Arc::new(broker.clone()),
        events: Arc::new(broker),
        consuming: processing.consuming(),
        metrics,
        callback_secret: configured(&settings.provider.callback_secret)
            .map(|s| s.to_owned().into()),
        provider: provider_name,
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
        // The API stays up while draining so probes see the shutdown.
        http_shutdown.cancel();
        let _ = http_task.await;
    });
    Ok(RunningApp {
        http_addr,
        shutdown,
        task,
    })
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

//! The processing loop: pulls deliveries, runs the notification step on
//! each with bounded concurrency, and settles each delivery from the step's
//! [`Outcome`]. It is the only place that acks, requeues, delays or
//! dead-letters.
//!
//! It reads two queues, each a [`Lane`] of its own: the command queue and
//! the high queue. Each lane has its own subscription and its own slots
//! (`max_in_flight`, `high_max_in_flight`), so a backlog in the command
//! queue never keeps a high command waiting for a slot. Each lane takes a
//! new delivery only when one of its slots is free and a provider's
//! circuit breaker admits it. When the step reports the idempotency store
//! unreachable, every lane cancels its subscription, hands back what was
//! prefetched, and polls the store until it answers: it never sends
//! without its idempotency check, and other instances take the work
//! meanwhile.
//!
//! Shutdown is explicit and small: when `shutdown` fires both lanes stop
//! taking deliveries and cancel their subscriptions; the loop waits up to
//! the grace period for in-flight commands of either to finish, then tells
//! the stragglers to hand their delivery back (requeue) and waits for
//! that, and closes the connection (which returns anything prefetched and
//! never started).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing::{debug, error, info, warn};

use crate::breaker::CircuitBreaker;
use crate::ports::{
    DeliveryStream, EventMeta, Inbound, InboundMessage, Lane, NotificationService, Outcome,
    QueueClient, RetryState,
};

/// Limits of the loop.
#[derive(Debug, Clone)]
pub struct ProcessingSettings {
    /// Commands of the command queue processed at once; also bounds memory.
    pub max_in_flight: usize,
    /// Commands of the high queue processed at once, beside those.
    pub high_max_in_flight: usize,
    /// How long in-flight commands may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Wait between attempts to subscribe when the broker or store is away.
    pub resubscribe_delay: Duration,
}

/// Whether the loop is subscribed to each queue and consuming, for
/// `/readyz`.
#[derive(Debug, Default)]
pub struct Consuming([AtomicBool; 2]);

impl Consuming {
    /// Consuming both the command queue and the high queue.
    pub fn get(&self) -> bool {
        self.0.iter().all(|lane| lane.load(Ordering::Relaxed))
    }
    fn set(&self, lane: Lane, value: bool) {
        self.0[lane.index()].store(value, Ordering::Relaxed);
    }
}

/// Tells every lane that the store is away. A lane busy elsewhere finds
/// the signal kept for it at its next wait.
#[derive(Default)]
struct Pause([Notify; 2]);

impl Pause {
    fn signal(&self) {
        for lane in &self.0 {
            lane.notify_one();
        }
    }

    fn of(&self, lane: Lane) -> &Notify {
        &self.0[lane.index()]
    }
}

/// Drives a [`QueueClient`] through a [`NotificationService`].
pub struct QueueProcessingService {
    queue: Arc<dyn QueueClient>,
    notifier: Arc<dyn NotificationService>,
    /// The provider instances' breakers: work is taken while any admits it.
    breakers: Vec<Arc<CircuitBreaker>>,
    settings: ProcessingSettings,
    consuming: Arc<Consuming>,
}

/// How long steps may take to stop after the grace period.
const HAND_BACK_LIMIT: Duration = Duration::from_secs(30);

/// Why the loop stopped reading its subscription.
enum Stop {
    Shutdown,
    /// The broker ended the subscription or the connection failed.
    Ended,
    /// The store is away.
    Pause,
}

/// What a settling task needs besides its delivery.
#[derive(Clone)]
struct Settler {
    notifier: Arc<dyn NotificationService>,
    shutdown: CancellationToken,
    /// Fired when the grace period is over: in-flight work requeues.
    hand_back: CancellationToken,
    /// Signalled when the store is found away.
    pause: Arc<Pause>,
    /// Wait before requeueing a delivery that could not be settled.
    retry_wait: Duration,
    /// Per-delivery metrics, registered once.
    in_flight: metrics::Gauge,
    processing_seconds: metrics::Histogram,
}

impl QueueProcessingService {
    pub fn new(
        queue: Arc<dyn QueueClient>,
        notifier: Arc<dyn NotificationService>,
        breakers: Vec<Arc<CircuitBreaker>>,
        settings: ProcessingSettings,
    ) -> Self {
        Self {
            queue,
            notifier,
            breakers,
            settings,
            consuming: Arc::new(Consuming::default()),
        }
    }

    /// The flag `/readyz` reads.
    pub fn consuming(&self) -> Arc<Consuming> {
        self.consuming.clone()
    }

    /// Consumes until `shutdown` fires, then drains as described above.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let settler = Settler {
            notifier: self.notifier.clone(),
            shutdown: shutdown.clone(),
            hand_back: CancellationToken::new(),
            pause: Arc::new(Pause::default()),
            retry_wait: self.settings.resubscribe_delay,
            in_flight: metrics::gauge!("sms_in_flight"),
            processing_seconds: metrics::histogram!("sms_processing_duration_seconds"),
        };
        let (mut retired, high) = tokio::join!(
            self.consume(Lane::Normal, &tasks, &settler, &shutdown),
            self.consume(Lane::High, &tasks, &settler, &shutdown),
        );
        retired.extend(high);

        info!(
            in_flight = tasks.len(),
            "shutting down: draining in-flight commands"
        );
        tasks.close();
        let deadline = Instant::now() + self.settings.shutdown_grace;
        if tokio::time::timeout_at(deadline.into(), tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = tasks.len(),
                "grace period over: requeueing in-flight commands"
            );
            settler.hand_back.cancel();
            // Each step finishes what it started (bounded by the provider,
            // Redis and confirm timeouts); past this, the broker gets the
            // rest back when the connection closes.
            if tokio::time::timeout(HAND_BACK_LIMIT, tasks.wait())
                .await
                .is_err()
            {
                warn!(
                    remaining = tasks.len(),
                    "steps still running; closing anyway"
                );
            }
            // A provider's answer not yet in the store is not given up:
            // its command would be sent again. Exit only once it is
            // written (the orchestrator's kill is the bound).
            while self.notifier.holding() {
                error!(
                    "shutting down, but an outcome waits for the idempotency store: \
                     staying until it is written"
                );
                let _ = tokio::time::timeout(HELD_REMINDER, tasks.wait()).await;
            }
        }
        for mut stream in retired {
            stream.close().await;
        }
        self.queue.close().await;
        info!("processing stopped");
    }

    /// Consumes `lane`'s queue, with its own slots, until `shutdown`
    /// fires. Returns its subscriptions, to be closed once what they
    /// delivered is settled (their in-flight deliveries are settled on
    /// their channels).
    async fn consume(
        &self,
        lane: Lane,
        tasks: &TaskTracker,
        settler: &Settler,
        shutdown: &CancellationToken,
    ) -> Vec<Box<dyn DeliveryStream>> {
        let slots = match lane {
            Lane::Normal => self.settings.max_in_flight,
            Lane::High => self.settings.high_max_in_flight,
        };
        let permits = Arc::new(Semaphore::new(slots));
        let pause = settler.pause.of(lane);
        let mut retired: Vec<Box<dyn DeliveryStream>> = Vec::new();
        while !shutdown.is_cancelled() {
            if tasks.is_empty() {
                // Nothing left to settle on old subscriptions' channels.
                for mut stream in retired.drain(..) {
                    stream.close().await;
                }
            }
            let Some(mut current) = self.subscribe(lane, shutdown).await else {
                break;
            };
            self.consuming.set(lane, true);
            let stop = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break Stop::Shutdown,
                    _ = admit_any(&self.breakers) => {}
                }
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break Stop::Shutdown,
                    _ = pause.notified() => break Stop::Pause,
                    p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break Stop::Shutdown,
                    _ = pause.notified() => break Stop::Pause,
                    n = current.next() => n,
                };
                match next {
                    Some(Ok(mut message)) if self.notifier.holding() => {
                        // An outcome waits for the store: write it before
                        // anything else (a duplicate of its key would find
                        // the key reopened). The other lane stops too.
                        if let Err(e) = message.handle.requeue().await {
                            warn!(error = %e, "could not requeue; the broker will");
                        }
                        settler.pause.signal();
                        break Stop::Pause;
                    }
                    Some(Ok(message)) => {
                        let settler = settler.clone();
                        tasks.spawn(async move {
                            settle(message, lane, &settler).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        warn!(lane = lane.as_str(), error = %e, "consumer failed; subscribing again");
                        break Stop::Ended;
                    }
                    None => {
                        warn!(
                            lane = lane.as_str(),
                            "broker ended the subscription; subscribing again"
                        );
                        break Stop::Ended;
                    }
                }
            };
            self.consuming.set(lane, false);
            match stop {
                Stop::Shutdown => {
                    current.cancel().await;
                    retired.push(current);
                }
                Stop::Ended => {
                    // Kept, not dropped: dropping it would close its channel
                    // under the acks its in-flight commands still owe.
                    retired.push(current);
                    self.wait(shutdown, self.settings.resubscribe_delay).await;
                }
                Stop::Pause => {
                    warn!(
                        lane = lane.as_str(),
                        "idempotency store unavailable: pausing consumption"
                    );
                    current.cancel().await;
                    hand_back_prefetched(current.as_mut()).await;
                    retired.push(current);
                    // Always wait at least once, so a store that answers
                    // probes but fails work cannot make this loop spin.
                    loop {
                        self.wait(shutdown, self.settings.resubscribe_delay).await;
                        if shutdown.is_cancelled() {
                            break;
                        }
                        if self.notifier.ready().await {
                            info!(
                                lane = lane.as_str(),
                                "idempotency store answers again: resuming"
                            );
                            break;
                        }
                    }
                    // Drop a pause signal that in-flight commands sent meanwhile.
                    let _ = pause.notified().now_or_never();
                }
            }
        }
        retired
    }

    async fn wait(&self, shutdown: &CancellationToken, delay: Duration) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    async fn subscribe(
        &self,
        lane: Lane,
        shutdown: &CancellationToken,
    ) -> Option<Box<dyn DeliveryStream>> {
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                s = self.queue.consume(lane) => s,
            };
            match attempt {
                Ok(stream) => {
                    info!(lane = lane.as_str(), "consuming commands");
                    return Some(stream);
                }
                // The command queue's lane says the broker is away, once
                // per retry; the high queue's adds only what is its own.
                Err(e) if lane == Lane::High && !self.queue.is_connected() => {
                    debug!(lane = lane.as_str(), error = %e, "cannot subscribe yet");
                }
                Err(e) => warn!(lane = lane.as_str(), error = %e, "cannot subscribe yet"),
            }
            self.wait(shutdown, self.settings.resubscribe_delay).await;
        }
    }
}

/// Waits until one of the breakers admits work (at once when one is
/// closed); with none, at once.
async fn admit_any(breakers: &[Arc<CircuitBreaker>]) {
    if breakers.is_empty() {
        return;
    }
    let admits = breakers.iter().map(|b| Box::pin(b.admit()));
    futures_util::future::select_all(admits).await;
}

/// How often shutdown says it still waits for a held outcome.
const HELD_REMINDER: Duration = Duration::from_secs(10);

/// Requeues what a cancelled subscription had already delivered to us.
async fn hand_back_prefetched(stream: &mut dyn DeliveryStream) {
    let idle = Duration::from_millis(200);
    while let Ok(Some(Ok(mut message))) = tokio::time::timeout(idle, stream.next()).await {
        if let Err(e) = message.handle.requeue().await {
            warn!(error = %e, "could not requeue a prefetched delivery; the broker will");
        }
    }
}

/// The span one command is handled and settled in: a child of the
/// producer's span when the command carries a `traceparent`, else the
/// root of a trace of its own. The step records the key and the masked
/// number on it, the loop the outcome.
pub fn consume_span(meta: &EventMeta, redelivered: bool, retry: &RetryState) -> tracing::Span {
    let span = tracing::info_span!(
        "consume",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        key = tracing::field::Empty,
        to = tracing::field::Empty,
        correlation_id = meta.correlation_id,
        traceparent = meta.traceparent,
        redelivered,
        delays = i64::from(retry.delays),
        outcome = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(
        &span,
        meta.traceparent.as_deref(),
        meta.tracestate.as_deref(),
    );
    span
}

/// Runs one command to its outcome and settles its delivery, in its
/// [`consume_span`].
async fn settle(message: InboundMessage, lane: Lane, s: &Settler) {
    let span = consume_span(&message.meta, message.redelivered, &message.retry);
    settle_in_span(message, lane, s).instrument(span).await;
}

async fn settle_in_span(mut message: InboundMessage, lane: Lane, s: &Settler) {
    let started = Instant::now();
    s.in_flight.increment(1.0);
    let inbound = Inbound {
        body: &message.body,
        redelivered: message.redelivered,
        meta: &message.meta,
        retry: &message.retry,
        lane,
        stop: &s.hand_back,
    };
    // Not cancelled from outside: the step stops only where it is safe
    // (never between a provider call and recording its answer).
    let outcome = s.notifier.handle(inbound).await;
    tracing::Span::current().record("outcome", outcome.name());
    let handle = &mut message.handle;
    let settled = match &outcome {
        Outcome::Sent | Outcome::Duplicate => handle.ack().await,
        Outcome::Failed(reason) | Outcome::DeadLetter(reason) => {
            let span = tracing::info_span!("dead_letter", otel.kind = "producer");
            let result = handle
                .dead_letter(&message.body, reason)
                .instrument(span)
                .await;
            if result.is_ok() {
                metrics::counter!("sms_dead_lettered_total").increment(1);
            }
            result
        }
        Outcome::Delay { delay, retry } => {
            let span = tracing::info_span!(
                "delay",
                otel.kind = "producer",
                delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            );
            let result = handle
                .delay(&message.body, *delay, retry)
                .instrument(span)
                .await;
            if result.is_ok() {
                metrics::counter!("sms_retries_scheduled_total").increment(1);
            }
            result
        }
        Outcome::Hold { until } => {
            let ahead = until
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            let span = tracing::info_span!(
                "hold",
                otel.kind = "producer",
                ahead_ms = i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
            );
            let result = handle.hold(&message.body, *until).instrument(span).await;
            if result.is_ok() {
                metrics::counter!("sms_holds_total").increment(1);
            }
            result
        }
        Outcome::StoreUnavailable => {
            s.pause.signal();
            handle.requeue().await
        }
        Outcome::HandBack => {
            metrics::counter!("sms_requeued_total").increment(1);
            handle.requeue().await
        }
        Outcome::RetryAfter(delay) => {
            // Wait before requeueing, or the broker hands it straight back;
            // but never hold a delivery past shutdown.
            tokio::select! {
                _ = tokio::time::sleep(*delay) => {}
                _ = s.shutdown.cancelled() => {}
            }
            metrics::counter!("sms_requeued_total").increment(1);
            handle.requeue().await
        }
    };
    if let Err(e) = settled {
        // Unsettled deliveries return to the queue when the channel closes;
        // the store makes the next attempt resume where this one stopped.
        error!(error = %e, ?outcome, "could not settle delivery; the broker will redeliver it");
        if !matches!(
            outcome,
            Outcome::RetryAfter(_) | Outcome::StoreUnavailable | Outcome::HandBack
        ) {
            // Not straight back: whatever failed (a tier or the dead-letter
            // queue) would fail again at once, in a hot loop.
            tokio::select! {
                _ = tokio::time::sleep(s.retry_wait) => {}
                _ = s.shutdown.cancelled() => {}
            }
            let _ = handle.requeue().await;
        }
    }
    s.in_flight.decrement(1.0);
    s.processing_seconds.record(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::{Notifier, NotifierSettings, ProviderGuard, Providers, RetryPolicy};
    use crate::ports::{Accepted, ProviderError};
    use crate::testing::{MemoryCache, MemoryEvents, MemoryQueue, ScriptedProvider, Settled};

    fn service(
        provider: Arc<ScriptedProvider>,
        max_in_flight: usize,
        grace: Duration,
    ) -> (Arc<MemoryQueue>, QueueProcessingService) {
        service_with(provider, max_in_flight, grace, ProviderGuard::unlimited())
    }

    fn service_with(
        provider: Arc<ScriptedProvider>,
        max_in_flight: usize,
        grace: Duration,
        guard: ProviderGuard,
    ) -> (Arc<MemoryQueue>, QueueProcessingService) {
        let cache = MemoryCache::new(Duration::from_secs(60));
        service_over(cache, provider, max_in_flight, grace, guard)
    }

    fn service_over(
        cache: Arc<MemoryCache>,
        provider: Arc<ScriptedProvider>,
        max_in_flight: usize,
        grace: Duration,
        guard: ProviderGuard,
    ) -> (Arc<MemoryQueue>, QueueProcessingService) {
        service_of(notifier(cache, provider, guard), max_in_flight, grace)
    }

    fn notifier(
        cache: Arc<MemoryCache>,
        provider: Arc<ScriptedProvider>,
        guard: ProviderGuard,
    ) -> Notifier {
        let policy = RetryPolicy {
            max_attempts: 3,
            max_age: Duration::from_secs(3600),
            in_process_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            tiers: vec![Duration::from_secs(1)],
            requeue_delay: Duration::from_millis(50),
        };
        Notifier::new(
            cache,
            Providers::single(provider, guard),
            Arc::new(MemoryEvents::default()),
            NotifierSettings {
                retry: policy,
                max_body_bytes: 4096,
                max_takeovers: 3,
                lease: Duration::from_secs(60),
                liveness_ttl: Duration::from_secs(5),
                smart_encoding: true,
                limits: Default::default(),
                quiet_hours: None,
            },
        )
    }

    /// The loop over `notifier`, with two slots for the high queue.
    fn service_of(
        notifier: Notifier,
        max_in_flight: usize,
        grace: Duration,
    ) -> (Arc<MemoryQueue>, QueueProcessingService) {
        let queue = MemoryQueue::new();
        let breaker = Arc::new(CircuitBreaker::new(0, Duration::from_secs(1)));
        let settings = ProcessingSettings {
            max_in_flight,
            high_max_in_flight: 2,
            shutdown_grace: grace,
            resubscribe_delay: Duration::from_millis(10),
        };
        (
            queue.clone(),
            QueueProcessingService::new(queue, Arc::new(notifier), vec![breaker], settings),
        )
    }

    fn body(key: &str) -> Vec<u8> {
        format!(r#"{{"idempotencyKey":"{key}","phoneNumber":"+254712345678","text":"hi"}}"#)
            .into_bytes()
    }

    async fn settle_all(queue: &MemoryQueue, n: usize) {
        while queue.settled().len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_outcome_settles_its_delivery_once() {
        let rejected = Err(ProviderError::rejected("no"));
        let (queue, svc) = service(
            ScriptedProvider::new(vec![
                Ok(Accepted {
                    provider_message_id: "a".into(),
                    segments: None,
                    other_part_ids: Vec::new(),
                }),
                rejected,
            ]),
            8,
            Duration::from_secs(1),
        );
        let shutdown = CancellationToken::new();
        let consuming = svc.consuming();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        queue.push(&body("ok"));
        settle_all(&queue, 1).await;
        queue.push(&body("ok"));
        queue.push(&body("rejected"));
        queue.push(b"garbage");
        settle_all(&queue, 4).await;
        assert!(consuming.get());
        let settled = queue.settled();
        assert_eq!(settled[0], Settled::Acked);
        assert_eq!(
            settled.iter().filter(|s| **s == Settled::Acked).count(),
            2,
            "sent, then duplicate"
        );
        assert!(settled
            .iter()
            .any(|s| matches!(s, Settled::DeadLettered(r) if r.starts_with("provider_rejected"))));
        assert!(settled
            .iter()
            .any(|s| matches!(s, Settled::DeadLettered(r) if r.starts_with("malformed"))));
        shutdown.cancel();
        run.await.unwrap();
        assert!(queue.closed.load(Ordering::SeqCst));
        assert!(!consuming.get());
    }

    /// Holds every command until `until` the first time it sees it, and
    /// says when it saw each.
    struct HoldOnce {
        until: std::time::SystemTime,
        seen: std::sync::Mutex<Vec<(Vec<u8>, tokio::time::Instant)>>,
    }

    #[async_trait::async_trait]
    impl NotificationService for HoldOnce {
        async fn handle(&self, message: Inbound<'_>) -> Outcome {
            let mut seen = self.seen.lock().unwrap();
            let again = seen.iter().any(|(body, _)| body == message.body);
            seen.push((message.body.to_vec(), tokio::time::Instant::now()));
            if again {
                Outcome::Sent
            } else {
                Outcome::Hold { until: self.until }
            }
        }
        async fn ready(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_command_is_parked_and_comes_back_to_its_queue_when_due() {
        let queue = MemoryQueue::new();
        let until = std::time::SystemTime::now() + Duration::from_secs(30);
        let notifier = Arc::new(HoldOnce {
            until,
            seen: Default::default(),
        });
        let settings = ProcessingSettings {
            max_in_flight: 8,
            high_max_in_flight: 2,
            shutdown_grace: Duration::from_secs(1),
            resubscribe_delay: Duration::from_millis(10),
        };
        let svc = QueueProcessingService::new(queue.clone(), notifier.clone(), vec![], settings);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        let started = tokio::time::Instant::now();
        queue.push(&body("later"));
        settle_all(&queue, 2).await;
        assert_eq!(queue.settled(), [Settled::Held(until), Settled::Acked]);
        let seen = notifier.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "examined when taken, and again when back");
        let back_after = seen[1].1 - started;
        assert!(
            back_after >= Duration::from_secs(29) && back_after < Duration::from_secs(31),
            "{back_after:?}"
        );
        shutdown.cancel();
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded_by_max_in_flight() {
        let provider = ScriptedProvider::slow(Duration::from_secs(1));
        let (queue, svc) = service(provider.clone(), 4, Duration::from_secs(5));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        for i in 0..10 {
            queue.push(&body(&format!("k{i}")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(provider.calls(), 4, "four in flight, the rest wait");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(provider.calls(), 8);
        settle_all(&queue, 10).await;
        shutdown.cancel();
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_finishes_in_flight_work_within_the_grace_period() {
        let provider = ScriptedProvider::slow(Duration::from_secs(2));
        let (queue, svc) = service(provider, 8, Duration::from_secs(5));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        queue.push(&body("k1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        run.await.unwrap();
        assert_eq!(queue.settled(), [Settled::Acked]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_an_outcome_held_for_the_store_however_long() {
        let cache = MemoryCache::new(Duration::from_secs(60));
        cache
            .fail_records
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (queue, svc) = service_over(
            cache.clone(),
            ScriptedProvider::new(vec![]),
            8,
            Duration::from_secs(1),
            ProviderGuard::unlimited(),
        );
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        queue.push(&body("k1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        // Past the grace and the hand-back limit: still there, still holding.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(
            !run.is_finished(),
            "exited with a provider's answer unrecorded"
        );
        assert!(queue.settled().is_empty());
        cache
            .fail_records
            .store(false, std::sync::atomic::Ordering::SeqCst);
        run.await.unwrap();
        assert_eq!(queue.settled(), [Settled::Acked]);
        assert_eq!(cache.status_of("k1"), Some(("sent".into(), true, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_hands_back_waiting_commands_but_lets_a_started_send_finish() {
        // One send per second: the first command calls the provider (which
        // takes 3 s, past the 1 s grace); the others wait for their turn.
        let provider = ScriptedProvider::slow(Duration::from_secs(3));
        let guard = ProviderGuard::new(Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))), 1);
        let (queue, svc) = service_with(provider.clone(), 8, Duration::from_secs(1), guard);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        queue.push(&body("k1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        queue.push(&body("k2"));
        queue.push(&body("k3"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        run.await.unwrap();
        let mut settled = queue.settled();
        settled.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(
            settled,
            [Settled::Acked, Settled::Requeued, Settled::Requeued]
        );
        assert_eq!(provider.calls(), 1, "a started send is never cut off");
    }

    fn high(key: &str) -> Vec<u8> {
        format!(
            r#"{{"idempotencyKey":"{key}","phoneNumber":"+254712345678","text":"hi","priority":"high"}}"#
        )
        .into_bytes()
    }

    /// Whether `body` was settled (acked, requeued, ...) yet.
    fn was_settled(queue: &MemoryQueue, body: &[u8]) -> bool {
        queue.settled_bodies().iter().any(|b| b == body)
    }

    /// Pushes `bulk` commands, then a high one, to `svc` over a provider
    /// that answers in 10 s: the high one is called at once, beside the
    /// first of the command queue's, and is done with it.
    async fn a_high_command_goes_past(
        queue: Arc<MemoryQueue>,
        svc: QueueProcessingService,
        provider: Arc<ScriptedProvider>,
        bulk: usize,
    ) {
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        for i in 0..bulk {
            queue.push(&body(&format!("bulk-{i}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        queue.push_to(Lane::High, &high("otp-1"), false);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            provider.calls(),
            2,
            "one of the command queue's, and the high one"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(was_settled(&queue, &high("otp-1")));
        assert_eq!(queue.settled(), [Settled::Acked, Settled::Acked]);
        shutdown.cancel();
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_high_command_is_taken_while_every_slot_of_the_command_queue_is_busy() {
        let provider = ScriptedProvider::slow(Duration::from_secs(10));
        let (queue, svc) = service(provider.clone(), 1, Duration::from_secs(30));
        a_high_command_goes_past(queue, svc, provider, 3).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_high_command_does_not_wait_for_a_send_slot_of_the_command_queue() {
        // Eight slots, one send at a time: the others wait for the send
        // slot, and the high command must not wait behind them.
        let provider = ScriptedProvider::slow(Duration::from_secs(10));
        let cache = MemoryCache::new(Duration::from_secs(60));
        let notifier = notifier(cache, provider.clone(), ProviderGuard::unlimited())
            .with_send_limit(crate::concurrency::AdaptiveLimit::new(1, 1, false));
        let (queue, svc) = service_of(notifier, 8, Duration::from_secs(60));
        a_high_command_goes_past(queue, svc, provider, 4).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_outage_found_in_one_queue_pauses_the_other_too() {
        let cache = MemoryCache::new(Duration::from_secs(60));
        let (queue, svc) = service_over(
            cache.clone(),
            ScriptedProvider::new(Vec::new()),
            8,
            Duration::from_secs(1),
            ProviderGuard::unlimited(),
        );
        let consuming = svc.consuming();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(svc.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(consuming.get(), "both queues consumed");
        cache.down.store(true, Ordering::SeqCst);
        queue.push(&body("k1"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(queue.settled(), [Settled::Requeued]);
        assert!(!consuming.get());
        // The high queue's subscription is paused as well: what arrives
        // there now is not taken (to be requeued again and again) while
        // the store is away.
        queue.push_to(Lane::High, &high("otp-1"), false);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !was_settled(&queue, &high("otp-1")),
            "{:?}",
            queue.settled()
        );
        shutdown.cancel();
        run.await.unwrap();
    }
}

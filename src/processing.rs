//! The processing loop: pulls deliveries, runs the notification step on
//! each with bounded concurrency, and settles each delivery from the step's
//! [`Outcome`]. It is the only place that acks, requeues or dead-letters.
//!
//! Shutdown is explicit and small: when `shutdown` fires the loop stops
//! taking deliveries and cancels its subscription, waits up to the grace
//! period for in-flight commands to finish, then tells the stragglers to
//! hand their delivery back (requeue) and waits for that, and closes the
//! connection (which returns anything prefetched and never started).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::ports::{
    DeliveryStream, Inbound, InboundMessage, NotificationService, Outcome, QueueClient,
};

/// Limits of the loop.
#[derive(Debug, Clone)]
pub struct ProcessingSettings {
    /// Commands processed at once; also bounds memory.
    pub max_in_flight: usize,
    /// How long in-flight commands may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Wait between attempts to subscribe when the broker is away.
    pub resubscribe_delay: Duration,
}

/// Whether the loop is subscribed and consuming, for `/readyz`.
#[derive(Debug, Default)]
pub struct Consuming(AtomicBool);

impl Consuming {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, value: bool) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// Drives a [`QueueClient`] through a [`NotificationService`].
pub struct QueueProcessingService {
    queue: Arc<dyn QueueClient>,
    notifier: Arc<dyn NotificationService>,
    settings: ProcessingSettings,
    consuming: Arc<Consuming>,
}

impl QueueProcessingService {
    pub fn new(
        queue: Arc<dyn QueueClient>,
        notifier: Arc<dyn NotificationService>,
        settings: ProcessingSettings,
    ) -> Self {
        Self {
            queue,
            notifier,
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
        let permits = Arc::new(Semaphore::new(self.settings.max_in_flight));
        let tasks = TaskTracker::new();
        // Fired when the grace period is over: in-flight work requeues.
        let hand_back = CancellationToken::new();
        let mut stream: Option<Box<dyn DeliveryStream>> = None;

        while !shutdown.is_cancelled() {
            let mut current = match stream.take() {
                Some(s) => s,
                None => match self.subscribe(&shutdown).await {
                    Some(s) => s,
                    None => break,
                },
            };
            self.consuming.set(true);
            let ended = loop {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break false,
                    p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break false,
                    n = current.next() => n,
                };
                match next {
                    Some(Ok(message)) => {
                        let notifier = self.notifier.clone();
                        let (shutdown, hand_back) = (shutdown.clone(), hand_back.clone());
                        tasks.spawn(async move {
                            settle(message, notifier.as_ref(), &shutdown, &hand_back).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "consumer failed; subscribing again");
                        break true;
                    }
                    None => {
                        warn!("broker ended the subscription; subscribing again");
                        break true;
                    }
                }
            };
            self.consuming.set(false);
            if ended {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.settings.resubscribe_delay) => {}
                }
            } else {
                current.cancel().await;
                stream = Some(current);
            }
        }

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
            hand_back.cancel();
            tasks.wait().await;
        }
        drop(stream);
        self.queue.close().await;
        info!("processing stopped");
    }

    async fn subscribe(&self, shutdown: &CancellationToken) -> Option<Box<dyn DeliveryStream>> {
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                s = self.queue.consume() => s,
            };
            match attempt {
                Ok(stream) => {
                    info!("consuming commands");
                    return Some(stream);
                }
                Err(e) => warn!(error = %e, "cannot subscribe yet"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.settings.resubscribe_delay) => {}
            }
        }
    }
}

/// Runs one command to its outcome and settles its delivery.
async fn settle(
    mut message: InboundMessage,
    notifier: &dyn NotificationService,
    shutdown: &CancellationToken,
    hand_back: &CancellationToken,
) {
    let started = Instant::now();
    metrics::gauge!("sms_in_flight").increment(1.0);
    let inbound = Inbound {
        body: &message.body,
        redelivered: message.redelivered,
        meta: &message.meta,
    };
    let outcome = tokio::select! {
        outcome = notifier.handle(inbound) => outcome,
        _ = hand_back.cancelled() => Outcome::RetryAfter(Duration::ZERO),
    };
    let handle = &mut message.handle;
    let settled = match &outcome {
        Outcome::Sent | Outcome::Duplicate => handle.ack().await,
        Outcome::Failed(reason) | Outcome::DeadLetter(reason) => {
            let result = handle.dead_letter(&message.body, reason).await;
            if result.is_ok() {
                metrics::counter!("sms_dead_lettered_total").increment(1);
            }
            result
        }
        Outcome::RetryAfter(delay) => {
            // Wait before requeueing, or the broker hands it straight back;
            // but never hold a delivery past shutdown.
            tokio::select! {
                _ = tokio::time::sleep(*delay) => {}
                _ = shutdown.cancelled() => {}
            }
            metrics::counter!("sms_requeued_total").increment(1);
            handle.requeue().await
        }
    };
    if let Err(e) = settled {
        // Unsettled deliveries return to the queue when the channel closes;
        // the store makes the next attempt resume where this one stopped.
        error!(error = %e, ?outcome, "could not settle delivery; the broker will redeliver it");
        if !matches!(outcome, Outcome::RetryAfter(_)) {
            let _ = handle.requeue().await;
        }
    }
    metrics::gauge!("sms_in_flight").decrement(1.0);
    metrics::histogram!("sms_processing_duration_seconds").record(started.elapsed().as_secs_f64());
}

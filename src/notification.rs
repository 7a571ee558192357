//! The core decision for one command, and the order of side effects that
//! makes it correct.
//!
//! For a valid command, [`Notifier::handle`] does, in this order:
//!
//! 1. **claim** the key in the idempotency store: an atomic compare-and-set
//!    that either grants a lease, or says the key is done, or that someone
//!    else holds it. No provider call happens without a granted lease.
//! 2. **send** through the provider, passing the key as `Idempotency-Key`,
//!    retrying transient failures a few times in process (exponential
//!    backoff with full jitter, `Retry-After` honoured). Longer waits go to
//!    the broker: the lease is released (state `retrying`, attempts kept)
//!    and the command is handed to a delay tier ([`Outcome::Delay`]).
//! 3. **record** the outcome (`sent` with the provider's id, or `failed`).
//! 4. **publish** SmsSent or SmsFailed and wait for the broker's confirm.
//! 5. **mark published**, releasing the lease.
//!
//! Only then does the processing loop acknowledge the command. A crash at any
//! point leaves the command in the queue; its redelivery finds the key's
//! state and resumes from it: before 3 it waits for the lease to run out and
//! sends (the one duplicate window: the provider accepted but 3 did not
//! happen); between 3 and 5 it publishes the recorded event without calling
//! the provider; after 5 it is a duplicate and is acknowledged.
//!
//! A duplicate command (neither a redelivery nor back from a delay tier)
//! that finds the key leased is acknowledged at once: the holder's delivery
//! is still in the broker's hands and will reach an outcome. A redelivered
//! or returning command that finds the key leased may be the holder's own
//! delivery after a crash, so it is delayed until the lease has run out.
//!
//! A command redelivered by the broker more than `max_redeliveries` times
//! (it kept killing its consumer, or never reached an outcome) is a poison
//! message and is dead-lettered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use backon::BackoffBuilder;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::breaker::{BreakerState, CircuitBreaker};
use crate::concurrency::AdaptiveLimit;
use crate::domain::{
    count_segments, rfc3339, CommandError, FailureReason, IdempotencyKey, SendSms, SmsFailed,
    SmsSent,
};
use crate::ports::QueueError;
use crate::ports::{
    CacheService, Claim, EventBus, EventMeta, FailedRecord, Inbound, NotificationService, Outcome,
    ProviderError, RetryState, SentRecord, SmsService,
};

/// How provider failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Provider calls per key in all, across deliveries and delay tiers.
    pub max_attempts: u32,
    /// A key still failing this long after its first attempt has failed.
    pub max_age: Duration,
    /// Provider calls per delivery before handing over to a delay tier.
    pub in_process_attempts: u32,
    /// First in-process backoff step; doubles each attempt.
    pub base_delay: Duration,
    /// Longest in-process backoff step and longest in-process wait.
    pub max_delay: Duration,
    /// The broker's delay tiers; the n-th hand-over waits about `tiers[n]`.
    pub tiers: Vec<Duration>,
    /// How long to wait before requeueing when the broker failed.
    pub requeue_delay: Duration,
}

impl RetryPolicy {
    /// The in-process wait before attempt `made + 1`: full jitter over a
    /// capped exponential step, but never less than what the provider asked.
    pub fn delay(&self, made: u32, retry_after: Option<Duration>) -> Duration {
        let step = backon::ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(made as usize)
            .build()
            .last()
            .unwrap_or(self.base_delay);
        let jittered = step.mul_f64(rand::random::<f64>());
        jittered.max(retry_after.unwrap_or_default())
    }

    /// The broker wait after `delays` earlier hand-overs: the tier's delay
    /// with jitter (half to all of it), never less than `Retry-After`.
    pub fn broker_delay(&self, delays: u32, retry_after: Option<Duration>) -> Duration {
        let tier = self
            .tiers
            .get(delays as usize)
            .or(self.tiers.last())
            .copied()
            .unwrap_or(self.max_delay);
        let jittered = tier.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        jittered.max(retry_after.unwrap_or_default())
    }
}

/// Limits on the provider: the breaker and the send rate.
pub struct ProviderGuard {
    pub breaker: Arc<CircuitBreaker>,
    /// Sends per second for this instance; `None` for no limit.
    pub limiter: Option<DefaultDirectRateLimiter>,
    /// Commands in their send phase at once; `None` for no limit.
    pub sends: Option<AdaptiveLimit>,
}

impl ProviderGuard {
    pub fn new(breaker: Arc<CircuitBreaker>, max_per_second: u32) -> Self {
        let limiter = std::num::NonZeroU32::new(max_per_second)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        Self {
            breaker,
            limiter,
            sends: None,
        }
    }

    /// Limits the commands in their send phase at once.
    pub fn with_send_limit(mut self, sends: AdaptiveLimit) -> Self {
        self.sends = Some(sends);
        self
    }

    pub fn unlimited() -> Self {
        Self::new(Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))), 0)
    }
}

/// Handles of the metrics recorded for every command, registered once
/// (the macros look their key up on each call). Make the notifier after
/// installing the recorder, or these record nowhere.
struct Meters {
    received: metrics::Counter,
    sent: metrics::Counter,
    duplicates: metrics::Counter,
    accepted: metrics::Counter,
    rejected: metrics::Counter,
    transient: metrics::Counter,
    provider_seconds: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        let requests = |outcome: &'static str| metrics::counter!("sms_provider_requests_total", "outcome" => outcome);
        Self {
            received: metrics::counter!("sms_commands_received_total"),
            sent: metrics::counter!("sms_sent_total"),
            duplicates: metrics::counter!("sms_duplicates_total"),
            accepted: requests("accepted"),
            rejected: requests("rejected"),
            transient: requests("transient"),
            provider_seconds: metrics::histogram!("sms_provider_request_duration_seconds"),
        }
    }
}

/// The notification step over its ports.
pub struct Notifier {
    cache: Arc<dyn CacheService>,
    sms: Arc<dyn SmsService>,
    events: Arc<dyn EventBus>,
    retry: RetryPolicy,
    guard: ProviderGuard,
    /// Larger bodies are dead-lettered unread.
    max_body_bytes: usize,
    /// Broker redeliveries of one body before it is called poison.
    max_redeliveries: u32,
    /// Makes each claim's lease owner unique across instances and attempts.
    instance: String,
    claims: AtomicU64,
    meters: Meters,
}

/// Store writes that follow a provider call are retried this often before
/// going on without them.
const RECORD_TRIES: u32 = 3;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// What one delivery of a command carries through the send loop.
struct Attempt<'a> {
    cmd: &'a SendSms,
    owner: &'a str,
    meta: &'a EventMeta,
    retry: RetryState,
}

impl Notifier {
    pub fn new(
        cache: Arc<dyn CacheService>,
        sms: Arc<dyn SmsService>,
        events: Arc<dyn EventBus>,
        retry: RetryPolicy,
        guard: ProviderGuard,
        max_body_bytes: usize,
        max_redeliveries: u32,
    ) -> Self {
        Self {
            cache,
            sms,
            events,
            retry,
            guard,
            max_body_bytes,
            max_redeliveries,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            claims: AtomicU64::new(0),
            meters: Meters::new(),
        }
    }

    fn next_owner(&self) -> String {
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    /// Counts broker redeliveries of this body; `Some` reason once it is poison.
    async fn poisoned(&self, body: &[u8]) -> Result<Option<String>, Outcome> {
        let fingerprint = hex::encode(Sha256::digest(body));
        match self.cache.count_redelivery(&fingerprint).await {
            Ok(n) if n > self.max_redeliveries => Ok(Some(format!(
                "poison: redelivered {n} times without reaching an outcome"
            ))),
            Ok(_) => Ok(None),
            Err(e) => {
                warn!(error = %e, "store unavailable; pausing");
                Err(Outcome::StoreUnavailable)
            }
        }
    }

    async fn process(&self, cmd: SendSms, message: &Inbound<'_>) -> Outcome {
        // A send slot and then the rate limit are waited for before the
        // claim, so that a long wait never eats into the lease. In that
        // order, so that no command sits on a rate-limit token while it
        // waits for a slot (the tokens would pile up into a burst).
        let slot = match &self.guard.sends {
            Some(sends) => tokio::select! {
                slot = sends.acquire() => Some(slot),
                _ = message.stop.cancelled() => return Outcome::RetryAfter(Duration::ZERO),
            },
            None => None,
        };
        tokio::select! {
            _ = self.rate_limit() => {}
            _ = message.stop.cancelled() => return Outcome::RetryAfter(Duration::ZERO),
        }
        let began = Instant::now();
        if message.stop.is_cancelled() {
            return Outcome::RetryAfter(Duration::ZERO);
        }
        let key = &cmd.idempotency_key;
        let owner = self.next_owner();
        let claim = match self.cache.claim(key, &owner).await {
            Ok(claim) => claim,
            Err(e) => {
                warn!(error = %e, "cannot claim key; pausing");
                return Outcome::StoreUnavailable;
            }
        };
        let returning = message.redelivered || message.retry.delays > 0;
        let attempt = Attempt {
            cmd: &cmd,
            owner: &owner,
            meta: message.meta,
            retry: message.retry.clone(),
        };
        match claim {
            Claim::Send { attempts } => {
                // Only a command that would send can be poison: one whose
                // outcome is recorded is finished, however often it came.
                if message.redelivered {
                    match self.poisoned(message.body).await {
                        Ok(None) => {}
                        Ok(Some(reason)) => {
                            warn!(%reason, "poison message");
                            self.release(key, &owner, attempts).await;
                            return Outcome::DeadLetter(reason);
                        }
                        Err(outcome) => {
                            self.release(key, &owner, attempts).await;
                            return outcome;
                        }
                    }
                }
                let mut calls = 0;
                let outcome = self.send(attempt, attempts, message.stop, &mut calls).await;
                // Only a first call that went through measures the send
                // phase: retries add failed calls and backoff to it.
                if let (Outcome::Sent, 1, Some(slot)) = (&outcome, calls, slot) {
                    slot.sent(began.elapsed());
                }
                outcome
            }
            Claim::PublishSent(record) => {
                info!("resuming: provider already accepted, publishing SmsSent");
                self.publish_sent(&attempt, &record, true).await
            }
            Claim::PublishFailed(record) => {
                info!("resuming: failure already recorded, publishing SmsFailed");
                self.publish_failed(&attempt, &record, true).await
            }
            Claim::AlreadySent => {
                self.meters.duplicates.increment(1);
                debug!("duplicate of a sent key");
                Outcome::Duplicate
            }
            Claim::AlreadyFailed(record) => {
                self.meters.duplicates.increment(1);
                Outcome::Failed(format!(
                    "duplicate of failed command: {}",
                    record.reason.as_str()
                ))
            }
            Claim::Busy { lease_left } if returning => {
                // Possibly this command's own lease, left by a crash: come
                // back once it has run out. Counting the delay marks it as
                // returning when it comes back, so it is never taken for a
                // duplicate (and acked) while the dead holder's lease lasts.
                debug!(?lease_left, "leased and returning; delaying past the lease");
                let mut retry = message.retry.clone();
                retry.delays += 1;
                Outcome::Delay {
                    delay: lease_left + Duration::from_millis(100),
                    retry,
                }
            }
            Claim::Busy { .. } => {
                self.meters.duplicates.increment(1);
                debug!("duplicate of a key in flight");
                Outcome::Duplicate
            }
        }
    }

    /// Calls the provider until it accepts, rejects, the attempts or the age
    /// run out, or the wait grows long enough to hand to the broker. Counts
    /// its calls in `this_delivery`.
    async fn send(
        &self,
        mut a: Attempt<'_>,
        stored_attempts: u32,
        stop: &tokio_util::sync::CancellationToken,
        this_delivery: &mut u32,
    ) -> Outcome {
        a.retry.attempts = a.retry.attempts.max(stored_attempts);
        let first_attempt_ms = *a.retry.first_attempt_at_ms.get_or_insert_with(now_ms);
        loop {
            let age = Duration::from_millis(now_ms().saturating_sub(first_attempt_ms));
            if a.retry.attempts >= self.retry.max_attempts || age >= self.retry.max_age {
                let detail = format!(
                    "provider failed {} times over {}s",
                    a.retry.attempts,
                    age.as_secs()
                );
                return self.fail(&a, FailureReason::RetriesExhausted, detail).await;
            }
            if stop.is_cancelled() {
                self.release(&a.cmd.idempotency_key, a.owner, a.retry.attempts)
                    .await;
                return Outcome::RetryAfter(Duration::ZERO);
            }
            if self.guard.breaker.state() == BreakerState::Open {
                let wait = self
                    .guard
                    .breaker
                    .open_for()
                    .unwrap_or(self.retry.max_delay);
                debug!(?wait, "provider circuit open; delaying without a call");
                return self.hand_over(&a, wait.max(Duration::from_secs(1))).await;
            }
            // A retry is a send too; with no token to hand it goes to a
            // delay tier rather than wait while holding the lease. (`check`
            // takes the token when there is one.)
            let limited = |l: &DefaultDirectRateLimiter| l.check().is_err();
            if *this_delivery > 0 && self.guard.limiter.as_ref().is_some_and(limited) {
                let wait = self.retry.broker_delay(a.retry.delays, None);
                return self.hand_over(&a, wait).await;
            }
            a.retry.attempts += 1;
            *this_delivery += 1;
            let started = Instant::now();
            let result = self.sms.send(a.cmd).await;
            self.meters
                .provider_seconds
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(accepted) => {
                    self.guard.breaker.record_success();
                    self.meters.accepted.increment(1);
                    let record = SentRecord {
                        provider: self.sms.name().to_owned(),
                        provider_message_id: accepted.provider_message_id,
                        segments: count_segments(a.cmd.text.as_str()).1,
                        attempts: a.retry.attempts,
                        sent_at: rfc3339(SystemTime::now()),
                    };
                    let recorded = self
                        .record(|| {
                            self.cache
                                .record_sent(&a.cmd.idempotency_key, &record, false)
                        })
                        .await;
                    return self.publish_sent(&a, &record, recorded).await;
                }
                Err(ProviderError::Rejected { detail }) => {
                    self.guard.breaker.record_success();
                    self.meters.rejected.increment(1);
                    warn!(%detail, attempts = a.retry.attempts, "provider rejected the message");
                    return self.fail(&a, FailureReason::ProviderRejected, detail).await;
                }
                Err(ProviderError::Transient {
                    detail,
                    retry_after,
                }) => {
                    self.guard.breaker.record_failure();
                    self.meters.transient.increment(1);
                    if a.retry.attempts >= self.retry.max_attempts {
                        let detail =
                            format!("provider failed {} times; last: {detail}", a.retry.attempts);
                        return self.fail(&a, FailureReason::RetriesExhausted, detail).await;
                    }
                    let wait = self.retry.delay(*this_delivery, retry_after);
                    warn!(%detail, attempts = a.retry.attempts, "transient provider failure");
                    if *this_delivery >= self.retry.in_process_attempts
                        || wait > self.retry.max_delay
                    {
                        let wait = self.retry.broker_delay(a.retry.delays, retry_after);
                        return self.hand_over(&a, wait).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// What to do when an event was not confirmed. Unroutable (no queue is
    /// bound to the exchange): wait in a delay tier until a subscriber binds,
    /// without counting as a broker redelivery. Otherwise the broker itself
    /// is failing: requeue after a short wait.
    fn publish_failed_outcome(&self, error: &QueueError, retry: &RetryState) -> Outcome {
        match error {
            QueueError::Unroutable(_) => {
                let mut retry = retry.clone();
                let delay = self.retry.broker_delay(retry.delays, None);
                retry.delays += 1;
                Outcome::Delay { delay, retry }
            }
            _ => Outcome::RetryAfter(self.retry.requeue_delay),
        }
    }

    async fn rate_limit(&self) {
        if let Some(limiter) = &self.guard.limiter {
            limiter.until_ready().await;
        }
    }

    /// Releases the lease (keeping the attempts) and asks for a delay tier.
    async fn hand_over(&self, a: &Attempt<'_>, delay: Duration) -> Outcome {
        self.release(&a.cmd.idempotency_key, a.owner, a.retry.attempts)
            .await;
        let mut retry = a.retry.clone();
        retry.delays += 1;
        Outcome::Delay { delay, retry }
    }

    async fn fail(&self, a: &Attempt<'_>, reason: FailureReason, detail: String) -> Outcome {
        let record = FailedRecord {
            reason,
            detail,
            attempts: a.retry.attempts,
            failed_at: rfc3339(SystemTime::now()),
        };
        let recorded = self
            .record(|| {
                self.cache
                    .record_failed(&a.cmd.idempotency_key, &record, false)
            })
            .await;
        self.publish_failed(a, &record, recorded).await
    }

    /// Publishes SmsSent, then marks it published; `recorded` says whether
    /// the outcome is in the store (if not, it is recorded now, as
    /// published: marking alone would leave a published key that a later
    /// duplicate could send again).
    async fn publish_sent(&self, a: &Attempt<'_>, record: &SentRecord, recorded: bool) -> Outcome {
        let event = SmsSent {
            idempotency_key: a.cmd.idempotency_key.to_string(),
            phone_number: a.cmd.phone_number.as_str().to_owned(),
            provider: record.provider.clone(),
            provider_message_id: record.provider_message_id.clone(),
            segments: record.segments,
            attempts: record.attempts,
            sent_at: record.sent_at.clone(),
        };
        if let Err(e) = self.events.publish_sent(&event, a.meta).await {
            warn!(error = %e, "SmsSent not confirmed; will publish it again");
            self.release(&a.cmd.idempotency_key, a.owner, record.attempts)
                .await;
            return self.publish_failed_outcome(&e, &a.retry);
        }
        let key = &a.cmd.idempotency_key;
        if recorded {
            self.record(|| self.cache.mark_published(key, a.owner))
                .await;
        } else {
            self.record(|| self.cache.record_sent(key, record, true))
                .await;
        }
        self.meters.sent.increment(1);
        info!(provider_message_id = %record.provider_message_id, attempts = record.attempts, "sms sent");
        Outcome::Sent
    }

    async fn publish_failed(
        &self,
        a: &Attempt<'_>,
        record: &FailedRecord,
        recorded: bool,
    ) -> Outcome {
        let event = SmsFailed {
            idempotency_key: a.cmd.idempotency_key.to_string(),
            phone_number: a.cmd.phone_number.as_str().to_owned(),
            reason: record.reason.as_str().to_owned(),
            detail: record.detail.clone(),
            attempts: record.attempts,
            failed_at: record.failed_at.clone(),
        };
        if let Err(e) = self.events.publish_failed(&event, a.meta).await {
            warn!(error = %e, "SmsFailed not confirmed; will publish it again");
            self.release(&a.cmd.idempotency_key, a.owner, record.attempts)
                .await;
            return self.publish_failed_outcome(&e, &a.retry);
        }
        let key = &a.cmd.idempotency_key;
        if recorded {
            self.record(|| self.cache.mark_published(key, a.owner))
                .await;
        } else {
            self.record(|| self.cache.record_failed(key, record, true))
                .await;
        }
        metrics::counter!("sms_failed_total", "reason" => record.reason.as_str()).increment(1);
        info!(
            reason = record.reason.as_str(),
            attempts = record.attempts,
            "sms failed"
        );
        Outcome::Failed(format!("{}: {}", record.reason.as_str(), record.detail))
    }

    /// An invalid command with a usable key: its SmsFailed, no store write
    /// (nothing was sent, and a corrected command may reuse the key).
    async fn reject_invalid(
        &self,
        error: CommandError,
        meta: &EventMeta,
        retry: &RetryState,
    ) -> Outcome {
        let reason_text = error.dead_letter_reason();
        let CommandError::Invalid {
            key,
            phone_number,
            reason,
            detail,
        } = error
        else {
            return Outcome::DeadLetter(reason_text);
        };
        let event = SmsFailed {
            idempotency_key: key.to_string(),
            phone_number,
            reason: reason.as_str().to_owned(),
            detail,
            attempts: 0,
            failed_at: rfc3339(SystemTime::now()),
        };
        if let Err(e) = self.events.publish_failed(&event, meta).await {
            warn!(error = %e, "SmsFailed for an invalid command not confirmed; will publish it again");
            return self.publish_failed_outcome(&e, retry);
        }
        metrics::counter!("sms_failed_total", "reason" => reason.as_str()).increment(1);
        info!(reason = reason.as_str(), "invalid command");
        Outcome::Failed(reason_text)
    }

    async fn release(&self, key: &IdempotencyKey, owner: &str, attempts: u32) {
        // If this fails the lease simply runs out; nothing is lost.
        if let Err(e) = self.cache.release(key, owner, attempts).await {
            warn!(error = %e, "could not release lease; it will expire");
        }
    }

    /// Writes to the store after a provider call are retried a little: the
    /// SMS is out, so giving up here must not mean sending it again. If the
    /// store stays down the outcome is published anyway.
    async fn record<F, Fut>(&self, write: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::ports::CacheError>>,
    {
        for attempt in 1..=RECORD_TRIES {
            match write().await {
                Ok(()) => return true,
                Err(e) if attempt == RECORD_TRIES => {
                    metrics::counter!("sms_store_write_failures_total").increment(1);
                    warn!(error = %e, "store write failed; going on without it");
                }
                Err(_) => tokio::time::sleep(self.retry.base_delay * attempt).await,
            }
        }
        false
    }
}

#[async_trait]
impl NotificationService for Notifier {
    #[tracing::instrument(skip_all, fields(key, to, correlation_id = message.meta.correlation_id, traceparent = message.meta.traceparent))]
    async fn handle(&self, message: Inbound<'_>) -> Outcome {
        self.meters.received.increment(1);
        if message.body.len() > self.max_body_bytes {
            warn!(bytes = message.body.len(), "command body too large");
            return Outcome::DeadLetter(format!(
                "malformed: body larger than {} bytes",
                self.max_body_bytes
            ));
        }
        match SendSms::from_json(message.body) {
            Ok(cmd) => {
                let span = tracing::Span::current();
                if !span.is_disabled() {
                    span.record("key", cmd.idempotency_key.as_str());
                    span.record("to", cmd.phone_number.masked());
                }
                tracing::trace!(text = cmd.text.as_str(), "command");
                self.process(cmd, &message).await
            }
            Err(CommandError::Malformed(detail)) => {
                warn!(%detail, "malformed command");
                Outcome::DeadLetter(format!("malformed: {detail}"))
            }
            Err(invalid) => {
                self.reject_invalid(invalid, message.meta, message.retry)
                    .await
            }
        }
    }

    async fn ready(&self) -> bool {
        self.cache.ping().await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Accepted;
    use crate::testing::{MemoryCache, MemoryEvents, ScriptedProvider};
    use std::sync::atomic::Ordering::SeqCst;

    const LEASE: Duration = Duration::from_secs(30);

    struct Harness {
        cache: Arc<MemoryCache>,
        provider: Arc<ScriptedProvider>,
        events: Arc<MemoryEvents>,
        notifier: Notifier,
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            max_age: Duration::from_secs(3600),
            in_process_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            tiers: vec![Duration::from_secs(10), Duration::from_secs(60)],
            requeue_delay: Duration::from_secs(1),
        }
    }

    fn harness(provider: Arc<ScriptedProvider>) -> Harness {
        harness_with(provider, policy(), ProviderGuard::unlimited())
    }

    fn harness_with(
        provider: Arc<ScriptedProvider>,
        policy: RetryPolicy,
        guard: ProviderGuard,
    ) -> Harness {
        let cache = MemoryCache::new(LEASE);
        let events = Arc::new(MemoryEvents::default());
        let notifier = Notifier::new(
            cache.clone(),
            provider.clone(),
            events.clone(),
            policy,
            guard,
            1024,
            3,
        );
        Harness {
            cache,
            provider,
            events,
            notifier,
        }
    }

    fn body(key: &str) -> Vec<u8> {
        format!(r#"{{"idempotencyKey":"{key}","phoneNumber":"+254712345678","text":"hello"}}"#)
            .into_bytes()
    }

    impl Harness {
        async fn handle(&self, body: &[u8], redelivered: bool) -> Outcome {
            self.handle_retry(body, redelivered, &RetryState::default())
                .await
        }

        async fn handle_retry(
            &self,
            body: &[u8],
            redelivered: bool,
            retry: &RetryState,
        ) -> Outcome {
            let meta = EventMeta {
                correlation_id: Some("c-1".into()),
                traceparent: None,
            };
            let stop = tokio_util::sync::CancellationToken::new();
            let inbound = Inbound {
                body,
                redelivered,
                meta: &meta,
                retry,
                stop: &stop,
            };
            self.notifier.handle(inbound).await
        }
    }

    fn transient(retry_after: Option<Duration>) -> Result<Accepted, ProviderError> {
        Err(ProviderError::Transient {
            detail: "503".into(),
            retry_after,
        })
    }

    fn delayed(outcome: Outcome) -> (Duration, RetryState) {
        match outcome {
            Outcome::Delay { delay, retry } => (delay, retry),
            other => panic!("expected Delay, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_key_is_claimed_sent_recorded_published_and_released() {
        let h = harness(ScriptedProvider::new(vec![]));
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 1);
        let sent = h.events.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].provider_message_id, "id-1");
        assert_eq!(sent[0].provider, "scripted");
        assert_eq!((sent[0].attempts, sent[0].segments), (1, 1));
        assert_eq!(
            h.events.sent.lock().unwrap()[0].1.correlation_id.as_deref(),
            Some("c-1")
        );
        assert_eq!(h.cache.status_of("k1"), Some(("sent".into(), true, 1)));
        assert_eq!(
            h.cache.lease_holder("k1"),
            None,
            "lease released after publish"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn duplicate_command_is_acked_without_second_send() {
        let h = harness(ScriptedProvider::new(vec![]));
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Duplicate);
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Duplicate);
        assert_eq!(h.provider.calls(), 1);
        assert_eq!(h.events.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicate_while_in_flight_is_acked_and_a_returning_command_waits_for_the_lease() {
        let h = Arc::new(harness(ScriptedProvider::slow(Duration::from_secs(5))));
        let first = tokio::spawn({
            let h = h.clone();
            async move { h.handle(&body("k1"), false).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Duplicate);
        // A broker redelivery, or a command back from a delay tier, may be
        // the lease holder's own: it waits out the lease instead.
        let (delay, retry) = delayed(h.handle(&body("k1"), true).await);
        assert!(delay > LEASE - Duration::from_secs(1) && delay <= LEASE + Duration::from_secs(1));
        // Back from the tier it is marked as returning, not a duplicate.
        let (_, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
        assert_eq!((retry.attempts, retry.delays), (0, 2));
        let back = RetryState {
            attempts: 1,
            delays: 1,
            first_attempt_at_ms: Some(1),
        };
        let (_, retry) = delayed(h.handle_retry(&body("k1"), false, &back).await);
        assert_eq!(
            retry.attempts, back.attempts,
            "waiting for a lease makes no attempt"
        );
        assert_eq!(retry.delays, back.delays + 1);
        assert_eq!(first.await.unwrap(), Outcome::Sent);
        assert_eq!(h.provider.calls(), 1);
        assert_eq!(h.events.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_sms_sent_is_republished_on_redelivery_without_calling_the_provider() {
        let h = harness(ScriptedProvider::new(vec![]));
        h.events.down.store(true, SeqCst);
        // Crash window: recorded sent, event not confirmed.
        assert_eq!(
            h.handle(&body("k1"), false).await,
            Outcome::RetryAfter(policy().requeue_delay)
        );
        assert_eq!(h.cache.status_of("k1"), Some(("sent".into(), false, 1)));
        assert_eq!(
            h.cache.lease_holder("k1"),
            None,
            "lease released for the next try"
        );
        h.events.down.store(false, SeqCst);
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 1, "no second provider call");
        let sent = h.events.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].provider_message_id, "id-1");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unroutable_sms_sent_waits_in_a_delay_tier_for_a_subscriber() {
        let h = harness(ScriptedProvider::new(vec![]));
        h.events.unroutable.store(true, SeqCst);
        let (delay, retry) = delayed(h.handle(&body("k1"), false).await);
        assert!(delay >= Duration::from_secs(5), "{delay:?}");
        let (_, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
        assert_eq!(h.provider.calls(), 1, "waiting for a route never resends");
        h.events.unroutable.store(false, SeqCst);
        assert_eq!(
            h.handle_retry(&body("k1"), false, &retry).await,
            Outcome::Sent
        );
        assert_eq!(h.events.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_holders_lease_expires_and_the_key_is_processed_again() {
        let h = harness(ScriptedProvider::new(vec![]));
        let key = IdempotencyKey::parse("k1").unwrap();
        // An instance claimed the key and died before calling the provider.
        assert_eq!(
            h.cache.claim(&key, "dead").await.unwrap(),
            Claim::Send { attempts: 0 }
        );
        delayed(h.handle(&body("k1"), true).await);
        assert_eq!(h.provider.calls(), 0);
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_documented_window_provider_accepted_but_nothing_recorded_sends_twice() {
        let h = harness(ScriptedProvider::new(vec![]));
        let key = IdempotencyKey::parse("k1").unwrap();
        // Simulates a crash right after the provider accepted: the claim is
        // held, nothing is recorded, the lease must run out.
        assert_eq!(
            h.cache.claim(&key, "crashed").await.unwrap(),
            Claim::Send { attempts: 0 }
        );
        h.provider.calls.fetch_add(1, SeqCst); // the call that the crash swallowed
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 2, "the one duplicate the design allows");
        assert_eq!(h.events.sent().len(), 1, "still one SmsSent");
    }

    #[tokio::test(start_paused = true)]
    async fn store_down_at_claim_pauses_without_sending() {
        let h = harness(ScriptedProvider::new(vec![]));
        h.cache.down.store(true, SeqCst);
        assert_eq!(
            h.handle(&body("k1"), false).await,
            Outcome::StoreUnavailable
        );
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::StoreUnavailable);
        assert_eq!(
            h.provider.calls(),
            0,
            "never send without the idempotency check"
        );
        assert!(!h.notifier.ready().await);
        h.cache.down.store(false, SeqCst);
        assert!(h.notifier.ready().await);
    }

    #[tokio::test(start_paused = true)]
    async fn store_down_after_the_send_still_publishes_rather_than_sending_again() {
        let h = harness(ScriptedProvider::new(vec![]));
        h.cache.fail_records.store(true, SeqCst);
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 1);
        assert_eq!(h.events.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_backoff_then_sent() {
        let h = harness(ScriptedProvider::new(vec![
            transient(None),
            transient(None),
        ]));
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 3);
        assert_eq!(h.events.sent()[0].attempts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_in_process_when_short() {
        let h = harness(ScriptedProvider::new(vec![transient(Some(
            Duration::from_secs(1),
        ))]));
        let started = tokio::time::Instant::now();
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_retry_after_goes_to_a_delay_tier_keeping_the_attempts() {
        let h = harness(ScriptedProvider::new(vec![transient(Some(
            Duration::from_secs(90),
        ))]));
        let (delay, retry) = delayed(h.handle(&body("k1"), false).await);
        assert!(
            delay >= Duration::from_secs(90),
            "Retry-After honoured: {delay:?}"
        );
        assert_eq!((retry.attempts, retry.delays), (1, 1));
        assert!(retry.first_attempt_at_ms.is_some());
        assert_eq!(h.cache.status_of("k1"), Some(("retrying".into(), false, 1)));
        assert_eq!(
            h.cache.lease_holder("k1"),
            None,
            "lease released while waiting"
        );
        assert_eq!(
            h.handle_retry(&body("k1"), false, &retry).await,
            Outcome::Sent
        );
        assert_eq!(h.events.sent()[0].attempts, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_quick_attempts_the_command_climbs_the_delay_tiers() {
        let quick = RetryPolicy {
            in_process_attempts: 2,
            max_attempts: 12,
            ..policy()
        };
        let h = harness_with(
            ScriptedProvider::new(vec![transient(None); 7]),
            quick,
            ProviderGuard::unlimited(),
        );
        let (first, retry) = delayed(h.handle(&body("k1"), false).await);
        assert_eq!(h.provider.calls(), 2, "two quick attempts, then the broker");
        assert!(
            first >= Duration::from_secs(5) && first <= Duration::from_secs(10),
            "{first:?}"
        );
        let (second, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
        assert!(
            second >= Duration::from_secs(30) && second <= Duration::from_secs(60),
            "{second:?}"
        );
        let (third, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
        assert!(
            third >= Duration::from_secs(30),
            "the last tier repeats: {third:?}"
        );
        assert_eq!((retry.attempts, retry.delays), (6, 3));
        assert_eq!(
            h.handle_retry(&body("k1"), false, &retry).await,
            Outcome::Sent
        );
        assert_eq!(h.events.sent()[0].attempts, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_duplicate_arriving_while_the_command_waits_in_a_tier_sends_it_once() {
        let h = harness_with(
            ScriptedProvider::new(vec![transient(None)]),
            RetryPolicy {
                in_process_attempts: 1,
                ..policy()
            },
            ProviderGuard::unlimited(),
        );
        let (_, retry) = delayed(h.handle(&body("k1"), false).await);
        assert_eq!(
            h.handle(&body("k1"), false).await,
            Outcome::Sent,
            "the duplicate sends"
        );
        assert_eq!(
            h.handle_retry(&body("k1"), false, &retry).await,
            Outcome::Duplicate
        );
        assert_eq!(h.provider.calls(), 2);
        assert_eq!(h.events.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_running_out_is_retries_exhausted() {
        let h = harness(ScriptedProvider::new(vec![
            transient(None),
            transient(None),
            transient(None),
        ]));
        match h.handle(&body("k1"), false).await {
            Outcome::Failed(reason) => assert!(reason.starts_with("retries_exhausted")),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.provider.calls(), 3);
        let failed = h.events.failed();
        assert_eq!(
            (failed[0].reason.as_str(), failed[0].attempts),
            ("retries_exhausted", 3)
        );
        // A duplicate of the failed key is dead-lettered, not sent, no event.
        assert!(matches!(
            h.handle(&body("k1"), false).await,
            Outcome::Failed(_)
        ));
        assert_eq!(h.provider.calls(), 3);
        assert_eq!(h.events.failed().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_older_than_the_maximum_age_is_retries_exhausted() {
        let h = harness(ScriptedProvider::new(vec![]));
        let old = RetryState {
            attempts: 1,
            delays: 1,
            first_attempt_at_ms: Some(now_ms() - 3_601_000),
        };
        match h.handle_retry(&body("k1"), false, &old).await {
            Outcome::Failed(reason) => assert!(reason.starts_with("retries_exhausted"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.provider.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_delays_commands_without_calling_the_provider() {
        let breaker = Arc::new(CircuitBreaker::new(2, Duration::from_secs(20)));
        let h = harness_with(
            ScriptedProvider::new(vec![transient(None), transient(None)]),
            RetryPolicy {
                in_process_attempts: 1,
                ..policy()
            },
            ProviderGuard::new(breaker.clone(), 0),
        );
        delayed(h.handle(&body("k1"), false).await);
        delayed(h.handle(&body("k2"), false).await);
        assert_eq!(breaker.state(), BreakerState::Open);
        let (delay, retry) = delayed(h.handle(&body("k3"), false).await);
        assert_eq!(h.provider.calls(), 2, "no call while open");
        assert!(delay >= Duration::from_secs(19), "{delay:?}");
        assert_eq!(retry.attempts, 0, "no attempt burnt");
        // Rejections are answers: they close it again.
        breaker.admit().await;
        assert_eq!(h.handle(&body("k3"), false).await, Outcome::Sent);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_waiting_for_a_send_slot_holds_no_lease_no_token_and_calls_nothing() {
        let breaker = Arc::new(CircuitBreaker::new(0, Duration::from_secs(1)));
        let h = harness_with(
            ScriptedProvider::new(vec![]),
            policy(),
            ProviderGuard::new(breaker, 1).with_send_limit(AdaptiveLimit::new(1, 1, false)),
        );
        let sends = h.notifier.guard.sends.as_ref().expect("a send limit");
        let taken = sends.acquire().await;
        let command = body("k1");
        let mut handling = std::pin::pin!(h.handle(&command, false));
        let waited = tokio::time::timeout(Duration::from_secs(5), handling.as_mut()).await;
        assert!(waited.is_err(), "finished without a slot: {waited:?}");
        assert_eq!(h.cache.lease_holder("k1"), None, "claimed while waiting");
        assert_eq!(h.provider.calls(), 0);
        let limiter = h.notifier.guard.limiter.as_ref().expect("a rate limit");
        assert!(
            limiter.check().is_ok(),
            "took a rate-limit token while waiting"
        );
        drop(taken);
        assert_eq!(handling.await, Outcome::Sent);
        assert_eq!(h.provider.calls(), 1);
    }

    #[tokio::test]
    async fn the_rate_limit_spaces_provider_calls() {
        let h = harness_with(
            ScriptedProvider::new(vec![]),
            policy(),
            ProviderGuard::unlimited(),
        );
        let limited = harness_with(
            ScriptedProvider::new(vec![]),
            policy(),
            ProviderGuard::new(Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))), 20),
        );
        let started = std::time::Instant::now();
        for i in 0..30 {
            assert_eq!(
                limited.handle(&body(&format!("k{i}")), false).await,
                Outcome::Sent
            );
        }
        // 20 at once (the burst), then 10 more at 20/s.
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        let unlimited = std::time::Instant::now();
        for i in 0..30 {
            h.handle(&body(&format!("k{i}")), false).await;
        }
        assert!(unlimited.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_redelivered_too_often_is_dead_lettered_as_poison() {
        // Each delivery kills its consumer mid-call (the task is aborted).
        let h = Arc::new(harness(ScriptedProvider::slow(Duration::from_secs(3600))));
        let poison = br#"{"idempotencyKey":"p1","phoneNumber":"+254712345678","text":"x"}"#;
        for _ in 0..3 {
            let task = tokio::spawn({
                let h = h.clone();
                async move { h.handle(poison, true).await }
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
            task.abort();
            tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        }
        match h.handle(poison, true).await {
            Outcome::DeadLetter(reason) => assert!(reason.starts_with("poison"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.provider.calls(), 3);
        assert_eq!(
            h.cache.lease_holder("p1"),
            None,
            "released for an operator's replay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sent_key_is_never_poison_however_often_it_is_redelivered() {
        let h = harness(ScriptedProvider::new(vec![]));
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
        for _ in 0..10 {
            assert_eq!(h.handle(&body("k1"), true).await, Outcome::Duplicate);
        }
        h.events.down.store(true, SeqCst);
        let h2 = harness(ScriptedProvider::new(vec![]));
        h2.events.down.store(true, SeqCst);
        for _ in 0..10 {
            // Recorded sent, event never confirmed: republished each time, never poison.
            assert!(matches!(
                h2.handle(&body("k2"), true).await,
                Outcome::RetryAfter(_)
            ));
        }
        assert_eq!(h2.provider.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_is_provider_rejected_at_once() {
        let rejected = Err(ProviderError::Rejected {
            detail: "HTTP 400: barred".into(),
        });
        let h = harness(ScriptedProvider::new(vec![rejected]));
        match h.handle(&body("k1"), false).await {
            Outcome::Failed(reason) => assert_eq!(reason, "provider_rejected: HTTP 400: barred"),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.provider.calls(), 1);
        assert_eq!(h.cache.status_of("k1"), Some(("failed".into(), true, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_sms_failed_is_republished_on_redelivery() {
        let rejected = Err(ProviderError::Rejected {
            detail: "no".into(),
        });
        let h = harness(ScriptedProvider::new(vec![rejected]));
        h.events.down.store(true, SeqCst);
        assert!(matches!(
            h.handle(&body("k1"), false).await,
            Outcome::RetryAfter(_)
        ));
        h.events.down.store(false, SeqCst);
        assert!(matches!(
            h.handle(&body("k1"), true).await,
            Outcome::Failed(_)
        ));
        assert_eq!(h.provider.calls(), 1);
        assert_eq!(h.events.failed().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_bodies_are_dead_lettered_without_events() {
        let h = harness(ScriptedProvider::new(vec![]));
        for bad in [&b"nope"[..], br#"{"text":"no key"}"#, &[b'x'; 2000]] {
            assert!(
                matches!(h.handle(bad, false).await, Outcome::DeadLetter(r) if r.starts_with("malformed"))
            );
        }
        assert_eq!(h.provider.calls(), 0);
        assert!(h.events.failed().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_commands_get_sms_failed_and_touch_neither_provider_nor_store() {
        let h = harness(ScriptedProvider::new(vec![]));
        let bad = br#"{"idempotencyKey":"k9","phoneNumber":"12","text":"hi"}"#;
        match h.handle(bad, false).await {
            Outcome::Failed(reason) => assert!(reason.starts_with("invalid_phone_number")),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.events.failed()[0].reason, "invalid_phone_number");
        assert_eq!(h.cache.status_of("k9"), None);
        h.events.down.store(true, SeqCst);
        assert!(
            matches!(h.handle(bad, false).await, Outcome::RetryAfter(_)),
            "event must be confirmed"
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_a_capped_exponential_and_honours_retry_after() {
        let p = policy();
        for made in 1..10 {
            let cap = (p.base_delay * 2u32.pow(made - 1)).min(p.max_delay);
            for _ in 0..50 {
                assert!(p.delay(made, None) <= cap, "attempt {made}");
            }
        }
        let waits: Vec<Duration> = (0..50).map(|_| p.delay(3, None)).collect();
        assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
        for delays in 0..5 {
            let tier = p.tiers[(delays as usize).min(1)];
            let d = p.broker_delay(delays, None);
            assert!(d >= tier / 2 && d <= tier, "{d:?}");
        }
    }
}

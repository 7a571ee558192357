//! The core decision for one command, and the order of side effects that
//! makes it correct.
//!
//! For a valid command, [`Notifier::handle`] does, in this order:
//!
//! 1. **claim** the key in the idempotency store: an atomic compare-and-set
//!    that either grants a lease, or says the key is done, or that someone
//!    else holds it. No provider call happens without a granted lease.
//! 2. **send** through the provider, passing the key as `Idempotency-Key`,
//!    retrying transient failures in process (bounded, exponential backoff
//!    with full jitter, `Retry-After` honoured).
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
//! A duplicate command (not a redelivery) that finds the key leased is
//! acknowledged at once: the holder's delivery is still in the broker's
//! hands and will reach an outcome. A *redelivered* command that finds the
//! key leased may be the holder's own delivery after a crash, so it is
//! retried once the lease has run out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use backon::BackoffBuilder;
use tracing::{debug, info, warn};

use crate::domain::{
    count_segments, rfc3339, CommandError, FailureReason, IdempotencyKey, SendSms, SmsFailed,
    SmsSent,
};
use crate::ports::{
    CacheService, Claim, EventBus, EventMeta, FailedRecord, Inbound, NotificationService, Outcome,
    ProviderError, SentRecord, SmsService,
};

/// How provider failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Provider calls per key in all, across redeliveries.
    pub max_attempts: u32,
    /// First backoff step; doubles each attempt.
    pub base_delay: Duration,
    /// Longest backoff step, and the longest wait done in process: a
    /// `Retry-After` longer than this hands the command back to the queue.
    pub max_delay: Duration,
    /// How long to wait before requeueing when the broker or the store failed.
    pub requeue_delay: Duration,
}

impl RetryPolicy {
    /// The wait before attempt `made + 1`: full jitter over a capped
    /// exponential step, but never less than what the provider asked for.
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
}

/// The notification step over its ports.
pub struct Notifier {
    cache: Arc<dyn CacheService>,
    sms: Arc<dyn SmsService>,
    events: Arc<dyn EventBus>,
    retry: RetryPolicy,
    /// Larger bodies are dead-lettered unread.
    max_body_bytes: usize,
    /// Makes each claim's lease owner unique across instances and attempts.
    instance: String,
    claims: AtomicU64,
}

/// Store writes that follow a provider call are retried this often before
/// going on without them.
const RECORD_TRIES: u32 = 3;

impl Notifier {
    pub fn new(
        cache: Arc<dyn CacheService>,
        sms: Arc<dyn SmsService>,
        events: Arc<dyn EventBus>,
        retry: RetryPolicy,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            cache,
            sms,
            events,
            retry,
            max_body_bytes,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            claims: AtomicU64::new(0),
        }
    }

    fn next_owner(&self) -> String {
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    async fn process(&self, cmd: SendSms, redelivered: bool, meta: &EventMeta) -> Outcome {
        let key = &cmd.idempotency_key;
        let owner = self.next_owner();
        let claim = match self.cache.claim(key, &owner).await {
            Ok(claim) => claim,
            Err(e) => {
                warn!(error = %e, "cannot claim key; requeueing");
                return Outcome::RetryAfter(self.retry.requeue_delay);
            }
        };
        match claim {
            Claim::Send { attempts } => self.send(&cmd, attempts, &owner, meta).await,
            Claim::PublishSent(record) => {
                info!("resuming: provider already accepted, publishing SmsSent");
                self.publish_sent(&cmd, &record, &owner, meta).await
            }
            Claim::PublishFailed(record) => {
                info!("resuming: failure already recorded, publishing SmsFailed");
                self.publish_failed(&cmd, &record, &owner, meta).await
            }
            Claim::AlreadySent => {
                metrics::counter!("sms_duplicates_total").increment(1);
                debug!("duplicate of a sent key");
                Outcome::Duplicate
            }
            Claim::AlreadyFailed(record) => {
                metrics::counter!("sms_duplicates_total").increment(1);
                Outcome::Failed(format!(
                    "duplicate of failed command: {}",
                    record.reason.as_str()
                ))
            }
            Claim::Busy { lease_left } if redelivered => {
                debug!(
                    ?lease_left,
                    "redelivered while leased; retrying after the lease"
                );
                Outcome::RetryAfter(
                    lease_left.clamp(Duration::from_millis(50), self.retry.max_delay),
                )
            }
            Claim::Busy { .. } => {
                metrics::counter!("sms_duplicates_total").increment(1);
                debug!("duplicate of a key in flight");
                Outcome::Duplicate
            }
        }
    }

    /// Calls the provider until it accepts, rejects, or the attempts run out.
    async fn send(
        &self,
        cmd: &SendSms,
        mut attempts: u32,
        owner: &str,
        meta: &EventMeta,
    ) -> Outcome {
        loop {
            if attempts >= self.retry.max_attempts {
                let detail = format!("provider failed {attempts} times");
                return self
                    .fail(
                        cmd,
                        FailureReason::RetriesExhausted,
                        detail,
                        attempts,
                        owner,
                        meta,
                    )
                    .await;
            }
            attempts += 1;
            let started = Instant::now();
            let result = self.sms.send(cmd).await;
            metrics::histogram!("sms_provider_request_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(accepted) => {
                    metrics::counter!("sms_provider_requests_total", "outcome" => "accepted")
                        .increment(1);
                    let record = SentRecord {
                        provider: self.sms.name().to_owned(),
                        provider_message_id: accepted.provider_message_id,
                        segments: count_segments(cmd.text.as_str()).1,
                        attempts,
                        sent_at: rfc3339(SystemTime::now()),
                    };
                    self.record(|| self.cache.record_sent(&cmd.idempotency_key, &record))
                        .await;
                    return self.publish_sent(cmd, &record, owner, meta).await;
                }
                Err(ProviderError::Rejected { detail }) => {
                    metrics::counter!("sms_provider_requests_total", "outcome" => "rejected")
                        .increment(1);
                    warn!(%detail, attempts, "provider rejected the message");
                    return self
                        .fail(
                            cmd,
                            FailureReason::ProviderRejected,
                            detail,
                            attempts,
                            owner,
                            meta,
                        )
                        .await;
                }
                Err(ProviderError::Transient {
                    detail,
                    retry_after,
                }) => {
                    metrics::counter!("sms_provider_requests_total", "outcome" => "transient")
                        .increment(1);
                    if attempts >= self.retry.max_attempts {
                        let detail = format!("provider failed {attempts} times; last: {detail}");
                        return self
                            .fail(
                                cmd,
                                FailureReason::RetriesExhausted,
                                detail,
                                attempts,
                                owner,
                                meta,
                            )
                            .await;
                    }
                    let wait = self.retry.delay(attempts, retry_after);
                    warn!(%detail, attempts, ?wait, "transient provider failure");
                    if wait > self.retry.max_delay {
                        // Too long to hold the lease and a delivery for:
                        // hand the command back and let the next claim retry.
                        self.release(&cmd.idempotency_key, owner, attempts).await;
                        return Outcome::RetryAfter(wait);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn fail(
        &self,
        cmd: &SendSms,
        reason: FailureReason,
        detail: String,
        attempts: u32,
        owner: &str,
        meta: &EventMeta,
    ) -> Outcome {
        let record = FailedRecord {
            reason,
            detail,
            attempts,
            failed_at: rfc3339(SystemTime::now()),
        };
        self.record(|| self.cache.record_failed(&cmd.idempotency_key, &record))
            .await;
        self.publish_failed(cmd, &record, owner, meta).await
    }

    async fn publish_sent(
        &self,
        cmd: &SendSms,
        record: &SentRecord,
        owner: &str,
        meta: &EventMeta,
    ) -> Outcome {
        let event = SmsSent {
            idempotency_key: cmd.idempotency_key.to_string(),
            phone_number: cmd.phone_number.as_str().to_owned(),
            provider: record.provider.clone(),
            provider_message_id: record.provider_message_id.clone(),
            segments: record.segments,
            attempts: record.attempts,
            sent_at: record.sent_at.clone(),
        };
        if let Err(e) = self.events.publish_sent(&event, meta).await {
            warn!(error = %e, "SmsSent not confirmed; requeueing to publish it again");
            self.release(&cmd.idempotency_key, owner, record.attempts)
                .await;
            return Outcome::RetryAfter(self.retry.requeue_delay);
        }
        self.record(|| self.cache.mark_published(&cmd.idempotency_key, owner))
            .await;
        metrics::counter!("sms_sent_total").increment(1);
        info!(provider_message_id = %record.provider_message_id, attempts = record.attempts, "sms sent");
        Outcome::Sent
    }

    async fn publish_failed(
        &self,
        cmd: &SendSms,
        record: &FailedRecord,
        owner: &str,
        meta: &EventMeta,
    ) -> Outcome {
        let event = SmsFailed {
            idempotency_key: cmd.idempotency_key.to_string(),
            phone_number: cmd.phone_number.as_str().to_owned(),
            reason: record.reason.as_str().to_owned(),
            detail: record.detail.clone(),
            attempts: record.attempts,
            failed_at: record.failed_at.clone(),
        };
        if let Err(e) = self.events.publish_failed(&event, meta).await {
            warn!(error = %e, "SmsFailed not confirmed; requeueing to publish it again");
            self.release(&cmd.idempotency_key, owner, record.attempts)
                .await;
            return Outcome::RetryAfter(self.retry.requeue_delay);
        }
        self.record(|| self.cache.mark_published(&cmd.idempotency_key, owner))
            .await;
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
    async fn reject_invalid(&self, error: CommandError, meta: &EventMeta) -> Outcome {
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
            warn!(error = %e, "SmsFailed for an invalid command not confirmed; requeueing");
            return Outcome::RetryAfter(self.retry.requeue_delay);
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
    async fn record<F, Fut>(&self, write: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::ports::CacheError>>,
    {
        for attempt in 1..=RECORD_TRIES {
            match write().await {
                Ok(()) => return,
                Err(e) if attempt == RECORD_TRIES => {
                    metrics::counter!("sms_store_write_failures_total").increment(1);
                    warn!(error = %e, "store write failed; going on without it");
                }
                Err(_) => tokio::time::sleep(self.retry.base_delay * attempt).await,
            }
        }
    }
}

#[async_trait]
impl NotificationService for Notifier {
    #[tracing::instrument(skip_all, fields(key, to, correlation_id = message.meta.correlation_id, traceparent = message.meta.traceparent))]
    async fn handle(&self, message: Inbound<'_>) -> Outcome {
        metrics::counter!("sms_commands_received_total").increment(1);
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
                span.record("key", cmd.idempotency_key.as_str());
                span.record("to", cmd.phone_number.masked());
                tracing::trace!(text = cmd.text.as_str(), "command");
                self.process(cmd, message.redelivered, message.meta).await
            }
            Err(CommandError::Malformed(detail)) => {
                warn!(%detail, "malformed command");
                Outcome::DeadLetter(format!("malformed: {detail}"))
            }
            Err(invalid) => self.reject_invalid(invalid, message.meta).await,
        }
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
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            requeue_delay: Duration::from_secs(1),
        }
    }

    fn harness(provider: Arc<ScriptedProvider>) -> Harness {
        let cache = MemoryCache::new(LEASE);
        let events = Arc::new(MemoryEvents::default());
        let notifier = Notifier::new(
            cache.clone(),
            provider.clone(),
            events.clone(),
            policy(),
            1024,
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
            let meta = EventMeta {
                correlation_id: Some("c-1".into()),
                traceparent: None,
            };
            self.notifier
                .handle(Inbound {
                    body,
                    redelivered,
                    meta: &meta,
                })
                .await
        }
    }

    fn transient(retry_after: Option<Duration>) -> Result<Accepted, ProviderError> {
        Err(ProviderError::Transient {
            detail: "503".into(),
            retry_after,
        })
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
    async fn duplicate_while_in_flight_is_acked_and_a_redelivery_waits_for_the_lease() {
        let h = Arc::new(harness(ScriptedProvider::slow(Duration::from_secs(5))));
        let first = tokio::spawn({
            let h = h.clone();
            async move { h.handle(&body("k1"), false).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(h.handle(&body("k1"), false).await, Outcome::Duplicate);
        match h.handle(&body("k1"), true).await {
            Outcome::RetryAfter(d) => assert!(d <= policy().max_delay && d > Duration::ZERO),
            other => panic!("{other:?}"),
        }
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
    async fn a_crashed_holders_lease_expires_and_the_key_is_processed_again() {
        let h = harness(ScriptedProvider::new(vec![]));
        let key = IdempotencyKey::parse("k1").unwrap();
        // An instance claimed the key and died before calling the provider.
        assert_eq!(
            h.cache.claim(&key, "dead").await.unwrap(),
            Claim::Send { attempts: 0 }
        );
        assert!(matches!(
            h.handle(&body("k1"), true).await,
            Outcome::RetryAfter(_)
        ));
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
    async fn store_down_at_claim_requeues_without_sending() {
        let h = harness(ScriptedProvider::new(vec![]));
        h.cache.down.store(true, SeqCst);
        assert_eq!(
            h.handle(&body("k1"), false).await,
            Outcome::RetryAfter(policy().requeue_delay)
        );
        assert_eq!(
            h.provider.calls(),
            0,
            "never send without the idempotency check"
        );
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
    async fn a_long_retry_after_hands_the_command_back_keeping_the_attempts() {
        let h = harness(ScriptedProvider::new(vec![transient(Some(
            Duration::from_secs(60),
        ))]));
        assert_eq!(
            h.handle(&body("k1"), false).await,
            Outcome::RetryAfter(Duration::from_secs(60))
        );
        assert_eq!(h.cache.status_of("k1"), Some(("retrying".into(), false, 1)));
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
        assert_eq!(h.events.sent()[0].attempts, 2);
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
    }
}

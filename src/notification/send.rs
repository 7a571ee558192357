//! Step 2: call the provider until it accepts or rejects, the attempts or
//! the age run out, or the wait grows long enough to hand to the broker.

use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use super::claim::one_more_delay;
use super::{now_ms, Attempt, Notifier};
use crate::breaker::BreakerState;
use crate::domain::{count_segments, rfc3339, FailureReason};
use crate::ports::{Accepted, Outcome, ProviderError, SentRecord};

impl Notifier {
    /// Sends under the claim in `a`, counting its calls there.
    pub(super) async fn send(&self, a: &mut Attempt<'_>) -> Outcome {
        let first_attempt_ms = a.retry.first_attempt_at_ms.unwrap_or_else(now_ms);
        loop {
            if let Some(outcome) = self.not_now(a, first_attempt_ms).await {
                return outcome;
            }
            a.retry.attempts = a.retry.attempts.saturating_add(1);
            a.calls += 1;
            let started = Instant::now();
            let call = self.sms.send(a.cmd);
            let result = self.renewing(a, call).await;
            self.meters
                .provider_seconds
                .record(started.elapsed().as_secs_f64());
            let (detail, retry_after) = match result {
                Ok(accepted) => return self.accepted(a, accepted).await,
                Err(ProviderError::Rejected { detail }) => {
                    self.guard.breaker.record_success();
                    self.meters.rejected.increment(1);
                    warn!(%detail, attempts = a.retry.attempts, "provider rejected the message");
                    return self.fail(a, FailureReason::ProviderRejected, detail).await;
                }
                Err(ProviderError::Transient {
                    detail,
                    retry_after,
                }) => (detail, retry_after),
            };
            self.guard.breaker.record_failure();
            self.meters.transient.increment(1);
            warn!(%detail, attempts = a.retry.attempts, "transient provider failure");
            let policy = &self.settings.retry;
            if a.retry.attempts >= policy.max_attempts {
                let detail = format!("provider failed {} times; last: {detail}", a.retry.attempts);
                return self.fail(a, FailureReason::RetriesExhausted, detail).await;
            }
            let wait = policy.delay(a.calls, retry_after);
            if a.calls >= policy.in_process_attempts || wait > policy.max_delay {
                let wait = policy.broker_delay(a.retry.delays, retry_after);
                return self.hand_over(a, wait).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = a.inbound.stop.cancelled() => {}
            }
        }
    }

    /// Why the next call is not to be made now, if it is not: the attempts
    /// or the age ran out, shutdown, an open breaker, or no rate-limit
    /// token for a retry (it goes to a delay tier rather than wait while
    /// holding the lease).
    async fn not_now(&self, a: &mut Attempt<'_>, first_attempt_ms: u64) -> Option<Outcome> {
        let age = Duration::from_millis(now_ms().saturating_sub(first_attempt_ms));
        let policy = &self.settings.retry;
        if a.retry.attempts >= policy.max_attempts || age >= policy.max_age {
            let detail = format!(
                "provider failed {} times over {}s",
                a.retry.attempts,
                age.as_secs()
            );
            return Some(self.fail(a, FailureReason::RetriesExhausted, detail).await);
        }
        if a.inbound.stop.is_cancelled() {
            self.release(&a.cmd.idempotency_key, a.owner, a.retry.attempts)
                .await;
            return Some(Outcome::HandBack);
        }
        if !self.still_owner(a).await {
            return Some(self.fenced());
        }
        if self.guard.breaker.state() == BreakerState::Open {
            let wait = self.guard.breaker.open_for().unwrap_or(policy.max_delay);
            debug!(?wait, "provider circuit open; delaying without a call");
            return Some(self.hand_over(a, wait.max(Duration::from_secs(1))).await);
        }
        if a.calls > 0 && !self.guard.retry_token() {
            let wait = policy.broker_delay(a.retry.delays, None);
            return Some(self.hand_over(a, wait).await);
        }
        None
    }

    /// The provider took the message: say so at once (a user with no
    /// subscriber bound learns it here), then record and publish.
    async fn accepted(&self, a: &mut Attempt<'_>, accepted: Accepted) -> Outcome {
        self.guard.breaker.record_success();
        self.meters.accepted.increment(1);
        metrics::counter!("sms_provider_accepted_total").increment(1);
        info!(
            provider = self.sms.name(),
            provider_message_id = %accepted.provider_message_id,
            attempts = a.retry.attempts,
            "provider accepted"
        );
        let record = SentRecord {
            provider: self.sms.name().to_owned(),
            provider_message_id: accepted.provider_message_id,
            segments: count_segments(a.cmd.text.as_str()).1,
            attempts: a.retry.attempts,
            sent_at: rfc3339(SystemTime::now()),
        };
        self.sent(a, record).await
    }

    /// Releases the lease (keeping the attempts) and asks for a delay tier.
    async fn hand_over(&self, a: &Attempt<'_>, delay: Duration) -> Outcome {
        self.release(&a.cmd.idempotency_key, a.owner, a.retry.attempts)
            .await;
        Outcome::Delay {
            delay,
            retry: one_more_delay(&a.retry),
        }
    }
}

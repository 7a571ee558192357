//! Step 3: record the outcome of a provider call, fenced by the lease, and
//! never give up on the write while the command's delivery is held; keep
//! the lease alive while slow work runs under it.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::{debug, info, warn, Instrument};

use super::publish::Event;
use super::{Attempt, Notifier};
use crate::domain::{rfc3339, FailureReason};
use crate::ports::{CacheError, FailedRecord, Outcome, Recorded, SentRecord};

/// Counts a held write for as long as it lives, so that
/// [`Notifier::ready`](crate::ports::NotificationService::ready) stays
/// false until every held write is through, even if one is dropped.
struct Held<'a>(&'a Notifier);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Notifier {
    /// The provider accepted: record it, then publish SmsSent.
    pub(super) async fn sent(&self, a: &mut Attempt<'_>, record: SentRecord) -> Outcome {
        let key = &a.cmd.idempotency_key;
        let owner = a.owner;
        // The store vouches for the claim as of when the write was sent,
        // not when its answer came back (the process may pause between).
        let asked = tokio::time::Instant::now();
        let span = tracing::info_span!("record", record = "sent", written = tracing::field::Empty);
        let written = self
            .held_write(|| self.cache.record_sent(key, owner, &record))
            .instrument(span.clone())
            .await;
        span.record("written", written != Recorded::Fenced);
        drop(span); // the record ends here; publishing has a span of its own
        match written {
            written @ (Recorded::Written | Recorded::WrittenReported) => {
                a.owned_at = asked;
                let reported = written == Recorded::WrittenReported;
                self.publish_outcome(a, Event::Sent(&record, reported))
                    .await
            }
            Recorded::Fenced => self.fenced(),
        }
    }

    /// The key failed for good: record it, then publish SmsFailed.
    pub(super) async fn fail(
        &self,
        a: &mut Attempt<'_>,
        reason: FailureReason,
        detail: String,
    ) -> Outcome {
        let record = FailedRecord {
            reason,
            detail,
            attempts: a.retry.attempts,
            failed_at: rfc3339(SystemTime::now()),
        };
        let key = &a.cmd.idempotency_key;
        let owner = a.owner;
        let asked = tokio::time::Instant::now();
        let span = tracing::info_span!(
            "record",
            record = "failed",
            reason = reason.as_str(),
            written = tracing::field::Empty
        );
        let written = self
            .held_write(|| self.cache.record_failed(key, owner, &record))
            .instrument(span.clone())
            .await;
        span.record("written", written != Recorded::Fenced);
        drop(span); // the record ends here; publishing has a span of its own
        match written {
            Recorded::Written | Recorded::WrittenReported => {
                a.owned_at = asked;
                self.publish_outcome(a, Event::Failed(&record)).await
            }
            Recorded::Fenced => self.fenced(),
        }
    }

    /// Another holder took the key over while this one worked (this one
    /// paused past its liveness record): the key's outcome and event are
    /// the other holder's. Acknowledged with nothing published.
    pub(super) fn fenced(&self) -> Outcome {
        self.meters.fenced.increment(1);
        warn!("lease lost to another holder: its record stands and it publishes the event; publishing nothing");
        Outcome::Duplicate
    }

    /// A store write that must happen before the delivery is settled:
    /// tried until the store takes it, with capped, jittered backoff. While
    /// it is held the instance takes no new work.
    pub(super) async fn held_write<T, F, Fut>(&self, write: F) -> T
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, CacheError>>,
    {
        let mut held = None;
        let mut failures = 0u32;
        loop {
            match write().await {
                Ok(value) => {
                    if failures > 0 {
                        info!(failures, "held store write went through");
                    }
                    drop(held);
                    return value;
                }
                Err(e) => {
                    if held.is_none() {
                        self.held.fetch_add(1, Ordering::SeqCst);
                        held = Some(Held(self));
                        warn!(error = %e, "store write failed; keeping the delivery and retrying until the store answers");
                    }
                    failures = failures.saturating_add(1);
                    self.meters.store_write_failures.increment(1);
                    let policy = &self.settings.retry;
                    let wait = policy.delay(failures, None).max(policy.base_delay);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs `work` under the claim in `a`, renewing the lease every third
    /// of it while the work lasts, so that a live owner keeps the key
    /// through a slow provider call or a slow confirm.
    pub(super) async fn renewing<F: Future>(&self, a: &Attempt<'_>, work: F) -> F::Output {
        let every = self.settings.lease / 3;
        tokio::pin!(work);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => {}
            }
            match self.cache.renew(&a.cmd.idempotency_key, a.owner).await {
                Ok(Recorded::Written | Recorded::WrittenReported) => debug!("lease renewed"),
                Ok(Recorded::Fenced) => warn!("lease lost while working"),
                Err(e) => debug!(error = %e, "could not renew the lease"),
            }
        }
    }

    /// Whether this claim still holds the key, asked of the store only when
    /// it last said so more than half a liveness TTL ago: a holder that
    /// paused that long may have been taken over, and must then neither call
    /// the provider again nor publish. If the store cannot answer, yes (no
    /// one can take the key over while it is away).
    pub(super) async fn still_owner(&self, a: &mut Attempt<'_>) -> bool {
        if a.owned_at.elapsed() < self.settings.liveness_ttl / 2 {
            return true;
        }
        let asked = tokio::time::Instant::now();
        match self.cache.renew(&a.cmd.idempotency_key, a.owner).await {
            Ok(Recorded::Written | Recorded::WrittenReported) => {
                a.owned_at = asked;
                true
            }
            Ok(Recorded::Fenced) => false,
            Err(e) => {
                debug!(error = %e, "cannot check the lease; going on");
                true
            }
        }
    }

    /// Releases the lease of `a`'s claim without an outcome, keeping the
    /// attempts made, and the pin of its route if it is pinned (in the
    /// same step: see [`crate::ports::CacheService::release`]).
    pub(super) async fn release(&self, a: &Attempt<'_>, attempts: u32) {
        let pinned = self.carried_retry(a).pinned_provider;
        let (key, owner) = (&a.cmd.idempotency_key, a.owner);
        // If this fails the lease simply runs out; nothing is lost: a
        // command that goes to a delay tier carries its pin in a header.
        if let Err(e) = self
            .cache
            .release(key, owner, attempts, pinned.as_deref())
            .await
        {
            warn!(error = %e, "could not release lease; it will expire");
        }
    }
}

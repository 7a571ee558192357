//! Step 1: wait for a send slot and the rate limit, claim the key, and act
//! on what the store says about it. Also the invalid command, which is
//! checked against the store before it gets its SmsFailed.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn, Instrument};

use super::publish::Event;
use super::{Attempt, Notifier};
use crate::concurrency::Slot;
use crate::domain::{
    count_segments, rfc3339, CommandError, FailureReason, IdempotencyKey, SendSms, SmsFailed,
};
use crate::ports::{Claim, FailedRecord, Inbound, InvalidVerdict, Lane, Outcome, RetryState};

/// A returning command that finds a live holder comes back this long
/// after the holder is due to be free.
const PAST_THE_HOLDER: Duration = Duration::from_millis(100);

impl Notifier {
    pub(super) async fn process(&self, cmd: &SendSms, message: &Inbound<'_>) -> Outcome {
        if let Some(outcome) = self.not_due(cmd).await {
            return outcome;
        }
        let route = self.route_for(cmd, message.retry);
        let Some(slot) = self.wait_for_turn(message, route.current).await else {
            return Outcome::HandBack;
        };
        let began = Instant::now();
        let owner = self.next_owner();
        let asked = tokio::time::Instant::now();
        let fingerprint = cmd.fingerprint();
        let span = tracing::info_span!("claim", claim = tracing::field::Empty);
        let claim = match self
            .cache
            .claim(&cmd.idempotency_key, &owner, &fingerprint)
            .instrument(span.clone())
            .await
        {
            Ok(claim) => {
                span.record("claim", claim_name(&claim));
                claim
            }
            Err(e) => {
                span.record("claim", "store_unavailable");
                warn!(error = %e, "cannot claim key; pausing");
                return Outcome::StoreUnavailable;
            }
        };
        // The claim step ends here, not with the command.
        drop(span);
        // The provider gets the smart-encoded text, and SmsSent counts its
        // parts; the claim above keeps the received command's fingerprint.
        let encoded = self.smart_encoded(cmd);
        let mut attempt = Attempt {
            cmd: encoded.as_ref().unwrap_or(cmd),
            owner: &owner,
            inbound: message,
            retry: message.retry.clone(),
            calls: 0,
            route,
            owned_at: asked,
        };
        let outcome = self.act_on(claim, &mut attempt).await;
        // Only a first call that went through measures the send phase:
        // retries add failed calls and backoff to it.
        if let (Outcome::Sent, Some(slot), 1) = (&outcome, slot, attempt.calls) {
            slot.sent(began.elapsed());
        }
        outcome
    }

    /// `cmd` with its text smart-encoded, when that is on and changes it.
    fn smart_encoded(&self, cmd: &SendSms) -> Option<SendSms> {
        if !self.settings.smart_encoding {
            return None;
        }
        let encoded = cmd.smart_encoded()?;
        debug!(
            segments = count_segments(cmd.text.as_str()).1,
            segments_sent = count_segments(encoded.text.as_str()).1,
            "smart encoding replaced GSM-7 look-alikes"
        );
        Some(encoded)
    }

    /// Waits for a send slot and then the rate limit, before the claim, so
    /// that a long wait never eats into the lease; in that order, so that
    /// no command sits on a rate-limit token while it waits for a slot (the
    /// tokens would pile up into a burst). A command of the high queue
    /// takes no send slot: the high queue's own `high_max_in_flight`
    /// bounds it, and it never queues behind the command queue's sends.
    /// `None` when told to stop.
    async fn wait_for_turn(
        &self,
        message: &Inbound<'_>,
        provider: usize,
    ) -> Option<Option<Slot<'_>>> {
        let sends = self.sends.as_ref().filter(|_| message.lane == Lane::Normal);
        let slot = match sends {
            Some(sends) => tokio::select! {
                slot = sends.acquire() => Some(slot),
                _ = message.stop.cancelled() => return None,
            },
            None => None,
        };
        tokio::select! {
            _ = self.providers.get(provider).guard.rate_limit(message.lane) => {}
            _ = message.stop.cancelled() => return None,
        }
        (!message.stop.is_cancelled()).then_some(slot)
    }

    /// Does what the claim says.
    async fn act_on(&self, claim: Claim, attempt: &mut Attempt<'_>) -> Outcome {
        let message = attempt.inbound;
        match claim {
            Claim::Send {
                attempts,
                first_attempt_ms,
                takeovers,
                took_over,
                pinned,
            } => {
                let counts = Counts {
                    attempts,
                    first_attempt_ms,
                    takeovers,
                    took_over,
                };
                self.start_sending(attempt, counts, pinned).await
            }
            Claim::PublishSent(record) => {
                info!("resuming: provider already accepted, publishing SmsSent");
                // Reports parked before the crash may have ended it.
                self.publish_outcome(attempt, Event::Sent(&record, true))
                    .await
            }
            Claim::PublishFailed(record) => {
                if record.reason == FailureReason::Cancelled {
                    info!("cancelled before it was sent: publishing its SmsFailed");
                } else {
                    info!("resuming: failure already recorded, publishing SmsFailed");
                }
                self.publish_outcome(attempt, Event::Failed(&record)).await
            }
            Claim::AlreadySent => {
                self.meters.duplicates.increment(1);
                debug!("duplicate of a sent key");
                Outcome::Duplicate
            }
            // Its SmsFailed is out: it ends as a failure does, with no
            // second event.
            Claim::AlreadyFailed(record) if record.reason == FailureReason::Cancelled => {
                info!("cancelled before it was sent; its SmsFailed is out");
                Outcome::Failed(format!("cancelled: {}", record.detail))
            }
            Claim::Cancelling { retry_in } => {
                // The cancel publishes its SmsFailed now: back once that
                // is over, to end as a cancelled command (or publish it, if
                // the cancel could not).
                debug!(?retry_in, "cancelled, its SmsFailed being published; held");
                Outcome::Hold {
                    until: std::time::SystemTime::now() + retry_in,
                }
            }
            Claim::Contended => contended(message),
            Claim::AlreadyFailed(record) => {
                self.meters.duplicates.increment(1);
                Outcome::Failed(format!(
                    "duplicate of failed command: {}",
                    record.reason.as_str()
                ))
            }
            Claim::Busy {
                lease_left,
                holder_alive_for,
            } if returning(message) => {
                // Possibly this command's own lease, left by a crash: come
                // back once the holder is known dead or its lease is over.
                // Counting the delay marks it as returning when it comes
                // back, so it is never taken for a duplicate (and acked)
                // while the holder might still be dead.
                // Never past the liveness TTL, so the wait fits the
                // shortest delay tier that covers it (a longer tier may hold
                // the message behind longer waits); a holder still alive
                // by a hair then costs one more round.
                let delay = (lease_left.min(holder_alive_for) + PAST_THE_HOLDER)
                    .min(self.settings.liveness_ttl);
                debug!(?delay, "leased and returning; delaying past the holder");
                // Marked as returning (delays > 0), but not counted as a
                // tier climbed: waiting for a holder is no failed attempt.
                let mut retry = message.retry.clone();
                retry.delays = retry.delays.max(1);
                Outcome::Delay { delay, retry }
            }
            Claim::Busy { .. } => {
                self.meters.duplicates.increment(1);
                debug!("duplicate of a key in flight");
                Outcome::Duplicate
            }
        }
    }

    /// A claim that may send: pinned if the store says so, poison if its
    /// holders kept dying, else on to the provider with the counts the
    /// store kept.
    async fn start_sending(
        &self,
        attempt: &mut Attempt<'_>,
        counts: Counts,
        pinned: Option<String>,
    ) -> Outcome {
        if let Some(name) = pinned {
            self.pin_route(attempt, &name);
        }
        if counts.took_over {
            self.meters.takeovers.increment(1);
        }
        let retry = &mut attempt.retry;
        retry.attempts = retry.attempts.max(counts.attempts);
        if counts.takeovers > self.settings.max_takeovers {
            return self.poison(attempt, counts.takeovers).await;
        }
        let first = counts.first_attempt_ms;
        retry.first_attempt_at_ms = Some(
            retry
                .first_attempt_at_ms
                .map_or(first, |header| header.min(first)),
        );
        self.send(attempt).await
    }

    /// A key whose holders keep dying before an outcome: the command is
    /// what kills them. It fails for good (`retries_exhausted`, the detail
    /// says poison), with its SmsFailed, and is dead-lettered; an operator
    /// can send it again on purpose (`dead-letters replay --reset`).
    async fn poison(&self, attempt: &mut Attempt<'_>, takeovers: u32) -> Outcome {
        let detail = format!(
            "poison: taken over {takeovers} times from holders that never reached an outcome"
        );
        warn!(%detail, "poison message");
        self.fail(attempt, FailureReason::RetriesExhausted, detail)
            .await
    }

    /// An invalid command with a usable key. If the store already knows
    /// the key it is a bad duplicate: dead-lettered with no event, so
    /// subscribers never see SmsFailed for a key that was sent. Otherwise
    /// it is recorded as failed (the status API answers for it; a
    /// corrected command may still reuse the key) and gets its SmsFailed.
    pub(super) async fn reject_invalid(
        &self,
        error: CommandError,
        message: &Inbound<'_>,
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
        let record = FailedRecord {
            reason,
            detail,
            attempts: 0,
            failed_at: rfc3339(std::time::SystemTime::now()),
        };
        let span = tracing::info_span!("record", record = "invalid");
        match self
            .cache
            .record_invalid(&key, &record)
            .instrument(span)
            .await
        {
            Ok(InvalidVerdict::Known) => {
                self.meters.duplicates.increment(1);
                info!(
                    reason = reason.as_str(),
                    "invalid duplicate of a known key; no event"
                );
                return Outcome::DeadLetter(format!(
                    "{reason_text} (duplicate of a known key: no event)"
                ));
            }
            Ok(InvalidVerdict::Recorded) => {}
            // Only the delivery that recorded it publishes it: a fresh
            // copy is a duplicate (that delivery is still in the broker's
            // hands and will reach its outcome).
            Ok(InvalidVerdict::Unpublished) if returning(message) => {}
            Ok(InvalidVerdict::Unpublished) => {
                self.meters.duplicates.increment(1);
                return Outcome::DeadLetter(format!(
                    "{reason_text} (duplicate of a known key: no event)"
                ));
            }
            Err(e) => {
                warn!(error = %e, "cannot record the invalid command; pausing");
                return Outcome::StoreUnavailable;
            }
        }
        self.publish_invalid(&key, phone_number, &record, reason_text, message)
            .await
    }

    /// Publishes an invalid command's SmsFailed and marks it published.
    async fn publish_invalid(
        &self,
        key: &IdempotencyKey,
        phone_number: String,
        record: &FailedRecord,
        reason_text: String,
        message: &Inbound<'_>,
    ) -> Outcome {
        let reason = record.reason;
        let event = SmsFailed {
            idempotency_key: key.to_string(),
            phone_number,
            reason: reason.as_str().to_owned(),
            detail: record.detail.clone(),
            attempts: 0,
            failed_at: record.failed_at.clone(),
        };
        let span = tracing::info_span!("publish", otel.kind = "producer", event = "SmsFailed");
        let published = self
            .events
            .publish_failed(&event, message.meta)
            .instrument(span)
            .await;
        if let Err(e) = published {
            return self.unpublished(&e, message.retry);
        }
        self.held_write(|| self.cache.mark_invalid_published(key))
            .await;
        self.unroutable_said
            .store(false, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("sms_failed_total", "reason" => reason.as_str()).increment(1);
        info!(reason = reason.as_str(), "invalid command");
        Outcome::Failed(reason_text)
    }
}

/// What the store answered, as the `claim` span says it.
fn claim_name(claim: &Claim) -> &'static str {
    match claim {
        Claim::Send {
            took_over: true, ..
        } => "send_took_over",
        Claim::Send { .. } => "send",
        Claim::PublishSent(_) => "publish_sent",
        Claim::PublishFailed(_) => "publish_failed",
        Claim::AlreadySent => "already_sent",
        Claim::AlreadyFailed(_) => "already_failed",
        Claim::Busy { .. } => "busy",
        Claim::Cancelling { .. } => "cancelling",
        Claim::Contended => "contended",
    }
}

/// Claims racing for the key: back after a short delay, marked as
/// returning (as a command waiting for a holder, no tier climbed), so it
/// then waits for whichever claim won instead of being taken for a
/// duplicate. The store answered: the instance goes on.
fn contended(message: &Inbound<'_>) -> Outcome {
    debug!("claims racing for the key; back shortly");
    let mut retry = message.retry.clone();
    retry.delays = retry.delays.max(1);
    Outcome::Delay {
        delay: PAST_THE_HOLDER,
        retry,
    }
}

/// What a claim that may send says of the key so far.
struct Counts {
    attempts: u32,
    first_attempt_ms: u64,
    takeovers: u32,
    took_over: bool,
}

/// A delivery that may be a crashed holder's own: redelivered by the
/// broker, or back from a delay tier.
fn returning(message: &Inbound<'_>) -> bool {
    message.redelivered || message.retry.delays > 0
}

/// A fresh retry state for a command handed to a delay tier once more.
pub(super) fn one_more_delay(retry: &RetryState) -> RetryState {
    let mut retry = retry.clone();
    retry.delays = retry.delays.saturating_add(1);
    retry
}

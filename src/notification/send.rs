//! Step 2: call the provider instances of the command's route until one
//! accepts or the message is rejected, the attempts or the age run out, or
//! the wait grows long enough to hand to the broker.
//!
//! Failover: a command goes to the first instance of its route whose
//! breaker is not open. It moves to the next one at once when the current
//! one refuses the route, and after the in-process attempts when the
//! current one failed without sending (transient, account problem). It
//! never moves after an ambiguous answer (the message may be out): it is
//! then pinned to that instance, through delay tiers too. With no instance
//! left, the command waits in the delay tiers.

use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn, Instrument};

use super::claim::one_more_delay;
use super::{now_ms, Attempt, Notifier, Route};
use crate::domain::{count_segments, rfc3339, FailureReason, SendSms};
use crate::ports::{Accepted, Outcome, ProviderError, RetryState, SentRecord};

/// The shortest postponement, so that a wait that ends in a millisecond
/// does not bring the command straight back.
const MIN_POSTPONE: Duration = Duration::from_millis(100);

/// A postponed command comes back this long past its `expiresAt`, if that
/// comes first, so that it is found expired.
pub(super) const PAST_EXPIRY: Duration = Duration::from_secs(1);

/// What to do after a failed call.
enum Next {
    /// The command has its outcome.
    Done(Outcome),
    /// Call the route's next provider now.
    FailOver,
    /// Try again, here or later, after this failure.
    Retry(String, Option<Duration>),
}

impl Notifier {
    /// Where a command starts: the instance its retry state is pinned to,
    /// or the first of its route whose breaker is not open.
    pub(super) fn route_for(&self, cmd: &SendSms, retry: &RetryState) -> Route {
        let candidates = self.providers.route(cmd.phone_number.as_str()).to_vec();
        let pinned = retry
            .pinned_provider
            .as_deref()
            .and_then(|name| self.providers.index_of(name))
            .filter(|i| candidates.contains(i));
        let current = pinned
            .or_else(|| {
                candidates
                    .iter()
                    .copied()
                    .find(|i| !self.providers.get(*i).guard.breaker.blocks())
            })
            .or(candidates.first().copied())
            .unwrap_or(0);
        Route {
            candidates,
            current,
            calls_here: 0,
            pinned: pinned.is_some(),
            left: Vec::new(),
        }
    }

    /// Pins the command to the instance `name` (the store says an earlier
    /// attempt had an ambiguous answer there), if its route has it.
    pub(super) fn pin_route(&self, a: &mut Attempt<'_>, name: &str) {
        match self
            .providers
            .index_of(name)
            .filter(|i| a.route.candidates.contains(i))
        {
            Some(index) => {
                a.route.current = index;
                a.route.pinned = true;
            }
            None => warn!(
                provider = name,
                "the key is pinned to a provider its route no longer has (settings changed): \
                 sending through the route, which may send it a second time"
            ),
        }
    }

    /// Sends under the claim in `a`, counting its calls there.
    pub(super) async fn send(&self, a: &mut Attempt<'_>) -> Outcome {
        let first_attempt_ms = a.retry.first_attempt_at_ms.unwrap_or_else(now_ms);
        loop {
            if let Some(outcome) = self.not_now(a, first_attempt_ms).await {
                return outcome;
            }
            // Checked before every call: a retry from a delay tier too.
            if a.cmd.expires_at.is_some_and(|at| at <= SystemTime::now()) {
                let mut detail = "expiresAt passed before it could be sent".to_owned();
                if let Some(pinned) = &a.retry.pinned_provider {
                    detail.push_str(&format!(
                        "; an earlier call to {pinned} was ambiguous and may have sent it"
                    ));
                }
                return self.fail(a, FailureReason::Expired, detail).await;
            }
            if let Some(wait) = self.quiet_hours_wait(a) {
                return self.hold_for(a, wait).await;
            }
            if let Some(outcome) = self.over_recipient_limit(a).await {
                return outcome;
            }
            let instance = self.providers.get(a.route.current);
            a.retry.attempts = a.retry.attempts.saturating_add(1);
            a.calls += 1;
            a.route.calls_here += 1;
            let started = Instant::now();
            // The adapter notes the HTTP status on it and sends its context
            // to the provider (`traceparent`).
            let span = tracing::info_span!(
                "provider_call",
                otel.kind = "client",
                provider = instance.sms.name(),
                attempt = i64::from(a.retry.attempts),
                class = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let call = instance.sms.send(a.cmd).instrument(span.clone());
            let result = self.renewing(a, call).await;
            instance
                .meters
                .seconds
                .record(started.elapsed().as_secs_f64());
            match &result {
                Ok(_) => span.record("class", "accepted"),
                Err(e) => span
                    .record("class", e.class())
                    .record("otel.status_code", "error"),
            };
            // The call ends here: recording and backoff are not part of it.
            drop(span);
            let error = match result {
                Ok(accepted) => return self.accepted(a, accepted).await,
                Err(error) => error,
            };
            match self.on_error(a, error).await {
                Next::Done(outcome) => return outcome,
                Next::FailOver => continue,
                Next::Retry(detail, retry_after) => {
                    if let Some(outcome) = self.after_failure(a, detail, retry_after).await {
                        return outcome;
                    }
                }
            }
        }
    }

    /// What a failed call means for the command, by its class (the
    /// breaker and the metrics learn of it here).
    async fn on_error(&self, a: &mut Attempt<'_>, error: ProviderError) -> Next {
        let instance = self.providers.get(a.route.current);
        let (name, breaker) = (instance.sms.name(), &instance.guard.breaker);
        instance.meters.outcome(error.class());
        let (detail, retry_after) = match error {
            ProviderError::Rejected {
                detail,
                invalid_number,
            } => {
                breaker.record_success();
                warn!(provider = name, %detail, attempts = a.retry.attempts, "provider rejected the message");
                let reason = if invalid_number {
                    FailureReason::InvalidPhoneNumber
                } else {
                    FailureReason::ProviderRejected
                };
                return Next::Done(self.fail(a, reason, detail).await);
            }
            ProviderError::RouteRefused { detail } => {
                breaker.record_success();
                warn!(provider = name, %detail, "provider cannot take this route");
                if self.fail_over(a) {
                    return Next::FailOver;
                }
                let detail =
                    format!("no provider of the route takes this destination; last: {detail}");
                return Next::Done(self.fail(a, FailureReason::ProviderRejected, detail).await);
            }
            ProviderError::Ambiguous {
                detail,
                retry_after,
            } => {
                breaker.record_failure();
                instance.meters.ambiguous_answers.increment(1);
                self.pin_here(a).await;
                (detail, retry_after)
            }
            ProviderError::Transient {
                detail,
                retry_after,
            } => {
                breaker.record_failure();
                (detail, retry_after)
            }
            ProviderError::Account { detail } => {
                breaker.trip(&detail);
                if self.fail_over(a) {
                    return Next::FailOver;
                }
                (detail, None)
            }
        };
        warn!(provider = name, %detail, attempts = a.retry.attempts, "provider call failed; will retry");
        Next::Retry(detail, retry_after)
    }

    /// The current instance's answer was ambiguous: the message may be out
    /// there, so from now on only this instance, for this delivery and
    /// (through the store) every later one, a duplicate's or a
    /// redelivery's too.
    async fn pin_here(&self, a: &mut Attempt<'_>) {
        if a.route.pinned {
            return;
        }
        a.route.pinned = true;
        let name = self.providers.get(a.route.current).sms.name();
        if let Err(e) = self.cache.pin(&a.cmd.idempotency_key, a.owner, name).await {
            warn!(error = %e, "cannot record the pin; the delay tier's header carries it");
        }
    }

    /// After a call that did not send (or may have): give up, go on to the
    /// next instance, hand over to a delay tier, or wait in process and
    /// try again (`None`).
    async fn after_failure(
        &self,
        a: &mut Attempt<'_>,
        detail: String,
        retry_after: Option<Duration>,
    ) -> Option<Outcome> {
        let policy = &self.settings.retry;
        if a.retry.attempts >= policy.max_attempts {
            let detail = format!("provider failed {} times; last: {detail}", a.retry.attempts);
            return Some(self.fail(a, FailureReason::RetriesExhausted, detail).await);
        }
        let wait = policy.delay(a.route.calls_here, retry_after);
        if a.route.calls_here >= policy.in_process_attempts || wait > policy.max_delay {
            if !a.route.pinned && self.fail_over(a) {
                return None;
            }
            let wait = policy.broker_delay(a.retry.delays, retry_after);
            return Some(self.hand_over(a, wait).await);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = a.inbound.stop.cancelled() => {}
        }
        None
    }

    /// Moves the command to the next instance of its route that is not
    /// left behind and whose breaker is not open; `false` if there is none
    /// (or the command is pinned).
    fn fail_over(&self, a: &mut Attempt<'_>) -> bool {
        if a.route.pinned {
            return false;
        }
        let from = a.route.current;
        a.route.left.push(from);
        let next =
            a.route.candidates.iter().copied().find(|i| {
                !a.route.left.contains(i) && !self.providers.get(*i).guard.breaker.blocks()
            });
        let Some(to) = next else {
            return false;
        };
        let (from, to_name) = (
            self.providers.get(from).sms.name(),
            self.providers.get(to).sms.name(),
        );
        info!(
            from,
            to = to_name,
            "failing over to the route's next provider"
        );
        metrics::counter!("sms_provider_failovers_total", "from" => from.to_owned(), "to" => to_name.to_owned())
            .increment(1);
        a.route.current = to;
        a.route.calls_here = 0;
        true
    }

    /// Why the next call is not to be made now, if it is not: the attempts
    /// or the age ran out, shutdown, no instance whose breaker lets a call
    /// through, or no rate-limit token for a retry (it goes to a delay tier
    /// rather than wait while holding the lease).
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
            self.release(a, a.retry.attempts).await;
            return Some(Outcome::HandBack);
        }
        if !self.still_owner(a).await {
            return Some(self.fenced());
        }
        let breaker = &self.providers.get(a.route.current).guard.breaker;
        if breaker.blocks() && !self.fail_over(a) {
            let wait = breaker.open_for().unwrap_or(policy.max_delay);
            debug!(
                ?wait,
                "no provider of the route lets a call through; delaying without a call"
            );
            return Some(self.hand_over(a, wait.max(Duration::from_secs(1))).await);
        }
        let guard = &self.providers.get(a.route.current).guard;
        if a.calls > 0 && !guard.retry_token() {
            let wait = policy.broker_delay(a.retry.delays, None);
            return Some(self.hand_over(a, wait).await);
        }
        None
    }

    /// The provider took the message: say so at once (a user with no
    /// subscriber bound learns it here), then record and publish.
    async fn accepted(&self, a: &mut Attempt<'_>, accepted: Accepted) -> Outcome {
        let instance = self.providers.get(a.route.current);
        instance.guard.breaker.record_success();
        instance.meters.outcome("accepted");
        instance.meters.accepted_messages.increment(1);
        info!(
            provider = instance.sms.name(),
            provider_message_id = %accepted.provider_message_id,
            attempts = a.retry.attempts,
            "provider accepted"
        );
        let record = SentRecord {
            provider: instance.sms.name().to_owned(),
            provider_message_id: accepted.provider_message_id,
            other_part_ids: accepted.other_part_ids,
            phone_number: a.cmd.phone_number.as_str().to_owned(),
            segments: accepted
                .segments
                .unwrap_or_else(|| count_segments(a.cmd.text.as_str()).1),
            attempts: a.retry.attempts,
            sent_at: rfc3339(SystemTime::now()),
            traceparent: crate::telemetry::trace_headers()
                .into_iter()
                .find_map(|(name, value)| (name == "traceparent").then_some(value)),
        };
        self.sent(a, record).await
    }

    /// Releases the lease (keeping the attempts) and asks for a delay tier,
    /// carrying the instance the command is pinned to, if it is.
    async fn hand_over(&self, a: &mut Attempt<'_>, delay: Duration) -> Outcome {
        self.release(a, a.retry.attempts).await;
        Outcome::Delay {
            delay,
            retry: one_more_delay(&self.carried_retry(a)),
        }
    }

    /// Hands the command to a delay tier for `wait` before any call under
    /// this claim (a per-recipient limit): see [`Notifier::forgo_claim`].
    /// It is marked returning without climbing a tier: waiting is no
    /// failure.
    pub(super) async fn postpone(&self, a: &mut Attempt<'_>, wait: Duration) -> Outcome {
        // Back from the delay tier it counts as returning: a lease left
        // behind by a failed release is waited out, never taken for a
        // duplicate's.
        let (delay, _released) = self.forgo_claim(a, wait).await;
        let mut retry = self.carried_retry(a);
        retry.delays = retry.delays.max(1);
        if retry.attempts == 0 {
            retry.first_attempt_at_ms = None;
        }
        Outcome::Delay { delay, retry }
    }

    /// Parks the command in the broker for `wait` before any call under
    /// this claim (quiet hours): see [`Notifier::forgo_claim`].
    /// A lease that could not be released is not left behind a hold: a
    /// command back from the hold queues is not a returning one, and
    /// would take that lease for a live holder's and be acked as a
    /// duplicate. It is requeued instead (the store is away).
    pub(super) async fn hold_for(&self, a: &mut Attempt<'_>, wait: Duration) -> Outcome {
        match self.forgo_claim(a, wait).await {
            (wait, true) => Outcome::Hold {
                until: SystemTime::now() + wait,
            },
            (_, false) => Outcome::StoreUnavailable,
        }
    }

    /// Releases the lease as if this claim had not been made (no attempt;
    /// for a key that never made a call, no age either), and says how long
    /// the command is to wait: `wait`, at least [`MIN_POSTPONE`], but no
    /// longer than until just past its `expiresAt`, so that it comes back
    /// then and fails as expired; and whether the lease was released.
    async fn forgo_claim(&self, a: &Attempt<'_>, wait: Duration) -> (Duration, bool) {
        let key = &a.cmd.idempotency_key;
        let released = match self.cache.postpone(key, a.owner, a.retry.attempts).await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "could not release the lease; it will expire");
                false
            }
        };
        let mut wait = wait.max(MIN_POSTPONE);
        if let Some(expires_at) = a.cmd.expires_at {
            let left = expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            wait = wait.min(left + PAST_EXPIRY);
        }
        (wait, released)
    }

    /// The retry state a command takes to a delay tier: its own, pinned
    /// to the instance its route is pinned to, if it is.
    pub(super) fn carried_retry(&self, a: &Attempt<'_>) -> RetryState {
        let mut retry = a.retry.clone();
        retry.pinned_provider = a
            .route
            .pinned
            .then(|| self.providers.get(a.route.current).sms.name().to_owned());
        retry
    }
}

//! The core decision for one command, and the order of side effects that
//! makes it correct. One file per step:
//!
//! 0. **hold** ([`schedule`]) a command whose `sendAt` is ahead: its key
//!    recorded as `scheduled`, it is parked in the broker until it is due
//!    ([`Outcome::Hold`]), before any slot, token or claim.
//! 1. **claim** ([`claim`]) the key in the idempotency store: an atomic
//!    compare-and-set that either grants a lease, or says the key is done,
//!    or that a live holder has it. No provider call happens without a
//!    granted lease. The claim counts the call about to be made and keeps
//!    the key's first attempt time, so `max_attempts` and `max_age` hold
//!    across crashes; it counts every takeover of a lease whose holder died
//!    or ran out of time, and a key taken over more than `max_takeovers`
//!    times is poison (dead-lettered).
//! 2. **hold or limit**: before the first provider call under the claim, a
//!    `normal` or `bulk` message to a recipient in quiet hours ([`quiet`])
//!    is held in the broker until they end; then the message is counted
//!    against its recipient's limits ([`limits`], once per key) and, over
//!    one, fails (`recipient_rate_limited`) or waits, by its priority's
//!    action. A wait releases the lease and counts no attempt.
//!
//!    **send** ([`send`]) through the provider (the text smart-encoded
//!    when `encoding.smart` is on: [`crate::domain::Smart`]; the claim
//!    keeps the received command's fingerprint), passing the key as
//!    `Idempotency-Key`, retrying transient failures a few times in process
//!    (exponential backoff with full jitter, `Retry-After` honoured; see
//!    [`retry`]) within the limits of the [`guard`]. Longer waits go to the
//!    broker: the lease is released (state `retrying`, attempts kept) and
//!    the command is handed to a delay tier ([`Outcome::Delay`]).
//! 3. **record** ([`record`]) the outcome (`sent` with the provider's id, or
//!    `failed`), fenced by the lease: only the claim that holds the key
//!    writes. A write the store cannot take is retried, with backoff, for
//!    as long as the store is away; the delivery is kept meanwhile, and the
//!    instance takes no new work until every held record is written.
//! 4. **publish** ([`publish`]) SmsSent or SmsFailed and wait for the
//!    broker's confirm.
//! 5. **mark published**, ending the lease (retried like a record).
//!
//! Only then does the processing loop acknowledge the command. The lease
//! is renewed while a provider call or a confirm is slow, so a live owner
//! keeps it. A crash at any point leaves the command in the queue; its
//! redelivery finds the key's state and resumes from it: before 3 it waits
//! until the dead holder's liveness record has expired (seconds) and sends
//! (the one duplicate window: the provider accepted but 3 did not happen);
//! between 3 and 5 it publishes the recorded event without calling the
//! provider; after 5 it is a duplicate and is acknowledged.
//!
//! A holder that lost its lease (it paused for longer than its liveness
//! record lasts, and another instance took the key over) finds its record
//! refused: it publishes nothing, and the key's event comes from the
//! holder that recorded it.
//!
//! A duplicate command (neither a redelivery nor back from a delay tier)
//! that finds the key leased is acknowledged at once: the holder's delivery
//! is still in the broker's hands and will reach an outcome. A redelivered
//! or returning command that finds the key leased may be the holder's own
//! delivery after a crash, so it is delayed until the holder is known dead
//! or its lease has run out.

mod claim;
mod guard;
mod limits;
mod providers;
mod publish;
mod quiet;
mod record;
mod retry;
mod schedule;
mod send;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::concurrency::AdaptiveLimit;
use crate::domain::{CommandError, SendSms};
use crate::ports::{CacheService, EventBus, Inbound, NotificationService, Outcome, Owner};

pub use guard::ProviderGuard;
pub use limits::RecipientLimits;
pub use providers::{ProviderInstance, Providers};
pub use retry::RetryPolicy;

/// What the notification step is told by the configuration.
#[derive(Debug, Clone)]
pub struct NotifierSettings {
    pub retry: RetryPolicy,
    /// Larger bodies are dead-lettered unread.
    pub max_body_bytes: usize,
    /// Takeovers of a key's lease (deliveries that never reached an
    /// outcome) before the command is dead-lettered as poison.
    pub max_takeovers: u32,
    /// How long a claim's lease lasts; it is renewed every third of it
    /// while a provider call or a confirm is still running.
    pub lease: Duration,
    /// How long this instance's liveness record lasts; the heartbeat writes
    /// it every third of that.
    pub liveness_ttl: Duration,
    /// Send texts smart-encoded (`encoding.smart`): GSM-7 look-alikes
    /// replaced where that saves parts ([`crate::domain::Smart`]).
    pub smart_encoding: bool,
    /// Per-recipient limits, checked before a command's first call.
    pub limits: RecipientLimits,
    /// Quiet hours in the recipient's local time; `None`: off.
    pub quiet_hours: Option<crate::domain::QuietHours>,
}

/// Handles of the metrics recorded for every command, registered once
/// (the macros look their key up on each call). Make the notifier after
/// installing the recorder, or these record nowhere.
struct Meters {
    received: metrics::Counter,
    sent: metrics::Counter,
    duplicates: metrics::Counter,
    fenced: metrics::Counter,
    takeovers: metrics::Counter,
    store_write_failures: metrics::Counter,
    /// By [`crate::domain::LimitAction`], in the order of its `ALL`.
    recipient_limited: [metrics::Counter; 2],
    quiet_hours_held: metrics::Counter,
}

impl Meters {
    fn new() -> Self {
        Self {
            received: metrics::counter!("sms_commands_received_total"),
            sent: metrics::counter!("sms_sent_total"),
            duplicates: metrics::counter!("sms_duplicates_total"),
            fenced: metrics::counter!("sms_records_fenced_total"),
            takeovers: metrics::counter!("sms_lease_takeovers_total"),
            store_write_failures: metrics::counter!("sms_store_write_failures_total"),
            recipient_limited: crate::domain::LimitAction::ALL.map(
                |action| metrics::counter!("sms_recipient_limited_total", "action" => action.as_str()),
            ),
            quiet_hours_held: metrics::counter!("sms_quiet_hours_held_total"),
        }
    }

    fn recipient_limited(&self, action: crate::domain::LimitAction) -> &metrics::Counter {
        let i = crate::domain::LimitAction::ALL
            .iter()
            .position(|a| *a == action)
            .expect("ALL lists every action");
        &self.recipient_limited[i]
    }
}

/// The notification step over its ports.
pub struct Notifier {
    cache: Arc<dyn CacheService>,
    providers: Providers,
    events: Arc<dyn EventBus>,
    /// Commands in their send phase at once; `None` for no limit.
    sends: Option<AdaptiveLimit>,
    settings: NotifierSettings,
    /// This instance in the store's liveness records and lease owners.
    instance: String,
    /// Makes each claim's lease owner unique across attempts.
    claims: AtomicU64,
    /// Outcomes of provider calls not yet written to the store: while any
    /// is held, the instance takes no new work.
    held: AtomicUsize,
    /// "No queue is bound" was logged, and no event went through since.
    unroutable_said: AtomicBool,
    meters: Meters,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// One command being worked on under one claim.
struct Attempt<'a> {
    cmd: &'a SendSms,
    owner: &'a Owner,
    inbound: &'a Inbound<'a>,
    retry: crate::ports::RetryState,
    /// Provider calls made under this claim.
    calls: u32,
    /// When the store last confirmed this claim holds the key (the claim,
    /// a record, a renewal): a step that finds it long ago (the process
    /// paused) checks again before it acts.
    owned_at: tokio::time::Instant,
    /// Where the next call goes.
    route: Route,
}

/// The provider instances one command may go to, and where it stands.
#[derive(Debug, Clone)]
struct Route {
    /// Instance indices, in order of preference.
    candidates: Vec<usize>,
    /// The instance of the next call.
    current: usize,
    /// Calls made at `current` under this claim.
    calls_here: u32,
    /// An ambiguous answer came from `current` (now or before a delay
    /// tier): it may have sent the message, so no other is tried.
    pinned: bool,
    /// Instances that refused the route, or failed without sending and
    /// were left for the next.
    left: Vec<usize>,
}

impl Notifier {
    pub fn new(
        cache: Arc<dyn CacheService>,
        providers: Providers,
        events: Arc<dyn EventBus>,
        settings: NotifierSettings,
    ) -> Self {
        Self {
            cache,
            providers,
            events,
            sends: None,
            settings,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            claims: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            unroutable_said: AtomicBool::new(false),
            meters: Meters::new(),
        }
    }

    /// Limits the commands in their send phase at once.
    pub fn with_send_limit(mut self, sends: AdaptiveLimit) -> Self {
        self.sends = Some(sends);
        self
    }

    /// Every provider instance's breaker (the processing loop takes work
    /// while any admits it).
    pub fn breakers(&self) -> Vec<Arc<crate::breaker::CircuitBreaker>> {
        self.providers.breakers()
    }

    /// This instance's name in the store.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn next_owner(&self) -> Owner {
        Owner::new(&self.instance, self.claims.fetch_add(1, Ordering::Relaxed))
    }

    /// Writes this instance's liveness record every third of its TTL until
    /// `stop`, then deletes it, so that whatever the instance leaves
    /// leased is taken over a liveness TTL later (not after the lease). Run it once per instance, and fire
    /// `stop` only after processing has stopped.
    pub async fn keep_alive(&self, stop: CancellationToken) {
        let ttl = self.settings.liveness_ttl;
        let mut beat = tokio::time::interval(ttl / 3);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = beat.tick() => {}
            }
            // Bounded by a beat: a slow store must not let the record lapse
            // while the next beat waits behind this one.
            match tokio::time::timeout(ttl / 3, self.cache.heartbeat(&self.instance, ttl)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "cannot write this instance's liveness record"),
                Err(_) => debug!("liveness record: no answer within a beat"),
            }
        }
        if let Err(e) = self.cache.retire(&self.instance).await {
            warn!(error = %e, "cannot delete this instance's liveness record; it expires");
        }
    }
}

#[async_trait]
impl NotificationService for Notifier {
    /// Runs in the command's `consume` span (the processing loop opens it),
    /// and records the key and the masked number on it.
    async fn handle(&self, message: Inbound<'_>) -> Outcome {
        self.meters.received.increment(1);
        if message.body.len() > self.settings.max_body_bytes {
            warn!(bytes = message.body.len(), "command body too large");
            return Outcome::DeadLetter(format!(
                "malformed: body larger than {} bytes",
                self.settings.max_body_bytes
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
                self.process(&cmd, &message).await
            }
            Err(CommandError::Malformed(detail)) => {
                warn!(%detail, "malformed command");
                Outcome::DeadLetter(format!("malformed: {detail}"))
            }
            Err(invalid) => self.reject_invalid(invalid, &message).await,
        }
    }

    fn holding(&self) -> bool {
        self.held.load(Ordering::SeqCst) > 0
    }

    async fn ready(&self) -> bool {
        // The heartbeat is the probe: a write (a replica or a full server
        // refuses it), and after an outage it makes this instance's leases
        // count as alive again before it takes new work.
        self.held.load(Ordering::SeqCst) == 0
            && self
                .cache
                .heartbeat(&self.instance, self.settings.liveness_ttl)
                .await
                .is_ok()
    }
}

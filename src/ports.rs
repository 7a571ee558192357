//! The ports: what the core needs from the world, as traits. Adapters in
//! [`crate::adapters`] implement them over RabbitMQ, Redis and HTTP; tests
//! implement them in memory. Every error says whether trying again can help,
//! so retry code reads a classification, never a message string.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::domain::{
    DeliveryReport, DeliveryStatus, FailureReason, IdempotencyKey, Priority, RateWindow, SendSms,
    SmsFailed, SmsSent,
};

/// Context carried from a command onto its events and into the logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMeta {
    /// The AMQP `correlation_id` of the command.
    pub correlation_id: Option<String>,
    /// The W3C `traceparent` header of the command: its producer's span,
    /// the parent of the command's trace here.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` header that came with `traceparent`.
    pub tracestate: Option<String>,
}

// ---------------------------------------------------------------- queue

/// A broker failure. All of them are transient: the broker restarts, the
/// connection comes back, and the command is still in its queue.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker did not confirm the publish: {0}")]
    NotConfirmed(String),
    #[error("message returned unroutable by {0}: no queue is bound to it")]
    Unroutable(String),
    /// The broker holds a queue declared otherwise than configured (its
    /// type, most often): no retry can help, the operator must act.
    #[error("the broker's queues conflict with the configuration: {0}")]
    Conflict(String),
}

/// Which of the two command queues: the command queue (`sms.send`), or the
/// high queue beside it (`sms.send.high`) that `priority: high` commands
/// go to. Each is consumed with capacity of its own, so a high command
/// never waits behind the command queue's backlog. The lane decides
/// capacity only: what a command's `priority` field means otherwise, the
/// field decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Normal,
    High,
}

impl Lane {
    pub const ALL: [Self; 2] = [Self::Normal, Self::High];

    /// The lane a command of `priority` is published to: `high` to the
    /// high queue, `normal` and `bulk` to the command queue.
    pub fn of(priority: Priority) -> Self {
        match priority {
            Priority::High => Self::High,
            Priority::Normal | Priority::Bulk => Self::Normal,
        }
    }

    /// `normal` or `high`, as logs and metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::High => "high",
        }
    }

    /// A position per lane, for per-lane state kept in arrays.
    pub fn index(self) -> usize {
        match self {
            Self::Normal => 0,
            Self::High => 1,
        }
    }
}

/// Retry bookkeeping a command carries through delay tiers, in headers of
/// the service's own (never the broker's `x-death` counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryState {
    /// Provider calls made for this command so far.
    pub attempts: u32,
    /// Times it was handed to a delay tier; picks the next tier.
    pub delays: u32,
    /// When its first provider call was made (ms since the Unix epoch).
    pub first_attempt_at_ms: Option<u64>,
    /// The provider instance an ambiguous answer came from: the command
    /// may have been sent there, so it is retried there only.
    pub pinned_provider: Option<String>,
}

/// One command delivered from the queue, with the handle that settles it.
pub struct InboundMessage {
    pub body: Vec<u8>,
    /// The broker delivered this message before (it was requeued or its
    /// consumer died), so a lease on its key may be this command's own.
    pub redelivered: bool,
    pub meta: EventMeta,
    pub retry: RetryState,
    pub handle: Box<dyn DeliveryHandle>,
}

/// Settles one delivery. Exactly one of these is called, once.
#[async_trait]
pub trait DeliveryHandle: Send + Sync {
    /// Acknowledges the delivery; the command is done.
    async fn ack(&mut self) -> Result<(), QueueError>;
    /// Hands the delivery back to the queue for another attempt.
    async fn requeue(&mut self) -> Result<(), QueueError>;
    /// Publishes the body unchanged, with its headers and an `x-sms-error`
    /// reason, to the dead-letter queue (with confirm), then acknowledges.
    async fn dead_letter(&mut self, body: &[u8], reason: &str) -> Result<(), QueueError>;
    /// Publishes the body unchanged, with its headers and `retry`, to a
    /// delay tier that returns it to the queue it came from after about `delay`
    /// (with confirm), then acknowledges.
    async fn delay(
        &mut self,
        body: &[u8],
        delay: Duration,
        retry: &RetryState,
    ) -> Result<(), QueueError>;
    /// Parks the body unchanged, with its headers, durably in the broker
    /// (with confirm), then acknowledges: it comes back to the queue it was
    /// delivered from no later than about a second after `until` (sooner
    /// when `until` is further off than the longest wait the broker keeps
    /// in one go), to be examined again. Counts no attempt and no retry;
    /// the caller decides on its return whether it is due, so a hold is
    /// never early. Nothing of it stays in the process.
    async fn hold(&mut self, body: &[u8], until: SystemTime) -> Result<(), QueueError>;
}

/// A subscription to one of the command queues.
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery; `None` when the broker ended the subscription.
    async fn next(&mut self) -> Option<Result<InboundMessage, QueueError>>;
    /// Stops the broker from delivering more; what was delivered stays ours
    /// to settle.
    async fn cancel(&mut self);
    /// Ends the subscription; whatever is still unsettled goes back to the
    /// queue.
    async fn close(&mut self);
}

/// The command queues: the command queue and the high queue.
#[async_trait]
pub trait QueueClient: Send + Sync {
    /// Subscribes to `lane`'s queue, (re)connecting and declaring the
    /// topology first if needed.
    async fn consume(&self, lane: Lane) -> Result<Box<dyn DeliveryStream>, QueueError>;
    /// Publishes one command body to `lane`'s queue, with confirm.
    async fn publish_command(
        &self,
        body: &[u8],
        meta: &EventMeta,
        lane: Lane,
    ) -> Result<(), QueueError>;
    /// Whether the broker connection is up.
    fn is_connected(&self) -> bool;
    /// Closes the connection; unsettled deliveries go back to the queue.
    async fn close(&self);
}

/// Where events go. Each call returns only once the broker confirmed it.
#[async_trait]
pub trait EventBus: Send + Sync {
    async fn publish_sent(&self, event: &SmsSent, meta: &EventMeta) -> Result<(), QueueError>;
    async fn publish_failed(&self, event: &SmsFailed, meta: &EventMeta) -> Result<(), QueueError>;
    async fn publish_delivery(&self, report: &DeliveryReport) -> Result<(), QueueError>;
}

// ---------------------------------------------------------------- provider

/// What the provider said when it accepted a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    pub provider_message_id: String,
    /// Parts the provider counted, where its answer says (else the service
    /// counts them itself).
    pub segments: Option<u32>,
    /// The ids of the other parts, where the provider gives each part an
    /// id of its own and reports on each (Vonage): the message is
    /// delivered only once every part is.
    pub other_part_ids: Vec<String>,
}

/// A provider call that did not end in acceptance, classified from the
/// provider's documented answers (see each adapter's module doc). The core
/// decides from the class alone: retry, fail over, or fail.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// Not sent, and worth trying again: connect refused, DNS failure,
    /// throttling (429 and the provider's own throttling codes), 503. May
    /// fail over to the route's next provider after the in-process attempts.
    #[error("transient provider failure: {detail}")]
    Transient {
        detail: String,
        /// The provider asked us to wait this long (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The provider may have sent it: a timeout after the request was
    /// written, 500/502/504. Retried at the same provider only, never
    /// failed over.
    #[error("ambiguous provider answer (it may have sent the message): {detail}")]
    Ambiguous {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// This provider cannot reach this destination or use this sender:
    /// fail over to the route's next provider at once.
    #[error("provider cannot take this route: {detail}")]
    RouteRefused { detail: String },
    /// The message itself is bad (invalid number, opted out, blacklisted):
    /// SmsFailed, no failover.
    #[error("provider rejected the message: {detail}")]
    Rejected {
        detail: String,
        /// The provider says the number is invalid (`invalid_phone_number`
        /// rather than `provider_rejected`).
        invalid_number: bool,
    },
    /// Bad credentials, insufficient balance: transient for the command
    /// (it waits in the delay tiers or fails over), opens the provider's
    /// breaker, logged at error once per change.
    #[error("provider account problem: {detail}")]
    Account { detail: String },
}

impl ProviderError {
    /// A permanent rejection of the message itself.
    pub fn rejected(detail: impl Into<String>) -> Self {
        Self::Rejected {
            detail: detail.into(),
            invalid_number: false,
        }
    }

    /// Not sent, worth trying again, without a `Retry-After`.
    pub fn transient(detail: impl Into<String>) -> Self {
        Self::Transient {
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The class's name, as metrics and logs say it.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Ambiguous { .. } => "ambiguous",
            Self::RouteRefused { .. } => "route_refused",
            Self::Rejected { .. } => "rejected",
            Self::Account { .. } => "account",
        }
    }
}

/// One configured provider instance (an SMS provider's API with one set of
/// credentials).
#[async_trait]
pub trait SmsService: Send + Sync {
    /// The instance's name, as it appears in SmsSent's `provider`.
    fn name(&self) -> &str;
    /// Sends one message, passing its idempotency key to the provider where
    /// the provider takes one.
    async fn send(&self, sms: &SendSms) -> Result<Accepted, ProviderError>;
    /// Authenticates a delivery-report callback the provider's own way and
    /// reads the reports it carries (several, for a provider that batches
    /// them), each normalized. Pure: no I/O. The default takes none.
    fn read_callback(
        &self,
        request: &CallbackRequest<'_>,
    ) -> Result<Vec<ProviderReport>, CallbackError> {
        let _ = request;
        Err(CallbackError::NotHere(format!(
            "provider instance {} takes no callbacks",
            self.name()
        )))
    }
}

// ---------------------------------------------------------------- callbacks

/// A provider's callback as it reached the service, for the provider's
/// adapter to authenticate and read.
#[derive(Debug, Clone, Copy)]
pub struct CallbackRequest<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// The URL as the provider called it: `http.public_url` joined with the
    /// path and query the service received (signatures cover it).
    pub url: &'a str,
    /// The path token of `/v1/callbacks/{instance}/{token}`, if the
    /// provider called that form.
    pub token: Option<&'a str>,
    /// The raw query string, empty when there is none.
    pub query: &'a str,
    /// The request's headers, names in lower case.
    pub headers: &'a [(String, String)],
    /// The raw body (bounded by `http.max_body_bytes`).
    pub body: &'a [u8],
    pub now: SystemTime,
}

impl CallbackRequest<'_> {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One report of a callback, read by the provider's adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReport {
    /// The id the provider gave the message (or the part) on acceptance.
    pub provider_message_id: String,
    /// The provider's status, normalized.
    pub status: DeliveryStatus,
    /// The provider's own word for it, as it sent it.
    pub provider_status: String,
    pub error_code: Option<String>,
    /// The provider says a new attempt cannot help.
    pub permanent: bool,
}

/// Why a callback was refused, each with its HTTP answer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CallbackError {
    /// 401: its signature is missing, wrong or stale.
    #[error("callback not authenticated: {0}")]
    Unauthenticated(String),
    /// 403: the path token is missing or wrong.
    #[error("wrong callback token")]
    WrongToken,
    /// 400: not this provider's callback format.
    #[error("malformed callback: {0}")]
    Malformed(String),
    /// 404: this instance takes no callbacks (in this form).
    #[error("{0}")]
    NotHere(String),
}

impl CallbackError {
    /// Every [`CallbackError::code`], as metrics label them.
    pub const CODES: [&'static str; 4] = [
        "bad_signature",
        "wrong_token",
        "invalid_report",
        "no_callbacks",
    ];

    /// The error code of the answer, and of `sms_callbacks_refused_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => Self::CODES[0],
            Self::WrongToken => Self::CODES[1],
            Self::Malformed(_) => Self::CODES[2],
            Self::NotHere(_) => Self::CODES[3],
        }
    }
}

// ---------------------------------------------------------------- cache

/// The idempotency store is unreachable or answered nonsense. Transient:
/// the service never sends without its idempotency check.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("idempotency store unavailable: {0}")]
pub struct CacheError(pub String);

/// What was recorded when the provider accepted a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    pub provider: String,
    pub provider_message_id: String,
    /// Ids of the message's other parts (see [`Accepted::other_part_ids`]).
    pub other_part_ids: Vec<String>,
    /// The destination, for the message's delivery reports.
    pub phone_number: String,
    pub segments: u32,
    pub attempts: u32,
    pub sent_at: String,
    /// The W3C `traceparent` of the span that sent it, when its trace was
    /// recorded: the span of a callback that reports on it links to it.
    pub traceparent: Option<String>,
}

/// What was recorded when a key failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecord {
    pub reason: FailureReason,
    pub detail: String,
    pub attempts: u32,
    pub failed_at: String,
}

/// Who works on a key: a live instance and one claim of it. The instance
/// keeps a liveness record in the store (see [`CacheService::heartbeat`]);
/// a lease whose instance has no liveness record can be taken over at once,
/// without waiting for the lease to run out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The instance, as in its liveness record (no `-` in it).
    pub instance: String,
    /// Unique per claim: `{instance}-{n}`. Records are fenced by it.
    pub id: String,
}

impl Owner {
    pub fn new(instance: &str, claim: u64) -> Self {
        Self {
            instance: instance.to_owned(),
            id: format!("{instance}-{claim}"),
        }
    }

    /// The owner of the `n`-th cancel of `instance` (a front door), which
    /// holds a cancelled key while it publishes its SmsFailed: never the
    /// id of a claim.
    pub fn cancel(instance: &str, n: u64) -> Self {
        Self {
            instance: instance.to_owned(),
            id: format!("{instance}-cancel{n}"),
        }
    }
}

/// The answer to "may I work on this key?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// New, handed back, or its earlier holder's lease ran out or its
    /// holder is dead: the caller now holds the lease and must send.
    Send {
        /// Provider calls made before this claim. The claim itself counts
        /// one more in the store (the call about to be made), so a crash
        /// during that call still counts; `release` and the records write
        /// the true number.
        attempts: u32,
        /// When the key's first claim that could send was made (ms since
        /// the Unix epoch, the store's clock), kept across crashes.
        first_attempt_ms: u64,
        /// Leases taken over from another holder (expired or dead), ever:
        /// each one is a delivery that never reached an outcome.
        takeovers: u32,
        /// This claim is one of them.
        took_over: bool,
        /// The provider instance an ambiguous answer came from in an
        /// earlier attempt: the key may be out there, so it goes there only.
        pinned: Option<String>,
    },
    /// Sent before but its SmsSent not confirmed: the caller holds the lease
    /// and must publish it, without calling the provider.
    PublishSent(SentRecord),
    /// Failed before but its SmsFailed not confirmed: publish it.
    PublishFailed(FailedRecord),
    /// Sent and its event published: nothing to do.
    AlreadySent,
    /// Failed and its event published.
    AlreadyFailed(FailedRecord),
    /// A live holder has the lease for `lease_left` yet; if the holder
    /// stops heart-beating it is free after `holder_alive_for` at most.
    Busy {
        lease_left: Duration,
        holder_alive_for: Duration,
    },
    /// Cancelled, and its SmsFailed is being published by whoever holds
    /// it (the cancel, at a front door): come back once that is over, in
    /// `retry_in` at most, to find it published (or free to publish).
    Cancelling { retry_in: Duration },
    /// Claims racing for the key (Redis Cluster): its holder changed at
    /// every look at the holder's liveness. The store is fine: come back
    /// shortly, this command only.
    Contended,
}

/// What the store says to a cancel (see [`CacheService::cancel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelVerdict {
    /// Cancelled (now, or before with its SmsFailed not out and nobody
    /// publishing it), and the store knows the number: the caller holds
    /// the key and publishes the SmsFailed of `record`, then marks it
    /// published, or releases the key if the broker did not take it.
    Publish {
        record: FailedRecord,
        phone_number: String,
    },
    /// Cancelled, now or before. Its SmsFailed is out, or is published by
    /// the command when it next arrives. `known`: the store knew the key
    /// before this cancel (else nothing was seen of it yet).
    Cancelled { known: bool },
    /// Sent, being sent, perhaps sent (an ambiguous call), or failed: too
    /// late to cancel; nothing changed.
    TooLate,
}

/// What a record (or a lease renewal) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Written: the caller still held the lease.
    Written,
    /// Written, and delivery reports that came before it (parked) moved
    /// the message to a final status: its SmsDeliveryReport is to be
    /// published after SmsSent (see [`CacheService::pending_report`]).
    WrittenReported,
    /// Refused and nothing changed: another owner holds the key now, or
    /// recorded an outcome first. That owner publishes the key's event;
    /// the caller publishes nothing.
    Fenced,
}

/// A key's state as the status API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageStatus {
    /// `scheduled`, `processing`, `sent`, `failed`, or the final delivery
    /// status (`delivered`, `undelivered`, `rejected`, `expired`, `unknown`).
    pub status: String,
    /// When a scheduled message is due (its `sendAt`), once the service
    /// has held it.
    pub send_at: Option<String>,
    pub provider_message_id: Option<String>,
    pub attempts: u32,
    pub updated_at: String,
    /// For `failed`: the SmsFailed reason and detail.
    pub reason: Option<String>,
    pub detail: Option<String>,
    /// The provider instance that accepted it.
    pub provider: Option<String>,
    /// The last status a delivery report moved it to.
    pub delivery_status: Option<DeliveryStatus>,
    /// Every distinct report received, oldest first (capped).
    pub history: Vec<HistoryEntry>,
}

/// One delivery report as the status API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub status: DeliveryStatus,
    pub provider_status: String,
    pub error_code: Option<String>,
    pub at: String,
}

/// What recording a delivery report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// It moved the message to a final status whose SmsDeliveryReport is
    /// not confirmed yet (this report, or a repeat of the one that did):
    /// publish it, then [`CacheService::mark_report_published`].
    Publish {
        report: DeliveryReport,
        /// The send's `traceparent` ([`SentRecord::traceparent`]).
        send_trace: Option<String>,
    },
    /// A repeat, a step back, a change to a final status, or a step that
    /// ends nothing (`sent`): kept in the history where new, no event.
    Unchanged,
    /// No message is recorded under this provider id yet: the report is
    /// kept and applied when the send is recorded.
    Parked,
    /// No message is recorded under this provider id, and the report was
    /// not kept (no park TTL given, or the message expired).
    Unmatched,
}

/// What the store says when a command is submitted at a front door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// New: recorded as `processing` from now on, before it is queued.
    New,
    /// Known with the same payload (or one the store has no fingerprint
    /// of): queue it again, it is a harmless duplicate.
    Same,
    /// Known with a different payload: refused, as Stripe refuses a reused
    /// idempotency key.
    Conflict,
}

/// What the store says of a command held until its `sendAt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// New (or admitted, or scheduled before): recorded as `scheduled`
    /// until it is due; hold it.
    Held,
    /// The key is known otherwise (in work, sent, failed, cancelled): the
    /// claim decides, as for any command.
    Known,
}

/// What the store says of an invalid command with a usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidVerdict {
    /// First word of this key: recorded as `failed`; publish its SmsFailed.
    Recorded,
    /// Recorded as an invalid command before, its SmsFailed not yet
    /// confirmed: the delivery that recorded it publishes it (a returning
    /// one does now; a fresh copy is a duplicate).
    Unpublished,
    /// The key is known otherwise (sent, in work, or its SmsFailed is out):
    /// a bad duplicate, no event.
    Known,
}

/// What counting a message against its recipient's limits found (see
/// [`CacheService::record_recipient_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientSend {
    /// Under every limit: counted now.
    Counted,
    /// This key was counted already (a retry, a redelivery, a duplicate):
    /// it goes, and is not counted again.
    CountedBefore,
    /// Over a limit: not counted. The windows let one more through in
    /// `retry_after` at the earliest.
    Limited { retry_after: Duration },
}

/// The idempotency and status store: per key, an atomic state machine
/// `processing -> sent | failed` (and, from delivery reports, a final
/// delivery status beside `sent`), with a lease held by whoever works on the key and a
/// flag for "its event is published". Every implementation passes the
/// store contract in `crate::testing::store_contract`.
#[async_trait]
pub trait CacheService: Send + Sync {
    /// Claims `key` for `owner`, atomically; see [`Claim`]. A claim by the
    /// owner that already holds the lease (a retry after a lost reply) is
    /// granted again. Every granted claim refreshes the key's TTL.
    /// `fingerprint` identifies the command's payload; it is kept for the
    /// front doors' conflict check when the key is new.
    async fn claim(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        fingerprint: &str,
    ) -> Result<Claim, CacheError>;
    /// Remembers, while `owner` holds the key, that `provider` gave an
    /// ambiguous answer for it: every later claim that may send is pinned
    /// to that provider.
    async fn pin(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        provider: &str,
    ) -> Result<(), CacheError>;
    /// Extends `owner`'s lease by the full lease time; [`Recorded::Fenced`]
    /// if the owner no longer holds it.
    async fn renew(&self, key: &IdempotencyKey, owner: &Owner) -> Result<Recorded, CacheError>;
    /// Records that the provider accepted `key`, only if `owner` still
    /// holds the lease and no outcome is recorded by another (keeps the
    /// lease; the event is not published yet). Delivery reports parked
    /// for its provider ids are applied with it
    /// ([`Recorded::WrittenReported`] when they end its lifecycle).
    async fn record_sent(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        record: &SentRecord,
    ) -> Result<Recorded, CacheError>;
    /// Records that `key` failed for good, fenced as
    /// [`CacheService::record_sent`].
    async fn record_failed(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        record: &FailedRecord,
    ) -> Result<Recorded, CacheError>;
    /// Marks the key's event as published (a published key is done for
    /// every claim): only by the owner that recorded the outcome or claimed
    /// it for publishing, only for a key with an outcome; idempotent.
    async fn mark_published(&self, key: &IdempotencyKey, owner: &Owner) -> Result<(), CacheError>;
    /// Marks the SmsFailed of an invalid command as published, only while
    /// the key still holds that invalid command's record.
    async fn mark_invalid_published(&self, key: &IdempotencyKey) -> Result<(), CacheError>;
    /// Releases `owner`'s lease without an outcome, writing the attempts
    /// actually made; nothing if `owner` does not hold it. With `pinned`,
    /// the provider an ambiguous answer came from is recorded in the same
    /// step (as [`CacheService::pin`] does): a key handed to a delay tier
    /// after an ambiguous call is never left unpinned, which would let a
    /// cancel answer "cancelled" for a message that may be out, even when
    /// the separate pin write failed.
    async fn release(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
        pinned: Option<&str>,
    ) -> Result<(), CacheError>;
    /// Releases `owner`'s lease on a key whose claim made no provider call
    /// and must wait (a per-recipient limit): as [`CacheService::release`],
    /// and a key that never made a call (`attempts` 0) also forgets when
    /// its first claim was, so the wait does not count in `retry.max_age`.
    async fn postpone(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
    ) -> Result<(), CacheError>;
    /// Counts one message of `key` to `recipient` against every window of
    /// `windows` (sliding, by the store's clock), atomically: counted only
    /// if under all of them, never twice for one key while that key's
    /// count is inside the longest window. The recipient's record keeps
    /// at most the largest limit's count of entries and expires with the
    /// longest window.
    async fn record_recipient_send(
        &self,
        recipient: &str,
        key: &IdempotencyKey,
        windows: &[RateWindow],
    ) -> Result<RecipientSend, CacheError>;
    /// Records a command submitted at a front door before it is queued, so
    /// that its status is known at once; compares its payload `fingerprint`
    /// with the one recorded for the key, if any (see [`Admission`]).
    async fn admit(&self, key: &IdempotencyKey, fingerprint: &str)
        -> Result<Admission, CacheError>;
    /// Forgets an admission whose command could not be queued (only while
    /// nothing else happened to the key).
    async fn withdraw(&self, key: &IdempotencyKey) -> Result<(), CacheError>;
    /// Records a command held until `send_at` as `scheduled`, with its
    /// number and due time, if the key is new, admitted, or failed only as
    /// an invalid command (see [`Scheduled`]); the record lasts until
    /// `send_at` and the idempotency TTL after it. A later claim treats
    /// the key as new.
    async fn schedule(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        phone_number: &str,
        send_at: SystemTime,
    ) -> Result<Scheduled, CacheError>;
    /// Cancels `key` unless it is sent, being sent, perhaps sent or failed
    /// ([`CancelVerdict`]), atomically: the key becomes `failed` with
    /// reason `cancelled` and `detail` (a tombstone, also for a key not
    /// seen yet, so that a command still on its way is cancelled when it
    /// arrives), kept for the idempotency TTL past the latest `sendAt` a
    /// command may carry (30 days ahead); a claim then answers
    /// [`Claim::PublishFailed`] (no provider call) until its SmsFailed is
    /// marked published, then [`Claim::AlreadyFailed`]. When the store
    /// knows the number (a scheduled key) the cancel takes the key as
    /// `owner` to publish the SmsFailed itself, and claims meanwhile answer
    /// [`Claim::Cancelling`].
    async fn cancel(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        detail: &str,
    ) -> Result<CancelVerdict, CacheError>;
    /// Records an invalid command with a usable key as failed, unless the
    /// key is known; see [`InvalidVerdict`]. A later valid command with the
    /// same key is claimed as new (an invalid command reserves nothing).
    async fn record_invalid(
        &self,
        key: &IdempotencyKey,
        record: &FailedRecord,
    ) -> Result<InvalidVerdict, CacheError>;
    /// The status of a key, if known.
    async fn status(&self, key: &str) -> Result<Option<MessageStatus>, CacheError>;
    /// Records one delivery report of `provider` for the message (or part)
    /// it names, moving the message's status forward only, atomically;
    /// see [`ReportOutcome`]. A report for an id not recorded yet is kept
    /// for `park_ttl` (not at all with `None`).
    async fn record_report(
        &self,
        provider: &str,
        report: &ProviderReport,
        reported_at: &str,
        park_ttl: Option<Duration>,
    ) -> Result<ReportOutcome, CacheError>;
    /// The SmsDeliveryReport of `key` recorded but not yet confirmed, if
    /// any (parked reports applied by [`CacheService::record_sent`]).
    async fn pending_report(&self, key: &str) -> Result<Option<DeliveryReport>, CacheError>;
    /// The SmsDeliveryReport of `key` with final `status` is confirmed.
    async fn mark_report_published(
        &self,
        key: &str,
        status: DeliveryStatus,
    ) -> Result<(), CacheError>;
    /// SmsDeliveryReports recorded at least `older_than` ago and still not
    /// confirmed (their callback got a 5xx and the provider never sent it
    /// again, or their send's step could not publish them), at most
    /// `limit`: the sweeper publishes them.
    async fn unpublished_reports(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<DeliveryReport>, CacheError>;
    /// Writes `instance`'s liveness record for `ttl`: while it exists, the
    /// instance's leases are respected until they run out.
    async fn heartbeat(&self, instance: &str, ttl: Duration) -> Result<(), CacheError>;
    /// Deletes `instance`'s liveness record (clean shutdown), so that what
    /// it leaves leased is taken over at once.
    async fn retire(&self, instance: &str) -> Result<(), CacheError>;
    /// Whether the store answers (and takes writes).
    async fn ping(&self) -> Result<(), CacheError>;
}

// ---------------------------------------------------------------- core

/// A delivered command as the core sees it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub body: &'a [u8],
    pub redelivered: bool,
    pub meta: &'a EventMeta,
    pub retry: &'a RetryState,
    /// The queue it came from: a command of the high queue has send slots
    /// of its own (it never waits behind the command queue's sends).
    pub lane: Lane,
    /// Fired when the command should be handed back (shutdown's grace is
    /// over). Heeded only where stopping is safe: never between a provider
    /// call and the recording and publishing of its answer.
    pub stop: &'a tokio_util::sync::CancellationToken,
}

/// How one command ended, for the processing loop to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Sent (or its missing SmsSent published): acknowledge.
    Sent,
    /// A duplicate of a key that is sent or being sent: acknowledge.
    Duplicate,
    /// Not now: requeue after this (short) delay (the broker failed).
    RetryAfter(Duration),
    /// Stopped at a safe point (shutdown): requeue at once, lease released.
    HandBack,
    /// Not now: hand to a delay tier for about `delay`, carrying `retry`.
    Delay { delay: Duration, retry: RetryState },
    /// Not yet due: park it in the broker until `until` (see
    /// [`DeliveryHandle::hold`]); no attempt or retry is counted, and it is
    /// examined afresh when it comes back.
    Hold { until: SystemTime },
    /// The idempotency store is away: requeue, and take no new work until
    /// it answers again.
    StoreUnavailable,
    /// SmsFailed is published: dead-letter with this reason.
    Failed(String),
    /// No event possible (malformed): dead-letter with this reason.
    DeadLetter(String),
}

impl Outcome {
    /// The outcome's name, as the `consume` span says it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Duplicate => "duplicate",
            Self::RetryAfter(_) => "retry_after",
            Self::HandBack => "hand_back",
            Self::Delay { .. } => "delay",
            Self::Hold { .. } => "hold",
            Self::StoreUnavailable => "store_unavailable",
            Self::Failed(_) => "failed",
            Self::DeadLetter(_) => "dead_letter",
        }
    }
}

/// The core decision for one command: claim, send, record, publish.
#[async_trait]
pub trait NotificationService: Send + Sync {
    async fn handle(&self, message: Inbound<'_>) -> Outcome;
    /// Whether an outcome is waiting to be written to the store: the loop
    /// then takes no new work (cheap; checked for every delivery).
    fn holding(&self) -> bool {
        false
    }
    /// Whether the step can take new work: its store answers (the
    /// instance's liveness record is written) and no outcome is waiting to
    /// be recorded.
    async fn ready(&self) -> bool;
}

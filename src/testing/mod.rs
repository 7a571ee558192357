//! In-memory adapters for unit tests of the core, with failures that can be
//! switched on at a chosen step to simulate a crash window, and the
//! idempotency store's contract ([`store_contract`]), run against the
//! in-memory store here and against the Redis store in `tests/`. Built for
//! the crate's own tests and, with the `test-support` feature, for `tests/`.

pub mod store_contract;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::domain::{
    DeliveryReport, DeliveryStatus, IdempotencyKey, RateWindow, SendSms, SmsFailed, SmsSent,
};
use crate::ports::*;

#[derive(Debug, Clone, Default)]
struct Entry {
    status: String,
    published: bool,
    /// The owner id holding the lease, its instance, and until when.
    lease: Option<(Owner, Instant)>,
    attempts: u32,
    first_attempt_ms: u64,
    takeovers: u32,
    sent: Option<SentRecord>,
    failed: Option<FailedRecord>,
    /// The payload the key was first seen with.
    fingerprint: Option<String>,
    /// Failed as an invalid command: reserves nothing.
    invalid: bool,
    /// When a claim first found the lease's holder dead.
    dead_since: Option<Instant>,
    /// The provider an ambiguous answer came from.
    pinned: Option<String>,
    /// What delivery reports said of it.
    ledger: Ledger,
    /// A scheduled message's number, and when it is due (RFC 3339).
    phone: Option<String>,
    send_at: Option<String>,
    /// A tombstone: failed as cancelled.
    cancelled: bool,
}

/// The claim's answer while a live holder has the key: busy, or for a
/// cancelled key, come back once its SmsFailed is out.
fn busy(entry: &Entry, lease_left: Duration, holder_alive_for: Duration) -> Claim {
    if entry.cancelled {
        Claim::Cancelling {
            retry_in: lease_left.min(holder_alive_for),
        }
    } else {
        Claim::Busy {
            lease_left,
            holder_alive_for,
        }
    }
}

/// Reports parked for one provider id, each with its time.
type Parked = Vec<(ProviderReport, String)>;

/// A key's delivery reports, as the Redis scripts keep them: each part's
/// status, the final status once set, and the distinct reports.
#[derive(Debug, Clone, Default)]
struct Ledger {
    parts: Vec<String>,
    part_status: HashMap<String, DeliveryStatus>,
    /// The final status, and the report (its part) that set it.
    delivery: Option<(DeliveryReport, String)>,
    delivery_published: bool,
    history: Vec<(String, HistoryEntry)>,
}

impl Ledger {
    /// The transition of `scripts::APPLY`: `true` to publish.
    fn apply(
        &mut self,
        part: &str,
        report: &ProviderReport,
        at: &str,
        sent: &SentRecord,
        key: &str,
    ) -> bool {
        let seen = self.history.iter().any(|(p, e)| {
            p == part
                && e.status == report.status
                && e.provider_status == report.provider_status
                && e.error_code == report.error_code
        });
        if seen {
            // The very report that set the final status, not confirmed.
            return self.delivery.as_ref().is_some_and(|(d, p)| {
                p == part
                    && d.provider_status == report.provider_status
                    && d.error_code == report.error_code
                    && !self.delivery_published
            });
        }
        self.history.push((
            part.to_owned(),
            HistoryEntry {
                status: report.status,
                provider_status: report.provider_status.clone(),
                error_code: report.error_code.clone(),
                at: at.to_owned(),
            },
        ));
        if self.history.len() > 50 {
            self.history.remove(0);
        }
        if self.delivery.is_some() {
            return false;
        }
        if let Some(current) = self.part_status.get(part) {
            if current.is_final() || !report.status.is_final() {
                return false;
            }
        }
        self.part_status.insert(part.to_owned(), report.status);
        let statuses: Vec<DeliveryStatus> = self
            .parts
            .iter()
            .map(|p| {
                self.part_status
                    .get(p)
                    .copied()
                    .unwrap_or(DeliveryStatus::Sent)
            })
            .collect();
        let status = DeliveryStatus::of_parts(&statuses);
        if !status.is_final() {
            return false;
        }
        let event = DeliveryReport {
            idempotency_key: key.to_owned(),
            phone_number: sent.phone_number.clone(),
            provider: sent.provider.clone(),
            provider_message_id: sent.provider_message_id.clone(),
            status,
            provider_status: report.provider_status.clone(),
            error_code: report.error_code.clone(),
            permanent: report.permanent,
            reported_at: at.to_owned(),
        };
        self.delivery = Some((event, part.to_owned()));
        self.delivery_published = false;
        true
    }

    fn pending(&self) -> Option<DeliveryReport> {
        self.delivery
            .as_ref()
            .filter(|_| !self.delivery_published)
            .map(|(d, _)| d.clone())
    }
}

/// A one-part send by provider "fake" with id `provider_message_id`, one
/// attempt, no trace: the sent record store tests write.
pub fn sent_record(provider_message_id: &str) -> SentRecord {
    SentRecord {
        provider: "fake".into(),
        provider_message_id: provider_message_id.into(),
        other_part_ids: Vec::new(),
        phone_number: "+254712345678".into(),
        segments: 1,
        attempts: 1,
        sent_at: "2026-12-01T10:00:00Z".into(),
        traceparent: None,
    }
}

/// The idempotency store in memory: the same state machine as the Redis
/// scripts (the store contract in [`store_contract`] holds for both), on
/// tokio's clock so tests can pause time.
#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<HashMap<String, Entry>>,
    /// (provider, provider id of a part) -> key.
    pids: Mutex<HashMap<(String, String), String>>,
    /// Reports for provider ids not recorded yet, with their times.
    parked: Mutex<HashMap<(String, String), Parked>>,
    /// Liveness records: instance -> until when.
    alive: Mutex<HashMap<String, Instant>>,
    /// Per-recipient counts: recipient -> (key, when counted), oldest first.
    recipients: Mutex<HashMap<String, Vec<(String, Instant)>>>,
    pub lease: Duration,
    /// How long a holder must stay dead (no liveness record) before its
    /// lease is taken over, as `redis.liveness_ttl_ms`.
    pub liveness: Duration,
    /// Fail every call: the store is down.
    pub down: AtomicBool,
    /// Answer every claim `Claim::Contended` (claims racing, in cluster
    /// mode).
    pub contended: AtomicBool,
    /// Fail only `postpone` (a lease release lost on its way).
    pub postpone_down: AtomicBool,
    /// Fail only `pin` (the pin write after an ambiguous answer lost).
    pub pin_down: AtomicBool,
    /// Fail `record_sent` and `record_failed`.
    pub fail_records: AtomicBool,
    /// Answer `record_sent` this long after writing it (the caller
    /// paused after the store took the write), in ms.
    pub record_pause_ms: std::sync::atomic::AtomicU64,
}

impl MemoryCache {
    /// A store with this lease and a 5 s liveness TTL.
    pub fn new(lease: Duration) -> Arc<Self> {
        Self::with_liveness(lease, Duration::from_secs(5))
    }

    pub fn with_liveness(lease: Duration, liveness: Duration) -> Arc<Self> {
        Arc::new(Self {
            lease,
            liveness,
            ..Self::default()
        })
    }

    /// As the script `RELEASE`: `release` (with its pin) or `postpone`.
    fn release_lease(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
        postpone: bool,
        pinned: Option<&str>,
    ) {
        let mut entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get_mut(key.as_str()) else {
            return;
        };
        if entry.lease.as_ref().is_none_or(|(o, _)| o.id != owner.id) {
            return;
        }
        entry.lease = None;
        if let Some(provider) = pinned {
            entry.pinned = Some(provider.to_owned());
        }
        if entry.status == "processing" {
            entry.status = "retrying".into();
            entry.attempts = attempts;
            if postpone && attempts == 0 {
                entry.first_attempt_ms = 0;
            }
        }
    }

    fn check(&self) -> Result<(), CacheError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(CacheError("down".into()));
        }
        Ok(())
    }

    pub fn status_of(&self, key: &str) -> Option<(String, bool, u32)> {
        let entries = self.entries.lock().unwrap();
        entries
            .get(key)
            .map(|e| (e.status.clone(), e.published, e.attempts))
    }

    pub fn lease_holder(&self, key: &str) -> Option<String> {
        let entries = self.entries.lock().unwrap();
        entries
            .get(key)
            .and_then(|e| e.lease.clone())
            .map(|(owner, _)| owner.id)
    }

    /// Writes `instance`'s liveness record for `ttl`, without the trait's
    /// async call (for test set-up).
    pub fn set_alive(&self, instance: &str, ttl: Duration) {
        let mut alive = self.alive.lock().unwrap();
        alive.insert(instance.to_owned(), Instant::now() + ttl);
    }

    /// How long `instance`'s liveness record lasts yet, if it exists.
    fn alive_for(&self, instance: &str, now: Instant) -> Option<Duration> {
        let alive = self.alive.lock().unwrap();
        alive
            .get(instance)
            .filter(|until| **until > now)
            .map(|until| *until - now)
    }

    fn record(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        write: impl FnOnce(&mut Entry),
    ) -> Result<Recorded, CacheError> {
        self.check()?;
        if self.fail_records.load(Ordering::SeqCst) {
            return Err(CacheError("record failed".into()));
        }
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_default();
        let fresh = entry.status.is_empty();
        if !fresh && entry.lease.as_ref().map(|(o, _)| &o.id) != Some(&owner.id) {
            return Ok(Recorded::Fenced);
        }
        if !fresh && !matches!(entry.status.as_str(), "processing" | "retrying") {
            // Its own write retried: parked reports may have left an event.
            if entry.status == "sent" && entry.ledger.pending().is_some() {
                return Ok(Recorded::WrittenReported);
            }
            return Ok(Recorded::Written);
        }
        entry.lease = Some((owner.clone(), Instant::now() + self.lease));
        entry.published = false;
        write(entry);
        Ok(Recorded::Written)
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[async_trait]
impl CacheService for MemoryCache {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        fingerprint: &str,
    ) -> Result<Claim, CacheError> {
        self.check()?;
        if self.contended.load(Ordering::SeqCst) {
            return Ok(Claim::Contended);
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_default();
        if matches!(entry.status.as_str(), "" | "accepted" | "scheduled") || entry.invalid {
            let admitted = entry.fingerprint.take().filter(|_| !entry.invalid);
            *entry = Entry {
                status: "processing".into(),
                lease: Some((owner.clone(), now + self.lease)),
                attempts: 1,
                first_attempt_ms: epoch_ms(),
                fingerprint: Some(admitted.unwrap_or_else(|| fingerprint.to_owned())),
                send_at: entry.send_at.take(),
                ..Entry::default()
            };
            return Ok(Claim::Send {
                attempts: 0,
                first_attempt_ms: entry.first_attempt_ms,
                takeovers: 0,
                took_over: false,
                pinned: None,
            });
        }
        let terminal = !matches!(entry.status.as_str(), "processing" | "retrying");
        if terminal && entry.published {
            return Ok(match &entry.failed {
                Some(f) if entry.status == "failed" => Claim::AlreadyFailed(f.clone()),
                _ => Claim::AlreadySent,
            });
        }
        let mut took_over = false;
        match entry.lease.clone() {
            Some((holder, until)) if holder.id == owner.id => {
                entry.lease = Some((holder, now + self.lease));
                if entry.status == "processing" {
                    return Ok(Claim::Send {
                        attempts: entry.attempts.saturating_sub(1),
                        first_attempt_ms: entry.first_attempt_ms,
                        takeovers: entry.takeovers,
                        took_over: false,
                        pinned: entry.pinned.clone(),
                    });
                }
                let _ = until;
            }
            Some((holder, until)) => {
                if until > now {
                    if let Some(alive) = self.alive_for(&holder.instance, now) {
                        entry.dead_since = None;
                        return Ok(busy(entry, until - now, alive));
                    }
                    // Dead, or only without its record in a store outage:
                    // taken over once dead for a whole liveness TTL.
                    let since = *entry.dead_since.get_or_insert(now);
                    let over = since + self.liveness;
                    if over > now {
                        return Ok(busy(entry, until - now, over - now));
                    }
                }
                entry.dead_since = None;
                entry.takeovers += 1;
                took_over = true;
                entry.lease = Some((owner.clone(), now + self.lease));
            }
            None => entry.lease = Some((owner.clone(), now + self.lease)),
        }
        Ok(match entry.status.as_str() {
            "sent" | "delivered" | "undelivered" => Claim::PublishSent(entry.sent.clone().unwrap()),
            "failed" => Claim::PublishFailed(entry.failed.clone().unwrap()),
            _ => {
                entry.status = "processing".into();
                let before = entry.attempts;
                entry.attempts += 1;
                if entry.first_attempt_ms == 0 {
                    entry.first_attempt_ms = epoch_ms();
                }
                Claim::Send {
                    attempts: before,
                    first_attempt_ms: entry.first_attempt_ms,
                    takeovers: entry.takeovers,
                    took_over,
                    pinned: entry.pinned.clone(),
                }
            }
        })
    }

    async fn pin(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        provider: &str,
    ) -> Result<(), CacheError> {
        self.check()?;
        if self.pin_down.load(Ordering::SeqCst) {
            return Err(CacheError("pin down".into()));
        }
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(key.as_str()) {
            if entry.lease.as_ref().is_some_and(|(o, _)| o.id == owner.id) {
                entry.pinned = Some(provider.to_owned());
            }
        }
        Ok(())
    }

    async fn renew(&self, key: &IdempotencyKey, owner: &Owner) -> Result<Recorded, CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        match entries.get_mut(key.as_str()).and_then(|e| e.lease.as_mut()) {
            Some((holder, until)) if holder.id == owner.id => {
                *until = Instant::now() + self.lease;
                Ok(Recorded::Written)
            }
            _ => Ok(Recorded::Fenced),
        }
    }

    async fn record_sent(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        record: &SentRecord,
    ) -> Result<Recorded, CacheError> {
        let mut written = self.record(key, owner, |entry| {
            entry.status = "sent".into();
            entry.attempts = record.attempts;
            entry.sent = Some(record.clone());
            entry.ledger.parts = std::iter::once(&record.provider_message_id)
                .chain(&record.other_part_ids)
                .cloned()
                .collect();
        });
        if written == Ok(Recorded::Written) && !record.provider_message_id.is_empty() {
            let mut entries = self.entries.lock().unwrap();
            let entry = entries.get_mut(key.as_str()).expect("just written");
            let mut pids = self.pids.lock().unwrap();
            let mut parked = self.parked.lock().unwrap();
            for part in entry.ledger.parts.clone() {
                let id = (record.provider.clone(), part.clone());
                pids.insert(id.clone(), key.to_string());
                for (report, at) in parked.remove(&id).unwrap_or_default() {
                    if entry
                        .ledger
                        .apply(&part, &report, &at, record, key.as_str())
                    {
                        written = Ok(Recorded::WrittenReported);
                    }
                }
            }
        }
        let pause = self.record_pause_ms.load(Ordering::SeqCst);
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        written
    }

    async fn record_failed(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        record: &FailedRecord,
    ) -> Result<Recorded, CacheError> {
        self.record(key, owner, |entry| {
            entry.status = "failed".into();
            entry.attempts = record.attempts;
            entry.failed = Some(record.clone());
        })
    }

    async fn mark_published(&self, key: &IdempotencyKey, owner: &Owner) -> Result<(), CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(key.as_str()) {
            let owned = entry.lease.as_ref().is_some_and(|(o, _)| o.id == owner.id);
            let outcome = matches!(
                entry.status.as_str(),
                "sent" | "failed" | "delivered" | "undelivered"
            );
            if owned && outcome {
                entry.published = true;
            }
        }
        Ok(())
    }

    async fn mark_invalid_published(&self, key: &IdempotencyKey) -> Result<(), CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(key.as_str()) {
            if entry.invalid && entry.status == "failed" {
                entry.published = true;
            }
        }
        Ok(())
    }

    async fn release(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
        pinned: Option<&str>,
    ) -> Result<(), CacheError> {
        self.check()?;
        self.release_lease(key, owner, attempts, false, pinned);
        Ok(())
    }

    async fn postpone(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
    ) -> Result<(), CacheError> {
        self.check()?;
        if self.postpone_down.load(Ordering::SeqCst) {
            return Err(CacheError("postpone lost".into()));
        }
        self.release_lease(key, owner, attempts, true, None);
        Ok(())
    }

    /// As the script `RECORD_RECIPIENT_SEND`, on tokio's clock.
    async fn record_recipient_send(
        &self,
        recipient: &str,
        key: &IdempotencyKey,
        windows: &[RateWindow],
    ) -> Result<RecipientSend, CacheError> {
        self.check()?;
        let now = Instant::now();
        let longest = windows.iter().map(|w| w.window).max().unwrap_or_default();
        let cap = windows.iter().map(|w| w.limit).max().unwrap_or(1) as usize;
        let mut recipients = self.recipients.lock().unwrap();
        let counted = recipients.entry(recipient.to_owned()).or_default();
        counted.retain(|(_, at)| now.duration_since(*at) < longest);
        if counted.iter().any(|(k, _)| k == key.as_str()) {
            return Ok(RecipientSend::CountedBefore);
        }
        let mut wait = Duration::ZERO;
        for w in windows {
            let inside: Vec<Instant> = counted
                .iter()
                .map(|(_, at)| *at)
                .filter(|at| now.duration_since(*at) < w.window)
                .collect();
            if inside.len() >= w.limit as usize {
                let leaving = inside[inside.len() - w.limit as usize];
                wait = wait.max(leaving + w.window - now);
            }
        }
        if !wait.is_zero() {
            return Ok(RecipientSend::Limited { retry_after: wait });
        }
        counted.push((key.to_string(), now));
        let over = counted.len().saturating_sub(cap);
        counted.drain(..over);
        Ok(RecipientSend::Counted)
    }

    async fn admit(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
    ) -> Result<Admission, CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_default();
        if entry.status.is_empty() || entry.invalid {
            *entry = Entry {
                status: "accepted".into(),
                fingerprint: Some(fingerprint.to_owned()),
                ..Entry::default()
            };
            return Ok(Admission::New);
        }
        Ok(match &entry.fingerprint {
            Some(known) if known != fingerprint => Admission::Conflict,
            _ => Admission::Same,
        })
    }

    async fn withdraw(&self, key: &IdempotencyKey) -> Result<(), CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if entries
            .get(key.as_str())
            .is_some_and(|e| e.status == "accepted")
        {
            entries.remove(key.as_str());
        }
        Ok(())
    }

    async fn schedule(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        phone_number: &str,
        send_at: std::time::SystemTime,
    ) -> Result<Scheduled, CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_default();
        match entry.status.as_str() {
            "scheduled" => return Ok(Scheduled::Held),
            "" | "accepted" => {}
            _ if entry.invalid => {}
            _ => return Ok(Scheduled::Known),
        }
        let admitted = entry
            .fingerprint
            .take()
            .filter(|_| entry.status == "accepted");
        *entry = Entry {
            status: "scheduled".into(),
            fingerprint: Some(admitted.unwrap_or_else(|| fingerprint.to_owned())),
            phone: Some(phone_number.to_owned()),
            send_at: Some(crate::domain::rfc3339(send_at)),
            ..Entry::default()
        };
        Ok(Scheduled::Held)
    }

    async fn cancel(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        detail: &str,
    ) -> Result<CancelVerdict, CacheError> {
        self.check()?;
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_default();
        let before = entry.cancelled;
        let known = !entry.status.is_empty();
        if !before {
            let open = match entry.status.as_str() {
                "" | "accepted" | "scheduled" => true,
                "retrying" => entry.pinned.is_none(),
                _ => false,
            };
            if !open {
                return Ok(CancelVerdict::TooLate);
            }
            let failed_at = crate::domain::rfc3339(std::time::SystemTime::now());
            entry.status = "failed".into();
            entry.cancelled = true;
            entry.invalid = false;
            entry.published = false;
            entry.lease = None;
            entry.dead_since = None;
            entry.failed = Some(FailedRecord {
                reason: crate::domain::FailureReason::Cancelled,
                detail: detail.to_owned(),
                attempts: entry.attempts,
                failed_at,
            });
        }
        let held = before && entry.lease.as_ref().is_some_and(|(_, until)| *until > now);
        match (&entry.phone, entry.published || held) {
            (Some(phone), false) => {
                let phone_number = phone.clone();
                entry.lease = Some((owner.clone(), now + self.lease));
                Ok(CancelVerdict::Publish {
                    record: entry.failed.clone().expect("a tombstone has its record"),
                    phone_number,
                })
            }
            _ => Ok(CancelVerdict::Cancelled { known }),
        }
    }

    async fn record_invalid(
        &self,
        key: &IdempotencyKey,
        record: &FailedRecord,
    ) -> Result<InvalidVerdict, CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_default();
        if entry.status.is_empty() {
            *entry = Entry {
                status: "failed".into(),
                failed: Some(record.clone()),
                invalid: true,
                ..Entry::default()
            };
            return Ok(InvalidVerdict::Recorded);
        }
        Ok(if entry.invalid && !entry.published {
            InvalidVerdict::Unpublished
        } else {
            InvalidVerdict::Known
        })
    }

    async fn status(&self, key: &str) -> Result<Option<MessageStatus>, CacheError> {
        self.check()?;
        let entries = self.entries.lock().unwrap();
        Ok(entries.get(key).filter(|e| !e.status.is_empty()).map(|e| {
            let failed = e.failed.as_ref().filter(|_| e.status == "failed");
            let delivery_status = e.ledger.delivery.as_ref().map(|(d, _)| d.status);
            MessageStatus {
                send_at: e.send_at.clone(),
                status: match (e.status.as_str(), delivery_status) {
                    ("retrying" | "accepted", _) => "processing".into(),
                    ("sent", Some(d)) => d.as_str().into(),
                    (other, _) => other.into(),
                },
                provider: e.sent.as_ref().map(|s| s.provider.clone()),
                delivery_status,
                history: e.ledger.history.iter().map(|(_, h)| h.clone()).collect(),
                provider_message_id: e.sent.as_ref().map(|s| s.provider_message_id.clone()),
                attempts: e.attempts,
                updated_at: String::new(),
                reason: failed.map(|f| f.reason.as_str().to_owned()),
                detail: failed.map(|f| f.detail.clone()),
            }
        }))
    }

    async fn record_report(
        &self,
        provider: &str,
        report: &ProviderReport,
        reported_at: &str,
        park_ttl: Option<Duration>,
    ) -> Result<ReportOutcome, CacheError> {
        self.check()?;
        let id = (provider.to_owned(), report.provider_message_id.clone());
        // Locked in record_sent's order (entries, pids, parked) and held
        // throughout, so a send recorded meanwhile finds what was parked,
        // as the Redis script is atomic.
        let mut entries = self.entries.lock().unwrap();
        let pids = self.pids.lock().unwrap();
        let Some(key) = pids.get(&id).cloned() else {
            if park_ttl.is_none() {
                return Ok(ReportOutcome::Unmatched);
            }
            let mut parked = self.parked.lock().unwrap();
            let reports = parked.entry(id).or_default();
            reports.push((report.clone(), reported_at.to_owned()));
            if reports.len() > 20 {
                reports.remove(0);
            }
            return Ok(ReportOutcome::Parked);
        };
        drop(pids);
        let Some(entry) = entries.get_mut(&key) else {
            return Ok(ReportOutcome::Unmatched);
        };
        let Some(sent) = entry.sent.clone() else {
            return Ok(ReportOutcome::Unmatched);
        };
        if entry.ledger.apply(
            &report.provider_message_id,
            report,
            reported_at,
            &sent,
            &key,
        ) {
            return Ok(ReportOutcome::Publish {
                report: entry.ledger.pending().expect("just set"),
                send_trace: sent.traceparent.clone(),
            });
        }
        Ok(ReportOutcome::Unchanged)
    }

    async fn pending_report(&self, key: &str) -> Result<Option<DeliveryReport>, CacheError> {
        self.check()?;
        let entries = self.entries.lock().unwrap();
        Ok(entries.get(key).and_then(|e| e.ledger.pending()))
    }

    async fn unpublished_reports(
        &self,
        _older_than: Duration,
        limit: usize,
    ) -> Result<Vec<DeliveryReport>, CacheError> {
        self.check()?;
        let entries = self.entries.lock().unwrap();
        Ok(entries
            .values()
            .filter_map(|e| e.ledger.pending())
            .take(limit)
            .collect())
    }

    async fn mark_report_published(
        &self,
        key: &str,
        status: DeliveryStatus,
    ) -> Result<(), CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(key) {
            if entry.ledger.delivery.as_ref().map(|(d, _)| d.status) == Some(status) {
                entry.ledger.delivery_published = true;
            }
        }
        Ok(())
    }

    async fn heartbeat(&self, instance: &str, ttl: Duration) -> Result<(), CacheError> {
        self.check()?;
        let mut alive = self.alive.lock().unwrap();
        alive.insert(instance.to_owned(), Instant::now() + ttl);
        Ok(())
    }

    async fn retire(&self, instance: &str) -> Result<(), CacheError> {
        self.check()?;
        self.alive.lock().unwrap().remove(instance);
        Ok(())
    }

    async fn ping(&self) -> Result<(), CacheError> {
        self.check()
    }
}

/// A provider that answers from a script, then accepts.
#[derive(Default)]
pub struct ScriptedProvider {
    /// The instance name (`scripted` unless given).
    name: Option<String>,
    script: Mutex<Vec<Result<Accepted, ProviderError>>>,
    pub calls: AtomicU32,
    /// How long each call takes.
    pub latency: Duration,
}

impl ScriptedProvider {
    /// Answers `script` in order, then accepts every further call.
    pub fn new(script: Vec<Result<Accepted, ProviderError>>) -> Arc<Self> {
        let mut script = script;
        script.reverse();
        Arc::new(Self {
            script: Mutex::new(script),
            ..Self::default()
        })
    }

    /// As [`ScriptedProvider::new`], named as a provider instance.
    pub fn named(name: &str, script: Vec<Result<Accepted, ProviderError>>) -> Arc<Self> {
        let mut script = script;
        script.reverse();
        Arc::new(Self {
            name: Some(name.to_owned()),
            script: Mutex::new(script),
            ..Self::default()
        })
    }

    pub fn slow(latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            latency,
            ..Self::default()
        })
    }

    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl SmsService for ScriptedProvider {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("scripted")
    }

    async fn send(&self, _sms: &SendSms) -> Result<Accepted, ProviderError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.script.lock().unwrap().pop().unwrap_or(Ok(Accepted {
            segments: None,
            other_part_ids: Vec::new(),
            provider_message_id: format!("id-{n}"),
        }))
    }
}

/// Events kept in memory; publishing can be made to fail.
#[derive(Default)]
pub struct MemoryEvents {
    pub sent: Mutex<Vec<(SmsSent, EventMeta)>>,
    pub failed: Mutex<Vec<SmsFailed>>,
    pub deliveries: Mutex<Vec<DeliveryReport>>,
    /// Fail every publish, as an unconfirmed one.
    pub down: AtomicBool,
    /// Fail every publish as unroutable (no queue bound).
    pub unroutable: AtomicBool,
    /// Fail SmsDeliveryReport publishes only.
    pub deliveries_down: AtomicBool,
    /// SmsDeliveryReport publishes find no queue bound.
    pub deliveries_unroutable: AtomicBool,
}

impl MemoryEvents {
    pub fn sent(&self) -> Vec<SmsSent> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    pub fn failed(&self) -> Vec<SmsFailed> {
        self.failed.lock().unwrap().clone()
    }

    pub fn deliveries(&self) -> Vec<DeliveryReport> {
        self.deliveries.lock().unwrap().clone()
    }

    fn check(&self) -> Result<(), QueueError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(QueueError::NotConfirmed("down".into()));
        }
        if self.unroutable.load(Ordering::SeqCst) {
            return Err(QueueError::Unroutable("sms.sent".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl EventBus for MemoryEvents {
    async fn publish_sent(&self, event: &SmsSent, meta: &EventMeta) -> Result<(), QueueError> {
        self.check()?;
        self.sent
            .lock()
            .unwrap()
            .push((event.clone(), meta.clone()));
        Ok(())
    }

    async fn publish_failed(&self, event: &SmsFailed, _meta: &EventMeta) -> Result<(), QueueError> {
        self.check()?;
        self.failed.lock().unwrap().push(event.clone());
        Ok(())
    }

    async fn publish_delivery(&self, report: &DeliveryReport) -> Result<(), QueueError> {
        self.check()?;
        if self.deliveries_down.load(Ordering::SeqCst) {
            return Err(QueueError::NotConfirmed("down".into()));
        }
        if self.deliveries_unroutable.load(Ordering::SeqCst) {
            return Err(QueueError::Unroutable("sms.delivery".into()));
        }
        self.deliveries.lock().unwrap().push(report.clone());
        Ok(())
    }
}

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Requeued,
    DeadLettered(String),
    Delayed(Duration, RetryState),
    /// Held until then; it is pushed again at that instant (on tokio's
    /// clock, counted from the wall clock's now).
    Held(std::time::SystemTime),
}

type Log = Arc<Mutex<Vec<(Vec<u8>, Settled)>>>;

/// The command queues in memory, one per lane: push bodies, read how each
/// was settled.
#[derive(Default)]
pub struct MemoryQueue {
    pending: Mutex<[Option<tokio::sync::mpsc::UnboundedReceiver<InboundMessage>>; 2]>,
    senders: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<InboundMessage>>>,
    pub log: Log,
    pub closed: AtomicBool,
}

impl MemoryQueue {
    pub fn new() -> Arc<Self> {
        let (normal, normal_rx) = tokio::sync::mpsc::unbounded_channel();
        let (high, high_rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Self {
            pending: Mutex::new([Some(normal_rx), Some(high_rx)]),
            senders: Mutex::new(vec![normal, high]),
            ..Self::default()
        })
    }

    /// Pushes a delivery to the command queue.
    pub fn push(&self, body: &[u8]) {
        self.push_as(body, false);
    }

    /// Pushes a delivery to the command queue, marked as a broker
    /// redelivery or not.
    pub fn push_as(&self, body: &[u8], redelivered: bool) {
        self.push_to(Lane::Normal, body, redelivered);
    }

    /// Pushes a delivery to `lane`'s queue.
    pub fn push_to(&self, lane: Lane, body: &[u8], redelivered: bool) {
        let senders = self.senders.lock().unwrap();
        let sender = &senders[lane.index()];
        sender
            .send(delivery(
                body,
                redelivered,
                RetryState::default(),
                &self.log,
                sender,
            ))
            .unwrap();
    }

    pub fn settled(&self) -> Vec<Settled> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// The bodies settled so far, in the order they were settled.
    pub fn settled_bodies(&self) -> Vec<Vec<u8>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(b, _)| b.clone())
            .collect()
    }
}

fn delivery(
    body: &[u8],
    redelivered: bool,
    retry: RetryState,
    log: &Log,
    queue: &tokio::sync::mpsc::UnboundedSender<InboundMessage>,
) -> InboundMessage {
    InboundMessage {
        body: body.to_vec(),
        redelivered,
        meta: EventMeta::default(),
        retry: retry.clone(),
        handle: Box::new(MemoryHandle {
            body: body.to_vec(),
            retry,
            log: log.clone(),
            queue: queue.clone(),
        }),
    }
}

struct MemoryHandle {
    body: Vec<u8>,
    /// The retry state it came with: a hold returns it unchanged, as the
    /// broker's hold queues return the headers.
    retry: RetryState,
    log: Log,
    /// The queue it came from, for a hold to return it to.
    queue: tokio::sync::mpsc::UnboundedSender<InboundMessage>,
}

#[async_trait]
impl DeliveryHandle for MemoryHandle {
    async fn ack(&mut self) -> Result<(), QueueError> {
        self.log
            .lock()
            .unwrap()
            .push((self.body.clone(), Settled::Acked));
        Ok(())
    }
    async fn requeue(&mut self) -> Result<(), QueueError> {
        self.log
            .lock()
            .unwrap()
            .push((self.body.clone(), Settled::Requeued));
        Ok(())
    }
    async fn dead_letter(&mut self, _body: &[u8], reason: &str) -> Result<(), QueueError> {
        self.log
            .lock()
            .unwrap()
            .push((self.body.clone(), Settled::DeadLettered(reason.into())));
        Ok(())
    }
    async fn delay(
        &mut self,
        _body: &[u8],
        delay: Duration,
        retry: &RetryState,
    ) -> Result<(), QueueError> {
        let settled = Settled::Delayed(delay, retry.clone());
        self.log.lock().unwrap().push((self.body.clone(), settled));
        Ok(())
    }
    /// Logs the hold, and pushes the body again (as a fresh delivery, with
    /// the retry state it came with) once `until` is reached.
    async fn hold(&mut self, body: &[u8], until: std::time::SystemTime) -> Result<(), QueueError> {
        let settled = Settled::Held(until);
        self.log.lock().unwrap().push((self.body.clone(), settled));
        let left = until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let (body, log, queue) = (body.to_vec(), self.log.clone(), self.queue.clone());
        let retry = self.retry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(left).await;
            let _ = queue.send(delivery(&body, false, retry, &log, &queue));
        });
        Ok(())
    }
}

struct MemoryStream(tokio::sync::mpsc::UnboundedReceiver<InboundMessage>);

#[async_trait]
impl DeliveryStream for MemoryStream {
    async fn next(&mut self) -> Option<Result<InboundMessage, QueueError>> {
        self.0.recv().await.map(Ok)
    }
    async fn cancel(&mut self) {}
    async fn close(&mut self) {}
}

#[async_trait]
impl QueueClient for MemoryQueue {
    async fn consume(&self, lane: Lane) -> Result<Box<dyn DeliveryStream>, QueueError> {
        match self.pending.lock().unwrap()[lane.index()].take() {
            Some(rx) => Ok(Box::new(MemoryStream(rx))),
            None => Err(QueueError::Unavailable("already consumed".into())),
        }
    }
    async fn publish_command(
        &self,
        body: &[u8],
        _meta: &EventMeta,
        lane: Lane,
    ) -> Result<(), QueueError> {
        self.push_to(lane, body, false);
        Ok(())
    }
    fn is_connected(&self) -> bool {
        true
    }
    async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_keeps_the_store_contract() {
        let store =
            MemoryCache::with_liveness(Duration::from_millis(300), Duration::from_millis(150));
        store_contract::check(store.as_ref(), store.lease, store.liveness, "memory").await;
    }
}

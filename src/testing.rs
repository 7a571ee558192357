//! In-memory adapters for unit tests of the core, with failures that can be
//! switched on at a chosen step to simulate a crash window. The cache keeps
//! the same state machine as the Redis scripts, on tokio's clock so tests
//! can pause time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::domain::{DeliveryReport, DeliveryStatus, IdempotencyKey, SendSms, SmsFailed, SmsSent};
use crate::ports::*;

#[derive(Debug, Clone, Default)]
struct Entry {
    status: String,
    published: bool,
    lease: Option<(String, Instant)>,
    attempts: u32,
    sent: Option<SentRecord>,
    failed: Option<FailedRecord>,
}

/// The idempotency store in memory.
#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<HashMap<String, Entry>>,
    redeliveries: Mutex<HashMap<String, u32>>,
    pub lease: Duration,
    /// Fail every call: the store is down.
    pub down: AtomicBool,
    /// Fail `record_sent` and `record_failed`.
    pub fail_records: AtomicBool,
}

impl MemoryCache {
    pub fn new(lease: Duration) -> Arc<Self> {
        Arc::new(Self {
            lease,
            ..Self::default()
        })
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
            .map(|(owner, _)| owner)
    }
}

#[async_trait]
impl CacheService for MemoryCache {
    async fn claim(&self, key: &IdempotencyKey, owner: &str) -> Result<Claim, CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.entry(key.to_string()).or_insert_with(|| Entry {
            status: "processing".into(),
            ..Entry::default()
        });
        let terminal = !matches!(entry.status.as_str(), "processing" | "retrying");
        if terminal && entry.published {
            return Ok(match &entry.failed {
                Some(f) if entry.status == "failed" => Claim::AlreadyFailed(f.clone()),
                _ => Claim::AlreadySent,
            });
        }
        let now = Instant::now();
        if let Some((_, until)) = &entry.lease {
            if *until > now {
                return Ok(Claim::Busy {
                    lease_left: *until - now,
                });
            }
        }
        entry.lease = Some((owner.to_owned(), now + self.lease));
        if entry.status == "retrying" {
            entry.status = "processing".into();
        }
        Ok(match entry.status.as_str() {
            "sent" => Claim::PublishSent(entry.sent.clone().unwrap()),
            "failed" => Claim::PublishFailed(entry.failed.clone().unwrap()),
            _ => Claim::Send {
                attempts: entry.attempts,
            },
        })
    }

    async fn record_sent(
        &self,
        key: &IdempotencyKey,
        record: &SentRecord,
        published: bool,
    ) -> Result<(), CacheError> {
        self.check()?;
        if self.fail_records.load(Ordering::SeqCst) {
            return Err(CacheError("record failed".into()));
        }
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.get_mut(key.as_str()).unwrap();
        if entry.status != "sent" {
            entry.status = "sent".into();
            entry.published = published;
            entry.attempts = record.attempts;
            entry.sent = Some(record.clone());
        }
        Ok(())
    }

    async fn record_failed(
        &self,
        key: &IdempotencyKey,
        record: &FailedRecord,
        published: bool,
    ) -> Result<(), CacheError> {
        self.check()?;
        if self.fail_records.load(Ordering::SeqCst) {
            return Err(CacheError("record failed".into()));
        }
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.get_mut(key.as_str()).unwrap();
        if entry.status != "sent" {
            entry.status = "failed".into();
            entry.published = published;
            entry.attempts = record.attempts;
            entry.failed = Some(record.clone());
        }
        Ok(())
    }

    async fn mark_published(&self, key: &IdempotencyKey, owner: &str) -> Result<(), CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(key.as_str()) {
            entry.published = true;
            if entry.lease.as_ref().is_some_and(|(o, _)| o == owner) {
                entry.lease = None;
            }
        }
        Ok(())
    }

    async fn release(
        &self,
        key: &IdempotencyKey,
        owner: &str,
        attempts: u32,
    ) -> Result<(), CacheError> {
        self.check()?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(key.as_str()) {
            if entry.lease.as_ref().is_some_and(|(o, _)| o == owner) {
                entry.lease = None;
                if entry.status == "processing" {
                    entry.status = "retrying".into();
                    entry.attempts = attempts;
                }
            }
        }
        Ok(())
    }

    async fn status(&self, key: &str) -> Result<Option<MessageStatus>, CacheError> {
        self.check()?;
        Ok(self
            .status_of(key)
            .map(|(status, _, attempts)| MessageStatus {
                status,
                provider_message_id: None,
                attempts,
                updated_at: String::new(),
            }))
    }

    async fn record_delivery(
        &self,
        _provider: &str,
        _id: &str,
        _status: DeliveryStatus,
        _error_code: Option<&str>,
    ) -> Result<Option<String>, CacheError> {
        self.check()?;
        Ok(None)
    }

    async fn count_redelivery(&self, fingerprint: &str) -> Result<u32, CacheError> {
        self.check()?;
        let mut counts = self.redeliveries.lock().unwrap();
        let count = counts.entry(fingerprint.to_owned()).or_default();
        *count += 1;
        Ok(*count)
    }

    async fn ping(&self) -> Result<(), CacheError> {
        self.check()
    }
}

/// A provider that answers from a script, then accepts.
#[derive(Default)]
pub struct ScriptedProvider {
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
        "scripted"
    }

    async fn send(&self, _sms: &SendSms) -> Result<Accepted, ProviderError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.script.lock().unwrap().pop().unwrap_or(Ok(Accepted {
            provider_message_id: format!("id-{n}"),
        }))
    }
}

/// Events kept in memory; publishing can be made to fail.
#[derive(Default)]
pub struct MemoryEvents {
    pub sent: Mutex<Vec<(SmsSent, EventMeta)>>,
    pub failed: Mutex<Vec<SmsFailed>>,
    /// Fail every publish, as an unconfirmed one.
    pub down: AtomicBool,
    /// Fail every publish as unroutable (no queue bound).
    pub unroutable: AtomicBool,
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

    async fn publish_delivery(&self, _report: &DeliveryReport) -> Result<(), QueueError> {
        self.check()
    }
}

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Requeued,
    DeadLettered(String),
    Delayed(Duration, RetryState),
}

type Log = Arc<Mutex<Vec<(Vec<u8>, Settled)>>>;

/// A command queue in memory: push bodies, read how each was settled.
#[derive(Default)]
pub struct MemoryQueue {
    pending: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<InboundMessage>>>,
    sender: Mutex<Option<tokio::sync::mpsc::UnboundedSender<InboundMessage>>>,
    pub log: Log,
    pub closed: AtomicBool,
}

impl MemoryQueue {
    pub fn new() -> Arc<Self> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Self {
            pending: Mutex::new(Some(rx)),
            sender: Mutex::new(Some(tx)),
            ..Self::default()
        })
    }

    pub fn push(&self, body: &[u8]) {
        self.push_as(body, false);
    }

    /// Pushes a delivery, marked as a broker redelivery or not.
    pub fn push_as(&self, body: &[u8], redelivered: bool) {
        let message = InboundMessage {
            body: body.to_vec(),
            redelivered,
            meta: EventMeta::default(),
            retry: RetryState::default(),
            handle: Box::new(MemoryHandle {
                body: body.to_vec(),
                log: self.log.clone(),
            }),
        };
        let sender = self.sender.lock().unwrap();
        sender.as_ref().unwrap().send(message).unwrap();
    }

    pub fn settled(&self) -> Vec<Settled> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }
}

struct MemoryHandle {
    body: Vec<u8>,
    log: Log,
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
    async fn consume(&self) -> Result<Box<dyn DeliveryStream>, QueueError> {
        match self.pending.lock().unwrap().take() {
            Some(rx) => Ok(Box::new(MemoryStream(rx))),
            None => Err(QueueError::Unavailable("already consumed".into())),
        }
    }
    async fn publish_command(&self, body: &[u8], _meta: &EventMeta) -> Result<(), QueueError> {
        self.push(body);
        Ok(())
    }
    fn is_connected(&self) -> bool {
        true
    }
    async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

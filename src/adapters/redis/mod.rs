//! The idempotency and status store in Redis. Each key is one hash,
//! `{prefix}:msg:{idempotencyKey}`, changed only by Lua scripts, so every
//! transition is one atomic round trip:
//!
//! | field | meaning |
//! |---|---|
//! | `status` | `accepted`, `scheduled`, `processing`, `retrying`, `sent`, `failed` |
//! | `published` | `1` once the outcome's event is confirmed by the broker |
//! | `owner`, `holder`, `lease_until` | which claim holds the lease, of which instance, until when (Redis clock, ms) |
//! | `attempts` | provider calls made for the key (counted at the claim that makes one) |
//! | `first_attempt_ms` | when the first claim that could send was granted |
//! | `takeovers` | leases taken from a holder that was dead or whose lease ran out |
//! | `phone`, `parts`, `p:{partId}` | the destination; every part's provider id; each part's reported status |
//! | `send_at` | when a scheduled message is due (RFC 3339) |
//! | `cancelled` | `1` on a tombstone: `failed`, reason `cancelled`, by a cancel |
//! | `delivery`, `d_*` | the final status delivery reports set, the report that set it, and `d_published` once its SmsDeliveryReport is confirmed |
//! | others | the provider's id, segments, reason, times |
//!
//! `{prefix}:pid:{provider}:{providerMessageId}` maps a provider's id (of
//! each part) back to the idempotency key, for delivery reports (it
//! expires with the key); `{prefix}:hist:{key}` lists the key's distinct
//! reports (capped); `{prefix}:park:{provider}:{providerMessageId}` keeps
//! reports that came before their send was recorded (bounded, with a TTL);
//! `{prefix}:alive:{instance}` is an instance's liveness record, kept
//! alive by its heartbeat; `{prefix}:rcpt:{phoneNumber}` counts the
//! messages to one recipient for the per-recipient limits (a sorted set
//! of idempotency keys by time, expiring with the longest window). The scripts are in [`scripts`].
//!
//! In cluster mode the names carry hash tags so that each script touches
//! one slot ([`keys`]), and the transitions that span slots (the claim's
//! look at the holder's liveness, a send's provider ids and parked
//! reports, a delivery report, the report index) run as steps of one slot
//! each, every one safe to run again ([`RedisStore::link_parts`]).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::{Script, Value};

use crate::config::RedisSettings;
use crate::domain::{
    rfc3339, DeliveryReport, DeliveryStatus, FailureReason, IdempotencyKey, RateWindow,
    MAX_SCHEDULE_AHEAD,
};
use crate::ports::{
    Admission, CacheError, CacheService, CancelVerdict, Claim, FailedRecord, HistoryEntry,
    InvalidVerdict, MessageStatus, Owner, ProviderReport, RecipientSend, Recorded, ReportOutcome,
    Scheduled, SentRecord,
};

mod connection;
mod keys;
mod replication;
mod scripts;

use connection::Backend;
use keys::Keys;
use replication::Replication;

struct Scripts {
    claim: Script,
    admit: Script,
    withdraw: Script,
    schedule: Script,
    cancel: Script,
    record_invalid: Script,
    mark_published: Script,
    pin: Script,
    mark_invalid_published: Script,
    renew: Script,
    record_sent: Script,
    record_failed: Script,
    release: Script,
    record_recipient_send: Script,
    record_report: Script,
    mark_report_published: Script,
    unpublished_reports: Script,
    // Cluster mode's steps.
    link: Script,
    apply_reports: Script,
    index_unpublished: Script,
    drop_unpublished: Script,
}

/// Most reports kept in a key's history.
const HISTORY_CAP: usize = 50;
/// Most reports parked for one provider id not yet recorded.
const PARK_CAP: usize = 20;

/// The store over one multiplexed, self-reconnecting connection.
pub struct RedisStore {
    backend: Backend,
    /// Replicas a `sent` record waits for (`WAIT`), and how long at most.
    wait_replicas: u32,
    /// Set when `wait_replicas` > 0.
    replication: Option<Replication>,
    keys: Keys,
    ttl_secs: u64,
    lease_ms: u64,
    liveness_ttl_ms: u64,
    scripts: Scripts,
}

fn store_error(e: impl std::fmt::Display) -> CacheError {
    CacheError(e.to_string())
}

impl RedisStore {
    pub fn new(settings: &RedisSettings) -> Result<Self, CacheError> {
        Ok(Self {
            backend: Backend::new(settings)?,
            wait_replicas: settings.wait_replicas,
            replication: (settings.wait_replicas > 0)
                .then(|| Replication::new(settings))
                .transpose()?,
            keys: Keys::new(
                &settings.key_prefix,
                settings.mode == crate::config::RedisMode::Cluster,
            ),
            ttl_secs: settings.idempotency_ttl_secs,
            lease_ms: settings.lease_ms,
            liveness_ttl_ms: settings.liveness_ttl_ms,
            scripts: Scripts {
                claim: Script::new(scripts::CLAIM),
                admit: Script::new(scripts::ADMIT),
                withdraw: Script::new(scripts::WITHDRAW),
                schedule: Script::new(scripts::SCHEDULE),
                cancel: Script::new(scripts::CANCEL),
                record_invalid: Script::new(scripts::RECORD_INVALID),
                mark_published: Script::new(scripts::MARK_PUBLISHED),
                pin: Script::new(scripts::PIN),
                mark_invalid_published: Script::new(scripts::MARK_INVALID_PUBLISHED),
                renew: Script::new(scripts::RENEW),
                record_sent: Script::new(&scripts::record_sent()),
                record_failed: Script::new(&scripts::record_failed()),
                release: Script::new(scripts::RELEASE),
                record_recipient_send: Script::new(scripts::RECORD_RECIPIENT_SEND),
                record_report: Script::new(&scripts::record_report()),
                mark_report_published: Script::new(scripts::MARK_REPORT_PUBLISHED),
                unpublished_reports: Script::new(scripts::UNPUBLISHED_REPORTS),
                link: Script::new(scripts::LINK),
                apply_reports: Script::new(&scripts::apply_reports()),
                index_unpublished: Script::new(scripts::INDEX_UNPUBLISHED),
                drop_unpublished: Script::new(scripts::DROP_UNPUBLISHED),
            },
        })
    }

    /// Deletes `key`'s record if, and only if, it failed: atomically, so a
    /// record that turns `sent` meanwhile stays. Returns the status it had
    /// (empty: no record). Over the store's connection, so in sentinel
    /// mode it goes to the master the Sentinels name.
    pub async fn clear_failed(&self, key: &str) -> Result<String, CacheError> {
        let script = Script::new(scripts::CLEAR_FAILED);
        self.run(&script, &[&self.msg_key(key)], &[]).await
    }

    fn msg_key(&self, key: &str) -> String {
        self.keys.msg(key)
    }

    fn hist_key(&self, key: &str) -> String {
        self.keys.hist(key)
    }

    /// Cluster mode: maps each part's provider id to `key` and applies
    /// the reports parked for them, in steps of one slot each:
    ///
    /// 1. per part, [`scripts::LINK`] (its provider-id slot): the id now
    ///    leads to the key, so no later report for it is parked; answers
    ///    what was parked before;
    /// 2. when one of those may end the message, the key goes in the
    ///    unpublished index ([`scripts::INDEX_UNPUBLISHED`]) first;
    /// 3. [`scripts::apply_reports`] applies them to the message, and
    ///    when one set the final status the index entry is written again
    ///    ([`RedisStore::apply_indexed`]);
    /// 4. their park lists are deleted.
    ///
    /// Stopped anywhere (a crash, a lost reply), nothing is lost and no
    /// report applied twice changes anything (a repeat is `unchanged`):
    /// every step may run again. The caller of `record_sent` retries it
    /// until it succeeds and publishes SmsSent only after; a crash before
    /// that leaves the key `sent` and unpublished, and the claim that
    /// takes it over links it again (`claim`). Reports still parked after
    /// step 3 are applied again by the next report for the id
    /// (`record_report`). An index entry whose message got no final
    /// status is dropped by the sweeper. Answers whether a parked report
    /// set the final status (`Recorded::WrittenReported`).
    async fn link_parts(
        &self,
        key: &str,
        provider: &str,
        parts: &[String],
    ) -> Result<bool, CacheError> {
        let ttl = self.ttl_secs.to_string();
        let mut parked = Vec::new();
        for part in parts {
            let entries: Vec<String> = self
                .run(
                    &self.scripts.link,
                    &[
                        &self.keys.pid(provider, part),
                        &self.keys.park(provider, part),
                    ],
                    &[key, &ttl],
                )
                .await?;
            parked.extend(entries.into_iter().map(|e| (part.clone(), e)));
        }
        if parked.is_empty() {
            return Ok(false);
        }
        let answer = self.apply_reports(key, &parked).await?;
        let mut emptied: Vec<&String> = parked.iter().map(|(part, _)| part).collect();
        emptied.dedup();
        for part in emptied {
            self.delete(&self.keys.park(provider, part)).await?;
        }
        Ok(answer.first().map(String::as_str) == Some("publish"))
    }

    /// [`RedisStore::link_parts`] for a claim that was just granted a
    /// `sent` key, retried until it succeeds (0.1 s apart, doubling up to
    /// 2 s), as the send path's store writes are: the claim holds the key
    /// now, and an error would requeue the command to a new claim that
    /// finds the key busy with this one until its lease runs out, then
    /// counts a takeover. Every step may run again.
    async fn link_held(&self, key: &str, provider: &str, parts: &[String]) {
        let mut wait = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            match self.link_parts(key, provider, parts).await {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!(failures, "claim: linking a sent key's parts went through");
                    }
                    return;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::warn!(error = %e, "claim: cannot link a sent key's parts; retrying until the store answers");
                    }
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Cluster mode: steps 2 and 3 of [`RedisStore::link_parts`] for
    /// `reports` (part id, report as parked), also those of a report
    /// that finds its key (`record_report`). The index entry is written
    /// only when one of them is final (no other can end a message).
    async fn apply_reports(
        &self,
        key: &str,
        reports: &[(String, String)],
    ) -> Result<Vec<String>, CacheError> {
        let may_end = reports.iter().any(|(_, e)| {
            serde_json::from_str::<StoredReport>(e)
                .ok()
                .and_then(|r| DeliveryStatus::parse(&r.status))
                .is_none_or(DeliveryStatus::is_final)
        });
        if may_end {
            self.index_unpublished(key).await?;
        }
        self.apply_indexed(key, reports).await
    }

    /// Step 3 of [`RedisStore::apply_reports`], the index entry written:
    /// applies `reports`, and when they set the final status (`publish`)
    /// writes the key's index entry again, with a new score. The sweeper
    /// may have read the first entry while the apply was slow (a store
    /// retry through a failover can outlast its 30 s age), found no final
    /// status yet, and be about to drop the entry it read: it drops it only
    /// if its score is unchanged ([`scripts::DROP_UNPUBLISHED`]), so the
    /// entry written here stays, whatever the timing.
    async fn apply_indexed(
        &self,
        key: &str,
        reports: &[(String, String)],
    ) -> Result<Vec<String>, CacheError> {
        let cap = HISTORY_CAP.to_string();
        let mut args = vec![key, cap.as_str()];
        for (part, entry) in reports {
            args.push(part);
            args.push(entry);
        }
        let answer: Vec<String> = self
            .run(
                &self.scripts.apply_reports,
                &[&self.msg_key(key), &self.hist_key(key)],
                &args,
            )
            .await?;
        if answer.first().map(String::as_str) == Some("publish") {
            self.index_unpublished(key).await?;
        }
        Ok(answer)
    }

    /// Cluster mode: puts `key` in the unpublished index, scored now
    /// (Redis clock).
    async fn index_unpublished(&self, key: &str) -> Result<(), CacheError> {
        self.run::<i64>(
            &self.scripts.index_unpublished,
            &[&self.keys.unpublished()],
            &[key],
        )
        .await
        .map(drop)
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        pipe.del(key).ignore();
        self.retried(&pipe).await
    }

    /// Runs a script; see [`RedisStore::retried`].
    /// The `RELEASE` script: `release` (with its pin) or `postpone`.
    async fn release_lease(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
        postpone: bool,
        pinned: Option<&str>,
    ) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        let attempts = attempts.to_string();
        let postpone = if postpone { "1" } else { "0" };
        self.run::<i64>(
            &self.scripts.release,
            &[&msg],
            &[&owner.id, &attempts, &now(), postpone, pinned.unwrap_or("")],
        )
        .await
        .map(drop)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, CacheError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        let mut lease = self.backend.connection().await?;
        match invocation.invoke_async(&mut lease.conn).await {
            Ok(value) => Ok(value),
            Err(e) => {
                // A master gone (sentinel): the retry goes to the new one.
                self.backend.failed(&lease, &e);
                let mut lease = self.backend.connection().await?;
                invocation
                    .invoke_async(&mut lease.conn)
                    .await
                    .inspect_err(|e| self.backend.failed(&lease, e))
                    .map_err(store_error)
            }
        }
    }

    /// Runs a pipeline (or one command) and retries it once: the first
    /// command after a dropped connection fails while the manager
    /// reconnects, and one lost reply must not pause the instance. Every
    /// call of the store goes through this or [`RedisStore::run`]; each is
    /// idempotent, so running it twice is safe.
    async fn retried<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, CacheError> {
        let mut lease = self.backend.connection().await?;
        match pipe.query_async(&mut lease.conn).await {
            Ok(value) => Ok(value),
            Err(e) => {
                self.backend.failed(&lease, &e);
                let mut lease = self.backend.connection().await?;
                pipe.query_async(&mut lease.conn)
                    .await
                    .inspect_err(|e| self.backend.failed(&lease, e))
                    .map_err(store_error)
            }
        }
    }

    /// Waits until `wait_replicas` replicas have every write made before
    /// this call (the `sent` record just written), at most
    /// `wait_timeout_ms`; see [`Replication`]. A short count or an error is
    /// logged and counted, never an error: the record is written and the
    /// SMS is out; the wait only narrows what a failover could lose
    /// (README, guarantees).
    async fn wait_for_replicas(&self) {
        let Some(replication) = &self.replication else {
            return;
        };
        let (acknowledged, error) = replication.wait().await;
        if acknowledged < i64::from(self.wait_replicas) {
            metrics::counter!("sms_redis_wait_short_total").increment(1);
            tracing::warn!(
                acknowledged,
                wanted = self.wait_replicas,
                error,
                "a sent record reached fewer replicas than redis.wait_replicas asks"
            );
        }
    }
}

fn now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A hash read back from a script: flat field/value list.
fn fields(value: &Value) -> HashMap<String, String> {
    let Value::Array(items) = value else {
        return HashMap::new();
    };
    items
        .chunks(2)
        .filter_map(|pair| match pair {
            [k, v] => Some((text(k)?, text(v)?)),
            _ => None,
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(f: &HashMap<String, String>, name: &str) -> u32 {
    f.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn field(f: &HashMap<String, String>, name: &str) -> String {
    f.get(name).cloned().unwrap_or_default()
}

fn sent_record(f: &HashMap<String, String>) -> SentRecord {
    let id = field(f, "provider_message_id");
    SentRecord {
        provider: field(f, "provider"),
        other_part_ids: field(f, "parts")
            .split('\n')
            .filter(|p| !p.is_empty() && *p != id)
            .map(str::to_owned)
            .collect(),
        phone_number: field(f, "phone"),
        provider_message_id: id,
        segments: number(f, "segments"),
        attempts: number(f, "attempts"),
        sent_at: field(f, "sent_at"),
        traceparent: f.get("tp").filter(|t| !t.is_empty()).cloned(),
    }
}

/// A report as the scripts list it: key, phone, provider, provider
/// message id, status, provider status, error code, permanent, at.
fn report_of(f: &[String]) -> Result<DeliveryReport, CacheError> {
    let status = DeliveryStatus::parse(&f[4])
        .ok_or_else(|| CacheError(format!("bad delivery status {:?}", f[4])))?;
    Ok(DeliveryReport {
        idempotency_key: f[0].clone(),
        phone_number: f[1].clone(),
        provider: f[2].clone(),
        provider_message_id: f[3].clone(),
        status,
        provider_status: f[5].clone(),
        error_code: Some(f[6].clone()).filter(|c| !c.is_empty()),
        permanent: f[7] == "1",
        reported_at: f[8].clone(),
    })
}

/// A history entry as the scripts store it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredReport {
    status: String,
    provider_status: String,
    error_code: String,
    at: String,
}

impl StoredReport {
    fn entry(self) -> Option<HistoryEntry> {
        Some(HistoryEntry {
            status: DeliveryStatus::parse(&self.status)?,
            provider_status: self.provider_status,
            error_code: Some(self.error_code).filter(|c| !c.is_empty()),
            at: self.at,
        })
    }
}

/// The SmsDeliveryReport of a key whose delivery reports set a final
/// status, from its hash.
fn delivery_report(key: &str, f: &HashMap<String, String>) -> Option<DeliveryReport> {
    Some(DeliveryReport {
        idempotency_key: key.to_owned(),
        phone_number: field(f, "phone"),
        provider: field(f, "provider"),
        provider_message_id: field(f, "provider_message_id"),
        status: DeliveryStatus::parse(&field(f, "delivery"))?,
        provider_status: field(f, "d_provider_status"),
        error_code: Some(field(f, "d_error_code")).filter(|c| !c.is_empty()),
        permanent: field(f, "d_permanent") == "1",
        reported_at: field(f, "d_at"),
    })
}

fn failed_record(f: &HashMap<String, String>) -> FailedRecord {
    FailedRecord {
        reason: FailureReason::parse(&field(f, "reason"))
            .unwrap_or(FailureReason::RetriesExhausted),
        detail: field(f, "detail"),
        attempts: number(f, "attempts"),
        failed_at: field(f, "failed_at"),
    }
}

fn millis(value: Option<&Value>, default: u64) -> Duration {
    Duration::from_millis(
        value
            .and_then(text)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn count(value: Option<&Value>) -> u32 {
    value
        .and_then(text)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn recorded(written: i64) -> Recorded {
    if written == 0 {
        Recorded::Fenced
    } else {
        Recorded::Written
    }
}

#[async_trait]
impl CacheService for RedisStore {
    async fn claim(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        fingerprint: &str,
    ) -> Result<Claim, CacheError> {
        let msg = self.msg_key(key.as_str());
        let (lease, ttl, now) = (self.lease_ms.to_string(), self.ttl_secs.to_string(), now());
        let alive = self.keys.alive("");
        let liveness = self.liveness_ttl_ms.to_string();
        let base = [
            owner.id.as_str(),
            &owner.instance,
            &lease,
            &ttl,
            &now,
            &alive,
            fingerprint,
            &liveness,
        ];
        // Cluster mode: the holder's liveness as last observed (none yet),
        // read again while the script names another holder (scripts::CLAIM).
        let mut observed = (String::new(), String::new());
        let mut checks = 0;
        let reply: Vec<Value> = loop {
            let mut args = base.to_vec();
            if self.keys.cluster() {
                args.extend(["cluster", &observed.0, &observed.1]);
            }
            let reply: Vec<Value> = self.run(&self.scripts.claim, &[&msg], &args).await?;
            if reply.first().and_then(text).as_deref() != Some("check") {
                break reply;
            }
            // Another holder at each check means claims racing: bounded,
            // this command comes back later (not a store error, which
            // would pause the instance).
            checks += 1;
            if checks > 3 {
                return Ok(Claim::Contended);
            }
            let holder = reply.get(1).and_then(text).unwrap_or_default();
            let mut pipe = redis::pipe();
            pipe.pttl(self.keys.alive(&holder));
            let (pttl,): (i64,) = self.retried(&pipe).await?;
            observed = (holder, pttl.to_string());
        };
        let verdict = reply.first().and_then(text).unwrap_or_default();
        let f = fields(reply.get(1).unwrap_or(&Value::Nil));
        if self.keys.cluster() && verdict == "claimed" && field(&f, "status") == "sent" {
            // A record_sent whose holder stopped before linking its parts:
            // linked now, before its SmsSent goes out (link_parts).
            let r = sent_record(&f);
            if !r.provider_message_id.is_empty() {
                let mut parts = vec![r.provider_message_id.clone()];
                parts.extend(r.other_part_ids.iter().cloned());
                self.link_held(key.as_str(), &r.provider, &parts).await;
            }
        }
        let first_attempt_ms = |at: usize| {
            reply
                .get(at)
                .and_then(text)
                .and_then(|v| v.parse().ok())
                .unwrap_or_default()
        };
        Ok(match (verdict.as_str(), field(&f, "status").as_str()) {
            ("new", _) => Claim::Send {
                attempts: 0,
                first_attempt_ms: first_attempt_ms(1),
                takeovers: 0,
                took_over: false,
                pinned: None,
            },
            ("send", _) => Claim::Send {
                attempts: count(reply.get(1)),
                first_attempt_ms: first_attempt_ms(2),
                takeovers: count(reply.get(3)),
                took_over: count(reply.get(4)) == 1,
                pinned: reply.get(5).and_then(text).filter(|p| !p.is_empty()),
            },
            ("busy", _) => Claim::Busy {
                lease_left: millis(reply.get(1), self.lease_ms),
                holder_alive_for: millis(reply.get(2), self.lease_ms),
            },
            ("cancelling", _) => Claim::Cancelling {
                retry_in: millis(reply.get(1), self.lease_ms)
                    .min(millis(reply.get(2), self.lease_ms)),
            },
            ("done", "failed") => Claim::AlreadyFailed(failed_record(&f)),
            ("done", _) => Claim::AlreadySent,
            ("claimed", "sent" | "delivered" | "undelivered") => {
                Claim::PublishSent(sent_record(&f))
            }
            ("claimed", "failed") => Claim::PublishFailed(failed_record(&f)),
            _ => return Err(CacheError(format!("unexpected claim reply {verdict:?}"))),
        })
    }

    async fn pin(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        provider: &str,
    ) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        self.run::<i64>(&self.scripts.pin, &[&msg], &[&owner.id, provider])
            .await
            .map(drop)
    }

    async fn renew(&self, key: &IdempotencyKey, owner: &Owner) -> Result<Recorded, CacheError> {
        let msg = self.msg_key(key.as_str());
        let lease = self.lease_ms.to_string();
        self.run::<i64>(&self.scripts.renew, &[&msg], &[&owner.id, &lease])
            .await
            .map(recorded)
    }

    async fn record_sent(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        r: &SentRecord,
    ) -> Result<Recorded, CacheError> {
        let msg = self.msg_key(key.as_str());
        let hist = self.hist_key(key.as_str());
        let (segments, attempts) = (r.segments.to_string(), r.attempts.to_string());
        let (ttl, lease) = (self.ttl_secs.to_string(), self.lease_ms.to_string());
        let mut parts = r.provider_message_id.clone();
        for id in &r.other_part_ids {
            parts.push('\n');
            parts.push_str(id);
        }
        let (pid_prefix, park_prefix) = (
            self.keys.pid(&r.provider, ""),
            self.keys.park(&r.provider, ""),
        );
        let cap = HISTORY_CAP.to_string();
        let unpublished = self.keys.unpublished();
        let mut args = vec![
            owner.id.as_str(),
            &lease,
            &r.provider,
            &r.provider_message_id,
            &segments,
            &attempts,
            &r.sent_at,
            &ttl,
            key.as_str(),
            &owner.instance,
            &r.phone_number,
            &parts,
            &pid_prefix,
            &park_prefix,
            &cap,
            &unpublished,
            r.traceparent.as_deref().unwrap_or_default(),
        ];
        if self.keys.cluster() {
            // The record alone, then its parts linked (link_parts).
            args.push("cluster");
            let written: i64 = self.run(&self.scripts.record_sent, &[&msg], &args).await?;
            if written == 0 || r.provider_message_id.is_empty() {
                return Ok(recorded(written));
            }
            let mut ids = vec![r.provider_message_id.clone()];
            ids.extend(r.other_part_ids.iter().cloned());
            let reported = self.link_parts(key.as_str(), &r.provider, &ids).await?;
            return Ok(if written == 2 || reported {
                Recorded::WrittenReported
            } else {
                Recorded::Written
            });
        }
        let pid = self.keys.pid(&r.provider, &r.provider_message_id);
        let written: i64 = self
            .run(&self.scripts.record_sent, &[&msg, &pid, &hist], &args)
            .await?;
        if written != 0 {
            self.wait_for_replicas().await;
        }
        Ok(match written {
            2 => Recorded::WrittenReported,
            n => recorded(n),
        })
    }

    async fn record_failed(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        r: &FailedRecord,
    ) -> Result<Recorded, CacheError> {
        let msg = self.msg_key(key.as_str());
        let (attempts, ttl) = (r.attempts.to_string(), self.ttl_secs.to_string());
        let lease = self.lease_ms.to_string();
        let args = [
            owner.id.as_str(),
            &lease,
            r.reason.as_str(),
            &r.detail,
            &attempts,
            &r.failed_at,
            &ttl,
            &owner.instance,
        ];
        self.run::<i64>(&self.scripts.record_failed, &[&msg], &args)
            .await
            .map(recorded)
    }

    async fn mark_published(&self, key: &IdempotencyKey, owner: &Owner) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        let ttl = self.ttl_secs.to_string();
        self.run::<i64>(&self.scripts.mark_published, &[&msg], &[&owner.id, &ttl])
            .await
            .map(drop)
    }

    async fn mark_invalid_published(&self, key: &IdempotencyKey) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        let ttl = self.ttl_secs.to_string();
        self.run::<i64>(&self.scripts.mark_invalid_published, &[&msg], &[&ttl])
            .await
            .map(drop)
    }

    async fn release(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
        pinned: Option<&str>,
    ) -> Result<(), CacheError> {
        self.release_lease(key, owner, attempts, false, pinned)
            .await
    }

    async fn postpone(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        attempts: u32,
    ) -> Result<(), CacheError> {
        self.release_lease(key, owner, attempts, true, None).await
    }

    async fn record_recipient_send(
        &self,
        recipient: &str,
        key: &IdempotencyKey,
        windows: &[RateWindow],
    ) -> Result<RecipientSend, CacheError> {
        let cap = windows
            .iter()
            .map(|w| w.limit)
            .max()
            .unwrap_or(1)
            .to_string();
        let mut args = vec![key.as_str().to_owned(), cap];
        for w in windows {
            args.push(w.window.as_millis().to_string());
            args.push(w.limit.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rcpt = self.keys.recipient(recipient);
        let reply: Vec<String> = self
            .run(&self.scripts.record_recipient_send, &[&rcpt], &args)
            .await?;
        Ok(match reply.as_slice() {
            [verdict] if verdict == "counted" => RecipientSend::Counted,
            [verdict] if verdict == "counted_before" => RecipientSend::CountedBefore,
            [verdict, wait] if verdict == "limited" => RecipientSend::Limited {
                retry_after: Duration::from_millis(wait.parse().map_err(store_error)?),
            },
            other => {
                return Err(CacheError(format!(
                    "record_recipient_send answered {other:?}"
                )))
            }
        })
    }

    async fn admit(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
    ) -> Result<Admission, CacheError> {
        let msg = self.msg_key(key.as_str());
        let (ttl, now) = (self.ttl_secs.to_string(), now());
        let verdict: String = self
            .run(&self.scripts.admit, &[&msg], &[fingerprint, &ttl, &now])
            .await?;
        Ok(match verdict.as_str() {
            "new" => Admission::New,
            "conflict" => Admission::Conflict,
            _ => Admission::Same,
        })
    }

    async fn withdraw(&self, key: &IdempotencyKey) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        self.run::<i64>(&self.scripts.withdraw, &[&msg], &[])
            .await
            .map(drop)
    }

    async fn schedule(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        phone_number: &str,
        send_at: SystemTime,
    ) -> Result<Scheduled, CacheError> {
        let msg = self.msg_key(key.as_str());
        // Until it is due, then as long as any record.
        let ahead = send_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let ttl = (ahead.as_secs() + 1).saturating_add(self.ttl_secs);
        let (send_at, ttl, now) = (rfc3339(send_at), ttl.to_string(), now());
        let args = [fingerprint, phone_number, &send_at, &ttl, &now];
        let verdict: String = self.run(&self.scripts.schedule, &[&msg], &args).await?;
        Ok(match verdict.as_str() {
            "scheduled" => Scheduled::Held,
            _ => Scheduled::Known,
        })
    }

    async fn cancel(
        &self,
        key: &IdempotencyKey,
        owner: &Owner,
        detail: &str,
    ) -> Result<CancelVerdict, CacheError> {
        let msg = self.msg_key(key.as_str());
        // A command still on its way may be due up to 30 days from now.
        let keep = MAX_SCHEDULE_AHEAD.as_secs().saturating_add(self.ttl_secs);
        let (lease, keep, now) = (self.lease_ms.to_string(), keep.to_string(), now());
        let args = [
            owner.id.as_str(),
            &owner.instance,
            &lease,
            detail,
            &now,
            &keep,
        ];
        let reply: Vec<Value> = self.run(&self.scripts.cancel, &[&msg], &args).await?;
        let verdict = reply.first().and_then(text).unwrap_or_default();
        Ok(match verdict.as_str() {
            "publish" => {
                let f = fields(reply.get(1).unwrap_or(&Value::Nil));
                CancelVerdict::Publish {
                    record: failed_record(&f),
                    phone_number: field(&f, "phone"),
                }
            }
            "cancelled" => CancelVerdict::Cancelled {
                known: reply.get(1).and_then(text).as_deref() == Some("known"),
            },
            "too_late" => CancelVerdict::TooLate,
            _ => return Err(CacheError(format!("unexpected cancel reply {verdict:?}"))),
        })
    }

    async fn record_invalid(
        &self,
        key: &IdempotencyKey,
        r: &FailedRecord,
    ) -> Result<InvalidVerdict, CacheError> {
        let msg = self.msg_key(key.as_str());
        let ttl = self.ttl_secs.to_string();
        let args = [r.reason.as_str(), &r.detail, &r.failed_at, &ttl];
        let verdict: String = self
            .run(&self.scripts.record_invalid, &[&msg], &args)
            .await?;
        Ok(match verdict.as_str() {
            "recorded" => InvalidVerdict::Recorded,
            "unpublished" => InvalidVerdict::Unpublished,
            _ => InvalidVerdict::Known,
        })
    }

    async fn status(&self, key: &str) -> Result<Option<MessageStatus>, CacheError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(self.msg_key(key))
            .lrange(self.hist_key(key), 0, -1);
        let (f, history): (HashMap<String, String>, Vec<String>) = self.retried(&pipe).await?;
        if f.is_empty() {
            return Ok(None);
        }
        let delivery_status = DeliveryStatus::parse(&field(&f, "delivery"));
        let status = match (field(&f, "status").as_str(), delivery_status) {
            ("retrying" | "accepted" | "", _) => "processing".to_owned(),
            ("sent", Some(final_status)) => final_status.as_str().to_owned(),
            (other, _) => other.to_owned(),
        };
        let present = |name: &str| f.get(name).filter(|v| !v.is_empty()).cloned();
        Ok(Some(MessageStatus {
            send_at: present("send_at"),
            provider_message_id: present("provider_message_id"),
            attempts: number(&f, "attempts"),
            updated_at: field(&f, "updated_at"),
            reason: present("reason").filter(|_| status == "failed"),
            detail: present("detail").filter(|_| status == "failed"),
            provider: present("provider"),
            delivery_status,
            history: history
                .iter()
                .filter_map(|e| serde_json::from_str::<StoredReport>(e).ok())
                .filter_map(StoredReport::entry)
                .collect(),
            status,
        }))
    }

    async fn record_report(
        &self,
        provider: &str,
        report: &ProviderReport,
        reported_at: &str,
        park_ttl: Option<Duration>,
    ) -> Result<ReportOutcome, CacheError> {
        let id = &report.provider_message_id;
        let (pid, park) = (self.keys.pid(provider, id), self.keys.park(provider, id));
        let (msg_prefix, hist_prefix) = (self.msg_key(""), self.hist_key(""));
        let park_ttl = park_ttl.map_or(0, |t| t.as_secs().max(1)).to_string();
        let (hist_cap, park_cap) = (HISTORY_CAP.to_string(), PARK_CAP.to_string());
        let unpublished = self.keys.unpublished();
        let permanent = if report.permanent { "1" } else { "0" };
        let mut args = vec![
            msg_prefix.as_str(),
            &hist_prefix,
            id,
            report.status.as_str(),
            &report.provider_status,
            report.error_code.as_deref().unwrap_or_default(),
            permanent,
            reported_at,
            &park_ttl,
            &hist_cap,
            &park_cap,
            &unpublished,
        ];
        if self.keys.cluster() {
            args.push("cluster");
        }
        let mut answer: Vec<String> = self
            .run(&self.scripts.record_report, &[&pid, &park], &args)
            .await?;
        if answer.first().map(String::as_str) == Some("found") && answer.len() >= 2 {
            // Cluster mode: the id leads to a key; this report, and any
            // left parked by a link that stopped half-way, are applied to
            // it (link_parts, steps 2 and 3), then those are deleted.
            let leftover = answer.split_off(2);
            let key = answer.pop().unwrap_or_default();
            let this = serde_json::json!({
                "status": report.status.as_str(),
                "providerStatus": report.provider_status,
                "errorCode": report.error_code.as_deref().unwrap_or_default(),
                "permanent": permanent,
                "at": reported_at,
            })
            .to_string();
            let mut reports = vec![(id.clone(), this)];
            reports.extend(leftover.iter().map(|e| (id.clone(), e.clone())));
            answer = self.apply_reports(&key, &reports).await?;
            if !leftover.is_empty() {
                self.delete(&park).await?;
            }
        }
        Ok(match answer.first().map(String::as_str) {
            Some("publish") if answer.len() == 11 => ReportOutcome::Publish {
                report: report_of(&answer[1..10])?,
                send_trace: Some(answer[10].clone()).filter(|t| !t.is_empty()),
            },
            Some("parked") => ReportOutcome::Parked,
            Some("unmatched") => ReportOutcome::Unmatched,
            Some("unchanged") => ReportOutcome::Unchanged,
            other => return Err(CacheError(format!("record_report answered {other:?}"))),
        })
    }

    async fn pending_report(&self, key: &str) -> Result<Option<DeliveryReport>, CacheError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(self.msg_key(key));
        let (f,): (HashMap<String, String>,) = self.retried(&pipe).await?;
        Ok(delivery_report(key, &f).filter(|_| field(&f, "d_published") == "0"))
    }

    async fn mark_report_published(
        &self,
        key: &str,
        status: DeliveryStatus,
    ) -> Result<(), CacheError> {
        let (msg, unpublished) = (self.msg_key(key), self.keys.unpublished());
        if self.keys.cluster() {
            // The message first: stopped before the index entry goes, the
            // sweeper drops it (its report is confirmed).
            let marked: i64 = self
                .run(
                    &self.scripts.mark_report_published,
                    &[&msg],
                    &[status.as_str(), key],
                )
                .await?;
            if marked == 1 {
                let mut pipe = redis::pipe();
                pipe.zrem(&unpublished, key).ignore();
                self.retried::<()>(&pipe).await?;
            }
            return Ok(());
        }
        self.run::<i64>(
            &self.scripts.mark_report_published,
            &[&msg, &unpublished],
            &[status.as_str(), key],
        )
        .await
        .map(drop)
    }

    async fn unpublished_reports(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<DeliveryReport>, CacheError> {
        let (unpublished, msg_prefix) = (self.keys.unpublished(), self.msg_key(""));
        let (age, limit) = (older_than.as_millis().to_string(), limit.to_string());
        if self.keys.cluster() {
            // The index, then each message in its own slot; an entry is
            // dropped only if no report indexed its key again meanwhile.
            let flat: Vec<String> = self
                .run(
                    &self.scripts.unpublished_reports,
                    &[&unpublished],
                    &[&msg_prefix, &age, &limit, "cluster"],
                )
                .await?;
            let mut reports = Vec::new();
            for pair in flat.chunks_exact(2) {
                let (key, score) = (&pair[0], &pair[1]);
                match self.pending_report(key).await? {
                    Some(report) => reports.push(report),
                    None => {
                        self.run::<i64>(
                            &self.scripts.drop_unpublished,
                            &[&unpublished],
                            &[key, score],
                        )
                        .await?;
                    }
                }
            }
            return Ok(reports);
        }
        let flat: Vec<String> = self
            .run(
                &self.scripts.unpublished_reports,
                &[&unpublished],
                &[&msg_prefix, &age, &limit],
            )
            .await?;
        flat.chunks_exact(9).map(report_of).collect()
    }

    async fn heartbeat(&self, instance: &str, ttl: Duration) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.alive(instance))
            .arg("1")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .ignore();
        self.retried(&pipe).await
    }

    async fn retire(&self, instance: &str) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        pipe.del(self.keys.alive(instance)).ignore();
        self.retried(&pipe).await
    }

    /// A write, not a PING: a replica after a failover, or a server at
    /// maxmemory, answers PING but refuses the writes the service needs.
    async fn ping(&self) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.health())
            .arg("1")
            .arg("PX")
            .arg(10_000)
            .ignore();
        self.retried(&pipe).await
    }
}

/// The cluster mode's steps against the standalone test server
/// (127.0.0.1:6379): the scripts are the same, and one server holds every
/// slot, so a test can run the steps one at a time in any interleaving.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sent_record;

    fn cluster_store(prefix: &str) -> RedisStore {
        let env = [("SMS__REDIS__KEY_PREFIX", prefix)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let settings = crate::config::Settings::load_from(
            None,
            crate::config::environment().source(Some(env)),
        )
        .unwrap();
        let mut store = RedisStore::new(&settings.redis).unwrap();
        store.keys = Keys::new(prefix, true);
        store
    }

    fn unique_prefix() -> String {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("test:rcfix:{}:{nanos}", std::process::id())
    }

    async fn connection() -> redis::aio::MultiplexedConnection {
        redis::Client::open("redis://127.0.0.1:6379")
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis on 127.0.0.1:6379")
    }

    async fn delete_keys(prefix: &str) {
        let mut c = connection().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut c)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }

    /// A final report whose apply step outlasts the sweeper's age: its
    /// index entry (written first) is read by the sweeper, which finds no
    /// final status yet; the apply then sets it; the sweeper's drop of the
    /// entry it read must not remove the key from the index, or nothing
    /// publishes the report if the callback's own publish fails.
    #[tokio::test]
    async fn a_slow_apply_keeps_its_index_entry_from_the_sweeper() {
        let prefix = unique_prefix();
        let store = cluster_store(&prefix);
        let key = IdempotencyKey::parse("slow}1").unwrap();
        let owner = Owner::new("rcfix", 1);
        assert!(matches!(
            store.claim(&key, &owner, "fp").await.unwrap(),
            Claim::Send { .. }
        ));
        store
            .record_sent(&key, &owner, &sent_record("m-1"))
            .await
            .unwrap();
        let unpublished = store.keys.unpublished();
        let mut c = connection().await;
        // The callback's index step, a minute ago (older than the age).
        let long_ago = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            - 60_000;
        let _: () = redis::cmd("ZADD")
            .arg(&unpublished)
            .arg(long_ago.to_string())
            .arg(key.as_str())
            .query_async(&mut c)
            .await
            .unwrap();
        // The sweeper reads the entry, and the message: no final status.
        let read: Vec<String> = store
            .run(
                &store.scripts.unpublished_reports,
                &[&unpublished],
                &[&store.msg_key(""), "30000", "100", "cluster"],
            )
            .await
            .unwrap();
        assert_eq!(read.first().map(String::as_str), Some(key.as_str()));
        let score = read[1].clone();
        assert!(store.pending_report(key.as_str()).await.unwrap().is_none());
        // The callback's apply step, at last.
        let report = serde_json::json!({"status": "delivered", "providerStatus": "DELIVRD",
            "errorCode": "", "permanent": "0", "at": "2026-12-01T10:00:05Z"});
        let answer = store
            .apply_indexed(key.as_str(), &[("m-1".into(), report.to_string())])
            .await
            .unwrap();
        assert_eq!(answer.first().map(String::as_str), Some("publish"));
        // The sweeper drops the entry it read.
        let _: i64 = store
            .run(
                &store.scripts.drop_unpublished,
                &[&unpublished],
                &[key.as_str(), &score],
            )
            .await
            .unwrap();
        let kept: Option<f64> = redis::cmd("ZSCORE")
            .arg(&unpublished)
            .arg(key.as_str())
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(
            kept.is_some(),
            "the index entry is gone: nothing would publish the report"
        );
        let found = store
            .unpublished_reports(Duration::ZERO, 100)
            .await
            .unwrap();
        assert_eq!(
            found.iter().map(|r| r.status).collect::<Vec<_>>(),
            [DeliveryStatus::Delivered],
            "the sweeper publishes it"
        );
        delete_keys(&prefix).await;
    }

    /// A claim that takes over a `sent` key whose parts were never linked
    /// links them before it answers; a link that fails (here: a park key
    /// of the wrong type) is retried until it succeeds, not turned into a
    /// store error that would requeue the command to a claim finding the
    /// key busy with this one.
    #[tokio::test]
    async fn a_takeover_whose_link_fails_retries_it_and_keeps_the_key() {
        let prefix = unique_prefix();
        let store = cluster_store(&prefix);
        let key = IdempotencyKey::parse("link}2").unwrap();
        let dead = Owner::new("rcfixdead", 1);
        store.claim(&key, &dead, "fp").await.unwrap();
        store
            .record_sent(&key, &dead, &sent_record("m-2"))
            .await
            .unwrap();
        // Killed before linking; its lease over; the link will fail.
        let mut c = connection().await;
        let (pid, park) = (
            store.keys.pid("fake", "m-2"),
            store.keys.park("fake", "m-2"),
        );
        let _: () = redis::pipe()
            .del(&pid)
            .set(&park, "not a list")
            .hset(store.msg_key(key.as_str()), "lease_until", "1")
            .query_async(&mut c)
            .await
            .unwrap();
        let owner = Owner::new("rcfixlive", 1);
        let claim = store.claim(&key, &owner, "fp");
        tokio::pin!(claim);
        tokio::select! {
            answer = &mut claim => panic!("answered while the link fails: {answer:?}"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let _: () = redis::cmd("DEL")
            .arg(&park)
            .query_async(&mut c)
            .await
            .unwrap();
        let answer = claim.await.unwrap();
        assert!(matches!(answer, Claim::PublishSent(_)), "{answer:?}");
        let linked: Option<String> = redis::cmd("GET")
            .arg(&pid)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(linked.as_deref(), Some("link}2"));
        let (holder, takeovers): (String, String) = redis::cmd("HMGET")
            .arg(store.msg_key(key.as_str()))
            .arg("owner")
            .arg("takeovers")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(
            (holder.as_str(), takeovers.as_str()),
            (owner.id.as_str(), "1")
        );
        delete_keys(&prefix).await;
    }
}

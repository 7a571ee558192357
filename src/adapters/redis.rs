//! The idempotency and status store in Redis. Each key is one hash,
//! `{prefix}:msg:{idempotencyKey}`, changed only by Lua scripts, so every
//! transition is one atomic round trip:
//!
//! | field | meaning |
//! |---|---|
//! | `status` | `processing`, `retrying`, `sent`, `failed`, `delivered`, `undelivered` |
//! | `published` | `1` once the outcome's event is confirmed by the broker |
//! | `owner`, `lease_until` | who holds the lease, until when (Redis clock, ms) |
//! | `attempts` | provider calls made for the key |
//! | others | the provider's id, segments, reason, times |
//!
//! `{prefix}:pid:{provider}:{providerMessageId}` maps a provider's id back
//! to the idempotency key, for delivery reports, and
//! `{prefix}:redeliveries:{sha256 of a body}` counts broker redeliveries to
//! catch poison messages. All expire after the idempotency TTL.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use crate::config::RedisSettings;
use crate::domain::{rfc3339, DeliveryStatus, FailureReason, IdempotencyKey};
use crate::ports::{CacheError, CacheService, Claim, FailedRecord, MessageStatus, SentRecord};

const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'status', 'published', 'lease_until', 'owner')
local status = h[1]
if not status then
  redis.call('HSET', KEYS[1], 'status', 'processing', 'attempts', '0', 'published', '0',
    'owner', ARGV[1], 'lease_until', tostring(now + tonumber(ARGV[2])), 'updated_at', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if status ~= 'processing' and status ~= 'retrying' and h[2] == '1' then
  if status == 'failed' then
    return {'done', redis.call('HGETALL', KEYS[1])}
  end
  return {'done'}
end
-- A lease of this very owner is this claim retried after a lost reply.
if tonumber(h[3] or '0') > now and h[4] ~= ARGV[1] then
  return {'busy', tostring(tonumber(h[3]) - now)}
end
if status == 'retrying' then
  redis.call('HSET', KEYS[1], 'status', 'processing')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until', tostring(now + tonumber(ARGV[2])), 'updated_at', ARGV[4])
return {'claimed', redis.call('HGETALL', KEYS[1])}
"#;

const RECORD_SENT: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'sent' or status == 'delivered' or status == 'undelivered' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'sent', 'published', ARGV[8], 'provider', ARGV[1],
  'provider_message_id', ARGV[2], 'segments', ARGV[3], 'attempts', ARGV[4], 'sent_at', ARGV[5],
  'updated_at', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[7], 'EX', ARGV[6])
end
return 1
"#;

const RECORD_FAILED: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'sent' or status == 'delivered' or status == 'undelivered' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'published', ARGV[6], 'reason', ARGV[1],
  'detail', ARGV[2], 'attempts', ARGV[3], 'failed_at', ARGV[4], 'updated_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"#;

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
if redis.call('HGET', KEYS[1], 'status') == 'processing' then
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'attempts', ARGV[2], 'updated_at', ARGV[3])
end
return 1
"#;

const RECORD_DELIVERY: &str = r#"
local key = redis.call('GET', KEYS[1])
if not key then return false end
local msg = ARGV[1] .. key
local status = redis.call('HGET', msg, 'status')
if status == 'sent' or status == 'delivered' or status == 'undelivered' then
  redis.call('HSET', msg, 'status', ARGV[2], 'updated_at', ARGV[3], 'error_code', ARGV[4])
end
return key
"#;

struct Scripts {
    claim: Script,
    record_sent: Script,
    record_failed: Script,
    release: Script,
    record_delivery: Script,
}

/// The store over one multiplexed, self-reconnecting connection.
pub struct RedisStore {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Made on first use, so the service starts while Redis is still away.
    manager: OnceCell<ConnectionManager>,
    prefix: String,
    ttl_secs: u64,
    lease_ms: u64,
    scripts: Scripts,
}

fn store_error(e: impl std::fmt::Display) -> CacheError {
    CacheError(e.to_string())
}

impl RedisStore {
    pub fn new(settings: &RedisSettings) -> Result<Self, CacheError> {
        let client = redis::Client::open(settings.url.expose_secret()).map_err(store_error)?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        Ok(Self {
            client,
            config,
            manager: OnceCell::new(),
            prefix: settings.key_prefix.clone(),
            ttl_secs: settings.idempotency_ttl_secs,
            lease_ms: settings.lease_ms,
            scripts: Scripts {
                claim: Script::new(CLAIM),
                record_sent: Script::new(RECORD_SENT),
                record_failed: Script::new(RECORD_FAILED),
                release: Script::new(RELEASE),
                record_delivery: Script::new(RECORD_DELIVERY),
            },
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        self.manager
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), self.config.clone())
            })
            .await
            .cloned()
            .map_err(store_error)
    }

    fn msg_key(&self, key: &str) -> String {
        format!("{}:msg:{key}", self.prefix)
    }

    fn pid_key(&self, provider: &str, provider_message_id: &str) -> String {
        format!("{}:pid:{provider}:{provider_message_id}", self.prefix)
    }

    /// Runs a script; a failure is retried once, since the first command
    /// after a dropped connection fails while the manager reconnects.
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
        let mut connection = self.connection().await?;
        match invocation.invoke_async(&mut connection).await {
            Ok(value) => Ok(value),
            Err(_) => invocation
                .invoke_async(&mut connection)
                .await
                .map_err(store_error),
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
    SentRecord {
        provider: field(f, "provider"),
        provider_message_id: field(f, "provider_message_id"),
        segments: number(f, "segments"),
        attempts: number(f, "attempts"),
        sent_at: field(f, "sent_at"),
    }
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

#[async_trait]
impl CacheService for RedisStore {
    async fn claim(&self, key: &IdempotencyKey, owner: &str) -> Result<Claim, CacheError> {
        let msg = self.msg_key(key.as_str());
        let (lease, ttl, now) = (self.lease_ms.to_string(), self.ttl_secs.to_string(), now());
        let reply: Vec<Value> = self
            .run(&self.scripts.claim, &[&msg], &[owner, &lease, &ttl, &now])
            .await?;
        let verdict = reply.first().and_then(text).unwrap_or_default();
        let detail = reply.get(1).cloned().unwrap_or(Value::Nil);
        let f = fields(&detail);
        let status = field(&f, "status");
        Ok(match (verdict.as_str(), status.as_str()) {
            ("new", _) => Claim::Send { attempts: 0 },
            ("busy", _) => Claim::Busy {
                lease_left: Duration::from_millis(
                    text(&detail)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(self.lease_ms),
                ),
            },
            ("done", "failed") => Claim::AlreadyFailed(failed_record(&f)),
            ("done", _) => Claim::AlreadySent,
            ("claimed", "sent" | "delivered" | "undelivered") => {
                Claim::PublishSent(sent_record(&f))
            }
            ("claimed", "failed") => Claim::PublishFailed(failed_record(&f)),
            ("claimed", _) => Claim::Send {
                attempts: number(&f, "attempts"),
            },
            _ => return Err(CacheError(format!("unexpected claim reply {verdict:?}"))),
        })
    }

    async fn record_sent(
        &self,
        key: &IdempotencyKey,
        r: &SentRecord,
        published: bool,
    ) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        let pid = self.pid_key(&r.provider, &r.provider_message_id);
        let (segments, attempts) = (r.segments.to_string(), r.attempts.to_string());
        let ttl = self.ttl_secs.to_string();
        let args = [
            r.provider.as_str(),
            &r.provider_message_id,
            &segments,
            &attempts,
            &r.sent_at,
            &ttl,
            key.as_str(),
            if published { "1" } else { "0" },
        ];
        self.run::<i64>(&self.scripts.record_sent, &[&msg, &pid], &args)
            .await
            .map(drop)
    }

    async fn record_failed(
        &self,
        key: &IdempotencyKey,
        r: &FailedRecord,
        published: bool,
    ) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        let (attempts, ttl) = (r.attempts.to_string(), self.ttl_secs.to_string());
        let published = if published { "1" } else { "0" };
        let args = [
            r.reason.as_str(),
            &r.detail,
            &attempts,
            &r.failed_at,
            &ttl,
            published,
        ];
        self.run::<i64>(&self.scripts.record_failed, &[&msg], &args)
            .await
            .map(drop)
    }

    async fn mark_published(&self, key: &IdempotencyKey, _owner: &str) -> Result<(), CacheError> {
        // Two plain commands in one round trip, no script and no MULTI:
        // once `published` is 1 a claim answers "done" before it looks at
        // the lease, so the lease fields may stay; both commands are
        // idempotent, and the EXPIRE keeps a hash that expired meanwhile
        // from living on without a TTL.
        let msg = self.msg_key(key.as_str());
        let mut pipe = redis::pipe();
        pipe.hset(&msg, "published", "1")
            .ignore()
            .expire(&msg, self.ttl_secs as i64)
            .ignore();
        let mut connection = self.connection().await?;
        match pipe.query_async::<()>(&mut connection).await {
            Ok(()) => Ok(()),
            // The first command after a dropped connection fails.
            Err(_) => pipe.query_async(&mut connection).await.map_err(store_error),
        }
    }

    async fn release(
        &self,
        key: &IdempotencyKey,
        owner: &str,
        attempts: u32,
    ) -> Result<(), CacheError> {
        let msg = self.msg_key(key.as_str());
        let attempts = attempts.to_string();
        self.run::<i64>(&self.scripts.release, &[&msg], &[owner, &attempts, &now()])
            .await
            .map(drop)
    }

    async fn status(&self, key: &str) -> Result<Option<MessageStatus>, CacheError> {
        let mut connection = self.connection().await?;
        let f: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.msg_key(key))
            .query_async(&mut connection)
            .await
            .map_err(store_error)?;
        if f.is_empty() {
            return Ok(None);
        }
        let status = match field(&f, "status").as_str() {
            "retrying" => "processing".to_owned(),
            other => other.to_owned(),
        };
        Ok(Some(MessageStatus {
            status,
            provider_message_id: f
                .get("provider_message_id")
                .filter(|v| !v.is_empty())
                .cloned(),
            attempts: number(&f, "attempts"),
            updated_at: field(&f, "updated_at"),
        }))
    }

    async fn record_delivery(
        &self,
        provider: &str,
        provider_message_id: &str,
        status: DeliveryStatus,
        error_code: Option<&str>,
    ) -> Result<Option<String>, CacheError> {
        let pid = self.pid_key(provider, provider_message_id);
        let msg_prefix = self.msg_key("");
        let args = [
            msg_prefix.as_str(),
            status.as_str(),
            &now(),
            error_code.unwrap_or(""),
        ];
        self.run(&self.scripts.record_delivery, &[&pid], &args)
            .await
    }

    async fn count_redelivery(&self, fingerprint: &str) -> Result<u32, CacheError> {
        let key = format!("{}:redeliveries:{fingerprint}", self.prefix);
        let mut connection = self.connection().await?;
        let (count,): (u32,) = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, self.ttl_secs as i64)
            .ignore()
            .query_async(&mut connection)
            .await
            .map_err(store_error)?;
        Ok(count)
    }

    /// A write, not a PING: a replica after a failover, or a server at
    /// maxmemory, answers PING but refuses the writes the service needs.
    async fn ping(&self) -> Result<(), CacheError> {
        let mut connection = self.connection().await?;
        redis::cmd("SET")
            .arg(format!("{}:health", self.prefix))
            .arg("1")
            .arg("PX")
            .arg(10_000)
            .query_async::<()>(&mut connection)
            .await
            .map_err(store_error)
    }
}

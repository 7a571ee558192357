//! `sms-service dead-letters` and `forget`: what is in the dead-letter
//! queue, moving it back to the command queue once the cause is fixed, and
//! clearing a failed key so that its command is sent afresh.
//!
//! `list` reads without removing (it takes messages unacknowledged and
//! hands them all back when done). `replay` moves each message with a
//! confirmed publish to the command queue *before* acknowledging it in the
//! dead-letter queue, so a crash in between leaves a copy in both, never in
//! neither; the copy is harmless, since the command's key makes a second
//! run a duplicate. Replayed commands lose `x-sms-error` and the retry
//! headers, so they get a fresh set of attempts. A run replays at most the
//! letters that were queued when it started: a replayed command that fails
//! again while the service runs goes to the back of the queue, and must not
//! be replayed (and fail, and publish `SmsFailed`) again in the same run.
//!
//! A key that failed stays failed while Redis remembers it, so its replayed
//! command is only a duplicate. `--reset` (and `forget`) delete the key's
//! record first, in one Lua script that deletes it only when its status is
//! `failed`: a sent key is never cleared, as that would allow a second SMS.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::adapters::redis::RedisStore;
use crate::cli_tools::open;
use crate::config::Settings;
use crate::domain::{mask_phone, rfc3339, IdempotencyKey};

/// One dead letter, as an operator sees it (never the message text).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub idempotency_key: Option<String>,
    /// The phone number, masked.
    pub phone_number: Option<String>,
    pub reason: String,
    pub bytes: usize,
    /// When the service dead-lettered it (RFC 3339), from the
    /// `x-sms-dead-lettered-at` header; `None` for letters without one.
    pub dead_lettered_at: Option<String>,
}

/// The header the service stamps on every dead letter: when it was
/// dead-lettered, an AMQP timestamp (Unix seconds).
pub const DEAD_LETTERED_AT: &str = "x-sms-dead-lettered-at";

/// Headers the service adds, dropped on replay.
const SERVICE_HEADERS: [&str; 6] = [
    "x-sms-error",
    "x-sms-attempts",
    "x-sms-delays",
    "x-sms-first-attempt-ms",
    "x-sms-provider",
    DEAD_LETTERED_AT,
];

fn describe(body: &[u8], headers: Option<&FieldTable>) -> DeadLetter {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "idempotencyKey")]
        key: Option<String>,
        #[serde(rename = "phoneNumber")]
        phone: Option<String>,
    }
    let peek = serde_json::from_slice::<Peek>(body).ok();
    let header = |name: &str| headers.and_then(|h| h.inner().get(name));
    let reason = header("x-sms-error")
        .and_then(|v| v.as_long_string())
        .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned())
        .or_else(|| broker_reason(header("x-death")))
        .unwrap_or_else(|| "(no x-sms-error header)".into());
    let dead_lettered_at = match header(DEAD_LETTERED_AT) {
        Some(AMQPValue::Timestamp(secs)) => UNIX_EPOCH
            .checked_add(Duration::from_secs(*secs))
            .map(rfc3339),
        _ => None,
    };
    DeadLetter {
        idempotency_key: peek
            .as_ref()
            .and_then(|p| p.key.clone())
            .map(|k| k.chars().take(128).collect()),
        phone_number: peek.and_then(|p| p.phone).map(|p| mask_phone(&p)),
        reason,
        bytes: body.len(),
        dead_lettered_at,
    }
}

/// Why the broker itself dead-lettered a message, from its `x-death`
/// header (newest death first): a quorum command queue's
/// `x-delivery-limit` (`amqp.delivery_limit`), or a producer's own expiry.
/// <https://www.rabbitmq.com/docs/dlx#effects>
fn broker_reason(x_death: Option<&AMQPValue>) -> Option<String> {
    let Some(AMQPValue::FieldArray(deaths)) = x_death else {
        return None;
    };
    let AMQPValue::FieldTable(death) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |name: &str| match death.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    let queue = text("queue").unwrap_or_else(|| "?".into());
    Some(match text("reason")?.as_str() {
        "delivery_limit" => format!(
            "delivery_limit: delivered more often than amqp.delivery_limit from {queue}, dead-lettered by the broker"
        ),
        "expired" => format!("expired: its own expiration ran out in {queue}, dead-lettered by the broker"),
        "rejected" => format!("rejected: refused without requeue from {queue}, dead-lettered by the broker"),
        "maxlen" => format!("maxlen: {queue} was over its length limit, dead-lettered by the broker"),
        other => format!("{other}: dead-lettered by the broker from {queue}"),
    })
}

/// Up to `limit` dead letters, oldest first, left in the queue.
pub async fn list(settings: &Settings, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (connection, channel) = open(settings).await?;
    let queue = settings.amqp.dead_letter_queue.as_str();
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        out.push(describe(
            &delivery.data,
            delivery.properties.headers().as_ref(),
        ));
    }
    // Closing the channel hands every unacknowledged message back.
    channel.close(200, "listed".into()).await?;
    connection.close(200, "done".into()).await?;
    Ok(out)
}

/// A dead letter moved back to the command queue.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub letter: DeadLetter,
    /// With `--reset`: what clearing its key found (`None` without a usable key).
    pub reset: Option<Reset>,
}

/// Moves up to `limit` dead letters back to the command queue, each at most
/// once: never more than were queued when it started. With `reset`, each
/// letter's key is cleared first if it failed ([`FailedRecords::clear`]).
pub async fn replay(
    settings: &Settings,
    limit: usize,
    reset: bool,
) -> anyhow::Result<Vec<Replayed>> {
    let mut records = match reset {
        true => Some(FailedRecords::connect(settings).await?),
        false => None,
    };
    let (connection, channel) = open(settings).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (dead, commands) = (
        settings.amqp.dead_letter_queue.as_str(),
        settings.amqp.command_queue.as_str(),
    );
    let queued = channel
        .queue_declare(
            dead.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("reading {dead} (amqp.dead_letter_queue)"))?
        .message_count();
    let limit = limit.min(usize::try_from(queued).unwrap_or(usize::MAX));
    let mut moved = Vec::new();
    while moved.len() < limit {
        let Some(message) = channel
            .basic_get(dead.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let letter = describe(&delivery.data, delivery.properties.headers().as_ref());
        let key = letter
            .idempotency_key
            .as_deref()
            .and_then(|k| IdempotencyKey::parse(k).ok());
        let reset = match (records.as_mut(), key) {
            (Some(records), Some(key)) => Some(records.clear(&key).await?),
            _ => None,
        };
        let mut headers = FieldTable::default();
        if let Some(original) = delivery.properties.headers() {
            for (name, value) in original {
                if !SERVICE_HEADERS.contains(&name.as_str()) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        let properties = delivery.properties.clone().with_headers(headers);
        let confirmation = channel
            .basic_publish(
                "".into(),
                commands.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        match confirmation {
            lapin::Confirmation::Ack(None) => {}
            other => anyhow::bail!(
                "the broker did not take the replayed command ({other:?}); nothing was removed"
            ),
        }
        anyhow::ensure!(
            delivery.acker.ack(BasicAckOptions::default()).await?,
            "could not remove a replayed message from {dead}; it is now in both queues (harmless: its key makes it a duplicate)"
        );
        moved.push(Replayed { letter, reset });
    }
    connection.close(200, "done".into()).await?;
    Ok(moved)
}

/// What clearing a key's failed record found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// The key had failed; its record is gone, so its next command is new.
    Cleared,
    /// The key's record is not `failed` (this status); it was left alone.
    Kept(String),
    /// Redis has no record of the key.
    Unknown,
}

impl fmt::Display for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reset::Cleared => f.write_str("failed record cleared"),
            Reset::Kept(status) if status == "processing" || status == "retrying" => write!(
                f,
                "the key is in progress (status {status}), not failed: left alone"
            ),
            Reset::Kept(status) => write!(
                f,
                "the key was sent (status {status}): clearing it would allow a second SMS"
            ),
            Reset::Unknown => {
                f.write_str("no record of the key (never claimed, expired or already cleared)")
            }
        }
    }
}

/// The idempotency records in Redis, as far as clearing failed keys goes.
pub struct FailedRecords {
    store: RedisStore,
}

impl FailedRecords {
    /// Reaches Redis as the service does: through the store's own
    /// connection, so in sentinel mode the master the Sentinels name (not
    /// `redis.url`, which then holds only the password and database).
    /// Connects on first use.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let store = RedisStore::new(&settings.redis)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("Redis ({})", settings.redis.describe()))?;
        Ok(Self { store })
    }

    /// Deletes `key`'s record if, and only if, the key failed: atomically,
    /// so a record that turns `sent` meanwhile is never deleted.
    pub async fn clear(&mut self, key: &IdempotencyKey) -> anyhow::Result<Reset> {
        let status = self
            .store
            .clear_failed(key.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("clearing the failed record of {key} in Redis"))?;
        Ok(match status.as_str() {
            "" => Reset::Unknown,
            "failed" => Reset::Cleared,
            _ => Reset::Kept(status),
        })
    }
}

/// `sms-service forget KEY`: clears `key`'s record if it failed.
pub async fn forget_failed(settings: &Settings, key: &str) -> anyhow::Result<Reset> {
    let key = IdempotencyKey::parse(key).map_err(|e| anyhow::anyhow!("{e}"))?;
    FailedRecords::connect(settings).await?.clear(&key).await
}

/// Dead letters as a table.
pub fn render(letters: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:<4} {:<40} {:<16} {:>7}  {:<20}  reason\n",
        "#", "idempotencyKey", "to", "bytes", "deadLetteredAt"
    );
    for (i, l) in letters.iter().enumerate() {
        let key: String = l
            .idempotency_key
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(40)
            .collect();
        out.push_str(&format!(
            "{:<4} {:<40} {:<16} {:>7}  {:<20}  {}\n",
            i + 1,
            key,
            l.phone_number.as_deref().unwrap_or("-"),
            l.bytes,
            l.dead_lettered_at.as_deref().unwrap_or("-"),
            l.reason
        ));
    }
    out
}

/// Replayed letters as a table, then one line per reset key.
pub fn render_replayed(replayed: &[Replayed]) -> String {
    let letters: Vec<DeadLetter> = replayed.iter().map(|r| r.letter.clone()).collect();
    let mut out = render(&letters);
    for (i, r) in replayed.iter().enumerate() {
        if let (Some(reset), Some(key)) = (&r.reset, &r.letter.idempotency_key) {
            out.push_str(&format!("reset {} {key}: {reset}\n", i + 1));
        }
    }
    out
}

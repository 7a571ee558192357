//! `sms-service dead-letters`: what is in the dead-letter queue, and moving
//! it back to the command queue once the cause is fixed.
//!
//! `list` reads without removing (it takes messages unacknowledged and
//! hands them all back when done). `replay` moves each message with a
//! confirmed publish to the command queue *before* acknowledging it in the
//! dead-letter queue, so a crash in between leaves a copy in both, never in
//! neither; the copy is harmless, since the command's key makes a second
//! run a duplicate. Replayed commands lose `x-sms-error` and the retry
//! headers, so they get a fresh set of attempts.

use anyhow::Context;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::config::Settings;
use crate::domain::mask_phone;

/// One dead letter, as an operator sees it (never the message text).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub idempotency_key: Option<String>,
    /// The phone number, masked.
    pub to: Option<String>,
    pub reason: String,
    pub bytes: usize,
}

/// Headers the service adds, dropped on replay.
const SERVICE_HEADERS: [&str; 4] = [
    "x-sms-error",
    "x-sms-attempts",
    "x-sms-delays",
    "x-sms-first-attempt-ms",
];

async fn open(settings: &Settings) -> anyhow::Result<(Connection, Channel)> {
    let connection = Connection::connect(
        settings.amqp.url.expose_secret(),
        ConnectionProperties::default(),
    )
    .await
    .context("connecting to RabbitMQ (amqp.url)")?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

fn describe(body: &[u8], headers: Option<&FieldTable>) -> DeadLetter {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "idempotencyKey")]
        key: Option<String>,
        #[serde(rename = "phoneNumber")]
        phone: Option<String>,
    }
    let peek = serde_json::from_slice::<Peek>(body).ok();
    let reason = headers
        .and_then(|h| h.inner().get("x-sms-error"))
        .and_then(|v| v.as_long_string())
        .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned())
        .unwrap_or_else(|| "(no x-sms-error header)".into());
    DeadLetter {
        idempotency_key: peek
            .as_ref()
            .and_then(|p| p.key.clone())
            .map(|k| k.chars().take(128).collect()),
        to: peek.and_then(|p| p.phone).map(|p| mask_phone(&p)),
        reason,
        bytes: body.len(),
    }
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

/// Moves up to `limit` dead letters back to the command queue; returns
/// what was moved.
pub async fn replay(settings: &Settings, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (connection, channel) = open(settings).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (dead, commands) = (
        settings.amqp.dead_letter_queue.as_str(),
        settings.amqp.command_queue.as_str(),
    );
    let mut moved = Vec::new();
    while moved.len() < limit {
        let Some(message) = channel
            .basic_get(dead.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let described = describe(&delivery.data, delivery.properties.headers().as_ref());
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
        moved.push(described);
    }
    connection.close(200, "done".into()).await?;
    Ok(moved)
}

/// Dead letters as a table.
pub fn render(letters: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:<4} {:<40} {:<16} {:>7}  reason\n",
        "#", "idempotencyKey", "to", "bytes"
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
            "{:<4} {:<40} {:<16} {:>7}  {}\n",
            i + 1,
            key,
            l.to.as_deref().unwrap_or("-"),
            l.bytes,
            l.reason
        ));
    }
    out
}

//! The operator's one-shot commands that talk to the broker as a producer
//! or a subscriber would: `send` publishes one command, `events` prints the
//! events as the service publishes them.
//!
//! Each opens a connection of its own and touches only what it uses: `send`
//! checks that the command queue exists (passively, so a mistyped
//! `amqp.command_queue` is an error rather than a new queue nobody reads)
//! and publishes to it; `events` binds a temporary queue of its own to the
//! event exchanges. Neither declares the service's topology unless asked.
//! `status` asks a running service's HTTP API, as a producer would.
//! `segments` ([`segments`]) needs neither: it only reads the text.

mod segments;

pub use segments::segments_report;

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::adapters::rabbitmq::RabbitMq;
use crate::config::Settings;
use crate::domain::{mask_phone, EventKind, SendSms};
use crate::ports::QueueClient;

/// The longest `send` waits for the broker, connecting included.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest `status` waits for the service's answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The status document of `key` (`GET /v1/messages/{key}`), asked of the
/// service at `url`, else at `http.bind` (a wildcard bind asked on
/// loopback), with `api_key` as the bearer key. `None`: the service does
/// not know the key.
pub async fn status(
    settings: &Settings,
    url: Option<&str>,
    api_key: Option<&str>,
    key: &str,
) -> anyhow::Result<Option<Value>> {
    let base = match url {
        Some(url) => url.to_owned(),
        None => format!("http://{}", local_address(&settings.http.bind)),
    };
    let mut target = url::Url::parse(&base).with_context(|| format!("{base} is not a URL"))?;
    target
        .path_segments_mut()
        .map_err(|()| anyhow::anyhow!("{base} cannot be a base URL"))?
        .pop_if_empty()
        .extend(["v1", "messages", key]);
    let client = reqwest::Client::builder().timeout(STATUS_TIMEOUT).build()?;
    let mut request = client.get(target);
    if let Some(api_key) = api_key {
        request = request.bearer_auth(api_key);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("asking the service at {base}"))?;
    let code = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match code {
        200 => Ok(Some(body)),
        404 if body["error"] == "unknown_key" => Ok(None),
        401 => anyhow::bail!(
            "the service at {base} refused: {} (give --api-key or SMS_API_KEY)",
            body["detail"].as_str().unwrap_or("401")
        ),
        code => anyhow::bail!("the service at {base} answered {code}: {body}"),
    }
}

/// Where to reach a service bound to `bind` from this machine: a wildcard
/// address (`0.0.0.0`, `[::]`) is asked on loopback.
fn local_address(bind: &str) -> String {
    match bind.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let loopback: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(loopback, addr.port()).to_string()
        }
        _ => bind.to_owned(),
    }
}

/// Opens a connection of the operator's own to `amqp.url`, and a channel.
/// With `amqp.urls`, the first node that accepts.
pub(crate) async fn open(settings: &Settings) -> anyhow::Result<(Connection, Channel)> {
    let mut last = None;
    for url in settings.amqp.node_urls() {
        match Connection::connect(url.expose_secret(), ConnectionProperties::default()).await {
            Ok(connection) => {
                let channel = connection.create_channel().await?;
                return Ok((connection, channel));
            }
            Err(e) => last = Some(e),
        }
    }
    let key = if settings.amqp.urls.is_empty() {
        "amqp.url"
    } else {
        "amqp.urls"
    };
    Err(anyhow::Error::from(last.expect("at least one node")))
        .context(format!("connecting to RabbitMQ ({key})"))
}

/// True for the broker's 404 NOT_FOUND: no such queue or exchange.
fn not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404)
}

/// A command as given on the command line.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub to: String,
    pub text: String,
    /// A fresh UUID when not given.
    pub key: Option<String>,
    pub sender: Option<String>,
}

/// Validates `command` as the service would, publishes it to the command
/// queue with a confirm, and returns its idempotency key. With `declare`
/// the service's queues and exchanges are declared first (exactly as the
/// service declares them); without it, a command queue that does not exist
/// is an error and nothing is created.
pub async fn send(
    settings: &Settings,
    command: NewCommand,
    declare: bool,
) -> anyhow::Result<String> {
    let key = command
        .key
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut body =
        serde_json::json!({"idempotencyKey": key, "phoneNumber": command.to, "text": command.text});
    if let Some(sender) = command.sender {
        body["senderId"] = sender.into();
    }
    let body = serde_json::to_vec(&body)?;
    if let Err(e) = SendSms::from_json(&body) {
        anyhow::bail!("not a valid command: {}", e.dead_letter_reason());
    }
    tokio::time::timeout(SEND_TIMEOUT, publish_command(settings, &body, declare))
        .await
        .map_err(|_| anyhow::anyhow!("the broker did not confirm within 15 s"))??;
    Ok(key)
}

async fn publish_command(settings: &Settings, body: &[u8], declare: bool) -> anyhow::Result<()> {
    if declare {
        let broker = RabbitMq::new(&settings.amqp, &settings.retry_tiers());
        let declared = broker.connect().await;
        broker.close().await;
        declared.context("declaring the service's topology")?;
    }
    let queue = settings.amqp.command_queue.as_str();
    let (connection, channel) = open(settings).await?;
    let published = async {
        if let Err(e) = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        {
            if not_found(&e) {
                anyhow::bail!(
                    "the command queue {queue} (amqp.command_queue) does not exist: start the \
                     service once (it declares its queues), check the name, or pass --declare"
                );
            }
            return Err(e).context(format!("checking the command queue {queue}"));
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => anyhow::bail!("{queue} did not take the command"),
            other => anyhow::bail!("the broker did not take the command ({other:?})"),
        }
    }
    .await;
    let _ = connection.close(200, "sent".into()).await;
    published
}

/// What `events` prints, and for how long.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventsOptions {
    /// Each event's JSON (phone number masked) instead of one line.
    pub json: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
}

/// Prints the events published on the three event exchanges to stdout until
/// `stop` completes, `options.count` events were printed, or stdout is
/// closed; returns how many it printed.
///
/// It binds an exclusive, auto-deleted queue named by the broker to each
/// exchange (so it sees every event from then on, beside any subscriber,
/// and leaves nothing behind), and says on stderr once it is listening.
/// Phone numbers are masked to their last four digits; message texts are
/// not in events.
pub async fn events(
    settings: &Settings,
    options: EventsOptions,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<u64> {
    let amqp = &settings.amqp;
    let (connection, channel) = open(settings).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring a temporary queue")?;
    for kind in EventKind::ALL {
        let (exchange, setting) = (amqp.exchange(kind), kind.exchange_setting());
        let bound = channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        match bound {
            Ok(()) => {}
            Err(e) if not_found(&e) => anyhow::bail!(
                "the exchange {exchange} (amqp.{setting}) does not exist: start the service once \
                 (it declares its exchanges), or check the name"
            ),
            Err(e) => return Err(e).context(format!("binding to {exchange}")),
        }
    }
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "sms-service-events".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let names: Vec<&str> = EventKind::ALL
        .iter()
        .map(|k| amqp.exchange(*k).as_str())
        .collect();
    eprintln!(
        "listening for events on {} (Ctrl-C to stop)",
        names.join(", ")
    );
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    tokio::pin!(stop);
    let ended = loop {
        if options.count.is_some_and(|n| printed >= n) {
            break Ok(());
        }
        let delivery = tokio::select! {
            () = &mut stop => break Ok(()),
            next = consumer.next() => next,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => {
                break Err(anyhow::Error::new(e).context("the broker connection failed"))
            }
            None => break Err(anyhow::anyhow!("the broker ended the subscription")),
        };
        let kind = delivery
            .properties
            .kind()
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_else(|| kind_of_exchange(amqp, delivery.exchange.as_str()).to_owned());
        let line = if options.json {
            masked_json(&kind, &delivery.data)
        } else {
            render_event(&kind, &delivery.data)
        };
        if let Err(e) = writeln!(stdout, "{line}") {
            // `events | head -n 3`: the reader has gone; that is the end.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break Ok(());
            }
            break Err(e.into());
        }
        printed += 1;
    };
    let _ = connection.close(200, "done".into()).await;
    ended.map(|()| printed)
}

/// The event type of a message without a `type` property, by its exchange.
fn kind_of_exchange<'a>(amqp: &crate::config::AmqpSettings, exchange: &'a str) -> &'a str {
    match EventKind::ALL
        .into_iter()
        .find(|k| amqp.exchange(*k) == exchange)
    {
        Some(kind) => kind.type_name(),
        None => exchange,
    }
}

/// One event as a line: its type, key, masked number, then the provider's
/// message id, the failure reason or the delivery status, whichever it has.
/// `SmsSent key=pay-1 to=+********5678 providerMessageId=msg-7f3a`
pub fn render_event(kind: &str, body: &[u8]) -> String {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return format!("{kind} (not a JSON object, {} bytes)", body.len());
    };
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let mut line = kind.to_owned();
    if let Some(key) = text("idempotencyKey") {
        line.push_str(&format!(" key={key}"));
    }
    if let Some(phone) = text("phoneNumber") {
        line.push_str(&format!(" to={}", mask_phone(phone)));
    }
    for name in ["providerMessageId", "reason", "status"] {
        if let Some(value) = text(name) {
            line.push_str(&format!(" {name}={value}"));
        }
    }
    line
}

/// The event's JSON with `type` added and `phoneNumber` masked.
pub fn masked_json(kind: &str, body: &[u8]) -> String {
    let mut event = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        _ => serde_json::Map::from_iter([("bytes".to_owned(), Value::from(body.len()))]),
    };
    if let Some(Value::String(phone)) = event.get_mut("phoneNumber") {
        *phone = mask_phone(phone);
    }
    event.insert("type".into(), kind.into());
    Value::Object(event).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENT: &[u8] = br#"{"idempotencyKey":"pay-1","phoneNumber":"+254712345678","provider":"generic","providerMessageId":"msg-7f3a","segments":1,"attempts":1,"sentAt":"2026-11-22T10:00:00Z"}"#;

    #[test]
    fn an_event_line_names_type_key_and_provider_id_with_the_number_masked() {
        assert_eq!(
            render_event("SmsSent", SENT),
            "SmsSent key=pay-1 to=+********5678 providerMessageId=msg-7f3a"
        );
        let failed = br#"{"idempotencyKey":"k","phoneNumber":"+254712345678","reason":"provider_rejected","detail":"HTTP 400","attempts":1,"failedAt":"x"}"#;
        assert_eq!(
            render_event("SmsFailed", failed),
            "SmsFailed key=k to=+********5678 reason=provider_rejected"
        );
        assert_eq!(
            render_event("SmsSent", b"\xff"),
            "SmsSent (not a JSON object, 1 bytes)"
        );
    }

    #[test]
    fn event_json_keeps_every_field_but_masks_the_number() {
        let json: Value = serde_json::from_str(&masked_json("SmsSent", SENT)).unwrap();
        assert_eq!(json["phoneNumber"], "+********5678");
        assert_eq!(json["type"], "SmsSent");
        assert_eq!(json["providerMessageId"], "msg-7f3a");
        assert_eq!(json["segments"], 1);
        assert!(!masked_json("SmsSent", SENT).contains("254712345678"));
    }
}

#[cfg(test)]
mod status_tests {
    use super::local_address;

    #[test]
    fn a_wildcard_bind_is_asked_on_loopback() {
        assert_eq!(local_address("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(local_address("[::]:8080"), "[::1]:8080");
        assert_eq!(local_address("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(local_address("10.1.2.3:80"), "10.1.2.3:80");
    }
}

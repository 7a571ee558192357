//! The test harness: a service started in-process on port 0 with unique
//! queue, exchange and key names, a wiremock provider, and a broker client
//! that subscribes to the events and reads the dead letters. `TEST_LOG=1`
//! shows the service's logs.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;
use sms_service::app::{self, RunningApp};
use sms_service::config::Settings;
use sms_service::domain::EventKind;
use wiremock::MockServer;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
    }
}

/// Unique names for one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub command_queue: String,
    pub dead_letter_queue: String,
    pub sent_exchange: String,
    pub failed_exchange: String,
    pub delivery_exchange: String,
    pub key_prefix: String,
}

impl Names {
    /// The exchange of `kind`'s events.
    pub fn exchange(&self, kind: EventKind) -> &String {
        match kind {
            EventKind::Sent => &self.sent_exchange,
            EventKind::Failed => &self.failed_exchange,
            EventKind::Delivery => &self.delivery_exchange,
        }
    }

    pub fn unique() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Self {
            command_queue: format!("test.{id}.sms.send"),
            dead_letter_queue: format!("test.{id}.sms.send.dead"),
            sent_exchange: format!("test.{id}.sms.sent"),
            failed_exchange: format!("test.{id}.sms.failed"),
            delivery_exchange: format!("test.{id}.sms.delivery"),
            key_prefix: format!("test:{id}"),
        }
    }

    /// The high queue the service declares beside the command queue.
    pub fn high_queue(&self) -> String {
        format!("{}.high", self.command_queue)
    }

    /// The environment a service for these names runs with.
    pub fn env(&self, provider_url: &str) -> Vec<(String, String)> {
        [
            ("SMS__AMQP__URL", AMQP_URL),
            ("SMS__AMQP__COMMAND_QUEUE", &self.command_queue),
            ("SMS__AMQP__DEAD_LETTER_QUEUE", &self.dead_letter_queue),
            ("SMS__AMQP__RECONNECT_DELAY_MS", "200"),
            ("SMS__AMQP__CONFIRM_TIMEOUT_MS", "2000"),
            ("SMS__REDIS__URL", REDIS_URL),
            ("SMS__REDIS__KEY_PREFIX", &self.key_prefix),
            ("SMS__REDIS__IDEMPOTENCY_TTL_SECS", "600"),
            ("SMS__RETRY__MAX_AGE_SECS", "600"),
            ("SMS__REDIS__LEASE_MS", "8000"),
            ("SMS__PROVIDER__BASE_URL", provider_url),
            ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", "2000"),
            ("SMS__PROVIDER__CONNECT_TIMEOUT_MS", "500"),
            ("SMS__RETRY__MAX_ATTEMPTS", "3"),
            ("SMS__RETRY__IN_PROCESS_ATTEMPTS", "2"),
            ("SMS__RETRY__TIERS_MS", "300,600"),
            ("SMS__RETRY__BASE_DELAY_MS", "20"),
            ("SMS__RETRY__MAX_DELAY_MS", "200"),
            ("SMS__RETRY__REQUEUE_DELAY_MS", "100"),
            ("SMS__PROCESSING__SHUTDOWN_GRACE_MS", "3000"),
            ("SMS__HTTP__BIND", "127.0.0.1:0"),
            // Never the default port: tests run side by side.
            ("SMS__GRPC__BIND", "127.0.0.1:0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .chain(EventKind::ALL.iter().map(|k| {
            let setting = k.exchange_setting().to_uppercase();
            (format!("SMS__AMQP__{setting}"), self.exchange(*k).clone())
        }))
        .collect()
    }
}

pub fn settings(env: &[(String, String)]) -> Settings {
    let map: HashMap<String, String> = env.iter().cloned().collect();
    let source = sms_service::config::environment().source(Some(map));
    Settings::load_from(None, source).expect("test settings are valid")
}

/// A running service and everything around it.
pub struct TestApp {
    pub names: Names,
    pub provider: MockServer,
    pub app: Option<RunningApp>,
    pub http: reqwest::Client,
    pub broker: TestBroker,
    pub base_url: String,
}

/// Starts a service with default test settings, plus `extra` settings.
pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    spawn(extra, true).await
}

/// Starts a service; with `ready`, waits until `/readyz` says 200.
pub async fn spawn(extra: &[(&str, &str)], ready: bool) -> TestApp {
    init_logs();
    let names = Names::unique();
    let provider = MockServer::start().await;
    // The subscriber queues exist before the service publishes anything.
    let broker = TestBroker::connect(&names).await;
    let mut env = names.env(&provider.uri());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let app = app::start(settings(&env))
        .await
        .expect("the service starts");
    let base_url = format!("http://{}", app.http_addr);
    let test_app = TestApp {
        names,
        provider,
        app: Some(app),
        http: reqwest::Client::new(),
        broker,
        base_url,
    };
    if ready {
        test_app.wait_ready().await;
    }
    test_app
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

impl TestApp {
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = self
                .http
                .get(format!("{}/readyz", self.base_url))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("service never became ready");
    }

    pub async fn publish(&self, body: &[u8]) {
        self.broker
            .publish_command(body, BasicProperties::default())
            .await;
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The service's `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.base_url);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the service, then deletes everything the test made.
    pub async fn cleanup(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
        self.broker.cleanup().await;
    }
}

/// A command body.
pub fn command(key: &str, phone: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"idempotencyKey": key, "phoneNumber": phone, "text": text}),
    )
    .unwrap()
}

/// An event or dead letter as received.
#[derive(Debug)]
pub struct Received {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("event bodies are JSON")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }
}

/// Deletes a test's queues, exchanges and keys even when the test panicked
/// before its own cleanup: on drop, on a thread of its own.
pub struct Leftovers(pub Names);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let names = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok(connection) =
                    Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(channel) = connection.create_channel().await else {
                    return;
                };
                let tiers =
                    ["300ms", "600ms"].map(|t| format!("{}.retry.{t}", names.command_queue));
                let high_tiers =
                    ["300ms", "600ms"].map(|t| format!("{}.retry.high.{t}", names.command_queue));
                let high_queue = names.high_queue();
                let holds = [hold_queues(&names.command_queue), hold_queues(&high_queue)].concat();
                for queue in [&names.command_queue, &high_queue, &names.dead_letter_queue]
                    .into_iter()
                    .chain(&tiers)
                    .chain(&high_tiers)
                    .chain(&holds)
                {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in EventKind::ALL.map(|k| names.exchange(k)) {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "bye".into()).await;
                delete_redis_keys(&names.key_prefix).await;
            });
        })
        .join();
    }
}

/// The hold queues of `origin` with the default waits (`amqp.hold_hops_ms`).
pub fn hold_queues(origin: &str) -> Vec<String> {
    [
        "1s", "3s", "10s", "30s", "1m", "3m", "10m", "30m", "1h", "3h", "8h",
    ]
    .iter()
    .map(|wait| format!("{origin}.hold.{wait}"))
    .collect()
}

/// A plain AMQP client, as a producer or subscriber would use.
pub struct TestBroker {
    pub names: Names,
    connection: Connection,
    pub channel: Channel,
    /// A subscriber queue's consumer per event kind.
    consumers: HashMap<EventKind, Consumer>,
    _leftovers: Leftovers,
}

impl TestBroker {
    pub async fn connect(names: &Names) -> Self {
        Self::connect_at(names, AMQP_URL).await
    }

    /// As [`Self::connect`], to the broker (node) at `url`.
    pub async fn connect_at(names: &Names, url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/ensure-services)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut consumers = HashMap::new();
        for kind in EventKind::ALL {
            let exchange = names.exchange(kind);
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    lapin::ExchangeKind::Fanout,
                    lapin::options::ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let queue = format!("{exchange}.subscriber");
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            consumers.insert(kind, consumer);
        }
        Self {
            names: names.clone(),
            connection,
            channel,
            consumers,
            _leftovers: Leftovers(names.clone()),
        }
    }

    fn consumer(&mut self, kind: EventKind) -> &mut Consumer {
        self.consumers.get_mut(&kind).expect("a consumer per kind")
    }

    /// Publishes `n` valid commands keyed `{prefix}{i}`.
    pub async fn publish_many(&self, prefix: &str, n: usize) {
        for i in 0..n {
            let body = command(&format!("{prefix}{i}"), "+254712345678", "hi");
            self.publish_command(&body, BasicProperties::default())
                .await;
        }
    }

    pub async fn publish_command(&self, body: &[u8], properties: BasicProperties) {
        self.publish_to(&self.names.command_queue, body, properties)
            .await;
    }

    /// Publishes a command to the high queue, as a producer of `priority:
    /// high` commands does.
    pub async fn publish_high(&self, body: &[u8]) {
        self.publish_to(&self.names.high_queue(), body, BasicProperties::default())
            .await;
    }

    async fn publish_to(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let properties = properties
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    async fn take(consumer: &mut Consumer, n: usize, within: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    out.push(Received {
                        body: d.data,
                        properties: d.properties,
                    });
                }
                _ => break,
            }
        }
        out
    }

    /// Waits for `n` SmsSent events (or the timeout) and returns them.
    pub async fn sent(&mut self, n: usize, within: Duration) -> Vec<Received> {
        Self::take(self.consumer(EventKind::Sent), n, within).await
    }

    pub async fn failed(&mut self, n: usize, within: Duration) -> Vec<Received> {
        Self::take(self.consumer(EventKind::Failed), n, within).await
    }

    pub async fn deliveries(&mut self, n: usize, within: Duration) -> Vec<Received> {
        Self::take(self.consumer(EventKind::Delivery), n, within).await
    }

    /// Reads up to `n` dead letters, waiting up to `within` for them.
    pub async fn dead_letters(&self, n: usize, within: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while out.len() < n && tokio::time::Instant::now() < deadline {
            let got = self
                .channel
                .basic_get(
                    self.names.dead_letter_queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap();
            match got {
                Some(message) => out.push(Received {
                    body: message.delivery.data,
                    properties: message.delivery.properties,
                }),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        out
    }

    /// Messages waiting in the command queue.
    pub async fn commands_waiting(&self) -> u32 {
        self.waiting_in(&self.names.command_queue).await
    }

    /// Messages waiting (ready) in `queue`.
    pub async fn waiting_in(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    /// Closes the client; the names are deleted when it drops.
    pub async fn cleanup(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

pub async fn delete_redis_keys(prefix: &str) {
    let client = redis::Client::open(REDIS_URL).unwrap();
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return;
    };
    // SCAN, not KEYS: KEYS blocks a large shared Redis for everyone.
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = match redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut connection)
            .await
        {
            Ok(reply) => reply,
            Err(_) => return,
        };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut connection)
                .await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379 (run scripts/ensure-services)")
}

/// `X-Timestamp` (now) and `X-Signature` of a generic delivery report, as
/// the reference says: `sha256=<hex HMAC-SHA256 under secret of
/// "<timestamp>.<body>">`.
pub fn sign_report(body: &str, secret: &str) -> (String, String) {
    use hmac::{Hmac, Mac};
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    (timestamp, signature)
}

/// Posts a generic delivery report `{"id", "status"}` to
/// `/v1/callbacks/{instance}`, signed with `secret` ([`sign_report`]);
/// the answer's status.
pub async fn post_signed_report(
    app: &TestApp,
    instance: &str,
    id: &str,
    status: &str,
    secret: &str,
) -> u16 {
    let body = serde_json::json!({"id": id, "status": status}).to_string();
    let (timestamp, signature) = sign_report(&body, secret);
    app.http
        .post(format!("{}/v1/callbacks/{instance}", app.base_url))
        .header("content-type", "application/json")
        .header("x-timestamp", timestamp)
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The value of an unlabelled counter on a metrics page (0 when absent).
pub fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

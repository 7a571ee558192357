//! Settings: `config/default.toml` (compiled in, so the binary always has
//! its defaults), then an optional file, then `SMS__SECTION__KEY`
//! environment variables. Unknown keys are an error; [`Settings::validate`]
//! rejects what would only fail later, naming the key. Every error names
//! where the value came from (`explain`).

mod explain;
pub mod providers;

pub use providers::{Instance, InstanceSettings, RouteSettings};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Source};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::{EventKind, LimitAction, LimitActions, PhoneNumber, QuietHours, RateWindow};

/// The defaults, as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[[routes]]`: which provider instances serve which destinations.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub provider: ProviderSettings,
    /// `[providers.<name>]`: named provider instances.
    #[serde(default)]
    pub providers: std::collections::BTreeMap<String, InstanceSettings>,
    pub retry: RetrySettings,
    pub limits: LimitsSettings,
    pub quiet_hours: QuietHoursSettings,
    pub processing: ProcessingConfig,
    pub http: HttpSettings,
    pub grpc: GrpcSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub encoding: EncodingSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: SecretString,
    /// The nodes of a RabbitMQ cluster, tried in turn; when not empty it
    /// replaces `url` ([`AmqpSettings::node_urls`]).
    #[serde(deserialize_with = "secret_list")]
    pub urls: Vec<SecretString>,
    /// The type every queue of the service is declared with.
    #[serde(deserialize_with = "explain::choice")]
    pub queue_type: QueueType,
    /// Quorum queues only: the broker's own `x-delivery-limit` on the
    /// command queues, a second guard against poison behind
    /// `processing.max_redeliveries`.
    pub delivery_limit: u32,
    pub command_queue: String,
    pub dead_letter_queue: String,
    pub sent_exchange: String,
    pub failed_exchange: String,
    pub delivery_exchange: String,
    pub prefetch: u16,
    pub max_body_bytes: usize,
    pub reconnect_delay_ms: u64,
    pub confirm_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// The fixed waits of the hold queues (`<queue>.hold.<wait>`) that park
    /// commands not yet due; see `adapters::rabbitmq::Topology::hop_for`.
    #[serde(deserialize_with = "number_list")]
    pub hold_hops_ms: Vec<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// How the service finds Redis: one server at `url`, the master that
    /// `sentinels` name for `master_name`, or a Redis Cluster from `nodes`.
    #[serde(deserialize_with = "explain::choice")]
    pub mode: RedisMode,
    /// Standalone: the server. Sentinel and cluster: only its user name,
    /// password and database apply, to the master or nodes. TLS
    /// (`rediss`) is not supported, in sentinel mode neither: the redis
    /// crate is built without a TLS feature, so the store refuses it.
    pub url: SecretString,
    /// Sentinel: the Sentinels' addresses (`host:port`), asked in turn.
    #[serde(deserialize_with = "text_list")]
    pub sentinels: Vec<String>,
    /// Sentinel: the name the Sentinels monitor the master under.
    pub master_name: String,
    /// Cluster: some of the cluster's nodes (`host:port`); the rest are
    /// discovered from them.
    #[serde(deserialize_with = "text_list")]
    pub nodes: Vec<String>,
    /// After a `sent` record, wait until this many replicas have it
    /// (`WAIT`), at most `wait_timeout_ms`; 0: no wait.
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
    pub key_prefix: String,
    pub idempotency_ttl_secs: u64,
    pub lease_ms: u64,
    /// How long an instance's liveness record lasts without a heartbeat:
    /// the longest wait before a dead instance's keys are taken over.
    pub liveness_ttl_ms: u64,
    pub timeout_ms: u64,
}

/// `redis.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Sentinel,
    Cluster,
}

impl RedisSettings {
    /// Where the store is, for logs: never a password.
    pub fn describe(&self) -> String {
        match self.mode {
            RedisMode::Standalone => {
                crate::adapters::redis_durability::server_address(self.url.expose_secret())
            }
            RedisMode::Sentinel => format!(
                "master {:?} of sentinels {}",
                self.master_name,
                addresses(&self.sentinels)
            ),
            RedisMode::Cluster => format!("cluster {}", addresses(&self.nodes)),
        }
    }

    /// `redis.mode` and the settings it needs.
    fn validate_mode(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.key_prefix.is_empty() || self.key_prefix.len() > 100 {
            return bad("redis.key_prefix", "must be 1 to 100 characters");
        }
        // In a cluster, a `{` or `}` in the prefix would move the hash tag
        // of every key; elsewhere it is only text (and deployments have it).
        if self.mode == RedisMode::Cluster && self.key_prefix.contains(['{', '}']) {
            return bad(
                "redis.key_prefix",
                "must be without { or } with redis.mode = \"cluster\"",
            );
        }
        let (list_key, list) = match self.mode {
            RedisMode::Standalone => return Ok(()),
            RedisMode::Sentinel => ("redis.sentinels", &self.sentinels),
            RedisMode::Cluster => ("redis.nodes", &self.nodes),
        };
        if list.is_empty() || list.len() > 32 {
            return bad(
                list_key,
                &format!(
                    "must list 1 to 32 addresses (host:port) with redis.mode = \"{}\"",
                    if self.mode == RedisMode::Sentinel {
                        "sentinel"
                    } else {
                        "cluster"
                    }
                ),
            );
        }
        for (i, address) in list.iter().enumerate() {
            if node_url(address).is_none() {
                return bad(
                    &format!("{list_key}[{i}]"),
                    "must be an address like 10.0.0.5:26379 (or a redis:// URL)",
                );
            }
        }
        if self.mode == RedisMode::Sentinel && self.master_name.trim().is_empty() {
            return bad(
                "redis.master_name",
                "must name the master the sentinels monitor with redis.mode = \"sentinel\"",
            );
        }
        if self.mode == RedisMode::Cluster {
            let db = url::Url::parse(self.url.expose_secret())
                .ok()
                .map(|u| u.path().trim_matches('/').to_owned())
                .unwrap_or_default();
            if !db.is_empty() && db != "0" {
                return bad(
                    "redis.url",
                    "a Redis Cluster has only database 0: drop the database from the URL",
                );
            }
        }
        if self.mode == RedisMode::Cluster && self.wait_replicas > 0 {
            // WAIT counts the replicas of the node it is sent to, for the
            // writes of its connection
            // (https://redis.io/docs/latest/commands/wait/); in a cluster
            // each record is on the master of its slot, which the store's
            // WAIT connection does not follow.
            return bad(
                "redis.wait_replicas",
                "must be 0 with redis.mode = \"cluster\" (WAIT would not reach the master that took the write)",
            );
        }
        Ok(())
    }
}

/// The `host:port` of each entry of a node list, which may be a URL with
/// a password (`redis://:pw@host:26379`): never the password.
fn addresses(list: &[String]) -> String {
    list.iter()
        .map(|entry| {
            node_url(entry)
                .and_then(|u| url::Url::parse(&u).ok())
                .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port()?)))
                .unwrap_or_else(|| "(invalid address)".into())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A Redis node address as a URL: `host:port` gets `redis://`; a
/// `redis://` or `rediss://` URL stays. `None` if it is neither.
pub fn node_url(address: &str) -> Option<String> {
    let address = address.trim();
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("redis://{address}")
    };
    let parsed = url::Url::parse(&url).ok()?;
    (["redis", "rediss"].contains(&parsed.scheme())
        && parsed.host_str().is_some_and(|h| !h.is_empty())
        && parsed.port().is_some())
    .then_some(url)
}

/// Which provider adapter sends the messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Generic,
    Twilio,
    AfricasTalking,
    Vonage,
    Infobip,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 5] = [
        Self::Generic,
        Self::Twilio,
        Self::AfricasTalking,
        Self::Vonage,
        Self::Infobip,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::Twilio => "twilio",
            Self::AfricasTalking => "africastalking",
            Self::Vonage => "vonage",
            Self::Infobip => "infobip",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The provider's public API host (scheme, host and port; the adapter
    /// appends the API path), where it has one.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::Generic => None,
            // https://www.twilio.com/docs/usage/api
            Self::Twilio => Some("https://api.twilio.com"),
            // https://developers.africastalking.com/docs/sms/sending
            Self::AfricasTalking => Some("https://api.africastalking.com"),
            // https://developer.vonage.com/en/api/sms
            Self::Vonage => Some("https://rest.nexmo.com"),
            // Infobip gives each account its own base URL; this is the
            // shared one: https://www.infobip.com/docs/essentials/base-url
            Self::Infobip => Some("https://api.infobip.com"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    #[serde(deserialize_with = "explain::choice")]
    pub kind: ProviderKind,
    pub base_url: String,
    pub token: SecretString,
    pub callback_secret: SecretString,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_idle_connections: usize,
    pub http2: bool,
    pub max_sends_per_second: u32,
    pub breaker_threshold: u32,
    pub breaker_cool_down_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub max_age_secs: u64,
    pub in_process_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    #[serde(deserialize_with = "number_list")]
    pub tiers_ms: Vec<u64>,
    pub requeue_delay_ms: u64,
}

/// Per-recipient limits (`[limits]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Sliding windows, `N/<length><s|m|h|d>` each; empty: no limit.
    #[serde(deserialize_with = "text_list")]
    pub per_recipient: Vec<String>,
    /// What happens over a limit, by priority.
    pub action: LimitActionSettings,
    /// E.164 numbers never counted nor limited.
    #[serde(deserialize_with = "text_list")]
    pub allow: Vec<String>,
}

/// `[limits.action]`: `delay` or `fail` for each priority.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitActionSettings {
    #[serde(deserialize_with = "explain::choice")]
    pub high: LimitAction,
    #[serde(deserialize_with = "explain::choice")]
    pub normal: LimitAction,
    #[serde(deserialize_with = "explain::choice")]
    pub bulk: LimitAction,
}

/// Quiet hours (`[quiet_hours]`), in the recipient's local time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursSettings {
    /// `HH:MM` or `HH:MM:SS`; empty (with `end`): no quiet hours.
    pub start: String,
    pub end: String,
    pub release_spread_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingConfig {
    pub max_in_flight: usize,
    /// Commands of the high queue processed at once, beside
    /// `max_in_flight`; also that queue's prefetch.
    pub high_max_in_flight: usize,
    pub adaptive_sends: bool,
    pub min_sends: usize,
    pub max_redeliveries: u32,
    pub shutdown_grace_ms: u64,
}

/// How the service's queues are declared (`amqp.queue_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queues, declared without `x-queue-type` (as before the
    /// setting existed, so existing queues stay equivalent).
    #[default]
    Classic,
    /// Quorum queues, replicated over a RabbitMQ cluster.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

impl AmqpSettings {
    /// The broker's nodes, in the order they are tried: `amqp.urls` when
    /// set, else `amqp.url` alone.
    pub fn node_urls(&self) -> Vec<SecretString> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }

    /// The exchange `kind`'s events go to.
    pub fn exchange(&self, kind: EventKind) -> &String {
        match kind {
            EventKind::Sent => &self.sent_exchange,
            EventKind::Failed => &self.failed_exchange,
            EventKind::Delivery => &self.delivery_exchange,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub bind: String,
    pub max_body_bytes: usize,
    /// The service's address as providers reach it (`https://sms.example.com`):
    /// the base of the callback URLs sent with each message, and of the
    /// URL Twilio signs. Empty: no callback URL is sent (configure it at
    /// the provider's console) and signatures are checked against the
    /// URL the service received.
    pub public_url: String,
    /// How long a delivery report for a provider id not yet recorded is
    /// kept, to be applied when the send is recorded.
    pub report_park_ttl_secs: u64,
    /// Bearer keys that open the message routes; empty leaves them open
    /// on a loopback bind only (see `adapters::http::auth`).
    #[serde(deserialize_with = "secret_list")]
    pub api_keys: Vec<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSettings {
    /// Address of the gRPC front door (`sms.v1.SmsService`, health,
    /// reflection); empty turns it off. Its calls take the keys of
    /// `http.api_keys`, open without one on a loopback address only.
    pub bind: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(deserialize_with = "explain::choice")]
    pub format: LogFormat,
    pub level: String,
}

/// How texts are encoded for the provider (`[encoding]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingSettings {
    /// Replace characters that only look like GSM-7 ones (curly quotes,
    /// dashes, special spaces, ...) when that makes a text GSM-7 in fewer
    /// parts ([`crate::domain::Smart`]); `false` sends every text as written.
    pub smart: bool,
}

/// How traces are exported (`[telemetry]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it; empty: no
    /// traces are recorded or exported.
    pub otlp_endpoint: String,
    #[serde(deserialize_with = "explain::choice")]
    pub otlp_protocol: OtlpProtocol,
    /// Finished spans waiting for export at most; past it they are dropped
    /// (and counted), so a slow collector never slows the service.
    pub max_queued_spans: usize,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP, to `{otlp_endpoint}/v1/traces`.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// gRPC (plaintext), to `otlp_endpoint`.
    #[serde(rename = "grpc")]
    Grpc,
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The `SMS__SECTION__KEY` overlay; lists (`retry.tiers_ms`) are
/// comma-separated. Tests give it a map with `.source(Some(map))`.
pub fn environment() -> Environment {
    Environment::with_prefix("SMS")
        .prefix_separator("__")
        .separator("__")
}

/// A list of numbers from a TOML array, or from an environment variable
/// as comma-separated text (`5000,30000`). Values are never reparsed
/// otherwise, so a secret like `007` stays `007`.
fn number_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<u64>),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::List(list) => Ok(list),
        Raw::Text(text) => text
            .split(',')
            .map(|part| part.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| serde::de::Error::custom(format!("not a list of numbers: {text:?}"))),
    }
}

/// A list of text from a TOML array, or from an environment variable as
/// comma-separated text (`a,b`; blanks around each item are dropped, and
/// an empty variable is an empty list). Errors name `what` the items are,
/// never a value.
fn items<'de, D: serde::Deserializer<'de>>(d: D, what: &str) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    let raw = Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom(format!("not a list of {what} (nor comma-separated text)"))
    })?;
    Ok(match raw {
        Raw::List(list) => list,
        Raw::Text(text) if text.trim().is_empty() => Vec::new(),
        Raw::Text(text) => text.split(',').map(|part| part.trim().to_owned()).collect(),
    })
}

/// A list of secrets, as [`items`].
fn secret_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    Ok(items(d, "keys")?
        .into_iter()
        .map(SecretString::from)
        .collect())
}

/// A list of plain text, as [`items`].
fn text_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    items(d, "text values")
}

/// Most numbers in `limits.allow`.
const MAX_ALLOWED_NUMBERS: usize = 10_000;

/// The shortest API key accepted: a guessable key is no lock.
pub const MIN_API_KEY_LEN: usize = 16;

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, environment())
    }

    /// As [`Settings::load`], with the environment given (tests pass a map).
    pub fn load_from(file: Option<&Path>, env: Environment) -> Result<Self, ConfigError> {
        let defaults = File::from_str(DEFAULT_TOML, FileFormat::Toml);
        let mut builder = Config::builder().add_source(defaults.clone());
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        let merged = builder
            .add_source(env)
            .build()
            .map_err(|e| explain::Origins::default().explain(e))?;
        let schema = defaults.collect().expect("config/default.toml parses");
        let given = merged
            .collect()
            .map_err(|e| explain::Origins::default().explain(e))?;
        let origins = explain::Origins::check(&schema, &given)?;
        let settings: Settings = merged.try_deserialize().map_err(|e| origins.explain(e))?;
        settings.validate().map_err(|e| origins.locate(e))?;
        Ok(settings)
    }

    /// Rejects values that would only fail later, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        check_url(
            "amqp.url",
            self.amqp.url.expose_secret(),
            &["amqp", "amqps"],
        )?;
        // Named by position: a URL may hold a password.
        for (i, url) in self.amqp.urls.iter().enumerate() {
            check_url(
                &format!("amqp.urls[{i}]"),
                url.expose_secret(),
                &["amqp", "amqps"],
            )?;
        }
        if self.amqp.urls.len() > 64 {
            return bad("amqp.urls", "must list at most 64 nodes");
        }
        if self.amqp.queue_type == QueueType::Quorum
            && self.amqp.delivery_limit <= self.processing.max_redeliveries
        {
            return bad(
                "amqp.delivery_limit",
                &format!(
                    "must be above processing.max_redeliveries ({}): the broker's limit is the second guard, behind the service's own",
                    self.processing.max_redeliveries
                ),
            );
        }
        check_url(
            "redis.url",
            self.redis.url.expose_secret(),
            // No `rediss`: the redis crate is built without its TLS
            // features, so such a URL could only fail later, at start.
            &["redis"],
        )?;
        check_url(
            "provider.base_url",
            &self.provider.base_url,
            &["http", "https"],
        )?;
        if !self.http.public_url.is_empty() {
            check_url("http.public_url", &self.http.public_url, &["http", "https"])?;
            let url = url::Url::parse(&self.http.public_url).expect("checked above");
            if url.query().is_some() || url.fragment().is_some() {
                return bad("http.public_url", "must have no query or fragment");
            }
        }
        if !self.telemetry.otlp_endpoint.is_empty() {
            let (key, endpoint) = ("telemetry.otlp_endpoint", &self.telemetry.otlp_endpoint);
            check_url(key, endpoint, &["http", "https"])?;
            let url = url::Url::parse(endpoint).expect("checked above");
            if url.query().is_some() || url.fragment().is_some() {
                return bad(key, "must have no query or fragment");
            }
            // The gRPC exporter is built without TLS.
            if self.telemetry.otlp_protocol == OtlpProtocol::Grpc && url.scheme() == "https" {
                return bad(
                    key,
                    "https is not supported with telemetry.otlp_protocol = \"grpc\" (plaintext only); \
                     use \"http/protobuf\" for an https collector",
                );
            }
        }
        // A finished span is about 1 KiB: the queue stays under ~100 MiB.
        if self.telemetry.max_queued_spans == 0 || self.telemetry.max_queued_spans > 100_000 {
            return bad("telemetry.max_queued_spans", "must be 1 to 100000");
        }
        if self.http.report_park_ttl_secs == 0 {
            return bad("http.report_park_ttl_secs", "must be at least 1");
        }
        if self.http.bind.parse::<SocketAddr>().is_err() {
            return bad("http.bind", "must be an address like 127.0.0.1:8080");
        }
        if !self.grpc.bind.is_empty() && self.grpc.bind.parse::<SocketAddr>().is_err() {
            return bad(
                "grpc.bind",
                "must be an address like 127.0.0.1:50051, or empty to turn the gRPC door off",
            );
        }
        // Name the key by its position: its value is a secret.
        for (i, key) in self.http.api_keys.iter().enumerate() {
            let key = key.expose_secret();
            let name = format!("http.api_keys[{i}]");
            if key.is_empty() {
                return bad(&name, "is empty (a stray comma?)");
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(&name, "must be printable ASCII without spaces");
            }
            if key.len() < MIN_API_KEY_LEN {
                return bad(
                    &name,
                    &format!("must be at least {MIN_API_KEY_LEN} characters"),
                );
            }
        }
        let queues = [
            ("command_queue", &self.amqp.command_queue),
            ("dead_letter_queue", &self.amqp.dead_letter_queue),
        ];
        let exchanges = EventKind::ALL.map(|k| (k.exchange_setting(), self.amqp.exchange(k)));
        for (key, name) in queues.into_iter().chain(exchanges) {
            if name.is_empty() || name.len() > 255 {
                return bad(&format!("amqp.{key}"), "must be 1 to 255 characters");
            }
        }
        // Delay tiers are named <command_queue>.retry.<delay> and
        // <command_queue>.retry.high.<delay>, hold queues
        // <command_queue>.hold.<wait> and <command_queue>.high.hold.<wait>
        // (a delay or wait of at most 24 h is at most 10 characters).
        if self.amqp.command_queue.len() > 230 {
            return bad(
                "amqp.command_queue",
                "must be at most 230 characters (its delay tiers and hold queues add a suffix)",
            );
        }
        for (key, value) in [
            ("amqp.prefetch", u64::from(self.amqp.prefetch)),
            ("amqp.max_body_bytes", self.amqp.max_body_bytes as u64),
            ("amqp.confirm_timeout_ms", self.amqp.confirm_timeout_ms),
            ("amqp.connect_timeout_ms", self.amqp.connect_timeout_ms),
            (
                "redis.idempotency_ttl_secs",
                self.redis.idempotency_ttl_secs,
            ),
            ("redis.lease_ms", self.redis.lease_ms),
            ("redis.timeout_ms", self.redis.timeout_ms),
            (
                "provider.connect_timeout_ms",
                self.provider.connect_timeout_ms,
            ),
            (
                "provider.request_timeout_ms",
                self.provider.request_timeout_ms,
            ),
            ("retry.max_attempts", u64::from(self.retry.max_attempts)),
            (
                "retry.in_process_attempts",
                u64::from(self.retry.in_process_attempts),
            ),
            ("retry.max_age_secs", self.retry.max_age_secs),
            (
                "processing.max_redeliveries",
                u64::from(self.processing.max_redeliveries),
            ),
            (
                "provider.breaker_cool_down_ms",
                self.provider.breaker_cool_down_ms,
            ),
            ("retry.base_delay_ms", self.retry.base_delay_ms),
            (
                "processing.max_in_flight",
                self.processing.max_in_flight as u64,
            ),
            ("processing.min_sends", self.processing.min_sends as u64),
            (
                "processing.high_max_in_flight",
                self.processing.high_max_in_flight as u64,
            ),
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
        ] {
            if value == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        // Durations end up added to clocks (`Instant + Duration`), multiplied
        // (the lease rule below) and sent to Redis as signed 64-bit numbers
        // (`EXPIRE`); past ten years none of that is meaningful and some of
        // it overflows, so larger values are refused here, naming the key.
        for (key, value, max) in [
            (
                "amqp.reconnect_delay_ms",
                self.amqp.reconnect_delay_ms,
                MAX_MS,
            ),
            (
                "amqp.confirm_timeout_ms",
                self.amqp.confirm_timeout_ms,
                MAX_MS,
            ),
            (
                "redis.idempotency_ttl_secs",
                self.redis.idempotency_ttl_secs,
                MAX_SECS,
            ),
            ("redis.lease_ms", self.redis.lease_ms, MAX_MS),
            ("redis.timeout_ms", self.redis.timeout_ms, MAX_MS),
            (
                "provider.connect_timeout_ms",
                self.provider.connect_timeout_ms,
                MAX_MS,
            ),
            (
                "provider.request_timeout_ms",
                self.provider.request_timeout_ms,
                MAX_MS,
            ),
            (
                "provider.breaker_cool_down_ms",
                self.provider.breaker_cool_down_ms,
                MAX_MS,
            ),
            ("retry.max_age_secs", self.retry.max_age_secs, MAX_SECS),
            ("retry.base_delay_ms", self.retry.base_delay_ms, MAX_MS),
            ("retry.max_delay_ms", self.retry.max_delay_ms, MAX_MS),
            (
                "retry.requeue_delay_ms",
                self.retry.requeue_delay_ms,
                MAX_MS,
            ),
            (
                "processing.shutdown_grace_ms",
                self.processing.shutdown_grace_ms,
                MAX_MS,
            ),
        ] {
            if value > max {
                return bad(key, &format!("must be at most {max} (ten years)"));
            }
        }
        if self.processing.max_in_flight > 1_000_000 {
            return bad("processing.max_in_flight", "must be at most 1000000");
        }
        // It is the high queue's prefetch too, which AMQP counts in 16 bits.
        if self.processing.high_max_in_flight > usize::from(u16::MAX) {
            return bad("processing.high_max_in_flight", "must be at most 65535");
        }
        if self.retry.max_delay_ms < self.retry.base_delay_ms {
            return bad("retry.max_delay_ms", "must be at least retry.base_delay_ms");
        }
        let hops = &self.amqp.hold_hops_ms;
        if hops.is_empty() || hops.len() > 20 || hops.iter().any(|h| *h < 100 || *h > 86_400_000) {
            return bad(
                "amqp.hold_hops_ms",
                "must list 1 to 20 waits of 100 ms to 24 h",
            );
        }
        let tiers = &self.retry.tiers_ms;
        if tiers.is_empty() || tiers.len() > 20 || tiers.iter().any(|t| *t == 0 || *t > 86_400_000)
        {
            return bad("retry.tiers_ms", "must list 1 to 20 delays of 1 ms to 24 h");
        }
        // A lease must outlast one delivery's provider calls and the
        // confirm of its event, or a second instance could claim a key
        // whose send or publish is still under way.
        // Saturating: a sum past u64::MAX is longer than any lease, and is
        // refused as such.
        let calls = self.retry.in_process_attempts;
        // The slowest instance's timeout (an instance's own or the default).
        let (timeout_key, request_timeout_ms) = self
            .providers
            .iter()
            .filter_map(|(name, i)| {
                Some((
                    format!("providers.{name}.request_timeout_ms"),
                    i.request_timeout_ms?,
                ))
            })
            .fold(
                (
                    "provider.request_timeout_ms".to_owned(),
                    self.provider.request_timeout_ms,
                ),
                |slowest, next| if next.1 > slowest.1 { next } else { slowest },
            );
        let attempt_ms = u64::from(calls)
            .saturating_mul(request_timeout_ms)
            .saturating_add(
                u64::from(calls.saturating_sub(1)).saturating_mul(self.retry.max_delay_ms),
            )
            .saturating_add(self.amqp.confirm_timeout_ms);
        if self.redis.lease_ms <= attempt_ms {
            return bad(
                "redis.lease_ms",
                &format!(
                    "must exceed retry.in_process_attempts x {timeout_key} + backoff + amqp.confirm_timeout_ms ({attempt_ms} ms), \
                     or a second instance could send a key still in flight"
                ),
            );
        }
        if self.redis.liveness_ttl_ms < 300 || self.redis.liveness_ttl_ms >= self.redis.lease_ms {
            return bad(
                "redis.liveness_ttl_ms",
                "must be at least 300 and shorter than redis.lease_ms",
            );
        }
        if self.redis.idempotency_ttl_secs.saturating_mul(1000) <= self.redis.lease_ms {
            return bad(
                "redis.idempotency_ttl_secs",
                "must be longer than redis.lease_ms",
            );
        }
        // A command still retrying after its key was forgotten would be
        // claimed afresh by a duplicate of it, and sent twice.
        if self.retry.max_age_secs > self.redis.idempotency_ttl_secs {
            return bad(
                "retry.max_age_secs",
                "must be at most redis.idempotency_ttl_secs, or a key could still be retrying after it was forgotten",
            );
        }
        self.redis.validate_mode()?;
        if self.redis.wait_replicas > 16 {
            return bad("redis.wait_replicas", "must be at most 16");
        }
        if self.redis.wait_replicas > 0
            && (self.redis.wait_timeout_ms == 0
                || self.redis.wait_timeout_ms >= self.redis.timeout_ms)
        {
            return bad(
                "redis.wait_timeout_ms",
                "must be at least 1 and shorter than redis.timeout_ms when redis.wait_replicas is set",
            );
        }
        self.validate_limits()?;
        self.quiet_hours()?;
        check_header_secret("provider.token", self.provider.token.expose_secret())?;
        crate::telemetry::check_filter(&self.log.level)
            .map_err(|why| ConfigError(format!("log.level: {why}")))?;
        // Each instance's adapter checks its kind's credentials.
        for instance in self.instances()?.0 {
            crate::adapters::providers::build(&instance).map_err(ConfigError)?;
        }
        Ok(())
    }

    /// `[limits]`: every window parses, every allowed number is E.164
    /// (named by position: a number is personal data), both lists bounded.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        if limits.per_recipient.len() > crate::domain::MAX_WINDOWS {
            return Err(ConfigError(format!(
                "limits.per_recipient: at most {} windows",
                crate::domain::MAX_WINDOWS
            )));
        }
        for (i, raw) in limits.per_recipient.iter().enumerate() {
            RateWindow::parse(raw)
                .map_err(|why| ConfigError(format!("limits.per_recipient[{i}]: {why}")))?;
        }
        if limits.allow.len() > MAX_ALLOWED_NUMBERS {
            return Err(ConfigError(format!(
                "limits.allow: at most {MAX_ALLOWED_NUMBERS} numbers"
            )));
        }
        for (i, raw) in limits.allow.iter().enumerate() {
            PhoneNumber::parse(raw).map_err(|_| {
                ConfigError(format!(
                    "limits.allow[{i}]: must be an E.164 number (+ then 8 to 15 digits)"
                ))
            })?;
        }
        Ok(())
    }

    /// `[quiet_hours]`: `None` when `start` and `end` are both empty.
    pub fn quiet_hours(&self) -> Result<Option<QuietHours>, ConfigError> {
        let q = &self.quiet_hours;
        match (q.start.is_empty(), q.end.is_empty()) {
            (true, true) => return Ok(None),
            (false, true) => {
                return Err(ConfigError(
                    "quiet_hours.end: must be set with quiet_hours.start (both or neither)".into(),
                ))
            }
            (true, false) => {
                return Err(ConfigError(
                    "quiet_hours.start: must be set with quiet_hours.end (both or neither)".into(),
                ))
            }
            (false, false) => {}
        }
        let spread = Duration::from_secs(q.release_spread_s.min(MAX_SECS));
        QuietHours::new(&q.start, &q.end, spread)
            .map(Some)
            .map_err(|(field, why)| ConfigError(format!("quiet_hours.{field}: {why}")))
    }

    /// The per-recipient limits, as the notification step takes them.
    pub fn recipient_limits(&self) -> crate::notification::RecipientLimits {
        let action = &self.limits.action;
        crate::notification::RecipientLimits {
            windows: self
                .limits
                .per_recipient
                .iter()
                .filter_map(|raw| RateWindow::parse(raw).ok())
                .collect(),
            actions: LimitActions {
                high: action.high,
                normal: action.normal,
                bulk: action.bulk,
            },
            allow: self.limits.allow.iter().cloned().collect(),
        }
    }

    /// The provider instances and routes, defaults filled in and checked.
    /// The provider instances (each with its callback URL when
    /// `http.public_url` is set) and the routes.
    pub fn instances(&self) -> Result<(Vec<Instance>, Vec<RouteSettings>), ConfigError> {
        let (mut instances, routes) =
            providers::resolve(&self.provider, &self.providers, &self.routes)?;
        if !self.http.public_url.is_empty() {
            for instance in &mut instances {
                instance.callback_url = Some(instance.callback_url_under(&self.http.public_url));
            }
        }
        Ok((instances, routes))
    }

    pub fn notifier_settings(&self) -> crate::notification::NotifierSettings {
        crate::notification::NotifierSettings {
            retry: self.retry_policy(),
            max_body_bytes: self.amqp.max_body_bytes,
            max_takeovers: self.processing.max_redeliveries,
            lease: Duration::from_millis(self.redis.lease_ms),
            liveness_ttl: Duration::from_millis(self.redis.liveness_ttl_ms),
            smart_encoding: self.encoding.smart,
            limits: self.recipient_limits(),
            // Checked by validate: only valid settings are ever made.
            quiet_hours: self.quiet_hours().ok().flatten(),
        }
    }

    pub fn retry_policy(&self) -> crate::notification::RetryPolicy {
        crate::notification::RetryPolicy {
            max_attempts: self.retry.max_attempts,
            max_age: Duration::from_secs(self.retry.max_age_secs),
            in_process_attempts: self.retry.in_process_attempts,
            base_delay: Duration::from_millis(self.retry.base_delay_ms),
            max_delay: Duration::from_millis(self.retry.max_delay_ms),
            tiers: self.retry_tiers(),
            requeue_delay: Duration::from_millis(self.retry.requeue_delay_ms),
        }
    }

    /// The high queue's prefetch: `processing.high_max_in_flight`.
    pub fn high_prefetch(&self) -> u16 {
        u16::try_from(self.processing.high_max_in_flight).unwrap_or(u16::MAX)
    }

    pub fn retry_tiers(&self) -> Vec<Duration> {
        self.retry
            .tiers_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect()
    }

    /// The limit on commands in their send phase at once.
    pub fn send_limit(&self) -> crate::concurrency::AdaptiveLimit {
        crate::concurrency::AdaptiveLimit::new(
            self.processing.min_sends,
            self.processing.max_in_flight,
            self.processing.adaptive_sends,
        )
    }

    pub fn processing_settings(&self) -> crate::processing::ProcessingSettings {
        crate::processing::ProcessingSettings {
            max_in_flight: self.processing.max_in_flight,
            high_max_in_flight: self.processing.high_max_in_flight,
            shutdown_grace: Duration::from_millis(self.processing.shutdown_grace_ms),
            resubscribe_delay: Duration::from_millis(self.amqp.reconnect_delay_ms),
        }
    }
}

/// Ten years, the longest duration any setting may name.
const MAX_SECS: u64 = 10 * 365 * 24 * 3600;
const MAX_MS: u64 = MAX_SECS * 1000;

/// A secret sent in an HTTP header (as `Bearer <secret>`) must be visible
/// ASCII without spaces: anything else (a newline copied from a secrets
/// file, a non-ASCII character) cannot go into a header, or would be
/// trimmed or refused by the other side. The message names the key only.
pub fn check_header_secret(key: &str, secret: &str) -> Result<(), ConfigError> {
    if secret.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ConfigError(format!(
            "{key}: must be visible ASCII without spaces or control characters (it is sent in an HTTP header)"
        )))
    }
}

/// An empty secret means "not configured".
pub fn configured(secret: &SecretString) -> Option<&str> {
    Some(secret.expose_secret()).filter(|s| !s.is_empty())
}

fn check_url(key: &str, raw: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    match url::Url::parse(raw) {
        Ok(url) if schemes.contains(&url.scheme()) && url.host_str().is_some() => Ok(()),
        Ok(_) => Err(ConfigError(format!(
            "{key}: scheme must be one of {}",
            schemes.join(", ")
        ))),
        // The URL may hold a password: name the key and the problem only.
        Err(e) => Err(ConfigError(format!("{key}: not a valid URL ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, environment().source(Some(map)))
    }

    #[test]
    fn queue_type_is_classic_or_quorum_and_a_quorum_delivery_limit_must_exceed_the_services_own() {
        let s = load(&[]).unwrap();
        assert_eq!(s.amqp.queue_type, QueueType::Classic);
        assert!(s.amqp.delivery_limit > s.processing.max_redeliveries);
        let err = load(&[("SMS__AMQP__QUEUE_TYPE", "stream")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"amqp.queue_type (from SMS__AMQP__QUEUE_TYPE): expected "classic" or "quorum", got "stream""#),
            "{err}"
        );
        let low = [
            ("SMS__AMQP__QUEUE_TYPE", "quorum"),
            ("SMS__AMQP__DELIVERY_LIMIT", "10"),
        ];
        let err = load(&low).unwrap_err().to_string();
        assert!(
            err.contains("amqp.delivery_limit (from SMS__AMQP__DELIVERY_LIMIT): must be above processing.max_redeliveries (10)"),
            "{err}"
        );
        // Only quorum queues have the limit.
        load(&[("SMS__AMQP__DELIVERY_LIMIT", "10")]).unwrap();
    }

    #[test]
    fn amqp_urls_replace_amqp_url_and_a_bad_one_is_named_by_position_only() {
        let s = load(&[]).unwrap();
        assert_eq!(s.amqp.node_urls().len(), 1);
        let s = load(&[(
            "SMS__AMQP__URLS",
            "amqp://u:p@n1:5672/%2f, amqps://u:p@n2:5671/%2f",
        )])
        .unwrap();
        let nodes: Vec<String> = s
            .amqp
            .node_urls()
            .iter()
            .map(|u| u.expose_secret().to_owned())
            .collect();
        assert_eq!(nodes, ["amqp://u:p@n1:5672/%2f", "amqps://u:p@n2:5671/%2f"]);
        let err = load(&[(
            "SMS__AMQP__URLS",
            "amqp://u:p@n1:5672/%2f,http://u:hunter2@n2",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("amqp.urls[1] (from SMS__AMQP__URLS): scheme must be one of amqp, amqps"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn redis_mode_defaults_to_standalone_and_sentinel_needs_its_sentinels_and_master() {
        // TLS to Redis is not built in: refused here, not at start.
        let err = load(&[("SMS__REDIS__URL", "rediss://:secret@r:6380")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis.url") && err.contains("scheme"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let s = load(&[]).unwrap();
        assert_eq!(s.redis.mode, RedisMode::Standalone);
        assert_eq!(s.redis.wait_replicas, 0);
        let s = load(&[
            ("SMS__REDIS__MODE", "sentinel"),
            (
                "SMS__REDIS__SENTINELS",
                "10.0.0.5:26379, redis://10.0.0.6:26379",
            ),
            ("SMS__REDIS__MASTER_NAME", "mymaster"),
            ("SMS__REDIS__WAIT_REPLICAS", "1"),
        ])
        .unwrap();
        assert_eq!(s.redis.mode, RedisMode::Sentinel);
        assert_eq!(
            s.redis.sentinels,
            ["10.0.0.5:26379", "redis://10.0.0.6:26379"]
        );
        assert_eq!(
            s.redis.describe(),
            "master \"mymaster\" of sentinels 10.0.0.5:26379,10.0.0.6:26379"
        );
        // Logged and shown on /readyz: an entry's password never is.
        let s = load(&[
            ("SMS__REDIS__MODE", "sentinel"),
            (
                "SMS__REDIS__SENTINELS",
                "redis://:hunter2@10.0.0.5:26379,redis://user:hunter3@s2:26380/0",
            ),
            ("SMS__REDIS__MASTER_NAME", "mymaster"),
        ])
        .unwrap();
        let described = s.redis.describe();
        assert_eq!(
            described,
            "master \"mymaster\" of sentinels 10.0.0.5:26379,s2:26380"
        );
        assert!(!described.contains("hunter"), "{described}");
        for (vars, key) in [
            (vec![("SMS__REDIS__MODE", "sentinel")], "redis.sentinels"),
            (
                vec![
                    ("SMS__REDIS__MODE", "sentinel"),
                    ("SMS__REDIS__SENTINELS", "a:1"),
                ],
                "redis.master_name",
            ),
            (
                vec![
                    ("SMS__REDIS__MODE", "sentinel"),
                    ("SMS__REDIS__SENTINELS", "a:1,nonsense"),
                    ("SMS__REDIS__MASTER_NAME", "m"),
                ],
                "redis.sentinels[1]",
            ),
            (vec![("SMS__REDIS__MODE", "replicated")], "redis.mode"),
            (
                vec![
                    ("SMS__REDIS__MODE", "cluster"),
                    ("SMS__REDIS__NODES", "a:1"),
                    ("SMS__REDIS__WAIT_REPLICAS", "1"),
                    ("SMS__REDIS__WAIT_TIMEOUT_MS", "100"),
                ],
                "redis.wait_replicas",
            ),
            (
                vec![
                    ("SMS__REDIS__MODE", "cluster"),
                    ("SMS__REDIS__NODES", "a:1"),
                    ("SMS__REDIS__KEY_PREFIX", "a{b}"),
                ],
                "redis.key_prefix",
            ),
            (vec![("SMS__REDIS__KEY_PREFIX", "")], "redis.key_prefix"),
            (
                vec![("SMS__REDIS__WAIT_REPLICAS", "17")],
                "redis.wait_replicas",
            ),
            (
                vec![
                    ("SMS__REDIS__WAIT_REPLICAS", "1"),
                    ("SMS__REDIS__WAIT_TIMEOUT_MS", "2000"),
                ],
                "redis.wait_timeout_ms",
            ),
        ] {
            let err = load(&vars).unwrap_err().to_string();
            assert!(err.contains(key), "{vars:?}: {err}");
        }
        // A hash tag in the prefix matters to a cluster only: a standalone
        // or sentinel deployment keeps its `{sms}` prefix.
        for mode in ["standalone", "sentinel"] {
            let s = load(&[
                ("SMS__REDIS__MODE", mode),
                ("SMS__REDIS__SENTINELS", "a:1"),
                ("SMS__REDIS__MASTER_NAME", "m"),
                ("SMS__REDIS__KEY_PREFIX", "{sms}"),
            ])
            .unwrap();
            assert_eq!(s.redis.key_prefix, "{sms}");
        }
        // Cluster mode starts (its keys are tagged by the store).
        let s = load(&[
            ("SMS__REDIS__MODE", "cluster"),
            ("SMS__REDIS__NODES", "10.0.0.5:7000,10.0.0.6:7000"),
        ])
        .unwrap();
        assert_eq!(s.redis.mode, RedisMode::Cluster);
        assert_eq!(s.redis.nodes.len(), 2);
        let err = load(&[("SMS__REDIS__MODE", "replicated")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"standalone\", \"sentinel\" or \"cluster\""),
            "{err}"
        );
    }

    #[test]
    fn retry_tiers_come_from_a_comma_separated_list() {
        let s = load(&[("SMS__RETRY__TIERS_MS", "100,250,1000")]).unwrap();
        assert_eq!(s.retry.tiers_ms, [100, 250, 1000]);
        let one = load(&[("SMS__RETRY__TIERS_MS", "60000")]).unwrap();
        assert_eq!(one.retry.tiers_ms, [60000]);
        let token = load(&[
            ("SMS__PROVIDER__TOKEN", "007123"),
            ("SMS__REDIS__KEY_PREFIX", "true"),
        ])
        .unwrap();
        assert_eq!(
            configured(&token.provider.token),
            Some("007123"),
            "secrets are taken as written"
        );
        assert_eq!(token.redis.key_prefix, "true", "text stays text");
        let defaults = load(&[]).unwrap();
        assert_eq!(
            defaults.retry.tiers_ms,
            [5000, 30000, 120000, 600000, 3600000]
        );
        assert_eq!(defaults.retry.max_attempts, 12);
        assert_eq!(defaults.retry.max_age_secs, 86_400);
        let err = load(&[("SMS__RETRY__TIERS_MS", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.tiers_ms"), "{err}");
    }

    #[test]
    fn hold_hops_come_from_a_list_of_100_ms_to_24_h() {
        let defaults = load(&[]).unwrap();
        assert_eq!(
            defaults.amqp.hold_hops_ms,
            [
                1000, 3000, 10_000, 30_000, 60_000, 180_000, 600_000, 1_800_000, 3_600_000,
                10_800_000, 28_800_000
            ]
        );
        let s = load(&[("SMS__AMQP__HOLD_HOPS_MS", "500,2000")]).unwrap();
        assert_eq!(s.amqp.hold_hops_ms, [500, 2000]);
        for bad in ["99", "86400001", ""] {
            let err = load(&[("SMS__AMQP__HOLD_HOPS_MS", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("amqp.hold_hops_ms"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn traces_are_off_by_default_and_a_bad_collector_setting_names_its_key() {
        let defaults = load(&[]).unwrap();
        assert_eq!(defaults.telemetry.otlp_endpoint, "");
        assert_eq!(defaults.telemetry.otlp_protocol, OtlpProtocol::HttpProtobuf);
        let grpc = load(&[
            ("SMS__TELEMETRY__OTLP_ENDPOINT", "http://collector:4317"),
            ("SMS__TELEMETRY__OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(grpc.telemetry.otlp_protocol, OtlpProtocol::Grpc);
        for (vars, key, why) in [
            (
                vec![("SMS__TELEMETRY__OTLP_PROTOCOL", "http/json")],
                "telemetry.otlp_protocol",
                "\"http/protobuf\" or \"grpc\"",
            ),
            (
                vec![("SMS__TELEMETRY__OTLP_ENDPOINT", "collector:4318")],
                "telemetry.otlp_endpoint",
                "scheme",
            ),
            (
                vec![("SMS__TELEMETRY__OTLP_ENDPOINT", "http://c:4318/?x=1")],
                "telemetry.otlp_endpoint",
                "query",
            ),
            (
                vec![
                    ("SMS__TELEMETRY__OTLP_ENDPOINT", "https://collector:4317"),
                    ("SMS__TELEMETRY__OTLP_PROTOCOL", "grpc"),
                ],
                "telemetry.otlp_endpoint",
                "http/protobuf",
            ),
            (
                vec![("SMS__TELEMETRY__MAX_QUEUED_SPANS", "0")],
                "telemetry.max_queued_spans",
                "1 to",
            ),
            (
                vec![("SMS__TELEMETRY__MAX_QUEUED_SPANS", "100001")],
                "telemetry.max_queued_spans",
                "1 to 100000",
            ),
        ] {
            let err = load(&vars).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(why), "{vars:?}: {err}");
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = load(&[]).unwrap();
        assert_eq!(
            s.amqp.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.redis.url.expose_secret(), "redis://127.0.0.1:6379");
        assert_eq!(s.provider.kind, ProviderKind::Generic);
        assert_eq!(s.provider.base_url, "http://127.0.0.1:9000");
        assert_eq!(s.http.bind, "127.0.0.1:8080");
        assert_eq!(s.grpc.bind, "127.0.0.1:50051");
        assert_eq!(s.amqp.command_queue, "sms.send");
        assert_eq!(s.amqp.dead_letter_queue, "sms.send.dead");
        assert_eq!(s.redis.idempotency_ttl_secs, 86_400);
        assert!(configured(&s.provider.token).is_none());
    }

    #[test]
    fn smart_encoding_is_on_unless_turned_off_and_takes_only_true_or_false() {
        assert!(load(&[]).unwrap().notifier_settings().smart_encoding);
        let off = load(&[("SMS__ENCODING__SMART", "false")]).unwrap();
        assert!(!off.notifier_settings().smart_encoding);
        let err = load(&[("SMS__ENCODING__SMART", "sometimes")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"invalid configuration: encoding.smart (from SMS__ENCODING__SMART): expected true or false, got "sometimes""#
        );
    }

    #[test]
    fn environment_overrides_with_double_underscores() {
        let s = load(&[
            ("SMS__AMQP__URL", "amqp://u:p@rabbit:5672/%2f"),
            ("SMS__REDIS__URL", "redis://cache:6379"),
            ("SMS__PROVIDER__BASE_URL", "http://fake:9000"),
            ("SMS__PROVIDER__TOKEN", "12345"),
            ("SMS__HTTP__BIND", "0.0.0.0:8080"),
            ("SMS__PROCESSING__MAX_IN_FLIGHT", "7"),
        ])
        .unwrap();
        assert_eq!(s.amqp.url.expose_secret(), "amqp://u:p@rabbit:5672/%2f");
        assert_eq!(s.redis.url.expose_secret(), "redis://cache:6379");
        assert_eq!(s.provider.base_url, "http://fake:9000");
        assert_eq!(configured(&s.provider.token), Some("12345"));
        assert_eq!(s.http.bind, "0.0.0.0:8080");
        assert_eq!(s.processing.max_in_flight, 7);
    }

    #[test]
    fn an_empty_grpc_bind_turns_the_grpc_door_off() {
        assert_eq!(load(&[("SMS__GRPC__BIND", "")]).unwrap().grpc.bind, "");
        let any = load(&[("SMS__GRPC__BIND", "0.0.0.0:50051")]).unwrap();
        assert_eq!(any.grpc.bind, "0.0.0.0:50051");
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (var, value, key) in [
            ("SMS__AMQP__URL", "not a url", "amqp.url"),
            ("SMS__REDIS__URL", "http://x", "redis.url"),
            ("SMS__PROVIDER__BASE_URL", "ftp://x", "provider.base_url"),
            ("SMS__HTTP__BIND", "localhost", "http.bind"),
            ("SMS__GRPC__BIND", "localhost:50051", "grpc.bind"),
            (
                "SMS__PROCESSING__MAX_IN_FLIGHT",
                "0",
                "processing.max_in_flight",
            ),
            (
                "SMS__PROCESSING__HIGH_MAX_IN_FLIGHT",
                "0",
                "processing.high_max_in_flight",
            ),
            (
                "SMS__PROCESSING__HIGH_MAX_IN_FLIGHT",
                "65536",
                "processing.high_max_in_flight",
            ),
            ("SMS__REDIS__LEASE_MS", "1000", "redis.lease_ms"),
            ("SMS__PROVIDER__KIND", "carrier-pigeon", "provider.kind"),
            (
                "SMS__AMQP__COMMAND_QUEUE",
                &"q".repeat(231),
                "amqp.command_queue",
            ),
            ("SMS__RETRY__MAX_ATTEMPTS", "many", "retry.max_attempts"),
        ] {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn a_retry_that_outlives_the_remembered_key_is_refused() {
        let err = load(&[
            ("SMS__REDIS__IDEMPOTENCY_TTL_SECS", "3600"),
            ("SMS__RETRY__MAX_AGE_SECS", "3601"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("retry.max_age_secs"), "{err}");
        assert!(err.contains("redis.idempotency_ttl_secs"), "{err}");
        let equal = load(&[
            ("SMS__REDIS__IDEMPOTENCY_TTL_SECS", "3600"),
            ("SMS__RETRY__MAX_AGE_SECS", "3600"),
        ]);
        assert!(equal.is_ok(), "a retry may last as long as the key");
    }

    /// Every number a setting takes, at the largest value its type holds:
    /// refused naming its key, or accepted and usable, never a panic.
    #[test]
    fn the_largest_numbers_are_refused_naming_the_key_or_used_never_a_panic() {
        let u64_max = u64::MAX.to_string();
        let u32_max = u32::MAX.to_string();
        let u16_max = u16::MAX.to_string();
        let usize_max = usize::MAX.to_string();
        let keys: &[(&str, &str)] = &[
            ("amqp.prefetch", &u16_max),
            ("amqp.max_body_bytes", &usize_max),
            ("amqp.reconnect_delay_ms", &u64_max),
            ("amqp.confirm_timeout_ms", &u64_max),
            ("redis.idempotency_ttl_secs", &u64_max),
            ("redis.lease_ms", &u64_max),
            ("redis.timeout_ms", &u64_max),
            ("provider.connect_timeout_ms", &u64_max),
            ("provider.request_timeout_ms", &u64_max),
            ("provider.max_idle_connections", &usize_max),
            ("provider.max_sends_per_second", &u32_max),
            ("provider.breaker_threshold", &u32_max),
            ("provider.breaker_cool_down_ms", &u64_max),
            ("retry.max_attempts", &u32_max),
            ("retry.max_age_secs", &u64_max),
            ("retry.in_process_attempts", &u32_max),
            ("retry.base_delay_ms", &u64_max),
            ("retry.max_delay_ms", &u64_max),
            ("retry.tiers_ms", &u64_max),
            ("amqp.hold_hops_ms", &u64_max),
            ("retry.requeue_delay_ms", &u64_max),
            ("processing.max_in_flight", &usize_max),
            ("processing.min_sends", &usize_max),
            ("processing.high_max_in_flight", &usize_max),
            ("processing.max_redeliveries", &u32_max),
            ("processing.shutdown_grace_ms", &u64_max),
            ("http.max_body_bytes", &usize_max),
            ("http.report_park_ttl_secs", &u64_max),
        ];
        let use_all = |s: &Settings| {
            let _ = (s.retry_policy(), s.retry_tiers(), s.processing_settings());
            let _ = (s.send_limit(), s.high_prefetch());
        };
        for (key, value) in keys {
            let var = format!("SMS__{}", key.replace('.', "__").to_uppercase());
            match load(&[(&var, value)]) {
                Ok(settings) => use_all(&settings),
                Err(e) => assert!(e.to_string().contains(key), "{key}={value}: {e}"),
            }
        }
        // Each at the largest value validation lets through, together: the
        // lease rule multiplies and adds them.
        let ten_years_ms = (10 * 365 * 24 * 3600 * 1000u64).to_string();
        let ten_years_secs = (10 * 365 * 24 * 3600u64).to_string();
        let err = load(&[
            ("SMS__RETRY__IN_PROCESS_ATTEMPTS", &u32_max),
            ("SMS__PROVIDER__REQUEST_TIMEOUT_MS", &ten_years_ms),
            ("SMS__RETRY__MAX_DELAY_MS", &ten_years_ms),
            ("SMS__AMQP__CONFIRM_TIMEOUT_MS", &ten_years_ms),
            ("SMS__REDIS__LEASE_MS", &ten_years_ms),
            ("SMS__REDIS__IDEMPOTENCY_TTL_SECS", &ten_years_secs),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("redis.lease_ms"), "{err}");
        let ten_years = load(&[
            ("SMS__REDIS__IDEMPOTENCY_TTL_SECS", &ten_years_secs),
            ("SMS__RETRY__MAX_AGE_SECS", &ten_years_secs),
            ("SMS__PROCESSING__SHUTDOWN_GRACE_MS", &ten_years_ms),
            ("SMS__PROVIDER__BREAKER_COOL_DOWN_MS", &ten_years_ms),
        ])
        .unwrap();
        use_all(&ten_years);
    }

    /// A key remembered for u64::MAX seconds would reach Redis as `EXPIRE
    /// key -1` (gone at once); other durations overflow clocks.
    #[test]
    fn durations_past_ten_years_are_refused_naming_the_key() {
        let over_ms = (MAX_MS + 1).to_string();
        let over_secs = (MAX_SECS + 1).to_string();
        for (key, value) in [
            ("amqp.reconnect_delay_ms", &over_ms),
            ("amqp.confirm_timeout_ms", &over_ms),
            ("redis.idempotency_ttl_secs", &over_secs),
            ("redis.lease_ms", &over_ms),
            ("redis.timeout_ms", &over_ms),
            ("provider.connect_timeout_ms", &over_ms),
            ("provider.request_timeout_ms", &over_ms),
            ("provider.breaker_cool_down_ms", &over_ms),
            ("retry.max_age_secs", &over_secs),
            ("retry.base_delay_ms", &over_ms),
            ("retry.max_delay_ms", &over_ms),
            ("retry.requeue_delay_ms", &over_ms),
            ("processing.shutdown_grace_ms", &over_ms),
        ] {
            let var = format!("SMS__{}", key.replace('.', "__").to_uppercase());
            let err = load(&[(&var, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
        }
    }

    #[test]
    fn a_provider_token_that_cannot_be_an_http_header_is_refused_without_echoing_it() {
        for token in [
            "s3cret\n",
            "s3cret\r\nX-Evil: 1",
            "s3 cret",
            "s3cret\t",
            "s3crét",
            "s3cret\u{7f}",
        ] {
            let err = load(&[("SMS__PROVIDER__TOKEN", token)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("provider.token"), "{token:?}: {err}");
            assert!(!err.contains("s3cr"), "{token:?}: {err}");
        }
        let fine = load(&[("SMS__PROVIDER__TOKEN", "AbC-123._~+/xyz==")]).unwrap();
        assert_eq!(configured(&fine.provider.token), Some("AbC-123._~+/xyz=="));
    }

    #[test]
    fn api_keys_come_from_a_comma_separated_environment_variable() {
        let first = "a".repeat(16);
        let second = format!("b-{}", "x".repeat(30));
        let s = load(&[("SMS__HTTP__API_KEYS", &format!("{first}, {second}"))]).unwrap();
        let keys: Vec<&str> = s.http.api_keys.iter().map(|k| k.expose_secret()).collect();
        assert_eq!(keys, [first.as_str(), second.as_str()]);
        let one = load(&[("SMS__HTTP__API_KEYS", &first)]).unwrap();
        assert_eq!(one.http.api_keys.len(), 1);
        for empty in ["", " "] {
            let none = load(&[("SMS__HTTP__API_KEYS", empty)]).unwrap();
            assert!(none.http.api_keys.is_empty(), "{empty:?}");
        }
        assert!(
            load(&[]).unwrap().http.api_keys.is_empty(),
            "none by default"
        );
    }

    #[test]
    fn short_empty_or_spaced_api_keys_are_refused_without_echoing_them() {
        let good = "g".repeat(16);
        for (value, key) in [
            ("short-key-15chr".to_owned(), "http.api_keys[0]"),
            (format!("{good},"), "http.api_keys[1]"),
            (format!("{good},,{good}"), "http.api_keys[1]"),
            (format!("{good},has a space in it!!"), "http.api_keys[1]"),
        ] {
            let err = load(&[("SMS__HTTP__API_KEYS", &value)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{value}: {err}");
            for part in value.split(',').filter(|p| !p.is_empty()) {
                assert!(!err.contains(part), "the key leaked: {err}");
            }
        }
    }

    #[test]
    fn per_recipient_limits_are_off_by_default_and_come_from_comma_separated_variables() {
        let defaults = load(&[]).unwrap().recipient_limits();
        assert!(defaults.windows.is_empty() && defaults.allow.is_empty());
        assert_eq!(defaults.actions, LimitActions::default());
        let s = load(&[
            ("SMS__LIMITS__PER_RECIPIENT", "5/15m, 20/24h"),
            ("SMS__LIMITS__ALLOW", "+254700000001,+254700000002"),
            ("SMS__LIMITS__ACTION__HIGH", "delay"),
            ("SMS__LIMITS__ACTION__BULK", "fail"),
        ])
        .unwrap()
        .recipient_limits();
        let windows: Vec<String> = s.windows.iter().map(ToString::to_string).collect();
        assert_eq!(windows, ["5/15m", "20/1d"]);
        assert!(s.allow.contains("+254700000002") && s.allow.len() == 2);
        assert_eq!(
            (s.actions.high, s.actions.normal, s.actions.bulk),
            (LimitAction::Delay, LimitAction::Delay, LimitAction::Fail)
        );
    }

    #[test]
    fn a_bad_limit_setting_names_its_key_and_never_echoes_a_number() {
        for (var, value, says) in [
            (
                "SMS__LIMITS__PER_RECIPIENT",
                "5/15m,5/15",
                "limits.per_recipient[1] (from SMS__LIMITS__PER_RECIPIENT): \"5/15\" is not a window",
            ),
            (
                "SMS__LIMITS__PER_RECIPIENT",
                "0/1h",
                "limits.per_recipient[0] (from SMS__LIMITS__PER_RECIPIENT): \"0/1h\": the count must be 1 to 10000",
            ),
            (
                "SMS__LIMITS__PER_RECIPIENT",
                "1/1s,1/2s,1/3s,1/4s,1/5s,1/6s,1/7s,1/8s,1/9s,1/10s,1/11s",
                "limits.per_recipient (from SMS__LIMITS__PER_RECIPIENT): at most 10 windows",
            ),
            (
                "SMS__LIMITS__ALLOW",
                "+254700000001,0712345678",
                "limits.allow[1] (from SMS__LIMITS__ALLOW): must be an E.164 number",
            ),
            (
                "SMS__LIMITS__ACTION__NORMAL",
                "drop",
                r#"limits.action.normal (from SMS__LIMITS__ACTION__NORMAL): expected "delay" or "fail", got "drop""#,
            ),
        ] {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(says), "{var}={value}: {err}");
            assert!(!err.contains("712345678"), "a number leaked: {err}");
        }
    }

    #[test]
    fn quiet_hours_are_off_by_default_and_need_both_ends() {
        let defaults = load(&[]).unwrap();
        assert_eq!(defaults.quiet_hours().unwrap(), None);
        assert_eq!(defaults.quiet_hours.release_spread_s, 1800);
        let on = load(&[
            ("SMS__QUIET_HOURS__START", "21:00"),
            ("SMS__QUIET_HOURS__END", "08:00:30"),
        ])
        .unwrap();
        assert!(on.quiet_hours().unwrap().is_some());
        assert!(on.notifier_settings().quiet_hours.is_some());
        for (vars, says) in [
            (
                vec![("SMS__QUIET_HOURS__START", "21:00")],
                "quiet_hours.end: must be set with quiet_hours.start",
            ),
            (
                vec![("SMS__QUIET_HOURS__END", "08:00")],
                "quiet_hours.start: must be set with quiet_hours.end",
            ),
            (
                vec![
                    ("SMS__QUIET_HOURS__START", "9pm"),
                    ("SMS__QUIET_HOURS__END", "08:00"),
                ],
                "quiet_hours.start (from SMS__QUIET_HOURS__START): \"9pm\" is not a time of day",
            ),
            (
                vec![
                    ("SMS__QUIET_HOURS__START", "21:00"),
                    ("SMS__QUIET_HOURS__END", "21:00"),
                ],
                "quiet_hours.end (from SMS__QUIET_HOURS__END): must differ from start",
            ),
            (
                vec![
                    ("SMS__QUIET_HOURS__START", "21:00"),
                    ("SMS__QUIET_HOURS__END", "08:00"),
                    ("SMS__QUIET_HOURS__RELEASE_SPREAD_S", "86400"),
                ],
                "quiet_hours.release_spread_s (from SMS__QUIET_HOURS__RELEASE_SPREAD_S): must be at most 21600",
            ),
        ] {
            let err = load(&vars).unwrap_err().to_string();
            assert!(err.contains(says), "{vars:?}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let err = load(&[("SMS__AMQP__PREFETCHH", "5")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefetchh"), "{err}");
    }

    #[test]
    fn url_errors_do_not_echo_the_password() {
        let err = load(&[("SMS__AMQP__URL", "amqp://user:hunter2@:bad:port")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    /// One case per kind of mistake: the message names the key, the
    /// variable the user set, and what was expected, in plain words.
    #[test]
    fn errors_name_the_variable_set_and_say_what_was_expected() {
        for (var, value, expected) in [
            (
                "SMS__LOG__FORMAT",
                "yaml",
                r#"log.format (from SMS__LOG__FORMAT): expected "text" or "json", got "yaml""#,
            ),
            (
                "SMS__PROVIDER__KIND",
                "carrier-pigeon",
                r#"provider.kind (from SMS__PROVIDER__KIND): expected one of "generic", "twilio", "africastalking", "vonage" or "infobip", got "carrier-pigeon""#,
            ),
            (
                "SMS__PROVIDER__KIND",
                "twilio",
                r#"provider.kind (from SMS__PROVIDER__KIND): twilio needs credentials: configure it as [providers.twilio] (for example SMS__PROVIDERS__TWILIO__...)"#,
            ),
            (
                "SMS__AMQP__PREFETCH",
                "many",
                r#"amqp.prefetch (from SMS__AMQP__PREFETCH): expected a whole number, got "many""#,
            ),
            (
                "SMS__AMQP__PREFETCH",
                "70000",
                "amqp.prefetch (from SMS__AMQP__PREFETCH): expected a whole number from 0 to 65535, got 70000",
            ),
            (
                "SMS__AMQP__PREFETCH",
                "0",
                "amqp.prefetch (from SMS__AMQP__PREFETCH): must be greater than 0",
            ),
            (
                "SMS__PROCESSING__ADAPTIVE_SENDS",
                "maybe",
                r#"processing.adaptive_sends (from SMS__PROCESSING__ADAPTIVE_SENDS): expected true or false, got "maybe""#,
            ),
            (
                "SMS__AMQP__PREFECH",
                "5",
                "amqp.prefech (from SMS__AMQP__PREFECH): no such setting; did you mean amqp.prefetch (SMS__AMQP__PREFETCH)?",
            ),
            (
                "SMS__AMQP_PREFETCH",
                "5",
                "amqp_prefetch (from SMS__AMQP_PREFETCH): no such setting; did you mean amqp.prefetch (SMS__AMQP__PREFETCH)?",
            ),
            (
                "SMS__AMQP",
                "5",
                "amqp (from SMS__AMQP): is a section of settings, not a value; set its keys, like SMS__AMQP__COMMAND_QUEUE",
            ),
            (
                "SMS__LOG__LEVEL",
                "verbose",
                r#"log.level (from SMS__LOG__LEVEL): "verbose" is not a level; expected trace, debug, info, warn, error or off, or target=level as in sms_service=debug"#,
            ),
        ] {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert_eq!(err, format!("invalid configuration: {expected}"), "{var}={value}");
        }
        let far = load(&[("SMS__REDIS__BANANA", "1")])
            .unwrap_err()
            .to_string();
        assert!(
            far.contains(
                "redis.banana (from SMS__REDIS__BANANA): no such setting; the keys of redis are "
            ),
            "{far}"
        );
        assert!(far.contains("key_prefix"), "{far}");
    }

    #[test]
    fn a_settings_file_is_named_as_the_source_of_its_mistakes() {
        let dir = std::env::temp_dir().join(format!("sms-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sms.toml");
        let cases = [
            (
                "[amqp]\nprefech = 5\n",
                "(from ",
                "no such setting; did you mean amqp.prefetch?",
            ),
            (
                "[amqp]\nprefetch = 0\n",
                "amqp.prefetch (from ",
                "must be greater than 0",
            ),
            (
                "[amqp]\nprefetch = \"x\n",
                "settings file ",
                "TOML parse error at line 2",
            ),
        ];
        for (text, names, says) in cases {
            std::fs::write(&file, text).unwrap();
            let err = Settings::load_from(Some(&file), environment().source(Some(HashMap::new())))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(names) && err.contains("sms.toml"),
                "{text:?}: {err}"
            );
            assert!(err.contains(says), "{text:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
        // The environment wins over the file, and is what the message names.
        std::fs::write(&file, "[amqp]\nprefetch = 0\n").unwrap();
        let env: HashMap<String, String> =
            [("SMS__AMQP__PREFETCH".to_owned(), "0".to_owned())].into();
        let err = Settings::load_from(Some(&file), environment().source(Some(env)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("amqp.prefetch (from SMS__AMQP__PREFETCH)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

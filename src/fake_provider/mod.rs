//! A fake SMS provider in each provider's dialect (`--kind`), for
//! docker-compose, demos, benchmarks and end-to-end tests. Each dialect
//! (one module each) checks a request as the real API does (auth,
//! encoding, required fields; a wrong request gets the provider's own
//! error answer) and answers as it does, after a set latency; for set
//! shares of calls it answers the dialect's transient failure, rejection
//! or throttling instead. `GET /stats` counts each, and how many keys it
//! saw more than once. Ids carry a `<run>` random per fake, so they stay
//! unique across restarts, as a real provider's do (delivery reports are
//! matched on them).
//!
//! With `--dlr-url` it also calls back: after `--dlr-delay-ms`, each
//! accepted message's delivery reports in the dialect's own callback
//! format, signed as the provider signs them (an intermediate report where
//! the provider sends one, then the final one: not delivered for a
//! `--dlr-fail-rate` share of messages). `--dlr-duplicates` sends the
//! final report twice, `--dlr-out-of-order` sends it first. A report not
//! answered 2xx is sent again, up to five times, a second apart, as the
//! providers retry.

mod africastalking;
mod generic;
mod infobip;
mod twilio;
mod vonage;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Json;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::ProviderKind;
use crate::domain::mask_phone;

/// How the fake behaves. The three shares are of all calls, drawn once per
/// call, so together they are at most 1.
#[derive(Debug, Clone, Default)]
pub struct FakeSettings {
    /// The provider whose API it speaks.
    pub kind: ProviderKind,
    /// Credentials the dialect expects (`account_sid`, `auth_token`,
    /// `api_key`, ...); a dialect that needs one and is given none accepts
    /// any well-formed value.
    pub credentials: std::collections::BTreeMap<String, String>,
    /// Added to every answer.
    pub latency: Duration,
    /// Share of calls (0 to 1) answered 503.
    pub fail_rate: f64,
    /// Share of calls (0 to 1) answered 400.
    pub reject_rate: f64,
    /// Share of calls (0 to 1) answered 429 with `Retry-After: 1`.
    pub throttle_rate: f64,
    /// Delivery reports, if the fake calls back.
    pub reports: Option<ReportSettings>,
}

/// How the fake calls back with delivery reports.
#[derive(Debug, Clone, Default)]
pub struct ReportSettings {
    /// Where: the service's callback URL for this instance (with its path
    /// token, for the dialects that use one).
    pub url: String,
    /// How long after acceptance.
    pub delay: Duration,
    /// Share of messages (0 to 1) reported as not delivered.
    pub fail_rate: f64,
    /// The final report twice.
    pub duplicates: bool,
    /// The final report before the intermediate one.
    pub out_of_order: bool,
}

/// How a message ends, drawn once per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Delivered,
    Failed,
}

/// One callback, as the dialect makes it.
#[derive(Debug, Clone)]
pub(crate) struct Callback {
    pub(crate) method: reqwest::Method,
    /// The whole URL (a GET carries its fields in the query).
    pub(crate) url: String,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

impl Callback {
    /// A GET of `url` with `fields` as its query.
    pub(crate) fn get(url: &str, fields: &[(&str, &str)]) -> Self {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let separator = if url.contains('?') { '&' } else { '?' };
        Self {
            method: reqwest::Method::GET,
            url: format!("{url}{separator}{query}"),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A form-encoded POST of `fields` to `url`.
    pub(crate) fn form(url: &str, fields: &[(&str, &str)]) -> Self {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        Self {
            method: reqwest::Method::POST,
            url: url.to_owned(),
            headers: vec![("content-type", "application/x-www-form-urlencoded".into())],
            body: body.into_bytes(),
        }
    }

    /// A JSON POST of `body` to `url`.
    pub(crate) fn json(url: &str, body: &serde_json::Value) -> Self {
        Self {
            method: reqwest::Method::POST,
            url: url.to_owned(),
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }
}

impl FakeSettings {
    /// Each share is in [0, 1], and so is their sum.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (flag, share) in [
            ("--fail-rate", self.fail_rate),
            ("--reject-rate", self.reject_rate),
            ("--throttle-rate", self.throttle_rate),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&share),
                "{flag} must be between 0 and 1"
            );
        }
        if let Some(reports) = &self.reports {
            anyhow::ensure!(
                (0.0..=1.0).contains(&reports.fail_rate),
                "--dlr-fail-rate must be between 0 and 1"
            );
            let url = url::Url::parse(&reports.url);
            anyhow::ensure!(
                url.is_ok_and(|u| matches!(u.scheme(), "http" | "https")),
                "--dlr-url must be an http or https URL"
            );
        }
        anyhow::ensure!(
            self.fail_rate + self.reject_rate + self.throttle_rate <= 1.0,
            "--fail-rate, --reject-rate and --throttle-rate add up to more than 1"
        );
        if self.kind == ProviderKind::Vonage {
            vonage::validate(self)?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    throttled: AtomicU64,
    duplicates: AtomicU64,
    keys: Mutex<HashSet<String>>,
    /// Callbacks answered 2xx, and given up after five tries.
    reports_sent: AtomicU64,
    reports_lost: AtomicU64,
    /// Calls to the dialect's API that came over HTTP/2.
    http2: AtomicU64,
}

#[derive(Clone)]
pub(crate) struct FakeState {
    pub(crate) settings: FakeSettings,
    /// Random per fake: the `<run>` of its ids.
    run: Arc<str>,
    counters: Arc<Counters>,
    /// Makes the callbacks.
    client: reqwest::Client,
}

/// What a call draws: the dialect answers it in its own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simulated {
    /// A transient failure (the generic fake's 503).
    Failure,
    /// A rejection of the message (the generic fake's 400).
    Rejection,
    /// Throttling (the generic fake's 429 with `Retry-After: 1`).
    Throttling,
}

impl FakeState {
    /// Waits the set latency, then draws what this call gets: `None` to
    /// accept it, else the failure to answer (counted).
    pub(crate) async fn draw(&self) -> Option<Simulated> {
        if !self.settings.latency.is_zero() {
            tokio::time::sleep(self.settings.latency).await;
        }
        let s = &self.settings;
        if s.fail_rate + s.reject_rate + s.throttle_rate <= 0.0 {
            return None;
        }
        let c = &self.counters;
        let draw = rand::random::<f64>();
        if draw < s.fail_rate {
            c.failed.fetch_add(1, Ordering::Relaxed);
            Some(Simulated::Failure)
        } else if draw < s.fail_rate + s.reject_rate {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            Some(Simulated::Rejection)
        } else if draw < s.fail_rate + s.reject_rate + s.throttle_rate {
            c.throttled.fetch_add(1, Ordering::Relaxed);
            Some(Simulated::Throttling)
        } else {
            None
        }
    }

    /// Counts an accepted message (and whether its key was seen before;
    /// `key` may be empty where the dialect carries none) and gives its id.
    pub(crate) fn accept(&self, to: &str, key: &str) -> String {
        let counters = &self.counters;
        let n = counters.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        if !key.is_empty() {
            let first = counters
                .keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_owned());
            if !first {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = format!("fake-{}-{n}", self.run);
        info!(kind = self.settings.kind.as_str(), to = %mask_phone(to), key = %key, id = %id, "fake provider accepted a message");
        id
    }

    /// Whether the fake calls back, and how the message ends if it does.
    pub(crate) fn fate(&self) -> Option<(Fate, &ReportSettings)> {
        let reports = self.settings.reports.as_ref()?;
        let fate = if rand::random::<f64>() < reports.fail_rate {
            Fate::Failed
        } else {
            Fate::Delivered
        };
        Some((fate, reports))
    }

    /// Sends a message's reports in the background after the set delay:
    /// `progress` (intermediate reports) then `last` (the final ones),
    /// each until answered 2xx (five tries).
    pub(crate) fn report(&self, progress: Vec<Callback>, last: Vec<Callback>) {
        let Some(settings) = self.settings.reports.clone() else {
            return;
        };
        let mut calls = progress;
        if settings.out_of_order {
            calls.splice(0..0, last.iter().cloned());
        } else {
            calls.extend(last.iter().cloned());
        }
        if settings.duplicates {
            calls.extend(last);
        }
        let (client, counters) = (self.client.clone(), self.counters.clone());
        tokio::spawn(async move {
            tokio::time::sleep(settings.delay).await;
            for call in calls {
                let sent = deliver(&client, &call).await;
                let counter = if sent {
                    &counters.reports_sent
                } else {
                    &counters.reports_lost
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// The credential `name` the fake was told to expect, if any.
    pub(crate) fn credential(&self, name: &str) -> Option<&str> {
        self.settings.credentials.get(name).map(String::as_str)
    }
}

/// Serves the fake until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    settings: FakeSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].into();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(std::io::Error::other)?;
    let state = FakeState {
        settings,
        run,
        counters: Arc::default(),
        client,
    };
    let dialect = match state.settings.kind {
        ProviderKind::Generic => generic::routes(),
        ProviderKind::AfricasTalking => africastalking::routes(),
        ProviderKind::Vonage => vonage::routes(),
        ProviderKind::Infobip => infobip::routes(),
        ProviderKind::Twilio => twilio::routes(),
    };
    // HTTP/1.1 and HTTP/2 both: axum::serve runs hyper-util's auto
    // builder, which with axum's `http2` feature reads the HTTP/2 preface
    // and otherwise speaks HTTP/1.1, so cleartext prior knowledge works
    // (https://docs.rs/axum/0.8/axum/serve/fn.serve.html: "It supports
    // both HTTP/1 as well as HTTP/2").
    let router = dialect
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_version,
        ))
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn stats(State(state): State<FakeState>) -> Json<serde_json::Value> {
    let c = &state.counters;
    let distinct = c.keys.lock().unwrap_or_else(|e| e.into_inner()).len();
    Json(json!({
        "accepted": c.accepted.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "rejected": c.rejected.load(Ordering::Relaxed),
        "throttled": c.throttled.load(Ordering::Relaxed),
        "duplicates": c.duplicates.load(Ordering::Relaxed),
        "distinctKeys": distinct,
        "reportsSent": c.reports_sent.load(Ordering::Relaxed),
        "reportsLost": c.reports_lost.load(Ordering::Relaxed),
        "http2": c.http2.load(Ordering::Relaxed),
    }))
}

/// Counts the dialect's calls that came over HTTP/2.
async fn count_version(
    State(state): State<FakeState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.version() == axum::http::Version::HTTP_2 {
        state.counters.http2.fetch_add(1, Ordering::Relaxed);
    }
    next.run(request).await
}

/// Makes one callback until it is answered 2xx, five tries a second apart.
async fn deliver(client: &reqwest::Client, call: &Callback) -> bool {
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut request = client
            .request(call.method.clone(), &call.url)
            .body(call.body.clone());
        for (name, value) in &call.headers {
            request = request.header(*name, value);
        }
        match request.send().await {
            Ok(answer) if answer.status().is_success() => return true,
            Ok(answer) => {
                tracing::warn!(status = %answer.status(), "fake provider: callback refused")
            }
            // Without the URL: it may carry the service's path token.
            Err(e) => tracing::warn!(error = %e.without_url(), "fake provider: callback failed"),
        }
    }
    false
}

/// Standard base64 with padding (RFC 4648), as HTTP Basic carries it.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// `Authorization: Basic base64(user:password)`, decoded.
pub(crate) fn basic_credentials(headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

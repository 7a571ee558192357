//! A fake of the generic provider, for docker-compose, demos, benchmarks
//! and end-to-end tests: `POST /messages` answers `{"id": "fake-<run>-N"}`
//! after a set latency, or, for set shares of calls, 503 (a transient
//! failure), 400 (a rejection) or 429 with `Retry-After: 1` (throttling);
//! `GET /stats` counts each, and how many keys it saw more than once.
//! `<run>` is random per fake, so ids stay unique across restarts, as a
//! real provider's do (delivery reports are matched on them).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::domain::mask_phone;

/// How the fake behaves. The three shares are of all calls, drawn once per
/// call, so together they are at most 1.
#[derive(Debug, Clone, Default)]
pub struct FakeSettings {
    /// Added to every answer.
    pub latency: Duration,
    /// Share of calls (0 to 1) answered 503.
    pub fail_rate: f64,
    /// Share of calls (0 to 1) answered 400.
    pub reject_rate: f64,
    /// Share of calls (0 to 1) answered 429 with `Retry-After: 1`.
    pub throttle_rate: f64,
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
        anyhow::ensure!(
            self.fail_rate + self.reject_rate + self.throttle_rate <= 1.0,
            "--fail-rate, --reject-rate and --throttle-rate add up to more than 1"
        );
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    throttled: AtomicU64,
    duplicates: AtomicU64,
    keys: Mutex<HashSet<String>>,
}

#[derive(Clone)]
struct FakeState {
    settings: FakeSettings,
    /// Random per fake: the `<run>` of its ids.
    run: Arc<str>,
    counters: Arc<Counters>,
}

#[derive(Deserialize)]
struct Message {
    to: String,
    text: String,
    #[allow(dead_code)]
    from: Option<String>,
}

/// Serves the fake until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    settings: FakeSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].into();
    let state = FakeState {
        settings,
        run,
        counters: Arc::default(),
    };
    let router = Router::new()
        .route("/messages", post(accept))
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn accept(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(message) = serde_json::from_slice::<Message>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "need to and text"})),
        )
            .into_response();
    };
    if message.text.is_empty() || !message.to.starts_with('+') {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "bad to or text"})),
        )
            .into_response();
    }
    if !state.settings.latency.is_zero() {
        tokio::time::sleep(state.settings.latency).await;
    }
    let counters = &state.counters;
    if let Some(answer) = simulated_answer(&state.settings, counters) {
        return answer;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let n = counters.accepted.fetch_add(1, Ordering::Relaxed) + 1;
    if !key.is_empty() {
        let first = counters
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        if !first {
            counters.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    let id = format!("fake-{}-{n}", state.run);
    info!(to = %mask_phone(&message.to), key = %key, id = %id, "fake provider accepted a message");
    (StatusCode::OK, Json(json!({"id": id}))).into_response()
}

/// The failure this call draws, if any: 503, 400 or 429, by their shares.
fn simulated_answer(settings: &FakeSettings, counters: &Counters) -> Option<Response> {
    let s = settings;
    if s.fail_rate + s.reject_rate + s.throttle_rate <= 0.0 {
        return None;
    }
    let draw = rand::random::<f64>();
    if draw < s.fail_rate {
        counters.failed.fetch_add(1, Ordering::Relaxed);
        let body = Json(json!({"error": "simulated failure"}));
        Some((StatusCode::SERVICE_UNAVAILABLE, body).into_response())
    } else if draw < s.fail_rate + s.reject_rate {
        counters.rejected.fetch_add(1, Ordering::Relaxed);
        let body = Json(json!({"error": "simulated rejection"}));
        Some((StatusCode::BAD_REQUEST, body).into_response())
    } else if draw < s.fail_rate + s.reject_rate + s.throttle_rate {
        counters.throttled.fetch_add(1, Ordering::Relaxed);
        let body = Json(json!({"error": "simulated throttling"}));
        let retry_after = [(axum::http::header::RETRY_AFTER, "1")];
        Some((StatusCode::TOO_MANY_REQUESTS, retry_after, body).into_response())
    } else {
        None
    }
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
    }))
}

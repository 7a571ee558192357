//! A fake of the generic provider, for docker-compose, demos, benchmarks
//! and end-to-end tests: `POST /messages` answers `{"id": "fake-N"}` after a
//! set latency, or 503 for a set share of calls; `GET /stats` counts what it
//! accepted and how many keys it saw more than once.

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

/// How the fake behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeSettings {
    /// Added to every answer.
    pub latency: Duration,
    /// Share of calls (0 to 1) answered 503.
    pub fail_rate: f64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    duplicates: AtomicU64,
    keys: Mutex<HashSet<String>>,
}

#[derive(Clone)]
struct FakeState {
    settings: FakeSettings,
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
    let state = FakeState {
        settings,
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
    if state.settings.fail_rate > 0.0 && rand::random::<f64>() < state.settings.fail_rate {
        counters.failed.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "simulated failure"})),
        )
            .into_response();
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
    info!(to = %mask_phone(&message.to), key = %key, id = n, "fake provider accepted a message");
    (StatusCode::OK, Json(json!({"id": format!("fake-{n}")}))).into_response()
}

async fn stats(State(state): State<FakeState>) -> Json<serde_json::Value> {
    let c = &state.counters;
    let distinct = c.keys.lock().unwrap_or_else(|e| e.into_inner()).len();
    Json(json!({
        "accepted": c.accepted.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "duplicates": c.duplicates.load(Ordering::Relaxed),
        "distinctKeys": distinct,
    }))
}

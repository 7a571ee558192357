//! The service's HTTP API (axum): health, readiness, metrics, message
//! status, command submission and delivery-report callbacks. The message
//! routes need an API key ([`auth`]); health, readiness and metrics do not;
//! callbacks authenticate the provider's way ([`callbacks`]).

pub mod auth;
mod callbacks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use secrecy::SecretString;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::auth::ApiAccess;
use crate::domain::{CommandError, SendSms};
use crate::ports::{
    Admission, CacheService, EventBus, EventMeta, MessageStatus, QueueClient, SmsService,
};
use crate::processing::Consuming;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub cache: Arc<dyn CacheService>,
    /// `host:port` of Redis, for readiness reasons.
    pub redis_address: String,
    pub queue: Arc<dyn QueueClient>,
    pub events: Arc<dyn EventBus>,
    pub consuming: Arc<Consuming>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The generic instances whose ids generic delivery reports name, in
    /// order, each with its callback secret (a report to an instance with
    /// a secret must be signed with it). Empty: the route answers 404
    /// (other kinds report through their own callbacks).
    pub generic_reporters: Vec<(String, Option<SecretString>)>,
    /// Every provider instance by name, for `/v1/callbacks/{instance}`.
    pub providers: Arc<std::collections::HashMap<String, Arc<dyn SmsService>>>,
    /// `http.public_url`: the base of the URL providers sign.
    pub public_url: String,
    /// How long a report for an id not yet recorded is kept.
    pub park_ttl: Duration,
    pub max_body_bytes: usize,
    /// Who may use the message routes (`http.api_keys`, `http.bind`).
    pub api_access: ApiAccess,
}

pub fn router(state: HttpState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/v1/delivery-reports", post(callbacks::delivery_report))
        .route(
            "/v1/callbacks/{instance}",
            get(callbacks::callback).post(callbacks::callback),
        )
        .route(
            "/v1/callbacks/{instance}/{token}",
            get(callbacks::callback_with_token).post(callbacks::callback_with_token),
        )
        .merge(message_routes(state.clone()))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The routes that act on messages: each needs an API key. A new route for
/// producers belongs here.
fn message_routes(state: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/v1/messages", post(submit))
        .route("/v1/messages/{key}", get(status))
        .route_layer(middleware::from_fn_with_state(state, auth::require_api_key))
}

/// Serves the API until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the API's address.
pub async fn bind(address: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

fn problem(status: StatusCode, error: &str, detail: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": error, "detail": detail.into()})),
    )
        .into_response()
}

/// Why the service is not ready, if it is not: not connected to RabbitMQ
/// or not consuming, or Redis not answering a write within 2 s. Sets the
/// `sms_ready` gauge to what it finds, so that `/readyz` and every scrape
/// of `/metrics` both report it.
async fn readiness(state: &HttpState) -> Result<(), String> {
    let mut reasons = Vec::new();
    if !state.queue.is_connected() {
        reasons.push("not connected to RabbitMQ".to_owned());
    } else if !state.consuming.get() {
        reasons.push("not consuming commands".to_owned());
    }
    match tokio::time::timeout(Duration::from_secs(2), state.cache.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => reasons.push(format!("Redis at {}: {e}", state.redis_address)),
        Err(_) => reasons.push(format!(
            "Redis at {}: no answer within 2 s",
            state.redis_address
        )),
    }
    let ready = reasons.is_empty();
    metrics::gauge!("sms_ready").set(if ready { 1.0 } else { 0.0 });
    if ready {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

async fn ready(State(state): State<HttpState>) -> Response {
    match readiness(&state).await {
        Ok(()) => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

/// The Prometheus page, with `sms_ready` checked first: a scrape sees the
/// readiness of the moment, whether or not anything polls `/readyz`.
async fn render_metrics(State(state): State<HttpState>) -> Response {
    let _ = readiness(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn status(State(state): State<HttpState>, Path(key): Path<String>) -> Response {
    if key.len() > crate::domain::MAX_KEY_LEN {
        return problem(
            StatusCode::NOT_FOUND,
            "unknown_key",
            "no message with this key",
        );
    }
    match state.cache.status(&key).await {
        Ok(Some(s)) => Json(status_document(&key, &s)).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "unknown_key",
            "no message with this key",
        ),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        ),
    }
}

/// Validates a SendSms body and publishes it, as sent, to the command queue.
async fn submit(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let command = match SendSms::from_json(&body) {
        Ok(command) => command,
        Err(CommandError::Malformed(detail)) => {
            return problem(StatusCode::BAD_REQUEST, "invalid_command", detail)
        }
        Err(CommandError::Invalid { reason, detail, .. }) => {
            return problem(StatusCode::BAD_REQUEST, reason.as_str(), detail)
        }
    };
    let text_header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect::<String>())
    };
    let meta = EventMeta {
        correlation_id: text_header("x-correlation-id"),
        traceparent: text_header("traceparent"),
    };
    let key = &command.idempotency_key;
    // Known from this moment: the status route answers for it at once, and
    // a reused key with another payload is refused before it is queued.
    let admission = match state.cache.admit(key, &command.fingerprint()).await {
        Ok(admission) => admission,
        Err(e) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            )
        }
    };
    if admission == Admission::Conflict {
        let mut answer = match state.cache.status(key.as_str()).await {
            Ok(Some(known)) => status_document(key.as_str(), &known),
            _ => json!({"idempotencyKey": key.as_str()}),
        };
        answer["error"] = json!("idempotency_key_reused");
        answer["detail"] = json!("this key was used for another message");
        return (StatusCode::CONFLICT, Json(answer)).into_response();
    }
    match state.queue.publish_command(&body, &meta).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({"idempotencyKey": key.as_str()})),
        )
            .into_response(),
        Err(e) => {
            if admission == Admission::New {
                // Not queued: the key is not taken. If this fails too the
                // status says `processing` until the client retries.
                let _ = state.cache.withdraw(key).await;
            }
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                e.to_string(),
            )
        }
    }
}

/// The status document of a key, as the status route answers it.
fn status_document(key: &str, s: &MessageStatus) -> serde_json::Value {
    let mut doc = json!({
        "idempotencyKey": key,
        "status": s.status,
        "providerMessageId": s.provider_message_id,
        "attempts": s.attempts,
        "updatedAt": s.updated_at,
        "provider": s.provider,
        "deliveryStatus": s.delivery_status.map(|d| d.as_str()),
        "history": s.history,
    });
    if let Some(reason) = &s.reason {
        doc["reason"] = json!(reason);
        doc["detail"] = json!(s.detail);
    }
    doc
}

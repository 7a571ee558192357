//! The service's HTTP API (axum): health, readiness, metrics, message
//! status, command submission and delivery-report callbacks. The message
//! routes need an API key ([`auth`]); health, readiness, metrics and the
//! API's own description do not; callbacks authenticate the provider's
//! way ([`callbacks`]).
//!
//! docs/openapi.json describes every route and answer, and is served as it
//! is at `GET /openapi.json`; tests/api/schemas.rs checks it against this
//! router and against real answers.

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
use tracing::Instrument;

pub use self::auth::ApiAccess;
use crate::front_door::{event_meta, request_span, status_document, FrontDoor, Refusal};
use crate::ports::{CacheService, EventBus, SmsService};

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// Submission, status and readiness, shared with the gRPC door.
    pub door: FrontDoor,
    /// The store, for delivery reports.
    pub cache: Arc<dyn CacheService>,
    pub events: Arc<dyn EventBus>,
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

/// The OpenAPI 3.1 document of this API, docs/openapi.json, compiled in.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

pub fn router(state: HttpState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/v1/delivery-reports", post(callbacks::delivery_report))
        .route(
            "/v1/callbacks/{instance}",
            get(callbacks::callback).post(callbacks::callback),
        )
        .route(
            "/v1/callbacks/{instance}/{token}",
            get(callbacks::callback).post(callbacks::callback),
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
        .route("/v1/messages/{key}", get(status).delete(cancel))
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

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn ready(State(state): State<HttpState>) -> Response {
    match state.door.readiness().await {
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
    let _ = state.door.readiness().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn status(State(state): State<HttpState>, Path(key): Path<String>) -> Response {
    match state.door.status(&key).await {
        Ok(s) => Json(status_document(&key, &s)).into_response(),
        Err(refusal) => refuse(refusal),
    }
}

/// Validates a SendSms body and publishes it, as sent, to the command queue
/// ([`FrontDoor::submit`]), in the request's span ([`request_span`]).
async fn submit(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
    let meta = event_meta(header("x-correlation-id"), traceparent, tracestate);
    let span = request_span(
        "POST /v1/messages",
        meta.traceparent.as_deref(),
        meta.tracestate.as_deref(),
    );
    let submitted = state
        .door
        .submit(&body, &meta)
        .instrument(span.clone())
        .await;
    let response = match submitted {
        Ok(key) => (
            StatusCode::ACCEPTED,
            Json(json!({"idempotencyKey": key.as_str()})),
        )
            .into_response(),
        Err(refusal) => refuse(refusal),
    };
    answered(&span, &response);
    response
}

/// Cancels a message not yet sent ([`FrontDoor::cancel`]): 200 with its
/// status document (`failed`, reason `cancelled`), 202 when the service
/// has not seen the key yet (its command is cancelled when it arrives),
/// 409 with the status document when it is too late.
async fn cancel(
    State(state): State<HttpState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
    let meta = event_meta(header("x-correlation-id"), traceparent, tracestate);
    let span = request_span("DELETE /v1/messages/{key}", traceparent, tracestate);
    let cancelled = state
        .door
        .cancel(&key, &meta)
        .instrument(span.clone())
        .await;
    let response = match cancelled {
        Ok(c) => {
            let code = if c.known {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (code, Json(status_document(&key, &c.status))).into_response()
        }
        Err(refusal) => refuse(refusal),
    };
    answered(&span, &response);
    response
}

/// Records a request's answer on its span.
fn answered(span: &tracing::Span, response: &Response) {
    let status = i64::from(response.status().as_u16());
    span.record("http.response.status_code", status);
}

/// A front door's refusal as HTTP: the status code and the JSON error; a
/// reused key, or one too late to cancel, also shows the key's status
/// document.
fn refuse(refusal: Refusal) -> Response {
    let status = match &refusal {
        Refusal::Invalid { .. } => StatusCode::BAD_REQUEST,
        Refusal::KeyReused { .. } | Refusal::NotCancellable { .. } => StatusCode::CONFLICT,
        Refusal::UnknownKey => StatusCode::NOT_FOUND,
        Refusal::StoreUnavailable(_) | Refusal::BrokerUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    if let Refusal::KeyReused { key, known } | Refusal::NotCancellable { key, known } = &refusal {
        let mut answer = match known {
            Some(known) => status_document(key.as_str(), known),
            None => json!({"idempotencyKey": key.as_str()}),
        };
        answer["error"] = json!(refusal.error());
        answer["detail"] = json!(refusal.detail());
        return (status, Json(answer)).into_response();
    }
    problem(status, refusal.error(), refusal.detail())
}

//! Delivery-report callbacks. Each provider's adapter authenticates and
//! reads its own (`SmsService::read_callback`, in its folder); here they
//! are routed, recorded and published:
//!
//! - `POST|GET /v1/callbacks/{instance}` and
//!   `/v1/callbacks/{instance}/{token}` (the path token of providers that
//!   sign nothing);
//! - part 1's `POST /v1/delivery-reports` for generic instances, unsigned
//!   where the instance has no `callback_secret`.
//!
//! A callback is answered 2xx only once every report it carries is
//! recorded and the SmsDeliveryReport each causes is confirmed by the
//! broker: otherwise 503, and the provider sends it again (a repeat then
//! publishes what is still unconfirmed, and nothing else).

use std::collections::HashMap;
use std::time::SystemTime;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tracing::{debug, info, warn, Instrument};

use super::{problem, HttpState};
use crate::adapters::providers::generic;
use crate::domain::rfc3339;
use crate::front_door::request_span;
use crate::ports::{CallbackError, CallbackRequest, ProviderReport, QueueError, ReportOutcome};

/// `/v1/callbacks/{instance}` and `/v1/callbacks/{instance}/{token}`.
pub async fn callback(
    State(state): State<HttpState>,
    Path(params): Path<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Incoming {
        method,
        uri,
        query,
        headers,
        body,
    };
    let instance = params.get("instance").map_or("", String::as_str);
    let token = params.get("token").map(String::as_str);
    // The route's template, never the path: it may hold the secret token.
    let route = match token {
        Some(_) => "/v1/callbacks/{instance}/{token}",
        None => "/v1/callbacks/{instance}",
    };
    let known = state.providers.contains_key(instance).then_some(instance);
    let span = callback_span(route, known, &request.headers);
    let response = provider_callback(&state, instance, token, &request)
        .instrument(span.clone())
        .await;
    super::answered(&span, &response);
    response
}

/// A callback's span: a trace of its own (or the caller's, if it sent a
/// `traceparent`), naming the instance when it is a configured one (the
/// path is not trusted); the key of each message it reports on is
/// recorded on it, and a report that moves a message to a final status
/// links it to the send's trace.
fn callback_span(
    route: &'static str,
    instance: Option<&str>,
    headers: &HeaderMap,
) -> tracing::Span {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let span = request_span(route, header("traceparent"), header("tracestate"));
    if let Some(instance) = instance {
        span.record("provider", instance);
    }
    span
}

/// A callback as axum gave it.
struct Incoming {
    method: Method,
    uri: Uri,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Incoming {
    /// The URL the provider called: under `http.public_url` when set (a
    /// proxy in front changes scheme and host), else as received.
    fn url(&self, public_url: &str) -> String {
        let path_and_query = self.uri.path_and_query().map_or("/", |p| p.as_str());
        if !public_url.is_empty() {
            return format!("{}{path_and_query}", public_url.trim_end_matches('/'));
        }
        let host = self
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        format!("http://{host}{path_and_query}")
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect()
    }
}

async fn provider_callback(
    state: &HttpState,
    instance: &str,
    token: Option<&str>,
    incoming: &Incoming,
) -> Response {
    let Some(provider) = state.providers.get(instance) else {
        return problem(
            StatusCode::NOT_FOUND,
            "unknown_instance",
            "no provider instance has this name",
        );
    };
    if incoming.method != Method::GET && incoming.method != Method::POST {
        return problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "callbacks are GET or POST",
        );
    }
    let (url, headers) = (incoming.url(&state.public_url), incoming.headers());
    let request = CallbackRequest {
        method: incoming.method.as_str(),
        url: &url,
        token,
        query: incoming.query.as_deref().unwrap_or_default(),
        headers: &headers,
        body: &incoming.body,
        now: SystemTime::now(),
    };
    let reports = match provider.read_callback(&request) {
        Ok(reports) => reports,
        Err(e) => return refused(instance, &e),
    };
    record_all(state, instance, &reports, Some(state.park_ttl)).await
}

/// The HTTP answer to a refused callback; nothing was changed.
fn refused(instance: &str, error: &CallbackError) -> Response {
    let status = match error {
        CallbackError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        CallbackError::WrongToken => StatusCode::FORBIDDEN,
        CallbackError::Malformed(_) => StatusCode::BAD_REQUEST,
        CallbackError::NotHere(_) => StatusCode::NOT_FOUND,
    };
    let code = error.code();
    metrics::counter!("sms_callbacks_refused_total", "provider" => instance.to_owned(), "reason" => code)
        .increment(1);
    warn!(provider = instance, reason = %error, "delivery-report callback refused");
    problem(status, code, error.to_string())
}

/// Records each report and publishes what it changes; 204 once all are
/// through, 503 at the first the store or the broker did not take.
async fn record_all(
    state: &HttpState,
    instance: &str,
    reports: &[ProviderReport],
    park_ttl: Option<std::time::Duration>,
) -> Response {
    let reported_at = rfc3339(SystemTime::now());
    for report in reports {
        let outcome = match state
            .cache
            .record_report(instance, report, &reported_at, park_ttl)
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
        };
        let counted = |status: &'static str| {
            metrics::counter!("sms_delivery_reports_total", "provider" => instance.to_owned(), "status" => status)
                .increment(1);
        };
        match outcome {
            ReportOutcome::Publish {
                report: event,
                send_trace,
            } => {
                let span = tracing::Span::current();
                span.record("key", event.idempotency_key.as_str());
                if let Some(send) = send_trace {
                    crate::telemetry::link_to(&span, &send);
                }
                let span = tracing::info_span!(
                    "publish",
                    otel.kind = "producer",
                    event = "SmsDeliveryReport"
                );
                match state.events.publish_delivery(&event).instrument(span).await {
                    Ok(()) => {}
                    // Nobody subscribes to delivery reports: recorded, and
                    // a 5xx would only make the provider retry in vain.
                    Err(QueueError::Unroutable(exchange)) => warn!(
                        %exchange,
                        "no queue is bound to the delivery exchange: SmsDeliveryReport dropped"
                    ),
                    Err(e) => {
                        return problem(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "broker_unavailable",
                            e.to_string(),
                        )
                    }
                }
                if let Err(e) = state
                    .cache
                    .mark_report_published(&event.idempotency_key, event.status)
                    .await
                {
                    // Published; unmarked, a repeat publishes it again.
                    return problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        e.to_string(),
                    );
                }
                counted(event.status.as_str());
                info!(key = %event.idempotency_key, provider = instance,
                    status = event.status.as_str(), "delivery report");
            }
            ReportOutcome::Unchanged => {
                debug!(provider = instance, provider_message_id = %report.provider_message_id,
                    status = report.status.as_str(), "delivery report changes nothing");
            }
            ReportOutcome::Parked => {
                counted("unmatched");
                info!(provider = instance, provider_message_id = %report.provider_message_id,
                    "delivery report for an id not recorded yet: kept until its send is");
            }
            // A message whose record is gone: the rest of a batch goes on.
            ReportOutcome::Unmatched if park_ttl.is_some() => counted("unmatched"),
            ReportOutcome::Unmatched => {
                // Part 1's route tries each generic instance: it counts
                // the report once, when none knows it.
                return problem(
                    StatusCode::NOT_FOUND,
                    "unknown_id",
                    "no message with this provider id",
                );
            }
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Part 1's `POST /v1/delivery-reports`: a generic report, looked up under
/// each generic instance whose secret (if it has one) signed it; 404 for
/// an id none of them sent.
pub async fn delivery_report(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let span = request_span(
        "POST /v1/delivery-reports",
        header("traceparent"),
        header("tracestate"),
    );
    let response = generic_report(state, headers, body)
        .instrument(span.clone())
        .await;
    super::answered(&span, &response);
    response
}

async fn generic_report(state: HttpState, headers: HeaderMap, body: Bytes) -> Response {
    if state.generic_reporters.is_empty() {
        return problem(
            StatusCode::NOT_FOUND,
            "no_generic_provider",
            "no generic provider instance is configured",
        );
    }
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let request = CallbackRequest {
        method: "POST",
        url: "/v1/delivery-reports",
        token: None,
        query: "",
        headers: &headers,
        body: &body,
        now: SystemTime::now(),
    };
    // 401 only when no instance's secret verified the report; 404 when
    // one did and none knows the id.
    let (mut refused_by, mut verified) = (None, None);
    for (instance, secret) in &state.generic_reporters {
        let reports = match generic::callback::read(secret.as_ref(), &request) {
            Ok(reports) => reports,
            Err(e @ CallbackError::Malformed(_)) => return refused(instance, &e),
            Err(e) => {
                refused_by.get_or_insert((instance, e));
                continue;
            }
        };
        let answer = record_all(&state, instance, &reports, None).await;
        if answer.status() != StatusCode::NOT_FOUND {
            return answer;
        }
        verified.get_or_insert(instance);
    }
    match (verified, refused_by) {
        (None, Some((instance, e))) => refused(instance, &e),
        (verified, _) => {
            let instance = verified.unwrap_or(&state.generic_reporters[0].0);
            metrics::counter!("sms_delivery_reports_total", "provider" => instance.clone(), "status" => "unmatched")
                .increment(1);
            problem(
                StatusCode::NOT_FOUND,
                "unknown_id",
                "no message with this provider id",
            )
        }
    }
}

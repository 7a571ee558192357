//! The gRPC front door (tonic): `sms.v1.SmsService` from
//! `proto/sms/v1/sms.proto`, beside standard health checking
//! (`grpc.health.v1.Health`) and reflection (v1), on `grpc.bind`.
//!
//! It is a second wire for what the HTTP API does, not a second
//! implementation: `Send` and `GetStatus` call the same
//! [`FrontDoor`] as `POST /v1/messages` and `GET /v1/messages/{key}`
//! (one validation, one admission, one status read), and the API keys are
//! checked by the same [`ApiAccess`], from the `authorization` metadata.
//! `WatchStatus` polls the store for one key and sends each change,
//! ending after a final status; watches are bounded in number
//! ([`WatchLimits::max_watches`]) and in time ([`WatchLimits::max_duration`]),
//! and all end at shutdown, so that a client left watching never holds
//! the service up. Health and reflection need no key, as `/readyz` does
//! not; health says `SERVING` while the readiness of `/readyz` holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::{debug, Instrument};

use crate::adapters::http::ApiAccess;
use crate::front_door::{event_meta, is_final, request_span, FrontDoor, Refusal};
use crate::ports::MessageStatus;

use self::proto::sms_service_server::{SmsService, SmsServiceServer};

/// The messages, server and client generated from `proto/sms/v1/sms.proto`
/// (build.rs).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("sms.v1");
}

/// The encoded descriptor set of `sms.proto`, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sms_v1_descriptor.bin"));

/// The service's full name, as health checking and reflection list it.
pub const SERVICE_NAME: &str = "sms.v1.SmsService";

/// How often health checking reads the service's readiness.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// How long the store may fail a watch's polls before the watch ends.
const WATCH_STORE_PATIENCE: Duration = Duration::from_secs(5);

/// The bounds on `WatchStatus`.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// How often a watch reads the key's status.
    pub poll: Duration,
    /// How long one watch may stay open (then `DEADLINE_EXCEEDED`).
    pub max_duration: Duration,
    /// Watches open at once in this instance (beyond: `RESOURCE_EXHAUSTED`).
    pub max_watches: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(250),
            max_duration: Duration::from_secs(3600),
            max_watches: 1024,
        }
    }
}

/// What the gRPC door needs.
#[derive(Clone)]
pub struct GrpcState {
    pub door: FrontDoor,
    /// Who may call `SmsService` (`http.api_keys`, `grpc.bind`).
    pub api_access: ApiAccess,
    /// Largest request accepted, as `http.max_body_bytes` for HTTP.
    pub max_message_bytes: usize,
    pub watch_limits: WatchLimits,
}

/// Binds the door's address.
pub async fn bind(address: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `SmsService`, health and reflection until `shutdown` fires;
/// open watches end then too.
pub async fn serve(
    listener: TcpListener,
    state: GrpcState,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    tokio::spawn(report_health(state.door.clone(), health, shutdown.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor sets built by build.rs and tonic-health are valid");
    let max_message_bytes = state.max_message_bytes;
    let access = state.api_access.clone();
    let door = GrpcDoor::new(state, shutdown.clone());
    let sms = SmsServiceServer::new(door).max_decoding_message_size(max_message_bytes);
    // Bounded as the HTTP door is (hyper's defaults there): tonic's own
    // defaults leave streams per connection unlimited.
    tonic::transport::Server::builder()
        .max_concurrent_streams(200)
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            sms,
            authenticate(access),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}

/// The API-key check of the message routes, on the `authorization`
/// metadata: `UNAUTHENTICATED` with the reason HTTP's 401 gives.
fn authenticate(
    access: ApiAccess,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match access.check(authorization) {
            Ok(()) => Ok(request),
            Err(denial) => {
                let detail = denial.detail("grpc.bind");
                debug!(detail, "gRPC call refused: UNAUTHENTICATED");
                Err(Status::unauthenticated(detail))
            }
        }
    }
}

/// Sets health to `SERVING` while the service is ready, `NOT_SERVING`
/// otherwise and from shutdown on.
async fn report_health(
    door: FrontDoor,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let status = match door.readiness().await {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        for name in ["", SERVICE_NAME] {
            health.set_service_status(name, status).await;
        }
    }
    for name in ["", SERVICE_NAME] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

/// The `SmsService` implementation.
struct GrpcDoor {
    door: FrontDoor,
    limits: WatchLimits,
    watches: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl GrpcDoor {
    fn new(state: GrpcState, shutdown: CancellationToken) -> Self {
        Self {
            door: state.door,
            limits: state.watch_limits,
            watches: Arc::new(Semaphore::new(state.watch_limits.max_watches)),
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl SmsService for GrpcDoor {
    async fn send(
        &self,
        request: Request<proto::SendRequest>,
    ) -> Result<Response<proto::SendResponse>, Status> {
        let metadata = request.metadata();
        let (traceparent, tracestate) =
            (text(metadata, "traceparent"), text(metadata, "tracestate"));
        let meta = event_meta(text(metadata, "x-correlation-id"), traceparent, tracestate);
        let span = request_span(
            "sms.v1.SmsService/Send",
            meta.traceparent.as_deref(),
            meta.tracestate.as_deref(),
        );
        let body = command_body(request.get_ref());
        let answer = self
            .door
            .submit(&body, &meta)
            .instrument(span.clone())
            .await
            .map_err(refuse);
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        span.record("rpc.grpc.status_code", code as i64);
        let key = answer?;
        Ok(Response::new(proto::SendResponse {
            idempotency_key: key.as_str().to_owned(),
        }))
    }

    async fn cancel(
        &self,
        request: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::MessageStatus>, Status> {
        let metadata = request.metadata();
        let (traceparent, tracestate) =
            (text(metadata, "traceparent"), text(metadata, "tracestate"));
        let meta = event_meta(text(metadata, "x-correlation-id"), traceparent, tracestate);
        let span = request_span("sms.v1.SmsService/Cancel", traceparent, tracestate);
        let key = request.get_ref().idempotency_key.clone();
        let answer = self
            .door
            .cancel(&key, &meta)
            .instrument(span.clone())
            .await
            .map_err(refuse);
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        span.record("rpc.grpc.status_code", code as i64);
        Ok(Response::new(message(&key, answer?.status)))
    }

    async fn get_status(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::MessageStatus>, Status> {
        let key = request.into_inner().idempotency_key;
        let status = self.door.status(&key).await.map_err(refuse)?;
        Ok(Response::new(message(&key, status)))
    }

    type WatchStatusStream = ReceiverStream<Result<proto::MessageStatus, Status>>;

    async fn watch_status(
        &self,
        request: Request<proto::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let key = request.into_inner().idempotency_key;
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many watches open (at most {}); try again later",
                self.limits.max_watches
            ))
        })?;
        let first = self.door.status(&key).await.map_err(refuse)?;
        let (tx, rx) = mpsc::channel(4);
        let watch = Watch {
            _permit: permit,
            door: self.door.clone(),
            key,
            tx,
            limits: self.limits,
            deadline: Instant::now() + self.limits.max_duration,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watch.run(first));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One open `WatchStatus`: holds its permit until it ends.
struct Watch {
    _permit: OwnedSemaphorePermit,
    door: FrontDoor,
    key: String,
    tx: mpsc::Sender<Result<proto::MessageStatus, Status>>,
    limits: WatchLimits,
    deadline: Instant,
    shutdown: CancellationToken,
}

impl Watch {
    async fn run(self, first: MessageStatus) {
        let mut last = first;
        if !self.push(Ok(message(&self.key, last.clone()))).await || is_final(&last.status) {
            return;
        }
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = self.shutdown.cancelled() => return self.end(shutting_down()),
                _ = tokio::time::sleep_until(self.deadline) => {
                    return self.end(time_is_up(self.limits.max_duration))
                }
                _ = tokio::time::sleep(self.limits.poll) => {}
            }
            match self.door.status(&self.key).await {
                Ok(now) => {
                    failing_since = None;
                    if now == last {
                        continue;
                    }
                    let done = is_final(&now.status);
                    if !self.push(Ok(message(&self.key, now.clone()))).await || done {
                        return;
                    }
                    last = now;
                }
                // Expired meanwhile: nothing more will come.
                Err(refusal @ Refusal::UnknownKey) => return self.end(refuse(refusal)),
                Err(refusal) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= WATCH_STORE_PATIENCE {
                        return self.end(refuse(refusal));
                    }
                }
            }
        }
    }

    /// Sends one item; false when the client is gone, or when the watch
    /// must end (shutdown, time limit) while the client is not reading.
    /// An item is sent only when there is room for it and for the status
    /// that may end the watch after it, so that [`Watch::end`] always finds
    /// a slot: a slow reader's stream ends with its status, never as if
    /// the watch had reached a final status.
    async fn push(&self, item: Result<proto::MessageStatus, Status>) -> bool {
        tokio::select! {
            biased;
            permits = self.tx.reserve_many(2) => match permits {
                Ok(mut permits) => {
                    if let Some(permit) = permits.next() {
                        permit.send(item);
                    }
                    true
                }
                Err(_) => false,
            },
            _ = self.shutdown.cancelled() => {
                self.end(shutting_down());
                false
            }
            _ = tokio::time::sleep_until(self.deadline) => {
                self.end(time_is_up(self.limits.max_duration));
                false
            }
        }
    }

    /// Ends the stream with `status` (there is always room for it: see
    /// [`Watch::push`]), unless the client is gone.
    fn end(&self, status: Status) {
        let _ = self.tx.try_send(Err(status));
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the service is shutting down; watch again")
}

fn time_is_up(limit: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "a watch stays open at most {} s; watch again",
        limit.as_secs()
    ))
}

/// A front door's refusal as a gRPC status: the code, and the same
/// `error` and `detail` as HTTP's JSON, as `<error>: <detail>`.
fn refuse(refusal: Refusal) -> Status {
    let text = format!("{}: {}", refusal.error(), refusal.detail());
    match refusal {
        Refusal::Invalid { .. } => Status::invalid_argument(text),
        Refusal::KeyReused { .. } => Status::already_exists(text),
        Refusal::NotCancellable { .. } => Status::failed_precondition(text),
        Refusal::UnknownKey => Status::not_found(text),
        Refusal::StoreUnavailable(_) | Refusal::BrokerUnavailable(_) => Status::unavailable(text),
    }
}

/// A text metadata value.
fn text<'a>(metadata: &'a MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|v| v.to_str().ok())
}

/// The SendSms JSON body of a request, for the one validation of
/// [`FrontDoor::submit`]. A required field left empty is absent (proto3
/// cannot tell the two apart), so it is refused as missing, as in HTTP; an
/// optional field is present when set, even empty.
fn command_body(request: &proto::SendRequest) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    let required = [
        ("idempotencyKey", &request.idempotency_key),
        ("phoneNumber", &request.phone_number),
        ("text", &request.text),
    ];
    for (name, value) in required {
        if !value.is_empty() {
            body.insert(name.to_owned(), value.as_str().into());
        }
    }
    let optional = [
        ("senderId", &request.sender_id),
        ("expiresAt", &request.expires_at),
        ("sendAt", &request.send_at),
        ("priority", &request.priority),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            body.insert(name.to_owned(), value.as_str().into());
        }
    }
    serde_json::to_vec(&body).expect("a JSON object always serialises")
}

/// The status document of a key as a message.
fn message(key: &str, s: MessageStatus) -> proto::MessageStatus {
    proto::MessageStatus {
        idempotency_key: key.to_owned(),
        status: s.status,
        provider_message_id: s.provider_message_id,
        attempts: s.attempts,
        updated_at: s.updated_at,
        reason: s.reason,
        detail: s.detail,
        provider: s.provider,
        delivery_status: s.delivery_status.map(|d| d.as_str().to_owned()),
        send_at: s.send_at,
        history: s
            .history
            .into_iter()
            .map(|h| proto::HistoryEntry {
                status: h.status.as_str().to_owned(),
                provider_status: h.provider_status,
                error_code: h.error_code,
                at: h.at,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::IdempotencyKey;
    use crate::ports::CacheService;
    use crate::testing::{MemoryCache, MemoryEvents, MemoryQueue};

    fn door(cache: Arc<MemoryCache>, limits: WatchLimits) -> (GrpcDoor, CancellationToken) {
        let shutdown = CancellationToken::new();
        let state = GrpcState {
            door: FrontDoor {
                cache,
                queue: MemoryQueue::new(),
                consuming: Arc::default(),
                redis_address: "memory".into(),
                events: Arc::new(MemoryEvents::default()),
                instance: "grpc".into(),
                cancels: Arc::default(),
            },
            api_access: ApiAccess::OpenOnLoopback,
            max_message_bytes: 65536,
            watch_limits: limits,
        };
        (GrpcDoor::new(state, shutdown.clone()), shutdown)
    }

    async fn admitted(key: &str) -> Arc<MemoryCache> {
        let cache = MemoryCache::new(Duration::from_secs(30));
        let key = IdempotencyKey::parse(key).unwrap();
        cache.admit(&key, "fingerprint").await.unwrap();
        cache
    }

    fn watch_request(key: &str) -> Request<proto::WatchStatusRequest> {
        Request::new(proto::WatchStatusRequest {
            idempotency_key: key.into(),
        })
    }

    /// The stream's items until it ends.
    async fn drain(
        mut stream: ReceiverStream<Result<proto::MessageStatus, Status>>,
    ) -> Vec<Result<proto::MessageStatus, Status>> {
        use futures_util::StreamExt;
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        items
    }

    #[test]
    fn empty_required_fields_are_left_out_and_set_optional_ones_kept() {
        let body = command_body(&proto::SendRequest {
            idempotency_key: "k1".into(),
            phone_number: String::new(),
            text: "hi".into(),
            sender_id: Some(String::new()),
            expires_at: None,
            send_at: Some("2026-11-22T10:00:00Z".into()),
            priority: Some("high".into()),
        });
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"idempotencyKey": "k1", "text": "hi", "senderId": "",
                "sendAt": "2026-11-22T10:00:00Z", "priority": "high"})
        );
    }

    #[test]
    fn refusals_keep_the_http_error_code_in_the_message() {
        let invalid = refuse(Refusal::Invalid {
            error: "invalid_phone_number",
            detail: "phoneNumber must be E.164".into(),
        });
        assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            invalid.message(),
            "invalid_phone_number: phoneNumber must be E.164"
        );
        assert_eq!(refuse(Refusal::UnknownKey).code(), tonic::Code::NotFound);
        assert_eq!(
            refuse(Refusal::BrokerUnavailable("x".into())).code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_sees_no_final_status_ends_at_its_time_limit() {
        let limits = WatchLimits {
            max_duration: Duration::from_secs(60),
            ..WatchLimits::default()
        };
        let (door, _shutdown) = door(admitted("slow").await, limits);
        let stream = door.watch_status(watch_request("slow")).await.unwrap();
        let items = drain(stream.into_inner()).await;
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0].as_ref().unwrap().status, "processing");
        let end = items[1].as_ref().unwrap_err();
        assert_eq!(end.code(), tonic::Code::DeadlineExceeded);
    }

    #[tokio::test(start_paused = true)]
    async fn watches_end_at_shutdown_and_are_bounded_in_number() {
        let limits = WatchLimits {
            max_watches: 1,
            ..WatchLimits::default()
        };
        let (door, shutdown) = door(admitted("w").await, limits);
        let open = door.watch_status(watch_request("w")).await.unwrap();
        let refused = door.watch_status(watch_request("w")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        shutdown.cancel();
        let items = drain(open.into_inner()).await;
        assert_eq!(
            items.last().unwrap().as_ref().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        let unknown = door.watch_status(watch_request("nope")).await.unwrap_err();
        assert_eq!(
            unknown.code(),
            tonic::Code::NotFound,
            "the permit came back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_whose_client_reads_slowly_still_ends_with_its_status() {
        let (door, shutdown) = door(admitted("slow-reader").await, WatchLimits::default());
        let (tx, rx) = mpsc::channel(4);
        let watch = Watch {
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            door: door.door.clone(),
            key: "slow-reader".into(),
            tx,
            limits: WatchLimits::default(),
            deadline: Instant::now() + Duration::from_secs(3600),
            shutdown: shutdown.clone(),
        };
        let status = door.door.status("slow-reader").await.unwrap();
        let pushing = tokio::spawn(async move {
            // More changes than the channel holds, none read yet.
            for _ in 0..10 {
                if !watch.push(Ok(message("slow-reader", status.clone()))).await {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
        pushing.await.unwrap();
        let items = drain(ReceiverStream::new(rx)).await;
        assert!(items.len() > 1, "{items:?}");
        let end = items.last().unwrap().as_ref().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable, "{items:?}");
    }
}

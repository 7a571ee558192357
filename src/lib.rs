//! sms-service turns `SendSms` commands on RabbitMQ into text messages sent
//! through an HTTP SMS provider, at most once per idempotency key, and
//! publishes `SmsSent` / `SmsFailed` events. The wire contract is
//! `docs/reference.md`; the README says how to run it.
//!
//! The crate is ports and adapters:
//!
//! - [`domain`]: commands, events (one `EventKind` lists them all), phone
//!   numbers, segment counting. Pure.
//! - [`ports`]: the traits the core needs (`QueueClient`, `SmsService`,
//!   `CacheService`, `EventBus`, `NotificationService`).
//! - [`notification`]: the core decision for one command: claim the key,
//!   send, record, publish. Its module doc is the correctness argument.
//! - [`concurrency`]: the adaptive limit on sends under way at once.
//! - [`processing`]: `QueueProcessingService`, the loop that feeds commands
//!   to the notification step with bounded concurrency and settles each
//!   delivery (ack, requeue, dead-letter); graceful shutdown.
//! - [`adapters`]: RabbitMQ (lapin), Redis, providers (reqwest; one folder
//!   each: send and delivery-report callbacks), HTTP (axum), gRPC (tonic).
//! - [`front_door`]: what the HTTP and gRPC doors share: submitting a
//!   command, reading a key's status, readiness.
//! - [`config`], [`telemetry`], [`app`]: settings, logs, metrics and traces, wiring.
//! - [`cli_tools`], [`dead_letters`]: the operator's one-shot commands
//!   (`send`, `events`; list, replay and reset dead letters, `forget`).
//! - [`fake_provider`]: a fake SMS provider in each provider's dialect
//!   (sends and delivery-report callbacks), for demos and tests; [`bench`]:
//!   the `bench` command's load generator, its baselines (a bare relay and
//!   a minimal correct pipeline), CPU readings and paired runs of two
//!   builds. Neither is used by the service.
//! - `testing` (tests, or the `test-support` feature): in-memory adapters
//!   and the idempotency store's contract.
//!
//! The core (domain, ports, notification, processing) uses no adapter crate.

#![forbid(unsafe_code)]

pub mod adapters;
pub mod app;
pub mod bench;
pub mod breaker;
pub mod cli_tools;
pub mod concurrency;
pub mod config;
pub mod dead_letters;
pub mod domain;
pub mod fake_provider;
pub mod front_door;
pub mod notification;
pub mod ports;
pub mod processing;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

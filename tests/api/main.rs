//! Integration and end-to-end tests against the real RabbitMQ and Redis on
//! loopback. One test binary, so it links once.

mod amqp;
mod auth;
mod cancel;
mod cli;
mod compose;
mod delivery;
mod docs;
mod e2e;
mod failover;
mod grpc;
mod helpers;
mod observability;
mod ops;
mod pipeline;
mod privacy;
mod provider;
mod providers_africastalking;
mod providers_infobip;
mod providers_twilio;
mod providers_vonage;
mod proxy;
mod resilience;
mod schedule;
mod startup;
mod store;
mod traces;

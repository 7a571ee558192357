//! Integration and end-to-end tests against the real RabbitMQ and Redis on
//! loopback. One test binary, so it links once.

mod amqp;
mod auth;
mod cli;
mod docs;
mod e2e;
mod helpers;
mod ops;
mod pipeline;
mod privacy;
mod provider;
mod providers_twilio;
mod proxy;
mod resilience;
mod startup;
mod store;

//! Integration and end-to-end tests against the real RabbitMQ and Redis on
//! loopback. One test binary, so it links once.

mod amqp;
mod auth;
mod cancel;
mod cli;
mod cluster_rabbitmq;
mod compose;
mod delivery;
mod docs;
mod e2e;
mod encoding;
mod failover;
mod grpc;
mod helpers;
mod kubernetes;
mod limits;
mod observability;
mod ops;
mod pipeline;
mod priority;
mod privacy;
mod provider;
mod providers_africastalking;
mod providers_infobip;
mod providers_twilio;
mod providers_vonage;
mod proxy;
mod quorum;
mod redis_ha;
mod resilience;
mod scale;
mod schedule;
mod schemas;
mod startup;
mod store;
mod traces;

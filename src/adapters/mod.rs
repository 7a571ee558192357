//! Adapters: the ports implemented over real infrastructure. Only this
//! module knows lapin, redis, reqwest, axum and tonic.

pub mod grpc;
pub mod http;
pub mod providers;
pub mod rabbitmq;
pub mod redis;
pub mod redis_durability;

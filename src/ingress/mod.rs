//! Ingress: the gRPC services, the Kafka consumers, and the validation they share.

pub mod auth;
pub mod convert;
pub mod grpc;
pub mod kafka;
pub mod limits;
pub mod validate;

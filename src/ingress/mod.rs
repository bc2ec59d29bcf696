//! Ingress: the gRPC services, and validation shared with the Kafka consumers.

pub mod convert;
pub mod grpc;
pub mod validate;

//! Ingress: the gRPC services (with callers, roles and rate limits) and the
//! Kafka consumers. Decoding and validation live in `crate::wire`, below
//! ingress and egress both.

pub mod auth;
pub mod batch;
pub mod connections;
pub mod grpc;
pub mod kafka;
pub mod limits;

pub use crate::wire::{convert, validate};

//! # loadtest
//!
//! Open-loop load against the account service: requests leave on a fixed
//! schedule at the target rate whatever the server does, and each latency is
//! measured from the request's *intended* send time ([`schedule`]), into an HDR
//! histogram ([`recorder`]). Every mode prints a progress line per second to
//! stderr and one JSON line to stdout (design 4.3).
//!
//! Modes: `reserve`, `mixed`, `max` (against a server), `fills` (FillEvents to
//! Kafka, lag until the AccountEvent is read back), `echo-server` (a server
//! of the same proto that answers at once: the ceiling of unary gRPC on this
//! machine with this client), `sync-probe` (the disk's fdatasync latency).
//! The in-process figures (engine alone, replay) are criterion benches and
//! examples of the service crate; see BENCHMARKS.md.

pub mod echo;
pub mod fills;
pub mod high_rate;
pub mod inproc;
pub mod modes;
pub mod recorder;
pub mod schedule;
pub mod sync_probe;

pub use recorder::{Class, Recorder};

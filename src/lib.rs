//! # account-service
//!
//! The account core of a brokerage: it owns every account's cash and positions,
//! locks cash or shares for the Order service before an order goes to the
//! exchange (Reserve / Unreserve over gRPC), and settles fills, deposits and
//! withdrawals.
//!
//! ```text
//! gRPC (tonic, tokio) ─┐                          ┌─► replies (after durable)
//! admin / queries ─────┼─► bounded crossbeam ─► ENGINE THREAD (pinned, single writer)
//! Kafka consumers ─────┘     queue              │  1 take a batch
//!                                               │  2 stamp sequence + timestamp, append to WAL
//!                                               │  3 apply to in-memory state (pure function)
//!                                               │  4 one sync for the batch, then release replies
//!                                               └─► outbox publisher ─► trading.account.events,
//!                                                   (after the sync)     <topic>.dlq
//! ```
//!
//! Who owns what:
//!
//! * [`domain`]: value types. Every command is `Copy` (ids inline), validated at
//!   the edge.
//! * [`state_machine`]: `State::apply(command, sequence, timestamp)` — pure, no
//!   I/O, no clock. Live processing and WAL replay both run it, so replay rebuilds
//!   the state exactly.
//! * [`engine`]: the one writer thread. It alone owns the [`state_machine::State`]
//!   and the [`wal::Wal`]. `engine::writer` is the one place where a reply is
//!   released, and only after the batch's journal records are durable.
//! * [`ingress`]: gRPC services and Kafka consumers; decoding and validation
//!   (INVALID_ARGUMENT naming the field, or a journaled dead letter).
//! * [`egress`]: the outbox publisher: account events and dead letters derived
//!   from the journal, published after the sync, with a durable watermark.
//! * [`snapshot`]: PostgreSQL snapshots (the read model and its history),
//!   written by their own thread from the rows the engine hands over.
//! * [`replica`]: with `--peers`, the same writer as one replica of a group
//!   on openraft: each batch a raft entry, replies after commit, side effects
//!   (Kafka, PostgreSQL) on the leader only.
//! * [`metrics`]: Prometheus registry and the `/metrics` endpoint.
//! * [`server`]: wires it all together for `account-service serve`.

pub mod client;
pub mod config;
pub mod domain;
pub mod egress;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingress;
pub mod metrics;
pub mod proto;
pub mod replica;
pub mod server;
pub mod snapshot;
pub mod state_machine;
pub mod telemetry;
pub mod topics;
pub mod wire;
pub mod workload;

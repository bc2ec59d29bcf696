//! Egress: what leaves the process once it is durable.
//!
//! * [`outbox`]: the engine side. `Collector` keeps the account events and
//!   dead letters `apply` derives and hands them over after the group-commit
//!   sync (never before).
//! * [`publisher`]: the outbox publisher thread. Idempotent Kafka producer to
//!   `trading.account.events` (keyed by account_id) and to `<topic>.dlq`; a
//!   durable watermark ([`watermark`]) of what the broker acknowledged. After a
//!   restart the engine re-derives everything above the watermark from the WAL.
//! * [`spill`]: the bounded window: past it, events are re-derived from the
//!   WAL instead of held in memory.
//! * [`dlq`]: dead-letter records: the original message (read back from its
//!   topic by offset, so it goes out unchanged), and the `dlq.*` headers.
//!
//! Why the WAL is the outbox, and the watermark a file: the journal already
//! holds every fact an event is derived from, in order, durably; a separate
//! event store would be a second copy to keep consistent. The watermark is
//! written at most every [`publisher::WATERMARK_PERSIST_INTERVAL`], so a
//! restart republishes at most that much plus what was in flight; consumers
//! recognise a republished event by its deterministic `event_id`.

pub mod dlq;
pub mod outbox;
pub mod publisher;
pub mod spill;
pub mod watermark;

pub use outbox::{Collector, DlqReason, OutboxBatch, OutboxItem, OutboxRecord, OutboxSink};
pub use publisher::{Outbox, OutboxError};
pub use spill::{Handed, Intake, Window};

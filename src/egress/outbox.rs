//! The engine's side of the outbox: what `apply` derived from each journaled
//! command (account events, dead letters), held until the command is durable
//! and then handed to the publisher thread.
//!
//! ```text
//! writer thread                              publisher thread
//! ─────────────                              ────────────────
//! append to WAL, Collector::apply ──┐
//!   (events + DLQ facts, in memory) │
//! sync (group commit) ──────────────┴─► OutboxBatch ─► produce ─► broker ack
//!                                       (a window)               │
//!                          watermark file + AtomicU64 ◄──────────┘
//! ```
//!
//! Nothing is handed over before the sync that makes its command durable. A
//! broker outage never blocks the writer (design 2: Reserve keeps answering):
//! once the outbox holds its window of records, the writer stops collecting
//! and the rest is re-derived from the WAL when the broker takes records again
//! ([`super::spill`]). If the process dies, everything above the durable
//! watermark is re-derived from the WAL at the next start.

use super::spill::{self, Handed, Handshake, Window};
use crate::domain::{Command, DeadLetterReason, Id, Source};
use crate::state_machine::{Event, EventSink, NoEvents, Outcome, Prepared, ResultCode, State};
use crossbeam_channel::Sender;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a Kafka message goes to its dead-letter queue.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum DlqReason {
    /// Decided at the edge and journaled as [`Command::DeadLetter`].
    Edge(DeadLetterReason),
    /// The engine could not apply it and nobody else was told (no event):
    /// unknown account, currency mismatch, idempotency conflict, closed account.
    Rejected(ResultCode),
}

impl DlqReason {
    /// Low-cardinality name: the metric label and the start of `dlq.reason`.
    pub fn name(self) -> &'static str {
        match self {
            DlqReason::Edge(r) => r.name(),
            DlqReason::Rejected(code) => code.name(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug, serde::Serialize, serde::Deserialize)]
pub enum OutboxItem {
    /// The `index`-th event of its command: event id `"<sequence>-<index>"`.
    Event {
        index: u32,
        event: Event,
    },
    DeadLetter {
        source: Source,
        reason: DlqReason,
    },
}

/// One thing to publish, with the journaled facts of the command it came from.
#[derive(Clone, Copy, PartialEq, Debug, serde::Serialize, serde::Deserialize)]
pub struct OutboxRecord {
    pub sequence: u64,
    pub timestamp_ms: i64,
    /// request_id or event_id of the command; empty for ticks.
    pub cause_id: Id,
    pub item: OutboxItem,
    /// The trace of the request that journaled the command, while it is in
    /// memory (traces on): the event's `traceparent`. Not journaled, so an
    /// event re-derived after a restart has none.
    #[serde(skip)]
    pub trace: Option<crate::telemetry::TraceParent>,
}

/// Everything derived from the commands up to `through_sequence` (inclusive)
/// that was not in an earlier batch. Commands without records still advance
/// `through_sequence`, so the watermark moves through quiet stretches.
#[derive(Debug, Default)]
pub struct OutboxBatch {
    pub through_sequence: u64,
    pub records: Vec<OutboxRecord>,
}

/// The writer's handle on the publisher: the feed, its window, and the
/// durable watermark.
#[derive(Clone)]
pub struct OutboxSink {
    tx: Sender<Handed>,
    watermark: Arc<AtomicU64>,
    window: Arc<Window>,
}

impl fmt::Debug for OutboxSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxSink")
            .field("watermark", &self.watermark())
            .field("queued_batches", &self.tx.len())
            .field("held_records", &self.window.held())
            .finish()
    }
}

impl OutboxSink {
    pub fn new(tx: Sender<Handed>, watermark: Arc<AtomicU64>, window: Arc<Window>) -> OutboxSink {
        OutboxSink {
            tx,
            watermark,
            window,
        }
    }

    /// Every record of a command with `sequence <= watermark()` has been
    /// acknowledged by the broker, and that fact is on disk. WAL retention must
    /// keep every record above it (see `Writer::outbox_floor`).
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// The shared watermark itself (snapshots wait for it; see `snapshot`).
    pub fn watermark_handle(&self) -> Arc<AtomicU64> {
        self.watermark.clone()
    }

    /// Hands `batch` to the publisher as it is, without a window or a spill:
    /// a replica group's leader, whose records come from the replicated
    /// ledger (`replica::outbox`) of entries already durable on a majority.
    pub(crate) fn hand(&self, batch: OutboxBatch) {
        self.window.fed(batch.records.len());
        // A publisher that is gone (leadership lost, stopping) loses nothing:
        // the ledger keeps every record until its acknowledgement is journaled.
        let _ = self.tx.send(Handed::Batch(batch));
    }
}

/// Replay hands records over in chunks of at most this many, so re-deriving a
/// long backlog after a restart does not build one huge vector.
const HAND_OFF_CHUNK_RECORDS: usize = 65_536;

/// Lives in the writer: collects records while commands are applied and hands
/// them over after the sync.
pub struct Collector {
    sink: OutboxSink,
    records: Vec<OutboxRecord>,
    handed_through: u64,
    /// The window was full: nothing is collected until the re-deriver of
    /// this spill has caught up.
    spilled: Option<Arc<Handshake>>,
    /// Where a re-deriver gets its base state (none: the whole WAL).
    snapshots: Option<crate::snapshot::SnapshotConfig>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(handshake) = &self.spilled {
            handshake.abandon();
        }
    }
}

impl Collector {
    pub fn new(sink: OutboxSink) -> Collector {
        Collector {
            handed_through: sink.watermark(),
            sink,
            records: Vec::with_capacity(1024),
            spilled: None,
            snapshots: None,
        }
    }

    /// Snapshots are on: a spill's re-deriver starts from the newest one.
    pub fn with_snapshots(mut self, config: Option<crate::snapshot::SnapshotConfig>) -> Collector {
        self.snapshots = config;
        self
    }

    /// The durable watermark (see [`OutboxSink::watermark`]).
    pub fn watermark(&self) -> u64 {
        self.sink.watermark()
    }

    /// `state.apply_prepared`, keeping the command's events and its dead
    /// letter, if any.
    pub fn apply(
        &mut self,
        state: &mut State,
        command: &Command,
        prepared: &Prepared,
        sequence: u64,
        timestamp_ms: i64,
        trace: Option<crate::telemetry::TraceParent>,
    ) -> Outcome {
        if self.spilled.is_some() {
            return state.apply_prepared(command, prepared, sequence, timestamp_ms, &mut NoEvents);
        }
        collect(
            &mut self.records,
            state,
            command,
            prepared,
            sequence,
            timestamp_ms,
            trace,
        )
    }

    /// `state.apply_basket`, keeping each item's events (their cause is the
    /// item's request_id; event ids run on across the basket's items).
    pub fn apply_basket(
        &mut self,
        state: &mut State,
        items: &[crate::domain::Reserve],
        sequence: u64,
        timestamp_ms: i64,
        trace: Option<crate::telemetry::TraceParent>,
        outcomes: &mut Vec<Outcome>,
    ) {
        if self.spilled.is_some() {
            return state.apply_basket(items, sequence, timestamp_ms, &mut NoEvents, outcomes);
        }
        collect_basket(
            &mut self.records,
            state,
            items,
            sequence,
            timestamp_ms,
            trace,
            outcomes,
        )
    }

    /// Hands over everything collected; call only once every command through
    /// `through_sequence` is durable. When the outbox's window is full after
    /// it, spills: a re-deriver derives what follows from `wal`, and
    /// collecting stops until it caught up.
    pub fn hand_off(&mut self, through_sequence: u64, wal: &wal::Wal) {
        if let Some(handshake) = &self.spilled {
            debug_assert!(self.records.is_empty());
            handshake.synced(through_sequence);
            self.handed_through = through_sequence;
            if handshake.resume_after(through_sequence) {
                self.spilled = None;
            }
            return;
        }
        if self.records.is_empty() && through_sequence <= self.handed_through {
            return;
        }
        debug_assert!(through_sequence >= self.handed_through);
        debug_assert!(self.records.iter().all(|r| r.sequence <= through_sequence));
        let capacity = self.records.len().clamp(1024, HAND_OFF_CHUNK_RECORDS);
        let records = std::mem::replace(&mut self.records, Vec::with_capacity(capacity));
        self.sink.window.fed(records.len());
        // A publisher that is gone (shutting down) loses nothing: the WAL keeps
        // the records above the watermark and the next start re-derives them.
        let _ = self.sink.tx.send(Handed::Batch(OutboxBatch {
            through_sequence,
            records,
        }));
        self.handed_through = through_sequence;
        if self.sink.window.held() >= self.sink.window.capacity() {
            self.spill(wal);
        }
    }

    /// During replay: hands over a full chunk early (the WAL records are on disk).
    pub fn hand_off_if_full(&mut self, through_sequence: u64, wal: &wal::Wal) {
        let chunk = HAND_OFF_CHUNK_RECORDS.min(self.sink.window.capacity());
        if self.records.len() >= chunk {
            self.hand_off(through_sequence, wal);
        }
    }

    /// The window is full: from the next command on, events are re-derived
    /// from the WAL by a re-deriver thread.
    fn spill(&mut self, wal: &wal::Wal) {
        let from = self.handed_through + 1;
        match spill::start(
            self.snapshots.clone(),
            wal.reader(),
            from,
            self.sink.window.clone(),
        ) {
            Ok((spill, handshake)) => {
                self.sink.window.spilled();
                tracing::warn!(
                    from,
                    held = self.sink.window.held(),
                    window = self.sink.window.capacity(),
                    "outbox window full: events from here on are re-derived from the WAL when the broker takes them"
                );
                let _ = self.sink.tx.send(Handed::Spill(spill));
                self.spilled = Some(handshake);
            }
            // Nothing is lost: the window just grows past its bound.
            Err(e) => {
                tracing::error!(error = %e, "outbox: the re-deriver did not start; collecting on")
            }
        }
    }

    /// Whether the window was full and events are left to the re-deriver.
    pub fn spilled(&self) -> bool {
        self.spilled.is_some()
    }

    /// Records applied but not yet handed over (waiting for the sync).
    pub fn held(&self) -> usize {
        self.records.len()
    }
}

/// `state.apply`, appending to `records` the command's events and its dead
/// letter, if any: what is published for it, and what the read model's
/// history keeps.
pub fn collect(
    records: &mut Vec<OutboxRecord>,
    state: &mut State,
    command: &Command,
    prepared: &Prepared,
    sequence: u64,
    timestamp_ms: i64,
    trace: Option<crate::telemetry::TraceParent>,
) -> Outcome {
    let cause_id = command.key().map(|k| k.id).unwrap_or_default();
    let before = records.len();
    let mut sink = Sink {
        records,
        sequence,
        timestamp_ms,
        cause_id,
        index: 0,
        trace,
    };
    let outcome = state.apply_prepared(command, prepared, sequence, timestamp_ms, &mut sink);
    let emitted = records.len() - before;
    if let Some((source, reason)) = dead_letter_reason(command, &outcome, emitted) {
        records.push(OutboxRecord {
            sequence,
            timestamp_ms,
            cause_id,
            item: OutboxItem::DeadLetter { source, reason },
            trace,
        });
    }
    outcome
}

/// `state.apply` of a journaled command, keeping what it derives in
/// `records` when given ([`collect`]), ignoring it otherwise.
pub fn apply_command(
    state: &mut State,
    command: &Command,
    sequence: u64,
    timestamp_ms: i64,
    records: Option<&mut Vec<OutboxRecord>>,
) -> Outcome {
    match records {
        Some(records) => {
            let prepared = Prepared::of(command);
            collect(
                records,
                state,
                command,
                &prepared,
                sequence,
                timestamp_ms,
                None,
            )
        }
        None => state.apply(command, sequence, timestamp_ms, &mut NoEvents),
    }
}

/// [`apply_command`] for an all-or-nothing basket.
pub fn apply_basket(
    state: &mut State,
    items: &[crate::domain::Reserve],
    sequence: u64,
    timestamp_ms: i64,
    records: Option<&mut Vec<OutboxRecord>>,
    outcomes: &mut Vec<Outcome>,
) {
    match records {
        Some(records) => collect_basket(
            records,
            state,
            items,
            sequence,
            timestamp_ms,
            None,
            outcomes,
        ),
        None => state.apply_basket(items, sequence, timestamp_ms, &mut NoEvents, outcomes),
    }
}

/// `state.apply_basket`, appending each item's events to `records`.
pub fn collect_basket(
    records: &mut Vec<OutboxRecord>,
    state: &mut State,
    items: &[crate::domain::Reserve],
    sequence: u64,
    timestamp_ms: i64,
    trace: Option<crate::telemetry::TraceParent>,
    outcomes: &mut Vec<Outcome>,
) {
    let mut sink = Sink {
        records,
        sequence,
        timestamp_ms,
        cause_id: Id::default(),
        index: 0,
        trace,
    };
    state.apply_basket(items, sequence, timestamp_ms, &mut sink, outcomes);
}

/// The dead-letter rule: a Kafka message that was not applied and produced no
/// event (a rejected withdrawal is published as an event instead). A
/// redelivery or a duplicate event id (`replayed`) is neither.
pub fn dead_letter_reason(
    command: &Command,
    outcome: &Outcome,
    emitted: usize,
) -> Option<(Source, DlqReason)> {
    if outcome.replayed {
        return None;
    }
    match command {
        Command::DeadLetter(c) => Some((c.source, DlqReason::Edge(c.reason))),
        _ if !outcome.result.is_ok() && emitted == 0 => command
            .source()
            .map(|source| (source, DlqReason::Rejected(outcome.result))),
        _ => None,
    }
}

/// An [`EventSink`] that stamps each event with its command's facts.
struct Sink<'a> {
    records: &'a mut Vec<OutboxRecord>,
    sequence: u64,
    timestamp_ms: i64,
    cause_id: Id,
    index: u32,
    trace: Option<crate::telemetry::TraceParent>,
}

impl EventSink for Sink<'_> {
    fn push(&mut self, event: Event) {
        self.records.push(OutboxRecord {
            sequence: self.sequence,
            timestamp_ms: self.timestamp_ms,
            cause_id: self.cause_id,
            item: OutboxItem::Event {
                index: self.index,
                event,
            },
            trace: self.trace,
        });
        self.index += 1;
    }

    fn cause(&mut self, request_id: Id) {
        self.cause_id = request_id;
    }
}

//! The outbox of a replica group (design 7): account events and dead letters
//! leave from the leader only, derived exactly as a single node derives them,
//! and a failover neither loses one nor invents another.
//!
//! ```text
//! every replica (writer and snapshot shadow)      the leader only
//! ──────────────────────────────────────────      ───────────────
//! committed entry ─► apply + collect ─► LEDGER ──► publisher (egress::Outbox)
//!                    (same rule, same ids)  ▲         │ broker acknowledged
//!                                           │         ▼ through sequence S
//!  OUTBOX_ACKED(S) applied: drop <= S ──────┴── raft entry [OUTBOX_ACKED(S)]
//! ```
//!
//! * Every replica derives the records of each committed command as it
//!   applies it, with the single node's own rule (`egress::outbox::collect`:
//!   event ids `<sequence>-<n>`, the same amounts), into its **ledger**: the
//!   records above the replicated watermark, in sequence order.
//! * When a replica starts leading it starts a publisher at the replicated
//!   watermark and hands it the whole ledger, then the records of each entry
//!   it applies. What the broker acknowledged (the publisher's durable
//!   watermark) the leader journals, at most every [`ACK_INTERVAL`], as an
//!   `OUTBOX_ACKED` control record in a raft entry of its own; every replica
//!   applying it drops the ledger's records at or below it.
//! * The ledger is part of the raft snapshot (machine.rs), so a replica
//!   restarted from its snapshot, or sent the leader's, holds the ledger of
//!   one that applied every entry.
//! * A new leader republishes its whole ledger: besides what is new, only
//!   what the old leader published after its last journaled acknowledgement
//!   (about [`ACK_INTERVAL`] of events), with the same ids, which consumers
//!   dedupe (design 2: "a republished event is recognisably the same event").
//!
//! The ledger also serves the read model's history (PostgreSQL): a record
//! leaves it once the broker and the history both have it (`HISTORY_WRITTEN`).
//!
//! Bound: while a sink is away the ledger grows on every replica with the
//! events of the outage (about 350 bytes each, `account_outbox_ledger_records`),
//! up to `--replica-ledger-records-max`; past it the leader refuses writes
//! (duties.rs). A single node's bounded window, which re-derives events from
//! its WAL instead, is not built for replicas.
//!
//! Control records: the records of a raft entry are journal records
//! (`engine::codec`, whose first byte is its format version, 1) or control
//! records, which take no sequence and start with [`CONTROL`]:
//!
//! ```text
//! +------+------+------------------+
//! | 0xFF | kind | through: u64 LE  |   kind 1: OUTBOX_ACKED, 2: HISTORY_WRITTEN,
//! +------+------+------------------+   3: ORIGIN_START (through 0); 10 bytes
//! ```

use crate::config::KafkaConfig;
use crate::egress::{Outbox, OutboxBatch, OutboxRecord, OutboxSink};
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First byte of a control record (a journal record starts with its format
/// version instead).
pub const CONTROL: u8 = 0xFF;
const _: () = assert!(CONTROL != crate::engine::codec::FORMAT_VERSION);
const OUTBOX_ACKED: u8 = 1;
const HISTORY_WRITTEN: u8 = 2;
const ORIGIN_START: u8 = 3;
const CONTROL_LEN: usize = 10;

/// Writer origins whose proposal order is remembered (a writer takes a new
/// one at each start and after each failed proposal).
const ORIGINS_MAX: usize = 64;

/// Least time between two acknowledgements the leader journals.
pub const ACK_INTERVAL: Duration = Duration::from_millis(100);

/// A record of a raft entry that is not a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The broker acknowledged every record of every command through this
    /// sequence.
    OutboxAcked(u64),
    /// A snapshot's history in PostgreSQL holds every event through this
    /// sequence.
    HistoryWritten(u64),
    /// The first record of a writer origin's proposal 1: its batches follow
    /// the proposal order ([`Ledger::admit`]).
    OriginStart,
}

/// Whether a batch's records open with [`Control::OriginStart`].
pub fn starts_origin(records: &[Vec<u8>]) -> bool {
    records
        .first()
        .is_some_and(|r| matches!(decode_control(r), Some(Ok(Control::OriginStart))))
}

/// Encodes `OUTBOX_ACKED(through)`.
pub fn encode_acked(through: u64) -> Vec<u8> {
    encode_control(OUTBOX_ACKED, through)
}

/// Encodes `ORIGIN_START`.
pub fn encode_origin_start() -> Vec<u8> {
    encode_control(ORIGIN_START, 0)
}

/// Encodes `HISTORY_WRITTEN(through)`.
pub fn encode_history_written(through: u64) -> Vec<u8> {
    encode_control(HISTORY_WRITTEN, through)
}

fn encode_control(kind: u8, through: u64) -> Vec<u8> {
    let mut record = Vec::with_capacity(CONTROL_LEN);
    record.extend_from_slice(&[CONTROL, kind]);
    record.extend_from_slice(&through.to_le_bytes());
    debug_assert_eq!(record.len(), CONTROL_LEN);
    record
}

/// `None` for a journal record; the control record, or what is wrong with it.
pub fn decode_control(record: &[u8]) -> Option<Result<Control, String>> {
    if record.first() != Some(&CONTROL) {
        return None;
    }
    let through = |bytes: &[u8]| {
        let mut through = [0; 8];
        through.copy_from_slice(bytes);
        u64::from_le_bytes(through)
    };
    Some(match record {
        [CONTROL, OUTBOX_ACKED, rest @ ..] if rest.len() == 8 => {
            Ok(Control::OutboxAcked(through(rest)))
        }
        [CONTROL, HISTORY_WRITTEN, rest @ ..] if rest.len() == 8 => {
            Ok(Control::HistoryWritten(through(rest)))
        }
        [CONTROL, ORIGIN_START, rest @ ..] if rest.len() == 8 => Ok(Control::OriginStart),
        [CONTROL, kind, ..] => Err(format!(
            "control record of kind {kind} and {} bytes",
            record.len()
        )),
        _ => Err("control record without a kind".into()),
    })
}

/// Who must have taken a record before the ledger drops it: the broker
/// (Kafka on) and the read model's history (PostgreSQL with history on).
/// The same on every replica of a group (their flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sinks {
    pub outbox: bool,
    pub history: bool,
}

impl Sinks {
    pub fn any(self) -> bool {
        self.outbox || self.history
    }
}

/// The records derived from committed commands that a sink has not taken
/// yet (as far as the group's journal says), in sequence order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// The broker acknowledged every record through this sequence.
    acked_through: u64,
    /// `account_events` holds every event through this sequence.
    history_through: u64,
    /// Records of every sequence above this one were collected (the ledger
    /// began there: a group that ran without sinks before).
    complete_from: u64,
    /// Records at or below this were dropped (every sink had them).
    dropped_through: u64,
    records: VecDeque<OutboxRecord>,
    /// The last proposal applied of each recent writer origin, oldest origin
    /// first (see [`Ledger::admit`]).
    proposals: VecDeque<(u64, u64)>,
    #[serde(skip)]
    sinks: Sinks,
}

impl Ledger {
    /// A ledger that collects from the sequence after `sequence` on.
    pub fn starting_at(sequence: u64) -> Ledger {
        Ledger {
            complete_from: sequence,
            dropped_through: sequence,
            acked_through: sequence,
            history_through: sequence,
            ..Ledger::default()
        }
    }

    /// The proposal order of committed batches, the same on every replica:
    /// a writer numbers its proposals 1, 2, 3... under its origin, and a
    /// batch of an origin whose proposal 1 was seen opening with
    /// `ORIGIN_START` (`starts`) is applied only if it is the next of its
    /// origin. A batch that committed after one of its
    /// origin that did not (leadership lost and regained between the two) is
    /// refused, so no Kafka offset is ever applied after an earlier one that
    /// was not: the state skips offsets at or below the last applied, and
    /// would skip the lost one for good. A writer whose proposal failed goes
    /// on under a new origin, and proposes one batch only until the first of
    /// an origin is applied, so its origins are always seen from 1.
    ///
    /// Any other origin is one of a writer without a ledger (a group that
    /// turned Kafka or history on later; its numbering may have gaps): its
    /// batches were all applied then, and are all applied again, untracked.
    /// Origins are remembered least recently applied first out, so the one
    /// a leader proposes under is never forgotten while it leads.
    pub fn admit(&mut self, origin: u64, proposal: u64, starts: bool) -> bool {
        match self.proposals.iter().position(|(o, _)| *o == origin) {
            Some(at) if proposal == self.proposals[at].1 + 1 => {
                self.proposals.remove(at);
                self.proposals.push_back((origin, proposal));
                true
            }
            Some(_) => false,
            None if proposal == 1 && starts => {
                if self.proposals.len() >= ORIGINS_MAX {
                    self.proposals.pop_front();
                }
                self.proposals.push_back((origin, 1));
                true
            }
            None => true,
        }
    }

    /// Which sinks this replica's flags name (not part of the snapshot).
    pub fn with_sinks(mut self, sinks: Sinks) -> Ledger {
        self.sinks = sinks;
        self
    }

    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    pub fn history_through(&self) -> u64 {
        self.history_through
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends the records of commands just applied (sequences above every
    /// record held).
    pub fn push(&mut self, records: &[OutboxRecord]) {
        debug_assert!(records.iter().all(|r| r.sequence > self.dropped_through));
        debug_assert!(match (self.records.back(), records.first()) {
            (Some(last), Some(first)) => first.sequence >= last.sequence,
            _ => true,
        });
        self.records.extend(records.iter().copied());
    }

    /// The broker acknowledged everything through `through`. An older
    /// acknowledgement (journaled by a leader that was behind) changes
    /// nothing.
    pub fn acknowledge(&mut self, through: u64) {
        self.acked_through = self.acked_through.max(through);
        self.trim();
    }

    /// `account_events` holds everything through `through`.
    pub fn history_written(&mut self, through: u64) {
        self.history_through = self.history_through.max(through);
        self.trim();
    }

    /// What a control record of a committed entry does to the ledger.
    pub fn apply_control(&mut self, control: Control) {
        match control {
            Control::OutboxAcked(through) => self.acknowledge(through),
            Control::HistoryWritten(through) => self.history_written(through),
            Control::OriginStart => {}
        }
    }

    /// [`Ledger::admit`] for a committed batch.
    pub fn admit_batch(&mut self, batch: &super::Batch) -> bool {
        self.admit(batch.origin, batch.proposal, starts_origin(&batch.records))
    }

    /// Drops what every sink has taken.
    fn trim(&mut self) {
        let floor = match (self.sinks.outbox, self.sinks.history) {
            (true, true) => self.acked_through.min(self.history_through),
            (true, false) => self.acked_through,
            (false, true) => self.history_through,
            (false, false) => return,
        };
        if floor <= self.dropped_through {
            return;
        }
        self.dropped_through = floor;
        while self.records.front().is_some_and(|r| r.sequence <= floor) {
            self.records.pop_front();
        }
        debug_assert!(self.records.iter().all(|r| r.sequence > floor));
    }

    /// What the broker has not acknowledged, for a publisher that starts.
    pub fn pending(&self) -> Vec<OutboxRecord> {
        self.records
            .iter()
            .filter(|r| r.sequence > self.acked_through)
            .copied()
            .collect()
    }

    /// Appends the records of sequences `from + 1 ..= through` to `out`.
    /// Sequences at or below where the ledger began collecting have none to
    /// give (returned: the first sequence given); ones it dropped are an
    /// error.
    pub fn read(
        &self,
        from: u64,
        through: u64,
        out: &mut Vec<OutboxRecord>,
    ) -> Result<u64, String> {
        let start = from.max(self.complete_from);
        if start < self.dropped_through {
            return Err(format!(
                "the events of sequences {}..={} are no longer held (every sink had taken them)",
                start + 1,
                self.dropped_through
            ));
        }
        let first = self.records.partition_point(|r| r.sequence <= start);
        out.extend(
            self.records
                .range(first..)
                .take_while(|r| r.sequence <= through)
                .copied(),
        );
        Ok(start + 1)
    }
}

/// The leader's publisher, and when it last journaled an acknowledgement.
pub(super) struct Publishing {
    outbox: Option<Outbox>,
    sink: OutboxSink,
    /// The acknowledgement last proposed, and when.
    proposed: u64,
    proposed_at: Instant,
}

impl Publishing {
    /// Starts a publisher at the ledger's watermark and hands it the ledger,
    /// as of `through_sequence` (the state's last sequence).
    pub(super) fn start(
        config: &KafkaConfig,
        data_dir: &Path,
        metrics: Arc<Metrics>,
        ledger: &Ledger,
        through_sequence: u64,
    ) -> Result<Publishing, crate::egress::OutboxError> {
        let watermark = ledger.acked_through();
        let (outbox, sink) = Outbox::start_at(config, data_dir, metrics, Some(watermark))?;
        tracing::info!(
            watermark,
            republished = ledger.len(),
            through_sequence,
            "leading: outbox publisher started from the replicated watermark"
        );
        sink.hand(OutboxBatch {
            through_sequence,
            records: ledger.pending(),
        });
        Ok(Publishing {
            outbox: Some(outbox),
            sink,
            proposed: watermark,
            proposed_at: Instant::now(),
        })
    }

    /// The records of the commands applied through `through_sequence`.
    pub(super) fn hand(&self, through_sequence: u64, records: Vec<OutboxRecord>) {
        self.sink.hand(OutboxBatch {
            through_sequence,
            records,
        });
    }

    /// The watermark to journal now, if the publisher's moved past what the
    /// ledger and the last proposal say, and [`ACK_INTERVAL`] has passed.
    pub(super) fn acknowledgement_due(&mut self, ledger: &Ledger) -> Option<u64> {
        let durable = self.sink.watermark();
        let known = ledger.acked_through().max(self.proposed);
        if durable <= known || self.proposed_at.elapsed() < ACK_INTERVAL {
            return None;
        }
        self.proposed = durable;
        self.proposed_at = Instant::now();
        Some(durable)
    }

    /// Leadership lost (or stopping): the feed closes and the publisher
    /// drains what it holds (at most `egress::publisher::DRAIN_MAX`) on a
    /// thread of its own, so the writer never waits for the broker. Whatever
    /// it does not publish stays in every replica's ledger.
    pub(super) fn stop(mut self) {
        let outbox = self.outbox.take();
        drop(self);
        if let Some(outbox) = outbox {
            let joined = std::thread::Builder::new()
                .name("outbox-stop".into())
                .spawn(move || outbox.join());
            if let Err(e) = joined {
                tracing::error!(error = %e, "outbox publisher not joined");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, Id};
    use crate::egress::OutboxItem;
    use crate::state_machine::{Event, EventKind};

    fn record(sequence: u64, index: u32) -> OutboxRecord {
        OutboxRecord {
            sequence,
            timestamp_ms: 7,
            cause_id: Id::default(),
            item: OutboxItem::Event {
                index,
                event: Event {
                    kind: EventKind::Deposited,
                    account_id: AccountId(1),
                    order_id: None,
                    asset: None,
                    amount: crate::domain::Amount::from_units(10_050_000_000),
                    available_after: crate::domain::Amount::from_units(100_000_000),
                    reserved_after: crate::domain::Amount::ZERO,
                    reason: Id::default(),
                },
            },
            trace: None,
        }
    }

    #[test]
    fn a_control_record_round_trips_and_is_never_a_journal_record() {
        let acked = encode_acked(0x0102_0304_0506_0708);
        assert_eq!(
            decode_control(&acked),
            Some(Ok(Control::OutboxAcked(0x0102_0304_0506_0708)))
        );
        let mut journal = Vec::new();
        crate::engine::codec::encode(&crate::domain::Command::Tick, 5, &mut journal);
        assert_eq!(decode_control(&journal), None);
        assert_eq!(
            decode_control(&encode_origin_start()),
            Some(Ok(Control::OriginStart))
        );
        assert!(starts_origin(&[encode_origin_start(), journal.clone()]));
        assert!(!starts_origin(&[journal.clone(), encode_origin_start()]));
        assert!(matches!(decode_control(&acked[..9]), Some(Err(_))));
        assert_eq!(
            decode_control(&encode_history_written(42)),
            Some(Ok(Control::HistoryWritten(42)))
        );
        assert!(matches!(decode_control(&[CONTROL, 9, 0]), Some(Err(_))));
        assert!(matches!(decode_control(&[CONTROL]), Some(Err(_))));
    }

    const OUTBOX: Sinks = Sinks {
        outbox: true,
        history: false,
    };
    const BOTH: Sinks = Sinks {
        outbox: true,
        history: true,
    };

    #[test]
    fn an_acknowledgement_drops_what_it_covers_and_never_goes_back() {
        let mut ledger = Ledger::default().with_sinks(OUTBOX);
        ledger.push(&[record(3, 0), record(3, 1), record(5, 0)]);
        ledger.push(&[record(9, 0)]);
        ledger.acknowledge(3);
        assert_eq!(ledger.len(), 2);
        assert_eq!(ledger.acked_through(), 3);
        // An older acknowledgement (a leader that was behind) changes nothing.
        ledger.acknowledge(2);
        assert_eq!((ledger.len(), ledger.acked_through()), (2, 3));
        // Through a sequence that had no records: the watermark still moves.
        ledger.acknowledge(7);
        assert_eq!(ledger.pending(), vec![record(9, 0)]);
        assert_eq!(ledger.acked_through(), 7);
        ledger.acknowledge(9);
        assert!(ledger.is_empty());
    }

    #[test]
    fn a_record_stays_until_every_sink_has_it() {
        let mut ledger = Ledger::default().with_sinks(BOTH);
        ledger.push(&[record(2, 0), record(4, 0), record(6, 0)]);
        ledger.acknowledge(6);
        // Published, not yet in the history: kept, but no longer pending.
        assert_eq!(ledger.len(), 3);
        assert!(ledger.pending().is_empty());
        ledger.history_written(4);
        assert_eq!(ledger.len(), 1);
        // History reads a span; what was dropped is an error, not a gap.
        let mut out = Vec::new();
        assert_eq!(ledger.read(4, 6, &mut out), Ok(5));
        assert_eq!(out, vec![record(6, 0)]);
        assert!(ledger.read(1, 6, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_ledger_that_began_late_gives_history_what_it_has() {
        // A group that ran without sinks up to sequence 10.
        let mut ledger = Ledger::starting_at(10).with_sinks(BOTH);
        ledger.push(&[record(11, 0), record(12, 0)]);
        let mut out = Vec::new();
        assert_eq!(ledger.read(0, 11, &mut out), Ok(11));
        assert_eq!(out, vec![record(11, 0)]);
    }

    #[test]
    fn a_batch_is_admitted_only_as_the_next_of_its_origin() {
        let mut ledger = Ledger::default().with_sinks(OUTBOX);
        assert!(ledger.admit(7, 1, true));
        assert!(ledger.admit(7, 2, false));
        // Proposal 3 never committed: 4 must not apply without it.
        assert!(!ledger.admit(7, 4, false));
        // Nor a repeat.
        assert!(!ledger.admit(7, 2, false));
        // An origin first seen past 1 is from before the ledger: applied.
        assert!(ledger.admit(8, 5, false));
        assert!(ledger.admit(8, 9, false));
        // The writer goes on under a new origin.
        assert!(ledger.admit(9, 1, true));
        assert!(ledger.admit(9, 2, false));
        // The old origin's 3, late, still fits its order.
        assert!(ledger.admit(7, 3, false));
        // A writer without a ledger never announces its origin: its batches
        // apply untracked, gaps and all.
        assert!(ledger.admit(20, 1, false));
        assert!(ledger.admit(20, 3, false));
        assert!(ledger.admit(20, 3, false));
    }

    #[test]
    fn the_origin_in_use_is_never_forgotten() {
        let mut ledger = Ledger::default().with_sinks(OUTBOX);
        assert!(ledger.admit(1, 1, true));
        for other in 100..100 + ORIGINS_MAX as u64 - 1 {
            assert!(ledger.admit(other, 1, true));
            // The leader's origin keeps being applied meanwhile.
            let next = other - 98;
            assert!(ledger.admit(1, next, false));
        }
        // One more origin evicts the least recently applied, not origin 1.
        assert!(ledger.admit(999, 1, true));
        assert!(ledger.admit(1, ORIGINS_MAX as u64 + 1, false));
        // The oldest origin was forgotten: its next batch counts as one from
        // before the ledger.
        assert!(ledger.admit(100, 3, false));
    }

    #[test]
    fn a_ledger_survives_its_serialization_exactly() {
        let mut ledger = Ledger::default().with_sinks(OUTBOX);
        ledger.push(&[record(4, 0), record(4, 1)]);
        ledger.acknowledge(2);
        assert!(ledger.admit(5, 1, true));
        let bytes = postcard::to_allocvec(&ledger).unwrap();
        let back: Ledger = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.with_sinks(OUTBOX), ledger);
    }
}

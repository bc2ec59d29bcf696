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
//! Limit: while the broker is down the ledger grows on every replica with the
//! events of the outage (about 200 bytes each, `account_outbox_ledger_records`);
//! a single node's bounded window and re-derivation from the WAL are not built
//! for replicas.
//!
//! Control records: the records of a raft entry are journal records
//! (`engine::codec`, whose first byte is its format version, 1) or control
//! records, which take no sequence and start with [`CONTROL`]:
//!
//! ```text
//! +------+------+------------------+
//! | 0xFF | kind | through: u64 LE  |   kind 1: OUTBOX_ACKED (10 bytes)
//! +------+------+------------------+
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
const ACKED_LEN: usize = 10;

/// Least time between two acknowledgements the leader journals.
pub const ACK_INTERVAL: Duration = Duration::from_millis(100);

/// A record of a raft entry that is not a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The broker acknowledged every record of every command through this
    /// sequence.
    OutboxAcked(u64),
}

/// Encodes `OUTBOX_ACKED(through)`.
pub fn encode_acked(through: u64) -> Vec<u8> {
    let mut record = Vec::with_capacity(ACKED_LEN);
    record.extend_from_slice(&[CONTROL, OUTBOX_ACKED]);
    record.extend_from_slice(&through.to_le_bytes());
    debug_assert_eq!(record.len(), ACKED_LEN);
    record
}

/// `None` for a journal record; the control record, or what is wrong with it.
pub fn decode_control(record: &[u8]) -> Option<Result<Control, String>> {
    if record.first() != Some(&CONTROL) {
        return None;
    }
    Some(match record {
        [CONTROL, OUTBOX_ACKED, through @ ..] if through.len() == 8 => {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(through);
            Ok(Control::OutboxAcked(u64::from_le_bytes(bytes)))
        }
        [CONTROL, kind, ..] => Err(format!(
            "control record of kind {kind} and {} bytes",
            record.len()
        )),
        _ => Err("control record without a kind".into()),
    })
}

/// The records derived from committed commands that the broker has not
/// acknowledged (as far as the group's journal says), in sequence order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Every record of a command at or below this sequence was acknowledged.
    acked_through: u64,
    records: VecDeque<OutboxRecord>,
}

impl Ledger {
    pub fn acked_through(&self) -> u64 {
        self.acked_through
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
        debug_assert!(records.iter().all(|r| r.sequence > self.acked_through));
        debug_assert!(match (self.records.back(), records.first()) {
            (Some(last), Some(first)) => first.sequence >= last.sequence,
            _ => true,
        });
        self.records.extend(records.iter().copied());
    }

    /// The broker acknowledged everything through `through`: drops it. An
    /// older acknowledgement (journaled by a leader that was behind) changes
    /// nothing.
    pub fn acknowledge(&mut self, through: u64) {
        if through <= self.acked_through {
            return;
        }
        self.acked_through = through;
        while self.records.front().is_some_and(|r| r.sequence <= through) {
            self.records.pop_front();
        }
        debug_assert!(self.records.iter().all(|r| r.sequence > through));
    }

    /// Everything held, for a publisher that starts.
    pub fn pending(&self) -> Vec<OutboxRecord> {
        self.records.iter().copied().collect()
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
                    amount: crate::domain::Decimal::new(1005, 1),
                    available_after: crate::domain::Decimal::ONE,
                    reserved_after: crate::domain::Decimal::ZERO,
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
        assert!(matches!(decode_control(&acked[..9]), Some(Err(_))));
        assert!(matches!(decode_control(&[CONTROL, 9, 0]), Some(Err(_))));
        assert!(matches!(decode_control(&[CONTROL]), Some(Err(_))));
    }

    #[test]
    fn an_acknowledgement_drops_what_it_covers_and_never_goes_back() {
        let mut ledger = Ledger::default();
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
    fn a_ledger_survives_its_serialization_exactly() {
        let mut ledger = Ledger::default();
        ledger.push(&[record(4, 0), record(4, 1)]);
        ledger.acknowledge(2);
        let bytes = postcard::to_allocvec(&ledger).unwrap();
        let back: Ledger = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, ledger);
    }
}

//! What a replica does besides applying entries: it derives every committed
//! command's events into the ledger (outbox.rs) when a sink wants them, and
//! while it leads it runs the group's side effects: the Kafka publisher and
//! the PostgreSQL snapshotter (design 7: side effects on the leader only).
//!
//! ```text
//! writer thread (every replica)          leading only
//! ────────────────────────────          ────────────
//! apply ─► events ─► ledger (shared) ──► publisher ─► broker ─► OUTBOX_ACKED(S)
//!                       │                                          (proposed)
//!                       └─► snapshotter's history ─► PostgreSQL ─► HISTORY_WRITTEN(S)
//! state ─► changed rows (tracked while leading) ─► snapshotter ─┘
//! ```
//!
//! * Publisher: started from the replicated watermark with the ledger's
//!   pending records, then handed each applied entry's records.
//! * Snapshotter: the single node's own (`crate::snapshot`), started with a
//!   full first delta (a new leader does not know what its predecessor
//!   wrote), recording its raft term in `snapshot_meta` (a deposed leader's
//!   write of an older term is refused by the table), its history's events
//!   read from the ledger instead of re-derived from a WAL.
//! * Leadership lost: both stop on threads of their own (the writer never
//!   waits for a broker or a database), tracking of changed rows stops.
//!
//! Costs: a full snapshot copy on the writer thread when a replica starts
//! leading (the same copy a single node makes for its first snapshot), and
//! a lock of the ledger per applied batch and per history chunk read.

use super::outbox::{self, Control, Ledger, Publishing, Sinks, ACK_INTERVAL};
use crate::config::KafkaConfig;
use crate::egress::OutboxRecord;
use crate::metrics::Metrics;
use crate::snapshot::{DerivedEvents, HistorySource, SnapshotConfig, Snapshotter};
use crate::state_machine::State;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `snapshot_meta.log_id` of a replica group's snapshots: no single node's
/// WAL continues them (one refuses to start in front of them).
pub const GROUP_LOG_ID: &str = "replica-group";

/// A publisher that failed to start is started again after this.
const PUBLISHER_RETRY: Duration = Duration::from_secs(1);

/// The ledger, shared by the writer (which appends and trims) and the
/// snapshotter's history (which reads).
#[derive(Clone)]
struct SharedLedger(Arc<Mutex<Ledger>>);

impl SharedLedger {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DerivedEvents for SharedLedger {
    fn read(&self, from: u64, through: u64, out: &mut Vec<OutboxRecord>) -> Result<(), String> {
        let first = self.lock().read(from, through, out)?;
        if first > from + 1 {
            tracing::warn!(
                from = from + 1,
                first,
                "history: the events before sequence {first} were never collected (the group ran \
                 without Kafka or history before); account_events holds them from there on"
            );
        }
        Ok(())
    }
}

/// The leader's snapshotter, and what it was last offered.
struct Snapshotting {
    snapshotter: Snapshotter,
    config: SnapshotConfig,
    offered_at: u64,
    last_offer: Instant,
    /// The history watermark last proposed, and when.
    proposed: u64,
    proposed_at: Instant,
}

pub(super) struct Duties {
    kafka: Option<KafkaConfig>,
    snapshot: Option<SnapshotConfig>,
    data_dir: PathBuf,
    sinks: Sinks,
    /// With a sink: the ledger.
    ledger: Option<SharedLedger>,
    /// Records of the commands being applied, not yet in the ledger.
    fresh: Vec<OutboxRecord>,
    /// What the publisher has yet to be handed.
    to_publish: Vec<OutboxRecord>,
    publishing: Option<Publishing>,
    publisher_retry_at: Option<Instant>,
    snapshotting: Option<Snapshotting>,
    /// `--replica-ledger-records-max`.
    ledger_records_max: usize,
    metrics: Arc<Metrics>,
}

impl Duties {
    pub(super) fn new(
        kafka: Option<KafkaConfig>,
        snapshot: Option<SnapshotConfig>,
        data_dir: PathBuf,
        ledger_records_max: usize,
        metrics: Arc<Metrics>,
    ) -> Duties {
        let sinks = sinks(kafka.is_some(), snapshot.as_ref());
        Duties {
            ledger: sinks
                .any()
                .then(|| SharedLedger(Arc::new(Mutex::new(Ledger::default().with_sinks(sinks))))),
            kafka,
            snapshot,
            data_dir,
            sinks,
            fresh: Vec::new(),
            to_publish: Vec::new(),
            publishing: None,
            publisher_retry_at: None,
            snapshotting: None,
            ledger_records_max,
            metrics,
        }
    }

    /// Which sinks want derived events (the snapshot shadow keeps its ledger
    /// for the same ones).
    pub(super) fn sinks(&self) -> Sinks {
        self.sinks
    }

    /// Whether batches must follow their origin's proposal order (with a
    /// ledger: Kafka offsets depend on it).
    pub(super) fn orders_proposals(&self) -> bool {
        self.ledger.is_some()
    }

    /// Whether a committed batch is applied (the ledger's proposal order;
    /// always without a ledger).
    pub(super) fn admit(&self, batch: &super::Batch) -> bool {
        self.ledger
            .as_ref()
            .is_none_or(|l| l.lock().admit_batch(batch))
    }

    /// The ledger holds its most: the leader takes no write until a sink
    /// catches up (the records of the writes already taken still go in).
    pub(super) fn ledger_full(&self) -> bool {
        self.ledger
            .as_ref()
            .is_some_and(|l| l.lock().len() >= self.ledger_records_max)
    }

    /// Where `apply` puts a command's events (none without a sink).
    pub(super) fn events(&mut self) -> Option<&mut Vec<OutboxRecord>> {
        self.ledger.is_some().then_some(&mut self.fresh)
    }

    /// Moves what was just derived into the ledger (and the publisher's
    /// queue). Before a control record applies: it may cover them.
    fn absorb(&mut self) {
        if self.fresh.is_empty() {
            return;
        }
        if let Some(ledger) = &self.ledger {
            ledger.lock().push(&self.fresh);
        }
        if self.publishing.is_some() {
            self.to_publish.extend_from_slice(&self.fresh);
        }
        self.fresh.clear();
    }

    /// A control record of a committed entry.
    pub(super) fn control(&mut self, control: Control) {
        self.absorb();
        if let Some(ledger) = &self.ledger {
            ledger.lock().apply_control(control);
        }
    }

    /// The entries of one apply are in: their records go to the ledger and
    /// the publisher (as of `last_sequence`).
    pub(super) fn applied(&mut self, last_sequence: u64) {
        self.absorb();
        if let Some(publishing) = &self.publishing {
            // Also without records: the watermark moves through quiet stretches.
            publishing.hand(last_sequence, std::mem::take(&mut self.to_publish));
        }
        if let Some(ledger) = &self.ledger {
            self.metrics
                .kafka
                .outbox_ledger_records
                .set(ledger.lock().len() as i64);
        }
    }

    /// The state was replaced by a snapshot's, with its ledger.
    pub(super) fn install(&mut self, ledger: Ledger, state: &mut State) {
        if let Some(shared) = &self.ledger {
            *shared.lock() = ledger.with_sinks(self.sinks);
        }
        self.fresh.clear();
        self.to_publish.clear();
        // Started again from the new state at the next turn, if still leading.
        self.stop(state);
    }

    /// Starts or stops the leader's side effects as leadership comes and
    /// goes; while leading, offers snapshots. Returns the control records to
    /// propose (acknowledgements); `room`: whether a proposal may be made.
    pub(super) fn follow(
        &mut self,
        leading: Option<u64>,
        room: bool,
        state: &mut State,
    ) -> Vec<Vec<u8>> {
        let Some(term) = leading else {
            self.stop(state);
            return Vec::new();
        };
        let mut proposals = Vec::new();
        self.follow_publisher(state.last_sequence(), room, &mut proposals);
        self.follow_snapshotter(term, room, state, &mut proposals);
        proposals
    }

    fn follow_publisher(&mut self, last_sequence: u64, room: bool, proposals: &mut Vec<Vec<u8>>) {
        let (Some(kafka), Some(ledger)) = (&self.kafka, &self.ledger) else {
            return;
        };
        match &mut self.publishing {
            Some(publishing) if room => {
                if let Some(through) = publishing.acknowledgement_due(&ledger.lock()) {
                    proposals.push(outbox::encode_acked(through));
                }
            }
            Some(_) => {}
            None => {
                if self
                    .publisher_retry_at
                    .is_some_and(|at| at > Instant::now())
                {
                    return;
                }
                let started = Publishing::start(
                    kafka,
                    &self.data_dir,
                    self.metrics.clone(),
                    &ledger.lock(),
                    last_sequence,
                );
                match started {
                    Ok(p) => {
                        self.publishing = Some(p);
                        self.publisher_retry_at = None;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "outbox publisher did not start; retrying");
                        self.publisher_retry_at = Some(Instant::now() + PUBLISHER_RETRY);
                    }
                }
            }
        }
    }

    fn follow_snapshotter(
        &mut self,
        term: u64,
        room: bool,
        state: &mut State,
        proposals: &mut Vec<Vec<u8>>,
    ) {
        let Some(config) = &self.snapshot else {
            return;
        };
        let Some(s) = &mut self.snapshotting else {
            // What the tables hold is the predecessor's: the first delta
            // replaces it.
            state.track_changes(true);
            let config = SnapshotConfig {
                term: Some(term),
                log_id: GROUP_LOG_ID.into(),
                ..config.clone()
            };
            let history = match &self.ledger {
                Some(ledger) => HistorySource::Derived(Box::new(ledger.clone())),
                None => HistorySource::Derived(Box::new(NoEvents)),
            };
            tracing::info!(
                term,
                "leading: PostgreSQL snapshots start (a full one first)"
            );
            self.snapshotting = Some(Snapshotting {
                snapshotter: Snapshotter::start(
                    config.clone(),
                    self.metrics.clone(),
                    None,
                    0,
                    history,
                ),
                config,
                offered_at: 0,
                last_offer: Instant::now(),
                proposed: 0,
                proposed_at: Instant::now(),
            });
            return;
        };
        self.metrics
            .snapshot_age_seconds
            .set(s.snapshotter.age().as_secs_f64());
        let sequence = state.last_sequence();
        let due = s.last_offer.elapsed() >= Duration::from_millis(s.config.interval_ms)
            || sequence - s.offered_at >= s.config.every_records;
        if due && sequence > s.offered_at && !s.snapshotter.is_busy() {
            s.last_offer = Instant::now();
            s.offered_at = sequence;
            let copying = Instant::now();
            let delta = state.take_delta();
            self.metrics
                .snapshot_copy_seconds
                .observe(copying.elapsed().as_secs_f64());
            self.metrics.snapshot_deltas_total.inc();
            s.snapshotter.offer(delta);
        }
        let Some(ledger) = &self.ledger else {
            return;
        };
        let durable = s.snapshotter.durable_sequence();
        let known = ledger.lock().history_through().max(s.proposed);
        if self.sinks.history && room && durable > known && s.proposed_at.elapsed() >= ACK_INTERVAL
        {
            s.proposed = durable;
            s.proposed_at = Instant::now();
            proposals.push(outbox::encode_history_written(durable));
        }
    }

    /// Not leading (or stopping): the publisher and the snapshotter stop on
    /// threads of their own; changed rows are no longer tracked.
    pub(super) fn stop(&mut self, state: &mut State) {
        if let Some(publishing) = self.publishing.take() {
            tracing::info!("not leading: outbox publisher stops");
            publishing.stop();
        }
        self.to_publish.clear();
        if let Some(s) = self.snapshotting.take() {
            tracing::info!("not leading: PostgreSQL snapshots stop");
            state.untrack_changes();
            // Its drop makes one last attempt at what waits and joins.
            let stopped = std::thread::Builder::new()
                .name("snapshotter-stop".into())
                .spawn(move || drop(s));
            if let Err(e) = stopped {
                tracing::error!(error = %e, "snapshotter not stopped");
            }
        }
    }
}

/// Which sinks want derived events: the broker (Kafka on), and the read
/// model's history (PostgreSQL with history).
fn sinks(kafka: bool, snapshot: Option<&SnapshotConfig>) -> Sinks {
    Sinks {
        outbox: kafka,
        history: snapshot.is_some_and(|s| s.history),
    }
}

/// History off: no events are asked for.
struct NoEvents;

impl DerivedEvents for NoEvents {
    fn read(&self, _: u64, _: u64, _: &mut Vec<OutboxRecord>) -> Result<(), String> {
        Ok(())
    }
}

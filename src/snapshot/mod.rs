//! PostgreSQL snapshots: the read model, and a fast restart.
//!
//! Every `--snapshot-interval-ms` the engine hands the rows changed since the
//! last snapshot ([`Delta`], consistent at one sequence) to the snapshotter
//! thread, which writes them in ONE transaction together with
//! `snapshot_meta.sequence`. Start-up loads the newest snapshot and replays only
//! the WAL records after it. PostgreSQL being down or slow never touches the
//! hot path: one delta at most waits (the engine takes the next once it is
//! written) and the write retries with back-off.
//! Once a snapshot is durable, WAL segments wholly below it (and below the
//! Kafka outbox's watermark) are deleted by the writer.
//!
//! With Kafka on, a snapshot commits only once the outbox watermark has reached
//! its sequence: after a restart, the events between the watermark and the
//! snapshot could no longer be derived from the WAL.
//!
//! Tables use the proto's names and enum names without prefix (`'ACTIVE'`,
//! `'CASH'`, `'OPEN'`); amounts are `NUMERIC`. They double as the read model.

mod database;
mod history;
mod key_batch;
mod schema;
mod store;

pub use history::{
    print as print_history, DerivedEvents, HistoryArgs, HistoryFormat, HistorySource,
};
pub use store::{load, set_log_id, within, SnapshotError, Written};

/// How long a failed write or start-up load waits at most before retrying.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

use crate::metrics::Metrics;
use crate::state_machine::Delta;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    pub url: String,
    /// Time between two deltas handed to the snapshotter.
    pub interval_ms: u64,
    /// A delta is also handed over once this many records were journaled
    /// since the previous one, whichever comes first.
    pub every_records: u64,
    /// An empty data directory in front of a snapshot starts from the snapshot
    /// alone (`--restore-from-snapshot`): what came after it is lost.
    pub restore_from_snapshot: bool,
    /// The WAL's identity, recorded in `snapshot_meta` (set by the engine once
    /// the log is open).
    pub log_id: String,
    /// Longest a statement of a snapshot write, or the start-up load, may
    /// take before it is abandoned (and retried).
    pub timeout: Duration,
    /// Write every account event to `account_events` with the snapshots.
    pub history: bool,
    /// A replica group's leader: its raft term, recorded in `snapshot_meta`;
    /// a snapshot of an older term than the table's is refused (a deposed
    /// leader never overwrites its successor's).
    pub term: Option<u64>,
}

impl SnapshotConfig {
    pub fn new(url: impl Into<String>) -> SnapshotConfig {
        SnapshotConfig {
            url: url.into(),
            interval_ms: 1_000,
            every_records: 500_000,
            restore_from_snapshot: false,
            log_id: String::new(),
            timeout: Duration::from_secs(30),
            history: true,
            term: None,
        }
    }
}

/// The engine's side of the snapshotter.
pub struct Snapshotter {
    deltas: Sender<Delta>,
    /// A delta is waiting or being written. The engine hands over the next
    /// one only once this clears: while PostgreSQL is down, changes pile up
    /// as ids in the dirty sets, not as copies of rows.
    busy: Arc<AtomicBool>,
    /// Sequence of the newest durable snapshot (0: none yet).
    durable: Arc<AtomicU64>,
    /// Set on drop: the thread makes a last attempt at what waits, then ends.
    stop: Arc<AtomicBool>,
    /// Unix ms of the last durable snapshot (or of the start).
    last_success_ms: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Snapshotter {
    /// Starts the thread. `watermark`, when Kafka is on, gates each commit.
    /// `journal`: where the history's events come from.
    pub fn start(
        config: SnapshotConfig,
        metrics: Arc<Metrics>,
        watermark: Option<Arc<AtomicU64>>,
        durable_at_start: u64,
        journal: HistorySource,
    ) -> Snapshotter {
        let (deltas, rx) = crossbeam_channel::unbounded();
        let durable = Arc::new(AtomicU64::new(durable_at_start));
        let busy = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let last_success_ms = Arc::new(AtomicU64::new(crate::engine::now_ms() as u64));
        let shared = Shared {
            durable: durable.clone(),
            busy: busy.clone(),
            stop: stop.clone(),
            last_success_ms: last_success_ms.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("snapshotter".into())
            .spawn(move || run(config, rx, metrics, watermark, shared, journal))
            .ok();
        Snapshotter {
            deltas,
            busy,
            stop,
            durable,
            last_success_ms,
            thread,
        }
    }

    /// Whether the previous delta is still waiting or being written.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Hands a delta over; never blocks.
    pub fn offer(&self, delta: Delta) {
        self.busy.store(true, Ordering::Release);
        let _ = self.deltas.send(delta);
    }

    pub fn durable_sequence(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Time since the last durable snapshot (or the start): it keeps rising
    /// while PostgreSQL is down, slow or hung.
    pub fn age(&self) -> Duration {
        let last = self.last_success_ms.load(Ordering::Acquire) as i64;
        Duration::from_millis((crate::engine::now_ms() - last).max(0) as u64)
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Closing the channel wakes an idle thread.
        let (dead, _) = crossbeam_channel::unbounded();
        self.deltas = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's side of the flags it shares with [`Snapshotter`].
struct Shared {
    durable: Arc<AtomicU64>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    last_success_ms: Arc<AtomicU64>,
}

/// The first retry of a failed write, and how often a snapshot waiting for
/// the outbox looks again.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// How often an idle snapshotter looks whether it is asked to stop.
const IDLE_WAKE: Duration = Duration::from_millis(500);

fn run(
    config: SnapshotConfig,
    rx: Receiver<Delta>,
    metrics: Arc<Metrics>,
    watermark: Option<Arc<AtomicU64>>,
    shared: Shared,
    journal: HistorySource,
) {
    let mut history = config.history.then(|| history::History::new(journal));
    crate::engine::yield_to_the_writer("snapshotter");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "snapshotter runtime");
            return;
        }
    };
    let mut pending: Option<Delta> = None;
    let mut backoff = RETRY_MIN;
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        // The engine hands over the next delta only once this one is written
        // (`busy`), so one is received only when none waits.
        if pending.is_none() {
            match rx.recv_timeout(IDLE_WAKE) {
                Ok(delta) => pending = Some(delta),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let Some(delta) = &pending else {
            continue;
        };
        let published = watermark.as_ref().map(|w| w.load(Ordering::Acquire));
        // Ahead of what the outbox has published: wait for it, no back-off.
        let wait = if published.is_some_and(|w| w < delta.sequence) {
            RETRY_MIN
        } else {
            let started = Instant::now();
            let write = store::write(&config, &mut client, delta, published, history.as_mut());
            match runtime.block_on(write) {
                Ok(written) => {
                    metrics.snapshot_history_events_total.inc_by(written.events);
                    shared.durable.store(delta.sequence, Ordering::Release);
                    metrics.snapshot_sequence.set(delta.sequence as i64);
                    metrics
                        .snapshot_seconds
                        .observe(started.elapsed().as_secs_f64());
                    shared
                        .last_success_ms
                        .store(crate::engine::now_ms() as u64, Ordering::Release);
                    pending = None;
                    shared.busy.store(false, Ordering::Release);
                    backoff = RETRY_MIN;
                    continue;
                }
                Err(e) => {
                    client = None;
                    metrics.snapshot_failures_total.inc();
                    tracing::warn!(
                        error = %e,
                        retry_ms = backoff.as_millis() as u64,
                        "snapshot failed; retrying (the WAL keeps everything meanwhile)"
                    );
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep(wait);
    }
}

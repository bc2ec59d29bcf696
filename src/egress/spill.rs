//! The outbox's bounded window: at most about [`Window::capacity`] records in
//! memory, whatever the broker outage; what lies beyond is re-derived from the
//! WAL when there is room again.
//!
//! ```text
//! writer (Collector)             feed               publisher (Intake)
//! ──────────────────             ────               ──────────────────
//! hand_off ── window full? ──► Batch, Batch, Spill{from F} ─► takes the batches,
//!   no:  next batch                                           then the spill's own
//!   yes: start the re-deriver,                                bounded channel:
//!        stop collecting                                        re-derived F, F+1, ...
//!        (apply with no events)                               (only while it holds
//!                                                              less than the window)
//!
//! re-deriver thread: builds its own state at F-1 the way a restart does (the
//! newest PostgreSQL snapshot, or nothing, then the WAL up to F-1, applied
//! without events), then applies the WAL's synced records F.. with the
//! outbox's own `collect` (same ids, same amounts); once caught up with the
//! writer, and the publisher holds less than half the window, it asks to
//! resume; the writer then collects again from its next
//! batch (`live_from`), and the re-deriver stops just before it.
//! ```
//!
//! Nothing is lost or doubled at either seam: the feed is in order, the spill
//! starts where the last collected batch ended, and the live feed resumes where
//! the re-deriver stops. A restart during an outage spills the same way while
//! it replays, so it never holds the whole backlog either.
//!
//! The cost of a spill: a second state, held by the re-deriver while it runs,
//! and built on its own thread: the writer only starts a thread. (A copy of
//! the writer's state would be simpler, but it stalls the writer for the copy:
//! 360 ms for 10,000 accounts and a million idempotency keys, BENCHMARKS.md.)
//! The snapshot is at or below the outbox watermark, so below F; should
//! retention delete records the re-deriver still needs (a newer snapshot came
//! meanwhile), it starts its base again.

use super::outbox::{apply_basket, apply_command, OutboxBatch, OutboxRecord};
use crate::engine::codec::{self, Record};
use crate::snapshot::SnapshotConfig;
use crate::state_machine::State;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default of `--outbox-window-records`.
pub const WINDOW_RECORDS_DEFAULT: usize = 200_000;
/// Journal records the re-deriver reads per batch it hands over.
const REDERIVE_CHUNK: u64 = 1_024;
/// Re-derived batches waiting for the publisher.
const REDERIVE_BATCHES_IN_FLIGHT: usize = 2;
/// How often a caught-up re-deriver looks for newly synced records.
const CAUGHT_UP_POLL: Duration = Duration::from_millis(10);
const ERROR_RETRY: Duration = Duration::from_secs(1);

/// How many records the outbox holds in memory, shared by the writer (which
/// spills when it is over the capacity) and the publisher.
#[derive(Debug)]
pub struct Window {
    capacity: usize,
    /// Records handed to the feed and not yet taken by the publisher.
    in_feed: AtomicUsize,
    /// Records the publisher holds and the broker has not acknowledged.
    in_pending: AtomicUsize,
    spills: AtomicU64,
}

impl Window {
    pub fn new(capacity: usize) -> Arc<Window> {
        Arc::new(Window {
            capacity: capacity.max(1),
            in_feed: AtomicUsize::new(0),
            in_pending: AtomicUsize::new(0),
            spills: AtomicU64::new(0),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records in memory: in the feed and unacknowledged in the publisher.
    pub fn held(&self) -> usize {
        self.in_feed.load(Ordering::Acquire) + self.in_pending.load(Ordering::Acquire)
    }

    /// Times the writer stopped collecting because the window was full.
    pub fn spills(&self) -> u64 {
        self.spills.load(Ordering::Relaxed)
    }

    pub(super) fn spilled(&self) {
        self.spills.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn fed(&self, records: usize) {
        self.in_feed.fetch_add(records, Ordering::AcqRel);
    }

    /// The publisher's count of unacknowledged records.
    pub fn set_pending(&self, records: usize) {
        self.in_pending.store(records, Ordering::Release);
    }
}

/// What the writer hands to the publisher, in journal order.
#[derive(Debug)]
pub enum Handed {
    Batch(OutboxBatch),
    /// From `from` on, the records come from the spill's re-deriver until it
    /// ends; the feed then goes on with the live batches.
    Spill(Spill),
}

/// Between the writer and one re-deriver.
#[derive(Debug, Default)]
pub(super) struct Handshake {
    /// Writer: every command through this sequence is durable.
    synced: AtomicU64,
    /// Re-deriver: caught up with `synced`, collect live again.
    resume: AtomicBool,
    /// Writer: the first sequence it collects again (0: not yet).
    live_from: AtomicU64,
    /// The writer or the publisher is gone: stop.
    abandoned: AtomicBool,
}

impl Handshake {
    pub(super) fn synced(&self, through: u64) {
        self.synced.store(through, Ordering::Release);
    }

    /// Writer, after the hand-off of `through`: resumes collecting from the
    /// next command if the re-deriver asked. Returns whether it did.
    pub(super) fn resume_after(&self, through: u64) -> bool {
        if !self.resume.load(Ordering::Acquire) {
            return false;
        }
        self.live_from.store(through + 1, Ordering::Release);
        true
    }

    pub(super) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }
}

/// A spill's re-derived batches, in the feed at the place the writer stopped
/// collecting. Dropping it (the publisher is gone) stops its re-deriver.
#[derive(Debug)]
pub struct Spill {
    pub from: u64,
    batches: Receiver<OutboxBatch>,
    handshake: Arc<Handshake>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        self.handshake.abandon();
    }
}

/// Starts a re-deriver of the events from `from` on; the writer has synced
/// through `from - 1`. `snapshots`: where its base state comes from (none:
/// the WAL holds the whole history). Returns the spill to put in the feed and
/// the writer's end of the handshake.
pub(super) fn start(
    snapshots: Option<SnapshotConfig>,
    reader: wal::Reader,
    from: u64,
    window: Arc<Window>,
) -> std::io::Result<(Spill, Arc<Handshake>)> {
    let handshake = Arc::new(Handshake::default());
    handshake.synced(from - 1);
    let (tx, batches) = crossbeam_channel::bounded(REDERIVE_BATCHES_IN_FLIGHT);
    let rederiver = Rederiver {
        snapshots,
        state: State::default(),
        reader,
        next: from,
        handshake: handshake.clone(),
        tx,
        window,
        outcomes: Vec::new(),
    };
    std::thread::Builder::new()
        .name("outbox-rederive".into())
        .spawn(move || {
            crate::engine::yield_to_the_writer("outbox-rederive");
            rederiver.run()
        })?;
    Ok((
        Spill {
            from,
            batches,
            handshake: handshake.clone(),
        },
        handshake,
    ))
}

struct Rederiver {
    snapshots: Option<SnapshotConfig>,
    state: State,
    reader: wal::Reader,
    next: u64,
    handshake: Arc<Handshake>,
    tx: Sender<OutboxBatch>,
    window: Arc<Window>,
    outcomes: Vec<crate::state_machine::Outcome>,
}

impl Rederiver {
    fn run(mut self) {
        let started = Instant::now();
        let from = self.next;
        let mut last_error_log: Option<Instant> = None;
        loop {
            match self.base(from) {
                Ok(()) => break,
                Err(error) => {
                    if self.handshake.abandoned.load(Ordering::Acquire) {
                        return;
                    }
                    tracing::warn!(%error, from, "outbox: re-deriver's base state not built; retrying");
                    std::thread::sleep(ERROR_RETRY);
                }
            }
        }
        tracing::info!(
            from,
            seconds = started.elapsed().as_secs_f64(),
            "outbox: re-deriver's state built; deriving events from the WAL"
        );
        loop {
            let h = &self.handshake;
            let live_from = h.live_from.load(Ordering::Acquire);
            let end = match live_from {
                0 => h.synced.load(Ordering::Acquire),
                n => n - 1,
            };
            if self.next > end {
                if live_from != 0 {
                    break;
                }
                if h.abandoned.load(Ordering::Acquire) {
                    return;
                }
                // Live again only once the publisher took everything and
                // has room: otherwise the writer would spill again at once.
                if self.tx.is_empty() && self.window.held() < self.window.capacity / 2 {
                    h.resume.store(true, Ordering::Release);
                }
                std::thread::sleep(CAUGHT_UP_POLL);
                continue;
            }
            let through = end.min(self.next + REDERIVE_CHUNK - 1);
            let before = self.next;
            let mut records = Vec::new();
            let read = self.read(through, &mut records);
            let applied = self.state.last_sequence();
            self.next = applied + 1;
            if applied >= before {
                let batch = OutboxBatch {
                    through_sequence: applied,
                    records,
                };
                if self.tx.send(batch).is_err() {
                    return; // the publisher is gone; the WAL keeps everything
                }
            }
            if let Err(error) = read {
                if last_error_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    last_error_log = Some(Instant::now());
                    tracing::error!(%error, sequence = self.next,
                        "outbox: re-deriving events from the WAL failed; retrying (publishing waits here)");
                }
                std::thread::sleep(ERROR_RETRY);
            }
        }
        tracing::info!(
            from,
            through = self.next - 1,
            seconds = started.elapsed().as_secs_f64(),
            "outbox: events re-derived from the WAL; collecting live again"
        );
    }

    /// The state at `from - 1`: the newest snapshot (at or below the outbox
    /// watermark, so below `from`) or an empty state, then the WAL up to it.
    fn base(&mut self, from: u64) -> Result<(), RederiveError> {
        let rows = match &self.snapshots {
            Some(config) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| RederiveError::Base(e.to_string()))?;
                let load = crate::snapshot::load(&config.url);
                runtime
                    .block_on(crate::snapshot::within(config.timeout, load))
                    .map_err(|e| RederiveError::Base(e.to_string()))?
            }
            None => None,
        };
        self.state = match rows {
            Some(rows) if rows.sequence >= from => {
                return Err(RederiveError::Base(format!(
                    "snapshot at {} is past the spill at {from}",
                    rows.sequence
                )))
            }
            Some(rows) => State::restore(rows),
            None => State::default(),
        };
        self.apply(self.state.last_sequence() + 1, from - 1, None)?;
        self.next = from;
        Ok(())
    }

    /// Applies `next..=through`, collecting what they publish; stops at the
    /// first error (what was applied before it is kept).
    fn read(
        &mut self,
        through: u64,
        records: &mut Vec<OutboxRecord>,
    ) -> Result<u64, RederiveError> {
        self.apply(self.next, through, Some(records))
    }

    /// Applies the WAL's records `from..=through` to the state, collecting
    /// what they publish into `records` when given (else without events).
    fn apply(
        &mut self,
        from: u64,
        through: u64,
        mut records: Option<&mut Vec<OutboxRecord>>,
    ) -> Result<u64, RederiveError> {
        let (state, outcomes) = (&mut self.state, &mut self.outcomes);
        self.reader.read(from, through, |sequence, payload| {
            let (record, timestamp_ms) = codec::decode_record(payload)
                .map_err(|source| RederiveError::Decode { sequence, source })?;
            let records = records.as_deref_mut();
            match record {
                Record::Command(c) => {
                    apply_command(state, &c, sequence, timestamp_ms, records);
                }
                Record::Basket(items) => {
                    apply_basket(state, &items, sequence, timestamp_ms, records, outcomes)
                }
            }
            Ok(())
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum RederiveError {
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("base state: {0}")]
    Base(String),
    #[error("record {sequence}: {source}")]
    Decode {
        sequence: u64,
        source: codec::CodecError,
    },
}

/// The publisher's side of the feed: the writer's batches, and in place of a
/// spill, that spill's re-derived ones.
pub struct Intake {
    feed: Receiver<Handed>,
    spill: Option<Spill>,
    window: Arc<Window>,
}

/// The writer is gone and everything it handed over was taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Disconnected;

impl Intake {
    pub fn new(feed: Receiver<Handed>, window: Arc<Window>) -> Intake {
        Intake {
            feed,
            spill: None,
            window,
        }
    }

    /// The next batch, waiting at most `wait`. `holding`: records the caller
    /// holds unacknowledged; at the window's capacity a spill's batches wait
    /// in the WAL (the writer's own batches are taken whatever it holds: they
    /// are in memory already).
    pub fn next(
        &mut self,
        wait: Duration,
        holding: usize,
    ) -> Result<Option<OutboxBatch>, Disconnected> {
        self.window.set_pending(holding);
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(spill) = &self.spill {
                if holding >= self.window.capacity {
                    std::thread::sleep(left);
                    return Ok(None);
                }
                match spill.batches.recv_timeout(left) {
                    Ok(batch) => return Ok(Some(batch)),
                    Err(RecvTimeoutError::Timeout) => return Ok(None),
                    Err(RecvTimeoutError::Disconnected) => {
                        self.spill = None;
                        continue;
                    }
                }
            }
            match self.feed.recv_timeout(left) {
                Ok(Handed::Batch(batch)) => {
                    // Pending from now on (the caller's next `holding`
                    // includes it), so the window never reads low.
                    let n = batch.records.len();
                    self.window.in_pending.fetch_add(n, Ordering::AcqRel);
                    self.window.in_feed.fetch_sub(n, Ordering::AcqRel);
                    return Ok(Some(batch));
                }
                Ok(Handed::Spill(spill)) => {
                    tracing::info!(
                        from = spill.from,
                        window = self.window.capacity,
                        "outbox: taking re-derived events from here on"
                    );
                    self.spill = Some(spill);
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Err(Disconnected),
            }
        }
    }

    /// Whether the records now come from a spill.
    pub fn spilling(&self) -> bool {
        self.spill.is_some()
    }

    pub fn window(&self) -> &Arc<Window> {
        &self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README and `--outbox-window-records` state about 350 bytes a record.
    #[test]
    fn a_held_record_is_about_350_bytes() {
        let size = std::mem::size_of::<OutboxRecord>();
        eprintln!("OutboxRecord: {size} bytes");
        assert!((250..=400).contains(&size), "{size} bytes");
    }
}

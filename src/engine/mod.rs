//! The engine: the one thread that owns the state and the write-ahead log.
//!
//! Ingress threads (gRPC handlers, later Kafka consumers) turn validated input
//! into a [`Request`] and `try_send` it on a bounded crossbeam channel; a full
//! queue is an immediate [`SubmitError::Overloaded`] (gRPC `RESOURCE_EXHAUSTED`),
//! never a wait. The writer thread ([`writer`]) takes a batch, journals and
//! applies each command, makes the batch durable with one sync, and only then
//! releases the replies. Reads go through the same queue, so they see a
//! consistent, durable state and never race the writer.

pub mod codec;
mod recovery;
mod release;
mod retention;
pub mod view;
mod writer;

use crate::domain::{AccountId, Command, Id};
use crate::metrics::Metrics;
use crate::state_machine::{Prepared, StateConfig};
use crossbeam_channel::{Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};
use view::{AccountView, Outcome, ReservationView};

pub use recovery::{replay, replay_with_outbox};
pub use writer::Writer;
pub(crate) use writer::{command_reply, pin_to_last_core, query, yield_to_the_writer};

/// When a reply may leave relative to the sync of its journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Replies leave only after the batch's records are durable (default).
    Sync,
    /// Replies leave right after apply; the journal is synced at most
    /// [`ASYNC_SYNC_INTERVAL_MS`] later. A crash can lose the last few
    /// milliseconds of acknowledged commands.
    Async,
}

/// Longest time acknowledged-but-unsynced records may wait in `--durability async`.
pub const ASYNC_SYNC_INTERVAL_MS: u64 = 5;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub wal: wal::WalOptions,
    pub durability: Durability,
    /// Capacity of each ingress lane ([`Lane`]), in requests.
    pub queue_capacity: usize,
    /// Most requests taken into one batch (one sync).
    pub batch_size_max: usize,
    pub state: StateConfig,
    /// Pin the writer thread to the last core, where the OS allows it.
    pub pin_core: bool,
    /// Orders the state's tables get room for before serving (no resize below).
    pub capacity_orders: usize,
    /// Make that room on transparent huge pages (`--huge-pages`).
    pub huge_pages: bool,
    /// Where derived account events and dead letters go once durable (Kafka
    /// outbox); `None`: nobody listens and `apply` discards them.
    pub outbox: Option<crate::egress::OutboxSink>,
    /// PostgreSQL snapshots (`--postgres-url`); `None`: the WAL keeps everything.
    pub snapshot: Option<crate::snapshot::SnapshotConfig>,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<std::path::PathBuf>) -> EngineConfig {
        let mut wal = wal::WalOptions::new(data_dir.into().join("wal"));
        // A journal record is one encoded command, or an all-or-nothing basket.
        wal.record_size_max = codec::RECORD_LEN_MAX as u32;
        EngineConfig {
            wal,
            durability: Durability::Sync,
            queue_capacity: 65_536,
            batch_size_max: 4_096,
            state: StateConfig::default(),
            pin_core: true,
            capacity_orders: 0,
            huge_pages: false,
            outbox: None,
            snapshot: None,
        }
    }
}

/// What a command's reply carries besides the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Nothing,
    /// The command's reservation after it (Reserve, Unreserve).
    Reservation,
    /// The whole account after it (admin commands).
    Account,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    Account(AccountId),
    Reservation(AccountId, Id),
    /// The state's digest and sequence (replicas and restarts compare them).
    Digest,
    /// The last applied offset of every inbound Kafka partition the state has seen.
    Offsets,
}

#[derive(Debug)]
pub enum RequestKind {
    Command(Command, Want),
    /// Many commands in one queue entry (one wake-up, one sync): each is
    /// journaled, applied and answered exactly as if sent alone, in order.
    Batch(Vec<Command>, Want),
    /// An all-or-nothing basket of 1..=[`codec::BASKET_ITEMS_MAX`] Reserves:
    /// one journal record, so either all are applied or none (see
    /// [`crate::state_machine::State::apply_basket`]).
    Basket(Vec<crate::domain::Reserve>),
    Query(Query),
}

/// The [`Prepared`] of a request's commands, computed by the thread that
/// submits it (an ingress thread, in parallel with the others), so the
/// writer only prefetches and probes: hashing and fingerprinting a command
/// costs about a fifth of applying it.
#[derive(Debug, Default)]
pub enum Preparation {
    /// Not prepared: a query, a basket (its items are judged as a whole),
    /// or a request made without [`EngineHandle::submit`] (the writer
    /// prepares it).
    #[default]
    None,
    /// A [`RequestKind::Command`]'s.
    One(Prepared),
    /// A [`RequestKind::Batch`]'s, one per command, in order.
    Many(Vec<Prepared>),
}

impl Preparation {
    pub fn of(kind: &RequestKind) -> Preparation {
        match kind {
            RequestKind::Command(command, _) => Preparation::One(Prepared::of(command)),
            RequestKind::Batch(commands, _) => {
                Preparation::Many(commands.iter().map(Prepared::of).collect())
            }
            RequestKind::Basket(_) | RequestKind::Query(_) => Preparation::None,
        }
    }
}

/// One entry of the ingress queue.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestKind,
    /// Its commands' hashes and fingerprints (see [`Preparation`]).
    pub prepared: Preparation,
    pub reply: oneshot::Sender<Reply>,
    /// Stamped by the writer when traces are on and the request is traced.
    pub trace: Option<Arc<crate::telemetry::Trace>>,
}

#[derive(Clone, Debug)]
pub struct CommandReply {
    pub outcome: Outcome,
    pub reservation: Option<ReservationView>,
    /// Read at the state of the command's batch (its `sequence` says which).
    pub account: Option<AccountView>,
}

// A reply moves once, through its oneshot: no allocation per command beats a
// smaller enum.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Reply {
    Command(CommandReply),
    /// One per command of a `Batch` or item of a `Basket`, in order.
    Batch(Vec<CommandReply>),
    Account(Option<AccountView>),
    Reservation(Option<ReservationView>),
    Digest {
        sequence: u64,
        digest: u64,
    },
    Offsets(Vec<(crate::domain::Topic, i32, i64)>),
    /// Not answered here: with replicas, this one does not lead (the leader's
    /// client address, when known), or the command was not committed.
    Refused(SubmitError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Replaying the WAL: requests are refused with `Unavailable`.
    Replaying,
    Serving,
    /// Stopped, or failed (the error is logged and returned by `join`).
    Stopped,
}

/// The engine's phase, readable without a lock on every submit (an atomic),
/// and awaitable (a watch channel) by the tasks that follow it.
pub struct PhaseCell {
    now: AtomicU8,
    changes: watch::Sender<Phase>,
}

impl PhaseCell {
    pub(crate) fn new() -> Arc<PhaseCell> {
        Arc::new(PhaseCell {
            now: AtomicU8::new(Phase::Replaying as u8),
            changes: watch::channel(Phase::Replaying).0,
        })
    }

    pub fn set(&self, phase: Phase) {
        self.now.store(phase as u8, Ordering::Release);
        self.changes.send_replace(phase);
    }

    fn get(&self) -> Phase {
        match self.now.load(Ordering::Acquire) {
            0 => Phase::Replaying,
            1 => Phase::Serving,
            _ => Phase::Stopped,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the ingress queue is full")]
    Overloaded,
    #[error("replaying the write-ahead log")]
    NotReady,
    #[error("the engine has stopped")]
    Stopped,
    /// With replicas: this replica does not lead (or lost its quorum); the
    /// leader's client address when one is known.
    #[error("this replica is not the leader")]
    NotLeader(Option<String>),
    /// With replicas: proposed, but not known to be committed in time (the
    /// leader lost its quorum or its leadership). It may still be applied.
    #[error("the command was not committed in time")]
    NotCommitted,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("write-ahead log: {0}")]
    Wal(#[from] wal::WalError),
    #[error("journal record {sequence}: {source}")]
    Decode {
        sequence: u64,
        source: codec::CodecError,
    },
    #[error("the write-ahead log starts at sequence {first} but the state is at {state}: records are missing")]
    MissingRecords { first: u64, state: u64 },
    #[error("the write-ahead log ends at sequence {last} but the snapshot is at {state}: the data directory is older than the snapshot")]
    WalBehindState { last: u64, state: u64 },
    #[error("the write-ahead log in {dir} is empty but PostgreSQL holds a snapshot at sequence {sequence} (log {theirs}): \
             the data directory was lost or is not this deployment's. Starting would drop everything journaled after the \
             snapshot and reuse its sequence numbers. Point --data-dir at the right directory, or accept the loss and \
             start from the snapshot alone with --restore-from-snapshot")]
    WalMissing {
        dir: std::path::PathBuf,
        sequence: u64,
        theirs: String,
    },
    #[error("the write-ahead log in {dir} is log {ours}, but PostgreSQL's snapshot was taken from log {theirs}: \
             the data directory and the database belong to different deployments. Point --data-dir and \
             --postgres-url at a matching pair; to start from this snapshot alone instead (losing this WAL), \
             move {dir} away and start with --restore-from-snapshot")]
    ForeignWal {
        dir: std::path::PathBuf,
        ours: String,
        theirs: String,
    },
    #[error("loading the snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("engine thread: {0}")]
    Thread(String),
}

/// The ingress queue a handle submits to. Each lane is bounded on its own,
/// so a Kafka backlog that fills the feeds lane to the brim never refuses a
/// client's Reserve (`RESOURCE_EXHAUSTED`), and the writer takes client
/// requests first, feeds at most [`FEED_SHARE`] of each batch (see the
/// writer's `take_batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// gRPC callers.
    Clients,
    /// The Kafka consumer (fills, deposits, withdrawals).
    Feeds,
}

/// A batch holds at most `batch_size_max / FEED_SHARE` requests of the feeds
/// lane: a batch a client request waits behind stays short, and a backlog
/// still drains hundreds of records per sync.
pub const FEED_SHARE: usize = 4;

/// The ingress side of the engine: cheap to clone, one per ingress task.
#[derive(Clone)]
pub struct EngineHandle {
    clients: Sender<Request>,
    feeds: Sender<Request>,
    lane: Lane,
    phase: Arc<PhaseCell>,
    stop: Arc<AtomicBool>,
    /// With replicas: requests are taken only while this replica leads.
    leadership: Option<Arc<crate::replica::Leadership>>,
}

impl EngineHandle {
    /// A handle on lanes another writer reads (the replica's).
    pub(crate) fn new(
        clients: Sender<Request>,
        feeds: Sender<Request>,
        phase: Arc<PhaseCell>,
        stop: Arc<AtomicBool>,
        leadership: Option<Arc<crate::replica::Leadership>>,
    ) -> EngineHandle {
        EngineHandle {
            clients,
            feeds,
            lane: Lane::Clients,
            phase,
            stop,
            leadership,
        }
    }

    /// Queues a request; never blocks. Traced when the RPC handled on this
    /// task is (see [`crate::telemetry::current`]).
    pub fn submit(&self, kind: RequestKind) -> Result<oneshot::Receiver<Reply>, SubmitError> {
        self.submit_traced(kind, crate::telemetry::current())
    }

    /// [`EngineHandle::submit`] with an explicit trace (the Kafka consumer's).
    pub fn submit_traced(
        &self,
        kind: RequestKind,
        trace: Option<Arc<crate::telemetry::Trace>>,
    ) -> Result<oneshot::Receiver<Reply>, SubmitError> {
        match self.phase.get() {
            Phase::Serving => {}
            Phase::Replaying => return Err(SubmitError::NotReady),
            Phase::Stopped => return Err(SubmitError::Stopped),
        }
        if let Some(leadership) = &self.leadership {
            // A replica's own digest is read anywhere (replicas compare them).
            let local = matches!(kind, RequestKind::Query(Query::Digest));
            if !local && !leadership.is_serving() {
                return Err(SubmitError::NotLeader(leadership.leader()));
            }
        }
        if let Some(trace) = &trace {
            trace.submitted();
        }
        let (reply, rx) = oneshot::channel();
        let prepared = Preparation::of(&kind);
        let request = Request {
            kind,
            prepared,
            reply,
            trace,
        };
        match self.tx().try_send(request) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// Queues a request and waits for its (durable) reply.
    pub async fn call(&self, kind: RequestKind) -> Result<Reply, SubmitError> {
        settle(self.submit(kind)?.await)
    }

    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.changes.subscribe()
    }

    /// The same engine, submitting to `lane`.
    pub fn on_lane(&self, lane: Lane) -> EngineHandle {
        EngineHandle {
            lane,
            ..self.clone()
        }
    }

    fn tx(&self) -> &Sender<Request> {
        match self.lane {
            Lane::Clients => &self.clients,
            Lane::Feeds => &self.feeds,
        }
    }

    /// Requests waiting in this handle's lane.
    pub fn queue_len(&self) -> usize {
        self.tx().len()
    }

    /// Room of this handle's lane.
    pub fn queue_capacity(&self) -> usize {
        self.tx().capacity().unwrap_or(usize::MAX)
    }

    /// Whether this is a replica's writer: an accepted request may still be
    /// refused after it was queued (leadership lost, not committed in time).
    pub fn is_replica(&self) -> bool {
        self.leadership.is_some()
    }

    /// Whether requests are taken here now: always on a single node; on a
    /// replica, while it leads with its quorum.
    pub fn leads(&self) -> bool {
        self.leadership.as_ref().is_none_or(|l| l.is_serving())
    }
}

/// What a reply channel delivered: the reply, or why there is none (the
/// writer stopped; a replica refused after queueing).
pub fn settle(received: Result<Reply, oneshot::error::RecvError>) -> Result<Reply, SubmitError> {
    match received {
        Ok(Reply::Refused(e)) => Err(e),
        Ok(reply) => Ok(reply),
        Err(_) => Err(SubmitError::Stopped),
    }
}

/// The running engine thread.
pub struct Engine {
    handle: EngineHandle,
    /// Wakes an idle writer (it sleeps until its next deadline) for a stop.
    wake: Sender<()>,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
}

impl Engine {
    /// Starts the writer thread: it opens the WAL, replays it (phase
    /// `Replaying`), then serves (phase `Serving`).
    pub fn start(config: EngineConfig, metrics: Arc<Metrics>) -> Result<Engine, EngineError> {
        assert!(config.queue_capacity > 0 && config.batch_size_max > 0);
        // One bound per lane: the feeds lane cannot take the clients' room.
        let (clients, clients_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (feeds, feeds_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        let phase = PhaseCell::new();
        let phase_tx = phase.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // A panic (a broken invariant, a bad configuration) stops the
                // engine like an error: callers waiting for a phase see
                // `Stopped` instead of waiting forever.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Writer::open(config, [clients_rx, feeds_rx], wake_rx, metrics, thread_stop)
                        .and_then(|writer| writer.run(&phase_tx))
                }))
                .unwrap_or_else(|_| Err(EngineError::Thread("engine thread panicked".into())));
                match &result {
                    // Never retried: after a failed fdatasync the page cache may
                    // hold pages the disk lost, so only a restart, which reads
                    // the disk, knows what is durable.
                    Err(e @ EngineError::Wal(_)) => tracing::error!(
                        error = %e,
                        "write-ahead log I/O failed: nothing more is acknowledged, in-flight calls \
                         get UNAVAILABLE and the process exits; the next start recovers from the disk"
                    ),
                    Err(e) => tracing::error!(error = %e, "engine stopped on error"),
                    Ok(()) => {}
                }
                phase_tx.set(Phase::Stopped);
                result
            })
            .map_err(|e| EngineError::Thread(e.to_string()))?;
        Ok(Engine {
            handle: EngineHandle {
                clients,
                feeds,
                lane: Lane::Clients,
                phase,
                stop,
                leadership: None,
            },
            wake,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Asks the writer to finish what is queued, sync and exit.
    pub fn request_stop(&self) {
        self.handle.stop.store(true, Ordering::Release);
        // Full: a wake-up is already pending.
        let _ = self.wake.try_send(());
    }

    /// Stops the writer (draining the queue) and waits for it.
    pub fn stop(mut self) -> Result<(), EngineError> {
        self.request_stop();
        self.join_thread()
    }

    fn join_thread(&mut self) -> Result<(), EngineError> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| EngineError::Thread("engine thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.request_stop();
        let _ = self.join_thread();
    }
}

/// Wall-clock unix milliseconds: read by the engine once per batch and journaled.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

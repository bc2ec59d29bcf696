//! The writer thread's loop. Read `run_batch` top to bottom: it is the whole
//! pipeline, in order —
//!
//! 1. take a batch from the ingress queue (block for the first request, then
//!    whatever else is already queued, up to `batch_size_max`);
//! 2. for each command: stamp sequence and timestamp, append it to the WAL,
//!    apply it to the state, build its reply (held back);
//! 3. one sync for the whole batch (group commit);
//! 4. release the held replies — the only place a reply leaves the engine —
//!    and hand the batch's account events and dead letters to the outbox
//!    (in `Writer::sync`, so never before the records are durable).
//!
//! In `--durability async` step 4 comes before step 3 and the sync is spaced by
//! [`super::ASYNC_SYNC_INTERVAL_MS`].

use super::view::{AccountView, ReservationView};
use super::{
    codec, now_ms, CommandReply, Durability, EngineConfig, EngineError, Phase, PhaseCell,
    Preparation, Query, Reply, Request, RequestKind, Want,
};
use crate::domain::Command;
use crate::egress::Collector;
use crate::metrics::Metrics;
use crate::state_machine::{Lookahead, NoEvents, Outcome, Pages, Prepared, State, PREFETCH_AHEAD};
use crossbeam_channel::Receiver;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wal::Wal;

/// Longest the writer sleeps with nothing to do: it wakes for a request, a
/// stop, or its next deadline (an expiry or key to prune, the async sync, a
/// snapshot), so an idle service costs a wake-up a second, not 500.
const IDLE_MAX: Duration = Duration::from_secs(1);
/// With snapshots on: how often the writer looks whether one became durable
/// (WAL retention) or is due.
const SNAPSHOT_POLL: Duration = Duration::from_millis(50);
/// Least journaled time between two ticks.
const TICK_SPACING_MS: i64 = 10;

pub struct Writer {
    config: EngineConfig,
    /// The clients lane (gRPC).
    rx: Receiver<Request>,
    /// The feeds lane (Kafka): at most `batch_size_max / FEED_SHARE` per batch.
    feeds: Receiver<Request>,
    /// A stop request wakes the writer through this.
    wake: Receiver<()>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    state: State,
    wal: Wal,
    /// Reused encoding buffer: no allocation per command.
    record: Vec<u8>,
    /// Reused outcomes of a basket's items.
    basket_outcomes: Vec<Outcome>,
    batch: Vec<Request>,
    held: super::release::Held,
    /// The traced requests of the batch (empty unless traces are on).
    traced: Vec<Arc<crate::telemetry::Trace>>,
    /// The trace of the command being applied: its events carry it.
    trace: Option<crate::telemetry::TraceParent>,
    /// Sends the held replies of a synced batch (on its own thread when there are several).
    releaser: super::release::Releaser,
    last_tick_ms: i64,
    last_sync: Instant,
    /// Records appended since the last sync.
    unsynced: bool,
    /// Account events and dead letters of applied commands, held until synced.
    outbox: Option<Collector>,
    snapshotter: Option<crate::snapshot::Snapshotter>,
    last_snapshot: Instant,
    /// Sequence of the snapshot the WAL was last trimmed to.
    retained_from: u64,
    /// Sequence of the last delta handed to the snapshotter.
    snapshot_offered_at: u64,
    /// Deletes the WAL segments snapshots cover (with snapshots on).
    retention: Option<super::retention::Janitor>,
}

impl Writer {
    /// Opens the WAL. The state is rebuilt by [`Writer::run`], so start-up
    /// can report `Replaying` meanwhile.
    pub fn open(
        config: EngineConfig,
        [rx, feeds]: [Receiver<Request>; 2],
        wake: Receiver<()>,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Result<Writer, EngineError> {
        let wal = Wal::open(config.wal.clone())?;
        let batch_size_max = config.batch_size_max;
        let outbox = config
            .outbox
            .clone()
            .map(|sink| Collector::new(sink).with_snapshots(config.snapshot.clone()));
        Ok(Writer {
            outbox,
            snapshotter: None,
            last_snapshot: Instant::now(),
            retained_from: 0,
            snapshot_offered_at: 0,
            retention: None,
            // Replay starts from the fresh state's settings and applies the
            // journaled ones, never `config.state` (see `Writer::configure`).
            state: State::default(),
            config,
            rx,
            feeds,
            wake,
            metrics,
            stop,
            wal,
            record: Vec::with_capacity(codec::ENCODED_LEN_MAX),
            basket_outcomes: Vec::new(),
            batch: Vec::with_capacity(batch_size_max),
            held: Vec::with_capacity(batch_size_max),
            traced: Vec::new(),
            trace: None,
            releaser: super::release::Releaser::start(batch_size_max),
            last_tick_ms: 0,
            last_sync: Instant::now(),
            unsynced: false,
        })
    }

    /// Replays the journal, then serves until a stop is requested and the queue
    /// is drained. Every exit path syncs what was appended.
    pub fn run(mut self, phase: &PhaseCell) -> Result<(), EngineError> {
        self.recover()?;
        self.configure()?;
        if self.config.pin_core {
            pin_to_last_core();
        }
        phase.set(Phase::Serving);
        self.metrics.ready.set(1);
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let drained = self.run_batch()?;
            if stopping && drained {
                break;
            }
        }
        self.metrics.ready.set(0);
        self.sync()?;
        tracing::info!(
            sequence = self.state.last_sequence(),
            "engine stopped; journal synced"
        );
        Ok(())
    }

    fn recover(&mut self) -> Result<(), EngineError> {
        let started = Instant::now();
        if let Some(config) = self.config.snapshot.clone() {
            self.load_snapshot(config)?;
        }
        // Before the replay: it then fills tables that never grow.
        if self.config.capacity_orders > 0 {
            let sizing = Instant::now();
            let pages = Pages::huge_if(self.config.huge_pages);
            self.state
                .reserve_orders(self.config.capacity_orders, pages);
            tracing::info!(
                orders = self.config.capacity_orders,
                huge_pages = self.config.huge_pages,
                seconds = sizing.elapsed().as_secs_f64(),
                "tables sized"
            );
        }
        let records = super::replay_with_outbox(&self.wal, &mut self.state, self.outbox.as_mut())?;
        let elapsed = started.elapsed();
        self.metrics.replay_seconds.set(elapsed.as_secs_f64());
        self.metrics.replay_records.set(records as i64);
        self.publish_gauges();
        tracing::info!(
            records,
            sequence = self.state.last_sequence(),
            accounts = self.state.account_count(),
            seconds = elapsed.as_secs_f64(),
            log_id = %wal::format_log_id(self.wal.log_id()),
            "write-ahead log replayed"
        );
        Ok(())
    }

    /// Journals the configured [`crate::state_machine::StateConfig`] when it
    /// differs from the recovered state's (a fresh log has the default), so
    /// history keeps the settings it was decided with and the flags take
    /// effect from here on. Durable before the first request is served.
    fn configure(&mut self) -> Result<(), EngineError> {
        let wanted = self.config.state;
        let recovered = *self.state.config();
        if wanted == recovered {
            return Ok(());
        }
        let configure = Command::Configure(wanted);
        self.execute(&configure, &Prepared::of(&configure), now_ms())?;
        self.sync()?;
        tracing::info!(?recovered, configured = ?wanted, sequence = self.state.last_sequence(),
            "state machine settings journaled");
        debug_assert_eq!(*self.state.config(), wanted);
        Ok(())
    }

    /// Loads the newest snapshot (the WAL then replays only what follows it)
    /// and starts the snapshotter.
    ///
    /// PostgreSQL unreachable at start: when the WAL still holds the whole
    /// history (it starts at sequence 1) a full replay gives the same state, so
    /// the engine goes on and the snapshotter catches up later. Otherwise the
    /// snapshot is needed: the load retries with back-off, the service stays
    /// `NOT_SERVING`, until PostgreSQL answers or a stop is requested.
    fn load_snapshot(
        &mut self,
        config: crate::snapshot::SnapshotConfig,
    ) -> Result<(), EngineError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| EngineError::Thread(e.to_string()))?;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let rows = loop {
            let load = crate::snapshot::load(&config.url);
            match runtime.block_on(crate::snapshot::within(config.timeout, load)) {
                Ok(rows) => break rows,
                Err(e) if self.wal.first_sequence().is_some_and(|first| first == 1) => {
                    tracing::warn!(error = %e, "snapshot not loaded; the WAL holds the whole history, replaying all of it");
                    break None;
                }
                Err(e) if self.stop.load(Ordering::Acquire) => return Err(e.into()),
                Err(e) if !e.is_transient() => {
                    tracing::error!(error = %e,
                        "snapshot needed (the WAL starts after it) and PostgreSQL refused in a way \
                         retrying cannot fix (for a TLS refusal: check sslrootcert and the server's \
                         certificate in --postgres-url); stopping");
                    return Err(e.into());
                }
                Err(e) => {
                    self.metrics.snapshot_failures_total.inc();
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64,
                        "snapshot needed (the WAL starts after it) but PostgreSQL is unavailable; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(crate::snapshot::BACKOFF_MAX);
                }
            }
        };
        let mut config = config;
        config.log_id = wal::format_log_id(self.wal.log_id());
        if let Some(rows) = &rows {
            self.check_log_identity(&runtime, &config, rows)?;
        }
        let at = rows.as_ref().map_or(0, |r| r.sequence);
        if let Some(rows) = rows {
            self.state = State::restore(rows);
            tracing::info!(
                sequence = at,
                accounts = self.state.account_count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot loaded"
            );
        }
        // No snapshot loaded: the first delta replaces whatever the tables hold.
        self.state.track_changes(at == 0);
        let watermark = self.config.outbox.as_ref().map(|o| o.watermark_handle());
        self.retention = Some(super::retention::Janitor::start());
        self.snapshotter = Some(crate::snapshot::Snapshotter::start(
            config,
            self.metrics.clone(),
            watermark,
            at,
            crate::snapshot::HistorySource::Journal(self.wal.reader()),
        ));
        self.retained_from = at;
        self.snapshot_offered_at = at;
        Ok(())
    }

    /// The WAL must continue the snapshot: same log identity. A log of another
    /// deployment, or an empty data directory in front of a snapshot (a lost
    /// disk: starting would silently drop what came after the snapshot and
    /// reuse its sequence numbers), is refused with what to do, unless
    /// `--restore-from-snapshot` accepts that loss; the new log then becomes
    /// the snapshot's at once.
    fn check_log_identity(
        &self,
        runtime: &tokio::runtime::Runtime,
        config: &crate::snapshot::SnapshotConfig,
        rows: &crate::state_machine::Rows,
    ) -> Result<(), EngineError> {
        let ours = &config.log_id;
        if rows.log_id.as_ref() == Some(ours) {
            return Ok(());
        }
        let wal_empty = self.wal.first_sequence().is_none();
        let adopt = match (&rows.log_id, wal_empty) {
            (_, true) if config.restore_from_snapshot => {
                tracing::warn!(
                    snapshot_sequence = rows.sequence,
                    log_id = %ours,
                    "--restore-from-snapshot: starting from the snapshot alone with a new log; \
                     whatever was journaled after the snapshot is lost"
                );
                true
            }
            (theirs, true) => {
                return Err(EngineError::WalMissing {
                    dir: self.wal.dir().to_path_buf(),
                    sequence: rows.sequence,
                    theirs: theirs.clone().unwrap_or_else(|| "(unrecorded)".into()),
                })
            }
            // A snapshot written before snapshots recorded their log.
            (None, false) => true,
            (Some(theirs), false) => {
                return Err(EngineError::ForeignWal {
                    dir: self.wal.dir().to_path_buf(),
                    ours: ours.clone(),
                    theirs: theirs.clone(),
                })
            }
        };
        if adopt {
            let set = crate::snapshot::set_log_id(&config.url, ours);
            runtime.block_on(crate::snapshot::within(config.timeout, set))?;
        }
        Ok(())
    }

    /// Every snapshot interval, hands the changed rows to the snapshotter; once
    /// a snapshot is durable, deletes the WAL segments it covers (never above
    /// the outbox watermark).
    fn maybe_snapshot(&mut self) -> Result<(), EngineError> {
        let (Some(snapshotter), Some(config)) = (&self.snapshotter, &self.config.snapshot) else {
            return Ok(());
        };
        self.metrics
            .snapshot_age_seconds
            .set(snapshotter.age().as_secs_f64());
        let sequence = self.state.last_sequence();
        let due = self.last_snapshot.elapsed() >= Duration::from_millis(config.interval_ms)
            || sequence - self.snapshot_offered_at >= config.every_records;
        // A snapshot never gets ahead of the durable journal, and never
        // queues behind another (PostgreSQL slow or down).
        if due && !self.unsynced && sequence > self.snapshot_offered_at && !snapshotter.is_busy() {
            self.last_snapshot = Instant::now();
            self.snapshot_offered_at = sequence;
            let copying = Instant::now();
            let delta = self.state.take_delta();
            self.metrics
                .snapshot_copy_seconds
                .observe(copying.elapsed().as_secs_f64());
            self.metrics.snapshot_deltas_total.inc();
            snapshotter.offer(delta);
        }
        let durable = snapshotter.durable_sequence();
        if durable > self.retained_from {
            let floor = self
                .outbox_floor()
                .map_or(durable + 1, |f| f.min(durable + 1));
            // Bookkeeping here; the unlinks and directory syncs on the
            // retention thread.
            let retired = self.wal.retire_segments_before(floor);
            if let Some(janitor) = &self.retention {
                janitor.delete(retired);
            }
            self.retained_from = durable;
        }
        Ok(())
    }

    /// One turn of the pipeline. Returns true when the queue was found empty.
    fn run_batch(&mut self) -> Result<bool, EngineError> {
        // 1. Take a batch.
        let drained = self.take_batch();
        let now = now_ms();
        // 2. Journal + apply each command; hold its reply.
        let mut batch = std::mem::take(&mut self.batch);
        // Single commands are prefetched for a few requests ahead; a batch
        // entry's commands a few commands ahead. Each was prepared by the
        // thread that submitted it (else here, once).
        let mut ahead = Lookahead::default();
        for request in batch.iter().take(PREFETCH_AHEAD) {
            ahead.push(&self.state, single_prepared(request));
        }
        let mut requests = batch.drain(..);
        while let Some(request) = requests.next() {
            if let Some(next) = requests.as_slice().get(PREFETCH_AHEAD - 1) {
                ahead.push(&self.state, single_prepared(next));
            }
            let prepared = ahead.pop();
            if let Some(trace) = &request.trace {
                trace.apply_started();
                self.trace = Some(trace.parent);
            }
            let reply = match request.kind {
                RequestKind::Command(command, want) => {
                    let prepared = prepared.unwrap_or_else(|| Prepared::of(&command));
                    let outcome = self.execute(&command, &prepared, now)?;
                    Reply::Command(self.command_reply(&command, outcome, want))
                }
                RequestKind::Batch(commands, want) => {
                    let prepared = match request.prepared {
                        Preparation::Many(prepared) if prepared.len() == commands.len() => prepared,
                        _ => commands.iter().map(Prepared::of).collect(),
                    };
                    let mut replies = Vec::with_capacity(commands.len());
                    for (i, command) in commands.iter().enumerate() {
                        self.state.prefetch_ahead(&prepared, i);
                        let outcome = self.execute(command, &prepared[i], now)?;
                        replies.push(self.command_reply(command, outcome, want));
                    }
                    Reply::Batch(replies)
                }
                RequestKind::Basket(items) => Reply::Batch(self.execute_basket(&items, now)?),
                RequestKind::Query(query) => self.query(query),
            };
            if let Some(trace) = request.trace {
                trace.apply_ended();
                self.trace = None;
                self.traced.push(trace);
            }
            self.held.push((request.reply, reply));
        }
        drop(requests);
        self.batch = batch;
        self.maybe_tick(now)?;
        // 3 + 4. Sync, then release (or the other way round in async mode).
        match self.config.durability {
            Durability::Sync => {
                self.sync()?;
                self.release();
            }
            Durability::Async => {
                self.release();
                let due = self.last_sync.elapsed()
                    >= Duration::from_millis(super::ASYNC_SYNC_INTERVAL_MS);
                if due || drained {
                    self.sync()?;
                }
            }
        }
        // 5. Off the hot path: hand changed rows to the snapshotter.
        self.maybe_snapshot()?;
        Ok(drained)
    }

    /// Takes the next batch: blocks for the first request of either lane,
    /// then takes what the clients lane holds, then the feeds lane's, at most
    /// `batch_size_max / FEED_SHARE` of those, so a Kafka backlog never makes
    /// the batch a client waits behind long. Returns true when both lanes
    /// were found empty.
    fn take_batch(&mut self) -> bool {
        debug_assert!(self.batch.is_empty() && self.held.is_empty());
        let timeout = self.idle_timeout();
        let first = crossbeam_channel::select! {
            recv(self.rx) -> first => first.map(|r| (r, false)),
            recv(self.feeds) -> first => first.map(|r| (r, true)),
            // A stop request: the loop sees the flag.
            recv(self.wake) -> _ => return self.rx.is_empty() && self.feeds.is_empty(),
            default(timeout) => return true,
        };
        let Ok((first, from_feeds)) = first else {
            // Every handle is gone: treat as a stop request.
            self.stop.store(true, Ordering::Release);
            return true;
        };
        self.batch.push(first);
        // Clients first, leaving the feeds their share; then the feeds (a
        // Reserve flood never stops the fills); then clients into what is left.
        let max = self.config.batch_size_max;
        let feeds_max = (max / super::FEED_SHARE).max(1);
        let feeds_room = feeds_max - usize::from(from_feeds);
        take(
            &self.rx,
            &mut self.batch,
            max.saturating_sub(feeds_max).max(1),
        );
        let feeds_up_to = (self.batch.len() + feeds_room).min(max);
        take(&self.feeds, &mut self.batch, feeds_up_to);
        take(&self.rx, &mut self.batch, max);
        self.metrics
            .engine_batch_size
            .observe(self.batch.len() as f64);
        self.metrics
            .engine_queue_depth
            .set((self.rx.len() + self.feeds.len()) as i64);
        self.rx.is_empty() && self.feeds.is_empty()
    }

    /// How long the writer may wait for the first request of a batch: until
    /// its next deadline, at most [`IDLE_MAX`]; not at all while stopping.
    fn idle_timeout(&self) -> Duration {
        if self.stop.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let mut timeout = IDLE_MAX;
        if self.unsynced {
            let interval = Duration::from_millis(super::ASYNC_SYNC_INTERVAL_MS);
            timeout = timeout.min(interval.saturating_sub(self.last_sync.elapsed()));
        }
        if let Some(at) = self.state.next_deadline_ms() {
            let due = at.max(self.last_tick_ms + TICK_SPACING_MS);
            let wait_ms = (due - now_ms()).max(0) as u64;
            timeout = timeout.min(Duration::from_millis(wait_ms));
        }
        if self.snapshotter.is_some() {
            timeout = timeout.min(SNAPSHOT_POLL);
        }
        timeout
    }

    /// Journals then applies one command: append, then apply, in that order.
    /// `prepared` is [`Prepared::of`]`(command)`.
    fn execute(
        &mut self,
        command: &Command,
        prepared: &Prepared,
        now: i64,
    ) -> Result<Outcome, EngineError> {
        let sequence = self.state.last_sequence() + 1;
        let timestamp_ms = now.max(self.state.last_timestamp_ms());
        codec::encode(command, timestamp_ms, &mut self.record);
        self.wal.append(sequence, &self.record)?;
        self.unsynced = true;
        let outcome = match &mut self.outbox {
            Some(outbox) => outbox.apply(
                &mut self.state,
                command,
                prepared,
                sequence,
                timestamp_ms,
                self.trace,
            ),
            None => {
                self.state
                    .apply_prepared(command, prepared, sequence, timestamp_ms, &mut NoEvents)
            }
        };
        debug_assert_eq!(self.state.last_sequence(), sequence);
        self.metrics.engine_commands_total.inc();
        Ok(outcome)
    }

    /// Journals then applies an all-or-nothing basket: one record, one
    /// sequence; one reply per item, in order.
    fn execute_basket(
        &mut self,
        items: &[crate::domain::Reserve],
        now: i64,
    ) -> Result<Vec<CommandReply>, EngineError> {
        let sequence = self.state.last_sequence() + 1;
        let timestamp_ms = now.max(self.state.last_timestamp_ms());
        codec::encode_basket(items, timestamp_ms, &mut self.record);
        self.wal.append(sequence, &self.record)?;
        self.unsynced = true;
        let mut outcomes = std::mem::take(&mut self.basket_outcomes);
        match &mut self.outbox {
            Some(outbox) => outbox.apply_basket(
                &mut self.state,
                items,
                sequence,
                timestamp_ms,
                self.trace,
                &mut outcomes,
            ),
            None => {
                self.state
                    .apply_basket(items, sequence, timestamp_ms, &mut NoEvents, &mut outcomes)
            }
        }
        debug_assert_eq!(self.state.last_sequence(), sequence);
        self.metrics.engine_commands_total.inc();
        let replies = items
            .iter()
            .zip(outcomes.drain(..))
            .map(|(c, outcome)| {
                self.command_reply(&Command::Reserve(*c), outcome, Want::Reservation)
            })
            .collect();
        self.basket_outcomes = outcomes;
        Ok(replies)
    }

    /// Journals a tick when the state has a deadline that has passed.
    fn maybe_tick(&mut self, now: i64) -> Result<(), EngineError> {
        let due = self.state.next_deadline_ms().is_some_and(|at| at <= now);
        if due && now - self.last_tick_ms >= TICK_SPACING_MS {
            self.last_tick_ms = now;
            self.execute(&Command::Tick, &Prepared::of(&Command::Tick), now)?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), EngineError> {
        if !self.unsynced {
            return Ok(());
        }
        let started = Instant::now();
        let traced_from = (!self.traced.is_empty()).then(crate::telemetry::now_ns);
        self.wal.sync()?;
        self.unsynced = false;
        if let Some(from) = traced_from {
            let to = crate::telemetry::now_ns();
            let batch = self.held.len();
            for trace in self.traced.drain(..) {
                trace.synced(from, to, batch);
            }
        }
        if let Some(outbox) = &mut self.outbox {
            outbox.hand_off(self.state.last_sequence(), &self.wal);
        }
        self.last_sync = Instant::now();
        self.metrics
            .wal_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.publish_gauges();
        Ok(())
    }

    /// Sends the held replies. A caller that gave up (timeout) is not an error.
    fn release(&mut self) {
        // Replied before a sync (async durability): no sync span.
        self.traced.clear();
        self.releaser.release(&mut self.held);
    }

    fn command_reply(&self, command: &Command, outcome: Outcome, want: Want) -> CommandReply {
        command_reply(&self.state, command, outcome, want)
    }

    fn query(&self, query: Query) -> Reply {
        self::query(&self.state, query)
    }

    /// The lowest sequence WAL retention must keep: the first one whose
    /// account events or dead letters the broker may not have acknowledged
    /// (`None` without an outbox). Retention deletes below
    /// `min(snapshot sequence + 1, this)`.
    pub fn outbox_floor(&self) -> Option<u64> {
        self.outbox.as_ref().map(|o| o.watermark() + 1)
    }

    fn publish_gauges(&self) {
        self.metrics
            .engine_last_sequence
            .set(self.state.last_sequence() as i64);
        self.metrics
            .overdrawn_accounts
            .set(self.state.overdrawn_accounts() as i64);
        self.metrics.accounts.set(self.state.account_count() as i64);
        self.metrics
            .wal_disk_usage_bytes
            .set(self.wal.disk_usage_bytes() as i64);
        self.metrics
            .wal_segments
            .set(self.wal.segment_count() as i64);
    }
}

/// The reply to `command`, read from `state` right after it was applied.
pub(crate) fn command_reply(
    state: &State,
    command: &Command,
    outcome: Outcome,
    want: Want,
) -> CommandReply {
    let account_id = command.account_id();
    let reservation = match (want, command) {
        (Want::Reservation, Command::Reserve(c)) => state.reservation(c.account_id, &c.order_id),
        (Want::Reservation, Command::Unreserve(c)) => state.reservation(c.account_id, &c.order_id),
        _ => None,
    };
    let account = match (want, account_id) {
        (Want::Account, Some(id)) => state
            .account(id)
            .map(|a| AccountView::of(a, state.last_sequence())),
        _ => None,
    };
    CommandReply {
        outcome,
        reservation: reservation.map(ReservationView::from),
        account,
    }
}

/// A read of `state`.
pub(crate) fn query(state: &State, query: Query) -> Reply {
    match query {
        Query::Account(id) => Reply::Account(
            state
                .account(id)
                .map(|a| AccountView::of(a, state.last_sequence())),
        ),
        Query::Reservation(id, order_id) => {
            Reply::Reservation(state.reservation(id, &order_id).map(ReservationView::from))
        }
        Query::Digest => Reply::Digest {
            sequence: state.last_sequence(),
            digest: state.digest(),
        },
        Query::Offsets => Reply::Offsets(state.offsets().collect()),
    }
}

/// A single command's [`Prepared`]: the submitter's, or made here. `None`
/// for any other request.
fn single_prepared(request: &Request) -> Option<Prepared> {
    match (&request.kind, &request.prepared) {
        (RequestKind::Command(_, _), Preparation::One(prepared)) => Some(*prepared),
        (RequestKind::Command(command, _), _) => Some(Prepared::of(command)),
        _ => None,
    }
}

/// Moves requests from `rx` into `batch` until it holds `up_to` or `rx` is empty.
fn take(rx: &Receiver<Request>, batch: &mut Vec<Request>, up_to: usize) {
    while batch.len() < up_to {
        match rx.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
}

/// Pins the current thread to the last core. Best effort: where the OS refuses
/// (containers without the capability, macOS), the writer runs unpinned.
///
/// A thread inherits the affinity of the thread that spawns it: a
/// background thread started from the writer (or that may run beside it)
/// calls [`yield_to_the_writer`] first.
pub(crate) fn pin_to_last_core() {
    let pinned = core_affinity::get_core_ids()
        .and_then(|ids| ids.last().copied())
        .is_some_and(core_affinity::set_for_current);
    tracing::info!(pinned, "engine writer thread affinity");
}

/// Puts the calling background thread (`thread` names it in the log) behind
/// the writer: a lower scheduling priority, and off the core the writer is
/// pinned to (the last one). Best effort.
pub(crate) fn yield_to_the_writer(thread: &str) {
    // On Linux, PRIO_PROCESS with 0 applies to the calling thread only.
    // SAFETY: plain syscall on the current thread, no pointers.
    let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) } == 0;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let moved = cores.len() > 1 && {
        // SAFETY: cpu_set_t is plain data; CPU_SET bounds are checked by the
        // core ids the kernel reported.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for core in &cores[..cores.len() - 1] {
                libc::CPU_SET(core.id, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    };
    tracing::info!(thread, niced, moved, "background thread priority");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AccountId;

    const CLIENT: i64 = 1;
    const FEED: i64 = 2;

    /// A writer (not running) with a batch of at most 8, and the senders of
    /// its two lanes.
    fn writer(
        dir: &std::path::Path,
    ) -> (
        Writer,
        [crossbeam_channel::Sender<Request>; 2],
        crossbeam_channel::Sender<()>,
    ) {
        let mut config = EngineConfig::new(dir);
        config.batch_size_max = 8;
        let (clients, clients_rx) = crossbeam_channel::bounded(64);
        let (feeds, feeds_rx) = crossbeam_channel::bounded(64);
        // Kept by the caller: a closed wake channel reads as a stop request.
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        let writer = Writer::open(
            config,
            [clients_rx, feeds_rx],
            wake_rx,
            Metrics::new(),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        (writer, [clients, feeds], wake)
    }

    fn send(lane: &crossbeam_channel::Sender<Request>, id: i64, n: usize) {
        for _ in 0..n {
            let (reply, _) = tokio::sync::oneshot::channel();
            let kind = RequestKind::Query(Query::Account(AccountId(id)));
            lane.send(Request {
                kind,
                prepared: Preparation::None,
                reply,
                trace: None,
            })
            .unwrap();
        }
    }

    /// (client requests, feed requests) in the next batch.
    fn next_batch(writer: &mut Writer) -> (usize, usize) {
        writer.take_batch();
        let of = |id| {
            writer
                .batch
                .iter()
                .filter(|r| matches!(r.kind, RequestKind::Query(Query::Account(AccountId(a))) if a == id))
                .count()
        };
        let counts = (of(CLIENT), of(FEED));
        writer.batch.clear();
        counts
    }

    /// Single commands mixed with reads and batch entries in one writer
    /// batch: each is prepared a few requests ahead and applied with its own
    /// `Prepared` (a debug assertion checks every one), and answers what
    /// `State::apply` answers for it alone.
    #[test]
    fn commands_between_reads_and_batches_are_applied_with_their_own_preparation() {
        use crate::state_machine::{NoEvents, StateConfig};
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, [clients, _feeds], _wake) = writer(dir.path());
        let commands: Vec<Command> = crate::workload::funded_accounts(2)
            .chain((0..6).flat_map(|n| crate::workload::order_life(n, 2)))
            .collect();
        // Command, read, command, batch of two, command, read, ...
        let mut kinds = Vec::new();
        let mut rest = commands.iter().copied();
        let mut turn = 0;
        while let Some(command) = rest.next() {
            kinds.push(RequestKind::Command(command, Want::Nothing));
            match turn % 3 {
                0 => kinds.push(RequestKind::Query(Query::Account(AccountId(1)))),
                1 => kinds.push(RequestKind::Batch(
                    rest.by_ref().take(2).collect(),
                    Want::Nothing,
                )),
                _ => {}
            }
            turn += 1;
        }
        let mut replies = Vec::new();
        for (i, kind) in kinds.into_iter().enumerate() {
            let (reply, answer) = tokio::sync::oneshot::channel();
            // Every other request prepared by its submitter, as the
            // engine's handle does; the others by the writer.
            let prepared = match i % 2 {
                0 => Preparation::of(&kind),
                _ => Preparation::None,
            };
            clients
                .send(Request {
                    kind,
                    prepared,
                    reply,
                    trace: None,
                })
                .unwrap();
            replies.push(answer);
        }
        while !clients.is_empty() {
            writer.run_batch().unwrap();
        }
        let mut outcomes = Vec::new();
        for answer in replies {
            match answer.blocking_recv().unwrap() {
                Reply::Command(reply) => outcomes.push(reply.outcome),
                Reply::Batch(batch) => outcomes.extend(batch.into_iter().map(|r| r.outcome)),
                Reply::Account(_) => {}
                other => panic!("unexpected reply {other:?}"),
            }
        }
        let mut alone = State::new(StateConfig::default());
        let expected: Vec<Outcome> = commands
            .iter()
            .map(|c| {
                let sequence = alone.last_sequence() + 1;
                alone.apply(c, sequence, 1_700_000_000_000, &mut NoEvents)
            })
            .collect();
        assert_eq!(outcomes, expected);
    }

    #[test]
    fn a_batch_takes_clients_first_and_feeds_at_most_their_share() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, [clients, feeds], _wake) = writer(dir.path());
        // Both lanes full: 8 / FEED_SHARE = 2 feeds, the rest clients,
        // whichever lane the first request came from.
        send(&clients, CLIENT, 20);
        send(&feeds, FEED, 20);
        assert_eq!(next_batch(&mut writer), (6, 2));
        assert_eq!(next_batch(&mut writer), (6, 2));
        // A client flood never stops the feeds, nor feeds the clients.
        assert_eq!(next_batch(&mut writer), (6, 2));
        assert_eq!(next_batch(&mut writer), (2, 2));
        // Feeds alone (12 left): their share per batch, so a client arriving
        // meanwhile waits behind a short batch.
        for _ in 0..6 {
            assert_eq!(next_batch(&mut writer), (0, 2));
        }
        // Clients alone: the whole batch.
        send(&clients, CLIENT, 20);
        assert_eq!(next_batch(&mut writer), (8, 0));
        assert_eq!(next_batch(&mut writer), (8, 0));
        assert_eq!(next_batch(&mut writer), (4, 0));
    }
}

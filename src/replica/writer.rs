//! The replica's writer thread: the one owner of the `State`, as on a single
//! node, with the journal and the sync moved into raft.
//!
//! * **Leader**: takes a batch from the ingress lanes, encodes its commands
//!   as journal records (`engine::codec`) into one [`Batch`], hands it to the
//!   proposer (which enqueues batches into raft in the order they were taken)
//!   and holds the replies under the batch's proposal number. At most
//!   [`PROPOSALS_IN_FLIGHT`] batches wait for their commit; past that the
//!   lanes fill and callers get `RESOURCE_EXHAUSTED`.
//! * **Every replica**: applies committed entries when openraft hands them
//!   over (`ToWriter::Apply`), record by record with `State::apply`, each
//!   command taking the next sequence. An entry this writer proposed
//!   releases its held replies there, after the commit: never before.
//! * A proposal raft refuses (leadership lost) or does not commit within
//!   [`PROPOSAL_TIMEOUT`] is answered `UNAVAILABLE`; its commands may still be
//!   applied if the entry reached a majority, which the idempotency keys make
//!   safe to resend.

use super::duties::Duties;
use super::outbox::{self, Control, Ledger};
use super::{Batch, Leadership, TypeConfig};
use crate::domain::Command;
use crate::egress::outbox::{apply_basket, apply_command, OutboxRecord};
use crate::engine::codec::{self, Record};
use crate::engine::{
    command_reply, now_ms, query, CommandReply, EngineConfig, EngineError, EngineHandle, Phase,
    PhaseCell, Reply, Request, RequestKind, SubmitError, Want,
};
use crate::metrics::Metrics;
use crate::state_machine::{Outcome, State};
use crossbeam_channel::{Receiver, Sender};
use openraft::{Entry, EntryPayload};
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::oneshot;

/// Batches proposed and not yet applied, at most.
pub const PROPOSALS_IN_FLIGHT: usize = 64;
/// A proposal not committed by then is answered `UNAVAILABLE` (not committed
/// in time): the leader has most likely lost its quorum.
pub const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most journal bytes in one raft entry (one raft log record, which one WAL
/// sync batch must hold): a batch beyond it is proposed as several entries.
/// One request always fits (2 MiB of protobuf at most).
pub const ENTRY_BYTES_MAX: usize = 3 << 20;
/// Longest the writer sleeps with nothing to do.
const IDLE_MAX: Duration = Duration::from_millis(100);
/// Least journaled time between two ticks the leader proposes.
const TICK_SPACING_MS: i64 = 100;

pub(crate) enum ToWriter {
    /// Committed entries, in log order; `done` once applied.
    Apply(Arc<Vec<Entry<TypeConfig>>>, oneshot::Sender<()>),
    /// A proposal its entry will not answer.
    Failed {
        origin: u64,
        proposal: u64,
        error: SubmitError,
    },
    /// The state a snapshot holds replaces this one (a replica that fell
    /// behind the leader's log, or a restart from its own snapshot), with the
    /// outbox ledger taken at the same entry.
    Install(Box<(State, Ledger)>, oneshot::Sender<()>),
}

/// What one journal record did: a command and its outcome, or a basket's
/// items (their outcomes in the caller's buffer).
// Returned once per record and matched at once: boxing the common case
// would allocate per record (as `codec::Record`).
#[allow(clippy::large_enum_variant)]
pub(super) enum Applied {
    Command(Command, Outcome),
    Basket(Vec<crate::domain::Reserve>),
    /// A control record (`replica::outbox`): no command, no sequence.
    Control(Control),
}

/// Applies one record of a committed entry: a journal record to `state` at
/// its next sequence, at the record's own time, its outbox records appended
/// to `events` when given (the ledger's rule); a control record is returned
/// as it is. What the writer and the snapshot shadow both do with each
/// record of a committed entry.
pub(super) fn apply_journal_record(
    state: &mut State,
    record: &[u8],
    outcomes: &mut Vec<Outcome>,
    events: Option<&mut Vec<OutboxRecord>>,
) -> Result<Applied, EngineError> {
    let sequence = state.last_sequence() + 1;
    if let Some(control) = outbox::decode_control(record) {
        return control.map(Applied::Control).map_err(|e| {
            EngineError::Thread(format!("raft entry before sequence {sequence}: {e}"))
        });
    }
    let (record, timestamp_ms) =
        codec::decode_record(record).map_err(|source| EngineError::Decode { sequence, source })?;
    Ok(match record {
        Record::Command(command) => {
            let outcome = apply_command(state, &command, sequence, timestamp_ms, events);
            Applied::Command(command, outcome)
        }
        Record::Basket(items) => {
            apply_basket(state, &items, sequence, timestamp_ms, events, outcomes);
            Applied::Basket(items)
        }
    })
}

/// What one held request waits for, in the order of its batch's records.
enum Shape {
    /// A record the writer added (settings, tick): no reply.
    Internal,
    Command(Want),
    Batch(usize, Want),
    Basket,
}

struct Held {
    reply: oneshot::Sender<Reply>,
    shape: Shape,
}

/// The running writer thread, and what feeds it.
pub(super) struct Running {
    handle: EngineHandle,
    stop: Arc<AtomicBool>,
    wake: Sender<()>,
    to_writer: Sender<ToWriter>,
    proposals_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Batch>>>,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
}

pub(super) fn start(
    config: EngineConfig,
    metrics: Arc<Metrics>,
    leadership: Arc<Leadership>,
    duties: Duties,
) -> Result<(Running, Sender<ToWriter>), EngineError> {
    let (clients, clients_rx) = crossbeam_channel::bounded(config.queue_capacity);
    let (feeds, feeds_rx) = crossbeam_channel::bounded(config.queue_capacity);
    let (wake, wake_rx) = crossbeam_channel::bounded(1);
    // Unbounded, and bounded in practice: openraft waits for each apply.
    let (to_writer, from_raft) = crossbeam_channel::unbounded();
    let (proposals_tx, proposals_rx) = tokio::sync::mpsc::channel(PROPOSALS_IN_FLIGHT + 1);
    let phase = PhaseCell::new();
    let stop = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle::new(
        clients,
        feeds,
        phase.clone(),
        stop.clone(),
        Some(leadership.clone()),
    );
    let writer = ReplicaWriter {
        state: State::default(),
        wanted: config.state,
        batch_size_max: config.batch_size_max,
        clients: clients_rx,
        feeds: feeds_rx,
        wake: wake_rx,
        from_raft,
        proposals: proposals_tx,
        leadership,
        metrics,
        stop: stop.clone(),
        origin: origin(),
        next_proposal: 1,
        held: FxHashMap::default(),
        configured_in_term: None,
        last_proposed_ms: 0,
        last_tick_ms: 0,
        record: Vec::with_capacity(codec::ENCODED_LEN_MAX),
        outcomes: Vec::new(),
        pin_core: config.pin_core,
        capacity_orders: config.capacity_orders,
        huge_pages: config.huge_pages,
        duties,
        ledger_full_warned_ms: 0,
        origin_confirmed: false,
    };
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(&phase)))
                    .unwrap_or_else(|_| Err(EngineError::Thread("replica writer panicked".into())));
            if let Err(e) = &result {
                tracing::error!(error = %e, "replica writer stopped on error");
            }
            phase.set(Phase::Stopped);
            result
        })
        .map_err(|e| EngineError::Thread(e.to_string()))?;
    Ok((
        Running {
            handle,
            stop,
            wake,
            to_writer: to_writer.clone(),
            proposals_rx: std::sync::Mutex::new(Some(proposals_rx)),
            thread: Some(thread),
        },
        to_writer,
    ))
}

/// A random id for this process's proposals (replies wait only where the
/// entry was proposed; a restarted process proposes under a new one).
fn origin() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms() as u64);
    h.write_u32(std::process::id());
    h.finish()
}

impl Running {
    pub(super) fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Stops the writer from elsewhere (raft failed): its phase becomes
    /// `Stopped`, which stops the server.
    pub(super) fn stopper(&self) -> impl FnOnce() + Send + 'static {
        let stop = self.stop.clone();
        let wake = self.wake.clone();
        move || {
            stop.store(true, Ordering::Release);
            let _ = wake.try_send(());
        }
    }

    /// Starts the proposer: batches go into raft in the order the writer
    /// took them, each awaited on its own task.
    pub(super) fn set_raft(&self, raft: openraft::Raft<TypeConfig>) {
        let Some(mut rx) = self
            .proposals_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let to_writer = self.to_writer.clone();
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let (origin, proposal) = (batch.origin, batch.proposal);
                let fail = |error| {
                    let _ = to_writer.send(ToWriter::Failed {
                        origin,
                        proposal,
                        error,
                    });
                };
                let receiver = match raft.client_write_ff(batch).await {
                    Ok(receiver) => receiver,
                    Err(e) => {
                        tracing::warn!(error = %e, "raft stopped; proposal refused");
                        fail(SubmitError::Stopped);
                        continue;
                    }
                };
                let to_writer = to_writer.clone();
                tokio::spawn(async move {
                    let error = match tokio::time::timeout(PROPOSAL_TIMEOUT, receiver).await {
                        Ok(Ok(Ok(_))) => return,
                        Ok(Ok(Err(openraft::error::ClientWriteError::ForwardToLeader(f)))) => {
                            SubmitError::NotLeader(f.leader_node.map(|n| n.grpc_addr))
                        }
                        Ok(Ok(Err(e))) => {
                            tracing::warn!(error = %e, "proposal refused");
                            SubmitError::NotCommitted
                        }
                        Ok(Err(_)) => SubmitError::Stopped,
                        Err(_) => SubmitError::NotCommitted,
                    };
                    let _ = to_writer.send(ToWriter::Failed {
                        origin,
                        proposal,
                        error,
                    });
                });
            }
        });
    }

    pub(super) fn stop(mut self) -> Result<(), EngineError> {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| EngineError::Thread("replica writer panicked".into()))?,
            None => Ok(()),
        }
    }
}

struct ReplicaWriter {
    state: State,
    /// The settings of the flags (journaled once this replica leads).
    wanted: crate::state_machine::StateConfig,
    batch_size_max: usize,
    clients: Receiver<Request>,
    feeds: Receiver<Request>,
    wake: Receiver<()>,
    from_raft: Receiver<ToWriter>,
    proposals: tokio::sync::mpsc::Sender<Batch>,
    leadership: Arc<Leadership>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    origin: u64,
    next_proposal: u64,
    /// Replies waiting for their entry, by proposal number.
    held: FxHashMap<u64, Vec<Held>>,
    /// The term in which this writer last proposed the flags' settings.
    configured_in_term: Option<u64>,
    last_proposed_ms: i64,
    last_tick_ms: i64,
    record: Vec<u8>,
    outcomes: Vec<Outcome>,
    pin_core: bool,
    capacity_orders: usize,
    huge_pages: bool,
    /// The ledger of derived events, and the leader's side effects.
    duties: Duties,
    ledger_full_warned_ms: i64,
    /// A batch of this writer's origin was applied.
    origin_confirmed: bool,
}

impl ReplicaWriter {
    fn run(mut self, phase: &PhaseCell) -> Result<(), EngineError> {
        if self.capacity_orders > 0 {
            let pages = crate::state_machine::Pages::huge_if(self.huge_pages);
            self.state.reserve_orders(self.capacity_orders, pages);
        }
        if self.pin_core {
            crate::engine::pin_to_last_core();
        }
        // The state is rebuilt by openraft re-applying the committed log; the
        // leadership check, not the phase, keeps requests out meanwhile.
        phase.set(Phase::Serving);
        self.metrics.ready.set(1);
        while !self.stop.load(Ordering::Acquire) {
            let room = self.room();
            let lanes_open = room || !self.leadership.is_serving();
            if lanes_open {
                crossbeam_channel::select! {
                    recv(self.from_raft) -> m => match m {
                        Ok(m) => self.handle(m)?,
                        Err(_) => break,
                    },
                    recv(self.clients) -> r => if let Ok(r) = r { self.take_batch(r) },
                    recv(self.feeds) -> r => if let Ok(r) = r { self.take_batch(r) },
                    recv(self.wake) -> _ => {},
                    default(IDLE_MAX) => {},
                }
            } else {
                crossbeam_channel::select! {
                    recv(self.from_raft) -> m => match m {
                        Ok(m) => self.handle(m)?,
                        Err(_) => break,
                    },
                    recv(self.wake) -> _ => {},
                    default(IDLE_MAX) => {},
                }
            }
            self.maybe_tick();
            self.follow_leadership();
        }
        self.metrics.ready.set(0);
        self.duties.stop(&mut self.state);
        // Whatever still waits gets UNAVAILABLE: its entry may yet commit on
        // the other replicas (resend with the same key).
        for (_, held) in self.held.drain() {
            for h in held {
                let _ = h.reply.send(Reply::Refused(SubmitError::Stopped));
            }
        }
        for r in self.clients.try_iter().chain(self.feeds.try_iter()) {
            let _ = r.reply.send(Reply::Refused(SubmitError::Stopped));
        }
        tracing::info!(
            sequence = self.state.last_sequence(),
            "replica writer stopped"
        );
        Ok(())
    }

    fn handle(&mut self, message: ToWriter) -> Result<(), EngineError> {
        match message {
            ToWriter::Apply(entries, done) => {
                for entry in entries.iter() {
                    if let EntryPayload::Normal(batch) = &entry.payload {
                        self.apply(batch)?;
                    }
                }
                self.duties.applied(self.state.last_sequence());
                self.published();
                let _ = done.send(());
            }
            ToWriter::Install(installed, done) => {
                let (state, ledger) = *installed;
                tracing::info!(
                    sequence = state.last_sequence(),
                    outbox_ledger = ledger.len(),
                    "replica state replaced by a snapshot"
                );
                self.state = state;
                self.duties.install(ledger, &mut self.state);
                // Proposals of this writer before the snapshot are not in
                // this state's past: refuse them (their keys make a resend
                // safe).
                for (_, held) in self.held.drain() {
                    for h in held {
                        let _ = h.reply.send(Reply::Refused(SubmitError::NotCommitted));
                    }
                }
                self.published();
                let _ = done.send(());
            }
            ToWriter::Failed {
                origin,
                proposal,
                error,
            } => {
                if origin != self.origin {
                    // Answered when this writer changed its origin.
                    return Ok(());
                }
                if let Some(held) = self.held.remove(&proposal) {
                    for h in held {
                        let _ = h.reply.send(Reply::Refused(error.clone()));
                    }
                }
                if self.duties.orders_proposals() {
                    self.new_origin(&error);
                }
            }
        }
        Ok(())
    }

    /// Whether another batch may be proposed: [`PROPOSALS_IN_FLIGHT`] at
    /// most, and with a ledger only one until the first of this writer's
    /// origin was applied (so an origin the ledger has seen always began at
    /// its proposal 1: `Ledger::admit`).
    fn room(&self) -> bool {
        let most = if self.origin_confirmed || !self.duties.orders_proposals() {
            PROPOSALS_IN_FLIGHT
        } else {
            1
        };
        self.held.len() < most
    }

    fn published(&self) {
        self.metrics
            .engine_last_sequence
            .set(self.state.last_sequence() as i64);
        self.metrics.accounts.set(self.state.account_count() as i64);
    }

    /// The leader's side effects follow leadership (duties.rs); what they
    /// acknowledged is proposed like any entry.
    fn follow_leadership(&mut self) {
        let leading = self.leadership.is_serving().then(|| self.leadership.term());
        let room = self.room();
        for record in self.duties.follow(leading, room, &mut self.state) {
            let (reply, _) = oneshot::channel();
            self.propose(
                vec![record],
                vec![Held {
                    reply,
                    shape: Shape::Internal,
                }],
            );
        }
    }

    /// After a proposal failed: the batches proposed after it may still
    /// commit without it, which the ledger's rule refuses to apply (a Kafka
    /// offset applied after an earlier one that never was would skip that
    /// one for good). So this writer proposes under a new origin, numbered
    /// from 1, and answers what waits under the old one: it may still be
    /// applied, which the idempotency keys and offsets make safe to resend.
    fn new_origin(&mut self, why: &SubmitError) {
        self.origin = origin();
        self.next_proposal = 1;
        self.origin_confirmed = false;
        for (_, held) in self.held.drain() {
            for h in held {
                let _ = h.reply.send(Reply::Refused(why.clone()));
            }
        }
    }

    /// Applies one committed batch; releases its replies if it is ours. A
    /// batch the proposal order refuses (duties.rs) changes nothing, on every
    /// replica alike.
    fn apply(&mut self, batch: &Batch) -> Result<(), EngineError> {
        let held = if batch.origin == self.origin {
            self.held.remove(&batch.proposal)
        } else {
            None
        };
        let admitted = self.duties.admit(batch);
        if admitted && batch.origin == self.origin {
            self.origin_confirmed = true;
        }
        if !admitted {
            tracing::info!(
                origin = batch.origin,
                proposal = batch.proposal,
                "a batch proposed after one that failed is not applied"
            );
            for h in held.into_iter().flatten() {
                let _ = h.reply.send(Reply::Refused(SubmitError::NotCommitted));
            }
            if batch.origin == self.origin {
                // Its order broke without a failure heard here: go on under
                // a new origin rather than have every later batch refused.
                self.new_origin(&SubmitError::NotCommitted);
            }
            return Ok(());
        }
        let mut records = batch.records.iter();
        let Some(held) = held else {
            for record in records {
                self.apply_record(record, None)?;
            }
            return Ok(());
        };
        for h in held {
            let reply = match h.shape {
                Shape::Internal => {
                    self.apply_next(&mut records, None)?;
                    continue;
                }
                Shape::Command(want) => {
                    let mut replies = Vec::with_capacity(1);
                    self.apply_next(&mut records, Some((want, &mut replies)))?;
                    match replies.pop() {
                        Some(r) => Reply::Command(r),
                        None => Reply::Refused(SubmitError::Stopped),
                    }
                }
                Shape::Batch(n, want) => {
                    let mut replies = Vec::with_capacity(n);
                    for _ in 0..n {
                        self.apply_next(&mut records, Some((want, &mut replies)))?;
                    }
                    Reply::Batch(replies)
                }
                Shape::Basket => {
                    let mut replies = Vec::new();
                    self.apply_next(&mut records, Some((Want::Reservation, &mut replies)))?;
                    Reply::Batch(replies)
                }
            };
            let _ = h.reply.send(reply);
        }
        Ok(())
    }

    fn apply_next<'a>(
        &mut self,
        records: &mut impl Iterator<Item = &'a Vec<u8>>,
        replies: Option<(Want, &mut Vec<CommandReply>)>,
    ) -> Result<(), EngineError> {
        match records.next() {
            Some(record) => self.apply_record(record, replies),
            None => Err(EngineError::Thread(
                "a proposed batch has fewer records than requests".into(),
            )),
        }
    }

    /// Applies one journal record, taking the next sequence; with `replies`,
    /// pushes the reply of each command it holds.
    fn apply_record(
        &mut self,
        record: &[u8],
        replies: Option<(Want, &mut Vec<CommandReply>)>,
    ) -> Result<(), EngineError> {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        let events = self.duties.events();
        let applied = apply_journal_record(&mut self.state, record, &mut outcomes, events);
        if let Ok(Applied::Control(control)) = &applied {
            self.duties.control(*control);
        }
        match (&applied, replies) {
            (Ok(Applied::Command(command, outcome)), Some((want, replies))) => {
                replies.push(command_reply(&self.state, command, *outcome, want));
            }
            (Ok(Applied::Basket(items)), Some((_, replies))) => {
                for (item, outcome) in items.iter().zip(outcomes.drain(..)) {
                    replies.push(command_reply(
                        &self.state,
                        &Command::Reserve(*item),
                        outcome,
                        Want::Reservation,
                    ));
                }
            }
            _ => {}
        }
        self.outcomes = outcomes;
        if !matches!(applied?, Applied::Control(_)) {
            self.metrics.engine_commands_total.inc();
        }
        Ok(())
    }

    /// Takes `first` and whatever else waits, up to `batch_size_max`, and
    /// proposes their commands as one entry.
    fn take_batch(&mut self, first: Request) {
        let mut requests = vec![first];
        while requests.len() < self.batch_size_max {
            match self.clients.try_recv().or_else(|_| self.feeds.try_recv()) {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        self.metrics
            .engine_batch_size
            .observe(requests.len() as f64);
        if !self.leadership.is_serving() {
            let leader = self.leadership.leader();
            for r in requests {
                match r.kind {
                    // A replica's own digest, answered anywhere.
                    RequestKind::Query(q @ crate::engine::Query::Digest) => {
                        let _ = r.reply.send(query(&self.state, q));
                    }
                    _ => {
                        let _ = r
                            .reply
                            .send(Reply::Refused(SubmitError::NotLeader(leader.clone())));
                    }
                }
            }
            return;
        }
        let full = self.duties.ledger_full();
        if full {
            self.warn_ledger_full();
        }
        let timestamp_ms = self.timestamp();
        let mut records = Vec::new();
        let mut held = Vec::new();
        let mut bytes = 0;
        self.maybe_configure(timestamp_ms, &mut records, &mut held);
        for r in requests {
            let before = records.len();
            let shape = match r.kind {
                RequestKind::Query(q) => {
                    let _ = r.reply.send(query(&self.state, q));
                    continue;
                }
                // Memory stays bounded: no new events until a sink drains
                // the ledger (RESOURCE_EXHAUSTED; the consumer pauses).
                _ if full => {
                    let _ = r.reply.send(Reply::Refused(SubmitError::Overloaded));
                    continue;
                }
                RequestKind::Command(command, want) => {
                    records.push(self.encode(&command, timestamp_ms));
                    Shape::Command(want)
                }
                RequestKind::Batch(commands, want) => {
                    for command in &commands {
                        records.push(self.encode(command, timestamp_ms));
                    }
                    Shape::Batch(commands.len(), want)
                }
                RequestKind::Basket(items) => {
                    let mut record = Vec::new();
                    codec::encode_basket(&items, timestamp_ms, &mut record);
                    records.push(record);
                    Shape::Basket
                }
            };
            let added: usize = records[before..].iter().map(Vec::len).sum();
            if bytes + added > ENTRY_BYTES_MAX && before > 0 {
                // Full: what came before goes as one entry, this request
                // starts the next.
                let this = records.split_off(before);
                self.propose(
                    std::mem::replace(&mut records, this),
                    std::mem::take(&mut held),
                );
                bytes = 0;
            }
            bytes += added;
            held.push(Held {
                reply: r.reply,
                shape,
            });
        }
        self.propose(records, held);
    }

    /// At most one warning a second while writes are refused.
    fn warn_ledger_full(&mut self) {
        let now = now_ms();
        if now - self.ledger_full_warned_ms >= 1_000 {
            self.ledger_full_warned_ms = now;
            tracing::warn!(
                "the outbox ledger is full (--replica-ledger-records-max): writes are refused \
                 with RESOURCE_EXHAUSTED until the broker or PostgreSQL takes its events"
            );
        }
    }

    fn encode(&mut self, command: &Command, timestamp_ms: i64) -> Vec<u8> {
        codec::encode(command, timestamp_ms, &mut self.record);
        self.record.clone()
    }

    /// Journal time: the clock, never below what was applied or proposed.
    fn timestamp(&mut self) -> i64 {
        let t = now_ms()
            .max(self.state.last_timestamp_ms())
            .max(self.last_proposed_ms);
        self.last_proposed_ms = t;
        t
    }

    /// Once per term of this replica's leadership: the flags' settings, when
    /// the state's differ (as a single node journals them at start).
    fn maybe_configure(
        &mut self,
        timestamp_ms: i64,
        records: &mut Vec<Vec<u8>>,
        held: &mut Vec<Held>,
    ) {
        let term = self.leadership.term();
        if self.configured_in_term == Some(term) || *self.state.config() == self.wanted {
            return;
        }
        self.configured_in_term = Some(term);
        records.push(self.encode(&Command::Configure(self.wanted), timestamp_ms));
        let (reply, _) = oneshot::channel();
        held.push(Held {
            reply,
            shape: Shape::Internal,
        });
    }

    /// The leader journals a tick when a deadline (an expiry, a key leaving
    /// the idempotency window) has passed.
    fn maybe_tick(&mut self) {
        if !self.leadership.is_serving() || !self.room() {
            return;
        }
        let now = now_ms();
        let due = self.state.next_deadline_ms().is_some_and(|at| at <= now);
        if !due || now - self.last_tick_ms < TICK_SPACING_MS {
            return;
        }
        self.last_tick_ms = now;
        let timestamp_ms = self.timestamp();
        let records = vec![self.encode(&Command::Tick, timestamp_ms)];
        let (reply, _) = oneshot::channel();
        self.propose(
            records,
            vec![Held {
                reply,
                shape: Shape::Internal,
            }],
        );
    }

    fn propose(&mut self, mut records: Vec<Vec<u8>>, mut held: Vec<Held>) {
        if records.is_empty() {
            return;
        }
        if self.next_proposal == 1 && self.duties.orders_proposals() {
            // This origin's batches follow the proposal order (Ledger::admit).
            records.insert(0, outbox::encode_origin_start());
            let (reply, _) = oneshot::channel();
            held.insert(
                0,
                Held {
                    reply,
                    shape: Shape::Internal,
                },
            );
        }
        let proposal = self.next_proposal;
        self.next_proposal += 1;
        let batch = Batch {
            origin: self.origin,
            proposal,
            records,
        };
        let sent = self.proposals.try_send(batch).is_ok();
        if sent {
            self.held.insert(proposal, held);
        } else {
            // Never proposed: its number goes to the next batch (the order
            // of an origin's proposals has no gap, see `new_origin`).
            self.next_proposal -= 1;
            for h in held {
                let _ = h.reply.send(Reply::Refused(SubmitError::Overloaded));
            }
        }
    }
}

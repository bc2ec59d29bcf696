//! Kafka consumers: `trading.fills` (FillEvent), `payment.deposits`
//! (DepositEvent), `payment.withdrawals` (WithdrawEvent), protobuf, keyed by
//! account_id.
//!
//! **Exactly once.** Every message becomes exactly one journaled command that
//! carries its (topic, partition, offset); the state keeps the last applied
//! offset per partition and skips redeliveries. The consumer never trusts the
//! group's committed offsets: it assigns partitions itself, each at the offset
//! after the one the engine's state recovered (from snapshot + WAL), or at the
//! earliest offset if the state never saw the partition. Committed offsets
//! are written after the fact, for lag tooling only.
//!
//! Why assign and not subscribe: one writer owns every account, so exactly one
//! consumer reads every partition; group rebalancing would add nothing but a
//! session-timeout wait after a kill -9. New partitions are picked up by a
//! metadata refresh every [`METADATA_REFRESH`].
//!
//! **Dead letters.** A message that does not decode or validate becomes a
//! [`Command::DeadLetter`] (journaled: its offset is consumed exactly once and
//! its DLQ record is derived from the journal like an event). One the engine
//! cannot apply (unknown account, currency mismatch) is recognised by the
//! engine from its outcome. See `crate::egress::dlq`.
//!
//! **Back-pressure.** When the engine queue is full, the consumer pauses its
//! partitions, holds the message in hand and retries once the queue has
//! drained to half; then it resumes. One thread submits in poll order and
//! never polls while holding a message, so nothing is dropped or reordered.
//!
//! **Replicas.** Every replica runs a consumer, and only the leader's reads:
//! a follower's holds no partitions. A request a replica took may still be
//! refused after it was queued (leadership lost, its entry not committed in
//! time), so the consumer watches the replies of what it submitted; on the
//! first refusal, or when this replica stops leading, it **rewinds**: drops
//! its assignment and, once it leads, assigns again from the state's offsets.
//! What it submits twice that way carries an offset the state has applied,
//! which the state skips: each message still applies exactly once.

use crate::config::KafkaConfig;
use crate::domain::{Command, Source, Topic};
use crate::engine::{now_ms, EngineHandle, Phase, Query, Reply, RequestKind, SubmitError, Want};
use crate::metrics::{Metrics, PartitionLabels};
use crate::wire::messages::to_command;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A consumed message, decoded: where it came from, its command, its trace.
type Prepared = (Source, Command, Option<Arc<crate::telemetry::Trace>>);

/// How often topic metadata is read to find new partitions.
pub const METADATA_REFRESH: Duration = Duration::from_secs(2);
/// How often the (informational) group offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// One topic's metadata request. It blocks the consumer loop (a stop waits
/// for it), so it is short: a refresh that times out is retried at the next
/// [`METADATA_REFRESH`], and partitions already assigned keep being consumed.
const METADATA_TIMEOUT: Duration = Duration::from_secs(1);
/// Back-pressure: retry a held message every this long while the queue drains.
const DRAIN_POLL: Duration = Duration::from_millis(1);
/// Most warnings about consumer errors per this interval.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// A replica's consumer without partitions looks this often whether it
/// leads (and then assigns them).
const LEADER_POLL: Duration = Duration::from_millis(100);
/// How long a replica's consumer waits before reading again after the
/// leader refused a message for overload.
const OVERLOADED_BACKOFF: Duration = Duration::from_secs(1);

/// The consumer thread.
pub struct KafkaConsumer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaConsumer {
    /// Starts the consumer thread; it begins once the engine serves.
    pub fn start(
        config: KafkaConfig,
        engine: EngineHandle,
        metrics: Arc<Metrics>,
    ) -> Result<KafkaConsumer, KafkaError> {
        let context = StatsContext {
            metrics: metrics.clone(),
            topics: Topic::ALL.map(|t| config.topic_name(t).to_owned()),
        };
        let consumer: BaseConsumer<StatsContext> = config
            .client_config()
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Only used when a journaled position is no longer in the log.
            .set("auto.offset.reset", "earliest")
            // Lag target (design 6): do not let the broker sit on a fetch.
            .set("fetch.wait.max.ms", "10")
            .set("statistics.interval.ms", "1000")
            .create_with_context(context)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            config,
            engine,
            metrics,
            stop: stop.clone(),
            consumer,
            partitions: HashMap::new(),
            assignment: TopicPartitionList::new(),
            paused: false,
            commit: None,
            last_commit: Instant::now(),
            last_refresh: None,
            last_error_log: Cell::new(None),
            in_flight: std::collections::VecDeque::new(),
        };
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || worker.run())
            .map_err(|e| KafkaError::Subscription(e.to_string()))?;
        Ok(KafkaConsumer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops polling and waits for the thread. A message in hand is not
    /// submitted; the next start reads it again from the journaled offset.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("Kafka consumer thread panicked");
            }
        }
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Turns librdkafka's statistics into the per-partition lag in records.
struct StatsContext {
    metrics: Arc<Metrics>,
    topics: [String; 3],
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in &statistics.topics {
            if !self.topics.contains(name) {
                continue;
            }
            for p in topic.partitions.values() {
                if p.partition < 0 || p.hi_offset < 0 || p.app_offset < 0 {
                    continue;
                }
                self.metrics
                    .kafka
                    .consumer_lag_records
                    .get_or_create(&PartitionLabels {
                        topic: name.clone(),
                        partition: p.partition,
                    })
                    .set((p.hi_offset - p.app_offset).max(0));
            }
        }
    }
}

impl ConsumerContext for StatsContext {}

struct PartitionState {
    /// The offset the next message must have (last submitted + 1).
    next_offset: i64,
    message_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

struct Worker {
    config: KafkaConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    consumer: BaseConsumer<StatsContext>,
    partitions: HashMap<(Topic, i32), PartitionState>,
    /// Every assigned partition (for pause / resume).
    assignment: TopicPartitionList,
    paused: bool,
    /// An offsets query in flight: its answer is what gets committed.
    commit: Option<oneshot::Receiver<Reply>>,
    last_commit: Instant,
    last_refresh: Option<Instant>,
    last_error_log: Cell<Option<Instant>>,
    /// On a replica: the replies of what was submitted, oldest first.
    in_flight: std::collections::VecDeque<oneshot::Receiver<Reply>>,
}

/// What became of a message handed to the engine.
enum Submitted {
    Queued,
    /// Refused by a replica that does not lead: the consumer rewound.
    Rewound,
    Stopping,
}

impl Worker {
    fn run(&mut self) {
        if !self.wait_serving() {
            return;
        }
        tracing::info!(brokers = %self.config.brokers, "Kafka consumer started");
        while !self.stopping() {
            if self.engine.is_replica() {
                self.settle_in_flight();
                if !self.engine.leads() {
                    if !self.partitions.is_empty() {
                        self.rewind("this replica does not lead");
                    }
                    std::thread::sleep(LEADER_POLL);
                    continue;
                }
            }
            let refresh_every = if self.engine.is_replica() && self.partitions.is_empty() {
                LEADER_POLL
            } else {
                METADATA_REFRESH
            };
            if self
                .last_refresh
                .is_none_or(|at| at.elapsed() >= refresh_every)
            {
                self.last_refresh = Some(Instant::now());
                self.refresh_assignment();
            }
            self.commit_offsets();
            let polled = match self.consumer.poll(POLL_TIMEOUT) {
                None => None,
                Some(Ok(message)) => self.prepare(&message),
                Some(Err(e)) => {
                    self.log_error("poll", &e);
                    None
                }
            };
            if let Some(polled) = polled {
                if !self.deliver(polled) {
                    break;
                }
            }
        }
        tracing::info!("Kafka consumer stopped");
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn wait_serving(&self) -> bool {
        let phase = self.engine.phase();
        loop {
            match *phase.borrow() {
                Phase::Serving => return true,
                Phase::Stopped => return false,
                Phase::Replaying => {}
            }
            if self.stopping() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Decodes one message into its command; `None` for one already submitted
    /// (a refetch after re-assignment) or of a partition no longer assigned.
    fn prepare(&self, message: &BorrowedMessage<'_>) -> Option<Prepared> {
        let topic = self.config.topic_of(message.topic())?;
        let partition = self.partitions.get(&(topic, message.partition()))?;
        let offset = message.offset();
        if offset < partition.next_offset {
            return None;
        }
        if let Some(ts) = message.timestamp().to_millis() {
            let lag_ms = (now_ms() - ts).max(0);
            partition.message_age.set(lag_ms as f64 / 1000.0);
            self.metrics
                .kafka
                .consumer_lag_seconds
                .observe(lag_ms as f64 / 1000.0);
        }
        let source = Source {
            topic,
            partition: message.partition(),
            offset,
        };
        let trace = crate::telemetry::enabled().then(|| {
            let header = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == "traceparent")
                    .and_then(|h| std::str::from_utf8(h.value?).ok())
            });
            crate::telemetry::consumed(message.topic(), source.partition, offset, header)
        });
        Some((
            source,
            to_command(topic, message.payload().unwrap_or(&[]), source),
            trace,
        ))
    }

    /// Submits a prepared message (with back-pressure) and moves its
    /// partition on. Returns false when stopping.
    fn deliver(&mut self, (source, command, trace): Prepared) -> bool {
        match self.submit(command, trace) {
            Submitted::Queued => {}
            Submitted::Rewound => return true,
            Submitted::Stopping => return false,
        }
        if let Some(p) = self.partitions.get_mut(&(source.topic, source.partition)) {
            p.next_offset = source.offset + 1;
        }
        self.metrics.kafka.consumer_messages_total.inc();
        true
    }

    /// Submits, pausing the partitions while the engine queue is full.
    fn submit(
        &mut self,
        command: Command,
        trace: Option<Arc<crate::telemetry::Trace>>,
    ) -> Submitted {
        loop {
            // A single node needs no reply: the offset is in the state. A
            // replica's is watched (`settle_in_flight`).
            match self
                .engine
                .submit_traced(RequestKind::Command(command, Want::Nothing), trace.clone())
            {
                Ok(reply) => {
                    if self.paused {
                        self.set_paused(false);
                    }
                    if self.engine.is_replica() {
                        self.in_flight.push_back(reply);
                    }
                    return Submitted::Queued;
                }
                Err(SubmitError::Overloaded) => {
                    if !self.paused {
                        self.set_paused(true);
                        self.metrics.kafka.consumer_pauses_total.inc();
                    }
                    let low_water = self.engine.queue_capacity() / 2;
                    while self.engine.queue_len() > low_water && !self.stopping() {
                        std::thread::sleep(DRAIN_POLL);
                    }
                }
                Err(SubmitError::NotLeader(_) | SubmitError::NotCommitted)
                    if self.engine.is_replica() =>
                {
                    self.rewind("the leader refused a message");
                    return Submitted::Rewound;
                }
                Err(
                    SubmitError::NotReady | SubmitError::NotLeader(_) | SubmitError::NotCommitted,
                ) => std::thread::sleep(Duration::from_millis(10)),
                Err(SubmitError::Stopped) => return Submitted::Stopping,
            }
            if self.stopping() {
                return Submitted::Stopping;
            }
        }
    }

    /// On a replica: looks at the replies that came back, oldest first; a
    /// refusal means its message and maybe those after it were not applied,
    /// so the consumer rewinds to the state's offsets.
    fn settle_in_flight(&mut self) {
        while let Some(reply) = self.in_flight.front_mut() {
            match reply.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                Ok(Reply::Refused(e)) => {
                    tracing::info!(error = %e, "a submitted message was refused");
                    self.rewind("a submitted message was refused");
                    if matches!(e, SubmitError::Overloaded) {
                        // The leader takes no writes for now (its ledger is
                        // full): read again later, not every LEADER_POLL.
                        self.last_refresh = Some(Instant::now() + OVERLOADED_BACKOFF);
                    }
                    return;
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.rewind("a submitted message went unanswered");
                    return;
                }
                Ok(_) => {
                    self.in_flight.pop_front();
                }
            }
        }
    }

    /// Drops every partition and what is in flight: the next assignment,
    /// once this replica leads, starts at the state's offsets. Messages
    /// applied meanwhile are read again and skipped by the state.
    fn rewind(&mut self, why: &str) {
        tracing::info!(
            why,
            partitions = self.partitions.len(),
            "Kafka consumer rewinds"
        );
        if let Err(e) = self.consumer.unassign() {
            self.log_error("unassign", &e);
        }
        self.partitions.clear();
        self.assignment = TopicPartitionList::new();
        self.in_flight.clear();
        self.paused = false;
        self.commit = None;
        self.last_refresh = None;
    }

    fn set_paused(&mut self, paused: bool) {
        let result = if paused {
            self.consumer.pause(&self.assignment)
        } else {
            self.consumer.resume(&self.assignment)
        };
        if let Err(e) = result {
            self.log_error(if paused { "pause" } else { "resume" }, &e);
        }
        self.paused = paused;
        tracing::debug!(paused, "Kafka consumer back-pressure");
    }

    /// Finds partitions not yet assigned and (re)assigns everything: known
    /// partitions at the next offset to submit, new ones at the state's
    /// offset + 1 (earliest if the state never saw them).
    fn refresh_assignment(&mut self) {
        let mut new = Vec::new();
        for topic in Topic::ALL {
            // A stop never waits for more than one request (the broker may be gone).
            if self.stopping() {
                return;
            }
            let name = self.config.topic_name(topic).to_owned();
            let metadata = match self.consumer.fetch_metadata(Some(&name), METADATA_TIMEOUT) {
                Ok(m) => m,
                Err(e) => {
                    self.log_error("metadata", &e);
                    continue;
                }
            };
            for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
                for p in t.partitions() {
                    if !self.partitions.contains_key(&(topic, p.id())) {
                        new.push((topic, p.id()));
                    }
                }
            }
        }
        if new.is_empty() {
            return;
        }
        let Some(offsets) = self.query_offsets() else {
            return;
        };
        for (topic, partition) in new {
            let last = offsets
                .iter()
                .find(|(t, p, _)| (*t, *p) == (topic, partition))
                .map(|&(_, _, o)| o);
            let labels = PartitionLabels {
                topic: self.config.topic_name(topic).to_owned(),
                partition,
            };
            let message_age = self
                .metrics
                .kafka
                .consumer_message_age_seconds
                .get_or_create(&labels)
                .clone();
            tracing::info!(topic = %labels.topic, partition, last_applied = ?last, "assigning partition");
            self.partitions.insert(
                (topic, partition),
                PartitionState {
                    // -1: never seen; the earliest offset is >= 0.
                    next_offset: last.map_or(-1, |o| o + 1),
                    message_age,
                },
            );
        }
        let mut tpl = TopicPartitionList::new();
        for (&(topic, partition), state) in &self.partitions {
            let offset = if state.next_offset < 0 {
                Offset::Beginning
            } else {
                Offset::Offset(state.next_offset)
            };
            let name = self.config.topic_name(topic);
            if let Err(e) = tpl.add_partition_offset(name, partition, offset) {
                self.log_error("assignment", &e);
            }
        }
        match self.consumer.assign(&tpl) {
            Ok(()) => self.assignment = tpl,
            Err(e) => {
                self.log_error("assign", &e);
                // Try again at the next refresh.
                self.partitions.clear();
            }
        }
    }

    /// The state's offsets, through the engine queue: everything submitted
    /// before is counted.
    fn query_offsets(&self) -> Option<Vec<(Topic, i32, i64)>> {
        loop {
            match self.engine.submit(RequestKind::Query(Query::Offsets)) {
                Ok(rx) => {
                    return match rx.blocking_recv() {
                        Ok(Reply::Offsets(offsets)) => Some(offsets),
                        _ => None,
                    }
                }
                Err(SubmitError::Overloaded) => std::thread::sleep(DRAIN_POLL),
                Err(_) => return None,
            }
            if self.stopping() {
                return None;
            }
        }
    }

    /// Commits the state's durable offsets to the group, for lag tooling.
    fn commit_offsets(&mut self) {
        if let Some(rx) = &mut self.commit {
            match rx.try_recv() {
                Ok(Reply::Offsets(offsets)) => {
                    self.commit = None;
                    let mut tpl = TopicPartitionList::new();
                    for (topic, partition, offset) in offsets {
                        let name = self.config.topic_name(topic);
                        let _ =
                            tpl.add_partition_offset(name, partition, Offset::Offset(offset + 1));
                    }
                    if tpl.count() > 0 {
                        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                            tracing::debug!(error = %e, "informational offset commit");
                        }
                    }
                }
                Ok(_) | Err(oneshot::error::TryRecvError::Closed) => self.commit = None,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            return;
        }
        if self.last_commit.elapsed() >= COMMIT_INTERVAL && !self.partitions.is_empty() {
            self.last_commit = Instant::now();
            self.commit = self.engine.submit(RequestKind::Query(Query::Offsets)).ok();
        }
    }

    fn log_error(&self, what: &str, error: &KafkaError) {
        if self
            .last_error_log
            .get()
            .is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL)
        {
            self.last_error_log.set(Some(Instant::now()));
            tracing::warn!(error = %error, what, "Kafka consumer");
        }
    }
}

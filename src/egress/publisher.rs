//! The outbox publisher thread: takes the durable [`OutboxBatch`]es the writer
//! hands over, produces them (idempotent producer, in order), and advances the
//! watermark over every batch the broker fully acknowledged.
//!
//! * Pipelined: records are produced as they come; acknowledgements arrive
//!   asynchronously and the watermark moves over the longest fully
//!   acknowledged prefix of batches.
//! * Broker outage: librdkafka buffers and retries without a timeout
//!   (`message.timeout.ms = 0`); once its queue is full, records wait here.
//!   The backlog and its age are metered and logged. The writer never waits.
//! * A failed delivery is retried after [`RETRY_BACKOFF`]; the watermark does
//!   not pass it. A record the broker can never take (over the message size
//!   limit, malformed: [`permanent_error`]) is not retried: it is logged at
//!   error with its sequence and topic, counted in `outbox_dropped_total`,
//!   and passed over, so the records after it are published. It stays in the
//!   WAL (until retention); the watermark passes it, so it is not republished.
//! * Bounded memory: at most the window (`--outbox-window-records`) is held
//!   here and in the feed; beyond it the writer spills and the records are
//!   re-derived from the WAL as the broker takes them ([`super::spill`]).
//! * Shutdown: when the writer is gone the publisher drains for at most
//!   [`DRAIN_MAX`], stores the watermark and exits; what is left is
//!   republished from the WAL at the next start.

use super::dlq::{self, Fetched, Refetcher};
use super::outbox::{OutboxBatch, OutboxItem, OutboxRecord, OutboxSink};
use super::spill::{Intake, Window};
use super::watermark::{WatermarkError, WatermarkFile};
use crate::config::KafkaConfig;
use crate::domain::{Amount, Topic};
use crate::metrics::{DlqLabels, Metrics};
use crate::proto::events;
use crate::state_machine::Event;
use crossbeam_channel::{Receiver, Sender};
use prost::Message as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, ProducerContext};
use rdkafka::ClientContext;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Least time between two writes of the watermark file.
pub const WATERMARK_PERSIST_INTERVAL: Duration = Duration::from_millis(50);
/// How long a stopping publisher keeps draining before it gives up.
pub const DRAIN_MAX: Duration = Duration::from_secs(5);
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// How long one dead-letter refetch may block the loop.
const REFETCH_WAIT: Duration = Duration::from_millis(500);
/// A backlog older than this is logged (at most every [`BACKLOG_LOG_INTERVAL`]).
const BACKLOG_WARN_AGE: Duration = Duration::from_secs(5);
const BACKLOG_LOG_INTERVAL: Duration = Duration::from_secs(10);
const BACKLOG_OBSERVE_INTERVAL: Duration = Duration::from_millis(100);
/// Delivery opaque: batch id in the high bits, record index in the low ones.
const INDEX_BITS: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Watermark(#[from] WatermarkError),
    #[error("Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("outbox thread: {0}")]
    Thread(std::io::Error),
}

/// The running publisher thread.
pub struct Outbox {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Outbox {
    /// Loads the watermark, creates the producer and starts the thread. The
    /// returned sink goes into the engine config; the thread ends once every
    /// clone of it is dropped (the writer has stopped) and the drain is over.
    pub fn start(
        config: &KafkaConfig,
        data_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<(Outbox, OutboxSink), OutboxError> {
        Outbox::start_at(config, data_dir, metrics, None)
    }

    /// [`Outbox::start`], from `watermark` when given instead of the file's
    /// (a replica group's leader starts from the replicated watermark; the
    /// file then only records what this replica's publisher had acknowledged).
    pub fn start_at(
        config: &KafkaConfig,
        data_dir: &Path,
        metrics: Arc<Metrics>,
        watermark: Option<u64>,
    ) -> Result<(Outbox, OutboxSink), OutboxError> {
        let file = WatermarkFile::new(data_dir);
        let watermark = match watermark {
            Some(w) => w,
            None => file.load()?,
        };
        let durable = Arc::new(AtomicU64::new(watermark));
        let (tx, feed) = crossbeam_channel::unbounded();
        let window = Window::new(config.outbox_window_records);
        let (delivered_tx, delivered) = crossbeam_channel::unbounded();
        let producer = config
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Never give up on a record: an outage only grows the backlog.
            .set("message.timeout.ms", "0")
            .set("linger.ms", "1")
            .set("queue.buffering.max.messages", "500000")
            .create_with_context(Deliveries { tx: delivered_tx })?;
        metrics.kafka.outbox_watermark.set(watermark as i64);
        // Every (topic, reason) series exists from the start at 0, so an
        // alert on its increase fires on the first drop.
        let topics = Topics::new(config);
        let targets = std::iter::once(topics.events.clone())
            .chain(topics.sources.iter().map(|(_, dlq)| dlq.clone()));
        for topic in targets {
            for reason in PERMANENT_ERRORS.iter().map(|(_, name)| *name) {
                let labels = crate::metrics::DroppedLabels {
                    topic: topic.clone(),
                    reason,
                };
                let _ = metrics.kafka.outbox_dropped_total.get_or_create(&labels);
            }
        }
        tracing::info!(watermark, file = %file.path().display(), "outbox watermark loaded");
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            stop: stop.clone(),
            topics,
            refetcher: Refetcher::new(config.clone()),
            intake: Intake::new(feed, window.clone()),
            spills_seen: 0,
            producer,
            delivered,
            file,
            durable: durable.clone(),
            metrics,
            pending: VecDeque::new(),
            first_id: 0,
            cursor: 0,
            retry: VecDeque::new(),
            retry_at: None,
            acked_through: watermark,
            persisted: watermark,
            last_persist: Instant::now(),
            last_backlog_log: None,
            last_backlog_observed: Instant::now(),
            backlog: 0,
            payload: Vec::with_capacity(256),
            key: String::with_capacity(20),
            event: events::AccountEvent::default(),
        };
        let thread = std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || {
                // Started by a replica's writer when it leads: not on its core.
                crate::engine::yield_to_the_writer("outbox");
                publisher.run()
            })
            .map_err(OutboxError::Thread)?;
        Ok((
            Outbox {
                thread: Some(thread),
                stop,
            },
            OutboxSink::new(tx, durable, window),
        ))
    }

    /// Drains (at most [`DRAIN_MAX`]) and waits for the thread. Call after the
    /// engine has stopped: its last hand-off is then in the feed.
    pub fn join(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("outbox thread panicked");
            }
        }
    }
}

struct Topics {
    events: String,
    /// Source topic name and its DLQ, by `Topic as usize - 1`.
    sources: [(String, String); 3],
}

impl Topics {
    fn new(config: &KafkaConfig) -> Topics {
        let pair = |t: Topic| (config.topic_name(t).to_owned(), config.dlq_topic(t));
        Topics {
            events: config.events_topic.clone(),
            sources: Topic::ALL.map(pair),
        }
    }

    fn source(&self, topic: Topic) -> &(String, String) {
        &self.sources[topic as usize - 1]
    }
}

/// Delivery reports, forwarded to the publisher loop.
struct Deliveries {
    tx: Sender<(usize, Option<KafkaError>)>,
}

impl ClientContext for Deliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "outbox producer");
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        let _ = self.tx.send((opaque, error));
    }
}

struct Pending {
    through_sequence: u64,
    records: Vec<OutboxRecord>,
    acked: Vec<bool>,
    unacked: usize,
    /// Records handed to the producer (a prefix).
    produced: usize,
}

struct Publisher {
    /// Set by [`Outbox::join`]: drain and exit even if a sink clone lives on.
    stop: Arc<AtomicBool>,
    topics: Topics,
    refetcher: Refetcher,
    intake: Intake,
    /// `Window::spills` already counted in the metric.
    spills_seen: u64,
    producer: BaseProducer<Deliveries>,
    delivered: Receiver<(usize, Option<KafkaError>)>,
    file: WatermarkFile,
    durable: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    pending: VecDeque<Pending>,
    /// Batch id of `pending[0]`.
    first_id: u64,
    /// Index into `pending` of the first batch not wholly produced.
    cursor: usize,
    /// Failed deliveries to produce again: (batch id, record index).
    retry: VecDeque<(u64, usize)>,
    retry_at: Option<Instant>,
    acked_through: u64,
    persisted: u64,
    last_persist: Instant,
    last_backlog_log: Option<Instant>,
    last_backlog_observed: Instant,
    /// Records handed over and not yet acknowledged.
    backlog: usize,
    /// Reused encoding buffers: no allocation per event.
    payload: Vec<u8>,
    key: String,
    event: events::AccountEvent,
}

enum Sent {
    Ok,
    /// Stop producing for now (queue full, broker unreachable, error).
    Later,
}

impl Publisher {
    fn run(mut self) {
        let mut drain_deadline = None;
        loop {
            let busy = self.cursor < self.pending.len() || self.retry_due();
            let wait = if busy {
                Duration::ZERO
            } else if self.pending.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(2)
            };
            if drain_deadline.is_none() && self.stop.load(Ordering::Acquire) {
                // What is still in the feed is in memory already; a spill's
                // records stay in the WAL for the next start.
                while let Ok(Some(batch)) = self.intake.next(Duration::ZERO, 0) {
                    self.accept(batch);
                    if self.intake.spilling() {
                        break;
                    }
                }
                drain_deadline = Some(Instant::now() + DRAIN_MAX);
            }
            if drain_deadline.is_none() {
                match self.intake.next(wait, self.backlog) {
                    Ok(Some(batch)) => {
                        self.accept(batch);
                        while let Ok(Some(batch)) = self.intake.next(Duration::ZERO, self.backlog) {
                            self.accept(batch);
                        }
                    }
                    Ok(None) => {}
                    Err(_) => drain_deadline = Some(Instant::now() + DRAIN_MAX),
                }
            } else {
                std::thread::sleep(wait.max(Duration::from_millis(1)));
            }
            self.produce();
            self.producer.poll(Duration::ZERO);
            while let Ok((opaque, error)) = self.delivered.try_recv() {
                self.on_delivery(opaque, error);
            }
            self.advance();
            self.intake.window().set_pending(self.backlog);
            self.observe_backlog();
            match drain_deadline {
                Some(deadline) if self.pending.is_empty() || Instant::now() >= deadline => break,
                _ => self.persist(false),
            }
        }
        self.persist(true);
        let left = self.backlog;
        tracing::info!(
            watermark = self.persisted,
            unpublished = left,
            "outbox stopped (what is left is republished from the WAL at the next start)"
        );
    }

    fn accept(&mut self, batch: OutboxBatch) {
        if batch.records.is_empty() && self.pending.is_empty() {
            self.acked_through = self.acked_through.max(batch.through_sequence);
            return;
        }
        assert!(
            batch.records.len() < 1 << INDEX_BITS,
            "batch fits the opaque"
        );
        let n = batch.records.len();
        self.backlog += n;
        self.pending.push_back(Pending {
            through_sequence: batch.through_sequence,
            acked: vec![false; n],
            unacked: n,
            produced: 0,
            records: batch.records,
        });
    }

    fn retry_due(&self) -> bool {
        !self.retry.is_empty() && self.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    /// Produces failed records due for a retry, then new ones in order.
    fn produce(&mut self) {
        while self.retry_due() {
            let Some(&(id, index)) = self.retry.front() else {
                break;
            };
            let Some(slot) = id.checked_sub(self.first_id) else {
                self.retry.pop_front();
                continue;
            };
            match self.send(slot as usize, index) {
                Sent::Ok => {
                    self.retry.pop_front();
                }
                Sent::Later => return,
            }
        }
        while self.cursor < self.pending.len() {
            let batch = &self.pending[self.cursor];
            if batch.produced == batch.records.len() {
                self.cursor += 1;
                continue;
            }
            let index = batch.produced;
            match self.send(self.cursor, index) {
                Sent::Ok => self.pending[self.cursor].produced += 1,
                Sent::Later => return,
            }
        }
    }

    fn send(&mut self, slot: usize, index: usize) -> Sent {
        let id = self.first_id + slot as u64;
        let opaque = ((id << INDEX_BITS) | index as u64) as usize;
        let record = self.pending[slot].records[index];
        let result = match record.item {
            OutboxItem::Event { index: n, event } => {
                self.encode_event(&record, n, &event);
                self.key.clear();
                let _ = write!(self.key, "{}", event.account_id.0);
                let mut out = BaseRecord::with_opaque_to(&self.topics.events, opaque)
                    .key(self.key.as_bytes())
                    .payload(&self.payload)
                    .timestamp(record.timestamp_ms);
                if let Some(trace) = &record.trace {
                    out = out.headers(rdkafka::message::OwnedHeaders::new().insert(
                        rdkafka::message::Header {
                            key: "traceparent",
                            value: Some(&trace.header()),
                        },
                    ));
                }
                self.producer.send(out).map_err(|(e, _)| e)
            }
            OutboxItem::DeadLetter { source, reason } => {
                let original = match self.refetcher.fetch(source, REFETCH_WAIT) {
                    Fetched::Message(m) => Some(m),
                    Fetched::Gone => {
                        tracing::error!(?source, "dead letter: the original message is gone from its topic; publishing the headers only");
                        None
                    }
                    Fetched::NotYet => return Sent::Later,
                };
                let payload = original.as_ref().and_then(|m| m.payload()).unwrap_or(&[]);
                let (topic, dlq_topic) = self.topics.source(source.topic);
                let mut text = dlq::reason_text(reason, source, payload);
                if original.is_none() {
                    text.push_str(" (original message no longer in the topic)");
                }
                let headers = dlq::headers(
                    original.as_ref().and_then(|m| m.headers()),
                    &text,
                    topic,
                    source,
                );
                let mut out = BaseRecord::with_opaque_to(dlq_topic, opaque).headers(headers);
                if let Some(m) = &original {
                    if let Some(p) = m.payload() {
                        out = out.payload(p);
                    }
                    if let Some(k) = m.key() {
                        out = out.key(k);
                    }
                    if let Some(ts) = m.timestamp().to_millis() {
                        out = out.timestamp(ts);
                    }
                }
                self.producer.send(out).map_err(|(e, _)| e)
            }
        };
        match result {
            Ok(()) => Sent::Ok,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                // librdkafka's buffer is full (slow or unreachable broker).
                self.producer.poll(Duration::from_millis(1));
                Sent::Later
            }
            Err(e) => match permanent_error(&e) {
                // Refused before it left (over `message.max.bytes`): never
                // deliverable, so passed over instead of blocking the rest.
                Some(reason) => {
                    self.drop_record(slot, index, &e, reason);
                    Sent::Ok
                }
                None => {
                    tracing::warn!(error = %e, sequence = record.sequence, "outbox produce; retrying");
                    self.retry_at = Some(Instant::now() + RETRY_BACKOFF);
                    Sent::Later
                }
            },
        }
    }

    fn encode_event(&mut self, record: &OutboxRecord, index: u32, e: &Event) {
        let ev = &mut self.event;
        ev.event_id.clear();
        let _ = write!(ev.event_id, "{}-{}", record.sequence, index);
        ev.account_id = e.account_id.0;
        ev.r#type = e.kind as i32;
        ev.order_id.clear();
        if let Some(o) = &e.order_id {
            ev.order_id.push_str(o.as_str());
        }
        ev.asset.clear();
        if let Some(a) = &e.asset {
            ev.asset.push_str(a.as_str());
        }
        write_amount(&mut ev.amount, e.amount);
        write_amount(&mut ev.available_after, e.available_after);
        write_amount(&mut ev.reserved_after, e.reserved_after);
        ev.sequence = record.sequence;
        ev.timestamp = record.timestamp_ms;
        ev.cause_id.clear();
        ev.cause_id.push_str(record.cause_id.as_str());
        ev.reason.clear();
        ev.reason.push_str(e.reason.as_str());
        self.payload.clear();
        // Encoding into a Vec cannot run out of room.
        let _ = ev.encode(&mut self.payload);
    }

    /// Settles a record the broker can never take: logged, counted, and
    /// acknowledged as far as the watermark is concerned.
    fn drop_record(&mut self, slot: usize, index: usize, error: &KafkaError, reason: &'static str) {
        let record = self.pending[slot].records[index];
        let topic = match record.item {
            OutboxItem::Event { .. } => self.topics.events.clone(),
            OutboxItem::DeadLetter { source, .. } => self.topics.source(source.topic).1.clone(),
        };
        tracing::error!(
            error = %error,
            reason,
            sequence = record.sequence,
            topic,
            "outbox record refused for good: not published (it stays in the WAL; the records after it go on)"
        );
        self.metrics
            .kafka
            .outbox_dropped_total
            .get_or_create(&crate::metrics::DroppedLabels { topic, reason })
            .inc();
        let batch = &mut self.pending[slot];
        if !std::mem::replace(&mut batch.acked[index], true) {
            batch.unacked -= 1;
            self.backlog -= 1;
        }
    }

    fn on_delivery(&mut self, opaque: usize, error: Option<KafkaError>) {
        let id = opaque as u64 >> INDEX_BITS;
        let index = opaque & ((1 << INDEX_BITS) - 1);
        let Some(slot) = id.checked_sub(self.first_id) else {
            return; // a batch already acknowledged (a duplicate report)
        };
        let Some(batch) = self.pending.get_mut(slot as usize) else {
            return;
        };
        if let Some(error) = error {
            if let Some(reason) = permanent_error(&error) {
                self.drop_record(slot as usize, index, &error, reason);
                return;
            }
            tracing::warn!(
                error = %error,
                sequence = batch.records[index].sequence,
                "outbox delivery failed; retrying"
            );
            self.retry.push_back((id, index));
            self.retry_at = Some(Instant::now() + RETRY_BACKOFF);
            return;
        }
        if std::mem::replace(&mut batch.acked[index], true) {
            return;
        }
        batch.unacked -= 1;
        self.backlog -= 1;
        let k = &self.metrics.kafka;
        k.outbox_published_total.inc();
        if let OutboxItem::DeadLetter { source, reason } = batch.records[index].item {
            k.dlq_messages_total
                .get_or_create(&DlqLabels {
                    topic: self.topics.source(source.topic).0.clone(),
                    reason: reason.name(),
                })
                .inc();
        }
    }

    /// Moves the in-memory watermark over every wholly acknowledged batch.
    fn advance(&mut self) {
        while let Some(front) = self.pending.front() {
            if front.unacked > 0 || front.produced < front.records.len() {
                break;
            }
            self.acked_through = self.acked_through.max(front.through_sequence);
            self.pending.pop_front();
            self.first_id += 1;
            self.cursor = self.cursor.saturating_sub(1);
        }
    }

    /// Stores the watermark (rate-limited unless `now`), then publishes it to
    /// the engine: retention may only rely on what is on disk.
    fn persist(&mut self, now: bool) {
        if self.acked_through == self.persisted {
            return;
        }
        if !now && self.last_persist.elapsed() < WATERMARK_PERSIST_INTERVAL {
            return;
        }
        self.last_persist = Instant::now();
        match self.file.store(self.acked_through) {
            Ok(()) => {
                self.persisted = self.acked_through;
                self.durable.store(self.persisted, Ordering::Release);
                self.metrics
                    .kafka
                    .outbox_watermark
                    .set(self.persisted as i64);
            }
            Err(e) => tracing::error!(error = %e, "outbox watermark not stored; retrying"),
        }
    }

    /// Backlog gauges every [`BACKLOG_OBSERVE_INTERVAL`]; the age is that of the
    /// oldest unacknowledged record of the oldest batch.
    fn observe_backlog(&mut self) {
        if self.last_backlog_observed.elapsed() < BACKLOG_OBSERVE_INTERVAL {
            return;
        }
        self.last_backlog_observed = Instant::now();
        let backlog = self.backlog;
        let oldest_ms = self.pending.front().and_then(|p| {
            p.records
                .iter()
                .zip(&p.acked)
                .find(|(_, acked)| !**acked)
                .map(|(r, _)| r.timestamp_ms)
        });
        let age = oldest_ms.map_or(Duration::ZERO, |ts| {
            Duration::from_millis(crate::engine::now_ms().saturating_sub(ts).max(0) as u64)
        });
        let k = &self.metrics.kafka;
        let window = self.intake.window();
        k.outbox_held_records.set(window.held() as i64);
        let spills = window.spills();
        k.outbox_spills_total.inc_by(spills - self.spills_seen);
        self.spills_seen = spills;
        k.outbox_backlog_records.set(backlog as i64);
        k.outbox_backlog_age_seconds.set(age.as_secs_f64());
        let log_due = self
            .last_backlog_log
            .is_none_or(|at| at.elapsed() >= BACKLOG_LOG_INTERVAL);
        if age >= BACKLOG_WARN_AGE && log_due {
            self.last_backlog_log = Some(Instant::now());
            tracing::warn!(
                backlog,
                age_ms = age.as_millis() as u64,
                watermark = self.persisted,
                "outbox backlog: the broker is not acknowledging; events wait (the WAL keeps them)"
            );
        }
    }
}

/// An amount's canonical text into a reused string.
fn write_amount(out: &mut String, value: Amount) {
    out.clear();
    let _ = write!(out, "{value}");
}

/// The name of a produce or delivery error that no retry can cure (the
/// record itself is refused), or `None` for one worth retrying (the broker
/// unreachable, a leader moving, a topic not there yet).
pub fn permanent_error(error: &KafkaError) -> Option<&'static str> {
    let code = error.rdkafka_error_code()?;
    PERMANENT_ERRORS
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, name)| *name)
}

/// The errors no retry can cure, with their metric label.
const PERMANENT_ERRORS: [(RDKafkaErrorCode, &str); 6] = [
    (
        RDKafkaErrorCode::MessageSizeTooLarge,
        "MESSAGE_SIZE_TOO_LARGE",
    ),
    (RDKafkaErrorCode::InvalidMessageSize, "INVALID_MESSAGE_SIZE"),
    (
        RDKafkaErrorCode::MessageBatchTooLarge,
        "MESSAGE_BATCH_TOO_LARGE",
    ),
    (RDKafkaErrorCode::InvalidMessage, "INVALID_MESSAGE"),
    (RDKafkaErrorCode::InvalidRecord, "INVALID_RECORD"),
    (RDKafkaErrorCode::InvalidTimestamp, "INVALID_TIMESTAMP"),
];

//! Prometheus metrics and the `/metrics` endpoint (text exposition format).
//!
//! Names carry their unit last (`_seconds`, `_total`, `_bytes`). The engine
//! thread touches only atomics and one histogram per batch (not per command).
//!
//! Nothing on a request's path takes a lock: histograms are [`Histogram`]s of
//! atomic buckets (prometheus-client's own takes a write lock per
//! observation), and an RPC's labelled series are resolved once per thread
//! ([`Metrics::observe_rpc`]), not looked up in their family on every call.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A histogram of fixed buckets whose observations are atomic additions: no
/// lock, so handlers on every core and the engine thread never wait on each
/// other or on a scrape. A scrape reads the buckets one by one, so it may see
/// an observation in `count` and not yet in its bucket (or the reverse); the
/// next scrape sees it whole.
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds, increasing; a last bucket (+Inf) follows them.
    bounds: Box<[f64]>,
    /// Per bucket (not cumulative), `bounds.len() + 1` of them.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum's `f64` bits, added to by compare-and-swap.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: impl Iterator<Item = f64>) -> Histogram {
        // The overflow bucket is implicit: a non-finite bound is dropped.
        let bounds: Box<[f64]> = bounds.filter(|bound| bound.is_finite()).collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "increasing bounds");
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            inner: Arc::new(HistogramInner {
                bounds,
                buckets,
                count: AtomicU64::new(0),
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let inner = &*self.inner;
        // The first bucket whose bound is >= v (NaN lands in +Inf).
        let i = inner.bounds.partition_point(|&bound| bound < v);
        inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        inner.count.fetch_add(1, Ordering::Relaxed);
        let mut sum = inner.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(sum) + v).to_bits();
            match inner
                .sum
                .compare_exchange_weak(sum, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => sum = now,
            }
        }
    }

    /// Sum, count, and `(upper bound, count)` per bucket (not cumulative),
    /// the last bound `f64::INFINITY` (`le="+Inf"`).
    pub fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let buckets = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter())
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        (
            f64::from_bits(inner.sum.load(Ordering::Relaxed)),
            inner.count.load(Ordering::Relaxed),
            buckets,
        )
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.get();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// An RPC's series for one (rpc, caller, outcome), resolved from the families.
#[derive(Clone)]
struct RpcSeries {
    latency: Histogram,
    outcomes: Counter,
}

/// Which [`Metrics`] and labels a resolved series belongs to: the instance's
/// id and the address and length of each `'static` label string (the same
/// text at two addresses is only resolved twice, to the same series). Labels
/// are `'static`, so the cache is bounded by the program's label strings.
type SeriesKey = (u64, [(usize, usize); 3]);

fn label_key(label: &'static str) -> (usize, usize) {
    (label.as_ptr() as usize, label.len())
}

thread_local! {
    static RPC_SERIES: RefCell<HashMap<SeriesKey, RpcSeries>> = RefCell::new(HashMap::new());
}

static METRICS_IDS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub rpc: &'static str,
    /// The caller's name from the tokens file (`anonymous` without one).
    pub caller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub rpc: &'static str,
    pub caller: &'static str,
    /// A `Result` name without prefix, or a gRPC code name for errors.
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 10 µs .. ~5 s
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    /// Tells apart the instances (tests run several) in the per-thread cache.
    id: u64,
    pub rpc_latency_seconds: HistogramFamily<RpcLabels>,
    pub rpc_outcomes_total: Family<OutcomeLabels, Counter>,
    pub engine_queue_depth: Gauge,
    pub engine_batch_size: Histogram,
    pub engine_commands_total: Counter,
    pub engine_last_sequence: Gauge,
    pub wal_sync_seconds: Histogram,
    pub wal_disk_usage_bytes: Gauge,
    pub wal_segments: Gauge,
    pub replay_seconds: Gauge<f64, AtomicU64>,
    pub replay_records: Gauge,
    pub overdrawn_accounts: Gauge,
    pub accounts: Gauge,
    pub ready: Gauge,
    pub snapshot_age_seconds: Gauge<f64, AtomicU64>,
    pub snapshot_sequence: Gauge,
    pub snapshot_seconds: Histogram,
    /// The writer's only snapshot work: copying the changed rows.
    pub snapshot_copy_seconds: Histogram,
    /// Deltas handed to the snapshotter (at most one waits at a time).
    pub snapshot_deltas_total: Counter,
    pub snapshot_failures_total: Counter,
    pub snapshot_history_events_total: Counter,
    /// gRPC connections open now, and those closed at accept for the limit.
    pub connections: Gauge,
    pub connections_refused_total: Counter,
    /// Consumers, dead-letter queues and the outbox (zero without Kafka).
    pub kafka: KafkaMetrics,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("account");
        let m = Metrics {
            rpc_latency_seconds: Family::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            ),
            rpc_outcomes_total: Family::default(),
            engine_queue_depth: Gauge::default(),
            engine_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            engine_commands_total: Counter::default(),
            engine_last_sequence: Gauge::default(),
            wal_sync_seconds: latency_histogram(),
            wal_disk_usage_bytes: Gauge::default(),
            wal_segments: Gauge::default(),
            replay_seconds: Gauge::default(),
            replay_records: Gauge::default(),
            overdrawn_accounts: Gauge::default(),
            accounts: Gauge::default(),
            ready: Gauge::default(),
            snapshot_age_seconds: Gauge::default(),
            snapshot_sequence: Gauge::default(),
            snapshot_seconds: latency_histogram(),
            snapshot_copy_seconds: latency_histogram(),
            snapshot_deltas_total: Counter::default(),
            snapshot_failures_total: Counter::default(),
            snapshot_history_events_total: Counter::default(),
            connections: Gauge::default(),
            connections_refused_total: Counter::default(),
            kafka: KafkaMetrics::new(),
            registry: Registry::default(),
            id: METRICS_IDS.fetch_add(1, Ordering::Relaxed),
        };
        registry.register(
            "rpc_latency_seconds",
            "gRPC handling latency per RPC, from receipt to reply",
            m.rpc_latency_seconds.clone(),
        );
        registry.register(
            "rpc_outcomes",
            "gRPC calls per RPC and outcome",
            m.rpc_outcomes_total.clone(),
        );
        registry.register(
            "engine_queue_depth",
            "Requests waiting in the ingress queue",
            m.engine_queue_depth.clone(),
        );
        registry.register(
            "engine_batch_size",
            "Requests per engine batch (one WAL sync each)",
            m.engine_batch_size.clone(),
        );
        registry.register(
            "engine_commands",
            "Commands journaled and applied",
            m.engine_commands_total.clone(),
        );
        registry.register(
            "engine_last_sequence",
            "Sequence of the last journaled command",
            m.engine_last_sequence.clone(),
        );
        registry.register(
            "wal_sync_seconds",
            "Latency of one WAL group-commit sync",
            m.wal_sync_seconds.clone(),
        );
        registry.register(
            "wal_disk_usage_bytes",
            "Bytes of WAL segment files",
            m.wal_disk_usage_bytes.clone(),
        );
        registry.register(
            "wal_segments",
            "WAL segment files on disk",
            m.wal_segments.clone(),
        );
        registry.register(
            "replay_seconds",
            "Duration of the last WAL replay at start-up",
            m.replay_seconds.clone(),
        );
        registry.register(
            "replay_records",
            "Records replayed at start-up",
            m.replay_records.clone(),
        );
        registry.register(
            "overdrawn_accounts",
            "Accounts flagged overdrawn",
            m.overdrawn_accounts.clone(),
        );
        registry.register("accounts", "Open accounts", m.accounts.clone());
        registry.register(
            "ready",
            "1 once the WAL is replayed and the service serves",
            m.ready.clone(),
        );
        registry.register(
            "snapshot_age_seconds",
            "Time since the last durable PostgreSQL snapshot",
            m.snapshot_age_seconds.clone(),
        );
        registry.register(
            "snapshot_sequence",
            "Sequence of the last durable PostgreSQL snapshot",
            m.snapshot_sequence.clone(),
        );
        registry.register(
            "snapshot_seconds",
            "Duration of one snapshot transaction",
            m.snapshot_seconds.clone(),
        );
        registry.register(
            "snapshot_copy_seconds",
            "Time the engine thread spends copying changed rows for a snapshot",
            m.snapshot_copy_seconds.clone(),
        );
        registry.register(
            "snapshot_deltas",
            "Deltas of changed rows handed to the snapshotter",
            m.snapshot_deltas_total.clone(),
        );
        registry.register(
            "snapshot_failures",
            "Snapshot writes that failed (retried)",
            m.snapshot_failures_total.clone(),
        );
        registry.register(
            "snapshot_history_events",
            "Account events written to the account_events table",
            m.snapshot_history_events_total.clone(),
        );
        registry.register(
            "grpc_connections",
            "gRPC connections open",
            m.connections.clone(),
        );
        registry.register(
            "grpc_connections_refused",
            "gRPC connections closed at accept: --max-connections were open",
            m.connections_refused_total.clone(),
        );
        m.kafka.register(&mut registry);
        Arc::new(Metrics { registry, ..m })
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The same in the Prometheus text format 0.0.4, for a scraper that does
    /// not ask for OpenMetrics (`promtool check metrics`, older tools).
    pub fn encode_text_004(&self) -> String {
        text_004(&self.encode())
    }

    /// Records one RPC's latency and outcome. The labelled series are looked
    /// up in their families (a lock) only the first time a thread sees these
    /// labels; after that, from the thread's own cache: a hash lookup and
    /// atomic additions.
    pub fn observe_rpc(
        &self,
        rpc: &'static str,
        caller: &'static str,
        outcome: &'static str,
        started: std::time::Instant,
    ) {
        let elapsed = started.elapsed().as_secs_f64();
        let key = (
            self.id,
            [label_key(rpc), label_key(caller), label_key(outcome)],
        );
        RPC_SERIES.with_borrow_mut(|cache| {
            let series = cache.entry(key).or_insert_with(|| RpcSeries {
                latency: self
                    .rpc_latency_seconds
                    .get_or_create(&RpcLabels { rpc, caller })
                    .clone(),
                outcomes: self
                    .rpc_outcomes_total
                    .get_or_create(&OutcomeLabels {
                        rpc,
                        caller,
                        outcome,
                    })
                    .clone(),
            });
            series.latency.observe(elapsed);
            series.outcomes.inc();
        });
    }
}

/// Serves `GET /metrics` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    let app = Router::new().route(
        "/metrics",
        get(move |headers: axum::http::HeaderMap| {
            let metrics = metrics.clone();
            async move {
                // Prometheus asks for OpenMetrics first; others get 0.0.4.
                let openmetrics = headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                let (content_type, body) = if openmetrics {
                    (
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    )
                } else {
                    (
                        "text/plain; version=0.0.4; charset=utf-8",
                        metrics.encode_text_004(),
                    )
                };
                ([(axum::http::header::CONTENT_TYPE, content_type)], body)
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DlqLabels {
    /// The source topic (the record went to `<topic>.dlq`).
    pub topic: String,
    /// `NOT_PROTOBUF`, `INVALID_FIELD`, or the engine's result name.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// The topic the record was for.
    pub topic: String,
    /// Why the broker can never take it, e.g. `MESSAGE_SIZE_TOO_LARGE`.
    pub reason: &'static str,
}

/// Kafka consumers, dead-letter queues and the outbox publisher.
pub struct KafkaMetrics {
    pub consumer_lag_records: Family<PartitionLabels, Gauge>,
    pub consumer_message_age_seconds: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
    pub consumer_lag_seconds: Histogram,
    pub consumer_messages_total: Counter,
    pub consumer_pauses_total: Counter,
    pub dlq_messages_total: Family<DlqLabels, Counter>,
    pub outbox_backlog_records: Gauge,
    pub outbox_backlog_age_seconds: Gauge<f64, AtomicU64>,
    pub outbox_watermark: Gauge,
    pub outbox_published_total: Counter,
    /// Records the outbox holds in memory (bounded by its window).
    pub outbox_held_records: Gauge,
    /// With replicas: records derived from committed commands that the
    /// broker's acknowledgement has not yet reached (the replicated ledger).
    pub outbox_ledger_records: Gauge,
    pub outbox_spills_total: Counter,
    /// Records the broker refused for good, passed over (see the publisher).
    pub outbox_dropped_total: Family<DroppedLabels, Counter>,
}

impl KafkaMetrics {
    fn new() -> KafkaMetrics {
        KafkaMetrics {
            consumer_lag_records: Family::default(),
            consumer_message_age_seconds: Family::default(),
            // 100 µs .. ~100 s
            consumer_lag_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 20)),
            consumer_messages_total: Counter::default(),
            consumer_pauses_total: Counter::default(),
            dlq_messages_total: Family::default(),
            outbox_backlog_records: Gauge::default(),
            outbox_backlog_age_seconds: Gauge::default(),
            outbox_watermark: Gauge::default(),
            outbox_published_total: Counter::default(),
            outbox_held_records: Gauge::default(),
            outbox_ledger_records: Gauge::default(),
            outbox_spills_total: Counter::default(),
            outbox_dropped_total: Family::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "kafka_consumer_lag_records",
            "Records between a partition's high watermark and the consumer's position",
            self.consumer_lag_records.clone(),
        );
        registry.register(
            "kafka_consumer_message_age_seconds",
            "Age of the last consumed message of a partition at consumption (from its timestamp)",
            self.consumer_message_age_seconds.clone(),
        );
        registry.register(
            "kafka_consumer_lag_seconds",
            "Age of each consumed message at consumption (from its timestamp)",
            self.consumer_lag_seconds.clone(),
        );
        registry.register(
            "kafka_consumer_messages",
            "Inbound Kafka messages submitted to the engine",
            self.consumer_messages_total.clone(),
        );
        registry.register(
            "kafka_consumer_pauses",
            "Times the consumer paused its partitions because the engine queue was full",
            self.consumer_pauses_total.clone(),
        );
        registry.register(
            "dlq_messages",
            "Messages published to a dead-letter queue, per source topic and reason",
            self.dlq_messages_total.clone(),
        );
        registry.register(
            "outbox_backlog_records",
            "Durable account events and dead letters not yet acknowledged by the broker",
            self.outbox_backlog_records.clone(),
        );
        registry.register(
            "outbox_backlog_age_seconds",
            "Journaled age of the oldest record not yet acknowledged by the broker",
            self.outbox_backlog_age_seconds.clone(),
        );
        registry.register(
            "outbox_watermark",
            "Sequence through which every outbox record is acknowledged (durable)",
            self.outbox_watermark.clone(),
        );
        registry.register(
            "outbox_published",
            "Outbox records acknowledged by the broker",
            self.outbox_published_total.clone(),
        );
        registry.register(
            "outbox_held_records",
            "Outbox records in memory, waiting for the broker (bounded by --outbox-window-records)",
            self.outbox_held_records.clone(),
        );
        registry.register(
            "outbox_ledger_records",
            "With replicas: outbox records of committed commands not yet acknowledged by the broker, held by every replica",
            self.outbox_ledger_records.clone(),
        );
        registry.register(
            "outbox_spills",
            "Times the outbox window was full and later events were left to be re-derived from the WAL",
            self.outbox_spills_total.clone(),
        );
        registry.register(
            "outbox_dropped",
            "Outbox records the broker refused for good (too large, malformed): logged and passed over",
            self.outbox_dropped_total.clone(),
        );
    }
}

/// OpenMetrics text to the Prometheus text format 0.0.4: a counter family is
/// named with its `_total` suffix in `# HELP` / `# TYPE`, and there is no
/// `# UNIT` or `# EOF` line. Samples are the same.
fn text_004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_004_names_counter_families_with_total() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total 3\n# HELP a_g G.\n# TYPE a_g gauge\na_g 1\n# EOF\n";
        assert_eq!(
            super::text_004(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total 3\n# HELP a_g G.\n# TYPE a_g gauge\na_g 1\n"
        );
    }

    /// Encodes one histogram registered alone.
    fn encoded<
        M: prometheus_client::encoding::EncodeMetric
            + prometheus_client::metrics::TypedMetric
            + Send
            + Sync
            + std::fmt::Debug
            + 'static,
    >(
        metric: M,
    ) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("h", "A histogram", metric);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn atomic_histogram_encodes_as_the_locking_one_does() {
        let bounds = || prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 6);
        let ours = super::Histogram::new(bounds());
        let theirs = prometheus_client::metrics::histogram::Histogram::new(bounds());
        // On bounds, between them, below the first, above the last, and NaN-free.
        for v in [
            0.0005, 0.001, 0.0015, 0.002, 0.004, 0.0041, 0.032, 0.033, 100.0, 0.001,
        ] {
            ours.observe(v);
            theirs.observe(v);
        }
        let text = encoded(ours.clone());
        assert_eq!(text, encoded(theirs));
        assert!(text.contains("h_count 10"), "{text}");
        let (_, count, buckets) = ours.get();
        assert_eq!(count, 10);
        // 0.0005 and twice 0.001 in the first bucket (bounds are inclusive).
        assert_eq!(buckets[0], (0.001, 3));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 2)));
    }

    #[test]
    fn atomic_histogram_loses_no_observation_across_threads() {
        let h = super::Histogram::new([1.0, 2.0].into_iter());
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        h.observe(if t % 2 == 0 { 1.0 } else { 3.0 });
                    }
                });
            }
        });
        let (sum, count, buckets) = h.get();
        assert_eq!(count, 40_000);
        // Sums of small integers are exact in f64.
        assert_eq!(sum, 80_000.0);
        assert_eq!(
            buckets,
            vec![(1.0, 20_000), (2.0, 0), (f64::INFINITY, 20_000)]
        );
    }

    #[test]
    fn rpc_series_resolved_per_thread_count_every_call_on_one_series() {
        let a = super::Metrics::new();
        let b = super::Metrics::new();
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..5 {
                        a.observe_rpc("Reserve", "desk", "OK", started);
                    }
                    a.observe_rpc("Reserve", "desk", "INSUFFICIENT_FUNDS", started);
                });
            }
        });
        b.observe_rpc("Reserve", "desk", "OK", started);
        let text = a.encode();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} in {text}"))
                .to_string()
        };
        assert!(
            line("account_rpc_outcomes_total{rpc=\"Reserve\",caller=\"desk\",outcome=\"OK\"}")
                .ends_with(" 15")
        );
        assert!(line("account_rpc_outcomes_total{rpc=\"Reserve\",caller=\"desk\",outcome=\"INSUFFICIENT_FUNDS\"}").ends_with(" 3"));
        assert!(
            line("account_rpc_latency_seconds_count{rpc=\"Reserve\",caller=\"desk\"}")
                .ends_with(" 18")
        );
        // The other instance's call is its own.
        assert!(b
            .encode()
            .contains("account_rpc_latency_seconds_count{rpc=\"Reserve\",caller=\"desk\"} 1\n"));
    }
}

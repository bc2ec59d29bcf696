//! Prometheus metrics and the `/metrics` endpoint (text exposition format).
//!
//! Names carry their unit last (`_seconds`, `_total`, `_bytes`). The engine
//! thread touches only atomics and one histogram per batch (not per command).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

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
            kafka: KafkaMetrics::new(),
            registry: Registry::default(),
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

    pub fn observe_rpc(
        &self,
        rpc: &'static str,
        caller: &'static str,
        outcome: &'static str,
        started: std::time::Instant,
    ) {
        self.rpc_latency_seconds
            .get_or_create(&RpcLabels { rpc, caller })
            .observe(started.elapsed().as_secs_f64());
        self.rpc_outcomes_total
            .get_or_create(&OutcomeLabels {
                rpc,
                caller,
                outcome,
            })
            .inc();
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

/// Kafka consumers, dead-letter queues and the outbox publisher.
pub struct KafkaMetrics {
    pub consumer_lag_records: Family<PartitionLabels, Gauge>,
    pub consumer_lag_ms: Family<PartitionLabels, Gauge>,
    pub consumer_lag_seconds: Histogram,
    pub consumer_messages_total: Counter,
    pub consumer_pauses_total: Counter,
    pub dlq_messages_total: Family<DlqLabels, Counter>,
    pub outbox_backlog_records: Gauge,
    pub outbox_backlog_age_seconds: Gauge<f64, AtomicU64>,
    pub outbox_watermark: Gauge,
    pub outbox_published_total: Counter,
}

impl KafkaMetrics {
    fn new() -> KafkaMetrics {
        KafkaMetrics {
            consumer_lag_records: Family::default(),
            consumer_lag_ms: Family::default(),
            // 100 µs .. ~100 s
            consumer_lag_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 20)),
            consumer_messages_total: Counter::default(),
            consumer_pauses_total: Counter::default(),
            dlq_messages_total: Family::default(),
            outbox_backlog_records: Gauge::default(),
            outbox_backlog_age_seconds: Gauge::default(),
            outbox_watermark: Gauge::default(),
            outbox_published_total: Counter::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "kafka_consumer_lag_records",
            "Records between a partition's high watermark and the consumer's position",
            self.consumer_lag_records.clone(),
        );
        registry.register(
            "kafka_consumer_lag_ms",
            "Age of the last consumed message of a partition at consumption (from its timestamp)",
            self.consumer_lag_ms.clone(),
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
}

//! Flags and environment of `account-service serve`, validated once.

use crate::domain::Topic;
use crate::engine::{Durability, EngineConfig};
use crate::state_machine::StateConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The Kafka topics of the service (`serve`, `kafka-topics`).
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaTopics {
    /// Inbound fills (FillEvent). Its dead letters go to `<topic>.dlq`.
    #[arg(
        long,
        env = "ACCOUNT_KAFKA_FILLS_TOPIC",
        default_value = "trading.fills"
    )]
    pub kafka_fills_topic: String,

    /// Inbound deposits (DepositEvent). Dead letters: `<topic>.dlq`.
    #[arg(
        long,
        env = "ACCOUNT_KAFKA_DEPOSITS_TOPIC",
        default_value = "payment.deposits"
    )]
    pub kafka_deposits_topic: String,

    /// Inbound withdrawals (WithdrawEvent). Dead letters: `<topic>.dlq`.
    #[arg(
        long,
        env = "ACCOUNT_KAFKA_WITHDRAWALS_TOPIC",
        default_value = "payment.withdrawals"
    )]
    pub kafka_withdrawals_topic: String,

    /// Outbound AccountEvents, keyed by account_id.
    #[arg(
        long,
        env = "ACCOUNT_KAFKA_EVENTS_TOPIC",
        default_value = "trading.account.events"
    )]
    pub kafka_events_topic: String,
}

impl KafkaTopics {
    /// Inbound topics, the outbound one, and each inbound topic's dead letters.
    pub fn all(&self) -> Vec<String> {
        let inbound = [
            &self.kafka_fills_topic,
            &self.kafka_deposits_topic,
            &self.kafka_withdrawals_topic,
        ];
        let mut all: Vec<String> = inbound.iter().map(|t| t.to_string()).collect();
        all.push(self.kafka_events_topic.clone());
        all.extend(inbound.iter().map(|t| format!("{t}.dlq")));
        all
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory of the write-ahead log (created if missing).
    #[arg(long, env = "ACCOUNT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// gRPC listen address (AccountService, AdminService, health, reflection).
    #[arg(long, env = "ACCOUNT_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Prometheus `/metrics` listen address.
    #[arg(long, env = "ACCOUNT_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,

    /// `sync`: a reply leaves only once its journal record is durable (group
    /// commit). `async`: replies leave before the sync, which follows within
    /// 5 ms; a crash can lose the last few milliseconds of acknowledged writes.
    #[arg(long, env = "ACCOUNT_DURABILITY", value_enum, default_value_t = Durability::Sync)]
    pub durability: Durability,

    /// Kafka bootstrap servers (host:port,...). Unset: no Kafka.
    #[arg(long, env = "ACCOUNT_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Consumer group of the inbound topics. Informational only: the offsets
    /// that count are journaled with each command (exactly once across restarts);
    /// the group's committed offsets just let lag tooling see progress.
    #[arg(long, env = "ACCOUNT_KAFKA_GROUP", default_value = "account-service")]
    pub kafka_group: String,

    #[command(flatten)]
    pub topics: KafkaTopics,

    /// A librdkafka setting for every Kafka client, `KEY=VALUE`, repeatable
    /// (`security.protocol=SSL`, `ssl.ca.location=...`, `sasl.mechanism=...`).
    /// Values are never logged.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub kafka_option: Vec<String>,

    /// Account events and dead letters the outbox holds in memory at most
    /// while the broker does not take them (about 350 bytes each). Past it,
    /// they are re-derived from the WAL once the broker takes records again.
    #[arg(long, env = "ACCOUNT_OUTBOX_WINDOW_RECORDS", default_value_t = crate::egress::spill::WINDOW_RECORDS_DEFAULT,
          value_parser = window_records)]
    pub outbox_window_records: usize,

    /// PostgreSQL URL for snapshots and the read model
    /// (e.g. `host=127.0.0.1 port=5432 user=postgres dbname=accounts` or
    /// `postgres://user@host/db`). Unset: no PostgreSQL, the WAL keeps everything.
    #[arg(long, env = "ACCOUNT_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// TLS for gRPC: the server's certificate chain (PEM). With `--tls-key`.
    #[arg(long, env = "ACCOUNT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "ACCOUNT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: clients must present a certificate signed by one of these
    /// CAs (PEM). Needs `--tls-cert`.
    #[arg(long, env = "ACCOUNT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Callers and roles: one line per caller, `<name> <order|admin|read>
    /// <sha256 of the token, hex>`; calls carry `authorization: Bearer
    /// <token>`. Unset: no authentication, and the gRPC listener must be
    /// loopback (or `--insecure-no-auth`).
    #[arg(long, env = "ACCOUNT_AUTH_TOKENS_FILE")]
    pub auth_tokens: Option<PathBuf>,

    /// Server-side deadline of a call, in ms: one the engine has not answered
    /// by then gets `CANCELLED` (its command may still be journaled: retry
    /// with the same key).
    #[arg(long, env = "ACCOUNT_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Per-caller rate limit: calls per second each caller (each name of the
    /// tokens file, or `anonymous`) may make, sustained. 0: no limit.
    #[arg(long, env = "ACCOUNT_RATE_LIMIT_RPS", default_value_t = 0)]
    pub rate_limit_rps: u32,

    /// Calls a caller may make at once after a quiet spell (with
    /// `--rate-limit-rps`; default: one second's worth).
    #[arg(long, env = "ACCOUNT_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,

    /// gRPC connections open at once; one more is closed as soon as it is
    /// accepted (`account_grpc_connections_refused_total`). The process
    /// raises its open-file limit to the hard limit at start and warns when
    /// that is too low for this.
    #[arg(long, env = "ACCOUNT_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,

    /// A gRPC connection from which nothing is read this long is closed (a
    /// live HTTP/2 client answers the server's ping every 30 s of quiet, so
    /// this closes only silent sockets; below 40 s idle clients are closed too,
    /// and reconnect).
    #[arg(
        long,
        env = "ACCOUNT_IDLE_CONNECTION_TIMEOUT_SECS",
        default_value_t = 120
    )]
    pub idle_connection_timeout_secs: u64,

    /// Export traces by OpenTelemetry OTLP/gRPC to this collector
    /// (`http://127.0.0.1:4317`). Off by default, and then free.
    #[arg(long, env = "ACCOUNT_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Fraction of traces started here that are recorded (a caller's
    /// `traceparent` decides for its own trace).
    #[arg(
        long,
        env = "ACCOUNT_OTLP_SAMPLE_RATIO",
        default_value_t = 1.0,
        requires = "otlp_endpoint"
    )]
    pub otlp_sample_ratio: f64,

    /// Allow a non-loopback `--grpc-addr` without `--auth-tokens`: anyone who
    /// reaches the port may move money.
    #[arg(long, env = "ACCOUNT_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Start from the PostgreSQL snapshot alone when the data directory's WAL
    /// is empty (a lost disk). Everything journaled after that snapshot is
    /// lost and its sequence numbers are used again; without this flag such a
    /// start is refused.
    #[arg(long, env = "ACCOUNT_RESTORE_FROM_SNAPSHOT", requires = "postgres_url")]
    pub restore_from_snapshot: bool,

    /// Longest a statement of a snapshot write, or the snapshot load at
    /// start-up, may take before it is abandoned and retried (a hung
    /// PostgreSQL), in seconds.
    #[arg(long, env = "ACCOUNT_SNAPSHOT_TIMEOUT_SECS", default_value_t = 30)]
    pub snapshot_timeout_secs: u64,

    /// Keep every account event in PostgreSQL (`account_events`, written with
    /// each snapshot; read with `account-service history`). Its derivation
    /// keeps a second copy of the state on the snapshotter thread.
    #[arg(
        long,
        env = "ACCOUNT_HISTORY",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub history: bool,

    /// Time between two incremental snapshots to PostgreSQL, in ms.
    #[arg(long, env = "ACCOUNT_SNAPSHOT_INTERVAL_MS", default_value_t = 1000)]
    pub snapshot_interval_ms: u64,

    /// Also snapshot once this many records were journaled since the last
    /// snapshot, whichever comes first.
    #[arg(
        long,
        env = "ACCOUNT_SNAPSHOT_EVERY_RECORDS",
        default_value_t = 500_000
    )]
    pub snapshot_every_records: u64,

    /// Capacity of each ingress lane (gRPC clients; the Kafka consumer): a full
    /// clients lane answers RESOURCE_EXHAUSTED, a full feeds lane pauses the consumer.
    #[arg(long, env = "ACCOUNT_QUEUE_CAPACITY", default_value_t = 65_536)]
    pub queue_capacity: usize,

    /// Most requests in one engine batch (one WAL sync).
    #[arg(long, env = "ACCOUNT_BATCH_SIZE_MAX", default_value_t = 4_096)]
    pub batch_size_max: usize,

    /// How long idempotency keys and closed reservations are kept, in seconds.
    /// A change is journaled at start-up and applies from then on; history
    /// keeps the window it was decided with.
    #[arg(
        long,
        env = "ACCOUNT_IDEMPOTENCY_WINDOW_SECS",
        default_value_t = 86_400
    )]
    pub idempotency_window_secs: u64,

    /// WAL segment size in MiB (files are preallocated).
    #[arg(long, env = "ACCOUNT_WAL_SEGMENT_MIB", default_value_t = 64)]
    pub wal_segment_mib: u64,

    /// Do not pin the engine thread to a core.
    #[arg(long, env = "ACCOUNT_NO_PIN")]
    pub no_pin: bool,

    /// Orders to allocate room for at start-up (reservations and the
    /// idempotency keys of their Reserve and Unreserve): the tables then never
    /// resize below that, and a resize copies a whole table while the writer
    /// waits (tens of milliseconds at a million orders). Size it to the orders
    /// expected within the idempotency window; about 0.65 KiB per order, all of
    /// it allocated and written at start-up, before the WAL replay (about 0.35 s
    /// per million orders here). 0: grow on demand.
    #[arg(long, env = "ACCOUNT_CAPACITY_ORDERS", default_value_t = 0)]
    pub capacity_orders: usize,

    /// Make the room of `--capacity-orders` on transparent huge pages
    /// (`madvise`; the kernel's `transparent_hugepage` set to `madvise` or
    /// `always`): fewer TLB misses on the tables' random probes. Start-up may
    /// take longer while the kernel compacts memory for them.
    #[arg(long, env = "ACCOUNT_HUGE_PAGES")]
    pub huge_pages: bool,

    /// Replicas (design 7): this replica's id in its group. With
    /// `--raft-addr` and `--peers`; unset, the service is one embedded node.
    #[arg(long, env = "ACCOUNT_NODE_ID", requires_all = ["raft_addr", "peers"])]
    pub node_id: Option<u64>,

    /// Where this replica's raft port listens: replication between the
    /// replicas, apart from client traffic.
    #[arg(long, env = "ACCOUNT_RAFT_ADDR", requires = "node_id")]
    pub raft_addr: Option<SocketAddr>,

    /// The raft address of every member of the group, this one included:
    /// `1=HOST:PORT,2=HOST:PORT,3=HOST:PORT`. A fresh group is initialized
    /// once, by its lowest id, when every member answers.
    #[arg(long, env = "ACCOUNT_PEERS", requires = "node_id", value_parser = peers)]
    pub peers: Option<Peers>,

    /// With replicas: raft entries (writer batches) between two snapshots of
    /// the state; the log keeps as many below the last snapshot, and a
    /// replica further behind than that is sent the snapshot.
    #[arg(long, env = "ACCOUNT_RAFT_SNAPSHOT_ENTRIES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub raft_snapshot_entries: u64,

    /// With replicas: the leader's heartbeat, in ms; also how long it waits
    /// for a follower's AppendEntries answer before sending again. A
    /// follower that hears nothing for 6 to 12 heartbeats starts an
    /// election: this sets how fast a lost leader is replaced, and how long
    /// a stall (a busy machine, a slow disk) may last before it counts as a
    /// loss.
    #[arg(long, env = "ACCOUNT_RAFT_HEARTBEAT_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub raft_heartbeat_ms: u64,

    /// With replicas and Kafka or PostgreSQL history: events every replica
    /// holds at most for the broker and the history (about 350 bytes each,
    /// on every replica). Past it, while the broker or PostgreSQL is away,
    /// the leader refuses writes with RESOURCE_EXHAUSTED (reads go on) until
    /// the backlog drains: memory stays bounded. A single node instead
    /// re-derives from its WAL; replicas do not yet.
    #[arg(long, env = "ACCOUNT_REPLICA_LEDGER_RECORDS_MAX", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub replica_ledger_records_max: u64,

    /// With replicas and `--auth-tokens`: the bearer token this replica sends
    /// to the others' raft ports (a caller of role `replica` in their tokens
    /// files). Prefer the environment variable, which `ps` does not show.
    #[arg(long, env = "ACCOUNT_RAFT_TOKEN", hide_env_values = true)]
    pub raft_token: Option<String>,
}

/// `--peers`: node id to raft address.
pub type Peers = std::collections::BTreeMap<u64, String>;

fn peers(s: &str) -> Result<Peers, String> {
    let mut peers = Peers::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: the node id must be a number"))?;
        if addr.trim().rsplit_once(':').is_none() {
            return Err(format!("{part:?}: expected ID=HOST:PORT"));
        }
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("node id {id} is named twice"));
        }
    }
    if peers.is_empty() {
        return Err("no member named".into());
    }
    Ok(peers)
}

/// Kafka wiring: brokers, consumer group and topic names (defaults: the seed's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group: String,
    pub fills_topic: String,
    pub deposits_topic: String,
    pub withdrawals_topic: String,
    pub events_topic: String,
    /// `--kafka-option`: librdkafka settings for every client (SSL, SASL, ...).
    pub options: KafkaOptions,
    /// `--outbox-window-records`: outbox records held in memory at most.
    pub outbox_window_records: usize,
}

/// librdkafka settings given with `--kafka-option KEY=VALUE`. Their values can
/// be secrets (`sasl.password`, `ssl.key.password`): `Debug` shows the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaOptions(pub Vec<(String, String)>);

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=<redacted>")))
            .finish()
    }
}

impl KafkaOptions {
    /// Parses `KEY=VALUE` arguments.
    pub fn parse(args: &[String]) -> Result<KafkaOptions, ConfigError> {
        args.iter()
            .map(|a| match a.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
                _ => Err(ConfigError::KafkaOption(
                    a.split('=').next().unwrap_or("").to_owned(),
                )),
            })
            .collect::<Result<_, _>>()
            .map(KafkaOptions)
    }
}

impl KafkaConfig {
    /// A librdkafka client configuration: the brokers, then `--kafka-option`;
    /// each client then sets what its correctness needs (those keys win).
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        kafka_client_config(&self.brokers, &self.options)
    }

    /// The seed's topic names and the default group.
    pub fn new(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            group: "account-service".into(),
            fills_topic: "trading.fills".into(),
            deposits_topic: "payment.deposits".into(),
            withdrawals_topic: "payment.withdrawals".into(),
            events_topic: "trading.account.events".into(),
            options: KafkaOptions::default(),
            outbox_window_records: crate::egress::spill::WINDOW_RECORDS_DEFAULT,
        }
    }

    pub fn topic_name(&self, topic: Topic) -> &str {
        match topic {
            Topic::Fills => &self.fills_topic,
            Topic::Deposits => &self.deposits_topic,
            Topic::Withdrawals => &self.withdrawals_topic,
        }
    }

    /// The role of an inbound topic name.
    pub fn topic_of(&self, name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|&t| self.topic_name(t) == name)
    }

    pub fn dlq_topic(&self, topic: Topic) -> String {
        format!("{}.dlq", self.topic_name(topic))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{0} must be greater than zero")]
    Zero(&'static str),
    #[error("--wal-segment-mib must be between 1 and 4096")]
    SegmentSize,
    #[error("--idempotency-window-secs is too large (milliseconds must fit an i64)")]
    WindowTooLong,
    #[error("Kafka topic names must be distinct and non-empty")]
    Topics,
    #[error("--kafka-option {0:?}: expected KEY=VALUE")]
    KafkaOption(String),
    #[error("--node-id {0} is not one of --peers")]
    NotAPeer(u64),
    #[error("--{0} does not apply to replicas (--peers): a replica starts from its raft snapshot and log, never from PostgreSQL")]
    NotWithReplicas(&'static str),
    #[error("--raft-token is needed with --auth-tokens and replicas: the token (role `replica`) this replica shows the others' raft ports")]
    NoRaftToken,
    #[error("--tls-client-ca is needed with --tls-cert and replicas: the CA of the replicas' certificates (each replica shows its --tls-cert to the others)")]
    NoRaftCa,
}

impl ServeArgs {
    /// `--node-id`, `--raft-addr`, `--peers`; `None`: one embedded node.
    pub fn replica_config(&self) -> Result<Option<crate::replica::ReplicaConfig>, ConfigError> {
        let (Some(node_id), Some(raft_addr), Some(peers)) =
            (self.node_id, self.raft_addr, self.peers.clone())
        else {
            return Ok(None);
        };
        if !peers.contains_key(&node_id) {
            return Err(ConfigError::NotAPeer(node_id));
        }
        if self.restore_from_snapshot {
            return Err(ConfigError::NotWithReplicas("restore-from-snapshot"));
        }
        if self.auth_tokens.is_some() && self.raft_token.is_none() {
            return Err(ConfigError::NoRaftToken);
        }
        if self.tls_cert.is_some() && self.tls_client_ca.is_none() {
            return Err(ConfigError::NoRaftCa);
        }
        Ok(Some(crate::replica::ReplicaConfig {
            node_id,
            raft_addr,
            peers,
            grpc_addr: self.grpc_addr.to_string(),
            snapshot_entries: self.raft_snapshot_entries,
            heartbeat_ms: self.raft_heartbeat_ms,
            ledger_records_max: self.replica_ledger_records_max as usize,
            security: Default::default(),
        }))
    }

    /// `--rate-limit-rps` / `--rate-limit-burst`; `None` when off.
    pub fn rate_limit(&self) -> Result<Option<crate::ingress::limits::RateLimit>, ConfigError> {
        if self.rate_limit_rps == 0 {
            return Ok(None);
        }
        let burst = self.rate_limit_burst.unwrap_or(self.rate_limit_rps);
        if burst == 0 {
            return Err(ConfigError::Zero("rate-limit-burst"));
        }
        Ok(Some(crate::ingress::limits::RateLimit {
            rps: self.rate_limit_rps,
            burst,
        }))
    }

    /// The Kafka wiring, if `--kafka-brokers` is set.
    pub fn kafka_config(&self) -> Result<Option<KafkaConfig>, ConfigError> {
        let Some(brokers) = &self.kafka_brokers else {
            return Ok(None);
        };
        let config = KafkaConfig {
            brokers: brokers.clone(),
            group: self.kafka_group.clone(),
            fills_topic: self.topics.kafka_fills_topic.clone(),
            deposits_topic: self.topics.kafka_deposits_topic.clone(),
            withdrawals_topic: self.topics.kafka_withdrawals_topic.clone(),
            events_topic: self.topics.kafka_events_topic.clone(),
            options: KafkaOptions::parse(&self.kafka_option)?,
            outbox_window_records: self.outbox_window_records,
        };
        let mut names = vec![
            &config.fills_topic,
            &config.deposits_topic,
            &config.withdrawals_topic,
            &config.events_topic,
        ];
        let distinct = names.len();
        names.sort();
        names.dedup();
        if names.len() != distinct || names.iter().any(|n| n.is_empty()) || brokers.is_empty() {
            return Err(ConfigError::Topics);
        }
        Ok(Some(config))
    }

    /// Checks the limits and builds the engine configuration.
    pub fn engine_config(&self) -> Result<EngineConfig, ConfigError> {
        if self.queue_capacity == 0 {
            return Err(ConfigError::Zero("queue-capacity"));
        }
        if self.batch_size_max == 0 {
            return Err(ConfigError::Zero("batch-size-max"));
        }
        if self.idempotency_window_secs == 0 {
            return Err(ConfigError::Zero("idempotency-window-secs"));
        }
        if !(1..=4096).contains(&self.wal_segment_mib) {
            return Err(ConfigError::SegmentSize);
        }
        if self.snapshot_interval_ms == 0 {
            return Err(ConfigError::Zero("snapshot-interval-ms"));
        }
        if self.snapshot_every_records == 0 {
            return Err(ConfigError::Zero("snapshot-every-records"));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::Zero("request-timeout-ms"));
        }
        if self.snapshot_timeout_secs == 0 {
            return Err(ConfigError::Zero("snapshot-timeout-secs"));
        }
        let mut config = EngineConfig::new(&self.data_dir);
        config.snapshot = self
            .postgres_url
            .clone()
            .map(|url| crate::snapshot::SnapshotConfig {
                interval_ms: self.snapshot_interval_ms,
                every_records: self.snapshot_every_records,
                restore_from_snapshot: self.restore_from_snapshot,
                timeout: std::time::Duration::from_secs(self.snapshot_timeout_secs),
                history: self.history,
                ..crate::snapshot::SnapshotConfig::new(url)
            });
        config.wal.segment_size_bytes = self.wal_segment_mib * 1024 * 1024;
        config.durability = self.durability;
        config.queue_capacity = self.queue_capacity;
        config.batch_size_max = self.batch_size_max;
        config.pin_core = !self.no_pin;
        config.capacity_orders = self.capacity_orders;
        config.huge_pages = self.huge_pages;
        let idempotency_window_ms = i64::try_from(self.idempotency_window_secs)
            .ok()
            .and_then(|secs| secs.checked_mul(1000))
            .ok_or(ConfigError::WindowTooLong)?;
        config.state = StateConfig {
            idempotency_window_ms,
            ..StateConfig::default()
        };
        Ok(config)
    }
}

/// Brokers plus `--kafka-option`, the start of every librdkafka client.
pub fn kafka_client_config(brokers: &str, options: &KafkaOptions) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (key, value) in &options.0 {
        c.set(key, value);
    }
    c
}

/// `--outbox-window-records`: a count of at least 1.
fn window_records(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: a number of records, at least 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct Test {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let node = if extra.contains(&"--node-id") {
            &[][..]
        } else {
            &["--node-id", "2"][..]
        };
        let base = [
            "serve",
            "--raft-addr",
            "127.0.0.1:7203",
            "--peers",
            "1=h:1,2=h:2,3=h:3",
        ];
        let args = base.iter().chain(node).chain(extra).copied();
        <Test as clap::Parser>::try_parse_from(args).unwrap().serve
    }

    #[test]
    fn a_replica_is_secured_as_the_grpc_port_or_refuses_to_start() {
        let config = serve_args(&[]).replica_config().unwrap().unwrap();
        assert_eq!((config.node_id, config.peers.len()), (2, 3));
        let refused = |extra: &[&str]| serve_args(extra).replica_config().unwrap_err();
        assert!(matches!(
            refused(&["--auth-tokens", "t"]),
            ConfigError::NoRaftToken
        ));
        assert!(matches!(
            refused(&["--tls-cert", "c", "--tls-key", "k"]),
            ConfigError::NoRaftCa
        ));
        assert!(matches!(
            refused(&[
                "--postgres-url",
                "postgres://h/db",
                "--restore-from-snapshot"
            ]),
            ConfigError::NotWithReplicas("restore-from-snapshot")
        ));
        let ok = serve_args(&["--auth-tokens", "t", "--raft-token", "x"]);
        assert!(ok.replica_config().unwrap().is_some());
        let stranger = serve_args(&["--node-id", "9"])
            .replica_config()
            .unwrap_err();
        assert!(matches!(stranger, ConfigError::NotAPeer(9)));
    }

    #[test]
    fn huge_pages_are_asked_for_only_with_the_flag() {
        let engine = |extra: &[&str]| serve_args(extra).engine_config().unwrap();
        assert!(!engine(&["--capacity-orders", "10"]).huge_pages);
        let asked = engine(&["--capacity-orders", "10", "--huge-pages"]);
        assert!(asked.huge_pages && asked.capacity_orders == 10);
    }

    #[test]
    fn kafka_options_parse_and_never_show_their_values() {
        let args = [
            "security.protocol=SASL_SSL".to_owned(),
            "sasl.password=hunter2=x".to_owned(),
        ];
        let options = KafkaOptions::parse(&args).unwrap();
        assert_eq!(options.0[1], ("sasl.password".into(), "hunter2=x".into()));
        let shown = format!("{options:?}");
        assert!(
            shown.contains("sasl.password") && !shown.contains("hunter2"),
            "{shown}"
        );
        let c = kafka_client_config("127.0.0.1:9092", &options);
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        for bad in ["no-equals", "=value"] {
            assert!(matches!(
                KafkaOptions::parse(&[bad.to_owned()]),
                Err(ConfigError::KafkaOption(_))
            ));
        }
    }
}

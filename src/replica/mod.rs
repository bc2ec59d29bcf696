//! Replicas (design 7): one account shard as a group of 3 (or 5) replicas on
//! openraft, so it survives the loss of a machine.
//!
//! ```text
//! gRPC ─► lanes ─► REPLICA WRITER (one thread, owns the State)
//!                   │ leader: a batch of requests → one raft entry (proposer)
//!                   │         replies held until the entry is applied
//!                   │ every replica: committed entries → the same pure `apply`
//!                   ▼
//!         openraft ─► log: the `wal` crate (log.rs), synced before acks
//!                  ─► peers: tonic on --raft-addr (network.rs)
//!                  ─► state machine (machine.rs) ─► the writer, in log order
//! ```
//!
//! * Only the leader's writer takes commands. Each batch it takes is one raft
//!   entry; a reply leaves only once that entry is **committed** (durable on a
//!   majority, each replica syncing its own log) and applied.
//! * Every replica applies committed entries with `State::apply`, in log
//!   order, so its state digest equals the leader's at every sequence: a hot
//!   standby. Command sequences count commands, not entries, exactly as on a
//!   single node.
//! * A follower answers client calls with `UNAVAILABLE` and the leader's
//!   client address in the `leader` trailer; so does a leader that lost its
//!   quorum (it checks with heartbeats), so a minority never acknowledges.
//! * Restart: the state starts from this replica's last snapshot, and
//!   openraft re-applies the committed entries after it from the log.
//! * Every `--raft-snapshot-entries` entries each replica snapshots its
//!   state (its own serialization, machine.rs, taken from a shadow copy on
//!   another thread, shadow.rs) and purges its log below; a replica too far
//!   behind the leader's log is sent the snapshot.
//! * Membership changes at run time (`AddReplica`: a learner that catches
//!   up, then a voter; `RemoveReplica`) are raft entries like any other.
//! * The raft port has the gRPC port's TLS (mutual between replicas) and
//!   tokens (role `replica`): [`RaftSecurity`].
//!
//! * With Kafka on, only the leader consumes and publishes. Offsets are in
//!   the replicated state (each fill's command carries its offset), so a new
//!   leader's consumer resumes where the committed entries end; account
//!   events are derived by every replica into a replicated ledger and
//!   published by the leader, which journals what the broker acknowledged
//!   (outbox.rs): a failover republishes at most the last moments' events,
//!   with their original ids.
//!
//! * With PostgreSQL on, only the leader writes snapshots (the read model
//!   and its history, duties.rs), recording its raft term; a new leader's
//!   first snapshot is a full one. Start-up never reads PostgreSQL: a
//!   replica starts from its raft snapshot and log.

mod duties;
pub mod log;
mod machine;
pub mod network;
pub mod outbox;
mod shadow;
mod writer;

use crate::engine::{EngineConfig, EngineError, EngineHandle};
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub type NodeId = u64;

/// What a replica tells the others about itself (openraft's node metadata).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// Where its raft port listens (`--raft-addr`).
    pub raft_addr: String,
    /// Where its clients connect (`--grpc-addr`): the `leader` trailer.
    pub grpc_addr: String,
}

/// The application data of one raft entry: one batch of the leader's writer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The writer that proposed it (random per process) and its proposal
    /// number: the replies wait there, nowhere else.
    pub origin: u64,
    pub proposal: u64,
    /// Journal records (`engine::codec`): a command or an all-or-nothing
    /// basket each, applied in order, one sequence each.
    pub records: Vec<Vec<u8>>,
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {:x}/{} of {} records",
            self.origin,
            self.proposal,
            self.records.len()
        )
    }
}

openraft::declare_raft_types!(
    /// The replicas' openraft types.
    pub TypeConfig:
        D = Batch,
        R = (),
        NodeId = NodeId,
        Node = Member,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// Who leads, as this replica last saw it; read on every submit (atomics).
#[derive(Default)]
pub struct Leadership {
    /// This replica leads and its quorum answered its last check.
    serving: AtomicBool,
    term: AtomicU64,
    /// The leader's client address, when one is known.
    leader: Mutex<Option<String>>,
}

impl Leadership {
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// The leader's gRPC address, for the `leader` trailer.
    pub fn leader(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
}

/// `--node-id`, `--raft-addr`, `--peers`.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub raft_addr: SocketAddr,
    /// Raft address of every member, this one included.
    pub peers: BTreeMap<NodeId, String>,
    /// This replica's client address, advertised to the others.
    pub grpc_addr: String,
    /// Entries between two snapshots (`--raft-snapshot-entries`), and kept
    /// in the log below the last one.
    pub snapshot_entries: u64,
    /// `--raft-heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// `--replica-ledger-records-max`.
    pub ledger_records_max: usize,
    pub security: RaftSecurity,
}

/// How the raft port is secured: as the gRPC port (design 4.4).
#[derive(Clone, Default)]
pub struct RaftSecurity {
    /// `--tls-cert`/`--tls-key` (and `--tls-client-ca`: replicas show their
    /// certificates to each other).
    pub server_tls: Option<tonic::transport::ServerTlsConfig>,
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// `--auth-tokens`: a raft RPC needs a caller of role `replica`.
    pub auth: crate::ingress::auth::Auth,
    /// `--raft-token`: what this replica sends.
    pub token: Option<String>,
}

impl std::fmt::Debug for RaftSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftSecurity")
            .field("tls", &self.server_tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// How often the leader checks that a majority still follows it, and how
/// long it waits for the answer: past it the leader stops taking commands.
const QUORUM_CHECK_EVERY: Duration = Duration::from_millis(100);
const QUORUM_CHECK_TIMEOUT: Duration = Duration::from_millis(750);

/// openraft's settings. `heartbeat_ms` is also how long openraft waits for
/// an AppendEntries answer before it sends again; a follower that hears no
/// leader for 6 to 12 heartbeats starts an election.
pub fn raft_config(snapshot_entries: u64, heartbeat_ms: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "account-shard".into(),
        heartbeat_interval: heartbeat_ms,
        election_timeout_min: 6 * heartbeat_ms,
        election_timeout_max: 12 * heartbeat_ms,
        // The state's own serialization (machine.rs); the log keeps as many
        // entries below it, so a replica a little behind catches up from the
        // log, one further behind gets the snapshot.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_entries),
        max_in_snapshot_log_to_keep: snapshot_entries,
        // With entries of at most ENTRY_BYTES_MAX, an AppendEntries fits
        // network::MESSAGE_BYTES_MAX.
        max_payload_entries: 16,
        ..Default::default()
    }
}

/// A running replica: its raft, its writer thread and its raft port.
pub struct Replica {
    pub raft: openraft::Raft<TypeConfig>,
    pub leadership: Arc<Leadership>,
    writer: writer::Running,
    server: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
    /// Why raft stopped by itself (a storage error, a bug): the service then
    /// stops and exits non-zero, for its supervisor to restart it.
    failure: Arc<Mutex<Option<String>>>,
    pub node_id: NodeId,
}

impl Replica {
    /// Opens the raft log in `<data-dir>/raft`, starts the writer, openraft
    /// and the raft port; a fresh group is initialized by its lowest id.
    pub async fn start(
        engine: EngineConfig,
        replica: ReplicaConfig,
        kafka: Option<crate::config::KafkaConfig>,
        metrics: Arc<Metrics>,
    ) -> Result<Replica, EngineError> {
        let storage_error = |e: openraft::StorageError<NodeId>| EngineError::Thread(e.to_string());
        let snapshots = engine.wal.dir.with_file_name("raft-snapshot");
        let mut wal = engine.wal.clone();
        wal.dir = wal.dir.with_file_name("raft");
        // One record per entry: a sync batch must hold the largest.
        wal.record_size_max = (wal::format::SYNC_BATCH_BYTES_MAX - 4096) as u32;
        wal.segment_size_bytes = wal.segment_size_bytes.max(4 * wal.record_size_max as u64);
        let log = log::LogStore::open(wal).map_err(storage_error)?;
        let pristine = log.is_pristine();
        let leadership = Arc::new(Leadership::default());
        let data_dir = snapshots.parent().map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        );
        let duties = duties::Duties::new(
            kafka,
            engine.snapshot.clone(),
            data_dir,
            replica.ledger_records_max,
            metrics.clone(),
        );
        let sinks = duties.sinks();
        let (writer, to_writer) = writer::start(engine, metrics, leadership.clone(), duties)?;
        let machine = machine::Machine::open(snapshots, to_writer, sinks)
            .await
            .map_err(storage_error)?;
        let config = Arc::new(
            raft_config(replica.snapshot_entries, replica.heartbeat_ms)
                .validate()
                .map_err(|e| EngineError::Thread(e.to_string()))?,
        );
        network::secure(&replica.security).map_err(EngineError::Thread)?;
        let raft = openraft::Raft::new(replica.node_id, config, network::Network, log, machine)
            .await
            .map_err(|e| EngineError::Thread(e.to_string()))?;
        writer.set_raft(raft.clone());
        let me = Member {
            raft_addr: replica.raft_addr.to_string(),
            grpc_addr: replica.grpc_addr.clone(),
        };
        let listener = tokio::net::TcpListener::bind(replica.raft_addr)
            .await
            .map_err(|e| EngineError::Thread(format!("raft port {}: {e}", replica.raft_addr)))?;
        let service = network::RaftService {
            raft: raft.clone(),
            node_id: replica.node_id,
            me: me.clone(),
            auth: replica.security.auth.clone(),
        };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = replica.security.server_tls.clone() {
            builder = builder
                .tls_config(tls)
                .map_err(|e| EngineError::Thread(format!("raft port TLS: {e}")))?;
        }
        let server = tokio::spawn(async move {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let result = builder
                .add_service(
                    crate::proto::account::raft::v1::raft_server::RaftServer::new(service)
                        .max_decoding_message_size(network::MESSAGE_BYTES_MAX)
                        .max_encoding_message_size(network::MESSAGE_BYTES_MAX),
                )
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "raft port stopped");
            }
        });
        let lowest = replica.peers.keys().next().copied();
        if pristine && lowest == Some(replica.node_id) {
            tokio::spawn(initialize(raft.clone(), replica.clone(), me));
        } else {
            tracing::info!(
                node_id = replica.node_id,
                pristine,
                "replica started; joining the group's leader"
            );
        }
        let failure = Arc::new(Mutex::new(None));
        let watcher = tokio::spawn(watch_leadership(
            raft.clone(),
            leadership.clone(),
            failure.clone(),
            writer.stopper(),
        ));
        Ok(Replica {
            raft,
            leadership,
            writer,
            server,
            watcher,
            failure,
            node_id: replica.node_id,
        })
    }

    /// The ingress side: lanes that refuse when this replica does not lead.
    pub fn handle(&self) -> EngineHandle {
        self.writer.handle()
    }

    /// Stops taking requests, stops raft and the writer (which answers what
    /// waits with `UNAVAILABLE`).
    pub async fn stop(self) -> Result<(), EngineError> {
        self.watcher.abort();
        self.leadership.serving.store(false, Ordering::Release);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        self.server.abort();
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let stopped = tokio::task::spawn_blocking(move || self.writer.stop())
            .await
            .unwrap_or_else(|e| Err(EngineError::Thread(e.to_string())));
        match failure {
            Some(why) => Err(EngineError::Thread(why)),
            None => stopped,
        }
    }
}

/// A fresh group's first start, on its lowest id: waits until every member
/// answers `Hello` (so the membership names each one's client address), then
/// initializes the group once. A restart never gets here (the log is not
/// pristine then), nor does a wiped replica of a group that exists: when a
/// member answers that it is initialized, this one waits for the leader to
/// replicate to it instead.
async fn initialize(raft: openraft::Raft<TypeConfig>, replica: ReplicaConfig, me: Member) {
    let mut members = BTreeMap::new();
    for (&id, addr) in &replica.peers {
        if id == replica.node_id {
            members.insert(id, me.clone());
            continue;
        }
        loop {
            match network::hello(addr).await {
                Ok(hello) if hello.initialized => {
                    tracing::info!(
                        peer = id,
                        "the group exists; waiting for its leader to replicate here"
                    );
                    return;
                }
                Ok(hello) if hello.node_id == id => {
                    members.insert(id, hello.member);
                    break;
                }
                Ok(hello) => {
                    tracing::error!(expected = id, answered = hello.node_id, addr = %addr,
                        "--peers names another node id at this address; waiting");
                }
                Err(e) => {
                    tracing::info!(peer = id, error = %e, "waiting for the peer to initialize the group")
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    match raft.is_initialized().await {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "raft stopped before the group was initialized");
            return;
        }
    }
    let ids: BTreeSet<NodeId> = members.keys().copied().collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!(?ids, "replica group initialized"),
        Err(e) => tracing::warn!(error = %e, "group not initialized (already is?)"),
    }
}

/// Follows openraft's view of the leader into [`Leadership`]; while this
/// replica leads, confirms with its quorum every [`QUORUM_CHECK_EVERY`].
/// When raft stops by itself (it does on a storage error), records why and
/// stops the writer, and with it the service.
async fn watch_leadership(
    raft: openraft::Raft<TypeConfig>,
    leadership: Arc<Leadership>,
    failure: Arc<Mutex<Option<String>>>,
    stop_writer: impl FnOnce(),
) {
    let mut metrics = raft.metrics();
    // Every applied entry changes the metrics; the quorum is checked on a
    // change of leader and otherwise every QUORUM_CHECK_EVERY, not per entry
    // (each check is a round of heartbeats).
    let mut checked: Option<(Option<NodeId>, std::time::Instant)> = None;
    loop {
        let (me, leader, term, grpc) = {
            let m = metrics.borrow_and_update();
            let grpc = m.current_leader.and_then(|id| {
                m.membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.grpc_addr.clone())
            });
            (m.id, m.current_leader, m.current_term, grpc)
        };
        leadership.term.store(term, Ordering::Release);
        *leadership.leader.lock().unwrap_or_else(|p| p.into_inner()) = grpc;
        let due = checked.is_none_or(|(checked_leader, at)| {
            checked_leader != leader || at.elapsed() >= QUORUM_CHECK_EVERY
        });
        if due {
            let serving = if leader == Some(me) {
                matches!(
                    tokio::time::timeout(QUORUM_CHECK_TIMEOUT, raft.ensure_linearizable()).await,
                    Ok(Ok(_))
                )
            } else {
                false
            };
            checked = Some((leader, std::time::Instant::now()));
            let was = leadership.serving.swap(serving, Ordering::AcqRel);
            if was != serving {
                tracing::info!(serving, term, ?leader, "leadership changed");
            }
        }
        // On every change, and on a timer: a leader re-confirms its quorum.
        if let Ok(Err(_)) = tokio::time::timeout(QUORUM_CHECK_EVERY, metrics.changed()).await {
            leadership.serving.store(false, Ordering::Release);
            let why = match raft.is_initialized().await {
                Err(e) => format!("raft stopped: {e}"),
                Ok(_) => "raft stopped".to_string(),
            };
            tracing::error!(reason = %why, "the replica stops");
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            stop_writer();
            return;
        }
    }
}

/// Why a membership change was not made.
#[derive(Debug)]
pub enum MembershipError {
    /// Not the leader, or no quorum: as for any write.
    Submit(crate::engine::SubmitError),
    /// The change makes no sense for this group (FAILED_PRECONDITION).
    Invalid(String),
}

fn membership_error(
    e: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, Member>>,
) -> MembershipError {
    use crate::engine::SubmitError;
    use openraft::error::{ClientWriteError, RaftError};
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            MembershipError::Submit(SubmitError::NotLeader(f.leader_node.map(|n| n.grpc_addr)))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            MembershipError::Invalid(c.to_string())
        }
        RaftError::Fatal(f) => {
            tracing::error!(error = %f, "raft stopped during a membership change");
            MembershipError::Submit(SubmitError::Stopped)
        }
    }
}

/// Membership changes are made at the leader: elsewhere they are refused
/// with its address before anything is judged against a view that may be
/// behind the leader's.
fn at_leader(raft: &openraft::Raft<TypeConfig>) -> Result<(), MembershipError> {
    let m = raft.metrics().borrow().clone();
    if m.current_leader == Some(m.id) {
        return Ok(());
    }
    let leader = m
        .current_leader
        .and_then(|id| m.membership_config.membership().get_node(&id))
        .map(|n| n.grpc_addr.clone());
    Err(MembershipError::Submit(
        crate::engine::SubmitError::NotLeader(leader),
    ))
}

/// How long the leader waits for a new replica to catch up as a learner
/// before it makes it a voter (it answers NotCommitted past it; the learner
/// stays and may be added again).
const LEARNER_CATCH_UP_MAX: Duration = Duration::from_secs(600);

/// `AddReplica`: the replica at `raft_addr` (which must answer as
/// `node_id`) joins as a learner, catches up, then becomes a voter.
pub async fn add_replica(
    raft: &openraft::Raft<TypeConfig>,
    node_id: NodeId,
    raft_addr: &str,
) -> Result<(), MembershipError> {
    at_leader(raft)?;
    let hello = network::hello(raft_addr)
        .await
        .map_err(|e| MembershipError::Invalid(format!("raft_addr: no replica answers: {e}")))?;
    if hello.node_id != node_id {
        return Err(MembershipError::Invalid(format!(
            "node_id: the replica at {raft_addr} is node {}",
            hello.node_id
        )));
    }
    let voters: BTreeSet<NodeId> = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    if voters.contains(&node_id) {
        return Ok(());
    }
    tracing::info!(node_id, raft_addr, "adding a replica: learner first");
    match tokio::time::timeout(
        LEARNER_CATCH_UP_MAX,
        raft.add_learner(node_id, hello.member, true),
    )
    .await
    {
        Ok(result) => result.map_err(membership_error)?,
        Err(_) => {
            return Err(MembershipError::Submit(
                crate::engine::SubmitError::NotCommitted,
            ))
        }
    };
    let mut voters = voters;
    voters.insert(node_id);
    raft.change_membership(voters, false)
        .await
        .map_err(membership_error)?;
    tracing::info!(node_id, "replica added as a voter");
    Ok(())
}

/// `RemoveReplica`: `node_id` stops being a member (voter or learner).
pub async fn remove_replica(
    raft: &openraft::Raft<TypeConfig>,
    node_id: NodeId,
) -> Result<(), MembershipError> {
    at_leader(raft)?;
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&node_id).is_none() {
        return Err(MembershipError::Invalid(format!(
            "node_id: {node_id} is not a member"
        )));
    }
    let mut voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let change = if voters.remove(&node_id) {
        if voters.is_empty() {
            return Err(MembershipError::Invalid(
                "node_id: the last voter cannot be removed".into(),
            ));
        }
        // Not retained as a learner: gone from the membership.
        openraft::ChangeMembers::ReplaceAllVoters(voters)
    } else {
        openraft::ChangeMembers::RemoveNodes([node_id].into_iter().collect())
    };
    raft.change_membership(change, false)
        .await
        .map_err(membership_error)?;
    tracing::info!(node_id, "replica removed");
    Ok(())
}

/// `ClusterStatus`: this replica's view of its group, with its own applied
/// sequence and digest.
pub fn status(
    raft: &openraft::Raft<TypeConfig>,
    applied_sequence: u64,
    digest: u64,
) -> crate::proto::account::v1::ClusterStatusReply {
    use crate::proto::account::v1 as pb;
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let last = m.last_log_index.unwrap_or(0);
    let replicas = membership
        .nodes()
        .map(|(&id, node)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|l| l.index);
            pb::ReplicaStatus {
                node_id: id,
                raft_addr: node.raft_addr.clone(),
                grpc_addr: node.grpc_addr.clone(),
                matched_log_index: matched.unwrap_or(0),
                lag: matched.map_or(0, |i| last.saturating_sub(i)),
                voter: voters.contains(&id),
            }
        })
        .collect();
    let leader = m.current_leader;
    pb::ClusterStatusReply {
        node_id: m.id,
        leader_id: leader.unwrap_or(0),
        leader_grpc_addr: leader
            .and_then(|id| membership.get_node(&id))
            .map(|n| n.grpc_addr.clone())
            .unwrap_or_default(),
        term: m.current_term,
        role: format!("{:?}", m.state).to_uppercase(),
        applied_sequence,
        digest,
        last_log_index: last,
        applied_log_index: m.last_applied.map_or(0, |l| l.index),
        replicas,
        purged_log_index: m.purged.map_or(0, |l| l.index),
        snapshot_log_index: m.snapshot.map_or(0, |l| l.index),
    }
}

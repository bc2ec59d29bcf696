//! A replica group (design 7) of real `account-service serve` processes on
//! loopback, each with its own data directory and fixed ports (a restart
//! comes back on the same addresses), killed when dropped.

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_client::AccountServiceClient;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use super::server::{self, free_port};

/// The longest any wait of these tests may take: an election here takes
/// about a second, a catch-up a few.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How long one call may take before the caller gives up on that replica (a
/// stopped process accepts connections and never answers).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Node {
    pub id: u64,
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
    pub raft_port: u16,
    pub metrics_port: u16,
    child: Option<Child>,
}

impl Node {
    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr()))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT)
            .connect_lazy()
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("running").to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGSTOP: the process stays, answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// SIGKILL: no chance to sync or drain.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused process must be woken to die of SIGKILL promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().unwrap().to_string()])
                .status();
        }
        self.kill9();
    }
}

pub struct Group {
    pub nodes: Vec<Node>,
    /// Flags every replica gets.
    extra: Vec<String>,
    /// The first `founders` nodes make the group; the others join it later
    /// (AddReplica), with the founders and themselves as `--peers` (not the
    /// lowest id there, so they never initialize a group).
    founders: usize,
}

impl Group {
    /// Starts `size` replicas (node ids 1..=size), each with the flags
    /// `extra`, and waits for a leader.
    pub async fn start(size: u64, extra: &[&str]) -> Group {
        Group::start_with_spares(size, 0, extra).await
    }

    /// [`Group::start`] plus `spares` nodes (ids after the group's) that
    /// are not started and not members: for AddReplica.
    pub async fn start_with_spares(size: u64, spares: u64, extra: &[&str]) -> Group {
        let group = Group::spawn_all(size, spares, extra);
        group.leader().await;
        group
    }

    /// Starts the group's `size` replicas without waiting for anything (the
    /// callers of a group with TLS and tokens check it themselves).
    pub fn spawn_all(size: u64, spares: u64, extra: &[&str]) -> Group {
        let nodes = (1..=size + spares)
            .map(|id| Node {
                id,
                dir: tempfile::tempdir().unwrap(),
                grpc_port: free_port(),
                raft_port: free_port(),
                metrics_port: free_port(),
                child: None,
            })
            .collect();
        let mut group = Group {
            nodes,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            founders: size as usize,
        };
        for i in 0..group.founders {
            group.spawn(i);
        }
        group
    }

    fn peers(&self, i: usize) -> String {
        let joining = (i >= self.founders).then(|| &self.nodes[i]);
        self.nodes[..self.founders]
            .iter()
            .chain(joining)
            .map(|n| format!("{}=127.0.0.1:{}", n.id, n.raft_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts replica `i` on its data directory and ports.
    pub fn spawn(&mut self, i: usize) {
        let peers = self.peers(i);
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {} runs already", node.id);
        let child = Command::new(env!("CARGO_BIN_EXE_account-service"))
            .arg("serve")
            .arg("--data-dir")
            .arg(node.dir.path())
            .args(["--grpc-addr", &node.grpc_addr()])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", node.metrics_port),
            ])
            .args(["--raft-addr", &format!("127.0.0.1:{}", node.raft_port)])
            .args(["--node-id", &node.id.to_string()])
            .args(["--peers", &peers])
            .arg("--no-pin")
            .args(&self.extra)
            .env("RUST_LOG", "warn,openraft=error")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn account-service");
        node.child = Some(child);
    }

    /// Kills every replica (SIGKILL) and starts them again on their data
    /// directories with the flags `extra` instead.
    pub fn restart_all_with(&mut self, extra: &[&str]) {
        for node in &mut self.nodes {
            node.kill9();
        }
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        for i in 0..self.founders {
            self.spawn(i);
        }
    }

    /// Kills replica `i` (SIGKILL), removes its data directory and starts it
    /// empty on the same addresses.
    pub fn wipe_and_restart(&mut self, i: usize) {
        self.nodes[i].kill9();
        let dir = self.nodes[i].dir.path().to_path_buf();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        self.spawn(i);
    }

    pub fn index_of_addr(&self, grpc_addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.grpc_addr() == grpc_addr)
    }

    pub fn index_of_id(&self, id: u64) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap()
    }

    /// `ClusterStatus` of replica `i`, if it answers.
    pub async fn status(&self, i: usize) -> Option<pb::ClusterStatusReply> {
        if !self.nodes[i].is_running() {
            return None;
        }
        let mut admin = AdminServiceClient::new(self.nodes[i].channel());
        admin
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits until a running replica reports itself LEADER; returns its
    /// index.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            for i in 0..self.nodes.len() {
                if let Some(s) = self.status(i).await {
                    if s.role == "LEADER" && s.leader_id == s.node_id {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running replica has applied the same sequence with
    /// the same digest; returns that sequence and digest.
    pub async fn converged(&self) -> (u64, u64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut seen = Vec::new();
            for i in 0..self.nodes.len() {
                if self.nodes[i].is_running() {
                    seen.push(self.status(i).await.map(|s| (s.applied_sequence, s.digest)));
                }
            }
            if let Some(Some(first)) = seen.first() {
                if seen.iter().all(|s| s.as_ref() == Some(first)) {
                    return *first;
                }
            }
            assert!(
                Instant::now() < deadline,
                "replicas did not converge within {PATIENCE:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until replica `i`'s status satisfies `what`; returns it.
    pub async fn wait_status(
        &self,
        i: usize,
        about: &str,
        what: impl Fn(&pb::ClusterStatusReply) -> bool,
    ) -> pb::ClusterStatusReply {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.status(i).await {
                if what(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {}: not {about} within {PATIENCE:?}",
                self.nodes[i].id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until replica `i` has applied at least `log_index`.
    pub async fn caught_up(&self, i: usize, log_index: u64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.status(i).await {
                if s.applied_log_index >= log_index {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not reach log index {log_index} within {PATIENCE:?}",
                self.nodes[i].id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of every replica that sends each call to the one it believes
    /// leads, follows the `leader` trailer, and tries the others when one
    /// does not answer.
    pub fn client(&self) -> GroupClient {
        self.client_at(0)
    }

    /// [`Group::client`], first sending to replica `i`.
    pub fn client_at(&self, i: usize) -> GroupClient {
        GroupClient {
            channels: self.nodes.iter().map(Node::channel).collect(),
            addrs: self.nodes.iter().map(Node::grpc_addr).collect(),
            current: i,
        }
    }
}

pub struct GroupClient {
    channels: Vec<Channel>,
    addrs: Vec<String>,
    current: usize,
}

/// One call of the tests' mixed load.
#[derive(Clone, Debug)]
pub enum Op {
    Reserve { request: String, order: String },
    Unreserve { request: String, order: String },
    Deposit { event: String },
}

/// The reply that acknowledged an [`Op`]: its result and sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub result: i32,
    pub sequence: u64,
    pub replayed: bool,
}

impl GroupClient {
    /// Sends `op` until a replica acknowledges it (the same request id each
    /// time, so a retry of an applied call gets its original reply); gives up
    /// after [`PATIENCE`]. Returns the reply and how many tries it took.
    pub async fn call(&mut self, op: &Op) -> (Ack, usize) {
        let deadline = Instant::now() + PATIENCE;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_once(op).await {
                Ok(ack) => return (ack, tries),
                Err(status) => {
                    let leader = status
                        .metadata()
                        .get("leader")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|a| self.addrs.iter().position(|x| x == a));
                    match leader {
                        Some(i) if i != self.current => self.current = i,
                        // No leader known, or the leader itself cannot commit
                        // (lost its quorum): wait, then try the next replica.
                        _ => {
                            self.current = (self.current + 1) % self.channels.len();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{op:?} not acknowledged within {PATIENCE:?}: last {status:?}"
                    );
                }
            }
        }
    }

    /// [`GroupClient::call`], except that a `RESOURCE_EXHAUSTED` is returned
    /// instead of retried.
    pub async fn call_until_refused(&mut self, op: &Op) -> Result<Ack, tonic::Status> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.try_once(op).await {
                Ok(ack) => return Ok(ack),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    return Err(status)
                }
                Err(status) => {
                    assert!(Instant::now() < deadline, "{op:?}: {status:?}");
                    self.current = (self.current + 1) % self.channels.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One try at the replica believed to lead.
    pub async fn try_once(&mut self, op: &Op) -> Result<Ack, tonic::Status> {
        let channel = self.channels[self.current].clone();
        let (result, sequence, replayed) = match op {
            Op::Reserve { request, order } => {
                let r = AccountServiceClient::new(channel)
                    .reserve(server::reserve_usd_1(request, order))
                    .await?
                    .into_inner();
                (r.result, r.sequence, r.replayed)
            }
            Op::Unreserve { request, order } => {
                let r = AccountServiceClient::new(channel)
                    .unreserve(pb::UnreserveRequest {
                        request_id: request.clone(),
                        account_id: 1,
                        order_id: order.clone(),
                        amount: String::new(),
                    })
                    .await?
                    .into_inner();
                (r.result, r.sequence, r.replayed)
            }
            Op::Deposit { event } => {
                let r = AdminServiceClient::new(channel)
                    .deposit(server::deposit_usd_1(event, "1"))
                    .await?
                    .into_inner();
                (r.result, r.sequence, r.replayed)
            }
        };
        Ok(Ack {
            result,
            sequence,
            replayed,
        })
    }

    /// Runs `call` at the replica believed to lead; on an error, moves to the
    /// next replica and tries again (for [`PATIENCE`] at most).
    async fn at_any<T, F, Fut>(&mut self, what: &str, mut call: F) -> T
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match call(self.channels[self.current].clone()).await {
                Ok(t) => return t,
                Err(status) => {
                    assert!(Instant::now() < deadline, "{what}: {status:?}");
                    self.current = (self.current + 1) % self.channels.len();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Opens account 1 (USD) with `amount` in it.
    pub async fn open_and_fund(&mut self, amount: &str) {
        let funded = self
            .at_any("open and fund account 1", |channel| async move {
                let mut admin = AdminServiceClient::new(channel);
                admin.open_account(server::open_account_1()).await?;
                admin.deposit(server::deposit_usd_1("fund-1", amount)).await
            })
            .await;
        assert_eq!(funded.into_inner().result, pb::Result::Ok as i32);
    }

    /// Opens account `id` (USD), empty.
    pub async fn open_account(&mut self, id: i64) {
        let opened = self
            .at_any("open an account", |channel| async move {
                AdminServiceClient::new(channel)
                    .open_account(pb::OpenAccountRequest {
                        request_id: format!("open-{id}"),
                        account_id: id,
                        base_currency: "USD".into(),
                    })
                    .await
            })
            .await;
        assert_eq!(opened.into_inner().result, pb::Result::Ok as i32);
    }

    /// Account `id`, read at the leader.
    pub async fn account(&mut self, id: i64) -> pb::Account {
        self.at_any("an account", |channel| async move {
            AccountServiceClient::new(channel)
                .get_account(pb::GetAccountRequest { account_id: id })
                .await
        })
        .await
        .into_inner()
    }

    /// `(available, reserved)` of account 1's USD, read at the leader.
    pub async fn account_1(&mut self) -> (rust_decimal::Decimal, rust_decimal::Decimal) {
        let a = self
            .at_any("account 1", |channel| async move {
                AccountServiceClient::new(channel)
                    .get_account(pb::GetAccountRequest { account_id: 1 })
                    .await
            })
            .await
            .into_inner();
        (
            a.cash[0].available.parse().unwrap(),
            a.cash[0].reserved.parse().unwrap(),
        )
    }

    /// Reservation `order` of account 1, read at the leader.
    pub async fn reservation(&mut self, order: &str) -> pb::Reservation {
        self.at_any("reservation", |channel| async move {
            let r = AccountServiceClient::new(channel)
                .get_reservation(pb::GetReservationRequest {
                    account_id: 1,
                    order_id: order.into(),
                })
                .await;
            if let Err(status) = &r {
                assert_ne!(
                    status.code(),
                    tonic::Code::NotFound,
                    "acknowledged reservation {order} lost"
                );
            }
            r
        })
        .await
        .into_inner()
    }
}

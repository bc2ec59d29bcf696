//! Runs the real `account-service` binary on free loopback ports, and kills it
//! when dropped (also when the test panics).

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_client::AccountServiceClient;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A loopback port nothing listens on, for a server a test starts.
///
/// Not the kernel's pick (port 0): that port comes from the ephemeral range
/// (`ip_local_port_range`, 32768-60999 by default), where any process's
/// outbound connection may take it between this check and the server's bind
/// (seen: a replica of a group failing with "Address already in use" while
/// other groups ran). These come from below that range, each handed out once
/// per test process (the tests of one binary run as its threads).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Another test process's ports (an earlier binary's leftovers) start
    // elsewhere in the span.
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < SPAN,
            "no free loopback port left below the ephemeral range"
        );
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Server {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub grpc_port: u16,
    pub metrics_port: u16,
}

impl Server {
    /// Starts the binary and waits until health says SERVING.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let mut server = Server::spawn(data_dir, extra);
        server.wait_serving().await;
        server
    }

    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Server {
        Server::spawn_under(&[], data_dir, extra, Stdio::inherit())
    }

    /// [`Server::spawn`] with the binary run by `wrapper` (for example
    /// `strace ... --`), its standard error going to `stderr`. The service's
    /// own process is killed on drop too (a killed tracer leaves its tracee
    /// running).
    pub fn spawn_under(wrapper: &[&str], data_dir: &Path, extra: &[&str], stderr: Stdio) -> Server {
        Server::spawn_with(wrapper, data_dir, extra, stderr, "warn")
    }

    /// [`Server::spawn`] logging at `level` (`RUST_LOG`) to `stderr`.
    pub fn spawn_logging(data_dir: &Path, extra: &[&str], level: &str, stderr: Stdio) -> Server {
        Server::spawn_with(&[], data_dir, extra, stderr, level)
    }

    fn spawn_with(
        wrapper: &[&str],
        data_dir: &Path,
        extra: &[&str],
        stderr: Stdio,
        level: &str,
    ) -> Server {
        let grpc_port = free_port();
        let metrics_port = free_port();
        let binary = env!("CARGO_BIN_EXE_account-service");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--no-pin")
            .args(extra)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn account-service");
        Server {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            grpc_port,
            metrics_port,
        }
    }

    /// The process id, while it runs.
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Peak resident memory so far (`VmHWM`), in MiB.
    #[allow(dead_code)]
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn accounts(&self) -> AccountServiceClient<Channel> {
        AccountServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub async fn wait_serving(&mut self) {
        use tonic_health::pb::{
            health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("account-service exited early: {status}");
            }
            if let Ok(channel) = Channel::from_shared(self.addr()).unwrap().connect().await {
                let mut health = HealthClient::new(channel);
                if let Ok(r) = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    if r.into_inner().status == ServingStatus::Serving as i32 {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "account-service not serving within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to sync or drain.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_strays();
    }

    /// Waits for the process to end by itself (at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to any `account-service serve` still running on this data
    /// directory (one left behind by a wrapper).
    fn kill_strays(&self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        let binary = env!("CARGO_BIN_EXE_account-service").as_bytes();
        let dir = self.data_dir.as_os_str().as_encoded_bytes();
        for entry in entries.flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.first() == Some(&binary) && args.contains(&dir) {
                let pid = entry.file_name().to_string_lossy().into_owned();
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }

    /// SIGTERM without waiting (see [`Server::wait_exit`]).
    #[allow(dead_code)]
    pub fn sigterm(&self) {
        let child = self.child.as_ref().expect("running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("account-service did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reserves `ord-{i}` (built by `request(i)`) from `workers` concurrent
/// clients, kills the server with SIGKILL once `at_least` were acknowledged,
/// and returns every acknowledged `(i, sequence)`; calls still in flight fail.
pub async fn reserve_until_kill9(
    server: &mut Server,
    workers: usize,
    at_least: usize,
    request: fn(usize) -> pb::ReserveRequest,
) -> Vec<(usize, u64)> {
    let load = ReserveLoad::start(server, workers, request).await;
    load.wait_acknowledged(at_least).await;
    server.kill9();
    let (acknowledged, _) = load.finish().await;
    assert!(acknowledged.len() >= at_least);
    acknowledged
}

/// Reserves per worker at most: the load stops by itself.
const RESERVES_PER_WORKER_MAX: usize = 200_000;

/// What one worker of a [`ReserveLoad`] got acknowledged, and the error that
/// stopped it.
type WorkerResult = (Vec<(usize, u64)>, Option<tonic::Status>);

/// Concurrent clients reserving in a loop until their first error.
pub struct ReserveLoad {
    acknowledged: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<WorkerResult>>,
}

impl ReserveLoad {
    pub async fn start(
        server: &Server,
        workers: usize,
        request: fn(usize) -> pb::ReserveRequest,
    ) -> ReserveLoad {
        use std::sync::atomic::Ordering;
        let channel = server.channel().await;
        let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..workers)
            .map(|worker| {
                let mut client = AccountServiceClient::new(channel.clone());
                let acked = acknowledged.clone();
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for n in 0..RESERVES_PER_WORKER_MAX {
                        let i = worker * 1_000_000 + n;
                        match client.reserve(request(i)).await {
                            Ok(reply) => {
                                let reply = reply.into_inner();
                                assert_eq!(reply.result, pb::Result::Ok as i32);
                                done.push((i, reply.sequence));
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(status) => return (done, Some(status)),
                        }
                    }
                    (done, None)
                })
            })
            .collect();
        ReserveLoad {
            acknowledged,
            tasks,
        }
    }

    pub async fn wait_acknowledged(&self, at_least: usize) {
        while self.acknowledged.load(std::sync::atomic::Ordering::Relaxed) < at_least {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits for every worker to stop; returns every acknowledged
    /// `(i, sequence)` and the error that stopped each worker (`None`: it
    /// sent all it may).
    pub async fn finish(self) -> (Vec<(usize, u64)>, Vec<Option<tonic::Status>>) {
        let mut acknowledged = Vec::new();
        let mut errors = Vec::new();
        for t in self.tasks {
            let (done, error) = t.await.unwrap();
            acknowledged.extend(done);
            errors.push(error);
        }
        (acknowledged, errors)
    }
}

/// Asserts that each acknowledged `(i, sequence)` reservation `ord-{i}` of
/// account 1 exists with the sequence it was acknowledged with.
pub async fn assert_reservations_survived<'a>(
    accounts: &mut AccountServiceClient<Channel>,
    acknowledged: impl IntoIterator<Item = &'a (usize, u64)>,
) {
    for &(i, sequence) in acknowledged {
        let r = accounts
            .get_reservation(pb::GetReservationRequest {
                account_id: 1,
                order_id: format!("ord-{i}"),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged ord-{i} lost: {e}"))
            .into_inner();
        assert_eq!(r.sequence, sequence, "ord-{i}");
    }
}

/// `(available, reserved)` of the first cash balance of `account_id`.
pub async fn first_cash(
    accounts: &mut AccountServiceClient<Channel>,
    account_id: i64,
) -> (rust_decimal::Decimal, rust_decimal::Decimal) {
    let a = accounts
        .get_account(pb::GetAccountRequest { account_id })
        .await
        .unwrap()
        .into_inner();
    (
        a.cash[0].available.parse().unwrap(),
        a.cash[0].reserved.parse().unwrap(),
    )
}

/// Reserve 1 USD of cash on account 1 for order `ord-{i}` (request `req-{i}`).
pub fn reserve_one_usd(i: usize) -> pb::ReserveRequest {
    reserve_usd_1(&format!("req-{i}"), &format!("ord-{i}"))
}

/// Reserve 1 USD of cash on account 1 for `order_id` with `request_id`.
pub fn reserve_usd_1(request_id: &str, order_id: &str) -> pb::ReserveRequest {
    pb::ReserveRequest {
        request_id: request_id.into(),
        account_id: 1,
        order_id: order_id.into(),
        kind: pb::ReservationKind::Cash as i32,
        asset: "USD".into(),
        amount: "1".into(),
        expires_at_ms: 0,
    }
}

/// Opens account 1 (USD) and deposits `amount` into it.
pub async fn open_and_fund_account_1(server: &Server, amount: &str) {
    let mut admin = server.admin().await;
    admin.open_account(open_account_1()).await.unwrap();
    admin
        .deposit(deposit_usd_1("fund-1", amount))
        .await
        .unwrap();
}

/// Open account 1 in USD (request `open-1`).
pub fn open_account_1() -> pb::OpenAccountRequest {
    pb::OpenAccountRequest {
        request_id: "open-1".into(),
        account_id: 1,
        base_currency: "USD".into(),
    }
}

/// Deposit `amount` USD into account 1 under `event_id`.
pub fn deposit_usd_1(event_id: &str, amount: &str) -> account_service::proto::events::DepositEvent {
    account_service::proto::events::DepositEvent {
        event_id: event_id.into(),
        account_id: 1,
        currency: "USD".into(),
        amount: amount.into(),
        timestamp: 0,
        source: String::new(),
    }
}

/// The segment files of the WAL under `data_dir`.
pub fn wal_segments(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("wal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wal")
        })
        .count()
}

/// `strace`, asserted installed (`scripts/test` installs it).
pub fn strace() -> &'static str {
    super::require_tool("strace", "-V", "strace")
}

/// A [`Server::spawn_under`] wrapper: `strace` following every thread, `-e`
/// `trace` and `inject`, only the traced syscall stopping the tracee (a
/// seccomp filter), so the rest runs at speed.
pub fn strace_injecting<'a>(trace: &'a str, inject: &'a str) -> [&'a str; 11] {
    [
        strace(),
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        trace,
        "-e",
        inject,
        "--",
    ]
}

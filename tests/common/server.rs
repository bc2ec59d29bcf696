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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let grpc_port = free_port();
        let metrics_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_account-service"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{grpc_port}"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--no-pin")
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn account-service");
        Server {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            grpc_port,
            metrics_port,
        }
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    let channel = server.channel().await;
    let acked = std::sync::Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let mut client = AccountServiceClient::new(channel.clone());
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for n in 0.. {
                let i = worker * 1_000_000 + n;
                match client.reserve(request(i)).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        assert_eq!(reply.result, pb::Result::Ok as i32);
                        done.push((i, reply.sequence));
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return done,
                }
            }
            done
        }));
    }
    while acked.load(Ordering::Relaxed) < at_least {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill9();
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    assert!(acknowledged.len() >= at_least);
    acknowledged
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
    pb::ReserveRequest {
        request_id: format!("req-{i}"),
        account_id: 1,
        order_id: format!("ord-{i}"),
        kind: pb::ReservationKind::Cash as i32,
        asset: "USD".into(),
        amount: "1".into(),
        expires_at_ms: 0,
    }
}

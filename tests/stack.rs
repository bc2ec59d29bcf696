//! `ops/stack.sh` starts the whole system (tansu, a throwaway PostgreSQL 15,
//! the topics, the service with both on) and stops all of it on SIGTERM:
//! started and stopped once here, each step bounded in time.

mod common;

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_client::AccountServiceClient;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// SIGTERM to the script when dropped (also when the test fails): it stops
/// what it started.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.to_string()])
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        // A zombie ("Z") has exited.
        .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_starts_with_kafka_and_postgres_on_and_stops_everything() {
    let grpc_port = common::server::free_port();
    let metrics_port = common::server::free_port();
    let mut stack = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/ops/stack.sh"))
        .args(["--grpc-port", &grpc_port.to_string()])
        .args(["--metrics-port", &metrics_port.to_string()])
        .env("ACCOUNT_SERVICE_BIN", env!("CARGO_BIN_EXE_account-service"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ops/stack.sh");
    let pid = stack.id();
    let _stop = StopOnDrop(pid);
    let stdout = stack.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !printed
        .iter()
        .any(|l: &String| l.starts_with("ctrl-c stops"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                panic!("the stack did not come up within 180 s: {printed:?}");
            }
        }
    }
    // The pids of the service, the broker and PostgreSQL, as printed.
    let pids: Vec<u32> = printed
        .iter()
        .filter_map(|l| l.split("(pid ").nth(1))
        .filter_map(|rest| rest.trim_end_matches(')').parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "{printed:?}");
    assert!(pids.iter().all(|p| alive(*p)));

    // The service answers, and both Kafka and PostgreSQL are on: its account
    // events get published and its snapshots written.
    let addr = format!("http://127.0.0.1:{grpc_port}");
    let mut admin = AdminServiceClient::connect(addr.clone()).await.unwrap();
    admin
        .open_account(pb::OpenAccountRequest {
            request_id: "open-1".into(),
            account_id: 1,
            base_currency: "USD".into(),
        })
        .await
        .unwrap();
    let mut accounts = AccountServiceClient::connect(addr).await.unwrap();
    let account = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(account.base_currency, "USD");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published = common::kafka::metric(metrics_port, "account_outbox_published_total");
        let snapshot = common::kafka::metric(metrics_port, "account_snapshot_sequence");
        if published > 0.0 && snapshot > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "published {published}, snapshot at {snapshot}: Kafka and PostgreSQL on"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = stack.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the stack did not stop within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        printed.push(line);
    }
    assert!(printed.iter().any(|l| l == "stack stopped"), "{printed:?}");
    for p in pids {
        assert!(!alive(p), "pid {p} still running after the stack stopped");
    }
}

//! The tool cannot rot: every mode runs for a moment against the echo server
//! (and one against the real service) and prints the JSON summary. Figures are
//! never asserted, only that the summary is complete and coherent.

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn echo_server() -> (Guard, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["echo-server", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    (Guard(child), format!("http://127.0.0.1:{port}"))
}

/// Starts the release-built `account-service serve` (plus `extra`) on free
/// ports with a fresh data directory; returns its guard, the directory and the
/// gRPC port once the port accepts connections.
fn service(extra: &[&str]) -> (Guard, tempfile::TempDir, u16) {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, metrics) = (free_port(), free_port());
    let service = env!("CARGO_BIN_EXE_loadtest").replace("loadtest", "account-service");
    let child = Command::new(&service)
        .args(["serve", "--no-pin", "--data-dir"])
        .arg(dir.path())
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
        ])
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{service}: {e} (build the workspace first)"));
    let guard = Guard(child);
    wait_port(grpc);
    (guard, dir, grpc)
}

/// Runs `loadtest args`, which must succeed and print one JSON line.
fn run_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

/// A load mode: [`run_json`], plus every field of the common summary.
fn run(args: &[&str]) -> Value {
    let v = run_json(args);
    for key in [
        "mode",
        "target_rate",
        "sent",
        "ok",
        "rejected",
        "errors",
        "throughput",
        "latency_us",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    v
}

fn coherent(v: &Value) {
    let l = &v["latency_us"];
    let p = |k: &str| l[k].as_u64().unwrap();
    assert!(
        p("p50") <= p("p90")
            && p("p90") <= p("p99")
            && p("p99") <= p("p999")
            && p("p999") <= p("max"),
        "{v}"
    );
    assert!(
        v["sent"].as_u64().unwrap() > 0 && v["ok"].as_u64().unwrap() > 0,
        "{v}"
    );
}

#[test]
fn reserve_mixed_and_max_against_the_echo_server() {
    let (_server, addr) = echo_server();
    let common = [
        "--addr",
        &addr,
        "--accounts",
        "10",
        "--warmup",
        "0",
        "--connections",
        "2",
    ];
    let v = run(&[
        &["reserve", "--rate", "200", "--duration", "2"][..],
        &common[..],
    ]
    .concat());
    assert_eq!(v["mode"], "reserve");
    assert_eq!(v["errors"], 0, "{v}");
    coherent(&v);
    let v = run(&[
        &["mixed", "--rate", "200", "--duration", "1"][..],
        &common[..],
    ]
    .concat());
    assert_eq!(v["mode"], "mixed");
    coherent(&v);
    let v = run(&[
        &[
            "max",
            "--start-rate",
            "200",
            "--step-duration",
            "1",
            "--max-steps",
            "2",
        ][..],
        &common[..],
    ]
    .concat());
    assert_eq!(v["steps"].as_array().unwrap().len(), 2, "{v}");
    assert!(v["max_sustained_rate"].as_f64().unwrap() >= 200.0, "{v}");
}

#[test]
fn reserve_against_the_real_service() {
    let (_guard, _dir, grpc) = service(&[]);
    std::thread::sleep(Duration::from_millis(300)); // replay of an empty WAL
    let addr = format!("http://127.0.0.1:{grpc}");
    let v = run(&[
        "reserve",
        "--addr",
        &addr,
        "--rate",
        "200",
        "--duration",
        "1",
        "--accounts",
        "5",
        "--warmup",
        "0",
    ]);
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["rejected"], 0, "{v}");
    coherent(&v);
}

#[test]
fn batch_and_stream_modes_against_the_real_service() {
    let (_guard, _dir, grpc) = service(&["--capacity-orders", "10000"]);
    std::thread::sleep(Duration::from_millis(300)); // replay of an empty WAL
    let addr = format!("http://127.0.0.1:{grpc}");
    let common = ["--addr", &addr, "--accounts", "5", "--warmup", "0"];
    let v = run(&[
        &[
            "batch",
            "--rate",
            "20",
            "--batch-size",
            "50",
            "--duration",
            "1",
        ][..],
        &common[..],
    ]
    .concat());
    assert_eq!(v["mode"], "batch");
    assert_eq!(v["errors"], 0, "{v}");
    // Items are counted one by one; the calls apart.
    assert_eq!(v["sent"], 1_000, "{v}");
    assert_eq!(v["ok"], 1_000, "{v}");
    assert_eq!(v["batches"]["ok"], 20, "{v}");
    coherent(&v);
    let v = run(&[
        &[
            "batch",
            "--rate",
            "10",
            "--batch-size",
            "4",
            "--duration",
            "1",
            "--all-or-nothing",
        ][..],
        &common[..],
    ]
    .concat());
    assert_eq!(v["all_or_nothing"], true);
    assert_eq!(v["ok"], 40, "{v}");
    let v = run(&[
        &[
            "stream",
            "--rate",
            "2000",
            "--streams",
            "2",
            // Room for every item of the run (2 x 1,000 = 2,000 sent), so
            // no item can find the window full however slow this machine
            // answers: the test checks that each is answered, not the speed.
            "--window",
            "1000",
            "--duration",
            "1",
            "--timeout-ms",
            "30000",
        ][..],
        &common[..],
    ]
    .concat());
    assert_eq!(v["mode"], "stream");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["ok"], 2_000, "every item answered, in order: {v}");
    coherent(&v);
}

#[test]
fn sync_probe_measures_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let v = run(&[
        "sync-probe",
        "--count",
        "20",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(v["mode"], "sync-probe");
    assert_eq!(v["ok"], 20);
    coherent(&v);
}

#[test]
fn in_process_engine_and_replay_modes() {
    let v = run_json(&["engine", "--commands", "20000"]);
    assert_eq!(v["mode"], "engine");
    assert!(v["commands_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let v = run_json(&["replay", "--records", "3000"]);
    assert_eq!(v["mode"], "replay");
    // The 10,000 accounts' setup (2 commands each) plus the records.
    assert_eq!(v["records"], 23_000, "{v}");
}

/// `fills` end to end: a tansu broker and the service with Kafka on, both
/// started here; fills produced at a small rate come back as account events.
#[test]
fn fills_through_a_real_broker() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::ClientConfig;

    let tansu = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("tansu")).find(|p| p.is_file()))
        .or_else(|| {
            let p = std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
            p.is_file().then_some(p)
        })
        .expect("tansu is not installed: cargo install tansu --locked --features libsql,dynostore (.ci/run does it)");
    let broker_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let broker = Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(broker_dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _broker = Guard(broker);
    let bootstrap = format!("127.0.0.1:{port}");
    let config = || {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &bootstrap);
        c
    };
    let probe: BaseConsumer = config().create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe
        .fetch_metadata(None, Duration::from_millis(500))
        .is_err()
    {
        assert!(Instant::now() < deadline, "tansu not ready");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> = config().create().unwrap();
        let topics: Vec<NewTopic> = [
            "trading.fills",
            "payment.deposits",
            "payment.withdrawals",
            "trading.account.events",
        ]
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
        for r in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
    });

    let (_service, _data, grpc) = service(&["--kafka-brokers", &bootstrap]);
    std::thread::sleep(Duration::from_millis(500));
    let addr = format!("http://127.0.0.1:{grpc}");
    let v = run(&[
        "fills",
        "--addr",
        &addr,
        "--brokers",
        &bootstrap,
        "--rate",
        "100",
        "--duration",
        "2",
        "--accounts",
        "5",
        "--warmup",
        "0",
    ]);
    assert_eq!(v["mode"], "fills");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["ok"], v["sent"], "every fill came back as an event: {v}");
    coherent(&v);
}

//! The client subcommands of the README's example session, against the real
//! binary: each prints `key: value` lines, and errors exit non-zero.

mod common;

use common::server::Server;
use std::process::Command;

fn cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_account-service"))
        .args(args)
        .args(["--addr", &server.addr()])
        .output()
        .expect("run account-service");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(server: &Server, args: &[&str]) -> String {
    let (success, stdout, stderr) = cli(server, args);
    assert!(success, "{args:?} failed: {stderr}");
    stdout
}

#[tokio::test]
async fn readme_session_with_the_client_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;

    let out = ok(
        &server,
        &["account", "open", "--account-id", "42", "--currency", "USD"],
    );
    assert!(out.contains("result: RESULT_OK"), "{out}");
    ok(
        &server,
        &[
            "deposit",
            "--account-id",
            "42",
            "--currency",
            "USD",
            "--amount",
            "10000",
        ],
    );
    let out = ok(
        &server,
        &[
            "reserve",
            "--account-id",
            "42",
            "--order-id",
            "ord-1",
            "--kind",
            "cash",
            "--asset",
            "USD",
            "--amount",
            "1010.00",
            "--request-id",
            "res-1",
        ],
    );
    assert!(
        out.contains("result: RESULT_OK")
            && out.contains("available: 8990")
            && out.contains("reserved: 1010"),
        "{out}"
    );
    assert!(
        out.contains("reservation.state: RESERVATION_STATE_OPEN"),
        "{out}"
    );
    let out = ok(
        &server,
        &[
            "fill",
            "--account-id",
            "42",
            "--order-id",
            "ord-1",
            "--symbol",
            "ACME",
            "--side",
            "buy",
            "--quantity",
            "10",
            "--price",
            "100",
        ],
    );
    assert!(out.contains("result: RESULT_OK"), "{out}");
    let out = ok(
        &server,
        &["unreserve", "--account-id", "42", "--order-id", "ord-1"],
    );
    assert!(out.contains("released: 10"), "{out}");
    let out = ok(&server, &["account", "get", "--account-id", "42"]);
    assert!(out.contains("cash.USD: available=9000 reserved=0"), "{out}");
    assert!(
        out.contains("position.ACME: quantity=10 reserved_quantity=0 cost_basis=1000 average_price=100 realized_pnl=0 currency=USD"),
        "{out}"
    );
    let out = ok(
        &server,
        &[
            "reservation",
            "get",
            "--account-id",
            "42",
            "--order-id",
            "ord-1",
        ],
    );
    assert!(
        out.contains("state: RESERVATION_STATE_RELEASED") && out.contains("consumed: 1000"),
        "{out}"
    );

    // A retry with the same request id is a replay.
    let out = ok(
        &server,
        &[
            "reserve",
            "--account-id",
            "42",
            "--order-id",
            "ord-1",
            "--kind",
            "cash",
            "--asset",
            "USD",
            "--amount",
            "1010.00",
            "--request-id",
            "res-1",
        ],
    );
    assert!(out.contains("replayed: true"), "{out}");

    // Errors exit non-zero and say why.
    let (success, _, stderr) = cli(&server, &["deposit", "--account-id", "42", "--amount=-5"]);
    assert!(
        !success && stderr.contains("InvalidArgument") && stderr.contains("amount"),
        "{stderr}"
    );
    let (success, _, stderr) = cli(&server, &["account", "get", "--account-id", "7"]);
    assert!(!success && stderr.contains("NotFound"), "{stderr}");
}

#[tokio::test]
async fn metrics_endpoint_exports_the_core_series() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    ok(&server, &["account", "open", "--account-id", "1"]);
    ok(&server, &["deposit", "--account-id", "1", "--amount", "5"]);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.metrics_port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    for series in [
        "account_rpc_latency_seconds_bucket{",
        "rpc=\"OpenAccount\"",
        "account_rpc_outcomes_total{rpc=\"Deposit\",caller=\"anonymous\",outcome=\"OK\"} 1",
        "account_engine_queue_depth",
        "account_engine_batch_size_bucket",
        "account_wal_sync_seconds_bucket",
        "account_replay_seconds",
        "account_accounts 1",
        "account_ready 1",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
}

/// `--log-format json`: every line one JSON object; one line per start-up
/// phase (listening, with both addresses; replay, with records and seconds;
/// serving), and nothing per request at info.
#[tokio::test]
async fn json_logs_have_one_line_per_start_up_phase_and_none_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = Server::spawn_logging(
        &dir.path().join("data"),
        &["--log-format", "json"],
        "info",
        log.into(),
    );
    server.wait_serving().await;
    let read = || std::fs::read_to_string(&log_path).unwrap();
    let at_start = read().lines().count();
    common::server::open_and_fund_account_1(&server, "100").await;
    let mut accounts = server.accounts().await;
    for i in 0..20 {
        accounts
            .reserve(common::server::reserve_one_usd(i))
            .await
            .unwrap();
    }
    assert_eq!(
        read().lines().count(),
        at_start,
        "no line per request:\n{}",
        read()
    );
    assert!(server.terminate().success());

    let lines: Vec<serde_json::Value> = read()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let phase = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines:?}"))
    };
    let listening = &phase("listening")["fields"];
    assert!(listening["grpc"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(listening["metrics"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let replayed = &phase("write-ahead log replayed")["fields"];
    assert_eq!(replayed["records"], 0);
    assert!(replayed["seconds"].is_f64());
    assert_eq!(phase("serving")["level"], "INFO");
    assert!(lines.iter().all(|l| l["timestamp"].is_string()));
}

/// `--kafka-option KEY=VALUE` reaches librdkafka: a bad value stops the start
/// with librdkafka's own error naming the setting.
#[test]
fn kafka_options_reach_librdkafka() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_account-service"))
        .args(["serve", "--no-pin", "--data-dir"])
        .arg(dir.path())
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--kafka-brokers", "127.0.0.1:1"])
        .args(["--kafka-option", "security.protocol=bogus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"Invalid value "bogus" for configuration property "security.protocol""#),
        "{stderr}"
    );
}

//! What an operator runs against the service, checked against the real
//! thing: `promtool check metrics` on a live `/metrics` after traffic,
//! `promtool check config` (and so the alert rules) on `ops/prometheus/`, and
//! every metric the dashboard and the alert rules name is one the service
//! exports. The service runs with a broker (tansu) and has consumed a good
//! and a bad message, so the per-partition and per-reason families have
//! series too. `scripts/test` installs promtool (Debian's `prometheus`) and
//! tansu when they are missing; without them these tests fail rather than skip.

mod common;

use common::kafka::{metric, produce, Broker, DEPOSITS};
use common::server::Server;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

fn promtool() -> Command {
    Command::new(common::require_tool("promtool", "--version", "prometheus"))
}

fn ops(path: &str) -> String {
    format!("{}/ops/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// `GET /metrics` with an optional `Accept` header: (headers, body).
fn scrape(server: &Server, accept: Option<&str>) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.metrics_port)).unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: localhost\r\n{accept}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    (head.to_ascii_lowercase(), body.to_owned())
}

/// Every sample name a scrape in the text format 0.0.4 can hold.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The `account_*` metric names a PromQL expression refers to.
fn referenced(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("account_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` of the dashboard's panels and of the alert rules.
fn ops_expressions() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ops("grafana/dashboards/account-service.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            exprs.push((format!("panel {:?}", panel["title"]), expr.to_owned()));
        }
    }
    for line in std::fs::read_to_string(ops("prometheus/alerts.yml"))
        .unwrap()
        .lines()
    {
        if let Some(expr) = line.trim().strip_prefix("expr: ") {
            exprs.push(("alerts.yml".into(), expr.to_owned()));
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_live_metrics_and_ops_names_only_exported_metrics() {
    let mut promtool_metrics = promtool();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let server = Server::start(dir.path(), &["--kafka-brokers", &broker.bootstrap()]).await;
    common::server::open_and_fund_account_1(&server, "1000").await;
    // One deposit applied, one message dead-lettered (not protobuf).
    let deposit = account_service::proto::events::DepositEvent {
        event_id: "dep-ops-1".into(),
        account_id: 1,
        amount: "5".into(),
        currency: "USD".into(),
        source: String::new(),
        timestamp: account_service::engine::now_ms(),
    };
    let producer = broker.producer();
    produce(
        &producer,
        DEPOSITS,
        "1",
        &prost::Message::encode_to_vec(&deposit),
    )
    .await;
    produce(&producer, DEPOSITS, "1", b"\xff not protobuf").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The consumer's lag comes from librdkafka's statistics, once a second.
    while metric(server.metrics_port, "account_dlq_messages_total") < 1.0
        || !common::kafka::metrics_text(server.metrics_port)
            .contains("\naccount_kafka_consumer_lag_records{")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the bad message is dead-lettered and the consumer's lag reported"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut accounts = server.accounts().await;
    for i in 0..50 {
        accounts
            .reserve(common::server::reserve_one_usd(i))
            .await
            .unwrap();
    }

    // Prometheus asks for OpenMetrics and gets it; anything else gets 0.0.4.
    let (head, body) = scrape(&server, Some("application/openmetrics-text; version=1.0.0"));
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"));
    let (head, text) = scrape(&server, None);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");

    let mut check = promtool_metrics
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let exported = exported_names(&text);
    let mut used = BTreeSet::new();
    for (place, expr) in ops_expressions() {
        for name in referenced(&expr) {
            assert!(
                exported.contains(&name),
                "{place}: {name} in `{expr}` is not exported by the service"
            );
            used.insert(name);
        }
    }
    // Not vacuous: the dashboard and rules cover the series design 4.5 lists.
    for name in [
        "account_rpc_latency_seconds_bucket",
        "account_rpc_outcomes_total",
        "account_engine_queue_depth",
        "account_engine_batch_size_bucket",
        "account_wal_sync_seconds_bucket",
        "account_kafka_consumer_lag_records",
        "account_outbox_backlog_records",
        "account_outbox_backlog_age_seconds",
        "account_outbox_dropped_total",
        "account_outbox_spills_total",
        "account_snapshot_age_seconds",
        "account_dlq_messages_total",
        "account_overdrawn_accounts",
        "account_replay_records",
        "account_ready",
    ] {
        assert!(used.contains(name), "nothing in ops/ watches {name}");
    }
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_alert_rules() {
    for args in [
        [
            "check".to_owned(),
            "config".into(),
            ops("prometheus/prometheus.yml"),
        ],
        [
            "check".to_owned(),
            "rules".into(),
            ops("prometheus/alerts.yml"),
        ],
    ] {
        let out = promtool().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

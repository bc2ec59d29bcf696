//! Kafka end to end, against a real broker (tansu, started by the test) and
//! the real binary: fills and cash movements in, account events and dead
//! letters out, exactly once across kill -9, Reserve through a broker outage.

mod common;

use account_service::proto::account::v1 as pb;
use account_service::proto::events;
use common::kafka::{
    account_events, assert_duplicates_identical, buy_fills, fill, fill_legs, header, metric,
    produce, Broker, DEPOSITS, EVENTS, FILLS, WITHDRAWALS,
};
use common::server::Server;
use prost::Message as _;
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rust_decimal::Decimal;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::{Duration, Instant};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

async fn start(broker: &Broker, dir: &std::path::Path) -> Server {
    Server::start(dir, &["--kafka-brokers", &broker.bootstrap()]).await
}

async fn open_accounts(server: &Server, ids: impl IntoIterator<Item = i64>) {
    let mut admin = server.admin().await;
    for id in ids {
        let r = admin
            .open_account(pb::OpenAccountRequest {
                request_id: format!("open-{id}"),
                account_id: id,
                base_currency: "USD".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::Result::Ok as i32);
    }
}

fn deposit(event_id: &str, account_id: i64, amount: &str) -> events::DepositEvent {
    events::DepositEvent {
        event_id: event_id.into(),
        account_id,
        currency: "USD".into(),
        amount: amount.into(),
        timestamp: account_service::engine::now_ms(),
        source: String::new(),
    }
}

async fn send<M: prost::Message>(
    p: &FutureProducer,
    topic: &str,
    account: i64,
    m: &M,
) -> (i32, i64) {
    produce(p, topic, &account.to_string(), &m.encode_to_vec()).await
}

async fn account(server: &Server, id: i64) -> Option<pb::Account> {
    let mut accounts = server.accounts().await;
    accounts
        .get_account(pb::GetAccountRequest { account_id: id })
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn cash(a: &pb::Account) -> (Decimal, Decimal) {
    a.cash
        .iter()
        .find(|c| c.currency == "USD")
        .map_or((Decimal::ZERO, Decimal::ZERO), |c| {
            (d(&c.available), d(&c.reserved))
        })
}

fn position(a: &pb::Account, symbol: &str) -> (Decimal, Decimal) {
    a.positions
        .iter()
        .find(|p| p.symbol == symbol)
        .map_or((Decimal::ZERO, Decimal::ZERO), |p| {
            (d(&p.quantity), d(&p.cost_basis))
        })
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_and_fills_move_balances_and_publish_account_events() {
    let broker = Broker::start();
    broker.create_service_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&broker, dir.path()).await;
    open_accounts(&server, [1, 2]).await;
    let p = broker.producer();

    send(&p, DEPOSITS, 1, &deposit("dep-1", 1, "10000")).await;
    send(&p, DEPOSITS, 2, &deposit("dep-2", 2, "50.5")).await;
    // Topics are not ordered with each other: let the deposits land first.
    eventually(Duration::from_secs(20), "the deposits", || async {
        account(&server, 2)
            .await
            .is_some_and(|a| cash(&a).0 == d("50.5"))
            && account(&server, 1)
                .await
                .is_some_and(|a| cash(&a).0 == d("10000"))
    })
    .await;
    send(&p, FILLS, 1, &fill("fill-1", 1, "BUY", "10", "100.5")).await;
    send(&p, FILLS, 1, &fill("fill-2", 1, "SELL", "4", "110")).await;
    // The same event id again (a producer retry): applied once.
    send(&p, FILLS, 1, &fill("fill-2", 1, "SELL", "4", "110")).await;
    send(&p, WITHDRAWALS, 2, &deposit("wd-1", 2, "20.25")).await;

    eventually(Duration::from_secs(20), "balances", || async {
        let (Some(a1), Some(a2)) = (account(&server, 1).await, account(&server, 2).await) else {
            return false;
        };
        cash(&a2).0 == d("30.25") && position(&a1, "ACME").0 == d("6")
    })
    .await;
    let a1 = account(&server, 1).await.unwrap();
    // 10000 - 1005 + 440
    assert_eq!(cash(&a1), (d("9435"), Decimal::ZERO));
    // 10 @ 100.5 = 1005; selling 4 removes 4/10 of the cost: 603 left.
    assert_eq!(position(&a1, "ACME"), (d("6"), d("603")));

    let messages = broker.read_all(EVENTS, 9, Duration::from_secs(20));
    let events = account_events(&messages);
    let by_id = assert_duplicates_identical(&events);
    let caused = |cause: &str| {
        let mut v: Vec<_> = by_id
            .values()
            .filter(|e| e.cause_id == cause)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        v
    };
    use events::AccountEventType as T;
    let opened = caused("open-1");
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].r#type, T::AccountOpened as i32);
    let dep = caused("dep-1");
    assert_eq!(dep.len(), 1);
    assert_eq!(dep[0].r#type, T::Deposited as i32);
    assert_eq!(
        (dep[0].amount.as_str(), dep[0].available_after.as_str()),
        ("10000", "10000")
    );
    assert_eq!(dep[0].event_id, format!("{}-0", dep[0].sequence));
    let buy = caused("fill-1");
    assert_eq!(buy.len(), 2, "cash and position: {buy:?}");
    assert!(buy
        .iter()
        .all(|e| e.r#type == T::FillApplied as i32 && e.order_id == "ord-fill-1"));
    let cash_leg = buy.iter().find(|e| e.asset == "USD").unwrap();
    assert_eq!(
        (cash_leg.amount.as_str(), cash_leg.available_after.as_str()),
        ("1005", "8995")
    );
    let share_leg = buy.iter().find(|e| e.asset == "ACME").unwrap();
    assert_eq!(
        (
            share_leg.amount.as_str(),
            share_leg.available_after.as_str()
        ),
        ("10", "10")
    );
    assert_eq!(
        caused("fill-2").len(),
        2,
        "the duplicate fill produced no event"
    );
    let wd = caused("wd-1");
    assert_eq!(wd.len(), 1);
    assert_eq!(
        (wd[0].r#type, wd[0].available_after.as_str()),
        (T::Withdrawn as i32, "30.25")
    );
    assert!(metric(server.metrics_port, "account_kafka_consumer_messages_total") >= 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_stream_of_10000_fills_applies_each_exactly_once() {
    kill9_mid_stream(None).await;
}

/// The production configuration: Kafka, PostgreSQL snapshots every 50 ms and
/// 1 MiB WAL segments, so snapshots, the outbox gate and WAL retention all
/// run while the process is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_stream_with_postgres_snapshots_applies_each_fill_exactly_once() {
    let pg = common::postgres::Postgres::start();
    kill9_mid_stream(Some(&pg)).await;
    let at = pg.snapshot_sequence().await;
    assert!(at > 0, "snapshots were written");
    let published = pg.outbox_watermark().await;
    assert!(
        published.is_some_and(|w| w >= at),
        "a snapshot ahead of the outbox: {published:?} < {at}"
    );
}

async fn kill9_mid_stream(pg: Option<&common::postgres::Postgres>) {
    const FILLS_TOTAL: usize = 10_000;
    const ACCOUNTS: i64 = 20;
    let broker = Broker::start();
    broker.create_service_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = broker.bootstrap();
    let url = pg.map(|pg| pg.url()).unwrap_or_default();
    let mut args = vec!["--kafka-brokers", bootstrap.as_str()];
    if pg.is_some() {
        args.extend([
            "--postgres-url",
            url.as_str(),
            "--snapshot-interval-ms",
            "50",
            "--wal-segment-mib",
            "1",
        ]);
    }
    let mut server = Server::start(dir.path(), &args).await;
    open_accounts(&server, 1..=ACCOUNTS).await;

    let (fills, expected) = buy_fills(FILLS_TOTAL, ACCOUNTS);
    // Produce in the background at a steady pace so the kill lands mid-stream.
    let producer = broker.producer();
    let producing = tokio::spawn(async move {
        for chunk in fills.chunks(500) {
            let sends = chunk
                .iter()
                .map(|f| send(&producer, FILLS, f.account_id, f));
            futures_join_all(sends).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    eventually(
        Duration::from_secs(60),
        "a quarter of the fills",
        || async {
            metric(server.metrics_port, "account_kafka_consumer_messages_total")
                >= (FILLS_TOTAL / 4) as f64
        },
    )
    .await;
    server.kill9();
    let server = Server::start(dir.path(), &args).await;
    producing.await.unwrap();

    eventually(Duration::from_secs(120), "every fill applied", || async {
        let mut done = 0;
        for (id, (qty, _)) in &expected {
            if let Some(a) = account(&server, *id).await {
                if position(&a, "ACME").0 == *qty {
                    done += 1;
                }
            }
        }
        done == expected.len()
    })
    .await;
    // Still exact a moment later (no late duplicate).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, (qty, cost)) in &expected {
        let a = account(&server, *id).await.unwrap();
        assert_eq!(position(&a, "ACME"), (*qty, *cost), "account {id}");
        assert_eq!(cash(&a).0, -*cost, "account {id}");
    }

    // Account events: every fill has its two legs; duplicates only by event id.
    let messages = broker.read_all(EVENTS, 2 * FILLS_TOTAL, Duration::from_secs(120));
    let events = account_events(&messages);
    let by_id = assert_duplicates_identical(&events);
    let legs = fill_legs(&by_id);
    assert_eq!(legs.len(), FILLS_TOTAL, "a fill without account events");
    assert!(legs.values().all(|ids| ids.len() == 2));
    eprintln!(
        "events read: {}, distinct: {}, republished duplicates: {}",
        events.len(),
        by_id.len(),
        events.len() - by_id.len()
    );
    if pg.is_some() {
        // Retention: the first segment is covered by a snapshot and published.
        let first = dir.path().join("wal").join(format!("{:020}.wal", 1));
        eventually(
            Duration::from_secs(30),
            "the first WAL segment deleted",
            || async { !first.exists() },
        )
        .await;
    }
}

/// Joins futures without pulling in the futures crate.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut out = Vec::new();
    let handles: Vec<_> = futures.map(Box::pin).collect();
    for h in handles {
        out.push(h.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_go_to_the_dlq_with_reasons_and_the_good_ones_apply() {
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(&broker, dir.path()).await;
    open_accounts(&server, [1]).await;
    let p = broker.producer();

    let mut bad_quantity = fill("f-badqty", 1, "BUY", "1", "10");
    bad_quantity.quantity = "1.2.3".into();
    let mut bad_amount = fill("f-badamt", 1, "BUY", "2", "10");
    bad_amount.filled_amount = "20.01".into();
    let bad_side = fill("f-badside", 1, "HOLD", "1", "10");
    let unknown_account = fill("f-unknown", 999, "BUY", "1", "10");
    let mut other_currency = fill("f-eur", 1, "BUY", "1", "10");
    other_currency.currency = "EUR".into();

    /// (source topic, (partition, offset), payload, start of `dlq.reason`)
    type DeadLetter = (String, (i32, i64), Vec<u8>, &'static str);
    let mut dlq_expected: Vec<DeadLetter> = Vec::new();
    let mut bad = |topic: &str, at: (i32, i64), payload: Vec<u8>, reason: &'static str| {
        dlq_expected.push((topic.to_owned(), at, payload, reason));
    };
    send(&p, FILLS, 1, &fill("f-good-1", 1, "BUY", "1", "10")).await;
    let garbage = b"\xff\xff\xff not protobuf".to_vec();
    bad(
        FILLS,
        produce(&p, FILLS, "1", &garbage).await,
        garbage,
        "payload: not a FillEvent",
    );
    for (m, reason) in [
        (&bad_quantity, "quantity: "),
        (&bad_amount, "filled_amount: "),
        (&bad_side, "side: "),
        (&unknown_account, "ACCOUNT_NOT_FOUND"),
        (&other_currency, "CURRENCY_MISMATCH"),
    ] {
        bad(
            FILLS,
            send(&p, FILLS, m.account_id, m).await,
            m.encode_to_vec(),
            reason,
        );
    }
    let bad_deposit = deposit("dep-bad", 1, "12.3456789012");
    bad(
        DEPOSITS,
        send(&p, DEPOSITS, 1, &bad_deposit).await,
        bad_deposit.encode_to_vec(),
        "amount: ",
    );
    let unknown_withdrawal = deposit("wd-unknown", 7, "1");
    bad(
        WITHDRAWALS,
        send(&p, WITHDRAWALS, 7, &unknown_withdrawal).await,
        unknown_withdrawal.encode_to_vec(),
        "ACCOUNT_NOT_FOUND",
    );
    send(&p, FILLS, 1, &fill("f-good-2", 1, "BUY", "2", "10")).await;
    send(&p, DEPOSITS, 1, &deposit("dep-good", 1, "100")).await;
    // A balance beyond 18 integer digits: refused, never rounded.
    let overflow = deposit("dep-overflow", 1, "999999999999999999.99999999");
    bad(
        DEPOSITS,
        send(&p, DEPOSITS, 1, &overflow).await,
        overflow.encode_to_vec(),
        "amount overflow",
    );

    eventually(Duration::from_secs(20), "the good messages", || async {
        account(&server, 1)
            .await
            .is_some_and(|a| position(&a, "ACME").0 == d("3") && cash(&a).0 == d("70"))
    })
    .await;

    let check_dlq = |at_least_once: bool| {
        for topic in [FILLS, DEPOSITS, WITHDRAWALS] {
            let expected: Vec<_> = dlq_expected.iter().filter(|e| e.0 == topic).collect();
            let got = broker.read_all(
                &format!("{topic}.dlq"),
                expected.len(),
                Duration::from_secs(20),
            );
            let mut offsets = HashSet::new();
            for m in &got {
                let offset: i64 = header(m, "dlq.offset").unwrap().parse().unwrap();
                let partition: i32 = header(m, "dlq.partition").unwrap().parse().unwrap();
                assert_eq!(header(m, "dlq.topic").as_deref(), Some(topic));
                let (_, _, payload, reason) = expected
                    .iter()
                    .find(|e| e.1 == (partition, offset))
                    .unwrap_or_else(|| {
                        panic!("unexpected dead letter {topic}/{partition}@{offset}")
                    });
                assert_eq!(
                    m.payload().unwrap(),
                    payload.as_slice(),
                    "unchanged payload"
                );
                let text = header(m, "dlq.reason").unwrap();
                assert!(
                    text.starts_with(reason),
                    "{text:?} should start with {reason:?}"
                );
                offsets.insert((partition, offset));
            }
            assert_eq!(
                offsets.len(),
                expected.len(),
                "{topic}: every bad message, once each"
            );
            if !at_least_once {
                assert_eq!(got.len(), expected.len(), "{topic}: no duplicates");
            }
        }
    };
    check_dlq(false);
    let dlq_counted = metric(server.metrics_port, "account_dlq_messages_total");
    assert_eq!(dlq_counted, dlq_expected.len() as f64);

    // After a kill -9 the dead letters are not decided again: at most
    // republished from the watermark (same offsets), and the good ones stay applied once.
    server.kill9();
    let server = start(&broker, dir.path()).await;
    send(&p, FILLS, 1, &fill("f-good-3", 1, "BUY", "1", "10")).await;
    eventually(
        Duration::from_secs(20),
        "the fill after the restart",
        || async {
            account(&server, 1)
                .await
                .is_some_and(|a| position(&a, "ACME").0 == d("4"))
        },
    )
    .await;
    check_dlq(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_never_blocks_reserve_and_the_backlog_drains() {
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&broker, dir.path()).await;
    open_accounts(&server, [1]).await;
    let mut admin = server.admin().await;
    admin.deposit(deposit("dep-1", 1, "1000000")).await.unwrap();
    let mut accounts = server.accounts().await;
    let reserve = common::server::reserve_one_usd;
    let run = |from: usize, to: usize| {
        let mut accounts = accounts.clone();
        async move {
            let mut latencies = Vec::new();
            for i in from..to {
                let started = Instant::now();
                let r = accounts.reserve(reserve(i)).await.unwrap().into_inner();
                latencies.push(started.elapsed());
                assert_eq!(r.result, pb::Result::Ok as i32);
            }
            latencies.sort();
            latencies[latencies.len() * 99 / 100]
        }
    };
    let p99_before = run(0, 300).await;
    eventually(
        Duration::from_secs(20),
        "the outbox to catch up",
        || async {
            metric(server.metrics_port, "account_outbox_backlog_records") == 0.0
                && metric(server.metrics_port, "account_outbox_published_total") >= 301.0
        },
    )
    .await;

    broker.pause();
    let p99_during = run(300, 1300).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backlog = metric(server.metrics_port, "account_outbox_backlog_records");
    broker.resume();
    eprintln!(
        "Reserve p99 before the outage {p99_before:?}, during {p99_during:?}; backlog {backlog}"
    );
    assert!(
        backlog >= 1000.0,
        "events wait while the broker is down: {backlog}"
    );
    assert!(
        p99_during < Duration::from_millis(50).max(p99_before * 5),
        "Reserve slowed down by the outage: p99 {p99_during:?} (before {p99_before:?})"
    );
    let _ = &mut accounts;

    eventually(Duration::from_secs(60), "the backlog to drain", || async {
        metric(server.metrics_port, "account_outbox_backlog_records") == 0.0
    })
    .await;
    let messages = broker.read_all(EVENTS, 1302, Duration::from_secs(30));
    let by_id = assert_duplicates_identical(&account_events(&messages));
    let reserved: HashSet<_> = by_id
        .values()
        .filter(|e| e.r#type == events::AccountEventType::Reserved as i32)
        .map(|e| e.cause_id.clone())
        .collect();
    assert_eq!(reserved.len(), 1300, "every Reserve's event arrived");
}

/// A record the broker can never take (here a dead letter over the producer's
/// `message.max.bytes`: it carries the original message) is logged, counted
/// and passed over: the events journaled after it are still published and the
/// watermark moves on. Before, it was retried forever and held everything
/// behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_for_good_is_passed_over_and_the_records_after_it_publish() {
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = broker.bootstrap();
    let server = Server::start(
        dir.path(),
        &[
            "--kafka-brokers",
            &bootstrap,
            "--kafka-option",
            "message.max.bytes=20000",
        ],
    )
    .await;
    open_accounts(&server, [1]).await;
    let p = broker.producer();
    // Not a FillEvent: dead-lettered, and its dead letter is over 20,000 bytes.
    produce(&p, FILLS, "1", &[0xff; 30_000]).await;
    send(&p, DEPOSITS, 1, &deposit("dep-after", 1, "100")).await;
    let port = server.metrics_port;
    eventually(
        Duration::from_secs(30),
        "the refused dead letter dropped and the deposit after it published",
        || async {
            metric(port, "account_outbox_dropped_total") == 1.0
                && metric(port, "account_outbox_backlog_records") == 0.0
                && metric(port, "account_kafka_consumer_messages_total") >= 2.0
                // The watermark passed the refused record.
                && metric(port, "account_outbox_watermark")
                    >= metric(port, "account_engine_last_sequence")
        },
    )
    .await;
    let text = common::kafka::metrics_text(port);
    assert!(
        text.contains(
            "account_outbox_dropped_total{topic=\"trading.fills.dlq\",reason=\"MESSAGE_SIZE_TOO_LARGE\"} 1"
        ),
        "{text}"
    );
    let messages = broker.read_all(EVENTS, 2, Duration::from_secs(30));
    let deposited = account_events(&messages).into_iter().any(|(_, e)| {
        e.r#type == events::AccountEventType::Deposited as i32 && e.cause_id == "dep-after"
    });
    assert!(
        deposited,
        "the deposit after the refused record is published"
    );
}

/// SIGTERM while the broker is down with a backlog of events: the service
/// stops within seconds (the outbox drains for at most `DRAIN_MAX`, then
/// leaves the rest to the WAL) instead of waiting for the broker, and after a
/// restart with the broker back every event of the backlog is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_broker_outage_stops_promptly_and_the_backlog_publishes_after() {
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(&broker, dir.path()).await;
    open_accounts(&server, [1]).await;
    let mut admin = server.admin().await;
    admin.deposit(deposit("dep-1", 1, "1000000")).await.unwrap();
    let mut accounts = server.accounts().await;

    broker.pause();
    for i in 0..2_000 {
        let r = accounts
            .reserve(common::server::reserve_one_usd(i))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::Result::Ok as i32);
    }
    // The gauge is refreshed every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backlog = metric(server.metrics_port, "account_outbox_backlog_records");
    assert!(
        backlog >= 1_000.0,
        "the events wait for the broker: {backlog}"
    );
    let started = Instant::now();
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(60));
    let took = started.elapsed();
    eprintln!("stop with the broker down and {backlog} events unpublished: {took:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}"
    );
    // The outbox drains for at most DRAIN_MAX (5 s) and a metadata request
    // takes at most 1 s; a stop that waited for the broker would last until
    // it is back (before this test, 12-17 s: three metadata requests of 5 s).
    assert!(took < Duration::from_secs(15), "stop took {took:?}");

    broker.resume();
    let server = start(&broker, dir.path()).await;
    eventually(
        Duration::from_secs(60),
        "the backlog to publish",
        || async {
            metric(server.metrics_port, "account_outbox_backlog_records") == 0.0
                && metric(server.metrics_port, "account_outbox_watermark")
                    >= metric(server.metrics_port, "account_engine_last_sequence")
        },
    )
    .await;
    let messages = broker.read_all(EVENTS, 2_002, Duration::from_secs(30));
    let by_id = assert_duplicates_identical(&account_events(&messages));
    let reserved = by_id
        .values()
        .filter(|e| e.r#type == events::AccountEventType::Reserved as i32)
        .count();
    assert_eq!(reserved, 2_000, "every Reserve's event, once per event id");
}

/// A long outage holds only the outbox's window in memory: past it, the
/// writer spills and the events are re-derived from the WAL once the broker
/// takes records again; a restart during the outage replays the same way
/// instead of loading the whole backlog. Everything publishes after, each
/// event id with one content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_holds_only_the_window_and_every_event_publishes_after() {
    const WINDOW: f64 = 1_000.0;
    const RESERVES: usize = 20_000;
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--kafka-brokers",
        &broker.bootstrap(),
        "--outbox-window-records",
        "1000",
    ];
    let mut server = Server::start(dir.path(), &args).await;
    open_accounts(&server, [1]).await;
    let mut admin = server.admin().await;
    admin.deposit(deposit("dep-1", 1, "1000000")).await.unwrap();
    let mut accounts = server.accounts().await;

    broker.pause();
    let rss_before = server.peak_rss_mib();
    let mut held_max: f64 = 0.0;
    for chunk in (0..RESERVES).collect::<Vec<_>>().chunks(100) {
        let requests = chunk
            .iter()
            .map(|&i| common::server::reserve_one_usd(i))
            .collect();
        let replies = accounts
            .reserve_batch(pb::ReserveBatchRequest {
                requests,
                all_or_nothing: false,
            })
            .await
            .unwrap()
            .into_inner()
            .replies;
        assert!(replies.iter().all(|r| r.result == pb::Result::Ok as i32));
        held_max = held_max.max(metric(server.metrics_port, "account_outbox_held_records"));
    }
    // The gauges are refreshed every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held_max = held_max.max(metric(server.metrics_port, "account_outbox_held_records"));
    let spills = metric(server.metrics_port, "account_outbox_spills_total");
    eprintln!(
        "outage: {RESERVES} events, held at most {held_max} records (window {WINDOW}), \
         {spills} spill(s), peak RSS {rss_before:?} MiB before, {:?} MiB after",
        server.peak_rss_mib()
    );
    assert!(spills >= 1.0, "the window filled up: {spills} spills");
    assert!(
        held_max <= 3.0 * WINDOW,
        "at most the window and a batch or two in memory: {held_max}"
    );

    // A restart during the outage: replay spills as well.
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let server = Server::start(dir.path(), &args).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = metric(server.metrics_port, "account_outbox_held_records");
    let spills = metric(server.metrics_port, "account_outbox_spills_total");
    eprintln!(
        "restart during the outage: held {held} records, {spills} spill(s), peak RSS {:?} MiB",
        server.peak_rss_mib()
    );
    assert!(held <= 3.0 * WINDOW, "replay held {held} records");
    assert!(spills >= 1.0, "replay spilled: {spills}");

    broker.resume();
    eventually(
        Duration::from_secs(120),
        "the backlog to publish",
        || async {
            metric(server.metrics_port, "account_outbox_backlog_records") == 0.0
                && metric(server.metrics_port, "account_outbox_watermark")
                    >= metric(server.metrics_port, "account_engine_last_sequence")
        },
    )
    .await;
    let messages = broker.read_all(EVENTS, RESERVES + 2, Duration::from_secs(60));
    let by_id = assert_duplicates_identical(&account_events(&messages));
    let reserved: HashSet<_> = by_id
        .values()
        .filter(|e| e.r#type == events::AccountEventType::Reserved as i32)
        .map(|e| e.cause_id.clone())
        .collect();
    assert_eq!(reserved.len(), RESERVES, "every Reserve's event arrived");
    let ids: HashSet<_> = by_id.keys().collect();
    assert_eq!(
        ids.len(),
        RESERVES + 2,
        "open, deposit and every Reserve, nothing else"
    );
}

/// Measurement, run by hand in release:
/// `cargo test --release --test kafka -- --ignored --nocapture fills_ingest`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn fills_ingest_rate_and_lag() {
    let total: usize = std::env::var("FILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rate: usize = std::env::var("RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let seconds: usize = std::env::var("SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let broker = Broker::start();
    broker.create_service_topics(3).await;
    let dir = tempfile::tempdir().unwrap();
    let producer = broker.producer();
    let mut server = start(&broker, dir.path()).await;
    open_accounts(&server, 1..=100).await;
    assert!(server.terminate().success());

    // 1. Ingest rate: a backlog of fills produced while the service is down,
    // then read by it from the start.
    let started = Instant::now();
    let mut sends = Vec::with_capacity(10_000);
    for i in 0..total {
        let f = fill(&format!("b-{i}"), 1 + (i as i64 % 100), "BUY", "1", "10");
        let payload = f.encode_to_vec();
        let key = f.account_id.to_string();
        let p = producer.clone();
        sends.push(tokio::spawn(async move {
            produce(&p, FILLS, &key, &payload).await
        }));
        if sends.len() == 10_000 {
            for s in sends.drain(..) {
                s.await.unwrap();
            }
        }
    }
    for s in sends.drain(..) {
        s.await.unwrap();
    }
    eprintln!("produced {total} fills in {:?}", started.elapsed());
    let server = start(&broker, dir.path()).await;
    let began = Instant::now();
    eventually(Duration::from_secs(600), "the backlog ingested", || async {
        metric(server.metrics_port, "account_kafka_consumer_messages_total") >= total as f64
    })
    .await;
    let elapsed = began.elapsed();
    eprintln!(
        "INGEST: {total} fills in {elapsed:?} = {:.0} fills/s",
        total as f64 / elapsed.as_secs_f64()
    );
    // Two account events per fill (cash and shares) through the outbox.
    eventually(
        Duration::from_secs(600),
        "the backlog's events published",
        || async {
            metric(server.metrics_port, "account_outbox_published_total") >= 2.0 * total as f64
        },
    )
    .await;
    let elapsed = began.elapsed();
    eprintln!(
        "OUTBOX: {} account events acknowledged {elapsed:?} after start = {:.0} events/s",
        2 * total,
        2.0 * total as f64 / elapsed.as_secs_f64()
    );

    // 2. Lag at a fixed produce rate: journal time of the account event minus
    // the fill's produce time (both on this machine's clock).
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let begin = Instant::now();
    let mut handles = Vec::new();
    for i in 0..rate * seconds {
        let due = begin + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut f = fill(&format!("l-{i}"), 1 + (i as i64 % 100), "BUY", "1", "10");
        // Intended send time (no coordinated omission).
        f.timestamp = account_service::engine::now_ms() - due.elapsed().as_millis() as i64;
        let payload = f.encode_to_vec();
        let key = f.account_id.to_string();
        let p = producer.clone();
        handles.push(tokio::spawn(async move {
            produce(&p, FILLS, &key, &payload).await
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let produced = begin.elapsed();
    eventually(
        Duration::from_secs(300),
        "the fills' events published",
        || async {
            metric(server.metrics_port, "account_outbox_published_total")
                >= 2.0 * (total + rate * seconds) as f64
        },
    )
    .await;
    // Each fill's intended send time, from the fill topic.
    let fills = broker.read_all(FILLS, total + rate * seconds, Duration::from_secs(300));
    let mut sent_ms = HashMap::new();
    for m in &fills {
        let f = events::FillEvent::decode(m.payload().unwrap()).unwrap();
        if f.event_id.starts_with("l-") {
            sent_ms.insert(f.event_id, f.timestamp);
        }
    }
    let messages = broker.read_all(
        EVENTS,
        2 * (total + rate * seconds),
        Duration::from_secs(300),
    );
    let mut seen = HashSet::new();
    let mut lag_ms: Vec<i64> = account_events(&messages)
        .into_iter()
        .filter(|(_, e)| e.asset == "ACME" && seen.insert(e.cause_id.clone()))
        .filter_map(|(_, e)| Some(e.timestamp - sent_ms.get(&e.cause_id)?))
        .collect();
    lag_ms.sort();
    assert_eq!(
        lag_ms.len(),
        rate * seconds,
        "every fill applied (produced in {produced:?})"
    );
    // Where the time goes: the consumer's own lag histogram (message
    // CreateTime to consumption), cumulative buckets.
    let text = common::kafka::metrics_text(server.metrics_port);
    let buckets: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("account_kafka_consumer_lag_seconds_bucket"))
        .collect();
    eprintln!(
        "consumer lag histogram (whole run, cumulative):\n{}",
        buckets.join("\n")
    );
    let pct = |p: f64| lag_ms[((lag_ms.len() as f64 * p) as usize).min(lag_ms.len() - 1)];
    eprintln!(
        "LAG at {rate} fills/s for {seconds} s ({} fills): p50 {} ms, p90 {} ms, p99 {} ms, p999 {} ms, max {} ms",
        lag_ms.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        lag_ms.last().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_engine_queue_pauses_the_consumer_without_dropping_or_reordering() {
    // Each pause and resume costs a refetch from the broker (about 55 ms with
    // tansu here): 1,000 fills pause some 175 times and drain in about 10 s,
    // a sixth of the budget below. (3,000 took 54 s of it on a busy machine.)
    const N: usize = 1_000;
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(&broker, dir.path()).await;
    open_accounts(&server, [1]).await;
    assert!(server.terminate().success());
    // A backlog, read by a service whose engine queue holds only 4 requests.
    let p = broker.producer();
    let mut expected = (Decimal::ZERO, Decimal::ZERO);
    for i in 0..N {
        let f = fill(
            &format!("bp-{i}"),
            1,
            "BUY",
            &format!("{}", 1 + i % 5),
            "2.5",
        );
        expected.0 += d(&f.quantity);
        expected.1 += d(&f.filled_amount);
        send(&p, FILLS, 1, &f).await;
    }
    let server = Server::start(
        dir.path(),
        &[
            "--kafka-brokers",
            &broker.bootstrap(),
            "--queue-capacity",
            "4",
            "--batch-size-max",
            "2",
        ],
    )
    .await;
    eventually(Duration::from_secs(60), "every fill", || async {
        account(&server, 1)
            .await
            .is_some_and(|a| position(&a, "ACME").0 == expected.0)
    })
    .await;
    let a = account(&server, 1).await.unwrap();
    assert_eq!(position(&a, "ACME"), expected);
    assert!(
        metric(server.metrics_port, "account_kafka_consumer_pauses_total") > 0.0,
        "it paused"
    );
    // Applied in partition order: journal order of the fills = produce order.
    let messages = broker.read_all(EVENTS, 2 * N + 1, Duration::from_secs(30));
    let mut fills: Vec<(u64, String)> = assert_duplicates_identical(&account_events(&messages))
        .into_values()
        .filter(|e| e.asset == "ACME")
        .map(|e| (e.sequence, e.cause_id))
        .collect();
    fills.sort();
    let order: Vec<String> = fills.into_iter().map(|(_, c)| c).collect();
    let produced: Vec<String> = (0..N).map(|i| format!("bp-{i}")).collect();
    assert_eq!(order, produced);
}

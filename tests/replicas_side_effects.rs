//! Replicas with their side effects (design 7), as real processes on
//! loopback with a real broker (tansu) and a real PostgreSQL 15: only the
//! leader consumes, publishes and writes snapshots. While fills flow, the
//! leader is killed (SIGKILL) again and again: each fill must be applied
//! exactly once (offsets are in the replicated state), every fill's account
//! events must be published, an event published twice (a new leader
//! republishes what its ledger holds) must be the same event, same id, and
//! PostgreSQL must end with the group's state, written in the last leader's
//! term, and every event in its history exactly once.

mod common;

use account_service::proto::events;
use common::group::{Group, PATIENCE};
use common::kafka::{
    account_events, assert_duplicates_identical, buy_fills, fill_legs, metric, metrics_text,
    produce, Broker, EVENTS, FILLS,
};
use common::postgres::Postgres;
use prost::Message as _;
use rust_decimal::Decimal;
use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

const ACCOUNTS: i64 = 10;
const FILLS_TOTAL: usize = 3_000;
/// Fills produced per burst, and the pause between bursts: the stream lasts
/// longer than the kills.
const BURST: usize = 50;
const BURST_EVERY: Duration = Duration::from_millis(100);
const KILLS: usize = 3;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_through_leader_kills_apply_exactly_once_and_every_side_effect_follows() {
    let broker = Broker::start();
    broker.create_service_topics(3).await;
    let bootstrap = broker.bootstrap();
    let pg = Postgres::start();
    let url = pg.url();
    // Raft snapshots every 50 entries: restarts start from a snapshot, and
    // the ledger travels in it. PostgreSQL snapshots every 50 ms.
    let mut group = Group::start(
        3,
        &[
            "--kafka-brokers",
            &bootstrap,
            "--raft-snapshot-entries",
            "50",
            "--postgres-url",
            &url,
            "--snapshot-interval-ms",
            "50",
        ],
    )
    .await;
    let mut client = group.client();
    for id in 1..=ACCOUNTS {
        client.open_account(id).await;
    }

    // BUY fills only: quantity and cost basis are exact sums, cash goes
    // negative by the cost.
    let (fills, expected) = buy_fills(FILLS_TOTAL, ACCOUNTS);
    let producer = broker.producer();
    let producing = tokio::spawn(async move {
        for burst in fills.chunks(BURST) {
            for f in burst {
                produce(
                    &producer,
                    FILLS,
                    &f.account_id.to_string(),
                    &f.encode_to_vec(),
                )
                .await;
            }
            tokio::time::sleep(BURST_EVERY).await;
        }
    });

    let mut failovers = Vec::new();
    for cycle in 1..=KILLS {
        let leader = group.leader().await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let killed_at = Instant::now();
        group.nodes[leader].kill9();
        let next = group.leader().await;
        let failover = killed_at.elapsed();
        eprintln!(
            "cycle {cycle}: node {} killed, node {} leads after {failover:?}",
            group.nodes[leader].id, group.nodes[next].id
        );
        failovers.push(failover);
        group.spawn(leader);
    }
    producing.await.unwrap();

    // Every fill applied, and exactly once (a second application would
    // overshoot the quantity, a lost one fall short).
    let deadline = Instant::now() + 2 * PATIENCE;
    loop {
        let mut done = 0;
        for (&id, (qty, _)) in &expected {
            if position(&client.account(id).await).0 == *qty {
                done += 1;
            }
        }
        if done == expected.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fills not all applied: {done} accounts of {ACCOUNTS}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (&id, (qty, cost)) in &expected {
        let a = client.account(id).await;
        assert_eq!(position(&a), (*qty, *cost), "account {id}");
        let available: Decimal = d(&a.cash[0].available);
        assert_eq!(available, -*cost, "account {id}");
    }
    let (sequence, _) = group.converged().await;

    // Every fill's two legs were published; duplicates only by event id.
    let messages = broker.read_all(EVENTS, 2 * FILLS_TOTAL, 2 * PATIENCE);
    let events = account_events(&messages);
    let by_id = assert_duplicates_identical(&events);
    let legs = fill_legs(&by_id);
    assert_eq!(legs.len(), FILLS_TOTAL, "a fill without account events");
    assert!(
        legs.values().all(|ids| ids.len() == 2),
        "a fill with a leg missing"
    );
    // Event ids are `<sequence>-<n>`: one sequence per fill, never reused.
    let sequences: HashSet<&str> = legs
        .values()
        .flat_map(|ids| ids.iter().map(|id| id.split('-').next().unwrap()))
        .collect();
    assert_eq!(sequences.len(), FILLS_TOTAL, "two fills share a sequence");
    // The broker's acknowledgements were journaled: every replica's ledger
    // drains (no replica keeps what was published).
    ledgers_drain(&group).await;
    // PostgreSQL: the last leader's full state, in its term, and the history
    // of every fill exactly once (its primary key refuses a second copy; the
    // count refuses a gap).
    pg.wait_snapshot(sequence, PATIENCE).await;
    let leader = group.leader().await;
    let term = group.status(leader).await.unwrap().term;
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let meta = db
        .query_one("SELECT sequence, term FROM snapshot_meta WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(meta.get::<_, i64>(0) as u64, sequence);
    assert_eq!(
        meta.get::<_, Option<i64>>(1),
        Some(term as i64),
        "written in the leader's term"
    );
    for (&id, (qty, cost)) in &expected {
        let row = db
            .query_one(
                "SELECT quantity::text, cost_basis::text FROM positions WHERE account_id = $1 AND symbol = 'ACME'",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(
            (d(row.get(0)), d(row.get(1))),
            (*qty, *cost),
            "read model of account {id}"
        );
    }
    let history = db
        .query_one(
            "SELECT count(*), count(DISTINCT event_id), count(DISTINCT cause_id)
               FROM account_events WHERE type = 'FILL_APPLIED'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            history.get::<_, i64>(0),
            history.get::<_, i64>(1),
            history.get::<_, i64>(2)
        ),
        (
            2 * FILLS_TOTAL as i64,
            2 * FILLS_TOTAL as i64,
            FILLS_TOTAL as i64
        ),
        "history: every fill's two legs, once"
    );
    failovers.sort();
    eprintln!(
        "events read: {}, distinct: {}, republished duplicates: {}; failover median {:?}, max {:?}",
        events.len(),
        by_id.len(),
        events.len() - by_id.len(),
        failovers[failovers.len() / 2],
        failovers.last().unwrap()
    );
}

/// Waits until every replica's ledger is empty: what was published and
/// written is acknowledged in the journal, and dropped everywhere.
async fn ledgers_drain(group: &Group) {
    let deadline = Instant::now() + PATIENCE;
    for node in &group.nodes {
        loop {
            // Scraped (a replica that does not answer is not an empty one).
            let scraped = metrics_text(node.metrics_port).contains("account_outbox_ledger_records");
            let held = metric(node.metrics_port, "account_outbox_ledger_records");
            if scraped && held == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: {held} ledger records never dropped",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn position(a: &account_service::proto::account::v1::Account) -> (Decimal, Decimal) {
    a.positions
        .iter()
        .find(|p| p.symbol == "ACME")
        .map_or((Decimal::ZERO, Decimal::ZERO), |p| {
            (d(&p.quantity), d(&p.cost_basis))
        })
}

/// A broker outage never blocks Reserve on a replica group either: the
/// events wait in every replica's ledger (a follower wiped meanwhile gets it
/// with the leader's snapshot). The leader that took them is killed during
/// the outage; its successor publishes them, with their original ids, once
/// the broker is back, and every ledger drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_broker_outage_are_published_by_the_next_leader() {
    use common::group::{Ack, Op};
    const RESERVES: usize = 200;
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let bootstrap = broker.bootstrap();
    // Raft snapshots every 50 entries: a wiped replica is sent one.
    let mut group = Group::start(
        3,
        &[
            "--kafka-brokers",
            &bootstrap,
            "--raft-snapshot-entries",
            "50",
        ],
    )
    .await;
    let mut client = group.client();
    client.open_and_fund("1000000").await;

    broker.pause();
    let mut acks: Vec<(String, Ack)> = Vec::new();
    for i in 0..RESERVES {
        let request = format!("outage-{i}");
        let op = Op::Reserve {
            request: request.clone(),
            order: format!("order-{i}"),
        };
        let (ack, _) = client.call(&op).await;
        assert_eq!(
            ack.result,
            account_service::proto::account::v1::Result::Ok as i32
        );
        acks.push((request, ack));
    }
    // A follower wiped meanwhile gets the ledger with the leader's snapshot.
    let leader = group.leader().await;
    let wiped = (leader + 1) % group.nodes.len();
    group.wipe_and_restart(wiped);
    group.converged().await;
    // Every replica holds the outage's events (none was acknowledged), the
    // same number.
    let held: Vec<f64> = group
        .nodes
        .iter()
        .map(|node| metric(node.metrics_port, "account_outbox_ledger_records"))
        .collect();
    assert!(
        held.iter().all(|&h| h >= RESERVES as f64 && h == held[0]),
        "ledgers after the outage (node {} wiped): {held:?}",
        group.nodes[wiped].id
    );
    let leader = group.leader().await;
    group.nodes[leader].kill9();
    group.leader().await;
    group.spawn(leader);
    broker.resume();

    ledgers_drain(&group).await;
    let messages = broker.read_all(EVENTS, RESERVES, PATIENCE);
    let by_id = assert_duplicates_identical(&account_events(&messages));
    for (request, ack) in &acks {
        let reserved = by_id.values().find(|e| {
            e.cause_id == *request && e.r#type == events::AccountEventType::Reserved as i32
        });
        let reserved = reserved.unwrap_or_else(|| panic!("no RESERVED event for {request}"));
        assert_eq!(
            reserved.event_id,
            format!("{}-0", ack.sequence),
            "the event id comes from the Reserve's sequence"
        );
    }
}

/// Memory stays bounded through a long broker outage: once the ledger holds
/// `--replica-ledger-records-max` events, the leader refuses writes with
/// RESOURCE_EXHAUSTED (reads go on); when the broker is back the ledger
/// drains and writes are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ledger_refuses_writes_until_the_broker_takes_its_events() {
    use common::group::Op;
    const LEDGER_MAX: usize = 50;
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let bootstrap = broker.bootstrap();
    let group = Group::start(
        3,
        &[
            "--kafka-brokers",
            &bootstrap,
            "--replica-ledger-records-max",
            &LEDGER_MAX.to_string(),
        ],
    )
    .await;
    let mut client = group.client();
    client.open_and_fund("1000000").await;

    broker.pause();
    let (mut acknowledged, mut exhausted) = (0, 0);
    for i in 0..3 * LEDGER_MAX {
        let op = Op::Reserve {
            request: format!("long-outage-{i}"),
            order: format!("order-{i}"),
        };
        match client.call_until_refused(&op).await {
            Ok(_) => acknowledged += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                exhausted += 1;
            }
        }
    }
    assert!(exhausted > 0, "writes went on past the ledger's bound");
    assert!(
        (LEDGER_MAX - 5..=LEDGER_MAX + 5).contains(&acknowledged),
        "{acknowledged} acknowledged before the ledger was full"
    );
    for node in &group.nodes {
        let held = metric(node.metrics_port, "account_outbox_ledger_records");
        assert!(
            held <= (LEDGER_MAX + 5) as f64,
            "node {} holds {held}",
            node.id
        );
    }
    // Reads go on.
    let (available, _) = client.account_1().await;
    assert!(available > Decimal::ZERO);

    broker.resume();
    let (ack, _) = client
        .call(&Op::Reserve {
            request: "after-the-outage".into(),
            order: "order-after".into(),
        })
        .await;
    assert_eq!(
        ack.result,
        account_service::proto::account::v1::Result::Ok as i32
    );
}

/// A group that ran without Kafka and is restarted with it re-applies its
/// whole log as before: the proposal order the ledger keeps from then on
/// never refuses a batch from before (the same state digest at the same
/// sequence), and the events of what comes next are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_turns_kafka_on_replays_its_log_unchanged() {
    use common::group::Op;
    let broker = Broker::start();
    broker.create_service_topics(1).await;
    let bootstrap = broker.bootstrap();
    // Raft snapshots every 50 entries: a restart re-applies the entries
    // after one, mid-way through a writer's proposals.
    let mut group = Group::start(3, &["--raft-snapshot-entries", "50"]).await;
    let mut client = group.client();
    client.open_and_fund("1000000").await;
    for i in 0..120 {
        let op = Op::Reserve {
            request: format!("before-{i}"),
            order: format!("order-{i}"),
        };
        client.call(&op).await;
    }
    let before = group.converged().await;

    group.restart_all_with(&[
        "--raft-snapshot-entries",
        "50",
        "--kafka-brokers",
        &bootstrap,
    ]);
    group.leader().await;
    // The last entries apply once the new leader commits in its term.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = group.converged().await;
        if now.0 >= before.0 {
            assert_eq!(now, before, "the log re-applied unchanged");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log re-applied up to {now:?} of {before:?}: a batch refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut client = group.client();
    let (ack, _) = client
        .call(&Op::Reserve {
            request: "after".into(),
            order: "order-after".into(),
        })
        .await;
    let messages = broker.read_all(EVENTS, 1, PATIENCE);
    let by_id = assert_duplicates_identical(&account_events(&messages));
    assert!(
        by_id.contains_key(&format!("{}-0", ack.sequence)),
        "the Reserve's event, published"
    );
}

//! Replay equivalence: run random commands through the live engine (WAL, group
//! commit, the real writer thread), restart it from the WAL, and compare the
//! state digest and every account.

mod common;

use account_service::domain::*;
use account_service::engine::{Engine, EngineConfig, Phase, Query, Reply, RequestKind, Want};
use account_service::metrics::Metrics;

fn config(dir: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.pin_core = false;
    c.wal.segment_size_bytes = 256 * 1024; // several roll-overs
    c
}

async fn serving(engine: &Engine) {
    let mut phase = engine.handle().phase();
    while *phase.borrow_and_update() != Phase::Serving {
        phase.changed().await.expect("engine alive");
    }
}

async fn query(engine: &Engine, q: Query) -> Reply {
    engine
        .handle()
        .call(RequestKind::Query(q))
        .await
        .expect("query")
}

async fn snapshot(engine: &Engine) -> (u64, u64, Vec<String>) {
    let Reply::Digest { sequence, digest } = query(engine, Query::Digest).await else {
        panic!("digest")
    };
    let mut accounts = Vec::new();
    for id in 1..=common::strategies::ACCOUNTS + 1 {
        if let Reply::Account(a) = query(engine, Query::Account(AccountId(id))).await {
            accounts.push(format!("{a:?}"));
        }
    }
    (sequence, digest, accounts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    // Funded accounts first so that most commands do something.
    let commands = common::strategies::sample(5_000, true);

    let engine = Engine::start(config(dir.path()), Metrics::new()).unwrap();
    serving(&engine).await;
    common::submit_in_waves(&engine, &commands, 500).await;
    let before = snapshot(&engine).await;
    assert!(before.0 >= commands.len() as u64, "every command journaled");
    engine.stop().unwrap();

    let engine = Engine::start(config(dir.path()), Metrics::new()).unwrap();
    serving(&engine).await;
    let after = snapshot(&engine).await;
    assert_eq!(before, after);
    engine.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_answers_the_original_outcome_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(dir.path()), Metrics::new()).unwrap();
    serving(&engine).await;
    let run = |engine: &Engine, c: Command| {
        let h = engine.handle();
        async move {
            match h
                .call(RequestKind::Command(c, Want::Reservation))
                .await
                .unwrap()
            {
                Reply::Command(r) => r.outcome,
                other => panic!("{other:?}"),
            }
        }
    };
    run(&engine, common::open("o", 1, common::usd())).await;
    run(&engine, common::deposit("d", 1, common::usd(), "100")).await;
    let first = run(&engine, common::reserve_cash("r", 1, "ord", "40")).await;
    engine.stop().unwrap();

    let engine = Engine::start(config(dir.path()), Metrics::new()).unwrap();
    serving(&engine).await;
    let again = run(&engine, common::reserve_cash("r", 1, "ord", "40")).await;
    assert!(again.replayed);
    assert_eq!(
        (again.sequence, again.available, again.reserved),
        (first.sequence, first.available, first.reserved)
    );
    engine.stop().unwrap();
}

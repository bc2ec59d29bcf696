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

fn with_window(dir: &std::path::Path, idempotency_window_ms: i64) -> EngineConfig {
    let mut c = config(dir);
    c.state.idempotency_window_ms = idempotency_window_ms;
    c
}

async fn outcome(engine: &Engine, c: Command) -> account_service::state_machine::Outcome {
    match engine
        .handle()
        .call(RequestKind::Command(c, Want::Nothing))
        .await
        .unwrap()
    {
        Reply::Command(r) => r.outcome,
        other => panic!("{other:?}"),
    }
}

/// The state a fresh start rebuilds from the journal alone (no flags at all).
fn replayed(dir: &std::path::Path) -> account_service::state_machine::State {
    let wal = wal::Wal::open(config(dir).wal).unwrap();
    let mut state = account_service::state_machine::State::default();
    account_service::engine::replay(&wal, &mut state).unwrap();
    state
}

/// [`replayed`], through sequence `through` only (the engine may have
/// journaled ticks after a digest was taken).
fn replayed_through(dir: &std::path::Path, through: u64) -> account_service::state_machine::State {
    use account_service::state_machine::{NoEvents, State};
    let wal = wal::Wal::open(config(dir).wal).unwrap();
    let mut state = State::default();
    wal.replay(1, |sequence, payload| {
        if sequence <= through {
            let (command, ts) = account_service::engine::codec::decode(payload).unwrap();
            state.apply(&command, sequence, ts, &mut NoEvents);
        }
        Ok::<(), wal::WalError>(())
    })
    .unwrap();
    state
}

/// Design 3: replay is a function of the journal alone. A restart with
/// another `--idempotency-window-secs` keeps history as it was decided and
/// applies the new window from the restart on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_another_window_never_re_decides_history() {
    use account_service::engine::now_ms;
    use account_service::state_machine::{NoEvents, ReservationState, ResultCode};
    let dir = tempfile::tempdir().unwrap();
    let (old_window, new_window) = (3_600_000, 50);
    let engine = Engine::start(with_window(dir.path(), old_window), Metrics::new()).unwrap();
    serving(&engine).await;
    outcome(&engine, common::open("o", 1, common::usd())).await;
    outcome(&engine, common::deposit("d", 1, common::usd(), "100")).await;
    let first = outcome(&engine, common::reserve_cash("r", 1, "ord", "40")).await;
    // An expiry makes the engine journal a tick later than the key's age
    // under the new window: replayed with the new window, it would prune "r".
    let expiring = common::reserve(
        "x",
        1,
        "ord-x",
        ReservationKind::Cash,
        common::usd(),
        "1",
        Some(now_ms() + 3 * new_window),
    );
    assert_eq!(outcome(&engine, expiring).await.result, ResultCode::Ok);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let q = Query::Reservation(AccountId(1), common::id("ord-x"));
        if let Reply::Reservation(Some(r)) = query(&engine, q).await {
            if r.state == ReservationState::Expired {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tick expires ord-x"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (sequence, digest, _) = snapshot(&engine).await;
    engine.stop().unwrap();

    // Rebuilt by the engine's own recovery from the journal alone (nothing
    // is due within the old window, so nothing was journaled after the
    // digest): the live state, and "r" is still a key.
    let mut state = replayed(dir.path());
    assert_eq!((state.last_sequence(), state.digest()), (sequence, digest));
    assert_eq!(state.config().idempotency_window_ms, old_window);
    let retry = state.apply(
        &common::reserve_cash("r", 1, "ord", "40"),
        sequence + 1,
        state.last_timestamp_ms(),
        &mut NoEvents,
    );
    assert!(retry.replayed);
    assert_eq!(retry.sequence, first.sequence);

    // Restarted with the new window: it applies from the restart on, so the
    // key leaves; the order stays reserved.
    let engine = Engine::start(with_window(dir.path(), new_window), Metrics::new()).unwrap();
    serving(&engine).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let fresh = loop {
        let o = outcome(&engine, common::reserve_cash("r", 1, "ord", "40")).await;
        if !o.replayed {
            break o;
        }
        assert_eq!(o.sequence, first.sequence, "a replay answers the original");
        assert!(
            std::time::Instant::now() < deadline,
            "the new window applies"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(fresh.result, ResultCode::OrderAlreadyReserved);
    let (sequence, digest, _) = snapshot(&engine).await;
    engine.stop().unwrap();
    let state = replayed_through(dir.path(), sequence);
    assert_eq!((state.last_sequence(), state.digest()), (sequence, digest));
    assert_eq!(state.config().idempotency_window_ms, new_window);

    // A third start with the same flags journals no settings: the first
    // start journaled the old window (not the default), the second the new.
    let engine = Engine::start(with_window(dir.path(), new_window), Metrics::new()).unwrap();
    serving(&engine).await;
    engine.stop().unwrap();
    let wal = wal::Wal::open(config(dir.path()).wal).unwrap();
    let mut windows = Vec::new();
    wal.replay(1, |_, payload| {
        if let Ok((Command::Configure(c), _)) = account_service::engine::codec::decode(payload) {
            windows.push(c.idempotency_window_ms);
        }
        Ok::<(), wal::WalError>(())
    })
    .unwrap();
    assert_eq!(windows, [old_window, new_window]);
}

#[tokio::test]
async fn an_engine_that_panics_reports_stopped_instead_of_hanging_its_callers() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    // Too small for the largest record: the WAL refuses to open (an assert).
    c.wal.segment_size_bytes = 64 * 1024;
    let engine = Engine::start(c, Metrics::new()).unwrap();
    let mut phase = engine.handle().phase();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while *phase.borrow_and_update() != Phase::Stopped {
            phase
                .changed()
                .await
                .expect("the phase cell outlives the thread");
        }
    })
    .await;
    assert!(stopped.is_ok(), "the phase became Stopped");
    assert!(engine.stop().is_err(), "stop reports the failure");
}

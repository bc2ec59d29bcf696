//! PostgreSQL snapshots against a real PostgreSQL 15 (started here): snapshot
//! contents equal the engine state; restart from snapshot + WAL tail equals a
//! full replay; kill -9 during snapshot writes; PostgreSQL down under traffic.

mod common;

use account_service::domain::*;
use account_service::engine::{Engine, EngineConfig, Phase, Query, Reply, RequestKind, Want};
use account_service::metrics::Metrics;
use account_service::proto::account::v1 as pb;
use account_service::snapshot::SnapshotConfig;
use account_service::state_machine::State;
use common::postgres::Postgres;
use common::server::{reserve_one_usd as reserve, Server};
use std::time::Duration;

fn config(dir: &std::path::Path, pg: Option<&Postgres>) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.pin_core = false;
    c.snapshot = pg.map(|pg| SnapshotConfig {
        interval_ms: 50,
        ..SnapshotConfig::new(pg.url())
    });
    c
}

async fn start(config: EngineConfig) -> (Engine, std::sync::Arc<Metrics>) {
    let metrics = Metrics::new();
    let engine = Engine::start(config, metrics.clone()).unwrap();
    let mut phase = engine.handle().phase();
    while *phase.borrow_and_update() != Phase::Serving {
        phase.changed().await.expect("engine serving");
    }
    (engine, metrics)
}

async fn digest(engine: &Engine) -> (u64, u64) {
    match engine
        .handle()
        .call(RequestKind::Query(Query::Digest))
        .await
        .unwrap()
    {
        Reply::Digest { sequence, digest } => (sequence, digest),
        other => panic!("{other:?}"),
    }
}

async fn run(engine: &Engine, commands: &[Command]) {
    common::submit_in_waves(engine, commands, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_equals_the_state_and_restart_from_it_equals_a_full_replay() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = start(config(dir.path(), Some(&pg))).await;
    let commands = common::strategies::sample(9_000, true);
    let (head, tail) = commands.split_at(8_000);
    run(&engine, head).await;
    let (at, live) = digest(&engine).await;
    pg.wait_snapshot(at, Duration::from_secs(30)).await;

    // The snapshot's rows rebuild exactly the state at its sequence.
    let rows = account_service::snapshot::load(&pg.url())
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(rows.sequence, at);
    let restored = State::restore(rows);
    account_service::state_machine::invariants::check(&restored).unwrap();
    assert_eq!(
        restored.digest(),
        live,
        "snapshot contents equal the engine state"
    );
    // Field for field, lists in the same order (the API returns them so).
    for id in 1..=common::strategies::ACCOUNTS {
        let id = AccountId(id);
        let reply = engine
            .handle()
            .call(RequestKind::Query(Query::Account(id)))
            .await
            .unwrap();
        let Reply::Account(live) = reply else {
            panic!("{reply:?}")
        };
        // The same balances and positions (read at the live state's sequence).
        assert_eq!(
            restored
                .account(id)
                .map(|a| account_service::engine::view::AccountView::of(
                    a,
                    live.as_ref().map_or(0, |l| l.sequence)
                )),
            live,
            "account {id:?}"
        );
    }

    // A WAL tail after the snapshot, then restarts both ways.
    run(&engine, tail).await;
    let (end, expected) = digest(&engine).await;
    engine.stop().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.path().join("wal"))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let _ = std::fs::remove_file(copy.path().join("wal/LOCK"));

    let (engine, metrics) = start(config(dir.path(), Some(&pg))).await;
    assert_eq!(
        digest(&engine).await,
        (end, expected),
        "snapshot + WAL tail"
    );
    let replayed = metrics.replay_records.get() as u64;
    assert!(
        replayed < end - at + 10,
        "only the tail was replayed ({replayed} records)"
    );
    // A request id recorded before the snapshot still answers replayed.
    let first_reserve = head
        .iter()
        .find(|c| matches!(c, Command::Reserve(_)))
        .copied()
        .unwrap();
    match engine
        .handle()
        .call(RequestKind::Command(first_reserve, Want::Nothing))
        .await
        .unwrap()
    {
        Reply::Command(r) => assert!(
            r.outcome.replayed
                || r.outcome.result
                    == account_service::state_machine::ResultCode::IdempotencyConflict
        ),
        other => panic!("{other:?}"),
    }
    engine.stop().unwrap();

    let (full, _) = start(config(copy.path(), None)).await;
    assert_eq!(digest(&full).await, (end, expected), "full replay");
    full.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_never_fails_a_reserve_and_snapshots_resume() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let server = Server::start(
        dir.path(),
        &["--postgres-url", &url, "--snapshot-interval-ms", "100"],
    )
    .await;
    common::server::open_and_fund_account_1(&server, "1000000").await;
    pg.wait_snapshot(2, Duration::from_secs(30)).await;
    pg.stop_server();
    let mut accounts = server.accounts().await;
    let mut last = 0;
    for i in 0..300 {
        let r = accounts
            .reserve(reserve(i))
            .await
            .expect("Reserve answers while PostgreSQL is down")
            .into_inner();
        assert_eq!(r.result, pb::Result::Ok as i32);
        last = r.sequence;
    }
    pg.start_server();
    let at = pg.wait_snapshot(last, Duration::from_secs(60)).await;
    assert!(at >= last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_snapshot_writes_restarts_correctly() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let args = [
        "--postgres-url",
        url.as_str(),
        "--snapshot-interval-ms",
        "10",
    ];
    let mut server = Server::start(dir.path(), &args).await;
    common::server::open_and_fund_account_1(&server, "1000000").await;
    let acknowledged = common::server::reserve_until_kill9(&mut server, 8, 1_500, reserve).await;
    assert!(
        pg.snapshot_sequence().await > 0,
        "snapshots were being written when the server was killed"
    );

    let server = Server::start(dir.path(), &args).await;
    let mut accounts = server.accounts().await;
    common::server::assert_reservations_survived(&mut accounts, acknowledged.iter().step_by(7))
        .await;
    let (i, sequence) = acknowledged[acknowledged.len() / 2];
    let retry = accounts.reserve(reserve(i)).await.unwrap().into_inner();
    assert!(retry.replayed && retry.sequence == sequence);
    let (available, reserved) = common::server::first_cash(&mut accounts, 1).await;
    assert_eq!(reserved + available, rust_decimal::Decimal::from(1_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_segments_covered_by_a_snapshot_are_deleted_and_then_restart_waits_for_postgres() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), Some(&pg));
    c.wal.segment_size_bytes = 256 * 1024;
    let segments = || common::server::wal_segments(dir.path());
    let (engine, _) = start(c.clone()).await;
    let commands = common::strategies::sample(16_000, true);
    run(&engine, &commands).await;
    let (at, expected) = digest(&engine).await;
    pg.wait_snapshot(at, Duration::from_secs(30)).await;
    // Retention runs on the writer's next turn after the snapshot is durable.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while segments() > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} segments left",
            segments()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine.stop().unwrap();
    // Restart needs only the snapshot and what is left of the WAL.
    let (engine, _) = start(c.clone()).await;
    assert_eq!(digest(&engine).await, (at, expected));
    engine.stop().unwrap();

    // With PostgreSQL down, the trimmed WAL alone cannot rebuild the state:
    // the engine must not serve until the snapshot can be loaded.
    pg.stop_server();
    let engine = Engine::start(c, Metrics::new()).unwrap();
    let mut phase = engine.handle().phase();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_ne!(
        *phase.borrow_and_update(),
        Phase::Serving,
        "served without its snapshot"
    );
    pg.start_server();
    tokio::time::timeout(Duration::from_secs(30), async {
        while *phase.borrow_and_update() != Phase::Serving {
            phase.changed().await.unwrap();
        }
    })
    .await
    .expect("serving once PostgreSQL is back");
    assert_eq!(digest(&engine).await, (at, expected));
    engine.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_at_start_with_the_whole_wal_replays_it_all() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), Some(&pg));
    let (engine, _) = start(c.clone()).await;
    run(&engine, &common::strategies::sample(500, true)).await;
    let (at, expected) = digest(&engine).await;
    pg.wait_snapshot(at, Duration::from_secs(30)).await;
    engine.stop().unwrap();

    pg.stop_server();
    let (engine, metrics) = start(c).await;
    assert_eq!(digest(&engine).await, (at, expected));
    assert_eq!(metrics.replay_records.get() as u64, at, "replayed from 1");
    // Commands go on; the snapshotter catches up once PostgreSQL is back.
    run(&engine, &common::strategies::sample(100, false)).await;
    let (now, _) = digest(&engine).await;
    pg.start_server();
    pg.wait_snapshot(now, Duration::from_secs(60)).await;
    engine.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_one_delta_waits_and_the_rest_catches_up() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (engine, metrics) = start(config(dir.path(), Some(&pg))).await;
    let commands = common::strategies::sample(1_500, true);
    let (head, tail) = commands.split_at(500);
    run(&engine, head).await;
    let (at, _) = digest(&engine).await;
    pg.wait_snapshot(at, Duration::from_secs(30)).await;

    pg.stop_server();
    let handed = metrics.snapshot_deltas_total.get();
    // Ten snapshot intervals and more of changes while the database is down.
    for wave in tail.chunks(100) {
        run(&engine, wave).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics.snapshot_deltas_total.get() <= handed + 1,
        "deltas piled up while PostgreSQL was down: {} handed over",
        metrics.snapshot_deltas_total.get() - handed
    );

    pg.start_server();
    let (end, live) = digest(&engine).await;
    pg.wait_snapshot(end, Duration::from_secs(60)).await;
    let rows = account_service::snapshot::load(&pg.url())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        State::restore(rows).digest(),
        live,
        "the snapshot after the outage holds every change"
    );
    engine.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_a_snapshot_waits_for_the_outbox_watermark() {
    use account_service::egress::OutboxSink;
    use std::sync::atomic::{AtomicU64, Ordering};
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (tx, batches) = crossbeam_channel::unbounded();
    let watermark = std::sync::Arc::new(AtomicU64::new(0));
    let mut c = config(dir.path(), Some(&pg));
    let window = account_service::egress::Window::new(1 << 30);
    c.outbox = Some(OutboxSink::new(tx, watermark.clone(), window));
    let (engine, _) = start(c).await;
    run(&engine, &common::strategies::sample(300, true)).await;
    // Let the expiry ticks the commands call for happen first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (at, _) = digest(&engine).await;

    // Nothing published yet: a snapshot past the watermark would leave events
    // that a restart could no longer derive.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        pg.snapshot_sequence().await,
        0,
        "committed ahead of the outbox"
    );

    // The publisher catches up: the snapshot follows.
    while batches.try_recv().is_ok() {}
    watermark.store(at, Ordering::Release);
    assert_eq!(pg.wait_snapshot(at, Duration::from_secs(30)).await, at);
    assert_eq!(pg.outbox_watermark().await, Some(at));
    engine.stop().unwrap();
}

/// Starts an engine that must refuse to start; returns its error.
async fn start_refused(config: EngineConfig) -> String {
    let engine = Engine::start(config, Metrics::new()).unwrap();
    let mut phase = engine.handle().phase();
    while *phase.borrow_and_update() != Phase::Stopped {
        assert!(
            *phase.borrow() != Phase::Serving,
            "the engine must refuse to start"
        );
        phase.changed().await.ok();
    }
    engine.stop().expect_err("refused").to_string()
}

/// Log identity: a lost disk (an empty data directory in front of a snapshot)
/// is refused until the operator accepts the loss with
/// `--restore-from-snapshot`, after which the new log is the snapshot's; a WAL
/// of another deployment is refused, and its tables are never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_that_does_not_continue_the_snapshot_is_refused() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = start(config(dir.path(), Some(&pg))).await;
    run(&engine, &common::strategies::sample(500, true)).await;
    let (at, _) = digest(&engine).await;
    pg.wait_snapshot(at, Duration::from_secs(30)).await;
    engine.stop().unwrap();
    let snapshot = account_service::snapshot::load(&pg.url())
        .await
        .unwrap()
        .expect("a snapshot");
    let snapshot_sequence = snapshot.sequence;
    let snapshot_digest = State::restore(snapshot).digest();

    // A lost disk.
    let empty = tempfile::tempdir().unwrap();
    let refused = start_refused(config(empty.path(), Some(&pg))).await;
    assert!(
        refused.contains("is empty but PostgreSQL holds a snapshot")
            && refused.contains("--restore-from-snapshot"),
        "{refused}"
    );

    // Another deployment's WAL in front of this database.
    let other = tempfile::tempdir().unwrap();
    let (engine, _) = start(config(other.path(), None)).await;
    run(&engine, &common::strategies::sample(50, true)).await;
    engine.stop().unwrap();
    let refused = start_refused(config(other.path(), Some(&pg))).await;
    assert!(refused.contains("different deployments"), "{refused}");

    // The operator accepts the loss: the snapshot alone, a new log.
    let mut restore = config(empty.path(), Some(&pg));
    restore.snapshot.as_mut().unwrap().restore_from_snapshot = true;
    let (engine, _) = start(restore).await;
    assert_eq!(digest(&engine).await, (snapshot_sequence, snapshot_digest));
    run(&engine, &common::strategies::sample(50, true)).await;
    let after = digest(&engine).await;
    engine.stop().unwrap();
    // That log is the snapshot's now: a plain restart opens it...
    let (engine, _) = start(config(empty.path(), Some(&pg))).await;
    assert_eq!(digest(&engine).await, after);
    engine.stop().unwrap();
    // ...and the original data directory is another deployment's.
    let refused = start_refused(config(dir.path(), Some(&pg))).await;
    assert!(refused.contains("different deployments"), "{refused}");
}

/// Fails every segment removal while `failing` is set.
struct FailingRemovals {
    failing: std::sync::atomic::AtomicBool,
    failed: std::sync::atomic::AtomicUsize,
}

impl wal::IoHooks for FailingRemovals {
    fn before(&self, step: &wal::IoStep<'_>) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        match step {
            wal::IoStep::Remove { .. } if self.failing.load(Ordering::Acquire) => {
                self.failed.fetch_add(1, Ordering::AcqRel);
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            _ => Ok(()),
        }
    }
}

/// A failed delete of a segment a snapshot covers is a warning, never a
/// stop: the engine keeps serving, keeps the segment, and deletes it on a
/// later try once the file system lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_segment_delete_never_stops_the_engine_and_is_retried() {
    use std::sync::atomic::Ordering;
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let hooks = std::sync::Arc::new(FailingRemovals {
        failing: true.into(),
        failed: 0.into(),
    });
    let mut c = config(dir.path(), Some(&pg));
    c.wal.segment_size_bytes = 256 * 1024;
    c.wal.io_hooks = Some(hooks.clone());
    let segments = || common::server::wal_segments(dir.path());
    let (engine, _) = start(c).await;
    run(&engine, &common::strategies::sample(16_000, true)).await;
    let (at, _) = digest(&engine).await;
    pg.wait_snapshot(at, Duration::from_secs(30)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while hooks.failed.load(Ordering::Acquire) == 0 {
        assert!(std::time::Instant::now() < deadline, "no delete was tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = segments();
    assert!(
        kept > 2,
        "the segments stay while their delete fails ({kept})"
    );
    // Still serving, and still journaling.
    run(&engine, &common::strategies::sample(100, true)).await;
    assert!(digest(&engine).await.0 > at);

    hooks.failing.store(false, Ordering::Release);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while segments() > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} segments left after the file system recovered",
            segments()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.stop().unwrap();
}

/// A hung PostgreSQL (every process stopped, connections open): Reserve never
/// waits on it, the snapshot write is abandoned after `--snapshot-timeout-secs`
/// and retried, `snapshot_age_seconds` keeps rising meanwhile, and snapshots
/// resume once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_postgres_times_out_snapshots_and_never_blocks_reserve() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let server = Server::start(
        dir.path(),
        &[
            "--postgres-url",
            &url,
            "--snapshot-interval-ms",
            "100",
            "--snapshot-timeout-secs",
            "1",
        ],
    )
    .await;
    common::server::open_and_fund_account_1(&server, "1000000").await;
    pg.wait_snapshot(2, Duration::from_secs(30)).await;
    let metric = |name| common::kafka::metric(server.metrics_port, name);
    let failures_before = metric("account_snapshot_failures_total");

    pg.freeze();
    let mut accounts = server.accounts().await;
    let mut last = 0;
    for i in 0..200 {
        let r = tokio::time::timeout(Duration::from_secs(5), accounts.reserve(reserve(i)))
            .await
            .expect("Reserve never waits on a hung PostgreSQL")
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::Result::Ok as i32);
        last = r.sequence;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric("account_snapshot_failures_total") <= failures_before
        || metric("account_snapshot_age_seconds") < 2.5
    {
        assert!(
            std::time::Instant::now() < deadline,
            "timed-out writes are failures ({}) and the age rises ({} s)",
            metric("account_snapshot_failures_total"),
            metric("account_snapshot_age_seconds")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let age = metric("account_snapshot_age_seconds");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        metric("account_snapshot_age_seconds") > age + 1.0,
        "still rising"
    );

    pg.thaw();
    let at = pg.wait_snapshot(last, Duration::from_secs(60)).await;
    assert!(at >= last);
}

/// The read model's history (`account_events`) across a kill -9 during
/// snapshot writes and a restart: every acknowledged Reserve has exactly one
/// RESERVED row with its sequence and request id; each record's events are
/// numbered 0.. without a hole; nothing lies beyond `snapshot_meta.sequence`;
/// the movements add up to the snapshot's balances, and the newest row's
/// after-balances are the snapshot's. `account-service history` reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_events_hold_every_movement_once_across_kill9_and_match_the_snapshot() {
    use rust_decimal::Decimal;
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let args = [
        "--postgres-url",
        url.as_str(),
        "--snapshot-interval-ms",
        "10",
    ];
    let mut server = Server::start(dir.path(), &args).await;
    common::server::open_and_fund_account_1(&server, "1000000").await;
    let acknowledged = common::server::reserve_until_kill9(&mut server, 8, 1_500, reserve).await;
    assert!(
        pg.snapshot_sequence().await > 0,
        "snapshots were being written when the server was killed"
    );

    // After the restart: release a tenth of them, so two kinds of movement.
    let mut server = Server::start(dir.path(), &args).await;
    let mut accounts = server.accounts().await;
    let mut last = 0;
    for &(i, _) in acknowledged.iter().step_by(10) {
        let r = accounts
            .unreserve(pb::UnreserveRequest {
                request_id: format!("unr-{i}"),
                account_id: 1,
                order_id: format!("ord-{i}"),
                amount: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::Result::Ok as i32);
        last = r.sequence;
    }
    pg.wait_snapshot(last, Duration::from_secs(60)).await;
    assert!(server.terminate().success());

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let at: i64 = client
        .query_one("SELECT sequence FROM snapshot_meta", &[])
        .await
        .unwrap()
        .get(0);
    let beyond: i64 = client
        .query_one(
            "SELECT count(*) FROM account_events WHERE sequence > $1",
            &[&at],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(beyond, 0, "no event beyond the snapshot's sequence");
    let holes: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT sequence FROM account_events GROUP BY sequence
               HAVING max(event_index) + 1 <> count(*) OR min(event_index) <> 0) h",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        holes, 0,
        "each record's events are numbered 0.. without a hole"
    );

    let reserved: std::collections::HashMap<i64, (String, i64)> = client
        .query(
            "SELECT sequence, cause_id, count(*) OVER (PARTITION BY cause_id)
               FROM account_events WHERE type = 'RESERVED'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (r.get::<_, String>(1), r.get::<_, i64>(2)),
            )
        })
        .collect();
    for &(i, sequence) in &acknowledged {
        let (cause, copies) = reserved
            .get(&(sequence as i64))
            .unwrap_or_else(|| panic!("acknowledged req-{i} at {sequence} has no RESERVED row"));
        assert_eq!(cause, &format!("req-{i}"));
        assert_eq!(*copies, 1, "req-{i} once");
    }

    // The movements add up to the snapshot's balances (nothing missing,
    // nothing twice), and the newest row is the snapshot's state.
    let sums = client
        .query_one(
            "SELECT coalesce(sum(amount) FILTER (WHERE type = 'DEPOSITED'), 0),
                    coalesce(sum(amount) FILTER (WHERE type = 'RESERVED'), 0),
                    coalesce(sum(amount) FILTER (WHERE type = 'UNRESERVED'), 0)
               FROM account_events WHERE account_id = 1 AND asset = 'USD'",
            &[],
        )
        .await
        .unwrap();
    let (deposited, reserves, releases): (Decimal, Decimal, Decimal) =
        (sums.get(0), sums.get(1), sums.get(2));
    let balance = client
        .query_one(
            "SELECT available, reserved FROM cash_balances WHERE account_id = 1 AND currency = 'USD'",
            &[],
        )
        .await
        .unwrap();
    let (available, held): (Decimal, Decimal) = (balance.get(0), balance.get(1));
    assert_eq!(deposited, Decimal::from(1_000_000));
    assert_eq!(held, reserves - releases, "reserved = reserves - releases");
    assert_eq!(available, deposited - held);
    let newest = client
        .query_one(
            "SELECT available_after, reserved_after FROM account_events
              WHERE account_id = 1 AND asset = 'USD' ORDER BY sequence DESC, event_index DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (newest.get::<_, Decimal>(0), newest.get::<_, Decimal>(1)),
        (available, held)
    );

    let history = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_account-service"))
            .args(["history", "--postgres-url", &url, "--account-id", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first: Vec<serde_json::Value> = history(&["--format", "json", "--limit", "3"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(first.len(), 3);
    assert_eq!(first[0]["type"], "ACCOUNT_OPENED");
    assert_eq!(first[1]["type"], "DEPOSITED");
    assert_eq!(first[1]["available_after"], "1000000");
    assert_eq!(first[2]["type"], "RESERVED");
    let table = history(&["--since", "2026-01-01", "--asset", "USD", "--limit", "5"]);
    assert_eq!(table.lines().count(), 6, "a header and five rows:\n{table}");
    assert!(table.contains("DEPOSITED"), "{table}");
    let later = history(&["--since", "2999-01-01"]);
    assert_eq!(later.lines().count(), 1, "only the header:\n{later}");
}

/// An outbox spill with snapshots on: the re-deriver builds its state from the
/// newest snapshot (the WAL before it is retired, so nothing else would do),
/// and publishes exactly what a restart derives above the watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_spill_rederives_from_the_snapshot_when_the_wal_before_it_is_gone() {
    use account_service::egress::{Handed, Intake, OutboxRecord, OutboxSink, Window};
    use std::sync::atomic::{AtomicU64, Ordering};
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let watermark = std::sync::Arc::new(AtomicU64::new(0));
    let engine_config = |window: usize| {
        let mut c = config(dir.path(), Some(&pg));
        c.wal.segment_size_bytes = 256 * 1024;
        let (tx, rx) = crossbeam_channel::unbounded::<Handed>();
        let window = Window::new(window);
        c.outbox = Some(OutboxSink::new(tx, watermark.clone(), window.clone()));
        (c, Intake::new(rx, window))
    };
    let take_all = |intake: &mut Intake| {
        let mut records: Vec<OutboxRecord> = Vec::new();
        while let Ok(Some(batch)) = intake.next(Duration::from_millis(500), 0) {
            records.extend(batch.records);
        }
        records
    };
    let commands = common::strategies::sample(9_000, true);
    let (head, tail) = commands.split_at(8_000);

    // Published and snapshotted: the WAL before the snapshot is retired.
    let (c, mut intake) = engine_config(1 << 30);
    let (engine, _) = start(c).await;
    run(&engine, head).await;
    take_all(&mut intake);
    let (at, _) = digest(&engine).await;
    watermark.store(at, Ordering::Release);
    assert_eq!(pg.wait_snapshot(at, Duration::from_secs(30)).await, at);
    let first_segment = || {
        std::fs::read_dir(dir.path().join("wal"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.ends_with(".wal"))
            .min()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while first_segment().starts_with("00000000000000000001") {
        assert!(
            std::time::Instant::now() < deadline,
            "the first segment is retired: {:?}",
            common::server::wal_segments(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.stop().unwrap();

    // Broker down with a small window: the writer spills.
    let (c, mut intake) = engine_config(40);
    let (engine, _) = start(c).await;
    run(&engine, tail).await;
    assert_eq!(intake.window().spills(), 1);
    let published = take_all(&mut intake);
    engine.stop().unwrap();
    drop(intake);

    // What a restart derives above the same watermark.
    let (c, mut intake) = engine_config(1 << 30);
    let (engine, _) = start(c).await;
    let expected = take_all(&mut intake);
    engine.stop().unwrap();
    assert!(expected.len() > 200, "{} records", expected.len());
    assert!(expected.iter().all(|r| r.sequence > at));
    assert_eq!(published, expected);
}

/// A replica group's snapshots carry their leader's raft term; one of an
/// older term than the table's (a deposed leader still writing), or of the
/// same term at an earlier sequence, is refused and leaves the newer
/// snapshot as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_an_older_term_never_overwrites_a_newer_ones() {
    use account_service::snapshot::{DerivedEvents, HistorySource, Snapshotter};
    struct NoHistory;
    impl DerivedEvents for NoHistory {
        fn read(
            &self,
            _: u64,
            _: u64,
            _: &mut Vec<account_service::egress::OutboxRecord>,
        ) -> Result<(), String> {
            Ok(())
        }
    }
    let pg = Postgres::start();
    let snapshot_at = |term: u64, commands: &[Command]| {
        let mut state = State::default();
        state.track_changes(true);
        for (i, c) in commands.iter().enumerate() {
            state.apply(
                c,
                i as u64 + 1,
                1_000,
                &mut account_service::state_machine::NoEvents,
            );
        }
        let config = SnapshotConfig {
            term: Some(term),
            log_id: "replica-group".into(),
            history: false,
            ..SnapshotConfig::new(pg.url())
        };
        let snapshotter = Snapshotter::start(
            config,
            Metrics::new(),
            None,
            0,
            HistorySource::Derived(Box::new(NoHistory)),
        );
        snapshotter.offer(state.take_delta());
        snapshotter
    };
    let open = |id: i64| common::open(&format!("open-{id}"), id, common::usd());
    // The new leader (term 5) writes at sequence 3.
    let newer = snapshot_at(5, &[open(1), open(2), open(3)]);
    pg.wait_snapshot(3, Duration::from_secs(30)).await;
    // The deposed one (term 4) tries to write its view at sequence 4.
    let older = snapshot_at(4, &[open(1), open(2), open(3), open(4)]);
    // So is one of the same term at an earlier sequence (the leader's old
    // snapshotter, still writing after a new one started).
    let earlier = snapshot_at(5, &[open(1), open(2)]);
    // Each tries, is refused, retries with back-off: never durable.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        earlier.durable_sequence(),
        0,
        "the earlier sequence was refused"
    );
    assert_eq!(
        older.durable_sequence(),
        0,
        "the older term's snapshot was refused"
    );
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT sequence, term, (SELECT count(*) FROM accounts) FROM snapshot_meta WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, Option<i64>>(1),
            row.get::<_, i64>(2)
        ),
        (3, Some(5), 3)
    );
    drop(newer);
}

//! The engine's outbox hand-off, without a broker: account events and dead
//! letters are derived from the journal, handed over only after the sync,
//! with deterministic ids, and re-derived identically after a restart for
//! every command above the durable watermark.

mod common;

use account_service::domain::*;
use account_service::egress::{
    DlqReason, Handed, Intake, OutboxItem, OutboxRecord, OutboxSink, Window,
};
use account_service::engine::{Engine, EngineConfig, EngineHandle, Phase, RequestKind, Want};
use account_service::metrics::Metrics;
use account_service::state_machine::{EventKind, ResultCode};
use common::*;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

fn start(dir: &std::path::Path, watermark: u64) -> (Engine, Intake) {
    start_with_window(dir, watermark, 1 << 30)
}

fn start_with_window(dir: &std::path::Path, watermark: u64, window: usize) -> (Engine, Intake) {
    let (tx, rx) = crossbeam_channel::unbounded::<Handed>();
    let window = Window::new(window);
    let mut config = EngineConfig::new(dir);
    config.pin_core = false;
    config.outbox = Some(OutboxSink::new(
        tx,
        Arc::new(AtomicU64::new(watermark)),
        window.clone(),
    ));
    (
        Engine::start(config, Metrics::new()).unwrap(),
        Intake::new(rx, window),
    )
}

async fn serving(handle: &EngineHandle) {
    let mut phase = handle.phase();
    while *phase.borrow_and_update() != Phase::Serving {
        phase.changed().await.unwrap();
    }
}

fn kafka(topic: Topic, offset: i64) -> Option<Source> {
    Some(Source {
        topic,
        partition: 0,
        offset,
    })
}

/// Everything handed over until the feed is quiet, taken as a publisher that
/// is acknowledged at once would take it.
fn drain(intake: &mut Intake) -> (u64, Vec<OutboxRecord>) {
    let mut through = 0;
    let mut records = Vec::new();
    drain_into(intake, &mut through, &mut records);
    (through, records)
}

fn drain_into(intake: &mut Intake, through: &mut u64, records: &mut Vec<OutboxRecord>) {
    while let Ok(Some(batch)) = intake.next(Duration::from_millis(300), 0) {
        assert!(batch.through_sequence >= *through, "batches in order");
        assert!(batch
            .records
            .iter()
            .all(|r| r.sequence > *through && r.sequence <= batch.through_sequence));
        *through = batch.through_sequence;
        records.extend(batch.records);
    }
}

#[tokio::test]
async fn events_and_dead_letters_are_handed_over_after_sync_and_rederived_above_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, mut rx) = start(dir.path(), 0);
    let handle = engine.handle();
    serving(&handle).await;
    let mut unknown = match fill("f-unknown", 99, "o", "ACME", Side::Buy, "1", "2") {
        Command::Fill(f) => f,
        _ => unreachable!(),
    };
    unknown.source = kafka(Topic::Fills, 0);
    let mut kafka_fill = match fill("f-1", 1, "o", "ACME", Side::Buy, "2", "3") {
        Command::Fill(f) => f,
        _ => unreachable!(),
    };
    kafka_fill.source = kafka(Topic::Fills, 2);
    let commands = [
        open("open-1", 1, usd()),          // 1: AccountOpened
        deposit("dep-1", 1, usd(), "100"), // 2: Deposited
        Command::Fill(unknown),            // 3: dead letter ACCOUNT_NOT_FOUND
        Command::DeadLetter(DeadLetter {
            // 4: dead letter INVALID_FIELD
            source: kafka(Topic::Fills, 1).unwrap(),
            reason: DeadLetterReason::InvalidField,
        }),
        Command::Fill(kafka_fill),          // 5: two FillApplied legs
        Command::Fill(kafka_fill),          // 6: redelivery: nothing
        withdraw("wd-1", 1, usd(), "1000"), // 7: WithdrawalRejected (an event, no DLQ)
    ];
    for c in commands {
        handle
            .call(RequestKind::Command(c, Want::Nothing))
            .await
            .unwrap();
    }
    let (through, first_run) = drain(&mut rx);
    assert_eq!(through, 7);
    let summary: Vec<_> = first_run
        .iter()
        .map(|r| match r.item {
            OutboxItem::Event { index, event } => (r.sequence, format!("{:?}#{index}", event.kind)),
            OutboxItem::DeadLetter { source, reason } => (
                r.sequence,
                format!("DLQ {}@{}", reason.name(), source.offset),
            ),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "AccountOpened#0".to_string()),
            (2, "Deposited#0".into()),
            (3, "DLQ ACCOUNT_NOT_FOUND@0".into()),
            (4, "DLQ INVALID_FIELD@1".into()),
            (5, "FillApplied#0".into()),
            (5, "FillApplied#1".into()),
            (7, "WithdrawalRejected#0".into()),
        ]
    );
    assert_eq!(first_run[4].cause_id.as_str(), "f-1");
    assert!(matches!(
        first_run[2].item,
        OutboxItem::DeadLetter {
            reason: DlqReason::Rejected(ResultCode::AccountNotFound),
            ..
        }
    ));
    assert!(
        matches!(first_run[6].item, OutboxItem::Event { event, .. } if event.kind == EventKind::WithdrawalRejected)
    );
    engine.stop().unwrap();
    drop(rx);

    // Restart with the broker having acknowledged through sequence 3: replay
    // re-derives exactly what came after, with the same ids and content.
    let (engine, mut rx) = start(dir.path(), 3);
    serving(&engine.handle()).await;
    let (through, replayed) = drain(&mut rx);
    assert_eq!(through, 7);
    let expected: Vec<_> = first_run
        .iter()
        .filter(|r| r.sequence > 3)
        .copied()
        .collect();
    assert_eq!(replayed, expected);
    engine.stop().unwrap();

    // Everything acknowledged: nothing to publish again.
    let (engine, mut rx) = start(dir.path(), 7);
    serving(&engine.handle()).await;
    let (_, none) = drain(&mut rx);
    assert!(none.is_empty());
    engine.stop().unwrap();
}

#[test]
fn a_dead_letter_only_consumes_its_offset() {
    let mut h = Harness::new();
    h.open(1);
    let digest_before = h.state.digest();
    let dead = Command::DeadLetter(DeadLetter {
        source: kafka(Topic::Fills, 5).unwrap(),
        reason: DeadLetterReason::NotProtobuf,
    });
    let outcome = h.run(dead);
    assert_eq!((outcome.result, outcome.replayed), (ResultCode::Ok, false));
    assert!(h.events.is_empty(), "a dead letter produces no event");
    assert_eq!(h.state.offset(Topic::Fills, 0), Some(5));
    assert_ne!(
        h.state.digest(),
        digest_before,
        "the offset is part of the state"
    );
    // Whatever comes again at that offset is a redelivery.
    let mut again = match fill("f-5", 1, "o", "ACME", Side::Buy, "1", "1") {
        Command::Fill(f) => f,
        _ => unreachable!(),
    };
    again.source = kafka(Topic::Fills, 5);
    assert!(h.run(Command::Fill(again)).replayed);
    assert!(h.state.account(AccountId(1)).unwrap().positions.is_empty());
}

/// A full window (the broker takes nothing): the writer stops collecting and
/// the rest is re-derived from the WAL by the spill once there is room. What
/// the publisher gets is exactly what a full replay derives: nothing lost,
/// doubled or reordered at either seam, and at most about the window in
/// memory meanwhile. A restart during the outage spills the same way while it
/// replays, instead of loading the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_spills_and_what_is_rederived_equals_what_replay_derives() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const WINDOW: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let commands = common::strategies::sample(1_500, true);
    let (down, up) = commands.split_at(commands.len() / 2);
    let (engine, intake) = start_with_window(dir.path(), 0, WINDOW);
    let handle = engine.handle();
    serving(&handle).await;
    let window = intake.window().clone();

    // Broker down: nothing is taken.
    let mut held_max = 0;
    for c in down {
        handle
            .call(RequestKind::Command(*c, Want::Nothing))
            .await
            .unwrap();
        held_max = held_max.max(window.held());
    }
    assert_eq!(window.spills(), 1, "the writer spilled once");
    assert!(
        held_max <= 2 * WINDOW,
        "held {held_max} records with a window of {WINDOW}"
    );

    // Broker back while commands go on: the spill's records come first, then
    // the writer collects live again.
    let done = Arc::new(AtomicBool::new(false));
    let taker = std::thread::spawn({
        let done = done.clone();
        let mut intake = intake;
        move || {
            let (mut through, mut records) = (0, Vec::new());
            while !done.load(Ordering::Acquire) {
                drain_into(&mut intake, &mut through, &mut records);
            }
            drain_into(&mut intake, &mut through, &mut records);
            (intake, through, records)
        }
    });
    for c in up {
        handle
            .call(RequestKind::Command(*c, Want::Nothing))
            .await
            .unwrap();
    }
    // Quiet: the re-deriver catches up, and the writer's next hand-off
    // collects live again from the command after it.
    for key in ["quiet-1", "quiet-2"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        handle
            .call(RequestKind::Command(
                deposit(key, 1, usd(), "1"),
                Want::Nothing,
            ))
            .await
            .unwrap();
    }
    let last = match handle
        .call(RequestKind::Query(account_service::engine::Query::Digest))
        .await
        .unwrap()
    {
        account_service::engine::Reply::Digest { sequence, .. } => sequence,
        other => panic!("{other:?}"),
    };
    done.store(true, Ordering::Release);
    let (intake, through, published) = taker.join().unwrap();
    assert!(
        through >= last,
        "published through {through}, journaled {last}"
    );
    assert!(
        !intake.spilling(),
        "the re-deriver caught up and the writer collects live again"
    );
    engine.stop().unwrap();
    drop(intake);

    // What a restart with nothing acknowledged derives from the whole WAL.
    let (engine, mut all) = start(dir.path(), 0);
    serving(&engine.handle()).await;
    let (_, expected) = drain(&mut all);
    engine.stop().unwrap();
    assert!(expected.len() > 10 * WINDOW, "{} records", expected.len());
    assert_eq!(published.len(), expected.len());
    assert_eq!(published, expected);

    // A restart during the outage: replay spills too.
    let (engine, mut intake) = start_with_window(dir.path(), 0, WINDOW);
    serving(&engine.handle()).await;
    let held = intake.window().held();
    assert!(held <= 2 * WINDOW, "replay held {held} records");
    assert_eq!(intake.window().spills(), 1);
    let (_, replayed) = drain(&mut intake);
    assert_eq!(replayed, expected);
    engine.stop().unwrap();
}

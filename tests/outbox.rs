//! The engine's outbox hand-off, without a broker: account events and dead
//! letters are derived from the journal, handed over only after the sync,
//! with deterministic ids, and re-derived identically after a restart for
//! every command above the durable watermark.

mod common;

use account_service::domain::*;
use account_service::egress::{DlqReason, OutboxBatch, OutboxItem, OutboxRecord, OutboxSink};
use account_service::engine::{Engine, EngineConfig, EngineHandle, Phase, RequestKind, Want};
use account_service::metrics::Metrics;
use account_service::state_machine::{EventKind, ResultCode};
use common::*;
use crossbeam_channel::Receiver;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

fn start(dir: &std::path::Path, watermark: u64) -> (Engine, Receiver<OutboxBatch>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut config = EngineConfig::new(dir);
    config.pin_core = false;
    config.outbox = Some(OutboxSink::new(tx, Arc::new(AtomicU64::new(watermark))));
    (Engine::start(config, Metrics::new()).unwrap(), rx)
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

/// Everything handed over until the channel is quiet.
fn drain(rx: &Receiver<OutboxBatch>) -> (u64, Vec<OutboxRecord>) {
    let mut through = 0;
    let mut records = Vec::new();
    while let Ok(batch) = rx.recv_timeout(Duration::from_millis(300)) {
        assert!(batch.through_sequence >= through, "batches in order");
        through = batch.through_sequence;
        assert!(batch.records.iter().all(|r| r.sequence <= through));
        records.extend(batch.records);
    }
    (through, records)
}

#[tokio::test]
async fn events_and_dead_letters_are_handed_over_after_sync_and_rederived_above_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, rx) = start(dir.path(), 0);
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
    let (through, first_run) = drain(&rx);
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
    let (engine, rx) = start(dir.path(), 3);
    serving(&engine.handle()).await;
    let (through, replayed) = drain(&rx);
    assert_eq!(through, 7);
    let expected: Vec<_> = first_run
        .iter()
        .filter(|r| r.sequence > 3)
        .copied()
        .collect();
    assert_eq!(replayed, expected);
    engine.stop().unwrap();

    // Everything acknowledged: nothing to publish again.
    let (engine, rx) = start(dir.path(), 7);
    serving(&engine.handle()).await;
    let (_, none) = drain(&rx);
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

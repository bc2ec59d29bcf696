//! The fuzz targets on stable, in the suite: every input of their committed
//! corpora (`fuzz/corpus/<target>/`, kept small with `cargo fuzz cmin`) and
//! of their findings (`fuzz/regressions/<target>/`), then a deterministic
//! mutation pass over valid inputs built here (every truncation, and each
//! byte flipped and bumped). The long, coverage-guided runs are
//! `cargo +nightly fuzz run <target>` (README, "Fuzzing").

mod common;

use account_service::engine::codec;
use account_service::fuzzing;
use account_service::proto::{account::v1 as pb, events};
use prost::Message;
use std::path::{Path, PathBuf};

type Check = fn(&[u8]);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs `check` on every committed input of `target`; returns how many.
fn replay(target: &str, check: Check) -> usize {
    let mut n = 0;
    for place in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(place).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(result.is_ok(), "{target}: {} fails", path.display());
            n += 1;
        }
    }
    n
}

/// Every truncation of each seed, and each byte of it flipped and bumped.
fn mutate(seeds: &[Vec<u8>], check: Check) -> usize {
    let mut n = 0;
    for seed in seeds {
        check(seed);
        for len in 0..seed.len() {
            check(&seed[..len]);
        }
        let mut data = seed.clone();
        for i in 0..data.len() {
            for change in [0xff_u8, 0x01, 0x80] {
                let original = data[i];
                data[i] = if change == 0x01 {
                    original.wrapping_add(1)
                } else {
                    original ^ change
                };
                check(&data);
                data[i] = original;
            }
        }
        n += 1 + seed.len() * 4;
    }
    n
}

fn corpus_is_there(target: &str, replayed: usize) {
    assert!(
        replayed > 0,
        "fuzz/corpus/{target}/ is empty: the committed corpus is replayed here"
    );
    eprintln!("{target}: {replayed} corpus inputs replayed");
}

fn journal_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for command in common::strategies::sample(200, true) {
        let mut out = Vec::new();
        codec::encode(&command, 1_700_000_000_000, &mut out);
        seeds.push(out);
    }
    let items: Vec<_> = common::strategies::sample(40, false)
        .into_iter()
        .filter_map(|c| match c {
            account_service::domain::Command::Reserve(r) => Some(r),
            _ => None,
        })
        .take(5)
        .collect();
    let mut out = Vec::new();
    codec::encode_basket(&items, 1_700_000_000_000, &mut out);
    seeds.push(out);
    seeds
}

#[test]
fn journal_record() {
    corpus_is_there(
        "journal_record",
        replay("journal_record", fuzzing::journal_record),
    );
    let n = mutate(&journal_seeds(), fuzzing::journal_record);
    eprintln!("journal_record: {n} mutations");
}

/// A real segment of a few records, as the WAL writes it.
fn segment_seed() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut options = wal::WalOptions::new(dir.path());
    options.segment_size_bytes = 64 * 1024;
    options.record_size_max = 16 * 1024;
    let mut log = wal::Wal::open(options).unwrap();
    for (i, seed) in journal_seeds().iter().take(12).enumerate() {
        log.append(i as u64 + 1, seed).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    let mut bytes = std::fs::read(dir.path().join(fuzzing::SEGMENT_NAME)).unwrap();
    // The tail is preallocated zeros: the mutations go where the records are.
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes.truncate(used + 64);
    bytes
}

#[test]
fn wal_segment() {
    corpus_is_there("wal_segment", replay("wal_segment", fuzzing::wal_segment));
    let seed = segment_seed();
    fuzzing::wal_segment(&seed);
    // A segment is larger than the other inputs: every 7th truncation and byte.
    let mut n = 0;
    let mut data = seed.clone();
    for i in (0..seed.len()).step_by(7) {
        fuzzing::wal_segment(&seed[..i]);
        data[i] ^= 0xff;
        fuzzing::wal_segment(&data);
        data[i] = seed[i];
        n += 2;
    }
    eprintln!(
        "wal_segment: {n} mutations of a {}-byte segment",
        seed.len()
    );
}

#[test]
fn amount() {
    corpus_is_there("amount", replay("amount", fuzzing::amount));
    let seeds: Vec<Vec<u8>> = [
        "0",
        "1",
        "0.00000001",
        "999999999999999999.99999999",
        "000123.4500",
        "1e5",
        "-1",
        "+1",
        " 1",
        "1.",
        ".5",
        "1.2.3",
        "١٢٣",
        "1\u{0}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let n = mutate(&seeds, fuzzing::amount);
    eprintln!("amount: {n} mutations");
}

fn deposit_seed() -> events::DepositEvent {
    events::DepositEvent {
        event_id: "d-1".into(),
        account_id: 1,
        amount: "10".into(),
        currency: "USD".into(),
        source: "bank".into(),
        timestamp: 1,
    }
}

fn tagged(kind: u8, message: impl Message) -> Vec<u8> {
    let mut out = vec![kind];
    message.encode(&mut out).unwrap();
    out
}

#[test]
fn grpc_request() {
    corpus_is_there(
        "grpc_request",
        replay("grpc_request", fuzzing::grpc_request),
    );
    let reserve = common::server::reserve_one_usd(7);
    let seeds = vec![
        tagged(0, reserve.clone()),
        tagged(
            1,
            pb::UnreserveRequest {
                request_id: "u-1".into(),
                account_id: 1,
                order_id: "o-1".into(),
                amount: "0.5".into(),
            },
        ),
        tagged(
            2,
            pb::OpenAccountRequest {
                request_id: "open-1".into(),
                account_id: 1,
                base_currency: "USD".into(),
            },
        ),
        tagged(4, deposit_seed()),
        tagged(
            7,
            pb::ReserveBatchRequest {
                requests: vec![reserve.clone(), reserve],
                all_or_nothing: true,
            },
        ),
    ];
    let n = mutate(&seeds, fuzzing::grpc_request);
    eprintln!("grpc_request: {n} mutations");
}

#[test]
fn kafka_message() {
    corpus_is_there(
        "kafka_message",
        replay("kafka_message", fuzzing::kafka_message),
    );
    let fill = events::FillEvent {
        event_id: "f-1".into(),
        order_id: "o-1".into(),
        account_id: 1,
        symbol: "ACME".into(),
        side: "BUY".into(),
        quantity: "2".into(),
        fill_price: "3.5".into(),
        filled_amount: "7".into(),
        ..Default::default()
    };
    let seeds = vec![
        tagged(0, fill),
        tagged(1, deposit_seed()),
        tagged(
            2,
            events::WithdrawEvent {
                event_id: "w-1".into(),
                account_id: 1,
                amount: "10".into(),
                currency: "USD".into(),
                ..Default::default()
            },
        ),
    ];
    let n = mutate(&seeds, fuzzing::kafka_message);
    eprintln!("kafka_message: {n} mutations");
}

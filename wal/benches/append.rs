//! WAL append + group-commit sync at several batch sizes, and replay speed.
//! Design section 6: batches must amortise the sync, so records/s grows with
//! the batch size instead of being capped at 1/fsync.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::time::Duration;
use wal::{Wal, WalOptions};

const PAYLOAD: [u8; 128] = [7; 128];

fn append_sync(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal/append_sync");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for batch in [1u64, 16, 256] {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(WalOptions::new(dir.path())).unwrap();
        let mut seq = 0;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter(|| {
                for _ in 0..batch {
                    seq += 1;
                    wal.append(seq, &PAYLOAD).unwrap();
                }
                wal.sync().unwrap();
            })
        });
    }
    group.finish();
}

fn replay(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal/replay");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    let records = 200_000u64;
    let dir = tempfile::tempdir().unwrap();
    {
        let mut wal = Wal::open(WalOptions::new(dir.path())).unwrap();
        for seq in 1..=records {
            wal.append(seq, &PAYLOAD[..100]).unwrap();
        }
        wal.sync().unwrap();
    }
    group.throughput(Throughput::Elements(records));
    group.bench_function("open_and_replay_200k", |b| {
        b.iter_batched(
            || (),
            |_| {
                let wal = Wal::open(WalOptions::new(dir.path())).unwrap();
                let mut n = 0u64;
                wal.replay(1, |_, p| {
                    n += p.len() as u64;
                    Ok::<(), wal::WalError>(())
                })
                .unwrap();
                n
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, append_sync, replay);
criterion_main!(benches);

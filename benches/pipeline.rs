//! The engine pipeline end to end, in process: ingress queue -> WAL append ->
//! apply -> group-commit sync -> reply. Reserves are submitted in waves of
//! `inflight` outstanding requests, so batches form as they would under load;
//! the figure is durable commands per second (sync mode) on this disk.

use account_service::domain::*;
use account_service::engine::{Engine, EngineConfig, Phase, RequestKind, Want};
use account_service::metrics::Metrics;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};

const ACCOUNTS: i64 = 1_000;

fn id(s: String) -> Id {
    Id::new(&s).unwrap()
}

fn start(dir: &std::path::Path) -> (tokio::runtime::Runtime, Engine) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut config = EngineConfig::new(dir);
    config.pin_core = false;
    let engine = Engine::start(config, Metrics::new()).unwrap();
    rt.block_on(async {
        let mut phase = engine.handle().phase();
        while *phase.borrow_and_update() != Phase::Serving {
            phase.changed().await.unwrap();
        }
        let h = engine.handle();
        for c in account_service::workload::funded_accounts(ACCOUNTS) {
            h.call(RequestKind::Command(c, Want::Nothing))
                .await
                .unwrap();
        }
    });
    (rt, engine)
}

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline/reserve_durable");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let (rt, engine) = start(dir.path());
    let usd = Asset::currency("USD").unwrap();
    let mut n = 0u64;
    for inflight in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("inflight_{inflight}"), |b| {
            b.iter_custom(|iters| {
                let handle = engine.handle();
                rt.block_on(async {
                    let started = Instant::now();
                    let mut left = iters;
                    while left > 0 {
                        let wave = left.min(inflight as u64);
                        let mut pending = Vec::with_capacity(wave as usize);
                        for _ in 0..wave {
                            n += 1;
                            let reserve = Command::Reserve(Reserve {
                                request_id: id(format!("r{n}")),
                                account_id: AccountId((n % ACCOUNTS as u64) as i64 + 1),
                                order_id: id(format!("o{n}")),
                                kind: ReservationKind::Cash,
                                asset: usd,
                                amount: Decimal::ONE,
                                expires_at_ms: None,
                            });
                            pending.push(
                                handle
                                    .submit(RequestKind::Command(reserve, Want::Reservation))
                                    .unwrap(),
                            );
                        }
                        for p in pending {
                            p.await.unwrap();
                        }
                        left -= wave;
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
    engine.stop().unwrap();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);

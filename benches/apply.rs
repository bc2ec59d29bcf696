//! `apply` alone: no I/O, one core. Design section 6 asks >= 5 million
//! commands/s for a mixed reserve / unreserve / fill load.
//!
//! Commands are generated outside the timed region, in chunks, so the figure is
//! the state machine's cost only. Journaled time advances 1 ms per 1,000
//! commands and a tick runs every 1,000 commands with a 1 s idempotency window,
//! so the tables stay at a steady size (about a million keys) as in production.

use account_service::domain::*;
use account_service::state_machine::{NoEvents, State, StateConfig};
use account_service::workload;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};

const ACCOUNTS: i64 = 10_000;
const CHUNK: u64 = 50_000;

struct Bench {
    state: State,
    now: i64,
    counter: u64,
}

impl Bench {
    fn new() -> Bench {
        let mut b = Bench {
            state: State::new(StateConfig {
                idempotency_window_ms: 1_000,
                tick_work_max: 100_000,
            }),
            now: 1_700_000_000_000,
            counter: 0,
        };
        for c in workload::funded_accounts(ACCOUNTS) {
            b.apply(&c);
        }
        b
    }

    fn apply(&mut self, command: &Command) {
        let seq = self.state.last_sequence() + 1;
        self.state.apply(command, seq, self.now, &mut NoEvents);
        self.counter += 1;
        if self.counter.is_multiple_of(1_000) {
            self.now += 1;
            let seq = self.state.last_sequence() + 1;
            self.state
                .apply(&Command::Tick, seq, self.now, &mut NoEvents);
        }
    }
}

/// Times `apply` of the commands `pick` selects from each order's life; the
/// others are applied untimed so the state stays realistic.
fn timed(bench: &mut Bench, iters: u64, pick: &[bool; 3]) -> Duration {
    let per_order = pick.iter().filter(|p| **p).count() as u64;
    let orders = iters.div_ceil(per_order);
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < orders {
        let n = CHUNK.min(orders - done);
        let chunk: Vec<[Command; 3]> = (0..n)
            .map(|i| workload::order_life(bench.counter + done + i, ACCOUNTS))
            .collect();
        for stage in 0..3 {
            let started = Instant::now();
            for order in &chunk {
                bench.apply(&order[stage]);
            }
            if pick[stage] {
                total += started.elapsed();
            }
        }
        done += n;
    }
    total
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    let mut bench = Bench::new();
    group.bench_function("reserve", |b| {
        b.iter_custom(|iters| timed(&mut bench, iters, &[true, false, false]))
    });
    group.bench_function("fill", |b| {
        b.iter_custom(|iters| timed(&mut bench, iters, &[false, true, false]))
    });
    group.bench_function("unreserve", |b| {
        b.iter_custom(|iters| timed(&mut bench, iters, &[false, false, true]))
    });
    group.bench_function("mixed", |b| {
        b.iter_custom(|iters| timed(&mut bench, iters, &[true, true, true]))
    });
    // What one copy of the whole state costs (the accounts above and the
    // idempotency keys the mixed load left): why an outbox spill builds its
    // base off the writer thread instead of copying the writer's state.
    group.bench_function("state_clone", |b| {
        b.iter(|| std::hint::black_box(bench.state.clone()))
    });
    group.finish();
}

/// A fill, and the view `GetAccount` copies out, on an account holding
/// `held` positions: the cost per call of thousands of symbols on one account.
fn positions(c: &mut Criterion) {
    use account_service::engine::view::AccountView;
    let mut group = c.benchmark_group("positions");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    for held in [5_u64, 5_000] {
        let mut state = State::new(StateConfig {
            idempotency_window_ms: 1_000,
            tick_work_max: 100_000,
        });
        let mut now = 1_700_000_000_000;
        let mut seq = 0;
        let mut step = |state: &mut State, command: &Command, now: i64| {
            seq += 1;
            state.apply(command, seq, now, &mut NoEvents);
        };
        for command in workload::funded_accounts(1) {
            step(&mut state, &command, now);
        }
        let account_id = AccountId::new(1).unwrap();
        let fill = |n: u64, symbol: u64| {
            Command::Fill(Fill {
                event_id: workload::id("pf", n),
                account_id,
                order_id: workload::id("po", n),
                symbol: Asset::symbol(&format!("S{symbol}")).unwrap(),
                side: Side::Buy,
                quantity: rust_decimal::Decimal::ONE,
                price: rust_decimal::Decimal::ONE,
                filled_amount: rust_decimal::Decimal::ONE,
                currency: None,
                source: None,
            })
        };
        for n in 0..held {
            step(&mut state, &fill(n, n), now);
        }
        let mut n = held;
        group.bench_function(format!("fill/{held}"), |b| {
            b.iter_custom(|iters| {
                let commands: Vec<Command> =
                    (0..iters).map(|i| fill(n + i, (n + i) % held)).collect();
                let started = Instant::now();
                for command in &commands {
                    step(&mut state, command, now);
                }
                let elapsed = started.elapsed();
                n += iters;
                now += 2_000;
                step(&mut state, &Command::Tick, now);
                elapsed
            })
        });
        let account = state.account(account_id).unwrap();
        assert_eq!(account.positions.len() as u64, held);
        group.bench_function(format!("account_view/{held}"), |b| {
            b.iter(|| std::hint::black_box(AccountView::of(account, 1)))
        });
    }
    group.finish();
}

criterion_group!(benches, apply, positions);
criterion_main!(benches);

//! `apply` alone: no I/O, one core. Design section 6 asks >= 5 million
//! commands/s for a mixed reserve / unreserve / fill load.
//!
//! Commands are generated outside the timed region, in chunks, so the figure is
//! the state machine's cost only. Journaled time advances 1 ms per 1,000
//! commands and a tick runs every 1,000 commands with a 1 s idempotency window,
//! so the tables stay at a steady size (about a million keys) as in production.

use account_service::domain::*;
use account_service::state_machine::{NoEvents, State, StateConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};

const ACCOUNTS: i64 = 10_000;
const CHUNK: u64 = 50_000;

struct Bench {
    state: State,
    now: i64,
    counter: u64,
}

fn id(prefix: &str, n: u64) -> Id {
    let mut buf = [0u8; 32];
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{prefix}{n}");
    let len = cursor.position() as usize;
    Id::new(std::str::from_utf8(&buf[..len]).unwrap()).unwrap()
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
        let usd = Asset::currency("USD").unwrap();
        for a in 1..=ACCOUNTS {
            b.apply(&Command::OpenAccount(OpenAccount {
                request_id: id("open", a as u64),
                account_id: AccountId(a),
                base_currency: usd,
            }));
            b.apply(&Command::Deposit(CashMovement {
                event_id: id("fund", a as u64),
                account_id: AccountId(a),
                currency: usd,
                amount: Decimal::from(1_000_000_000),
                source: None,
            }));
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

    /// One order's life: reserve, fill half, unreserve the rest.
    fn order(&self, n: u64) -> [Command; 3] {
        let account = AccountId((n % ACCOUNTS as u64) as i64 + 1);
        let order_id = id("o", n);
        let usd = Asset::currency("USD").unwrap();
        [
            Command::Reserve(Reserve {
                request_id: id("r", n),
                account_id: account,
                order_id,
                kind: ReservationKind::Cash,
                asset: usd,
                amount: Decimal::new(10_050, 2),
                expires_at_ms: None,
            }),
            Command::Fill(Fill {
                event_id: id("f", n),
                account_id: account,
                order_id,
                symbol: Asset::symbol("ACME").unwrap(),
                side: Side::Buy,
                quantity: Decimal::from(5),
                price: Decimal::from(10),
                filled_amount: Decimal::from(50),
                currency: None,
                source: None,
            }),
            Command::Unreserve(Unreserve {
                request_id: id("u", n),
                account_id: account,
                order_id,
                amount: None,
            }),
        ]
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
            .map(|i| bench.order(bench.counter + done + i))
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
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);

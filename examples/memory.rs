//! Memory of the in-memory state at design-section-6 scale: 1 M accounts with
//! 5 M positions (5 each), built through `apply`, then the idempotency keys of
//! the build are pruned by journaled ticks past the window.
//!
//! `cargo run --release --example memory [-- ACCOUNTS POSITIONS_PER_ACCOUNT]`
//! prints one JSON line: RSS before, after the build, and after pruning.

use account_service::domain::*;
use account_service::state_machine::{NoEvents, State, StateConfig};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let mut args = std::env::args().skip(1);
    let accounts: i64 = args
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let per_account: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(5);
    let window_ms = 1_000;
    let mut state = State::new(StateConfig {
        idempotency_window_ms: window_ms,
        tick_work_max: 100_000,
    });
    let mut now = 1_700_000_000_000i64;
    let apply = |state: &mut State, c: Command, now: i64| {
        let seq = state.last_sequence() + 1;
        state.apply(&c, seq, now, &mut NoEvents);
    };
    let usd = Asset::currency("USD").unwrap();
    let symbols: Vec<Asset> = (0..per_account)
        .map(|i| Asset::symbol(&format!("SYM{i}")).unwrap())
        .collect();
    let before = rss_bytes();
    let started = std::time::Instant::now();
    for a in 1..=accounts {
        let account_id = AccountId(a);
        let key = |p: &str, i: usize| Id::new(&format!("{p}{a}-{i}")).unwrap();
        apply(
            &mut state,
            Command::OpenAccount(OpenAccount {
                request_id: key("o", 0),
                account_id,
                base_currency: usd,
            }),
            now,
        );
        apply(
            &mut state,
            Command::Deposit(CashMovement {
                event_id: key("d", 0),
                account_id,
                currency: usd,
                amount: Decimal::from(100_000),
                source: None,
            }),
            now,
        );
        for (i, symbol) in symbols.iter().enumerate() {
            let fill = Fill {
                event_id: key("f", i),
                account_id,
                order_id: key("x", i),
                symbol: *symbol,
                side: Side::Buy,
                quantity: Decimal::from(10),
                price: Decimal::new(12_345, 2),
                filled_amount: Decimal::new(123_450, 2),
                currency: None,
                source: None,
            };
            apply(&mut state, Command::Fill(fill), now);
        }
        if a % 100_000 == 0 {
            now += 1;
        }
    }
    let built = rss_bytes();
    let build_secs = started.elapsed().as_secs_f64();
    now += window_ms + 1;
    while state.next_deadline_ms().is_some_and(|t| t <= now) {
        apply(&mut state, Command::Tick, now);
    }
    state.shrink_to_fit();
    let pruned = rss_bytes();
    let positions: usize = state.accounts().map(|a| a.positions.len()).sum();
    println!(
        "{{\"accounts\":{},\"positions\":{},\"commands\":{},\"build_s\":{:.1},\"rss_start_mib\":{},\"rss_built_mib\":{},\"rss_after_key_pruning_mib\":{}}}",
        state.account_count(),
        positions,
        state.last_sequence(),
        build_secs,
        before >> 20,
        built >> 20,
        pruned >> 20
    );
}

//! Property tests: random command sequences keep every invariant, and money is
//! conserved per currency: deposits - withdrawals - buys + sells = available + reserved.

mod common;

use account_service::domain::*;
use account_service::state_machine::{NoEvents, Outcome, Prepared, ResultCode, StateConfig};
use common::strategies::*;
use common::*;
use proptest::prelude::*;
use std::collections::HashMap;

/// Net cash that entered each currency through accepted commands.
fn flow(
    command: &Command,
    currency_of_base: impl Fn(AccountId) -> Option<Asset>,
) -> Option<(Asset, Decimal)> {
    match command {
        Command::Deposit(c) => Some((c.currency, c.amount)),
        Command::Withdraw(c) => Some((c.currency, -c.amount)),
        Command::Fill(f) => {
            let cur = f.currency.or_else(|| currency_of_base(f.account_id))?;
            Some((
                cur,
                if f.side == Side::Buy {
                    -f.filled_amount
                } else {
                    f.filled_amount
                },
            ))
        }
        _ => None,
    }
}

/// Runs `steps`, checking every invariant after each command (no panic),
/// then conservation: the net flow of accepted commands is what is held.
/// Returns how many commands were refused for overflow.
fn conserved(h: &mut Harness, steps: Vec<Step>) -> Result<usize, TestCaseError> {
    let mut expected: HashMap<Asset, Decimal> = HashMap::new();
    let mut overflows = 0;
    for step in steps {
        match step {
            Step::Advance(ms) => h.now_ms += ms,
            Step::Run(command) => {
                let base = |a: AccountId| h.state.account(a).map(|x| x.base_currency);
                let moved = flow(&command, base);
                let outcome = h.run(command); // checks every invariant
                overflows += usize::from(outcome.result == ResultCode::AmountOverflow);
                if outcome.result == ResultCode::Ok && !outcome.replayed {
                    if let Some((cur, x)) = moved {
                        *expected.entry(cur).or_default() += x;
                    }
                }
            }
        }
    }
    let mut held: HashMap<Asset, Decimal> = HashMap::new();
    for a in h.state.accounts() {
        for b in &a.cash {
            *held.entry(b.currency).or_default() +=
                Decimal::from(b.available) + Decimal::from(b.reserved);
        }
    }
    for cur in [usd(), eur()] {
        prop_assert_eq!(
            expected.get(&cur).copied().unwrap_or_default(),
            held.get(&cur).copied().unwrap_or_default(),
            "conservation of {}",
            cur
        );
    }
    Ok(overflows)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_money_is_conserved(steps in steps()) {
        let mut h = Harness::with_config(StateConfig { idempotency_window_ms: 4_000, tick_work_max: 3 });
        conserved(&mut h, steps)?;
    }

    /// Accounts funded near the limit of exact arithmetic: every command is
    /// applied exactly or refused with AMOUNT_OVERFLOW, never rounded.
    #[test]
    fn near_the_limits_money_is_conserved_or_the_command_refused(
        funding in prop::collection::vec((currency(), amount()), 1..6),
        steps in steps(),
    ) {
        let mut h = Harness::with_config(StateConfig { idempotency_window_ms: 4_000, tick_work_max: 3 });
        let mut setup = Vec::new();
        for a in 1..=ACCOUNTS {
            setup.push(Step::Run(open(&format!("open-{a}"), a, usd())));
            for (i, (cur, x)) in funding.iter().enumerate() {
                let near_max = amount_max() - *x + Decimal::new(1, 8);
                let c = deposit(&format!("fund-{a}-{i}"), a, *cur, &near_max.max(*x).to_string());
                setup.push(Step::Run(c));
            }
        }
        setup.extend(steps);
        conserved(&mut h, setup)?;
    }

    #[test]
    fn same_commands_same_state(steps in steps()) {
        let run = || {
            let mut h = Harness::new();
            for step in &steps {
                match step {
                    Step::Advance(ms) => h.now_ms += ms,
                    Step::Run(c) => { h.run_quiet(*c); }
                }
            }
            h.state.digest()
        };
        prop_assert_eq!(run(), run());
    }

    /// The writer's and the replay's loop — commands prepared (hashed,
    /// fingerprinted) before their turn, prefetched for a few places ahead
    /// of the one applied, then applied with what was prepared — decides
    /// every command as `apply` does alone.
    #[test]
    fn prepared_ahead_same_outcomes_same_state(steps in steps()) {
        let config = StateConfig { idempotency_window_ms: 4_000, tick_work_max: 3 };
        let mut alone = Harness::with_config(config);
        let mut expected: Vec<Outcome> = Vec::new();
        for step in &steps {
            match step {
                Step::Advance(ms) => alone.now_ms += ms,
                Step::Run(c) => expected.push(alone.run_quiet(*c)),
            }
        }
        let mut ahead = Harness::with_config(config);
        let mut got: Vec<Outcome> = Vec::new();
        // Runs of commands between two advances of the clock, each run
        // through one lookahead (as one queue entry or one replay chunk).
        let mut run: Vec<Command> = Vec::new();
        let mut apply_run = |h: &mut Harness, run: &mut Vec<Command>| {
            let prepared: Vec<Prepared> = run.iter().map(Prepared::of).collect();
            for (i, c) in run.iter().enumerate() {
                h.state.prefetch_ahead(&prepared, i);
                let seq = h.state.last_sequence() + 1;
                got.push(h.state.apply_prepared(c, &prepared[i], seq, h.now_ms, &mut NoEvents));
            }
            run.clear();
        };
        for step in &steps {
            match step {
                Step::Advance(ms) => {
                    apply_run(&mut ahead, &mut run);
                    ahead.now_ms += ms;
                }
                Step::Run(c) => run.push(*c),
            }
        }
        apply_run(&mut ahead, &mut run);
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(ahead.state.digest(), alone.state.digest());
    }
}

//! Random command generators shared by the property and replay tests.

use super::*;
use account_service::domain::*;
use proptest::prelude::*;

pub const ACCOUNTS: i64 = 3;

/// The largest wire amount: 18 nines, '.', 8 nines.
pub fn amount_max() -> Decimal {
    Decimal::from_i128_with_scale(99_999_999_999_999_999_999_999_999, 8)
}

pub fn amount() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        8 => (1u64..2_000).prop_map(|c| Decimal::new(c as i64, 2)),
        4 => (1u64..5).prop_map(|u| Decimal::new(u as i64, 0)),
        2 => Just(Decimal::new(1, 8)),
        4 => (1u64..1_000_000).prop_map(|c| Decimal::new(c as i64, 8)),
        // Near the limits of exact arithmetic (design 3): results beyond
        // them are refused, never rounded.
        1 => Just(amount_max()),
        1 => (1i64..10).prop_map(|k| Decimal::new(k, 0) * Decimal::new(100_000_000_000_000_000, 0)),
        1 => (1i64..1_000).prop_map(|k| amount_max() - Decimal::new(k, 8)),
    ]
}

pub fn account() -> impl Strategy<Value = i64> {
    1..=ACCOUNTS + 1 // includes one unknown account
}

pub fn order() -> impl Strategy<Value = String> {
    (0..6u8).prop_map(|o| format!("o{o}"))
}

pub fn key() -> impl Strategy<Value = String> {
    // Mostly fresh keys; one in ten from a small space, so that replays and
    // conflicts happen too.
    prop_oneof![
        9 => (0..u32::MAX).prop_map(|k| format!("u{k}")),
        1 => (0..10u16).prop_map(|k| format!("k{k}")),
    ]
}

pub fn currency() -> impl Strategy<Value = Asset> {
    prop_oneof![Just(usd()), Just(eur())]
}

pub fn symbol() -> impl Strategy<Value = Asset> {
    prop_oneof![Just(sym("AAA")), Just(sym("BBB"))]
}

#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Step {
    Run(Command),
    Advance(i64),
}

pub fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        1 => (key(), account(), currency()).prop_map(|(k, a, c)| open(&k, a, c)),
        2 => (key(), account(), currency(), amount()).prop_map(|(k, a, c, x)| Command::Deposit(CashMovement {
            event_id: id(&k), account_id: AccountId(a), currency: c, amount: amount::kept(x * Decimal::from(50)).unwrap_or(x), source: None
        })),
        1 => (key(), account(), currency(), amount()).prop_map(|(k, a, c, x)| Command::Withdraw(CashMovement {
            event_id: id(&k), account_id: AccountId(a), currency: c, amount: x, source: None
        })),
        3 => (key(), account(), order(), currency(), amount(), proptest::option::of(0i64..5_000)).prop_map(
            |(k, a, o, c, x, exp)| reserve(&k, a, &o, ReservationKind::Cash, c, &x.to_string(), exp.map(|e| 1_700_000_000_000 + e))
        ),
        2 => (key(), account(), order(), symbol(), amount()).prop_map(|(k, a, o, s, x)| {
            reserve(&k, a, &o, ReservationKind::Security, s, &x.to_string(), None)
        }),
        2 => (key(), account(), order(), proptest::option::of(amount())).prop_map(|(k, a, o, x)| {
            Command::Unreserve(Unreserve { request_id: id(&k), account_id: AccountId(a), order_id: id(&o), amount: x })
        }),
        3 => (key(), account(), order(), symbol(), any::<bool>(), amount(), amount(), proptest::option::of(currency())).prop_filter_map(
            "a notional within 18 integer digits (else malformed at the edge)",
            |(k, a, o, s, buy, q, p, cur)| Some(Command::Fill(Fill {
                event_id: id(&k), account_id: AccountId(a), order_id: id(&o), symbol: s,
                side: if buy { Side::Buy } else { Side::Sell },
                quantity: q, price: p, filled_amount: amount::notional(p, q)?, currency: cur, source: None,
            }))
        ),
        1 => (key(), account(), prop_oneof![Just(AccountStatus::Active), Just(AccountStatus::Suspended), Just(AccountStatus::Closed)])
            .prop_map(|(k, a, s)| status(&k, a, s)),
        1 => Just(Command::Tick),
    ]
}

pub fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            9 => command().prop_map(Step::Run),
            1 => (0i64..3_000).prop_map(Step::Advance),
        ],
        1..200,
    )
}

/// `n` commands drawn deterministically from [`command`] (the same `n` give
/// the same commands), after opening and funding every account when `funded`.
pub fn sample(n: usize, funded: bool) -> Vec<Command> {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = command();
    let mut commands = vec![];
    if funded {
        for a in 1..=ACCOUNTS {
            commands.push(super::open(&format!("open-{a}"), a, super::usd()));
            commands.push(super::deposit(
                &format!("fund-{a}"),
                a,
                super::usd(),
                "100000",
            ));
        }
    }
    for _ in 0..n {
        commands.push(strategy.new_tree(&mut runner).unwrap().current());
    }
    commands
}

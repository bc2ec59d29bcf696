//! Builders shared by the black-box tests.
#![allow(dead_code)]

pub mod group;
pub mod kafka;
pub mod postgres;
pub mod server;
pub mod strategies;

/// `program` (found by `program version_arg` succeeding), asserted
/// installed: `scripts/test` installs it (Debian package `package`).
pub fn require_tool(program: &'static str, version_arg: &str, package: &str) -> &'static str {
    let found = std::process::Command::new(program)
        .arg(version_arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is not installed: `scripts/test` installs it (Debian package {package})"
    );
    program
}

use account_service::domain::*;
use account_service::state_machine::{Event, NoEvents, Outcome, State, StateConfig};
use std::str::FromStr;

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// An amount as the state keeps it.
pub fn kept(s: &str) -> Amount {
    Amount::of(d(s)).unwrap()
}

pub fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

pub fn usd() -> Asset {
    Asset::currency("USD").unwrap()
}

pub fn eur() -> Asset {
    Asset::currency("EUR").unwrap()
}

pub fn sym(s: &str) -> Asset {
    Asset::symbol(s).unwrap()
}

/// A state plus the sequence/clock bookkeeping the engine normally does.
pub struct Harness {
    pub state: State,
    pub now_ms: i64,
    pub events: Vec<Event>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_config(StateConfig::default())
    }

    pub fn with_config(config: StateConfig) -> Harness {
        Harness {
            state: State::new(config),
            now_ms: 1_700_000_000_000,
            events: Vec::new(),
        }
    }

    pub fn run(&mut self, command: Command) -> Outcome {
        self.events.clear();
        let seq = self.state.last_sequence() + 1;
        let outcome = self
            .state
            .apply(&command, seq, self.now_ms, &mut self.events);
        if let Err(e) = account_service::state_machine::invariants::check(&self.state) {
            panic!("invariant broken after {command:?}: {e}");
        }
        outcome
    }

    pub fn run_quiet(&mut self, command: Command) -> Outcome {
        let seq = self.state.last_sequence() + 1;
        self.state.apply(&command, seq, self.now_ms, &mut NoEvents)
    }

    pub fn open(&mut self, account: i64) -> Outcome {
        self.run(open(&format!("open-{account}"), account, usd()))
    }

    pub fn deposit(&mut self, key: &str, account: i64, amount: &str) -> Outcome {
        self.run(deposit(key, account, usd(), amount))
    }

    /// Withdraws all available USD of `account` (nothing if none).
    pub fn withdraw_all(&mut self, account: i64) {
        let available = self
            .state
            .account(AccountId(account))
            .and_then(|a| a.cash(usd()))
            .map_or(Amount::ZERO, |b| b.available);
        if available.is_positive() {
            let key = format!("withdraw-all-{}", self.state.last_sequence());
            self.run(withdraw(&key, account, usd(), &available.to_string()));
        }
    }
}

pub fn open(key: &str, account: i64, currency: Asset) -> Command {
    Command::OpenAccount(OpenAccount {
        request_id: id(key),
        account_id: AccountId(account),
        base_currency: currency,
    })
}

pub fn status(key: &str, account: i64, status: AccountStatus) -> Command {
    Command::SetAccountStatus(SetAccountStatus {
        request_id: id(key),
        account_id: AccountId(account),
        status,
        reason: Id::default(),
    })
}

pub fn deposit(key: &str, account: i64, currency: Asset, amount: &str) -> Command {
    Command::Deposit(CashMovement {
        event_id: id(key),
        account_id: AccountId(account),
        currency,
        amount: d(amount),
        source: None,
    })
}

pub fn withdraw(key: &str, account: i64, currency: Asset, amount: &str) -> Command {
    Command::Withdraw(CashMovement {
        event_id: id(key),
        account_id: AccountId(account),
        currency,
        amount: d(amount),
        source: None,
    })
}

pub fn reserve_cash(key: &str, account: i64, order: &str, amount: &str) -> Command {
    reserve(
        key,
        account,
        order,
        ReservationKind::Cash,
        usd(),
        amount,
        None,
    )
}

pub fn reserve_shares(key: &str, account: i64, order: &str, symbol: &str, amount: &str) -> Command {
    reserve(
        key,
        account,
        order,
        ReservationKind::Security,
        sym(symbol),
        amount,
        None,
    )
}

pub fn reserve(
    key: &str,
    account: i64,
    order: &str,
    kind: ReservationKind,
    asset: Asset,
    amount: &str,
    expires_at_ms: Option<i64>,
) -> Command {
    Command::Reserve(Reserve {
        request_id: id(key),
        account_id: AccountId(account),
        order_id: id(order),
        kind,
        asset,
        amount: d(amount),
        expires_at_ms,
    })
}

pub fn unreserve(key: &str, account: i64, order: &str, amount: Option<&str>) -> Command {
    Command::Unreserve(Unreserve {
        request_id: id(key),
        account_id: AccountId(account),
        order_id: id(order),
        amount: amount.map(d),
    })
}

/// A fill whose filled_amount is price x quantity, rounded half-even.
pub fn fill(
    key: &str,
    account: i64,
    order: &str,
    symbol: &str,
    side: Side,
    quantity: &str,
    price: &str,
) -> Command {
    let filled = amount::notional(d(price), d(quantity)).expect("a notional in range");
    Command::Fill(Fill {
        event_id: id(key),
        account_id: AccountId(account),
        order_id: id(order),
        symbol: sym(symbol),
        side,
        quantity: d(quantity),
        price: d(price),
        filled_amount: filled,
        currency: None,
        source: None,
    })
}

/// Submits `commands` to the engine in waves of `wave` (batches form, group
/// commit, while the queue stays bounded) and waits for every reply.
pub async fn submit_in_waves(
    engine: &account_service::engine::Engine,
    commands: &[Command],
    wave: usize,
) {
    use account_service::engine::{RequestKind, Want};
    for chunk in commands.chunks(wave) {
        let pending: Vec<_> = chunk
            .iter()
            .map(|c| {
                engine
                    .handle()
                    .submit(RequestKind::Command(*c, Want::Nothing))
                    .unwrap()
            })
            .collect();
        for p in pending {
            p.await.unwrap();
        }
    }
}

//! The synthetic load the in-process measurements share: `benches/` and the
//! loadtest's `engine` and `replay` modes run the same accounts and the same
//! order lives, so their figures compare.

use crate::domain::*;

/// The id `{prefix}{n}`, formatted on the stack.
pub fn id(prefix: &str, n: u64) -> Id {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{prefix}{n}");
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(|s| Id::new(s).ok())
        .expect("prefix and number fit an id")
}

/// Accounts `1..=accounts`, each opened in USD and funded with 1,000,000,000
/// USD: two commands per account.
pub fn funded_accounts(accounts: i64) -> impl Iterator<Item = Command> {
    let usd = Asset::currency("USD").expect("USD");
    (1..=accounts).flat_map(move |a| {
        let account_id = AccountId(a);
        [
            Command::OpenAccount(OpenAccount {
                request_id: id("open", a as u64),
                account_id,
                base_currency: usd,
            }),
            Command::Deposit(CashMovement {
                event_id: id("fund", a as u64),
                account_id,
                currency: usd,
                amount: Decimal::from(1_000_000_000),
                source: None,
            }),
        ]
    })
}

/// Order `n`'s life on account `n % accounts + 1`: reserve 100.50 USD, fill
/// 5 ACME at 10, unreserve what is left.
pub fn order_life(n: u64, accounts: i64) -> [Command; 3] {
    let account_id = AccountId((n % accounts as u64) as i64 + 1);
    let order_id = id("o", n);
    [
        Command::Reserve(Reserve {
            request_id: id("r", n),
            account_id,
            order_id,
            kind: ReservationKind::Cash,
            asset: Asset::currency("USD").expect("USD"),
            amount: Decimal::new(10_050, 2),
            expires_at_ms: None,
        }),
        Command::Fill(Fill {
            event_id: id("f", n),
            account_id,
            order_id,
            symbol: Asset::symbol("ACME").expect("ACME"),
            side: Side::Buy,
            quantity: Decimal::from(5),
            price: Decimal::from(10),
            filled_amount: Decimal::from(50),
            currency: None,
            source: None,
        }),
        Command::Unreserve(Unreserve {
            request_id: id("u", n),
            account_id,
            order_id,
            amount: None,
        }),
    ]
}

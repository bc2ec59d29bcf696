//! Cold-restart time: journal N commands (reserve / fill / unreserve cycles
//! over 10,000 funded accounts) through the engine, stop it, start it again
//! and time the replay until it serves.
//!
//! `cargo run --release --example replay [-- RECORDS]` prints one JSON line.

use account_service::domain::*;
use account_service::engine::{Engine, EngineConfig, Phase, RequestKind, Want};
use account_service::metrics::Metrics;
use std::time::Instant;

const ACCOUNTS: u64 = 10_000;

fn id(s: String) -> Id {
    Id::new(&s).unwrap()
}

async fn serving(engine: &Engine) {
    let mut phase = engine.handle().phase();
    while *phase.borrow_and_update() != Phase::Serving {
        phase.changed().await.unwrap();
    }
}

fn command(n: u64) -> Command {
    let usd = Asset::currency("USD").unwrap();
    let account_id = AccountId((n / 3 % ACCOUNTS) as i64 + 1);
    let order_id = id(format!("o{}", n / 3));
    match n % 3 {
        0 => Command::Reserve(Reserve {
            request_id: id(format!("r{n}")),
            account_id,
            order_id,
            kind: ReservationKind::Cash,
            asset: usd,
            amount: Decimal::new(10_050, 2),
            expires_at_ms: None,
        }),
        1 => Command::Fill(Fill {
            event_id: id(format!("f{n}")),
            account_id,
            order_id,
            symbol: Asset::symbol("ACME").unwrap(),
            side: Side::Buy,
            quantity: Decimal::from(5),
            price: Decimal::from(10),
            filled_amount: Decimal::from(50),
            currency: None,
            source: None,
        }),
        _ => Command::Unreserve(Unreserve {
            request_id: id(format!("u{n}")),
            account_id,
            order_id,
            amount: None,
        }),
    }
}

#[tokio::main]
async fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(dir.path());
    config.pin_core = false;
    let engine = Engine::start(config.clone(), Metrics::new()).unwrap();
    serving(&engine).await;
    let usd = Asset::currency("USD").unwrap();
    let h = engine.handle();
    for a in 1..=ACCOUNTS {
        let open = Command::OpenAccount(OpenAccount {
            request_id: id(format!("a{a}")),
            account_id: AccountId(a as i64),
            base_currency: usd,
        });
        h.call(RequestKind::Command(open, Want::Nothing))
            .await
            .unwrap();
        let fund = Command::Deposit(CashMovement {
            event_id: id(format!("d{a}")),
            account_id: AccountId(a as i64),
            currency: usd,
            amount: Decimal::from(1_000_000_000),
            source: None,
        });
        h.call(RequestKind::Command(fund, Want::Nothing))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut n = 0;
    while n < records {
        let wave: Vec<_> = (n..(n + 2_000).min(records))
            .map(|i| {
                h.submit(RequestKind::Command(command(i), Want::Nothing))
                    .unwrap()
            })
            .collect();
        n += wave.len() as u64;
        for p in wave {
            p.await.unwrap();
        }
    }
    let write_s = started.elapsed().as_secs_f64();
    engine.stop().unwrap();

    let metrics = Metrics::new();
    let started = Instant::now();
    let engine = Engine::start(config, metrics.clone()).unwrap();
    serving(&engine).await;
    let restart_s = started.elapsed().as_secs_f64();
    let replayed = metrics.replay_records.get();
    engine.stop().unwrap();
    println!(
        "{{\"mode\":\"replay\",\"records\":{replayed},\"write_s\":{write_s:.2},\"restart_to_serving_s\":{restart_s:.3},\"replay_records_per_s\":{:.0}}}",
        replayed as f64 / restart_s
    );
}

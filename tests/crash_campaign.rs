//! Crash campaign: cycles of mixed concurrent load (reserves, unreserves,
//! fills, deposits on a few accounts) against the real binary with 1 MiB WAL
//! segments and PostgreSQL snapshots every 50 ms, each ended by kill -9.
//! After every restart:
//! * every acknowledged write, sent again, replays its original result and
//!   sequence (`replayed`);
//! * the writes that were in flight at the kill are sent again: each is then
//!   applied exactly once (idempotency);
//! * money is conserved per account (available + reserved = the deposits
//!   applied less the fills bought), `reserved` equals the open reservations,
//!   and the shares held equal the fills applied.
//!
//! `CRASH_CYCLES` sets the number of cycles (default 5, in the suite). The long
//! campaign: `CRASH_CYCLES=50 cargo test --release --test crash_campaign -- --nocapture`.

mod common;

use account_service::proto::account::v1 as pb;
use account_service::proto::account::v1::account_service_client::AccountServiceClient;
use account_service::proto::account::v1::admin_service_client::AdminServiceClient;
use account_service::proto::events;
use common::postgres::Postgres;
use common::server::Server;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

const ACCOUNTS: i64 = 4;
const WORKERS: usize = 16;
/// Acknowledged writes per cycle before the kill.
const ACKS_PER_CYCLE: usize = 1_500;

/// One write, as sent (so it can be sent again).
#[derive(Clone, Debug)]
enum Write {
    Reserve(pb::ReserveRequest),
    Unreserve(pb::UnreserveRequest),
    Deposit(events::DepositEvent),
    Fill(events::FillEvent),
}

/// What a write answered: result and sequence.
type Answer = (i32, u64);

async fn send(
    accounts: &mut AccountServiceClient<Channel>,
    admin: &mut AdminServiceClient<Channel>,
    write: &Write,
) -> Result<(Answer, bool), tonic::Status> {
    Ok(match write {
        Write::Reserve(r) => {
            let a = accounts.reserve(r.clone()).await?.into_inner();
            ((a.result, a.sequence), a.replayed)
        }
        Write::Unreserve(r) => {
            let a = accounts.unreserve(r.clone()).await?.into_inner();
            ((a.result, a.sequence), a.replayed)
        }
        Write::Deposit(d) => {
            let a = admin.deposit(d.clone()).await?.into_inner();
            ((a.result, a.sequence), a.replayed)
        }
        Write::Fill(f) => {
            let a = admin.apply_fill(f.clone()).await?.into_inner();
            ((a.result, a.sequence), a.replayed)
        }
    })
}

/// Everything the campaign sent: answered writes and the ones cut by a kill.
#[derive(Default)]
struct Ledger {
    answered: Vec<(Write, Answer)>,
    in_flight: Vec<Write>,
}

/// The `n`-th write of `worker` in cycle `cycle`: mostly reserves and
/// unreserves of its own earlier orders, some deposits.
fn next_write(cycle: usize, worker: usize, n: usize, reserved: &mut Vec<(i64, String)>) -> Write {
    let account_id = 1 + ((worker + n) as i64 % ACCOUNTS);
    let key = format!("c{cycle}-w{worker}-n{n}");
    match n % 5 {
        0 => Write::Deposit(events::DepositEvent {
            event_id: format!("dep-{key}"),
            account_id,
            amount: "3".into(),
            currency: "USD".into(),
            ..Default::default()
        }),
        4 if !reserved.is_empty() => {
            // The exchange filled one of its open orders: 1 share at 1 USD.
            let (account_id, order_id) = reserved.swap_remove(n % reserved.len());
            Write::Fill(events::FillEvent {
                event_id: format!("fill-{key}"),
                account_id,
                order_id,
                symbol: "ACME".into(),
                side: "BUY".into(),
                fill_price: "1".into(),
                quantity: "1".into(),
                filled_amount: "1".into(),
                ..Default::default()
            })
        }
        1 | 3 if !reserved.is_empty() => {
            let (account_id, order_id) = reserved.swap_remove(n % reserved.len());
            Write::Unreserve(pb::UnreserveRequest {
                request_id: format!("unr-{key}"),
                account_id,
                order_id,
                amount: String::new(),
            })
        }
        _ => {
            let order_id = format!("ord-{key}");
            reserved.push((account_id, order_id.clone()));
            Write::Reserve(pb::ReserveRequest {
                request_id: format!("res-{key}"),
                account_id,
                order_id,
                kind: pb::ReservationKind::Cash as i32,
                asset: "USD".into(),
                amount: "1".into(),
                expires_at_ms: 0,
            })
        }
    }
}

/// Runs the mixed load until `ACKS_PER_CYCLE` writes are answered, then kills
/// the server; returns what was answered and what was cut.
async fn cycle(server: &mut Server, cycle: usize) -> Ledger {
    let channel = server.channel().await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let answered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (ledger, answered) = (ledger.clone(), answered.clone());
            let mut accounts = AccountServiceClient::new(channel.clone());
            let mut admin = AdminServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut reserved = Vec::new();
                for n in 0..10_000 {
                    let write = next_write(cycle, worker, n, &mut reserved);
                    match send(&mut accounts, &mut admin, &write).await {
                        Ok((answer, _)) => {
                            // Only orders actually reserved are filled later.
                            if let Write::Reserve(r) = &write {
                                if answer.0 != pb::Result::Ok as i32 {
                                    reserved.retain(|(_, o)| *o != r.order_id);
                                }
                            }
                            ledger.lock().unwrap().answered.push((write, answer));
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            ledger.lock().unwrap().in_flight.push(write);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    while answered.load(Ordering::Relaxed) < ACKS_PER_CYCLE {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(ledger)
        .ok()
        .expect("workers are done")
        .into_inner()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_cycles_under_mixed_load_keep_every_acknowledged_write_and_the_money() {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let args = [
        "--wal-segment-mib",
        "1",
        "--postgres-url",
        url.as_str(),
        "--snapshot-interval-ms",
        "50",
    ];
    {
        let server = Server::start(dir.path(), &args).await;
        let mut admin = server.admin().await;
        for account_id in 1..=ACCOUNTS {
            admin
                .open_account(pb::OpenAccountRequest {
                    request_id: format!("open-{account_id}"),
                    account_id,
                    base_currency: "USD".into(),
                })
                .await
                .unwrap();
        }
    }
    let mut history: Vec<(Write, Answer)> = Vec::new();
    for c in 0..cycles {
        let mut server = Server::start(dir.path(), &args).await;
        let ledger = cycle(&mut server, c).await;
        let server = Server::start(dir.path(), &args).await;
        let channel = server.channel().await;
        let mut accounts = AccountServiceClient::new(channel.clone());
        let mut admin = AdminServiceClient::new(channel);
        // Every acknowledged write of this cycle replays its original answer.
        for (write, answer) in &ledger.answered {
            let (again, replayed) = send(&mut accounts, &mut admin, write).await.unwrap();
            assert!(replayed, "cycle {c}: {write:?} not a replay");
            assert_eq!(again, *answer, "cycle {c}: {write:?}");
        }
        let (acked, cut) = (ledger.answered.len(), ledger.in_flight.len());
        // What the kill cut is applied exactly once when sent again.
        let mut retried = Vec::new();
        for write in ledger.in_flight {
            let (answer, _) = send(&mut accounts, &mut admin, &write).await.unwrap();
            retried.push((write, answer));
        }
        history.extend(ledger.answered);
        history.extend(retried);
        check_money(&mut accounts, &history, c).await;
        let fills = history
            .iter()
            .filter(|(w, (result, _))| {
                matches!(w, Write::Fill(_)) && *result == pb::Result::Ok as i32
            })
            .count();
        eprintln!(
            "cycle {c}: {acked} acknowledged and {cut} in flight at the kill; restart ok, every acknowledged \
             write replayed, money conserved; {} writes so far ({fills} fills), {} WAL segments, snapshot at {}",
            history.len(),
            common::server::wal_segments(dir.path()),
            pg.snapshot_sequence().await
        );
    }
    assert!(pg.snapshot_sequence().await > 0, "snapshots were on");
}

/// Per account: available + reserved = the deposits applied less the fills
/// bought; reserved = the open reservations (1 each); shares = the fills.
async fn check_money(
    accounts: &mut AccountServiceClient<Channel>,
    history: &[(Write, Answer)],
    cycle: usize,
) {
    let ok = pb::Result::Ok as i32;
    // Deposits less what fills bought, and the shares they bought.
    let mut deposited: HashMap<i64, Decimal> = HashMap::new();
    let mut shares: HashMap<i64, Decimal> = HashMap::new();
    let mut orders: BTreeMap<(i64, String), bool> = BTreeMap::new();
    for (write, (result, _)) in history {
        match write {
            Write::Deposit(d) if *result == ok => {
                *deposited.entry(d.account_id).or_default() += Decimal::from(3);
            }
            Write::Reserve(r) if *result == ok => {
                orders.insert((r.account_id, r.order_id.clone()), true);
            }
            Write::Unreserve(r) if *result == ok => {
                if let Some(open) = orders.get_mut(&(r.account_id, r.order_id.clone())) {
                    *open = false;
                }
            }
            Write::Fill(f) if *result == ok => {
                *deposited.entry(f.account_id).or_default() -= Decimal::ONE;
                *shares.entry(f.account_id).or_default() += Decimal::ONE;
                if let Some(open) = orders.get_mut(&(f.account_id, f.order_id.clone())) {
                    *open = false;
                }
            }
            _ => {}
        }
    }
    for account_id in 1..=ACCOUNTS {
        let a = accounts
            .get_account(pb::GetAccountRequest { account_id })
            .await
            .unwrap()
            .into_inner();
        let (available, reserved) = a.cash.first().map_or((Decimal::ZERO, Decimal::ZERO), |c| {
            (c.available.parse().unwrap(), c.reserved.parse().unwrap())
        });
        let open = orders
            .iter()
            .filter(|((id, _), open)| *id == account_id && **open)
            .count();
        assert_eq!(
            available + reserved,
            deposited.get(&account_id).copied().unwrap_or_default(),
            "cycle {cycle}: account {account_id} money"
        );
        assert_eq!(
            reserved,
            Decimal::from(open),
            "cycle {cycle}: account {account_id} reserved = its open reservations"
        );
        assert!(available >= Decimal::ZERO);
        let held = a
            .positions
            .iter()
            .find(|p| p.symbol == "ACME")
            .map_or(Decimal::ZERO, |p| p.quantity.parse().unwrap());
        assert_eq!(
            held,
            shares.get(&account_id).copied().unwrap_or_default(),
            "cycle {cycle}: account {account_id} shares = the fills applied"
        );
        assert!(
            !a.overdrawn,
            "cycle {cycle}: account {account_id} overdrawn"
        );
    }
}

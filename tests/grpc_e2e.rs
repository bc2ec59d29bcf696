//! End to end against the real binary: the Order service's path, restarts
//! (graceful and kill -9), idempotent retries across a restart, bad input.

mod common;

use account_service::proto::account::v1 as pb;
use account_service::proto::events;
use common::server::Server;
use tonic::Code;

fn open(request_id: &str, account_id: i64) -> pb::OpenAccountRequest {
    pb::OpenAccountRequest {
        request_id: request_id.into(),
        account_id,
        base_currency: "USD".into(),
    }
}

fn deposit(event_id: &str, account_id: i64, amount: &str) -> events::DepositEvent {
    events::DepositEvent {
        event_id: event_id.into(),
        account_id,
        currency: "USD".into(),
        amount: amount.into(),
        timestamp: 0,
        source: String::new(),
    }
}

fn reserve(request_id: &str, account_id: i64, order_id: &str, amount: &str) -> pb::ReserveRequest {
    pb::ReserveRequest {
        request_id: request_id.into(),
        account_id,
        order_id: order_id.into(),
        kind: pb::ReservationKind::Cash as i32,
        asset: "USD".into(),
        amount: amount.into(),
        expires_at_ms: 0,
    }
}

fn fill(
    event_id: &str,
    account_id: i64,
    order_id: &str,
    side: &str,
    qty: &str,
    price: &str,
    amount: &str,
) -> events::FillEvent {
    events::FillEvent {
        event_id: event_id.into(),
        order_id: order_id.into(),
        account_id,
        symbol: "ACME".into(),
        side: side.into(),
        quantity: qty.into(),
        fill_price: price.into(),
        filled_amount: amount.into(),
        timestamp: 0,
        currency: String::new(),
    }
}

#[tokio::test]
async fn order_lifecycle_and_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let mut admin = server.admin().await;
    let mut accounts = server.accounts().await;

    let r = admin
        .open_account(open("open-1", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::Result::Ok as i32);
    admin.deposit(deposit("dep-1", 1, "10000")).await.unwrap();
    let r = accounts
        .reserve(reserve("res-1", 1, "ord-1", "1010"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::Result::Ok as i32);
    assert_eq!(
        (r.available.as_str(), r.reserved.as_str()),
        ("8990", "1010")
    );
    let res = r.reservation.unwrap();
    assert_eq!(res.state, pb::ReservationState::Open as i32);
    assert_eq!(res.remaining, "1010");

    let f = admin
        .apply_fill(fill("fill-1", 1, "ord-1", "BUY", "10", "100", "1000"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.result, pb::Result::Ok as i32);
    let u = accounts
        .unreserve(pb::UnreserveRequest {
            request_id: "unr-1".into(),
            account_id: 1,
            order_id: "ord-1".into(),
            amount: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.released, "10");
    let a = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.cash[0].available, "9000");
    assert_eq!(a.cash[0].reserved, "0");
    assert_eq!(a.positions[0].quantity, "10");
    assert_eq!(a.positions[0].cost_basis, "1000");
    assert_eq!(a.positions[0].average_price, "100");
    let before = a.clone();

    assert!(server.terminate().success(), "SIGTERM exits 0");
    let server = Server::start(dir.path(), &[]).await;
    let mut accounts = server.accounts().await;
    let after = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);
    let missing = accounts
        .get_account(pb::GetAccountRequest { account_id: 2 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let res = accounts
        .get_reservation(pb::GetReservationRequest {
            account_id: 1,
            order_id: "ord-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.state, pb::ReservationState::Released as i32);
    assert_eq!(
        (res.consumed.as_str(), res.released.as_str()),
        ("1000", "10")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_write_and_retries_replay() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let mut admin = server.admin().await;
    admin.open_account(open("open-1", 1)).await.unwrap();
    admin.deposit(deposit("dep-1", 1, "1000000")).await.unwrap();

    // 16 concurrent clients reserve in a loop; kill -9 once 500 are
    // acknowledged, with more in flight.
    let acknowledged = common::server::reserve_until_kill9(&mut server, 16, 500, |i| {
        reserve(&format!("req-{i}"), 1, &format!("ord-{i}"), "1.5")
    })
    .await;

    let server = Server::start(dir.path(), &[]).await;
    let mut accounts = server.accounts().await;
    common::server::assert_reservations_survived(&mut accounts, &acknowledged).await;
    // A retry of an acknowledged request answers the original, marked replayed.
    let (i, sequence) = acknowledged[acknowledged.len() / 2];
    let retry = accounts
        .reserve(reserve(&format!("req-{i}"), 1, &format!("ord-{i}"), "1.5"))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.sequence, sequence);
    // Balances agree with what survived: reserved = 1.5 x surviving reservations.
    let (available, reserved) = common::server::first_cash(&mut accounts, 1).await;
    assert_eq!(reserved + available, rust_decimal::Decimal::from(1_000_000));
    assert!(
        reserved
            >= rust_decimal::Decimal::new(15, 1) * rust_decimal::Decimal::from(acknowledged.len())
    );
}

/// Every malformed field of every RPC is INVALID_ARGUMENT naming the field,
/// and nothing is journaled (the state sequence does not move).
#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut admin = server.admin().await;
    let mut accounts = server.accounts().await;
    admin.open_account(open("open-1", 1)).await.unwrap();
    admin.deposit(deposit("dep-1", 1, "100")).await.unwrap();
    let state = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .unwrap()
        .into_inner();

    fn check(field: &str, r: Result<impl std::fmt::Debug, tonic::Status>) {
        let e = r.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            e.message()
        );
    }

    let long = "x".repeat(65);
    let cases: Vec<(&str, pb::ReserveRequest)> = vec![
        (
            "request_id",
            pb::ReserveRequest {
                request_id: String::new(),
                ..reserve("r", 1, "o", "1")
            },
        ),
        (
            "request_id",
            pb::ReserveRequest {
                request_id: long.clone(),
                ..reserve("r", 1, "o", "1")
            },
        ),
        ("request_id", reserve("r\n1", 1, "o", "1")),
        ("order_id", reserve("r", 1, "o\u{7f}", "1")),
        ("account_id", reserve("r", 0, "o", "1")),
        ("account_id", reserve("r", -5, "o", "1")),
        ("order_id", reserve("r", 1, "", "1")),
        (
            "kind",
            pb::ReserveRequest {
                kind: 0,
                ..reserve("r", 1, "o", "1")
            },
        ),
        (
            "asset",
            pb::ReserveRequest {
                asset: "usd".into(),
                ..reserve("r", 1, "o", "1")
            },
        ),
        (
            "asset",
            pb::ReserveRequest {
                kind: 2,
                asset: "bad sym".into(),
                ..reserve("r", 1, "o", "1")
            },
        ),
        ("amount", reserve("r", 1, "o", "0")),
        ("amount", reserve("r", 1, "o", "1e3")),
        ("amount", reserve("r", 1, "o", "-1")),
        ("amount", reserve("r", 1, "o", "1.123456789")),
        ("amount", reserve("r", 1, "o", "1234567890123456789")),
        (
            "expires_at_ms",
            pb::ReserveRequest {
                expires_at_ms: 1_000,
                ..reserve("r", 1, "o", "1")
            },
        ),
    ];
    for (field, request) in cases {
        check(field, accounts.reserve(request).await);
    }
    let unreserve = |amount: &str, order: &str| pb::UnreserveRequest {
        request_id: "u".into(),
        account_id: 1,
        order_id: order.into(),
        amount: amount.into(),
    };
    check("amount", accounts.unreserve(unreserve("0", "o")).await);
    check("order_id", accounts.unreserve(unreserve("", &long)).await);
    check(
        "account_id",
        accounts
            .get_account(pb::GetAccountRequest { account_id: 0 })
            .await,
    );
    check(
        "order_id",
        accounts
            .get_reservation(pb::GetReservationRequest {
                account_id: 1,
                order_id: String::new(),
            })
            .await,
    );
    check(
        "base_currency",
        admin
            .open_account(pb::OpenAccountRequest {
                base_currency: "US".into(),
                ..open("x", 2)
            })
            .await,
    );
    check(
        "status",
        admin
            .set_account_status(pb::SetAccountStatusRequest {
                request_id: "s".into(),
                account_id: 1,
                status: 0,
                reason: String::new(),
            })
            .await,
    );
    check(
        "currency",
        admin
            .deposit(events::DepositEvent {
                currency: "usd".into(),
                ..deposit("d", 1, "1")
            })
            .await,
    );
    check("amount", admin.deposit(deposit("d", 1, "")).await);
    check(
        "event_id",
        admin
            .withdraw(events::WithdrawEvent {
                event_id: String::new(),
                account_id: 1,
                currency: "USD".into(),
                amount: "1".into(),
                timestamp: 0,
                destination: String::new(),
            })
            .await,
    );
    check(
        "side",
        admin
            .apply_fill(fill("f", 1, "o", "HOLD", "1", "1", "1"))
            .await,
    );
    check(
        "filled_amount",
        admin
            .apply_fill(fill("f", 1, "o", "BUY", "3", "1.5", "4.4"))
            .await,
    );
    check(
        "quantity",
        admin
            .apply_fill(fill("f", 1, "o", "BUY", "0", "1.5", "0"))
            .await,
    );

    let after = accounts
        .get_account(pb::GetAccountRequest { account_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state, after, "nothing journaled for bad input");
}

#[tokio::test]
async fn business_rejections_are_results_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut admin = server.admin().await;
    let mut accounts = server.accounts().await;
    let r = accounts
        .reserve(reserve("r0", 7, "o", "1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::Result::AccountNotFound as i32);
    admin.open_account(open("open-7", 7)).await.unwrap();
    let r = accounts
        .reserve(reserve("r1", 7, "o", "1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::Result::InsufficientFunds as i32);
    let again = accounts
        .reserve(reserve("r1", 7, "o", "1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed && again.result == pb::Result::InsufficientFunds as i32);
    let conflict = accounts
        .reserve(reserve("r1", 7, "o", "2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conflict.result, pb::Result::IdempotencyConflict as i32);
    let other = admin
        .open_account(pb::OpenAccountRequest {
            base_currency: "EUR".into(),
            ..open("open-7b", 7)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.result, pb::Result::AccountAlreadyExists as i32);

    // Design 3: a retry replays its original reply even once its expiry has
    // passed; a new Reserve with that expiry is RESULT_EXPIRY_PASSED.
    admin.deposit(deposit("dep-7", 7, "100")).await.unwrap();
    let expires_at_ms = account_service::engine::now_ms() + 200;
    let expiring = |request_id: &str, order_id: &str| pb::ReserveRequest {
        expires_at_ms,
        ..reserve(request_id, 7, order_id, "10")
    };
    let first = accounts
        .reserve(expiring("r2", "o2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.result, pb::Result::Ok as i32);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let retry = accounts
        .reserve(expiring("r2", "o2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retry.result, retry.replayed, retry.sequence),
        (pb::Result::Ok as i32, true, first.sequence)
    );
    let late = accounts
        .reserve(expiring("r3", "o3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (late.result, late.replayed),
        (pb::Result::ExpiryPassed as i32, false)
    );
}

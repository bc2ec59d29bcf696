//! One test per domain rule (design section 3), with hand-computed decimals.

mod common;

use account_service::domain::*;
use account_service::state_machine::{EventKind, Outcome, ReservationState, ResultCode};
use common::*;

/// The state's amounts are compared with hand-computed ones.
fn d(s: &str) -> Amount {
    common::kept(s)
}

fn cash(h: &Harness, account: i64) -> (Amount, Amount) {
    let b = h
        .state
        .account(AccountId(account))
        .unwrap()
        .cash(usd())
        .unwrap();
    (b.available, b.reserved)
}

fn position(h: &Harness, account: i64, symbol: &str) -> account_service::state_machine::Position {
    *h.state
        .account(AccountId(account))
        .unwrap()
        .position(sym(symbol))
        .unwrap()
}

#[test]
fn open_account_is_idempotent_by_currency() {
    let mut h = Harness::new();
    assert_eq!(h.run(open("a", 1, usd())).result, ResultCode::Ok);
    assert_eq!(h.events[0].kind, EventKind::AccountOpened);
    assert_eq!(h.run(open("b", 1, usd())).result, ResultCode::Ok);
    assert!(h.events.is_empty(), "re-opening changes nothing");
    assert_eq!(
        h.run(open("c", 1, eur())).result,
        ResultCode::AccountAlreadyExists
    );
}

#[test]
fn reserve_cash_moves_available_to_reserved() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "1000.50");
    let o = h.run(reserve_cash("r1", 1, "o1", "250.25"));
    assert_eq!(o.result, ResultCode::Ok);
    assert_eq!((o.available, o.reserved), (d("750.25"), d("250.25")));
    assert_eq!(cash(&h, 1), (d("750.25"), d("250.25")));
    let r = h.state.reservation(AccountId(1), &id("o1")).unwrap();
    assert_eq!(r.state, ReservationState::Open);
    assert_eq!(r.remaining, d("250.25"));
    assert_eq!(h.events[0].kind, EventKind::Reserved);
}

#[test]
fn reserve_rejections() {
    let mut h = Harness::new();
    assert_eq!(
        h.run(reserve_cash("r0", 9, "o", "1")).result,
        ResultCode::AccountNotFound
    );
    h.open(1);
    h.deposit("d1", 1, "100");
    assert_eq!(
        h.run(reserve_cash("r1", 1, "o1", "100.00000001")).result,
        ResultCode::InsufficientFunds
    );
    assert_eq!(
        h.run(reserve_cash("r2", 1, "o1", "60")).result,
        ResultCode::Ok
    );
    assert_eq!(
        h.run(reserve_cash("r3", 1, "o1", "1")).result,
        ResultCode::OrderAlreadyReserved
    );
    assert_eq!(
        h.run(reserve_shares("r4", 1, "o2", "ACME", "1")).result,
        ResultCode::InsufficientPosition
    );
    let no_euros = reserve("r5", 1, "o3", ReservationKind::Cash, eur(), "1", None);
    assert_eq!(h.run(no_euros).result, ResultCode::InsufficientFunds);
    h.run(status("s1", 1, AccountStatus::Suspended));
    assert_eq!(
        h.run(reserve_cash("r6", 1, "o4", "1")).result,
        ResultCode::AccountNotActive
    );
    // Rejections change nothing.
    assert_eq!(cash(&h, 1), (d("40"), d("60")));
}

#[test]
fn unreserve_partial_then_rest() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    h.run(reserve_cash("r1", 1, "o1", "80"));
    let o = h.run(unreserve("u1", 1, "o1", Some("30.5")));
    assert_eq!((o.result, o.released), (ResultCode::Ok, d("30.5")));
    assert_eq!(cash(&h, 1), (d("50.5"), d("49.5")));
    assert_eq!(
        h.run(unreserve("u2", 1, "o1", Some("49.50000001"))).result,
        ResultCode::AmountExceedsReservation
    );
    let o = h.run(unreserve("u3", 1, "o1", None));
    assert_eq!(o.released, d("49.5"));
    assert_eq!(cash(&h, 1), (d("100"), d("0")));
    let r = h.state.reservation(AccountId(1), &id("o1")).unwrap();
    assert_eq!(
        (r.state, r.released, r.remaining),
        (ReservationState::Released, d("80"), d("0"))
    );
    // A closed reservation: OK, released 0; its order id stays taken.
    let o = h.run(unreserve("u4", 1, "o1", None));
    assert_eq!((o.result, o.released), (ResultCode::Ok, d("0")));
    assert_eq!(
        h.run(reserve_cash("r2", 1, "o1", "1")).result,
        ResultCode::OrderAlreadyReserved
    );
    assert_eq!(
        h.run(unreserve("u5", 1, "nope", None)).result,
        ResultCode::ReservationNotFound
    );
}

#[test]
fn buy_fill_consumes_reservation_and_builds_position() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "10000");
    h.run(reserve_cash("r1", 1, "o1", "1010")); // 10 x 100 + 10 fee
    let o = h.run(fill("f1", 1, "o1", "ACME", Side::Buy, "4", "100.25"));
    assert_eq!(o.result, ResultCode::Ok);
    // 4 x 100.25 = 401 consumed from the 1010 reserved
    assert_eq!(cash(&h, 1), (d("8990"), d("609")));
    h.run(fill("f2", 1, "o1", "ACME", Side::Buy, "6", "99.5")); // 597
    assert_eq!(cash(&h, 1), (d("8990"), d("12")));
    let p = position(&h, 1, "ACME");
    assert_eq!((p.quantity, p.cost_basis), (d("10"), d("998")));
    assert_eq!(p.average_price(), common::d("99.8"));
    // The order ends: the 12 left (fee estimate) comes back.
    let o = h.run(unreserve("u1", 1, "o1", None));
    assert_eq!(o.released, d("12"));
    assert_eq!(cash(&h, 1), (d("9002"), d("0")));
    let r = h.state.reservation(AccountId(1), &id("o1")).unwrap();
    assert_eq!((r.consumed, r.released), (d("998"), d("12")));
}

#[test]
fn sell_fill_consumes_shares_and_books_pnl() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "1000");
    h.run(fill("f1", 1, "b1", "ACME", Side::Buy, "10", "50")); // no reservation: from available
    assert_eq!(cash(&h, 1), (d("500"), d("0")));
    h.run(reserve_shares("r1", 1, "s1", "ACME", "6"));
    assert_eq!(position(&h, 1, "ACME").reserved_quantity, d("6"));
    h.run(fill("f2", 1, "s1", "ACME", Side::Sell, "6", "55"));
    let p = position(&h, 1, "ACME");
    assert_eq!((p.quantity, p.reserved_quantity), (d("4"), d("0")));
    assert_eq!((p.cost_basis, p.realized_pnl), (d("200"), d("30")));
    assert_eq!(cash(&h, 1), (d("830"), d("0")));
    assert_eq!(
        h.state.reservation(AccountId(1), &id("s1")).unwrap().state,
        ReservationState::Consumed
    );
    // Sold to zero: cost basis exactly zero.
    h.run(fill("f3", 1, "s2", "ACME", Side::Sell, "4", "45"));
    let p = position(&h, 1, "ACME");
    assert_eq!(
        (p.quantity, p.cost_basis, p.realized_pnl),
        (d("0"), d("0"), d("10"))
    );
}

#[test]
fn fill_beyond_available_flags_overdrawn_and_deposit_clears_it() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    h.run(reserve_cash("r1", 1, "o1", "100"));
    h.run(fill("f1", 1, "o1", "ACME", Side::Buy, "3", "40")); // 120: 100 reserved + 20 short
    assert_eq!(cash(&h, 1), (d("-20"), d("0")));
    assert!(h.state.account(AccountId(1)).unwrap().overdrawn);
    assert!(h.events.iter().any(|e| e.kind == EventKind::Overdrawn));
    assert_eq!(h.state.overdrawn_accounts(), 1);
    h.deposit("d2", 1, "20");
    assert!(!h.state.account(AccountId(1)).unwrap().overdrawn);
    assert_eq!(h.state.overdrawn_accounts(), 0);
}

#[test]
fn fill_in_another_currency_than_the_position_is_rejected() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    h.run(fill("f1", 1, "o1", "ACME", Side::Buy, "1", "10"));
    let mut f = fill("f2", 1, "o2", "ACME", Side::Buy, "1", "10");
    if let Command::Fill(ref mut x) = f {
        x.currency = Some(eur());
    }
    assert_eq!(h.run(f).result, ResultCode::CurrencyMismatch);
    assert_eq!(position(&h, 1, "ACME").quantity, d("1"));
}

#[test]
fn deposits_and_withdrawals() {
    let mut h = Harness::new();
    assert_eq!(h.deposit("d0", 1, "5").result, ResultCode::AccountNotFound);
    h.open(1);
    h.deposit("d1", 1, "100.10");
    let o = h.run(withdraw("w1", 1, usd(), "100.10000001"));
    assert_eq!(o.result, ResultCode::InsufficientFunds);
    assert_eq!(h.events[0].kind, EventKind::WithdrawalRejected);
    let o = h.run(withdraw("w2", 1, usd(), "0.1"));
    assert_eq!((o.result, o.available), (ResultCode::Ok, d("100")));
    // Suspended: deposits apply, withdrawals do not.
    h.run(status("s", 1, AccountStatus::Suspended));
    assert_eq!(h.deposit("d2", 1, "1").result, ResultCode::Ok);
    assert_eq!(
        h.run(withdraw("w3", 1, usd(), "1")).result,
        ResultCode::AccountNotActive
    );
}

#[test]
fn suspended_account_still_unreserves_and_fills() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    h.run(reserve_cash("r1", 1, "o1", "50"));
    h.run(status("s", 1, AccountStatus::Suspended));
    assert_eq!(
        h.run(fill("f1", 1, "o1", "ACME", Side::Buy, "1", "20"))
            .result,
        ResultCode::Ok
    );
    assert_eq!(h.run(unreserve("u1", 1, "o1", None)).released, d("30"));
}

#[test]
fn closing_needs_everything_at_zero() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "10");
    h.run(reserve_cash("r1", 1, "o1", "10"));
    assert_eq!(
        h.run(status("c1", 1, AccountStatus::Closed)).result,
        ResultCode::AccountNotEmpty
    );
    h.run(unreserve("u1", 1, "o1", None));
    assert_eq!(
        h.run(status("c2", 1, AccountStatus::Closed)).result,
        ResultCode::AccountNotEmpty
    );
    h.run(withdraw("w1", 1, usd(), "10"));
    assert_eq!(
        h.run(status("c3", 1, AccountStatus::Closed)).result,
        ResultCode::Ok
    );
    assert_eq!(
        h.state.account(AccountId(1)).unwrap().status,
        AccountStatus::Closed
    );
    assert_eq!(h.deposit("d2", 1, "1").result, ResultCode::AccountNotActive);
}

#[test]
fn idempotency_replays_and_conflicts() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    let first = h.run(reserve_cash("r1", 1, "o1", "10"));
    let again = h.run(reserve_cash("r1", 1, "o1", "10"));
    assert!(again.replayed && !first.replayed);
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(
        (again.available, again.reserved),
        (first.available, first.reserved)
    );
    assert!(h.events.is_empty(), "a replay produces no event");
    assert_eq!(cash(&h, 1), (d("90"), d("10")));
    let conflict = h.run(reserve_cash("r1", 1, "o1", "11"));
    assert_eq!(conflict.result, ResultCode::IdempotencyConflict);
    // A rejection replays as the same rejection, even once it would succeed.
    let rejected = h.run(reserve_cash("r2", 1, "o2", "1000"));
    assert_eq!(rejected.result, ResultCode::InsufficientFunds);
    h.deposit("d2", 1, "5000");
    let replay = h.run(reserve_cash("r2", 1, "o2", "1000"));
    assert_eq!(
        (replay.result, replay.replayed, replay.sequence),
        (ResultCode::InsufficientFunds, true, rejected.sequence)
    );
    // Same amount written differently is the same payload.
    assert!(h.run(reserve_cash("r1", 1, "o1", "10.000")).replayed);
    // Event ids share one table across deposits, withdrawals and fills.
    assert_eq!(
        h.run(withdraw("d1", 1, usd(), "100")).result,
        ResultCode::IdempotencyConflict
    );
}

#[test]
fn request_ids_and_event_ids_never_collide() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    let reserved = h.run(reserve_cash("same", 1, "o1", "10"));
    assert_eq!(reserved.result, ResultCode::Ok);
    // The Payment service's event id equals the Order service's request id.
    let deposited = h.run(deposit("same", 1, usd(), "5"));
    assert_eq!(
        (deposited.result, deposited.replayed),
        (ResultCode::Ok, false)
    );
    assert_eq!(cash(&h, 1), (d("95"), d("10")));
    // Each still replays within its own space.
    let again = h.run(reserve_cash("same", 1, "o1", "10"));
    assert!(again.replayed);
    assert_eq!(again.sequence, reserved.sequence);
    let again = h.run(deposit("same", 1, usd(), "5"));
    assert!(again.replayed);
    assert_eq!(again.sequence, deposited.sequence);
    // And conflicts within its own space only.
    assert_eq!(
        h.run(withdraw("same", 1, usd(), "5")).result,
        ResultCode::IdempotencyConflict
    );
    assert_eq!(
        h.run(unreserve("same", 1, "o1", None)).result,
        ResultCode::IdempotencyConflict
    );
    assert_eq!(cash(&h, 1), (d("95"), d("10")));
    let spaces: Vec<_> = h
        .state
        .idempotency_entries()
        .filter(|(k, _)| k.id == id("same"))
        .map(|(k, _)| k.space)
        .collect();
    assert_eq!(spaces, [KeySpace::Requests, KeySpace::Events]);
}

#[test]
fn expiry_by_journaled_tick() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    let at = h.now_ms + 1_000;
    h.run(reserve(
        "r1",
        1,
        "o1",
        ReservationKind::Cash,
        usd(),
        "40",
        Some(at),
    ));
    assert_eq!(h.state.next_deadline_ms(), Some(at));
    h.now_ms = at - 1;
    h.run(Command::Tick);
    assert_eq!(cash(&h, 1), (d("60"), d("40")));
    h.now_ms = at;
    h.run(Command::Tick);
    assert_eq!(cash(&h, 1), (d("100"), d("0")));
    assert_eq!(h.events[0].kind, EventKind::ReservationExpired);
    assert_eq!(h.events[0].amount, d("40"));
    let r = h.state.reservation(AccountId(1), &id("o1")).unwrap();
    assert_eq!((r.state, r.released), (ReservationState::Expired, d("40")));
}

#[test]
fn keys_and_closed_reservations_leave_after_the_window() {
    let window = 60_000;
    let mut h = Harness::with_config(account_service::state_machine::StateConfig {
        idempotency_window_ms: window,
        tick_work_max: 10_000,
    });
    h.open(1);
    h.deposit("d1", 1, "100");
    h.run(reserve_cash("r1", 1, "o1", "10"));
    h.run(unreserve("u1", 1, "o1", None));
    h.now_ms += window - 1;
    h.run(Command::Tick);
    assert!(
        h.run(reserve_cash("r1", 1, "o1", "10")).replayed,
        "still in the window"
    );
    h.now_ms += 2;
    h.run(Command::Tick);
    assert!(h.state.reservation(AccountId(1), &id("o1")).is_none());
    let fresh = h.run(reserve_cash("r1", 1, "o1", "10"));
    assert!(
        !fresh.replayed && fresh.result.is_ok(),
        "the key and the order id are free again"
    );
}

#[test]
fn redelivered_kafka_offset_changes_nothing() {
    let mut h = Harness::new();
    h.open(1);
    let source = Some(Source {
        topic: Topic::Deposits,
        partition: 0,
        offset: 5,
    });
    let mut dep = deposit("k1", 1, usd(), "10");
    if let Command::Deposit(ref mut c) = dep {
        c.source = source;
    }
    assert!(!h.run(dep).replayed);
    // A different event at an offset already applied (a redelivery): skipped.
    let mut again = deposit("k2", 1, usd(), "10");
    if let Command::Deposit(ref mut c) = again {
        c.source = source;
    }
    assert!(h.run(again).replayed);
    assert_eq!(cash(&h, 1), (d("10"), d("0")));
    assert_eq!(h.state.offset(Topic::Deposits, 0), Some(5));
}

/// Found by the property test: cash released by an unreserve or an expiry can
/// cover a negative balance, and must clear the overdrawn flag.
#[test]
fn released_cash_clears_overdrawn() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "10");
    h.run(reserve_cash("r1", 1, "o1", "5"));
    h.run(fill("f1", 1, "o2", "ACME", Side::Buy, "1", "7")); // no reservation: 5 - 7 = -2
    assert!(h.state.account(AccountId(1)).unwrap().overdrawn);
    h.run(unreserve("u1", 1, "o1", None)); // +5 -> 3
    assert!(!h.state.account(AccountId(1)).unwrap().overdrawn);
    assert_eq!(h.state.overdrawn_accounts(), 0);
}

/// Design 3: the replay check comes before every other check.
#[test]
fn a_retried_reserve_replays_whatever_happened_since() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    let at = h.now_ms + 1_000;
    let expiring = reserve("r1", 1, "o1", ReservationKind::Cash, usd(), "10", Some(at));
    let consumed = reserve_cash("r2", 1, "o2", "20");
    let suspended = reserve_cash("r3", 1, "o3", "30");
    let originals = [h.run(expiring), h.run(consumed), h.run(suspended)];
    assert!(originals.iter().all(|o| o.result == ResultCode::Ok));

    // The expiry passes (and a tick expires it), a fill consumes o2, the
    // account is suspended.
    h.now_ms = at + 5;
    h.run(Command::Tick);
    assert_eq!(
        h.state.reservation(AccountId(1), &id("o1")).unwrap().state,
        ReservationState::Expired
    );
    h.run(fill("f1", 1, "o2", "ACME", Side::Buy, "2", "10"));
    assert_eq!(
        h.state.reservation(AccountId(1), &id("o2")).unwrap().state,
        ReservationState::Consumed
    );
    h.run(status("s1", 1, AccountStatus::Suspended));
    let before = cash(&h, 1);

    for (retry, original) in [expiring, consumed, suspended].into_iter().zip(originals) {
        let again = h.run(retry);
        assert!(again.replayed, "{retry:?}");
        assert_eq!(
            again,
            Outcome {
                replayed: true,
                ..original
            }
        );
        assert!(h.events.is_empty());
    }
    assert_eq!(cash(&h, 1), before);
}

#[test]
fn a_new_reserve_whose_expiry_passed_is_refused_and_journaled() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "100");
    let at_now = reserve(
        "r1",
        1,
        "o1",
        ReservationKind::Cash,
        usd(),
        "10",
        Some(h.now_ms),
    );
    let o = h.run(at_now);
    assert_eq!((o.result, o.replayed), (ResultCode::ExpiryPassed, false));
    assert!(h.events.is_empty());
    assert_eq!(cash(&h, 1), (d("100"), d("0")));
    assert!(h.state.reservation(AccountId(1), &id("o1")).is_none());
    // The key is recorded like any rejection: a retry replays the refusal.
    let again = h.run(at_now);
    assert_eq!(
        (again.result, again.replayed, again.sequence),
        (ResultCode::ExpiryPassed, true, o.sequence)
    );
    // One millisecond later than the journaled time is still in the future.
    let later = Some(h.now_ms + 1);
    let ok = h.run(reserve(
        "r2",
        1,
        "o1",
        ReservationKind::Cash,
        usd(),
        "10",
        later,
    ));
    assert_eq!(ok.result, ResultCode::Ok);
}

const MAX: &str = "999999999999999999.99999999";

/// The account's whole state, to show a refused command changed nothing.
fn account_state(h: &Harness, account: i64) -> String {
    format!("{:?}", h.state.account(AccountId(account)).unwrap())
}

#[test]
fn a_deposit_onto_a_near_max_balance_overflows_and_changes_nothing() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "999999999999999999.99999998");
    let before = account_state(&h, 1);
    let o = h.deposit("d2", 1, "0.00000002");
    assert_eq!(o.result, ResultCode::AmountOverflow);
    assert_eq!(o.available, d("999999999999999999.99999998"));
    assert!(h.events.is_empty());
    assert_eq!(account_state(&h, 1), before);
    // Journaled like any rejection: the retry replays the refusal.
    let again = h.deposit("d2", 1, "0.00000002");
    assert_eq!(
        (again.result, again.replayed, again.sequence),
        (ResultCode::AmountOverflow, true, o.sequence)
    );
    // Exactly up to the limit is fine.
    assert_eq!(h.deposit("d3", 1, "0.00000001").available, d(MAX));
}

/// Reserved cash counts: once released it must fit `available`, and an
/// expiry cannot be refused, so a balance's total stays in range.
#[test]
fn reserving_near_max_keeps_the_total_and_releases_always_fit() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, MAX);
    let at = h.now_ms + 1_000;
    let o = h.run(reserve(
        "r1",
        1,
        "o1",
        ReservationKind::Cash,
        usd(),
        MAX,
        Some(at),
    ));
    assert_eq!(
        (o.result, o.available, o.reserved),
        (ResultCode::Ok, d("0"), d(MAX))
    );
    // available 0 + 1 fits, but the total would be MAX + 1.
    let before = account_state(&h, 1);
    assert_eq!(h.deposit("d2", 1, "1").result, ResultCode::AmountOverflow);
    assert_eq!(account_state(&h, 1), before);
    h.now_ms = at;
    h.run(Command::Tick);
    assert_eq!(cash(&h, 1), (d(MAX), d("0")));
    assert_eq!(h.events[0].kind, EventKind::ReservationExpired);
}

#[test]
fn a_buy_fill_whose_cost_basis_would_overflow_changes_nothing() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, MAX);
    h.run(fill(
        "f1",
        1,
        "b1",
        "ACME",
        Side::Buy,
        "1",
        "999999999999999999",
    ));
    assert_eq!(cash(&h, 1), (d("0.99999999"), d("0")));
    h.run(reserve_cash("r1", 1, "b2", "0.5"));
    let before = account_state(&h, 1);
    // Cost basis 999999999999999999 + 1 = 10^18.
    let o = h.run(fill("f2", 1, "b2", "ACME", Side::Buy, "1", "1"));
    assert_eq!(o.result, ResultCode::AmountOverflow);
    assert!(h.events.is_empty());
    assert_eq!(account_state(&h, 1), before);
    let r = h.state.reservation(AccountId(1), &id("b2")).unwrap();
    assert_eq!((r.state, r.remaining), (ReservationState::Open, d("0.5")));
}

#[test]
fn a_sell_fill_whose_pnl_would_overflow_changes_nothing() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "1");
    // Bought 2 for 0.00000002, sold 1 for 999999999999999999: P&L
    // 999999999999999998.99999999 (cost removed 0.00000001).
    h.run(fill("f1", 1, "b1", "ACME", Side::Buy, "2", "0.00000001"));
    h.run(fill(
        "f2",
        1,
        "s1",
        "ACME",
        Side::Sell,
        "1",
        "999999999999999998",
    ));
    h.withdraw_all(1);
    assert_eq!(
        position(&h, 1, "ACME").realized_pnl,
        d("999999999999999997.99999999")
    );
    h.run(reserve_shares("r1", 1, "s2", "ACME", "1"));
    let before = account_state(&h, 1);
    // Selling the last share for 3: P&L + 3 - 0.00000001 > MAX.
    let o = h.run(fill("f3", 1, "s2", "ACME", Side::Sell, "1", "3"));
    assert_eq!(o.result, ResultCode::AmountOverflow);
    assert_eq!(account_state(&h, 1), before);
    assert_eq!(
        h.state
            .reservation(AccountId(1), &id("s2"))
            .unwrap()
            .remaining,
        d("1")
    );
}

#[test]
fn a_sell_fill_whose_proceeds_would_overflow_cash_changes_nothing() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, MAX);
    let before = account_state(&h, 1);
    // An oversell (no shares): the proceeds 1 would take cash past MAX.
    let o = h.run(fill("f1", 1, "s1", "ACME", Side::Sell, "1", "1"));
    assert_eq!(o.result, ResultCode::AmountOverflow);
    assert_eq!(account_state(&h, 1), before);
    assert!(position_absent(&h, 1, "ACME"), "no position row is created");
}

#[test]
fn a_buy_fill_overdrawing_past_the_range_changes_nothing() {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("d1", 1, "1");
    h.run(fill(
        "f1",
        1,
        "b1",
        "ACME",
        Side::Buy,
        "1",
        "999999999999999999",
    ));
    assert_eq!(cash(&h, 1), (d("-999999999999999998"), d("0")));
    let before = account_state(&h, 1);
    // Another 2 below: -1000000000000000000.
    let o = h.run(fill("f2", 1, "b2", "OTHER", Side::Buy, "1", "2"));
    assert_eq!(o.result, ResultCode::AmountOverflow);
    assert_eq!(account_state(&h, 1), before);
}

fn position_absent(h: &Harness, account: i64, symbol: &str) -> bool {
    h.state
        .account(AccountId(account))
        .unwrap()
        .position(sym(symbol))
        .is_none()
}

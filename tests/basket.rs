//! `State::apply_basket`: an all-or-nothing batch of Reserves, one journaled
//! record. Either every item applies exactly as if sent alone, or nothing
//! moves and every key keeps its reply (the failing items' own results, the
//! others LINKED_REQUEST_FAILED), so a retry replays the same replies.

mod common;

use account_service::domain::{Amount, Command, Reserve};
use account_service::state_machine::{invariants, EventKind, Outcome, ResultCode, State};
use common::*;

fn reserve(key: &str, account: i64, order: &str, amount: &str) -> Reserve {
    match reserve_cash(key, account, order, amount) {
        Command::Reserve(r) => r,
        _ => unreachable!(),
    }
}

/// Applies `items` as one basket at the next sequence.
fn basket(h: &mut Harness, items: &[Reserve]) -> Vec<Outcome> {
    let mut out = Vec::new();
    h.events.clear();
    let seq = h.state.last_sequence() + 1;
    h.state
        .apply_basket(items, seq, h.now_ms, &mut h.events, &mut out);
    invariants::check(&h.state).expect("invariants hold after a basket");
    assert_eq!(out.len(), items.len());
    out
}

fn funded(amount: &str) -> Harness {
    let mut h = Harness::new();
    h.open(1);
    h.deposit("dep-1", 1, amount);
    h.open(2);
    h.deposit("dep-2", 2, amount);
    h
}

/// The state's amounts are compared with hand-computed ones.
fn d(s: &str) -> Amount {
    common::kept(s)
}

fn cash(state: &State, account: i64) -> (Amount, Amount) {
    let a = state
        .account(account_service::domain::AccountId(account))
        .unwrap();
    let b = a.cash(usd()).unwrap();
    (b.available, b.reserved)
}

#[test]
fn a_basket_that_fits_applies_every_item_at_one_sequence() {
    let mut h = funded("100");
    let items = [
        reserve("k1", 1, "o1", "30"),
        reserve("k2", 2, "o2", "40"),
        reserve("k3", 1, "o3", "70"),
    ];
    let out = basket(&mut h, &items);
    let seq = h.state.last_sequence();
    for o in &out {
        assert_eq!(o.result, ResultCode::Ok, "{o:?}");
        assert_eq!(o.sequence, seq);
        assert!(!o.replayed);
    }
    // Each item's balances after it, as if sent alone in order.
    assert_eq!((out[0].available, out[0].reserved), (d("70"), d("30")));
    assert_eq!((out[2].available, out[2].reserved), (d("0"), d("100")));
    assert_eq!(cash(&h.state, 1), (d("0"), d("100")));
    assert_eq!(cash(&h.state, 2), (d("60"), d("40")));
    // One Reserved event per item, in order.
    let kinds: Vec<_> = h.events.iter().map(|e| (e.kind, e.account_id.0)).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Reserved, 1),
            (EventKind::Reserved, 2),
            (EventKind::Reserved, 1)
        ]
    );
    // A retry replays every reply, moving nothing.
    let again = basket(&mut h, &items);
    for (o, first) in again.iter().zip(&out) {
        assert!(o.replayed);
        assert_eq!(
            Outcome {
                replayed: false,
                ..*o
            },
            *first
        );
    }
    assert_eq!(cash(&h.state, 1), (d("0"), d("100")));
}

#[test]
fn one_failing_item_leaves_nothing_applied_and_the_retry_replays_it() {
    let mut h = funded("100");
    let before = h.state.digest();
    // Each fits alone; together they exceed account 1's cash.
    let items = [
        reserve("k1", 1, "o1", "60"),
        reserve("k2", 2, "o2", "10"),
        reserve("k3", 1, "o3", "60"),
    ];
    let out = basket(&mut h, &items);
    let results: Vec<_> = out.iter().map(|o| o.result).collect();
    assert_eq!(
        results,
        [
            ResultCode::LinkedRequestFailed,
            ResultCode::LinkedRequestFailed,
            ResultCode::InsufficientFunds
        ]
    );
    assert!(h.events.is_empty(), "nothing moved: {:?}", h.events);
    assert_eq!(cash(&h.state, 1), (d("100"), d("0")));
    assert_eq!(cash(&h.state, 2), (d("100"), d("0")));
    // The balances reported are the real ones: nothing moved.
    assert_eq!((out[2].available, out[2].reserved), (d("100"), d("0")));
    assert!(h
        .state
        .reservation(account_service::domain::AccountId(1), &id("o1"))
        .is_none());
    assert_ne!(h.state.digest(), before, "the keys are journaled state");
    // Retry of the basket: the same replies, replayed.
    let again = basket(&mut h, &items);
    for (o, first) in again.iter().zip(&out) {
        assert!(o.replayed);
        assert_eq!(o.result, first.result);
        assert_eq!(o.sequence, first.sequence);
    }
    // A linked item's key sent alone replays its linked reply too.
    let alone = h.run(Command::Reserve(items[1]));
    assert_eq!(alone.result, ResultCode::LinkedRequestFailed);
    assert!(alone.replayed);
    // New keys for the same orders go through (nothing was taken).
    let fixed = basket(
        &mut h,
        &[reserve("k4", 1, "o1", "60"), reserve("k5", 1, "o3", "40")],
    );
    assert!(fixed.iter().all(|o| o.result == ResultCode::Ok));
    assert_eq!(cash(&h.state, 1), (d("0"), d("100")));
}

#[test]
fn items_see_each_other_order_ids_and_keys() {
    let mut h = funded("100");
    let out = basket(
        &mut h,
        &[reserve("k1", 1, "o1", "1"), reserve("k2", 1, "o1", "1")],
    );
    assert_eq!(out[0].result, ResultCode::LinkedRequestFailed);
    assert_eq!(out[1].result, ResultCode::OrderAlreadyReserved);
    // The same key twice in one basket is a conflict (the edge refuses it first).
    let out = basket(
        &mut h,
        &[reserve("k3", 1, "o3", "1"), reserve("k3", 1, "o3", "1")],
    );
    assert_eq!(out[1].result, ResultCode::IdempotencyConflict);
    assert_eq!(out[0].result, ResultCode::LinkedRequestFailed);
    assert_eq!(cash(&h.state, 1), (d("100"), d("0")));
}

#[test]
fn an_item_applied_before_replays_inside_the_basket() {
    let mut h = funded("100");
    let alone = h.run(Command::Reserve(reserve("k1", 1, "o1", "30")));
    assert_eq!(alone.result, ResultCode::Ok);
    let out = basket(
        &mut h,
        &[reserve("k1", 1, "o1", "30"), reserve("k2", 1, "o2", "70")],
    );
    assert!(out[0].replayed);
    assert_eq!(out[0].sequence, alone.sequence);
    assert_eq!(out[1].result, ResultCode::Ok);
    assert!(!out[1].replayed);
    assert_eq!(cash(&h.state, 1), (d("0"), d("100")));
    // A key reused with another payload fails the basket, keeping its entry.
    let out = basket(
        &mut h,
        &[reserve("k1", 1, "o9", "1"), reserve("k9", 2, "o9", "1")],
    );
    assert_eq!(out[0].result, ResultCode::IdempotencyConflict);
    assert_eq!(out[1].result, ResultCode::LinkedRequestFailed);
    let k1 = h.run(Command::Reserve(reserve("k1", 1, "o1", "30")));
    assert!(k1.replayed && k1.result == ResultCode::Ok);
}

#[test]
fn a_basket_replays_to_the_same_state() {
    // The pure-apply property the journal relies on: the same record on the
    // same state gives the same state.
    let mut a = funded("100");
    let mut b = funded("100");
    let items = [
        reserve("k1", 1, "o1", "60"),
        reserve("k2", 1, "o2", "60"),
        reserve("k3", 2, "o3", "5"),
    ];
    let ra = basket(&mut a, &items);
    let rb = basket(&mut b, &items);
    assert_eq!(ra, rb);
    assert_eq!(a.state.digest(), b.state.digest());
}

#[test]
fn room_made_for_orders_changes_nothing_observable() {
    let mut sized = funded("100");
    let mut grown = funded("100");
    for h in [&mut sized, &mut grown] {
        h.run(reserve_cash("k1", 1, "o1", "10"));
        h.run(unreserve("u1", 1, "o1", None));
    }
    sized
        .state
        .reserve_orders(50_000, account_service::state_machine::Pages::Ordinary);
    assert_eq!(sized.state.digest(), grown.state.digest());
    for i in 0..2_000 {
        for h in [&mut sized, &mut grown] {
            h.run_quiet(reserve_cash(
                &format!("r{i}"),
                1 + i % 2,
                &format!("p{i}"),
                "0.01",
            ));
        }
    }
    assert_eq!(sized.state.digest(), grown.state.digest());
    invariants::check(&sized.state).unwrap();
    let replay = sized.run(reserve_cash("k1", 1, "o1", "10"));
    assert!(
        replay.replayed,
        "keys recorded before the room was made are kept"
    );
}

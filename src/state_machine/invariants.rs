//! The state's invariants (design section 3), checked after every apply in debug
//! builds (the touched account, cheaply) and over the whole state by the property
//! and replay tests.
//!
//! * `available >= 0` for every cash balance, unless the account is overdrawn;
//! * `reserved` equals the sum of `remaining` over the open cash reservations of
//!   that currency; a position's `reserved_quantity` equals the sum over its open
//!   sell reservations and never exceeds its quantity, unless overdrawn;
//! * every reservation has `amount = remaining + consumed + released`, and is open
//!   exactly while `remaining > 0`; an open one with an expiry is indexed;
//! * a flat position has a cost basis of exactly zero;
//! * every balance (and a balance's total, available + reserved), quantity,
//!   reserved quantity, cost basis and realized P&L is within 18 integer and 8
//!   fractional digits ([`Amount::in_range`]);
//! * the overdrawn flag and counter agree with the balances.

use super::Account;
use super::{ReservationState, State};
use crate::domain::{AccountId, Amount, ReservationKind};
use rustc_hash::FxHashMap;

/// The first kept amount of `account` outside the range, by name.
fn out_of_range(account: &Account) -> Option<&'static str> {
    for b in &account.cash {
        let total = b.available.checked_add(b.reserved);
        if !b.available.in_range() || !b.reserved.in_range() {
            return Some("cash balance");
        }
        if total.is_none() {
            return Some("cash total (available + reserved)");
        }
    }
    for p in &account.positions {
        let kept = [
            p.quantity,
            p.reserved_quantity,
            p.cost_basis,
            p.realized_pnl,
        ];
        if !kept.into_iter().all(Amount::in_range) {
            return Some("position");
        }
    }
    None
}

/// Cheap checks of one account (no scan of the reservations).
pub fn check_account_local(state: &State, id: AccountId) {
    let Some(account) = state.account(id) else {
        return;
    };
    assert_eq!(out_of_range(account), None, "amounts of {id} in range");
    assert_eq!(
        account.overdrawn,
        account.computes_overdrawn(),
        "overdrawn flag of {id}"
    );
    for b in &account.cash {
        assert!(b.reserved >= Amount::ZERO, "reserved cash >= 0 on {id}");
        assert!(
            account.overdrawn || b.available >= Amount::ZERO,
            "available >= 0 on {id}"
        );
    }
    for p in &account.positions {
        assert!(
            p.reserved_quantity >= Amount::ZERO,
            "reserved shares >= 0 on {id}"
        );
        assert!(
            account.overdrawn || p.reserved_quantity <= p.quantity,
            "reserved <= quantity on {id}"
        );
        assert!(
            !p.quantity.is_zero() || p.cost_basis.is_zero(),
            "flat position has no cost on {id}"
        );
    }
}

/// Every invariant over the whole state. `Err` names the first one broken.
pub fn check(state: &State) -> Result<(), String> {
    let mut cash_locked: FxHashMap<(AccountId, crate::domain::Asset), Amount> =
        FxHashMap::default();
    let mut shares_locked: FxHashMap<(AccountId, crate::domain::Asset), Amount> =
        FxHashMap::default();
    let mut open_count: FxHashMap<AccountId, u32> = FxHashMap::default();
    for r in state.reservations() {
        let id = r.account_id;
        if r.amount != r.remaining + r.consumed + r.released {
            return Err(format!(
                "{id}/{}: amount != remaining + consumed + released",
                r.order_id
            ));
        }
        if r.remaining < Amount::ZERO || r.consumed < Amount::ZERO || r.released < Amount::ZERO {
            return Err(format!("{id}/{}: negative part", r.order_id));
        }
        let open = r.state == ReservationState::Open;
        if open != (r.remaining > Amount::ZERO) {
            return Err(format!("{id}/{}: open iff remaining > 0", r.order_id));
        }
        if state.account(id).is_none() {
            return Err(format!(
                "{id}/{}: reservation of an unknown account",
                r.order_id
            ));
        }
        if !open {
            continue;
        }
        *open_count.entry(id).or_default() += 1;
        if let Some(at) = r.expires_at_ms {
            if !state.expiries().contains(&(at, r.key())) {
                return Err(format!("{id}/{}: expiry not indexed", r.order_id));
            }
        }
        let locked = match r.kind {
            ReservationKind::Cash => &mut cash_locked,
            ReservationKind::Security => &mut shares_locked,
        };
        *locked.entry((id, r.asset)).or_default() += r.remaining;
    }
    let mut overdrawn = 0;
    for a in state.accounts() {
        let id = a.account_id;
        if a.overdrawn != a.computes_overdrawn() {
            return Err(format!("{id}: overdrawn flag disagrees with balances"));
        }
        overdrawn += u64::from(a.overdrawn);
        if let Some(what) = out_of_range(a) {
            return Err(format!(
                "{id}: {what} beyond 18 integer / 8 fractional digits"
            ));
        }
        if a.open_reservations != open_count.get(&id).copied().unwrap_or(0) {
            return Err(format!("{id}: open reservation count"));
        }
        for b in &a.cash {
            let want = cash_locked.remove(&(id, b.currency)).unwrap_or_default();
            if b.reserved != want {
                return Err(format!(
                    "{id} {}: reserved {} != open reservations {want}",
                    b.currency, b.reserved
                ));
            }
            if b.available < Amount::ZERO && !a.overdrawn {
                return Err(format!("{id} {}: negative available", b.currency));
            }
        }
        for p in &a.positions {
            let want = shares_locked.remove(&(id, p.symbol)).unwrap_or_default();
            if p.reserved_quantity != want {
                return Err(format!(
                    "{id} {}: reserved_quantity != open reservations",
                    p.symbol
                ));
            }
            if p.reserved_quantity > p.quantity && !a.overdrawn {
                return Err(format!("{id} {}: reserved_quantity > quantity", p.symbol));
            }
            if p.quantity.is_zero() && !p.cost_basis.is_zero() {
                return Err(format!("{id} {}: flat position with cost", p.symbol));
            }
        }
    }
    if let Some(((id, asset), _)) = cash_locked.iter().chain(shares_locked.iter()).next() {
        return Err(format!(
            "{id} {asset}: open reservation without a balance row"
        ));
    }
    if overdrawn != state.overdrawn_accounts() {
        return Err("overdrawn account counter".into());
    }
    if state.expiries().len() > state.reservations().count() {
        return Err("expiry index larger than the reservations".into());
    }
    if !state.idempotency_consistent() {
        return Err("idempotency order and table disagree".into());
    }
    if !state.reservations_consistent() {
        return Err("reservation rows and index disagree".into());
    }
    let closed = state
        .reservations()
        .filter(|r| r.state != ReservationState::Open)
        .count();
    if closed != state.closed_len() {
        return Err("closed reservation queue and table disagree".into());
    }
    Ok(())
}

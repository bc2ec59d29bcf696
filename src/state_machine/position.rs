//! Position arithmetic: exact cost basis and realized P&L.
//!
//! A position is `(quantity q, cost basis C)`, both signed: a long holds `q > 0`
//! bought for `C > 0`; a short (opened only by an oversell, a fill beyond what was
//! held) has `q < 0` and `C < 0`, the proceeds. A trade of signed quantity `dq`
//! (buy > 0) for cash `A > 0` has signed value `V = A` for a buy, `-A` for a sell.
//!
//! * Same direction (or flat): `q += dq`, `C += V`. Exact.
//! * Opposite direction: `k = min(|dq|, |q|)` closes. The cost removed is
//!   `C * k / |q|` — exactly `C` when the whole position closes, otherwise rounded
//!   half-even to 8 fractional digits (the only rounding here besides a flip's
//!   value split). Realized P&L grows by `-(V * k / |dq|) - removed`.
//!   Anything of `dq` left over opens the other side at its share of `V`.
//!
//! So a position sold to zero has a cost basis of exactly zero, and the realized
//! P&L of a round trip is exactly proceeds minus cost.

use super::Position;
use crate::domain::{amount::round, Decimal};

/// `value * part / whole`, rounded half-even; exact `value` when `part == whole`.
fn pro_rata(value: Decimal, part: Decimal, whole: Decimal) -> Decimal {
    debug_assert!(part > Decimal::ZERO && whole > Decimal::ZERO && part <= whole);
    if part == whole {
        return value;
    }
    // Multiply first for precision; fall back to dividing first if the product
    // would overflow the 96-bit mantissa (only for amounts near the format's limits).
    let share = match value.checked_mul(part) {
        Some(product) => product / whole,
        None => value / whole * part,
    };
    round(share)
}

/// Applies a trade of signed quantity `dq` (buy > 0, never 0) worth `amount` (> 0).
pub fn trade(position: &mut Position, dq: Decimal, amount: Decimal) {
    assert!(!dq.is_zero(), "a trade moves shares");
    assert!(
        amount >= Decimal::ZERO,
        "a trade's cash amount is not negative"
    );
    let value = if dq.is_sign_positive() {
        amount
    } else {
        -amount
    };
    let q = position.quantity;
    let same_direction = q.is_zero() || q.is_sign_positive() == dq.is_sign_positive();
    if same_direction {
        position.quantity += dq;
        position.cost_basis += value;
        return;
    }
    let closed = dq.abs().min(q.abs());
    let removed = pro_rata(position.cost_basis, closed, q.abs());
    let closing_value = pro_rata(value, closed, dq.abs());
    position.realized_pnl += -closing_value - removed;
    position.cost_basis -= removed;
    let signed_closed = if dq.is_sign_positive() {
        closed
    } else {
        -closed
    };
    position.quantity += signed_closed;
    if position.quantity.is_zero() {
        debug_assert!(position.cost_basis.is_zero(), "flat position keeps no cost");
        position.cost_basis = Decimal::ZERO;
    }
    let opened = dq - signed_closed;
    if !opened.is_zero() {
        debug_assert!(position.quantity.is_zero());
        position.quantity = opened;
        position.cost_basis = value - closing_value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Asset;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn flat() -> Position {
        Position {
            symbol: Asset::symbol("ACME").unwrap(),
            quantity: Decimal::ZERO,
            reserved_quantity: Decimal::ZERO,
            cost_basis: Decimal::ZERO,
            realized_pnl: Decimal::ZERO,
            currency: Asset::currency("USD").unwrap(),
        }
    }

    #[test]
    fn buys_accumulate_exact_cost() {
        let mut p = flat();
        trade(&mut p, d("10"), d("1000"));
        trade(&mut p, d("5"), d("560"));
        assert_eq!(p.quantity, d("15"));
        assert_eq!(p.cost_basis, d("1560"));
        assert_eq!(p.average_price(), d("104"));
    }

    #[test]
    fn partial_sell_removes_proportional_cost_and_books_pnl() {
        let mut p = flat();
        trade(&mut p, d("10"), d("1000"));
        trade(&mut p, d("-4"), d("480"));
        assert_eq!(p.quantity, d("6"));
        assert_eq!(p.cost_basis, d("600"));
        assert_eq!(p.realized_pnl, d("80"));
    }

    #[test]
    fn proportional_cost_rounds_half_even_and_sells_to_exact_zero() {
        let mut p = flat();
        trade(&mut p, d("3"), d("100")); // average 33.333...
        trade(&mut p, d("-1"), d("40"));
        // 100 * 1 / 3 = 33.333333333... -> 33.33333333
        assert_eq!(p.cost_basis, d("66.66666667"));
        assert_eq!(p.realized_pnl, d("6.66666667"));
        trade(&mut p, d("-2"), d("70"));
        assert_eq!(p.quantity, Decimal::ZERO);
        assert_eq!(p.cost_basis, Decimal::ZERO);
        // Total P&L of the round trip is exactly proceeds - cost: 110 - 100.
        assert_eq!(p.realized_pnl, d("10"));
    }

    #[test]
    fn oversell_flips_to_a_short_and_covering_books_pnl() {
        let mut p = flat();
        trade(&mut p, d("2"), d("200"));
        trade(&mut p, d("-5"), d("550")); // sells 2 held at 110, shorts 3 at 110
        assert_eq!(p.quantity, d("-3"));
        assert_eq!(p.realized_pnl, d("20"));
        assert_eq!(p.cost_basis, d("-330"));
        assert_eq!(p.average_price(), d("110"));
        trade(&mut p, d("3"), d("300")); // cover at 100
        assert_eq!(p.quantity, Decimal::ZERO);
        assert_eq!(p.cost_basis, Decimal::ZERO);
        assert_eq!(p.realized_pnl, d("50"));
    }
}

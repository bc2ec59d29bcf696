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

//!
//! Every value kept stays within 18 integer and 8 fractional digits
//! ([`Amount::in_range`](crate::domain::Amount::in_range)): a trade that would leave that range is `None`
//! and the caller refuses the fill (`RESULT_AMOUNT_OVERFLOW`).

use super::Position;
use crate::domain::amount::mul_div_half_even;
use crate::domain::Amount;

/// `value * part / whole`, rounded half-even once (exact intermediate);
/// exactly `value` when `part == whole`. `|result| <= |value|`, so it never
/// leaves the range.
fn pro_rata(value: Amount, part: Amount, whole: Amount) -> Option<Amount> {
    debug_assert!(part.is_positive() && whole.is_positive() && part <= whole);
    if part == whole {
        return Some(value);
    }
    // Units: value * 10^8 * part * 10^8 / (whole * 10^8) = share * 10^8.
    let share = mul_div_half_even(value.units(), part.units(), whole.units())?;
    Some(Amount::from_units(share))
}

/// The position after a trade of signed quantity `dq` (buy > 0, never 0)
/// worth `amount` (>= 0); `None` if a kept value would leave the range.
pub fn traded(before: &Position, dq: Amount, amount: Amount) -> Option<Position> {
    assert!(!dq.is_zero(), "a trade moves shares");
    assert!(
        !amount.is_negative(),
        "a trade's cash amount is not negative"
    );
    let mut p = *before;
    let value = if dq.is_positive() { amount } else { -amount };
    let q = p.quantity;
    let same_direction = q.is_zero() || q.is_positive() == dq.is_positive();
    if same_direction {
        p.quantity = q.checked_add(dq)?;
        p.cost_basis = p.cost_basis.checked_add(value)?;
        return Some(p);
    }
    let closed = dq.abs().min(q.abs());
    let removed = pro_rata(p.cost_basis, closed, q.abs())?;
    let closing_value = pro_rata(value, closed, dq.abs())?;
    // Intermediate sums of in-range values are far inside the 128 bits;
    // only what is kept is held to the range.
    p.realized_pnl = (p.realized_pnl - closing_value - removed).kept()?;
    p.cost_basis = (p.cost_basis - removed).kept()?;
    let signed_closed = if dq.is_positive() { closed } else { -closed };
    p.quantity = (q + signed_closed).kept()?;
    if p.quantity.is_zero() {
        debug_assert!(p.cost_basis.is_zero(), "flat position keeps no cost");
        p.cost_basis = Amount::ZERO;
    }
    let opened = dq - signed_closed;
    if !opened.is_zero() {
        debug_assert!(p.quantity.is_zero());
        p.quantity = opened.kept()?;
        p.cost_basis = (value - closing_value).kept()?;
    }
    Some(p)
}

/// [`traded`] in place, for trades known to stay in range (tests).
#[cfg(test)]
fn trade(position: &mut Position, dq: Amount, amount: Amount) {
    *position = traded(position, dq, amount).expect("in range");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Asset, Decimal};
    use std::str::FromStr;

    fn d(s: &str) -> Amount {
        Amount::of(Decimal::from_str(s).unwrap()).unwrap()
    }

    fn flat() -> Position {
        Position::flat(
            Asset::symbol("ACME").unwrap(),
            Asset::currency("USD").unwrap(),
        )
    }

    #[test]
    fn buys_accumulate_exact_cost() {
        let mut p = flat();
        trade(&mut p, d("10"), d("1000"));
        trade(&mut p, d("5"), d("560"));
        assert_eq!(p.quantity, d("15"));
        assert_eq!(p.cost_basis, d("1560"));
        assert_eq!(p.average_price(), Decimal::from(104));
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
        assert_eq!(p.quantity, Amount::ZERO);
        assert_eq!(p.cost_basis, Amount::ZERO);
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
        assert_eq!(p.average_price(), Decimal::from(110));
        trade(&mut p, d("3"), d("300")); // cover at 100
        assert_eq!(p.quantity, Amount::ZERO);
        assert_eq!(p.cost_basis, Amount::ZERO);
        assert_eq!(p.realized_pnl, d("50"));
    }

    #[test]
    fn a_trade_leaving_the_range_changes_nothing() {
        let max = d("999999999999999999.99999999");
        let mut p = flat();
        trade(&mut p, d("1"), max);
        // Cost basis: max + 0.00000001.
        assert_eq!(traded(&p, d("1"), d("0.00000001")), None);
        // Quantity: 1 + max.
        assert_eq!(traded(&p, max, Amount::ZERO), None);
        // Realized P&L: a short covered far above its proceeds.
        let mut short = flat();
        trade(&mut short, d("-1"), d("0.00000001"));
        short.realized_pnl = -max + d("1");
        // Covering at 2: P&L -= 2 - 0.00000001, below -max.
        assert_eq!(traded(&short, d("1"), d("2")), None);
        assert_eq!(p.cost_basis, max, "the input position is untouched");
    }
}

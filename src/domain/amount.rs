//! Decimal amounts. On every interface an amount is a string of at most 18
//! integer digits and 8 fractional digits, no sign, no exponent. Inside, it is a
//! `rust_decimal::Decimal` (96-bit integer mantissa, exact). Floats never touch money.
//!
//! Rounding happens in exactly two places, both half-even to [`SCALE_MAX`]
//! fractional digits: the notional of a fill (`price x quantity`, checked against
//! `filled_amount`), and the cost removed from a position when part of it is closed
//! (`cost_basis x closed / quantity`). See `state_machine::position`.

use rust_decimal::{Decimal, RoundingStrategy};
use std::fmt;

/// Fractional digits allowed on the wire and kept internally.
pub const SCALE_MAX: u32 = 8;
/// Integer digits allowed on the wire.
pub const INTEGER_DIGITS_MAX: usize = 18;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AmountError {
    Empty,
    Malformed,
    TooManyIntegerDigits,
    TooManyFractionalDigits,
    NotPositive,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountError::Empty => "must not be empty",
            AmountError::Malformed => {
                "must be a plain decimal (digits, optional '.', no sign or exponent)"
            }
            AmountError::TooManyIntegerDigits => "must have at most 18 integer digits",
            AmountError::TooManyFractionalDigits => "must have at most 8 fractional digits",
            AmountError::NotPositive => "must be greater than zero",
        })
    }
}

/// Parses a wire amount that may be zero.
pub fn parse_amount(text: &str) -> Result<Decimal, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(int) || frac.is_some_and(|f| !digits(f)) {
        return Err(AmountError::Malformed);
    }
    if int.trim_start_matches('0').len() > INTEGER_DIGITS_MAX {
        return Err(AmountError::TooManyIntegerDigits);
    }
    if frac.is_some_and(|f| f.len() > SCALE_MAX as usize) {
        return Err(AmountError::TooManyFractionalDigits);
    }
    // 18 + 8 digits always fit the 96-bit mantissa (~7.9e28).
    let value: Decimal = text.parse().map_err(|_| AmountError::Malformed)?;
    debug_assert!(value.scale() <= SCALE_MAX && !value.is_sign_negative());
    Ok(value)
}

/// Parses a wire amount that must be strictly positive (an amount that is moved).
pub fn parse_positive(text: &str) -> Result<Decimal, AmountError> {
    let value = parse_amount(text)?;
    if value.is_zero() {
        return Err(AmountError::NotPositive);
    }
    Ok(value)
}

/// `10^(INTEGER_DIGITS_MAX + scale)` for `scale` in `0..=SCALE_MAX`: the
/// mantissa bound of an amount of that scale.
const MANTISSA_LIMITS: [u128; SCALE_MAX as usize + 1] = {
    let mut limits = [0u128; SCALE_MAX as usize + 1];
    let mut i = 0;
    while i < limits.len() {
        limits[i] = 10u128.pow(INTEGER_DIGITS_MAX as u32 + i as u32);
        i += 1;
    }
    limits
};

/// Whether the state may keep `value`: at most 18 integer and 8 fractional
/// digits, either sign (overdrawn cash, shorts and losses are negative).
/// Every balance, quantity, cost basis and P&L is held to it (design 3).
pub fn in_range(value: Decimal) -> bool {
    let scale = value.scale() as usize;
    scale < MANTISSA_LIMITS.len() && value.mantissa().unsigned_abs() < MANTISSA_LIMITS[scale]
}

/// `value` if [`in_range`]: the last step of every checked computation.
pub fn kept(value: Decimal) -> Option<Decimal> {
    in_range(value).then_some(value)
}

/// `10^k` for `k` in `0..=SCALE_MAX`.
pub const POW10: [u128; SCALE_MAX as usize + 1] = {
    let mut p = [1u128; SCALE_MAX as usize + 1];
    let mut i = 1;
    while i < p.len() {
        p[i] = p[i - 1] * 10;
        i += 1;
    }
    p
};

/// `a + b`, `None` if the sum leaves the range. Exact: two in-range amounts
/// have at most 27 significant digits, within the 96-bit mantissa.
///
/// Amounts of the state have at most [`SCALE_MAX`] places, so the sum is
/// done on 128-bit integers at the larger scale: the same mantissa and scale
/// `rust_decimal` gives (its general path, taken for larger scales, aligns
/// scales up to 28 and may round).
#[inline]
pub fn checked_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    fixed_sum(a, b, false).unwrap_or_else(|| kept(a.checked_add(b)?))
}

/// `a - b`, `None` if the difference leaves the range.
#[inline]
pub fn checked_sub(a: Decimal, b: Decimal) -> Option<Decimal> {
    fixed_sum(a, b, true).unwrap_or_else(|| kept(a.checked_sub(b)?))
}

/// `a + b` (or `a - b`) when both have at most [`SCALE_MAX`] places:
/// `Some(result)`, where the result is `None` out of range; `None` for
/// other scales. A mantissa is below 2^96, times at most 10^8 below 2^123:
/// the sum cannot overflow an `i128`.
#[inline]
fn fixed_sum(a: Decimal, b: Decimal, subtract: bool) -> Option<Option<Decimal>> {
    let (sa, sb) = (a.scale(), b.scale());
    if sa > SCALE_MAX || sb > SCALE_MAX {
        return None;
    }
    let scale = sa.max(sb);
    let ma = a.mantissa() * POW10[(scale - sa) as usize] as i128;
    let mb = b.mantissa() * POW10[(scale - sb) as usize] as i128;
    let sum = if subtract { ma - mb } else { ma + mb };
    if sum.unsigned_abs() >= MANTISSA_LIMITS[scale as usize] {
        return Some(None);
    }
    Some(Some(Decimal::from_i128_with_scale(sum, scale)))
}

/// `price x quantity`, half-even to [`SCALE_MAX`] places, computed exactly
/// (128-bit product of the mantissas, then one rounding); `None` if either
/// input or the result leaves the range. `Decimal::checked_mul` is not used:
/// past 96 bits it drops digits before any rounding of ours.
pub fn notional(price: Decimal, quantity: Decimal) -> Option<Decimal> {
    if !in_range(price) || !in_range(quantity) {
        return None;
    }
    // Both mantissas < 10^26; a product beyond i128 is >= 1.7e38 at scale
    // <= 16, i.e. >= 1.7e22: out of range anyway.
    let product = price.mantissa().checked_mul(quantity.mantissa())?;
    let scale = price.scale() + quantity.scale();
    let excess = scale.saturating_sub(SCALE_MAX);
    let rounded = div_half_even(product, 10i128.pow(excess));
    kept(Decimal::try_from_i128_with_scale(rounded, scale - excess).ok()?)
}

/// `n / d` rounded half-even, for `d > 0`.
fn div_half_even(n: i128, d: i128) -> i128 {
    debug_assert!(d > 0);
    let (q, r) = (n / d, n % d);
    let twice = r.unsigned_abs() * 2;
    let away = twice > d.unsigned_abs() || (twice == d.unsigned_abs() && q % 2 != 0);
    match (away, n < 0) {
        (false, _) => q,
        (true, false) => q + 1,
        (true, true) => q - 1,
    }
}

/// Half-even to [`SCALE_MAX`] fractional digits.
pub fn round(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(SCALE_MAX, RoundingStrategy::MidpointNearestEven)
}

/// Canonical text of an amount: no trailing zeros, no exponent ("0", "12.5", "-3").
pub fn format(value: Decimal) -> String {
    let v = value.normalize();
    if v.is_zero() {
        "0".to_string()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn accepts_the_wire_format() {
        assert_eq!(parse_amount("0").unwrap(), d("0"));
        assert_eq!(parse_amount("12.34").unwrap(), d("12.34"));
        assert_eq!(parse_amount("0.00000001").unwrap(), d("0.00000001"));
        assert_eq!(
            parse_amount("999999999999999999.99999999").unwrap(),
            d("999999999999999999.99999999")
        );
        assert_eq!(parse_amount("000001").unwrap(), d("1"));
    }

    #[test]
    fn rejects_everything_else() {
        use AmountError::*;
        let cases = [
            ("", Empty),
            ("-1", Malformed),
            ("+1", Malformed),
            ("1e5", Malformed),
            ("1.", Malformed),
            (".5", Malformed),
            ("1.2.3", Malformed),
            (" 1", Malformed),
            ("NaN", Malformed),
            ("1000000000000000000", TooManyIntegerDigits),
            ("1.000000001", TooManyFractionalDigits),
        ];
        for (text, err) in cases {
            assert_eq!(parse_amount(text), Err(err), "{text:?}");
        }
        assert_eq!(parse_positive("0.0"), Err(NotPositive));
    }

    #[test]
    fn rounds_half_even() {
        assert_eq!(round(d("0.000000005")), d("0.00000000"));
        assert_eq!(round(d("0.000000015")), d("0.00000002"));
        assert_eq!(round(d("2.000000025")), d("2.00000002"));
    }

    #[test]
    fn formats_canonically() {
        assert_eq!(format(d("1.50000000")), "1.5");
        assert_eq!(format(d("0.00")), "0");
        assert_eq!(format(d("-3.10")), "-3.1");
        assert_eq!(format(d("100")), "100");
    }

    #[test]
    fn the_range_is_18_integer_and_8_fractional_digits_either_sign() {
        for v in [
            "999999999999999999.99999999",
            "-999999999999999999.99999999",
            "0",
            "0.00000001",
        ] {
            assert!(in_range(d(v)), "{v}");
        }
        for v in [
            "1000000000000000000",
            "-1000000000000000000",
            "0.000000001",
            "1.000000000",
        ] {
            assert!(!in_range(d(v)), "{v}");
        }
        let max = d("999999999999999999.99999999");
        assert_eq!(checked_add(max, d("0.00000001")), None);
        assert_eq!(checked_sub(-max, d("0.00000001")), None);
        assert_eq!(checked_add(max, -max), Some(Decimal::ZERO));
    }

    #[test]
    fn the_notional_is_exact_then_rounded_once() {
        assert_eq!(notional(d("1.00000005"), d("0.5")), Some(d("0.50000002")));
        assert_eq!(notional(d("1.00000015"), d("0.5")), Some(d("0.50000008")));
        assert_eq!(notional(d("0.33333333"), d("3")), Some(d("0.99999999")));
        // 26 significant digits times 26: Decimal::checked_mul would round
        // away digits; here the exact product decides.
        let p = d("99999999.99999999");
        let q = d("9999999999.99999999");
        assert_eq!(notional(p, q), Some(d("999999999999999899")));
        // Just past the range, and far past it.
        assert_eq!(notional(d("1000000000"), d("1000000000")), None);
        let max = d("999999999999999999.99999999");
        assert_eq!(notional(max, max), None);
        assert_eq!(notional(max, d("1")), Some(max));
        assert_eq!(
            notional(d("0.00000001"), d("0.00000001")),
            Some(Decimal::ZERO)
        );
    }

    proptest::proptest! {
        /// The fixed-point sum is `rust_decimal`'s, digit for digit and scale
        /// for scale (a zero's sign aside), in range or not.
        #[test]
        fn sums_match_rust_decimal(
            ma in -(10i128.pow(27))..10i128.pow(27),
            sa in 0u32..=SCALE_MAX,
            mb in -(10i128.pow(27))..10i128.pow(27),
            sb in 0u32..=SCALE_MAX,
            small in proptest::bool::ANY,
        ) {
            // Half the cases in range: mantissas cut to 18 + scale digits.
            let cut = |m: i128, s: u32| if small { m % 10i128.pow(18 + s) } else { m };
            let a = Decimal::from_i128_with_scale(cut(ma, sa), sa);
            let b = Decimal::from_i128_with_scale(cut(mb, sb), sb);
            let exact = |r: Option<Decimal>| r.map(|d| (d.mantissa(), d.scale()));
            proptest::prop_assert_eq!(
                exact(checked_add(a, b)),
                exact(a.checked_add(b).and_then(kept))
            );
            proptest::prop_assert_eq!(
                exact(checked_sub(a, b)),
                exact(a.checked_sub(b).and_then(kept))
            );
        }
    }
}

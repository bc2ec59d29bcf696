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
}

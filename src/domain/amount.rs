//! Decimal amounts. On every interface an amount is a string of at most 18
//! integer digits and 8 fractional digits, no sign, no exponent. Parsed, it is
//! a `rust_decimal::Decimal` (96-bit integer mantissa, exact): commands carry
//! the amounts as sent. The state keeps every balance, quantity, cost basis and
//! P&L as an [`Amount`]: a count of 10^-8 units in a 128-bit integer, exact for
//! every value the range allows (design 3), so a sum is an integer addition and
//! a compare an integer compare. Floats never touch money.
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

/// `n * m / d` rounded half-even, from the exact 256-bit product, for
/// `d > 0`; `None` if the quotient does not fit an `i128`.
pub fn mul_div_half_even(n: i128, m: i128, d: i128) -> Option<i128> {
    assert!(d > 0, "a positive divisor");
    match n.checked_mul(m) {
        Some(product) => Some(div_half_even(product, d)),
        None => mul_div_wide(n, m, d),
    }
}

/// [`mul_div_half_even`] through the 256-bit product.
fn mul_div_wide(n: i128, m: i128, d: i128) -> Option<i128> {
    let (high, low) = widening_mul(n.unsigned_abs(), m.unsigned_abs());
    let d = d.unsigned_abs();
    // A quotient of 128 bits or more: far beyond any amount.
    if high >= d {
        return None;
    }
    // Long division, a bit at a time (amounts near the limits only): the
    // remainder stays below `2 * d`, which fits for `d < 2^127`.
    let (mut quotient, mut remainder) = (0u128, high);
    for bit in (0..128).rev() {
        let carry = remainder >> 127;
        remainder = (remainder << 1) | ((low >> bit) & 1);
        if carry == 1 || remainder >= d {
            remainder = remainder.wrapping_sub(d);
            quotient |= 1 << bit;
        }
    }
    let twice = remainder.checked_mul(2)?;
    let away = twice > d || (twice == d && quotient % 2 == 1);
    let magnitude = i128::try_from(quotient + u128::from(away)).ok()?;
    Some(if (n < 0) != (m < 0) {
        -magnitude
    } else {
        magnitude
    })
}

/// The 256-bit product `a * b` as (high, low) halves.
fn widening_mul(a: u128, b: u128) -> (u128, u128) {
    let mask = u128::from(u64::MAX);
    let (a1, a0) = (a >> 64, a & mask);
    let (b1, b0) = (b >> 64, b & mask);
    let (low, middle_low, middle_high, high) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
    let (middle, middle_carry) = middle_low.overflowing_add(middle_high);
    let (low, low_carry) = low.overflowing_add(middle << 64);
    let high = high + (middle >> 64) + (u128::from(middle_carry) << 64) + u128::from(low_carry);
    (high, low)
}

/// Half-even to [`SCALE_MAX`] fractional digits.
pub fn round(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(SCALE_MAX, RoundingStrategy::MidpointNearestEven)
}

/// An exact decimal with [`SCALE_MAX`] fractional digits, as the state keeps
/// every balance, quantity, cost basis and P&L: a signed count of 10^-8 units.
///
/// Every value of the range (18 integer and 8 fractional digits, either
/// sign) is exactly one count, so sums, differences and compares are integer
/// operations, where `Decimal` aligns scales first (the fixed point costs a
/// few instructions; `Decimal`'s general paths cost hundreds). Values derived
/// from kept ones (a free quantity, a sum before its range check) stay far
/// inside the 128 bits: operators never overflow on them, and
/// [`Amount::checked_add`] / [`Amount::checked_sub`] hold a result to the
/// range. Held as two 64-bit halves, not an `i128`: 8-byte alignment, so the
/// rows that hold amounts get no padding for them (an `i128` aligns to 16).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Amount {
    low: u64,
    high: i64,
}

/// Units of an [`Amount`] in one: `10^SCALE_MAX`.
const UNITS_PER_ONE: u128 = POW10[SCALE_MAX as usize];
/// The least magnitude past the range, in units: `10^(18 + 8)`.
const UNITS_LIMIT: u128 = MANTISSA_LIMITS[SCALE_MAX as usize];

impl Amount {
    pub const ZERO: Amount = Amount::from_units(0);

    /// `units` counts of 10^-8.
    #[inline]
    pub const fn from_units(units: i128) -> Amount {
        Amount {
            low: units as u64,
            high: (units >> 64) as i64,
        }
    }

    /// The count of 10^-8 units.
    #[inline]
    pub const fn units(self) -> i128 {
        ((self.high as i128) << 64) | self.low as i128
    }

    /// `value` exactly, or `None` if it has more than 8 significant
    /// fractional digits (never a value the edge accepts or the state
    /// kept). Not held to the range: `Decimal`'s 96-bit mantissa times
    /// 10^8 fits the 128 bits.
    #[inline]
    pub fn of(value: Decimal) -> Option<Amount> {
        let value = if value.scale() > SCALE_MAX {
            value.normalize()
        } else {
            value
        };
        let scale = value.scale();
        if scale > SCALE_MAX {
            return None;
        }
        let factor = POW10[(SCALE_MAX - scale) as usize] as i128;
        Some(Amount::from_units(value.mantissa() * factor))
    }

    /// The same value as a `Decimal`, without trailing zeros. Every amount
    /// the state holds or derives is below 2^96 units (the range is below
    /// 2^87), so it fits a `Decimal`'s mantissa.
    pub fn to_decimal(self) -> Decimal {
        Decimal::from_i128_with_scale(self.units(), SCALE_MAX).normalize()
    }

    /// Within 18 integer and 8 fractional digits (design 3).
    #[inline]
    pub fn in_range(self) -> bool {
        self.units().unsigned_abs() < UNITS_LIMIT
    }

    /// `self` if [`Amount::in_range`]: the last step of every checked computation.
    #[inline]
    pub fn kept(self) -> Option<Amount> {
        self.in_range().then_some(self)
    }

    /// `self + other`, `None` if the sum leaves the range.
    #[inline]
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        Amount::from_units(self.units().checked_add(other.units())?).kept()
    }

    /// `self - other`, `None` if the difference leaves the range.
    #[inline]
    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        Amount::from_units(self.units().checked_sub(other.units())?).kept()
    }

    #[inline]
    pub fn is_zero(self) -> bool {
        self.units() == 0
    }

    /// Strictly below zero.
    #[inline]
    pub fn is_negative(self) -> bool {
        self.high < 0
    }

    /// Strictly above zero.
    #[inline]
    pub fn is_positive(self) -> bool {
        self.units() > 0
    }

    #[inline]
    pub fn abs(self) -> Amount {
        Amount::from_units(self.units().abs())
    }
}

impl PartialOrd for Amount {
    #[inline]
    fn partial_cmp(&self, other: &Amount) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Amount {
    #[inline]
    fn cmp(&self, other: &Amount) -> std::cmp::Ordering {
        self.units().cmp(&other.units())
    }
}

impl std::ops::Add for Amount {
    type Output = Amount;
    #[inline]
    fn add(self, other: Amount) -> Amount {
        Amount::from_units(self.units() + other.units())
    }
}

impl std::ops::Sub for Amount {
    type Output = Amount;
    #[inline]
    fn sub(self, other: Amount) -> Amount {
        Amount::from_units(self.units() - other.units())
    }
}

impl std::ops::Neg for Amount {
    type Output = Amount;
    #[inline]
    fn neg(self) -> Amount {
        Amount::from_units(-self.units())
    }
}

impl std::ops::AddAssign for Amount {
    #[inline]
    fn add_assign(&mut self, other: Amount) {
        *self = *self + other;
    }
}

impl std::ops::SubAssign for Amount {
    #[inline]
    fn sub_assign(&mut self, other: Amount) {
        *self = *self - other;
    }
}

/// The canonical text, as [`format`] writes a `Decimal`: no trailing
/// zeros, no exponent ("0", "12.5", "-3").
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = self.units();
        let magnitude = units.unsigned_abs();
        let (whole, mut fraction) = match u64::try_from(magnitude) {
            Ok(m) => (
                u128::from(m / UNITS_PER_ONE as u64),
                m % UNITS_PER_ONE as u64,
            ),
            Err(_) => (
                magnitude / UNITS_PER_ONE,
                (magnitude % UNITS_PER_ONE) as u64,
            ),
        };
        if units < 0 {
            f.write_str("-")?;
        }
        write!(f, "{whole}")?;
        if fraction == 0 {
            return Ok(());
        }
        let mut width = SCALE_MAX as usize;
        while fraction % 10 == 0 {
            fraction /= 10;
            width -= 1;
        }
        write!(f, ".{fraction:0width$}")
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<Amount> for Decimal {
    fn from(value: Amount) -> Decimal {
        value.to_decimal()
    }
}

/// Serialized as the `Decimal` of the same value (its text): what rows
/// serialized before amounts were fixed-point read back as.
impl serde::Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&self.to_decimal(), serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Amount, D::Error> {
        let value = <Decimal as serde::Deserialize>::deserialize(deserializer)?;
        Amount::of(value).ok_or_else(|| {
            serde::de::Error::custom(format_args!(
                "amount {value} has more than 8 fractional digits"
            ))
        })
    }
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
        let max = Amount::of(d("999999999999999999.99999999")).unwrap();
        let least = Amount::of(d("0.00000001")).unwrap();
        assert!(max.in_range() && !(max + least).in_range());
        assert_eq!(max.checked_add(least), None);
        assert_eq!((-max).checked_sub(least), None);
        assert_eq!(max.checked_add(-max), Some(Amount::ZERO));
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

    #[test]
    fn an_amount_is_its_decimal_exactly() {
        for text in [
            "0",
            "1.5",
            "-3.1",
            "0.00000001",
            "999999999999999999.99999999",
            "100",
        ] {
            let value = d(text);
            let amount = Amount::of(value).unwrap();
            assert_eq!(amount.to_decimal(), value);
            assert_eq!(amount.to_string(), format(value), "{text}");
        }
        // Scale is not value: 1.50 is 1.5, and 9 places with a trailing zero fit.
        assert_eq!(Amount::of(d("1.50")), Amount::of(d("1.5")));
        assert_eq!(Amount::of(d("1.500000000")), Amount::of(d("1.5")));
        assert_eq!(Amount::of(d("0.000000001")), None);
        assert_eq!(Amount::of(d("-2.25")).unwrap().units(), -225_000_000);
    }

    #[test]
    fn the_wide_product_divides_and_rounds_half_even() {
        let max = 10i128.pow(26) - 1;
        // max * max / max: far past 128 bits on the way.
        assert_eq!(mul_div_half_even(max, max, max), Some(max));
        assert_eq!(mul_div_half_even(-max, max, max), Some(-max));
        // (10^26 - 1) * (10^26 - 1) / (2 * 10^26): x.4999... rounds down.
        assert_eq!(
            mul_div_half_even(max, max, 2 * 10i128.pow(26)),
            Some(max / 2)
        );
        // Ties go to even: 3 * 10^30 * 5 / (10^31) = 1.5 -> 2; 2.5 -> 2.
        let big = 10i128.pow(30);
        assert_eq!(mul_div_wide(3 * big, 5, 10 * big), Some(2));
        assert_eq!(mul_div_wide(5 * big, 5, 10 * big), Some(2));
        assert_eq!(mul_div_wide(-5 * big, 5, 10 * big), Some(-2));
        // A quotient past 128 bits.
        assert_eq!(mul_div_half_even(i128::MAX, i128::MAX, 1), None);
    }

    proptest::proptest! {
        /// Fixed-point sums are `rust_decimal`'s, value for value, in range or not.
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
            let (x, y) = (Amount::of(a).unwrap(), Amount::of(b).unwrap());
            let kept = |r: Option<Decimal>| r.filter(|&v| in_range(v)).map(|v| Amount::of(v).unwrap());
            proptest::prop_assert_eq!(x.checked_add(y), kept(a.checked_add(b)));
            proptest::prop_assert_eq!(x.checked_sub(y), kept(a.checked_sub(b)));
            proptest::prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            proptest::prop_assert_eq!(x.to_string(), format(a));
        }

        /// The 256-bit path is the 128-bit one wherever both apply.
        #[test]
        fn the_wide_path_is_exact(
            n in -(10i128.pow(19))..10i128.pow(19),
            m in -(10i128.pow(18))..10i128.pow(18),
            d in 1i128..10i128.pow(26),
        ) {
            proptest::prop_assert_eq!(mul_div_wide(n, m, d), Some(div_half_even(n * m, d)));
        }
    }
}

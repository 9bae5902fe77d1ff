//! Exact amounts: money in integer kopecks, quantities and rates as decimals.
//!
//! Rounding rule (the only one in the product, so that kopilka agrees with 1C):
//! an amount with more than two decimals is rounded to the kopeck **half away from zero**,
//! the way 1C's `Окр(x, 2)` does by default. Points derived from money are always rounded
//! **down** (see `core::program`), so kopilka never issues a point it cannot justify.

use std::fmt;
use std::ops::{Add, AddAssign, Neg, Sub, SubAssign};
use std::str::FromStr;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

/// Kopecks (1/100 ruble). Signed: returns and reversals are negative movements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub i64);

/// Whole loyalty points. What one point is worth is program configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Points(pub i64);

/// A quantity of goods: 1C allows fractional quantities (kilograms, metres), so no integer.
pub type Quantity = Decimal;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("empty number")]
    Empty,
    #[error("not a number: {0:?}")]
    NotANumber(String),
    #[error("number out of range: {0:?}")]
    OutOfRange(String),
}

/// Parses a decimal as 1C and people write it: `1234.50`, `231.7400`, `160,316`,
/// `1 234,50` (spaces and non-breaking spaces as thousands separators), `-5`.
/// Exponents and anything else are refused: a surprising number is an error, not a guess.
pub fn parse_decimal(text: &str) -> Result<Decimal, AmountError> {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.trim().chars() {
        match c {
            ' ' | '\u{a0}' | '\u{202f}' | '\u{2009}' => {}
            ',' => cleaned.push('.'),
            '0'..='9' | '.' | '-' | '+' => cleaned.push(c),
            _ => return Err(AmountError::NotANumber(text.to_string())),
        }
    }
    if cleaned.is_empty() {
        return Err(AmountError::Empty);
    }
    if cleaned.matches('.').count() > 1 || cleaned == "." || cleaned == "-" || cleaned == "+" {
        return Err(AmountError::NotANumber(text.to_string()));
    }
    Decimal::from_str_exact(&cleaned).map_err(|_| AmountError::OutOfRange(text.to_string()))
}

impl Money {
    pub const ZERO: Money = Money(0);

    /// Rubles as a decimal → kopecks, half away from zero.
    pub fn from_rubles(value: Decimal) -> Result<Money, AmountError> {
        let out_of_range = || AmountError::OutOfRange(value.to_string());
        let kopecks = value
            .checked_mul(Decimal::ONE_HUNDRED)
            .ok_or_else(out_of_range)?
            .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
        kopecks.to_i64().map(Money).ok_or_else(out_of_range)
    }

    /// Parses rubles written as text (see [`parse_decimal`]).
    pub fn parse_rubles(text: &str) -> Result<Money, AmountError> {
        Money::from_rubles(parse_decimal(text)?)
    }

    pub fn kopecks(self) -> i64 {
        self.0
    }

    pub fn as_decimal(self) -> Decimal {
        Decimal::new(self.0, 2)
    }

    /// `self × factor` rounded to the kopeck half away from zero (price × quantity).
    pub fn mul_decimal(self, factor: Decimal) -> Result<Money, AmountError> {
        let product = self
            .as_decimal()
            .checked_mul(factor)
            .ok_or_else(|| AmountError::OutOfRange(format!("{self} × {factor}")))?;
        Money::from_rubles(product)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl fmt::Display for Money {
    /// Rubles with two decimals and a dot, as 1C exchange files write them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl FromStr for Money {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse_rubles(s)
    }
}

macro_rules! int_ops {
    ($t:ident) => {
        impl Add for $t {
            type Output = $t;
            fn add(self, rhs: $t) -> $t {
                $t(self.0 + rhs.0)
            }
        }
        impl Sub for $t {
            type Output = $t;
            fn sub(self, rhs: $t) -> $t {
                $t(self.0 - rhs.0)
            }
        }
        impl AddAssign for $t {
            fn add_assign(&mut self, rhs: $t) {
                self.0 += rhs.0;
            }
        }
        impl SubAssign for $t {
            fn sub_assign(&mut self, rhs: $t) {
                self.0 -= rhs.0;
            }
        }
        impl Neg for $t {
            type Output = $t;
            fn neg(self) -> $t {
                $t(-self.0)
            }
        }
        impl std::iter::Sum for $t {
            fn sum<I: Iterator<Item = $t>>(iter: I) -> $t {
                $t(iter.map(|v| v.0).sum())
            }
        }
    };
}
int_ops!(Money);
int_ops!(Points);

impl fmt::Display for Points {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `floor(a × num / den)` for non-negative `a`, `num ≤ den` in exact integer arithmetic.
/// Used for proportional reversals, where `f(den) = a` must hold exactly.
pub fn prorate_floor(a: i64, num: Decimal, den: Decimal) -> i64 {
    if den <= Decimal::ZERO || num <= Decimal::ZERO {
        return 0;
    }
    if num >= den {
        return a;
    }
    (Decimal::from(a) * num / den)
        .floor()
        .to_i64()
        .unwrap_or(0)
        .clamp(0, a.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<i64, ()>) {
        let got = Money::parse_rubles(input).map(|m| m.0).map_err(|_| ());
        assert_eq!(got, expected, "parsing {input:?}");
    }

    #[test]
    fn parses_1c_spellings_exactly() {
        check("1234.50", Ok(123450));
        check("231.7400", Ok(23174));
        check("160,316", Ok(16032));
        check("1 234,50", Ok(123450));
        check("1\u{a0}234.5", Ok(123450));
        check("-5", Ok(-500));
        check("0.005", Ok(1)); // half away from zero
        check("-0.005", Ok(-1));
        check("0.0049", Ok(0));
        check("10.125", Ok(1013));
        check("", Err(()));
        check("12a", Err(()));
        check("1.2.3", Err(()));
        check("1e5", Err(()));
        check("-", Err(()));
        check("99999999999999999999999999", Err(()));
        check("79228162514264337593543950335", Err(()));
    }

    #[test]
    fn displays_as_exchange_files_write() {
        assert_eq!(Money(123450).to_string(), "1234.50");
        assert_eq!(Money(-5).to_string(), "-0.05");
        assert_eq!(Money(0).to_string(), "0.00");
    }

    #[test]
    fn prorate_is_exact_at_the_ends() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(prorate_floor(10, d("3"), d("3")), 10);
        assert_eq!(prorate_floor(10, d("1"), d("3")), 3);
        assert_eq!(prorate_floor(10, d("2"), d("3")), 6);
        assert_eq!(prorate_floor(10, d("0"), d("3")), 0);
        assert_eq!(prorate_floor(10, d("5"), d("3")), 10);
        assert_eq!(prorate_floor(7, d("0.5"), d("1.5")), 2);
    }
}

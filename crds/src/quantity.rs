//! Kubernetes quantities for byte sizes (`12Gi`, `700Mi`, `1.5G`, `512`).
//!
//! We keep our own newtype instead of `k8s_openapi`'s `Quantity` because that one is
//! `int-or-string` in the schema: CEL's `quantity()` only takes strings, and an unbounded
//! string makes the apiserver's CEL cost estimate too high. This one is a bounded string
//! with a pattern, so the CRD's rules can call `quantity(...)` on it safely.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern the CRD enforces; [`Quantity::bytes`] accepts exactly this language.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// A size in bytes written as a Kubernetes quantity, e.g. `12Gi`, `700Mi`, `1.5G`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(pub String);

/// Why a string is not a byte quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a quantity (e.g. 12Gi)")]
pub struct QuantityError {
    /// The text that failed to parse.
    pub value: String,
}

impl Quantity {
    /// A quantity from a byte count, written in the largest binary unit that keeps it exact.
    pub fn from_bytes(bytes: u64) -> Self {
        const UNITS: [(&str, u64); 6] = [
            ("Ei", 1 << 60),
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (suffix, size) in UNITS {
            if bytes >= size && bytes.is_multiple_of(size) {
                return Self(format!("{}{suffix}", bytes / size));
            }
        }
        Self(bytes.to_string())
    }

    /// The number of bytes, rounded up to a whole byte.
    pub fn bytes(&self) -> Result<u64, QuantityError> {
        parse_bytes(&self.0)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_bytes(s)?;
        Ok(Self(s.to_owned()))
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 24,
            "pattern": QUANTITY_PATTERN,
            "description": "A size in bytes as a Kubernetes quantity, e.g. 12Gi, 700Mi, 1.5G."
        })
    }
}

/// Parses the [`QUANTITY_PATTERN`] language into bytes (fractions round up).
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let error = || QuantityError {
        value: text.to_owned(),
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(error()),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) if !w.is_empty() && !f.is_empty() => (w, f),
        Some(_) => return Err(error()),
        None => (number, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error());
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error());
    }
    let whole: u128 = whole.parse().map_err(|_| error())?;
    let mut total = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(error)?;
    if !fraction.is_empty() {
        // Up to 18 fractional digits are exact in u128 arithmetic; more would only add noise.
        let digits = &fraction[..fraction.len().min(18)];
        let numerator: u128 = digits.parse().map_err(|_| error())?;
        let denominator = 10u128.pow(u32::try_from(digits.len()).map_err(|_| error())?);
        let scaled = numerator * u128::from(multiplier);
        total += scaled.div_ceil(denominator);
    }
    u64::try_from(total).map_err(|_| error())
}

/// Bytes in binary units for people: `12.0 GiB`, `700.0 MiB` (one implementation for the
/// whole project: the policy crate's).
pub use modelpool_policy::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_fractions() {
        assert_eq!(parse_bytes("12Gi").unwrap(), 12 << 30);
        assert_eq!(parse_bytes("700Mi").unwrap(), 700 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("0.5Ki").unwrap(), 512);
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(
            parse_bytes("0.1").unwrap(),
            1,
            "fractions of a byte round up"
        );
    }

    #[test]
    fn refuses_what_the_pattern_refuses() {
        for bad in [
            "",
            "12Gx",
            "Gi",
            "-1Gi",
            "1.Gi",
            ".5Gi",
            "1e3",
            "12 Gi",
            "1m",
            "99999999Ei",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn from_bytes_round_trips() {
        for bytes in [0, 1, 1023, 1024, 12 << 30, 700 << 20, 3 * (1 << 20) + 1] {
            assert_eq!(Quantity::from_bytes(bytes).bytes().unwrap(), bytes);
        }
        assert_eq!(Quantity::from_bytes(12 << 30).0, "12Gi");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(12 << 30), "12.0 GiB");
    }
}

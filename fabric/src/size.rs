//! [`ByteSize`]: the human byte sizes (`64MiB`, `2GiB`, `1GB`) that every
//! kvfabric setting uses, node and router alike. Built without the server
//! feature so clients (the router) share the one parser.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::str::FromStr;

/// A byte size: a plain number of bytes or a number with a unit
/// (`KiB`/`MiB`/`GiB`/`TiB` = powers of 1024, `KB`/`MB`/`GB`/`TB` = of 1000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let mult: u64 = match unit.as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {unit:?} (use e.g. 64MiB, 2GiB)"
                ));
            }
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected a number with a unit, e.g. 64MiB"))?;
        // Whole numbers exactly (no trip through f64, which loses bytes
        // past 2^53 and saturates); fractions only when they come to whole
        // bytes (`1.5GiB` yes, `0.5` no).
        if let Ok(n) = num.parse::<u64>() {
            return n
                .checked_mul(mult)
                .map(ByteSize)
                .ok_or_else(|| format!("invalid size {s:?}: out of range (at most 16EiB)"));
        }
        let v = n * mult as f64;
        if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
            return Err(format!("invalid size {s:?}: out of range"));
        }
        if v.fract() != 0.0 {
            return Err(format!("invalid size {s:?}: not a whole number of bytes"));
        }
        Ok(ByteSize(v as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (unit, m) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if v >= m && v.is_multiple_of(m) {
                return write!(f, "{}{unit}", v / m);
            }
        }
        write!(f, "{v}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("64MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap().0, 1536);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert_eq!("3 GB".parse::<ByteSize>().unwrap().0, 3_000_000_000);
        assert!("12 parsecs".parse::<ByteSize>().unwrap_err().contains("unknown unit"));
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("-1KiB".parse::<ByteSize>().is_err());
        // No silent truncation or saturation.
        assert!("0.5".parse::<ByteSize>().unwrap_err().contains("whole number"));
        assert!(
            "18446744073709551616"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("out of range")
        );
        assert!("16384TiB".parse::<ByteSize>().is_ok());
        assert!("16777216TiB".parse::<ByteSize>().unwrap_err().contains("out of range"));
        assert_eq!("9007199254740993".parse::<ByteSize>().unwrap().0, 9_007_199_254_740_993);
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(3 << 40).to_string(), "3TiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }
}

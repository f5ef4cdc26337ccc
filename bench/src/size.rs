//! Blob size specifications: fixed, log-uniform ranges, and a build-like mix.

use std::str::FromStr;

/// How big the blobs of a run are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeSpec {
    /// Every blob this size.
    Fixed(u64),
    /// Log-uniform between the bounds (inclusive).
    Range(u64, u64),
    /// Many under 16 KiB, some up to 4 MiB, one in a hundred of 100–128 MiB.
    Mix,
}

impl SizeSpec {
    /// The size of blob `i` (deterministic).
    pub fn sample(&self, i: u64) -> u64 {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Range(lo, hi) => log_uniform(lo, hi, unit(i, 1)),
            SizeSpec::Mix => {
                let pick = unit(i, 2);
                if pick < 0.85 {
                    log_uniform(256, 16 << 10, unit(i, 3))
                } else if pick < 0.99 {
                    log_uniform(16 << 10, 4 << 20, unit(i, 3))
                } else {
                    log_uniform(100 << 20, 128 << 20, unit(i, 3))
                }
            }
        }
    }

    /// The largest size it can produce.
    pub fn max(&self) -> u64 {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Range(_, hi) => hi,
            SizeSpec::Mix => 128 << 20,
        }
    }
}

impl std::fmt::Display for SizeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeSpec::Fixed(n) => write!(f, "{}", human(*n)),
            SizeSpec::Range(lo, hi) => write!(f, "{}-{}", human(*lo), human(*hi)),
            SizeSpec::Mix => f.write_str("mix"),
        }
    }
}

/// A size with binary units, for display.
pub fn human(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// Parses `123`, `4KiB`, `4KB`, `1.5MiB`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("bad size {s:?}"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((number * multiplier as f64).round() as u64)
}

impl FromStr for SizeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<SizeSpec, String> {
        if s == "mix" {
            return Ok(SizeSpec::Mix);
        }
        match s.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse_size(lo)?, parse_size(hi)?);
                if lo == 0 || lo > hi {
                    return Err(format!(
                        "size range {s:?} must be increasing and above zero"
                    ));
                }
                Ok(SizeSpec::Range(lo, hi))
            }
            None => Ok(SizeSpec::Fixed(parse_size(s)?)),
        }
    }
}

/// A deterministic number in [0, 1) for item `i`, stream `salt` (splitmix64).
pub fn unit(i: u64, salt: u64) -> f64 {
    let mut z = i
        .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn log_uniform(lo: u64, hi: u64, u: f64) -> u64 {
    let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
    ((a + (b - a) * u).exp().round() as u64).clamp(lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_specs() {
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("4XB").is_err());
        assert_eq!("4KiB-4MiB".parse(), Ok(SizeSpec::Range(4096, 4 << 20)));
        assert_eq!("mix".parse(), Ok(SizeSpec::Mix));
        assert!("4MiB-4KiB".parse::<SizeSpec>().is_err());
        assert_eq!(SizeSpec::Range(4096, 4 << 20).to_string(), "4KiB-4MiB");
    }

    #[test]
    fn samples_stay_in_bounds_and_mix_is_mostly_small() {
        let r = SizeSpec::Range(4096, 4 << 20);
        assert!((0..1000)
            .map(|i| r.sample(i))
            .all(|s| (4096..=4 << 20).contains(&s)));
        let small = (0..10_000)
            .filter(|&i| SizeSpec::Mix.sample(i) < 16 << 10)
            .count();
        let huge = (0..10_000)
            .filter(|&i| SizeSpec::Mix.sample(i) >= 100 << 20)
            .count();
        assert!((8000..9000).contains(&small), "{small}");
        assert!((50..150).contains(&huge), "{huge}");
    }
}

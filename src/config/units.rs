//! Durations, byte sizes and rate limits as written in the file.

use std::time::Duration;

use serde::Deserialize;

use super::listener::RateLimit;

/// Parses a duration written as a number and a unit, several allowed: `500ms`, `5s`, `10m`,
/// `2h`, `7d`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}; write a whole number and a unit (ms, s, m, h, d), like \"500ms\", \"5s\", \"10m\", \"2h\" or \"7d\""
        )
    };
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let (number, tail) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let millis = number.checked_mul(millis_per_unit).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(bad)?;
        rest = tail;
    }
    Ok(total)
}

/// Parses a rate limit written as `count/period`: `50/s`, `1000/m`, `10/h`, `100/10s`.
pub fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let bad = || {
        format!(
            "invalid rate limit {s:?}; write a count and a period, like \"50/s\", \"1000/m\" or \"10/h\""
        )
    };
    let (count, per) = s.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "rate limit {s:?} allows nothing; use a count of at least 1, or remove rate_limit for no limit"
        ));
    }
    let per = per.trim();
    let per = match per {
        "ms" | "s" | "m" | "h" | "d" => parse_duration(&format!("1{per}")),
        _ => parse_duration(per),
    }
    .map_err(|_| bad())?;
    if per.is_zero() {
        return Err(bad());
    }
    Ok(RateLimit { count, per })
}

/// Parses a byte size: a whole number with an optional unit B, kB, MB, GB or TB (powers of
/// 1024, as PostgreSQL counts them; KiB, MiB, GiB and TiB are accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let Ok(n) = number.parse::<u64>() else {
        return Err(format!("{s:?} is not a size"));
    };
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "kib" => 1 << 10,
        "mb" | "mib" => 1 << 20,
        "gb" | "gib" => 1 << 30,
        "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A byte count written as a number or as a string with a unit ("1GB").
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_reject_other_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "5sec",
            "-5s",
            "1.5s",
            "99999999999999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("like \"500ms\""), "{bad}: {e}");
        }
    }

    #[test]
    fn rate_limits_parse_count_and_period() {
        assert_eq!(
            parse_rate_limit("50/s"),
            Ok(RateLimit {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            parse_rate_limit("1000/m"),
            Ok(RateLimit {
                count: 1000,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            parse_rate_limit("10/h"),
            Ok(RateLimit {
                count: 10,
                per: Duration::from_secs(3600)
            })
        );
        assert_eq!(
            parse_rate_limit("100/10s"),
            Ok(RateLimit {
                count: 100,
                per: Duration::from_secs(10)
            })
        );
        for bad in ["50", "x/s", "50/x", "50/0s", "0/s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_accept_bytes_and_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("512 MB"), Ok(512 << 20));
        assert_eq!(parse_size("2kB"), Ok(2048));
        assert!(parse_size("GB").is_err());
        assert!(parse_size("1.5GB").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }
}

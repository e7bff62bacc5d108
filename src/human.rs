//! Values as people read them: ages, byte counts and times typed by hand.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

/// A duration as people read it: the two largest units, like `3m12s`, `2d4h`, `45s`.
pub fn age(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 && !d.is_zero() {
        // Backoffs and timeouts are often under a second; "0s" would hide them.
        return format!("{}ms", d.as_millis().max(1));
    }
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = String::new();
    let mut rest = secs;
    let mut shown = 0;
    for (size, name) in units {
        let n = rest / size;
        rest %= size;
        if n > 0 || (shown > 0 && shown < 2) {
            if n > 0 {
                let _ = write!(out, "{n}{name}");
            }
            shown += 1;
        }
        if shown == 2 {
            break;
        }
    }
    if out.is_empty() { "0s".to_owned() } else { out }
}

/// A byte count as people read it, in powers of 1024 like pg_size_pretty: `512 bytes`,
/// `1.5 kB`, `12 MB`.
pub fn bytes(n: i64) -> String {
    if n < 0 {
        return format!("-{}", bytes(n.saturating_neg()));
    }
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = "bytes";
    for u in ["kB", "MB", "GB", "TB", "PB"] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v < 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

/// A time in RFC 3339 with `Z` or a numeric offset (humantime alone accepts only UTC), or
/// without an offset (then UTC), like `2024-05-01T14:00:00+02:00` or `2024-05-01 12:00`.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Some(t);
    }
    // Minutes only, as browsers' datetime-local inputs send them.
    if s.len() == 16
        && let Ok(t) = humantime::parse_rfc3339_weak(&format!("{s}:00"))
    {
        return Some(t);
    }
    let split = s.len().checked_sub(6)?;
    let (local, offset) = (s.get(..split)?, s.get(split..)?);
    let sign = match offset.get(..1)? {
        "+" => 1i64,
        "-" => -1i64,
        _ => return None,
    };
    let (hh, mm) = offset.get(1..)?.split_once(':')?;
    let (hh, mm): (u64, u64) = (hh.parse().ok()?, mm.parse().ok()?);
    if hh > 23 || mm > 59 {
        return None;
    }
    let as_utc = humantime::parse_rfc3339_weak(local).ok()?;
    let offset = Duration::from_secs(hh * 3600 + mm * 60);
    // Local time = UTC + offset, so UTC = local - offset.
    if sign > 0 {
        as_utc.checked_sub(offset)
    } else {
        as_utc.checked_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_age_shows_the_two_largest_units() {
        assert_eq!(age(Duration::from_secs(0)), "0s");
        assert_eq!(age(Duration::from_millis(100)), "100ms");
        assert_eq!(age(Duration::from_millis(45_900)), "45s");
        assert_eq!(age(Duration::from_secs(192)), "3m12s");
        assert_eq!(age(Duration::from_secs(3600)), "1h");
        assert_eq!(age(Duration::from_secs(3600 + 5)), "1h");
        assert_eq!(age(Duration::from_secs(2 * 86_400 + 4 * 3600 + 7)), "2d4h");
    }

    #[test]
    fn human_bytes_uses_powers_of_1024() {
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(1536), "1.5 kB");
        assert_eq!(bytes(12 * 1024 * 1024), "12 MB");
        assert_eq!(bytes(-2048), "-2.0 kB");
    }

    #[test]
    fn times_take_offsets_or_default_to_utc() {
        let utc = humantime::parse_rfc3339("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(parse_time("2024-05-01T12:00:00Z"), Some(utc));
        assert_eq!(parse_time("2024-05-01T14:00:00+02:00"), Some(utc));
        assert_eq!(parse_time("2024-05-01 12:00"), Some(utc));
        assert_eq!(parse_time("2024-05-01T12:00"), Some(utc));
        assert_eq!(parse_time("yesterday"), None);
    }
}

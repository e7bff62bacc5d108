//! The retry policy as data: which outcomes are retried, and how long to wait.

use std::time::{Duration, SystemTime};

use rand::RngExt as _;

use super::Verdict;
use crate::config::Backoff;

/// What one attempt ended with, in the classes the policy distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// 200–299.
    Success2xx,
    /// 300–399.
    Redirect3xx,
    /// 408 Request Timeout.
    RequestTimeout408,
    /// 429 Too Many Requests.
    TooManyRequests429,
    /// Any other 400–499.
    OtherClientError4xx,
    /// 500–599.
    ServerError5xx,
    /// No complete answer within the listener's timeout.
    Timeout,
    /// The TCP/TLS connection could not be made (refused, unreachable, DNS).
    ConnectFailed,
    /// Anything else on the wire: reset connection, malformed answer, 1xx or non-HTTP status.
    OtherTransport,
}

/// The policy table, in the order a reader expects. Edit here, nowhere else.
pub const POLICY: [(Outcome, Verdict); 9] = [
    (Outcome::Success2xx, Verdict::Delivered),
    // Redirects are not followed: a POST replayed elsewhere can leak the body and the
    // signature to a host the operator never configured. The comment tells the operator
    // to set the listener url to the redirect's Location instead.
    (Outcome::Redirect3xx, Verdict::Fail),
    (Outcome::RequestTimeout408, Verdict::Retry),
    (Outcome::TooManyRequests429, Verdict::Retry),
    // The listener understood and refused the request: sending it again cannot help.
    (Outcome::OtherClientError4xx, Verdict::Fail),
    (Outcome::ServerError5xx, Verdict::Retry),
    (Outcome::Timeout, Verdict::Retry),
    (Outcome::ConnectFailed, Verdict::Retry),
    (Outcome::OtherTransport, Verdict::Retry),
];

/// Longest wait a listener's `Retry-After` can impose; beyond that it is likely a mistake.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Relative jitter applied to the exponential delay: ±20%.
const JITTER: f64 = 0.2;

impl Outcome {
    /// The class of an HTTP status code.
    pub fn from_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Success2xx,
            300..=399 => Outcome::Redirect3xx,
            408 => Outcome::RequestTimeout408,
            429 => Outcome::TooManyRequests429,
            400..=499 => Outcome::OtherClientError4xx,
            500..=599 => Outcome::ServerError5xx,
            _ => Outcome::OtherTransport,
        }
    }

    /// The policy's verdict for this outcome, read from [`POLICY`].
    pub fn verdict(self) -> Verdict {
        POLICY
            .iter()
            .find(|(o, _)| *o == self)
            .map(|(_, v)| *v)
            // Every outcome is in the table (a unit test checks); retrying is the safe default.
            .unwrap_or(Verdict::Retry)
    }

    /// Whether the answer's `Retry-After` header is honoured for this outcome.
    pub fn reads_retry_after(status: u16) -> bool {
        status == 429 || status == 503
    }
}

/// How long to wait before the next attempt after `attempts_made` attempts (counting the
/// one that just failed): `initial × 2^(n-1)` with ±20% jitter, within
/// `[backoff.initial, backoff.max]`; a `Retry-After` (capped at one hour) is the minimum.
pub fn next_attempt_delay(
    attempts_made: u32,
    backoff: &Backoff,
    retry_after: Option<Duration>,
) -> Duration {
    let jitter = rand::rng().random_range(-1.0..=1.0);
    delay_with_jitter(attempts_made, backoff, retry_after, jitter)
}

/// [`next_attempt_delay`] with the random draw passed in (`jitter` in `[-1, 1]`).
pub(crate) fn delay_with_jitter(
    attempts_made: u32,
    backoff: &Backoff,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let max = backoff.max.max(backoff.initial);
    let exponent = attempts_made.saturating_sub(1).min(63);
    let factor = 1u64 << exponent;
    let factor = u32::try_from(factor).unwrap_or(u32::MAX);
    let base = backoff.initial.saturating_mul(factor).min(max);
    let scale = 1.0 + JITTER * jitter.clamp(-1.0, 1.0);
    let jittered = Duration::try_from_secs_f64(base.as_secs_f64() * scale).unwrap_or(max);
    let delay = jittered.clamp(backoff.initial, max);
    match retry_after {
        Some(ra) => delay.max(ra.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (relative to `now`).
/// A date in the past means "now"; anything else unreadable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // An absurd number of seconds still means "wait long"; the cap applies later.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(3600),
    };

    #[test]
    fn every_outcome_appears_in_the_table_exactly_once() {
        let all = [
            Outcome::Success2xx,
            Outcome::Redirect3xx,
            Outcome::RequestTimeout408,
            Outcome::TooManyRequests429,
            Outcome::OtherClientError4xx,
            Outcome::ServerError5xx,
            Outcome::Timeout,
            Outcome::ConnectFailed,
            Outcome::OtherTransport,
        ];
        for o in all {
            assert_eq!(POLICY.iter().filter(|(p, _)| *p == o).count(), 1, "{o:?}");
        }
    }

    #[test]
    fn statuses_map_to_the_documented_verdicts() {
        let cases = [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (299, Verdict::Delivered),
            (301, Verdict::Fail),
            (302, Verdict::Fail),
            (307, Verdict::Fail),
            (400, Verdict::Fail),
            (401, Verdict::Fail),
            (404, Verdict::Fail),
            (408, Verdict::Retry),
            (410, Verdict::Fail),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (502, Verdict::Retry),
            (503, Verdict::Retry),
            (599, Verdict::Retry),
            (101, Verdict::Retry),
            (600, Verdict::Retry),
        ];
        for (status, verdict) in cases {
            assert_eq!(Outcome::from_status(status).verdict(), verdict, "{status}");
        }
        assert_eq!(Outcome::Timeout.verdict(), Verdict::Retry);
        assert_eq!(Outcome::ConnectFailed.verdict(), Verdict::Retry);
        assert_eq!(Outcome::OtherTransport.verdict(), Verdict::Retry);
    }

    #[test]
    fn delay_doubles_without_jitter_until_the_cap() {
        let d = |n| delay_with_jitter(n, &B, None, 0.0);
        assert_eq!(d(1), Duration::from_secs(5));
        assert_eq!(d(2), Duration::from_secs(10));
        assert_eq!(d(3), Duration::from_secs(20));
        assert_eq!(d(10), Duration::from_secs(2560));
        assert_eq!(d(11), Duration::from_secs(3600));
        assert_eq!(d(u32::MAX), Duration::from_secs(3600));
        assert_eq!(d(0), Duration::from_secs(5));
    }

    #[test]
    fn jitter_spreads_the_delay_by_twenty_percent() {
        assert_eq!(delay_with_jitter(3, &B, None, 1.0), Duration::from_secs(24));
        assert_eq!(
            delay_with_jitter(3, &B, None, -1.0),
            Duration::from_secs(16)
        );
    }

    #[test]
    fn retry_after_is_a_minimum_capped_at_one_hour() {
        let two = Some(Duration::from_secs(2));
        assert_eq!(delay_with_jitter(2, &B, two, 0.0), Duration::from_secs(10));
        let long = Some(Duration::from_secs(120));
        assert_eq!(
            delay_with_jitter(2, &B, long, 0.0),
            Duration::from_secs(120)
        );
        let short_max = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let huge = Some(Duration::from_secs(86_400));
        assert_eq!(delay_with_jitter(1, &short_max, huge, 0.0), MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    proptest! {
        #[test]
        fn delays_stay_within_initial_and_max(
            attempts in 0u32..200,
            initial_ms in 1u64..100_000,
            extra_ms in 0u64..10_000_000,
            jitter in -1.0f64..=1.0,
        ) {
            let b = Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(initial_ms + extra_ms),
            };
            let d = delay_with_jitter(attempts, &b, None, jitter);
            prop_assert!(d >= b.initial && d <= b.max, "{d:?} outside {b:?}");
            let r = next_attempt_delay(attempts, &b, None);
            prop_assert!(r >= b.initial && r <= b.max, "{r:?} outside {b:?}");
        }

        #[test]
        fn delays_never_shrink_below_retry_after(
            attempts in 0u32..50,
            retry_after_s in 0u64..100_000,
        ) {
            let ra = Duration::from_secs(retry_after_s);
            let d = next_attempt_delay(attempts, &B, Some(ra));
            prop_assert!(d >= ra.min(MAX_RETRY_AFTER));
            prop_assert!(d <= B.max.max(MAX_RETRY_AFTER));
        }
    }
}

//! The retry policy as data: which outcomes are retried, and how long to wait.

use std::time::Duration;

use rand::RngExt as _;

use super::Verdict;
use crate::config::Backoff;

/// What one attempt ended with, in the transport-neutral classes the policy
/// distinguishes. Each sink maps its own answers onto these (HTTP: see `sink::http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The listener took the message (HTTP 2xx, a broker's acknowledgement).
    Accepted,
    /// The listener points somewhere else (HTTP 3xx).
    Moved,
    /// The listener asks to slow down (HTTP 429), perhaps saying for how long.
    Throttled,
    /// The listener understood the message and refused it (HTTP 4xx but 408 and 429).
    Rejected,
    /// The listener failed to handle the message (HTTP 5xx).
    ListenerError,
    /// No complete answer in time, on either side (the attempt's timeout, HTTP 408).
    TimedOut,
    /// No connection could be made (refused, unreachable, DNS).
    Unreachable,
    /// Anything else in transit: a reset connection, a malformed or unknown answer.
    TransportError,
    /// The transport cannot carry the message as rendered (a value its headers cannot
    /// hold, a body over its size limit): the same message would fail again.
    Unsendable,
    /// No credentials for the listener: its token endpoint refused or failed. Nothing was
    /// sent; an operator can fix the client settings while notifications wait.
    Unauthenticated,
}

/// The policy table, in the order a reader expects. Edit here, nowhere else.
pub const POLICY: [(Outcome, Verdict); 10] = [
    (Outcome::Accepted, Verdict::Delivered),
    // Redirects are not followed: a message replayed elsewhere can leak the body and the
    // signature to a host the operator never configured. The comment tells the operator
    // to set the listener url to the new location instead.
    (Outcome::Moved, Verdict::Fail),
    (Outcome::Throttled, Verdict::Retry),
    // The listener understood and refused the message: sending it again cannot help.
    (Outcome::Rejected, Verdict::Fail),
    (Outcome::ListenerError, Verdict::Retry),
    (Outcome::TimedOut, Verdict::Retry),
    (Outcome::Unreachable, Verdict::Retry),
    (Outcome::TransportError, Verdict::Retry),
    (Outcome::Unsendable, Verdict::Fail),
    // Credentials are fixed on walhook's side (or the identity provider recovers): the
    // message itself is fine, so it waits.
    (Outcome::Unauthenticated, Verdict::Retry),
];

/// Longest wait a listener's `Retry-After` can impose; beyond that it is likely a mistake.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Relative jitter applied to the exponential delay: ±20%.
const JITTER: f64 = 0.2;

impl Outcome {
    /// Every outcome, for tables and tests.
    pub const ALL: [Outcome; 10] = [
        Outcome::Accepted,
        Outcome::Moved,
        Outcome::Throttled,
        Outcome::Rejected,
        Outcome::ListenerError,
        Outcome::TimedOut,
        Outcome::Unreachable,
        Outcome::TransportError,
        Outcome::Unsendable,
        Outcome::Unauthenticated,
    ];

    /// The policy's verdict for this outcome, read from [`POLICY`].
    pub fn verdict(self) -> Verdict {
        POLICY
            .iter()
            .find(|(o, _)| *o == self)
            .map(|(_, v)| *v)
            // Every outcome is in the table (a unit test checks); retrying is the safe default.
            .unwrap_or(Verdict::Retry)
    }

    /// The outcome in plain words, for a comment when a sink gives none.
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Accepted => "the listener accepted the message",
            Outcome::Moved => "the listener has moved",
            Outcome::Throttled => "the listener asked to slow down",
            Outcome::Rejected => "the listener refused the message",
            Outcome::ListenerError => "the listener failed to handle the message",
            Outcome::TimedOut => "no answer in time",
            Outcome::Unreachable => "the listener cannot be reached",
            Outcome::TransportError => "the message could not be sent",
            Outcome::Unsendable => "the transport cannot carry this message",
            Outcome::Unauthenticated => "no credentials could be obtained for the listener",
        }
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
        for o in Outcome::ALL {
            assert_eq!(POLICY.iter().filter(|(p, _)| *p == o).count(), 1, "{o:?}");
        }
        assert_eq!(POLICY.len(), Outcome::ALL.len());
    }

    #[test]
    fn only_acceptance_delivers_and_only_refusals_fail_at_once() {
        for o in Outcome::ALL {
            let expected = match o {
                Outcome::Accepted => Verdict::Delivered,
                Outcome::Moved | Outcome::Rejected | Outcome::Unsendable => Verdict::Fail,
                Outcome::Throttled
                | Outcome::ListenerError
                | Outcome::TimedOut
                | Outcome::Unreachable
                | Outcome::TransportError
                | Outcome::Unauthenticated => Verdict::Retry,
            };
            assert_eq!(o.verdict(), expected, "{o:?}");
        }
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

//! Leases as this process sees them: which notifications it holds in `walhook.new` and
//! until when, by its own clock.
//!
//! The rule that keeps two processes from delivering one notification twice: an attempt
//! starts only if it ends (the dispatcher cuts it off at [`LeaseTimes::attempt`]) with a
//! margin to spare before the lease does, and held leases are renewed while their
//! notifications wait, are attempted or wait to be recorded. The local end of a lease is
//! taken from the moment the claim or renewal was *sent*: the database computes its end
//! while running the statement, later, so the process never believes it holds a row
//! longer than the database says.
//!
//! A process that dies holds its leases until they end; then any process claims the rows.
//! Nothing depends on host names or process ids.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The lease arithmetic of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseTimes {
    /// How long a claim or a renewal leases a notification.
    pub length: Duration,
    /// The longest one attempt may take.
    pub attempt: Duration,
    /// Left between an attempt's end and the lease's end, to record the outcome.
    pub margin: Duration,
    /// How often held leases are looked at for renewal.
    pub renew_every: Duration,
}

impl LeaseTimes {
    /// Leases for attempts of at most `attempt`, lasting `extra` longer than one attempt.
    pub fn new(attempt: Duration, extra: Duration) -> LeaseTimes {
        let extra = extra.max(Duration::from_millis(300));
        LeaseTimes {
            length: attempt.saturating_add(extra),
            attempt,
            margin: extra / 10,
            renew_every: extra / 6,
        }
    }

    /// Whether an attempt may start at `now` on a lease that ends at `until`.
    pub fn may_start(&self, now: Instant, until: Instant) -> bool {
        now + self.attempt + self.margin <= until
    }

    /// Leases that end before this are renewed at `now`: two renewal rounds before a
    /// waiting notification could no longer start, or an attempted one run out.
    pub fn renew_before(&self, now: Instant) -> Instant {
        now + self.attempt + self.margin + self.renew_every * 2
    }
}

/// One held lease: when it ends, and which claim took it (a notification can be claimed
/// again after its outcome is recorded; the claim number keeps the two apart).
#[derive(Clone, Copy, Debug)]
struct Held {
    until: Instant,
    claim: u64,
}

/// The leases one listener's lane holds, by notification id.
#[derive(Debug, Default)]
pub(crate) struct LeaseBook {
    held: Mutex<HashMap<i64, Held>>,
}

impl LeaseBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
        // A poisoned lock only means another task panicked; the map is still usable.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claim number `claim` leased `ids` until `until`.
    pub fn taken(&self, ids: impl IntoIterator<Item = i64>, claim: u64, until: Instant) {
        let mut held = self.lock();
        for id in ids {
            held.insert(id, Held { until, claim });
        }
    }

    /// When the lease claim `claim` took on `id` ends; `None` once it is lost or done.
    pub fn until(&self, id: i64, claim: u64) -> Option<Instant> {
        self.lock()
            .get(&id)
            .filter(|h| h.claim == claim)
            .map(|h| h.until)
    }

    /// The held leases that end before `before`, as `(id, claim)`.
    pub fn due(&self, before: Instant) -> Vec<(i64, u64)> {
        self.lock()
            .iter()
            .filter(|(_, h)| h.until < before)
            .map(|(id, h)| (*id, h.claim))
            .collect()
    }

    /// A renewal sent for `asked` kept the leases of `kept` until `until`; the others are
    /// lost (taken over, or already moved) and forgotten. Returns how many were lost.
    pub fn renewed(&self, asked: &[(i64, u64)], kept: &[i64], until: Instant) -> usize {
        let kept: std::collections::HashSet<i64> = kept.iter().copied().collect();
        let mut held = self.lock();
        let mut lost = 0;
        for (id, claim) in asked {
            let Some(h) = held.get_mut(id).filter(|h| h.claim == *claim) else {
                continue;
            };
            if kept.contains(id) {
                h.until = h.until.max(until);
            } else {
                held.remove(id);
                lost += 1;
            }
        }
        lost
    }

    /// The outcomes of `done` are recorded: their leases are no longer this process's.
    pub fn forget(&self, done: &[(i64, u64)]) {
        let mut held = self.lock();
        for (id, claim) in done {
            if held.get(id).is_some_and(|h| h.claim == *claim) {
                held.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn default_leases_outlast_an_attempt_by_thirty_seconds_and_renew_every_five() {
        let t = LeaseTimes::new(10 * S, 30 * S);
        assert_eq!(t.length, 40 * S);
        assert_eq!(t.margin, 3 * S);
        assert_eq!(t.renew_every, 5 * S);
        let now = Instant::now();
        // A fresh lease lets an attempt start, and is not renewed for a while.
        assert!(t.may_start(now, now + t.length));
        assert!(t.renew_before(now) < now + t.length);
        // One that could not see an attempt through is not started.
        assert!(!t.may_start(now, now + 12 * S));
        assert!(t.may_start(now, now + 13 * S));
    }

    #[test]
    fn a_lease_is_renewed_before_it_becomes_too_short_to_start_an_attempt() {
        for (attempt, extra) in [(10 * S, 30 * S), (S, S), (120 * S, 5 * S)] {
            let t = LeaseTimes::new(attempt, extra);
            let now = Instant::now();
            let until = now + t.length;
            // The first renewal round that sees the lease due still leaves a whole round
            // before the lease becomes too short to start on.
            let first_due = until - (t.attempt + t.margin + t.renew_every * 2);
            assert!(first_due > now, "{t:?}");
            assert!(t.may_start(first_due + t.renew_every, until), "{t:?}");
        }
    }

    #[test]
    fn the_book_tracks_claims_renewals_losses_and_recorded_outcomes() {
        let book = LeaseBook::default();
        let now = Instant::now();
        book.taken([1, 2, 3], 1, now + 10 * S);
        book.taken([4], 2, now + 20 * S);
        assert_eq!(book.until(1, 1), Some(now + 10 * S));
        assert_eq!(book.until(1, 2), None, "another claim's lease");
        let mut due = book.due(now + 15 * S);
        due.sort_unstable();
        assert_eq!(due, vec![(1, 1), (2, 1), (3, 1)]);

        // 3 was taken over meanwhile; 2 was recorded and claimed again before the answer.
        book.forget(&[(2, 1)]);
        book.taken([2], 3, now + 12 * S);
        let lost = book.renewed(&due, &[1, 2], now + 30 * S);
        assert_eq!(lost, 1);
        assert_eq!(book.until(1, 1), Some(now + 30 * S));
        assert_eq!(
            book.until(2, 3),
            Some(now + 12 * S),
            "a newer claim untouched"
        );
        assert_eq!(book.until(3, 1), None);

        // A renewal answer never shortens a lease.
        book.renewed(&[(1, 1)], &[1], now + 5 * S);
        assert_eq!(book.until(1, 1), Some(now + 30 * S));

        book.forget(&[(1, 1), (2, 1), (4, 2)]);
        assert_eq!(book.until(2, 3), Some(now + 12 * S));
        assert_eq!(book.due(now + 100 * S), vec![(2, 3)]);
    }
}

//! One listener's delivery state (a lane): its format and sink, concurrency permits, rate
//! limiter, claim state and leases, how many it holds claimed ahead, and its retry timer.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use super::claimer::ClaimState;
use super::{
    ATTEMPT_GRACE, ClaimedRow, DispatchError, MAX_OUTSTANDING, PREFETCH_PER_SLOT,
    RATE_LIMITED_PREFETCH, lock,
};
use crate::config::{EventGridDelivery, ListenerConfig, ListenerFormat, RateLimit};
use crate::delivery::Attempt;
use crate::delivery::format::{Format, Message};
use crate::delivery::lease::{LeaseBook, LeaseTimes};
use crate::delivery::policy::Outcome;
use crate::delivery::sink::Sink;
use crate::queue::StoredEvent;

/// One listener's delivery state.
pub(super) struct Lane {
    pub(super) index: usize,
    pub(super) config: ListenerConfig,
    pub(super) format: Format,
    pub(super) sink: Sink,
    pub(super) limiter: Option<DefaultDirectRateLimiter>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) concurrency: usize,
    pub(super) wake: Notify,
    /// Woken when new events are stored, for a cursor listener.
    pub(super) events: Notify,
    /// Cursor-independent claim state, shared with the recorder.
    pub(super) claims: ClaimState,
    /// Claim no more than this many ahead.
    pub(super) target: usize,
    pub(super) lease: LeaseTimes,
    /// The leases held for this listener.
    pub(super) leases: LeaseBook,
    /// When the earliest retry this process scheduled becomes due.
    pub(super) next_due: Mutex<Option<Instant>>,
    /// Whether the last recorded attempt failed (logged on change; shrinks prefetch).
    pub(super) failing: AtomicBool,
    /// Batch limits, for a listener whose format and `batch_size` send batches.
    pub(super) batch: Option<BatchLimits>,
    /// For listeners that must be validated first (Event Grid webhooks): true once they are;
    /// nothing is claimed before.
    pub(super) validated: Option<tokio::sync::watch::Sender<bool>>,
}

/// How much one batch message may carry.
#[derive(Clone, Copy, Debug)]
pub(super) struct BatchLimits {
    /// Most events.
    pub(super) size: usize,
    /// Most body bytes (one larger event still goes, alone).
    pub(super) bytes: usize,
}

impl Lane {
    pub(super) fn new(
        index: usize,
        config: ListenerConfig,
        source_system: &str,
        lease_extra: Duration,
    ) -> Result<Lane, DispatchError> {
        let format = Format::for_listener(&config, source_system);
        let sink = Sink::for_listener(&config)?;
        let concurrency = config.concurrency.max(1);
        let limiter = config.rate_limit.and_then(quota).map(RateLimiter::direct);
        let batch = (config.batch_size > 1 && format.batches()).then(|| BatchLimits {
            size: config.batch_size,
            bytes: usize::try_from(config.batch_bytes).unwrap_or(usize::MAX),
        });
        // A batching listener holds enough for two full batches per slot.
        let per_slot = batch.map_or(PREFETCH_PER_SLOT, |b| {
            PREFETCH_PER_SLOT.max(b.size.saturating_mul(2))
        });
        let mut target = concurrency
            .saturating_mul(per_slot)
            .clamp(concurrency, MAX_OUTSTANDING.max(concurrency));
        if let Some(rate) = config.rate_limit {
            // The rate counts requests; a batch is one.
            let per_request = batch.map_or(1, |b| b.size);
            target = target.min(rate_limited_prefetch(rate).saturating_mul(per_request));
        }
        let lease = LeaseTimes::new(attempt_limit(&config), lease_extra);
        let validated = match &config.format {
            ListenerFormat::EventGrid(c)
                if matches!(c.delivery, EventGridDelivery::Webhook { .. }) =>
            {
                Some(tokio::sync::watch::Sender::new(false))
            }
            _ => None,
        };
        Ok(Lane {
            validated,
            index,
            format,
            sink,
            limiter,
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            wake: Notify::new(),
            events: Notify::new(),
            claims: ClaimState::new(),
            target,
            lease,
            leases: LeaseBook::default(),
            next_due: Mutex::new(None),
            failing: AtomicBool::new(false),
            batch,
            config,
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.config.name
    }

    /// Sends `message` through the sink, within the listener's timeout whatever the sink
    /// does: the lease arithmetic below relies on attempts that end in time.
    pub(super) async fn attempt(&self, event: &StoredEvent, message: Message) -> Attempt {
        let limit = self.lease.attempt;
        match tokio::time::timeout(limit, self.sink.send(event, message)).await {
            Ok(attempt) => attempt,
            Err(_) => timed_out(self, limit),
        }
    }

    /// How many to hold claimed. A failing listener gets no prefetch: its attempts are slow
    /// (timeouts) and rows waiting behind them would only sit on their leases.
    pub(super) fn target(&self) -> usize {
        if self.failing.load(Ordering::Acquire) {
            // One message per slot: a batch for a batching listener.
            let per_message = self.batch.map_or(1, |b| b.size);
            self.concurrency
                .saturating_mul(per_message)
                .min(self.target)
        } else {
            self.target
        }
    }

    /// When the earliest retry this process scheduled becomes due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        *lock(&self.next_due)
    }

    /// Whether a retry this process scheduled is due now (then forgets it).
    pub(super) fn take_due(&self) -> bool {
        let mut due = lock(&self.next_due);
        if due.is_some_and(|d| d <= Instant::now()) {
            *due = None;
            return true;
        }
        false
    }

    pub(super) fn schedule(&self, due: Instant) {
        let mut next = lock(&self.next_due);
        *next = Some(next.map_or(due, |n| n.min(due)));
    }

    /// Whether an attempt for `c` starting `now` ends before its lease does. It may not when
    /// the lease was lost to another process (its renewal failed) or too little of it is
    /// left: another process could deliver it at the same time, so it is handed back instead
    /// (a no-op in the database when the lease is no longer ours).
    pub(super) fn startable(&self, c: &ClaimedRow, now: Instant) -> bool {
        let until = self.leases.until(c.notification.id, c.claim);
        let ok = until.is_some_and(|until| self.lease.may_start(now, until));
        if !ok {
            debug!(
                listener = self.name(),
                notification = c.notification.id,
                lost = until.is_none(),
                "not starting an attempt that could outlive its lease"
            );
        }
        ok
    }
}

/// The attempt that had no outcome within `limit`.
pub(super) fn timed_out(lane: &Lane, limit: Duration) -> Attempt {
    Attempt {
        outcome: Outcome::TimedOut,
        status_code: None,
        comment: Some(format!(
            "no outcome within {} from {}",
            humantime::format_duration(lane.config.timeout),
            lane.sink.target()
        )),
        retry_after: None,
        latency: limit,
    }
}

/// The longest an attempt may take: the listener's timeout, plus a little for the sink to
/// notice its own timeout and report it in its words.
fn attempt_limit(config: &ListenerConfig) -> Duration {
    config.timeout.saturating_add(ATTEMPT_GRACE)
}

/// The governor quota for `count` per `per`: a burst of `count`, then one every `per/count`.
fn quota(rate: RateLimit) -> Option<Quota> {
    let count = NonZeroU32::new(rate.count)?;
    let period = rate.per.checked_div(rate.count)?;
    Some(Quota::with_period(period)?.allow_burst(count))
}

/// How many a rate-limited listener claims ahead: what it may send in a few seconds.
fn rate_limited_prefetch(rate: RateLimit) -> usize {
    let per_second = f64::from(rate.count) / rate.per.as_secs_f64().max(1e-9);
    let n = (per_second * RATE_LIMITED_PREFETCH.as_secs_f64()).ceil();
    if n.is_finite() && n >= 1.0 {
        // Bounded above by MAX_OUTSTANDING through the caller's min.
        n.min(MAX_OUTSTANDING as f64) as usize
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_quota_allows_a_burst_of_count_then_one_per_period() {
        let q = quota(RateLimit {
            count: 20,
            per: Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!(q.burst_size().get(), 20);
        assert_eq!(q.replenish_interval(), Duration::from_millis(50));
        assert!(
            quota(RateLimit {
                count: 0,
                per: Duration::from_secs(1)
            })
            .is_none()
        );
    }

    #[test]
    fn rate_limited_listeners_claim_only_a_few_seconds_ahead() {
        let r = |count, per| rate_limited_prefetch(RateLimit { count, per });
        assert_eq!(r(20, Duration::from_secs(1)), 100);
        assert_eq!(r(1, Duration::from_secs(3600)), 1);
        assert_eq!(r(u32::MAX, Duration::from_millis(1)), MAX_OUTSTANDING);
    }
}

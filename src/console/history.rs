//! The last hour of the process's counters, sampled every [`SAMPLE_INTERVAL`] into a ring
//! buffer: rates and latencies for the console's charts without a time-series database.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::metrics::{LATENCY_BUCKETS, Metrics, Totals};

/// How often the counters are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// How much history is kept.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Samples kept: one window, plus one so the oldest interval has a start.
const CAPACITY: usize = (WINDOW.as_secs() / SAMPLE_INTERVAL.as_secs()) as usize + 1;

/// One sample of the counters.
#[derive(Clone, Debug)]
struct Sample {
    /// Wall clock, for the charts' time axis.
    at: SystemTime,
    /// Monotonic clock, for the intervals' lengths.
    mono: Instant,
    totals: Totals,
}

/// What happened between two consecutive samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Interval {
    /// When the interval ended.
    pub end: SystemTime,
    /// Entity events queued per second.
    pub events_per_sec: f64,
    /// Successful deliveries per second, all listeners.
    pub delivered_per_sec: f64,
    /// Mean commit→2xx latency in seconds; `None` without deliveries.
    pub latency_mean: Option<f64>,
    /// 95th percentile of the commit→2xx latency, estimated from the histogram buckets.
    pub latency_p95: Option<f64>,
}

/// One listener's attempts over a span of history.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ListenerActivity {
    /// Successful attempts.
    pub delivered: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Failed attempts after which the notification moved to Failed.
    pub failed: u64,
    /// Length of the span in seconds (0 without two samples).
    pub seconds: f64,
}

impl ListenerActivity {
    /// Deliveries per second over the span.
    pub fn delivered_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.delivered as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The ring buffer; shared as `Arc<History>` between the sampler and the pages.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a sample of `metrics` taken now, dropping the oldest beyond the window.
    pub fn sample(&self, metrics: &Metrics) {
        self.push(SystemTime::now(), Instant::now(), metrics.totals());
    }

    fn push(&self, at: SystemTime, mono: Instant, totals: Totals) {
        let mut samples = self.lock();
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(Sample { at, mono, totals });
    }

    /// Every interval between consecutive samples, oldest first.
    pub fn intervals(&self) -> Vec<Interval> {
        let samples = self.lock();
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .filter_map(|(a, b)| interval(a, b))
            .collect()
    }

    /// Each listener's attempts over the last `span` (or as much of it as is sampled).
    pub fn listener_activity(&self, span: Duration) -> Vec<(String, ListenerActivity)> {
        let samples = self.lock();
        let Some(last) = samples.back() else {
            return Vec::new();
        };
        let first = samples
            .iter()
            .find(|s| last.mono.duration_since(s.mono) <= span)
            .unwrap_or(last);
        let seconds = last.mono.duration_since(first.mono).as_secs_f64();
        last.totals
            .listeners
            .iter()
            .map(|(name, now)| {
                let before = first
                    .totals
                    .listeners
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or([0; 3], |(_, a)| *a);
                let d = |i: usize| now[i].saturating_sub(before[i]);
                (
                    name.clone(),
                    ListenerActivity {
                        delivered: d(0),
                        retried: d(1),
                        failed: d(2),
                        seconds,
                    },
                )
            })
            .collect()
    }
}

fn interval(a: &Sample, b: &Sample) -> Option<Interval> {
    let secs = b.mono.checked_duration_since(a.mono)?.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let delivered = |t: &Totals| -> u64 { t.listeners.iter().map(|(_, a)| a[0]).sum() };
    let count = b
        .totals
        .latency_count
        .saturating_sub(a.totals.latency_count);
    let sum = b
        .totals
        .latency_sum_nanos
        .saturating_sub(a.totals.latency_sum_nanos);
    let mut buckets = [0u64; LATENCY_BUCKETS.len()];
    for (d, (x, y)) in buckets.iter_mut().zip(
        a.totals
            .latency_buckets
            .iter()
            .zip(b.totals.latency_buckets.iter()),
    ) {
        *d = y.saturating_sub(*x);
    }
    Some(Interval {
        end: b.at,
        events_per_sec: b
            .totals
            .events_queued
            .saturating_sub(a.totals.events_queued) as f64
            / secs,
        delivered_per_sec: delivered(&b.totals).saturating_sub(delivered(&a.totals)) as f64 / secs,
        latency_mean: (count > 0).then(|| sum as f64 / 1e9 / count as f64),
        latency_p95: quantile(&buckets, count, 0.95),
    })
}

/// The `q` quantile of a histogram with non-cumulative `buckets` over [`LATENCY_BUCKETS`]
/// and `count` observations (those above the last bound count only there), interpolated
/// linearly within its bucket as Prometheus' `histogram_quantile` does.
fn quantile(buckets: &[u64; LATENCY_BUCKETS.len()], count: u64, q: f64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = q * count as f64;
    let mut seen = 0u64;
    let mut lower = 0.0;
    for (n, upper) in buckets.iter().zip(LATENCY_BUCKETS) {
        if (seen + n) as f64 >= rank && *n > 0 {
            let within = (rank - seen as f64) / *n as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += n;
        lower = upper;
    }
    // Above the last bound: all that can be said is "more than that".
    LATENCY_BUCKETS.last().copied()
}

/// Samples `metrics` into `history` every [`SAMPLE_INTERVAL`] until `shutdown`.
pub fn spawn_sampler(
    history: Arc<History>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => history.sample(&metrics),
                _ = shutdown.cancelled() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(queued: u64, delivered: u64, latency_ms: &[u64]) -> Totals {
        let mut t = Totals {
            events_queued: queued,
            listeners: vec![("crm".to_owned(), [delivered, 1, 0])],
            ..Totals::default()
        };
        for ms in latency_ms {
            let secs = *ms as f64 / 1000.0;
            if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
                t.latency_buckets[i] += 1;
            }
            t.latency_count += 1;
            t.latency_sum_nanos += ms * 1_000_000;
        }
        t
    }

    #[test]
    fn intervals_turn_counter_differences_into_rates_and_latencies() {
        let h = History::new();
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        h.push(w0, t0, totals(0, 0, &[]));
        h.push(
            w0 + Duration::from_secs(10),
            t0 + Duration::from_secs(10),
            totals(100, 50, &[20, 20, 20, 20, 20, 20, 20, 20, 20, 2000]),
        );
        let i = h.intervals();
        assert_eq!(i.len(), 1);
        assert_eq!(i[0].events_per_sec, 10.0);
        assert_eq!(i[0].delivered_per_sec, 5.0);
        let mean = i[0].latency_mean.unwrap();
        assert!((mean - 0.218).abs() < 1e-9, "{mean}");
        // 9 of 10 at ≤25 ms, the 10th in (1, 2.5]: p95 lies inside that bucket.
        let p95 = i[0].latency_p95.unwrap();
        assert!((1.0..=2.5).contains(&p95), "{p95}");
    }

    #[test]
    fn the_ring_keeps_one_hour_and_activity_covers_the_asked_span() {
        let h = History::new();
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        for i in 0..(CAPACITY as u64 + 30) {
            h.push(
                w0 + SAMPLE_INTERVAL * i as u32,
                t0 + SAMPLE_INTERVAL * i as u32,
                totals(i, 2 * i, &[]),
            );
        }
        assert_eq!(h.intervals().len(), CAPACITY - 1);
        let a = h.listener_activity(Duration::from_secs(60));
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].1.seconds, 60.0);
        assert_eq!(a[0].1.delivered, 12);
        assert_eq!(a[0].1.delivered_per_sec(), 0.2);
    }

    #[test]
    fn quantiles_of_empty_or_overflowing_histograms() {
        let empty = [0u64; LATENCY_BUCKETS.len()];
        assert_eq!(quantile(&empty, 0, 0.95), None);
        // Every observation above the last bound.
        assert_eq!(quantile(&empty, 5, 0.95), Some(60.0));
    }
}

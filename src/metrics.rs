//! Process metrics and their Prometheus text exposition.
//!
//! Unlabelled counters and gauges are plain atomics. Labelled series live in maps behind a
//! `RwLock`: a series is created once (write lock) and then updated through a shared `Arc`
//! of atomics under the read lock, so the hot path never waits on another writer and the
//! label sets stay small (listeners, entities and actions come from the config).
//!
//! Every series of a configured listener or entity exists from start at 0
//! ([`Metrics::register`]), so alert rules see `rate()` and `increase()` from the first
//! scrape instead of a series appearing with its first failure.

mod process;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;

/// Upper bounds (seconds) of the commit→2xx latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Queue depth and age of the oldest `New` notification, per listener.
const SQL_QUEUE_GAUGES: &str = "\
SELECT listener, count(*)::bigint AS depth,
       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest_age
  FROM walhook.new
 GROUP BY listener
UNION ALL
SELECT l.name, 0::bigint, 0::float8
  FROM walhook.listener l
 WHERE NOT EXISTS (SELECT 1 FROM walhook.new n WHERE n.listener = l.name)";

/// A cursor listener's backlog: the events after its cursor. Asked only when a cursor
/// exists, so that without one the gauges never wait on `walhook.event` (a DBA's lock on
/// it must not silence the retained-WAL warning that follows them).
const SQL_CURSOR_GAUGES: &str = concat!(
    "SELECT b.listener, b.backlog::bigint,
       COALESCE(EXTRACT(EPOCH FROM now() - b.oldest), 0)::float8
  FROM (",
    crate::queue::cursor_backlog!(),
    ") b"
);

const SQL_HAS_CURSORS: &str = "SELECT EXISTS (SELECT 1 FROM walhook.listener_cursor)";

/// Rows in `walhook.failed` per listener, configured listeners included at 0.
const SQL_FAILED_COUNTS: &str = "\
SELECT listener, count(*)::bigint FROM walhook.failed GROUP BY listener
UNION ALL
SELECT l.name, 0::bigint
  FROM walhook.listener l
 WHERE NOT EXISTS (SELECT 1 FROM walhook.failed f WHERE f.listener = l.name)";

/// Counting walhook.failed scans it (nothing indexes the listener): while it holds more
/// rows than this, the count is refreshed every [`FAILED_SLOW_INTERVAL`] only.
const FAILED_LARGE: u64 = 100_000;
/// How often the count of a large walhook.failed is refreshed.
const FAILED_SLOW_INTERVAL: Duration = Duration::from_secs(60);

/// Bytes of WAL the slot has not confirmed, and the walsender's flush lag when it reports one.
///
/// `flush_lag` is NULL when no walsender is attached or the standby is idle and caught up;
/// a slot with zero byte lag is zero seconds behind whatever the walsender says.
const SQL_SLOT_LAG: &str = "\
SELECT GREATEST(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::float8 AS lag_bytes,
       CASE WHEN pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn) <= 0 THEN 0::float8
            ELSE EXTRACT(EPOCH FROM r.flush_lag)::float8 END AS lag_seconds,
       s.confirmed_flush_lsn::text AS confirmed
  FROM pg_replication_slots s
  LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
 WHERE s.slot_name = $1";

/// Outcome of one delivery attempt, the `outcome` label of `walhook_delivery_attempts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttemptOutcome {
    /// The listener answered 2xx.
    Success,
    /// The attempt failed and the notification will be tried again.
    Retry,
    /// The attempt failed and it was the last one: the notification moved to Failed.
    Failed,
}

impl AttemptOutcome {
    /// Every outcome, in label order.
    const ALL: [AttemptOutcome; 3] = [
        AttemptOutcome::Success,
        AttemptOutcome::Retry,
        AttemptOutcome::Failed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Failed => "failed",
        }
    }
}

/// Final status of a notification, the `status` label of `walhook_notifications_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotificationStatus {
    /// Delivered and moved to `walhook.processed`.
    Processed,
    /// Given up on and moved to `walhook.failed`.
    Failed,
}

impl NotificationStatus {
    /// Every status, in label order.
    const ALL: [NotificationStatus; 2] =
        [NotificationStatus::Processed, NotificationStatus::Failed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Processed => "processed",
            NotificationStatus::Failed => "failed",
        }
    }
}

/// One listener's delivery counters, indexed by `AttemptOutcome` / `NotificationStatus`.
#[derive(Debug, Default)]
struct ListenerCounters {
    attempts: [AtomicU64; 3],
    notifications: [AtomicU64; 2],
}

/// A float stored in an `AtomicU64` as its bit pattern (gauges may be fractional).
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// One latency histogram: cumulative-at-render bucket counts, count and sum.
#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS`]; observations above the last
    /// bound only land in `count`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in nanoseconds: integer adds stay lock-free and exact.
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b)
            && let Some(bucket) = self.buckets.get(i)
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Queue gauges of one listener.
#[derive(Debug, Default)]
struct QueueGauges {
    depth: AtomicU64,
    oldest_age_seconds: AtomicF64,
}

/// A map of label tuples to shared series, created on first use.
#[derive(Debug)]
struct Family<K, V> {
    series: RwLock<BTreeMap<K, Arc<V>>>,
}

impl<K: Ord + Clone, V: Default> Family<K, V> {
    fn new() -> Self {
        Family {
            series: RwLock::new(BTreeMap::new()),
        }
    }

    // A panic elsewhere while holding the lock leaves the map itself intact: keep serving it.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<K, Arc<V>>> {
        self.series.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<K, Arc<V>>> {
        self.series.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The series for `key`, looked up under the read lock and created only when missing.
    fn get<Q>(&self, key: &Q) -> Arc<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(v) = self.read().get(key) {
            return Arc::clone(v);
        }
        Arc::clone(self.write().entry(key.to_owned()).or_default())
    }

    fn snapshot(&self) -> Vec<(K, Arc<V>)> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }
}

/// The metrics registry of one walhook process, shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    events_read: AtomicU64,
    events_queued: Family<(String, String), AtomicU64>,
    changes_rejected: Family<String, AtomicU64>,
    /// Per listener, so an attempt looks the listener up by `&str` without allocating.
    delivery: Family<String, ListenerCounters>,
    latency: Family<String, Histogram>,
    lag_bytes: AtomicU64,
    lag_seconds: AtomicF64,
    queues: Family<String, QueueGauges>,
    /// The listeners of the current configuration, whose gauges always exist.
    configured: RwLock<Vec<String>>,
    /// Rows in walhook.failed per listener, as last counted.
    failed: Family<String, AtomicU64>,
    /// When walhook.failed was last counted, and its total then.
    failed_counted: Mutex<Option<(Instant, u64)>>,
    /// A count arrived that [`Metrics::fresh_failed_counts`] has not handed out yet.
    failed_fresh: AtomicBool,
    database_up: AtomicU64,
    /// The slot's confirmed_flush_lsn as last seen, and when it last moved (unix seconds).
    slot_confirmed: Mutex<Option<String>>,
    slot_advanced_at: AtomicF64,
    reconnects: AtomicU64,
    streaming: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Metrics {
        Metrics {
            events_read: AtomicU64::new(0),
            events_queued: Family::new(),
            changes_rejected: Family::new(),
            delivery: Family::new(),
            latency: Family::new(),
            lag_bytes: AtomicU64::new(0),
            lag_seconds: AtomicF64::default(),
            queues: Family::new(),
            configured: RwLock::new(Vec::new()),
            failed: Family::new(),
            failed_counted: Mutex::new(None),
            failed_fresh: AtomicBool::new(false),
            database_up: AtomicU64::new(0),
            slot_confirmed: Mutex::new(None),
            slot_advanced_at: AtomicF64::default(),
            reconnects: AtomicU64::new(0),
            streaming: AtomicU64::new(0),
        }
    }

    /// Creates every series of `config`'s listeners and entities at 0; call it at start and
    /// after each reload. Series of listeners and entities removed since keep their values.
    pub fn register(&self, config: &Config) {
        *self.configured.write().unwrap_or_else(|e| e.into_inner()) =
            config.listeners.iter().map(|l| l.name.clone()).collect();
        for listener in &config.listeners {
            let name = listener.name.as_str();
            self.delivery.get(name);
            self.latency.get(name);
            self.queues.get(name);
            self.failed.get(name);
        }
        for entity in &config.entities {
            for action in &entity.actions {
                let key = (entity.name.as_str().to_owned(), action.as_str().to_owned());
                self.events_queued.get(&key);
            }
        }
    }

    /// Counts `n` decoded row changes (Insert/Update/Delete messages).
    pub fn events_read(&self, n: u64) {
        self.events_read.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one entity event written to the queue.
    pub fn event_queued(&self, entity: &str, action: &str) {
        self.events_queued(&[(entity, action, 1)]);
    }

    /// Counts entity events of one committed queue batch: `(entity, action, count)` triples.
    pub fn events_queued(&self, batch: &[(&str, &str, u64)]) {
        for (entity, action, n) in batch {
            // Two small allocations per (entity, action) of a batch, not per event.
            let key = ((*entity).to_owned(), (*action).to_owned());
            let counter = self.events_queued.get(&key);
            counter.fetch_add(*n, Ordering::Relaxed);
        }
    }

    /// Counts `n` changes of `entity` set aside in `walhook.rejected` instead of queued.
    pub fn changes_rejected(&self, entity: &str, n: u64) {
        self.changes_rejected
            .get(entity)
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Records one delivery attempt; `commit_to_ack` is the time from the source commit to
    /// the listener's 2xx and feeds the latency histogram (pass it for successes only).
    pub fn delivery_attempt(
        &self,
        listener: &str,
        outcome: AttemptOutcome,
        commit_to_ack: Option<Duration>,
    ) {
        self.delivery.get(listener).attempts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(d) = commit_to_ack {
            self.latency.get(listener).observe(d);
        }
    }

    /// Counts a notification that reached its final status.
    pub fn notification_completed(&self, listener: &str, status: NotificationStatus) {
        self.delivery.get(listener).notifications[status as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces the walhook.failed row counts: listeners missing from `counts` stop being
    /// reported, unless they are configured (they read 0).
    pub fn set_failed_counts(&self, counts: &[(String, u64)]) {
        let mut map = self.configured_at_zero();
        map.extend(
            counts
                .iter()
                .map(|(listener, n)| (listener.clone(), Arc::new(AtomicU64::new(*n)))),
        );
        *self.failed.write() = map;
        self.failed_fresh.store(true, Ordering::Relaxed);
    }

    /// The walhook.failed row counts once after each new count, else `None` (a large table
    /// is counted less often than the other gauges are refreshed).
    pub fn fresh_failed_counts(&self) -> Option<Vec<(String, u64)>> {
        self.failed_fresh
            .swap(false, Ordering::Relaxed)
            .then(|| self.failed_counts())
    }

    /// Rows in walhook.failed per listener, as last counted.
    pub fn failed_counts(&self) -> Vec<(String, u64)> {
        self.failed
            .snapshot()
            .into_iter()
            .map(|(listener, n)| (listener, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Whether the last query on the queue database succeeded.
    pub fn set_database_up(&self, up: bool) {
        self.database_up.store(u64::from(up), Ordering::Relaxed);
    }

    /// Records the slot's confirmed_flush_lsn; a change (or the first sight) stamps
    /// `walhook_replication_last_advance_timestamp_seconds`.
    fn slot_confirmed(&self, lsn: &str, now: SystemTime) {
        let mut last = self
            .slot_confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(lsn) {
            *last = Some(lsn.to_owned());
            let secs = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.slot_advanced_at.set(secs);
        }
    }

    /// Sets the replication slot lag; `seconds: None` (unknown right now) keeps the last value.
    pub fn set_replication_lag(&self, bytes: u64, seconds: Option<f64>) {
        self.lag_bytes.store(bytes, Ordering::Relaxed);
        if let Some(s) = seconds {
            self.lag_seconds.set(s.max(0.0));
        }
    }

    /// Sets one listener's queue depth (New rows) and the age of its oldest New row.
    pub fn set_queue(&self, listener: &str, depth: u64, oldest_age: Duration) {
        let q = self.queues.get(listener);
        q.depth.store(depth, Ordering::Relaxed);
        q.oldest_age_seconds.set(oldest_age.as_secs_f64());
    }

    /// Replaces all queue gauges at once: listeners missing from `queues` stop being
    /// reported, unless they are configured (they read 0).
    pub fn set_queues(&self, queues: &[(String, u64, Duration)]) {
        let mut map = self.configured_at_zero();
        for (listener, depth, age) in queues {
            let q = QueueGauges::default();
            q.depth.store(*depth, Ordering::Relaxed);
            q.oldest_age_seconds.set(age.as_secs_f64());
            map.insert(listener.clone(), Arc::new(q));
        }
        *self.queues.write() = map;
    }

    /// A fresh zero series for every configured listener.
    fn configured_at_zero<V: Default>(&self) -> BTreeMap<String, Arc<V>> {
        self.configured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| (l.clone(), Arc::default()))
            .collect()
    }

    /// The replication lag in bytes, as last refreshed.
    pub fn lag_bytes(&self) -> u64 {
        self.lag_bytes.load(Ordering::Relaxed)
    }

    /// Each listener's oldest undelivered age, for listeners with something waiting.
    pub fn queue_ages(&self) -> Vec<(String, Duration)> {
        self.queues
            .read()
            .iter()
            .filter(|(_, q)| q.depth.load(Ordering::Relaxed) > 0)
            .map(|(name, q)| {
                let secs = q.oldest_age_seconds.get();
                let age = if secs.is_finite() && secs > 0.0 {
                    Duration::from_secs_f64(secs)
                } else {
                    Duration::ZERO
                };
                (name.clone(), age)
            })
            .collect()
    }

    /// One line for systemd's STATUS=: replication lag and undelivered notifications.
    pub fn summary(&self) -> String {
        let lag = self.lag_bytes.load(Ordering::Relaxed);
        let depth: u64 = self
            .queues
            .read()
            .values()
            .map(|q| q.depth.load(Ordering::Relaxed))
            .sum();
        format!("replication lag {lag} bytes; {depth} notification(s) undelivered")
    }

    /// Counts one reconnect of the replication stream.
    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the replication stream is currently streaming.
    pub fn set_streaming(&self, streaming: bool) {
        self.streaming
            .store(u64::from(streaming), Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);

        header(
            &mut out,
            "walhook_build_info",
            "gauge",
            "Always 1; the labels name the running walhook.",
        );
        sample(
            &mut out,
            "walhook_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1u64,
        );

        header(
            &mut out,
            "walhook_events_read_total",
            "counter",
            "Row changes decoded from the replication stream.",
        );
        sample(
            &mut out,
            "walhook_events_read_total",
            &[],
            self.events_read.load(Ordering::Relaxed),
        );

        header(
            &mut out,
            "walhook_events_queued_total",
            "counter",
            "Entity events written to the queue.",
        );
        for ((entity, action), c) in self.events_queued.snapshot() {
            sample(
                &mut out,
                "walhook_events_queued_total",
                &[("entity", &entity), ("action", &action)],
                c.load(Ordering::Relaxed),
            );
        }

        header(
            &mut out,
            "walhook_changes_rejected_total",
            "counter",
            "Row changes set aside in walhook.rejected instead of queued (see its reason column).",
        );
        for (entity, c) in self.changes_rejected.snapshot() {
            sample(
                &mut out,
                "walhook_changes_rejected_total",
                &[("entity", &entity)],
                c.load(Ordering::Relaxed),
            );
        }

        header(
            &mut out,
            "walhook_notifications_total",
            "counter",
            "Notifications that reached a final status.",
        );
        let delivery = self.delivery.snapshot();
        for (listener, counters) in &delivery {
            for status in NotificationStatus::ALL {
                sample(
                    &mut out,
                    "walhook_notifications_total",
                    &[("listener", listener), ("status", status.as_str())],
                    counters.notifications[status as usize].load(Ordering::Relaxed),
                );
            }
        }

        header(
            &mut out,
            "walhook_delivery_attempts_total",
            "counter",
            "Delivery attempts by outcome.",
        );
        for (listener, counters) in &delivery {
            for outcome in AttemptOutcome::ALL {
                sample(
                    &mut out,
                    "walhook_delivery_attempts_total",
                    &[("listener", listener), ("outcome", outcome.as_str())],
                    counters.attempts[outcome as usize].load(Ordering::Relaxed),
                );
            }
        }

        header(
            &mut out,
            "walhook_delivery_latency_seconds",
            "histogram",
            "Time from the source commit to the listener's 2xx answer.",
        );
        for (listener, h) in self.latency.snapshot() {
            render_histogram(&mut out, "walhook_delivery_latency_seconds", &listener, &h);
        }

        header(
            &mut out,
            "walhook_replication_lag_bytes",
            "gauge",
            "WAL bytes the replication slot has not confirmed as flushed.",
        );
        sample(
            &mut out,
            "walhook_replication_lag_bytes",
            &[],
            self.lag_bytes.load(Ordering::Relaxed),
        );

        header(
            &mut out,
            "walhook_replication_lag_seconds",
            "gauge",
            "How far the replication slot's flush position is behind, in seconds.",
        );
        sample(
            &mut out,
            "walhook_replication_lag_seconds",
            &[],
            self.lag_seconds.get(),
        );

        let queues = self.queues.snapshot();
        header(
            &mut out,
            "walhook_queue_depth",
            "gauge",
            "Notifications waiting for delivery (walhook.new rows).",
        );
        for (listener, q) in &queues {
            sample(
                &mut out,
                "walhook_queue_depth",
                &[("listener", listener)],
                q.depth.load(Ordering::Relaxed),
            );
        }
        header(
            &mut out,
            "walhook_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest notification waiting for delivery.",
        );
        for (listener, q) in &queues {
            sample(
                &mut out,
                "walhook_queue_oldest_age_seconds",
                &[("listener", listener)],
                q.oldest_age_seconds.get(),
            );
        }

        header(
            &mut out,
            "walhook_failed_notifications",
            "gauge",
            "Notifications in walhook.failed (out of attempts; `walhook retry` requeues them).",
        );
        for (listener, n) in self.failed_counts() {
            sample(
                &mut out,
                "walhook_failed_notifications",
                &[("listener", &listener)],
                n,
            );
        }

        header(
            &mut out,
            "walhook_database_up",
            "gauge",
            "1 while the last query on the queue database succeeded, else 0.",
        );
        sample(
            &mut out,
            "walhook_database_up",
            &[],
            self.database_up.load(Ordering::Relaxed),
        );

        header(
            &mut out,
            "walhook_replication_last_advance_timestamp_seconds",
            "gauge",
            "Unix time the slot's confirmed position was last seen to move (0: not seen yet).",
        );
        sample(
            &mut out,
            "walhook_replication_last_advance_timestamp_seconds",
            &[],
            self.slot_advanced_at.get(),
        );

        header(
            &mut out,
            "walhook_reconnects_total",
            "counter",
            "Reconnects of the replication stream.",
        );
        sample(
            &mut out,
            "walhook_reconnects_total",
            &[],
            self.reconnects.load(Ordering::Relaxed),
        );

        header(
            &mut out,
            "walhook_streaming",
            "gauge",
            "1 while the replication stream is streaming, else 0.",
        );
        sample(
            &mut out,
            "walhook_streaming",
            &[],
            self.streaming.load(Ordering::Relaxed),
        );

        process::ProcessStats::read().render(&mut out);
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A sample value: integers print exactly, floats in Prometheus spelling.
trait SampleValue {
    fn write_to(&self, out: &mut String);
}

impl SampleValue for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for f64 {
    fn write_to(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl SampleValue) {
    out.push_str(name);
    write_labels(out, labels);
    out.push(' ');
    value.write_to(out);
    out.push('\n');
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
}

fn render_histogram(out: &mut String, name: &str, listener: &str, h: &Histogram) {
    let bucket_name = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (bound, count) in LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
        cumulative += count.load(Ordering::Relaxed);
        let le = format!("{bound}");
        sample(
            out,
            &bucket_name,
            &[("listener", listener), ("le", &le)],
            cumulative,
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    sample(
        out,
        &bucket_name,
        &[("listener", listener), ("le", "+Inf")],
        count,
    );
    let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    sample(out, &format!("{name}_sum"), &[("listener", listener)], sum);
    sample(
        out,
        &format!("{name}_count"),
        &[("listener", listener)],
        count,
    );
}

/// Escapes a label value for the text format: backslash, double quote and newline.
pub fn escape_label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes only backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Reads queue depth and age per listener and the slot's lag from the database into `metrics`.
///
/// Call it periodically (every 5–15 s) on an ordinary connection to the queue database; an
/// error means the queue database is unreachable (or the schema is missing) for readiness.
pub async fn refresh_gauges(
    client: &tokio_postgres::Client,
    metrics: &Metrics,
    slot: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut rows = client.query(SQL_QUEUE_GAUGES, &[]).await?;
    if client.query_one(SQL_HAS_CURSORS, &[]).await?.try_get(0)? {
        rows.extend(client.query(SQL_CURSOR_GAUGES, &[]).await?);
    }
    let mut queues: Vec<(String, u64, Duration)> = Vec::with_capacity(rows.len());
    for row in rows {
        let listener: String = row.try_get(0)?;
        let depth = u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0);
        let age = duration_from_secs(row.try_get(2)?);
        // A listener's queue rows and its cursor's backlog add up.
        match queues.iter_mut().find(|(l, _, _)| *l == listener) {
            Some((_, d, a)) => {
                *d += depth;
                *a = (*a).max(age);
            }
            None => queues.push((listener, depth, age)),
        }
    }
    metrics.set_queues(&queues);
    refresh_failed_counts(client, metrics).await?;

    // No slot (not set up yet, or dropped): report nothing rather than a made-up zero.
    if let Some(row) = client.query_opt(SQL_SLOT_LAG, &[&slot]).await? {
        let bytes: Option<f64> = row.try_get(0)?;
        let seconds: Option<f64> = row.try_get(1)?;
        if let Some(bytes) = bytes {
            // Saturating float→int conversion; lag is never negative after GREATEST.
            metrics.set_replication_lag(bytes as u64, seconds);
        }
        let confirmed: Option<String> = row.try_get(2)?;
        if let Some(lsn) = confirmed {
            metrics.slot_confirmed(&lsn, SystemTime::now());
        }
    }
    Ok(())
}

/// Counts walhook.failed per listener: at every refresh while the table is small, every
/// [`FAILED_SLOW_INTERVAL`] once it is large.
async fn refresh_failed_counts(
    client: &tokio_postgres::Client,
    metrics: &Metrics,
) -> Result<(), tokio_postgres::Error> {
    let due = match *metrics
        .failed_counted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
    {
        Some((at, total)) => total < FAILED_LARGE || at.elapsed() >= FAILED_SLOW_INTERVAL,
        None => true,
    };
    if !due {
        return Ok(());
    }
    let rows = client.query(SQL_FAILED_COUNTS, &[]).await?;
    let mut counts = Vec::with_capacity(rows.len());
    for row in rows {
        let listener: String = row.try_get(0)?;
        let n: i64 = row.try_get(1)?;
        counts.push((listener, u64::try_from(n).unwrap_or(0)));
    }
    let total = counts.iter().map(|(_, n)| n).sum();
    metrics.set_failed_counts(&counts);
    *metrics
        .failed_counted
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), total));
    Ok(())
}

fn duration_from_secs(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::ZERO)
}

/// Counter totals at one instant, for in-process history (the console's charts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Entity events written to the queue, all entities and actions.
    pub events_queued: u64,
    /// Per listener: attempts by [`AttemptOutcome`] (success, retry, failed), by name.
    pub listeners: Vec<(String, [u64; 3])>,
    /// Commit→2xx latency of every listener together: non-cumulative counts per bucket of
    /// [`LATENCY_BUCKETS`], the count (including observations above the last bound) and the
    /// sum in nanoseconds.
    pub latency_buckets: [u64; LATENCY_BUCKETS.len()],
    /// Observations in the latency histogram.
    pub latency_count: u64,
    /// Their sum in nanoseconds.
    pub latency_sum_nanos: u64,
}

impl Metrics {
    /// The counters' current totals.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            events_queued: self
                .events_queued
                .snapshot()
                .iter()
                .map(|(_, c)| c.load(Ordering::Relaxed))
                .sum(),
            ..Totals::default()
        };
        for (listener, c) in self.delivery.snapshot() {
            let attempts =
                AttemptOutcome::ALL.map(|o| c.attempts[o as usize].load(Ordering::Relaxed));
            t.listeners.push((listener, attempts));
        }
        for (_, h) in self.latency.snapshot() {
            for (sum, b) in t.latency_buckets.iter_mut().zip(h.buckets.iter()) {
                *sum += b.load(Ordering::Relaxed);
            }
            t.latency_count += h.count.load(Ordering::Relaxed);
            t.latency_sum_nanos = t
                .latency_sum_nanos
                .saturating_add(h.sum_nanos.load(Ordering::Relaxed));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_quotes_backslashes_and_newlines() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("line1\nline2"), "line1\\nline2");
        let m = Metrics::new();
        m.event_queued("Cust\"omer\\\n", "Created");
        let text = m.render();
        assert!(
            text.contains(
                "walhook_events_queued_total{entity=\"Cust\\\"omer\\\\\\n\",action=\"Created\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_overflow_only_in_inf() {
        let m = Metrics::new();
        m.delivery_attempt(
            "crm",
            AttemptOutcome::Success,
            Some(Duration::from_millis(3)),
        );
        m.delivery_attempt("crm", AttemptOutcome::Success, Some(Duration::from_secs(2)));
        m.delivery_attempt(
            "crm",
            AttemptOutcome::Success,
            Some(Duration::from_secs(120)),
        );
        let text = m.render();
        for (le, n) in [
            ("0.001", 0),
            ("0.005", 1),
            ("2.5", 2),
            ("60", 2),
            ("+Inf", 3),
        ] {
            let line = format!(
                "walhook_delivery_latency_seconds_bucket{{listener=\"crm\",le=\"{le}\"}} {n}\n"
            );
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("walhook_delivery_latency_seconds_sum{listener=\"crm\"} 122.003\n"));
        assert!(
            text.contains(
                "walhook_delivery_attempts_total{listener=\"crm\",outcome=\"success\"} 3\n"
            )
        );
    }

    #[test]
    fn set_queues_drops_listeners_no_longer_reported() {
        let m = Metrics::new();
        m.set_queue("old", 5, Duration::from_secs(1));
        m.set_queues(&[("new".to_owned(), 2, Duration::from_secs(3))]);
        let text = m.render();
        assert!(!text.contains("listener=\"old\""), "{text}");
        assert!(text.contains("walhook_queue_depth{listener=\"new\"} 2\n"));
        assert!(text.contains("walhook_queue_oldest_age_seconds{listener=\"new\"} 3\n"));
    }

    #[test]
    fn configured_listeners_keep_their_gauges_at_zero_when_the_database_omits_them() {
        let text = "[source]\nurl = \"postgres://x@localhost/app\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n[[listener]]\nname = \"crm\"\nurl = \"http://127.0.0.1:9/h\"\n";
        let config =
            Config::parse_with_env(text, std::path::Path::new("w.toml"), &|_| None).unwrap();
        let m = Metrics::new();
        m.register(&config);
        m.set_queues(&[]);
        m.set_failed_counts(&[("gone".to_owned(), 4)]);
        let text = m.render();
        for line in [
            "walhook_queue_depth{listener=\"crm\"} 0\n",
            "walhook_failed_notifications{listener=\"crm\"} 0\n",
            "walhook_failed_notifications{listener=\"gone\"} 4\n",
            "walhook_delivery_attempts_total{listener=\"crm\",outcome=\"retry\"} 0\n",
            "walhook_events_queued_total{entity=\"Customer\",action=\"Deleted\"} 0\n",
            "walhook_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
        assert_eq!(m.fresh_failed_counts().map(|c| c.len()), Some(2));
        assert_eq!(m.fresh_failed_counts(), None, "handed out once per count");
    }

    #[test]
    fn the_slot_advance_time_moves_only_when_the_confirmed_position_does() {
        let m = Metrics::new();
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let stamped = |m: &Metrics| m.slot_advanced_at.get();
        assert_eq!(stamped(&m), 0.0);
        m.slot_confirmed("0/16B3748", at(100));
        assert_eq!(stamped(&m), 100.0);
        m.slot_confirmed("0/16B3748", at(200));
        assert_eq!(stamped(&m), 100.0);
        m.slot_confirmed("0/16B3790", at(300));
        assert_eq!(stamped(&m), 300.0);
    }

    #[test]
    fn unknown_lag_seconds_keep_the_last_value() {
        let m = Metrics::new();
        m.set_replication_lag(100, Some(1.5));
        m.set_replication_lag(200, None);
        let text = m.render();
        assert!(text.contains("walhook_replication_lag_bytes 200\n"));
        assert!(text.contains("walhook_replication_lag_seconds 1.5\n"));
    }
}

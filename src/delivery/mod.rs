//! Delivery: claims due notifications from `walhook.new` and sends them to listeners.
//!
//! Knows listeners and HTTP; never touches the replication stream. Capture never waits on
//! delivery: the two meet only in the queue tables.

pub mod dispatcher;
pub mod http;
pub mod payload;
pub mod policy;
pub mod signature;

use std::time::{Duration, SystemTime};

/// What to do after an attempt: the retry policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: move to `walhook.processed`.
    Delivered,
    /// Worth another attempt after a backoff (until `max_attempts`).
    Retry,
    /// Final: move to `walhook.failed` now.
    Fail,
}

/// The result of one delivery attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    /// The policy's verdict.
    pub verdict: Verdict,
    /// HTTP status, when an answer came.
    pub status_code: Option<u16>,
    /// One line a DBA understands, for failures: what happened and where.
    pub comment: Option<String>,
    /// The listener asked to wait this long (429/503 Retry-After).
    pub retry_after: Option<Duration>,
    /// Time from sending the request to the end of the answer (or the failure).
    pub latency: Duration,
}

/// What became of one attempt, as observers (metrics, monitors) see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Delivered (2xx); moved to `walhook.processed`.
    Delivered,
    /// Failed; another attempt is scheduled.
    WillRetry,
    /// Failed for good; moved to `walhook.failed`.
    Failed,
}

/// One attempt's outcome as observers see it.
#[derive(Clone, Copy, Debug)]
pub struct AttemptReport<'a> {
    /// Listener name.
    pub listener: &'a str,
    /// The notification (its id in `walhook.new` / `processed` / `failed`).
    pub notification_id: i64,
    /// Entity type of the event.
    pub entity: &'a str,
    /// Entity id of the event.
    pub entity_id: &'a str,
    /// What became of the attempt.
    pub outcome: Observed,
    /// The source commit's time (for commit→delivery latency).
    pub commit_time: SystemTime,
    /// The failure comment, for failed attempts.
    pub comment: Option<&'a str>,
}

/// Told about every attempt's outcome (called from the dispatcher's recorder, per batch of
/// outcomes: keep it cheap and non-blocking).
pub trait DeliveryObserver: Send + Sync {
    /// One attempt ended.
    fn attempted(&self, report: &AttemptReport<'_>);
}

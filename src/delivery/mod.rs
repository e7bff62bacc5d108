//! Delivery: claims due notifications from `walhook.new` and sends them to listeners.
//!
//! Never touches the replication stream; capture never waits on delivery: the two meet
//! only in the queue tables. The dispatcher, the retry policy and the observers see a
//! listener only through two seams:
//!
//! * [`format::Format`] turns one event or a batch into a [`format::Message`] (body,
//!   content type, attributes);
//! * [`sink::Sink`] carries a message to the listener and reports the [`Attempt`] in
//!   transport-neutral terms ([`policy::Outcome`]), which the policy table maps to a
//!   [`Verdict`]. Signing, headers and authentication belong to the sink.
//!
//! A new format is one file in `format/`, one variant of `Format` (with its match arms
//! in `format/mod.rs`) and one variant of `config::ListenerFormat`. A new sink (NATS
//! JetStream) is one file in `sink/`, one variant of `Sink` and `SinkError` (with their
//! match arms in `sink/mod.rs`) and the config that chooses it (the listener's url scheme).
//! Nothing in the dispatcher or the policy changes.

pub mod dispatcher;
pub mod format;
mod lease;
pub mod policy;
pub mod signature;
pub mod sink;
pub mod test_send;
pub(crate) mod validation;

use std::time::{Duration, SystemTime};

use policy::Outcome;

/// What to do after an attempt: the retry policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: move to `walhook.processed`.
    Delivered,
    /// Worth another attempt after a backoff (until `max_attempts`).
    Retry,
    /// Final: move to `walhook.failed` now.
    Fail,
}

/// The result of one delivery attempt, as a sink reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    /// What the attempt ended with; [`Attempt::verdict`] reads the policy for it.
    pub outcome: Outcome,
    /// The listener's status code, where the transport has one (HTTP); stored in the
    /// queue tables' status code columns.
    pub status_code: Option<u16>,
    /// One line a DBA understands, for failures: what happened and where.
    pub comment: Option<String>,
    /// The listener asked to wait this long before the next attempt.
    pub retry_after: Option<Duration>,
    /// Time from sending the message to the end of the answer (or the failure).
    pub latency: Duration,
}

impl Attempt {
    /// The retry policy's verdict for this attempt.
    pub fn verdict(&self) -> Verdict {
        self.outcome.verdict()
    }
}

/// What became of one attempt, as observers (metrics, monitors) see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Delivered; moved to `walhook.processed`.
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

    /// The claim loop of a listener went round once (claimed, or looked and found nothing):
    /// delivery is alive, busy or idle by design.
    fn alive(&self) {}
}

//! Capture: the replication session and its reader, the mapper, the queue writer loop and
//! the heartbeat. Changes flow one way: the reader decodes and maps, the writer stores.
//!
//! Two tasks per session. The *reader* owns the replication stream: it decodes, maps and
//! hands events to the *writer* through a bounded channel, and it alone talks back to the
//! server (status updates). The writer commits events in batches that span many source
//! transactions and publishes the end LSN of the last source commit whose events are
//! durable; only that LSN is ever reported to the server as flushed.

mod backfill;
mod heartbeat;
pub mod mapper;
mod reader;
mod session;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::db::Source;
use crate::error::{ErrorClass, Hold, ServiceError};
use crate::types::Lsn;

pub use heartbeat::HEARTBEAT_PREFIX;

/// What capture tells the rest of the process (metrics, readiness, systemd, monitors);
/// the service implements it, so capture knows nothing about how it is reported.
pub(crate) trait CaptureObserver: Send + Sync {
    /// Streaming started (`on`) or stopped, with the reason when it stopped on an error.
    fn streaming(&self, on: bool, why: Option<&str>);
    /// A one-line status for systemd and the admin endpoint.
    fn status(&self, line: String);
    /// The replication stream is being reconnected.
    fn reconnecting(&self);
    /// `n` row changes were decoded.
    fn changes_read(&self, n: u64);
    /// A queue batch committed `(entity, action, count)` events.
    fn events_queued(&self, batch: &[(&str, &str, u64)]);
    /// A queue batch stored these changes in `walhook.rejected` instead of queuing them.
    fn changes_set_aside(&self, changes: &[mapper::RejectedChange]);
    /// A column an entity names was dropped or renamed, or its id can no longer be read.
    fn schema_changed(&self, note: &mapper::SchemaNote);
    /// Capture resumed after a gap recorded by `walhook setup --accept-gap`.
    fn capture_gap(&self, gap: &crate::queue::CaptureGap);
    /// The sign of life the replication stream stamps whenever the server sends something.
    fn stream_beat(&self) -> Option<crate::liveness::Beat> {
        None
    }
}

/// What the retry loop does with an error of each class: the policy as data.
const RECONNECT_POLICY: &[(ErrorClass, OnError)] = &[
    (ErrorClass::Transient, OnError::Reconnect),
    (ErrorClass::Permanent, OnError::Stop),
    (ErrorClass::Config, OnError::Stop),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnError {
    Reconnect,
    Stop,
}

fn on_error(class: ErrorClass) -> OnError {
    RECONNECT_POLICY
        .iter()
        .find(|(c, _)| *c == class)
        .map(|(_, a)| *a)
        .unwrap_or(OnError::Stop)
}

/// Reconnect backoff: doubles from `INITIAL` up to `MAX`.
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How often a refused copy looks whether it was adopted.
pub(crate) const CLONED_RETRY: Duration = Duration::from_secs(5);

/// How long a standby waits between attempts to take over the slot.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// How long to wait before the next attempt under `hold`.
fn retry_after(hold: Hold) -> Duration {
    match hold {
        Hold::Standby => STANDBY_RETRY,
        Hold::Cloned => CLONED_RETRY,
    }
}

/// Streams changes into the queue, reconnecting on transient errors, until `shutdown`.
/// Returns the flush position the server acknowledged at the end (`None` when capture was
/// not streaming then), or the error that stopped capture.
pub(crate) async fn run(
    mut config_rx: watch::Receiver<Arc<Config>>,
    source: Source,
    observe: Arc<dyn CaptureObserver>,
    shutdown: &CancellationToken,
) -> Result<Option<Lsn>, ServiceError> {
    let mut backoff = BACKOFF_INITIAL;
    let mut attempt: u32 = 0;
    // The hold currently logged, so each hold is logged once, not per attempt.
    let mut holding: Option<Hold> = None;
    loop {
        let started = Instant::now();
        let config = config_rx.borrow_and_update().clone();
        let cx = session::Context {
            source: &source,
            observe: &observe,
            shutdown,
            first: attempt == 0,
        };
        let result = session::run(&config, &cx, &mut config_rx).await;
        let confirmed = match result {
            Ok(session::SessionEnd::Reload) => {
                // A reloaded entity/source/queue configuration: reconnect at once.
                backoff = BACKOFF_INITIAL;
                continue;
            }
            Ok(session::SessionEnd::Stopped { confirmed }) => confirmed,
            Err(_) => None,
        };
        let result = result.map(|_| ());
        if let Err(e) = &result {
            observe.streaming(false, Some(&e.message));
        } else {
            observe.streaming(false, None);
        }
        if !shutdown.is_cancelled() {
            observe.reconnecting();
        }
        let mut wait = backoff;
        match result {
            Ok(()) if shutdown.is_cancelled() => return Ok(confirmed),
            Ok(()) => {
                attempt += 1;
                holding = None;
                warn!(
                    attempt,
                    "replication stream ended; reconnecting in {backoff:?}"
                );
            }
            Err(ServiceError {
                hold: Some(hold),
                message,
                ..
            }) => {
                attempt += 1;
                wait = retry_after(hold);
                if holding != Some(hold) {
                    match hold {
                        Hold::Standby => info!("standing by: {message}; retrying every {wait:?}"),
                        Hold::Cloned => warn!("{message}"),
                    }
                }
                holding = Some(hold);
            }
            Err(e) => match on_error(e.class) {
                OnError::Stop => return Err(e),
                OnError::Reconnect => {
                    attempt += 1;
                    holding = None;
                    warn!(attempt, "{}; reconnecting in {backoff:?}", e.message);
                }
            },
        }
        // A session that ran for a while was healthy: start the backoff again.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = BACKOFF_INITIAL;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        if wait == backoff {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

//! The writer loop: takes mapped events from the reader and commits them to the queue in
//! batches that span source transactions; publishes the end LSN of the last source commit
//! whose events are durable.
//!
//! Group commit: a batch is written as soon as the input is idle at a source transaction's
//! commit, so at low rates nothing waits for `batch_delay`; while one write is in flight the
//! next batch gathers in the channel, so at high rates batches grow by themselves. A batch
//! is also written at its count or byte limit, and when `batch_delay` has passed while
//! waiting for the rest of a source transaction.
//!
//! Memory is bounded in bytes as well as in counts: each event handed over holds permits of
//! the capture buffer for its size until its batch is committed, and a batch ends once it
//! holds `batch_bytes`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use super::CaptureObserver;
use super::mapper::{EntityEvent, RejectedChange};
use crate::error::ServiceError;
use crate::queue::QueueWriter;
use crate::types::Lsn;

/// What the reader hands to the writer.
#[derive(Debug)]
pub(super) enum Item {
    /// An event, with the capture-buffer permits it holds until it is committed.
    Event(Box<EntityEvent>, OwnedSemaphorePermit),
    /// The events of one change (derived actions), which stay in one batch.
    Events(Vec<EntityEvent>, OwnedSemaphorePermit),
    /// A change set aside by the mapper, stored in `walhook.rejected` with the batch.
    SetAside(Box<RejectedChange>, OwnedSemaphorePermit),
    /// A source transaction ended; once everything before it is durable, `end_lsn` is safe.
    Commit { end_lsn: Lsn },
}

/// How big a batch may grow.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub(super) batch_size: usize,
    pub(super) batch_bytes: u64,
    pub(super) batch_delay: Duration,
}

/// One batch being gathered.
#[derive(Default)]
struct Batch {
    events: Vec<EntityEvent>,
    set_aside: Vec<RejectedChange>,
    /// Released when the batch is committed.
    permits: Vec<OwnedSemaphorePermit>,
    bytes: u64,
    commit: Option<Lsn>,
    /// Whether the last item read ended a source transaction.
    at_commit: bool,
}

impl Batch {
    fn absorb(&mut self, item: Item) {
        match item {
            Item::Event(e, permit) => {
                self.at_commit = false;
                self.bytes += permit.num_permits() as u64;
                self.events.push(*e);
                self.permits.push(permit);
            }
            Item::Events(events, permit) => {
                self.bytes += permit.num_permits() as u64;
                self.events.extend(events);
                self.permits.push(permit);
            }
            Item::SetAside(r, permit) => {
                self.at_commit = false;
                self.bytes += permit.num_permits() as u64;
                self.set_aside.push(*r);
                self.permits.push(permit);
            }
            Item::Commit { end_lsn } => {
                self.at_commit = true;
                self.commit = Some(end_lsn);
            }
        }
    }

    fn full(&self, limits: &Limits) -> bool {
        self.events.len() + self.set_aside.len() >= limits.batch_size
            || self.bytes >= limits.batch_bytes
    }

    /// Whether to write now: `idle` means nothing more is queued right now; `deadline` is
    /// `batch_delay` after the batch's first item.
    fn ready(&self, limits: &Limits, idle: bool, now: Instant, deadline: Instant) -> bool {
        self.full(limits) || (idle && (self.at_commit || now >= deadline))
    }

    fn clear(&mut self) {
        self.events.clear();
        self.set_aside.clear();
        self.permits.clear();
        self.bytes = 0;
        self.commit = None;
        self.at_commit = false;
    }
}

/// Commits events in batches that span source transactions.
pub(super) async fn run(
    mut writer: QueueWriter,
    mut rx: mpsc::Receiver<Item>,
    durable: watch::Sender<Lsn>,
    mut subscriptions: watch::Receiver<Vec<crate::queue::Subscription>>,
    observe: Arc<dyn CaptureObserver>,
    limits: Limits,
) -> Result<(), ServiceError> {
    let limits = Limits {
        batch_size: limits.batch_size.max(1),
        ..limits
    };
    let mut batch = Batch::default();
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        let mut closed = false;
        batch.absorb(first);
        let deadline = Instant::now() + limits.batch_delay;
        loop {
            // Take what is already there without waiting; wait only inside a transaction.
            let idle = match rx.try_recv() {
                Ok(item) => {
                    batch.absorb(item);
                    false
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => true,
            };
            if batch.ready(&limits, idle, Instant::now(), deadline) {
                break;
            }
            if !idle {
                continue;
            }
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => batch.absorb(item),
                    None => { closed = true; break; }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if subscriptions.has_changed().unwrap_or(false) {
            writer.set_subscriptions(subscriptions.borrow_and_update().clone());
            // A listener switched between positions: its cursor changes with the fan-out.
            writer
                .sync_cursors()
                .await
                .map_err(ServiceError::from_err)?;
        }
        if !batch.events.is_empty() || !batch.set_aside.is_empty() {
            writer
                .write_batch_with(&batch.events, &batch.set_aside, batch.commit)
                .await
                .map_err(ServiceError::from_err)?;
            let refused = writer.take_refused();
            count_queued(observe.as_ref(), &batch.events, &refused);
            if !batch.set_aside.is_empty() || !refused.is_empty() {
                let all: Vec<RejectedChange> = batch.set_aside.drain(..).chain(refused).collect();
                observe.changes_set_aside(&all);
            }
        }
        if let Some(lsn) = batch.commit {
            durable.send_if_modified(|d| {
                if lsn > *d {
                    *d = lsn;
                    true
                } else {
                    false
                }
            });
        }
        batch.clear();
        if closed {
            return Ok(());
        }
    }
}

/// Counts a committed batch per (entity, action): one map per batch, not per event. Events
/// the database refused are not counted as queued.
fn count_queued(observe: &dyn CaptureObserver, events: &[EntityEvent], refused: &[RejectedChange]) {
    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for e in events {
        *counts
            .entry((e.entity.as_str(), e.action_name()))
            .or_default() += 1;
    }
    for r in refused {
        if let Some(n) = counts.get_mut(&(r.entity.as_str(), r.action.as_str())) {
            *n = n.saturating_sub(1);
        }
    }
    let batch: Vec<(&str, &str, u64)> = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|((e, a), n)| (e, a, n))
        .collect();
    observe.events_queued(&batch);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        batch_size: 100,
        batch_bytes: 1000,
        batch_delay: Duration::from_millis(20),
    };

    fn batch(bytes: u64, at_commit: bool) -> Batch {
        Batch {
            bytes,
            at_commit,
            ..Batch::default()
        }
    }

    #[test]
    fn an_idle_input_at_a_commit_is_written_at_once() {
        let t = Instant::now();
        assert!(batch(10, true).ready(&LIMITS, true, t, t + LIMITS.batch_delay));
    }

    #[test]
    fn an_idle_input_inside_a_transaction_waits_for_the_rest_until_the_delay() {
        let t = Instant::now();
        let deadline = t + LIMITS.batch_delay;
        assert!(!batch(10, false).ready(&LIMITS, true, t, deadline));
        assert!(batch(10, false).ready(&LIMITS, true, deadline, deadline));
    }

    #[test]
    fn a_busy_input_keeps_gathering_until_a_limit() {
        let t = Instant::now();
        let late = t + Duration::from_secs(1);
        assert!(!batch(10, true).ready(&LIMITS, false, late, t));
        assert!(batch(1000, false).ready(&LIMITS, false, t, late));
    }

    #[test]
    fn a_zero_delay_writes_what_was_read_once_the_input_is_idle() {
        let t = Instant::now();
        assert!(!batch(1, false).ready(&LIMITS, false, t, t));
        assert!(batch(1, false).ready(&LIMITS, true, t, t));
    }
}

//! The writer loop: takes mapped events from the reader and commits them to the queue in
//! batches that span source transactions; publishes the end LSN of the last source commit
//! whose events are durable.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::CaptureObserver;
use super::mapper::EntityEvent;
use crate::error::ServiceError;
use crate::queue::QueueWriter;
use crate::types::Lsn;

/// What the reader hands to the writer.
#[derive(Debug)]
pub(super) enum Item {
    Event(Box<EntityEvent>),
    /// A source transaction ended; once everything before it is durable, `end_lsn` is safe.
    Commit {
        end_lsn: Lsn,
    },
}

/// Commits events in batches that span source transactions.
pub(super) async fn run(
    mut writer: QueueWriter,
    mut rx: mpsc::Receiver<Item>,
    durable: watch::Sender<Lsn>,
    mut subscriptions: watch::Receiver<Vec<crate::queue::Subscription>>,
    observe: Arc<dyn CaptureObserver>,
    batch_size: usize,
    batch_delay: Duration,
) -> Result<(), ServiceError> {
    let batch_size = batch_size.max(1);
    let mut events: Vec<EntityEvent> = Vec::with_capacity(batch_size);
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        let mut commit: Option<Lsn> = None;
        let mut closed = false;
        absorb(first, &mut events, &mut commit);
        let deadline = tokio::time::Instant::now() + batch_delay;
        while events.len() < batch_size {
            // Take what is already there without waiting, then wait until the deadline.
            match rx.try_recv() {
                Ok(item) => {
                    absorb(item, &mut events, &mut commit);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => absorb(item, &mut events, &mut commit),
                    None => { closed = true; break; }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if subscriptions.has_changed().unwrap_or(false) {
            writer.set_subscriptions(subscriptions.borrow_and_update().clone());
        }
        if !events.is_empty() {
            writer
                .write_batch(&events, commit)
                .await
                .map_err(ServiceError::from_err)?;
            count_queued(observe.as_ref(), &events);
            events.clear();
        }
        if let Some(lsn) = commit {
            durable.send_if_modified(|d| {
                if lsn > *d {
                    *d = lsn;
                    true
                } else {
                    false
                }
            });
        }
        if closed {
            return Ok(());
        }
    }
}

/// Counts a committed batch per (entity, action): one map per batch, not per event.
fn count_queued(observe: &dyn CaptureObserver, events: &[EntityEvent]) {
    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for e in events {
        *counts
            .entry((e.entity.as_str(), e.action.as_str()))
            .or_default() += 1;
    }
    let batch: Vec<(&str, &str, u64)> = counts.into_iter().map(|((e, a), n)| (e, a, n)).collect();
    observe.events_queued(&batch);
}

fn absorb(item: Item, events: &mut Vec<EntityEvent>, commit: &mut Option<Lsn>) {
    match item {
        Item::Event(e) => events.push(*e),
        Item::Commit { end_lsn } => *commit = Some(end_lsn),
    }
}

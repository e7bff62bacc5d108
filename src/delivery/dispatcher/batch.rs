//! The starter's queue of claimed notifications, and batches: for a listener with
//! `batch_size` above 1, one message carries the notifications that are ready, up to the
//! listener's limits, and its one attempt is recorded for each of them.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::RngExt as _;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::{BatchLimits, ClaimedRow, Done, Lane, Report};
use crate::queue::StoredEvent;

/// A claimed notification waiting in the starter, with its batch part once rendered.
pub(super) struct Pending {
    pub(super) claimed: ClaimedRow,
    part: Option<Vec<u8>>,
}

/// The starter's queue. Claims arrive whole (one `Vec` per claim statement), so a batch is
/// formed from everything one claim took, not from whatever had arrived by chance.
pub(super) struct Backlog {
    claims: mpsc::UnboundedReceiver<Vec<ClaimedRow>>,
    ready: VecDeque<Pending>,
}

impl Backlog {
    pub(super) fn new(claims: mpsc::UnboundedReceiver<Vec<ClaimedRow>>) -> Backlog {
        Backlog {
            claims,
            ready: VecDeque::new(),
        }
    }

    /// The next notification, waiting for a claim if none is ready; `None` once the claimer
    /// has ended and everything was taken.
    pub(super) async fn next(&mut self) -> Option<Pending> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Some(p);
            }
            let claim = self.claims.recv().await?;
            self.extend(claim);
        }
    }

    /// The next notification if one is ready now.
    fn try_next(&mut self) -> Option<Pending> {
        if self.ready.is_empty()
            && let Ok(claim) = self.claims.try_recv()
        {
            self.extend(claim);
        }
        self.ready.pop_front()
    }

    fn put_back(&mut self, p: Pending) {
        self.ready.push_front(p);
    }

    fn extend(&mut self, claim: Vec<ClaimedRow>) {
        self.ready.extend(claim.into_iter().map(|claimed| Pending {
            claimed,
            part: None,
        }));
    }
}

/// The batch that starts with `first` (already checked against its lease): the ready
/// notifications after it, in claim order, while the batch stays within `limits` (the
/// first always goes, however large). Those whose lease could not see the attempt through
/// are handed back; the first that does not fit waits for the next batch.
pub(super) fn fill(
    lane: &Lane,
    mut first: Pending,
    backlog: &mut Backlog,
    limits: BatchLimits,
    now: Instant,
    done: &mpsc::UnboundedSender<Report>,
) -> Vec<Pending> {
    let mut bytes = part(lane, &mut first);
    let mut items = vec![first];
    while items.len() < limits.size {
        let Some(mut next) = backlog.try_next() else {
            break;
        };
        if !lane.startable(&next.claimed, now) {
            let _ = done.send(Done::release(lane, &next.claimed).into());
            continue;
        }
        let len = part(lane, &mut next);
        if bytes + len + lane.format.batch_overhead(items.len() + 1) > limits.bytes {
            backlog.put_back(next);
            break;
        }
        bytes += len;
        items.push(next);
    }
    items
}

/// The length of `p`'s batch part, rendering it once.
fn part(lane: &Lane, p: &mut Pending) -> usize {
    p.part
        .get_or_insert_with(|| lane.format.batch_part(&p.claimed.notification.event))
        .len()
}

/// Sends `items` as one batch message and reports the attempt for each of them, together.
pub(super) async fn attempt(
    lane: Arc<Lane>,
    mut items: Vec<Pending>,
    permit: OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<Report>,
) {
    let parts: Vec<Vec<u8>> = items
        .iter_mut()
        .map(|p| p.part.take().unwrap_or_default())
        .collect();
    let events: Vec<&StoredEvent> = items
        .iter()
        .map(|p| &p.claimed.notification.event)
        .collect();
    let message = lane.format.assemble_batch(&events, &parts);
    drop(parts);
    // A batch is never empty; the sink routes and labels by its first event.
    let Some(first) = events.first().copied() else {
        return;
    };
    let attempt = lane.attempt(first, message).await;
    drop(events);
    drop(permit);
    // One draw for the batch: with the same attempt count, its notifications come due
    // together and are claimed, and sent, together again.
    let jitter = rand::rng().random_range(-1.0..=1.0);
    let outcomes = items
        .into_iter()
        .map(|p| Done::attempted_with(&lane, p.claimed, attempt.clone(), jitter))
        .collect();
    let _ = done.send(Report::Batch(outcomes));
}

//! The claimer stage of a lane: which claim statement to run next, how much it may take,
//! and the lane's claim state (cursor, held-back entities, bytes outstanding).
//!
//! Claims resume after a cursor (`CLAIM_NEXT`), so a claim costs the same at a backlog of 1M
//! as at 10k. Rows behind the cursor that become claimable are found three ways: the
//! oldest change of an entity whose earlier change this process just recorded
//! (`CLAIM_HEADS`); a sweep from the head (`SWEEP`) when something is known to have become
//! due there (a retry's time, a released lease, `walhook retry`, a peer's release); and a
//! periodic sweep for what only other processes know about: every [`SWEEP_MIN`] while sweeps
//! find something, backing off to [`SWEEP_MAX`] while they find nothing (in a long drain
//! a sweep walks the index entries of the rows delivered since the last autovacuum).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::{ClaimedRow, Done, Ended, Lane, Link, Report, Shared, back_off, lock, on_store};
use crate::error::{Classify, ErrorClass};
use crate::queue::{Claim, ClaimLimits, Claimed, Cursor, EntityKey};

/// Most notifications one claim statement takes.
pub(super) const CLAIM_BATCH: usize = 500;
/// Stored bytes (of the events' `row` and `old`) one claim statement takes at most.
const CLAIM_BYTES: u64 = 8 << 20;
/// Bytes of `row` and `old` one listener holds claimed and not yet recorded.
pub(super) const LANE_BYTES: u64 = 16 << 20;
/// The same across all listeners of the process. With 1 MB rows, the payloads being sent
/// (bounded by `concurrency`) come on top; together they keep the process well under 200 MB.
pub(super) const TOTAL_BYTES: u64 = 32 << 20;
/// The periodic sweep behind the cursor runs this often while it finds rows other processes
/// made claimable (their retries, expired leases, changes their deliveries unblocked)...
const SWEEP_MIN: Duration = Duration::from_secs(1);
/// ...and backs off to this while it finds nothing.
const SWEEP_MAX: Duration = Duration::from_secs(8);
/// Most entities remembered as held back per listener; beyond, the sweep finds them.
const HELD_MAX: usize = 20_000;

/// Bytes claimed and not yet recorded, across all lanes.
#[derive(Debug, Default)]
pub(super) struct TotalBytes(AtomicU64);

/// A lane's claim state shared with the recorder.
#[derive(Debug)]
pub(super) struct ClaimState {
    /// Claimed and not yet recorded.
    pub(super) outstanding: AtomicUsize,
    /// Received bytes of `row` and `old` of those.
    outstanding_bytes: AtomicU64,
    /// Something behind the cursor became claimable.
    sweep_soon: AtomicBool,
    /// Received bytes per stored byte in the last claim (×1000), at least 1000: values that
    /// compress well make the stored budget of the next claim smaller.
    expansion_milli: AtomicU64,
    held: std::sync::Mutex<HeldBack>,
}

/// Entities whose next change waits for an earlier one in flight.
#[derive(Debug, Default)]
struct HeldBack {
    waiting: HashSet<EntityKey>,
    /// Waiting entities whose earlier change was recorded: claim their next change now.
    unblocked: Vec<EntityKey>,
    /// A claim is running: entities completed meanwhile are kept in `recent`, because the
    /// claim may report them held back by the change that just completed.
    in_claim: bool,
    recent: HashSet<EntityKey>,
}

impl ClaimState {
    pub(super) fn new() -> ClaimState {
        ClaimState {
            outstanding: AtomicUsize::new(0),
            outstanding_bytes: AtomicU64::new(0),
            sweep_soon: AtomicBool::new(false),
            expansion_milli: AtomicU64::new(1000),
            held: std::sync::Mutex::new(HeldBack::default()),
        }
    }

    /// Asks the claimer to sweep behind its cursor.
    pub(super) fn sweep_soon(&self) {
        self.sweep_soon.store(true, Ordering::Release);
    }

    /// After a batch is recorded: frees its room and unblocks the next change of the
    /// entities whose change was delivered or given up on.
    pub(super) fn recorded(
        &self,
        total: &TotalBytes,
        finished: usize,
        bytes: u64,
        completed: Vec<EntityKey>,
    ) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(finished))
            });
        let _ = self
            .outstanding_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(bytes))
            });
        let _ = total
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(bytes))
            });
        if completed.is_empty() {
            return;
        }
        let mut held = lock(&self.held);
        let HeldBack {
            waiting,
            unblocked,
            in_claim,
            recent,
        } = &mut *held;
        for key in completed {
            if waiting.remove(&key) {
                unblocked.push(key);
            } else if *in_claim && recent.len() < HELD_MAX {
                recent.insert(key);
            }
        }
    }

    /// A claim starts: completions recorded from now on may unblock what it holds back.
    fn claim_starts(&self) {
        let mut held = lock(&self.held);
        held.in_claim = true;
        held.recent.clear();
    }

    /// A claim ended: remembers the entities it saw held back, and unblocks at once those
    /// whose earlier change was recorded while it ran.
    fn claim_ends(&self, keys: Vec<EntityKey>) {
        let mut held = lock(&self.held);
        let HeldBack {
            waiting,
            unblocked,
            in_claim,
            recent,
        } = &mut *held;
        for key in keys {
            if recent.contains(&key) {
                unblocked.push(key);
            } else if waiting.len() < HELD_MAX {
                waiting.insert(key);
            }
            // Beyond HELD_MAX the periodic sweep finds them.
        }
        *in_claim = false;
        recent.clear();
    }

    /// A claim failed: its entities are probed again.
    fn claim_failed(&self, keys: Vec<EntityKey>) {
        let mut held = lock(&self.held);
        held.unblocked.extend(keys);
        held.in_claim = false;
        held.recent.clear();
    }

    fn take_unblocked(&self, most: usize) -> Vec<EntityKey> {
        let mut held = lock(&self.held);
        let n = held.unblocked.len().min(most);
        held.unblocked.drain(..n).collect()
    }

    fn has_unblocked(&self) -> bool {
        !lock(&self.held).unblocked.is_empty()
    }

    /// Counts claimed rows and their bytes against the lane and the process.
    fn add(&self, total: &TotalBytes, rows: usize, bytes: u64) {
        self.outstanding.fetch_add(rows, Ordering::AcqRel);
        self.outstanding_bytes.fetch_add(bytes, Ordering::AcqRel);
        total.0.fetch_add(bytes, Ordering::AcqRel);
    }

    fn learn_expansion(&self, rows: &[Claimed]) {
        let (received, stored) = rows.iter().fold((0u64, 0u64), |(r, s), c| match c {
            Claimed::Ready {
                bytes,
                stored_bytes,
                ..
            } => (r + bytes, s + stored_bytes),
            _ => (r, s),
        });
        if let Some(milli) = received.saturating_mul(1000).checked_div(stored) {
            self.expansion_milli
                .store(milli.clamp(1000, 1_000_000), Ordering::Release);
        }
    }
}

/// What to claim with, or `None` when the lane has no room.
fn limits(lane: &Lane, total: &TotalBytes) -> Option<ClaimLimits> {
    let state = &lane.claims;
    let rows = claimable(lane.target(), state.outstanding.load(Ordering::Acquire))?;
    let lane_bytes = state.outstanding_bytes.load(Ordering::Acquire);
    let room = LANE_BYTES
        .saturating_sub(lane_bytes)
        .min(TOTAL_BYTES.saturating_sub(total.0.load(Ordering::Acquire)));
    let room = if room == 0 {
        // A lane with nothing claimed may always take one row, so a listener never waits
        // for the others to drain.
        if state.outstanding.load(Ordering::Acquire) > 0 {
            return None;
        }
        1
    } else {
        room
    };
    let expansion = state.expansion_milli.load(Ordering::Acquire).max(1000);
    Some(ClaimLimits {
        rows: rows.min(CLAIM_BATCH),
        stored_bytes: (room.min(CLAIM_BYTES).saturating_mul(1000) / expansion).max(1),
        received_bytes: room,
    })
}

/// How many rows to claim with `outstanding` of `target` claimed, or `None` to wait. While
/// deliveries are under way a claim waits until a quarter of the prefetch is free rather
/// than running after every recorded batch: a claim costs mostly per statement, and a fast
/// drain otherwise ran many claims of a few rows each (+13% events/s at a 100k backlog).
fn claimable(target: usize, outstanding: usize) -> Option<usize> {
    let rows = target.saturating_sub(outstanding);
    let waiting = rows == 0 || (outstanding > 0 && rows < target / 4);
    (!waiting).then_some(rows)
}

/// The next claim to run.
enum Step {
    /// The oldest change of these entities.
    Heads(Vec<EntityKey>),
    /// From the head up to the cursor.
    Sweep,
    /// After the cursor.
    Next,
}

/// Claims due notifications for one lane until stop (after its validation, if it needs
/// one).
pub(super) async fn claim_loop(
    lane: Arc<Lane>,
    link: Arc<Link>,
    shared: Arc<Shared>,
    claimed: mpsc::UnboundedSender<Vec<ClaimedRow>>,
    done: mpsc::UnboundedSender<Report>,
) {
    if let Some(validated) = &lane.validated {
        let mut open = validated.subscribe();
        tokio::select! {
            _ = open.wait_for(|v| *v) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
    let state = &lane.claims;
    // Numbers this lane's claims, for the lease book.
    let mut claims: u64 = 0;
    let mut cursor = Cursor::START;
    let mut sweep_every = SWEEP_MIN;
    let mut next_sweep = Instant::now() + sweep_every;
    let mut backoff = super::RECONNECT_INITIAL;
    while !shared.stop.is_cancelled() {
        if let Some(o) = &shared.observer {
            o.alive();
        }
        let mut more = false;
        if let Some(limits) = limits(&lane, &shared.bytes) {
            let step = if state.has_unblocked() {
                Step::Heads(state.take_unblocked(limits.rows))
            } else if state.sweep_soon.swap(false, Ordering::AcqRel) || lane.take_due() {
                sweep_every = SWEEP_MIN;
                Step::Sweep
            } else if Instant::now() >= next_sweep {
                Step::Sweep
            } else {
                Step::Next
            };
            state.claim_starts();
            let (name, lease) = (lane.name(), lane.lease.length);
            // The lease is counted from before the statement is sent: the database counts
            // it from a later moment, so this process never thinks it holds a row longer.
            let sent = Instant::now();
            let claim = on_store(&link, "claiming notifications", |store| {
                let step = &step;
                async move {
                    match step {
                        Step::Heads(keys) => store.claim_heads(name, keys, limits, lease).await,
                        Step::Sweep => store.sweep(name, cursor, limits, lease).await,
                        Step::Next => store.claim_next(name, cursor, limits, lease).await,
                    }
                }
            });
            // At stop a claim in progress is abandoned rather than awaited (the database may
            // be gone); leases it took are freed with the others at the end, or expire.
            let result = tokio::select! {
                result = claim => result,
                _ = shared.stop.cancelled() => break,
            };
            match result {
                Ok(claim) => {
                    backoff = super::RECONNECT_INITIAL;
                    link.healthy();
                    more = match &step {
                        Step::Next => {
                            if let Some(to) = claim.scanned_to {
                                cursor = cursor.max(to);
                            }
                            claim.full
                        }
                        Step::Sweep => {
                            if claim.full {
                                state.sweep_soon();
                            }
                            sweep_every = if claim.rows.is_empty() {
                                (sweep_every * 2).min(SWEEP_MAX)
                            } else {
                                SWEEP_MIN
                            };
                            next_sweep = Instant::now() + sweep_every;
                            // And after the cursor: a wake-up may have been missed (a
                            // reconnect, another process's rows).
                            true
                        }
                        Step::Heads(_) => true,
                    };
                    claims += 1;
                    let booked = Booked {
                        claim: claims,
                        until: sent + lane.lease.length,
                    };
                    hand_over(&lane, &shared, claim, booked, &claimed, &done);
                }
                Err((store, e)) => {
                    if e.class() != ErrorClass::Transient {
                        shared.fail(e);
                        break;
                    }
                    state.claim_failed(match step {
                        Step::Heads(keys) => keys,
                        _ => Vec::new(),
                    });
                    link.broken(store.as_ref(), &e).await;
                    back_off(&mut backoff, &shared.stop).await;
                    continue;
                }
            }
        }
        if more {
            continue;
        }
        let look = lane
            .next_due()
            .map_or(next_sweep, |due| due.min(next_sweep));
        tokio::select! {
            _ = lane.wake.notified() => {}
            _ = tokio::time::sleep_until(look) => {}
            _ = shared.stop.cancelled() => break,
        }
    }
}

/// Which claim took a batch of rows, and until when (by this process's clock) it leases them.
#[derive(Clone, Copy)]
struct Booked {
    claim: u64,
    until: Instant,
}

/// Books the leases of a claim's rows and passes them on: ready ones to the starter
/// (together, so a batching listener's batch is formed from one claim), unreadable and
/// over-budget ones straight to the recorder.
fn hand_over(
    lane: &Lane,
    shared: &Shared,
    claim: Claim,
    booked: Booked,
    claimed: &mpsc::UnboundedSender<Vec<ClaimedRow>>,
    done: &mpsc::UnboundedSender<Report>,
) {
    let state = &lane.claims;
    state.claim_ends(claim.held);
    if claim.rows.is_empty() {
        return;
    }
    state.learn_expansion(&claim.rows);
    let bytes = claim
        .rows
        .iter()
        .map(|c| match c {
            Claimed::Ready { bytes, .. } => *bytes,
            _ => 0,
        })
        .sum();
    state.add(&shared.bytes, claim.rows.len(), bytes);
    lane.leases.taken(
        claim.rows.iter().map(Claimed::id),
        booked.claim,
        booked.until,
    );
    debug!(
        listener = lane.name(),
        claimed = claim.rows.len(),
        bytes,
        "claimed notifications"
    );
    let finished = |id: i64, what: Ended| Done {
        lane: lane.index,
        id,
        claim: booked.claim,
        bytes: 0,
        what,
    };
    let mut ready = Vec::with_capacity(claim.rows.len());
    for row in claim.rows {
        match row {
            Claimed::Ready {
                notification,
                bytes,
                ..
            } => ready.push(ClaimedRow {
                notification: *notification,
                claim: booked.claim,
                bytes,
            }),
            Claimed::Unreadable { id, comment } => {
                let _ = done.send(finished(id, Ended::Unreadable { comment }).into());
            }
            Claimed::OverBudget { id } => {
                state.sweep_soon();
                let _ = done.send(finished(id, Ended::Release).into());
            }
        }
    }
    if ready.is_empty() {
        return;
    }
    if let Err(back) = claimed.send(ready) {
        for row in back.0 {
            let _ = done.send(Done::release(lane, &row).into());
        }
    }
}

impl TotalBytes {
    #[cfg(test)]
    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> EntityKey {
        EntityKey {
            entity: "Customer".into(),
            entity_id: id.into(),
        }
    }

    #[test]
    fn claims_wait_for_a_quarter_of_the_prefetch_unless_nothing_is_claimed() {
        assert_eq!(claimable(256, 0), Some(256));
        assert_eq!(claimable(256, 200), None);
        assert_eq!(claimable(256, 192), Some(64));
        assert_eq!(claimable(256, 256), None);
        assert_eq!(claimable(256, 300), None);
        // A listener with concurrency 1 and little prefetch still claims.
        assert_eq!(claimable(1, 0), Some(1));
        assert_eq!(claimable(1, 1), None);
        assert_eq!(claimable(3, 2), Some(1));
    }

    #[test]
    fn a_recorded_change_unblocks_only_entities_seen_held_back() {
        let state = ClaimState::new();
        let total = TotalBytes::default();
        state.claim_starts();
        state.claim_ends(vec![key("1"), key("2")]);
        state.recorded(&total, 0, 0, vec![key("2"), key("3")]);
        assert_eq!(state.take_unblocked(10), vec![key("2")]);
        // Unblocked once: a second completion of 2 finds nothing waiting.
        state.recorded(&total, 0, 0, vec![key("2")]);
        assert!(!state.has_unblocked());
        state.recorded(&total, 0, 0, vec![key("1")]);
        assert_eq!(state.take_unblocked(10), vec![key("1")]);
    }

    #[test]
    fn an_entity_completed_while_the_claim_ran_is_probed_at_once() {
        let state = ClaimState::new();
        let total = TotalBytes::default();
        state.claim_starts();
        // Recorded after the claim's snapshot, before it reports 9 held back.
        state.recorded(&total, 1, 0, vec![key("9"), key("5")]);
        state.claim_ends(vec![key("9"), key("7")]);
        assert_eq!(state.take_unblocked(10), vec![key("9")]);
        // Outside a claim, completions of entities nobody waits for are forgotten.
        state.recorded(&total, 1, 0, vec![key("8")]);
        state.claim_starts();
        state.claim_ends(vec![key("8")]);
        assert!(!state.has_unblocked());
        state.recorded(&total, 1, 0, vec![key("7"), key("8")]);
        assert_eq!(state.take_unblocked(10), vec![key("7"), key("8")]);
    }

    #[test]
    fn recorded_bytes_free_the_lane_and_the_process_budget() {
        let state = ClaimState::new();
        let total = TotalBytes::default();
        state.add(&total, 3, 3000);
        assert_eq!(total.get(), 3000);
        state.recorded(&total, 2, 2000, Vec::new());
        assert_eq!(state.outstanding.load(Ordering::Acquire), 1);
        assert_eq!(total.get(), 1000);
        state.recorded(&total, 5, 5000, Vec::new());
        assert_eq!(total.get(), 0, "never below zero");
    }
}

//! The recorder, shared by all listeners of a dispatcher: writes the outcomes of attempts
//! in batches (whatever arrived while the previous batch was written, one statement per
//! outcome kind), applies the retry policy and `max_attempts` to each, then updates the
//! lanes: their room, retry timers, claim wake-ups, and the log lines of a listener that
//! starts or stops failing. At the end it frees the leases this process still holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    DUE_SLACK, Done, Ended, Lane, Link, RECONNECT_INITIAL, RECONNECT_MAX, RECORD_BATCH, Report,
    SHUTDOWN_RECORD_DEADLINE, Shared, on_store,
};
use crate::delivery::policy::delay_with_jitter;
use crate::delivery::{Attempt, AttemptReport, DeliveryObserver, Observed, Verdict};
use crate::error::{Classify, ErrorClass};
use crate::queue::{Completions, DeliveredRow, EntityKey, FailedAttemptRow};

/// What recording a batch changes in the lanes once it is written.
#[derive(Default)]
struct LaneEffect {
    /// The notifications whose outcomes this batch records, with their claims.
    finished_ids: Vec<(i64, u64)>,
    finished: usize,
    /// Received bytes of the finished notifications.
    finished_bytes: u64,
    /// Entities whose change left `walhook.new` (delivered or given up on).
    completed: Vec<EntityKey>,
    /// Rows went back behind the claim cursor (released, or failed without an entity).
    behind_cursor: bool,
    delivered: usize,
    gave_up: usize,
    last_failure: Option<String>,
    /// The shortest retry delay scheduled.
    earliest_retry: Option<Duration>,
}

/// Records outcomes in batches until every stage has ended, then frees leftover leases.
pub(super) async fn record_loop(
    lanes: Arc<[Arc<Lane>]>,
    link: Arc<Link>,
    shared: Arc<Shared>,
    observer: Option<Arc<dyn DeliveryObserver>>,
    mut done: mpsc::UnboundedReceiver<Report>,
) {
    let mut pending = Vec::new();
    let add = |pending: &mut Vec<Done>, report: Report| match report {
        Report::One(d) => pending.push(d),
        Report::Batch(ds) => pending.extend(ds),
    };
    loop {
        match done.recv().await {
            Some(r) => add(&mut pending, r),
            None => break,
        }
        while pending.len() < RECORD_BATCH {
            match done.try_recv() {
                Ok(r) => add(&mut pending, r),
                Err(_) => break,
            }
        }
        let (batch, effects) = build_batch(&lanes, pending.drain(..), observer.as_deref());
        record(&link, &shared, &batch).await;
        apply(&lanes, &shared, effects);
    }
    release_leftovers(&link, &shared).await;
}

/// Turns outcomes into the rows to write, applying the retry policy and `max_attempts`.
fn build_batch(
    lanes: &[Arc<Lane>],
    outcomes: impl Iterator<Item = Done>,
    observer: Option<&dyn DeliveryObserver>,
) -> (Completions, Vec<LaneEffect>) {
    let mut batch = Completions::default();
    let mut effects: Vec<LaneEffect> = lanes.iter().map(|_| LaneEffect::default()).collect();
    for done in outcomes {
        let (Some(lane), Some(effect)) = (lanes.get(done.lane), effects.get_mut(done.lane)) else {
            continue;
        };
        effect.finished += 1;
        effect.finished_ids.push((done.id, done.claim));
        effect.finished_bytes += done.bytes;
        match done.what {
            Ended::Release => {
                effect.behind_cursor = true;
                batch.release.push(done.id);
            }
            Ended::Unreadable { comment } => {
                effect.behind_cursor = true;
                effect.gave_up += 1;
                batch.failed.push(FailedAttemptRow {
                    id: done.id,
                    status_code: None,
                    comment,
                    delay: Duration::ZERO,
                });
            }
            Ended::Attempted {
                attempts_before,
                attempt,
                jitter,
                commit_time,
                entity,
                entity_id,
            } => {
                let report = |outcome: Observed, comment: Option<&str>| {
                    if let Some(o) = observer {
                        o.attempted(&AttemptReport {
                            listener: lane.config.name.as_str(),
                            notification_id: done.id,
                            entity: &entity,
                            entity_id: &entity_id,
                            outcome,
                            commit_time,
                            comment,
                        });
                    }
                };
                let made = u32::try_from(attempts_before)
                    .unwrap_or(0)
                    .saturating_add(1);
                if judge(
                    lane,
                    done.id,
                    made,
                    (&attempt, jitter),
                    &mut batch,
                    effect,
                    report,
                ) {
                    effect.completed.push(EntityKey { entity, entity_id });
                }
            }
        }
    }
    (batch, effects)
}

/// Applies the retry policy to one attempt (the `made`-th): the row to write, the lane's
/// bookkeeping and the observers' report. Returns whether the notification leaves
/// `walhook.new` (delivered or given up on), which unblocks its entity's next change.
fn judge(
    lane: &Lane,
    id: i64,
    made: u32,
    (attempt, jitter): (&Attempt, f64),
    batch: &mut Completions,
    effect: &mut LaneEffect,
    report: impl Fn(Observed, Option<&str>),
) -> bool {
    let status_code = attempt.status_code.map(i32::from);
    // Sinks word their failures; this covers one that gave no comment.
    let comment = || {
        attempt
            .comment
            .clone()
            .unwrap_or_else(|| format!("{} ({})", attempt.outcome.describe(), lane.sink.target()))
    };
    match attempt.verdict() {
        Verdict::Delivered => {
            report(Observed::Delivered, None);
            effect.delivered += 1;
            batch.delivered.push(DeliveredRow {
                id,
                status_code,
                latency_ms: i32::try_from(attempt.latency.as_millis()).unwrap_or(i32::MAX),
            });
            true
        }
        Verdict::Retry if made < lane.config.max_attempts => {
            let delay = delay_with_jitter(made, &lane.config.backoff, attempt.retry_after, jitter);
            effect.earliest_retry = Some(effect.earliest_retry.map_or(delay, |e| e.min(delay)));
            let comment = comment();
            report(Observed::WillRetry, Some(&comment));
            effect.last_failure = Some(comment.clone());
            batch.retry.push(FailedAttemptRow {
                id,
                status_code,
                comment,
                delay,
            });
            false
        }
        // A final verdict, or a retry after the last attempt: give up.
        verdict => {
            let comment = match verdict {
                Verdict::Retry => format!(
                    "{} (the last of {} attempts)",
                    comment(),
                    lane.config.max_attempts
                ),
                _ => comment(),
            };
            report(Observed::Failed, Some(&comment));
            effect.last_failure = Some(comment.clone());
            effect.gave_up += 1;
            batch.failed.push(FailedAttemptRow {
                id,
                status_code,
                comment,
                delay: Duration::ZERO,
            });
            true
        }
    }
}

/// Writes one batch, retrying transient errors (for a bounded time once stopping).
async fn record(link: &Link, shared: &Shared, batch: &Completions) {
    if batch.is_empty() || shared.failed() {
        return;
    }
    let mut backoff = RECONNECT_INITIAL;
    let mut give_up_at: Option<Instant> = None;
    loop {
        let result = on_store(link, "recording delivery outcomes", |store| async move {
            store.complete(batch).await
        })
        .await;
        let (store, e) = match result {
            Ok(()) => {
                link.healthy();
                return;
            }
            Err(failure) => failure,
        };
        if e.class() != ErrorClass::Transient {
            shared.fail(e);
            return;
        }
        link.broken(store.as_ref(), &e).await;
        if shared.stop.is_cancelled() {
            let at = *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_RECORD_DEADLINE);
            if Instant::now() >= at {
                warn!(
                    error = %e,
                    "could not record the outcome of {} deliveries before stopping; those notifications stay in walhook.new and are delivered again when their leases expire",
                    batch.delivered.len() + batch.retry.len() + batch.failed.len()
                );
                return;
            }
        }
        // Not `back_off`: recording continues after stop, until the deadline.
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2).min(RECONNECT_MAX);
    }
}

/// Updates the lanes after a batch is recorded: frees their room, wakes their claimers
/// (a recorded delivery can unblock the next change of the same entity), sets retry timers
/// and logs a listener starting or stopping to fail.
fn apply(lanes: &[Arc<Lane>], shared: &Shared, effects: Vec<LaneEffect>) {
    for (lane, effect) in lanes.iter().zip(effects) {
        if effect.finished == 0 {
            continue;
        }
        // Recorded (or, after a failed write, left to expire): no longer renewed.
        lane.leases.forget(&effect.finished_ids);
        // Counted from now, after the write: the database counted the delay from the
        // start of the retry statement, so the row is due by then.
        if let Some(delay) = effect.earliest_retry {
            let due = Instant::now() + delay + DUE_SLACK;
            lane.schedule(due);
        }
        match (&effect.last_failure, effect.delivered > 0) {
            (Some(failure), _) => {
                if !lane.failing.swap(true, Ordering::AcqRel) {
                    warn!(
                        listener = lane.name(),
                        "delivery to listener {} is failing: {failure}; notifications wait in walhook.new",
                        lane.name()
                    );
                }
            }
            (None, true) => {
                if lane.failing.swap(false, Ordering::AcqRel) {
                    info!(
                        listener = lane.name(),
                        "listener {} accepts deliveries again",
                        lane.name()
                    );
                }
            }
            (None, false) => {}
        }
        if effect.gave_up > 0 {
            warn!(
                listener = lane.name(),
                count = effect.gave_up,
                "{} notifications for listener {} moved to walhook.failed; see `walhook failed --listener {}`",
                effect.gave_up,
                lane.name(),
                lane.name()
            );
        }
        if effect.behind_cursor {
            lane.claims.sweep_soon();
        }
        lane.claims.recorded(
            &shared.bytes,
            effect.finished,
            effect.finished_bytes,
            effect.completed,
        );
        lane.wake.notify_one();
    }
}

/// Frees every lease this process still holds (claims dropped at stop, attempts abandoned).
async fn release_leftovers(link: &Link, shared: &Shared) {
    if shared.failed() {
        return;
    }
    let deadline = Instant::now() + SHUTDOWN_RECORD_DEADLINE;
    let mut backoff = RECONNECT_INITIAL;
    loop {
        let result = on_store(link, "releasing leases", |store| async move {
            store.release_all().await
        })
        .await;
        match result {
            Ok(n) => {
                if n > 0 {
                    debug!(
                        released = n,
                        "released leases of notifications not delivered"
                    );
                }
                return;
            }
            Err((store, e)) => {
                link.broken(store.as_ref(), &e).await;
                if e.class() != ErrorClass::Transient || Instant::now() >= deadline {
                    warn!(
                        error = %e,
                        "could not release this process's leases in walhook.new; the notifications are delivered once the leases expire"
                    );
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(RECONNECT_MAX);
            }
        }
    }
}

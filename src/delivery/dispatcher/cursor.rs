//! Delivery for a listener that keeps a cursor over `walhook.event` (`position = "cursor"`):
//! no claims and no per-event rows. One process at a time owns the listener (the cursor
//! store's lock); it reads the events after the cursor in commit order, publishes them in
//! that order with up to `concurrency` acknowledgements outstanding, and moves the cursor
//! past what was acknowledged or refused for good (refused events go to `walhook.failed`).
//!
//! A retryable failure holds the cursor at the event that failed: after the backoff,
//! publishing starts again there. Messages after it that were already stored are published
//! again with the same `Nats-Msg-Id`, which the stream's duplicate window drops; after the
//! listener's `max_attempts`, the event is moved to `walhook.failed` and the cursor goes on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use rand::RngExt as _;
use tracing::{debug, info, warn};

use super::{
    CONNECT_TIMEOUT, DispatchError, Lane, RECONNECT_INITIAL, STATEMENT_TIMEOUT, Shared, back_off,
};
use crate::db::Source;
use crate::delivery::policy::delay_with_jitter;
use crate::delivery::{Attempt, AttemptReport, Observed, Verdict};
use crate::queue::{CursorStore, FailedEvent, QueueError, StoredEvent};

/// Most events per read.
const READ_EVENTS: i64 = 2000;
/// About this many bytes of stored values per read.
const READ_BYTES: i64 = 16 << 20;
/// A stand-by process tries to take an owned listener over this often.
const OWNER_RETRY: Duration = Duration::from_secs(2);
/// Looks for new events at least this often, should a wake-up be missed.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Attempts made on the event the cursor is held at.
#[derive(Debug, Default)]
struct Held {
    event_id: i64,
    attempts: u32,
}

/// Delivers one cursor listener until stop, reconnecting after database errors.
pub(super) async fn cursor_loop(lane: Arc<Lane>, db: Source, shared: Arc<Shared>) {
    let mut backoff = RECONNECT_INITIAL;
    let mut held = Held::default();
    while !shared.stop.is_cancelled() {
        match own_and_deliver(&lane, &db, &shared, &mut held, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                warn!(listener = lane.name(), error = %e, "cursor delivery lost the queue database; retrying");
                back_off(&mut backoff, &shared.stop).await;
            }
        }
    }
}

/// Runs `op` within [`STATEMENT_TIMEOUT`].
async fn timed<T>(
    context: &'static str,
    op: impl Future<Output = Result<T, QueueError>>,
) -> Result<T, DispatchError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, op).await {
        Ok(r) => r.map_err(DispatchError::from),
        Err(_) => Err(DispatchError::Timeout {
            context,
            seconds: STATEMENT_TIMEOUT.as_secs(),
        }),
    }
}

async fn own_and_deliver(
    lane: &Lane,
    db: &Source,
    shared: &Shared,
    held: &mut Held,
    backoff: &mut Duration,
) -> Result<(), DispatchError> {
    let params = db.current();
    let store =
        match tokio::time::timeout(CONNECT_TIMEOUT, CursorStore::connect(&params, &lane.config))
            .await
        {
            Ok(store) => store?,
            Err(_) => {
                return Err(DispatchError::Timeout {
                    context: "connecting",
                    seconds: CONNECT_TIMEOUT.as_secs(),
                });
            }
        };
    while !timed("locking the cursor", store.try_own()).await? {
        if let Some(o) = &shared.observer {
            o.alive();
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(OWNER_RETRY) => {}
        }
    }
    *backoff = RECONNECT_INITIAL;
    let mut position = timed("reading the cursor", store.position()).await?;
    debug!(
        listener = lane.name(),
        position, "delivering from the listener's cursor"
    );
    loop {
        if shared.stop.is_cancelled() {
            return Ok(());
        }
        if let Some(o) = &shared.observer {
            o.alive();
        }
        let read = timed(
            "reading events after the cursor",
            store.read(position, READ_EVENTS, READ_BYTES),
        )
        .await?;
        if read.events.is_empty() {
            if read.scanned_to > position {
                timed("moving the cursor", store.advance(read.scanned_to, &[])).await?;
                position = read.scanned_to;
            }
            tokio::select! {
                _ = shared.stop.cancelled() => return Ok(()),
                _ = lane.events.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        }
        let pass = publish(lane, shared, read.events, held).await;
        let to = if pass.whole {
            read.scanned_to
        } else {
            pass.passed_to.unwrap_or(position)
        };
        if to > position || !pass.failed.is_empty() {
            let ids = timed("moving the cursor", store.advance(to, &pass.failed)).await?;
            report_failed(lane, shared, &pass, &ids);
            position = position.max(to);
        }
        if let Some(delay) = pass.hold {
            tokio::select! {
                _ = shared.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// What publishing one read came to.
#[derive(Default)]
struct Pass {
    /// The last event passed (acknowledged, or refused for good), in order.
    passed_to: Option<i64>,
    /// Every event of the read was passed.
    whole: bool,
    /// Events refused for good, for `walhook.failed`.
    failed: Vec<FailedEvent>,
    /// What observers are told of each failed event: (entity, entity_id, commit time).
    failed_about: Vec<(String, String, SystemTime)>,
    /// Hold the cursor this long: an event is to be tried again.
    hold: Option<Duration>,
}

/// The event an outstanding acknowledgement is for.
struct Sent {
    id: i64,
    entity: String,
    entity_id: String,
    commit_time: SystemTime,
}

/// Publishes `events` in order, judging acknowledgements in order, until all are passed
/// or one is to be tried again.
async fn publish(
    lane: &Lane,
    shared: &Shared,
    events: Vec<(i64, Result<StoredEvent, String>)>,
    held: &mut Held,
) -> Pass {
    let mut pass = Pass::default();
    let mut waiting = FuturesOrdered::new();
    let mut unreadable: VecDeque<(i64, String)> = VecDeque::new();
    let limit = lane.lease.attempt;
    let mut events = events.into_iter();
    loop {
        // Keep up to `concurrency` acknowledgements outstanding.
        while waiting.len() < lane.concurrency && unreadable.is_empty() {
            let Some((id, event)) = events.next() else {
                break;
            };
            let event = match event {
                Ok(event) => event,
                Err(comment) => {
                    unreadable.push_back((id, comment));
                    break;
                }
            };
            if !ready(lane, shared).await {
                return pass;
            }
            let message = lane.format.render(&event);
            let started = lane.sink.start(&event, message).await;
            let sent = Sent {
                id,
                entity: event.entity,
                entity_id: event.entity_id,
                commit_time: event.commit_time,
            };
            waiting.push_back(async move {
                let attempt = match tokio::time::timeout(limit, started.outcome()).await {
                    Ok(attempt) => attempt,
                    Err(_) => super::timed_out(lane, limit),
                };
                (sent, attempt)
            });
        }
        let Some((sent, attempt)) = waiting.next().await else {
            // Everything outstanding is judged: an unreadable event is next, or the end.
            match unreadable.pop_front() {
                Some((id, comment)) => {
                    pass.passed_to = Some(id);
                    pass.failed.push(FailedEvent {
                        event_id: id,
                        attempts: 0,
                        status_code: None,
                        comment: format!("the event cannot be read: {comment}"),
                    });
                    pass.failed_about
                        .push((String::new(), String::new(), SystemTime::now()));
                    continue;
                }
                None => {
                    pass.whole = true;
                    return pass;
                }
            }
        };
        if !judge(lane, shared, sent, &attempt, held, &mut pass) {
            // Outstanding messages after the held one are dropped unjudged: publishing
            // starts again at the held event.
            return pass;
        }
    }
}

/// Waits until the sink can take messages and the rate limit allows one; false on stop.
async fn ready(lane: &Lane, shared: &Shared) -> bool {
    tokio::select! {
        biased;
        _ = shared.stop.cancelled() => return false,
        _ = lane.sink.ready() => {}
    }
    if let Some(limiter) = &lane.limiter {
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return false,
            _ = limiter.until_ready() => {}
        }
    }
    true
}

/// Applies the retry policy to one acknowledgement; false when the cursor is to be held.
fn judge(
    lane: &Lane,
    shared: &Shared,
    sent: Sent,
    attempt: &Attempt,
    held: &mut Held,
    pass: &mut Pass,
) -> bool {
    let made = if held.event_id == sent.id {
        held.attempts.saturating_add(1)
    } else {
        1
    };
    let comment = || {
        attempt
            .comment
            .clone()
            .unwrap_or_else(|| format!("{} ({})", attempt.outcome.describe(), lane.sink.target()))
    };
    let report = |outcome: Observed, comment: Option<&str>| {
        if let Some(o) = &shared.observer {
            o.attempted(&AttemptReport {
                listener: lane.name(),
                notification_id: sent.id,
                entity: &sent.entity,
                entity_id: &sent.entity_id,
                outcome,
                commit_time: sent.commit_time,
                comment,
            });
        }
    };
    let comment = match attempt.verdict() {
        Verdict::Delivered => {
            report(Observed::Delivered, None);
            if held.event_id == sent.id {
                info!(
                    listener = lane.name(),
                    "listener {} delivers again",
                    lane.name()
                );
                *held = Held::default();
            }
            pass.passed_to = Some(sent.id);
            return true;
        }
        Verdict::Retry if made < lane.config.max_attempts => {
            let comment = comment();
            report(Observed::WillRetry, Some(&comment));
            let delay = delay_with_jitter(
                made,
                &lane.config.backoff,
                attempt.retry_after,
                rand::rng().random_range(-1.0..=1.0),
            );
            warn!(
                listener = lane.name(),
                attempts = made,
                "listener {} holds its cursor for {}: {comment}",
                lane.name(),
                humantime::format_duration(delay)
            );
            *held = Held {
                event_id: sent.id,
                attempts: made,
            };
            pass.hold = Some(delay);
            return false;
        }
        Verdict::Retry => format!(
            "{} (the last of {} attempts)",
            comment(),
            lane.config.max_attempts
        ),
        Verdict::Fail => comment(),
    };
    pass.passed_to = Some(sent.id);
    pass.failed.push(FailedEvent {
        event_id: sent.id,
        attempts: i32::try_from(made).unwrap_or(i32::MAX),
        status_code: attempt.status_code.map(i32::from),
        comment,
    });
    pass.failed_about
        .push((sent.entity, sent.entity_id, sent.commit_time));
    if held.event_id == sent.id {
        *held = Held::default();
    }
    true
}

/// Tells observers of the events moved to `walhook.failed` (`ids`: notification id, event
/// id), once they are written.
fn report_failed(lane: &Lane, shared: &Shared, pass: &Pass, ids: &[(i64, i64)]) {
    let Some(o) = &shared.observer else { return };
    for (failed, (entity, entity_id, commit_time)) in pass.failed.iter().zip(&pass.failed_about) {
        let id = ids
            .iter()
            .find(|(_, event)| *event == failed.event_id)
            .map_or(failed.event_id, |(id, _)| *id);
        o.attempted(&AttemptReport {
            listener: lane.name(),
            notification_id: id,
            entity,
            entity_id,
            outcome: Observed::Failed,
            commit_time: *commit_time,
            comment: Some(&failed.comment),
        });
    }
}

//! Delivery for a listener that keeps a cursor over `walhook.event` (`position = "cursor"`):
//! no claims and no per-event rows. One process at a time owns the listener (the cursor
//! store's lock); it reads the events after the cursor in commit order, publishes them in
//! that order with up to `concurrency` acknowledgements outstanding, and moves the cursor
//! past what was acknowledged or refused for good (refused events go to `walhook.failed`).
//!
//! A retryable failure holds the cursor at the event that failed: after the backoff,
//! publishing starts again there. The messages after it that were acknowledged meanwhile
//! are remembered and not published again; after the listener's `max_attempts` the event
//! goes to `walhook.failed` and the cursor moves on. Order on the wire is commit order
//! unless the server stores a later message while it drops an earlier one (then the
//! earlier one follows it on the retry).

use std::collections::{BTreeSet, VecDeque};
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
use crate::delivery::sink::Started;
use crate::delivery::{Attempt, AttemptReport, Observed, Verdict};
use crate::error::{Classify, ErrorClass};
use crate::queue::{CursorRead, CursorStore, FailedEvent, QueueError, StoredEvent};

/// Most events per read.
const READ_EVENTS: i64 = 2000;
/// About this many bytes of stored values per read.
const READ_BYTES: i64 = 16 << 20;
/// A stand-by process tries to take an owned listener over this often.
const OWNER_RETRY: Duration = Duration::from_secs(2);
/// Looks for new events at least this often, should a wake-up be missed.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The event the cursor is held at: attempts made on it, and the events after it that were
/// acknowledged meanwhile (not published again).
#[derive(Clone, Debug, Default)]
struct Held {
    event_id: i64,
    attempts: u32,
    acked: BTreeSet<i64>,
}

impl Held {
    /// The cursor moves past `id`.
    fn passed(&mut self, id: i64) {
        if self.event_id == id {
            self.event_id = 0;
            self.attempts = 0;
        }
        self.acked.remove(&id);
    }
}

/// Delivers one cursor listener until stop, reconnecting after transient database errors.
pub(super) async fn cursor_loop(lane: Arc<Lane>, db: Source, shared: Arc<Shared>) {
    let mut backoff = RECONNECT_INITIAL;
    let mut held = Held::default();
    while !shared.stop.is_cancelled() {
        match own_and_deliver(&lane, &db, &shared, &mut held, &mut backoff).await {
            Ok(()) => return,
            Err(e) if e.class() != ErrorClass::Transient => {
                shared.fail(e);
                return;
            }
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

/// Connects and waits until this process owns the listener; `None` on stop.
async fn own(
    lane: &Lane,
    db: &Source,
    shared: &Shared,
) -> Result<Option<CursorStore>, DispatchError> {
    let params = db.current();
    let connect = CursorStore::connect(&params, &lane.config);
    let store = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(store) => store?,
        Err(_) => {
            return Err(DispatchError::Timeout {
                context: "connecting",
                seconds: CONNECT_TIMEOUT.as_secs(),
            });
        }
    };
    let mut told = false;
    while !timed("locking the cursor", store.try_own()).await? {
        if !told {
            info!(
                listener = lane.name(),
                "listener {} is delivered by another walhook process, or its cursor is not made yet (the first batch of events makes it): standing by",
                lane.name()
            );
            told = true;
        }
        if let Some(o) = &shared.observer {
            o.alive();
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(OWNER_RETRY) => {}
        }
    }
    Ok(Some(store))
}

async fn own_and_deliver(
    lane: &Lane,
    db: &Source,
    shared: &Shared,
    held: &mut Held,
    backoff: &mut Duration,
) -> Result<(), DispatchError> {
    let Some(store) = own(lane, db, shared).await? else {
        return Ok(());
    };
    *backoff = RECONNECT_INITIAL;
    let mut position = timed("reading the cursor", store.position()).await?;
    debug!(
        listener = lane.name(),
        position, "delivering from the listener's cursor"
    );
    // The next events, read while the last ones were published (see below).
    let mut ahead: Option<CursorRead> = None;
    while !shared.stop.is_cancelled() {
        if let Some(o) = &shared.observer {
            o.alive();
        }
        let read = match ahead.take() {
            Some(read) => read,
            None => {
                let read = store.read(position, READ_EVENTS, READ_BYTES);
                timed("reading events after the cursor", read).await?
            }
        };
        if read.events.is_empty() {
            if read.scanned_to > position {
                timed("moving the cursor", store.advance(read.scanned_to, &[])).await?;
                position = read.scanned_to;
            }
            tokio::select! {
                _ = shared.stop.cancelled() => {}
                _ = lane.events.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        }
        let (scanned_to, more) = (read.scanned_to, read.more);
        let publishing = publish(lane, shared, read.events, held.clone());
        // The connection is idle while a read is published. When the read stopped at a
        // limit, the next one is made meanwhile, so that the first publish of the next
        // events follows the last acknowledgement of these without a read in between.
        let (pass, next) = if more {
            let next = timed(
                "reading events after the cursor",
                store.read(scanned_to, READ_EVENTS, READ_BYTES),
            );
            let (pass, next) = tokio::join!(publishing, next);
            (pass, Some(next))
        } else {
            (publishing.await, None)
        };
        let to = match (pass.whole, pass.passed_to) {
            (true, _) => read.scanned_to,
            (false, passed) => passed.unwrap_or(position),
        };
        let failed: Vec<FailedEvent> = pass.failed().cloned().collect();
        if to > position || !failed.is_empty() {
            let ids = timed("moving the cursor", store.advance(to, &failed)).await?;
            position = position.max(to);
            report(lane, shared, &pass.judged, &ids);
        }
        if let Some(h) = &pass.hold {
            let note = store.note_hold(h.event_id, h.status_code, &h.comment);
            timed("noting why the cursor is held", note).await?;
        }
        // The read ahead began where this read ended: it is next only if the cursor got
        // there (otherwise what follows the held event is read again), and only if it found
        // events (an empty one may be older than a wake-up that came meanwhile).
        if pass.whole {
            ahead = next.transpose()?.filter(|r| !r.events.is_empty());
        }
        *held = pass.held;
        if let Some(Hold { delay, .. }) = pass.hold {
            tokio::select! {
                _ = shared.stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
    Ok(())
}

/// The event an outstanding acknowledgement is for.
struct Sent {
    id: i64,
    entity: String,
    entity_id: String,
    commit_time: SystemTime,
}

/// What became of one event of a pass, for the observers once the cursor has moved.
struct Judged {
    sent: Sent,
    outcome: Observed,
    /// The `walhook.failed` row to write, for [`Observed::Failed`].
    failed: Option<FailedEvent>,
}

/// What publishing one read came to.
struct Pass {
    /// The last event passed (acknowledged, or refused for good), in order.
    passed_to: Option<i64>,
    /// Every event of the read was passed.
    whole: bool,
    judged: Vec<Judged>,
    /// The held event's state after the pass.
    held: Held,
    /// Set when an event is to be tried again.
    hold: Option<Hold>,
}

/// A pass that ends holding the cursor at an event to try again: for how long, and why
/// (stored on the cursor row).
struct Hold {
    delay: Duration,
    event_id: i64,
    status_code: Option<i32>,
    comment: String,
}

impl Pass {
    fn failed(&self) -> impl Iterator<Item = &FailedEvent> {
        self.judged.iter().filter_map(|j| j.failed.as_ref())
    }
}

/// Publishes `events` in order, judging acknowledgements in order, until all are passed
/// or one is to be tried again.
async fn publish(
    lane: &Lane,
    shared: &Shared,
    events: Vec<(i64, Result<StoredEvent, String>)>,
    held: Held,
) -> Pass {
    let mut pass = Pass {
        passed_to: None,
        whole: false,
        judged: Vec::new(),
        held,
        hold: None,
    };
    let mut waiting = FuturesOrdered::new();
    let mut events: VecDeque<_> = events.into();
    // Set when a message could not even be handed over: nothing after it is published.
    let mut blocked = false;
    loop {
        while waiting.len() < lane.concurrency && !blocked {
            let Some((id, event)) = events.pop_front() else {
                break;
            };
            if pass.held.acked.contains(&id) {
                waiting.push_back(finished(Sent::of(id, event.ok()), accepted()));
                continue;
            }
            let event = match event {
                Ok(event) => event,
                Err(comment) => {
                    // Judged in order, once everything before it is.
                    waiting.push_back(finished(Sent::of(id, None), unreadable(comment)));
                    continue;
                }
            };
            if !ready(lane, shared).await {
                return pass;
            }
            let started = lane.sink.start(&event, lane.format.render(&event)).await;
            blocked = !started.handed_over();
            waiting.push_back(Box::pin(acknowledged(
                lane,
                Sent::of(id, Some(event)),
                started,
            )));
        }
        let Some((sent, attempt)) = waiting.next().await else {
            pass.whole = events.is_empty();
            return pass;
        };
        if !judge(lane, shared, sent, &attempt, &mut pass) {
            remember_acked(&mut pass.held, waiting).await;
            return pass;
        }
        blocked = false;
    }
}

type Outstanding<'a> = std::pin::Pin<Box<dyn Future<Output = (Sent, Attempt)> + Send + 'a>>;

/// An outcome already known, queued behind the outstanding ones.
fn finished<'a>(sent: Sent, attempt: Attempt) -> Outstanding<'a> {
    Box::pin(std::future::ready((sent, attempt)))
}

/// Waits for the acknowledgement of `started`, within the attempt limit.
async fn acknowledged(lane: &Lane, sent: Sent, started: Started<'_>) -> (Sent, Attempt) {
    let limit = lane.lease.attempt;
    let attempt = match tokio::time::timeout(limit, started.outcome()).await {
        Ok(attempt) => attempt,
        Err(_) => super::lane::timed_out(lane, limit),
    };
    (sent, attempt)
}

/// After a hold: the outstanding messages after the held one were sent already; those the
/// server acknowledges are not published again on the next pass.
async fn remember_acked(held: &mut Held, mut waiting: FuturesOrdered<Outstanding<'_>>) {
    while let Some((sent, attempt)) = waiting.next().await {
        if attempt.verdict() == Verdict::Delivered {
            held.acked.insert(sent.id);
        }
    }
}

impl Sent {
    fn of(id: i64, event: Option<StoredEvent>) -> Sent {
        let (entity, entity_id, commit_time) = event.map_or_else(
            || (String::new(), String::new(), SystemTime::now()),
            |e| (e.entity, e.entity_id, e.commit_time),
        );
        Sent {
            id,
            entity,
            entity_id,
            commit_time,
        }
    }
}

/// The attempt of an event acknowledged on an earlier pass.
fn accepted() -> Attempt {
    Attempt {
        outcome: crate::delivery::policy::Outcome::Accepted,
        status_code: None,
        comment: None,
        retry_after: None,
        latency: Duration::ZERO,
    }
}

/// The attempt of an event that cannot be read back: it fails at once.
fn unreadable(comment: String) -> Attempt {
    Attempt {
        outcome: crate::delivery::policy::Outcome::Unsendable,
        status_code: None,
        comment: Some(format!("the event cannot be read: {comment}")),
        retry_after: None,
        latency: Duration::ZERO,
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
fn judge(lane: &Lane, shared: &Shared, sent: Sent, attempt: &Attempt, pass: &mut Pass) -> bool {
    let held = &mut pass.held;
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
    let comment = match attempt.verdict() {
        Verdict::Delivered => {
            if held.event_id == sent.id {
                info!(
                    listener = lane.name(),
                    "listener {} delivers again",
                    lane.name()
                );
            }
            held.passed(sent.id);
            pass.passed_to = Some(sent.id);
            pass.judged.push(Judged {
                sent,
                outcome: Observed::Delivered,
                failed: None,
            });
            return true;
        }
        Verdict::Retry if made < lane.config.max_attempts => {
            hold(lane, shared, sent, attempt, made, comment(), pass);
            return false;
        }
        Verdict::Retry => format!(
            "{} (the last of {} attempts)",
            comment(),
            lane.config.max_attempts
        ),
        Verdict::Fail => comment(),
    };
    held.passed(sent.id);
    pass.passed_to = Some(sent.id);
    let failed = FailedEvent {
        event_id: sent.id,
        attempts: i32::try_from(made).unwrap_or(i32::MAX),
        status_code: attempt.status_code.map(i32::from),
        comment,
    };
    pass.judged.push(Judged {
        sent,
        outcome: Observed::Failed,
        failed: Some(failed),
    });
    true
}

/// Holds the cursor at `sent` for the policy's delay (the `made`-th attempt failed).
fn hold(
    lane: &Lane,
    shared: &Shared,
    sent: Sent,
    attempt: &Attempt,
    made: u32,
    comment: String,
    pass: &mut Pass,
) {
    if let Some(o) = &shared.observer {
        o.attempted(&AttemptReport {
            listener: lane.name(),
            notification_id: sent.id,
            entity: &sent.entity,
            entity_id: &sent.entity_id,
            outcome: Observed::WillRetry,
            commit_time: sent.commit_time,
            comment: Some(&comment),
        });
    }
    let jitter = rand::rng().random_range(-1.0..=1.0);
    let delay = delay_with_jitter(made, &lane.config.backoff, attempt.retry_after, jitter);
    warn!(
        listener = lane.name(),
        attempts = made,
        "listener {} holds its cursor for {}: {comment}",
        lane.name(),
        humantime::format_duration(delay)
    );
    pass.held.event_id = sent.id;
    pass.held.attempts = made;
    pass.hold = Some(Hold {
        delay,
        event_id: sent.id,
        status_code: attempt.status_code.map(i32::from),
        comment,
    });
}

/// Tells observers what became of a pass's events once the cursor has moved past them
/// (`ids`: each failed event's notification id in `walhook.failed`, by event id).
fn report(lane: &Lane, shared: &Shared, judged: &[Judged], ids: &[(i64, i64)]) {
    let Some(o) = &shared.observer else { return };
    for j in judged {
        let id = match j.outcome {
            Observed::Failed => ids
                .iter()
                .find(|(_, event)| *event == j.sent.id)
                .map_or(j.sent.id, |(id, _)| *id),
            _ => j.sent.id,
        };
        o.attempted(&AttemptReport {
            listener: lane.name(),
            notification_id: id,
            entity: &j.sent.entity,
            entity_id: &j.sent.entity_id,
            outcome: j.outcome,
            commit_time: j.sent.commit_time,
            comment: j.failed.as_ref().map(|f| f.comment.as_str()),
        });
    }
}

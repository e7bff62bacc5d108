//! The dispatcher: claims due notifications from `walhook.new`, renders each in its
//! listener's [`Format`], sends it through the listener's [`Sink`] and records what the
//! attempt ended with (through the retry policy), for every configured listener, until
//! shutdown. It knows listeners only through those two seams.
//!
//! Per listener three stages run as tasks and hand work on through channels:
//! * the *claimer* claims due notifications in batches under a lease (woken by
//!   `NOTIFY walhook_new`, by recorded outcomes, at the earliest retry it scheduled, and by a
//!   periodic sweep that covers other processes), keeping up to a prefetch target of
//!   notifications and bytes outstanding so the next batch is claimed while the previous
//!   one is in flight; claims resume after a cursor (see [`claimer`]);
//! * the *starter* starts deliveries in claim order, each after a concurrency permit and
//!   the rate limiter allow it; for a listener with `batch_size` above 1 one delivery
//!   carries the claimed notifications that are ready, up to `batch_size` and `batch_bytes`,
//!   as one message: one attempt, recorded for each of them, so the whole batch succeeds or
//!   is retried together (claims hold at most one change per entity, so batches keep the
//!   per-entity order);
//! * one *recorder*, shared by all listeners, records outcomes in batches: whatever has
//!   arrived while the previous batch was being written, one statement per outcome kind.
//!
//! Claims use one database connection (which also LISTENs), recording and lease renewal
//! another; both reconnect with backoff. Several processes can share one queue: a row is
//! claimed by one lease holder at a time (a random id per dispatcher), an attempt starts
//! only if it ends before the lease does, held leases are renewed (see [`super::lease`]),
//! and outcomes are recorded only for rows still leased here.

mod batch;
mod claimer;
mod cursor;

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::RngExt as _;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::format::{Format, Message};
use super::lease::{LeaseBook, LeaseTimes};
use super::policy::{Outcome, delay_with_jitter};
use super::sink::{Sink, SinkError};
use super::validation::Handshake;
use super::{Attempt, AttemptReport, DeliveryObserver, Observed, Verdict};
use crate::config::{EventGridDelivery, ListenerConfig, ListenerFormat, RateLimit};
use crate::db::Source;
use crate::error::{Classify, ErrorClass};
use crate::queue::{
    Completions, DeliveredRow, EVENTS_PAYLOAD, EntityKey, FailedAttemptRow, Notification,
    NotificationStore, OnNewNotifications, QueueError, SWEEP_PAYLOAD, StoredEvent,
};
use crate::replication::conn::{ConnectParams, DEFAULT_APPLICATION_NAME};
use batch::{Backlog, Pending};
use claimer::{ClaimState, TotalBytes};

/// Notifications claimed ahead per concurrency slot, so deliveries never wait for a claim.
/// Claims wait for a quarter of this to be free (`claimer::claimable`); 16 rather than 8
/// makes those claims 64 rows or more at the default concurrency.
const PREFETCH_PER_SLOT: usize = 16;
/// Upper bound of notifications outstanding (claimed, not yet recorded) per listener.
const MAX_OUTSTANDING: usize = 4000;
/// A rate-limited listener claims no more than it may send in this long.
const RATE_LIMITED_PREFETCH: Duration = Duration::from_secs(5);
/// Most outcomes recorded in one batch.
const RECORD_BATCH: usize = 2000;
/// How much longer than one attempt a lease lasts, by default: how long the notifications
/// of a process that died wait before another process takes them.
pub const DEFAULT_LEASE_EXTRA: Duration = Duration::from_secs(30);
/// An attempt is cut off this long after the listener's timeout, if the sink has not
/// ended it by then.
const ATTEMPT_GRACE: Duration = Duration::from_millis(500);
/// Longest a claim or record statement may take before the connection is considered dead.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// In-flight deliveries get at most this long to finish after shutdown is requested.
const MAX_SHUTDOWN_WAIT: Duration = Duration::from_secs(30);
/// After shutdown is requested, recording outcomes is retried for at most this long.
const SHUTDOWN_RECORD_DEADLINE: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Slack on the in-process retry timer, so it fires after the row is due in the database.
const DUE_SLACK: Duration = Duration::from_millis(10);

/// Why the dispatcher stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The queue tables could not be used.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A listener's sink could not be built (its url, headers or secret).
    #[error(transparent)]
    Listener(#[from] SinkError),
    /// The database did not answer in time.
    #[error(
        "no answer from the queue database within {}s while {context}; check that PostgreSQL is running and reachable",
        seconds
    )]
    Timeout {
        /// What walhook was doing.
        context: &'static str,
        /// The time limit.
        seconds: u64,
    },
    /// A dispatcher task ended unexpectedly (a bug).
    #[error("a delivery task stopped unexpectedly: {detail}; restart walhook and report this")]
    Internal {
        /// The task's error.
        detail: String,
    },
}

impl Classify for DispatchError {
    fn class(&self) -> ErrorClass {
        match self {
            DispatchError::Queue(e) => e.class(),
            DispatchError::Listener(e) => e.class(),
            DispatchError::Timeout { .. } => ErrorClass::Transient,
            DispatchError::Internal { .. } => ErrorClass::Permanent,
        }
    }
}

/// Delivers notifications for `listeners` from the queue in the database `db` until
/// `shutdown` is cancelled, then stops claiming, lets in-flight deliveries finish (up to
/// the listener timeout, at most 30 s), records them, frees the leases of notifications
/// claimed but not started and returns `Ok`.
///
/// Transient database errors are retried with backoff (logged once per outage); other
/// errors stop delivery and are returned. `source_system` is the `sourceSystem` of the
/// payloads. The queue schema must be migrated before.
pub async fn run(
    db: ConnectParams,
    listeners: Vec<ListenerConfig>,
    source_system: String,
    shutdown: CancellationToken,
) -> Result<(), DispatchError> {
    run_with(db, listeners, source_system, shutdown, Options::default()).await
}

/// [`run`], telling `observer` the outcome of every attempt.
pub async fn run_observed(
    db: ConnectParams,
    listeners: Vec<ListenerConfig>,
    source_system: String,
    shutdown: CancellationToken,
    observer: Option<Arc<dyn DeliveryObserver>>,
) -> Result<(), DispatchError> {
    let options = Options {
        observer,
        ..Options::default()
    };
    run_with(db, listeners, source_system, shutdown, options).await
}

/// How a dispatcher runs beyond its listeners; the daemon uses the defaults.
#[derive(Clone)]
pub struct Options {
    /// Told the outcome of every attempt.
    pub observer: Option<Arc<dyn DeliveryObserver>>,
    /// How much longer than one attempt (the listener's timeout) a lease lasts
    /// ([`DEFAULT_LEASE_EXTRA`]); tests shorten it to see leases end and renew.
    pub lease_extra: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            observer: None,
            lease_extra: DEFAULT_LEASE_EXTRA,
        }
    }
}

/// [`run`] with [`Options`].
pub async fn run_with(
    db: ConnectParams,
    listeners: Vec<ListenerConfig>,
    source_system: String,
    shutdown: CancellationToken,
    options: Options,
) -> Result<(), DispatchError> {
    let (_fixed, db) = tokio::sync::watch::channel(Arc::new(db));
    let db = Source::following(db);
    run_following(db, listeners, source_system, shutdown, options).await
}

/// [`run_with`] with database parameters that may change while it runs (a reloaded
/// password): each new connection uses the parameters current at that moment.
pub(crate) async fn run_following(
    db: Source,
    listeners: Vec<ListenerConfig>,
    source_system: String,
    shutdown: CancellationToken,
    options: Options,
) -> Result<(), DispatchError> {
    let mut lanes = Vec::with_capacity(listeners.len());
    for (index, config) in listeners.into_iter().enumerate() {
        lanes.push(Arc::new(Lane::new(
            index,
            config,
            &source_system,
            options.lease_extra,
        )?));
    }
    if lanes.is_empty() {
        debug!("no listeners configured: nothing to deliver");
        shutdown.cancelled().await;
        return Ok(());
    }
    // Random per dispatcher: never shared by two processes (or two dispatchers in one), and
    // nothing about the host, so clones, containers and reused pids cannot collide.
    let owner = uuid::Uuid::new_v4().to_string();
    let shared = Arc::new(Shared {
        stop: shutdown.child_token(),
        fatal: Mutex::new(None),
        observer: options.observer.clone(),
        bytes: TotalBytes::default(),
    });
    let lanes: Arc<[Arc<Lane>]> = lanes.into();
    let wake_all: OnNewNotifications = {
        let lanes = lanes.clone();
        Arc::new(move |payload: &str| {
            for lane in lanes.iter() {
                lane.events.notify_one();
                // New events only: no walhook.new rows to claim.
                if payload == EVENTS_PAYLOAD {
                    continue;
                }
                if payload == SWEEP_PAYLOAD {
                    lane.claims.sweep_soon();
                }
                lane.wake.notify_one();
            }
        })
    };
    let validation_db = db.clone();
    let claim_link = Arc::new(Link::new("claiming", db.clone(), &owner, Some(wake_all)));
    let record_link = Arc::new(Link::new("recording", db, &owner, None));

    // Renewal outlives claiming and starting: it ends after the last outcome is recorded.
    let renewing = CancellationToken::new();
    let mut renewers = JoinSet::new();
    for lane in lanes.iter() {
        renewers.spawn(renew_loop(
            lane.clone(),
            record_link.clone(),
            shared.clone(),
            renewing.clone(),
        ));
    }
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record_loop(
        lanes.clone(),
        record_link,
        shared.clone(),
        options.observer,
        done_rx,
    ));
    let mut tasks = JoinSet::new();
    for lane in lanes.iter().filter(|l| l.validated.is_some()) {
        tasks.spawn(validate(
            lane.clone(),
            validation_db.clone(),
            shared.clone(),
        ));
    }
    for lane in lanes.iter().filter(|l| l.config.keeps_cursor()) {
        tasks.spawn(cursor::cursor_loop(
            lane.clone(),
            validation_db.clone(),
            shared.clone(),
        ));
    }
    for lane in lanes.iter() {
        let (claimed_tx, claimed_rx) = mpsc::unbounded_channel();
        tasks.spawn(claimer::claim_loop(
            lane.clone(),
            claim_link.clone(),
            shared.clone(),
            claimed_tx,
            done_tx.clone(),
        ));
        tasks.spawn(start_loop(
            lane.clone(),
            shared.clone(),
            claimed_rx,
            done_tx.clone(),
        ));
    }
    // The recorder ends when every sender is gone: after the last delivery is reported.
    drop(done_tx);
    info!(
        listeners = lanes.len(),
        owner = %owner,
        "delivering notifications"
    );

    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            shared.fail(DispatchError::Internal {
                detail: e.to_string(),
            });
        }
    }
    if let Err(e) = recorder.await {
        shared.fail(DispatchError::Internal {
            detail: e.to_string(),
        });
    }
    renewing.cancel();
    while let Some(joined) = renewers.join_next().await {
        if let Err(e) = joined {
            shared.fail(DispatchError::Internal {
                detail: e.to_string(),
            });
        }
    }
    drop(claim_link);
    match shared.take_fatal() {
        Some(e) => Err(e),
        None => {
            info!("delivery stopped");
            Ok(())
        }
    }
}

/// What every task sees: the stop signal, the first fatal error and the bytes claimed.
struct Shared {
    stop: CancellationToken,
    fatal: Mutex<Option<DispatchError>>,
    /// Told that claim loops go round, for the watchdog.
    observer: Option<Arc<dyn DeliveryObserver>>,
    bytes: TotalBytes,
}

impl Shared {
    /// Records a non-transient error and stops delivery.
    fn fail(&self, e: DispatchError) {
        let mut fatal = lock(&self.fatal);
        if fatal.is_none() {
            error!(error = %e, "delivery stops");
            *fatal = Some(e);
        }
        self.stop.cancel();
    }

    fn failed(&self) -> bool {
        lock(&self.fatal).is_some()
    }

    fn take_fatal(&self) -> Option<DispatchError> {
        lock(&self.fatal).take()
    }
}

/// A poisoned lock only means another task panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One database connection, reconnected on demand, logging each outage once.
struct Link {
    purpose: &'static str,
    config: Source,
    owner: String,
    on_new: Option<OnNewNotifications>,
    current: tokio::sync::Mutex<Option<Arc<NotificationStore>>>,
    down: AtomicBool,
}

impl Link {
    fn new(
        purpose: &'static str,
        config: Source,
        owner: &str,
        on_new: Option<OnNewNotifications>,
    ) -> Link {
        Link {
            purpose,
            config,
            owner: owner.to_owned(),
            on_new,
            current: tokio::sync::Mutex::new(None),
            down: AtomicBool::new(false),
        }
    }

    /// The live connection, connecting first when there is none.
    async fn store(&self) -> Result<Arc<NotificationStore>, DispatchError> {
        let mut current = self.current.lock().await;
        if let Some(store) = current.as_ref()
            && !store.is_closed()
        {
            return Ok(store.clone());
        }
        *current = None;
        let mut config = ConnectParams::clone(&self.config.current());
        if config.application_name == DEFAULT_APPLICATION_NAME {
            // Lets a DBA tell delivery connections apart in pg_stat_activity.
            config.application_name = "walhook delivery".to_owned();
        }
        let connect = NotificationStore::connect(&config, &self.owner, self.on_new.clone());
        let store = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| DispatchError::Timeout {
                context: "connecting",
                seconds: CONNECT_TIMEOUT.as_secs(),
            })??;
        let store = Arc::new(store);
        *current = Some(store.clone());
        // Notifications sent while this connection was not listening are lost: look now,
        // behind the cursors too.
        if let Some(wake) = &self.on_new {
            wake(SWEEP_PAYLOAD);
        }
        Ok(store)
    }

    /// Forgets `store` (when it is still the current one) after a transient error.
    async fn broken(&self, store: Option<&Arc<NotificationStore>>, e: &DispatchError) {
        if let Some(store) = store {
            let mut current = self.current.lock().await;
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, store)) {
                *current = None;
            }
        }
        if !self.down.swap(true, Ordering::AcqRel) {
            warn!(error = %e, "delivery lost the queue database while {}; retrying", self.purpose);
        }
    }

    fn healthy(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            info!(
                "delivery reached the queue database again ({})",
                self.purpose
            );
        }
    }
}

/// One listener's delivery state.
struct Lane {
    index: usize,
    config: ListenerConfig,
    format: Format,
    sink: Sink,
    limiter: Option<DefaultDirectRateLimiter>,
    permits: Arc<Semaphore>,
    concurrency: usize,
    wake: Notify,
    /// Woken when new events are stored, for a cursor listener.
    events: Notify,
    /// Cursor-independent claim state, shared with the recorder.
    claims: ClaimState,
    /// Claim no more than this many ahead.
    target: usize,
    lease: LeaseTimes,
    /// The leases held for this listener.
    leases: LeaseBook,
    /// When the earliest retry this process scheduled becomes due.
    next_due: Mutex<Option<Instant>>,
    /// Whether the last recorded attempt failed (logged on change; shrinks prefetch).
    failing: AtomicBool,
    /// Batch limits, for a listener whose format and `batch_size` send batches.
    batch: Option<BatchLimits>,
    /// For listeners that must be validated first (Event Grid webhooks): true once they are;
    /// nothing is claimed before.
    validated: Option<tokio::sync::watch::Sender<bool>>,
}

/// How much one batch message may carry.
#[derive(Clone, Copy, Debug)]
struct BatchLimits {
    /// Most events.
    size: usize,
    /// Most body bytes (one larger event still goes, alone).
    bytes: usize,
}

impl Lane {
    fn new(
        index: usize,
        config: ListenerConfig,
        source_system: &str,
        lease_extra: Duration,
    ) -> Result<Lane, DispatchError> {
        let format = Format::for_listener(&config, source_system);
        let sink = Sink::for_listener(&config)?;
        let concurrency = config.concurrency.max(1);
        let limiter = config.rate_limit.and_then(quota).map(RateLimiter::direct);
        let batch = (config.batch_size > 1 && format.batches()).then(|| BatchLimits {
            size: config.batch_size,
            bytes: usize::try_from(config.batch_bytes).unwrap_or(usize::MAX),
        });
        // A batching listener holds enough for two full batches per slot.
        let per_slot = batch.map_or(PREFETCH_PER_SLOT, |b| {
            PREFETCH_PER_SLOT.max(b.size.saturating_mul(2))
        });
        let mut target = concurrency
            .saturating_mul(per_slot)
            .clamp(concurrency, MAX_OUTSTANDING.max(concurrency));
        if let Some(rate) = config.rate_limit {
            // The rate counts requests; a batch is one.
            let per_request = batch.map_or(1, |b| b.size);
            target = target.min(rate_limited_prefetch(rate).saturating_mul(per_request));
        }
        let lease = LeaseTimes::new(attempt_limit(&config), lease_extra);
        let validated = match &config.format {
            ListenerFormat::EventGrid(c)
                if matches!(c.delivery, EventGridDelivery::Webhook { .. }) =>
            {
                Some(tokio::sync::watch::Sender::new(false))
            }
            _ => None,
        };
        Ok(Lane {
            validated,
            index,
            format,
            sink,
            limiter,
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            wake: Notify::new(),
            events: Notify::new(),
            claims: ClaimState::new(),
            target,
            lease,
            leases: LeaseBook::default(),
            next_due: Mutex::new(None),
            failing: AtomicBool::new(false),
            batch,
            config,
        })
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    /// Sends `message` through the sink, within the listener's timeout whatever the sink
    /// does: the lease arithmetic below relies on attempts that end in time.
    async fn attempt(&self, event: &StoredEvent, message: Message) -> Attempt {
        let limit = self.lease.attempt;
        match tokio::time::timeout(limit, self.sink.send(event, message)).await {
            Ok(attempt) => attempt,
            Err(_) => timed_out(self, limit),
        }
    }

    /// How many to hold claimed. A failing listener gets no prefetch: its attempts are slow
    /// (timeouts) and rows waiting behind them would only sit on their leases.
    fn target(&self) -> usize {
        if self.failing.load(Ordering::Acquire) {
            // One message per slot: a batch for a batching listener.
            let per_message = self.batch.map_or(1, |b| b.size);
            self.concurrency
                .saturating_mul(per_message)
                .min(self.target)
        } else {
            self.target
        }
    }

    /// When the earliest retry this process scheduled becomes due.
    fn next_due(&self) -> Option<Instant> {
        *lock(&self.next_due)
    }

    /// Whether a retry this process scheduled is due now (then forgets it).
    fn take_due(&self) -> bool {
        let mut due = lock(&self.next_due);
        if due.is_some_and(|d| d <= Instant::now()) {
            *due = None;
            return true;
        }
        false
    }

    fn schedule(&self, due: Instant) {
        let mut next = lock(&self.next_due);
        *next = Some(next.map_or(due, |n| n.min(due)));
    }

    /// Whether an attempt for `c` starting `now` ends before its lease does. It may not when
    /// the lease was lost to another process (its renewal failed) or too little of it is
    /// left: another process could deliver it at the same time, so it is handed back instead
    /// (a no-op in the database when the lease is no longer ours).
    fn startable(&self, c: &ClaimedRow, now: Instant) -> bool {
        let until = self.leases.until(c.notification.id, c.claim);
        let ok = until.is_some_and(|until| self.lease.may_start(now, until));
        if !ok {
            debug!(
                listener = self.name(),
                notification = c.notification.id,
                lost = until.is_none(),
                "not starting an attempt that could outlive its lease"
            );
        }
        ok
    }
}

/// The attempt that had no outcome within `limit`.
fn timed_out(lane: &Lane, limit: Duration) -> Attempt {
    Attempt {
        outcome: Outcome::TimedOut,
        status_code: None,
        comment: Some(format!(
            "no outcome within {} from {}",
            humantime::format_duration(lane.config.timeout),
            lane.sink.target()
        )),
        retry_after: None,
        latency: limit,
    }
}

/// The longest an attempt may take: the listener's timeout, plus a little for the sink to
/// notice its own timeout and report it in its words.
fn attempt_limit(config: &ListenerConfig) -> Duration {
    config.timeout.saturating_add(ATTEMPT_GRACE)
}

/// The governor quota for `count` per `per`: a burst of `count`, then one every `per/count`.
fn quota(rate: RateLimit) -> Option<Quota> {
    let count = NonZeroU32::new(rate.count)?;
    let period = rate.per.checked_div(rate.count)?;
    Some(Quota::with_period(period)?.allow_burst(count))
}

/// How many a rate-limited listener claims ahead: what it may send in a few seconds.
fn rate_limited_prefetch(rate: RateLimit) -> usize {
    let per_second = f64::from(rate.count) / rate.per.as_secs_f64().max(1e-9);
    let n = (per_second * RATE_LIMITED_PREFETCH.as_secs_f64()).ceil();
    if n.is_finite() && n >= 1.0 {
        // Bounded above by MAX_OUTSTANDING through the caller's min.
        n.min(MAX_OUTSTANDING as f64) as usize
    } else {
        1
    }
}

/// A claimed notification on its way to the starter.
struct ClaimedRow {
    notification: Notification,
    /// Which claim of this lane took it (see [`LeaseBook`]).
    claim: u64,
    /// Received size of its event's `row` and `old`, counted against the byte budgets.
    bytes: u64,
}

/// What the starter and claimer tell the recorder: one notification, or every
/// notification of one batch attempt, so a batch is always recorded in one statement (its
/// retries come due together, and it is retried whole).
enum Report {
    One(Done),
    Batch(Vec<Done>),
}

impl From<Done> for Report {
    fn from(d: Done) -> Report {
        Report::One(d)
    }
}

/// What the recorder is told about one claimed notification.
struct Done {
    lane: usize,
    id: i64,
    /// The claim that took it, whose lease is forgotten once this is recorded.
    claim: u64,
    /// Received bytes it held against the budgets (0 when never counted).
    bytes: u64,
    what: Ended,
}

/// What became of a claimed notification.
enum Ended {
    /// An attempt was made.
    Attempted {
        attempts_before: i32,
        attempt: Attempt,
        /// The retry delay's random spread, drawn once per attempt so the notifications of
        /// one batch come due together.
        jitter: f64,
        commit_time: std::time::SystemTime,
        entity: String,
        entity_id: String,
    },
    /// The claimed row's event could not be read: move it to `walhook.failed`.
    Unreadable { comment: String },
    /// Claimed but not attempted: free the lease.
    Release,
}

impl Done {
    fn release(lane: &Lane, row: &ClaimedRow) -> Done {
        Done {
            lane: lane.index,
            id: row.notification.id,
            claim: row.claim,
            bytes: row.bytes,
            what: Ended::Release,
        }
    }

    /// The outcome of an attempt for `row`. The event is done with: the fields observers
    /// name are moved instead of copied.
    fn attempted(lane: &Lane, row: ClaimedRow, attempt: Attempt) -> Done {
        Done::attempted_with(lane, row, attempt, rand::rng().random_range(-1.0..=1.0))
    }

    /// [`Done::attempted`] with the retry jitter given (one per batch).
    fn attempted_with(lane: &Lane, row: ClaimedRow, attempt: Attempt, jitter: f64) -> Done {
        let ClaimedRow {
            notification: n,
            claim,
            bytes,
        } = row;
        Done {
            lane: lane.index,
            id: n.id,
            claim,
            bytes,
            what: Ended::Attempted {
                attempts_before: n.attempts,
                attempt,
                jitter,
                commit_time: n.event.commit_time,
                entity: n.event.entity,
                entity_id: n.event.entity_id,
            },
        }
    }
}

/// Sleeps for `backoff` (or until stop) and doubles it.
async fn back_off(backoff: &mut Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = stop.cancelled() => {}
    }
    *backoff = backoff.saturating_mul(2).min(RECONNECT_MAX);
}

type Failure = (Option<Arc<NotificationStore>>, DispatchError);

/// Runs `op` on the link's live connection within [`STATEMENT_TIMEOUT`]; a failure carries
/// the connection it happened on, for [`Link::broken`].
async fn on_store<T, F, Fut>(link: &Link, context: &'static str, op: F) -> Result<T, Failure>
where
    F: FnOnce(Arc<NotificationStore>) -> Fut,
    Fut: Future<Output = Result<T, QueueError>>,
{
    let store = link.store().await.map_err(|e| (None, e))?;
    match tokio::time::timeout(STATEMENT_TIMEOUT, op(store.clone())).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((Some(store), e.into())),
        Err(_) => Err((
            Some(store),
            DispatchError::Timeout {
                context,
                seconds: STATEMENT_TIMEOUT.as_secs(),
            },
        )),
    }
}

/// Runs the validation handshake of a listener that needs one (an Event Grid webhook),
/// which opens its claimer's gate.
async fn validate(lane: Arc<Lane>, db: Source, shared: Arc<Shared>) {
    let (Some(validated), Format::EventGrid(format), Some(sink), ListenerFormat::EventGrid(config)) = (
        &lane.validated,
        &lane.format,
        lane.sink.as_http(),
        &lane.config.format,
    ) else {
        return;
    };
    let EventGridDelivery::Webhook { validation_url } = &config.delivery else {
        return;
    };
    let handshake = Handshake {
        listener: &lane.config,
        format,
        sink,
        validation_url,
    };
    if let Err(e) = handshake.run(&db, validated, &shared.stop).await {
        shared.fail(e.into());
    }
}

/// Starts deliveries for one listener in claim order, within its concurrency limit and
/// rate limit (a batch counts as one delivery); at stop, lets the running ones finish within
/// the deadline.
async fn start_loop(
    lane: Arc<Lane>,
    shared: Arc<Shared>,
    claimed: mpsc::UnboundedReceiver<Vec<ClaimedRow>>,
    done: mpsc::UnboundedSender<Report>,
) {
    let mut in_flight = JoinSet::new();
    let mut backlog = Backlog::new(claimed);
    let stop = &shared.stop;
    loop {
        while in_flight.try_join_next().is_some() {}
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            next = backlog.next() => next,
        };
        let Some(next) = next else { break };
        // A transport that is down as a whole (a broker outage) holds the listener here: no
        // attempt is made or counted, claimed rows keep their renewed leases, and delivery
        // resumes in order once it is back.
        let ready = tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = lane.sink.ready() => true,
        };
        if !ready {
            let _ = done.send(Done::release(&lane, &next.claimed).into());
            break;
        }
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            permit = lane.permits.clone().acquire_owned() => permit.ok(),
        };
        let release = |p: &Pending| Done::release(&lane, &p.claimed);
        let Some(permit) = permit else {
            let _ = done.send(release(&next).into());
            break;
        };
        if let Some(limiter) = &lane.limiter {
            let stopped = tokio::select! {
                biased;
                _ = stop.cancelled() => true,
                _ = limiter.until_ready() => false,
            };
            if stopped {
                let _ = done.send(release(&next).into());
                break;
            }
        }
        let now = Instant::now();
        if !lane.startable(&next.claimed, now) {
            let _ = done.send(release(&next).into());
            continue;
        }
        if let Some(limits) = lane.batch {
            let items = batch::fill(&lane, next, &mut backlog, limits, now, &done);
            in_flight.spawn(batch::attempt(lane.clone(), items, permit, done.clone()));
            continue;
        }
        let lane = lane.clone();
        let done = done.clone();
        in_flight.spawn(async move {
            let ClaimedRow {
                notification: n,
                claim,
                bytes,
            } = next.claimed;
            let attempt = lane.attempt(&n.event, lane.format.render(&n.event)).await;
            drop(permit);
            let row = ClaimedRow {
                notification: n,
                claim,
                bytes,
            };
            let _ = done.send(Done::attempted(&lane, row, attempt).into());
        });
    }

    // Stopping: hand back what was claimed but not started (the claimer closes the channel
    // when it ends), then give the running attempts until the deadline.
    while let Some(next) = backlog.next().await {
        let _ = done.send(Done::release(&lane, &next.claimed).into());
    }
    let deadline = lane.config.timeout.min(MAX_SHUTDOWN_WAIT) + Duration::from_millis(500);
    let finished = tokio::time::timeout(deadline, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(
            listener = lane.name(),
            abandoned = in_flight.len(),
            "deliveries still running at the shutdown deadline were abandoned; their notifications stay in walhook.new and are delivered again"
        );
        in_flight.abort_all();
    }
}

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
async fn record_loop(
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

/// Renews the leases of one listener's held notifications before they get too short
/// (see [`LeaseTimes::renew_before`]), until `until` is cancelled after the last outcome
/// is recorded. A failed renewal is retried at the next round; meanwhile the starter lets
/// no attempt begin that its lease could not see through.
async fn renew_loop(
    lane: Arc<Lane>,
    link: Arc<Link>,
    shared: Arc<Shared>,
    until: CancellationToken,
) {
    let mut rounds = tokio::time::interval(lane.lease.renew_every);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            _ = until.cancelled() => return,
        }
        let due = lane.leases.due(lane.lease.renew_before(Instant::now()));
        if due.is_empty() || shared.failed() {
            continue;
        }
        let ids: Vec<i64> = due.iter().map(|(id, _)| *id).collect();
        let sent = Instant::now();
        let length = lane.lease.length;
        let renewal = on_store(&link, "renewing leases", |store| {
            let ids = &ids;
            async move { store.renew(ids, length).await }
        });
        let result = tokio::select! {
            result = renewal => result,
            _ = until.cancelled() => return,
        };
        match result {
            Ok(kept) => {
                link.healthy();
                let lost = lane.leases.renewed(&due, &kept, sent + length);
                if lost > 0 {
                    debug!(
                        listener = lane.name(),
                        lost,
                        "leases no longer held (outcomes recorded meanwhile, or taken over after a database outage)"
                    );
                }
            }
            Err((store, e)) if e.class() == ErrorClass::Transient => {
                link.broken(store.as_ref(), &e).await;
            }
            Err((_, e)) => shared.fail(e),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_quota_allows_a_burst_of_count_then_one_per_period() {
        let q = quota(RateLimit {
            count: 20,
            per: Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!(q.burst_size().get(), 20);
        assert_eq!(q.replenish_interval(), Duration::from_millis(50));
        assert!(
            quota(RateLimit {
                count: 0,
                per: Duration::from_secs(1)
            })
            .is_none()
        );
    }

    #[test]
    fn rate_limited_listeners_claim_only_a_few_seconds_ahead() {
        let r = |count, per| rate_limited_prefetch(RateLimit { count, per });
        assert_eq!(r(20, Duration::from_secs(1)), 100);
        assert_eq!(r(1, Duration::from_secs(3600)), 1);
        assert_eq!(r(u32::MAX, Duration::from_millis(1)), MAX_OUTSTANDING);
    }
}

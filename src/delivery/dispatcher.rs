//! The dispatcher: claims due notifications from `walhook.new`, renders each in its
//! listener's [`Format`], sends it through the listener's `Sink` and records what the
//! attempt ended with (through the retry policy), for every configured listener, until
//! shutdown. It knows listeners only through those two seams.
//!
//! Per listener three stages run as tasks and hand work on through channels:
//! * the *claimer* claims due notifications in batches under a lease (woken by
//!   `NOTIFY walhook_new`, by recorded outcomes, at the earliest retry it scheduled, and by a
//!   periodic sweep that covers other processes), keeping up to a prefetch target of
//!   notifications and bytes outstanding so the next batch is claimed while the previous
//!   one is in flight; claims resume after a cursor (see `claimer`);
//! * the *starter* starts deliveries in claim order, each after a concurrency permit and
//!   the rate limiter allow it; for a listener with `batch_size` above 1 one delivery
//!   carries the claimed notifications that are ready, up to `batch_size` and `batch_bytes`,
//!   as one message: one attempt, recorded for each of them, so the whole batch succeeds or
//!   is retried together (claims hold at most one change per entity, so batches keep the
//!   per-entity order);
//! * one *recorder*, shared by all listeners, records outcomes in batches: whatever has
//!   arrived while the previous batch was being written, one statement per outcome kind
//!   (see `recorder`; a listener's state is its `lane`).
//!
//! Claims use one database connection (which also LISTENs), recording and lease renewal
//! another; both reconnect with backoff. Several processes can share one queue: a row is
//! claimed by one lease holder at a time (a random id per dispatcher), an attempt starts
//! only if it ends before the lease does, held leases are renewed (see `delivery::lease`),
//! and outcomes are recorded only for rows still leased here.

mod batch;
mod claimer;
mod cursor;
mod lane;
mod recorder;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::RngExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::format::Format;
use super::sink::SinkError;
use super::validation::Handshake;
use super::{Attempt, DeliveryObserver};
use crate::config::{EventGridDelivery, ListenerConfig, ListenerFormat};
use crate::db::Source;
use crate::error::{Classify, ErrorClass};
use crate::queue::{
    EVENTS_PAYLOAD, Notification, NotificationStore, OnNewNotifications, QueueError, SWEEP_PAYLOAD,
};
use crate::replication::conn::{ConnectParams, DEFAULT_APPLICATION_NAME};
use batch::{Backlog, Pending};
use claimer::TotalBytes;
use lane::{BatchLimits, Lane};
use recorder::record_loop;

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

/// A claimed notification on its way to the starter.
struct ClaimedRow {
    notification: Notification,
    /// Which claim of this lane took it (see `LeaseBook`).
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

/// Renews the leases of one listener's held notifications before they get too short
/// (see `LeaseTimes::renew_before`), until `until` is cancelled after the last outcome
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

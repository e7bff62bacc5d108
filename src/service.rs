//! The daemon: connects, streams, maps, queues; reconnects with backoff; stops on shutdown.
//!
//! Two tasks per session. The *reader* owns the replication stream: it decodes, maps and
//! hands events to the *writer* through a bounded channel, and it alone talks back to the
//! server (status updates). The writer commits events in batches that span many source
//! transactions and publishes the end LSN of the last source commit whose events are
//! durable; only that LSN is ever reported to the server as flushed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::{AdminState, Health};
use crate::config::Config;
use crate::delivery::{AttemptReport, DeliveryObserver, Observed};
use crate::error::{Classify, ErrorClass};
use crate::guard::Identity;
use crate::mapper::{EntityEvent, Mapper, TxContext};
use crate::metrics::Metrics;
use crate::queue::QueueWriter;
use crate::replication::conn::{ConnectParams, ReplicationConnection, ReplicationStream};
use crate::replication::pgoutput::{self, Message};
use crate::replication::protocol::ReplicationMessage;
use crate::types::Lsn;

/// Prefix of the heartbeat messages written with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "walhook.heartbeat";

const SQL_HEARTBEAT: &str = "SELECT pg_logical_emit_message(false, $1, '')";

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    /// The classification of the underlying error.
    pub class: ErrorClass,
    /// One line naming the problem and the fix.
    pub message: String,
    /// Set when the session cannot run yet for a reason that is not a failure: the
    /// capture loop waits and retries on the hold's own schedule, logging it once.
    pub hold: Option<Hold>,
}

/// Why capture waits without counting as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Another process streams the slot: stand by (deliveries go on) and take over within
    /// seconds once it is gone.
    Standby,
    /// This database is a copy of the one the queue was recorded on: refuse to run until
    /// `walhook setup --adopt`.
    Cloned,
}

impl Hold {
    /// How long to wait before the next attempt.
    fn retry_after(self) -> Duration {
        match self {
            Hold::Standby => STANDBY_RETRY,
            Hold::Cloned => CLONED_RETRY,
        }
    }
}

/// `object_in_use`: START_REPLICATION on a slot another process streams.
const SQLSTATE_OBJECT_IN_USE: &str = "55006";

impl ServiceError {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ServiceError {
            class,
            message: message.into(),
            hold: None,
        }
    }

    fn from_err<E: Classify + std::fmt::Display>(e: E) -> Self {
        ServiceError::new(e.class(), e.to_string())
    }

    fn transient(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorClass::Transient, message)
    }
}

impl Classify for ServiceError {
    fn class(&self) -> ErrorClass {
        self.class
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

/// What the service tells the outside world: metrics, readiness, systemd.
#[derive(Clone)]
pub(crate) struct Observe {
    metrics: Arc<Metrics>,
    monitors: crate::monitor::MonitorHandle,
    health: Arc<Health>,
    ready: watch::Sender<bool>,
    status: watch::Sender<String>,
}

impl Observe {
    fn streaming(&self, on: bool, why: Option<&str>) {
        self.metrics.set_streaming(on);
        self.health.set_streaming(on);
        if on {
            self.ready.send_replace(true);
        }
        if let Some(why) = why {
            self.health.set_last_error(Some(why.to_owned()));
            self.status.send_replace(format!("not streaming: {why}"));
        }
    }
}

impl DeliveryObserver for Observe {
    fn attempted(&self, r: &AttemptReport<'_>) {
        use crate::metrics::{AttemptOutcome, NotificationStatus};
        let comment = r.comment.unwrap_or_default();
        match r.outcome {
            Observed::Delivered => {
                self.monitors.delivery_succeeded(r.listener);
                let latency = std::time::SystemTime::now()
                    .duration_since(r.commit_time)
                    .ok();
                self.metrics
                    .delivery_attempt(r.listener, AttemptOutcome::Success, latency);
                self.metrics
                    .notification_completed(r.listener, NotificationStatus::Processed);
            }
            Observed::WillRetry => {
                self.monitors.delivery_failed_attempt(r.listener, comment);
                self.metrics
                    .delivery_attempt(r.listener, AttemptOutcome::Retry, None);
            }
            Observed::Failed => {
                self.monitors.notification_failed(
                    r.listener,
                    r.notification_id,
                    r.entity,
                    r.entity_id,
                    comment,
                );
                self.metrics
                    .delivery_attempt(r.listener, AttemptOutcome::Failed, None);
                self.metrics
                    .notification_completed(r.listener, NotificationStatus::Failed);
            }
        }
    }
}

/// The `sourceSystem` of payloads and alerts: `[source] system_name`, else the database name.
fn source_system(config: &Config, params: &ConnectParams) -> String {
    config
        .source
        .system_name
        .clone()
        .unwrap_or_else(|| params.dbname().to_owned())
}

/// Reconnect backoff: doubles from `INITIAL` up to `MAX`.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs the daemon until `shutdown` is cancelled (returns `Ok`) or a non-transient error
/// occurs (returns it). Transient errors reconnect with backoff, one log line per attempt.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ServiceError> {
    run_with_reload(config, shutdown, None).await
}

/// Like [`run`], applying each configuration sent on `reloads` (SIGHUP): listener changes
/// apply without dropping the replication stream; entity, source and queue changes restart
/// the replication session.
pub async fn run_with_reload(
    config: Config,
    shutdown: CancellationToken,
    reloads: Option<watch::Receiver<Arc<Config>>>,
) -> Result<(), ServiceError> {
    // The sender lives as long as the service, so `changed()` only fires on real reloads.
    let (_keep, own_rx) = watch::channel(Arc::new(config.clone()));
    let config_rx = reloads.unwrap_or(own_rx);
    let params = config
        .source
        .connect_params()
        .map_err(ServiceError::from_err)?;

    let (ready_tx, ready_rx) = watch::channel(false);
    let (status_tx, status_rx) = watch::channel(String::from("starting"));
    let monitors = crate::monitor::Monitors::spawn(
        config.monitors.clone(),
        source_system(&config, &params),
        config.path.clone(),
        shutdown.child_token(),
    );
    {
        // Monitors follow reloads too.
        let mut rx = config_rx.clone();
        let monitors = monitors.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() { return; }
                        let new = rx.borrow_and_update().clone();
                        monitors.reload(new.monitors.clone());
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
    let observe = Observe {
        monitors,
        metrics: Arc::new(Metrics::new()),
        health: Arc::new(Health::new()),
        ready: ready_tx,
        status: status_tx,
    };
    let stop = shutdown.child_token();
    // A bad [admin] listen address is a configuration error: fail before streaming.
    if let Some(admin) = &config.admin {
        let listener = crate::admin::bind(admin.listen)
            .await
            .map_err(ServiceError::from_err)?;
        let app = crate::admin::router(AdminState {
            metrics: observe.metrics.clone(),
            health: observe.health.clone(),
        });
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve_router(listener, app, stop).await {
                warn!("admin endpoint stopped: {e}");
            }
        });
        info!(listen = %admin.listen, "admin endpoint: /metrics /healthz /readyz");
    }
    let _notifier = crate::systemd::spawn_from_env(
        ready_rx,
        move || status_rx.borrow().clone(),
        shutdown.clone(),
    );
    let gauges = gauge_loop(config_rx.clone(), &params, &observe, &stop);
    let capture = async {
        let r = capture_loop(config_rx.clone(), &params, &observe, &stop).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let delivery = async {
        let r = delivery_loop(config_rx.clone(), &params, &observe, &stop).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let retention = retention_loop(&config, &params, &stop);
    let (captured, delivered, (), ()) = tokio::join!(capture, delivery, retention, gauges);
    captured?;
    delivered?;
    info!("walhook stopped");
    Ok(())
}

/// How often queue depth, slot lag and readiness are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the queue and lag gauges, the queue's readiness and the systemd status line.
async fn gauge_loop(
    config_rx: watch::Receiver<Arc<Config>>,
    params: &ConnectParams,
    observe: &Observe,
    shutdown: &CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut wal_warned = false;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_ordinary(params).await.ok();
        }
        let slot = config_rx.borrow().source.slot.clone();
        let refreshed = match client.as_ref() {
            Some(c) => crate::metrics::refresh_gauges(c, &observe.metrics, &slot)
                .await
                .map_err(|e| e.to_string()),
            None => Err("cannot connect to the queue database".to_owned()),
        };
        match refreshed {
            Ok(()) => {
                observe.health.set_queue_reachable(true);
                observe.monitors.database_reachable();
                observe.monitors.gauges(
                    Some(observe.metrics.lag_bytes()),
                    observe.metrics.queue_ages(),
                );
                // Retained WAL: one warning per episode, not one per refresh.
                let lag = observe.metrics.lag_bytes();
                let limit = config_rx.borrow().source.wal_warning_bytes;
                if lag > limit && !wal_warned {
                    warn!(
                        lag_bytes = lag,
                        "slot {} retains {} MB of WAL (more than source.wal_warning); the server keeps it until walhook confirms it — see `walhook status`, and cap it with max_slot_wal_keep_size",
                        slot,
                        lag >> 20
                    );
                    wal_warned = true;
                } else if lag <= limit / 2 && wal_warned {
                    info!(
                        lag_bytes = lag,
                        "retained WAL is back under source.wal_warning"
                    );
                    wal_warned = false;
                }
                if observe.health.streaming() {
                    observe.status.send_replace(format!(
                        "streaming slot {}; {}",
                        slot,
                        observe.metrics.summary()
                    ));
                }
            }
            Err(e) => {
                observe.health.set_queue_reachable(false);
                observe.monitors.database_unreachable(&e);
                observe.health.set_last_error(Some(e));
                client = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Deletes Processed notifications and events older than `queue.retention`, in small
/// batches, every [`crate::queue::PRUNE_INTERVAL`].
async fn retention_loop(config: &Config, params: &ConnectParams, shutdown: &CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::queue::PRUNE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let outcome = async {
            let client = connect_ordinary(params).await?;
            crate::queue::prune(&client, config.queue.retention, crate::queue::PRUNE_BATCH)
                .await
                .map_err(ServiceError::from_err)
        }
        .await;
        match outcome {
            Ok(o) => {
                if failing {
                    info!("retention works again");
                }
                failing = false;
                if o.processed + o.events > 0 {
                    debug!(
                        processed = o.processed,
                        events = o.events,
                        "pruned old rows"
                    );
                }
            }
            Err(e) => {
                if !failing {
                    warn!(
                        "retention failed: {}; old rows stay until it works",
                        e.message
                    );
                }
                failing = true;
            }
        }
    }
}

/// How often a refused copy looks whether it was adopted.
const CLONED_RETRY: Duration = Duration::from_secs(5);

/// How long a standby waits between attempts to take over the slot.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Streams changes into the queue, reconnecting on transient errors, until `shutdown`.
async fn capture_loop(
    mut config_rx: watch::Receiver<Arc<Config>>,
    params: &ConnectParams,
    observe: &Observe,
    shutdown: &CancellationToken,
) -> Result<(), ServiceError> {
    let mut backoff = BACKOFF_INITIAL;
    let mut attempt: u32 = 0;
    // The hold currently logged, so each hold is logged once, not per attempt.
    let mut holding: Option<Hold> = None;
    loop {
        let started = Instant::now();
        let config = config_rx.borrow_and_update().clone();
        let result = tokio::select! {
            r = session(&config, params, observe, shutdown, attempt == 0, &mut config_rx) => r,
            _ = shutdown.cancelled() => Ok(SessionEnd::Stopped),
        };
        if matches!(result, Ok(SessionEnd::Reload)) {
            // A reloaded entity/source/queue configuration: reconnect at once.
            backoff = BACKOFF_INITIAL;
            continue;
        }
        let result = result.map(|_| ());
        if let Err(e) = &result {
            observe.streaming(false, Some(&e.message));
        } else {
            observe.streaming(false, None);
        }
        if !shutdown.is_cancelled() {
            observe.metrics.reconnect();
        }
        let mut wait = backoff;
        match result {
            Ok(()) if shutdown.is_cancelled() => return Ok(()),
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
                wait = hold.retry_after();
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
            _ = shutdown.cancelled() => return Ok(()),
        }
        if wait == backoff {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Blocks delivery while this database is an unadopted copy (or until shutdown).
async fn wait_until_not_cloned(
    params: &ConnectParams,
    shutdown: &CancellationToken,
) -> Result<(), ServiceError> {
    let mut logged = false;
    loop {
        let outcome = async {
            let current = crate::guard::current_identity(params)
                .await
                .map_err(ServiceError::from_err)?;
            let client = connect_ordinary(params).await?;
            crate::guard::verdict(&client, &current)
                .await
                .map_err(ServiceError::from_err)
        }
        .await;
        match outcome {
            Ok(v) => match v.explain() {
                None => {
                    if logged {
                        info!("this database was adopted; delivering");
                    }
                    return Ok(());
                }
                Some(why) => {
                    if !logged {
                        warn!("delivery refused: {why}");
                    }
                    logged = true;
                }
            },
            Err(e) if e.class != ErrorClass::Transient => return Err(e),
            Err(e) => debug!("cloned-database check: {}", e.message),
        }
        tokio::select! {
            _ = tokio::time::sleep(CLONED_RETRY) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Delivers queued notifications to the configured listeners until `shutdown`; a reload
/// that changes the listeners restarts delivery gracefully (in-flight deliveries finish).
async fn delivery_loop(
    mut config_rx: watch::Receiver<Arc<Config>>,
    params: &ConnectParams,
    observe: &Observe,
    shutdown: &CancellationToken,
) -> Result<(), ServiceError> {
    let observer: Arc<dyn DeliveryObserver> = Arc::new(observe.clone());
    let mut prepared = false;
    loop {
        let config = config_rx.borrow_and_update().clone();
        if config.listeners.is_empty() {
            tokio::select! {
                changed = config_rx.changed() => if changed.is_err() { shutdown.cancelled().await; return Ok(()) },
                _ = shutdown.cancelled() => return Ok(()),
            }
            continue;
        }
        if !prepared {
            wait_until_not_cloned(params, shutdown).await?;
            migrate_for_delivery(params, shutdown).await?;
            prepared = true;
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let this_round = shutdown.child_token();
        let dispatcher = crate::delivery::dispatcher::run_observed(
            params.to_tokio_postgres(),
            config.listeners.clone(),
            source_system(&config, params),
            this_round.clone(),
            Some(observer.clone()),
        );
        tokio::pin!(dispatcher);
        loop {
            tokio::select! {
                r = &mut dispatcher => return r.map_err(ServiceError::from_err),
                changed = config_rx.changed() => {
                    if changed.is_err() {
                        return (&mut dispatcher).await.map_err(ServiceError::from_err);
                    }
                    let new = config_rx.borrow().clone();
                    if new.listeners != config.listeners || new.source.system_name != config.source.system_name {
                        info!("listeners changed; restarting delivery with the new configuration");
                        this_round.cancel();
                        (&mut dispatcher).await.map_err(ServiceError::from_err)?;
                        break;
                    }
                }
            }
        }
    }
}

/// The dispatcher needs the queue schema, which the capture session may not have migrated
/// yet; migrations are idempotent and serialized by an advisory lock.
async fn migrate_for_delivery(
    params: &ConnectParams,
    shutdown: &CancellationToken,
) -> Result<(), ServiceError> {
    loop {
        let migrated = async {
            let mut client = connect_ordinary(params).await?;
            crate::queue::migrate(&mut client)
                .await
                .map_err(ServiceError::from_err)
        }
        .await;
        match migrated {
            Ok(()) => return Ok(()),
            Err(e) if e.class != ErrorClass::Transient => return Err(e),
            Err(e) => debug!("delivery waits for the database: {}", e.message),
        }
        tokio::select! {
            _ = tokio::time::sleep(BACKOFF_INITIAL) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// How a session ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionEnd {
    /// Shutdown was requested.
    Stopped,
    /// A reload changed what the session was built from.
    Reload,
}

/// One connected session: setup, stream until error or shutdown.
async fn session(
    config: &Config,
    params: &ConnectParams,
    observe: &Observe,
    shutdown: &CancellationToken,
    first: bool,
    config_rx: &mut watch::Receiver<Arc<Config>>,
) -> Result<SessionEnd, ServiceError> {
    let mut client = connect_ordinary(params).await?;
    // Prerequisites first: a missing table or wal_level = replica is one clear line and
    // exit 78, not a retry loop.
    let report = crate::setup::check(&client, config).await;
    let failures: Vec<String> = report
        .with_verdict(crate::setup::Verdict::Fail)
        .map(|i| match &i.fix {
            Some(fix) => format!("{}: {}; fix: {fix}", i.name, i.detail),
            None => format!("{}: {}", i.name, i.detail),
        })
        .collect();
    if !failures.is_empty() {
        return Err(ServiceError::new(ErrorClass::Config, failures.join("\n")));
    }

    let mut repl = ReplicationConnection::connect(params)
        .await
        .map_err(ServiceError::from_err)?;
    let system = repl
        .identify_system()
        .await
        .map_err(ServiceError::from_err)?;
    let dbname = system.dbname.clone().unwrap_or_default();
    let current = Identity {
        system_id: system.system_id.clone(),
        database: dbname.clone(),
    };
    let verdict = crate::guard::verdict(&client, &current)
        .await
        .map_err(ServiceError::from_err)?;
    if let Some(why) = verdict.explain() {
        return Err(ServiceError {
            hold: Some(Hold::Cloned),
            ..ServiceError::new(ErrorClass::Transient, why)
        });
    }
    // Queue migrations, the publication and the slot, when missing.
    let applied = crate::setup::setup(&mut client, config, Default::default())
        .await
        .map_err(ServiceError::from_err)?;
    for step in &applied {
        info!("setup: {}", step.why);
    }
    // Warnings once per process, not once per reconnect, and only those setup did not fix.
    if first {
        let report = if applied.is_empty() {
            report
        } else {
            crate::setup::check(&client, config).await
        };
        for w in report.with_verdict(crate::setup::Verdict::Warn) {
            warn!("{}: {}", w.name, w.detail);
        }
    }
    let mut mapper = Mapper::new(&config.entities);
    for entity in config.entities.iter().filter(|e| e.id.is_none()) {
        let pk = primary_key(&client, &entity.table).await?;
        mapper.set_primary_key(entity.table.clone(), pk);
    }

    crate::queue::record_source(&client, &system.system_id, &dbname, &config.source.slot)
        .await
        .map_err(ServiceError::from_err)?;
    if repl
        .create_slot_if_missing(&config.source.slot)
        .await
        .map_err(ServiceError::from_err)?
    {
        info!(slot = %config.source.slot, "created replication slot");
    }
    let stream = repl
        .start_replication(&config.source.slot, Lsn::ZERO, &config.source.publication)
        .await
        .map_err(|e| ServiceError {
            hold: (e.sqlstate() == Some(SQLSTATE_OBJECT_IN_USE)).then_some(Hold::Standby),
            ..ServiceError::from_err(e)
        })?;
    info!(
        slot = %config.source.slot,
        publication = %config.source.publication,
        database = %dbname,
        "streaming changes"
    );
    observe.streaming(true, None);
    observe.health.set_last_error(None);
    observe
        .status
        .send_replace(format!("streaming slot {} of {dbname}", config.source.slot));

    crate::queue::sync_listeners(&client, &config.listeners)
        .await
        .map_err(ServiceError::from_err)?;
    let mut writer = QueueWriter::new(client, &system.system_id)
        .await
        .map_err(ServiceError::from_err)?;
    writer.set_subscriptions(crate::queue::subscriptions(&config.listeners));
    let (subs_tx, subs_rx) = watch::channel(crate::queue::subscriptions(&config.listeners));
    let (tx, rx) = mpsc::channel::<Item>(config.queue.batch_size.max(1) * 2);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);

    let stop = shutdown.child_token();
    let writer_task = tokio::spawn(write_loop(
        writer,
        rx,
        durable_tx,
        subs_rx,
        observe.metrics.clone(),
        config.queue.batch_size,
        config.queue.batch_delay,
    ));
    let heartbeat_task = config.source.heartbeat.map(|every| {
        let params = params.clone();
        let stop = stop.clone();
        tokio::spawn(async move { heartbeat_loop(params, every, stop).await })
    });

    let mut reader = Reader {
        stream,
        mapper,
        metrics: observe.metrics.clone(),
        events: tx,
        durable: durable_rx,
        status_interval: config.source.status_interval,
        tx: None,
        last_commit_sent: Lsn::ZERO,
        idle_position: Lsn::ZERO,
        reported_flush: Lsn::ZERO,
        last_status: Instant::now(),
        warned_truncate: Default::default(),
        config: Arc::new(config.clone()),
        subscriptions: subs_tx,
        params: params.clone(),
    };
    let read_result = reader.run(&stop, config_rx).await;
    stop.cancel();
    let reported_flush = reader.reported_flush;
    let Reader {
        mut stream,
        events,
        mut durable,
        ..
    } = reader;
    // Closing the channel lets the writer commit what it already has, so a clean shutdown
    // confirms as much as possible.
    drop(events);
    let write_result = match writer_task.await {
        Ok(r) => r,
        Err(e) => Err(ServiceError::transient(format!(
            "queue writer task failed: {e}"
        ))),
    };
    if let Some(h) = heartbeat_task {
        let _ = h.await;
    }
    if read_result.is_ok() && write_result.is_ok() {
        let flush = *durable.borrow_and_update();
        let flush = flush.max(reported_flush);
        if stream.send_status(flush, flush, flush, false).await.is_ok() {
            info!(flush = %flush, "reported final flush position");
        }
        stream.close().await;
    }
    // The writer's own error explains a reader that stopped because the writer did.
    write_result?;
    read_result
}

/// What the reader hands to the writer.
#[derive(Debug)]
enum Item {
    Event(Box<EntityEvent>),
    /// A source transaction ended; once everything before it is durable, `end_lsn` is safe.
    Commit {
        end_lsn: Lsn,
    },
}

struct OpenTx {
    ctx: TxContext,
    seq: u32,
}

struct Reader {
    stream: ReplicationStream,
    mapper: Mapper,
    metrics: Arc<Metrics>,
    events: mpsc::Sender<Item>,
    durable: watch::Receiver<Lsn>,
    status_interval: Duration,
    tx: Option<OpenTx>,
    /// End LSN of the last commit handed to the writer.
    last_commit_sent: Lsn,
    /// Server position known to hold nothing for us (keepalive `wal_end` while idle).
    idle_position: Lsn,
    reported_flush: Lsn,
    last_status: Instant,
    warned_truncate: std::collections::HashSet<crate::types::Oid>,
    /// The configuration this session was built from.
    config: Arc<Config>,
    /// Fan-out subscriptions for the writer, replaced on reload.
    subscriptions: watch::Sender<Vec<crate::queue::Subscription>>,
    params: ConnectParams,
}

impl Reader {
    async fn run(
        &mut self,
        stop: &CancellationToken,
        config_rx: &mut watch::Receiver<Arc<Config>>,
    ) -> Result<SessionEnd, ServiceError> {
        let mut tick = tokio::time::interval(self.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(SessionEnd::Stopped),
                changed = config_rx.changed() => {
                    if changed.is_ok() {
                        let new = config_rx.borrow_and_update().clone();
                        if self.apply_reload(new) {
                            return Ok(SessionEnd::Reload);
                        }
                    }
                }
                msg = self.stream.recv() => {
                    match msg.map_err(ServiceError::from_err)? {
                        Some(m) => self.handle(m).await?,
                        None => return Err(ServiceError::transient("the server ended the replication stream")),
                    }
                }
                changed = self.durable.changed() => {
                    if changed.is_err() {
                        // The writer stopped: its error is reported by the session.
                        return Ok(SessionEnd::Stopped);
                    }
                    // Confirm promptly but not per batch: at most once a second.
                    if self.last_status.elapsed() >= Duration::from_secs(1) {
                        self.send_status(false).await?;
                    }
                }
                _ = tick.tick() => self.send_status(false).await?,
            }
        }
    }

    /// Applies a reloaded configuration; true when the session must restart to apply it.
    fn apply_reload(&mut self, new: Arc<Config>) -> bool {
        let old = self.config.clone();
        self.config = new.clone();
        if new.source != old.source || new.entities != old.entities || new.queue != old.queue {
            info!(
                "entity, source or queue configuration changed; restarting the replication session"
            );
            return true;
        }
        if new.listeners != old.listeners {
            self.subscriptions
                .send_replace(crate::queue::subscriptions(&new.listeners));
            let params = self.params.clone();
            let count = new.listeners.len();
            tokio::spawn(async move {
                let synced = async {
                    let client = connect_ordinary(&params).await?;
                    crate::queue::sync_listeners(&client, &new.listeners)
                        .await
                        .map_err(ServiceError::from_err)
                }
                .await;
                if let Err(e) = synced {
                    warn!(
                        "could not mirror the reloaded listeners into walhook.listener: {}",
                        e.message
                    );
                }
            });
            info!(
                listeners = count,
                "listeners reloaded; the replication stream continues"
            );
        }
        false
    }

    /// The position that is safe to confirm: never past an event not yet durable.
    fn flush_position(&self) -> Lsn {
        let durable = *self.durable.borrow();
        let idle = self.tx.is_none() && durable >= self.last_commit_sent;
        if idle {
            durable.max(self.idle_position)
        } else {
            durable
        }
    }

    async fn send_status(&mut self, reply: bool) -> Result<(), ServiceError> {
        let flush = self.flush_position().max(self.reported_flush);
        self.stream
            .send_status(flush, flush, flush, reply)
            .await
            .map_err(ServiceError::from_err)?;
        if flush != self.reported_flush {
            debug!(flush = %flush, "confirmed flush position");
        }
        self.reported_flush = flush;
        self.last_status = Instant::now();
        Ok(())
    }

    async fn handle(&mut self, msg: ReplicationMessage) -> Result<(), ServiceError> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                if self.tx.is_none() {
                    self.idle_position = self.idle_position.max(wal_end);
                }
                // Answer at once when asked, and whenever the confirmed position can move:
                // a fast server shutdown waits for the client to confirm its WAL end.
                if reply_requested || self.flush_position() > self.reported_flush {
                    self.send_status(false).await?;
                }
                Ok(())
            }
            ReplicationMessage::XLogData { data, .. } => {
                let message = pgoutput::decode(&data).map_err(ServiceError::from_err)?;
                self.handle_pgoutput(message).await
            }
        }
    }

    async fn handle_pgoutput(&mut self, message: Message) -> Result<(), ServiceError> {
        match message {
            Message::Begin(b) => {
                self.tx = Some(OpenTx {
                    ctx: TxContext {
                        commit_lsn: b.final_lsn,
                        xid: b.xid,
                        commit_time: b.commit_time,
                    },
                    seq: 0,
                });
            }
            Message::Commit(c) => {
                self.tx = None;
                self.last_commit_sent = c.end_lsn;
                self.send(Item::Commit { end_lsn: c.end_lsn }).await?;
            }
            Message::Relation(rel) => {
                self.mapper
                    .on_relation(rel)
                    .map_err(ServiceError::from_err)?;
            }
            ref change @ (Message::Insert { .. }
            | Message::Update { .. }
            | Message::Delete { .. }) => {
                let Some(open) = self.tx.as_mut() else {
                    return Err(ServiceError::new(
                        ErrorClass::Permanent,
                        "protocol error: row change outside a transaction",
                    ));
                };
                let seq = open.seq;
                open.seq += 1;
                self.metrics.events_read(1);
                let ctx = open.ctx;
                if let Some(event) = self
                    .mapper
                    .map_change(&ctx, seq, change)
                    .map_err(ServiceError::from_err)?
                {
                    self.send(Item::Event(Box::new(event))).await?;
                }
            }
            Message::Truncate { relations, .. } => {
                if let Some(open) = self.tx.as_mut() {
                    open.seq += 1;
                }
                for oid in relations {
                    if self.warned_truncate.insert(oid) {
                        warn!(relation = %oid, "TRUNCATE is not turned into events: listeners are not told about the removed rows");
                    }
                }
            }
            Message::LogicalMessage {
                transactional, lsn, ..
            } => {
                // A heartbeat outside any transaction needs no queue write: its position is
                // safe to confirm once everything before it is durable.
                if !transactional && self.tx.is_none() {
                    self.idle_position = self.idle_position.max(lsn);
                }
            }
            Message::Origin { .. } | Message::Type { .. } => {}
        }
        Ok(())
    }

    async fn send(&mut self, item: Item) -> Result<(), ServiceError> {
        self.events
            .send(item)
            .await
            .map_err(|_| ServiceError::transient("the queue writer stopped"))
    }
}

/// Commits events in batches that span source transactions: group commit (see
/// [`crate::queue::FlushPolicy`]).
async fn write_loop(
    mut writer: QueueWriter,
    mut rx: mpsc::Receiver<Item>,
    durable: watch::Sender<Lsn>,
    mut subscriptions: watch::Receiver<Vec<crate::queue::Subscription>>,
    metrics: Arc<Metrics>,
    batch_size: usize,
    batch_delay: Duration,
) -> Result<(), ServiceError> {
    let policy = crate::queue::FlushPolicy {
        max_events: batch_size.max(1),
        max_bytes: crate::queue::MAX_BATCH_BYTES,
        max_delay: batch_delay,
    };
    let mut events: Vec<EntityEvent> = Vec::new();
    loop {
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        let mut gathered = crate::queue::Gathered::default();
        let mut commit: Option<Lsn> = None;
        let mut closed = false;
        absorb(first, &mut events, &mut commit, &mut gathered);
        loop {
            // Take what is already there without waiting; the policy decides on the rest.
            let item = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => None,
            };
            let idle = item.is_none();
            if let Some(item) = item {
                absorb(item, &mut events, &mut commit, &mut gathered);
            }
            let now = tokio::time::Instant::now();
            match policy.decide(gathered, idle, started, now) {
                crate::queue::Flush::Now => break,
                crate::queue::Flush::ReadUntil(_) if !idle => {}
                crate::queue::Flush::ReadUntil(deadline) => tokio::select! {
                    item = rx.recv() => match item {
                        Some(item) => absorb(item, &mut events, &mut commit, &mut gathered),
                        None => { closed = true; break; }
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                },
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
            count_queued(&metrics, &events);
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
fn count_queued(metrics: &Metrics, events: &[EntityEvent]) {
    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for e in events {
        *counts
            .entry((e.entity.as_str(), e.action.as_str()))
            .or_default() += 1;
    }
    let batch: Vec<(&str, &str, u64)> = counts.into_iter().map(|((e, a), n)| (e, a, n)).collect();
    metrics.events_queued(&batch);
}

fn absorb(
    item: Item,
    events: &mut Vec<EntityEvent>,
    commit: &mut Option<Lsn>,
    gathered: &mut crate::queue::Gathered,
) {
    match item {
        Item::Event(e) => {
            gathered.events += 1;
            gathered.bytes += crate::queue::approx_bytes(&e);
            gathered.at_commit = false;
            events.push(*e);
        }
        Item::Commit { end_lsn } => {
            gathered.at_commit = true;
            *commit = Some(end_lsn);
        }
    }
}

/// Writes a non-transactional logical message now and then, so the slot moves on a database
/// whose tracked tables are quiet while the cluster is busy.
async fn heartbeat_loop(params: ConnectParams, every: Duration, stop: CancellationToken) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect_ordinary(&params).await.ok();
        }
        let Some(c) = client.as_ref() else { continue };
        match c.execute(SQL_HEARTBEAT, &[&HEARTBEAT_PREFIX]).await {
            Ok(_) => {
                if failing {
                    info!("heartbeat works again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(
                        "heartbeat failed: {e}; the slot may hold WAL while tracked tables are idle"
                    );
                }
                failing = true;
            }
        }
    }
}

const SQL_PRIMARY_KEY: &str = "SELECT a.attname::text
     FROM pg_index i
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
     WHERE i.indrelid = to_regclass($1) AND i.indisprimary
     ORDER BY array_position(i.indkey::int2[], a.attnum)";

/// The primary key columns of `table`, from the catalog: with REPLICA IDENTITY FULL the
/// stream marks every column as a key, so it cannot tell.
async fn primary_key(
    client: &tokio_postgres::Client,
    table: &crate::types::TableName,
) -> Result<Vec<String>, ServiceError> {
    let rows = client
        .query(SQL_PRIMARY_KEY, &[&table.quoted()])
        .await
        .map_err(|e| ServiceError::transient(format!("reading the primary key of {table}: {e}")))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Opens an ordinary (non-replication) connection and drives it in the background.
pub(crate) async fn connect_ordinary(
    params: &ConnectParams,
) -> Result<tokio_postgres::Client, ServiceError> {
    let cfg = params.to_tokio_postgres();
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(10), cfg.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| {
                ServiceError::transient(format!(
                    "no answer from PostgreSQL at {} within 10s",
                    params.redacted()
                ))
            })?
            .map_err(|e| classify_pg_error(&e, params))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

fn classify_pg_error(e: &tokio_postgres::Error, params: &ConnectParams) -> ServiceError {
    let where_ = params.redacted();
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let class = crate::error::sqlstate_class(code);
            let fix = match code {
                "28P01" => {
                    "; check the password in [source] (url, password or password_file), PGPASSWORD or ~/.pgpass"
                }
                "28000" => "; allow this user, database and address in the server's pg_hba.conf",
                "3D000" => "; fix the database name in [source] url",
                "42501" => "; grant the role the privilege named above",
                _ => "",
            };
            ServiceError::new(class, format!("{} ({where_}){fix}", db.message()))
        }
        None => ServiceError::transient(format!("cannot connect to PostgreSQL at {where_}: {e}")),
    }
}

//! The daemon's wiring: capture, delivery, gauges, retention, monitors and the admin
//! endpoint run as tasks side by side until shutdown; a reload reaches each of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::{AdminState, Health};
use crate::capture::CaptureObserver;
use crate::capture::mapper::{RejectedChange, SchemaNote};
use crate::config::Config;
use crate::db::Source;
use crate::delivery::{AttemptReport, DeliveryObserver, Observed};
use crate::error::ErrorClass;
use crate::metrics::Metrics;
use crate::monitor::CaptureSignal;
use crate::replication::conn::ConnectParams;

pub use crate::capture::HEARTBEAT_PREFIX;
pub(crate) use crate::db::connect_ordinary;
pub use crate::error::{Hold, ServiceError};

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
            self.health.set_capture_error(Some(why.to_owned()));
            self.status.send_replace(format!("not streaming: {why}"));
        }
    }
}

impl DeliveryObserver for Observe {
    fn alive(&self) {
        self.health.delivery_beat().stamp();
    }

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

impl CaptureObserver for Observe {
    fn streaming(&self, on: bool, why: Option<&str>) {
        Observe::streaming(self, on, why);
    }

    fn status(&self, line: String) {
        self.status.send_replace(line);
    }

    fn reconnecting(&self) {
        self.metrics.reconnect();
    }

    fn changes_read(&self, n: u64) {
        self.metrics.events_read(n);
    }

    fn events_queued(&self, batch: &[(&str, &str, u64)]) {
        self.metrics.events_queued(batch);
    }

    fn changes_set_aside(&self, changes: &[RejectedChange]) {
        // One line and one signal per entity of the batch, not per change.
        let mut per_entity: std::collections::BTreeMap<&str, (u64, &RejectedChange)> =
            Default::default();
        for c in changes {
            per_entity.entry(c.entity.as_str()).or_insert((0, c)).0 += 1;
        }
        for (entity, (n, first)) in per_entity {
            warn!(
                entity,
                count = n,
                "{n} change(s) of entity {entity} set aside in walhook.rejected instead of queued; capture goes on. First: {} {} of table {} (commit {}, change {}): {}",
                first.action,
                first.entity_id.as_deref().unwrap_or("(id unknown)"),
                first.table,
                first.commit_lsn,
                first.seq,
                first.reason
            );
            self.metrics.changes_rejected(entity, n);
            self.monitors.capture(CaptureSignal::Rejected {
                entity: entity.to_owned(),
                count: n,
                reason: first.reason.clone(),
            });
        }
    }

    fn schema_changed(&self, note: &SchemaNote) {
        self.monitors.capture(CaptureSignal::SchemaChanged {
            table: note.table.to_string(),
            message: note.message.clone(),
        });
    }

    fn capture_gap(&self, gap: &crate::queue::CaptureGap) {
        self.monitors.capture(CaptureSignal::Gap {
            slot: gap.slot_name.clone(),
            reason: gap.reason.clone(),
            last_flushed: gap.last_flushed_lsn.to_string(),
            resumed: gap.resumed_lsn.to_string(),
        });
    }

    fn stream_beat(&self) -> Option<crate::liveness::Beat> {
        Some(self.health.capture_beat())
    }
}

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
        config.source.source_system_of(&params),
        config.path.clone(),
        shutdown.child_token(),
    );
    let metrics = Arc::new(Metrics::new());
    metrics.register(&config);
    // Every new connection uses the [source] parameters of the latest reload.
    let (params_tx, params_rx) = watch::channel(Arc::new(params.clone()));
    let source = Source::following(params_rx);
    {
        // Monitors, metric series and connection parameters follow reloads too.
        let mut rx = config_rx.clone();
        let monitors = monitors.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut current = rx.borrow().source.clone();
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() { return; }
                        let new = rx.borrow_and_update().clone();
                        monitors.reload(new.monitors.clone());
                        metrics.register(&new);
                        if new.source != current {
                            follow_source(&new, &params_tx);
                            current = new.source.clone();
                        }
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
    let observe = Observe {
        monitors,
        metrics,
        health: Arc::new(Health::new()),
        ready: ready_tx,
        status: status_tx,
    };
    let stop = shutdown.child_token();
    // An address that cannot be bound (yet) is not a reason to stop capturing: the admin
    // task keeps trying and says so once.
    if let Some(admin) = &config.admin {
        let history = Arc::new(crate::console::History::new());
        crate::console::spawn_sampler(history.clone(), observe.metrics.clone(), stop.clone());
        let app = crate::admin::router(AdminState {
            metrics: observe.metrics.clone(),
            health: observe.health.clone(),
        })
        .merge(crate::console::router(crate::console::ConsoleDeps {
            config: config_rx.clone(),
            metrics: observe.metrics.clone(),
            health: observe.health.clone(),
            history,
        }))
        // Event Grid's validationUrl: listeners GET it to prove they want the events.
        .merge(crate::delivery::validation::router(source.clone()));
        tokio::spawn(crate::admin::serve_retrying(
            admin.listen,
            app,
            crate::admin::BIND_RETRY,
            stop.clone(),
        ));
        if admin.token.is_some() {
            info!(listen = %admin.listen, "admin endpoint: /metrics /healthz /readyz /eventgrid/validate, web console on /ui");
        } else {
            info!(listen = %admin.listen, "admin endpoint: /metrics /healthz /readyz /eventgrid/validate (web console off: no token_file)");
        }
    }
    let health = observe.health.clone();
    let _notifier = crate::systemd::spawn_from_env(
        ready_rx,
        move || status_rx.borrow().clone(),
        move || health.stalled(),
        shutdown.clone(),
    );
    let gauges = gauge_loop(config_rx.clone(), &source, &observe, &stop);
    let capture = async {
        let r = crate::capture::run(
            config_rx.clone(),
            source.clone(),
            Arc::new(observe.clone()),
            &stop,
        )
        .await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let delivery = async {
        let r = delivery_loop(config_rx.clone(), &source, &observe, &stop).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let retention = retention_loop(&config, &source, &stop);
    let schedules = crate::schedule::run(config_rx.clone(), source.clone(), stop.clone());
    let (captured, delivered, (), (), ()) =
        tokio::join!(capture, delivery, retention, gauges, schedules);
    let confirmed = captured?;
    delivered?;
    match confirmed {
        Some(lsn) => info!("stopped; confirmed up to {lsn}"),
        None => info!("stopped; capture was not streaming, nothing new confirmed"),
    }
    Ok(())
}

/// Makes new connections use the reloaded `[source]` parameters. Open connections stay:
/// a rotated password is usually not valid yet when the reload happens.
fn follow_source(config: &Config, params: &watch::Sender<Arc<ConnectParams>>) {
    match config.source.connect_params() {
        Ok(p) => {
            params.send_replace(Arc::new(p));
            info!("[source] connection parameters reloaded; new connections use them");
        }
        Err(e) => warn!(
            "[source] of the reloaded configuration is unusable ({e}); connections keep the previous parameters"
        ),
    }
}

/// How often queue depth, slot lag and readiness are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the queue and lag gauges, the queue's readiness and the systemd status line.
async fn gauge_loop(
    config_rx: watch::Receiver<Arc<Config>>,
    source: &Source,
    observe: &Observe,
    shutdown: &CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut wal_warned = false;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = source.connect().await.ok();
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
                observe.metrics.set_database_up(true);
                observe.monitors.database_reachable();
                if let Some(counts) = observe.metrics.fresh_failed_counts() {
                    observe.monitors.failed_rows(counts);
                }
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
                observe.metrics.set_database_up(false);
                observe.monitors.database_unreachable(&e);
                observe.health.set_queue_error(Some(e));
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
/// batches, and gives back the index space a drained backlog left in `walhook.new`, every
/// [`crate::queue::PRUNE_INTERVAL`].
async fn retention_loop(config: &Config, source: &Source, shutdown: &CancellationToken) {
    let mut failing = false;
    let mut told_owner = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::queue::PRUNE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let outcome = async {
            let client = source.connect().await?;
            let pruned =
                crate::queue::prune(&client, config.queue.retention, crate::queue::PRUNE_BATCH)
                    .await
                    .map_err(ServiceError::from_err)?;
            let compacted =
                crate::queue::compact_new(&client, crate::queue::COMPACT_MIN_INDEX_BYTES)
                    .await
                    .map_err(ServiceError::from_err)?;
            Ok::<_, ServiceError>((pruned, compacted))
        }
        .await;
        if let Ok((_, compacted)) = &outcome {
            report_compaction(compacted, &mut told_owner);
        }
        match outcome.map(|(pruned, _)| pruned) {
            Ok(o) => {
                if failing {
                    info!("retention works again");
                }
                failing = false;
                if o.processed + o.discarded + o.events > 0 {
                    debug!(
                        processed = o.processed,
                        discarded = o.discarded,
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

/// Logs what [`crate::queue::compact_new`] did; the owner's fix once per process.
fn report_compaction(compacted: &crate::queue::Compaction, told_owner: &mut bool) {
    use crate::queue::Compaction;
    match compacted {
        Compaction::NotNeeded | Compaction::Busy => {}
        Compaction::Rebuilt { before, after } => info!(
            before_bytes = before,
            after_bytes = after,
            "rebuilt the indexes of walhook.new, which a drained backlog had left large"
        ),
        Compaction::NeedsOwner { bytes, fix } => {
            if !*told_owner {
                warn!(
                    index_bytes = bytes,
                    "the indexes of walhook.new are much larger than its rows need (a drained backlog); walhook's role does not own the table, so run {fix}"
                );
            }
            *told_owner = true;
        }
    }
}

/// Blocks delivery while this database is an unadopted copy (or until shutdown).
async fn wait_until_not_cloned(
    source: &Source,
    shutdown: &CancellationToken,
) -> Result<(), ServiceError> {
    let mut logged = false;
    loop {
        let outcome = async {
            let current = crate::guard::current_identity(&source.current())
                .await
                .map_err(ServiceError::from_err)?;
            let client = source.connect().await?;
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
            _ = tokio::time::sleep(crate::capture::CLONED_RETRY) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Delivers queued notifications to the configured listeners until `shutdown`; a reload
/// that changes the listeners or the database restarts delivery gracefully (in-flight
/// deliveries finish). `source` follows reloaded `[source]` parameters: a new password is used
/// on the next connection.
async fn delivery_loop(
    mut config_rx: watch::Receiver<Arc<Config>>,
    source: &Source,
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
            wait_until_not_cloned(source, shutdown).await?;
            migrate_for_delivery(source, shutdown).await?;
            prepared = true;
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let this_round = shutdown.child_token();
        let _armed = observe.health.delivery_beat().armed(DELIVERY_STALL);
        // Debounce windows become notifications; also drains windows left by listeners
        // that no longer debounce. Ends with the round.
        let _round = this_round.clone().drop_guard();
        tokio::spawn(crate::queue::debounce::run(
            source.clone(),
            config.listeners.iter().any(|l| l.debounce.is_some()),
            this_round.clone(),
        ));
        let dispatcher = crate::delivery::dispatcher::run_following(
            source.clone(),
            config.listeners.clone(),
            config.source.source_system_of(&source.current()),
            this_round.clone(),
            crate::delivery::dispatcher::Options {
                observer: Some(observer.clone()),
                ..Default::default()
            },
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
                    let moved = new.source.url_redacted != config.source.url_redacted;
                    if new.listeners != config.listeners || new.source.system_name != config.source.system_name || moved {
                        info!("listeners or database changed; restarting delivery with the new configuration");
                        this_round.cancel();
                        (&mut dispatcher).await.map_err(ServiceError::from_err)?;
                        break;
                    }
                }
            }
        }
    }
}

/// A claim loop goes round at least every poll interval, or within the statement timeout
/// of its claim: silence much longer than that is a stuck dispatcher.
const DELIVERY_STALL: Duration = Duration::from_secs(120);

/// The dispatcher needs the queue schema, which the capture session may not have migrated
/// yet; migrations are idempotent and serialized by an advisory lock.
async fn migrate_for_delivery(
    source: &Source,
    shutdown: &CancellationToken,
) -> Result<(), ServiceError> {
    loop {
        let migrated = async {
            let mut client = source.connect().await?;
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
            _ = tokio::time::sleep(crate::capture::BACKOFF_INITIAL) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

//! The daemon's wiring: capture, delivery, gauges, retention, monitors and the admin
//! endpoint run as tasks side by side until shutdown; a reload reaches each of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::{AdminState, Health};
use crate::capture::CaptureObserver;
use crate::config::Config;
use crate::delivery::{AttemptReport, DeliveryObserver, Observed};
use crate::error::ErrorClass;
use crate::metrics::Metrics;
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

impl CaptureObserver for Observe {
    fn streaming(&self, on: bool, why: Option<&str>) {
        Observe::streaming(self, on, why);
        if on {
            self.health.set_last_error(None);
        }
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
}

/// The `sourceSystem` of payloads and alerts: `[source] system_name`, else the database name.
fn source_system(config: &Config, params: &ConnectParams) -> String {
    config
        .source
        .system_name
        .clone()
        .unwrap_or_else(|| params.dbname().to_owned())
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
        }));
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve_router(listener, app, stop).await {
                warn!("admin endpoint stopped: {e}");
            }
        });
        if admin.token.is_some() {
            info!(listen = %admin.listen, "admin endpoint: /metrics /healthz /readyz, web console on /ui");
        } else {
            info!(listen = %admin.listen, "admin endpoint: /metrics /healthz /readyz (web console off: no token_file)");
        }
    }
    let _notifier = crate::systemd::spawn_from_env(
        ready_rx,
        move || status_rx.borrow().clone(),
        shutdown.clone(),
    );
    let gauges = gauge_loop(config_rx.clone(), &params, &observe, &stop);
    let capture = async {
        let r =
            crate::capture::run(config_rx.clone(), &params, Arc::new(observe.clone()), &stop).await;
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
            _ = tokio::time::sleep(crate::capture::CLONED_RETRY) => {}
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
            _ = tokio::time::sleep(crate::capture::BACKOFF_INITIAL) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

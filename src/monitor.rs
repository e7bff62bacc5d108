//! Monitors: tell operators, by webhook (CloudEvents) or email, when walhook is unhealthy.
//!
//! The service feeds cheap, non-blocking signals into a [`MonitorHandle`]; one background
//! task owns all state, turns signals into rate-limited alerts per `[[monitor]]`, and hands
//! them to one sender task per monitor so a slow alert receiver never delays the pipeline.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lettre::AsyncTransport as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{AlertKind, MonitorConfig, MonitorEmail, MonitorWebhook, SmtpServer, SmtpTls};
use crate::delivery::Verdict;
use crate::delivery::signature::webhook_headers;
use crate::delivery::sink::http::status_outcome;
use crate::tls::CaFile;

/// How often time-based conditions (thresholds, gathered failures) are evaluated.
const TICK: Duration = Duration::from_millis(250);
/// Signals buffered between the service and the monitor task; beyond this they are dropped.
const SIGNAL_CAPACITY: usize = 8192;
/// Alerts buffered per monitor while its receiver is slow.
const ALERT_CAPACITY: usize = 256;
/// Time limit for one webhook POST or one SMTP exchange.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Pauses before the quick retries of one alert.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];
/// Failed notifications arriving within this window (capped by `min_interval`) are reported
/// together, so a burst gives one alert with a count.
const GATHER: Duration = Duration::from_secs(5);

/// What an alert reports; each has its own CloudEvents type `walhook.alert.<Name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertEvent {
    /// Notifications were moved to `walhook.failed`.
    NotificationFailed,
    /// After a `NotificationFailed` alert, a delivery to that listener succeeded again.
    NotificationFailedRecovered,
    /// A listener failed continuously for longer than the threshold.
    ListenerFailing,
    /// A failing listener accepted a delivery again.
    ListenerRecovered,
    /// Replication lag stayed above the threshold.
    ReplicationLag,
    /// Replication lag fell below the threshold again.
    ReplicationLagRecovered,
    /// A listener's oldest undelivered notification passed the age threshold.
    QueueAge,
    /// That listener's queue is young again.
    QueueAgeRecovered,
    /// The database could not be reached for longer than the threshold.
    DatabaseUnreachable,
    /// The database is reachable again.
    DatabaseReachable,
    /// Changes were lost because the replication slot vanished; capture resumed.
    CaptureGap,
    /// Changes were set aside in `walhook.rejected` instead of queued.
    ChangeRejected,
    /// A column an entity names was dropped or renamed, or its id can no longer be read.
    SchemaChanged,
}

impl AlertEvent {
    /// The name used in the CloudEvents type and in logs.
    pub fn name(self) -> &'static str {
        match self {
            AlertEvent::NotificationFailed => "NotificationFailed",
            AlertEvent::NotificationFailedRecovered => "NotificationFailedRecovered",
            AlertEvent::ListenerFailing => "ListenerFailing",
            AlertEvent::ListenerRecovered => "ListenerRecovered",
            AlertEvent::ReplicationLag => "ReplicationLag",
            AlertEvent::ReplicationLagRecovered => "ReplicationLagRecovered",
            AlertEvent::QueueAge => "QueueAge",
            AlertEvent::QueueAgeRecovered => "QueueAgeRecovered",
            AlertEvent::DatabaseUnreachable => "DatabaseUnreachable",
            AlertEvent::DatabaseReachable => "DatabaseReachable",
            AlertEvent::CaptureGap => "CaptureGap",
            AlertEvent::ChangeRejected => "ChangeRejected",
            AlertEvent::SchemaChanged => "SchemaChanged",
        }
    }

    /// The CloudEvents `type`, e.g. `walhook.alert.ListenerFailing`.
    pub fn cloudevents_type(self) -> String {
        format!("walhook.alert.{}", self.name())
    }

    /// The `on = [...]` kind that subscribes to this event (recoveries go with their problem).
    pub fn kind(self) -> AlertKind {
        match self {
            AlertEvent::NotificationFailed | AlertEvent::NotificationFailedRecovered => {
                AlertKind::NotificationFailed
            }
            AlertEvent::ListenerFailing | AlertEvent::ListenerRecovered => {
                AlertKind::ListenerFailing
            }
            AlertEvent::ReplicationLag | AlertEvent::ReplicationLagRecovered => {
                AlertKind::ReplicationLag
            }
            AlertEvent::QueueAge | AlertEvent::QueueAgeRecovered => AlertKind::QueueAge,
            AlertEvent::DatabaseUnreachable | AlertEvent::DatabaseReachable => {
                AlertKind::DatabaseUnreachable
            }
            AlertEvent::CaptureGap => AlertKind::CaptureGap,
            AlertEvent::ChangeRejected => AlertKind::ChangeRejected,
            AlertEvent::SchemaChanged => AlertKind::SchemaChanged,
        }
    }
}

/// One alert, as sent to every target of one monitor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// What happened.
    pub event: AlertEvent,
    /// One line: the email subject.
    pub summary: String,
    /// What is wrong, what walhook does about it, and what to look at.
    pub detail: String,
    /// The listener concerned, if any.
    pub listener: Option<String>,
    /// The listener's or database's last error, in plain words.
    pub last_error: Option<String>,
    /// The command that shows more, e.g. `walhook failed --listener crm --config …`.
    pub command: String,
    /// How many notifications the alert is about: those a `NotificationFailed` alert
    /// covers; in a recovery, those of the listener still in `walhook.failed`.
    pub count: Option<u64>,
}

/// A signal from the service.
#[derive(Clone, Debug)]
enum Signal {
    NotificationFailed {
        listener: String,
        notification_id: i64,
        entity: String,
        entity_id: String,
        comment: String,
    },
    DeliverySucceeded {
        listener: String,
    },
    DeliveryFailedAttempt {
        listener: String,
        comment: String,
    },
    Gauges {
        lag_bytes: Option<u64>,
        oldest_undelivered: Vec<(String, Duration)>,
    },
    DatabaseUnreachable {
        error: String,
    },
    DatabaseReachable,
    FailedRows(Vec<(String, u64)>),
    Capture(CaptureSignal),
    Reload(Vec<MonitorConfig>),
}

/// What capture reports to the monitors.
#[derive(Clone, Debug)]
pub enum CaptureSignal {
    /// Capture resumed after a gap accepted with `walhook setup --accept-gap`.
    Gap {
        /// The slot that was lost.
        slot: String,
        /// Why, in plain words.
        reason: String,
        /// The end of the last commit captured before the gap.
        last_flushed: String,
        /// Where capture resumed.
        resumed: String,
    },
    /// `count` changes of `entity` were set aside in `walhook.rejected`.
    Rejected {
        /// The entity.
        entity: String,
        /// How many.
        count: u64,
        /// The reason of the last one.
        reason: String,
    },
    /// A schema change on `table` the operator should know about.
    SchemaChanged {
        /// The entity's table.
        table: String,
        /// What changed and what capture does about it.
        message: String,
    },
}

/// Cheap, cloneable handle the service reports to. Every method is synchronous and never
/// blocks: when the monitor task is behind, signals are dropped (logged once).
#[derive(Clone, Debug)]
pub struct MonitorHandle {
    tx: Option<mpsc::Sender<Signal>>,
    full_logged: Arc<AtomicBool>,
}

impl MonitorHandle {
    /// A handle that ignores every signal (no monitor task).
    pub fn disabled() -> MonitorHandle {
        MonitorHandle {
            tx: None,
            full_logged: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A notification was moved to `walhook.failed` (counts as a failed attempt too).
    pub fn notification_failed(
        &self,
        listener: &str,
        notification_id: i64,
        entity: &str,
        entity_id: &str,
        comment: &str,
    ) {
        self.send(Signal::NotificationFailed {
            listener: listener.to_owned(),
            notification_id,
            entity: entity.to_owned(),
            entity_id: entity_id.to_owned(),
            comment: comment.to_owned(),
        });
    }

    /// A delivery to `listener` succeeded (ends a failure episode).
    pub fn delivery_succeeded(&self, listener: &str) {
        self.send(Signal::DeliverySucceeded {
            listener: listener.to_owned(),
        });
    }

    /// One delivery attempt to `listener` failed with `comment` (it may be retried).
    pub fn delivery_failed_attempt(&self, listener: &str, comment: &str) {
        self.send(Signal::DeliveryFailedAttempt {
            listener: listener.to_owned(),
            comment: comment.to_owned(),
        });
    }

    /// Periodic gauges: replication lag in bytes (`None` when unknown) and, per listener
    /// with undelivered notifications, the age of its oldest one. A listener left out has
    /// nothing waiting.
    pub fn gauges(&self, lag_bytes: Option<u64>, oldest_undelivered: Vec<(String, Duration)>) {
        self.send(Signal::Gauges {
            lag_bytes,
            oldest_undelivered,
        });
    }

    /// The database could not be reached (connection or query failed) with `error`.
    pub fn database_unreachable(&self, error: &str) {
        self.send(Signal::DatabaseUnreachable {
            error: error.to_owned(),
        });
    }

    /// The database answered again.
    pub fn database_reachable(&self) {
        self.send(Signal::DatabaseReachable);
    }

    /// Rows in `walhook.failed` per listener, as just counted (recovery messages say how
    /// many remain).
    pub fn failed_rows(&self, counts: Vec<(String, u64)>) {
        self.send(Signal::FailedRows(counts));
    }

    /// Something capture wants the operator to know (a gap, set-aside changes, a schema change).
    pub fn capture(&self, signal: CaptureSignal) {
        self.send(Signal::Capture(signal));
    }

    /// Replaces the monitors (SIGHUP). Monitors keeping their name keep their state, so an
    /// ongoing episode still gets exactly one alert and one recovery.
    pub fn reload(&self, configs: Vec<MonitorConfig>) {
        self.send(Signal::Reload(configs));
    }

    fn send(&self, signal: Signal) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(signal) {
            Ok(()) => {
                if self.full_logged.load(Ordering::Relaxed) {
                    self.full_logged.store(false, Ordering::Relaxed);
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    warn!(
                        "monitor signals are arriving faster than they are processed; dropping some until it catches up (alerts may be late)"
                    );
                }
            }
            // The task has stopped (shutdown): nothing left to tell.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Starts the monitor task.
pub struct Monitors;

impl Monitors {
    /// Spawns the task that evaluates signals for `configs` and sends their alerts. Must be
    /// called inside a tokio runtime. The task stops when `shutdown` is cancelled.
    pub fn spawn(
        configs: Vec<MonitorConfig>,
        source_system: String,
        config_path: PathBuf,
        shutdown: CancellationToken,
    ) -> MonitorHandle {
        let (tx, rx) = mpsc::channel(SIGNAL_CAPACITY);
        let context = Arc::new(Context {
            source_system,
            config_path: config_path.display().to_string(),
        });
        tokio::spawn(run(rx, configs, context, shutdown));
        MonitorHandle {
            tx: Some(tx),
            full_logged: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What every alert text needs.
#[derive(Debug)]
struct Context {
    source_system: String,
    config_path: String,
}

impl Context {
    fn status_command(&self) -> String {
        format!("walhook status --config {}", self.config_path)
    }

    fn failed_command(&self, listener: &str) -> String {
        format!(
            "walhook failed --listener {listener} --config {}",
            self.config_path
        )
    }

    fn retry_command(&self, listener: &str) -> String {
        format!(
            "walhook retry --listener {listener} --all --config {}",
            self.config_path
        )
    }
}

/// One configured monitor while running: its evaluator and the queue to its sender task.
struct Active {
    evaluator: Evaluator,
    alerts: mpsc::Sender<Alert>,
    full_logged: bool,
}

impl Active {
    fn start(
        config: MonitorConfig,
        state: Option<Evaluator>,
        context: &Arc<Context>,
        shutdown: &CancellationToken,
    ) -> Active {
        let (tx, rx) = mpsc::channel(ALERT_CAPACITY);
        let targets = Targets::new(&config);
        tokio::spawn(send_alerts(
            config.name.clone(),
            targets,
            rx,
            context.clone(),
            shutdown.clone(),
        ));
        let evaluator = match state {
            Some(mut e) => {
                e.config = config;
                e
            }
            None => Evaluator::new(config, context.clone()),
        };
        Active {
            evaluator,
            alerts: tx,
            full_logged: false,
        }
    }

    fn forward(&mut self, alerts: Vec<Alert>) {
        for alert in alerts {
            match self.alerts.try_send(alert) {
                Ok(()) => self.full_logged = false,
                Err(mpsc::error::TrySendError::Full(alert)) => {
                    if !self.full_logged {
                        self.full_logged = true;
                        warn!(
                            monitor = %self.evaluator.config.name,
                            "alerts for monitor {} are not being sent fast enough; dropping {:?} and later ones until it catches up",
                            self.evaluator.config.name,
                            alert.summary
                        );
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Signal>,
    configs: Vec<MonitorConfig>,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let mut active: Vec<Active> = configs
        .into_iter()
        .map(|c| Active::start(c, None, &context, &shutdown))
        .collect();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            signal = rx.recv() => match signal {
                None => break,
                Some(Signal::Reload(configs)) => {
                    let mut old: HashMap<String, Evaluator> = active
                        .drain(..)
                        .map(|a| (a.evaluator.config.name.clone(), a.evaluator))
                        .collect();
                    active = configs
                        .into_iter()
                        .map(|c| {
                            let state = old.remove(&c.name);
                            Active::start(c, state, &context, &shutdown)
                        })
                        .collect();
                    info!(monitors = active.len(), "monitors reloaded");
                }
                Some(signal) => {
                    let now = Instant::now();
                    for a in &mut active {
                        let alerts = a.evaluator.signal(&signal, now);
                        a.forward(alerts);
                    }
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for a in &mut active {
                    let alerts = a.evaluator.tick(now);
                    a.forward(alerts);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation: pure state machine, time passed in, so tests need no sleeping.

/// Failed notifications gathered for one alert.
#[derive(Debug)]
struct FailedBatch {
    count: u64,
    first_at: Instant,
    notification_id: i64,
    entity: String,
    entity_id: String,
    comment: String,
}

#[derive(Debug, Default)]
struct ListenerState {
    /// Start of the current run of failed attempts with no success in between.
    failing_since: Option<Instant>,
    last_error: String,
    failing_alerted: bool,
    failed: Option<FailedBatch>,
    /// A `NotificationFailed` alert went out and no delivery has succeeded since.
    failed_alerted: bool,
    /// Rows in walhook.failed as last counted plus failures since; `None` before a count.
    failed_rows: Option<u64>,
    queue_age: Duration,
    queue_alerted: bool,
}

#[derive(Debug, Default)]
struct Condition {
    since: Option<Instant>,
    alerted: bool,
}

/// Turns signals into alerts for one monitor.
struct Evaluator {
    config: MonitorConfig,
    context: Arc<Context>,
    listeners: BTreeMap<String, ListenerState>,
    lag: Condition,
    lag_bytes: u64,
    database: Condition,
    database_error: String,
    last_sent: HashMap<(AlertEvent, String), Instant>,
    /// Set-aside changes per entity gathered for one alert: (count, first at, last reason).
    rejected: BTreeMap<String, (u64, Instant, String)>,
}

impl Evaluator {
    fn new(config: MonitorConfig, context: Arc<Context>) -> Evaluator {
        Evaluator {
            config,
            context,
            listeners: BTreeMap::new(),
            lag: Condition::default(),
            lag_bytes: 0,
            database: Condition::default(),
            database_error: String::new(),
            last_sent: HashMap::new(),
            rejected: BTreeMap::new(),
        }
    }

    /// Alerts due at once because of `signal` (recoveries); problems wait for [`Self::tick`].
    fn signal(&mut self, signal: &Signal, now: Instant) -> Vec<Alert> {
        let mut out = Vec::new();
        match signal {
            Signal::DeliveryFailedAttempt { listener, comment } => {
                let st = self.listener(listener);
                st.failing_since.get_or_insert(now);
                st.last_error.clone_from(comment);
            }
            Signal::NotificationFailed {
                listener,
                notification_id,
                entity,
                entity_id,
                comment,
            } => {
                let st = self.listener(listener);
                st.failing_since.get_or_insert(now);
                st.last_error.clone_from(comment);
                st.failed_rows = st.failed_rows.map(|n| n.saturating_add(1));
                match &mut st.failed {
                    Some(batch) => {
                        batch.count = batch.count.saturating_add(1);
                        batch.notification_id = *notification_id;
                        batch.entity.clone_from(entity);
                        batch.entity_id.clone_from(entity_id);
                        batch.comment.clone_from(comment);
                    }
                    None => {
                        st.failed = Some(FailedBatch {
                            count: 1,
                            first_at: now,
                            notification_id: *notification_id,
                            entity: entity.clone(),
                            entity_id: entity_id.clone(),
                            comment: comment.clone(),
                        });
                    }
                }
            }
            Signal::DeliverySucceeded { listener } => {
                let st = self.listener(listener);
                let since = st.failing_since.take();
                let failing_alerted = std::mem::take(&mut st.failing_alerted);
                let failed_alerted = std::mem::take(&mut st.failed_alerted);
                let remaining = st.failed_rows;
                let last_error = st.last_error.clone();
                // One recovery message: ListenerRecovered also counts what remains failed.
                if failing_alerted && self.subscribes(AlertEvent::ListenerRecovered) {
                    let failed_for = since.map_or(Duration::ZERO, |s| now.duration_since(s));
                    out.push(self.listener_recovered(listener, failed_for, &last_error, remaining));
                } else if failed_alerted {
                    out.push(self.notification_failed_recovered(listener, remaining));
                }
            }
            Signal::FailedRows(counts) => {
                for (name, n) in counts {
                    self.listener(name).failed_rows = Some(*n);
                }
            }
            Signal::Gauges {
                lag_bytes,
                oldest_undelivered,
            } => {
                if let Some(bytes) = *lag_bytes {
                    self.lag_bytes = bytes;
                    if bytes > self.config.lag_bytes {
                        self.lag.since.get_or_insert(now);
                    } else {
                        self.lag.since = None;
                        if std::mem::take(&mut self.lag.alerted) {
                            out.push(self.lag_recovered(bytes));
                        }
                    }
                }
                for (name, _) in oldest_undelivered {
                    self.listener(name);
                }
                let threshold = self.config.queue_age;
                let mut recovered = Vec::new();
                for (name, st) in &mut self.listeners {
                    st.queue_age = oldest_undelivered
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(Duration::ZERO, |(_, age)| *age);
                    if st.queue_age <= threshold && std::mem::take(&mut st.queue_alerted) {
                        recovered.push((name.clone(), st.queue_age));
                    }
                }
                for (name, age) in recovered {
                    out.push(self.queue_recovered(&name, age));
                }
            }
            Signal::DatabaseUnreachable { error } => {
                self.database.since.get_or_insert(now);
                self.database_error.clone_from(error);
            }
            Signal::DatabaseReachable => {
                let since = self.database.since.take();
                if std::mem::take(&mut self.database.alerted) {
                    let down_for = since.map_or(Duration::ZERO, |s| now.duration_since(s));
                    out.push(self.database_reachable(down_for));
                }
            }
            Signal::Capture(c) => {
                if let Some(alert) = self.capture_signal(c, now) {
                    out.push(alert);
                }
            }
            Signal::Reload(_) => {}
        }
        self.subscribed(out)
    }

    /// Alerts whose time has come.
    fn tick(&mut self, now: Instant) -> Vec<Alert> {
        let mut out = Vec::new();
        let c = &self.config;
        let gather = GATHER.min(c.min_interval);
        let names: Vec<String> = self.listeners.keys().cloned().collect();
        for name in names {
            let Some(st) = self.listeners.get(&name) else {
                continue;
            };
            if let Some(since) = st.failing_since
                && !st.failing_alerted
                && now.duration_since(since) >= self.config.listener_failing_for
                && self.allow(AlertEvent::ListenerFailing, &name, now)
            {
                let alert = self.listener_failing(&name, now.duration_since(since));
                out.push(alert);
                if let Some(st) = self.listeners.get_mut(&name) {
                    st.failing_alerted = true;
                }
            }
            let due = self
                .listeners
                .get(&name)
                .and_then(|st| st.failed.as_ref())
                .is_some_and(|b| now.duration_since(b.first_at) >= gather);
            if due && self.allow(AlertEvent::NotificationFailed, &name, now) {
                let batch = self
                    .listeners
                    .get_mut(&name)
                    .and_then(|st| st.failed.take());
                if let Some(batch) = batch {
                    out.push(self.notification_failed(&name, &batch));
                    if self.subscribes(AlertEvent::NotificationFailed)
                        && let Some(st) = self.listeners.get_mut(&name)
                    {
                        st.failed_alerted = true;
                    }
                }
            }
            let age = self
                .listeners
                .get(&name)
                .map(|st| (st.queue_age, st.queue_alerted));
            if let Some((age, false)) = age
                && age > self.config.queue_age
                && self.allow(AlertEvent::QueueAge, &name, now)
            {
                out.push(self.queue_age(&name, age));
                if let Some(st) = self.listeners.get_mut(&name) {
                    st.queue_alerted = true;
                }
            }
        }
        if let Some(since) = self.lag.since
            && !self.lag.alerted
            && now.duration_since(since) >= self.config.lag_for
            && self.allow(AlertEvent::ReplicationLag, "", now)
        {
            self.lag.alerted = true;
            out.push(self.lag_alert(now.duration_since(since)));
        }
        let due: Vec<String> = self
            .rejected
            .iter()
            .filter(|(_, (_, first, _))| now.duration_since(*first) >= gather)
            .map(|(entity, _)| entity.clone())
            .collect();
        for entity in due {
            if self.allow(AlertEvent::ChangeRejected, &entity, now)
                && let Some((count, _, reason)) = self.rejected.remove(&entity)
            {
                out.push(self.rejected_alert(&entity, count, &reason));
            }
        }
        if let Some(since) = self.database.since
            && !self.database.alerted
            && now.duration_since(since) >= self.config.database_unreachable_for
            && self.allow(AlertEvent::DatabaseUnreachable, "", now)
        {
            self.database.alerted = true;
            out.push(self.database_unreachable(now.duration_since(since)));
        }
        self.subscribed(out)
    }

    fn listener(&mut self, name: &str) -> &mut ListenerState {
        self.listeners.entry(name.to_owned()).or_default()
    }

    /// Whether an alert with this event and listener may go out now; records it if so.
    fn allow(&mut self, event: AlertEvent, listener: &str, now: Instant) -> bool {
        let key = (event, listener.to_owned());
        if let Some(last) = self.last_sent.get(&key)
            && now.duration_since(*last) < self.config.min_interval
        {
            return false;
        }
        self.last_sent.insert(key, now);
        true
    }

    fn subscribed(&self, mut alerts: Vec<Alert>) -> Vec<Alert> {
        alerts.retain(|a| self.subscribes(a.event));
        alerts
    }

    fn subscribes(&self, event: AlertEvent) -> bool {
        self.config.on.contains(&event.kind())
    }

    fn prefix(&self) -> String {
        format!("walhook {}", self.context.source_system)
    }

    fn listener_failing(&self, listener: &str, failing_for: Duration) -> Alert {
        let st = self.listeners.get(listener);
        let last_error = st.map(|s| s.last_error.clone()).unwrap_or_default();
        Alert {
            event: AlertEvent::ListenerFailing,
            summary: format!(
                "{}: listener {listener} has been failing for {}",
                self.prefix(),
                human(failing_for)
            ),
            detail: format!(
                "Every delivery attempt to listener {listener} for the last {} failed and none succeeded. Last error: {last_error}. Notifications stay in walhook.new and are retried with backoff; those out of attempts move to walhook.failed. Check the listener's endpoint, then see its queue and last error with `{}` and failed notifications with `{}`.",
                human(failing_for),
                self.context.status_command(),
                self.context.failed_command(listener),
            ),
            listener: Some(listener.to_owned()),
            last_error: Some(last_error),
            command: self.context.status_command(),
            count: None,
        }
    }

    fn listener_recovered(
        &self,
        listener: &str,
        failed_for: Duration,
        last_error: &str,
        remaining: Option<u64>,
    ) -> Alert {
        Alert {
            event: AlertEvent::ListenerRecovered,
            summary: format!(
                "{}: listener {listener} recovered after {} of failures",
                self.prefix(),
                human(failed_for)
            ),
            detail: format!(
                "A delivery to listener {listener} succeeded again after {} of failures (last error: {last_error}). Waiting notifications are being delivered. {}",
                human(failed_for),
                self.remaining_failed(listener, remaining),
            ),
            listener: Some(listener.to_owned()),
            last_error: Some(last_error.to_owned()),
            command: self.context.retry_command(listener),
            count: remaining,
        }
    }

    fn notification_failed_recovered(&self, listener: &str, remaining: Option<u64>) -> Alert {
        let left = match remaining {
            Some(0) => "none remain in walhook.failed".to_owned(),
            Some(1) => "1 notification remains in walhook.failed".to_owned(),
            Some(n) => format!("{n} notifications remain in walhook.failed"),
            None => "failed ones stay in walhook.failed".to_owned(),
        };
        Alert {
            event: AlertEvent::NotificationFailedRecovered,
            summary: format!(
                "{}: listener {listener} accepts deliveries again; {left}",
                self.prefix()
            ),
            detail: format!(
                "A delivery to listener {listener} succeeded after notifications to it had run out of attempts. {}",
                self.remaining_failed(listener, remaining),
            ),
            listener: Some(listener.to_owned()),
            last_error: None,
            command: self.context.retry_command(listener),
            count: remaining,
        }
    }

    /// What is left in walhook.failed for `listener`, and the commands for it.
    fn remaining_failed(&self, listener: &str, remaining: Option<u64>) -> String {
        let what = match remaining {
            Some(0) => {
                return format!(
                    "No notification of listener {listener} remains in walhook.failed."
                );
            }
            Some(1) => "1 notification of listener".to_owned(),
            Some(n) => format!("{n} notifications of listener"),
            None => "Notifications of listener".to_owned(),
        };
        let verb = if remaining == Some(1) {
            "remains"
        } else {
            "remain"
        };
        format!(
            "{what} {listener} that ran out of attempts {verb} in walhook.failed: list them with `{}` and requeue them with `{}`.",
            self.context.failed_command(listener),
            self.context.retry_command(listener),
        )
    }

    fn notification_failed(&self, listener: &str, b: &FailedBatch) -> Alert {
        let what = if b.count == 1 {
            "1 notification".to_owned()
        } else {
            format!("{} notifications", b.count)
        };
        Alert {
            event: AlertEvent::NotificationFailed,
            summary: format!("{}: {what} to listener {listener} failed", self.prefix()),
            detail: format!(
                "{what} to listener {listener} ran out of attempts and moved to walhook.failed. The last: {}{}. List them with `{}` and requeue them with `{}` once the listener works.",
                // Callers that do not know the notification pass an empty entity.
                if b.entity.is_empty() {
                    String::new()
                } else {
                    format!(
                        "notification {} for {} {}: ",
                        b.notification_id, b.entity, b.entity_id
                    )
                },
                b.comment,
                self.context.failed_command(listener),
                self.context.retry_command(listener),
            ),
            listener: Some(listener.to_owned()),
            last_error: Some(b.comment.clone()),
            command: self.context.failed_command(listener),
            count: Some(b.count),
        }
    }

    fn lag_alert(&self, above_for: Duration) -> Alert {
        Alert {
            event: AlertEvent::ReplicationLag,
            summary: format!(
                "{}: replication lag is {} (above {} for {})",
                self.prefix(),
                bytes(self.lag_bytes),
                bytes(self.config.lag_bytes),
                human(above_for)
            ),
            detail: format!(
                "The replication slot is {} behind the server's WAL, above the {} threshold for {}. The server keeps that WAL on disk until walhook confirms it; if this keeps growing the disk fills. Check that walhook is running and streaming with `{}`, and look at its log.",
                bytes(self.lag_bytes),
                bytes(self.config.lag_bytes),
                human(above_for),
                self.context.status_command(),
            ),
            listener: None,
            last_error: None,
            command: self.context.status_command(),
            count: None,
        }
    }

    fn lag_recovered(&self, now_bytes: u64) -> Alert {
        Alert {
            event: AlertEvent::ReplicationLagRecovered,
            summary: format!(
                "{}: replication lag is back to {}",
                self.prefix(),
                bytes(now_bytes)
            ),
            detail: format!(
                "The replication slot is {} behind, below the {} threshold again.",
                bytes(now_bytes),
                bytes(self.config.lag_bytes)
            ),
            listener: None,
            last_error: None,
            command: self.context.status_command(),
            count: None,
        }
    }

    fn queue_age(&self, listener: &str, age: Duration) -> Alert {
        let last_error = self
            .listeners
            .get(listener)
            .map(|s| s.last_error.clone())
            .filter(|e| !e.is_empty());
        let error_note = last_error
            .as_deref()
            .map_or(String::new(), |e| format!(" Last error: {e}."));
        Alert {
            event: AlertEvent::QueueAge,
            summary: format!(
                "{}: listener {listener} has notifications waiting for {}",
                self.prefix(),
                human(age)
            ),
            detail: format!(
                "The oldest undelivered notification for listener {listener} has waited {}, longer than {}: delivery is failing, rate-limited or too slow.{error_note} See the queue with `{}`.",
                human(age),
                human(self.config.queue_age),
                self.context.status_command(),
            ),
            listener: Some(listener.to_owned()),
            last_error,
            command: self.context.status_command(),
            count: None,
        }
    }

    fn queue_recovered(&self, listener: &str, age: Duration) -> Alert {
        Alert {
            event: AlertEvent::QueueAgeRecovered,
            summary: format!("{}: listener {listener} is keeping up again", self.prefix()),
            detail: format!(
                "The oldest undelivered notification for listener {listener} is {} old, within {} again.",
                human(age),
                human(self.config.queue_age)
            ),
            listener: Some(listener.to_owned()),
            last_error: None,
            command: self.context.status_command(),
            count: None,
        }
    }

    fn database_unreachable(&self, down_for: Duration) -> Alert {
        Alert {
            event: AlertEvent::DatabaseUnreachable,
            summary: format!(
                "{}: the database has been unreachable for {}",
                self.prefix(),
                human(down_for)
            ),
            detail: format!(
                "walhook cannot reach its database for {}: no changes are captured or delivered (none are lost; the replication slot keeps them). Last error: {}. Check that PostgreSQL is up and accepts walhook's connections, then `{}`.",
                human(down_for),
                self.database_error,
                self.context.status_command(),
            ),
            listener: None,
            last_error: Some(self.database_error.clone()),
            command: self.context.status_command(),
            count: None,
        }
    }

    /// Gaps and schema changes are told at once (a repeat of the same schema note within
    /// `min_interval`, as after a reconnect, is not); set-aside changes are gathered.
    fn capture_signal(&mut self, signal: &CaptureSignal, now: Instant) -> Option<Alert> {
        let command = self.context.status_command();
        match signal {
            CaptureSignal::Gap {
                slot,
                reason,
                last_flushed,
                resumed,
            } => Some(Alert {
                event: AlertEvent::CaptureGap,
                summary: format!(
                    "{}: changes between {last_flushed} and {resumed} were lost",
                    self.prefix()
                ),
                detail: format!(
                    "Capture resumed at {resumed}, but the changes committed between {last_flushed} and {resumed} were never read: {reason} (slot {slot}). The gap was accepted with `walhook setup --accept-gap` and is recorded in walhook.capture_gap. Listeners did not receive those changes; resynchronise them from the tables if they need them."
                ),
                listener: None,
                last_error: Some(reason.clone()),
                command,
                count: None,
            }),
            CaptureSignal::Rejected {
                entity,
                count,
                reason,
            } => {
                let entry = self
                    .rejected
                    .entry(entity.clone())
                    .or_insert((0, now, String::new()));
                entry.0 = entry.0.saturating_add(*count);
                entry.2.clone_from(reason);
                None
            }
            CaptureSignal::SchemaChanged { table, message } => {
                let key = format!("{table}: {message}");
                self.allow(AlertEvent::SchemaChanged, &key, now)
                    .then(|| Alert {
                        event: AlertEvent::SchemaChanged,
                        summary: format!("{}: table {table} changed under capture", self.prefix()),
                        detail: format!("{message}. Capture goes on."),
                        listener: None,
                        last_error: None,
                        command,
                        count: None,
                    })
            }
        }
    }

    fn rejected_alert(&self, entity: &str, count: u64, reason: &str) -> Alert {
        let what = if count == 1 {
            "1 change".to_owned()
        } else {
            format!("{count} changes")
        };
        Alert {
            event: AlertEvent::ChangeRejected,
            summary: format!(
                "{}: {what} of entity {entity} set aside in walhook.rejected",
                self.prefix()
            ),
            detail: format!(
                "{what} of entity {entity} could not be queued and were kept in walhook.rejected instead; capture went on past them. The last reason: {reason}. See them with: SELECT * FROM walhook.rejected WHERE entity = '{entity}' ORDER BY id DESC;"
            ),
            listener: None,
            last_error: Some(reason.to_owned()),
            command: format!(
                "psql -c \"SELECT * FROM walhook.rejected WHERE entity = '{entity}' ORDER BY id DESC LIMIT 20\""
            ),
            count: Some(count),
        }
    }

    fn database_reachable(&self, down_for: Duration) -> Alert {
        Alert {
            event: AlertEvent::DatabaseReachable,
            summary: format!(
                "{}: the database is reachable again after {}",
                self.prefix(),
                human(down_for)
            ),
            detail: format!(
                "walhook reached its database again after {} and resumes capturing and delivering from where it stopped.",
                human(down_for)
            ),
            listener: None,
            last_error: Some(self.database_error.clone()),
            command: self.context.status_command(),
            count: None,
        }
    }
}

/// A duration rounded to whole seconds, like `5m 3s`.
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// A byte count in the largest binary unit that keeps it at least 1, like `1.5 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let name = UNITS.get(unit).copied().unwrap_or("B");
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {name}")
    }
}

// ---------------------------------------------------------------------------------------
// Sending.

type SmtpTransport = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;

/// Where one monitor's alerts go.
struct Targets {
    webhook: Option<(MonitorWebhook, reqwest::Client)>,
    email: Option<(MonitorEmail, SmtpTransport)>,
}

impl Targets {
    /// Builds clients; a target that cannot be built is logged and left out.
    fn new(config: &MonitorConfig) -> Targets {
        let ca = config.ca_file.as_ref();
        let webhook = config.webhook.as_ref().and_then(|w| {
            let client = crate::tls::http_client_builder(ca)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    b.redirect(reqwest::redirect::Policy::none())
                        .no_proxy()
                        .timeout(SEND_TIMEOUT)
                        .build()
                        .map_err(|e| e.without_url().to_string())
                });
            match client {
                Ok(client) => Some((w.clone(), client)),
                Err(e) => {
                    warn!(monitor = %config.name, "cannot create the HTTP client for monitor {}: {e}; its webhook alerts are not sent", config.name);
                    None
                }
            }
        });
        let email = config.email.as_ref().and_then(|e| match smtp_transport(&e.smtp, ca) {
            Ok(transport) => Some((e.clone(), transport)),
            Err(err) => {
                warn!(monitor = %config.name, "cannot use the mail server {} of monitor {}: {err}; its email alerts are not sent", e.smtp.redacted(), config.name);
                None
            }
        });
        Targets { webhook, email }
    }
}

/// The SMTP transport for `server`, trusting the built-in roots, the OS store and `ca`.
fn smtp_transport(
    server: &SmtpServer,
    ca: Option<&CaFile>,
) -> Result<SmtpTransport, lettre::transport::smtp::Error> {
    use lettre::transport::smtp::client::Tls;
    let tls = match server.tls {
        SmtpTls::Plain => Tls::None,
        SmtpTls::StartTlsOpportunistic => {
            Tls::Opportunistic(crate::tls::smtp_tls_parameters(&server.host, ca)?)
        }
        SmtpTls::StartTlsRequired => {
            Tls::Required(crate::tls::smtp_tls_parameters(&server.host, ca)?)
        }
        SmtpTls::Tls => Tls::Wrapper(crate::tls::smtp_tls_parameters(&server.host, ca)?),
    };
    let mut builder = SmtpTransport::builder_dangerous(server.host.as_str())
        .port(server.port)
        .tls(tls)
        .timeout(Some(SEND_TIMEOUT));
    if let Some(name) = &server.hello_name {
        builder = builder.hello_name(lettre::transport::smtp::extension::ClientId::Domain(
            name.clone(),
        ));
    }
    if let Some(login) = &server.credentials {
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            login.user.clone(),
            login.password.expose().to_owned(),
        ));
    }
    Ok(builder.build())
}

async fn send_alerts(
    name: String,
    targets: Targets,
    mut rx: mpsc::Receiver<Alert>,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let mut webhook_failing = false;
    let mut email_failing = false;
    loop {
        let alert = tokio::select! {
            _ = shutdown.cancelled() => return,
            alert = rx.recv() => match alert {
                Some(a) => a,
                None => return,
            },
        };
        info!(monitor = %name, alert = alert.event.name(), "alert: {}", alert.summary);
        if let Some((webhook, client)) = &targets.webhook {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = post_webhook(client, webhook, &alert, &context) => r,
            };
            report(
                &name,
                "webhook",
                webhook.url.redacted(),
                result,
                &mut webhook_failing,
            );
        }
        if let Some((email, transport)) = &targets.email {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = send_email(transport, email, &alert) => r,
            };
            report(
                &name,
                "email",
                email.smtp.redacted(),
                result,
                &mut email_failing,
            );
        }
    }
}

/// Logs a failed send once per run of failures, and the return to normal.
fn report(name: &str, target: &str, url: &str, result: Result<(), String>, failing: &mut bool) {
    match result {
        Ok(()) => {
            if std::mem::take(failing) {
                info!(monitor = %name, "{target} alerts of monitor {name} reach {url} again");
            }
        }
        Err(e) => {
            if *failing {
                debug!(monitor = %name, "still cannot send {target} alert to {url}: {e}");
            } else {
                *failing = true;
                warn!(monitor = %name, "cannot send {target} alert of monitor {name} to {url}: {e}; alerts are dropped until it works again");
            }
        }
    }
}

/// The CloudEvents 1.0 structured JSON for `alert`.
pub fn cloudevent(
    alert: &Alert,
    source_system: &str,
    id: &str,
    time: SystemTime,
) -> serde_json::Value {
    let mut data = serde_json::json!({
        "summary": alert.summary,
        "detail": alert.detail,
        "command": alert.command,
        "sourceSystem": source_system,
    });
    if let Some(obj) = data.as_object_mut() {
        if let Some(l) = &alert.listener {
            obj.insert("listener".into(), l.clone().into());
        }
        if let Some(e) = &alert.last_error {
            obj.insert("lastError".into(), e.clone().into());
        }
        if let Some(c) = alert.count {
            obj.insert("count".into(), c.into());
        }
    }
    let source: String = source_system
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut event = serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("/walhook/{source}"),
        "type": alert.event.cloudevents_type(),
        "time": crate::delivery::format::rfc3339_micros(time),
        "datacontenttype": "application/json",
        "data": data,
    });
    if let (Some(l), Some(obj)) = (&alert.listener, event.as_object_mut()) {
        obj.insert("subject".into(), l.clone().into());
    }
    event
}

async fn post_webhook(
    client: &reqwest::Client,
    webhook: &MonitorWebhook,
    alert: &Alert,
    context: &Context,
) -> Result<(), String> {
    let id = uuid::Uuid::new_v4().to_string();
    let body = cloudevent(alert, &context.source_system, &id, SystemTime::now()).to_string();
    let mut last = String::new();
    for attempt in 0..=RETRY_DELAYS.len() {
        if let Some(delay) = attempt.checked_sub(1).and_then(|i| RETRY_DELAYS.get(i)) {
            tokio::time::sleep(*delay).await;
        }
        let mut req = client
            .post(webhook.url.expose().clone())
            .header("content-type", "application/cloudevents+json")
            .body(body.clone());
        for (k, v) in &webhook.headers {
            req = req.header(k, v);
        }
        if let Some(key) = &webhook.secret {
            for (name, value) in webhook_headers(key, &id, body.as_bytes()) {
                req = req.header(name, value);
            }
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => {
                let status = resp.status().as_u16();
                last = format!("HTTP {status}");
                // The same outcome table as deliveries: 408, 429 and 5xx are worth retrying.
                if status_outcome(status).verdict() != Verdict::Retry {
                    return Err(last);
                }
            }
            // Without the URL: it may carry credentials.
            Err(e) => last = describe_reqwest(&e),
        }
    }
    Err(last)
}

/// A reqwest error in plain words, without the URL (it may carry credentials).
fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("no answer within {}", human(SEND_TIMEOUT));
    }
    if e.is_connect() {
        return match crate::tls::certificate_problem(e) {
            Some(problem) => format!("TLS handshake failed: {problem}"),
            None => "cannot connect".to_owned(),
        };
    }
    let mut s = String::from("request failed");
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s = format!("{s}: {inner}");
        source = inner.source();
    }
    s
}

async fn send_email(
    transport: &lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    email: &MonitorEmail,
    alert: &Alert,
) -> Result<(), String> {
    let mut builder = lettre::Message::builder()
        .from(email.from.clone())
        .subject(alert.summary.clone())
        .header(lettre::message::header::ContentType::TEXT_PLAIN);
    for to in &email.to {
        builder = builder.to(to.clone());
    }
    let body = format!("{}\n\nTo look: {}\n", alert.detail, alert.command);
    let message = builder
        .body(body)
        .map_err(|e| format!("cannot build the message: {e}"))?;
    let mut last = String::new();
    for attempt in 0..=RETRY_DELAYS.len() {
        if let Some(delay) = attempt.checked_sub(1).and_then(|i| RETRY_DELAYS.get(i)) {
            tokio::time::sleep(*delay).await;
        }
        match transport.send(message.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_permanent() => return Err(e.to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MonitorConfig {
        MonitorConfig {
            name: "ops".into(),
            webhook: None,
            email: None,
            ca_file: None,
            on: AlertKind::ALL.to_vec(),
            listener_failing_for: Duration::from_secs(300),
            lag_bytes: 1000,
            lag_for: Duration::from_secs(300),
            queue_age: Duration::from_secs(900),
            database_unreachable_for: Duration::from_secs(60),
            min_interval: Duration::from_secs(900),
        }
    }

    fn evaluator(config: MonitorConfig) -> Evaluator {
        Evaluator::new(
            config,
            Arc::new(Context {
                source_system: "CRM".into(),
                config_path: "/etc/walhook/walhook.toml".into(),
            }),
        )
    }

    fn failed(listener: &str, comment: &str) -> Signal {
        Signal::DeliveryFailedAttempt {
            listener: listener.into(),
            comment: comment.into(),
        }
    }

    fn ok(listener: &str) -> Signal {
        Signal::DeliverySucceeded {
            listener: listener.into(),
        }
    }

    /// Feeds failed attempts every 10 s from `start` for `span`, ticking each second.
    fn fail_for(e: &mut Evaluator, start: Instant, span: Duration, out: &mut Vec<Alert>) {
        let mut t = Duration::ZERO;
        while t <= span {
            if t.as_secs().is_multiple_of(10) {
                out.extend(e.signal(
                    &failed("crm", &format!("HTTP 503 at {}", t.as_secs())),
                    start + t,
                ));
            }
            out.extend(e.tick(start + t));
            t += Duration::from_secs(1);
        }
    }

    #[test]
    fn continuous_failure_gives_one_alert_per_episode_and_one_recovery() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let mut out = Vec::new();
        fail_for(&mut e, t0, Duration::from_secs(299), &mut out);
        assert!(out.is_empty(), "{out:?}");
        fail_for(
            &mut e,
            t0 + Duration::from_secs(300),
            Duration::from_secs(600),
            &mut out,
        );
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].event, AlertEvent::ListenerFailing);
        assert_eq!(out[0].listener.as_deref(), Some("crm"));
        assert_eq!(out[0].last_error.as_deref(), Some("HTTP 503 at 0"));
        assert!(
            out[0]
                .command
                .contains("walhook status --config /etc/walhook/walhook.toml")
        );
        let recovered = e.signal(&ok("crm"), t0 + Duration::from_secs(901));
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].event, AlertEvent::ListenerRecovered);
        assert!(
            recovered[0].summary.contains("crm recovered after 15m 1s"),
            "{}",
            recovered[0].summary
        );
        assert!(
            e.signal(&ok("crm"), t0 + Duration::from_secs(902))
                .is_empty()
        );
        assert!(e.tick(t0 + Duration::from_secs(2000)).is_empty());
    }

    #[test]
    fn a_success_inside_the_window_restarts_the_episode() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let mut out = Vec::new();
        fail_for(&mut e, t0, Duration::from_secs(200), &mut out);
        // No recovery message: nothing was alerted.
        assert!(
            e.signal(&ok("crm"), t0 + Duration::from_secs(201))
                .is_empty()
        );
        fail_for(
            &mut e,
            t0 + Duration::from_secs(202),
            Duration::from_secs(200),
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_new_episode_within_min_interval_waits_for_the_interval() {
        let mut e = evaluator(MonitorConfig {
            listener_failing_for: Duration::from_secs(10),
            min_interval: Duration::from_secs(100),
            ..config()
        });
        let t0 = Instant::now();
        let mut out = Vec::new();
        fail_for(&mut e, t0, Duration::from_secs(20), &mut out);
        assert_eq!(out.len(), 1);
        out.extend(e.signal(&ok("crm"), t0 + Duration::from_secs(21)));
        assert_eq!(out.len(), 2);
        fail_for(
            &mut e,
            t0 + Duration::from_secs(30),
            Duration::from_secs(60),
            &mut out,
        );
        assert_eq!(
            out.len(),
            2,
            "flapping inside min_interval alerts again: {out:#?}"
        );
        fail_for(
            &mut e,
            t0 + Duration::from_secs(91),
            Duration::from_secs(20),
            &mut out,
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].event, AlertEvent::ListenerFailing);
    }

    #[test]
    fn a_burst_of_failed_notifications_gives_one_alert_with_a_count() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let mut out = Vec::new();
        for i in 0..50 {
            let at = t0 + Duration::from_millis(i * 50);
            out.extend(e.signal(
                &Signal::NotificationFailed {
                    listener: "crm".into(),
                    notification_id: i as i64,
                    entity: "Customer".into(),
                    entity_id: format!("{i}"),
                    comment: "HTTP 404".into(),
                },
                at,
            ));
            out.extend(e.tick(at));
        }
        for s in 3..20 {
            out.extend(e.tick(t0 + Duration::from_secs(s)));
        }
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].event, AlertEvent::NotificationFailed);
        assert_eq!(out[0].count, Some(50));
        assert!(
            out[0]
                .summary
                .contains("50 notifications to listener crm failed")
        );
        assert!(
            out[0]
                .detail
                .contains("notification 49 for Customer 49: HTTP 404")
        );
        assert_eq!(
            out[0].command,
            "walhook failed --listener crm --config /etc/walhook/walhook.toml"
        );
        // A later failure inside min_interval waits and is reported once the interval ends.
        out.extend(e.signal(
            &Signal::NotificationFailed {
                listener: "crm".into(),
                notification_id: 99,
                entity: "Customer".into(),
                entity_id: "99".into(),
                comment: "HTTP 404".into(),
            },
            t0 + Duration::from_secs(60),
        ));
        out.extend(e.tick(t0 + Duration::from_secs(120)));
        assert_eq!(out.len(), 1);
        out.extend(e.tick(t0 + Duration::from_secs(906)));
        // The listener has also been failing for longer than listener_failing_for by now.
        let events: Vec<(AlertEvent, Option<u64>)> =
            out.iter().map(|a| (a.event, a.count)).collect();
        assert_eq!(
            events,
            vec![
                (AlertEvent::NotificationFailed, Some(50)),
                (AlertEvent::ListenerFailing, None),
                (AlertEvent::NotificationFailed, Some(1)),
            ]
        );
    }

    fn notification_failed(listener: &str, id: i64) -> Signal {
        Signal::NotificationFailed {
            listener: listener.into(),
            notification_id: id,
            entity: "Customer".into(),
            entity_id: id.to_string(),
            comment: "HTTP 404".into(),
        }
    }

    #[test]
    fn the_first_success_after_a_failed_alert_says_how_many_remain_failed() {
        let mut e = evaluator(MonitorConfig {
            on: vec![AlertKind::NotificationFailed],
            ..config()
        });
        let t0 = Instant::now();
        let mut out = e.signal(
            &Signal::FailedRows(vec![("crm".into(), 2), ("other".into(), 7)]),
            t0,
        );
        for i in 0..3 {
            out.extend(e.signal(&notification_failed("crm", i), t0));
        }
        // A success before the alert went out is no recovery: nothing was reported yet.
        out.extend(e.signal(&ok("crm"), t0 + Duration::from_secs(1)));
        out.extend(e.tick(t0 + Duration::from_secs(6)));
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].event, AlertEvent::NotificationFailed);
        assert_eq!(out[0].count, Some(3));

        let recovered = e.signal(&ok("crm"), t0 + Duration::from_secs(7));
        assert_eq!(recovered.len(), 1, "{recovered:#?}");
        let r = &recovered[0];
        assert_eq!(r.event, AlertEvent::NotificationFailedRecovered);
        assert_eq!(r.listener.as_deref(), Some("crm"));
        assert_eq!(r.count, Some(5));
        assert!(
            r.summary.contains(
                "listener crm accepts deliveries again; 5 notifications remain in walhook.failed"
            ),
            "{}",
            r.summary
        );
        assert_eq!(
            r.command,
            "walhook retry --listener crm --all --config /etc/walhook/walhook.toml"
        );
        assert!(r.detail.contains(&r.command), "{}", r.detail);
        assert!(e.signal(&ok("crm"), t0 + Duration::from_secs(8)).is_empty());
        assert!(e.tick(t0 + Duration::from_secs(2000)).is_empty());
    }

    #[test]
    fn a_listener_failing_episode_and_failed_notifications_end_with_one_recovery() {
        let mut e = evaluator(MonitorConfig {
            listener_failing_for: Duration::from_secs(10),
            ..config()
        });
        let t0 = Instant::now();
        let mut out = e.signal(&Signal::FailedRows(vec![("crm".into(), 0)]), t0);
        fail_for(&mut e, t0, Duration::from_secs(20), &mut out);
        out.extend(e.signal(&notification_failed("crm", 1), t0 + Duration::from_secs(21)));
        out.extend(e.tick(t0 + Duration::from_secs(30)));
        let events: Vec<AlertEvent> = out.iter().map(|a| a.event).collect();
        assert_eq!(
            events,
            [AlertEvent::ListenerFailing, AlertEvent::NotificationFailed]
        );
        let recovered = e.signal(&ok("crm"), t0 + Duration::from_secs(31));
        assert_eq!(recovered.len(), 1, "{recovered:#?}");
        assert_eq!(recovered[0].event, AlertEvent::ListenerRecovered);
        assert_eq!(recovered[0].count, Some(1));
        assert!(
            recovered[0]
                .detail
                .contains("1 notification of listener crm that ran out of attempts remains"),
            "{}",
            recovered[0].detail
        );
    }

    #[test]
    fn without_a_count_the_recovery_names_no_number() {
        let mut e = evaluator(MonitorConfig {
            on: vec![AlertKind::NotificationFailed],
            ..config()
        });
        let t0 = Instant::now();
        let mut out = e.signal(&notification_failed("crm", 1), t0);
        out.extend(e.tick(t0 + Duration::from_secs(6)));
        out.extend(e.signal(&ok("crm"), t0 + Duration::from_secs(7)));
        assert_eq!(out.len(), 2, "{out:#?}");
        assert_eq!(out[1].count, None);
        assert!(
            out[1]
                .summary
                .ends_with("failed ones stay in walhook.failed"),
            "{}",
            out[1].summary
        );
    }

    #[test]
    fn lag_alerts_once_after_lag_for_and_recovers() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let mut out = Vec::new();
        for s in 0..=400 {
            let at = t0 + Duration::from_secs(s);
            out.extend(e.signal(
                &Signal::Gauges {
                    lag_bytes: Some(5000),
                    oldest_undelivered: vec![],
                },
                at,
            ));
            out.extend(e.tick(at));
            if s < 300 {
                assert!(out.is_empty());
            }
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event, AlertEvent::ReplicationLag);
        assert!(out[0].summary.contains("4.9 KiB"), "{}", out[0].summary);
        let back = e.signal(
            &Signal::Gauges {
                lag_bytes: Some(10),
                oldest_undelivered: vec![],
            },
            t0 + Duration::from_secs(401),
        );
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].event, AlertEvent::ReplicationLagRecovered);
    }

    #[test]
    fn short_lag_spikes_do_not_alert() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let mut out = Vec::new();
        for s in 0..1000u64 {
            let at = t0 + Duration::from_secs(s);
            let lag = if (s / 200) % 2 == 0 { 5000 } else { 0 };
            out.extend(e.signal(
                &Signal::Gauges {
                    lag_bytes: Some(lag),
                    oldest_undelivered: vec![],
                },
                at,
            ));
            out.extend(e.tick(at));
        }
        assert!(out.is_empty(), "{out:#?}");
    }

    #[test]
    fn queue_age_alerts_per_listener_and_recovers_when_the_listener_drains() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let old = Signal::Gauges {
            lag_bytes: None,
            oldest_undelivered: vec![("crm".into(), Duration::from_secs(1000))],
        };
        let mut out = e.signal(&old, t0);
        out.extend(e.tick(t0));
        out.extend(e.signal(&old, t0 + Duration::from_secs(5)));
        out.extend(e.tick(t0 + Duration::from_secs(5)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event, AlertEvent::QueueAge);
        assert_eq!(out[0].listener.as_deref(), Some("crm"));
        let drained = e.signal(
            &Signal::Gauges {
                lag_bytes: None,
                oldest_undelivered: vec![],
            },
            t0 + Duration::from_secs(10),
        );
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].event, AlertEvent::QueueAgeRecovered);
    }

    #[test]
    fn database_unreachable_alerts_after_the_threshold_and_recovers() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let mut out = Vec::new();
        for s in 0..=120 {
            let at = t0 + Duration::from_secs(s);
            out.extend(e.signal(
                &Signal::DatabaseUnreachable {
                    error: "connection refused".into(),
                },
                at,
            ));
            out.extend(e.tick(at));
            if s < 60 {
                assert!(out.is_empty());
            }
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event, AlertEvent::DatabaseUnreachable);
        assert_eq!(out[0].last_error.as_deref(), Some("connection refused"));
        let back = e.signal(&Signal::DatabaseReachable, t0 + Duration::from_secs(121));
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].event, AlertEvent::DatabaseReachable);
        // A blip shorter than the threshold says nothing at all.
        let mut blip = e.signal(
            &Signal::DatabaseUnreachable { error: "x".into() },
            t0 + Duration::from_secs(2000),
        );
        blip.extend(e.tick(t0 + Duration::from_secs(2030)));
        blip.extend(e.signal(&Signal::DatabaseReachable, t0 + Duration::from_secs(2031)));
        assert!(blip.is_empty(), "{blip:?}");
    }

    #[test]
    fn capture_gaps_are_told_at_once_and_set_aside_changes_are_gathered() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let gap = Signal::Capture(CaptureSignal::Gap {
            slot: "walhook".into(),
            reason: "the replication slot was missing".into(),
            last_flushed: "0/1A2B3C4".into(),
            resumed: "0/2000000".into(),
        });
        let out = e.signal(&gap, t0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event, AlertEvent::CaptureGap);
        assert!(out[0].summary.contains("0/1A2B3C4"), "{}", out[0].summary);
        let rejected = |n| {
            Signal::Capture(CaptureSignal::Rejected {
                entity: "Doc".into(),
                count: n,
                reason: "jsonb refused it".into(),
            })
        };
        assert!(e.signal(&rejected(2), t0).is_empty());
        assert!(
            e.signal(&rejected(3), t0 + Duration::from_secs(1))
                .is_empty()
        );
        let out = e.tick(t0 + Duration::from_secs(6));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].event, out[0].count),
            (AlertEvent::ChangeRejected, Some(5))
        );
        assert!(
            out[0].detail.contains("jsonb refused it"),
            "{}",
            out[0].detail
        );
    }

    #[test]
    fn a_schema_note_repeated_after_a_reconnect_is_not_sent_twice() {
        let mut e = evaluator(config());
        let t0 = Instant::now();
        let note = |m: &str| {
            Signal::Capture(CaptureSignal::SchemaChanged {
                table: "public.customer".into(),
                message: m.into(),
            })
        };
        assert_eq!(e.signal(&note("city dropped"), t0).len(), 1);
        assert!(
            e.signal(&note("city dropped"), t0 + Duration::from_secs(5))
                .is_empty()
        );
        assert_eq!(
            e.signal(&note("zip renamed"), t0 + Duration::from_secs(6))
                .len(),
            1
        );
    }

    #[test]
    fn alerts_of_unsubscribed_kinds_are_not_sent() {
        let mut e = evaluator(MonitorConfig {
            on: vec![AlertKind::DatabaseUnreachable],
            listener_failing_for: Duration::ZERO,
            ..config()
        });
        let t0 = Instant::now();
        let mut out = e.signal(&failed("crm", "HTTP 500"), t0);
        out.extend(e.tick(t0 + Duration::from_secs(1)));
        out.extend(e.signal(&ok("crm"), t0 + Duration::from_secs(2)));
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn cloudevent_has_type_data_and_subject() {
        let alert = Alert {
            event: AlertEvent::ListenerFailing,
            summary: "s".into(),
            detail: "d".into(),
            listener: Some("crm".into()),
            last_error: Some("HTTP 500".into()),
            command: "walhook status".into(),
            count: None,
        };
        let ce = cloudevent(&alert, "CRM prod", "id-1", std::time::UNIX_EPOCH);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "walhook.alert.ListenerFailing");
        assert_eq!(ce["source"], "/walhook/CRM-prod");
        assert_eq!(ce["subject"], "crm");
        assert_eq!(ce["data"]["listener"], "crm");
        assert_eq!(ce["data"]["lastError"], "HTTP 500");
        assert_eq!(ce["data"]["command"], "walhook status");
        assert!(ce["data"].get("count").is_none());
    }

    #[test]
    fn byte_counts_read_naturally() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }
}

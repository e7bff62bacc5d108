//! The reader: owns the replication stream, decodes and maps changes, hands them to the
//! writer, and alone talks back to the server (standby status updates).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::CaptureObserver;
use super::mapper::{BACKFILL_PREFIX, ChildEvents, Chunk, Mapped, Mapper, Truncation, TxContext};
use super::session::SessionEnd;
use super::writer::Item;
use crate::config::{Config, Secret, SourceConfig};
use crate::db::Source;
use crate::error::{ErrorClass, ServiceError};
use crate::replication::conn::ReplicationStream;
use crate::replication::pgoutput::{self, Message};
use crate::replication::protocol::ReplicationMessage;
use crate::types::Lsn;

struct OpenTx {
    ctx: TxContext,
    seq: u32,
    /// Changes to child tables, reported on their parents at commit.
    children: ChildEvents,
}

/// The reading half of a session.
pub(super) struct Reader {
    stream: ReplicationStream,
    mapper: Mapper,
    observe: Arc<dyn CaptureObserver>,
    /// `None` once closed, so the writer sees the end of its input.
    events: Option<mpsc::Sender<Item>>,
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
    source: Source,
    /// Set when shutdown interrupted a hand-over to the writer.
    stopping: bool,
    /// The capture buffer: bytes of events handed to the writer and not yet committed.
    budget: Arc<Semaphore>,
    budget_bytes: u32,
    /// The backfills whose chunks were seen, to tell genuine chunks from forged ones.
    runs: super::backfill::Runs,
}

impl Reader {
    /// A reader for `stream`; `confirmed` is the slot's confirmed position at start.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        stream: ReplicationStream,
        mapper: Mapper,
        observe: Arc<dyn CaptureObserver>,
        events: mpsc::Sender<Item>,
        durable: watch::Receiver<Lsn>,
        confirmed: Lsn,
        config: Arc<Config>,
        subscriptions: watch::Sender<Vec<crate::queue::Subscription>>,
        source: Source,
    ) -> Reader {
        let budget_bytes = u32::try_from(config.queue.capture_buffer_bytes)
            .unwrap_or(u32::MAX)
            .max(1);
        Reader {
            stream,
            mapper,
            observe,
            events: Some(events),
            durable,
            status_interval: config.source.status_interval,
            tx: None,
            last_commit_sent: Lsn::ZERO,
            idle_position: Lsn::ZERO,
            reported_flush: confirmed,
            last_status: Instant::now(),
            warned_truncate: Default::default(),
            config,
            subscriptions,
            source,
            stopping: false,
            budget: Arc::new(Semaphore::new(budget_bytes as usize)),
            budget_bytes,
            runs: Default::default(),
        }
    }

    /// Reads until `stop`, a reload that needs a new session, or an error.
    pub(super) async fn run(
        &mut self,
        stop: &CancellationToken,
        config_rx: &mut watch::Receiver<Arc<Config>>,
    ) -> Result<SessionEnd, ServiceError> {
        let mut tick = tokio::time::interval(self.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = Ok(SessionEnd::Stopped { confirmed: None });
        loop {
            if self.stopping {
                return stopped;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return stopped,
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
                        Some(m) => self.handle(m, stop).await?,
                        None => return Err(ServiceError::transient("the server ended the replication stream")),
                    }
                }
                changed = self.durable.changed() => {
                    if changed.is_err() {
                        // The writer stopped: its error is reported by the session.
                        return stopped;
                    }
                    // Confirm promptly but not per batch: at most once a second; at once
                    // when writers' COMMITs wait for it (synchronous mode).
                    if self.config.source.synchronous
                        || self.last_status.elapsed() >= Duration::from_secs(1)
                    {
                        self.send_status(false).await?;
                    }
                }
                _ = tick.tick() => self.send_status(false).await?,
            }
        }
    }

    /// Ends the writer's input: it commits what it has and returns.
    pub(super) fn close_events(mut self) -> Self {
        self.events = None;
        self
    }

    /// After the writer finished: tells the server the final flush position, ends the
    /// stream with CopyDone and waits up to `wait` for the server to end it too. Returns the
    /// position the server acknowledged, `None` when it could not be told.
    pub(super) async fn finish(mut self, wait: Duration) -> Option<Lsn> {
        if let Err(e) = self.send_status(false).await {
            debug!("final status update failed: {}", e.message);
            return None;
        }
        let confirmed = self.reported_flush;
        match self.stream.finish(wait).await {
            Ok(()) => Some(confirmed),
            Err(e) => {
                // The status went out before CopyDone on the same connection; the server
                // reads them in order, but without its answer it is unknown.
                warn!("the server did not acknowledge the end of the replication stream: {e}");
                None
            }
        }
    }

    /// Applies a reloaded configuration; true when the session must restart to apply it.
    fn apply_reload(&mut self, new: Arc<Config>) -> bool {
        let old = self.config.clone();
        self.config = new.clone();
        if !same_but_password(&new.source, &old.source)
            || new.entities != old.entities
            || new.queue != old.queue
        {
            info!(
                "entity, source or queue configuration changed; restarting the replication session"
            );
            return true;
        }
        if new.source != old.source {
            // A rotated password is usually not valid yet: the stream keeps its connection
            // and the next one (after any disconnect) logs in with the new password.
            info!(
                "[source] password changed; the replication stream keeps its connection and reconnects with the new password when it must"
            );
        }
        if new.listeners != old.listeners {
            self.subscriptions
                .send_replace(crate::queue::subscriptions(&new.listeners));
            let source = self.source.clone();
            let count = new.listeners.len();
            tokio::spawn(async move {
                let synced = async {
                    let client = source.connect().await?;
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

    async fn handle(
        &mut self,
        msg: ReplicationMessage,
        stop: &CancellationToken,
    ) -> Result<(), ServiceError> {
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
                self.handle_pgoutput(message, stop).await
            }
        }
    }

    async fn handle_pgoutput(
        &mut self,
        message: Message,
        stop: &CancellationToken,
    ) -> Result<(), ServiceError> {
        match message {
            Message::Begin(b) => {
                self.tx = Some(OpenTx {
                    ctx: TxContext {
                        commit_lsn: b.final_lsn,
                        xid: b.xid,
                        commit_time: b.commit_time,
                    },
                    seq: 0,
                    children: ChildEvents::default(),
                });
            }
            Message::Commit(c) => {
                if let Some(mut open) = self.tx.take()
                    && !open.children.is_empty()
                {
                    let events = open.children.finish(&open.ctx);
                    let bytes = events.iter().map(|e| e.approx_bytes()).sum();
                    self.send_sized(bytes, |p| Item::Events(events, p), stop)
                        .await?;
                }
                self.tx = None;
                self.last_commit_sent = c.end_lsn;
                self.send(Item::Commit { end_lsn: c.end_lsn }, stop).await?;
            }
            Message::Relation(rel) => {
                for note in self.mapper.on_relation(rel) {
                    warn!(entity = %note.entity, table = %note.table, "{}", note.message);
                    self.observe.schema_changed(&note);
                }
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
                self.observe.changes_read(1);
                open.children.add(seq, self.mapper.map_child(change));
                let ctx = open.ctx;
                match self
                    .mapper
                    .map_change(&ctx, seq, change)
                    .map_err(ServiceError::from_err)?
                {
                    Some(Mapped::Event(event)) => {
                        let bytes = event.approx_bytes();
                        self.send_sized(bytes, |p| Item::Event(Box::new(event), p), stop)
                            .await?;
                    }
                    Some(Mapped::Events(events)) => {
                        let bytes = events.iter().map(|e| e.approx_bytes()).sum();
                        self.send_sized(bytes, |p| Item::Events(events, p), stop)
                            .await?;
                    }
                    Some(Mapped::SetAside(change)) => {
                        let bytes = change.approx_bytes();
                        self.send_sized(bytes, |p| Item::SetAside(Box::new(change), p), stop)
                            .await?;
                    }
                    None => {}
                }
            }
            Message::Truncate { relations, .. } => {
                let Some(open) = self.tx.as_mut() else {
                    return Err(ServiceError::new(
                        ErrorClass::Permanent,
                        "protocol error: TRUNCATE outside a transaction",
                    ));
                };
                let ctx = open.ctx;
                // One ordinal per truncated relation, so each can become its own event.
                let first = open.seq;
                open.seq += u32::try_from(relations.len()).unwrap_or(u32::MAX);
                for (seq, oid) in (first..).zip(relations) {
                    match self.mapper.map_truncate(&ctx, seq, oid) {
                        Truncation::Event(event) => {
                            let bytes = event.approx_bytes();
                            self.send_sized(bytes, |p| Item::Event(event, p), stop)
                                .await?;
                        }
                        Truncation::NotWanted(entity, table) => {
                            if self.warned_truncate.insert(oid) {
                                warn!(%entity, %table, "TRUNCATE of {table} is not turned into events: listeners are not told about the removed rows; add \"truncated\" to actions under the [[entity]] named {entity} to send a {entity}.Truncated event");
                            }
                        }
                        Truncation::NotEntity => {}
                    }
                }
            }
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if transactional && prefix == BACKFILL_PREFIX && self.tx.is_some() {
                    self.on_backfill_chunk(&content, lsn, stop).await?;
                } else if !transactional && self.tx.is_none() {
                    // A heartbeat outside any transaction needs no queue write: its position
                    // is safe to confirm once everything before it is durable.
                    self.idle_position = self.idle_position.max(lsn);
                }
            }
            Message::Origin { .. } | Message::Type { .. } => {}
        }
        Ok(())
    }

    /// A backfill chunk (`walhook backfill`) inside the open transaction: its rows become
    /// Snapshot events in the transaction's commit order, one ordinal per row. A chunk that
    /// cannot be read, is not genuine or names an entity this walhook does not capture is
    /// skipped with a warning; capture goes on.
    async fn on_backfill_chunk(
        &mut self,
        content: &[u8],
        lsn: Lsn,
        stop: &CancellationToken,
    ) -> Result<(), ServiceError> {
        let chunk: Chunk = match serde_json::from_slice(content) {
            Ok(c) => c,
            Err(e) => {
                warn!(%lsn, "a walhook.backfill message at {lsn} is not a backfill chunk ({e}); skipped");
                return Ok(());
            }
        };
        if !self.runs.genuine(&chunk, &self.source).await? {
            warn!(%lsn, run = chunk.run, "a walhook.backfill message at {lsn} names backfill {} without its token (not written by walhook backfill); skipped", chunk.run);
            return Ok(());
        }
        let Some(open) = self.tx.as_mut() else {
            return Ok(());
        };
        let first = open.seq;
        let rows = u32::try_from(chunk.rows.len()).unwrap_or(u32::MAX);
        open.seq = open.seq.saturating_add(rows);
        let ctx = open.ctx;
        let mapped = match self.mapper.map_snapshot(&ctx, first, &chunk) {
            Ok(m) => m,
            Err(e) => {
                warn!(%lsn, "{e}");
                return Ok(());
            }
        };
        drop(chunk);
        debug!(%lsn, rows, "backfill chunk");
        for m in mapped {
            match m {
                Mapped::Event(event) => {
                    let bytes = event.approx_bytes();
                    self.send_sized(bytes, |p| Item::Event(Box::new(event), p), stop)
                        .await?;
                }
                Mapped::Events(events) => {
                    let bytes = events.iter().map(|e| e.approx_bytes()).sum();
                    self.send_sized(bytes, |p| Item::Events(events, p), stop)
                        .await?;
                }
                Mapped::SetAside(change) => {
                    let bytes = change.approx_bytes();
                    self.send_sized(bytes, |p| Item::SetAside(Box::new(change), p), stop)
                        .await?;
                }
            }
            if self.stopping {
                break;
            }
        }
        Ok(())
    }

    /// Hands an item of about `bytes` to the writer, first taking that much of the capture
    /// buffer (all of it for an item larger than the buffer), waiting while the buffer or
    /// the writer's input is full; gives up when `stop` is cancelled meanwhile (nothing
    /// after it is then confirmed).
    async fn send_sized(
        &mut self,
        bytes: usize,
        item: impl FnOnce(OwnedSemaphorePermit) -> Item,
        stop: &CancellationToken,
    ) -> Result<(), ServiceError> {
        let n = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .min(self.budget_bytes);
        let permit = tokio::select! {
            permit = self.budget.clone().acquire_many_owned(n) => permit
                .map_err(|_| ServiceError::transient("the capture buffer was closed"))?,
            _ = stop.cancelled() => {
                self.stopping = true;
                return Ok(());
            }
        };
        self.send(item(permit), stop).await
    }

    /// Hands `item` to the writer, waiting while its input is full; gives up when `stop`
    /// is cancelled meanwhile (nothing after it is then confirmed).
    async fn send(&mut self, item: Item, stop: &CancellationToken) -> Result<(), ServiceError> {
        let Some(events) = self.events.as_ref() else {
            return Err(ServiceError::transient("the queue writer stopped"));
        };
        tokio::select! {
            sent = events.send(item) => sent.map_err(|_| ServiceError::transient("the queue writer stopped")),
            _ = stop.cancelled() => {
                self.stopping = true;
                Ok(())
            }
        }
    }
}

/// Whether two `[source]` sections differ at most in the password (in `password`,
/// `password_file` or the URL's userinfo).
fn same_but_password(a: &SourceConfig, b: &SourceConfig) -> bool {
    let strip = |s: &SourceConfig| SourceConfig {
        url: Secret::new(s.url_redacted.clone()),
        password: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}

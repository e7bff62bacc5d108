//! The reader: owns the replication stream, decodes and maps changes, hands them to the
//! writer, and alone talks back to the server (standby status updates).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::CaptureObserver;
use super::mapper::{Mapper, TxContext};
use super::session::SessionEnd;
use super::writer::Item;
use crate::config::Config;
use crate::db::connect_ordinary;
use crate::error::{ErrorClass, ServiceError};
use crate::replication::conn::{ConnectParams, ReplicationStream};
use crate::replication::pgoutput::{self, Message};
use crate::replication::protocol::ReplicationMessage;
use crate::types::Lsn;

pub(super) struct OpenTx {
    pub(super) ctx: TxContext,
    pub(super) seq: u32,
}

pub(super) struct Reader {
    pub(super) stream: ReplicationStream,
    pub(super) mapper: Mapper,
    pub(super) observe: Arc<dyn CaptureObserver>,
    pub(super) events: mpsc::Sender<Item>,
    pub(super) durable: watch::Receiver<Lsn>,
    pub(super) status_interval: Duration,
    pub(super) tx: Option<OpenTx>,
    /// End LSN of the last commit handed to the writer.
    pub(super) last_commit_sent: Lsn,
    /// Server position known to hold nothing for us (keepalive `wal_end` while idle).
    pub(super) idle_position: Lsn,
    pub(super) reported_flush: Lsn,
    pub(super) last_status: Instant,
    pub(super) warned_truncate: std::collections::HashSet<crate::types::Oid>,
    /// The configuration this session was built from.
    pub(super) config: Arc<Config>,
    /// Fan-out subscriptions for the writer, replaced on reload.
    pub(super) subscriptions: watch::Sender<Vec<crate::queue::Subscription>>,
    pub(super) params: ConnectParams,
}

impl Reader {
    pub(super) async fn run(
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
                self.observe.changes_read(1);
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

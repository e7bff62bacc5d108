//! The delivery side of `walhook.new`: claiming due notifications under a lease and
//! recording what their delivery attempts ended with, in batches.
//!
//! A notification lives in exactly one of `walhook.new`, `walhook.processed` and
//! `walhook.failed`; every move below is one statement (`WITH moved AS (DELETE … RETURNING
//! …) INSERT …`), and only rows still leased by this process are touched, so a process whose
//! lease expired cannot overwrite the work of the one that took the row over.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{AsyncMessage, Client, Row, Statement};
use uuid::Uuid;

use super::claims::{
    CLAIM_HEADS, CLAIM_NEXT, Claim, ClaimLimits, Cursor, EntityKey, SWEEP, run_claim,
};
use super::{Needs, QueueError, StoredEvent, db_error};
use crate::types::Lsn;

/// The channel the queue writer notifies (once per batch that created notifications).
pub const NEW_NOTIFICATIONS_CHANNEL: &str = "walhook_new";

/// The payload of a notification on [`NEW_NOTIFICATIONS_CHANNEL`] that says new events were
/// stored but no `walhook.new` rows made: only cursor listeners have something to read.
pub const EVENTS_PAYLOAD: &str = "events";

/// The payload of a notification on [`NEW_NOTIFICATIONS_CHANNEL`] that asks dispatchers to
/// sweep behind their cursors: rows there became claimable (leases released, `walhook
/// retry`). The writer's notifications have an empty payload: new rows after the cursors.
pub const SWEEP_PAYLOAD: &str = "sweep";

const LISTEN: &str = "LISTEN walhook_new";

/// Permission errors here mean the role may not use the schema.
const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

/// Delivery connections run only the statements below, whose good plans are index walks
/// and probes by id: the claim walks `walhook.new` in commit order and probes the
/// per-entity index; completions join a batch of ids to the primary key. With statistics
/// of an empty `walhook.new` (a fresh queue, before autovacuum analyzes it) the planner
/// may pick sequential scans instead, which makes each claim and each completion batch
/// cost a scan of the whole backlog: a claim took 20-30 s at 20,000 waiting notifications
/// in the delivery benchmark, and delivery fell to ~400 events/s.
/// JIT is off too: these are short OLTP statements, and compiling one (triggered by the
/// inflated costs of a stale plan) took 200 ms, longer than the claim itself.
/// Plans are generic: the claim statements are large (CTEs, a window, a union), and with
/// `plan_cache_mode = auto` PostgreSQL planned them anew on every execution, because their
/// custom plans looked cheaper; planning took 43% of the claiming backend's CPU during a
/// 100k drain. With the scans above turned off, the generic plans are the same index walks.
pub const SESSION_SETTINGS: &str = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
     SET enable_hashjoin = off; SET enable_mergejoin = off; SET jit = off; \
     SET plan_cache_mode = force_generic_plan";

// The completion statements find their rows with `id = ANY($1)` (an index scan of the
// primary key) and read each row's values from the other arrays at the id's position. A
// join against `unnest(...)` let the planner walk the whole of a small `walhook.new` and
// rescan the unnested arrays for every row (hash joins are off on these connections): 65 ms
// for 500 rows at a backlog of 10,000, against 10 ms at 1,000,000 (docs/benchmarks.md).

/// Moves delivered notifications to `walhook.processed`: $1 ids, $2 status codes, $3
/// latencies (ms), $4 lease holder.
pub const DELIVERED: &str = r#"WITH moved AS (
    DELETE FROM walhook.new n
    WHERE n.id = ANY($1::bigint[]) AND n.locked_by = $4::text
    RETURNING n.id, n.event_id, n.listener, n.entity, n.entity_id, n.commit_lsn, n.seq,
              n.attempts, n.created_at, array_position($1::bigint[], n.id) AS i
)
INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                               attempts, created_at, delivered_at, status_code, latency_ms)
SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts + 1, created_at,
       now(), ($2::int[])[i], ($3::int[])[i]
FROM moved"#;

/// Moves notifications given up on to `walhook.failed`: $1 ids, $2 status codes (NULL
/// without an answer), $3 comments, $4 lease holder.
pub const FAILED: &str = r#"WITH moved AS (
    DELETE FROM walhook.new n
    WHERE n.id = ANY($1::bigint[]) AND n.locked_by = $4::text
    RETURNING n.id, n.event_id, n.listener, n.entity, n.entity_id, n.commit_lsn, n.seq,
              n.attempts, n.created_at, array_position($1::bigint[], n.id) AS i
)
INSERT INTO walhook.failed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                            attempts, created_at, failed_at, last_status_code, comment)
SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts + 1, created_at,
       now(), ($2::int[])[i], ($3::text[])[i]
FROM moved"#;

/// Moves every pending notification to `walhook.failed` with comment $1 (attempts kept, no
/// attempt was made), e.g. when an operator adopts a copied database.
const DISCARD_PENDING: &str = r#"WITH moved AS (
    DELETE FROM walhook.new n
    RETURNING n.id, n.event_id, n.listener, n.entity, n.entity_id, n.commit_lsn, n.seq,
              n.attempts, n.created_at, n.last_status_code
)
INSERT INTO walhook.failed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                            attempts, created_at, failed_at, last_status_code, comment)
SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts, created_at,
       now(), last_status_code, $1::text
FROM moved"#;

/// Moves every pending notification to `walhook.failed` with `comment`, in one statement
/// (a notification lives in exactly one table); returns how many moved.
pub async fn discard_pending(
    client: &impl tokio_postgres::GenericClient,
    comment: &str,
) -> Result<u64, tokio_postgres::Error> {
    client.execute(DISCARD_PENDING, &[&comment]).await
}

/// Schedules another attempt and frees the lease: $1 ids, $2 status codes, $3 comments, $4
/// delays (ms), $5 lease holder.
pub const RETRY: &str = r#"UPDATE walhook.new n
SET attempts = n.attempts + 1,
    next_attempt_at = now()
        + ($4::float8[])[array_position($1::bigint[], n.id)] * interval '1 millisecond',
    last_attempt_at = now(),
    last_status_code = ($2::int[])[array_position($1::bigint[], n.id)],
    comment = ($3::text[])[array_position($1::bigint[], n.id)],
    locked_until = NULL,
    locked_by = NULL
WHERE n.id = ANY($1::bigint[]) AND n.locked_by = $5::text"#;

/// Frees the leases of notifications claimed but not attempted: $1 ids, $2 lease holder.
pub const RELEASE: &str = "UPDATE walhook.new SET locked_until = NULL, locked_by = NULL
WHERE id = ANY($1::bigint[]) AND locked_by = $2::text";

/// Frees every lease of holder $1: this process at shutdown. The released rows are behind
/// the other dispatchers' cursors: they are told to sweep.
const RELEASE_ALL: &str = "WITH released AS (
    UPDATE walhook.new SET locked_until = NULL, locked_by = NULL
    WHERE locked_by = $1::text
    RETURNING 1
)
SELECT count(*), (SELECT pg_notify('walhook_new', 'sweep') WHERE EXISTS (SELECT 1 FROM released))
FROM released";

/// Extends the leases of holder $3 on notifications $1 to $2 milliseconds from now;
/// returns the ids still held (the others were moved, or taken over after expiring).
pub const RENEW: &str =
    "UPDATE walhook.new SET locked_until = now() + $2::float8 * interval '1 millisecond'
WHERE id = ANY($1::bigint[]) AND locked_by = $3::text
RETURNING id";

/// A delivered notification, for [`Completions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveredRow {
    /// Notification id.
    pub id: i64,
    /// The 2xx status.
    pub status_code: Option<i32>,
    /// Request to end of answer, in milliseconds.
    pub latency_ms: i32,
}

/// A failed attempt, for [`Completions`]: retried later or given up on.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedAttemptRow {
    /// Notification id.
    pub id: i64,
    /// HTTP status, when an answer came.
    pub status_code: Option<i32>,
    /// The one-line comment a DBA reads.
    pub comment: String,
    /// Wait before the next attempt (ignored for notifications given up on).
    pub delay: Duration,
}

/// The outcomes of a batch of delivery attempts, recorded with one statement per kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Completions {
    /// Moved to `walhook.processed`.
    pub delivered: Vec<DeliveredRow>,
    /// Left in `walhook.new` for another attempt after their delay.
    pub retry: Vec<FailedAttemptRow>,
    /// Moved to `walhook.failed`.
    pub failed: Vec<FailedAttemptRow>,
    /// Claimed but never attempted: leases freed, nothing else changes.
    pub release: Vec<i64>,
}

impl Completions {
    /// Whether there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self.delivered.is_empty()
            && self.retry.is_empty()
            && self.failed.is_empty()
            && self.release.is_empty()
    }
}

/// Claims and completes notifications on its own connection, as one lease holder.
pub struct NotificationStore {
    client: Client,
    owner: String,
    claim_next: Statement,
    sweep: Statement,
    claim_heads: Statement,
    delivered: Statement,
    failed: Statement,
    retry: Statement,
    release: Statement,
    release_all: Statement,
    renew: Statement,
}

impl std::fmt::Debug for NotificationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationStore")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Called for every `NOTIFY walhook_new` the connection receives, with its payload.
pub type OnNewNotifications = Arc<dyn Fn(&str) + Send + Sync>;

impl NotificationStore {
    /// Connects (TLS, keepalives and timeouts as for every ordinary walhook connection),
    /// drives the connection in a background task and prepares the statements. With `on_new`, the
    /// connection also listens on [`NEW_NOTIFICATIONS_CHANNEL`] and calls it for every
    /// notification. `owner` names this process in `walhook.new.locked_by`.
    pub async fn connect(
        params: &crate::replication::conn::ConnectParams,
        owner: &str,
        on_new: Option<OnNewNotifications>,
    ) -> Result<NotificationStore, QueueError> {
        let (client, connection, _) = crate::db::connect_raw(params)
            .await
            .map_err(QueueError::connect)?;
        tokio::spawn(Driver {
            connection,
            on_new: on_new.clone(),
        });
        if on_new.is_some() {
            client
                .batch_execute(LISTEN)
                .await
                .map_err(db_error("listening for new notifications", None))?;
        }
        client
            .batch_execute(SESSION_SETTINGS)
            .await
            .map_err(db_error("setting up the delivery connection", None))?;
        Self::new(client, owner).await
    }

    /// Prepares the statements on `client`, whose connection the caller drives.
    pub async fn new(client: Client, owner: &str) -> Result<NotificationStore, QueueError> {
        let prepare = |sql: &'static str, what: &'static str| {
            let client = &client;
            async move { client.prepare(sql).await.map_err(db_error(what, USE)) }
        };
        let (claim_next, sweep, claim_heads) = tokio::try_join!(
            prepare(CLAIM_NEXT, "preparing the notification claim"),
            prepare(SWEEP, "preparing the notification sweep"),
            prepare(CLAIM_HEADS, "preparing the notification claim by entity"),
        )?;
        let (delivered, failed, retry, release, release_all, renew) = tokio::try_join!(
            prepare(DELIVERED, "preparing the move to walhook.processed"),
            prepare(FAILED, "preparing the move to walhook.failed"),
            prepare(RETRY, "preparing the retry update"),
            prepare(RELEASE, "preparing the lease release"),
            prepare(RELEASE_ALL, "preparing the lease release"),
            prepare(RENEW, "preparing the lease renewal"),
        )?;
        Ok(NotificationStore {
            client,
            owner: owner.to_owned(),
            claim_next,
            sweep,
            claim_heads,
            delivered,
            failed,
            retry,
            release,
            release_all,
            renew,
        })
    }

    /// The lease holder name written to `walhook.new.locked_by`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether the connection is gone (connect a new store).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Claims due notifications of `listener` after `cursor` in commit order, leased for
    /// `lease` (see [`CLAIM_NEXT`]); the caller moves its cursor to
    /// [`Claim::scanned_to`].
    pub async fn claim_next(
        &self,
        listener: &str,
        cursor: Cursor,
        limits: ClaimLimits,
        lease: Duration,
    ) -> Result<Claim, QueueError> {
        let lsn = PgLsn::from(cursor.commit_lsn.0);
        self.run(
            &self.claim_next,
            listener,
            limits,
            lease,
            [&lsn, &cursor.seq],
        )
        .await
        .map_err(db_error("claiming notifications from walhook.new", USE))
    }

    /// Claims due notifications of `listener` up to `cursor` from the head (see [`SWEEP`]).
    pub async fn sweep(
        &self,
        listener: &str,
        cursor: Cursor,
        limits: ClaimLimits,
        lease: Duration,
    ) -> Result<Claim, QueueError> {
        let lsn = PgLsn::from(cursor.commit_lsn.0);
        self.run(&self.sweep, listener, limits, lease, [&lsn, &cursor.seq])
            .await
            .map_err(db_error("sweeping walhook.new for due notifications", USE))
    }

    /// Claims the oldest notification of each of `entities` for `listener` when it is due
    /// (see [`CLAIM_HEADS`]).
    pub async fn claim_heads(
        &self,
        listener: &str,
        entities: &[EntityKey],
        limits: ClaimLimits,
        lease: Duration,
    ) -> Result<Claim, QueueError> {
        let names: Vec<&str> = entities.iter().map(|k| k.entity.as_str()).collect();
        let ids: Vec<&str> = entities.iter().map(|k| k.entity_id.as_str()).collect();
        self.run(&self.claim_heads, listener, limits, lease, [&names, &ids])
            .await
            .map_err(db_error("claiming notifications by entity", USE))
    }

    async fn run(
        &self,
        statement: &Statement,
        listener: &str,
        limits: ClaimLimits,
        lease: Duration,
        extra: [&(dyn tokio_postgres::types::ToSql + Sync); 2],
    ) -> Result<Claim, tokio_postgres::Error> {
        let lease_ms = lease.as_secs_f64() * 1000.0;
        run_claim(
            &self.client,
            statement,
            listener,
            limits,
            lease_ms,
            &self.owner,
            extra,
        )
        .await
    }

    /// Records a batch of outcomes: one statement per non-empty kind, pipelined on the
    /// connection. Each statement is atomic on its own; running a batch again after an
    /// error is harmless, because every statement touches only rows still leased here.
    pub async fn complete(&self, batch: &Completions) -> Result<(), QueueError> {
        tokio::try_join!(
            self.record_delivered(&batch.delivered),
            self.record_failed(&batch.failed),
            self.record_retry(&batch.retry),
            self.record_release(&batch.release),
        )?;
        Ok(())
    }

    async fn record_delivered(&self, rows: &[DeliveredRow]) -> Result<(), QueueError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|d| d.id).collect();
        let codes: Vec<Option<i32>> = rows.iter().map(|d| d.status_code).collect();
        let latency: Vec<i32> = rows.iter().map(|d| d.latency_ms).collect();
        self.client
            .execute(&self.delivered, &[&ids, &codes, &latency, &self.owner])
            .await
            .map_err(db_error(
                "moving delivered notifications to walhook.processed",
                USE,
            ))?;
        Ok(())
    }

    async fn record_failed(&self, rows: &[FailedAttemptRow]) -> Result<(), QueueError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|f| f.id).collect();
        let codes: Vec<Option<i32>> = rows.iter().map(|f| f.status_code).collect();
        let comments: Vec<&str> = rows.iter().map(|f| f.comment.as_str()).collect();
        self.client
            .execute(&self.failed, &[&ids, &codes, &comments, &self.owner])
            .await
            .map_err(db_error(
                "moving failed notifications to walhook.failed",
                USE,
            ))?;
        Ok(())
    }

    async fn record_retry(&self, rows: &[FailedAttemptRow]) -> Result<(), QueueError> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let codes: Vec<Option<i32>> = rows.iter().map(|r| r.status_code).collect();
        let comments: Vec<&str> = rows.iter().map(|r| r.comment.as_str()).collect();
        let delays: Vec<f64> = rows
            .iter()
            .map(|r| r.delay.as_secs_f64() * 1000.0)
            .collect();
        self.client
            .execute(
                &self.retry,
                &[&ids, &codes, &comments, &delays, &self.owner],
            )
            .await
            .map_err(db_error("scheduling retries in walhook.new", USE))?;
        Ok(())
    }

    async fn record_release(&self, ids: &[i64]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.client
            .execute(&self.release, &[&ids, &self.owner])
            .await
            .map_err(db_error("releasing leases in walhook.new", USE))?;
        Ok(())
    }

    /// Extends this holder's leases on `ids` to `lease` from now; returns the ids whose
    /// leases it still held (one primary-key probe per id).
    pub async fn renew(&self, ids: &[i64], lease: Duration) -> Result<Vec<i64>, QueueError> {
        let lease_ms = lease.as_secs_f64() * 1000.0;
        let rows = self
            .client
            .query(&self.renew, &[&ids, &lease_ms, &self.owner])
            .await
            .map_err(db_error("renewing leases in walhook.new", USE))?;
        rows.iter()
            .map(|r| r.try_get(0))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(db_error("renewing leases in walhook.new", USE))
    }

    /// Frees every lease this holder still has; returns how many.
    pub async fn release_all(&self) -> Result<u64, QueueError> {
        let released: i64 = self
            .client
            .query_one(&self.release_all, &[&self.owner])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(db_error("releasing leases in walhook.new", USE))?;
        Ok(u64::try_from(released).unwrap_or(0))
    }
}

/// The `walhook.event` columns (alias `e`) [`stored_event`] reads, in its order.
pub(crate) const STORED_EVENT_COLUMNS: &str = "e.event_id, e.commit_lsn, e.seq, e.commit_time, \
     e.entity, e.entity_id, e.action, e.changed_fields, e.\"row\", e.old, e.subject, e.source_table, \
     e.row_action";

/// Reads the [`STORED_EVENT_COLUMNS`] of `row`, starting at column `first`.
pub(crate) fn stored_event(row: &Row, first: usize) -> Result<StoredEvent, String> {
    let text = |e: tokio_postgres::Error| e.to_string();
    let commit_lsn: PgLsn = row.try_get(first + 1).map_err(text)?;
    let action: String = row.try_get(first + 6).map_err(text)?;
    let row_action: Option<String> = row.try_get(first + 12).map_err(text)?;
    let (action, derived) = super::model::read_action(action, row_action)?;
    Ok(StoredEvent {
        event_id: row.try_get::<_, Uuid>(first).map_err(text)?,
        commit_lsn: Lsn(u64::from(commit_lsn)),
        seq: row.try_get(first + 2).map_err(text)?,
        commit_time: row.try_get::<_, SystemTime>(first + 3).map_err(text)?,
        entity: row.try_get(first + 4).map_err(text)?,
        entity_id: row.try_get(first + 5).map_err(text)?,
        action,
        derived,
        changed_fields: row.try_get(first + 7).map_err(text)?,
        row: row.try_get::<_, Value>(first + 8).map_err(text)?,
        old: row.try_get::<_, Option<Value>>(first + 9).map_err(text)?,
        subject: row.try_get(first + 10).map_err(text)?,
        source_table: row.try_get(first + 11).map_err(text)?,
    })
}

/// Drives a tokio-postgres connection and passes on `NOTIFY walhook_new`.
struct Driver {
    connection: crate::db::PgConnection,
    on_new: Option<OnNewNotifications>,
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                    if let Some(f) = &self.on_new {
                        f(n.payload());
                    }
                }
                Poll::Ready(Some(Ok(_))) => {}
                // The client sees the closed connection on its next statement.
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "queue connection ended");
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

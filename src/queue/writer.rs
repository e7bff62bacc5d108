//! The batch writer: one transaction per batch of source commits stores the events, fans
//! them out to listeners and advances the flushed LSN.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;

use bytes::BytesMut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, Json, PgLsn, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Statement, Transaction};
use uuid::Uuid;

use super::rejected::{self, refusal, refuses_the_row};
use super::{Needs, QueueError, Session, db_error};
use crate::mapper::{EntityEvent, RejectedChange};
use crate::replication::pgoutput::PgTimestamp;
use crate::types::{Action, EntityName, Lsn};

/// Who receives which events: one listener's subscription.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    /// Listener name.
    pub listener: String,
    /// Entities it receives; `None` = all.
    pub entities: Option<Vec<EntityName>>,
    /// Row actions it receives.
    pub actions: Vec<Action>,
    /// Derived actions it receives, by name.
    pub derived_actions: Vec<String>,
    /// Only events whose row matches this (the old row for deletes) are for it.
    pub filter: Option<crate::condition::Condition>,
    /// Coalesce its changes to one entity (see `debounce`); `None`: one notification each.
    pub debounce: Option<crate::config::Debounce>,
    /// It keeps a cursor over `walhook.event` instead of getting `walhook.new` rows.
    pub cursor: bool,
}

/// Namespace of the uuid v5 event ids. Never change it: listeners deduplicate on the ids.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x3c1e_5b0a_8d4f_4e57_9a61_77a1_6c68_6f6b);

/// The stable id of an event: uuid v5 of `"{system_id}/{commit_lsn}/{seq}"`, so a change
/// re-sent after a restart gets the id it had before.
pub fn event_id(system_id: &str, commit_lsn: Lsn, seq: u32) -> Uuid {
    Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{system_id}/{commit_lsn}/{seq}").as_bytes(),
    )
}

/// The stable id of one of several events of a change: uuid v5 of
/// `"{system_id}/{commit_lsn}/{seq}/{variant}"` (a derived action's variant is its name); the
/// change's row event keeps [`event_id`].
pub fn variant_event_id(system_id: &str, commit_lsn: Lsn, seq: u32, variant: &str) -> Uuid {
    if variant.is_empty() {
        return event_id(system_id, commit_lsn, seq);
    }
    Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{system_id}/{commit_lsn}/{seq}/{variant}").as_bytes(),
    )
}

/// What one [`QueueWriter::write_batch`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Events newly stored in `walhook.event`.
    pub inserted: u64,
    /// Events skipped because their (commit_lsn, seq) was already stored (re-sent changes).
    pub already_present: u64,
    /// Rows created in `walhook.new` for the newly stored events.
    pub notifications: u64,
    /// Events the database refused by themselves, stored in `walhook.rejected` instead
    /// (see [`QueueWriter::take_refused`]).
    pub refused: u64,
}

/// Per-connection staging table the batch is copied into. Binary COPY into a temporary
/// table and one INSERT ... SELECT measured ~15% faster than binding the batch as arrays
/// to unnest (and ~20x faster than a statement per row); ON COMMIT DELETE ROWS empties it
/// for the next batch.
const CREATE_STAGE: &str = r#"CREATE TEMPORARY TABLE IF NOT EXISTS walhook_event_stage (
    event_id uuid, commit_lsn pg_lsn, seq int, xid bigint, commit_time timestamptz,
    entity text, entity_id text, action text, changed_fields text[], "row" jsonb, old jsonb,
    subject text, source_table text, variant text, row_action text, excluded_listeners text[]
) ON COMMIT DELETE ROWS"#;

const COPY_STAGE: &str = r#"COPY pg_temp.walhook_event_stage (event_id, commit_lsn, seq, xid,
    commit_time, entity, entity_id, action, changed_fields, "row", old, subject, source_table,
    variant, row_action, excluded_listeners)
FROM STDIN (FORMAT binary)"#;

/// Column types of [`COPY_STAGE`] and [`COPY_EVENT`], in order.
const STAGE_TYPES: [Type; 16] = [
    Type::UUID,
    Type::PG_LSN,
    Type::INT4,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::JSONB,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT_ARRAY,
];

/// Moves the staged batch into walhook.event and fans out to listeners. Only the events that
/// were really inserted (RETURNING) are fanned out, so a re-sent batch creates no duplicate
/// notifications. `payload_bytes` (for sizing claims) is the size of the values as inserted.
///
/// Fan-out: $1/$2/$3 are (listener, entity, actions) rows; a NULL entity subscribes to all
/// entities, and `actions` is the comma-separated list of actions the listener receives; an
/// event's `excluded_listeners` (see `route`) do not receive it.
pub const INSERT_EVENTS: &str = r#"WITH inserted AS (
    INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity, entity_id,
                               action, changed_fields, "row", old, subject, source_table,
                               variant, row_action, excluded_listeners)
    SELECT event_id, commit_lsn, seq, xid, commit_time, entity, entity_id, action,
           changed_fields, "row", old, subject, source_table, variant, row_action,
           excluded_listeners
    FROM pg_temp.walhook_event_stage
    ON CONFLICT (commit_lsn, seq, variant) DO NOTHING
    RETURNING id, entity, entity_id, commit_lsn, seq, action, excluded_listeners,
              pg_column_size("row") + coalesce(pg_column_size(old), 0) AS payload_bytes
), fanned_out AS (
    INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                             payload_bytes)
    SELECT nextval('walhook.notification_id_seq'), i.id, l.listener, i.entity, i.entity_id,
           i.commit_lsn, i.seq, i.payload_bytes
    FROM inserted i
    JOIN unnest($1::text[], $2::text[], $3::text[]) AS l(listener, entity, actions)
      ON (l.entity IS NULL OR l.entity = i.entity)
     AND i.action = ANY (string_to_array(l.actions, ','))
     AND (i.excluded_listeners IS NULL OR l.listener <> ALL (i.excluded_listeners))
    ORDER BY i.id, l.listener
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM fanned_out),
       -- Wakes the dispatchers (LISTEN walhook_new) once per batch, at commit.
       (SELECT pg_notify('walhook_new', '') WHERE EXISTS (SELECT 1 FROM fanned_out))"#;

/// Direct path: the batch is copied straight into walhook.event when every event in it is
/// newer than the newest stored one, so no staging table and no ON CONFLICT arbiter check
/// are needed (measured ~25% less server CPU per event). A unique violation means another
/// writer stored some of them meanwhile; the batch is then redone through the staged path.
const COPY_EVENT: &str = r#"COPY walhook.event (event_id, commit_lsn, seq, xid, commit_time,
    entity, entity_id, action, changed_fields, "row", old, subject, source_table, variant,
    row_action, excluded_listeners)
FROM STDIN (FORMAT binary)"#;

/// Fan-out of a batch copied by the direct path: the events with keys from ($1, $2) to
/// ($3, $4) that this transaction inserted (xmin; txid_current works on PostgreSQL 10+).
/// $5/$6/$7 are the listener rows as in [`INSERT_EVENTS`].
pub const FAN_OUT_COPIED: &str = r#"WITH fanned_out AS (
    INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                             payload_bytes)
    SELECT nextval('walhook.notification_id_seq'), e.id, l.listener, e.entity, e.entity_id,
           e.commit_lsn, e.seq, pg_column_size(e."row") + coalesce(pg_column_size(e.old), 0)
    FROM walhook.event e
    JOIN unnest($5::text[], $6::text[], $7::text[]) AS l(listener, entity, actions)
      ON (l.entity IS NULL OR l.entity = e.entity)
     AND e.action = ANY (string_to_array(l.actions, ','))
     AND (e.excluded_listeners IS NULL OR l.listener <> ALL (e.excluded_listeners))
    WHERE (e.commit_lsn, e.seq) >= ($1::pg_lsn, $2::int)
      AND (e.commit_lsn, e.seq) <= ($3::pg_lsn, $4::int)
      AND e.xmin::text::bigint = txid_current() % 4294967296
    ORDER BY e.id, l.listener
    RETURNING 1
)
SELECT (SELECT count(*) FROM fanned_out),
       -- Wakes the dispatchers (LISTEN walhook_new) once per batch, at commit.
       (SELECT pg_notify('walhook_new', '') WHERE EXISTS (SELECT 1 FROM fanned_out))"#;

/// Every writer of `walhook.event` rows a listener may receive holds this transaction-level
/// advisory lock ("walhook:e") from before it inserts until it commits, so ids are assigned
/// in commit order: a cursor listener that has seen id N will never find a smaller id
/// committed later (see `sql/0011_listener_cursor.sql`). One writer streams the slot; the
/// lock orders it against scheduled notifications and debounce flushes, at one round trip
/// per batch.
pub const EVENT_ORDER_LOCK: &str = "SELECT pg_advisory_xact_lock(8602275959056329573)";

/// Wakes cursor listeners at commit: new events, though maybe no `walhook.new` rows.
/// (The payload is [`super::EVENTS_PAYLOAD`].)
const WAKE_CURSORS: &str = "SELECT pg_notify('walhook_new', 'events')";

/// Starts a queue transaction that may insert events, holding [`EVENT_ORDER_LOCK`] (always:
/// a process whose configuration has no cursor listener still writes events that another
/// process's cursor listener reads), and first making the `cursors` rows the subscriptions
/// changed, so that they change together with the fan-out.
async fn begin<'c>(
    client: &'c mut Client,
    cursors: Option<&super::cursor::CursorRows>,
) -> Result<Transaction<'c>, QueueError> {
    let tx = client
        .transaction()
        .await
        .map_err(db_error("starting the queue transaction", None))?;
    tx.batch_execute(EVENT_ORDER_LOCK)
        .await
        .map_err(db_error("ordering event ids (advisory lock)", None))?;
    if let Some(rows) = cursors {
        super::cursor::sync_in(&tx, rows).await?;
    }
    Ok(tx)
}

/// The newest stored event key, read once per writer: an index-only backward scan.
const NEWEST_STORED: &str =
    "SELECT commit_lsn, seq FROM walhook.event ORDER BY commit_lsn DESC, seq DESC LIMIT 1";

/// An event's idempotency key in walhook.event: (commit_lsn, seq).
type Key = (Lsn, i32);

/// Advances the flushed LSN, never backwards (GREATEST ignores the NULL of a fresh row).
const ADVANCE_FLUSHED: &str = "INSERT INTO walhook.state AS s (id, flushed_lsn, updated_at)
VALUES (1, $1, now())
ON CONFLICT (id) DO UPDATE SET
    flushed_lsn = GREATEST(s.flushed_lsn, EXCLUDED.flushed_lsn),
    updated_at = now()";

/// Commits a batch's transaction with its set-aside changes and flushed LSN, waking cursor
/// listeners when it stored events (borrowing the writer field by field).
macro_rules! commit_batch {
    ($w:expr, $tx:expr, $flushed:expr, $set_aside:expr, $inserted:expr) => {
        commit_flushed(
            $tx,
            &$w.advance_flushed,
            $flushed,
            $set_aside,
            &$w.session,
            $w.has_cursors && $inserted > 0,
        )
        .await?
    };
}

/// Writes batches of entity events to the queue tables on its own connection.
pub struct QueueWriter {
    client: Client,
    system_id: String,
    session: Session,
    copy_stage: Statement,
    insert_events: Statement,
    copy_event: Statement,
    fan_out_copied: Statement,
    advance_flushed: Statement,
    /// The newest key known to be stored (`None`: the table was empty at start); batches
    /// entirely above it take the direct path.
    newest: Option<Key>,
    listener_names: Vec<String>,
    listener_entities: Vec<Option<String>>,
    listener_actions: Vec<String>,
    /// The subscriptions the listener rows were made from, for [`super::route`].
    subscriptions: Vec<Subscription>,
    /// Per event of the batch being written, the listeners it is not for.
    excluded: Vec<Option<Vec<String>>>,
    /// Listeners whose changes go to debounce windows instead of `walhook.new`.
    debounced: Vec<super::debounce::Debounced>,
    /// The events of the last batch that the database refused.
    refused: Vec<RejectedChange>,
    /// Whether some listener keeps a cursor over `walhook.event` (woken per batch).
    has_cursors: bool,
    /// The cursor rows the last committed batch made, and those the next batch makes (when
    /// the subscriptions changed them).
    applied_cursors: Option<super::cursor::CursorRows>,
    pending_cursors: Option<super::cursor::CursorRows>,
}

impl std::fmt::Debug for QueueWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueWriter")
            .field("system_id", &self.system_id)
            .field("listeners", &self.listener_names)
            .finish_non_exhaustive()
    }
}

impl QueueWriter {
    /// Prepares the writer's statements on `client`; `system_id` is the source's system
    /// identifier, part of every event id. The schema must be migrated first.
    pub async fn new(client: Client, system_id: &str) -> Result<Self, QueueError> {
        let session = Session::of(&client).await?;
        let use_schema = Some((Needs::Use, Some(&session)));
        client.batch_execute(CREATE_STAGE).await.map_err(db_error(
            "creating the staging table",
            Some((Needs::Temp, Some(&session))),
        ))?;
        let copy_stage = client
            .prepare(COPY_STAGE)
            .await
            .map_err(db_error("preparing the staging copy", use_schema))?;
        let insert_events = client
            .prepare(INSERT_EVENTS)
            .await
            .map_err(db_error("preparing the event insert", use_schema))?;
        let advance_flushed = client
            .prepare(ADVANCE_FLUSHED)
            .await
            .map_err(db_error("preparing the flushed LSN update", use_schema))?;
        let copy_event = client
            .prepare(COPY_EVENT)
            .await
            .map_err(db_error("preparing the event copy", use_schema))?;
        let fan_out_copied = client
            .prepare(FAN_OUT_COPIED)
            .await
            .map_err(db_error("preparing the fan-out", use_schema))?;
        const NEWEST: &str = "reading the newest stored event";
        let newest = match client
            .query_opt(NEWEST_STORED, &[])
            .await
            .map_err(db_error(NEWEST, use_schema))?
        {
            Some(row) => {
                let lsn: PgLsn = row.try_get(0).map_err(db_error(NEWEST, None))?;
                let seq: i32 = row.try_get(1).map_err(db_error(NEWEST, None))?;
                Some((Lsn(u64::from(lsn)), seq))
            }
            None => None,
        };
        Ok(QueueWriter {
            client,
            system_id: system_id.to_owned(),
            session,
            copy_stage,
            insert_events,
            copy_event,
            fan_out_copied,
            advance_flushed,
            newest,
            listener_names: Vec::new(),
            listener_entities: Vec::new(),
            listener_actions: Vec::new(),
            subscriptions: Vec::new(),
            excluded: Vec::new(),
            debounced: Vec::new(),
            refused: Vec::new(),
            has_cursors: false,
            applied_cursors: None,
            pending_cursors: None,
        })
    }

    /// Sets who receives newly written events: each listener by name with the entities it
    /// subscribes to (`None` = all), for every action. With no listeners nothing is written
    /// to `walhook.new`.
    pub fn set_listeners(&mut self, listeners: Vec<(String, Option<Vec<EntityName>>)>) {
        self.set_subscriptions(
            listeners
                .into_iter()
                .map(|(name, entities)| Subscription {
                    listener: name,
                    entities,
                    actions: Action::ALL.to_vec(),
                    derived_actions: Vec::new(),
                    filter: None,
                    debounce: None,
                    cursor: false,
                })
                .collect(),
        );
    }

    /// Sets who receives newly written events, with per-listener action filters.
    pub fn set_subscriptions(&mut self, subscriptions: Vec<Subscription>) {
        let mut rows: BTreeMap<(String, Option<String>), String> = BTreeMap::new();
        self.debounced.clear();
        self.has_cursors = subscriptions.iter().any(|s| s.cursor);
        let cursors = super::cursor::CursorRows::of(&subscriptions);
        self.pending_cursors = (self.applied_cursors.as_ref() != Some(&cursors)).then_some(cursors);
        for sub in &subscriptions {
            // Routing (excluded_listeners) still considers it; its cursor reads the events.
            if sub.cursor {
                continue;
            }
            if let Some(cfg) = sub.debounce {
                self.debounced.push(super::debounce::Debounced {
                    sub: sub.clone(),
                    cfg,
                });
                continue;
            }
            let actions = sub
                .actions
                .iter()
                .map(|a| a.as_str())
                .chain(sub.derived_actions.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(",");
            match &sub.entities {
                None => {
                    rows.insert((sub.listener.clone(), None), actions);
                }
                Some(entities) => {
                    for entity in entities {
                        rows.insert(
                            (sub.listener.clone(), Some(entity.as_str().to_owned())),
                            actions.clone(),
                        );
                    }
                }
            }
        }
        // A listener subscribed to all entities must not get a second row per entity.
        let all: BTreeSet<String> = rows
            .keys()
            .filter(|(_, e)| e.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        rows.retain(|(n, e), _| e.is_none() || !all.contains(n));
        self.listener_names.clear();
        self.listener_entities.clear();
        self.listener_actions.clear();
        for ((name, entity), actions) in rows {
            self.listener_names.push(name);
            self.listener_entities.push(entity);
            self.listener_actions.push(actions);
        }
        self.subscriptions = subscriptions;
    }

    /// Makes the cursor rows match the subscriptions now, in a transaction of its own under
    /// the event-order lock (otherwise the next batch does it): at start, so a cursor
    /// listener's row exists before any event, and after a reload.
    pub async fn sync_cursors(&mut self) -> Result<(), QueueError> {
        let Some(rows) = &self.pending_cursors else {
            return Ok(());
        };
        let tx = begin(&mut self.client, Some(rows)).await?;
        tx.commit()
            .await
            .map_err(db_error("committing the listener cursors", None))?;
        self.applied_cursors = self.pending_cursors.take();
        Ok(())
    }

    /// Whether the connection is gone (the caller should reconnect and build a new writer).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Stores `events` in one transaction, skipping those already stored (same commit_lsn
    /// and seq), fans the new ones out to the listeners, and advances
    /// `walhook.state.flushed_lsn` to `flushed` (never backwards) in the same transaction.
    /// Only after this returns Ok may `flushed` be confirmed to the server.
    pub async fn write_batch(
        &mut self,
        events: &[EntityEvent],
        flushed: Option<Lsn>,
    ) -> Result<WriteOutcome, QueueError> {
        self.write_batch_with(events, &[], flushed).await
    }

    /// [`Self::write_batch`], also storing `set_aside` in `walhook.rejected`. An event the
    /// database refuses by itself (json that jsonb rejects, a value over a size limit) does
    /// not fail the batch: it is stored in `walhook.rejected` with the server's reason, the
    /// others are stored in order, and [`Self::take_refused`] returns it.
    pub async fn write_batch_with(
        &mut self,
        events: &[EntityEvent],
        set_aside: &[RejectedChange],
        flushed: Option<Lsn>,
    ) -> Result<WriteOutcome, QueueError> {
        self.refused.clear();
        self.excluded = super::route::exclusions(&self.subscriptions, events);
        let keys = BatchKeys::of(events)?;
        let empty = BatchKeys::EMPTY;
        let written = match &keys {
            Some(k) if self.newest.is_none_or(|newest| k.first > newest) => {
                match self.write_direct(events, set_aside, flushed, k).await {
                    Ok(Some(outcome)) => Ok(outcome),
                    // Another writer stored some of these events meanwhile.
                    Ok(None) => self.write_staged(events, set_aside, flushed, k).await,
                    Err(e) => Err(e),
                }
            }
            Some(k) => self.write_staged(events, set_aside, flushed, k).await,
            None => {
                self.write_staged(events, set_aside, flushed, &BatchKeys::EMPTY)
                    .await
            }
        };
        let outcome = match written {
            Ok(outcome) => outcome,
            Err(QueueError::Database { source, .. }) if refuses_the_row(&source) => {
                let keys = keys.as_ref().unwrap_or(&empty);
                self.write_isolating(events, set_aside, flushed, keys)
                    .await?
            }
            Err(e) => return Err(e),
        };
        if let Some(rows) = self.pending_cursors.take() {
            self.applied_cursors = Some(rows);
        }
        if let Some(k) = keys {
            self.newest = self.newest.max(Some(k.last));
        }
        Ok(outcome)
    }

    /// The events the database refused in the last batch (stored in `walhook.rejected`).
    pub fn take_refused(&mut self) -> Vec<RejectedChange> {
        std::mem::take(&mut self.refused)
    }

    /// After a batch failed on one row: the same batch again, each event in a savepoint, so
    /// the refused ones are set aside and the others stored, in order, in one transaction.
    async fn write_isolating(
        &mut self,
        events: &[EntityEvent],
        set_aside: &[RejectedChange],
        flushed: Option<Lsn>,
        keys: &BatchKeys,
    ) -> Result<WriteOutcome, QueueError> {
        const CONTEXT: &str = "copying one event to the staging table";
        let tx = begin(&mut self.client, self.pending_cursors.as_ref()).await?;
        let tx_ref = &tx;
        let savepoint = |sql: &'static str| async move {
            tx_ref
                .batch_execute(sql)
                .await
                .map_err(db_error("isolating a refused event", None))
        };
        let mut refused = Vec::new();
        for (i, (e, seq)) in events.iter().zip(&keys.seqs).enumerate() {
            savepoint("SAVEPOINT walhook_event").await?;
            let one = std::slice::from_ref(e);
            let excluded = self.excluded.get(i..=i).unwrap_or_default();
            match copy_events(
                &tx,
                &self.copy_stage,
                &self.system_id,
                one,
                &[*seq],
                excluded,
            )
            .await
            {
                Ok(()) => savepoint("RELEASE SAVEPOINT walhook_event").await?,
                Err(err) if refuses_the_row(&err) => {
                    savepoint("ROLLBACK TO SAVEPOINT walhook_event").await?;
                    let (reason, sqlstate) = refusal(&err);
                    refused.push(RejectedChange::of_event(e, reason, sqlstate));
                }
                Err(err) => return Err(db_error(CONTEXT, None)(err)),
            }
        }
        let mut outcome = insert_staged(&tx, &staged_insert!(self), events.len()).await?;
        debounce_batch!(self, &tx, events, keys);
        outcome.refused = refused.len() as u64;
        outcome.already_present = outcome.already_present.saturating_sub(outcome.refused);
        rejected::insert(&tx, &refused).await?;
        commit_batch!(self, tx, flushed, set_aside, outcome.inserted);
        self.refused = refused;
        Ok(outcome)
    }

    /// The direct path (see [`COPY_EVENT`]); `Ok(None)` when a unique violation showed that
    /// some events were already stored, after rolling back.
    async fn write_direct(
        &mut self,
        events: &[EntityEvent],
        set_aside: &[RejectedChange],
        flushed: Option<Lsn>,
        keys: &BatchKeys,
    ) -> Result<Option<WriteOutcome>, QueueError> {
        const COPY: &str = "copying events to walhook.event";
        let use_schema = Some((Needs::Use, Some(&self.session)));
        let tx = begin(&mut self.client, self.pending_cursors.as_ref()).await?;
        let copied = copy_events(
            &tx,
            &self.copy_event,
            &self.system_id,
            events,
            &keys.seqs,
            &self.excluded,
        );
        match copied.await {
            Ok(()) => {}
            // Dropping `tx` rolls back.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(None),
            Err(e) => return Err(db_error(COPY, use_schema)(e)),
        }
        let mut outcome = WriteOutcome {
            inserted: events.len() as u64,
            ..WriteOutcome::default()
        };
        if !self.listener_names.is_empty() {
            let row = tx
                .query_one(
                    &self.fan_out_copied,
                    &[
                        &PgLsn::from(keys.first.0.0),
                        &keys.first.1,
                        &PgLsn::from(keys.last.0.0),
                        &keys.last.1,
                        &self.listener_names,
                        &self.listener_entities,
                        &self.listener_actions,
                    ],
                )
                .await
                .map_err(db_error("fanning out events to walhook.new", use_schema))?;
            let n: i64 = row
                .try_get(0)
                .map_err(db_error("reading the fan-out count", None))?;
            outcome.notifications = u64::try_from(n).unwrap_or(0);
        }
        debounce_batch!(self, &tx, events, keys);
        commit_batch!(self, tx, flushed, set_aside, outcome.inserted);
        Ok(Some(outcome))
    }

    /// The staged path: COPY into the staging table, then INSERT ... ON CONFLICT DO NOTHING,
    /// for batches that may hold events already stored (re-sent after a restart).
    async fn write_staged(
        &mut self,
        events: &[EntityEvent],
        set_aside: &[RejectedChange],
        flushed: Option<Lsn>,
        keys: &BatchKeys,
    ) -> Result<WriteOutcome, QueueError> {
        let tx = begin(&mut self.client, self.pending_cursors.as_ref()).await?;
        let mut outcome = WriteOutcome::default();
        if !events.is_empty() {
            copy_events(
                &tx,
                &self.copy_stage,
                &self.system_id,
                events,
                &keys.seqs,
                &self.excluded,
            )
            .await
            .map_err(db_error("copying events to the staging table", None))?;
            outcome = insert_staged(&tx, &staged_insert!(self), events.len()).await?;
            debounce_batch!(self, &tx, events, keys);
        }
        commit_batch!(self, tx, flushed, set_aside, outcome.inserted);
        Ok(outcome)
    }
}

/// Merges the batch's new events into the debounce windows of debounced listeners, in the
/// batch's transaction (borrowing the writer field by field, like [`staged_insert`]).
macro_rules! debounce_batch {
    ($w:expr, $tx:expr, $events:expr, $keys:expr) => {
        if !$w.debounced.is_empty() && !$events.is_empty() {
            super::debounce::fan_out(
                $tx,
                &$w.debounced,
                $events,
                &$w.excluded,
                ($keys.first, $keys.last),
                &$w.system_id,
            )
            .await?;
        }
    };
}
use debounce_batch;

/// What [`insert_staged`] needs from a writer, borrowed field by field so that it can be
/// taken while a transaction holds the writer's client.
macro_rules! staged_insert {
    ($w:expr) => {
        StagedInsert {
            statement: &$w.insert_events,
            names: &$w.listener_names,
            entities: &$w.listener_entities,
            actions: &$w.listener_actions,
            session: &$w.session,
        }
    };
}
use staged_insert;

/// The event insert and the listener rows it fans out to.
struct StagedInsert<'a> {
    statement: &'a Statement,
    names: &'a [String],
    entities: &'a [Option<String>],
    actions: &'a [String],
    session: &'a Session,
}

/// Moves the `staged` events in the staging table to walhook.event (skipping those already
/// stored) and fans the new ones out.
async fn insert_staged(
    tx: &Transaction<'_>,
    insert: &StagedInsert<'_>,
    staged: usize,
) -> Result<WriteOutcome, QueueError> {
    let use_schema = Some((Needs::Use, Some(insert.session)));
    let row = tx
        .query_one(
            insert.statement,
            &[&insert.names, &insert.entities, &insert.actions],
        )
        .await
        .map_err(db_error("writing events to walhook.event", use_schema))?;
    let count = |i: usize| -> Result<u64, QueueError> {
        let n: i64 = row
            .try_get(i)
            .map_err(db_error("reading the insert count", None))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let inserted = count(0)?;
    Ok(WriteOutcome {
        inserted,
        notifications: count(1)?,
        already_present: (staged as u64).saturating_sub(inserted),
        refused: 0,
    })
}

/// Stores the batch's set-aside changes, advances `walhook.state.flushed_lsn` to `flushed`
/// (when given) through `advance_flushed` in the batch's transaction, then commits it.
async fn commit_flushed(
    tx: Transaction<'_>,
    advance_flushed: &Statement,
    flushed: Option<Lsn>,
    set_aside: &[RejectedChange],
    session: &Session,
    wake_cursors: bool,
) -> Result<(), QueueError> {
    rejected::insert(&tx, set_aside).await?;
    if wake_cursors {
        tx.batch_execute(WAKE_CURSORS)
            .await
            .map_err(db_error("waking cursor listeners", None))?;
    }
    if let Some(lsn) = flushed {
        tx.execute(advance_flushed, &[&PgLsn::from(lsn.0)])
            .await
            .map_err(db_error(
                "advancing walhook.state.flushed_lsn",
                Some((Needs::Use, Some(session))),
            ))?;
    }
    tx.commit()
        .await
        .map_err(db_error("committing the queue transaction", None))
}

/// The keys of a batch: each event's seq as stored, and the lowest and highest key.
struct BatchKeys {
    seqs: Vec<i32>,
    first: Key,
    last: Key,
}

impl BatchKeys {
    const EMPTY: BatchKeys = BatchKeys {
        seqs: Vec::new(),
        first: (Lsn::ZERO, 0),
        last: (Lsn::ZERO, 0),
    };

    /// `None` for an empty batch; an error when a seq does not fit walhook.event.seq.
    fn of(events: &[EntityEvent]) -> Result<Option<BatchKeys>, QueueError> {
        let mut keys: Option<BatchKeys> = None;
        for e in events {
            let seq = i32::try_from(e.seq).map_err(|_| QueueError::Unstorable {
                detail: format!(
                    "change {} of the transaction committed at {} exceeds the int range of walhook.event.seq",
                    e.seq, e.commit_lsn
                ),
            })?;
            let key = (e.commit_lsn, seq);
            match keys.as_mut() {
                None => {
                    let mut seqs = Vec::with_capacity(events.len());
                    seqs.push(seq);
                    keys = Some(BatchKeys {
                        seqs,
                        first: key,
                        last: key,
                    });
                }
                Some(k) => {
                    k.seqs.push(seq);
                    k.first = k.first.min(key);
                    k.last = k.last.max(key);
                }
            }
        }
        Ok(keys)
    }
}

/// Copies `events` in binary form through `statement` (a COPY of the 16 event columns);
/// `seqs` are their seq values as stored, `excluded` the listeners each is not for.
/// Dropping the writer on an error aborts the COPY.
async fn copy_events(
    tx: &Transaction<'_>,
    statement: &Statement,
    system_id: &str,
    events: &[EntityEvent],
    seqs: &[i32],
    excluded: &[Option<Vec<String>>],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(statement).await?;
    let mut copy = std::pin::pin!(BinaryCopyInWriter::new(sink, &STAGE_TYPES));
    let none = None;
    for (i, (e, seq)) in events.iter().zip(seqs).enumerate() {
        let variant = e.variant_key();
        let row_action = e.derived.as_ref().map(|_| e.action.as_str());
        let row: [&(dyn ToSql + Sync); 16] = [
            &variant_event_id(system_id, e.commit_lsn, e.seq, variant),
            &PgLsn::from(e.commit_lsn.0),
            seq,
            &i64::from(e.xid.0),
            &TimestampTz(e.commit_time),
            &e.entity.as_str(),
            &e.entity_id,
            &e.action_name(),
            &e.changed_fields,
            &Json(&e.row),
            &e.old.as_ref().map(Json),
            &e.subject,
            &e.table.to_string(),
            &variant,
            &row_action,
            excluded.get(i).unwrap_or(&none),
        ];
        copy.as_mut().write(&row).await?;
    }
    copy.as_mut().finish().await?;
    Ok(())
}

/// A PostgreSQL timestamp bound as is: the wire value is already microseconds since
/// 2000-01-01, so no conversion can lose precision or overflow.
#[derive(Clone, Copy, Debug)]
pub(super) struct TimestampTz(pub(super) PgTimestamp);

impl ToSql for TimestampTz {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        postgres_protocol::types::timestamp_to_sql(self.0.0, out);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_deterministic_and_distinguishes_every_part() {
        let a = event_id("7000000000000000001", Lsn(0x16_B374_D848), 3);
        assert_eq!(a, event_id("7000000000000000001", Lsn(0x16_B374_D848), 3));
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(a, event_id("7000000000000000002", Lsn(0x16_B374_D848), 3));
        assert_ne!(a, event_id("7000000000000000001", Lsn(0x16_B374_D849), 3));
        assert_ne!(a, event_id("7000000000000000001", Lsn(0x16_B374_D848), 4));
    }

    #[test]
    fn event_id_hashes_the_documented_name() {
        let expected = Uuid::new_v5(&EVENT_ID_NAMESPACE, b"sys/16/B374D848/3");
        assert_eq!(event_id("sys", Lsn(0x16_B374_D848), 3), expected);
    }
}

//! Positions of cursor listeners (`sql/0011_listener_cursor.sql`): a listener with
//! `position = "cursor"` gets no `walhook.new` row per event. It reads `walhook.event` after
//! its cursor, in id order (= commit order, see [`super::writer::EVENT_ORDER_LOCK`]), and
//! moves the cursor past what it has published, writing `walhook.failed` rows for what the
//! peer refused for good, in one transaction.
//!
//! One process at a time moves a listener's cursor: it holds a session advisory lock on the
//! connection it reads and writes with, which the server frees when that process dies.

use tokio_postgres::{Client, Statement, Transaction};

use super::notifications::{STORED_EVENT_COLUMNS, stored_event};
use super::{Needs, QueueError, StoredEvent, Subscription, db_error};
use crate::config::ListenerConfig;

/// Permission errors here mean the role may not use the schema.
const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

/// Whether event `e` is for cursor listener `c`: the fan-out's rule (entity, action, the
/// event's excluded listeners) for a `walhook.listener_cursor` row. Coalesced events of
/// debounced listeners (`variant` 'debounce/…') are only ever theirs.
macro_rules! cursor_receives {
    () => {
        "(c.entities IS NULL OR e.entity = ANY (c.entities)) \
         AND e.action = ANY (c.actions) \
         AND (e.excluded_listeners IS NULL OR c.listener <> ALL (e.excluded_listeners)) \
         AND e.variant NOT LIKE 'debounce/%'"
    };
}

/// Each cursor listener's backlog: (listener, events after its cursor, oldest queued_at).
macro_rules! cursor_backlog {
    () => {
        concat!(
            "SELECT c.listener, count(e.id) AS backlog, min(e.queued_at) AS oldest \
             FROM walhook.listener_cursor c \
             LEFT JOIN walhook.event e ON e.id > c.event_id AND ",
            $crate::queue::cursor_receives!(),
            " GROUP BY c.listener"
        )
    };
}
pub(crate) use {cursor_backlog, cursor_receives};

/// Creates or updates cursor rows ($1 listener, $2 comma-separated entities or NULL, $3
/// comma-separated actions). A new cursor starts after the newest event: a listener gets
/// the events stored from then on, as a fan-out would give it.
const UPSERT: &str = "INSERT INTO walhook.listener_cursor AS c (listener, event_id, entities, actions)
SELECT l.listener, (SELECT coalesce(max(id), 0) FROM walhook.event),
       string_to_array(l.entities, ','), string_to_array(l.actions, ',')
FROM unnest($1::text[], $2::text[], $3::text[]) AS l(listener, entities, actions)
ON CONFLICT (listener) DO UPDATE SET
    entities = EXCLUDED.entities, actions = EXCLUDED.actions,
    updated_at = CASE WHEN (c.entities, c.actions) IS DISTINCT FROM (EXCLUDED.entities, EXCLUDED.actions)
                      THEN now() ELSE c.updated_at END";

/// Drops the cursors of listeners that no longer keep one ($1: the cursor listeners). One
/// still configured ($2: every listener) with `position = "queue"` now gets its backlog as
/// `walhook.new` rows, so switching back loses nothing; a removed listener's backlog goes.
const DROP: &str = concat!(
    "WITH dropped AS (
    DELETE FROM walhook.listener_cursor c WHERE c.listener <> ALL ($1::text[])
    RETURNING c.*
), handed_over AS (
    INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                             payload_bytes)
    SELECT nextval('walhook.notification_id_seq'), e.id, c.listener, e.entity, e.entity_id,
           e.commit_lsn, e.seq, pg_column_size(e.\"row\") + coalesce(pg_column_size(e.old), 0)
    FROM dropped c JOIN walhook.event e ON e.id > c.event_id AND ",
    cursor_receives!(),
    "
    WHERE c.listener = ANY ($2::text[])
    ORDER BY e.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM handed_over)"
);

/// The cursor rows a set of subscriptions asks for, as [`UPSERT`] and [`DROP`] take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CursorRows {
    names: Vec<String>,
    entities: Vec<Option<String>>,
    actions: Vec<String>,
    /// Every listener, cursor or not.
    all: Vec<String>,
}

impl CursorRows {
    /// The rows of the cursor listeners among `subs`.
    pub(crate) fn of(subs: &[Subscription]) -> CursorRows {
        let cursors = || subs.iter().filter(|s| s.cursor);
        CursorRows {
            names: cursors().map(|s| s.listener.clone()).collect(),
            entities: cursors()
                .map(|s| {
                    s.entities
                        .as_ref()
                        .map(|es| es.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(","))
                })
                .collect(),
            actions: cursors()
                .map(|s| {
                    s.actions
                        .iter()
                        .map(|a| a.as_str())
                        .chain(s.derived_actions.iter().map(String::as_str))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect(),
            all: subs.iter().map(|s| s.listener.clone()).collect(),
        }
    }
}

/// Makes the cursor rows match `rows`, in the batch writer's transaction (after the
/// event-order lock, before its events): the fan-out change and the cursor change commit
/// together, so a listener switched between positions misses no event and gets none twice.
pub(super) async fn sync_in(tx: &Transaction<'_>, rows: &CursorRows) -> Result<(), QueueError> {
    const CONTEXT: &str = "writing listener cursors to walhook.listener_cursor";
    if !rows.names.is_empty() {
        tx.execute(UPSERT, &[&rows.names, &rows.entities, &rows.actions])
            .await
            .map_err(db_error(CONTEXT, USE))?;
    }
    let handed: i64 = tx
        .query_one(DROP, &[&rows.names, &rows.all])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(CONTEXT, USE))?;
    if handed > 0 {
        tracing::info!(
            notifications = handed,
            "listeners switched to position = \"queue\" got their backlog as walhook.new rows"
        );
    }
    Ok(())
}

/// The session lock a process holds while it moves one listener's cursor ("whcu", and
/// the row's own key: no two listeners share one). No row: the writer has not created the
/// cursor yet.
const OWN: &str = "SELECT pg_try_advisory_lock(2003329909, lock_key)
FROM walhook.listener_cursor WHERE listener = $1";

/// Most ids one read looks through: a listener that receives few of many events moves on
/// in bounded steps instead of scanning the whole backlog in one statement.
const READ_SPAN: i64 = 200_000;

const POSITION: &str = "SELECT event_id FROM walhook.listener_cursor WHERE listener = $1";

/// The newest event id; every smaller id is committed (or never will be) by then.
const NEWEST: &str = "SELECT coalesce(max(id), 0) FROM walhook.event";

/// Moves the cursor forward (never back) and writes the failed events' `walhook.failed`
/// rows: $2 the new position, $3..$6 per failed event its id, attempts, status code and
/// comment.
const ADVANCE: &str = "WITH failed AS (
    INSERT INTO walhook.failed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                                attempts, created_at, failed_at, last_status_code, comment)
    SELECT nextval('walhook.notification_id_seq'), e.id, $1, e.entity, e.entity_id,
           e.commit_lsn, e.seq, f.attempts, e.queued_at, now(), f.code, f.comment
    FROM unnest($3::bigint[], $4::int[], $5::int[], $6::text[])
         WITH ORDINALITY AS f(event_id, attempts, code, comment, n)
    JOIN walhook.event e ON e.id = f.event_id
    -- A cursor dropped meanwhile (switched to the queue) handed its events over already.
    WHERE EXISTS (SELECT 1 FROM walhook.listener_cursor c WHERE c.listener = $1)
    ORDER BY f.n
    RETURNING id, event_id
), moved AS (
    UPDATE walhook.listener_cursor
    SET event_id = $2, updated_at = now(), held_event_id = NULL, last_attempt_at = NULL,
        last_status_code = NULL, comment = NULL
    WHERE listener = $1 AND event_id < $2
    RETURNING 1
)
SELECT id, event_id FROM failed";

/// Why the cursor is held: $2 the event it is held at, $3 status code, $4 comment.
const NOTE_HOLD: &str = "UPDATE walhook.listener_cursor
SET held_event_id = $2, last_attempt_at = now(), last_status_code = $3, comment = $4
WHERE listener = $1";

/// A read of the events after a position.
#[derive(Debug)]
pub struct CursorRead {
    /// The events, in id order: (walhook.event id, the event or why it cannot be read).
    pub events: Vec<(i64, Result<StoredEvent, String>)>,
    /// How far the read looked: the cursor may move here once every event is passed
    /// (further than the last event when the listener receives none of those after it).
    pub scanned_to: i64,
    /// The read stopped at a limit (events, bytes or span): more events follow it.
    pub more: bool,
}

/// One event the peer refused for good.
#[derive(Clone, Debug)]
pub struct FailedEvent {
    /// Its walhook.event id.
    pub event_id: i64,
    /// Attempts made.
    pub attempts: i32,
    /// The peer's status code, if its transport has one.
    pub status_code: Option<i32>,
    /// Why, in plain words.
    pub comment: String,
}

/// One cursor listener's connection: its lock, reads and moves.
pub struct CursorStore {
    client: Client,
    listener: String,
    read: Statement,
    advance: Statement,
}

impl std::fmt::Debug for CursorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorStore")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl CursorStore {
    /// Connects for `listener` and prepares the reads.
    pub async fn connect(
        params: &crate::replication::conn::ConnectParams,
        listener: &ListenerConfig,
    ) -> Result<CursorStore, QueueError> {
        let client = crate::db::connect(params)
            .await
            .map_err(QueueError::connect)?;
        // The delivery connections' settings: with the read's range estimated small, the
        // planner chose a bitmap scan of the whole range and a sort of every row in it, wide
        // values included, for each read of 2,000; with a 200k backlog after the cursor that
        // backend used a fifth of the machine. The pkey walk in id order stops at the limit.
        client
            .batch_execute(super::notifications::SESSION_SETTINGS)
            .await
            .map_err(db_error("setting up the cursor connection", None))?;
        let read = client
            .prepare(&read_sql())
            .await
            .map_err(db_error("preparing the cursor read", USE))?;
        let advance = client
            .prepare(ADVANCE)
            .await
            .map_err(db_error("preparing the cursor move", USE))?;
        Ok(CursorStore {
            client,
            listener: listener.name.clone(),
            read,
            advance,
        })
    }

    /// Whether the connection is gone (connect a new store).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Takes the listener's lock if no other process holds it (kept until the connection
    /// closes); false while another does, or while its cursor row does not exist yet.
    pub async fn try_own(&self) -> Result<bool, QueueError> {
        let row = self
            .client
            .query_opt(OWN, &[&self.listener])
            .await
            .map_err(db_error("locking the listener's cursor", USE))?;
        match row {
            Some(row) => row
                .try_get(0)
                .map_err(db_error("locking the listener's cursor", None)),
            None => Ok(false),
        }
    }

    /// The stored position.
    pub async fn position(&self) -> Result<i64, QueueError> {
        self.client
            .query_one(POSITION, &[&self.listener])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db_error("reading the listener's cursor", USE))
    }

    /// The events after `after` (at most `limit` events and about `max_bytes` of stored
    /// values; the first event always).
    pub async fn read(
        &self,
        after: i64,
        limit: i64,
        max_bytes: i64,
    ) -> Result<CursorRead, QueueError> {
        const CONTEXT: &str = "reading events after the listener's cursor";
        let newest: i64 = self
            .client
            .query_one(NEWEST, &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db_error(CONTEXT, USE))?;
        let span_end = after.saturating_add(READ_SPAN);
        let beyond_span = newest > span_end;
        let newest = newest.min(span_end);
        if newest <= after {
            return Ok(CursorRead {
                events: Vec::new(),
                scanned_to: after,
                more: false,
            });
        }
        let rows = self
            .client
            .query(
                &self.read,
                &[&self.listener, &after, &newest, &limit, &max_bytes],
            )
            .await
            .map_err(db_error(CONTEXT, USE))?;
        let mut events = Vec::with_capacity(rows.len());
        let mut candidates = 0i64;
        for row in &rows {
            let id: i64 = row.try_get(0).map_err(db_error(CONTEXT, None))?;
            candidates = row.try_get(1).map_err(db_error(CONTEXT, None))?;
            events.push((id, stored_event(row, 2)));
        }
        // Everything up to `newest` was looked at when the read took every candidate and
        // the candidates were not cut by the limit.
        let whole =
            i64::try_from(events.len()).unwrap_or(i64::MAX) == candidates && candidates < limit;
        let scanned_to = match events.last() {
            Some((last, _)) if !whole => *last,
            _ => newest,
        };
        Ok(CursorRead {
            events,
            scanned_to,
            more: !whole || beyond_span,
        })
    }

    /// Records why the cursor is held at `event_id`, for `walhook status` and the console;
    /// cleared when the cursor moves.
    pub async fn note_hold(
        &self,
        event_id: i64,
        status_code: Option<i32>,
        comment: &str,
    ) -> Result<(), QueueError> {
        self.client
            .execute(
                NOTE_HOLD,
                &[&self.listener, &event_id, &status_code, &comment],
            )
            .await
            .map(drop)
            .map_err(db_error("noting why the listener's cursor is held", USE))
    }

    /// Moves the cursor to `to` and moves `failed` to `walhook.failed`, in one transaction;
    /// returns each failed event's notification id.
    pub async fn advance(
        &self,
        to: i64,
        failed: &[FailedEvent],
    ) -> Result<Vec<(i64, i64)>, QueueError> {
        const CONTEXT: &str = "moving the listener's cursor";
        let ids: Vec<i64> = failed.iter().map(|f| f.event_id).collect();
        let attempts: Vec<i32> = failed.iter().map(|f| f.attempts).collect();
        let codes: Vec<Option<i32>> = failed.iter().map(|f| f.status_code).collect();
        let comments: Vec<&str> = failed.iter().map(|f| f.comment.as_str()).collect();
        let rows = self
            .client
            .query(
                &self.advance,
                &[&self.listener, &to, &ids, &attempts, &codes, &comments],
            )
            .await
            .map_err(db_error(CONTEXT, USE))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<(i64, i64)>, tokio_postgres::Error>>()
            .map_err(db_error(CONTEXT, None))
    }
}

/// The read after a position: up to $4 events after $2 up to $3 that listener $1
/// receives, cut where their stored values pass $5 bytes (the first always comes). Values
/// of rows past the cut are never detoasted: they are not output. The window runs over the
/// limited rows only.
fn read_sql() -> String {
    format!(
        "SELECT e.id, e.total, {STORED_EVENT_COLUMNS}
FROM (
    SELECT e.*, count(*) OVER () AS total, sum(e.bytes) OVER (ORDER BY e.id) AS running
    FROM (
        SELECT e.id, {STORED_EVENT_COLUMNS},
               pg_column_size(e.\"row\") + coalesce(pg_column_size(e.old), 0) AS bytes
        FROM walhook.listener_cursor c
        JOIN walhook.event e ON e.id > $2 AND e.id <= $3 AND {receives}
        WHERE c.listener = $1
        ORDER BY e.id
        LIMIT $4
    ) e
) e
WHERE e.running - e.bytes < $5
ORDER BY e.id",
        receives = cursor_receives!()
    )
}

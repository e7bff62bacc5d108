//! Debouncing: a debounced listener's changes to one entity coalesce in a window in
//! `walhook.debounce` (see `sql/0007_debounce.sql`) instead of becoming a notification each.
//!
//! * At fan-out (in the queue writer's transaction) each newly stored event a debounced
//!   listener receives is merged into the entity's open window, or opens one. Created then
//!   Updated stays Created; Updated then Deleted becomes Deleted; Created then Deleted
//!   drops both (or, with `drop_created_deleted = false`, sends both). A derived action or
//!   a Deleted that is not merged closes the window and goes on its own, after it.
//! * The flusher turns windows whose time has come into notifications in `walhook.new`,
//!   oldest first, under an advisory lock so that two processes never flush one entity's
//!   windows out of order.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::types::{Json, PgLsn};
use tokio_postgres::{Client, GenericClient, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{QueueError, Subscription, db_error, variant_event_id};
use crate::config::{Debounce, DebounceFrom};
use crate::mapper::EntityEvent;
use crate::types::{Action, Lsn};

/// Names the ids of coalesced events (uuid v5 over the coalesced events' ids, in order).
/// Never change it: listeners deduplicate on the ids.
pub const COALESCED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_0c52_3e7d_4a19_b2c4_5d9e_0f7a_8c31);

/// The id of a notification that coalesces `ids`: the event's own id for one event.
pub fn coalesced_id(ids: &[Uuid]) -> Uuid {
    match ids {
        [one] => *one,
        _ => {
            let bytes: Vec<u8> = ids.iter().flat_map(|u| *u.as_bytes()).collect();
            Uuid::new_v5(&COALESCED_ID_NAMESPACE, &bytes)
        }
    }
}

/// One window, as stored in `walhook.debounce`; times in microseconds since 2000-01-01
/// (PostgreSQL's epoch, as commit times arrive).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Window {
    /// `None` until stored.
    pub(crate) id: Option<i64>,
    pub(crate) listener: String,
    pub(crate) entity: String,
    pub(crate) entity_id: String,
    #[serde(serialize_with = "lsn_text")]
    pub(crate) commit_lsn: Lsn,
    pub(crate) seq: i32,
    pub(crate) first_event: i64,
    pub(crate) event_ids: Vec<Uuid>,
    pub(crate) coalesced_id: Uuid,
    pub(crate) action: String,
    pub(crate) row_action: Option<String>,
    pub(crate) changed_fields: Option<Vec<String>>,
    pub(crate) row: Map<String, Value>,
    pub(crate) old: Option<Map<String, Value>>,
    pub(crate) subject: Option<String>,
    pub(crate) source_table: String,
    pub(crate) relation: String,
    pub(crate) xid: i64,
    pub(crate) first_time: i64,
    pub(crate) commit_time: i64,
    pub(crate) due: i64,
    pub(crate) open: bool,
}

fn lsn_text<S: serde::Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(lsn)
}

/// A newly stored event on its way into a window.
pub(crate) struct Incoming<'a> {
    pub(crate) event: &'a EntityEvent,
    /// Its `walhook.event.id`.
    pub(crate) id: i64,
    /// Its stable id.
    pub(crate) uuid: Uuid,
}

impl Window {
    fn of(listener: &str, i: &Incoming<'_>, cfg: &Debounce) -> Window {
        let e = i.event;
        let time = e.commit_time.0;
        // Deletes, derived actions and truncations take nothing more: closed at once.
        let open = e.derived.is_none() && matches!(e.action, Action::Created | Action::Updated);
        Window {
            id: None,
            listener: listener.to_owned(),
            entity: e.entity.as_str().to_owned(),
            entity_id: e.entity_id.clone(),
            commit_lsn: e.commit_lsn,
            seq: i32::try_from(e.seq).unwrap_or(i32::MAX),
            first_event: i.id,
            event_ids: vec![i.uuid],
            coalesced_id: i.uuid,
            action: e.action_name().to_owned(),
            row_action: e.derived.as_ref().map(|_| e.action.as_str().to_owned()),
            changed_fields: e.changed_fields.clone(),
            row: e.row.clone(),
            old: e.old.clone(),
            subject: e.subject.clone(),
            source_table: e.table.to_string(),
            relation: e.table.quoted(),
            xid: i64::from(e.xid.0),
            first_time: time,
            commit_time: time,
            due: if open {
                time.saturating_add(micros(cfg.window))
            } else {
                time
            },
            open,
        }
    }

    /// Whether `e` may merge into this window: both plain row changes, within the window.
    fn takes(&self, e: &EntityEvent) -> bool {
        self.open
            && self.row_action.is_none()
            && e.derived.is_none()
            && matches!(
                e.action,
                Action::Created | Action::Updated | Action::Deleted
            )
            && e.commit_time.0 <= self.due
    }

    /// Closes the window so that it is flushed no later than `at`.
    fn close(&mut self, at: i64) {
        self.open = false;
        self.due = self.due.min(at);
    }

    fn merge(&mut self, i: &Incoming<'_>, cfg: &Debounce) {
        let e = i.event;
        let created = self.action == Action::Created.as_str();
        match e.action {
            Action::Deleted => {
                self.action = Action::Deleted.as_str().to_owned();
                self.changed_fields = e.changed_fields.clone();
                self.old = None;
                self.open = false;
                self.due = e.commit_time.0;
            }
            _ if created => {}
            _ => {
                self.changed_fields = match (self.changed_fields.take(), &e.changed_fields) {
                    (Some(mut mine), Some(theirs)) => {
                        for f in theirs {
                            if !mine.contains(f) {
                                mine.push(f.clone());
                            }
                        }
                        Some(mine)
                    }
                    // Unknown for one of them: unknown for the union.
                    _ => None,
                };
            }
        }
        // The latest row; columns whose value this change did not carry keep theirs.
        for (k, v) in &e.row {
            self.row.insert(k.clone(), v.clone());
        }
        self.event_ids.push(i.uuid);
        self.coalesced_id = coalesced_id(&self.event_ids);
        self.xid = i64::from(e.xid.0);
        self.commit_time = e.commit_time.0;
        self.subject.clone_from(&e.subject);
        if self.open && cfg.from == DebounceFrom::Last {
            let quiet = e.commit_time.0.saturating_add(micros(cfg.window));
            self.due = match cfg.max {
                Some(max) => quiet.min(self.first_time.saturating_add(micros(max))),
                None => quiet,
            };
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// What merging a batch changes in `walhook.debounce`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Changes {
    /// Stored windows to rewrite.
    pub(crate) update: Vec<Window>,
    /// New windows.
    pub(crate) insert: Vec<Window>,
    /// Stored windows to delete (a created entity deleted within its window).
    pub(crate) delete: Vec<i64>,
}

impl Changes {
    fn keep(&mut self, w: Window) {
        if w.id.is_some() {
            self.update.push(w);
        } else {
            self.insert.push(w);
        }
    }
}

/// Merges one entity's new events (in commit order) for one listener into its open window
/// (`current`, from the table), recording what to write.
pub(crate) fn absorb(
    listener: &str,
    mut current: Option<Window>,
    events: &[Incoming<'_>],
    cfg: &Debounce,
    out: &mut Changes,
) {
    for i in events {
        let e = i.event;
        current = match current.take() {
            Some(mut w) if w.takes(e) => {
                let created = w.action == Action::Created.as_str();
                if e.action == Action::Deleted && created {
                    if cfg.drop_created_deleted {
                        // Never told it existed: tell nothing.
                        out.delete.extend(w.id);
                        None
                    } else {
                        w.close(e.commit_time.0);
                        out.keep(w);
                        Some(Window::of(listener, i, cfg))
                    }
                } else {
                    w.merge(i, cfg);
                    Some(w)
                }
            }
            Some(mut w) => {
                w.close(e.commit_time.0);
                out.keep(w);
                Some(Window::of(listener, i, cfg))
            }
            None => Some(Window::of(listener, i, cfg)),
        };
    }
    if let Some(w) = current {
        out.keep(w);
    }
}

/// A listener that debounces, with what it receives.
#[derive(Clone, Debug)]
pub(crate) struct Debounced {
    pub(crate) sub: Subscription,
    pub(crate) cfg: Debounce,
}

/// The events this transaction stored among keys `first..=last`: their `walhook.event.id`
/// by (commit_lsn, seq, variant). Re-sent events that were skipped are not among them.
const INSERTED: &str = "SELECT e.id, e.commit_lsn, e.seq, e.variant FROM walhook.event e
WHERE (e.commit_lsn, e.seq) >= ($1::pg_lsn, $2::int) AND (e.commit_lsn, e.seq) <= ($3::pg_lsn, $4::int)
  AND e.xmin::text::bigint = txid_current() % 4294967296";

/// Microseconds since 2000-01-01 of a timestamptz column.
macro_rules! micros_of {
    ($col:literal) => {
        concat!(
            "((extract(epoch FROM ",
            $col,
            ") - 946684800) * 1000000)::bigint"
        )
    };
}

/// A timestamptz from microseconds since 2000-01-01.
macro_rules! time_of {
    ($col:literal) => {
        concat!(
            "(timestamptz '2000-01-01 00:00:00+00' + ",
            $col,
            " * interval '1 microsecond')"
        )
    };
}

const OPEN_WINDOWS: &str = concat!(
    "SELECT d.id, d.listener, d.entity, d.entity_id, d.commit_lsn, d.seq, d.first_event,
       d.event_ids, d.coalesced_id, d.action, d.row_action, d.changed_fields, d.\"row\", d.old,
       d.subject, d.source_table, d.relation, d.xid, ",
    micros_of!("d.first_commit_time"),
    ", ",
    micros_of!("d.commit_time"),
    ", ",
    micros_of!("d.due_at"),
    "
FROM walhook.debounce d
JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(listener, entity, entity_id)
  ON d.listener = k.listener AND d.entity = k.entity AND d.entity_id = k.entity_id
WHERE d.open
FOR UPDATE OF d"
);

/// The columns of a window as `jsonb_to_recordset` reads them.
const RECORD: &str = "w(id bigint, listener text, entity text, entity_id text, commit_lsn text,
    seq int, first_event bigint, event_ids uuid[], coalesced_id uuid, action text,
    row_action text, changed_fields text[], \"row\" jsonb, old jsonb, subject text,
    source_table text, relation text, xid bigint, first_time bigint, commit_time bigint,
    due bigint, open bool)";

fn insert_windows_sql() -> String {
    format!(
        "INSERT INTO walhook.debounce (listener, entity, entity_id, commit_lsn, seq, first_event,
    event_ids, coalesced_id, action, row_action, changed_fields, \"row\", old, subject,
    source_table, relation, xid, first_commit_time, commit_time, due_at, open)
SELECT w.listener, w.entity, w.entity_id, w.commit_lsn::pg_lsn, w.seq, w.first_event,
       w.event_ids, w.coalesced_id, w.action, w.row_action, w.changed_fields, w.\"row\", w.old,
       w.subject, w.source_table, w.relation, w.xid, {}, {}, {}, w.open
FROM jsonb_to_recordset($1::jsonb) AS {RECORD}",
        time_of!("w.first_time"),
        time_of!("w.commit_time"),
        time_of!("w.due"),
    )
}

fn update_windows_sql() -> String {
    format!(
        "UPDATE walhook.debounce d SET event_ids = w.event_ids, coalesced_id = w.coalesced_id,
    action = w.action, row_action = w.row_action, changed_fields = w.changed_fields,
    \"row\" = w.\"row\", old = w.old, subject = w.subject, xid = w.xid,
    commit_time = {}, due_at = {}, open = w.open
FROM jsonb_to_recordset($1::jsonb) AS {RECORD}
WHERE d.id = w.id",
        time_of!("w.commit_time"),
        time_of!("w.due"),
    )
}

const DELETE_WINDOWS: &str = "DELETE FROM walhook.debounce WHERE id = ANY($1::bigint[])";

/// Merges the events of a batch the debounced listeners receive into their windows, in the
/// writer's transaction. `excluded` are the listeners each event is not for (route).
/// Returns how many events entered windows.
pub(crate) async fn fan_out(
    tx: &Transaction<'_>,
    listeners: &[Debounced],
    events: &[EntityEvent],
    excluded: &[Option<Vec<String>>],
    keys: ((Lsn, i32), (Lsn, i32)),
    system_id: &str,
) -> Result<u64, QueueError> {
    const CONTEXT: &str = "merging events into walhook.debounce";
    let wanted = |d: &Debounced, i: usize, e: &EntityEvent| {
        let covered = d
            .sub
            .entities
            .as_ref()
            .is_none_or(|es| es.contains(&e.entity));
        let action = match &e.derived {
            Some(name) => d.sub.derived_actions.iter().any(|n| **n == **name),
            None => d.sub.actions.contains(&e.action),
        };
        let not_excluded = excluded
            .get(i)
            .and_then(Option::as_ref)
            .is_none_or(|x| !x.contains(&d.sub.listener));
        covered && action && not_excluded
    };
    if !listeners
        .iter()
        .any(|d| events.iter().enumerate().any(|(i, e)| wanted(d, i, e)))
    {
        return Ok(0);
    }
    let ((first_lsn, first_seq), (last_lsn, last_seq)) = keys;
    let rows = tx
        .query(
            INSERTED,
            &[
                &PgLsn::from(first_lsn.0),
                &first_seq,
                &PgLsn::from(last_lsn.0),
                &last_seq,
            ],
        )
        .await
        .map_err(db_error(CONTEXT, None))?;
    let mut stored: HashMap<(Lsn, i32, String), i64> = HashMap::with_capacity(rows.len());
    for r in &rows {
        let lsn: PgLsn = r.try_get(1).map_err(db_error(CONTEXT, None))?;
        stored.insert(
            (
                Lsn(u64::from(lsn)),
                r.try_get(2).map_err(db_error(CONTEXT, None))?,
                r.try_get(3).map_err(db_error(CONTEXT, None))?,
            ),
            r.try_get(0).map_err(db_error(CONTEXT, None))?,
        );
    }
    // (listener index, entity, entity id) -> its new events, in commit order.
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut index: HashMap<(usize, String, String), usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let variant = e.variant_key().to_owned();
        let seq = i32::try_from(e.seq).unwrap_or(i32::MAX);
        let Some(&id) = stored.get(&(e.commit_lsn, seq, variant.clone())) else {
            continue;
        };
        for (l, d) in listeners.iter().enumerate() {
            if !wanted(d, i, e) {
                continue;
            }
            let key = (l, e.entity.as_str().to_owned(), e.entity_id.clone());
            let slot = *index.entry(key.clone()).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            if let Some((_, list)) = groups.get_mut(slot) {
                list.push(Incoming {
                    event: e,
                    id,
                    uuid: variant_event_id(system_id, e.commit_lsn, e.seq, &variant),
                });
            }
        }
    }
    let mut current = open_windows(tx, listeners, &groups).await?;
    let mut changes = Changes::default();
    let mut absorbed = 0;
    for ((l, entity, entity_id), incoming) in &groups {
        let Some(d) = listeners.get(*l) else { continue };
        let open = current.remove(&(d.sub.listener.clone(), entity.clone(), entity_id.clone()));
        absorb(&d.sub.listener, open, incoming, &d.cfg, &mut changes);
        absorbed += incoming.len() as u64;
    }
    write(tx, &changes).await?;
    Ok(absorbed)
}

type WindowKey = (String, String, String);

/// One listener's (by index) new events of one entity, in commit order.
type Group<'a> = ((usize, String, String), Vec<Incoming<'a>>);

async fn open_windows(
    tx: &Transaction<'_>,
    listeners: &[Debounced],
    groups: &[Group<'_>],
) -> Result<HashMap<WindowKey, Window>, QueueError> {
    const CONTEXT: &str = "reading open windows in walhook.debounce";
    let mut names = Vec::with_capacity(groups.len());
    let mut entities = Vec::with_capacity(groups.len());
    let mut ids = Vec::with_capacity(groups.len());
    for ((l, entity, entity_id), _) in groups {
        if let Some(d) = listeners.get(*l) {
            names.push(d.sub.listener.as_str());
            entities.push(entity.as_str());
            ids.push(entity_id.as_str());
        }
    }
    let rows = tx
        .query(OPEN_WINDOWS, &[&names, &entities, &ids])
        .await
        .map_err(db_error(CONTEXT, None))?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in &rows {
        let w = read_window(r).map_err(db_error(CONTEXT, None))?;
        out.insert(
            (w.listener.clone(), w.entity.clone(), w.entity_id.clone()),
            w,
        );
    }
    Ok(out)
}

fn read_window(r: &tokio_postgres::Row) -> Result<Window, tokio_postgres::Error> {
    let lsn: PgLsn = r.try_get(4)?;
    let object = |v: Option<Value>| match v {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    Ok(Window {
        id: Some(r.try_get(0)?),
        listener: r.try_get(1)?,
        entity: r.try_get(2)?,
        entity_id: r.try_get(3)?,
        commit_lsn: Lsn(u64::from(lsn)),
        seq: r.try_get(5)?,
        first_event: r.try_get(6)?,
        event_ids: r.try_get(7)?,
        coalesced_id: r.try_get(8)?,
        action: r.try_get(9)?,
        row_action: r.try_get(10)?,
        changed_fields: r.try_get(11)?,
        row: object(r.try_get(12)?).unwrap_or_default(),
        old: object(r.try_get(13)?),
        subject: r.try_get(14)?,
        source_table: r.try_get(15)?,
        relation: r.try_get(16)?,
        xid: r.try_get(17)?,
        first_time: r.try_get(18)?,
        commit_time: r.try_get(19)?,
        due: r.try_get(20)?,
        open: true,
    })
}

async fn write(tx: &Transaction<'_>, changes: &Changes) -> Result<(), QueueError> {
    const CONTEXT: &str = "writing walhook.debounce";
    if !changes.delete.is_empty() {
        tx.execute(DELETE_WINDOWS, &[&changes.delete])
            .await
            .map_err(db_error(CONTEXT, None))?;
    }
    // Closing stored windows first: a new open window of the same entity may follow.
    if !changes.update.is_empty() {
        tx.execute(&update_windows_sql(), &[&Json(&changes.update)])
            .await
            .map_err(db_error(CONTEXT, None))?;
    }
    if !changes.insert.is_empty() {
        tx.execute(&insert_windows_sql(), &[&Json(&changes.insert)])
            .await
            .map_err(db_error(CONTEXT, None))?;
    }
    Ok(())
}

/// Serialises flushing across processes; "walhook:d" in ASCII.
const FLUSH_LOCK_KEY: i64 = 0x7761_6c68_6f6f_6b64;

/// Most windows flushed by one statement.
const FLUSH_BATCH: i64 = 1000;

/// Turns due windows into notifications, oldest first: a window of several changes into a
/// coalesced event (changed fields in column order), a window of one change into a
/// notification of that change's event.
const FLUSH: &str = r#"WITH due AS (
    SELECT id FROM walhook.debounce
    WHERE due_at <= now()
    ORDER BY commit_lsn, seq, id
    LIMIT $1
    -- The writer locks only open windows, the latest of their entity: skipping one never
    -- lets a later window of the same entity through.
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM walhook.debounce d USING due WHERE d.id = due.id
    RETURNING d.*
), coalesced AS (
    INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity, entity_id,
                               action, changed_fields, "row", old, subject, source_table,
                               variant, row_action)
    SELECT g.coalesced_id, g.commit_lsn, g.seq, g.xid, g.commit_time, g.entity, g.entity_id,
           g.action,
           CASE WHEN g.changed_fields IS NOT NULL THEN coalesce((
               SELECT array_agg(f ORDER BY a.attnum NULLS LAST, f)
               FROM unnest(g.changed_fields) f
               LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(g.relation) AND a.attname = f
           ), '{}') END,
           g."row", g.old, g.subject, g.source_table, 'debounce/' || g.listener, g.row_action
    FROM gone g
    WHERE cardinality(g.event_ids) > 1
    ON CONFLICT (commit_lsn, seq, variant) DO NOTHING
    RETURNING id, commit_lsn, seq, variant
), fanned_out AS (
    INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq)
    SELECT nextval('walhook.notification_id_seq'),
           CASE WHEN cardinality(g.event_ids) = 1 THEN g.first_event
                ELSE coalesce(c.id, (SELECT e.id FROM walhook.event e
                                     WHERE (e.commit_lsn, e.seq, e.variant)
                                         = (g.commit_lsn, g.seq, 'debounce/' || g.listener)))
           END,
           g.listener, g.entity, g.entity_id, g.commit_lsn, g.seq
    FROM gone g
    LEFT JOIN coalesced c
      ON (c.commit_lsn, c.seq, c.variant) = (g.commit_lsn, g.seq, 'debounce/' || g.listener)
    ORDER BY g.commit_lsn, g.seq, g.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM fanned_out),
       -- 'sweep': a window's notification keeps its first change's place in commit order,
       -- which claim cursors have usually passed by the time the window closes.
       (SELECT pg_notify('walhook_new', 'sweep') WHERE EXISTS (SELECT 1 FROM fanned_out)),
       (SELECT extract(epoch FROM min(due_at) - now())::float8 FROM walhook.debounce
        WHERE id NOT IN (SELECT id FROM due))"#;

/// What one flush did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Flushed {
    /// Notifications created.
    pub notifications: u64,
    /// When the next window is due, if any is waiting.
    pub next_due: Option<Duration>,
}

/// Flushes the windows that are due (at most `FLUSH_BATCH`); `None` when another
/// process is flushing right now.
pub async fn flush_due(client: &mut Client) -> Result<Option<Flushed>, QueueError> {
    const CONTEXT: &str = "flushing debounce windows to walhook.new";
    let tx = client
        .transaction()
        .await
        .map_err(db_error(CONTEXT, None))?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&FLUSH_LOCK_KEY])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(CONTEXT, None))?;
    if !locked {
        return Ok(None);
    }
    // Coalesced events get ids too: keep ids in commit order for cursor listeners.
    tx.batch_execute(super::writer::EVENT_ORDER_LOCK)
        .await
        .map_err(db_error(CONTEXT, None))?;
    let row = tx
        .query_one(FLUSH, &[&FLUSH_BATCH])
        .await
        .map_err(db_error(CONTEXT, Some((super::Needs::Use, None))))?;
    let n: i64 = row.try_get(0).map_err(db_error(CONTEXT, None))?;
    let next: Option<f64> = row.try_get(2).map_err(db_error(CONTEXT, None))?;
    tx.commit().await.map_err(db_error(CONTEXT, None))?;
    let notifications = u64::try_from(n).unwrap_or(0);
    let next_due = if notifications as i64 >= FLUSH_BATCH {
        Some(Duration::ZERO)
    } else {
        next.map(|s| Duration::from_secs_f64(s.max(0.0)))
    };
    Ok(Some(Flushed {
        notifications,
        next_due,
    }))
}

/// How often the flusher looks at least, for windows other processes opened.
const FLUSH_POLL: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Flushes due windows until `stop`, on its own connection to `source`. With `debounced`
/// false (no listener debounces now) it ends once no window is left.
pub(crate) async fn run(source: crate::db::Source, debounced: bool, stop: CancellationToken) {
    let mut client: Option<Client> = None;
    let mut backoff = Duration::from_millis(100);
    let mut down = false;
    while !stop.is_cancelled() {
        let wait = match flush_once(&source, &mut client).await {
            Ok(Some(f)) => {
                backoff = Duration::from_millis(100);
                if down {
                    info!("debounce flushing reached the queue database again");
                    down = false;
                }
                if f.notifications > 0 {
                    debug!(notifications = f.notifications, "debounce windows flushed");
                }
                match f.next_due {
                    None if !debounced => return,
                    None => FLUSH_POLL,
                    // Rows locked by the writer are due but skipped: look again soon.
                    Some(d) => d.clamp(Duration::from_millis(10), FLUSH_POLL),
                }
            }
            Ok(None) => FLUSH_POLL,
            Err(e) => {
                if !down {
                    warn!(error = %e, "cannot flush debounce windows; retrying");
                    down = true;
                }
                client = None;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn flush_once(
    source: &crate::db::Source,
    client: &mut Option<Client>,
) -> Result<Option<Flushed>, String> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = Some(source.connect().await.map_err(|e| e.message)?);
    }
    let Some(c) = client.as_mut() else {
        return Ok(None);
    };
    match tokio::time::timeout(Duration::from_secs(30), flush_due(c)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            *client = None;
            Err("no answer from the queue database within 30s".to_owned())
        }
    }
}

/// Whether any window waits (for status and tests).
pub async fn pending(client: &impl GenericClient) -> Result<i64, QueueError> {
    client
        .query_one("SELECT count(*) FROM walhook.debounce", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error("counting walhook.debounce", None))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::replication::pgoutput::PgTimestamp;
    use crate::types::{EntityName, TableName, Xid};

    const SECOND: i64 = 1_000_000;

    fn cfg(from: DebounceFrom, max: Option<u64>, drop: bool) -> Debounce {
        Debounce {
            window: Duration::from_secs(2),
            from,
            max: max.map(Duration::from_secs),
            drop_created_deleted: drop,
        }
    }

    fn event(
        seq: u32,
        at: i64,
        action: Action,
        row: Value,
        changed: Option<&[&str]>,
    ) -> EntityEvent {
        let Value::Object(row) = row else { panic!() };
        EntityEvent {
            commit_lsn: Lsn(0x100),
            seq,
            xid: Xid(seq),
            commit_time: PgTimestamp(at),
            entity: EntityName::new("Customer").unwrap(),
            table: TableName {
                schema: "public".into(),
                name: "customer".into(),
            },
            entity_id: "42".into(),
            action,
            derived: None,
            variant: None,
            changed_fields: changed.map(|c| c.iter().map(|s| (*s).to_owned()).collect()),
            old: (action == Action::Updated).then(|| {
                let mut old = row.clone();
                old.insert("n".into(), json!(seq));
                old
            }),
            row,
            subject: None,
            only_listener: None,
        }
    }

    fn incoming(events: &[EntityEvent]) -> Vec<Incoming<'_>> {
        events
            .iter()
            .map(|e| Incoming {
                event: e,
                id: i64::from(e.seq) + 1000,
                uuid: Uuid::from_u128(u128::from(e.seq) + 1),
            })
            .collect()
    }

    fn run(events: &[EntityEvent], current: Option<Window>, cfg: &Debounce) -> Changes {
        let mut out = Changes::default();
        absorb("crm", current, &incoming(events), cfg, &mut out);
        out
    }

    #[test]
    fn updates_in_a_window_coalesce_with_union_latest_row_and_first_old_values() {
        let events: Vec<EntityEvent> = (0..10)
            .map(|i| {
                let field = if i % 2 == 0 { "city" } else { "name" };
                event(
                    i,
                    i64::from(i) * SECOND / 10,
                    Action::Updated,
                    json!({"id": 42, "n": i}),
                    Some(&[field]),
                )
            })
            .collect();
        let out = run(&events, None, &cfg(DebounceFrom::First, None, true));
        assert_eq!(out.insert.len(), 1);
        let w = &out.insert[0];
        assert_eq!(w.action, "Updated");
        assert_eq!(
            w.changed_fields,
            Some(vec!["city".to_owned(), "name".to_owned()])
        );
        assert_eq!(w.row.get("n"), Some(&json!(9)));
        assert_eq!(w.old.as_ref().and_then(|o| o.get("n")), Some(&json!(0)));
        assert_eq!(w.event_ids.len(), 10);
        assert_eq!(w.coalesced_id, coalesced_id(&w.event_ids));
        assert_ne!(w.coalesced_id, w.event_ids[0]);
        assert_eq!((w.first_event, w.seq), (1000, 0));
        assert_eq!(w.due, 2 * SECOND);
        assert!(w.open);
        // An unknown changedFields makes the union unknown.
        let mut more = events.clone();
        more.push(event(10, SECOND, Action::Updated, json!({"id": 42}), None));
        let out = run(&more, None, &cfg(DebounceFrom::First, None, true));
        assert_eq!(out.insert[0].changed_fields, None);
    }

    #[test]
    fn a_change_after_the_window_closes_it_and_opens_the_next() {
        let events = vec![
            event(0, 0, Action::Updated, json!({"id": 42}), Some(&["a"])),
            event(
                1,
                3 * SECOND,
                Action::Updated,
                json!({"id": 42}),
                Some(&["b"]),
            ),
        ];
        let out = run(&events, None, &cfg(DebounceFrom::First, None, true));
        assert_eq!(out.insert.len(), 2);
        assert!(!out.insert[0].open && out.insert[0].due == 2 * SECOND);
        assert!(out.insert[1].open && out.insert[1].due == 5 * SECOND);
        assert_eq!(out.insert[1].event_ids.len(), 1);
        assert_eq!(out.insert[1].coalesced_id, out.insert[1].event_ids[0]);
    }

    #[test]
    fn created_stays_created_and_created_then_deleted_sends_nothing_unless_asked() {
        let events = vec![
            event(0, 0, Action::Created, json!({"id": 42, "n": 0}), None),
            event(
                1,
                SECOND / 2,
                Action::Updated,
                json!({"id": 42, "n": 1}),
                Some(&["n"]),
            ),
        ];
        let out = run(&events, None, &cfg(DebounceFrom::First, None, true));
        let w = &out.insert[0];
        assert_eq!(
            (w.action.as_str(), w.row.get("n")),
            ("Created", Some(&json!(1)))
        );
        assert_eq!(w.old, None);

        // The window is stored; a delete then drops it.
        let mut stored = w.clone();
        stored.id = Some(7);
        let delete = vec![event(2, SECOND, Action::Deleted, json!({"id": 42}), None)];
        let out = run(
            &delete,
            Some(stored.clone()),
            &cfg(DebounceFrom::First, None, true),
        );
        assert_eq!(
            out,
            Changes {
                delete: vec![7],
                ..Changes::default()
            }
        );
        // Asked to send both: the created window closes, the delete follows it.
        let out = run(
            &delete,
            Some(stored),
            &cfg(DebounceFrom::First, None, false),
        );
        assert_eq!(out.update.len(), 1);
        assert!(!out.update[0].open && out.update[0].due == SECOND);
        assert_eq!(out.insert.len(), 1);
        assert_eq!(out.insert[0].action, "Deleted");
        assert!(!out.insert[0].open);
    }

    #[test]
    fn updates_then_a_delete_become_deleted_and_derived_actions_stand_alone() {
        let mut cancelled = event(
            1,
            SECOND / 2,
            Action::Updated,
            json!({"id": 42}),
            Some(&["s"]),
        );
        cancelled.derived = Some(Arc::from("Cancelled"));
        let events = vec![
            event(0, 0, Action::Updated, json!({"id": 42}), Some(&["a"])),
            cancelled,
            event(2, SECOND, Action::Updated, json!({"id": 42}), Some(&["b"])),
            event(3, SECOND, Action::Deleted, json!({"id": 42}), None),
        ];
        let out = run(&events, None, &cfg(DebounceFrom::First, None, true));
        let got: Vec<(&str, usize, bool)> = out
            .insert
            .iter()
            .map(|w| (w.action.as_str(), w.event_ids.len(), w.open))
            .collect();
        assert_eq!(
            got,
            [
                ("Updated", 1, false),
                ("Cancelled", 1, false),
                ("Deleted", 2, false)
            ]
        );
        assert_eq!(out.insert[1].row_action.as_deref(), Some("Updated"));
    }

    #[test]
    fn measured_from_the_last_change_the_window_moves_until_max() {
        let events: Vec<EntityEvent> = (0..5)
            .map(|i| {
                event(
                    i,
                    i64::from(i) * SECOND,
                    Action::Updated,
                    json!({"id": 42}),
                    Some(&["a"]),
                )
            })
            .collect();
        let out = run(&events, None, &cfg(DebounceFrom::Last, None, true));
        assert_eq!(out.insert.len(), 1);
        assert_eq!(out.insert[0].due, 6 * SECOND);
        let out = run(&events, None, &cfg(DebounceFrom::Last, Some(3), true));
        // Capped at 3s after the first change: the change at 4s starts the next window.
        let dues: Vec<i64> = out.insert.iter().map(|w| w.due).collect();
        assert_eq!(dues, [3 * SECOND, 6 * SECOND]);
    }
}

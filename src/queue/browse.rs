//! Reading notifications for people: search across the status tables with keyset pages,
//! and one event with every notification of it.
//!
//! Results are newest first by `(created_at, id)`. Each status table is queried on its own,
//! ordered and limited, and the branches are merged, so a page walks one index per table
//! (sql/0003_console.sql) and costs the rows it shows, however many millions the table
//! holds. `walhook.new` has no search index on purpose (it is the hot table): it is scanned.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::StoredEvent;
use super::admin::NotificationStatus;
use super::notifications::{STORED_EVENT_COLUMNS, stored_event};
use super::{Needs, QueueError, db_error};

/// Permission errors here mean the role may not use the schema.
const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

/// Most rows a page may hold.
pub const MAX_PAGE: i64 = 500;

/// What [`search`] looks for; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchFilter {
    /// Only these statuses (empty: all).
    pub statuses: Vec<NotificationStatus>,
    /// Only this listener's.
    pub listener: Option<String>,
    /// Only this entity type's.
    pub entity: Option<String>,
    /// Only this entity id's (exact).
    pub entity_id: Option<String>,
    /// Only the notifications of the event with this stable id.
    pub event: Option<Uuid>,
    /// Created at or after this time.
    pub from: Option<SystemTime>,
    /// Created before this time.
    pub to: Option<SystemTime>,
}

/// A position in the result order: the `(created_at, id)` of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The row's `created_at`.
    pub created_at: SystemTime,
    /// The row's id.
    pub id: i64,
}

impl Cursor {
    /// `MICROS_ID`, e.g. `1714566896123456_42`: microseconds since the epoch and the id.
    pub fn encode(&self) -> String {
        let micros = self
            .created_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        format!("{micros}_{}", self.id)
    }

    /// Reads what [`Cursor::encode`] wrote; `None` for anything else.
    pub fn decode(s: &str) -> Option<Cursor> {
        let (micros, id) = s.split_once('_')?;
        let micros: u64 = micros.parse().ok()?;
        Some(Cursor {
            created_at: UNIX_EPOCH.checked_add(Duration::from_micros(micros))?,
            id: id.parse().ok()?,
        })
    }
}

/// Which page [`search`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageAt {
    /// The newest rows.
    First,
    /// The rows just older than the cursor.
    Before(Cursor),
    /// The rows just newer than the cursor.
    After(Cursor),
}

/// One notification as search and the event page show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationRow {
    /// Notification id (the same in every status table).
    pub id: i64,
    /// Where it is.
    pub status: NotificationStatus,
    /// Listener name.
    pub listener: String,
    /// `walhook.event.id` of its event.
    pub event_row_id: i64,
    /// The stable event id; `None` when the event was pruned.
    pub event_uuid: Option<Uuid>,
    /// Entity type.
    pub entity: String,
    /// Entity id.
    pub entity_id: String,
    /// Created / Updated / Deleted; `None` when the event was pruned.
    pub action: Option<String>,
    /// Delivery attempts made.
    pub attempts: i32,
    /// When the notification was created (queued).
    pub created_at: SystemTime,
    /// When it reached its status: last attempt (New), delivered, failed or discarded.
    pub at: Option<SystemTime>,
    /// New only: when the next attempt is due.
    pub next_attempt_at: Option<SystemTime>,
    /// HTTP status of the last attempt, if there was an answer.
    pub status_code: Option<i32>,
    /// Processed only: the delivering attempt's latency in milliseconds.
    pub latency_ms: Option<i32>,
    /// The last delivery error in plain words.
    pub comment: Option<String>,
    /// Discarded only: why.
    pub reason: Option<String>,
}

impl NotificationRow {
    /// This row's position, for the next page's cursor.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            created_at: self.created_at,
            id: self.id,
        }
    }
}

/// One page of [`search`] results, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchPage {
    /// The rows.
    pub rows: Vec<NotificationRow>,
    /// Where the next older page starts, when there are older rows.
    pub older: Option<Cursor>,
    /// Where the next newer page starts, when there are newer rows.
    pub newer: Option<Cursor>,
    /// Set when the filter names an event id that `walhook.event` does not hold.
    pub unknown_event: bool,
}

/// The select list of each status table, in [`read_row`]'s order: id, status, listener,
/// event_id, entity, entity_id, attempts, created_at, at, next_attempt_at, status_code,
/// latency_ms, comment, reason.
fn columns(status: NotificationStatus) -> &'static str {
    match status {
        NotificationStatus::New => {
            "id, 'New'::text AS status, listener, event_id, entity, entity_id, attempts, \
             created_at, last_attempt_at AS at, next_attempt_at, last_status_code AS status_code, \
             NULL::int AS latency_ms, comment, NULL::text AS reason"
        }
        NotificationStatus::Processed => {
            "id, 'Processed'::text, listener, event_id, entity, entity_id, attempts, created_at, \
             delivered_at, NULL::timestamptz, status_code, latency_ms, NULL::text, NULL::text"
        }
        NotificationStatus::Failed => {
            "id, 'Failed'::text, listener, event_id, entity, entity_id, attempts, created_at, \
             failed_at, NULL::timestamptz, last_status_code, NULL::int, comment, NULL::text"
        }
        NotificationStatus::Discarded => {
            "id, 'Discarded'::text, listener, event_id, entity, entity_id, attempts, created_at, \
             discarded_at, NULL::timestamptz, last_status_code, NULL::int, comment, reason"
        }
    }
}

/// Bound parameters of a statement being built; values are never spliced into SQL text.
#[derive(Default)]
struct Params {
    values: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Params {
    /// Binds `v` and returns its placeholder.
    fn bind(&mut self, v: impl ToSql + Sync + Send + 'static) -> String {
        self.values.push(Box::new(v));
        format!("${}", self.values.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

const FIND_EVENT: &str = "SELECT id, entity_id FROM walhook.event WHERE event_id = $1";

/// A search statement with its parameters, before it runs.
struct Statement {
    sql: String,
    params: Params,
    limit: i64,
    newest_first: bool,
}

/// Builds the statement of [`search`]; `Ok(None)` when the filter's event id is unknown.
async fn statement(
    client: &Client,
    filter: &SearchFilter,
    at: PageAt,
    limit: i64,
) -> Result<Option<Statement>, QueueError> {
    let err = || db_error("searching notifications", USE);
    let limit = limit.clamp(1, MAX_PAGE);
    let mut params = Params::default();
    let mut conditions: Vec<String> = Vec::new();
    if let Some(uuid) = filter.event {
        let rows = client.query(FIND_EVENT, &[&uuid]).await.map_err(err())?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut entity_ids = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<_, i64>(0).map_err(err())?);
            entity_ids.push(row.try_get::<_, String>(1).map_err(err())?);
        }
        // The entity id lets the search walk the entity-id index instead of the table.
        let p = params.bind(entity_ids);
        conditions.push(format!("entity_id = ANY({p})"));
        let p = params.bind(ids);
        conditions.push(format!("event_id = ANY({p})"));
    }
    for (column, value) in [
        ("listener", &filter.listener),
        ("entity", &filter.entity),
        ("entity_id", &filter.entity_id),
    ] {
        if let Some(v) = value {
            let p = params.bind(v.clone());
            conditions.push(format!("{column} = {p}"));
        }
    }
    if let Some(from) = filter.from {
        let p = params.bind(from);
        conditions.push(format!("created_at >= {p}"));
    }
    if let Some(to) = filter.to {
        let p = params.bind(to);
        conditions.push(format!("created_at < {p}"));
    }
    let (newest_first, cursor) = match at {
        PageAt::First => (true, None),
        PageAt::Before(c) => (true, Some(c)),
        PageAt::After(c) => (false, Some(c)),
    };
    if let Some(c) = cursor {
        let t = params.bind(c.created_at);
        let i = params.bind(c.id);
        let op = if newest_first { "<" } else { ">" };
        conditions.push(format!("(created_at, id) {op} ({t}, {i})"));
    }
    let order = if newest_first {
        "created_at DESC, id DESC"
    } else {
        "created_at, id"
    };
    // One more than a page tells whether another page follows.
    let fetch = params.bind(limit + 1);
    let where_ = if conditions.is_empty() {
        "true".to_owned()
    } else {
        conditions.join(" AND ")
    };
    let statuses: &[NotificationStatus] = if filter.statuses.is_empty() {
        &NotificationStatus::ALL
    } else {
        &filter.statuses
    };
    let mut branches = String::new();
    for (i, status) in statuses.iter().enumerate() {
        if i > 0 {
            branches.push_str("\n  UNION ALL\n");
        }
        let _ = write!(
            branches,
            "  (SELECT {} FROM {} WHERE {where_} ORDER BY {order} LIMIT {fetch})",
            columns(*status),
            status.table()
        );
    }
    let sql = format!(
        "SELECT n.*, e.event_id AS event_uuid, e.action FROM (\n  SELECT * FROM (\n{branches}\n  ) u \
         ORDER BY {order} LIMIT {fetch}\n) n LEFT JOIN walhook.event e ON e.id = n.event_id ORDER BY n.{}",
        order.replace(", ", ", n.")
    );
    Ok(Some(Statement {
        sql,
        params,
        limit,
        newest_first,
    }))
}

/// Searches notifications in every status table the filter allows; at most `limit` rows
/// (1..=[`MAX_PAGE`]) per page.
pub async fn search(
    client: &Client,
    filter: &SearchFilter,
    at: PageAt,
    limit: i64,
) -> Result<SearchPage, QueueError> {
    let err = || db_error("searching notifications", USE);
    let Some(st) = statement(client, filter, at, limit).await? else {
        return Ok(SearchPage {
            unknown_event: true,
            ..SearchPage::default()
        });
    };
    let rows = client
        .query(st.sql.as_str(), &st.params.refs())
        .await
        .map_err(err())?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(read_row(row).map_err(err())?);
    }
    let page = usize::try_from(st.limit).unwrap_or(usize::MAX);
    let more = out.len() > page;
    out.truncate(page);
    if !st.newest_first {
        out.reverse();
    }
    let (older, newer) = match at {
        PageAt::First => (more.then(|| out.last().map(NotificationRow::cursor)), None),
        // Coming from a newer page, there is one to go back to.
        PageAt::Before(_) => (
            more.then(|| out.last().map(NotificationRow::cursor)),
            Some(out.first().map(NotificationRow::cursor)),
        ),
        PageAt::After(_) => (
            Some(out.last().map(NotificationRow::cursor)),
            more.then(|| out.first().map(NotificationRow::cursor)),
        ),
    };
    Ok(SearchPage {
        rows: out,
        older: older.flatten(),
        newer: newer.flatten(),
        unknown_event: false,
    })
}

/// The plan of [`search`]'s statement for the same arguments, run with
/// `EXPLAIN (ANALYZE, BUFFERS)`: for benchmarks and for DBAs checking the indexes.
pub async fn explain_search(
    client: &Client,
    filter: &SearchFilter,
    at: PageAt,
    limit: i64,
) -> Result<String, QueueError> {
    let err = || db_error("explaining a notification search", USE);
    let Some(st) = statement(client, filter, at, limit).await? else {
        return Ok("(no such event: nothing to search)".to_owned());
    };
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {}", st.sql);
    let rows = client
        .query(sql.as_str(), &st.params.refs())
        .await
        .map_err(err())?;
    let mut out = String::new();
    for row in rows {
        out.push_str(&row.try_get::<_, String>(0).map_err(err())?);
        out.push('\n');
    }
    Ok(out)
}

fn read_row(row: &tokio_postgres::Row) -> Result<NotificationRow, tokio_postgres::Error> {
    let status: String = row.try_get(1)?;
    Ok(NotificationRow {
        id: row.try_get(0)?,
        // The branches spell the statuses; an unknown one cannot come back.
        status: NotificationStatus::parse(&status).unwrap_or(NotificationStatus::New),
        listener: row.try_get(2)?,
        event_row_id: row.try_get(3)?,
        entity: row.try_get(4)?,
        entity_id: row.try_get(5)?,
        attempts: row.try_get(6)?,
        created_at: row.try_get(7)?,
        at: row.try_get(8)?,
        next_attempt_at: row.try_get(9)?,
        status_code: row.try_get(10)?,
        latency_ms: row.try_get(11)?,
        comment: row.try_get(12)?,
        reason: row.try_get(13)?,
        event_uuid: row.try_get(14)?,
        action: row.try_get(15)?,
    })
}

/// One event with every notification of it.
#[derive(Clone, Debug, PartialEq)]
pub struct EventDetail {
    /// `walhook.event.id`.
    pub row_id: i64,
    /// The event as the dispatcher reads it for delivery.
    pub event: StoredEvent,
    /// Source transaction id.
    pub xid: i64,
    /// When walhook stored it.
    pub queued_at: SystemTime,
    /// Its notifications, one per listener (and status), newest first.
    pub notifications: Vec<NotificationRow>,
}

/// Most notifications of one event listed on its page (one per listener, normally).
const MAX_EVENT_NOTIFICATIONS: i64 = MAX_PAGE;

/// Reads the event with stable id `event` and its notifications; `None` when
/// `walhook.event` does not hold it (never queued, or pruned).
pub async fn event_detail(client: &Client, event: Uuid) -> Result<Option<EventDetail>, QueueError> {
    const CONTEXT: &str = "reading an event";
    let err = || db_error(CONTEXT, USE);
    let sql = format!(
        "SELECT e.id, e.xid, e.queued_at, {STORED_EVENT_COLUMNS} FROM walhook.event e \
         WHERE e.event_id = $1 ORDER BY e.id LIMIT 1"
    );
    let Some(row) = client.query_opt(&sql, &[&event]).await.map_err(err())? else {
        return Ok(None);
    };
    let stored = stored_event(&row, 3).map_err(|detail| QueueError::Unstorable {
        detail: format!("event {event} cannot be read: {detail}"),
    })?;
    let filter = SearchFilter {
        event: Some(event),
        ..SearchFilter::default()
    };
    let page = search(client, &filter, PageAt::First, MAX_EVENT_NOTIFICATIONS).await?;
    Ok(Some(EventDetail {
        row_id: row.try_get(0).map_err(err())?,
        xid: row.try_get(1).map_err(err())?,
        queued_at: row.try_get(2).map_err(err())?,
        event: stored,
        notifications: page.rows,
    }))
}

const EVENT_OF_NOTIFICATION: &str = "SELECT e.event_id FROM (
    SELECT event_id FROM walhook.new WHERE id = $1
    UNION ALL SELECT event_id FROM walhook.processed WHERE id = $1
    UNION ALL SELECT event_id FROM walhook.failed WHERE id = $1
    UNION ALL SELECT event_id FROM walhook.discarded WHERE id = $1
) n JOIN walhook.event e ON e.id = n.event_id LIMIT 1";

/// The stable event id of notification `id`; `None` when there is no such notification or
/// its event was pruned.
pub async fn event_of_notification(client: &Client, id: i64) -> Result<Option<Uuid>, QueueError> {
    let row = client
        .query_opt(EVENT_OF_NOTIFICATION, &[&id])
        .await
        .map_err(db_error("looking up a notification's event", USE))?;
    row.map(|r| r.try_get(0))
        .transpose()
        .map_err(db_error("looking up a notification's event", USE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_junk() {
        let c = Cursor {
            created_at: UNIX_EPOCH + Duration::from_micros(1_714_566_896_123_456),
            id: 42,
        };
        assert_eq!(c.encode(), "1714566896123456_42");
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for junk in [
            "",
            "_",
            "1_",
            "_1",
            "x_1",
            "1_x",
            "1-2",
            "99999999999999999999_1",
        ] {
            assert_eq!(Cursor::decode(junk), None, "{junk}");
        }
    }

    #[test]
    fn every_status_branch_selects_the_same_number_of_columns() {
        let n = |s| columns(s).split(',').count();
        for status in NotificationStatus::ALL {
            assert_eq!(n(status), 14, "{status}");
        }
    }
}

//! The `walhook status` report: per listener its backlog, oldest undelivered notification
//! and last error, the replication slot, and the events stored, read in one snapshot with
//! the database server's clock.

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::admin::NotificationStatus;
use super::{Needs, QueueError, QueueState, db_error, read_state};
use crate::types::Lsn;

const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

/// The whole `walhook status` report, read with the database server's clock.
#[derive(Clone, Debug)]
pub struct Status {
    /// The server's `now()` when the report was read; every age is relative to it.
    pub now: SystemTime,
    /// One entry per listener in the configuration or in the queue tables, by name.
    pub listeners: Vec<ListenerStatus>,
    /// The replication slot named in the configuration.
    pub slot: SlotStatus,
    /// `walhook.event` totals.
    pub events: EventStatus,
    /// The `walhook.state` row, `None` before walhook first ran.
    pub state: Option<QueueState>,
}

/// Queue counts and the last error of one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStatus {
    /// Listener name.
    pub name: String,
    /// Whether the listener is in the configuration (false: only its history is left).
    pub configured: bool,
    /// Rows in `walhook.new`.
    pub new: i64,
    /// New rows whose `next_attempt_at` has come (due now).
    pub due: i64,
    /// New rows waiting for a retry (`next_attempt_at` in the future).
    pub waiting: i64,
    /// Rows in `walhook.processed`.
    pub processed: i64,
    /// Rows in `walhook.failed`.
    pub failed: i64,
    /// `created_at` of the oldest New row.
    pub oldest_undelivered: Option<SystemTime>,
    /// The most recent delivery error among its New and Failed rows.
    pub last_error: Option<LastError>,
}

impl ListenerStatus {
    /// A listener with no rows in any status table.
    fn empty(name: String, configured: bool) -> ListenerStatus {
        ListenerStatus {
            name,
            configured,
            new: 0,
            due: 0,
            waiting: 0,
            processed: 0,
            failed: 0,
            oldest_undelivered: None,
            last_error: None,
        }
    }

    /// Age of the oldest New row at `now`.
    pub fn oldest_undelivered_age(&self, now: SystemTime) -> Option<Duration> {
        self.oldest_undelivered
            .map(|t| now.duration_since(t).unwrap_or_default())
    }
}

/// The latest comment a delivery attempt left on a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    /// What failed.
    pub of: ErrorOf,
    /// Where it is now (New: retrying; Failed: given up).
    pub status: NotificationStatus,
    /// When the attempt was made (New: `last_attempt_at`; Failed: `failed_at`).
    pub at: SystemTime,
    /// HTTP status of that attempt, if there was an answer.
    pub status_code: Option<i32>,
    /// The error in plain words.
    pub comment: String,
}

/// What a [`LastError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorOf {
    /// A notification in `walhook.new` or `walhook.failed`, by id.
    Notification(i64),
    /// The `walhook.event` row a cursor listener's retries hold it at.
    HeldEvent(i64),
}

impl ErrorOf {
    /// The notification's id, when the error is a notification's.
    pub fn notification(self) -> Option<i64> {
        match self {
            ErrorOf::Notification(id) => Some(id),
            ErrorOf::HeldEvent(_) => None,
        }
    }

    /// The held event's id, when the error holds a cursor listener.
    pub fn held_event(self) -> Option<i64> {
        match self {
            ErrorOf::Notification(_) => None,
            ErrorOf::HeldEvent(id) => Some(id),
        }
    }
}

/// The replication slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotStatus {
    /// Slot name (from the configuration).
    pub name: String,
    /// Details, `None` when the slot does not exist.
    pub found: Option<SlotDetails>,
}

/// A slot that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotDetails {
    /// Whether a walsender is streaming from it.
    pub active: bool,
    /// PID of the walsender streaming from it.
    pub active_pid: Option<i32>,
    /// Up to where the consumer confirmed (the server may discard WAL before it).
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot keeps.
    pub restart_lsn: Option<Lsn>,
    /// The server's current WAL position.
    pub current_lsn: Option<Lsn>,
    /// Bytes between `confirmed_flush_lsn` and the current WAL position.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL kept for the slot (current position minus `restart_lsn`).
    pub retained_bytes: Option<i64>,
}

/// `walhook.event` totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventStatus {
    /// Rows in `walhook.event`.
    pub total: i64,
    /// Latest source commit time among them.
    pub latest_commit_time: Option<SystemTime>,
    /// When the latest of them was queued.
    pub latest_queued_at: Option<SystemTime>,
}

const SERVER_NOW: &str = "SELECT now()";

/// Counts per listener and table. One scan each; `walhook.processed` may be large, but the
/// status command is run by hand, not in a loop.
/// A cursor listener's events after its cursor count as New (and due).
const LISTENER_COUNTS: &str = concat!(
    "SELECT listener, sum(new)::bigint, sum(due)::bigint,
       sum(processed)::bigint, sum(failed)::bigint, min(oldest)
FROM (
    SELECT listener, count(*) AS new, count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
           0 AS processed, 0 AS failed, min(created_at) AS oldest
    FROM walhook.new GROUP BY listener
    UNION ALL
    SELECT listener, 0, 0, count(*), 0, NULL FROM walhook.processed GROUP BY listener
    UNION ALL
    SELECT listener, 0, 0, 0, count(*), NULL FROM walhook.failed GROUP BY listener
    UNION ALL
    SELECT b.listener, b.backlog, b.backlog, 0, 0, b.oldest FROM (",
    super::cursor_backlog!(),
    ") b
) counts
GROUP BY listener"
);

/// The latest comment per listener among New rows (tried at least once) and Failed rows.
/// A cursor listener held by retries counts as New, about the event it is held at (`held`).
const LAST_ERRORS: &str =
    "SELECT DISTINCT ON (listener) listener, id, status, at, last_status_code, comment, held
FROM (
    SELECT listener, id, 'New' AS status, last_attempt_at AS at, last_status_code, comment,
           false AS held
    FROM walhook.new WHERE comment IS NOT NULL AND last_attempt_at IS NOT NULL
    UNION ALL
    SELECT listener, id, 'Failed', failed_at, last_status_code, comment, false
    FROM walhook.failed WHERE comment IS NOT NULL
    UNION ALL
    SELECT listener, held_event_id, 'New', last_attempt_at, last_status_code, comment, true
    FROM walhook.listener_cursor
    WHERE comment IS NOT NULL AND last_attempt_at IS NOT NULL AND held_event_id IS NOT NULL
) errors
ORDER BY listener, at DESC, id DESC";

const EVENT_TOTALS: &str = "SELECT count(*), max(commit_time), max(queued_at) FROM walhook.event";

/// pg_current_wal_lsn() fails on a standby; a standby has no logical slot of ours anyway.
const SLOT: &str = "SELECT active, active_pid, confirmed_flush_lsn, restart_lsn,
       pg_current_wal_lsn(),
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = $1";

/// Reads the status report: `listeners` are the configured listener names (listed even
/// when they have no rows yet), `slot` the configured slot name.
pub async fn status(
    client: &Client,
    listeners: &[String],
    slot: &str,
) -> Result<Status, QueueError> {
    const CONTEXT: &str = "reading the queue status";
    let err = || db_error(CONTEXT, USE);
    let now: SystemTime = client
        .query_one(SERVER_NOW, &[])
        .await
        .map_err(err())?
        .try_get(0)
        .map_err(err())?;

    let mut out: Vec<ListenerStatus> = listeners
        .iter()
        .map(|name| ListenerStatus::empty(name.clone(), true))
        .collect();
    let entry = |out: &mut Vec<ListenerStatus>, name: String| -> usize {
        if let Some(i) = out.iter().position(|l| l.name == name) {
            return i;
        }
        out.push(ListenerStatus::empty(name, false));
        out.len() - 1
    };

    for row in client.query(LISTENER_COUNTS, &[]).await.map_err(err())? {
        let i = entry(&mut out, row.try_get(0).map_err(err())?);
        let Some(l) = out.get_mut(i) else { continue };
        l.new = row.try_get(1).map_err(err())?;
        l.due = row.try_get(2).map_err(err())?;
        l.waiting = l.new.saturating_sub(l.due);
        l.processed = row.try_get(3).map_err(err())?;
        l.failed = row.try_get(4).map_err(err())?;
        l.oldest_undelivered = row.try_get(5).map_err(err())?;
    }
    for row in client.query(LAST_ERRORS, &[]).await.map_err(err())? {
        let i = entry(&mut out, row.try_get(0).map_err(err())?);
        let status: String = row.try_get(2).map_err(err())?;
        let Some(l) = out.get_mut(i) else { continue };
        let id: i64 = row.try_get(1).map_err(err())?;
        let held: bool = row.try_get(6).map_err(err())?;
        l.last_error = Some(LastError {
            of: if held {
                ErrorOf::HeldEvent(id)
            } else {
                ErrorOf::Notification(id)
            },
            status: NotificationStatus::parse(&status).unwrap_or(NotificationStatus::New),
            at: row.try_get(3).map_err(err())?,
            status_code: row.try_get(4).map_err(err())?,
            comment: row.try_get(5).map_err(err())?,
        });
    }
    // Configured listeners first in config order, then leftovers by name.
    let configured = listeners.len();
    if let Some(rest) = out.get_mut(configured..) {
        rest.sort_by(|a, b| a.name.cmp(&b.name));
    }

    let row = client.query_one(EVENT_TOTALS, &[]).await.map_err(err())?;
    let events = EventStatus {
        total: row.try_get(0).map_err(err())?,
        latest_commit_time: row.try_get(1).map_err(err())?,
        latest_queued_at: row.try_get(2).map_err(err())?,
    };

    let slot_ctx = || db_error("reading pg_replication_slots", None);
    let found = match client.query_opt(SLOT, &[&slot]).await.map_err(slot_ctx())? {
        None => None,
        Some(row) => {
            let lsn = |i: usize| -> Result<Option<Lsn>, QueueError> {
                let v: Option<PgLsn> = row.try_get(i).map_err(slot_ctx())?;
                Ok(v.map(|l| Lsn(u64::from(l))))
            };
            Some(SlotDetails {
                active: row.try_get(0).map_err(slot_ctx())?,
                active_pid: row.try_get(1).map_err(slot_ctx())?,
                confirmed_flush_lsn: lsn(2)?,
                restart_lsn: lsn(3)?,
                current_lsn: lsn(4)?,
                lag_bytes: row.try_get(5).map_err(slot_ctx())?,
                retained_bytes: row.try_get(6).map_err(slot_ctx())?,
            })
        }
    };

    Ok(Status {
        now,
        listeners: out,
        slot: SlotStatus {
            name: slot.to_owned(),
            found,
        },
        events,
        state: read_state(client).await?,
    })
}

//! Stored events for manual sends: reading one back (`walhook test-listener --event/--id`)
//! and sending one again to a listener as a new notification (`walhook retry --event`).

use tokio_postgres::Client;
use uuid::Uuid;

use super::notifications::{STORED_EVENT_COLUMNS as EVENT_COLUMNS, stored_event as read_event};
use super::{Needs, QueueError, StoredEvent, db_error};

const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

/// What [`resend`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resent {
    /// A new notification (this id) waits in `walhook.new`.
    Created(i64),
    /// The event is already waiting for that listener in `walhook.new` (this notification):
    /// nothing was added.
    AlreadyPending(i64),
    /// No stored event has this id (never captured, or pruned after retention).
    NoSuchEvent,
}

/// The stored event with this id.
pub async fn stored_event(
    client: &Client,
    event_id: Uuid,
) -> Result<Option<StoredEvent>, QueueError> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM walhook.event e WHERE e.event_id = $1 LIMIT 1");
    read_one(
        client,
        &sql,
        &[&event_id],
        "reading an event from walhook.event",
    )
    .await
}

/// The latest stored event of one entity.
pub async fn latest_event(
    client: &Client,
    entity: &str,
    entity_id: &str,
) -> Result<Option<StoredEvent>, QueueError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM walhook.event e WHERE e.entity = $1 AND e.entity_id = $2
         ORDER BY e.commit_lsn DESC, e.seq DESC LIMIT 1"
    );
    read_one(
        client,
        &sql,
        &[&entity, &entity_id],
        "reading an entity's latest event from walhook.event",
    )
    .await
}

async fn read_one(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    context: &'static str,
) -> Result<Option<StoredEvent>, QueueError> {
    let Some(row) = client
        .query_opt(sql, params)
        .await
        .map_err(db_error(context, USE))?
    else {
        return Ok(None);
    };
    read_event(&row, 0)
        .map(Some)
        .map_err(|detail| QueueError::Unreadable { detail })
}

/// Finds the event and a notification of it still waiting for the listener.
const LOCATE: &str = "SELECT e.id,
       (SELECT n.id FROM walhook.new n WHERE n.event_id = e.id AND n.listener = $2 LIMIT 1)
FROM walhook.event e WHERE e.event_id = $1 LIMIT 1";

/// A new notification of event $1 (walhook.event.id) for listener $2; its comment says why
/// it exists. It keeps the event's commit position, so it goes before newer changes of the
/// entity that still wait for this listener.
const INSERT: &str =
    "INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq, comment)
SELECT nextval('walhook.notification_id_seq'), e.id, $2, e.entity, e.entity_id, e.commit_lsn, e.seq,
       'sent again by walhook retry --event at '
         || to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
FROM walhook.event e WHERE e.id = $1
RETURNING id";

/// Sends stored event `event_id` again to `listener`: one new notification in
/// `walhook.new`, due now; the earlier ones stay where they are (history is kept).
pub async fn resend(client: &Client, event_id: Uuid, listener: &str) -> Result<Resent, QueueError> {
    let err = || db_error("adding a notification to walhook.new", USE);
    let Some(found) = client
        .query_opt(LOCATE, &[&event_id, &listener])
        .await
        .map_err(err())?
    else {
        return Ok(Resent::NoSuchEvent);
    };
    let id: i64 = found.try_get(0).map_err(err())?;
    if let Some(pending) = found.try_get::<_, Option<i64>>(1).map_err(err())? {
        return Ok(Resent::AlreadyPending(pending));
    }
    let created: i64 = client
        .query_one(INSERT, &[&id, &listener])
        .await
        .map_err(err())?
        .try_get(0)
        .map_err(err())?;
    // The row is there already; a dispatcher that misses the wake-up finds it by polling.
    if let Err(e) = client
        .execute("SELECT pg_notify('walhook_new', '')", &[])
        .await
    {
        tracing::warn!(error = %e, "could not wake the dispatchers; they find the notification on their next poll");
    }
    Ok(Resent::Created(created))
}

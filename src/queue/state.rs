//! The single `walhook.state` row: which source this queue belongs to and how far it is flushed.

use std::time::SystemTime;

use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use super::{Needs, QueueError, db_error};
use crate::types::Lsn;

/// The contents of `walhook.state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// The source cluster's system identifier (from `IDENTIFY_SYSTEM`).
    pub system_identifier: Option<String>,
    /// The source database.
    pub database_name: Option<String>,
    /// The replication slot.
    pub slot_name: Option<String>,
    /// End LSN of the last source commit whose events are committed in the queue.
    pub flushed_lsn: Option<Lsn>,
    /// When the row last changed.
    pub updated_at: SystemTime,
}

/// Permission errors here mean the role may not use the schema.
const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

const READ_STATE: &str =
    "SELECT system_identifier, database_name, slot_name, flushed_lsn, updated_at
FROM walhook.state WHERE id = 1";

/// Upserts the source; the flushed LSN belongs to one system and slot, so it is forgotten
/// when either changes (a database restored from another server, a renamed slot).
const RECORD_SOURCE: &str =
    "INSERT INTO walhook.state AS s (id, system_identifier, database_name, slot_name, updated_at)
VALUES (1, $1, $2, $3, now())
ON CONFLICT (id) DO UPDATE SET
    system_identifier = EXCLUDED.system_identifier,
    database_name = EXCLUDED.database_name,
    slot_name = EXCLUDED.slot_name,
    flushed_lsn = CASE
        WHEN (s.system_identifier IS NULL OR s.system_identifier = EXCLUDED.system_identifier)
         AND (s.slot_name IS NULL OR s.slot_name = EXCLUDED.slot_name)
        THEN s.flushed_lsn
    END,
    updated_at = now()";

/// Reads `walhook.state`; `None` before the first [`record_source`] or flushed batch.
pub async fn read_state(client: &Client) -> Result<Option<QueueState>, QueueError> {
    const CONTEXT: &str = "reading walhook.state";
    let Some(row) = client
        .query_opt(READ_STATE, &[])
        .await
        .map_err(db_error(CONTEXT, USE))?
    else {
        return Ok(None);
    };
    let flushed: Option<PgLsn> = row.try_get(3).map_err(db_error(CONTEXT, USE))?;
    Ok(Some(QueueState {
        system_identifier: row.try_get(0).map_err(db_error(CONTEXT, USE))?,
        database_name: row.try_get(1).map_err(db_error(CONTEXT, USE))?,
        slot_name: row.try_get(2).map_err(db_error(CONTEXT, USE))?,
        flushed_lsn: flushed.map(|l| Lsn(u64::from(l))),
        updated_at: row.try_get(4).map_err(db_error(CONTEXT, USE))?,
    }))
}

/// Records which source system, database and slot feed this queue. A change of system or
/// slot clears `flushed_lsn`; compare with [`read_state`] first to refuse such a change.
pub async fn record_source(
    client: &Client,
    system_id: &str,
    database: &str,
    slot: &str,
) -> Result<(), QueueError> {
    client
        .execute(RECORD_SOURCE, &[&system_id, &database, &slot])
        .await
        .map_err(db_error("recording the source in walhook.state", USE))?;
    Ok(())
}

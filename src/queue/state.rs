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

/// A gap in capture recorded by `walhook setup --accept-gap` (a row of `walhook.capture_gap`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureGap {
    /// Row id.
    pub id: i64,
    /// The slot that was lost.
    pub slot_name: String,
    /// Why it was lost, in plain words.
    pub reason: String,
    /// End of the last source commit captured before the gap.
    pub last_flushed_lsn: Lsn,
    /// Where capture started again.
    pub resumed_lsn: Lsn,
    /// When the gap was accepted.
    pub accepted_at: SystemTime,
    /// Who accepted it (the database role).
    pub accepted_by: String,
}

const UNALERTED_GAPS: &str = "SELECT id, slot_name, reason, last_flushed_lsn, resumed_lsn,
    accepted_at, accepted_by
FROM walhook.capture_gap WHERE alerted_at IS NULL AND resumed_lsn IS NOT NULL ORDER BY id";

const MARK_GAP_ALERTED: &str = "UPDATE walhook.capture_gap SET alerted_at = now() WHERE id = $1";

/// Opens a gap: the slot was lost after `last_flushed`; where capture resumes is filled in
/// by [`complete_gaps`] once the slot exists again.
const OPEN_GAP: &str = "INSERT INTO walhook.capture_gap (slot_name, reason, last_flushed_lsn)
SELECT $1::text, $2::text, $3::pg_lsn
WHERE NOT EXISTS (SELECT 1 FROM walhook.capture_gap WHERE slot_name = $1::text AND resumed_lsn IS NULL)";

/// Fills in where capture resumes (the slot's confirmed position) for the open gaps of slot
/// $1, and moves `walhook.state` there, so the next start streams instead of reporting the
/// gap again.
const COMPLETE_GAPS: &str = "WITH slot AS (
    SELECT confirmed_flush_lsn AS lsn FROM pg_replication_slots
    WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL
), gap AS (
    UPDATE walhook.capture_gap g SET resumed_lsn = slot.lsn
    FROM slot WHERE g.slot_name = $1 AND g.resumed_lsn IS NULL
    RETURNING g.resumed_lsn
)
UPDATE walhook.state s SET flushed_lsn = (SELECT max(resumed_lsn) FROM gap), updated_at = now()
WHERE s.id = 1 AND EXISTS (SELECT 1 FROM gap)
RETURNING s.flushed_lsn";

const OPEN_GAP_EXISTS: &str = "SELECT to_regclass('walhook.capture_gap') IS NOT NULL
    AND EXISTS (SELECT 1 FROM walhook.capture_gap WHERE slot_name = $1 AND resumed_lsn IS NULL)";

/// The SQL of [`open_gap`] and [`complete_gaps`] around re-creating the slot, for
/// `walhook setup --print-sql` (values inlined).
pub fn gap_sql(slot: &str, reason: &str, last_flushed: Lsn, recreate: &str) -> String {
    use crate::types::quote_literal;
    let slot = quote_literal(slot);
    let open = OPEN_GAP
        .replace("$1", &slot)
        .replace("$2", &quote_literal(reason))
        .replace(
            "$3",
            &format!("{}::pg_lsn", quote_literal(&last_flushed.to_string())),
        );
    format!("{open};\n{recreate}{};", COMPLETE_GAPS.replace("$1", &slot))
}

/// Records that the slot was lost after `last_flushed` (an accepted gap, still open).
pub async fn open_gap(
    client: &Client,
    slot: &str,
    reason: &str,
    last_flushed: Lsn,
) -> Result<(), QueueError> {
    client
        .execute(OPEN_GAP, &[&slot, &reason, &PgLsn::from(last_flushed.0)])
        .await
        .map_err(db_error("recording the gap in walhook.capture_gap", USE))?;
    Ok(())
}

/// Whether an accepted gap of `slot` waits for the slot to exist again.
pub async fn open_gap_exists(client: &Client, slot: &str) -> Result<bool, QueueError> {
    const CONTEXT: &str = "reading walhook.capture_gap";
    client
        .query_one(OPEN_GAP_EXISTS, &[&slot])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(CONTEXT, USE))
}

/// Completes the open gaps of `slot`, which must exist; returns where capture resumes,
/// `None` when no gap was open.
pub async fn complete_gaps(client: &Client, slot: &str) -> Result<Option<Lsn>, QueueError> {
    const CONTEXT: &str = "completing the gap in walhook.capture_gap";
    let row = client
        .query_opt(COMPLETE_GAPS, &[&slot])
        .await
        .map_err(db_error(CONTEXT, USE))?;
    let resumed: Option<PgLsn> = match row {
        Some(r) => r.try_get(0).map_err(db_error(CONTEXT, USE))?,
        None => None,
    };
    Ok(resumed.map(|l| Lsn(u64::from(l))))
}

/// Gaps the monitors have not been told about yet, oldest first.
pub async fn unalerted_gaps(client: &Client) -> Result<Vec<CaptureGap>, QueueError> {
    const CONTEXT: &str = "reading walhook.capture_gap";
    let rows = client
        .query(UNALERTED_GAPS, &[])
        .await
        .map_err(db_error(CONTEXT, USE))?;
    rows.iter()
        .map(|r| {
            let get_lsn = |i| -> Result<Lsn, QueueError> {
                let l: PgLsn = r.try_get(i).map_err(db_error(CONTEXT, USE))?;
                Ok(Lsn(u64::from(l)))
            };
            Ok(CaptureGap {
                id: r.try_get(0).map_err(db_error(CONTEXT, USE))?,
                slot_name: r.try_get(1).map_err(db_error(CONTEXT, USE))?,
                reason: r.try_get(2).map_err(db_error(CONTEXT, USE))?,
                last_flushed_lsn: get_lsn(3)?,
                resumed_lsn: get_lsn(4)?,
                accepted_at: r.try_get(5).map_err(db_error(CONTEXT, USE))?,
                accepted_by: r.try_get(6).map_err(db_error(CONTEXT, USE))?,
            })
        })
        .collect()
}

/// Notes that the monitors were told about gap `id`.
pub async fn mark_gap_alerted(client: &Client, id: i64) -> Result<(), QueueError> {
    client
        .execute(MARK_GAP_ALERTED, &[&id])
        .await
        .map_err(db_error("updating walhook.capture_gap", USE))?;
    Ok(())
}

const RECORD_START: &str = "UPDATE walhook.state SET flushed_lsn = $1, updated_at = now()
WHERE id = 1 AND flushed_lsn IS NULL";

/// Records where a newly created slot starts as the flushed position, so that losing the
/// slot before the first batch is still recognised as a gap.
pub async fn record_start(client: &Client, lsn: Lsn) -> Result<(), QueueError> {
    client
        .execute(RECORD_START, &[&PgLsn::from(lsn.0)])
        .await
        .map_err(db_error("recording the slot's start in walhook.state", USE))?;
    Ok(())
}

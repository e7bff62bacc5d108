//! Backfills in `walhook.backfill` (see `sql/0010_backfill.sql`): starting, resuming and
//! finishing one, and recording each chunk in the chunk's own transaction.

use std::time::SystemTime;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{QueueError, db_error};

#[cfg(test)]
const COLUMNS: &str = "id, token, status, key_columns, last_key, rows, chunks, \
     last_message_lsn::text, started_at, finished_at";

/// The latest backfill with the same entity, listener and filter that was not replaced.
const LATEST: &str = "SELECT id, token, status, key_columns, last_key, rows, chunks,
       last_message_lsn::text, started_at, finished_at
FROM walhook.backfill
WHERE entity = $1 AND listener IS NOT DISTINCT FROM $2 AND filter IS NOT DISTINCT FROM $3
  AND status <> 'restarted'
ORDER BY id DESC LIMIT 1";

const START: &str = "INSERT INTO walhook.backfill (entity, listener, filter, key_columns, token)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, token, status, key_columns, last_key, rows, chunks,
          last_message_lsn::text, started_at, finished_at";

const REPLACE: &str = "UPDATE walhook.backfill SET status = 'restarted', updated_at = now() WHERE id = $1 AND status = 'running'";

/// One chunk's progress, in the chunk's transaction: after this commits, the next chunk
/// starts after `last_key`.
const RECORD_CHUNK: &str = "UPDATE walhook.backfill
SET last_key = $2, rows = rows + $3, chunks = chunks + 1, last_message_lsn = $4::text::pg_lsn,
    updated_at = now()
WHERE id = $1 AND status = 'running'";

const FINISH: &str = "UPDATE walhook.backfill
SET status = 'finished', finished_at = now(), updated_at = now()
WHERE id = $1 AND status = 'running'";

/// Session lock of one backfill, so two processes never run it at once: (class, id).
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1, ($2::int8 % 2147483647)::int)";

/// The backend holding a backfill's lock, for the message when it is taken.
const LOCK_HOLDER: &str = "SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid::int8 = $1::int8
  AND objid::int8 = ($2::int8 % 2147483647) AND objsubid = 2 AND granted
LIMIT 1";

/// The advisory lock class of backfills ("whbf" in ASCII), recognisable in `pg_locks`.
const LOCK_CLASS: i32 = 0x7768_6266;

/// Whether a backfill can go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Started and not finished: running it again resumes it.
    Running,
    /// Every row was sent.
    Finished,
    /// Replaced by a later run (`--restart`).
    Restarted,
}

/// A backfill as recorded in `walhook.backfill`.
#[derive(Clone, Debug, PartialEq)]
pub struct BackfillRun {
    /// Its id.
    pub id: i64,
    /// The token its chunks carry.
    pub token: Uuid,
    /// Whether it can go on.
    pub status: RunStatus,
    /// The key columns it pages by.
    pub key_columns: Vec<String>,
    /// The text form of the last key sent; `None` before the first chunk.
    pub last_key: Option<Vec<String>>,
    /// Rows sent.
    pub rows: i64,
    /// Chunks sent.
    pub chunks: i64,
    /// The WAL position of the last chunk's message.
    pub last_message_lsn: Option<String>,
    /// When it started.
    pub started_at: SystemTime,
    /// When it finished.
    pub finished_at: Option<SystemTime>,
}

/// What a backfill is for: the arguments that make running it again resume it.
#[derive(Clone, Copy, Debug)]
pub struct RunIdentity<'a> {
    /// The entity.
    pub entity: &'a str,
    /// The one listener, if any.
    pub listener: Option<&'a str>,
    /// The `--where` condition, if any.
    pub filter: Option<&'a str>,
}

fn run_of(row: &tokio_postgres::Row) -> Result<BackfillRun, QueueError> {
    const CONTEXT: &str = "reading walhook.backfill";
    let err = || db_error(CONTEXT, None);
    let status: String = row.try_get(2).map_err(err())?;
    Ok(BackfillRun {
        id: row.try_get(0).map_err(err())?,
        token: row.try_get(1).map_err(err())?,
        status: match status.as_str() {
            "running" => RunStatus::Running,
            "finished" => RunStatus::Finished,
            _ => RunStatus::Restarted,
        },
        key_columns: row.try_get(3).map_err(err())?,
        last_key: row.try_get(4).map_err(err())?,
        rows: row.try_get(5).map_err(err())?,
        chunks: row.try_get(6).map_err(err())?,
        last_message_lsn: row.try_get(7).map_err(err())?,
        started_at: row.try_get(8).map_err(err())?,
        finished_at: row.try_get(9).map_err(err())?,
    })
}

/// The latest backfill for `who` that was not replaced.
pub async fn latest_run(
    client: &impl GenericClient,
    who: RunIdentity<'_>,
) -> Result<Option<BackfillRun>, QueueError> {
    let row = client
        .query_opt(LATEST, &[&who.entity, &who.listener, &who.filter])
        .await
        .map_err(db_error("reading walhook.backfill", None))?;
    row.as_ref().map(run_of).transpose()
}

/// Records a new backfill for `who` paging by `key_columns`.
pub async fn start_run(
    client: &impl GenericClient,
    who: RunIdentity<'_>,
    key_columns: &[String],
) -> Result<BackfillRun, QueueError> {
    let token = Uuid::new_v4();
    let row = client
        .query_one(
            START,
            &[
                &who.entity,
                &who.listener,
                &who.filter,
                &key_columns,
                &token,
            ],
        )
        .await
        .map_err(db_error("recording the backfill in walhook.backfill", None))?;
    run_of(&row)
}

/// Marks running backfill `id` as replaced by a new one.
pub async fn replace_run(client: &impl GenericClient, id: i64) -> Result<(), QueueError> {
    client
        .execute(REPLACE, &[&id])
        .await
        .map_err(db_error("marking the backfill restarted", None))?;
    Ok(())
}

/// Records one chunk of backfill `id`; false when the backfill is no longer running.
pub async fn record_chunk(
    client: &impl GenericClient,
    id: i64,
    last_key: &[String],
    rows: i64,
    message_lsn: &str,
) -> Result<bool, QueueError> {
    let n = client
        .execute(RECORD_CHUNK, &[&id, &last_key, &rows, &message_lsn])
        .await
        .map_err(db_error("recording the chunk in walhook.backfill", None))?;
    Ok(n == 1)
}

/// Marks backfill `id` finished.
pub async fn finish_run(client: &impl GenericClient, id: i64) -> Result<(), QueueError> {
    client
        .execute(FINISH, &[&id])
        .await
        .map_err(db_error("marking the backfill finished", None))?;
    Ok(())
}

/// Takes backfill `id`'s session lock; `Err(Some(pid))` (or `Err(None)`) when another
/// session holds it.
pub async fn lock_run(
    client: &impl GenericClient,
    id: i64,
) -> Result<Result<(), Option<i32>>, QueueError> {
    const CONTEXT: &str = "locking the backfill";
    let got: bool = client
        .query_one(TRY_LOCK, &[&LOCK_CLASS, &id])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(CONTEXT, None))?;
    if got {
        return Ok(Ok(()));
    }
    let holder = client
        .query_opt(LOCK_HOLDER, &[&i64::from(LOCK_CLASS), &id])
        .await
        .map_err(db_error(CONTEXT, None))?
        .and_then(|r| r.try_get::<_, i32>(0).ok());
    Ok(Err(holder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_list_matches_every_statement_that_returns_a_run() {
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(squash(LATEST).contains(&squash(COLUMNS)));
        assert!(squash(START).contains(&squash(COLUMNS)));
    }
}

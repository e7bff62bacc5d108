//! `walhook.rejected`: changes capture set aside instead of queuing, and which database
//! errors mean "this row" rather than "every row".

use tokio_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{PgLsn, ToSql};

use super::{QueueError, db_error};
use crate::mapper::RejectedChange;

/// One statement for the whole set; rows are few, but an entity whose id column was dropped
/// sets aside every change, so not one statement per row.
const INSERT_REJECTED: &str = r#"INSERT INTO walhook.rejected (commit_lsn, seq, xid,
    commit_time, entity, entity_id, action, source_table, reason, sqlstate, "row", old)
SELECT * FROM unnest($1::pg_lsn[], $2::int[], $3::bigint[], $4::timestamptz[], $5::text[],
    $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
ON CONFLICT (commit_lsn, seq) DO NOTHING"#;

const SAVEPOINT: &str = "SAVEPOINT walhook_rejected";
const RELEASE: &str = "RELEASE SAVEPOINT walhook_rejected";
const ROLLBACK: &str = "ROLLBACK TO SAVEPOINT walhook_rejected";

/// Whether the server refused one row for its content (bad value, size limit, constraint),
/// so the batch's other rows can still be stored. A duplicate key is not such a refusal:
/// it means the row is already stored.
pub(crate) fn refuses_the_row(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    let code = code.code();
    // 22: data exception (\u0000 in jsonb, invalid text); 54: program limit exceeded
    // (jsonb or row size); 23: integrity constraint violation.
    (code.starts_with("22") || code.starts_with("54") || code.starts_with("23"))
        && code != SqlState::UNIQUE_VIOLATION.code()
}

/// The server's words for a refused row, as stored in `reason`.
pub(crate) fn refusal(e: &tokio_postgres::Error) -> (String, Option<String>) {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("the queue database refused the event: {}", db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            (text, Some(db.code().code().to_owned()))
        }
        None => (format!("the queue database refused the event: {e}"), None),
    }
}

/// Stores `changes` in `walhook.rejected` inside `tx` (already stored ones are skipped). A
/// change whose row text itself cannot be stored is kept without it, its reason saying so.
pub(crate) async fn insert(
    tx: &Transaction<'_>,
    changes: &[RejectedChange],
) -> Result<(), QueueError> {
    if changes.is_empty() {
        return Ok(());
    }
    const CONTEXT: &str = "storing set-aside changes in walhook.rejected";
    let savepoint =
        |sql| async move { tx.batch_execute(sql).await.map_err(db_error(CONTEXT, None)) };
    savepoint(SAVEPOINT).await?;
    match insert_all(tx, changes.iter().cloned()).await {
        Ok(()) => return savepoint(RELEASE).await,
        Err(e) if refuses_the_row(&e) => savepoint(ROLLBACK).await?,
        Err(e) => return Err(db_error(CONTEXT, None)(e)),
    }
    // One of them is refused: store them one by one, the refused ones without their row.
    for change in changes {
        savepoint(SAVEPOINT).await?;
        match insert_all(tx, std::iter::once(change.clone())).await {
            Ok(()) => savepoint(RELEASE).await?,
            Err(e) if refuses_the_row(&e) => {
                savepoint(ROLLBACK).await?;
                let (why, _) = refusal(&e);
                let bare = RejectedChange {
                    reason: format!(
                        "{}; the row text could not be stored either: {why}",
                        change.reason
                    ),
                    row: None,
                    old: None,
                    ..change.clone()
                };
                insert_all(tx, std::iter::once(bare))
                    .await
                    .map_err(db_error(CONTEXT, None))?;
            }
            Err(e) => return Err(db_error(CONTEXT, None)(e)),
        }
    }
    Ok(())
}

async fn insert_all(
    tx: &Transaction<'_>,
    changes: impl Iterator<Item = RejectedChange>,
) -> Result<(), tokio_postgres::Error> {
    let mut cols = Columns::default();
    for c in changes {
        cols.commit_lsn.push(PgLsn::from(c.commit_lsn.0));
        cols.seq.push(i32::try_from(c.seq).unwrap_or(i32::MAX));
        cols.xid.push(i64::from(c.xid.0));
        cols.commit_time
            .push(super::writer::TimestampTz(c.commit_time));
        cols.entity.push(c.entity.as_str().to_owned());
        cols.entity_id.push(c.entity_id);
        cols.action.push(c.action.as_str().to_owned());
        cols.table.push(c.table.to_string());
        cols.reason.push(c.reason);
        cols.sqlstate.push(c.sqlstate);
        cols.row.push(c.row);
        cols.old.push(c.old);
    }
    let params: [&(dyn ToSql + Sync); 12] = [
        &cols.commit_lsn,
        &cols.seq,
        &cols.xid,
        &cols.commit_time,
        &cols.entity,
        &cols.entity_id,
        &cols.action,
        &cols.table,
        &cols.reason,
        &cols.sqlstate,
        &cols.row,
        &cols.old,
    ];
    tx.execute(INSERT_REJECTED, &params).await.map(|_| ())
}

/// The rejected changes as column arrays, for unnest.
#[derive(Default)]
struct Columns {
    commit_lsn: Vec<PgLsn>,
    seq: Vec<i32>,
    xid: Vec<i64>,
    commit_time: Vec<super::writer::TimestampTz>,
    entity: Vec<String>,
    entity_id: Vec<Option<String>>,
    action: Vec<String>,
    table: Vec<String>,
    reason: Vec<String>,
    sqlstate: Vec<Option<String>>,
    row: Vec<Option<String>>,
    old: Vec<Option<String>>,
}

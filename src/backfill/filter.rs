//! `--where`: checked before anything is sent, and watched while chunks are read.
//!
//! The chunk queries are prepared with the extended protocol, which parses exactly one
//! statement: a second statement (`true; drop table x`), a syntax error, an unknown column or
//! a condition that is not boolean fails there. The condition then runs on the first rows in
//! a READ ONLY transaction, so one that writes fails before the backfill starts. Chunks lock
//! their rows and so cannot run read-only: the session's row counts before and after each
//! chunk's read show whether the condition wrote anything, and such a chunk is rolled back.

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement, Transaction};

use super::table::TableShape;
use super::{BackfillError, BackfillOptions};

/// Rows this session inserted, updated or deleted in user tables and did not yet report to
/// the statistics (PostgreSQL's "xact" counters include earlier transactions' until then):
/// compared before and after a read, they show what the read wrote.
const WRITES_IN_TX: &str = "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::int8
FROM pg_stat_xact_user_tables";

/// The prepared chunk queries.
pub(super) struct Statements {
    /// The first chunk's (no key to start after).
    pub(super) first: Statement,
    /// The later chunks' (after the key in the parameters).
    pub(super) next: Statement,
}

/// Prepares the chunk queries and probes `--where` read-only; a filter that is not a usable
/// condition fails here, before anything is sent.
pub(super) async fn prepare(
    client: &mut Client,
    shape: &TableShape,
    opts: &BackfillOptions,
) -> Result<Statements, BackfillError> {
    let filter = opts.filter.as_deref();
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| BackfillError::db("starting the --where check", e))?;
    let explain = |e: tokio_postgres::Error| explain(e, shape, filter.is_some());
    let first = tx
        .prepare(&shape.chunk_sql(filter, false, opts.batch))
        .await
        .map_err(explain)?;
    let next = tx
        .prepare(&shape.chunk_sql(filter, true, opts.batch))
        .await
        .map_err(explain)?;
    if let Some(f) = filter {
        tx.query_one(&shape.probe_sql(f, opts.batch), &[])
            .await
            .map_err(explain)?;
    }
    tx.commit()
        .await
        .map_err(|e| BackfillError::db("ending the --where check", e))?;
    Ok(Statements { first, next })
}

/// The session's unreported row writes, before or after a chunk's read.
pub(super) async fn writes_so_far(tx: &Transaction<'_>) -> Result<i64, BackfillError> {
    tx.query_one(WRITES_IN_TX, &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| BackfillError::db("checking the chunk for writes", e))
}

/// Fails (and so rolls back) a chunk whose read wrote rows (`before` is
/// [`writes_so_far`] before the read): only `--where` can have.
pub(super) async fn check_no_writes(
    tx: &Transaction<'_>,
    before: i64,
    chunk: i64,
) -> Result<(), BackfillError> {
    let n = writes_so_far(tx).await? - before;
    if n > 0 {
        return Err(BackfillError::Filter(format!(
            "--where wrote {n} row(s) while chunk {chunk} was read; the chunk was rolled back and nothing of it was sent; a backfill's --where may only read: remove the function that writes"
        )));
    }
    Ok(())
}

/// A chunk query's failure: the filter's words when it is the filter's fault.
pub(super) fn chunk_error(e: tokio_postgres::Error) -> BackfillError {
    match e.code() {
        Some(c) if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
            BackfillError::Filter(format!("--where failed while reading a chunk: {e}"))
        }
        _ => BackfillError::db("reading a chunk", e),
    }
}

/// Plain words for a failure to prepare or probe the chunk query.
fn explain(e: tokio_postgres::Error, shape: &TableShape, has_filter: bool) -> BackfillError {
    let Some(db) = e.as_db_error().filter(|_| has_filter) else {
        return BackfillError::db("preparing the chunk query", e);
    };
    let msg = db.message();
    let table = &shape.table;
    let nothing = "nothing was sent";
    let example = "like --where \"created_at >= '2024-01-01'\"";
    let code = db.code();
    let text = if msg.contains("multiple commands") || msg.ends_with("near \";\"") {
        format!(
            "--where holds more than one statement ({msg}); give one condition without ';', {example}; {nothing}"
        )
    } else if *code == SqlState::SYNTAX_ERROR {
        format!(
            "--where is not a valid SQL condition: {msg}; write one boolean expression over the columns of {table}, {example}; {nothing}"
        )
    } else if *code == SqlState::UNDEFINED_COLUMN {
        let columns: Vec<&str> = shape.columns.iter().map(|c| c.name.as_str()).collect();
        format!(
            "--where names something table {table} does not have: {msg}; its columns include: {}; {nothing}",
            columns.join(", ")
        )
    } else if *code == SqlState::DATATYPE_MISMATCH {
        format!("--where is not a boolean condition: {msg}; compare a column, {example}; {nothing}")
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        format!(
            "--where tries to write ({msg}); a backfill's --where may only read rows: remove the statement or function that writes; {nothing}"
        )
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        format!("--where reads something this role may not: {msg}; {nothing}")
    } else if *code == SqlState::UNDEFINED_FUNCTION || *code == SqlState::UNDEFINED_TABLE {
        format!("--where refers to something that does not exist: {msg}; {nothing}")
    } else {
        format!(
            "--where cannot be used on table {table}: {msg} (SQLSTATE {}); give a plain condition over its rows, {example}; {nothing}",
            code.code()
        )
    };
    BackfillError::Filter(text)
}

//! `walhook backfill`: sends an entity's existing rows as Snapshot events, consistent with
//! the live stream.
//!
//! The rows are read in key order, one chunk per transaction. A chunk's transaction locks
//! the rows it reads (`FOR SHARE`), writes them into the WAL as one transactional logical
//! message, and records its last key in `walhook.backfill`, then commits. Capture turns the
//! message into Snapshot events at the chunk's commit position, through the same mapper and
//! queue writer as live changes. So the Snapshot of a row sits in commit order among the
//! row's changes: a change committed before the chunk read is in the row it read; a change
//! not yet committed holds the row's lock, and the read waits for it; a change started
//! after the read waits for the lock and commits after the chunk. No listener receives a
//! Snapshot older than a change it already received.
//!
//! The message and the progress commit together: a backfill killed at any point resumes
//! after the last chunk that committed, and no row is sent twice.

mod filter;
mod table;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::config::{Config, EntityConfig, ListenerConfig};
use crate::error::{Classify, ErrorClass};
use crate::mapper::{BACKFILL_PREFIX, Chunk, ChunkColumn};
use crate::queue::QueueError;
use crate::queue::backfill::{
    BackfillRun, RunIdentity, RunStatus, finish_run, latest_run, lock_run, record_chunk,
    replace_run, start_run,
};
use table::TableShape;

/// Most bytes of values in one chunk: a chunk of wide rows ends early, so memory stays
/// bounded here and in capture whatever `--batch` says.
pub const MAX_CHUNK_BYTES: usize = 8 << 20;

const SERVER_VERSION: &str = "SELECT current_setting('server_version_num')::int";
const SLOT_ACTIVE: &str = "SELECT active FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()";
const MAY_LOCK: &str = "SELECT has_any_column_privilege($1::oid, 'UPDATE'), current_user::text";
const TABLE_OID: &str = "SELECT to_regclass($1)::oid";
const EMIT: &str = "SELECT pg_logical_emit_message(true, $1, $2)::text";
const FLUSHED: &str = "SELECT flushed_lsn::text FROM walhook.state WHERE id = 1";

/// What to backfill.
#[derive(Clone, Debug)]
pub struct BackfillOptions {
    /// The entity, by name.
    pub entity: String,
    /// Only this listener receives the events.
    pub listener: Option<String>,
    /// Only rows matching this SQL condition.
    pub filter: Option<String>,
    /// Rows per chunk.
    pub batch: u32,
    /// Start over even when an earlier run with the same arguments exists.
    pub restart: bool,
}

/// What a backfill tells its caller while it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// Something the operator should know; the backfill goes on.
    Warning(String),
    /// A new run started.
    Started {
        /// Its id.
        run: i64,
        /// The table's estimated row count.
        estimate: i64,
    },
    /// An earlier run goes on after `rows` rows.
    Resumed {
        /// Its id.
        run: i64,
        /// Rows it sent before.
        rows: i64,
        /// The table's estimated row count.
        estimate: i64,
    },
    /// A chunk committed; `rows` sent so far.
    Chunk {
        /// Rows sent so far by the run.
        rows: i64,
    },
}

/// How a backfill ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The same backfill finished earlier; nothing was sent.
    AlreadyFinished(BackfillRun),
    /// Every row was sent.
    Finished {
        /// The run.
        run: i64,
        /// Rows it sent in all.
        rows: i64,
        /// Chunks it sent in all.
        chunks: i64,
        /// The WAL position of its last chunk.
        last_message_lsn: Option<String>,
        /// How far capture had queued the stream when it finished.
        flushed_lsn: Option<String>,
    },
}

/// Why a backfill did not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The arguments or the database do not allow it; the message says what to fix.
    #[error("{0}")]
    Usage(String),
    /// `--where` is not a condition a backfill can use; nothing was sent.
    #[error("{0}")]
    Filter(String),
    /// Another process runs the same backfill.
    #[error("{0}")]
    Busy(String),
    /// A statement failed.
    #[error("{context}: {detail}")]
    Database {
        /// What the backfill was doing.
        context: &'static str,
        /// The server's message.
        detail: String,
        /// The class of the failure.
        class: ErrorClass,
    },
    /// The queue tables refused.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl BackfillError {
    fn db(context: &'static str, e: tokio_postgres::Error) -> BackfillError {
        BackfillError::Database {
            context,
            detail: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
            class: crate::error::pg_error_class(&e),
        }
    }
}

impl Classify for BackfillError {
    fn class(&self) -> ErrorClass {
        match self {
            BackfillError::Usage(_) | BackfillError::Filter(_) => ErrorClass::Config,
            BackfillError::Busy(_) => ErrorClass::Transient,
            BackfillError::Database { class, .. } => *class,
            BackfillError::Queue(e) => e.class(),
        }
    }
}

/// Runs (or resumes) the backfill `opts` describes on `client`, a connection to the source
/// database, telling `report` how it goes.
pub async fn run(
    config: &Config,
    client: &mut Client,
    opts: &BackfillOptions,
    report: &mut dyn FnMut(Report),
) -> Result<Outcome, BackfillError> {
    let entity = find_entity(config, &opts.entity)?;
    check_receivers(config, entity, opts.listener.as_deref())?;
    let version: i32 = client
        .query_one(SERVER_VERSION, &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| BackfillError::db("reading the server version", e))?;
    if version < 140_000 {
        return Err(BackfillError::Usage(
            "backfill needs PostgreSQL 14 or later: older servers do not send logical decoding messages through pgoutput".into(),
        ));
    }
    check_slot(client, &config.source.slot, report).await?;
    let shape = TableShape::read(&*client, entity, &config.source.publication, version).await?;
    check_lock_privilege(client, &shape).await?;
    let statements = filter::prepare(client, &shape, opts).await?;

    let who = RunIdentity {
        entity: entity.name.as_str(),
        listener: opts.listener.as_deref(),
        filter: opts.filter.as_deref(),
    };
    let run = match claim_run(client, who, &shape, opts.restart).await? {
        Claimed::Go(run) => run,
        Claimed::Finished(run) => return Ok(Outcome::AlreadyFinished(run)),
    };
    match run.last_key {
        Some(_) => report(Report::Resumed {
            run: run.id,
            rows: run.rows,
            estimate: shape.estimate,
        }),
        None => report(Report::Started {
            run: run.id,
            estimate: shape.estimate,
        }),
    }
    let done = send_chunks(client, &shape, entity, opts, &statements, run, report).await?;
    finish_run(&*client, done.id).await?;
    let flushed: Option<String> = client
        .query_opt(FLUSHED, &[])
        .await
        .map_err(|e| BackfillError::db("reading walhook.state", e))?
        .and_then(|r| r.try_get(0).ok());
    Ok(Outcome::Finished {
        run: done.id,
        rows: done.rows,
        chunks: done.chunks,
        last_message_lsn: done.last_message_lsn,
        flushed_lsn: flushed,
    })
}

fn find_entity<'c>(config: &'c Config, name: &str) -> Result<&'c EntityConfig, BackfillError> {
    config
        .entities
        .iter()
        .find(|e| e.name.as_str() == name)
        .ok_or_else(|| {
            let known: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
            BackfillError::Usage(format!(
                "no [[entity]] is named {name:?} in {}; use one of: {}",
                config.path.display(),
                known.join(", ")
            ))
        })
}

/// Whether `listener` receives `entity`'s Snapshot events.
fn receives(listener: &ListenerConfig, entity: &EntityConfig) -> bool {
    listener
        .entities
        .as_ref()
        .is_none_or(|es| es.contains(&entity.name))
        && listener
            .derived_actions
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&entity.snapshot_action))
}

/// Refuses a backfill whose events would reach no listener.
fn check_receivers(
    config: &Config,
    entity: &EntityConfig,
    only: Option<&str>,
) -> Result<(), BackfillError> {
    let event = format!("{}.{}", entity.name, entity.snapshot_action);
    let fix = format!(
        "add \"{}\" to its actions (or remove actions to receive everything)",
        entity.snapshot_action.to_lowercase()
    );
    if let Some(name) = only {
        let Some(l) = config.listeners.iter().find(|l| l.name == name) else {
            let known: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
            return Err(BackfillError::Usage(format!(
                "no [[listener]] is named {name:?}; use one of: {}",
                known.join(", ")
            )));
        };
        if !receives(l, entity) {
            return Err(BackfillError::Usage(format!(
                "listener {name} does not receive {event} events (its entities or actions leave them out); {fix} under the [[listener]] named {name}, or choose another --listener"
            )));
        }
        return Ok(());
    }
    if !config.listeners.iter().any(|l| receives(l, entity)) {
        return Err(BackfillError::Usage(format!(
            "no listener receives {event} events, so a backfill would reach no one; {fix} under a [[listener]] of entity {}",
            entity.name
        )));
    }
    Ok(())
}

/// Refuses without the slot (the chunks would never be captured); warns when no walhook
/// streams it now (the chunks wait in the slot's WAL until one does).
async fn check_slot(
    client: &Client,
    slot: &str,
    report: &mut dyn FnMut(Report),
) -> Result<(), BackfillError> {
    let active: Option<bool> = client
        .query_opt(SLOT_ACTIVE, &[&slot])
        .await
        .map_err(|e| BackfillError::db("reading pg_replication_slots", e))?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| BackfillError::db("reading pg_replication_slots", e))?;
    match active {
        None => Err(BackfillError::Usage(format!(
            "replication slot {slot} does not exist in this database, so no walhook would capture the backfill; run `walhook setup` and start `walhook run` first"
        ))),
        Some(false) => {
            report(Report::Warning(format!(
                "no walhook is streaming slot {slot} now: the chunks wait in the slot and become events when `walhook run` streams again"
            )));
            Ok(())
        }
        Some(true) => Ok(()),
    }
}

/// FOR SHARE needs UPDATE privilege on a column of the table.
async fn check_lock_privilege(client: &Client, shape: &TableShape) -> Result<(), BackfillError> {
    let context = "checking the privileges on the entity table";
    let oid: u32 = client
        .query_one(TABLE_OID, &[&shape.table.quoted()])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| BackfillError::db(context, e))?;
    let row = client
        .query_one(MAY_LOCK, &[&oid])
        .await
        .map_err(|e| BackfillError::db(context, e))?;
    let may: bool = row.try_get(0).map_err(|e| BackfillError::db(context, e))?;
    let role: String = row.try_get(1).map_err(|e| BackfillError::db(context, e))?;
    if may {
        return Ok(());
    }
    let key = shape.key.first().map_or("id", |k| k.name.as_str());
    Err(BackfillError::Usage(format!(
        "role {role} may not lock rows of {table}: a backfill reads each chunk with SELECT ... FOR SHARE so that no concurrent change is reordered around its Snapshot events, which needs UPDATE privilege on at least one column; run GRANT UPDATE ({}) ON {} TO {} (it updates nothing)",
        crate::types::quote_ident(key),
        shape.table.quoted(),
        crate::types::quote_ident(&role),
        table = shape.table
    )))
}

/// What [`claim_run`] found.
enum Claimed {
    /// The run to go on with, locked for this session.
    Go(BackfillRun),
    /// The same backfill finished earlier.
    Finished(BackfillRun),
}

/// The run to go on with: the unfinished one with the same arguments, or a new one
/// (always a new one with `restart`).
async fn claim_run(
    client: &Client,
    who: RunIdentity<'_>,
    shape: &TableShape,
    restart: bool,
) -> Result<Claimed, BackfillError> {
    let key = shape.key_names();
    let latest = latest_run(client, who).await?;
    if let Some(run) = latest {
        if run.status == RunStatus::Finished && !restart {
            return Ok(Claimed::Finished(run));
        }
        if run.status == RunStatus::Running {
            lock(client, run.id).await?;
            if !restart {
                if run.key_columns != key {
                    return Err(BackfillError::Usage(format!(
                        "backfill {} paged by ({}) but the table's key is now ({}); run it again with --restart",
                        run.id,
                        run.key_columns.join(", "),
                        key.join(", ")
                    )));
                }
                return Ok(Claimed::Go(run));
            }
            replace_run(client, run.id).await?;
        }
    }
    let run = start_run(client, who, &key).await.map_err(|e| match e {
        QueueError::Database { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            BackfillError::Busy(
                "another walhook backfill with the same arguments started just now; let it finish"
                    .into(),
            )
        }
        other => BackfillError::Queue(other),
    })?;
    lock(client, run.id).await?;
    Ok(Claimed::Go(run))
}

async fn lock(client: &Client, id: i64) -> Result<(), BackfillError> {
    match lock_run(client, id).await? {
        Ok(()) => Ok(()),
        Err(pid) => Err(BackfillError::Busy(format!(
            "backfill {id} is running in another process{}; wait for it to finish, or stop it and run this again to resume",
            pid.map(|p| format!(" (server process {p})"))
                .unwrap_or_default()
        ))),
    }
}

/// Sends chunk after chunk until a chunk finds no rows; returns the run as recorded.
async fn send_chunks(
    client: &mut Client,
    shape: &TableShape,
    entity: &EntityConfig,
    opts: &BackfillOptions,
    statements: &filter::Statements,
    mut run: BackfillRun,
    report: &mut dyn FnMut(Report),
) -> Result<BackfillRun, BackfillError> {
    let columns: Vec<ChunkColumn> = shape
        .columns
        .iter()
        .map(|c| ChunkColumn {
            name: c.name.clone(),
            type_oid: c.type_oid,
            key: c.pk.is_some(),
        })
        .collect();
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| BackfillError::db("starting a chunk", e))?;
        let statement = match run.last_key {
            Some(_) => &statements.next,
            None => &statements.first,
        };
        let writes_before = filter::writes_so_far(&tx).await?;
        let (rows, last_key) =
            read_chunk(&tx, statement, run.last_key.as_deref(), shape.key.len()).await?;
        if rows.is_empty() {
            tx.commit()
                .await
                .map_err(|e| BackfillError::db("ending the last chunk", e))?;
            return Ok(run);
        }
        filter::check_no_writes(&tx, writes_before, run.chunks + 1).await?;
        let n = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        let chunk = Chunk {
            run: run.id,
            token: run.token,
            entity: entity.name.as_str().to_owned(),
            listener: opts.listener.clone(),
            schema: shape.table.schema.clone(),
            table: shape.table.name.clone(),
            columns: columns.clone(),
            rows,
        };
        let text = serde_json::to_string(&chunk)
            .map_err(|e| BackfillError::Usage(format!("a chunk cannot be written as JSON: {e}")))?;
        drop(chunk);
        let lsn: String = tx
            .query_one(EMIT, &[&BACKFILL_PREFIX, &text])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| BackfillError::db("writing the chunk into the WAL", e))?;
        drop(text);
        if !record_chunk(&tx, run.id, &last_key, n, &lsn).await? {
            return Err(BackfillError::Busy(format!(
                "backfill {} was restarted or finished by another process; stopping",
                run.id
            )));
        }
        tx.commit()
            .await
            .map_err(|e| BackfillError::db("committing the chunk", e))?;
        run.rows += n;
        run.chunks += 1;
        run.last_key = Some(last_key);
        run.last_message_lsn = Some(lsn);
        report(Report::Chunk { rows: run.rows });
    }
}

/// Reads one chunk: the rows' values and the last row's key. Stops early past
/// [`MAX_CHUNK_BYTES`]; the rows read but not taken stay locked until the chunk commits and
/// are the start of the next chunk.
async fn read_chunk(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &Statement,
    after: Option<&[String]>,
    key_len: usize,
) -> Result<(Vec<Vec<Option<String>>>, Vec<String>), BackfillError> {
    use futures_util::TryStreamExt;
    let params: Vec<&(dyn ToSql + Sync)> = after
        .unwrap_or_default()
        .iter()
        .map(|k| k as &(dyn ToSql + Sync))
        .collect();
    let stream = tx
        .query_raw(statement, params)
        .await
        .map_err(filter::chunk_error)?;
    let mut stream = std::pin::pin!(stream);
    let mut rows = Vec::new();
    let mut last_key = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = stream.try_next().await.map_err(filter::chunk_error)? {
        let mut key = Vec::with_capacity(key_len);
        let mut values = Vec::with_capacity(row.len().saturating_sub(key_len));
        for i in 0..row.len() {
            let v: Option<String> = row
                .try_get(i)
                .map_err(|e| BackfillError::db("reading a chunk row", e))?;
            if i < key_len {
                key.push(v.unwrap_or_default());
            } else {
                bytes += v.as_ref().map_or(0, String::len);
                values.push(v);
            }
        }
        rows.push(values);
        last_key = key;
        if bytes >= MAX_CHUNK_BYTES {
            break;
        }
    }
    Ok((rows, last_key))
}

//! One replication session: prerequisites, the cloned-database guard, setup, then the
//! reader, writer and heartbeat tasks until an error, a reload or shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::CaptureObserver;
use super::mapper::Mapper;
use super::reader::Reader;
use super::writer::Item;
use crate::config::Config;
use crate::db::Source;
use crate::error::{ErrorClass, Hold, ServiceError};
use crate::guard::Identity;
use crate::queue::QueueWriter;
use crate::replication::conn::{ReplicationConnection, ReplicationStream};
use crate::types::Lsn;

/// `object_in_use`: START_REPLICATION on a slot another process streams.
const SQLSTATE_OBJECT_IN_USE: &str = "55006";

/// After shutdown is requested, the writer gets this long to commit what it holds.
const WRITER_DRAIN: Duration = Duration::from_secs(30);

/// How long the server gets to acknowledge the end of the stream (its CopyDone).
const STREAM_END_WAIT: Duration = Duration::from_secs(5);

/// How a session ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested; `confirmed` is the flush position the server acknowledged
    /// last, when the session got as far as streaming.
    Stopped { confirmed: Option<Lsn> },
    /// A reload changed what the session was built from.
    Reload,
}

/// What a session needs from its surroundings.
pub(super) struct Context<'a> {
    pub(super) source: &'a Source,
    pub(super) observe: &'a Arc<dyn CaptureObserver>,
    pub(super) shutdown: &'a CancellationToken,
    /// Warnings are logged on the first session of the process only.
    pub(super) first: bool,
}

/// A session that is streaming, before its tasks start.
struct Prepared {
    stream: ReplicationStream,
    writer: QueueWriter,
    mapper: Mapper,
    /// The slot's confirmed position when streaming started.
    confirmed: Lsn,
}

/// One connected session: setup, stream until error, reload or shutdown.
pub(super) async fn run(
    config: &Config,
    cx: &Context<'_>,
    config_rx: &mut watch::Receiver<Arc<Config>>,
) -> Result<SessionEnd, ServiceError> {
    // Nothing is in flight before streaming starts: shutdown may simply drop the setup.
    let prepared = tokio::select! {
        p = prepare(config, cx) => p?,
        _ = cx.shutdown.cancelled() => return Ok(SessionEnd::Stopped { confirmed: None }),
    };
    stream(config, cx, prepared, config_rx).await
}

/// Checks prerequisites, applies setup and starts streaming.
async fn prepare(config: &Config, cx: &Context<'_>) -> Result<Prepared, ServiceError> {
    let params = cx.source.current();
    let mut client = cx.source.connect().await?;
    // Prerequisites first: a missing table or wal_level = replica is one clear line and
    // exit 78, not a retry loop.
    let report = crate::setup::check(&client, config).await;
    let failures: Vec<String> = report
        .with_verdict(crate::setup::Verdict::Fail)
        .map(|i| match &i.fix {
            Some(fix) => format!("{}: {}; fix: {fix}", i.name, i.detail),
            None => format!("{}: {}", i.name, i.detail),
        })
        .collect();
    if !failures.is_empty() {
        return Err(ServiceError::new(ErrorClass::Config, failures.join("\n")));
    }

    let mut repl = ReplicationConnection::connect(&params)
        .await
        .map_err(ServiceError::from_err)?;
    let system = repl
        .identify_system()
        .await
        .map_err(ServiceError::from_err)?;
    let dbname = system.dbname.clone().unwrap_or_default();
    let current = Identity {
        system_id: system.system_id.clone(),
        database: dbname.clone(),
    };
    let verdict = crate::guard::verdict(&client, &current)
        .await
        .map_err(ServiceError::from_err)?;
    if let Some(why) = verdict.explain() {
        return Err(ServiceError {
            hold: Some(Hold::Cloned),
            ..ServiceError::new(ErrorClass::Transient, why)
        });
    }
    // Queue migrations, the publication and the slot, when missing.
    let applied = crate::setup::setup(&mut client, config, Default::default())
        .await
        .map_err(ServiceError::from_err)?;
    for step in &applied {
        info!("setup: {}", step.why);
    }
    // Warnings once per process, not once per reconnect, and only those setup did not fix.
    if cx.first {
        let report = if applied.is_empty() {
            report
        } else {
            crate::setup::check(&client, config).await
        };
        for w in report.with_verdict(crate::setup::Verdict::Warn) {
            warn!("{}: {}", w.name, w.detail);
        }
    }
    let mut mapper = Mapper::new(&config.entities);
    for entity in config.entities.iter().filter(|e| e.id.is_none()) {
        let pk = primary_key(&client, &entity.table).await?;
        mapper.set_primary_key(entity.table.clone(), pk);
    }

    crate::queue::record_source(&client, &system.system_id, &dbname, &config.source.slot)
        .await
        .map_err(ServiceError::from_err)?;
    let slot = &config.source.slot;
    let created = repl
        .create_slot_if_missing(slot)
        .await
        .map_err(ServiceError::from_err)?;
    let confirmed = slot_confirmed(&client, slot).await?;
    if created {
        info!(%slot, "created replication slot");
        // Losing the slot from now on loses changes: make that recognisable.
        crate::queue::record_start(&client, confirmed)
            .await
            .map_err(ServiceError::from_err)?;
    }
    if let Some(resumed) = crate::queue::complete_gaps(&client, slot)
        .await
        .map_err(ServiceError::from_err)?
    {
        info!(%slot, "capture resumes at {resumed} after the gap accepted with walhook setup --accept-gap");
    }
    let mut stream = repl
        .start_replication(&config.source.slot, Lsn::ZERO, &config.source.publication)
        .await
        .map_err(|e| ServiceError {
            hold: (e.sqlstate() == Some(SQLSTATE_OBJECT_IN_USE)).then_some(Hold::Standby),
            ..ServiceError::from_err(e)
        })?;
    if let Some(beat) = cx.observe.stream_beat() {
        stream.watch(beat);
    }
    info!(
        slot = %config.source.slot,
        publication = %config.source.publication,
        database = %dbname,
        "streaming changes"
    );
    cx.observe.streaming(true, None);
    cx.observe
        .status(format!("streaming slot {} of {dbname}", config.source.slot));

    crate::queue::sync_listeners(&client, &config.listeners)
        .await
        .map_err(ServiceError::from_err)?;
    report_gaps(&client, cx.observe.as_ref()).await?;
    let mut writer = QueueWriter::new(client, &system.system_id)
        .await
        .map_err(ServiceError::from_err)?;
    writer.set_subscriptions(crate::queue::subscriptions(&config.listeners));
    writer
        .sync_cursors()
        .await
        .map_err(ServiceError::from_err)?;
    Ok(Prepared {
        stream,
        writer,
        mapper,
        confirmed,
    })
}

/// Runs the reader, writer and heartbeat until an error, a reload or shutdown, then ends
/// the stream cleanly: the writer commits what it holds, the server is told the final
/// flush position and the stream ends with CopyDone.
async fn stream(
    config: &Config,
    cx: &Context<'_>,
    prepared: Prepared,
    config_rx: &mut watch::Receiver<Arc<Config>>,
) -> Result<SessionEnd, ServiceError> {
    let Prepared {
        stream,
        writer,
        mapper,
        confirmed,
    } = prepared;
    let (subs_tx, subs_rx) = watch::channel(crate::queue::subscriptions(&config.listeners));
    let (tx, rx) = mpsc::channel::<Item>(config.queue.batch_size.max(1) * 2);
    let (durable_tx, durable_rx) = watch::channel(confirmed);

    let stop = cx.shutdown.child_token();
    let mut writer_task = tokio::spawn(super::writer::run(
        writer,
        rx,
        durable_tx,
        subs_rx,
        cx.observe.clone(),
        super::writer::Limits {
            batch_size: config.queue.batch_size,
            batch_bytes: config.queue.batch_bytes,
            batch_delay: config.queue.batch_delay,
        },
    ));
    let heartbeat_stop = stop.child_token();
    let heartbeat_task = config.source.heartbeat.map(|every| {
        let source = cx.source.clone();
        let stop = heartbeat_stop.clone();
        tokio::spawn(async move { super::heartbeat::run(source, every, stop).await })
    });

    let mut reader = Reader::new(
        stream,
        mapper,
        cx.observe.clone(),
        tx,
        durable_rx,
        confirmed,
        Arc::new(config.clone()),
        subs_tx,
        cx.source.clone(),
    );
    let read_result = reader.run(&stop, config_rx).await;
    heartbeat_stop.cancel();
    // Closing the channel lets the writer commit what it already has, so a clean end
    // confirms as much as possible.
    let reader = reader.close_events();
    let write_result = match tokio::time::timeout(WRITER_DRAIN, &mut writer_task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(ServiceError::transient(format!(
            "queue writer task failed: {e}"
        ))),
        Err(_) => {
            writer_task.abort();
            Err(ServiceError::transient(format!(
                "the queue writer did not finish within {}s; what it held is written again after the restart",
                WRITER_DRAIN.as_secs()
            )))
        }
    };
    stop.cancel();
    if let Some(h) = heartbeat_task {
        // A heartbeat stuck on a dead connection must not hold the session open.
        h.abort();
        let _ = h.await;
    }
    let end = match (&read_result, &write_result) {
        (Ok(end), Ok(())) => *end,
        _ => {
            // The writer's own error explains a reader that stopped because the writer did.
            write_result?;
            return read_result;
        }
    };
    let confirmed = reader.finish(STREAM_END_WAIT).await;
    debug!(?confirmed, "replication stream ended");
    Ok(match end {
        SessionEnd::Stopped { .. } => SessionEnd::Stopped { confirmed },
        SessionEnd::Reload => SessionEnd::Reload,
    })
}

/// Tells the monitors (once) about gaps accepted since the last start.
async fn report_gaps(
    client: &tokio_postgres::Client,
    observe: &dyn CaptureObserver,
) -> Result<(), ServiceError> {
    let gaps = crate::queue::unalerted_gaps(client)
        .await
        .map_err(ServiceError::from_err)?;
    for gap in gaps {
        warn!(
            slot = %gap.slot_name,
            "changes committed between {} and {} were never captured ({}); the gap was accepted by {} with walhook setup --accept-gap and is recorded in walhook.capture_gap",
            gap.last_flushed_lsn, gap.resumed_lsn, gap.reason, gap.accepted_by
        );
        observe.capture_gap(&gap);
        crate::queue::mark_gap_alerted(client, gap.id)
            .await
            .map_err(ServiceError::from_err)?;
    }
    Ok(())
}

const SQL_SLOT_CONFIRMED: &str = "SELECT confirmed_flush_lsn FROM pg_replication_slots
     WHERE slot_name = $1";

/// The slot's confirmed position: what the server already knows to be flushed.
async fn slot_confirmed(client: &tokio_postgres::Client, slot: &str) -> Result<Lsn, ServiceError> {
    let row = client
        .query_opt(SQL_SLOT_CONFIRMED, &[&slot])
        .await
        .map_err(|e| ServiceError::transient(format!("reading slot {slot}: {e}")))?;
    let lsn: Option<tokio_postgres::types::PgLsn> = row.and_then(|r| r.get(0));
    Ok(lsn.map_or(Lsn::ZERO, |l| Lsn(u64::from(l))))
}

const SQL_PRIMARY_KEY: &str = "SELECT a.attname::text
     FROM pg_index i
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
     WHERE i.indrelid = to_regclass($1) AND i.indisprimary
     ORDER BY array_position(i.indkey::int2[], a.attnum)";

/// The primary key columns of `table`, from the catalog: with REPLICA IDENTITY FULL the
/// stream marks every column as a key, so it cannot tell.
async fn primary_key(
    client: &tokio_postgres::Client,
    table: &crate::types::TableName,
) -> Result<Vec<String>, ServiceError> {
    let rows = client
        .query(SQL_PRIMARY_KEY, &[&table.quoted()])
        .await
        .map_err(|e| ServiceError::transient(format!("reading the primary key of {table}: {e}")))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

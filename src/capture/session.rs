//! One replication session: prerequisites, the cloned-database guard, setup, then the
//! reader, writer and heartbeat tasks until an error, a reload or shutdown.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::CaptureObserver;
use super::mapper::Mapper;
use super::reader::Reader;
use super::writer::Item;
use crate::config::Config;
use crate::db::connect_ordinary;
use crate::error::{ErrorClass, Hold, ServiceError};
use crate::guard::Identity;
use crate::queue::QueueWriter;
use crate::replication::conn::{ConnectParams, ReplicationConnection};
use crate::types::Lsn;

/// `object_in_use`: START_REPLICATION on a slot another process streams.
const SQLSTATE_OBJECT_IN_USE: &str = "55006";

/// How a session ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested.
    Stopped,
    /// A reload changed what the session was built from.
    Reload,
}

/// One connected session: setup, stream until error or shutdown.
pub(super) async fn run(
    config: &Config,
    params: &ConnectParams,
    observe: &Arc<dyn CaptureObserver>,
    shutdown: &CancellationToken,
    first: bool,
    config_rx: &mut watch::Receiver<Arc<Config>>,
) -> Result<SessionEnd, ServiceError> {
    let mut client = connect_ordinary(params).await?;
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

    let mut repl = ReplicationConnection::connect(params)
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
    if first {
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
    if repl
        .create_slot_if_missing(&config.source.slot)
        .await
        .map_err(ServiceError::from_err)?
    {
        info!(slot = %config.source.slot, "created replication slot");
    }
    let stream = repl
        .start_replication(&config.source.slot, Lsn::ZERO, &config.source.publication)
        .await
        .map_err(|e| ServiceError {
            hold: (e.sqlstate() == Some(SQLSTATE_OBJECT_IN_USE)).then_some(Hold::Standby),
            ..ServiceError::from_err(e)
        })?;
    info!(
        slot = %config.source.slot,
        publication = %config.source.publication,
        database = %dbname,
        "streaming changes"
    );
    observe.streaming(true, None);
    observe.status(format!("streaming slot {} of {dbname}", config.source.slot));

    crate::queue::sync_listeners(&client, &config.listeners)
        .await
        .map_err(ServiceError::from_err)?;
    let mut writer = QueueWriter::new(client, &system.system_id)
        .await
        .map_err(ServiceError::from_err)?;
    writer.set_subscriptions(crate::queue::subscriptions(&config.listeners));
    let (subs_tx, subs_rx) = watch::channel(crate::queue::subscriptions(&config.listeners));
    let (tx, rx) = mpsc::channel::<Item>(config.queue.batch_size.max(1) * 2);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);

    let stop = shutdown.child_token();
    let writer_task = tokio::spawn(super::writer::run(
        writer,
        rx,
        durable_tx,
        subs_rx,
        observe.clone(),
        config.queue.batch_size,
        config.queue.batch_delay,
    ));
    let heartbeat_task = config.source.heartbeat.map(|every| {
        let params = params.clone();
        let stop = stop.clone();
        tokio::spawn(async move { super::heartbeat::run(params, every, stop).await })
    });

    let mut reader = Reader {
        stream,
        mapper,
        observe: observe.clone(),
        events: tx,
        durable: durable_rx,
        status_interval: config.source.status_interval,
        tx: None,
        last_commit_sent: Lsn::ZERO,
        idle_position: Lsn::ZERO,
        reported_flush: Lsn::ZERO,
        last_status: Instant::now(),
        warned_truncate: Default::default(),
        config: Arc::new(config.clone()),
        subscriptions: subs_tx,
        params: params.clone(),
    };
    let read_result = reader.run(&stop, config_rx).await;
    stop.cancel();
    let reported_flush = reader.reported_flush;
    let Reader {
        mut stream,
        events,
        mut durable,
        ..
    } = reader;
    // Closing the channel lets the writer commit what it already has, so a clean shutdown
    // confirms as much as possible.
    drop(events);
    let write_result = match writer_task.await {
        Ok(r) => r,
        Err(e) => Err(ServiceError::transient(format!(
            "queue writer task failed: {e}"
        ))),
    };
    if let Some(h) = heartbeat_task {
        let _ = h.await;
    }
    if read_result.is_ok() && write_result.is_ok() {
        let flush = *durable.borrow_and_update();
        let flush = flush.max(reported_flush);
        if stream.send_status(flush, flush, flush, false).await.is_ok() {
            info!(flush = %flush, "reported final flush position");
        }
        stream.close().await;
    }
    // The writer's own error explains a reader that stopped because the writer did.
    write_result?;
    read_result
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

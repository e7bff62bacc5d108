//! Scheduled notifications (`[[schedule]]`): at each period a query's rows become events
//! of the schedule's entity and action, queued (and fanned out, filtered, debounced) like
//! change events, so they are delivered, retried and monitored the same way.
//!
//! A period runs at most once across processes (`walhook.schedule_run`); after downtime
//! only the latest missed period runs. A failing query is recorded with its error and
//! logged, and the schedule runs again at its next period.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, ScheduleConfig, ScheduleWhen};
use crate::db::Source;
use crate::mapper::EntityEvent;
use crate::queue::schedule::{Claim, claim, finish};
use crate::queue::{QueueWriter, subscriptions};
use crate::replication::pgoutput::PgTimestamp;
use crate::types::{Action, Lsn, TableName, Xid, quote_ident};

/// Longest a schedule's query may run.
const QUERY_TIMEOUT: &str = "5min";
/// Events written per queue transaction.
const WRITE_BATCH: usize = 1000;
/// Longest sleep between looks, so reloaded schedules are noticed.
const TICK: Duration = Duration::from_secs(1);

/// The period `when` is in at `now` (the latest scheduled time not after it) and the next.
pub fn periods(when: &ScheduleWhen, now: SystemTime) -> Option<(SystemTime, SystemTime)> {
    match when {
        ScheduleWhen::Every(every) => {
            let since = now.duration_since(UNIX_EPOCH).ok()?;
            let n = since.as_nanos() / every.as_nanos().max(1);
            let start = UNIX_EPOCH + every.checked_mul(u32::try_from(n).ok()?)?;
            Some((start, start + *every))
        }
        ScheduleWhen::Cron(cron) => {
            let t: chrono::DateTime<chrono::Utc> = now.into();
            let previous = cron.find_previous_occurrence(&t, true).ok()?;
            let next = cron.find_next_occurrence(&t, false).ok()?;
            Some((previous.into(), next.into()))
        }
    }
}

/// Runs the configured schedules until `shutdown`, following reloads.
pub(crate) async fn run(
    mut config_rx: watch::Receiver<Arc<Config>>,
    source: Source,
    shutdown: CancellationToken,
) {
    // The last period each schedule was handled for, by name.
    let mut handled: std::collections::HashMap<String, SystemTime> = Default::default();
    let mut warned = false;
    loop {
        let config = config_rx.borrow_and_update().clone();
        let now = SystemTime::now();
        let mut wake = now + TICK;
        for s in &config.schedules {
            let Some((period, next)) = periods(&s.when, now) else {
                continue;
            };
            wake = wake.min(next);
            if handled.get(&s.name).is_some_and(|p| *p >= period) {
                continue;
            }
            match run_period(&config, s, period, &source).await {
                Ok(()) => {
                    handled.insert(s.name.clone(), period);
                    warned = false;
                }
                Err(e) => {
                    // The database is away: try the period again at the next look.
                    if !warned {
                        warn!(schedule = %s.name, "cannot run schedules: {e}; retrying");
                        warned = true;
                    }
                }
            }
        }
        let wait = wake
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = config_rx.changed() => if changed.is_err() { shutdown.cancelled().await; return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Claims `period` of `s` and runs it when this process got it. `Err` only when the
/// queue database could not be used; a failing query is recorded as the run's error.
async fn run_period(
    config: &Config,
    s: &ScheduleConfig,
    period: SystemTime,
    source: &Source,
) -> Result<(), String> {
    let client = source.connect().await.map_err(|e| e.message)?;
    let id = match claim(&client, &s.name, period)
        .await
        .map_err(|e| e.to_string())?
    {
        Claim::Taken => return Ok(()),
        Claim::FirstSeen => {
            info!(schedule = %s.name, "schedule {} is new; it first runs at its next period", s.name);
            return Ok(());
        }
        Claim::Run(id) => id,
    };
    let started = Instant::now();
    let result = queue_rows(config, s, source, client).await;
    let ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let recorder = source.connect().await.map_err(|e| e.message)?;
    match &result {
        Ok(n) => {
            debug!(schedule = %s.name, rows = n, "schedule ran");
            finish(&recorder, id, Some(*n), ms, None).await
        }
        Err(e) => {
            warn!(schedule = %s.name, "schedule {} failed: {e}; it runs again at its next period", s.name);
            finish(&recorder, id, None, ms, Some(e)).await
        }
    }
    .map_err(|e| e.to_string())
}

/// Runs the query and queues one event per row; returns how many.
async fn queue_rows(
    config: &Config,
    s: &ScheduleConfig,
    source: &Source,
    mut client: tokio_postgres::Client,
) -> Result<i64, String> {
    let entity = config
        .entities
        .iter()
        .find(|e| e.name == s.entity)
        .ok_or_else(|| format!("entity {} is not configured", s.entity))?;
    let id_columns = match &entity.id {
        Some(cols) => cols.clone(),
        None => primary_key(&client, &entity.table).await?,
    };
    if id_columns.is_empty() {
        return Err(format!(
            "table {} has no primary key; set id = [...] for entity {}",
            entity.table, entity.name
        ));
    }
    let ids = id_columns
        .iter()
        .map(|c| format!("q.{}::text", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT to_jsonb(q), ARRAY[{ids}], pg_current_wal_insert_lsn()::text FROM ({}) AS q",
        s.query
    );
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    tx.batch_execute(&format!(
        "SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = '{QUERY_TIMEOUT}'"
    ))
    .await
    .map_err(|e| e.to_string())?;
    let rows = tx.query(&sql, &[]).await.map_err(|e| query_error(&e))?;
    tx.commit().await.map_err(|e| e.to_string())?;

    let now = SystemTime::now();
    let commit_time = PgTimestamp(
        i64::try_from(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros(),
        )
        .unwrap_or(i64::MAX)
            - 946_684_800_000_000,
    );
    let row_action = Action::ALL.into_iter().find(|a| a.as_str() == s.action);
    let variant: Arc<str> = Arc::from(format!("schedule/{}", s.name).as_str());
    let derived: Option<Arc<str>> = row_action.is_none().then(|| Arc::from(s.action.as_str()));
    // One position for the run: its events' keys, after every change captured so far.
    let commit_lsn = match rows.first() {
        Some(r) => r
            .try_get::<_, String>(2)
            .map_err(|e| e.to_string())?
            .parse::<Lsn>()
            .map_err(|e| e.to_string())?,
        None => return Ok(0),
    };
    let mut events = Vec::with_capacity(rows.len());
    for (seq, r) in rows.iter().enumerate() {
        let row: Value = r.try_get(0).map_err(|e| e.to_string())?;
        let parts: Vec<Option<String>> = r.try_get(1).map_err(|e| e.to_string())?;
        let Value::Object(row) = row else {
            continue;
        };
        events.push(EntityEvent {
            commit_lsn,
            seq: u32::try_from(seq).unwrap_or(u32::MAX),
            xid: Xid(0),
            commit_time,
            entity: entity.name.clone(),
            table: TableName {
                schema: "schedule".into(),
                name: s.name.clone(),
            },
            entity_id: encode_id(&parts),
            action: row_action.unwrap_or(Action::Updated),
            derived: derived.clone(),
            variant: Some(variant.clone()),
            changed_fields: None,
            row: row.into_iter().collect::<Map<String, Value>>(),
            old: None,
            subject: None,
            only_listener: None,
        });
    }
    let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
    if events.is_empty() {
        return Ok(0);
    }
    let system_id = crate::queue::read_state(&client)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.system_identifier)
        .unwrap_or_else(|| "unknown".to_owned());
    drop(client);
    let writer_client = source.connect().await.map_err(|e| e.message)?;
    let mut writer = QueueWriter::new(writer_client, &system_id)
        .await
        .map_err(|e| e.to_string())?;
    writer.set_subscriptions(subscriptions(&config.listeners));
    for chunk in events.chunks(WRITE_BATCH) {
        writer
            .write_batch(chunk, None)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}

/// The entity id as capture writes it: one column's text, or a JSON array of texts.
fn encode_id(parts: &[Option<String>]) -> String {
    match parts {
        [one] => one.clone().unwrap_or_else(|| "null".to_owned()),
        _ => Value::Array(
            parts
                .iter()
                .map(|p| p.clone().map_or(Value::Null, Value::String))
                .collect(),
        )
        .to_string(),
    }
}

/// The server's words for a failed query, with its detail.
fn query_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "query failed: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        None => format!("query failed: {e}"),
    }
}

async fn primary_key(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<Vec<String>, String> {
    client
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.try_get::<_, String>(0).map_err(|e| e.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_periods_are_multiples_since_the_epoch_and_cron_uses_utc() {
        const DAY: u64 = 86_400;
        let at = UNIX_EPOCH + Duration::from_secs(2 * DAY + 3 * 3600 + 125);
        assert_eq!(
            periods(&ScheduleWhen::Every(Duration::from_secs(60)), at),
            Some((
                UNIX_EPOCH + Duration::from_secs(2 * DAY + 3 * 3600 + 120),
                UNIX_EPOCH + Duration::from_secs(2 * DAY + 3 * 3600 + 180)
            ))
        );
        let cron = croner::parser::CronParser::new()
            .parse("0 6 * * *")
            .unwrap();
        let (prev, next) = periods(&ScheduleWhen::Cron(Box::new(cron)), at).unwrap();
        assert_eq!(prev, UNIX_EPOCH + Duration::from_secs(DAY + 6 * 3600));
        assert_eq!(next, UNIX_EPOCH + Duration::from_secs(2 * DAY + 6 * 3600));
        assert_eq!(encode_id(&[Some("a,b".into()), None]), r#"["a,b",null]"#);
    }
}

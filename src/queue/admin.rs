//! Operator tools over the queue tables: browsing, requeueing and discarding Failed
//! notifications, and retention (pruning old Processed and Discarded notifications and
//! events). The status report is in [`super::status`].
//!
//! Every statement here is short so that none holds locks the dispatcher waits on for long.

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;
use uuid::Uuid;

use super::{Needs, QueueError, db_error};

/// How often the service should run [`prune`].
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Rows deleted per statement by [`prune`] when the caller has no better number.
pub const PRUNE_BATCH: i64 = 1000;

/// Permission errors here mean the role may not use the schema.
const USE: Option<(Needs, Option<&'static super::Session>)> = Some((Needs::Use, None));

/// Where a notification currently lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationStatus {
    /// In `walhook.new`, waiting for delivery.
    New,
    /// In `walhook.processed`, delivered.
    Processed,
    /// In `walhook.failed`, given up on.
    Failed,
    /// In `walhook.discarded`: Failed, then discarded by an operator with a reason.
    Discarded,
}

impl NotificationStatus {
    /// Every status, in the order a notification can reach them.
    pub const ALL: [NotificationStatus; 4] = [
        NotificationStatus::New,
        NotificationStatus::Processed,
        NotificationStatus::Failed,
        NotificationStatus::Discarded,
    ];

    /// The status as the queue tables and the `walhook.notification` view spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::New => "New",
            NotificationStatus::Processed => "Processed",
            NotificationStatus::Failed => "Failed",
            NotificationStatus::Discarded => "Discarded",
        }
    }

    /// The status spelled as [`NotificationStatus::as_str`] does.
    pub fn parse(s: &str) -> Option<Self> {
        NotificationStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
    }

    /// The queue table holding notifications of this status.
    pub fn table(self) -> &'static str {
        match self {
            NotificationStatus::New => "walhook.new",
            NotificationStatus::Processed => "walhook.processed",
            NotificationStatus::Failed => "walhook.failed",
            NotificationStatus::Discarded => "walhook.discarded",
        }
    }
}

impl std::fmt::Display for NotificationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// failed

/// Which Failed notifications [`list_failed`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedFilter {
    /// Only this listener's.
    pub listener: Option<String>,
    /// Only those that failed at or after this point.
    pub since: Option<Since>,
    /// At most this many rows (newest first); at least 1.
    pub limit: i64,
}

impl Default for FailedFilter {
    fn default() -> Self {
        FailedFilter {
            listener: None,
            since: None,
            limit: 50,
        }
    }
}

/// A lower bound on `failed_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// This long before the server's `now()`.
    Ago(Duration),
    /// This point in time.
    At(SystemTime),
}

/// One row of `walhook.failed`, with the action and stable id of its event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedNotification {
    /// Notification id (the same in all three status tables).
    pub id: i64,
    /// Listener name.
    pub listener: String,
    /// Entity type.
    pub entity: String,
    /// Entity id.
    pub entity_id: String,
    /// Created / Updated / Deleted (`None` if the event is gone, which the foreign key prevents).
    pub action: Option<String>,
    /// The stable event id listeners receive.
    pub event_uuid: Option<Uuid>,
    /// Delivery attempts made.
    pub attempts: i32,
    /// When the notification was created.
    pub created_at: SystemTime,
    /// When walhook gave up.
    pub failed_at: SystemTime,
    /// HTTP status of the last attempt, if there was an answer.
    pub last_status_code: Option<i32>,
    /// The last error in plain words.
    pub comment: Option<String>,
}

/// A page of Failed notifications and how many match in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedPage {
    /// Newest first, at most the filter's limit.
    pub rows: Vec<FailedNotification>,
    /// Rows matching the filter, including those beyond the limit.
    pub total: i64,
}

impl FailedPage {
    /// Matching rows not in `rows`.
    pub fn more(&self) -> i64 {
        self.total
            .saturating_sub(i64::try_from(self.rows.len()).unwrap_or(i64::MAX))
            .max(0)
    }
}

/// $1 listener, $2 failed since (absolute), $3 failed within (seconds before now()).
const FAILED_WHERE: &str = "($1::text IS NULL OR f.listener = $1)
  AND ($2::timestamptz IS NULL OR f.failed_at >= $2)
  AND ($3::float8 IS NULL OR f.failed_at >= now() - $3 * interval '1 second')";

fn list_failed_sql() -> String {
    format!(
        "SELECT f.id, f.listener, f.entity, f.entity_id, e.action, e.event_id, f.attempts,
       f.created_at, f.failed_at, f.last_status_code, f.comment
FROM walhook.failed f LEFT JOIN walhook.event e ON e.id = f.event_id
WHERE {FAILED_WHERE}
ORDER BY f.failed_at DESC, f.id DESC
LIMIT $4"
    )
}

fn count_failed_sql() -> String {
    format!("SELECT count(*) FROM walhook.failed f WHERE {FAILED_WHERE}")
}

/// Lists Failed notifications, newest first.
pub async fn list_failed(client: &Client, filter: &FailedFilter) -> Result<FailedPage, QueueError> {
    const CONTEXT: &str = "reading walhook.failed";
    let err = || db_error(CONTEXT, USE);
    let (at, ago) = match filter.since {
        None => (None, None),
        Some(Since::At(t)) => (Some(t), None),
        Some(Since::Ago(d)) => (None, Some(d.as_secs_f64())),
    };
    let limit = filter.limit.max(1);
    let rows = client
        .query(&list_failed_sql(), &[&filter.listener, &at, &ago, &limit])
        .await
        .map_err(err())?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(FailedNotification {
            id: row.try_get(0).map_err(err())?,
            listener: row.try_get(1).map_err(err())?,
            entity: row.try_get(2).map_err(err())?,
            entity_id: row.try_get(3).map_err(err())?,
            action: row.try_get(4).map_err(err())?,
            event_uuid: row.try_get(5).map_err(err())?,
            attempts: row.try_get(6).map_err(err())?,
            created_at: row.try_get(7).map_err(err())?,
            failed_at: row.try_get(8).map_err(err())?,
            last_status_code: row.try_get(9).map_err(err())?,
            comment: row.try_get(10).map_err(err())?,
        });
    }
    let total: i64 = client
        .query_one(&count_failed_sql(), &[&filter.listener, &at, &ago])
        .await
        .map_err(err())?
        .try_get(0)
        .map_err(err())?;
    Ok(FailedPage { rows: out, total })
}

// ---------------------------------------------------------------------------------------------
// retry

/// Which Failed notifications [`retry_failed`] requeues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetrySelection {
    /// These ids.
    Ids(Vec<i64>),
    /// Every Failed notification (of the listener, when one is given).
    All,
}

/// What an operator asked to do with Failed notifications, for messages about ids that
/// were not moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailedAction {
    /// Move back to `walhook.new` ([`retry_failed`]).
    Requeue,
    /// Move to `walhook.discarded` ([`discard_failed`]).
    Discard,
}

impl FailedAction {
    fn done(self) -> &'static str {
        match self {
            FailedAction::Requeue => "requeued",
            FailedAction::Discard => "discarded",
        }
    }
}

/// An id given to [`retry_failed`] or [`discard_failed`] that was not moved, and where it
/// is instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotRequeued {
    /// The id asked for.
    pub id: i64,
    /// Where the notification is and whose it is; `None` if no notification has this id.
    pub found: Option<(NotificationStatus, String)>,
    /// What was asked.
    pub action: FailedAction,
}

impl std::fmt::Display for NotRequeued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.id;
        match &self.found {
            None => write!(
                f,
                "notification {id} does not exist (never created, or pruned after delivery)"
            ),
            Some((NotificationStatus::New, l)) => write!(
                f,
                "notification {id} is not Failed: it is New (in walhook.new, waiting for delivery to listener {l:?})"
            ),
            Some((NotificationStatus::Processed, l)) => write!(
                f,
                "notification {id} is not Failed: it is Processed (delivered to listener {l:?})"
            ),
            Some((NotificationStatus::Discarded, l)) => write!(
                f,
                "notification {id} is not Failed: it was Discarded (listener {l:?}; see walhook.discarded for why)"
            ),
            Some((NotificationStatus::Failed, l)) => write!(
                f,
                "notification {id} is Failed for listener {l:?}, not the one given with --listener; not {}",
                self.action.done()
            ),
        }
    }
}

/// What [`retry_failed`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Ids moved back to `walhook.new`, ascending.
    pub requeued: Vec<i64>,
    /// Ids asked for that were not in `walhook.failed` (for the listener).
    pub not_requeued: Vec<NotRequeued>,
}

/// One statement moves the rows: a notification is never in two tables, nor in none.
/// The old `failed_at` becomes `last_attempt_at`, so the status report still shows when the
/// last attempt failed; attempts restart at 0 so the listener gets its full max_attempts.
/// $1 listener (NULL: any), $2 ids (NULL: all).
const REQUEUE: &str = "WITH moved AS (
    DELETE FROM walhook.failed f
    WHERE ($1::text IS NULL OR f.listener = $1)
      AND ($2::bigint[] IS NULL OR f.id = ANY($2))
    RETURNING f.*
)
INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts,
                         created_at, next_attempt_at, last_attempt_at, last_status_code, comment)
SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, 0,
       created_at, now(), failed_at, last_status_code,
       'requeued by walhook retry at '
         || to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
         || ' after: ' || coalesce(comment, '(no comment)')
FROM moved
RETURNING id";

/// Wakes the dispatchers (they LISTEN on this channel) and has them sweep behind their
/// cursors, where the requeued rows are, instead of leaving them to the periodic sweep.
const WAKE_DISPATCHERS: &str = "SELECT pg_notify('walhook_new', 'sweep')";

const LOCATE: &str = "SELECT id, 'New', listener FROM walhook.new WHERE id = ANY($1)
UNION ALL
SELECT id, 'Processed', listener FROM walhook.processed WHERE id = ANY($1)
UNION ALL
SELECT id, 'Failed', listener FROM walhook.failed WHERE id = ANY($1)
UNION ALL
SELECT id, 'Discarded', listener FROM walhook.discarded WHERE id = ANY($1)";

/// The ids of `selection`, sorted and without duplicates; `None` for all.
fn selected_ids(selection: &RetrySelection) -> Option<Vec<i64>> {
    match selection {
        RetrySelection::All => None,
        RetrySelection::Ids(ids) => {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
    }
}

/// Runs one move statement (params: listener, ids) and returns the moved ids, ascending.
async fn move_failed(
    client: &Client,
    sql: &str,
    listener: Option<&str>,
    ids: &Option<Vec<i64>>,
    extra: Option<&str>,
    context: &'static str,
) -> Result<Vec<i64>, QueueError> {
    let err = || db_error(context, USE);
    let rows = match extra {
        None => client.query(sql, &[&listener, ids]).await,
        Some(extra) => client.query(sql, &[&listener, ids, &extra]).await,
    }
    .map_err(err())?;
    let mut moved = Vec::with_capacity(rows.len());
    for row in rows {
        moved.push(row.try_get::<_, i64>(0).map_err(err())?);
    }
    moved.sort_unstable();
    Ok(moved)
}

/// Where the ids of `asked` that are not in `moved` (both ascending) are instead.
async fn not_moved(
    client: &Client,
    asked: Option<Vec<i64>>,
    moved: &[i64],
    action: FailedAction,
) -> Result<Vec<NotRequeued>, QueueError> {
    let Some(asked) = asked else {
        return Ok(Vec::new());
    };
    let missing: Vec<i64> = asked
        .into_iter()
        .filter(|id| moved.binary_search(id).is_err())
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let err = || db_error("looking up notifications that were not moved", USE);
    let rows = client.query(LOCATE, &[&missing]).await.map_err(err())?;
    let mut out = Vec::with_capacity(missing.len());
    for id in missing {
        let mut found = None;
        for row in &rows {
            if row.try_get::<_, i64>(0).map_err(err())? == id {
                let status: String = row.try_get(1).map_err(err())?;
                if let Some(status) = NotificationStatus::parse(&status) {
                    found = Some((status, row.try_get(2).map_err(err())?));
                }
            }
        }
        out.push(NotRequeued { id, found, action });
    }
    Ok(out)
}

/// Moves Failed notifications back to `walhook.new` (attempts 0, due now, the comment
/// saying when and after what). Ids that were not requeued are reported, not errors: the
/// others are still requeued. `walhook retry` and the web console both call this.
pub async fn retry_failed(
    client: &Client,
    listener: Option<&str>,
    selection: &RetrySelection,
) -> Result<RetryOutcome, QueueError> {
    let ids = selected_ids(selection);
    if ids.as_ref().is_some_and(Vec::is_empty) {
        return Ok(RetryOutcome::default());
    }
    let requeued = move_failed(
        client,
        REQUEUE,
        listener,
        &ids,
        None,
        "moving Failed notifications back to walhook.new",
    )
    .await?;
    // The rows are moved already; a dispatcher that misses the wake-up finds them by polling.
    if !requeued.is_empty()
        && let Err(e) = client.execute(WAKE_DISPATCHERS, &[]).await
    {
        tracing::warn!(error = %e, "requeued notifications but could not wake the dispatchers; they will find them on their next poll");
    }
    let not_requeued = not_moved(client, ids, &requeued, FailedAction::Requeue).await?;
    Ok(RetryOutcome {
        requeued,
        not_requeued,
    })
}

// ---------------------------------------------------------------------------------------------
// discard

/// Why an operator discards Failed notifications: one line, never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscardReason(String);

impl DiscardReason {
    /// Longest reason kept, in characters; longer ones are cut.
    pub const MAX_CHARS: usize = 500;

    /// The reason with control characters turned into spaces and cut to
    /// [`DiscardReason::MAX_CHARS`]; `None` when nothing but white space is left.
    pub fn new(text: &str) -> Option<DiscardReason> {
        let line: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(Self::MAX_CHARS)
            .collect();
        let line = line.trim();
        (!line.is_empty()).then(|| DiscardReason(line.to_owned()))
    }

    /// The reason.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What [`discard_failed`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscardOutcome {
    /// Ids moved to `walhook.discarded`, ascending.
    pub discarded: Vec<i64>,
    /// Ids asked for that were not in `walhook.failed` (for the listener).
    pub not_discarded: Vec<NotRequeued>,
}

/// One statement, like [`REQUEUE`]: $1 listener (NULL: any), $2 ids (NULL: all), $3 reason.
const DISCARD: &str = "WITH moved AS (
    DELETE FROM walhook.failed f
    WHERE ($1::text IS NULL OR f.listener = $1)
      AND ($2::bigint[] IS NULL OR f.id = ANY($2))
    RETURNING f.*
)
INSERT INTO walhook.discarded (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                               attempts, created_at, failed_at, last_status_code, comment,
                               discarded_at, reason)
SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts, created_at,
       failed_at, last_status_code, comment, now(), $3::text
FROM moved
RETURNING id";

/// Moves Failed notifications to `walhook.discarded` with `reason`: they are never
/// delivered, retention prunes them (and then their events) like Processed ones. Ids that
/// were not discarded are reported, not errors. `walhook discard` and the web console both
/// call this.
pub async fn discard_failed(
    client: &Client,
    listener: Option<&str>,
    selection: &RetrySelection,
    reason: &DiscardReason,
) -> Result<DiscardOutcome, QueueError> {
    let ids = selected_ids(selection);
    if ids.as_ref().is_some_and(Vec::is_empty) {
        return Ok(DiscardOutcome::default());
    }
    let discarded = move_failed(
        client,
        DISCARD,
        listener,
        &ids,
        Some(reason.as_str()),
        "moving Failed notifications to walhook.discarded",
    )
    .await?;
    let not_discarded = not_moved(client, ids, &discarded, FailedAction::Discard).await?;
    Ok(DiscardOutcome {
        discarded,
        not_discarded,
    })
}

// ---------------------------------------------------------------------------------------------
// retention

/// What one [`prune`] run deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Rows deleted from `walhook.processed`.
    pub processed: u64,
    /// Rows deleted from `walhook.discarded`.
    pub discarded: u64,
    /// Rows deleted from `walhook.event`.
    pub events: u64,
}

/// Fixed once per run so that the batches agree on what "old" means.
const PRUNE_CUTOFF: &str = "SELECT now() - $1::float8 * interval '1 second'";

pub const PRUNE_PROCESSED: &str = "DELETE FROM walhook.processed WHERE id IN (
    SELECT id FROM walhook.processed WHERE delivered_at < $1
    ORDER BY delivered_at LIMIT $2
)";

const PRUNE_DISCARDED: &str = "DELETE FROM walhook.discarded WHERE id IN (
    SELECT id FROM walhook.discarded WHERE discarded_at < $1
    ORDER BY discarded_at LIMIT $2
)";

/// An event goes only when no notification of it is New or Failed (a Processed one may
/// outlive its event). The writer inserts an event and its New rows in one statement and a
/// move between status tables is one statement, so this statement's snapshot never sees an
/// event without the notification that pins it. SKIP LOCKED: a row a concurrent foreign key
/// check holds is left for the next run rather than waited for.
pub const PRUNE_EVENTS: &str = "DELETE FROM walhook.event WHERE id IN (
    SELECT e.id FROM walhook.event e
    WHERE e.queued_at < $1
      AND NOT EXISTS (SELECT 1 FROM walhook.new n WHERE n.event_id = e.id)
      AND NOT EXISTS (SELECT 1 FROM walhook.failed f WHERE f.event_id = e.id)
      AND NOT EXISTS (SELECT 1 FROM walhook.debounce d WHERE d.first_event = e.id)
      -- Events a cursor listener has not passed yet.
      AND NOT EXISTS (SELECT 1 FROM walhook.listener_cursor c WHERE c.event_id < e.id)
    ORDER BY e.queued_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)";

/// Deletes Processed notifications delivered more than `retention` ago, Discarded ones
/// discarded more than `retention` ago, then events queued
/// more than `retention` ago that have no New or Failed notification, `batch` rows per
/// statement (each its own short transaction), yielding between batches.
pub async fn prune(
    client: &Client,
    retention: Duration,
    batch: i64,
) -> Result<PruneOutcome, QueueError> {
    let batch = batch.max(1);
    let cutoff: SystemTime = client
        .query_one(PRUNE_CUTOFF, &[&retention.as_secs_f64()])
        .await
        .map_err(db_error("computing the retention cutoff", None))?
        .try_get(0)
        .map_err(db_error("computing the retention cutoff", None))?;
    let processed = delete_in_batches(
        client,
        PRUNE_PROCESSED,
        cutoff,
        batch,
        "pruning walhook.processed",
    )
    .await?;
    let discarded = delete_in_batches(
        client,
        PRUNE_DISCARDED,
        cutoff,
        batch,
        "pruning walhook.discarded",
    )
    .await?;
    let events =
        delete_in_batches(client, PRUNE_EVENTS, cutoff, batch, "pruning walhook.event").await?;
    Ok(PruneOutcome {
        processed,
        discarded,
        events,
    })
}

async fn delete_in_batches(
    client: &Client,
    sql: &str,
    cutoff: SystemTime,
    batch: i64,
    context: &'static str,
) -> Result<u64, QueueError> {
    let statement = client.prepare(sql).await.map_err(db_error(context, USE))?;
    let full = u64::try_from(batch).unwrap_or(u64::MAX);
    let mut total = 0u64;
    loop {
        let n = client
            .execute(&statement, &[&cutoff, &batch])
            .await
            .map_err(db_error(context, USE))?;
        total = total.saturating_add(n);
        if n < full {
            return Ok(total);
        }
        // Let the delivery tasks on this runtime (and their statements) go first.
        tokio::task::yield_now().await;
    }
}

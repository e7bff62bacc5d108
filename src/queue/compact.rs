//! Gives back the space a drained backlog leaves in the indexes of `walhook.new`.
//!
//! Vacuum makes the index pages of delivered rows reusable and truncates the empty tail of
//! the heap, but a btree file never shrinks: after a drain of 1M notifications the indexes
//! of an empty `walhook.new` kept 143 MB (docs/benchmarks.md). Once they are much larger
//! than the rows left need, they are rebuilt with `REINDEX TABLE CONCURRENTLY`, which takes
//! no lock that the writer, claims or recording wait for (SHARE UPDATE EXCLUSIVE: only
//! vacuum and DDL conflict with it) and is safe for concurrent readers.
//!
//! A rebuild that was interrupted (statement timeout, a cancelled backend) leaves invalid
//! indexes named `…_ccnew` / `…_ccold` behind; they are dropped before the next attempt.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::{Needs, QueueError, db_error};

/// Indexes smaller than this are left alone, whatever the rows need.
pub const COMPACT_MIN_INDEX_BYTES: i64 = 8 << 20;

/// Index bytes allowed per row left (estimated), far above what a row takes in all the
/// indexes of `walhook.new` (about 150 bytes), so a queue that is merely busy is never
/// rebuilt.
const BYTES_PER_ROW: f64 = 4096.0;

/// The indexes' size, the planner's row estimate (-1 before the first analyze) and the
/// invalid indexes an interrupted rebuild left.
const LOOK: &str = "SELECT pg_indexes_size('walhook.new'::regclass),
       (SELECT reltuples::float8 FROM pg_class WHERE oid = 'walhook.new'::regclass),
       ARRAY(SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE i.indrelid = 'walhook.new'::regclass
               AND NOT i.indisvalid
               AND (c.relname LIKE '%\\_ccnew%' OR c.relname LIKE '%\\_ccold%'))";

/// Rows actually left, counted up to a bound (an index-only walk).
const COUNT_UP_TO: &str = "SELECT count(*) FROM (SELECT 1 FROM walhook.new LIMIT $1) s";

/// One process rebuilds at a time; the key is "walhookc" in ASCII, so a DBA can recognise it
/// in `pg_locks`.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(8602275959056329571)";
const UNLOCK: &str = "SELECT pg_advisory_unlock(8602275959056329571)";

const REINDEX: &str = "REINDEX TABLE CONCURRENTLY walhook.new";

/// What [`compact_new`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compaction {
    /// The indexes are in proportion to the rows.
    NotNeeded,
    /// Another process is rebuilding them.
    Busy,
    /// Rebuilt: the indexes' size before and after, in bytes.
    Rebuilt {
        /// Before.
        before: i64,
        /// After.
        after: i64,
    },
    /// The indexes want a rebuild that only the table's owner may run; `fix` says how.
    NeedsOwner {
        /// Size of the indexes, bytes.
        bytes: i64,
        /// The statement for a DBA.
        fix: String,
    },
}

/// Rebuilds the indexes of `walhook.new` when they are over `min_bytes` (normally
/// [`COMPACT_MIN_INDEX_BYTES`]) and far larger than its rows need; drops indexes an
/// interrupted rebuild left first.
pub async fn compact_new(client: &Client, min_bytes: i64) -> Result<Compaction, QueueError> {
    const CONTEXT: &str = "looking at the size of walhook.new";
    let row = client
        .query_one(LOOK, &[])
        .await
        .map_err(db_error(CONTEXT, Some((Needs::Use, None))))?;
    let before: i64 = row.try_get(0).map_err(db_error(CONTEXT, None))?;
    let estimate: Option<f64> = row.try_get(1).map_err(db_error(CONTEXT, None))?;
    let leftovers: Vec<String> = row.try_get(2).map_err(db_error(CONTEXT, None))?;
    let needed = |rows: f64| rows.max(0.0) * BYTES_PER_ROW;
    // Never analyzed (-1): the size says nothing yet.
    let oversized = |rows: f64| rows >= 0.0 && before > min_bytes && (before as f64) > needed(rows);
    if leftovers.is_empty() && !oversized(estimate.unwrap_or(-1.0)) {
        return Ok(Compaction::NotNeeded);
    }
    // The estimate is from the last analyze; check against the rows there are now.
    let bound = (before as f64 / BYTES_PER_ROW).ceil() as i64 + 1;
    let rows: i64 = client
        .query_one(COUNT_UP_TO, &[&bound])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(CONTEXT, Some((Needs::Use, None))))?;
    if leftovers.is_empty() && !oversized(rows as f64) {
        return Ok(Compaction::NotNeeded);
    }
    let locked: bool = client
        .query_one(TRY_LOCK, &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(
            "locking the rebuild of walhook.new's indexes",
            None,
        ))?;
    if !locked {
        return Ok(Compaction::Busy);
    }
    let result = rebuild(client, &leftovers, before, oversized(rows as f64)).await;
    // Session-level lock: release it whatever happened (a broken connection frees it too).
    let _ = client.query_one(UNLOCK, &[]).await;
    result
}

async fn rebuild(
    client: &Client,
    leftovers: &[String],
    before: i64,
    oversized: bool,
) -> Result<Compaction, QueueError> {
    for index in leftovers {
        // Names come from the catalog, quoted by quote_ident.
        let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {index}");
        if let Err(e) = client.batch_execute(&drop).await {
            return owner_or_error(e, before, "dropping an index a rebuild left behind");
        }
    }
    if !oversized {
        return Ok(Compaction::NotNeeded);
    }
    if let Err(e) = client.batch_execute(REINDEX).await {
        return owner_or_error(e, before, "rebuilding the indexes of walhook.new");
    }
    let after: i64 = client
        .query_one("SELECT pg_indexes_size('walhook.new'::regclass)", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error("looking at the size of walhook.new", None))?;
    Ok(Compaction::Rebuilt { before, after })
}

fn owner_or_error(
    e: tokio_postgres::Error,
    bytes: i64,
    context: &'static str,
) -> Result<Compaction, QueueError> {
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        return Ok(Compaction::NeedsOwner {
            bytes,
            fix: format!("as the owner of walhook.new: {REINDEX}"),
        });
    }
    Err(db_error(context, None)(e))
}

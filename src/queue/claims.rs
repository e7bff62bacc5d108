//! Claiming due notifications so that the cost of a claim does not grow with the backlog.
//!
//! A listener's notifications are claimed in commit order through three statements:
//!
//! * [`CLAIM_NEXT`] resumes after a [`Cursor`], the last commit-order position the previous
//!   claim examined, so it never walks past rows it already handed out (in flight) or past
//!   the index entries of rows already moved away — the walk from the head that made claims
//!   slower as the backlog grew (8.5k/s at 50k, 2.4k/s at 200k).
//! * [`SWEEP`] walks from the head up to the cursor for rows behind it that became due: a
//!   retry whose time has come, a lease released or expired, a row moved back by `walhook
//!   retry`, a change another process's delivery unblocked. It runs when one of those is
//!   known to have happened and once a second as a safety net, like the old poll.
//! * [`CLAIM_HEADS`] claims the oldest change of named entities: the change that per-entity
//!   ordering held back while an earlier change of the same entity was in flight, as soon as
//!   this process records that earlier change.
//!
//! Each is one statement (candidates, row locks with SKIP LOCKED, leases, the events), sized
//! by a count and by a byte budget over the stored size of the events' `row` and `old`.

use futures_util::TryStreamExt;
use tokio_postgres::types::{FromSql, PgLsn, ToSql, Type};
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use super::Notification;
use super::notifications::stored_event;
use crate::types::Lsn;

/// Candidates whose summed stored size is under `$3` bytes are kept (the first always is).
/// Needs a CTE `scanned` of locked rows with the columns of `scanned_columns!`; defines
/// `kept` with the same columns. The size is `walhook.new.payload_bytes`, stored by the
/// fan-out; rows without it (moved back from `walhook.failed`) read it from the event
/// (`pg_column_size` reads a TOAST pointer's size without fetching the value).
macro_rules! within_budget {
    () => {
        r#"kept AS (
    SELECT s.id, s.tid, s.event_id, s.entity, s.entity_id, s.commit_lsn, s.seq
    FROM (
        SELECT s.*,
               sum(coalesce(s.payload_bytes, (
                       SELECT pg_column_size(e."row") + coalesce(pg_column_size(e.old), 0)
                       FROM walhook.event e WHERE e.id = s.event_id)))
                   OVER (ORDER BY s.commit_lsn, s.seq
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
        FROM scanned s
    ) s
    WHERE coalesce(s.before, 0) < $3::bigint
)"#
    };
}

/// The columns a `scanned` CTE selects from `walhook.new n`; `tid` lets the lease update
/// the locked row version without another index probe.
macro_rules! scanned_columns {
    () => {
        "n.id, n.ctid AS tid, n.event_id, n.entity, n.entity_id, n.commit_lsn, n.seq, n.payload_bytes"
    };
}

/// Leases the rows of CTE `$from` (alias `r`) that meet `$cond` for `$4` ms to holder `$5`,
/// counted from the moment each row is taken (`clock_timestamp()`, not the statement's
/// start, so a slow claim does not shorten its leases); defines `claimed`.
macro_rules! lease {
    ($from:literal, $cond:literal) => {
        concat!(
            "claimed AS (
    UPDATE walhook.new n
    SET locked_until = clock_timestamp() + $4::float8 * interval '1 millisecond',
        locked_by = $5::text
    FROM ",
            $from,
            " r
    WHERE n.ctid = r.tid",
            $cond,
            "
    RETURNING n.id, n.event_id, n.attempts, n.commit_lsn, n.seq, n.entity, n.entity_id
)"
        )
    };
}

/// The rows every claim statement returns, read by `read_claim`: `c` claimed (with the
/// event; NULL event columns when the event is missing), `h` held back or probed heads
/// (entity, key), and one `s` summary (last kept key, candidates scanned, candidates kept).
/// Needs CTEs `scanned`, `kept`, `held (id, entity, entity_id, commit_lsn, seq)`, `claimed`.
macro_rules! claim_output {
    () => {
        r#"
SELECT 'c'::text AS kind, c.id, c.attempts,
       (pg_column_size(e."row") + coalesce(pg_column_size(e.old), 0))::bigint AS stored_bytes,
       e.event_id, c.commit_lsn, c.seq, e.commit_time, c.entity, c.entity_id, e.action,
       e.changed_fields, e."row", e.old, e.subject, e.source_table, e.row_action,
       NULL::bigint AS scanned, NULL::bigint AS kept
FROM claimed c
LEFT JOIN walhook.event e ON e.id = c.event_id
UNION ALL
SELECT 'h', h.id, NULL, NULL, NULL, h.commit_lsn, h.seq, NULL, h.entity, h.entity_id,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM held h
UNION ALL
SELECT 's', NULL, NULL, NULL, NULL, last.commit_lsn, last.seq, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT count(*) FROM scanned), (SELECT count(*) FROM kept)
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT commit_lsn, seq FROM kept ORDER BY commit_lsn DESC, seq DESC LIMIT 1
) last ON true
ORDER BY 1, 6, 7"#
    };
}

/// Claims after the cursor: $1 listener, $2 most rows, $3 byte budget, $4 lease (ms), $5
/// lease holder, $6/$7 the cursor (commit_lsn, seq).
///
/// Candidates are the due, unleased rows after the cursor in commit order
/// (`new_listener_commit_order_idx`), locked as the walk finds them (SKIP LOCKED: another
/// claimer has it), up to $2 rows and the byte budget; the caller moves its cursor to the
/// last kept one (rows locked past the budget stay after it). Each is leased unless an earlier change of the same entity for the listener is still in
/// `walhook.new` — then it is returned as held back (`h`) and left for [`CLAIM_HEADS`] or
/// [`SWEEP`]: a listener never sees a change to X before an earlier change to X.
pub const CLAIM_NEXT: &str = concat!(
    "WITH scanned AS (
    SELECT ",
    scanned_columns!(),
    r#"
    FROM walhook.new n
    WHERE n.listener = $1
      AND (n.commit_lsn, n.seq) > ($6::pg_lsn, $7::int)
      AND n.next_attempt_at <= now()
      AND (n.locked_until IS NULL OR n.locked_until <= now())
    ORDER BY n.commit_lsn, n.seq
    LIMIT $2::bigint
    FOR UPDATE OF n SKIP LOCKED
), "#,
    within_budget!(),
    r#", checked AS (
    SELECT k.*, EXISTS (
        SELECT 1 FROM walhook.new p
        WHERE p.listener = $1
          AND p.entity = k.entity
          AND p.entity_id = k.entity_id
          AND (p.commit_lsn, p.seq) < (k.commit_lsn, k.seq)) AS waits
    FROM kept k
), held AS (
    SELECT id, entity, entity_id, commit_lsn, seq FROM checked WHERE waits
), "#,
    lease!("checked", " AND NOT r.waits"),
    claim_output!()
);

/// Claims behind the cursor: $1 listener, $2 most rows, $3 byte budget, $4 lease (ms), $5
/// lease holder, $6/$7 the cursor. Walks from the head of the listener's rows in commit
/// order, skipping rows in flight, not yet due, or waiting for an earlier change of their
/// entity, and stops at the cursor or at $2 rows.
pub const SWEEP: &str = concat!(
    "WITH scanned AS (
    SELECT ",
    scanned_columns!(),
    r#"
    FROM walhook.new n
    WHERE n.listener = $1
      AND (n.commit_lsn, n.seq) <= ($6::pg_lsn, $7::int)
      AND n.next_attempt_at <= now()
      AND (n.locked_until IS NULL OR n.locked_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM walhook.new p
          WHERE p.listener = n.listener
            AND p.entity = n.entity
            AND p.entity_id = n.entity_id
            AND (p.commit_lsn, p.seq) < (n.commit_lsn, n.seq))
    ORDER BY n.commit_lsn, n.seq
    LIMIT $2::bigint
    FOR UPDATE OF n SKIP LOCKED
), "#,
    within_budget!(),
    r#", held AS (
    SELECT NULL::bigint AS id, NULL::text AS entity, NULL::text AS entity_id,
           NULL::pg_lsn AS commit_lsn, NULL::int AS seq
    WHERE false
), "#,
    lease!("kept", ""),
    claim_output!()
);

/// Claims the oldest change of each named entity: $1 listener, $2 most rows, $3 byte budget,
/// $4 lease (ms), $5 lease holder, $6 entities, $7 entity ids. Each entity's first row is a
/// probe of `new_listener_entity_order_idx`; every such head is returned as `h` (claimed or
/// not), entities with no row left are not.
pub const CLAIM_HEADS: &str = concat!(
    r#"WITH head AS (
    SELECT h.id, h.entity, h.entity_id, h.commit_lsn, h.seq
    FROM unnest($6::text[], $7::text[]) AS k(entity, entity_id)
    CROSS JOIN LATERAL (
        SELECT n.id, n.entity, n.entity_id, n.commit_lsn, n.seq
        FROM walhook.new n
        WHERE n.listener = $1 AND n.entity = k.entity AND n.entity_id = k.entity_id
        ORDER BY n.commit_lsn, n.seq
        LIMIT 1
    ) h
), scanned AS (
    SELECT "#,
    scanned_columns!(),
    r#"
    FROM walhook.new n
    WHERE n.id IN (SELECT id FROM head)
      AND n.next_attempt_at <= now()
      AND (n.locked_until IS NULL OR n.locked_until <= now())
    ORDER BY n.commit_lsn, n.seq
    LIMIT $2::bigint
    FOR UPDATE OF n SKIP LOCKED
), "#,
    within_budget!(),
    r#", held AS (
    SELECT id, entity, entity_id, commit_lsn, seq FROM head
), "#,
    lease!("kept", ""),
    claim_output!()
);

/// A position in a listener's commit order: claims after it have not been examined yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// Commit LSN of the last examined row.
    pub commit_lsn: Lsn,
    /// Its seq; -1 before the first change of a commit.
    pub seq: i32,
}

impl Cursor {
    /// Before every notification.
    pub const START: Cursor = Cursor {
        commit_lsn: Lsn::ZERO,
        seq: -1,
    };
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor::START
    }
}

/// An entity whose next change waits for an earlier one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityKey {
    /// Entity type.
    pub entity: String,
    /// Entity id.
    pub entity_id: String,
}

/// How much one claim may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Most rows (at least 1).
    pub rows: usize,
    /// Byte budget over the stored size of the events' `row` and `old`; the first row is
    /// taken whatever its size.
    pub stored_bytes: u64,
    /// Bytes of `row` and `old` as received, after which further claimed rows are handed
    /// back unread ([`Claimed::OverBudget`]): a hard cap for values that compress well.
    pub received_bytes: u64,
}

/// One claimed notification as it arrived.
#[derive(Debug)]
pub enum Claimed {
    /// Ready to deliver; `bytes` is the size of its `row` and `old` as received.
    Ready {
        /// The notification.
        notification: Box<Notification>,
        /// Received size of `row` and `old`.
        bytes: u64,
        /// Their stored size (`pg_column_size`).
        stored_bytes: u64,
    },
    /// Its event cannot be read: the comment says why (move it to `walhook.failed`).
    Unreadable {
        /// Notification id.
        id: i64,
        /// What is wrong, for a DBA.
        comment: String,
    },
    /// Over [`ClaimLimits::received_bytes`]: leased but not read; release it.
    OverBudget {
        /// Notification id.
        id: i64,
    },
}

impl Claimed {
    /// The notification id.
    pub fn id(&self) -> i64 {
        match self {
            Claimed::Ready { notification, .. } => notification.id,
            Claimed::Unreadable { id, .. } | Claimed::OverBudget { id } => *id,
        }
    }
}

/// What one claim statement did.
#[derive(Debug, Default)]
pub struct Claim {
    /// Claimed rows, in commit order.
    pub rows: Vec<Claimed>,
    /// Entities whose change was held back by an earlier one (cursor claims) or whose
    /// oldest change was probed and still exists (head claims).
    pub held: Vec<EntityKey>,
    /// Cursor claims: the last position examined, when anything was.
    pub scanned_to: Option<Cursor>,
    /// Whether the statement stopped at its row limit or byte budget: more may be waiting.
    pub full: bool,
}

/// Raw length of a column value of any type, without decoding it.
struct RawLen(usize);

impl<'a> FromSql<'a> for RawLen {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawLen(raw.len()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Runs a claim statement (`CLAIM_NEXT`, `SWEEP` or `CLAIM_HEADS`) with the shared
/// parameters ($1..$5) then `extra` ($6, $7), reading rows as they arrive so that rows over
/// `limits.received_bytes` are never decoded.
pub(super) async fn run_claim(
    client: &Client,
    statement: &Statement,
    listener: &str,
    limits: ClaimLimits,
    lease_ms: f64,
    owner: &str,
    extra: [&(dyn ToSql + Sync); 2],
) -> Result<Claim, tokio_postgres::Error> {
    let rows = i64::try_from(limits.rows.max(1)).unwrap_or(i64::MAX);
    let budget = i64::try_from(limits.stored_bytes.max(1)).unwrap_or(i64::MAX);
    let params: [&(dyn ToSql + Sync); 7] = [
        &listener, &rows, &budget, &lease_ms, &owner, extra[0], extra[1],
    ];
    let stream = client.query_raw(statement, params).await?;
    let mut stream = std::pin::pin!(stream);
    let mut claim = Claim::default();
    let mut received = 0u64;
    while let Some(row) = stream.try_next().await? {
        let kind: &str = row.try_get(0)?;
        match kind {
            "c" => {
                let id: i64 = row.try_get(1)?;
                if received >= limits.received_bytes && !claim.rows.is_empty() {
                    claim.rows.push(Claimed::OverBudget { id });
                    claim.full = true;
                    continue;
                }
                let bytes = [12, 13]
                    .into_iter()
                    .map(|i| {
                        row.try_get::<_, Option<RawLen>>(i)
                            .map(|l| l.map_or(0, |l| l.0))
                    })
                    .sum::<Result<usize, _>>()? as u64;
                let stored: Option<i64> = row.try_get(3)?;
                received += bytes;
                claim.rows.push(match notification(&row, id) {
                    Ok(notification) => Claimed::Ready {
                        notification: Box::new(notification),
                        bytes,
                        stored_bytes: stored.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    },
                    Err(comment) => Claimed::Unreadable { id, comment },
                });
            }
            "h" => claim.held.push(EntityKey {
                entity: row.try_get(8)?,
                entity_id: row.try_get(9)?,
            }),
            _ => {
                let lsn: Option<PgLsn> = row.try_get(5)?;
                let seq: Option<i32> = row.try_get(6)?;
                if let (Some(lsn), Some(seq)) = (lsn, seq) {
                    claim.scanned_to = Some(Cursor {
                        commit_lsn: Lsn(u64::from(lsn)),
                        seq,
                    });
                }
                let scanned: i64 = row.try_get::<_, Option<i64>>(17)?.unwrap_or(0);
                let kept: i64 = row.try_get::<_, Option<i64>>(18)?.unwrap_or(0);
                claim.full |= scanned >= rows || kept < scanned;
            }
        }
    }
    Ok(claim)
}

/// Reads one claimed row's event (columns from 4 on, in the order of
/// [`super::notifications::stored_event`]); an error is the comment a DBA reads in
/// `walhook.failed`.
fn notification(row: &Row, id: i64) -> Result<Notification, String> {
    let read = || -> Result<Notification, String> {
        // A LEFT JOIN: NULL event columns when the event is gone.
        if row
            .try_get::<_, Option<Uuid>>(4)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err("its event is missing from walhook.event".to_owned());
        }
        Ok(Notification {
            id,
            attempts: row.try_get(2).map_err(|e| e.to_string())?,
            event: stored_event(row, 4)?,
        })
    };
    read().map_err(|detail| {
        format!("the event of this notification cannot be read from walhook.event: {detail}")
    })
}

//! Maps decoded row changes to entity events, per the `[[entity]]` configuration.
//!
//! Knows relations and entities; knows nothing about the wire or the queue tables.

use serde_json::{Map, Value};

use crate::replication::pgoutput::PgTimestamp;
use crate::types::{Action, EntityName, Lsn, TableName, Xid};

/// Where a change sits in the source: the transaction it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxContext {
    /// LSN of the transaction's commit record (from Begin.final_lsn).
    pub commit_lsn: Lsn,
    /// Transaction id.
    pub xid: Xid,
    /// Commit time.
    pub commit_time: PgTimestamp,
}

/// One entity event, ready for the queue.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityEvent {
    /// Commit LSN of the source transaction.
    pub commit_lsn: Lsn,
    /// Ordinal of the row change within its transaction (counting every Insert/Update/Delete
    /// message, emitted or not), so (commit_lsn, seq) is stable across re-sends.
    pub seq: u32,
    /// Source transaction id.
    pub xid: Xid,
    /// Source commit time.
    pub commit_time: PgTimestamp,
    /// Entity type.
    pub entity: EntityName,
    /// The source table.
    pub table: TableName,
    /// Entity id: the id column's text for a single column; a JSON array of texts for a
    /// composite id, so distinct keys never collide.
    pub entity_id: String,
    /// What happened.
    pub action: Action,
    /// Changed columns for updates when the old row is known; `None` when it is not known.
    /// For inserts and deletes: `None`.
    pub changed_fields: Option<Vec<String>>,
    /// The new row (the old row for deletes), excluded columns removed. A column whose value
    /// is unknown (unchanged TOAST with no old value) is absent.
    pub row: Map<String, Value>,
    /// The old row where known (updates with an old tuple, deletes), excluded columns removed.
    pub old: Option<Map<String, Value>>,
    /// Subject rendered from the entity's template.
    pub subject: Option<String>,
}

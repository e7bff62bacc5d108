//! Snapshot events: the rows of one backfill chunk (`walhook backfill`) as events of their
//! entity, built the way an insert of the same row is, so a Snapshot's row has the JSON shape
//! a Created event's row has for the same data.
//!
//! The chunk names its columns with their type oids and sends each value in the type's text
//! output form, as pgoutput does; the entity's configuration (id, exclude, subject) is
//! resolved against those columns like against a Relation message.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::plan::plan;
use super::{Cell, EntityEvent, Mapped, Mapper, RejectedChange, TxContext, entity_id, row_map};
use crate::replication::pgoutput::{Column, Relation, ReplicaIdentity};
use crate::types::{Action, Oid, TableName};

/// Prefix of the logical decoding messages that carry backfill chunks.
pub const BACKFILL_PREFIX: &str = "walhook.backfill";

/// One backfill chunk as written into the WAL with `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The backfill's id in `walhook.backfill`.
    pub run: i64,
    /// The backfill's token in `walhook.backfill`: capture drops chunks whose token does not
    /// match, so roles that may call `pg_logical_emit_message` cannot forge events.
    pub token: uuid::Uuid,
    /// The entity the rows are of.
    pub entity: String,
    /// The one listener the events are for; `None`: every listener that receives them.
    pub listener: Option<String>,
    /// The table's schema.
    pub schema: String,
    /// The table's name.
    pub table: String,
    /// The columns, in table order.
    pub columns: Vec<ChunkColumn>,
    /// The rows: per column the value in its type's text output form, `None` for NULL.
    pub rows: Vec<Vec<Option<String>>>,
}

/// One column of a [`Chunk`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkColumn {
    /// Column name.
    pub name: String,
    /// Type oid (`pg_attribute.atttypid`, as a Relation message has it).
    #[serde(rename = "type")]
    pub type_oid: u32,
    /// Part of the table's primary key.
    pub key: bool,
}

impl Chunk {
    /// The chunk's table.
    pub fn table_name(&self) -> TableName {
        TableName {
            schema: self.schema.clone(),
            name: self.table.clone(),
        }
    }
}

/// Why a chunk cannot become events; capture logs it and goes on.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The entity is not (or no longer) configured for the chunk's table.
    #[error(
        "backfill {run}: entity {entity} of table {table} is not configured in this walhook; its chunk was skipped"
    )]
    UnknownEntity {
        /// The backfill.
        run: i64,
        /// The entity the chunk names.
        entity: String,
        /// The chunk's table.
        table: TableName,
    },
    /// A row does not have as many values as the chunk has columns.
    #[error("backfill {run}: a row of its chunk has {got} value(s) for {expected} column(s)")]
    Shape {
        /// The backfill.
        run: i64,
        /// Columns in the chunk.
        expected: usize,
        /// Values in the row.
        got: usize,
    },
}

impl Mapper {
    /// The rows of `chunk` as Snapshot events (the entity's `snapshot_action`), the first
    /// with ordinal `first_seq` in its transaction; rows whose id cannot be read are set
    /// aside with the reason, as changes are.
    pub fn map_snapshot(
        &self,
        tx: &TxContext,
        first_seq: u32,
        chunk: &Chunk,
    ) -> Result<Vec<Mapped>, SnapshotError> {
        let table = chunk.table_name();
        let Some(entity) = self
            .entities
            .iter()
            .find(|e| e.name.as_str() == chunk.entity && e.table == table)
        else {
            return Err(SnapshotError::UnknownEntity {
                run: chunk.run,
                entity: chunk.entity.clone(),
                table,
            });
        };
        let rel = Relation {
            oid: Oid(0),
            namespace: chunk.schema.clone(),
            name: chunk.table.clone(),
            replica_identity: ReplicaIdentity::Default,
            columns: chunk
                .columns
                .iter()
                .map(|c| Column {
                    is_key: c.key,
                    name: c.name.clone(),
                    type_oid: Oid(c.type_oid),
                    type_modifier: -1,
                })
                .collect(),
        };
        // Notes about columns are the live stream's to report; a chunk only needs the plan.
        let (plan, _notes) = plan(entity, &table, &rel, self.primary_keys.get(&table), None);
        let action: Arc<str> = Arc::from(entity.snapshot_action.as_str());
        let only_listener: Option<Arc<str>> = chunk.listener.as_deref().map(Arc::from);
        let mut out = Vec::with_capacity(chunk.rows.len());
        for (seq, values) in (first_seq..).zip(&chunk.rows) {
            if values.len() != plan.columns.len() {
                return Err(SnapshotError::Shape {
                    run: chunk.run,
                    expected: plan.columns.len(),
                    got: values.len(),
                });
            }
            let cells: Vec<Cell<'_>> = values
                .iter()
                .map(|v| {
                    v.as_deref()
                        .map_or(Cell::Null, |t| Cell::Text(t.as_bytes()))
                })
                .collect();
            let row = row_map(&plan.columns, cells.iter().copied());
            if let Some(reason) = &plan.set_aside {
                out.push(Mapped::SetAside(RejectedChange {
                    commit_lsn: tx.commit_lsn,
                    seq,
                    xid: tx.xid,
                    commit_time: tx.commit_time,
                    entity: plan.entity.clone(),
                    table: table.clone(),
                    entity_id: None,
                    action: Action::Created,
                    reason: reason.clone(),
                    sqlstate: None,
                    row: Some(Value::Object(row).to_string()),
                    old: None,
                }));
                continue;
            }
            let entity_id = entity_id(&plan.id, &cells);
            let subject = plan
                .subject
                .as_ref()
                .map(|parts| super::render_subject(parts, &entity_id, &cells));
            out.push(Mapped::Event(EntityEvent {
                commit_lsn: tx.commit_lsn,
                seq,
                xid: tx.xid,
                commit_time: tx.commit_time,
                entity: plan.entity.clone(),
                table: table.clone(),
                entity_id,
                action: Action::Created,
                derived: Some(action.clone()),
                variant: None,
                changed_fields: None,
                row,
                old: None,
                subject,
                only_listener: only_listener.clone(),
            }));
        }
        Ok(out)
    }
}

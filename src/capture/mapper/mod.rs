//! Maps decoded row changes to entity events, per the `[[entity]]` configuration.
//!
//! Knows relations and entities; knows nothing about the wire or the queue tables.

mod child;
mod derive;
mod plan;
mod snapshot;
mod values;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use base64::prelude::*;
use serde_json::{Map, Value};

use crate::config::EntityConfig;
use crate::error::{Classify, ErrorClass};
use crate::replication::pgoutput::{ColumnValue, Message, OldTuple, PgTimestamp, Relation};
use crate::types::{Action, EntityName, Lsn, Oid, TableName, Xid};
use plan::{ColumnPlan, Plan, Shape, SubjectPart};

pub use child::{ChildChange, ChildEvents};
pub(crate) use plan::subject_columns;
pub use snapshot::{BACKFILL_PREFIX, Chunk, ChunkColumn, SnapshotError};

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
    /// composite id, so distinct keys never collide. A NULL (or unknown) single id is the text
    /// `null`; a NULL part of a composite id is JSON `null` in the array: `["a",null]`.
    pub entity_id: String,
    /// What happened to the row.
    pub action: Action,
    /// The derived action (`[[entity.action]]` name) this event stands for, when a rule
    /// matched; the event type is then `{entity}.{derived}`.
    pub derived: Option<Arc<str>>,
    /// Tells apart events of one change that are not its row event or a derived action:
    /// `child/{table}` for a parent's event made of child-row changes. `None` otherwise.
    pub variant: Option<Arc<str>>,
    /// Changed columns for updates when the old row is known; `None` when it is not known.
    /// For inserts and deletes: `None`.
    pub changed_fields: Option<Vec<String>>,
    /// The new row (the old row for deletes), excluded columns removed. A column whose value
    /// is unknown (unchanged TOAST with no old value) is absent.
    pub row: Map<String, Value>,
    /// The old row for updates whose old tuple is complete (REPLICA IDENTITY FULL), excluded
    /// columns removed; `None` otherwise, and for deletes (whose old row is `row`).
    pub old: Option<Map<String, Value>>,
    /// Subject rendered from the entity's template.
    pub subject: Option<String>,
    /// The one listener the event is for (a backfill run with `--listener`); `None`: every
    /// listener that subscribes to it.
    pub only_listener: Option<Arc<str>>,
}

/// Fixed cost counted per JSON value and per event on top of their text (allocations,
/// map entries), so rows of many small values are not undercounted.
const VALUE_OVERHEAD: usize = 32;
const EVENT_OVERHEAD: usize = 256;

impl EntityEvent {
    /// The action listeners see: the derived action's name, or the row action's.
    pub fn action_name(&self) -> &str {
        self.derived.as_deref().unwrap_or(self.action.as_str())
    }

    /// The event's `variant` in the queue's key (commit_lsn, seq, variant): '' for the row
    /// event, the derived action's name, or [`EntityEvent::variant`].
    pub fn variant_key(&self) -> &str {
        self.variant
            .as_deref()
            .or(self.derived.as_deref())
            .unwrap_or("")
    }

    /// The memory the event holds, roughly: what byte limits on capture buffers count.
    pub fn approx_bytes(&self) -> usize {
        let row = map_bytes(&self.row);
        let old = self.old.as_ref().map_or(0, map_bytes);
        let fields = self
            .changed_fields
            .as_ref()
            .map_or(0, |f| f.iter().map(|c| c.len() + VALUE_OVERHEAD).sum());
        EVENT_OVERHEAD + row + old + fields + self.entity_id.len()
    }
}

fn map_bytes(map: &Map<String, Value>) -> usize {
    map.iter()
        .map(|(k, v)| k.len() + VALUE_OVERHEAD + value_bytes(v))
        .sum()
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(|v| VALUE_OVERHEAD + value_bytes(v)).sum(),
        Value::Object(m) => map_bytes(m),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// A change that did not become an event, kept with the reason (in `walhook.rejected`).
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedChange {
    /// Commit LSN of the source transaction.
    pub commit_lsn: Lsn,
    /// Ordinal of the change within its transaction, as for events.
    pub seq: u32,
    /// Source transaction id.
    pub xid: Xid,
    /// Source commit time.
    pub commit_time: PgTimestamp,
    /// Entity type.
    pub entity: EntityName,
    /// The source table.
    pub table: TableName,
    /// Entity id, when it could be read.
    pub entity_id: Option<String>,
    /// What happened.
    pub action: Action,
    /// Why the change was set aside, in plain words.
    pub reason: String,
    /// The SQLSTATE the queue database refused it with, if it did.
    pub sqlstate: Option<String>,
    /// The row as JSON text, excluded columns removed.
    pub row: Option<String>,
    /// The old row as JSON text, when known.
    pub old: Option<String>,
}

impl RejectedChange {
    /// The event the queue refused, kept as text with the reason.
    pub fn of_event(e: &EntityEvent, reason: String, sqlstate: Option<String>) -> Self {
        RejectedChange {
            commit_lsn: e.commit_lsn,
            seq: e.seq,
            xid: e.xid,
            commit_time: e.commit_time,
            entity: e.entity.clone(),
            table: e.table.clone(),
            entity_id: Some(e.entity_id.clone()),
            action: e.action,
            reason,
            sqlstate,
            // serde_json escapes control characters (\u0000 stays six characters of text).
            row: Some(Value::Object(e.row.clone()).to_string()),
            old: e.old.as_ref().map(|o| Value::Object(o.clone()).to_string()),
        }
    }

    /// The memory the change holds, roughly.
    pub fn approx_bytes(&self) -> usize {
        EVENT_OVERHEAD
            + self.reason.len()
            + self.row.as_ref().map_or(0, String::len)
            + self.old.as_ref().map_or(0, String::len)
    }
}

/// What one row change became.
#[derive(Clone, Debug, PartialEq)]
pub enum Mapped {
    /// An entity event for the queue.
    Event(EntityEvent),
    /// A change that became several events: the derived actions of the rules it matched
    /// (in rule order), then its plain event unless a rule replaces it. Never empty; kept
    /// together in one queue batch.
    Events(Vec<EntityEvent>),
    /// A change set aside with the reason (the entity's id cannot be read).
    SetAside(RejectedChange),
}

/// A schema change on an entity table the operator should hear about (a configured column
/// renamed or dropped, an id that can no longer be read). Capture goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaNote {
    /// The entity.
    pub entity: EntityName,
    /// Its table.
    pub table: TableName,
    /// What changed, what capture does about it and what to update.
    pub message: String,
}

/// What a TRUNCATE of one relation becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Truncation {
    /// The relation is not an entity table (or unknown).
    NotEntity,
    /// An entity table whose `actions` do not include `truncated`.
    NotWanted(EntityName, TableName),
    /// A `Truncated` event.
    Event(Box<EntityEvent>),
}

/// A relation or change that cannot be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A row change named a relation whose Relation message never arrived.
    #[error(
        "row change for relation oid {oid} arrived before its Relation message; the replication stream is out of sync, restart walhook to resend it"
    )]
    UnknownRelation {
        /// The relation oid in the change.
        oid: Oid,
    },
    /// A column named in the entity configuration does not exist in the table.
    #[error("{0}")]
    UnknownColumn(Box<UnknownColumn>),
    /// No `id` is configured and the table has no primary key (or replica identity index).
    #[error("table {table} has no primary key; set id = [...] for entity {entity}")]
    NoPrimaryKey {
        /// The table.
        table: TableName,
        /// The entity.
        entity: EntityName,
    },
    /// REPLICA IDENTITY FULL marks every column as key, so the primary key cannot be read from
    /// the stream and was not supplied with [`Mapper::set_primary_key`].
    #[error(
        "table {table} has REPLICA IDENTITY FULL, which hides its primary key from the replication stream; set id = [...] for entity {entity}"
    )]
    KeyHiddenByFullIdentity {
        /// The table.
        table: TableName,
        /// The entity.
        entity: EntityName,
    },
    /// Deletes carry only the replica identity, which lacks an id column.
    #[error(
        "entity {entity}: id column {column:?} is not part of the replica identity of table {table}, so deletes arrive without it; run ALTER TABLE {table} REPLICA IDENTITY FULL or remove \"deleted\" from actions"
    )]
    IdNotInReplicaIdentity {
        /// The entity.
        entity: EntityName,
        /// The table.
        table: TableName,
        /// The id column missing from the replica identity.
        column: String,
    },
    /// The subject template would publish an excluded column.
    #[error(
        "entity {entity}: subject uses excluded column {column:?}; remove it from subject or from exclude"
    )]
    ExcludedInSubject {
        /// The entity.
        entity: EntityName,
        /// The excluded column.
        column: String,
    },
    /// A row did not have as many columns as its Relation message announced.
    #[error(
        "row change for table {table} has {got} column(s) but its Relation message lists {expected}; the replication stream is out of sync, restart walhook"
    )]
    ColumnCount {
        /// The table.
        table: TableName,
        /// Columns in the Relation message.
        expected: usize,
        /// Columns in the row.
        got: usize,
    },
}

/// Details of [`MapError::UnknownColumn`], boxed to keep `Result<_, MapError>` small.
#[derive(Debug, thiserror::Error)]
#[error(
    "entity {entity}: {role} column {column:?} does not exist in table {table}; use one of: {available}"
)]
pub struct UnknownColumn {
    /// The entity.
    pub entity: EntityName,
    /// The table.
    pub table: TableName,
    /// Which setting names the column: `id`, `track`, `exclude` or `subject`.
    pub role: &'static str,
    /// The missing column.
    pub column: String,
    /// The table's columns, comma-separated.
    pub available: String,
}

impl Classify for MapError {
    fn class(&self) -> ErrorClass {
        match self {
            MapError::UnknownRelation { .. } | MapError::ColumnCount { .. } => {
                ErrorClass::Permanent
            }
            MapError::UnknownColumn(_)
            | MapError::NoPrimaryKey { .. }
            | MapError::KeyHiddenByFullIdentity { .. }
            | MapError::IdNotInReplicaIdentity { .. }
            | MapError::ExcludedInSubject { .. } => ErrorClass::Config,
        }
    }
}

/// Turns row changes into entity events; holds the relations seen on the stream.
#[derive(Debug)]
pub struct Mapper {
    entities: Vec<EntityConfig>,
    primary_keys: HashMap<TableName, Vec<String>>,
    relations: HashMap<Oid, RelationState>,
}

#[derive(Debug)]
struct RelationState {
    table: TableName,
    /// The columns as last announced, to recognise renames.
    shape: Shape,
    /// `None` when the table is not an entity.
    plan: Option<Plan>,
    /// The entities that track the table as a child.
    children: Vec<child::ChildPlan>,
}

/// One column's value after resolving unchanged TOAST and key-only old tuples.
#[derive(Clone, Copy)]
enum Cell<'a> {
    /// The value is not known: it must be left out, never turned into null.
    Absent,
    Null,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

impl<'a> Cell<'a> {
    fn of(value: &'a ColumnValue) -> Self {
        match value {
            ColumnValue::Null => Cell::Null,
            ColumnValue::UnchangedToast => Cell::Absent,
            ColumnValue::Text(b) => Cell::Text(b),
            ColumnValue::Binary(b) => Cell::Binary(b),
        }
    }

    fn to_json(self, type_oid: Oid) -> Option<Value> {
        match self {
            Cell::Absent => None,
            Cell::Null => Some(Value::Null),
            Cell::Text(b) => Some(values::text_to_json(type_oid, &String::from_utf8_lossy(b))),
            Cell::Binary(b) => Some(Value::String(BASE64_STANDARD.encode(b))),
        }
    }

    fn text(self) -> Option<Cow<'a, str>> {
        match self {
            Cell::Text(b) => Some(String::from_utf8_lossy(b)),
            Cell::Binary(b) => Some(Cow::Owned(BASE64_STANDARD.encode(b))),
            Cell::Absent | Cell::Null => None,
        }
    }

    /// Whether two cells hold the same value; an unknown side counts as a change.
    fn same(self, other: Cell<'_>) -> bool {
        match (self, other) {
            (Cell::Null, Cell::Null) => true,
            (Cell::Text(a), Cell::Text(b)) | (Cell::Binary(a), Cell::Binary(b)) => a == b,
            _ => false,
        }
    }
}

/// An old tuple with its kind, for looking up what it knows.
#[derive(Clone, Copy)]
enum Old<'a> {
    Key(&'a [ColumnValue]),
    Full(&'a [ColumnValue]),
}

impl<'a> Old<'a> {
    fn of(old: &'a OldTuple) -> Self {
        match old {
            OldTuple::Key(t) => Old::Key(&t.0),
            OldTuple::Full(t) => Old::Full(&t.0),
        }
    }

    fn values(self) -> &'a [ColumnValue] {
        match self {
            Old::Key(v) | Old::Full(v) => v,
        }
    }

    /// The old value of column `i`; a key-only tuple sends non-key columns as null, which
    /// means "not sent", not NULL.
    fn cell(self, i: usize, column: &ColumnPlan) -> Cell<'a> {
        match self {
            Old::Full(v) => v.get(i).map_or(Cell::Absent, Cell::of),
            Old::Key(v) if column.is_key => v.get(i).map_or(Cell::Absent, Cell::of),
            Old::Key(_) => Cell::Absent,
        }
    }
}

impl Mapper {
    /// A mapper for the configured entities; it knows no relations until [`Mapper::on_relation`].
    pub fn new(entities: &[EntityConfig]) -> Mapper {
        Mapper {
            entities: entities.to_vec(),
            primary_keys: HashMap::new(),
            relations: HashMap::new(),
        }
    }

    /// Supplies a table's primary key columns read from the catalog. Needed for entities
    /// without `id` on tables with REPLICA IDENTITY FULL, whose Relation message flags every
    /// column as key. Applies to Relation messages received afterwards.
    pub fn set_primary_key(&mut self, table: TableName, columns: Vec<String>) {
        self.primary_keys.insert(table, columns);
    }

    /// Takes in a Relation message (replacing an earlier one for the same oid) and, when the
    /// table is an entity, resolves the entity's columns against the table's. Never fails:
    /// what the operator should know about (a configured column renamed or gone, an id that
    /// can no longer be read) comes back as notes, and capture goes on.
    pub fn on_relation(&mut self, rel: Relation) -> Vec<SchemaNote> {
        let table = TableName {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
        };
        let previous = self.relations.remove(&rel.oid).map(|r| r.shape);
        let mut notes = Vec::new();
        let plan = self
            .entities
            .iter()
            .find(|e| e.table == table)
            .map(|entity| {
                let (plan, messages) = plan::plan(
                    entity,
                    &table,
                    &rel,
                    self.primary_keys.get(&table),
                    previous.as_ref(),
                );
                let set_aside = plan.set_aside.iter().map(|reason| {
                    format!(
                        "changes of entity {} are set aside in walhook.rejected: {reason}",
                        entity.name
                    )
                });
                notes.extend(
                    messages
                        .into_iter()
                        .chain(set_aside)
                        .map(|message| SchemaNote {
                            entity: entity.name.clone(),
                            table: table.clone(),
                            message,
                        }),
                );
                plan
            });
        let mut children = Vec::new();
        for entity in &self.entities {
            for c in entity.children.iter().filter(|c| c.table == table) {
                match child::plan(entity, c, &rel) {
                    Ok(p) => children.push(p),
                    Err(message) => notes.push(SchemaNote {
                        entity: entity.name.clone(),
                        table: table.clone(),
                        message,
                    }),
                }
            }
        }
        let shape = plan::shape(&rel);
        self.relations.insert(
            rel.oid,
            RelationState {
                table,
                shape,
                plan,
                children,
            },
        );
        notes
    }

    /// Maps one Insert, Update or Delete. `Ok(None)` when the table is not an entity, the
    /// action is not configured, an update touches no tracked column, or the message is not
    /// a row change; a change whose id cannot be read is set aside with the reason.
    pub fn map_change(
        &mut self,
        tx: &TxContext,
        seq: u32,
        msg: &Message,
    ) -> Result<Option<Mapped>, MapError> {
        let (oid, action) = match msg {
            Message::Insert { relation, .. } => (*relation, Action::Created),
            Message::Update { relation, .. } => (*relation, Action::Updated),
            Message::Delete { relation, .. } => (*relation, Action::Deleted),
            _ => return Ok(None),
        };
        let state = self
            .relations
            .get(&oid)
            .ok_or(MapError::UnknownRelation { oid })?;
        let Some(plan) = &state.plan else {
            return Ok(None);
        };
        if !plan.actions.contains(&action) {
            return Ok(None);
        }
        let check = |t: &[ColumnValue]| {
            if t.len() == plan.columns.len() {
                Ok(())
            } else {
                Err(MapError::ColumnCount {
                    table: state.table.clone(),
                    expected: plan.columns.len(),
                    got: t.len(),
                })
            }
        };

        let mut changed_fields = None;
        let mut old_row = None;
        // An update touching no tracked column emits no plain event; rules still look at it.
        let mut tracked = true;
        let cells: Vec<Cell<'_>> = match msg {
            Message::Insert { new, .. } => {
                check(&new.0)?;
                new.0.iter().map(Cell::of).collect()
            }
            Message::Update { old, new, .. } => {
                check(&new.0)?;
                let old = old.as_ref().map(Old::of);
                if let Some(o) = old {
                    check(o.values())?;
                }
                let cells = resolve_update(&plan.columns, &new.0, old);
                if let Some(Old::Full(values)) = old {
                    let changed = changed_columns(&plan.columns, &new.0, values);
                    if let Some(track) = &plan.track
                        && !track.iter().any(|t| changed.contains(t))
                    {
                        if plan.rules.is_empty() {
                            return Ok(None);
                        }
                        tracked = false;
                    }
                    changed_fields = Some(
                        changed
                            .iter()
                            .filter_map(|&i| plan.columns.get(i))
                            .filter(|c| c.emit)
                            .map(|c| c.name.clone())
                            .collect(),
                    );
                    old_row = Some(row_map(&plan.columns, values.iter().map(Cell::of)));
                }
                cells
            }
            Message::Delete { old, .. } => {
                let old = Old::of(old);
                check(old.values())?;
                plan.columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| old.cell(i, c))
                    .collect()
            }
            _ => return Ok(None),
        };

        let row = row_map(&plan.columns, cells.iter().copied());
        let set_aside = match action {
            Action::Deleted => plan.set_aside.as_ref().or(plan.deletes_set_aside.as_ref()),
            _ => plan.set_aside.as_ref(),
        };
        if let Some(reason) = set_aside {
            return Ok(Some(Mapped::SetAside(RejectedChange {
                commit_lsn: tx.commit_lsn,
                seq,
                xid: tx.xid,
                commit_time: tx.commit_time,
                entity: plan.entity.clone(),
                table: state.table.clone(),
                entity_id: None,
                action,
                reason: reason.clone(),
                sqlstate: None,
                row: Some(Value::Object(row).to_string()),
                old: old_row.map(|o| Value::Object(o).to_string()),
            })));
        }
        let entity_id = entity_id(&plan.id, &cells);
        let subject = plan
            .subject
            .as_ref()
            .map(|parts| render_subject(parts, &entity_id, &cells));
        let event = EntityEvent {
            commit_lsn: tx.commit_lsn,
            seq,
            xid: tx.xid,
            commit_time: tx.commit_time,
            entity: plan.entity.clone(),
            table: state.table.clone(),
            entity_id,
            action,
            derived: None,
            variant: None,
            changed_fields,
            row,
            old: old_row,
            subject,
            only_listener: None,
        };
        Ok(derive::apply(&plan.rules, event, tracked))
    }

    /// What a row change of a child table (`[[entity.child]]`) means for the parents;
    /// empty for other tables. Gather them per transaction with [`ChildEvents`].
    pub fn map_child(&self, msg: &Message) -> Vec<ChildChange> {
        let oid = match msg {
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. } => relation,
            _ => return Vec::new(),
        };
        match self.relations.get(oid) {
            Some(state) if !state.children.is_empty() => {
                state.children.iter().flat_map(|c| c.changes(msg)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Maps the TRUNCATE of relation `oid`: a `Truncated` event with entity id `*`, an
    /// empty row and no changed fields, when the entity's `actions` include `truncated`.
    pub fn map_truncate(&self, tx: &TxContext, seq: u32, oid: Oid) -> Truncation {
        let Some(RelationState {
            table,
            plan: Some(plan),
            ..
        }) = self.relations.get(&oid)
        else {
            return Truncation::NotEntity;
        };
        if !plan.actions.contains(&Action::Truncated) {
            return Truncation::NotWanted(plan.entity.clone(), table.clone());
        }
        Truncation::Event(Box::new(EntityEvent {
            commit_lsn: tx.commit_lsn,
            seq,
            xid: tx.xid,
            commit_time: tx.commit_time,
            entity: plan.entity.clone(),
            table: table.clone(),
            entity_id: TRUNCATED_ID.to_owned(),
            action: Action::Truncated,
            derived: None,
            variant: None,
            changed_fields: Some(Vec::new()),
            row: Map::new(),
            old: None,
            subject: None,
            only_listener: None,
        }))
    }
}

/// The entity id of a `Truncated` event: every row of the table.
pub const TRUNCATED_ID: &str = "*";

/// The new row of an update, with unchanged TOAST values taken from the old tuple when it
/// has them and left absent otherwise.
fn resolve_update<'a>(
    columns: &[ColumnPlan],
    new: &'a [ColumnValue],
    old: Option<Old<'a>>,
) -> Vec<Cell<'a>> {
    new.iter()
        .zip(columns)
        .enumerate()
        .map(|(i, (value, column))| match (value, old) {
            (ColumnValue::UnchangedToast, Some(o)) => o.cell(i, column),
            _ => Cell::of(value),
        })
        .collect()
}

/// Indexes of the columns whose value differs between a complete old row and the new row.
fn changed_columns(columns: &[ColumnPlan], new: &[ColumnValue], old: &[ColumnValue]) -> Vec<usize> {
    (0..columns.len())
        .filter(|&i| match (new.get(i), old.get(i)) {
            (Some(ColumnValue::UnchangedToast), _) => false,
            (Some(n), Some(o)) => !Cell::of(n).same(Cell::of(o)),
            _ => true,
        })
        .collect()
}

fn row_map<'a>(
    columns: &[ColumnPlan],
    cells: impl IntoIterator<Item = Cell<'a>>,
) -> Map<String, Value> {
    let mut row = Map::new();
    for (column, cell) in columns.iter().zip(cells) {
        if column.emit
            && let Some(value) = cell.to_json(column.type_oid)
        {
            row.insert(column.name.clone(), value);
        }
    }
    row
}

/// A single id column's text, or for a composite id a JSON array of the texts so that
/// `["a,b","c"]` and `["a","b,c"]` stay distinct. An unknown or NULL part is JSON `null`
/// in the array; a single NULL id is the text `null`.
fn entity_id(id: &[usize], cells: &[Cell<'_>]) -> String {
    let text = |i: &usize| cells.get(*i).copied().and_then(Cell::text);
    match id {
        [single] => text(single).map_or_else(|| "null".to_owned(), Cow::into_owned),
        parts => {
            let values: Vec<Value> = parts
                .iter()
                .map(|i| text(i).map_or(Value::Null, |t| Value::String(t.into_owned())))
                .collect();
            Value::Array(values).to_string()
        }
    }
}

/// Renders the subject; a NULL or unknown column renders as empty text.
fn render_subject(parts: &[SubjectPart], entity_id: &str, cells: &[Cell<'_>]) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            SubjectPart::Literal(s) => out.push_str(s),
            SubjectPart::Id => out.push_str(entity_id),
            SubjectPart::Column(i) => {
                if let Some(t) = cells.get(*i).copied().and_then(Cell::text) {
                    out.push_str(&t);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;

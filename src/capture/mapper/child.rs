//! Child tables (`[[entity.child]]`): a change to a child row (an attribute of a customer)
//! is reported as an `Updated` event of the parent entity, whose changedFields name the
//! attribute(s). The changes of one transaction to one parent make one event.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::plan::ColumnPlan;
use super::{Cell, EntityEvent, Old, TxContext, entity_id, resolve_update, row_map};
use crate::config::{ChildTable, EntityConfig};
use crate::replication::pgoutput::{ColumnValue, Message, Relation};
use crate::types::{Action, EntityName, TableName};

/// A child table's configuration resolved against its Relation message.
#[derive(Debug)]
pub(super) struct ChildPlan {
    entity: EntityName,
    /// The parent entity's table: the events' source.
    parent_table: TableName,
    /// `child/{schema.table}`: the events' variant in the queue key.
    variant: Arc<str>,
    /// The key of the included rows in the event's row: the child table's name.
    key: String,
    parent: Vec<usize>,
    field: usize,
    include: bool,
    columns: Vec<ColumnPlan>,
    /// The entity's subject, when it needs nothing but `{id}`.
    subject: Option<String>,
}

/// Resolves `child` of `entity` against `rel`; `None` with a note when a column it names
/// is missing.
pub(super) fn plan(
    entity: &EntityConfig,
    child: &ChildTable,
    rel: &Relation,
) -> Result<ChildPlan, String> {
    let position = |name: &str| rel.columns.iter().position(|c| c.name == name);
    let missing = |role: &str, name: &str| {
        format!(
            "column {name:?} (named in {role} of [[entity.child]] {} of entity {}) does not exist in table {}: changes of that child table are not reported; update the [[entity]] named {} and reload",
            child.table, entity.name, child.table, entity.name
        )
    };
    let mut parent = Vec::new();
    for name in &child.parent {
        parent.push(position(name).ok_or_else(|| missing("parent", name))?);
    }
    let field = position(&child.field).ok_or_else(|| missing("field", &child.field))?;
    let subject = entity.subject.as_ref().and_then(|t| {
        super::plan::subject_columns(t)
            .is_empty()
            .then(|| t.clone())
    });
    Ok(ChildPlan {
        entity: entity.name.clone(),
        parent_table: entity.table.clone(),
        variant: Arc::from(format!("child/{}", child.table).as_str()),
        key: child.table.name.clone(),
        parent,
        field,
        include: child.include,
        columns: rel
            .columns
            .iter()
            .map(|c| ColumnPlan {
                name: c.name.clone(),
                type_oid: c.type_oid,
                is_key: c.is_key,
                emit: true,
            })
            .collect(),
        subject,
    })
}

/// One child row change, seen from its parent.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildChange {
    entity: EntityName,
    parent_table: TableName,
    variant: Arc<str>,
    key: String,
    entity_id: String,
    /// The attribute's name (the field column's value).
    name: String,
    /// With `include`: the attribute's row now (`null` once deleted).
    row: Option<Value>,
    subject: Option<String>,
}

impl ChildPlan {
    /// The change as the parent sees it; `None` when the parent id or the attribute's
    /// name is not in the tuple (a delete without REPLICA IDENTITY FULL).
    fn change(&self, cells: &[Cell<'_>], present: bool) -> Option<ChildChange> {
        if self.parent.iter().any(|i| {
            cells
                .get(*i)
                .is_none_or(|c| matches!(c, Cell::Absent | Cell::Null))
        }) {
            return None;
        }
        let name = cells.get(self.field).copied().and_then(Cell::text)?;
        let entity_id = entity_id(&self.parent, cells);
        let row = self.include.then(|| {
            if present {
                Value::Object(row_map(&self.columns, cells.iter().copied()))
            } else {
                Value::Null
            }
        });
        Some(ChildChange {
            entity: self.entity.clone(),
            parent_table: self.parent_table.clone(),
            variant: self.variant.clone(),
            key: self.key.clone(),
            subject: self.subject.as_ref().map(|t| t.replace("{id}", &entity_id)),
            entity_id,
            name: name.into_owned(),
            row,
        })
    }

    /// What one row change of the child table means for its parents: the new row's parent,
    /// and the old row's when it was another parent or another attribute (or deleted).
    pub(super) fn changes(&self, msg: &Message) -> Vec<ChildChange> {
        let fits = |t: &[ColumnValue]| t.len() == self.columns.len();
        let mut out = Vec::new();
        let (new, old) = match msg {
            Message::Insert { new, .. } => (Some(&new.0), None),
            Message::Update { new, old, .. } => (Some(&new.0), old.as_ref().map(Old::of)),
            Message::Delete { old, .. } => (None, Some(Old::of(old))),
            _ => return out,
        };
        let now = new.filter(|n| fits(n)).and_then(|n| {
            let cells = resolve_update(&self.columns, n, old);
            self.change(&cells, true)
        });
        let before = old.filter(|o| fits(o.values())).and_then(|o| {
            let cells: Vec<Cell<'_>> = self
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| o.cell(i, c))
                .collect();
            self.change(&cells, false)
        });
        let moved = match (&now, &before) {
            (Some(n), Some(b)) => n.entity_id != b.entity_id || n.name != b.name,
            _ => true,
        };
        out.extend(before.filter(|_| moved));
        out.extend(now);
        out
    }
}

/// The child changes of one transaction, gathered per parent until its commit.
#[derive(Debug, Default)]
pub struct ChildEvents {
    parents: Vec<Gathered>,
}

#[derive(Debug)]
struct Gathered {
    seq: u32,
    first: ChildChange,
    names: Vec<String>,
    rows: Map<String, Value>,
}

impl ChildEvents {
    /// Adds the child changes of the transaction's change number `seq`.
    pub fn add(&mut self, seq: u32, changes: Vec<ChildChange>) {
        for c in changes {
            let found = self.parents.iter_mut().find(|g| {
                g.first.entity_id == c.entity_id
                    && g.first.entity == c.entity
                    && g.first.variant == c.variant
            });
            let g = match found {
                Some(g) => g,
                None => {
                    self.parents.push(Gathered {
                        seq,
                        first: c.clone(),
                        names: Vec::new(),
                        rows: Map::new(),
                    });
                    let Some(g) = self.parents.last_mut() else {
                        continue;
                    };
                    g
                }
            };
            if !g.names.contains(&c.name) {
                g.names.push(c.name.clone());
            }
            if let Some(row) = c.row {
                g.rows.insert(c.name, row);
            }
        }
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// One `Updated` event per parent, keyed by the seq of its first child change.
    pub fn finish(&mut self, tx: &TxContext) -> Vec<EntityEvent> {
        self.parents
            .drain(..)
            .map(|g| {
                let mut row = Map::new();
                if g.first.row.is_some() {
                    row.insert(g.first.key.clone(), Value::Object(g.rows));
                }
                EntityEvent {
                    commit_lsn: tx.commit_lsn,
                    seq: g.seq,
                    xid: tx.xid,
                    commit_time: tx.commit_time,
                    entity: g.first.entity,
                    table: g.first.parent_table,
                    entity_id: g.first.entity_id,
                    action: Action::Updated,
                    derived: None,
                    variant: Some(g.first.variant),
                    changed_fields: Some(g.names),
                    row,
                    old: None,
                    subject: g.first.subject,
                    only_listener: None,
                }
            })
            .collect()
    }
}

//! Maps decoded row changes to entity events, per the `[[entity]]` configuration.
//!
//! Knows relations and entities; knows nothing about the wire or the queue tables.

mod values;

use std::borrow::Cow;
use std::collections::HashMap;

use base64::prelude::*;
use serde_json::{Map, Value};

use crate::config::EntityConfig;
use crate::error::{Classify, ErrorClass};
use crate::replication::pgoutput::{
    ColumnValue, Message, OldTuple, PgTimestamp, Relation, ReplicaIdentity,
};
use crate::types::{Action, EntityName, Lsn, Oid, TableName, Xid};

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
    /// What happened.
    pub action: Action,
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
    /// `None` when the table is not an entity.
    plan: Option<Plan>,
}

/// Everything per event needs, resolved once per Relation message.
#[derive(Debug)]
struct Plan {
    entity: EntityName,
    actions: Vec<Action>,
    columns: Vec<ColumnPlan>,
    id: Vec<usize>,
    track: Option<Vec<usize>>,
    subject: Option<Vec<SubjectPart>>,
}

#[derive(Debug)]
struct ColumnPlan {
    name: String,
    type_oid: Oid,
    is_key: bool,
    /// False for excluded columns.
    emit: bool,
}

#[derive(Debug, PartialEq)]
enum SubjectPart {
    Literal(String),
    Id,
    Column(usize),
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
    /// table is an entity, checks the entity's columns against the table's and resolves its plan.
    pub fn on_relation(&mut self, rel: Relation) -> Result<(), MapError> {
        let table = TableName {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
        };
        // A failed check must not leave the previous shape of the table in use.
        self.relations.remove(&rel.oid);
        let plan = match self.entities.iter().find(|e| e.table == table) {
            Some(entity) => Some(plan(entity, &table, &rel, self.primary_keys.get(&table))?),
            None => None,
        };
        self.relations
            .insert(rel.oid, RelationState { table, plan });
        Ok(())
    }

    /// Maps one Insert, Update or Delete to an entity event. `Ok(None)` when the table is not
    /// an entity, the action is not configured, an update touches no tracked column, or the
    /// message is not a row change.
    pub fn map_change(
        &mut self,
        tx: &TxContext,
        seq: u32,
        msg: &Message,
    ) -> Result<Option<EntityEvent>, MapError> {
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
                        return Ok(None);
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

        let entity_id = entity_id(&plan.id, &cells);
        let subject = plan
            .subject
            .as_ref()
            .map(|parts| render_subject(parts, &entity_id, &cells));
        Ok(Some(EntityEvent {
            commit_lsn: tx.commit_lsn,
            seq,
            xid: tx.xid,
            commit_time: tx.commit_time,
            entity: plan.entity.clone(),
            table: state.table.clone(),
            entity_id,
            action,
            changed_fields,
            row: row_map(&plan.columns, cells.iter().copied()),
            old: old_row,
            subject,
        }))
    }
}

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

/// Resolves an entity's configuration against the columns the table actually has.
fn plan(
    entity: &EntityConfig,
    table: &TableName,
    rel: &Relation,
    primary_key: Option<&Vec<String>>,
) -> Result<Plan, MapError> {
    let index_of = |role: &'static str, name: &str| {
        rel.columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| {
                MapError::UnknownColumn(Box::new(UnknownColumn {
                    entity: entity.name.clone(),
                    table: table.clone(),
                    role,
                    column: name.to_owned(),
                    available: rel
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }))
            })
    };

    let exclude = entity
        .exclude
        .iter()
        .map(|name| index_of("exclude", name))
        .collect::<Result<Vec<_>, _>>()?;
    let columns: Vec<ColumnPlan> = rel
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| ColumnPlan {
            name: c.name.clone(),
            type_oid: c.type_oid,
            is_key: c.is_key,
            emit: !exclude.contains(&i),
        })
        .collect();

    let id = match (&entity.id, primary_key) {
        (Some(names), _) | (None, Some(names)) => names
            .iter()
            .map(|name| index_of("id", name))
            .collect::<Result<Vec<_>, _>>()?,
        (None, None) if rel.replica_identity == ReplicaIdentity::Full => {
            return Err(MapError::KeyHiddenByFullIdentity {
                table: table.clone(),
                entity: entity.name.clone(),
            });
        }
        (None, None) => {
            let keys: Vec<usize> = columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect();
            if keys.is_empty() {
                return Err(MapError::NoPrimaryKey {
                    table: table.clone(),
                    entity: entity.name.clone(),
                });
            }
            keys
        }
    };
    if id.is_empty() {
        return Err(MapError::NoPrimaryKey {
            table: table.clone(),
            entity: entity.name.clone(),
        });
    }
    // With DEFAULT or USING INDEX identity a delete carries only the key columns.
    let key_only = matches!(
        rel.replica_identity,
        ReplicaIdentity::Default | ReplicaIdentity::Index
    );
    if key_only
        && entity.actions.contains(&Action::Deleted)
        && let Some(c) = id
            .iter()
            .filter_map(|&i| columns.get(i))
            .find(|c| !c.is_key)
    {
        return Err(MapError::IdNotInReplicaIdentity {
            entity: entity.name.clone(),
            table: table.clone(),
            column: c.name.clone(),
        });
    }

    let track = match &entity.track {
        Some(names) => Some(
            names
                .iter()
                .map(|name| index_of("track", name))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };

    let subject = match &entity.subject {
        Some(template) => {
            let mut parts = Vec::new();
            for part in split_template(template) {
                parts.push(match part {
                    TemplatePart::Literal(s) => SubjectPart::Literal(s.to_owned()),
                    TemplatePart::Placeholder("id") => SubjectPart::Id,
                    TemplatePart::Placeholder(name) => {
                        let i = index_of("subject", name)?;
                        if columns.get(i).is_some_and(|c| !c.emit) {
                            return Err(MapError::ExcludedInSubject {
                                entity: entity.name.clone(),
                                column: name.to_owned(),
                            });
                        }
                        SubjectPart::Column(i)
                    }
                });
            }
            Some(parts)
        }
        None => None,
    };

    Ok(Plan {
        entity: entity.name.clone(),
        actions: entity.actions.clone(),
        columns,
        id,
        track,
        subject,
    })
}

enum TemplatePart<'a> {
    Literal(&'a str),
    Placeholder(&'a str),
}

/// Splits `Customer/{id}` into literal text and `{name}` placeholders; a `{` without a
/// closing `}` is literal text.
fn split_template(template: &str) -> Vec<TemplatePart<'_>> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        if open > 0 {
            parts.push(TemplatePart::Literal(&rest[..open]));
        }
        parts.push(TemplatePart::Placeholder(&rest[open + 1..open + close]));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Literal(rest));
    }
    parts
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::replication::pgoutput::{Column, TupleData};

    const REL: Oid = Oid(16_384);
    const INT4: Oid = Oid(23);
    const TEXT: Oid = Oid(25);

    fn column(name: &str, type_oid: Oid, is_key: bool) -> Column {
        Column {
            is_key,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        }
    }

    /// public.customer(id int4 primary key, first_name text, city text, password_hash text, bio text)
    fn customer(identity: ReplicaIdentity) -> Relation {
        let full = identity == ReplicaIdentity::Full;
        Relation {
            oid: REL,
            namespace: "public".into(),
            name: "customer".into(),
            replica_identity: identity,
            columns: vec![
                column("id", INT4, true),
                column("first_name", TEXT, full),
                column("city", TEXT, full),
                column("password_hash", TEXT, full),
                column("bio", TEXT, full),
            ],
        }
    }

    fn entity() -> EntityConfig {
        EntityConfig {
            name: EntityName::new("Customer").unwrap(),
            table: TableName {
                schema: "public".into(),
                name: "customer".into(),
            },
            id: None,
            actions: Action::ALL.to_vec(),
            track: None,
            exclude: vec![],
            subject: None,
        }
    }

    fn t(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::from(s.to_owned()))
    }

    fn row(values: Vec<ColumnValue>) -> TupleData {
        TupleData(values)
    }

    fn tx() -> TxContext {
        TxContext {
            commit_lsn: Lsn(0x10),
            xid: Xid(7),
            commit_time: PgTimestamp(1),
        }
    }

    fn mapper(entity: EntityConfig, rel: Relation) -> Mapper {
        let mut m = Mapper::new(&[entity]);
        m.on_relation(rel).unwrap();
        m
    }

    fn map(m: &mut Mapper, msg: Message) -> Option<EntityEvent> {
        m.map_change(&tx(), 3, &msg).unwrap()
    }

    fn full_row(first: &str, city: &str) -> TupleData {
        row(vec![t("42"), t(first), t(city), t("secret"), t("long bio")])
    }

    fn update(old: Option<OldTuple>, new: TupleData) -> Message {
        Message::Update {
            relation: REL,
            old,
            new,
        }
    }

    fn insert(new: TupleData) -> Message {
        Message::Insert { relation: REL, new }
    }

    fn delete(old: OldTuple) -> Message {
        Message::Delete { relation: REL, old }
    }

    /// The key-only old tuple a DEFAULT identity sends for the customer table.
    fn key_row(id: &str) -> TupleData {
        row(vec![
            t(id),
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
        ])
    }

    /// A mapper for `ent` on the customer table with REPLICA IDENTITY FULL, which needs an
    /// explicit id.
    fn full_identity(mut ent: EntityConfig) -> Mapper {
        ent.id = Some(vec!["id".into()]);
        mapper(ent, customer(ReplicaIdentity::Full))
    }

    #[test]
    fn insert_becomes_created_with_typed_row() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let msg = insert(row(vec![
            t("42"),
            t("Ann"),
            ColumnValue::Null,
            t("x"),
            t("b"),
        ]));
        let e = map(&mut m, msg).unwrap();
        assert_eq!(e.action, Action::Created);
        assert_eq!(e.entity.as_str(), "Customer");
        assert_eq!(e.entity_id, "42");
        assert_eq!((e.commit_lsn, e.seq, e.xid), (Lsn(0x10), 3, Xid(7)));
        assert_eq!(e.table.to_string(), "public.customer");
        assert_eq!(e.changed_fields, None);
        assert_eq!(e.old, None);
        assert_eq!(
            Value::Object(e.row),
            json!({"id": 42, "first_name": "Ann", "city": null, "password_hash": "x", "bio": "b"})
        );
    }

    #[test]
    fn update_with_full_old_row_reports_changed_fields_and_old_row() {
        let mut m = full_identity(entity());
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        let e = map(&mut m, update(Some(old), full_row("Bea", "Oslo"))).unwrap();
        assert_eq!(e.action, Action::Updated);
        assert_eq!(e.entity_id, "42");
        assert_eq!(e.changed_fields, Some(vec!["first_name".to_owned()]));
        assert_eq!(e.row.get("first_name"), Some(&json!("Bea")));
        assert_eq!(e.old.unwrap().get("first_name"), Some(&json!("Ann")));
    }

    #[test]
    fn update_without_old_row_has_unknown_changed_fields() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let e = map(&mut m, update(None, full_row("Bea", "Oslo"))).unwrap();
        assert_eq!(e.changed_fields, None);
        assert_eq!(e.old, None);
        assert_eq!(e.row.get("city"), Some(&json!("Oslo")));
    }

    #[test]
    fn update_with_key_old_tuple_does_not_guess_changed_fields() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let key = key_row("41");
        let e = map(
            &mut m,
            update(Some(OldTuple::Key(key)), full_row("Bea", "Oslo")),
        )
        .unwrap();
        assert_eq!(e.entity_id, "42");
        assert_eq!(e.changed_fields, None);
        assert_eq!(e.old, None);
    }

    #[test]
    fn delete_with_key_tuple_has_only_key_columns_in_row() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let key = key_row("42");
        let e = map(&mut m, delete(OldTuple::Key(key))).unwrap();
        assert_eq!(e.action, Action::Deleted);
        assert_eq!(e.entity_id, "42");
        assert_eq!(Value::Object(e.row), json!({"id": 42}));
        assert_eq!(e.old, None);
        assert_eq!(e.changed_fields, None);
    }

    #[test]
    fn delete_with_full_tuple_has_whole_old_row() {
        let mut m = full_identity(entity());
        let msg = delete(OldTuple::Full(full_row("Ann", "Oslo")));
        let e = map(&mut m, msg).unwrap();
        assert_eq!(e.row.len(), 5);
        assert_eq!(e.row.get("city"), Some(&json!("Oslo")));
        assert_eq!(e.old, None);
    }

    fn order_line() -> Relation {
        Relation {
            oid: REL,
            namespace: "sales".into(),
            name: "order_line".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("a", TEXT, true),
                column("b", TEXT, true),
                column("qty", INT4, false),
            ],
        }
    }

    fn order_line_entity() -> EntityConfig {
        EntityConfig {
            name: EntityName::new("OrderLine").unwrap(),
            table: TableName {
                schema: "sales".into(),
                name: "order_line".into(),
            },
            subject: Some("lines/{id}/{qty}".into()),
            ..entity()
        }
    }

    #[test]
    fn composite_ids_are_json_arrays_that_never_collide() {
        let mut m = mapper(order_line_entity(), order_line());
        let ins = |a: &str, b: &str| insert(row(vec![t(a), t(b), t("1")]));
        let first = map(&mut m, ins("a,b", "c")).unwrap();
        let second = map(&mut m, ins("a", "b,c")).unwrap();
        assert_eq!(first.entity_id, r#"["a,b","c"]"#);
        assert_eq!(second.entity_id, r#"["a","b,c"]"#);
        assert_eq!(first.subject.as_deref(), Some(r#"lines/["a,b","c"]/1"#));
        let null_part = insert(row(vec![t("x"), ColumnValue::Null, t("1")]));
        assert_eq!(map(&mut m, null_part).unwrap().entity_id, r#"["x",null]"#);
    }

    #[test]
    fn subject_template_renders_id_and_columns() {
        let mut ent = entity();
        ent.subject = Some("Customer/{id} in {city}".into());
        let mut m = mapper(ent, customer(ReplicaIdentity::Default));
        let e = map(&mut m, insert(full_row("Ann", "Oslo"))).unwrap();
        assert_eq!(e.subject.as_deref(), Some("Customer/42 in Oslo"));
    }

    #[test]
    fn update_touching_no_tracked_column_is_dropped() {
        let mut ent = entity();
        ent.track = Some(vec!["city".into()]);
        let mut m = full_identity(ent);
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        assert_eq!(
            map(&mut m, update(Some(old), full_row("Bea", "Oslo"))),
            None
        );
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        let e = map(&mut m, update(Some(old), full_row("Ann", "Bergen"))).unwrap();
        assert_eq!(e.changed_fields, Some(vec!["city".to_owned()]));
    }

    #[test]
    fn tracked_update_with_unknown_old_row_is_emitted() {
        let mut ent = entity();
        ent.track = Some(vec!["city".into()]);
        let mut m = mapper(ent, customer(ReplicaIdentity::Default));
        let e = map(&mut m, update(None, full_row("Bea", "Oslo"))).unwrap();
        assert_eq!(e.changed_fields, None);
    }

    #[test]
    fn excluded_columns_never_appear_in_row_old_or_changed_fields() {
        let mut ent = entity();
        ent.exclude = vec!["password_hash".into()];
        let mut m = full_identity(ent);
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        let new = row(vec![
            t("42"),
            t("Bea"),
            t("Oslo"),
            t("changed"),
            t("long bio"),
        ]);
        let e = map(&mut m, update(Some(old), new)).unwrap();
        assert!(!e.row.contains_key("password_hash"));
        assert!(!e.old.unwrap().contains_key("password_hash"));
        assert_eq!(e.changed_fields, Some(vec!["first_name".to_owned()]));
        let ins = map(&mut m, insert(full_row("A", "B"))).unwrap();
        assert!(!ins.row.contains_key("password_hash"));
    }

    #[test]
    fn excluded_column_can_still_be_tracked_without_leaking() {
        let mut ent = entity();
        ent.exclude = vec!["password_hash".into()];
        ent.track = Some(vec!["password_hash".into()]);
        let mut m = full_identity(ent);
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        let new = row(vec![
            t("42"),
            t("Ann"),
            t("Oslo"),
            t("changed"),
            t("long bio"),
        ]);
        let e = map(&mut m, update(Some(old), new)).unwrap();
        assert_eq!(e.changed_fields, Some(vec![]));
    }

    #[test]
    fn actions_not_configured_emit_nothing() {
        let mut ent = entity();
        ent.actions = vec![Action::Created];
        let mut m = mapper(ent, customer(ReplicaIdentity::Default));
        assert_eq!(map(&mut m, update(None, full_row("Bea", "Oslo"))), None);
        let key = key_row("42");
        assert_eq!(map(&mut m, delete(OldTuple::Key(key))), None);
        assert!(map(&mut m, insert(full_row("A", "B"))).is_some());
    }

    #[test]
    fn unchanged_toast_takes_old_value_and_is_not_a_change() {
        let mut m = full_identity(entity());
        let old = OldTuple::Full(full_row("Ann", "Oslo"));
        let new = row(vec![
            t("42"),
            t("Bea"),
            t("Oslo"),
            t("secret"),
            ColumnValue::UnchangedToast,
        ]);
        let e = map(&mut m, update(Some(old), new)).unwrap();
        assert_eq!(e.row.get("bio"), Some(&json!("long bio")));
        assert_eq!(e.changed_fields, Some(vec!["first_name".to_owned()]));
    }

    #[test]
    fn unchanged_toast_without_old_value_is_absent_not_null() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let new = row(vec![
            t("42"),
            t("Bea"),
            t("Oslo"),
            t("secret"),
            ColumnValue::UnchangedToast,
        ]);
        let e = map(&mut m, update(None, new)).unwrap();
        assert!(!e.row.contains_key("bio"));
        assert_eq!(e.row.len(), 4);
    }

    #[test]
    fn change_for_unknown_relation_is_a_permanent_error() {
        let mut m = Mapper::new(&[entity()]);
        let err = m
            .map_change(&tx(), 0, &insert(full_row("A", "B")))
            .unwrap_err();
        assert!(matches!(err, MapError::UnknownRelation { oid: REL }));
        assert_eq!(err.class(), ErrorClass::Permanent);
    }

    #[test]
    fn tables_that_are_not_entities_are_ignored() {
        let mut m = mapper(entity(), order_line());
        let msg = insert(row(vec![t("a"), t("b"), t("1")]));
        assert_eq!(map(&mut m, msg), None);
    }

    #[test]
    fn row_with_wrong_column_count_is_an_error() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let err = m
            .map_change(&tx(), 0, &insert(row(vec![t("1")])))
            .unwrap_err();
        assert!(matches!(
            err,
            MapError::ColumnCount {
                expected: 5,
                got: 1,
                ..
            }
        ));
    }

    #[test]
    fn missing_configured_columns_are_config_errors_naming_the_column() {
        for (role, configure) in [
            (
                "id",
                (|e: &mut EntityConfig| e.id = Some(vec!["nope".into()])) as fn(&mut EntityConfig),
            ),
            ("track", |e| e.track = Some(vec!["nope".into()])),
            ("exclude", |e| e.exclude = vec!["nope".into()]),
            ("subject", |e| e.subject = Some("x/{nope}".into())),
        ] {
            let mut ent = entity();
            configure(&mut ent);
            let err = Mapper::new(&[ent])
                .on_relation(customer(ReplicaIdentity::Default))
                .unwrap_err();
            assert_eq!(err.class(), ErrorClass::Config);
            let msg = err.to_string();
            assert!(msg.contains("entity Customer"), "{msg}");
            assert!(msg.contains(&format!("{role} column \"nope\"")), "{msg}");
            assert!(
                msg.contains("id, first_name, city, password_hash, bio"),
                "{msg}"
            );
        }
    }

    #[test]
    fn table_without_key_and_without_id_is_a_config_error() {
        let mut rel = customer(ReplicaIdentity::Nothing);
        for c in &mut rel.columns {
            c.is_key = false;
        }
        let err = Mapper::new(&[entity()]).on_relation(rel).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Config);
        assert_eq!(
            err.to_string(),
            "table public.customer has no primary key; set id = [...] for entity Customer"
        );
    }

    #[test]
    fn full_identity_needs_configured_or_supplied_primary_key() {
        let err = Mapper::new(&[entity()])
            .on_relation(customer(ReplicaIdentity::Full))
            .unwrap_err();
        assert!(matches!(err, MapError::KeyHiddenByFullIdentity { .. }));
        let mut m = Mapper::new(&[entity()]);
        m.set_primary_key(entity().table, vec!["id".into()]);
        m.on_relation(customer(ReplicaIdentity::Full)).unwrap();
        let e = map(&mut m, insert(full_row("A", "B"))).unwrap();
        assert_eq!(e.entity_id, "42");
    }

    #[test]
    fn id_outside_replica_identity_is_rejected_only_when_deletes_are_wanted() {
        let mut ent = entity();
        ent.id = Some(vec!["first_name".into()]);
        let err = Mapper::new(&[ent.clone()])
            .on_relation(customer(ReplicaIdentity::Default))
            .unwrap_err();
        assert!(
            matches!(err, MapError::IdNotInReplicaIdentity { .. }),
            "{err}"
        );
        ent.actions = vec![Action::Created, Action::Updated];
        let mut m = mapper(ent, customer(ReplicaIdentity::Default));
        let e = map(&mut m, insert(full_row("Ann", "B"))).unwrap();
        assert_eq!(e.entity_id, "Ann");
    }

    #[test]
    fn subject_may_not_use_excluded_columns() {
        let mut ent = entity();
        ent.exclude = vec!["password_hash".into()];
        ent.subject = Some("c/{password_hash}".into());
        let err = Mapper::new(&[ent])
            .on_relation(customer(ReplicaIdentity::Default))
            .unwrap_err();
        assert!(matches!(err, MapError::ExcludedInSubject { .. }));
    }

    #[test]
    fn resent_relation_replaces_the_cached_one() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let mut altered = customer(ReplicaIdentity::Default);
        altered.columns.push(column("zip", INT4, false));
        m.on_relation(altered).unwrap();
        let new = row(vec![t("42"), t("A"), t("B"), t("s"), t("b"), t("0150")]);
        let e = map(&mut m, insert(new)).unwrap();
        assert_eq!(e.row.get("zip"), Some(&json!(150)));
        let old_shape = insert(full_row("A", "B"));
        assert!(m.map_change(&tx(), 0, &old_shape).is_err());
    }

    #[test]
    fn failed_relation_check_forgets_the_previous_shape() {
        let mut m = mapper(entity(), customer(ReplicaIdentity::Default));
        let mut renamed = customer(ReplicaIdentity::Default);
        for c in &mut renamed.columns {
            c.is_key = false;
        }
        assert!(m.on_relation(renamed).is_err());
        let msg = insert(full_row("A", "B"));
        assert!(matches!(
            m.map_change(&tx(), 0, &msg),
            Err(MapError::UnknownRelation { .. })
        ));
    }

    #[test]
    fn template_splitting_handles_unclosed_braces() {
        let parts: Vec<String> = split_template("a{b}c{d")
            .into_iter()
            .map(|p| match p {
                TemplatePart::Literal(s) => format!("L:{s}"),
                TemplatePart::Placeholder(s) => format!("P:{s}"),
            })
            .collect();
        assert_eq!(parts, ["L:a", "P:b", "L:c{d"]);
    }
}

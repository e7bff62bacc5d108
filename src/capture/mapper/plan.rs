//! Resolving an entity's configuration against the columns a Relation message announces.
//!
//! Tables change under a running capture (ADD, DROP and RENAME COLUMN). Resolution never
//! fails: a column the configuration names that is gone becomes a note for the operator, a
//! rename seen within the session is followed, and an entity whose id can no longer be
//! read is *set aside* — its changes are kept with the reason instead of becoming events.

use super::MapError;
use crate::config::EntityConfig;
use crate::replication::pgoutput::{Column, Relation, ReplicaIdentity};
use crate::types::{Action, EntityName, Oid, TableName};

/// Everything per event needs, resolved once per Relation message.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) entity: EntityName,
    pub(super) actions: Vec<Action>,
    pub(super) columns: Vec<ColumnPlan>,
    pub(super) id: Vec<usize>,
    pub(super) track: Option<Vec<usize>>,
    pub(super) subject: Option<Vec<SubjectPart>>,
    /// Why every change of the entity is set aside, when its id cannot be read.
    pub(super) set_aside: Option<String>,
    /// Why deletes are set aside: they arrive without an id column.
    pub(super) deletes_set_aside: Option<String>,
    /// Derived-action rules, in file order.
    pub(super) rules: Vec<super::derive::Rule>,
}

#[derive(Debug)]
pub(super) struct ColumnPlan {
    pub(super) name: String,
    pub(super) type_oid: Oid,
    pub(super) is_key: bool,
    /// False for excluded columns.
    pub(super) emit: bool,
}

#[derive(Debug, PartialEq)]
pub(super) enum SubjectPart {
    Literal(String),
    Id,
    Column(usize),
}

/// A column's name and type as a Relation message announced it.
pub(super) type Shape = Vec<(String, Oid)>;

/// The shape of a Relation message, kept to recognise renames in the next one.
pub(super) fn shape(rel: &Relation) -> Shape {
    rel.columns
        .iter()
        .map(|c| (c.name.clone(), c.type_oid))
        .collect()
}

/// Renames between two shapes of one table: `(old, new)` names at the same position with the
/// same type, when no column was added or dropped (a rename keeps the column's place).
fn renames(previous: Option<&Shape>, columns: &[Column]) -> Vec<(String, String)> {
    let Some(previous) = previous.filter(|p| p.len() == columns.len()) else {
        return Vec::new();
    };
    let renamed: Vec<(String, String)> = previous
        .iter()
        .zip(columns)
        .filter(|((name, _), c)| *name != c.name)
        .map(|((name, ty), c)| (name.clone(), c.name.clone(), *ty == c.type_oid))
        .filter_map(|(old, new, same_type)| same_type.then_some((old, new)))
        .collect();
    // Another difference in the same message is not a simple rename: follow nothing.
    let differing = previous
        .iter()
        .zip(columns)
        .filter(|((name, ty), c)| *name != c.name || *ty != c.type_oid)
        .count();
    if differing == renamed.len() {
        renamed
    } else {
        Vec::new()
    }
}

/// Looks columns up by name, following renames, and writes notes about what it cannot find.
pub(super) struct Resolver<'a> {
    entity: &'a EntityConfig,
    table: &'a TableName,
    rel: &'a Relation,
    renames: Vec<(String, String)>,
    notes: Vec<String>,
}

impl Resolver<'_> {
    fn position(&self, name: &str) -> Option<usize> {
        self.rel.columns.iter().position(|c| c.name == name)
    }

    /// The name of column `i` in the table now.
    pub(super) fn column_name(&self, i: usize) -> Option<&str> {
        self.rel.columns.get(i).map(|c| c.name.as_str())
    }

    /// The column's index, following a rename (noted); `None` when it is gone.
    pub(super) fn find(&mut self, role: &str, name: &str) -> Option<usize> {
        if let Some(i) = self.position(name) {
            return Some(i);
        }
        let renamed = self
            .renames
            .iter()
            .find(|(old, _)| old == name)
            .map(|(_, new)| new.clone());
        if let Some(new) = renamed {
            self.notes.push(format!(
                "column {name:?} of table {} (named in {role} of entity {}) was renamed to {new:?}; capture follows it — update {role} under the [[entity]] named {} and reload",
                self.table, self.entity.name, self.entity.name
            ));
            return self.position(&new);
        }
        None
    }

    fn available(&self) -> String {
        self.rel
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(super) fn gone(&mut self, role: &str, name: &str, consequence: &str) {
        self.notes.push(format!(
            "column {name:?} (named in {role} of entity {}) no longer exists in table {}: {consequence}; update {role} under the [[entity]] named {} and reload (the table has: {})",
            self.entity.name,
            self.table,
            self.entity.name,
            self.available()
        ));
    }
}

/// Resolves `entity` against `rel`; `previous` is the table's shape in the last Relation
/// message of this session. Returns the plan and notes for the operator.
pub(super) fn plan(
    entity: &EntityConfig,
    table: &TableName,
    rel: &Relation,
    primary_key: Option<&Vec<String>>,
    previous: Option<&Shape>,
) -> (Plan, Vec<String>) {
    let mut r = Resolver {
        entity,
        table,
        rel,
        renames: renames(previous, &rel.columns),
        notes: Vec::new(),
    };

    let mut exclude = Vec::new();
    for name in &entity.exclude {
        match r.find("exclude", name) {
            Some(i) => exclude.push(i),
            None => r.gone(
                "exclude",
                name,
                "nothing to exclude any more (if it was renamed rather than dropped, its values now appear in events under the new name)",
            ),
        }
    }
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

    let (id, mut set_aside) = match resolve_id(&mut r, &columns, primary_key) {
        Ok(id) => (id, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    // With DEFAULT or USING INDEX identity a delete carries only the key columns.
    let key_only = matches!(
        rel.replica_identity,
        ReplicaIdentity::Default | ReplicaIdentity::Index
    );
    let deletes_set_aside = id
        .iter()
        .filter_map(|&i| columns.get(i))
        .find(|c| key_only && entity.actions.contains(&Action::Deleted) && !c.is_key)
        .map(|c| {
            MapError::IdNotInReplicaIdentity {
                entity: entity.name.clone(),
                table: table.clone(),
                column: c.name.clone(),
            }
            .to_string()
        });

    let track = entity.track.as_ref().and_then(|names| {
        let mut found = Vec::new();
        for name in names {
            match r.find("track", name) {
                Some(i) => found.push(i),
                None => r.gone("track", name, "updates are no longer filtered on it"),
            }
        }
        // With no tracked column left, emit every update rather than none.
        (!found.is_empty()).then_some(found)
    });

    let subject = match &entity.subject {
        Some(template) => match subject(&mut r, &columns, template) {
            Ok(parts) => Some(parts),
            Err(e) => {
                set_aside.get_or_insert(e.to_string());
                None
            }
        },
        None => None,
    };
    let rules = super::derive::rules(&mut r, &entity.derived);
    let notes = r.notes;
    (
        Plan {
            entity: entity.name.clone(),
            actions: entity.actions.clone(),
            columns,
            id,
            track,
            subject,
            set_aside,
            deletes_set_aside,
            rules,
        },
        notes,
    )
}

/// The id columns: configured, from the catalog's primary key, or the replica identity key.
fn resolve_id(
    r: &mut Resolver<'_>,
    columns: &[ColumnPlan],
    primary_key: Option<&Vec<String>>,
) -> Result<Vec<usize>, MapError> {
    let (entity, table) = (r.entity, r.table);
    let id = match (&entity.id, primary_key) {
        (Some(names), _) | (None, Some(names)) => {
            let mut id = Vec::new();
            for name in names {
                // An id column is never followed through a rename: ids would change meaning.
                match r.position(name) {
                    Some(i) => id.push(i),
                    None => {
                        return Err(MapError::UnknownColumn(Box::new(super::UnknownColumn {
                            entity: entity.name.clone(),
                            table: table.clone(),
                            role: "id",
                            column: name.clone(),
                            available: r.available(),
                        })));
                    }
                }
            }
            id
        }
        (None, None) if r.rel.replica_identity == ReplicaIdentity::Full => {
            return Err(MapError::KeyHiddenByFullIdentity {
                table: table.clone(),
                entity: entity.name.clone(),
            });
        }
        (None, None) => columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect(),
    };
    if id.is_empty() {
        return Err(MapError::NoPrimaryKey {
            table: table.clone(),
            entity: entity.name.clone(),
        });
    }
    Ok(id)
}

/// The subject template's parts; a column that is gone renders as nothing (noted).
fn subject(
    r: &mut Resolver<'_>,
    columns: &[ColumnPlan],
    template: &str,
) -> Result<Vec<SubjectPart>, MapError> {
    let mut parts = Vec::new();
    for part in split_template(template) {
        parts.push(match part {
            TemplatePart::Literal(s) => SubjectPart::Literal(s.to_owned()),
            TemplatePart::Placeholder("id") => SubjectPart::Id,
            TemplatePart::Placeholder(name) => match r.find("subject", name) {
                Some(i) if columns.get(i).is_some_and(|c| !c.emit) => {
                    return Err(MapError::ExcludedInSubject {
                        entity: r.entity.name.clone(),
                        column: name.to_owned(),
                    });
                }
                Some(i) => SubjectPart::Column(i),
                None => {
                    r.gone("subject", name, "it renders as empty text in subjects");
                    SubjectPart::Literal(String::new())
                }
            },
        });
    }
    Ok(parts)
}

pub(super) enum TemplatePart<'a> {
    Literal(&'a str),
    Placeholder(&'a str),
}

/// Splits `Customer/{id}` into literal text and `{name}` placeholders; a `{` without a
/// closing `}` is literal text.
pub(super) fn split_template(template: &str) -> Vec<TemplatePart<'_>> {
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

/// The column names a subject template uses (everything but `{id}`).
pub(crate) fn subject_columns(template: &str) -> Vec<&str> {
    split_template(template)
        .into_iter()
        .filter_map(|p| match p {
            TemplatePart::Placeholder(name) if name != "id" => Some(name),
            _ => None,
        })
        .collect()
}

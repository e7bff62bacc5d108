//! `[[entity]]`: tables captured as entities.

use std::collections::HashSet;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use super::child::{ChildTable, RawChild};
use super::derive::{DerivedAction, RawDerivedAction};
use super::{Str, StrList};
use crate::types::{Action, EntityName, TableName};

/// One `[[entity]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityConfig {
    /// Entity type in events.
    pub name: EntityName,
    /// The captured table. Written `schema.table`; a bare `table` means `public.table`.
    pub table: TableName,
    /// Id columns; `None` means the table's primary key.
    pub id: Option<Vec<String>>,
    /// Actions that produce events (default: all three).
    pub actions: Vec<Action>,
    /// When set, an update that changes none of these columns emits nothing.
    pub track: Option<Vec<String>>,
    /// Columns removed from every event before it is written.
    pub exclude: Vec<String>,
    /// Subject template such as `Customer/{id}`; `{id}` and `{column}` are replaced.
    pub subject: Option<String>,
    /// `[[entity.action]]`: domain actions derived from changes, in file order.
    pub derived: Vec<DerivedAction>,
    /// `where`: the publication's row filter for the table (PostgreSQL 15+); rows it
    /// excludes never leave the server.
    pub row_filter: Option<String>,
    /// `[[entity.child]]`: child tables whose changes are reported on the entity.
    pub children: Vec<ChildTable>,
    /// The actions `[[schedule]]`s send about the entity (listeners subscribe to them).
    pub scheduled_actions: Vec<String>,
    /// `snapshot_action`: the action of the events `walhook backfill` sends for existing
    /// rows (default `Snapshot`); listeners subscribe to it like to a derived action.
    pub snapshot_action: String,
}

/// The action of backfilled rows when `snapshot_action` is not set.
pub const DEFAULT_SNAPSHOT_ACTION: &str = "Snapshot";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEntity {
    name: Str,
    table: Str,
    id: StrList,
    actions: StrList,
    track: StrList,
    exclude: StrList,
    subject: Str,
    #[serde(default)]
    action: Vec<Spanned<RawDerivedAction>>,
    #[serde(rename = "where")]
    row_filter: Str,
    #[serde(default)]
    child: Vec<Spanned<RawChild>>,
    snapshot_action: Str,
}

/// Parses `schema.table` or `table` (schema `public`); either part may be double-quoted to
/// keep its case or special characters, like `"Sales"."Order"`.
pub fn parse_table_name(s: &str) -> Result<TableName, String> {
    let parts = split_identifiers(s)?;
    match parts.as_slice() {
        [name] => Ok(TableName {
            schema: "public".to_owned(),
            name: name.clone(),
        }),
        [schema, name] => Ok(TableName {
            schema: schema.clone(),
            name: name.clone(),
        }),
        _ => Err(format!(
            "table {s:?} has too many dots; write \"schema.table\" or \"table\", and double-quote a part that contains a dot"
        )),
    }
}

/// Splits a dotted SQL name into identifiers, resolving double quotes.
fn split_identifiers(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        part.push('"');
                        chars.next();
                    } else {
                        closed = true;
                        break;
                    }
                } else {
                    part.push(c);
                }
            }
            if !closed {
                return Err(format!(
                    "table {s:?} has an unterminated quoted identifier; close it with a double quote"
                ));
            }
            if part.is_empty() {
                return Err(format!(
                    "table {s:?} has an empty quoted identifier; write a name between the quotes"
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
            check_unquoted_identifier(s, &part)?;
        }
        if part.len() > 63 {
            return Err(format!(
                "table {s:?} has an identifier longer than 63 bytes; PostgreSQL truncates such names, use the name as stored in the catalog"
            ));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(_) => {
                return Err(format!(
                    "table {s:?} has text after a quoted identifier; write \"schema\".\"table\""
                ));
            }
        }
    }
}

/// PostgreSQL folds unquoted identifiers to lower case; rather than guess, mixed case is
/// refused with the two spellings that mean something definite.
fn check_unquoted_identifier(whole: &str, part: &str) -> Result<(), String> {
    let mut chars = part.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$'))
    {
        return Err(format!(
            "table {whole:?} is not a valid name; write \"schema.table\" or \"table\" with letters, digits and '_', and double-quote other names like '\"My Table\"'"
        ));
    }
    if part.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "table {whole:?} has upper-case letters in the unquoted name {part:?}, which PostgreSQL folds to {:?}; write it in lower case, or double-quote it ('\"{part}\"') if the table was created with that exact case",
            part.to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// The placeholders of a subject template (`{id}`, `{column}`), or why it is malformed.
pub fn subject_placeholders(template: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        match c {
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    match c {
                        '}' => {
                            closed = true;
                            break;
                        }
                        '{' => {
                            return Err(format!(
                                "subject {template:?} has '{{' inside a placeholder; close each placeholder with '}}', like \"Customer/{{id}}\""
                            ));
                        }
                        _ => name.push(c),
                    }
                }
                if !closed {
                    return Err(format!(
                        "subject {template:?} has an unclosed '{{'; close each placeholder with '}}', like \"Customer/{{id}}\""
                    ));
                }
                if name.trim().is_empty() {
                    return Err(format!(
                        "subject {template:?} has an empty placeholder {{}}; write {{id}} or {{column_name}}"
                    ));
                }
                names.push(name);
            }
            '}' => {
                return Err(format!(
                    "subject {template:?} has a '}}' without a matching '{{'; write placeholders as {{id}} or {{column_name}}"
                ));
            }
            _ => {}
        }
    }
    Ok(names)
}

impl Checker<'_> {
    /// A list of column names: each non-empty, none twice.
    pub(super) fn columns(
        &mut self,
        raw: &Spanned<Vec<Spanned<String>>>,
        key: &str,
    ) -> Vec<(String, usize)> {
        let mut columns: Vec<(String, usize)> = Vec::new();
        for (i, item) in raw.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            if s.is_empty() {
                self.report(
                    item.span().start,
                    &item_key,
                    "empty column name",
                    "write the column name as stored in the table",
                );
            } else if columns.iter().any(|(c, _)| *c == s) {
                self.report(
                    item.span().start,
                    &item_key,
                    &format!("column {s:?} is listed twice"),
                    "remove the duplicate",
                );
            } else {
                columns.push((s, item.span().start));
            }
        }
        columns
    }

    pub(super) fn entities(&mut self, raw: &[Spanned<RawEntity>]) -> Vec<EntityConfig> {
        if raw.is_empty() {
            self.report(
                self.text.len(),
                "entity",
                "no [[entity]] is configured, so nothing would be captured",
                "add an [[entity]] section with name = \"Customer\" and table = \"public.customer\"",
            );
        }
        let mut entities: Vec<EntityConfig> = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for (i, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let e = spanned.get_ref();
            let key = |k: &str| format!("entity[{i}].{k}");

            let name = match self.required(&e.name, &key("name"), at, "\"Customer\"") {
                Some(s) => match EntityName::new(&s) {
                    Ok(n) => {
                        if !names.insert(n.as_str().to_owned()) {
                            let span = e.name.as_ref().map_or(at, |v| v.span().start);
                            self.report(
                                span,
                                &key("name"),
                                &format!("entity {s:?} is defined twice"),
                                "give each [[entity]] its own name",
                            );
                        }
                        Some(n)
                    }
                    Err(problem) => {
                        let span = e.name.as_ref().map_or(at, |v| v.span().start);
                        self.report(
                            span,
                            &key("name"),
                            &problem,
                            "rename it, like \"Customer\" or \"SalesOrder\"",
                        );
                        None
                    }
                },
                None => None,
            };

            let table = match self.required(&e.table, &key("table"), at, "\"public.customer\"") {
                Some(s) => match parse_table_name(s.trim()) {
                    Ok(t) => {
                        let span = e.table.as_ref().map_or(at, |v| v.span().start);
                        if let Some(other) = entities.iter().find(|o| o.table == t) {
                            self.report(
                                span,
                                &key("table"),
                                &format!("table {t} already backs entity {}", other.name),
                                "capture a table as one entity only; use subject or listener filters to tell cases apart",
                            );
                        }
                        Some(t)
                    }
                    Err(message) => {
                        let span = e.table.as_ref().map_or(at, |v| v.span().start);
                        self.report_message(span, &key("table"), &message);
                        None
                    }
                },
                None => None,
            };

            let id = e.id.as_ref().map(|list| {
                if list.get_ref().is_empty() {
                    self.report(
                        list.span().start,
                        &key("id"),
                        "id lists no columns",
                        "list the id columns, or remove id to use the primary key",
                    );
                }
                self.columns(list, &key("id"))
            });
            let track = e.track.as_ref().map(|list| {
                if list.get_ref().is_empty() {
                    self.report(
                        list.span().start,
                        &key("track"),
                        "track lists no columns, so no update would ever emit an event",
                        "list the columns whose changes matter, or remove track to emit every update",
                    );
                }
                self.columns(list, &key("track"))
            });
            let exclude = e
                .exclude
                .as_ref()
                .map(|list| self.columns(list, &key("exclude")))
                .unwrap_or_default();
            for (column, col_at) in id.iter().flatten() {
                if exclude.iter().any(|(c, _)| c == column) {
                    self.report(
                        *col_at,
                        &key("id"),
                        &format!("id column {column:?} is also excluded"),
                        "remove it from exclude or from id; events need their id",
                    );
                }
            }
            let actions = self.actions(&e.actions, &key("actions"), &Action::ROW);

            let subject = match &e.subject {
                None => None,
                Some(v) => self.string(v, &key("subject")).inspect(|s| {
                    match subject_placeholders(s) {
                        Ok(placeholders) => {
                            for p in placeholders {
                                if exclude.iter().any(|(c, _)| *c == p) {
                                    self.report(
                                        v.span().start,
                                        &key("subject"),
                                        &format!("placeholder {{{p}}} names an excluded column"),
                                        "excluded columns must not leave the database; use {id} or another column",
                                    );
                                }
                            }
                        }
                        Err(message) => self.report_message(v.span().start, &key("subject"), &message),
                    }
                }),
            };

            let exclude_names: Vec<String> = exclude.iter().map(|(c, _)| c.clone()).collect();
            let row_filter = e.row_filter.as_ref().and_then(|v| {
                let s = self.string(v, &key("where"))?;
                match super::row_filter::expression_identifiers(&s) {
                    Ok(_) => Some(s.trim().to_owned()),
                    Err(message) => {
                        self.report_message(v.span().start, &key("where"), &message);
                        None
                    }
                }
            });
            let derived = self.derived_actions(&e.action, &format!("entity[{i}]"), &exclude_names);
            let snapshot_action =
                self.snapshot_action(&e.snapshot_action, &key("snapshot_action"), &derived);

            let children = self.children(
                &e.child,
                &format!("entity[{i}]"),
                table.as_ref(),
                id.as_ref().map(Vec::len),
            );

            if let (Some(name), Some(table)) = (name, table) {
                entities.push(EntityConfig {
                    name,
                    table,
                    id: id.map(|cols| cols.into_iter().map(|(c, _)| c).collect()),
                    actions,
                    track: track.map(|cols| cols.into_iter().map(|(c, _)| c).collect()),
                    exclude: exclude_names,
                    subject,
                    derived,
                    row_filter,
                    children,
                    scheduled_actions: Vec::new(),
                    snapshot_action,
                });
            }
        }
        entities
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{MINIMAL, errors};

    #[test]
    fn duplicate_entities_and_tables_are_reported() {
        let text =
            format!("{MINIMAL}\n[[entity]]\nname = \"Customer\"\ntable = \"public.customer\"\n");
        let lines = errors(&text);
        assert_eq!(
            lines,
            vec![
                "walhook.toml:9:8: entity[1].name: entity \"Customer\" is defined twice; give each [[entity]] its own name",
                "walhook.toml:10:9: entity[1].table: table public.customer already backs entity Customer; capture a table as one entity only; use subject or listener filters to tell cases apart",
            ]
        );
    }

    #[test]
    fn table_names_handle_schema_and_quoting() {
        let t = |s: &str| parse_table_name(s).map(|t| (t.schema, t.name));
        assert_eq!(t("customer"), Ok(("public".into(), "customer".into())));
        assert_eq!(t("crm.customer"), Ok(("crm".into(), "customer".into())));
        assert_eq!(
            t("\"Sales\".\"Order\""),
            Ok(("Sales".into(), "Order".into()))
        );
        assert_eq!(
            t("\"a.b\".\"say \"\"hi\"\"\""),
            Ok(("a.b".into(), "say \"hi\"".into()))
        );
        for bad in [
            "", "a.b.c", "Customer", "\"open", "\"\"", "a b", "a.", ".a", "\"x\"y",
        ] {
            assert!(parse_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subject_templates_need_balanced_braces() {
        assert_eq!(
            subject_placeholders("C/{id}/{city}"),
            Ok(vec!["id".into(), "city".into()])
        );
        assert_eq!(subject_placeholders("plain"), Ok(vec![]));
        for bad in ["C/{id", "C/id}", "C/{}", "C/{{id}}"] {
            assert!(subject_placeholders(bad).is_err(), "{bad}");
        }
    }
}

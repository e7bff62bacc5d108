//! `[[entity.child]]`: a child table whose row changes are reported on the parent entity
//! (tracking "attributes": `customer_attribute(customer_id, attr_name, value)`).

use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use super::entity::parse_table_name;
use super::{Str, StrList};
use crate::types::TableName;

/// One `[[entity.child]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildTable {
    /// The child table.
    pub table: TableName,
    /// The child's columns holding the parent entity's id, in the order of its id columns.
    pub parent: Vec<String>,
    /// The child's column whose value names the attribute in changedFields.
    pub field: String,
    /// Whether the changed attributes' rows (null when deleted) go in the payload, under
    /// the child table's name.
    pub include: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChild {
    table: Str,
    parent: StrList,
    field: Str,
    include: Option<Spanned<bool>>,
}

impl Checker<'_> {
    /// The child tables of entity `entity_key`, whose own table is `own`.
    pub(super) fn children(
        &mut self,
        raw: &[Spanned<RawChild>],
        entity_key: &str,
        own: Option<&TableName>,
        id_len: Option<usize>,
    ) -> Vec<ChildTable> {
        let mut out: Vec<ChildTable> = Vec::new();
        for (j, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let c = spanned.get_ref();
            let key = |k: &str| format!("{entity_key}.child[{j}].{k}");
            let table = self
                .required(&c.table, &key("table"), at, "\"public.customer_attribute\"")
                .and_then(|s| {
                    let table_at = c.table.as_ref().map_or(at, |v| v.span().start);
                    match parse_table_name(s.trim()) {
                        Ok(t) if Some(&t) == own => {
                            self.report(
                                table_at,
                                &key("table"),
                                &format!("{t} is the entity's own table"),
                                "name the table whose rows belong to the entity",
                            );
                            None
                        }
                        Ok(t) if out.iter().any(|o| o.table == t) => {
                            self.report(
                                table_at,
                                &key("table"),
                                &format!("{t} is already a child of this entity"),
                                "list each child table once",
                            );
                            None
                        }
                        Ok(t) => Some(t),
                        Err(message) => {
                            self.report_message(table_at, &key("table"), &message);
                            None
                        }
                    }
                });
            let parent = match &c.parent {
                None => {
                    self.report(
                        at,
                        &key("parent"),
                        "missing key",
                        "add parent = [\"customer_id\"]: the child's columns holding the parent's id",
                    );
                    None
                }
                Some(list) => {
                    let cols: Vec<String> = self
                        .columns(list, &key("parent"))
                        .into_iter()
                        .map(|(c, _)| c)
                        .collect();
                    if cols.is_empty() {
                        self.report(
                            list.span().start,
                            &key("parent"),
                            "parent lists no columns",
                            "list the child's columns holding the parent's id",
                        );
                        None
                    } else if id_len.is_some_and(|n| n != cols.len()) {
                        self.report(
                            list.span().start,
                            &key("parent"),
                            &format!(
                                "parent lists {} column(s), but the entity's id has {}",
                                cols.len(),
                                id_len.unwrap_or_default()
                            ),
                            "list one child column per id column, in the id's order",
                        );
                        None
                    } else {
                        Some(cols)
                    }
                }
            };
            let field = self.required(&c.field, &key("field"), at, "\"attr_name\"");
            let include = c.include.as_ref().is_some_and(|b| *b.get_ref());
            if let (Some(table), Some(parent), Some(field)) = (table, parent, field) {
                out.push(ChildTable {
                    table,
                    parent,
                    field: field.trim().to_owned(),
                    include,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{MINIMAL, errors, parse};

    #[test]
    fn child_tables_parse_and_problems_are_reported() {
        let text = format!(
            "{MINIMAL}id = [\"id\"]\n\n[[entity.child]]\ntable = \"customer_attribute\"\nparent = [\"customer_id\"]\nfield = \"attr_name\"\ninclude = true\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.entities[0].children,
            vec![ChildTable {
                table: TableName {
                    schema: "public".into(),
                    name: "customer_attribute".into()
                },
                parent: vec!["customer_id".into()],
                field: "attr_name".into(),
                include: true,
            }]
        );
        let bad = format!(
            "{MINIMAL}id = [\"id\"]\n\n[[entity.child]]\ntable = \"customer\"\nparent = [\"a\", \"b\"]\n"
        );
        assert_eq!(
            errors(&bad),
            vec![
                "walhook.toml:9:1: entity[0].child[0].field: missing key; add field = \"attr_name\"",
                "walhook.toml:10:9: entity[0].child[0].table: public.customer is the entity's own table; name the table whose rows belong to the entity",
                "walhook.toml:11:10: entity[0].child[0].parent: parent lists 2 column(s), but the entity's id has 1; list one child column per id column, in the id's order",
            ]
        );
    }
}

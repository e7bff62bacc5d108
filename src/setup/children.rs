//! Child tables (`[[entity.child]]`): they must exist, have the columns the configuration
//! names, and carry those columns in deletes (their replica identity), or a deleted child
//! row cannot be told to its parent.

use tokio_postgres::Client;

use super::{
    CheckItem, Facts, SetupError, SetupOptions, SetupStep, StepAction, TableFacts,
    replica_identity_full_sql, table_facts,
};
use crate::config::{ChildTable, Config, EntityConfig};

/// The catalog facts of every child table, in config order (entity by entity).
pub(super) async fn gather(
    client: &Client,
    config: &Config,
) -> Result<Vec<Option<TableFacts>>, SetupError> {
    let mut out = Vec::new();
    for child in config.entities.iter().flat_map(|e| e.children.iter()) {
        out.push(table_facts(client, &child.table).await?);
    }
    Ok(out)
}

/// Every child table with its entity and facts.
fn each<'a>(
    facts: &'a Facts,
    config: &'a Config,
) -> impl Iterator<Item = (&'a EntityConfig, &'a ChildTable, Option<&'a TableFacts>)> {
    config
        .entities
        .iter()
        .flat_map(|e| e.children.iter().map(move |c| (e, c)))
        .zip(facts.child_tables.iter())
        .map(|((e, c), tf)| (e, c, tf.as_ref()))
}

/// The child's columns the configuration names that the table lacks.
fn missing<'a>(child: &'a ChildTable, tf: &TableFacts) -> Vec<&'a str> {
    child
        .parent
        .iter()
        .chain(std::iter::once(&child.field))
        .filter(|c| !tf.columns.contains(c))
        .map(String::as_str)
        .collect()
}

/// The named columns a delete does not carry (with an identity other than FULL).
fn not_in_deletes<'a>(child: &'a ChildTable, tf: &TableFacts) -> Vec<&'a str> {
    let identity = tf.identity_columns().unwrap_or_default();
    child
        .parent
        .iter()
        .chain(std::iter::once(&child.field))
        .filter(|c| !identity.contains(c))
        .map(String::as_str)
        .collect()
}

/// One `walhook check` line per child table.
pub(super) fn items(items: &mut Vec<CheckItem>, facts: &Facts, config: &Config) {
    for (entity, child, tf) in each(facts, config) {
        let t = &child.table;
        let name = format!("child table {t}");
        let Some(tf) = tf else {
            items.push(CheckItem::fail(
                name,
                "does not exist",
                format!(
                    "create it, or correct table under the [[entity.child]] of the [[entity]] named {}",
                    entity.name
                ),
            ));
            continue;
        };
        let gone = missing(child, tf);
        if !gone.is_empty() {
            items.push(CheckItem::fail(
                name,
                format!(
                    "has no column(s) {} (it has {})",
                    gone.join(", "),
                    tf.columns.join(", ")
                ),
                format!(
                    "correct parent and field under the [[entity.child]] of the [[entity]] named {}",
                    entity.name
                ),
            ));
            continue;
        }
        let lacking = not_in_deletes(child, tf);
        items.push(if lacking.is_empty() {
            CheckItem::ok(
                name,
                format!(
                    "changes are reported as {}.Updated naming the {} changed",
                    entity.name, child.field
                ),
            )
        } else {
            CheckItem::warn(
                name,
                format!(
                    "REPLICA IDENTITY {}: deletes do not carry {}, so deleted rows cannot be reported on {}",
                    tf.replident_name(),
                    lacking.join(", "),
                    entity.name
                ),
                format!(
                    "{} or walhook setup --replica-identity-full",
                    replica_identity_full_sql(t)
                ),
            )
        });
    }
}

/// Refuses missing child tables before anything is changed; with
/// `--replica-identity-full`, plans REPLICA IDENTITY FULL where deletes would not carry
/// the parent id or the attribute.
pub(super) fn steps(
    steps: &mut Vec<SetupStep>,
    facts: &Facts,
    config: &Config,
    opts: SetupOptions,
) -> Result<(), SetupError> {
    for (entity, child, tf) in each(facts, config) {
        let Some(tf) = tf else {
            return Err(SetupError::TableMissing {
                entity: entity.name.to_string(),
                table: child.table.to_string(),
                path: config.path.display().to_string(),
            });
        };
        if !opts.replica_identity_full
            || tf.replident == "f"
            || !missing(child, tf).is_empty()
            || not_in_deletes(child, tf).is_empty()
        {
            continue;
        }
        let full = StepAction::Sql(replica_identity_full_sql(&child.table));
        if steps.iter().any(|s| s.action == full) {
            continue;
        }
        steps.push(SetupStep {
            why: format!(
                "Deletes from {} must carry the parent id and attribute so entity {} hears of them.",
                child.table, entity.name
            ),
            action: full,
            needs: format!("ownership of {} (owner {})", child.table, tf.owner),
        });
    }
    Ok(())
}

//! Row filters: an `[[entity]]`'s `where` as its table's row filter in the publication
//! (PostgreSQL 15+), so rows it excludes are never sent to walhook.
//!
//! PostgreSQL prints a row filter in its own words (`(status <> 'draft'::text)`), so the
//! configured text and the filter in force are compared by the plans the server makes of
//! `SELECT 1 FROM t WHERE (…)` with each: the same expression plans the same.
//!
//! A publication that publishes UPDATE or DELETE may filter only on columns of the replica
//! identity: PostgreSQL refuses the application's UPDATE and DELETE on the table otherwise.
//! That is checked before any filter is applied.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::{
    CheckItem, Facts, PubOp, SetupError, SetupOptions, SetupStep, StepAction, TableFacts,
    needed_ops, replica_identity_full_sql,
};
use crate::config::{Config, EntityConfig, expression_identifiers};
use crate::types::{TableName, quote_ident};

/// The first version with row filters in publications.
pub(super) const ROW_FILTER_VERSION_NUM: i32 = 150_000;

const SQL_ROW_FILTER: &str = "SELECT rowfilter FROM pg_publication_tables \
     WHERE pubname = $1 AND schemaname = $2 AND tablename = $3";

/// What is known about one entity's row filter.
#[derive(Debug, Default)]
pub(super) struct FilterFacts {
    /// The filter in force on the publication, as PostgreSQL prints it.
    in_force: Option<String>,
    /// Whether the configured filter is the one in force (`None`: cannot be told, e.g.
    /// no SELECT privilege to plan with).
    same: Option<bool>,
    /// The server's objection to the configured expression.
    invalid: Option<String>,
}

/// The row filter facts of every entity, in config order.
pub(super) async fn gather(
    client: &Client,
    config: &Config,
    version_num: i32,
) -> Result<Vec<FilterFacts>, SetupError> {
    let mut out = Vec::with_capacity(config.entities.len());
    for entity in &config.entities {
        out.push(entity_facts(client, config, entity, version_num).await?);
    }
    Ok(out)
}

async fn entity_facts(
    client: &Client,
    config: &Config,
    entity: &EntityConfig,
    version_num: i32,
) -> Result<FilterFacts, SetupError> {
    let mut facts = FilterFacts::default();
    if version_num < ROW_FILTER_VERSION_NUM {
        return Ok(facts);
    }
    let t = &entity.table;
    facts.in_force = client
        .query_opt(
            SQL_ROW_FILTER,
            &[&config.source.publication, &t.schema, &t.name],
        )
        .await
        .and_then(|row| row.map(|r| r.try_get::<_, Option<String>>(0)).transpose())
        .map_err(|source| SetupError::Query {
            what: format!(
                "reading the row filter of {t} in publication {}",
                config.source.publication
            ),
            source,
        })?
        .flatten();
    let Some(configured) = &entity.row_filter else {
        return Ok(facts);
    };
    let mine = match plan_text(client, t, configured).await {
        Ok(plan) => plan,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => return Ok(facts),
        Err(e) => {
            facts.invalid = Some(super::db_message(&e));
            return Ok(facts);
        }
    };
    facts.same = match &facts.in_force {
        None => Some(false),
        Some(theirs) => plan_text(client, t, theirs)
            .await
            .ok()
            .map(|plan| plan == mine),
    };
    Ok(facts)
}

/// The server's plan of `SELECT 1 FROM t WHERE (expr)`, as text: it parses, resolves and
/// normalises the expression the way the publication does.
async fn plan_text(
    client: &Client,
    table: &TableName,
    expr: &str,
) -> Result<String, tokio_postgres::Error> {
    let sql = format!(
        "EXPLAIN (COSTS OFF) SELECT 1 FROM {} WHERE ({expr})",
        table.quoted()
    );
    let rows = client.simple_query(&sql).await?;
    Ok(rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The publication entry of `t`: its quoted name, with the entity's row filter if any.
pub(super) fn table_entry(config: &Config, t: &TableName) -> String {
    match config
        .entities
        .iter()
        .find(|e| e.table == *t)
        .and_then(|e| e.row_filter.as_ref())
    {
        Some(expr) => format!("{} WHERE ({expr})", t.quoted()),
        None => t.quoted(),
    }
}

/// The table's columns the configured filter names that its replica identity lacks.
fn outside_identity<'a>(entity: &EntityConfig, tf: &'a TableFacts) -> Vec<&'a str> {
    let Some(expr) = &entity.row_filter else {
        return Vec::new();
    };
    let named = expression_identifiers(expr).unwrap_or_default();
    let identity = tf.identity_columns().unwrap_or_default();
    tf.columns
        .iter()
        .filter(|c| named.contains(c) && !identity.contains(c))
        .map(String::as_str)
        .collect()
}

/// Whether the publication publishes (or will, for the entities) updates or deletes: then
/// a row filter may only name replica identity columns.
fn publishes_old_rows(facts: &Facts, config: &Config) -> bool {
    let needed = needed_ops(config);
    facts
        .publication
        .as_ref()
        .is_some_and(|p| p.update || p.delete)
        || needed.contains(&PubOp::Update)
        || needed.contains(&PubOp::Delete)
}

/// One `walhook check` line per entity with a row filter, configured or in force.
pub(super) fn items(items: &mut Vec<CheckItem>, facts: &Facts, config: &Config) {
    let pubname = &config.source.publication;
    for (i, entity) in config.entities.iter().enumerate() {
        let (Some(Some(tf)), Some(ff)) = (facts.tables.get(i), facts.row_filters.get(i)) else {
            continue;
        };
        if entity.row_filter.is_none() && ff.in_force.is_none() {
            continue;
        }
        items.push(item(facts, config, pubname, entity, tf, ff));
    }
}

fn item(
    facts: &Facts,
    config: &Config,
    pubname: &str,
    entity: &EntityConfig,
    tf: &TableFacts,
    ff: &FilterFacts,
) -> CheckItem {
    let t = &entity.table;
    let name = format!("row filter {t}");
    let fix_where = format!("correct where under the [[entity]] named {}", entity.name);
    let Some(configured) = &entity.row_filter else {
        let in_force = ff.in_force.as_deref().unwrap_or_default();
        return CheckItem::warn(
            name,
            format!(
                "publication {pubname} sends only rows of {t} matching {in_force}, but the [[entity]] named {} has no where: changes to other rows are never captured",
                entity.name
            ),
            format!(
                "add where = \"…\" under that [[entity]], or run walhook setup to publish every row ({})",
                refilter_sql(config, pubname, t)
            ),
        );
    };
    if facts.server.version_num < ROW_FILTER_VERSION_NUM {
        return CheckItem::fail(
            name,
            format!(
                "PostgreSQL {} cannot filter the rows of a publication (15 or newer can)",
                facts.server.version
            ),
            format!(
                "remove where under the [[entity]] named {}, or upgrade to PostgreSQL 15+",
                entity.name
            ),
        );
    }
    if facts.publication.as_ref().is_some_and(|p| p.all_tables) {
        return CheckItem::fail(
            name,
            format!("publication {pubname} is FOR ALL TABLES, which cannot filter rows"),
            "name a publication that lists its tables in [source] publication (walhook setup creates it)",
        );
    }
    if let Some(problem) = &ff.invalid {
        return CheckItem::fail(
            name,
            format!("where {configured:?} is refused by the server: {problem}"),
            fix_where,
        );
    }
    let outside = outside_identity(entity, tf);
    if !outside.is_empty() && publishes_old_rows(facts, config) {
        return CheckItem::fail(
            name,
            format!(
                "where names column(s) {} outside the replica identity of {t} ({}): with the filter in the publication PostgreSQL refuses UPDATE and DELETE on {t}",
                outside.join(", "),
                tf.replident_name()
            ),
            format!(
                "{} or walhook setup --replica-identity-full, or filter on identity columns only",
                replica_identity_full_sql(t)
            ),
        );
    }
    let effect = "rows it excludes never leave the server; an update moving a row out of it arrives as Deleted, one moving a row into it as Created";
    match (&ff.in_force, ff.same) {
        (Some(in_force), Some(true)) => {
            CheckItem::ok(name, format!("WHERE {in_force} in force: {effect}"))
        }
        (_, _) if !facts.publication.as_ref().is_some_and(|p| p.includes(t)) => CheckItem::ok(
            name,
            format!("WHERE ({configured}): walhook setup publishes {t} with it; {effect}"),
        ),
        (Some(in_force), None) => CheckItem::warn(
            name,
            format!(
                "publication {pubname} filters {t} with {in_force}; whether that is where {configured:?} cannot be told without SELECT on {t}"
            ),
            format!("GRANT SELECT ON {} TO the walhook role", t.quoted()),
        ),
        (in_force, _) => CheckItem::warn(
            name,
            format!(
                "configured where {configured:?} is not in force: publication {pubname} sends {}",
                in_force
                    .as_ref()
                    .map_or_else(|| "every row".to_owned(), |f| format!("rows matching {f}"))
            ),
            format!("{} or walhook setup", refilter_sql(config, pubname, t)),
        ),
    }
}

/// Replaces the table's entry in the publication (PostgreSQL has no statement that changes
/// only a row filter); one transaction when run as one query.
fn refilter_sql(config: &Config, pubname: &str, t: &TableName) -> String {
    format!(
        "ALTER PUBLICATION {p} DROP TABLE {q}; ALTER PUBLICATION {p} ADD TABLE {e};",
        p = quote_ident(pubname),
        q = t.quoted(),
        e = table_entry(config, t)
    )
}

/// Refuses filters the server cannot apply or that would break the application's UPDATE
/// and DELETE; with `--replica-identity-full`, plans REPLICA IDENTITY FULL for tables whose
/// filter needs it. Runs before the publication steps.
pub(super) fn identity_steps(
    steps: &mut Vec<SetupStep>,
    facts: &Facts,
    config: &Config,
    opts: SetupOptions,
) -> Result<(), SetupError> {
    for (i, entity) in config.entities.iter().enumerate() {
        let (Some(configured), Some(Some(tf)), Some(ff)) = (
            entity.row_filter.as_ref(),
            facts.tables.get(i),
            facts.row_filters.get(i),
        ) else {
            continue;
        };
        let t = &entity.table;
        let refuse = |problem: String, fix: String| SetupError::RowFilter {
            table: t.to_string(),
            problem,
            fix,
        };
        if facts.server.version_num < ROW_FILTER_VERSION_NUM {
            return Err(refuse(
                format!(
                    "PostgreSQL {} cannot filter the rows of a publication",
                    facts.server.version
                ),
                format!(
                    "remove where under the [[entity]] named {}, or upgrade to PostgreSQL 15+",
                    entity.name
                ),
            ));
        }
        if facts.publication.as_ref().is_some_and(|p| p.all_tables) {
            return Err(refuse(
                format!(
                    "publication {} is FOR ALL TABLES, which cannot filter rows",
                    config.source.publication
                ),
                "name a publication that lists its tables in [source] publication".to_owned(),
            ));
        }
        if let Some(problem) = &ff.invalid {
            return Err(refuse(
                format!("where {configured:?} is refused by the server: {problem}"),
                format!("correct where under the [[entity]] named {}", entity.name),
            ));
        }
        let outside = outside_identity(entity, tf);
        if outside.is_empty() || !publishes_old_rows(facts, config) {
            continue;
        }
        let full = StepAction::Sql(replica_identity_full_sql(t));
        if steps.iter().any(|s| s.action == full) {
            continue;
        }
        if !opts.replica_identity_full {
            return Err(refuse(
                format!(
                    "where names column(s) {} outside the replica identity ({}); with such a filter PostgreSQL refuses UPDATE and DELETE on the table",
                    outside.join(", "),
                    tf.replident_name()
                ),
                format!(
                    "run walhook setup --replica-identity-full, {}, or filter on identity columns only",
                    replica_identity_full_sql(t)
                ),
            ));
        }
        steps.push(SetupStep {
            why: format!(
                "The row filter of {t} names column(s) {} outside its replica identity; PostgreSQL refuses UPDATE and DELETE on a table whose publication filter does that.",
                outside.join(", ")
            ),
            action: full,
            needs: format!("ownership of {t} (owner {})", tf.owner),
        });
    }
    Ok(())
}

/// Brings the row filters of tables already in the publication to the configured ones
/// (tables added or a publication created by setup carry theirs already).
pub(super) fn publication_steps(steps: &mut Vec<SetupStep>, facts: &Facts, config: &Config) {
    let Some(p) = &facts.publication else { return };
    if p.all_tables || facts.server.version_num < ROW_FILTER_VERSION_NUM {
        return;
    }
    let pubname = &config.source.publication;
    for (i, entity) in config.entities.iter().enumerate() {
        let Some(ff) = facts.row_filters.get(i) else {
            continue;
        };
        let t = &entity.table;
        let differs = match &entity.row_filter {
            None => ff.in_force.is_some(),
            Some(_) => ff.same == Some(false),
        };
        if !differs || !p.includes(t) {
            continue;
        }
        steps.push(SetupStep {
            why: match &entity.row_filter {
                Some(expr) => format!(
                    "Publication {pubname} must send only the rows of {t} matching where ({expr}) of the [[entity]] named {}.",
                    entity.name
                ),
                None => format!(
                    "Publication {pubname} filters the rows of {t}, but the [[entity]] named {} has no where.",
                    entity.name
                ),
            },
            action: StepAction::Sql(refilter_sql(config, pubname, t)),
            needs: format!("ownership of publication {pubname} and of {t}"),
        });
    }
}

//! What a backfill reads: the entity table's published columns (as the replication stream
//! would send them), the key it pages by, and the chunk query.

use tokio_postgres::GenericClient;

use super::BackfillError;
use crate::config::EntityConfig;
use crate::types::{TableName, quote_ident};

const TABLE: &str = "SELECT c.oid, greatest(c.reltuples, 0)::int8 FROM pg_class c
WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')";

/// Columns in table order, as a Relation message lists them (no dropped or generated
/// columns), with the type's name for casts and the place in the primary key.
const COLUMNS: &str = "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
       a.attnotnull, array_position(i.indkey::int2[], a.attnum)
FROM pg_attribute a
LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum";

/// The column sets of the table's unique indexes on plain columns (no expression, no
/// predicate).
const UNIQUE_INDEXES: &str = "SELECT array_agg(a.attname::text ORDER BY a.attname)
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid";

/// The publication's column list and row filter for the table (PostgreSQL 15 on).
const PUBLISHED_15: &str = "SELECT attnames::text[], rowfilter FROM pg_publication_tables
WHERE pubname = $1 AND schemaname = $2 AND tablename = $3";
const PUBLISHED_14: &str = "SELECT NULL::text[], NULL::text FROM pg_publication_tables
WHERE pubname = $1 AND schemaname = $2 AND tablename = $3";

/// One column the stream would send.
#[derive(Clone, Debug)]
pub(super) struct SourceColumn {
    pub(super) name: String,
    pub(super) type_oid: u32,
    /// `format_type`: the name to cast text to.
    pub(super) type_name: String,
    pub(super) not_null: bool,
    /// 1-based place in the primary key.
    pub(super) pk: Option<i32>,
}

/// The entity table as a backfill reads it.
#[derive(Clone, Debug)]
pub(super) struct TableShape {
    pub(super) table: TableName,
    /// The planner's row count estimate (for progress only).
    pub(super) estimate: i64,
    /// The columns chunks carry: published and not excluded.
    pub(super) columns: Vec<SourceColumn>,
    /// The unique, non-null columns chunks are paged by, in order.
    pub(super) key: Vec<SourceColumn>,
    /// The publication's row filter: rows it leaves out are not backfilled either.
    pub(super) row_filter: Option<String>,
}

impl TableShape {
    /// Reads the shape of `entity`'s table as published in `publication`.
    pub(super) async fn read(
        client: &impl GenericClient,
        entity: &EntityConfig,
        publication: &str,
        server_version: i32,
    ) -> Result<TableShape, BackfillError> {
        let table = entity.table.clone();
        let db = |e| BackfillError::db("reading the entity table's columns", e);
        let Some(row) = client
            .query_opt(TABLE, &[&table.quoted()])
            .await
            .map_err(db)?
        else {
            return Err(BackfillError::Usage(format!(
                "table {table} of entity {} does not exist (or is not a table); check table = under the [[entity]] named {}",
                entity.name, entity.name
            )));
        };
        let oid: u32 = row.try_get(0).map_err(db)?;
        let estimate: i64 = row.try_get(1).map_err(db)?;
        let mut all = Vec::new();
        for r in client.query(COLUMNS, &[&oid]).await.map_err(db)? {
            all.push(SourceColumn {
                name: r.try_get(0).map_err(db)?,
                type_oid: r.try_get(1).map_err(db)?,
                type_name: r.try_get(2).map_err(db)?,
                not_null: r.try_get(3).map_err(db)?,
                pk: r.try_get(4).map_err(db)?,
            });
        }
        let published_sql = if server_version >= 150_000 {
            PUBLISHED_15
        } else {
            PUBLISHED_14
        };
        let Some(published) = client
            .query_opt(published_sql, &[&publication, &table.schema, &table.name])
            .await
            .map_err(db)?
        else {
            return Err(BackfillError::Usage(format!(
                "table {table} is not in publication {publication}, so walhook does not capture it; run `walhook setup` (a partitioned table needs publish_via_partition_root)"
            )));
        };
        let attnames: Option<Vec<String>> = published.try_get(0).map_err(db)?;
        let row_filter: Option<String> = published.try_get(1).map_err(db)?;
        let mut unique: Vec<Vec<String>> = Vec::new();
        for r in client.query(UNIQUE_INDEXES, &[&oid]).await.map_err(db)? {
            unique.push(r.try_get(0).map_err(db)?);
        }
        let key = paging_key(entity, &all, &unique)?;
        let columns = all
            .into_iter()
            .filter(|c| {
                attnames
                    .as_ref()
                    .is_none_or(|names| names.contains(&c.name))
            })
            .filter(|c| !entity.exclude.contains(&c.name))
            .collect::<Vec<_>>();
        for id in entity.id.iter().flatten() {
            if !columns.iter().any(|c| c.name == *id) {
                return Err(BackfillError::Usage(format!(
                    "id column {id:?} of entity {} is not a published column of table {table}; fix id = [...] under the [[entity]] named {}",
                    entity.name, entity.name
                )));
            }
        }
        Ok(TableShape {
            table,
            estimate,
            columns,
            key,
            row_filter,
        })
    }

    /// The chunk query: key texts, then column texts, of the next `limit` rows after the
    /// key in the parameters (none for the first chunk), locked FOR SHARE so that no change
    /// to them commits between this read and the chunk's commit.
    pub(super) fn chunk_sql(&self, filter: Option<&str>, after_key: bool, limit: u32) -> String {
        let key_list = self.key_list();
        let mut select: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("format('%s', {})", quote_ident(&k.name)))
            .collect();
        // format('%s') prints a value with its type's output function, exactly as pgoutput
        // does (a cast to text differs for bool, char(n), inet, ...).
        select.extend(self.columns.iter().map(|c| {
            let q = quote_ident(&c.name);
            format!("CASE WHEN num_nulls({q}) = 1 THEN NULL ELSE format('%s', {q}) END")
        }));
        let mut conditions = Vec::new();
        if after_key {
            let params: Vec<String> = self
                .key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("${}::text::{}", i + 1, k.type_name))
                .collect();
            conditions.push(format!("({key_list}) > ({})", params.join(", ")));
        }
        if let Some(f) = &self.row_filter {
            conditions.push(format!("({f})"));
        }
        if let Some(w) = filter {
            // On lines of its own, so a trailing `--` comment cannot swallow what follows.
            conditions.push(format!("(\n{w}\n)"));
        }
        let condition = if conditions.is_empty() {
            "true".to_owned()
        } else {
            conditions.join("\n  AND ")
        };
        format!(
            "SELECT {}\nFROM {}\nWHERE {condition}\nORDER BY {key_list}\nLIMIT {limit}\nFOR SHARE",
            select.join(", "),
            self.table.quoted()
        )
    }

    /// The `--where` condition evaluated on up to `limit` rows, without locks: run in a
    /// READ ONLY transaction, it shows that the condition reads and does not write.
    pub(super) fn probe_sql(&self, filter: &str, limit: u32) -> String {
        let row_filter = self
            .row_filter
            .as_ref()
            .map(|f| format!("({f}) AND "))
            .unwrap_or_default();
        format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} WHERE {row_filter}(\n{filter}\n) LIMIT {limit}) AS probe",
            self.table.quoted()
        )
    }

    fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|k| quote_ident(&k.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key column names, in paging order.
    pub(super) fn key_names(&self) -> Vec<String> {
        self.key.iter().map(|k| k.name.clone()).collect()
    }
}

/// The columns chunks are paged by: the primary key; without one, the entity's `id` when a
/// unique index covers exactly those columns and none can be NULL.
fn paging_key(
    entity: &EntityConfig,
    all: &[SourceColumn],
    unique: &[Vec<String>],
) -> Result<Vec<SourceColumn>, BackfillError> {
    let mut pk: Vec<SourceColumn> = all.iter().filter(|c| c.pk.is_some()).cloned().collect();
    pk.sort_by_key(|c| c.pk);
    if !pk.is_empty() {
        return Ok(pk);
    }
    let no_key = || {
        BackfillError::Usage(format!(
            "table {} has no primary key, and entity {}'s id is not covered by a unique index on NOT NULL columns, so it cannot be read in key order without skipping rows; add a primary key, or set id = [...] to columns with such an index",
            entity.table, entity.name
        ))
    };
    let Some(id) = &entity.id else {
        return Err(no_key());
    };
    let mut sorted = id.clone();
    sorted.sort();
    let columns: Vec<SourceColumn> = id
        .iter()
        .filter_map(|name| all.iter().find(|c| c.name == *name).cloned())
        .collect();
    let usable =
        columns.len() == id.len() && columns.iter().all(|c| c.not_null) && unique.contains(&sorted);
    if usable { Ok(columns) } else { Err(no_key()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_name: &str, pk: Option<i32>) -> SourceColumn {
        SourceColumn {
            name: name.into(),
            type_oid: 23,
            type_name: type_name.into(),
            not_null: true,
            pk,
        }
    }

    fn shape() -> TableShape {
        TableShape {
            table: TableName {
                schema: "sales".into(),
                name: "Order Line".into(),
            },
            estimate: 0,
            columns: vec![
                column("order", "integer", Some(1)),
                column("line", "text", Some(2)),
                column("qty", "integer", None),
            ],
            key: vec![
                column("order", "integer", Some(1)),
                column("line", "text", Some(2)),
            ],
            row_filter: Some("qty > 0".into()),
        }
    }

    #[test]
    fn chunk_queries_page_by_the_composite_key_and_lock_what_they_read() {
        let sql = shape().chunk_sql(Some("qty < 9 -- note"), true, 500);
        assert!(
            sql.contains(r#"("order", "line") > ($1::text::integer, $2::text::text)"#),
            "{sql}"
        );
        assert!(sql.contains("AND (qty > 0)"), "{sql}");
        assert!(sql.contains("(\nqty < 9 -- note\n)"), "{sql}");
        assert!(
            sql.ends_with("ORDER BY \"order\", \"line\"\nLIMIT 500\nFOR SHARE"),
            "{sql}"
        );
        assert!(sql.contains(r#"FROM "sales"."Order Line""#), "{sql}");
        let first = shape().chunk_sql(None, false, 10);
        assert!(!first.contains("$1"), "{first}");
    }
}

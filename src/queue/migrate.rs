//! Schema migrations: the SQL files in `sql/`, applied in order, each once.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::{Needs, QueueError, Session, db_error};

/// One schema migration: a version and the SQL that brings the schema to it.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Version recorded in `walhook.schema_migration`; strictly increasing. Numbers may
    /// leave gaps (work in progress elsewhere reserves one): each migration applies once,
    /// in version order, whichever others were applied before it.
    pub version: i32,
    /// File name in `sql/`, for messages.
    pub name: &'static str,
    /// The SQL, run in the migration's transaction.
    pub sql: &'static str,
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init.sql",
        sql: include_str!("../../sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_delivery.sql",
        sql: include_str!("../../sql/0002_delivery.sql"),
    },
    Migration {
        version: 3,
        name: "0003_capture.sql",
        sql: include_str!("../../sql/0003_capture.sql"),
    },
    Migration {
        version: 4,
        name: "0004_console.sql",
        sql: include_str!("../../sql/0004_console.sql"),
    },
    Migration {
        version: 5,
        name: "0005_listener_validation.sql",
        sql: include_str!("../../sql/0005_listener_validation.sql"),
    },
    Migration {
        version: 6,
        name: "0006_derived_actions.sql",
        sql: include_str!("../../sql/0006_derived_actions.sql"),
    },
    Migration {
        version: 7,
        name: "0007_debounce.sql",
        sql: include_str!("../../sql/0007_debounce.sql"),
    },
    Migration {
        version: 8,
        name: "0008_schedule.sql",
        sql: include_str!("../../sql/0008_schedule.sql"),
    },
    Migration {
        version: 9,
        name: "0009_claim_cursor.sql",
        sql: include_str!("../../sql/0009_claim_cursor.sql"),
    },
    Migration {
        version: 10,
        name: "0010_backfill.sql",
        sql: include_str!("../../sql/0010_backfill.sql"),
    },
    Migration {
        version: 11,
        name: "0011_listener_cursor.sql",
        sql: include_str!("../../sql/0011_listener_cursor.sql"),
    },
    Migration {
        version: 12,
        name: "0012_cursor_hold.sql",
        sql: include_str!("../../sql/0012_cursor_hold.sql"),
    },
];

/// The schema version this binary expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Serialises concurrent `migrate` calls (two daemons starting at once); the value is
/// "walhook" in ASCII so a DBA can recognise it in `pg_locks`.
const MIGRATION_LOCK_KEY: i64 = 0x0077_616c_686f_6f6b;

const LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

/// Whether the bookkeeping table exists; checked before any DDL so that a role without
/// CREATE privilege can still start against a schema a DBA applied by hand.
const HAS_MIGRATION_TABLE: &str = "SELECT to_regclass('walhook.schema_migration') IS NOT NULL";

const APPLIED_VERSIONS: &str = "SELECT version FROM walhook.schema_migration ORDER BY version";

const BOOTSTRAP: &str = "CREATE SCHEMA IF NOT EXISTS walhook;
CREATE TABLE IF NOT EXISTS walhook.schema_migration (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);";

const RECORD_VERSION: &str =
    "INSERT INTO walhook.schema_migration (version, applied_at) VALUES ($1, now())";

/// Brings the `walhook` schema up to [`latest_version`], in one transaction under an
/// advisory lock. Running it again is a no-op; a schema newer than this binary is a
/// [`QueueError::SchemaTooNew`].
pub async fn migrate(client: &mut Client) -> Result<(), QueueError> {
    let session = Session::of(client).await?;
    let create = Some((Needs::Create, Some(&session)));
    let tx = client
        .transaction()
        .await
        .map_err(db_error("starting the migration", None))?;
    tx.execute(LOCK, &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(db_error("waiting for the migration lock", None))?;
    let has_table: bool = tx
        .query_one(HAS_MIGRATION_TABLE, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db_error("looking for walhook.schema_migration", None))?;
    if !has_table {
        // to_regclass may answer from a catalog cache that predates the migration another
        // process committed while we waited for the lock; the bootstrap is idempotent, and
        // the versions are read below in any case.
        tx.batch_execute(BOOTSTRAP)
            .await
            .map_err(db_error("creating schema walhook", create))?;
    }
    let applied: BTreeSet<i32> = tx
        .query(APPLIED_VERSIONS, &[])
        .await
        .and_then(|rows| rows.iter().map(|r| r.try_get(0)).collect())
        .map_err(db_error(
            "reading walhook.schema_migration",
            Some((Needs::Use, Some(&session))),
        ))?;
    let known = latest_version();
    if let Some(&found) = applied.last()
        && found > known
    {
        return Err(QueueError::SchemaTooNew { found, known });
    }
    let mut changed = false;
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tracing::info!(
            version = m.version,
            file = m.name,
            "applying walhook schema migration"
        );
        tx.batch_execute(m.sql)
            .await
            .map_err(db_error("applying a schema migration", create))?;
        tx.execute(RECORD_VERSION, &[&m.version])
            .await
            .map_err(db_error("recording a schema migration", create))?;
        changed = true;
    }
    tx.commit()
        .await
        .map_err(db_error("committing the schema migration", None))?;
    if !changed {
        tracing::debug!(version = known, "walhook schema is up to date");
    }
    Ok(())
}

/// The whole schema as one script a DBA can apply by hand (`walhook setup --print-sql`):
/// every migration followed by its bookkeeping row, in one transaction.
pub fn migration_script() -> String {
    let mut out = String::from("BEGIN;\n\n");
    for m in MIGRATIONS {
        out.push_str(&format!("-- {}\n", m.name));
        out.push_str(m.sql.trim_end());
        out.push_str(&format!(
            "\n\nINSERT INTO walhook.schema_migration (version) VALUES ({}) ON CONFLICT DO NOTHING;\n\n",
            m.version
        ));
    }
    out.push_str("COMMIT;\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_versions_strictly_increase_from_one() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(versions.first(), Some(&1));
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(latest_version(), *versions.last().unwrap());
    }

    #[test]
    fn migration_file_names_carry_their_version() {
        for m in MIGRATIONS {
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn migration_script_records_every_version() {
        let script = migration_script();
        for m in MIGRATIONS {
            assert!(script.contains(&format!("VALUES ({}) ON CONFLICT", m.version)));
        }
        assert!(script.starts_with("BEGIN;") && script.trim_end().ends_with("COMMIT;"));
    }
}

//! `walhook check` and `walhook setup`: database prerequisites, and the SQL that meets them.
//!
//! Everything here uses an ordinary tokio-postgres connection; the replication connection is
//! not needed to read the catalog or to create a slot (`pg_create_logical_replication_slot`).
//! [`check`] reads the catalog once into `Facts` and turns them into one line per
//! prerequisite; [`plan`] turns the same facts into the statements that are missing, so
//! running setup a second time finds nothing to do.

mod children;
mod row_filter;
mod synchronous;

use std::collections::BTreeSet;
use std::fmt;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::config::{Config, EntityConfig};
use crate::error::{Classify, ErrorClass};
use crate::types::{Action, TableName, quote_ident, quote_literal};

/// The schema holding the queue tables.
pub const QUEUE_SCHEMA: &str = "walhook";

// Server-wide settings and the role, in one round trip.
const SQL_SERVER: &str = "SELECT current_setting('server_version_num')::int4, \
     current_setting('server_version'), \
     current_setting('wal_level'), \
     current_setting('max_replication_slots')::int4, \
     current_setting('max_wal_senders')::int4, \
     (SELECT count(*) FROM pg_replication_slots), \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'), \
     current_database()::text, \
     current_user::text, \
     r.rolreplication, \
     r.rolsuper, \
     has_database_privilege(current_database(), 'CREATE') \
     FROM pg_roles r WHERE r.rolname = current_user";

const SQL_SCHEMA: &str = "SELECT pg_has_role(n.nspowner, 'USAGE'), \
     has_schema_privilege(n.oid, 'USAGE'), \
     has_schema_privilege(n.oid, 'CREATE'), \
     pg_get_userbyid(n.nspowner)::text \
     FROM pg_namespace n WHERE n.nspname = $1";

const SQL_TABLE: &str = "SELECT c.oid, c.relkind::text, c.relreplident::text, \
     has_table_privilege(c.oid, 'SELECT'), \
     pg_get_userbyid(c.relowner)::text \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2";

const SQL_COLUMNS: &str = "SELECT attname::text FROM pg_attribute \
     WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum";

// Columns of the primary key and of the REPLICA IDENTITY USING INDEX index.
const SQL_KEYS: &str = "SELECT a.attname::text, i.indisprimary, i.indisreplident \
     FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
     WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) ORDER BY a.attnum";

// pubtruncate appeared in PostgreSQL 11: read it through to_jsonb so one query fits all versions.
// pubviaroot appeared in PostgreSQL 13: read through to_jsonb as well.
const SQL_PUBLICATION: &str = "SELECT p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, \
     coalesce((to_jsonb(p) ->> 'pubtruncate')::bool, false), \
     coalesce((to_jsonb(p) ->> 'pubviaroot')::bool, false) \
     FROM pg_publication p WHERE p.pubname = $1";

// pg_publication_tables lists the leaves of a partitioned table added to the publication
// unless it publishes via the root, so the tables added by name are read as well.
const SQL_PUBLICATION_TABLES: &str = "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 \
     UNION SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr \
     JOIN pg_publication p ON p.oid = pr.prpubid JOIN pg_class c ON c.oid = pr.prrelid \
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1";

// Partitions attached now; later ones are covered the same way.
const SQL_PARTITIONS: &str = "SELECT count(*) FROM pg_inherits WHERE inhparent = $1";

// wal_status appeared in PostgreSQL 13: read it through to_jsonb for the same reason.
// On a standby pg_current_wal_lsn() raises an error, so use the replay position there.
const SQL_SLOT: &str = "SELECT s.plugin::text, s.slot_type, s.database::text, s.active, \
     s.active_pid, \
     pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                          ELSE pg_current_wal_lsn() END, s.restart_lsn)::int8, \
     to_jsonb(s) ->> 'wal_status', \
     s.confirmed_flush_lsn::text \
     FROM pg_replication_slots s WHERE s.slot_name = $1";

const SQL_CREATE_SLOT: &str = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";
/// From PostgreSQL 17: the slot is synchronized to standbys, so it survives a promotion.
const SQL_CREATE_FAILOVER_SLOT: &str =
    "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)";
// pg_control_system() may be withheld from the role: then the identifier is unknown.
const SQL_SYSTEM_ID: &str = "SELECT CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') \
     THEN (SELECT system_identifier::text FROM pg_control_system()) END";
const SQL_CURRENT_DATABASE: &str = "SELECT current_database()::text";
const SQL_DROP_SLOT: &str = "SELECT pg_drop_replication_slot($1)";
const SQL_MIGRATION_TABLE_EXISTS: &str =
    "SELECT to_regclass('walhook.schema_migration') IS NOT NULL";
const SQL_QUEUE_VERSION: &str =
    "SELECT array_agg(version ORDER BY version) FROM walhook.schema_migration";

// ---------------------------------------------------------------------------------------------
// Report

/// The outcome of one prerequisite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Met.
    Ok,
    /// walhook works, with a limitation the operator should know about.
    Warn,
    /// walhook cannot run (or would break something) until this is fixed.
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of `walhook check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckItem {
    /// What was checked, e.g. `wal_level` or `replica identity public.customer`.
    pub name: String,
    /// The outcome.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// How to fix it, when there is something to fix.
    pub fix: Option<String>,
}

impl CheckItem {
    fn new(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Self {
        CheckItem {
            name: name.into(),
            verdict,
            detail: detail.into(),
            fix: None,
        }
    }

    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Ok, detail)
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Warn, detail).with_fix(fix)
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Fail, detail).with_fix(fix)
    }

    fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// The result of `walhook check`: one item per prerequisite, in a stable order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The items, in the order they were checked.
    pub items: Vec<CheckItem>,
}

impl Report {
    /// True when nothing failed (warnings allowed).
    pub fn ok(&self) -> bool {
        !self.items.iter().any(|i| i.verdict == Verdict::Fail)
    }

    /// The items with the given verdict.
    pub fn with_verdict(&self, verdict: Verdict) -> impl Iterator<Item = &CheckItem> {
        self.items.iter().filter(move |i| i.verdict == verdict)
    }

    /// The first item with this name, if any.
    pub fn item(&self, name: &str) -> Option<&CheckItem> {
        self.items.iter().find(|i| i.name == name)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .items
            .iter()
            .map(|i| i.name.chars().count() + 2)
            .max()
            .unwrap_or(0)
            .max(26);
        for item in &self.items {
            write!(
                f,
                "{:<6}{:<width$}{}",
                item.verdict.label(),
                item.name,
                item.detail
            )?;
            if let Some(fix) = &item.fix {
                write!(f, " — {fix}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Facts read from the catalog

#[derive(Debug)]
struct Server {
    version_num: i32,
    version: String,
    wal_level: String,
    max_slots: i32,
    slots_in_use: i64,
    max_senders: i32,
    senders_in_use: i64,
    database: String,
    role: String,
    replication: bool,
    superuser: bool,
    db_create: bool,
}

impl Server {
    /// Whether slots are created with `failover = true` here (PostgreSQL 17+).
    fn failover_slots(&self) -> bool {
        crate::replication::version::ServerVersion(u32::try_from(self.version_num).unwrap_or(0))
            .has_failover_slots()
    }

    fn grant_create_sql(&self) -> String {
        format!(
            "GRANT CREATE ON DATABASE {} TO {};",
            quote_ident(&self.database),
            quote_ident(&self.role)
        )
    }

    fn alter_role_replication_sql(&self) -> String {
        format!("ALTER ROLE {} REPLICATION;", quote_ident(&self.role))
    }

    fn own_queue_schema_sql(&self) -> String {
        format!(
            "ALTER SCHEMA {} OWNER TO {};",
            quote_ident(QUEUE_SCHEMA),
            quote_ident(&self.role)
        )
    }
}

#[derive(Debug)]
struct SchemaFacts {
    owned: bool,
    usage: bool,
    create: bool,
    owner: String,
}

#[derive(Debug)]
struct TableFacts {
    relkind: String,
    replident: String,
    select: bool,
    owner: String,
    columns: Vec<String>,
    primary_key: Vec<String>,
    identity_index: Vec<String>,
    /// Partitions attached now, for a partitioned table.
    partitions: i64,
}

impl TableFacts {
    fn is_table(&self) -> bool {
        matches!(self.relkind.as_str(), "r" | "p")
    }

    fn is_partitioned(&self) -> bool {
        self.relkind == "p"
    }

    /// The columns the old tuple carries for updates and deletes; `None` when there are none
    /// (PostgreSQL then rejects UPDATE/DELETE on the table once a publication publishes them).
    fn identity_columns(&self) -> Option<&[String]> {
        match self.replident.as_str() {
            "f" => Some(&self.columns),
            "d" if !self.primary_key.is_empty() => Some(&self.primary_key),
            "i" if !self.identity_index.is_empty() => Some(&self.identity_index),
            _ => None,
        }
    }

    fn replident_name(&self) -> &'static str {
        match self.replident.as_str() {
            "f" => "FULL",
            "d" => "DEFAULT",
            "i" => "USING INDEX",
            "n" => "NOTHING",
            _ => "unknown",
        }
    }
}

#[derive(Debug)]
struct PublicationFacts {
    all_tables: bool,
    insert: bool,
    update: bool,
    delete: bool,
    truncate: bool,
    /// `publish_via_partition_root`: partitions' changes arrive as their root table's.
    via_root: bool,
    tables: BTreeSet<(String, String)>,
}

impl PublicationFacts {
    fn includes(&self, t: &TableName) -> bool {
        self.all_tables || self.tables.contains(&(t.schema.clone(), t.name.clone()))
    }

    fn publishes(&self, op: PubOp) -> bool {
        match op {
            PubOp::Insert => self.insert,
            PubOp::Update => self.update,
            PubOp::Delete => self.delete,
            PubOp::Truncate => self.truncate,
        }
    }
}

#[derive(Debug)]
struct SlotFacts {
    plugin: Option<String>,
    slot_type: String,
    database: Option<String>,
    active: bool,
    active_pid: Option<i32>,
    retained_bytes: Option<i64>,
    wal_status: Option<String>,
    confirmed_flush: Option<crate::types::Lsn>,
}

/// How far the queue schema is migrated.
#[derive(Debug, Clone, PartialEq, Eq)]
enum QueueSchema {
    /// No queue tables yet.
    Missing,
    /// Migrated to the version this binary expects.
    Current(String),
    /// Tables exist, but older than this binary expects.
    Behind(String),
    /// Migrated by a newer walhook than this binary.
    TooNew(String),
    /// The state could not be read (privileges, …).
    Unknown(String),
}

#[derive(Debug)]
struct Facts {
    server: Server,
    schema: Option<SchemaFacts>,
    /// One per `config.entities`, same order; `None` when the table does not exist.
    tables: Vec<Option<TableFacts>>,
    publication: Option<PublicationFacts>,
    slot: Option<SlotFacts>,
    queue: QueueSchema,
    /// `walhook.state`, when it can be read.
    state: Option<crate::queue::QueueState>,
    /// The cluster's system identifier, when the role may read it.
    system_id: Option<String>,
    /// A gap of this slot was accepted and waits for the slot to exist again.
    gap_accepted: bool,
    /// One per `config.entities`: their row filters (`where`).
    row_filters: Vec<row_filter::FilterFacts>,
    /// One per `[[entity.child]]`, entity by entity; `None` when the table does not exist.
    child_tables: Vec<Option<TableFacts>>,
    /// Synchronous replication settings.
    synchronous: synchronous::SyncFacts,
}

impl Facts {
    /// The flushed position `walhook.state` records for this database and `slot`: the
    /// slot was in use, so losing it loses changes. `None` before the first capture, and
    /// on a copy of the database made on another cluster (the cloned-database guard
    /// speaks for those).
    fn captured_up_to(&self, slot: &str) -> Option<crate::types::Lsn> {
        let state = self.state.as_ref()?;
        let same_system = match (&state.system_identifier, &self.system_id) {
            (Some(recorded), Some(current)) => recorded == current,
            _ => true,
        };
        let ours = state.database_name.as_deref() == Some(self.server.database.as_str())
            && state.slot_name.as_deref() == Some(slot);
        if same_system && ours {
            state.flushed_lsn
        } else {
            None
        }
    }

    /// The gap capture would silently skip if the slot were simply created: the slot is
    /// missing or lost while `walhook.state` shows it was in use.
    fn gap(&self, slot: &str) -> Option<Gap> {
        let lost = self
            .slot
            .as_ref()
            .is_some_and(|sl| sl.wal_status.as_deref() == Some("lost"));
        // Accepted: the next start creates the slot (a lost one must still be dropped).
        if self.gap_accepted && !lost {
            return None;
        }
        let history = self.captured_up_to(slot);
        let (reason, last_flushed) = match &self.slot {
            None => (GapReason::Missing, history?),
            Some(sl) if sl.wal_status.as_deref() == Some("lost") => {
                (GapReason::Lost, history.or(sl.confirmed_flush)?)
            }
            Some(_) => return None,
        };
        Some(Gap {
            slot: slot.to_owned(),
            reason,
            last_flushed,
            failover: self.server.failover_slots(),
        })
    }
}

/// Why changes between the last flushed position and now are gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The slot does not exist (dropped, or lost in a failover).
    Missing,
    /// The slot exists but was invalidated (`wal_status = 'lost'`).
    Lost,
}

impl GapReason {
    /// In plain words, as stored in `walhook.capture_gap.reason`.
    pub fn describe(self) -> &'static str {
        match self {
            GapReason::Missing => {
                "the replication slot was missing (dropped, or lost in a failover)"
            }
            GapReason::Lost => {
                "the replication slot was invalidated (wal_status lost: the WAL it needed was removed, see max_slot_wal_keep_size)"
            }
        }
    }
}

/// A gap in capture: slot `slot` is gone, changes after `last_flushed` were never read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// The slot.
    pub slot: String,
    /// Why.
    pub reason: GapReason,
    /// The end of the last source commit walhook captured.
    pub last_flushed: crate::types::Lsn,
    /// Create the new slot with `failover = true` (PostgreSQL 17+).
    pub failover: bool,
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.reason {
            GapReason::Missing => "is missing",
            GapReason::Lost => "was invalidated (wal_status lost)",
        };
        write!(
            f,
            "replication slot {} {what}, but walhook.state shows changes were captured from it up to {}: the changes committed after {} are lost and walhook will not skip them silently",
            self.slot, self.last_flushed, self.last_flushed
        )
    }
}

/// A publication operation an entity needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PubOp {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl PubOp {
    fn keyword(self) -> &'static str {
        match self {
            PubOp::Insert => "insert",
            PubOp::Update => "update",
            PubOp::Delete => "delete",
            PubOp::Truncate => "truncate",
        }
    }

    fn for_action(a: Action) -> PubOp {
        match a {
            Action::Created => PubOp::Insert,
            Action::Updated => PubOp::Update,
            Action::Deleted => PubOp::Delete,
            Action::Truncated => PubOp::Truncate,
        }
    }
}

/// The operations the publication must publish for the configured entities.
fn needed_ops(config: &Config) -> BTreeSet<PubOp> {
    let mut ops: BTreeSet<PubOp> = config
        .entities
        .iter()
        .flat_map(|e| e.actions.iter().copied().map(PubOp::for_action))
        .collect();
    // Every change of a child row is reported on its parent.
    if config.entities.iter().any(|e| !e.children.is_empty()) {
        ops.extend([PubOp::Insert, PubOp::Update, PubOp::Delete]);
    }
    ops
}

async fn gather(client: &Client, config: &Config) -> Result<Facts, SetupError> {
    let q = |what: &str| {
        let what = what.to_owned();
        move |source| SetupError::Query { what, source }
    };
    let row = client
        .query_one(SQL_SERVER, &[])
        .await
        .map_err(q("reading server settings"))?;
    let server = Server {
        version_num: row.try_get(0).map_err(q("reading server settings"))?,
        version: row.try_get(1).map_err(q("reading server settings"))?,
        wal_level: row.try_get(2).map_err(q("reading server settings"))?,
        max_slots: row.try_get(3).map_err(q("reading server settings"))?,
        max_senders: row.try_get(4).map_err(q("reading server settings"))?,
        slots_in_use: row.try_get(5).map_err(q("reading server settings"))?,
        senders_in_use: row.try_get(6).map_err(q("reading server settings"))?,
        database: row.try_get(7).map_err(q("reading server settings"))?,
        role: row.try_get(8).map_err(q("reading server settings"))?,
        replication: row.try_get(9).map_err(q("reading server settings"))?,
        superuser: row.try_get(10).map_err(q("reading server settings"))?,
        db_create: row.try_get(11).map_err(q("reading server settings"))?,
    };

    let schema = match client
        .query_opt(SQL_SCHEMA, &[&QUEUE_SCHEMA])
        .await
        .map_err(q("reading schema walhook"))?
    {
        Some(r) => Some(SchemaFacts {
            owned: r.try_get(0).map_err(q("reading schema walhook"))?,
            usage: r.try_get(1).map_err(q("reading schema walhook"))?,
            create: r.try_get(2).map_err(q("reading schema walhook"))?,
            owner: r.try_get(3).map_err(q("reading schema walhook"))?,
        }),
        None => None,
    };

    let mut tables = Vec::with_capacity(config.entities.len());
    for entity in &config.entities {
        tables.push(table_facts(client, &entity.table).await?);
    }

    let publication = publication_facts(client, &config.source.publication).await?;
    let row_filters = row_filter::gather(client, config, server.version_num).await?;
    let child_tables = children::gather(client, config).await?;
    let synchronous = synchronous::gather(client).await?;

    let slot = match client
        .query_opt(SQL_SLOT, &[&config.source.slot])
        .await
        .map_err(q("reading pg_replication_slots"))?
    {
        Some(r) => Some(SlotFacts {
            plugin: r.try_get(0).map_err(q("reading pg_replication_slots"))?,
            slot_type: r.try_get(1).map_err(q("reading pg_replication_slots"))?,
            database: r.try_get(2).map_err(q("reading pg_replication_slots"))?,
            active: r.try_get(3).map_err(q("reading pg_replication_slots"))?,
            active_pid: r.try_get(4).map_err(q("reading pg_replication_slots"))?,
            retained_bytes: r.try_get(5).map_err(q("reading pg_replication_slots"))?,
            wal_status: r.try_get(6).map_err(q("reading pg_replication_slots"))?,
            confirmed_flush: r
                .try_get::<_, Option<String>>(7)
                .map_err(q("reading pg_replication_slots"))?
                .and_then(|t| t.parse().ok()),
        }),
        None => None,
    };

    let queue = queue_state(client, schema.is_some()).await;
    let state = match queue {
        QueueSchema::Missing | QueueSchema::Unknown(_) => None,
        _ => crate::queue::read_state(client).await.ok().flatten(),
    };
    let system_id = client
        .query_one(SQL_SYSTEM_ID, &[])
        .await
        .and_then(|r| r.try_get::<_, Option<String>>(0))
        .ok()
        .flatten();

    let gap_accepted = state.is_some()
        && crate::queue::open_gap_exists(client, &config.source.slot)
            .await
            .unwrap_or(false);

    Ok(Facts {
        server,
        schema,
        tables,
        publication,
        slot,
        queue,
        state,
        system_id,
        gap_accepted,
        row_filters,
        child_tables,
        synchronous,
    })
}

async fn table_facts(client: &Client, table: &TableName) -> Result<Option<TableFacts>, SetupError> {
    let what = format!("reading the catalog entry of {table}");
    let q = |source| SetupError::Query {
        what: what.clone(),
        source,
    };
    let Some(row) = client
        .query_opt(SQL_TABLE, &[&table.schema, &table.name])
        .await
        .map_err(q)?
    else {
        return Ok(None);
    };
    let oid: u32 = row.try_get(0).map_err(q)?;
    let columns = client
        .query(SQL_COLUMNS, &[&oid])
        .await
        .map_err(q)?
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(q)?;
    let mut primary_key = Vec::new();
    let mut identity_index = Vec::new();
    for r in client.query(SQL_KEYS, &[&oid]).await.map_err(q)? {
        let col: String = r.try_get(0).map_err(q)?;
        if r.try_get::<_, bool>(1).map_err(q)? {
            primary_key.push(col.clone());
        }
        if r.try_get::<_, bool>(2).map_err(q)? {
            identity_index.push(col);
        }
    }
    let relkind: String = row.try_get(1).map_err(q)?;
    let partitions: i64 = if relkind == "p" {
        client
            .query_one(SQL_PARTITIONS, &[&oid])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(q)?
    } else {
        0
    };
    Ok(Some(TableFacts {
        relkind,
        partitions,
        replident: row.try_get(2).map_err(q)?,
        select: row.try_get(3).map_err(q)?,
        owner: row.try_get(4).map_err(q)?,
        columns,
        primary_key,
        identity_index,
    }))
}

async fn publication_facts(
    client: &Client,
    name: &str,
) -> Result<Option<PublicationFacts>, SetupError> {
    let q = |source| SetupError::Query {
        what: format!("reading publication {name}"),
        source,
    };
    let Some(row) = client
        .query_opt(SQL_PUBLICATION, &[&name])
        .await
        .map_err(q)?
    else {
        return Ok(None);
    };
    let tables = client
        .query(SQL_PUBLICATION_TABLES, &[&name])
        .await
        .map_err(q)?
        .iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, String>(1)?)))
        .collect::<Result<BTreeSet<_>, tokio_postgres::Error>>()
        .map_err(q)?;
    Ok(Some(PublicationFacts {
        all_tables: row.try_get(0).map_err(q)?,
        insert: row.try_get(1).map_err(q)?,
        update: row.try_get(2).map_err(q)?,
        delete: row.try_get(3).map_err(q)?,
        truncate: row.try_get(4).map_err(q)?,
        via_root: row.try_get(5).map_err(q)?,
        tables,
    }))
}

// ---------------------------------------------------------------------------------------------
// Queue schema: the single place that talks to crate::queue, so wiring it is one edit.

async fn queue_state(client: &Client, schema_exists: bool) -> QueueSchema {
    if !schema_exists {
        return QueueSchema::Missing;
    }
    let version = async {
        let exists: bool = client
            .query_one(SQL_MIGRATION_TABLE_EXISTS, &[])
            .await?
            .try_get(0)?;
        if !exists {
            return Ok(None);
        }
        client
            .query_one(SQL_QUEUE_VERSION, &[])
            .await?
            .try_get::<_, Option<Vec<i32>>>(0)
    };
    let latest = crate::queue::latest_version();
    // Versions may be applied out of order: one missing below the highest is behind too.
    let missing = |applied: &[i32]| -> Vec<String> {
        crate::queue::MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| m.name.to_owned())
            .collect()
    };
    match version.await {
        Ok(None) => QueueSchema::Missing,
        Ok(Some(applied)) => match applied.iter().max().copied() {
            None => QueueSchema::Missing,
            Some(v) if v > latest => QueueSchema::TooNew(format!(
                "version {v}, newer than this walhook knows ({latest})"
            )),
            Some(v) => match missing(&applied) {
                m if m.is_empty() => QueueSchema::Current(format!("version {v}")),
                _ if v < latest => QueueSchema::Behind(format!("version {v} of {latest}")),
                m => QueueSchema::Behind(format!(
                    "version {v} of {latest}, without {}",
                    m.join(", ")
                )),
            },
        },
        Err(e) => QueueSchema::Unknown(db_message(&e)),
    }
}

async fn run_migrations(client: &mut Client) -> Result<(), SetupError> {
    crate::queue::migrate(client)
        .await
        .map_err(|e| SetupError::Migrate {
            class: e.class(),
            message: e.to_string(),
        })
}

fn migration_script() -> Option<String> {
    Some(crate::queue::migration_script())
}

// ---------------------------------------------------------------------------------------------
// check

/// Checks every database prerequisite for `config`; never fails, a query error becomes an item.
pub async fn check(client: &Client, config: &Config) -> Report {
    match gather(client, config).await {
        Ok(facts) => Report {
            items: judge(&facts, config),
        },
        Err(e) => Report {
            items: vec![CheckItem::fail(
                "database",
                e.to_string(),
                "check the connection string in [source] url and that the role may read the catalog",
            )],
        },
    }
}

fn judge(facts: &Facts, config: &Config) -> Vec<CheckItem> {
    let s = &facts.server;
    let mut items = Vec::new();

    items.push(version_item(s));

    items.push(if s.wal_level == "logical" {
        CheckItem::ok("wal_level", &s.wal_level)
    } else {
        CheckItem::fail(
            "wal_level",
            &s.wal_level,
            "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL",
        )
    });

    let slot_exists = facts.slot.is_some();
    let free_slots = i64::from(s.max_slots) - s.slots_in_use;
    let slots_detail = format!("{} ({} in use)", s.max_slots, s.slots_in_use);
    items.push(if slot_exists || free_slots > 0 {
        CheckItem::ok("max_replication_slots", slots_detail)
    } else {
        CheckItem::fail(
            "max_replication_slots",
            format!("{slots_detail}: no free slot for {}", config.source.slot),
            format!(
                "raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = {}) and restart PostgreSQL, or drop an unused slot",
                s.slots_in_use + 1
            ),
        )
    });

    let senders_detail = format!("{} ({} in use)", s.max_senders, s.senders_in_use);
    let slot_active = facts.slot.as_ref().is_some_and(|sl| sl.active);
    items.push(if s.max_senders <= 0 {
        CheckItem::fail(
            "max_wal_senders",
            senders_detail,
            "set max_wal_senders = 10 in postgresql.conf (ALTER SYSTEM SET max_wal_senders = 10) and restart PostgreSQL",
        )
    } else if i64::from(s.max_senders) <= s.senders_in_use && !slot_active {
        CheckItem::warn(
            "max_wal_senders",
            format!("{senders_detail}: all in use, walhook cannot connect now"),
            format!(
                "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = {}) and restart PostgreSQL",
                s.senders_in_use + 2
            ),
        )
    } else {
        CheckItem::ok("max_wal_senders", senders_detail)
    });

    items.push(if s.superuser {
        CheckItem::ok("role", format!("{} (superuser)", s.role))
    } else if s.replication {
        CheckItem::ok("role", format!("{} (REPLICATION)", s.role))
    } else {
        CheckItem::fail(
            "role",
            format!("{} has neither REPLICATION nor superuser", s.role),
            s.alter_role_replication_sql(),
        )
    });

    items.push(schema_item(facts));

    for (entity, table) in config.entities.iter().zip(&facts.tables) {
        table_items(&mut items, facts, config, entity, table.as_ref());
    }
    children::items(&mut items, facts, config);
    items.extend(
        config
            .listeners
            .iter()
            .filter_map(|l| template_item(facts, config, l)),
    );

    publication_items(&mut items, facts, config);
    row_filter::items(&mut items, facts, config);
    items.extend(synchronous::item(facts, config));
    items.push(slot_item(facts, config));
    items.push(queue_item(&facts.queue));
    items
}

fn version_item(s: &Server) -> CheckItem {
    use crate::replication::version::{MIN_SUPPORTED_MAJOR, ServerVersion, TESTED_MAJOR};
    let version = ServerVersion(u32::try_from(s.version_num).unwrap_or(0));
    if !version.is_supported() {
        CheckItem::fail(
            "server version",
            &s.version,
            format!(
                "walhook supports PostgreSQL {MIN_SUPPORTED_MAJOR} and newer (tested on {TESTED_MAJOR}); upgrade the server"
            ),
        )
    } else {
        CheckItem::ok("server version", &s.version)
    }
}

/// The TLS state of the connection `walhook check` made: protocol, what was verified,
/// for which host.
pub fn tls_item(
    params: &crate::replication::conn::ConnectParams,
    tls: Option<&crate::replication::conn::TlsInfo>,
) -> CheckItem {
    use crate::replication::conn::{Host, Verification};
    let mode = params.sslmode().as_str();
    match (tls, params.host()) {
        (_, Host::Unix(_)) => CheckItem::ok(
            "tls",
            format!("not used on the local socket {}", params.host_description()),
        ),
        (Some(t), _) if t.verification == Verification::Full => {
            CheckItem::ok("tls", format!("{t} (sslmode={mode})"))
        }
        (Some(t), _) => CheckItem::warn(
            "tls",
            format!("{t} (sslmode={mode})"),
            "set sslrootcert to the server's CA and sslmode=verify-full in [source] url, so walhook knows it talks to the right server",
        ),
        (None, _) => CheckItem::warn(
            "tls",
            format!(
                "off: {} is reached unencrypted (sslmode={mode})",
                params.host_description()
            ),
            "turn on ssl in the server's postgresql.conf and use sslmode=verify-full with sslrootcert in [source] url",
        ),
    }
}

fn schema_item(facts: &Facts) -> CheckItem {
    let s = &facts.server;
    let name = format!("schema {QUEUE_SCHEMA}");
    match &facts.schema {
        None if s.db_create => CheckItem::ok(
            name,
            format!(
                "missing; {} may create it in database {}",
                s.role, s.database
            ),
        ),
        None => CheckItem::fail(
            name,
            format!(
                "missing, and {} has no CREATE privilege on database {}",
                s.role, s.database
            ),
            s.grant_create_sql(),
        ),
        Some(sc) if sc.owned || (sc.usage && sc.create) => {
            CheckItem::ok(name, format!("exists (owner {})", sc.owner))
        }
        Some(sc) if sc.usage => CheckItem::warn(
            name,
            format!(
                "exists (owner {}); {} may use it but not create tables in it, so migrations must be run by its owner",
                sc.owner, s.role
            ),
            s.own_queue_schema_sql(),
        ),
        Some(sc) => CheckItem::fail(
            name,
            format!("exists (owner {}) but {} may not use it", sc.owner, s.role),
            s.own_queue_schema_sql(),
        ),
    }
}

fn replica_identity_full_sql(table: &TableName) -> String {
    format!("ALTER TABLE {} REPLICA IDENTITY FULL;", table.quoted())
}

fn table_items(
    items: &mut Vec<CheckItem>,
    facts: &Facts,
    config: &Config,
    entity: &EntityConfig,
    table: Option<&TableFacts>,
) {
    let t = &entity.table;
    let path = config.path.display();
    let Some(tf) = table else {
        items.push(CheckItem::fail(
            format!("table {t}"),
            format!("{t} does not exist (entity {})", entity.name),
            format!(
                "create the table, or correct `table = \"{t}\"` under the [[entity]] named {} in {path} (key [[entity]] table)",
                entity.name
            ),
        ));
        return;
    };
    if !tf.is_table() {
        items.push(CheckItem::fail(
            format!("table {t}"),
            format!(
                "{t} is not a table (relkind {}); only tables are published",
                tf.relkind
            ),
            format!(
                "point `table` under the [[entity]] named {} in {path} at a table (key [[entity]] table)",
                entity.name
            ),
        ));
        return;
    }
    items.push(CheckItem::ok(
        format!("table {t}"),
        format!("exists (entity {})", entity.name),
    ));

    items.push(if tf.select {
        CheckItem::ok(format!("select {t}"), "granted")
    } else {
        CheckItem::fail(
            format!("select {t}"),
            format!("{} may not SELECT from {t}", facts.server.role),
            format!(
                "GRANT SELECT ON {} TO {};",
                t.quoted(),
                quote_ident(&facts.server.role)
            ),
        )
    });

    let resuming = facts.captured_up_to(&config.source.slot).is_some();
    items.push(columns_item(tf, config, entity, resuming));
    items.push(replica_identity_item(facts, tf, entity));
    if tf.is_partitioned() {
        items.push(partition_item(facts, tf, config, t));
    }
}

/// A template listener's `{row.COLUMN}` / `{old.COLUMN}` placeholders that name no column
/// any of its entities sends (a typo renders null, or an empty string, in every event).
fn template_item(
    facts: &Facts,
    config: &Config,
    listener: &crate::config::ListenerConfig,
) -> Option<CheckItem> {
    use crate::config::{Field, ListenerFormat, Segment};
    let ListenerFormat::Template(t) = &listener.format else {
        return None;
    };
    let name = format!("template {}", listener.name);
    let mut sent: Vec<&str> = Vec::new();
    for (entity, table) in config.entities.iter().zip(&facts.tables) {
        let receives = listener
            .entities
            .as_ref()
            .is_none_or(|list| list.contains(&entity.name));
        let Some(tf) = table.as_ref().filter(|_| receives) else {
            continue;
        };
        sent.extend(
            tf.columns
                .iter()
                .filter(|c| !entity.exclude.contains(c))
                .map(String::as_str),
        );
    }
    let mut unknown: Vec<String> = t
        .event
        .segments
        .iter()
        .filter_map(|s| match s {
            Segment::Field {
                field: Field::RowColumn(c) | Field::OldColumn(c),
                ..
            } if !sent.contains(&c.as_str()) => Some(c.clone()),
            _ => None,
        })
        .collect();
    unknown.dedup();
    if unknown.is_empty() {
        return Some(CheckItem::ok(
            name,
            "every column placeholder names a column",
        ));
    }
    sent.sort_unstable();
    sent.dedup();
    Some(CheckItem::warn(
        name,
        format!(
            "column placeholder(s) for {} name no column the listener's entities send (excluded columns are never sent); they stay empty",
            unknown.join(", "),
        ),
        format!(
            "correct the template of listener {} in {}; the columns are: {}",
            listener.name,
            config.path.display(),
            sent.join(", ")
        ),
    ))
}

/// Configured columns the table lacks. Before the first capture that is a mistake in the
/// file (fail); once capture ran, it is a table that changed under it (warn: capture goes
/// on, setting aside what it cannot map).
fn columns_item(
    tf: &TableFacts,
    config: &Config,
    entity: &EntityConfig,
    resuming: bool,
) -> CheckItem {
    let t = &entity.table;
    let name = format!("columns {t}");
    let path = config.path.display();
    let missing = |cols: &[String]| -> Vec<String> {
        cols.iter()
            .filter(|c| !tf.columns.contains(c))
            .cloned()
            .collect()
    };
    let mut problems = Vec::new();
    let id_detail = match &entity.id {
        Some(id) => {
            let m = missing(id);
            if !m.is_empty() {
                problems.push((format!("id column(s) {} missing", m.join(", ")), "id"));
            }
            format!("id {}", id.join(", "))
        }
        None if tf.primary_key.is_empty() => {
            problems.push(("no primary key, and no `id` configured".to_owned(), "id"));
            "no id".to_owned()
        }
        None => format!("id = primary key ({})", tf.primary_key.join(", ")),
    };
    if let Some(track) = &entity.track {
        let m = missing(track);
        if !m.is_empty() {
            problems.push((format!("track column(s) {} missing", m.join(", ")), "track"));
        }
    }
    let m = missing(&entity.exclude);
    if !m.is_empty() {
        problems.push((
            format!("exclude column(s) {} missing", m.join(", ")),
            "exclude",
        ));
    }
    if let Some(subject) = &entity.subject {
        let names: Vec<String> = crate::capture::mapper::subject_columns(subject)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let m = missing(&names);
        if !m.is_empty() {
            problems.push((
                format!("subject column(s) {} missing", m.join(", ")),
                "subject",
            ));
        }
    }
    if problems.is_empty() {
        return CheckItem::ok(name, id_detail);
    }
    let detail = problems
        .iter()
        .map(|(p, _)| p.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let keys: BTreeSet<&str> = problems.iter().map(|(_, k)| *k).collect();
    let keys = keys
        .iter()
        .map(|k| format!("[[entity]] {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let fix = if entity.id.is_none() && tf.primary_key.is_empty() {
        format!(
            "add a primary key to {t} or set `id = [\"column\"]` under the [[entity]] named {} in {path} (key {keys})",
            entity.name
        )
    } else {
        format!(
            "correct the column names under the [[entity]] named {} in {path} (key {keys}); {t} has: {}",
            entity.name,
            tf.columns.join(", ")
        )
    };
    if resuming {
        let id_gone = problems.iter().any(|(_, k)| *k == "id");
        let consequence = if id_gone {
            format!(
                "capture goes on; changes of entity {} are set aside in walhook.rejected until it is fixed",
                entity.name
            )
        } else {
            "capture goes on without them".to_owned()
        };
        CheckItem::warn(name, format!("{detail}; {consequence}"), fix)
    } else {
        CheckItem::fail(name, detail, fix)
    }
}

fn replica_identity_item(facts: &Facts, tf: &TableFacts, entity: &EntityConfig) -> CheckItem {
    let t = &entity.table;
    let name = format!("replica identity {t}");
    let ident = tf.replident_name();
    let fix_full = format!(
        "{} or walhook setup --replica-identity-full",
        replica_identity_full_sql(t)
    );
    // With no identity PostgreSQL refuses UPDATE/DELETE on a table whose publication publishes
    // them, so this breaks the application, not only walhook.
    let published_ops = facts.publication.as_ref().filter(|p| p.includes(t));
    let breaks_app = published_ops.is_some_and(|p| p.update || p.delete);
    let Some(identity) = tf.identity_columns() else {
        let consequence = if breaks_app {
            "UPDATE and DELETE on this table fail while it is in the publication"
        } else {
            "updates and deletes are not published (and fail on this table once it is published)"
        };
        return CheckItem::fail(
            name,
            format!("{ident}: no old-row identity; {consequence}"),
            fix_full,
        );
    };
    if tf.replident == "f" {
        return CheckItem::ok(name, "FULL: changedFields computed exactly");
    }
    let updates = entity.actions.contains(&Action::Updated);
    let deletes = entity.actions.contains(&Action::Deleted);
    let mut notes = Vec::new();
    if updates {
        notes.push(if entity.track.is_some() {
            "changedFields and track need old values: updates will carry changedFields null, and updates touching only untracked columns will still be emitted".to_owned()
        } else {
            "changedFields and track need old values: updates will carry changedFields null"
                .to_owned()
        });
    }
    let needing_old: Vec<&str> = entity
        .derived
        .iter()
        .filter(|d| d.when.needs_old_row())
        .map(|d| d.name.as_str())
        .collect();
    if updates && !needing_old.is_empty() {
        notes.push(format!(
            "derived action(s) {} test what changed, which needs old values: they never match an update",
            needing_old.join(", ")
        ));
    }
    if deletes {
        let id_cols: &[String] = entity.id.as_deref().unwrap_or(&tf.primary_key);
        let lacking: Vec<&str> = id_cols
            .iter()
            .filter(|c| !identity.contains(c))
            .map(String::as_str)
            .collect();
        if !lacking.is_empty() {
            notes.push(format!(
                "deletes carry only {}, so deleted events lack id column(s) {}",
                identity.join(", "),
                lacking.join(", ")
            ));
        }
    }
    if notes.is_empty() {
        CheckItem::ok(
            name,
            format!("{ident} (old values limited to {})", identity.join(", ")),
        )
    } else {
        CheckItem::warn(name, format!("{ident}: {}", notes.join("; ")), fix_full)
    }
}

fn publication_items(items: &mut Vec<CheckItem>, facts: &Facts, config: &Config) {
    let pubname = &config.source.publication;
    let name = format!("publication {pubname}");
    let Some(p) = &facts.publication else {
        items.push(if config.source.create_publication {
            CheckItem::warn(
                name,
                "missing; will be created by walhook setup / at start",
                "walhook setup",
            )
        } else {
            CheckItem::fail(
                name,
                "missing, and [source] create_publication = false",
                format!(
                    "{} or set create_publication = true and run walhook setup",
                    create_publication_sql(
                        pubname,
                        &entity_tables(config),
                        &needed_ops(config),
                        needs_via_root(facts),
                        config,
                    )
                ),
            )
        });
        return;
    };
    let missing: Vec<&TableName> = entity_tables(config)
        .into_iter()
        .filter(|t| !p.includes(t))
        .collect();
    items.push(if p.all_tables {
        CheckItem::ok(name, "exists (FOR ALL TABLES)")
    } else if missing.is_empty() {
        CheckItem::ok(name, "exists, includes every entity table")
    } else {
        let list = missing
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        CheckItem::fail(
            name,
            format!("does not include {list}"),
            format!(
                "{} or walhook setup",
                add_tables_sql(pubname, &missing, config)
            ),
        )
    });
    let needed = needed_ops(config);
    let unpublished: Vec<&str> = needed
        .iter()
        .filter(|op| !p.publishes(**op))
        .map(|op| op.keyword())
        .collect();
    let published = publish_list(p);
    items.push(if unpublished.is_empty() {
        CheckItem::ok(format!("publication {pubname} publish"), published)
    } else {
        CheckItem::fail(
            format!("publication {pubname} publish"),
            format!("{published}: {} not published", unpublished.join(", ")),
            format!("{} or walhook setup", set_publish_sql(pubname, p, &needed)),
        )
    });
}

fn slot_item(facts: &Facts, config: &Config) -> CheckItem {
    let slot = &config.source.slot;
    let name = format!("slot {slot}");
    if let Some(gap) = facts.gap(slot) {
        return CheckItem::fail(name, gap.to_string(), accept_gap_fix(config));
    }
    let Some(sl) = &facts.slot else {
        return CheckItem::ok(name, "missing; will be created by walhook setup / at start");
    };
    let drop_fix = format!(
        "choose another `slot` in [source], or drop it: SELECT pg_drop_replication_slot({});",
        quote_literal(slot)
    );
    if sl.slot_type != "logical" {
        return CheckItem::fail(name, format!("is a {} slot", sl.slot_type), drop_fix);
    }
    if sl.plugin.as_deref() != Some("pgoutput") {
        return CheckItem::fail(
            name,
            format!(
                "uses plugin {}, walhook needs pgoutput",
                sl.plugin.as_deref().unwrap_or("(none)")
            ),
            drop_fix,
        );
    }
    if sl.database.as_deref() != Some(facts.server.database.as_str()) {
        return CheckItem::fail(
            name,
            format!(
                "belongs to database {}, not {}",
                sl.database.as_deref().unwrap_or("(none)"),
                facts.server.database
            ),
            drop_fix,
        );
    }
    let retained = sl
        .retained_bytes
        .map(|b| format!("retains {} of WAL", human_bytes(b)))
        .unwrap_or_else(|| "retains no WAL".into());
    if sl.wal_status.as_deref() == Some("lost") {
        return CheckItem::fail(
            name,
            "wal_status lost: the WAL it needs was removed; changes since were lost",
            format!(
                "{}; consider max_slot_wal_keep_size",
                accept_gap_fix(config)
            ),
        );
    }
    let status = sl
        .wal_status
        .as_deref()
        .map(|w| format!(", wal_status {w}"))
        .unwrap_or_default();
    if sl.active {
        let pid = sl
            .active_pid
            .map(|p| format!("pid {p}"))
            .unwrap_or_else(|| "unknown pid".into());
        CheckItem::warn(
            name,
            format!("pgoutput, active ({pid}), {retained}{status}"),
            "another process (walhook already running?) is streaming from this slot; stop it, or use another `slot` in [source]",
        )
    } else {
        CheckItem::ok(name, format!("pgoutput, inactive, {retained}{status}"))
    }
}

fn accept_gap_fix(config: &Config) -> String {
    format!(
        "once the loss is accepted (resync listeners from the tables if needed), record it and start again: walhook setup --accept-gap --config {}",
        config.path.display()
    )
}

fn queue_item(state: &QueueSchema) -> CheckItem {
    let name = "queue schema";
    match state {
        QueueSchema::Current(v) => CheckItem::ok(name, v.clone()),
        QueueSchema::Missing => CheckItem::warn(name, "not migrated yet", "run walhook setup"),
        QueueSchema::Behind(v) => CheckItem::warn(
            name,
            format!("{v}; older than this walhook expects"),
            "run walhook setup",
        ),
        QueueSchema::TooNew(v) => CheckItem::fail(
            name,
            v.clone(),
            "upgrade walhook, or point [source] url at the right database",
        ),
        QueueSchema::Unknown(e) => CheckItem::fail(
            name,
            format!("cannot read the queue state: {e}"),
            format!(
                "run walhook as the owner of schema {QUEUE_SCHEMA}, or GRANT USAGE ON SCHEMA {} and the queue tables to the role",
                quote_ident(QUEUE_SCHEMA)
            ),
        ),
    }
}

fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match UNITS.get(unit) {
        Some(&"bytes") | None => format!("{b} bytes"),
        Some(u) => format!("{v:.1} {u}"),
    }
}

// ---------------------------------------------------------------------------------------------
// SQL text shared by check fixes and setup steps

/// The tables the publication must include: entity tables, then child tables.
fn entity_tables(config: &Config) -> Vec<&TableName> {
    let mut seen = Vec::new();
    let children = config
        .entities
        .iter()
        .flat_map(|e| e.children.iter().map(|c| &c.table));
    for t in config.entities.iter().map(|e| &e.table).chain(children) {
        if !seen.contains(&t) {
            seen.push(t);
        }
    }
    seen
}

/// The tables as a publication lists them, each with its entity's row filter.
fn table_list(tables: &[&TableName], config: &Config) -> String {
    tables
        .iter()
        .map(|t| row_filter::table_entry(config, t))
        .collect::<Vec<_>>()
        .join(", ")
}

fn publish_value(ops: impl IntoIterator<Item = &'static str>) -> String {
    ops.into_iter().collect::<Vec<_>>().join(", ")
}

fn publish_list(p: &PublicationFacts) -> String {
    let mut ops = Vec::new();
    for (on, kw) in [
        (p.insert, "insert"),
        (p.update, "update"),
        (p.delete, "delete"),
        (p.truncate, "truncate"),
    ] {
        if on {
            ops.push(kw);
        }
    }
    if ops.is_empty() {
        "publishes nothing".into()
    } else {
        format!("publishes {}", ops.join(", "))
    }
}

fn create_publication_sql(
    name: &str,
    tables: &[&TableName],
    ops: &BTreeSet<PubOp>,
    via_root: bool,
    config: &Config,
) -> String {
    let ops = publish_value(ops.iter().map(|o| o.keyword()));
    let via_root = if via_root {
        ", publish_via_partition_root = true"
    } else {
        ""
    };
    format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {}{via_root});",
        quote_ident(name),
        table_list(tables, config),
        quote_literal(&ops)
    )
}

fn via_root_sql(name: &str) -> String {
    format!(
        "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
        quote_ident(name)
    )
}

/// Whether an entity table is partitioned: its publication must publish via the root, so
/// the changes of every partition, attached now or later, arrive under the entity's table.
fn needs_via_root(facts: &Facts) -> bool {
    facts
        .tables
        .iter()
        .flatten()
        .any(TableFacts::is_partitioned)
}

/// PostgreSQL 13 added partitioned tables to publications (and publish_via_partition_root).
const PARTITIONS_VERSION_NUM: i32 = 130_000;

fn partition_item(facts: &Facts, tf: &TableFacts, config: &Config, t: &TableName) -> CheckItem {
    let name = format!("partitions {t}");
    let pubname = &config.source.publication;
    let how = format!(
        "partitioned ({} partition(s) now); publication {pubname} publishes via the partition root, so every partition's changes, including partitions attached later, arrive as {t}",
        tf.partitions
    );
    if facts.server.version_num < PARTITIONS_VERSION_NUM {
        return CheckItem::fail(
            name,
            format!(
                "{t} is partitioned, and PostgreSQL {} cannot publish partitioned tables",
                facts.server.version
            ),
            "upgrade to PostgreSQL 13 or newer, or point the entity at a plain table",
        );
    }
    match &facts.publication {
        Some(p) if !p.via_root => CheckItem::fail(
            name,
            format!(
                "{t} is partitioned, but publication {pubname} publishes each partition under its own name, so its changes would not reach entity {t}"
            ),
            format!("{} or walhook setup", via_root_sql(pubname)),
        ),
        Some(_) => CheckItem::ok(name, how),
        None => CheckItem::ok(
            name,
            format!("{how} (once setup creates it with publish_via_partition_root = true)"),
        ),
    }
}

fn add_tables_sql(name: &str, tables: &[&TableName], config: &Config) -> String {
    format!(
        "ALTER PUBLICATION {} ADD TABLE {};",
        quote_ident(name),
        table_list(tables, config)
    )
}

/// Keeps what the publication already publishes (other subscribers may rely on it) and adds
/// what the entities need.
fn set_publish_sql(name: &str, p: &PublicationFacts, needed: &BTreeSet<PubOp>) -> String {
    let mut ops: Vec<&'static str> = Vec::new();
    for (on, op) in [
        (p.insert, PubOp::Insert),
        (p.update, PubOp::Update),
        (p.delete, PubOp::Delete),
        (p.truncate, PubOp::Truncate),
    ] {
        if on || needed.contains(&op) {
            ops.push(op.keyword());
        }
    }
    format!(
        "ALTER PUBLICATION {} SET (publish = {});",
        quote_ident(name),
        quote_literal(&publish_value(ops))
    )
}

// ---------------------------------------------------------------------------------------------
// setup

/// What `walhook setup` may change beyond the minimum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetupOptions {
    /// Set `REPLICA IDENTITY FULL` on entity tables that capture updates (or deletes whose id
    /// is not in the identity) so changedFields, track and deleted ids are exact.
    pub replica_identity_full: bool,
    /// Accept a gap in capture (the slot vanished while in use): record it in
    /// `walhook.capture_gap` and create the slot again. Without it, setup refuses.
    pub accept_gap: bool,
}

/// The statement that creates the slot, `$1` its name.
fn create_slot_statement(failover: bool) -> &'static str {
    if failover {
        SQL_CREATE_FAILOVER_SLOT
    } else {
        SQL_CREATE_SLOT
    }
}

/// [`create_slot_statement`] with the slot name inlined, for the printed script.
fn create_slot_sql(slot: &str, failover: bool) -> String {
    create_slot_statement(failover).replace("$1", &quote_literal(slot)) + ";"
}

/// What a setup step does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepAction {
    /// Create or upgrade the queue tables in schema `walhook`.
    MigrateQueue,
    /// One SQL statement, run as is (its text ends with `;`).
    Sql(String),
    /// `pg_create_logical_replication_slot(slot, 'pgoutput')`.
    CreateSlot {
        /// The slot name.
        slot: String,
        /// With `failover = true` (PostgreSQL 17+).
        failover: bool,
    },
    /// Drops the lost slot (if it exists), creates it again and records the gap.
    AcceptGap(Gap),
}

/// One change `walhook setup` makes, with the reason it is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupStep {
    /// Why the step is needed, in plain words (printed as an SQL comment).
    pub why: String,
    /// What it does.
    pub action: StepAction,
    /// The privilege the step needs, named in the error when it is missing.
    pub needs: String,
}

impl SetupStep {
    /// The step as SQL a DBA can run in psql (with a `--` comment line first).
    pub fn sql(&self) -> String {
        match &self.action {
            StepAction::Sql(s) => s.clone(),
            StepAction::CreateSlot { slot, failover } => create_slot_sql(slot, *failover),
            StepAction::AcceptGap(gap) => {
                let mut sql = String::new();
                if gap.reason == GapReason::Lost {
                    sql.push_str(&format!(
                        "SELECT pg_drop_replication_slot({});\n",
                        quote_literal(&gap.slot)
                    ));
                }
                sql.push_str(&create_slot_sql(&gap.slot, gap.failover));
                sql.push('\n');
                crate::queue::gap_sql(&gap.slot, gap.reason.describe(), gap.last_flushed, &sql)
            }
            StepAction::MigrateQueue => migration_script().unwrap_or_else(|| {
                "-- (the queue migrations are applied by `walhook setup`; run it as the schema owner)"
                    .to_owned()
            }),
        }
    }
}

impl fmt::Display for SetupStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.why.lines() {
            writeln!(f, "-- {line}")?;
        }
        writeln!(f, "{}", self.sql())
    }
}

/// The whole plan as an SQL script for `walhook setup --print-sql`.
pub fn script(steps: &[SetupStep], config: &Config) -> String {
    let mut out = String::new();
    out.push_str("-- walhook setup, generated by `walhook setup --print-sql`\n");
    out.push_str(&format!(
        "-- source: {}, publication {}, slot {}\n",
        config.source.url_redacted, config.source.publication, config.source.slot
    ));
    out.push_str(
        "-- Run with: psql -v ON_ERROR_STOP=1 -f this-file.sql (not inside one transaction:\n\
         -- a slot cannot be created in a transaction that has written).\n",
    );
    if steps.is_empty() {
        out.push_str("-- Nothing to do: the database is already set up.\n");
    }
    for step in steps {
        out.push('\n');
        out.push_str(&step.to_string());
    }
    out
}

/// Computes the statements needed to meet the prerequisites; empty when all are met.
pub async fn plan(
    client: &Client,
    config: &Config,
    opts: SetupOptions,
) -> Result<Vec<SetupStep>, SetupError> {
    let facts = gather(client, config).await?;
    plan_from(&facts, config, opts)
}

fn plan_from(
    facts: &Facts,
    config: &Config,
    opts: SetupOptions,
) -> Result<Vec<SetupStep>, SetupError> {
    let s = &facts.server;
    let mut steps = Vec::new();

    // Refuse early on what setup cannot change, so nothing is half-done.
    for (entity, tf) in config.entities.iter().zip(&facts.tables) {
        match tf {
            None => {
                return Err(SetupError::TableMissing {
                    entity: entity.name.to_string(),
                    table: entity.table.to_string(),
                    path: config.path.display().to_string(),
                });
            }
            Some(tf) if !tf.is_table() => {
                return Err(SetupError::NotATable {
                    table: entity.table.to_string(),
                });
            }
            Some(tf) if tf.is_partitioned() && s.version_num < PARTITIONS_VERSION_NUM => {
                return Err(SetupError::PartitionsUnsupported {
                    table: entity.table.to_string(),
                    version: s.version.clone(),
                });
            }
            Some(_) => {}
        }
    }
    if let Some(sl) = &facts.slot {
        let ours = sl.slot_type == "logical"
            && sl.plugin.as_deref() == Some("pgoutput")
            && sl.database.as_deref() == Some(s.database.as_str());
        if !ours {
            return Err(SetupError::SlotConflict {
                slot: config.source.slot.clone(),
                detail: format!(
                    "it is a {} slot with plugin {} in database {}",
                    sl.slot_type,
                    sl.plugin.as_deref().unwrap_or("(none)"),
                    sl.database.as_deref().unwrap_or("(none)")
                ),
            });
        }
    } else if s.wal_level != "logical" {
        return Err(SetupError::WalLevel {
            found: s.wal_level.clone(),
        });
    }

    if let QueueSchema::TooNew(v) = &facts.queue {
        return Err(SetupError::Migrate {
            message: format!("the walhook schema is {v}: upgrade walhook"),
            class: ErrorClass::Config,
        });
    }
    // Current needs nothing; Unknown (unreadable) is reported by check, migrating cannot help.
    if matches!(facts.queue, QueueSchema::Missing | QueueSchema::Behind(_)) {
        steps.push(SetupStep {
            why: format!(
                "The queue tables (schema {QUEUE_SCHEMA}) hold events and notifications; this creates or upgrades them."
            ),
            action: StepAction::MigrateQueue,
            needs: format!(
                "CREATE on database {} ({}) or ownership of schema {QUEUE_SCHEMA}",
                s.database,
                s.grant_create_sql()
            ),
        });
    }

    let needed = needed_ops(config);
    let publishes_old_rows = match &facts.publication {
        Some(p) => {
            p.update
                || p.delete
                || needed.contains(&PubOp::Update)
                || needed.contains(&PubOp::Delete)
        }
        None => needed.contains(&PubOp::Update) || needed.contains(&PubOp::Delete),
    };
    let mut full_done: Vec<&TableName> = Vec::new();
    for (entity, tf) in config.entities.iter().zip(&facts.tables) {
        let Some(tf) = tf else { continue };
        if tf.replident == "f" || full_done.contains(&&entity.table) {
            continue;
        }
        let no_identity = tf.identity_columns().is_none();
        if !opts.replica_identity_full {
            if no_identity && publishes_old_rows {
                return Err(SetupError::NoReplicaIdentity {
                    table: entity.table.to_string(),
                    identity: tf.replident_name().to_owned(),
                });
            }
            continue;
        }
        let wants_old =
            entity.actions.contains(&Action::Updated) || entity.actions.contains(&Action::Deleted);
        if wants_old || no_identity {
            full_done.push(&entity.table);
            steps.push(SetupStep {
                why: format!(
                    "{} has REPLICA IDENTITY {}: updates carry no old values, so changedFields and track cannot be computed (entity {}).",
                    entity.table,
                    tf.replident_name(),
                    entity.name
                ),
                action: StepAction::Sql(replica_identity_full_sql(&entity.table)),
                needs: format!(
                    "ownership of {} (owner {}): ALTER TABLE {} OWNER TO {}; or run setup as the owner",
                    entity.table,
                    tf.owner,
                    entity.table.quoted(),
                    quote_ident(&s.role)
                ),
            });
        }
    }

    row_filter::identity_steps(&mut steps, facts, config, opts)?;
    children::steps(&mut steps, facts, config, opts)?;

    let pubname = &config.source.publication;
    let tables = entity_tables(config);
    let pub_needs = |what: &str| {
        format!(
            "{what} and ownership of the tables {}; run setup as their owner or a superuser",
            tables
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match &facts.publication {
        None => steps.push(SetupStep {
            why: format!(
                "Publication {pubname} selects the entity tables whose changes walhook reads."
            ),
            action: StepAction::Sql(create_publication_sql(
                pubname,
                &tables,
                &needed,
                needs_via_root(facts),
                config,
            )),
            needs: pub_needs(&format!(
                "CREATE on database {} ({})",
                s.database,
                s.grant_create_sql()
            )),
        }),
        Some(p) => {
            let missing: Vec<&TableName> =
                tables.iter().copied().filter(|t| !p.includes(t)).collect();
            if !missing.is_empty() {
                steps.push(SetupStep {
                    why: format!(
                        "Publication {pubname} lacks entity table(s) {}; their changes would not reach walhook.",
                        missing
                            .iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    action: StepAction::Sql(add_tables_sql(pubname, &missing, config)),
                    needs: pub_needs(&format!("ownership of publication {pubname}")),
                });
            }
            if needed.iter().any(|op| !p.publishes(*op)) {
                steps.push(SetupStep {
                    why: format!(
                        "Publication {pubname} {}; the entities need {}.",
                        publish_list(p),
                        publish_value(needed.iter().map(|o| o.keyword()))
                    ),
                    action: StepAction::Sql(set_publish_sql(pubname, p, &needed)),
                    needs: format!("ownership of publication {pubname}"),
                });
            }
            if needs_via_root(facts) && !p.via_root {
                steps.push(SetupStep {
                    why: format!(
                        "An entity table is partitioned: publication {pubname} must publish its partitions' changes under the partitioned table's name (publish_via_partition_root), or they never reach the entity. Other subscribers of {pubname} see root names too."
                    ),
                    action: StepAction::Sql(via_root_sql(pubname)),
                    needs: format!("ownership of publication {pubname}"),
                });
            }
        }
    }

    row_filter::publication_steps(&mut steps, facts, config);

    // Last: a slot created before its publication cannot decode changes made before the
    // publication existed, and the slot starts retaining WAL the moment it exists.
    if let Some(gap) = facts.gap(&config.source.slot) {
        if !opts.accept_gap {
            return Err(SetupError::Gap {
                fix: accept_gap_fix(config),
                gap,
            });
        }
        steps.push(SetupStep {
            why: format!(
                "{gap}. Accepted with --accept-gap: the gap is recorded in walhook.capture_gap (the monitors are told when capture resumes) and the slot is created again, so capture resumes from now."
            ),
            action: StepAction::AcceptGap(gap),
            needs: format!("the REPLICATION attribute: {}", s.alter_role_replication_sql()),
        });
    } else if facts.slot.is_none() {
        steps.push(SetupStep {
            why: format!(
                "Replication slot {} keeps the WAL walhook has not yet read, so no change is lost while it is stopped.",
                config.source.slot
            ),
            action: StepAction::CreateSlot {
                slot: config.source.slot.clone(),
                failover: facts.server.failover_slots(),
            },
            needs: format!("the REPLICATION attribute: {}", s.alter_role_replication_sql()),
        });
    }
    Ok(steps)
}

/// Runs the steps of a [`plan`] in order, each in its own transaction; a step whose object
/// already exists (another setup ran meanwhile) counts as done. With `watch` (the
/// connection parameters), a step that waits for a lock gets the sessions blocking it
/// logged and named in its error.
pub async fn apply(
    client: &mut Client,
    steps: &[SetupStep],
    watch: Option<&crate::replication::conn::ConnectParams>,
) -> Result<(), SetupError> {
    let pid = match watch {
        Some(_) => crate::db::backend_pid(client).await,
        None => None,
    };
    for step in steps {
        let run = async {
            match &step.action {
                StepAction::MigrateQueue => run_migrations(client).await.map(|()| None),
                StepAction::Sql(sql) => Ok(Some(client.batch_execute(sql).await)),
                StepAction::CreateSlot { slot, failover } => Ok(Some(
                    client
                        .execute(create_slot_statement(*failover), &[slot])
                        .await
                        .map(|_| ()),
                )),
                StepAction::AcceptGap(gap) => accept_gap(client, gap, step).await.map(|()| None),
            }
        };
        let (result, blockers) = match (watch, pid) {
            (Some(params), Some(pid)) => {
                crate::db::watch_blockers(params, pid, &step_title(step), run).await
            }
            _ => (run.await, None),
        };
        match result? {
            None | Some(Ok(())) => {}
            Some(Err(e)) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
            Some(Err(e)) => return Err(step_error(step, e, blockers)),
        }
    }
    Ok(())
}

/// Records the gap, drops the lost slot, creates it again and completes the gap with where
/// capture resumes. Once the gap is recorded it counts as accepted: should a later step
/// fail, the next start creates the slot and completes it.
async fn accept_gap(client: &Client, gap: &Gap, step: &SetupStep) -> Result<(), SetupError> {
    let record = |e: crate::queue::QueueError| SetupError::RecordGap {
        class: e.class(),
        message: e.to_string(),
    };
    crate::queue::open_gap(client, &gap.slot, gap.reason.describe(), gap.last_flushed)
        .await
        .map_err(record)?;
    if gap.reason == GapReason::Lost {
        match client.execute(SQL_DROP_SLOT, &[&gap.slot]).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                return Err(SetupError::SlotActive {
                    slot: gap.slot.clone(),
                    pid: None,
                });
            }
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
            Err(e) => return Err(step_error(step, e, None)),
        }
    }
    match client
        .execute(create_slot_statement(gap.failover), &[&gap.slot])
        .await
    {
        Ok(_) => {}
        // Another setup or walhook created it meanwhile: capture resumes from there.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
        Err(e) => return Err(step_error(step, e, None)),
    }
    crate::queue::complete_gaps(client, &gap.slot)
        .await
        .map_err(record)?;
    Ok(())
}

/// How a step is named in the "waiting for" warning.
fn step_title(step: &SetupStep) -> String {
    match &step.action {
        StepAction::MigrateQueue => "the queue schema migration".to_owned(),
        StepAction::CreateSlot { slot, .. } => format!("creating replication slot {slot}"),
        StepAction::Sql(sql) => format!("`{}`", sql.lines().next().unwrap_or_default()),
        StepAction::AcceptGap(gap) => {
            format!("recreating replication slot {} after the gap", gap.slot)
        }
    }
}

/// Plans and applies in one call; returns the steps that were applied (empty: nothing to do).
pub async fn setup(
    client: &mut Client,
    config: &Config,
    opts: SetupOptions,
) -> Result<Vec<SetupStep>, SetupError> {
    let steps = plan(client, config, opts).await?;
    let params = config.source.connect_params().ok();
    apply(client, &steps, params.as_ref()).await?;
    Ok(steps)
}

fn step_error(step: &SetupStep, e: tokio_postgres::Error, blockers: Option<String>) -> SetupError {
    let statement = step.sql();
    let gave_up = e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
        || e.code() == Some(&SqlState::QUERY_CANCELED);
    if let (true, Some(blockers)) = (gave_up, blockers) {
        return SetupError::Blocked {
            what: step_title(step),
            message: db_message(&e),
            blockers,
        };
    }
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        SetupError::PermissionDenied {
            statement,
            message: db_message(&e),
            needs: step.needs.clone(),
        }
    } else {
        SetupError::Statement {
            statement,
            source: e,
        }
    }
}

/// What `walhook setup --drop` removes besides the slot and the publication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropOptions {
    /// Also drop schema `walhook` with every queued, delivered and failed notification.
    pub queue_schema: bool,
}

/// Drops the slot (refusing while a process streams from it) and the publication, and with
/// `opts.queue_schema` the queue tables; returns the statements run.
pub async fn drop_all(
    client: &Client,
    config: &Config,
    opts: DropOptions,
) -> Result<Vec<String>, SetupError> {
    let slot = &config.source.slot;
    let mut done = Vec::new();
    let q = |what: &str| {
        let what = what.to_owned();
        move |source| SetupError::Query { what, source }
    };
    let row = client
        .query_opt(SQL_SLOT, &[slot])
        .await
        .map_err(q("reading pg_replication_slots"))?;
    if let Some(row) = row {
        let active: bool = row.try_get(3).map_err(q("reading pg_replication_slots"))?;
        let pid: Option<i32> = row.try_get(4).map_err(q("reading pg_replication_slots"))?;
        let plugin: Option<String> = row.try_get(0).map_err(q("reading pg_replication_slots"))?;
        let database: Option<String> = row.try_get(2).map_err(q("reading pg_replication_slots"))?;
        let current: String = client
            .query_one(SQL_CURRENT_DATABASE, &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(q("reading the current database"))?;
        // A slot of the same name that walhook did not create belongs to someone else.
        if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
            return Err(SetupError::SlotConflict {
                slot: slot.clone(),
                detail: format!(
                    "it uses plugin {} in database {}, so it is not walhook's and is left alone",
                    plugin.as_deref().unwrap_or("(none)"),
                    database.as_deref().unwrap_or("(none)")
                ),
            });
        }
        if active {
            return Err(SetupError::SlotActive {
                slot: slot.clone(),
                pid,
            });
        }
        match client.execute(SQL_DROP_SLOT, &[slot]).await {
            Ok(_) => {}
            // Another process started streaming between the look-up and the drop.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                return Err(SetupError::SlotActive {
                    slot: slot.clone(),
                    pid: None,
                });
            }
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
            Err(e) => {
                return Err(drop_error(
                    format!("SELECT pg_drop_replication_slot({})", quote_literal(slot)),
                    e,
                ));
            }
        }
        done.push(format!(
            "SELECT pg_drop_replication_slot({});",
            quote_literal(slot)
        ));
    }
    let mut statements = vec![format!(
        "DROP PUBLICATION IF EXISTS {};",
        quote_ident(&config.source.publication)
    )];
    if opts.queue_schema {
        statements.push(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE;",
            quote_ident(QUEUE_SCHEMA)
        ));
    }
    for sql in statements {
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| drop_error(sql.clone(), e))?;
        done.push(sql);
    }
    Ok(done)
}

fn drop_error(statement: String, e: tokio_postgres::Error) -> SetupError {
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        SetupError::PermissionDenied {
            statement,
            message: db_message(&e),
            needs: "ownership of the object (run walhook setup --drop as its owner or a superuser)"
                .into(),
        }
    } else {
        SetupError::Statement {
            statement,
            source: e,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why setup (or reading the catalog) failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A catalog query failed.
    #[error("{what}: {}", db_message(.source))]
    Query {
        /// What was being read.
        what: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A setup statement was refused for lack of privilege.
    #[error("permission denied running `{statement}`: {message}; needs {needs}")]
    PermissionDenied {
        /// The statement.
        statement: String,
        /// The server's message.
        message: String,
        /// The privilege or ownership needed, with the GRANT/ALTER that gives it.
        needs: String,
    },
    /// A setup statement failed for another reason.
    #[error("`{statement}` failed: {}", db_message(.source))]
    Statement {
        /// The statement.
        statement: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A step gave up waiting (lock_timeout / statement_timeout) on other sessions.
    #[error(
        "{what} gave up waiting ({message}): it was blocked by {blockers}; end those sessions or transactions (SELECT pg_terminate_backend(pid)), or raise [source] lock_timeout / statement_timeout, then run it again"
    )]
    Blocked {
        /// The step.
        what: String,
        /// The server's message (lock or statement timeout).
        message: String,
        /// The sessions that held it up.
        blockers: String,
    },
    /// An entity table does not exist.
    #[error(
        "table {table} of entity {entity} does not exist; create it or correct `table` under that [[entity]] in {path} (key [[entity]] table)"
    )]
    TableMissing {
        /// Entity name.
        entity: String,
        /// Table name.
        table: String,
        /// Config file.
        path: String,
    },
    /// An entity's relation is a view or something else that cannot be published.
    #[error("{table} is not a table and cannot be published; point [[entity]] table at a table")]
    NotATable {
        /// Relation name.
        table: String,
    },
    /// The entity table is partitioned and the server cannot publish partitioned tables.
    #[error(
        "{table} is partitioned, and PostgreSQL {version} cannot publish partitioned tables; upgrade to PostgreSQL 13 or newer, or point the entity at a plain table"
    )]
    PartitionsUnsupported {
        /// Table name.
        table: String,
        /// The server version.
        version: String,
    },
    /// A table without replica identity would make the application's UPDATE/DELETE fail.
    #[error(
        "{table} has REPLICA IDENTITY {identity} and no usable key: once published, UPDATE and DELETE on it would fail; run walhook setup --replica-identity-full or ALTER TABLE {table} REPLICA IDENTITY FULL"
    )]
    NoReplicaIdentity {
        /// Table name.
        table: String,
        /// Its current identity.
        identity: String,
    },
    /// An entity's `where` cannot become its table's row filter.
    #[error("row filter of {table}: {problem}; {fix}")]
    RowFilter {
        /// Table name.
        table: String,
        /// What prevents it.
        problem: String,
        /// What to change.
        fix: String,
    },
    /// The slot name is taken by a slot walhook cannot use.
    #[error(
        "replication slot {slot} exists but walhook cannot use it: {detail}; choose another `slot` in [source] or drop that slot"
    )]
    SlotConflict {
        /// Slot name.
        slot: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A process is streaming from the slot, so it cannot be dropped.
    #[error("replication slot {slot} is active{}; stop that process (walhook run?) and retry", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    SlotActive {
        /// Slot name.
        slot: String,
        /// The streaming backend's pid.
        pid: Option<i32>,
    },
    /// The slot vanished while in use; setup creates it again only with `--accept-gap`.
    #[error("{gap}; fix: {fix}")]
    Gap {
        /// The gap.
        gap: Gap,
        /// What to run.
        fix: String,
    },
    /// wal_level is below logical, so no slot can be created.
    #[error(
        "wal_level is {found}; set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
    )]
    WalLevel {
        /// The current setting.
        found: String,
    },
    /// The gap could not be recorded in `walhook.capture_gap`.
    #[error("recording the gap in walhook.capture_gap failed: {message}")]
    RecordGap {
        /// The queue error's message.
        message: String,
        /// Its class.
        class: ErrorClass,
    },
    /// The queue migrations failed.
    #[error("queue migration failed: {message}")]
    Migrate {
        /// The migration error's message.
        message: String,
        /// Its class.
        class: ErrorClass,
    },
}

impl Classify for SetupError {
    fn class(&self) -> ErrorClass {
        match self {
            SetupError::Query { source, .. } | SetupError::Statement { source, .. } => {
                crate::error::pg_error_class(source)
            }
            SetupError::PermissionDenied { .. }
            | SetupError::NoReplicaIdentity { .. }
            | SetupError::SlotActive { .. }
            | SetupError::PartitionsUnsupported { .. }
            | SetupError::WalLevel { .. } => ErrorClass::Permanent,
            SetupError::TableMissing { .. }
            | SetupError::NotATable { .. }
            | SetupError::SlotConflict { .. }
            | SetupError::RowFilter { .. }
            | SetupError::Gap { .. } => ErrorClass::Config,
            SetupError::Migrate { class, .. } | SetupError::RecordGap { class, .. } => *class,
            // The blockers may be gone on the next attempt.
            SetupError::Blocked { .. } => ErrorClass::Transient,
        }
    }
}

/// The server's message with detail and hint; tokio-postgres' own Display says only "db error".
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = db.message().to_owned();
            if let Some(d) = db.detail() {
                m.push_str(" (");
                m.push_str(d);
                m.push(')');
            }
            if let Some(h) = db.hint() {
                m.push_str("; hint: ");
                m.push_str(h);
            }
            m
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_aligned_and_carry_the_fix() {
        let r = Report {
            items: vec![
                CheckItem::ok("wal_level", "logical"),
                CheckItem::fail("wal_level", "replica", "restart"),
            ],
        };
        let text = r.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("ok    {:<26}logical", "wal_level"));
        assert_eq!(
            lines[1],
            format!("FAIL  {:<26}replica — restart", "wal_level")
        );
        assert!(!r.ok());
    }

    #[test]
    fn warnings_do_not_fail_a_report() {
        let r = Report {
            items: vec![CheckItem::warn("x", "y", "z")],
        };
        assert!(r.ok());
    }

    #[test]
    fn set_publish_keeps_existing_operations() {
        let p = PublicationFacts {
            all_tables: false,
            insert: true,
            update: false,
            delete: false,
            truncate: true,
            via_root: false,
            tables: BTreeSet::new(),
        };
        let needed = [PubOp::Update].into_iter().collect();
        assert_eq!(
            set_publish_sql("p", &p, &needed),
            "ALTER PUBLICATION \"p\" SET (publish = 'insert, update, truncate');"
        );
    }

    #[test]
    fn sizes_are_printed_in_readable_units() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(2048), "2.0 kB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MB");
    }
}

//! The durable queue inside the source database: schema migrations, the batch writer that
//! stores entity events and fans them out to listeners, and the single state row that
//! remembers which source the queue belongs to and how far it is flushed. Its model (a
//! stored event, a notification claimed for a listener) is what delivery reads.
//!
//! Knows the `walhook` schema; knows nothing about the wire or about HTTP.

pub mod admin;
pub mod backfill;
pub mod browse;
mod claims;
mod compact;
mod cursor;
pub mod debounce;
mod listeners;
mod migrate;
mod model;
mod notifications;
mod rejected;
pub mod resend;
mod route;
pub mod schedule;
mod state;
pub mod status;
mod validation;
mod writer;

use tokio_postgres::error::SqlState;

use crate::error::{Classify, ErrorClass};

pub use admin::{PRUNE_BATCH, PRUNE_INTERVAL, PruneOutcome, prune};
pub use claims::{CLAIM_HEADS, CLAIM_NEXT, Claim, ClaimLimits, Claimed, Cursor, EntityKey, SWEEP};
pub use compact::{COMPACT_MIN_INDEX_BYTES, Compaction, compact_new};
pub use cursor::{CursorRead, CursorStore, FailedEvent};
pub(crate) use cursor::{cursor_backlog, cursor_receives};
pub use listeners::{subscriptions, sync_listeners};
pub use migrate::{MIGRATIONS, Migration, latest_version, migrate, migration_script};
pub use model::{Notification, StoredEvent};
pub use notifications::{
    Completions, DeliveredRow, EVENTS_PAYLOAD, FailedAttemptRow, NEW_NOTIFICATIONS_CHANNEL,
    NotificationStore, OnNewNotifications, SWEEP_PAYLOAD, discard_pending,
};
pub use state::{
    CaptureGap, QueueState, complete_gaps, gap_sql, mark_gap_alerted, open_gap, open_gap_exists,
    read_state, record_source, record_start, unalerted_gaps,
};
pub use validation::{
    VALIDATION_WINDOW, ValidatedBy, Validation, ValidationState, begin_validation, code_sha256,
    connect_validation, expire_validation, fingerprint, mark_validated, mark_validation_failed,
    note_validation, read_validation, read_validations,
};
pub use writer::{
    EVENT_ID_NAMESPACE, QueueWriter, Subscription, WriteOutcome, event_id, variant_event_id,
};

/// The statements that run per notification or per batch, for benchmarks and plan checks.
pub mod statements {
    pub use super::admin::{PRUNE_EVENTS, PRUNE_PROCESSED};
    pub use super::claims::{CLAIM_HEADS, CLAIM_NEXT, SWEEP};
    pub use super::notifications::{DELIVERED, FAILED, RELEASE, RENEW, RETRY, SESSION_SETTINGS};
    pub use super::writer::{EVENT_ORDER_LOCK, FAN_OUT_COPIED, INSERT_EVENTS};
}

/// An error talking to the queue tables.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database refused or failed a statement, or the connection broke.
    #[error("{context}: {detail}")]
    Database {
        /// What walhook was doing.
        context: &'static str,
        /// The server's message (or the client's, for connection errors).
        detail: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The queue database could not be reached (or refused the login).
    #[error("connecting to the queue database: {0}")]
    Connect(#[source] crate::db::DbError),
    /// The walhook role lacks a privilege; `grant` is the statement that fixes it.
    #[error("{context}: {detail}; fix: {grant}")]
    PermissionDenied {
        /// What walhook was doing.
        context: &'static str,
        /// The server's message.
        detail: String,
        /// The SQL a DBA runs to grant what is missing.
        grant: String,
    },
    /// The `walhook` schema is missing or incomplete.
    #[error("{context}: {detail}; run `walhook setup` to create the walhook schema")]
    SchemaMissing {
        /// What walhook was doing.
        context: &'static str,
        /// The server's message.
        detail: String,
    },
    /// An event cannot be represented in the queue tables (a value out of a column's range).
    #[error("cannot store an event: {detail}")]
    Unstorable {
        /// What is out of range.
        detail: String,
    },
    /// A stored event cannot be read back (a value walhook does not know).
    #[error("an event in walhook.event cannot be read: {detail}")]
    Unreadable {
        /// What is wrong with it.
        detail: String,
    },
    /// The database was migrated by a newer walhook than this binary.
    #[error(
        "the walhook schema in this database is version {found}, but this walhook knows versions up to {known}: upgrade walhook, or point it at the right database"
    )]
    SchemaTooNew {
        /// Highest version recorded in `walhook.schema_migration`.
        found: i32,
        /// Highest version this binary carries.
        known: i32,
    },
}

impl QueueError {
    pub(crate) fn connect(e: crate::db::DbError) -> QueueError {
        QueueError::Connect(e)
    }
}

impl Classify for QueueError {
    fn class(&self) -> ErrorClass {
        match self {
            QueueError::Database { source, .. } => crate::error::pg_error_class(source),
            QueueError::Connect(e) => e.class(),
            QueueError::PermissionDenied { .. }
            | QueueError::SchemaMissing { .. }
            | QueueError::Unstorable { .. }
            | QueueError::Unreadable { .. } => ErrorClass::Permanent,
            QueueError::SchemaTooNew { .. } => ErrorClass::Config,
        }
    }
}

/// The server's message for a database error, or the client's description otherwise.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => match std::error::Error::source(err) {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    }
}

/// Who is connected where, to name the role and database in a GRANT hint.
#[derive(Clone, Debug)]
struct Session {
    role: String,
    database: String,
}

impl Session {
    const QUERY: &'static str = "SELECT current_user::text, current_database()::text";

    async fn of(client: &tokio_postgres::Client) -> Result<Session, QueueError> {
        let row = client
            .query_one(Self::QUERY, &[])
            .await
            .map_err(db_error("reading the session's role", None))?;
        let field = |i| {
            row.try_get::<_, String>(i)
                .map_err(db_error("reading the session's role", None))
        };
        Ok(Session {
            role: field(0)?,
            database: field(1)?,
        })
    }
}

/// Which grant fixes a permission error: creating the schema, or using it.
#[derive(Clone, Copy, Debug)]
enum Needs {
    Create,
    Use,
    Temp,
}

impl Needs {
    /// The GRANT statement; names the role and database when the session is known.
    fn grant(self, session: Option<&Session>) -> String {
        let role = session.map_or_else(
            || "<walhook role>".to_owned(),
            |s| crate::types::quote_ident(&s.role),
        );
        match self {
            Needs::Create => format!(
                "GRANT CREATE ON DATABASE {} TO {role}; (or apply `walhook setup --print-sql` as the database owner)",
                session.map_or_else(
                    || "<database>".to_owned(),
                    |s| crate::types::quote_ident(&s.database)
                )
            ),
            Needs::Temp => format!(
                "GRANT TEMPORARY ON DATABASE {} TO {role};",
                session.map_or_else(
                    || "<database>".to_owned(),
                    |s| crate::types::quote_ident(&s.database)
                )
            ),
            Needs::Use => format!(
                "GRANT USAGE ON SCHEMA walhook TO {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA walhook TO {role}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA walhook TO {role};"
            ),
        }
    }
}

/// Maps a tokio-postgres error to a [`QueueError`], recognising missing privileges (when
/// the session is known) and a missing schema.
fn db_error<'s>(
    context: &'static str,
    privilege: Option<(Needs, Option<&'s Session>)>,
) -> impl FnOnce(tokio_postgres::Error) -> QueueError + 's {
    move |source| {
        let detail = describe(&source);
        match (source.code(), privilege) {
            (Some(code), Some((needs, session))) if code == &SqlState::INSUFFICIENT_PRIVILEGE => {
                QueueError::PermissionDenied {
                    context,
                    detail,
                    grant: needs.grant(session),
                }
            }
            (Some(code), _)
                if code == &SqlState::UNDEFINED_TABLE || code == &SqlState::INVALID_SCHEMA_NAME =>
            {
                QueueError::SchemaMissing { context, detail }
            }
            _ => QueueError::Database {
                context,
                detail,
                source,
            },
        }
    }
}

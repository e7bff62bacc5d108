//! The cloned-database guard: a restored copy of production must not notify production's
//! listeners.
//!
//! walhook records the database's system identifier and name in `walhook.state` the first
//! time it runs. A copy made with pg_basebackup (or a restored backup) has a different system
//! identifier; a copy made with `CREATE DATABASE … TEMPLATE` has a different name. Either way
//! the queue tables came from somewhere else, and walhook refuses to capture or deliver until
//! an operator runs `walhook setup --adopt` on the copy.

use std::fmt;

use tokio_postgres::Client;

use crate::queue::{QueueError, read_state};
use crate::replication::conn::{ConnectParams, ReplicationConnection, ReplicationError};

/// Who this database is, as the server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `IDENTIFY_SYSTEM`'s system identifier.
    pub system_id: String,
    /// The database name.
    pub database: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "database {} of system {}", self.database, self.system_id)
    }
}

/// How the running database relates to the one recorded in `walhook.state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing recorded yet: this is the first run.
    Fresh,
    /// The same database as recorded.
    Same,
    /// A copy: refuse to capture or deliver.
    Cloned {
        /// What `walhook.state` recorded.
        recorded: Identity,
        /// What the server says now.
        current: Identity,
    },
}

impl Verdict {
    /// One line for logs and `walhook status`, naming the fix.
    pub fn explain(&self) -> Option<String> {
        match self {
            Verdict::Cloned { recorded, current } => Some(format!(
                "this is a copy: walhook.state was recorded on {recorded}, but this is {current}; \
                 walhook delivers nothing here so a test copy cannot notify production listeners. \
                 If this copy should notify, point its [[listener]]s at test receivers and run \
                 `walhook setup --adopt` (add --discard-pending to drop notifications copied from the original)"
            )),
            _ => None,
        }
    }
}

const SQL_RECORDED: &str =
    "SELECT system_identifier, database_name FROM walhook.state WHERE id = 1";

/// Compares the recorded identity with the current one.
pub async fn verdict(client: &Client, current: &Identity) -> Result<Verdict, QueueError> {
    if !queue_exists(client).await {
        return Ok(Verdict::Fresh);
    }
    let Some(state) = read_state(client).await? else {
        return Ok(Verdict::Fresh);
    };
    let (Some(system_id), Some(database)) = (state.system_identifier, state.database_name) else {
        return Ok(Verdict::Fresh);
    };
    let recorded = Identity {
        system_id,
        database,
    };
    if &recorded == current {
        Ok(Verdict::Same)
    } else {
        Ok(Verdict::Cloned {
            recorded,
            current: current.clone(),
        })
    }
}

async fn queue_exists(client: &Client) -> bool {
    client
        .query_one("SELECT to_regclass('walhook.state') IS NOT NULL", &[])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Asks the server who it is, over a short-lived replication connection.
pub async fn current_identity(params: &ConnectParams) -> Result<Identity, ReplicationError> {
    let mut repl = ReplicationConnection::connect(params).await?;
    let system = repl.identify_system().await?;
    repl.close().await;
    Ok(Identity {
        system_id: system.system_id,
        database: system.dbname.unwrap_or_else(|| params.dbname().to_owned()),
    })
}

const DISCARDED_COMMENT: &str =
    "not delivered: copied from another database; discarded by walhook setup --adopt";

const SQL_ADOPT: &str = "UPDATE walhook.state
SET system_identifier = $1, database_name = $2, flushed_lsn = NULL, updated_at = now()
WHERE id = 1";

/// What `walhook setup --adopt` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopted {
    /// The identity recorded before, if any.
    pub previous: Option<Identity>,
    /// Notifications moved to `walhook.failed`.
    pub discarded: u64,
}

/// Records the current identity in `walhook.state`, optionally discarding pending
/// notifications first; one transaction.
pub async fn adopt(
    client: &mut Client,
    current: &Identity,
    discard_pending: bool,
) -> Result<Adopted, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let previous = tx.query_opt(SQL_RECORDED, &[]).await?.and_then(|r| {
        let s: Option<String> = r.get(0);
        let d: Option<String> = r.get(1);
        Some(Identity {
            system_id: s?,
            database: d?,
        })
    });
    let discarded = if discard_pending {
        // Moved to walhook.failed with a comment: nothing is lost silently, and nothing
        // reaches a listener by surprise.
        crate::queue::discard_pending(&tx, DISCARDED_COMMENT).await?
    } else {
        0
    };
    tx.execute(SQL_ADOPT, &[&current.system_id, &current.database])
        .await?;
    tx.commit().await?;
    Ok(Adopted {
        previous,
        discarded,
    })
}

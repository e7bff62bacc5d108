//! Framing of the streaming replication sub-protocol carried in CopyData messages.

use bytes::Bytes;

use crate::replication::pgoutput::PgTimestamp;
use crate::types::Lsn;

/// A CopyData payload received from the server during START_REPLICATION.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicationMessage {
    /// 'w': WAL data; for logical replication `data` is one pgoutput message.
    XLogData { wal_start: Lsn, wal_end: Lsn, server_time: PgTimestamp, data: Bytes },
    /// 'k': primary keepalive.
    Keepalive { wal_end: Lsn, server_time: PgTimestamp, reply_requested: bool },
}

//! The replication connection, built on postgres-protocol (tokio-postgres has no replication mode).

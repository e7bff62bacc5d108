//! The replication connection: connection parameters, transport (TCP, TLS), wire framing
//! and pgoutput decoding.
//!
//! This module knows the wire and nothing about entities or queue tables.

pub mod conn;
pub mod conninfo;
mod connstr;
pub mod pgoutput;
pub mod protocol;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod version;

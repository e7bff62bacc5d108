//! The replication connection: connection parameters, wire framing and pgoutput decoding.
//!
//! This module knows the wire and nothing about entities or queue tables.

pub mod conn;
pub mod pgoutput;
pub mod protocol;

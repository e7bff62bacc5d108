//! walhook: change-data-capture from PostgreSQL logical replication to entity events.

pub mod admin;
pub mod backfill;
mod capture;
pub mod cli;
/// Throwaway local PostgreSQL clusters, for `walhook demo` and the tests.
#[cfg(feature = "demo")]
pub mod cluster;
pub mod condition;
pub mod config;
pub mod console;
pub mod db;
pub mod delivery;
pub mod error;
mod guard;
mod human;
mod liveness;
pub mod metrics;
pub mod monitor;
pub mod queue;
pub mod replication;
pub mod schedule;
mod secret;
pub mod service;
pub mod setup;
pub mod streams;
mod systemd;
mod tls;
pub mod types;

/// The mapper's types (`EntityEvent`, …) keep their short path.
pub use capture::mapper;

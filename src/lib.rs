//! walhook: change-data-capture from PostgreSQL logical replication to entity events.

pub mod admin;
pub mod capture;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod db;
pub mod delivery;
pub mod error;
pub mod guard;
pub mod human;
pub mod liveness;
pub mod metrics;
pub mod monitor;
pub mod queue;
pub mod replication;
pub mod secret;
pub mod service;
pub mod setup;
pub mod systemd;
pub mod tls;
pub mod types;

/// The mapper's types (`EntityEvent`, …) keep their short path.
pub use capture::mapper;

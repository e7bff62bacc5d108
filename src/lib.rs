//! walhook: change-data-capture from PostgreSQL logical replication to entity events.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod error;
pub mod mapper;
pub mod queue;
pub mod replication;
pub mod service;
pub mod setup;
pub mod types;

//! walhook: change-data-capture from PostgreSQL logical replication to entity events.

pub mod cluster;
pub mod config;
pub mod error;
pub mod mapper;
pub mod queue;
pub mod replication;
pub mod setup;
pub mod types;
pub mod cli;
pub mod service;

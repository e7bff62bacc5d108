//! The configuration file: parsed once at start into checked, typed structures.
//!
//! Everything after this module works with [`Config`] and never sees TOML.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Classify, ErrorClass};
use crate::types::{Action, EntityName, TableName};

/// The default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/walhook/walhook.toml";

/// The whole, checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the file was read from (for messages).
    pub path: PathBuf,
    /// `[source]`: the database to capture.
    pub source: SourceConfig,
    /// `[queue]`: the queue tables.
    pub queue: QueueConfig,
    /// `[[entity]]`: tables captured as entities, in file order.
    pub entities: Vec<EntityConfig>,
}

/// A string that must never be printed (passwords, signing secrets).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    /// The secret itself; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `[source]`.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// libpq connection string (URL or key=value), after `${ENV}` substitution.
    /// May contain a password: print only [`SourceConfig::url_redacted`].
    pub url: Secret,
    /// The same connection string with any password replaced by `***`.
    pub url_redacted: String,
    /// Password from `password` or `password_file`, overriding one in the URL.
    pub password: Option<Secret>,
    /// Logical replication slot name (`[a-z0-9_]{1,63}`).
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Create the publication for the entity tables when it is missing (default true).
    pub create_publication: bool,
    /// The `sourceSystem` in payloads (default: the database name).
    pub system_name: Option<String>,
    /// How often to write a `pg_logical_emit_message` heartbeat so the slot moves on a quiet
    /// database; `None` disables it (default 30s).
    pub heartbeat: Option<Duration>,
    /// How often to send a standby status update (default 5s, at most 10s).
    pub status_interval: Duration,
}

/// `[queue]`.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// Delete Processed rows older than this (default 7d).
    pub retention: Duration,
    /// Most events written in one queue transaction (default 5000).
    pub batch_size: usize,
    /// Longest time an event waits for its batch to fill before it is written (default 20ms).
    pub batch_delay: Duration,
}

/// One `[[entity]]`.
#[derive(Clone, Debug)]
pub struct EntityConfig {
    /// Entity type in events.
    pub name: EntityName,
    /// The captured table. Written `schema.table`; a bare `table` means `public.table`.
    pub table: TableName,
    /// Id columns; `None` means the table's primary key.
    pub id: Option<Vec<String>>,
    /// Actions that produce events (default: all three).
    pub actions: Vec<Action>,
    /// When set, an update that changes none of these columns emits nothing.
    pub track: Option<Vec<String>>,
    /// Columns removed from every event before it is written.
    pub exclude: Vec<String>,
    /// Subject template such as `Customer/{id}`; `{id}` and `{column}` are replaced.
    pub subject: Option<String>,
}

/// Why the configuration could not be loaded. Its `Display` is the complete message:
/// one line per problem, each naming the file, line, column and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}; pass --config PATH or create {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One or more problems in the file's content.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl Classify for ConfigError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

impl Config {
    /// Reads, substitutes `${ENV}`, parses and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` is used in messages and for relative files.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let _ = (text, path);
        Err(ConfigError::Invalid(vec!["not implemented".into()]))
    }
}

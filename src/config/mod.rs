//! The configuration file: parsed once at start into checked, typed structures.
//!
//! Everything after this module works with [`Config`] and never sees TOML.

mod admin;
mod auth;
mod azure;
mod check;
mod child;
mod condition;
mod debounce;
mod derive;
mod entity;
mod event_types;
mod form;
mod listener;
mod monitor;
mod nats;
mod position;
mod queue;
mod row_filter;
mod schedule;
mod smtp;
mod source;
mod template;
mod units;
mod webhook;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

use crate::error::{Classify, ErrorClass};

pub use self::admin::{AdminConfig, DEFAULT_ADMIN_PORT};
pub use self::auth::{BearerToken, ClientAuth, ListenerAuth, OAuth2Config};
pub use self::azure::{
    EventGridConfig, EventGridDelivery, ServiceBusConfig, TopicTemplate, VALIDATION_PATH,
};
pub use self::child::ChildTable;
pub use self::debounce::{Debounce, DebounceFrom};
pub use self::derive::DerivedAction;
pub use self::entity::{EntityConfig, parse_table_name, subject_placeholders};
pub use self::event_types::{EventType, EventTypes};
pub use self::form::FormConfig;
pub use self::listener::{Backoff, CloudEventsMode, ListenerConfig, ListenerFormat, RateLimit};
pub use self::monitor::{AlertKind, MonitorConfig, MonitorEmail, MonitorWebhook};
pub use self::nats::{
    NatsAuth, NatsConfig, Position, Retention, Storage, StreamSettings, SubjectTemplate,
};
pub use self::queue::QueueConfig;
pub use self::row_filter::expression_identifiers;
pub use self::schedule::{ScheduleConfig, ScheduleWhen};
pub use self::smtp::{SmtpCredentials, SmtpServer, SmtpTls};
pub use self::source::SourceConfig;
pub use self::template::{
    Escape, Field, Segment, Template, TemplateConfig, TemplateKind, TemplateProblem,
};
pub use self::units::{parse_duration, parse_rate_limit, parse_size};
pub use crate::secret::{Secret, SecretUrl, SigningKey, redact_url};
pub use crate::tls::CaFile;

use self::admin::RawAdmin;
use self::check::Checker;
use self::entity::RawEntity;
use self::listener::RawListener;
use self::monitor::RawMonitor;
use self::position::{serde_error, syntax_error};
use self::queue::RawQueue;
use self::source::RawSource;

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
    /// `[admin]`: the HTTP admin endpoint; `None` when the section is absent.
    pub admin: Option<AdminConfig>,
    /// `[[listener]]`: where events are delivered, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// `[[monitor]]`: who is told when something goes wrong, in file order.
    pub monitors: Vec<MonitorConfig>,
    /// `[[schedule]]`: notifications sent on a schedule, in file order.
    pub schedules: Vec<ScheduleConfig>,
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
        Config::parse_with_env(text, path, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::parse`], but `${NAME}` is looked up with `env` instead of the process
    /// environment (so tests and `walhook check` can supply their own).
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let tree = match toml::de::DeTable::parse(text) {
            Ok(tree) => tree,
            Err(e) => return Err(ConfigError::Invalid(vec![syntax_error(text, &file, &e)])),
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                return Err(ConfigError::Invalid(vec![serde_error(
                    text, &file, &tree, &e,
                )]));
            }
        };
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut checker = Checker {
            text,
            file,
            dir,
            env,
            errors: Vec::new(),
        };
        let config = checker.config(raw, path);
        if checker.errors.is_empty() {
            Ok(config)
        } else {
            // Sorted by position so the lines read top to bottom like the file.
            checker.errors.sort_by_key(|(at, _)| *at);
            Err(ConfigError::Invalid(
                checker.errors.into_iter().map(|(_, line)| line).collect(),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw, spanned file layout. Everything optional: missing keys are reported by the checker
// together with every other problem, not by serde one at a time.

type Str = Option<Spanned<String>>;
type StrList = Option<Spanned<Vec<Spanned<String>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Option<Spanned<RawSource>>,
    queue: Option<Spanned<RawQueue>>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    entity: Vec<Spanned<RawEntity>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    monitor: Vec<Spanned<RawMonitor>>,
    #[serde(default)]
    schedule: Vec<Spanned<self::schedule::RawSchedule>>,
}

impl Checker<'_> {
    fn config(&mut self, raw: RawConfig, path: &Path) -> Config {
        let source = self.source(raw.source.as_ref());
        let queue = self.queue(raw.queue.as_ref());
        let admin = raw.admin.as_ref().map(|a| self.admin(a));
        let mut entities = self.entities(&raw.entity);
        let schedules = self.schedules(&raw.schedule, &entities);
        // Listeners subscribe to scheduled actions like to derived ones.
        for s in &schedules {
            if let Some(e) = entities.iter_mut().find(|e| e.name == s.entity)
                && !e.scheduled_actions.contains(&s.action)
            {
                e.scheduled_actions.push(s.action.clone());
            }
        }
        let listeners = self.listeners(&raw.listener, &entities, admin.as_ref());
        let monitors = self.monitors(&raw.monitor);
        Config {
            path: path.to_owned(),
            source,
            queue,
            entities,
            admin,
            listeners,
            monitors,
            schedules,
        }
    }
}

#[cfg(test)]
mod tests;

//! The configuration file: parsed once at start into checked, typed structures.
//!
//! Everything after this module works with [`Config`] and never sees TOML.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

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
    /// `[admin]`: the HTTP admin endpoint; `None` when the section is absent.
    pub admin: Option<AdminConfig>,
    /// `[[listener]]`: where events are delivered, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// `[[monitor]]`: who is told when something goes wrong, in file order.
    pub monitors: Vec<MonitorConfig>,
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
#[derive(Clone, Debug, PartialEq)]
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
    /// Log a warning when the slot retains more WAL than this (default 1 GiB); the slot
    /// keeps WAL for walhook, so a stopped or slow walhook fills the server's disk.
    pub wal_warning_bytes: u64,
}

impl SourceConfig {
    /// Connection parameters for this source: `url` with `password`/`password_file`
    /// overriding any other password source.
    pub fn connect_params(
        &self,
    ) -> Result<crate::replication::conn::ConnectParams, crate::replication::conn::ConnError> {
        crate::replication::conn::ConnectParams::parse(
            self.url.expose(),
            self.password.as_ref().map(Secret::expose),
        )
    }
}

/// `[queue]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Delete Processed rows older than this (default 7d).
    pub retention: Duration,
    /// Most events written in one queue transaction (default 5000).
    pub batch_size: usize,
    /// Longest time an event waits for its batch to fill before it is written (default 20ms).
    pub batch_delay: Duration,
}

/// One `[[entity]]`.
#[derive(Clone, Debug, PartialEq)]
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

/// `[admin]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint serving /metrics and /healthz (default 127.0.0.1:9187).
    pub listen: SocketAddr,
    /// The web console's login token (`token_file`); `None` turns the console (/ui) off.
    pub token: Option<Secret>,
}

/// Shortest `[admin] token_file` content accepted: guessing it must stay out of reach.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 24;

/// One `[[listener]]`: an HTTP endpoint that receives events.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    /// Unique listener name, used in the queue tables and on the command line.
    pub name: String,
    /// The http(s) URL events are POSTed to; may carry credentials, so print only `url_redacted`.
    pub url: Secret,
    /// The URL with any password and secret-looking query values replaced by `***`.
    pub url_redacted: String,
    /// Entities this listener receives; `None` means all.
    pub entities: Option<Vec<EntityName>>,
    /// Actions this listener receives (default: all three).
    pub actions: Vec<Action>,
    /// Extra HTTP headers, in file order; names are letters, digits and dashes.
    pub headers: Vec<(String, Secret)>,
    /// Standard Webhooks signing secret (`whsec_…`); `None` sends no signature.
    pub secret: Option<Secret>,
    /// Time limit for one delivery attempt (default 10s).
    pub timeout: Duration,
    /// Most deliveries per period; `None` means unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Attempts before a notification is moved to `walhook.failed` (default 12).
    pub max_attempts: u32,
    /// Retry backoff (default 5s doubling up to 1h).
    pub backoff: Backoff,
    /// Most deliveries in flight at once (default 16, 1 to 1000).
    pub concurrency: usize,
    /// Window in which changes to one entity are coalesced; zero disables (default 0s).
    pub debounce: Duration,
    /// Payload format (default CloudEvents).
    pub format: ListenerFormat,
}

/// A rate limit such as `50/s`: `count` deliveries per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Deliveries allowed per period (at least 1).
    pub count: u32,
    /// The period (greater than zero).
    pub per: Duration,
}

/// Exponential retry backoff bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry (greater than zero).
    pub initial: Duration,
    /// Longest delay between retries (at least `initial`).
    pub max: Duration,
}

/// The payload format a listener receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerFormat {
    /// CloudEvents 1.0 structured JSON.
    CloudEvents,
}

/// One `[[monitor]]`: where alerts go and when they are raised.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorConfig {
    /// Unique monitor name (for logs).
    pub name: String,
    /// Alerts POSTed as CloudEvents JSON; `None` when `url` is absent.
    pub webhook: Option<MonitorWebhook>,
    /// Alerts sent as email over SMTP; `None` when `smtp_url` is absent.
    pub email: Option<MonitorEmail>,
    /// Alert kinds this monitor receives (default: all).
    pub on: Vec<AlertKind>,
    /// A listener whose every attempt failed for longer than this is failing (default 5m).
    pub listener_failing_for: Duration,
    /// Replication lag above this many bytes… (default 1 GiB)
    pub lag_bytes: u64,
    /// …for longer than this raises an alert (default 5m).
    pub lag_for: Duration,
    /// A listener whose oldest undelivered notification is older than this raises an alert
    /// (default 15m).
    pub queue_age: Duration,
    /// The database unreachable for longer than this raises an alert (default 1m).
    pub database_unreachable_for: Duration,
    /// Least time between two alerts with the same kind and listener (default 15m).
    pub min_interval: Duration,
}

/// The webhook side of a `[[monitor]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorWebhook {
    /// The http(s) URL alerts are POSTed to; print only `url_redacted`.
    pub url: Secret,
    /// The URL with credentials replaced by `***`.
    pub url_redacted: String,
    /// Extra HTTP headers, in file order.
    pub headers: Vec<(String, Secret)>,
    /// Standard Webhooks signing secret; `None` sends no signature.
    pub secret: Option<Secret>,
}

/// The email side of a `[[monitor]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorEmail {
    /// `smtp://host:25`, `smtps://user:pass@host:465` or `smtp://host:587?tls=required`.
    pub smtp_url: Secret,
    /// The SMTP URL with the password replaced by `***`.
    pub smtp_url_redacted: String,
    /// The sender mailbox (`walhook@example.com` or `Walhook <walhook@example.com>`).
    pub from: String,
    /// Recipient mailboxes (at least one).
    pub to: Vec<String>,
}

/// A kind of alert a monitor can subscribe to with `on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertKind {
    /// A notification was moved to `walhook.failed`.
    NotificationFailed,
    /// A listener failed continuously for longer than `listener_failing_for` (and recovered).
    ListenerFailing,
    /// Replication lag stayed above `lag_bytes` for longer than `lag_for` (and recovered).
    ReplicationLag,
    /// A listener's oldest undelivered notification is older than `queue_age` (and recovered).
    QueueAge,
    /// The database was unreachable for longer than `database_unreachable_for` (and recovered).
    DatabaseUnreachable,
}

impl AlertKind {
    /// Every kind, in the order `on` documents them.
    pub const ALL: [AlertKind; 5] = [
        AlertKind::NotificationFailed,
        AlertKind::ListenerFailing,
        AlertKind::ReplicationLag,
        AlertKind::QueueAge,
        AlertKind::DatabaseUnreachable,
    ];

    /// The name used in `on = [...]`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::NotificationFailed => "notification_failed",
            AlertKind::ListenerFailing => "listener_failing",
            AlertKind::ReplicationLag => "replication_lag",
            AlertKind::QueueAge => "queue_age",
            AlertKind::DatabaseUnreachable => "database_unreachable",
        }
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

/// Replaces the password in a connection string or URL with `***`: the `user:pass@` part
/// of a URL, secret-looking query parameters (`password=`, `token=`, …), and the `password`
/// key of a libpq `key=value` string.
pub fn redact_url(url: &str) -> String {
    match url.find("://") {
        Some(scheme_end) => {
            let (scheme, rest) = url.split_at(scheme_end + 3);
            // The last '@' ends the user info even when an unencoded password contains '@'
            // or '/': over-redacting is safe, printing a password is not.
            let (userinfo, rest) = match rest.rfind('@') {
                Some(at) => {
                    let (userinfo, host) = rest.split_at(at);
                    let userinfo = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => userinfo.to_owned(),
                    };
                    (userinfo, host)
                }
                None => (String::new(), rest),
            };
            let rest = match rest.split_once('?') {
                Some((before, query)) => {
                    let (query, fragment) = match query.split_once('#') {
                        Some((q, f)) => (q, Some(f)),
                        None => (query, None),
                    };
                    let query: Vec<String> = query
                        .split('&')
                        .map(|pair| match pair.split_once('=') {
                            Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
                            _ => pair.to_owned(),
                        })
                        .collect();
                    let mut out = format!("{before}?{}", query.join("&"));
                    if let Some(fragment) = fragment {
                        out.push('#');
                        out.push_str(fragment);
                    }
                    out
                }
                None => rest.to_owned(),
            };
            format!("{scheme}{userinfo}{rest}")
        }
        None => redact_key_values(url),
    }
}

/// Query or connection keys whose values are treated as secrets.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "token", "secret", "key", "sig", "code", "auth"]
        .iter()
        .any(|word| key.contains(word))
}

/// Redacts `password=…` in a libpq `key=value` connection string, quoted or not.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        out.push_str(&key);
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        out.push('=');
        chars.next();
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            value.push('\'');
            chars.next();
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else if c == '\'' {
                    break;
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(&value);
        }
    }
    out
}

/// Parses a duration written as a number and a unit, several allowed: `500ms`, `5s`, `10m`,
/// `2h`, `7d`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}; write a whole number and a unit (ms, s, m, h, d), like \"500ms\", \"5s\", \"10m\", \"2h\" or \"7d\""
        )
    };
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let (number, tail) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let millis = number.checked_mul(millis_per_unit).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(bad)?;
        rest = tail;
    }
    Ok(total)
}

/// Parses a rate limit written as `count/period`: `50/s`, `1000/m`, `10/h`, `100/10s`.
pub fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let bad = || {
        format!(
            "invalid rate limit {s:?}; write a count and a period, like \"50/s\", \"1000/m\" or \"10/h\""
        )
    };
    let (count, per) = s.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "rate limit {s:?} allows nothing; use a count of at least 1, or remove rate_limit for no limit"
        ));
    }
    let per = per.trim();
    let per = match per {
        "ms" | "s" | "m" | "h" | "d" => parse_duration(&format!("1{per}")),
        _ => parse_duration(per),
    }
    .map_err(|_| bad())?;
    if per.is_zero() {
        return Err(bad());
    }
    Ok(RateLimit { count, per })
}

/// Parses `schema.table` or `table` (schema `public`); either part may be double-quoted to
/// keep its case or special characters, like `"Sales"."Order"`.
pub fn parse_table_name(s: &str) -> Result<TableName, String> {
    let parts = split_identifiers(s)?;
    match parts.as_slice() {
        [name] => Ok(TableName {
            schema: "public".to_owned(),
            name: name.clone(),
        }),
        [schema, name] => Ok(TableName {
            schema: schema.clone(),
            name: name.clone(),
        }),
        _ => Err(format!(
            "table {s:?} has too many dots; write \"schema.table\" or \"table\", and double-quote a part that contains a dot"
        )),
    }
}

/// Splits a dotted SQL name into identifiers, resolving double quotes.
fn split_identifiers(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        part.push('"');
                        chars.next();
                    } else {
                        closed = true;
                        break;
                    }
                } else {
                    part.push(c);
                }
            }
            if !closed {
                return Err(format!(
                    "table {s:?} has an unterminated quoted identifier; close it with a double quote"
                ));
            }
            if part.is_empty() {
                return Err(format!(
                    "table {s:?} has an empty quoted identifier; write a name between the quotes"
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
            check_unquoted_identifier(s, &part)?;
        }
        if part.len() > 63 {
            return Err(format!(
                "table {s:?} has an identifier longer than 63 bytes; PostgreSQL truncates such names, use the name as stored in the catalog"
            ));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(_) => {
                return Err(format!(
                    "table {s:?} has text after a quoted identifier; write \"schema\".\"table\""
                ));
            }
        }
    }
}

/// PostgreSQL folds unquoted identifiers to lower case; rather than guess, mixed case is
/// refused with the two spellings that mean something definite.
fn check_unquoted_identifier(whole: &str, part: &str) -> Result<(), String> {
    let mut chars = part.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$'))
    {
        return Err(format!(
            "table {whole:?} is not a valid name; write \"schema.table\" or \"table\" with letters, digits and '_', and double-quote other names like '\"My Table\"'"
        ));
    }
    if part.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!(
            "table {whole:?} has upper-case letters in the unquoted name {part:?}, which PostgreSQL folds to {:?}; write it in lower case, or double-quote it ('\"{part}\"') if the table was created with that exact case",
            part.to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// The placeholders of a subject template (`{id}`, `{column}`), or why it is malformed.
pub fn subject_placeholders(template: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        match c {
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    match c {
                        '}' => {
                            closed = true;
                            break;
                        }
                        '{' => {
                            return Err(format!(
                                "subject {template:?} has '{{' inside a placeholder; close each placeholder with '}}', like \"Customer/{{id}}\""
                            ));
                        }
                        _ => name.push(c),
                    }
                }
                if !closed {
                    return Err(format!(
                        "subject {template:?} has an unclosed '{{'; close each placeholder with '}}', like \"Customer/{{id}}\""
                    ));
                }
                if name.trim().is_empty() {
                    return Err(format!(
                        "subject {template:?} has an empty placeholder {{}}; write {{id}} or {{column_name}}"
                    ));
                }
                names.push(name);
            }
            '}' => {
                return Err(format!(
                    "subject {template:?} has a '}}' without a matching '{{'; write placeholders as {{id}} or {{column_name}}"
                ));
            }
            _ => {}
        }
    }
    Ok(names)
}

/// Replaces `${NAME}` with the variable's value; `$${` stands for a literal `${`.
fn substitute(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(dollar) = rest.find('$') {
        let (before, from_dollar) = rest.split_at(dollar);
        out.push_str(before);
        if let Some(after) = from_dollar.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = from_dollar.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err((
                    "unterminated ${ in the value".to_owned(),
                    "close the variable with }, like ${NAME}, or write $${ for a literal ${"
                        .to_owned(),
                ));
            };
            let (name, tail) = after.split_at(end);
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err((
                    format!("${{{name}}} is not a valid environment variable name"),
                    "use letters, digits and '_' like ${DB_PASSWORD}, or write $${ for a literal ${"
                        .to_owned(),
                ));
            }
            match env(name) {
                Some(value) => out.push_str(&value),
                None => {
                    return Err((
                        format!("environment variable {name} is not set"),
                        format!(
                            "set {name} in walhook's environment (e.g. Environment= or EnvironmentFile= in the systemd unit), or write $${{ for a literal ${{"
                        ),
                    ));
                }
            }
            rest = tail.get(1..).unwrap_or("");
        } else {
            out.push('$');
            rest = from_dollar.get(1..).unwrap_or("");
        }
    }
    out.push_str(rest);
    Ok(out)
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Str,
    password: Str,
    password_file: Str,
    slot: Str,
    publication: Str,
    create_publication: Option<Spanned<bool>>,
    system_name: Str,
    heartbeat: Str,
    status_interval: Str,
    wal_warning: Option<Spanned<RawSize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    retention: Str,
    batch_size: Option<Spanned<i64>>,
    batch_delay: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Str,
    token_file: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntity {
    name: Str,
    table: Str,
    id: StrList,
    actions: StrList,
    track: StrList,
    exclude: StrList,
    subject: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Str,
    url: Str,
    entities: StrList,
    actions: StrList,
    headers: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    secret: Str,
    timeout: Str,
    rate_limit: Str,
    max_attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<RawBackoff>>,
    concurrency: Option<Spanned<i64>>,
    debounce: Str,
    format: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Str,
    max: Str,
}

type RawHeaders = Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    name: Str,
    url: Str,
    headers: RawHeaders,
    secret: Str,
    smtp_url: Str,
    from: Str,
    to: StrList,
    on: StrList,
    listener_failing_for: Str,
    lag_bytes: Option<Spanned<RawSize>>,
    lag_for: Str,
    queue_age: Str,
    database_unreachable_for: Str,
    min_interval: Str,
}

/// A byte count written as a number or as a string with a unit ("1GB").
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

// ---------------------------------------------------------------------------------------
// Positions and the errors serde reports.

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// A TOML syntax error as one line.
fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> String {
    let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
    format!(
        "{file}:{line}:{column}: invalid TOML: {}; fix the syntax at this position",
        e.message()
    )
}

/// An unknown key or a wrong type, as one line with the key path found from the span.
fn serde_error(
    text: &str,
    file: &str,
    tree: &Spanned<toml::de::DeTable<'_>>,
    e: &toml::de::Error,
) -> String {
    let at = e.span().map_or(0, |s| s.start);
    let (line, column) = line_column(text, at);
    let path = key_path_at(tree.get_ref(), at).unwrap_or_default();
    let key = if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path.clone()
    };
    let message = e.message();
    let last = path.rsplit('.').next().unwrap_or("");
    let problem = if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest
            .split_once(", ")
            .map_or("", |(_, e)| e)
            .replace('`', "");
        if expected.is_empty() {
            "unknown key; remove it".to_owned()
        } else {
            format!("unknown key; {expected}")
        }
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest
            .split_once(", expected ")
            .unwrap_or((rest, "another type"));
        let found = if is_secret_path(&path) {
            found.split(' ').next().unwrap_or(found).to_owned()
        } else {
            found.replace('`', "")
        };
        let fix = if matches!(
            last.split('[').next(),
            Some("entity" | "listener" | "monitor")
        ) && expected.contains("sequence")
        {
            format!(
                "write [[{}]] with double brackets",
                last.split('[').next().unwrap_or(last)
            )
        } else if expected == "a string" {
            "write the value in double quotes".to_owned()
        } else {
            format!("write {expected}")
        };
        format!("wrong type: found {found}, expected {expected}; {fix}")
    } else if is_secret_path(&path) {
        "invalid value; check this key's value".to_owned()
    } else {
        format!("{message}; check this key's value")
    };
    format!("{file}:{line}:{column}: {key}: {problem}")
}

/// Keys whose values are secrets and so never echoed in messages.
fn is_secret_path(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or("");
    matches!(last, "password" | "url" | "secret" | "smtp_url") || path.contains(".headers")
}

/// The dotted key path (`entity[1].colour`) of the innermost key or value at `at`.
fn key_path_at(table: &toml::de::DeTable<'_>, at: usize) -> Option<String> {
    fn in_table(table: &toml::de::DeTable<'_>, at: usize) -> Option<String> {
        for (key, value) in table {
            let name = display_key(key.get_ref());
            if key.span().contains(&at) {
                return Some(name);
            }
            if let Some(rest) = in_value(value.get_ref(), at) {
                return Some(format!("{name}{rest}"));
            }
            if value.span().contains(&at) {
                return Some(name);
            }
        }
        None
    }
    fn in_value(value: &toml::de::DeValue<'_>, at: usize) -> Option<String> {
        match value {
            toml::de::DeValue::Table(table) => in_table(table, at).map(|p| format!(".{p}")),
            toml::de::DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(rest) = in_value(item.get_ref(), at) {
                        return Some(format!("[{i}]{rest}"));
                    }
                    if item.span().contains(&at) {
                        return Some(format!("[{i}]"));
                    }
                }
                None
            }
            _ => None,
        }
    }
    in_table(table, at)
}

/// A key as written in a path: bare when it can be, quoted otherwise.
fn display_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

// ---------------------------------------------------------------------------------------
// The checker: converts raw values to typed ones, collecting every problem.

const DEFAULT_SLOT: &str = "walhook";
const DEFAULT_PUBLICATION: &str = "walhook";
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_WAL_WARNING: u64 = 1024 * 1024 * 1024;
const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);
const DEFAULT_BATCH_SIZE: usize = 5000;
const MAX_BATCH_SIZE: i64 = 100_000;
const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(20);
const MAX_BATCH_DELAY: Duration = Duration::from_secs(10);
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_ATTEMPTS: u32 = 12;
const MAX_MAX_ATTEMPTS: i64 = 1000;
const DEFAULT_CONCURRENCY: usize = 16;
const MAX_CONCURRENCY: i64 = 1000;
const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(3600),
};
/// Headers walhook sets itself; a configured value would be overwritten or break delivery.
const RESERVED_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

struct Checker<'a> {
    text: &'a str,
    file: String,
    dir: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<(usize, String)>,
}

impl Checker<'_> {
    fn report(&mut self, at: usize, key: &str, problem: &str, fix: &str) {
        let (line, column) = line_column(self.text, at);
        self.errors.push((
            at,
            format!("{}:{line}:{column}: {key}: {problem}; {fix}", self.file),
        ));
    }

    /// Reports a message that already has the `problem; fix` form.
    fn report_message(&mut self, at: usize, key: &str, message: &str) {
        let (line, column) = line_column(self.text, at);
        self.errors.push((
            at,
            format!("{}:{line}:{column}: {key}: {message}", self.file),
        ));
    }

    /// The string after `${ENV}` substitution; `None` (reported) when substitution fails.
    fn string(&mut self, value: &Spanned<String>, key: &str) -> Option<String> {
        match substitute(value.get_ref(), self.env) {
            Ok(s) => Some(s),
            Err((problem, fix)) => {
                self.report(value.span().start, key, &problem, &fix);
                None
            }
        }
    }

    fn duration(&mut self, value: &Str, key: &str, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        let Some(s) = self.string(value, key) else {
            return default;
        };
        match parse_duration(s.trim()) {
            Ok(d) => d,
            Err(message) => {
                self.report_message(value.span().start, key, &message);
                default
            }
        }
    }

    /// A required, non-empty string.
    fn required(
        &mut self,
        value: &Str,
        key: &str,
        section_at: usize,
        example: &str,
    ) -> Option<String> {
        match value {
            None => {
                let name = key.rsplit('.').next().unwrap_or(key);
                self.report(
                    section_at,
                    key,
                    "missing key",
                    &format!("add {name} = {example}"),
                );
                None
            }
            Some(v) => {
                let s = self.string(v, key)?;
                if s.trim().is_empty() {
                    let name = key.rsplit('.').next().unwrap_or(key);
                    self.report(
                        v.span().start,
                        key,
                        "must not be empty",
                        &format!("write {name} = {example}"),
                    );
                    return None;
                }
                Some(s)
            }
        }
    }

    fn config(&mut self, raw: RawConfig, path: &Path) -> Config {
        let source = self.source(raw.source.as_ref());
        let queue = self.queue(raw.queue.as_ref());
        let admin = raw.admin.as_ref().map(|a| self.admin(a));
        let entities = self.entities(&raw.entity);
        let listeners = self.listeners(&raw.listener, &entities);
        let monitors = self.monitors(&raw.monitor);
        Config {
            path: path.to_owned(),
            source,
            queue,
            entities,
            admin,
            listeners,
            monitors,
        }
    }

    fn source(&mut self, raw: Option<&Spanned<RawSource>>) -> SourceConfig {
        let Some(raw) = raw else {
            self.report(
                0,
                "source",
                "missing section [source]",
                "add [source] with url = \"postgres://user@host:5432/dbname\"",
            );
            return SourceConfig {
                url: Secret::new(String::new()),
                url_redacted: String::new(),
                password: None,
                slot: DEFAULT_SLOT.to_owned(),
                publication: DEFAULT_PUBLICATION.to_owned(),
                create_publication: true,
                system_name: None,
                heartbeat: Some(DEFAULT_HEARTBEAT),
                status_interval: DEFAULT_STATUS_INTERVAL,
                wal_warning_bytes: DEFAULT_WAL_WARNING,
            };
        };
        let at = raw.span().start;
        let raw = raw.get_ref();

        let url = self
            .required(
                &raw.url,
                "source.url",
                at,
                "\"postgres://user@host:5432/dbname\"",
            )
            .unwrap_or_default();
        if let Some(span) = raw.url.as_ref().map(Spanned::span)
            && !url.is_empty()
        {
            let lower = url.to_ascii_lowercase();
            let is_url = lower.starts_with("postgres://") || lower.starts_with("postgresql://");
            if !is_url && !url.contains('=') {
                self.report(
                    span.start,
                    "source.url",
                    "not a PostgreSQL connection string",
                    "write a URL like \"postgres://user@host:5432/dbname\" or key=value pairs like \"host=localhost dbname=app user=walhook\"",
                );
            }
        }
        let url_redacted = redact_url(&url);

        let password = match (&raw.password, &raw.password_file) {
            (Some(_), Some(file)) => {
                self.report(
                    file.span().start,
                    "source.password_file",
                    "both password and password_file are set",
                    "keep only one of them",
                );
                None
            }
            (Some(p), None) => self.string(p, "source.password").map(Secret::new),
            (None, Some(file)) => self.password_file(file),
            (None, None) => None,
        };

        let slot = match &raw.slot {
            None => DEFAULT_SLOT.to_owned(),
            Some(v) => match self.string(v, "source.slot") {
                // Already reported; the default keeps the remaining checks going.
                None => DEFAULT_SLOT.to_owned(),
                Some(s) => {
                    let ok = !s.is_empty()
                        && s.len() <= 63
                        && s.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if !ok {
                        self.report(
                            v.span().start,
                            "source.slot",
                            &format!("invalid replication slot name {s:?}"),
                            "use 1 to 63 lower-case letters, digits and '_' (PostgreSQL's rule), like \"walhook\"",
                        );
                    }
                    s
                }
            },
        };

        let publication = match &raw.publication {
            None => DEFAULT_PUBLICATION.to_owned(),
            Some(v) => match self.string(v, "source.publication") {
                None => DEFAULT_PUBLICATION.to_owned(),
                Some(s) => {
                    if s.is_empty() || s.len() > 63 {
                        self.report(
                            v.span().start,
                            "source.publication",
                            &format!("invalid publication name {s:?}"),
                            "use a name of 1 to 63 bytes, like \"walhook\"",
                        );
                    }
                    s
                }
            },
        };

        let system_name = match &raw.system_name {
            None => None,
            Some(v) => {
                let s = self.string(v, "source.system_name");
                if s.as_deref().is_some_and(|s| s.trim().is_empty()) {
                    self.report(
                        v.span().start,
                        "source.system_name",
                        "must not be empty",
                        "write a name like \"CRM\", or remove the key to use the database name",
                    );
                }
                s
            }
        };

        let heartbeat = match &raw.heartbeat {
            None => Some(DEFAULT_HEARTBEAT),
            Some(v) => match self.string(v, "source.heartbeat") {
                Some(s) if s.trim() == "off" => None,
                Some(s) => match parse_duration(s.trim()) {
                    Ok(d) => Some(d),
                    Err(message) => {
                        self.report_message(
                            v.span().start,
                            "source.heartbeat",
                            &format!("{message}, or \"off\""),
                        );
                        None
                    }
                },
                None => None,
            },
        }
        .filter(|d| !d.is_zero());

        let status_interval = self.duration(
            &raw.status_interval,
            "source.status_interval",
            DEFAULT_STATUS_INTERVAL,
        );
        if let Some(v) = &raw.status_interval
            && (status_interval.is_zero() || status_interval > MAX_STATUS_INTERVAL)
        {
            self.report(
                v.span().start,
                "source.status_interval",
                &format!("{} is out of range", v.get_ref()),
                "use a duration above 0 and at most \"10s\", so the server does not time the connection out",
            );
        }

        SourceConfig {
            url: Secret::new(url),
            url_redacted,
            password,
            slot,
            publication,
            create_publication: raw.create_publication.as_ref().is_none_or(|b| *b.get_ref()),
            system_name,
            heartbeat,
            status_interval,
            wal_warning_bytes: self.size(
                &raw.wal_warning,
                "source.wal_warning",
                DEFAULT_WAL_WARNING,
            ),
        }
    }

    /// Checks a listener or monitor name: up to 63 letters, digits, '_', '-' or '.',
    /// starting with a letter or digit, and not used twice in its section.
    fn unique_name(
        &mut self,
        section: &str,
        name: &str,
        at: usize,
        key: &str,
        names: &mut std::collections::HashSet<String>,
    ) {
        let ok = name.len() <= 63
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            self.report(
                at,
                key,
                &format!("invalid {section} name {name:?}"),
                "use up to 63 letters, digits, '_', '-' or '.', starting with a letter or digit",
            );
        } else if !names.insert(name.to_owned()) {
            self.report(
                at,
                key,
                &format!("{section} {name:?} is defined twice"),
                &format!("give each [[{section}]] its own name"),
            );
        }
    }

    /// A byte size given as a number or as text like "1GB"; must be above 0.
    fn size(&mut self, v: &Option<Spanned<RawSize>>, key: &str, default: u64) -> u64 {
        let Some(v) = v else {
            return default;
        };
        let parsed = match v.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            RawSize::Text(t) => match substitute(t, self.env) {
                Ok(t) => parse_size(t.trim()),
                Err((problem, _)) => Err(problem),
            },
        };
        match parsed {
            Ok(0) | Err(_) => {
                let problem = parsed
                    .err()
                    .unwrap_or_else(|| format!("{key} must be above 0"));
                self.report(
                    v.span().start,
                    key,
                    &problem,
                    "use a byte count like 1073741824 or a size like \"1GB\" or \"512MB\" (units B, kB, MB, GB, TB; 1 kB = 1024 bytes)",
                );
                default
            }
            Ok(n) => n,
        }
    }

    fn password_file(&mut self, file: &Spanned<String>) -> Option<Secret> {
        self.secret_file(file, "source.password_file", "the password")
    }

    /// Reads a secret from the file named at `file` (relative to the config file), without
    /// its final line break; `what` names the secret in the fix.
    fn secret_file(&mut self, file: &Spanned<String>, key: &str, what: &str) -> Option<Secret> {
        let name = self.string(file, key)?;
        let path = self.dir.join(&name);
        match std::fs::read_to_string(&path) {
            Ok(content) => {
                let password = content
                    .strip_suffix('\n')
                    .map(|s| s.strip_suffix('\r').unwrap_or(s))
                    .unwrap_or(&content);
                if password.is_empty() {
                    self.report(
                        file.span().start,
                        key,
                        &format!("{} is empty", path.display()),
                        &format!("write {what} into the file, or remove the key"),
                    );
                    return None;
                }
                Some(Secret::new(password.to_owned()))
            }
            Err(e) => {
                self.report(
                    file.span().start,
                    key,
                    &format!("cannot read {}: {e}", path.display()),
                    "check the path (relative paths start at the config file's directory) and that walhook's user may read it",
                );
                None
            }
        }
    }

    fn queue(&mut self, raw: Option<&Spanned<RawQueue>>) -> QueueConfig {
        let Some(raw) = raw else {
            return QueueConfig {
                retention: DEFAULT_RETENTION,
                batch_size: DEFAULT_BATCH_SIZE,
                batch_delay: DEFAULT_BATCH_DELAY,
            };
        };
        let raw = raw.get_ref();
        let retention = self.duration(&raw.retention, "queue.retention", DEFAULT_RETENTION);
        if let Some(v) = &raw.retention
            && retention.is_zero()
        {
            self.report(
                v.span().start,
                "queue.retention",
                "retention must be above 0",
                "use a duration like \"7d\"",
            );
        }
        let batch_size = self.count(
            &raw.batch_size,
            "queue.batch_size",
            MAX_BATCH_SIZE,
            DEFAULT_BATCH_SIZE,
        );
        let batch_delay = self.duration(&raw.batch_delay, "queue.batch_delay", DEFAULT_BATCH_DELAY);
        if let Some(v) = &raw.batch_delay
            && batch_delay > MAX_BATCH_DELAY
        {
            self.report(
                v.span().start,
                "queue.batch_delay",
                &format!("{} is too long", v.get_ref()),
                "use at most \"10s\" (default \"20ms\")",
            );
        }
        QueueConfig {
            retention,
            batch_size,
            batch_delay,
        }
    }

    fn admin(&mut self, raw: &Spanned<RawAdmin>) -> AdminConfig {
        let default = SocketAddr::from(([127, 0, 0, 1], 9187));
        let token = raw.get_ref().token_file.as_ref().and_then(|file| {
            let token = self.secret_file(file, "admin.token_file", "the console token")?;
            if token.expose().len() < MIN_ADMIN_TOKEN_BYTES {
                self.report(
                    file.span().start,
                    "admin.token_file",
                    &format!("the token is shorter than {MIN_ADMIN_TOKEN_BYTES} bytes"),
                    "write a long random token into the file, e.g. `openssl rand -base64 32`",
                );
                return None;
            }
            Some(token)
        });
        let listen = match &raw.get_ref().listen {
            None => default,
            Some(v) => match self.string(v, "admin.listen") {
                None => default,
                Some(s) => s.trim().parse().unwrap_or_else(|_| {
                    self.report(
                        v.span().start,
                        "admin.listen",
                        &format!("invalid address {s:?}"),
                        &format!("write an IP address and port, like \"{DEFAULT_ADMIN_LISTEN}\" or \"[::1]:9187\""),
                    );
                    default
                }),
            },
        };
        AdminConfig { listen, token }
    }

    fn actions(&mut self, raw: &StrList, key: &str) -> Vec<Action> {
        let Some(list) = raw else {
            return Action::ALL.to_vec();
        };
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                key,
                "actions is empty",
                "list at least one of created, updated, deleted, or remove the key for all three",
            );
            return Action::ALL.to_vec();
        }
        let mut actions = Vec::new();
        for (i, item) in list.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            let action = Action::ALL
                .into_iter()
                .find(|a| a.config_name() == s.trim());
            match action {
                None => self.report(
                    item.span().start,
                    &item_key,
                    &format!("unknown action {s:?}"),
                    "use created, updated or deleted",
                ),
                Some(a) if actions.contains(&a) => self.report(
                    item.span().start,
                    &item_key,
                    &format!("action {s:?} is listed twice"),
                    "remove the duplicate",
                ),
                Some(a) => actions.push(a),
            }
        }
        actions
    }

    /// A list of column names: each non-empty, none twice.
    fn columns(&mut self, raw: &Spanned<Vec<Spanned<String>>>, key: &str) -> Vec<(String, usize)> {
        let mut columns: Vec<(String, usize)> = Vec::new();
        for (i, item) in raw.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            if s.is_empty() {
                self.report(
                    item.span().start,
                    &item_key,
                    "empty column name",
                    "write the column name as stored in the table",
                );
            } else if columns.iter().any(|(c, _)| *c == s) {
                self.report(
                    item.span().start,
                    &item_key,
                    &format!("column {s:?} is listed twice"),
                    "remove the duplicate",
                );
            } else {
                columns.push((s, item.span().start));
            }
        }
        columns
    }

    fn entities(&mut self, raw: &[Spanned<RawEntity>]) -> Vec<EntityConfig> {
        if raw.is_empty() {
            self.report(
                self.text.len(),
                "entity",
                "no [[entity]] is configured, so nothing would be captured",
                "add an [[entity]] section with name = \"Customer\" and table = \"public.customer\"",
            );
        }
        let mut entities: Vec<EntityConfig> = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for (i, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let e = spanned.get_ref();
            let key = |k: &str| format!("entity[{i}].{k}");

            let name = match self.required(&e.name, &key("name"), at, "\"Customer\"") {
                Some(s) => match EntityName::new(&s) {
                    Ok(n) => {
                        if !names.insert(n.as_str().to_owned()) {
                            let span = e.name.as_ref().map_or(at, |v| v.span().start);
                            self.report(
                                span,
                                &key("name"),
                                &format!("entity {s:?} is defined twice"),
                                "give each [[entity]] its own name",
                            );
                        }
                        Some(n)
                    }
                    Err(problem) => {
                        let span = e.name.as_ref().map_or(at, |v| v.span().start);
                        self.report(
                            span,
                            &key("name"),
                            &problem,
                            "rename it, like \"Customer\" or \"SalesOrder\"",
                        );
                        None
                    }
                },
                None => None,
            };

            let table = match self.required(&e.table, &key("table"), at, "\"public.customer\"") {
                Some(s) => match parse_table_name(s.trim()) {
                    Ok(t) => {
                        let span = e.table.as_ref().map_or(at, |v| v.span().start);
                        if let Some(other) = entities.iter().find(|o| o.table == t) {
                            self.report(
                                span,
                                &key("table"),
                                &format!("table {t} already backs entity {}", other.name),
                                "capture a table as one entity only; use subject or listener filters to tell cases apart",
                            );
                        }
                        Some(t)
                    }
                    Err(message) => {
                        let span = e.table.as_ref().map_or(at, |v| v.span().start);
                        self.report_message(span, &key("table"), &message);
                        None
                    }
                },
                None => None,
            };

            let id = e.id.as_ref().map(|list| {
                if list.get_ref().is_empty() {
                    self.report(
                        list.span().start,
                        &key("id"),
                        "id lists no columns",
                        "list the id columns, or remove id to use the primary key",
                    );
                }
                self.columns(list, &key("id"))
            });
            let track = e.track.as_ref().map(|list| {
                if list.get_ref().is_empty() {
                    self.report(
                        list.span().start,
                        &key("track"),
                        "track lists no columns, so no update would ever emit an event",
                        "list the columns whose changes matter, or remove track to emit every update",
                    );
                }
                self.columns(list, &key("track"))
            });
            let exclude = e
                .exclude
                .as_ref()
                .map(|list| self.columns(list, &key("exclude")))
                .unwrap_or_default();
            for (column, col_at) in id.iter().flatten() {
                if exclude.iter().any(|(c, _)| c == column) {
                    self.report(
                        *col_at,
                        &key("id"),
                        &format!("id column {column:?} is also excluded"),
                        "remove it from exclude or from id; events need their id",
                    );
                }
            }
            let actions = self.actions(&e.actions, &key("actions"));

            let subject = match &e.subject {
                None => None,
                Some(v) => self.string(v, &key("subject")).inspect(|s| {
                    match subject_placeholders(s) {
                        Ok(placeholders) => {
                            for p in placeholders {
                                if exclude.iter().any(|(c, _)| *c == p) {
                                    self.report(
                                        v.span().start,
                                        &key("subject"),
                                        &format!("placeholder {{{p}}} names an excluded column"),
                                        "excluded columns must not leave the database; use {id} or another column",
                                    );
                                }
                            }
                        }
                        Err(message) => self.report_message(v.span().start, &key("subject"), &message),
                    }
                }),
            };

            if let (Some(name), Some(table)) = (name, table) {
                entities.push(EntityConfig {
                    name,
                    table,
                    id: id.map(|cols| cols.into_iter().map(|(c, _)| c).collect()),
                    actions,
                    track: track.map(|cols| cols.into_iter().map(|(c, _)| c).collect()),
                    exclude: exclude.into_iter().map(|(c, _)| c).collect(),
                    subject,
                });
            }
        }
        entities
    }

    fn listeners(
        &mut self,
        raw: &[Spanned<RawListener>],
        entities: &[EntityConfig],
    ) -> Vec<ListenerConfig> {
        let mut listeners = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for (i, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let l = spanned.get_ref();
            let key = |k: &str| format!("listener[{i}].{k}");

            let name = self.required(&l.name, &key("name"), at, "\"crm\"");
            if let (Some(name), Some(v)) = (&name, &l.name) {
                self.unique_name("listener", name, v.span().start, &key("name"), &mut names);
            }

            let url = self.http_url(
                &l.url,
                &key("url"),
                at,
                "\"https://example.com/hooks/walhook\"",
            );

            let listener_entities = l.entities.as_ref().map(|list| {
                if list.get_ref().is_empty() {
                    self.report(
                        list.span().start,
                        &key("entities"),
                        "entities is empty, so this listener would receive nothing",
                        "list entity names, or remove entities to receive all",
                    );
                }
                let mut chosen: Vec<EntityName> = Vec::new();
                for (j, item) in list.get_ref().iter().enumerate() {
                    let item_key = format!("{}[{j}]", key("entities"));
                    let Some(s) = self.string(item, &item_key) else {
                        continue;
                    };
                    match entities.iter().find(|e| e.name.as_str() == s) {
                        None => {
                            let known: Vec<&str> =
                                entities.iter().map(|e| e.name.as_str()).collect();
                            self.report(
                                item.span().start,
                                &item_key,
                                &format!("no [[entity]] is named {s:?}"),
                                &format!(
                                    "use one of the configured entities: {}",
                                    known.join(", ")
                                ),
                            );
                        }
                        Some(e) if chosen.contains(&e.name) => self.report(
                            item.span().start,
                            &item_key,
                            &format!("entity {s:?} is listed twice"),
                            "remove the duplicate",
                        ),
                        Some(e) => chosen.push(e.name.clone()),
                    }
                }
                chosen
            });

            let actions = self.actions(&l.actions, &key("actions"));
            let headers = self.header_map(&l.headers, &key("headers"));
            let secret = self.signing_secret(&l.secret, &key("secret"));

            let timeout = self.duration(&l.timeout, &key("timeout"), DEFAULT_TIMEOUT);
            if let Some(v) = &l.timeout
                && timeout.is_zero()
            {
                self.report(
                    v.span().start,
                    &key("timeout"),
                    "timeout must be above 0",
                    "use a duration like \"10s\"",
                );
            }

            let rate_limit = match &l.rate_limit {
                None => None,
                Some(v) => self
                    .string(v, &key("rate_limit"))
                    .and_then(|s| match parse_rate_limit(s.trim()) {
                        Ok(r) => Some(r),
                        Err(message) => {
                            self.report_message(v.span().start, &key("rate_limit"), &message);
                            None
                        }
                    }),
            };

            let max_attempts = self.count(
                &l.max_attempts,
                &key("max_attempts"),
                MAX_MAX_ATTEMPTS,
                DEFAULT_MAX_ATTEMPTS,
            );

            let backoff = match &l.backoff {
                None => DEFAULT_BACKOFF,
                Some(b) => {
                    let raw_b = b.get_ref();
                    let initial = self.duration(
                        &raw_b.initial,
                        &key("backoff.initial"),
                        DEFAULT_BACKOFF.initial,
                    );
                    let max = self.duration(
                        &raw_b.max,
                        &key("backoff.max"),
                        DEFAULT_BACKOFF.max.max(initial),
                    );
                    if initial.is_zero() {
                        let span = raw_b
                            .initial
                            .as_ref()
                            .map_or(b.span().start, |v| v.span().start);
                        self.report(
                            span,
                            &key("backoff.initial"),
                            "initial backoff must be above 0",
                            "use a duration like \"5s\"",
                        );
                    } else if max < initial {
                        let span = raw_b
                            .max
                            .as_ref()
                            .map_or(b.span().start, |v| v.span().start);
                        self.report(
                            span,
                            &key("backoff.max"),
                            "max backoff is shorter than initial",
                            "make max at least as long as initial",
                        );
                    }
                    Backoff { initial, max }
                }
            };

            let concurrency = self.count(
                &l.concurrency,
                &key("concurrency"),
                MAX_CONCURRENCY,
                DEFAULT_CONCURRENCY,
            );

            let debounce = self.duration(&l.debounce, &key("debounce"), Duration::ZERO);
            // Not built yet: a window that silently did nothing would surprise a listener
            // that relies on coalescing.
            if !debounce.is_zero()
                && let Some(v) = &l.debounce
            {
                self.report(
                    v.span().start,
                    &key("debounce"),
                    "debounce is not supported yet",
                    "remove debounce or set debounce = \"0s\"; every change is delivered on its own",
                );
            }

            let format = match &l.format {
                None => ListenerFormat::CloudEvents,
                Some(v) => {
                    let s = self.string(v, &key("format"));
                    match s.as_deref().map(str::trim).unwrap_or("cloudevents") {
                        "cloudevents" => {}
                        "eventgrid" | "servicebus" | "form" | "template" => self.report(
                            v.span().start,
                            &key("format"),
                            &format!(
                                "format {:?} is not supported yet",
                                s.as_deref().unwrap_or_default()
                            ),
                            "use format = \"cloudevents\"",
                        ),
                        _ => self.report(
                            v.span().start,
                            &key("format"),
                            &format!("unknown format {:?}", s.as_deref().unwrap_or_default()),
                            "use format = \"cloudevents\"",
                        ),
                    }
                    ListenerFormat::CloudEvents
                }
            };

            if let (Some(name), Some(url)) = (name, url) {
                listeners.push(ListenerConfig {
                    name,
                    url_redacted: redact_url(&url),
                    url: Secret::new(url),
                    entities: listener_entities,
                    actions,
                    headers,
                    secret,
                    timeout,
                    rate_limit,
                    max_attempts,
                    backoff,
                    concurrency,
                    debounce,
                    format,
                });
            }
        }
        listeners
    }

    fn header_map(&mut self, raw: &RawHeaders, key: &str) -> Vec<(String, Secret)> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let mut pairs: Vec<(&Spanned<String>, &Spanned<String>)> = raw.get_ref().iter().collect();
        pairs.sort_by_key(|(name, _)| name.span().start);
        let mut headers: Vec<(String, Secret)> = Vec::new();
        for (name, value) in pairs {
            let header_key = format!("{key}.{}", display_key(name.get_ref()));
            let n = name.get_ref();
            if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                self.report(
                    name.span().start,
                    &header_key,
                    &format!("invalid header name {n:?}"),
                    "use only letters, digits and dashes, like \"X-Api-Key\"",
                );
                continue;
            }
            if RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(n)) {
                self.report(
                    name.span().start,
                    &header_key,
                    &format!("header {n:?} is set by walhook"),
                    "remove it",
                );
                continue;
            }
            if headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(n)) {
                self.report(
                    name.span().start,
                    &header_key,
                    &format!("header {n:?} is listed twice (header names ignore case)"),
                    "keep one of them",
                );
                continue;
            }
            let Some(v) = self.string(value, &header_key) else {
                continue;
            };
            if v.contains(['\r', '\n']) {
                self.report(
                    value.span().start,
                    &header_key,
                    "header value contains a line break",
                    "remove the line break from the value",
                );
                continue;
            }
            headers.push((n.clone(), Secret::new(v)));
        }
        headers
    }
}

impl Checker<'_> {
    /// A required http(s) URL (listener or monitor webhook); `None` (reported) otherwise.
    fn http_url(
        &mut self,
        value: &Str,
        key: &str,
        section_at: usize,
        example: &str,
    ) -> Option<String> {
        let url = self.required(value, key, section_at, example)?;
        match check_http_url(&url) {
            Ok(()) => Some(url),
            Err(problem) => {
                let at = value.as_ref().map_or(section_at, |v| v.span().start);
                self.report(
                    at,
                    key,
                    &problem,
                    &format!("write an http:// or https:// URL like {example}"),
                );
                None
            }
        }
    }

    /// A Standard Webhooks signing secret, checked the way delivery parses it.
    fn signing_secret(&mut self, value: &Str, key: &str) -> Option<Secret> {
        let v = value.as_ref()?;
        let s = self.string(v, key)?;
        match crate::delivery::signature::SigningKey::parse(&s) {
            Ok(_) => Some(Secret::new(s)),
            Err(e) => {
                self.report_message(v.span().start, key, &e.to_string());
                None
            }
        }
    }

    /// An integer from 1 to `max`; `default` when absent, reported when out of range.
    fn count<T: TryFrom<i64> + std::fmt::Display + Copy>(
        &mut self,
        value: &Option<Spanned<i64>>,
        key: &str,
        max: i64,
        default: T,
    ) -> T {
        let Some(v) = value else {
            return default;
        };
        let n = *v.get_ref();
        match T::try_from(n) {
            Ok(c) if (1..=max).contains(&n) => c,
            _ => {
                self.report(
                    v.span().start,
                    key,
                    &format!("{n} is out of range"),
                    &format!("use a number from 1 to {max} (default {default})"),
                );
                default
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// [[monitor]]

const DEFAULT_LISTENER_FAILING_FOR: Duration = Duration::from_secs(5 * 60);
const DEFAULT_LAG_BYTES: u64 = 1024 * 1024 * 1024;
const DEFAULT_LAG_FOR: Duration = Duration::from_secs(5 * 60);
const DEFAULT_QUEUE_AGE: Duration = Duration::from_secs(15 * 60);
const DEFAULT_DATABASE_UNREACHABLE_FOR: Duration = Duration::from_secs(60);
const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(15 * 60);

impl Checker<'_> {
    fn monitors(&mut self, raw: &[Spanned<RawMonitor>]) -> Vec<MonitorConfig> {
        let mut monitors = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for (i, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let m = spanned.get_ref();
            let key = |k: &str| format!("monitor[{i}].{k}");

            let name = self.required(&m.name, &key("name"), at, "\"ops\"");
            if let (Some(name), Some(v)) = (&name, &m.name) {
                self.unique_name("monitor", name, v.span().start, &key("name"), &mut names);
            }

            if m.url.is_none() && m.smtp_url.is_none() {
                self.report(
                    at,
                    &format!("monitor[{i}]"),
                    "the monitor has neither url nor smtp_url, so its alerts go nowhere",
                    "add url = \"https://ops.example.com/walhook-alerts\" for a webhook, smtp_url = \"smtp://mail.example.com:25\" with from and to for email, or both",
                );
            }
            let webhook = self.monitor_webhook(m, &key);
            let email = self.monitor_email(m, at, &key);
            let on = self.alert_kinds(&m.on, &key("on"));

            let listener_failing_for = self.duration(
                &m.listener_failing_for,
                &key("listener_failing_for"),
                DEFAULT_LISTENER_FAILING_FOR,
            );
            let lag_bytes = self.size(&m.lag_bytes, &key("lag_bytes"), DEFAULT_LAG_BYTES);
            let lag_for = self.duration(&m.lag_for, &key("lag_for"), DEFAULT_LAG_FOR);
            let queue_age = self.duration(&m.queue_age, &key("queue_age"), DEFAULT_QUEUE_AGE);
            let database_unreachable_for = self.duration(
                &m.database_unreachable_for,
                &key("database_unreachable_for"),
                DEFAULT_DATABASE_UNREACHABLE_FOR,
            );
            let min_interval =
                self.duration(&m.min_interval, &key("min_interval"), DEFAULT_MIN_INTERVAL);

            if let Some(name) = name
                && (webhook.is_some() || email.is_some())
            {
                monitors.push(MonitorConfig {
                    name,
                    webhook,
                    email,
                    on,
                    listener_failing_for,
                    lag_bytes,
                    lag_for,
                    queue_age,
                    database_unreachable_for,
                    min_interval,
                });
            }
        }
        monitors
    }

    fn monitor_webhook(
        &mut self,
        m: &RawMonitor,
        key: &dyn Fn(&str) -> String,
    ) -> Option<MonitorWebhook> {
        let Some(v) = &m.url else {
            for (present, k) in [
                (m.headers.as_ref().map(|h| h.span().start), "headers"),
                (m.secret.as_ref().map(|s| s.span().start), "secret"),
            ] {
                if let Some(at) = present {
                    self.report(
                        at,
                        &key(k),
                        &format!("{k} applies only to the webhook, but the monitor has no url"),
                        &format!(
                            "add url = \"https://ops.example.com/walhook-alerts\" or remove {k}"
                        ),
                    );
                }
            }
            return None;
        };
        let url = self.http_url(
            &m.url,
            &key("url"),
            v.span().start,
            "\"https://ops.example.com/walhook-alerts\"",
        );
        let headers = self.header_map(&m.headers, &key("headers"));
        let secret = self.signing_secret(&m.secret, &key("secret"));
        url.map(|url| MonitorWebhook {
            url_redacted: redact_url(&url),
            url: Secret::new(url),
            headers,
            secret,
        })
    }

    fn monitor_email(
        &mut self,
        m: &RawMonitor,
        at: usize,
        key: &dyn Fn(&str) -> String,
    ) -> Option<MonitorEmail> {
        let Some(v) = &m.smtp_url else {
            for (present, k) in [
                (m.from.as_ref().map(|f| f.span().start), "from"),
                (m.to.as_ref().map(|t| t.span().start), "to"),
            ] {
                if let Some(at) = present {
                    self.report(
                        at,
                        &key(k),
                        &format!("{k} applies only to email, but the monitor has no smtp_url"),
                        &format!("add smtp_url = \"smtp://mail.example.com:25\" or remove {k}"),
                    );
                }
            }
            return None;
        };
        let smtp_url = self.string(v, &key("smtp_url")).and_then(|u| {
            match check_smtp_url(u.trim()) {
                Ok(()) => Some(u.trim().to_owned()),
                Err(problem) => {
                    self.report(
                        v.span().start,
                        &key("smtp_url"),
                        &problem,
                        "write smtp://host:25 (plain), smtp://host:587?tls=required (STARTTLS) or smtps://user:${SMTP_PASSWORD}@host:465 (TLS)",
                    );
                    None
                }
            }
        });
        let from = self
            .required(&m.from, &key("from"), at, "\"walhook@example.com\"")
            .and_then(|f| {
                self.mailbox(
                    &f,
                    m.from.as_ref().map_or(at, |v| v.span().start),
                    &key("from"),
                )
            });
        let to = match &m.to {
            None => {
                self.report(
                    at,
                    &key("to"),
                    "missing key",
                    "add to = [\"dba@example.com\"]",
                );
                None
            }
            Some(list) if list.get_ref().is_empty() => {
                self.report(
                    list.span().start,
                    &key("to"),
                    "to is empty, so no one would get the alerts",
                    "list at least one address, like to = [\"dba@example.com\"]",
                );
                None
            }
            Some(list) => {
                let mut to = Vec::new();
                let mut ok = true;
                for (j, item) in list.get_ref().iter().enumerate() {
                    let item_key = format!("{}[{j}]", key("to"));
                    match self
                        .string(item, &item_key)
                        .and_then(|s| self.mailbox(&s, item.span().start, &item_key))
                    {
                        Some(s) => to.push(s),
                        None => ok = false,
                    }
                }
                ok.then_some(to)
            }
        };
        match (smtp_url, from, to) {
            (Some(smtp_url), Some(from), Some(to)) => Some(MonitorEmail {
                smtp_url_redacted: redact_url(&smtp_url),
                smtp_url: Secret::new(smtp_url),
                from,
                to,
            }),
            _ => None,
        }
    }

    /// A checked mailbox (`a@b.example` or `Name <a@b.example>`); `None` (reported) otherwise.
    fn mailbox(&mut self, s: &str, at: usize, key: &str) -> Option<String> {
        let s = s.trim();
        match s.parse::<lettre::message::Mailbox>() {
            Ok(_) => Some(s.to_owned()),
            Err(_) => {
                self.report(
                    at,
                    key,
                    &format!("{s:?} is not an email address"),
                    "write an address like \"dba@example.com\" or \"DBA team <dba@example.com>\"",
                );
                None
            }
        }
    }

    fn alert_kinds(&mut self, raw: &StrList, key: &str) -> Vec<AlertKind> {
        let Some(list) = raw else {
            return AlertKind::ALL.to_vec();
        };
        let names: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                key,
                "on is empty, so this monitor would never alert",
                &format!(
                    "list alert kinds ({}), or remove on to receive all",
                    names.join(", ")
                ),
            );
        }
        let mut kinds = Vec::new();
        for (j, item) in list.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{j}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            match AlertKind::ALL.iter().find(|k| k.as_str() == s.trim()) {
                None => self.report(
                    item.span().start,
                    &item_key,
                    &format!("unknown alert kind {s:?}"),
                    &format!("use one of {}", names.join(", ")),
                ),
                Some(k) if kinds.contains(k) => self.report(
                    item.span().start,
                    &item_key,
                    &format!("alert kind {s:?} is listed twice"),
                    "remove the duplicate",
                ),
                Some(k) => kinds.push(*k),
            }
        }
        kinds
    }
}

/// Parses a byte size: a whole number with an optional unit B, kB, MB, GB or TB (powers of
/// 1024, as PostgreSQL counts them; KiB, MiB, GiB and TiB are accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    let Ok(n) = number.parse::<u64>() else {
        return Err(format!("{s:?} is not a size"));
    };
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "kib" => 1 << 10,
        "mb" | "mib" => 1 << 20,
        "gb" | "gib" => 1 << 30,
        "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Checks an SMTP URL's scheme, host and `tls` option; the message never repeats the URL.
fn check_smtp_url(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    let (rest, plain) = if let Some(rest) = lower.strip_prefix("smtp://") {
        (rest, true)
    } else if let Some(rest) = lower.strip_prefix("smtps://") {
        (rest, false)
    } else {
        return Err("the SMTP URL must start with smtp:// or smtps://".to_owned());
    };
    if url.chars().any(char::is_whitespace) {
        return Err("the SMTP URL contains whitespace".to_owned());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err("the SMTP URL has no host".to_owned());
    }
    if let Some((_, query)) = rest.split_once('?') {
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("tls", "required" | "opportunistic")) if plain => {}
                Some(("tls", _)) => {
                    return Err(
                        "tls= must be required or opportunistic, and only with smtp://".to_owned(),
                    );
                }
                _ => return Err("the only query option of an SMTP URL is tls=".to_owned()),
            }
        }
    }
    Ok(())
}

/// Checks that `url` is an absolute http(s) URL with a host; the message never repeats the URL.
fn check_http_url(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or_else(|| "the URL must start with http:// or https://".to_owned())?;
    if url.chars().any(char::is_whitespace) {
        return Err("the URL contains whitespace".to_owned());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err("the URL has no host".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[source]\nurl = \"postgres://walhook@localhost/app\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, Path::new("walhook.toml"), &no_env)
    }

    /// The error lines of a text that must fail.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(ConfigError::Invalid(lines)) => lines,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.source.slot, "walhook");
        assert_eq!(c.source.publication, "walhook");
        assert!(c.source.create_publication);
        assert_eq!(c.source.heartbeat, Some(Duration::from_secs(30)));
        assert_eq!(c.source.status_interval, Duration::from_secs(5));
        assert_eq!(c.source.system_name, None);
        assert!(c.source.password.is_none());
        assert_eq!(c.queue.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.queue.batch_size, 5000);
        assert_eq!(c.queue.batch_delay, Duration::from_millis(20));
        assert!(c.admin.is_none());
        assert!(c.listeners.is_empty());
        let e = &c.entities[0];
        assert_eq!(e.name.as_str(), "Customer");
        assert_eq!(
            e.table,
            TableName {
                schema: "public".into(),
                name: "customer".into()
            }
        );
        assert_eq!(e.actions, Action::ALL.to_vec());
        assert_eq!(e.id, None);
        assert_eq!(e.track, None);
        assert!(e.exclude.is_empty());
    }

    #[test]
    fn example_file_parses_with_its_environment() {
        let env = |name: &str| match name {
            "WALHOOK_DB_PASSWORD" => Some("db-secret".to_owned()),
            "CRM_API_KEY" => Some("api-key".to_owned()),
            "CRM_SIGNING_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            _ => None,
        };
        let text = include_str!("../config.example.toml");
        let c = Config::parse_with_env(text, Path::new("config.example.toml"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.source.password.as_ref().map(Secret::expose),
            Some("db-secret")
        );
        assert_eq!(c.source.system_name.as_deref(), Some("CRM"));
        assert_eq!(
            c.admin,
            Some(AdminConfig {
                listen: "127.0.0.1:9187".parse().unwrap(),
                token: None,
            })
        );
        assert_eq!(c.entities.len(), 2);
        assert_eq!(
            c.entities[1].table,
            TableName {
                schema: "Sales".into(),
                name: "Order".into()
            }
        );
        assert_eq!(c.entities[0].subject.as_deref(), Some("Customer/{id}"));
        let l = &c.listeners[0];
        assert_eq!(l.name, "crm");
        assert_eq!(l.url.expose(), "https://crm.example.com/hooks/walhook");
        assert_eq!(l.entities.as_ref().map(|e| e[0].as_str()), Some("Customer"));
        assert_eq!(l.headers[0].0, "X-Api-Key");
        assert_eq!(l.headers[0].1.expose(), "api-key");
        assert_eq!(
            l.rate_limit,
            Some(RateLimit {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(l.max_attempts, 12);
        assert_eq!(l.concurrency, 16);
        assert_eq!(l.backoff, DEFAULT_BACKOFF);
        assert_eq!(l.timeout, Duration::from_secs(10));
        assert_eq!(l.debounce, Duration::ZERO);
        assert_eq!(l.format, ListenerFormat::CloudEvents);
    }

    #[test]
    fn example_file_without_its_environment_names_each_missing_variable() {
        let lines = errors(include_str!("../config.example.toml"));
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0]
                .contains("source.password: environment variable WALHOOK_DB_PASSWORD is not set")
        );
        assert!(lines[1].contains(
            "listener[0].headers.X-Api-Key: environment variable CRM_API_KEY is not set"
        ));
        assert!(
            lines[2]
                .contains("listener[0].secret: environment variable CRM_SIGNING_SECRET is not set")
        );
    }

    #[test]
    fn unknown_key_names_path_position_and_allowed_keys() {
        let text = format!(
            "{MINIMAL}\n[[entity]]\nname = \"Order\"\ntable = \"orders\"\ncolour = \"red\"\n"
        );
        let lines = errors(&text);
        assert_eq!(
            lines,
            vec![
                "walhook.toml:11:1: entity[1].colour: unknown key; expected one of name, table, id, actions, track, exclude, subject"
            ]
        );
    }

    #[test]
    fn unknown_top_level_section_is_reported() {
        let lines = errors(&format!("{MINIMAL}[sorce]\nurl = \"x\"\n"));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("walhook.toml:7:2: sorce: unknown key; expected one of source, queue, admin, entity, listener, monitor"), "{}", lines[0]);
    }

    #[test]
    fn wrong_type_names_found_and_expected() {
        let lines = errors("[source]\nurl = \"postgres://h/db\"\nslot = 5\n");
        assert_eq!(
            lines,
            vec![
                "walhook.toml:3:8: source.slot: wrong type: found integer 5, expected a string; write the value in double quotes"
            ]
        );
    }

    #[test]
    fn single_bracket_entity_suggests_double_brackets() {
        let lines = errors("[source]\nurl = \"postgres://h/db\"\n[entity]\nname = \"A\"\n");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("entity: wrong type"), "{}", lines[0]);
        assert!(
            lines[0].ends_with("write [[entity]] with double brackets"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn syntax_error_is_one_line_with_position() {
        let lines = errors("[source]\nurl = \"postgres://h/db\nslot = \"x\"\n");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("walhook.toml:2:"), "{}", lines[0]);
        assert!(lines[0].contains("invalid TOML"), "{}", lines[0]);
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = "\
[source]
url = \"postgres://h/db\"
slot = \"My-Slot\"
heartbeat = \"5 sec\"
status_interval = \"30s\"

[queue]
batch_size = 0

[[entity]]
name = \"9Customer\"
table = \"Public.customer\"
actions = [\"created\", \"created\", \"merged\"]
id = [\"id\"]
exclude = [\"id\", \"secret\"]
subject = \"Customer/{secret}\"

[[entity]]
name = \"Order\"
table = \"orders\"
subject = \"Order/{id\"
";
        let lines = errors(text);
        assert_eq!(
            lines,
            vec![
                "walhook.toml:3:8: source.slot: invalid replication slot name \"My-Slot\"; use 1 to 63 lower-case letters, digits and '_' (PostgreSQL's rule), like \"walhook\"",
                "walhook.toml:4:13: source.heartbeat: invalid duration \"5 sec\"; write a whole number and a unit (ms, s, m, h, d), like \"500ms\", \"5s\", \"10m\", \"2h\" or \"7d\", or \"off\"",
                "walhook.toml:5:19: source.status_interval: 30s is out of range; use a duration above 0 and at most \"10s\", so the server does not time the connection out",
                "walhook.toml:8:14: queue.batch_size: 0 is out of range; use a number from 1 to 100000 (default 5000)",
                "walhook.toml:11:8: entity[0].name: entity name \"9Customer\" must start with a letter and contain only letters, digits, '_', '-' or '.'; rename it, like \"Customer\" or \"SalesOrder\"",
                "walhook.toml:12:9: entity[0].table: table \"Public.customer\" has upper-case letters in the unquoted name \"Public\", which PostgreSQL folds to \"public\"; write it in lower case, or double-quote it ('\"Public\"') if the table was created with that exact case",
                "walhook.toml:13:23: entity[0].actions[1]: action \"created\" is listed twice; remove the duplicate",
                "walhook.toml:13:34: entity[0].actions[2]: unknown action \"merged\"; use created, updated or deleted",
                "walhook.toml:14:7: entity[0].id: id column \"id\" is also excluded; remove it from exclude or from id; events need their id",
                "walhook.toml:16:11: entity[0].subject: placeholder {secret} names an excluded column; excluded columns must not leave the database; use {id} or another column",
                "walhook.toml:21:11: entity[1].subject: subject \"Order/{id\" has an unclosed '{'; close each placeholder with '}', like \"Customer/{id}\"",
            ]
        );
    }

    #[test]
    fn missing_source_and_entities_are_reported_with_the_fix() {
        let lines = errors("[queue]\nretention = \"1d\"\n");
        assert_eq!(
            lines,
            vec![
                "walhook.toml:1:1: source: missing section [source]; add [source] with url = \"postgres://user@host:5432/dbname\"",
                "walhook.toml:3:1: entity: no [[entity]] is configured, so nothing would be captured; add an [[entity]] section with name = \"Customer\" and table = \"public.customer\"",
            ]
        );
    }

    #[test]
    fn missing_required_keys_point_at_their_section() {
        let lines = errors("[source]\nslot = \"s\"\n\n[[entity]]\nname = \"A\"\n");
        assert_eq!(
            lines,
            vec![
                "walhook.toml:1:1: source.url: missing key; add url = \"postgres://user@host:5432/dbname\"",
                "walhook.toml:4:1: entity[0].table: missing key; add table = \"public.customer\"",
            ]
        );
    }

    #[test]
    fn duplicate_entities_and_tables_are_reported() {
        let text =
            format!("{MINIMAL}\n[[entity]]\nname = \"Customer\"\ntable = \"public.customer\"\n");
        let lines = errors(&text);
        assert_eq!(
            lines,
            vec![
                "walhook.toml:9:8: entity[1].name: entity \"Customer\" is defined twice; give each [[entity]] its own name",
                "walhook.toml:10:9: entity[1].table: table public.customer already backs entity Customer; capture a table as one entity only; use subject or listener filters to tell cases apart",
            ]
        );
    }

    #[test]
    fn env_vars_are_substituted_in_every_string_and_escape_is_literal() {
        let text = "[source]\nurl = \"postgres://${DB_USER}@${DB_HOST}/app\"\nsystem_name = \"cost $$${5} ${DB_HOST}$\"\nslot = \"${SLOT}\"\n[[entity]]\nname = \"${ENTITY}\"\ntable = \"customer\"\nid = [\"${ID_COL}\"]\n";
        let env = |name: &str| {
            Some(
                match name {
                    "DB_USER" => "walhook",
                    "DB_HOST" => "db1",
                    "SLOT" => "cdc_1",
                    "ENTITY" => "Customer",
                    "ID_COL" => "customer_id",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        let c = Config::parse_with_env(text, Path::new("w.toml"), &env).unwrap();
        assert_eq!(c.source.url.expose(), "postgres://walhook@db1/app");
        assert_eq!(c.source.system_name.as_deref(), Some("cost $${5} db1$"));
        assert_eq!(c.source.slot, "cdc_1");
        assert_eq!(c.entities[0].name.as_str(), "Customer");
        assert_eq!(c.entities[0].id, Some(vec!["customer_id".to_owned()]));
    }

    #[test]
    fn missing_and_malformed_env_vars_are_errors_naming_them() {
        let text = "[source]\nurl = \"postgres://${NOPE}@h/app\"\nsystem_name = \"${bad name}\"\nslot = \"${OPEN\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n";
        let lines = errors(text);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].starts_with("walhook.toml:2:7: source.url: environment variable NOPE is not set; set NOPE in walhook's environment"), "{}", lines[0]);
        assert!(lines[1].starts_with("walhook.toml:3:15: source.system_name: ${bad name} is not a valid environment variable name"), "{}", lines[1]);
        assert!(
            lines[2].starts_with("walhook.toml:4:8: source.slot: unterminated ${"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn substitution_cannot_break_toml_syntax() {
        let env = |_: &str| Some("\"\nslot = \"evil".to_owned());
        let text = "[source]\nurl = \"postgres://h/app\"\nsystem_name = \"${X}\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n";
        let c = Config::parse_with_env(text, Path::new("w.toml"), &env).unwrap();
        assert_eq!(c.source.slot, "walhook");
        assert_eq!(c.source.system_name.as_deref(), Some("\"\nslot = \"evil"));
    }

    #[test]
    fn secrets_never_appear_in_debug_output_or_errors() {
        let env = |name: &str| (name == "PW").then(|| "hunter2".to_owned());
        let text = "[source]\nurl = \"postgres://u:topsecret@h/app?sslmode=require&password=qsecret\"\npassword = \"${PW}\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n[[listener]]\nname = \"l\"\nurl = \"https://bob:lsecret@example.com/h?token=tsecret\"\nheaders = { \"X-Key\" = \"hsecret\" }\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n";
        let c = Config::parse_with_env(text, Path::new("w.toml"), &env).unwrap();
        let debug = format!("{c:?}");
        for secret in [
            "topsecret",
            "qsecret",
            "hunter2",
            "lsecret",
            "tsecret",
            "hsecret",
            "MfKQ9r8",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert_eq!(
            c.source.url_redacted,
            "postgres://u:***@h/app?sslmode=require&password=***"
        );
        assert_eq!(
            c.listeners[0].url_redacted,
            "https://bob:***@example.com/h?token=***"
        );

        let bad = "[source]\nurl = \"postgres://u:topsecret@h/app\"\npassword = 12345\n";
        let lines = errors(bad).join("\n");
        assert!(
            !lines.contains("12345") && !lines.contains("topsecret"),
            "{lines}"
        );
        let bad = "[source]\nurl = \"topsecret\"\n[[entity]]\nname = \"A\"\ntable = \"a\"\n[[listener]]\nname = \"l\"\nurl = \"ftp://lsecret\"\nsecret = \"not base64 ssecret!\"\n";
        let lines = errors(bad).join("\n");
        assert!(
            lines.contains("source.url: not a PostgreSQL connection string"),
            "{lines}"
        );
        assert!(
            lines.contains("listener[0].url: the URL must start with http:// or https://"),
            "{lines}"
        );
        assert!(
            lines.contains("listener[0].secret: the signing secret is not base64"),
            "{lines}"
        );
        for secret in ["topsecret", "lsecret", "ssecret"] {
            assert!(!lines.contains(secret), "{secret} in {lines}");
        }
    }

    #[test]
    fn key_value_connection_strings_are_redacted() {
        assert_eq!(
            redact_url("host=db password=s3cret user=w"),
            "host=db password=*** user=w"
        );
        assert_eq!(
            redact_url("host=db password = 'a \\' b' dbname=x"),
            "host=db password = *** dbname=x"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u:p@ss/w@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn durations_accept_units_and_reject_other_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "5sec",
            "-5s",
            "1.5s",
            "99999999999999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("like \"500ms\""), "{bad}: {e}");
        }
    }

    #[test]
    fn heartbeat_can_be_disabled() {
        for off in ["off", "0s"] {
            let text = MINIMAL.replace("[source]\n", &format!("[source]\nheartbeat = \"{off}\"\n"));
            assert_eq!(parse(&text).unwrap().source.heartbeat, None, "{off}");
        }
    }

    #[test]
    fn concurrency_defaults_to_16_and_must_be_1_to_1000() {
        let listener = |extra: &str| {
            format!(
                "{MINIMAL}\n[[listener]]\nname = \"crm\"\nurl = \"http://localhost/h\"\n{extra}"
            )
        };
        assert_eq!(parse(&listener("")).unwrap().listeners[0].concurrency, 16);
        assert_eq!(
            parse(&listener("concurrency = 1000")).unwrap().listeners[0].concurrency,
            1000
        );
        for bad in ["concurrency = 0", "concurrency = 1001", "concurrency = -3"] {
            let errors = errors(&listener(bad));
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].contains("listener[0].concurrency")
                    && errors[0].contains("use a number from 1 to 1000"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn rate_limits_parse_count_and_period() {
        assert_eq!(
            parse_rate_limit("50/s"),
            Ok(RateLimit {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            parse_rate_limit("1000/m"),
            Ok(RateLimit {
                count: 1000,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            parse_rate_limit("10/h"),
            Ok(RateLimit {
                count: 10,
                per: Duration::from_secs(3600)
            })
        );
        assert_eq!(
            parse_rate_limit("100/10s"),
            Ok(RateLimit {
                count: 100,
                per: Duration::from_secs(10)
            })
        );
        for bad in ["50", "x/s", "50/x", "50/0s", "0/s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_names_handle_schema_and_quoting() {
        let t = |s: &str| parse_table_name(s).map(|t| (t.schema, t.name));
        assert_eq!(t("customer"), Ok(("public".into(), "customer".into())));
        assert_eq!(t("crm.customer"), Ok(("crm".into(), "customer".into())));
        assert_eq!(
            t("\"Sales\".\"Order\""),
            Ok(("Sales".into(), "Order".into()))
        );
        assert_eq!(
            t("\"a.b\".\"say \"\"hi\"\"\""),
            Ok(("a.b".into(), "say \"hi\"".into()))
        );
        for bad in [
            "", "a.b.c", "Customer", "\"open", "\"\"", "a b", "a.", ".a", "\"x\"y",
        ] {
            assert!(parse_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subject_templates_need_balanced_braces() {
        assert_eq!(
            subject_placeholders("C/{id}/{city}"),
            Ok(vec!["id".into(), "city".into()])
        );
        assert_eq!(subject_placeholders("plain"), Ok(vec![]));
        for bad in ["C/{id", "C/id}", "C/{}", "C/{{id}}"] {
            assert!(subject_placeholders(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_file_is_read_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let text = MINIMAL.replace("[source]\n", "[source]\npassword_file = \"pw\"\n");
        let c = Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &no_env).unwrap();
        assert_eq!(c.source.password.unwrap().expose(), "s3cret");

        let text = MINIMAL.replace("[source]\n", "[source]\npassword_file = \"missing\"\n");
        let e =
            Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &no_env).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains(":2:17: source.password_file: cannot read "),
            "{e}"
        );
        assert!(
            e.contains("relative paths start at the config file's directory"),
            "{e}"
        );
    }

    #[test]
    fn password_and_password_file_together_are_refused() {
        let text = MINIMAL.replace(
            "[source]\n",
            "[source]\npassword = \"a\"\npassword_file = \"pw\"\n",
        );
        assert_eq!(
            errors(&text),
            vec![
                "walhook.toml:3:17: source.password_file: both password and password_file are set; keep only one of them"
            ]
        );
    }

    #[test]
    fn admin_listen_defaults_and_is_checked() {
        let c = parse(&format!("{MINIMAL}[admin]\n")).unwrap();
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:9187".parse().unwrap());
        let lines = errors(&format!("{MINIMAL}[admin]\nlisten = \"localhost\"\n"));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("walhook.toml:8:10: admin.listen: invalid address \"localhost\"; write an IP address and port"), "{}", lines[0]);
    }

    #[test]
    fn admin_token_file_is_read_and_must_be_long() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("walhook.toml");
        std::fs::write(dir.path().join("token"), "0123456789abcdefghijklmnop\n").unwrap();
        std::fs::write(dir.path().join("short"), "tooshort\n").unwrap();
        let text = format!("{MINIMAL}[admin]\ntoken_file = \"token\"\n");
        let c = Config::parse_with_env(&text, &config, &no_env).unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(
            admin.token.as_ref().map(Secret::expose),
            Some("0123456789abcdefghijklmnop")
        );
        assert!(!format!("{admin:?}").contains("0123456789"));

        let text = format!("{MINIMAL}[admin]\ntoken_file = \"short\"\n");
        let e = Config::parse_with_env(&text, &config, &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":8:14: admin.token_file: the token is shorter than 24 bytes; write a long random token"),
            "{e}"
        );
        assert!(!e.contains("tooshort"), "{e}");

        let c = parse(&format!("{MINIMAL}[admin]\n")).unwrap();
        assert_eq!(c.admin.unwrap().token, None);
    }

    #[test]
    fn listener_problems_are_all_reported() {
        let text = format!(
            "{MINIMAL}
[[listener]]
name = \"a\"
url = \"https://example.com/\"
entities = [\"Customer\", \"Nope\"]
headers = {{ \"X-Key\" = \"1\", \"x-key\" = \"2\", \"Bad Name\" = \"3\", \"Host\" = \"h\" }}
rate_limit = \"fast\"
max_attempts = 0
backoff = {{ initial = \"1m\", max = \"5s\" }}
format = \"eventgrid\"

[[listener]]
name = \"a\"
url = \"https://example.com/\"
format = \"xml\"
"
        );
        let lines = errors(&text);
        assert_eq!(
            lines,
            vec![
                "walhook.toml:11:25: listener[0].entities[1]: no [[entity]] is named \"Nope\"; use one of the configured entities: Customer",
                "walhook.toml:12:28: listener[0].headers.x-key: header \"x-key\" is listed twice (header names ignore case); keep one of them",
                "walhook.toml:12:43: listener[0].headers.\"Bad Name\": invalid header name \"Bad Name\"; use only letters, digits and dashes, like \"X-Api-Key\"",
                "walhook.toml:12:61: listener[0].headers.Host: header \"Host\" is set by walhook; remove it",
                "walhook.toml:13:14: listener[0].rate_limit: invalid rate limit \"fast\"; write a count and a period, like \"50/s\", \"1000/m\" or \"10/h\"",
                "walhook.toml:14:16: listener[0].max_attempts: 0 is out of range; use a number from 1 to 1000 (default 12)",
                "walhook.toml:15:35: listener[0].backoff.max: max backoff is shorter than initial; make max at least as long as initial",
                "walhook.toml:16:10: listener[0].format: format \"eventgrid\" is not supported yet; use format = \"cloudevents\"",
                "walhook.toml:19:8: listener[1].name: listener \"a\" is defined twice; give each [[listener]] its own name",
                "walhook.toml:21:10: listener[1].format: unknown format \"xml\"; use format = \"cloudevents\"",
            ]
        );
    }

    #[test]
    fn example_monitor_parses_with_webhook_and_email() {
        let env = |name: &str| match name {
            "WALHOOK_DB_PASSWORD" | "CRM_API_KEY" => Some("x".to_owned()),
            "CRM_SIGNING_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            _ => None,
        };
        let text = include_str!("../config.example.toml");
        let c = Config::parse_with_env(text, Path::new("config.example.toml"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.monitors.len(), 1);
        let m = &c.monitors[0];
        assert_eq!(m.name, "ops");
        let w = m.webhook.as_ref().unwrap();
        assert_eq!(
            w.url.expose(),
            "https://ops.example.com/hooks/walhook-alerts"
        );
        assert_eq!(w.headers[0].0, "X-Team");
        assert!(w.secret.is_none());
        let e = m.email.as_ref().unwrap();
        assert_eq!(e.smtp_url.expose(), "smtp://mail.example.com:25");
        assert_eq!(e.from, "walhook <walhook@example.com>");
        assert_eq!(e.to, vec!["dba@example.com".to_owned()]);
        assert_eq!(m.on, AlertKind::ALL.to_vec());
        assert_eq!(m.listener_failing_for, DEFAULT_LISTENER_FAILING_FOR);
        assert_eq!(m.lag_bytes, DEFAULT_LAG_BYTES);
        assert_eq!(m.lag_for, DEFAULT_LAG_FOR);
        assert_eq!(m.queue_age, DEFAULT_QUEUE_AGE);
        assert_eq!(m.database_unreachable_for, DEFAULT_DATABASE_UNREACHABLE_FOR);
        assert_eq!(m.min_interval, DEFAULT_MIN_INTERVAL);
    }

    #[test]
    fn minimal_monitor_gets_defaults_and_redacted_smtp_password() {
        let c = Config::parse_with_env(
            &format!(
                "{MINIMAL}[[monitor]]\nname = \"mail\"\nsmtp_url = \"smtps://w:${{P}}@mx.example.com\"\nfrom = \"w@example.com\"\nto = [\"a@example.com\", \"B <b@example.com>\"]\non = [\"listener_failing\"]\nlag_bytes = 1000\n"
            ),
            Path::new("walhook.toml"),
            &|n| (n == "P").then(|| "pw".to_owned()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let m = &c.monitors[0];
        assert!(m.webhook.is_none());
        let e = m.email.as_ref().unwrap();
        assert_eq!(e.smtp_url.expose(), "smtps://w:pw@mx.example.com");
        assert_eq!(e.smtp_url_redacted, "smtps://w:***@mx.example.com");
        assert!(!format!("{m:?}").contains("pw@"));
        assert_eq!(e.to.len(), 2);
        assert_eq!(m.on, vec![AlertKind::ListenerFailing]);
        assert_eq!(m.lag_bytes, 1000);
        assert_eq!(m.min_interval, Duration::from_secs(900));
    }

    #[test]
    fn monitor_problems_are_all_reported_with_positions() {
        let text = format!(
            "{MINIMAL}[[monitor]]\nname = \"a\"\n\n[[monitor]]\nname = \"a\"\nurl = \"ftp://x\"\nsecret = \"not*base64\"\non = [\"everything\"]\nlag_bytes = \"1XB\"\nlag_for = \"soon\"\n\n[[monitor]]\nname = \"b\"\nsmtp_url = \"http://mx\"\nfrom = \"nobody\"\n\n[[monitor]]\nname = \"c\"\nto = [\"x@example.com\"]\n"
        );
        assert_eq!(
            errors(&text),
            vec![
                "walhook.toml:7:1: monitor[0]: the monitor has neither url nor smtp_url, so its alerts go nowhere; add url = \"https://ops.example.com/walhook-alerts\" for a webhook, smtp_url = \"smtp://mail.example.com:25\" with from and to for email, or both",
                "walhook.toml:11:8: monitor[1].name: monitor \"a\" is defined twice; give each [[monitor]] its own name",
                "walhook.toml:12:7: monitor[1].url: the URL must start with http:// or https://; write an http:// or https:// URL like \"https://ops.example.com/walhook-alerts\"",
                "walhook.toml:13:10: monitor[1].secret: the signing secret is not base64 (optionally prefixed with whsec_); use a secret like whsec_ followed by base64 of 24 to 64 random bytes (e.g. `openssl rand -base64 32`)",
                "walhook.toml:14:7: monitor[1].on[0]: unknown alert kind \"everything\"; use one of notification_failed, listener_failing, replication_lag, queue_age, database_unreachable",
                "walhook.toml:15:13: monitor[1].lag_bytes: \"1XB\" has an unknown unit; use a byte count like 1073741824 or a size like \"1GB\" or \"512MB\" (units B, kB, MB, GB, TB; 1 kB = 1024 bytes)",
                "walhook.toml:16:11: monitor[1].lag_for: invalid duration \"soon\"; write a whole number and a unit (ms, s, m, h, d), like \"500ms\", \"5s\", \"10m\", \"2h\" or \"7d\"",
                "walhook.toml:18:1: monitor[2].to: missing key; add to = [\"dba@example.com\"]",
                "walhook.toml:20:12: monitor[2].smtp_url: the SMTP URL must start with smtp:// or smtps://; write smtp://host:25 (plain), smtp://host:587?tls=required (STARTTLS) or smtps://user:${SMTP_PASSWORD}@host:465 (TLS)",
                "walhook.toml:21:8: monitor[2].from: \"nobody\" is not an email address; write an address like \"dba@example.com\" or \"DBA team <dba@example.com>\"",
                "walhook.toml:23:1: monitor[3]: the monitor has neither url nor smtp_url, so its alerts go nowhere; add url = \"https://ops.example.com/walhook-alerts\" for a webhook, smtp_url = \"smtp://mail.example.com:25\" with from and to for email, or both",
                "walhook.toml:25:6: monitor[3].to: to applies only to email, but the monitor has no smtp_url; add smtp_url = \"smtp://mail.example.com:25\" or remove to",
            ]
        );
    }

    #[test]
    fn unknown_monitor_key_and_single_brackets_are_reported() {
        let lines = errors(&format!(
            "{MINIMAL}[[monitor]]\nname = \"m\"\nurl = \"http://x\"\nwebhook = 1\n"
        ));
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("walhook.toml:10:1: monitor[0].webhook: unknown key; expected one of name, url, headers"),
            "{}",
            lines[0]
        );
        let lines = errors(&format!("{MINIMAL}[monitor]\nname = \"m\"\n"));
        assert!(
            lines[0].contains("write [[monitor]] with double brackets"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn sizes_accept_bytes_and_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("512 MB"), Ok(512 << 20));
        assert_eq!(parse_size("2kB"), Ok(2048));
        assert!(parse_size("GB").is_err());
        assert!(parse_size("1.5GB").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }

    #[test]
    fn config_errors_exit_with_ex_config() {
        assert_eq!(ConfigError::Invalid(vec![]).class(), ErrorClass::Config);
    }
}

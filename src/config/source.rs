//! `[source]`: the database to capture.

use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Str;
use super::check::Checker;
use super::units::RawSize;
use crate::replication::conninfo as conn;
use crate::secret::{Secret, redact_url};

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
    /// Send a cleartext or md5 password over TCP without TLS (default false: refused).
    pub allow_insecure_password: bool,
    /// A replication stream silent this long is rebuilt (default 60s).
    pub receive_timeout: Duration,
    /// `statement_timeout` of walhook's own sessions; `None` keeps the server's (default 5m).
    pub statement_timeout: Option<Duration>,
    /// `lock_timeout` of walhook's own sessions; `None` keeps the server's (default 1m).
    pub lock_timeout: Option<Duration>,
    /// walhook is a synchronous standby of the server (named in its
    /// `synchronous_standby_names`): a writer's COMMIT returns once its events are in the
    /// queue. walhook's own commits are then local, or they would wait for walhook.
    pub synchronous: bool,
}

impl SourceConfig {
    /// Connection parameters for this source: `url` with `password`/`password_file`
    /// overriding any other password source.
    pub fn connect_params(
        &self,
    ) -> Result<crate::replication::conn::ConnectParams, crate::replication::conn::ConnError> {
        let policy = crate::replication::conn::ConnPolicy {
            allow_insecure_password: self.allow_insecure_password,
            receive_timeout: self.receive_timeout,
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            local_commit: self.synchronous,
        };
        crate::replication::conn::ConnectParams::parse(
            self.url.expose(),
            self.password.as_ref().map(Secret::expose),
        )
        .map(|p| p.with_policy(policy))
    }

    /// The `sourceSystem` of payloads: `system_name`, else the database name.
    pub fn source_system(&self) -> String {
        match self.connect_params() {
            Ok(params) => self.source_system_of(&params),
            Err(_) => self.system_name.clone().unwrap_or_default(),
        }
    }

    /// [`Self::source_system`] for the connection `params` in force (after a reload, the
    /// daemon's current ones).
    pub fn source_system_of(&self, params: &crate::replication::conn::ConnectParams) -> String {
        self.system_name
            .clone()
            .unwrap_or_else(|| params.dbname().to_owned())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
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
    allow_insecure_password: Option<Spanned<bool>>,
    receive_timeout: Str,
    statement_timeout: Str,
    lock_timeout: Str,
    synchronous: Option<Spanned<bool>>,
}

pub(super) const DEFAULT_SLOT: &str = "walhook";
pub(super) const DEFAULT_PUBLICATION: &str = "walhook";
pub(super) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_WAL_WARNING: u64 = 1024 * 1024 * 1024;
pub(super) const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(10);
const MIN_RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);

impl Checker<'_> {
    pub(super) fn source(&mut self, raw: Option<&Spanned<RawSource>>) -> SourceConfig {
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
                allow_insecure_password: false,
                receive_timeout: conn::DEFAULT_RECEIVE_TIMEOUT,
                statement_timeout: Some(conn::DEFAULT_STATEMENT_TIMEOUT),
                lock_timeout: Some(conn::DEFAULT_LOCK_TIMEOUT),
                synchronous: false,
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

        let password = self.secret(&raw.password, &raw.password_file, "source.password");

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

        let heartbeat =
            self.duration_or_off(&raw.heartbeat, "source.heartbeat", Some(DEFAULT_HEARTBEAT));
        let statement_timeout = self.duration_or_off(
            &raw.statement_timeout,
            "source.statement_timeout",
            Some(conn::DEFAULT_STATEMENT_TIMEOUT),
        );
        let lock_timeout = self.duration_or_off(
            &raw.lock_timeout,
            "source.lock_timeout",
            Some(conn::DEFAULT_LOCK_TIMEOUT),
        );
        let receive_timeout = self.duration(
            &raw.receive_timeout,
            "source.receive_timeout",
            conn::DEFAULT_RECEIVE_TIMEOUT,
        );
        if let Some(v) = &raw.receive_timeout
            && receive_timeout < MIN_RECEIVE_TIMEOUT
        {
            self.report(
                v.span().start,
                "source.receive_timeout",
                &format!("{} is too short", v.get_ref()),
                "use at least \"1s\"; the default \"60s\" matches the server's wal_receiver_timeout",
            );
        }

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
            allow_insecure_password: raw
                .allow_insecure_password
                .as_ref()
                .is_some_and(|b| *b.get_ref()),
            receive_timeout,
            statement_timeout,
            lock_timeout,
            synchronous: raw.synchronous.as_ref().is_some_and(|b| *b.get_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::{MINIMAL, errors, no_env, parse};

    #[test]
    fn connection_policy_keys_reach_the_connect_params() {
        let text = MINIMAL.replace(
            "[source]\n",
            "[source]\nallow_insecure_password = true\nreceive_timeout = \"5s\"\nstatement_timeout = \"off\"\nlock_timeout = \"2s\"\n",
        );
        let c = parse(&text).unwrap();
        let p = c.source.connect_params().unwrap();
        let policy = p.policy();
        assert!(policy.allow_insecure_password);
        assert_eq!(policy.receive_timeout, std::time::Duration::from_secs(5));
        assert_eq!(policy.statement_timeout, None);
        assert_eq!(policy.lock_timeout, Some(std::time::Duration::from_secs(2)));
        let defaults = parse(MINIMAL).unwrap().source.connect_params().unwrap();
        assert!(!defaults.policy().allow_insecure_password);
        assert_eq!(
            defaults.policy().receive_timeout,
            crate::replication::conn::DEFAULT_RECEIVE_TIMEOUT
        );
        let text = MINIMAL.replace("[source]\n", "[source]\nreceive_timeout = \"10ms\"\n");
        assert!(
            errors(&text)[0].contains("source.receive_timeout"),
            "{:?}",
            errors(&text)
        );
    }

    #[test]
    fn heartbeat_can_be_disabled() {
        for off in ["off", "0s"] {
            let text = MINIMAL.replace("[source]\n", &format!("[source]\nheartbeat = \"{off}\"\n"));
            assert_eq!(parse(&text).unwrap().source.heartbeat, None, "{off}");
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
}

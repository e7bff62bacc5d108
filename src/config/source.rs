//! `[source]`: the database to capture.

use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Str;
use super::check::Checker;
use super::units::{RawSize, parse_duration};
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
}

pub(super) const DEFAULT_SLOT: &str = "walhook";
pub(super) const DEFAULT_PUBLICATION: &str = "walhook";
pub(super) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_WAL_WARNING: u64 = 1024 * 1024 * 1024;
pub(super) const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(10);

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

    /// A password read from `password_file`, relative to the config file's directory.
    pub(super) fn password_file(&mut self, file: &Spanned<String>) -> Option<Secret> {
        self.secret_file(file, "source.password_file", "the password")
    }

    /// A secret read from the file named at `file` (relative to the config file's
    /// directory), without its final line break; `what` names the secret in the fix.
    pub(super) fn secret_file(
        &mut self,
        file: &Spanned<String>,
        key: &str,
        what: &str,
    ) -> Option<Secret> {
        let name = self.string(file, key)?;
        let path = self.dir.join(&name);
        match std::fs::read_to_string(&path) {
            Ok(content) => {
                let secret = content
                    .strip_suffix('\n')
                    .map(|s| s.strip_suffix('\r').unwrap_or(s))
                    .unwrap_or(&content);
                if secret.is_empty() {
                    self.report(
                        file.span().start,
                        key,
                        &format!("{} is empty", path.display()),
                        &format!("write {what} into the file, or remove the key"),
                    );
                    return None;
                }
                Some(Secret::new(secret.to_owned()))
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
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::{MINIMAL, errors, no_env, parse};

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

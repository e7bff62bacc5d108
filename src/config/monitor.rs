//! `[[monitor]]`: who is told when something goes wrong.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use http::{HeaderName, HeaderValue};
use lettre::message::Mailbox;

use super::check::Checker;
use super::smtp::{SmtpServer, parse_smtp_url};
use super::units::RawSize;
use super::webhook::RawHeaders;
use super::{Str, StrList};
use crate::secret::{SecretUrl, SigningKey};
use crate::tls::CaFile;

/// One `[[monitor]]`: where alerts go and when they are raised.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorConfig {
    /// Unique monitor name (for logs).
    pub name: String,
    /// Alerts POSTed as CloudEvents JSON; `None` when `url` is absent.
    pub webhook: Option<MonitorWebhook>,
    /// Alerts sent as email over SMTP; `None` when `smtp_url` is absent.
    pub email: Option<MonitorEmail>,
    /// Extra CA certificates trusted for the webhook's and the mail server's TLS, besides
    /// the built-in and OS roots.
    pub ca_file: Option<CaFile>,
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
    /// The http(s) URL alerts are POSTed to; messages show only `url.redacted()`.
    pub url: SecretUrl,
    /// Extra HTTP headers (`headers` and `header_files`), in file order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Standard Webhooks signing key; `None` sends no signature.
    pub secret: Option<SigningKey>,
}

/// The email side of a `[[monitor]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorEmail {
    /// The mail server, from `smtp_url` (`smtp://host:25`, `smtps://user@host:465`,
    /// `smtp://host:587?tls=required`) and `smtp_password` / `smtp_password_file`.
    pub smtp: SmtpServer,
    /// The sender mailbox (`walhook@example.com` or `Walhook <walhook@example.com>`).
    pub from: Mailbox,
    /// Recipient mailboxes (at least one).
    pub to: Vec<Mailbox>,
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
    /// Changes were lost because the replication slot vanished (told once the gap is
    /// accepted and capture resumes).
    CaptureGap,
    /// Changes were set aside in `walhook.rejected` instead of queued.
    ChangeRejected,
    /// A column an entity names was dropped or renamed, or its id can no longer be read.
    SchemaChanged,
}

impl AlertKind {
    /// Every kind, in the order `on` documents them.
    pub const ALL: [AlertKind; 8] = [
        AlertKind::NotificationFailed,
        AlertKind::ListenerFailing,
        AlertKind::ReplicationLag,
        AlertKind::QueueAge,
        AlertKind::DatabaseUnreachable,
        AlertKind::CaptureGap,
        AlertKind::ChangeRejected,
        AlertKind::SchemaChanged,
    ];

    /// The name used in `on = [...]`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::NotificationFailed => "notification_failed",
            AlertKind::ListenerFailing => "listener_failing",
            AlertKind::ReplicationLag => "replication_lag",
            AlertKind::QueueAge => "queue_age",
            AlertKind::DatabaseUnreachable => "database_unreachable",
            AlertKind::CaptureGap => "capture_gap",
            AlertKind::ChangeRejected => "change_rejected",
            AlertKind::SchemaChanged => "schema_changed",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMonitor {
    name: Str,
    url: Str,
    headers: RawHeaders,
    header_files: RawHeaders,
    secret: Str,
    secret_file: Str,
    smtp_url: Str,
    smtp_password: Str,
    smtp_password_file: Str,
    smtp_allow_insecure_password: Option<Spanned<bool>>,
    ca_file: Str,
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

pub(super) const DEFAULT_LISTENER_FAILING_FOR: Duration = Duration::from_secs(5 * 60);
pub(super) const DEFAULT_LAG_BYTES: u64 = 1024 * 1024 * 1024;
pub(super) const DEFAULT_LAG_FOR: Duration = Duration::from_secs(5 * 60);
pub(super) const DEFAULT_QUEUE_AGE: Duration = Duration::from_secs(15 * 60);
pub(super) const DEFAULT_DATABASE_UNREACHABLE_FOR: Duration = Duration::from_secs(60);
pub(super) const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(15 * 60);

impl Checker<'_> {
    pub(super) fn monitors(&mut self, raw: &[Spanned<RawMonitor>]) -> Vec<MonitorConfig> {
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
            let webhook = self.monitor_webhook(m, i);
            let email = self.monitor_email(m, at, i);
            let ca_file = self.ca_file(&m.ca_file, &key("ca_file"));
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
                    ca_file,
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

    /// Reports each key in `present` (name, position if set) that belongs to a part of the
    /// monitor (`part`: "the webhook, but …") that is not configured; `add` is the fix.
    fn stray_keys(&mut self, i: usize, present: &[(&str, Option<usize>)], part: &str, add: &str) {
        for (k, at) in present {
            if let Some(at) = at {
                self.report(
                    *at,
                    &format!("monitor[{i}].{k}"),
                    &format!("{k} applies only to {part}"),
                    &format!("{add} or remove {k}"),
                );
            }
        }
    }

    fn monitor_webhook(&mut self, m: &RawMonitor, i: usize) -> Option<MonitorWebhook> {
        let Some(v) = &m.url else {
            self.stray_keys(
                i,
                &[
                    ("headers", m.headers.as_ref().map(|h| h.span().start)),
                    (
                        "header_files",
                        m.header_files.as_ref().map(|h| h.span().start),
                    ),
                    ("secret", m.secret.as_ref().map(|s| s.span().start)),
                    (
                        "secret_file",
                        m.secret_file.as_ref().map(|s| s.span().start),
                    ),
                ],
                "the webhook, but the monitor has no url",
                "add url = \"https://ops.example.com/walhook-alerts\"",
            );
            return None;
        };
        let section = format!("monitor[{i}]");
        let url = self.http_url(
            &m.url,
            &format!("{section}.url"),
            v.span().start,
            "\"https://ops.example.com/walhook-alerts\"",
        );
        let headers = self.headers(&m.headers, &m.header_files, &section);
        let secret = self.signing_key(&m.secret, &m.secret_file, &format!("{section}.secret"));
        url.map(|url| MonitorWebhook {
            url,
            headers,
            secret,
        })
    }

    fn monitor_email(&mut self, m: &RawMonitor, at: usize, i: usize) -> Option<MonitorEmail> {
        let key = |k: &str| format!("monitor[{i}].{k}");
        let Some(v) = &m.smtp_url else {
            self.stray_keys(
                i,
                &[
                    ("from", m.from.as_ref().map(|f| f.span().start)),
                    ("to", m.to.as_ref().map(|t| t.span().start)),
                    (
                        "smtp_password",
                        m.smtp_password.as_ref().map(|p| p.span().start),
                    ),
                    (
                        "smtp_password_file",
                        m.smtp_password_file.as_ref().map(|p| p.span().start),
                    ),
                    (
                        "smtp_allow_insecure_password",
                        m.smtp_allow_insecure_password
                            .as_ref()
                            .map(|p| p.span().start),
                    ),
                ],
                "email, but the monitor has no smtp_url",
                "add smtp_url = \"smtp://mail.example.com:25\"",
            );
            return None;
        };
        let password = self.secret(
            &m.smtp_password,
            &m.smtp_password_file,
            &key("smtp_password"),
        );
        let allow_insecure = m
            .smtp_allow_insecure_password
            .as_ref()
            .is_some_and(|b| *b.get_ref());
        let smtp = self.smtp_server(v, password, allow_insecure, &key("smtp_url"));
        let from = self
            .required(&m.from, &key("from"), at, "\"walhook@example.com\"")
            .and_then(|f| {
                self.mailbox(
                    &f,
                    m.from.as_ref().map_or(at, |v| v.span().start),
                    &key("from"),
                )
            });
        let to = self.recipients(&m.to, at, &key("to"));
        match (smtp, from, to) {
            (Some(smtp), Some(from), Some(to)) => Some(MonitorEmail { smtp, from, to }),
            _ => None,
        }
    }

    /// The mail server of `smtp_url`; refuses a password that would travel in plain text
    /// unless `smtp_allow_insecure_password = true`.
    fn smtp_server(
        &mut self,
        v: &Spanned<String>,
        password: Option<crate::secret::Secret>,
        allow_insecure: bool,
        key: &str,
    ) -> Option<SmtpServer> {
        let text = self.string(v, key)?;
        let server = match parse_smtp_url(text.trim(), password) {
            Ok(server) => server,
            Err(problem) => {
                self.report(
                    v.span().start,
                    key,
                    &problem,
                    "write smtp://host:25 (plain), smtp://host:587?tls=required (STARTTLS) or smtps://user@host:465 (TLS, password in smtp_password_file)",
                );
                return None;
            }
        };
        if server.credentials.is_some() && !server.tls.protects_password() && !allow_insecure {
            self.report(
                v.span().start,
                key,
                "the SMTP password would be sent without TLS (smtp:// without tls=required, or tls=opportunistic, which falls back to plain text)",
                "use smtps://…:465 or add ?tls=required; set smtp_allow_insecure_password = true only for a mail server reached over a trusted network",
            );
            return None;
        }
        Some(server)
    }

    /// `to = [...]`: at least one mailbox.
    fn recipients(&mut self, raw: &StrList, at: usize, key: &str) -> Option<Vec<Mailbox>> {
        let Some(list) = raw else {
            self.report(at, key, "missing key", "add to = [\"dba@example.com\"]");
            return None;
        };
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                key,
                "to is empty, so no one would get the alerts",
                "list at least one address, like to = [\"dba@example.com\"]",
            );
            return None;
        }
        let mut to = Vec::new();
        let mut ok = true;
        for (j, item) in list.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{j}]");
            match self
                .string(item, &item_key)
                .and_then(|s| self.mailbox(&s, item.span().start, &item_key))
            {
                Some(m) => to.push(m),
                None => ok = false,
            }
        }
        ok.then_some(to)
    }

    /// A checked mailbox (`a@b.example` or `Name <a@b.example>`); `None` (reported) otherwise.
    fn mailbox(&mut self, s: &str, at: usize, key: &str) -> Option<Mailbox> {
        let s = s.trim();
        match s.parse::<Mailbox>() {
            Ok(m) => Some(m),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::config::tests::{MINIMAL, errors};
    use crate::config::{Config, SmtpTls};

    #[test]
    fn example_monitor_parses_with_webhook_and_email() {
        let env = |name: &str| match name {
            "WALHOOK_DB_PASSWORD"
            | "CRM_API_KEY"
            | "EVENTGRID_TOPIC_KEY"
            | "SERVICEBUS_SAS_KEY" => Some("x".to_owned()),
            "CRM_SIGNING_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            "ASSETS_CLIENT_SECRET" | "FORMS_PASSWORD" => Some("x".to_owned()),
            _ => None,
        };
        let text = include_str!("../../config.example.toml");
        let c = Config::parse_with_env(text, Path::new("config.example.toml"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.monitors.len(), 1);
        let m = &c.monitors[0];
        assert_eq!(m.name, "ops");
        let w = m.webhook.as_ref().unwrap();
        assert_eq!(
            w.url.expose().as_str(),
            "https://ops.example.com/hooks/walhook-alerts"
        );
        assert_eq!(w.headers[0].0, "X-Team");
        assert!(w.secret.is_none());
        let e = m.email.as_ref().unwrap();
        assert_eq!(e.smtp.redacted(), "smtp://mail.example.com:25");
        assert_eq!(e.smtp.tls, SmtpTls::Plain);
        assert!(e.smtp.credentials.is_none());
        assert_eq!(e.from.to_string(), "walhook <walhook@example.com>");
        assert_eq!(e.to, vec!["dba@example.com".parse().unwrap()]);
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
        let login = e.smtp.credentials.as_ref().unwrap();
        assert_eq!((login.user.as_str(), login.password.expose()), ("w", "pw"));
        assert_eq!(e.smtp.redacted(), "smtps://***@mx.example.com:465");
        assert!(!format!("{m:?}").contains("pw@"));
        assert_eq!(e.to.len(), 2);
        assert_eq!(m.on, vec![AlertKind::ListenerFailing]);
        assert_eq!(m.lag_bytes, 1000);
        assert_eq!(m.min_interval, Duration::from_secs(900));
    }

    #[test]
    fn smtp_passwords_need_tls_unless_explicitly_allowed() {
        let monitor = |smtp: &str| {
            format!(
                "{MINIMAL}[[monitor]]\nname = \"mail\"\n{smtp}\nfrom = \"w@example.com\"\nto = [\"a@example.com\"]\n"
            )
        };
        for plain in [
            "smtp_url = \"smtp://w:pw-secret@mx.example.com\"",
            "smtp_url = \"smtp://w:pw-secret@mx.example.com?tls=opportunistic\"",
            "smtp_url = \"smtp://w@mx.example.com\"\nsmtp_password = \"pw-secret\"",
        ] {
            let lines = errors(&monitor(plain));
            assert_eq!(lines.len(), 1, "{plain}: {lines:?}");
            assert!(
                lines[0].starts_with("walhook.toml:9:12: monitor[0].smtp_url: the SMTP password would be sent without TLS"),
                "{plain}: {lines:?}"
            );
            assert!(
                lines[0].contains("smtp_allow_insecure_password = true"),
                "{lines:?}"
            );
            assert!(!lines[0].contains("pw-secret"), "{lines:?}");
        }
        let allowed = monitor(
            "smtp_url = \"smtp://w:pw@mx.example.com\"\nsmtp_allow_insecure_password = true",
        );
        let c = crate::config::tests::parse(&allowed).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.monitors[0].email.as_ref().unwrap().smtp.tls,
            SmtpTls::Plain
        );
        // Without a password there is nothing to protect.
        assert!(
            crate::config::tests::parse(&monitor("smtp_url = \"smtp://mx.example.com\"")).is_ok()
        );
        assert!(
            crate::config::tests::parse(&monitor(
                "smtp_url = \"smtp://w@mx.example.com?tls=required\"\nsmtp_password = \"pw\""
            ))
            .is_ok()
        );
    }

    #[test]
    fn smtp_password_file_is_read_and_stray_email_keys_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smtp-pw"), "fr0m-file\n").unwrap();
        let text = format!(
            "{MINIMAL}[[monitor]]\nname = \"mail\"\nsmtp_url = \"smtps://walhook@mx.example.com\"\nsmtp_password_file = \"smtp-pw\"\nfrom = \"w@example.com\"\nto = [\"a@example.com\"]\nca_file = \"missing.pem\"\n"
        );
        let e = Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("monitor[0].ca_file: cannot read "), "{e}");
        let text = text.replace("ca_file = \"missing.pem\"\n", "");
        let c = Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let login = c.monitors[0]
            .email
            .as_ref()
            .unwrap()
            .smtp
            .credentials
            .clone()
            .unwrap();
        assert_eq!(
            (login.user.as_str(), login.password.expose()),
            ("walhook", "fr0m-file")
        );

        // A wrong type does not echo the value either.
        let lines = errors(&format!(
            "{MINIMAL}[[monitor]]\nname = \"m\"\nsmtp_password = 98765\n"
        ));
        assert!(
            lines[0].contains("monitor[0].smtp_password: wrong type"),
            "{lines:?}"
        );
        assert!(!lines[0].contains("98765"), "{lines:?}");

        let lines = errors(&format!(
            "{MINIMAL}[[monitor]]\nname = \"hook\"\nurl = \"https://ops.example.com/\"\nsmtp_password_file = \"x\"\n"
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:10:22: monitor[0].smtp_password_file: smtp_password_file applies only to email, but the monitor has no smtp_url; add smtp_url = \"smtp://mail.example.com:25\" or remove smtp_password_file"
            ]
        );
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
                "walhook.toml:14:7: monitor[1].on[0]: unknown alert kind \"everything\"; use one of notification_failed, listener_failing, replication_lag, queue_age, database_unreachable, capture_gap, change_rejected, schema_changed",
                "walhook.toml:15:13: monitor[1].lag_bytes: \"1XB\" has an unknown unit; use a byte count like 1073741824 or a size like \"1GB\" or \"512MB\" (units B, kB, MB, GB, TB; 1 kB = 1024 bytes)",
                "walhook.toml:16:11: monitor[1].lag_for: invalid duration \"soon\"; write a whole number and a unit (ms, s, m, h, d), like \"500ms\", \"5s\", \"10m\", \"2h\" or \"7d\"",
                "walhook.toml:18:1: monitor[2].to: missing key; add to = [\"dba@example.com\"]",
                "walhook.toml:20:12: monitor[2].smtp_url: the SMTP URL must start with smtp:// or smtps://; write smtp://host:25 (plain), smtp://host:587?tls=required (STARTTLS) or smtps://user@host:465 (TLS, password in smtp_password_file)",
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
}

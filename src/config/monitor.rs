//! `[[monitor]]`: who is told when something goes wrong.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use super::listener::RawHeaders;
use super::units::RawSize;
use super::{Str, StrList};
use crate::secret::{Secret, redact_url};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMonitor {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::config::Config;
    use crate::config::tests::{MINIMAL, errors};

    #[test]
    fn example_monitor_parses_with_webhook_and_email() {
        let env = |name: &str| match name {
            "WALHOOK_DB_PASSWORD" | "CRM_API_KEY" => Some("x".to_owned()),
            "CRM_SIGNING_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
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
}

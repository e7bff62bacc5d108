//! `[[listener]]`: where events are delivered.

use std::collections::HashSet;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use super::entity::EntityConfig;
use super::units::parse_rate_limit;
use super::webhook::RawHeaders;
use super::{Str, StrList};
use crate::secret::{SecretUrl, SigningKey};
use crate::tls::CaFile;
use crate::types::{Action, EntityName};

/// One `[[listener]]`: an HTTP endpoint that receives events.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    /// Unique listener name, used in the queue tables and on the command line.
    pub name: String,
    /// The http(s) URL events are POSTed to; it may carry credentials, so messages show
    /// only `url.redacted()`.
    pub url: SecretUrl,
    /// Entities this listener receives; `None` means all.
    pub entities: Option<Vec<EntityName>>,
    /// Actions this listener receives (default: all three).
    pub actions: Vec<Action>,
    /// Extra HTTP headers (`headers` and `header_files`), in file order; values are marked
    /// sensitive.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Standard Webhooks signing key (`secret` or `secret_file`); `None` sends no signature.
    pub secret: Option<SigningKey>,
    /// Extra CA certificates trusted for this listener's TLS, besides the built-in and OS
    /// roots.
    pub ca_file: Option<CaFile>,
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
    /// CloudEvents 1.0 JSON, in the given content mode.
    CloudEvents(CloudEventsMode),
}

/// How a CloudEvent travels (`cloudevents_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudEventsMode {
    /// The whole event as the JSON body (`application/cloudevents+json`); the default.
    Structured,
    /// `data` as the body, every other attribute as a `ce-*` header.
    Binary,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    name: Str,
    url: Str,
    entities: StrList,
    actions: StrList,
    headers: RawHeaders,
    header_files: RawHeaders,
    secret: Str,
    secret_file: Str,
    ca_file: Str,
    timeout: Str,
    rate_limit: Str,
    max_attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<RawBackoff>>,
    concurrency: Option<Spanned<i64>>,
    debounce: Str,
    format: Str,
    cloudevents_mode: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    initial: Str,
    max: Str,
}

pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const DEFAULT_MAX_ATTEMPTS: u32 = 12;
pub(super) const MAX_MAX_ATTEMPTS: i64 = 1000;
pub(super) const DEFAULT_CONCURRENCY: usize = 16;
pub(super) const MAX_CONCURRENCY: i64 = 1000;
pub(super) const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(3600),
};

impl Checker<'_> {
    pub(super) fn listeners(
        &mut self,
        raw: &[Spanned<RawListener>],
        entities: &[EntityConfig],
    ) -> Vec<ListenerConfig> {
        let mut listeners = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for (i, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let l = spanned.get_ref();
            let section = format!("listener[{i}]");
            let key = |k: &str| format!("{section}.{k}");

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
            let listener_entities = l
                .entities
                .as_ref()
                .map(|list| self.listener_entities(list, &key("entities"), entities));
            let actions = self.actions(&l.actions, &key("actions"), &Action::ALL);
            let headers = self.headers(&l.headers, &l.header_files, &section);
            let secret = self.signing_key(&l.secret, &l.secret_file, &key("secret"));
            let ca_file = self.ca_file(&l.ca_file, &key("ca_file"));

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
            let rate_limit = l.rate_limit.as_ref().and_then(|v| {
                let s = self.string(v, &key("rate_limit"))?;
                parse_rate_limit(s.trim())
                    .map_err(|message| {
                        self.report_message(v.span().start, &key("rate_limit"), &message)
                    })
                    .ok()
            });
            let max_attempts = self.count(
                &l.max_attempts,
                &key("max_attempts"),
                MAX_MAX_ATTEMPTS,
                DEFAULT_MAX_ATTEMPTS,
            );
            let backoff = self.backoff(&l.backoff, &section);
            let concurrency = self.count(
                &l.concurrency,
                &key("concurrency"),
                MAX_CONCURRENCY,
                DEFAULT_CONCURRENCY,
            );
            let debounce = self.debounce(&l.debounce, &key("debounce"));
            let format = self.format(&l.format, &key("format"));
            let format = match format {
                ListenerFormat::CloudEvents(_) => {
                    ListenerFormat::CloudEvents(self.cloudevents_mode(l, &key))
                }
            };

            if let (Some(name), Some(url)) = (name, url) {
                listeners.push(ListenerConfig {
                    name,
                    url,
                    entities: listener_entities,
                    actions,
                    headers,
                    secret,
                    ca_file,
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

    /// `entities = [...]`: configured entity names, each once.
    fn listener_entities(
        &mut self,
        list: &Spanned<Vec<Spanned<String>>>,
        key: &str,
        entities: &[EntityConfig],
    ) -> Vec<EntityName> {
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                key,
                "entities is empty, so this listener would receive nothing",
                "list entity names, or remove entities to receive all",
            );
        }
        let mut chosen: Vec<EntityName> = Vec::new();
        for (j, item) in list.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{j}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            match entities.iter().find(|e| e.name.as_str() == s) {
                None => {
                    let known: Vec<&str> = entities.iter().map(|e| e.name.as_str()).collect();
                    self.report(
                        item.span().start,
                        &item_key,
                        &format!("no [[entity]] is named {s:?}"),
                        &format!("use one of the configured entities: {}", known.join(", ")),
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
    }

    /// `backoff = { initial, max }`: initial above 0, max at least initial.
    fn backoff(&mut self, raw: &Option<Spanned<RawBackoff>>, section: &str) -> Backoff {
        let Some(b) = raw else {
            return DEFAULT_BACKOFF;
        };
        let raw_b = b.get_ref();
        let key = |k: &str| format!("{section}.backoff.{k}");
        let initial = self.duration(&raw_b.initial, &key("initial"), DEFAULT_BACKOFF.initial);
        let max = self.duration(&raw_b.max, &key("max"), DEFAULT_BACKOFF.max.max(initial));
        let span_of = |v: &Str| v.as_ref().map_or(b.span().start, |v| v.span().start);
        if initial.is_zero() {
            self.report(
                span_of(&raw_b.initial),
                &key("initial"),
                "initial backoff must be above 0",
                "use a duration like \"5s\"",
            );
        } else if max < initial {
            self.report(
                span_of(&raw_b.max),
                &key("max"),
                "max backoff is shorter than initial",
                "make max at least as long as initial",
            );
        }
        Backoff { initial, max }
    }

    fn debounce(&mut self, raw: &Str, key: &str) -> Duration {
        let debounce = self.duration(raw, key, Duration::ZERO);
        // Not built yet: a window that silently did nothing would surprise a listener
        // that relies on coalescing.
        if !debounce.is_zero()
            && let Some(v) = raw
        {
            self.report(
                v.span().start,
                key,
                "debounce is not supported yet",
                "remove debounce or set debounce = \"0s\"; every change is delivered on its own",
            );
        }
        debounce
    }

    fn format(&mut self, raw: &Str, key: &str) -> ListenerFormat {
        let Some(v) = raw else {
            return ListenerFormat::CloudEvents(CloudEventsMode::Structured);
        };
        let s = self.string(v, key);
        match s.as_deref().map(str::trim).unwrap_or("cloudevents") {
            "cloudevents" => {}
            "eventgrid" | "servicebus" | "form" | "template" => self.report(
                v.span().start,
                key,
                &format!(
                    "format {:?} is not supported yet",
                    s.as_deref().unwrap_or_default()
                ),
                "use format = \"cloudevents\"",
            ),
            _ => self.report(
                v.span().start,
                key,
                &format!("unknown format {:?}", s.as_deref().unwrap_or_default()),
                "use format = \"cloudevents\"",
            ),
        }
        ListenerFormat::CloudEvents(CloudEventsMode::Structured)
    }

    /// `cloudevents_mode`: structured (the event as the body) or binary (ce-* headers).
    fn cloudevents_mode(
        &mut self,
        l: &RawListener,
        key: &dyn Fn(&str) -> String,
    ) -> CloudEventsMode {
        let Some(v) = &l.cloudevents_mode else {
            return CloudEventsMode::Structured;
        };
        match self
            .string(v, &key("cloudevents_mode"))
            .as_deref()
            .map(str::trim)
        {
            None | Some("structured") => CloudEventsMode::Structured,
            Some("binary") => CloudEventsMode::Binary,
            Some(other) => {
                self.report(
                    v.span().start,
                    &key("cloudevents_mode"),
                    &format!("unknown CloudEvents content mode {other:?}"),
                    "use cloudevents_mode = \"structured\" (the event as the body) or \"binary\" (ce-* headers, data as the body)",
                );
                CloudEventsMode::Structured
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;
    use crate::config::tests::{MINIMAL, errors, parse};

    fn listener(extra: &str) -> String {
        format!("{MINIMAL}\n[[listener]]\nname = \"crm\"\n{extra}")
    }

    #[test]
    fn urls_that_cannot_be_sent_to_are_refused_at_load() {
        let lines = errors(&listener("url = \"http://127.0.0.1:99999/x\"\n"));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:10:7: listener[0].url: the URL's port is not a number from 1 to 65535; write an http:// or https:// URL like \"https://example.com/hooks/walhook\""
            ]
        );
        let lines = errors(&listener(
            "url = \"https://tok:s3cr3t@exa mple.com/?k=v\"\n",
        ));
        assert!(
            lines[0].contains("the URL contains whitespace"),
            "{lines:?}"
        );
        assert!(!lines[0].contains("s3cr3t"), "{lines:?}");
    }

    #[test]
    fn header_values_must_be_visible_ascii_and_are_never_echoed() {
        let lines = errors(&listener(
            "url = \"https://example.com/\"\nheaders = { \"X-Name\" = \"Zoë-secret\" }\n",
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:11:24: listener[0].headers.X-Name: header value contains a non-ASCII character, which HTTP header values cannot carry; encode the value as the receiver expects (percent-encoding or base64), or remove the character"
            ]
        );
    }

    #[test]
    fn secrets_and_header_values_come_from_files_including_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(
            creds.join("signing"),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("api-key"), "k3y-from-file\n").unwrap();
        let text = listener(
            "url = \"https://example.com/\"\nsecret_file = \"%d/signing\"\nheaders = { \"X-Tenant\" = \"north\" }\nheader_files = { \"X-Api-Key\" = \"api-key\" }\n",
        );
        let creds_dir = creds.display().to_string();
        let env = |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| creds_dir.clone());
        let c = Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
        let l = &c.listeners[0];
        assert!(l.secret.is_some());
        let headers: Vec<(&str, &str)> = l
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            headers,
            [("x-tenant", "north"), ("x-api-key", "k3y-from-file")]
        );
        assert!(l.headers.iter().all(|(_, v)| v.is_sensitive()));

        // Without systemd's variable, %d/ cannot be resolved.
        let e = Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listener[0].secret_file: %d/ stands for systemd's credentials directory, but CREDENTIALS_DIRECTORY is not set"),
            "{e}"
        );
    }

    #[test]
    fn secret_and_secret_file_together_and_duplicate_headers_across_maps_are_refused() {
        let lines = errors(&listener(
            "url = \"https://example.com/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nsecret_file = \"s\"\nheaders = { \"X-Key\" = \"a\" }\nheader_files = { \"x-key\" = \"f\" }\n",
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:12:15: listener[0].secret_file: both secret and secret_file are set; keep only one of them",
                "walhook.toml:14:18: listener[0].header_files.x-key: header \"x-key\" is listed twice (header names ignore case); keep one of them",
            ]
        );
    }

    #[test]
    fn signing_secrets_shorter_than_24_bytes_are_refused() {
        // base64 of 16 bytes: a common mistake is a hex or short random string.
        let lines = errors(&listener(
            "url = \"https://example.com/\"\nsecret = \"whsec_MDEyMzQ1Njc4OWFiY2RlZg==\"\n",
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("walhook.toml:11:10: listener[0].secret: the signing secret is only 16 bytes long, fewer than the 24 Standard Webhooks requires"),
            "{lines:?}"
        );
        assert!(!lines[0].contains("MDEyMzQ1"), "{lines:?}");
    }

    #[test]
    fn ca_file_is_read_at_load_and_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
        let path = dir.path().join("walhook.toml");
        let parse_in_dir = |text: &str| Config::parse_with_env(text, Path::new(&path), &|_| None);
        let c = parse_in_dir(&listener(
            "url = \"https://example.com/\"\nca_file = \"ca.pem\"\n",
        ))
        .unwrap();
        assert_eq!(
            c.listeners[0]
                .ca_file
                .as_ref()
                .unwrap()
                .certificates()
                .len(),
            1
        );
        let e = parse_in_dir(&listener(
            "url = \"https://example.com/\"\nca_file = \"junk.pem\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(":11:11: listener[0].ca_file: "), "{e}");
        assert!(e.contains("junk.pem holds no PEM certificate"), "{e}");
        let e = parse_in_dir(&listener(
            "url = \"https://example.com/\"\nca_file = \"nope.pem\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot read ") && e.contains("nope.pem"), "{e}");
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
}

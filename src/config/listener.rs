//! `[[listener]]`: where events are delivered.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use super::entity::EntityConfig;
use super::position::display_key;
use super::units::parse_rate_limit;
use super::{Str, StrList};
use crate::secret::{Secret, redact_url};
use crate::types::{Action, EntityName};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
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
pub(super) struct RawBackoff {
    initial: Str,
    max: Str,
}

pub(super) type RawHeaders = Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>;

pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const DEFAULT_MAX_ATTEMPTS: u32 = 12;
pub(super) const MAX_MAX_ATTEMPTS: i64 = 1000;
pub(super) const DEFAULT_CONCURRENCY: usize = 16;
pub(super) const MAX_CONCURRENCY: i64 = 1000;
pub(super) const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(3600),
};
/// Headers walhook sets itself; a configured value would be overwritten or break delivery.
pub(super) const RESERVED_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

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

    pub(super) fn header_map(&mut self, raw: &RawHeaders, key: &str) -> Vec<(String, Secret)> {
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

    /// A required http(s) URL (listener or monitor webhook); `None` (reported) otherwise.
    pub(super) fn http_url(
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
    pub(super) fn signing_secret(&mut self, value: &Str, key: &str) -> Option<Secret> {
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
}

/// Checks that `url` is an absolute http(s) URL with a host; the message never repeats the URL.
pub(super) fn check_http_url(url: &str) -> Result<(), String> {
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
    use crate::config::tests::{MINIMAL, errors, parse};

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

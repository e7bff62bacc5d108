//! `[[listener]]`: where events are delivered.

use std::collections::HashSet;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_spanned::Spanned;

use super::admin::AdminConfig;
use super::auth::{ListenerAuth, RawAuth};
use super::azure::{EventGridConfig, ServiceBusConfig, at as start_of, received};
use super::check::Checker;
use super::condition::RawCondition;
use super::debounce::{Debounce, RawDebounce};
use super::entity::EntityConfig;
use super::event_types::{EventTypes, RawEventTypes};
use super::form::{FormConfig, RawFormFields};
use super::nats::{NatsConfig, RawNats};
use super::template::TemplateConfig;
use super::units::{RawSize, parse_rate_limit};
use super::webhook::RawHeaders;
use super::{Str, StrList};
use crate::condition::Condition;
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
    /// Row actions this listener receives (default: all).
    pub actions: Vec<Action>,
    /// Derived actions (`[[entity.action]]` names) this listener receives (default: all of
    /// its entities').
    pub derived_actions: Vec<String>,
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
    /// How changes to one entity are coalesced; `None` delivers each on its own (default).
    pub debounce: Option<Debounce>,
    /// Payload format (default CloudEvents).
    pub format: ListenerFormat,
    /// Only events whose row (the old row for deletes) matches this are delivered;
    /// `None` delivers all.
    pub filter: Option<Condition>,
    /// `Some` for a `nats://` or `tls://` url: the listener publishes to NATS JetStream.
    pub nats: Option<NatsConfig>,
    /// What each action is sent as, where the format has an event type (`event_types`).
    pub event_types: EventTypes,
    /// Most events in one message (default 1: no batching; up to 1000).
    pub batch_size: usize,
    /// Most bytes of one batch's body (default 1 MiB); an event larger than this goes alone.
    pub batch_bytes: u64,
    /// How walhook authenticates to the listener (`auth`); `None`: only `headers` and the url.
    pub auth: Option<ListenerAuth>,
}

impl ListenerConfig {
    /// Whether it keeps a cursor over `walhook.event` (a NATS listener with
    /// `position = "cursor"`) instead of getting one `walhook.new` row per event.
    pub fn keeps_cursor(&self) -> bool {
        self.nats
            .as_ref()
            .is_some_and(|n| n.position == super::nats::Position::Cursor)
    }
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
#[derive(Clone, Debug, PartialEq)]
pub enum ListenerFormat {
    /// CloudEvents 1.0 JSON, in the given content mode.
    CloudEvents(CloudEventsMode),
    /// The Azure Event Grid event schema, to a validated webhook or an Event Grid topic.
    EventGrid(EventGridConfig),
    /// Azure Service Bus messages, one topic or queue per entity.
    ServiceBus(ServiceBusConfig),
    /// A posted HTML form (`application/x-www-form-urlencoded`).
    Form(FormConfig),
    /// A body rendered from the listener's template.
    Template(TemplateConfig),
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
    debounce: Option<Spanned<RawDebounce>>,
    format: Str,
    cloudevents_mode: Str,
    filter: Option<Spanned<RawCondition>>,
    nats: Option<Spanned<RawNats>>,
    pub(super) event_types: RawEventTypes,
    pub(super) eventgrid_topic: Option<Spanned<bool>>,
    pub(super) aeg_sas_key: Str,
    pub(super) aeg_sas_key_file: Str,
    pub(super) topic: Str,
    pub(super) data_version: Str,
    pub(super) sas_key_name: Str,
    pub(super) sas_key: Str,
    pub(super) sas_key_file: Str,
    pub(super) sas_token_ttl: Str,
    pub(super) on_behalf_of: Str,
    pub(super) user_properties: Option<Spanned<bool>>,
    template: Str,
    batch_template: Str,
    content_type: Str,
    form_fields: RawFormFields,
    form_columns: Option<Spanned<bool>>,
    batch_size: Option<Spanned<i64>>,
    batch_bytes: Option<Spanned<RawSize>>,
    auth: Option<Spanned<RawAuth>>,
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
pub(super) const MAX_BATCH_SIZE: i64 = 1000;
pub(super) const DEFAULT_BATCH_BYTES: u64 = 1 << 20;
pub(super) const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(3600),
};

impl Checker<'_> {
    pub(super) fn listeners(
        &mut self,
        raw: &[Spanned<RawListener>],
        entities: &[EntityConfig],
        admin: Option<&AdminConfig>,
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
            let url = self.listener_url(
                &l.url,
                &key("url"),
                at,
                "\"https://example.com/hooks/walhook\"",
            );
            let listener_entities = l
                .entities
                .as_ref()
                .map(|list| self.listener_entities(list, &key("entities"), entities));
            let (actions, derived_actions) = self.listener_actions(
                &l.actions,
                &key("actions"),
                listener_entities.as_deref(),
                entities,
            );
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
            let nats = self.listener_nats(
                l.nats.as_ref(),
                url.as_ref(),
                [&l.secret, &l.secret_file],
                &section,
            );
            let debounce = self.debounce(&l.debounce, &key("debounce"));
            self.nats_position_conflicts(
                nats.as_ref(),
                l.nats.as_ref(),
                debounce.is_some(),
                &section,
            );
            let batch_size = self.count(&l.batch_size, &key("batch_size"), MAX_BATCH_SIZE, 1usize);
            self.nats_batch(
                nats.is_some(),
                batch_size,
                &l.batch_size,
                &key("batch_size"),
            );
            let batch_bytes = self.size(&l.batch_bytes, &key("batch_bytes"), DEFAULT_BATCH_BYTES);
            let auth = l.auth.as_ref().and_then(|a| self.auth(a, &key("auth")));
            if let (Some(a), Some(_)) = (&l.auth, &auth) {
                self.auth_conflicts(a.span().start, &key("auth"), &headers, url.as_ref());
            }
            if batch_size <= 1
                && let Some(v) = &l.batch_template
            {
                self.report(
                    v.span().start,
                    &key("batch_template"),
                    "batch_template is used only when batch_size is above 1",
                    "set batch_size (events per request), or remove batch_template",
                );
            }
            let kind = self.format(&l.format, &key("format"));
            self.nats_format(nats.is_some(), kind.name(), &l.format, &key("format"));
            self.keys_of_other_formats(&format_keys(l), kind.name(), &section);
            let event_types = self.event_types(&l.event_types, &key("event_types"));
            let format = match kind {
                FormatKind::CloudEvents => {
                    Some(ListenerFormat::CloudEvents(self.cloudevents_mode(l, &key)))
                }
                FormatKind::EventGrid => {
                    let format_at = start_of(&l.format).unwrap_or(at);
                    self.eventgrid(l, &section, format_at, admin)
                        .map(ListenerFormat::EventGrid)
                }
                FormatKind::ServiceBus => {
                    let receives = received(entities, listener_entities.as_deref());
                    self.servicebus_event_types(l, &section, at, &event_types, &actions, &receives);
                    self.servicebus(l, &section, at)
                        .map(ListenerFormat::ServiceBus)
                }
                FormatKind::Form => {
                    if let Some(v) = l.batch_size.as_ref().filter(|_| batch_size > 1) {
                        self.report(
                            v.span().start,
                            &key("batch_size"),
                            "a form post carries one event",
                            "remove batch_size, or use format = \"template\" or \"cloudevents\" to send batches",
                        );
                    }
                    Some(ListenerFormat::Form(self.form(
                        &l.form_fields,
                        l.form_columns.as_ref(),
                        &section,
                    )))
                }
                FormatKind::Template => self
                    .template_format(
                        &l.template,
                        &l.batch_template,
                        &l.content_type,
                        at,
                        &section,
                    )
                    .map(ListenerFormat::Template),
            };

            let filter = self.listener_filter(
                &l.filter,
                &key("filter"),
                listener_entities.as_deref(),
                entities,
            );

            if let Some(format) = &format {
                self.azure_headers(
                    format,
                    &headers,
                    &section,
                    start_of(&l.format).unwrap_or(at),
                );
            }
            if let (Some(name), Some(url), Some(format)) = (name, url, format) {
                listeners.push(ListenerConfig {
                    name,
                    url,
                    entities: listener_entities,
                    actions,
                    derived_actions,
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
                    filter,
                    nats,
                    event_types,
                    batch_size,
                    batch_bytes,
                    auth,
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

    fn format(&mut self, raw: &Str, key: &str) -> FormatKind {
        let Some(v) = raw else {
            return FormatKind::CloudEvents;
        };
        let s = self.string(v, key);
        let name = s.as_deref().map(str::trim).unwrap_or("cloudevents");
        if let Some(kind) = FormatKind::ALL.into_iter().find(|k| k.name() == name) {
            return kind;
        }
        let known: Vec<String> = FormatKind::ALL
            .iter()
            .map(|k| format!("\"{}\"", k.name()))
            .collect();
        self.report(
            v.span().start,
            key,
            &format!("format {name:?} is unknown"),
            &format!("use format = {}", known.join(", ")),
        );
        FormatKind::CloudEvents
    }

    /// `auth` sets the Authorization header: a configured one, or credentials in the url
    /// (which the HTTP client would send as Basic), would compete with it.
    fn auth_conflicts(
        &mut self,
        at: usize,
        key: &str,
        headers: &[(HeaderName, HeaderValue)],
        url: Option<&SecretUrl>,
    ) {
        if headers
            .iter()
            .any(|(n, _)| n == http::header::AUTHORIZATION)
        {
            self.report(
                at,
                key,
                "auth and an Authorization header are both set",
                "keep auth, and remove Authorization from headers / header_files",
            );
        }
        if let Some(url) = url
            && (!url.expose().username().is_empty() || url.expose().password().is_some())
        {
            self.report(
                at,
                key,
                "auth is set and the url carries user:password@ as well",
                "remove the credentials from the url (auth = { basic = { user, password } } sends them)",
            );
        }
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

/// The formats `format = …` names; each builds its [`ListenerFormat`] from its own keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FormatKind {
    CloudEvents,
    EventGrid,
    ServiceBus,
    Form,
    Template,
}

impl FormatKind {
    const ALL: [FormatKind; 5] = [
        FormatKind::CloudEvents,
        FormatKind::EventGrid,
        FormatKind::ServiceBus,
        FormatKind::Form,
        FormatKind::Template,
    ];

    fn name(self) -> &'static str {
        match self {
            FormatKind::CloudEvents => "cloudevents",
            FormatKind::EventGrid => "eventgrid",
            FormatKind::ServiceBus => "servicebus",
            FormatKind::Form => "form",
            FormatKind::Template => "template",
        }
    }
}

/// The format-specific keys of a listener: name, where it is set, the formats using it.
fn format_keys(l: &RawListener) -> Vec<(&'static str, Option<usize>, &'static [&'static str])> {
    const EVENTGRID: &[&str] = &["eventgrid"];
    const SERVICEBUS: &[&str] = &["servicebus"];
    const AZURE: &[&str] = &["eventgrid", "servicebus"];
    const TYPED: &[&str] = &["eventgrid", "servicebus", "template"];
    const TEMPLATE: &[&str] = &["template"];
    const FORM: &[&str] = &["form"];
    vec![
        (
            "cloudevents_mode",
            start_of(&l.cloudevents_mode),
            &["cloudevents"],
        ),
        ("event_types", start_of(&l.event_types), TYPED),
        ("template", start_of(&l.template), TEMPLATE),
        ("batch_template", start_of(&l.batch_template), TEMPLATE),
        ("content_type", start_of(&l.content_type), TEMPLATE),
        ("form_fields", start_of(&l.form_fields), FORM),
        ("form_columns", start_of(&l.form_columns), FORM),
        ("eventgrid_topic", start_of(&l.eventgrid_topic), EVENTGRID),
        ("aeg_sas_key", start_of(&l.aeg_sas_key), EVENTGRID),
        ("aeg_sas_key_file", start_of(&l.aeg_sas_key_file), EVENTGRID),
        ("topic", start_of(&l.topic), AZURE),
        ("data_version", start_of(&l.data_version), EVENTGRID),
        ("sas_key_name", start_of(&l.sas_key_name), SERVICEBUS),
        ("sas_key", start_of(&l.sas_key), SERVICEBUS),
        ("sas_key_file", start_of(&l.sas_key_file), SERVICEBUS),
        ("sas_token_ttl", start_of(&l.sas_token_ttl), SERVICEBUS),
        ("on_behalf_of", start_of(&l.on_behalf_of), SERVICEBUS),
        ("user_properties", start_of(&l.user_properties), SERVICEBUS),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::tests::{MINIMAL, errors, parse};
    use crate::config::{Config, ListenerFormat};

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
                "walhook.toml:16:10: listener[0].format: an Event Grid webhook is validated through walhook's admin endpoint, and there is no [admin] section; add [admin] with listen and public_url (the address the listener can reach), or set eventgrid_topic = true for an Event Grid topic endpoint",
                "walhook.toml:19:8: listener[1].name: listener \"a\" is defined twice; give each [[listener]] its own name",
                "walhook.toml:21:10: listener[1].format: format \"xml\" is unknown; use format = \"cloudevents\", \"eventgrid\", \"servicebus\", \"form\", \"template\"",
            ]
        );
    }

    #[test]
    fn an_unknown_template_placeholder_names_its_line_and_column_in_the_file() {
        // Line 11 is `template = ...`; the placeholder sits after an escaped quote.
        let lines = errors(&listener(
            "url = \"https://example.com/\"\nformat = \"template\"\ntemplate = \"{\\\"Data\\\": {\\\"BaseId\\\": \\\"{idd}\\\"}}\"\n",
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:12:39: listener[0].template: unknown placeholder {idd} (a column is written {row.idd}); use one of {id}, {entity}, {action}, {action_code}, {event_id}, {time}, {changed_fields}, {subject}, {source_system}, {source_table}, {commit_lsn}, {row}, {old}, {row.COLUMN} or {old.COLUMN}; write {{ for a literal {"
            ]
        );
        // A multi-line literal string: the position is on the placeholder's own line.
        let lines = errors(&listener(
            "url = \"https://example.com/\"\nformat = \"template\"\ntemplate = '''\n{\n  \"Type\": {action_cod}\n}'''\n",
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "walhook.toml:14:11: listener[0].template: unknown placeholder {action_cod}"
            ),
            "{lines:?}"
        );
    }

    #[test]
    fn template_form_and_batch_keys_are_checked_against_the_format() {
        let c = parse(&listener(
            "url = \"https://example.com/\"\nformat = \"template\"\ntemplate = '{\"id\": \"{id}\"}'\nbatch_size = 10\nbatch_bytes = \"64kB\"\nbatch_template = '{\"n\": {count}, \"e\": [{events}]}'\n",
        ))
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!((l.batch_size, l.batch_bytes), (10, 64 << 10));
        let ListenerFormat::Template(t) = &l.format else {
            panic!("{:?}", l.format)
        };
        assert_eq!(t.content_type, "application/json");
        assert!(t.batch.uses(&crate::config::Field::Count));

        let c = parse(&listener(
            "url = \"https://example.com/\"\nformat = \"form\"\nform_fields = { id = \"BaseId\", time = \"\", action_code = \"ChangeType\" }\nform_columns = false\n",
        ))
        .unwrap();
        let ListenerFormat::Form(f) = &c.listeners[0].format else {
            panic!()
        };
        let names: Vec<&str> = f.fields.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "entity",
                "BaseId",
                "action",
                "changedFields",
                "eventId",
                "ChangeType"
            ]
        );
        assert!(!f.columns);
        assert_eq!(c.listeners[0].batch_size, 1);

        let lines = errors(&listener(
            "url = \"https://example.com/\"\nformat = \"form\"\nbatch_size = 5\ntemplate = \"{id}\"\nform_fields = { nope = \"x\" }\n",
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:12:14: listener[0].batch_size: a form post carries one event; remove batch_size, or use format = \"template\" or \"cloudevents\" to send batches",
                "walhook.toml:13:12: listener[0].template: template applies to format = \"template\", and this listener has format = \"form\"; remove template, or change the format",
                "walhook.toml:14:17: listener[0].form_fields.nope: unknown form field \"nope\"; use one of entity, id, action, action_code, changed_fields, event_id, time, subject, source_system, source_table, commit_lsn (columns of the row are sent with form_columns = true)",
            ]
        );
        let lines = errors(&listener(
            "url = \"https://example.com/\"\nformat = \"template\"\nbatch_template = \"[{events}]\"\ncontent_type = \"json\"\nbatch_size = 0\n",
        ));
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(
            lines[0].contains("listener[0].template: missing key"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("batch_template is used only when batch_size is above 1"),
            "{lines:?}"
        );
        assert!(
            lines[2].contains("content_type: \"json\" is not a media type"),
            "{lines:?}"
        );
        assert!(
            lines[3]
                .contains("batch_size: 0 is out of range; use a number from 1 to 1000 (default 1)"),
            "{lines:?}"
        );
    }

    #[test]
    fn auth_cannot_share_the_authorization_header_or_url_credentials() {
        let lines = errors(&listener(
            "url = \"https://u:p4ss@example.com/\"\nheaders = { Authorization = \"Bearer x\" }\nauth = { bearer = \"tok3n\" }\n",
        ));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("auth and an Authorization header are both set"));
        assert!(lines[1].contains("auth is set and the url carries user:password@ as well"));
        assert!(!lines.join("\n").contains("p4ss") && !lines.join("\n").contains("tok3n"));
    }
}

//! `[listener.nats]`: a listener whose url is `nats://…` or `tls://…` publishes to NATS
//! JetStream. Here: the url, the subject template, the connection's credentials and the
//! stream `walhook setup` creates and `walhook check` looks for.

use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;
use url::Url;

use super::check::{Checker, substitute};
use super::{Str, StrList};
use crate::secret::{Secret, SecretUrl};
use crate::types::Action;

/// The subject of a listener that sets none: one subject per entity, lower case.
pub const DEFAULT_SUBJECT: &str = "api.event.{entity}";
/// How long a stream keeps messages unless `max_age` says otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// JetStream's own default duplicate window.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// JetStream clusters replicate a stream on at most 5 servers.
const MAX_REPLICAS: i64 = 5;

/// How a `nats://` or `tls://` listener publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct NatsConfig {
    /// The subject each event is published to.
    pub subject: SubjectTemplate,
    /// How the connection authenticates; `None`: no credentials, or those in the url.
    pub auth: Option<NatsAuth>,
    /// `tls://`: the connection must use TLS (a `nats://` one uses it when the server asks).
    pub require_tls: bool,
    /// The stream that captures the subjects, for `walhook setup` and `walhook check`.
    pub stream: Option<StreamSettings>,
    /// How the listener keeps its place in the event log.
    pub position: Position,
}

/// `position`: how a NATS listener keeps its place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Position {
    /// One `walhook.new` row per event, claimed, leased and moved like any listener's.
    #[default]
    Queue,
    /// One row in `walhook.listener_cursor`: the last `walhook.event` passed. No per-event
    /// queue rows, so no fan-out, claim or move per event; retries happen in place and the
    /// stream's duplicate window absorbs what a restart publishes again.
    Cursor,
}

impl Position {
    /// The name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Position::Queue => "queue",
            Position::Cursor => "cursor",
        }
    }
}

/// NATS credentials, one kind per listener. Never printed.
#[derive(Clone, Debug, PartialEq)]
pub enum NatsAuth {
    /// The content of a `.creds` file (user JWT and NKey seed), checked at load.
    Credentials(Secret),
    /// An NKey seed (`SU…`), checked at load.
    NKey(Secret),
    /// A token.
    Token(Secret),
    /// A user name and its password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
}

/// `[listener.nats.stream]`: the JetStream stream walhook's subjects go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    /// Stream name (letters, digits, `-`, `_`).
    pub name: String,
    /// Subjects the stream captures (default: the subject template with `*` for each
    /// placeholder).
    pub subjects: Vec<String>,
    /// What the stream keeps messages for.
    pub retention: Retention,
    /// File or memory storage.
    pub storage: Storage,
    /// Copies in a JetStream cluster (1 to 5).
    pub replicas: usize,
    /// Messages older than this are removed; zero keeps them until other limits apply.
    pub max_age: Duration,
    /// Publishes with a `Nats-Msg-Id` already seen within this window are dropped.
    pub duplicate_window: Duration,
}

/// JetStream retention policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Kept until a limit (age, count, size) removes them: replay for any consumer.
    Limits,
    /// Kept while some consumer has not acknowledged them.
    Interest,
    /// Removed once one consumer acknowledges them.
    WorkQueue,
}

/// Where a stream keeps its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// On disk.
    File,
    /// In memory (lost when the server stops).
    Memory,
}

/// A subject such as `api.event.{entity}`: literal tokens and whole-token placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Text(String),
    Entity,
    Action,
}

impl SubjectTemplate {
    /// Parses a template; the message names the problem and the fix.
    pub fn parse(text: &str) -> Result<SubjectTemplate, String> {
        let mut tokens = Vec::new();
        for token in text.split('.') {
            let parsed = match token {
                "{entity}" => Token::Entity,
                "{action}" => Token::Action,
                "" => {
                    return Err(format!(
                        "subject {text:?} has an empty token; write tokens separated by single dots, like \"api.event.{{entity}}\""
                    ));
                }
                t if t.contains(['{', '}']) => {
                    return Err(format!(
                        "subject token {t:?} is not a placeholder; placeholders are whole tokens, {{entity}} or {{action}}, like \"api.event.{{entity}}.{{action}}\""
                    ));
                }
                t if t.contains(['*', '>']) => {
                    return Err(format!(
                        "subject {text:?} contains a wildcard; walhook publishes to concrete subjects: use {{entity}} or {{action}} instead"
                    ));
                }
                t if t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                    return Err(format!(
                        "subject {text:?} contains whitespace; NATS subjects cannot, remove it"
                    ));
                }
                t => Token::Text(t.to_owned()),
            };
            tokens.push(parsed);
        }
        Ok(SubjectTemplate {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The subject of one event: entity and action in lower case.
    pub fn render(&self, entity: &str, action: Action) -> String {
        let mut out = String::with_capacity(self.text.len() + entity.len());
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match token {
                Token::Text(t) => out.push_str(t),
                Token::Entity => out.extend(entity.chars().map(|c| c.to_ascii_lowercase())),
                Token::Action => out.push_str(action.config_name()),
            }
        }
        out
    }

    /// The subject filter matching every rendered subject of one-token entity names:
    /// each placeholder becomes `*`.
    pub fn wildcard(&self) -> String {
        let parts: Vec<&str> = self
            .tokens
            .iter()
            .map(|t| match t {
                Token::Text(t) => t.as_str(),
                Token::Entity | Token::Action => "*",
            })
            .collect();
        parts.join(".")
    }

    /// Whether `{action}` is part of the subject.
    pub fn uses_action(&self) -> bool {
        self.tokens.contains(&Token::Action)
    }
}

impl std::fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
    subject: Str,
    credentials_file: Str,
    nkey_seed: Str,
    nkey_seed_file: Str,
    token: Str,
    token_file: Str,
    user: Str,
    password: Str,
    password_file: Str,
    stream: Option<Spanned<RawStream>>,
    position: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    name: Str,
    subjects: StrList,
    retention: Str,
    storage: Str,
    replicas: Option<Spanned<i64>>,
    max_age: Str,
    duplicate_window: Str,
}

/// Whether a listener url names a NATS server rather than an HTTP endpoint.
fn is_nats_url(text: &str) -> bool {
    let lower = text.trim_start().to_ascii_lowercase();
    lower.starts_with("nats://") || lower.starts_with("tls://")
}

/// Parses a `nats://` or `tls://` url with a host (port default 4222).
fn parse_nats_url(text: &str) -> Result<Url, String> {
    if text.trim().chars().any(char::is_whitespace) {
        return Err("the URL contains whitespace".to_owned());
    }
    let url = Url::parse(text.trim()).map_err(|e| match e {
        url::ParseError::InvalidPort => "the URL's port is not a number from 1 to 65535".to_owned(),
        e => format!("the URL is not valid ({e})"),
    })?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    if url.port() == Some(0) {
        return Err("the URL's port is not a number from 1 to 65535".to_owned());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err("a NATS URL has no path or query".to_owned());
    }
    Ok(url)
}

impl Checker<'_> {
    /// A listener's url: `nats://` and `tls://` name a NATS server, anything else must be
    /// an http(s) URL.
    pub(super) fn listener_url(
        &mut self,
        value: &Str,
        key: &str,
        section_at: usize,
        example: &str,
    ) -> Option<SecretUrl> {
        match value {
            Some(v) if substitute(v.get_ref(), self.env).is_ok_and(|s| is_nats_url(&s)) => {
                self.nats_url(v, key)
            }
            _ => self.http_url(value, key, section_at, example),
        }
    }

    /// The NATS settings of a listener: `Some` exactly when its url is a NATS url. An HTTP
    /// listener with `[listener.nats]`, or a NATS one with a signing secret, is reported.
    pub(super) fn listener_nats(
        &mut self,
        raw: Option<&Spanned<RawNats>>,
        url: Option<&SecretUrl>,
        signing: [&Str; 2],
        section: &str,
    ) -> Option<NatsConfig> {
        let Some(url) = url.filter(|u| is_nats_url(u.expose().as_str())) else {
            if let Some(n) = raw {
                self.report(
                    n.span().start,
                    &format!("{section}.nats"),
                    "NATS settings need a nats:// or tls:// url",
                    "set url = \"nats://host:4222\", or remove [listener.nats] from this HTTP listener",
                );
            }
            return None;
        };
        if let Some(v) = signing.into_iter().flatten().next() {
            self.report(
                v.span().start,
                &format!("{section}.secret"),
                "a NATS listener is not signed (the connection is authenticated instead)",
                "remove secret/secret_file; set credentials in [listener.nats] (credentials_file, nkey_seed, token or user and password)",
            );
        }
        Some(self.nats(raw, url, section))
    }

    /// The formats a NATS listener can publish. The Azure formats' settings (Event Grid's
    /// validation handshake, Service Bus's SAS keys and topics) belong to their HTTP APIs.
    pub(super) fn nats_format(&mut self, nats: bool, format: &str, raw: &Str, key: &str) {
        if nats
            && format != "cloudevents"
            && let Some(v) = raw
        {
            self.report(
                v.span().start,
                key,
                &format!("format {format:?} is not available for a NATS listener yet"),
                "use format = \"cloudevents\" (structured or binary) for nats:// and tls:// urls",
            );
        }
    }

    /// A NATS listener publishes one message per event: each has its own subject and
    /// `Nats-Msg-Id`, which a batch would merge.
    pub(super) fn nats_batch(
        &mut self,
        nats: bool,
        batch_size: usize,
        raw: &Option<Spanned<i64>>,
        key: &str,
    ) {
        if nats
            && batch_size > 1
            && let Some(v) = raw
        {
            self.report(
                v.span().start,
                key,
                "a NATS listener publishes one message per event (its own subject and Nats-Msg-Id)",
                "remove batch_size; raise concurrency for more messages in flight",
            );
        }
    }

    /// The url of a `nats://` / `tls://` listener; `None` (reported) when invalid.
    fn nats_url(&mut self, value: &Spanned<String>, key: &str) -> Option<SecretUrl> {
        let text = self.string(value, key)?;
        match parse_nats_url(&text) {
            Ok(url) => Some(SecretUrl::new(url)),
            Err(problem) => {
                self.report(
                    value.span().start,
                    key,
                    &problem,
                    "write a NATS URL like \"nats://127.0.0.1:4222\" (or tls://host:4222 to require TLS)",
                );
                None
            }
        }
    }

    /// `[listener.nats]` of a listener with a NATS url (`raw` may be absent: defaults).
    fn nats(
        &mut self,
        raw: Option<&Spanned<RawNats>>,
        url: &SecretUrl,
        section: &str,
    ) -> NatsConfig {
        let key = |k: &str| format!("{section}.nats.{k}");
        let require_tls = url.expose().scheme().eq_ignore_ascii_case("tls");
        let Some(spanned) = raw else {
            return NatsConfig {
                subject: default_subject(),
                auth: None,
                require_tls,
                stream: None,
                position: Position::Queue,
            };
        };
        let n = spanned.get_ref();
        let subject = match &n.subject {
            None => default_subject(),
            Some(v) => self
                .string(v, &key("subject"))
                .and_then(|s| match SubjectTemplate::parse(s.trim()) {
                    Ok(t) => Some(t),
                    Err(message) => {
                        self.report_message(v.span().start, &key("subject"), &message);
                        None
                    }
                })
                .unwrap_or_else(default_subject),
        };
        let auth = self.nats_auth(n, spanned.span().start, &key);
        let stream = n
            .stream
            .as_ref()
            .map(|s| self.stream(s, &subject, &format!("{section}.nats.stream")));
        let position = self.position(&n.position, &key("position"));
        NatsConfig {
            subject,
            auth,
            require_tls,
            stream,
            position,
        }
    }

    /// `position = "queue" | "cursor"`.
    fn position(&mut self, raw: &Str, key: &str) -> Position {
        let Some(v) = raw else {
            return Position::Queue;
        };
        let Some(text) = self.string(v, key) else {
            return Position::Queue;
        };
        match text.trim() {
            "queue" => Position::Queue,
            "cursor" => Position::Cursor,
            other => {
                self.report(
                    v.span().start,
                    key,
                    &format!("position {other:?} is not known"),
                    "write position = \"queue\" (one walhook.new row per event, the default) or \"cursor\" (a position over walhook.event)",
                );
                Position::Queue
            }
        }
    }

    /// A cursor listener has no per-event rows to hold a debounce window's changes.
    pub(super) fn nats_position_conflicts(
        &mut self,
        nats: Option<&NatsConfig>,
        raw_nats: Option<&Spanned<RawNats>>,
        debounce: bool,
        section: &str,
    ) {
        if debounce
            && nats.is_some_and(|n| n.position == Position::Cursor)
            && let Some(at) = raw_nats.and_then(|n| n.get_ref().position.as_ref())
        {
            self.report(
                at.span().start,
                &format!("{section}.nats.position"),
                "position = \"cursor\" cannot be combined with debounce (a debounce window collects changes in per-event queue rows)",
                "remove debounce, or set position = \"queue\"",
            );
        }
    }

    /// At most one kind of credentials, each checked as far as it can be without a server.
    fn nats_auth(
        &mut self,
        n: &RawNats,
        at: usize,
        key: &dyn Fn(&str) -> String,
    ) -> Option<NatsAuth> {
        let kinds = [
            n.credentials_file.is_some(),
            n.nkey_seed.is_some() || n.nkey_seed_file.is_some(),
            n.token.is_some() || n.token_file.is_some(),
            n.user.is_some() || n.password.is_some() || n.password_file.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            self.report(
                at,
                &key("credentials_file"),
                "more than one kind of NATS credentials is set",
                "keep one of credentials_file, nkey_seed(_file), token(_file) or user with password(_file)",
            );
            return None;
        }
        if let Some(v) = &n.credentials_file {
            let creds = self.secret_file(v, &key("credentials_file"))?;
            // The parser's message may quote the file: it is not repeated.
            if async_nats::ConnectOptions::with_credentials(creds.expose()).is_err() {
                self.report(
                    v.span().start,
                    &key("credentials_file"),
                    "the file is not a NATS credentials file (a user JWT and an NKey seed block)",
                    "point credentials_file at the .creds file `nsc generate creds` wrote (user JWT and NKey seed)",
                );
                return None;
            }
            return Some(NatsAuth::Credentials(creds));
        }
        if n.nkey_seed.is_some() || n.nkey_seed_file.is_some() {
            let seed = self.secret(&n.nkey_seed, &n.nkey_seed_file, &key("nkey_seed"))?;
            if nkeys::KeyPair::from_seed(seed.expose().trim()).is_err() {
                let at = n
                    .nkey_seed
                    .as_ref()
                    .or(n.nkey_seed_file.as_ref())
                    .map_or(at, |v| v.span().start);
                self.report(
                    at,
                    &key("nkey_seed"),
                    "the value is not an NKey seed",
                    "use the user's seed (it starts with SU), not its public key (U…)",
                );
                return None;
            }
            return Some(NatsAuth::NKey(Secret::new(seed.expose().trim().to_owned())));
        }
        if n.token.is_some() || n.token_file.is_some() {
            return self
                .secret(&n.token, &n.token_file, &key("token"))
                .map(NatsAuth::Token);
        }
        if n.password.is_some() || n.password_file.is_some() {
            let password = self.secret(&n.password, &n.password_file, &key("password"))?;
            let user = self.required(&n.user, &key("user"), at, "\"walhook\"")?;
            return Some(NatsAuth::UserPassword { user, password });
        }
        if let Some(v) = &n.user {
            self.report(
                v.span().start,
                &key("user"),
                "user is set without a password",
                "add password = \"${NATS_PASSWORD}\" or password_file",
            );
        }
        None
    }

    fn stream(
        &mut self,
        raw: &Spanned<RawStream>,
        subject: &SubjectTemplate,
        section: &str,
    ) -> StreamSettings {
        let s = raw.get_ref();
        let at = raw.span().start;
        let key = |k: &str| format!("{section}.{k}");
        let name = self
            .required(&s.name, &key("name"), at, "\"WALHOOK\"")
            .unwrap_or_default();
        if !name.is_empty()
            && !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            && let Some(v) = &s.name
        {
            self.report(
                v.span().start,
                &key("name"),
                &format!("invalid stream name {name:?}"),
                "use letters, digits, '-' and '_' only, like \"WALHOOK\"",
            );
        }
        let subjects = match &s.subjects {
            None => vec![subject.wildcard()],
            Some(list) => {
                let mut out = Vec::new();
                for (i, item) in list.get_ref().iter().enumerate() {
                    let item_key = format!("{}[{i}]", key("subjects"));
                    if let Some(text) = self.string(item, &item_key) {
                        out.push(text.trim().to_owned());
                    }
                }
                if out.is_empty() {
                    self.report(
                        list.span().start,
                        &key("subjects"),
                        "subjects is empty",
                        &format!(
                            "list the subjects, or remove the key for the default [{:?}]",
                            subject.wildcard()
                        ),
                    );
                }
                out
            }
        };
        let retention = self.choice(
            &s.retention,
            &key("retention"),
            &[
                ("limits", Retention::Limits),
                ("interest", Retention::Interest),
                ("workqueue", Retention::WorkQueue),
            ],
            Retention::Limits,
        );
        let storage = self.choice(
            &s.storage,
            &key("storage"),
            &[("file", Storage::File), ("memory", Storage::Memory)],
            Storage::File,
        );
        let replicas = self.count(&s.replicas, &key("replicas"), MAX_REPLICAS, 1usize);
        let max_age = self.duration(&s.max_age, &key("max_age"), DEFAULT_MAX_AGE);
        let duplicate_window = self.duration(
            &s.duplicate_window,
            &key("duplicate_window"),
            DEFAULT_DUPLICATE_WINDOW,
        );
        if duplicate_window.is_zero()
            && let Some(v) = &s.duplicate_window
        {
            self.report(
                v.span().start,
                &key("duplicate_window"),
                "a zero duplicate window stores a retried message twice",
                "use a window longer than a listener timeout plus 30 s, like \"2m\"",
            );
        }
        StreamSettings {
            name,
            subjects,
            retention,
            storage,
            replicas,
            max_age,
            duplicate_window,
        }
    }

    /// One of a fixed set of words; `default` when absent, reported when unknown.
    fn choice<T: Copy>(&mut self, raw: &Str, key: &str, choices: &[(&str, T)], default: T) -> T {
        let Some(v) = raw else { return default };
        let Some(s) = self.string(v, key) else {
            return default;
        };
        let word = s.trim().to_ascii_lowercase();
        match choices.iter().find(|(name, _)| *name == word) {
            Some((_, value)) => *value,
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.report(
                    v.span().start,
                    key,
                    &format!("unknown value {s:?}"),
                    &format!("use one of {}", names.join(", ")),
                );
                default
            }
        }
    }
}

fn default_subject() -> SubjectTemplate {
    // The default is a constant known to parse.
    SubjectTemplate::parse(DEFAULT_SUBJECT).unwrap_or(SubjectTemplate {
        text: DEFAULT_SUBJECT.to_owned(),
        tokens: vec![
            Token::Text("api".to_owned()),
            Token::Text("event".to_owned()),
            Token::Entity,
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{MINIMAL, errors, parse};

    fn nats_listener(extra: &str) -> String {
        format!("{MINIMAL}\n[[listener]]\nname = \"bus\"\nurl = \"nats://127.0.0.1:4222\"\n{extra}")
    }

    #[test]
    fn subjects_render_lower_case_and_wildcards_replace_placeholders() {
        let t = SubjectTemplate::parse("api.event.{entity}").unwrap();
        assert_eq!(t.render("Customer", Action::Updated), "api.event.customer");
        assert_eq!(t.wildcard(), "api.event.*");
        let t = SubjectTemplate::parse("crm.{entity}.{action}").unwrap();
        assert_eq!(
            t.render("OrderLine", Action::Deleted),
            "crm.orderline.deleted"
        );
        assert_eq!(t.wildcard(), "crm.*.*");
        assert!(t.uses_action());
        for bad in [
            "api..x",
            "api.{id}",
            "api.x{entity}",
            "api.*",
            "api.>",
            "a b.{entity}",
            "",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nats_urls_select_the_nats_settings_with_defaults() {
        let c = parse(&nats_listener("")).unwrap();
        let l = &c.listeners[0];
        let n = l.nats.as_ref().expect("nats settings");
        assert_eq!(n.subject.as_str(), DEFAULT_SUBJECT);
        assert!(!n.require_tls && n.auth.is_none() && n.stream.is_none());
        let text = format!(
            "{MINIMAL}\n[[listener]]\nname = \"bus\"\nurl = \"tls://nats.example.com\"\n[listener.nats]\nsubject = \"crm.{{entity}}.{{action}}\"\ntoken = \"t0ken-value\"\n[listener.nats.stream]\nname = \"CRM\"\nretention = \"workqueue\"\nreplicas = 3\nmax_age = \"1d\"\n"
        );
        let c = parse(&text).unwrap();
        let n = c.listeners[0].nats.as_ref().unwrap();
        assert!(n.require_tls);
        assert_eq!(
            n.auth,
            Some(NatsAuth::Token(Secret::new("t0ken-value".into())))
        );
        let s = n.stream.as_ref().unwrap();
        assert_eq!(s.name, "CRM");
        assert_eq!(s.subjects, vec!["crm.*.*".to_owned()]);
        assert_eq!(s.retention, Retention::WorkQueue);
        assert_eq!(s.replicas, 3);
        assert_eq!(s.max_age, Duration::from_secs(86_400));
        assert_eq!(s.duplicate_window, DEFAULT_DUPLICATE_WINDOW);
        // HTTP listeners have no NATS settings.
        let http = parse(&format!(
            "{MINIMAL}\n[[listener]]\nname = \"h\"\nurl = \"https://example.com/\"\n"
        ))
        .unwrap();
        assert!(http.listeners[0].nats.is_none());
    }

    #[test]
    fn position_defaults_to_queue_and_cursor_refuses_debounce() {
        let position = |extra: &str| {
            parse(&nats_listener(extra)).unwrap().listeners[0]
                .nats
                .as_ref()
                .unwrap()
                .position
        };
        assert_eq!(position(""), Position::Queue);
        assert_eq!(
            position("[listener.nats]\nposition = \"queue\"\n"),
            Position::Queue
        );
        let c = parse(&nats_listener("[listener.nats]\nposition = \"cursor\"\n")).unwrap();
        assert!(c.listeners[0].keeps_cursor());
        let lines = errors(&nats_listener("[listener.nats]\nposition = \"log\"\n")).join("\n");
        assert!(
            lines.contains("listener[0].nats.position: position \"log\" is not known"),
            "{lines}"
        );
        let lines = errors(&nats_listener(
            "debounce = \"5s\"\n[listener.nats]\nposition = \"cursor\"\n",
        ))
        .join("\n");
        assert!(
            lines.contains(
                "listener[0].nats.position: position = \"cursor\" cannot be combined with debounce"
            ) && lines.contains("remove debounce, or set position = \"queue\""),
            "{lines}"
        );
    }

    #[test]
    fn nats_problems_are_reported_without_echoing_secrets() {
        let lines = errors(&nats_listener(
            "secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n[listener.nats]\nsubject = \"api.{id}\"\ntoken = \"tok-s3cret\"\nuser = \"u\"\npassword = \"p4ss-s3cret\"\n[listener.nats.stream]\nname = \"bad name\"\nretention = \"forever\"\nreplicas = 7\n",
        ));
        let all = lines.join("\n");
        assert!(!all.contains("s3cret"), "{all}");
        assert!(
            all.contains("listener[0].secret: a NATS listener is not signed"),
            "{all}"
        );
        assert!(
            all.contains("listener[0].nats.subject: subject token \"{id}\" is not a placeholder"),
            "{all}"
        );
        assert!(
            all.contains(
                "listener[0].nats.credentials_file: more than one kind of NATS credentials"
            ),
            "{all}"
        );
        assert!(
            all.contains("listener[0].nats.stream.name: invalid stream name"),
            "{all}"
        );
        assert!(all.contains("listener[0].nats.stream.retention: unknown value \"forever\"; use one of limits, interest, workqueue"), "{all}");
        assert!(
            all.contains("listener[0].nats.stream.replicas: 7 is out of range"),
            "{all}"
        );

        let lines = errors(&nats_listener(
            "[listener.nats]\nnkey_seed = \"UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4\"\n",
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("the value is not an NKey seed; use the user's seed"),
            "{lines:?}"
        );
        let lines = errors(&nats_listener("batch_size = 10\n"));
        assert!(
            lines[0].contains(
                "listener[0].batch_size: a NATS listener publishes one message per event"
            ),
            "{lines:?}"
        );
        let lines = errors(&nats_listener("format = \"eventgrid\"\n"));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("format \"eventgrid\" is not available for a NATS listener")),
            "{lines:?}"
        );
        let lines = errors(&nats_listener("[listener.nats]\nuser = \"walhook\"\n"));
        assert!(
            lines[0].contains("user is set without a password"),
            "{lines:?}"
        );
        let lines = errors(&format!(
            "{MINIMAL}\n[[listener]]\nname = \"h\"\nurl = \"https://example.com/\"\n[listener.nats]\ntoken = \"x\"\n"
        ));
        assert!(
            lines[0].contains("listener[0].nats: NATS settings need a nats:// or tls:// url"),
            "{lines:?}"
        );
        let lines = errors(&format!(
            "{MINIMAL}\n[[listener]]\nname = \"h\"\nurl = \"nats://127.0.0.1:4222/x\"\n"
        ));
        assert!(
            lines[0].contains("a NATS URL has no path or query"),
            "{lines:?}"
        );
    }

    #[test]
    fn the_example_file_has_a_nats_listener_with_its_stream() {
        let env = |name: &str| match name {
            "WALHOOK_DB_PASSWORD" => Some("db-secret".to_owned()),
            "CRM_API_KEY" => Some("api-key".to_owned()),
            "CRM_SIGNING_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            _ => Some("value-from-the-environment".to_owned()),
        };
        let text = include_str!("../../config.example.toml");
        let c = crate::config::Config::parse_with_env(
            text,
            std::path::Path::new("config.example.toml"),
            &env,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let bus = c
            .listeners
            .iter()
            .find(|l| l.name == "stream")
            .expect("stream");
        let n = bus.nats.as_ref().expect("a NATS listener");
        assert_eq!(n.subject.as_str(), DEFAULT_SUBJECT);
        let s = n.stream.as_ref().expect("stream");
        assert_eq!(s.name, "WALHOOK");
        assert_eq!(s.subjects, vec!["api.event.*".to_owned()]);
        assert_eq!(s.max_age, DEFAULT_MAX_AGE);
        assert_eq!(s.duplicate_window, DEFAULT_DUPLICATE_WINDOW);
        assert_eq!(bus.concurrency, 64);
    }

    #[test]
    fn credentials_come_from_files_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(dir.path().join("seed"), format!("{seed}\n")).unwrap();
        std::fs::write(dir.path().join("bad.creds"), "not a creds file").unwrap();
        let path = dir.path().join("walhook.toml");
        let c = crate::config::Config::parse_with_env(
            &nats_listener("[listener.nats]\nnkey_seed_file = \"seed\"\n"),
            &path,
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            c.listeners[0].nats.as_ref().unwrap().auth,
            Some(NatsAuth::NKey(Secret::new(seed)))
        );
        let e = crate::config::Config::parse_with_env(
            &nats_listener("[listener.nats]\ncredentials_file = \"bad.creds\"\n"),
            &path,
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "listener[0].nats.credentials_file: the file is not a NATS credentials file"
            ),
            "{e}"
        );
    }
}

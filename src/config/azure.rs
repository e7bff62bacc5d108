//! The settings of the Azure formats: `format = "eventgrid"` (webhook with the validation
//! handshake, or an Event Grid topic with `aeg-sas-key`) and `format = "servicebus"` (a
//! Service Bus topic or queue per entity over the REST API, Shared Access Signature auth).

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde_spanned::Spanned;
use url::Url;

use super::admin::AdminConfig;
use super::check::Checker;
use super::entity::EntityConfig;
use super::event_types::{EventType, EventTypes};
use super::listener::{ListenerFormat, RawListener};
use crate::secret::Secret;
use crate::types::{Action, EntityName};

/// `format = "eventgrid"`: the Azure Event Grid event schema.
#[derive(Clone, Debug, PartialEq)]
pub struct EventGridConfig {
    /// Where the events go: a validated webhook, or an Event Grid topic endpoint.
    pub delivery: EventGridDelivery,
    /// Every event's `topic` (`topic`); `None`: `/walhook/{system}` for a webhook, left out
    /// for a topic endpoint (Event Grid fills in its own).
    pub topic: Option<String>,
    /// Every event's `dataVersion` (`data_version`, default "1.0").
    pub data_version: String,
}

/// How an Event Grid listener receives events.
#[derive(Clone, Debug, PartialEq)]
pub enum EventGridDelivery {
    /// A webhook that must pass the validation handshake before it gets any event.
    Webhook {
        /// The `validationUrl` without its query: `{admin public_url}/eventgrid/validate`.
        validation_url: Url,
    },
    /// An Event Grid topic endpoint (`eventgrid_topic = true`), authenticated by an
    /// `aeg-sas-key` header.
    Topic {
        /// The topic's access key (`aeg_sas_key` or `aeg_sas_key_file`).
        key: Secret,
    },
}

/// `format = "servicebus"`: Azure Service Bus over its REST API; the listener url is the
/// namespace (`https://{namespace}.servicebus.windows.net`).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceBusConfig {
    /// The topic or queue per entity (`topic`, default `api.event.{entity}`).
    pub topic: TopicTemplate,
    /// The Shared Access policy's name (`sas_key_name`).
    pub sas_key_name: String,
    /// The policy's key (`sas_key` or `sas_key_file`).
    pub sas_key: Secret,
    /// How long a generated token is valid (`sas_token_ttl`, default 1h); tokens are
    /// renewed before they expire.
    pub token_ttl: Duration,
    /// The column whose value is the message's `onBehalfOf` (`on_behalf_of`).
    pub on_behalf_of: Option<String>,
    /// Whether the changed columns' values travel as user properties (`user_properties`).
    pub user_properties: bool,
}

/// A topic name with `{entity}` (the entity name in lower case), checked when loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TopicPart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TopicPart {
    Text(String),
    Entity,
}

impl TopicTemplate {
    /// Parses `api.event.{entity}`; `Err` names the problem and the fix.
    pub fn parse(s: &str) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let (text, after) = rest.split_at(open);
            if !text.is_empty() {
                parts.push(TopicPart::Text(text.to_owned()));
            }
            let Some(close) = after.find('}') else {
                return Err(
                    "the topic has a { without a closing }; write placeholders as {entity}"
                        .to_owned(),
                );
            };
            let name = &after[1..close];
            if name != "entity" {
                return Err(format!(
                    "unknown placeholder {{{name}}} in the topic; the only placeholder is {{entity}} (the entity name in lower case)"
                ));
            }
            parts.push(TopicPart::Entity);
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TopicPart::Text(rest.to_owned()));
        }
        let t = TopicTemplate { parts };
        // Service Bus entity paths: letters, digits, '.', '-', '_' and '/' between
        // segments; checked with a sample entity so literal parts are covered.
        let sample = t.render("x");
        let valid_chars = sample
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
        if sample.is_empty()
            || !valid_chars
            || sample.split('/').any(|seg| {
                !seg.starts_with(|c: char| c.is_ascii_alphanumeric())
                    || !seg.ends_with(|c: char| c.is_ascii_alphanumeric())
            })
        {
            return Err("a Service Bus topic or queue name has letters, digits, '.', '-', '_' and '/', and starts and ends with a letter or digit; write it like \"api.event.{entity}\"".to_owned());
        }
        Ok(t)
    }

    /// The topic of `entity`'s events.
    pub fn render(&self, entity: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TopicPart::Text(t) => out.push_str(t),
                TopicPart::Entity => out.push_str(&entity.to_lowercase()),
            }
        }
        out
    }
}

/// Default Service Bus topic per entity.
pub const DEFAULT_SERVICEBUS_TOPIC: &str = "api.event.{entity}";
/// Default lifetime of a generated Shared Access Signature token.
pub const DEFAULT_SAS_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Default Event Grid `dataVersion`.
pub const DEFAULT_DATA_VERSION: &str = "1.0";
/// Where the admin endpoint serves Event Grid's `validationUrl`.
pub const VALIDATION_PATH: &str = "eventgrid/validate";

impl Checker<'_> {
    /// The settings of an Event Grid listener.
    pub(super) fn eventgrid(
        &mut self,
        l: &RawListener,
        section: &str,
        at: usize,
        admin: Option<&AdminConfig>,
    ) -> Option<EventGridConfig> {
        let key = |k: &str| format!("{section}.{k}");
        let topic_mode = l.eventgrid_topic.as_ref().is_some_and(|v| *v.get_ref());
        let delivery = if topic_mode {
            let key_name = key("aeg_sas_key");
            let secret = self.secret(&l.aeg_sas_key, &l.aeg_sas_key_file, &key_name);
            if l.aeg_sas_key.is_none() && l.aeg_sas_key_file.is_none() {
                self.report(
                    l.eventgrid_topic.as_ref().map_or(at, |v| v.span().start),
                    &key_name,
                    "an Event Grid topic endpoint needs its access key",
                    "add aeg_sas_key = \"${EVENTGRID_KEY}\" or aeg_sas_key_file = \"%d/eventgrid-key\"",
                );
            }
            let secret = secret?;
            if !secret.expose().bytes().all(|b| (b' '..=b'~').contains(&b)) {
                let v = l.aeg_sas_key.as_ref().or(l.aeg_sas_key_file.as_ref());
                self.report(
                    v.map_or(at, |v| v.span().start),
                    &key_name,
                    "the key contains a character an HTTP header cannot carry",
                    "copy the key again from the topic's Access keys (visible ASCII only)",
                );
            }
            EventGridDelivery::Topic { key: secret }
        } else {
            if let Some(v) = l.aeg_sas_key.as_ref().or(l.aeg_sas_key_file.as_ref()) {
                self.report(
                    v.span().start,
                    &key("aeg_sas_key"),
                    "aeg_sas_key is only sent to Event Grid topic endpoints",
                    "set eventgrid_topic = true if url is an Event Grid topic, or remove the key",
                );
            }
            let validation_url = self.validation_url(admin, &key("format"), at)?;
            EventGridDelivery::Webhook { validation_url }
        };
        let topic = match &l.topic {
            None => None,
            Some(v) => {
                let s = self.string(v, &key("topic"))?;
                if s.trim().is_empty() {
                    self.report(
                        v.span().start,
                        &key("topic"),
                        "the topic is empty",
                        "write the event source's resource path, like \"/subscriptions/…/topics/crm\", or remove the key",
                    );
                }
                Some(s)
            }
        };
        let data_version = match &l.data_version {
            None => DEFAULT_DATA_VERSION.to_owned(),
            Some(v) => self.string(v, &key("data_version"))?,
        };
        Some(EventGridConfig {
            delivery,
            topic,
            data_version,
        })
    }

    /// `{public_url}/eventgrid/validate`: without `public_url`, the admin listen address
    /// when it names one host.
    fn validation_url(&mut self, admin: Option<&AdminConfig>, key: &str, at: usize) -> Option<Url> {
        let Some(admin) = admin else {
            self.report(
                at,
                key,
                "an Event Grid webhook is validated through walhook's admin endpoint, and there is no [admin] section",
                "add [admin] with listen and public_url (the address the listener can reach), or set eventgrid_topic = true for an Event Grid topic endpoint",
            );
            return None;
        };
        let base = match &admin.public_url {
            Some(u) => u.clone(),
            None if admin.listen.ip().is_unspecified() => {
                self.report(
                    at,
                    key,
                    &format!(
                        "[admin] listens on {}, which is no address a listener can send the validation GET to",
                        admin.listen
                    ),
                    "set [admin] public_url to the URL under which the listener reaches walhook's admin endpoint",
                );
                return None;
            }
            None => Url::parse(&format!("http://{}/", admin.listen)).ok()?,
        };
        let mut url = base;
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        url.join(VALIDATION_PATH).ok()
    }

    /// The settings of a Service Bus listener.
    pub(super) fn servicebus(
        &mut self,
        l: &RawListener,
        section: &str,
        at: usize,
    ) -> Option<ServiceBusConfig> {
        let key = |k: &str| format!("{section}.{k}");
        let topic = match &l.topic {
            None => TopicTemplate::parse(DEFAULT_SERVICEBUS_TOPIC).ok(),
            Some(v) => {
                let s = self.string(v, &key("topic"))?;
                TopicTemplate::parse(s.trim())
                    .map_err(|message| self.report_message(v.span().start, &key("topic"), &message))
                    .ok()
            }
        };
        let sas_key_name = self.required(
            &l.sas_key_name,
            &key("sas_key_name"),
            at,
            "\"RootManageSharedAccessKey\"",
        );
        let sas_key = self.secret(&l.sas_key, &l.sas_key_file, &key("sas_key"));
        if l.sas_key.is_none() && l.sas_key_file.is_none() {
            self.report(
                at,
                &key("sas_key"),
                "missing key",
                "add sas_key = \"${SERVICEBUS_KEY}\" or sas_key_file = \"%d/servicebus-key\" (the Shared Access policy's primary key)",
            );
        }
        let token_ttl = self.duration(
            &l.sas_token_ttl,
            &key("sas_token_ttl"),
            DEFAULT_SAS_TOKEN_TTL,
        );
        if token_ttl < Duration::from_secs(1)
            && let Some(v) = &l.sas_token_ttl
        {
            self.report(
                v.span().start,
                &key("sas_token_ttl"),
                "a token must be valid for at least 1s",
                "use a duration like \"1h\"",
            );
        }
        let on_behalf_of = match &l.on_behalf_of {
            None => None,
            Some(v) => Some(self.required(
                &Some(v.clone()),
                &key("on_behalf_of"),
                at,
                "\"modified_by\"",
            )?),
        };
        let user_properties = l.user_properties.as_ref().is_some_and(|v| *v.get_ref());
        Some(ServiceBusConfig {
            topic: topic?,
            sas_key_name: sas_key_name?,
            sas_key: sas_key?,
            token_ttl,
            on_behalf_of,
            user_properties,
        })
    }

    /// Service Bus sends `evenType` as a number: mapped values must be numbers, and a
    /// listener that can receive Truncated events needs a number for them.
    pub(super) fn servicebus_event_types(
        &mut self,
        l: &RawListener,
        section: &str,
        at: usize,
        types: &EventTypes,
        actions: &[Action],
        receives: &[&EntityConfig],
    ) {
        let key = format!("{section}.event_types");
        let map_at = l.event_types.as_ref().map_or(at, |m| m.span().start);
        for (action, t) in types.iter() {
            if let EventType::Name(n) = t {
                self.report(
                    map_at,
                    &format!("{key}.{}", action.config_name()),
                    &format!("servicebus sends evenType as a number, and {n:?} is a name"),
                    &format!(
                        "map {} to a number, like {} = 1",
                        action.config_name(),
                        action.config_name()
                    ),
                );
            }
        }
        let truncates = actions.contains(&Action::Truncated)
            && receives
                .iter()
                .any(|e| e.actions.contains(&Action::Truncated));
        if truncates && types.get(Action::Truncated).is_none() {
            self.report(
                map_at,
                &key,
                "servicebus's evenType has codes for created (1), updated (2) and deleted (3) only, and this listener receives truncated events",
                "add event_types = { truncated = 3 } (or another code your receivers expect), or leave truncated out of the listener's actions",
            );
        }
    }

    /// Reports a configured header the format sends itself (`Authorization` for Service
    /// Bus, `aeg-sas-key` for an Event Grid topic): it would be replaced.
    pub(super) fn azure_headers(
        &mut self,
        format: &ListenerFormat,
        headers: &[(HeaderName, HeaderValue)],
        section: &str,
        at: usize,
    ) {
        let (name, what) = match format {
            ListenerFormat::ServiceBus(_) => ("authorization", "the SharedAccessSignature token"),
            ListenerFormat::EventGrid(EventGridConfig {
                delivery: EventGridDelivery::Topic { .. },
                ..
            }) => ("aeg-sas-key", "aeg_sas_key"),
            _ => return,
        };
        if headers.iter().any(|(h, _)| h.as_str() == name) {
            self.report(
                at,
                &format!("{section}.headers"),
                &format!("header {name:?} carries {what}, which walhook sends itself"),
                &format!("remove {name:?} from headers / header_files"),
            );
        }
    }

    /// Reports keys set for a format other than the listener's.
    pub(super) fn keys_of_other_formats(
        &mut self,
        keys: &[(&str, Option<usize>, &[&str])],
        format: &str,
        section: &str,
    ) {
        for (name, at, formats) in keys {
            if let Some(at) = at
                && !formats.contains(&format)
            {
                let used_by = formats
                    .iter()
                    .map(|f| format!("format = \"{f}\""))
                    .collect::<Vec<_>>()
                    .join(" or ");
                self.report(
                    *at,
                    &format!("{section}.{name}"),
                    &format!(
                        "{name} applies to {used_by}, and this listener has format = \"{format}\""
                    ),
                    &format!("remove {name}, or change the format"),
                );
            }
        }
    }
}

/// The entities a listener receives (all of them when it names none).
pub(super) fn received<'a>(
    entities: &'a [EntityConfig],
    chosen: Option<&[EntityName]>,
) -> Vec<&'a EntityConfig> {
    entities
        .iter()
        .filter(|e| chosen.is_none_or(|c| c.contains(&e.name)))
        .collect()
}

/// The start of a spanned value, for [`Checker::keys_of_other_formats`].
pub(super) fn at<T>(v: &Option<Spanned<T>>) -> Option<usize> {
    v.as_ref().map(|v| v.span().start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::{MINIMAL, errors, parse};

    #[test]
    fn topic_templates_take_entity_in_lower_case_and_refuse_what_service_bus_refuses() {
        let t = TopicTemplate::parse("api.event.{entity}").unwrap();
        assert_eq!(t.render("SalesOrder"), "api.event.salesorder");
        assert_eq!(
            TopicTemplate::parse("crm/{entity}-changes")
                .unwrap()
                .render("A"),
            "crm/a-changes"
        );
        assert_eq!(TopicTemplate::parse("fixed").unwrap().render("A"), "fixed");
        for (bad, why) in [
            ("api.{id}", "unknown placeholder {id}"),
            ("api.{entity", "without a closing }"),
            ("api event", "letters, digits"),
            ("", "letters, digits"),
            ("/{entity}", "starts and ends"),
            ("{entity}.", "starts and ends"),
        ] {
            let e = TopicTemplate::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn with_admin(admin: &str, listener: &str) -> String {
        format!(
            "{MINIMAL}{admin}\n[[listener]]\nname = \"grid\"\nurl = \"https://example.com/hook\"\n{listener}"
        )
    }

    #[test]
    fn eventgrid_webhooks_get_their_validation_url_from_the_admin_endpoint() {
        let grid = |text: &str| match parse(text).unwrap_or_else(|e| panic!("{e}")).listeners[0]
            .format
            .clone()
        {
            ListenerFormat::EventGrid(g) => g,
            other => panic!("{other:?}"),
        };
        let g = grid(&with_admin(
            "[admin]\nlisten = \"127.0.0.1:8187\"\n",
            "format = \"eventgrid\"\n",
        ));
        assert_eq!(
            g.delivery,
            EventGridDelivery::Webhook {
                validation_url: Url::parse("http://127.0.0.1:8187/eventgrid/validate").unwrap()
            }
        );
        assert_eq!(g.data_version, "1.0");
        assert_eq!(g.topic, None);
        let g = grid(&with_admin(
            "[admin]\nlisten = \"0.0.0.0:8187\"\npublic_url = \"https://walhook.example.com/ops\"\n",
            "format = \"eventgrid\"\ntopic = \"/subscriptions/s/topics/crm\"\ndata_version = \"2\"\n",
        ));
        assert_eq!(
            g.delivery,
            EventGridDelivery::Webhook {
                validation_url: Url::parse("https://walhook.example.com/ops/eventgrid/validate")
                    .unwrap()
            }
        );
        assert_eq!(g.topic.as_deref(), Some("/subscriptions/s/topics/crm"));
        assert_eq!(g.data_version, "2");

        let lines = errors(&with_admin("", "format = \"eventgrid\"\n"));
        assert!(
            lines[0].contains("listener[0].format: an Event Grid webhook is validated through walhook's admin endpoint, and there is no [admin] section; add [admin]"),
            "{lines:?}"
        );
        let lines = errors(&with_admin(
            "[admin]\nlisten = \"0.0.0.0:8187\"\n",
            "format = \"eventgrid\"\n",
        ));
        assert!(
            lines[0].contains("[admin] listens on 0.0.0.0:8187")
                && lines[0].contains("set [admin] public_url"),
            "{lines:?}"
        );
    }

    #[test]
    fn eventgrid_topics_need_their_key_which_is_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("aeg"), "s3cr3t-aeg-key\n").unwrap();
        let text = with_admin(
            "",
            "format = \"eventgrid\"\neventgrid_topic = true\naeg_sas_key_file = \"aeg\"\n",
        );
        let c = Config::parse_with_env(&text, &dir.path().join("walhook.toml"), &|_| None).unwrap();
        let ListenerFormat::EventGrid(g) = &c.listeners[0].format else {
            panic!()
        };
        let EventGridDelivery::Topic { key } = &g.delivery else {
            panic!()
        };
        assert_eq!(key.expose(), "s3cr3t-aeg-key");
        assert!(!format!("{c:?}").contains("s3cr3t"));

        let lines = errors(&with_admin(
            "",
            "format = \"eventgrid\"\neventgrid_topic = true\n",
        ));
        assert!(
            lines[0].contains(
                "listener[0].aeg_sas_key: an Event Grid topic endpoint needs its access key"
            ),
            "{lines:?}"
        );
        let lines = errors(&with_admin(
            "[admin]\n",
            "format = \"eventgrid\"\naeg_sas_key = \"s3cr3t\"\n",
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("aeg_sas_key is only sent to Event Grid topic endpoints"));
        assert!(!lines[0].contains("s3cr3t"));
        // A wrong type does not echo the key either.
        let lines = errors(&with_admin(
            "",
            "format = \"eventgrid\"\neventgrid_topic = true\naeg_sas_key = [\"s3cr3t\"]\n",
        ));
        assert!(!lines[0].contains("s3cr3t"), "{lines:?}");
    }

    fn servicebus(extra: &str) -> String {
        format!(
            "{MINIMAL}\n[[listener]]\nname = \"bus\"\nurl = \"https://crm.servicebus.windows.net\"\nformat = \"servicebus\"\n{extra}"
        )
    }

    #[test]
    fn servicebus_needs_a_sas_policy_and_takes_its_defaults() {
        let c = parse(&servicebus("sas_key_name = \"send\"\nsas_key = \"a2V5\"\n")).unwrap();
        let ListenerFormat::ServiceBus(s) = &c.listeners[0].format else {
            panic!()
        };
        assert_eq!(s.topic.render("Customer"), "api.event.customer");
        assert_eq!(s.sas_key_name, "send");
        assert_eq!(s.sas_key.expose(), "a2V5");
        assert_eq!(s.token_ttl, DEFAULT_SAS_TOKEN_TTL);
        assert_eq!(s.on_behalf_of, None);
        assert!(!s.user_properties);

        let lines = errors(&servicebus("topic = \"crm.{table}\"\n"));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:8:1: listener[0].sas_key_name: missing key; add sas_key_name = \"RootManageSharedAccessKey\"",
                "walhook.toml:8:1: listener[0].sas_key: missing key; add sas_key = \"${SERVICEBUS_KEY}\" or sas_key_file = \"%d/servicebus-key\" (the Shared Access policy's primary key)",
                "walhook.toml:12:9: listener[0].topic: unknown placeholder {table} in the topic; the only placeholder is {entity} (the entity name in lower case)",
            ]
        );
    }

    #[test]
    fn servicebus_maps_actions_to_numbers_and_needs_one_for_truncated() {
        let ok = servicebus(
            "sas_key_name = \"send\"\nsas_key = \"a2V5\"\nevent_types = { created = 1, deleted = 1 }\n",
        );
        assert!(parse(&ok).is_ok());
        let lines = errors(&servicebus(
            "sas_key_name = \"send\"\nsas_key = \"a2V5\"\nevent_types = { created = \"AssetChanged\" }\n",
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("listener[0].event_types.created: servicebus sends evenType as a number, and \"AssetChanged\" is a name; map created to a number, like created = 1"), "{lines:?}");
        let truncating = MINIMAL.replace(
            "table = \"customer\"\n",
            "table = \"customer\"\nactions = [\"created\", \"truncated\"]\n",
        );
        let text = format!(
            "{truncating}\n[[listener]]\nname = \"bus\"\nurl = \"https://crm.servicebus.windows.net\"\nformat = \"servicebus\"\nsas_key_name = \"send\"\nsas_key = \"a2V5\"\n"
        );
        let lines = errors(&text);
        assert!(
            lines[0].contains("receives truncated events; add event_types = { truncated = 3 }"),
            "{lines:?}"
        );
        assert!(parse(&format!("{text}event_types = {{ truncated = 3 }}\n")).is_ok());
        assert!(parse(&format!("{text}actions = [\"created\"]\n")).is_ok());
    }

    #[test]
    fn headers_the_azure_formats_send_themselves_are_refused() {
        let lines = errors(&servicebus(
            "sas_key_name = \"send\"\nsas_key = \"a2V5\"\nheaders = { \"Authorization\" = \"Bearer x\" }\n",
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("listener[0].headers: header \"authorization\" carries the SharedAccessSignature token, which walhook sends itself"), "{lines:?}");
        assert!(!lines[0].contains("Bearer x"));
    }

    #[test]
    fn keys_of_another_format_are_refused() {
        let lines = errors(&servicebus(
            "sas_key_name = \"send\"\nsas_key = \"a2V5\"\ncloudevents_mode = \"binary\"\neventgrid_topic = true\n",
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:14:20: listener[0].cloudevents_mode: cloudevents_mode applies to format = \"cloudevents\", and this listener has format = \"servicebus\"; remove cloudevents_mode, or change the format",
                "walhook.toml:15:19: listener[0].eventgrid_topic: eventgrid_topic applies to format = \"eventgrid\", and this listener has format = \"servicebus\"; remove eventgrid_topic, or change the format",
            ]
        );
        let lines = errors(&format!(
            "{MINIMAL}\n[[listener]]\nname = \"crm\"\nurl = \"https://example.com/\"\nsas_key = \"s3cr3t\"\nevent_types = {{ created = \"X\" }}\n"
        ));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("sas_key applies to format = \"servicebus\""));
        assert!(
            lines[1].contains(
                "event_types applies to format = \"eventgrid\" or format = \"servicebus\""
            )
        );
        assert!(!lines.concat().contains("s3cr3t"));
    }
}

//! `event_types = { created = "AssetChanged", deleted = "AssetChanged" }`: the name or code
//! a listener's format sends for each action, so that several actions can share one.
//!
//! One mapping per listener, whatever its format: Event Grid sends it as `eventType`,
//! Service Bus as `evenType` (numbers only), a template through its placeholders.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use crate::types::Action;

/// What one action is sent as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventType {
    /// A name, like `AssetChanged`.
    Name(String),
    /// A number, like `1` (a `ChangeType` code).
    Code(i64),
}

impl EventType {
    /// The name, or the code in decimal.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            EventType::Name(n) => Cow::Borrowed(n),
            EventType::Code(c) => Cow::Owned(c.to_string()),
        }
    }
}

/// The mapping of one listener; actions it does not name keep their format's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventTypes {
    by_action: [Option<EventType>; Action::ALL.len()],
}

impl EventTypes {
    /// What `action` is mapped to, if anything.
    pub fn get(&self, action: Action) -> Option<&EventType> {
        self.by_action.get(index(action))?.as_ref()
    }

    /// Maps `action` to `to` (tests and programmatic configs).
    pub fn set(&mut self, action: Action, to: EventType) {
        if let Some(slot) = self.by_action.get_mut(index(action)) {
            *slot = Some(to);
        }
    }

    /// Whether no action is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_action.iter().all(Option::is_none)
    }

    /// The mapped values with their actions, in action order.
    pub fn iter(&self) -> impl Iterator<Item = (Action, &EventType)> {
        Action::ALL
            .into_iter()
            .zip(self.by_action.iter())
            .filter_map(|(a, t)| Some((a, t.as_ref()?)))
    }
}

fn index(action: Action) -> usize {
    Action::ALL
        .iter()
        .position(|a| *a == action)
        .unwrap_or_default()
}

/// A value as written: a string or an integer.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawEventType {
    Code(i64),
    Name(String),
}

/// `event_types = { … }` as written.
pub(super) type RawEventTypes = Option<Spanned<BTreeMap<Spanned<String>, Spanned<RawEventType>>>>;

impl Checker<'_> {
    /// The checked mapping: keys are actions, values non-empty names or integers.
    pub(super) fn event_types(&mut self, raw: &RawEventTypes, key: &str) -> EventTypes {
        let mut out = EventTypes::default();
        let Some(map) = raw else { return out };
        if map.get_ref().is_empty() {
            self.report(
                map.span().start,
                key,
                "event_types is empty",
                "map actions to names or codes, like event_types = { created = \"AssetChanged\", deleted = \"AssetChanged\" }, or remove the key",
            );
        }
        for (action, value) in map.get_ref() {
            let item_key = format!("{key}.{}", action.get_ref());
            let Some(a) = Action::ALL
                .into_iter()
                .find(|a| a.config_name() == action.get_ref())
            else {
                self.report(
                    action.span().start,
                    &item_key,
                    &format!("unknown action {:?}", action.get_ref()),
                    "use created, updated, deleted or truncated",
                );
                continue;
            };
            let mapped = match value.get_ref() {
                RawEventType::Code(c) => EventType::Code(*c),
                RawEventType::Name(n) => {
                    let Some(n) = self.string(&Spanned::new(value.span(), n.clone()), &item_key)
                    else {
                        continue;
                    };
                    if n.trim().is_empty() {
                        self.report(
                            value.span().start,
                            &item_key,
                            "the event type is empty",
                            "write a name like \"AssetChanged\" or a number like 1",
                        );
                        continue;
                    }
                    EventType::Name(n)
                }
            };
            out.set(a, mapped);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, errors, parse};

    use super::*;

    fn listener(extra: &str) -> String {
        format!(
            "{MINIMAL}\n[[listener]]\nname = \"grid\"\nurl = \"https://example.com/\"\nformat = \"eventgrid\"\neventgrid_topic = true\naeg_sas_key = \"k3y\"\n{extra}"
        )
    }

    #[test]
    fn several_actions_share_one_name_and_the_rest_keep_their_default() {
        let c = parse(&listener(
            "event_types = { created = \"AssetChanged\", deleted = \"AssetChanged\" }\n",
        ))
        .unwrap();
        let t = &c.listeners[0].event_types;
        let changed = EventType::Name("AssetChanged".into());
        assert_eq!(t.get(Action::Created), Some(&changed));
        assert_eq!(t.get(Action::Deleted), Some(&changed));
        assert_eq!(t.get(Action::Updated), None);
        assert_eq!(
            t.iter().map(|(a, _)| a).collect::<Vec<_>>(),
            [Action::Created, Action::Deleted]
        );
        let c = parse(&listener("event_types = { created = 1, updated = 1 }\n")).unwrap();
        assert_eq!(
            c.listeners[0].event_types.get(Action::Updated),
            Some(&EventType::Code(1))
        );
        assert_eq!(EventType::Code(1).text(), "1");
    }

    #[test]
    fn unknown_actions_empty_names_and_empty_maps_are_refused() {
        let lines = errors(&listener(
            "event_types = { changed = \"X\", created = \"\" }\n",
        ));
        assert_eq!(
            lines,
            vec![
                "walhook.toml:14:17: listener[0].event_types.changed: unknown action \"changed\"; use created, updated, deleted or truncated",
                "walhook.toml:14:42: listener[0].event_types.created: the event type is empty; write a name like \"AssetChanged\" or a number like 1",
            ]
        );
        let lines = errors(&listener("event_types = {}\n"));
        assert!(
            lines[0].contains("listener[0].event_types: event_types is empty"),
            "{lines:?}"
        );
    }
}

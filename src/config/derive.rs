//! `[[entity.action]]`: derived (domain) actions such as `Customer.Cancelled`, and the
//! actions a listener subscribes to, which may name them.

use serde::Deserialize;
use serde_spanned::Spanned;

use super::check::Checker;
use super::condition::RawCondition;
use super::entity::EntityConfig;
use super::{Str, StrList};
use crate::condition::Condition;
use crate::types::{Action, EntityName};

/// One `[[entity.action]]`: a rule that turns a matching change into a domain action.
#[derive(Clone, Debug, PartialEq)]
pub struct DerivedAction {
    /// The action's name, e.g. `Cancelled`: event type `Customer.Cancelled`.
    pub name: String,
    /// Which changes it matches.
    pub when: Condition,
    /// `true`: a matching change emits the derived action instead of its row action;
    /// `false` (default): both, and each listener receives the one it subscribes to.
    pub replace: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDerivedAction {
    name: Str,
    when: Option<Spanned<RawCondition>>,
    replace: Option<Spanned<bool>>,
}

/// Names a derived action must not take: the row actions, whatever their case.
fn reserved(name: &str) -> bool {
    Action::ALL
        .iter()
        .any(|a| a.as_str().eq_ignore_ascii_case(name))
}

impl Checker<'_> {
    /// The derived actions of entity `i`; `exclude` are its excluded columns.
    pub(super) fn derived_actions(
        &mut self,
        raw: &[Spanned<RawDerivedAction>],
        entity_key: &str,
        exclude: &[String],
    ) -> Vec<DerivedAction> {
        let mut out: Vec<DerivedAction> = Vec::new();
        for (j, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let a = spanned.get_ref();
            let key = |k: &str| format!("{entity_key}.action[{j}].{k}");
            let name = self.required(&a.name, &key("name"), at, "\"Cancelled\"");
            let name = name.and_then(|n| {
                let n = n.trim().to_owned();
                let name_at = a.name.as_ref().map_or(at, |v| v.span().start);
                let valid = n.len() <= 63
                    && n.starts_with(|c: char| c.is_ascii_alphabetic())
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    self.report(
                        name_at,
                        &key("name"),
                        &format!("invalid action name {n:?}"),
                        "use up to 63 letters, digits and '_', starting with a letter, like \"Cancelled\"",
                    );
                    None
                } else if reserved(&n) {
                    self.report(
                        name_at,
                        &key("name"),
                        &format!("{n:?} is a row action"),
                        "give the derived action its own name, like \"Cancelled\" or \"Renewed\"",
                    );
                    None
                } else if out.iter().any(|d| d.name.eq_ignore_ascii_case(&n)) {
                    self.report(
                        name_at,
                        &key("name"),
                        &format!("action {n:?} is defined twice for this entity"),
                        "give each [[entity.action]] its own name, or combine the conditions with any = [...]",
                    );
                    None
                } else {
                    Some(n)
                }
            });
            let when = match &a.when {
                None => {
                    self.report(
                        at,
                        &key("when"),
                        "missing key",
                        "add when = { column = \"status\", changed_to = \"cancelled\" }",
                    );
                    None
                }
                Some(w) => self.condition(w, &key("when")).inspect(|c| {
                    self.excluded_in_condition(c, exclude, w.span().start, &key("when"));
                }),
            };
            let replace = a.replace.as_ref().is_some_and(|r| *r.get_ref());
            if let (Some(name), Some(when)) = (name, when) {
                out.push(DerivedAction {
                    name,
                    when,
                    replace,
                });
            }
        }
        out
    }

    /// `snapshot_action` of an entity: a name like a derived action's, none of `derived`.
    pub(super) fn snapshot_action(
        &mut self,
        raw: &Str,
        key: &str,
        derived: &[DerivedAction],
    ) -> String {
        let default = || super::entity::DEFAULT_SNAPSHOT_ACTION.to_owned();
        let Some(v) = raw else { return default() };
        let Some(n) = self.string(v, key) else {
            return default();
        };
        let n = n.trim().to_owned();
        let at = v.span().start;
        let valid = n.len() <= 63
            && n.starts_with(|c: char| c.is_ascii_alphabetic())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            self.report(
                at,
                key,
                &format!("invalid action name {n:?}"),
                "use up to 63 letters, digits and '_', starting with a letter, like \"Snapshot\"",
            );
        } else if reserved(&n) {
            self.report(
                at,
                key,
                &format!("{n:?} is a row action"),
                "give backfilled rows their own action, like \"Snapshot\" or \"Resync\"; listeners tell them apart from live changes by it",
            );
        } else if derived.iter().any(|d| d.name.eq_ignore_ascii_case(&n)) {
            self.report(
                at,
                key,
                &format!("{n:?} is also an [[entity.action]] of this entity"),
                "give backfilled rows an action of their own",
            );
        } else {
            return n;
        }
        default()
    }

    /// Reports columns of `cond` that are excluded: their values never reach walhook's
    /// events, so a test on them could never be evaluated.
    pub(super) fn excluded_in_condition(
        &mut self,
        cond: &Condition,
        exclude: &[String],
        at: usize,
        key: &str,
    ) {
        let mut named: Vec<&str> = cond.columns();
        named.dedup();
        for column in named {
            if exclude.iter().any(|e| e == column) {
                self.report(
                    at,
                    key,
                    &format!("column {column:?} is excluded, so its value is never known"),
                    "remove it from exclude, or test another column",
                );
            }
        }
    }

    /// `filter = {...}` of a listener: a condition whose columns no entity it receives
    /// excludes.
    pub(super) fn listener_filter(
        &mut self,
        raw: &Option<Spanned<RawCondition>>,
        key: &str,
        chosen: Option<&[EntityName]>,
        entities: &[EntityConfig],
    ) -> Option<Condition> {
        let raw = raw.as_ref()?;
        let cond = self.condition(raw, key)?;
        let mut excluded: Vec<String> = Vec::new();
        for e in entities
            .iter()
            .filter(|e| chosen.is_none_or(|c| c.contains(&e.name)))
        {
            excluded.extend(e.exclude.iter().cloned());
        }
        self.excluded_in_condition(&cond, &excluded, raw.span().start, key);
        Some(cond)
    }

    /// `actions = [...]` of a listener: row actions (`created`, …) and derived actions of
    /// the entities it receives (by name, any case). Absent: every row action and every
    /// derived action of its entities.
    pub(super) fn listener_actions(
        &mut self,
        raw: &StrList,
        key: &str,
        chosen: Option<&[EntityName]>,
        entities: &[EntityConfig],
    ) -> (Vec<Action>, Vec<String>) {
        let mut derived_names: Vec<&str> = Vec::new();
        for e in entities
            .iter()
            .filter(|e| chosen.is_none_or(|c| c.contains(&e.name)))
        {
            let named = e.derived.iter().map(|d| d.name.as_str());
            let scheduled = e.scheduled_actions.iter().map(String::as_str);
            for name in named
                .chain(scheduled)
                .chain(std::iter::once(e.snapshot_action.as_str()))
            {
                if !derived_names.contains(&name) {
                    derived_names.push(name);
                }
            }
        }
        let Some(list) = raw else {
            let derived = derived_names.iter().map(|s| (*s).to_owned()).collect();
            return (Action::ALL.to_vec(), derived);
        };
        let known = || {
            let mut all: Vec<&str> = Action::ALL.iter().map(|a| a.config_name()).collect();
            all.extend(derived_names.iter().copied());
            all.join(", ")
        };
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                key,
                "actions is empty",
                &format!(
                    "list at least one of {}, or remove the key for all of them",
                    known()
                ),
            );
            return (Action::ALL.to_vec(), Vec::new());
        }
        let (mut actions, mut derived): (Vec<Action>, Vec<String>) = (Vec::new(), Vec::new());
        for (i, item) in list.get_ref().iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let Some(s) = self.string(item, &item_key) else {
                continue;
            };
            let s = s.trim();
            let row = Action::ALL.into_iter().find(|a| a.config_name() == s);
            let named = derived_names
                .iter()
                .find(|d| d.eq_ignore_ascii_case(s))
                .copied();
            let twice = |me: &mut Self| {
                me.report(
                    item.span().start,
                    &item_key,
                    &format!("action {s:?} is listed twice"),
                    "remove the duplicate",
                );
            };
            match (row, named) {
                (Some(a), _) if actions.contains(&a) => twice(self),
                (Some(a), _) => actions.push(a),
                (None, Some(d)) if derived.iter().any(|x| x == d) => twice(self),
                (None, Some(d)) => derived.push(d.to_owned()),
                (None, None) => self.report(
                    item.span().start,
                    &item_key,
                    &format!("unknown action {s:?}"),
                    &format!(
                        "use one of {} (derived actions come from [[entity.action]] and snapshot_action of the entities the listener receives)",
                        known()
                    ),
                ),
            }
        }
        (actions, derived)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::condition::Test;
    use crate::config::tests::{MINIMAL, errors, parse};

    fn with_action(action: &str) -> String {
        format!("{MINIMAL}\n[[entity.action]]\n{action}\n")
    }

    #[test]
    fn derived_actions_parse_with_replace_defaulting_to_false() {
        let text = format!(
            "{}\n[[entity.action]]\nname = \"Renewed\"\nwhen = {{ column = \"expires_on\", changed = true }}\nreplace = true\n",
            with_action(
                "name = \"Cancelled\"\nwhen = { column = \"status\", changed_to = \"cancelled\" }"
            )
        );
        let c = parse(&text).unwrap();
        let d = &c.entities[0].derived;
        assert_eq!(
            d,
            &vec![
                DerivedAction {
                    name: "Cancelled".into(),
                    when: Condition::Column {
                        column: "status".into(),
                        test: Test::ChangedTo(json!("cancelled")),
                    },
                    replace: false,
                },
                DerivedAction {
                    name: "Renewed".into(),
                    when: Condition::Column {
                        column: "expires_on".into(),
                        test: Test::Changed(true),
                    },
                    replace: true,
                },
            ]
        );
    }

    #[test]
    fn derived_action_problems_are_reported_with_their_position() {
        let text = format!(
            "{MINIMAL}exclude = [\"secret\"]\n\n[[entity.action]]\nname = \"Updated\"\nwhen = {{ column = \"a\", equals = 1 }}\n\n[[entity.action]]\nname = \"Bad name\"\n\n[[entity.action]]\nname = \"Gone\"\nwhen = {{ column = \"secret\", changed = true }}\n"
        );
        assert_eq!(
            errors(&text),
            vec![
                "walhook.toml:10:8: entity[0].action[0].name: \"Updated\" is a row action; give the derived action its own name, like \"Cancelled\" or \"Renewed\"",
                "walhook.toml:13:1: entity[0].action[1].when: missing key; add when = { column = \"status\", changed_to = \"cancelled\" }",
                "walhook.toml:14:8: entity[0].action[1].name: invalid action name \"Bad name\"; use up to 63 letters, digits and '_', starting with a letter, like \"Cancelled\"",
                "walhook.toml:18:8: entity[0].action[2].when: column \"secret\" is excluded, so its value is never known; remove it from exclude, or test another column",
            ]
        );
    }

    #[test]
    fn listeners_subscribe_to_derived_actions_by_name_and_get_them_by_default() {
        let base = with_action(
            "name = \"Cancelled\"\nwhen = { column = \"status\", changed_to = \"cancelled\" }",
        );
        let listener = |actions: &str| {
            format!(
                "{base}\n[[listener]]\nname = \"crm\"\nurl = \"https://example.com/\"\n{actions}\n"
            )
        };
        let c = parse(&listener("actions = [\"cancelled\"]")).unwrap();
        assert_eq!(c.listeners[0].actions, Vec::<Action>::new());
        assert_eq!(c.listeners[0].derived_actions, vec!["Cancelled".to_owned()]);
        let c = parse(&listener("")).unwrap();
        assert_eq!(c.listeners[0].actions, Action::ALL.to_vec());
        assert_eq!(
            c.listeners[0].derived_actions,
            vec!["Cancelled".to_owned(), "Snapshot".to_owned()]
        );
        let c = parse(&listener("actions = [\"SNAPSHOT\"]")).unwrap();
        assert_eq!(c.listeners[0].derived_actions, vec!["Snapshot".to_owned()]);
        let c = parse(&listener("actions = [\"updated\"]")).unwrap();
        assert!(c.listeners[0].derived_actions.is_empty());
        assert_eq!(
            errors(&listener(
                "actions = [\"Renewed\", \"Cancelled\", \"cancelled\"]"
            )),
            vec![
                "walhook.toml:15:12: listener[0].actions[0]: unknown action \"Renewed\"; use one of created, updated, deleted, truncated, Cancelled, Snapshot (derived actions come from [[entity.action]] and snapshot_action of the entities the listener receives)",
                "walhook.toml:15:36: listener[0].actions[2]: action \"cancelled\" is listed twice; remove the duplicate",
            ]
        );
    }

    #[test]
    fn snapshot_action_defaults_to_snapshot_and_takes_a_name_of_its_own() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.entities[0].snapshot_action, "Snapshot");
        let c = parse(&format!("{MINIMAL}snapshot_action = \"Resync\"\n")).unwrap();
        assert_eq!(c.entities[0].snapshot_action, "Resync");
        for bad in ["Created", "Bad name", "Cancelled"] {
            let text = with_action(
                "name = \"Cancelled\"\nwhen = { column = \"status\", changed_to = \"cancelled\" }",
            )
            .replace(
                "[[entity.action]]",
                &format!("snapshot_action = \"{bad}\"\n\n[[entity.action]]"),
            );
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert!(errs[0].contains("entity[0].snapshot_action"), "{errs:?}");
        }
    }

    #[test]
    fn listener_filters_parse_and_may_not_test_excluded_columns() {
        let text = format!(
            "{MINIMAL}exclude = [\"ssn\"]\n\n[[listener]]\nname = \"nyt\"\nurl = \"https://example.com/\"\nfilter = {{ column = \"title_code\", in = [\"NYT\"] }}\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.listeners[0].filter,
            Some(Condition::Column {
                column: "title_code".into(),
                test: Test::In(vec![json!("NYT")]),
            })
        );
        let text = text.replace("title_code", "ssn");
        assert_eq!(
            errors(&text),
            vec![
                "walhook.toml:12:10: listener[0].filter: column \"ssn\" is excluded, so its value is never known; remove it from exclude, or test another column"
            ]
        );
    }
}

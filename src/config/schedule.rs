//! `[[schedule]]`: notifications sent on a schedule, from a query, through the same queue
//! as change events.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Str;
use super::check::Checker;
use super::entity::EntityConfig;
use crate::types::EntityName;

/// One `[[schedule]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleConfig {
    /// Unique name; the events' source and the key of its runs.
    pub name: String,
    /// The entity the events are about (a configured `[[entity]]`).
    pub entity: EntityName,
    /// The events' action, e.g. `Reminder`: type `Customer.Reminder`.
    pub action: String,
    /// When it runs.
    pub when: ScheduleWhen,
    /// The query: one event per row, its id from the entity's id columns, the whole row
    /// as the event's row.
    pub query: String,
}

/// When a schedule runs.
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleWhen {
    /// At every multiple of this period since the Unix epoch (UTC).
    Every(Duration),
    /// At the times a cron pattern names (UTC).
    Cron(Box<croner::Cron>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    name: Str,
    entity: Str,
    action: Str,
    every: Str,
    cron: Str,
    query: Str,
}

impl Checker<'_> {
    pub(super) fn schedules(
        &mut self,
        raw: &[Spanned<RawSchedule>],
        entities: &[EntityConfig],
    ) -> Vec<ScheduleConfig> {
        let mut out = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        for (i, spanned) in raw.iter().enumerate() {
            let at = spanned.span().start;
            let s = spanned.get_ref();
            let key = |k: &str| format!("schedule[{i}].{k}");
            let name = self.required(&s.name, &key("name"), at, "\"renewal-reminders\"");
            if let (Some(n), Some(v)) = (&name, &s.name) {
                self.unique_name("schedule", n, v.span().start, &key("name"), &mut names);
            }
            let entity = self
                .required(&s.entity, &key("entity"), at, "\"Customer\"")
                .and_then(|e| {
                    let found = entities.iter().find(|c| c.name.as_str() == e.trim());
                    if found.is_none() {
                        let known: Vec<&str> = entities.iter().map(|c| c.name.as_str()).collect();
                        self.report(
                            s.entity.as_ref().map_or(at, |v| v.span().start),
                            &key("entity"),
                            &format!("no [[entity]] is named {e:?}"),
                            &format!("use one of the configured entities: {}", known.join(", ")),
                        );
                    }
                    found.map(|c| c.name.clone())
                });
            let action = self
                .required(&s.action, &key("action"), at, "\"Reminder\"")
                .and_then(|a| {
                    let a = a.trim().to_owned();
                    let ok = a.len() <= 63
                        && a.starts_with(|c: char| c.is_ascii_alphabetic())
                        && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if ok {
                        Some(a)
                    } else {
                        self.report(
                            s.action.as_ref().map_or(at, |v| v.span().start),
                            &key("action"),
                            &format!("invalid action name {a:?}"),
                            "use up to 63 letters, digits and '_', starting with a letter, like \"Reminder\"",
                        );
                        None
                    }
                });
            let when = match (&s.every, &s.cron) {
                (Some(_), Some(c)) => {
                    self.report(
                        c.span().start,
                        &key("cron"),
                        "both every and cron are set",
                        "keep one of them",
                    );
                    None
                }
                (None, None) => {
                    self.report(
                        at,
                        &key("every"),
                        "missing key",
                        "add every = \"1h\" or cron = \"0 6 * * *\"",
                    );
                    None
                }
                (Some(v), None) => {
                    let d = self.duration(&s.every, &key("every"), Duration::ZERO);
                    if d < Duration::from_secs(1) {
                        self.report(
                            v.span().start,
                            &key("every"),
                            "every must be at least 1s",
                            "use a duration like \"1h\"",
                        );
                        None
                    } else {
                        Some(ScheduleWhen::Every(d))
                    }
                }
                (None, Some(v)) => self.string(v, &key("cron")).and_then(|text| {
                    match croner::parser::CronParser::new().parse(text.trim()) {
                        Ok(c) => Some(ScheduleWhen::Cron(Box::new(c))),
                        Err(e) => {
                            self.report(
                                v.span().start,
                                &key("cron"),
                                &format!("invalid cron pattern {text:?}: {e}"),
                                "write five fields: minute hour day-of-month month day-of-week, like \"0 6 * * *\" (times in UTC)",
                            );
                            None
                        }
                    }
                }),
            };
            let query = self.required(
                &s.query,
                &key("query"),
                at,
                "\"SELECT id FROM customer WHERE renew_on = current_date\"",
            );
            if let (Some(name), Some(entity), Some(action), Some(when), Some(query)) =
                (name, entity, action, when, query)
            {
                out.push(ScheduleConfig {
                    name,
                    entity,
                    action,
                    when,
                    query: query.trim().trim_end_matches(';').to_owned(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, errors, parse};

    use super::*;

    #[test]
    fn schedules_parse_every_or_cron_and_problems_are_reported() {
        let text = format!(
            "{MINIMAL}\n[[schedule]]\nname = \"renewals\"\nentity = \"Customer\"\naction = \"Reminder\"\nevery = \"1h\"\nquery = \"SELECT id FROM customer;\"\n\n[[schedule]]\nname = \"daily\"\nentity = \"Customer\"\naction = \"Digest\"\ncron = \"0 6 * * *\"\nquery = \"SELECT 1 AS id\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.schedules.len(), 2);
        assert_eq!(
            c.schedules[0].when,
            ScheduleWhen::Every(Duration::from_secs(3600))
        );
        assert_eq!(c.schedules[0].query, "SELECT id FROM customer");
        assert!(matches!(c.schedules[1].when, ScheduleWhen::Cron(_)));

        let bad = format!(
            "{MINIMAL}\n[[schedule]]\nname = \"x\"\nentity = \"Order\"\naction = \"Re minder\"\nevery = \"1h\"\ncron = \"0 6 * * *\"\nquery = \"SELECT 1\"\n\n[[schedule]]\nname = \"y\"\nentity = \"Customer\"\naction = \"A\"\ncron = \"61 * * * *\"\nquery = \"SELECT 1\"\n"
        );
        let lines = errors(&bad);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].contains("schedule[0].entity: no [[entity]] is named \"Order\""),
            "{lines:?}"
        );
        assert!(lines[1].contains("invalid action name"), "{lines:?}");
        assert!(lines[2].contains("both every and cron"), "{lines:?}");
        assert!(
            lines[3].contains("schedule[1].cron: invalid cron pattern"),
            "{lines:?}"
        );
    }
}

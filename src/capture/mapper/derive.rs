//! Derived actions: `[[entity.action]]` rules that turn a matching change into a domain
//! action (`Customer.Cancelled`), instead of its row action or beside it.

use std::sync::Arc;

use super::plan::Resolver;
use super::{EntityEvent, Mapped};
use crate::condition::{Change, Condition};
use crate::config::DerivedAction;

/// A rule resolved against the table's current columns.
#[derive(Debug)]
pub(super) struct Rule {
    name: Arc<str>,
    when: Condition,
    replace: bool,
}

/// Resolves the rules of an entity: a column renamed within the session is followed; a
/// rule naming a column that is gone is left out (noted), since it cannot be evaluated.
pub(super) fn rules(r: &mut Resolver<'_>, derived: &[DerivedAction]) -> Vec<Rule> {
    let mut out = Vec::new();
    'rules: for d in derived {
        let role = format!("[[entity.action]] {}", d.name);
        let mut when = d.when.clone();
        let mut named: Vec<String> = d.when.columns().into_iter().map(str::to_owned).collect();
        named.sort();
        named.dedup();
        for column in &named {
            match r.find(&role, column) {
                Some(i) => {
                    if let Some(current) = r.column_name(i)
                        && current != column
                    {
                        when.rename(column, current);
                    }
                }
                None => {
                    r.gone(
                        &role,
                        column,
                        &format!("changes are no longer tested for action {}", d.name),
                    );
                    continue 'rules;
                }
            }
        }
        out.push(Rule {
            name: Arc::from(d.name.as_str()),
            when,
            replace: d.replace,
        });
    }
    out
}

/// What a change becomes once the rules are applied: each matching rule's derived event
/// (in rule order), then the plain event unless a matching rule replaces it or `emit_plain`
/// is false (an update touching no tracked column). Several events are kept together, so
/// that the queue can give each listener one of them.
pub(super) fn apply(rules: &[Rule], plain: EntityEvent, emit_plain: bool) -> Option<Mapped> {
    let change = Change {
        action: plain.action,
        row: &plain.row,
        old: plain.old.as_ref(),
        changed_fields: plain.changed_fields.as_deref(),
    };
    let matched: Vec<&Rule> = rules.iter().filter(|r| r.when.matches(&change)).collect();
    if matched.is_empty() {
        return emit_plain.then_some(Mapped::Event(plain));
    }
    let keep_plain = emit_plain && !matched.iter().any(|r| r.replace);
    let mut events: Vec<EntityEvent> = matched
        .iter()
        .map(|r| EntityEvent {
            derived: Some(r.name.clone()),
            ..plain.clone()
        })
        .collect();
    if keep_plain {
        events.push(plain);
    }
    Some(Mapped::Events(events))
}

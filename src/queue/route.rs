//! Routing beyond what the fan-out statement matches (entity and action): which listeners
//! an event is *not* for, stored with it in `walhook.event.excluded_listeners`.
//!
//! * A listener's `filter` is evaluated on the event's row (the old row for deletes); a
//!   listener whose filter does not match receives nothing of that change.
//! * A change that became several events (derived actions beside its row action) reaches
//!   each listener once: as the first of them the listener subscribes to, in the order the
//!   mapper emitted them (rules in file order, the row action last).
//! * An event for one listener only (a backfill run with `--listener`) excludes the others.

use crate::condition::Change;
use crate::mapper::EntityEvent;

use super::Subscription;

/// Per event of `events`, the listeners that must not receive it (`None`: no one beyond
/// the subscriptions). The events of one change are adjacent in a batch.
pub(super) fn exclusions(
    subs: &[Subscription],
    events: &[EntityEvent],
) -> Vec<Option<Vec<String>>> {
    let mut out: Vec<Option<Vec<String>>> = vec![None; events.len()];
    let filtered = subs.iter().any(|s| s.filter.is_some());
    let grouped = events.windows(2).any(|w| same_change(&w[0], &w[1]));
    let addressed = events.iter().any(|e| e.only_listener.is_some());
    if !filtered && !grouped && !addressed {
        return out;
    }
    let mut start = 0;
    while start < events.len() {
        let mut end = start + 1;
        while end < events.len() && same_change(&events[start], &events[end]) {
            end += 1;
        }
        if let (Some(group), Some(excluded)) = (events.get(start..end), out.get_mut(start..end)) {
            exclude_group(subs, group, excluded);
        }
        start = end;
    }
    out
}

/// Events of one change: same key and entity (a parent's event made of child rows may
/// share the key of the child's own event).
fn same_change(a: &EntityEvent, b: &EntityEvent) -> bool {
    a.commit_lsn == b.commit_lsn
        && a.seq == b.seq
        && a.entity == b.entity
        && a.entity_id == b.entity_id
}

/// Gives each listener whose filter matches the first event of the group it subscribes to.
fn exclude_group(subs: &[Subscription], group: &[EntityEvent], out: &mut [Option<Vec<String>>]) {
    let Some(first) = group.first() else { return };
    let change = Change {
        action: first.action,
        row: &first.row,
        old: first.old.as_ref(),
        changed_fields: first.changed_fields.as_deref(),
    };
    for sub in subs.iter().filter(|s| covers(s, first)) {
        let elsewhere = first
            .only_listener
            .as_ref()
            .is_some_and(|only| **only != *sub.listener);
        // Every event of a change carries the same row: one evaluation for the group.
        let mut taken = elsewhere || sub.filter.as_ref().is_some_and(|f| !f.matches(&change));
        for (event, excluded) in group.iter().zip(out.iter_mut()) {
            if !receives(sub, event) {
                continue;
            }
            if taken {
                excluded
                    .get_or_insert_with(Vec::new)
                    .push(sub.listener.clone());
            }
            taken = true;
        }
    }
}

/// Whether the subscription is for the event's entity.
fn covers(sub: &Subscription, event: &EntityEvent) -> bool {
    sub.entities
        .as_ref()
        .is_none_or(|es| es.contains(&event.entity))
}

/// Whether the subscription asks for the event's action (as the fan-out statement does).
fn receives(sub: &Subscription, event: &EntityEvent) -> bool {
    match &event.derived {
        Some(name) => sub.derived_actions.iter().any(|d| **d == **name),
        None => sub.actions.contains(&event.action),
    }
}

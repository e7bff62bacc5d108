//! What the queue hands to delivery: a stored event and a notification claimed for one
//! listener. Delivery depends on these types; the queue depends on nothing in delivery.

use std::time::SystemTime;

use serde_json::Value;
use uuid::Uuid;

use crate::types::{Action, Lsn};

/// An event as stored in `walhook.event`, read back for delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// The stable event id listeners use to drop duplicates.
    pub event_id: Uuid,
    /// Commit LSN of the source transaction.
    pub commit_lsn: Lsn,
    /// Ordinal of the change within its transaction.
    pub seq: i32,
    /// Source commit time.
    pub commit_time: SystemTime,
    /// Entity type, e.g. `Customer`.
    pub entity: String,
    /// Entity id (text; JSON array text for composite ids).
    pub entity_id: String,
    /// What happened to the row.
    pub action: Action,
    /// The derived action (`[[entity.action]]` name) the event stands for, if any: formats
    /// name the event by [`StoredEvent::action_name`].
    pub derived: Option<String>,
    /// Changed columns; `None` when unknown or not an update.
    pub changed_fields: Option<Vec<String>>,
    /// The row (new row; old row for deletes).
    pub row: Value,
    /// The old row where known.
    pub old: Option<Value>,
    /// Subject rendered from the entity's template.
    pub subject: Option<String>,
    /// `schema.table` the change came from.
    pub source_table: String,
}

impl StoredEvent {
    /// The action listeners see (event types such as `Customer.Cancelled`): the derived
    /// action's name, or the row action's.
    pub fn action_name(&self) -> &str {
        self.derived.as_deref().unwrap_or(self.action.as_str())
    }
}

/// A notification claimed for delivery: one event for one listener.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    /// Notification id (stable across `walhook.new` / `processed` / `failed`).
    pub id: i64,
    /// Attempts made before this one.
    pub attempts: i32,
    /// The event to deliver.
    pub event: StoredEvent,
}

/// An event's row action and derived action from `walhook.event.action` and `row_action`.
pub(crate) fn read_action(
    action: String,
    row_action: Option<String>,
) -> Result<(Action, Option<String>), String> {
    let parse = |name: &str| {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == name)
            .ok_or_else(|| format!("unknown action {name:?} in walhook.event"))
    };
    match row_action {
        None => Ok((parse(&action)?, None)),
        Some(row) => Ok((parse(&row)?, Some(action))),
    }
}

//! Formats: how a listener's events become one message (body, content type and the
//! attributes the format defines), independent of the transport that carries it.
//!
//! One file per format; [`Format`] is the exhaustive list the dispatcher matches on. A new
//! format is a new file here, one variant in [`Format`] (and its arms below) and one
//! variant of [`ListenerFormat`] in the config.

pub mod cloudevents;
pub mod eventgrid;
pub mod form;
pub mod servicebus;
pub mod template;

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use uuid::Uuid;

use crate::config::{Field, ListenerConfig, ListenerFormat};
use crate::queue::StoredEvent;
use crate::types::Action;

pub use cloudevents::CloudEvents;
pub use eventgrid::EventGrid;
pub use form::Form;
pub use servicebus::ServiceBus;
pub use template::TemplateFormat;

/// A rendered message, ready for a sink: what one event or one batch of events becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Identifies the message for receivers that drop duplicates (`webhook-id`,
    /// `Nats-Msg-Id`): the event id, or an id derived from a batch's event ids.
    pub id: String,
    /// The bytes the listener receives.
    pub body: Vec<u8>,
    /// The body's media type.
    pub content_type: Cow<'static, str>,
    /// Attributes the format carries beside the body (CloudEvents binary mode's `ce-*`),
    /// lower-case names; a sink sends them as headers or message properties.
    pub attributes: Vec<(Cow<'static, str>, String)>,
    /// Where within the listener the message goes, for formats that address one topic per
    /// entity (a Service Bus topic or queue); `None`: the listener itself.
    pub topic: Option<String>,
}

/// A listener's payload format.
#[derive(Clone, Debug)]
pub enum Format {
    /// CloudEvents 1.0, structured or binary content mode.
    CloudEvents(CloudEvents),
    /// A posted HTML form.
    Form(Form),
    /// A body from the listener's template.
    Template(TemplateFormat),
    /// The Azure Event Grid event schema.
    EventGrid(EventGrid),
    /// Azure Service Bus's flat message contract.
    ServiceBus(ServiceBus),
}

impl Format {
    /// The format a listener's config asks for; `source_system` names the database.
    pub fn for_listener(listener: &ListenerConfig, source_system: &str) -> Format {
        let types = &listener.event_types;
        match &listener.format {
            ListenerFormat::CloudEvents(mode) => {
                Format::CloudEvents(CloudEvents::new(source_system, *mode))
            }
            ListenerFormat::Form(config) => Format::Form(Form::new(config, source_system)),
            ListenerFormat::Template(config) => {
                Format::Template(TemplateFormat::new(config, source_system))
            }
            ListenerFormat::EventGrid(c) => {
                Format::EventGrid(EventGrid::new(c, types, source_system))
            }
            ListenerFormat::ServiceBus(c) => {
                Format::ServiceBus(ServiceBus::new(c, types, source_system))
            }
        }
    }

    /// The message for one event.
    pub fn render(&self, event: &StoredEvent) -> Message {
        match self {
            Format::CloudEvents(f) => f.render(event),
            Format::Form(f) => f.render(event),
            Format::Template(f) => f.render(event),
            Format::EventGrid(f) => f.render(event),
            Format::ServiceBus(f) => f.render(event),
        }
    }

    /// One message carrying `events` in order (for listeners that take batches).
    pub fn render_batch(&self, events: &[&StoredEvent]) -> Message {
        let parts: Vec<Vec<u8>> = events.iter().map(|e| self.batch_part(e)).collect();
        self.assemble_batch(events, &parts)
    }

    /// Whether the format can carry several events in one message. A form cannot; a
    /// Service Bus message goes to one entity's topic, and a batch may hold several
    /// entities, so Service Bus listeners get one message per request.
    pub fn batches(&self) -> bool {
        match self {
            Format::CloudEvents(_) | Format::Template(_) | Format::EventGrid(_) => true,
            Format::Form(_) | Format::ServiceBus(_) => false,
        }
    }

    /// The bytes one event contributes to a batch message. Batches are built from these so
    /// each event is rendered once, and measured before it joins a batch.
    pub fn batch_part(&self, event: &StoredEvent) -> Vec<u8> {
        match self {
            Format::CloudEvents(f) => f.batch_part(event),
            Format::Form(f) => f.render(event).body,
            Format::Template(f) => f.batch_part(event),
            Format::EventGrid(f) => f.batch_part(event),
            Format::ServiceBus(f) => f.render(event).body,
        }
    }

    /// At most how many bytes a batch of `parts` events adds to the sum of its parts
    /// (brackets, separators, the batch template's text).
    pub fn batch_overhead(&self, parts: usize) -> usize {
        let separators = parts.saturating_sub(1);
        match self {
            Format::CloudEvents(_) | Format::EventGrid(_) => 2 + separators,
            Format::Form(_) | Format::ServiceBus(_) => separators,
            Format::Template(f) => f.batch_overhead(parts),
        }
    }

    /// The batch message of `events`, whose parts (from [`Format::batch_part`], in the
    /// same order) are `parts`.
    pub fn assemble_batch(&self, events: &[&StoredEvent], parts: &[Vec<u8>]) -> Message {
        match self {
            Format::CloudEvents(_) => Message {
                id: batch_id(events),
                body: join(b"[", parts, b",", b"]"),
                content_type: Cow::Borrowed(cloudevents::CLOUDEVENTS_BATCH_CONTENT_TYPE),
                attributes: Vec::new(),
                topic: None,
            },
            Format::EventGrid(f) => f.assemble(batch_id(events), join(b"[", parts, b",", b"]")),
            // Never configured (see `batches`): one event's message.
            Format::ServiceBus(f) => match events {
                [one] => f.render(one),
                _ => f.render_batch(events),
            },
            // Never configured (a form carries one event); fields of several events in one
            // form would still be read in order.
            Format::Form(_) => Message {
                id: batch_id(events),
                body: join(b"", parts, b"&", b""),
                content_type: Cow::Borrowed(form::FORM_CONTENT_TYPE),
                attributes: Vec::new(),
                topic: None,
            },
            Format::Template(f) => f.assemble_batch(events, parts),
        }
    }
}

/// Names batch ids (uuid v5 over the batch's event ids), so a batch sent again with the
/// same events keeps its id.
const BATCH_ID_NAMESPACE: Uuid = Uuid::from_u128(0x9d2f_41c7_5a0e_4b8e_8c3d_62a1_6261_7463);

/// The id of a batch message: derived from its event ids, in order.
pub(crate) fn batch_id(events: &[&StoredEvent]) -> String {
    let ids: Vec<u8> = events
        .iter()
        .flat_map(|e| e.event_id.as_bytes().iter().copied())
        .collect();
    Uuid::new_v5(&BATCH_ID_NAMESPACE, &ids).to_string()
}

/// `prefix`, the parts separated by `separator`, `suffix`.
fn join(prefix: &[u8], parts: &[Vec<u8>], separator: &[u8], suffix: &[u8]) -> Vec<u8> {
    let len = parts.iter().map(Vec::len).sum::<usize>()
        + prefix.len()
        + suffix.len()
        + separator.len() * parts.len().saturating_sub(1);
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(prefix);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            body.extend_from_slice(separator);
        }
        body.extend_from_slice(part);
    }
    body.extend_from_slice(suffix);
    body
}

/// The name a listener's payload gives an action (`Created`, …). The one place formats ask,
/// so a per-listener mapping of event types can answer instead.
pub(crate) fn action_name(event: &StoredEvent) -> &str {
    event.action_name()
}

/// The number a listener's payload gives an action: 1 created, 2 updated, 3 deleted, 4
/// truncated (the codes of the flat contracts walhook replaces).
pub(crate) fn action_code(event: &StoredEvent) -> i64 {
    match event.action {
        Action::Created => 1,
        Action::Updated => 2,
        Action::Deleted => 3,
        Action::Truncated => 4,
    }
}

/// The value of one event field, as formats insert it.
#[derive(Debug, PartialEq)]
pub(crate) enum FieldValue<'a> {
    /// Text.
    Text(Cow<'a, str>),
    /// A number.
    Number(i64),
    /// A JSON value from the row.
    Json(&'a Value),
    /// A list of column names; `None` when unknown.
    List(Option<&'a [String]>),
    /// Nothing (no subject, no old row, a missing column).
    Null,
}

impl FieldValue<'_> {
    /// The value as text: strings as they are, numbers and booleans as written in JSON,
    /// lists comma-separated, objects and arrays as JSON text, null as "".
    pub(crate) fn text(&self) -> Cow<'_, str> {
        match self {
            FieldValue::Text(t) => Cow::Borrowed(t.as_ref()),
            FieldValue::Number(n) => Cow::Owned(n.to_string()),
            FieldValue::Json(Value::String(s)) => Cow::Borrowed(s),
            FieldValue::Json(Value::Null) | FieldValue::Null | FieldValue::List(None) => {
                Cow::Borrowed("")
            }
            FieldValue::Json(v) => Cow::Owned(v.to_string()),
            FieldValue::List(Some(items)) => Cow::Owned(items.join(",")),
        }
    }

    /// The value as JSON, appended to `out`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        // Writing JSON into a Vec cannot fail.
        let _ = match self {
            FieldValue::Text(t) => serde_json::to_writer(&mut *out, t.as_ref()),
            FieldValue::Number(n) => serde_json::to_writer(&mut *out, n),
            FieldValue::Json(v) => serde_json::to_writer(&mut *out, v),
            FieldValue::List(l) => serde_json::to_writer(&mut *out, l),
            FieldValue::Null => serde_json::to_writer(&mut *out, &Value::Null),
        };
    }
}

/// The value `field` has for `event`. Batch fields (`{events}`, `{count}`, `{batch_id}`)
/// are not event fields: they are `Null` here.
pub(crate) fn field_value<'a>(
    field: &'a Field,
    event: &'a StoredEvent,
    source_system: &'a str,
) -> FieldValue<'a> {
    let text = |s: &'a str| FieldValue::Text(Cow::Borrowed(s));
    let column = |row: Option<&'a Value>, name: &str| {
        row.and_then(|r| r.get(name))
            .map_or(FieldValue::Null, FieldValue::Json)
    };
    match field {
        Field::Id => text(&event.entity_id),
        Field::Entity => text(&event.entity),
        Field::Action => text(action_name(event)),
        Field::ActionCode => FieldValue::Number(action_code(event)),
        Field::EventId => FieldValue::Text(Cow::Owned(event.event_id.to_string())),
        Field::Time => FieldValue::Text(Cow::Owned(rfc3339_micros(event.commit_time))),
        Field::ChangedFields => FieldValue::List(event.changed_fields.as_deref()),
        Field::Subject => event.subject.as_deref().map_or(FieldValue::Null, text),
        Field::SourceSystem => text(source_system),
        Field::SourceTable => text(&event.source_table),
        Field::CommitLsn => FieldValue::Text(Cow::Owned(event.commit_lsn.to_string())),
        Field::Row => FieldValue::Json(&event.row),
        Field::Old => event
            .old
            .as_ref()
            .map_or(FieldValue::Null, FieldValue::Json),
        Field::RowColumn(name) => column(Some(&event.row), name),
        Field::OldColumn(name) => column(event.old.as_ref(), name),
        Field::Events | Field::Count | Field::BatchId => FieldValue::Null,
    }
}

/// `2024-05-01T12:34:56.123456Z`. Times before 1970 (impossible for a commit) print as
/// the epoch rather than panicking.
pub(crate) fn rfc3339_micros(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Howard Hinnant's days-to-civil algorithm, for days since 1970-01-01 (non-negative).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn time_formatting_handles_leap_days_and_the_epoch() {
        assert_eq!(rfc3339_micros(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59.000001Z
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199) + Duration::from_micros(1);
        assert_eq!(rfc3339_micros(t), "2024-02-29T23:59:59.000001Z");
        assert_eq!(
            rfc3339_micros(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000000Z"
        );
    }
}

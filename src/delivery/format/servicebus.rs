//! Azure Service Bus's flat message contract: the body has exactly `sourceSystem`,
//! `evenType` (1 created, 2 updated, 3 deleted), `id`, `type`, `timestamp`,
//! `partitionKey`, `onBehalfOf` and `changedFields` (comma-separated); `BrokerProperties`
//! carries MessageId (the event id), CorrelationId (one per source transaction),
//! PartitionKey and Label; the correlation id is also the `Diagnostic-Id`. Each entity's
//! messages go to their own topic or queue (`api.event.{entity}`).

use std::borrow::Cow;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Message, batch_id, rfc3339_micros};
use crate::config::{EventType, EventTypes, ServiceBusConfig, TopicTemplate};
use crate::queue::StoredEvent;
use crate::types::Action;

/// The content type of one message's body.
pub const SERVICEBUS_CONTENT_TYPE: &str = "application/json; charset=utf-8";
/// The content type of Service Bus's batch send (an array of messages).
pub const SERVICEBUS_BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";
/// Names correlation ids (uuid v5 over the source system and the commit LSN).
const CORRELATION_NAMESPACE: Uuid = Uuid::from_u128(0x5e1b_7a2c_90d4_4f63_a8e1_7365_7276_6963);
/// Headers a user property must not replace: HTTP's own and those walhook sends.
const RESERVED: [&str; 16] = [
    "authorization",
    "brokerproperties",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "diagnostic-id",
    "expect",
    "host",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "webhook-id",
    "webhook-signature",
];
/// Longest changed value sent as a user property; longer ones stay in the database.
const MAX_PROPERTY_BYTES: usize = 1024;

/// The Service Bus format of one listener.
#[derive(Clone, Debug)]
pub struct ServiceBus {
    source_system: String,
    topic: TopicTemplate,
    on_behalf_of: Option<String>,
    user_properties: bool,
    event_types: EventTypes,
}

impl ServiceBus {
    /// The format for `config`, with `event_types` as evenType codes; `source_system` is
    /// every message's `sourceSystem`.
    pub fn new(
        config: &ServiceBusConfig,
        event_types: &EventTypes,
        source_system: &str,
    ) -> ServiceBus {
        ServiceBus {
            source_system: source_system.to_owned(),
            topic: config.topic.clone(),
            on_behalf_of: config.on_behalf_of.clone(),
            user_properties: config.user_properties,
            event_types: event_types.clone(),
        }
    }

    /// The topic or queue `entity`'s messages go to.
    pub fn topic_of(&self, entity: &str) -> String {
        self.topic.render(entity)
    }

    /// One event as one message to its entity's topic.
    pub fn render(&self, event: &StoredEvent) -> Message {
        let parts = self.parts(event);
        let mut attributes = vec![
            (Cow::Borrowed("brokerproperties"), ascii_json(&parts.broker)),
            (
                Cow::Borrowed("diagnostic-id"),
                parts.broker.correlation_id.clone(),
            ),
        ];
        attributes.extend(
            parts
                .user
                .into_iter()
                .map(|(name, value)| (Cow::Owned(name), value)),
        );
        Message {
            id: event.event_id.to_string(),
            body: serde_json::to_vec(&parts.body).unwrap_or_default(),
            content_type: Cow::Borrowed(SERVICEBUS_CONTENT_TYPE),
            attributes,
            topic: Some(self.topic_of(&event.entity)),
        }
    }

    /// `events` as one batch send. Service Bus takes a batch for one topic only: when the
    /// events belong to several, the message has no topic and cannot be sent.
    pub fn render_batch(&self, events: &[&StoredEvent]) -> Message {
        let mut topic = events.first().map(|e| self.topic_of(&e.entity));
        let mut batch = Vec::with_capacity(events.len());
        for event in events {
            if topic.as_deref() != Some(self.topic_of(&event.entity).as_str()) {
                topic = None;
            }
            let parts = self.parts(event);
            batch.push(BatchMessage {
                body: serde_json::to_string(&parts.body).unwrap_or_default(),
                broker_properties: parts.broker,
                user_properties: parts
                    .user
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                    .collect(),
            });
        }
        Message {
            id: batch_id(events),
            body: serde_json::to_vec(&batch).unwrap_or_default(),
            content_type: Cow::Borrowed(SERVICEBUS_BATCH_CONTENT_TYPE),
            attributes: Vec::new(),
            topic,
        }
    }

    fn parts<'a>(&'a self, event: &'a StoredEvent) -> Parts<'a> {
        let kind = event.entity.to_lowercase();
        let partition_key = format!("{kind}.{}", event.entity_id);
        let correlation_id = Uuid::new_v5(
            &CORRELATION_NAMESPACE,
            format!("{}/{}", self.source_system, event.commit_lsn).as_bytes(),
        )
        .to_string();
        let changed = changed_fields(event);
        let user = if self.user_properties {
            user_properties(event, changed.as_deref().unwrap_or_default())
        } else {
            Vec::new()
        };
        Parts {
            body: Body {
                source_system: &self.source_system,
                even_type: self.even_type(event.action),
                id: &event.entity_id,
                timestamp: rfc3339_micros(event.commit_time),
                on_behalf_of: self
                    .on_behalf_of
                    .as_deref()
                    .and_then(|c| column_text(&event.row, c)),
                changed_fields: changed.as_ref().map(|c| c.join(",")),
                partition_key: partition_key.clone(),
                kind,
            },
            broker: BrokerProperties {
                message_id: event.event_id.to_string(),
                correlation_id,
                partition_key,
                label: format!("{}.{}", event.entity, event.action_name()),
            },
            user,
        }
    }

    fn even_type(&self, action: Action) -> i64 {
        match self.event_types.get(action) {
            Some(EventType::Code(c)) => *c,
            // The config refuses names for servicebus; a name falls back to the default.
            Some(EventType::Name(_)) | None => match action {
                Action::Created => 1,
                Action::Updated => 2,
                // The config asks for a code for truncated; without one it is the nearest.
                Action::Deleted | Action::Truncated => 3,
            },
        }
    }
}

/// The changed columns in column order: an update's changed columns, every column of a
/// created row, none for a delete; `None` when unknown (an update without the old row).
fn changed_fields(event: &StoredEvent) -> Option<Vec<&str>> {
    match (&event.changed_fields, event.action) {
        (Some(c), _) => Some(c.iter().map(String::as_str).collect()),
        (None, Action::Created) => Some(
            event
                .row
                .as_object()
                .map(|r| r.keys().map(String::as_str).collect())
                .unwrap_or_default(),
        ),
        (None, Action::Deleted | Action::Truncated) => Some(Vec::new()),
        (None, Action::Updated) => None,
    }
}

/// A column's value as text: strings as they are, numbers and booleans written out;
/// `None` for null, a missing column, arrays and objects.
fn column_text(row: &Value, column: &str) -> Option<String> {
    match row.get(column)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// The changed columns' scalar values as user properties: header name (the column in
/// lower case) and value in Service Bus's header form (JSON: strings quoted). Columns whose
/// name cannot be a header, or would replace one walhook sends, are left out, as are long
/// values.
fn user_properties(event: &StoredEvent, changed: &[&str]) -> Vec<(String, String)> {
    changed
        .iter()
        .filter_map(|column| {
            let name = column.to_ascii_lowercase();
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token || RESERVED.contains(&name.as_str()) || name.starts_with("webhook-") {
                return None;
            }
            let value = match event.row.get(*column)? {
                v @ (Value::String(_) | Value::Number(_) | Value::Bool(_)) => ascii_json(v),
                Value::Null | Value::Array(_) | Value::Object(_) => return None,
            };
            (value.len() <= MAX_PROPERTY_BYTES).then_some((name, value))
        })
        .collect()
}

/// JSON with every non-ASCII character escaped (`\uXXXX`), so it fits in a header value.
fn ascii_json<T: Serialize>(value: &T) -> String {
    let text = serde_json::to_string(value).unwrap_or_default();
    if text.is_ascii() {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            // Non-ASCII only occurs inside JSON strings, where \u escapes are valid.
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

struct Parts<'a> {
    body: Body<'a>,
    broker: BrokerProperties,
    user: Vec<(String, String)>,
}

/// The flat contract; field names exactly so (`evenType` is the contract's spelling).
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "sourceSystem")]
    source_system: &'a str,
    #[serde(rename = "evenType")]
    even_type: i64,
    id: &'a str,
    #[serde(rename = "type")]
    kind: String,
    timestamp: String,
    #[serde(rename = "partitionKey")]
    partition_key: String,
    #[serde(rename = "onBehalfOf")]
    on_behalf_of: Option<String>,
    #[serde(rename = "changedFields")]
    changed_fields: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties {
    message_id: String,
    correlation_id: String,
    partition_key: String,
    label: String,
}

/// One message of a batch send.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchMessage {
    body: String,
    broker_properties: BrokerProperties,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    user_properties: serde_json::Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::secret::Secret;
    use crate::types::Lsn;

    fn config() -> ServiceBusConfig {
        ServiceBusConfig {
            topic: TopicTemplate::parse("api.event.{entity}").unwrap(),
            sas_key_name: "send".into(),
            sas_key: Secret::new("k".into()),
            token_ttl: Duration::from_secs(3600),
            on_behalf_of: Some("modified_by".into()),
            user_properties: false,
        }
    }

    fn event(action: Action) -> StoredEvent {
        StoredEvent {
            event_id: Uuid::parse_str("0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap(),
            commit_lsn: Lsn(0x16_B374_D848),
            seq: 3,
            commit_time: UNIX_EPOCH + Duration::from_micros(1_714_566_896_123_456),
            entity: "Customer".into(),
            entity_id: "42".into(),
            action,
            derived: None,
            changed_fields: Some(vec!["last_name".into(), "first_name".into(), "city".into()]),
            row: json!({"id": 42, "first_name": "Ada", "last_name": "Lovelace", "city": "Zürich", "modified_by": "ops@example.com"}),
            old: None,
            subject: None,
            source_table: "public.customer".into(),
        }
    }

    fn attribute<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
        m.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_body_has_exactly_the_contracts_fields() {
        let f = ServiceBus::new(&config(), &EventTypes::default(), "CRM");
        let m = f.render(&event(Action::Updated));
        assert_eq!(m.id, "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
        assert_eq!(m.topic.as_deref(), Some("api.event.customer"));
        assert_eq!(m.content_type, SERVICEBUS_CONTENT_TYPE);
        let body: Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(
            body,
            json!({
                "sourceSystem": "CRM",
                "evenType": 2,
                "id": "42",
                "type": "customer",
                "timestamp": "2024-05-01T12:34:56.123456Z",
                "partitionKey": "customer.42",
                "onBehalfOf": "ops@example.com",
                "changedFields": "last_name,first_name,city",
            })
        );
    }

    #[test]
    fn broker_properties_and_diagnostic_id_carry_ids_partition_key_and_label() {
        let f = ServiceBus::new(&config(), &EventTypes::default(), "CRM");
        let e = event(Action::Updated);
        let m = f.render(&e);
        let broker: Value =
            serde_json::from_str(attribute(&m, "brokerproperties").unwrap()).unwrap();
        assert_eq!(broker["MessageId"], "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
        assert_eq!(broker["PartitionKey"], "customer.42");
        assert_eq!(broker["Label"], "Customer.Updated");
        let correlation = broker["CorrelationId"].as_str().unwrap();
        assert_eq!(attribute(&m, "diagnostic-id"), Some(correlation));
        // One correlation id per source transaction.
        let mut other = event(Action::Created);
        other.event_id = Uuid::new_v4();
        other.seq = 4;
        let m2 = f.render(&other);
        assert_eq!(attribute(&m2, "diagnostic-id"), Some(correlation));
        other.commit_lsn = Lsn(1);
        assert_ne!(
            attribute(&f.render(&other), "diagnostic-id"),
            Some(correlation)
        );
    }

    #[test]
    fn even_type_is_1_2_3_unless_mapped() {
        let f = ServiceBus::new(&config(), &EventTypes::default(), "CRM");
        let even = |f: &ServiceBus, a| {
            let b: Value = serde_json::from_slice(&f.render(&event(a)).body).unwrap();
            b["evenType"].clone()
        };
        assert_eq!(even(&f, Action::Created), 1);
        assert_eq!(even(&f, Action::Updated), 2);
        assert_eq!(even(&f, Action::Deleted), 3);
        let mut types = EventTypes::default();
        types.set(Action::Created, EventType::Code(1));
        types.set(Action::Deleted, EventType::Code(1));
        types.set(Action::Truncated, EventType::Code(9));
        let f = ServiceBus::new(&config(), &types, "CRM");
        assert_eq!(even(&f, Action::Deleted), 1);
        assert_eq!(even(&f, Action::Truncated), 9);
    }

    #[test]
    fn changed_fields_are_empty_for_deletes_null_when_unknown_and_on_behalf_of_may_be_null() {
        let f = ServiceBus::new(&config(), &EventTypes::default(), "CRM");
        let body =
            |e: &StoredEvent| -> Value { serde_json::from_slice(&f.render(e).body).unwrap() };
        let mut deleted = event(Action::Deleted);
        deleted.changed_fields = None;
        assert_eq!(body(&deleted)["changedFields"], "");
        let mut unknown = event(Action::Updated);
        unknown.changed_fields = None;
        assert_eq!(body(&unknown)["changedFields"], Value::Null);
        let mut anonymous = event(Action::Updated);
        anonymous.row["modified_by"] = Value::Null;
        assert_eq!(body(&anonymous)["onBehalfOf"], Value::Null);
        let unconfigured = ServiceBus::new(
            &ServiceBusConfig {
                on_behalf_of: None,
                ..config()
            },
            &EventTypes::default(),
            "CRM",
        );
        let b: Value =
            serde_json::from_slice(&unconfigured.render(&event(Action::Updated)).body).unwrap();
        assert_eq!(b["onBehalfOf"], Value::Null);
        assert_eq!(b.as_object().unwrap().len(), 8);
    }

    #[test]
    fn user_properties_carry_changed_scalar_values_as_ascii_header_values() {
        let f = ServiceBus::new(
            &ServiceBusConfig {
                user_properties: true,
                ..config()
            },
            &EventTypes::default(),
            "CRM",
        );
        let mut e = event(Action::Updated);
        e.changed_fields = Some(vec![
            "city".into(),
            "id".into(),
            "Content-Type".into(),
            "bad name".into(),
            "tags".into(),
        ]);
        e.row["Content-Type"] = json!("x");
        e.row["bad name"] = json!("x");
        e.row["tags"] = json!(["a"]);
        let m = f.render(&e);
        let props: Vec<(&str, &str)> = m
            .attributes
            .iter()
            .filter(|(k, _)| k != "brokerproperties" && k != "diagnostic-id")
            .map(|(k, v)| (k.as_ref(), v.as_str()))
            .collect();
        assert_eq!(props, [("city", "\"Z\\u00fcrich\""), ("id", "42")]);
        let back: Value = serde_json::from_str(props[0].1).unwrap();
        assert_eq!(back, "Zürich");
    }

    #[test]
    fn a_batch_for_one_topic_is_a_service_bus_batch_and_mixed_topics_have_none() {
        let f = ServiceBus::new(&config(), &EventTypes::default(), "CRM");
        let a = event(Action::Created);
        let mut b = event(Action::Updated);
        b.event_id = Uuid::parse_str("1b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap();
        let m = f.render_batch(&[&a, &b]);
        assert_eq!(m.topic.as_deref(), Some("api.event.customer"));
        assert_eq!(m.content_type, SERVICEBUS_BATCH_CONTENT_TYPE);
        let batch: Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(
            batch[1]["BrokerProperties"]["MessageId"],
            b.event_id.to_string()
        );
        let inner: Value = serde_json::from_str(batch[0]["Body"].as_str().unwrap()).unwrap();
        assert_eq!(inner["evenType"], 1);
        let mut other = event(Action::Updated);
        other.entity = "Order".into();
        assert_eq!(f.render_batch(&[&a, &other]).topic, None);
    }
}

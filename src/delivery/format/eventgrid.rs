//! The Azure Event Grid event schema: every request is a JSON array of events (`id`,
//! `topic`, `subject`, `eventType`, `eventTime`, `data`, `dataVersion`,
//! `metadataVersion`), as Event Grid delivers them to webhooks and accepts them on a topic
//! endpoint. Also the `Microsoft.EventGrid.SubscriptionValidationEvent` of the webhook
//! validation handshake.

use std::borrow::Cow;
use std::time::SystemTime;

use serde::Serialize;
use uuid::Uuid;

use super::cloudevents::{CloudEventData, encode_segment};
use super::{Message, batch_id, rfc3339_micros};
use crate::config::{EventGridConfig, EventGridDelivery, EventTypes};
use crate::queue::StoredEvent;

/// The content type of every Event Grid request.
pub const EVENTGRID_CONTENT_TYPE: &str = "application/json; charset=utf-8";
/// The `eventType` of the validation handshake.
pub const VALIDATION_EVENT_TYPE: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";
/// Event Grid's header telling notifications from the handshake.
const EVENT_TYPE_HEADER: &str = "aeg-event-type";

/// The Event Grid format of one listener.
#[derive(Clone, Debug)]
pub struct EventGrid {
    topic: Option<String>,
    data_version: String,
    event_types: EventTypes,
    /// Webhooks get `aeg-event-type` headers, as Event Grid sends them.
    webhook: bool,
}

impl EventGrid {
    /// The format for `config`, with `event_types` mapped and `source_system` naming the
    /// default topic of webhooks.
    pub fn new(
        config: &EventGridConfig,
        event_types: &EventTypes,
        source_system: &str,
    ) -> EventGrid {
        let webhook = matches!(config.delivery, EventGridDelivery::Webhook { .. });
        let topic = match (&config.topic, webhook) {
            (Some(t), _) => Some(t.clone()),
            (None, true) => Some(format!("/walhook/{}", encode_segment(source_system))),
            // A topic endpoint fills in its own resource path.
            (None, false) => None,
        };
        EventGrid {
            topic,
            data_version: config.data_version.clone(),
            event_types: event_types.clone(),
            webhook,
        }
    }

    /// One event, as a one-element array.
    pub fn render(&self, event: &StoredEvent) -> Message {
        let body = serde_json::to_vec(&[self.event(event)]).unwrap_or_default();
        self.message(event.event_id.to_string(), body)
    }

    /// `events` in order, as one array.
    pub fn render_batch(&self, events: &[&StoredEvent]) -> Message {
        let batch: Vec<GridEvent<'_, CloudEventData<'_>>> =
            events.iter().map(|e| self.event(e)).collect();
        let body = serde_json::to_vec(&batch).unwrap_or_default();
        self.message(batch_id(events), body)
    }

    /// One event of a batch: the event object, without the array around it.
    pub fn batch_part(&self, event: &StoredEvent) -> Vec<u8> {
        serde_json::to_vec(&self.event(event)).unwrap_or_default()
    }

    /// A batch message from its body (the parts in an array) and its id.
    pub fn assemble(&self, id: String, body: Vec<u8>) -> Message {
        self.message(id, body)
    }

    /// The handshake's request: one `SubscriptionValidationEvent` carrying `code`, which
    /// the listener echoes, and `validation_url`, which it may GET instead.
    pub fn validation(&self, code: &str, validation_url: &str, now: SystemTime) -> Message {
        let id = Uuid::new_v4().to_string();
        let event = GridEvent {
            id: id.clone(),
            topic: self.topic.as_deref(),
            subject: Cow::Borrowed(""),
            event_type: Cow::Borrowed(VALIDATION_EVENT_TYPE),
            event_time: rfc3339_micros(now),
            data: ValidationData {
                validation_code: code,
                validation_url,
            },
            data_version: "1",
            metadata_version: "1",
        };
        Message {
            id,
            body: serde_json::to_vec(&[event]).unwrap_or_default(),
            content_type: Cow::Borrowed(EVENTGRID_CONTENT_TYPE),
            attributes: vec![(
                Cow::Borrowed(EVENT_TYPE_HEADER),
                "SubscriptionValidation".to_owned(),
            )],
            topic: None,
        }
    }

    fn message(&self, id: String, body: Vec<u8>) -> Message {
        let attributes = if self.webhook {
            vec![(Cow::Borrowed(EVENT_TYPE_HEADER), "Notification".to_owned())]
        } else {
            Vec::new()
        };
        Message {
            id,
            body,
            content_type: Cow::Borrowed(EVENTGRID_CONTENT_TYPE),
            attributes,
            topic: None,
        }
    }

    fn event<'a>(&'a self, event: &'a StoredEvent) -> GridEvent<'a, CloudEventData<'a>> {
        // event_types maps row actions; a derived action keeps its own name.
        let mapped = event
            .derived
            .is_none()
            .then(|| self.event_types.get(event.action))
            .flatten();
        let event_type = match mapped {
            Some(t) => t.text(),
            None => Cow::Owned(format!("{}.{}", event.entity, event.action_name())),
        };
        let subject = match &event.subject {
            Some(s) => Cow::Borrowed(s.as_str()),
            None => Cow::Owned(format!("{}/{}", event.entity, event.entity_id)),
        };
        GridEvent {
            id: event.event_id.to_string(),
            topic: self.topic.as_deref(),
            subject,
            event_type,
            event_time: rfc3339_micros(event.commit_time),
            data: CloudEventData::of(event),
            data_version: &self.data_version,
            metadata_version: "1",
        }
    }
}

/// One event of the Event Grid schema.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GridEvent<'a, D> {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    subject: Cow<'a, str>,
    event_type: Cow<'a, str>,
    event_time: String,
    data: D,
    data_version: &'a str,
    metadata_version: &'static str,
}

/// The `data` of a `SubscriptionValidationEvent`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ValidationData<'a> {
    validation_code: &'a str,
    validation_url: &'a str,
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::{Value, json};
    use url::Url;

    use super::*;
    use crate::config::EventType;
    use crate::secret::Secret;
    use crate::types::{Action, Lsn};

    fn webhook() -> EventGridConfig {
        EventGridConfig {
            delivery: EventGridDelivery::Webhook {
                validation_url: Url::parse("http://127.0.0.1:8187/eventgrid/validate").unwrap(),
            },
            topic: None,
            data_version: "1.0".into(),
        }
    }

    fn event() -> StoredEvent {
        StoredEvent {
            event_id: Uuid::parse_str("0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap(),
            commit_lsn: Lsn(0x16_B374_D848),
            seq: 3,
            commit_time: UNIX_EPOCH + Duration::from_micros(1_714_566_896_123_456),
            entity: "Customer".into(),
            entity_id: "42".into(),
            action: Action::Updated,
            derived: None,
            changed_fields: Some(vec!["name".into(), "city".into()]),
            row: json!({"id": 42, "name": "Ada", "city": "London"}),
            old: Some(json!({"id": 42, "name": "Ada", "city": "Paris"})),
            subject: Some("/customers/42".into()),
            source_table: "public.customer".into(),
        }
    }

    fn body(m: &Message) -> Value {
        serde_json::from_slice(&m.body).unwrap()
    }

    #[test]
    fn an_event_is_a_one_element_array_in_the_event_grid_schema() {
        let f = EventGrid::new(&webhook(), &EventTypes::default(), "CRM");
        let m = f.render(&event());
        assert_eq!(m.id, "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
        assert_eq!(m.content_type, EVENTGRID_CONTENT_TYPE);
        assert_eq!(
            m.attributes,
            vec![(Cow::Borrowed("aeg-event-type"), "Notification".to_owned())]
        );
        assert_eq!(
            body(&m),
            json!([{
                "id": "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d",
                "topic": "/walhook/CRM",
                "subject": "/customers/42",
                "eventType": "Customer.Updated",
                "eventTime": "2024-05-01T12:34:56.123456Z",
                "data": {
                    "action": "Updated",
                    "changedFields": ["name", "city"],
                    "entity": "Customer",
                    "entityId": "42",
                    "row": {"id": 42, "name": "Ada", "city": "London"},
                    "old": {"id": 42, "name": "Ada", "city": "Paris"},
                },
                "dataVersion": "1.0",
                "metadataVersion": "1",
            }])
        );
    }

    #[test]
    fn mapped_actions_share_an_event_type_and_subjects_default_to_entity_and_id() {
        let mut types = EventTypes::default();
        types.set(Action::Created, EventType::Name("AssetChanged".into()));
        types.set(Action::Deleted, EventType::Name("AssetChanged".into()));
        types.set(Action::Updated, EventType::Code(7));
        let f = EventGrid::new(&webhook(), &types, "CRM");
        for (action, expected) in [
            (Action::Created, "AssetChanged"),
            (Action::Deleted, "AssetChanged"),
            (Action::Updated, "7"),
            (Action::Truncated, "Customer.Truncated"),
        ] {
            let mut e = event();
            e.action = action;
            e.subject = None;
            let b = body(&f.render(&e));
            assert_eq!(b[0]["eventType"], expected, "{action:?}");
            assert_eq!(b[0]["subject"], "Customer/42");
        }
    }

    #[test]
    fn topic_endpoints_get_no_topic_unless_configured_and_no_aeg_headers() {
        let topic = EventGridConfig {
            delivery: EventGridDelivery::Topic {
                key: Secret::new("k".into()),
            },
            topic: None,
            data_version: "2".into(),
        };
        let f = EventGrid::new(&topic, &EventTypes::default(), "CRM");
        let m = f.render(&event());
        assert!(m.attributes.is_empty());
        let b = body(&m);
        assert!(b[0].get("topic").is_none());
        assert_eq!(b[0]["dataVersion"], "2");
        let configured = EventGridConfig {
            topic: Some("/subscriptions/s/topics/crm".into()),
            ..topic
        };
        let f = EventGrid::new(&configured, &EventTypes::default(), "CRM");
        assert_eq!(
            body(&f.render(&event()))[0]["topic"],
            "/subscriptions/s/topics/crm"
        );
    }

    #[test]
    fn a_batch_is_one_array_in_order() {
        let f = EventGrid::new(&webhook(), &EventTypes::default(), "CRM");
        let a = event();
        let mut b = event();
        b.event_id = Uuid::parse_str("1b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap();
        let m = f.render_batch(&[&a, &b]);
        let arr = body(&m);
        assert_eq!(arr.as_array().unwrap().len(), 2);
        assert_eq!(arr[0]["id"], a.event_id.to_string());
        assert_eq!(arr[1]["id"], b.event_id.to_string());
        assert_eq!(m.id, f.render_batch(&[&a, &b]).id);
    }

    #[test]
    fn the_validation_event_carries_code_and_url() {
        let f = EventGrid::new(&webhook(), &EventTypes::default(), "CRM");
        let m = f.validation(
            "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
            "http://127.0.0.1:8187/eventgrid/validate?listener=grid&code=512d",
            UNIX_EPOCH,
        );
        assert_eq!(
            m.attributes,
            vec![(
                Cow::Borrowed("aeg-event-type"),
                "SubscriptionValidation".to_owned()
            )]
        );
        let b = body(&m);
        assert_eq!(b[0]["eventType"], VALIDATION_EVENT_TYPE);
        assert_eq!(b[0]["id"], m.id);
        assert_eq!(b[0]["subject"], "");
        assert_eq!(b[0]["eventTime"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            b[0]["data"],
            json!({
                "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
                "validationUrl": "http://127.0.0.1:8187/eventgrid/validate?listener=grid&code=512d",
            })
        );
        assert_eq!(b[0]["metadataVersion"], "1");
    }
}

//! CloudEvents 1.0: structured content mode (the event as JSON, the default), binary
//! content mode (attributes as `ce-*` headers, `data` as the body) and batched content
//! mode (a JSON array) for batches.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::Value;

use super::{Message, rfc3339_micros};
use crate::config::CloudEventsMode;
use crate::queue::StoredEvent;

/// The `content-type` of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";
/// The `content-type` of a batch of structured CloudEvents.
pub const CLOUDEVENTS_BATCH_CONTENT_TYPE: &str =
    "application/cloudevents-batch+json; charset=utf-8";
/// The media type of `data`: the `datacontenttype` attribute, and the body's content type
/// in binary mode.
const DATA_CONTENT_TYPE: &str = "application/json";

/// The CloudEvents format of one listener.
#[derive(Clone, Debug)]
pub struct CloudEvents {
    source_system: String,
    mode: CloudEventsMode,
}

impl CloudEvents {
    /// CloudEvents whose `source` names `source_system`, in content mode `mode`.
    pub fn new(source_system: &str, mode: CloudEventsMode) -> CloudEvents {
        CloudEvents {
            source_system: source_system.to_owned(),
            mode,
        }
    }

    /// One event as a message in the listener's content mode.
    pub fn render(&self, event: &StoredEvent) -> Message {
        let ce = CloudEvent::of(event, &self.source_system);
        match self.mode {
            CloudEventsMode::Structured => Message {
                id: ce.id.clone(),
                // Serialized straight from the borrowed event: the row is not copied. An
                // empty body (impossible: string-keyed structs and `Value`s always
                // serialize) would be refused by any listener rather than delivered.
                body: serde_json::to_vec(&ce).unwrap_or_default(),
                content_type: Cow::Borrowed(CLOUDEVENTS_CONTENT_TYPE),
                attributes: Vec::new(),
                topic: None,
            },
            CloudEventsMode::Binary => Message {
                body: serde_json::to_vec(&ce.data).unwrap_or_default(),
                content_type: Cow::Borrowed(DATA_CONTENT_TYPE),
                attributes: ce.binary_attributes(),
                id: ce.id,
                topic: None,
            },
        }
    }

    /// One event inside a batched-mode message (a JSON array of structured CloudEvents;
    /// the spec has no binary batch, so binary-mode listeners get this form too).
    pub fn batch_part(&self, event: &StoredEvent) -> Vec<u8> {
        serde_json::to_vec(&CloudEvent::of(event, &self.source_system)).unwrap_or_default()
    }
}

/// The CloudEvent for `event` as JSON (structured mode).
pub fn cloudevent(event: &StoredEvent, source_system: &str) -> Value {
    // Serializing string-keyed structs and `Value`s cannot fail.
    serde_json::to_value(CloudEvent::of(event, source_system)).unwrap_or_default()
}

/// A CloudEvent borrowing its event. Fields are declared in byte order of their names, the
/// order a `serde_json::Map` writes keys in, so the bytes are those of [`cloudevent`]'s value
/// serialized.
#[derive(Serialize)]
struct CloudEvent<'a> {
    commitlsn: String,
    data: CloudEventData<'a>,
    datacontenttype: &'static str,
    entity: &'a str,
    entityid: &'a str,
    id: String,
    sequence: String,
    source: String,
    specversion: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    time: String,
    #[serde(rename = "type")]
    kind: String,
}

/// The `data` of a [`CloudEvent`] (and of an Event Grid event); fields in byte order of
/// their names, too.
#[derive(Serialize)]
pub(super) struct CloudEventData<'a> {
    action: &'a str,
    /// `null` when unknown.
    #[serde(rename = "changedFields")]
    changed_fields: Option<&'a [String]>,
    entity: &'a str,
    #[serde(rename = "entityId")]
    entity_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a Value>,
    row: &'a Value,
}

impl<'a> CloudEventData<'a> {
    /// What happened to the entity: action, changedFields, row and old row.
    pub(super) fn of(event: &'a StoredEvent) -> CloudEventData<'a> {
        CloudEventData {
            action: event.action_name(),
            changed_fields: event.changed_fields.as_deref(),
            entity: &event.entity,
            entity_id: &event.entity_id,
            old: event.old.as_ref(),
            row: &event.row,
        }
    }
}

impl<'a> CloudEvent<'a> {
    fn of(event: &'a StoredEvent, source_system: &str) -> CloudEvent<'a> {
        CloudEvent {
            commitlsn: event.commit_lsn.to_string(),
            data: CloudEventData::of(event),
            datacontenttype: DATA_CONTENT_TYPE,
            entity: &event.entity,
            entityid: &event.entity_id,
            id: event.event_id.to_string(),
            sequence: sequence(event),
            source: source(source_system, &event.source_table),
            specversion: "1.0",
            subject: event.subject.as_deref(),
            time: rfc3339_micros(event.commit_time),
            kind: format!("{}.{}", event.entity, event.action_name()),
        }
    }

    /// Every attribute but `data` and `datacontenttype` (which is the content type) as
    /// binary-mode `ce-*` headers.
    fn binary_attributes(&self) -> Vec<(Cow<'static, str>, String)> {
        let mut out: Vec<(Cow<'static, str>, String)> = Vec::with_capacity(10);
        let mut add = |name: &'static str, value: &str| {
            out.push((Cow::Borrowed(name), encode_header_value(value)));
        };
        add("ce-specversion", self.specversion);
        add("ce-id", &self.id);
        add("ce-source", &self.source);
        add("ce-type", &self.kind);
        if let Some(subject) = self.subject {
            add("ce-subject", subject);
        }
        add("ce-time", &self.time);
        add("ce-entity", self.entity);
        add("ce-entityid", self.entityid);
        add("ce-commitlsn", &self.commitlsn);
        add("ce-sequence", &self.sequence);
        out
    }
}

/// `/walhook/{system}/{schema.table}`, each segment percent-encoded so the result stays a
/// valid URI-reference whatever the names contain.
fn source(source_system: &str, source_table: &str) -> String {
    format!(
        "/walhook/{}/{}",
        encode_segment(source_system),
        encode_segment(source_table)
    )
}

pub(super) fn encode_segment(s: &str) -> String {
    percent_encode(s, |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// A binary-mode header value: the HTTP binding (3.1.3.2) percent-encodes space, `"`, `%`
/// and every byte outside printable ASCII, so any entity id or subject survives as a
/// valid header value.
fn encode_header_value(s: &str) -> String {
    percent_encode(s, |b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%')
}

/// `s` with every UTF-8 byte that `keep` refuses written as `%XX`.
fn percent_encode(s: &str, keep: impl Fn(u8) -> bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The CloudEvents `sequence` extension is a string compared lexicographically, so the
/// commit LSN and the change's ordinal are zero-padded: events sort in commit order.
fn sequence(event: &StoredEvent) -> String {
    format!("{:016X}-{:010}", event.commit_lsn.0, event.seq.max(0))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::types::{Action, Lsn};

    fn batch(mode: CloudEventsMode, events: &[&StoredEvent]) -> Message {
        crate::delivery::format::Format::CloudEvents(CloudEvents::new("CRM", mode))
            .render_batch(events)
    }

    fn structured(e: &StoredEvent) -> Message {
        CloudEvents::new("CRM", CloudEventsMode::Structured).render(e)
    }

    fn binary(e: &StoredEvent) -> Message {
        CloudEvents::new("CRM", CloudEventsMode::Binary).render(e)
    }

    /// Undoes the binary-mode header encoding (test side, written from the spec).
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
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
            old: Some(json!({"id": 42})),
            subject: Some("/customers/42".into()),
            source_table: "public.customer".into(),
        }
    }

    #[test]
    fn cloudevent_carries_every_required_and_extension_attribute() {
        let ce = cloudevent(&event(), "CRM");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
        assert_eq!(ce["source"], "/walhook/CRM/public.customer");
        assert_eq!(ce["type"], "Customer.Updated");
        assert_eq!(ce["subject"], "/customers/42");
        assert_eq!(ce["time"], "2024-05-01T12:34:56.123456Z");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["entity"], "Customer");
        assert_eq!(ce["entityid"], "42");
        assert_eq!(ce["commitlsn"], "16/B374D848");
        assert_eq!(ce["sequence"], "00000016B374D848-0000000003");
        let data = &ce["data"];
        assert_eq!(data["entity"], "Customer");
        assert_eq!(data["entityId"], "42");
        assert_eq!(data["action"], "Updated");
        assert_eq!(data["changedFields"], json!(["name", "city"]));
        assert_eq!(
            data["row"],
            json!({"id": 42, "name": "Ada", "city": "London"})
        );
        assert_eq!(data["old"], json!({"id": 42}));
    }

    #[test]
    fn extension_attribute_names_are_lower_case_alphanumeric() {
        let ce = cloudevent(&event(), "CRM");
        for name in ce.as_object().unwrap().keys() {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_subject_old_and_changed_fields_are_left_out_or_null() {
        let mut e = event();
        e.action = Action::Created;
        e.subject = None;
        e.old = None;
        e.changed_fields = None;
        let ce = cloudevent(&e, "CRM");
        assert!(ce.get("subject").is_none());
        assert!(ce["data"].get("old").is_none());
        assert_eq!(ce["data"]["changedFields"], Value::Null);
        assert_eq!(ce["type"], "Customer.Created");
    }

    #[test]
    fn source_stays_a_uri_reference_for_odd_names() {
        let mut e = event();
        e.source_table = "my schema.\"Tbl/1\"".into();
        let ce = cloudevent(&e, "CRM prod");
        assert_eq!(
            ce["source"],
            "/walhook/CRM%20prod/my%20schema.%22Tbl%2F1%22"
        );
    }

    #[test]
    fn bytes_round_trip_to_the_same_json() {
        let e = event();
        let bytes = structured(&e).body;
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, cloudevent(&e, "CRM"));
    }

    #[test]
    fn bytes_list_keys_in_the_order_a_json_map_writes_them() {
        for e in [event(), {
            let mut e = event();
            e.subject = None;
            e.old = None;
            e.changed_fields = None;
            e
        }] {
            let sorted = serde_json::to_vec(&cloudevent(&e, "CRM")).unwrap();
            assert_eq!(
                String::from_utf8(structured(&e).body).unwrap(),
                String::from_utf8(sorted).unwrap()
            );
        }
    }

    #[test]
    fn structured_mode_sends_the_event_as_json_with_its_content_type() {
        let e = event();
        let m = structured(&e);
        assert_eq!(m.id, "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
        assert_eq!(m.content_type, CLOUDEVENTS_CONTENT_TYPE);
        assert!(m.attributes.is_empty());
        let back: Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(back, cloudevent(&e, "CRM"));
    }

    #[test]
    fn binary_mode_sends_data_as_the_body_and_every_other_attribute_as_a_ce_header() {
        for e in [event(), {
            let mut e = event();
            e.subject = None;
            e
        }] {
            let ce = cloudevent(&e, "CRM");
            let m = binary(&e);
            assert_eq!(m.id, "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
            assert_eq!(ce["datacontenttype"], m.content_type.as_ref());
            let body: Value = serde_json::from_slice(&m.body).unwrap();
            assert_eq!(body, ce["data"]);
            let headers: serde_json::Map<String, Value> = m
                .attributes
                .iter()
                .map(|(k, v)| {
                    let name = k.strip_prefix("ce-").unwrap().to_owned();
                    (name, Value::String(percent_decode(v)))
                })
                .collect();
            let mut expected = ce.as_object().unwrap().clone();
            expected.remove("data");
            expected.remove("datacontenttype");
            assert_eq!(headers, expected);
        }
    }

    #[test]
    fn binary_mode_header_values_are_percent_encoded_printable_ascii() {
        let mut e = event();
        e.entity_id = "a b\"%é\n".into();
        e.subject = Some("Kunde/Müller".into());
        let m = binary(&e);
        let header = |name: &str| {
            m.attributes
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(header("ce-entityid"), "a%20b%22%25%C3%A9%0A");
        assert_eq!(header("ce-subject"), "Kunde/M%C3%BCller");
        for (name, value) in &m.attributes {
            assert!(
                value
                    .bytes()
                    .all(|b| (0x21..=0x7e).contains(&b) && b != b'"'),
                "{name}: {value}"
            );
            assert_eq!(name.to_ascii_lowercase(), name.as_ref());
        }
        assert_eq!(percent_decode(&header("ce-entityid")), e.entity_id);
    }

    #[test]
    fn a_batch_is_a_json_array_of_structured_events_in_order() {
        let a = event();
        let mut b = event();
        b.event_id = Uuid::parse_str("1b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap();
        b.entity_id = "43".into();
        for mode in [CloudEventsMode::Structured, CloudEventsMode::Binary] {
            let m = batch(mode, &[&a, &b]);
            assert_eq!(m.content_type, CLOUDEVENTS_BATCH_CONTENT_TYPE);
            assert!(m.attributes.is_empty());
            let body: Value = serde_json::from_slice(&m.body).unwrap();
            assert_eq!(
                body,
                Value::Array(vec![cloudevent(&a, "CRM"), cloudevent(&b, "CRM")])
            );
            // The same events keep their batch id; other events or another order do not.
            assert_eq!(m.id, batch(mode, &[&a, &b]).id);
            assert_ne!(m.id, batch(mode, &[&b, &a]).id);
            assert_ne!(m.id, batch(mode, &[&a]).id);
            assert_ne!(m.id, a.event_id.to_string());
        }
    }
}

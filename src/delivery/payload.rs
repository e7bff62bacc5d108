//! Event payloads: CloudEvents 1.0 structured JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::queue::StoredEvent;

/// The `content-type` of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// The CloudEvent for `event` as JSON.
pub fn cloudevent(event: &StoredEvent, source_system: &str) -> Value {
    // Serializing string-keyed structs and `Value`s cannot fail.
    serde_json::to_value(CloudEvent::of(event, source_system)).unwrap_or_default()
}

/// The CloudEvent for `event` serialized once, ready to send and sign.
pub fn cloudevent_bytes(event: &StoredEvent, source_system: &str) -> Vec<u8> {
    // Serialized straight from the borrowed event: the row is not copied. An empty body
    // (impossible, see above) would be refused by any listener rather than delivered.
    serde_json::to_vec(&CloudEvent::of(event, source_system)).unwrap_or_default()
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

/// The `data` of a [`CloudEvent`]; fields in byte order of their names, too.
#[derive(Serialize)]
struct CloudEventData<'a> {
    action: &'static str,
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

impl<'a> CloudEvent<'a> {
    fn of(event: &'a StoredEvent, source_system: &str) -> CloudEvent<'a> {
        CloudEvent {
            commitlsn: event.commit_lsn.to_string(),
            data: CloudEventData {
                action: event.action.as_str(),
                changed_fields: event.changed_fields.as_deref(),
                entity: &event.entity,
                entity_id: &event.entity_id,
                old: event.old.as_ref(),
                row: &event.row,
            },
            datacontenttype: "application/json",
            entity: &event.entity,
            entityid: &event.entity_id,
            id: event.event_id.to_string(),
            sequence: sequence(event),
            source: source(source_system, &event.source_table),
            specversion: "1.0",
            subject: event.subject.as_deref(),
            time: rfc3339_micros(event.commit_time),
            kind: format!("{}.{}", event.entity, event.action.as_str()),
        }
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

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The CloudEvents `sequence` extension is a string compared lexicographically, so the
/// commit LSN and the change's ordinal are zero-padded: events sort in commit order.
fn sequence(event: &StoredEvent) -> String {
    format!("{:016X}-{:010}", event.commit_lsn.0, event.seq.max(0))
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

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::types::{Action, Lsn};

    fn event() -> StoredEvent {
        StoredEvent {
            event_id: Uuid::parse_str("0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap(),
            commit_lsn: Lsn(0x16_B374_D848),
            seq: 3,
            commit_time: UNIX_EPOCH + Duration::from_micros(1_714_566_896_123_456),
            entity: "Customer".into(),
            entity_id: "42".into(),
            action: Action::Updated,
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
        let bytes = cloudevent_bytes(&e, "CRM");
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
                String::from_utf8(cloudevent_bytes(&e, "CRM")).unwrap(),
                String::from_utf8(sorted).unwrap()
            );
        }
    }

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

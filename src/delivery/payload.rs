//! Event payloads: CloudEvents 1.0 structured JSON.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::StoredEvent;

/// The `content-type` of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// The CloudEvent for `event` as JSON.
pub fn cloudevent(event: &StoredEvent, source_system: &str) -> Value {
    let mut data = Map::new();
    data.insert("entity".into(), Value::String(event.entity.clone()));
    data.insert("entityId".into(), Value::String(event.entity_id.clone()));
    data.insert("action".into(), Value::String(event.action.as_str().into()));
    data.insert(
        "changedFields".into(),
        match &event.changed_fields {
            Some(fields) => Value::from(fields.clone()),
            None => Value::Null,
        },
    );
    data.insert("row".into(), event.row.clone());
    if let Some(old) = &event.old {
        data.insert("old".into(), old.clone());
    }

    let mut ce = json!({
        "specversion": "1.0",
        "id": event.event_id.to_string(),
        "source": source(source_system, &event.source_table),
        "type": format!("{}.{}", event.entity, event.action.as_str()),
        "time": rfc3339_micros(event.commit_time),
        "datacontenttype": "application/json",
        "entity": event.entity,
        "entityid": event.entity_id,
        "commitlsn": event.commit_lsn.to_string(),
        "sequence": sequence(event),
    });
    if let (Some(subject), Some(obj)) = (&event.subject, ce.as_object_mut()) {
        obj.insert("subject".into(), Value::String(subject.clone()));
    }
    if let Some(obj) = ce.as_object_mut() {
        obj.insert("data".into(), Value::Object(data));
    }
    ce
}

/// The CloudEvent for `event` serialized once, ready to send and sign.
pub fn cloudevent_bytes(event: &StoredEvent, source_system: &str) -> Vec<u8> {
    // Serializing a `Value` (string keys only) cannot fail; an empty body would be
    // refused by any listener rather than silently delivered.
    serde_json::to_vec(&cloudevent(event, source_system)).unwrap_or_default()
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

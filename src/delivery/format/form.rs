//! `form`: one event as a posted HTML form (`application/x-www-form-urlencoded`), for
//! listeners written to receive form posts. The fields and their names come from the
//! listener's `form_fields`; the row's columns follow under their own names.

use std::borrow::Cow;

use url::form_urlencoded;

use super::{Message, field_value};
use crate::config::FormConfig;
use crate::queue::StoredEvent;

/// The content type of a form post.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// The form format of one listener.
#[derive(Clone, Debug)]
pub struct Form {
    config: FormConfig,
    source_system: String,
}

impl Form {
    /// The form `config` describes; `source_system` names the database.
    pub fn new(config: &FormConfig, source_system: &str) -> Form {
        Form {
            config: config.clone(),
            source_system: source_system.to_owned(),
        }
    }

    /// One event as a form: the configured fields in order, then (with `form_columns`) each
    /// column of the row as text (null as empty, JSON values as JSON text). changedFields is
    /// comma-separated and left out when unknown.
    pub fn render(&self, event: &StoredEvent) -> Message {
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (field, name) in &self.config.fields {
            let value = field_value(field, event, &self.source_system);
            if value == super::FieldValue::List(None) {
                continue;
            }
            form.append_pair(name, &value.text());
        }
        if self.config.columns
            && let Some(row) = event.row.as_object()
        {
            for (column, value) in row {
                form.append_pair(column, &super::FieldValue::Json(value).text());
            }
        }
        Message {
            id: event.event_id.to_string(),
            body: form.finish().into_bytes(),
            content_type: Cow::Borrowed(FORM_CONTENT_TYPE),
            attributes: Vec::new(),
            topic: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::config::Field;
    use crate::types::{Action, Lsn};

    fn event() -> StoredEvent {
        StoredEvent {
            event_id: Uuid::parse_str("0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d").unwrap(),
            commit_lsn: Lsn(0x16_B374_D848),
            seq: 3,
            commit_time: UNIX_EPOCH + Duration::from_micros(1_714_566_896_123_456),
            entity: "Customer".into(),
            entity_id: "42 & \"x\"".into(),
            action: Action::Updated,
            derived: None,
            changed_fields: Some(vec!["name".into(), "city".into()]),
            row: json!({"id": 42, "name": "Ada=Lovelace&co", "city": null, "tags": ["a"], "vip": true}),
            old: None,
            subject: None,
            source_table: "public.customer".into(),
        }
    }

    fn pairs(m: &Message) -> Vec<(String, String)> {
        form_urlencoded::parse(&m.body).into_owned().collect()
    }

    #[test]
    fn default_fields_then_columns_survive_a_form_parser() {
        let m = Form::new(&FormConfig::default(), "CRM").render(&event());
        assert_eq!(m.content_type, FORM_CONTENT_TYPE);
        assert_eq!(m.id, "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d");
        let expected: Vec<(String, String)> = [
            ("entity", "Customer"),
            ("id", "42 & \"x\""),
            ("action", "Updated"),
            ("changedFields", "name,city"),
            ("eventId", "0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d"),
            ("time", "2024-05-01T12:34:56.123456Z"),
            ("city", ""),
            ("id", "42"),
            ("name", "Ada=Lovelace&co"),
            ("tags", "[\"a\"]"),
            ("vip", "true"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(pairs(&m), expected);
        assert!(m.body.iter().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn configured_names_codes_and_no_columns() {
        let config = FormConfig {
            fields: vec![
                (Field::Id, "BaseId".into()),
                (Field::ActionCode, "ChangeType".into()),
                (Field::ChangedFields, "Changed".into()),
            ],
            columns: false,
        };
        let mut e = event();
        e.action = Action::Deleted;
        e.changed_fields = None;
        let m = Form::new(&config, "CRM").render(&e);
        assert_eq!(
            pairs(&m),
            vec![
                ("BaseId".to_owned(), "42 & \"x\"".to_owned()),
                ("ChangeType".to_owned(), "3".to_owned()),
            ],
            "unknown changedFields are left out"
        );
    }
}

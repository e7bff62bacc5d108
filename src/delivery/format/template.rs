//! `template`: the body rendered from the listener's template, for fixed contracts such as
//! `{"ChangeType": {action_code}, "Data": {"BaseId": "{id}"}}`. Values are escaped for the
//! template's content type (see [`crate::config::Escape`]); a batch is the batch template
//! with `{events}` standing for the events, each rendered by the event template.

use std::borrow::Cow;

use super::{FieldValue, Message, batch_id, field_value};
use crate::config::{Escape, Field, Segment, TemplateConfig};
use crate::queue::StoredEvent;

/// The template format of one listener.
#[derive(Clone, Debug)]
pub struct TemplateFormat {
    config: TemplateConfig,
    source_system: String,
}

/// Longest text a batch field other than `{events}` can insert: a batch id (36) or a count.
const BATCH_FIELD_MAX: usize = 36;

impl TemplateFormat {
    /// The format `config` describes; `source_system` names the database.
    pub fn new(config: &TemplateConfig, source_system: &str) -> TemplateFormat {
        TemplateFormat {
            config: config.clone(),
            source_system: source_system.to_owned(),
        }
    }

    /// One event as a message.
    pub fn render(&self, event: &StoredEvent) -> Message {
        Message {
            id: event.event_id.to_string(),
            body: self.batch_part(event),
            content_type: Cow::Owned(self.config.content_type.clone()),
            attributes: Vec::new(),
            topic: None,
        }
    }

    /// One event rendered by the event template.
    pub fn batch_part(&self, event: &StoredEvent) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let template = &self.config.event;
        for segment in &template.segments {
            match segment {
                Segment::Text(t) => out.extend_from_slice(t.as_bytes()),
                Segment::Field { field, in_string } => {
                    let value = field_value(field, event, &self.source_system);
                    insert(&mut out, &value, template.escape, *in_string);
                }
            }
        }
        out
    }

    /// At most how many bytes the batch template adds to `parts` events.
    pub fn batch_overhead(&self, parts: usize) -> usize {
        let separators = self.config.separator().len() * parts.saturating_sub(1);
        let frame: usize = self
            .config
            .batch
            .segments
            .iter()
            .map(|s| match s {
                Segment::Text(t) => t.len(),
                Segment::Field {
                    field: Field::Events,
                    ..
                } => 0,
                // Escaping can at most sextuple a character (JSON \u00XX).
                Segment::Field {
                    field: Field::SourceSystem,
                    ..
                } => 6 * self.source_system.len() + 2,
                Segment::Field { .. } => BATCH_FIELD_MAX + 2,
            })
            .sum();
        frame + separators
    }

    /// The batch message of `events` rendered as `parts`.
    pub fn assemble_batch(&self, events: &[&StoredEvent], parts: &[Vec<u8>]) -> Message {
        let id = batch_id(events);
        let template = &self.config.batch;
        let separator = self.config.separator().as_bytes();
        let mut body = Vec::with_capacity(
            parts.iter().map(Vec::len).sum::<usize>() + self.batch_overhead(parts.len()),
        );
        for segment in &template.segments {
            match segment {
                Segment::Text(t) => body.extend_from_slice(t.as_bytes()),
                Segment::Field { field, in_string } => {
                    let value = match field {
                        Field::Events => {
                            for (i, part) in parts.iter().enumerate() {
                                if i > 0 {
                                    body.extend_from_slice(separator);
                                }
                                body.extend_from_slice(part);
                            }
                            continue;
                        }
                        Field::Count => {
                            FieldValue::Number(i64::try_from(parts.len()).unwrap_or(i64::MAX))
                        }
                        Field::BatchId => FieldValue::Text(Cow::Borrowed(&id)),
                        Field::SourceSystem => FieldValue::Text(Cow::Borrowed(&self.source_system)),
                        _ => FieldValue::Null,
                    };
                    insert(&mut body, &value, template.escape, *in_string);
                }
            }
        }
        Message {
            id,
            body,
            content_type: Cow::Owned(self.config.content_type.clone()),
            attributes: Vec::new(),
            topic: None,
        }
    }
}

/// Appends `value` escaped for where it stands: in JSON a string's content inside a string
/// literal, a JSON value elsewhere; XML entities; form encoding; or the text as it is.
fn insert(out: &mut Vec<u8>, value: &FieldValue<'_>, escape: Escape, in_string: bool) {
    match escape {
        Escape::Json if in_string => {
            let quoted = serde_json::to_vec(value.text().as_ref()).unwrap_or_default();
            // The JSON string without its quotes.
            out.extend_from_slice(quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or(&[]));
        }
        Escape::Json => value.write_json(out),
        Escape::Xml => {
            for c in value.text().chars() {
                match c {
                    '&' => out.extend_from_slice(b"&amp;"),
                    '<' => out.extend_from_slice(b"&lt;"),
                    '>' => out.extend_from_slice(b"&gt;"),
                    '"' => out.extend_from_slice(b"&quot;"),
                    '\'' => out.extend_from_slice(b"&apos;"),
                    c => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
        }
        Escape::Form => {
            for piece in url::form_urlencoded::byte_serialize(value.text().as_bytes()) {
                out.extend_from_slice(piece.as_bytes());
            }
        }
        Escape::Plain => out.extend_from_slice(value.text().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;
    use crate::config::{Template, TemplateKind};
    use crate::delivery::format::Format;
    use crate::types::{Action, Lsn};

    fn event(id: &str) -> StoredEvent {
        StoredEvent {
            event_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, id.as_bytes()),
            commit_lsn: Lsn(0x16_B374_D848),
            seq: 3,
            commit_time: UNIX_EPOCH + Duration::from_micros(1_714_566_896_123_456),
            entity: "Customer".into(),
            entity_id: id.into(),
            action: Action::Created,
            derived: None,
            changed_fields: Some(vec!["id".into(), "name".into()]),
            row: json!({"id": id, "name": "Zoë \"Z\" <z>", "n": 7}),
            old: None,
            subject: Some(format!("Customer/{id}")),
            source_table: "public.customer".into(),
        }
    }

    fn format(template: &str, batch: Option<&str>, content_type: &str) -> Format {
        let escape = Escape::for_content_type(content_type);
        let config = TemplateConfig {
            event: Template::parse(template, escape, TemplateKind::Event).unwrap(),
            batch: Template::parse(batch.unwrap_or("[{events}]"), escape, TemplateKind::Batch)
                .unwrap(),
            content_type: content_type.into(),
        };
        Format::Template(TemplateFormat::new(&config, "CRM"))
    }

    const CHANGE_TYPE: &str = r#"{"ChangeType": {action_code}, "Data": {"BaseId": "{id}"}}"#;

    #[test]
    fn the_change_type_contract_stays_valid_json_for_any_id() {
        let f = format(CHANGE_TYPE, None, "application/json");
        for id in [
            "42",
            "a\"b",
            "back\\slash",
            "line\nbreak",
            "ünï}{code",
            "\u{1}",
        ] {
            let m = f.render(&event(id));
            assert_eq!(m.content_type, "application/json");
            let v: Value = serde_json::from_slice(&m.body)
                .unwrap_or_else(|e| panic!("{id:?}: {e}: {}", String::from_utf8_lossy(&m.body)));
            assert_eq!(v, json!({"ChangeType": 1, "Data": {"BaseId": id}}));
        }
    }

    #[test]
    fn values_outside_strings_are_json_values_and_inside_are_text() {
        let f = format(
            r#"{"row": {row}, "old": {old}, "n": {row.n}, "nText": "{row.n}", "changed": {changed_fields}, "changedText": "{changed_fields}", "missing": {row.nope}, "subject": {subject}, "when": "{time}", "action": "{action}"}"#,
            None,
            "application/json",
        );
        let e = event("42");
        let v: Value = serde_json::from_slice(&f.render(&e).body).unwrap();
        assert_eq!(v["row"], e.row);
        assert_eq!(v["old"], Value::Null);
        assert_eq!(v["n"], 7);
        assert_eq!(v["nText"], "7");
        assert_eq!(v["changed"], json!(["id", "name"]));
        assert_eq!(v["changedText"], "id,name");
        assert_eq!(v["missing"], Value::Null);
        assert_eq!(v["subject"], "Customer/42");
        assert_eq!(v["when"], "2024-05-01T12:34:56.123456Z");
        assert_eq!(v["action"], "Created");
    }

    #[test]
    fn xml_form_and_plain_templates_escape_for_their_type() {
        let e = event("4<2");
        let xml = format(
            "<Change id=\"{id}\">{row.name}</Change>",
            None,
            "application/xml",
        );
        assert_eq!(
            String::from_utf8(xml.render(&e).body).unwrap(),
            "<Change id=\"4&lt;2\">Zoë &quot;Z&quot; &lt;z&gt;</Change>"
        );
        let form = format(
            "id={id}&name={row.name}",
            None,
            "application/x-www-form-urlencoded",
        );
        let body = form.render(&e).body;
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        assert_eq!(
            pairs,
            vec![
                ("id".to_owned(), "4<2".to_owned()),
                ("name".to_owned(), "Zoë \"Z\" <z>".to_owned())
            ]
        );
        let plain = format("{entity} {id} {action_code}", None, "text/plain");
        assert_eq!(plain.render(&e).body, b"Customer 4<2 1");
    }

    #[test]
    fn a_batch_renders_each_event_inside_the_batch_template_within_its_overhead() {
        let f = format(
            CHANGE_TYPE,
            Some(
                r#"{"Count": {count}, "Batch": "{batch_id}", "From": "{source_system}", "Changes": [{events}]}"#,
            ),
            "application/json",
        );
        let (a, b) = (event("1"), event("2\"x"));
        let parts = [f.batch_part(&a), f.batch_part(&b)];
        let m = f.assemble_batch(&[&a, &b], &parts);
        let v: Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(v["Count"], 2);
        assert_eq!(v["Batch"], m.id);
        assert_eq!(v["From"], "CRM");
        assert_eq!(
            v["Changes"],
            json!([
                {"ChangeType": 1, "Data": {"BaseId": "1"}},
                {"ChangeType": 1, "Data": {"BaseId": "2\"x"}}
            ])
        );
        let parts_len: usize = parts.iter().map(Vec::len).sum();
        assert!(m.body.len() <= parts_len + f.batch_overhead(2));
        assert_eq!(m, f.render_batch(&[&a, &b]));
        // A non-JSON batch puts one event per line.
        let lines = format("{id}", Some("{events}"), "text/plain");
        assert_eq!(lines.render_batch(&[&a, &b]).body, b"1\n2\"x");
    }

    #[test]
    fn cloudevents_batches_stay_within_their_overhead_too() {
        let f = Format::CloudEvents(crate::delivery::format::CloudEvents::new(
            "CRM",
            crate::config::CloudEventsMode::Structured,
        ));
        let events: Vec<StoredEvent> = (0..3).map(|i| event(&i.to_string())).collect();
        let refs: Vec<&StoredEvent> = events.iter().collect();
        let parts: Vec<Vec<u8>> = refs.iter().map(|e| f.batch_part(e)).collect();
        let m = f.assemble_batch(&refs, &parts);
        let parts_len: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(m.body.len(), parts_len + f.batch_overhead(3));
    }
}

//! The template language of `format = "template"`: text with `{placeholder}`s, parsed and
//! checked when the configuration is loaded. The template format renders it per event.
//!
//! A placeholder is `{name}` or `{row.COLUMN}` / `{old.COLUMN}`; any other `{` is text, so
//! JSON braces need no escaping. `{{` writes a literal `{`. In a JSON template a
//! placeholder inside a string literal inserts the value's text, escaped for the string;
//! anywhere else it inserts a JSON value, so every rendered body is valid JSON.

use serde_spanned::Spanned;

use super::check::Checker;
use super::position::{line_column_offset, string_value_offset};

/// How a template's inserted values are escaped, chosen by its content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    /// `application/json`, `*+json`: JSON strings inside string literals, JSON values outside.
    Json,
    /// `application/xml`, `text/xml`, `*+xml`: `&`, `<`, `>`, `"` and `'` as entities.
    Xml,
    /// `application/x-www-form-urlencoded`: percent-encoded, space as `+`.
    Form,
    /// Anything else: the value's text as it is.
    Plain,
}

impl Escape {
    /// The escaping a content type calls for.
    pub fn for_content_type(content_type: &str) -> Escape {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json" || essence.ends_with("+json") {
            Escape::Json
        } else if essence == "application/xml" || essence == "text/xml" || essence.ends_with("+xml")
        {
            Escape::Xml
        } else if essence == "application/x-www-form-urlencoded" {
            Escape::Form
        } else {
            Escape::Plain
        }
    }
}

/// What a placeholder stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// `{id}`: the entity id.
    Id,
    /// `{entity}`: the entity type.
    Entity,
    /// `{action}`: the action's name (`Created`, …).
    Action,
    /// `{action_code}`: the action's number (1 created, 2 updated, 3 deleted, 4 truncated).
    ActionCode,
    /// `{event_id}`: the stable event id.
    EventId,
    /// `{time}`: the commit time, RFC 3339 in UTC.
    Time,
    /// `{changed_fields}`: a JSON array, or comma-separated text inside a string.
    ChangedFields,
    /// `{subject}`: the entity's subject, null when it has none.
    Subject,
    /// `{source_system}`: `[source] system_name`, else the database name.
    SourceSystem,
    /// `{source_table}`: `schema.table`.
    SourceTable,
    /// `{commit_lsn}`: the source commit's LSN, like `16/B374D848`.
    CommitLsn,
    /// `{row}`: the row as a JSON object.
    Row,
    /// `{old}`: the old row as a JSON object, null when unknown.
    Old,
    /// `{row.COLUMN}`: one column of the row.
    RowColumn(String),
    /// `{old.COLUMN}`: one column of the old row.
    OldColumn(String),
    /// `{events}` (batch templates): the events, each rendered by the event template.
    Events,
    /// `{count}` (batch templates): how many events the batch carries.
    Count,
    /// `{batch_id}` (batch templates): an id derived from the batch's event ids.
    BatchId,
}

/// The placeholders of an event template, for messages.
const EVENT_FIELDS: [(&str, Field); 13] = [
    ("id", Field::Id),
    ("entity", Field::Entity),
    ("action", Field::Action),
    ("action_code", Field::ActionCode),
    ("event_id", Field::EventId),
    ("time", Field::Time),
    ("changed_fields", Field::ChangedFields),
    ("subject", Field::Subject),
    ("source_system", Field::SourceSystem),
    ("source_table", Field::SourceTable),
    ("commit_lsn", Field::CommitLsn),
    ("row", Field::Row),
    ("old", Field::Old),
];

/// The placeholders of a batch template.
const BATCH_FIELDS: [(&str, Field); 4] = [
    ("events", Field::Events),
    ("count", Field::Count),
    ("batch_id", Field::BatchId),
    ("source_system", Field::SourceSystem),
];

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Text written as it is.
    Text(String),
    /// A placeholder. `in_string`: inside a JSON string literal of the template, so the
    /// value's text goes in escaped for the string (JSON templates only).
    Field {
        /// What it stands for.
        field: Field,
        /// Inside a JSON string literal.
        in_string: bool,
    },
}

/// Which placeholders a template may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// One event: event fields and columns.
    Event,
    /// A batch: `{events}` (exactly once), `{count}`, `{batch_id}`, `{source_system}`.
    Batch,
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// The pieces in order.
    pub segments: Vec<Segment>,
    /// How inserted values are escaped.
    pub escape: Escape,
}

/// A problem in a template, at a byte offset of the template's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateProblem {
    /// Byte offset in the template.
    pub at: usize,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl Template {
    /// Parses `text`; every problem is returned, each with its offset.
    pub fn parse(
        text: &str,
        escape: Escape,
        kind: TemplateKind,
    ) -> Result<Template, Vec<TemplateProblem>> {
        let mut segments = Vec::new();
        let mut problems = Vec::new();
        let mut literal = String::new();
        let mut in_string = false;
        let mut escaped = false;
        let mut events = 0usize;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            if rest.starts_with("{{") {
                literal.push('{');
                i += 2;
                continue;
            }
            if let Some(len) = placeholder_len(rest) {
                let name = &rest[1..len - 1];
                match field(name, kind) {
                    Some(field) => {
                        if field == Field::Events {
                            events += 1;
                            if events > 1 {
                                problems.push(TemplateProblem {
                                    at: i,
                                    problem: "{events} appears more than once".into(),
                                    fix: "write {events} once; it stands for every event of the batch".into(),
                                });
                            }
                            if escape == Escape::Json && in_string {
                                problems.push(TemplateProblem {
                                    at: i,
                                    problem: "{events} is inside a JSON string".into(),
                                    fix: "put {events} inside a JSON array, like [{events}]".into(),
                                });
                            }
                        }
                        if !literal.is_empty() {
                            segments.push(Segment::Text(std::mem::take(&mut literal)));
                        }
                        segments.push(Segment::Field {
                            field,
                            in_string: escape == Escape::Json && in_string,
                        });
                    }
                    None => problems.push(unknown(name, i, kind)),
                }
                i += len;
                continue;
            }
            let c = rest.chars().next().unwrap_or('\0');
            if escape == Escape::Json {
                if escaped {
                    escaped = false;
                } else if in_string && c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = !in_string;
                }
            }
            literal.push(c);
            i += c.len_utf8();
        }
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        if kind == TemplateKind::Batch && events == 0 {
            problems.push(TemplateProblem {
                at: 0,
                problem: "the batch template has no {events}".into(),
                fix: "write {events} where the events go, like [{events}]".into(),
            });
        }
        let template = Template { segments, escape };
        if problems.is_empty() && escape == Escape::Json {
            template.check_json(text, kind)?;
        }
        if problems.is_empty() {
            Ok(template)
        } else {
            Err(problems)
        }
    }

    /// Whether the template uses `field`.
    pub fn uses(&self, field: &Field) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Field { field: f, .. } if f == field))
    }

    /// Renders the template with a stand-in for every placeholder (a value outside strings,
    /// two for `{events}`) and parses the result as JSON: a template that passes renders
    /// valid JSON for every event, since inserted values are JSON values or escaped text.
    fn check_json(&self, text: &str, kind: TemplateKind) -> Result<(), Vec<TemplateProblem>> {
        // (offset in the check text, offset in the template) at each segment's start.
        let mut map: Vec<(usize, usize)> = Vec::new();
        let mut check = String::new();
        let mut at = 0usize;
        for segment in &self.segments {
            map.push((check.len(), at));
            match segment {
                Segment::Text(t) => {
                    check.push_str(t);
                    at += original_len(text, at, t);
                }
                Segment::Field { field, in_string } => {
                    check.push_str(match (field, in_string) {
                        (_, true) => "x",
                        (Field::Events, false) => "0,0",
                        _ => "0",
                    });
                    at += placeholder_len(&text[at.min(text.len())..]).unwrap_or(0);
                }
            }
        }
        let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&check) else {
            return Ok(());
        };
        let offset = line_column_offset(&check, e.line(), e.column().saturating_sub(1));
        let (seg_check, seg_template) = map
            .iter()
            .rev()
            .find(|(c, _)| *c <= offset)
            .copied()
            .unwrap_or((0, 0));
        let at = (seg_template + (offset - seg_check)).min(text.len());
        let what = match kind {
            TemplateKind::Event => "the template",
            TemplateKind::Batch => "the batch template",
        };
        let message = e.to_string();
        let problem = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        let fix = if kind == TemplateKind::Batch {
            "keep {events} inside a JSON array, like [{events}], and check the JSON around it"
        } else {
            "fix the JSON here (placeholders outside quotes stand for JSON values, inside quotes for text), or set content_type to a non-JSON type"
        };
        Err(vec![TemplateProblem {
            at,
            problem: format!("{what} does not make valid JSON: {problem}"),
            fix: fix.into(),
        }])
    }
}

/// The length in the template of text segment `t` that starts at `at`: `{{` in the template
/// became `{` in the segment.
fn original_len(template: &str, at: usize, t: &str) -> usize {
    let mut len = 0;
    let mut rest = template.get(at..).unwrap_or("");
    for c in t.chars() {
        if c == '{' && rest.starts_with("{{") {
            len += 2;
            rest = &rest[2..];
        } else {
            len += c.len_utf8();
            rest = rest.get(c.len_utf8()..).unwrap_or("");
        }
    }
    len
}

/// The length of the placeholder at the start of `s` (`{name}`, `{row.Column Name}`), or
/// `None` when `s` does not start with one.
fn placeholder_len(s: &str) -> Option<usize> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '{' {
        return None;
    }
    let (_, first) = chars.next()?;
    if !(first.is_ascii_alphabetic() || first == '_') {
        return None;
    }
    let mut dotted = false;
    for (i, c) in chars {
        match c {
            '}' => return Some(i + 1),
            '.' if !dotted => dotted = true,
            c if dotted && !matches!(c, '{' | '"' | '\\' | '\n' | '\r') => {}
            c if c.is_ascii_alphanumeric() || c == '_' => {}
            _ => return None,
        }
    }
    None
}

fn field(name: &str, kind: TemplateKind) -> Option<Field> {
    let fields: &[(&str, Field)] = match kind {
        TemplateKind::Event => &EVENT_FIELDS,
        TemplateKind::Batch => &BATCH_FIELDS,
    };
    if let Some((_, f)) = fields.iter().find(|(n, _)| *n == name) {
        return Some(f.clone());
    }
    if kind == TemplateKind::Event {
        if let Some(column) = name.strip_prefix("row.").filter(|c| !c.is_empty()) {
            return Some(Field::RowColumn(column.to_owned()));
        }
        if let Some(column) = name.strip_prefix("old.").filter(|c| !c.is_empty()) {
            return Some(Field::OldColumn(column.to_owned()));
        }
    }
    None
}

fn unknown(name: &str, at: usize, kind: TemplateKind) -> TemplateProblem {
    let (known, more) = match kind {
        TemplateKind::Event => (
            EVENT_FIELDS
                .iter()
                .map(|(n, _)| format!("{{{n}}}"))
                .collect::<Vec<_>>()
                .join(", "),
            ", {row.COLUMN} or {old.COLUMN}",
        ),
        TemplateKind::Batch => (
            BATCH_FIELDS
                .iter()
                .map(|(n, _)| format!("{{{n}}}"))
                .collect::<Vec<_>>()
                .join(", "),
            "",
        ),
    };
    let hint = if kind == TemplateKind::Event && EVENT_FIELDS.iter().all(|(n, _)| *n != name) {
        let column = name.split('.').next_back().unwrap_or(name);
        if name.contains('.') {
            String::new()
        } else {
            format!(" (a column is written {{row.{column}}})")
        }
    } else {
        String::new()
    };
    TemplateProblem {
        at,
        problem: format!("unknown placeholder {{{name}}}{hint}"),
        fix: format!("use one of {known}{more}; write {{{{ for a literal {{"),
    }
}

/// `format = "template"`: the body's templates and content type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateConfig {
    /// `template`: one event's body.
    pub event: Template,
    /// `batch_template`: a batch's body (batch_size above 1), `{events}` standing for the
    /// events rendered by `event`, separated by [`TemplateConfig::separator`]. Default
    /// `[{events}]` for JSON, `{events}` otherwise.
    pub batch: Template,
    /// `content_type` (default `application/json`); it chooses the escaping.
    pub content_type: String,
}

impl TemplateConfig {
    /// What separates the events of a batch: a comma in JSON, a line break otherwise.
    pub fn separator(&self) -> &'static str {
        match self.event.escape {
            Escape::Json => ",",
            _ => "\n",
        }
    }
}

/// The content type of a template unless `content_type` says otherwise.
pub const DEFAULT_TEMPLATE_CONTENT_TYPE: &str = "application/json";

impl Checker<'_> {
    /// `template`, `batch_template` and `content_type` of a template listener.
    pub(super) fn template_format(
        &mut self,
        template: &super::Str,
        batch_template: &super::Str,
        content_type: &super::Str,
        section_at: usize,
        section: &str,
    ) -> Option<TemplateConfig> {
        let key = |k: &str| format!("{section}.{k}");
        let content_type = match content_type {
            None => Some(DEFAULT_TEMPLATE_CONTENT_TYPE.to_owned()),
            Some(v) => self.content_type(v, &key("content_type")),
        };
        // With an unusable content type the templates are still checked, as JSON.
        let escape = Escape::for_content_type(
            content_type
                .as_deref()
                .unwrap_or(DEFAULT_TEMPLATE_CONTENT_TYPE),
        );
        let Some(raw) = template else {
            self.report(
                section_at,
                &key("template"),
                "missing key",
                "add template = '{\"ChangeType\": {action_code}, \"Data\": {\"BaseId\": \"{id}\"}}' (placeholders are listed in config.example.toml)",
            );
            if let Some(raw) = batch_template {
                self.template(raw, &key("batch_template"), escape, TemplateKind::Batch);
            }
            return None;
        };
        let event = self.template(raw, &key("template"), escape, TemplateKind::Event);
        let batch = match batch_template {
            Some(raw) => self.template(raw, &key("batch_template"), escape, TemplateKind::Batch),
            None => Some(Template {
                segments: match escape {
                    Escape::Json => vec![
                        Segment::Text("[".into()),
                        Segment::Field {
                            field: Field::Events,
                            in_string: false,
                        },
                        Segment::Text("]".into()),
                    ],
                    _ => vec![Segment::Field {
                        field: Field::Events,
                        in_string: false,
                    }],
                },
                escape,
            }),
        };
        Some(TemplateConfig {
            event: event?,
            batch: batch?,
            content_type: content_type?,
        })
    }

    /// A media type that fits in a header.
    fn content_type(&mut self, v: &Spanned<String>, key: &str) -> Option<String> {
        let s = self.string(v, key)?;
        let s = s.trim().to_owned();
        let visible = s
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b));
        if !visible || !s.contains('/') {
            self.report(
                v.span().start,
                key,
                &format!("{s:?} is not a media type"),
                "write a media type like \"application/json\" or \"application/xml; charset=utf-8\"",
            );
            return None;
        }
        Some(s)
    }

    /// A template from the string `value` (after `${ENV}`), each problem reported at its
    /// line and column in the file.
    pub(super) fn template(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        escape: Escape,
        kind: TemplateKind,
    ) -> Option<Template> {
        let text = self.string(value, key)?;
        match Template::parse(&text, escape, kind) {
            Ok(t) => Some(t),
            Err(problems) => {
                for p in problems {
                    // Positions inside the value map back to the file only when `${ENV}`
                    // changed nothing; otherwise the string's start is named.
                    let at = if text == *value.get_ref() {
                        string_value_offset(self.text, value.span().start, p.at)
                    } else {
                        value.span().start
                    };
                    self.report(at, key, &p.problem, &p.fix);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Template, Vec<TemplateProblem>> {
        Template::parse(text, Escape::Json, TemplateKind::Event)
    }

    #[test]
    fn json_braces_are_text_and_placeholders_know_whether_they_sit_in_a_string() {
        let t = parse(r#"{"ChangeType": {action_code}, "Data": {"BaseId": "{id}"}}"#).unwrap();
        assert_eq!(
            t.segments,
            vec![
                Segment::Text(r#"{"ChangeType": "#.into()),
                Segment::Field {
                    field: Field::ActionCode,
                    in_string: false
                },
                Segment::Text(r#", "Data": {"BaseId": ""#.into()),
                Segment::Field {
                    field: Field::Id,
                    in_string: true
                },
                Segment::Text(r#""}}"#.into()),
            ]
        );
    }

    #[test]
    fn escaped_quotes_keep_the_string_open_and_double_braces_are_literal() {
        let t = parse(r#"{"a": "say \"{id}\"", "b": "{{x}", "c": {row.First Name}}"#).unwrap();
        assert!(t.segments.contains(&Segment::Field {
            field: Field::Id,
            in_string: true
        }));
        assert!(t.segments.contains(&Segment::Field {
            field: Field::RowColumn("First Name".into()),
            in_string: false
        }));
        assert!(
            t.segments
                .iter()
                .any(|s| matches!(s, Segment::Text(x) if x.contains(r#""b": "{x}""#)))
        );
    }

    #[test]
    fn unknown_placeholders_are_named_with_their_offset() {
        let e = parse(r#"{"a": "{idd}", "b": {Id}}"#).unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].at, 7);
        assert_eq!(
            e[0].problem,
            "unknown placeholder {idd} (a column is written {row.idd})"
        );
        assert!(e[0].fix.starts_with("use one of {id}, {entity}, {action}"));
        assert_eq!(e[1].at, 20);
    }

    #[test]
    fn invalid_json_is_reported_where_it_goes_wrong() {
        let text = r#"{"a": {id} "b": 1}"#;
        let e = parse(text).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].problem
                .starts_with("the template does not make valid JSON"),
            "{e:?}"
        );
        assert_eq!(&text[e[0].at..e[0].at + 3], "\"b\"", "{e:?}");
        // Values in strings stay inside them; values outside are JSON values.
        assert!(parse(r#"{"a": "{row}", "b": {row}, "c": [{changed_fields}]}"#).is_ok());
        // Non-JSON templates are not parsed as JSON.
        assert!(Template::parse("id={id}&x={", Escape::Form, TemplateKind::Event).is_ok());
    }

    #[test]
    fn batch_templates_need_events_once_in_an_array() {
        let batch = |t| Template::parse(t, Escape::Json, TemplateKind::Batch);
        assert!(batch(r#"{"count": {count}, "events": [{events}]}"#).is_ok());
        assert!(batch("[{events}]").is_ok());
        let e = batch(r#"{"events": {events}}"#).unwrap_err();
        assert!(e[0].fix.contains("[{events}]"), "{e:?}");
        let e = batch(r#"{"events": []}"#).unwrap_err();
        assert_eq!(e[0].problem, "the batch template has no {events}");
        let e = batch("[{events}, {events}]").unwrap_err();
        assert_eq!(e[0].problem, "{events} appears more than once");
        let e = batch("[{events}, {id}]").unwrap_err();
        assert!(
            e[0].problem.starts_with("unknown placeholder {id}"),
            "{e:?}"
        );
        // {events} belongs to batch templates only.
        assert!(parse("[{events}]").is_err());
    }

    #[test]
    fn escaping_follows_the_content_type() {
        assert_eq!(Escape::for_content_type("application/json"), Escape::Json);
        assert_eq!(
            Escape::for_content_type("Application/Vnd.Api+JSON; charset=utf-8"),
            Escape::Json
        );
        assert_eq!(Escape::for_content_type("text/xml"), Escape::Xml);
        assert_eq!(
            Escape::for_content_type("application/soap+xml"),
            Escape::Xml
        );
        assert_eq!(
            Escape::for_content_type("application/x-www-form-urlencoded"),
            Escape::Form
        );
        assert_eq!(Escape::for_content_type("text/plain"), Escape::Plain);
    }

    #[test]
    fn placeholders_are_recognised_only_in_their_exact_form() {
        assert_eq!(placeholder_len("{id}"), Some(4));
        assert_eq!(placeholder_len("{row.A b}x"), Some(9));
        assert_eq!(placeholder_len("{ id}"), None);
        assert_eq!(placeholder_len("{\"id\"}"), None);
        assert_eq!(placeholder_len("{id"), None);
        assert_eq!(placeholder_len("{1}"), None);
        assert_eq!(placeholder_len("{a.b.c}"), Some(7));
    }
}

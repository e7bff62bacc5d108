//! `format = "form"`: which fields a posted `application/x-www-form-urlencoded` body
//! carries (`form_fields`, `form_columns`).

use std::collections::BTreeMap;

use serde_spanned::Spanned;

use super::check::Checker;
use super::position::display_key;
use super::template::Field;

/// `form_fields = { … }` as written: field key → form name.
pub(super) type RawFormFields = Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>;

/// What a form post carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormConfig {
    /// Event fields in order, each with the form name it is sent under.
    pub fields: Vec<(Field, String)>,
    /// Whether every column of the row follows, under its column name.
    pub columns: bool,
}

/// The fields a form may carry, by their key in `form_fields`.
const FORM_FIELDS: [(&str, Field); 11] = [
    ("entity", Field::Entity),
    ("id", Field::Id),
    ("action", Field::Action),
    ("action_code", Field::ActionCode),
    ("changed_fields", Field::ChangedFields),
    ("event_id", Field::EventId),
    ("time", Field::Time),
    ("subject", Field::Subject),
    ("source_system", Field::SourceSystem),
    ("source_table", Field::SourceTable),
    ("commit_lsn", Field::CommitLsn),
];

/// The fields a form carries unless `form_fields` says otherwise, with their names.
const DEFAULT_FORM_FIELDS: [(Field, &str); 6] = [
    (Field::Entity, "entity"),
    (Field::Id, "id"),
    (Field::Action, "action"),
    (Field::ChangedFields, "changedFields"),
    (Field::EventId, "eventId"),
    (Field::Time, "time"),
];

impl Default for FormConfig {
    fn default() -> FormConfig {
        FormConfig {
            fields: DEFAULT_FORM_FIELDS
                .iter()
                .map(|(f, n)| (f.clone(), (*n).to_owned()))
                .collect(),
            columns: true,
        }
    }
}

impl Checker<'_> {
    /// `form_fields` renames default fields (an empty name leaves one out) and adds others
    /// after them, in file order; `form_columns` (default true) appends the row's columns.
    pub(super) fn form(
        &mut self,
        fields: &RawFormFields,
        columns: Option<&Spanned<bool>>,
        section: &str,
    ) -> FormConfig {
        let mut form = FormConfig::default();
        if let Some(c) = columns {
            form.columns = *c.get_ref();
        }
        let Some(map) = fields else {
            return form;
        };
        let mut entries: Vec<(&Spanned<String>, &Spanned<String>)> = map.get_ref().iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let mut dropped = Vec::new();
        for (k, v) in entries {
            let key = format!("{section}.form_fields.{}", display_key(k.get_ref()));
            let Some((_, field)) = FORM_FIELDS.iter().find(|(n, _)| n == k.get_ref()) else {
                let known: Vec<&str> = FORM_FIELDS.iter().map(|(n, _)| *n).collect();
                self.report(
                    k.span().start,
                    &key,
                    &format!("unknown form field {:?}", k.get_ref()),
                    &format!(
                        "use one of {} (columns of the row are sent with form_columns = true)",
                        known.join(", ")
                    ),
                );
                continue;
            };
            let Some(name) = self.string(v, &key) else {
                continue;
            };
            match form.fields.iter_mut().find(|(f, _)| f == field) {
                Some(_) if name.is_empty() => dropped.push(field.clone()),
                Some(entry) => entry.1 = name,
                None if name.is_empty() => {}
                None => form.fields.push((field.clone(), name)),
            }
        }
        form.fields.retain(|(f, _)| !dropped.contains(f));
        if form.fields.is_empty() && !form.columns {
            self.report(
                map.span().start,
                &format!("{section}.form_fields"),
                "the form would carry no field at all",
                "name at least one field, or set form_columns = true",
            );
        }
        form
    }
}

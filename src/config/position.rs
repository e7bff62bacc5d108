//! Positions in the file and the errors serde and the TOML parser report, as one line each.

use serde_spanned::Spanned;

// ---------------------------------------------------------------------------------------
// Positions and the errors serde reports.

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// A TOML syntax error as one line.
pub(super) fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> String {
    let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
    format!(
        "{file}:{line}:{column}: invalid TOML: {}; fix the syntax at this position",
        e.message()
    )
}

/// An unknown key or a wrong type, as one line with the key path found from the span.
pub(super) fn serde_error(
    text: &str,
    file: &str,
    tree: &Spanned<toml::de::DeTable<'_>>,
    e: &toml::de::Error,
) -> String {
    let at = e.span().map_or(0, |s| s.start);
    let (line, column) = line_column(text, at);
    let path = key_path_at(tree.get_ref(), at).unwrap_or_default();
    let key = if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path.clone()
    };
    let message = e.message();
    let last = path.rsplit('.').next().unwrap_or("");
    let problem = if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest
            .split_once(", ")
            .map_or("", |(_, e)| e)
            .replace('`', "");
        if expected.is_empty() {
            "unknown key; remove it".to_owned()
        } else {
            format!("unknown key; {expected}")
        }
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest
            .split_once(", expected ")
            .unwrap_or((rest, "another type"));
        let found = if is_secret_path(&path) {
            found.split(' ').next().unwrap_or(found).to_owned()
        } else {
            found.replace('`', "")
        };
        let fix = if matches!(
            last.split('[').next(),
            Some("entity" | "listener" | "monitor")
        ) && expected.contains("sequence")
        {
            format!(
                "write [[{}]] with double brackets",
                last.split('[').next().unwrap_or(last)
            )
        } else if expected == "a string" {
            "write the value in double quotes".to_owned()
        } else {
            format!("write {expected}")
        };
        format!("wrong type: found {found}, expected {expected}; {fix}")
    } else if is_secret_path(&path) {
        "invalid value; check this key's value".to_owned()
    } else {
        format!("{message}; check this key's value")
    };
    format!("{file}:{line}:{column}: {key}: {problem}")
}

/// Keys whose values are secrets and so never echoed in messages.
pub(super) fn is_secret_path(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or("");
    matches!(
        last,
        "password" | "url" | "secret" | "smtp_url" | "smtp_password"
    ) || path.contains(".headers")
}

/// The dotted key path (`entity[1].colour`) of the innermost key or value at `at`.
pub(super) fn key_path_at(table: &toml::de::DeTable<'_>, at: usize) -> Option<String> {
    fn in_table(table: &toml::de::DeTable<'_>, at: usize) -> Option<String> {
        for (key, value) in table {
            let name = display_key(key.get_ref());
            if key.span().contains(&at) {
                return Some(name);
            }
            if let Some(rest) = in_value(value.get_ref(), at) {
                return Some(format!("{name}{rest}"));
            }
            if value.span().contains(&at) {
                return Some(name);
            }
        }
        None
    }
    fn in_value(value: &toml::de::DeValue<'_>, at: usize) -> Option<String> {
        match value {
            toml::de::DeValue::Table(table) => in_table(table, at).map(|p| format!(".{p}")),
            toml::de::DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(rest) = in_value(item.get_ref(), at) {
                        return Some(format!("[{i}]{rest}"));
                    }
                    if item.span().contains(&at) {
                        return Some(format!("[{i}]"));
                    }
                }
                None
            }
            _ => None,
        }
    }
    in_table(table, at)
}

/// A key as written in a path: bare when it can be, quoted otherwise.
pub(super) fn display_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

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
        "password"
            | "url"
            | "secret"
            | "smtp_url"
            | "smtp_password"
            | "token"
            | "nkey_seed"
            | "client_secret"
            | "bearer"
            | "sas_key"
            | "aeg_sas_key"
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

/// The byte offset of `line` (1-based) and byte `column` (0-based) in `text`, clamped to it.
pub(super) fn line_column_offset(text: &str, line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(nl) => start += nl + 1,
            None => return text.len(),
        }
    }
    (start + column).min(text.len())
}

/// The file offset of byte `index` of the value of the TOML string whose opening quote is
/// at `start` (basic or literal, single- or multi-line; escapes followed). Anything it
/// cannot follow falls back to `start`, the string itself.
pub(super) fn string_value_offset(text: &str, start: usize, index: usize) -> usize {
    let Some(raw) = text.get(start..) else {
        return start;
    };
    let (delimiter, literal) = if raw.starts_with("\"\"\"") {
        ("\"\"\"", false)
    } else if raw.starts_with("'''") {
        ("'''", true)
    } else if raw.starts_with('"') {
        ("\"", false)
    } else if raw.starts_with('\'') {
        ("'", true)
    } else {
        return start;
    };
    let multi_line = delimiter.len() == 3;
    let mut pos = start + delimiter.len();
    if multi_line {
        // A newline right after the opening delimiter is not part of the value.
        let rest = &text[pos..];
        if rest.starts_with("\r\n") {
            pos += 2;
        } else if rest.starts_with('\n') {
            pos += 1;
        }
    }
    let mut decoded = 0usize;
    loop {
        let Some(rest) = text.get(pos..) else {
            return start;
        };
        // A value offset at a line-ending backslash belongs to the text after it.
        let line_ending = !literal
            && multi_line
            && rest
                .strip_prefix('\\')
                .and_then(|r| r.chars().next())
                .is_some_and(char::is_whitespace);
        if decoded >= index && !line_ending {
            break;
        }
        if rest.starts_with(delimiter) {
            return start;
        }
        let Some(c) = rest.chars().next() else {
            return start;
        };
        if literal || c != '\\' {
            decoded += c.len_utf8();
            pos += c.len_utf8();
            continue;
        }
        let hex = |digits: usize| -> Option<char> {
            let h = rest.get(2..2 + digits)?;
            char::from_u32(u32::from_str_radix(h, 16).ok()?)
        };
        match rest[1..].chars().next() {
            Some('b' | 't' | 'n' | 'f' | 'r' | '"' | '\\' | 'e') => {
                decoded += 1;
                pos += 2;
            }
            Some(kind @ ('u' | 'U' | 'x')) => {
                let digits = match kind {
                    'u' => 4,
                    'U' => 8,
                    _ => 2,
                };
                let Some(ch) = hex(digits) else {
                    return start;
                };
                decoded += ch.len_utf8();
                pos += 2 + digits;
            }
            Some(w) if multi_line && w.is_whitespace() => {
                // A line-ending backslash: the newline and the whitespace after it vanish.
                pos += 1;
                while let Some(w) = text[pos..].chars().next().filter(|w| w.is_whitespace()) {
                    pos += w.len_utf8();
                }
            }
            _ => return start,
        }
    }
    if decoded == index { pos } else { start }
}

#[cfg(test)]
mod string_offset_tests {
    use super::*;

    /// Parses `key = <value>` and checks that each byte of the value maps to the file byte
    /// that produced it.
    fn check(value_toml: &str, probes: &[(usize, &str)]) {
        let text = format!("key = {value_toml}\n");
        let table: toml::Table = toml::from_str(&text).unwrap();
        let value = table["key"].as_str().unwrap().to_owned();
        for (index, expected) in probes {
            let at = string_value_offset(&text, 6, *index);
            assert!(
                text[at..].starts_with(expected),
                "{value_toml}: index {index} of {value:?} maps to {:?}",
                &text[at..]
            );
        }
    }

    #[test]
    fn offsets_inside_strings_follow_quotes_and_escapes() {
        check(r#""abc {x}""#, &[(4, "{x}")]);
        check(r#"'{"a": {x}}'"#, &[(6, "{x}")]);
        check(r#""\"q\" \u00e9 {x}""#, &[(7, "{x}")]);
        check("'''\n{\"a\": {x}}'''", &[(6, "{x}")]);
        check("\"\"\"\nab \\\n   {x}\"\"\"", &[(3, "{x}")]);
    }

    #[test]
    fn line_and_column_become_an_offset() {
        assert_eq!(line_column_offset("ab\ncd", 2, 1), 4);
        assert_eq!(line_column_offset("ab", 5, 1), 2);
    }
}

//! `where` of an `[[entity]]`: an SQL expression that becomes the publication's row filter
//! (`ALTER PUBLICATION … ADD TABLE t WHERE (…)`, PostgreSQL 15+), so rows it excludes never
//! leave the server.
//!
//! The server judges the expression (`walhook check` asks it); here it is only made sure
//! that the text stays one expression inside `WHERE (…)`: parentheses balanced, quotes
//! closed, no `;` and no comments, which could end the statement or hide its closing
//! parenthesis.

/// The identifiers `expr` names outside literals (unquoted ones folded to lower case, as
/// PostgreSQL does), or why it cannot be a row filter.
pub fn expression_identifiers(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut depth: i64 = 0;
    let mut i = 0;
    let unclosed = |what: &str| format!("where {expr:?} has an unclosed {what}; close it");
    while let Some(&c) = chars.get(i) {
        match c {
            '\'' => {
                // E'…' strings allow backslash escapes.
                let escapes = out.last().is_some_and(|l: &String| l == "e")
                    && i > 0
                    && chars
                        .get(i - 1)
                        .is_some_and(|p| p.eq_ignore_ascii_case(&'e'));
                if escapes {
                    out.pop();
                }
                i = skip_quoted(&chars, i, '\'', escapes).ok_or_else(|| unclosed("string"))?;
            }
            '"' => {
                let end = skip_quoted(&chars, i, '"', false)
                    .ok_or_else(|| unclosed("quoted identifier"))?;
                let inner: String = chars
                    .get(i + 1..end - 1)
                    .unwrap_or_default()
                    .iter()
                    .collect();
                out.push(inner.replace("\"\"", "\""));
                i = end;
            }
            '$' => i = skip_dollar(&chars, i).ok_or_else(|| unclosed("$$ string"))?,
            ';' => {
                return Err(format!(
                    "where {expr:?} contains ';'; write one expression, like \"status <> 'draft'\""
                ));
            }
            '-' if chars.get(i + 1) == Some(&'-') => return Err(comment(expr)),
            '/' if chars.get(i + 1) == Some(&'*') => return Err(comment(expr)),
            '(' => {
                depth += 1;
                i += 1;
            }
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "where {expr:?} closes a parenthesis it never opened; balance the parentheses"
                    ));
                }
                i += 1;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                {
                    i += 1;
                }
                let word: String = chars.get(start..i).unwrap_or_default().iter().collect();
                out.push(word.to_lowercase());
            }
            c if c.is_ascii_digit() => {
                // A number, with any letters glued to it (1e5): not an identifier.
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '.' || *c == '_')
                {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if depth != 0 {
        return Err(unclosed("parenthesis"));
    }
    if out.is_empty() && expr.trim().is_empty() {
        return Err(
            "where is empty; write an SQL expression like \"status <> 'draft'\", or remove where"
                .to_owned(),
        );
    }
    Ok(out)
}

fn comment(expr: &str) -> String {
    format!("where {expr:?} contains an SQL comment; remove it")
}

/// The index after the closing `quote` of the literal starting at `start`; a doubled quote
/// is part of the literal.
fn skip_quoted(chars: &[char], start: usize, quote: char, backslash: bool) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let c = *chars.get(i)?;
        if backslash && c == '\\' {
            i += 2;
        } else if c == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
}

/// The index after a `$tag$…$tag$` string starting at `start`, or after a lone `$` (a
/// parameter like `$1`, which the server will refuse in a row filter).
fn skip_dollar(chars: &[char], start: usize) -> Option<usize> {
    let mut j = start + 1;
    while chars
        .get(j)
        .is_some_and(|c| c.is_alphanumeric() || *c == '_')
    {
        j += 1;
    }
    if chars.get(j) != Some(&'$') {
        return Some(start + 1);
    }
    let tag: Vec<char> = chars.get(start..=j)?.to_vec();
    let mut i = j + 1;
    while i + tag.len() <= chars.len() {
        if chars.get(i..i + tag.len()) == Some(tag.as_slice()) {
            return Some(i + tag.len());
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_outside_literals_are_found_and_folded() {
        assert_eq!(
            expression_identifiers(
                "Status <> 'draft''s' AND \"Region\" IN ('a;b', $$x;--$$) AND n > 1e3"
            )
            .unwrap(),
            ["status", "and", "Region", "in", "and", "n"]
        );
        assert_eq!(
            expression_identifiers("note = E'it\\'s' OR (x)").unwrap(),
            ["note", "or", "x"]
        );
    }

    #[test]
    fn text_that_could_escape_the_where_clause_is_refused() {
        for bad in [
            "",
            "a = 1; DROP TABLE t",
            "a = 1) OR (true",
            "(a = 1",
            "a = 'open",
            "a = 1 -- no",
            "a /* x */ = 1",
            "\"open = 1",
            "a = $$open",
        ] {
            assert!(expression_identifiers(bad).is_err(), "{bad}");
        }
    }
}

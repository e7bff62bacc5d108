//! libpq connection string syntax: the URL and `key=value` forms, and password files.
//!
//! Pure text parsing: strings in, key/value pairs out; what the keys mean is decided in
//! [`super::conninfo`].

use std::path::Path;

use super::conninfo::ConnError;

fn percent_decode(s: &str, what: &str) -> Result<String, ConnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ConnError::InvalidUrl(format!("bad percent-encoding in the {what}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        ConnError::InvalidUrl(format!("the {what} is not UTF-8 after percent-decoding"))
    })
}

/// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?key=value&…]`.
pub(crate) fn parse_url(url: &str) -> Result<Vec<(String, String)>, ConnError> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let mut out = Vec::new();
    // The last '@' separates user info, so an unencoded '@' in a password still works.
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_owned(), percent_decode(user, "user name")?));
            }
            if let Some(p) = password {
                out.push(("password".to_owned(), percent_decode(p, "password")?));
            }
            hostport
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| ConnError::InvalidUrl("missing ']' after an IPv6 address".into()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| ConnError::InvalidUrl("expected ':port' after ']'".into()))?,
            ),
        };
        (h.to_owned(), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (percent_decode(h, "host")?, Some(p)),
            None => (percent_decode(hostport, "host")?, None),
        }
    };
    if !host.is_empty() {
        out.push(("host".to_owned(), host));
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        out.push(("port".to_owned(), percent_decode(p, "port")?));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_owned(), percent_decode(db, "database name")?));
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ConnError::InvalidUrl(format!("query parameter {pair:?} has no '=value'"))
        })?;
        out.push((
            percent_decode(k, "query parameter")?,
            percent_decode(v, "query parameter")?,
        ));
    }
    Ok(out)
}

/// Parses `key=value key='quoted \' value'`, libpq's other connection string form.
pub(crate) fn parse_key_value(s: &str) -> Result<Vec<(String, String)>, ConnError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnError::InvalidKeyValue(format!(
                "missing \"=\" after \"{key}\""
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            let unterminated =
                || ConnError::InvalidKeyValue(format!("unterminated quoted value for \"{key}\""));
            loop {
                match chars.next().ok_or_else(unterminated)? {
                    '\'' => break,
                    '\\' => value.push(chars.next().ok_or_else(unterminated)?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// One field of a password file line: its unescaped text, or the `*` wildcard.
#[derive(Debug, PartialEq, Eq)]
enum PassField {
    Any,
    Text(String),
}

impl PassField {
    fn matches(&self, value: &str) -> bool {
        match self {
            PassField::Any => true,
            PassField::Text(t) => t == value,
        }
    }
}

/// Splits a password file line into fields at unescaped ':' (`\:` and `\\` are escapes).
fn split_pgpass_line(line: &str) -> Vec<PassField> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    let finish = |cur: &mut String, escaped_any: &mut bool, fields: &mut Vec<PassField>| {
        let text = std::mem::take(cur);
        fields.push(if text == "*" && !*escaped_any {
            PassField::Any
        } else {
            PassField::Text(text)
        });
        *escaped_any = false;
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                escaped_any = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => finish(&mut cur, &mut escaped_any, &mut fields),
            c => cur.push(c),
        }
    }
    finish(&mut cur, &mut escaped_any, &mut fields);
    fields
}

/// Finds the password for a connection in password file text (libpq's `.pgpass` format).
fn pgpass_find(text: &str, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass_line(line);
            let [h, p, d, u, pw, ..] = fields.as_slice() else {
                return None;
            };
            let hit = h.matches(host) && p.matches(&port) && d.matches(dbname) && u.matches(user);
            hit.then(|| match pw {
                PassField::Any => "*".to_owned(),
                PassField::Text(t) => t.clone(),
            })
        })
}

/// Looks a password up in a password file, ignoring a file others can read as libpq does.
pub(crate) fn pgpass_lookup(
    path: &Path,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(file = %path.display(), "password file is not a plain file; ignoring it");
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "password file has group or world access and is ignored; run: chmod 0600 {}",
            path.display()
        );
        return None;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read password file");
            return None;
        }
    };
    pgpass_find(&text, host, port, dbname, user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_matches_wildcards_and_unescapes() {
        let text = "# comment\n\
                    other:5432:*:u:nope\n\
                    h:*:db:u:first\n\
                    *:*:*:u:second\n\
                    *:*:*:*:pa\\:ss\\\\word\n\
                    w\\:x:5432:*:*:escaped-host\n\
                    short:line\n";
        assert_eq!(
            pgpass_find(text, "h", 1, "db", "u").as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_find(text, "h", 1, "db2", "u").as_deref(),
            Some("second")
        );
        assert_eq!(
            pgpass_find(text, "x", 1, "d", "v").as_deref(),
            Some(r"pa:ss\word")
        );
        assert_eq!(
            pgpass_find("w\\:x:5432:*:*:esc\n", "w:x", 5432, "d", "v").as_deref(),
            Some("esc")
        );
        assert_eq!(
            pgpass_find("\\*:*:*:*:literal\n", "anyhost", 1, "d", "u"),
            None
        );
        assert_eq!(pgpass_find("short:line\n", "short", 1, "d", "u"), None);
        assert_eq!(
            pgpass_find("h:5432:db:u:crlf\r\n", "h", 5432, "db", "u").as_deref(),
            Some("crlf")
        );
    }
}

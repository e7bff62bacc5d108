//! Secrets: values that are never printed, and URLs shown without their credentials.

/// A string that must never be printed (passwords, signing secrets).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    /// The secret itself; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Replaces the password in a connection string or URL with `***`: the `user:pass@` part
/// of a URL, secret-looking query parameters (`password=`, `token=`, …), and the `password`
/// key of a libpq `key=value` string.
pub fn redact_url(url: &str) -> String {
    match url.find("://") {
        Some(scheme_end) => {
            let (scheme, rest) = url.split_at(scheme_end + 3);
            // The last '@' ends the user info even when an unencoded password contains '@'
            // or '/': over-redacting is safe, printing a password is not.
            let (userinfo, rest) = match rest.rfind('@') {
                Some(at) => {
                    let (userinfo, host) = rest.split_at(at);
                    let userinfo = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => userinfo.to_owned(),
                    };
                    (userinfo, host)
                }
                None => (String::new(), rest),
            };
            let rest = match rest.split_once('?') {
                Some((before, query)) => {
                    let (query, fragment) = match query.split_once('#') {
                        Some((q, f)) => (q, Some(f)),
                        None => (query, None),
                    };
                    let query: Vec<String> = query
                        .split('&')
                        .map(|pair| match pair.split_once('=') {
                            Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
                            _ => pair.to_owned(),
                        })
                        .collect();
                    let mut out = format!("{before}?{}", query.join("&"));
                    if let Some(fragment) = fragment {
                        out.push('#');
                        out.push_str(fragment);
                    }
                    out
                }
                None => rest.to_owned(),
            };
            format!("{scheme}{userinfo}{rest}")
        }
        None => redact_key_values(url),
    }
}

/// Query or connection keys whose values are treated as secrets.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "token", "secret", "key", "sig", "code", "auth"]
        .iter()
        .any(|word| key.contains(word))
}

/// Redacts `password=…` in a libpq `key=value` connection string, quoted or not.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        out.push_str(&key);
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        out.push('=');
        chars.next();
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            value.push('\'');
            chars.next();
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else if c == '\'' {
                    break;
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        if key.eq_ignore_ascii_case("password") {
            out.push_str("***");
        } else {
            out.push_str(&value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_connection_strings_are_redacted() {
        assert_eq!(
            redact_url("host=db password=s3cret user=w"),
            "host=db password=*** user=w"
        );
        assert_eq!(
            redact_url("host=db password = 'a \\' b' dbname=x"),
            "host=db password = *** dbname=x"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u:p@ss/w@h/db"),
            "postgres://u:***@h/db"
        );
    }
}

//! Secrets: values that are never printed, URLs shown without their credentials, signing
//! keys, and secrets read from `*_file` paths (systemd credentials).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use url::Url;

/// What walhook prints in place of a secret.
pub const REDACTED: &str = "***";

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

/// Reads a secret from a file (a `*_file` key): the whole content, without one trailing
/// newline. The message names the file, never its content.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value = content
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&content);
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(value.to_owned()))
}

/// An http(s) URL that may carry credentials in its user info or query string. Only its
/// redacted form is ever displayed: user info, every query value and the fragment become
/// `***` (a token in `?token=…` or a password in `user:pass@` never reaches a log line, a
/// queue table or an alert).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl {
    url: Url,
    redacted: String,
}

impl SecretUrl {
    /// Wraps a parsed URL.
    pub fn new(url: Url) -> SecretUrl {
        let redacted = redact_parsed(&url);
        SecretUrl { url, redacted }
    }

    /// The URL itself; use only to send a request, never in a message.
    pub fn expose(&self) -> &Url {
        &self.url
    }

    /// The URL with its secrets replaced by `***`, for messages, logs and tables.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The secret parts as they may come back in text a server reflects (an error page that
    /// echoes the request): the whole URL, user name and password (as written, decoded, and
    /// as the Basic credentials sent for them), query values and fragment. Parts shorter
    /// than 4 bytes are left out: they would scrub ordinary words and reveal nothing.
    pub fn secret_parts(&self) -> Vec<String> {
        let url = &self.url;
        let mut parts = vec![url.as_str().to_owned()];
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = url.username();
        let password = url.password().unwrap_or("");
        if !user.is_empty() || !password.is_empty() {
            let credentials = format!("{}:{}", decode(user), decode(password));
            parts.extend([
                user.to_owned(),
                decode(user),
                password.to_owned(),
                decode(password),
                STANDARD.encode(credentials),
            ]);
        }
        if let Some(query) = url.query() {
            for pair in query.split('&') {
                let value = pair.split_once('=').map_or(pair, |(_, v)| v);
                parts.push(value.to_owned());
            }
            parts.extend(url.query_pairs().map(|(_, v)| v.into_owned()));
        }
        if let Some(fragment) = url.fragment() {
            parts.push(fragment.to_owned());
        }
        parts.retain(|p| p.len() >= 4);
        // Longest first, so a part that contains another is replaced whole.
        parts.sort_by_key(|p| std::cmp::Reverse(p.len()));
        parts.dedup();
        parts
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretUrl({})", self.redacted)
    }
}

impl std::fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `url` with user info, query values and fragment replaced by `***`.
fn redact_parsed(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        // Cannot fail: the URL has user info, so it has a host.
        let _ = shown.set_password(None);
        let _ = shown.set_username(REDACTED);
    }
    if let Some(query) = url.query() {
        let pairs: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) => format!("{key}={REDACTED}"),
                None => REDACTED.to_owned(),
            })
            .collect();
        shown.set_query(Some(&pairs.join("&")));
    }
    if shown.fragment().is_some() {
        shown.set_fragment(Some(REDACTED));
    }
    shown.to_string()
}

/// The prefix Standard Webhooks puts in front of the base64 key.
const SIGNING_SECRET_PREFIX: &str = "whsec_";
/// Standard Webhooks keys are 24 to 64 random bytes; anything shorter is guessable.
pub const MIN_SIGNING_KEY_BYTES: usize = 24;

/// A decoded Standard Webhooks signing key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// Why a signing secret could not be used. Never carries the secret itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningKeyError {
    /// The part after `whsec_` (or the whole value) is not base64.
    #[error(
        "the signing secret is not base64 (optionally prefixed with whsec_); use a secret like whsec_ followed by base64 of 24 to 64 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    NotBase64,
    /// The secret decodes to no bytes at all.
    #[error(
        "the signing secret is empty; set it to whsec_ followed by base64 of 24 to 64 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    Empty,
    /// The secret decodes to fewer than `MIN_SIGNING_KEY_BYTES` bytes.
    #[error(
        "the signing secret is only {0} bytes long, fewer than the 24 Standard Webhooks requires; generate a new one with `openssl rand -base64 32` and prefix it with whsec_"
    )]
    TooShort(usize),
}

impl SigningKey {
    /// Parses `whsec_<base64>` or plain base64 of at least 24 bytes.
    pub fn parse(secret: &str) -> Result<SigningKey, SigningKeyError> {
        let encoded = secret.trim();
        let encoded = encoded
            .strip_prefix(SIGNING_SECRET_PREFIX)
            .unwrap_or(encoded);
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|_| SigningKeyError::NotBase64)?;
        match bytes.len() {
            0 => Err(SigningKeyError::Empty),
            n if n < MIN_SIGNING_KEY_BYTES => Err(SigningKeyError::TooShort(n)),
            _ => Ok(SigningKey(bytes)),
        }
    }

    /// A key from raw bytes (tests, generated keys).
    pub fn from_bytes(bytes: Vec<u8>) -> SigningKey {
        SigningKey(bytes)
    }

    /// The key bytes; use only to sign.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_show_no_user_info_query_value_or_fragment() {
        let shown = |s: &str| SecretUrl::new(Url::parse(s).unwrap()).redacted().to_owned();
        assert_eq!(
            shown("https://bob:pa55@example.com:8443/h?token=abc&tenant=north#frag"),
            "https://***@example.com:8443/h?token=***&tenant=***#***"
        );
        assert_eq!(
            shown("https://tok3n@example.com/h?bare"),
            "https://***@example.com/h?***"
        );
        assert_eq!(shown("http://127.0.0.1:9/x"), "http://127.0.0.1:9/x");
        let url = SecretUrl::new(Url::parse("https://u:p%40ss@h/x?token=t%2Fk").unwrap());
        assert!(!format!("{url:?} {url}").contains("p%40ss"));
    }

    #[test]
    fn secret_parts_cover_every_reflected_form() {
        let url =
            SecretUrl::new(Url::parse("https://user:pa%40ssword@h/x?token=t0k%2Fen&a=1").unwrap());
        let parts = url.secret_parts();
        for part in ["pa%40ssword", "pa@ssword", "t0k%2Fen", "t0k/en", "user"] {
            assert!(
                parts.iter().any(|p| p == part),
                "{part} missing from {parts:?}"
            );
        }
        assert!(parts.contains(&STANDARD.encode("user:pa@ssword")));
        assert!(
            !parts.iter().any(|p| p == "1"),
            "short values are not scrubbed"
        );
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "pa ss\r\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "pa ss");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_secret_file(&path).unwrap_err().ends_with("is empty"));
        let missing = read_secret_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.starts_with("cannot read "), "{missing}");
    }

    #[test]
    fn signing_secrets_must_be_base64_of_at_least_24_bytes() {
        assert!(SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        );
        let err = SigningKey::parse("whsec_not*base64!").unwrap_err();
        assert_eq!(err, SigningKeyError::NotBase64);
        assert!(!err.to_string().contains("not*base64!"));
        assert_eq!(
            SigningKey::parse("whsec_").unwrap_err(),
            SigningKeyError::Empty
        );
        // 23 bytes: one short.
        let short = STANDARD.encode([7u8; 23]);
        assert_eq!(
            SigningKey::parse(&short).unwrap_err(),
            SigningKeyError::TooShort(23)
        );
        assert!(!format!("{:?}", SigningKey::from_bytes(b"hunter2".to_vec())).contains("hunter2"));
    }

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

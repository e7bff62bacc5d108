//! What listeners and monitor webhooks share: the http(s) URL, extra headers and the
//! Standard Webhooks signing secret, each parsed into the type that sends it.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use serde_spanned::Spanned;
use url::Url;

use super::Str;
use super::check::Checker;
use super::position::display_key;
use crate::secret::{SecretUrl, SigningKey};

/// `headers = { … }` or `header_files = { … }` as written.
pub(super) type RawHeaders = Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>;

/// Headers walhook sets itself; a configured value would be overwritten or break delivery.
const RESERVED_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

impl Checker<'_> {
    /// A required http(s) URL with a host and a usable port; `None` (reported) otherwise.
    /// Messages never repeat the URL: it may carry credentials.
    pub(super) fn http_url(
        &mut self,
        value: &Str,
        key: &str,
        section_at: usize,
        example: &str,
    ) -> Option<SecretUrl> {
        let text = self.required(value, key, section_at, example)?;
        let problem = match parse_http_url(&text) {
            Ok(url) => return Some(SecretUrl::new(url)),
            Err(problem) => problem,
        };
        let at = value.as_ref().map_or(section_at, |v| v.span().start);
        self.report(
            at,
            key,
            &problem,
            &format!("write an http:// or https:// URL like {example}"),
        );
        None
    }

    /// The headers of `headers` (values inline) and `header_files` (values read from files),
    /// in file order. `section` is the section's key, like `listener[0]`.
    pub(super) fn headers(
        &mut self,
        inline: &RawHeaders,
        files: &RawHeaders,
        section: &str,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut entries: Vec<(&Spanned<String>, &Spanned<String>, bool)> = Vec::new();
        for (map, from_file) in [(inline, false), (files, true)] {
            if let Some(map) = map {
                entries.extend(map.get_ref().iter().map(|(n, v)| (n, v, from_file)));
            }
        }
        entries.sort_by_key(|(name, ..)| name.span().start);
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
        for (name, value, from_file) in entries {
            let map = if from_file { "header_files" } else { "headers" };
            let key = format!("{section}.{map}.{}", display_key(name.get_ref()));
            let Some(header) = self.header_name(name, &key, &headers) else {
                continue;
            };
            let text = if from_file {
                self.secret_file(value, &key).map(|s| s.expose().to_owned())
            } else {
                self.string(value, &key)
            };
            let Some(text) = text else { continue };
            // `HeaderValue` itself lets bytes above 127 through (obs-text), which many
            // receivers reject or decode differently: only visible ASCII, space and tab.
            let visible = text
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
            match HeaderValue::from_str(&text)
                .ok()
                .filter(|_| visible)
                .ok_or(())
            {
                Ok(mut v) => {
                    // Keeps the value out of the HTTP client's debug output and logs.
                    v.set_sensitive(true);
                    headers.push((header, v));
                }
                Err(_) => {
                    let (problem, fix) = header_value_problem(&text);
                    self.report(value.span().start, &key, problem, fix);
                }
            }
        }
        headers
    }

    /// A checked header name; `None` (reported) when invalid, reserved or a duplicate.
    fn header_name(
        &mut self,
        name: &Spanned<String>,
        key: &str,
        seen: &[(HeaderName, HeaderValue)],
    ) -> Option<HeaderName> {
        let n = name.get_ref();
        let at = name.span().start;
        let parsed = HeaderName::from_bytes(n.as_bytes()).ok();
        let Some(header) = parsed
            .filter(|_| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        else {
            self.report(
                at,
                key,
                &format!("invalid header name {n:?}"),
                "use only letters, digits and dashes, like \"X-Api-Key\"",
            );
            return None;
        };
        if RESERVED_HEADERS.contains(&header.as_str()) {
            self.report(
                at,
                key,
                &format!("header {n:?} is set by walhook"),
                "remove it",
            );
            return None;
        }
        if seen.iter().any(|(h, _)| *h == header) {
            self.report(
                at,
                key,
                &format!("header {n:?} is listed twice (header names ignore case)"),
                "keep one of them",
            );
            return None;
        }
        Some(header)
    }

    /// A Standard Webhooks signing key from `secret` or `secret_file`, decoded now so that
    /// a bad one is a configuration error, not a delivery failure. `key` is `….secret`.
    pub(super) fn signing_key(
        &mut self,
        inline: &Str,
        file: &Str,
        key: &str,
    ) -> Option<SigningKey> {
        let secret = self.secret(inline, file, key)?;
        match SigningKey::parse(secret.expose()) {
            Ok(k) => Some(k),
            Err(e) => {
                let (at, key) = match (inline, file) {
                    (Some(v), _) => (v.span().start, key.to_owned()),
                    (None, Some(f)) => (f.span().start, format!("{key}_file")),
                    (None, None) => (0, key.to_owned()),
                };
                self.report_message(at, &key, &e.to_string());
                None
            }
        }
    }
}

/// Parses an absolute http(s) URL with a host and a port from 1 to 65535. The message
/// names the problem without repeating the URL.
fn parse_http_url(text: &str) -> Result<Url, String> {
    // The url crate silently drops tabs and newlines inside a URL; refuse them instead.
    if text.trim().chars().any(char::is_whitespace) {
        return Err("the URL contains whitespace".to_owned());
    }
    let url = match Url::parse(text.trim()) {
        Ok(url) => url,
        Err(url::ParseError::InvalidPort) => {
            return Err("the URL's port is not a number from 1 to 65535".to_owned());
        }
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Err("the URL must start with http:// or https://".to_owned());
        }
        Err(e) => return Err(format!("the URL is not valid ({e})")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the URL must start with http:// or https://".to_owned());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    if url.port() == Some(0) {
        return Err("the URL's port is not a number from 1 to 65535".to_owned());
    }
    Ok(url)
}

/// Why `text` cannot be an HTTP header value, and the fix; never repeats the value.
fn header_value_problem(text: &str) -> (&'static str, &'static str) {
    if text.contains(['\r', '\n']) {
        (
            "header value contains a line break",
            "remove the line break from the value",
        )
    } else if !text.is_ascii() {
        (
            "header value contains a non-ASCII character, which HTTP header values cannot carry",
            "encode the value as the receiver expects (percent-encoding or base64), or remove the character",
        )
    } else {
        (
            "header value contains a control character",
            "remove the control character from the value",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_are_parsed_or_refused_with_the_reason() {
        assert_eq!(
            parse_http_url("https://u:p@example.com:8443/h?x=1")
                .unwrap()
                .port(),
            Some(8443)
        );
        for (bad, reason) in [
            (
                "http://127.0.0.1:99999/x",
                "port is not a number from 1 to 65535",
            ),
            (
                "http://127.0.0.1:0/x",
                "port is not a number from 1 to 65535",
            ),
            ("ftp://example.com/x", "must start with http:// or https://"),
            ("example.com/x", "must start with http:// or https://"),
            ("https://exa mple.com/", "contains whitespace"),
            ("https://a\tb.example.com/", "contains whitespace"),
            ("http://", "not valid (empty host)"),
            ("http://[::1/", "not valid"),
        ] {
            let e = parse_http_url(bad).unwrap_err();
            assert!(e.contains(reason), "{bad}: {e}");
        }
    }

    #[test]
    fn header_value_problems_name_the_kind_of_character() {
        assert!(header_value_problem("a\nb").0.contains("line break"));
        assert!(header_value_problem("café").0.contains("non-ASCII"));
        assert!(
            header_value_problem("a\u{1}b")
                .0
                .contains("control character")
        );
    }
}

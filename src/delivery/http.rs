//! Sends one notification to one listener over HTTP and classifies the answer.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{Client, Url, redirect};

use super::Attempt;
use super::payload::{CLOUDEVENTS_CONTENT_TYPE, cloudevent_bytes};
use super::policy::{Outcome, parse_retry_after};
use super::signature::{SigningKey, SigningKeyError, webhook_headers};
use crate::config::ListenerConfig;
use crate::error::{Classify, ErrorClass};
use crate::queue::Notification;

/// Most of an answer's body that is read; the rest is dropped unread.
const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// Most of an answer's body quoted in a comment.
const COMMENT_BODY_BYTES: usize = 200;
/// Most of a `Location` header quoted in a comment.
const COMMENT_LOCATION_BYTES: usize = 300;
/// Idle pooled connections are closed after this; listeners often close at 60–120s.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Keeps pooled connections through NAT and firewalls between bursts.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// Shown for configured values that must never reach a comment.
const REDACTED: &str = "***";

/// Why a listener's sender could not be built. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The url does not parse or is not http(s).
    #[error(
        "listener {listener:?}: url {url} is not usable ({reason}); set url to an http:// or https:// URL"
    )]
    InvalidUrl {
        /// Listener name.
        listener: String,
        /// The redacted url.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The signing secret cannot be decoded.
    #[error("listener {listener:?}: {source}")]
    InvalidSecret {
        /// Listener name.
        listener: String,
        /// The decoding problem.
        source: SigningKeyError,
    },
    /// A configured header name or value cannot be sent.
    #[error(
        "listener {listener:?}: header {name:?} cannot be sent (invalid name or value); use letters, digits and dashes in the name and visible ASCII in the value"
    )]
    InvalidHeader {
        /// Listener name.
        listener: String,
        /// The header name.
        name: String,
    },
    /// The HTTP client could not be created (TLS setup).
    #[error("listener {listener:?}: cannot create the HTTP client: {reason}")]
    Client {
        /// Listener name.
        listener: String,
        /// The client's error text.
        reason: String,
    },
}

impl Classify for DeliveryError {
    fn class(&self) -> ErrorClass {
        match self {
            DeliveryError::InvalidUrl { .. }
            | DeliveryError::InvalidSecret { .. }
            | DeliveryError::InvalidHeader { .. } => ErrorClass::Config,
            DeliveryError::Client { .. } => ErrorClass::Permanent,
        }
    }
}

/// The HTTP sender for one listener; build once, share by reference, send many times.
pub struct HttpSender {
    listener: String,
    client: Client,
    url: Url,
    url_redacted: String,
    /// `content-type` and the configured headers, built once.
    headers: HeaderMap,
    key: Option<SigningKey>,
    timeout: Duration,
    source_system: String,
    /// Configured secret strings that must be scrubbed from any quoted answer text.
    scrub: Vec<String>,
}

/// Shows only what may be logged: the url with secrets redacted, never headers or keys.
impl std::fmt::Debug for HttpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSender")
            .field("listener", &self.listener)
            .field("url", &self.url_redacted)
            .field("signed", &self.key.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpSender {
    /// Validates the listener's url, headers and secret and builds its HTTP client.
    pub fn new(
        listener: &ListenerConfig,
        source_system: &str,
    ) -> Result<HttpSender, DeliveryError> {
        let name = listener.name.clone();
        let invalid_url = |reason: String| DeliveryError::InvalidUrl {
            listener: name.clone(),
            url: listener.url_redacted.clone(),
            reason,
        };
        let url = Url::parse(listener.url.expose()).map_err(|e| invalid_url(e.to_string()))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(invalid_url(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        if url.host_str().is_none() {
            return Err(invalid_url("no host".into()));
        }

        let key = match &listener.secret {
            Some(s) => Some(SigningKey::parse(s.expose()).map_err(|source| {
                DeliveryError::InvalidSecret {
                    listener: name.clone(),
                    source,
                }
            })?),
            None => None,
        };

        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(CLOUDEVENTS_CONTENT_TYPE),
        );
        let mut scrub = Vec::new();
        for (h, value) in &listener.headers {
            let invalid = || DeliveryError::InvalidHeader {
                listener: name.clone(),
                name: h.clone(),
            };
            let header = HeaderName::from_bytes(h.as_bytes()).map_err(|_| invalid())?;
            let mut v = HeaderValue::from_str(value.expose()).map_err(|_| invalid())?;
            // Keeps the value out of reqwest's and hyper's debug output.
            v.set_sensitive(true);
            // A configured header replaces walhook's own (e.g. a listener that insists on
            // `content-type: application/json`).
            headers.insert(header, v);
            scrub.push(value.expose().to_owned());
        }
        if let Some(s) = &listener.secret {
            scrub.push(s.expose().to_owned());
        }
        if listener.url.expose() != listener.url_redacted {
            scrub.push(listener.url.expose().to_owned());
        }
        // Very short values would scrub ordinary words out of answers; they are not
        // secrets anyone can guess from a 200-byte excerpt either.
        scrub.retain(|s| s.len() >= 4);

        let client = Client::builder()
            .redirect(redirect::Policy::none())
            .no_proxy()
            .no_gzip()
            .timeout(listener.timeout)
            .connect_timeout(listener.timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_keepalive(TCP_KEEPALIVE)
            .user_agent(concat!("walhook/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DeliveryError::Client {
                listener: name.clone(),
                reason: e.without_url().to_string(),
            })?;

        Ok(HttpSender {
            listener: name,
            client,
            url,
            url_redacted: listener.url_redacted.clone(),
            headers,
            key,
            timeout: listener.timeout,
            source_system: source_system.to_owned(),
            scrub,
        })
    }

    /// The listener's name.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// The listener's url with secrets replaced, for messages.
    pub fn url_redacted(&self) -> &str {
        &self.url_redacted
    }

    /// The body [`HttpSender::send`] posts for `n`.
    pub fn body(&self, n: &Notification) -> Vec<u8> {
        cloudevent_bytes(&n.event, &self.source_system)
    }

    /// POSTs the notification's CloudEvent and classifies the answer.
    pub async fn send(&self, n: &Notification) -> Attempt {
        let body = self.body(n);
        self.send_raw(body, &n.event.event_id.to_string()).await
    }

    /// POSTs `body` as-is (signed with `event_id` as `webhook-id` when a secret is set).
    pub async fn send_raw(&self, body: Vec<u8>, event_id: &str) -> Attempt {
        let mut headers = self.headers.clone();
        if let Some(key) = &self.key {
            for (name, value) in webhook_headers(key, event_id, &body) {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), v);
                }
            }
        }

        let started = Instant::now();
        let result = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        match result {
            Ok(resp) => self.answered(resp, started).await,
            Err(e) => {
                let (outcome, comment) = self.transport_failure(&e);
                Attempt {
                    verdict: outcome.verdict(),
                    status_code: None,
                    comment: Some(comment),
                    retry_after: None,
                    latency: started.elapsed(),
                }
            }
        }
    }

    async fn answered(&self, mut resp: reqwest::Response, started: Instant) -> Attempt {
        let status = resp.status();
        let code = status.as_u16();
        let outcome = Outcome::from_status(code);
        let retry_after = if Outcome::reads_retry_after(code) {
            resp.headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()))
        } else {
            None
        };
        let location = resp
            .headers()
            .get(LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());

        // Reading the body (bounded) lets the connection go back to the pool; an error
        // while reading does not change what the status already said.
        let mut body = Vec::new();
        while body.len() < MAX_RESPONSE_BODY {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_RESPONSE_BODY - body.len();
                    body.extend(chunk.iter().take(room));
                }
                Ok(None) | Err(_) => break,
            }
        }
        let latency = started.elapsed();

        // Only failures get a comment: nothing is formatted for a delivery.
        let status_text = || match status.canonical_reason() {
            Some(reason) => format!("HTTP {code} {reason}"),
            None => format!("HTTP {code}"),
        };
        let comment = match outcome {
            Outcome::Success2xx => None,
            Outcome::Redirect3xx => Some(match location {
                Some(loc) => format!(
                    "HTTP {code} redirect from {} to {}: redirects are not followed; set the listener url to the new location",
                    self.url_redacted,
                    self.excerpt(loc.as_bytes(), COMMENT_LOCATION_BYTES),
                ),
                None => format!(
                    "{} from {} without a Location header: redirects are not followed; check the listener url",
                    status_text(),
                    self.url_redacted
                ),
            }),
            _ => {
                let text = self.excerpt(&body, COMMENT_BODY_BYTES);
                Some(if text.is_empty() {
                    format!("{} from {}", status_text(), self.url_redacted)
                } else {
                    format!("{} from {}: {text}", status_text(), self.url_redacted)
                })
            }
        };
        Attempt {
            verdict: outcome.verdict(),
            status_code: Some(code),
            comment,
            retry_after,
            latency,
        }
    }

    /// The outcome class and a one-line comment for a request that got no HTTP answer.
    fn transport_failure(&self, e: &reqwest::Error) -> (Outcome, String) {
        let endpoint = self.endpoint();
        let timeout = humantime::format_duration(self.timeout);
        if e.is_connect() {
            if e.is_timeout() || has_io_kind(e, std::io::ErrorKind::TimedOut) {
                return (
                    Outcome::Timeout,
                    format!("no connection to {endpoint} within {timeout}"),
                );
            }
            if has_io_kind(e, std::io::ErrorKind::ConnectionRefused) {
                return (
                    Outcome::ConnectFailed,
                    format!("connection refused by {endpoint}"),
                );
            }
            return (
                Outcome::ConnectFailed,
                format!("cannot connect to {endpoint}: {}", self.cause(e)),
            );
        }
        if e.is_timeout() {
            return (
                Outcome::Timeout,
                format!("no answer within {timeout} from {}", self.url_redacted),
            );
        }
        (
            Outcome::OtherTransport,
            format!("request to {} failed: {}", self.url_redacted, self.cause(e)),
        )
    }

    /// `host:port` of the listener (no credentials, no path).
    fn endpoint(&self) -> String {
        let host = self.url.host_str().unwrap_or("?");
        match self.url.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }

    /// The innermost error text, which names the actual problem (reset, EOF, TLS).
    fn cause(&self, e: &reqwest::Error) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = s.to_string();
            source = s.source();
        }
        self.excerpt(text.as_bytes(), COMMENT_BODY_BYTES)
    }

    /// At most `limit` bytes of `raw` as one clean line, with configured secrets removed.
    fn excerpt(&self, raw: &[u8], limit: usize) -> String {
        let text = String::from_utf8_lossy(raw);
        let mut text = text.into_owned();
        for secret in &self.scrub {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        one_line(&text, limit)
    }
}

/// Folds whitespace runs to one space, drops control characters and cuts at `limit`
/// bytes on a character boundary.
fn one_line(text: &str, limit: usize) -> String {
    let mut out = String::new();
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if c.is_control() {
            continue;
        }
        let extra = c.len_utf8() + usize::from(pending_space);
        if out.len() + extra > limit {
            break;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
    }
    out
}

fn has_io_kind(e: &reqwest::Error, kind: std::io::ErrorKind) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == kind
        {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_folds_newlines_and_cuts_on_char_boundaries() {
        assert_eq!(one_line("  a\r\n\tb  c \n", 100), "a b c");
        assert_eq!(one_line("abc\u{7}def", 100), "abcdef");
        assert_eq!(one_line("ééé", 5), "éé");
        assert_eq!(one_line("abcdef", 3), "abc");
    }
}

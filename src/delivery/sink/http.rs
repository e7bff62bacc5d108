//! The HTTP sink: POSTs a rendered message to the listener's url with the configured
//! headers, its authentication (see [`super::auth`]) and a Standard Webhooks signature,
//! and classifies the answer as a policy [`Outcome`] with a comment a DBA reads ("HTTP 503
//! Service Unavailable from …").

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER,
};
use reqwest::{Client, StatusCode, redirect};

use super::auth::Auth;

use super::azure::Azure;
use crate::config::ListenerConfig;
use crate::delivery::Attempt;
use crate::delivery::format::Message;
use crate::delivery::policy::Outcome;
use crate::delivery::signature::webhook_headers;
use crate::error::{Classify, ErrorClass};
use crate::secret::SecretUrl;
use crate::secret::SigningKey;

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

/// Why a listener's HTTP sink could not be built. Never carries a secret. Everything
/// else about a listener (url, headers, signing key, CA file) was checked when the
/// configuration was loaded.
#[derive(Debug, thiserror::Error)]
pub enum HttpSinkError {
    /// The HTTP client could not be created (TLS setup).
    #[error("listener {listener:?}: cannot create the HTTP client: {reason}")]
    Client {
        /// Listener name.
        listener: String,
        /// The client's error text.
        reason: String,
    },
}

impl Classify for HttpSinkError {
    fn class(&self) -> ErrorClass {
        match self {
            HttpSinkError::Client { .. } => ErrorClass::Permanent,
        }
    }
}

/// The HTTP sink of one listener; build once, share by reference, send many times.
pub struct HttpSink {
    listener: String,
    client: Client,
    url: SecretUrl,
    /// The configured headers, built once.
    headers: HeaderMap,
    key: Option<SigningKey>,
    timeout: Duration,
    /// Configured secret strings that must be scrubbed from any quoted answer text.
    scrub: Scrub,
    /// How requests are authenticated, beyond the configured headers.
    auth: Option<Auth>,
    /// Azure's authentication and per-topic addresses (Event Grid topics, Service Bus).
    azure: Option<Azure>,
}

/// Secret strings that must never appear in text walhook quotes (answers, error causes).
#[derive(Clone, Debug, Default)]
pub struct Scrub(Vec<String>);

impl Scrub {
    /// Scrubs `secrets`. Very short values would scrub ordinary words out of answers; they
    /// are not secrets anyone can guess from a 200-byte excerpt either. Longest first, so a
    /// value containing another is replaced whole.
    pub fn new(mut secrets: Vec<String>) -> Scrub {
        secrets.retain(|s| s.len() >= 4);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Scrub(secrets)
    }

    /// `raw` as text with every secret (and every one of `live`) replaced by `***`.
    pub fn clean(&self, raw: &[u8], live: &[String]) -> String {
        let mut text = String::from_utf8_lossy(raw).into_owned();
        for secret in self.0.iter().chain(live.iter().filter(|s| s.len() >= 4)) {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        text
    }

    /// At most `limit` bytes of `raw` as one clean line, without secrets.
    pub fn excerpt(&self, raw: &[u8], limit: usize, live: &[String]) -> String {
        one_line(&self.clean(raw, live), limit)
    }
}

/// What one attempt looked like on the wire, secrets masked: for `walhook test-listener`.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// `POST <url, secrets redacted>`.
    pub request_line: String,
    /// The request headers as sent; secret values (authentication, configured headers)
    /// shown as `***`.
    pub request_headers: Vec<(String, String)>,
    /// The answers: one, or two when a 401 led to new credentials and a second request.
    pub responses: Vec<TracedResponse>,
}

/// One answer as `walhook test-listener` shows it.
#[derive(Clone, Debug)]
pub struct TracedResponse {
    /// The status line, like `HTTP 200 OK`.
    pub status_line: String,
    /// Headers, values scrubbed of secrets.
    pub headers: Vec<(String, String)>,
    /// The body as text (at most 64 KiB), scrubbed of secrets.
    pub body: String,
}

/// Shows only what may be logged: the url with secrets redacted, never headers or keys.
impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("listener", &self.listener)
            .field("url", &self.url.redacted())
            .field("signed", &self.key.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Builds the listener's HTTP client and its fixed headers.
    pub fn new(listener: &ListenerConfig) -> Result<HttpSink, HttpSinkError> {
        let name = listener.name.clone();
        let mut headers = HeaderMap::new();
        let mut scrub = listener.url.secret_parts();
        if let Some(auth) = &listener.auth {
            scrub.extend(Auth::fixed_secrets(auth));
        }
        for (header, value) in &listener.headers {
            // A configured header replaces the format's (e.g. a listener that insists on
            // `content-type: application/json`); see `headers_for`.
            headers.insert(header.clone(), value.clone());
            if let Ok(v) = value.to_str() {
                scrub.push(v.to_owned());
            }
        }
        // A listener that knows the signing secret may quote it back.
        if let Some(key) = &listener.secret {
            let encoded = base64::engine::general_purpose::STANDARD.encode(key.expose());
            scrub.push(format!("whsec_{encoded}"));
            scrub.push(encoded);
        }
        let azure = Azure::for_listener(listener).map_err(|reason| HttpSinkError::Client {
            listener: name.clone(),
            reason,
        })?;
        if let Some(azure) = &azure {
            scrub.extend(azure.secrets());
        }
        let scrub = Scrub::new(scrub);

        let client = crate::tls::http_client_builder(listener.ca_file.as_ref())
            .map_err(|e| HttpSinkError::Client {
                listener: name.clone(),
                reason: e.to_string(),
            })?
            .redirect(redirect::Policy::none())
            .no_proxy()
            .no_gzip()
            .timeout(listener.timeout)
            .connect_timeout(listener.timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_keepalive(TCP_KEEPALIVE)
            .user_agent(concat!("walhook/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpSinkError::Client {
                listener: name.clone(),
                reason: e.without_url().to_string(),
            })?;

        let auth = listener
            .auth
            .as_ref()
            .map(|a| Auth::new(a, &client, listener.timeout));
        Ok(HttpSink {
            listener: name,
            client,
            url: listener.url.clone(),
            headers,
            key: listener.secret.clone(),
            timeout: listener.timeout,
            scrub,
            auth,
            azure,
        })
    }

    /// The listener's name.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// The listener's url with secrets replaced, for messages.
    pub fn url_redacted(&self) -> &str {
        self.url.redacted()
    }

    /// The request headers for `message`: its content type and attributes, the configured
    /// headers (which win over the format's), and the Standard Webhooks signature of `body`
    /// with the message id as `webhook-id` when a secret is set. `Err` names a format
    /// value that is not a valid header.
    pub fn headers_for(&self, message: &Message) -> Result<HeaderMap, String> {
        let mut headers = self.headers.clone();
        if !headers.contains_key(CONTENT_TYPE) {
            let value = HeaderValue::from_str(&message.content_type).map_err(|_| {
                format!(
                    "content type {:?} is not a valid header value",
                    message.content_type
                )
            })?;
            headers.insert(CONTENT_TYPE, value);
        }
        for (name, value) in &message.attributes {
            let invalid = || format!("attribute {name:?} is not a valid header");
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
            if !headers.contains_key(&name) {
                headers.insert(name, HeaderValue::from_str(value).map_err(|_| invalid())?);
            }
        }
        if let Some(key) = &self.key {
            for (name, value) in webhook_headers(key, &message.id, &message.body) {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), v);
                }
            }
        }
        Ok(headers)
    }

    /// How requests are authenticated, in words without secrets (`None`: not at all).
    pub fn auth_description(&self) -> Option<String> {
        self.auth.as_ref().map(Auth::describe)
    }

    /// POSTs `message` and classifies the answer.
    pub async fn send(&self, message: Message) -> Attempt {
        self.send_traced(message, None).await.0
    }

    /// [`HttpSink::send`], also returning what went over the wire (secrets masked).
    pub async fn exchange(&self, message: Message) -> (Attempt, Trace) {
        let mut trace = Trace::default();
        let (attempt, _) = self.send_traced(message, Some(&mut trace)).await;
        (attempt, trace)
    }

    /// POSTs `message`, classifies the answer and returns its body (up to 64 kB; empty
    /// without an answer), for exchanges that read it (Event Grid's handshake).
    pub async fn exchange_body(&self, message: Message) -> (Attempt, Vec<u8>) {
        self.send_traced(message, None).await
    }

    fn unsendable(&self, problem: &str) -> Attempt {
        Attempt {
            outcome: Outcome::Unsendable,
            status_code: None,
            comment: Some(format!("cannot send to {}: {problem}", self.url.redacted())),
            retry_after: None,
            latency: Duration::ZERO,
        }
    }

    async fn send_traced(
        &self,
        message: Message,
        mut trace: Option<&mut Trace>,
    ) -> (Attempt, Vec<u8>) {
        let target = match &self.azure {
            None => self.url.expose().clone(),
            Some(azure) => match azure.target(self.url.expose(), message.topic.as_deref()) {
                Ok(url) => url,
                Err(problem) => return (self.unsendable(&problem), Vec::new()),
            },
        };
        let mut headers = match self.headers_for(&message) {
            Ok(h) => h,
            Err(problem) => return (self.unsendable(&problem), Vec::new()),
        };
        if let Some(azure) = &self.azure {
            let (name, value) = azure.header(&target);
            headers.insert(name, value);
        }
        let credential = match &self.auth {
            None => None,
            Some(auth) => match auth.header().await {
                Ok(h) => Some(h),
                Err(failure) => return (failure.attempt(), Vec::new()),
            },
        };
        if let Some(h) = &credential {
            headers.insert(AUTHORIZATION, h.clone());
        }
        if let Some(t) = trace.as_deref_mut() {
            t.request_line = format!("POST {}", SecretUrl::new(target.clone()).redacted());
            t.request_headers = self.shown(&headers);
        }
        let body = Bytes::from(message.body);
        let started = Instant::now();
        let mut result = self.post(&target, &headers, &body).await;
        // A 401 may mean the token expired early or was revoked: new credentials, once.
        if let (Some(auth), Some(used), Ok(resp)) = (&self.auth, &credential, &result)
            && resp.status() == StatusCode::UNAUTHORIZED
        {
            match auth.renew_after_401(used).await {
                Ok(Some(fresh)) => {
                    headers.insert(AUTHORIZATION, fresh);
                    let first =
                        std::mem::replace(&mut result, self.post(&target, &headers, &body).await);
                    if let (Some(t), Ok(resp)) = (trace.as_deref_mut(), first) {
                        let (response, _) = self.read(resp, true).await;
                        t.responses.extend(response);
                    }
                }
                Ok(None) => {}
                Err(failure) => return (failure.attempt(), Vec::new()),
            }
        }
        match result {
            Ok(resp) => self.answered(resp, started, trace, &target).await,
            Err(e) => {
                let live = self.live_secrets();
                let (outcome, comment) =
                    transport_failure(&e, &self.url, self.timeout, &self.scrub, &live);
                let attempt = Attempt {
                    outcome,
                    status_code: None,
                    comment: Some(comment),
                    retry_after: None,
                    latency: started.elapsed(),
                };
                (attempt, Vec::new())
            }
        }
    }

    async fn post(
        &self,
        target: &reqwest::Url,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(target.clone())
            .headers(headers.clone())
            .body(body.clone())
            .send()
            .await
    }

    /// `headers` as `walhook test-listener` shows them: credentials and configured header
    /// values as `***` (an authorization scheme stays visible).
    fn shown(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(name, value)| {
                let text = String::from_utf8_lossy(value.as_bytes());
                let shown = if name == AUTHORIZATION {
                    match text.split_once(' ') {
                        Some((scheme, _)) => format!("{scheme} {REDACTED}"),
                        None => REDACTED.to_owned(),
                    }
                } else if self.headers.contains_key(name) || value.is_sensitive() {
                    REDACTED.to_owned()
                } else {
                    text.into_owned()
                };
                (name.as_str().to_owned(), shown)
            })
            .collect()
    }

    /// Secrets obtained while running (a current token).
    fn live_secrets(&self) -> Vec<String> {
        self.auth
            .as_ref()
            .map(Auth::live_secrets)
            .unwrap_or_default()
    }

    /// Reads an answer (its body bounded): the body, and with `traced` what `walhook
    /// test-listener` shows (scrubbing is skipped on the delivery path, which never shows it).
    async fn read(
        &self,
        mut resp: reqwest::Response,
        traced: bool,
    ) -> (Option<TracedResponse>, Vec<u8>) {
        let status = resp.status();
        // Only `walhook test-listener` shows the answer: nothing is scrubbed for the others.
        let headers: Option<Vec<(String, String)>> = traced.then(|| {
            let live = self.live_secrets();
            resp.headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), self.scrub.clean(v.as_bytes(), &live)))
                .collect()
        });
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
        let shown = headers.map(|headers| TracedResponse {
            status_line: status_text(status),
            headers,
            body: self.scrub.clean(&body, &self.live_secrets()),
        });
        (shown, body)
    }

    async fn answered(
        &self,
        resp: reqwest::Response,
        started: Instant,
        trace: Option<&mut Trace>,
        target: &reqwest::Url,
    ) -> (Attempt, Vec<u8>) {
        let status = resp.status();
        let code = status.as_u16();
        let outcome = status_outcome(code);
        let retry_after = if reads_retry_after(code) {
            resp.headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()))
        } else {
            None
        };
        // Only a redirect's comment quotes where it pointed.
        let location = matches!(outcome, Outcome::Moved)
            .then(|| resp.headers().get(LOCATION))
            .flatten()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());

        let (traced, body) = self.read(resp, trace.is_some()).await;
        let latency = started.elapsed();
        if let Some(t) = trace {
            t.responses.extend(traced);
        }

        // Only failures get a comment: nothing is formatted for a delivery.
        let comment = match outcome {
            Outcome::Accepted => None,
            _ => Some(self.failure_comment(outcome, status, location, &body, target)),
        };
        let attempt = Attempt {
            outcome,
            status_code: Some(code),
            comment,
            retry_after,
            latency,
        };
        (attempt, body)
    }

    /// Why an answer other than a delivery failed, in plain words without secrets.
    fn failure_comment(
        &self,
        outcome: Outcome,
        status: StatusCode,
        location: Option<String>,
        body: &[u8],
        target: &reqwest::Url,
    ) -> String {
        let code = status.as_u16();
        let status_text = status_text(status);
        let live = self.live_secrets();
        // Azure listeners post to a per-topic address under the configured url.
        let shown = SecretUrl::new(target.clone());
        let shown = shown.redacted();
        match (outcome, location) {
            (Outcome::Moved, Some(loc)) => format!(
                "HTTP {code} redirect from {} to {}: redirects are not followed; set the listener url to the new location",
                self.url.redacted(),
                self.scrub
                    .excerpt(loc.as_bytes(), COMMENT_LOCATION_BYTES, &live),
            ),
            (Outcome::Moved, None) => format!(
                "{status_text} from {shown} without a Location header: redirects are not followed; check the listener url",
            ),
            _ => {
                let text = self.scrub.excerpt(body, COMMENT_BODY_BYTES, &live);
                if text.is_empty() {
                    format!("{status_text} from {shown}")
                } else {
                    format!("{status_text} from {shown}: {text}")
                }
            }
        }
    }
}

/// `HTTP 503 Service Unavailable`.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// The outcome class and a one-line comment for a request to `url` that got no HTTP
/// answer; `timeout` is the request's limit.
pub fn transport_failure(
    e: &reqwest::Error,
    url: &SecretUrl,
    timeout: Duration,
    scrub: &Scrub,
    live: &[String],
) -> (Outcome, String) {
    let endpoint = endpoint(url);
    let cause = || cause(e, scrub, live);
    let timeout = humantime::format_duration(timeout);
    if e.is_connect() {
        if e.is_timeout() || has_io_kind(e, std::io::ErrorKind::TimedOut) {
            return (
                Outcome::TimedOut,
                format!("no connection to {endpoint} within {timeout}"),
            );
        }
        if has_io_kind(e, std::io::ErrorKind::ConnectionRefused) {
            return (
                Outcome::Unreachable,
                format!("connection refused by {endpoint}"),
            );
        }
        if let Some(problem) = crate::tls::certificate_problem(e) {
            return (
                Outcome::Unreachable,
                format!("TLS handshake with {endpoint} failed: {problem}"),
            );
        }
        return (
            Outcome::Unreachable,
            format!("cannot connect to {endpoint}: {}", cause()),
        );
    }
    if e.is_timeout() {
        return (
            Outcome::TimedOut,
            format!("no answer within {timeout} from {}", url.redacted()),
        );
    }
    (
        Outcome::TransportError,
        format!("request to {} failed: {}", url.redacted(), cause()),
    )
}

/// `host:port` of a url (no credentials, no path).
fn endpoint(url: &SecretUrl) -> String {
    let url = url.expose();
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// The innermost error text, which names the actual problem (reset, EOF, TLS).
fn cause(e: &reqwest::Error, scrub: &Scrub, live: &[String]) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    scrub.excerpt(text.as_bytes(), COMMENT_BODY_BYTES, live)
}

/// The policy class of an HTTP status: 2xx accepted, 3xx moved (redirects are not
/// followed), 408 timed out, 429 throttled, other 4xx rejected, 5xx a listener error;
/// anything else (1xx, beyond 599) a transport error.
pub fn status_outcome(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Accepted,
        300..=399 => Outcome::Moved,
        408 => Outcome::TimedOut,
        429 => Outcome::Throttled,
        400..=499 => Outcome::Rejected,
        500..=599 => Outcome::ListenerError,
        _ => Outcome::TransportError,
    }
}

/// Whether the answer's `Retry-After` header is honoured for this status.
fn reads_retry_after(status: u16) -> bool {
    status == 429 || status == 503
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (relative to `now`).
/// A date in the past means "now"; anything else unreadable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // An absurd number of seconds still means "wait long"; the policy caps it.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
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
    use crate::delivery::Verdict;

    #[test]
    fn statuses_map_to_the_documented_verdicts() {
        let cases = [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (299, Verdict::Delivered),
            (301, Verdict::Fail),
            (302, Verdict::Fail),
            (307, Verdict::Fail),
            (400, Verdict::Fail),
            (401, Verdict::Fail),
            (404, Verdict::Fail),
            (408, Verdict::Retry),
            (410, Verdict::Fail),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (502, Verdict::Retry),
            (503, Verdict::Retry),
            (599, Verdict::Retry),
            (101, Verdict::Retry),
            (600, Verdict::Retry),
        ];
        for (status, verdict) in cases {
            assert_eq!(status_outcome(status).verdict(), verdict, "{status}");
        }
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn one_line_folds_newlines_and_cuts_on_char_boundaries() {
        assert_eq!(one_line("  a\r\n\tb  c \n", 100), "a b c");
        assert_eq!(one_line("abc\u{7}def", 100), "abcdef");
        assert_eq!(one_line("ééé", 5), "éé");
        assert_eq!(one_line("abcdef", 3), "abc");
    }
}

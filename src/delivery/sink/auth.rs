//! Listener authentication for the HTTP sink: the `Authorization` header of each request.
//!
//! * Basic and inline bearer tokens are fixed headers.
//! * A bearer token file is looked at again at most once a second and read again when it
//!   changed (another process renews the token), and at once after a 401.
//! * OAuth2 client credentials: a token from the token endpoint, cached until shortly before
//!   it expires; one request fetches it while others wait for it. A 401 from the listener
//!   renews it once (unless another request already did) and the request is sent again.
//!
//! Header values are marked sensitive; tokens, passwords and the client secret never
//! appear in comments or logs (answers that quote them are scrubbed).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Client;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use serde::Deserialize;

use super::http::{Scrub, transport_failure};
use crate::config::{BearerToken, ClientAuth, ListenerAuth, OAuth2Config};
use crate::delivery::Attempt;
use crate::delivery::policy::Outcome;
use crate::secret::{Secret, read_secret_file};

/// A token file is looked at no more often than this.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A token is renewed this share of its lifetime before it expires…
const RENEW_SHARE: u32 = 10;
/// …but never earlier than this before.
const RENEW_AT_MOST: Duration = Duration::from_secs(60);
/// Most of a token endpoint's answer that is read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// RFC 6749 (2.3.1) form-encodes the client id and secret before Basic encoding; the
/// unreserved characters stay as they are, which servers that skip the decoding accept too.
const CLIENT_CREDENTIAL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why no credentials could be had: the attempt that reports it (nothing was sent).
#[derive(Debug)]
pub struct AuthFailure {
    outcome: Outcome,
    comment: String,
}

impl AuthFailure {
    /// The failure as the attempt's outcome.
    pub fn attempt(self) -> Attempt {
        Attempt {
            outcome: self.outcome,
            status_code: None,
            comment: Some(self.comment),
            retry_after: None,
            latency: Duration::ZERO,
        }
    }
}

/// A listener's authentication.
pub enum Auth {
    /// Basic, or an inline bearer token.
    Fixed(HeaderValue),
    /// A bearer token read from a file.
    File(TokenFile),
    /// OAuth2 client credentials.
    OAuth2(Box<OAuth2>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe().as_str())
    }
}

impl Auth {
    /// The authentication `config` asks for; token requests use `client` (the listener's
    /// TLS settings and timeout).
    pub fn new(config: &ListenerAuth, client: &Client, timeout: Duration) -> Auth {
        match config {
            ListenerAuth::Basic { user, password } => {
                let credentials = STANDARD.encode(format!("{user}:{}", password.expose()));
                Auth::Fixed(sensitive(&format!("Basic {credentials}")))
            }
            ListenerAuth::Bearer(BearerToken::Inline(token)) => {
                Auth::Fixed(sensitive(&format!("Bearer {}", token.expose())))
            }
            ListenerAuth::Bearer(BearerToken::File { path, initial }) => {
                Auth::File(TokenFile::new(path.clone(), initial))
            }
            ListenerAuth::OAuth2(o) => Auth::OAuth2(Box::new(OAuth2 {
                config: o.clone(),
                client: client.clone(),
                timeout,
                token: Mutex::new(None),
                fetching: tokio::sync::Mutex::new(()),
            })),
        }
    }

    /// One line saying how walhook authenticates, without secrets.
    pub fn describe(&self) -> String {
        match self {
            Auth::Fixed(h) if h.as_bytes().starts_with(b"Basic ") => "HTTP Basic".into(),
            Auth::Fixed(_) => "a bearer token".into(),
            Auth::File(f) => format!("a bearer token read from {}", f.path.display()),
            Auth::OAuth2(o) => format!(
                "OAuth2 client credentials from {} as client_id {:?}{}",
                o.config.token_url.redacted(),
                o.config.client_id,
                o.config
                    .scope
                    .as_ref()
                    .map(|s| format!(" with scope {s:?}"))
                    .unwrap_or_default()
            ),
        }
    }

    /// The `Authorization` value for the next request.
    pub async fn header(&self) -> Result<HeaderValue, AuthFailure> {
        match self {
            Auth::Fixed(h) => Ok(h.clone()),
            Auth::File(f) => Ok(f.header(false)),
            Auth::OAuth2(o) => o.header().await,
        }
    }

    /// After the listener answered 401 to `used`: a different credential to send once more,
    /// or `None` when there is none (the 401 stands).
    pub async fn renew_after_401(
        &self,
        used: &HeaderValue,
    ) -> Result<Option<HeaderValue>, AuthFailure> {
        let fresh = match self {
            Auth::Fixed(_) => return Ok(None),
            Auth::File(f) => f.header(true),
            Auth::OAuth2(o) => o.renew(used).await?,
        };
        Ok((fresh != used).then_some(fresh))
    }

    /// Secrets known from the configuration, for scrubbing quoted text.
    pub fn fixed_secrets(config: &ListenerAuth) -> Vec<String> {
        match config {
            ListenerAuth::Basic { user, password } => vec![
                password.expose().to_owned(),
                STANDARD.encode(format!("{user}:{}", password.expose())),
            ],
            ListenerAuth::Bearer(BearerToken::Inline(t)) => vec![t.expose().to_owned()],
            ListenerAuth::Bearer(BearerToken::File { initial, .. }) => {
                vec![initial.expose().to_owned()]
            }
            ListenerAuth::OAuth2(o) => vec![o.client_secret.expose().to_owned()],
        }
    }

    /// Secrets obtained while running (the current token), for scrubbing quoted text.
    pub fn live_secrets(&self) -> Vec<String> {
        let token = match self {
            Auth::Fixed(_) => return Vec::new(),
            Auth::File(f) => lock(&f.state).header.clone(),
            Auth::OAuth2(o) => match lock(&o.token).as_ref() {
                Some(t) => t.header.clone(),
                None => return Vec::new(),
            },
        };
        let text = String::from_utf8_lossy(token.as_bytes());
        text.split_once(' ')
            .map(|(_, t)| vec![t.to_owned()])
            .unwrap_or_default()
    }
}

fn sensitive(value: &str) -> HeaderValue {
    // Every credential was checked at load to be visible ASCII; a token endpoint's answer
    // is checked before it gets here.
    let mut v = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bearer token kept in a file.
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    header: HeaderValue,
    /// Modification time and length when last read.
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
    /// Whether the last read failed (logged once per failure run).
    failing: bool,
}

impl TokenFile {
    fn new(path: PathBuf, initial: &Secret) -> TokenFile {
        let stamp = stamp(&path);
        TokenFile {
            path,
            state: Mutex::new(FileState {
                header: sensitive(&format!("Bearer {}", initial.expose())),
                stamp,
                checked: Instant::now(),
                failing: false,
            }),
        }
    }

    /// The current token; the file is read again when it changed (or `now`). A file that
    /// cannot be read keeps the last token.
    fn header(&self, now: bool) -> HeaderValue {
        let mut state = lock(&self.state);
        if !now && state.checked.elapsed() < FILE_CHECK_INTERVAL {
            return state.header.clone();
        }
        state.checked = Instant::now();
        let current = stamp(&self.path);
        if !now && current.is_some() && current == state.stamp {
            return state.header.clone();
        }
        let read = read_secret_file(&self.path).and_then(|s| {
            let t = s.expose().trim();
            if !t.is_empty() && t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                Ok(sensitive(&format!("Bearer {t}")))
            } else {
                Err(format!(
                    "{} does not hold a token (visible ASCII without spaces)",
                    self.path.display()
                ))
            }
        });
        match read {
            Ok(header) => {
                state.header = header;
                state.stamp = current;
                state.failing = false;
            }
            Err(problem) => {
                if !state.failing {
                    tracing::warn!(
                        "cannot read the bearer token: {problem}; the last token read is used until the file is fixed"
                    );
                }
                state.failing = true;
            }
        }
        state.header.clone()
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// OAuth2 client credentials with the current token.
pub struct OAuth2 {
    config: OAuth2Config,
    client: Client,
    timeout: Duration,
    token: Mutex<Option<Token>>,
    /// Held while a token is fetched, so concurrent requests wait for one fetch.
    fetching: tokio::sync::Mutex<()>,
}

struct Token {
    header: HeaderValue,
    /// When to fetch a new one; `None`: until the listener refuses it.
    renew_at: Option<Instant>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

impl OAuth2 {
    fn current(&self) -> Option<HeaderValue> {
        let token = lock(&self.token);
        let t = token.as_ref()?;
        match t.renew_at {
            Some(at) if Instant::now() >= at => None,
            _ => Some(t.header.clone()),
        }
    }

    async fn header(&self) -> Result<HeaderValue, AuthFailure> {
        if let Some(h) = self.current() {
            return Ok(h);
        }
        let _one = self.fetching.lock().await;
        if let Some(h) = self.current() {
            return Ok(h);
        }
        self.fetch().await
    }

    async fn renew(&self, used: &HeaderValue) -> Result<HeaderValue, AuthFailure> {
        let _one = self.fetching.lock().await;
        // Another request may have renewed it already.
        if let Some(h) = self.current()
            && h != used
        {
            return Ok(h);
        }
        self.fetch().await
    }

    /// Fetches a token (the caller holds `fetching`) and caches it.
    async fn fetch(&self) -> Result<HeaderValue, AuthFailure> {
        let c = &self.config;
        let url = &c.token_url;
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if let Some(scope) = &c.scope {
                form.append_pair("scope", scope);
            }
            if c.client_auth == ClientAuth::Body {
                form.append_pair("client_id", &c.client_id);
                form.append_pair("client_secret", c.client_secret.expose());
            }
            form.finish()
        };
        let mut request = self
            .client
            .post(url.expose().clone())
            .header(ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        if c.client_auth == ClientAuth::Basic {
            let id = utf8_percent_encode(&c.client_id, CLIENT_CREDENTIAL);
            let secret = utf8_percent_encode(c.client_secret.expose(), CLIENT_CREDENTIAL);
            let value = sensitive(&format!(
                "Basic {}",
                STANDARD.encode(format!("{id}:{secret}"))
            ));
            request = request.header(AUTHORIZATION, value);
        }
        // A token endpoint's error page may echo the request: the secret as written, as
        // encoded for Basic, and as form-encoded in the body.
        let secret = c.client_secret.expose();
        let scrub = Scrub::new(vec![
            secret.to_owned(),
            utf8_percent_encode(secret, CLIENT_CREDENTIAL).to_string(),
            url::form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
        ]);
        let failed = |outcome, what: String| AuthFailure {
            outcome,
            comment: format!("cannot get an OAuth2 token from {}: {what}", url.redacted()),
        };
        let sent_at = Instant::now();
        let mut resp = match request.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                let (outcome, comment) = transport_failure(&e, url, self.timeout, &scrub, &[]);
                return Err(failed(outcome, comment));
            }
        };
        let status = resp.status();
        let mut body = Vec::new();
        while body.len() < MAX_TOKEN_RESPONSE {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        if !status.is_success() {
            let text = scrub.excerpt(&body, 200, &[]);
            let fix = if status.as_u16() == 400 || status.as_u16() == 401 {
                "; check client_id, client_secret and scope"
            } else {
                ""
            };
            return Err(failed(
                Outcome::Unauthenticated,
                format!(
                    "HTTP {}{}{fix}",
                    status.as_u16(),
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!(": {text}")
                    }
                ),
            ));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            failed(
                Outcome::Unauthenticated,
                "the answer is not a JSON token response with access_token".into(),
            )
        })?;
        if let Some(kind) = &parsed.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(failed(
                Outcome::Unauthenticated,
                format!("token_type {kind:?} is not Bearer, the only type walhook sends"),
            ));
        }
        let token = parsed.access_token.trim();
        if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(failed(
                Outcome::Unauthenticated,
                "the access_token is empty or not a header-safe string".into(),
            ));
        }
        let header = sensitive(&format!("Bearer {token}"));
        let lifetime = parsed.expires_in.as_ref().and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
        // Counted from when the request was sent: the token may be older than its answer.
        let renew_at = lifetime
            .filter(|s| s.is_finite() && *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map(|life| sent_at + life - (life / RENEW_SHARE).min(RENEW_AT_MOST));
        tracing::debug!(
            token_url = %url,
            expires_in = ?lifetime,
            "fetched an OAuth2 token"
        );
        *lock(&self.token) = Some(Token {
            header: header.clone(),
            renew_at,
        });
        Ok(header)
    }
}

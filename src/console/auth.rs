//! Login, sessions and CSRF protection.
//!
//! The login form takes the `[admin] token_file` token and sets a cookie holding a random
//! session id (never the token): HttpOnly, SameSite=Strict, path /ui. A session remembers
//! a digest of the token it was opened with, so changing the token (and reloading) ends
//! every session. Every write is a POST carrying the session's CSRF token in a hidden form
//! field, checked by the [`WriteForm`] extractor, which is the only way a handler reads a
//! posted form; a cross-site `Origin` is refused as well.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use maud::{Markup, html};
use sha2::{Digest, Sha256};

use super::Console;
use super::layout;

/// The session cookie's name.
pub const COOKIE: &str = "walhook_console";

/// The form field carrying the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

/// How long a session lasts after login.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Sessions kept at most; logging in beyond this ends the oldest.
const MAX_SESSIONS: usize = 256;

/// Largest posted form read (a page of ids and a reason).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// SHA-256 of a token: sessions keep this, not the token.
type Digest32 = [u8; 32];

fn digest(s: &str) -> Digest32 {
    Sha256::digest(s.as_bytes()).into()
}

/// Compares two secrets in time independent of where they differ (and of their lengths:
/// the digests are compared).
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (digest(a), digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// 244 random bits from the OS generator (two v4 uuids), as 64 hex digits.
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[derive(Clone, Debug)]
struct Session {
    csrf: String,
    token: Digest32,
    opened: Instant,
}

/// The open sessions of this process (a restart logs everyone out).
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    /// Failed logins are slowed down to this rate for the whole process.
    failed_logins: DefaultDirectRateLimiter,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Default for Sessions {
    fn default() -> Self {
        // Ten wrong tokens at once, then one per second: typing errors pass, guessing a
        // 24-byte token does not.
        let quota = Quota::per_second(NonZeroU32::MIN)
            .allow_burst(NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN));
        Sessions {
            open: Mutex::new(HashMap::new()),
            failed_logins: RateLimiter::direct(quota),
        }
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session for `token`; returns its id.
    fn open(&self, token: &str) -> String {
        let id = random_token();
        let mut open = self.lock();
        open.retain(|_, s| s.opened.elapsed() < SESSION_LIFETIME);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.opened)
                .map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        open.insert(
            id.clone(),
            Session {
                csrf: random_token(),
                token: digest(token),
                opened: Instant::now(),
            },
        );
        id
    }

    /// The live session `id` opened with `token`.
    fn get(&self, id: &str, token: &str) -> Option<Session> {
        let mut open = self.lock();
        let session = open.get(id)?;
        if session.opened.elapsed() >= SESSION_LIFETIME || session.token != digest(token) {
            open.remove(id);
            return None;
        }
        Some(session.clone())
    }

    fn close(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A logged-in viewer; extracting it from a request without a live session redirects GETs
/// to the login form and refuses anything else.
#[derive(Clone, Debug)]
pub struct Viewer {
    id: String,
    /// The session's CSRF token, for the forms a page renders.
    pub csrf: String,
}

impl Viewer {
    #[cfg(test)]
    pub(crate) fn for_tests(csrf: &str) -> Viewer {
        Viewer {
            id: "test".to_owned(),
            csrf: csrf.to_owned(),
        }
    }

    /// The session's id: what the console keeps per viewer (a test send's result) is
    /// keyed by it, so only the viewer who asked sees it.
    pub(super) fn session(&self) -> &str {
        &self.id
    }

    fn from_headers(console: &Console, headers: &HeaderMap) -> Option<Viewer> {
        let token = console.token()?;
        let id = cookie(headers, COOKIE)?;
        let session = console.inner.sessions.get(id, token.expose())?;
        Some(Viewer {
            id: id.to_owned(),
            csrf: session.csrf,
        })
    }
}

impl FromRequestParts<Console> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Response> {
        if let Some(v) = Viewer::from_headers(console, &parts.headers) {
            return Ok(v);
        }
        if parts.method == axum::http::Method::GET {
            let next = parts
                .uri
                .path_and_query()
                .map_or("/ui", |p| p.as_str())
                .to_owned();
            let target = format!(
                "/ui/login?next={}",
                form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
            );
            return Err(Redirect::to(&target).into_response());
        }
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "not logged in: log in to the console first",
        ))
    }
}

/// A posted form from a logged-in viewer whose CSRF token matched and whose origin (when
/// the browser names one) is this server.
#[derive(Debug)]
pub struct WriteForm {
    /// Who posted it.
    pub viewer: Viewer,
    /// The fields in order (repeated names kept, e.g. several `id`).
    pub fields: Vec<(String, String)>,
}

impl WriteForm {
    /// The first value of field `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of field `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl FromRequest<Console> for WriteForm {
    type Rejection = Response;

    async fn from_request(req: Request, console: &Console) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let viewer = Viewer::from_request_parts(&mut parts, console).await?;
        if !same_origin(&parts.headers) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "refused: the request comes from another site",
            ));
        }
        let fields = read_form(body).await?;
        let csrf = fields
            .iter()
            .find(|(k, _)| k == CSRF_FIELD)
            .map(|(_, v)| v.as_str());
        match csrf {
            Some(token) if same_secret(token, &viewer.csrf) => Ok(WriteForm { viewer, fields }),
            _ => Err(refuse(
                StatusCode::FORBIDDEN,
                "refused: the form's CSRF token is missing or stale; reload the page and try again",
            )),
        }
    }
}

async fn read_form(body: axum::body::Body) -> Result<Vec<(String, String)>, Response> {
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| refuse(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// Whether the browser says the request comes from this console: `Sec-Fetch-Site` (when
/// sent) is `same-origin`, and `Origin` (when sent) names the host the request was sent to.
/// Browsers send both with every POST; a request from another site carries that site's
/// origin. Clients that send neither (curl) are not browsers a site can drive.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| o.split_once("://"));
    matches!((origin, host), (Some((_, o)), Some(h)) if o == h)
}

/// A plain-text refusal (the status says what kind).
pub fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response()
}

/// Where to go after login: only paths of this console.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/ui") && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/ui",
    }
}

fn login_page(status: StatusCode, next: &str, problem: Option<&str>) -> Response {
    let body: Markup = html! {
        main.login {
            h1 { "walhook console" }
            form method="post" action="/ui/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                @if let Some(p) = problem {
                    p.error role="alert" { (p) }
                }
                button type="submit" { "Log in" }
            }
            p.hint { "The token is the content of the file named by token_file in the [admin] section of walhook's configuration." }
        }
    };
    (status, layout::bare("Log in", body)).into_response()
}

/// Query of the login form.
#[derive(serde::Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

/// GET /ui/login.
pub async fn login_form(
    State(console): State<Console>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if Viewer::from_headers(&console, &headers).is_some() {
        return Redirect::to(next).into_response();
    }
    login_page(StatusCode::OK, next, None)
}

/// POST /ui/login.
pub async fn login(State(console): State<Console>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if !same_origin(&parts.headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "refused: the request comes from another site",
        );
    }
    let fields = match read_form(body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let next = safe_next(field("next")).to_owned();
    let Some(token) = console.token() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let given = field("token").unwrap_or_default();
    if !same_secret(given.trim(), token.expose()) {
        if console.inner.sessions.failed_logins.check().is_err() {
            return login_page(
                StatusCode::TOO_MANY_REQUESTS,
                &next,
                Some("Too many wrong tokens: wait a few seconds and try again."),
            );
        }
        tracing::warn!("console login with a wrong token");
        return login_page(StatusCode::UNAUTHORIZED, &next, Some("Wrong token."));
    }
    let id = console.inner.sessions.open(token.expose());
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    );
    let mut response = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// POST /ui/logout.
pub async fn logout(State(console): State<Console>, form: WriteForm) -> Response {
    console.inner.sessions.close(&form.viewer.id);
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "walhook_console=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_the_token_changes() {
        let s = Sessions::default();
        let id = s.open("token-one-token-one-token-one");
        assert!(s.get(&id, "token-one-token-one-token-one").is_some());
        assert!(s.get(&id, "token-two-token-two-token-two").is_none());
        // Gone for good, even with the old token back.
        assert!(s.get(&id, "token-one-token-one-token-one").is_none());
        assert!(s.get("unknown", "token-one-token-one-token-one").is_none());
    }

    #[test]
    fn only_console_paths_are_followed_after_login() {
        assert_eq!(
            safe_next(Some("/ui/failed?listener=a")),
            "/ui/failed?listener=a"
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/ui",
            "/metrics",
            "/ui\\..",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui");
    }

    #[test]
    fn cross_site_origins_are_told_apart() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9187"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9187"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9187"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; walhook_console=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "walhook"), None);
    }
}

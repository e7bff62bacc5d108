//! The web console under `/ui` on the admin endpoint: server-rendered pages over the queue
//! tables and the process's metrics, for DBAs and integrators who would rather not write
//! SQL. Reading works without JavaScript; the few lines of script only add conveniences.
//!
//! Off unless `[admin] token_file` is set (then `/ui` answers 404 with a hint). Every page
//! needs a login; every write is a POST with a CSRF token (see `auth`). Nothing secret is
//! rendered: listener URLs appear redacted, headers and signing secrets never.
//!
//! One file per page; the queries live in `queue::admin` and `queue::browse`, shared with
//! the command line (`walhook retry` and the console's retry are one code path).

mod auth;
mod chart;
mod event;
mod failed;
mod history;
mod layout;
mod listeners;
mod notifications;
mod overview;
mod test_send;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use tokio::sync::{Mutex, watch};

pub use history::{History, SAMPLE_INTERVAL, spawn_sampler};

use crate::admin::Health;
use crate::config::{Config, Secret};
use crate::metrics::Metrics;
use crate::queue::QueueError;

/// What the console reads from the running service.
#[derive(Clone, Debug)]
pub struct ConsoleDeps {
    /// The current configuration (follows reloads: token, listeners, source).
    pub config: watch::Receiver<Arc<Config>>,
    /// The process metrics.
    pub metrics: Arc<Metrics>,
    /// Capture and queue health.
    pub health: Arc<Health>,
    /// The last hour of counters, fed by [`spawn_sampler`].
    pub history: Arc<History>,
}

/// Shared state of the console's handlers.
#[derive(Clone, Debug)]
struct Console {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    deps: ConsoleDeps,
    sessions: auth::Sessions,
    /// Results of "Send test event", shown after the redirect.
    test_results: test_send::TestResults,
    /// One connection for every page, reconnected when it breaks.
    db: Mutex<Option<Arc<tokio_postgres::Client>>>,
}

/// Settings of the console's connection: pages must never hold the database for long,
/// and DBAs see who runs the queries in pg_stat_activity.
const SESSION_SETTINGS: &str =
    "SET statement_timeout = '15s'; SET application_name = 'walhook console'";

impl Console {
    /// The configured token, `None` when the console is off.
    fn token(&self) -> Option<Secret> {
        self.config().admin.as_ref().and_then(|a| a.token.clone())
    }

    fn config(&self) -> Arc<Config> {
        self.inner.deps.config.borrow().clone()
    }

    /// The console's database connection, connecting when there is none or it broke.
    async fn db(&self) -> Result<Arc<tokio_postgres::Client>, PageError> {
        let mut slot = self.inner.db.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let config = self.config();
        let params = config
            .source
            .connect_params()
            .map_err(|e| PageError::Unavailable(e.to_string()))?;
        let client = crate::db::connect_ordinary(&params)
            .await
            .map_err(|e| PageError::Unavailable(e.message))?;
        client
            .batch_execute(SESSION_SETTINGS)
            .await
            .map_err(|e| PageError::Unavailable(e.to_string()))?;
        let client = Arc::new(client);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// `[source] system_name`, else the database name: the `sourceSystem` of payloads.
    fn source_system(&self) -> String {
        self.config().source.source_system()
    }
}

/// Why a page could not be shown.
#[derive(Debug)]
enum PageError {
    /// The database cannot be reached (or refused the query).
    Unavailable(String),
    /// The request names something that does not exist or is malformed.
    NotFound(String),
    /// The request is malformed.
    BadRequest(String),
}

impl From<QueueError> for PageError {
    fn from(e: QueueError) -> Self {
        PageError::Unavailable(e.to_string())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            PageError::Unavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("The queue database cannot be read right now: {m}"),
            ),
            PageError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            PageError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
        };
        layout::error_page(status, None, &message)
    }
}

/// The console's routes, all under `/ui`; merge them into the admin router.
pub fn router(deps: ConsoleDeps) -> Router {
    let console = Console {
        inner: Arc::new(Inner {
            deps,
            sessions: auth::Sessions::default(),
            test_results: test_send::TestResults::default(),
            db: Mutex::new(None),
        }),
    };
    Router::new()
        .route("/ui", get(overview::page))
        .route("/ui/", get(overview::page))
        .route("/ui/login", get(auth::login_form).post(auth::login))
        .route("/ui/logout", post(auth::logout))
        .route("/ui/notifications", get(notifications::page))
        .route("/ui/notifications/{id}", get(notifications::by_id))
        .route("/ui/events/{id}", get(event::page))
        .route("/ui/failed", get(failed::page))
        .route("/ui/failed/retry", post(failed::retry))
        .route("/ui/failed/discard", post(failed::discard))
        .route("/ui/listeners", get(listeners::page))
        .route("/ui/listeners/test", post(test_send::send))
        .route("/ui/static/console.css", get(layout::css))
        .route("/ui/static/console.js", get(layout::js))
        .route("/ui/{*rest}", any(not_found))
        .layer(axum::middleware::from_fn_with_state(console.clone(), gate))
        .with_state(console)
}

/// The hint `/ui` answers with while the console is off.
pub const OFF_HINT: &str = "the web console is off: set token_file in the [admin] section of walhook's configuration (see config.example.toml) and reload";

/// Turns the console off without a token and adds the security headers to every answer.
async fn gate(State(console): State<Console>, req: Request, next: Next) -> Response {
    if console.token().is_none() {
        return auth::refuse(StatusCode::NOT_FOUND, OFF_HINT);
    }
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not no-referrer: with it browsers send `Origin: null` on POST, which the same-origin
        // check must refuse.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn not_found(viewer: auth::Viewer) -> Response {
    layout::error_page(
        StatusCode::NOT_FOUND,
        Some(&viewer),
        "There is no such page in the console.",
    )
}

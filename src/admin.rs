//! The HTTP admin endpoint (`[admin] listen`): `/metrics`, `/healthz`, `/readyz`.
//!
//! [`router`] builds the routes so that later features can `merge` their own routes into
//! the same server before [`serve_router`] runs it: the service merges the web console's
//! (`crate::console`, under `/ui`); endpoint-validation callbacks will follow.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{Classify, ErrorClass};
use crate::liveness::Beat;
use crate::metrics::Metrics;

/// Content type of the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of the admin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listen address cannot be bound (in use, not on this host, privileged port).
    /// Transient: whatever holds the port may let go, and capture does not need it.
    #[error(
        "cannot listen on {listen} for [admin]: {reason}; stop what holds the address or change [admin] listen"
    )]
    Bind {
        /// The configured address.
        listen: SocketAddr,
        /// Plain-words reason derived from the OS error.
        reason: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped on an I/O error after it started.
    #[error("admin endpoint stopped: {0}")]
    Serve(#[source] std::io::Error),
}

impl Classify for AdminError {
    fn class(&self) -> ErrorClass {
        match self {
            AdminError::Bind { .. } => ErrorClass::Transient,
            AdminError::Serve(_) => ErrorClass::Transient,
        }
    }
}

/// Readiness inputs, updated by the replication loop and the gauge refresher.
#[derive(Debug)]
pub struct Health {
    streaming: AtomicBool,
    queue_reachable: AtomicBool,
    /// Why capture is not streaming; kept apart from the queue's error so that neither
    /// hides the other (a dead network path ends both with different words).
    capture_error: Mutex<Option<String>>,
    queue_error: Mutex<Option<String>>,
    capture: Beat,
    delivery: Beat,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            streaming: AtomicBool::new(false),
            queue_reachable: AtomicBool::new(false),
            capture_error: Mutex::new(None),
            queue_error: Mutex::new(None),
            capture: Beat::new("capture"),
            delivery: Beat::new("delivery"),
        }
    }
}

impl Health {
    /// Not streaming, queue not yet reached, no error.
    pub fn new() -> Health {
        Health::default()
    }

    /// The sign of life of the replication stream: stamped by every byte the server sends.
    pub fn capture_beat(&self) -> Beat {
        self.capture.clone()
    }

    /// The sign of life of delivery: stamped each time a claim loop goes round.
    pub fn delivery_beat(&self) -> Beat {
        self.delivery.clone()
    }

    /// Why the daemon is stuck, when it is: fed to the systemd watchdog.
    pub fn stalled(&self) -> Option<String> {
        let stalls: Vec<String> = [&self.capture, &self.delivery]
            .iter()
            .filter_map(|b| b.stall_message())
            .collect();
        (!stalls.is_empty()).then(|| stalls.join("; "))
    }

    /// Whether the replication stream is streaming; streaming clears the capture error.
    pub fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Relaxed);
        if streaming {
            self.set_capture_error(None);
        }
    }

    /// Whether the last query on the queue database succeeded; success clears its error.
    pub fn set_queue_reachable(&self, reachable: bool) {
        self.queue_reachable.store(reachable, Ordering::Relaxed);
        if reachable {
            self.set_queue_error(None);
        }
    }

    /// Why capture stopped, in plain words (`None` clears it); shown by `/readyz`.
    pub fn set_capture_error(&self, error: Option<String>) {
        *self.capture_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Why the queue database is not reachable (`None` clears it); shown by `/readyz`.
    pub fn set_queue_error(&self, error: Option<String>) {
        *self.queue_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Whether the replication stream is streaming.
    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// Whether the queue database answered the last query.
    pub fn queue_reachable(&self) -> bool {
        self.queue_reachable.load(Ordering::Relaxed)
    }

    /// `Ok(())` when ready, else one line: each reason with the error behind it.
    pub fn readiness(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if !self.streaming() {
            reasons.push(with_error(
                "replication is not streaming",
                &self.capture_error,
            ));
        }
        if !self.queue_reachable() {
            reasons.push(with_error(
                "queue database is not reachable",
                &self.queue_error,
            ));
        }
        if let Some(s) = self.stalled() {
            reasons.push(s);
        }
        if reasons.is_empty() {
            return Ok(());
        }
        Err(reasons.join("; "))
    }
}

/// `reason: error` when an error is known; the line stays one line whatever the error holds.
fn with_error(reason: &str, error: &Mutex<Option<String>>) -> String {
    match error.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
        Some(e) => format!("{reason}: {}", e.replace(['\r', '\n'], " ")),
        None => reason.to_owned(),
    }
}

/// Shared state of the admin routes.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The process metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness inputs.
    pub health: Arc<Health>,
}

/// The admin routes: `/metrics`, `/healthz`, `/readyz`; merge further routes into it.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics_handler(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

/// Binds `listen`, turning OS errors into a [`AdminError::Bind`] that names the fix.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(listen).await.map_err(|source| {
        let reason = match source.kind() {
            std::io::ErrorKind::AddrInUse => "address in use".to_owned(),
            std::io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges)".to_owned()
            }
            _ => source.to_string(),
        };
        AdminError::Bind {
            listen,
            reason,
            source,
        }
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until `shutdown` is cancelled.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    let listener = bind(listen).await?;
    serve_router(listener, router(AdminState { metrics, health }), shutdown).await
}

/// How long the daemon waits before it tries again to bind the admin address.
pub const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Binds `listen` and serves `app` until `shutdown` is cancelled. While the address cannot
/// be bound, tries again every `retry`, with one warning per run of failures: the daemon
/// captures and delivers without its metrics rather than stopping for them.
pub async fn serve_retrying(
    listen: SocketAddr,
    app: Router,
    retry: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut warned = false;
    loop {
        match bind(listen).await {
            Ok(listener) => {
                if warned {
                    tracing::info!(%listen, "admin endpoint: {listen} is free again");
                }
                if let Err(e) = serve_router(listener, app, shutdown).await {
                    tracing::warn!("admin endpoint stopped: {e}");
                }
                return;
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(
                    "{e}; walhook keeps capturing and delivering and tries again every {}s",
                    retry.as_secs()
                );
            }
            Err(e) => tracing::debug!("{e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Serves `app` on an already bound listener until `shutdown` is cancelled.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), AdminError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint listening");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(AdminError::Serve)
}

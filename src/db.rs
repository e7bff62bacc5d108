//! Ordinary (non-replication) connections: tokio-postgres over the same transport as the
//! replication connection, so TLS (with SCRAM channel binding), keepalives, the password
//! rules and the session timeouts are the same on every connection walhook opens.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_postgres::config::{SslMode as PgSslMode, SslNegotiation as PgNegotiation};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

use crate::error::{Classify, ErrorClass};
use crate::replication::conn::{ConnectParams, TlsInfo};
use crate::replication::transport::{self, Attempt, PgStream, TransportError};

/// The source database's connection parameters, following reloads: every new connection
/// uses the parameters current at that moment, connections already open stay as they are.
#[derive(Clone, Debug)]
pub(crate) struct Source(watch::Receiver<Arc<ConnectParams>>);

impl Source {
    /// Parameters replaced by whoever holds the sender (the service, on reload).
    pub(crate) fn following(rx: watch::Receiver<Arc<ConnectParams>>) -> Source {
        Source(rx)
    }

    /// The parameters as they are now.
    pub(crate) fn current(&self) -> Arc<ConnectParams> {
        self.0.borrow().clone()
    }

    /// Opens an ordinary connection with the current parameters.
    pub(crate) async fn connect(
        &self,
    ) -> Result<tokio_postgres::Client, crate::error::ServiceError> {
        let params = self.current();
        connect_ordinary(&params).await
    }
}

/// A tokio-postgres connection over walhook's transport; drive it (await it) in a task.
pub type PgConnection = tokio_postgres::Connection<Guarded, Established>;

/// Why an ordinary connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The socket could not be opened, or TLS could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server asked for a readable password over TCP without TLS.
    #[error("{0}")]
    InsecurePassword(String),
    /// Connecting took longer than the connect timeout.
    #[error("no answer from PostgreSQL at {addr} within {}s; check the host, port and firewall", .timeout.as_secs())]
    Timeout {
        addr: String,
        timeout: std::time::Duration,
    },
    /// The server refused the session (password, pg_hba.conf, missing database…).
    #[error("{message} ({addr}){fix}")]
    Refused {
        addr: String,
        message: String,
        fix: &'static str,
        class: ErrorClass,
        sqlstate: String,
    },
    /// The driver failed otherwise (connection lost during startup, protocol error,
    /// channel binding missing).
    #[error("cannot connect to PostgreSQL at {addr}: {detail}")]
    Driver {
        addr: String,
        /// The driver's message with its cause.
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl Classify for DbError {
    fn class(&self) -> ErrorClass {
        match self {
            DbError::Transport(e) => e.class(),
            DbError::InsecurePassword(_) => ErrorClass::Config,
            DbError::Timeout { .. } => ErrorClass::Transient,
            // The driver refusing the server's authentication (channel binding missing,
            // no password) is a setting to fix; anything else may pass.
            DbError::Driver { detail, .. }
                if detail.starts_with("authentication error")
                    || detail.starts_with("invalid configuration") =>
            {
                ErrorClass::Config
            }
            DbError::Driver { .. } => ErrorClass::Transient,
            DbError::Refused { class, .. } => *class,
        }
    }
}

impl DbError {
    /// libpq's `allow` / `prefer` retry the other way after these (see the replication
    /// connection for the same rule).
    fn worth_other_sslmode(&self) -> bool {
        match self {
            DbError::Transport(TransportError::Handshake { .. }) => true,
            DbError::Refused {
                sqlstate, message, ..
            } => sqlstate == "28000" && message.contains("pg_hba.conf"),
            _ => false,
        }
    }
}

/// [`connect`] for the daemon's loops, with their error type.
pub(crate) async fn connect_ordinary(
    params: &ConnectParams,
) -> Result<tokio_postgres::Client, crate::error::ServiceError> {
    connect(params)
        .await
        .map_err(crate::error::ServiceError::from_err)
}

/// Opens an ordinary connection and drives it in a background task.
pub async fn connect(params: &ConnectParams) -> Result<tokio_postgres::Client, DbError> {
    let (client, conn, _) = connect_raw(params).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

/// Opens an ordinary connection; the caller drives the connection. Also returns what TLS
/// negotiated (`None`: not encrypted).
pub async fn connect_raw(
    params: &ConnectParams,
) -> Result<(tokio_postgres::Client, PgConnection, Option<TlsInfo>), DbError> {
    let timeout = params.connect_timeout();
    let attempt_all = async {
        let mut attempts = transport::attempts(params).into_iter().peekable();
        let mut last = None;
        while let Some(attempt) = attempts.next() {
            match connect_once(params, attempt).await {
                Err(e) if attempts.peek().is_some() && e.worth_other_sslmode() => {
                    tracing::debug!(server = %params.host_description(), error = %e, "trying the other sslmode");
                    last = Some(e);
                }
                done => return done,
            }
        }
        Err(last.unwrap_or(DbError::Timeout {
            addr: params.host_description(),
            timeout,
        }))
    };
    tokio::time::timeout(timeout, attempt_all)
        .await
        .unwrap_or_else(|_| {
            Err(DbError::Timeout {
                addr: params.host_description(),
                timeout,
            })
        })
}

async fn connect_once(
    params: &ConnectParams,
    attempt: Attempt,
) -> Result<(tokio_postgres::Client, PgConnection, Option<TlsInfo>), DbError> {
    let opened = transport::open(params, attempt).await?;
    let refused: Arc<Mutex<Option<&'static str>>> = Arc::default();
    let guard = (opened.stream.is_plain_tcp() && !params.policy().allow_insecure_password)
        .then(AuthGuard::default);
    let stream = Guarded {
        inner: opened.stream,
        guard,
        refused: refused.clone(),
    };
    let mut cfg = params.to_tokio_postgres();
    if opened.tls.is_some() {
        // TLS is already up: tokio-postgres takes the stream as is through `PassThrough`,
        // and still gets the channel binding data from it.
        cfg.ssl_mode(PgSslMode::Require)
            .ssl_negotiation(PgNegotiation::Direct);
    } else {
        cfg.ssl_mode(PgSslMode::Disable);
    }
    match cfg.connect_raw(stream, PassThrough).await {
        Ok((client, conn)) => Ok((client, conn, opened.tls)),
        Err(e) => {
            let method = *refused.lock().unwrap_or_else(|p| p.into_inner());
            match method.and_then(|m| transport::insecure_password_refusal(params, true, m)) {
                Some(msg) => Err(DbError::InsecurePassword(msg)),
                None => Err(classify(e, params)),
            }
        }
    }
}

fn classify(e: tokio_postgres::Error, params: &ConnectParams) -> DbError {
    let addr = params.redacted();
    let Some(db) = e.as_db_error() else {
        let detail = match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        };
        return DbError::Driver {
            addr,
            detail,
            source: e,
        };
    };
    let code = db.code().code();
    let fix = match code {
        "28P01" => {
            "; check the password in [source] (url, password or password_file), PGPASSWORD or ~/.pgpass"
        }
        "28000" => "; allow this user, database and address in the server's pg_hba.conf",
        "3D000" => "; fix the database name in [source] url",
        "42501" => "; grant the role the privilege named above",
        _ => "",
    };
    DbError::Refused {
        addr,
        message: db.message().to_owned(),
        fix,
        class: crate::error::sqlstate_class(code),
        sqlstate: code.to_owned(),
    }
}

/// The sessions `pg_blocking_pids` names for backend $1, longest-running transaction first.
const SQL_BLOCKERS: &str = "SELECT a.pid, a.backend_xid::text, coalesce(a.state, ''), \
     coalesce(a.application_name, ''), coalesce(a.usename::text, ''), \
     coalesce(extract(epoch FROM now() - a.xact_start)::int8, 0), \
     left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 100) \
     FROM pg_stat_activity a WHERE a.pid = ANY (pg_blocking_pids($1)) \
     ORDER BY a.xact_start NULLS LAST LIMIT 3";

/// A statement waiting this long gets its blockers looked up and logged.
const WATCH_AFTER: std::time::Duration = std::time::Duration::from_secs(3);
/// How often the blockers are looked up again while the statement waits.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The backend process id of `client`'s session.
pub async fn backend_pid(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .ok()?
        .try_get(0)
        .ok()
}

/// Runs `work` (a statement on the session with process id `pid`); when it waits longer
/// than a few seconds, looks up on a second connection which sessions block it and logs
/// them once ("{what} is waiting for transaction 1234 of pid 567 …"). Returns the outcome
/// and the last blockers seen, for the error message when a lock or statement timeout
/// ends the wait.
pub async fn watch_blockers<T>(
    params: &ConnectParams,
    pid: i32,
    what: &str,
    work: impl std::future::Future<Output = T>,
) -> (T, Option<String>) {
    let seen: Mutex<Option<String>> = Mutex::new(None);
    let watcher = async {
        tokio::time::sleep(WATCH_AFTER).await;
        let mut side: Option<tokio_postgres::Client> = None;
        loop {
            if side.as_ref().is_none_or(|c| c.is_closed()) {
                side = connect(params).await.ok();
            }
            if let Some(c) = &side
                && let Some(found) = blockers(c, pid).await
            {
                let mut last = seen.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(found.as_str()) {
                    tracing::warn!("{what} is waiting for {found}; end that transaction, or wait");
                    *last = Some(found);
                }
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    };
    let outcome = tokio::select! {
        done = work => done,
        never = watcher => never,
    };
    let last = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
    (outcome, last)
}

/// One phrase naming the sessions that block `pid`, or `None` when nothing does.
async fn blockers(client: &tokio_postgres::Client, pid: i32) -> Option<String> {
    let rows = client.query(SQL_BLOCKERS, &[&pid]).await.ok()?;
    let described: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let pid: i32 = r.try_get(0).ok()?;
            let xid: Option<String> = r.try_get(1).ok()?;
            let state: String = r.try_get(2).ok()?;
            let app: String = r.try_get(3).ok()?;
            let user: String = r.try_get(4).ok()?;
            let secs: i64 = r.try_get(5).ok()?;
            let query: String = r.try_get(6).ok()?;
            let who = match xid {
                Some(x) => format!("transaction {x} of pid {pid}"),
                None => format!("pid {pid}"),
            };
            Some(format!(
                "{who} (user {user}, application \"{app}\", {state} for {secs}s, last query: {query})"
            ))
        })
        .collect();
    (!described.is_empty()).then(|| described.join("; "))
}

/// The socket as tokio-postgres sees it. On unencrypted TCP it watches the server's
/// authentication request and fails the read, before the driver sees it, when the server
/// asks for a cleartext or md5 password.
pub struct Guarded {
    inner: PgStream,
    guard: Option<AuthGuard>,
    refused: Arc<Mutex<Option<&'static str>>>,
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(guard)) = (&polled, this.guard.as_mut()) {
            let new = &buf.filled()[before..];
            if let Some(method) = guard.inspect(new) {
                *this.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(method);
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "password request over unencrypted TCP refused",
                )));
            }
            if guard.done {
                this.guard = None;
            }
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A stream whose TLS session walhook already set up, handed to tokio-postgres.
pub struct Established(Guarded);

impl TlsStream for Established {
    fn channel_binding(&self) -> ChannelBinding {
        match self.0.inner.channel_binding() {
            Some(data) => ChannelBinding::tls_server_end_point(data),
            None => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for Established {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Established {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The "TLS connector" for a stream that is already encrypted (or never will be).
struct PassThrough;

impl TlsConnect<Guarded> for PassThrough {
    type Stream = Established;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Established, io::Error>>;

    fn connect(self, stream: Guarded) -> Self::Future {
        std::future::ready(Ok(Established(stream)))
    }
}

/// Follows the backend messages of the startup phase far enough to see the
/// authentication request: header (type byte + length), then the request code.
#[derive(Debug, Default)]
struct AuthGuard {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    code: [u8; 4],
    code_len: usize,
    /// Authentication is over (or the stream is not what we expect): stop looking.
    done: bool,
}

impl AuthGuard {
    /// Feeds bytes from the server; the method name when one asks for a readable password.
    fn inspect(&mut self, bytes: &[u8]) -> Option<&'static str> {
        let mut rest = bytes;
        while !self.done && !rest.is_empty() {
            if self.header_len < 5 {
                self.header[self.header_len] = rest[0];
                self.header_len += 1;
                rest = &rest[1..];
                if self.header_len == 5 {
                    let [_, a, b, c, d] = self.header;
                    match usize::try_from(i32::from_be_bytes([a, b, c, d])) {
                        Ok(len) if len >= 4 => self.body_left = len - 4,
                        // Garbage: the driver reports it; nothing more to guard.
                        _ => self.done = true,
                    }
                    self.code_len = 0;
                    if self.body_left == 0 {
                        self.header_len = 0;
                    }
                }
                continue;
            }
            if self.header[0] == b'R' && self.code_len < 4 {
                self.code[self.code_len] = rest[0];
                self.code_len += 1;
                self.body_left -= 1;
                rest = &rest[1..];
                if self.code_len == 4 {
                    match i32::from_be_bytes(self.code) {
                        0 => self.done = true,
                        3 => return Some("a cleartext password"),
                        5 => return Some("md5"),
                        _ => {}
                    }
                }
            } else {
                let skip = self.body_left.min(rest.len());
                self.body_left -= skip;
                rest = &rest[skip..];
            }
            if self.body_left == 0 {
                self.header_len = 0;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(i32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn feed_bytewise(bytes: &[u8]) -> (Option<&'static str>, bool) {
        let mut g = AuthGuard::default();
        for b in bytes {
            if let Some(m) = g.inspect(std::slice::from_ref(b)) {
                return (Some(m), g.done);
            }
        }
        (None, g.done)
    }

    #[test]
    fn guard_spots_cleartext_and_md5_requests_however_the_bytes_are_split() {
        let clear = msg(b'R', &3i32.to_be_bytes());
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend_from_slice(b"salt");
        let md5 = msg(b'R', &md5);
        for (wire, want) in [(clear, "a cleartext password"), (md5, "md5")] {
            assert_eq!(AuthGuard::default().inspect(&wire), Some(want));
            assert_eq!(feed_bytewise(&wire).0, Some(want));
        }
    }

    #[test]
    fn guard_lets_scram_and_trust_through_and_then_stops_looking() {
        let mut sasl = 10i32.to_be_bytes().to_vec();
        sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
        let mut wire = msg(b'N', b"Snotice\0\0");
        wire.extend(msg(b'R', &sasl));
        wire.extend(msg(b'R', &11i32.to_be_bytes()));
        wire.extend(msg(b'R', &12i32.to_be_bytes()));
        wire.extend(msg(b'R', &0i32.to_be_bytes()));
        // After AuthenticationOk nothing is inspected, not even a look-alike.
        wire.extend(msg(b'R', &3i32.to_be_bytes()));
        assert_eq!(AuthGuard::default().inspect(&wire), None);
        assert_eq!(feed_bytewise(&wire), (None, true));
    }

    #[test]
    fn guard_gives_up_on_garbage_without_panicking() {
        let mut g = AuthGuard::default();
        assert_eq!(g.inspect(&[b'R', 0xff, 0xff, 0xff, 0xff, 3, 3, 3]), None);
        assert!(g.done);
        let mut g = AuthGuard::default();
        assert_eq!(g.inspect(&[b'R', 0, 0, 0, 2]), None);
        assert!(g.done);
    }
}

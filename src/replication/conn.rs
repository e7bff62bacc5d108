//! The replication connection, built on postgres-protocol (tokio-postgres has no replication mode).
//!
//! [`ReplicationConnection`] opens a `replication=database` session over the stream
//! [`super::transport`] opens (TLS as the sslmode asks), authenticates (SCRAM with channel
//! binding when TLS is on), runs replication commands, and turns into a
//! [`ReplicationStream`] with START_REPLICATION.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Classify, ErrorClass, sqlstate_class};
use crate::liveness::Beat;
use crate::replication::protocol::{self, AuthRequest, BackendFrame, ProtocolError, ServerMessage};
use crate::replication::transport::{self, PgStream, TransportError};
use crate::replication::version::{self, ServerVersion};
use crate::types::{Lsn, quote_ident, quote_literal};

pub use super::conninfo::{
    ChannelBindingMode, ConnError, ConnPolicy, ConnectParams, DEFAULT_APPLICATION_NAME,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECEIVE_TIMEOUT, DEFAULT_SOCKET_DIR, Host, PasswordSource,
    RootCert, SslMode,
};
pub use super::stream::ReplicationStream;
pub use super::tls::{TlsInfo, Verification};

/// The authentication method the server asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// No password was asked for.
    Trust,
    /// Cleartext password (`password` in pg_hba.conf).
    Cleartext,
    /// MD5 challenge.
    Md5,
    /// SCRAM-SHA-256 without channel binding.
    ScramSha256,
    /// SCRAM-SHA-256-PLUS: bound to the TLS channel (`tls-server-end-point`).
    ScramSha256Plus,
}

impl AuthMethod {
    fn name(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Cleartext => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "SCRAM-SHA-256",
            AuthMethod::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
        }
    }
}

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The connection parameters are unusable.
    #[error(transparent)]
    Params(#[from] ConnError),
    /// The server rejected the password.
    #[error(
        "password authentication failed for user \"{user}\" on {addr} (password from {from}); check the password in [source] (url, password or password_file), PGPASSWORD or ~/.pgpass"
    )]
    PasswordFailed {
        user: String,
        addr: String,
        from: PasswordSource,
    },
    /// The server asked for a password and none was configured.
    #[error(
        "the server at {addr} asks for a password for user \"{user}\" but none was given; set one in [source] (url, password or password_file), PGPASSWORD or ~/.pgpass"
    )]
    PasswordMissing { user: String, addr: String },
    /// The role may not open replication connections.
    #[error("role \"{user}\" lacks the REPLICATION attribute; run: ALTER ROLE {} REPLICATION;", sql_ident(.user))]
    NoReplicationRole { user: String },
    /// The database does not exist.
    #[error(
        "database \"{dbname}\" does not exist on {addr}; fix dbname in the [source] url or create the database"
    )]
    DatabaseMissing { dbname: String, addr: String },
    /// pg_hba.conf has no line allowing this connection.
    #[error(
        "the server at {addr} rejected the connection: {message}; add a pg_hba.conf line for user \"{user}\" and database \"{dbname}\" (logical replication connections match the database name, not the \"replication\" keyword) and reload the server"
    )]
    HbaRejected {
        addr: String,
        user: String,
        dbname: String,
        message: String,
    },
    /// The server refused the login for another reason (e.g. the role does not exist).
    #[error("the server at {addr} refused the login of user \"{user}\": {message}")]
    LoginRefused {
        addr: String,
        user: String,
        message: String,
    },
    /// The server wants an authentication method walhook does not implement.
    #[error(
        "the server at {addr} asks for {method} authentication, which walhook does not support; use scram-sha-256, md5, password or trust for this user in pg_hba.conf"
    )]
    UnsupportedAuth { addr: String, method: String },
    /// The SCRAM exchange failed (bad server proof or malformed challenge).
    #[error("SCRAM authentication with {addr} failed: {reason}")]
    Scram { addr: String, reason: String },
    /// The socket could not be opened, or TLS could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server asked for a readable password over TCP without TLS.
    #[error("{0}")]
    InsecurePassword(String),
    /// channel_binding=require, and the server did not offer SCRAM with channel binding.
    #[error(
        "the server at {addr} authenticated without channel binding ({method}), but channel_binding=require; use scram-sha-256 in pg_hba.conf with TLS on"
    )]
    ChannelBindingMissing { addr: String, method: &'static str },
    /// The server version is older than walhook supports.
    #[error(
        "the server at {addr} runs PostgreSQL {version}; walhook supports PostgreSQL {min} and newer, upgrade the server"
    )]
    UnsupportedServer {
        addr: String,
        version: String,
        min: u32,
    },
    /// The replication stream was silent longer than the receive timeout.
    #[error(
        "nothing received from {addr} for {}s (receive_timeout); the connection is presumed dead and will be rebuilt", .after.as_secs()
    )]
    ReceiveTimeout { addr: String, after: Duration },
    /// Connecting and authenticating took longer than the connect timeout.
    #[error("connecting to {addr} timed out after {}s; check the host, port and firewall", .timeout.as_secs())]
    Timeout { addr: String, timeout: Duration },
    /// Reading or writing the established connection failed (e.g. connection reset).
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The server closed the connection without saying why.
    #[error("the server at {addr} closed the connection unexpectedly")]
    Closed { addr: String },
    /// A message from the server was malformed.
    #[error("{addr}: {source}")]
    Protocol {
        addr: String,
        #[source]
        source: ProtocolError,
    },
    /// A well-formed message arrived where the protocol does not allow it.
    #[error("unexpected '{tag}' message from the server at {addr} while {during}")]
    Unexpected {
        addr: String,
        tag: char,
        during: &'static str,
    },
    /// A replication command's reply did not have the expected shape.
    #[error("unexpected reply to {command} from {addr}: {reason}")]
    BadReply {
        addr: String,
        command: &'static str,
        reason: String,
    },
    /// An ErrorResponse not covered by a more specific variant.
    #[error("{addr}: {} (SQLSTATE {}){}{}", .error.message, .error.code,
        .error.detail.as_ref().map(|d| format!("; {d}")).unwrap_or_default(),
        .error.hint.as_ref().map(|h| format!("; hint: {h}")).unwrap_or_default())]
    Server {
        addr: String,
        error: Box<ServerMessage>,
    },
}

impl ReplicationError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. } => Some(&error.code),
            ReplicationError::PasswordFailed { .. } => Some("28P01"),
            ReplicationError::NoReplicationRole { .. } => Some("42501"),
            ReplicationError::DatabaseMissing { .. } => Some("3D000"),
            ReplicationError::HbaRejected { .. } | ReplicationError::LoginRefused { .. } => {
                Some("28000")
            }
            _ => None,
        }
    }

    /// libpq's `allow` / `prefer` retry the other way after these: the server refused this
    /// kind of connection (`hostssl` / `hostnossl` lines), or the TLS handshake failed.
    fn worth_other_sslmode(&self) -> bool {
        matches!(
            self,
            ReplicationError::HbaRejected { .. }
                | ReplicationError::Transport(TransportError::Handshake { .. })
        )
    }
}

impl Classify for ReplicationError {
    fn class(&self) -> ErrorClass {
        use ReplicationError as E;
        match self {
            E::Params(e) => e.class(),
            E::Transport(e) => e.class(),
            E::InsecurePassword(_)
            | E::ChannelBindingMissing { .. }
            | E::UnsupportedServer { .. } => ErrorClass::Config,
            E::ReceiveTimeout { .. } => ErrorClass::Transient,
            E::PasswordFailed { .. }
            | E::PasswordMissing { .. }
            | E::DatabaseMissing { .. }
            | E::HbaRejected { .. }
            | E::LoginRefused { .. }
            | E::UnsupportedAuth { .. }
            | E::Scram { .. } => ErrorClass::Config,
            E::NoReplicationRole { .. } => ErrorClass::Permanent,
            E::Timeout { .. }
            | E::Io { .. }
            | E::Closed { .. }
            | E::Protocol { .. }
            | E::Unexpected { .. }
            | E::BadReply { .. } => ErrorClass::Transient,
            E::Server { error, .. } => sqlstate_class(&error.code),
        }
    }
}

/// An identifier as a DBA would type it: bare when that is unambiguous, quoted otherwise.
fn sql_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        name.to_owned()
    } else {
        quote_ident(name)
    }
}

/// The socket with its buffers; shared by the command and streaming phases.
pub(crate) struct Wire {
    io: PgStream,
    rbuf: BytesMut,
    /// Bytes queued for the server; a cancelled write leaves the rest here, so a message
    /// is never cut in half.
    wbuf: BytesMut,
    pub(crate) addr: String,
    /// Stamped whenever bytes arrive.
    beat: Option<Beat>,
}

impl Wire {
    fn new(io: PgStream, addr: String) -> Wire {
        Wire {
            io,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::new(),
            addr,
            beat: None,
        }
    }

    pub(crate) fn set_beat(&mut self, beat: Beat) {
        self.beat = Some(beat);
    }

    /// Removes a complete message from the read buffer, if one is there.
    pub(crate) fn take_frame(&mut self) -> Result<Option<BackendFrame>, ReplicationError> {
        protocol::take_frame(&mut self.rbuf).map_err(|e| self.protocol(e))
    }

    /// Reads once from the socket into the buffer. Cancel-safe: `read_buf` either appends
    /// bytes or is dropped before reading any.
    pub(crate) async fn fill(&mut self) -> Result<(), ReplicationError> {
        self.rbuf.reserve(8 * 1024);
        let n = self
            .io
            .read_buf(&mut self.rbuf)
            .await
            .map_err(|e| self.io_error(e))?;
        if n == 0 {
            return Err(ReplicationError::Closed {
                addr: self.addr.clone(),
            });
        }
        if let Some(beat) = &self.beat {
            beat.stamp();
        }
        Ok(())
    }

    /// Reads one complete backend message. Cancel-safe: a partial message stays in `rbuf`.
    pub(crate) async fn read_frame(&mut self) -> Result<BackendFrame, ReplicationError> {
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Queues `bytes` and writes everything queued.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.queue(bytes);
        self.flush_pending().await
    }

    /// Queues `bytes` for the next [`Self::flush_pending`].
    pub(crate) fn queue(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Writes what is queued. Cancel-safe: each `write` either takes bytes (dropped from
    /// the queue) or none.
    pub(crate) async fn flush_pending(&mut self) -> Result<(), ReplicationError> {
        while !self.wbuf.is_empty() {
            let n = self
                .io
                .write(&self.wbuf)
                .await
                .map_err(|e| self.io_error(e))?;
            if n == 0 {
                return Err(self.io_error(std::io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        self.io.flush().await.map_err(|e| self.io_error(e))
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }

    fn io_error(&self, source: std::io::Error) -> ReplicationError {
        ReplicationError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    pub(crate) fn protocol(&self, source: ProtocolError) -> ReplicationError {
        ReplicationError::Protocol {
            addr: self.addr.clone(),
            source,
        }
    }

    pub(crate) fn unexpected(&self, tag: u8, during: &'static str) -> ReplicationError {
        ReplicationError::Unexpected {
            addr: self.addr.clone(),
            tag: char::from(tag),
            during,
        }
    }

    pub(crate) fn server_error(&self, body: &[u8]) -> ReplicationError {
        match protocol::parse_server_message(b'E', body) {
            Ok(error) => ReplicationError::Server {
                addr: self.addr.clone(),
                error: Box::new(error),
            },
            Err(e) => self.protocol(e),
        }
    }

    pub(crate) fn log_notice(&self, body: &[u8]) {
        if let Ok(n) = protocol::parse_server_message(b'N', body) {
            tracing::debug!(server = %self.addr, severity = %n.severity, code = %n.code, "{}", n.message);
        }
    }
}

/// What IDENTIFY_SYSTEM reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (a 64-bit number as text).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database of this connection (None for physical replication connections).
    pub dbname: Option<String>,
}

/// An authenticated `replication=database` session, ready for replication commands.
pub struct ReplicationConnection {
    wire: Wire,
    auth_method: AuthMethod,
    server_params: HashMap<String, String>,
    tls: Option<TlsInfo>,
    backend_pid: Option<i32>,
    receive_timeout: Duration,
}

const IDENTIFY_SYSTEM: &str = "IDENTIFY_SYSTEM";
/// SQLSTATE duplicate_object: the slot already exists.
const DUPLICATE_OBJECT: &str = "42710";

impl ReplicationConnection {
    /// Connects, authenticates and waits until the server is ready for commands; with
    /// `sslmode=allow` or `prefer` a refused first attempt is followed by the other kind,
    /// as libpq does.
    pub async fn connect(
        params: &ConnectParams,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let timeout = params.connect_timeout;
        let attempt_all = async {
            let mut attempts = transport::attempts(params).into_iter().peekable();
            while let Some(attempt) = attempts.next() {
                match Self::connect_once(params, attempt).await {
                    Err(e) if attempts.peek().is_some() && e.worth_other_sslmode() => {
                        tracing::debug!(server = %params.host_description(), error = %e, "trying the other sslmode");
                    }
                    done => return done,
                }
            }
            Err(ReplicationError::Closed {
                addr: params.host_description(),
            })
        };
        match tokio::time::timeout(timeout, attempt_all).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Timeout {
                addr: params.host_description(),
                timeout,
            }),
        }
    }

    async fn connect_once(
        params: &ConnectParams,
        attempt: transport::Attempt,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let opened = transport::open(params, attempt).await?;
        let auth = Auth::new(params, &opened.stream);
        let mut wire = Wire::new(opened.stream, params.host_description());

        let mut startup: Vec<(&str, &str)> = vec![
            ("user", &params.user),
            ("database", &params.dbname),
            ("replication", "database"),
            ("application_name", &params.application_name),
            ("client_encoding", "UTF8"),
        ];
        if let Some(o) = &params.options {
            startup.push(("options", o));
        }
        let mut out = BytesMut::new();
        frontend::startup_message(startup, &mut out).map_err(|e| {
            ReplicationError::Params(ConnError::InvalidKeyValue(format!(
                "a connection parameter cannot be sent: {e}"
            )))
        })?;
        wire.send(&out).await?;
        let (auth_method, server_params, backend_pid) = run_startup(&mut wire, auth).await?;
        tracing::debug!(server = %wire.addr, user = %params.user, ?auth_method, tls = opened.tls.is_some(), "replication connection established");
        Ok(ReplicationConnection {
            wire,
            auth_method,
            server_params,
            tls: opened.tls,
            backend_pid,
            receive_timeout: params.policy().receive_timeout,
        })
    }

    /// The authentication method the server asked for.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// What TLS negotiated; `None` for an unencrypted connection.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The process id of the server backend (the walsender), when the server sent it.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// A parameter the server reported at startup (e.g. `server_version`).
    pub fn server_parameter(&self, name: &str) -> Option<&str> {
        self.server_params.get(name).map(String::as_str)
    }

    /// The server version from its startup report, as libpq's `PQserverVersion` reads it.
    pub fn server_version(&self) -> Option<ServerVersion> {
        self.server_parameter("server_version")
            .and_then(ServerVersion::parse)
    }

    /// Runs one command with the simple query protocol and returns the rows in text form.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| ReplicationError::BadReply {
            addr: self.wire.addr.clone(),
            command: "query",
            reason: format!("cannot send the query: {e}"),
        })?;
        self.wire.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'T' => {
                    protocol::parse_row_description(&frame.body)
                        .map_err(|e| self.wire.protocol(e))?;
                }
                b'D' => rows.push(
                    protocol::parse_data_row(&frame.body).map_err(|e| self.wire.protocol(e))?,
                ),
                b'C' | b'I' | b'S' => {}
                b'E' => error = Some(self.wire.server_error(&frame.body)),
                b'N' => self.wire.log_notice(&frame.body),
                b'Z' => return error.map_or(Ok(rows), Err),
                other => return Err(self.wire.unexpected(other, "running a simple query")),
            }
        }
    }

    /// Runs IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query(IDENTIFY_SYSTEM).await?;
        let bad = |reason: &str| ReplicationError::BadReply {
            addr: self.wire.addr.clone(),
            command: IDENTIFY_SYSTEM,
            reason: reason.to_owned(),
        };
        let row = match rows.as_slice() {
            [row] => row,
            _ => return Err(bad("expected one row")),
        };
        let [system_id, timeline, xlogpos, dbname] = row.as_slice() else {
            return Err(bad("expected four columns"));
        };
        let system_id = system_id.clone().ok_or_else(|| bad("systemid is null"))?;
        let timeline = timeline
            .as_deref()
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(|| bad("timeline is not a number"))?;
        let xlogpos = xlogpos
            .as_deref()
            .and_then(|x| x.parse::<Lsn>().ok())
            .ok_or_else(|| bad("xlogpos is not an LSN"))?;
        Ok(SystemIdentity {
            system_id,
            timeline,
            xlogpos,
            dbname: dbname.clone(),
        })
    }

    /// Creates the logical slot for pgoutput (with `failover` on 17+); returns false when it
    /// already existed.
    pub async fn create_slot_if_missing(&mut self, slot: &str) -> Result<bool, ReplicationError> {
        let version = self.check_server_version()?;
        let sql = version::create_slot_command(version, &quote_ident(slot));
        match self.simple_query(&sql).await {
            Ok(_) => {
                tracing::info!(slot, "created replication slot");
                Ok(true)
            }
            Err(e) if e.sqlstate() == Some(DUPLICATE_OBJECT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Refuses a server older than walhook supports, with one line.
    pub fn check_server_version(&self) -> Result<ServerVersion, ReplicationError> {
        let reported = self.server_parameter("server_version").unwrap_or("unknown");
        match self.server_version() {
            Some(v) if v.is_supported() => Ok(v),
            _ => Err(ReplicationError::UnsupportedServer {
                addr: self.wire.addr.clone(),
                version: reported.to_owned(),
                min: version::MIN_SUPPORTED_MAJOR,
            }),
        }
    }

    /// Starts logical replication from `start` (Lsn::ZERO: the slot's confirmed position),
    /// with the pgoutput options this server version knows.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        let version = self.check_server_version()?;
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(slot),
            version::pgoutput_options(version, &quote_literal(&quote_ident(publication))),
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| ReplicationError::BadReply {
            addr: self.wire.addr.clone(),
            command: "START_REPLICATION",
            reason: format!("cannot send the command: {e}"),
        })?;
        self.wire.send(&out).await?;
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'W' => break,
                b'E' => return Err(self.wire.server_error(&frame.body)),
                b'N' => self.wire.log_notice(&frame.body),
                b'S' => {}
                other => return Err(self.wire.unexpected(other, "starting replication")),
            }
        }
        tracing::debug!(server = %self.wire.addr, slot, %start, publication, "replication started");
        Ok(ReplicationStream::new(self.wire, self.receive_timeout))
    }

    /// Ends the session politely (Terminate), so the server logs no "unexpected EOF".
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        if let Err(e) = self.wire.send(&out).await {
            tracing::debug!(error = %e, "sending Terminate failed");
        }
        self.wire.shutdown().await;
    }
}

/// Reads the startup phase up to ReadyForQuery, answering authentication requests.
async fn run_startup(
    wire: &mut Wire,
    mut auth: Auth<'_>,
) -> Result<(AuthMethod, HashMap<String, String>, Option<i32>), ReplicationError> {
    let mut server_params = HashMap::new();
    let mut backend_pid = None;
    loop {
        let frame = wire.read_frame().await?;
        match frame.tag {
            b'R' => {
                let req =
                    protocol::parse_auth_request(&frame.body).map_err(|e| wire.protocol(e))?;
                if let Some(out) = auth.answer(req, wire)? {
                    wire.send(&out).await?;
                }
            }
            b'E' => {
                let error = protocol::parse_server_message(b'E', &frame.body)
                    .map_err(|e| wire.protocol(e))?;
                return Err(startup_error(auth.params, &wire.addr, error));
            }
            b'N' => wire.log_notice(&frame.body),
            b'S' => {
                let (k, v) =
                    protocol::parse_parameter_status(&frame.body).map_err(|e| wire.protocol(e))?;
                server_params.insert(k, v);
            }
            // BackendKeyData: the pid names this session in pg_stat_activity.
            b'K' => {
                backend_pid = frame
                    .body
                    .get(..4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            }
            b'Z' => break,
            other => return Err(wire.unexpected(other, "starting up")),
        }
    }
    Ok((auth.method, server_params, backend_pid))
}

/// The client side of authentication: answers each request, refusing what would leak the
/// password or skip the server's proof.
struct Auth<'a> {
    params: &'a ConnectParams,
    plain_tcp: bool,
    /// `tls-server-end-point` data when TLS is on.
    binding: Option<Vec<u8>>,
    method: AuthMethod,
    scram: Option<ScramSha256>,
    scram_verified: bool,
}

impl<'a> Auth<'a> {
    fn new(params: &'a ConnectParams, stream: &PgStream) -> Auth<'a> {
        let binding = match params.tls().channel_binding {
            ChannelBindingMode::Disable => None,
            _ => stream.channel_binding(),
        };
        Auth {
            params,
            plain_tcp: stream.is_plain_tcp(),
            binding,
            method: AuthMethod::Trust,
            scram: None,
            scram_verified: false,
        }
    }

    fn password(&self, addr: &str) -> Result<&'a str, ReplicationError> {
        self.params
            .password
            .as_ref()
            .map(|(p, _)| p.expose())
            .ok_or_else(|| ReplicationError::PasswordMissing {
                user: self.params.user.clone(),
                addr: addr.to_owned(),
            })
    }

    /// The bytes to send for `req`, if any.
    fn answer(
        &mut self,
        req: AuthRequest,
        wire: &Wire,
    ) -> Result<Option<BytesMut>, ReplicationError> {
        let addr = wire.addr.as_str();
        let mut out = BytesMut::new();
        match req {
            AuthRequest::Ok => {
                self.accept_ok(addr)?;
                return Ok(None);
            }
            AuthRequest::Cleartext => {
                self.readable_password(AuthMethod::Cleartext, "a cleartext password")?;
                frontend::password_message(self.password(addr)?.as_bytes(), &mut out)
                    .map_err(|e| bad_password_text(addr, e))?;
            }
            AuthRequest::Md5(salt) => {
                self.readable_password(AuthMethod::Md5, "md5")?;
                let hash = md5_hash(
                    self.params.user.as_bytes(),
                    self.password(addr)?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut out)
                    .map_err(|e| bad_password_text(addr, e))?;
            }
            AuthRequest::Sasl(mechanisms) => self.start_scram(&mechanisms, addr, &mut out)?,
            AuthRequest::SaslContinue(data) => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| wire.unexpected(b'R', "authenticating"))?;
                s.update(&data).map_err(|e| scram_err(addr, e))?;
                frontend::sasl_response(s.message(), &mut out).map_err(|e| scram_err(addr, e))?;
            }
            AuthRequest::SaslFinal(data) => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| wire.unexpected(b'R', "authenticating"))?;
                // Checks the server signature: the server proves it knows the password.
                s.finish(&data).map_err(|e| scram_err(addr, e))?;
                self.scram_verified = true;
                return Ok(None);
            }
            AuthRequest::Unsupported(code) => {
                let method = match code {
                    2 => "Kerberos V5".to_owned(),
                    7 | 8 => "GSSAPI".to_owned(),
                    9 => "SSPI".to_owned(),
                    other => format!("unknown method {other}"),
                };
                return Err(ReplicationError::UnsupportedAuth {
                    addr: addr.to_owned(),
                    method,
                });
            }
        }
        Ok(Some(out))
    }

    /// Cleartext and md5: refused over unencrypted TCP and with channel_binding=require.
    fn readable_password(
        &mut self,
        method: AuthMethod,
        described: &str,
    ) -> Result<(), ReplicationError> {
        self.method = method;
        if let Some(msg) =
            transport::insecure_password_refusal(self.params, self.plain_tcp, described)
        {
            return Err(ReplicationError::InsecurePassword(msg));
        }
        self.require_binding_or(method)
    }

    fn require_binding_or(&self, method: AuthMethod) -> Result<(), ReplicationError> {
        if self.params.tls().channel_binding == ChannelBindingMode::Require
            && method != AuthMethod::ScramSha256Plus
        {
            return Err(ReplicationError::ChannelBindingMissing {
                addr: self.params.host_description(),
                method: method.name(),
            });
        }
        Ok(())
    }

    fn start_scram(
        &mut self,
        mechanisms: &[String],
        addr: &str,
        out: &mut BytesMut,
    ) -> Result<(), ReplicationError> {
        let offers = |m: &str| mechanisms.iter().any(|x| x == m);
        let (mechanism, binding, method) = match &self.binding {
            Some(data) if offers(SCRAM_SHA_256_PLUS) => (
                SCRAM_SHA_256_PLUS,
                ChannelBinding::tls_server_end_point(data.clone()),
                AuthMethod::ScramSha256Plus,
            ),
            // "y": the client could bind, so a server that could too detects a downgrade.
            Some(_) if offers(SCRAM_SHA_256) => (
                SCRAM_SHA_256,
                ChannelBinding::unrequested(),
                AuthMethod::ScramSha256,
            ),
            None if offers(SCRAM_SHA_256) => (
                SCRAM_SHA_256,
                ChannelBinding::unsupported(),
                AuthMethod::ScramSha256,
            ),
            _ => {
                return Err(ReplicationError::UnsupportedAuth {
                    addr: addr.to_owned(),
                    method: format!("SASL ({})", mechanisms.join(", ")),
                });
            }
        };
        self.method = method;
        self.require_binding_or(method)?;
        let s = ScramSha256::new(self.password(addr)?.as_bytes(), binding);
        frontend::sasl_initial_response(mechanism, s.message(), out)
            .map_err(|e| scram_err(addr, e))?;
        self.scram = Some(s);
        Ok(())
    }

    /// AuthenticationOk: accepted only after a SCRAM exchange has verified the server.
    fn accept_ok(&self, addr: &str) -> Result<(), ReplicationError> {
        if self.scram.is_some() && !self.scram_verified {
            return Err(ReplicationError::Scram {
                addr: addr.to_owned(),
                reason: "the server reported success without proving it knows the password (no SCRAM server signature); the session is refused".to_owned(),
            });
        }
        self.require_binding_or(self.method)
    }
}

fn bad_password_text(addr: &str, e: std::io::Error) -> ReplicationError {
    ReplicationError::Params(ConnError::InvalidKeyValue(format!(
        "the password for {addr} cannot be sent ({e}); it must not contain a NUL byte"
    )))
}

fn scram_err(addr: &str, e: std::io::Error) -> ReplicationError {
    ReplicationError::Scram {
        addr: addr.to_owned(),
        reason: e.to_string(),
    }
}

/// Maps an ErrorResponse received before the session is ready to a specific error.
fn startup_error(params: &ConnectParams, addr: &str, error: ServerMessage) -> ReplicationError {
    let user = params.user.clone();
    match error.code.as_str() {
        "28P01" => match &params.password {
            Some((_, from)) => ReplicationError::PasswordFailed {
                user,
                addr: addr.to_owned(),
                from: from.clone(),
            },
            None => ReplicationError::PasswordMissing {
                user,
                addr: addr.to_owned(),
            },
        },
        "42501" => ReplicationError::NoReplicationRole { user },
        "3D000" => ReplicationError::DatabaseMissing {
            dbname: params.dbname.clone(),
            addr: addr.to_owned(),
        },
        "28000" if error.message.contains("pg_hba.conf") => ReplicationError::HbaRejected {
            addr: addr.to_owned(),
            user,
            dbname: params.dbname.clone(),
            message: error.message,
        },
        code if code.starts_with("28") => ReplicationError::LoginRefused {
            addr: addr.to_owned(),
            user,
            message: error.message,
        },
        _ => ReplicationError::Server {
            addr: addr.to_owned(),
            error: Box::new(error),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_errors_map_to_clear_classified_messages() {
        let p = ConnectParams::parse(
            "host=h port=5432 user=walrep password=x dbname=app sslmode=disable",
            None,
        )
        .unwrap();
        let err = |code: &str, message: &str| {
            startup_error(
                &p,
                "h:5432",
                ServerMessage {
                    code: code.into(),
                    message: message.into(),
                    ..Default::default()
                },
            )
        };
        let e = err(
            "28P01",
            "password authentication failed for user \"walrep\"",
        );
        assert_eq!(e.class(), ErrorClass::Config);
        assert!(
            e.to_string()
                .starts_with("password authentication failed for user \"walrep\" on h:5432")
        );
        let e = err(
            "42501",
            "must be superuser or replication role to start walsender",
        );
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert_eq!(
            e.to_string(),
            "role \"walrep\" lacks the REPLICATION attribute; run: ALTER ROLE walrep REPLICATION;"
        );
        let e = err("3D000", "database \"app\" does not exist");
        assert_eq!(e.class(), ErrorClass::Config);
        let e = err(
            "28000",
            "no pg_hba.conf entry for replication connection from host ...",
        );
        assert_eq!(e.class(), ErrorClass::Config);
        assert!(e.to_string().contains("no pg_hba.conf entry"));
        let e = err("57P03", "the database system is starting up");
        assert_eq!(e.class(), ErrorClass::Transient);
    }

    #[test]
    fn server_errors_are_classified_by_sqlstate() {
        assert_eq!(sqlstate_class("57P01"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("08006"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("53300"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("55006"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("42704"), ErrorClass::Permanent);
        assert_eq!(sqlstate_class("28P01"), ErrorClass::Config);
    }

    #[test]
    fn role_names_are_quoted_only_when_needed() {
        assert_eq!(sql_ident("walrep"), "walrep");
        assert_eq!(sql_ident("WalRep"), "\"WalRep\"");
        assert_eq!(sql_ident("a-b"), "\"a-b\"");
    }
}

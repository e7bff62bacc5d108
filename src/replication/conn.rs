//! The replication connection, built on postgres-protocol (tokio-postgres has no replication mode).
//!
//! [`ConnectParams`] reads a libpq connection string with libpq's fallbacks (PG* environment
//! variables, `~/.pgpass`, defaults). [`ReplicationConnection`] opens a `replication=database`
//! session, authenticates, runs replication commands, and turns into a [`ReplicationStream`]
//! with START_REPLICATION.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Secret;
use crate::error::{Classify, ErrorClass, sqlstate_class};
use crate::replication::protocol::{
    self, AuthRequest, BackendFrame, ProtocolError, ReplicationMessage, ServerMessage,
};
use crate::types::{Lsn, quote_ident, quote_literal};

/// The application name sent to the server when the connection string sets none.
pub const DEFAULT_APPLICATION_NAME: &str = "walhook";
/// How long connecting and authenticating may take unless `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The Unix socket directory used when no host is given and it exists (Debian's default).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix socket `.s.PGSQL.{port}`.
    Unix(PathBuf),
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS if the server offers it (walhook: plain, as TLS is not supported yet).
    Prefer,
    /// TLS required, certificate not checked.
    Require,
    /// TLS required, certificate chain checked.
    VerifyCa,
    /// TLS required, certificate chain and host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the password in use came from; named in authentication failures so the operator
/// knows which one to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// `password` / `password_file` in the walhook configuration.
    Config,
    /// The connection string itself.
    ConnString,
    /// The `PGPASSWORD` environment variable.
    PgPassword,
    /// A line of a password file.
    PassFile(PathBuf),
}

impl fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::Config => f.write_str("[source] password/password_file"),
            PasswordSource::ConnString => f.write_str("the [source] url"),
            PasswordSource::PgPassword => f.write_str("PGPASSWORD"),
            PasswordSource::PassFile(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The connection string could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// A `postgres://` URL was malformed.
    #[error("invalid connection URL: {0}")]
    InvalidUrl(String),
    /// A `key=value` connection string was malformed.
    #[error("invalid connection string: {0}")]
    InvalidKeyValue(String),
    /// A keyword libpq does not know.
    #[error("unknown connection parameter \"{0}\"; see the libpq connection string documentation")]
    UnknownParameter(String),
    /// A parameter had a value that cannot be used.
    #[error("invalid value {value:?} for connection parameter {key}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: &'static str,
    },
    /// More than one host was given.
    #[error("several hosts ({0}) are not supported; give one host")]
    MultipleHosts(String),
    /// No user name was given and the OS user could not be determined.
    #[error("no user name: set user in the [source] url or PGUSER")]
    NoUser,
    /// The connection string asks for TLS.
    #[error(
        "sslmode={0} asks for TLS, which walhook does not support yet; use sslmode=disable, or connect over a local Unix socket (host=/var/run/postgresql)"
    )]
    TlsNotSupported(&'static str),
}

impl Classify for ConnError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

/// The lookups [`ConnectParams`] makes outside the connection string, injectable for tests.
pub(crate) trait Env {
    /// An environment variable.
    fn var(&self, name: &str) -> Option<String>;
    /// The home directory, for `~/.pgpass`.
    fn home_dir(&self) -> Option<PathBuf>;
    /// The operating system user name, the default database user.
    fn os_user(&self) -> Option<String>;
    /// The default Unix socket directory, when it exists.
    fn default_socket_dir(&self) -> Option<PathBuf>;
}

/// The real process environment.
struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn home_dir(&self) -> Option<PathBuf> {
        std::env::var_os("HOME").map(PathBuf::from).or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
    }

    fn os_user(&self) -> Option<String> {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    fn default_socket_dir(&self) -> Option<PathBuf> {
        let dir = PathBuf::from(DEFAULT_SOCKET_DIR);
        dir.is_dir().then_some(dir)
    }
}

/// Connection parameters resolved from a libpq connection string, the environment and defaults.
#[derive(Clone, Debug)]
pub struct ConnectParams {
    host: Host,
    port: u16,
    user: String,
    password: Option<(Secret, PasswordSource)>,
    dbname: String,
    application_name: String,
    sslmode: SslMode,
    connect_timeout: Duration,
    options: Option<String>,
}

/// Keywords that are accepted and ignored because they do not apply to walhook's plain
/// connections; rejecting them would break connection strings copied from other tools.
const IGNORED_KEYWORDS: &[&str] = &[
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "load_balance_hosts",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslpassword",
    "sslcompression",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "channel_binding",
    "requirepeer",
    "client_encoding",
    "replication",
    "service",
];

/// Keywords walhook uses.
const KNOWN_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "passfile",
    "dbname",
    "application_name",
    "fallback_application_name",
    "sslmode",
    "connect_timeout",
    "options",
];

impl ConnectParams {
    /// Parses a connection string (URL or key=value); `password_override` (from the walhook
    /// config's `password`/`password_file`) wins over every other password source.
    pub fn parse(
        conn_str: &str,
        password_override: Option<&str>,
    ) -> Result<ConnectParams, ConnError> {
        Self::parse_with_env(conn_str, password_override, &ProcessEnv)
    }

    pub(crate) fn parse_with_env(
        conn_str: &str,
        password_override: Option<&str>,
        env: &dyn Env,
    ) -> Result<ConnectParams, ConnError> {
        let trimmed = conn_str.trim();
        let pairs = if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
            parse_url(trimmed)?
        } else {
            parse_key_value(trimmed)?
        };
        let mut given: HashMap<String, String> = HashMap::new();
        for (key, value) in pairs {
            if IGNORED_KEYWORDS.contains(&key.as_str()) {
                tracing::warn!(parameter = %key, "connection parameter ignored by walhook");
                continue;
            }
            if !KNOWN_KEYWORDS.contains(&key.as_str()) {
                return Err(ConnError::UnknownParameter(key));
            }
            given.insert(key, value);
        }
        // libpq treats an empty value like an absent one, then falls back to the environment.
        let get = |key: &str, var: Option<&str>| -> Option<String> {
            given
                .get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .or_else(|| var.and_then(|v| env.var(v)).filter(|v| !v.is_empty()))
        };

        let host_text = get("hostaddr", Some("PGHOSTADDR")).or_else(|| get("host", Some("PGHOST")));
        let host = match host_text {
            Some(h) if h.contains(',') => return Err(ConnError::MultipleHosts(h)),
            Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            Some(h) => Host::Tcp(h),
            None => match env.default_socket_dir() {
                Some(dir) => Host::Unix(dir),
                None => Host::Tcp("localhost".to_owned()),
            },
        };
        let port = match get("port", Some("PGPORT")) {
            None => 5432,
            Some(p) => {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or(ConnError::InvalidValue {
                        key: "port".into(),
                        value: p,
                        reason: "expected a number from 1 to 65535",
                    })?
            }
        };
        let user = get("user", Some("PGUSER"))
            .or_else(|| env.os_user())
            .ok_or(ConnError::NoUser)?;
        let dbname = get("dbname", Some("PGDATABASE")).unwrap_or_else(|| user.clone());
        let application_name = get("application_name", Some("PGAPPNAME"))
            .or_else(|| get("fallback_application_name", None))
            .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned());
        let sslmode = match get("sslmode", Some("PGSSLMODE")) {
            None => SslMode::Prefer,
            Some(s) => SslMode::parse(&s).ok_or(ConnError::InvalidValue {
                key: "sslmode".into(),
                value: s,
                reason: "expected disable, allow, prefer, require, verify-ca or verify-full",
            })?,
        };
        if matches!(
            sslmode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        ) {
            return Err(ConnError::TlsNotSupported(sslmode.as_str()));
        }
        let connect_timeout = match get("connect_timeout", Some("PGCONNECT_TIMEOUT")) {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(t) => match t.trim().parse::<i64>() {
                // libpq: zero or negative means wait forever; walhook keeps a bound.
                Ok(secs) if secs <= 0 => DEFAULT_CONNECT_TIMEOUT,
                // libpq raises timeouts below 2 s to 2 s.
                Ok(secs) => Duration::from_secs(secs.max(2).unsigned_abs()),
                Err(_) => {
                    return Err(ConnError::InvalidValue {
                        key: "connect_timeout".into(),
                        value: t,
                        reason: "expected a whole number of seconds",
                    });
                }
            },
        };
        let options = get("options", Some("PGOPTIONS"));

        let password = if let Some(p) = password_override.filter(|p| !p.is_empty()) {
            Some((Secret::new(p.to_owned()), PasswordSource::Config))
        } else if let Some(p) = given.get("password").filter(|p| !p.is_empty()) {
            Some((Secret::new(p.clone()), PasswordSource::ConnString))
        } else if let Some(p) = env.var("PGPASSWORD").filter(|p| !p.is_empty()) {
            Some((Secret::new(p), PasswordSource::PgPassword))
        } else {
            let file = get("passfile", Some("PGPASSFILE"))
                .map(PathBuf::from)
                .or_else(|| env.home_dir().map(|h| h.join(".pgpass")));
            file.and_then(|file| {
                // libpq matches socket connections against "localhost".
                let host_key = match &host {
                    Host::Tcp(h) => h.as_str(),
                    Host::Unix(_) => "localhost",
                };
                let pw = pgpass_lookup(&file, host_key, port, &dbname, &user)?;
                Some((Secret::new(pw), PasswordSource::PassFile(file)))
            })
        };

        Ok(ConnectParams {
            host,
            port,
            user,
            password,
            dbname,
            application_name,
            sslmode,
            connect_timeout,
            options,
        })
    }

    /// The database user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The host or socket directory.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port (for a socket, part of its file name).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The application name shown in `pg_stat_activity` and `pg_stat_replication`.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// The sslmode in effect (always one that allows a plain connection).
    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    /// How long connecting and authenticating may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Where the password came from, when there is one.
    pub fn password_source(&self) -> Option<&PasswordSource> {
        self.password.as_ref().map(|(_, s)| s)
    }

    /// `host:port`, or the socket path, for messages.
    pub fn host_description(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => socket_path(dir, self.port).display().to_string(),
        }
    }

    /// The same parameters for an ordinary (non-replication) tokio-postgres connection.
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            Host::Tcp(h) => c.host(h),
            Host::Unix(dir) => c.host_path(dir),
        };
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(self.connect_timeout);
        if let Some((pw, _)) = &self.password {
            c.password(pw.expose());
        }
        // walhook's statements are short and run thousands of times; JIT compiling one
        // (triggered by the inflated cost estimates of a queue table not yet analyzed)
        // costs 100-200 ms, far more than the statement. Options given in the connection
        // string come after, so a DBA can still turn it back on.
        let options = match &self.options {
            Some(o) => format!("-c jit=off {o}"),
            None => "-c jit=off".to_owned(),
        };
        c.options(&options);
        c
    }

    /// A description for logs: every parameter except the password, which is shown as `***`.
    pub fn redacted(&self) -> String {
        let host = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(d) => d.display().to_string(),
        };
        let mut s = format!(
            "host={host} port={} user={} dbname={} application_name={} sslmode={}",
            self.port,
            self.user,
            self.dbname,
            self.application_name,
            self.sslmode.as_str()
        );
        if let Some((_, source)) = &self.password {
            s.push_str(&format!(" password=*** (from {source})"));
        }
        s
    }
}

fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

fn percent_decode(s: &str, what: &str) -> Result<String, ConnError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ConnError::InvalidUrl(format!("bad percent-encoding in the {what}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        ConnError::InvalidUrl(format!("the {what} is not UTF-8 after percent-decoding"))
    })
}

/// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?key=value&…]`.
fn parse_url(url: &str) -> Result<Vec<(String, String)>, ConnError> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let mut out = Vec::new();
    // The last '@' separates user info, so an unencoded '@' in a password still works.
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_owned(), percent_decode(user, "user name")?));
            }
            if let Some(p) = password {
                out.push(("password".to_owned(), percent_decode(p, "password")?));
            }
            hostport
        }
        None => authority,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| ConnError::InvalidUrl("missing ']' after an IPv6 address".into()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| ConnError::InvalidUrl("expected ':port' after ']'".into()))?,
            ),
        };
        (h.to_owned(), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (percent_decode(h, "host")?, Some(p)),
            None => (percent_decode(hostport, "host")?, None),
        }
    };
    if !host.is_empty() {
        out.push(("host".to_owned(), host));
    }
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        out.push(("port".to_owned(), percent_decode(p, "port")?));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_owned(), percent_decode(db, "database name")?));
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ConnError::InvalidUrl(format!("query parameter {pair:?} has no '=value'"))
        })?;
        out.push((
            percent_decode(k, "query parameter")?,
            percent_decode(v, "query parameter")?,
        ));
    }
    Ok(out)
}

/// Parses `key=value key='quoted \' value'`, libpq's other connection string form.
fn parse_key_value(s: &str) -> Result<Vec<(String, String)>, ConnError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnError::InvalidKeyValue(format!(
                "missing \"=\" after \"{key}\""
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            let unterminated =
                || ConnError::InvalidKeyValue(format!("unterminated quoted value for \"{key}\""));
            loop {
                match chars.next().ok_or_else(unterminated)? {
                    '\'' => break,
                    '\\' => value.push(chars.next().ok_or_else(unterminated)?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// One field of a password file line: its unescaped text, or the `*` wildcard.
#[derive(Debug, PartialEq, Eq)]
enum PassField {
    Any,
    Text(String),
}

impl PassField {
    fn matches(&self, value: &str) -> bool {
        match self {
            PassField::Any => true,
            PassField::Text(t) => t == value,
        }
    }
}

/// Splits a password file line into fields at unescaped ':' (`\:` and `\\` are escapes).
fn split_pgpass_line(line: &str) -> Vec<PassField> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    let finish = |cur: &mut String, escaped_any: &mut bool, fields: &mut Vec<PassField>| {
        let text = std::mem::take(cur);
        fields.push(if text == "*" && !*escaped_any {
            PassField::Any
        } else {
            PassField::Text(text)
        });
        *escaped_any = false;
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                escaped_any = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => finish(&mut cur, &mut escaped_any, &mut fields),
            c => cur.push(c),
        }
    }
    finish(&mut cur, &mut escaped_any, &mut fields);
    fields
}

/// Finds the password for a connection in password file text (libpq's `.pgpass` format).
fn pgpass_find(text: &str, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass_line(line);
            let [h, p, d, u, pw, ..] = fields.as_slice() else {
                return None;
            };
            let hit = h.matches(host) && p.matches(&port) && d.matches(dbname) && u.matches(user);
            hit.then(|| match pw {
                PassField::Any => "*".to_owned(),
                PassField::Text(t) => t.clone(),
            })
        })
}

/// Looks a password up in a password file, ignoring a file others can read as libpq does.
fn pgpass_lookup(path: &Path, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(file = %path.display(), "password file is not a plain file; ignoring it");
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "password file has group or world access and is ignored; run: chmod 0600 {}",
            path.display()
        );
        return None;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read password file");
            return None;
        }
    };
    pgpass_find(&text, host, port, dbname, user)
}

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
    /// The TCP or socket connection could not be opened (refused, DNS failure, no socket).
    #[error(
        "cannot connect to {addr}: {source}; is the server running and accepting connections there?"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
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
}

impl Classify for ReplicationError {
    fn class(&self) -> ErrorClass {
        use ReplicationError as E;
        match self {
            E::Params(e) => e.class(),
            E::PasswordFailed { .. }
            | E::PasswordMissing { .. }
            | E::DatabaseMissing { .. }
            | E::HbaRejected { .. }
            | E::LoginRefused { .. }
            | E::UnsupportedAuth { .. }
            | E::Scram { .. } => ErrorClass::Config,
            E::NoReplicationRole { .. } => ErrorClass::Permanent,
            E::Connect { .. }
            | E::Timeout { .. }
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

trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

/// The socket with its read buffer; shared by the command and streaming phases.
struct Wire {
    io: Box<dyn AsyncIo>,
    rbuf: BytesMut,
    addr: String,
}

impl Wire {
    /// Reads one complete backend message. Cancel-safe: a partial message stays in `rbuf`
    /// and `read_buf` either appends bytes or is dropped before reading any.
    async fn read_frame(&mut self) -> Result<BackendFrame, ReplicationError> {
        loop {
            let frame = protocol::take_frame(&mut self.rbuf).map_err(|e| self.protocol(e))?;
            if let Some(f) = frame {
                return Ok(f);
            }
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
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| self.io_error(e))?;
        self.io.flush().await.map_err(|e| self.io_error(e))
    }

    fn io_error(&self, source: std::io::Error) -> ReplicationError {
        ReplicationError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn protocol(&self, source: ProtocolError) -> ReplicationError {
        ReplicationError::Protocol {
            addr: self.addr.clone(),
            source,
        }
    }

    fn unexpected(&self, tag: u8, during: &'static str) -> ReplicationError {
        ReplicationError::Unexpected {
            addr: self.addr.clone(),
            tag: char::from(tag),
            during,
        }
    }

    fn server_error(&self, body: &[u8]) -> ReplicationError {
        match protocol::parse_server_message(b'E', body) {
            Ok(error) => ReplicationError::Server {
                addr: self.addr.clone(),
                error: Box::new(error),
            },
            Err(e) => self.protocol(e),
        }
    }

    fn log_notice(&self, body: &[u8]) {
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
}

const IDENTIFY_SYSTEM: &str = "IDENTIFY_SYSTEM";
/// SQLSTATE duplicate_object: the slot already exists.
const DUPLICATE_OBJECT: &str = "42710";

impl ReplicationConnection {
    /// Connects, authenticates and waits until the server is ready for commands.
    pub async fn connect(
        params: &ConnectParams,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let timeout = params.connect_timeout;
        match tokio::time::timeout(timeout, Self::connect_inner(params)).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Timeout {
                addr: params.host_description(),
                timeout,
            }),
        }
    }

    async fn connect_inner(
        params: &ConnectParams,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let addr = params.host_description();
        let connect_err = |source| ReplicationError::Connect {
            addr: addr.clone(),
            source,
        };
        let io: Box<dyn AsyncIo> = match &params.host {
            Host::Tcp(h) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), params.port))
                    .await
                    .map_err(connect_err)?;
                // Status updates are tiny and latency matters more than packet count.
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Host::Unix(dir) => Box::new(
                tokio::net::UnixStream::connect(socket_path(dir, params.port))
                    .await
                    .map_err(connect_err)?,
            ),
        };
        let mut wire = Wire {
            io,
            rbuf: BytesMut::with_capacity(16 * 1024),
            addr: addr.clone(),
        };

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

        let mut auth_method = AuthMethod::Trust;
        let mut scram: Option<ScramSha256> = None;
        let mut server_params = HashMap::new();
        let password = || {
            params
                .password
                .as_ref()
                .map(|(p, _)| p.expose())
                .ok_or_else(|| ReplicationError::PasswordMissing {
                    user: params.user.clone(),
                    addr: addr.clone(),
                })
        };
        loop {
            let frame = wire.read_frame().await?;
            let mut out = BytesMut::new();
            match frame.tag {
                b'R' => {
                    let req =
                        protocol::parse_auth_request(&frame.body).map_err(|e| wire.protocol(e))?;
                    match req {
                        AuthRequest::Ok => continue,
                        AuthRequest::Cleartext => {
                            auth_method = AuthMethod::Cleartext;
                            frontend::password_message(password()?.as_bytes(), &mut out)
                                .map_err(|e| bad_password_text(&addr, e))?;
                        }
                        AuthRequest::Md5(salt) => {
                            auth_method = AuthMethod::Md5;
                            let hash =
                                md5_hash(params.user.as_bytes(), password()?.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| bad_password_text(&addr, e))?;
                        }
                        AuthRequest::Sasl(mechanisms) => {
                            if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                                return Err(ReplicationError::UnsupportedAuth {
                                    addr,
                                    method: format!("SASL ({})", mechanisms.join(", ")),
                                });
                            }
                            auth_method = AuthMethod::ScramSha256;
                            // No TLS, so no channel binding to offer.
                            let s = ScramSha256::new(
                                password()?.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                                .map_err(|e| scram_err(&addr, e))?;
                            scram = Some(s);
                        }
                        AuthRequest::SaslContinue(data) => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| wire.unexpected(b'R', "authenticating"))?;
                            s.update(&data).map_err(|e| scram_err(&addr, e))?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| scram_err(&addr, e))?;
                        }
                        AuthRequest::SaslFinal(data) => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| wire.unexpected(b'R', "authenticating"))?;
                            s.finish(&data).map_err(|e| scram_err(&addr, e))?;
                            continue;
                        }
                        AuthRequest::Unsupported(code) => {
                            let method = match code {
                                2 => "Kerberos V5".to_owned(),
                                7 | 8 => "GSSAPI".to_owned(),
                                9 => "SSPI".to_owned(),
                                other => format!("unknown method {other}"),
                            };
                            return Err(ReplicationError::UnsupportedAuth { addr, method });
                        }
                    }
                    wire.send(&out).await?;
                }
                b'E' => {
                    let error = protocol::parse_server_message(b'E', &frame.body)
                        .map_err(|e| wire.protocol(e))?;
                    return Err(startup_error(params, &addr, error));
                }
                b'N' => wire.log_notice(&frame.body),
                b'S' => {
                    let (k, v) = protocol::parse_parameter_status(&frame.body)
                        .map_err(|e| wire.protocol(e))?;
                    server_params.insert(k, v);
                }
                // BackendKeyData is for cancel requests, which replication does not use.
                b'K' => {}
                b'Z' => break,
                other => return Err(wire.unexpected(other, "starting up")),
            }
        }
        tracing::debug!(server = %addr, user = %params.user, ?auth_method, "replication connection established");
        Ok(ReplicationConnection {
            wire,
            auth_method,
            server_params,
        })
    }

    /// The authentication method the server asked for.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// A parameter the server reported at startup (e.g. `server_version`).
    pub fn server_parameter(&self, name: &str) -> Option<&str> {
        self.server_params.get(name).map(String::as_str)
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

    /// Creates the logical slot for pgoutput; returns false when it already existed.
    pub async fn create_slot_if_missing(&mut self, slot: &str) -> Result<bool, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        match self.simple_query(&sql).await {
            Ok(_) => {
                tracing::info!(slot, "created replication slot");
                Ok(true)
            }
            Err(e) if e.sqlstate() == Some(DUPLICATE_OBJECT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts logical replication from `start` (Lsn::ZERO: the slot's confirmed position).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
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
        Ok(ReplicationStream {
            wire: self.wire,
            ended: false,
        })
    }

    /// Ends the session politely (Terminate), so the server logs no "unexpected EOF".
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        if let Err(e) = self.wire.send(&out).await {
            tracing::debug!(error = %e, "sending Terminate failed");
        }
        let _ = self.wire.io.shutdown().await;
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

/// The CopyBoth phase of a replication session: WAL data in, status updates out.
pub struct ReplicationStream {
    wire: Wire,
    ended: bool,
}

impl ReplicationStream {
    /// The next XLogData or keepalive; `Ok(None)` once the server ended the stream with
    /// CopyDone. Cancel-safe: dropping the future loses no data, so it may sit in `select!`.
    pub async fn recv(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'd' => {
                    let msg = protocol::parse_copy_data(&frame.body)
                        .map_err(|e| self.wire.protocol(e))?;
                    return Ok(Some(msg));
                }
                b'c' => {
                    self.ended = true;
                    return Ok(None);
                }
                b'E' => return Err(self.wire.server_error(&frame.body)),
                b'N' => self.wire.log_notice(&frame.body),
                b'S' => {}
                other => return Err(self.wire.unexpected(other, "streaming")),
            }
        }
    }

    /// Sends a standby status update: WAL up to `write` received, up to `flush` durable
    /// (the slot may advance to it), up to `apply` applied. Not cancel-safe: await it to the
    /// end rather than racing it against a timer.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let payload = protocol::encode_standby_status(
            write,
            flush,
            apply,
            protocol::pg_now(),
            reply_requested,
        );
        let mut out = BytesMut::with_capacity(payload.len() + 5);
        protocol::encode_copy_data(&payload, &mut out);
        self.wire.send(&out).await
    }

    /// Ends the stream cleanly: CopyDone, then waits up to `wait` for the server's CopyDone
    /// and the end of the command (WAL data still in flight is discarded), then Terminate.
    /// The server handles messages in order, so a status update sent before this is
    /// processed once it returns `Ok`.
    pub async fn finish(mut self, wait: Duration) -> Result<(), ReplicationError> {
        let mut out = BytesMut::new();
        if !self.ended {
            frontend::copy_done(&mut out);
            self.wire.send(&out).await?;
            out.clear();
        }
        let drained = tokio::time::timeout(wait, async {
            loop {
                let frame = self.wire.read_frame().await?;
                match frame.tag {
                    b'Z' => return Ok(()),
                    b'E' => return Err(self.wire.server_error(&frame.body)),
                    b'N' => self.wire.log_notice(&frame.body),
                    // XLogData and keepalives sent before the server saw CopyDone, its own
                    // CopyDone, CommandComplete, ParameterStatus.
                    b'd' | b'c' | b'C' | b'S' => {}
                    other => return Err(self.wire.unexpected(other, "ending the stream")),
                }
            }
        })
        .await;
        frontend::terminate(&mut out);
        if let Err(e) = self.wire.send(&out).await {
            tracing::debug!(error = %e, "sending Terminate failed");
        }
        let _ = self.wire.io.shutdown().await;
        drained.unwrap_or_else(|_| {
            Err(ReplicationError::BadReply {
                addr: self.wire.addr.clone(),
                command: "CopyDone",
                reason: format!("no answer within {}s", wait.as_secs()),
            })
        })
    }

    /// Ends the stream (CopyDone) and the session (Terminate).
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        if !self.ended {
            frontend::copy_done(&mut out);
        }
        frontend::terminate(&mut out);
        if let Err(e) = self.wire.send(&out).await {
            tracing::debug!(error = %e, "closing the replication stream failed");
        }
        let _ = self.wire.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Default)]
    struct FakeEnv {
        vars: HashMap<&'static str, String>,
        home: Option<PathBuf>,
        user: Option<String>,
        socket_dir: Option<PathBuf>,
    }

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn home_dir(&self) -> Option<PathBuf> {
            self.home.clone()
        }
        fn os_user(&self) -> Option<String> {
            self.user.clone()
        }
        fn default_socket_dir(&self) -> Option<PathBuf> {
            self.socket_dir.clone()
        }
    }

    fn env(vars: &[(&'static str, &str)]) -> FakeEnv {
        FakeEnv {
            vars: vars.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            user: Some("osuser".into()),
            ..FakeEnv::default()
        }
    }

    fn parse(s: &str, e: &FakeEnv) -> ConnectParams {
        ConnectParams::parse_with_env(s, None, e).unwrap()
    }

    fn password(p: &ConnectParams) -> Option<&str> {
        p.password.as_ref().map(|(s, _)| s.expose())
    }

    #[test]
    fn url_form_is_parsed_with_percent_decoding() {
        let p = parse(
            "postgres://wal%40user:p%3Ass@db.example.com:6543/my%20db?application_name=x&sslmode=disable",
            &env(&[]),
        );
        assert_eq!(p.host(), &Host::Tcp("db.example.com".into()));
        assert_eq!(p.port(), 6543);
        assert_eq!(p.user(), "wal@user");
        assert_eq!(password(&p), Some("p:ss"));
        assert_eq!(p.password_source(), Some(&PasswordSource::ConnString));
        assert_eq!(p.dbname(), "my db");
        assert_eq!(p.application_name(), "x");
        assert_eq!(p.sslmode(), SslMode::Disable);
        assert_eq!(p.host_description(), "db.example.com:6543");
    }

    #[test]
    fn url_host_may_be_a_socket_directory_or_ipv6() {
        let p = parse("postgresql://%2Ftmp%2Fpg:5433/app", &env(&[]));
        assert_eq!(p.host(), &Host::Unix("/tmp/pg".into()));
        assert_eq!(p.host_description(), "/tmp/pg/.s.PGSQL.5433");
        let p = parse("postgresql://u@[::1]:5434/app", &env(&[]));
        assert_eq!(p.host(), &Host::Tcp("::1".into()));
        assert_eq!(p.host_description(), "[::1]:5434");
        let p = parse("postgresql:///app?host=/run/pg", &env(&[]));
        assert_eq!(p.host(), &Host::Unix("/run/pg".into()));
    }

    #[test]
    fn key_value_form_handles_quotes_and_escapes() {
        let p = parse(
            r"host=10.0.0.1 port = 5555 user=walhook password='it\'s a \\secret' dbname=app application_name=svc",
            &env(&[]),
        );
        assert_eq!(p.host(), &Host::Tcp("10.0.0.1".into()));
        assert_eq!(p.port(), 5555);
        assert_eq!(p.user(), "walhook");
        assert_eq!(password(&p), Some(r"it's a \secret"));
        assert_eq!(p.dbname(), "app");
        assert_eq!(p.application_name(), "svc");
    }

    #[test]
    fn malformed_strings_are_config_errors() {
        for bad in [
            "host",
            "host='unterminated",
            "postgres://h/db?novalue",
            "postgres://h%zz/db",
            "postgres://[::1/db",
            "port=0",
            "port=x",
            "sslmode=sometimes",
            "bogus=1",
            "host=a,b",
            "connect_timeout=soon",
        ] {
            let e = ConnectParams::parse_with_env(bad, None, &env(&[])).unwrap_err();
            assert_eq!(e.class(), ErrorClass::Config, "{bad}");
        }
    }

    #[test]
    fn tls_sslmodes_are_refused_with_the_workaround() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let e = ConnectParams::parse_with_env(&format!("sslmode={mode}"), None, &env(&[]))
                .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("TLS") && msg.contains("sslmode=disable"),
                "{msg}"
            );
        }
        let e = ConnectParams::parse_with_env("", None, &env(&[("PGSSLMODE", "require")]));
        assert!(matches!(e, Err(ConnError::TlsNotSupported("require"))));
        for mode in ["disable", "allow", "prefer"] {
            assert!(
                ConnectParams::parse_with_env(&format!("sslmode={mode}"), None, &env(&[])).is_ok()
            );
        }
    }

    #[test]
    fn unset_parts_come_from_the_environment_then_defaults() {
        let e = env(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "7000"),
            ("PGUSER", "envuser"),
            ("PGDATABASE", "envdb"),
            ("PGAPPNAME", "envapp"),
            ("PGPASSWORD", "envpw"),
        ]);
        let p = parse("dbname=given", &e);
        assert_eq!(p.host(), &Host::Tcp("envhost".into()));
        assert_eq!(p.port(), 7000);
        assert_eq!(p.user(), "envuser");
        assert_eq!(p.dbname(), "given");
        assert_eq!(p.application_name(), "envapp");
        assert_eq!(password(&p), Some("envpw"));
        assert_eq!(p.password_source(), Some(&PasswordSource::PgPassword));

        let p = parse("", &env(&[]));
        assert_eq!(p.host(), &Host::Tcp("localhost".into()));
        assert_eq!(p.port(), 5432);
        assert_eq!(p.user(), "osuser");
        assert_eq!(p.dbname(), "osuser");
        assert_eq!(p.application_name(), DEFAULT_APPLICATION_NAME);
        assert_eq!(p.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(password(&p), None);

        let mut with_socket = env(&[]);
        with_socket.socket_dir = Some("/var/run/postgresql".into());
        let p = parse("user=u", &with_socket);
        assert_eq!(p.host(), &Host::Unix("/var/run/postgresql".into()));
        assert_eq!(p.host_description(), "/var/run/postgresql/.s.PGSQL.5432");
        let no_user = FakeEnv::default();
        assert!(matches!(
            ConnectParams::parse_with_env("", None, &no_user),
            Err(ConnError::NoUser)
        ));
    }

    #[test]
    fn password_precedence_is_override_then_string_then_env() {
        let e = env(&[("PGPASSWORD", "envpw")]);
        let p = ConnectParams::parse_with_env("password=strpw", Some("cfgpw"), &e).unwrap();
        assert_eq!(password(&p), Some("cfgpw"));
        assert_eq!(p.password_source(), Some(&PasswordSource::Config));
        let p = ConnectParams::parse_with_env("password=strpw", None, &e).unwrap();
        assert_eq!(password(&p), Some("strpw"));
        let p = ConnectParams::parse_with_env("password=", None, &e).unwrap();
        assert_eq!(password(&p), Some("envpw"));
    }

    #[test]
    fn redacted_never_shows_the_password() {
        let p = parse("postgres://u:hunter2@h/db", &env(&[]));
        let r = p.redacted();
        assert!(!r.contains("hunter2"), "{r}");
        assert!(
            r.contains("password=***") && r.contains("user=u") && r.contains("host=h"),
            "{r}"
        );
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn tokio_postgres_config_carries_the_same_parameters() {
        let p = parse("postgres://u:pw@h:5999/db?application_name=a", &env(&[]));
        let c = p.to_tokio_postgres();
        assert_eq!(c.get_user(), Some("u"));
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.get_dbname(), Some("db"));
        assert_eq!(c.get_ports(), &[5999]);
        assert_eq!(c.get_application_name(), Some("a"));
        assert_eq!(
            c.get_hosts(),
            &[tokio_postgres::config::Host::Tcp("h".into())]
        );
    }

    #[test]
    fn pgpass_matches_wildcards_and_unescapes() {
        let text = "# comment\n\
                    other:5432:*:u:nope\n\
                    h:*:db:u:first\n\
                    *:*:*:u:second\n\
                    *:*:*:*:pa\\:ss\\\\word\n\
                    w\\:x:5432:*:*:escaped-host\n\
                    short:line\n";
        assert_eq!(
            pgpass_find(text, "h", 1, "db", "u").as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_find(text, "h", 1, "db2", "u").as_deref(),
            Some("second")
        );
        assert_eq!(
            pgpass_find(text, "x", 1, "d", "v").as_deref(),
            Some(r"pa:ss\word")
        );
        assert_eq!(
            pgpass_find("w\\:x:5432:*:*:esc\n", "w:x", 5432, "d", "v").as_deref(),
            Some("esc")
        );
        assert_eq!(
            pgpass_find("\\*:*:*:*:literal\n", "anyhost", 1, "d", "u"),
            None
        );
        assert_eq!(pgpass_find("short:line\n", "short", 1, "d", "u"), None);
        assert_eq!(
            pgpass_find("h:5432:db:u:crlf\r\n", "h", 5432, "db", "u").as_deref(),
            Some("crlf")
        );
    }

    #[test]
    fn pgpass_file_is_used_only_when_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".pgpass");
        std::fs::write(&file, "localhost:5432:app:u:frompass\n").unwrap();
        let mut e = env(&[]);
        e.home = Some(dir.path().to_owned());
        e.socket_dir = Some("/var/run/postgresql".into());

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A socket connection matches the "localhost" line, as in libpq.
        let p = parse("user=u dbname=app", &e);
        assert_eq!(password(&p), Some("frompass"));
        assert_eq!(
            p.password_source(),
            Some(&PasswordSource::PassFile(file.clone()))
        );

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(password(&parse("user=u dbname=app", &e)), None);

        // PGPASSFILE points elsewhere; passfile in the string wins over it.
        let other = dir.path().join("other");
        std::fs::write(&other, "*:*:*:*:fromother\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        e.vars.insert("PGPASSFILE", other.display().to_string());
        assert_eq!(password(&parse("user=u dbname=app", &e)), Some("fromother"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = format!("user=u dbname=app passfile={}", file.display());
        assert_eq!(password(&parse(&s, &e)), Some("frompass"));
    }

    #[test]
    fn startup_errors_map_to_clear_classified_messages() {
        let p = parse(
            "host=h port=5432 user=walrep password=x dbname=app",
            &env(&[]),
        );
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

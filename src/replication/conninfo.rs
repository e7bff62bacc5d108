//! Connection parameters with libpq's meaning: a connection string (URL or key=value), the
//! PG* environment variables, `~/.pgpass`, `~/.postgresql/` certificates and defaults.
//!
//! Both walhook connections (replication and ordinary) are built from one [`ConnectParams`],
//! so TLS, keepalives and the password rules are the same everywhere.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Classify, ErrorClass};
use crate::secret::Secret;

use super::connstr::{parse_key_value, parse_url, pgpass_lookup};

/// The application name sent to the server when the connection string sets none.
pub const DEFAULT_APPLICATION_NAME: &str = "walhook";
/// How long connecting and authenticating may take unless `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The Unix socket directory used when no host is given and it exists (Debian's default).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// Idle time before the first TCP keepalive probe unless `keepalives_idle` says otherwise
/// (the OS default of two hours would hide a dead peer for that long).
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// Time between unanswered keepalive probes unless `keepalives_interval` says otherwise.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is dropped unless `keepalives_count` says otherwise.
pub const DEFAULT_KEEPALIVES_COUNT: u32 = 3;
/// How long sent data may stay unacknowledged unless `tcp_user_timeout` says otherwise.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix socket `.s.PGSQL.{port}`.
    Unix(PathBuf),
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Plain first, TLS if the plain connection is refused.
    Allow,
    /// TLS if the server offers it, plain otherwise.
    Prefer,
    /// TLS required; the certificate is checked only when a root certificate is present.
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

    /// Whether a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }

    /// Whether the mode itself demands a checked certificate.
    fn verifies(self) -> bool {
        self >= SslMode::VerifyCa
    }
}

/// The trust anchors a server certificate is checked against (`sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// No root certificate: the server certificate is not checked.
    None,
    /// CA certificates in a PEM file.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBindingMode {
    /// Never bind SCRAM to the TLS channel.
    Disable,
    /// Bind when TLS is on and the server offers SCRAM-SHA-256-PLUS.
    Prefer,
    /// Refuse any authentication other than SCRAM-SHA-256-PLUS.
    Require,
}

/// A TLS protocol version (`ssl_min_protocol_version`, `ssl_max_protocol_version`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.0 (accepted in settings; rustls speaks 1.2 and 1.3 only).
    V1_0,
    /// TLS 1.1 (likewise).
    V1_1,
    /// TLS 1.2.
    V1_2,
    /// TLS 1.3.
    V1_3,
}

impl TlsVersion {
    fn parse(s: &str) -> Option<TlsVersion> {
        Some(match s {
            "TLSv1" => TlsVersion::V1_0,
            "TLSv1.1" => TlsVersion::V1_1,
            "TLSv1.2" => TlsVersion::V1_2,
            "TLSv1.3" => TlsVersion::V1_3,
            _ => return None,
        })
    }
}

/// How TLS is started (`sslnegotiation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslNegotiation {
    /// SSLRequest first, TLS if the server agrees (every server version).
    Postgres,
    /// TLS at once, with ALPN `postgresql` (PostgreSQL 17 and newer).
    Direct,
}

/// Everything about TLS for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsParams {
    /// When TLS is used.
    pub mode: SslMode,
    /// What the server certificate is checked against.
    pub root_cert: RootCert,
    /// A client certificate and its key, when present.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// A certificate revocation list (PEM) checked with the chain.
    pub crl: Option<PathBuf>,
    /// Send the host name as SNI (`sslsni`, default on).
    pub sni: bool,
    /// Lowest and highest protocol version allowed.
    pub min_version: TlsVersion,
    /// Highest protocol version allowed; `None` means the newest.
    pub max_version: Option<TlsVersion>,
    /// SCRAM channel binding.
    pub channel_binding: ChannelBindingMode,
    /// How TLS is started.
    pub negotiation: SslNegotiation,
}

impl TlsParams {
    /// Whether the certificate chain is checked when TLS is used.
    pub fn verifies_chain(&self) -> bool {
        self.root_cert != RootCert::None
    }

    /// Whether the host name is checked against the certificate.
    pub fn verifies_host(&self) -> bool {
        self.mode == SslMode::VerifyFull
    }
}

/// TCP keepalive settings (libpq's `keepalives*` and `tcp_user_timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Whether keepalive probes are sent at all.
    pub enabled: bool,
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Probes before the connection is considered dead.
    pub count: u32,
    /// Longest time sent data may stay unacknowledged; `None` keeps the OS default.
    pub user_timeout: Option<Duration>,
}

/// walhook's own rules for its connections (`[source]` keys, not libpq keywords).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnPolicy {
    /// Send a cleartext or md5 password over TCP without TLS (`allow_insecure_password`).
    pub allow_insecure_password: bool,
    /// A replication stream silent this long is presumed dead and rebuilt.
    pub receive_timeout: Duration,
    /// `statement_timeout` of walhook's ordinary sessions; `None` leaves the server's.
    pub statement_timeout: Option<Duration>,
    /// `lock_timeout` of walhook's ordinary sessions; `None` leaves the server's.
    pub lock_timeout: Option<Duration>,
    /// `synchronous_commit = local` on ordinary sessions: when walhook is a synchronous
    /// standby, its own commits must not wait for itself.
    pub local_commit: bool,
}

/// Default [`ConnPolicy::receive_timeout`], like the server's `wal_receiver_timeout`.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`ConnPolicy::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default [`ConnPolicy::lock_timeout`].
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for ConnPolicy {
    fn default() -> Self {
        ConnPolicy {
            allow_insecure_password: false,
            receive_timeout: DEFAULT_RECEIVE_TIMEOUT,
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
            lock_timeout: Some(DEFAULT_LOCK_TIMEOUT),
            local_commit: false,
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
    /// A libpq feature walhook does not implement, where ignoring it would weaken security.
    #[error("connection parameter {key} is not supported by walhook: {fix}")]
    Unsupported {
        key: &'static str,
        fix: &'static str,
    },
    /// The TLS settings contradict each other or name a missing file.
    #[error("{0}")]
    Tls(String),
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
    /// The home directory, for `~/.pgpass` and `~/.postgresql/`.
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
    pub(crate) host: Host,
    /// The name the server certificate must carry and SNI sends: `host`, else `hostaddr`.
    pub(crate) tls_host: Option<String>,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: Option<(Secret, PasswordSource)>,
    pub(crate) dbname: String,
    pub(crate) application_name: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) options: Option<String>,
    pub(crate) tls: TlsParams,
    pub(crate) keepalive: Keepalive,
    pub(crate) policy: ConnPolicy,
}

/// Keywords that are accepted and ignored because they do not apply to walhook's
/// connections; rejecting them would break connection strings copied from other tools.
const IGNORED_KEYWORDS: &[&str] = &[
    "target_session_attrs",
    "load_balance_hosts",
    "sslcompression",
    "sslcertmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
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
    "connect_timeout",
    "options",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "channel_binding",
    "gssencmode",
    "require_auth",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
];

/// The given keywords with libpq's fallbacks: an empty value counts as absent, then the
/// environment variable is read.
struct Lookup<'a> {
    given: HashMap<String, String>,
    env: &'a dyn Env,
}

impl Lookup<'_> {
    fn get(&self, key: &str, var: Option<&str>) -> Option<String> {
        self.given
            .get(key)
            .filter(|v| !v.is_empty())
            .cloned()
            .or_else(|| var.and_then(|v| self.env.var(v)).filter(|v| !v.is_empty()))
    }

    fn parsed<T>(
        &self,
        key: &str,
        var: Option<&str>,
        reason: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ConnError> {
        match self.get(key, var) {
            None => Ok(None),
            Some(v) => match parse(v.trim()) {
                Some(t) => Ok(Some(t)),
                None => Err(ConnError::InvalidValue {
                    key: key.to_owned(),
                    value: v,
                    reason,
                }),
            },
        }
    }

    fn seconds(&self, key: &str) -> Result<Option<Duration>, ConnError> {
        self.parsed(key, None, "expected a whole number of seconds", |v| {
            v.parse::<u64>().ok().map(Duration::from_secs)
        })
    }

    /// A file in `~/.postgresql/`, when it exists.
    fn home_file(&self, name: &str) -> Option<PathBuf> {
        let path = self.env.home_dir()?.join(".postgresql").join(name);
        path.is_file().then_some(path)
    }
}

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
        let look = Lookup { given, env };
        refuse_unsupported(&look)?;

        let host_name = look.get("host", Some("PGHOST"));
        let hostaddr = look.get("hostaddr", Some("PGHOSTADDR"));
        for h in [&host_name, &hostaddr].into_iter().flatten() {
            if h.contains(',') {
                return Err(ConnError::MultipleHosts(h.clone()));
            }
        }
        let host = match (&hostaddr, &host_name) {
            (Some(addr), _) => Host::Tcp(addr.clone()),
            (None, Some(h)) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            (None, Some(h)) => Host::Tcp(h.clone()),
            (None, None) => match env.default_socket_dir() {
                Some(dir) => Host::Unix(dir),
                None => Host::Tcp("localhost".to_owned()),
            },
        };
        let tls_host = match &host {
            Host::Unix(_) => None,
            Host::Tcp(addr) => Some(
                host_name
                    .clone()
                    .filter(|h| !h.starts_with('/'))
                    .unwrap_or_else(|| addr.clone()),
            ),
        };
        let port = look
            .parsed(
                "port",
                Some("PGPORT"),
                "expected a number from 1 to 65535",
                |p| p.parse::<u16>().ok().filter(|p| *p != 0),
            )?
            .unwrap_or(5432);
        let user = look
            .get("user", Some("PGUSER"))
            .or_else(|| env.os_user())
            .ok_or(ConnError::NoUser)?;
        let dbname = look
            .get("dbname", Some("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let application_name = look
            .get("application_name", Some("PGAPPNAME"))
            .or_else(|| look.get("fallback_application_name", None))
            .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned());
        let connect_timeout = connect_timeout(&look)?;
        let options = look.get("options", Some("PGOPTIONS"));
        let tls = tls_params(&look)?;
        let keepalive = keepalive(&look)?;

        // libpq matches socket connections against "localhost" in password files.
        let pass_host = match &host {
            Host::Tcp(_) => host_name
                .clone()
                .filter(|h| !h.starts_with('/'))
                .or(hostaddr.clone())
                .unwrap_or_default(),
            Host::Unix(_) => "localhost".to_owned(),
        };
        let password = password(&look, password_override, &pass_host, port, &dbname, &user);

        Ok(ConnectParams {
            host,
            tls_host,
            port,
            user,
            password,
            dbname,
            application_name,
            connect_timeout,
            options,
            tls,
            keepalive,
            policy: ConnPolicy::default(),
        })
    }

    /// The same parameters under walhook's connection `policy` (from `[source]`).
    pub fn with_policy(mut self, policy: ConnPolicy) -> ConnectParams {
        self.policy = policy;
        self
    }

    /// The database user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The host or socket directory connected to.
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

    /// The sslmode in effect.
    pub fn sslmode(&self) -> SslMode {
        self.tls.mode
    }

    /// The TLS settings.
    pub fn tls(&self) -> &TlsParams {
        &self.tls
    }

    /// The TCP keepalive settings.
    pub fn keepalive(&self) -> &Keepalive {
        &self.keepalive
    }

    /// walhook's connection policy.
    pub fn policy(&self) -> &ConnPolicy {
        &self.policy
    }

    /// How long connecting and authenticating may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Where the password came from, when there is one.
    pub fn password_source(&self) -> Option<&PasswordSource> {
        self.password.as_ref().map(|(_, s)| s)
    }

    /// The name checked against the server certificate, for TCP connections.
    pub fn tls_host(&self) -> Option<&str> {
        self.tls_host.as_deref()
    }

    /// `host:port`, or the socket path, for messages.
    pub fn host_description(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => socket_path(dir, self.port).display().to_string(),
        }
    }

    /// The parameters tokio-postgres needs for an ordinary (non-replication) session; the
    /// socket and TLS are set up by [`crate::db`], which overrides the sslmode per attempt.
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        use tokio_postgres::config::ChannelBinding as Cb;
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
            .channel_binding(match self.tls.channel_binding {
                ChannelBindingMode::Disable => Cb::Disable,
                ChannelBindingMode::Prefer => Cb::Prefer,
                ChannelBindingMode::Require => Cb::Require,
            })
            .connect_timeout(self.connect_timeout);
        if let Some((pw, _)) = &self.password {
            c.password(pw.expose());
        }
        c.options(self.session_options());
        c
    }

    /// The `options` startup parameter of ordinary sessions.
    fn session_options(&self) -> String {
        // walhook's statements are short and run thousands of times; JIT compiling one
        // (triggered by the inflated cost estimates of a queue table not yet analyzed)
        // costs 100-200 ms, far more than the statement. The timeouts keep a blocked
        // statement from hanging walhook forever. Options given in the connection string
        // come after, so a DBA can still override each.
        let mut o = String::from("-c jit=off");
        if let Some(t) = self.policy.statement_timeout {
            o.push_str(&format!(" -c statement_timeout={}", t.as_millis()));
        }
        if let Some(t) = self.policy.lock_timeout {
            o.push_str(&format!(" -c lock_timeout={}", t.as_millis()));
        }
        if self.policy.local_commit {
            o.push_str(" -c synchronous_commit=local");
        }
        if let Some(given) = &self.options {
            o.push(' ');
            o.push_str(given);
        }
        o
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
            self.tls.mode.as_str()
        );
        match &self.tls.root_cert {
            RootCert::None => {}
            RootCert::System => s.push_str(" sslrootcert=system"),
            RootCert::File(p) => s.push_str(&format!(" sslrootcert={}", p.display())),
        }
        if let Some((_, source)) = &self.password {
            s.push_str(&format!(" password=*** (from {source})"));
        }
        s
    }
}

pub(crate) fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Refuses libpq features whose silent absence would weaken security.
fn refuse_unsupported(look: &Lookup<'_>) -> Result<(), ConnError> {
    if look.get("require_auth", Some("PGREQUIREAUTH")).is_some() {
        return Err(ConnError::Unsupported {
            key: "require_auth",
            fix: "remove it; walhook refuses cleartext and md5 passwords over unencrypted TCP by itself, and channel_binding=require demands SCRAM with channel binding",
        });
    }
    if look.get("gssencmode", Some("PGGSSENCMODE")).as_deref() == Some("require") {
        return Err(ConnError::Unsupported {
            key: "gssencmode=require",
            fix: "GSSAPI encryption is not available; use TLS (sslmode=verify-full)",
        });
    }
    if look.get("sslcrldir", Some("PGSSLCRLDIR")).is_some() {
        return Err(ConnError::Unsupported {
            key: "sslcrldir",
            fix: "concatenate the revocation lists into one PEM file and name it with sslcrl",
        });
    }
    Ok(())
}

fn connect_timeout(look: &Lookup<'_>) -> Result<Duration, ConnError> {
    let secs = look.parsed(
        "connect_timeout",
        Some("PGCONNECT_TIMEOUT"),
        "expected a whole number of seconds",
        |t| t.parse::<i64>().ok(),
    )?;
    Ok(match secs {
        // libpq: zero or negative means wait forever; walhook keeps a bound.
        None => DEFAULT_CONNECT_TIMEOUT,
        Some(s) if s <= 0 => DEFAULT_CONNECT_TIMEOUT,
        // libpq raises timeouts below 2 s to 2 s.
        Some(s) => Duration::from_secs(s.max(2).unsigned_abs()),
    })
}

fn keepalive(look: &Lookup<'_>) -> Result<Keepalive, ConnError> {
    let enabled = look
        .parsed("keepalives", None, "expected 1 or 0", |v| match v {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        })?
        .unwrap_or(true);
    let count = look.parsed("keepalives_count", None, "expected a whole number", |v| {
        v.parse::<u32>().ok()
    })?;
    let user_timeout = look.parsed(
        "tcp_user_timeout",
        None,
        "expected a whole number of milliseconds",
        |v| v.parse::<u64>().ok(),
    )?;
    // libpq: zero means the system default.
    let nonzero =
        |d: Option<Duration>, default: Duration| d.filter(|d| !d.is_zero()).unwrap_or(default);
    Ok(Keepalive {
        enabled,
        idle: nonzero(look.seconds("keepalives_idle")?, DEFAULT_KEEPALIVES_IDLE),
        interval: nonzero(
            look.seconds("keepalives_interval")?,
            DEFAULT_KEEPALIVES_INTERVAL,
        ),
        count: count.filter(|c| *c > 0).unwrap_or(DEFAULT_KEEPALIVES_COUNT),
        user_timeout: match user_timeout {
            None => Some(DEFAULT_TCP_USER_TIMEOUT),
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        },
    })
}

fn tls_params(look: &Lookup<'_>) -> Result<TlsParams, ConnError> {
    let given_mode = look.parsed(
        "sslmode",
        Some("PGSSLMODE"),
        "expected disable, allow, prefer, require, verify-ca or verify-full",
        SslMode::parse,
    )?;
    let root_given = look.get("sslrootcert", Some("PGSSLROOTCERT"));
    let (mode, root_cert) = match root_given.as_deref() {
        Some("system") => {
            // As libpq 16: the system store implies verify-full, and nothing weaker.
            let mode = given_mode.unwrap_or(SslMode::VerifyFull);
            if mode != SslMode::VerifyFull {
                return Err(ConnError::Tls(format!(
                    "sslmode={} may not be used with sslrootcert=system; use sslmode=verify-full",
                    mode.as_str()
                )));
            }
            (mode, RootCert::System)
        }
        Some(path) => {
            let mode = given_mode.unwrap_or(SslMode::Prefer);
            let path = PathBuf::from(path);
            if path.is_file() {
                (mode, RootCert::File(path))
            } else if mode.verifies() {
                return Err(ConnError::Tls(format!(
                    "root certificate file \"{}\" does not exist (sslmode={}); provide the file, use sslrootcert=system for the OS trust store, or choose an sslmode that does not verify the server",
                    path.display(),
                    mode.as_str()
                )));
            } else {
                (mode, RootCert::None)
            }
        }
        None => {
            let mode = given_mode.unwrap_or(SslMode::Prefer);
            match look.home_file("root.crt") {
                // libpq: with a root certificate present, require behaves like verify-ca.
                Some(path) => (mode, RootCert::File(path)),
                None if mode.verifies() => {
                    return Err(ConnError::Tls(format!(
                        "sslmode={} needs a root certificate to check the server against: set sslrootcert=/path/to/ca.pem, or sslrootcert=system for the OS trust store (~/.postgresql/root.crt does not exist)",
                        mode.as_str()
                    )));
                }
                None => (mode, RootCert::None),
            }
        }
    };
    let crl = look
        .get("sslcrl", Some("PGSSLCRL"))
        .map(PathBuf::from)
        .or_else(|| look.home_file("root.crl"));
    let channel_binding = look
        .parsed(
            "channel_binding",
            Some("PGCHANNELBINDING"),
            "expected disable, prefer or require",
            |v| match v {
                "disable" => Some(ChannelBindingMode::Disable),
                "prefer" => Some(ChannelBindingMode::Prefer),
                "require" => Some(ChannelBindingMode::Require),
                _ => None,
            },
        )?
        .unwrap_or(ChannelBindingMode::Prefer);
    if channel_binding == ChannelBindingMode::Require && mode == SslMode::Disable {
        return Err(ConnError::Tls(
            "channel_binding=require needs TLS, but sslmode=disable; use sslmode=verify-full"
                .to_owned(),
        ));
    }
    let negotiation = look
        .parsed(
            "sslnegotiation",
            Some("PGSSLNEGOTIATION"),
            "expected postgres or direct",
            |v| match v {
                "postgres" => Some(SslNegotiation::Postgres),
                "direct" => Some(SslNegotiation::Direct),
                _ => None,
            },
        )?
        .unwrap_or(SslNegotiation::Postgres);
    if negotiation == SslNegotiation::Direct && !mode.requires_tls() {
        return Err(ConnError::Tls(format!(
            "sslnegotiation=direct needs sslmode=require or stronger, not {}",
            mode.as_str()
        )));
    }
    let version = |key: &str, var: &str| {
        look.parsed(
            key,
            Some(var),
            "expected TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3",
            TlsVersion::parse,
        )
    };
    let min_version =
        version("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION")?.unwrap_or(TlsVersion::V1_2);
    let max_version = version("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION")?;
    if let Some(max) = max_version
        && (max < TlsVersion::V1_2 || max < min_version)
    {
        return Err(ConnError::Tls(
            "ssl_max_protocol_version is below TLSv1.2 or below ssl_min_protocol_version; walhook speaks TLS 1.2 and 1.3".to_owned(),
        ));
    }
    let sni = look
        .parsed("sslsni", Some("PGSSLSNI"), "expected 1 or 0", |v| match v {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        })?
        .unwrap_or(true);
    Ok(TlsParams {
        mode,
        root_cert,
        client_cert: client_cert(look)?,
        crl,
        sni,
        min_version,
        max_version,
        channel_binding,
        negotiation,
    })
}

/// `sslcert` / `sslkey`, defaulting to `~/.postgresql/postgresql.{crt,key}` as libpq does.
fn client_cert(look: &Lookup<'_>) -> Result<Option<(PathBuf, PathBuf)>, ConnError> {
    let cert = match look.get("sslcert", Some("PGSSLCERT")) {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_file() {
                // libpq goes on without a client certificate; say so, since a server that
                // wants one will refuse the login with a less helpful message.
                tracing::warn!(
                    file = %path.display(),
                    "sslcert names a file that does not exist; connecting without a client certificate"
                );
                return Ok(None);
            }
            path
        }
        None => match look.home_file("postgresql.crt") {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let key = look
        .get("sslkey", Some("PGSSLKEY"))
        .map(PathBuf::from)
        .or_else(|| look.home_file("postgresql.key"))
        .filter(|k| k.is_file())
        .ok_or_else(|| {
            ConnError::Tls(format!(
                "client certificate \"{}\" has no private key: set sslkey to its key file",
                cert.display()
            ))
        })?;
    Ok(Some((cert, key)))
}

fn password(
    look: &Lookup<'_>,
    password_override: Option<&str>,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<(Secret, PasswordSource)> {
    if let Some(p) = password_override.filter(|p| !p.is_empty()) {
        return Some((Secret::new(p.to_owned()), PasswordSource::Config));
    }
    if let Some(p) = look.given.get("password").filter(|p| !p.is_empty()) {
        return Some((Secret::new(p.clone()), PasswordSource::ConnString));
    }
    if let Some(p) = look.env.var("PGPASSWORD").filter(|p| !p.is_empty()) {
        return Some((Secret::new(p), PasswordSource::PgPassword));
    }
    let file = look
        .get("passfile", Some("PGPASSFILE"))
        .map(PathBuf::from)
        .or_else(|| look.env.home_dir().map(|h| h.join(".pgpass")))?;
    let pw = pgpass_lookup(&file, host, port, dbname, user)?;
    Some((Secret::new(pw), PasswordSource::PassFile(file)))
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

    fn home_with(files: &[&str]) -> (tempfile::TempDir, FakeEnv) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".postgresql")).unwrap();
        for f in files {
            std::fs::write(dir.path().join(".postgresql").join(f), "x").unwrap();
        }
        let mut e = env(&[]);
        e.home = Some(dir.path().to_owned());
        (dir, e)
    }

    #[test]
    fn tls_settings_follow_libpq() {
        let (_home, e) = home_with(&[]);
        // The default: prefer, nothing to check the server against.
        let p = parse("host=db", &e);
        assert_eq!(p.sslmode(), SslMode::Prefer);
        assert_eq!(p.tls().root_cert, RootCert::None);
        assert!(!p.tls().verifies_chain());
        assert_eq!(p.tls_host(), Some("db"));
        // verify modes need a root certificate, named in the message.
        for mode in ["verify-ca", "verify-full"] {
            let err = ConnectParams::parse_with_env(&format!("host=db sslmode={mode}"), None, &e)
                .unwrap_err();
            assert!(matches!(err, ConnError::Tls(_)), "{err}");
            assert!(err.to_string().contains("sslrootcert"), "{err}");
            let err = ConnectParams::parse_with_env(
                &format!("host=db sslmode={mode} sslrootcert=/nonexistent/ca.pem"),
                None,
                &e,
            )
            .unwrap_err();
            assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        }
        // A missing root file is no error where nothing is verified.
        let p = parse(
            "host=db sslmode=require sslrootcert=/nonexistent/ca.pem",
            &e,
        );
        assert_eq!(p.tls().root_cert, RootCert::None);

        // With ~/.postgresql/root.crt present, require checks the chain (libpq's rule).
        let (home, e) = home_with(&["root.crt"]);
        let p = parse("host=db sslmode=require", &e);
        let root = home.path().join(".postgresql/root.crt");
        assert_eq!(p.tls().root_cert, RootCert::File(root));
        assert!(p.tls().verifies_chain() && !p.tls().verifies_host());
        let p = parse("host=db sslmode=verify-full", &e);
        assert!(p.tls().verifies_chain() && p.tls().verifies_host());

        // sslrootcert=system implies verify-full and refuses anything weaker.
        let p = parse("host=db sslrootcert=system", &e);
        assert_eq!(p.sslmode(), SslMode::VerifyFull);
        assert_eq!(p.tls().root_cert, RootCert::System);
        let err =
            ConnectParams::parse_with_env("host=db sslrootcert=system sslmode=require", None, &e)
                .unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
    }

    #[test]
    fn tls_settings_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let cert = dir.path().join("client.crt");
        let key = dir.path().join("client.key");
        std::fs::write(&cert, "x").unwrap();
        std::fs::write(&key, "x").unwrap();
        let e = env(&[
            ("PGSSLMODE", "verify-ca"),
            ("PGSSLROOTCERT", ca.to_str().unwrap()),
            ("PGSSLCERT", cert.to_str().unwrap()),
            ("PGSSLKEY", key.to_str().unwrap()),
            ("PGCHANNELBINDING", "require"),
        ]);
        let p = parse("postgres://u@db/app", &e);
        assert_eq!(p.sslmode(), SslMode::VerifyCa);
        assert_eq!(p.tls().root_cert, RootCert::File(ca));
        assert_eq!(p.tls().client_cert, Some((cert.clone(), key)));
        assert_eq!(p.tls().channel_binding, ChannelBindingMode::Require);
        // The string wins over the environment.
        let p = parse(
            "postgres://u@db/app?sslmode=disable&channel_binding=prefer",
            &e,
        );
        assert_eq!(p.sslmode(), SslMode::Disable);
        // A certificate without a key is an error naming the certificate.
        let e = env(&[("PGSSLCERT", cert.to_str().unwrap())]);
        let err =
            ConnectParams::parse_with_env("host=db sslkey=/nonexistent", None, &e).unwrap_err();
        assert!(err.to_string().contains("client.crt"), "{err}");
    }

    #[test]
    fn contradictions_and_weakening_features_are_refused() {
        let e = env(&[]);
        for bad in [
            "sslmode=disable channel_binding=require",
            "sslmode=prefer sslnegotiation=direct",
            "ssl_max_protocol_version=TLSv1.1",
            "ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
            "require_auth=scram-sha-256",
            "gssencmode=require",
            "sslcrldir=/etc/crl",
            "sslsni=2",
            "channel_binding=always",
        ] {
            let err = ConnectParams::parse_with_env(bad, None, &e).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Config, "{bad}: {err}");
        }
        let p = parse("sslmode=require sslnegotiation=direct", &e);
        assert_eq!(p.tls().negotiation, SslNegotiation::Direct);
    }

    #[test]
    fn hostaddr_is_dialled_and_host_is_verified() {
        let p = parse("host=db.example.com hostaddr=10.1.2.3", &env(&[]));
        assert_eq!(p.host(), &Host::Tcp("10.1.2.3".into()));
        assert_eq!(p.tls_host(), Some("db.example.com"));
        let p = parse("hostaddr=10.1.2.3", &env(&[]));
        assert_eq!(p.tls_host(), Some("10.1.2.3"));
        let p = parse("host=/run/pg", &env(&[]));
        assert_eq!(p.tls_host(), None);
    }

    #[test]
    fn keepalives_default_to_walhook_values_and_follow_the_string() {
        let p = parse("host=db", &env(&[]));
        let k = p.keepalive();
        assert!(k.enabled);
        assert_eq!(k.idle, DEFAULT_KEEPALIVES_IDLE);
        assert_eq!(k.interval, DEFAULT_KEEPALIVES_INTERVAL);
        assert_eq!(k.count, DEFAULT_KEEPALIVES_COUNT);
        assert_eq!(k.user_timeout, Some(DEFAULT_TCP_USER_TIMEOUT));
        let p = parse(
            "host=db keepalives=0 keepalives_idle=5 keepalives_interval=2 keepalives_count=7 tcp_user_timeout=0",
            &env(&[]),
        );
        let k = p.keepalive();
        assert!(!k.enabled);
        assert_eq!(k.idle, Duration::from_secs(5));
        assert_eq!(k.interval, Duration::from_secs(2));
        assert_eq!(k.count, 7);
        assert_eq!(k.user_timeout, None);
        assert!(ConnectParams::parse_with_env("keepalives_idle=soon", None, &env(&[])).is_err());
    }

    #[test]
    fn session_options_carry_the_timeouts_before_the_given_options() {
        let p = parse("host=db options='-c work_mem=64MB'", &env(&[])).with_policy(ConnPolicy {
            statement_timeout: Some(Duration::from_secs(300)),
            lock_timeout: Some(Duration::from_millis(1500)),
            ..ConnPolicy::default()
        });
        assert_eq!(
            p.to_tokio_postgres().get_options(),
            Some("-c jit=off -c statement_timeout=300000 -c lock_timeout=1500 -c work_mem=64MB")
        );
        let p = parse("host=db", &env(&[])).with_policy(ConnPolicy {
            statement_timeout: None,
            lock_timeout: None,
            ..ConnPolicy::default()
        });
        assert_eq!(p.to_tokio_postgres().get_options(), Some("-c jit=off"));
    }
}

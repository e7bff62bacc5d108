//! A throwaway local PostgreSQL cluster for tests and `walhook demo`.
//!
//! initdb into a temporary directory, `wal_level=logical`, its own port and socket
//! directory, stopped and removed on drop. PostgreSQL refuses to run as root, so when the
//! process is root the cluster is created and run as the unprivileged `postgres` user.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Why a throwaway cluster could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked for initdb in $PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH); install the postgresql server package or set PG_BINDIR"
    )]
    NoBinaries,
    /// Running as root and no unprivileged `postgres` user exists.
    #[error(
        "running as root, and PostgreSQL refuses to run as root; create an unprivileged user named 'postgres' (useradd --system postgres)"
    )]
    NoUnprivilegedUser,
    /// A filesystem operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL tool exited with an error.
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        tool: String,
        status: String,
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Options for [`LocalCluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines, e.g. `wal_level = replica`.
    pub extra_conf: Vec<String>,
    /// `pg_hba.conf` content replacing the default trust-everything file.
    pub hba: Option<String>,
    /// A server certificate and key: the cluster starts with `ssl = on`.
    pub ssl: Option<ServerTls>,
}

/// The PEM certificate (chain) and private key of a TLS-enabled cluster.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server certificate, optionally followed by intermediates.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// A running throwaway cluster.
pub struct LocalCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    stopped: bool,
}

/// The superuser created by initdb in a [`LocalCluster`].
pub const SUPERUSER: &str = "postgres";

impl LocalCluster {
    /// Starts a cluster with default options.
    pub fn start() -> Result<Self, ClusterError> {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts a cluster with extra configuration.
    pub fn start_with(options: ClusterOptions) -> Result<Self, ClusterError> {
        let bindir = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(ClusterError::NoUnprivilegedUser)?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("walhook-pg-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(
                dir.path(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| ClusterError::Io {
                what: format!("chown {} to postgres", dir.path().display()),
                source: e.into(),
            })?;
        }
        let mut cluster = LocalCluster {
            dir,
            bindir,
            port: 0,
            run_as,
            stopped: true,
        };
        let data = cluster.data_dir();
        cluster.run_tool(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        let socket_dir = cluster.socket_dir();
        let mut conf = format!(
            "\n# walhook throwaway cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\nfull_page_writes = off\nshared_buffers = 64MB\nmax_connections = 100\nlog_min_messages = warning\nlogging_collector = off\n",
            socket_dir.display()
        );
        for line in &options.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        if let Some(tls) = &options.ssl {
            cluster.write_private(&data.join("server.crt"), &tls.cert_pem)?;
            cluster.write_private(&data.join("server.key"), &tls.key_pem)?;
            conf.push_str("ssl = on\n");
        }
        append(&data.join("postgresql.conf"), &conf)?;
        if let Some(hba) = &options.hba {
            std::fs::write(data.join("pg_hba.conf"), hba).map_err(io("writing pg_hba.conf"))?;
        }
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Writes a file only the cluster's owner may read (the server refuses a key others can).
    fn write_private(&self, path: &Path, text: &str) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let what = format!("writing {}", path.display());
        std::fs::write(path, text).map_err(io(what.clone()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(what.clone()))?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| ClusterError::Io {
                what,
                source: e.into(),
            })?;
        }
        Ok(())
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// The directory of the server binaries used.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A libpq URL for `database` as the superuser over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A libpq URL for `database` as `user` (no password) over TCP.
    pub fn url_as(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `psql -c sql` against `database` as the superuser and returns its stdout.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let port = self.port.to_string();
        let out = self.run_tool(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) -> Result<(), ClusterError> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", crate::types::quote_ident(name)),
        )
        .map(|_| ())
    }

    /// `pg_ctl restart -m fast`: what an operator does; clients are disconnected.
    pub fn restart_fast(&mut self) -> Result<(), ClusterError> {
        self.stop_server("fast")?;
        self.start_server()
    }

    /// Stops the server with the given pg_ctl mode (`smart`, `fast`, `immediate`).
    pub fn stop_server(&mut self, mode: &str) -> Result<(), ClusterError> {
        let data = self.data_dir();
        self.run_tool(
            "pg_ctl",
            &["stop", "-D", path_str(&data), "-m", mode, "-w", "-t", "60"],
        )?;
        self.stopped = true;
        Ok(())
    }

    /// Starts the server again on the same port (a new port is chosen on first start).
    pub fn start_server(&mut self) -> Result<(), ClusterError> {
        if self.port == 0 {
            self.port = free_port()?;
        }
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let opts = format!("-p {}", self.port);
        self.run_tool(
            "pg_ctl",
            &[
                "start",
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
            ],
        )?;
        self.stopped = false;
        Ok(())
    }

    /// The server log so far (for test failure messages).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs a tool from the server's bin directory as the cluster's owner.
    pub fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output, ClusterError> {
        let mut cmd = self.command(tool);
        cmd.args(args);
        let out = cmd.output().map_err(io(format!("running {tool}")))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ClusterError::Tool {
                tool: tool.to_owned(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_owned(),
            })
        }
    }

    /// A `Command` for a server tool, set up to run as the cluster's owner.
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(tool));
        cmd.current_dir(self.dir.path());
        cmd.env("PGHOST", self.socket_dir());
        cmd.env_remove("PGPASSWORD");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
            cmd.env("HOME", self.dir.path());
        }
        cmd
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.stopped {
            let data = self.data_dir();
            let _ = self.run_tool(
                "pg_ctl",
                &["stop", "-D", path_str(&data), "-m", "immediate"],
            );
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn append(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    let port = l.local_addr().map_err(io("finding a free port"))?.port();
    Ok(port)
}

/// Finds the PostgreSQL server binaries: `$PG_BINDIR`, `pg_config --bindir`,
/// the newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("PG_BINDIR").map(PathBuf::from)
        && has_initdb(&d)
    {
        return Some(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&d) {
            return Some(d);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, d)| has_initdb(d))
            .collect();
        versions.sort();
        if let Some((_, d)) = versions.pop() {
            return Some(d);
        }
    }
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).find(|d| has_initdb(d)))
}

//! Test support: a throwaway PostgreSQL cluster and a fresh database per test.
#![allow(dead_code)]

pub mod nats;
pub mod oauth;
pub mod queue;
pub mod receiver;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use walhook::cluster::{ClusterOptions, LocalCluster, ServerTls};

/// A fresh database for one test: in its own throwaway cluster, or, when
/// `WALHOOK_TEST_DATABASE_URL` is set, on that existing server.
pub struct TestDb {
    /// The cluster, when the test owns one.
    pub cluster: Option<LocalCluster>,
    /// The database name.
    pub name: String,
    /// URL of the database as a superuser.
    pub url: String,
    admin_url: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A database with default cluster options.
    pub fn new() -> TestDb {
        Self::with_options(ClusterOptions::default())
    }

    /// A database in a cluster started with `options` (ignored with an external server).
    pub fn with_options(options: ClusterOptions) -> TestDb {
        let name = format!(
            "walhook_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        if let Ok(admin_url) = std::env::var("WALHOOK_TEST_DATABASE_URL") {
            let out = std::process::Command::new("psql")
                .args([admin_url.as_str(), "-X", "-q", "-c"])
                .arg(format!("CREATE DATABASE \"{name}\""))
                .output()
                .expect("psql must be on PATH to use WALHOOK_TEST_DATABASE_URL");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let url = replace_db(&admin_url, &name);
            return TestDb {
                cluster: None,
                name,
                url,
                admin_url,
            };
        }
        let cluster = LocalCluster::start_with(options).expect("start throwaway cluster");
        cluster.create_database(&name).expect("create database");
        let url = cluster.url(&name);
        let admin_url = cluster.url("postgres");
        TestDb {
            cluster: Some(cluster),
            name,
            url,
            admin_url,
        }
    }

    /// The owned cluster; panics for an external server (tests that restart the server need one).
    pub fn cluster(&mut self) -> &mut LocalCluster {
        self.cluster
            .as_mut()
            .expect("this test needs its own cluster; unset WALHOOK_TEST_DATABASE_URL")
    }

    /// A tokio-postgres client on the test database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Runs statements (simple query protocol).
    pub async fn execute(&self, sql: &str) {
        let c = self.client().await;
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cluster.is_none() {
            let _ = std::process::Command::new("psql")
                .args([self.admin_url.as_str(), "-X", "-q", "-c"])
                .arg(format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.name
                ))
                .output();
        }
    }
}

fn replace_db(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && !url[i..].contains('@') => {
            let rest = &url[i + 1..];
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{}/{db}{query}", &url[..i])
        }
        _ => format!("{url} dbname={db}"),
    }
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small generator for the random moments of fault tests; print `seed` on failure.
pub struct XorShift {
    /// The starting state, to reproduce a run.
    pub seed: u64,
    state: u64,
}

impl XorShift {
    /// Seeded from the clock.
    pub fn from_clock() -> XorShift {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 | 1)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        XorShift { seed, state: seed }
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % n
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// The `confirmed_flush_lsn` of slot `walhook`, once it exists.
pub async fn slot_confirmed(c: &tokio_postgres::Client) -> Option<walhook::types::Lsn> {
    let row = c
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walhook'",
            &[],
        )
        .await
        .ok()??;
    row.get::<_, Option<String>>(0)?.parse().ok()
}

/// The server's current WAL insert position.
pub async fn current_insert_lsn(c: &tokio_postgres::Client) -> walhook::types::Lsn {
    let s: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("pg_current_wal_insert_lsn")
        .get(0);
    s.parse().expect("an LSN")
}

/// A `[[monitor]]` block sending every alert at once to `url`.
pub fn monitor_toml(url: &str) -> String {
    format!("\n[[monitor]]\nname = \"ops\"\nurl = \"{url}\"\nmin_interval = \"0s\"\n")
}

/// The path of the built `walhook` binary.
pub fn walhook_bin() -> &'static str {
    env!("CARGO_BIN_EXE_walhook")
}

/// Writes `toml` to a fresh temporary directory and returns (dir, path).
pub fn write_config(toml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walhook.toml");
    std::fs::write(&path, toml).expect("write config");
    (dir, path)
}

/// A `walhook run` child process whose stderr goes to a file.
pub struct Daemon {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    /// The config file the daemon was started with (rewrite it and `hup()` to reload).
    pub config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `walhook --log-format text run --config <toml>`.
    pub fn start(toml: &str) -> Daemon {
        Self::start_with(toml, "text", |_| {})
    }

    /// Starts `walhook --log-format <log_format> run --config <toml>`; `configure` may add to
    /// the command (environment) before it is spawned.
    pub fn start_with(
        toml: &str,
        log_format: &str,
        configure: impl FnOnce(&mut std::process::Command),
    ) -> Daemon {
        let (dir, path) = write_config(toml);
        let log = dir.path().join("walhook.log");
        let mut command = std::process::Command::new(walhook_bin());
        command
            .args(["--log-format", log_format, "run", "--config"])
            .arg(&path)
            .env("WALHOOK_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        configure(&mut command);
        let child = command.spawn().expect("spawn walhook");
        Daemon {
            child,
            log,
            config: path,
            _dir: dir,
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGHUP (reload the configuration).
    pub fn hup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait walhook")
    }

    /// Peak resident set size in kB (VmHWM) while the process is alive.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `walhook ARGS` to completion and returns (exit code, stdout, stderr).
pub fn walhook(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(walhook_bin())
        .args(args)
        .env("WALHOOK_LOG", "warn")
        .output()
        .expect("run walhook");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `toml` to a file and runs `walhook setup` on it (queue, publication, slot and any
/// NATS streams); returns (dir, path).
pub fn setup(toml: &str) -> (tempfile::TempDir, String) {
    let (dir, path) = write_config(toml);
    let path = path.to_str().expect("a UTF-8 temp path").to_owned();
    let (code, out, err) = walhook(&["setup", "--config", &path]);
    assert_eq!(code, 0, "{out}{err}");
    (dir, path)
}

/// A minimal config for `url` with the given `[[entity]]` blocks and fast batching.
pub fn config_toml(url: &str, entities: &str) -> String {
    format!(
        r#"[source]
url = "{url}"
slot = "walhook"
publication = "walhook"
heartbeat = "1s"
status_interval = "1s"

[queue]
batch_delay = "5ms"

{entities}
"#
    )
}

/// An `[[entity]]` block for the `customer` table as entity `Customer`.
pub const CUSTOMER_ENTITY: &str = "\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n";

/// A `[[listener]]` block with a fast backoff (100ms up to 1s).
pub fn listener_toml(name: &str, url: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n"
    )
}

/// Waits until `walhook.new` is empty: every notification was delivered or failed.
pub async fn wait_queue_drained(c: &tokio_postgres::Client) {
    eventually(Duration::from_secs(30), "queue drained", || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM walhook.new", &[])
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .await;
}

/// Rows of walhook.failed, any listener.
pub async fn failed_total(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM walhook.failed", &[])
        .await
        .expect("walhook.failed")
        .get(0)
}

/// Counts rows of `walhook.event`, 0 before the table exists.
pub async fn event_count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM walhook.event", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

/// Waits until walhook streams from its slot (`walhook`); changes made before that are not
/// captured, since the slot may not exist yet.
pub async fn wait_streaming(c: &tokio_postgres::Client) {
    eventually(
        Duration::from_secs(60),
        "walhook streaming from its slot",
        || async {
            let n: i64 = c
            .query_one(
                // A slot being created is active under the creating backend, before its
                // consistent point: only a walsender streaming from it counts.
                "SELECT count(*) FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
                 WHERE s.slot_name = 'walhook' AND a.backend_type = 'walsender'",
                &[],
            )
            .await
            .ok()?
            .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
}

/// An `Updated` entity event built by hand for queue and delivery tests: `row` must be a
/// JSON object; the subject is `{entity}/{id}`.
pub fn entity_event(
    lsn: u64,
    seq: u32,
    entity: &str,
    id: &str,
    row: serde_json::Value,
    changed: &[&str],
) -> walhook::mapper::EntityEvent {
    use walhook::types::{Action, EntityName, Lsn, TableName, Xid};
    let serde_json::Value::Object(row) = row else {
        panic!("row must be a JSON object");
    };
    walhook::mapper::EntityEvent {
        commit_lsn: Lsn(lsn),
        seq,
        xid: Xid(4242),
        // 2024-01-02T03:04:05.123456Z
        commit_time: walhook::replication::pgoutput::PgTimestamp(757_479_845_123_456),
        entity: EntityName::new(entity).expect("entity name"),
        table: TableName {
            schema: "public".into(),
            name: entity.to_lowercase(),
        },
        entity_id: id.to_owned(),
        action: Action::Updated,
        derived: None,
        variant: None,
        changed_fields: Some(changed.iter().map(|c| (*c).to_owned()).collect()),
        row,
        old: None,
        subject: Some(format!("{entity}/{id}")),
        only_listener: None,
    }
}

/// The service in-process, as `walhook run` runs it.
pub struct Running {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), walhook::service::ServiceError>>,
}

impl Running {
    pub fn start(toml: &str) -> Running {
        let config = walhook::config::Config::parse(toml, std::path::Path::new("test.toml"))
            .expect("valid config");
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(walhook::service::run(config, stop.clone()));
        Running { stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("service stops within 30s")
            .expect("service task");
        r.expect("service ends without error");
    }
}

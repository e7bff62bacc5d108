//! A throwaway nats-server with JetStream for tests: its own temp dir, a free 127.0.0.1
//! port, stopped and started again on the same port and store (outages), killed on drop.
//! Also what the NATS delivery tests share: listener blocks, the counter-table load and the
//! checks of what a stream holds, read back with the consumer of examples/nats_consumer.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The durable consumer of examples/nats_consumer.rs.
#[allow(dead_code)]
#[path = "../../examples/nats_consumer.rs"]
pub mod consumer;

/// The nats-server binary: `$WALHOOK_NATS_SERVER`, Debian's /usr/sbin/nats-server, or PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WALHOOK_NATS_SERVER") {
        return PathBuf::from(p);
    }
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nats-server")
}

/// A running (or stopped) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    /// How many stops needed SIGKILL: a killed server may lose messages it acknowledged
    /// but had not yet written, which a test must not blame on walhook.
    pub killed: u32,
}

impl NatsServer {
    /// A server with JetStream and nothing else configured.
    pub async fn start() -> NatsServer {
        Self::start_with("").await
    }

    /// A server whose config file also holds `extra` (authorization, max_payload …).
    pub async fn start_with(extra: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = super::free_port();
        let mut server = NatsServer {
            child: None,
            port,
            dir,
            killed: 0,
        };
        server.configure(true, extra);
        server.resume().await;
        server
    }

    /// Writes the config the next [`Self::resume`] starts with: JetStream on its store (the
    /// same one every time) or off, plus `extra`.
    pub fn configure(&self, jetstream: bool, extra: &str) {
        let store = self.dir.path().join("js");
        let jetstream = if jetstream {
            format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", store.display())
        } else {
            String::new()
        };
        let conf = format!("listen: 127.0.0.1:{}\n{jetstream}{extra}\n", self.port);
        std::fs::write(self.dir.path().join("nats.conf"), conf).expect("write nats.conf");
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Starts the server (again) on the same port and store, and waits until it answers.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(self.dir.path().join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); install the Debian package nats-server")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.log().contains("Server is ready")
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server (SIGTERM, then waits); its store is kept for `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                self.killed += 1;
                eprintln!("nats-server did not exit within 30 s of SIGTERM: killed");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// A JetStream context on the server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url())
            .await
            .expect("connect to the test nats-server");
        async_nats::jetstream::new(client)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A NATS listener block: `name` on `url`, 3 s timeout, fast retries, then `extra` lines.
pub fn nats_listener(name: &str, url: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\ntimeout = \"3s\"\nbackoff = {{ initial = \"200ms\", max = \"1s\" }}\n{extra}"
    )
}

/// A `[listener.nats.stream]` section: `walhook setup` creates stream WALHOOK (api.event.*).
pub const STREAM: &str = "[listener.nats.stream]\nname = \"WALHOOK\"\n";

/// Tables `customer` and `orders` with full replica identity (entities [`ENTITIES`]).
pub const TABLES: &str = "CREATE TABLE customer (id int PRIMARY KEY, first_name text, city text);
ALTER TABLE customer REPLICA IDENTITY FULL;
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;";

/// Entities `Customer` (table customer) and `Order` (table orders).
pub const ENTITIES: &str = "
[[entity]]
name = \"Customer\"
table = \"customer\"

[[entity]]
name = \"Order\"
table = \"orders\"
";

/// A customer table whose counter `n` only grows: per-entity order is visible in the rows.
pub const COUNTER_TABLE: &str = "CREATE TABLE customer (id int PRIMARY KEY, n int NOT NULL);
ALTER TABLE customer REPLICA IDENTITY FULL;";

/// Inserts `rows` customers with n = 0, then adds 1 to every n `rounds` times, 1000 rows per
/// statement: rows × (1 + rounds) events.
pub async fn counter_load(url: String, rows: i32, rounds: i32) {
    let c = super::connect(&url).await;
    for chunk in 0..rows / 1000 {
        let from = chunk * 1000 + 1;
        c.execute(
            "INSERT INTO customer SELECT g, 0 FROM generate_series($1::int, $2::int) g",
            &[&from, &(from + 999)],
        )
        .await
        .expect("insert customers");
    }
    for _ in 0..rounds {
        for chunk in 0..rows / 1000 {
            let from = chunk * 1000 + 1;
            c.execute(
                "UPDATE customer SET n = n + 1 WHERE id BETWEEN $1 AND $2",
                &[&from, &(from + 999)],
            )
            .await
            .expect("update customers");
        }
    }
}

/// Inserts customers `from` to `to` (n = 0) in one statement.
pub async fn insert_customers(c: &tokio_postgres::Client, from: i32, to: i32) {
    c.execute(
        "INSERT INTO customer SELECT g, 0 FROM generate_series($1::int, $2::int) g",
        &[&from, &to],
    )
    .await
    .expect("insert customers");
}

/// The changes the outage tests make while NATS is down, after customers 1–500: 15 times
/// 100 new customers and an update of customers 1–100, 3,000 events.
pub async fn changes_during_an_outage(c: &tokio_postgres::Client) {
    for k in 0..15 {
        insert_customers(c, 501 + k * 100, 600 + k * 100).await;
        c.execute("UPDATE customer SET n = n + 1 WHERE id <= 100", &[])
            .await
            .expect("update customers");
    }
}

/// Inserts customers (n = 0) in transactions of 5 rows until `stop`; returns how many.
pub async fn steady_inserts(url: String, stop: Arc<AtomicBool>) -> i32 {
    let c = super::connect(&url).await;
    let mut inserted = 0;
    while !stop.load(Ordering::Relaxed) {
        c.execute(
            "INSERT INTO customer SELECT g, 0 FROM generate_series($1::int, $2::int) g",
            &[&(inserted + 1), &(inserted + 5)],
        )
        .await
        .expect("insert customers");
        inserted += 5;
        // Paced: a steady load that lasts through the test's faults.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    inserted
}

/// Reads every message of `filter` in stream WALHOOK with durable consumer `durable`, until
/// `n` arrived.
pub async fn read_all(
    js: &async_nats::jetstream::Context,
    durable: &str,
    filter: &str,
    n: usize,
    timeout: Duration,
) -> Vec<consumer::Received> {
    read_stream(js, "WALHOOK", durable, filter, n, timeout).await
}

/// Reads every message of `filter` in `stream` with durable consumer `durable`, until `n`
/// arrived.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    n: usize,
    timeout: Duration,
) -> Vec<consumer::Received> {
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    fetch_until(js, stream, durable, filter, |batch| {
        got.extend(batch);
        assert!(
            got.len() >= n || Instant::now() < deadline,
            "only {} of {n} messages on {filter}",
            got.len()
        );
        got.len() >= n
    })
    .await;
    got
}

/// Fetches `stream`'s messages matching `filter` (all when empty) with durable consumer
/// `durable`, handing each batch (maybe empty) to `enough` until it says so.
async fn fetch_until(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    mut enough: impl FnMut(Vec<consumer::Received>) -> bool,
) {
    let c = consumer::durable_consumer(js, stream, durable, filter, consumer::ACK_WAIT, 5)
        .await
        .expect("durable consumer");
    loop {
        let batch = consumer::fetch(&c, 1000, Duration::from_millis(500), |_| Ok(()))
            .await
            .expect("fetch");
        if enough(batch) {
            return;
        }
    }
}

/// The JSON body of a message.
pub fn body(m: &consumer::Received) -> Value {
    serde_json::from_slice(&m.body).expect("a JSON body")
}

/// The CloudEvents `type`s of `messages` per entity id, in stream order.
pub fn types_per_entity(messages: &[consumer::Received]) -> BTreeMap<String, Vec<String>> {
    let mut per_entity: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in messages {
        let ce = body(m);
        per_entity
            .entry(
                ce["data"]["entityId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default()
            .push(ce["type"].as_str().unwrap_or_default().to_owned());
    }
    per_entity
}

/// Checks the documented headers of a structured CloudEvents message on `subject`:
/// Nats-Msg-Id and Diagnostic-Id = the event id, Walhook-Event-Type, Content-Type, and
/// Walhook-Changed-Fields exactly when changedFields is known.
pub fn assert_documented_headers(m: &consumer::Received, subject: &str) {
    assert_eq!(m.subject, subject);
    let ce = body(m);
    assert_eq!(ce["specversion"], "1.0");
    let id = ce["id"].as_str().expect("id");
    let h = &m.headers;
    assert_eq!(h.get("Nats-Msg-Id").map(String::as_str), Some(id), "{h:?}");
    assert_eq!(
        h.get("Diagnostic-Id").map(String::as_str),
        Some(id),
        "{h:?}"
    );
    assert_eq!(
        h.get("Walhook-Event-Type").map(String::as_str),
        ce["type"].as_str()
    );
    assert_eq!(
        h.get("Content-Type").map(String::as_str),
        Some("application/cloudevents+json; charset=utf-8")
    );
    // The header is absent exactly when changedFields is unknown (null).
    let changed = ce["data"]["changedFields"].as_array().map(|fields| {
        fields
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(",")
    });
    assert_eq!(h.get("Walhook-Changed-Fields"), changed.as_ref(), "{ce}");
    assert!(ce["source"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(ce["time"].as_str().is_some());
}

/// Counts rows of walhook.processed for `listener`.
pub async fn processed(c: &tokio_postgres::Client, listener: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM walhook.processed WHERE listener = $1",
        &[&listener],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// The listener's cursor (walhook.listener_cursor.event_id), once its row exists.
pub async fn cursor(c: &tokio_postgres::Client, listener: &str) -> Option<i64> {
    c.query_opt(
        "SELECT event_id FROM walhook.listener_cursor WHERE listener = $1",
        &[&listener],
    )
    .await
    .ok()?
    .map(|r| r.get(0))
}

/// The newest walhook.event.id, 0 when there is none.
pub async fn last_event_id(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT coalesce(max(id), 0) FROM walhook.event", &[])
        .await
        .expect("walhook.event")
        .get(0)
}

/// The event ids (uuids) of walhook.event.
pub async fn event_ids(c: &tokio_postgres::Client) -> BTreeSet<String> {
    c.query("SELECT event_id::text FROM walhook.event", &[])
        .await
        .expect("walhook.event")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Checks that `messages` (of [`COUNTER_TABLE`]) hold each event of `expected` once, and per
/// customer id the values of `n` in increasing order (one Created, then Updates).
pub fn assert_once_in_entity_order(messages: &[consumer::Received], expected: &BTreeSet<String>) {
    let mut ids = BTreeSet::new();
    let mut last_n: BTreeMap<i64, i64> = BTreeMap::new();
    for m in messages {
        let id = m.headers.get("Nats-Msg-Id").cloned().expect("Nats-Msg-Id");
        assert!(ids.insert(id.clone()), "event {id} stored twice");
        let ce = body(m);
        let row = &ce["data"]["row"];
        let (Some(key), Some(n)) = (row["id"].as_i64(), row["n"].as_i64()) else {
            panic!("unexpected row {ce}");
        };
        if let Some(prev) = last_n.insert(key, n) {
            assert!(n > prev, "customer {key}: n={n} after n={prev}");
        }
    }
    assert_eq!(ids.len(), expected.len());
    assert!(
        ids == *expected,
        "the stream's ids differ from walhook.event's"
    );
}

/// Why stream `stream` does not hold every event of walhook.event: the events missing
/// from it (up to 20) with what walhook recorded about them for `listener`, and whether the
/// test server had to be killed. For the failure message of a count that did not match.
pub async fn missing_from_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
    c: &tokio_postgres::Client,
    listener: &str,
    nats: &NatsServer,
) -> String {
    let mut held = BTreeSet::new();
    fetch_until(js, stream, "diagnose", "", |batch| {
        let done = batch.is_empty();
        held.extend(
            batch
                .iter()
                .filter_map(|m| m.headers.get("Nats-Msg-Id").cloned()),
        );
        done
    })
    .await;
    let missing: Vec<String> = event_ids(c).await.difference(&held).cloned().collect();
    let mut report = format!(
        "{} events of walhook.event are not in stream {stream} ({} messages read); nats-server killed on {} stop(s)\n",
        missing.len(),
        held.len(),
        nats.killed
    );
    let rows = c
        .query(
            "SELECT e.id, e.entity_id, e.queued_at::text,
                    coalesce(string_agg(n.status || ' ' || n.id || ' attempts ' || n.attempts
                                        || coalesce(' ' || n.comment, ''), '; '), 'no notification')
             FROM walhook.event e
             LEFT JOIN walhook.notification n ON n.event_id = e.id AND n.listener = $2
             WHERE e.event_id::text = ANY($1)
             GROUP BY e.id ORDER BY e.id LIMIT 20",
            &[&missing, &listener],
        )
        .await
        .expect("walhook.event rows");
    for r in rows {
        let (id, entity_id, queued, notes): (i64, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        report += &format!("  event #{id} (entity id {entity_id}, queued {queued}): {notes}\n");
    }
    let cursor = c
        .query(
            "SELECT event_id FROM walhook.listener_cursor WHERE listener = $1",
            &[&listener],
        )
        .await
        .expect("walhook.listener_cursor");
    let cursor: Option<i64> = cursor.first().map(|r| r.get(0));
    report + &format!("cursor of {listener}: {cursor:?}")
}

/// Asserts that stream `stream` holds exactly `total` messages, explaining a shortfall
/// with [`missing_from_stream`].
pub async fn assert_stream_holds(
    js: &async_nats::jetstream::Context,
    stream: &str,
    total: u64,
    c: &tokio_postgres::Client,
    listener: &str,
    nats: &NatsServer,
) {
    let mut info = js.get_stream(stream).await.expect("the stream");
    let stored = info.info().await.expect("stream info").state.messages;
    if stored != total {
        let why = missing_from_stream(js, stream, c, listener, nats).await;
        panic!("{stored} of {total} messages in stream {stream}: {why}");
    }
}

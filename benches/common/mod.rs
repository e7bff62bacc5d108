//! Helpers shared by the capture and delivery benchmarks: the `bench` database and table,
//! psql, pg_recvlogical, the `walhook` child process and its /proc figures.
#![allow(dead_code)]

pub mod receiver;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walhook::cluster::LocalCluster;

/// The benchmark database.
pub const DB: &str = "bench";

/// `events` inserts into table bench (ids 1 to `events`) in transactions of `tx_rows`,
/// committed one by one inside a DO block.
pub fn load_sql(events: u64, tx_rows: u64) -> String {
    format!(
        "DO $$ BEGIN
           FOR t IN 0..{txs} - 1 LOOP
             INSERT INTO bench SELECT g, g, 'row ' || g, g * 1.5, now(), g % 2 = 0
               FROM generate_series(t * {tx_rows} + 1, t * {tx_rows} + {tx_rows}) g;
             COMMIT;
           END LOOP;
         END $$;",
        txs = events / tx_rows
    )
}

/// Runs `sql` in the benchmark database and returns psql's output; panics on error.
pub fn psql(cluster: &LocalCluster, sql: &str) -> String {
    cluster
        .psql(DB, sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Creates the `bench` database, its `bench` table and the `walhook` publication for it.
pub fn create_bench_database(cluster: &LocalCluster) {
    cluster.create_database(DB).expect("create database");
    psql(
        cluster,
        "CREATE TABLE bench (id int PRIMARY KEY, a int NOT NULL, b text, c float8, d timestamptz, e bool);
         ALTER TABLE bench REPLICA IDENTITY FULL;
         CREATE PUBLICATION walhook FOR TABLE bench;",
    );
}

/// Drops every slot and the queue schema and empties `bench`, retrying for a while: a
/// just-stopped walsender may still hold its slot for a moment.
pub fn reset_database(cluster: &LocalCluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let result = cluster.psql(
            DB,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
             DROP SCHEMA IF EXISTS walhook CASCADE;
             TRUNCATE bench;",
        );
        match result {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("   reset retried: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("reset: {e}"),
        }
    }
}

/// Drains slot `drain` up to `end_lsn` with pg_recvlogical into /dev/null; returns the
/// seconds it took.
pub fn recvlogical_drain(cluster: &LocalCluster, end_lsn: &str) -> f64 {
    let port = cluster.port().to_string();
    let t = Instant::now();
    let status = Command::new(cluster.bindir().join("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            walhook::cluster::SUPERUSER,
            "-d",
            DB,
            "--slot",
            "drain",
            "--start",
            "--no-loop",
            "-E",
            end_lsn,
            "-f",
            "/dev/null",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=walhook",
        ])
        .status()
        .expect("run pg_recvlogical");
    let secs = t.elapsed().as_secs_f64();
    assert!(status.success(), "pg_recvlogical failed: {status}");
    secs
}

/// The release `walhook run` binary with a config file in its own directory; killed on drop
/// (even when the benchmark panics).
pub struct Walhook {
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl Walhook {
    /// Starts `walhook run` on the config `toml`, logging warnings only.
    pub fn start(toml: &str) -> Walhook {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("walhook.toml");
        std::fs::write(&config, toml).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_walhook"))
            .args(["--log-format", "text", "run", "--config"])
            .arg(&config)
            .env("WALHOOK_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start walhook");
        Walhook { child, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with `what` when the process has exited.
    pub fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("walhook exited {what}: {status}");
        }
    }

    /// SIGTERM, then wait for a graceful exit (SIGKILL after 30 s). Returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Walhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of a live process (/proc/PID/stat fields 14 and 15).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces; fields after it are space-separated.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the whole line are indexes 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size (VmHWM) of a live process in kB, 0 when unknown.
pub fn vm_hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Creates the queue schema (`walhook setup`'s migrations) so that a backlog can be made
/// before walhook starts.
pub fn migrate_queue(cluster: &LocalCluster) {
    let url = cluster.url(DB);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            walhook::queue::migrate(&mut client).await.expect("migrate");
        });
}

/// Fills the queue with `events` events of the `bench` entity (rows like the benchmark
/// table's, `row_sql` over `g` when given) and one New notification per event and listener,
/// as the writer would have during an outage of the listeners; then VACUUM ANALYZE, as
/// autovacuum would have meanwhile.
pub fn make_backlog(
    cluster: &LocalCluster,
    events: u64,
    listeners: &[String],
    row_sql: Option<&str>,
) {
    let row = row_sql.unwrap_or(
        "jsonb_build_object('id', g, 'a', g, 'b', 'row ' || g, 'c', g * 1.5, 'd', now(), 'e', g % 2 = 0)",
    );
    let names = listeners
        .iter()
        .map(|l| format!("'{l}'"))
        .collect::<Vec<_>>()
        .join(",");
    // In slices, so one statement's memory stays small.
    const SLICE: u64 = 200_000;
    let mut from = 1;
    while from <= events {
        let to = (from + SLICE - 1).min(events);
        psql(
            cluster,
            &format!(
                "WITH e AS (
                   INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity,
                       entity_id, action, changed_fields, \"row\", old, subject, source_table)
                   SELECT gen_random_uuid(), ('1/' || to_hex(g * 64))::pg_lsn, 0, 1000 + g, now(),
                          'Bench', g::text, 'Created', ARRAY['id','a','b','c','d','e'], {row}, NULL,
                          'Bench/' || g, 'public.bench'
                   FROM generate_series({from}, {to}) g
                   RETURNING id, entity, entity_id, commit_lsn, seq,
                             pg_column_size(\"row\") AS payload_bytes
                 )
                 INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                                          payload_bytes)
                 SELECT nextval('walhook.notification_id_seq'), e.id, l, e.entity, e.entity_id,
                        e.commit_lsn, e.seq, e.payload_bytes
                 FROM e CROSS JOIN unnest(ARRAY[{names}]) l
                 ORDER BY e.id, l"
            ),
        );
        from = to + 1;
    }
    psql(cluster, "VACUUM ANALYZE walhook.event");
    psql(cluster, "VACUUM ANALYZE walhook.new");
}

/// Sizes of a queue table: (heap, indexes) in bytes.
pub fn table_size(cluster: &LocalCluster, table: &str) -> (u64, u64) {
    let out = psql(
        cluster,
        &format!("SELECT pg_relation_size('{table}'), pg_indexes_size('{table}')"),
    );
    let mut parts = out.split('|').map(|v| v.trim().parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// "12.3 MB" for a byte count.
pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

//! Nothing is lost or duplicated: SIGKILL, server restarts, huge transactions, idle slots.
//! These tests run the real `walhook` binary.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    ClusterOptions, Daemon, TestDb, config_toml, current_insert_lsn, event_count, eventually,
    slot_confirmed, wait_streaming,
};
use walhook::types::Lsn;

const ITEM_ENTITY: &str = r#"
[[entity]]
name = "Item"
table = "item"
"#;

async fn create_item_table(db: &TestDb) {
    db.execute(
        "CREATE TABLE item (id int PRIMARY KEY, tx int NOT NULL, v int NOT NULL, pad text);
         ALTER TABLE item REPLICA IDENTITY FULL;",
    )
    .await;
}

/// Waits until `walhook.event` holds at least `n` rows.
async fn wait_event_count(c: &tokio_postgres::Client, n: i64, within: Duration, what: &str) {
    eventually(within, what, || async {
        (event_count(c).await >= n).then_some(())
    })
    .await;
}

/// One source transaction of the workload: its number, how many changes it made and an
/// upper bound of its commit's end LSN (the insert position read after COMMIT returned).
#[derive(Clone, Copy, Debug)]
struct TxRecord {
    tx: i32,
    changes: i64,
    upper: Lsn,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_and_duplicates_nothing() {
    let db = TestDb::new();
    create_item_table(&db).await;
    let toml = config_toml(&db.url, ITEM_ENTITY);
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    // The workload: 20,000 changes in transactions of mixed sizes, inserts then updates.
    let records: Arc<Mutex<Vec<TxRecord>>> = Arc::default();
    let workload = {
        let url = db.url.clone();
        let records = records.clone();
        tokio::spawn(async move {
            let mut c = support::connect(&url).await;
            let sizes = [1, 7, 50, 300, 1, 2, 1000, 25];
            let (mut total, mut next_id, mut tx) = (0i64, 0i32, 0i32);
            while total < 20_000 {
                let size = sizes[tx as usize % sizes.len()].min(20_000 - total) as i32;
                tx += 1;
                let t = c.transaction().await.unwrap();
                if tx % 3 == 0 && next_id >= size {
                    // Updates of rows inserted earlier.
                    t.execute(
                        "UPDATE item SET v = v + 1, tx = $1 WHERE id >= $2 AND id < $2 + $3",
                        &[&tx, &(next_id - size), &size],
                    )
                    .await
                    .unwrap();
                } else {
                    t.execute(
                        "INSERT INTO item SELECT g, $1, 0, 'p' FROM generate_series($2::int, $2 + $3 - 1) g",
                        &[&tx, &next_id, &size],
                    )
                    .await
                    .unwrap();
                    next_id += size;
                }
                t.commit().await.unwrap();
                let upper = current_insert_lsn(&c).await;
                records.lock().unwrap().push(TxRecord {
                    tx,
                    changes: size.into(),
                    upper,
                });
                total += i64::from(size);
                // Pace the load so the kills land mid-stream.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            total
        })
    };

    // The checker: the slot never confirms a transaction whose events are not all queued.
    let checking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let checker = {
        let url = db.url.clone();
        let records = records.clone();
        let checking = checking.clone();
        tokio::spawn(async move {
            let c = support::connect(&url).await;
            let mut checks = 0u32;
            while checking.load(std::sync::atomic::Ordering::SeqCst) {
                let Some(confirmed) = slot_confirmed(&c).await else {
                    continue;
                };
                let txs: Vec<TxRecord> = records.lock().unwrap().clone();
                let queued: HashMap<i32, i64> = c
                    .query(
                        "SELECT (row->>'tx')::int, count(*) FROM walhook.event GROUP BY 1",
                        &[],
                    )
                    .await
                    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
                    .unwrap_or_default();
                for r in txs.iter().filter(|r| r.upper <= confirmed) {
                    let got = queued.get(&r.tx).copied().unwrap_or(0);
                    assert!(
                        got >= r.changes,
                        "slot confirmed {confirmed} past transaction {} (commit ≤ {}) with only {got} of {} events queued",
                        r.tx,
                        r.upper,
                        r.changes
                    );
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            checks
        })
    };

    for threshold in [4_000, 11_000] {
        wait_event_count(
            &c,
            threshold,
            Duration::from_secs(120),
            "events before the kill",
        )
        .await;
        daemon.kill9();
        daemon = Daemon::start(&toml);
    }
    let total = workload.await.unwrap();
    assert_eq!(total, 20_000);
    wait_event_count(&c, 20_000, Duration::from_secs(180), "all 20,000 events").await;
    // Wait for the slot to confirm the last transaction, so the checker sees every one.
    let last = records.lock().unwrap().last().copied().unwrap();
    eventually(
        Duration::from_secs(60),
        "slot confirms the last commit",
        || async { (slot_confirmed(&c).await? >= last.upper).then_some(()) },
    )
    .await;
    checking.store(false, std::sync::atomic::Ordering::SeqCst);
    let checks = checker.await.unwrap();
    assert!(checks > 10, "the checker ran only {checks} times");

    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT (row->>'id', action, row->>'v')), count(DISTINCT event_id) FROM walhook.event",
            &[],
        )
        .await
        .unwrap();
    let (n, distinct, ids): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (n, distinct, ids),
        (20_000, 20_000, 20_000),
        "exactly one event per change"
    );
    let per_tx: HashMap<i32, i64> = c
        .query(
            "SELECT (row->>'tx')::int, count(*) FROM walhook.event GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for r in records.lock().unwrap().iter() {
        assert_eq!(
            per_tx.get(&r.tx).copied(),
            Some(r.changes),
            "transaction {}",
            r.tx
        );
    }
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_row_transaction_streams_with_bounded_memory() {
    let db = TestDb::new();
    create_item_table(&db).await;
    let daemon = Daemon::start(&config_toml(&db.url, ITEM_ENTITY));
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute(
        "INSERT INTO item SELECT g, 1, 0, repeat('p', 40) FROM generate_series(1, 200000) g",
        &[],
    )
    .await
    .unwrap();
    let started = Instant::now();
    wait_event_count(&c, 200_000, Duration::from_secs(300), "200,000 events").await;
    let rss_kb = daemon.peak_rss_kb().expect("daemon alive");
    println!(
        "200k-row transaction: queued in {:.1}s, walhook peak RSS {} MB",
        started.elapsed().as_secs_f64(),
        rss_kb / 1024
    );
    assert!(rss_kb < 500 * 1024, "peak RSS {} MB", rss_kb / 1024);
    assert_eq!(event_count(&c).await, 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_server_restart_does_not_wait_on_walhook_and_nothing_is_lost() {
    // A long wal_sender_timeout makes a walsender that waits on an unconfirmed client obvious.
    let mut db = TestDb::with_options(ClusterOptions {
        extra_conf: vec!["wal_sender_timeout = '10min'".into()],
        ..Default::default()
    });
    create_item_table(&db).await;
    let daemon = Daemon::start(&config_toml(&db.url, ITEM_ENTITY));
    {
        let c = db.client().await;
        wait_streaming(&c).await;
        c.execute(
            "INSERT INTO item SELECT g, 1, 0, 'a' FROM generate_series(1, 1000) g",
            &[],
        )
        .await
        .unwrap();
        wait_event_count(&c, 1000, Duration::from_secs(60), "first 1000 events").await;
    }
    let started = Instant::now();
    db.cluster().restart_fast().expect("pg_ctl restart -m fast");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "fast restart took {took:?}: the walsender waited on walhook"
    );

    let c = db.client().await;
    c.execute(
        "INSERT INTO item SELECT g, 2, 0, 'b' FROM generate_series(1001, 2000) g",
        &[],
    )
    .await
    .unwrap();
    wait_event_count(
        &c,
        2000,
        Duration::from_secs(120),
        "events written after the restart",
    )
    .await;
    let distinct: i64 = c
        .query_one("SELECT count(DISTINCT row->>'id') FROM walhook.event", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((event_count(&c).await, distinct), (2000, 2000));
    let log = daemon.log();
    assert!(log.contains("reconnecting"), "no reconnect logged:\n{log}");
    // Each attempt is logged once.
    let attempts: Vec<&str> = log.lines().filter(|l| l.contains("reconnecting")).collect();
    let unique: HashSet<&str> = attempts.iter().copied().collect();
    assert_eq!(attempts.len(), unique.len(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_follows_wal_written_by_untracked_tables() {
    let db = TestDb::new();
    create_item_table(&db).await;
    db.execute("CREATE TABLE noise (id int, pad text)").await;
    let _daemon = Daemon::start(&config_toml(&db.url, ITEM_ENTITY));
    let c = db.client().await;
    wait_streaming(&c).await;
    let before = current_insert_lsn(&c).await;
    // ~64 MB of WAL in a table walhook does not track.
    for _ in 0..10 {
        c.execute(
            "INSERT INTO noise SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 7000) g",
            &[],
        )
        .await
        .unwrap();
    }
    let after = current_insert_lsn(&c).await;
    assert!(
        after.0 - before.0 >= 64 << 20,
        "only {} bytes of WAL written",
        after.0 - before.0
    );
    eventually(Duration::from_secs(30), "confirmed_flush_lsn within 1 MB of the WAL position", || async {
        let row = c
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'walhook'",
                &[],
            )
            .await
            .ok()?;
        let lag: i64 = row.get(0);
        (lag < 1 << 20).then_some(())
    })
    .await;
    assert_eq!(event_count(&c).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_past_the_threshold_is_warned_once_then_cleared() {
    let db = TestDb::new();
    create_item_table(&db).await;
    let toml = config_toml(&db.url, ITEM_ENTITY).replace(
        "status_interval = \"1s\"",
        "status_interval = \"1s\"\nwal_warning = \"1MB\"",
    );
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO item VALUES (0, 0, 0, 'x')", &[])
        .await
        .unwrap();
    wait_event_count(&c, 1, Duration::from_secs(30), "the first event").await;
    // Block the queue writer so the slot cannot advance while WAL piles up.
    let mut blocker = support::connect(&db.url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE walhook.event IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    c.execute(
        "INSERT INTO item SELECT g, 1, 0, repeat('p', 500) FROM generate_series(1, 10000) g",
        &[],
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(60),
        "the retained-WAL warning",
        || async { daemon.log().contains("retains").then_some(()) },
    )
    .await;
    tx.rollback().await.unwrap();
    wait_event_count(&c, 10_001, Duration::from_secs(60), "catching up").await;
    eventually(Duration::from_secs(60), "the all-clear", || async {
        daemon
            .log()
            .contains("back under source.wal_warning")
            .then_some(())
    })
    .await;
    let warnings = daemon
        .log()
        .lines()
        .filter(|l| l.contains("retains"))
        .count();
    assert_eq!(warnings, 1, "{}", daemon.log());
}

/// The final position logged at a clean stop: `stopped; confirmed up to 0/1A2B3C4`.
fn logged_final_position(log: &str) -> Option<Lsn> {
    let line = log
        .lines()
        .find(|l| l.contains("stopped; confirmed up to "))?;
    let rest = line.split("stopped; confirmed up to ").nth(1)?;
    rest.split(|c: char| c.is_whitespace() || c == '"')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_confirms_what_it_logs_and_a_restart_duplicates_nothing() {
    let db = TestDb::new();
    create_item_table(&db).await;
    let toml = config_toml(&db.url, ITEM_ENTITY);
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    // A steady insert load, one row per transaction, until told to stop.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let url = db.url.clone();
        let running = running.clone();
        tokio::spawn(async move {
            let c = support::connect(&url).await;
            let mut n = 0i32;
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                c.execute("INSERT INTO item VALUES ($1, 1, 0, 'x')", &[&n])
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    wait_event_count(&c, 500, Duration::from_secs(60), "events under load").await;
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    let log = daemon.log();
    let logged = logged_final_position(&log).unwrap_or_else(|| panic!("no final line:\n{log}"));
    assert_eq!(
        slot_confirmed(&c).await,
        Some(logged),
        "the slot's confirmed_flush_lsn differs from the logged position:\n{log}"
    );
    let inserted = {
        running.store(false, std::sync::atomic::Ordering::SeqCst);
        load.await.unwrap()
    };

    let _again = Daemon::start(&toml);
    wait_event_count(
        &c,
        i64::from(inserted),
        Duration::from_secs(120),
        "every row after the restart",
    )
    .await;
    // Let anything re-sent by mistake show up before counting.
    c.execute("INSERT INTO item VALUES (-1, 2, 0, 'fence')", &[])
        .await
        .unwrap();
    wait_event_count(
        &c,
        i64::from(inserted) + 1,
        Duration::from_secs(60),
        "the fence",
    )
    .await;
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT row->>'id') FROM walhook.event",
            &[],
        )
        .await
        .unwrap();
    let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (n, distinct),
        (i64::from(inserted) + 1, i64::from(inserted) + 1),
        "exactly one event per row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_while_the_first_waits_for_the_writer() {
    let db = TestDb::new();
    create_item_table(&db).await;
    let mut daemon = Daemon::start(&config_toml(&db.url, ITEM_ENTITY));
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO item VALUES (0, 0, 0, 'x')", &[])
        .await
        .unwrap();
    wait_event_count(&c, 1, Duration::from_secs(30), "the first event").await;
    // The writer blocks on the lock, so the first SIGTERM cannot finish quickly.
    let mut blocker = support::connect(&db.url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE walhook.event IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    c.execute("INSERT INTO item VALUES (1, 0, 0, 'y')", &[])
        .await
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    eventually(Duration::from_secs(30), "the writer waiting on the lock", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE relation = 'walhook.event'::regclass AND NOT granted",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually(
        Duration::from_secs(30),
        "the first SIGTERM logged",
        || async { daemon.log().contains("SIGTERM received").then_some(()) },
    )
    .await;
    assert!(daemon.running(), "{}", daemon.log());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{}", daemon.log());
    assert!(
        daemon.log().contains("second stop signal"),
        "{}",
        daemon.log()
    );
    // The lock was never released: the process did not wait for the writer.
    tx.rollback().await.unwrap();
}

/// Runs `walhook run` until it exits by itself; returns its exit code and log.
fn run_until_exit(toml: &str) -> (Option<i32>, String) {
    let mut daemon = Daemon::start(toml);
    let status = daemon.child.wait().expect("wait walhook");
    (status.code(), daemon.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_stopped_is_a_named_gap_until_accepted() {
    let db = TestDb::new();
    create_item_table(&db).await;
    let monitor = support::receiver::Receiver::start().await;
    let toml = config_toml(
        &db.url,
        &format!(
            "{ITEM_ENTITY}{}",
            support::monitor_toml(&monitor.url("/alerts"))
        ),
    );
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO item VALUES (1, 1, 0, 'x')", &[])
        .await
        .unwrap();
    wait_event_count(&c, 1, Duration::from_secs(30), "the first event").await;
    assert_eq!(daemon.terminate().code(), Some(0));
    let flushed: String = c
        .query_one("SELECT flushed_lsn::text FROM walhook.state", &[])
        .await
        .unwrap()
        .get(0);

    // The slot vanishes while walhook is stopped; changes made meanwhile are lost.
    c.batch_execute(
        "SELECT pg_drop_replication_slot('walhook');
         INSERT INTO item VALUES (2, 1, 0, 'lost');",
    )
    .await
    .unwrap();
    let (code, log) = run_until_exit(&toml);
    assert_eq!(code, Some(78), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("walhook: error:") && l.contains("slot walhook"))
        .unwrap_or_else(|| panic!("no error line naming the slot:\n{log}"));
    println!("{line}");
    assert!(
        line.contains(&flushed) && line.contains("walhook setup --accept-gap"),
        "{line}"
    );
    assert!(!log.contains("created replication slot"), "{log}");

    let (_dir, path) = support::write_config(&toml);
    let (code, out, err) =
        support::walhook(&["setup", "--accept-gap", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let row = c
        .query_one(
            "SELECT last_flushed_lsn::text, resumed_lsn::text, accepted_at IS NOT NULL, reason FROM walhook.capture_gap",
            &[],
        )
        .await
        .expect("the gap is recorded");
    let (last, resumed, dated, reason): (String, Option<String>, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(last, flushed);
    let resumed: Lsn = resumed.expect("resumed_lsn").parse().unwrap();
    assert!(resumed > flushed.parse().unwrap() && dated, "{reason}");
    assert!(reason.contains("missing"), "{reason}");

    // The next start streams, and the monitors are told about the gap once.
    let _daemon = Daemon::start(&toml);
    wait_streaming(&c).await;
    c.execute("INSERT INTO item VALUES (3, 1, 0, 'after')", &[])
        .await
        .unwrap();
    wait_event_count(&c, 2, Duration::from_secs(30), "the event after the gap").await;
    let ids: Vec<String> = c
        .query("SELECT row->>'id' FROM walhook.event ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["1", "3"]);
    let alert = eventually(Duration::from_secs(30), "the CaptureGap alert", || async {
        monitor
            .requests()
            .iter()
            .map(|r| r.json())
            .find(|j| j["type"] == "walhook.alert.CaptureGap")
    })
    .await;
    let summary = alert["data"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains(&flushed), "{alert}");
    let alerted: bool = c
        .query_one(
            "SELECT alerted_at IS NOT NULL FROM walhook.capture_gap",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(alerted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_a_gap_too() {
    // A tiny max_slot_wal_keep_size: WAL written while walhook is stopped invalidates the slot.
    let db = TestDb::with_options(ClusterOptions {
        extra_conf: vec![
            "max_slot_wal_keep_size = '1MB'".into(),
            "min_wal_size = '32MB'".into(),
            "max_wal_size = '32MB'".into(),
        ],
        ..Default::default()
    });
    create_item_table(&db).await;
    let toml = config_toml(&db.url, ITEM_ENTITY);
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO item VALUES (1, 1, 0, 'x')", &[])
        .await
        .unwrap();
    wait_event_count(&c, 1, Duration::from_secs(30), "the first event").await;
    assert_eq!(daemon.terminate().code(), Some(0));

    db.execute("CREATE TABLE noise (pad text)").await;
    eventually(Duration::from_secs(120), "the slot invalidated", || async {
        c.batch_execute(
            "INSERT INTO noise SELECT repeat(md5(g::text), 30) FROM generate_series(1, 5000) g;
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .ok()?;
        let status: Option<String> = c
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walhook'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (status.as_deref() == Some("lost")).then_some(())
    })
    .await;

    let (code, log) = run_until_exit(&toml);
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("invalidated") && log.contains("--accept-gap"),
        "{log}"
    );
    let (_dir, path) = support::write_config(&toml);
    let (code, out, err) =
        support::walhook(&["setup", "--accept-gap", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let _daemon = Daemon::start(&toml);
    wait_streaming(&c).await;
    c.execute("INSERT INTO item VALUES (2, 1, 0, 'after')", &[])
        .await
        .unwrap();
    wait_event_count(&c, 2, Duration::from_secs(30), "the event after the gap").await;
    let reason: String = c
        .query_one("SELECT reason FROM walhook.capture_gap", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("wal_status lost"), "{reason}");
}

/// Inserts 200 rows of 1 MB in one transaction under walhook configured with `queue_extra`
/// lines; returns walhook's peak RSS in kB once all 200 events are queued.
async fn peak_rss_with_1mb_rows(queue_extra: &str) -> u64 {
    let db = TestDb::new();
    create_item_table(&db).await;
    let toml = config_toml(&db.url, ITEM_ENTITY).replace(
        "batch_delay = \"5ms\"",
        &format!("batch_delay = \"5ms\"\n{queue_extra}"),
    );
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute(
        "INSERT INTO item SELECT g, 1, 0, repeat(md5(g::text), 32768) FROM generate_series(1, 200) g",
        &[],
    )
    .await
    .unwrap();
    wait_event_count(&c, 200, Duration::from_secs(300), "200 events of 1 MB").await;
    let rss_kb = daemon.peak_rss_kb().expect("daemon alive");
    let stored: i64 = c
        .query_one("SELECT min(length(row->>'pad')) FROM walhook.event", &[])
        .await
        .unwrap()
        .get::<_, Option<i32>>(0)
        .map_or(0, i64::from);
    assert_eq!(stored, 1 << 20, "every row arrives whole");
    rss_kb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_rows_of_1mb_in_one_transaction_stay_under_200mb() {
    let rss_kb = peak_rss_with_1mb_rows("").await;
    println!(
        "200 x 1 MB rows in one transaction, default byte limits: walhook peak RSS (VmHWM) {} MB",
        rss_kb / 1024
    );
    assert!(rss_kb < 200 * 1024, "peak RSS {} MB", rss_kb / 1024);
}

/// For docs/benchmarks.md: the same load with the byte limits out of the way, as before
/// they existed. `cargo test --test durability unbounded -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/benchmarks.md, not a check"]
async fn unbounded_capture_buffers_for_comparison() {
    let rss_kb = peak_rss_with_1mb_rows("batch_bytes = \"64GB\"\ncapture_buffer = \"64GB\"").await;
    println!(
        "200 x 1 MB rows in one transaction, byte limits 64 GB: walhook peak RSS (VmHWM) {} MB",
        rss_kb / 1024
    );
}

//! `walhook backfill`: existing rows become Snapshot events, in commit order with live
//! changes, resumable after a crash, with bounded memory; a bad `--where` sends nothing.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::receiver::Receiver;
use support::{Running, TestDb, eventually, wait_streaming, walhook, walhook_bin, write_config};

fn config(db: &TestDb, entity_extra: &str, listeners: &str) -> String {
    format!(
        r#"[source]
url = "{url}"
heartbeat = "1s"
status_interval = "1s"

[queue]
batch_delay = "5ms"

[[entity]]
name = "Item"
table = "item"
{entity_extra}
{listeners}
"#,
        url = db.url
    )
}

/// A listener that receives everything but delivers at most once a day: notifications
/// stay in walhook.new, where the fan-out can be read.
fn parked_listener(name: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:9/{name}\"\nrate_limit = \"1/d\"\n{extra}\n"
    )
}

/// Runs `walhook backfill --config <path> ARGS` to the end.
fn backfill(path: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["backfill", "--config", path.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    walhook(&all)
}

fn spawn_backfill(path: &Path, args: &[&str]) -> Child {
    Command::new(walhook_bin())
        .arg("backfill")
        .arg("--config")
        .arg(path)
        .args(args)
        .env("WALHOOK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walhook backfill")
}

/// Peak resident set size (VmHWM) in kB of a live process.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Waits for `child` to exit, sampling its peak RSS meanwhile; (exit code, stdout, stderr,
/// peak kB).
async fn wait_sampling(mut child: Child, timeout: Duration) -> (i32, String, String, u64) {
    let mut peak = 0;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(kb) = peak_rss_kb(child.id()) {
            peak = peak.max(kb);
        }
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "walhook backfill did not end within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().expect("backfill output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        peak,
    )
}

/// (action, row_action, row, subject) of a stored event.
type StoredRow = (String, Option<String>, Value, Option<String>);

/// (entity_id, action, row) of every event of entity Item, in commit order.
async fn events(c: &tokio_postgres::Client) -> Vec<(String, String, Value)> {
    c.query(
        "SELECT entity_id, action, row FROM walhook.event WHERE entity = 'Item' ORDER BY commit_lsn, seq",
        &[],
    )
    .await
    .expect("read events")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

async fn count_action(c: &tokio_postgres::Client, action: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM walhook.event WHERE entity = 'Item' AND action = $1",
        &[&action],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backfill_of_100k_rows_under_concurrent_updates_resumes_and_every_row_gets_one_snapshot_in_commit_order()
 {
    const ROWS: i64 = 100_000;
    const BLOCKED: i32 = 50_000;
    let db = TestDb::new();
    db.execute(&format!(
        "CREATE TABLE item (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, label text);
         INSERT INTO item SELECT g, 0, repeat('x', 100) || g FROM generate_series(1, {ROWS}) g;
         ANALYZE item;"
    ))
    .await;
    let toml = config(&db, "", &parked_listener("all", ""));
    let (_dir, path) = write_config(&toml);
    let service = Running::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    // Concurrent single-row updates all over the key space, each bumping n.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let updater = {
        let (stop, committed, url) = (stop.clone(), committed.clone(), db.url.clone());
        tokio::spawn(async move {
            let u = support::connect(&url).await;
            let mut i: i64 = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = i32::try_from((i * 7919) % ROWS + 1).unwrap();
                i += 1;
                if id == BLOCKED {
                    continue;
                }
                u.execute("UPDATE item SET n = n + 1 WHERE id = $1", &[&id])
                    .await
                    .expect("update");
                committed.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // An open transaction holding row 50000 stops the backfill at the chunk that holds it:
    // the backfill is killed there, mid-way, for certain.
    let mut blocker_client = support::connect(&db.url).await;
    let blocker = blocker_client.transaction().await.unwrap();
    blocker
        .execute("UPDATE item SET n = n + 1 WHERE id = $1", &[&BLOCKED])
        .await
        .unwrap();
    let mut first = spawn_backfill(&path, &["--entity", "Item", "--batch", "1000"]);
    let mut first_peak = 0;
    eventually(
        Duration::from_secs(120),
        "the backfill blocked at row 50000",
        || {
            if let Some(kb) = peak_rss_kb(first.id()) {
                first_peak = first_peak.max(kb);
            }
            let c = &c;
            async move {
                let rows: i64 = c
                    .query_one("SELECT coalesce(max(rows), 0) FROM walhook.backfill", &[])
                    .await
                    .ok()?
                    .get(0);
                (rows >= 49_000).then_some(())
            }
        },
    )
    .await;
    assert!(
        first.try_wait().unwrap().is_none(),
        "the backfill went past a locked row"
    );
    first.kill().expect("SIGKILL the backfill");
    let _ = first.wait();
    blocker.commit().await.unwrap();
    committed.fetch_add(1, Ordering::SeqCst);
    // The killed backfill's server process ends once its lock wait is over.
    eventually(
        Duration::from_secs(60),
        "the killed backfill's session gone",
        || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == 0).then_some(())
        },
    )
    .await;
    let rows_at_kill: i64 = c
        .query_one("SELECT rows FROM walhook.backfill", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows_at_kill, 49_000, "only whole chunks are recorded");

    let second = spawn_backfill(&path, &["--entity", "Item", "--batch", "1000"]);
    let (code, out, err, second_peak) = wait_sampling(second, Duration::from_secs(300)).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("resuming after 49000 rows already sent"),
        "{out}"
    );
    assert!(out.contains("finished: 100000 rows"), "{out}");
    stop.store(true, Ordering::SeqCst);
    updater.await.unwrap();
    let updates = i64::try_from(committed.load(Ordering::SeqCst)).unwrap();
    assert!(updates > 0);

    eventually(
        Duration::from_secs(300),
        "every Snapshot and Updated event queued",
        || async {
            let s = count_action(&c, "Snapshot").await;
            let u = count_action(&c, "Updated").await;
            (s >= ROWS && u >= updates).then_some(())
        },
    )
    .await;
    let evs = events(&c).await;
    service.stop().await;

    // Per id: exactly one Snapshot; it is no older than an Updated before it and no newer
    // than an Updated after it (n counts the updates).
    let mut seen: HashMap<String, (i64, Option<i64>)> = HashMap::new();
    let (mut snapshots, mut updated) = (0, 0);
    for (id, action, row) in &evs {
        let n = row["n"].as_i64().expect("n");
        let entry = seen.entry(id.clone()).or_insert((0, None));
        match action.as_str() {
            "Updated" => {
                updated += 1;
                if let Some(s) = entry.1 {
                    assert!(n > s, "id {id}: Updated n={n} after a Snapshot of n={s}");
                }
                entry.0 = n;
            }
            "Snapshot" => {
                snapshots += 1;
                assert!(entry.1.is_none(), "id {id} got a second Snapshot");
                assert!(
                    n >= entry.0,
                    "id {id}: Snapshot n={n} after an Updated of n={}",
                    entry.0
                );
                entry.1 = Some(n);
            }
            other => panic!("unexpected action {other}"),
        }
    }
    assert_eq!(snapshots, ROWS);
    assert_eq!(
        updated, updates,
        "every committed update has its Updated event"
    );
    assert!(seen.values().all(|(_, s)| s.is_some()));
    // Fanned out like live events: one notification per event for the one listener.
    let fanned: i64 = c
        .query_one(
            "SELECT count(*) FROM walhook.notification n JOIN walhook.event e ON e.id = n.event_id WHERE e.action = 'Snapshot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fanned, ROWS);
    let peak_mb = first_peak.max(second_peak) / 1024;
    assert!(
        peak_mb > 0 && peak_mb < 150,
        "backfill peak RSS {peak_mb} MB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_row_has_the_shape_of_a_created_row_and_listener_limits_the_fan_out() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE item (
            id int PRIMARY KEY, i2 int2, i8 int8, num numeric, f4 real, f8 double precision,
            b bool, t text, vc varchar(10), ch char(5), js json, jb jsonb, ts timestamp,
            tz timestamptz, d date, tm time, iv interval, u uuid, by bytea, ip inet,
            ia int[], ta text[], secret text, total int GENERATED ALWAYS AS (id * 2) STORED
         );",
    )
    .await;
    let receiver = Receiver::start().await;
    let listeners = format!(
        "{}{}\n[[listener]]\nname = \"hook\"\nurl = \"{}\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n",
        parked_listener("audit", ""),
        parked_listener("live", "actions = [\"created\", \"updated\"]"),
        receiver.url("/hook")
    );
    let toml = config(
        &db,
        "exclude = [\"secret\"]\nsubject = \"items/{id}/{vc}\"",
        &listeners,
    );
    let (_dir, path) = write_config(&toml);
    let service = Running::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        r#"INSERT INTO item VALUES
          (1, -3, 9007199254740993, 12345678901234567890.000000001, 1.5, 'NaN', true, 'héllo "q"',
           'short', 'ab', '{"a": [1, 2]}', '{"b": {"c": null}}', '2024-01-02 03:04:05.123456',
           '2024-01-02 03:04:05+05:30', '2024-02-29', '23:59:59', '1 day 02:03:04', 
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef', '10.0.0.1', '{1,NULL,3}',
           '{"a,b","c\"d",NULL}', 'hidden'),
          (2, NULL, NULL, NULL, '-Infinity', 1e300, false, NULL, NULL, NULL, NULL, 'null', NULL,
           NULL, NULL, NULL, NULL, NULL, '', '::1', '{}', '{}', NULL);"#,
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(60), "two Created events", || async {
        (count_action(&c, "Created").await == 2).then_some(())
    })
    .await;

    let (code, out, err) = backfill(&path, &["--entity", "Item", "--listener", "audit"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("finished: 2 rows in 1 chunks"), "{out}");
    // A forged chunk (any role may emit messages) names the backfill but not its token.
    let forged = serde_json::json!({
        "run": 1, "token": "00000000-0000-0000-0000-000000000000", "entity": "Item",
        "listener": null, "schema": "public", "table": "item",
        "columns": [{"name": "id", "type": 23, "key": true}], "rows": [["666"]]
    });
    c.execute(
        "SELECT pg_logical_emit_message(true, 'walhook.backfill', $1)",
        &[&forged.to_string()],
    )
    .await
    .unwrap();
    c.execute("UPDATE item SET t = 'after' WHERE id = 2", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the later update queued",
        || async { (count_action(&c, "Updated").await == 1).then_some(()) },
    )
    .await;

    let rows = c
        .query(
            "SELECT entity_id, action, row_action, row, subject, changed_fields, event_id FROM walhook.event
             WHERE action IN ('Created', 'Snapshot') ORDER BY commit_lsn, seq",
            &[],
        )
        .await
        .unwrap();
    let mut by_id: BTreeMap<String, Vec<StoredRow>> = BTreeMap::new();
    for r in &rows {
        let changed: Option<Vec<String>> = r.get(5);
        assert_eq!(changed, None);
        by_id
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2), r.get(3), r.get(4)));
    }
    assert_eq!(
        by_id.keys().collect::<Vec<_>>(),
        ["1", "2"],
        "no forged event"
    );
    for (id, evs) in &by_id {
        let [created, snapshot] = evs.as_slice() else {
            panic!("id {id}: {evs:?}")
        };
        assert_eq!(created.0, "Created");
        assert_eq!(
            (snapshot.0.as_str(), snapshot.1.as_deref()),
            ("Snapshot", Some("Created"))
        );
        assert_eq!(snapshot.2, created.2, "id {id}: the rows differ");
        assert_eq!(snapshot.3, created.3, "id {id}: the subjects differ");
        assert!(snapshot.2.get("secret").is_none(), "excluded column sent");
        assert!(snapshot.2.get("total").is_none(), "generated column sent");
    }
    // Only the listener named with --listener is notified of the Snapshots.
    let fan_out: Vec<String> = c
        .query(
            "SELECT n.listener FROM walhook.notification n JOIN walhook.event e ON e.id = n.event_id
             WHERE e.action = 'Snapshot' ORDER BY n.listener",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(fan_out, ["audit", "audit"]);

    // The same arguments again: finished, nothing to do; --restart sends every row again.
    let (code, out, _) = backfill(&path, &["--entity", "Item", "--listener", "audit"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");
    let (code, out, err) = backfill(
        &path,
        &[
            "--entity",
            "Item",
            "--listener",
            "hook",
            "--where",
            "id = 2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let body = eventually(
        Duration::from_secs(60),
        "the Snapshot delivered",
        || async {
            receiver
                .requests()
                .iter()
                .map(|r| r.json())
                .find(|j| j["type"] == "Item.Snapshot")
        },
    )
    .await;
    assert_eq!(body["subject"], "items/2/");
    assert_eq!(body["data"]["row"]["ip"], "::1");
    // A listener whose actions leave Snapshot out is refused with the fix.
    let (code, _, err) = backfill(&path, &["--entity", "Item", "--listener", "live"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("add \"snapshot\" to its actions"), "{err}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_hostile_where_is_refused_with_the_fix_and_nothing_is_sent() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE item (id int PRIMARY KEY, city text);
         INSERT INTO item VALUES (1, 'Berlin'), (2, 'Paris');
         CREATE TABLE x (v int);
         CREATE TABLE audit (v int);
         CREATE FUNCTION sneaky(int) RETURNS bool LANGUAGE sql AS
           'INSERT INTO audit VALUES ($1) RETURNING true';",
    )
    .await;
    let toml = config(&db, "", &parked_listener("all", ""));
    let (_dir, path) = write_config(&toml);
    let (code, out, err) = walhook(&["setup", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    let cases: &[(&str, &str)] = &[
        ("city = 'Berlin", "is not a valid SQL condition"),
        ("true; drop table x", "more than one statement"),
        ("true); drop table x; select (1", "more than one statement"),
        ("sneaky(id)", "tries to write"),
        (
            "nope = 1",
            "names something table public.item does not have",
        ),
        ("id + 1", "is not a boolean condition"),
        ("true) --", "is not a valid SQL condition"),
    ];
    for (filter, expected) in cases {
        let (code, out, err) = backfill(&path, &["--entity", "Item", "--where", filter]);
        assert_eq!(code, 78, "--where {filter:?}: {out}{err}");
        assert!(err.contains(expected), "--where {filter:?}: {err}");
        assert!(
            err.contains("nothing was sent"),
            "--where {filter:?}: {err}"
        );
    }
    let c = db.client().await;
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM walhook.backfill").await, 0);
    assert_eq!(count("SELECT count(*) FROM audit").await, 0);
    assert_eq!(
        count("SELECT count(*) FROM x").await,
        0,
        "table x is still there"
    );

    // With no walhook streaming, a valid backfill warns and is safe: its chunks wait in the
    // slot and become events once walhook runs.
    let (code, out, err) = backfill(&path, &["--entity", "Item", "--where", "city = 'Berlin'"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("no walhook is streaming slot walhook"),
        "{err}"
    );
    assert!(out.contains("finished: 1 rows"), "{out}");
    let service = Running::start(&toml);
    let evs = eventually(Duration::from_secs(60), "the Snapshot queued", || async {
        let evs = events(&c).await;
        (!evs.is_empty()).then_some(evs)
    })
    .await;
    assert_eq!(evs.len(), 1);
    assert_eq!((evs[0].0.as_str(), evs[0].1.as_str()), ("1", "Snapshot"));
    service.stop().await;
}

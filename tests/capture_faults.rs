//! Capture under the things databases do every day: rows the queue refuses, DDL on
//! captured tables, partitioned tables. Capture goes on; what it cannot queue is kept.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::receiver::Receiver;
use support::{
    Daemon, TestDb, config_toml, current_insert_lsn, event_count, eventually, free_port,
    monitor_toml, slot_confirmed, wait_streaming,
};

/// (entity, entity_id, action, row) of every event, in commit order.
async fn events(c: &tokio_postgres::Client) -> Vec<(String, String, String, Value)> {
    c.query(
        "SELECT entity, entity_id, action, row FROM walhook.event ORDER BY commit_lsn, seq",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    })
    .unwrap_or_default()
}

async fn wait_events(c: &tokio_postgres::Client, n: i64, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        (event_count(c).await >= n).then_some(())
    })
    .await;
}

async fn rejected_count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM walhook.rejected", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// Alert types the monitor receiver got so far.
fn alert_types(r: &Receiver) -> Vec<String> {
    r.requests()
        .iter()
        .filter_map(|q| q.json()["type"].as_str().map(str::to_owned))
        .collect()
}

async fn wait_alert(r: &Receiver, kind: &str) -> Value {
    eventually(Duration::from_secs(30), kind, || async {
        r.requests()
            .iter()
            .map(|q| q.json())
            .find(|j| j["type"] == kind)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_value_jsonb_refuses_is_set_aside_and_capture_goes_on() {
    let db = TestDb::new();
    db.execute("CREATE TABLE doc (id int PRIMARY KEY, j json, note text)")
        .await;
    let monitor = Receiver::start().await;
    let admin = free_port();
    let toml = config_toml(
        &db.url,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[entity]]\nname = \"Doc\"\ntable = \"doc\"\n{}",
            monitor_toml(&monitor.url("/alerts"))
        ),
    );
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    // The poison change sits between good ones of the same transaction, then more follow.
    c.batch_execute(
        r#"BEGIN;
        INSERT INTO doc VALUES (1, '{"a":"ok"}', 'before');
        INSERT INTO doc VALUES (2, '{"a":"\u0000"}', 'poison');
        INSERT INTO doc VALUES (3, '{"a":"also ok"}', 'after');
        COMMIT;
        INSERT INTO doc VALUES (4, '[1,2]', 'next transaction');
        UPDATE doc SET note = 'updated' WHERE id = 1;"#,
    )
    .await
    .unwrap();
    let end = current_insert_lsn(&c).await;
    wait_events(&c, 4, "the four good changes").await;
    let evs = events(&c).await;
    let ids: Vec<(&str, &str)> = evs
        .iter()
        .map(|(_, id, action, _)| (id.as_str(), action.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("1", "Created"),
            ("3", "Created"),
            ("4", "Created"),
            ("1", "Updated")
        ],
        "good rows queued in order around the poison one"
    );

    let row = c
        .query_one(
            "SELECT entity, entity_id, action, reason, sqlstate, row FROM walhook.rejected",
            &[],
        )
        .await
        .expect("the poison change is in walhook.rejected");
    let (entity, id, action): (String, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (entity.as_str(), id.as_deref(), action.as_str()),
        ("Doc", Some("2"), "Created")
    );
    let reason: String = row.get(3);
    assert!(reason.contains("refused"), "{reason}");
    let sqlstate: Option<String> = row.get(4);
    assert_eq!(sqlstate.as_deref(), Some("22P05"), "{reason}");
    let text: String = row.get(5);
    assert!(
        text.contains(r"\u0000") && text.contains("poison"),
        "{text}"
    );

    // The slot moved past everything, the poison change included.
    eventually(
        Duration::from_secs(30),
        "the slot past the last change",
        || async { (slot_confirmed(&c).await? >= end).then_some(()) },
    )
    .await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("walhook_changes_rejected_total{entity=\"Doc\"} 1"),
        "{metrics}"
    );
    let alert = wait_alert(&monitor, "walhook.alert.ChangeRejected").await;
    assert!(
        alert["data"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("1 change of entity Doc")),
        "{alert}"
    );
    assert!(daemon.running(), "{}", daemon.log());
    assert!(
        daemon.log().contains("set aside in walhook.rejected"),
        "{}",
        daemon.log()
    );

    // After a restart the re-sent poison change is neither queued nor stored twice.
    assert_eq!(daemon.terminate().code(), Some(0));
    let _again = Daemon::start(&toml);
    wait_streaming(&c).await;
    c.execute("INSERT INTO doc VALUES (5, 'null', 'fence')", &[])
        .await
        .unwrap();
    wait_events(&c, 5, "the fence").await;
    assert_eq!((event_count(&c).await, rejected_count(&c).await), (5, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_captured_tables_never_stops_capture() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text, city text, secret text, note text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         CREATE TABLE account (id int PRIMARY KEY, v int);",
    )
    .await;
    let monitor = Receiver::start().await;
    let toml = config_toml(
        &db.url,
        &format!(
            r#"
[[entity]]
name = "Customer"
table = "customer"
actions = ["created", "updated", "deleted", "truncated"]
exclude = ["secret"]
track = ["name", "city"]

[[entity]]
name = "Account"
table = "account"
{}"#,
            monitor_toml(&monitor.url("/alerts"))
        ),
    );
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    c.batch_execute("INSERT INTO customer VALUES (1, 'Ann', 'Oslo', 's1', 'n')")
        .await
        .unwrap();
    wait_events(&c, 1, "the first event").await;

    // ADD COLUMN: the new column appears in row.
    c.batch_execute(
        "ALTER TABLE customer ADD COLUMN zip text;
         INSERT INTO customer VALUES (2, 'Bob', 'Rome', 's2', 'n', '00100');",
    )
    .await
    .unwrap();
    wait_events(&c, 2, "the insert after ADD COLUMN").await;
    assert_eq!(events(&c).await[1].3["zip"], json!("00100"));

    // DROP of an excluded column and of a tracked column: capture goes on.
    c.batch_execute(
        "ALTER TABLE customer DROP COLUMN secret;
         INSERT INTO customer VALUES (3, 'Cy', 'Paris', 'n', '75001');
         ALTER TABLE customer DROP COLUMN city;
         UPDATE customer SET name = 'Anna' WHERE id = 1;
         UPDATE customer SET note = 'untracked only' WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_events(&c, 4, "events after the drops").await;

    // A change to an id column sets that entity's changes aside; the others go on.
    c.batch_execute(
        "ALTER TABLE account RENAME COLUMN id TO account_id;
         INSERT INTO account VALUES (7, 1);
         INSERT INTO customer VALUES (4, 'Dee', 'n', '1000');
         TRUNCATE customer;",
    )
    .await
    .unwrap();
    wait_events(&c, 6, "events after the id rename and the truncate").await;
    let evs = events(&c).await;
    let summary: Vec<(&str, &str, &str)> = evs
        .iter()
        .map(|(e, id, a, _)| (e.as_str(), id.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("Customer", "1", "Created"),
            ("Customer", "2", "Created"),
            ("Customer", "3", "Created"),
            ("Customer", "1", "Updated"),
            ("Customer", "4", "Created"),
            ("Customer", "*", "Truncated"),
        ]
    );
    assert!(
        evs.iter().all(|(_, _, _, row)| row.get("secret").is_none()),
        "{evs:?}"
    );
    let reason: String = c
        .query_one(
            "SELECT reason FROM walhook.rejected WHERE entity = 'Account'",
            &[],
        )
        .await
        .expect("the account change is set aside")
        .get(0);
    assert!(reason.contains("id column \"id\""), "{reason}");

    let alert = wait_alert(&monitor, "walhook.alert.SchemaChanged").await;
    assert!(alert["data"]["detail"].as_str().is_some(), "{alert}");
    wait_alert(&monitor, "walhook.alert.ChangeRejected").await;
    let log = daemon.log();
    assert!(
        log.contains("\"city\""),
        "no warning names the dropped column:\n{log}"
    );
    assert!(daemon.running(), "{log}");

    // A restart after the DDL starts: the drift is a warning, not a refusal.
    assert_eq!(daemon.terminate().code(), Some(0));
    let daemon = Daemon::start(&toml);
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (5, 'Eve', 'n', '1')", &[])
        .await
        .unwrap();
    wait_events(&c, 7, "an event after the restart").await;
    let mut daemon = daemon;
    assert!(daemon.running(), "{}", daemon.log());
    assert!(
        alert_types(&monitor)
            .iter()
            .all(|t| t.starts_with("walhook.alert.")),
        "{:?}",
        alert_types(&monitor)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_entity_receives_every_partition_even_ones_attached_later() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE measurement (id int, region text, v int, PRIMARY KEY (id, region))
             PARTITION BY LIST (region);
         CREATE TABLE measurement_a PARTITION OF measurement FOR VALUES IN ('a');
         CREATE TABLE measurement_b PARTITION OF measurement FOR VALUES IN ('b');",
    )
    .await;
    let toml = config_toml(
        &db.url,
        "\n[[entity]]\nname = \"Measurement\"\ntable = \"measurement\"\n",
    );
    let (_dir, path) = support::write_config(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    c.batch_execute(
        "INSERT INTO measurement VALUES (1, 'a', 10), (2, 'b', 20);
         UPDATE measurement SET v = 11 WHERE id = 1;
         DELETE FROM measurement WHERE id = 2;",
    )
    .await
    .unwrap();
    // A partition attached while walhook runs.
    c.batch_execute(
        "CREATE TABLE measurement_c (id int NOT NULL, region text NOT NULL, v int);
         ALTER TABLE measurement ATTACH PARTITION measurement_c FOR VALUES IN ('c');
         INSERT INTO measurement VALUES (3, 'c', 30);
         UPDATE measurement SET v = 31 WHERE id = 3;
         DELETE FROM measurement WHERE id = 3;",
    )
    .await
    .unwrap();
    wait_events(&c, 7, "seven events").await;
    let evs = events(&c).await;
    let got: Vec<(&str, &str, &str)> = evs
        .iter()
        .map(|(e, id, a, _)| (e.as_str(), id.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("Measurement", r#"["1","a"]"#, "Created"),
            ("Measurement", r#"["2","b"]"#, "Created"),
            ("Measurement", r#"["1","a"]"#, "Updated"),
            ("Measurement", r#"["2","b"]"#, "Deleted"),
            ("Measurement", r#"["3","c"]"#, "Created"),
            ("Measurement", r#"["3","c"]"#, "Updated"),
            ("Measurement", r#"["3","c"]"#, "Deleted"),
        ]
    );
    assert_eq!(evs[5].3["v"], json!(31));
    drop(daemon);

    // `walhook check` says how partitions are captured.
    let (code, out, err) = support::walhook(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("partitions public.measurement"))
        .unwrap_or_else(|| panic!("no partitions line:\n{out}"));
    assert!(
        line.contains("partition root") && line.starts_with("ok"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_partition_root_is_refused_by_check_and_fixed_by_setup() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE measurement (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE measurement_1 PARTITION OF measurement FOR VALUES FROM (0) TO (100);
         CREATE PUBLICATION walhook FOR TABLE measurement;",
    )
    .await;
    let toml = config_toml(
        &db.url,
        "\n[[entity]]\nname = \"Measurement\"\ntable = \"measurement\"\n",
    );
    let (_dir, path) = support::write_config(&toml);
    let path = path.to_str().unwrap();
    let (code, out, _) = support::walhook(&["check", "--config", path]);
    assert_eq!(code, 78, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("partitions public.measurement"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("FAIL") && line.contains("publish_via_partition_root = true"),
        "{line}"
    );
    let (code, out, err) = support::walhook(&["setup", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = support::walhook(&["check", "--config", path]);
    assert_eq!(code, 0, "{out}");
}

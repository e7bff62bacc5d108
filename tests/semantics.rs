//! End to end: event semantics through the whole daemon to real HTTP receivers — derived
//! actions, row filters, debouncing.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::receiver::Receiver;
use support::{Daemon, TestDb, wait_queue_drained, wait_streaming};

/// How long to wait for deliveries to reach a receiver.
const DELIVERY_WAIT: Duration = Duration::from_secs(90);

fn config(db: &TestDb, entity_extra: &str, listeners: &str) -> String {
    format!(
        r#"[source]
url = "{url}"
system_name = "CRM"
heartbeat = "1s"
status_interval = "1s"

[queue]
batch_delay = "1ms"

[[entity]]
name = "Customer"
table = "customer"
{entity_extra}
{listeners}
"#,
        url = db.url
    )
}

fn listener(name: &str, url: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n{extra}\n"
    )
}

/// The CloudEvent types a receiver got, per entity id, in arrival order.
fn types_by_id(r: &Receiver) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for req in r.requests() {
        let ev = req.json();
        out.entry(ev["entityid"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(ev["type"].as_str().unwrap_or_default().to_owned());
    }
    out
}

fn types(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_to_cancelled_reaches_a_cancelled_only_listener_as_customer_cancelled() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text, status text);
         ALTER TABLE customer REPLICA IDENTITY FULL;",
    )
    .await;
    let cancellations = Receiver::start().await;
    let everything = Receiver::start().await;
    let toml = config(
        &db,
        r#"
[[entity.action]]
name = "Cancelled"
when = { all = [{ column = "status", changed_from = "active" }, { column = "status", changed_to = "cancelled" }] }
"#,
        &format!(
            "{}{}",
            listener(
                "cancellations",
                &cancellations.url("/cancelled"),
                "actions = [\"Cancelled\"]"
            ),
            listener("everything", &everything.url("/all"), "")
        ),
    );
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "INSERT INTO customer VALUES (1, 'Ada', 'active'), (2, 'Bob', 'trial');
         UPDATE customer SET name = 'Ada L.' WHERE id = 1;
         UPDATE customer SET status = 'cancelled' WHERE id = 1;
         UPDATE customer SET status = 'cancelled' WHERE id = 2;
         UPDATE customer SET status = 'active' WHERE id = 1;
         UPDATE customer SET status = 'cancelled', name = 'Ada' WHERE id = 1;",
    )
    .await
    .unwrap();
    cancellations
        .wait_for_count(2, DELIVERY_WAIT, "two cancellations")
        .await;
    everything
        .wait_for_count(7, DELIVERY_WAIT, "every change once")
        .await;
    wait_queue_drained(&c).await;

    // Only the changes from active to cancelled, each once.
    let got = cancellations.requests();
    assert_eq!(got.len(), 2);
    for req in &got {
        let ev = req.json();
        assert_eq!(ev["type"], "Customer.Cancelled", "{ev}");
        assert_eq!(ev["entityid"], "1", "{ev}");
        assert_eq!(ev["data"]["action"], "Cancelled", "{ev}");
        assert_eq!(ev["data"]["row"]["status"], "cancelled", "{ev}");
    }
    assert_eq!(got[1].json()["data"]["row"]["name"], "Ada");
    assert_ne!(got[0].json()["id"], got[1].json()["id"]);

    // A listener of every action gets each change once, as its most specific action.
    let all = types_by_id(&everything);
    assert_eq!(
        all.get("1"),
        Some(&types(&[
            "Customer.Created",
            "Customer.Updated",
            "Customer.Cancelled",
            "Customer.Updated",
            "Customer.Cancelled",
        ]))
    );
    assert_eq!(
        all.get("2"),
        Some(&types(&["Customer.Created", "Customer.Updated"]))
    );
    // The same change reaches the two listeners under one id.
    let everything_ids: Vec<String> = everything
        .requests()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(everything_ids.contains(&got[0].json()["id"].as_str().unwrap().to_owned()));
}

/// The value of an unlabelled counter in Prometheus text.
fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_keep_rows_from_listeners_and_an_entity_where_keeps_them_on_the_server() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, title_code text, status text);
         ALTER TABLE customer REPLICA IDENTITY FULL;",
    )
    .await;
    let nyt = Receiver::start().await;
    let everyone = Receiver::start().await;
    let admin = support::free_port();
    let toml = config(
        &db,
        "where = \"status <> 'draft'\"",
        &format!(
            "{}{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            listener(
                "nyt",
                &nyt.url("/nyt"),
                "filter = { column = \"title_code\", in = [\"NYT\"] }"
            ),
            listener("everyone", &everyone.url("/all"), "")
        ),
    );
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    let in_force: String = c
        .query_one(
            "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'walhook' AND tablename = 'customer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(in_force.contains("'draft'"), "{in_force}");
    c.batch_execute(
        "INSERT INTO customer VALUES (1, 'NYT', 'live'), (2, 'WSJ', 'live'),
                                     (3, 'NYT', 'draft'), (4, 'WSJ', 'draft');
         UPDATE customer SET title_code = 'FT' WHERE id = 3;
         DELETE FROM customer WHERE id = 1;
         INSERT INTO customer VALUES (5, 'NYT', 'live');",
    )
    .await
    .unwrap();
    everyone
        .wait_for_count(4, DELIVERY_WAIT, "the four changes to published rows")
        .await;
    nyt.wait_for_count(3, DELIVERY_WAIT, "the NYT changes")
        .await;
    wait_queue_drained(&c).await;

    assert_eq!(
        types_by_id(&nyt),
        BTreeMap::from([
            (
                "1".to_owned(),
                types(&["Customer.Created", "Customer.Deleted"])
            ),
            ("5".to_owned(), types(&["Customer.Created"])),
        ])
    );
    let all = types_by_id(&everyone);
    assert_eq!(all.keys().collect::<Vec<_>>(), ["1", "2", "5"]);
    assert_eq!(everyone.count(), 4);
    // Draft rows never became events, and were never even decoded by walhook.
    let drafts: i64 = c
        .query_one(
            "SELECT count(*) FROM walhook.event WHERE entity_id IN ('3', '4')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(drafts, 0);
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        counter(&metrics, "walhook_events_read_total"),
        Some(4.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_debounce_coalesces_bursts_per_customer_and_drops_created_then_deleted() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text, city text, status text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         INSERT INTO customer VALUES (1, 'Ada', 'London', 'a'), (2, 'Bob', 'Paris', 'a');",
    )
    .await;
    let coalescing = Receiver::start().await;
    let both = Receiver::start().await;
    let toml = config(
        &db,
        "",
        &format!(
            "{}{}",
            listener("coalescing", &coalescing.url("/c"), "debounce = \"2s\""),
            listener(
                "both",
                &both.url("/b"),
                "debounce = { window = \"2s\", drop_created_deleted = false }"
            )
        ),
    );
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    // Ten updates to customer 1 within a second (each its own transaction), touching
    // different columns; one to customer 2; customer 3 created and deleted.
    let columns = ["name", "city", "status"];
    for i in 0..10 {
        let column = columns[i % 3];
        c.execute(
            &format!("UPDATE customer SET {column} = $1 WHERE id = 1"),
            &[&format!("v{i}")],
        )
        .await
        .unwrap();
    }
    c.batch_execute(
        "UPDATE customer SET city = 'Rome' WHERE id = 2;
         INSERT INTO customer VALUES (3, 'Cy', 'Oslo', 'a');",
    )
    .await
    .unwrap();
    c.batch_execute("DELETE FROM customer WHERE id = 3")
        .await
        .unwrap();
    coalescing
        .wait_for_count(2, DELIVERY_WAIT, "one notification per customer")
        .await;
    both.wait_for_count(
        4,
        DELIVERY_WAIT,
        "customers 1 and 2, Created and Deleted of 3",
    )
    .await;

    // An update 3 s after the burst (its window is over): a new notification.
    c.batch_execute("UPDATE customer SET name = 'Ada 2' WHERE id = 1")
        .await
        .unwrap();
    coalescing
        .wait_for_count(3, DELIVERY_WAIT, "the later update")
        .await;
    wait_queue_drained(&c).await;
    let pending: i64 = c
        .query_one("SELECT count(*) FROM walhook.debounce", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0);

    let got = coalescing.requests();
    assert_eq!(got.len(), 3, "{:?}", types_by_id(&coalescing));
    let first = got
        .iter()
        .map(|r| r.json())
        .find(|e| e["entityid"] == "1")
        .unwrap();
    assert_eq!(first["type"], "Customer.Updated");
    assert_eq!(
        first["data"]["changedFields"],
        serde_json::json!(["name", "city", "status"])
    );
    assert_eq!(first["data"]["row"]["name"], "v9");
    assert_eq!(first["data"]["row"]["city"], "v7");
    assert_eq!(first["data"]["old"]["name"], "Ada");
    assert_eq!(
        types_by_id(&coalescing),
        BTreeMap::from([
            (
                "1".to_owned(),
                types(&["Customer.Updated", "Customer.Updated"])
            ),
            ("2".to_owned(), types(&["Customer.Updated"])),
        ])
    );
    let later = got.last().unwrap().json();
    assert_eq!(later["data"]["changedFields"], serde_json::json!(["name"]));
    assert_ne!(later["id"], first["id"]);

    let b = types_by_id(&both);
    assert_eq!(
        b.get("3"),
        Some(&types(&["Customer.Created", "Customer.Deleted"]))
    );
    // The same coalesced window has the same id for both listeners.
    let both_first = both
        .requests()
        .iter()
        .map(|r| r.json())
        .find(|e| e["entityid"] == "1")
        .unwrap();
    assert_eq!(both_first["id"], first["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_row_change_reaches_the_parents_listener_as_customer_updated_naming_the_attribute()
{
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text);
         CREATE TABLE customer_attribute (customer_id int REFERENCES customer,
             attr_name text, value text, PRIMARY KEY (customer_id, attr_name));
         INSERT INTO customer VALUES (1, 'Ada');",
    )
    .await;
    let crm = Receiver::start().await;
    let toml = config(
        &db,
        "\n[[entity.child]]\ntable = \"customer_attribute\"\nparent = [\"customer_id\"]\nfield = \"attr_name\"\ninclude = true\n",
        &listener("crm", &crm.url("/crm"), ""),
    );
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO customer_attribute VALUES (1, 'colour', 'red'), (1, 'size', 'XL');
         UPDATE customer_attribute SET value = 'L' WHERE attr_name = 'size';
         COMMIT;",
    )
    .await
    .unwrap();
    crm.wait_for_count(1, DELIVERY_WAIT, "one event for the transaction")
        .await;
    c.batch_execute("DELETE FROM customer_attribute WHERE attr_name = 'colour'")
        .await
        .unwrap();
    crm.wait_for_count(2, DELIVERY_WAIT, "the delete").await;
    wait_queue_drained(&c).await;

    let got: Vec<serde_json::Value> = crm.requests().iter().map(|r| r.json()).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["type"], "Customer.Updated");
    assert_eq!(got[0]["entityid"], "1");
    assert_eq!(
        got[0]["data"]["changedFields"],
        serde_json::json!(["colour", "size"])
    );
    let attrs = &got[0]["data"]["row"]["customer_attribute"];
    assert_eq!(attrs["colour"]["value"], "red");
    assert_eq!(attrs["size"]["value"], "L");
    assert_eq!(
        got[1]["data"]["changedFields"],
        serde_json::json!(["colour"])
    );
    assert_eq!(
        got[1]["data"]["row"]["customer_attribute"]["colour"],
        serde_json::Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_queue_their_rows_each_period_once_across_processes_and_report_failures() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text, renew boolean);
         INSERT INTO customer SELECT i, 'c' || i, i <= 3 FROM generate_series(1, 10) i;",
    )
    .await;
    let reminders = Receiver::start().await;
    let mut toml = config(
        &db,
        "",
        &listener(
            "reminders",
            &reminders.url("/r"),
            "actions = [\"Reminder\"]",
        ),
    );
    toml.push_str(
        r#"
[[schedule]]
name = "renewals"
entity = "Customer"
action = "Reminder"
every = "2s"
query = "SELECT id, name FROM customer WHERE renew"

[[schedule]]
name = "broken"
entity = "Customer"
action = "Reminder"
every = "2s"
query = "SELECT id FROM no_such_table"
"#,
    );
    // Two processes share the queue (the second stands by for the slot).
    let first = Daemon::start(&toml);
    let second = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    reminders
        .wait_for_count(9, DELIVERY_WAIT, "three runs of three rows")
        .await;
    let mut first = first;
    let mut second = second;
    first.terminate();
    second.terminate();
    wait_queue_drained(&c).await;

    let runs: Vec<(String, Option<i64>, Option<String>)> = c
        .query(
            "SELECT schedule, rows, error FROM walhook.schedule_run WHERE NOT skipped ORDER BY period",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let good: Vec<&Option<i64>> = runs
        .iter()
        .filter(|(s, ..)| s == "renewals")
        .map(|(_, n, _)| n)
        .collect();
    assert!(good.len() >= 3, "{runs:?}");
    assert!(good.iter().all(|n| **n == Some(3)), "{runs:?}");
    // Every run's rows were delivered once: no period ran twice.
    let got = reminders.requests();
    assert_eq!(got.len(), 3 * good.len(), "{runs:?}");
    let ids: std::collections::HashSet<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), got.len());
    let ev = got[0].json();
    assert_eq!(ev["type"], "Customer.Reminder");
    assert!(
        ev["source"]
            .as_str()
            .unwrap()
            .ends_with("/schedule.renewals"),
        "{ev}"
    );
    assert!(["1", "2", "3"].contains(&ev["entityid"].as_str().unwrap()));
    assert_eq!(
        ev["data"]["row"]["name"],
        format!("c{}", ev["entityid"].as_str().unwrap())
    );
    // The broken schedule failed each period without stopping anything.
    let broken: Vec<&Option<String>> = runs
        .iter()
        .filter(|(s, ..)| s == "broken")
        .map(|(.., e)| e)
        .collect();
    assert!(!broken.is_empty());
    assert!(
        broken
            .iter()
            .all(|e| e.as_deref().is_some_and(|e| e.contains("no_such_table"))),
        "{broken:?}"
    );
    let (dir, path) = support::write_config(&toml);
    let (code, out, err) = support::walhook(&["status", "--config", path.to_str().unwrap()]);
    drop(dir);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("renewals: last run"), "{out}");
    assert!(out.contains("3 event(s)"), "{out}");
    assert!(
        out.contains("broken: last run")
            && out.contains("FAILED: query failed: relation \"no_such_table\" does not exist"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_synchronous_mode_a_commit_waits_until_its_event_is_in_the_queue() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let toml = config(&db, "", "").replace(
        "status_interval = \"1s\"",
        "status_interval = \"1s\"\nsynchronous = true",
    );
    // Without the server setting, synchronous mode refuses to start (exit 78).
    let mut refused = Daemon::start(&toml);
    let status = refused.child.wait().unwrap();
    assert_eq!(status.code(), Some(78), "{}", refused.log());
    assert!(
        refused.log().contains("synchronous_standby_names"),
        "{}",
        refused.log()
    );
    // ALTER SYSTEM runs outside a transaction block: one statement per call.
    db.execute("ALTER SYSTEM SET synchronous_standby_names = 'walhook'")
        .await;
    db.execute("SELECT pg_reload_conf()").await;

    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    // The COMMIT returns once walhook has the event in the queue: no waiting needed.
    c.batch_execute("INSERT INTO customer VALUES (1, 'Ada')")
        .await
        .unwrap();
    let queued: i64 = c
        .query_one(
            "SELECT count(*) FROM walhook.event WHERE entity_id = '1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1);

    // With walhook stopped, a COMMIT waits (here until its statement timeout would end it).
    daemon.terminate();
    let writer = db.client().await;
    let insert = tokio::spawn(async move {
        writer
            .batch_execute("SET statement_timeout = '120s'; INSERT INTO customer VALUES (2, 'Bob')")
            .await
    });
    support::eventually(
        Duration::from_secs(30),
        "a COMMIT waiting for walhook",
        || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    assert!(!insert.is_finished());
    // Once walhook runs again, the COMMIT completes and its event is in the queue.
    let _daemon = Daemon::start(&toml);
    tokio::time::timeout(Duration::from_secs(60), insert)
        .await
        .expect("the COMMIT completes once walhook runs")
        .unwrap()
        .unwrap();
    let queued: i64 = c
        .query_one(
            "SELECT count(*) FROM walhook.event WHERE entity_id = '2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debounce_windows_survive_a_killed_daemon_and_are_delivered_once_after_restart() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text, city text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         INSERT INTO customer VALUES (1, 'Ada', 'London');",
    )
    .await;
    let crm = Receiver::start().await;
    let toml = config(
        &db,
        "",
        &listener("crm", &crm.url("/crm"), "debounce = \"3s\""),
    );
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute("UPDATE customer SET name = 'Ada L.' WHERE id = 1")
        .await
        .unwrap();
    c.batch_execute("UPDATE customer SET city = 'Paris' WHERE id = 1")
        .await
        .unwrap();
    // Both changes are in the window before the daemon dies.
    support::eventually(
        Duration::from_secs(30),
        "an open window of two changes",
        || async {
            let n: i32 = c
                .query_one(
                    "SELECT coalesce(max(cardinality(event_ids)), 0) FROM walhook.debounce",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == 2).then_some(())
        },
    )
    .await;
    daemon.kill9();
    let _daemon = Daemon::start(&toml);
    crm.wait_for_count(1, DELIVERY_WAIT, "the coalesced notification")
        .await;
    wait_queue_drained(&c).await;
    // A fence: one more change, its own notification; nothing else arrived meanwhile.
    c.batch_execute("UPDATE customer SET name = 'Ada' WHERE id = 1")
        .await
        .unwrap();
    crm.wait_for_count(2, DELIVERY_WAIT, "the fence").await;
    wait_queue_drained(&c).await;
    let got: Vec<serde_json::Value> = crm.requests().iter().map(|r| r.json()).collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(
        got[0]["data"]["changedFields"],
        serde_json::json!(["name", "city"])
    );
    assert_eq!(got[1]["data"]["changedFields"], serde_json::json!(["name"]));
}

//! End to end: row changes reach real HTTP receivers through the whole daemon.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use support::receiver::{Receiver, Reply};
use support::{Daemon, TestDb, eventually, listener_toml, wait_queue_drained, wait_streaming};

async fn setup_tables(db: &TestDb) {
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text, city text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric(10,2));
         ALTER TABLE orders REPLICA IDENTITY FULL;",
    )
    .await;
}

fn config(db: &TestDb, listeners: &str) -> String {
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
subject = "customers/{{id}}"

[[entity]]
name = "Order"
table = "orders"

{listeners}
"#,
        url = db.url
    )
}

/// How long to wait for deliveries to reach a receiver.
const DELIVERY_WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_receive_exactly_their_subscribed_events_as_cloudevents() {
    let db = TestDb::new();
    setup_tables(&db).await;
    let crm = Receiver::start().await;
    let billing = Receiver::start().await;
    let toml = config(
        &db,
        &format!(
            r#"
[[listener]]
name = "crm"
url = "{}"
entities = ["Customer"]
headers = {{ "X-Api-Key" = "k-123", "X-Team" = "crm" }}

[[listener]]
name = "billing"
url = "{}"
entities = ["Order"]
actions = ["created"]
"#,
            crm.url("/hooks/crm"),
            billing.url("/hooks/billing")
        ),
    );
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "INSERT INTO customer VALUES (1, 'Ada', 'London');
         UPDATE customer SET city = 'Paris' WHERE id = 1;
         INSERT INTO orders VALUES (10, 1, 99.90);
         UPDATE orders SET total = 100 WHERE id = 10;",
    )
    .await
    .unwrap();
    crm.wait_for_count(2, DELIVERY_WAIT, "2 requests at crm")
        .await;
    billing
        .wait_for_count(1, DELIVERY_WAIT, "1 request at billing")
        .await;
    // A fence: one more customer change; once it arrives, nothing else is on its way.
    c.batch_execute("INSERT INTO customer VALUES (2, 'Grace', 'NYC')")
        .await
        .unwrap();
    crm.wait_for_count(3, DELIVERY_WAIT, "the fence at crm")
        .await;
    wait_queue_drained(&c).await;

    let reqs = crm.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    let first = &reqs[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/hooks/crm");
    assert_eq!(first.header("x-api-key"), Some("k-123"));
    assert_eq!(first.header("x-team"), Some("crm"));
    assert!(
        first
            .header("content-type")
            .unwrap_or("")
            .starts_with("application/cloudevents+json")
    );
    let ev = first.json();
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["type"], "Customer.Created");
    assert_eq!(ev["subject"], "customers/1");
    assert!(ev["source"].as_str().unwrap().contains("CRM"), "{ev}");
    assert!(
        uuid::Uuid::parse_str(ev["id"].as_str().unwrap()).is_ok(),
        "{ev}"
    );
    assert!(
        ev["time"].as_str().unwrap().ends_with('Z') || ev["time"].as_str().unwrap().contains('+')
    );
    assert_eq!(
        ev["data"]["row"],
        json!({"id": 1, "name": "Ada", "city": "London"})
    );
    let upd = reqs[1].json();
    assert_eq!(upd["type"], "Customer.Updated");
    assert_eq!(upd["data"]["changedFields"], json!(["city"]));
    assert_eq!(upd["data"]["old"]["city"], "London");
    // The event id is the one stored in walhook.event.
    let stored: uuid::Uuid = c
        .query_one(
            "SELECT event_id FROM walhook.event WHERE entity = 'Customer' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ev["id"], stored.to_string());

    let b = billing.requests();
    assert_eq!(b.len(), 1, "billing gets only Order.Created: {b:#?}");
    assert_eq!(b[0].json()["type"], "Order.Created");
    assert!(b[0].header("x-api-key").is_none());

    let processed: i64 = c
        .query_one("SELECT count(*) FROM walhook.processed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(processed, 4);
    let listeners: i64 = c
        .query_one("SELECT count(*) FROM walhook.listener WHERE enabled", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listeners, 2);
}

fn one_listener(url: &str) -> String {
    listener_toml("hook", url) + "timeout = \"2s\"\nmax_attempts = 50\n"
}

/// Event ids per entity id, as the receiver saw them (2xx answers only).
fn delivered_ids(r: &Receiver) -> HashMap<String, HashSet<String>> {
    let mut m: HashMap<String, HashSet<String>> = HashMap::new();
    for req in r.requests() {
        let ev = req.json();
        m.entry(ev["data"]["row"]["id"].to_string())
            .or_default()
            .insert(ev["id"].as_str().unwrap_or_default().to_owned());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_deliver_each_notification_once_and_a_standby_takes_over() {
    let db = TestDb::new();
    setup_tables(&db).await;
    let hook = Receiver::start().await;
    let toml = config(&db, &one_listener(&hook.url("/h")));
    let mut first = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    let mut second = Daemon::start(&toml);
    c.execute(
        "INSERT INTO customer SELECT g, 'n', 'c' FROM generate_series(1, 300) g",
        &[],
    )
    .await
    .unwrap();
    hook.wait_for_count(300, DELIVERY_WAIT, "300 deliveries")
        .await;
    wait_queue_drained(&c).await;
    let reqs = hook.requests();
    let ids: HashSet<String> = reqs
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        (reqs.len(), ids.len()),
        (300, 300),
        "each notification delivered once"
    );
    assert!(second.running(), "the standby exited:\n{}", second.log());
    eventually(
        Duration::from_secs(60),
        "the second process standing by",
        || async { second.log().contains("standing by").then_some(()) },
    )
    .await;

    // Kill the streaming process; the standby takes over the slot.
    first.kill9();
    c.execute(
        "INSERT INTO customer SELECT g, 'n', 'c' FROM generate_series(301, 350) g",
        &[],
    )
    .await
    .unwrap();
    hook.wait_for_count(350, DELIVERY_WAIT, "deliveries after the takeover")
        .await;
    let after: HashSet<String> = hook
        .requests()
        .iter()
        .map(|r| r.json()["data"]["row"]["id"].to_string())
        .collect();
    assert_eq!(after.len(), 350);
    let standby_lines = second
        .log()
        .lines()
        .filter(|l| l.contains("standing by"))
        .count();
    assert_eq!(standby_lines, 1, "standby logged once:\n{}", second.log());
    assert_eq!(second.terminate().code(), Some(0), "{}", second.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_delivery_then_restart_delivers_every_event_with_stable_ids() {
    let db = TestDb::new();
    setup_tables(&db).await;
    let hook = Receiver::start().await;
    // Slow answers keep deliveries in flight when the process dies.
    hook.respond_with(|_, _| Reply::status(200).after(Duration::from_millis(20)));
    let toml = config(&db, &one_listener(&hook.url("/h")));
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute(
        "INSERT INTO customer SELECT g, 'n', 'c' FROM generate_series(1, 500) g",
        &[],
    )
    .await
    .unwrap();
    hook.wait_for_count(50, DELIVERY_WAIT, "some deliveries")
        .await;
    daemon.kill9();
    let _daemon = Daemon::start(&toml);
    eventually(
        Duration::from_secs(120),
        "every customer delivered",
        || async { (delivered_ids(&hook).len() >= 500).then_some(()) },
    )
    .await;
    let ids = delivered_ids(&hook);
    assert_eq!(ids.len(), 500);
    for (entity, event_ids) in ids {
        assert_eq!(
            event_ids.len(),
            1,
            "duplicates of {entity} must carry the same id"
        );
    }
}

/// A backlog of 100 customers with 10 versions each, in flight when the process dies: after
/// the restart every version arrives (stable ids), each customer's versions first arrive in
/// commit order, and each notification is recorded exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain_keeps_each_entitys_order_and_records_every_change_once() {
    const CUSTOMERS: usize = 100;
    const VERSIONS: usize = 10;
    let db = TestDb::new();
    setup_tables(&db).await;
    let hook = Receiver::start().await;
    hook.respond_with(|_, _| Reply::status(200).after(Duration::from_millis(20)));
    let toml = config(&db, &one_listener(&hook.url("/h")));
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    // One transaction per version: an entity's later changes sit behind its earlier ones
    // in walhook.new, across many claims.
    c.execute(
        "INSERT INTO customer SELECT g, 'v0', 'c' FROM generate_series(1, $1::int) g",
        &[&(CUSTOMERS as i32)],
    )
    .await
    .unwrap();
    for v in 1..VERSIONS {
        c.execute("UPDATE customer SET name = $1", &[&format!("v{v}")])
            .await
            .unwrap();
    }
    hook.wait_for_count(150, DELIVERY_WAIT, "some deliveries")
        .await;
    daemon.kill9();
    let delivered_before_kill = hook.count();
    assert!(
        delivered_before_kill < CUSTOMERS * VERSIONS,
        "the drain ended before the kill ({delivered_before_kill} requests)"
    );
    let _daemon = Daemon::start(&toml);
    let total = CUSTOMERS * VERSIONS;
    eventually(
        Duration::from_secs(150),
        "every version delivered",
        || async {
            let n: usize = delivered_ids(&hook).values().map(HashSet::len).sum();
            (n >= total).then_some(())
        },
    )
    .await;
    wait_queue_drained(&c).await;

    let mut first_seen = HashSet::new();
    let mut versions: HashMap<String, Vec<String>> = HashMap::new();
    for req in hook.requests() {
        let ev = req.json();
        if first_seen.insert(ev["id"].as_str().unwrap_or_default().to_owned()) {
            versions
                .entry(ev["subject"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(
                    ev["data"]["row"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
        }
    }
    let expected: Vec<String> = (0..VERSIONS).map(|v| format!("v{v}")).collect();
    assert_eq!(versions.len(), CUSTOMERS);
    for (subject, seen) in &versions {
        assert_eq!(seen, &expected, "{subject}: versions out of commit order");
    }
    let counts = c
        .query_one(
            "SELECT (SELECT count(*) FROM walhook.processed),
                    (SELECT count(*) FROM walhook.failed)",
            &[],
        )
        .await
        .unwrap();
    let (processed, failed): (i64, i64) = (counts.get(0), counts.get(1));
    assert_eq!((processed, failed), (total as i64, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_after_max_attempts_then_walhook_retry_delivers_once_the_receiver_recovers() {
    let db = TestDb::new();
    setup_tables(&db).await;
    let hook = Receiver::start().await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let healthy = healthy.clone();
        hook.respond_with(move |_, _| {
            if healthy.load(std::sync::atomic::Ordering::SeqCst) {
                Reply::status(200)
            } else {
                Reply::status(500).body("database on fire")
            }
        });
    }
    let toml = config(
        &db,
        &format!(
            r#"
[[listener]]
name = "hook"
url = "{}"
max_attempts = 3
backoff = {{ initial = "100ms", max = "200ms" }}
"#,
            hook.url("/h")
        ),
    );
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (7, 'Ada', 'London')", &[])
        .await
        .unwrap();
    let comment: String = eventually(
        Duration::from_secs(60),
        "the notification in walhook.failed",
        || async {
            let row = c
                .query_opt("SELECT comment, attempts FROM walhook.failed", &[])
                .await
                .ok()??;
            let attempts: i32 = row.get(1);
            assert_eq!(attempts, 3);
            row.get(0)
        },
    )
    .await;
    assert!(comment.contains("500"), "{comment}");
    assert!(comment.contains(&hook.url("/h")), "{comment}");
    assert_eq!(hook.count(), 3);

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, stdout, stderr) = support::walhook(&[
        "retry",
        "--all",
        "--config",
        daemon.config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    eventually(Duration::from_secs(60), "delivery after retry", || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM walhook.processed", &[])
            .await
            .ok()?
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(hook.count(), 4);
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM walhook.new) + (SELECT count(*) FROM walhook.failed)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// Every row of every table in schema walhook, as text.
async fn walhook_tables_text(c: &tokio_postgres::Client) -> String {
    let tables: Vec<String> = c
        .query(
            "SELECT quote_ident(table_name) FROM information_schema.tables
             WHERE table_schema = 'walhook' AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 5, "{tables:?}");
    let mut text = String::new();
    for t in tables {
        for row in c
            .query(&format!("SELECT t::text FROM walhook.{t} t"), &[])
            .await
            .unwrap()
        {
            text.push_str(row.get::<_, &str>(0));
            text.push('\n');
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_of_a_failing_listener_appear_in_no_log_table_cli_output_or_alert() {
    const TOKEN: &str = "T0KEN-s3cr3t-value";
    const PASSWORD: &str = "pa55-s3cr3t-word";
    const MONITOR_KEY: &str = "m0n-s3cr3t-key";
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("walhook:{PASSWORD}"));
    let secrets = [TOKEN, PASSWORD, MONITOR_KEY, basic.as_str()];

    let db = TestDb::new();
    setup_tables(&db).await;
    // A receiver that fails and, like many error pages, echoes the request back.
    let hook = Receiver::start().await;
    hook.respond_with(|r, _| {
        Reply::status(500).body(&format!(
            "cannot handle {} (authorization: {})",
            r.path,
            r.header("authorization").unwrap_or("-")
        ))
    });
    let alerts = Receiver::start().await;
    let url = hook
        .url(&format!("/h?token={TOKEN}&tenant=north"))
        .replace("http://", &format!("http://walhook:{PASSWORD}@"));
    let toml = config(
        &db,
        &format!(
            r#"
[[listener]]
name = "hook"
url = "{url}"
max_attempts = 2
backoff = {{ initial = "100ms", max = "200ms" }}

[[monitor]]
name = "ops"
url = "{}"
listener_failing_for = "1s"
min_interval = "1s"
"#,
            alerts.url(&format!("/alerts?key={MONITOR_KEY}"))
        ),
    );
    // Everything walhook and its libraries log, down to trace.
    let daemon = Daemon::start_with(&toml, "text", |cmd| {
        cmd.env("WALHOOK_LOG", "trace");
    });
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (7, 'Ada', 'London')", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the notification failed",
        || async {
            let n: i64 = c
                .query_one("SELECT count(*) FROM walhook.failed", &[])
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    for kind in ["NotificationFailed", "ListenerFailing"] {
        eventually(Duration::from_secs(60), kind, || async {
            alerts
                .requests()
                .iter()
                .any(|r| r.json()["type"] == format!("walhook.alert.{kind}"))
                .then_some(())
        })
        .await;
    }
    // The secrets really were sent: the checks below can fail.
    let first = &hook.requests()[0];
    assert!(first.path.contains(TOKEN), "{}", first.path);
    assert_eq!(
        first.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );

    let tables = walhook_tables_text(&c).await;
    assert!(tables.contains("http://***@127.0.0.1"), "{tables}");
    assert!(tables.contains("token=***&tenant=***"), "{tables}");
    let config_path = daemon.config.to_str().unwrap();
    let mut cli = String::new();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["failed"],
        vec!["failed", "--listener", "hook"],
    ] {
        let mut full = args.clone();
        full.extend(["--config", config_path]);
        let (code, stdout, stderr) = support::walhook(&full);
        assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
        cli.push_str(&stdout);
        cli.push_str(&stderr);
    }
    assert!(cli.contains("500"), "{cli}");
    let alert_bodies: String = alerts
        .requests()
        .iter()
        .map(|r| format!("{} {}\n", r.json(), r.path.replace(MONITOR_KEY, "")))
        .collect();
    assert!(alert_bodies.contains("500"), "{alert_bodies}");
    let log = daemon.log();
    assert!(log.lines().count() > 100, "trace logging is on:\n{log}");
    for secret in secrets {
        for (place, text) in [
            ("log", &log),
            ("table", &tables),
            ("CLI output", &cli),
            ("alert", &alert_bodies),
        ] {
            if let Some(line) = text.lines().find(|l| l.contains(secret)) {
                panic!("{secret} in a {place}: {line}");
            }
        }
    }
}

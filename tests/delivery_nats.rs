//! Delivery to NATS JetStream: real nats-server processes with JetStream in temp dirs, read
//! back by the durable consumer of examples/nats_consumer.rs.

mod support;

#[allow(dead_code)]
#[path = "../examples/nats_consumer.rs"]
mod consumer;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::nats::NatsServer;
use support::{Daemon, TestDb, config_toml, eventually, wait_streaming, walhook, write_config};

const TABLES: &str = "CREATE TABLE customer (id int PRIMARY KEY, first_name text, city text);
ALTER TABLE customer REPLICA IDENTITY FULL;
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;";

const ENTITIES: &str = "
[[entity]]
name = \"Customer\"
table = \"customer\"

[[entity]]
name = \"Order\"
table = \"orders\"
";

/// A NATS listener `bus` on `nats`, with fast retries, creating stream WALHOOK.
fn nats_listener(name: &str, url: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\ntimeout = \"3s\"\nbackoff = {{ initial = \"200ms\", max = \"1s\" }}\n{extra}"
    )
}

const STREAM: &str = "[listener.nats.stream]\nname = \"WALHOOK\"\n";

/// Reads every message of `filter` with durable consumer `durable`, until `n` arrived.
async fn read_all(
    js: &async_nats::jetstream::Context,
    durable: &str,
    filter: &str,
    n: usize,
    timeout: Duration,
) -> Vec<consumer::Received> {
    let c = consumer::durable_consumer(js, "WALHOOK", durable, filter, consumer::ACK_WAIT, 5)
        .await
        .expect("durable consumer");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + timeout;
    while got.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} messages on {filter}",
            got.len()
        );
        let batch = consumer::fetch(&c, 1000, Duration::from_millis(500), |_| Ok(()))
            .await
            .expect("fetch");
        got.extend(batch);
    }
    got
}

fn body(m: &consumer::Received) -> Value {
    serde_json::from_slice(&m.body).expect("a JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_two_entities_arrive_on_their_subjects_as_cloudevents_with_documented_headers() {
    let db = TestDb::new();
    db.execute(TABLES).await;
    let nats = NatsServer::start().await;
    let toml = config_toml(
        &db.url,
        &format!("{ENTITIES}{}", nats_listener("bus", &nats.url(), STREAM)),
    );
    let (_dir, path) = write_config(&toml);
    let path = path.to_str().unwrap();

    let (code, out, err) = walhook(&["setup", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "done  created JetStream stream WALHOOK on nats://127.0.0.1:{} capturing api.event.*",
            nats.port
        )),
        "{out}"
    );
    let (_, out, err) = walhook(&["setup", "--config", path]);
    assert!(out.contains("ok    JetStream stream WALHOOK"), "{out}{err}");
    let (_, out, _) = walhook(&["check", "--config", path]);
    let line = out
        .lines()
        .find(|l| l.contains("nats listener bus"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("ok") && line.contains("2 subject(s) (api.event.{entity}) captured"),
        "{out}"
    );

    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "INSERT INTO customer VALUES (1, 'Ada', 'Paris'), (2, 'Bob', 'Oslo');
         UPDATE customer SET city = 'Lyon' WHERE id = 1;
         DELETE FROM customer WHERE id = 2;
         INSERT INTO orders VALUES (10, 1, 9.90, 'first');
         UPDATE orders SET total = 12.50 WHERE id = 10;
         DELETE FROM orders WHERE id = 10;",
    )
    .await
    .unwrap();

    let js = nats.jetstream().await;
    let customers = read_all(&js, "crm", "api.event.customer", 4, Duration::from_secs(60)).await;
    let types: Vec<String> = customers
        .iter()
        .map(|m| body(m)["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "Customer.Created",
            "Customer.Created",
            "Customer.Updated",
            "Customer.Deleted"
        ],
        "per-entity order kept: {:?}",
        daemon.log()
    );
    for m in &customers {
        assert_eq!(m.subject, "api.event.customer");
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
    assert_eq!(
        customers[2].headers.get("Walhook-Changed-Fields"),
        Some(&"city".to_owned())
    );
    assert_eq!(body(&customers[2])["data"]["row"]["city"], "Lyon");

    // Orders, with a consumer whose first handling of each message fails: JetStream
    // redelivers it (the example naks it), so each arrives a second time, marked so.
    let orders_consumer = consumer::durable_consumer(
        &js,
        "WALHOOK",
        "billing",
        "api.event.order",
        consumer::ACK_WAIT,
        5,
    )
    .await
    .unwrap();
    let mut seen: BTreeMap<u64, i64> = BTreeMap::new();
    let mut acked = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "3 order events, each redelivered once: {seen:?}"
        );
        let batch = consumer::fetch(&orders_consumer, 100, Duration::from_millis(300), |m| {
            let first = !seen.contains_key(&m.stream_sequence);
            seen.insert(m.stream_sequence, m.delivered);
            if first {
                Err("not yet".to_owned())
            } else {
                Ok(())
            }
        })
        .await
        .expect("fetch");
        acked.extend(batch.into_iter().filter(|m| m.delivered == 2));
    }
    let order_types: Vec<String> = acked
        .iter()
        .map(|m| body(m)["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        order_types,
        ["Order.Created", "Order.Updated", "Order.Deleted"]
    );
    assert!(acked.iter().all(|m| m.subject == "api.event.order"));

    // Every notification was recorded delivered.
    eventually(
        Duration::from_secs(30),
        "7 processed notifications",
        || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM walhook.processed WHERE listener = 'bus'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == 7).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_server_refuses_fail_with_its_words_and_check_says_how_to_fix_it() {
    let db = TestDb::new();
    db.execute(TABLES).await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SMALL".into(),
        subjects: vec!["small.*".into()],
        max_message_size: 700,
        ..Default::default()
    })
    .await
    .expect("create stream SMALL");
    let listeners = format!(
        "{}{}",
        nats_listener(
            "unrouted",
            &nats.url(),
            "entities = [\"Customer\"]\n[listener.nats]\nsubject = \"unrouted.{entity}\"\n"
        ),
        nats_listener(
            "small",
            &nats.url(),
            "entities = [\"Order\"]\n[listener.nats]\nsubject = \"small.{entity}\"\n"
        ),
    );
    let toml = config_toml(&db.url, &format!("{ENTITIES}{listeners}"));
    let (_dir, path) = write_config(&toml);
    let path = path.to_str().unwrap();
    let (code, out, err) = walhook(&["setup", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, _) = walhook(&["check", "--config", path]);
    assert_eq!(code, 78, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("nats listener unrouted"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!(
                "no JetStream stream on nats://127.0.0.1:{} captures unrouted.customer",
                nats.port
            ))
            && line.contains("nats stream add WALHOOK --subjects 'unrouted.*'"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("nats listener small")),
        "{out}"
    );

    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "INSERT INTO customer VALUES (1, 'Ada', 'Paris');
         INSERT INTO orders VALUES (10, 1, 9.90, 'small');
         INSERT INTO orders VALUES (11, 1, 1.00, repeat('x', 2000));",
    )
    .await
    .unwrap();
    let failed = eventually(
        Duration::from_secs(60),
        "two failed notifications",
        || async {
            let rows = c
                .query(
                    "SELECT listener, comment, attempts FROM walhook.failed ORDER BY listener",
                    &[],
                )
                .await
                .ok()?;
            let rows: Vec<(String, String, i32)> = rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            (rows.len() == 2).then_some(rows)
        },
    )
    .await;
    let (listener, comment, attempts) = &failed[0];
    assert_eq!(listener, "small");
    assert_eq!(*attempts, 1, "a refusal is final: {comment}");
    assert!(
        comment.contains("refused the message for small.order")
            && comment.contains("message size exceeds maximum allowed"),
        "{comment}"
    );
    let (listener, comment, attempts) = &failed[1];
    assert_eq!(listener, "unrouted");
    assert_eq!(*attempts, 1, "{comment}");
    assert!(
        comment.contains("no JetStream stream captures subject unrouted.customer")
            && comment.contains("no responders"),
        "{comment}"
    );
    // The small order went through.
    let stored = js
        .get_stream("SMALL")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(stored, 1);
}

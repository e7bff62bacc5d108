//! Delivery to NATS JetStream: real nats-server processes with JetStream in temp dirs, read
//! back by the durable consumer of examples/nats_consumer.rs.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use support::nats::{
    COUNTER_TABLE, ENTITIES, NatsServer, STREAM, TABLES, assert_documented_headers,
    assert_once_in_entity_order, assert_stream_holds, body, consumer, counter_load, event_ids,
    nats_listener, processed, read_all, types_per_entity,
};
use support::{
    CUSTOMER_ENTITY as CUSTOMER, Daemon, TestDb, config_toml, eventually, setup, wait_streaming,
    walhook, write_config,
};

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
    // Per-entity order: each customer's events in commit order. Different customers'
    // events may interleave, since publishes to one subject are pipelined.
    assert_eq!(
        types_per_entity(&customers),
        BTreeMap::from([
            (
                "1".to_owned(),
                vec!["Customer.Created".to_owned(), "Customer.Updated".to_owned()]
            ),
            (
                "2".to_owned(),
                vec!["Customer.Created".to_owned(), "Customer.Deleted".to_owned()]
            ),
        ]),
        "per-entity order kept: {:?}",
        daemon.log()
    );
    for m in &customers {
        assert_documented_headers(m, "api.event.customer");
    }
    let updated = customers
        .iter()
        .find(|m| body(m)["type"] == "Customer.Updated")
        .expect("the update");
    assert_eq!(
        updated.headers.get("Walhook-Changed-Fields"),
        Some(&"city".to_owned())
    );
    assert_eq!(body(updated)["data"]["row"]["city"], "Lyon");

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

/// JetStream API requests the server has answered so far (its monitoring port's /jsz).
async fn jetstream_api_requests(monitor: u16) -> u64 {
    let jsz: Value = reqwest::get(format!("http://127.0.0.1:{monitor}/jsz"))
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("GET /jsz")
        .json()
        .await
        .expect("/jsz as JSON");
    jsz["api"]["total"].as_u64().expect("api.total in /jsz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_subject_no_stream_captures_fails_every_message_after_few_stream_lookups() {
    const CUSTOMERS: i64 = 200;
    let db = TestDb::new();
    db.execute(TABLES).await;
    let monitor = support::free_port();
    let nats = NatsServer::start_with(&format!("http: 127.0.0.1:{monitor}")).await;
    let listener = nats_listener(
        "unrouted",
        &nats.url(),
        "concurrency = 64\n[listener.nats]\nsubject = \"unrouted.{entity}\"\n",
    );
    let toml = config_toml(&db.url, &format!("{ENTITIES}{listener}"));
    let (_dir, _path) = setup(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    let before = jetstream_api_requests(monitor).await;
    c.execute(
        "INSERT INTO customer SELECT g, 'Ada', 'Paris' FROM generate_series(1, $1::int) g",
        &[&(CUSTOMERS as i32)],
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(60), "every message failed", || async {
        let failed: i64 = c
            .query_one("SELECT count(*) FROM walhook.failed", &[])
            .await
            .ok()?
            .get(0);
        (failed == CUSTOMERS).then_some(())
    })
    .await;
    // One lookup answers for every failure within a second of it; without that reuse this
    // would be one per message.
    let lookups = jetstream_api_requests(monitor).await - before;
    let most = started.elapsed().as_secs() + 2;
    assert!(
        (1..=most).contains(&lookups),
        "{lookups} JetStream API requests for {CUSTOMERS} refused messages (at most {most} expected): {}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_50k_event_load_then_restart_stores_each_event_once_in_entity_order() {
    const ROWS: i32 = 10_000;
    const ROUNDS: i32 = 4; // updates per row: ROWS × (1 + ROUNDS) = 50,000 events
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let nats = NatsServer::start().await;
    let toml = config_toml(
        &db.url,
        &format!(
            "{CUSTOMER}{}",
            nats_listener("bus", &nats.url(), &format!("concurrency = 64\n{STREAM}"))
        ),
    );
    let (_dir, _path) = setup(&toml);
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;

    let load = tokio::spawn(counter_load(db.url.clone(), ROWS, ROUNDS));
    eventually(
        Duration::from_secs(180),
        "10,000 events published",
        || async { (processed(&c, "bus").await >= 10_000).then_some(()) },
    )
    .await;
    daemon.kill9();
    let at_kill = processed(&c, "bus").await;
    load.await.unwrap();

    // The new process takes over the dead one's notifications when their leases end.
    let daemon = Daemon::start(&toml);
    let total = i64::from(ROWS * (1 + ROUNDS));
    eventually(
        Duration::from_secs(300),
        "all 50,000 events published",
        || async { (processed(&c, "bus").await == total).then_some(()) },
    )
    .await;
    assert!(
        at_kill < total,
        "the kill came after the load was delivered"
    );
    let expected = event_ids(&c).await;
    assert_eq!(expected.len() as i64, total, "{}", daemon.log());

    let js = nats.jetstream().await;
    assert_stream_holds(&js, "WALHOOK", total as u64, &c, "bus", &nats).await;
    let messages = read_all(
        &js,
        "audit",
        "api.event.customer",
        total as usize,
        Duration::from_secs(120),
    )
    .await;
    assert_once_in_entity_order(&messages, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_listener_publishes_and_wrong_credentials_are_named_by_check() {
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with(&format!(
        "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n",
        user.public_key()
    ))
    .await;
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let secrets = tempfile::tempdir().unwrap();
    let seed = secrets.path().join("walhook.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let stranger = secrets.path().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let config = |seed_file: &std::path::Path| {
        config_toml(
            &db.url,
            &format!(
                "{CUSTOMER}{}",
                nats_listener(
                    "bus",
                    &nats.url(),
                    &format!(
                        "[listener.nats]\nnkey_seed_file = \"{}\"\n{STREAM}",
                        seed_file.display()
                    )
                )
            ),
        )
    };

    let (dir, path) = write_config(&config(&stranger));
    let (code, out, err) = walhook(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("nats listener bus"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("FAIL") && line.to_lowercase().contains("authorization violation"),
        "{out}"
    );
    assert!(
        !out.contains(&user.seed().unwrap()),
        "the seed is never printed"
    );
    drop(dir);

    let toml = config(&seed);
    let (_dir, _path) = setup(&toml);
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute(
        "INSERT INTO customer SELECT g, 0 FROM generate_series(1, 20) g",
        &[],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(60), "20 published", || async {
        (processed(&c, "bus").await == 20).then_some(())
    })
    .await;
}

/// PEM text of one DER item.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_trusts_its_ca_file_and_check_names_an_untrusted_certificate() {
    let (ca_pem, cert, key) = support::receiver::test_ca();
    let files = tempfile::tempdir().unwrap();
    let (ca, cert_file, key_file) = (
        files.path().join("ca.pem"),
        files.path().join("server.pem"),
        files.path().join("server.key"),
    );
    std::fs::write(&ca, ca_pem).unwrap();
    std::fs::write(&cert_file, pem("CERTIFICATE", cert.as_ref())).unwrap();
    std::fs::write(&key_file, pem("PRIVATE KEY", key.secret_der())).unwrap();
    let nats = NatsServer::start_with(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        cert_file.display(),
        key_file.display()
    ))
    .await;
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let config = |extra: &str| {
        config_toml(
            &db.url,
            &format!(
                "{CUSTOMER}{}",
                nats_listener("bus", &url, &format!("{extra}{STREAM}"))
            ),
        )
    };

    let (_d, path) = write_config(&config(""));
    let (code, out, err) = walhook(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("nats listener bus"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("FAIL") && line.contains("cannot connect to tls://127.0.0.1"),
        "{out}"
    );

    let toml = config(&format!("ca_file = \"{}\"\n", ca.display()));
    let (_dir, path) = setup(&toml);
    let (code, out, _) = walhook(&["check", "--config", &path]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("nats listener bus")),
        "{code} {out}"
    );
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute(
        "INSERT INTO customer SELECT g, 0 FROM generate_series(1, 20) g",
        &[],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(60), "20 published over TLS", || async {
        (processed(&c, "bus").await == 20).then_some(())
    })
    .await;
}

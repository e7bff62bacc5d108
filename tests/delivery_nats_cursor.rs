//! NATS JetStream listeners with `position = "cursor"`: no walhook.new / walhook.processed
//! rows per event, one row in walhook.listener_cursor holding the last walhook.event passed.
//! Real nats-server processes, read back by the durable consumer of examples/nats_consumer.rs.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::Value;
use support::nats::{
    COUNTER_TABLE, ENTITIES, NatsServer, STREAM, TABLES, assert_documented_headers,
    assert_once_in_entity_order, assert_stream_holds, body, changes_during_an_outage, counter_load,
    cursor, event_ids, insert_customers, last_event_id, nats_listener, read_all, read_stream,
    steady_inserts, types_per_entity,
};
use support::receiver::Receiver;
use support::{
    CUSTOMER_ENTITY, Daemon, TestDb, config_toml, event_count, eventually, failed_total, free_port,
    listener_toml, setup, wait_streaming, walhook, write_config,
};

/// A NATS listener with `position = "cursor"`: `top` goes into `[[listener]]`, `nats` (keys,
/// then maybe a `[listener.nats.stream]` section) after the position in `[listener.nats]`.
fn cursor_listener(name: &str, url: &str, top: &str, nats: &str) -> String {
    nats_listener(
        name,
        url,
        &format!("{top}[listener.nats]\nposition = \"cursor\"\n{nats}"),
    )
}

/// `SELECT count(*)` of `sql`, whose one parameter is `listener`.
async fn count(c: &tokio_postgres::Client, sql: &str, listener: &str) -> i64 {
    c.query_one(sql, &[&listener])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Rows of walhook.new and walhook.processed for `listener`.
async fn queue_rows(c: &tokio_postgres::Client, listener: &str) -> (i64, i64) {
    (
        count(
            c,
            "SELECT count(*) FROM walhook.new WHERE listener = $1",
            listener,
        )
        .await,
        count(
            c,
            "SELECT count(*) FROM walhook.processed WHERE listener = $1",
            listener,
        )
        .await,
    )
}

/// Waits until `listener` has a cursor row and returns its position.
async fn wait_cursor_row(c: &tokio_postgres::Client, listener: &str) -> i64 {
    eventually(
        Duration::from_secs(60),
        "the listener's cursor row",
        || async { cursor(c, listener).await },
    )
    .await
}

/// Waits until walhook.event holds `events` rows and `listener`'s cursor is at the newest.
async fn wait_cursor_at_end(
    c: &tokio_postgres::Client,
    listener: &str,
    events: i64,
    timeout: Duration,
) {
    eventually(timeout, "the cursor at the newest event", || async {
        (event_count(c).await == events && cursor(c, listener).await? == last_event_id(c).await)
            .then_some(())
    })
    .await;
}

/// The event ids (uuids) of `entity`'s events after walhook.event.id `after`, in id order.
async fn ids_after(c: &tokio_postgres::Client, entity: &str, after: i64) -> Vec<String> {
    c.query(
        "SELECT event_id::text FROM walhook.event WHERE entity = $1 AND id > $2 ORDER BY id",
        &[&entity, &after],
    )
    .await
    .expect("walhook.event")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The Nats-Msg-Id of each message, in stream order.
fn msg_ids(messages: &[support::nats::consumer::Received]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m.headers.get("Nats-Msg-Id").cloned().unwrap_or_default())
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_listener_publishes_in_commit_order_with_documented_headers_and_keeps_no_queue_rows()
 {
    let db = TestDb::new();
    db.execute(TABLES).await;
    let nats = NatsServer::start().await;
    // A filtered cursor listener on its own stream (the same event ids would be duplicates
    // in WALHOOK).
    let paris = cursor_listener(
        "paris",
        &nats.url(),
        "entities = [\"Customer\"]\nactions = [\"created\", \"updated\"]\nfilter = { column = \"city\", in = [\"Paris\", \"Lyon\"] }\n",
        "subject = \"paris.{entity}\"\n[listener.nats.stream]\nname = \"PARIS\"\nsubjects = [\"paris.*\"]\n",
    );
    let bus = cursor_listener("bus", &nats.url(), "", STREAM);
    let toml = config_toml(&db.url, &format!("{ENTITIES}{paris}{bus}"));
    let (_dir, _path) = setup(&toml);
    let c = db.client().await;

    // Before bus is configured: an event it must never get.
    let mut first = Daemon::start(&config_toml(&db.url, &format!("{ENTITIES}{paris}")));
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (0, 'Eve', 'Paris')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the first event", || async {
        (event_count(&c).await == 1).then_some(())
    })
    .await;
    first.terminate();

    let daemon = Daemon::start(&toml);
    let start = wait_cursor_row(&c, "bus").await;
    assert_eq!(
        start,
        last_event_id(&c).await,
        "bus starts at the newest event"
    );
    for sql in [
        "INSERT INTO customer VALUES (1, 'Ada', 'Paris'), (2, 'Bob', 'Oslo')",
        "UPDATE customer SET city = 'Lyon' WHERE id = 1",
        "DELETE FROM customer WHERE id = 2",
        "INSERT INTO orders VALUES (10, 1, 9.90, 'first')",
        "UPDATE orders SET total = 12.50 WHERE id = 10",
        "DELETE FROM orders WHERE id = 10",
        "INSERT INTO customer VALUES (99, 'Zoe', 'Paris')",
    ] {
        c.execute(sql, &[]).await.unwrap();
    }
    wait_cursor_at_end(&c, "bus", 9, Duration::from_secs(60)).await;

    let js = nats.jetstream().await;
    let customers = read_all(
        &js,
        "audit",
        "api.event.customer",
        5,
        Duration::from_secs(30),
    )
    .await;
    let orders = read_all(
        &js,
        "billing",
        "api.event.order",
        3,
        Duration::from_secs(30),
    )
    .await;
    // Published in walhook.event.id order, so each subject holds its events in commit order.
    assert_eq!(
        msg_ids(&customers),
        ids_after(&c, "Customer", start).await,
        "{}",
        daemon.log()
    );
    assert_eq!(msg_ids(&orders), ids_after(&c, "Order", start).await);
    assert_eq!(
        types_per_entity(&customers),
        BTreeMap::from([
            (
                "1".to_owned(),
                strings(&["Customer.Created", "Customer.Updated"])
            ),
            (
                "2".to_owned(),
                strings(&["Customer.Created", "Customer.Deleted"])
            ),
            ("99".to_owned(), strings(&["Customer.Created"])),
        ]),
        "customer 0 came before bus's cursor"
    );
    let order_types: Vec<_> = orders.iter().map(|m| body(m)["type"].clone()).collect();
    assert_eq!(
        order_types,
        ["Order.Created", "Order.Updated", "Order.Deleted"]
    );
    for m in &customers {
        assert_documented_headers(m, "api.event.customer");
    }
    for m in &orders {
        assert_documented_headers(m, "api.event.order");
    }
    let updated = customers
        .iter()
        .find(|m| body(m)["type"] == "Customer.Updated")
        .expect("the update");
    assert_eq!(
        updated.headers.get("Walhook-Changed-Fields"),
        Some(&"city".to_owned())
    );
    let mut walhook_stream = js.get_stream("WALHOOK").await.unwrap();
    assert_eq!(walhook_stream.info().await.unwrap().state.messages, 8);

    // paris: Customer created/updated in Paris or Lyon only, customer 0 included (its cursor
    // was set before that event). Customer 99 is the last event, so once it is there, every
    // event before it was passed or published.
    let got = read_stream(
        &js,
        "PARIS",
        "audit",
        "paris.customer",
        4,
        Duration::from_secs(60),
    )
    .await;
    let got: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            let ce = body(m);
            let id = ce["data"]["entityId"].as_str().unwrap_or_default();
            (
                id.to_owned(),
                ce["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want = [
        ("0", "Customer.Created"),
        ("1", "Customer.Created"),
        ("1", "Customer.Updated"),
        ("99", "Customer.Created"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(got, want);
    wait_cursor_at_end(&c, "paris", 9, Duration::from_secs(30)).await;
    let mut paris_stream = js.get_stream("PARIS").await.unwrap();
    assert_eq!(paris_stream.info().await.unwrap().state.messages, 4);

    for listener in ["bus", "paris"] {
        assert_eq!(queue_rows(&c, listener).await, (0, 0), "{listener}");
    }
    assert_eq!(failed_total(&c).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_50k_event_load_then_two_processes_resume_from_the_cursor_and_store_each_event_once()
 {
    const ROWS: i32 = 10_000;
    const ROUNDS: i32 = 4; // updates per row: ROWS × (1 + ROUNDS) = 50,000 events
    const CONCURRENCY: i64 = 64;
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let nats = NatsServer::start().await;
    let toml = config_toml(
        &db.url,
        &format!(
            "{CUSTOMER_ENTITY}{}",
            cursor_listener(
                "bus",
                &nats.url(),
                &format!("concurrency = {CONCURRENCY}\n"),
                STREAM
            )
        ),
    );
    let (_dir, _path) = setup(&toml);
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    wait_cursor_row(&c, "bus").await;

    let load = tokio::spawn(counter_load(db.url.clone(), ROWS, ROUNDS));
    let passed = "SELECT count(*) FROM walhook.event e JOIN walhook.listener_cursor l
                  ON e.id <= l.event_id WHERE l.listener = $1";
    eventually(
        Duration::from_secs(120),
        "10,000 events published",
        || async { (count(&c, passed, "bus").await >= 10_000).then_some(()) },
    )
    .await;
    daemon.kill9();
    let at_kill = cursor(&c, "bus").await.expect("bus's cursor");

    // Every publish from here on, duplicates included (the stream drops those silently).
    let watcher = async_nats::connect(nats.url()).await.unwrap();
    let mut publishes = watcher.subscribe("api.event.>").await.unwrap();
    watcher.flush().await.unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while publishes.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });

    // Two processes on one database: one streams from the slot, and only one at a time
    // delivers bus, starting from the stored cursor.
    let mut one = Daemon::start(&toml);
    let mut two = Daemon::start(&toml);
    load.await.unwrap();
    let total = i64::from(ROWS * (1 + ROUNDS));
    wait_cursor_at_end(&c, "bus", total, Duration::from_secs(240)).await;
    let after_kill: i64 = c
        .query_one(
            "SELECT count(*) FROM walhook.event WHERE id > $1",
            &[&at_kill],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        after_kill > 0,
        "nothing was left after the cursor when the process was killed"
    );
    // Everything after the stored cursor was published again after the restart …
    eventually(
        Duration::from_secs(30),
        "a publish of each event after the stored cursor",
        || async { (seen.load(Ordering::Relaxed) as i64 >= after_kill).then_some(()) },
    )
    .await;
    // … by one process: two would publish each about twice.
    let republished = seen.load(Ordering::Relaxed) as i64;
    assert!(
        republished <= after_kill + 2 * CONCURRENCY,
        "{republished} publishes after the restart for {after_kill} events after the cursor:\n{}\n{}",
        one.log(),
        two.log()
    );
    assert!(
        one.running() && two.running(),
        "{}\n{}",
        one.log(),
        two.log()
    );
    assert_eq!(queue_rows(&c, "bus").await, (0, 0));

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
    assert_once_in_entity_order(&messages, &event_ids(&c).await);
}

/// The value of the sample `series` (name and labels as printed) on the admin endpoint.
async fn metric(admin: u16, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The `new` count of `listener` in `walhook status --json`.
fn status_new(path: &str, listener: &str) -> Option<i64> {
    let (code, out, _) = walhook(&["status", "--json", "--config", path]);
    let doc: Value = serde_json::from_str(&out).ok()?;
    let l = doc["listeners"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == listener)?;
    (code == 0).then(|| l["new"].as_i64())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_holds_the_cursor_while_http_goes_on_and_status_and_metrics_show_the_backlog()
{
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let mut nats = NatsServer::start().await;
    let hook = Receiver::start().await;
    let admin = free_port();
    let toml = config_toml(
        &db.url,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n{CUSTOMER_ENTITY}{}{}",
            cursor_listener("bus", &nats.url(), "", STREAM),
            listener_toml("crm", &hook.url("/h"))
        ),
    );
    let (_dir, path) = setup(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    wait_cursor_row(&c, "bus").await;
    insert_customers(&c, 1, 500).await;
    wait_cursor_at_end(&c, "bus", 500, Duration::from_secs(60)).await;
    let held = cursor(&c, "bus").await;

    nats.stop();
    let stopped = Instant::now();
    changes_during_an_outage(&c).await;
    // 2,000 inserts and 1,500 updates in all: the HTTP listener gets them while NATS is down.
    hook.wait_for_count(
        3500,
        Duration::from_secs(120),
        "HTTP deliveries during the outage",
    )
    .await;
    let bus_depth = "walhook_queue_depth{listener=\"bus\"}";
    eventually(
        Duration::from_secs(60),
        "status and metrics show bus's backlog",
        || async {
            (status_new(&path, "bus")? == 3000
                && status_new(&path, "crm")? == 0
                && metric(admin, bus_depth).await? == 3000.0)
                .then_some(())
        },
    )
    .await;
    // The listener holds its place for the rest of the outage: it neither gives up on
    // events nor moves past them.
    while stopped.elapsed() < Duration::from_secs(12) {
        assert_eq!(cursor(&c, "bus").await, held, "{}", daemon.log());
        assert_eq!(failed_total(&c).await, 0, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        daemon
            .log()
            .contains("listener bus holds its cursor; the events wait in walhook.event"),
        "{}",
        daemon.log()
    );

    nats.resume().await;
    wait_cursor_at_end(&c, "bus", 3500, Duration::from_secs(120)).await;
    eventually(Duration::from_secs(60), "the backlog gone", || async {
        (status_new(&path, "bus")? == 0 && metric(admin, bus_depth).await? == 0.0).then_some(())
    })
    .await;
    assert_eq!(failed_total(&c).await, 0);
    assert_eq!(queue_rows(&c, "bus").await, (0, 0));
    let js = nats.jetstream().await;
    let messages = read_all(
        &js,
        "audit",
        "api.event.customer",
        3500,
        Duration::from_secs(60),
    )
    .await;
    assert_once_in_entity_order(&messages, &event_ids(&c).await);
}

/// `last_error` of `listener` in `walhook status --json` (null when none).
fn status_last_error(path: &str, listener: &str) -> Value {
    let (code, out, err) = walhook(&["status", "--json", "--config", path]);
    assert_eq!(code, 0, "walhook status: {err}");
    let doc: Value = serde_json::from_str(&out).expect("status --json");
    doc["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == listener))
        .map(|l| l["last_error"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_cursor_is_named_in_status_and_then_delivers_the_backlog_behind_it_once() {
    let db = TestDb::new();
    db.execute(TABLES).await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    // Full after two messages, and refusing more for now (not for good): a retryable error.
    let full = |max_messages| async_nats::jetstream::stream::Config {
        name: "WALHOOK".into(),
        subjects: vec!["api.event.customer".into()],
        max_messages,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(full(2))
        .await
        .expect("create stream WALHOOK");
    let listener = cursor_listener("bus", &nats.url(), "max_attempts = 1000\n", "");
    let toml = config_toml(&db.url, &format!("{ENTITIES}{listener}"));
    let (_dir, path) = setup(&toml);
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    wait_cursor_row(&c, "bus").await;
    for id in 1..=3 {
        c.execute("INSERT INTO customer VALUES ($1, 'Ada', 'Paris')", &[&id])
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(30), "three events queued", || async {
        (event_count(&c).await == 3).then_some(())
    })
    .await;
    let third: i64 = c
        .query_one("SELECT id FROM walhook.event WHERE entity_id = '3'", &[])
        .await
        .unwrap()
        .get(0);

    // Held at customer 3: status says so, with the server's words, as New (retrying).
    let shown = eventually(Duration::from_secs(30), "status showing the hold", || {
        let shown = status_last_error(&path, "bus");
        let held = shown["held_event_id"].as_i64() == Some(third);
        async move { held.then_some(shown) }
    })
    .await;
    assert_eq!(shown["status"], "New", "{shown}");
    assert!(shown["id"].is_null(), "no notification: {shown}");
    let comment = shown["comment"].as_str().unwrap_or_default();
    assert!(
        comment.contains("maximum messages") && comment.contains("retries until there is room"),
        "{shown}"
    );
    assert_eq!(cursor(&c, "bus").await, Some(third - 1));
    let (_, text, _) = walhook(&["status", "--config", &path]);
    assert!(
        text.contains(&format!("cursor held at event #{third}")),
        "{text}"
    );
    assert_eq!(failed_total(&c).await, 0);
    // A backlog longer than one read builds behind the hold: each retry reads the events
    // after the cursor again, and the read ahead of them is not used.
    c.execute(
        "INSERT INTO customer SELECT g, 'Bo', 'Oslo' FROM generate_series(4, 2503) g",
        &[],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "the backlog queued", || async {
        (event_count(&c).await == 2503).then_some(())
    })
    .await;
    let retried_since = "SELECT c.last_attempt_at > (SELECT max(queued_at) FROM walhook.event)
                         FROM walhook.listener_cursor c WHERE listener = 'bus'";
    eventually(
        Duration::from_secs(30),
        "a retry over the backlog",
        || async {
            let row = c.query_one(retried_since, &[]).await.ok()?;
            row.get::<_, Option<bool>>(0).unwrap_or(false).then_some(())
        },
    )
    .await;

    // Room again: the cursor moves past it and the note is gone.
    js.update_stream(full(-1)).await.expect("update stream");
    wait_cursor_at_end(&c, "bus", 2503, Duration::from_secs(60)).await;
    assert_stream_holds(&js, "WALHOOK", 2503, &c, "bus", &nats).await;
    assert!(status_last_error(&path, "bus").is_null());
    let held: Option<i64> = c
        .query_one(
            "SELECT held_event_id FROM walhook.listener_cursor WHERE listener = 'bus'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, None);
    assert_eq!(failed_total(&c).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_fails_with_the_servers_words_the_cursor_moves_past_and_retry_delivers_it()
 {
    let db = TestDb::new();
    db.execute(TABLES).await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    // Captures customers only, and only small messages.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "WALHOOK".into(),
        subjects: vec!["api.event.customer".into()],
        max_message_size: 700,
        ..Default::default()
    })
    .await
    .expect("create stream WALHOOK");
    let toml = config_toml(
        &db.url,
        &format!("{ENTITIES}{}", cursor_listener("bus", &nats.url(), "", "")),
    );
    let (_dir, path) = setup(&toml);
    let _daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    wait_cursor_row(&c, "bus").await;
    for sql in [
        "INSERT INTO customer VALUES (1, 'Ada', 'Paris')",
        "INSERT INTO orders VALUES (10, 1, 9.90, 'no stream')",
        "INSERT INTO customer VALUES (2, repeat('x', 2000), 'Oslo')",
        "INSERT INTO customer VALUES (3, 'Cy', 'Rome')",
    ] {
        c.execute(sql, &[]).await.unwrap();
    }
    wait_cursor_at_end(&c, "bus", 4, Duration::from_secs(60)).await;

    let failed = c
        .query(
            "SELECT e.entity, e.entity_id, f.comment, f.attempts FROM walhook.failed f
             JOIN walhook.event e ON e.id = f.event_id WHERE f.listener = 'bus' ORDER BY e.id",
            &[],
        )
        .await
        .unwrap();
    let failed: Vec<(String, String, Option<String>, i32)> = failed
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    let (entity, id, comment, attempts) = &failed[0];
    let comment = comment.as_deref().unwrap_or_default();
    assert_eq!((entity.as_str(), id.as_str()), ("Order", "10"));
    assert!(*attempts >= 1, "{comment}");
    assert!(
        comment.contains("no JetStream stream captures subject api.event.order")
            && comment.contains("no responders"),
        "{comment}"
    );
    let (entity, id, comment, _) = &failed[1];
    let comment = comment.as_deref().unwrap_or_default();
    assert_eq!((entity.as_str(), id.as_str()), ("Customer", "2"));
    assert!(
        comment.contains("refused the message for api.event.customer")
            && comment.contains("message size exceeds maximum allowed"),
        "{comment}"
    );
    // The events around them went through, customer 3 after both.
    let customers = read_all(
        &js,
        "audit",
        "api.event.customer",
        2,
        Duration::from_secs(30),
    )
    .await;
    let entity_ids: Vec<_> = customers
        .iter()
        .map(|m| body(m)["data"]["entityId"].clone())
        .collect();
    assert_eq!(entity_ids, ["1", "3"]);
    assert_eq!(queue_rows(&c, "bus").await, (0, 0));

    // The stream is fixed; retry takes the failed ones through the queue.
    js.update_stream(async_nats::jetstream::stream::Config {
        name: "WALHOOK".into(),
        subjects: vec!["api.event.customer".into(), "api.event.order".into()],
        max_message_size: -1,
        ..Default::default()
    })
    .await
    .expect("update stream WALHOOK");
    let (code, out, err) = walhook(&["retry", "--config", &path, "--listener", "bus", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(
        Duration::from_secs(60),
        "both retried and delivered",
        || async { (queue_rows(&c, "bus").await == (0, 2)).then_some(()) },
    )
    .await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM walhook.failed WHERE listener = $1",
            "bus"
        )
        .await,
        0
    );
    let all = read_all(&js, "all", "api.event.*", 4, Duration::from_secs(30)).await;
    let ids: std::collections::BTreeSet<String> = msg_ids(&all).into_iter().collect();
    assert_eq!(ids, event_ids(&c).await, "each event once, by its id");
    for m in &all {
        assert_eq!(
            m.headers.get("Nats-Msg-Id"),
            body(m)["id"].as_str().map(str::to_owned).as_ref()
        );
    }
    let mut stream = js.get_stream("WALHOOK").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switching_between_queue_and_cursor_under_load_loses_nothing_and_makes_no_double_rows()
 {
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    // NATS is down across the second reload: its retries must not use up the attempts.
    let bus = |position: &str| {
        let nats = format!("[listener.nats]\nposition = \"{position}\"\n{STREAM}");
        let listener = nats_listener("bus", &url, &format!("max_attempts = 1000\n{nats}"));
        config_toml(&db.url, &format!("{CUSTOMER_ENTITY}{listener}"))
    };
    let (_dir, _path) = setup(&bus("queue"));
    let daemon = Daemon::start(&bus("queue"));
    let reload = |position: &str| {
        std::fs::write(&daemon.config, bus(position)).expect("rewrite the config");
        daemon.hup();
    };
    let c = db.client().await;
    wait_streaming(&c).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(steady_inserts(db.url.clone(), stop.clone()));
    eventually(Duration::from_secs(30), "queue deliveries", || async {
        (queue_rows(&c, "bus").await.1 >= 1000).then_some(())
    })
    .await;

    reload("cursor");
    let start = wait_cursor_row(&c, "bus").await;
    eventually(Duration::from_secs(30), "the cursor moving", || async {
        (cursor(&c, "bus").await? > start + 1000).then_some(())
    })
    .await;
    assert!(
        daemon.log().contains("SIGHUP: configuration reloaded"),
        "{}",
        daemon.log()
    );
    let after_start = "SELECT count(*) FROM walhook.notification n JOIN walhook.listener_cursor c
                       USING (listener) WHERE n.listener = $1 AND n.event_id > c.event_id";
    assert_eq!(
        count(&c, after_start, "bus").await,
        0,
        "rows past the cursor"
    );

    // The cursor holds while NATS is down and a backlog builds behind it; switched back to
    // the queue, that backlog becomes walhook.new rows.
    nats.stop();
    eventually(
        Duration::from_secs(30),
        "a backlog behind the cursor",
        || async { (last_event_id(&c).await > cursor(&c, "bus").await? + 2000).then_some(()) },
    )
    .await;
    reload("queue");
    eventually(Duration::from_secs(30), "the cursor dropped", || async {
        cursor(&c, "bus").await.is_none().then_some(())
    })
    .await;
    assert!(
        daemon
            .log()
            .contains("got their backlog as walhook.new rows"),
        "{}",
        daemon.log()
    );
    assert!(queue_rows(&c, "bus").await.0 > 2000, "the backlog as rows");
    let handed = last_event_id(&c).await;
    eventually(
        Duration::from_secs(30),
        "fan-out after the switch",
        || async {
            let rows = "SELECT count(*) FROM walhook.new WHERE listener = $1 AND event_id > $2";
            let n: i64 = c.query_one(rows, &[&"bus", &handed]).await.ok()?.get(0);
            (n > 0).then_some(())
        },
    )
    .await;
    nats.resume().await;
    let delivered = queue_rows(&c, "bus").await.1;
    eventually(Duration::from_secs(30), "deliveries again", || async {
        (queue_rows(&c, "bus").await.1 > delivered + 1000).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let total = i64::from(load.await.expect("the load"));

    eventually(Duration::from_secs(30), "every event delivered", || async {
        (event_count(&c).await == total && queue_rows(&c, "bus").await.0 == 0).then_some(())
    })
    .await;
    let js = nats.jetstream().await;
    assert_stream_holds(&js, "WALHOOK", total as u64, &c, "bus", &nats).await;
    let messages = read_all(
        &js,
        "audit",
        "api.event.customer",
        total as usize,
        Duration::from_secs(30),
    )
    .await;
    assert_once_in_entity_order(&messages, &event_ids(&c).await);
    assert_eq!(cursor(&c, "bus").await, None);
    assert_eq!(failed_total(&c).await, 0, "{}", daemon.log());
    let doubled = c
        .query(
            "SELECT event_id FROM walhook.notification WHERE listener = 'bus'
             GROUP BY event_id HAVING count(*) > 1",
            &[],
        )
        .await
        .expect("walhook.notification");
    assert!(doubled.is_empty(), "{} events with two rows", doubled.len());
}

#[test]
fn debounce_with_position_cursor_is_a_config_error_naming_both_keys() {
    let toml = |top: &str, position: &str| {
        config_toml(
            "postgres://walhook@127.0.0.1:1/app",
            &format!(
                "{CUSTOMER_ENTITY}{}",
                nats_listener(
                    "bus",
                    "nats://127.0.0.1:4222",
                    &format!("{top}[listener.nats]\nposition = \"{position}\"\n")
                )
            ),
        )
    };
    let parse = |text: &str| {
        walhook::config::Config::parse(text, std::path::Path::new("walhook.toml"))
            .map_err(|e| e.to_string())
    };
    assert!(parse(&toml("", "cursor")).is_ok());
    assert!(parse(&toml("debounce = \"2s\"\n", "queue")).is_ok());

    let text = toml("debounce = \"2s\"\n", "cursor");
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("position"))
        .expect("the position line");
    let err = parse(&text).expect_err("debounce with a cursor");
    assert!(
        err.contains(&format!("walhook.toml:{line}:"))
            && err.contains("nats.position")
            && err.contains("debounce"),
        "{err}"
    );
    let (_dir, path) = write_config(&text);
    let (code, out, stderr) = walhook(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 78, "{out}{stderr}");
    let said = format!("{out}{stderr}");
    assert!(
        said.contains("nats.position") && said.contains("debounce"),
        "{said}"
    );

    let err = parse(&toml("", "sideways")).expect_err("an unknown position");
    assert!(
        err.contains("\"sideways\"") && err.contains("\"queue\"") && err.contains("\"cursor\""),
        "{err}"
    );
}

//! NATS JetStream delivery when the server fails: an outage, a server that answers "no
//! responders" while JetStream is not serving, and restarts in a loop under a steady load.
//! Real nats-server processes, read back by the durable consumer of examples/nats_consumer.rs.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::nats::{
    COUNTER_TABLE, ENTITIES, NatsServer, STREAM, TABLES, assert_once_in_entity_order,
    assert_stream_holds, changes_during_an_outage, cursor, event_ids, insert_customers,
    last_event_id, nats_listener, processed, read_all, read_stream, steady_inserts,
};
use support::receiver::Receiver;
use support::{
    CUSTOMER_ENTITY as CUSTOMER, Daemon, TestDb, XorShift, config_toml, event_count, eventually,
    failed_total, listener_toml, setup, wait_streaming, walhook,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_while_jetstream_is_not_serving_holds_the_listener_instead_of_failing_messages()
 {
    let db = TestDb::new();
    db.execute(TABLES).await;
    let mut nats = NatsServer::start().await;
    let listener = nats_listener(
        "bus",
        &nats.url(),
        &format!("max_attempts = 1000\n{STREAM}"),
    );
    let toml = config_toml(&db.url, &format!("{ENTITIES}{listener}"));
    let (_dir, _path) = setup(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    // The same server and port with JetStream off: publishes are answered "no responders",
    // as they are for a moment while a server starts or stops.
    nats.stop();
    nats.configure(false, "");
    nats.resume().await;
    c.execute("INSERT INTO customer VALUES (1, 'Ada', 'Paris')", &[])
        .await
        .unwrap();
    let comment = eventually(Duration::from_secs(60), "a second attempt", || async {
        let row = c
            .query_opt(
                "SELECT attempts, comment FROM walhook.new WHERE listener = 'bus'",
                &[],
            )
            .await
            .ok()??;
        let (attempts, comment): (i32, Option<String>) = (row.get(0), row.get(1));
        (attempts >= 2).then_some(comment.unwrap_or_default())
    })
    .await;
    assert!(
        comment.contains("its JetStream API did not answer either") && comment.contains("retrying"),
        "{comment}"
    );
    assert_eq!(failed_total(&c).await, 0, "{}", daemon.log());

    nats.stop();
    nats.configure(true, "");
    nats.resume().await;
    eventually(
        Duration::from_secs(60),
        "delivery once JetStream is back",
        || async { (processed(&c, "bus").await == 1).then_some(()) },
    )
    .await;
    let js = nats.jetstream().await;
    assert_stream_holds(&js, "WALHOOK", 1, &c, "bus", &nats).await;
    assert_eq!(failed_total(&c).await, 0, "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_holds_its_listener_while_http_goes_on_and_loses_nothing() {
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let mut nats = NatsServer::start().await;
    let hook = Receiver::start().await;
    let toml = config_toml(
        &db.url,
        &format!(
            "{CUSTOMER}{}{}",
            nats_listener("bus", &nats.url(), STREAM),
            listener_toml("crm", &hook.url("/h"))
        ),
    );
    let (_dir, path) = setup(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    insert_customers(&c, 1, 500).await;
    eventually(Duration::from_secs(60), "500 published", || async {
        (processed(&c, "bus").await == 500).then_some(())
    })
    .await;

    nats.stop();
    let stopped = std::time::Instant::now();
    changes_during_an_outage(&c).await;
    // 2,000 inserts and 1,500 updates in all: the HTTP listener gets them while NATS is down.
    hook.wait_for_count(
        3500,
        Duration::from_secs(120),
        "HTTP deliveries during the outage",
    )
    .await;
    let status = eventually(
        Duration::from_secs(60),
        "status shows the held listener",
        || {
            let (path, daemon) = (path.clone(), &daemon);
            async move {
                let (code, out, _) = walhook(&["status", "--json", "--config", &path]);
                let doc: Value = serde_json::from_str(&out).ok()?;
                let bus = doc["listeners"]
                    .as_array()?
                    .iter()
                    .find(|l| l["name"] == "bus")?
                    .clone();
                (code == 0
                    && bus["new"] == 3000
                    && daemon.log().contains("holds its notifications"))
                .then_some(doc)
            }
        },
    )
    .await;
    let crm = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "crm")
        .unwrap();
    assert_eq!(crm["new"], 0, "{status}");
    assert!(
        status["listeners"][0]["oldest_undelivered"].is_string()
            || status["listeners"][1]["oldest_undelivered"].is_string(),
        "{status}"
    );
    assert_eq!(
        processed(&c, "bus").await,
        500,
        "nothing published while down"
    );
    // Hold the outage a few seconds more: the listener must not give up meanwhile.
    while stopped.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    nats.resume().await;
    eventually(
        Duration::from_secs(120),
        "3500 published after the outage",
        || async { (processed(&c, "bus").await == 3500).then_some(()) },
    )
    .await;
    assert_eq!(failed_total(&c).await, 0);
    assert!(
        daemon.log().contains("is reachable again"),
        "{}",
        daemon.log()
    );
    let js = nats.jetstream().await;
    assert_stream_holds(&js, "WALHOOK", 3500, &c, "bus", &nats).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_server_again_and_again_under_load_fails_nothing_and_stores_each_event_once()
 {
    let restarts: u32 = std::env::var("WALHOOK_NATS_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut rng = XorShift::from_clock();
    let seed = rng.seed;
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let mut nats = NatsServer::start().await;
    // A queue listener and a cursor listener, each with its own subject and stream.
    let bus = nats_listener(
        "bus",
        &nats.url(),
        &format!("max_attempts = 1000\n{STREAM}"),
    );
    let log = nats_listener(
        "log",
        &nats.url(),
        "max_attempts = 1000\n[listener.nats]\nposition = \"cursor\"\nsubject = \"log.{entity}\"\n[listener.nats.stream]\nname = \"LOG\"\n",
    );
    let toml = config_toml(&db.url, &format!("{CUSTOMER}{bus}{log}"));
    let (_dir, _path) = setup(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(steady_inserts(db.url.clone(), stop.clone()));

    for k in 0..restarts {
        // Up so long that publishes are in flight, down from an instant to a few retries.
        let up = 300 + rng.below(1200);
        let down = rng.below(1500);
        tokio::time::sleep(Duration::from_millis(up)).await;
        nats.stop();
        tokio::time::sleep(Duration::from_millis(down)).await;
        nats.resume().await;
        assert_eq!(
            failed_total(&c).await,
            0,
            "restart {k} (up {up} ms, down {down} ms, seed {seed}): {}",
            daemon.log()
        );
    }
    // Both listeners delivered again after the last restart, with the load still running.
    let (published, passed) = (processed(&c, "bus").await, cursor(&c, "log").await);
    eventually(
        Duration::from_secs(60),
        "deliveries after the last restart",
        || async {
            (processed(&c, "bus").await > published + 100
                && cursor(&c, "log").await > passed.map(|p| p + 100))
            .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let total = i64::from(load.await.expect("the load"));

    eventually(
        Duration::from_secs(120),
        "every event published by both listeners",
        || async {
            (event_count(&c).await == total
                && processed(&c, "bus").await == total
                && cursor(&c, "log").await? == last_event_id(&c).await)
                .then_some(())
        },
    )
    .await;
    assert_eq!(failed_total(&c).await, 0, "seed {seed}: {}", daemon.log());
    let expected = event_ids(&c).await;
    let js = nats.jetstream().await;
    for (stream, listener, filter) in [
        ("WALHOOK", "bus", "api.event.customer"),
        ("LOG", "log", "log.customer"),
    ] {
        assert_stream_holds(&js, stream, total as u64, &c, listener, &nats).await;
        let messages = read_stream(
            &js,
            stream,
            "audit",
            filter,
            total as usize,
            Duration::from_secs(60),
        )
        .await;
        assert_once_in_entity_order(&messages, &expected);
    }
    assert_eq!(nats.killed, 0, "every stop was graceful (seed {seed})");
}

/// A cursor listener held by a full stream: tests/delivery_nats_cursor.rs,
/// `a_held_cursor_is_named_in_status_and_then_delivers_the_backlog_behind_it_once`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_is_retried_with_the_servers_words_and_delivers_once_it_has_room() {
    let db = TestDb::new();
    db.execute(COUNTER_TABLE).await;
    let nats = NatsServer::start().await;
    // A stream the operator limited to 3 messages, refusing new ones when full: what a
    // full disk looks like to a publisher.
    let js = nats.jetstream().await;
    let full = async_nats::jetstream::stream::Config {
        name: "WALHOOK".into(),
        subjects: vec!["api.event.*".into()],
        max_messages: 3,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(full.clone())
        .await
        .expect("create stream WALHOOK");
    let listener = nats_listener("bus", &nats.url(), "max_attempts = 1000\n");
    let toml = config_toml(&db.url, &format!("{CUSTOMER}{listener}"));
    let (_dir, path) = setup(&toml);
    let daemon = Daemon::start(&toml);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute(
        "INSERT INTO customer SELECT g, 0 FROM generate_series(1, 10) g",
        &[],
    )
    .await
    .unwrap();
    let retried =
        "SELECT comment FROM walhook.new WHERE listener = 'bus' AND attempts >= 2 LIMIT 1";
    let comment = eventually(
        Duration::from_secs(60),
        "retries of a full stream",
        || async {
            c.query_opt(retried, &[])
                .await
                .ok()??
                .get::<_, Option<String>>(0)
        },
    )
    .await;
    assert!(
        comment.contains("maximum messages exceeded")
            && comment.contains("walhook retries until there is room"),
        "{comment}"
    );
    assert_eq!(failed_total(&c).await, 0, "{}", daemon.log());
    let (code, out, _) = walhook(&["status", "--config", &path]);
    assert!(
        code == 0 && out.contains("maximum messages exceeded"),
        "status names the refusal:\n{out}"
    );
    let mut stream = js.get_stream("WALHOOK").await.expect("stream WALHOOK");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 3);

    js.update_stream(async_nats::jetstream::stream::Config {
        max_messages: 100,
        ..full
    })
    .await
    .expect("make room in WALHOOK");
    eventually(
        Duration::from_secs(60),
        "delivery once the stream has room",
        || async { (processed(&c, "bus").await == 10).then_some(()) },
    )
    .await;
    assert_stream_holds(&js, "WALHOOK", 10, &c, "bus", &nats).await;
    let messages = read_all(
        &js,
        "audit",
        "api.event.customer",
        10,
        Duration::from_secs(30),
    )
    .await;
    assert_once_in_entity_order(&messages, &event_ids(&c).await);
    assert_eq!(failed_total(&c).await, 0, "{}", daemon.log());
}

//! SIGHUP reloads listeners without dropping the replication stream; a bad file is refused.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::receiver::Receiver;
use support::{
    CUSTOMER_ENTITY, Daemon, TestDb, config_toml, eventually, listener_toml, wait_queue_drained,
};

fn config(db: &TestDb, listeners: &[(&str, String)]) -> String {
    let mut blocks = CUSTOMER_ENTITY.to_owned();
    for (name, url) in listeners {
        blocks.push_str(&listener_toml(name, url));
    }
    config_toml(&db.url, &blocks)
}

async fn walsender_pid(c: &tokio_postgres::Client) -> Option<i32> {
    c.query_opt(
        // A slot being created is active too, under the creating backend: count walsenders only.
        "SELECT s.active_pid FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
         WHERE s.slot_name = 'walhook' AND a.backend_type = 'walsender'",
        &[],
    )
    .await
    .ok()?
    .and_then(|r| r.get(0))
}

/// How many times each customer id reached the receiver.
fn ids(r: &Receiver) -> HashMap<i64, usize> {
    let mut m = HashMap::new();
    for req in r.requests() {
        if let Some(id) = req.json()["data"]["row"]["id"].as_i64() {
            *m.entry(id).or_default() += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_listener_without_restarting_the_stream_and_refuses_a_bad_file() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let daemon = Daemon::start(&config(&db, &[("a", a.url("/a"))]));
    let c = db.client().await;
    let pid = eventually(Duration::from_secs(60), "walhook streaming", || {
        walsender_pid(&c)
    })
    .await;

    c.execute("INSERT INTO customer VALUES (1, 'one')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a gets 1", || async {
        ids(&a).contains_key(&1).then_some(())
    })
    .await;

    // Add listener b and reload.
    std::fs::write(
        &daemon.config,
        config(&db, &[("a", a.url("/a")), ("b", b.url("/b"))]),
    )
    .unwrap();
    daemon.hup();
    eventually(Duration::from_secs(30), "the reload in the log", || async {
        daemon.log().contains("listeners reloaded").then_some(())
    })
    .await;
    c.execute("INSERT INTO customer VALUES (2, 'two')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a and b get 2", || async {
        (ids(&a).contains_key(&2) && ids(&b).contains_key(&2)).then_some(())
    })
    .await;
    assert_eq!(
        walsender_pid(&c).await,
        Some(pid),
        "the replication connection was restarted"
    );
    let listed: i64 = c
        .query_one("SELECT count(*) FROM walhook.listener WHERE enabled", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 2);

    // An invalid file is refused; the old configuration keeps running.
    std::fs::write(&daemon.config, "[source]\nurl = 42\n").unwrap();
    daemon.hup();
    eventually(
        Duration::from_secs(30),
        "the refusal in the log",
        || async { daemon.log().contains("reload refused").then_some(()) },
    )
    .await;
    c.execute("INSERT INTO customer VALUES (3, 'three')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a and b get 3", || async {
        (ids(&a).contains_key(&3) && ids(&b).contains_key(&3)).then_some(())
    })
    .await;
    wait_queue_drained(&c).await;
    // Nothing lost or duplicated for a; b starts at the reload (no replay of 1).
    assert_eq!(
        ids(&a),
        HashMap::from([(1, 1), (2, 1), (3, 1)]),
        "{}",
        daemon.log()
    );
    assert_eq!(ids(&b), HashMap::from([(2, 1), (3, 1)]));
    assert_eq!(walsender_pid(&c).await, Some(pid));
}

//! Failover between walhook processes on one database: three processes, one streams the
//! slot and the others stand by (all three deliver); the streaming one is killed with
//! SIGKILL again and again during a steady load.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use support::receiver::Receiver;
use support::{CUSTOMER_ENTITY, Daemon, TestDb, XorShift, config_toml, eventually, failed_total};

/// The application_name of the walhook process streaming slot `walhook`, if any.
async fn streaming(c: &tokio_postgres::Client) -> Option<String> {
    c.query_opt(
        "SELECT a.application_name::text FROM pg_replication_slots s
         JOIN pg_stat_activity a ON a.pid = s.active_pid
         WHERE s.slot_name = 'walhook' AND a.backend_type = 'walsender'",
        &[],
    )
    .await
    .ok()?
    .map(|r| r.get(0))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_of_the_streaming_process_during_a_steady_load_lose_and_duplicate_no_event() {
    let kills: usize = std::env::var("WALHOOK_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut rng = XorShift::from_clock();
    let seed = rng.seed;

    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;",
    )
    .await;
    let hook = Receiver::start().await;
    let toml = config_toml(
        &db.url,
        &format!(
            "{CUSTOMER_ENTITY}\n[[listener]]\nname = \"crm\"\nurl = \"{}\"\ntimeout = \"2s\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n",
            hook.url("/h")
        ),
    );
    let start = |n: usize| {
        let name = format!("walhook-{n}");
        let daemon = Daemon::start_with(&toml, "text", |c| {
            c.env("PGAPPNAME", &name);
        });
        (name, daemon)
    };
    let mut started = 0;
    let mut daemons = Vec::new();
    for _ in 0..3 {
        daemons.push(start(started));
        started += 1;
    }
    let c = db.client().await;
    let mut leader = eventually(Duration::from_secs(60), "a streaming process", || async {
        streaming(&c).await
    })
    .await;

    // Steady load: 50 rows every 50 ms, 1,000 events/s, until the kills are done.
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicI32::new(0));
    let load = {
        let (url, stop, inserted) = (db.url.clone(), stop.clone(), inserted.clone());
        tokio::spawn(async move {
            let c = support::connect(&url).await;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                let from = inserted.load(Ordering::Acquire) + 1;
                c.execute(
                    "INSERT INTO customer SELECT g, 'n' || g FROM generate_series($1::int, $1::int + 49) g",
                    &[&from],
                )
                .await
                .expect("insert");
                inserted.fetch_add(50, Ordering::AcqRel);
            }
        })
    };

    let mut takeovers = Vec::with_capacity(kills);
    for k in 0..kills {
        // Stream under load for a random while, then kill the streaming process.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
        let i = daemons
            .iter()
            .position(|(name, _)| *name == leader)
            .unwrap_or_else(|| panic!("kill {k}: {leader} is not one of ours (seed {seed})"));
        let (_, mut victim) = daemons.remove(i);
        victim.kill9();
        let killed_at = Instant::now();
        let next = eventually(
            Duration::from_secs(60),
            "another process streaming",
            || async { streaming(&c).await.filter(|name| *name != leader) },
        )
        .await;
        takeovers.push(killed_at.elapsed());
        leader = next;
        // Three processes again.
        daemons.push(start(started));
        started += 1;
    }
    stop.store(true, Ordering::Release);
    load.await.unwrap();
    let rows = i64::from(inserted.load(Ordering::Acquire));

    // Every row gives exactly one event, and every event reaches the listener.
    eventually(Duration::from_secs(120), "one event per row", || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM walhook.event", &[])
            .await
            .ok()?
            .get(0);
        (n >= rows).then_some(())
    })
    .await;
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT entity_id) FROM walhook.event",
            &[],
        )
        .await
        .unwrap();
    let (events, entities): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((events, entities), (rows, rows), "seed {seed}");
    // Notifications held by killed processes wait for their leases (timeout + 30 s).
    eventually(
        Duration::from_secs(120),
        "every notification delivered",
        || async {
            let n: i64 = c
                .query_one("SELECT count(*) FROM walhook.new", &[])
                .await
                .ok()?
                .get(0);
            (n == 0).then_some(())
        },
    )
    .await;
    assert_eq!(failed_total(&c).await, 0);
    let ids: HashSet<String> = c
        .query("SELECT event_id::text FROM walhook.event", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let requests = hook.requests();
    let received: HashSet<String> = requests
        .iter()
        .filter_map(|r| r.json()["id"].as_str().map(str::to_owned))
        .collect();
    let missing = ids.difference(&received).count();
    assert_eq!(missing, 0, "{missing} events never delivered (seed {seed})");
    assert!(received.is_subset(&ids), "deliveries of unknown events");

    takeovers.sort();
    eprintln!(
        "failover: {kills} SIGKILLs of the streaming process among 3, {rows} rows at 1,000/s; takeover p50 {} ms, max {} ms; {} deliveries for {} events ({} repeated)",
        percentile(&takeovers, 0.5).as_millis(),
        takeovers.last().map_or(0, |d| d.as_millis()),
        requests.len(),
        ids.len(),
        requests.len() - received.len()
    );
}

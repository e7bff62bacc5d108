//! Console search benchmark: `queue::browse::search` (the console's notifications page)
//! over a queue holding `--notifications` notifications (default 1,000,000), one page of
//! 50 per query, for every kind of filter; then what the search indexes cost the delivery
//! path (moving notifications from walhook.new to walhook.processed).
//!
//!     cargo bench --bench search
//!     cargo bench --bench search -- --notifications 200000 --runs 10
//!
//! The queue is filled with SQL (no capture): 95 % Processed, 3 % Failed, 2 % New, two
//! listeners (crm 90 %, erp 10 %) and a third with nothing, entities Customer (80 %) and
//! Order (20 %) over 200,000 entity ids, created over the last 7 days. Prints a Markdown
//! table (median and slowest of `--runs` runs per query) and each query's EXPLAIN ANALYZE.

use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::{Client, NoTls};
use walhook::cluster::LocalCluster;
use walhook::queue::admin::NotificationStatus;
use walhook::queue::browse::{Cursor, PageAt, SearchFilter, explain_search, search};

const DB: &str = "search";
const PAGE: i64 = 50;
/// Notifications moved per statement in the delivery-path measurement (the dispatcher's
/// completion batches are of this order).
const MOVE_BATCH: i64 = 500;
/// Notifications moved in the delivery-path measurement.
const MOVED: i64 = 100_000;

/// The search indexes of walhook.processed (sql/0003_console.sql), for the delivery-path
/// measurement without them.
const PROCESSED_SEARCH_INDEXES: [(&str, &str); 4] = [
    ("processed_created_idx", "(created_at, id)"),
    (
        "processed_listener_created_idx",
        "(listener, created_at, id)",
    ),
    ("processed_entity_created_idx", "(entity, created_at, id)"),
    (
        "processed_entity_id_created_idx",
        "(entity_id, created_at, id)",
    ),
];

struct Args {
    notifications: i64,
    runs: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        notifications: 1_000_000,
        runs: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--notifications" => args.notifications = value().parse().expect("--notifications N"),
            "--runs" => args.runs = value().parse().expect("--runs N"),
            // cargo bench passes --bench to every target.
            "--bench" => {}
            other => panic!("unknown argument {other}; see the top of benches/search.rs"),
        }
    }
    args
}

/// Fills the queue: events first, then their notifications spread over the status tables.
const FILL: &str = "
INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity, entity_id,
                           action, changed_fields, \"row\", subject, source_table, queued_at)
SELECT gen_random_uuid(), ('0/' || to_hex(16777216 + i))::pg_lsn, 0, i,
       now() - interval '7 days' + i * (interval '7 days' / $1::bigint),
       CASE WHEN i % 5 = 0 THEN 'Order' ELSE 'Customer' END, (i % 200000)::text, 'Updated',
       ARRAY['name'], jsonb_build_object('id', i % 200000, 'name', 'customer ' || i),
       'Customer/' || (i % 200000), 'public.customer',
       now() - interval '7 days' + i * (interval '7 days' / $1::bigint)
FROM generate_series(1, $1::bigint) i";

const FILL_PROCESSED: &str = "
INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                               attempts, created_at, delivered_at, status_code, latency_ms)
SELECT e.id, e.id, CASE WHEN e.id % 10 = 0 THEN 'erp' ELSE 'crm' END, e.entity, e.entity_id,
       e.commit_lsn, e.seq, 1, e.queued_at, e.queued_at + interval '20 ms', 200, 12
FROM walhook.event e WHERE e.id <= $1::bigint * 95 / 100";

const FILL_FAILED: &str = "
INSERT INTO walhook.failed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                            attempts, created_at, failed_at, last_status_code, comment)
SELECT e.id, e.id, 'erp', e.entity, e.entity_id, e.commit_lsn, e.seq, 12, e.queued_at,
       e.queued_at + interval '1 hour', 500, 'HTTP 500 Internal Server Error from erp'
FROM walhook.event e WHERE e.id > $1::bigint * 95 / 100 AND e.id <= $1::bigint * 98 / 100";

const FILL_NEW: &str = "
INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq, created_at)
SELECT e.id, e.id, 'crm', e.entity, e.entity_id, e.commit_lsn, e.seq, e.queued_at
FROM walhook.event e WHERE e.id > $1::bigint * 98 / 100";

async fn connect(cluster: &LocalCluster) -> Client {
    let (client, conn) = tokio_postgres::connect(&cluster.url(DB), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

async fn fill(client: &mut Client, n: i64) {
    let t = Instant::now();
    walhook::queue::migrate(client).await.expect("migrate");
    for sql in [FILL, FILL_PROCESSED, FILL_FAILED, FILL_NEW] {
        client.execute(sql, &[&n]).await.expect("fill");
    }
    // Separate simple queries: VACUUM refuses the implicit transaction of a multi-statement one.
    for sql in [
        "SELECT setval('walhook.notification_id_seq', (SELECT max(id) FROM walhook.event))",
        "VACUUM ANALYZE walhook.event, walhook.new, walhook.processed, walhook.failed, walhook.discarded",
    ] {
        client.batch_execute(sql).await.expect("analyze");
    }
    eprintln!("== filled {n} notifications in {:.0?}", t.elapsed());
}

/// Milliseconds of each of `runs` runs of one search, after two warm-up runs.
async fn time(
    client: &Client,
    filter: &SearchFilter,
    at: PageAt,
    runs: usize,
) -> (usize, Vec<f64>) {
    let mut rows = 0;
    for _ in 0..2 {
        rows = search(client, filter, at, PAGE)
            .await
            .expect("search")
            .rows
            .len();
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        search(client, filter, at, PAGE).await.expect("search");
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    (rows, ms)
}

/// Moves [`MOVED`] fresh New notifications to walhook.processed, [`MOVE_BATCH`] per
/// statement as the dispatcher records deliveries; returns notifications per second.
async fn move_rate(client: &Client) -> f64 {
    client
        .execute(
            "INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq, created_at)
             SELECT nextval('walhook.notification_id_seq'), e.id, 'bench', e.entity, e.entity_id,
                    e.commit_lsn, e.seq, now()
             FROM walhook.event e ORDER BY e.id LIMIT $1",
            &[&MOVED],
        )
        .await
        .expect("queue notifications to move");
    let step = client
        .prepare(
            "WITH b AS (SELECT id FROM walhook.new WHERE listener = 'bench' ORDER BY id LIMIT $1),
             moved AS (DELETE FROM walhook.new n USING b WHERE n.id = b.id RETURNING n.*)
             INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn,
                                            seq, attempts, created_at, delivered_at, status_code,
                                            latency_ms)
             SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts + 1,
                    created_at, now(), 200, 5
             FROM moved",
        )
        .await
        .expect("prepare move");
    let t = Instant::now();
    let mut moved = 0u64;
    loop {
        let n = client.execute(&step, &[&MOVE_BATCH]).await.expect("move");
        if n == 0 {
            break;
        }
        moved += n;
    }
    let rate = moved as f64 / t.elapsed().as_secs_f64();
    for sql in [
        "DELETE FROM walhook.processed WHERE listener = 'bench'",
        "VACUUM walhook.processed, walhook.new",
    ] {
        client
            .batch_execute(sql)
            .await
            .expect("clean up moved rows");
    }
    rate
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cluster = LocalCluster::start().expect("start cluster");
    cluster.create_database(DB).expect("create database");
    rt.block_on(run(&cluster, &args));
}

async fn run(cluster: &LocalCluster, args: &Args) {
    let mut client = connect(cluster).await;
    fill(&mut client, args.notifications).await;
    // Statements run as the console runs them (its connection has no special planner
    // settings, only a statement timeout).
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let uuid: uuid::Uuid = client
        .query_one(
            "SELECT event_id FROM walhook.event WHERE id = $1::bigint / 2",
            &[&args.notifications],
        )
        .await
        .expect("an event id")
        .get(0);
    let middle: Cursor = {
        let row = client
            .query_one(
                "SELECT created_at, id FROM walhook.processed WHERE id = $1::bigint / 2",
                &[&args.notifications],
            )
            .await
            .expect("a middle row");
        Cursor {
            created_at: row.get(0),
            id: row.get(1),
        }
    };
    let f = SearchFilter::default;
    let cases: Vec<(&str, SearchFilter, PageAt)> = vec![
        ("newest, no filter", f(), PageAt::First),
        (
            "page in the middle (before cursor)",
            f(),
            PageAt::Before(middle),
        ),
        ("newer page (after cursor)", f(), PageAt::After(middle)),
        (
            "status Failed",
            SearchFilter {
                statuses: vec![NotificationStatus::Failed],
                ..f()
            },
            PageAt::First,
        ),
        (
            "status Processed, middle",
            SearchFilter {
                statuses: vec![NotificationStatus::Processed],
                ..f()
            },
            PageAt::Before(middle),
        ),
        (
            "listener erp (10 %)",
            SearchFilter {
                listener: Some("erp".into()),
                ..f()
            },
            PageAt::First,
        ),
        (
            "listener with no notifications",
            SearchFilter {
                listener: Some("idle".into()),
                ..f()
            },
            PageAt::First,
        ),
        (
            "entity Order (20 %)",
            SearchFilter {
                entity: Some("Order".into()),
                ..f()
            },
            PageAt::First,
        ),
        (
            "entity with no notifications",
            SearchFilter {
                entity: Some("Invoice".into()),
                ..f()
            },
            PageAt::First,
        ),
        (
            "entity id (5 notifications)",
            SearchFilter {
                entity_id: Some("4242".into()),
                ..f()
            },
            PageAt::First,
        ),
        (
            "entity + entity id",
            SearchFilter {
                entity: Some("Customer".into()),
                entity_id: Some("4242".into()),
                ..f()
            },
            PageAt::First,
        ),
        (
            "event id",
            SearchFilter {
                event: Some(uuid),
                ..f()
            },
            PageAt::First,
        ),
        (
            "one hour, 3 days ago",
            SearchFilter {
                from: Some(now - 3 * day),
                to: Some(now - 3 * day + Duration::from_secs(3600)),
                ..f()
            },
            PageAt::First,
        ),
        (
            "listener erp, one day, 5 days ago",
            SearchFilter {
                listener: Some("erp".into()),
                from: Some(now - 5 * day),
                to: Some(now - 4 * day),
                ..f()
            },
            PageAt::First,
        ),
        (
            "oldest day only",
            SearchFilter {
                to: Some(now - 6 * day),
                ..f()
            },
            PageAt::First,
        ),
    ];

    println!();
    println!(
        "Search over {} notifications, pages of {PAGE}, {} runs each (cargo bench --bench search):",
        args.notifications, args.runs
    );
    println!();
    println!("| query | rows | median ms | slowest ms |");
    println!("| --- | ---: | ---: | ---: |");
    let mut plans = String::new();
    for (name, filter, at) in &cases {
        let (rows, ms) = time(&client, filter, *at, args.runs).await;
        let median = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
        let slowest = ms.last().copied().unwrap_or(f64::NAN);
        println!("| {name} | {rows} | {median:.2} | {slowest:.2} |");
        let plan = explain_search(&client, filter, *at, PAGE)
            .await
            .expect("explain");
        plans.push_str(&format!("-- {name}\n{plan}\n"));
    }

    let names: Vec<String> = vec!["crm".into(), "erp".into(), "idle".into()];
    let t = Instant::now();
    walhook::queue::status::status(&client, &names, "none")
        .await
        .expect("status");
    println!();
    println!(
        "Overview listener counts (the `walhook status` report, counts every row): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    // What the search indexes cost where it matters: each delivered notification is
    // inserted into walhook.processed and its indexes.
    let with = move_rate(&client).await;
    for (name, _) in PROCESSED_SEARCH_INDEXES {
        client
            .batch_execute(&format!("DROP INDEX walhook.{name}"))
            .await
            .expect("drop index");
    }
    let without = move_rate(&client).await;
    for (name, columns) in PROCESSED_SEARCH_INDEXES {
        client
            .batch_execute(&format!(
                "CREATE INDEX {name} ON walhook.processed {columns}"
            ))
            .await
            .expect("create index");
    }
    let again = move_rate(&client).await;
    println!();
    println!("Moving {MOVED} notifications New → Processed, {MOVE_BATCH} per statement:");
    println!();
    println!("| walhook.processed indexes | notifications/s |");
    println!("| --- | ---: |");
    println!("| with the search indexes | {with:.0} |");
    println!("| without them | {without:.0} |");
    println!("| with them again | {again:.0} |");
    println!();
    println!("EXPLAIN (ANALYZE, BUFFERS) of each query:\n\n```\n{plans}```");
}

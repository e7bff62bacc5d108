//! The dispatcher against a real PostgreSQL and real HTTP receivers on 127.0.0.1: claims,
//! retries, failures with comments, ordering per entity, rate limits, several dispatchers on
//! one queue and graceful shutdown.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::receiver::{Receiver, Reply};
use tokio_util::sync::CancellationToken;
use walhook::config::{Config, ListenerConfig};
use walhook::delivery::dispatcher;
use walhook::mapper::EntityEvent;
use walhook::queue::{self, QueueWriter};

const SYSTEM_ID: &str = "7301234567890123456";

/// Listeners parsed from `[[listener]]` TOML, with short timeouts and backoffs unless the
/// block says otherwise.
fn listeners(blocks: &str) -> Vec<ListenerConfig> {
    let text = format!(
        "[source]\nurl = \"postgres://walhook@localhost/app\"\n\n\
         [[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n\
         [[entity]]\nname = \"Order\"\ntable = \"orders\"\n\n{blocks}"
    );
    let config = Config::parse_with_env(&text, Path::new("walhook.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    config.listeners
}

fn listener(name: &str, url: &str, extra: &str) -> String {
    let mut block = format!("[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n");
    if !extra.contains("timeout") {
        block.push_str("timeout = \"2s\"\n");
    }
    if !extra.contains("backoff") {
        block.push_str("backoff = { initial = \"100ms\", max = \"1s\" }\n");
    }
    block
}

fn event(lsn: u64, seq: u32, entity: &str, id: &str) -> EntityEvent {
    support::entity_event(lsn, seq, entity, id, json!({"id": id, "n": lsn}), &["n"])
}

/// A migrated database, a writer subscribed for `names` (all entities) and a client.
struct Queue {
    db: support::TestDb,
    writer: QueueWriter,
    client: tokio_postgres::Client,
}

impl Queue {
    async fn new(names: &[&str]) -> Queue {
        let db = support::TestDb::new();
        let mut client = db.client().await;
        queue::migrate(&mut client).await.unwrap();
        let mut writer = QueueWriter::new(db.client().await, SYSTEM_ID)
            .await
            .unwrap();
        writer.set_listeners(names.iter().map(|n| (n.to_string(), None)).collect());
        Queue { db, writer, client }
    }

    async fn write(&mut self, events: &[EntityEvent]) {
        let outcome = self.writer.write_batch(events, None).await.unwrap();
        assert_eq!(outcome.inserted, events.len() as u64);
    }

    fn db_config(&self) -> walhook::replication::conn::ConnectParams {
        walhook::replication::conn::ConnectParams::parse(&self.db.url, None).unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Waits up to `within` until `sql` returns a row; returns the first.
    async fn first_row(&self, within: Duration, what: &str, sql: &str) -> tokio_postgres::Row {
        support::eventually(within, what, || async {
            self.client
                .query(sql, &[])
                .await
                .unwrap()
                .into_iter()
                .next()
        })
        .await
    }

    /// Waits up to `within` until `walhook.processed` holds exactly `n` rows.
    async fn wait_processed(&self, n: i64, within: Duration, what: &str) {
        support::eventually(within, what, || async {
            (self.count("SELECT count(*) FROM walhook.processed").await == n).then_some(())
        })
        .await
    }

    /// Starts a dispatcher; returns its stop token and task.
    fn dispatch(
        &self,
        listeners: Vec<ListenerConfig>,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), dispatcher::DispatchError>>,
    ) {
        self.dispatch_with(listeners, dispatcher::Options::default())
    }

    /// Starts a dispatcher with `options`; returns its stop token and task.
    fn dispatch_with(
        &self,
        listeners: Vec<ListenerConfig>,
        options: dispatcher::Options,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), dispatcher::DispatchError>>,
    ) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(dispatcher::run_with(
            self.db_config(),
            listeners,
            "CRM".into(),
            stop.clone(),
            options,
        ));
        (stop, task)
    }
}

/// Stops a dispatcher and checks that it ended cleanly within a few seconds.
async fn stop(
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dispatcher::DispatchError>>,
) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("dispatcher stops within 10s")
        .expect("dispatcher task")
        .expect("dispatcher ends with Ok");
}

fn subject(r: &support::receiver::Received) -> String {
    r.json()["subject"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn retried_503s_show_the_last_failure_then_deliver_on_the_fourth_attempt() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(503), Reply::status(503), Reply::status(503)]);
    let mut q = Queue::new(&["crm"]).await;
    q.write(&[event(0x100, 0, "Customer", "1")]).await;
    // A longer backoff gives the test time to see the row waiting with its comment.
    let (token, task) = q.dispatch(listeners(&listener(
        "crm",
        &receiver.url("/hook"),
        "backoff = { initial = \"300ms\", max = \"2s\" }\nmax_attempts = 6",
    )));
    let retry_row = "SELECT comment, last_status_code, attempts FROM walhook.new";
    let (comment, code, attempts): (String, i32, i32) = support::eventually(
        Duration::from_secs(10),
        "a failed attempt in walhook.new",
        || async {
            let rows = q.client.query(retry_row, &[]).await.unwrap();
            let row = rows.first()?;
            let comment: Option<String> = row.get(0);
            Some((comment?, row.get(1), row.get(2)))
        },
    )
    .await;
    assert!(comment.contains("HTTP 503"), "{comment}");
    assert!(comment.contains(&receiver.url("/hook")), "{comment}");
    assert_eq!(code, 503);
    assert!(attempts >= 1);

    let row = q
        .first_row(
            Duration::from_secs(15),
            "delivery on the fourth attempt",
            "SELECT attempts, status_code FROM walhook.processed",
        )
        .await;
    let (attempts, status): (i32, i32) = (row.get(0), row.get(1));
    assert_eq!((attempts, status), (4, 200));
    assert_eq!(receiver.count(), 4);
    assert_eq!(q.count("SELECT count(*) FROM walhook.new").await, 0);
    stop(token, task).await;
}

#[tokio::test]
async fn a_receiver_that_always_fails_ends_in_failed_with_status_and_url_after_max_attempts() {
    let receiver = Receiver::start().await;
    receiver.respond_with(|_, _| Reply::status(500).body("database is down"));
    let mut q = Queue::new(&["crm"]).await;
    q.write(&[event(0x100, 0, "Customer", "1")]).await;
    let (token, task) = q.dispatch(listeners(&listener(
        "crm",
        &receiver.url("/always-500"),
        "max_attempts = 3",
    )));
    let row = q
        .first_row(
            Duration::from_secs(15),
            "the row in walhook.failed",
            "SELECT attempts, last_status_code, comment FROM walhook.failed",
        )
        .await;
    let (attempts, code, comment): (i32, i32, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((attempts, code), (3, 500));
    assert!(
        comment.contains("HTTP 500 Internal Server Error"),
        "{comment}"
    );
    assert!(comment.contains(&receiver.url("/always-500")), "{comment}");
    assert!(comment.contains("database is down"), "{comment}");
    assert!(comment.contains("the last of 3 attempts"), "{comment}");
    assert_eq!(receiver.count(), 3);
    assert_eq!(q.count("SELECT count(*) FROM walhook.new").await, 0);
    stop(token, task).await;
}

#[tokio::test]
async fn a_400_fails_at_once_without_a_retry() {
    let receiver = Receiver::start().await;
    receiver.respond_with(|_, _| Reply::status(400).body("unknown entity"));
    let mut q = Queue::new(&["crm"]).await;
    q.write(&[event(0x100, 0, "Customer", "1")]).await;
    let (token, task) = q.dispatch(listeners(&listener("crm", &receiver.url("/"), "")));
    let row = q
        .first_row(
            Duration::from_secs(10),
            "the row in walhook.failed",
            "SELECT attempts, last_status_code FROM walhook.failed",
        )
        .await;
    let (attempts, code): (i32, i32) = (row.get(0), row.get(1));
    assert_eq!((attempts, code), (1, 400));
    assert_eq!(q.count("SELECT count(*) FROM walhook.new").await, 0);
    stop(token, task).await;
    assert_eq!(receiver.count(), 1);
}

#[tokio::test]
async fn a_429_with_retry_after_2_delays_the_next_attempt_by_at_least_2s() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(429).header("Retry-After", "2")]);
    let mut q = Queue::new(&["crm"]).await;
    q.write(&[event(0x100, 0, "Customer", "1")]).await;
    let (token, task) = q.dispatch(listeners(&listener("crm", &receiver.url("/"), "")));
    q.wait_processed(1, Duration::from_secs(10), "the delivery after the 429")
        .await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(4), "retried only after {gap:?}");
    stop(token, task).await;
}

#[tokio::test]
async fn a_receiver_down_for_30_seconds_gets_every_event_once_it_is_back() {
    // Reserve a port, then close it: connections are refused until the receiver returns.
    let port = {
        let r = Receiver::start().await;
        let port = r.addr.port();
        r.stop().await;
        port
    };
    let url = format!("http://127.0.0.1:{port}/hook");
    let mut q = Queue::new(&["crm"]).await;
    let events: Vec<EntityEvent> = (0..30)
        .map(|i| event(0x100 + i, 0, "Customer", &i.to_string()))
        .collect();
    q.write(&events).await;
    let (token, task) = q.dispatch(listeners(&listener("crm", &url, "max_attempts = 100")));

    let outage = Instant::now();
    let comment: String = support::eventually(
        Duration::from_secs(60),
        "thirty seconds of refused attempts",
        || async {
            let row = q
                .client
                .query_one("SELECT min(attempts), max(comment) FROM walhook.new", &[])
                .await
                .unwrap();
            let min_attempts: Option<i32> = row.get(0);
            let comment: Option<String> = row.get(1);
            (outage.elapsed() >= Duration::from_secs(30) && min_attempts >= Some(3))
                .then_some(comment)
                .flatten()
        },
    )
    .await;
    assert!(
        comment.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "{comment}"
    );

    let receiver = Receiver::start_on(port).await;
    q.wait_processed(30, Duration::from_secs(15), "all 30 delivered")
        .await;
    let ids: HashSet<String> = receiver.requests().iter().map(subject).collect();
    assert_eq!(ids.len(), 30);
    assert_eq!(receiver.count(), 30);
    assert_eq!(q.count("SELECT count(*) FROM walhook.new").await, 0);
    stop(token, task).await;
}

#[tokio::test]
async fn changes_to_one_entity_arrive_in_commit_order_while_others_are_not_blocked() {
    let receiver = Receiver::start().await;
    // Customer/1 is refused three times (its first update waits ~0.7s of backoff).
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let refused = refused.clone();
        receiver.respond_with(move |req, _| {
            let subject = req.json()["subject"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if subject == "Customer/1"
                && refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3
            {
                Reply::status(503)
            } else {
                Reply::status(200)
            }
        });
    }
    let mut q = Queue::new(&["crm"]).await;
    let mut events = Vec::new();
    for i in 0..50u64 {
        // Interleave: one update of Customer/1, and early on one change of another entity.
        events.push(event(0x1000 + i * 2, 0, "Customer", "1"));
        if i < 10 {
            events.push(event(0x1000 + i * 2 + 1, 0, "Order", &format!("o{i}")));
        }
    }
    q.write(&events[..30]).await;
    q.write(&events[30..]).await;
    let (token, task) = q.dispatch(listeners(&listener(
        "crm",
        &receiver.url("/"),
        "max_attempts = 10",
    )));
    q.wait_processed(60, Duration::from_secs(30), "all 60 delivered")
        .await;
    let requests = receiver.requests();
    let customer: Vec<u64> = requests
        .iter()
        .filter(|r| subject(r) == "Customer/1")
        .map(|r| r.json()["data"]["row"]["n"].as_u64().unwrap())
        .collect();
    let mut sorted = customer.clone();
    sorted.sort_unstable();
    assert_eq!(customer, sorted, "Customer/1 changes out of commit order");
    assert_eq!(
        customer.len(),
        53,
        "50 updates, the first one tried 4 times"
    );
    let first_customer_success = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| subject(r) == "Customer/1")
        .nth(3)
        .map(|(i, _)| i)
        .unwrap();
    let orders_before = requests[..first_customer_success]
        .iter()
        .filter(|r| subject(r).starts_with("Order/"))
        .count();
    assert_eq!(orders_before, 10, "other entities waited for Customer/1");
    stop(token, task).await;
}

#[tokio::test]
async fn a_rate_limit_of_20_per_second_spreads_200_events_over_at_least_9_seconds() {
    let receiver = Receiver::start().await;
    let mut q = Queue::new(&["crm"]).await;
    let events: Vec<EntityEvent> = (0..200)
        .map(|i| event(0x100 + i, 0, "Customer", &i.to_string()))
        .collect();
    q.write(&events).await;
    let (token, task) = q.dispatch(listeners(&listener(
        "crm",
        &receiver.url("/"),
        "rate_limit = \"20/s\"",
    )));
    support::eventually(Duration::from_secs(30), "200 requests", || async {
        (receiver.count() >= 200).then_some(())
    })
    .await;
    let requests = receiver.requests();
    let span = requests[199].at - requests[0].at;
    // A burst of 20, then one every 50ms: 9s for the other 180.
    assert!(
        span >= Duration::from_millis(8700),
        "200 events in {span:?}"
    );
    assert!(span < Duration::from_secs(15), "200 events took {span:?}");
    // No second in the steady part saw more than the limit (plus timer slack).
    let start = requests[0].at;
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &requests[20..] {
        *per_second.entry((r.at - start).as_secs()).or_default() += 1;
    }
    assert!(per_second.values().all(|&n| n <= 22), "{per_second:?}");
    stop(token, task).await;
}

#[tokio::test]
async fn two_dispatchers_on_one_queue_deliver_each_notification_exactly_once() {
    let receiver = Receiver::start().await;
    let mut q = Queue::new(&["crm", "erp"]).await;
    let config = listeners(&format!(
        "{}{}",
        listener("crm", &receiver.url("/crm"), ""),
        listener("erp", &receiver.url("/erp"), "")
    ));
    let (token_a, task_a) = q.dispatch(config.clone());
    let (token_b, task_b) = q.dispatch(config);
    // Written while both run, in batches, so both race for every batch.
    for batch in 0..20u64 {
        let events: Vec<EntityEvent> = (0..50)
            .map(|i| {
                event(
                    0x10000 + batch * 100 + i,
                    0,
                    "Customer",
                    &format!("{batch}-{i}"),
                )
            })
            .collect();
        q.write(&events).await;
    }
    q.wait_processed(
        2000,
        Duration::from_secs(30),
        "2000 notifications delivered",
    )
    .await;
    let requests = receiver.requests();
    let distinct: HashSet<(String, String)> = requests
        .iter()
        .map(|r| (r.path.clone(), r.json()["id"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(distinct.len(), 2000);
    assert_eq!(
        requests.len(),
        2000,
        "some notification was delivered twice"
    );
    assert_eq!(q.count("SELECT count(*) FROM walhook.new").await, 0);
    stop(token_a, task_a).await;
    stop(token_b, task_b).await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_deliveries_and_releases_every_other_lease() {
    let receiver = Receiver::start().await;
    receiver.respond_with(|_, _| Reply::status(200).after(Duration::from_millis(400)));
    let mut q = Queue::new(&["crm"]).await;
    let events: Vec<EntityEvent> = (0..100)
        .map(|i| event(0x100 + i, 0, "Customer", &i.to_string()))
        .collect();
    q.write(&events).await;
    let (token, task) = q.dispatch(listeners(&listener(
        "crm",
        &receiver.url("/"),
        "timeout = \"5s\"",
    )));
    support::eventually(Duration::from_secs(10), "deliveries in flight", || async {
        (receiver.count() > 0).then_some(())
    })
    .await;
    let stopping = Instant::now();
    stop(token, task).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );

    let received = receiver.count() as i64;
    let processed = q.count("SELECT count(*) FROM walhook.processed").await;
    assert_eq!(
        processed, received,
        "an in-flight delivery was not recorded"
    );
    assert_eq!(
        q.count("SELECT count(*) FROM walhook.new").await + processed,
        100
    );
    assert!(q.count("SELECT count(*) FROM walhook.new").await > 0);
    assert_eq!(
        q.count("SELECT count(*) FROM walhook.new WHERE locked_until IS NOT NULL OR locked_by IS NOT NULL")
            .await,
        0
    );

    // The released rows go to the next dispatcher at once, not after a lease expiry.
    receiver.respond_with(|_, _| Reply::status(200));
    let (token, task) = q.dispatch(listeners(&listener("crm", &receiver.url("/"), "")));
    q.wait_processed(100, Duration::from_secs(5), "the rest delivered")
        .await;
    stop(token, task).await;
}

/// The plan of `EXPLAIN EXECUTE name(args)` for a prepared `sql`.
async fn plan(
    client: &tokio_postgres::Client,
    name: &str,
    types: &str,
    sql: &str,
    args: &str,
) -> String {
    client
        .batch_execute(&format!("PREPARE {name}({types}) AS {sql};"))
        .await
        .unwrap();
    let rows = client
        .simple_query(&format!("EXPLAIN EXECUTE {name}({args})"))
        .await
        .unwrap();
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn claims_from_a_queue_of_100k_rows_use_indexes() {
    let q = Queue::new(&["crm"]).await;
    q.db.execute(
        "INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity, entity_id,
                                    action, \"row\", source_table)
         SELECT gen_random_uuid(), ('0/' || to_hex(1000 + g))::pg_lsn, 0, 1, now(), 'Customer',
                (g % 20000)::text, 'Updated', '{}'::jsonb, 'public.customer'
         FROM generate_series(1, 100000) g;
         INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq)
         SELECT nextval('walhook.notification_id_seq'), id, 'crm', entity, entity_id, commit_lsn, seq
         FROM walhook.event;
         ANALYZE walhook.new; ANALYZE walhook.event;",
    )
    .await;
    let types = "text, bigint, bigint, float8, text, pg_lsn, int";
    let next = plan(
        &q.client,
        "next",
        types,
        queue::CLAIM_NEXT,
        "'crm', 500, 8000000, 60000, 'me', '0/0', -1",
    )
    .await;
    assert!(!next.contains("Seq Scan on new"), "{next}");
    assert!(next.contains("new_listener_commit_order_idx"), "{next}");
    assert!(next.contains("new_listener_entity_order_idx"), "{next}");
    let sweep = plan(
        &q.client,
        "sweep",
        types,
        queue::SWEEP,
        "'crm', 500, 8000000, 60000, 'me', '0/10000', 0",
    )
    .await;
    assert!(!sweep.contains("Seq Scan on new"), "{sweep}");
    assert!(sweep.contains("new_listener_commit_order_idx"), "{sweep}");
    let heads = plan(
        &q.client,
        "heads",
        "text, bigint, bigint, float8, text, text[], text[]",
        queue::CLAIM_HEADS,
        "'crm', 500, 8000000, 60000, 'me', '{Customer,Customer}', '{1,2}'",
    )
    .await;
    assert!(!heads.contains("Seq Scan on new"), "{heads}");
    assert!(heads.contains("new_listener_entity_order_idx"), "{heads}");

    // Quick, and resumable: 500 rows, one per entity in commit order, then the next window
    // starts after the cursor instead of walking past the 500 leased rows.
    let store = queue::NotificationStore::new(q.db.client().await, "me")
        .await
        .unwrap();
    let limits = queue::ClaimLimits {
        rows: 500,
        stored_bytes: 8 << 20,
        received_bytes: 16 << 20,
    };
    let lease = Duration::from_secs(60);
    let started = Instant::now();
    let first = store
        .claim_next("crm", queue::Cursor::START, limits, lease)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(first.rows.len(), 500);
    assert!(first.full);
    let ids = |claim: &queue::Claim| -> Vec<String> {
        claim
            .rows
            .iter()
            .map(|c| match c {
                queue::Claimed::Ready { notification, .. } => notification.event.entity_id.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let entities: HashSet<String> = ids(&first).into_iter().collect();
    assert_eq!(
        entities.len(),
        500,
        "two changes of one entity in one claim"
    );
    let cursor = first.scanned_to.expect("a cursor");
    let second = store
        .claim_next("crm", cursor, limits, lease)
        .await
        .unwrap();
    assert_eq!(ids(&second).first().map(String::as_str), Some("501"));
    assert!(took < Duration::from_millis(500), "claim took {took:?}");
    eprintln!("claim of 500 from 100k rows took {took:?}\n{next}");
}

#[tokio::test]
async fn delivery_goes_on_after_its_database_connections_are_killed() {
    let receiver = Receiver::start().await;
    let mut q = Queue::new(&["crm"]).await;
    q.write(&[event(0x100, 0, "Customer", "1")]).await;
    let (token, task) = q.dispatch(listeners(&listener("crm", &receiver.url("/"), "")));
    q.wait_processed(1, Duration::from_secs(10), "the first delivery")
        .await;
    let killed = q
        .count(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'walhook delivery') t",
        )
        .await;
    assert_eq!(killed, 2, "one claiming and one recording connection");

    q.write(&[event(0x200, 0, "Customer", "2")]).await;
    q.wait_processed(2, Duration::from_secs(10), "delivery after the reconnect")
        .await;
    assert!(!task.is_finished());
    assert_eq!(receiver.count(), 2);
    stop(token, task).await;
}

#[tokio::test]
async fn leases_of_a_process_that_died_are_delivered_once_they_expire_and_live_ones_are_kept() {
    let receiver = Receiver::start().await;
    let mut q = Queue::new(&["crm"]).await;
    q.write(&[event(0x100, 0, "Customer", "1")]).await;
    // A process that died holding a lease: neither its host nor its pid mean anything.
    q.client
        .execute(
            "UPDATE walhook.new SET locked_by = 'f0e1d2c3-dead-4bad-8bad-000000000000',
                                    locked_until = now() + interval '3 seconds'",
            &[],
        )
        .await
        .unwrap();
    q.write(&[event(0x200, 0, "Customer", "2")]).await;
    q.client
        .execute(
            "UPDATE walhook.new SET locked_by = 'elsewhere', locked_until = now() + interval '1 hour'
             WHERE locked_by IS NULL",
            &[],
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (token, task) = q.dispatch(listeners(&listener("crm", &receiver.url("/"), "")));
    q.wait_processed(
        1,
        Duration::from_secs(15),
        "the dead process's notification",
    )
    .await;
    // Not before its lease ended (less a second for the database's clock being ahead).
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "delivered while still leased, after {:?}",
        started.elapsed()
    );
    stop(token, task).await;
    assert_eq!(receiver.count(), 1);
    assert_eq!(subject(&receiver.requests()[0]), "Customer/1");
    assert_eq!(
        q.count("SELECT count(*) FROM walhook.new WHERE locked_by = 'elsewhere'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_slow_listener_behind_short_leases_keeps_them_renewed_and_gets_no_duplicate() {
    // Each answer takes 500 ms and the lease outlasts one attempt by 1 s, so most of the
    // eight notifications each dispatcher claims ahead wait longer than a lease.
    let receiver = Receiver::start().await;
    receiver.respond_with(|_, _| Reply::status(200).after(Duration::from_millis(500)));
    let mut q = Queue::new(&["crm"]).await;
    let events: Vec<EntityEvent> = (0..24)
        .map(|i| event(0x100 + i, 0, "Customer", &i.to_string()))
        .collect();
    q.write(&events).await;
    let config = listeners(&listener(
        "crm",
        &receiver.url("/"),
        "timeout = \"1s\"\nconcurrency = 1",
    ));
    let options = dispatcher::Options {
        lease_extra: Duration::from_secs(1),
        ..dispatcher::Options::default()
    };
    let (token_a, task_a) = q.dispatch_with(config.clone(), options.clone());
    let (token_b, task_b) = q.dispatch_with(config, options);

    // Watch the leases: one held by the same owner whose end moves later was renewed.
    let mut seen: BTreeMap<i64, (String, std::time::SystemTime)> = BTreeMap::new();
    let mut renewed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while q.count("SELECT count(*) FROM walhook.processed").await < 24 {
        assert!(Instant::now() < deadline, "24 deliveries within 30s");
        let rows = q
            .client
            .query(
                "SELECT id, locked_by, locked_until FROM walhook.new WHERE locked_by IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        for row in rows {
            let (id, owner, until): (i64, String, std::time::SystemTime) =
                (row.get(0), row.get(1), row.get(2));
            if let Some((before_owner, before_until)) = seen.get(&id)
                && *before_owner == owner
                && until > *before_until
            {
                renewed += 1;
            }
            seen.insert(id, (owner, until));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(token_a, task_a).await;
    stop(token_b, task_b).await;

    let subjects: Vec<String> = receiver.requests().iter().map(subject).collect();
    let distinct: HashSet<&String> = subjects.iter().collect();
    assert_eq!(distinct.len(), 24);
    assert_eq!(subjects.len(), 24, "some notification was delivered twice");
    assert_eq!(
        q.count("SELECT count(*) FROM walhook.processed WHERE attempts <> 1")
            .await,
        0
    );
    assert!(renewed > 0, "no lease was renewed");
}

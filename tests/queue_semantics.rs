//! Queue boundary: event semantics at fan-out — derived actions reach each listener once,
//! as the action it subscribes to.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use walhook::mapper::EntityEvent;
use walhook::queue::{self, NotificationStore, QueueWriter, Subscription};
use walhook::types::{Action, EntityName};

/// Claims every due notification of `listener` (each must be readable).
async fn claim_all(store: &NotificationStore, listener: &str) -> Vec<queue::Notification> {
    let limits = queue::ClaimLimits {
        rows: 100,
        stored_bytes: 1 << 30,
        received_bytes: 1 << 30,
    };
    let claim = store
        .claim_next(
            listener,
            queue::Cursor::START,
            limits,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    claim
        .rows
        .into_iter()
        .map(|c| match c {
            queue::Claimed::Ready { notification, .. } => *notification,
            other => panic!("not readable: {other:?}"),
        })
        .collect()
}

const SYSTEM_ID: &str = "7301234567890123456";

async fn migrated() -> (support::TestDb, tokio_postgres::Client) {
    let db = support::TestDb::new();
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    (db, client)
}

fn sub(listener: &str, actions: &[Action], derived: &[&str]) -> Subscription {
    Subscription {
        listener: listener.into(),
        entities: Some(vec![EntityName::new("Customer").unwrap()]),
        actions: actions.to_vec(),
        derived_actions: derived.iter().map(|d| (*d).to_owned()).collect(),
        filter: None,
        debounce: None,
        cursor: false,
    }
}

/// The events of one update of customer `id` that a `Cancelled` rule matched: the derived
/// event first, then the row event it accompanies.
fn cancellation(lsn: u64, seq: u32, id: &str) -> Vec<EntityEvent> {
    let plain = support::entity_event(
        lsn,
        seq,
        "Customer",
        id,
        json!({"id": id, "status": "cancelled"}),
        &["status"],
    );
    let derived = EntityEvent {
        derived: Some(Arc::from("Cancelled")),
        ..plain.clone()
    };
    vec![derived, plain]
}

#[tokio::test]
async fn each_listener_gets_one_event_per_change_the_first_it_subscribes_to() {
    let (db, client) = migrated().await;
    let mut w = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    w.set_subscriptions(vec![
        sub("updates", &[Action::Updated], &[]),
        sub("cancellations", &[], &["Cancelled"]),
        sub("both", &Action::ALL, &["Cancelled"]),
        sub("creations", &[Action::Created], &[]),
    ]);
    let mut batch = cancellation(0x100, 0, "1");
    batch.push(support::entity_event(
        0x100,
        1,
        "Customer",
        "2",
        json!({"id": "2", "status": "active"}),
        &["status"],
    ));
    let out = w.write_batch(&batch, None).await.unwrap();
    assert_eq!((out.inserted, out.notifications), (3, 5));

    let rows = client
        .query(
            "SELECT n.listener, n.entity_id, e.action, e.row_action, e.variant, e.event_id
             FROM walhook.new n JOIN walhook.event e ON e.id = n.event_id
             ORDER BY n.listener, n.commit_lsn, n.seq",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let row = |l: &str, id: &str, a: &str, r: Option<&str>| {
        (
            l.to_owned(),
            id.to_owned(),
            a.to_owned(),
            r.map(str::to_owned),
        )
    };
    assert_eq!(
        got,
        vec![
            row("both", "1", "Cancelled", Some("Updated")),
            row("both", "2", "Updated", None),
            row("cancellations", "1", "Cancelled", Some("Updated")),
            row("updates", "1", "Updated", None),
            row("updates", "2", "Updated", None),
        ]
    );
    // The row event keeps the id it always had; the derived one has its own.
    let plain_id = queue::event_id(SYSTEM_ID, batch[1].commit_lsn, 0);
    let derived_id = queue::variant_event_id(SYSTEM_ID, batch[1].commit_lsn, 0, "Cancelled");
    assert_ne!(plain_id, derived_id);
    let ids: Vec<(String, uuid::Uuid)> = rows
        .iter()
        .filter(|r| r.get::<_, String>(1) == "1")
        .map(|r| (r.get(4), r.get(5)))
        .collect();
    assert!(ids.contains(&("Cancelled".into(), derived_id)), "{ids:?}");
    assert!(ids.contains(&(String::new(), plain_id)), "{ids:?}");

    // Re-sent after a restart: nothing is stored or fanned out twice.
    let again = w.write_batch(&batch, None).await.unwrap();
    assert_eq!((again.inserted, again.already_present), (0, 3));
    let n: i64 = client
        .query_one("SELECT count(*) FROM walhook.new", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);

    // Delivery reads the derived action back.
    let store = NotificationStore::new(db.client().await, "me")
        .await
        .unwrap();
    let claimed = claim_all(&store, "cancellations").await;
    let n = &claimed[0];
    assert_eq!(n.event.action, Action::Updated);
    assert_eq!(n.event.action_name(), "Cancelled");
    assert_eq!(n.event.event_id, derived_id);
}

#[tokio::test]
async fn a_listener_filter_keeps_only_matching_rows_and_leaves_other_listeners_alone() {
    use walhook::condition::{Condition, Test};
    let (db, client) = migrated().await;
    let mut w = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    let mut nyt = sub("nyt", &Action::ALL, &["Cancelled"]);
    nyt.filter = Some(Condition::Column {
        column: "title_code".into(),
        test: Test::In(vec![json!("NYT")]),
    });
    w.set_subscriptions(vec![nyt, sub("all", &Action::ALL, &["Cancelled"])]);
    let change = |seq: u32, id: &str, title: &str, action: Action| {
        let mut e = support::entity_event(
            0x200,
            seq,
            "Customer",
            id,
            json!({"id": id, "title_code": title}),
            &[],
        );
        e.action = action;
        e
    };
    let mut batch = vec![
        change(0, "1", "NYT", Action::Created),
        change(1, "2", "WSJ", Action::Created),
        // Moved away from NYT: the new row decides.
        change(2, "1", "WSJ", Action::Updated),
        // A delete carries the old row, which decides.
        change(3, "3", "NYT", Action::Deleted),
    ];
    // A change with a derived action: a filtered-out listener gets none of its events.
    let mut cancelled = cancellation(0x200, 4, "2");
    for e in &mut cancelled {
        e.row.insert("title_code".into(), json!("WSJ"));
    }
    batch.extend(cancelled);
    // One without the column: unknown, so not delivered to the filtered listener.
    batch.push(support::entity_event(
        0x200,
        5,
        "Customer",
        "4",
        json!({"id": "4"}),
        &[],
    ));
    w.write_batch(&batch, None).await.unwrap();

    let got = |listener: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT n.entity_id, e.action FROM walhook.new n
                     JOIN walhook.event e ON e.id = n.event_id
                     WHERE n.listener = $1 ORDER BY n.commit_lsn, n.seq",
                    &[&listener],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| format!("{}:{}", r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(got("nyt").await, ["1:Created", "3:Deleted"]);
    assert_eq!(
        got("all").await,
        [
            "1:Created",
            "2:Created",
            "1:Updated",
            "3:Deleted",
            "2:Cancelled",
            "4:Updated"
        ]
    );
    let excluded: Vec<Option<Vec<String>>> = client
        .query(
            "SELECT excluded_listeners FROM walhook.event WHERE entity_id = '2' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        excluded,
        [
            Some(vec!["nyt".to_owned()]),
            Some(vec!["nyt".to_owned()]),
            Some(vec!["nyt".to_owned(), "all".to_owned()]),
        ]
    );
}

/// A commit time of now, as the stream delivers it (microseconds since 2000-01-01).
fn now() -> walhook::replication::pgoutput::PgTimestamp {
    let since_1970 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    walhook::replication::pgoutput::PgTimestamp(
        i64::try_from(since_1970.as_micros()).unwrap() - 946_684_800_000_000,
    )
}

fn update(lsn: u64, seq: u32, id: &str, changed: &[&str], n: i64) -> EntityEvent {
    let mut e = support::entity_event(lsn, seq, "Customer", id, json!({"id": id, "n": n}), changed);
    e.old = Some(
        json!({"id": id, "n": n - 1})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    e.commit_time = now();
    e
}

#[tokio::test]
async fn a_debounced_listener_gets_one_coalesced_notification_per_window_and_entity() {
    use walhook::config::{Debounce, DebounceFrom};
    let (db, client) = migrated().await;
    // Column order decides the order of the coalesced changedFields.
    client
        .batch_execute("CREATE TABLE customer (id int PRIMARY KEY, city text, name text, n int)")
        .await
        .unwrap();
    let mut w = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    let mut debounced = sub("deb", &Action::ALL, &[]);
    debounced.debounce = Some(Debounce {
        window: Duration::from_secs(600),
        from: DebounceFrom::First,
        max: None,
        drop_created_deleted: true,
    });
    w.set_subscriptions(vec![debounced, sub("plain", &Action::ALL, &[])]);

    let first = vec![
        update(0x100, 0, "1", &["name"], 1),
        update(0x100, 1, "2", &["n"], 1),
    ];
    w.write_batch(&first, None).await.unwrap();
    let second = vec![
        update(0x200, 0, "1", &["city"], 2),
        update(0x200, 1, "1", &["n"], 3),
    ];
    w.write_batch(&second, None).await.unwrap();
    // Re-sent after a restart: not merged twice.
    w.write_batch(&second, None).await.unwrap();

    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM walhook.new WHERE listener = 'plain'").await,
        4
    );
    assert_eq!(
        count("SELECT count(*) FROM walhook.new WHERE listener = 'deb'").await,
        0
    );
    assert_eq!(
        count("SELECT sum(cardinality(event_ids)) FROM walhook.debounce WHERE open").await,
        4
    );

    // Nothing is due yet; once the windows are, one notification each.
    let mut flusher = db.client().await;
    let f = queue::debounce::flush_due(&mut flusher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.notifications, 0);
    assert!(f.next_due.unwrap() > Duration::from_secs(500), "{f:?}");
    client
        .batch_execute("UPDATE walhook.debounce SET due_at = now() - interval '1 second'")
        .await
        .unwrap();
    let f = queue::debounce::flush_due(&mut flusher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((f.notifications, f.next_due), (2, None));
    assert_eq!(count("SELECT count(*) FROM walhook.debounce").await, 0);

    let store = NotificationStore::new(db.client().await, "me")
        .await
        .unwrap();
    let events: Vec<_> = claim_all(&store, "deb")
        .await
        .into_iter()
        .map(|n| n.event)
        .collect();
    assert_eq!(events.len(), 2);
    let one = events.iter().find(|e| e.entity_id == "1").unwrap();
    assert_eq!(one.action, Action::Updated);
    assert_eq!(
        one.changed_fields,
        Some(vec!["city".to_owned(), "name".to_owned(), "n".to_owned()])
    );
    assert_eq!(one.row["n"], 3);
    assert_eq!(one.old.as_ref().unwrap()["n"], 0);
    let ids: Vec<uuid::Uuid> = [(0x100, 0), (0x200, 0), (0x200, 1)]
        .iter()
        .map(|(l, s)| queue::event_id(SYSTEM_ID, walhook::types::Lsn(*l), *s))
        .collect();
    assert_eq!(one.event_id, queue::debounce::coalesced_id(&ids));
    // A window of one change is that change's own event.
    let two = events.iter().find(|e| e.entity_id == "2").unwrap();
    assert_eq!(
        two.event_id,
        queue::event_id(SYSTEM_ID, walhook::types::Lsn(0x100), 1)
    );

    // A change after the flush never merges into the notification: a new window.
    w.write_batch(&[update(0x300, 0, "1", &["name"], 4)], None)
        .await
        .unwrap();
    assert_eq!(
        count("SELECT sum(cardinality(event_ids)) FROM walhook.debounce WHERE open").await,
        1
    );
}

#[tokio::test]
async fn a_schedule_period_is_claimed_once_and_a_new_schedule_starts_at_its_next_period() {
    use std::time::{SystemTime, UNIX_EPOCH};
    use walhook::queue::schedule::{Claim, claim, finish, last_runs};
    let (db, client) = migrated().await;
    let other = db.client().await;
    let p = |s: u64| UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s);
    assert_eq!(
        claim(&client, "digest", p(0)).await.unwrap(),
        Claim::FirstSeen
    );
    assert_eq!(claim(&other, "digest", p(0)).await.unwrap(), Claim::Taken);
    // After downtime the process claims only the current period: once, whoever asks.
    let Claim::Run(id) = claim(&other, "digest", p(7200)).await.unwrap() else {
        panic!("the period should be this process's to run");
    };
    assert_eq!(
        claim(&client, "digest", p(7200)).await.unwrap(),
        Claim::Taken
    );
    finish(&other, id, Some(3), 12, None).await.unwrap();
    let Claim::Run(failed) = claim(&client, "digest", p(10800)).await.unwrap() else {
        panic!("next period");
    };
    finish(&client, failed, None, 5, Some("query failed: boom"))
        .await
        .unwrap();
    let runs = last_runs(&client).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].period, p(10800));
    assert_eq!(runs[0].error.as_deref(), Some("query failed: boom"));
    assert!(
        runs[0]
            .finished_at
            .is_some_and(|t| t <= SystemTime::now() + Duration::from_secs(60))
    );
    assert_eq!(runs[0].last_error, None);
}

//! The durable queue against a real PostgreSQL: migrations, idempotent batch writes,
//! the flushed LSN, fan-out to listeners and the notification view.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use walhook::error::{Classify, ErrorClass};
use walhook::mapper::EntityEvent;
use walhook::queue::{self, QueueError, QueueWriter, WriteOutcome};
use walhook::types::{Action, EntityName, Lsn};

const SYSTEM_ID: &str = "7301234567890123456";

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn event(lsn: u64, seq: u32, entity: &str, id: &str) -> EntityEvent {
    let row = json!({"id": id, "city": "Oslo", "n": 1.5});
    let mut e = support::entity_event(lsn, seq, entity, id, row, &["city"]);
    e.old = Some(object(json!({"id": id, "city": "Bergen"})));
    e
}

async fn migrated() -> (support::TestDb, tokio_postgres::Client) {
    let db = support::TestDb::new();
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    (db, client)
}

async fn writer(db: &support::TestDb) -> QueueWriter {
    QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn flushed(client: &tokio_postgres::Client) -> Option<Lsn> {
    queue::read_state(client)
        .await
        .unwrap()
        .and_then(|s| s.flushed_lsn)
}

#[tokio::test]
async fn migration_creates_every_table_and_view_and_rerunning_is_a_no_op() {
    let (db, mut client) = migrated().await;
    for relation in [
        "walhook.schema_migration",
        "walhook.event",
        "walhook.listener",
        "walhook.new",
        "walhook.processed",
        "walhook.failed",
        "walhook.state",
        "walhook.notification",
        "walhook.notification_id_seq",
        "walhook.rejected",
        "walhook.capture_gap",
        "walhook.backfill",
    ] {
        let sql = format!("SELECT count(*) FROM pg_class WHERE oid = to_regclass('{relation}')");
        assert_eq!(count(&client, &sql).await, 1, "{relation} missing");
    }
    let applied_at = "SELECT applied_at::text FROM walhook.schema_migration WHERE version = 1";
    let first: String = client.query_one(applied_at, &[]).await.unwrap().get(0);

    queue::migrate(&mut client).await.unwrap();
    // Two daemons starting at once serialise on the advisory lock; both succeed.
    let (mut a, mut b) = (db.client().await, db.client().await);
    let (ra, rb) = tokio::join!(queue::migrate(&mut a), queue::migrate(&mut b));
    ra.unwrap();
    rb.unwrap();

    let versions = "SELECT count(*) FROM walhook.schema_migration";
    assert_eq!(
        count(&client, versions).await,
        i64::try_from(queue::MIGRATIONS.len()).unwrap()
    );
    let again: String = client.query_one(applied_at, &[]).await.unwrap().get(0);
    assert_eq!(first, again, "re-running must not re-apply migration 1");
}

#[tokio::test]
async fn the_printed_script_applied_by_hand_counts_as_migrated() {
    let db = support::TestDb::new();
    db.execute(&queue::migration_script()).await;
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    let versions = "SELECT count(*) FROM walhook.schema_migration";
    assert_eq!(
        count(&client, versions).await,
        i64::try_from(queue::MIGRATIONS.len()).unwrap()
    );
    let mut w = writer(&db).await;
    assert_eq!(
        w.write_batch(&[event(0x100, 0, "Customer", "1")], None)
            .await
            .unwrap()
            .inserted,
        1
    );
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_a_config_error() {
    let (_db, mut client) = migrated().await;
    client
        .execute(
            "INSERT INTO walhook.schema_migration (version) VALUES (9999)",
            &[],
        )
        .await
        .unwrap();
    let err = queue::migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(err, QueueError::SchemaTooNew { found: 9999, .. }),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Config);
    assert!(err.to_string().contains("upgrade walhook"), "{err}");
}

#[tokio::test]
async fn writing_the_same_events_twice_inserts_them_once_with_stable_ids() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    let batch = vec![
        event(0x100, 0, "Customer", "1"),
        event(0x100, 1, "Customer", "2"),
        event(0x200, 0, "Order", "9"),
    ];

    let first = w.write_batch(&batch, None).await.unwrap();
    assert_eq!(
        first,
        WriteOutcome {
            inserted: 3,
            already_present: 0,
            notifications: 0,
            refused: 0
        }
    );
    let ids_sql = "SELECT event_id FROM walhook.event ORDER BY commit_lsn, seq";
    let ids: Vec<uuid::Uuid> = client
        .query(ids_sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<uuid::Uuid> = batch
        .iter()
        .map(|e| queue::event_id(SYSTEM_ID, e.commit_lsn, e.seq))
        .collect();
    assert_eq!(ids, expected);

    // A re-send after a restart, overlapping one new change.
    let mut resend = batch.clone();
    resend.push(event(0x300, 0, "Customer", "1"));
    let second = w.write_batch(&resend, None).await.unwrap();
    assert_eq!(
        second,
        WriteOutcome {
            inserted: 1,
            already_present: 3,
            notifications: 0,
            refused: 0
        }
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM walhook.event").await,
        4
    );

    // A new writer (a restarted daemon) computes the same ids.
    let mut w2 = writer(&db).await;
    assert_eq!(w2.write_batch(&batch, None).await.unwrap().inserted, 0);
    let ids_again: Vec<uuid::Uuid> = client
        .query(ids_sql, &[])
        .await
        .unwrap()
        .iter()
        .take(3)
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids_again, expected);
}

#[tokio::test]
async fn every_event_field_is_stored_in_its_column() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    let mut e = event(0x16_B374_D848, 7, "Customer", "[\"a,b\",\"c\"]");
    e.action = Action::Deleted;
    e.subject = None;
    w.write_batch(std::slice::from_ref(&e), None).await.unwrap();

    let row = client
        .query_one(
            "SELECT commit_lsn::text, seq, xid, commit_time = '2024-01-02T03:04:05.123456Z'::timestamptz,
                    entity, entity_id, action, \"row\", old, subject, source_table, queued_at <= now()
             FROM walhook.event",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "16/B374D848");
    assert_eq!(row.get::<_, i32>(1), 7);
    assert_eq!(row.get::<_, i64>(2), 4242);
    assert!(row.get::<_, bool>(3), "commit_time must keep microseconds");
    assert_eq!(row.get::<_, String>(4), "Customer");
    assert_eq!(row.get::<_, String>(5), "[\"a,b\",\"c\"]");
    assert_eq!(row.get::<_, String>(6), "Deleted");
    assert_eq!(row.get::<_, Value>(7), Value::Object(e.row.clone()));
    assert_eq!(
        row.get::<_, Option<Value>>(8),
        e.old.clone().map(Value::Object)
    );
    assert_eq!(row.get::<_, Option<String>>(9), None);
    assert_eq!(row.get::<_, String>(10), "public.customer");
    assert!(row.get::<_, bool>(11));
}

#[tokio::test]
async fn changed_fields_store_null_when_unknown_and_arrays_exactly() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    let odd = vec![
        "first_name".to_owned(),
        "a,b".to_owned(),
        "q\"uo\\te".to_owned(),
        "NULL".to_owned(),
        "{x}".to_owned(),
    ];
    let cases: Vec<Option<Vec<String>>> = vec![None, Some(vec![]), Some(odd)];
    let batch: Vec<EntityEvent> = cases
        .iter()
        .enumerate()
        .map(|(i, cf)| {
            let mut e = event(0x500, i as u32, "Customer", &i.to_string());
            e.changed_fields = cf.clone();
            e
        })
        .collect();
    w.write_batch(&batch, None).await.unwrap();

    let rows = client
        .query("SELECT changed_fields FROM walhook.event ORDER BY seq", &[])
        .await
        .unwrap();
    let stored: Vec<Option<Vec<String>>> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(stored, cases);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM walhook.event WHERE changed_fields IS NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn flushed_lsn_advances_with_the_batch_and_never_goes_backwards() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    assert_eq!(queue::read_state(&client).await.unwrap(), None);

    w.write_batch(&[event(0x100, 0, "Customer", "1")], Some(Lsn(0x180)))
        .await
        .unwrap();
    assert_eq!(flushed(&client).await, Some(Lsn(0x180)));
    w.write_batch(&[], Some(Lsn(0x150))).await.unwrap();
    assert_eq!(
        flushed(&client).await,
        Some(Lsn(0x180)),
        "must not go backwards"
    );
    w.write_batch(&[event(0x200, 0, "Customer", "1")], None)
        .await
        .unwrap();
    assert_eq!(
        flushed(&client).await,
        Some(Lsn(0x180)),
        "None leaves it alone"
    );
    // An idle slot still advances: an empty batch with a newer LSN.
    w.write_batch(&[], Some(Lsn(0x1_0000_0000))).await.unwrap();
    assert_eq!(flushed(&client).await, Some(Lsn(0x1_0000_0000)));
}

#[tokio::test]
async fn events_and_flushed_lsn_commit_or_roll_back_together() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    db.execute(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON walhook.state FOR EACH ROW EXECUTE FUNCTION public.refuse();",
    )
    .await;
    let err = w
        .write_batch(&[event(0x100, 0, "Customer", "1")], Some(Lsn(0x180)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM walhook.event").await,
        0,
        "events must roll back with the LSN"
    );

    db.execute("DROP TRIGGER refuse ON walhook.state").await;
    let out = w
        .write_batch(&[event(0x100, 0, "Customer", "1")], Some(Lsn(0x180)))
        .await
        .unwrap();
    assert_eq!(
        out.inserted, 1,
        "the writer stays usable after a failed batch"
    );
    assert_eq!(flushed(&client).await, Some(Lsn(0x180)));
}

#[tokio::test]
async fn fan_out_creates_one_new_row_per_new_event_and_subscribed_listener() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    let customer = EntityName::new("Customer").unwrap();
    let order = EntityName::new("Order").unwrap();

    // No listeners: events only.
    w.write_batch(&[event(0x10, 0, "Customer", "0")], None)
        .await
        .unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM walhook.new").await, 0);

    w.set_listeners(vec![
        ("all".into(), None),
        ("crm".into(), Some(vec![customer.clone(), customer.clone()])),
        ("billing".into(), Some(vec![order.clone()])),
        ("nobody".into(), Some(vec![])),
    ]);
    let batch = vec![
        event(0x100, 0, "Customer", "1"),
        event(0x100, 1, "Order", "7"),
        event(0x200, 0, "Customer", "2"),
    ];
    let out = w.write_batch(&batch, None).await.unwrap();
    assert_eq!(
        out,
        WriteOutcome {
            inserted: 3,
            already_present: 0,
            notifications: 6,
            refused: 0
        }
    );

    let rows = client
        .query("SELECT listener, entity, entity_id FROM walhook.new ORDER BY listener, commit_lsn, seq", &[])
        .await
        .unwrap();
    let got: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want: Vec<(String, String, String)> = [
        ("all", "Customer", "1"),
        ("all", "Order", "7"),
        ("all", "Customer", "2"),
        ("billing", "Order", "7"),
        ("crm", "Customer", "1"),
        ("crm", "Customer", "2"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want);

    // Re-sent events are not fanned out again.
    let again = w.write_batch(&batch, None).await.unwrap();
    assert_eq!(
        again,
        WriteOutcome {
            inserted: 0,
            already_present: 3,
            notifications: 0,
            refused: 0
        }
    );
    assert_eq!(count(&client, "SELECT count(*) FROM walhook.new").await, 6);

    // The view shows them as New, with the event's uuid and action.
    let view = client
        .query(
            "SELECT n.status, n.event_uuid, n.action, n.attempts, n.id = w.id
             FROM walhook.notification n JOIN walhook.new w USING (id) ORDER BY n.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(view.len(), 6);
    for r in &view {
        assert_eq!(r.get::<_, String>(0), "New");
        assert_eq!(r.get::<_, String>(2), "Updated");
        assert_eq!(r.get::<_, i32>(3), 0);
    }
    let uuids: std::collections::BTreeSet<uuid::Uuid> = view.iter().map(|r| r.get(1)).collect();
    let expected: std::collections::BTreeSet<uuid::Uuid> = batch
        .iter()
        .map(|e| queue::event_id(SYSTEM_ID, e.commit_lsn, e.seq))
        .collect();
    assert_eq!(uuids, expected);
}

#[tokio::test]
async fn notification_ids_survive_a_move_between_status_tables() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    w.set_listeners(vec![("all".into(), None)]);
    w.write_batch(
        &[
            event(0x100, 0, "Customer", "1"),
            event(0x100, 1, "Customer", "2"),
        ],
        None,
    )
    .await
    .unwrap();
    let ids: Vec<i64> = client
        .query("SELECT id FROM walhook.new ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    client
        .batch_execute(&format!(
            "WITH moved AS (DELETE FROM walhook.new WHERE id = {} RETURNING *)
             INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts, created_at, status_code, latency_ms)
             SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts + 1, created_at, 200, 12 FROM moved;
             WITH moved AS (DELETE FROM walhook.new WHERE id = {} RETURNING *)
             INSERT INTO walhook.failed (id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts, created_at, last_status_code, comment)
             SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts + 1, created_at, 410, 'gone' FROM moved;",
            ids[0], ids[1]
        ))
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT id, status, action, last_status_code FROM walhook.notification ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (ids[0], "Processed".into(), "Updated".into(), 200),
            (ids[1], "Failed".into(), "Updated".into(), 410)
        ]
    );

    // A Failed notification pins its event: retention cannot silently drop it.
    let err = client
        .execute("DELETE FROM walhook.event WHERE entity_id = '2'", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    );
    // A Processed one does not.
    assert_eq!(
        client
            .execute("DELETE FROM walhook.event WHERE entity_id = '1'", &[])
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn record_source_fills_the_state_row_and_a_new_slot_forgets_the_flushed_lsn() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    queue::record_source(&client, SYSTEM_ID, "app", "walhook")
        .await
        .unwrap();
    w.write_batch(&[], Some(Lsn(0x500))).await.unwrap();
    let state = queue::read_state(&client).await.unwrap().unwrap();
    assert_eq!(state.system_identifier.as_deref(), Some(SYSTEM_ID));
    assert_eq!(state.database_name.as_deref(), Some("app"));
    assert_eq!(state.slot_name.as_deref(), Some("walhook"));
    assert_eq!(state.flushed_lsn, Some(Lsn(0x500)));

    queue::record_source(&client, SYSTEM_ID, "app", "walhook")
        .await
        .unwrap();
    assert_eq!(
        flushed(&client).await,
        Some(Lsn(0x500)),
        "the same source keeps its position"
    );
    queue::record_source(&client, SYSTEM_ID, "app", "walhook2")
        .await
        .unwrap();
    let state = queue::read_state(&client).await.unwrap().unwrap();
    assert_eq!(state.slot_name.as_deref(), Some("walhook2"));
    assert_eq!(state.flushed_lsn, None);
}

#[tokio::test]
async fn a_role_without_privileges_gets_a_permanent_error_naming_the_grant() {
    let (mut db, _client) = migrated().await;
    db.execute("CREATE ROLE limited LOGIN").await;
    let name = db.name.clone();
    let url = db.cluster().url_as("limited", &name);
    let limited = support::connect(&url).await;
    let err = QueueWriter::new(limited, SYSTEM_ID).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent, "{err:?}");
    let QueueError::PermissionDenied { grant, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        grant.contains("GRANT USAGE ON SCHEMA walhook TO \"limited\""),
        "{grant}"
    );

    // The suggested grant is sufficient.
    db.execute(grant).await;
    let mut w = QueueWriter::new(support::connect(&url).await, SYSTEM_ID)
        .await
        .unwrap();
    w.set_listeners(vec![("all".into(), None)]);
    let out = w
        .write_batch(&[event(0x100, 0, "Customer", "1")], Some(Lsn(0x100)))
        .await
        .unwrap();
    assert_eq!(out.notifications, 1);
}

#[tokio::test]
async fn migrating_without_create_privilege_names_the_grant() {
    let mut db = support::TestDb::new();
    db.execute("CREATE ROLE limited LOGIN").await;
    let name = db.name.clone();
    let mut limited = support::connect(&db.cluster().url_as("limited", &name)).await;
    let err = queue::migrate(&mut limited).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent, "{err:?}");
    let expected = format!("GRANT CREATE ON DATABASE \"{name}\" TO \"limited\"");
    assert!(err.to_string().contains(&expected), "{err}");
}

#[tokio::test]
async fn writing_before_setup_says_to_run_setup() {
    let db = support::TestDb::new();
    let err = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::SchemaMissing { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(err.to_string().contains("walhook setup"), "{err}");
    let client = db.client().await;
    assert!(matches!(
        queue::read_state(&client).await,
        Err(QueueError::SchemaMissing { .. })
    ));
}

#[tokio::test]
async fn connection_loss_is_transient() {
    let (db, _client) = migrated().await;
    let mut w = writer(&db).await;
    let admin = db.client().await;
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()", &[])
        .await
        .unwrap();
    let err = w
        .write_batch(&[event(0x100, 0, "Customer", "1")], None)
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err:?}");
    // The connection task notices the closed socket on its own schedule.
    support::eventually(
        Duration::from_secs(10),
        "the writer to see its connection closed",
        || async { w.is_closed().then_some(()) },
    )
    .await;
}

/// Throughput of durable writes (fsync on). Run with
/// `cargo test --release --test queue -- --ignored --nocapture write_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn write_throughput() {
    let db = support::TestDb::with_options(support::ClusterOptions {
        extra_conf: vec![
            "fsync = on".into(),
            "full_page_writes = on".into(),
            "synchronous_commit = on".into(),
        ],
        ..Default::default()
    });
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    const TOTAL: usize = 100_000;
    let runs = [
        (1000, 0),
        (2000, 0),
        (5000, 0),
        (1000, 1),
        (2000, 1),
        (5000, 1),
        (2000, 3),
    ];
    for (batch_size, listeners) in runs {
        client
            .batch_execute("TRUNCATE walhook.new, walhook.failed, walhook.event")
            .await
            .unwrap();
        let mut w = writer(&db).await;
        w.set_listeners(
            (0..listeners)
                .map(|i| (format!("listener{i}"), None))
                .collect(),
        );
        let events: Vec<EntityEvent> = (0..TOTAL)
            .map(|i| {
                let mut e = event(
                    0x1000 + (i / 4) as u64 * 0x100,
                    (i % 4) as u32,
                    "Customer",
                    &i.to_string(),
                );
                e.row = object(json!({
                    "id": i, "first_name": "Ada", "last_name": "Lovelace",
                    "city": "London", "email": format!("ada{i}@example.com"), "balance": "1234.50"
                }));
                e.old = None;
                e.changed_fields = None;
                e.action = Action::Created;
                e
            })
            .collect();
        let start = Instant::now();
        let mut inserted = 0;
        for chunk in events.chunks(batch_size) {
            let last = chunk.last().map(|e| e.commit_lsn);
            inserted += w.write_batch(chunk, last).await.unwrap().inserted;
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(inserted, TOTAL as u64);
        println!(
            "queue write: {TOTAL} events, batches of {batch_size}, {listeners} listener(s): {secs:.2}s = {:.0} events/s",
            TOTAL as f64 / secs
        );
    }
}

#[tokio::test]
async fn discarding_pending_moves_every_new_notification_to_failed_with_the_comment() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    w.set_listeners(vec![("all".into(), None)]);
    w.write_batch(
        &[
            event(0x100, 0, "Customer", "1"),
            event(0x100, 1, "Customer", "2"),
        ],
        None,
    )
    .await
    .unwrap();
    let moved = queue::discard_pending(&client, "discarded in a test")
        .await
        .unwrap();
    assert_eq!(moved, 2);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM walhook.new), count(*), min(comment), max(attempts)
             FROM walhook.failed",
            &[],
        )
        .await
        .unwrap();
    let (new, failed, comment, attempts): (i64, i64, String, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((new, failed), (0, 2));
    assert_eq!(comment, "discarded in a test");
    assert_eq!(attempts, 0, "no attempt was made");
}

/// An event whose row holds a string jsonb refuses (`\u0000`).
fn poison(lsn: u64, seq: u32, id: &str) -> EntityEvent {
    let mut e = event(lsn, seq, "Customer", id);
    e.row.insert("bad".into(), json!("nul \u{0} inside"));
    e
}

#[tokio::test]
async fn a_refused_event_is_set_aside_and_the_rest_of_its_batch_is_stored_in_order() {
    let (db, client) = migrated().await;
    let mut w = writer(&db).await;
    w.set_listeners(vec![("crm".into(), None)]);
    // The direct path (fresh table) and the staged path (a re-send) both isolate it.
    for first in [true, false] {
        let base = if first { 0x100 } else { 0x50 };
        let batch = vec![
            event(base, 0, "Customer", "1"),
            poison(base, 1, "2"),
            event(base, 2, "Customer", "3"),
        ];
        let out = w.write_batch(&batch, Some(Lsn(base + 0x10))).await.unwrap();
        assert_eq!((out.inserted, out.refused, out.notifications), (2, 1, 2));
        let refused = w.take_refused();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].entity_id.as_deref(), Some("2"));
        assert_eq!(refused[0].sqlstate.as_deref(), Some("22P05"));
    }
    let ids: Vec<String> = client
        .query("SELECT entity_id FROM walhook.event ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["1", "3", "1", "3"]);
    let rows = client
        .query(
            "SELECT entity_id, seq, reason, row FROM walhook.rejected ORDER BY commit_lsn",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let (id, seq, reason, row): (Option<String>, i32, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        assert_eq!((id.as_deref(), seq), (Some("2"), 1));
        assert!(reason.contains("refused"), "{reason}");
        assert!(row.contains(r"\u0000"), "{row}");
    }
    assert_eq!(flushed(&client).await, Some(Lsn(0x110)));
    // A re-send stores nothing twice.
    let again = w.write_batch(&[poison(0x100, 1, "2")], None).await.unwrap();
    assert_eq!((again.inserted, again.refused), (0, 1));
    assert_eq!(
        count(&client, "SELECT count(*) FROM walhook.rejected").await,
        2
    );
}

/// A cursor listener reads `walhook.event` by id while another writer of events (a
/// schedule, say) has a transaction open. Ids must commit in order (the writers'
/// event-order lock): otherwise the reader would see the batch written meanwhile, move
/// past it, and never deliver the event the open transaction commits below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_never_moves_past_an_event_still_being_committed_below_it() {
    let (db, client) = migrated().await;
    let (store, mut writer) = cursor_store(&db).await;
    let position = store.position().await.unwrap();

    // Another writer, following the protocol: the lock, then its event, not committed yet.
    let mut other = db.client().await;
    let open = other.transaction().await.unwrap();
    open.batch_execute(queue::statements::EVENT_ORDER_LOCK)
        .await
        .unwrap();
    open.execute(
        "INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity,
             entity_id, action, \"row\", source_table)
         VALUES (gen_random_uuid(), '0/1', 0, 1, now(), 'Customer', 'scheduled', 'Created',
                 '{}', 'public.customer')",
        &[],
    )
    .await
    .unwrap();

    let batch: Vec<EntityEvent> = (0..5)
        .map(|i| event(0x100, i, "Customer", &i.to_string()))
        .collect();
    let writing = tokio::spawn(async move { writer.write_batch(&batch, None).await.unwrap() });
    // The capture writer either waits for the lock or (without it) has committed.
    support::eventually(Duration::from_secs(10), "the writer waits or is done", || async {
        let waiting: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (waiting || writing.is_finished()).then_some(())
    })
    .await;
    let early = store.read(position, 100, 1 << 20).await.unwrap();
    let mut position = early.scanned_to;
    let mut seen: Vec<i64> = early.events.iter().map(|(id, _)| *id).collect();
    store.advance(position, &[]).await.unwrap();

    open.commit().await.unwrap();
    writing.await.unwrap();
    let late = store.read(position, 100, 1 << 20).await.unwrap();
    seen.extend(late.events.iter().map(|(id, _)| *id));
    position = late.scanned_to;
    let stored: Vec<i64> = client
        .query("SELECT id FROM walhook.event ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored.len(), 6);
    assert_eq!(
        seen, stored,
        "the cursor moved past an event committed below it"
    );
    assert_eq!(position, *stored.last().unwrap());
}
/// The cursor of listener `bus` (position "cursor", entity Customer), owned, and a capture
/// writer that made its row.
async fn cursor_store(db: &support::TestDb) -> (queue::CursorStore, queue::QueueWriter) {
    let text = format!(
        "{}{}\n[listener.nats]\nposition = \"cursor\"\n",
        support::config_toml(&db.url, support::CUSTOMER_ENTITY),
        support::listener_toml("bus", "nats://127.0.0.1:4222")
    );
    let config = walhook::config::Config::parse(&text, std::path::Path::new("walhook.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let listener = config.listeners[0].clone();
    assert!(listener.keeps_cursor());
    let store = queue::CursorStore::connect(&config.source.connect_params().unwrap(), &listener)
        .await
        .unwrap();
    // No cursor row yet: nothing to own until the writer makes it.
    assert!(!store.try_own().await.unwrap());
    let mut writer = writer(db).await;
    writer.set_subscriptions(queue::subscriptions(&config.listeners));
    writer.sync_cursors().await.unwrap();
    assert!(store.try_own().await.unwrap());
    (store, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_read_cut_by_its_limit_says_that_more_events_follow() {
    let (db, _client) = migrated().await;
    let (store, mut writer) = cursor_store(&db).await;
    let position = store.position().await.unwrap();
    let batch: Vec<EntityEvent> = (0..5)
        .map(|i| event(0x100, i, "Customer", &i.to_string()))
        .collect();
    writer.write_batch(&batch, None).await.unwrap();
    let cut = store.read(position, 2, 1 << 20).await.unwrap();
    assert_eq!(cut.events.len(), 2);
    assert!(cut.more, "two of five events read");
    let rest = store.read(cut.scanned_to, 100, 1 << 20).await.unwrap();
    assert_eq!(rest.events.len(), 3);
    assert!(!rest.more, "the rest read");
    let none = store.read(rest.scanned_to, 100, 1 << 20).await.unwrap();
    assert!(none.events.is_empty() && !none.more);
}

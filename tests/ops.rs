//! Operator tools against a real PostgreSQL: `walhook status`, `walhook failed`,
//! `walhook retry`, `walhook discard`, search and retention.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use walhook::mapper::EntityEvent;
use walhook::queue::admin::{self, FailedFilter, NotificationStatus, RetrySelection, Since};
use walhook::queue::status;
use walhook::queue::{self, QueueWriter};
use walhook::types::EntityName;

const SYSTEM_ID: &str = "7301234567890123456";

fn event(lsn: u64, seq: u32, entity: &str, id: &str) -> EntityEvent {
    support::entity_event(
        lsn,
        seq,
        entity,
        id,
        json!({"id": id, "city": "Oslo"}),
        &["city"],
    )
}

/// A migrated database whose queue holds events fanned out to `crm` (Customer only) and
/// `erp` (everything): Customer 1..=3 and Invoice 10, one transaction each.
async fn seeded() -> (support::TestDb, tokio_postgres::Client) {
    let db = support::TestDb::new();
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    let mut w = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    w.set_listeners(vec![
        (
            "crm".into(),
            Some(vec![EntityName::new("Customer").unwrap()]),
        ),
        ("erp".into(), None),
    ]);
    w.write_batch(
        &[
            event(0x100, 0, "Customer", "1"),
            event(0x200, 0, "Customer", "2"),
            event(0x300, 0, "Customer", "3"),
            event(0x400, 0, "Invoice", "10"),
        ],
        None,
    )
    .await
    .unwrap();
    (db, client)
}

/// The id of the New notification of `listener` for `entity_id`.
async fn id_of(client: &tokio_postgres::Client, listener: &str, entity_id: &str) -> i64 {
    client
        .query_one(
            "SELECT id FROM walhook.new WHERE listener = $1 AND entity_id = $2",
            &[&listener, &entity_id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Moves New notification `id` to walhook.failed as the dispatcher would, `ago` before now.
async fn fail(client: &tokio_postgres::Client, id: i64, comment: &str, code: i32, ago: &str) {
    client
        .execute(
            "WITH moved AS (DELETE FROM walhook.new WHERE id = $1 RETURNING *)
             INSERT INTO walhook.failed (id, event_id, listener, entity, entity_id, commit_lsn, seq,
                                         attempts, created_at, failed_at, last_status_code, comment)
             SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, 5, created_at,
                    now() - $4::text::interval, $3, $2
             FROM moved",
            &[&id, &comment, &code, &ago],
        )
        .await
        .unwrap();
}

/// Moves New notification `id` to walhook.processed, delivered `ago` before now.
async fn deliver(client: &tokio_postgres::Client, id: i64, ago: &str) {
    client
        .execute(
            "WITH moved AS (DELETE FROM walhook.new WHERE id = $1 RETURNING *)
             INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn,
                                            seq, attempts, created_at, delivered_at, status_code)
             SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, 1, created_at,
                    now() - $2::text::interval, 200
             FROM moved",
            &[&id, &ago],
        )
        .await
        .unwrap();
}

async fn status_of(client: &tokio_postgres::Client, id: i64) -> Option<String> {
    client
        .query_opt(
            "SELECT status FROM walhook.notification WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

fn config_with_listeners(url: &str) -> String {
    support::config_toml(
        url,
        r#"
[[entity]]
name = "Customer"
table = "customer"

[[entity]]
name = "Invoice"
table = "invoice"

[[listener]]
name = "crm"
url = "http://127.0.0.1:9/crm"
entities = ["Customer"]

[[listener]]
name = "erp"
url = "http://127.0.0.1:9/erp"

[[listener]]
name = "idle"
url = "http://127.0.0.1:9/idle"
"#,
    )
}

/// Sets up: crm — Customer 1 Processed, Customer 2 Failed an hour ago (HTTP 500), Customer 3
/// New waiting for a retry after an HTTP 503 just now; erp — four New rows, all due.
async fn with_history(client: &tokio_postgres::Client) -> (i64, i64, i64) {
    let c1 = id_of(client, "crm", "1").await;
    let c2 = id_of(client, "crm", "2").await;
    let c3 = id_of(client, "crm", "3").await;
    deliver(client, c1, "1 minute").await;
    fail(
        client,
        c2,
        "HTTP 500 Internal Server Error from http://127.0.0.1:9/crm: boom",
        500,
        "1 hour",
    )
    .await;
    client
        .execute(
            "UPDATE walhook.new SET attempts = 2, last_attempt_at = now(), last_status_code = 503,
                 comment = 'HTTP 503 Service Unavailable from http://127.0.0.1:9/crm: busy',
                 next_attempt_at = now() + interval '1 hour'
             WHERE id = $1",
            &[&c3],
        )
        .await
        .unwrap();
    (c1, c2, c3)
}

#[tokio::test]
async fn status_counts_each_listener_and_shows_its_latest_error() {
    let (_db, client) = seeded().await;
    let (_, c2, c3) = with_history(&client).await;
    // History of a listener no longer in the configuration.
    client
        .batch_execute(
            "INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn, seq)
             SELECT nextval('walhook.notification_id_seq'), id, 'retired', entity, entity_id, commit_lsn, seq
             FROM walhook.event",
        )
        .await
        .unwrap();

    let configured = vec!["erp".to_owned(), "crm".to_owned(), "idle".to_owned()];
    let s = status::status(&client, &configured, "walhook")
        .await
        .unwrap();
    let names: Vec<(&str, bool)> = s
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.configured))
        .collect();
    assert_eq!(
        names,
        vec![
            ("erp", true),
            ("crm", true),
            ("idle", true),
            ("retired", false)
        ]
    );
    let [erp, crm, idle, retired] = &s.listeners[..] else {
        panic!("four listeners expected: {:?}", s.listeners)
    };
    assert_eq!(
        (crm.new, crm.due, crm.waiting, crm.processed, crm.failed),
        (1, 0, 1, 1, 1)
    );
    assert_eq!(
        (erp.new, erp.due, erp.waiting, erp.processed, erp.failed),
        (4, 4, 0, 0, 0)
    );
    assert_eq!((idle.new, idle.processed, idle.failed), (0, 0, 0));
    assert_eq!(retired.processed, 4);

    // The retry just now is more recent than the failure an hour ago.
    let e = crm.last_error.as_ref().expect("crm has errors");
    assert_eq!(e.of, status::ErrorOf::Notification(c3));
    assert_eq!(e.status, NotificationStatus::New);
    assert_eq!(e.status_code, Some(503));
    assert!(e.comment.starts_with("HTTP 503"), "{}", e.comment);
    assert!(erp.last_error.is_none());
    assert!(crm.oldest_undelivered_age(s.now).is_some());
    assert!(idle.oldest_undelivered.is_none());

    // Once the New row is delivered, the Failed one is the latest error.
    deliver(&client, c3, "0 seconds").await;
    let s = status::status(&client, &configured, "walhook")
        .await
        .unwrap();
    let crm = s.listeners.iter().find(|l| l.name == "crm").unwrap();
    let e = crm.last_error.as_ref().unwrap();
    assert_eq!(
        (e.of, e.status, e.status_code),
        (
            status::ErrorOf::Notification(c2),
            NotificationStatus::Failed,
            Some(500)
        )
    );
    assert!(crm.oldest_undelivered.is_none());

    assert_eq!(s.events.total, 4);
    assert!(s.events.latest_commit_time.is_some());
    assert!(s.slot.found.is_none(), "no slot was created");
    assert!(s.state.is_none());
}

#[tokio::test]
async fn status_command_prints_listeners_slot_and_state_as_table_and_json() {
    let (db, client) = seeded().await;
    with_history(&client).await;
    client
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('walhook', 'pgoutput');
             INSERT INTO walhook.state (id, system_identifier, flushed_lsn) VALUES (1, '7301234567890123456', '0/400');",
        )
        .await
        .unwrap();
    let (_dir, path) = support::write_config(&config_with_listeners(&db.url));
    let path = path.to_str().unwrap();

    let (code, out, err) = support::walhook(&["status", "--config", path]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}:\n{out}"))
            .to_owned()
    };
    let header = line("LISTENER");
    for col in [
        "NEW",
        "DUE",
        "RETRYING",
        "PROCESSED",
        "FAILED",
        "OLDEST UNDELIVERED",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let crm: Vec<String> = line("crm").split_whitespace().map(str::to_owned).collect();
    assert_eq!(&crm[1..6], ["1", "0", "1", "1", "1"], "{out}");
    assert!(
        line("crm").contains("HTTP 503 Service Unavailable"),
        "{out}"
    );
    let erp: Vec<String> = line("erp").split_whitespace().map(str::to_owned).collect();
    assert_eq!(&erp[1..6], ["4", "4", "0", "0", "0"], "{out}");
    assert!(line("idle").contains(" 0 "), "{out}");
    assert!(out.contains("slot \"walhook\": not active"), "{out}");
    assert!(out.contains("lag "), "{out}");
    assert!(out.contains("events: 4 queued"), "{out}");
    assert!(
        out.contains("system identifier 7301234567890123456, flushed LSN 0/400"),
        "{out}"
    );

    let (code, out, err) = support::walhook(&["status", "--config", path, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    let crm = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "crm")
        .unwrap();
    assert_eq!(crm["failed"], 1);
    assert_eq!(crm["waiting"], 1);
    assert_eq!(crm["last_error"]["status_code"], 503);
    assert_eq!(v["slot"]["exists"], true);
    assert_eq!(v["slot"]["active"], false);
    assert!(v["slot"]["lag_bytes"].as_i64().unwrap() >= 0, "{out}");
    assert_eq!(v["events"]["total"], 4);
    assert_eq!(v["state"]["flushed_lsn"], "0/400");
}

#[tokio::test]
async fn failed_lists_newest_first_filtered_by_listener_and_since() {
    let (_db, client) = seeded().await;
    let crm2 = id_of(&client, "crm", "2").await;
    let crm3 = id_of(&client, "crm", "3").await;
    let erp10 = id_of(&client, "erp", "10").await;
    let erp1 = id_of(&client, "erp", "1").await;
    fail(
        &client,
        crm2,
        "HTTP 410 Gone from http://x/crm",
        410,
        "3 days",
    )
    .await;
    fail(&client, crm3, "no answer within 10s", 0, "2 hours").await;
    fail(
        &client,
        erp10,
        "HTTP 400 Bad Request from http://x/erp",
        400,
        "10 minutes",
    )
    .await;
    fail(
        &client,
        erp1,
        "connection refused by 127.0.0.1:9",
        0,
        "1 minute",
    )
    .await;

    let ids = |p: &admin::FailedPage| p.rows.iter().map(|r| r.id).collect::<Vec<_>>();
    let all = admin::list_failed(&client, &FailedFilter::default())
        .await
        .unwrap();
    assert_eq!(ids(&all), vec![erp1, erp10, crm3, crm2]);
    assert_eq!((all.total, all.more()), (4, 0));
    let first = &all.rows[1];
    assert_eq!(
        (
            first.listener.as_str(),
            first.entity.as_str(),
            first.entity_id.as_str()
        ),
        ("erp", "Invoice", "10")
    );
    assert_eq!(first.action.as_deref(), Some("Updated"));
    assert_eq!(first.attempts, 5);
    assert_eq!(first.last_status_code, Some(400));
    assert_eq!(
        first.comment.as_deref(),
        Some("HTTP 400 Bad Request from http://x/erp")
    );
    assert!(first.event_uuid.is_some());

    let crm = admin::list_failed(
        &client,
        &FailedFilter {
            listener: Some("crm".into()),
            ..FailedFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&crm), vec![crm3, crm2]);

    let recent = admin::list_failed(
        &client,
        &FailedFilter {
            since: Some(Since::Ago(Duration::from_secs(3 * 3600))),
            ..FailedFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&recent), vec![erp1, erp10, crm3]);

    let cutoff: std::time::SystemTime = client
        .query_one("SELECT now() - interval '30 minutes'", &[])
        .await
        .unwrap()
        .get(0);
    let since_time = admin::list_failed(
        &client,
        &FailedFilter {
            since: Some(Since::At(cutoff)),
            ..FailedFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&since_time), vec![erp1, erp10]);

    let limited = admin::list_failed(
        &client,
        &FailedFilter {
            limit: 1,
            ..FailedFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&limited), vec![erp1]);
    assert_eq!((limited.total, limited.more()), (4, 3));
}

#[tokio::test]
async fn failed_command_prints_a_table_and_how_many_more_exist() {
    let (db, client) = seeded().await;
    let crm2 = id_of(&client, "crm", "2").await;
    let crm3 = id_of(&client, "crm", "3").await;
    fail(
        &client,
        crm2,
        "HTTP 500 Internal Server Error\nfrom http://x",
        500,
        "2 hours",
    )
    .await;
    fail(&client, crm3, "no answer within 10s", 0, "1 minute").await;
    let (_dir, path) = support::write_config(&config_with_listeners(&db.url));
    let path = path.to_str().unwrap();

    let (code, out, err) = support::walhook(&[
        "failed",
        "--config",
        path,
        "--listener",
        "crm",
        "--limit",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID"), "{out}");
    assert!(lines[0].contains("COMMENT"), "{out}");
    assert!(lines[1].contains("no answer within 10s"), "{out}");
    assert!(lines[1].contains(&crm3.to_string()), "{out}");
    assert!(lines[2].contains("1 more"), "{out}");

    let (code, out, err) = support::walhook(&["failed", "--config", path, "--since", "1h"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("no answer within 10s") && !out.contains("HTTP 500"),
        "{out}"
    );

    let (code, _, err) = support::walhook(&["failed", "--config", path, "--since", "soon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid --since"), "{err}");
}

#[tokio::test]
async fn retry_by_id_requeues_with_attempts_reset_and_reports_ids_that_are_not_failed() {
    let (db, client) = seeded().await;
    let failed_a = id_of(&client, "crm", "1").await;
    let failed_b = id_of(&client, "crm", "2").await;
    let processed = id_of(&client, "crm", "3").await;
    let new = id_of(&client, "erp", "10").await;
    fail(
        &client,
        failed_a,
        "HTTP 500 Internal Server Error from http://x/crm",
        500,
        "5 minutes",
    )
    .await;
    fail(
        &client,
        failed_b,
        "HTTP 410 Gone from http://x/crm",
        410,
        "5 minutes",
    )
    .await;
    deliver(&client, processed, "1 minute").await;
    let (_dir, path) = support::write_config(&config_with_listeners(&db.url));
    let path = path.to_str().unwrap();

    let (a, p, n) = (failed_a.to_string(), processed.to_string(), new.to_string());
    let (code, out, err) = support::walhook(&[
        "retry", "--config", path, "--id", &a, "--id", &p, "--id", &n, "--id", "987654",
    ]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("requeued 1 Failed notification to walhook.new"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "notification {processed} is not Failed: it is Processed"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("notification {new} is not Failed: it is New")),
        "{out}"
    );
    assert!(out.contains("notification 987654 does not exist"), "{out}");

    let row = client
        .query_one(
            "SELECT attempts, next_attempt_at <= now(), comment, last_status_code FROM walhook.new WHERE id = $1",
            &[&failed_a],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
    assert!(row.get::<_, bool>(1), "requeued notification is due now");
    let comment: String = row.get(2);
    assert!(
        comment.starts_with("requeued by walhook retry at "),
        "{comment}"
    );
    assert!(
        comment.ends_with(" after: HTTP 500 Internal Server Error from http://x/crm"),
        "{comment}"
    );
    assert_eq!(row.get::<_, Option<i32>>(3), Some(500));
    assert_eq!(
        status_of(&client, failed_b).await.as_deref(),
        Some("Failed")
    );
    assert_eq!(
        status_of(&client, processed).await.as_deref(),
        Some("Processed")
    );

    // Only the ones asked for, all present: exit 0.
    let b = failed_b.to_string();
    let (code, out, err) = support::walhook(&["retry", "--config", path, "--id", &b]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(status_of(&client, failed_b).await.as_deref(), Some("New"));

    // Neither --id nor --all: refused before touching anything.
    let (code, _, err) = support::walhook(&["retry", "--config", path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--id") && err.contains("--all"), "{err}");
    let (code, _, err) = support::walhook(&["retry", "--config", path, "--all", "--id", "1"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn retry_all_requeues_every_failed_notification_of_the_listener_only() {
    let (db, client) = seeded().await;
    let crm1 = id_of(&client, "crm", "1").await;
    let crm2 = id_of(&client, "crm", "2").await;
    let erp1 = id_of(&client, "erp", "1").await;
    for id in [crm1, crm2, erp1] {
        fail(
            &client,
            id,
            "HTTP 503 Service Unavailable from http://x",
            503,
            "1 minute",
        )
        .await;
    }

    let out = admin::retry_failed(&client, Some("crm"), &RetrySelection::All)
        .await
        .unwrap();
    let mut expected = vec![crm1, crm2];
    expected.sort_unstable();
    assert_eq!(out.requeued, expected);
    assert!(out.not_requeued.is_empty());
    assert_eq!(status_of(&client, crm1).await.as_deref(), Some("New"));
    assert_eq!(status_of(&client, crm2).await.as_deref(), Some("New"));
    assert_eq!(status_of(&client, erp1).await.as_deref(), Some("Failed"));

    // An id of another listener is named, not moved.
    let out = admin::retry_failed(&client, Some("crm"), &RetrySelection::Ids(vec![erp1]))
        .await
        .unwrap();
    assert!(out.requeued.is_empty());
    assert_eq!(out.not_requeued.len(), 1);
    assert_eq!(
        out.not_requeued[0].found,
        Some((NotificationStatus::Failed, "erp".to_owned()))
    );
    assert_eq!(status_of(&client, erp1).await.as_deref(), Some("Failed"));

    // The binary with --all and no listener takes the rest.
    let (_dir, path) = support::write_config(&config_with_listeners(&db.url));
    let (code, out, err) =
        support::walhook(&["retry", "--config", path.to_str().unwrap(), "--all"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued 1 Failed notification"), "{out}");
    assert_eq!(status_of(&client, erp1).await.as_deref(), Some("New"));
    let (code, out, _) = support::walhook(&["retry", "--config", path.to_str().unwrap(), "--all"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to requeue"), "{out}");
}

#[tokio::test]
async fn prune_deletes_old_processed_and_unpinned_events_in_batches_and_keeps_the_rest() {
    let (db, client) = seeded().await;
    // More rows than one batch, to prove the loop continues until nothing is left.
    let mut w = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    w.set_listeners(vec![("bulk".into(), None)]);
    let bulk: Vec<EntityEvent> = (0..7)
        .map(|i| event(0x1000 + i, 0, "Order", &i.to_string()))
        .collect();
    w.write_batch(&bulk, None).await.unwrap();
    let bulk_ids: Vec<i64> = client
        .query("SELECT id FROM walhook.new WHERE listener = 'bulk'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in bulk_ids {
        deliver(&client, id, "30 days").await;
    }

    // Customer 1: every notification delivered long ago → event and notifications go.
    // Customer 2: crm delivered long ago, erp still New → event stays.
    // Customer 3: crm Failed → event stays (also for the foreign key).
    // Invoice 10: delivered recently → event and notification stay.
    for l in ["crm", "erp"] {
        let id = id_of(&client, l, "1").await;
        deliver(&client, id, "30 days").await;
    }
    let crm2 = id_of(&client, "crm", "2").await;
    deliver(&client, crm2, "30 days").await;
    let crm3 = id_of(&client, "crm", "3").await;
    fail(&client, crm3, "HTTP 500 from http://x", 500, "30 days").await;
    let erp3 = id_of(&client, "erp", "3").await;
    deliver(&client, erp3, "30 days").await;
    let erp10 = id_of(&client, "erp", "10").await;
    deliver(&client, erp10, "1 minute").await;
    client
        .batch_execute(
            "UPDATE walhook.event SET queued_at = now() - interval '30 days'
             WHERE entity <> 'Invoice'",
        )
        .await
        .unwrap();

    let out = queue::prune(&client, Duration::from_secs(7 * 86_400), 3)
        .await
        .unwrap();
    // 7 bulk + crm/erp of Customer 1 + crm of Customer 2 + erp of Customer 3.
    assert_eq!(out.processed, 11);
    // 7 bulk + Customer 1.
    assert_eq!(out.events, 8);

    let left: Vec<(String, String)> = client
        .query(
            "SELECT entity, entity_id FROM walhook.event ORDER BY entity, entity_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = |e: &str, i: &str| (e.to_owned(), i.to_owned());
    assert_eq!(
        left,
        vec![
            want("Customer", "2"),
            want("Customer", "3"),
            want("Invoice", "10")
        ]
    );
    let processed: Vec<i64> = client
        .query("SELECT id FROM walhook.processed", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(processed, vec![erp10]);
    assert_eq!(status_of(&client, crm3).await.as_deref(), Some("Failed"));
    assert_eq!(
        status_of(&client, id_of(&client, "erp", "2").await)
            .await
            .as_deref(),
        Some("New")
    );

    // Nothing old is left: a second run deletes nothing.
    let again = queue::prune(&client, Duration::from_secs(7 * 86_400), 3)
        .await
        .unwrap();
    assert_eq!(again, queue::PruneOutcome::default());
}

#[tokio::test]
async fn discard_keeps_the_reason_names_what_it_left_and_retention_prunes_it() {
    use admin::DiscardReason;
    let (db, client) = seeded().await;
    let (c1, c2, _) = with_history(&client).await;
    let e10 = id_of(&client, "erp", "10").await;
    fail(
        &client,
        e10,
        "HTTP 410 Gone from http://x/erp",
        410,
        "5 minutes",
    )
    .await;

    assert!(DiscardReason::new(" \n\t").is_none());
    let reason = DiscardReason::new("  customer\n2 was merged  ").unwrap();
    assert_eq!(reason.as_str(), "customer 2 was merged");
    let out = admin::discard_failed(
        &client,
        Some("crm"),
        &RetrySelection::Ids(vec![e10, c2, c1, 999_999, c2]),
        &reason,
    )
    .await
    .unwrap();
    assert_eq!(out.discarded, vec![c2]);
    let why: Vec<String> = out.not_discarded.iter().map(|n| n.to_string()).collect();
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(why[0].contains("is Processed"), "{why:?}");
    assert!(
        why[1].contains("is Failed for listener \"erp\"") && why[1].ends_with("not discarded"),
        "{why:?}"
    );
    assert!(why[2].contains("does not exist"), "{why:?}");

    let row = client
        .query_one(
            "SELECT reason, comment, attempts, last_status_code, failed_at < discarded_at
             FROM walhook.discarded WHERE id = $1",
            &[&c2],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "customer 2 was merged");
    assert_eq!(
        row.get::<_, String>(1),
        "HTTP 500 Internal Server Error from http://127.0.0.1:9/crm: boom"
    );
    assert_eq!(row.get::<_, i32>(2), 5);
    assert_eq!(row.get::<_, Option<i32>>(3), Some(500));
    assert!(row.get::<_, bool>(4));
    assert_eq!(status_of(&client, c2).await.as_deref(), Some("Discarded"));

    // Discarded is final: retry does not bring it back, and says where it is.
    let out = admin::retry_failed(&client, None, &RetrySelection::Ids(vec![c2]))
        .await
        .unwrap();
    assert!(out.requeued.is_empty());
    assert_eq!(
        out.not_requeued[0].found,
        Some((NotificationStatus::Discarded, "crm".to_owned()))
    );
    assert!(out.not_requeued[0].to_string().contains("Discarded"));

    // The binary: a reason is required; --all with --listener takes that listener's rest.
    let (_dir, path) = support::write_config(&config_with_listeners(&db.url));
    let path = path.to_str().unwrap();
    let (code, _, err) = support::walhook(&["discard", "--config", path, "--all"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--reason"), "{err}");
    let (code, _, err) =
        support::walhook(&["discard", "--config", path, "--all", "--reason", "  "]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the reason is empty"), "{err}");
    let (code, out, err) = support::walhook(&[
        "discard",
        "--config",
        path,
        "--all",
        "--listener",
        "erp",
        "--reason",
        "invoice API retired",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("discarded 1 Failed notification to walhook.discarded for listener \"erp\""),
        "{out}"
    );
    assert_eq!(status_of(&client, e10).await.as_deref(), Some("Discarded"));

    // Retention prunes Discarded rows by when they were discarded, then their events.
    client
        .execute(
            "UPDATE walhook.discarded SET discarded_at = now() - interval '8 days' WHERE id = $1",
            &[&c2],
        )
        .await
        .unwrap();
    let out = queue::prune(&client, Duration::from_secs(7 * 86_400), 100)
        .await
        .unwrap();
    assert_eq!(out.discarded, 1);
    assert_eq!(status_of(&client, c2).await, None);
    assert_eq!(status_of(&client, e10).await.as_deref(), Some("Discarded"));
}

#[tokio::test]
async fn search_pages_newest_first_through_every_status_and_filter() {
    use walhook::queue::browse::{
        PageAt, SearchFilter, event_detail, event_of_notification, search,
    };
    let (_db, client) = seeded().await;
    let (c1, c2, c3) = with_history(&client).await;
    // crm: Customer 1 Processed, 2 Failed, 3 New; erp: Customer 1..3 and Invoice 10 New.
    let everything = SearchFilter::default();
    let mut seen = Vec::new();
    let mut at = PageAt::First;
    let mut pages = Vec::new();
    loop {
        let page = search(&client, &everything, at, 3).await.unwrap();
        assert!(page.rows.len() <= 3);
        assert_eq!(page.newer.is_some(), at != PageAt::First);
        seen.extend(page.rows.iter().map(|r| r.id));
        pages.push(page.clone());
        match page.older {
            Some(c) => at = PageAt::Before(c),
            None => break,
        }
    }
    assert_eq!(pages.len(), 3);
    let mut expected = seen.clone();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    expected.dedup();
    // Created in one transaction: equal created_at, so newest first is by id.
    assert_eq!(seen, expected);
    assert_eq!(seen.len(), 7);
    // And back: the page newer than the last is the middle one.
    let back = search(
        &client,
        &everything,
        PageAt::After(pages[2].newer.unwrap()),
        3,
    )
    .await
    .unwrap();
    assert_eq!(back.rows, pages[1].rows);
    assert!(back.newer.is_some() && back.older.is_some());

    let ids = |f: SearchFilter| {
        let client = &client;
        async move {
            let page = search(client, &f, PageAt::First, 50).await.unwrap();
            let mut ids: Vec<i64> = page.rows.iter().map(|r| r.id).collect();
            ids.sort_unstable();
            ids
        }
    };
    let mut crm = vec![c1, c2, c3];
    crm.sort_unstable();
    assert_eq!(
        ids(SearchFilter {
            listener: Some("crm".into()),
            ..Default::default()
        })
        .await,
        crm
    );
    assert_eq!(
        ids(SearchFilter {
            statuses: vec![NotificationStatus::Failed],
            ..Default::default()
        })
        .await,
        vec![c2]
    );
    let erp2 = id_of(&client, "erp", "2").await;
    let mut two = vec![c2, erp2];
    two.sort_unstable();
    assert_eq!(
        ids(SearchFilter {
            entity_id: Some("2".into()),
            ..Default::default()
        })
        .await,
        two
    );
    assert_eq!(
        ids(SearchFilter {
            entity: Some("Invoice".into()),
            ..Default::default()
        })
        .await
        .len(),
        1
    );
    let future = std::time::SystemTime::now() + Duration::from_secs(3600);
    assert!(
        ids(SearchFilter {
            from: Some(future),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        ids(SearchFilter {
            to: Some(future),
            ..Default::default()
        })
        .await
        .len(),
        7
    );

    // By event id: both listeners' notifications of Customer 2's event.
    let uuid: uuid::Uuid = client
        .query_one(
            "SELECT event_id FROM walhook.event WHERE entity_id = '2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        ids(SearchFilter {
            event: Some(uuid),
            ..Default::default()
        })
        .await,
        two
    );
    let unknown = search(
        &client,
        &SearchFilter {
            event: Some(uuid::Uuid::nil()),
            ..Default::default()
        },
        PageAt::First,
        50,
    )
    .await
    .unwrap();
    assert!(unknown.unknown_event && unknown.rows.is_empty());

    let detail = event_detail(&client, uuid).await.unwrap().unwrap();
    assert_eq!(detail.event.entity_id, "2");
    assert_eq!(detail.event.row, json!({"id": "2", "city": "Oslo"}));
    let failed = detail.notifications.iter().find(|n| n.id == c2).unwrap();
    assert_eq!(failed.status, NotificationStatus::Failed);
    assert_eq!(failed.status_code, Some(500));
    assert_eq!(failed.event_uuid, Some(uuid));
    assert_eq!(failed.action.as_deref(), Some("Updated"));
    assert_eq!(detail.notifications.len(), 2);
    assert_eq!(
        event_of_notification(&client, c2).await.unwrap(),
        Some(uuid)
    );
    assert_eq!(event_of_notification(&client, 999_999).await.unwrap(), None);
    assert!(
        event_detail(&client, uuid::Uuid::nil())
            .await
            .unwrap()
            .is_none()
    );
}

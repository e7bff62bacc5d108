//! Claims against a real PostgreSQL: the cursor, and every way a row can end up behind it
//! and still be claimed (released lease, retry, `walhook retry`, expired lease of another
//! holder, per-entity ordering), two holders sharing one queue, the byte budgets, and the
//! rebuild of the indexes a drained backlog leaves.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use walhook::mapper::EntityEvent;
use walhook::queue::{
    self, Claim, ClaimLimits, Claimed, Compaction, Completions, Cursor, DeliveredRow, EntityKey,
    FailedAttemptRow, NotificationStore, QueueWriter,
};

const SYSTEM_ID: &str = "7301234567890123456";
const LEASE: Duration = Duration::from_secs(60);
const ROOMY: ClaimLimits = ClaimLimits {
    rows: 100,
    stored_bytes: 1 << 30,
    received_bytes: 1 << 30,
};

fn rows(n: usize) -> ClaimLimits {
    ClaimLimits { rows: n, ..ROOMY }
}

fn event(lsn: u64, entity_id: &str, row: serde_json::Value) -> EntityEvent {
    support::entity_event(lsn, 0, "Customer", entity_id, row, &["n"])
}

/// A migrated queue with `events` fanned out to listener `crm`, and a client.
async fn queue_with(events: &[EntityEvent]) -> (support::TestDb, tokio_postgres::Client) {
    let db = support::TestDb::new();
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    let mut writer = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    writer.set_listeners(vec![("crm".to_owned(), None)]);
    writer.write_batch(events, None).await.unwrap();
    (db, client)
}

/// `n` events of distinct entities `c0`, `c1`, … in commit order.
fn distinct(n: u64) -> Vec<EntityEvent> {
    (0..n)
        .map(|i| event(0x100 + i, &format!("c{i}"), json!({"n": i})))
        .collect()
}

async fn store(db: &support::TestDb, owner: &str) -> NotificationStore {
    NotificationStore::new(db.client().await, owner)
        .await
        .unwrap()
}

/// Entity ids of the claimed rows, in claim order.
fn entity_ids(claim: &Claim) -> Vec<String> {
    claim
        .rows
        .iter()
        .map(|c| match c {
            Claimed::Ready { notification, .. } => notification.event.entity_id.clone(),
            other => panic!("not ready: {other:?}"),
        })
        .collect()
}

fn ids_of(claim: &Claim, entity_ids: &[&str]) -> Vec<i64> {
    claim
        .rows
        .iter()
        .filter_map(|c| match c {
            Claimed::Ready { notification, .. }
                if entity_ids.contains(&notification.event.entity_id.as_str()) =>
            {
                Some(notification.id)
            }
            _ => None,
        })
        .collect()
}

fn delivered(ids: &[i64]) -> Completions {
    Completions {
        delivered: ids
            .iter()
            .map(|&id| DeliveredRow {
                id,
                status_code: Some(200),
                latency_ms: 1,
            })
            .collect(),
        ..Completions::default()
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn a_claim_resumes_after_its_cursor_and_a_released_row_behind_it_is_swept() {
    let (db, _client) = queue_with(&distinct(10)).await;
    let s = store(&db, "a").await;
    let first = s
        .claim_next("crm", Cursor::START, rows(4), LEASE)
        .await
        .unwrap();
    assert_eq!(entity_ids(&first), names(&["c0", "c1", "c2", "c3"]));
    assert!(first.full, "the window was full: more may wait");
    let cursor = first.scanned_to.unwrap();

    let released = ids_of(&first, &["c1"]);
    s.complete(&Completions {
        release: released.clone(),
        ..delivered(&ids_of(&first, &["c0", "c2", "c3"]))
    })
    .await
    .unwrap();
    let second = s.claim_next("crm", cursor, rows(4), LEASE).await.unwrap();
    assert_eq!(entity_ids(&second), names(&["c4", "c5", "c6", "c7"]));
    let cursor = cursor.max(second.scanned_to.unwrap());

    let swept = s.sweep("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert_eq!(entity_ids(&swept), names(&["c1"]));
    assert!(!swept.full);
    // The rows after the cursor are not the sweep's.
    let rest = s.claim_next("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert_eq!(entity_ids(&rest), names(&["c8", "c9"]));
    assert!(!rest.full, "caught up");
    let end = rest.scanned_to.unwrap();
    let none = s.claim_next("crm", end, ROOMY, LEASE).await.unwrap();
    assert!(none.rows.is_empty());
    assert_eq!(none.scanned_to, None, "nothing examined: the cursor stays");
}

#[tokio::test]
async fn a_retry_that_becomes_due_behind_the_cursor_is_swept_and_a_later_one_is_not() {
    let (db, _client) = queue_with(&distinct(6)).await;
    let s = store(&db, "a").await;
    let first = s
        .claim_next("crm", Cursor::START, rows(3), LEASE)
        .await
        .unwrap();
    let cursor = first.scanned_to.unwrap();
    let retry = |id: i64, delay: Duration| FailedAttemptRow {
        id,
        status_code: Some(503),
        comment: "HTTP 503".into(),
        delay,
    };
    s.complete(&Completions {
        retry: vec![
            retry(ids_of(&first, &["c0"])[0], Duration::ZERO),
            retry(ids_of(&first, &["c1"])[0], Duration::from_secs(3600)),
        ],
        ..delivered(&ids_of(&first, &["c2"]))
    })
    .await
    .unwrap();
    let next = s.claim_next("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert_eq!(entity_ids(&next), names(&["c3", "c4", "c5"]));
    let cursor = next.scanned_to.unwrap();
    let swept = s.sweep("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert_eq!(
        entity_ids(&swept),
        names(&["c0"]),
        "c1 is not due for an hour"
    );
    match &swept.rows[0] {
        Claimed::Ready { notification, .. } => assert_eq!(notification.attempts, 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rows_moved_back_by_walhook_retry_are_swept() {
    let (db, client) = queue_with(&distinct(4)).await;
    let s = store(&db, "a").await;
    let first = s
        .claim_next("crm", Cursor::START, ROOMY, LEASE)
        .await
        .unwrap();
    let cursor = first.scanned_to.unwrap();
    let failed = ids_of(&first, &["c0", "c2"]);
    s.complete(&Completions {
        failed: failed
            .iter()
            .map(|&id| FailedAttemptRow {
                id,
                status_code: Some(400),
                comment: "HTTP 400".into(),
                delay: Duration::ZERO,
            })
            .collect(),
        ..delivered(&ids_of(&first, &["c1", "c3"]))
    })
    .await
    .unwrap();
    let outcome = queue::admin::retry_failed(&client, None, &queue::admin::RetrySelection::All)
        .await
        .unwrap();
    assert_eq!(outcome.requeued, failed);
    let next = s.claim_next("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert!(next.rows.is_empty(), "requeued rows are behind the cursor");
    let swept = s.sweep("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert_eq!(entity_ids(&swept), names(&["c0", "c2"]));
}

#[tokio::test]
async fn expired_leases_of_another_holder_behind_the_cursor_are_swept() {
    let (db, client) = queue_with(&distinct(8)).await;
    let gone = store(&db, "gone").await;
    let taken = gone
        .claim_next("crm", Cursor::START, rows(3), LEASE)
        .await
        .unwrap();
    assert_eq!(taken.rows.len(), 3);
    let s = store(&db, "b").await;
    let mine = s
        .claim_next("crm", Cursor::START, ROOMY, LEASE)
        .await
        .unwrap();
    assert_eq!(entity_ids(&mine), names(&["c3", "c4", "c5", "c6", "c7"]));
    let cursor = mine.scanned_to.unwrap();
    assert!(
        s.sweep("crm", cursor, ROOMY, LEASE)
            .await
            .unwrap()
            .rows
            .is_empty(),
        "live leases are left alone"
    );
    client
        .execute(
            "UPDATE walhook.new SET locked_until = now() - interval '1 second' WHERE locked_by = 'gone'",
            &[],
        )
        .await
        .unwrap();
    let swept = s.sweep("crm", cursor, ROOMY, LEASE).await.unwrap();
    assert_eq!(entity_ids(&swept), names(&["c0", "c1", "c2"]));
    // The old holder can no longer record them.
    gone.complete(&delivered(&ids_of(&taken, &["c0", "c1", "c2"])))
        .await
        .unwrap();
    let processed: i64 = client
        .query_one("SELECT count(*) FROM walhook.processed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(processed, 0);
}

#[tokio::test]
async fn a_change_held_back_by_an_earlier_one_is_claimed_by_entity_once_that_one_is_recorded() {
    let events = vec![
        event(0x100, "x", json!({"n": 1})),
        event(0x101, "y", json!({"n": 1})),
        event(0x102, "x", json!({"n": 2})),
        event(0x103, "z", json!({"n": 1})),
        event(0x104, "x", json!({"n": 3})),
    ];
    let (db, _client) = queue_with(&events).await;
    let s = store(&db, "a").await;
    let first = s
        .claim_next("crm", Cursor::START, ROOMY, LEASE)
        .await
        .unwrap();
    assert_eq!(entity_ids(&first), names(&["x", "y", "z"]));
    let x = EntityKey {
        entity: "Customer".into(),
        entity_id: "x".into(),
    };
    assert_eq!(
        first.held,
        vec![x.clone(), x.clone()],
        "x's 2nd and 3rd change"
    );
    let cursor = first.scanned_to.unwrap();
    assert!(
        s.claim_next("crm", cursor, ROOMY, LEASE)
            .await
            .unwrap()
            .rows
            .is_empty()
    );

    // While x's first change is in flight its head is reported, not claimed.
    let nobody = EntityKey {
        entity: "Customer".into(),
        entity_id: "nobody".into(),
    };
    let probe = s
        .claim_heads("crm", &[x.clone(), nobody.clone()], ROOMY, LEASE)
        .await
        .unwrap();
    assert!(probe.rows.is_empty());
    assert_eq!(
        probe.held,
        vec![x.clone()],
        "an entity without rows is not held"
    );

    s.complete(&delivered(&ids_of(&first, &["x"])))
        .await
        .unwrap();
    let second = s
        .claim_heads("crm", std::slice::from_ref(&x), ROOMY, LEASE)
        .await
        .unwrap();
    assert_eq!(entity_ids(&second), names(&["x"]));
    match &second.rows[0] {
        Claimed::Ready { notification, .. } => {
            assert_eq!(
                notification.event.row["n"],
                json!(2),
                "the 2nd change, not the 3rd"
            );
        }
        other => panic!("{other:?}"),
    }
    // Not by a sweep either while the 2nd is in flight.
    assert!(
        s.sweep("crm", cursor, ROOMY, LEASE)
            .await
            .unwrap()
            .rows
            .is_empty()
    );
    s.complete(&delivered(&ids_of(&second, &["x"])))
        .await
        .unwrap();
    let swept = s.sweep("crm", cursor, ROOMY, LEASE).await.unwrap();
    match &swept.rows[..] {
        [Claimed::Ready { notification, .. }] => assert_eq!(notification.event.row["n"], json!(3)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_holders_with_their_own_cursors_claim_disjoint_rows_and_together_every_row() {
    let (db, _client) = queue_with(&distinct(300)).await;
    let (a, b) = (store(&db, "a").await, store(&db, "b").await);
    let (mut cursor_a, mut cursor_b) = (Cursor::START, Cursor::START);
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    loop {
        // Concurrently, so their windows overlap and SKIP LOCKED decides.
        let (ca, cb) = tokio::join!(
            a.claim_next("crm", cursor_a, rows(7), LEASE),
            b.claim_next("crm", cursor_b, rows(11), LEASE)
        );
        let (ca, cb) = (ca.unwrap(), cb.unwrap());
        if ca.rows.is_empty() && cb.rows.is_empty() && !ca.full && !cb.full {
            break;
        }
        cursor_a = cursor_a.max(ca.scanned_to.unwrap_or(cursor_a));
        cursor_b = cursor_b.max(cb.scanned_to.unwrap_or(cursor_b));
        seen_a.extend(entity_ids(&ca));
        seen_b.extend(entity_ids(&cb));
    }
    // Rows one skipped while the other had them locked are the other's.
    let a_set: HashSet<&String> = seen_a.iter().collect();
    let b_set: HashSet<&String> = seen_b.iter().collect();
    assert_eq!(a_set.len(), seen_a.len());
    assert_eq!(b_set.len(), seen_b.len());
    assert!(a_set.is_disjoint(&b_set), "a row claimed by both holders");
    assert_eq!(seen_a.len() + seen_b.len(), 300);
    assert!(!seen_a.is_empty() && !seen_b.is_empty());
}

/// A JSON string of `n` bytes that compression cannot shrink much.
fn noise(n: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b'a' + ((x >> 33) % 26) as u8)
        })
        .collect()
}

#[tokio::test]
async fn claims_stop_at_the_byte_budget_and_the_cursor_passes_only_what_was_taken() {
    let events: Vec<EntityEvent> = (0..5)
        .map(|i| {
            event(
                0x100 + i,
                &format!("c{i}"),
                json!({"blob": noise(100_000, i)}),
            )
        })
        .collect();
    let (db, _client) = queue_with(&events).await;
    let s = store(&db, "a").await;
    // 100 kB each: two fit under 250 kB, the third starts under it and is taken too.
    let budget = ClaimLimits {
        stored_bytes: 250_000,
        ..ROOMY
    };
    let first = s
        .claim_next("crm", Cursor::START, budget, LEASE)
        .await
        .unwrap();
    assert_eq!(entity_ids(&first), names(&["c0", "c1", "c2"]));
    assert!(first.full, "stopped by the budget");
    match &first.rows[0] {
        Claimed::Ready {
            bytes,
            stored_bytes,
            ..
        } => {
            assert!(*bytes > 100_000, "{bytes}");
            assert!(*stored_bytes > 90_000, "{stored_bytes}");
        }
        other => panic!("{other:?}"),
    }
    let cursor = first.scanned_to.unwrap();
    let tiny = ClaimLimits {
        stored_bytes: 1,
        ..ROOMY
    };
    let second = s.claim_next("crm", cursor, tiny, LEASE).await.unwrap();
    assert_eq!(
        entity_ids(&second),
        names(&["c3"]),
        "the first row always fits"
    );
    let cursor = second.scanned_to.unwrap();

    // Over the received-bytes cap rows are handed back unread.
    s.complete(&Completions {
        release: first.rows.iter().map(Claimed::id).collect(),
        ..Completions::default()
    })
    .await
    .unwrap();
    let capped = ClaimLimits {
        received_bytes: 150_000,
        ..ROOMY
    };
    let swept = s.sweep("crm", cursor, capped, LEASE).await.unwrap();
    let kinds: Vec<&str> = swept
        .rows
        .iter()
        .map(|c| match c {
            Claimed::Ready { .. } => "ready",
            Claimed::OverBudget { .. } => "over",
            Claimed::Unreadable { .. } => "unreadable",
        })
        .collect();
    assert_eq!(kinds, ["ready", "ready", "over"]);
    assert!(swept.full);
}

#[tokio::test]
async fn a_notification_whose_event_is_gone_is_claimed_as_unreadable() {
    let (db, client) = queue_with(&distinct(2)).await;
    client
        .batch_execute("DELETE FROM walhook.event WHERE entity_id = 'c0'")
        .await
        .unwrap();
    let s = store(&db, "a").await;
    let claim = s
        .claim_next("crm", Cursor::START, ROOMY, LEASE)
        .await
        .unwrap();
    match &claim.rows[..] {
        [Claimed::Unreadable { comment, .. }, Claimed::Ready { .. }] => {
            assert!(comment.contains("missing from walhook.event"), "{comment}");
        }
        other => panic!("{other:?}"),
    }
}

async fn index_bytes(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT pg_indexes_size('walhook.new'::regclass)", &[])
        .await
        .unwrap()
        .get(0)
}

/// (valid, invalid) indexes on walhook.new.
async fn index_validity(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE indisvalid), count(*) FILTER (WHERE NOT indisvalid)
             FROM pg_index WHERE indrelid = 'walhook.new'::regclass",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn indexes_a_drained_backlog_left_are_rebuilt_and_a_busy_queue_is_left_alone() {
    let (db, client) = queue_with(&distinct(20_000)).await;
    client
        .batch_execute("VACUUM ANALYZE walhook.new")
        .await
        .unwrap();
    let (valid, _) = index_validity(&client).await;
    assert_eq!(
        queue::compact_new(&client, 1 << 20).await.unwrap(),
        Compaction::NotNeeded,
        "20,000 rows waiting need their indexes"
    );

    // Delivered: the rows leave, vacuum runs, the index files keep their size.
    for sql in ["DELETE FROM walhook.new", "VACUUM ANALYZE walhook.new"] {
        client.batch_execute(sql).await.unwrap();
    }
    let drained = index_bytes(&client).await;
    assert!(drained > 1 << 20, "{drained} bytes of indexes");
    let Compaction::Rebuilt { before, after } = queue::compact_new(&client, 1 << 20).await.unwrap()
    else {
        panic!("an empty walhook.new with {drained} bytes of indexes was not rebuilt");
    };
    assert_eq!(before, drained);
    assert!(after < before / 4, "{before} -> {after} bytes");
    assert_eq!(after, index_bytes(&client).await);
    assert_eq!(index_validity(&client).await, (valid, 0));
    assert_eq!(
        queue::compact_new(&client, 1 << 20).await.unwrap(),
        Compaction::NotNeeded
    );

    // The rebuilt indexes serve the writer and the claims.
    let mut writer = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    writer.set_listeners(vec![("crm".to_owned(), None)]);
    let more: Vec<EntityEvent> = (0..3)
        .map(|i| event(0x100_000 + i, &format!("later{i}"), json!({"n": i})))
        .collect();
    writer.write_batch(&more, None).await.unwrap();
    let claim = store(&db, "a")
        .await
        .claim_next("crm", Cursor::START, ROOMY, LEASE)
        .await
        .unwrap();
    assert_eq!(entity_ids(&claim), names(&["later0", "later1", "later2"]));
}

#[tokio::test]
async fn an_index_an_interrupted_rebuild_left_behind_is_dropped() {
    let (_db, client) = queue_with(&distinct(2)).await;
    let (valid, _) = index_validity(&client).await;
    // What a REINDEX CONCURRENTLY cancelled half-way leaves: an invalid `_ccnew` index.
    let failed = client
        .batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY new_listener_idx_ccnew ON walhook.new (listener)",
        )
        .await;
    assert!(failed.is_err(), "two rows of one listener are not unique");
    assert_eq!(index_validity(&client).await, (valid, 1));
    assert_eq!(
        queue::compact_new(&client, i64::MAX).await.unwrap(),
        Compaction::NotNeeded
    );
    assert_eq!(index_validity(&client).await, (valid, 0));
}

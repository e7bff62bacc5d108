//! The queue writer's direct path (COPY straight into walhook.event for batches newer than
//! anything stored) against a real PostgreSQL: it must stay exactly as idempotent as the
//! staged path when another writer stores events behind its back.

mod support;

use serde_json::json;
use walhook::mapper::EntityEvent;
use walhook::queue::{self, QueueWriter, WriteOutcome};
use walhook::types::Lsn;

const SYSTEM_ID: &str = "7301234567890123456";

fn event(lsn: u64, seq: u32, id: &str) -> EntityEvent {
    support::entity_event(
        lsn,
        seq,
        "Customer",
        id,
        json!({"id": id, "city": "Oslo"}),
        &[],
    )
}

async fn migrated() -> (support::TestDb, tokio_postgres::Client) {
    let db = support::TestDb::new();
    let mut client = db.client().await;
    queue::migrate(&mut client).await.unwrap();
    (db, client)
}

async fn writer(db: &support::TestDb) -> QueueWriter {
    let mut w = QueueWriter::new(db.client().await, SYSTEM_ID)
        .await
        .unwrap();
    w.set_listeners(vec![("crm".into(), None)]);
    w
}

async fn keys(client: &tokio_postgres::Client, table: &str) -> Vec<(String, i32)> {
    client
        .query(
            &format!("SELECT commit_lsn::text, seq FROM walhook.{table} ORDER BY commit_lsn, seq"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn lsn_keys(keys: &[(u64, i32)]) -> Vec<(String, i32)> {
    keys.iter()
        .map(|(l, s)| (Lsn(*l).to_string(), *s))
        .collect()
}

#[tokio::test]
async fn a_batch_overlapping_events_another_writer_stored_is_redone_without_duplicates() {
    let (db, client) = migrated().await;
    let mut mine = writer(&db).await;
    let mut other = writer(&db).await;
    mine.write_batch(&[event(0x100, 0, "1")], Some(Lsn(0x180)))
        .await
        .unwrap();
    // Stored behind `mine`'s back: `mine` still believes 0x100 is the newest key.
    other
        .write_batch(&[event(0x200, 0, "2"), event(0x200, 1, "3")], None)
        .await
        .unwrap();

    let out = mine
        .write_batch(
            &[
                event(0x200, 0, "2"),
                event(0x200, 1, "3"),
                event(0x300, 0, "4"),
            ],
            Some(Lsn(0x380)),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        WriteOutcome {
            inserted: 1,
            already_present: 2,
            notifications: 1,
            refused: 0,
        }
    );
    let want = lsn_keys(&[(0x100, 0), (0x200, 0), (0x200, 1), (0x300, 0)]);
    assert_eq!(keys(&client, "event").await, want);
    assert_eq!(
        keys(&client, "new").await,
        want,
        "one notification per event"
    );
    let state = queue::read_state(&client).await.unwrap().unwrap();
    assert_eq!(state.flushed_lsn, Some(Lsn(0x380)));

    // The writer goes on after the fallback.
    let next = mine
        .write_batch(&[event(0x400, 0, "5")], None)
        .await
        .unwrap();
    assert_eq!((next.inserted, next.notifications), (1, 1));
}

#[tokio::test]
async fn direct_fan_out_skips_events_another_writer_stored_inside_the_batch_range() {
    let (db, client) = migrated().await;
    let mut mine = writer(&db).await;
    let mut other = writer(&db).await;
    mine.write_batch(&[event(0x100, 0, "1")], None)
        .await
        .unwrap();
    other
        .write_batch(&[event(0x300, 0, "3")], None)
        .await
        .unwrap();

    // Keys 0x200..0x400 enclose the other writer's 0x300 without overlapping it.
    let out = mine
        .write_batch(&[event(0x200, 0, "2"), event(0x400, 0, "4")], None)
        .await
        .unwrap();
    assert_eq!(
        out,
        WriteOutcome {
            inserted: 2,
            already_present: 0,
            notifications: 2,
            refused: 0,
        }
    );
    let all = lsn_keys(&[(0x100, 0), (0x200, 0), (0x300, 0), (0x400, 0)]);
    assert_eq!(keys(&client, "event").await, all);
    assert_eq!(keys(&client, "new").await, all, "0x300 fanned out once");
}

#[tokio::test]
async fn a_restarted_writer_skips_what_is_stored_and_writes_what_is_new() {
    let (db, client) = migrated().await;
    let mut first = writer(&db).await;
    let batch = [event(0x100, 0, "1"), event(0x100, 1, "2")];
    first.write_batch(&batch, None).await.unwrap();
    drop(first);

    // A restart re-sends the last transaction together with a new one.
    let mut restarted = writer(&db).await;
    let mut resend = batch.to_vec();
    resend.push(event(0x200, 0, "3"));
    let out = restarted.write_batch(&resend, None).await.unwrap();
    assert_eq!((out.inserted, out.already_present), (1, 2));
    let out = restarted
        .write_batch(&[event(0x300, 0, "4")], None)
        .await
        .unwrap();
    assert_eq!((out.inserted, out.notifications), (1, 1));
    assert_eq!(keys(&client, "event").await.len(), 4);
    assert_eq!(keys(&client, "new").await.len(), 4);
}

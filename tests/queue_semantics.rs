//! Queue boundary: event semantics at fan-out — derived actions reach each listener once,
//! as the action it subscribes to.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use walhook::mapper::EntityEvent;
use walhook::queue::{self, NotificationStore, QueueWriter, Subscription};
use walhook::types::{Action, EntityName};

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
    let claimed = store
        .claim("cancellations", 10, Duration::from_secs(30))
        .await
        .unwrap();
    let n = claimed[0].as_ref().unwrap();
    assert_eq!(n.event.action, Action::Updated);
    assert_eq!(n.event.action_name(), "Cancelled");
    assert_eq!(n.event.event_id, derived_id);
}

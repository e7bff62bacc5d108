//! The form and template formats and batching, delivered by the dispatcher from a real
//! queue to real HTTP receivers on 127.0.0.1.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use support::queue::{QueueDb, listeners};
use support::receiver::{Received, Receiver, Reply};
use walhook::mapper::EntityEvent;
use walhook::types::Action;

const WAIT: Duration = Duration::from_secs(30);

fn event(lsn: u64, id: &str, action: Action, row: Value) -> EntityEvent {
    let mut e = support::entity_event(lsn, 0, "Customer", id, row, &["n"]);
    e.action = action;
    e
}

fn listener(url: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"hook\"\nurl = \"{url}\"\ntimeout = \"5s\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n{extra}\n"
    )
}

fn form_pairs(r: &Received) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&r.body).into_owned().collect()
}

#[tokio::test]
async fn a_form_listener_receives_a_posted_form_with_the_configured_fields() {
    let rx = Receiver::start().await;
    let mut q = QueueDb::new(&["hook"]).await;
    q.write(&[event(
        100,
        "a&b=\"c\"",
        Action::Updated,
        json!({"id": "a&b=\"c\"", "name": "Zoë & Co + Söhne", "n": 7, "note": null}),
    )])
    .await;
    let d = q.dispatch(listeners(&listener(
        &rx.url("/form"),
        "format = \"form\"\nform_fields = { action_code = \"ChangeType\", time = \"\" }",
    )));
    rx.wait_for_count(1, WAIT, "the form post").await;
    q.wait_processed(1, WAIT).await;
    d.stop().await;

    let r = &rx.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let pairs = form_pairs(r);
    let field = |name: &str| {
        pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(field("entity"), ["Customer"]);
    // The event's id and the row's id column both arrive.
    assert_eq!(field("id"), ["a&b=\"c\"", "a&b=\"c\""]);
    assert_eq!(field("action"), ["Updated"]);
    assert_eq!(field("ChangeType"), ["2"]);
    assert_eq!(field("changedFields"), ["n"]);
    assert_eq!(field("eventId").len(), 1);
    assert!(field("time").is_empty(), "time = \"\" leaves it out");
    assert_eq!(field("name"), ["Zoë & Co + Söhne"]);
    assert_eq!(field("n"), ["7"]);
    assert_eq!(field("note"), [""]);
}

#[tokio::test]
async fn a_template_listener_gets_the_change_type_contract_as_valid_json_even_for_ids_with_quotes()
{
    let rx = Receiver::start().await;
    let mut q = QueueDb::new(&["hook"]).await;
    let ids = ["42", "he said \"hi\"", "back\\slash", "{id}"];
    let actions = [
        Action::Created,
        Action::Updated,
        Action::Deleted,
        Action::Created,
    ];
    let events: Vec<EntityEvent> = ids
        .iter()
        .zip(actions)
        .enumerate()
        .map(|(i, (id, a))| event(100 + i as u64, id, a, json!({"id": id, "n": i})))
        .collect();
    q.write(&events).await;
    let d = q.dispatch(listeners(&listener(
        &rx.url("/hook"),
        r#"format = "template"
template = '{"ChangeType": {action_code}, "Data": {"BaseId": "{id}"}}'"#,
    )));
    q.wait_processed(4, WAIT).await;
    d.stop().await;

    let mut got: BTreeMap<String, i64> = BTreeMap::new();
    for r in rx.requests() {
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", String::from_utf8_lossy(&r.body)));
        let obj = body.as_object().expect("an object");
        assert_eq!(obj.len(), 2, "{body}");
        got.insert(
            body["Data"]["BaseId"].as_str().expect("BaseId").to_owned(),
            body["ChangeType"].as_i64().expect("ChangeType"),
        );
    }
    let expected: BTreeMap<String, i64> = [
        ("42".to_owned(), 1),
        ("he said \"hi\"".to_owned(), 2),
        ("back\\slash".to_owned(), 3),
        ("{id}".to_owned(), 1),
    ]
    .into();
    assert_eq!(got, expected);
}

/// The `row.n` values of a CloudEvents batch, by entity id.
fn batch_events(r: &Received) -> Vec<(String, i64, String)> {
    assert_eq!(
        r.header("content-type"),
        Some("application/cloudevents-batch+json; charset=utf-8")
    );
    let body = r.json();
    let events = body.as_array().expect("a JSON array");
    events
        .iter()
        .map(|ce| {
            assert_eq!(ce["specversion"], "1.0");
            assert_eq!(ce["type"], "Customer.Updated");
            (
                ce["entityid"].as_str().expect("entityid").to_owned(),
                ce["data"]["row"]["n"].as_i64().expect("row.n"),
                ce["id"].as_str().expect("id").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn batches_of_10_carry_100_events_in_10_requests_in_entity_order_and_a_failed_batch_is_retried_whole()
 {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500).body("try again")]);
    let mut q = QueueDb::new(&["hook"]).await;
    // Ten customers changed ten times each, interleaved, in one transaction.
    let mut events = Vec::new();
    for n in 0..10u64 {
        for c in 0..10u64 {
            events.push(event(
                1000 + n * 10 + c,
                &format!("c{c}"),
                Action::Updated,
                json!({"id": format!("c{c}"), "n": n}),
            ));
        }
    }
    q.write(&events).await;
    let d = q.dispatch(listeners(&listener(&rx.url("/batch"), "batch_size = 10")));
    q.wait_processed(100, WAIT).await;
    d.stop().await;

    let requests = rx.requests();
    assert_eq!(requests.len(), 11, "one failed request and ten delivered");
    let failed = batch_events(&requests[0]);
    assert_eq!(failed.len(), 10);
    // The failed batch came back whole, next, with the same events.
    let retried = batch_events(&requests[1]);
    let ids = |b: &[(String, i64, String)]| b.iter().map(|e| e.2.clone()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&failed), ids(&retried));

    let mut all_ids = BTreeSet::new();
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &requests[1..] {
        let batch = batch_events(r);
        assert_eq!(batch.len(), 10, "every delivered request carries 10 events");
        for (entity, n, id) in batch {
            assert!(all_ids.insert(id), "an event arrived twice");
            seen.entry(entity).or_default().push(n);
        }
    }
    assert_eq!(all_ids.len(), 100);
    for (entity, ns) in &seen {
        assert_eq!(ns, &(0..10).collect::<Vec<i64>>(), "order of {entity}");
    }
    // One attempt recorded for each notification of a batch.
    assert_eq!(
        q.count("SELECT count(*) FROM walhook.processed WHERE attempts = 2")
            .await,
        10
    );
    assert_eq!(
        q.count("SELECT count(*) FROM walhook.processed WHERE attempts = 1")
            .await,
        90
    );
}

#[tokio::test]
async fn batch_bytes_bounds_each_request_and_an_event_larger_than_it_goes_alone() {
    let rx = Receiver::start().await;
    let mut q = QueueDb::new(&["hook"]).await;
    let mut events: Vec<EntityEvent> = (0..20u64)
        .map(|i| {
            event(
                100 + i,
                &format!("s{i}"),
                Action::Updated,
                json!({"id": i, "n": i, "pad": "x".repeat(300)}),
            )
        })
        .collect();
    events.push(event(
        200,
        "big",
        Action::Updated,
        json!({"id": "big", "n": 99, "pad": "y".repeat(5000)}),
    ));
    q.write(&events).await;
    let d = q.dispatch(listeners(&listener(
        &rx.url("/bytes"),
        "batch_size = 100\nbatch_bytes = \"2kB\"",
    )));
    q.wait_processed(21, WAIT).await;
    d.stop().await;

    let mut total = 0;
    for r in rx.requests() {
        let batch = batch_events(&r);
        total += batch.len();
        if batch.iter().any(|(id, ..)| id == "big") {
            assert_eq!(batch.len(), 1, "the large event goes alone");
        } else {
            assert!(r.body.len() <= 2048, "{} bytes", r.body.len());
            assert!(batch.len() >= 2, "small events share requests");
        }
    }
    assert_eq!(total, 21);
}

#[tokio::test]
async fn a_template_batch_renders_through_events_and_a_rejected_batch_fails_every_notification() {
    let rx = Receiver::start().await;
    let mut q = QueueDb::new(&["hook"]).await;
    let events: Vec<EntityEvent> = (0..5u64)
        .map(|i| {
            event(
                100 + i,
                &format!("id\"{i}"),
                Action::Created,
                json!({"id": i, "n": i}),
            )
        })
        .collect();
    q.write(&events).await;
    let blocks = listener(
        &rx.url("/tpl"),
        r#"format = "template"
template = '{"ChangeType": {action_code}, "Data": {"BaseId": "{id}"}}'
batch_template = '{"Count": {count}, "Changes": [{events}]}'
batch_size = 5"#,
    );
    let d = q.dispatch(listeners(&blocks));
    q.wait_processed(5, WAIT).await;
    d.stop().await;
    let requests = rx.requests();
    assert_eq!(requests.len(), 1);
    let body = requests[0].json();
    assert_eq!(body["Count"], 5);
    let changes: Vec<Value> = (0..5)
        .map(|i| json!({"ChangeType": 1, "Data": {"BaseId": format!("id\"{i}")}}))
        .collect();
    assert_eq!(body["Changes"], Value::Array(changes));

    // The listener refuses the next batch: every notification in it fails, with the answer.
    rx.respond_with(|_, _| Reply::status(400).body("bad batch"));
    let more: Vec<EntityEvent> = (5..8u64)
        .map(|i| event(200 + i, &format!("x{i}"), Action::Updated, json!({"n": i})))
        .collect();
    q.write(&more).await;
    let d = q.dispatch(listeners(&blocks));
    support::eventually(WAIT, "3 failed notifications", || async {
        (q.count("SELECT count(*) FROM walhook.failed").await == 3).then_some(())
    })
    .await;
    d.stop().await;
    assert_eq!(rx.count(), 2, "the three went in one request");
    let comments = q
        .client
        .query(
            "SELECT DISTINCT comment, last_status_code FROM walhook.failed",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(comments.len(), 1);
    let comment: String = comments[0].get(0);
    assert!(
        comment.starts_with("HTTP 400 Bad Request from "),
        "{comment}"
    );
    assert!(comment.ends_with(": bad batch"), "{comment}");
}

#[tokio::test]
async fn a_rate_limit_counts_requests_so_a_limited_listener_still_gets_full_batches() {
    let rx = Receiver::start().await;
    let mut q = QueueDb::new(&["hook"]).await;
    let events: Vec<EntityEvent> = (0..40u64)
        .map(|i| {
            event(
                100 + i,
                &format!("r{i}"),
                Action::Updated,
                json!({"id": i, "n": i}),
            )
        })
        .collect();
    q.write(&events).await;
    let d = q.dispatch(listeners(&listener(
        &rx.url("/limited"),
        "batch_size = 50\nrate_limit = \"1/s\"",
    )));
    q.wait_processed(40, WAIT).await;
    d.stop().await;
    let requests = rx.requests();
    assert_eq!(requests.len(), 1, "one request under a 1/s limit");
    assert_eq!(batch_events(&requests[0]).len(), 40);
}

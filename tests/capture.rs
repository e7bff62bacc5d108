//! Row changes become entity events in `walhook.event` (the service runs in-process).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Running, TestDb, config_toml, eventually};

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    entity: String,
    entity_id: String,
    action: String,
    changed: Option<Vec<String>>,
    row: Value,
    old: Option<Value>,
}

async fn events(c: &tokio_postgres::Client) -> Vec<Ev> {
    c.query(
        "SELECT entity, entity_id, action, changed_fields, row, old FROM walhook.event ORDER BY commit_lsn, seq",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| Ev {
                entity: r.get(0),
                entity_id: r.get(1),
                action: r.get(2),
                changed: r.get(3),
                row: r.get(4),
                old: r.get(5),
            })
            .collect()
    })
    .unwrap_or_default()
}

async fn wait_for_events(c: &tokio_postgres::Client, n: usize) -> Vec<Ev> {
    eventually(Duration::from_secs(60), &format!("{n} events"), || async {
        let evs = events(c).await;
        (evs.len() >= n).then_some(evs)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_changes_on_two_entity_tables_become_filtered_entity_events() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id serial PRIMARY KEY, first_name text, last_name text, city text, password_hash text, note text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         CREATE TABLE orders (region text, order_no int, amount numeric(10,2), status text, PRIMARY KEY (region, order_no));
         ALTER TABLE orders REPLICA IDENTITY FULL;
         CREATE TABLE untracked (id int PRIMARY KEY);",
    )
    .await;
    let toml = config_toml(
        &db.url,
        r#"
[[entity]]
name = "Customer"
table = "public.customer"
track = ["first_name", "last_name", "city"]
exclude = ["password_hash"]
subject = "Customer/{id}"

[[entity]]
name = "Order"
table = "orders"
actions = ["created", "deleted"]
"#,
    );
    let svc = Running::start(&toml);
    let c = db.client().await;
    // The slot exists once the service streams; changes before that would be missed.
    support::wait_streaming(&c).await;

    c.batch_execute(
        "INSERT INTO customer (first_name, last_name, city, password_hash, note) VALUES ('Ada', 'Lovelace', 'London', 'secret-hash', 'n1');
         UPDATE customer SET city = 'Paris' WHERE id = 1;
         UPDATE customer SET note = 'only untracked', password_hash = 'other-secret' WHERE id = 1;
         INSERT INTO orders VALUES ('a,b', 1, 10.50, 'new'), ('a', 2, 3, 'new');
         INSERT INTO orders VALUES ('b,c', 3, 1, 'x');
         UPDATE orders SET status = 'paid' WHERE order_no = 1;
         DELETE FROM orders WHERE order_no = 2;
         INSERT INTO untracked VALUES (1);
         DELETE FROM customer WHERE id = 1;",
    )
    .await
    .unwrap();

    let evs = wait_for_events(&c, 6).await;
    // Let anything that should not exist have a chance to show up.
    c.batch_execute("INSERT INTO orders VALUES ('z', 99, 0, 'fence')")
        .await
        .unwrap();
    // The 7 events of the transaction, then the fence: nothing else in between.
    let evs_all = eventually(Duration::from_secs(60), "the fence's event", || async {
        let evs = events(&c).await;
        evs.iter()
            .any(|e| e.entity_id == r#"["z","99"]"#)
            .then_some(evs)
    })
    .await;
    assert_eq!(evs_all.len(), 8, "{evs_all:#?}");
    assert_eq!(evs_all[7].entity_id, r#"["z","99"]"#);
    assert_eq!(&evs_all[..6], &evs[..6]);

    let created = &evs[0];
    assert_eq!(
        (
            created.entity.as_str(),
            created.entity_id.as_str(),
            created.action.as_str()
        ),
        ("Customer", "1", "Created")
    );
    assert_eq!(
        created.row,
        json!({"id": 1, "first_name": "Ada", "last_name": "Lovelace", "city": "London", "note": "n1"})
    );
    assert_eq!(created.changed, None);

    let updated = &evs[1];
    assert_eq!(updated.action, "Updated");
    assert_eq!(updated.changed.as_deref(), Some(&["city".to_string()][..]));
    assert_eq!(updated.row["city"], json!("Paris"));
    assert_eq!(
        updated.old.as_ref().map(|o| o["city"].clone()),
        Some(json!("London"))
    );

    // The untracked-only update produced nothing: next come the orders.
    assert_eq!(
        (
            evs[2].entity.as_str(),
            evs[2].entity_id.as_str(),
            evs[2].action.as_str()
        ),
        ("Order", r#"["a,b","1"]"#, "Created")
    );
    assert_eq!(evs[2].row["amount"], json!("10.50"));
    assert_eq!(
        (evs[3].entity_id.as_str(), evs[3].action.as_str()),
        (r#"["a","2"]"#, "Created")
    );
    assert_eq!(
        (evs[4].entity_id.as_str(), evs[4].action.as_str()),
        (r#"["b,c","3"]"#, "Created")
    );
    // The order update is filtered by `actions`; the delete is not.
    assert_eq!(
        (evs[5].entity_id.as_str(), evs[5].action.as_str()),
        (r#"["a","2"]"#, "Deleted")
    );
    let deleted = &evs_all[6];
    assert_eq!(
        (deleted.entity.as_str(), deleted.action.as_str()),
        ("Customer", "Deleted")
    );
    assert_eq!(deleted.row["first_name"], json!("Ada"));

    // Excluded columns appear nowhere in the queue.
    let leaked: i64 = c
        .query_one(
            "SELECT count(*) FROM walhook.event WHERE row::text LIKE '%secret%' OR coalesce(old::text, '') LIKE '%secret%' OR 'password_hash' = ANY(coalesce(changed_fields, '{}'))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    let subject: Option<String> = c
        .query_one(
            "SELECT subject FROM walhook.event WHERE entity = 'Customer' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(subject.as_deref(), Some("Customer/1"));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_map_to_json_and_unchanged_toast_is_not_a_change() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE typed (
            id int PRIMARY KEY, s smallint, i int, b bigint, n numeric(30,10), f float8, f_nan float8,
            t text, ok bool, j json, jb jsonb, ta text[], ia int[], ts timestamptz, d date,
            by bytea, u uuid, nothing text, big text);
         ALTER TABLE typed REPLICA IDENTITY FULL;
         ALTER TABLE typed ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await;
    let toml = config_toml(
        &db.url,
        r#"
[[entity]]
name = "Typed"
table = "typed"
"#,
    );
    let svc = Running::start(&toml);
    let c = db.client().await;
    support::wait_streaming(&c).await;
    c.batch_execute(
        r#"SET timezone = 'UTC';
        INSERT INTO typed VALUES (
            1, -32768, 2147483647, 9223372036854775807, 12345678901234567890.0123456789, 1.5, 'NaN',
            'unicode ✓ "quotes" and ''single'' \ backslash', true, '{"a": [1, 2.5, null]}', '{"k": {"n": 1}}',
            ARRAY['x', 'y z', NULL, 'q"uote'], ARRAY[1, 2, 3], '2024-02-03 04:05:06.789+00', '2024-02-29',
            '\xdeadbeef', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL, repeat('x', 10000));
        UPDATE typed SET i = 7 WHERE id = 1;"#,
    )
    .await
    .unwrap();
    let evs = wait_for_events(&c, 2).await;
    let row = &evs[0].row;
    assert_eq!(row["s"], json!(-32768));
    assert_eq!(row["i"], json!(2147483647));
    assert_eq!(row["b"], json!(9223372036854775807i64));
    assert_eq!(row["n"], json!("12345678901234567890.0123456789"));
    assert_eq!(row["f"], json!(1.5));
    assert_eq!(row["f_nan"], json!("NaN"));
    assert_eq!(
        row["t"],
        json!("unicode ✓ \"quotes\" and 'single' \\ backslash")
    );
    assert_eq!(row["ok"], json!(true));
    assert_eq!(row["j"], json!({"a": [1, 2.5, null]}));
    assert_eq!(row["jb"], json!({"k": {"n": 1}}));
    assert_eq!(row["ta"], json!(["x", "y z", null, "q\"uote"]));
    assert_eq!(row["ia"], json!([1, 2, 3]));
    assert_eq!(row["ts"], json!("2024-02-03T04:05:06.789+00:00"));
    assert_eq!(row["d"], json!("2024-02-29"));
    assert_eq!(row["by"], json!("3q2+7w=="));
    assert_eq!(row["u"], json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
    assert_eq!(row["nothing"], Value::Null);
    assert_eq!(row["big"].as_str().map(str::len), Some(10000));

    let upd = &evs[1];
    assert_eq!(upd.action, "Updated");
    assert_eq!(upd.changed.as_deref(), Some(&["i".to_string()][..]));
    // The TOASTed value was not re-sent, yet it is not turned into NULL.
    assert_eq!(upd.row["big"].as_str().map(str::len), Some(10000));
    svc.stop().await;
}

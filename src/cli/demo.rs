//! `walhook demo`: the whole flow in one command, on a throwaway local cluster.

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::LocalCluster;
use crate::config::Config;
use crate::error::ErrorClass;

use super::Failure;

const DEMO_DB: &str = "demo";

const DEMO_SCHEMA: &str = "
CREATE TABLE customer (
    id serial PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL,
    city text, password_hash text, last_seen timestamptz);
ALTER TABLE customer REPLICA IDENTITY FULL;
CREATE TABLE orders (
    id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customer(id),
    total numeric(12,2) NOT NULL, items jsonb NOT NULL, status text NOT NULL);
ALTER TABLE orders REPLICA IDENTITY FULL;
";

/// Sample changes made one after another; each line is one transaction.
const DEMO_CHANGES: &[(&str, &str)] = &[
    (
        "insert a customer",
        "INSERT INTO customer (first_name, last_name, city, password_hash) VALUES ('Ada', 'Lovelace', 'London', 'x')",
    ),
    (
        "insert another customer",
        "INSERT INTO customer (first_name, last_name, city, password_hash) VALUES ('Grace', 'Hopper', 'New York', 'y')",
    ),
    (
        "update a tracked column (city)",
        "UPDATE customer SET city = 'Paris' WHERE first_name = 'Ada'",
    ),
    (
        "update only an untracked column (no event expected)",
        "UPDATE customer SET last_seen = now() WHERE first_name = 'Ada'",
    ),
    (
        "place an order",
        "INSERT INTO orders (customer_id, total, items, status) SELECT id, 42.50, '[{\"sku\": \"B-1\", \"qty\": 2}]', 'new' FROM customer WHERE first_name = 'Grace'",
    ),
    ("pay the order", "UPDATE orders SET status = 'paid'"),
    (
        "delete a customer's orders and the customer",
        "DELETE FROM orders; DELETE FROM customer WHERE first_name = 'Grace'",
    ),
];

fn demo_config(url: &str, receiver: &str) -> String {
    format!(
        r#"[source]
url = "{url}"
system_name = "Demo"
heartbeat = "5s"
status_interval = "1s"

[queue]
batch_delay = "5ms"

[[entity]]
name = "Customer"
table = "public.customer"
track = ["first_name", "last_name", "city"]
exclude = ["password_hash"]
subject = "customers/{{id}}"

[[entity]]
name = "Order"
table = "public.orders"
subject = "orders/{{id}}"

[[listener]]
name = "demo-receiver"
url = "{receiver}"
headers = {{ "X-Demo" = "walhook" }}
timeout = "5s"
"#
    )
}

/// The built-in receiver: a real HTTP server on 127.0.0.1 that answers 200 and hands every
/// CloudEvent it gets to the printer.
async fn start_receiver(
    shutdown: CancellationToken,
) -> Result<
    (
        String,
        tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    ),
    Failure,
> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail(format!("cannot start the demo receiver on 127.0.0.1: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| fail(format!("demo receiver address: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/demo-hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    let _ = tx.send(v);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((format!("http://{addr}/demo-hook"), rx))
}

fn print_deliveries(rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) {
    while let Ok(ev) = rx.try_recv() {
        let changed = match &ev["data"]["changedFields"] {
            serde_json::Value::Array(a) => {
                format!(" changedFields={}", serde_json::Value::Array(a.clone()))
            }
            _ => String::new(),
        };
        println!(
            "   delivered to demo-receiver: {} {}{changed} id={}",
            ev["type"].as_str().unwrap_or("?"),
            ev["subject"].as_str().unwrap_or(""),
            ev["id"].as_str().unwrap_or("?"),
        );
    }
}

fn fail(message: String) -> Failure {
    Failure {
        class: ErrorClass::Permanent,
        message,
    }
}

/// Runs the demo until Ctrl-C or `duration`.
pub(super) async fn run(duration: Option<Duration>) -> Result<i32, Failure> {
    println!("walhook demo: starting a throwaway PostgreSQL cluster…");
    let cluster = tokio::task::spawn_blocking(|| -> Result<LocalCluster, String> {
        let c = LocalCluster::start().map_err(|e| e.to_string())?;
        c.create_database(DEMO_DB).map_err(|e| e.to_string())?;
        c.psql(DEMO_DB, DEMO_SCHEMA).map_err(|e| e.to_string())?;
        Ok(c)
    })
    .await
    .map_err(|e| fail(format!("demo setup failed: {e}")))?
    .map_err(|e| fail(format!("cannot start the demo cluster: {e}")))?;
    let url = cluster.url(DEMO_DB);
    println!(
        "cluster on 127.0.0.1:{} (data in a temporary directory)",
        cluster.port()
    );
    let receiver_stop = CancellationToken::new();
    let (receiver_url, mut deliveries) = start_receiver(receiver_stop.clone()).await?;
    println!("built-in receiver on {receiver_url}");
    let toml = demo_config(&url, &receiver_url);
    println!("\nconfiguration:\n{toml}");
    let config = Config::parse(&toml, Path::new("demo.toml"))?;

    let shutdown = CancellationToken::new();
    super::spawn_signal_handler(shutdown.clone());
    if let Some(d) = duration {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            s.cancel();
        });
    }
    let params = config.source.connect_params()?;
    let service = tokio::spawn(crate::service::run(config, shutdown.clone()));
    let client = crate::service::connect_ordinary(&params).await?;

    // Wait for the stream before changing anything, so the first changes are captured.
    let streaming = wait_for_slot(&client, &shutdown).await;
    let mut printed: i64 = 0;
    if streaming {
        for (what, sql) in DEMO_CHANGES {
            if shutdown.is_cancelled() {
                break;
            }
            println!("\n-- {what}:\n   {sql}");
            if let Err(e) = client.batch_execute(sql).await {
                println!("   failed: {e}");
            }
            // Give the event time to arrive, printing it as soon as it is queued.
            for _ in 0..20 {
                printed = print_new_events(&client, printed).await;
                print_deliveries(&mut deliveries);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        println!("\nall sample changes made; queue status:");
        print_status(&client).await;
        println!("\nmake your own changes: psql '{url}'  (Ctrl-C to stop)");
        while !shutdown.is_cancelled() {
            printed = print_new_events(&client, printed).await;
            print_deliveries(&mut deliveries);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
    shutdown.cancel();
    receiver_stop.cancel();
    let result = service
        .await
        .map_err(|e| fail(format!("walhook task failed: {e}")))?;
    drop(client);
    println!("\nstopping and removing the demo cluster");
    drop(cluster);
    result?;
    Ok(0)
}

async fn wait_for_slot(client: &tokio_postgres::Client, shutdown: &CancellationToken) -> bool {
    for _ in 0..600 {
        if shutdown.is_cancelled() {
            return false;
        }
        let active = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walhook' AND active",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false);
        if active {
            println!("walhook is streaming; making sample changes\n");
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("walhook did not start streaming within 60s; see the log above");
    false
}

async fn print_new_events(client: &tokio_postgres::Client, after: i64) -> i64 {
    let rows = match client
        .query(
            "SELECT id, entity, entity_id, action, changed_fields, row::text, commit_lsn::text
             FROM walhook.event WHERE id > $1 ORDER BY id",
            &[&after],
        )
        .await
    {
        Ok(rows) => rows,
        Err(_) => return after,
    };
    let mut last = after;
    for r in rows {
        last = r.get(0);
        let entity: String = r.get(1);
        let id: String = r.get(2);
        let action: String = r.get(3);
        let changed: Option<Vec<String>> = r.get(4);
        let row: String = r.get(5);
        let lsn: String = r.get(6);
        let changed = match changed {
            Some(c) => format!(" changedFields={c:?}"),
            None => String::new(),
        };
        println!("   event #{last}: {entity}.{action} id={id}{changed} lsn={lsn}\n      row={row}");
    }
    last
}

async fn print_status(client: &tokio_postgres::Client) {
    let q = "SELECT status, count(*) FROM walhook.notification GROUP BY 1 ORDER BY 1";
    if let Ok(rows) = client.query(q, &[]).await {
        let counts: Vec<String> = rows
            .iter()
            .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();
        println!(
            "   notifications: {}",
            if counts.is_empty() {
                "none".to_owned()
            } else {
                counts.join(", ")
            }
        );
    }
    let q = "SELECT entity, action, count(*) FROM walhook.event GROUP BY 1, 2 ORDER BY 1, 2";
    if let Ok(rows) = client.query(q, &[]).await {
        for r in rows {
            let (e, a, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
            println!("   {e}.{a}: {n} queued");
        }
    }
    let q = "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = 'walhook'";
    if let Ok(r) = client.query_one(q, &[]).await {
        let (c, w): (Option<String>, String) = (r.get(0), r.get(1));
        println!(
            "   slot confirmed up to {}, server WAL at {w}",
            c.unwrap_or_default()
        );
    }
}

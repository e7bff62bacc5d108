//! format = "servicebus" against a receiver that checks what Azure Service Bus checks: the
//! REST request shape (POST {namespace}/{topic}/messages, BrokerProperties) and the Shared
//! Access Signature, recomputed from the key. Row changes arrive as the flat contract.

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::receiver::{Received, Receiver, Reply};
use support::{Daemon, TestDb, config_toml, eventually, wait_queue_drained, wait_streaming};

const KEY_NAME: &str = "walhook-send";
const KEY: &str = "q8Zf3cB1nE5Lw0sYtR7uVx2A9dK4mH6pJ+gT=";
const WRONG_KEY: &str = "wrong-key-0000000000000000000000";

/// What Service Bus would say about a request, `Ok(topic)` when it takes it.
fn check_request(r: &Received, namespace: &str) -> Result<String, String> {
    if r.method != "POST" {
        return Err(format!("method {}", r.method));
    }
    let topic = r
        .path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/messages"))
        .ok_or_else(|| format!("path {} is not /{{topic}}/messages", r.path))?
        .to_owned();
    let auth = r.header("authorization").ok_or("no Authorization header")?;
    let params: HashMap<&str, &str> = auth
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let (sr, sig, se, skn) = match (
        params.get("sr"),
        params.get("sig"),
        params.get("se"),
        params.get("skn"),
    ) {
        (Some(sr), Some(sig), Some(se), Some(skn)) => (*sr, *sig, *se, *skn),
        _ => return Err(format!("token lacks sr, sig, se or skn: {params:?}")),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    if decode(sr) != format!("{namespace}/{topic}") {
        return Err(format!(
            "token is for {} and the request for {topic}",
            decode(sr)
        ));
    }
    if skn != KEY_NAME {
        return Err(format!("unknown key name {skn}"));
    }
    let expiry: u64 = se.parse().map_err(|_| format!("se {se} is not a number"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if expiry <= now {
        return Err("token expired".to_owned());
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if decode(sig) != expected {
        return Err("InvalidSignature: the token's signature does not match".to_owned());
    }
    let broker: Value =
        serde_json::from_str(r.header("brokerproperties").ok_or("no BrokerProperties")?)
            .map_err(|e| format!("BrokerProperties is not JSON: {e}"))?;
    for k in ["MessageId", "CorrelationId", "PartitionKey", "Label"] {
        if !broker[k].is_string() {
            return Err(format!("BrokerProperties lacks {k}"));
        }
    }
    if !r
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json"))
    {
        return Err("content type is not JSON".to_owned());
    }
    Ok(topic)
}

/// A Service Bus namespace: 201 for what it accepts, 401 with the reason otherwise; the
/// first request gets 503 (ServerBusy), which a sender retries.
async fn namespace() -> Receiver {
    let rx = Receiver::start().await;
    let ns = rx.url("");
    rx.respond_with(move |r, n| {
        if n == 0 {
            return Reply::status(503).body("ServerBusy");
        }
        match check_request(r, &ns) {
            Ok(_) => Reply::status(201),
            Err(why) => Reply::status(401).body(&why),
        }
    });
    rx
}

fn listener(name: &str, url: &str, key: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\nformat = \"servicebus\"\nsas_key_name = \"{KEY_NAME}\"\nsas_key = \"{key}\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\nmax_attempts = 3\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_changes_arrive_as_the_flat_contract_on_their_entitys_topic_with_a_valid_sas() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, last_name text, first_name text, city text, modified_by text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         CREATE TABLE orders (id int PRIMARY KEY, status text);",
    )
    .await;
    let rx = namespace().await;
    let refused = namespace().await;
    let entities = "[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n[[entity]]\nname = \"Order\"\ntable = \"orders\"\n";
    let text = config_toml(
        &db.url,
        &format!(
            "{entities}{}{}",
            listener(
                "bus",
                &rx.url(""),
                KEY,
                "on_behalf_of = \"modified_by\"\nuser_properties = true\n"
            ),
            listener(
                "bus-wrong-key",
                &refused.url(""),
                WRONG_KEY,
                "entities = [\"Order\"]\n"
            ),
        ),
    );
    let daemon = Daemon::start_with(&text, "text", |cmd| {
        cmd.env("WALHOOK_LOG", "debug");
    });
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "INSERT INTO customer VALUES (42, 'Lovelace', 'Ada', 'London', 'ops@example.com');
         UPDATE customer SET last_name = 'King', first_name = 'Augusta', city = 'Paris', modified_by = NULL WHERE id = 42;
         DELETE FROM customer WHERE id = 42;
         INSERT INTO orders VALUES (7, 'new');",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "five notifications done", || async {
        let done: i64 = c
            .query_one(
                "SELECT (SELECT count(*) FROM walhook.processed) + (SELECT count(*) FROM walhook.failed)",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (done == 5).then_some(())
    })
    .await;
    wait_queue_drained(&c).await;

    let seen: Vec<(String, Result<String, String>)> = rx
        .requests()
        .iter()
        .map(|r| (r.path.clone(), check_request(r, &rx.url(""))))
        .collect();
    // Every request passes Service Bus's checks; the first was answered 503 and sent again.
    assert_eq!(seen.len(), 5, "{seen:#?}");
    assert!(seen.iter().all(|(_, r)| r.is_ok()), "{seen:#?}");
    let all = rx.requests();
    let message_id = |r: &Received| {
        let b: Value = serde_json::from_str(r.header("brokerproperties").unwrap()).unwrap();
        b["MessageId"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        all[1..]
            .iter()
            .filter(|r| message_id(r) == message_id(&all[0]))
            .count(),
        1,
        "the refused message was sent again with the same MessageId"
    );
    let accepted: Vec<Received> = all[1..].to_vec();
    let mut customer: Vec<&Received> = accepted
        .iter()
        .filter(|r| r.path == "/api.event.customer/messages")
        .collect();
    customer.sort_by_key(|r| r.json()["evenType"].as_i64());
    let order: Vec<&Received> = accepted
        .iter()
        .filter(|r| r.path == "/api.event.order/messages")
        .collect();
    assert_eq!((customer.len(), order.len()), (3, 1));

    let ids: Vec<String> = c
        .query(
            "SELECT event_id::text FROM walhook.event WHERE entity = 'Customer' ORDER BY commit_lsn, seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let bodies: Vec<Value> = customer.iter().map(|r| r.json()).collect();
    let timestamp = bodies[0]["timestamp"].clone();
    assert!(humantime::parse_rfc3339(timestamp.as_str().unwrap()).is_ok());
    let expected = |even: i64, on_behalf: Value, changed: &str| {
        json!({
            "sourceSystem": db.name,
            "evenType": even,
            "id": "42",
            "type": "customer",
            "timestamp": timestamp,
            "partitionKey": "customer.42",
            "onBehalfOf": on_behalf,
            "changedFields": changed,
        })
    };
    // A created row lists every column (the stored row does not keep column order).
    let mut created = bodies[0].clone();
    let mut columns: Vec<&str> = bodies[0]["changedFields"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    columns.sort_unstable();
    assert_eq!(
        columns,
        ["city", "first_name", "id", "last_name", "modified_by"]
    );
    created["changedFields"] = json!("");
    assert_eq!(created, expected(1, json!("ops@example.com"), ""));
    // Column order, not alphabetical.
    assert_eq!(
        bodies[1],
        expected(2, Value::Null, "last_name,first_name,city,modified_by")
    );
    assert_eq!(bodies[2], expected(3, Value::Null, ""));
    for (r, id) in customer.iter().zip(&ids) {
        let broker: Value = serde_json::from_str(r.header("brokerproperties").unwrap()).unwrap();
        assert_eq!(broker["MessageId"], id.as_str());
        assert_eq!(broker["PartitionKey"], "customer.42");
        assert_eq!(r.header("diagnostic-id"), broker["CorrelationId"].as_str());
    }
    let labels: Vec<String> = customer
        .iter()
        .map(|r| {
            let b: Value = serde_json::from_str(r.header("brokerproperties").unwrap()).unwrap();
            b["Label"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        labels,
        ["Customer.Created", "Customer.Updated", "Customer.Deleted"]
    );
    // User properties carry the changed values.
    assert_eq!(customer[1].header("city"), Some("\"Paris\""));
    assert_eq!(customer[1].header("last_name"), Some("\"King\""));
    let order_body = order[0].json();
    assert_eq!(order_body["type"], "order");
    assert_eq!(order_body["partitionKey"], "order.7");

    // A wrong key: refused for good, the comment quotes the namespace, never the key.
    let comment: String = c
        .query_one(
            "SELECT comment FROM walhook.failed WHERE listener = 'bus-wrong-key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        comment.starts_with(&format!(
            "HTTP 401 Unauthorized from {}api.event.order/messages: InvalidSignature",
            refused.url("/")
        )),
        "{comment}"
    );
    let log = daemon.log();
    for secret in [KEY, WRONG_KEY] {
        assert!(!log.contains(secret), "the log shows a key");
        assert!(!comment.contains(secret));
    }
    // Tokens are never logged either.
    assert!(!log.contains("SharedAccessSignature"), "{log}");
    assert_eq!(refused.count(), 2, "503 retried, then 401 final");
}

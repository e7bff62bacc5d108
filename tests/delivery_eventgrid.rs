//! format = "eventgrid" against real receivers: the validation handshake (code echoed, or
//! a GET to the validationUrl on the admin endpoint), nothing delivered before it, state
//! kept across restarts, a new handshake when headers change on reload, events that
//! Azure's own Python model parses, and topic mode with its aeg-sas-key.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::receiver::{Received, Receiver, Reply};
use support::{Daemon, TestDb, config_toml, eventually, free_port, wait_streaming, walhook};

const API_KEY: &str = "grid-api-key-7f3a9c";
const AEG_KEY: &str = "aeg-topic-key-5b1e77";
const VALIDATION: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

const TABLE: &str = "CREATE TABLE customer (id int PRIMARY KEY, first_name text, city text);
ALTER TABLE customer REPLICA IDENTITY FULL;";

/// A config with the admin endpoint on `admin_port` and Event Grid listeners (`extra`
/// holds their blocks).
fn config(db: &TestDb, admin_port: u16, listeners: &str) -> String {
    config_toml(
        &db.url,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n{listeners}"
        ),
    )
}

/// An Event Grid webhook listener with fast retries and a secret header.
fn grid_listener(name: &str, url: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nurl = \"{url}\"\nformat = \"eventgrid\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\nheaders = {{ \"X-Api-Key\" = \"{API_KEY}\" }}\n{extra}"
    )
}

fn is_validation(r: &Received) -> bool {
    r.header("aeg-event-type") == Some("SubscriptionValidation")
}

fn validations(rx: &Receiver) -> Vec<Received> {
    rx.requests().into_iter().filter(is_validation).collect()
}

fn notifications(rx: &Receiver) -> Vec<Received> {
    rx.requests()
        .into_iter()
        .filter(|r| !is_validation(r))
        .collect()
}

/// Answers validation events by echoing the code (synchronous handshake), events with 200.
fn echo_the_code(r: &Received, _: usize) -> Reply {
    if !is_validation(r) {
        return Reply::status(200);
    }
    let code = r.json()[0]["data"]["validationCode"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Reply::status(200)
        .header("content-type", "application/json")
        .body(&format!("{{\"validationResponse\":\"{code}\"}}"))
}

fn status(daemon: &Daemon) -> String {
    let path = daemon.config.to_str().unwrap();
    let (code, out, err) = walhook(&["status", "--config", path]);
    assert_eq!(code, 0, "{out}{err}");
    out
}

async fn wait_status(daemon: &Daemon, what: &str, wanted: &str) -> String {
    eventually(Duration::from_secs(30), what, || async {
        let out = status(daemon);
        out.contains(wanted).then_some(out)
    })
    .await
}

/// The Event Grid schema, strictly: exactly these fields, strings where strings belong,
/// an RFC 3339 time, a uuid id, metadataVersion "1".
fn assert_event_grid_schema(event: &Value, topic_expected: bool) {
    let obj = event.as_object().expect("an event is a JSON object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = vec![
        "data",
        "dataVersion",
        "eventTime",
        "eventType",
        "id",
        "metadataVersion",
        "subject",
    ];
    if topic_expected {
        expected.push("topic");
        expected.sort_unstable();
    }
    assert_eq!(keys, expected, "{event}");
    for k in [
        "id",
        "subject",
        "eventType",
        "eventTime",
        "dataVersion",
        "metadataVersion",
    ] {
        assert!(event[k].is_string(), "{k} is not a string in {event}");
    }
    assert!(uuid::Uuid::parse_str(event["id"].as_str().unwrap()).is_ok());
    assert!(humantime::parse_rfc3339(event["eventTime"].as_str().unwrap()).is_ok());
    assert_eq!(event["metadataVersion"], "1");
}

/// Parses every event with the azure-eventgrid package's `EventGridEvent` and returns what
/// the model read (id, topic, subject, event_type, event_time, data, data_version), one JSON
/// object per event; `None` when Python or the package is missing outside CI.
fn parse_with_azure(events: &[Value]) -> Option<Vec<Value>> {
    const SCRIPT: &str = r#"
import json, sys
from azure.eventgrid import EventGridEvent
out = []
for raw in json.load(sys.stdin):
    a = EventGridEvent.from_json(json.dumps(raw))
    b = EventGridEvent.from_dict(raw)
    assert (a.id, a.event_type, a.data) == (b.id, b.event_type, b.data)
    out.append({"id": a.id, "topic": a.topic, "subject": a.subject, "event_type": a.event_type,
                "event_time": a.event_time.isoformat(), "data": a.data,
                "data_version": a.data_version, "metadata_version": a.metadata_version})
print(json.dumps(out))
"#;
    let python = std::env::var("WALHOOK_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let available = std::process::Command::new(&python)
        .args(["-c", "import azure.eventgrid"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var_os("CI").is_none(),
            "{python} cannot import azure.eventgrid: `pip install azure-eventgrid` (.ci/run does)"
        );
        eprintln!("skipping the azure-eventgrid parse: {python} has no azure.eventgrid");
        return None;
    }
    let mut child = std::process::Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(events).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "azure-eventgrid refused the events: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("the script prints JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_echoes_the_code_is_validated_then_gets_events_azure_parses() {
    let db = TestDb::new();
    db.execute(TABLE).await;
    // The listener is down at first: the handshake is retried until it answers.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/grid");
    let admin = free_port();
    let text = config(
        &db,
        admin,
        &grid_listener(
            "grid",
            &url,
            "event_types = { created = \"AssetChanged\", deleted = \"AssetChanged\" }\n",
        ),
    );
    let mut daemon = Daemon::start(&text);
    let c = db.client().await;
    wait_streaming(&c).await;
    c.batch_execute(
        "INSERT INTO customer VALUES (1, 'Ada', 'London');
         UPDATE customer SET city = 'Paris' WHERE id = 1;
         DELETE FROM customer WHERE id = 1;",
    )
    .await
    .unwrap();
    let down = wait_status(
        &daemon,
        "status naming the refused connection",
        &format!("grid: awaiting validation: the last handshake failed: the validation event was not accepted: connection refused by 127.0.0.1:{port}"),
    )
    .await;
    assert!(!down.contains(API_KEY));

    let rx = Receiver::start_on(port).await;
    rx.respond_with(echo_the_code);
    eventually(
        Duration::from_secs(30),
        "three events after validation",
        || async { (notifications(&rx).len() >= 3).then_some(()) },
    )
    .await;
    let all = rx.requests();
    assert!(is_validation(&all[0]), "the first request is the handshake");
    assert_eq!(validations(&rx).len(), 1);
    let v = all[0].json();
    assert_eq!(v[0]["eventType"], VALIDATION);
    assert_event_grid_schema(&v[0], true);
    assert_eq!(all[0].header("x-api-key"), Some(API_KEY));
    let validation_url = v[0]["data"]["validationUrl"].as_str().unwrap();
    assert!(
        validation_url.starts_with(&format!(
            "http://127.0.0.1:{admin}/eventgrid/validate?listener=grid&code="
        )),
        "{validation_url}"
    );

    let events: Vec<Value> = notifications(&rx)
        .iter()
        .flat_map(|r| {
            assert_eq!(r.header("aeg-event-type"), Some("Notification"));
            assert_eq!(r.header("x-api-key"), Some(API_KEY));
            assert!(
                r.header("content-type")
                    .is_some_and(|t| t.starts_with("application/json"))
            );
            r.json().as_array().expect("a JSON array").clone()
        })
        .collect();
    assert_eq!(events.len(), 3);
    for e in &events {
        assert_event_grid_schema(e, true);
        assert_eq!(e["topic"], format!("/walhook/{}", db.name));
        assert_eq!(e["subject"], "Customer/1");
        assert_eq!(e["dataVersion"], "1.0");
    }
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["AssetChanged", "Customer.Updated", "AssetChanged"]);
    assert_eq!(
        events[1]["data"]["changedFields"],
        serde_json::json!(["city"])
    );
    assert_eq!(events[1]["data"]["row"]["city"], "Paris");

    if let Some(parsed) = parse_with_azure(&events) {
        for (model, raw) in parsed.iter().zip(&events) {
            assert_eq!(model["id"], raw["id"]);
            assert_eq!(model["event_type"], raw["eventType"]);
            assert_eq!(model["subject"], raw["subject"]);
            assert_eq!(model["topic"], raw["topic"]);
            assert_eq!(model["data"], raw["data"]);
            assert_eq!(model["data_version"], "1.0");
            assert_eq!(model["metadata_version"], "1");
            let t = model["event_time"].as_str().unwrap();
            assert!(t.starts_with("20") && t.ends_with("+00:00"), "{t}");
        }
    }
    let out = wait_status(&daemon, "status says validated", "grid: validated at").await;
    assert!(
        out.contains("it answered with the validation code"),
        "{out}"
    );

    // The validation is remembered: a restart sends no second validation event.
    assert!(daemon.terminate().success());
    let daemon = Daemon::start(&text);
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (2, 'Grace', 'York')", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the event after restart",
        || async { (notifications(&rx).len() >= 4).then_some(()) },
    )
    .await;
    assert_eq!(validations(&rx).len(), 1, "{}", daemon.log());
    assert!(!daemon.log().contains(API_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_the_code_then_a_get_to_the_validation_url_validates() {
    let db = TestDb::new();
    db.execute(TABLE).await;
    let rx = Receiver::start().await;
    // When the listener's GET was answered, and how.
    let got: Arc<Mutex<Option<(Instant, u16, String)>>> = Arc::default();
    {
        let got = got.clone();
        rx.respond_with(move |r, _| {
            if is_validation(r) {
                let url = r.json()[0]["data"]["validationUrl"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let got = got.clone();
                // As Azure's asynchronous handshake: 200 at once, the GET 2 s later.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if let Ok(resp) = reqwest::get(&url).await {
                        let status = resp.status().as_u16();
                        let text = resp.text().await.unwrap_or_default();
                        *got.lock().unwrap() = Some((Instant::now(), status, text));
                    }
                });
            }
            Reply::status(200)
        });
    }
    let daemon = Daemon::start(&config(
        &db,
        free_port(),
        &grid_listener("grid", &rx.url("/grid"), ""),
    ));
    let c = db.client().await;
    wait_streaming(&c).await;
    rx.wait_for_count(1, Duration::from_secs(30), "the validation event")
        .await;
    c.execute("INSERT INTO customer VALUES (1, 'Ada', 'London')", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the event after the GET",
        || async { (!notifications(&rx).is_empty()).then_some(()) },
    )
    .await;
    let (answered, status_code, text) = got.lock().unwrap().clone().expect("the GET was answered");
    assert_eq!(status_code, 200, "{text}");
    assert!(text.contains("successfully validated"), "{text}");
    for n in notifications(&rx) {
        assert!(
            n.at > answered,
            "an event arrived before the listener was validated"
        );
    }
    assert_eq!(validations(&rx).len(), 1);
    let out = wait_status(&daemon, "status says validated", "grid: validated at").await;
    assert!(out.contains("it sent a GET to the validationUrl"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_that_never_validate_get_nothing_and_status_says_why() {
    let db = TestDb::new();
    db.execute(TABLE).await;
    let refusing = Receiver::start().await;
    refusing.respond_with(|_, _| Reply::status(400).body("no subscription here"));
    let silent = Receiver::start().await;
    let admin = free_port();
    let daemon = Daemon::start(&config(
        &db,
        admin,
        &format!(
            "{}{}",
            grid_listener("refusing", &refusing.url("/r"), ""),
            grid_listener("silent", &silent.url("/s"), "")
        ),
    ));
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (1, 'Ada', 'London')", &[])
        .await
        .unwrap();
    // The refused handshake is tried again; the silent one waits for a GET.
    refusing
        .wait_for_count(3, Duration::from_secs(30), "repeated handshakes")
        .await;
    let out = wait_status(
        &daemon,
        "status of the silent listener",
        "silent: awaiting validation: it answered HTTP 200 without a validationResponse; waiting until",
    )
    .await;
    assert!(
        out.contains(&format!(
            "refusing: awaiting validation: the last handshake failed: the validation event was not accepted: HTTP 400 Bad Request from {}: no subscription here",
            refusing.url("/r")
        )),
        "{out}"
    );
    let new: i64 = c
        .query_one("SELECT count(*) FROM walhook.new", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(new, 2, "both notifications wait in walhook.new");
    assert!(notifications(&refusing).is_empty());
    assert!(notifications(&silent).is_empty());
    assert_eq!(validations(&silent).len(), 1);
    let log = daemon.log();
    assert!(
        log.contains("Event Grid listener refusing is not validated: the validation event was not accepted: HTTP 400"),
        "{log}"
    );
    assert!(!log.contains(API_KEY));

    // A GET after the 5 minutes does not count (the database's clock decides).
    let url = validations(&silent)[0].json()[0]["data"]["validationUrl"]
        .as_str()
        .unwrap()
        .to_owned();
    c.execute(
        "UPDATE walhook.listener_validation SET requested_at = now() - interval '6 minutes' WHERE listener = 'silent'",
        &[],
    )
    .await
    .unwrap();
    let late = reqwest::get(&url).await.unwrap();
    assert_eq!(late.status().as_u16(), 404);
    assert!(
        late.text()
            .await
            .unwrap()
            .contains("the 5 minutes are over")
    );
    eventually(Duration::from_secs(30), "the expired handshake in the log", || async {
        daemon
            .log()
            .contains("Event Grid listener silent is not validated: it neither answered with the validation code nor sent a GET to the validationUrl within 5 minutes")
            .then_some(())
    })
    .await;
    // A new validation event follows; a made-up code is refused.
    silent
        .wait_for_count(2, Duration::from_secs(30), "a new validation event")
        .await;
    let forged = format!("http://127.0.0.1:{admin}/eventgrid/validate?listener=silent&code=guess");
    assert_eq!(reqwest::get(&forged).await.unwrap().status().as_u16(), 404);
    let bare = format!("http://127.0.0.1:{admin}/eventgrid/validate");
    assert_eq!(reqwest::get(&bare).await.unwrap().status().as_u16(), 400);
    assert!(notifications(&silent).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_headers_on_reload_run_the_handshake_again_other_changes_do_not() {
    let db = TestDb::new();
    db.execute(TABLE).await;
    let rx = Receiver::start().await;
    rx.respond_with(echo_the_code);
    let admin = free_port();
    let with = |extra: &str| config(&db, admin, &grid_listener("grid", &rx.url("/grid"), extra));
    let daemon = Daemon::start(&with(""));
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (1, 'Ada', 'London')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the first event", || async {
        (notifications(&rx).len() == 1).then_some(())
    })
    .await;

    // A change that is not the url or headers restarts delivery without a handshake.
    std::fs::write(&daemon.config, with("max_attempts = 5\n")).unwrap();
    daemon.hup();
    eventually(Duration::from_secs(30), "the reload", || async {
        daemon
            .log()
            .contains("restarting delivery with the new configuration")
            .then_some(())
    })
    .await;
    c.execute("INSERT INTO customer VALUES (2, 'Grace', 'York')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the second event", || async {
        (notifications(&rx).len() == 2).then_some(())
    })
    .await;
    assert_eq!(validations(&rx).len(), 1);

    // A new header value: validated again before the next event.
    let new_headers = with("").replace(API_KEY, "rotated-key-91c2");
    std::fs::write(&daemon.config, new_headers).unwrap();
    daemon.hup();
    rx.wait_for_count(4, Duration::from_secs(30), "a second validation event")
        .await;
    c.execute("INSERT INTO customer VALUES (3, 'Alan', 'Wilmslow')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the third event", || async {
        (notifications(&rx).len() == 3).then_some(())
    })
    .await;
    let all = rx.requests();
    let second = all.iter().rposition(is_validation).unwrap();
    assert_eq!(validations(&rx).len(), 2);
    assert_eq!(all[second].header("x-api-key"), Some("rotated-key-91c2"));
    assert_eq!(
        all[second + 1..]
            .iter()
            .filter(|r| !is_validation(r))
            .count(),
        1,
        "the third event comes after the new handshake"
    );
    assert_eq!(
        all.last().unwrap().header("x-api-key"),
        Some("rotated-key-91c2")
    );
    let log = daemon.log();
    assert!(
        log.contains("sending the validation event (url or headers changed)"),
        "{log}"
    );
    assert!(!log.contains("rotated-key-91c2") && !log.contains(API_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_mode_posts_to_the_topic_with_its_key_and_no_handshake() {
    let db = TestDb::new();
    db.execute(TABLE).await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("aeg-key");
    std::fs::write(&key_file, format!("{AEG_KEY}\n")).unwrap();
    // Topic mode needs no [admin] section.
    let text = config_toml(
        &db.url,
        &format!(
            "[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n[[listener]]\nname = \"topic\"\nurl = \"{}\"\nformat = \"eventgrid\"\neventgrid_topic = true\naeg_sas_key_file = \"{}\"\n",
            rx.url("/api/events"),
            key_file.display()
        ),
    );
    let daemon = Daemon::start_with(&text, "text", |cmd| {
        cmd.env("WALHOOK_LOG", "debug");
    });
    let c = db.client().await;
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (1, 'Ada', 'London')", &[])
        .await
        .unwrap();
    rx.wait_for_count(1, Duration::from_secs(30), "the event")
        .await;
    let r = &rx.requests()[0];
    assert_eq!(r.path, "/api/events");
    assert_eq!(r.header("aeg-sas-key"), Some(AEG_KEY));
    assert_eq!(r.header("aeg-event-type"), None);
    let body = r.json();
    assert_event_grid_schema(&body[0], false);
    assert_eq!(body[0]["eventType"], "Customer.Created");
    // A topic that refuses the key: the comment names the answer, never the key.
    rx.respond_with(|_, _| Reply::status(401).body(&format!("invalid aeg-sas-key {AEG_KEY}")));
    c.execute("INSERT INTO customer VALUES (2, 'Grace', 'York')", &[])
        .await
        .unwrap();
    let comment: String = eventually(Duration::from_secs(30), "the failure", || async {
        c.query_opt("SELECT comment FROM walhook.failed", &[])
            .await
            .ok()?
            .map(|r| r.get(0))
    })
    .await;
    assert!(
        comment.starts_with("HTTP 401 Unauthorized from"),
        "{comment}"
    );
    assert!(!comment.contains(AEG_KEY), "{comment}");
    assert!(!daemon.log().contains(AEG_KEY));
}

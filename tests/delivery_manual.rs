//! Manual sends and what stays secret: `walhook check` on a bad template, `walhook
//! test-listener`, `walhook retry --event`, and no credential in any log line at trace
//! level while authenticated listeners are served through the whole daemon.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use support::oauth::{CLIENT_SECRET, OAuthWorld, bearer};
use support::queue::QueueDb;
use support::receiver::{Receiver, Reply};
use support::{ClusterOptions, Daemon, TestDb, eventually, walhook_bin, write_config};
use walhook::types::Action;

const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const API_KEY: &str = "ap1-k3y-value-9f8e";

/// Runs `walhook ARGS` with logging at `level`; returns (exit code, stdout, stderr).
async fn walhook(args: &[&str], level: &str) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let level = level.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(walhook_bin())
            .args(&args)
            .env("WALHOOK_LOG", level)
            .output()
            .expect("run walhook");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("walhook command")
}

fn config(source_url: &str, listeners: &str) -> String {
    format!(
        r#"[source]
url = "{source_url}"
system_name = "CRM"
heartbeat = "1s"
status_interval = "1s"

[queue]
batch_delay = "1ms"

[[entity]]
name = "Customer"
table = "customer"
{listeners}
"#
    )
}

#[test]
fn check_names_the_line_and_column_of_an_unknown_template_placeholder() {
    let toml = config(
        "postgres://walhook@127.0.0.1:1/app",
        r#"
[[listener]]
name = "legacy"
url = "http://127.0.0.1:9/hook"
format = "template"
template = '{"ChangeType": {action_code}, "Data": {"BaseId": "{BaseId}"}}'
"#,
    );
    let line = toml
        .lines()
        .position(|l| l.starts_with("template ="))
        .unwrap()
        + 1;
    let column = toml
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("{BaseId}")
        .unwrap()
        + 1;
    let (_dir, path) = write_config(&toml);
    let out = std::process::Command::new(walhook_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "walhook.toml:{line}:{column}: listener[0].template: unknown placeholder {{BaseId}} (a column is written {{row.BaseId}}); use one of {{id}}"
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listener_shows_the_exchange_with_secrets_masked_and_exits_nonzero_when_the_listener_fails()
 {
    let w = OAuthWorld::start().await;
    let block = format!(
        "{}headers = {{ \"X-Api-Key\" = \"{API_KEY}\" }}\nsecret = \"{SIGNING_SECRET}\"\n",
        w.block("crm", CLIENT_SECRET)
    );
    let dead = support::free_port();
    let toml = config(
        "postgres://walhook@127.0.0.1:1/app",
        &format!(
            "{block}\n[[listener]]\nname = \"down\"\nurl = \"http://127.0.0.1:{dead}/hook\"\n"
        ),
    );
    let (_dir, path) = write_config(&toml);
    let path = path.to_str().unwrap();
    let mut output = String::new();

    let (code, stdout, stderr) =
        walhook(&["test-listener", "crm", "--config", path], "trace").await;
    output.push_str(&stdout);
    output.push_str(&stderr);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let request = &w.listener.requests()[0];
    let token = bearer(request).expect("a bearer token was sent");
    assert_eq!(request.header("x-api-key"), Some(API_KEY));
    for shown in [
        "sending a sample event Customer.Created (id \"1\", event ".to_owned(),
        "authenticated with OAuth2 client credentials from".to_owned(),
        format!("POST {}", w.listener.url("/hook")),
        "authorization: Bearer ***".to_owned(),
        "x-api-key: ***".to_owned(),
        "content-type: application/cloudevents+json; charset=utf-8".to_owned(),
        "webhook-signature: v1,".to_owned(),
        "\"type\":\"Customer.Created\"".to_owned(),
        "HTTP 200 OK (".to_owned(),
        "delivered: the listener accepted the event".to_owned(),
    ] {
        assert!(stdout.contains(&shown), "{shown:?} missing from:\n{stdout}");
    }

    // The listener fails: the answer is shown and the exit code says so.
    w.listener
        .respond_with(|_, _| Reply::status(503).body("down for maintenance"));
    let (code, stdout, stderr) =
        walhook(&["test-listener", "crm", "--config", path], "trace").await;
    output.push_str(&stdout);
    output.push_str(&stderr);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("HTTP 503 Service Unavailable ("),
        "{stdout}"
    );
    assert!(stdout.contains("\ndown for maintenance\n"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "failed: HTTP 503 Service Unavailable from {}: down for maintenance (walhook would retry it)",
            w.listener.url("/hook")
        )),
        "{stdout}"
    );

    // Nobody listening.
    let (code, stdout, _) = walhook(&["test-listener", "down", "--config", path], "warn").await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("failed: connection refused by 127.0.0.1:{dead}")),
        "{stdout}"
    );

    // A name that is not configured.
    let (code, _, stderr) = walhook(&["test-listener", "nope", "--config", path], "warn").await;
    assert_eq!(code, 78);
    assert!(
        stderr.contains("no listener is named \"nope\"") && stderr.contains("crm, down"),
        "{stderr}"
    );

    let signing_key = SIGNING_SECRET.trim_start_matches("whsec_");
    for secret in [CLIENT_SECRET, API_KEY, signing_key, token.as_str()] {
        if let Some(line) = output.lines().find(|l| l.contains(secret)) {
            panic!("{secret} in test-listener output: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_event_sends_a_stored_event_again_as_a_new_notification_and_test_listener_sends_stored_ones()
 {
    let rx = Receiver::start().await;
    let mut q = QueueDb::new(&["crm"]).await;
    let mut e = support::entity_event(
        0x500,
        0,
        "Customer",
        "42",
        json!({"id": 42, "name": "Ada"}),
        &["name"],
    );
    e.action = Action::Updated;
    q.write(&[e]).await;
    let event_id: uuid::Uuid = q
        .client
        .query_one("SELECT event_id FROM walhook.event", &[])
        .await
        .unwrap()
        .get(0);
    let event = event_id.to_string();
    let toml = config(
        &q.db.url,
        &format!(
            "\n[[listener]]\nname = \"crm\"\nurl = \"{}\"\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n",
            rx.url("/hook")
        ),
    );
    let (_dir, path) = write_config(&toml);
    let path = path.to_str().unwrap();
    let run = |args: &'static [&'static str]| {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--config", path]);
        full
    };

    // test-listener sends the stored event, found by event id or by entity id.
    for by in [vec!["--event", event.as_str()], vec!["--id", "42"]] {
        let mut args = run(&["test-listener", "crm"]);
        args.extend(by);
        let (code, stdout, stderr) = walhook(&args, "warn").await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("sending the "), "{stdout}");
        assert_eq!(rx.requests().last().unwrap().json()["id"], event.as_str());
    }
    let mut args = run(&["test-listener", "crm"]);
    args.extend(["--id", "999"]);
    let (code, _, stderr) = walhook(&args, "warn").await;
    assert_eq!(code, 78);
    assert!(
        stderr.contains("no stored event of Customer \"999\""),
        "{stderr}"
    );
    // test-listener records nothing in the queue.
    assert_eq!(q.count("SELECT count(*) FROM walhook.new").await, 1);

    // Still waiting for its first delivery: nothing is added.
    let mut args = run(&["retry", "--listener", "crm"]);
    args.extend(["--event", event.as_str()]);
    let (code, stdout, _) = walhook(&args, "warn").await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("already waits for listener \"crm\" in walhook.new"),
        "{stdout}"
    );

    let d = q.dispatch(support::queue::listeners(&format!(
        "[[listener]]\nname = \"crm\"\nurl = \"{}\"\n",
        rx.url("/hook")
    )));
    q.wait_processed(1, Duration::from_secs(30)).await;

    // Delivered once; sent again on request, as a new notification, and delivered again.
    let (code, stdout, stderr) = walhook(&args, "warn").await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "queued event {event} (Customer.Updated \"42\") for listener \"crm\" as notification"
        )),
        "{stdout}"
    );
    q.wait_processed(2, Duration::from_secs(30)).await;
    d.stop().await;
    let rows = q
        .client
        .query(
            "SELECT p.id, e.event_id, p.attempts FROM walhook.processed p JOIN walhook.event e ON e.id = p.event_id ORDER BY p.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "history kept");
    assert_ne!(rows[0].get::<_, i64>(0), rows[1].get::<_, i64>(0));
    for r in &rows {
        assert_eq!(r.get::<_, uuid::Uuid>(1), event_id);
    }
    let deliveries: Vec<_> = rx
        .requests()
        .iter()
        .filter(|r| r.json()["id"] == event.as_str())
        .cloned()
        .collect();
    assert_eq!(deliveries.len(), 4, "two test sends, two deliveries");

    // Unknown events and missing listeners are refused.
    let mut args = run(&["retry", "--listener", "crm"]);
    let other = uuid::Uuid::new_v4().to_string();
    args.extend(["--event", other.as_str()]);
    let (code, stdout, _) = walhook(&args, "warn").await;
    assert_eq!(code, 1);
    assert!(stdout.contains("no stored event has id"), "{stdout}");
    let mut args = run(&["retry"]);
    args.extend(["--event", event.as_str()]);
    let (code, _, stderr) = walhook(&args, "warn").await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--listener"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_appears_in_any_log_line_at_trace_while_authenticated_listeners_are_served() {
    const DB_PASSWORD: &str = "db-pa55word-s3cret";
    const BASIC_PASSWORD: &str = "b4sic-pa55word-s3cret";
    const FILE_TOKEN: &str = "f1le-t0ken-s3cret-value";
    let db = TestDb::with_options(ClusterOptions {
        hba: Some(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all app 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ..Default::default()
    });
    db.execute(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE app LOGIN SUPERUSER PASSWORD '{DB_PASSWORD}';
         CREATE TABLE customer (id int PRIMARY KEY, name text);
         ALTER TABLE customer REPLICA IDENTITY FULL;"
    ))
    .await;
    let port = db
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap();
    let url = format!("postgres://app@127.0.0.1:{port}/{}", db.name);

    let w = OAuthWorld::start().await;
    let form = Receiver::start().await;
    let file = Receiver::start().await;
    let secrets_dir = tempfile::tempdir().unwrap();
    let token_file = secrets_dir.path().join("token");
    std::fs::write(&token_file, format!("{FILE_TOKEN}\n")).unwrap();
    // The form listener refuses its first request quoting the request's credentials, as
    // some error pages do; the comment kept in walhook.failed must not repeat them.
    form.respond_with(|r, n| {
        if n == 0 {
            Reply::status(400).body(&format!(
                "refused: {}",
                r.header("authorization").unwrap_or("-")
            ))
        } else {
            Reply::status(200)
        }
    });
    let listeners = format!(
        r#"{oauth}format = "template"
template = '{{"ChangeType": {{action_code}}, "Data": {{"BaseId": "{{id}}"}}}}'
batch_size = 5
headers = {{ "X-Api-Key" = "{API_KEY}" }}
secret = "{SIGNING_SECRET}"
backoff = {{ initial = "100ms", max = "500ms" }}

[[listener]]
name = "form"
url = "{form_url}"
format = "form"
auth = {{ basic = {{ user = "walhook", password = "${{BASIC_PASSWORD}}" }} }}
backoff = {{ initial = "100ms", max = "500ms" }}

[[listener]]
name = "file"
url = "{file_url}"
auth = {{ bearer_file = "{token_file}" }}
"#,
        oauth = w.block("crm", CLIENT_SECRET),
        form_url = form.url("/form"),
        file_url = file.url("/file"),
        token_file = token_file.display(),
    );
    let toml = config(&url, &listeners).replace(
        "system_name = \"CRM\"",
        "system_name = \"CRM\"\npassword = \"${WALHOOK_DB_PASSWORD}\"",
    );
    let daemon = Daemon::start_with(&toml, "text", |cmd| {
        cmd.env("WALHOOK_LOG", "trace")
            .env("WALHOOK_DB_PASSWORD", DB_PASSWORD)
            .env("BASIC_PASSWORD", BASIC_PASSWORD);
    });
    let c = db.client().await;
    support::wait_streaming(&c).await;
    c.batch_execute("INSERT INTO customer SELECT g, 'n' || g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the first ten delivered",
        || async {
            (w.listener.count() >= 2 && form.count() >= 10 && file.count() >= 10).then_some(())
        },
    )
    .await;
    // The listener revokes the token in use: walhook renews it once and goes on.
    let revoked = w.last_token();
    w.revoked.lock().unwrap().insert(revoked.clone());
    c.batch_execute("UPDATE customer SET name = 'x' || id")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "every notification delivered",
        || async {
            let n: i64 = c
                .query_one("SELECT count(*) FROM walhook.processed", &[])
                .await
                .ok()?
                .get(0);
            (n == 59).then_some(())
        },
    )
    .await;
    assert!(w.idp.count() >= 2, "a new token after the 401");
    let tokens: Vec<String> = w.issued.lock().unwrap().keys().cloned().collect();

    // The credentials really were sent: the checks below can fail.
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("walhook:{BASIC_PASSWORD}"));
    assert_eq!(
        form.requests()[0].header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(bearer(&file.requests()[0]).as_deref(), Some(FILE_TOKEN));
    // Batches of up to 5 (how capture split the ten inserts decides their sizes; under load
    // it may write a transaction's first events before the rest).
    let sizes: Vec<usize> = w
        .listener
        .requests()
        .iter()
        .map(|r| r.json().as_array().map_or(0, Vec::len))
        .collect();
    assert!(
        sizes.iter().all(|n| (1..=5).contains(n)) && sizes.iter().any(|&n| n > 1),
        "{sizes:?}"
    );
    assert_eq!(
        c.query_one("SELECT count(*) FROM walhook.failed", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );

    let log = daemon.log();
    assert!(log.lines().count() > 100, "trace logging is on");
    let signing_key = SIGNING_SECRET.trim_start_matches("whsec_").to_owned();
    let mut secrets = vec![
        DB_PASSWORD.to_owned(),
        BASIC_PASSWORD.to_owned(),
        basic,
        FILE_TOKEN.to_owned(),
        CLIENT_SECRET.to_owned(),
        API_KEY.to_owned(),
        signing_key,
    ];
    secrets.extend(tokens.iter().map(|t| format!("Bearer {t}")));
    secrets.extend(tokens.iter().map(|t| format!("\"{t}\"")));
    let comments: String = c
        .query("SELECT coalesce(comment, '') FROM walhook.failed", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{}\n", r.get::<_, String>(0)))
        .collect();
    assert!(comments.contains("refused: Basic ***"), "{comments}");
    for secret in &secrets {
        for (place, text) in [("log", &log), ("comment", &comments)] {
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                panic!("{secret} in a {place}: {line}");
            }
        }
    }
}

#[tokio::test]
async fn check_warns_about_template_columns_no_entity_sends() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text, secret text)")
        .await;
    let toml = config(
        &db.url,
        r#"exclude = ["secret"]

[[listener]]
name = "legacy"
url = "http://127.0.0.1:9/hook"
format = "template"
template = '{"Id": "{id}", "Name": {row.name}, "Typo": "{row.nmae}", "Hidden": {old.secret}}'

[[listener]]
name = "fine"
url = "http://127.0.0.1:9/hook"
format = "template"
template = '{"Id": "{id}", "Name": {row.name}}'
"#,
    );
    let (_dir, path) = write_config(&toml);
    let (_, stdout, stderr) = walhook(&["check", "--config", path.to_str().unwrap()], "warn").await;
    let line = stdout
        .lines()
        .find(|l| l.contains("template legacy"))
        .unwrap_or_else(|| panic!("no template line:\n{stdout}{stderr}"));
    assert!(line.starts_with("WARN") || line.contains("warn"), "{line}");
    assert!(line.contains("nmae, secret"), "{line}");
    assert!(!line.contains("name,"), "{line}");
    assert!(stdout.contains("the columns are: id, name"), "{stdout}");
    let fine = stdout
        .lines()
        .find(|l| l.contains("template fine"))
        .unwrap();
    assert!(fine.to_lowercase().starts_with("ok"), "{fine}");
}

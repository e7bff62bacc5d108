//! Operating walhook: metrics and readiness, log lines, and the demo.

mod support;

use std::time::Duration;

use support::receiver::Receiver;
use support::{
    CUSTOMER_ENTITY, Daemon, TestDb, config_toml, eventually, free_port, listener_toml, walhook_bin,
};

fn config(db: &TestDb, admin_port: u16, hook: &str) -> String {
    let blocks = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{CUSTOMER_ENTITY}{}",
        listener_toml("crm", hook)
    );
    config_toml(&db.url, &blocks)
}

/// `walhook run` logging JSON lines.
fn start_json(toml: &str) -> Daemon {
    Daemon::start_with(toml, "json", |_| {})
}

async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_events_and_readiness_follows_the_database() {
    let mut db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let hook = Receiver::start().await;
    let port = free_port();
    let daemon = start_json(&config(&db, port, &hook.url("/h")));
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(60), "/readyz 200", || async {
        (get(&format!("{base}/readyz")).await?.0 == 200).then_some(())
    })
    .await;
    assert_eq!(
        get(&format!("{base}/healthz")).await.map(|r| r.0),
        Some(200)
    );

    let c = db.client().await;
    c.execute(
        "INSERT INTO customer SELECT g, 'n' FROM generate_series(1, 25) g",
        &[],
    )
    .await
    .unwrap();
    hook.wait_for_count(25, Duration::from_secs(60), "25 deliveries")
        .await;
    let text = eventually(Duration::from_secs(30), "delivery counters", || async {
        let (_, text) = get(&format!("{base}/metrics")).await?;
        (sample(
            &text,
            "walhook_delivery_attempts_total",
            &[("listener", "crm"), ("outcome", "success")],
        ) >= 25.0)
            .then_some(text)
    })
    .await;
    assert!(
        sample(&text, "walhook_events_read_total", &[]) >= 25.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "walhook_events_queued_total",
            &[("entity", "Customer"), ("action", "Created")]
        ) >= 25.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "walhook_notifications_total",
            &[("listener", "crm"), ("status", "processed")]
        ) >= 25.0
    );
    assert_eq!(sample(&text, "walhook_streaming", &[]), 1.0);

    // The database stops: not ready. It comes back: ready again.
    db.cluster().stop_server("fast").unwrap();
    eventually(Duration::from_secs(60), "/readyz 503", || async {
        (get(&format!("{base}/readyz")).await?.0 == 503).then_some(())
    })
    .await;
    db.cluster().start_server().unwrap();
    eventually(Duration::from_secs(90), "/readyz 200 again", || async {
        (get(&format!("{base}/readyz")).await?.0 == 200).then_some(())
    })
    .await;

    // Logs: JSON lines only, and no info line per event.
    let log = daemon.log();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    let info_lines = log.lines().filter(|l| l.contains("\"INFO\"")).count();
    assert!(
        info_lines < 25,
        "{info_lines} info lines for 25 events:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_admin_port_does_not_stop_capture_or_delivery() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let hook = Receiver::start().await;
    // Something else (say, an exporter) already holds the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut daemon = Daemon::start(&config(&db, port, &hook.url("/h")));
    let c = db.client().await;
    support::wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (1, 'one')", &[])
        .await
        .unwrap();
    hook.wait_for_count(1, Duration::from_secs(60), "the delivery")
        .await;
    assert!(daemon.running(), "walhook stopped:\n{}", daemon.log());
    let log = daemon.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "cannot listen on 127.0.0.1:{port} for [admin]: address in use"
            ))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
    assert!(warnings[0].contains("tries again every 30s"), "{log}");
    drop(taken);
}

#[test]
fn demo_prints_delivered_events_and_exits_cleanly() {
    let out = std::process::Command::new(walhook_bin())
        .args(["demo", "--duration", "20s"])
        .env("WALHOOK_LOG", "warn")
        .output()
        .expect("run walhook demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("delivered to demo-receiver: Customer.Created"),
        "{stdout}"
    );
    assert!(stdout.contains("Customer.Updated"), "{stdout}");
    assert!(stdout.contains("removing the demo cluster"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_listener_raises_one_alert_per_episode_and_one_recovery() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let hook = Receiver::start().await;
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let down = down.clone();
        hook.respond_with(move |_, _| {
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                support::receiver::Reply::status(503).body("maintenance")
            } else {
                support::receiver::Reply::status(200)
            }
        });
    }
    let alerts = Receiver::start().await;
    let toml = format!(
        r#"{}
[[monitor]]
name = "ops"
url = "{}"
listener_failing_for = "1s"
min_interval = "1s"
on = ["listener_failing"]
"#,
        config(&db, free_port(), &hook.url("/h")),
        alerts.url("/alerts")
    );
    let _daemon = start_json(&toml);
    let c = db.client().await;
    support::wait_streaming(&c).await;
    c.execute(
        "INSERT INTO customer SELECT g, 'n' FROM generate_series(1, 5) g",
        &[],
    )
    .await
    .unwrap();
    let failing = eventually(
        Duration::from_secs(60),
        "a ListenerFailing alert",
        || async {
            alerts
                .requests()
                .into_iter()
                .find(|r| r.json()["type"] == "walhook.alert.ListenerFailing")
        },
    )
    .await;
    let text = failing.json().to_string();
    assert!(text.contains("crm"), "{text}");
    assert!(
        text.contains("503"),
        "the last error is in the alert: {text}"
    );
    // The episode goes on for a while: still one alert.
    tokio::time::sleep(Duration::from_secs(3)).await;
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(
        Duration::from_secs(60),
        "a ListenerRecovered alert",
        || async {
            alerts
                .requests()
                .iter()
                .any(|r| r.json()["type"] == "walhook.alert.ListenerRecovered")
                .then_some(())
        },
    )
    .await;
    let types: Vec<String> = alerts
        .requests()
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "walhook.alert.ListenerFailing",
            "walhook.alert.ListenerRecovered"
        ],
        "exactly one alert per episode and one recovery"
    );
}

/// Runs `walhook run` for a database nobody listens on (so it warns about reconnecting)
/// with stderr in a file and `env` applied, stops it with SIGTERM once it warned (info
/// lines) and returns the log.
fn log_of_an_unreachable_database(
    env: impl FnOnce(&std::path::Path) -> Vec<(String, String)>,
) -> String {
    let toml = config_toml("postgres://walhook@127.0.0.1:1/app", CUSTOMER_ENTITY);
    let (dir, path) = support::write_config(&toml);
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(walhook_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("WALHOOK_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .envs(env(&log))
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reconnecting in")
    {
        assert!(std::time::Instant::now() < deadline, "no warning");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn under_systemd_a_warning_line_carries_the_journal_warning_priority() {
    use std::os::unix::fs::MetadataExt;
    // systemd sets JOURNAL_STREAM to "device:inode" of the stream it gave as stderr.
    let log = log_of_an_unreachable_database(|log| {
        let meta = std::fs::metadata(log).unwrap();
        vec![(
            "JOURNAL_STREAM".into(),
            format!("{}:{}", meta.dev(), meta.ino()),
        )]
    });
    let warning = log.lines().find(|l| l.contains("reconnecting in")).unwrap();
    // journald reads "<4>" as PRIORITY=4 (warning), which `journalctl -p warning` keeps.
    assert!(warning.starts_with("<4>"), "{warning}");
    assert!(warning.contains("WARN"), "readable text: {warning}");
    for line in log.lines() {
        let (prefix, text) = line.split_at(3);
        assert!(
            matches!(prefix, "<3>" | "<4>" | "<6>" | "<7>"),
            "every line has a priority: {line:?}"
        );
        assert!(
            !text.trim_start().starts_with('{'),
            "text, not JSON: {line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "no colours in the journal: {line:?}"
        );
        // The journal stamps entries itself: the line starts with the level.
        let level = text.split_whitespace().next().unwrap_or_default();
        assert!(
            matches!(level, "ERROR" | "WARN" | "INFO" | "DEBUG"),
            "{line}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6>") && l.contains("INFO")),
        "{log}"
    );
}

#[test]
fn an_inherited_journal_stream_that_is_not_stderr_changes_nothing() {
    // A child whose stderr was redirected still inherits JOURNAL_STREAM; it must not count.
    let log = log_of_an_unreachable_database(|log| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(log).unwrap();
        vec![(
            "JOURNAL_STREAM".into(),
            format!("{}:{}", meta.dev(), meta.ino() + 1),
        )]
    });
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_failed_notifications_the_first_delivery_sends_one_recovery_with_the_failed_count() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let hook = Receiver::start().await;
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let down = down.clone();
        // 404 is final: each notification fails at its first attempt.
        hook.respond_with(move |_, _| {
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                support::receiver::Reply::status(404).body("no such hook")
            } else {
                support::receiver::Reply::status(200)
            }
        });
    }
    let alerts = Receiver::start().await;
    let port = free_port();
    // min_interval 10s: the failures are gathered into one alert (5 s).
    let toml = format!(
        r#"{}
[[monitor]]
name = "ops"
url = "{}"
min_interval = "10s"
on = ["notification_failed"]
"#,
        config(&db, port, &hook.url("/h")),
        alerts.url("/alerts")
    );
    let daemon = start_json(&toml);
    let c = db.client().await;
    support::wait_streaming(&c).await;
    c.execute(
        "INSERT INTO customer SELECT g, 'n' FROM generate_series(1, 3) g",
        &[],
    )
    .await
    .unwrap();
    let failed = eventually(
        Duration::from_secs(60),
        "a NotificationFailed alert",
        || async {
            alerts
                .requests()
                .into_iter()
                .find(|r| r.json()["type"] == "walhook.alert.NotificationFailed")
        },
    )
    .await;
    assert_eq!(failed.json()["data"]["count"], 3, "{}", failed.json());
    // The failed gauge counts walhook.failed.
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    eventually(
        Duration::from_secs(30),
        "walhook_failed_notifications 3",
        || async {
            let (_, text) = get(&metrics).await?;
            (sample(
                &text,
                "walhook_failed_notifications",
                &[("listener", "crm")],
            ) == 3.0)
                .then_some(())
        },
    )
    .await;

    down.store(false, std::sync::atomic::Ordering::SeqCst);
    c.execute("INSERT INTO customer VALUES (4, 'n')", &[])
        .await
        .unwrap();
    let recovered = eventually(Duration::from_secs(60), "a recovery message", || async {
        alerts
            .requests()
            .into_iter()
            .find(|r| r.json()["type"] == "walhook.alert.NotificationFailedRecovered")
    })
    .await;
    let data = &recovered.json()["data"];
    assert_eq!(data["listener"], "crm");
    assert_eq!(data["count"], 3, "{data}");
    let summary = data["summary"].as_str().unwrap();
    assert!(
        summary.contains(
            "listener crm accepts deliveries again; 3 notifications remain in walhook.failed"
        ),
        "{summary}"
    );
    let command = format!(
        "walhook retry --listener crm --all --config {}",
        daemon.config.display()
    );
    assert_eq!(data["command"], command.as_str());
    assert!(
        data["detail"].as_str().unwrap().contains(&command),
        "{data}"
    );

    // Later deliveries say nothing more.
    c.execute("INSERT INTO customer VALUES (5, 'n')", &[])
        .await
        .unwrap();
    hook.wait_for_count(5, Duration::from_secs(30), "5 requests")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let types: Vec<String> = alerts
        .requests()
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "walhook.alert.NotificationFailed",
            "walhook.alert.NotificationFailedRecovered"
        ],
        "one failure alert, then one recovery"
    );
}

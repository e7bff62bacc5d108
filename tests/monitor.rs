//! Monitors end to end: signals in, alerts out at a real HTTP receiver and a tiny SMTP sink.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::eventually;
use support::receiver::{Received, Receiver, Reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use walhook::config::{Config, MonitorConfig};
use walhook::monitor::{MonitorHandle, Monitors};

const CONFIG_PATH: &str = "/etc/walhook/walhook.toml";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The `[[monitor]]` named ops with these extra lines, parsed like a real file.
fn monitors(lines: &str) -> Vec<MonitorConfig> {
    let text = format!(
        "[source]\nurl = \"postgres://walhook@localhost/app\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n[[monitor]]\nname = \"ops\"\n{lines}"
    );
    Config::parse_with_env(&text, Path::new(CONFIG_PATH), &|_| None)
        .unwrap_or_else(|e| panic!("{e}"))
        .monitors
}

fn spawn(configs: Vec<MonitorConfig>) -> (MonitorHandle, CancellationToken) {
    let shutdown = CancellationToken::new();
    let handle = Monitors::spawn(configs, "CRM".into(), CONFIG_PATH.into(), shutdown.clone());
    (handle, shutdown)
}

/// Reports a failed attempt to `listener` every 100 ms for `span`.
async fn keep_failing(handle: &MonitorHandle, listener: &str, error: &str, span: Duration) {
    let end = tokio::time::Instant::now() + span;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    while tokio::time::Instant::now() < end {
        every.tick().await;
        handle.delivery_failed_attempt(listener, error);
    }
}

async fn wait_for(receiver: &Receiver, n: usize) -> Vec<Received> {
    eventually(
        Duration::from_secs(10),
        &format!("{n} alert(s)"),
        || async {
            let r = receiver.requests();
            (r.len() >= n).then_some(r)
        },
    )
    .await
}

fn types(requests: &[Received]) -> Vec<String> {
    requests
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn failing_listener_gives_one_signed_alert_per_episode_and_one_recovery() {
    let receiver = Receiver::start().await;
    let (handle, shutdown) = spawn(monitors(&format!(
        "url = \"{}\"\nsecret = \"{SECRET}\"\nheaders = {{ \"X-Team\" = \"dba\" }}\nlistener_failing_for = \"1s\"\nmin_interval = \"0s\"\n",
        receiver.url("/alerts")
    )));

    // 2.5 s of failures: one episode, longer than the 1 s threshold.
    keep_failing(
        &handle,
        "crm",
        "HTTP 503 from http://crm.test/hook",
        Duration::from_millis(2500),
    )
    .await;
    let first = wait_for(&receiver, 1).await;
    let alert = &first[0];
    let ce = alert.json();
    assert_eq!(ce["type"], "walhook.alert.ListenerFailing");
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["data"]["listener"], "crm");
    assert_eq!(
        ce["data"]["lastError"],
        "HTTP 503 from http://crm.test/hook"
    );
    assert_eq!(
        ce["data"]["command"],
        format!("walhook status --config {CONFIG_PATH}")
    );
    assert!(
        ce["data"]["detail"].as_str().unwrap().contains(&format!(
            "walhook failed --listener crm --config {CONFIG_PATH}"
        )),
        "{ce}"
    );
    assert_eq!(
        alert.header("content-type"),
        Some("application/cloudevents+json")
    );
    assert_eq!(alert.header("x-team"), Some("dba"));
    let id = alert.header("webhook-id").unwrap();
    let ts: i64 = alert.header("webhook-timestamp").unwrap().parse().unwrap();
    let key = walhook::delivery::signature::SigningKey::parse(SECRET).unwrap();
    assert_eq!(
        alert.header("webhook-signature"),
        Some(walhook::delivery::signature::sign(&key, id, ts, &alert.body).as_str())
    );

    // Still failing: no second alert for the same episode.
    keep_failing(
        &handle,
        "crm",
        "HTTP 503 again",
        Duration::from_millis(1500),
    )
    .await;
    handle.delivery_succeeded("crm");
    handle.delivery_succeeded("crm");
    let after = wait_for(&receiver, 2).await;
    assert_eq!(after[1].json()["type"], "walhook.alert.ListenerRecovered");
    assert_eq!(after[1].json()["data"]["listener"], "crm");

    // A new episode is a new alert.
    keep_failing(
        &handle,
        "crm",
        "connection refused",
        Duration::from_millis(1600),
    )
    .await;
    let all = wait_for(&receiver, 3).await;
    assert_eq!(
        types(&all),
        [
            "walhook.alert.ListenerFailing",
            "walhook.alert.ListenerRecovered",
            "walhook.alert.ListenerFailing"
        ]
    );
    assert_eq!(all[2].json()["data"]["lastError"], "connection refused");
    shutdown.cancel();
}

#[tokio::test]
async fn a_burst_of_failed_notifications_gives_one_alert_and_the_next_waits_for_min_interval() {
    let receiver = Receiver::start().await;
    let (handle, shutdown) = spawn(monitors(&format!(
        "url = \"{}\"\non = [\"notification_failed\"]\nmin_interval = \"2s\"\n",
        receiver.url("/alerts")
    )));
    for i in 0..20 {
        handle.notification_failed(
            "crm",
            i,
            "Customer",
            &i.to_string(),
            "HTTP 404 from http://crm.test/hook (the last of 12 attempts)",
        );
    }
    let first = wait_for(&receiver, 1).await;
    let data = &first[0].json()["data"];
    assert_eq!(first[0].json()["type"], "walhook.alert.NotificationFailed");
    assert_eq!(data["count"], 20);
    assert_eq!(
        data["command"],
        format!("walhook failed --listener crm --config {CONFIG_PATH}")
    );
    assert!(
        data["summary"]
            .as_str()
            .unwrap()
            .contains("20 notifications to listener crm failed")
    );

    // One more failure right after the alert is held back until min_interval has passed.
    handle.notification_failed("crm", 21, "Customer", "21", "HTTP 404");
    let both = wait_for(&receiver, 2).await;
    assert_eq!(both[1].json()["data"]["count"], 1);
    let gap = both[1].at.duration_since(both[0].at);
    assert!(
        gap >= Duration::from_millis(1800),
        "second alert after {gap:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn lag_above_threshold_for_lag_for_alerts_once_then_recovers() {
    let receiver = Receiver::start().await;
    let (handle, shutdown) = spawn(monitors(&format!(
        "url = \"{}\"\nlag_bytes = 1000\nlag_for = \"1s\"\nmin_interval = \"0s\"\n",
        receiver.url("/alerts")
    )));
    let mut every = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..25 {
        every.tick().await;
        handle.gauges(Some(5000), vec![]);
    }
    handle.gauges(Some(10), vec![]);
    let all = wait_for(&receiver, 2).await;
    assert_eq!(
        types(&all),
        [
            "walhook.alert.ReplicationLag",
            "walhook.alert.ReplicationLagRecovered"
        ]
    );
    assert!(
        all[0].json()["data"]["summary"]
            .as_str()
            .unwrap()
            .contains("4.9 KiB"),
        "{}",
        all[0].json()
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_failing_alert_receiver_gets_quick_retries() {
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(503), Reply::status(500)]);
    let (handle, shutdown) = spawn(monitors(&format!(
        "url = \"{}\"\non = [\"database_unreachable\"]\ndatabase_unreachable_for = \"0s\"\n",
        receiver.url("/alerts")
    )));
    handle.database_unreachable("connection refused");
    let all = wait_for(&receiver, 3).await;
    assert!(
        all.iter()
            .all(|r| r.json()["type"] == "walhook.alert.DatabaseUnreachable")
    );
    assert_eq!(
        all[0].json()["id"],
        all[2].json()["id"],
        "retries resend the same event"
    );
    assert_eq!(all[2].json()["data"]["lastError"], "connection refused");
    shutdown.cancel();
}

/// What the SMTP sink received.
#[derive(Default, Debug)]
struct Mail {
    from: String,
    to: Vec<String>,
    data: String,
}

/// A tiny SMTP server: answers just enough of the protocol and records each message.
async fn smtp_sink() -> (u16, Arc<Mutex<Vec<Mail>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
    let store = mails.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut mail = Mail::default();
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        b"250 sink\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        mail.from = line[10..].trim().to_owned();
                        b"250 OK\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        mail.to.push(line[8..].trim().to_owned());
                        b"250 OK\r\n"
                    } else if upper == "DATA" {
                        write.write_all(b"354 go ahead\r\n").await.unwrap();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            mail.data.push_str(&l);
                            mail.data.push('\n');
                        }
                        store.lock().unwrap().push(std::mem::take(&mut mail));
                        b"250 queued\r\n"
                    } else if upper == "QUIT" {
                        write.write_all(b"221 bye\r\n").await.unwrap();
                        break;
                    } else {
                        b"250 OK\r\n"
                    };
                    write.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, mails)
}

/// A header's value with folded continuation lines joined.
fn header(data: &str, name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in data.lines() {
        if line.is_empty() {
            break;
        }
        if let Some(v) = &mut value {
            if line.starts_with([' ', '\t']) {
                v.push_str(line);
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case(name)
        {
            value = Some(v.trim_start().to_owned());
        }
    }
    value
}

#[tokio::test]
async fn email_alert_reaches_the_smtp_server_with_the_summary_as_subject() {
    let (port, mails) = smtp_sink().await;
    let (handle, shutdown) = spawn(monitors(&format!(
        "smtp_url = \"smtp://127.0.0.1:{port}\"\nfrom = \"walhook <walhook@example.com>\"\nto = [\"dba@example.com\", \"oncall@example.com\"]\nlistener_failing_for = \"1s\"\n"
    )));
    keep_failing(&handle, "crm", "HTTP 503", Duration::from_millis(1500)).await;
    let mail = eventually(Duration::from_secs(10), "an email", || async {
        mails.lock().unwrap().pop()
    })
    .await;
    assert_eq!(mail.from, "<walhook@example.com>");
    assert_eq!(mail.to, ["<dba@example.com>", "<oncall@example.com>"]);
    let subject = header(&mail.data, "Subject").unwrap();
    assert!(
        subject.starts_with("walhook CRM: listener crm has been failing for"),
        "{subject}"
    );
    let body = mail.data.replace("=\n", "");
    assert!(body.contains("Last error: HTTP 503"), "{body}");
    assert!(
        body.contains(&format!("To look: walhook status --config {CONFIG_PATH}")),
        "{body}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn reload_keeps_an_open_episode_so_recovery_is_still_sent() {
    let receiver = Receiver::start().await;
    let lines = format!(
        "url = \"{}\"\nlistener_failing_for = \"1s\"\nmin_interval = \"0s\"\n",
        receiver.url("/alerts")
    );
    let (handle, shutdown) = spawn(monitors(&lines));
    keep_failing(&handle, "crm", "HTTP 503", Duration::from_millis(1500)).await;
    wait_for(&receiver, 1).await;
    handle.reload(monitors(&lines));
    handle.delivery_succeeded("crm");
    let all = wait_for(&receiver, 2).await;
    assert_eq!(
        types(&all),
        [
            "walhook.alert.ListenerFailing",
            "walhook.alert.ListenerRecovered"
        ]
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_monitor_webhook_behind_an_internal_ca_is_reached_with_its_ca_file() {
    let (ca_pem, cert, key) = support::receiver::test_ca();
    let receiver = Receiver::start_tls(vec![cert], key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("internal-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let (handle, shutdown) = spawn(monitors(&format!(
        "url = \"{}\"\nca_file = \"{}\"\nlistener_failing_for = \"1s\"\nmin_interval = \"0s\"\non = [\"listener_failing\"]\n",
        receiver.url("/alerts"),
        ca.display()
    )));
    keep_failing(&handle, "crm", "HTTP 503", Duration::from_millis(2500)).await;
    let alerts = wait_for(&receiver, 1).await;
    assert_eq!(types(&alerts)[0], "walhook.alert.ListenerFailing");
    shutdown.cancel();
}

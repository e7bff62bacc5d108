//! The HTTP sink against a real receiver on 127.0.0.1, fed by the CloudEvents format as
//! the dispatcher does: payload, headers, signature and the retry policy's verdicts with
//! the comments a DBA reads.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderName, HeaderValue};
use serde_json::json;
use sha2::Sha256;
use support::receiver::{Receiver, Reply};
use uuid::Uuid;
use walhook::config::{
    Backoff, CloudEventsMode, Config, ListenerConfig, ListenerFormat, SecretUrl, SigningKey,
};
use walhook::delivery::format::Format;
use walhook::delivery::sink::HttpSink;
use walhook::delivery::{Attempt, Verdict};
use walhook::queue::{Notification, StoredEvent};
use walhook::types::{Action, Lsn};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const API_KEY: &str = "key-0f8a7d6c5b4a";

fn listener(url: String) -> ListenerConfig {
    ListenerConfig {
        name: "crm-hook".into(),
        url: secret_url(&url),
        entities: None,
        actions: Action::ALL.to_vec(),
        derived_actions: Vec::new(),
        headers: vec![
            (
                HeaderName::from_static("x-api-key"),
                HeaderValue::from_static(API_KEY),
            ),
            (
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("north"),
            ),
        ],
        secret: None,
        ca_file: None,
        timeout: Duration::from_secs(5),
        rate_limit: None,
        max_attempts: 12,
        backoff: Backoff {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(3600),
        },
        concurrency: 16,
        debounce: None,
        format: ListenerFormat::CloudEvents(CloudEventsMode::Structured),
        filter: None,
        nats: None,
        batch_size: 1,
        batch_bytes: 1 << 20,
        auth: None,
        event_types: Default::default(),
    }
}

fn secret_url(url: &str) -> SecretUrl {
    SecretUrl::new(url.parse().unwrap())
}

fn key() -> SigningKey {
    SigningKey::parse(SECRET).unwrap()
}

fn notification() -> Notification {
    Notification {
        id: 7,
        attempts: 0,
        event: StoredEvent {
            event_id: Uuid::parse_str("6f1c1e5a-0000-5000-8000-000000000042").unwrap(),
            commit_lsn: Lsn(0x16_B374_D848),
            seq: 1,
            commit_time: UNIX_EPOCH + Duration::from_micros(1_714_566_896_000_001),
            entity: "Customer".into(),
            entity_id: "42".into(),
            action: Action::Updated,
            derived: None,
            changed_fields: Some(vec!["city".into()]),
            row: json!({"id": 42, "city": "Paris"}),
            old: Some(json!({"id": 42, "city": "London"})),
            subject: Some("/customers/42".into()),
            source_table: "public.customer".into(),
        },
    }
}

/// Renders the sample notification in `sink`'s listener format and sends it, as the
/// dispatcher does.
async fn deliver(l: &ListenerConfig, sink: &HttpSink) -> Attempt {
    let format = Format::for_listener(l, "CRM");
    sink.send(format.render(&notification().event)).await
}

async fn send_once(
    reply: Reply,
    configure: impl FnOnce(&mut ListenerConfig),
) -> (Receiver, Attempt) {
    let rx = Receiver::start().await;
    rx.script([reply]);
    let mut l = listener(rx.url("/hook"));
    configure(&mut l);
    let sink = HttpSink::new(&l).unwrap();
    let attempt = deliver(&l, &sink).await;
    (rx, attempt)
}

#[tokio::test]
async fn delivered_cloudevent_carries_every_field_and_configured_header() {
    let (rx, attempt) = send_once(Reply::status(200), |_| {}).await;
    assert_eq!(attempt.verdict(), Verdict::Delivered);
    assert_eq!(attempt.status_code, Some(200));
    assert_eq!(attempt.comment, None);

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(
        r.header("content-type"),
        Some("application/cloudevents+json; charset=utf-8")
    );
    assert_eq!(r.header("x-api-key"), Some(API_KEY));
    assert_eq!(r.header("x-tenant"), Some("north"));
    assert!(r.header("user-agent").unwrap().starts_with("walhook/"));
    assert_eq!(
        r.header("webhook-signature"),
        None,
        "no secret, no signature"
    );

    let ce = r.json();
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["id"], "6f1c1e5a-0000-5000-8000-000000000042");
    assert_eq!(ce["source"], "/walhook/CRM/public.customer");
    assert_eq!(ce["type"], "Customer.Updated");
    assert_eq!(ce["subject"], "/customers/42");
    assert_eq!(ce["time"], "2024-05-01T12:34:56.000001Z");
    assert_eq!(ce["datacontenttype"], "application/json");
    assert_eq!(ce["entity"], "Customer");
    assert_eq!(ce["entityid"], "42");
    assert_eq!(ce["commitlsn"], "16/B374D848");
    assert_eq!(ce["sequence"], "00000016B374D848-0000000001");
    assert_eq!(
        ce["data"],
        json!({
            "entity": "Customer",
            "entityId": "42",
            "action": "Updated",
            "changedFields": ["city"],
            "row": {"id": 42, "city": "Paris"},
            "old": {"id": 42, "city": "London"},
        })
    );
}

#[tokio::test]
async fn binary_mode_sends_data_as_the_body_and_attributes_as_ce_headers() {
    let (rx, attempt) = send_once(Reply::status(200), |l| {
        l.format = ListenerFormat::CloudEvents(CloudEventsMode::Binary);
        l.secret = Some(key());
    })
    .await;
    assert_eq!(attempt.verdict(), Verdict::Delivered);
    let r = &rx.requests()[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("ce-specversion"), Some("1.0"));
    assert_eq!(
        r.header("ce-id"),
        Some("6f1c1e5a-0000-5000-8000-000000000042")
    );
    assert_eq!(r.header("ce-source"), Some("/walhook/CRM/public.customer"));
    assert_eq!(r.header("ce-type"), Some("Customer.Updated"));
    assert_eq!(r.header("ce-subject"), Some("/customers/42"));
    assert_eq!(r.header("ce-time"), Some("2024-05-01T12:34:56.000001Z"));
    assert_eq!(r.header("ce-entity"), Some("Customer"));
    assert_eq!(r.header("ce-entityid"), Some("42"));
    assert_eq!(r.header("ce-commitlsn"), Some("16/B374D848"));
    assert_eq!(r.header("ce-sequence"), Some("00000016B374D848-0000000001"));
    assert_eq!(r.header("x-api-key"), Some(API_KEY));
    assert_eq!(
        r.json(),
        json!({
            "entity": "Customer",
            "entityId": "42",
            "action": "Updated",
            "changedFields": ["city"],
            "row": {"id": 42, "city": "Paris"},
            "old": {"id": 42, "city": "London"},
        })
    );
    // The signature covers the body that was sent: the data.
    let (id, ts, sig) = (
        r.header("webhook-id").unwrap(),
        r.header("webhook-timestamp").unwrap(),
        r.header("webhook-signature").unwrap(),
    );
    assert_eq!(id, "6f1c1e5a-0000-5000-8000-000000000042");
    assert!(verify(SECRET, id, ts, &r.body, sig));
}

#[tokio::test]
async fn a_configured_content_type_header_wins_over_the_formats() {
    let (rx, _) = send_once(Reply::status(200), |l| {
        l.headers.push((
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("application/json"),
        ));
    })
    .await;
    let r = &rx.requests()[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["specversion"], "1.0");
}

#[tokio::test]
async fn server_error_is_retried_with_status_and_folded_body_in_the_comment() {
    let body = "database is\nrestarting\r\n  please retry";
    let (rx, attempt) = send_once(Reply::status(503).body(body), |_| {}).await;
    assert_eq!(attempt.verdict(), Verdict::Retry);
    assert_eq!(attempt.status_code, Some(503));
    assert_eq!(
        attempt.comment.as_deref(),
        Some(
            format!(
                "HTTP 503 Service Unavailable from {}: database is restarting please retry",
                rx.url("/hook")
            )
            .as_str()
        )
    );
    assert_eq!(attempt.retry_after, None);
}

#[tokio::test]
async fn long_error_bodies_are_quoted_up_to_200_bytes() {
    let body = "x".repeat(100_000);
    let (_rx, attempt) = send_once(Reply::status(500).body(&body), |_| {}).await;
    let comment = attempt.comment.unwrap();
    let quoted = comment.rsplit(": ").next().unwrap();
    assert_eq!(quoted.len(), 200);
}

#[tokio::test]
async fn client_error_fails_for_good() {
    let (_rx, attempt) = send_once(Reply::status(400).body("bad entity"), |_| {}).await;
    assert_eq!(attempt.verdict(), Verdict::Fail);
    assert_eq!(attempt.status_code, Some(400));
    let comment = attempt.comment.unwrap();
    assert!(
        comment.starts_with("HTTP 400 Bad Request from http://127.0.0.1:"),
        "{comment}"
    );
    assert!(comment.ends_with("/hook: bad entity"), "{comment}");
}

#[tokio::test]
async fn too_many_requests_is_retried_after_the_listeners_delay() {
    let (_rx, attempt) = send_once(Reply::status(429).header("Retry-After", "2"), |_| {}).await;
    assert_eq!(attempt.verdict(), Verdict::Retry);
    assert_eq!(attempt.status_code, Some(429));
    assert_eq!(attempt.retry_after, Some(Duration::from_secs(2)));
}

#[tokio::test]
async fn retry_after_is_ignored_outside_429_and_503() {
    let (_rx, attempt) = send_once(Reply::status(500).header("Retry-After", "2"), |_| {}).await;
    assert_eq!(attempt.verdict(), Verdict::Retry);
    assert_eq!(attempt.retry_after, None);
}

#[tokio::test]
async fn redirect_is_not_followed_and_fails_with_the_new_location() {
    let rx = Receiver::start().await;
    let target = rx.url("/moved");
    rx.script([Reply::status(301).header("Location", &target)]);
    let l = listener(rx.url("/hook"));
    let attempt = deliver(&l, &HttpSink::new(&l).unwrap()).await;

    assert_eq!(attempt.verdict(), Verdict::Fail);
    assert_eq!(attempt.status_code, Some(301));
    assert_eq!(
        attempt.comment.unwrap(),
        format!(
            "HTTP 301 redirect from {} to {target}: redirects are not followed; set the listener url to the new location",
            rx.url("/hook")
        )
    );
    // A followed redirect would be requested inside `send`, so it has arrived by now.
    assert_eq!(rx.count(), 1, "the redirect must not be followed");
}

#[tokio::test]
async fn listener_that_answers_after_the_timeout_is_retried() {
    let (_rx, attempt) = send_once(Reply::status(200).after(Duration::from_secs(5)), |l| {
        l.timeout = Duration::from_secs(1);
    })
    .await;
    assert_eq!(attempt.verdict(), Verdict::Retry);
    assert_eq!(attempt.status_code, None);
    let comment = attempt.comment.unwrap();
    assert!(
        comment.starts_with("no answer within 1s from http://127.0.0.1:"),
        "{comment}"
    );
    assert!(attempt.latency >= Duration::from_secs(1));
    assert!(attempt.latency < Duration::from_secs(4));
}

#[tokio::test]
async fn closed_port_is_retried_as_connection_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let l = listener(format!("http://127.0.0.1:{port}/hook"));
    let attempt = deliver(&l, &HttpSink::new(&l).unwrap()).await;
    assert_eq!(attempt.verdict(), Verdict::Retry);
    assert_eq!(attempt.status_code, None);
    assert_eq!(
        attempt.comment.as_deref(),
        Some(format!("connection refused by 127.0.0.1:{port}").as_str())
    );
}

/// Standard Webhooks verification written from the spec, independent of walhook's code.
fn verify(secret: &str, id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut signed = Vec::new();
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(ts.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    header.split(' ').any(|candidate| {
        let Some(sig) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(&signed);
        mac.verify_slice(&sig).is_ok()
    })
}

#[tokio::test]
async fn signed_delivery_verifies_with_an_independent_implementation() {
    let (rx, attempt) = send_once(Reply::status(204), |l| {
        l.secret = Some(key());
    })
    .await;
    assert_eq!(attempt.verdict(), Verdict::Delivered);
    let r = &rx.requests()[0];
    let id = r.header("webhook-id").unwrap();
    let ts = r.header("webhook-timestamp").unwrap();
    let sig = r.header("webhook-signature").unwrap();
    assert_eq!(id, "6f1c1e5a-0000-5000-8000-000000000042");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - ts.parse::<i64>().unwrap()).abs() <= 5);
    assert!(
        verify(SECRET, id, ts, &r.body, sig),
        "signature {sig} does not verify"
    );
    assert!(!verify(SECRET, id, ts, b"{\"tampered\":1}", sig));
}

#[tokio::test]
async fn secrets_echoed_by_the_listener_never_reach_the_comment() {
    let echo = format!("denied: key {API_KEY} secret {SECRET}");
    let (_rx, attempt) = send_once(Reply::status(403).body(&echo), |l| {
        l.secret = Some(key());
    })
    .await;
    assert_eq!(attempt.verdict(), Verdict::Fail);
    let comment = attempt.comment.unwrap();
    assert!(!comment.contains(API_KEY), "{comment}");
    assert!(
        !comment.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "{comment}"
    );
    assert!(comment.ends_with("denied: key *** secret ***"), "{comment}");
}

#[tokio::test]
async fn url_credentials_never_reach_the_comment() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500)]);
    let base = rx.url("/hook?token=t0ken-value");
    let l = listener(base.replace("http://", "http://user:pa55word@"));
    let sink = HttpSink::new(&l).unwrap();
    assert!(!format!("{sink:?}").contains("pa55word"));
    let attempt = deliver(&l, &sink).await;
    let comment = attempt.comment.unwrap();
    assert!(!comment.contains("pa55word"), "{comment}");
    assert!(!comment.contains("t0ken-value"), "{comment}");
    assert!(comment.contains("http://***@127.0.0.1"), "{comment}");
    assert!(comment.contains("/hook?token=***"), "{comment}");
}

#[tokio::test]
async fn an_https_listener_behind_an_internal_ca_needs_its_ca_file() {
    let (ca_pem, cert, key) = support::receiver::test_ca();
    let rx = Receiver::start_tls(vec![cert], key).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("internal-ca.pem"), ca_pem).unwrap();
    let toml = format!(
        "[source]\nurl = \"postgres://walhook@localhost/app\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n[[listener]]\nname = \"trusting\"\nurl = \"{url}\"\nca_file = \"internal-ca.pem\"\n\n[[listener]]\nname = \"default-trust\"\nurl = \"{url}\"\n",
        url = rx.url("/hook")
    );
    let config = Config::parse_with_env(&toml, &dir.path().join("walhook.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));

    let trusting = HttpSink::new(&config.listeners[0]).unwrap();
    let attempt = deliver(&config.listeners[0], &trusting).await;
    assert_eq!(
        attempt.verdict(),
        Verdict::Delivered,
        "{:?}",
        attempt.comment
    );
    assert_eq!(rx.count(), 1);

    let default_trust = HttpSink::new(&config.listeners[1]).unwrap();
    let attempt = deliver(&config.listeners[1], &default_trust).await;
    assert_eq!(attempt.verdict(), Verdict::Retry);
    assert_eq!(attempt.status_code, None);
    let comment = attempt.comment.unwrap();
    assert_eq!(
        comment,
        format!(
            "TLS handshake with {} failed: its TLS certificate is signed by a CA walhook does not trust; set ca_file to the PEM file of that CA (an internal CA) or add the CA to the OS trust store",
            rx.addr
        )
    );
    assert_eq!(rx.count(), 1, "nothing was sent without trust");
}

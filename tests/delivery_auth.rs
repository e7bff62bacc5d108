//! Listener authentication through the HTTP sink against real receivers on 127.0.0.1: an
//! OAuth2 token endpoint issuing short-lived tokens, listeners that check them, Basic and
//! bearer tokens from a file that changes.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use support::oauth::{CLIENT_SECRET, OAuthWorld, TOKEN_LIFETIME, bearer};
use support::queue::listeners;
use support::receiver::{Receiver, Reply};
use uuid::Uuid;
use walhook::config::ListenerConfig;
use walhook::delivery::format::Format;
use walhook::delivery::policy::Outcome;
use walhook::delivery::sink::HttpSink;
use walhook::delivery::{Attempt, Verdict};
use walhook::queue::StoredEvent;
use walhook::types::{Action, Lsn};

fn event() -> StoredEvent {
    StoredEvent {
        event_id: Uuid::new_v4(),
        commit_lsn: Lsn(0x16_B374_D848),
        seq: 1,
        commit_time: UNIX_EPOCH + Duration::from_secs(1_714_566_896),
        entity: "Customer".into(),
        entity_id: "42".into(),
        action: Action::Updated,
        derived: None,
        changed_fields: Some(vec!["city".into()]),
        row: json!({"id": 42, "city": "Paris"}),
        old: None,
        subject: None,
        source_table: "public.customer".into(),
    }
}

async fn send(l: &ListenerConfig, sink: &HttpSink) -> Attempt {
    sink.send(Format::for_listener(l, "CRM").render(&event()))
        .await
}

#[tokio::test]
async fn oauth2_tokens_are_cached_renewed_before_expiry_and_refreshed_once_after_a_401() {
    let w = OAuthWorld::start().await;
    let l = w.listener(CLIENT_SECRET);
    let sink = HttpSink::new(&l).unwrap();

    // The first delivery fetches a token; the next ones reuse it.
    for _ in 0..3 {
        let a = send(&l, &sink).await;
        assert_eq!(a.verdict(), Verdict::Delivered, "{a:?}");
    }
    assert_eq!(w.idp.count(), 1, "one token for three deliveries");
    let first = w.last_token();
    assert_eq!(first, "tok-0");
    assert!(
        w.listener
            .requests()
            .iter()
            .all(|r| bearer(r).as_deref() == Some("tok-0"))
    );

    // Shortly before it expires the token is renewed, before the listener can refuse it.
    let issued = w.issued.lock().unwrap()[&first];
    support::eventually(
        Duration::from_secs(5),
        "the token nearing its expiry",
        || async {
            (issued.elapsed() >= TOKEN_LIFETIME - Duration::from_millis(150)).then_some(())
        },
    )
    .await;
    let before = w.listener.count();
    let a = send(&l, &sink).await;
    assert_eq!(a.verdict(), Verdict::Delivered, "{a:?}");
    assert_eq!(w.idp.count(), 2, "renewed");
    assert_eq!(w.listener.count(), before + 1, "no 401 on the way");
    assert_eq!(w.last_token(), "tok-1");

    // The listener revokes the token: one 401, one new token, the same message again.
    w.revoked.lock().unwrap().insert("tok-1".into());
    let before = w.listener.count();
    let a = send(&l, &sink).await;
    assert_eq!(a.verdict(), Verdict::Delivered, "{a:?}");
    assert_eq!(a.status_code, Some(200));
    assert_eq!(w.idp.count(), 3);
    let requests = w.listener.requests();
    assert_eq!(requests.len(), before + 2);
    assert_eq!(bearer(&requests[before]).as_deref(), Some("tok-1"));
    assert_eq!(bearer(&requests[before + 1]).as_deref(), Some("tok-2"));
    assert_eq!(requests[before].body, requests[before + 1].body);

    // A listener that refuses every token: one refresh, then the 401 stands (no loop).
    w.listener
        .respond_with(|_, _| Reply::status(401).body("nope"));
    let a = send(&l, &sink).await;
    assert_eq!(a.status_code, Some(401));
    assert_eq!(a.verdict(), Verdict::Fail);
    assert_eq!(w.idp.count(), 4, "exactly one refresh for the 401");
}

#[tokio::test]
async fn a_token_endpoint_that_refuses_the_client_is_retried_and_named_without_the_secret() {
    let w = OAuthWorld::start().await;
    let l = w.listener("wrong-s3cret-value");
    let sink = HttpSink::new(&l).unwrap();
    let a = send(&l, &sink).await;
    assert_eq!(a.outcome, Outcome::Unauthenticated);
    assert_eq!(a.verdict(), Verdict::Retry);
    assert_eq!(w.listener.count(), 0, "nothing sent without a token");
    let comment = a.comment.unwrap();
    assert_eq!(
        comment,
        format!(
            "cannot get an OAuth2 token from {}: HTTP 401: {{\"error\":\"invalid_client\"}}; check client_id, client_secret and scope",
            w.idp.url("/oauth2/token")
        )
    );

    // Malformed answers, and an error page that echoes the request (with the secret in
    // the body, as client_auth = "body" sends it).
    let body_auth = listeners(&w.block("crm", CLIENT_SECRET).replace(
        "scope = \"api://crm/.default\"",
        "scope = \"api://crm/.default\", client_auth = \"body\"",
    ))
    .remove(0);
    let cases: [(Reply, &str); 3] = [
        (
            Reply::status(200).body("<html>login</html>"),
            "the answer is not a JSON token response with access_token",
        ),
        (
            Reply::status(200).body(r#"{"access_token": "x", "token_type": "mac"}"#),
            "token_type \"mac\" is not Bearer, the only type walhook sends",
        ),
        (Reply::status(502), "HTTP 502"),
    ];
    for (reply, expected) in cases {
        w.idp.script([reply]);
        let a = send(&l, &sink).await;
        assert_eq!(a.outcome, Outcome::Unauthenticated, "{a:?}");
        assert!(a.comment.as_deref().unwrap().ends_with(expected), "{a:?}");
    }
    w.idp.respond_with(|r, _| {
        Reply::status(400).body(&format!(
            "bad request: {}",
            String::from_utf8_lossy(&r.body)
        ))
    });
    let a = send(&body_auth, &HttpSink::new(&body_auth).unwrap()).await;
    let comment = a.comment.unwrap();
    assert!(comment.contains("client_secret=***"), "{comment}");
    assert!(comment.contains("client_id=walhook-client"), "{comment}");
    assert!(!comment.contains("s3cr3t"), "{comment}");

    // A token endpoint that is down is a connection failure, retried too.
    let url = w.idp.url("/oauth2/token");
    w.idp.stop().await;
    let a = send(&l, &sink).await;
    assert_eq!(a.outcome, Outcome::Unreachable);
    let comment = a.comment.unwrap();
    assert!(
        comment.starts_with(&format!(
            "cannot get an OAuth2 token from {url}: connection refused"
        )),
        "{comment}"
    );
}

#[tokio::test]
async fn basic_credentials_and_a_bearer_token_file_that_changes_reach_the_listener() {
    let rx = Receiver::start().await;
    let l = listeners(&format!(
        "[[listener]]\nname = \"b\"\nurl = \"{}\"\nauth = {{ basic = {{ user = \"walhook\", password = \"pa55:word\" }} }}\n",
        rx.url("/basic")
    ))
    .remove(0);
    let a = send(&l, &HttpSink::new(&l).unwrap()).await;
    assert_eq!(a.verdict(), Verdict::Delivered);
    assert_eq!(
        rx.requests()[0].header("authorization"),
        Some(format!("Basic {}", STANDARD.encode("walhook:pa55:word")).as_str())
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let l = listeners(&format!(
        "[[listener]]\nname = \"t\"\nurl = \"{}\"\nauth = {{ bearer_file = \"{}\" }}\n",
        rx.url("/bearer"),
        token.display()
    ))
    .remove(0);
    let sink = HttpSink::new(&l).unwrap();
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    accepted.lock().unwrap().insert("first-token".into());
    {
        let accepted = accepted.clone();
        rx.respond_with(move |r, _| match bearer(r) {
            Some(t) if accepted.lock().unwrap().contains(&t) => Reply::status(200),
            _ => Reply::status(401),
        });
    }
    assert_eq!(send(&l, &sink).await.verdict(), Verdict::Delivered);

    // Another process renews the token: the new one is sent once the file changed, while
    // the old one is still accepted (no 401 needed).
    std::fs::write(&token, "second-token-renewed\n").unwrap();
    accepted
        .lock()
        .unwrap()
        .insert("second-token-renewed".into());
    support::eventually(Duration::from_secs(10), "the new token in use", || async {
        assert_eq!(send(&l, &sink).await.verdict(), Verdict::Delivered);
        (bearer(rx.requests().last().unwrap()).as_deref() == Some("second-token-renewed"))
            .then_some(())
    })
    .await;

    // Renewed and the old one refused at once: the 401 makes walhook read the file again.
    std::fs::write(&token, "third\n").unwrap();
    *accepted.lock().unwrap() = HashSet::from(["third".to_owned()]);
    let before = rx.count();
    let a = send(&l, &sink).await;
    assert_eq!(a.verdict(), Verdict::Delivered, "{a:?}");
    assert!(rx.count() <= before + 2);
    assert_eq!(
        bearer(rx.requests().last().unwrap()).as_deref(),
        Some("third")
    );

    // A file that vanishes keeps the last token rather than sending none.
    std::fs::remove_file(&token).unwrap();
    let removed = Instant::now();
    support::eventually(
        Duration::from_secs(5),
        "the file looked at again",
        || async {
            assert_eq!(send(&l, &sink).await.verdict(), Verdict::Delivered);
            (removed.elapsed() > Duration::from_millis(1500)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn the_traced_exchange_masks_credentials_and_configured_header_values() {
    let w = OAuthWorld::start().await;
    let mut l = w.listener(CLIENT_SECRET);
    l.headers.push((
        http::HeaderName::from_static("x-api-key"),
        http::HeaderValue::from_static("k3y-value-1234"),
    ));
    let sink = HttpSink::new(&l).unwrap();
    let (attempt, trace) = sink
        .exchange(Format::for_listener(&l, "CRM").render(&event()))
        .await;
    assert_eq!(attempt.verdict(), Verdict::Delivered);
    assert_eq!(
        trace.request_line,
        format!("POST {}", w.listener.url("/hook"))
    );
    let header = |n: &str| {
        trace
            .request_headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("authorization"), Some("Bearer ***"));
    assert_eq!(header("x-api-key"), Some("***"));
    assert_eq!(
        header("content-type"),
        Some("application/cloudevents+json; charset=utf-8")
    );
    assert_eq!(trace.responses.len(), 1);
    assert_eq!(trace.responses[0].status_line, "HTTP 200 OK");
    let shown = format!("{trace:?}");
    for secret in ["tok-0", "k3y-value-1234", CLIENT_SECRET] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(sink.auth_description().unwrap().contains("walhook-client"));
}

//! The replication connection against real throwaway clusters: authentication methods,
//! error messages, slot creation, streaming, status updates and keepalives.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{ClusterOptions, LocalCluster, TestDb};
use tokio::time::Instant;
use walhook::error::{Classify, ErrorClass};
use walhook::replication::conn::{
    AuthMethod, ConnPolicy, ConnectParams, ReplicationConnection, ReplicationError,
    ReplicationStream,
};
use walhook::replication::pgoutput::{self, Message};
use walhook::replication::protocol::ReplicationMessage;
use walhook::types::Lsn;

/// Each role authenticates with a different method over TCP; sockets trust everyone.
const AUTH_HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
host all trustuser 127.0.0.1/32 trust
host all norepl 127.0.0.1/32 trust
host all pwuser 127.0.0.1/32 password
host all md5user 127.0.0.1/32 md5
host all scramuser 127.0.0.1/32 scram-sha-256
host all rejected 127.0.0.1/32 reject
";

const AUTH_ROLES: &str = "\
SET password_encryption = 'md5';
CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5 secret';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'scram:secret@1';
CREATE ROLE pwuser LOGIN REPLICATION PASSWORD 'pw-secret';
CREATE ROLE trustuser LOGIN REPLICATION;
CREATE ROLE norepl LOGIN;
CREATE ROLE rejected LOGIN REPLICATION;
CREATE ROLE nohba LOGIN REPLICATION;
";

fn auth_cluster() -> LocalCluster {
    let cluster = LocalCluster::start_with(ClusterOptions {
        hba: Some(AUTH_HBA.to_owned()),
        ..ClusterOptions::default()
    })
    .expect("start cluster");
    cluster.psql("postgres", AUTH_ROLES).expect("create roles");
    cluster
}

/// Key=value form so passwords with spaces and colons need no percent-encoding; an empty
/// passfile keeps a developer's ~/.pgpass out of the test. Readable passwords are allowed
/// over this plain TCP (see `readable_passwords_are_not_sent_over_plain_tcp`).
fn tcp(cluster: &LocalCluster, user: &str, password: Option<&str>, db: &str) -> ConnectParams {
    tcp_strict(cluster, user, password, db).with_policy(ConnPolicy {
        allow_insecure_password: true,
        ..ConnPolicy::default()
    })
}

/// Like [`tcp`], with walhook's default policy.
fn tcp_strict(
    cluster: &LocalCluster,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> ConnectParams {
    let mut s = format!(
        "host=127.0.0.1 port={} user={user} dbname={db} sslmode=disable passfile=/nonexistent",
        cluster.port()
    );
    if let Some(p) = password {
        s.push_str(&format!(
            " password='{}'",
            p.replace('\\', "\\\\").replace('\'', "\\'")
        ));
    }
    ConnectParams::parse(&s, None).expect("parse connection string")
}

async fn connect_err(params: &ConnectParams) -> ReplicationError {
    match ReplicationConnection::connect(params).await {
        Ok(_) => panic!("connecting as {} unexpectedly succeeded", params.user()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn every_auth_method_connects_and_identifies_the_system() {
    let cluster = auth_cluster();
    let cases = [
        (
            tcp(&cluster, "trustuser", None, "postgres"),
            AuthMethod::Trust,
        ),
        (
            tcp(&cluster, "pwuser", Some("pw-secret"), "postgres"),
            AuthMethod::Cleartext,
        ),
        (
            tcp(&cluster, "md5user", Some("md5 secret"), "postgres"),
            AuthMethod::Md5,
        ),
        (
            tcp(&cluster, "scramuser", Some("scram:secret@1"), "postgres"),
            AuthMethod::ScramSha256,
        ),
        (
            ConnectParams::parse(
                &format!(
                    "postgresql://scramuser:{}@127.0.0.1:{}/postgres?sslmode=disable",
                    "scram%3Asecret%401",
                    cluster.port()
                ),
                None,
            )
            .unwrap(),
            AuthMethod::ScramSha256,
        ),
        // The walhook config's password wins over none in the string.
        (
            ConnectParams::parse(
                &format!(
                    "postgresql://md5user@127.0.0.1:{}/postgres?passfile=/nonexistent&sslmode=disable",
                    cluster.port()
                ),
                Some("md5 secret"),
            )
            .unwrap()
            .with_policy(ConnPolicy {
                allow_insecure_password: true,
                ..ConnPolicy::default()
            }),
            AuthMethod::Md5,
        ),
        (
            ConnectParams::parse(
                &format!(
                    "host={} port={} user=trustuser dbname=postgres",
                    cluster.socket_dir().display(),
                    cluster.port()
                ),
                None,
            )
            .unwrap(),
            AuthMethod::Trust,
        ),
    ];
    let expected_id = cluster
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    for (params, method) in cases {
        let mut conn = ReplicationConnection::connect(&params)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", params.redacted()));
        assert_eq!(conn.auth_method(), method, "{}", params.redacted());
        let id = conn.identify_system().await.unwrap();
        assert_eq!(id.system_id, expected_id);
        assert_eq!(id.timeline, 1);
        assert!(id.xlogpos > Lsn::ZERO);
        assert_eq!(id.dbname.as_deref(), Some("postgres"));
        assert!(conn.server_parameter("server_version").is_some());
        conn.close().await;
    }
}

#[tokio::test]
async fn auth_failures_have_clear_classified_messages() {
    let cluster = auth_cluster();
    let addr = format!("127.0.0.1:{}", cluster.port());

    for (user, wrong) in [
        ("md5user", "nope"),
        ("scramuser", "nope"),
        ("pwuser", "nope"),
    ] {
        let e = connect_err(&tcp(&cluster, user, Some(wrong), "postgres")).await;
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "password authentication failed for user \"{user}\" on {addr}"
            )),
            "{msg}"
        );
        assert!(msg.contains("PGPASSWORD or ~/.pgpass"), "{msg}");
        assert!(!msg.contains(wrong), "the password leaked: {msg}");
        assert_eq!(e.class(), ErrorClass::Config, "{msg}");
    }

    if std::env::var_os("PGPASSWORD").is_none() {
        let e = connect_err(&tcp(&cluster, "scramuser", None, "postgres")).await;
        assert!(matches!(e, ReplicationError::PasswordMissing { .. }), "{e}");
        assert!(e.to_string().contains("none was given"), "{e}");
        assert_eq!(e.class(), ErrorClass::Config);
    }

    let e = connect_err(&tcp(&cluster, "norepl", None, "postgres")).await;
    assert_eq!(
        e.to_string(),
        "role \"norepl\" lacks the REPLICATION attribute; run: ALTER ROLE norepl REPLICATION;"
    );
    assert_eq!(e.class(), ErrorClass::Permanent);

    let e = connect_err(&tcp(&cluster, "trustuser", None, "no_such_db")).await;
    assert!(matches!(e, ReplicationError::DatabaseMissing { .. }), "{e}");
    assert!(
        e.to_string().contains("\"no_such_db\" does not exist"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Config);

    for user in ["rejected", "nohba"] {
        let e = connect_err(&tcp(&cluster, user, None, "postgres")).await;
        assert!(matches!(e, ReplicationError::HbaRejected { .. }), "{e}");
        assert!(e.to_string().contains("pg_hba.conf"), "{e}");
        assert_eq!(e.class(), ErrorClass::Config);
    }

    // Nothing listens on a port just released by the OS.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let params = ConnectParams::parse(
        &format!("host=127.0.0.1 port={port} user=x password=y"),
        None,
    )
    .unwrap();
    let e = connect_err(&params).await;
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert_eq!(e.class(), ErrorClass::Transient);
}

#[tokio::test]
async fn readable_passwords_are_not_sent_over_plain_tcp() {
    let cluster = auth_cluster();
    for (user, password) in [("pwuser", "pw-secret"), ("md5user", "md5 secret")] {
        let params = tcp_strict(&cluster, user, Some(password), "postgres");
        let e = connect_err(&params).await;
        assert!(matches!(e, ReplicationError::InsecurePassword(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("unencrypted TCP") && msg.contains("allow_insecure_password = true"),
            "{msg}"
        );
        assert!(!msg.contains(password) && !msg.contains('\n'), "{msg}");
        assert_eq!(e.class(), ErrorClass::Config);
        // Ordinary connections follow the same rule.
        let e = walhook::db::connect(&params).await.unwrap_err();
        assert!(
            matches!(e, walhook::db::DbError::InsecurePassword(_)),
            "{e}"
        );
        assert_eq!(e.class(), ErrorClass::Config);
    }
    // SCRAM never reveals the password, so it is fine without TLS, on both connections.
    let params = tcp_strict(&cluster, "scramuser", Some("scram:secret@1"), "postgres");
    let conn = ReplicationConnection::connect(&params).await.unwrap();
    assert_eq!(conn.auth_method(), AuthMethod::ScramSha256);
    assert!(conn.tls().is_none());
    conn.close().await;
    let client = walhook::db::connect(&params).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

async fn repl_conn(db: &TestDb) -> ReplicationConnection {
    let params = ConnectParams::parse(&db.url, None).unwrap();
    ReplicationConnection::connect(&params).await.unwrap()
}

#[tokio::test]
async fn create_slot_if_missing_reports_an_existing_slot() {
    let db = TestDb::new();
    let mut conn = repl_conn(&db).await;
    assert!(conn.create_slot_if_missing("walhook_test").await.unwrap());
    assert!(!conn.create_slot_if_missing("walhook_test").await.unwrap());
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = 'walhook_test'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgoutput");
    assert_eq!(row.get::<_, String>(1), db.name);
    // A real error still surfaces, with its SQLSTATE.
    let e = conn
        .simple_query("CREATE_REPLICATION_SLOT bad LOGICAL no_such_plugin")
        .await
        .unwrap_err();
    // 58P01 (no such library); minor releases from 15.20 on first refuse a library not in
    // output_plugin_libraries with 42501.
    assert!(matches!(e.sqlstate(), Some("58P01" | "42501")), "{e}");
}

async fn stream_for(db: &TestDb, table_sql: &str) -> ReplicationStream {
    db.execute(&format!(
        "{table_sql}; CREATE PUBLICATION walhook_pub FOR TABLE t;"
    ))
    .await;
    let mut conn = repl_conn(db).await;
    conn.create_slot_if_missing("walhook_slot").await.unwrap();
    conn.start_replication("walhook_slot", Lsn::ZERO, "walhook_pub")
        .await
        .unwrap()
}

/// The next XLogData payload, answering keepalives that ask for a reply on the way.
async fn next_xlog(stream: &mut ReplicationStream, flushed: Lsn, deadline: Instant) -> Bytes {
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.recv())
            .await
            .expect("timed out waiting for XLogData")
            .expect("recv")
            .expect("stream ended");
        match msg {
            ReplicationMessage::XLogData { data, .. } => return data,
            ReplicationMessage::Keepalive {
                reply_requested, ..
            } => {
                if reply_requested {
                    stream
                        .send_status(flushed, flushed, flushed, false)
                        .await
                        .unwrap();
                }
            }
        }
    }
}

/// The end LSN of a pgoutput Commit message.
fn commit_end_lsn(data: &Bytes) -> Lsn {
    match pgoutput::decode(data).expect("decode commit") {
        Message::Commit(commit) => commit.end_lsn,
        other => panic!("expected a Commit message, got {other:?}"),
    }
}

async fn confirmed_flush(client: &tokio_postgres::Client) -> Option<Lsn> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walhook_slot'",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
}

#[tokio::test]
async fn streamed_insert_arrives_in_order_and_status_update_moves_the_slot() {
    let db = TestDb::new();
    let mut stream = stream_for(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let client = db.client().await;
    let before = confirmed_flush(&client).await.unwrap();
    client
        .execute("INSERT INTO t VALUES (1, 'one')", &[])
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tags = Vec::new();
    let end = loop {
        let data = next_xlog(&mut stream, Lsn::ZERO, deadline).await;
        tags.push(char::from(data[0]));
        if data[0] == b'C' {
            break commit_end_lsn(&data);
        }
    };
    assert_eq!(tags, vec!['B', 'R', 'I', 'C']);
    assert!(end > before);

    stream.send_status(end, end, end, false).await.unwrap();
    support::eventually(
        Duration::from_secs(10),
        "confirmed_flush_lsn to reach the commit",
        || {
            let client = &client;
            async move { confirmed_flush(client).await.filter(|l| *l >= end) }
        },
    )
    .await;
    stream.close().await;
}

#[tokio::test]
async fn recv_loses_nothing_when_cancelled_by_timers() {
    let db = TestDb::new();
    let mut stream = stream_for(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    // Insert while recv is already waiting, so frames arrive over time and the timer gets
    // to cancel recv mid-wait (with everything already buffered recv would always win).
    let client = db.client().await;
    let insert = tokio::spawn(async move {
        client
            .batch_execute("SELECT pg_sleep(0.2); INSERT INTO t SELECT g, repeat('x', g % 500) FROM generate_series(1, 2000) g")
            .await
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut inserts, mut cancelled) = (0, 0);
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out after {inserts} inserts"
        );
        // A timer that often fires mid-frame: recv must keep partial frames for the next call.
        tokio::select! {
            msg = stream.recv() => match msg.unwrap().expect("stream ended") {
                ReplicationMessage::XLogData { data, .. } => match data[0] {
                    b'I' => inserts += 1,
                    b'C' => break,
                    _ => {}
                },
                ReplicationMessage::Keepalive { reply_requested: true, .. } => {
                    stream.send_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, false).await.unwrap();
                }
                ReplicationMessage::Keepalive { .. } => {}
            },
            _ = tokio::time::sleep(Duration::from_micros(50)) => cancelled += 1,
        }
    }
    insert.await.unwrap().unwrap();
    assert_eq!(inserts, 2000);
    assert!(
        cancelled > 0,
        "the timer never interrupted recv, so nothing was proven"
    );
}

#[tokio::test]
async fn answering_keepalives_keeps_the_stream_alive_and_shutdown_is_transient() {
    let mut db = TestDb::with_options(ClusterOptions {
        extra_conf: vec!["wal_sender_timeout = '2s'".to_owned()],
        ..ClusterOptions::default()
    });
    let mut stream = stream_for(&db, "CREATE TABLE t (id int PRIMARY KEY)").await;

    // Stay idle for well past wal_sender_timeout, answering what the server asks.
    let idle_until = Instant::now() + Duration::from_secs(5);
    let mut replies = 0;
    loop {
        tokio::select! {
            msg = stream.recv() => {
                let msg = msg.unwrap().expect("stream ended");
                if let ReplicationMessage::Keepalive { reply_requested: true, .. } = msg {
                    replies += 1;
                    stream.send_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, false).await.unwrap();
                }
            }
            _ = tokio::time::sleep_until(idle_until) => break,
        }
    }
    assert!(replies > 0, "the server never asked for a reply within 5s");

    db.execute("INSERT INTO t VALUES (1)").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tags = Vec::new();
    while tags.last() != Some(&'C') {
        tags.push(char::from(
            next_xlog(&mut stream, Lsn::ZERO, deadline).await[0],
        ));
    }
    assert!(tags.contains(&'I'), "{tags:?}");

    // A fast shutdown ends the stream; whatever form that takes, it is worth retrying.
    let mut cluster = db.cluster.take().unwrap();
    let stopper = tokio::task::spawn_blocking(move || {
        cluster.stop_server("fast").unwrap();
        cluster
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, stream.recv())
            .await
            .expect("stream never ended")
        {
            // At shutdown the walsender waits until the client confirms everything it sent,
            // so the reply must carry the keepalive's wal_end (nothing is in flight here).
            Ok(Some(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested: true,
                ..
            })) => {
                let _ = stream.send_status(wal_end, wal_end, wal_end, false).await;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                assert_eq!(e.class(), ErrorClass::Transient, "{e}");
                break;
            }
        }
    }
    let cluster = stopper.await.unwrap();
    drop(cluster);
}

/// A fake server that asks for SCRAM-SHA-256, answers the client's first message properly,
/// then reports success without the server signature that proves it knows the password
/// (what an impostor that captured the connection would do).
async fn impostor_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    async fn read_msg(s: &mut tokio::net::TcpStream, tagged: bool) -> Vec<u8> {
        if tagged {
            s.read_u8().await.unwrap();
        }
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        body
    }
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                read_msg(&mut s, false).await; // startup
                let mut sasl = 10i32.to_be_bytes().to_vec();
                sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
                s.write_all(&msg(b'R', &sasl)).await.unwrap();
                let initial = read_msg(&mut s, true).await;
                let text = String::from_utf8_lossy(&initial).into_owned();
                let nonce = text.split("r=").nth(1).unwrap_or_default().to_owned();
                let mut cont = 11i32.to_be_bytes().to_vec();
                cont.extend_from_slice(format!("r={nonce}srv,s=c2FsdHNhbHQ=,i=4096").as_bytes());
                s.write_all(&msg(b'R', &cont)).await.unwrap();
                read_msg(&mut s, true).await; // client final, with its proof
                let mut out = msg(b'R', &0i32.to_be_bytes());
                out.extend(msg(b'Z', b"I"));
                let _ = s.write_all(&out).await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn success_before_the_scram_server_signature_is_refused() {
    let port = impostor_server().await;
    let params = ConnectParams::parse(
        &format!("host=127.0.0.1 port={port} user=walrep dbname=app sslmode=disable passfile=/nonexistent"),
        Some("secret"),
    )
    .unwrap();
    let e = connect_err(&params).await;
    assert!(matches!(e, ReplicationError::Scram { .. }), "{e}");
    assert!(e.to_string().contains("without proving"), "{e}");
    assert_eq!(e.class(), ErrorClass::Config);
    // tokio-postgres refuses it as well.
    let e = walhook::db::connect(&params).await.unwrap_err();
    assert!(e.to_string().contains("unexpected message"), "{e}");
}

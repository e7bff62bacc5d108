//! TLS to PostgreSQL: a throwaway cluster with `ssl = on`, a CA and a server certificate made
//! here, and pg_hba.conf allowing walhook's role over TLS only (`hostssl`).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use support::receiver::Receiver;
use support::{ClusterOptions, ServerTls, TestDb, eventually, listener_toml, walhook};
use walhook::db::DbError;
use walhook::error::{Classify, ErrorClass};
use walhook::replication::conn::{
    AuthMethod, ConnectParams, ReplicationConnection, ReplicationError, Verification,
};

const WALREP_PASSWORD: &str = "walrep-secret";

const TLS_HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
hostssl all walrep 127.0.0.1/32 scram-sha-256
hostssl all pwssl 127.0.0.1/32 password
";

/// A CA, and a server certificate it signed for `names`.
struct Pki {
    dir: tempfile::TempDir,
    server: ServerTls,
}

impl Pki {
    fn new(names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca("walhook test CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let other = make_ca("some other CA");
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        Pki {
            dir,
            server: ServerTls {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }
}

fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A database in a TLS cluster whose certificate names `localhost` only.
fn tls_db() -> (TestDb, Pki) {
    let pki = Pki::new(&["localhost"]);
    let db = TestDb::with_options(ClusterOptions {
        hba: Some(TLS_HBA.to_owned()),
        ssl: Some(pki.server.clone()),
        ..ClusterOptions::default()
    });
    db.cluster
        .as_ref()
        .expect("TLS tests need their own cluster")
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE walrep LOGIN SUPERUSER REPLICATION PASSWORD '{WALREP_PASSWORD}';
                 CREATE ROLE pwssl LOGIN REPLICATION PASSWORD 'pw-ssl';"
            ),
        )
        .unwrap();
    (db, pki)
}

fn port(db: &TestDb) -> u16 {
    db.cluster.as_ref().unwrap().port()
}

/// Key=value parameters as walrep; `extra` adds or overrides keywords.
fn params(db: &TestDb, host: &str, extra: &str) -> ConnectParams {
    let s = format!(
        "host={host} port={} user=walrep dbname={} passfile=/nonexistent {extra}",
        port(db),
        db.name
    );
    ConnectParams::parse(&s, Some(WALREP_PASSWORD)).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn rootcert(path: &Path) -> String {
    format!("sslrootcert={}", path.display())
}

async fn refused(params: &ConnectParams) -> (ReplicationError, DbError) {
    let repl = match ReplicationConnection::connect(params).await {
        Ok(_) => panic!("{} connected", params.redacted()),
        Err(e) => e,
    };
    let ordinary = match walhook::db::connect(params).await {
        Ok(_) => panic!("{} connected (ordinary)", params.redacted()),
        Err(e) => e,
    };
    (repl, ordinary)
}

#[tokio::test]
async fn verify_full_authenticates_the_server_and_binds_scram_to_the_channel() {
    let (db, pki) = tls_db();
    let p = params(
        &db,
        "localhost",
        &format!("sslmode=verify-full {}", rootcert(&pki.ca())),
    );
    let mut conn = ReplicationConnection::connect(&p).await.unwrap();
    assert_eq!(conn.auth_method(), AuthMethod::ScramSha256Plus);
    let tls = conn.tls().expect("TLS is on").clone();
    assert_eq!(tls.verification, Verification::Full);
    assert_eq!(tls.host, "localhost");
    assert!(tls.protocol.starts_with("TLSv1."), "{tls}");
    conn.identify_system().await.unwrap();
    conn.close().await;

    // The ordinary connection is encrypted as well, and bound to the channel.
    let (client, conn, tls) = walhook::db::connect_raw(&p).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(tls.map(|t| t.verification), Some(Verification::Full));
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));

    // channel_binding=require is met by SCRAM-SHA-256-PLUS on both connections.
    let p = params(
        &db,
        "localhost",
        &format!(
            "sslmode=verify-full channel_binding=require {}",
            rootcert(&pki.ca())
        ),
    );
    ReplicationConnection::connect(&p)
        .await
        .unwrap()
        .close()
        .await;
    walhook::db::connect(&p).await.unwrap();
}

#[tokio::test]
async fn a_wrong_ca_or_host_name_is_refused_with_one_line() {
    let (db, pki) = tls_db();
    let wrong_ca = params(
        &db,
        "localhost",
        &format!("sslmode=verify-full {}", rootcert(&pki.other_ca())),
    );
    let (repl, ordinary) = refused(&wrong_ca).await;
    for msg in [repl.to_string(), ordinary.to_string()] {
        assert!(msg.contains("not signed by a CA"), "{msg}");
        assert!(msg.contains("other-ca.pem") && !msg.contains('\n'), "{msg}");
    }
    assert_eq!(repl.class(), ErrorClass::Config);
    assert_eq!(ordinary.class(), ErrorClass::Config);

    // The certificate names localhost, not 127.0.0.1.
    let wrong_name = params(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-full {}", rootcert(&pki.ca())),
    );
    let (repl, ordinary) = refused(&wrong_name).await;
    for msg in [repl.to_string(), ordinary.to_string()] {
        assert!(
            msg.contains("not valid for host name \"127.0.0.1\""),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }
    assert_eq!(repl.class(), ErrorClass::Config);

    // verify-ca checks the chain only, so the same address is fine.
    let ca_only = params(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-ca {}", rootcert(&pki.ca())),
    );
    let conn = ReplicationConnection::connect(&ca_only).await.unwrap();
    assert_eq!(conn.tls().unwrap().verification, Verification::Chain);
    conn.close().await;

    // libpq's rule: require with a root certificate present checks the chain like verify-ca.
    let require_wrong_ca = params(
        &db,
        "127.0.0.1",
        &format!("sslmode=require {}", rootcert(&pki.other_ca())),
    );
    let (repl, _) = refused(&require_wrong_ca).await;
    assert!(repl.to_string().contains("not signed by a CA"), "{repl}");
}

#[tokio::test]
async fn sslmodes_follow_libpq() {
    let (db, _pki) = tls_db();
    // require: encrypted, certificate not checked.
    let p = params(&db, "127.0.0.1", "sslmode=require");
    let conn = ReplicationConnection::connect(&p).await.unwrap();
    assert_eq!(conn.tls().unwrap().verification, Verification::None);
    conn.close().await;
    walhook::db::connect(&p).await.unwrap();

    // prefer (libpq's default): TLS when the server offers it.
    let p = params(&db, "127.0.0.1", "");
    let conn = ReplicationConnection::connect(&p).await.unwrap();
    assert!(conn.tls().is_some());
    conn.close().await;

    // disable: the hostssl-only server refuses the plain connection.
    let p = params(&db, "127.0.0.1", "sslmode=disable");
    let (repl, ordinary) = refused(&p).await;
    assert!(
        matches!(repl, ReplicationError::HbaRejected { .. }),
        "{repl}"
    );
    assert!(ordinary.to_string().contains("pg_hba.conf"), "{ordinary}");

    // allow: plain first; refused, so TLS next.
    let p = params(&db, "127.0.0.1", "sslmode=allow");
    let conn = ReplicationConnection::connect(&p).await.unwrap();
    assert!(conn.tls().is_some());
    conn.close().await;
    walhook::db::connect(&p).await.unwrap();

    // A cleartext password is fine inside TLS...
    let pw = ConnectParams::parse(
        &format!(
            "host=127.0.0.1 port={} user=pwssl dbname={} sslmode=require passfile=/nonexistent",
            port(&db),
            db.name
        ),
        Some("pw-ssl"),
    )
    .unwrap();
    let conn = ReplicationConnection::connect(&pw).await.unwrap();
    assert_eq!(conn.auth_method(), AuthMethod::Cleartext);
    conn.close().await;
    // ...but not when channel binding is required.
    let pw = ConnectParams::parse(
        &format!(
            "host=127.0.0.1 port={} user=pwssl dbname={} sslmode=require channel_binding=require passfile=/nonexistent",
            port(&db),
            db.name
        ),
        Some("pw-ssl"),
    )
    .unwrap();
    let (repl, ordinary) = refused(&pw).await;
    assert!(
        matches!(repl, ReplicationError::ChannelBindingMissing { .. }),
        "{repl}"
    );
    assert!(
        ordinary.to_string().contains("channel binding"),
        "{ordinary}"
    );
    assert_eq!(ordinary.class(), ErrorClass::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_and_delivers_and_check_reports_tls() {
    let (db, pki) = tls_db();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let receiver = Receiver::start().await;
    let url = format!(
        "postgres://walrep@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
        port(&db),
        db.name,
        pki.ca().display()
    );
    let toml = support::config_toml(&url, support::CUSTOMER_ENTITY).replacen(
        "slot = ",
        &format!("password = \"{WALREP_PASSWORD}\"\nslot = "),
        1,
    ) + &listener_toml("crm", &receiver.url("/hook"));
    let (_dir, path) = support::write_config(&toml);
    let path = path.to_str().unwrap().to_owned();

    let (code, out, err) = walhook(&["check", "--config", &path]);
    let tls_line = out
        .lines()
        .find(|l| l.contains(" tls "))
        .unwrap_or_else(|| panic!("no tls line in check output:\n{out}\n{err}"));
    assert!(tls_line.starts_with("ok"), "{tls_line}");
    assert!(
        tls_line.contains("certificate verified for host localhost") && tls_line.contains("TLSv1."),
        "{tls_line}"
    );
    assert_ne!(code, 78, "{out}{err}");

    let config = walhook::config::Config::parse(&toml, Path::new("tls.toml")).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(walhook::service::run(config, stop.clone()));
    let client = db.client().await;
    support::wait_streaming(&client).await;
    client
        .batch_execute("INSERT INTO customer SELECT g, 'n' || g FROM generate_series(1, 5) g")
        .await
        .unwrap();
    receiver
        .wait_for_count(5, Duration::from_secs(60), "5 deliveries over TLS")
        .await;
    // Every session walhook opened is encrypted.
    let plain: i64 = eventually(Duration::from_secs(10), "walrep sessions", || async {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE NOT s.ssl), count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'walrep'",
                &[],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(1) >= 2).then(|| row.get::<_, i64>(0))
    })
    .await;
    assert_eq!(plain, 0);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // A wrong CA: check fails with one line and EX_CONFIG.
    let bad = toml.replace(
        &pki.ca().display().to_string(),
        &pki.other_ca().display().to_string(),
    );
    let (_dir2, bad_path) = support::write_config(&bad);
    let (code, out, err) = walhook(&["check", "--config", bad_path.to_str().unwrap()]);
    assert_eq!(code, 78, "{out}{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("not signed by a CA"), "{err}");
}

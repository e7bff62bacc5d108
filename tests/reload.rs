//! SIGHUP reloads listeners without dropping the replication stream, applies [source]
//! changes to new connections; a bad file is refused.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::receiver::Receiver;
use support::{
    CUSTOMER_ENTITY, ClusterOptions, Daemon, TestDb, config_toml, eventually, listener_toml,
    wait_queue_drained, walhook, write_config,
};

fn config(db: &TestDb, listeners: &[(&str, String)]) -> String {
    let mut blocks = CUSTOMER_ENTITY.to_owned();
    for (name, url) in listeners {
        blocks.push_str(&listener_toml(name, url));
    }
    config_toml(&db.url, &blocks)
}

async fn walsender_pid(c: &tokio_postgres::Client) -> Option<i32> {
    c.query_opt(
        // A slot being created is active too, under the creating backend: count walsenders only.
        "SELECT s.active_pid FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
         WHERE s.slot_name = 'walhook' AND a.backend_type = 'walsender'",
        &[],
    )
    .await
    .ok()?
    .and_then(|r| r.get(0))
}

/// How many times each customer id reached the receiver.
fn ids(r: &Receiver) -> HashMap<i64, usize> {
    let mut m = HashMap::new();
    for req in r.requests() {
        if let Some(id) = req.json()["data"]["row"]["id"].as_i64() {
            *m.entry(id).or_default() += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_listener_without_restarting_the_stream_and_refuses_a_bad_file() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let daemon = Daemon::start(&config(&db, &[("a", a.url("/a"))]));
    let c = db.client().await;
    let pid = eventually(Duration::from_secs(60), "walhook streaming", || {
        walsender_pid(&c)
    })
    .await;

    c.execute("INSERT INTO customer VALUES (1, 'one')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a gets 1", || async {
        ids(&a).contains_key(&1).then_some(())
    })
    .await;

    // Add listener b and reload.
    std::fs::write(
        &daemon.config,
        config(&db, &[("a", a.url("/a")), ("b", b.url("/b"))]),
    )
    .unwrap();
    daemon.hup();
    eventually(Duration::from_secs(30), "the reload in the log", || async {
        daemon.log().contains("listeners reloaded").then_some(())
    })
    .await;
    c.execute("INSERT INTO customer VALUES (2, 'two')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a and b get 2", || async {
        (ids(&a).contains_key(&2) && ids(&b).contains_key(&2)).then_some(())
    })
    .await;
    assert_eq!(
        walsender_pid(&c).await,
        Some(pid),
        "the replication connection was restarted"
    );
    let listed: i64 = c
        .query_one("SELECT count(*) FROM walhook.listener WHERE enabled", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 2);

    // An invalid file is refused; the old configuration keeps running.
    std::fs::write(&daemon.config, "[source]\nurl = 42\n").unwrap();
    daemon.hup();
    eventually(
        Duration::from_secs(30),
        "the refusal in the log",
        || async { daemon.log().contains("reload refused").then_some(()) },
    )
    .await;
    c.execute("INSERT INTO customer VALUES (3, 'three')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a and b get 3", || async {
        (ids(&a).contains_key(&3) && ids(&b).contains_key(&3)).then_some(())
    })
    .await;
    wait_queue_drained(&c).await;
    // Nothing lost or duplicated for a; b starts at the reload (no replay of 1).
    assert_eq!(
        ids(&a),
        HashMap::from([(1, 1), (2, 1), (3, 1)]),
        "{}",
        daemon.log()
    );
    assert_eq!(ids(&b), HashMap::from([(2, 1), (3, 1)]));
    assert_eq!(walsender_pid(&c).await, Some(pid));
}

/// The log lines that refuse a reload.
fn refusals(daemon: &Daemon) -> Vec<String> {
    daemon
        .log()
        .lines()
        .filter(|l| l.contains("reload refused"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_check_rejects_is_refused_on_reload_in_one_line_and_the_old_one_keeps_delivering() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let a = Receiver::start().await;
    let mut daemon = Daemon::start(&config(&db, &[("a", a.url("/a"))]));
    let c = db.client().await;
    eventually(Duration::from_secs(60), "walhook streaming", || {
        walsender_pid(&c)
    })
    .await;

    let with_header = format!(
        "{}headers = {{ \"X-Name\" = \"Zoë\" }}\n",
        listener_toml("a", &a.url("/a"))
    );
    let cases = [
        (
            listener_toml("a", "http://127.0.0.1:99999/x"),
            "99999",
            7,
            "listener[0].url: the URL's port is not a number from 1 to 65535",
        ),
        (
            with_header,
            "Zoë",
            24,
            "listener[0].headers.X-Name: header value contains a non-ASCII character",
        ),
    ];
    for (id, (block, marker, column, problem)) in (1..).zip(cases) {
        let bad = config_toml(&db.url, &format!("{CUSTOMER_ENTITY}{block}"));
        let line = bad.lines().position(|l| l.contains(marker)).unwrap() + 1;
        let position = format!("walhook.toml:{line}:{column}: {problem}");

        // `walhook check` rejects the file before it touches the database.
        let (_dir, path) = write_config(&bad);
        let (code, stdout, stderr) = walhook(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{stdout}{stderr}");
        assert!(stderr.contains(&position), "{stderr}");

        // SIGHUP with the same file: one refusal line, the daemon keeps running.
        let before = refusals(&daemon).len();
        std::fs::write(&daemon.config, &bad).unwrap();
        daemon.hup();
        eventually(
            Duration::from_secs(30),
            "the refusal in the log",
            || async { (refusals(&daemon).len() > before).then_some(()) },
        )
        .await;
        let new: Vec<String> = refusals(&daemon).split_off(before);
        assert_eq!(new.len(), 1, "{new:#?}");
        assert!(new[0].contains(&position), "{}", new[0]);
        assert!(
            new[0].contains("the running configuration stays"),
            "{}",
            new[0]
        );

        // ...and the old configuration still delivers.
        c.execute("INSERT INTO customer VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
        eventually(Duration::from_secs(30), "a gets the new row", || async {
            ids(&a).contains_key(&i64::from(id)).then_some(())
        })
        .await;
        assert!(daemon.running(), "walhook exited:\n{}", daemon.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_by_reload_is_used_when_connections_are_rebuilt() {
    let db = TestDb::with_options(ClusterOptions {
        hba: Some(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all app 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ..Default::default()
    });
    db.execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE app LOGIN SUPERUSER PASSWORD 'first-password';
         CREATE TABLE customer (id int PRIMARY KEY, name text);
         ALTER TABLE customer REPLICA IDENTITY FULL;",
    )
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("db-password");
    std::fs::write(&password_file, "first-password\n").unwrap();
    let port = db
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap();
    let url = format!(
        "postgres://app@127.0.0.1:{port}/{}?sslmode=disable",
        db.name
    );
    let hook = Receiver::start().await;
    let toml = config_toml(
        &url,
        &format!(
            "{CUSTOMER_ENTITY}{}",
            listener_toml("crm", &hook.url("/hook"))
        ),
    )
    .replace(
        "slot = \"walhook\"",
        &format!(
            "slot = \"walhook\"\npassword_file = \"{}\"",
            password_file.display()
        ),
    );
    let mut daemon = Daemon::start(&toml);
    let c = db.client().await;
    let pid = eventually(Duration::from_secs(60), "walhook streaming", || {
        walsender_pid(&c)
    })
    .await;
    c.execute("INSERT INTO customer VALUES (1, 'one')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "1 delivered", || async {
        ids(&hook).contains_key(&1).then_some(())
    })
    .await;

    // Rotation as documented: write the new password, reload, change it in PostgreSQL.
    std::fs::write(&password_file, "second-password\n").unwrap();
    daemon.hup();
    eventually(Duration::from_secs(30), "the reload", || async {
        daemon
            .log()
            .contains("connection parameters reloaded")
            .then_some(())
    })
    .await;
    c.batch_execute("ALTER ROLE app PASSWORD 'second-password'")
        .await
        .unwrap();
    // Open connections were not dropped for a password change.
    assert_eq!(walsender_pid(&c).await, Some(pid), "{}", daemon.log());

    // Every connection of walhook's is cut: each is rebuilt with the new password.
    c.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
        .await
        .unwrap();
    let new_pid = eventually(Duration::from_secs(60), "a new walsender", || async {
        walsender_pid(&c).await.filter(|p| *p != pid)
    })
    .await;
    assert_ne!(new_pid, pid);
    c.execute("INSERT INTO customer VALUES (2, 'two')", &[])
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "2 delivered", || async {
        ids(&hook).contains_key(&2).then_some(())
    })
    .await;
    assert!(daemon.running(), "{}", daemon.log());
    let failed_logins = db
        .cluster
        .as_ref()
        .map(|cl| cl.server_log())
        .unwrap_or_default()
        .matches("password authentication failed for user \"app\"")
        .count();
    assert_eq!(failed_logins, 0, "a connection used the old password");
    assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
}

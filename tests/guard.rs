//! A restored copy of a database never notifies the original's listeners until adopted.

mod support;

use std::time::Duration;

use support::receiver::Receiver;
use support::{
    CUSTOMER_ENTITY, Daemon, TestDb, config_toml, eventually, listener_toml, wait_streaming,
    walhook, write_config,
};

fn config(url: &str, hook: &str) -> String {
    config_toml(
        url,
        &(CUSTOMER_ENTITY.to_owned() + &listener_toml("crm", hook)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_copy_delivers_nothing_until_adopted() {
    let original = TestDb::new();
    original
        .execute("CREATE TABLE customer (id int PRIMARY KEY, name text); ALTER TABLE customer REPLICA IDENTITY FULL;")
        .await;
    let hook = Receiver::start().await;
    {
        let mut daemon = Daemon::start(&config(&original.url, &hook.url("/h")));
        let c = original.client().await;
        wait_streaming(&c).await;
        c.execute("INSERT INTO customer VALUES (1, 'Ada')", &[])
            .await
            .unwrap();
        hook.wait_for_count(1, Duration::from_secs(60), "delivery from the original")
            .await;
        assert_eq!(daemon.terminate().code(), Some(0), "{}", daemon.log());
    }

    // Restore a dump of the original into another cluster: another system identifier.
    let copy = TestDb::new();
    let orig_cluster = original.cluster.as_ref().unwrap();
    let dump = orig_cluster
        .run_tool(
            "pg_dump",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &orig_cluster.port().to_string(),
                "-U",
                "postgres",
                &original.name,
            ],
        )
        .expect("pg_dump");
    let (_d, dump_file) = write_config(&String::from_utf8_lossy(&dump.stdout));
    let copy_cluster = copy.cluster.as_ref().unwrap();
    std::fs::set_permissions(
        dump_file.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        &dump_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    copy_cluster
        .run_tool(
            "psql",
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &copy_cluster.port().to_string(),
                "-U",
                "postgres",
                "-d",
                &copy.name,
                "-f",
                dump_file.to_str().unwrap(),
            ],
        )
        .expect("restore the dump");

    let copy_hook = Receiver::start().await;
    let daemon = Daemon::start(&config(&copy.url, &copy_hook.url("/copy")));
    let c = copy.client().await;
    c.execute("INSERT INTO customer VALUES (2, 'Grace')", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the refusal in the log",
        || async { daemon.log().contains("this is a copy").then_some(()) },
    )
    .await;
    // Give a wrongly running daemon time to deliver; nothing may arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(copy_hook.count(), 0, "the copy delivered");
    assert_eq!(hook.count(), 1, "the copy notified the original's listener");
    let refusals = daemon
        .log()
        .lines()
        .filter(|l| l.contains("this is a copy"))
        .count();
    assert!(
        refusals <= 2,
        "refusal logged once per loop, not per retry:\n{}",
        daemon.log()
    );
    let path = daemon.config.to_str().unwrap();
    let (code, stdout, stderr) = walhook(&["status", "--config", path]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("copy"),
        "status does not explain the refusal:\n{stdout}"
    );

    let (code, stdout, stderr) = walhook(&["setup", "--adopt", "--config", path]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("adopted"), "{stdout}");
    // The slot is created once the copy is adopted; changes before it are not captured.
    wait_streaming(&c).await;
    c.execute("INSERT INTO customer VALUES (3, 'Hedy')", &[])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "delivery after adoption",
        || async {
            copy_hook
                .requests()
                .iter()
                .any(|r| r.json()["data"]["row"]["id"] == 3)
                .then_some(())
        },
    )
    .await;
    assert_eq!(hook.count(), 1);
}

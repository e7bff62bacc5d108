//! Bad input gets one clear line naming the problem and the fix, and exit code 78.

mod support;

use support::{ClusterOptions, TestDb, config_toml, walhook, write_config};

const EX_CONFIG: i32 = 78;

const CUSTOMER: &str = r#"
[[entity]]
name = "Customer"
table = "customer"
"#;

/// Runs `walhook <cmd> --config <toml>` and returns (code, stdout, stderr).
fn run_with(cmd: &str, toml: &str) -> (i32, String, String) {
    let (_dir, path) = write_config(toml);
    walhook(&[cmd, "--config", path.to_str().unwrap()])
}

fn assert_clean_failure(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, EX_CONFIG, "exit code; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(
        !stderr.contains("RUST_BACKTRACE"),
        "backtrace hint:\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
}

async fn db_with_customer() -> TestDb {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    db
}

#[test]
fn unknown_config_key_names_line_and_column() {
    let toml = "[source]\nurl = \"postgres://x@127.0.0.1/db\"\ncolour = \"red\"\n\n[[entity]]\nname = \"C\"\ntable = \"c\"\n";
    let (code, _, stderr) = run_with("run", toml);
    assert_clean_failure(code, &stderr, &["walhook.toml:3:1", "colour", "unknown"]);
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
}

#[test]
fn check_and_run_refuse_an_unusable_listener_url_with_the_same_line() {
    let toml = format!(
        "[source]\nurl = \"postgres://x@127.0.0.1/db\"\n{CUSTOMER}\n[[listener]]\nname = \"crm\"\nurl = \"http://127.0.0.1:99999/x?token=s3cr3t-t0ken\"\n"
    );
    let mut lines = Vec::new();
    for cmd in ["check", "run"] {
        let (code, _, stderr) = run_with(cmd, &toml);
        assert_clean_failure(
            code,
            &stderr,
            &["walhook.toml:10:7: listener[0].url: the URL's port is not a number from 1 to 65535"],
        );
        assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
        assert!(!stderr.contains("s3cr3t-t0ken"), "{stderr}");
        // The same message; only the temporary directory differs.
        lines.push(
            stderr
                .split_once("walhook.toml:")
                .map(|(_, m)| m.to_owned()),
        );
    }
    assert_eq!(lines[0], lines[1], "check and run use one validator");
}

#[test]
fn missing_config_file_says_which_file_and_how_to_choose_one() {
    let (code, _, stderr) = walhook(&["run", "--config", "/nonexistent/walhook.toml"]);
    assert_clean_failure(code, &stderr, &["/nonexistent/walhook.toml", "--config"]);
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_not_logical_names_the_setting_and_the_restart() {
    let db = TestDb::with_options(ClusterOptions {
        extra_conf: vec!["wal_level = replica".into()],
        ..Default::default()
    });
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let (code, _, stderr) = run_with("run", &config_toml(&db.url, CUSTOMER));
    assert_clean_failure(code, &stderr, &["wal_level", "logical", "restart"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_names_where_the_password_comes_from() {
    let db = TestDb::with_options(ClusterOptions {
        hba: Some(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ..Default::default()
    });
    db.execute(
        "CREATE ROLE app LOGIN REPLICATION PASSWORD 'right-password';
         CREATE TABLE customer (id int PRIMARY KEY, name text);",
    )
    .await;
    let port = db.cluster.as_ref().unwrap().port();
    let url = format!("postgres://app:wrong-password@127.0.0.1:{port}/{}", db.name);
    let (code, _, stderr) = run_with("run", &config_toml(&url, CUSTOMER));
    assert_clean_failure(
        code,
        &stderr,
        &["password authentication failed", "app", "password"],
    );
    assert!(
        !stderr.contains("wrong-password"),
        "password printed:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_table_that_does_not_exist_is_named() {
    let db = db_with_customer().await;
    let entities = format!("{CUSTOMER}\n[[entity]]\nname = \"Invoice\"\ntable = \"invoice\"\n");
    let (code, _, stderr) = run_with("run", &config_toml(&db.url, &entities));
    assert_clean_failure(code, &stderr, &["public.invoice", "does not exist"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_column_that_does_not_exist_is_named() {
    let db = db_with_customer().await;
    let entities =
        "[[entity]]\nname = \"Customer\"\ntable = \"customer\"\nid = [\"customer_no\"]\n";
    let (code, _, stderr) = run_with("run", &config_toml(&db.url, entities));
    assert_clean_failure(code, &stderr, &["customer_no"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_gets_the_alter_role_fix() {
    let db = db_with_customer().await;
    db.execute(&format!(
        "CREATE ROLE plain LOGIN; GRANT SELECT ON customer TO plain; GRANT CREATE ON DATABASE \"{}\" TO plain;",
        db.name
    ))
    .await;
    let url = db.cluster.as_ref().unwrap().url_as("plain", &db.name);
    let (code, _, stderr) = run_with("run", &config_toml(&url, CUSTOMER));
    assert_clean_failure(code, &stderr, &["REPLICATION", "ALTER ROLE"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_prerequisite_with_a_verdict() {
    let db = db_with_customer().await;
    // Correct setup, after `walhook setup`.
    let toml = config_toml(&db.url, CUSTOMER);
    let (code, stdout, stderr) = run_with("setup", &toml);
    assert_eq!(code, 0, "setup failed:\n{stdout}{stderr}");
    let (code, stdout, _) = run_with("check", &toml);
    assert_eq!(code, 0, "{stdout}");
    for name in [
        "wal_level",
        "max_replication_slots",
        "role",
        "replica identity",
        "public.customer",
        "publication",
        "slot",
    ] {
        assert!(
            stdout.contains(name),
            "check output lacks {name}:\n{stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");

    // Incorrect: a missing table and a missing id column.
    let bad = format!(
        "{CUSTOMER}\n[[entity]]\nname = \"Invoice\"\ntable = \"invoice\"\n\n[[entity]]\nname = \"Other\"\ntable = \"other\"\nid = [\"nope\"]\n"
    );
    db.execute("CREATE TABLE other (id int PRIMARY KEY)").await;
    let (code, stdout, _) = run_with("check", &config_toml(&db.url, &bad));
    assert_eq!(code, EX_CONFIG, "{stdout}");
    let fails: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fails.iter().any(|l| l.contains("public.invoice")),
        "{stdout}"
    );
    assert!(fails.iter().any(|l| l.contains("nope")), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("wal_level")),
        "{stdout}"
    );
}

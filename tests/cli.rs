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
    run_with_args(&[cmd], toml)
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

/// Files with one mistake each: syntax, keys, values, references, environment, URL options.
fn bad_files(url: &str) -> Vec<(&'static str, String)> {
    let source = format!("[source]\nurl = \"{url}\"\n");
    vec![
        ("syntax", format!("{source}\n[[entity]\nname = 1\n")),
        (
            "unknown key",
            format!("{source}colour = \"red\"\n{CUSTOMER}"),
        ),
        (
            "duration",
            format!("{source}heartbeat = \"5 parsecs\"\n{CUSTOMER}"),
        ),
        (
            "slot name",
            format!("{source}slot = \"Bad-Slot\"\n{CUSTOMER}"),
        ),
        (
            "unset variable",
            format!("{source}password = \"${{WALHOOK_TEST_NEVER_SET}}\"\n{CUSTOMER}"),
        ),
        (
            "connection option",
            format!("[source]\nurl = \"{url}?sslmode=sometimes\"\n{CUSTOMER}"),
        ),
        (
            "listener",
            format!(
                "{source}{CUSTOMER}\n[[listener]]\nname = \"crm\"\nurl = \"ftp://crm.test/hook\"\nentities = [\"Order\"]\nsecret = \"short\"\n"
            ),
        ),
        (
            "monitor",
            format!("{source}{CUSTOMER}\n[[monitor]]\nname = \"ops\"\n"),
        ),
        (
            "admin",
            format!("{source}{CUSTOMER}\n[admin]\nlisten = \"nonsense\"\n"),
        ),
        ("no entity", source.clone()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_offline_finds_the_same_config_errors_as_check() {
    // `check` gets a real database, so nothing but the file can stop it.
    let db = db_with_customer().await;
    for (what, toml) in bad_files(&db.url) {
        let (_dir, path) = write_config(&toml);
        let path = path.to_str().unwrap();
        let (code, stdout, online) = walhook(&["check", "--config", path]);
        assert_clean_failure(code, &online, &[]);
        assert!(!online.is_empty(), "{what}: check said nothing\n{stdout}");
        let (code, stdout, offline) = walhook(&["check", "--offline", "--config", path]);
        assert_clean_failure(code, &offline, &[]);
        assert_eq!(
            offline, online,
            "{what}: check --offline and check disagree"
        );
        assert!(stdout.is_empty(), "{what}: {stdout}");
    }
    let (code, _, stderr) = walhook(&["check", "--offline", "--config", "/nonexistent/w.toml"]);
    assert_clean_failure(code, &stderr, &["/nonexistent/w.toml"]);
}

#[test]
fn check_offline_accepts_a_good_file_without_any_database() {
    // Port 1 on 127.0.0.1: nothing listens, and --offline must not try.
    let toml = format!(
        "{}\n[[listener]]\nname = \"crm\"\nurl = \"https://crm.example.com/hook\"\n",
        config_toml("postgres://walhook@127.0.0.1:1/app", CUSTOMER)
    );
    let (code, stdout, stderr) = run_with_args(&["check", "--offline"], &toml);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("ok    configuration ")
            && stdout.contains("1 entity, 1 listener, 0 monitors")
            && stdout.contains("database not checked"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// Runs `walhook ARGS --config <toml>` and returns (code, stdout, stderr).
fn run_with_args(args: &[&str], toml: &str) -> (i32, String, String) {
    let (_dir, path) = write_config(toml);
    let mut all = args.to_vec();
    all.extend(["--config", path.to_str().unwrap()]);
    walhook(&all)
}

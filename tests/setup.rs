//! `walhook check` and `walhook setup` against real clusters.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{ClusterOptions, TestDb};
use walhook::config::{Config, EntityConfig, QueueConfig, Secret, SourceConfig};
use walhook::error::{Classify, ErrorClass};
use walhook::setup::{self, DropOptions, Report, SetupError, SetupOptions, Verdict};
use walhook::types::{Action, EntityName, TableName};

const SCHEMA: &str = "
CREATE TABLE customer (id int PRIMARY KEY, first_name text, city text, password_hash text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric);
";

fn entity(name: &str, table: &str) -> EntityConfig {
    EntityConfig {
        name: EntityName::new(name).unwrap(),
        table: TableName {
            schema: "public".into(),
            name: table.into(),
        },
        id: None,
        actions: Action::ROW.to_vec(),
        track: None,
        exclude: vec![],
        subject: None,
        derived: vec![],
        row_filter: None,
        children: vec![],
        scheduled_actions: vec![],
        snapshot_action: "Snapshot".into(),
    }
}

fn config(url: &str, entities: Vec<EntityConfig>) -> Config {
    Config {
        path: PathBuf::from("/etc/walhook/walhook.toml"),
        source: SourceConfig {
            url: Secret::new(url.to_owned()),
            url_redacted: url.to_owned(),
            password: None,
            slot: "walhook".into(),
            publication: "walhook".into(),
            create_publication: true,
            system_name: None,
            heartbeat: None,
            status_interval: Duration::from_secs(5),
            wal_warning_bytes: 1 << 30,
            allow_insecure_password: false,
            receive_timeout: Duration::from_secs(60),
            statement_timeout: None,
            lock_timeout: None,
            synchronous: false,
        },
        queue: QueueConfig {
            retention: Duration::from_secs(7 * 86400),
            batch_size: 5000,
            batch_delay: Duration::from_millis(20),
            batch_bytes: 8 << 20,
            capture_buffer_bytes: 32 << 20,
        },
        entities,
        admin: None,
        listeners: vec![],
        monitors: vec![],
        schedules: vec![],
    }
}

fn default_config(db: &TestDb) -> Config {
    let mut customer = entity("Customer", "customer");
    customer.exclude = vec!["password_hash".into()];
    customer.track = Some(vec!["first_name".into(), "city".into()]);
    config(&db.url, vec![customer, entity("Order", "orders")])
}

fn item<'a>(report: &'a Report, name: &str) -> &'a setup::CheckItem {
    report
        .item(name)
        .unwrap_or_else(|| panic!("no item {name:?} in\n{report}"))
}

fn assert_all_ok(report: &Report) {
    let not_ok: Vec<_> = report
        .items
        .iter()
        .filter(|i| i.verdict != Verdict::Ok)
        .collect();
    assert!(not_ok.is_empty(), "expected all ok:\n{report}");
}

/// Everything `walhook setup` may do, including `--replica-identity-full`.
const FULL: SetupOptions = SetupOptions {
    replica_identity_full: true,
    accept_gap: false,
};

async fn full_setup(db: &TestDb, config: &Config) -> Vec<setup::SetupStep> {
    let mut client = db.client().await;
    setup::setup(&mut client, config, FULL)
        .await
        .unwrap_or_else(|e| panic!("setup: {e}"))
}

/// A fresh database with [`SCHEMA`] and the [`default_config`] for it.
async fn schema_db() -> (TestDb, Config) {
    let db = TestDb::new();
    db.execute(SCHEMA).await;
    let cfg = default_config(&db);
    (db, cfg)
}

/// A client logged in as role `app`, created in `db` by `role_sql`, after [`SCHEMA`].
async fn app_client(db: &mut TestDb, role_sql: &str) -> tokio_postgres::Client {
    db.execute(SCHEMA).await;
    db.execute(role_sql).await;
    let name = db.name.clone();
    let url = db.cluster().url_as("app", &name);
    support::connect(&url).await
}

#[tokio::test]
async fn setup_then_check_reports_every_line_ok() {
    let (db, cfg) = schema_db().await;
    let client = db.client().await;

    let before = setup::check(&client, &cfg).await;
    assert!(before.ok(), "a fresh database has only warnings:\n{before}");
    assert_eq!(item(&before, "publication walhook").verdict, Verdict::Warn);
    assert_eq!(item(&before, "queue schema").verdict, Verdict::Warn);
    assert_eq!(item(&before, "slot walhook").verdict, Verdict::Ok);

    let steps = full_setup(&db, &cfg).await;
    assert!(!steps.is_empty());

    let after = setup::check(&client, &cfg).await;
    assert_all_ok(&after);
    let text = after.to_string();
    assert!(
        text.contains("FULL: changedFields computed exactly"),
        "{text}"
    );
    assert!(text.contains("pgoutput, inactive, retains"), "{text}");
    assert_eq!(after.items.len(), text.lines().count());
}

#[tokio::test]
async fn second_setup_finds_nothing_to_do() {
    let (db, cfg) = schema_db().await;
    full_setup(&db, &cfg).await;

    let client = db.client().await;
    let opts = FULL;
    let steps = setup::plan(&client, &cfg, opts).await.unwrap();
    assert!(steps.is_empty(), "second plan: {steps:?}");
    assert!(full_setup(&db, &cfg).await.is_empty());
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1);
}

#[tokio::test]
async fn applying_a_stale_plan_again_is_harmless() {
    let (db, cfg) = schema_db().await;
    let mut client = db.client().await;
    let opts = FULL;
    let steps = setup::plan(&client, &cfg, opts).await.unwrap();
    setup::apply(&mut client, &steps, None).await.unwrap();
    // Another setup ran meanwhile: the objects exist, and applying again must not fail.
    setup::apply(&mut client, &steps, None)
        .await
        .unwrap_or_else(|e| panic!("second apply: {e}"));
    assert_all_ok(&setup::check(&client, &cfg).await);
}

#[tokio::test]
async fn wal_level_replica_fails_naming_the_setting_and_the_restart() {
    let db = TestDb::with_options(ClusterOptions {
        extra_conf: vec!["wal_level = replica".into()],
        ..Default::default()
    });
    db.execute(SCHEMA).await;
    let cfg = default_config(&db);
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;
    assert!(!report.ok());
    let wal = item(&report, "wal_level");
    assert_eq!(wal.verdict, Verdict::Fail);
    assert_eq!(wal.detail, "replica");
    let line = report
        .to_string()
        .lines()
        .find(|l| l.contains("wal_level") && l.starts_with("FAIL"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        line.contains("wal_level = logical") && line.contains("restart"),
        "{line}"
    );

    let err = setup::plan(&client, &cfg, SetupOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::WalLevel { .. }), "{err}");
    assert!(err.to_string().contains("restart"));
}

#[tokio::test]
async fn missing_table_fails_naming_table_and_config_key() {
    let db = TestDb::new();
    db.execute(SCHEMA).await;
    let cfg = config(&db.url, vec![entity("Invoice", "invoice")]);
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;
    let t = item(&report, "table public.invoice");
    assert_eq!(t.verdict, Verdict::Fail, "{report}");
    let fix = t.fix.clone().unwrap_or_default();
    assert!(t.detail.contains("public.invoice"));
    assert!(fix.contains("[[entity]] table"), "{fix}");
    assert!(report.item("columns public.invoice").is_none());

    let err = setup::plan(&client, &cfg, SetupOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Config);
    assert!(err.to_string().contains("public.invoice"), "{err}");
}

#[tokio::test]
async fn missing_id_track_or_exclude_column_fails() {
    let db = TestDb::new();
    db.execute(SCHEMA).await;
    db.execute("CREATE TABLE note (body text)").await;
    let mut customer = entity("Customer", "customer");
    customer.id = Some(vec!["customer_no".into()]);
    let mut orders = entity("Order", "orders");
    orders.track = Some(vec!["amount".into()]);
    let keyless = entity("Note", "note");
    let cfg = config(&db.url, vec![customer, orders, keyless]);
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;

    let c = item(&report, "columns public.customer");
    assert_eq!(c.verdict, Verdict::Fail, "{report}");
    assert!(c.detail.contains("customer_no"), "{}", c.detail);
    assert!(c.fix.as_deref().unwrap_or("").contains("[[entity]] id"));

    let o = item(&report, "columns public.orders");
    assert_eq!(o.verdict, Verdict::Fail);
    assert!(o.detail.contains("amount"));
    assert!(o.fix.as_deref().unwrap_or("").contains("[[entity]] track"));

    let n = item(&report, "columns public.note");
    assert_eq!(n.verdict, Verdict::Fail);
    assert!(n.detail.contains("no primary key"), "{}", n.detail);
}

#[tokio::test]
async fn replica_identity_default_warns_naming_the_table() {
    let (db, cfg) = schema_db().await;
    let mut client = db.client().await;
    // Everything but replica identity.
    setup::setup(&mut client, &cfg, SetupOptions::default())
        .await
        .unwrap();
    let report = setup::check(&client, &cfg).await;
    assert!(report.ok(), "{report}");
    let ri = item(&report, "replica identity public.customer");
    assert_eq!(ri.verdict, Verdict::Warn);
    assert!(ri.detail.contains("changedFields null"), "{}", ri.detail);
    // customer tracks columns: the warning says untracked updates still come through.
    assert!(ri.detail.contains("untracked"), "{}", ri.detail);
    let fix = ri.fix.as_deref().unwrap_or("");
    assert!(
        fix.contains(r#"ALTER TABLE "public"."customer" REPLICA IDENTITY FULL"#)
            && fix.contains("--replica-identity-full"),
        "{fix}"
    );
    let orders = item(&report, "replica identity public.orders");
    assert!(!orders.detail.contains("untracked"));
    let warned: Vec<&str> = report
        .with_verdict(Verdict::Warn)
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(
        warned,
        [
            "replica identity public.customer",
            "replica identity public.orders"
        ]
    );
}

#[tokio::test]
async fn replica_identity_nothing_fails_and_setup_refuses_to_publish_it() {
    let (db, cfg) = schema_db().await;
    db.execute("ALTER TABLE orders REPLICA IDENTITY NOTHING")
        .await;
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;
    assert_eq!(
        item(&report, "replica identity public.orders").verdict,
        Verdict::Fail,
        "{report}"
    );
    // Publishing it would make the application's UPDATEs fail.
    let err = setup::plan(&client, &cfg, SetupOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::NoReplicaIdentity { .. }), "{err}");
    assert!(err.to_string().contains("public.orders"));
    full_setup(&db, &cfg).await;
    assert_all_ok(&setup::check(&client, &cfg).await);
}

#[tokio::test]
async fn role_without_replication_fails_with_alter_role_fix() {
    let mut db = TestDb::new();
    let client = app_client(
        &mut db,
        "CREATE ROLE app LOGIN; GRANT SELECT ON customer, orders TO app",
    )
    .await;
    let cfg = default_config(&db);
    let report = setup::check(&client, &cfg).await;
    let role = item(&report, "role");
    assert_eq!(role.verdict, Verdict::Fail, "{report}");
    assert!(role.detail.contains("app"));
    assert_eq!(
        role.fix.as_deref(),
        Some(r#"ALTER ROLE "app" REPLICATION;"#)
    );
    assert!(
        report
            .to_string()
            .contains(r#"ALTER ROLE "app" REPLICATION;"#)
    );
}

#[tokio::test]
async fn select_privilege_missing_fails_with_grant() {
    let mut db = TestDb::new();
    let client = app_client(
        &mut db,
        "CREATE ROLE app LOGIN REPLICATION; GRANT SELECT ON customer TO app",
    )
    .await;
    let cfg = default_config(&db);
    let report = setup::check(&client, &cfg).await;
    assert_eq!(item(&report, "select public.customer").verdict, Verdict::Ok);
    let s = item(&report, "select public.orders");
    assert_eq!(s.verdict, Verdict::Fail, "{report}");
    assert_eq!(
        s.fix.as_deref(),
        Some(r#"GRANT SELECT ON "public"."orders" TO "app";"#)
    );
}

#[tokio::test]
async fn setup_without_privilege_is_permanent_and_names_what_is_needed() {
    let mut db = TestDb::new();
    let grants = format!(
        "CREATE ROLE app LOGIN REPLICATION; GRANT SELECT ON customer, orders TO app; \
         GRANT CREATE ON DATABASE \"{}\" TO app",
        db.name
    );
    let mut client = app_client(&mut db, &grants).await;
    let cfg = default_config(&db);
    let err = setup::setup(&mut client, &cfg, FULL).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("permission denied"), "{msg}");
    assert!(
        msg.contains("OWNER TO") && msg.contains("public.customer"),
        "{msg}"
    );
}

#[tokio::test]
async fn publication_missing_a_table_fails_with_alter_publication_fix() {
    let (db, cfg) = schema_db().await;
    db.execute("CREATE PUBLICATION walhook FOR TABLE customer")
        .await;
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;
    let p = item(&report, "publication walhook");
    assert_eq!(p.verdict, Verdict::Fail, "{report}");
    assert!(p.detail.contains("public.orders"));
    assert!(!p.detail.contains("public.customer"));
    assert_eq!(
        p.fix.as_deref(),
        Some(r#"ALTER PUBLICATION "walhook" ADD TABLE "public"."orders"; or walhook setup"#)
    );

    full_setup(&db, &cfg).await;
    assert_eq!(
        item(&setup::check(&client, &cfg).await, "publication walhook").verdict,
        Verdict::Ok
    );
}

#[tokio::test]
async fn missing_publication_fails_when_walhook_may_not_create_it() {
    let (db, mut cfg) = schema_db().await;
    cfg.source.create_publication = false;
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;
    let p = item(&report, "publication walhook");
    assert_eq!(p.verdict, Verdict::Fail, "{report}");
    assert!(p.fix.as_deref().unwrap_or("").contains(
        r#"CREATE PUBLICATION "walhook" FOR TABLE "public"."customer", "public"."orders""#
    ));
}

#[tokio::test]
async fn slot_with_another_plugin_fails_and_is_left_alone() {
    let (db, cfg) = schema_db().await;
    db.execute("SELECT pg_create_logical_replication_slot('walhook', 'test_decoding')")
        .await;
    let client = db.client().await;
    let report = setup::check(&client, &cfg).await;
    let s = item(&report, "slot walhook");
    assert_eq!(s.verdict, Verdict::Fail, "{report}");
    assert!(s.detail.contains("test_decoding"));
    let err = setup::plan(&client, &cfg, SetupOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::SlotConflict { .. }), "{err}");

    let err = setup::drop_all(&client, &cfg, DropOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::SlotConflict { .. }), "{err}");
}

#[tokio::test]
async fn active_slot_warns_and_cannot_be_dropped() {
    let (mut db, cfg) = schema_db().await;
    full_setup(&db, &cfg).await;
    let client = db.client().await;

    // Hold the slot active from a walsender, as a running walhook would.
    let port = db.cluster().port().to_string();
    let name = db.name.clone();
    let mut recv = db
        .cluster()
        .command("pg_recvlogical")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            &name,
        ])
        .args(["-S", "walhook", "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o", "publication_names=walhook"])
        .spawn()
        .unwrap();
    support::eventually(Duration::from_secs(20), "slot to become active", || {
        let client = &client;
        async move {
            let r = client
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 'walhook'",
                    &[],
                )
                .await
                .ok()?;
            r.get::<_, bool>(0).then_some(())
        }
    })
    .await;
    let report = setup::check(&client, &cfg).await;
    let err = setup::drop_all(&client, &cfg, DropOptions::default()).await;
    let _ = recv.kill();
    let _ = recv.wait();

    let slot = item(&report, "slot walhook");
    assert_eq!(slot.verdict, Verdict::Warn, "{report}");
    assert!(slot.detail.contains("active (pid"), "{}", slot.detail);
    let err = err.unwrap_err();
    assert!(
        matches!(err, SetupError::SlotActive { pid: Some(_), .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pid"), "{err}");
}

#[tokio::test]
async fn drop_removes_slot_and_publication_but_keeps_queue_tables() {
    let (db, cfg) = schema_db().await;
    full_setup(&db, &cfg).await;
    let client = db.client().await;
    let done = setup::drop_all(&client, &cfg, DropOptions::default())
        .await
        .unwrap();
    assert_eq!(done.len(), 2, "{done:?}");
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots), \
                    (SELECT count(*) FROM pg_publication), \
                    to_regclass('walhook.schema_migration') IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert_eq!(row.get::<_, i64>(1), 0);
    assert!(row.get::<_, bool>(2));
    // Dropping again finds nothing to drop and does not fail.
    setup::drop_all(&client, &cfg, DropOptions { queue_schema: true })
        .await
        .unwrap();
    let schema: bool = client
        .query_one("SELECT to_regnamespace('walhook') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema);
}

#[tokio::test]
async fn print_sql_lists_every_statement_with_reasons() {
    let (db, cfg) = schema_db().await;
    let client = db.client().await;
    let steps = setup::plan(&client, &cfg, FULL).await.unwrap();
    let sql = setup::script(&steps, &cfg);
    for expected in [
        "CREATE SCHEMA IF NOT EXISTS walhook",
        r#"ALTER TABLE "public"."customer" REPLICA IDENTITY FULL;"#,
        r#"ALTER TABLE "public"."orders" REPLICA IDENTITY FULL;"#,
        r#"CREATE PUBLICATION "walhook" FOR TABLE "public"."customer", "public"."orders" WITH (publish = 'insert, update, delete');"#,
        "SELECT pg_create_logical_replication_slot('walhook', 'pgoutput');",
        "-- Replication slot walhook keeps",
    ] {
        assert!(sql.contains(expected), "missing {expected:?} in\n{sql}");
    }
    // The publication must exist before the slot so the slot can decode from its start.
    let publication = sql.find("CREATE PUBLICATION").unwrap();
    let slot = sql.find("pg_create_logical_replication_slot").unwrap();
    assert!(publication < slot);

    // The script works when a DBA runs it with psql.
    let mut db = db;
    let port = db.cluster().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("setup.sql");
    std::fs::write(&file, &sql).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = db
        .cluster()
        .command("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
        ])
        .args(["-U", "postgres", "-d", &db.name, "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_all_ok(&setup::check(&client, &cfg).await);
}

#[tokio::test]
async fn slot_creation_blocked_by_a_transaction_names_it_when_the_lock_timeout_ends_the_wait() {
    let (db, mut cfg) = schema_db().await;
    cfg.source.lock_timeout = Some(Duration::from_secs(8));
    // An open transaction with an xid: slot creation waits for it to end.
    let blocker = db.client().await;
    blocker
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    let xid: String = blocker
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    let pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let params = cfg.source.connect_params().unwrap();
    let mut client = walhook::db::connect(&params).await.unwrap();
    let e = setup::setup(&mut client, &cfg, FULL).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("transaction {xid} of pid {pid}")),
        "{msg}"
    );
    assert!(msg.contains("creating replication slot walhook"), "{msg}");
    assert!(msg.contains("lock_timeout") && !msg.contains('\n'), "{msg}");
    assert_eq!(e.class(), ErrorClass::Transient);
    // Once the transaction ends, setup goes through.
    blocker.batch_execute("COMMIT").await.unwrap();
    setup::setup(&mut client, &cfg, FULL).await.unwrap();
}

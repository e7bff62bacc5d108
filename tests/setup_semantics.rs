//! `walhook check` and `walhook setup` for event semantics: an entity's `where` as the
//! publication's row filter, and what derived actions need from the replica identity.

mod support;

use std::path::Path;

use support::TestDb;
use walhook::config::Config;
use walhook::setup::{self, Report, SetupError, SetupOptions, Verdict};

fn config(db: &TestDb, entity_extra: &str) -> Config {
    let text = format!(
        "[source]\nurl = \"{}\"\n\n[[entity]]\nname = \"Customer\"\ntable = \"customer\"\n{entity_extra}\n",
        db.url
    );
    Config::parse(&text, Path::new("walhook.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn item<'a>(report: &'a Report, name: &str) -> &'a setup::CheckItem {
    report
        .item(name)
        .unwrap_or_else(|| panic!("no item {name:?} in\n{report}"))
}

async fn row_filter(c: &tokio_postgres::Client) -> Option<String> {
    c.query_opt(
        "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'walhook' AND tablename = 'customer'",
        &[],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

const FILTER: &str = "row filter public.customer";

#[tokio::test]
async fn setup_makes_where_the_publications_row_filter_and_check_shows_the_filter_in_force() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, status text, title_code text);
         ALTER TABLE customer REPLICA IDENTITY FULL;",
    )
    .await;
    let mut c = db.client().await;
    let cfg = config(&db, "where = \"status <> 'draft'\"");

    let before = setup::check(&c, &cfg).await;
    let line = item(&before, FILTER);
    assert_eq!(line.verdict, Verdict::Ok, "{before}");
    assert!(line.detail.contains("walhook setup publishes"), "{before}");

    setup::setup(&mut c, &cfg, SetupOptions::default())
        .await
        .unwrap();
    let in_force = row_filter(&c).await.expect("a row filter");
    assert!(in_force.contains("'draft'"), "{in_force}");
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, FILTER);
    assert_eq!(line.verdict, Verdict::Ok, "{report}");
    assert!(line.detail.contains("'draft'") && line.detail.contains("never leave the server"));
    assert!(report.ok(), "{report}");
    // Running setup again finds nothing to do.
    assert!(
        setup::plan(&c, &cfg, SetupOptions::default())
            .await
            .unwrap()
            .is_empty()
    );

    // A changed where is noticed and applied.
    let cfg = config(&db, "where = \"title_code IN ('NYT', 'WSJ')\"");
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, FILTER);
    assert_eq!(line.verdict, Verdict::Warn, "{report}");
    assert!(line.detail.contains("is not in force"), "{report}");
    assert!(
        line.fix
            .as_deref()
            .unwrap_or_default()
            .contains("DROP TABLE \"public\".\"customer\"; ALTER PUBLICATION \"walhook\" ADD TABLE \"public\".\"customer\" WHERE (title_code IN ('NYT', 'WSJ'))"),
        "{report}"
    );
    setup::setup(&mut c, &cfg, SetupOptions::default())
        .await
        .unwrap();
    assert!(row_filter(&c).await.unwrap().contains("NYT"));
    assert_eq!(
        item(&setup::check(&c, &cfg).await, FILTER).verdict,
        Verdict::Ok
    );

    // Without where, the filter in force is reported and setup removes it.
    let cfg = config(&db, "");
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, FILTER);
    assert_eq!(line.verdict, Verdict::Warn);
    assert!(line.detail.contains("has no where"), "{report}");
    setup::setup(&mut c, &cfg, SetupOptions::default())
        .await
        .unwrap();
    assert_eq!(row_filter(&c).await, None);
    assert!(setup::check(&c, &cfg).await.item(FILTER).is_none());
}

#[tokio::test]
async fn a_filter_outside_the_replica_identity_is_refused_before_it_can_break_updates() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, status text)")
        .await;
    let mut c = db.client().await;
    let cfg = config(&db, "where = \"status <> 'draft'\"");
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, FILTER);
    assert_eq!(line.verdict, Verdict::Fail, "{report}");
    assert!(
        line.detail.contains("status outside the replica identity")
            && line.detail.contains("refuses UPDATE and DELETE"),
        "{report}"
    );
    let err = setup::setup(&mut c, &cfg, SetupOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::RowFilter { .. }), "{err}");
    assert!(err.to_string().contains("--replica-identity-full"), "{err}");
    // Nothing was half-done: no publication that would refuse the application's updates.
    assert_eq!(row_filter(&c).await, None);
    c.batch_execute("INSERT INTO customer VALUES (1, 'live'); UPDATE customer SET status = 'x'")
        .await
        .unwrap();

    let full = SetupOptions {
        replica_identity_full: true,
        accept_gap: false,
    };
    setup::setup(&mut c, &cfg, full).await.unwrap();
    assert!(row_filter(&c).await.is_some());
    c.batch_execute("UPDATE customer SET status = 'y'; DELETE FROM customer")
        .await
        .unwrap();
    assert!(setup::check(&c, &cfg).await.ok());
}

#[tokio::test]
async fn an_invalid_where_is_reported_in_the_servers_words_and_setup_refuses_it() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, status text);
         ALTER TABLE customer REPLICA IDENTITY FULL;",
    )
    .await;
    let mut c = db.client().await;
    let cfg = config(&db, "where = \"colour = 'red'\"");
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, FILTER);
    assert_eq!(line.verdict, Verdict::Fail, "{report}");
    assert!(
        line.detail.contains("refused by the server")
            && line.detail.contains("column \"colour\" does not exist"),
        "{report}"
    );
    assert!(
        line.fix
            .as_deref()
            .unwrap_or_default()
            .contains("correct where under the [[entity]] named Customer")
    );
    let err = setup::setup(&mut c, &cfg, SetupOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
}

#[tokio::test]
async fn check_warns_when_derived_actions_test_changes_without_old_rows() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, status text)")
        .await;
    let c = db.client().await;
    let cfg = config(
        &db,
        "\n[[entity.action]]\nname = \"Cancelled\"\nwhen = { column = \"status\", changed_to = \"cancelled\" }\n\n[[entity.action]]\nname = \"Vip\"\nwhen = { column = \"status\", equals = \"vip\" }\n",
    );
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, "replica identity public.customer");
    assert_eq!(line.verdict, Verdict::Warn, "{report}");
    assert!(
        line.detail
            .contains("derived action(s) Cancelled test what changed, which needs old values"),
        "{report}"
    );
}

#[tokio::test]
async fn child_tables_are_published_and_checked_for_what_their_deletes_carry() {
    let db = TestDb::new();
    db.execute(
        "CREATE TABLE customer (id int PRIMARY KEY, status text);
         ALTER TABLE customer REPLICA IDENTITY FULL;
         CREATE TABLE customer_attribute (id serial PRIMARY KEY, customer_id int, attr_name text);",
    )
    .await;
    let mut c = db.client().await;
    let child = "\n[[entity.child]]\ntable = \"customer_attribute\"\nparent = [\"customer_id\"]\nfield = \"attr_name\"\n";
    let cfg = config(&db, child);
    let name = "child table public.customer_attribute";
    let report = setup::check(&c, &cfg).await;
    let line = item(&report, name);
    assert_eq!(line.verdict, Verdict::Warn, "{report}");
    assert!(
        line.detail
            .contains("deletes do not carry customer_id, attr_name"),
        "{report}"
    );
    let full = SetupOptions {
        replica_identity_full: true,
        accept_gap: false,
    };
    setup::setup(&mut c, &cfg, full).await.unwrap();
    let report = setup::check(&c, &cfg).await;
    assert_eq!(item(&report, name).verdict, Verdict::Ok, "{report}");
    assert!(report.ok(), "{report}");
    let published: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walhook' AND tablename = 'customer_attribute'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1);

    // A child table that does not exist, or lacks a named column, fails.
    let cfg = config(&db, &child.replace("attr_name", "attribute"));
    let report = setup::check(&c, &cfg).await;
    assert!(
        item(&report, name)
            .detail
            .contains("has no column(s) attribute"),
        "{report}"
    );
    let cfg = config(&db, &child.replace("customer_attribute", "customer_tag"));
    let report = setup::check(&c, &cfg).await;
    assert_eq!(
        item(&report, "child table public.customer_tag").verdict,
        Verdict::Fail
    );
    let err = setup::setup(&mut c, &cfg, full).await.unwrap_err();
    assert!(matches!(err, SetupError::TableMissing { .. }), "{err}");
}

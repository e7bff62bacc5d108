mod support;

#[tokio::test]
async fn throwaway_cluster_runs_with_logical_wal_level() {
    let db = support::TestDb::new();
    let c = db.client().await;
    let row = c.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
}

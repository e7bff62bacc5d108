//! The admin endpoint over real HTTP: /metrics parses as Prometheus text and its counters
//! move, /healthz and /readyz answer, bind errors name the fix, and the gauge refresher
//! reads queue depth and slot lag from a real database.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_parse::{LineInfo, Scrape, Value};
use tokio_util::sync::CancellationToken;
use walhook::admin::{self, AdminError, AdminState, Health, METRICS_CONTENT_TYPE};
use walhook::error::{Classify, ErrorClass};
use walhook::metrics::{AttemptOutcome, Metrics, NotificationStatus, refresh_gauges};

/// A running admin server on a free port; cancelled on drop.
struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), AdminError>>>,
}

impl Server {
    async fn start() -> Server {
        let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let shutdown = CancellationToken::new();
        let app = admin::router(AdminState {
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
        });
        let task = tokio::spawn(admin::serve_router(listener, app, shutdown.clone()));
        Server {
            addr,
            metrics,
            health,
            shutdown,
            task: Some(task),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("http://{}{path}", self.addr))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap()
    }

    async fn scrape(&self) -> Scrape {
        let resp = self.get("/metrics").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            METRICS_CONTENT_TYPE
        );
        let text = resp.text().await.unwrap();
        // The parser skips lines it cannot read; insist that it could read every one.
        for line in text.lines() {
            assert!(
                !matches!(LineInfo::parse(line), LineInfo::Ignored),
                "unparseable line {line:?} in\n{text}"
            );
        }
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The single value of `metric` whose labels include all of `labels`.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Value {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    found[0].value.clone()
}

fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match value(scrape, metric, labels) {
        Value::Counter(v) => v,
        other => panic!("{metric} is not a counter: {other:?}"),
    }
}

/// Histogram `_sum` and `_count` lines, which the parser leaves untyped.
fn untyped(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match value(scrape, metric, labels) {
        Value::Untyped(v) => v,
        other => panic!("{metric} is not untyped: {other:?}"),
    }
}

fn gauge(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match value(scrape, metric, labels) {
        Value::Gauge(v) => v,
        other => panic!("{metric} is not a gauge: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let server = Server::start().await;
    let before = server.scrape().await;
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        gauge(&before, "walhook_build_info", &[("version", version)]),
        1.0
    );
    assert_eq!(counter(&before, "walhook_events_read_total", &[]), 0.0);
    assert_eq!(gauge(&before, "walhook_streaming", &[]), 0.0);

    let m = &server.metrics;
    m.events_read(5);
    m.events_read(2);
    m.events_queued(&[("Customer", "Created", 3), ("Order", "Updated", 1)]);
    m.event_queued("Customer", "Created");
    m.delivery_attempt("crm", AttemptOutcome::Retry, None);
    m.delivery_attempt(
        "crm",
        AttemptOutcome::Success,
        Some(Duration::from_millis(40)),
    );
    m.delivery_attempt("crm", AttemptOutcome::Success, Some(Duration::from_secs(3)));
    m.delivery_attempt("erp", AttemptOutcome::Failed, None);
    m.notification_completed("crm", NotificationStatus::Processed);
    m.notification_completed("crm", NotificationStatus::Processed);
    m.notification_completed("erp", NotificationStatus::Failed);
    m.set_replication_lag(4096, Some(2.5));
    m.set_queue("crm", 7, Duration::from_secs(90));
    m.reconnect();
    m.set_streaming(true);

    let s = server.scrape().await;
    assert_eq!(counter(&s, "walhook_events_read_total", &[]), 7.0);
    let queued = |entity, action| {
        counter(
            &s,
            "walhook_events_queued_total",
            &[("entity", entity), ("action", action)],
        )
    };
    assert_eq!(queued("Customer", "Created"), 4.0);
    assert_eq!(queued("Order", "Updated"), 1.0);
    let attempts = |listener, outcome| {
        counter(
            &s,
            "walhook_delivery_attempts_total",
            &[("listener", listener), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("crm", "retry"), 1.0);
    assert_eq!(attempts("crm", "success"), 2.0);
    assert_eq!(attempts("erp", "failed"), 1.0);
    let notifications = |listener, status| {
        counter(
            &s,
            "walhook_notifications_total",
            &[("listener", listener), ("status", status)],
        )
    };
    assert_eq!(notifications("crm", "processed"), 2.0);
    assert_eq!(notifications("erp", "failed"), 1.0);
    assert_eq!(gauge(&s, "walhook_replication_lag_bytes", &[]), 4096.0);
    assert_eq!(gauge(&s, "walhook_replication_lag_seconds", &[]), 2.5);
    assert_eq!(
        gauge(&s, "walhook_queue_depth", &[("listener", "crm")]),
        7.0
    );
    assert_eq!(
        gauge(
            &s,
            "walhook_queue_oldest_age_seconds",
            &[("listener", "crm")]
        ),
        90.0
    );
    assert_eq!(counter(&s, "walhook_reconnects_total", &[]), 1.0);
    assert_eq!(gauge(&s, "walhook_streaming", &[]), 1.0);

    let Value::Histogram(buckets) = value(
        &s,
        "walhook_delivery_latency_seconds",
        &[("listener", "crm")],
    ) else {
        panic!("latency is not a histogram");
    };
    let at = |le: f64| {
        buckets
            .iter()
            .find(|b| b.less_than == le)
            .unwrap_or_else(|| panic!("no bucket le={le}: {buckets:?}"))
            .count
    };
    assert_eq!(at(0.025), 0.0);
    assert_eq!(at(0.05), 1.0);
    assert_eq!(at(2.5), 1.0);
    assert_eq!(at(5.0), 2.0);
    assert_eq!(at(f64::INFINITY), 2.0);
    assert_eq!(
        untyped(
            &s,
            "walhook_delivery_latency_seconds_count",
            &[("listener", "crm")]
        ),
        2.0
    );
    assert_eq!(
        untyped(
            &s,
            "walhook_delivery_latency_seconds_sum",
            &[("listener", "crm")]
        ),
        3.04
    );
}

#[tokio::test]
async fn healthz_is_ok_and_readyz_needs_streaming_and_queue() {
    let server = Server::start().await;
    let health = server.get("/healthz").await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap().trim(), "ok");

    let not_ready = server.get("/readyz").await;
    assert_eq!(not_ready.status(), 503);
    let body = not_ready.text().await.unwrap();
    assert!(body.contains("not streaming"), "{body}");

    server.health.set_streaming(true);
    server
        .health
        .set_queue_error(Some("connection refused\nto queue".to_owned()));
    let queue_down = server.get("/readyz").await;
    assert_eq!(queue_down.status(), 503);
    let body = queue_down.text().await.unwrap();
    assert_eq!(
        body,
        "queue database is not reachable: connection refused to queue\n"
    );

    server.health.set_queue_reachable(true);
    assert_eq!(server.get("/readyz").await.status(), 200);

    // Each reason keeps its own error: a later queue error does not hide capture's.
    server.health.set_streaming(false);
    server
        .health
        .set_capture_error(Some("nothing received (receive_timeout)".to_owned()));
    server.health.set_queue_reachable(false);
    server.health.set_queue_error(Some("timed out".to_owned()));
    let both = server.get("/readyz").await;
    assert_eq!(both.status(), 503);
    assert_eq!(
        both.text().await.unwrap(),
        "replication is not streaming: nothing received (receive_timeout); queue database is not reachable: timed out\n"
    );
}

#[tokio::test]
async fn server_stops_when_shutdown_is_cancelled() {
    let mut server = Server::start().await;
    assert_eq!(server.get("/healthz").await.status(), 200);
    server.shutdown.cancel();
    let task = server.task.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server stops within 10 s")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn address_in_use_is_a_transient_error_naming_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = admin::serve(
        addr,
        Arc::new(Metrics::new()),
        Arc::new(Health::new()),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    // Not a configuration error: exit 78 would stop the unit for good over a port that
    // another process may release.
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(
        err.to_string(),
        format!(
            "cannot listen on {addr} for [admin]: address in use; stop what holds the address or change [admin] listen"
        )
    );
}

#[tokio::test]
async fn the_admin_endpoint_binds_once_its_address_is_released() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let app = admin::router(AdminState {
        metrics: Arc::new(Metrics::new()),
        health: Arc::new(Health::new()),
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(admin::serve_retrying(
        addr,
        app,
        Duration::from_millis(100),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "gave up instead of trying again");
    drop(taken);
    let url = format!("http://{addr}/healthz");
    support::eventually(
        Duration::from_secs(10),
        "/healthz after release",
        || async {
            let r = reqwest::get(&url).await.ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn refresh_gauges_reads_queue_depth_and_slot_lag() {
    let db = support::TestDb::new();
    let mut client = db.client().await;
    walhook::queue::migrate(&mut client).await.unwrap();
    db.execute(
        "INSERT INTO walhook.listener (name) VALUES ('crm'), ('idle');
         INSERT INTO walhook.new (id, event_id, listener, entity, entity_id, commit_lsn, seq, created_at)
         SELECT nextval('walhook.notification_id_seq'), i, 'crm', 'Customer', i::text, '0/1', i,
                now() - interval '120 seconds' + i * interval '1 second'
           FROM generate_series(1, 3) i;",
    )
    .await;
    // A logical slot cannot be created in a transaction that has written, so on its own.
    db.execute("SELECT pg_create_logical_replication_slot('metrics_slot', 'pgoutput')")
        .await;
    db.execute("CREATE TABLE wal_filler AS SELECT g FROM generate_series(1, 1000) g;")
        .await;

    let metrics = Metrics::new();
    // A listener that drained must read 0, not its last depth.
    metrics.set_queue("idle", 9, Duration::from_secs(9));
    refresh_gauges(&client, &metrics, "metrics_slot")
        .await
        .unwrap();
    let text = metrics.render();
    let s = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(
        gauge(&s, "walhook_queue_depth", &[("listener", "crm")]),
        3.0
    );
    assert_eq!(
        gauge(&s, "walhook_queue_depth", &[("listener", "idle")]),
        0.0
    );
    assert_eq!(
        gauge(
            &s,
            "walhook_queue_oldest_age_seconds",
            &[("listener", "idle")]
        ),
        0.0
    );
    let age = gauge(
        &s,
        "walhook_queue_oldest_age_seconds",
        &[("listener", "crm")],
    );
    assert!((119.0..200.0).contains(&age), "oldest age {age}");
    let lag = gauge(&s, "walhook_replication_lag_bytes", &[]);
    assert!(lag > 0.0, "slot lag after writing WAL: {lag}");

    // A slot that does not exist leaves the lag as it was rather than reporting zero.
    refresh_gauges(&client, &metrics, "no_such_slot")
        .await
        .unwrap();
    let s = Scrape::parse(metrics.render().lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert_eq!(gauge(&s, "walhook_replication_lag_bytes", &[]), lag);
}

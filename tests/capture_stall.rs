//! Stalls are seen: a network path that stops forwarding without closing (a half-open
//! peer) is noticed by the replication receive timeout, `/readyz` says so, and capture
//! resumes exactly once per row when the path recovers.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{CUSTOMER_ENTITY, TestDb, config_toml, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A TCP proxy on 127.0.0.1 that can stop forwarding in both directions while keeping
/// every socket open, as a frozen peer or a black-holing firewall does.
struct FreezableProxy {
    port: u16,
    frozen: watch::Sender<bool>,
    stop: CancellationToken,
}

impl FreezableProxy {
    async fn start(upstream_port: u16) -> FreezableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, frozen_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let accept_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => return,
                    },
                    _ = accept_stop.cancelled() => return,
                };
                let Ok(upstream) =
                    tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (in_r, in_w) = inbound.into_split();
                let (up_r, up_w) = upstream.into_split();
                tokio::spawn(pump(in_r, up_w, frozen_rx.clone(), accept_stop.clone()));
                tokio::spawn(pump(up_r, in_w, frozen_rx.clone(), accept_stop.clone()));
            }
        });
        FreezableProxy { port, frozen, stop }
    }

    fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies bytes one way; while frozen it reads nothing (the sockets stay open).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *frozen.borrow_and_update() {
            tokio::select! {
                changed = frozen.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
            continue;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = frozen.changed() => continue,
            _ = stop.cancelled() => return,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn readyz(port: u16) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

async fn slot_pid(c: &tokio_postgres::Client) -> Option<i32> {
    c.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walhook'",
        &[],
    )
    .await
    .ok()?
    .get(0)
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_peer_is_noticed_and_every_row_becomes_one_event() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let pg_port = db.cluster.as_ref().expect("own cluster").port();
    let proxy = FreezableProxy::start(pg_port).await;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{}?connect_timeout=2&sslmode=disable",
        proxy.port, db.name
    );
    let toml = config_toml(&url, CUSTOMER_ENTITY).replacen(
        "slot = ",
        "receive_timeout = \"3s\"\nslot = ",
        1,
    ) + &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n");
    let config = walhook::config::Config::parse(&toml, Path::new("stall.toml")).unwrap();
    let stop = CancellationToken::new();
    let service = tokio::spawn(walhook::service::run(config, stop.clone()));

    let client = db.client().await;
    support::wait_streaming(&client).await;
    client
        .batch_execute("INSERT INTO customer SELECT g, 'a' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the first 50 events", || async {
        (support::event_count(&client).await == 50).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "/readyz ready", || async {
        readyz(admin_port).await.filter(|(s, _)| *s == 200)
    })
    .await;
    let pid_before = slot_pid(&client).await.expect("slot active");

    proxy.freeze(true);
    client
        .batch_execute("INSERT INTO customer SELECT g, 'b' FROM generate_series(51, 100) g")
        .await
        .unwrap();
    // Not ready while the stream is silent, then the receive timeout gives up on it.
    let (_, why) = eventually(
        Duration::from_secs(90),
        "/readyz to report the stall",
        || async { readyz(admin_port).await.filter(|(s, _)| *s == 503) },
    )
    .await;
    assert!(
        why.contains("capture stalled") || why.contains("not streaming"),
        "{why}"
    );
    eventually(
        Duration::from_secs(90),
        "the receive timeout to end the stream",
        || async {
            readyz(admin_port)
                .await
                .filter(|(s, why)| *s == 503 && why.contains("receive_timeout"))
        },
    )
    .await;
    proxy.freeze(false);

    eventually(Duration::from_secs(90), "all 100 events", || async {
        (support::event_count(&client).await == 100).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "a new walsender", || async {
        slot_pid(&client).await.filter(|p| *p != pid_before)
    })
    .await;
    eventually(Duration::from_secs(30), "/readyz ready again", || async {
        readyz(admin_port).await.filter(|(s, _)| *s == 200)
    })
    .await;
    // Exactly one event per row.
    assert_eq!(
        count(
            &client,
            "SELECT count(DISTINCT entity_id) FROM walhook.event"
        )
        .await,
        100
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM walhook.event").await,
        100
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), service)
        .await
        .expect("service stops")
        .unwrap()
        .unwrap();
}

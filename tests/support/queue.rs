//! A migrated queue database fed by the queue writer directly (no capture), and a
//! dispatcher running over it: for delivery tests that need exact control of the events.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walhook::config::{Config, ListenerConfig};
use walhook::delivery::dispatcher;
use walhook::mapper::EntityEvent;
use walhook::queue::{self, QueueWriter};

/// Listeners parsed from `[[listener]]` TOML (entities Customer and Order exist).
pub fn listeners(blocks: &str) -> Vec<ListenerConfig> {
    let text = format!(
        "[source]\nurl = \"postgres://walhook@localhost/app\"\n\n\
         [[entity]]\nname = \"Customer\"\ntable = \"customer\"\n\n\
         [[entity]]\nname = \"Order\"\ntable = \"orders\"\n\n{blocks}"
    );
    let config = Config::parse_with_env(&text, Path::new("walhook.toml"), &|_| None)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    config.listeners
}

/// A migrated database, a writer subscribed for the listeners named and a client.
pub struct QueueDb {
    pub db: super::TestDb,
    pub writer: QueueWriter,
    pub client: tokio_postgres::Client,
}

/// A running dispatcher.
pub struct Dispatch {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dispatcher::DispatchError>>,
}

impl QueueDb {
    /// A fresh database whose writer fans events out to `names` (every entity, every action).
    pub async fn new(names: &[&str]) -> QueueDb {
        let db = super::TestDb::new();
        let mut client = db.client().await;
        queue::migrate(&mut client).await.expect("migrate");
        let mut writer = QueueWriter::new(db.client().await, "7301234567890123456")
            .await
            .expect("queue writer");
        writer.set_listeners(names.iter().map(|n| (n.to_string(), None)).collect());
        QueueDb { db, writer, client }
    }

    /// Writes `events` in one transaction.
    pub async fn write(&mut self, events: &[EntityEvent]) {
        let outcome = self.writer.write_batch(events, None).await.expect("write");
        assert_eq!(outcome.inserted, events.len() as u64);
    }

    /// The first column of the first row of `sql`, as i64.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Waits until `walhook.processed` holds `n` rows.
    pub async fn wait_processed(&self, n: i64, within: Duration) {
        super::eventually(within, &format!("{n} processed notifications"), || async {
            (self.count("SELECT count(*) FROM walhook.processed").await == n).then_some(())
        })
        .await
    }

    /// Starts a dispatcher for `listeners` (sourceSystem "CRM").
    pub fn dispatch(&self, listeners: Vec<ListenerConfig>) -> Dispatch {
        let stop = CancellationToken::new();
        let db =
            walhook::replication::conn::ConnectParams::parse(&self.db.url, None).expect("db url");
        let task = tokio::spawn(dispatcher::run_with(
            db,
            listeners,
            "CRM".into(),
            stop.clone(),
            dispatcher::Options::default(),
        ));
        Dispatch { stop, task }
    }
}

impl Dispatch {
    /// Stops the dispatcher and checks that it ended cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("dispatcher stops within 10s")
            .expect("dispatcher task")
            .expect("dispatcher ends with Ok");
    }
}

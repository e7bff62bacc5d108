//! The heartbeat: a non-transactional logical message now and then, so the slot moves on a
//! database whose tracked tables are quiet while the cluster is busy.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::db::Source;

/// Prefix of the heartbeat messages written with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "walhook.heartbeat";

const SQL_HEARTBEAT: &str = "SELECT pg_logical_emit_message(false, $1, '')";

/// Writes a heartbeat every `every` until `stop`.
pub(super) async fn run(source: Source, every: Duration, stop: CancellationToken) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = source.connect().await.ok();
        }
        let Some(c) = client.as_ref() else { continue };
        match c.execute(SQL_HEARTBEAT, &[&HEARTBEAT_PREFIX]).await {
            Ok(_) => {
                if failing {
                    info!("heartbeat works again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(
                        "heartbeat failed: {e}; the slot may hold WAL while tracked tables are idle"
                    );
                }
                failing = true;
            }
        }
    }
}
